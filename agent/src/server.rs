//! The handshake listener: TCP on the node IP, mutual TLS 1.3 through `keymgr`, then the
//! verified handshake is handed to the task of the peer the source address belongs to.
//!
//! The source address decides which node the client must be: the verifier rejects an SVID of
//! any other node (or a revoked one), and a connection from an address no peer record lists is
//! closed before TLS.

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
use crate::peer::{PeerCommand, PeerRegistry, error_chain};

/// Handshakes processed at once; more wait (TCP backlog), which bounds memory under a flood.
const MAX_CONCURRENT: usize = 256;
/// TLS and Hello must complete within this.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

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
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let metrics = Arc::clone(&metrics);
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let accept = handshake::accept(&config, stream, ExpectedPeer::Node(name.clone()));
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                r = tokio::time::timeout(ACCEPT_TIMEOUT, accept) => r,
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
                        error: format!("incoming handshake timed out after {ACCEPT_TIMEOUT:?}"),
                    }
                }
            };
            let _ = peer.commands.send(command).await;
        });
    }
}
