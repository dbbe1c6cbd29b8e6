//! Revocation: how long after `nodeseal node revoke` a revoked node is out of the fabric.
//!
//! Each run starts a fresh 4-node fabric with a 500 packets/s UDP stream each way between a pod
//! of node3 and a pod of node0, rotates the keys once (the baseline: a store change every agent
//! acts on), then revokes node3. Measured from the moment the revoke command starts: when each
//! peer's last SA with node3 was gone (polled with iproute2), and when each stream's last
//! datagram arrived (the first dropped packet follows it). The promise in the README is about a
//! second; the acceptance test only bounds it at 20 s.

use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nodeseal_netns::{Fabric, FabricOptions, Topology, UdpStream, fabric};

use super::verdict;

const NODES: usize = 4;
const REVOKED: usize = NODES - 1;
/// A stream must have been silent this long to count as cut off.
const SILENCE: Duration = Duration::from_secs(2);
/// Bound of the wait for the SAs to go.
const GONE_WITHIN: Duration = Duration::from_secs(60);
/// What the README promises.
const TARGET: Duration = Duration::from_secs(1);

/// One revocation, times from the start of `nodeseal node revoke`.
struct Run {
    cli: Duration,
    rotate: Duration,
    /// Per peer, when its last SA with the revoked node was gone.
    gone: Vec<Duration>,
    /// node3's pod -> node0's pod: after its last datagram, packets were dropped.
    from_revoked: Duration,
    /// node0's pod -> node3's pod.
    to_revoked: Duration,
    /// How long one `ip xfrm state` call took on average (the resolution of `gone`).
    one_poll: Duration,
}

/// One column of a [`Run`].
type Measure = fn(&Run) -> Duration;

pub struct Revocation {
    runs: Vec<Run>,
}

pub fn run(runs: usize) -> Result<Revocation> {
    ensure!(runs > 0, "NODESEAL_BENCH_REVOCATIONS must be at least 1");
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let run = once(i).with_context(|| format!("revocation run {}", i + 1))?;
        println!(
            "  run {}: revoke command {:.3}s; SAs gone on every peer after {:.3}s (one poll \
             {:.3}s); last datagram from node3 at {:.3}s, to node3 at {:.3}s; keys rotate --wait \
             {:.3}s",
            i + 1,
            run.cli.as_secs_f64(),
            run.last_gone().as_secs_f64(),
            run.one_poll.as_secs_f64(),
            run.from_revoked.as_secs_f64(),
            run.to_revoked.as_secs_f64(),
            run.rotate.as_secs_f64(),
        );
        out.push(run);
    }
    Ok(Revocation { runs: out })
}

impl Run {
    fn last_gone(&self) -> Duration {
        self.gone.iter().copied().max().unwrap_or_default()
    }
}

fn once(index: usize) -> Result<Run> {
    let topo = Topology::builder(&format!("brev{index}"))
        .nodes(NODES)
        .pods_per_node(1)
        .build()?;
    let fabric = Fabric::start(&topo, NODES, FabricOptions::default())?;
    let all: Vec<usize> = (0..NODES).collect();
    fabric
        .wait_established(&all, Duration::from_secs(300))
        .context("the fabric did not establish")?;
    let (revoked, survivor) = (topo.node(REVOKED), topo.node(0));
    let (rpod, spod) = (revoked.pod(0), survivor.pod(0));
    let from_revoked = UdpStream::start(
        &rpod.ns,
        &spod.ns,
        SocketAddrV4::new(spod.ip, 7200),
        500,
        Duration::from_secs(600),
    )?;
    let to_revoked = UdpStream::start(
        &spod.ns,
        &rpod.ns,
        SocketAddrV4::new(rpod.ip, 7201),
        500,
        Duration::from_secs(600),
    )?;
    let started = Instant::now();
    fabric.nodeseal_store(&["keys", "rotate", "--wait", "--timeout", "120s"])?;
    let rotate = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    for (name, stream) in [("from", &from_revoked), ("to", &to_revoked)] {
        ensure!(
            stream
                .last_arrival()
                .is_some_and(|t| t.elapsed() < Duration::from_millis(500)),
            "the stream {name} node3 is not flowing before the revocation"
        );
    }

    // One poller per peer, running before the command starts, so the resolution is one
    // `ip xfrm state` call, not a round over every peer.
    let started = Instant::now();
    let pollers: Vec<_> = (0..REVOKED)
        .map(|i| {
            let node = topo.node(i);
            let (ns, ip, revoked_ip) = (node.ns.name().to_owned(), node.ip, revoked.ip);
            std::thread::spawn(move || -> Result<(Duration, Duration)> {
                let mut calls = 0u32;
                loop {
                    calls += 1;
                    let out = Command::new("ip")
                        .args(["-n", &ns, "xfrm", "state"])
                        .output()
                        .context("running ip xfrm state")?;
                    let text = String::from_utf8_lossy(&out.stdout);
                    if fabric::esp_spis_in(&text, ip, revoked_ip).is_empty() {
                        let at = started.elapsed();
                        return Ok((at, at / calls));
                    }
                    if started.elapsed() > GONE_WITHIN {
                        bail!("SAs with node{REVOKED} still present after {GONE_WITHIN:?}");
                    }
                    // Leave the (emulated) CPUs to the agents being measured.
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();
    fabric.nodeseal_store(&["node", "revoke", &format!("node{REVOKED}")])?;
    let cli = started.elapsed();
    let mut gone = Vec::with_capacity(REVOKED);
    let mut poll = Duration::ZERO;
    for (i, poller) in pollers.into_iter().enumerate() {
        let (at, one_call) = poller
            .join()
            .map_err(|_| anyhow::anyhow!("poller of node{i} panicked"))?
            .with_context(|| format!("node{i}"))?;
        gone.push(at);
        poll = poll.max(one_call);
    }
    let silent_since = |stream: &UdpStream| stream.last_arrival().map(|t| t.elapsed());
    ensure!(
        nodeseal_netns::wait_until(Duration::from_secs(30), || {
            [&from_revoked, &to_revoked]
                .iter()
                .all(|s| silent_since(s).is_some_and(|d| d >= SILENCE))
        }),
        "a stream with the revoked node kept arriving"
    );
    let cut_at = |stream: &UdpStream| {
        stream
            .last_arrival()
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(started))
    };
    Ok(Run {
        cli,
        rotate,
        gone,
        from_revoked: cut_at(&from_revoked),
        to_revoked: cut_at(&to_revoked),
        one_poll: poll,
    })
}

impl Revocation {
    pub fn table(&self) -> String {
        let n = self.runs.len();
        let median = |mut v: Vec<Duration>| -> Duration {
            v.sort();
            v.get(v.len() / 2).copied().unwrap_or_default()
        };
        let max = |v: Vec<Duration>| v.into_iter().max().unwrap_or_default();
        let pick = |f: Measure| self.runs.iter().map(f).collect::<Vec<_>>();
        let rows: [(&str, Measure); 6] = [
            ("revoke command (wall)", |r| r.cli),
            ("first peer's SAs gone", |r| {
                r.gone.iter().copied().min().unwrap_or_default()
            }),
            ("last peer's SAs gone", Run::last_gone),
            ("last datagram node3 -> node0", |r| r.from_revoked),
            ("last datagram node0 -> node3", |r| r.to_revoked),
            ("baseline: keys rotate --wait", |r| r.rotate),
        ];
        let mut s = format!(
            "Revocation: `nodeseal node revoke node3`, {NODES}-node fabric, {n} runs, 500 pps \
             each way node3 <-> node0; seconds from the start of the revoke command\n"
        );
        let _ = writeln!(s, "{:<32} | {:>8} | {:>8}", "", "median", "max");
        for (label, f) in rows {
            let _ = writeln!(
                s,
                "{label:<32} | {:>8.3} | {:>8.3}",
                median(pick(f)).as_secs_f64(),
                max(pick(f)).as_secs_f64()
            );
        }
        let last_gone = median(pick(Run::last_gone));
        let cut = median(pick(|r| r.from_revoked.max(r.to_revoked)));
        let rotate = median(pick(|r| r.rotate));
        let _ = writeln!(
            s,
            "resolution of the SA times: one `ip xfrm state` poll per peer took {:.3}s (median); \
             the times are when the first poll that found no SA ended",
            median(pick(|r| r.one_poll)).as_secs_f64()
        );
        let _ = writeln!(
            s,
            "median last SA gone / median keys rotate --wait: {:.2}x",
            last_gone.as_secs_f64() / rotate.as_secs_f64().max(1e-6)
        );
        let _ = write!(
            s,
            "target (README): out of the fabric within ~{}s: last SA gone {}, traffic cut {} \
             (median)",
            TARGET.as_secs(),
            verdict(last_gone <= TARGET),
            verdict(cut <= TARGET)
        );
        s
    }
}
