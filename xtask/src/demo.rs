//! `cargo xtask demo`: builds everything and runs the demo fabric (`nodeseal-demo`, in
//! `tests/netns`) on the host when its kernel has ESP, WireGuard, veth and tc BPF, otherwise in
//! the test VM.

use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::{deps, run, test, vm};

#[derive(Args)]
pub struct DemoArgs {
    /// Kernel series to boot when the host kernel cannot run the demo.
    #[arg(long, default_value = "6.12")]
    kernel: String,
    /// Skip installing packages and toolchains.
    #[arg(long)]
    skip_setup: bool,
    /// Run the fabric in Kubernetes mode, against a real kube-apiserver on the underlay.
    #[arg(long)]
    kubernetes: bool,
    /// How the agents encrypt: IPsec (XFRM) or kernel WireGuard.
    #[arg(long, value_enum, default_value_t = EncryptionType::Ipsec)]
    encryption_type: EncryptionType,
    /// Give the pods IPv6 addresses beside their IPv4 ones (both over the IPv4 underlay).
    #[arg(long)]
    dual_stack: bool,
    #[command(flatten)]
    vm: vm::VmOptions,
}

/// The agents' `--encryption-type`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EncryptionType {
    Ipsec,
    Wireguard,
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    if !args.skip_setup {
        deps::ensure_all()?;
    }
    run::checked(Command::new("cargo").args(["build", "--bins"]))?;
    let demo = crate::target_dir().join("debug").join("nodeseal-demo");
    let mut command = vec![demo.to_string_lossy().into_owned()];
    if args.kubernetes {
        command.push("--kubernetes".into());
    }
    if args.encryption_type == EncryptionType::Wireguard {
        command.extend(["--encryption-type".into(), "wireguard".into()]);
    }
    if args.dual_stack {
        command.push("--dual-stack".into());
    }
    let ok = if test::host_has_kernel_features() {
        run::streamed(
            Command::new(&command[0]).args(&command[1..]),
            Duration::from_secs(args.vm.timeout_secs),
        )?
        .0
    } else {
        let kernel = vm::prepare_matrix(&args.kernel)?;
        let mut ok = true;
        for k in &kernel {
            ok &= vm::run_command(k, &command, &args.vm)?.0;
        }
        ok
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
