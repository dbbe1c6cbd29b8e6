//! Network namespaces owned by a test: created with iproute2, entered per thread with `setns`,
//! deleted (with every process still inside killed) on drop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/run/netns/<name>`), removed on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `<prefix>-<pid>-<seq>` with its loopback up.
    ///
    /// The pid and a process-wide sequence keep names unique across parallel tests and runs.
    pub fn new(prefix: &str) -> Result<Self> {
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{seq}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .context("running ip netns add")?;
        if !out.status.success() {
            bail!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` and `ip -n` know it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the handle other namespaces-aware tools take.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a new thread that has entered this namespace and returns its result.
    ///
    /// `setns` changes only the calling thread, so the caller's own namespace is untouched. A
    /// panic in `f` is propagated.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                enter(&path).unwrap_or_else(|e| panic!("{e:#}"));
                f()
            });
            match worker.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// `GET path` over HTTP/1.0 to `addr` from inside this namespace: the status code and body,
    /// or `None` when the server cannot be reached or answers garbage (10 s read bound).
    pub fn http_get(&self, addr: &str, path: &str) -> Option<(u16, String)> {
        use std::io::{Read as _, Write as _};
        let (addr, path) = (addr.to_owned(), path.to_owned());
        self.run(move || {
            let mut stream = std::net::TcpStream::connect(&addr).ok()?;
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .ok()?;
            write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            let code = response.split_whitespace().nth(1)?.parse().ok()?;
            let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
            Some((code, body))
        })
    }

    /// Starts a long-lived thread inside this namespace.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<T>> {
        let path = self.path();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let entered = enter(&path);
                let failed = entered.is_err();
                let _ = ready_tx.send(entered);
                // The caller gets the error from the channel and never joins this thread.
                assert!(!failed, "could not enter the namespace");
                f()
            })?;
        ready_rx
            .recv()
            .context("namespace thread exited before entering")??;
        Ok(handle)
    }

    /// Moves the calling thread into this namespace for good (for runtimes whose worker
    /// threads must all live in it, e.g. through tokio's `on_thread_start`).
    ///
    /// # Errors
    /// If the namespace cannot be opened or entered.
    pub fn enter_this_thread(&self) -> Result<()> {
        enter(&self.path())
    }

    /// A command that runs inside this namespace. Unlike `ip netns exec`, the child keeps the
    /// caller's mounts (notably bpffs under `/sys/fs/bpf`, which `ip netns exec` hides by
    /// remounting `/sys`); only its network namespace changes.
    pub fn command(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new(program);
        let path = self.path();
        // SAFETY: the closure runs between fork and exec; it only calls open(2) and setns(2),
        // which are async-signal-safe, and allocates nothing (the path is prepared here).
        let c_path =
            std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default();
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `program args` inside the namespace; fails with its stderr unless it exits 0.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.command(program).args(args).output()?;
        checked(&format!("{program} {}", args.join(" ")), out)
    }

    /// Runs `ip -n <ns> args` and returns stdout; fails with stderr unless it exits 0.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()?;
        checked(&format!("ip -n {} {}", self.name, args.join(" ")), out)
    }

    /// Sets a sysctl inside the namespace, e.g. `("net.ipv4.ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))
            .with_context(|| format!("setting {key}={value} in {}", self.name))
    }

    /// Kills every process still running inside the namespace.
    fn kill_all(&self) {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        else {
            return;
        };
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn enter(path: &std::path::Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns(2) on a valid, open namespace fd only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns into {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn checked(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what}: exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
