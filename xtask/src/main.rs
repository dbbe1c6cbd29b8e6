//! `cargo xtask`: the project's set-up, test, demo, bench and VM entry points.
//!
//! Everything a fresh Debian 12 machine needs is installed here (see [`deps`]), so the README's
//! two commands work from a clean clone.

mod bench;
mod demo;
mod deps;
mod kernel;
mod run;
mod test;
mod threat_model;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nodeseal development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing, build, run the unit tests on the host and the network-namespace
    /// tests on every kernel of the matrix.
    Test(test::TestArgs),
    /// Run a command as root inside the test VM, with the host's filesystem visible read-only.
    Vm(vm::VmArgs),
    /// Run a benchmark (figures as ratios against a baseline measured in the same run).
    Bench(bench::BenchArgs),
    /// Run the demo: a 3-node encrypted fabric in network namespaces.
    Demo(demo::DemoArgs),
    /// Install the Debian packages and toolchains the project needs, then exit.
    Setup,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<ExitCode> = match cli.command {
        Command::Test(args) => test::run(args),
        Command::Vm(args) => vm::run_cli(args),
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Setup => deps::ensure_all().map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The cargo target directory, honouring `CARGO_TARGET_DIR`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
