//! `cargo xtask bench <name>`: builds a crate's benchmark (a `harness = false` bench target that
//! prints its own table of figures and ratios against a baseline measured in the same run) and
//! runs it on the host, or in the test VM when it needs kernel features the host lacks.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use crate::kernel::{DEFAULT_MATRIX, MATRIX_ENV};
use crate::{deps, run, vm};

#[derive(Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum)]
    name: BenchName,
    /// Kernel series for benchmarks that run in the VM.
    #[arg(long, env = MATRIX_ENV, default_value = DEFAULT_MATRIX)]
    kernels: String,
    #[command(flatten)]
    vm: vm::VmOptions,
    /// Passed to the benchmark binary.
    #[arg(last = true)]
    bench_args: Vec<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BenchName {
    /// XFRM programming vs `ip -batch` (needs ESP: runs in the VM).
    Xfrm,
    /// Mutual TLS 1.3 handshakes + key derivation per second per core.
    Keymgr,
    /// ns per packet of from-pod vs a pass-through program, and of from-pod/to-pod with trace
    /// events off vs on (BPF_PROG_TEST_RUN).
    Bpf,
    /// Agent convergence against N simulated peers, and `keys rotate --wait` under traffic
    /// (needs ESP: runs in the VM).
    Agent,
    /// The Kubernetes store backend with 1000 nodes in a real kube-apiserver: watch snapshot
    /// against the directory backend, apiserver requests in a quiet period (host).
    Store,
    /// Identity policy at 1,000 policies over 10,000 identities: compile and program time
    /// into the real BPF maps, and after one rule changed, against parsing the same documents
    /// (host).
    Policy,
}

impl BenchName {
    /// (package, bench target, needs the VM)
    fn target(self) -> (&'static str, &'static str, bool) {
        match self {
            Self::Xfrm => ("nodeseal-xfrm", "program", true),
            Self::Keymgr => ("nodeseal-keymgr", "handshake", false),
            Self::Bpf => ("nodeseal-bpf", "datapath", false),
            Self::Agent => ("nodeseal-netns", "agent", true),
            Self::Store => ("nodeseal-store", "kube", false),
            Self::Policy => ("nodeseal-agent", "policy", false),
        }
    }
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    deps::ensure_all()?;
    let (package, bench, needs_vm) = args.name.target();
    // Benchmarks that start the agent find its binaries next to their own.
    run::checked(Command::new("cargo").args(["build", "--release", "--bins"]))?;
    let exe = build(package, bench)?;
    let mut command = vec![exe.to_string_lossy().into_owned(), "--bench".to_owned()];
    command.extend(args.bench_args.iter().cloned());
    let mut ok = true;
    if needs_vm {
        for kernel in vm::prepare_matrix(&args.kernels)? {
            let (ran, _) = vm::run_command(&kernel, &command, &args.vm)?;
            ok &= ran;
        }
    } else {
        let (ran, _) = run::streamed(
            Command::new(&command[0]).args(&command[1..]),
            Duration::from_secs(args.vm.timeout_secs),
        )?;
        ok &= ran;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn build(package: &str, bench: &str) -> Result<PathBuf> {
    let out = run::output(Command::new("cargo").args([
        "bench",
        "-p",
        package,
        "--bench",
        bench,
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == bench
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo built no executable for bench {bench} of {package}")
}
