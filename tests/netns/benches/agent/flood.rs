//! Handshake flood: what connections opened in a loop against node0's handshake port cost node0,
//! and whether its legitimate peers notice.
//!
//! A 4-node fabric with agents on node0..node2; node3 runs none, so its address is in no node
//! record. Phases of equal length, each under a 500 packets/s UDP stream pod(node1) -> pod(node0)
//! and with `nodeseal keys rotate --wait` every 5 s (legitimate handshakes of every pair):
//! - `quiet`: no flood, the baseline of the same run;
//! - `unknown address`: node3 connects and closes in a loop (closed before TLS);
//! - `member, not TLS`: node2, a member, connects and sends junk in a loop;
//! - `member, valid handshakes`: node2 runs complete, valid handshakes in a loop with its own
//!   SVID (a compromised member), each going as far as node0's `Installed`.
//!
//! Reported per phase: the flooder's attempts, node0's CPU (share of one core) and largest RSS,
//! node0's handshake counts by result, the median rotation and the stream's losses.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nodeseal_keymgr::handshake::{self, HandshakeConfig};
use nodeseal_keymgr::svid::certs_from_pem;
use nodeseal_keymgr::{
    ClusterCa, Epoch, Hello, Mode, NodeIdentity, NodeKey, NodeName, Spi, TrustBundle, TrustDomain,
    TrustStore,
};
use nodeseal_netns::traffic::StreamReport;
use nodeseal_netns::{Fabric, FabricOptions, Topology, UdpStream};

use super::{HANDSHAKE_PORT, TRUST_DOMAIN, proc_status_kb, process_cpu};

/// Connections the flooder keeps going at once.
const FLOODERS: usize = 16;
/// A legitimate rotation this often during each phase.
const ROTATE_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attack {
    Quiet,
    UnknownAddress,
    MemberJunk,
    MemberHandshakes,
}

impl Attack {
    const ALL: [Self; 4] = [
        Self::Quiet,
        Self::UnknownAddress,
        Self::MemberJunk,
        Self::MemberHandshakes,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Quiet => "quiet (baseline)",
            Self::UnknownAddress => "unknown address",
            Self::MemberJunk => "member, not TLS",
            Self::MemberHandshakes => "member, valid handshakes",
        }
    }
}

struct Phase {
    attack: Attack,
    wall: Duration,
    /// Connections the flooder opened, and how many of its handshakes completed.
    attempts: u64,
    completed: u64,
    agent_cpu: Duration,
    agent_rss_max_kb: u64,
    /// node0's `nodeseal_handshakes_total` increments by result.
    handshakes: BTreeMap<String, u64>,
    /// Wall times of `keys rotate --wait`, or why one failed.
    rotations: Vec<Result<Duration, String>>,
    stream: StreamReport,
}

pub struct Flood {
    phases: Vec<Phase>,
}

pub fn run(phase_length: Duration) -> Result<Flood> {
    let topo = Topology::builder("bflood")
        .nodes(4)
        .pods_per_node(1)
        .build()?;
    let mut fabric = Fabric::start(&topo, 3, FabricOptions::default())?;
    fabric
        .wait_established(&[0, 1, 2], Duration::from_secs(300))
        .context("the fabric did not establish")?;
    let member = member_credentials(&fabric, 2)?;
    let target = SocketAddr::from((topo.node(0).ip, HANDSHAKE_PORT));
    let mut phases = Vec::new();
    for attack in Attack::ALL {
        println!("  phase: {} for {phase_length:?} ...", attack.label());
        let phase = phase(&topo, &mut fabric, attack, target, &member, phase_length)
            .with_context(|| format!("phase {}", attack.label()))?;
        println!(
            "    {} attempts ({} completed handshakes), node0 CPU {:.0}% of a core, handshakes \
             {:?}, rotations {:?}, stream {:?}",
            phase.attempts,
            phase.completed,
            phase.cpu_share() * 100.0,
            phase.handshakes,
            phase.rotations,
            phase.stream
        );
        phases.push(phase);
        // Let node0 settle (retirements, node2's pair rekeying) before the next phase.
        std::thread::sleep(Duration::from_secs(5));
    }
    Ok(Flood { phases })
}

fn phase(
    topo: &Topology,
    fabric: &mut Fabric,
    attack: Attack,
    target: SocketAddr,
    member: &HandshakeConfig,
    length: Duration,
) -> Result<Phase> {
    let handshakes_before = handshake_counts(&fabric.metrics(topo, 0)?);
    let pid = fabric
        .agent(0)
        .context("node0's agent is not running")?
        .pid();
    let (pod_from, pod_to) = (topo.node(1).pod(0), topo.node(0).pod(0));
    let stream = UdpStream::start(
        &pod_from.ns,
        &pod_to.ns,
        SocketAddrV4::new(pod_to.ip, 7300),
        500,
        length + Duration::from_secs(120),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let flooder = match attack {
        Attack::Quiet => None,
        Attack::UnknownAddress | Attack::MemberJunk => {
            let ns = if attack == Attack::UnknownAddress {
                &topo.node(3).ns
            } else {
                &topo.node(2).ns
            };
            let junk = attack == Attack::MemberJunk;
            let (stop, attempts) = (Arc::clone(&stop), Arc::clone(&attempts));
            Some(ns.spawn_thread("flood", move || {
                connect_loop(target, junk, &stop, &attempts);
                Ok(())
            })?)
        }
        Attack::MemberHandshakes => {
            let config = member.clone();
            let local = (topo.node(2).ip, topo.node(2).pod_cidr.to_string());
            let counters = (
                Arc::clone(&stop),
                Arc::clone(&attempts),
                Arc::clone(&completed),
            );
            Some(topo.node(2).ns.spawn_thread("flood", move || {
                handshake_loop(&config, target, &local, &counters)
            })?)
        }
    };

    let cpu_before = process_cpu(pid).unwrap_or_default();
    let started = Instant::now();
    let mut rss_max = 0;
    let mut rotations = Vec::new();
    // One rotation per ROTATE_EVERY (legitimate handshakes of every pair at an operator's pace,
    // not back to back, so the quiet phase's CPU is a clean baseline); each bounded by its
    // own timeout.
    let mut next = started;
    while started.elapsed() < length && rotations.len() < 100 {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        next += ROTATE_EVERY;
        let rotated = Instant::now();
        rotations.push(
            fabric
                .nodeseal_store(&["keys", "rotate", "--wait", "--timeout", "60s"])
                .map(|_| rotated.elapsed())
                .map_err(|e| format!("{e:#}")),
        );
        rss_max = rss_max.max(proc_status_kb(pid, "VmRSS:").unwrap_or(0));
    }
    let wall = started.elapsed();
    let agent_cpu = process_cpu(pid)
        .unwrap_or_default()
        .saturating_sub(cpu_before);
    stop.store(true, Ordering::Relaxed);
    if let Some(flooder) = flooder {
        flooder
            .join()
            .map_err(|_| anyhow::anyhow!("the flooder panicked"))??;
    }
    let stream = stream.finish(Duration::from_millis(500))?;
    let after = handshake_counts(&fabric.metrics(topo, 0)?);
    let handshakes = after
        .iter()
        .map(|(k, v)| {
            let delta = v.saturating_sub(handshakes_before.get(k).copied().unwrap_or(0));
            (k.clone(), delta)
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    Ok(Phase {
        attack,
        wall,
        attempts: attempts.load(Ordering::Relaxed),
        completed: completed.load(Ordering::Relaxed),
        agent_cpu,
        agent_rss_max_kb: rss_max,
        handshakes,
        rotations,
        stream,
    })
}

/// `FLOODERS` threads connecting in a loop; with `junk`, each sends bytes that are not TLS and
/// waits (briefly) for the close.
fn connect_loop(target: SocketAddr, junk: bool, stop: &Arc<AtomicBool>, attempts: &Arc<AtomicU64>) {
    std::thread::scope(|scope| {
        for _ in 0..FLOODERS {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut conn) = TcpStream::connect_timeout(&target, Duration::from_secs(2))
                    else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    if junk {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = conn.write_all(&[0x5a; 512]);
                        let mut buf = [0u8; 512];
                        let _ = conn.read(&mut buf);
                    }
                }
            });
        }
    });
}

/// `FLOODERS` complete handshakes at once, in a loop, as the member whose SVID `config` holds.
fn handshake_loop(
    config: &HandshakeConfig,
    target: SocketAddr,
    (ip, pod_cidr): &(Ipv4Addr, String),
    (stop, attempts, completed): &(Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>),
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let peer = NodeName::new("node0")?;
    let pod_cidr: ipnet::IpNet = pod_cidr.parse()?;
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..FLOODERS {
            let (config, peer) = (config.clone(), peer.clone());
            let (stop, attempts, completed) = (
                Arc::clone(stop),
                Arc::clone(attempts),
                Arc::clone(completed),
            );
            let ip = *ip;
            tasks.spawn(async move {
                let mut round: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let epoch = Epoch(1_000_000 + round * FLOODERS as u64 + worker as u64);
                    let spi = 0x0200_0000
                        + u32::try_from(round % 0xffff).unwrap_or(0) * 64
                        + u32::try_from(worker).unwrap_or(0);
                    let attempt = async {
                        let stream = tokio::net::TcpStream::connect(target).await?;
                        let hello = Hello::new(
                            config.local_node().clone(),
                            epoch,
                            Spi::new(spi)?,
                            Mode::Ipsec,
                        )
                        .with_node_ips(vec![IpAddr::V4(ip)])
                        .with_pod_cidrs(vec![pod_cidr]);
                        let mut agreement =
                            handshake::initiate(&config, stream, &peer, hello).await?;
                        agreement.channel.confirm_installed(epoch).await?;
                        let _ = agreement.channel.close().await;
                        anyhow::Ok(())
                    };
                    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                        Ok(Ok(())) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        // Refused, closed or timed out: the flood goes on, as an attacker's would.
                        _ => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    });
    Ok(())
}

/// node `i`'s own credentials, read from its state directory, with the cluster's bundle.
fn member_credentials(fabric: &Fabric, i: usize) -> Result<HandshakeConfig> {
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let ca = ClusterCa::load_files(td.clone(), &fabric.dir().join("ca"))?;
    let trust = TrustStore::new(TrustBundle::new(td, vec![ca.trust_anchor().clone()]))?;
    let state = fabric.dir().join(format!("n{i}-state"));
    let key = NodeKey::from_pem(&read(&state.join("node.key"))?)?;
    let chain = certs_from_pem(&read(&state.join("node.crt"))?)?;
    Ok(HandshakeConfig::new(
        trust,
        &NodeIdentity::new(chain, key)?,
    )?)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// `nodeseal_handshakes_total{result="..."} N` lines of a scrape.
fn handshake_counts(scrape: &str) -> BTreeMap<String, u64> {
    scrape
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("nodeseal_handshakes_total{result=\"")?;
            let (result, value) = rest.split_once("\"} ")?;
            Some((result.to_owned(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

impl Phase {
    fn cpu_share(&self) -> f64 {
        self.agent_cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-6)
    }

    fn rotate_median(&self) -> Option<Duration> {
        let mut ok: Vec<Duration> = self
            .rotations
            .iter()
            .filter_map(|r| r.clone().ok())
            .collect();
        ok.sort();
        ok.get(ok.len() / 2).copied()
    }
}

impl Flood {
    pub fn table(&self) -> Result<String> {
        let Some(quiet) = self.phases.iter().find(|p| p.attack == Attack::Quiet) else {
            bail!("no quiet phase");
        };
        let base_rotate = quiet
            .rotate_median()
            .context("no rotation succeeded when quiet")?;
        let mut s = format!(
            "Handshake flood on node0 ({FLOODERS} connections at once), each phase {:.0}s with \
             `keys rotate --wait` every {}s and 500 pps pod(node1) -> pod(node0)\n",
            quiet.wall.as_secs_f64(),
            ROTATE_EVERY.as_secs()
        );
        let _ = writeln!(
            s,
            "{:<26} | {:>9} | {:>8} | {:>8} | {:>8} | {:>10} | {:>8} | {:>6}",
            "phase",
            "attempts",
            "complete",
            "CPU node0",
            "RSS MiB",
            "rotations",
            "rotate/q",
            "lost"
        );
        for p in &self.phases {
            let failed = p.rotations.iter().filter(|r| r.is_err()).count();
            let ratio = p.rotate_median().map_or_else(
                || "-".to_owned(),
                |m| {
                    format!(
                        "{:.2}x",
                        m.as_secs_f64() / base_rotate.as_secs_f64().max(1e-6)
                    )
                },
            );
            let _ = writeln!(
                s,
                "{:<26} | {:>9} | {:>8} | {:>8.0}% | {:>8.1} | {:>6} ({} x) | {:>8} | {:>6}",
                p.attack.label(),
                p.attempts,
                p.completed,
                p.cpu_share() * 100.0,
                p.agent_rss_max_kb as f64 / 1024.0,
                p.rotations.len(),
                failed,
                ratio,
                p.stream.lost
            );
        }
        for p in &self.phases {
            let _ = writeln!(
                s,
                "node0 handshakes, {}: {:?}",
                p.attack.label(),
                p.handshakes
            );
        }
        let _ = write!(
            s,
            "rotate/q: median rotation in the phase / median when quiet ({:.3}s); (n x): failed \
             rotations",
            base_rotate.as_secs_f64()
        );
        Ok(s)
    }
}
