//! A child process (etcd or kube-apiserver) whose output goes to a log file and which never
//! outlives its owner.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result};

/// A running child with its log file. Dropping it kills the child (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct Process {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Spawns `binary args…` with stdout and stderr appended to `log` (appended, so a restarted
    /// apiserver's log follows the previous run's).
    pub fn spawn(name: &'static str, binary: &Path, args: &[String], log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone().context("duplicating log file handle")?;
        let mut cmd = Command::new(binary);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
        // async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // If the test process dies without running Drop (SIGKILL, abort), the kernel
                // kills the child too, so no etcd or apiserver outlives its test. The signal is
                // tied to the spawning *thread*: tests spawn from the thread that owns the
                // fixture, which outlives it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name} from {}", binary.display()))?;
        Ok(Self {
            name,
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Returns an error naming the exit status if the child has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            anyhow::bail!("{} was stopped", self.name);
        };
        match child
            .try_wait()
            .with_context(|| format!("polling {}", self.name))?
        {
            None => Ok(()),
            Some(status) => anyhow::bail!("{} exited early with {status}", self.name),
        }
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean the child is already gone; nothing more to do either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of the log, for error messages and panicking tests.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a file, or a note saying why it could not be read.
pub fn tail(path: &Path, n: usize) -> String {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("<cannot read {}: {e}>", path.display()),
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
