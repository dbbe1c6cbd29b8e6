//! The handshake listener: TCP on the node IP, mutual TLS 1.3 through `keymgr`, then the
//! verified handshake is handed to the task of the peer the source address belongs to.
//!
//! The source address decides which node the client must be: the verifier rejects an SVID of
//! any other node (or a revoked one), and a connection from an address no peer record lists is
//! closed before TLS.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodeseal_keymgr::handshake::{self, HandshakeConfig};
use nodeseal_keymgr::verifier::ExpectedPeer;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::pace::Pace;
use crate::peer::{PeerCommand, PeerRegistry, error_chain};

/// Handshakes processed at once; more wait (TCP backlog), which bounds memory under a flood.
const MAX_CONCURRENT: usize = 256;

/// Accepts handshakes until cancelled.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<PeerRegistry>,
    handshake_config: watch::Receiver<Option<HandshakeConfig>>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
    let per_source = SourceLimiter::new(SOURCE_LIMITS);
    let mut unknown_sources = QuietWarning::new(QUIET_WARNING_PERIOD);
    let mut over_limits = QuietWarning::new(QUIET_WARNING_PERIOD);
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accepting a handshake connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((name, peer)) = registry.lookup(addr.ip()) else {
            metrics.handshake("refused");
            if let Some(suppressed) = unknown_sources.due(Instant::now()) {
                warn!(
                    %addr,
                    suppressed,
                    "handshake from an address no node record lists; closed (suppressed: how many \
                     more were closed since the last warning)"
                );
            }
            continue;
        };
        let Some(config) = handshake_config.borrow().clone() else {
            debug!(%addr, "no identity yet; closing handshake");
            continue;
        };
        let source_slot = match per_source.try_acquire(addr.ip(), Instant::now()) {
            Ok(slot) => slot,
            Err(throttled) => {
                metrics.handshake(throttled.label());
                if let Some(suppressed) = over_limits.due(Instant::now()) {
                    info!(
                        %addr,
                        ?throttled,
                        suppressed,
                        "handshake over this address's limits; closed (suppressed: how many more \
                         were closed since the last message)"
                    );
                }
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let metrics = Arc::clone(&metrics);
        let cancel = cancel.clone();
        // The answering side allows the most any initiator waits (see `Pace`); the per-source
        // limit above bounds what stalled connections can hold.
        let limit = Pace::MAX;
        tracker.spawn(async move {
            let _permit = permit;
            let _source_slot = source_slot;
            let accept = handshake::accept(&config, stream, ExpectedPeer::Node(name.clone()));
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                r = tokio::time::timeout(limit, accept) => r,
            };
            let command = match result {
                Ok(Ok(incoming)) => PeerCommand::Incoming(Box::new(incoming)),
                Ok(Err(e)) => {
                    metrics.handshake("refused");
                    let error = error_chain(&e);
                    warn!(peer = %name, %addr, error = %error, "refused handshake");
                    PeerCommand::HandshakeFailed { error }
                }
                Err(_) => {
                    metrics.handshake("refused");
                    PeerCommand::HandshakeFailed {
                        error: format!("incoming handshake timed out after {limit:?}"),
                    }
                }
            };
            let _ = peer.commands.send(command).await;
        });
    }
}

/// What one source address may ask of the listener: handshakes in flight, and how often a new
/// one may start (a token bucket). Only addresses of node records get this far, so the map is
/// bounded by the cluster's size.
#[derive(Clone, Copy, Debug)]
struct SourceLimits {
    in_flight: usize,
    burst: u32,
    /// One more handshake may start per `refill`, up to `burst` saved.
    refill: Duration,
}

/// A legitimate peer has at most one or two handshakes in flight (a rekey crossing a retry), so
/// a member flooding this port cannot take the slots every other peer needs. It starts one per
/// rekey, per `nodeseal keys rotate` and per retry (backoff from 0.5 s, doubling): 10 at once
/// and one every 3 s after that is far more than it needs, while a member replaying valid
/// handshakes in a loop costs this node one key agreement every 3 s instead of a core.
const SOURCE_LIMITS: SourceLimits = SourceLimits {
    in_flight: 4,
    burst: 10,
    refill: Duration::from_secs(3),
};

/// Why a source's connection was closed before TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Throttled {
    /// It already has its share of handshakes in flight.
    InFlight,
    /// It started handshakes faster than the refill allows.
    Rate,
}

impl Throttled {
    fn label(self) -> &'static str {
        match self {
            Self::InFlight => "throttled",
            Self::Rate => "rate_limited",
        }
    }
}

#[derive(Debug)]
struct SourceEntry {
    in_flight: usize,
    tokens: u32,
    refilled: Instant,
}

/// Counts the handshakes in flight and the start budget per source address.
#[derive(Clone)]
struct SourceLimiter {
    limits: SourceLimits,
    sources: Arc<std::sync::Mutex<HashMap<IpAddr, SourceEntry>>>,
}

/// One handshake's place in its source's count, given back on drop.
struct SourceSlot {
    limiter: SourceLimiter,
    source: IpAddr,
}

impl SourceLimiter {
    fn new(limits: SourceLimits) -> Self {
        Self {
            limits,
            sources: Arc::default(),
        }
    }

    /// A slot for one more handshake from `source` at `now`, unless it has its share in flight
    /// or has used its budget.
    fn try_acquire(&self, source: IpAddr, now: Instant) -> Result<SourceSlot, Throttled> {
        let limits = self.limits;
        let mut map = self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() > MAX_TRACKED_SOURCES {
            // Sources that are idle with a full budget carry no information.
            map.retain(|_, e| e.in_flight > 0 || refilled(e, limits, now).tokens < limits.burst);
        }
        let entry = map.entry(source).or_insert(SourceEntry {
            in_flight: 0,
            tokens: limits.burst,
            refilled: now,
        });
        *entry = refilled(entry, limits, now);
        if entry.in_flight >= limits.in_flight {
            return Err(Throttled::InFlight);
        }
        if entry.tokens == 0 {
            return Err(Throttled::Rate);
        }
        entry.tokens -= 1;
        entry.in_flight += 1;
        Ok(SourceSlot {
            limiter: self.clone(),
            source,
        })
    }
}

/// Sources remembered before idle ones are forgotten (more than any cluster's nodes).
const MAX_TRACKED_SOURCES: usize = 16_384;

/// `entry` with the tokens earned since it was last refilled.
fn refilled(entry: &SourceEntry, limits: SourceLimits, now: Instant) -> SourceEntry {
    let elapsed = now.saturating_duration_since(entry.refilled);
    let refill_ns = limits.refill.as_nanos().max(1);
    let earned = u32::try_from(elapsed.as_nanos() / refill_ns).unwrap_or(u32::MAX);
    if entry.tokens.saturating_add(earned) >= limits.burst {
        return SourceEntry {
            in_flight: entry.in_flight,
            tokens: limits.burst,
            refilled: now,
        };
    }
    SourceEntry {
        in_flight: entry.in_flight,
        tokens: entry.tokens + earned,
        // Keep the fraction of a token already earned.
        refilled: entry.refilled + limits.refill * earned,
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.limiter.sources.lock()
            && let Some(entry) = map.get_mut(&self.source)
        {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }
}

/// How often a flood of connections (from unknown addresses, or over an address's limits) may
/// write a log line.
const QUIET_WARNING_PERIOD: Duration = Duration::from_secs(10);

/// A log line written at most once per period, saying how many were left out in between, so a
/// flood cannot turn into a flood of log lines.
struct QuietWarning {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl QuietWarning {
    fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(left out since the last one)` when a warning is due at `now`.
    fn due(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.period)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(in_flight: usize, burst: u32) -> SourceLimits {
        SourceLimits {
            in_flight,
            burst,
            refill: Duration::from_secs(3),
        }
    }

    #[test]
    fn one_source_gets_at_most_its_share_and_others_are_unaffected() {
        let limiter = SourceLimiter::new(limits(2, 100));
        let now = Instant::now();
        let flood: IpAddr = "10.0.0.9".parse().unwrap();
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limiter.try_acquire(flood, now).unwrap();
        let _second = limiter.try_acquire(flood, now).unwrap();
        assert_eq!(
            limiter.try_acquire(flood, now).err(),
            Some(Throttled::InFlight)
        );
        let _other = limiter.try_acquire(peer, now).unwrap();
        // A finished handshake gives its slot back.
        drop(first);
        let _again = limiter.try_acquire(flood, now).unwrap();
    }

    #[test]
    fn a_source_starting_handshakes_in_a_loop_gets_one_per_refill_after_its_burst() {
        let limiter = SourceLimiter::new(limits(4, 10));
        let start = Instant::now();
        let flood: IpAddr = "10.0.0.9".parse().unwrap();
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        // Each handshake finishes at once (its slot dropped), so only the rate limits it.
        let mut started = 0;
        for i in 0..1000u32 {
            let now = start + Duration::from_millis(u64::from(i) * 10);
            match limiter.try_acquire(flood, now) {
                Ok(_slot) => started += 1,
                Err(t) => assert_eq!(t, Throttled::Rate),
            }
        }
        // 10 s of trying: the burst, then one per 3 s (at 3, 6 and 9 s).
        assert_eq!(started, 13);
        // Another member is unaffected.
        let later = start + Duration::from_secs(10);
        for _ in 0..10 {
            drop(limiter.try_acquire(peer, later).unwrap());
        }
        // A quiet source earns its whole burst back, never more.
        let rested = later + Duration::from_secs(3600);
        for _ in 0..10 {
            drop(limiter.try_acquire(flood, rested).unwrap());
        }
        assert_eq!(
            limiter.try_acquire(flood, rested).err(),
            Some(Throttled::Rate)
        );
    }

    #[test]
    fn a_warning_is_written_once_per_period_with_the_count_left_out() {
        let mut warning = QuietWarning::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(warning.due(start), Some(0));
        for i in 1..=99u64 {
            assert_eq!(warning.due(start + Duration::from_millis(i * 50)), None);
        }
        assert_eq!(warning.due(start + Duration::from_secs(10)), Some(99));
        assert_eq!(warning.due(start + Duration::from_secs(11)), None);
    }
}
