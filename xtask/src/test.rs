//! `cargo xtask test`: set-up, host unit tests, then the network-namespace suite (package
//! `nodeseal-netns`) either directly on the host, when its kernel has everything, or once per
//! kernel of the matrix inside the test VM (one boot per kernel runs every scenario).

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;

use crate::kernel::{DEFAULT_MATRIX, MATRIX_ENV};
use crate::run::{self, Tally};
use crate::{deps, vm};

#[derive(Args)]
pub struct TestArgs {
    /// Kernel series for the network-namespace suite, comma-separated (6.1, 6.12), or `host`.
    #[arg(long, env = MATRIX_ENV, default_value = DEFAULT_MATRIX)]
    kernels: String,
    /// Skip installing packages and toolchains.
    #[arg(long)]
    skip_setup: bool,
    /// Skip the host unit tests (only the network-namespace suite).
    #[arg(long)]
    netns_only: bool,
    #[command(flatten)]
    vm: vm::VmOptions,
    /// Passed to every test binary (a name filter, `--nocapture`, ...).
    #[arg(last = true)]
    test_args: Vec<String>,
}

/// Set for every test run: a test that cannot find the privileges or kernel features it needs
/// fails instead of skipping.
const REQUIRE_PRIVILEGED: (&str, &str) = ("NODESEAL_REQUIRE_PRIVILEGED", "1");
const HOST_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// Every netns scenario that boots a kube-apiserver has this in its name.
const KUBERNETES_SCENARIOS: &str = "on_kubernetes";
/// Directory-store scenarios whose Kubernetes-mode twin runs on the last kernel of the matrix
/// (`acceptance_scenarios_hold_on_kubernetes` in either datapath,
/// `a_rogue_with_a_nodes_name_..._on_kubernetes`,
/// `star_wars_rule1_holds_for_pods_on_kubernetes`): the twin drives the same datapath on that
/// kernel, so these run on the other kernels only. Each datapath scenario still runs on every
/// kernel, and each store carries it on one. (`--skip` matches substrings: no twin's name
/// contains one of these.)
const SCENARIOS_WITH_A_KUBERNETES_TWIN: &[&str] = &[
    "keys_rotate_under_traffic_loses_nothing",
    "sigkill_and_restart_under_traffic_loses_nothing",
    "revoked_node_loses_its_sas_everywhere",
    "strict_mode_drops_instead_of_sending_in_clear",
    "rogue_node_with_foreign_ca_never_gets_keys",
    "star_wars_rule1_lets_only_the_empire_land_on_the_deathstar",
    "acceptance_scenarios_hold_in_wireguard_mode",
];
/// Scenarios of the control plane (a store backend, a node's address change, handshakes over a
/// slow underlay): the datapath they drive is the one the other scenarios test on every kernel,
/// so they run on the first kernel of the matrix only (the oldest), as the Kubernetes ones run on
/// the last.
const CONTROL_PLANE_SCENARIOS: &[&str] = &[
    "etcd_backend_carries_the_fabric",
    "a_node_that_moves_stays_one_peer_and_its_address_cannot_be_claimed",
    "a_slow_underlay_makes_the_fabric_slower_not_broken",
];
/// `cargo` arguments of the host unit tests: every package but the netns suite and the eBPF
/// programs (which only build for the BPF target).
const HOST_TESTS: &[&str] = &[
    "test",
    "--workspace",
    "--exclude",
    "nodeseal-netns",
    "--exclude",
    "nodeseal-bpf-programs",
];
/// Test binaries slower than this are listed under the summary.
const SLOW_SUITE_SECS: f64 = 60.0;

struct Phase {
    name: String,
    ok: bool,
    tally: Tally,
    elapsed: Duration,
}

pub fn run(args: TestArgs) -> Result<ExitCode> {
    let started = Instant::now();
    if !args.skip_setup {
        deps::ensure_all()?;
    }
    let mut phases = Vec::new();
    let (cited, missing) = crate::threat_model::check(&crate::workspace_root())?;
    for name in &missing {
        eprintln!("xtask: threat-model/README.md cites test {name}, which no longer exists");
    }
    phases.push(Phase {
        name: "threat model cites existing tests".into(),
        ok: true,
        tally: Tally::counted(cited.len() - missing.len(), missing.len()),
        elapsed: Duration::ZERO,
    });
    if !args.netns_only {
        let t = Instant::now();
        let mut cmd = Command::new("cargo");
        cmd.args(HOST_TESTS)
            .env(REQUIRE_PRIVILEGED.0, REQUIRE_PRIVILEGED.1);
        if !args.test_args.is_empty() {
            cmd.arg("--").args(&args.test_args);
        }
        let (ok, tally) = run::streamed(&mut cmd, HOST_TIMEOUT)?;
        phases.push(Phase {
            name: "host unit tests".into(),
            ok,
            tally,
            elapsed: t.elapsed(),
        });
    }

    // The binaries the scenarios start (the agent, ...) are found next to the test executables.
    // `cargo test` builds them for the agent's own integration tests; built with the host tests'
    // selection of packages they keep its features, where `cargo build --bins` would compile
    // tokio, rustls, kube... a second time without the dev-dependencies' features.
    run::checked(Command::new("cargo").args(HOST_TESTS).arg("--no-run"))?;
    let binaries = netns_test_binaries()?;

    if args.kernels.trim() == "host" || host_has_kernel_features() {
        let script = suite_script(&binaries, &args.test_args);
        eprintln!("xtask: the host kernel has ESP, WireGuard, veth and tc BPF: running directly");
        let t = Instant::now();
        let (ok, tally) = run::streamed(
            Command::new("sh")
                .args(["-c", &script])
                .env(REQUIRE_PRIVILEGED.0, REQUIRE_PRIVILEGED.1),
            HOST_TIMEOUT,
        )?;
        phases.push(Phase {
            name: "netns on host kernel".into(),
            ok,
            tally,
            elapsed: t.elapsed(),
        });
    } else {
        let kernels = vm::prepare_matrix(&args.kernels)?;
        if kernels.is_empty() {
            bail!("{MATRIX_ENV} names no kernel");
        }
        for (i, kernel) in kernels.iter().enumerate() {
            let t = Instant::now();
            // The scenarios that boot a kube-apiserver run on the last kernel only (under TCG
            // they would be a third of each kernel's run), their directory-store twins and the
            // control plane's own scenarios on the others; each datapath scenario runs on all.
            let (first, last) = (i == 0, i + 1 == kernels.len());
            let mut skipped = Vec::new();
            if !last {
                skipped.push(KUBERNETES_SCENARIOS);
            }
            if !first {
                skipped.extend(CONTROL_PLANE_SCENARIOS);
            }
            if last && !first {
                skipped.extend(SCENARIOS_WITH_A_KUBERNETES_TWIN);
            }
            let mut test_args = args.test_args.clone();
            for name in skipped {
                test_args.extend(["--skip".to_owned(), name.to_owned()]);
            }
            let script = suite_script(&binaries, &test_args);
            let command = vec![
                "env".to_owned(),
                format!("{}={}", REQUIRE_PRIVILEGED.0, REQUIRE_PRIVILEGED.1),
                format!("NODESEAL_KERNEL_SERIES={}", kernel.series),
                "sh".to_owned(),
                "-c".to_owned(),
                script.clone(),
            ];
            let (ok, tally) = vm::run_command(kernel, &command, &args.vm)?;
            phases.push(Phase {
                name: format!("netns on Linux {}", kernel.release),
                ok,
                tally,
                elapsed: t.elapsed(),
            });
        }
    }

    let mut total = Tally::default();
    let mut all_ok = true;
    println!();
    println!("nodeseal test summary ({:.0?} in all):", started.elapsed());
    for phase in &phases {
        // A phase that ran no test binary at all is a broken run, not a pass.
        let ok = phase.ok && phase.tally.failed == 0 && phase.tally.suites > 0;
        all_ok &= ok;
        total.merge(&phase.tally);
        println!(
            "  {:<40} {:>4} passed, {:>3} failed, {:>3} ignored  {:>7.1?}  {}",
            phase.name,
            phase.tally.passed,
            phase.tally.failed,
            phase.tally.ignored,
            phase.elapsed,
            if ok { "ok" } else { "FAILED" }
        );
        for (binary, secs) in phase.tally.slowest(SLOW_SUITE_SECS) {
            println!("      {binary:<36} {secs:>7.1}s");
        }
    }
    println!(
        "test result: {}. {} passed; {} failed; {} ignored",
        if all_ok { "ok" } else { "FAILED" },
        total.passed,
        total.failed,
        total.ignored
    );
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Builds the netns suite and returns its test executables.
fn netns_test_binaries() -> Result<Vec<PathBuf>> {
    let out = run::output(Command::new("cargo").args([
        "test",
        "-p",
        "nodeseal-netns",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    let mut binaries = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && let Some(exe) = msg["executable"].as_str()
        {
            binaries.push(PathBuf::from(exe));
        }
    }
    if binaries.is_empty() {
        bail!("the nodeseal-netns package produced no test executable");
    }
    binaries.sort();
    Ok(binaries)
}

/// One shell script running every test binary in turn; fails if any fails.
fn suite_script(binaries: &[PathBuf], test_args: &[String]) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let extra: Vec<String> = test_args.iter().map(|a| quote(a)).collect();
    let mut script = String::from("rc=0\n");
    for bin in binaries {
        script.push_str(&format!(
            "echo \"     Running {name}\"\n{bin} --color=never {extra} || rc=1\n",
            name = bin
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            bin = quote(&bin.to_string_lossy()),
            extra = extra.join(" ")
        ));
    }
    script.push_str("exit $rc\n");
    script
}

/// Whether this kernel can run the netns suite directly (veth, an rfc4106 ESP state, a
/// WireGuard link and a clsact qdisc, probed in a scratch namespace).
pub fn host_has_kernel_features() -> bool {
    use nodeseal_netns::Feature;
    nodeseal_netns::kernel_supports(&[
        Feature::Netns,
        Feature::Esp,
        Feature::WireGuard,
        Feature::TcBpf,
    ])
}
