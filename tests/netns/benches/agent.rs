//! `cargo xtask bench agent`: how fast one real `nodeseal-agent` converges with many peers, what
//! it costs in memory, and how long a cluster-wide key rotation takes under traffic.
//!
//! 1. Convergence. One agent process in its own namespace, N simulated peers served by an
//!    in-process load generator in a second namespace, joined by a veth pair. The load generator
//!    is a real counterpart: it creates the cluster CA, issues the agent's and every peer's
//!    X.509-SVID, publishes the trust bundle and N node records in a directory store, and
//!    answers every handshake with the keymgr library (mutual TLS 1.3, Hello, `Installed`).
//!    Peer names sort after the agent's, so the agent initiates every handshake. Measured: time
//!    from spawning the agent until the last `Installed` exchange (and until its status API shows
//!    every peer established), its peak and final RSS and CPU time. Baseline in the same run:
//!    `ip -batch` installing the same number of XFRM objects (states and policies of the agent's
//!    layout) into a fresh namespace.
//!    With `kube` among `NODESEAL_BENCH_STORES`, the same run again in Kubernetes mode: a real
//!    kube-apiserver (and its etcd) in the load generator's namespace, a Node object and a
//!    NodesealNode per peer, the agent with `--kubernetes`; reported beside the directory store,
//!    with the apiserver's own count of the non-watch requests during the quiet period.
//!    With `wireguard` among `NODESEAL_BENCH_MODES` (issue 13), the same runs in WireGuard mode:
//!    the agent with `--encryption-type wireguard`, the simulated peers answering in WireGuard
//!    mode with a WireGuard public key of their own in their Hello. Converged there means every
//!    peer established in the status API and the agent's `nodeseal0` device (read back over
//!    netlink) holding N peers with preshared keys. Baseline in the same run: `wg setconf` of a
//!    prepared file with the same N peers (random public and preshared keys, the same
//!    endpoints and allowed IPs) onto a fresh WireGuard link in a fresh namespace.
//!    After convergence, the quiet period gives the steady state (issue 16): the agent's CPU and
//!    its read/write syscalls (`/proc/<pid>/io`; with the directory store mostly its rescans)
//!    per peer per minute.
//!    With `NODESEAL_BENCH_ROLLING_SECS` set (issue 16), then a rolling restart
//!    (`agent/rolling.rs`): every simulated peer restarts once, the restarts spread evenly over
//!    that many seconds, and re-initiates a key agreement as a restarted agent does; reported:
//!    time until all are keyed again (against the window) and each peer's wait.
//! 2. Rotation. The 3-node fabric of the acceptance tests under a 500 packets/s UDP stream;
//!    `nodeseal keys rotate --wait` several times; wall time and the duration it prints, and the
//!    stream's losses. Baseline: the wall time of a no-op `nodeseal node list`.
//!
//! 3. Revocation (`agent/revocation.rs`): time from `nodeseal node revoke` to the last peer's
//!    SAs with the node gone and to the first dropped packet each way; baseline: `keys rotate
//!    --wait` on the same fabric.
//! 4. Handshake flood (`agent/flood.rs`): what connections in a loop against a node's handshake
//!    port (from an unknown address, from a member sending junk, from a member running valid
//!    handshakes) cost the node, and what its legitimate rotations and traffic see; baseline:
//!    the same phase without a flood.
//!
//! Environment: `NODESEAL_BENCH_PEERS` (default `100,1000`), `NODESEAL_BENCH_STORES` (default
//! `dir,kube`; `kube` needs the binaries of `cargo xtask setup`), `NODESEAL_BENCH_MODES`
//! (convergence only, default `ipsec,wireguard`; every mode runs with every store and peer
//! count; `wireguard` needs WireGuard in the kernel), `NODESEAL_BENCH_ROTATIONS`
//! (default 5), `NODESEAL_BENCH_REVOCATIONS` (default 3), `NODESEAL_BENCH_FLOOD_SECS` (length of
//! each flood phase, default 30), `NODESEAL_BENCH_PARTS` (default
//! `convergence,rotation,revocation,flood`),
//! `NODESEAL_BENCH_TIMEOUT_SECS` (bound of one convergence run, default 900),
//! `NODESEAL_BENCH_IDLE_SECS` (quiet period observed after convergence, default 40: it covers
//! the agent's post-flip sweep at the default 30 s `--rekey-grace`),
//! `NODESEAL_BENCH_ROLLING_SECS` (window of the rolling restart after each convergence run;
//! default 0: none). Needs root, veth,
//! ESP and tc BPF: skips with a reason otherwise, unless `NODESEAL_REQUIRE_PRIVILEGED=1`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ipnet::IpNet;
use nodeseal_keymgr::handshake::{self, HandshakeConfig};
use nodeseal_keymgr::{
    ClusterCa, Epoch, ExpectedPeer, Hello, IssueOptions, Mode, NodeClaims, NodeIdentity, NodeKey,
    NodeName, Spi, TrustBundle, TrustDomain, TrustStore, WgPublicKey, create_csr, validate_csr,
};
use nodeseal_netns::kube::KubeControlPlane;
use nodeseal_netns::{
    Fabric, FabricOptions, Feature, Netns, Process, Topology, UdpStream, fabric, require,
};
use nodeseal_store::{DirOptions, DirStore, KubeStore, NodeRecord, Store};
use nodeseal_wireguard::LinkName;

const TRUST_DOMAIN: &str = "cluster.local";
const AGENT_NAME: &str = "a-bench";
const AGENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const LOADGEN_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const AGENT_POD_CIDR: &str = "10.244.0.0/24";
/// Every simulated peer's node IP lies in here (a local route in the load generator).
const PEER_NET: &str = "10.1.0.0/16";
const HANDSHAKE_PORT: u16 = 4250;
const UPLINK: &str = "up0";
/// Bound of one simulated peer's side of a handshake.
const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Targets from issue 6 (reported against, not asserted).
const TARGET_CONVERGE_1000: Duration = Duration::from_secs(5);
const TARGET_RSS_KB: u64 = 40 * 1024;
const TARGET_ROTATE: Duration = Duration::from_secs(2);

#[path = "agent/flood.rs"]
mod flood;
#[path = "agent/floor.rs"]
mod floor;
#[path = "agent/revocation.rs"]
mod revocation;
#[path = "agent/rolling.rs"]
mod rolling;

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    if let Some(arg) = std::env::args().skip(1).find(|a| a != "--bench") {
        eprintln!("agent bench: unexpected argument {arg:?} (settings come from NODESEAL_BENCH_*)");
        return ExitCode::FAILURE;
    }
    if !require(
        "bench agent",
        &[Feature::Netns, Feature::Esp, Feature::TcBpf],
    ) {
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let parts = std::env::var("NODESEAL_BENCH_PARTS")
        .unwrap_or_else(|_| "convergence,rotation,revocation,flood".to_owned());
    let peers = parse_list(
        &std::env::var("NODESEAL_BENCH_PEERS").unwrap_or_else(|_| "100,1000".to_owned()),
    )?;
    let stores = backends(
        &std::env::var("NODESEAL_BENCH_STORES").unwrap_or_else(|_| "dir,kube".to_owned()),
    )?;
    let modes = modes(
        &std::env::var("NODESEAL_BENCH_MODES").unwrap_or_else(|_| "ipsec,wireguard".to_owned()),
    )?;
    let rotations: usize = env_number("NODESEAL_BENCH_ROTATIONS", 5)?;
    let revocations: usize = env_number("NODESEAL_BENCH_REVOCATIONS", 3)?;
    let flood_secs: u64 = env_number("NODESEAL_BENCH_FLOOD_SECS", 30)?;
    let timeout = Duration::from_secs(env_number("NODESEAL_BENCH_TIMEOUT_SECS", 900)?);
    let idle = Duration::from_secs(env_number("NODESEAL_BENCH_IDLE_SECS", 40)?);
    let rolling_secs: u64 = env_number("NODESEAL_BENCH_ROLLING_SECS", 0)?;
    let rolling_window = (rolling_secs > 0).then(|| Duration::from_secs(rolling_secs));
    let agent_bin = fabric::binary("nodeseal-agent");
    let cli_bin = fabric::binary("nodeseal");
    for bin in [&agent_bin, &cli_bin] {
        ensure!(
            bin.is_file(),
            "{} not found: build the binaries first (cargo build --release -p nodeseal-agent --bins \
             with the same CARGO_TARGET_DIR)",
            bin.display()
        );
    }
    println!("nodeseal agent benchmark");
    println!("{}", machine_note());
    println!();

    let mut convergence = Vec::new();
    if parts.contains("convergence") {
        for &n in &peers {
            for &mode in &modes {
                for &backend in &stores {
                    println!(
                        "convergence: 1 agent, {n} peers, {} mode, {} store ...",
                        mode_name(mode),
                        backend.name()
                    );
                    let result = converge(n, timeout, idle, rolling_window, mode, backend)
                        .with_context(|| {
                            format!(
                                "convergence with {n} peers in {} mode on the {} store",
                                mode_name(mode),
                                backend.name()
                            )
                        })?;
                    print!("{}", result.detail());
                    convergence.push(result);
                }
            }
        }
    }
    let rotation = if parts.contains("rotation") {
        println!(
            "rotation: 3-node fabric, {rotations} x keys rotate --wait under a 500 pps stream ..."
        );
        Some(rotate(rotations).context("rotation")?)
    } else {
        None
    };
    let revocation = if parts.contains("revocation") {
        println!("revocation: 4-node fabric, {revocations} x node revoke under streams ...");
        Some(revocation::run(revocations).context("revocation")?)
    } else {
        None
    };
    let flood = if parts.contains("flood") {
        println!("flood: 4-node fabric, handshake floods against node0 ...");
        Some(flood::run(Duration::from_secs(flood_secs)).context("flood")?)
    } else {
        None
    };

    println!();
    println!("================ nodeseal agent benchmark ================");
    println!("{}", machine_note());
    if convergence.iter().any(|r| r.mode == Mode::Ipsec) {
        println!();
        println!("{}", convergence_table(&convergence));
    }
    if convergence.iter().any(|r| r.mode == Mode::Wireguard) {
        println!();
        println!("{}", wireguard_table(&convergence));
    }
    if convergence.iter().any(|r| r.rolling.is_some()) {
        println!();
        println!("{}", rolling_table(&convergence));
    }
    if let Some(r) = &rotation {
        println!();
        println!("{}", r.table());
    }
    if let Some(r) = &revocation {
        println!();
        println!("{}", r.table());
    }
    if let Some(f) = &flood {
        println!();
        println!("{}", f.table()?);
    }
    Ok(())
}

/// Where the peers' records live.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Dir,
    Kube,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Dir => "directory",
            Self::Kube => "kubernetes",
        }
    }
}

/// `NODESEAL_BENCH_STORES`; `kube` is left out (with a note) when its binaries are missing.
fn backends(text: &str) -> Result<Vec<Backend>> {
    let mut out = Vec::new();
    for word in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match word {
            "dir" => out.push(Backend::Dir),
            "kube" if nodeseal_kube_fixture::binaries_or_skip("bench agent (kubernetes store)") => {
                out.push(Backend::Kube);
            }
            "kube" => {}
            other => bail!("NODESEAL_BENCH_STORES: unknown store {other:?} (dir, kube)"),
        }
    }
    Ok(out)
}

/// `NODESEAL_BENCH_MODES`; `wireguard` is left out (with a note) when the kernel lacks it.
fn modes(text: &str) -> Result<Vec<Mode>> {
    let mut out = Vec::new();
    for word in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match word {
            "ipsec" => out.push(Mode::Ipsec),
            "wireguard" if require("bench agent (wireguard mode)", &[Feature::WireGuard]) => {
                out.push(Mode::Wireguard);
            }
            "wireguard" => {}
            other => bail!("NODESEAL_BENCH_MODES: unknown mode {other:?} (ipsec, wireguard)"),
        }
    }
    Ok(out)
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Ipsec => "ipsec",
        Mode::Wireguard => "wireguard",
    }
}

fn parse_list(text: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let n: usize = s
                .parse()
                .with_context(|| format!("NODESEAL_BENCH_PEERS: {s:?} is not a number"))?;
            ensure!(
                (1..=20_000).contains(&n),
                "NODESEAL_BENCH_PEERS: {n} is outside 1..=20000"
            );
            Ok(n)
        })
        .collect()
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}: {text:?} is not a number")),
    }
}

/// Kernel, CPUs and whether we run emulated: figures from a TCG guest are not native ones.
fn machine_note() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virtualised = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let clocks = std::fs::read_to_string(
        "/sys/devices/system/clocksource/clocksource0/available_clocksource",
    )
    .unwrap_or_default();
    let machine = if !virtualised {
        "bare metal or a guest that hides it".to_owned()
    } else if clocks.contains("kvm-clock") {
        "KVM guest".to_owned()
    } else {
        "qemu guest WITHOUT KVM (TCG emulation): expect figures 10-20x slower than native; \
         compare the ratios to the same-run baselines, not the absolute times, with the targets"
            .to_owned()
    };
    format!("machine: Linux {}, {cpus} CPU(s), {machine}", kernel.trim())
}

// ---------------------------------------------------------------------------------------------
// Convergence
// ---------------------------------------------------------------------------------------------

/// One simulated peer.
struct PeerCreds {
    index: usize,
    name: NodeName,
    ip: Ipv4Addr,
    pod_cidr: IpNet,
    config: HandshakeConfig,
    /// The WireGuard key announced in WireGuard mode, whose possession the peer proves.
    wg_key: nodeseal_wireguard::PrivateKey,
    /// Handshakes answered so far (makes each answer's SPI unique).
    attempts: std::sync::atomic::AtomicU32,
    /// The epoch of the last key agreement with the agent.
    epoch: std::sync::atomic::AtomicU64,
}

/// Peer `i`'s node IP: `10.1.(1 + i / 200).(1 + i % 200)`.
fn peer_ip(i: usize) -> Result<Ipv4Addr> {
    let hi = u8::try_from(1 + i / 200).context("too many peers for the address plan")?;
    let lo = u8::try_from(1 + i % 200).context("peer address")?;
    Ok(Ipv4Addr::new(10, 1, hi, lo))
}

/// Peer `i`'s pod CIDR: `10.(64 + i / 256).(i % 256).0/24`, clear of the agent's 10.244.0.0/24.
fn peer_pod_cidr(i: usize) -> Result<IpNet> {
    let b = u8::try_from(64 + i / 256).context("too many peers for the pod CIDR plan")?;
    let c = u8::try_from(i % 256).context("pod CIDR")?;
    Ok(format!("10.{b}.{c}.0/24").parse()?)
}

/// What the load generator saw.
#[derive(Default)]
struct LoadStats {
    /// Per peer: when its first key agreement completed (the `Installed` exchange).
    done: Mutex<Vec<Option<Instant>>>,
    completed: AtomicUsize,
    handshakes: AtomicUsize,
    failures: Mutex<BTreeMap<String, u64>>,
}

impl LoadStats {
    fn new(n: usize) -> Self {
        Self {
            done: Mutex::new(vec![None; n]),
            ..Self::default()
        }
    }

    fn success(&self, index: usize) {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut done) = self.done.lock()
            && let Some(slot) = done.get_mut(index)
            && slot.is_none()
        {
            *slot = Some(Instant::now());
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn failure(&self, error: String) {
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(error).or_default() += 1;
        }
    }
}

/// What the agent programmed into the kernel, read back after convergence.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Programmed {
    /// IPsec mode: XFRM states and policies.
    Xfrm { states: u64, policies: u64 },
    /// WireGuard mode: peers of the device, and how many of them carry a preshared key.
    Wireguard { peers: u64, with_psk: u64 },
}

/// Figures of one convergence run.
struct Convergence {
    peers: usize,
    mode: Mode,
    backend: Backend,
    /// Kubernetes only: non-watch apiserver requests on nodes, nodesealnodes and configmaps
    /// during the quiet period.
    quiet_requests: Option<f64>,
    setup: Duration,
    /// Agent spawn until the first / 50 % / 100 % of the peers completed their first key
    /// agreement (the first one includes the agent's start-up: store, eBPF load, identity).
    first: Duration,
    half: Duration,
    all: Duration,
    /// Agent spawn until `nodeseal status` showed every peer established.
    status_all: Duration,
    /// WireGuard mode: agent spawn until, status showing every peer established, the device
    /// also held every peer with a preshared key (converged).
    device_all: Option<Duration>,
    kernel: Programmed,
    peak_rss_kb: u64,
    rss_kb: u64,
    agent_cpu: Duration,
    loadgen_cpu: Duration,
    handshakes: usize,
    failures: BTreeMap<String, u64>,
    /// `ip -batch` (IPsec) or `wg setconf` (WireGuard) of the same kernel objects, and how many.
    baseline: Duration,
    baseline_objects: u64,
    /// The quiet period observed after convergence, the agent's CPU time and RSS in it.
    idle: Duration,
    idle_cpu: Duration,
    idle_rss_kb: u64,
    idle_peak_rss_kb: u64,
    /// Where the memory was: at the highest RSS the polling saw, once every peer completed,
    /// and at the end of the quiet period.
    memory_at_peak: Option<MemoryProfile>,
    memory_converged: Option<MemoryProfile>,
    memory_idle: Option<MemoryProfile>,
    /// The agent's read/write syscalls in the quiet period (directory store: its rescans and
    /// status writes; plus netlink/BPF reads of the housekeeping tick).
    idle_io: Option<ProcIo>,
    rolling: Option<Rolling>,
    /// The crypto floor of one key agreement, one side, timed in this run.
    floor: floor::Floor,
}

impl Convergence {
    /// Agent CPU per peer until all keyed, over the crypto floor of one key agreement.
    fn floor_ratio(&self) -> f64 {
        self.agent_cpu.as_secs_f64()
            / self.peers.max(1) as f64
            / self.floor.per_agreement().as_secs_f64().max(1e-9)
    }

    fn detail(&self) -> String {
        let mut s = format!(
            "  set-up (CA, {} SVIDs, store) {:.2}s; agent: first peer after {:.3}s, 50% after \
             {:.3}s, all after {:.3}s, status shows all established after {:.3}s\n",
            self.peers + 1,
            self.setup.as_secs_f64(),
            self.first.as_secs_f64(),
            self.half.as_secs_f64(),
            self.all.as_secs_f64(),
            self.status_all.as_secs_f64()
        );
        let _ = match self.kernel {
            Programmed::Xfrm { states, policies } => writeln!(
                s,
                "  kernel: {states} states, {policies} policies; ip -batch of {} objects: {:.3}s",
                self.baseline_objects,
                self.baseline.as_secs_f64()
            ),
            Programmed::Wireguard { peers, with_psk } => writeln!(
                s,
                "  kernel: device {} holds {peers} peers, {with_psk} with a preshared key (status \
                 and device complete after {:.3}s); wg setconf of {} peers: {:.3}s",
                LinkName::default(),
                self.device_all.unwrap_or_default().as_secs_f64(),
                self.baseline_objects,
                self.baseline.as_secs_f64()
            ),
        };
        let _ = writeln!(
            s,
            "  agent RSS peak {} KiB, after convergence {} KiB; CPU agent {:.2}s, load generator {:.2}s; \
             {} handshakes completed",
            self.peak_rss_kb,
            self.rss_kb,
            self.agent_cpu.as_secs_f64(),
            self.loadgen_cpu.as_secs_f64(),
            self.handshakes
        );
        let _ = writeln!(
            s,
            "  in the {:.0}s after convergence (nothing changing): agent CPU {:.2}s, RSS {} KiB, \
             peak RSS {} KiB",
            self.idle.as_secs_f64(),
            self.idle_cpu.as_secs_f64(),
            self.idle_rss_kb,
            self.idle_peak_rss_kb
        );
        let _ = writeln!(
            s,
            "  {}; agent CPU per peer until all {:.0} µs = {:.2}x the floor",
            self.floor.line(),
            self.agent_cpu.as_secs_f64() * 1e6 / self.peers.max(1) as f64,
            self.floor_ratio()
        );
        let minutes = (self.idle.as_secs_f64() / 60.0).max(1e-6);
        let per_peer_minute = |x: f64| x / self.peers.max(1) as f64 / minutes;
        let _ = writeln!(
            s,
            "  steady state: agent CPU {:.3} ms per peer per minute ({:.3}s per minute)",
            per_peer_minute(self.idle_cpu.as_secs_f64() * 1000.0),
            self.idle_cpu.as_secs_f64() / minutes
        );
        if let Some(io) = self.idle_io {
            let _ = writeln!(
                s,
                "  steady state I/O (/proc/pid/io, quiet period): {} read calls / {} bytes, {} write \
                 calls / {} bytes; per peer per minute {:.1} read calls / {:.0} bytes, {:.2} write \
                 calls / {:.1} bytes",
                io.syscr,
                io.rchar,
                io.syscw,
                io.wchar,
                per_peer_minute(io.syscr as f64),
                per_peer_minute(io.rchar as f64),
                per_peer_minute(io.syscw as f64),
                per_peer_minute(io.wchar as f64)
            );
        }
        if let Some(r) = &self.rolling {
            let _ = writeln!(s, "  {}", r.line(self.peers));
        }
        for (when, profile) in [
            ("at the highest RSS seen", &self.memory_at_peak),
            ("once all completed", &self.memory_converged),
            ("after the quiet period", &self.memory_idle),
        ] {
            if let Some(p) = profile {
                let _ = writeln!(s, "  memory {when}: {}", p.line());
            }
        }
        if let Some(requests) = self.quiet_requests {
            let _ = writeln!(
                s,
                "  apiserver: {requests} non-watch requests on nodes/nodesealnodes/configmaps in \
                 the quiet period ({:.4} per node per minute)",
                requests / (self.peers as f64 + 1.0) / (self.idle.as_secs_f64() / 60.0).max(1e-6)
            );
        }
        if !self.failures.is_empty() {
            let _ = writeln!(s, "  load generator saw failed handshakes:");
            for (e, n) in &self.failures {
                let _ = writeln!(s, "    {n} x {e}");
            }
        }
        s
    }
}

fn convergence_table(rows: &[Convergence]) -> String {
    let mut s = String::from(
        "Convergence, IPsec mode: one nodeseal-agent vs N peers (in-process load generator)\n",
    );
    let _ = writeln!(
        s,
        "{:>6} | {:>10} | {:>9} | {:>9} | {:>9} | {:>10} | {:>9} | {:>8} | {:>8} | {:>9} | {:>9} | {:>8} | {:>10} | {:>9} | {:>9}",
        "peers",
        "store",
        "first (s)",
        "all (s)",
        "status(s)",
        "agent CPU",
        "CPU/floor",
        "states",
        "policies",
        "ip -batch",
        "agent/ip",
        "fails",
        "peak RSS",
        "RSS end",
        "idle CPU"
    );
    for r in rows {
        let Programmed::Xfrm { states, policies } = r.kernel else {
            continue;
        };
        let ratio = r.all.as_secs_f64() / r.baseline.as_secs_f64().max(1e-6);
        let failures: u64 = r.failures.values().sum();
        let _ = writeln!(
            s,
            "{:>6} | {:>10} | {:>9.3} | {:>9.3} | {:>9.3} | {:>9.2}s | {:>8.2}x | {:>8} | {:>8} | {:>8.3}s | {:>8.1}x | {:>8} | {:>6} MiB | {:>5} MiB | {:>8.2}s",
            r.peers,
            r.backend.name(),
            r.first.as_secs_f64(),
            r.all.as_secs_f64(),
            r.status_all.as_secs_f64(),
            r.agent_cpu.as_secs_f64(),
            r.floor_ratio(),
            states,
            policies,
            r.baseline.as_secs_f64(),
            ratio,
            failures,
            r.peak_rss_kb.max(r.idle_peak_rss_kb) / 1024,
            r.rss_kb / 1024,
            r.idle_cpu.as_secs_f64()
        );
    }
    let _ = writeln!(
        s,
        "first / all = agent spawn -> first / last peer's Installed exchange done (first includes \
         the agent's start-up); status = until `nodeseal status` \
         shows every peer established;\nagent CPU = user + system until all; CPU/floor = agent \
         CPU per peer over the crypto floor of one key agreement's side (sign, verify, SVID \
         checks, X25519) timed in this run (issue 16 target <= 1.5x);\n\
         peak RSS = VmHWM (also over the idle period); idle CPU = agent CPU in the quiet period after \
         convergence (covers the stale-SA sweep at rekey-grace 30 s);\nip -batch = the same number of XFRM states and policies \
         (agent's layout) installed by one `ip -batch` into a fresh namespace."
    );
    let ipsec = |r: &&Convergence| r.mode == Mode::Ipsec;
    kube_vs_dir(&mut s, rows.iter().filter(ipsec));
    let _ = write!(
        s,
        "targets (issue 6, native, 2 cores): 1000 peers in < {}s, RSS < {} MiB",
        TARGET_CONVERGE_1000.as_secs(),
        TARGET_RSS_KB / 1024
    );
    for r in rows
        .iter()
        .filter(|r| r.peers == 1000 && r.backend == Backend::Dir)
        .filter(ipsec)
    {
        let _ = write!(
            s,
            "; measured here {:.2}s ({}), peak RSS {} MiB ({})",
            r.all.as_secs_f64(),
            verdict(r.all <= TARGET_CONVERGE_1000),
            r.peak_rss_kb / 1024,
            verdict(r.peak_rss_kb <= TARGET_RSS_KB)
        );
    }
    s
}

/// The WireGuard-mode rows (issue 13) against `wg setconf` of the same peers.
fn wireguard_table(rows: &[Convergence]) -> String {
    let mut s = String::from(
        "Convergence, WireGuard mode: one nodeseal-agent vs N peers (in-process load generator)\n",
    );
    let _ = writeln!(
        s,
        "{:>6} | {:>10} | {:>9} | {:>9} | {:>9} | {:>9} | {:>10} | {:>9} | {:>8} | {:>10} | {:>9} | {:>8} | {:>10} | {:>9} | {:>9}",
        "peers",
        "store",
        "first (s)",
        "all (s)",
        "status(s)",
        "conv. (s)",
        "agent CPU",
        "wg peers",
        "with PSK",
        "wg setconf",
        "agent/wg",
        "fails",
        "peak RSS",
        "RSS end",
        "idle CPU"
    );
    for r in rows {
        let Programmed::Wireguard { peers, with_psk } = r.kernel else {
            continue;
        };
        let converged = r.device_all.unwrap_or(r.status_all);
        let ratio = converged.as_secs_f64() / r.baseline.as_secs_f64().max(1e-6);
        let failures: u64 = r.failures.values().sum();
        let _ = writeln!(
            s,
            "{:>6} | {:>10} | {:>9.3} | {:>9.3} | {:>9.3} | {:>9.3} | {:>9.2}s | {:>9} | {:>8} | {:>9.3}s | {:>8.1}x | {:>8} | {:>6} MiB | {:>5} MiB | {:>8.2}s",
            r.peers,
            r.backend.name(),
            r.first.as_secs_f64(),
            r.all.as_secs_f64(),
            r.status_all.as_secs_f64(),
            converged.as_secs_f64(),
            r.agent_cpu.as_secs_f64(),
            peers,
            with_psk,
            r.baseline.as_secs_f64(),
            ratio,
            failures,
            r.peak_rss_kb.max(r.idle_peak_rss_kb) / 1024,
            r.rss_kb / 1024,
            r.idle_cpu.as_secs_f64()
        );
    }
    let _ = writeln!(
        s,
        "first / all / status as in the IPsec table; conv. = agent spawn until status shows every \
         peer established and the device holds every peer with a preshared key (converged);\n\
         wg peers / with PSK = the agent's device read back at convergence; wg setconf = one \
         `wg setconf` of a prepared file with the same number of peers (random keys and preshared \
         keys, the same endpoints and allowed IPs)\nonto a fresh WireGuard link in a fresh \
         namespace; agent/wg = conv. / wg setconf (the agent also runs a mutual-TLS handshake, \
         routes and eBPF map writes per peer)."
    );
    kube_vs_dir(&mut s, rows.iter().filter(|r| r.mode == Mode::Wireguard));
    s.truncate(s.trim_end().len());
    s
}

/// One line per peer count run on both stores: the Kubernetes store against the directory.
fn kube_vs_dir<'a>(s: &mut String, rows: impl Iterator<Item = &'a Convergence> + Clone) {
    for kube in rows.clone().filter(|r| r.backend == Backend::Kube) {
        if let Some(dir) = rows
            .clone()
            .find(|r| r.backend == Backend::Dir && r.peers == kube.peers)
        {
            let _ = writeln!(
                s,
                "kubernetes / directory, {} peers: all established {:.2}x, peak RSS {:.2}x, \
                 idle CPU {:.2}x; quiet-period apiserver requests: {}",
                kube.peers,
                kube.status_all.as_secs_f64() / dir.status_all.as_secs_f64().max(1e-6),
                kube.peak_rss_kb.max(kube.idle_peak_rss_kb) as f64
                    / dir.peak_rss_kb.max(dir.idle_peak_rss_kb).max(1) as f64,
                kube.idle_cpu.as_secs_f64() / dir.idle_cpu.as_secs_f64().max(1e-6),
                kube.quiet_requests.unwrap_or_default()
            );
        }
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// The namespaces, store and credentials of one convergence run.
struct Bench {
    dir: PathBuf,
    agent_ns: Netns,
    loadgen_ns: Arc<Netns>,
    pin_root: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn converge(
    n: usize,
    timeout: Duration,
    idle: Duration,
    rolling_window: Option<Duration>,
    mode: Mode,
    backend: Backend,
) -> Result<Convergence> {
    let setup_started = Instant::now();
    let dir = std::env::temp_dir().join(format!("nodeseal-bench-agent-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let bench = Bench {
        pin_root: PathBuf::from("/sys/fs/bpf")
            .join(format!("nodeseal-bench-{}-{n}", std::process::id())),
        agent_ns: Netns::new("bagent")?,
        loadgen_ns: Arc::new(Netns::new("bload")?),
        dir,
    };
    wire(&bench)?;

    // The PKI: a CA, the agent's SVID (given to it as files), one SVID per peer.
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let ca = ClusterCa::generate(td.clone(), Duration::from_secs(24 * 3600))?;
    let ca_dir = bench.dir.join("ca");
    std::fs::create_dir_all(&ca_dir)?;
    ca.write_files(&ca_dir)?;
    let bundle = TrustBundle::new(td.clone(), vec![ca.trust_anchor().clone()]);
    let trust = TrustStore::new(bundle.clone())?;
    let agent_name = NodeName::new(AGENT_NAME)?;
    let agent_key = NodeKey::generate()?;
    let agent_claims = NodeClaims::new(&[IpAddr::V4(AGENT_IP)], &[AGENT_POD_CIDR.parse()?])?;
    let agent_identity = issue(&ca, &td, &agent_name, &agent_key, &agent_claims)?;
    let id_dir = bench.dir.join("agent-id");
    std::fs::create_dir_all(&id_dir)?;
    std::fs::write(id_dir.join("node.crt"), agent_identity.chain_pem())?;
    write_secret(&id_dir.join("node.key"), agent_key.to_pem().as_bytes())?;
    std::fs::write(id_dir.join("bundle.pem"), ca.chain_pem())?;

    // One key for all simulated peers (a certificate each): key generation is not what is
    // measured, and it keeps the set-up short under emulation.
    let peer_key = NodeKey::generate()?;
    let mut peers = HashMap::with_capacity(n);
    for i in 0..n {
        let name = NodeName::new(&format!("peer-{i:05}"))?;
        let key = NodeKey::from_pem(peer_key.to_pem().as_bytes())?;
        let ip = peer_ip(i)?;
        let pod_cidr = peer_pod_cidr(i)?;
        let claims = NodeClaims::new(&[IpAddr::V4(ip)], &[pod_cidr])?;
        let identity = issue(&ca, &td, &name, &key, &claims)?;
        let config = HandshakeConfig::new(trust.clone(), &identity)?;
        let wg_key = nodeseal_wireguard::PrivateKey::generate()?;
        peers.insert(
            ip,
            PeerCreds {
                index: i,
                name,
                ip,
                pod_cidr,
                config,
                wg_key,
                attempts: std::sync::atomic::AtomicU32::new(0),
                epoch: std::sync::atomic::AtomicU64::new(0),
            },
        );
    }

    // The crypto floor of one key agreement, timed here and now (issue 16).
    let floor = {
        let name = NodeName::new("peer-floor")?;
        let claims = NodeClaims::new(&[IpAddr::V4(LOADGEN_IP)], &[peer_pod_cidr(0)?])?;
        let identity = issue(&ca, &td, &name, &peer_key, &claims)?;
        floor::measure(&trust, &identity).context("timing the crypto primitives")?
    };

    // The store: trust bundle and every peer's node record, before the agent starts.
    let records = peers
        .values()
        .map(node_record)
        .collect::<Result<Vec<_>>>()?;
    let bundle_json = bundle.to_json()?;
    let (store_args, control) = match backend {
        Backend::Dir => {
            let store_dir = bench.dir.join("store");
            fill_dir_store(&store_dir, &records, bundle_json)?;
            let args = vec![
                "--store-dir".to_owned(),
                store_dir.to_string_lossy().into_owned(),
            ];
            (args, None)
        }
        Backend::Kube => {
            let control =
                KubeControlPlane::start_bare(Arc::clone(&bench.loadgen_ns), IpAddr::V4(LOADGEN_IP))
                    .context("kube-apiserver in the load generator's namespace")?;
            control
                .admin(move |client| register_in_kube(client, records, bundle_json))
                .context("registering the peers in the apiserver")?;
            let args = vec![
                "--kubernetes".to_owned(),
                "--kubeconfig".to_owned(),
                control.configs().admin.to_string_lossy().into_owned(),
            ];
            (args, Some(control))
        }
    };

    // The load generator, listening on every peer address.
    let stats = Arc::new(LoadStats::new(n));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (roll_tx, roll_rx) = tokio::sync::mpsc::unbounded_channel::<rolling::Start>();
    let peers = Arc::new(peers);
    let loadgen = {
        let (peers, stats, agent_name) =
            (Arc::clone(&peers), Arc::clone(&stats), agent_name.clone());
        bench.loadgen_ns.spawn_thread("loadgen", move || {
            load_generator(
                &peers,
                &stats,
                &agent_name,
                mode,
                &ready_tx,
                stop_rx,
                roll_rx,
            )
        })?
    };
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("the load generator did not start")??;
    let setup = setup_started.elapsed();

    // The agent.
    let socket = bench.dir.join("agent.sock");
    let mut cmd = bench
        .agent_ns
        .command(&fabric::binary("nodeseal-agent").to_string_lossy());
    cmd.args(["--node-name", AGENT_NAME])
        .args(["--node-ip", &AGENT_IP.to_string()])
        .args(["--pod-cidr", AGENT_POD_CIDR])
        .args(["--uplink", UPLINK])
        .args(["--handshake-port", &HANDSHAKE_PORT.to_string()])
        .args(["--state-dir", &bench.dir.join("state").to_string_lossy()])
        .args(["--status-socket", &socket.to_string_lossy()])
        .args(["--bpf-pin-root", &bench.pin_root.to_string_lossy()])
        .args(["--encryption-type", mode_name(mode)])
        .args(&store_args)
        .args([
            "--identity-cert",
            &id_dir.join("node.crt").to_string_lossy(),
        ])
        .args(["--identity-key", &id_dir.join("node.key").to_string_lossy()])
        .args([
            "--trust-bundle-file",
            &id_dir.join("bundle.pem").to_string_lossy(),
        ])
        .env("RUST_LOG", "info");
    let cpu_before = self_cpu();
    let started = Instant::now();
    let mut agent = Process::spawn("agent", cmd, &bench.dir.join("logs"))?;
    let pid = agent.pid();
    let mut peak_seen = 0;
    let mut memory_at_peak: Option<MemoryProfile> = None;
    let mut profiled = Instant::now();
    loop {
        if stats.completed.load(Ordering::Relaxed) >= n {
            break;
        }
        if !agent.is_running() {
            bail!("the agent exited:\n{}", tail(&agent.log(), 40));
        }
        if started.elapsed() > timeout {
            bail!(
                "only {} of {n} peers completed after {timeout:?}; load generator failures: {:?}\n\
                 agent log (tail):\n{}",
                stats.completed.load(Ordering::Relaxed),
                stats.failures.lock().map(|f| f.clone()).unwrap_or_default(),
                tail(&agent.log(), 40)
            );
        }
        let rss = proc_status_kb(pid, "VmRSS:").unwrap_or(0);
        // A full smaps read walks the agent's page tables: at most every 100 ms, and only
        // when the RSS grew past the last profile's by 256 KiB.
        if rss > memory_at_peak.as_ref().map_or(0, |p| p.rss_kb + 256)
            && profiled.elapsed() > Duration::from_millis(100)
        {
            memory_at_peak = MemoryProfile::read(pid).or(memory_at_peak);
            profiled = Instant::now();
        }
        peak_seen = peak_seen.max(rss);
        std::thread::sleep(Duration::from_millis(10));
    }
    let (first, half, all) = {
        let done = stats
            .done
            .lock()
            .map_err(|_| anyhow::anyhow!("stats lock poisoned"))?;
        let mut times: Vec<Duration> = done.iter().flatten().map(|t| *t - started).collect();
        times.sort();
        (
            times.first().copied().unwrap_or_default(),
            times.get(times.len() / 2).copied().unwrap_or_default(),
            times.last().copied().unwrap_or_default(),
        )
    };
    let loadgen_cpu = self_cpu().saturating_sub(cpu_before);
    let agent_cpu = process_cpu(pid).unwrap_or_default();
    let peak_rss_kb = proc_status_kb(pid, "VmHWM:")
        .unwrap_or(peak_seen)
        .max(peak_seen);

    // The agent's own view, then the kernel's.
    let status_all = wait_status_established(&socket, n, started, Duration::from_secs(120))
        .with_context(|| format!("agent log (tail):\n{}", tail(&agent.log(), 40)))?;
    let (kernel, device_all) = match mode {
        Mode::Ipsec => {
            let (states, policies) = xfrm_counts(&bench.agent_ns)?;
            (Programmed::Xfrm { states, policies }, None)
        }
        Mode::Wireguard => {
            let (kernel, converged) =
                wait_device_complete(&bench.agent_ns, n, started, Duration::from_secs(120))
                    .with_context(|| format!("agent log (tail):\n{}", tail(&agent.log(), 40)))?;
            (kernel, Some(converged))
        }
    };
    let rss_kb = proc_status_kb(pid, "VmRSS:").unwrap_or(0);
    let memory_converged = MemoryProfile::read(pid);
    let handshakes = stats.handshakes.load(Ordering::Relaxed);

    // After convergence: what the agent costs while nothing changes. This window includes the
    // sweep of stale SAs each peer task runs `--rekey-grace` (default 30 s) after its first flip.
    let cpu_converged = process_cpu(pid).unwrap_or_default();
    let io_before = ProcIo::read(pid);
    let requests_before = control.as_ref().map(quiet_requests).transpose()?;
    if std::env::var_os("NODESEAL_BENCH_PERF_IDLE").is_some() {
        profile_idle(pid, idle, &bench.dir)?;
    } else {
        std::thread::sleep(idle);
    }
    let idle_io = io_before.and_then(|before| Some(ProcIo::read(pid)?.since(&before)));
    let quiet_requests = match (&control, requests_before) {
        (Some(control), Some(before)) => Some(quiet_requests(control)? - before),
        _ => None,
    };
    ensure!(
        agent.is_running(),
        "the agent exited after converging:\n{}",
        tail(&agent.log(), 40)
    );
    let idle_cpu = process_cpu(pid)
        .unwrap_or_default()
        .saturating_sub(cpu_converged);
    let idle_rss_kb = proc_status_kb(pid, "VmRSS:").unwrap_or(0);
    let idle_peak_rss_kb = proc_status_kb(pid, "VmHWM:").unwrap_or(0);
    let memory_idle = MemoryProfile::read(pid);
    let idle_kernel = programmed(&bench.agent_ns, mode)?;
    if idle_kernel != kernel {
        println!(
            "  note: after {idle:?} the agent holds {idle_kernel:?} (at convergence {kernel:?})"
        );
    }
    let failures = stats.failures.lock().map(|f| f.clone()).unwrap_or_default();

    let rolling = match rolling_window {
        Some(window) => Some(
            roll(n, window, timeout, pid, &roll_tx, &mut agent)
                .with_context(|| format!("agent log (tail):\n{}", tail(&agent.log(), 40)))?,
        ),
        None => None,
    };

    agent.terminate(Duration::from_secs(5));
    drop(control);
    drop(stop_tx);
    match loadgen.join() {
        Ok(r) => r?,
        Err(_) => bail!("the load generator panicked"),
    }

    // Baseline: the same objects, programmed by one `ip -batch` or `wg setconf`.
    let (baseline, baseline_objects) = match kernel {
        Programmed::Xfrm { states, policies } => {
            ip_batch_baseline(&peers, states, policies, &bench.dir)?
        }
        Programmed::Wireguard { .. } => wg_setconf_baseline(&peers, &bench.dir)?,
    };

    Ok(Convergence {
        peers: n,
        mode,
        backend,
        quiet_requests,
        setup,
        first,
        half,
        all,
        status_all,
        device_all,
        kernel,
        peak_rss_kb,
        rss_kb,
        agent_cpu,
        loadgen_cpu,
        handshakes,
        failures,
        baseline,
        baseline_objects,
        idle,
        idle_cpu,
        idle_rss_kb,
        idle_peak_rss_kb,
        memory_at_peak,
        memory_converged,
        memory_idle,
        idle_io,
        rolling,
        floor,
    })
}

/// The rolling restart phase (see `agent/rolling.rs`): tells the load generator to restart
/// every peer once over `window` and waits (at most `window + timeout`) until each is keyed
/// again or has given up.
fn roll(
    n: usize,
    window: Duration,
    timeout: Duration,
    pid: u32,
    roll_tx: &tokio::sync::mpsc::UnboundedSender<rolling::Start>,
    agent: &mut Process,
) -> Result<Rolling> {
    let stats = Arc::new(rolling::Stats::new(n, window, Duration::from_millis(500)));
    let cpu_before = process_cpu(pid).unwrap_or_default();
    roll_tx
        .send(rolling::Start {
            stats: Arc::clone(&stats),
        })
        .map_err(|_| anyhow::anyhow!("the load generator stopped"))?;
    let deadline = stats.started + window + timeout;
    loop {
        let finished =
            stats.completed.load(Ordering::Relaxed) + stats.gave_up.load(Ordering::Relaxed);
        if finished >= n {
            break;
        }
        ensure!(
            agent.is_running(),
            "the agent exited during the rolling restart"
        );
        if Instant::now() > deadline {
            bail!(
                "rolling restart: only {finished} of {n} peers finished within {:?} of the \
                 first slot; failures: {:?}",
                window + timeout,
                stats.failures.lock().map(|f| f.clone()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent_cpu = process_cpu(pid)
        .unwrap_or_default()
        .saturating_sub(cpu_before);
    let (all, waits) = stats.waits();
    Ok(Rolling {
        window,
        all,
        keyed: waits.len(),
        median: rolling::percentile(&waits, 50),
        p99: rolling::percentile(&waits, 99),
        longest: waits.last().copied().unwrap_or_default(),
        retries: stats.retries.load(Ordering::Relaxed),
        gave_up: stats.gave_up.load(Ordering::Relaxed),
        agent_cpu,
        failures: stats.failures.lock().map(|f| f.clone()).unwrap_or_default(),
    })
}

impl Rolling {
    fn line(&self, n: usize) -> String {
        let mut s = format!(
            "rolling restart of {n} peers over {:.0}s: {} keyed again, all after {:.3}s ({:.3}x \
             the window); wait per peer median {:.3}s, p99 {:.3}s, longest {:.3}s; {} retries, \
             {} gave up; agent CPU {:.2}s ({:.3} ms per peer)",
            self.window.as_secs_f64(),
            self.keyed,
            self.all.as_secs_f64(),
            self.all.as_secs_f64() / self.window.as_secs_f64().max(1e-6),
            self.median.as_secs_f64(),
            self.p99.as_secs_f64(),
            self.longest.as_secs_f64(),
            self.retries,
            self.gave_up,
            self.agent_cpu.as_secs_f64(),
            self.agent_cpu.as_secs_f64() * 1000.0 / n.max(1) as f64
        );
        for (e, count) in &self.failures {
            let _ = write!(s, "\n    {count} x {e}");
        }
        s
    }
}

/// Rolling restarts (issue 16), one row per convergence run that had one.
fn rolling_table(rows: &[Convergence]) -> String {
    let mut s = String::from(
        "Rolling restart: every peer re-initiates once, spread evenly over the window\n",
    );
    let _ = writeln!(
        s,
        "{:>6} | {:>9} | {:>10} | {:>8} | {:>9} | {:>9} | {:>9} | {:>9} | {:>7} | {:>7} | {:>10} | {:>11} | {:>13}",
        "peers",
        "mode",
        "store",
        "window",
        "all (s)",
        "all/win",
        "median(s)",
        "p99 (s)",
        "longest",
        "retries",
        "agent CPU",
        "CPU/peer ms",
        "idle ms/peer/m"
    );
    for r in rows {
        let Some(roll) = &r.rolling else { continue };
        let minutes = (r.idle.as_secs_f64() / 60.0).max(1e-6);
        let _ = writeln!(
            s,
            "{:>6} | {:>9} | {:>10} | {:>7.0}s | {:>9.3} | {:>8.3}x | {:>9.3} | {:>9.3} | {:>6.2}s | {:>7} | {:>9.2}s | {:>11.3} | {:>13.3}",
            r.peers,
            mode_name(r.mode),
            r.backend.name(),
            roll.window.as_secs_f64(),
            roll.all.as_secs_f64(),
            roll.all.as_secs_f64() / roll.window.as_secs_f64().max(1e-6),
            roll.median.as_secs_f64(),
            roll.p99.as_secs_f64(),
            roll.longest.as_secs_f64(),
            roll.retries,
            roll.agent_cpu.as_secs_f64(),
            roll.agent_cpu.as_secs_f64() * 1000.0 / r.peers.max(1) as f64,
            r.idle_cpu.as_secs_f64() * 1000.0 / r.peers.max(1) as f64 / minutes
        );
    }
    let _ = write!(
        s,
        "all = first restart's slot until the last peer keyed again (floor: the window itself); \
         median / p99 / longest = per peer, its slot until its keys were confirmed;\nCPU/peer = \
         agent CPU over the phase per restarted peer; idle ms/peer/m = agent CPU in the quiet \
         period before the restart, per peer per minute."
    );
    s
}

/// Figures of one rolling restart.
struct Rolling {
    window: Duration,
    /// First slot until the last peer keyed again.
    all: Duration,
    keyed: usize,
    /// Per peer: its slot until its keys were confirmed.
    median: Duration,
    p99: Duration,
    longest: Duration,
    retries: usize,
    gave_up: usize,
    agent_cpu: Duration,
    failures: BTreeMap<String, u64>,
}

/// `NODESEAL_BENCH_PERF_IDLE` set: samples the agent with `perf record` for the quiet period and
/// prints where its CPU went (a diagnosis aid: perf's sampling adds a little to the agent's CPU).
fn profile_idle(pid: u32, idle: Duration, dir: &Path) -> Result<()> {
    let data = dir.join("idle.perf");
    let recorded = Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            "499",
            "-g",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(&data)
        .args(["--", "sleep", &idle.as_secs().to_string()])
        .output()
        .context("running perf record")?;
    ensure!(
        recorded.status.success(),
        "perf record: {}",
        String::from_utf8_lossy(&recorded.stderr)
    );
    for args in [
        &[
            "--no-children",
            "--sort",
            "dso,sym",
            "--percent-limit",
            "0.5",
            "-g",
            "none",
        ][..],
        &[
            "--children",
            "--sort",
            "sym",
            "--percent-limit",
            "3",
            "-g",
            "none",
        ][..],
    ] {
        let report = Command::new("perf")
            .args(["report", "--stdio", "-i"])
            .arg(&data)
            .args(args)
            .output()
            .context("running perf report")?;
        println!("  perf report {} of the quiet period:", args.join(" "));
        for line in String::from_utf8_lossy(&report.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .take(40)
        {
            println!("    {line}");
        }
    }
    Ok(())
}

/// Read and write syscalls and bytes of a process, from `/proc/<pid>/io`.
#[derive(Clone, Copy, Debug, Default)]
struct ProcIo {
    rchar: u64,
    wchar: u64,
    syscr: u64,
    syscw: u64,
}

impl ProcIo {
    fn read(pid: u32) -> Option<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
        let mut io = Self::default();
        for line in text.lines() {
            let (key, value) = line.split_once(':')?;
            let value: u64 = value.trim().parse().ok()?;
            match key {
                "rchar" => io.rchar = value,
                "wchar" => io.wchar = value,
                "syscr" => io.syscr = value,
                "syscw" => io.syscw = value,
                _ => {}
            }
        }
        Some(io)
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            rchar: self.rchar.saturating_sub(before.rchar),
            wchar: self.wchar.saturating_sub(before.wchar),
            syscr: self.syscr.saturating_sub(before.syscr),
            syscw: self.syscw.saturating_sub(before.syscw),
        }
    }
}

fn fill_dir_store(dir: &Path, records: &[NodeRecord], bundle: String) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = Store::new(DirStore::open(dir, DirOptions::default()).await?);
        store.put(&unsigned_bundle(bundle)).await?;
        for record in records {
            store.put(record).await?;
        }
        anyhow::Ok(())
    })
    .context("filling the directory store")
}

/// What a cluster would hold: the agent's Node and each peer's Node (InternalIP, pod CIDR) and
/// NodesealNode (through the Kubernetes store, as a peer's agent would publish it), and the
/// trust bundle keymgr would publish.
async fn register_in_kube(
    client: kube::Client,
    records: Vec<NodeRecord>,
    bundle: String,
) -> Result<()> {
    use futures::{StreamExt as _, TryStreamExt as _};
    nodeseal_kube_fixture::register_node(
        &client,
        AGENT_NAME,
        IpAddr::V4(AGENT_IP),
        &[AGENT_POD_CIDR],
    )
    .await?;
    let store = Store::new(KubeStore::from_client(
        client.clone(),
        nodeseal_netns::kube::NAMESPACE.into(),
        TRUST_DOMAIN.into(),
    ));
    store.put(&unsigned_bundle(bundle)).await?;
    let (client, store) = (&client, &store);
    futures::stream::iter(records)
        .map(|record| async move {
            let cidr = record.pod_cidrs.first().map(ToString::to_string);
            let cidrs: Vec<&str> = cidr.iter().map(String::as_str).collect();
            nodeseal_kube_fixture::register_node(
                client,
                record.name.as_str(),
                record.node_ips[0],
                &cidrs,
            )
            .await?;
            store.put(&record).await?;
            anyhow::Ok(())
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The apiserver's count of non-watch requests on what agents read and write.
fn quiet_requests(control: &KubeControlPlane) -> Result<f64> {
    control.admin(|client| async move {
        let counts = nodeseal_kube_fixture::metrics::non_watch_requests(
            &client,
            &["nodes", "nodesealnodes", "configmaps"],
        )
        .await?;
        Ok(counts.values().sum())
    })
}

/// The veth pair, the agent's node IP on its end, every peer address local to the load
/// generator, routes both ways.
fn wire(bench: &Bench) -> Result<()> {
    let (a, l) = (&bench.agent_ns, &bench.loadgen_ns);
    a.ip(&[
        "link",
        "add",
        UPLINK,
        "type",
        "veth",
        "peer",
        "name",
        "lg0",
        "netns",
        l.name(),
    ])?;
    a.ip(&["addr", "add", &format!("{AGENT_IP}/24"), "dev", UPLINK])?;
    a.ip(&["link", "set", UPLINK, "up"])?;
    a.ip(&["route", "add", PEER_NET, "via", &LOADGEN_IP.to_string()])?;
    l.ip(&["addr", "add", &format!("{LOADGEN_IP}/24"), "dev", "lg0"])?;
    l.ip(&["link", "set", "lg0", "up"])?;
    // Every address of PEER_NET is local here (one route instead of N addresses).
    l.ip(&["route", "add", "local", PEER_NET, "dev", "lo"])?;
    l.sysctl("net.core.somaxconn", "8192")?;
    l.sysctl("net.ipv4.tcp_max_syn_backlog", "8192")?;
    Ok(())
}

/// The bench's agents take their bundle from files, so the store's needs no signature.
fn unsigned_bundle(bundle: String) -> nodeseal_store::TrustBundle {
    nodeseal_store::TrustBundle {
        bundle,
        signature: None,
        signer_pem: None,
    }
}

fn issue(
    ca: &ClusterCa,
    td: &TrustDomain,
    node: &NodeName,
    key: &NodeKey,
    claims: &NodeClaims,
) -> Result<NodeIdentity> {
    let csr = create_csr(key, td, node)?;
    let validated = validate_csr(csr.as_ref(), td, node)?;
    let chain = ca.issue(
        &validated,
        Some(claims),
        &IssueOptions::with_ttl(Duration::from_secs(24 * 3600)),
    )?;
    Ok(NodeIdentity::new(
        chain,
        NodeKey::from_pem(key.to_pem().as_bytes())?,
    )?)
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

fn node_record(p: &PeerCreds) -> Result<NodeRecord> {
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    Ok(NodeRecord {
        name: nodeseal_store::NodeName::new(p.name.as_str())?,
        node_ips: vec![IpAddr::V4(p.ip)],
        pod_cidrs: vec![p.pod_cidr],
        spiffe_id: nodeseal_store::SpiffeId::new(td.node_id(&p.name).as_str())?,
        handshake: SocketAddr::V4(SocketAddrV4::new(p.ip, HANDSHAKE_PORT)),
        wireguard_public_key: None,
    })
}

/// Runs on a thread inside the load generator's namespace until `stop` fires (or its sender is
/// dropped): accepts on `0.0.0.0:4250` and answers each handshake as the peer whose address
/// was dialled.
fn load_generator(
    peers: &Arc<HashMap<Ipv4Addr, PeerCreds>>,
    stats: &Arc<LoadStats>,
    agent: &NodeName,
    mode: Mode,
    ready: &std::sync::mpsc::Sender<Result<()>>,
    stop: tokio::sync::oneshot::Receiver<()>,
    mut roll: tokio::sync::mpsc::UnboundedReceiver<rolling::Start>,
) -> Result<()> {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("loadgen-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("tokio runtime: {e}")));
            return Err(e.into());
        }
    };
    rt.block_on(async {
        let listener = match listen() {
            Ok(l) => {
                let _ = ready.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready.send(Err(anyhow::anyhow!("{e:#}")));
                return Err(e);
            }
        };
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                Some(start) = roll.recv() => rolling::spawn(&start, peers, agent, mode),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (peers, stats, agent) = (Arc::clone(peers), Arc::clone(stats), agent.clone());
                        tokio::spawn(async move {
                            let served = tokio::time::timeout(
                                PEER_HANDSHAKE_TIMEOUT,
                                serve(stream, &peers, &agent, mode, &stats),
                            )
                            .await;
                            match served {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => stats.failure(format!("{e:#}")),
                                Err(_) => stats.failure(format!("no answer within {PEER_HANDSHAKE_TIMEOUT:?}")),
                            }
                        });
                    }
                    Err(e) => stats.failure(format!("accept: {e}")),
                },
            }
        }
    })
}

fn listen() -> Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, HANDSHAKE_PORT)))?;
    Ok(socket.listen(8192)?)
}

/// One handshake, responder side, as the peer owning the dialled address, in `mode` (an agent
/// in the other mode sees a mode mismatch: counted as a failure).
async fn serve(
    stream: tokio::net::TcpStream,
    peers: &HashMap<Ipv4Addr, PeerCreds>,
    agent: &NodeName,
    mode: Mode,
    stats: &LoadStats,
) -> Result<()> {
    let IpAddr::V4(local) = stream.local_addr()?.ip() else {
        bail!("IPv6 connection");
    };
    let peer = peers
        .get(&local)
        .with_context(|| format!("connection to {local}, which is no simulated peer"))?;
    stream.set_nodelay(true)?;
    let incoming = handshake::accept(&peer.config, stream, ExpectedPeer::Node(agent.clone()))
        .await
        .context("accept")?;
    let epoch: Epoch = incoming.peer_hello().epoch;
    let mut hello = Hello::new(peer.name.clone(), epoch, next_spi(peer)?, mode)
        .with_node_ips(vec![IpAddr::V4(peer.ip)])
        .with_pod_cidrs(vec![peer.pod_cidr]);
    if mode == Mode::Wireguard {
        hello = hello.with_wg_public_key(WgPublicKey(*peer.wg_key.public_key().as_bytes()));
    }
    let mut agreement = incoming.respond(hello).await.context("respond")?;
    if mode == Mode::Wireguard {
        prove_wg_possession(peer, &mut agreement).await?;
    }
    agreement
        .channel
        .confirm_installed(epoch)
        .await
        .context("Installed exchange")?;
    let _ = agreement.channel.close().await;
    peer.epoch.store(epoch.0, Ordering::Relaxed);
    stats.success(peer.index);
    Ok(())
}

/// A fresh inbound SPI for `peer`'s next Hello: unique per peer and attempt (the kernel keys
/// states by destination, SPI and protocol).
fn next_spi(peer: &PeerCreds) -> Result<Spi> {
    let attempt = peer.attempts.fetch_add(1, Ordering::Relaxed) & 0xff;
    let raw_spi = 0x0100_0000_u32
        .checked_add(u32::try_from(peer.index << 8)? | attempt)
        .context("SPI space")?;
    Ok(Spi::new(raw_spi)?)
}

/// WireGuard mode: both sides prove they hold the private key of the public key they announced.
async fn prove_wg_possession<S>(
    peer: &PeerCreds,
    agreement: &mut handshake::Agreement<S>,
) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let WgPublicKey(agent_key) = agreement
        .peer_hello
        .wg_public_key
        .context("the agent announced no WireGuard key")?;
    let shared = peer
        .wg_key
        .shared_secret(&nodeseal_wireguard::PublicKey::from_bytes(agent_key))
        .context("the agent's WireGuard key is a low-order point")?;
    let theirs = agreement
        .channel
        .exchange_possession(agreement.keys.wg_possession_proof(&shared))
        .await
        .context("Possession exchange")?;
    ensure!(
        agreement.keys.verify_wg_possession(&shared, &theirs),
        "the agent's possession proof does not verify"
    );
    Ok(())
}

/// Polls the status API until every one of `n` peers is established; returns the time since
/// `started`.
fn wait_status_established(
    socket: &Path,
    n: usize,
    started: Instant,
    timeout: Duration,
) -> Result<Duration> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = Command::new(fabric::binary("nodeseal"))
            .args(["status", "-o", "json", "--socket"])
            .arg(socket)
            .output()
            .context("running nodeseal status")?;
        let last = if out.status.success() {
            let doc: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("parsing status JSON")?;
            let rows = doc["peers"].as_array().map_or(&[][..], Vec::as_slice);
            let established = rows.iter().filter(|r| r["state"] == "established").count();
            if established >= n {
                return Ok(started.elapsed());
            }
            format!(
                "{established} of {n} peers established ({} rows)",
                rows.len()
            )
        } else {
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        if Instant::now() >= deadline {
            bail!("status did not show all {n} peers established within {timeout:?}: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (states, policies) in `ns`, from `ip xfrm state count` / `ip xfrm policy count`.
fn xfrm_counts(ns: &Netns) -> Result<(u64, u64)> {
    let sad = ns.ip(&["xfrm", "state", "count"])?;
    let spd = ns.ip(&["xfrm", "policy", "count"])?;
    // "SAD count 2000" / "SPD IN 1000 OUT 2000 FWD 1000"
    let numbers = |text: &str| -> Vec<u64> {
        text.split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    let states = numbers(&sad)
        .first()
        .copied()
        .with_context(|| format!("unexpected `ip xfrm state count` output {sad:?}"))?;
    let spd_numbers = numbers(&spd);
    ensure!(
        spd_numbers.len() >= 3,
        "unexpected `ip xfrm policy count` output {spd:?}"
    );
    Ok((states, spd_numbers.iter().take(3).sum()))
}

/// Installs `states` states and `policies` policies of the agent's layout (per peer: IN and OUT
/// ESP tunnel states, rfc4106 with ESN and a 128-packet window, the OUT one marked; IN and FWD
/// policies requiring the peer's tunnel, a strict-mode OUT block and the marked OUT policy) into
/// a fresh namespace with one `ip -batch`, and returns its wall time and object count.
fn ip_batch_baseline(
    peers: &HashMap<Ipv4Addr, PeerCreds>,
    states: u64,
    policies: u64,
    dir: &Path,
) -> Result<(Duration, u64)> {
    let reqid = nodeseal_agent::peer::ipsec::REQID;
    let mask = nodeseal_bpf_common::mark::OWNED_MASK;
    let mut ordered: Vec<&PeerCreds> = peers.values().collect();
    ordered.sort_by_key(|p| p.index);
    let n = ordered.len().max(1) as u64;
    let states_per_peer = states.div_ceil(n);
    let policies_per_peer = policies.div_ceil(n);
    let mut batch = String::new();
    let (mut n_states, mut n_policies) = (0u64, 0u64);
    for p in &ordered {
        let node_id = u16::try_from(p.index + 1).context("node id")?;
        let mark = nodeseal_bpf_common::mark::encrypt(node_id, 1);
        let key = |dir: u8| format!("0x{:08x}{:02x}{:030x}", p.index, dir, 0x5eed_u128);
        let spi_out = 0x0100_0000 + (u32::try_from(p.index)? << 4);
        let spi_in = 0x8100_0000 + (u32::try_from(p.index)? << 4);
        let (local, peer, cidr) = (AGENT_IP, p.ip, p.pod_cidr);
        let state_lines = [
            format!(
                "xfrm state add src {local} dst {peer} proto esp spi 0x{spi_out:08x} reqid 0x{reqid:08x} \
                 mode tunnel flag esn replay-window 128 mark 0x{mark:08x} mask 0x{mask:08x} \
                 aead rfc4106(gcm(aes)) {} 128 sel src 0.0.0.0/0 dst 0.0.0.0/0",
                key(0)
            ),
            format!(
                "xfrm state add src {peer} dst {local} proto esp spi 0x{spi_in:08x} reqid 0x{reqid:08x} \
                 mode tunnel flag esn replay-window 128 \
                 aead rfc4106(gcm(aes)) {} 128 sel src 0.0.0.0/0 dst 0.0.0.0/0",
                key(1)
            ),
        ];
        let tmpl_in = format!(
            "tmpl src {peer} dst {local} proto esp reqid 0x{reqid:08x} mode tunnel level required"
        );
        let tmpl_out = format!(
            "tmpl src {local} dst {peer} proto esp reqid 0x{reqid:08x} mode tunnel level required"
        );
        let policy_lines = [
            format!("xfrm policy add src {cidr} dst 0.0.0.0/0 dir in priority 100 {tmpl_in}"),
            format!("xfrm policy add src {cidr} dst 0.0.0.0/0 dir fwd priority 100 {tmpl_in}"),
            format!(
                "xfrm policy add src 0.0.0.0/0 dst {cidr} dir out priority 100 mark 0x{mark:08x} \
                 mask 0x{mask:08x} {tmpl_out}"
            ),
            format!(
                "xfrm policy add src 0.0.0.0/0 dst {cidr} dir out priority 200 action block {tmpl_out}"
            ),
        ];
        for line in state_lines.iter().take(usize::try_from(states_per_peer)?) {
            if n_states < states {
                batch.push_str(line);
                batch.push('\n');
                n_states += 1;
            }
        }
        for line in policy_lines
            .iter()
            .take(usize::try_from(policies_per_peer)?)
        {
            if n_policies < policies {
                batch.push_str(line);
                batch.push('\n');
                n_policies += 1;
            }
        }
    }
    if n_states != states || n_policies != policies {
        println!(
            "  note: the agent's layout ({states} states, {policies} policies for {n} peers) is not \
             the expected 2 + 4 per peer; the baseline installs {n_states} + {n_policies}"
        );
    }
    let file = dir.join("baseline.batch");
    std::fs::write(&file, &batch)?;
    let ns = Netns::new("bbase")?;
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-batch"])
        .arg(&file)
        .output()
        .context("running ip -batch")?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "ip -batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, p) = xfrm_counts(&ns)?;
    ensure!(
        (s, p) == (n_states, n_policies),
        "ip -batch installed {s} states and {p} policies, expected {n_states} and {n_policies}"
    );
    Ok((took, n_states + n_policies))
}

/// What the agent programmed in `ns` for `mode`.
fn programmed(ns: &Netns, mode: Mode) -> Result<Programmed> {
    match mode {
        Mode::Ipsec => {
            let (states, policies) = xfrm_counts(ns)?;
            Ok(Programmed::Xfrm { states, policies })
        }
        Mode::Wireguard => WgReader::new(ns)?.counts(),
    }
}

/// Reads the WireGuard device `nodeseal0` of a namespace over netlink, with the crate the agent
/// uses (a typed read: no key is ever turned into text here).
struct WgReader {
    handle: nodeseal_wireguard::Handle,
    rt: tokio::runtime::Runtime,
}

impl WgReader {
    fn new(ns: &Netns) -> Result<Self> {
        let file = std::fs::File::open(ns.path())
            .with_context(|| format!("opening {}", ns.path().display()))?;
        let handle = nodeseal_wireguard::Handle::in_namespace(&file)
            .context("WireGuard netlink sockets in the namespace")?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        Ok(Self { handle, rt })
    }

    /// The device's peers, and how many of them carry a (non-zero) preshared key.
    fn counts(&self) -> Result<Programmed> {
        let device = self
            .rt
            .block_on(self.handle.device(LinkName::default()).get().execute())
            .with_context(|| format!("reading the WireGuard device {}", LinkName::default()))?;
        let with_psk = device
            .peers
            .iter()
            .filter(|p| p.preshared_key.as_ref().is_some_and(|k| !k.is_zero()))
            .count();
        Ok(Programmed::Wireguard {
            peers: u64::try_from(device.peers.len())?,
            with_psk: u64::try_from(with_psk)?,
        })
    }
}

/// Polls the agent's WireGuard device until it holds `n` peers, each with a preshared key;
/// returns what it holds then and the time since `started`.
fn wait_device_complete(
    ns: &Netns,
    n: usize,
    started: Instant,
    timeout: Duration,
) -> Result<(Programmed, Duration)> {
    let reader = WgReader::new(ns)?;
    let n = u64::try_from(n)?;
    let deadline = Instant::now() + timeout;
    loop {
        let counts = reader.counts()?;
        if counts
            == (Programmed::Wireguard {
                peers: n,
                with_psk: n,
            })
        {
            return Ok((counts, started.elapsed()));
        }
        if Instant::now() >= deadline {
            bail!(
                "the device did not hold {n} peers with preshared keys within {timeout:?}: {counts:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `n` random 32-byte keys from the kernel's random source.
fn random_keys(n: usize) -> Result<Vec<[u8; 32]>> {
    use std::io::Read as _;
    let mut random = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    let mut keys = vec![[0u8; 32]; n];
    for key in &mut keys {
        random.read_exact(key).context("reading /dev/urandom")?;
    }
    Ok(keys)
}

/// Applies, with one `wg setconf`, a prepared configuration with a private key, the agent's
/// listen port and one peer per simulated peer (a random public and preshared key, the peer's
/// endpoint and its pod CIDR as allowed IPs, as the agent writes them) to a fresh WireGuard
/// link in a fresh namespace; returns its wall time and peer count.
fn wg_setconf_baseline(
    peers: &HashMap<Ipv4Addr, PeerCreds>,
    dir: &Path,
) -> Result<(Duration, u64)> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    let mut ordered: Vec<&PeerCreds> = peers.values().collect();
    ordered.sort_by_key(|p| p.index);
    let port = nodeseal_agent::peer::wireguard::DEFAULT_PORT;
    let mut keys = random_keys(1 + 2 * ordered.len())?.into_iter();
    let mut key = || {
        keys.next()
            .map(|k| BASE64.encode(k))
            .context("too few random keys")
    };
    // Secrets of this throw-away configuration only; the file is private and removed with `dir`.
    let mut conf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {port}\n",
        key()?
    );
    for p in &ordered {
        let _ = write!(
            conf,
            "\n[Peer]\nPublicKey = {}\nPresharedKey = {}\nEndpoint = {}:{port}\nAllowedIPs = {}\n",
            key()?,
            key()?,
            p.ip,
            p.pod_cidr
        );
    }
    let file = dir.join("baseline.wg.conf");
    write_secret(&file, conf.as_bytes())?;
    drop(conf);
    let ns = Netns::new("bwg")?;
    let link = LinkName::default().to_string();
    ns.ip(&["link", "add", &link, "type", "wireguard"])?;
    ns.ip(&["link", "set", &link, "up"])?;
    let started = Instant::now();
    let out = ns
        .command("wg")
        .arg("setconf")
        .arg(&link)
        .arg(&file)
        .output()
        .context("running wg setconf")?;
    let took = started.elapsed();
    let _ = std::fs::remove_file(&file);
    ensure!(
        out.status.success(),
        "wg setconf failed ({}): {}",
        out.status,
        redact_keys(&String::from_utf8_lossy(&out.stderr))
    );
    let n = u64::try_from(ordered.len())?;
    let counts = WgReader::new(&ns)?.counts()?;
    ensure!(
        counts
            == Programmed::Wireguard {
                peers: n,
                with_psk: n
            },
        "wg setconf left {counts:?}, expected {n} peers with preshared keys"
    );
    Ok((took, n))
}

/// `text` with every word that looks like a base64 WireGuard key replaced: `wg` quotes the
/// values it cannot parse, and those may be keys.
fn redact_keys(text: &str) -> String {
    text.split_inclusive(char::is_whitespace)
        .map(|word| {
            let core = word
                .trim()
                .trim_matches(|c| c == '\'' || c == '`' || c == '"');
            if core.len() == 44 && core.ends_with('=') {
                word.replace(core, "<key>")
            } else {
                word.to_owned()
            }
        })
        .collect()
}

/// A field of `/proc/<pid>/status` in KiB.
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime + stime of a process.
fn process_cpu(pid: u32) -> Option<Duration> {
    cpu_from_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn self_cpu() -> Duration {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| cpu_from_stat(&s))
        .unwrap_or_default()
}

fn cpu_from_stat(stat: &str) -> Option<Duration> {
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf(3) has no memory-safety preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()?
        .max(1);
    Some(Duration::from_millis((utime + stime) * 1000 / hz))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Rotation
// ---------------------------------------------------------------------------------------------

struct Rotation {
    /// Per rotation: (wall time of the CLI, duration it printed).
    runs: Vec<(Duration, Duration)>,
    baseline: Vec<Duration>,
    sent: u64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
}

impl Rotation {
    fn table(&self) -> String {
        let mut walls: Vec<Duration> = self.runs.iter().map(|r| r.0).collect();
        let mut printed: Vec<Duration> = self.runs.iter().map(|r| r.1).collect();
        let mut base = self.baseline.clone();
        walls.sort();
        printed.sort();
        base.sort();
        let stats = |v: &[Duration]| -> (f64, f64, f64) {
            (
                v.first().map_or(0.0, Duration::as_secs_f64),
                v.get(v.len() / 2).map_or(0.0, Duration::as_secs_f64),
                v.last().map_or(0.0, Duration::as_secs_f64),
            )
        };
        let mut s = format!(
            "Rotation: `nodeseal keys rotate --wait`, 3-node fabric, {} runs, 500 pps UDP stream pod(node0) -> pod(node1)\n",
            self.runs.len()
        );
        let _ = writeln!(
            s,
            "{:<34} | {:>8} | {:>8} | {:>8}",
            "", "min (s)", "median", "max"
        );
        for (label, v) in [
            ("rotate --wait, wall time", &walls),
            ("rotate --wait, printed duration", &printed),
            ("baseline: nodeseal node list", &base),
        ] {
            let (min, med, max) = stats(v);
            let _ = writeln!(s, "{label:<34} | {min:>8.3} | {med:>8.3} | {max:>8.3}");
        }
        let (_, wall_med, _) = stats(&walls);
        let (_, base_med, _) = stats(&base);
        let _ = writeln!(
            s,
            "median rotate / median node list: {:.1}x",
            wall_med / base_med.max(1e-6)
        );
        let _ = writeln!(
            s,
            "stream: {} sent, {} lost, {} duplicated, {} reordered",
            self.sent, self.lost, self.duplicated, self.reordered
        );
        let _ = write!(
            s,
            "targets (issue 6): rotate < {}s ({} by the median wall time), 0 lost ({}), 0 duplicated ({})",
            TARGET_ROTATE.as_secs(),
            verdict(wall_med <= TARGET_ROTATE.as_secs_f64()),
            verdict(self.lost == 0),
            verdict(self.duplicated == 0)
        );
        s
    }
}

fn rotate(rotations: usize) -> Result<Rotation> {
    ensure!(rotations > 0, "NODESEAL_BENCH_ROTATIONS must be at least 1");
    let options = FabricOptions::default();
    let grace = options.grace;
    let topo = Topology::builder("benchrot")
        .nodes(3)
        .pods_per_node(1)
        .build()?;
    let fabric = Fabric::start(&topo, 3, options)?;
    fabric
        .wait_established(&[0, 1, 2], Duration::from_secs(300))
        .context("the 3-node fabric did not establish")?;
    let (pod_a, pod_b) = (topo.node(0).pod(0), topo.node(1).pod(0));
    let stream = UdpStream::start(
        &pod_a.ns,
        &pod_b.ns,
        SocketAddrV4::new(pod_b.ip, 7100),
        500,
        Duration::from_secs(900),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let mut runs = Vec::with_capacity(rotations);
    for i in 0..rotations {
        let started = Instant::now();
        let out = fabric
            .nodeseal_store(&["keys", "rotate", "--wait", "--timeout", "120s"])
            .with_context(|| format!("rotation {}", i + 1))?;
        let wall = started.elapsed();
        let printed = parse_rotate_duration(&out)
            .with_context(|| format!("rotation {}: unexpected output {out:?}", i + 1))?;
        println!(
            "  rotation {}: wall {:.3}s, printed {:.3}s",
            i + 1,
            wall.as_secs_f64(),
            printed.as_secs_f64()
        );
        runs.push((wall, printed));
        // Let the previous keys retire under traffic before the next rotation.
        std::thread::sleep(grace + Duration::from_millis(500));
    }
    let report = stream.finish(Duration::from_millis(500))?;
    let mut baseline = Vec::with_capacity(rotations);
    for _ in 0..rotations {
        let started = Instant::now();
        fabric.nodeseal_store(&["node", "list"])?;
        baseline.push(started.elapsed());
    }
    Ok(Rotation {
        runs,
        baseline,
        sent: report.sent,
        lost: report.lost,
        duplicated: report.duplicated,
        reordered: report.reordered,
    })
}

/// "all nodes rekeyed to generation G in X.XXXs" -> X.XXX s.
fn parse_rotate_duration(out: &str) -> Option<Duration> {
    let line = out.lines().find(|l| l.contains("all nodes rekeyed"))?;
    let secs = line.rsplit(' ').next()?.strip_suffix('s')?;
    Duration::try_from_secs_f64(secs.parse().ok()?).ok()
}

/// Where a process's resident memory is (issue 16): kernel counters from `/proc/<pid>/status`
/// and the resident KiB of each kind of mapping in `/proc/<pid>/smaps`. A peak RSS is only
/// actionable when one knows whether it is program text, heap, thread stacks or eBPF maps.
#[derive(Clone, Debug, Default)]
struct MemoryProfile {
    rss_kb: u64,
    anon_kb: u64,
    file_kb: u64,
    shmem_kb: u64,
    threads: u64,
    /// Resident KiB by kind of mapping (see [`mapping_kind`]), and how many mappings.
    by_kind: BTreeMap<&'static str, (u64, u64)>,
}

impl MemoryProfile {
    fn read(pid: u32) -> Option<Self> {
        let mut p = Self {
            rss_kb: proc_status_kb(pid, "VmRSS:")?,
            anon_kb: proc_status_kb(pid, "RssAnon:")?,
            file_kb: proc_status_kb(pid, "RssFile:")?,
            shmem_kb: proc_status_kb(pid, "RssShmem:")?,
            threads: proc_status_kb(pid, "Threads:")?,
            by_kind: BTreeMap::new(),
        };
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
        let mut mappings = Vec::new();
        let mut current: Option<(u64, u64, bool, String, u64)> = None;
        for line in smaps.lines() {
            if let Some(rss) = line.strip_prefix("Rss:") {
                if let Some(m) = current.as_mut() {
                    m.4 = rss.split_whitespace().next()?.parse().ok()?;
                }
                continue;
            }
            let mut fields = line.split_whitespace();
            let Some(range) = fields.next() else { continue };
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            else {
                continue;
            };
            let perms = fields.next().unwrap_or("");
            let name = fields.nth(3).unwrap_or("").to_owned();
            if let Some(m) = current.take() {
                mappings.push(m);
            }
            current = Some((start, end, perms.starts_with("---"), name, 0));
        }
        mappings.extend(current);
        for (i, (start, end, guard, name, rss)) in mappings.iter().enumerate() {
            if *guard {
                continue;
            }
            let before = i.checked_sub(1).and_then(|j| mappings.get(j));
            let after = mappings.get(i + 1);
            let kind = mapping_kind(*start, *end, name, before, after);
            let entry = p.by_kind.entry(kind).or_default();
            entry.0 += rss;
            entry.1 += 1;
        }
        Some(p)
    }

    fn line(&self) -> String {
        let kinds: Vec<String> = self
            .by_kind
            .iter()
            .filter(|(_, (kb, _))| *kb > 0)
            .map(|(k, (kb, n))| format!("{k} {kb} ({n})"))
            .collect();
        format!(
            "RSS {} KiB = anon {} + file {} + shmem {}; {} threads; by mapping KiB (count): {}",
            self.rss_kb,
            self.anon_kb,
            self.file_kb,
            self.shmem_kb,
            self.threads,
            kinds.join(", ")
        )
    }
}

/// The kind of one readable mapping: the agent's own binary, shared libraries, the main heap,
/// glibc malloc arenas of other threads (64 MiB-aligned, followed by their reserved rest),
/// thread stacks (preceded by their guard page), eBPF array maps, other anonymous memory.
fn mapping_kind(
    start: u64,
    end: u64,
    name: &str,
    before: Option<&(u64, u64, bool, String, u64)>,
    after: Option<&(u64, u64, bool, String, u64)>,
) -> &'static str {
    const ARENA_ALIGN: u64 = 64 << 20;
    match name {
        "[heap]" => "heap",
        "[stack]" => "main stack",
        n if n.contains("bpf") => "bpf maps",
        n if n.ends_with("nodeseal-agent") => "exe",
        n if n.starts_with('/') => "libs",
        n if n.starts_with('[') && !n.starts_with("[anon") => "kernel",
        _ => {
            if start.is_multiple_of(ARENA_ALIGN) && after.is_some_and(|a| a.2 && a.0 == end) {
                "arenas"
            } else if before.is_some_and(|b| b.2 && b.1 == start && b.1 - b.0 <= 64 << 10)
                && end - start <= 16 << 20
            {
                "thread stacks"
            } else {
                "anon other"
            }
        }
    }
}
