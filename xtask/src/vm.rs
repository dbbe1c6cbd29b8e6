//! The test VM: qemu booting a stock Debian kernel with our initramfs, the host's `/` shared
//! read-only over virtio-9p and chrooted into, so a command inside sees the host's binaries (the
//! test executables in `target/`, iproute2, wg, ping) at the same paths. A second, writable share
//! (a scratch directory under `target/nodeseal-vm/`) carries the command script in and the exit
//! status out. The command's output arrives on the serial console.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use crate::kernel::{self, BootableKernel, KernelSeries};
use crate::run::{self, Tally};

#[derive(Args)]
pub struct VmArgs {
    /// Kernel series to boot (6.1 or 6.12).
    #[arg(long, default_value = "6.12")]
    kernel: String,
    #[command(flatten)]
    options: VmOptions,
    /// The command to run as root inside the guest, in the current directory.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args, Clone, Debug)]
pub struct VmOptions {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory_mib: u32,
    /// Guest CPUs (defaults to the host's).
    #[arg(long)]
    pub cpus: Option<usize>,
    /// Kill the guest after this many seconds.
    #[arg(long, default_value_t = 2400)]
    pub timeout_secs: u64,
    /// Hardware acceleration: `auto` probes KVM once and falls back to TCG.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

/// How long a guest may take to boot and start the command: a boot takes about 4 s under TCG,
/// so a guest silent for this long has hung.
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

/// Environment variables passed into the guest command.
fn forwarded_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("NODESEAL_")
                || k.starts_with("RUST_")
                || matches!(k.as_str(), "PATH" | "HOME" | "TERM" | "CARGO_TARGET_DIR")
        })
        .collect()
}

pub fn run_cli(args: VmArgs) -> Result<ExitCode> {
    let series = KernelSeries::parse(&args.kernel)?;
    let kernel = kernel::prepare(&series, &cache_dir())?;
    let (ok, _) = run_command(&kernel, &args.command, &args.options)?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn cache_dir() -> PathBuf {
    crate::target_dir().join("nodeseal-vm")
}

/// Boots `kernel`, runs `command` inside and returns whether it exited 0, with the libtest tally
/// of its output.
pub fn run_command(
    kernel: &BootableKernel,
    command: &[String],
    options: &VmOptions,
) -> Result<(bool, Tally)> {
    let accel = match options.accel {
        Accel::Auto if kvm_works(kernel, options) => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        other => other,
    };
    let cwd = std::env::current_dir()?;
    let scratch = Scratch::new()?;
    let mut script = String::from("#!/bin/sh\n");
    for (k, v) in forwarded_env() {
        script.push_str(&format!("export {k}={}\n", shell_quote(&v)));
    }
    // The first thing the guest does: tells the host it booted (see BOOT_DEADLINE).
    let started = scratch.path.join("started");
    script.push_str(&format!(
        ": > {}\n",
        shell_quote(&started.to_string_lossy())
    ));
    script.push_str("export NODESEAL_IN_VM=1\n");
    script.push_str(&format!(
        "cd {} || exit 125\n",
        shell_quote(&cwd.to_string_lossy())
    ));
    let quoted: Vec<String> = command.iter().map(|a| shell_quote(a)).collect();
    script.push_str(&format!("exec {}\n", quoted.join(" ")));
    fs::write(scratch.path.join("run.sh"), script)?;

    let shown = command.join(" ");
    eprintln!(
        "xtask: booting Linux {} ({accel:?}) for: {}",
        kernel.release,
        shown.lines().next().unwrap_or_default()
    );
    // A guest that dies or hangs before running the command (under TCG both kernels have been
    // seen to oops in early boot; on 6.1 one such boot hung until the overall timeout) is booted
    // once more. So is one whose kernel panicked while running it (under TCG 6.12 was seen to
    // oops on a breakpoint left by kernel text patching, in the middle of the tests): the
    // command runs once more from the start. A run that ended any other way is never repeated.
    let mut boots = 0;
    let (tally, rc) = loop {
        boots += 1;
        let mut qemu = qemu_command(kernel, &scratch.path, options, accel);
        let (_, tally) = run::streamed_with_watchdog(
            &mut qemu,
            Duration::from_secs(options.timeout_secs),
            |elapsed| {
                (elapsed > BOOT_DEADLINE && !started.exists()).then(|| {
                    format!("did not start the command within {BOOT_DEADLINE:?} (a hung boot)")
                })
            },
        )?;
        let rc = fs::read_to_string(scratch.path.join("rc"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if boots >= 2 {
            break (tally, rc);
        }
        if !started.exists() {
            eprintln!("xtask: the guest died before running anything; booting it once more");
        } else if rc.is_none() && tally.kernel_panicked {
            eprintln!(
                "xtask: the guest kernel panicked while running the command (an emulation fault \
                 under TCG, not a test result); booting it once more and running it again"
            );
            let _ = fs::remove_file(&started);
        } else {
            break (tally, rc);
        }
    };
    match rc {
        Some(code) => Ok((code == 0, tally)),
        None => {
            eprintln!("xtask: the guest did not report an exit status (boot failure or timeout)");
            Ok((false, tally))
        }
    }
}

fn qemu_command(
    kernel: &BootableKernel,
    scratch: &Path,
    options: &VmOptions,
    accel: Accel,
) -> Command {
    let cpus = options
        .cpus
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let mut cmd = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        _ => cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    cmd.args([
        "-smp",
        &cpus.to_string(),
        "-m",
        &options.memory_mib.to_string(),
    ])
    .args([
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-device",
        "virtio-rng-pci",
    ])
    .args(["-bios", "/usr/share/qemu/qboot.rom"])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(&kernel.initramfs)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off nodeseal.scratch={}",
        scratch.display()
    ))
    .args([
        "-fsdev",
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev",
    ])
    .arg(format!(
        "local,id=scratch,path={},security_model=none",
        scratch.display()
    ))
    .args(["-device", "virtio-9p-pci,fsdev=scratch,mount_tag=scratch"])
    .stdin(std::process::Stdio::null());
    cmd
}

/// Whether a KVM guest boots and runs a trivial command here; probed once per kernel and cached.
fn kvm_works(kernel: &BootableKernel, options: &VmOptions) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let marker = cache_dir().join(format!("kvm-probe-{}", kernel.release));
    if let Ok(verdict) = fs::read_to_string(&marker) {
        return verdict.trim() == "ok";
    }
    eprintln!("xtask: probing KVM");
    let probe = VmOptions {
        timeout_secs: 60,
        accel: Accel::Kvm,
        ..options.clone()
    };
    let works = run_command(kernel, &["true".to_owned()], &probe).is_ok_and(|(ok, _)| ok);
    eprintln!(
        "xtask: KVM {}",
        if works {
            "works"
        } else {
            "does not work here; using TCG"
        }
    );
    let _ = fs::write(&marker, if works { "ok" } else { "fail" });
    works
}

struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new() -> Result<Self> {
        let base = cache_dir().join("runs");
        fs::create_dir_all(&base)?;
        for n in 0..1000u32 {
            let path = base.join(format!("{}-{n}", std::process::id()));
            if fs::create_dir(&path).is_ok() {
                return Ok(Self { path });
            }
        }
        bail!("cannot create a scratch directory under {}", base.display())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Boots each kernel of the matrix in turn for the same command.
pub fn prepare_matrix(list: &str) -> Result<Vec<BootableKernel>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            let series = KernelSeries::parse(name)?;
            kernel::prepare(&series, &cache_dir())
                .with_context(|| format!("preparing kernel {name}"))
        })
        .collect()
}
