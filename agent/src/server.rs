//! The handshake listener: TCP on the node IP, mutual TLS 1.3 through `keymgr`, then the
//! verified handshake is handed to the task of the peer the source address belongs to.
//!
//! The source address decides which node the client must be: the verifier rejects an SVID of
//! any other node (or a revoked one), and a connection from an address no peer record lists is
//! closed before TLS.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use nodeseal_keymgr::handshake::{self, HandshakeConfig};
use nodeseal_keymgr::verifier::ExpectedPeer;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::pace::Pace;
use crate::peer::{PeerCommand, PeerRegistry, error_chain};

/// Handshakes processed at once; more wait (TCP backlog), which bounds memory under a flood.
const MAX_CONCURRENT: usize = 256;
/// Handshakes processed at once from one address: a legitimate peer has at most one or two in
/// flight (a rekey crossing a retry), so a member flooding its handshake port cannot take the
/// slots every other peer needs.
const MAX_PER_SOURCE: usize = 4;

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
    let per_source = SourceLimiter::new(MAX_PER_SOURCE);
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
            warn!(%addr, "handshake from an address no node record lists; closed");
            continue;
        };
        let Some(config) = handshake_config.borrow().clone() else {
            debug!(%addr, "no identity yet; closing handshake");
            continue;
        };
        let Some(source_slot) = per_source.try_acquire(addr.ip()) else {
            metrics.handshake("throttled");
            debug!(%addr, "too many handshakes in flight from this address; closed");
            continue;
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

/// Counts the handshakes in flight per source address.
#[derive(Clone)]
struct SourceLimiter {
    max: usize,
    in_flight: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

/// One handshake's place in its source's count, given back on drop.
struct SourceSlot {
    limiter: SourceLimiter,
    source: IpAddr,
}

impl SourceLimiter {
    fn new(max: usize) -> Self {
        Self {
            max,
            in_flight: Arc::default(),
        }
    }

    /// A slot for one more handshake from `source`, unless it has `max` in flight.
    fn try_acquire(&self, source: IpAddr) -> Option<SourceSlot> {
        let mut map = self.in_flight.lock().ok()?;
        let count = map.entry(source).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            limiter: self.clone(),
            source,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.limiter.in_flight.lock()
            && let Some(count) = map.get_mut(&self.source)
        {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_gets_at_most_its_share_and_others_are_unaffected() {
        let limiter = SourceLimiter::new(2);
        let flood: IpAddr = "10.0.0.9".parse().unwrap();
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limiter.try_acquire(flood).unwrap();
        let _second = limiter.try_acquire(flood).unwrap();
        assert!(limiter.try_acquire(flood).is_none());
        let _other = limiter.try_acquire(peer).unwrap();
        // A finished handshake gives its slot back; nothing is left behind per address.
        drop(first);
        let _again = limiter.try_acquire(flood).unwrap();
        drop(_again);
        drop(_second);
        assert!(!limiter.in_flight.lock().unwrap().contains_key(&flood));
    }
}
