//! The network-namespace test harness: clusters of "nodes" and "pods" as network namespaces on a
//! real kernel, processes inside them, a classifying capture of the underlay wire, and traffic
//! generators. Scenarios live in `tests/`; `cargo xtask test` runs them on the host when its
//! kernel has ESP, WireGuard, veth and tc BPF, otherwise inside a VM per test kernel.
//!
//! Every wait is bounded, every namespace and process is removed on drop (also when a test
//! panics), and a panicking test prints a report of what the namespaces and the wire looked like.

pub mod capture;
pub mod fabric;
pub mod forge;
#[cfg(feature = "kube")]
pub mod kube;
pub mod net;
mod netns;
pub mod patience;
mod process;
pub mod topology;
pub mod traffic;

use std::sync::OnceLock;
use std::time::Duration;

pub use capture::{CaptureSummary, PacketClass, WireCapture};
pub use fabric::{AddressPlan, Encryption, Fabric, FabricOptions, StoreKind};
pub use net::Cidr;
pub use netns::Netns;
pub use process::Process;
pub use topology::{Node, Pod, Topology};
pub use traffic::{
    PingResult, StreamReport, TcpService, Transfer, UdpStream, ping, tcp_banner, tcp_transfer,
};

/// With this set to `1` (CI and VM runs), a missing privilege or kernel feature fails a test
/// instead of skipping it.
pub const REQUIRE_ENV: &str = "NODESEAL_REQUIRE_PRIVILEGED";

/// Kernel features a scenario may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// Namespaces, veth pairs and bridges.
    Netns,
    /// XFRM with `rfc4106(gcm(aes))` ESP states.
    Esp,
    /// WireGuard links.
    WireGuard,
    /// A clsact qdisc for tc BPF programs.
    TcBpf,
}

#[derive(Debug)]
struct Probe {
    root: bool,
    netns: bool,
    esp: bool,
    wireguard: bool,
    tc_bpf: bool,
}

fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(|| {
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        let root = unsafe { libc::geteuid() } == 0;
        let ns = root.then(|| Netns::new("probe").ok()).flatten();
        let Some(ns) = ns else {
            return Probe {
                root,
                netns: false,
                esp: false,
                wireguard: false,
                tc_bpf: false,
            };
        };
        let netns = ns
            .ip(&["link", "add", "pv0", "type", "veth", "peer", "name", "pv1"])
            .is_ok()
            && ns.ip(&["link", "set", "pv0", "up"]).is_ok();
        let esp = ns
            .ip(&[
                "xfrm",
                "state",
                "add",
                "src",
                "192.0.2.1",
                "dst",
                "192.0.2.2",
                "proto",
                "esp",
                "spi",
                "0x1000",
                "mode",
                "tunnel",
                "aead",
                "rfc4106(gcm(aes))",
                "0x0102030405060708090a0b0c0d0e0f1011121314",
                "128",
            ])
            .is_ok();
        let wireguard = ns.ip(&["link", "add", "wg0", "type", "wireguard"]).is_ok();
        let tc_bpf = netns
            && std::process::Command::new("tc")
                .args(["-n", ns.name(), "qdisc", "add", "dev", "pv0", "clsact"])
                .output()
                .is_ok_and(|o| o.status.success());
        Probe {
            root,
            netns,
            esp,
            wireguard,
            tc_bpf,
        }
    })
}

/// Whether this machine (root, this kernel) has every one of `features`; probed once per
/// process in a scratch namespace.
pub fn kernel_supports(features: &[Feature]) -> bool {
    missing(features).is_empty()
}

/// What of root and `features` this machine lacks.
fn missing(features: &[Feature]) -> Vec<String> {
    let p = probe();
    std::iter::once((!p.root).then(|| "root".to_owned()))
        .chain(features.iter().map(|f| {
            let ok = match f {
                Feature::Netns => p.netns,
                Feature::Esp => p.esp,
                Feature::WireGuard => p.wireguard,
                Feature::TcBpf => p.tc_bpf,
            };
            (!ok).then(|| format!("{f:?}"))
        }))
        .flatten()
        .collect()
}

/// Whether this machine can run a scenario needing `features`. When it cannot, prints why and
/// returns `false` (the test should return early), or panics if [`REQUIRE_ENV`] is `1`.
pub fn require(test: &str, features: &[Feature]) -> bool {
    let missing = missing(features);
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test}: needs {} (not available here)", missing.join(", "));
    assert!(
        std::env::var(REQUIRE_ENV).as_deref() != Ok("1"),
        "{why}, and {REQUIRE_ENV}=1"
    );
    eprintln!("SKIPPED {why}");
    false
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes, counted in the reference
/// machine's time (see [`patience`]: up to 4x the wall time on a slower machine); returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let mut patience = patience::Patience::new(timeout);
    loop {
        if condition() {
            return true;
        }
        if patience.exhausted() {
            let (waited, slowdown) = patience.waited();
            eprintln!(
                "wait_until: gave up after {waited:.1?} of wall time for a bound of {timeout:?} \
                 (the machine ran {slowdown:.1}x slower than the reference when last measured)"
            );
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
