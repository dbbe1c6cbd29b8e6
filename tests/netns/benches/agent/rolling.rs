//! Rolling restart (issue 16): after convergence, every simulated peer "restarts" once, the
//! restarts spread evenly over a window, as when a DaemonSet rolls through the cluster.
//!
//! A restarted peer's agent has no keys with ours and, its name sorting after ours, is not the
//! preferred initiator: it waits [`RESPONDER_PATIENCE`](nodeseal_agent) for a handshake that
//! does not come (ours does not know it restarted) and then initiates itself. The load
//! generator plays that part: at peer `i`'s slot `window * i / n` it connects from the peer's
//! node IP to the agent's handshake port and runs the initiator side (mutual TLS 1.3, Hello with
//! a fresh epoch and SPI, `Installed`), retrying a refused or failed attempt with the agent's
//! own backoff (0.5 s, doubling, at most [`ATTEMPTS`] attempts).
//!
//! Measured: time from the first slot until the last peer is keyed again (time-to-all-keyed,
//! against the window itself, its floor), and per peer the wait from its slot until its keys
//! were confirmed (median, 99th percentile, longest), with the agent's CPU over the phase.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nodeseal_keymgr::handshake;
use nodeseal_keymgr::{Epoch, Hello, Mode, NodeName, WgPublicKey};

use super::{AGENT_IP, HANDSHAKE_PORT, PEER_HANDSHAKE_TIMEOUT, PeerCreds};

/// Attempts one restarted peer makes before it is counted as never keyed.
const ATTEMPTS: u32 = 6;
/// First retry delay (the agent's own first backoff); doubles per attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Starts a rolling restart in the load generator.
pub struct Start {
    /// The slots (spread evenly over the window) and what was seen; shared with the bench's main thread.
    pub stats: Arc<Stats>,
}

/// What the rolling restart saw.
pub struct Stats {
    /// When the first slot fell due.
    pub started: Instant,
    /// Per peer (by index): its slot and when its keys were confirmed.
    slots: Vec<Instant>,
    done: Mutex<Vec<Option<Instant>>>,
    pub completed: AtomicUsize,
    /// Attempts beyond each peer's first.
    pub retries: AtomicUsize,
    /// Peers that were still not keyed after [`ATTEMPTS`] attempts.
    pub gave_up: AtomicUsize,
    pub failures: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    /// Slots for `n` peers over `window`, the first one `lead` from now (time for the load
    /// generator to spawn the restarts).
    pub fn new(n: usize, window: Duration, lead: Duration) -> Self {
        let started = Instant::now() + lead;
        let slots = (0..n)
            .map(|i| started + window.mul_f64(i as f64 / n.max(1) as f64))
            .collect();
        Self {
            started,
            slots,
            done: Mutex::new(vec![None; n]),
            completed: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            gave_up: AtomicUsize::new(0),
            failures: Mutex::default(),
        }
    }

    fn success(&self, index: usize) {
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

    /// (time-to-all-keyed from the first slot, every completed peer's wait from its slot,
    /// sorted).
    pub fn waits(&self) -> (Duration, Vec<Duration>) {
        let done = self.done.lock().map(|d| d.clone()).unwrap_or_default();
        let mut last = self.started;
        let mut waits = Vec::with_capacity(done.len());
        for (slot, done) in self.slots.iter().zip(done) {
            if let Some(done) = done {
                last = last.max(done);
                waits.push(done.saturating_duration_since(*slot));
            }
        }
        waits.sort();
        (last.saturating_duration_since(self.started), waits)
    }
}

/// Spawns one restart per peer at its slot (on the load generator's runtime, in its namespace).
pub fn spawn(
    start: &Start,
    peers: &Arc<HashMap<Ipv4Addr, PeerCreds>>,
    agent: &NodeName,
    mode: Mode,
) {
    for (&ip, peer) in peers.iter() {
        let Some(&slot) = start.stats.slots.get(peer.index) else {
            continue;
        };
        let (peers, stats, agent) = (Arc::clone(peers), Arc::clone(&start.stats), agent.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(slot.into()).await;
            let Some(peer) = peers.get(&ip) else { return };
            restart(peer, &agent, mode, &stats).await;
        });
    }
}

/// One restarted peer: initiate until keyed, at most [`ATTEMPTS`] times.
async fn restart(peer: &PeerCreds, agent: &NodeName, mode: Mode, stats: &Stats) {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        match tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, initiate(peer, agent, mode)).await {
            Ok(Ok(())) => {
                stats.success(peer.index);
                return;
            }
            Ok(Err(e)) => stats.failure(format!("{e:#}")),
            Err(_) => stats.failure(format!("no answer within {PEER_HANDSHAKE_TIMEOUT:?}")),
        }
    }
    stats.gave_up.fetch_add(1, Ordering::Relaxed);
}

/// The initiator side of one key agreement, as `peer`, from its node IP.
async fn initiate(peer: &PeerCreds, agent: &NodeName, mode: Mode) -> Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::from((peer.ip, 0)))
        .with_context(|| format!("binding {}", peer.ip))?;
    let stream = socket
        .connect(SocketAddr::from((AGENT_IP, HANDSHAKE_PORT)))
        .await
        .context("connect")?;
    stream.set_nodelay(true)?;
    // A restarted agent's epoch: later than any it used before (the agent's own rule is the
    // clock; the last epoch + 1 keeps it increasing within the same second).
    let last = peer.epoch.load(Ordering::Relaxed);
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        & 0xffff_ffff;
    let epoch = Epoch(last.saturating_add(1).max(clock));
    let mut hello = Hello::new(peer.name.clone(), epoch, super::next_spi(peer)?, mode)
        .with_node_ips(vec![std::net::IpAddr::V4(peer.ip)])
        .with_pod_cidrs(vec![peer.pod_cidr]);
    if mode == Mode::Wireguard {
        hello = hello.with_wg_public_key(WgPublicKey(*peer.wg_key.public_key().as_bytes()));
    }
    let mut agreement = handshake::initiate(&peer.config, stream, agent, hello)
        .await
        .context("initiate")?;
    ensure!(
        agreement.peer_hello.epoch == epoch,
        "the agent answered epoch {} to {epoch}",
        agreement.peer_hello.epoch
    );
    if mode == Mode::Wireguard {
        super::prove_wg_possession(peer, &mut agreement).await?;
    }
    agreement
        .channel
        .confirm_installed(epoch)
        .await
        .context("Installed exchange")?;
    let _ = agreement.channel.close().await;
    peer.epoch.store(epoch.0, Ordering::Relaxed);
    Ok(())
}

/// Percentile `p` (0..=100) of sorted `values`.
pub fn percentile(values: &[Duration], p: usize) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let i = (values.len() * p / 100).min(values.len() - 1);
    values[i]
}
