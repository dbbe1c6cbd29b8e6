//! The HTTP endpoints of the agent (and of keymgr): `/healthz` (liveness), `/readyz` (readiness) and `/metrics`.
//!
//! Liveness answers as long as the process serves requests at all. Readiness is a set of named
//! start-up steps (cluster store, eBPF datapath, node identity); the agent is ready when none is
//! pending, and `/readyz` names the ones that are, so a pod stuck unready says why (e.g. keymgr
//! has not signed the node's CSR yet).
//!
//! A minimal HTTP/1.0 responder: the request is read (bounded) and answered, then the
//! connection closes. Probes and scrapes need nothing more.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::metrics::Metrics;

/// Start-up step: the cluster store is open and this node's record published.
pub const STEP_STORE: &str = "cluster store";
/// Start-up step: the eBPF programs are loaded and attached to the uplink.
pub const STEP_DATAPATH: &str = "eBPF datapath";
/// Start-up step: the node has its SVID and the trust bundle.
pub const STEP_IDENTITY: &str = "node identity";
/// keymgr's start-up step: the cluster CA is loaded (standalone mode).
pub const STEP_CA: &str = "cluster CA";
/// Start-up step with encryption off: what an earlier run installed is removed.
pub const STEP_REMOVED: &str = "removal of earlier kernel state";

/// Start-up steps still pending; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<Mutex<BTreeSet<&'static str>>>);

impl Readiness {
    /// Readiness that waits for `steps`.
    #[must_use]
    pub fn waiting_for(steps: &[&'static str]) -> Self {
        Self(Arc::new(Mutex::new(steps.iter().copied().collect())))
    }

    /// Marks `step` done.
    pub fn done(&self, step: &'static str) {
        if let Ok(mut pending) = self.0.lock()
            && pending.remove(step)
        {
            info!(step, still_pending = ?*pending, "start-up step done");
        }
    }

    /// Steps still pending, in a stable order.
    #[must_use]
    pub fn pending(&self) -> Vec<&'static str> {
        self.0
            .lock()
            .map(|p| p.iter().copied().collect())
            // A poisoned lock means a panic while updating it: report not ready.
            .unwrap_or_else(|_| vec!["readiness state (poisoned)"])
    }
}

/// What one listener serves.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    /// `/metrics`, when set.
    pub metrics: Option<Arc<Metrics>>,
    /// `/healthz` and `/readyz`, when set.
    pub readiness: Option<Readiness>,
}

/// Status line and body for a request whose first line is `request_line`.
fn respond(request_line: &str, endpoints: &Endpoints) -> (&'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next(), parts.next());
    if method != Some("GET") {
        return ("405 Method Not Allowed", "only GET\n".to_owned());
    }
    // Probes may add a query string; it changes nothing here.
    let path = path.map(|p| p.split('?').next().unwrap_or(p));
    match (path, &endpoints.metrics, &endpoints.readiness) {
        (Some("/metrics"), Some(metrics), _) => ("200 OK", metrics.encode()),
        (Some("/healthz"), _, Some(_)) => ("200 OK", "ok\n".to_owned()),
        (Some("/readyz"), _, Some(readiness)) => {
            let pending = readiness.pending();
            if pending.is_empty() {
                ("200 OK", "ok\n".to_owned())
            } else {
                (
                    "503 Service Unavailable",
                    format!("waiting for: {}\n", pending.join(", ")),
                )
            }
        }
        _ => ("404 Not Found", "not found\n".to_owned()),
    }
}

/// Clients answered at once; more are closed at accept. Probes and a scrape need a few.
const MAX_CLIENTS: usize = 16;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `endpoints` on `listener` until cancelled.
///
/// Each client is answered in its own task, so a client slow to send its request (a stalled
/// scraper, or any client on a machine under load) never delays the kubelet's probes.
pub async fn serve(listener: TcpListener, endpoints: Endpoints, cancel: CancellationToken) {
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else {
            continue;
        };
        let Ok(permit) = Arc::clone(&clients).try_acquire_owned() else {
            debug!(%peer, "too many HTTP clients at once; closed");
            continue;
        };
        let endpoints = endpoints.clone();
        // Bounded by the request timeout and the permit; nothing to wait for at shutdown.
        tokio::spawn(async move {
            let _permit = permit;
            answer(stream, peer, &endpoints).await;
        });
    }
}

async fn answer(mut stream: tokio::net::TcpStream, peer: SocketAddr, endpoints: &Endpoints) {
    let mut buf = [0u8; 2048];
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        _ => return,
    };
    let (status, body) = respond(request.lines().next().unwrap_or(""), endpoints);
    let response = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(response.as_bytes()).await {
        debug!(%peer, error = %e, "HTTP client went away");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> (Endpoints, Readiness) {
        let readiness = Readiness::waiting_for(&[STEP_STORE, STEP_IDENTITY]);
        let endpoints = Endpoints {
            metrics: Some(Arc::new(Metrics::new())),
            readiness: Some(readiness.clone()),
        };
        (endpoints, readiness)
    }

    #[test]
    fn readyz_names_pending_steps_until_all_are_done() {
        let (endpoints, readiness) = both();
        let (status, body) = respond("GET /readyz HTTP/1.1", &endpoints);
        assert_eq!(status, "503 Service Unavailable");
        assert_eq!(body, "waiting for: cluster store, node identity\n");
        readiness.done(STEP_STORE);
        let (_, body) = respond("GET /readyz HTTP/1.1", &endpoints);
        assert_eq!(body, "waiting for: node identity\n");
        readiness.done(STEP_IDENTITY);
        assert_eq!(
            respond("GET /readyz?verbose HTTP/1.1", &endpoints).0,
            "200 OK"
        );
    }

    #[test]
    fn healthz_answers_while_not_ready() {
        let (endpoints, _) = both();
        assert_eq!(
            respond("GET /healthz HTTP/1.1", &endpoints),
            ("200 OK", "ok\n".to_owned())
        );
    }

    #[test]
    fn metrics_and_unknown_paths() {
        let (endpoints, _) = both();
        let (status, body) = respond("GET /metrics HTTP/1.1", &endpoints);
        assert_eq!(status, "200 OK");
        assert!(body.contains("nodeseal_peers"), "{body}");
        assert_eq!(
            respond("GET /other HTTP/1.1", &endpoints).0,
            "404 Not Found"
        );
        assert_eq!(
            respond("POST /readyz HTTP/1.1", &endpoints).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("", &endpoints).0, "405 Method Not Allowed");
    }

    #[test]
    fn a_listener_serves_only_what_it_was_given() {
        let metrics_only = Endpoints {
            metrics: Some(Arc::new(Metrics::new())),
            readiness: None,
        };
        assert_eq!(
            respond("GET /readyz HTTP/1.1", &metrics_only).0,
            "404 Not Found"
        );
        let health_only = Endpoints {
            metrics: None,
            readiness: Some(Readiness::default()),
        };
        assert_eq!(
            respond("GET /metrics HTTP/1.1", &health_only).0,
            "404 Not Found"
        );
        assert_eq!(respond("GET /readyz HTTP/1.1", &health_only).0, "200 OK");
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (endpoints, _) = both();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, endpoints, cancel.clone()));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.0 503"), "{response}");
        assert!(
            response.ends_with("waiting for: cluster store, node identity\n"),
            "{response}"
        );
        cancel.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_up_a_probe() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (endpoints, _) = both();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, endpoints, cancel.clone()));
        let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        probe
            .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        probe.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.0 200"), "{response}");
        // Answered while the silent client is still waited for: had the server handled one
        // client at a time, it would have given up on (and closed) the silent one first.
        let mut buf = [0u8; 1];
        assert!(
            matches!(silent.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the silent connection is still open and unanswered"
        );
        cancel.cancel();
        server.await.unwrap();
    }
}
