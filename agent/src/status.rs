//! The local status API: a Unix socket answering one JSON document per connection, read by
//! `nodeseal status`. It carries what an operator needs to debug one node: identity and expiry,
//! one row per peer, the kernel's XFRM error counters and the datapath's drop counters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::peer::PeerStatus;

/// Largest status document a client accepts.
const MAX_RESPONSE: usize = 16 << 20;

/// Errors of the status API.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Binding the socket failed.
    #[error("binding status socket {path}")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the agent failed.
    #[error("reading status from {path} (is nodeseal-agent running?)")]
    Connect {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent's answer was not a status document.
    #[error("malformed status document from {path}")]
    Decode {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The status of one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    /// Node name.
    pub node: String,
    /// Encryption mode.
    pub mode: String,
    /// Strict mode.
    pub strict: bool,
    /// SPIFFE ID of the node's SVID, once it has one.
    pub spiffe_id: Option<String>,
    /// When the SVID expires (Unix seconds).
    pub svid_not_after_unix: Option<u64>,
    /// The cluster rekey generation this node has seen.
    pub generation: u64,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Non-zero `/proc/net/xfrm_stat` counters.
    pub xfrm_errors: BTreeMap<String, u64>,
    /// eBPF drop counters by reason.
    pub datapath_drops: BTreeMap<String, u64>,
    /// Nodes whose record is unusable (no peer is set up for them), with the reason, e.g. a
    /// Node object without a pod CIDR.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unusable_nodes: BTreeMap<String, String>,
    /// Why the trust bundle in the store was refused (the node keeps its previous one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle_error: Option<String>,
    /// Identity policy: endpoints, identities, policies (encryption on only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy_engine::PolicyView>,
}

/// Produces the current status.
#[async_trait::async_trait]
pub trait StatusSource: Send + Sync + 'static {
    /// A fresh snapshot.
    async fn snapshot(&self) -> NodeView;
}

/// Serves the status socket until cancelled. A stale socket file from a previous agent is
/// replaced.
///
/// # Errors
/// [`StatusError::Bind`].
pub fn bind(path: &Path) -> Result<UnixListener, StatusError> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| StatusError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Answers each connection with one JSON document.
pub async fn serve(
    listener: UnixListener,
    source: Arc<dyn StatusSource>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let view = source.snapshot().await;
        let body = serde_json::to_vec(&view).unwrap_or_default();
        let write = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&body)).await;
        if !matches!(write, Ok(Ok(()))) {
            debug!("status client went away");
        }
    }
}

/// Reads the status of the agent listening on `path`.
///
/// # Errors
/// [`StatusError::Connect`] or [`StatusError::Decode`].
pub async fn fetch(path: &Path) -> Result<NodeView, StatusError> {
    let connect_err = |source| StatusError::Connect {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(connect_err)?;
    let mut body = Vec::new();
    let mut limited = (&mut stream).take(MAX_RESPONSE as u64);
    tokio::time::timeout(Duration::from_secs(10), limited.read_to_end(&mut body))
        .await
        .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
        .map_err(connect_err)?;
    serde_json::from_slice(&body).map_err(|source| StatusError::Decode {
        path: path.to_owned(),
        source,
    })
}

/// Renders a status document for people.
#[must_use]
pub fn render(view: &NodeView) -> String {
    let mut out = format!(
        "node {}  mode {}{}  generation {}\n",
        view.node,
        view.mode,
        if view.strict { " (strict)" } else { "" },
        view.generation
    );
    match (&view.spiffe_id, view.svid_not_after_unix) {
        (Some(id), Some(exp)) => {
            out.push_str(&format!("identity {id}  expires {}\n", unix_to_text(exp)))
        }
        _ => out.push_str("identity (none yet)\n"),
    }
    out.push_str(&format!(
        "{:<16} {:<15} {:<11} {:>14} {:>4} {:>10} {:>10} {:>9} {:>9} {:>6}  {}\n",
        "PEER",
        "IP",
        "STATE",
        "EPOCH",
        "SLOT",
        "OUT SPI",
        "IN SPI",
        "PKTS OUT",
        "PKTS IN",
        "FAILS",
        "LAST ERROR"
    ));
    for p in &view.peers {
        out.push_str(&format!(
            "{:<16} {:<15} {:<11} {:>14} {:>4} {:>10} {:>10} {:>9} {:>9} {:>6}  {}\n",
            p.name,
            p.ip.to_string(),
            format!("{:?}", p.state).to_lowercase(),
            p.epoch
                .map_or("-".into(), |e| format!("{}.{}", e >> 32, e & 0xffff_ffff)),
            p.slot.map_or("-".into(), |s| s.to_string()),
            p.out_spi.clone().unwrap_or_else(|| "-".into()),
            p.in_spi.clone().unwrap_or_else(|| "-".into()),
            p.out_packets,
            p.in_packets,
            p.failures,
            p.last_error.clone().unwrap_or_default(),
        ));
    }
    for (node, reason) in &view.unusable_nodes {
        out.push_str(&format!("unusable node {node}: {reason}\n"));
    }
    if let Some(error) = &view.trust_bundle_error {
        out.push_str(&format!("trust bundle in the store refused: {error}\n"));
    }
    if !view.xfrm_errors.is_empty() {
        out.push_str("xfrm errors:");
        for (k, v) in &view.xfrm_errors {
            out.push_str(&format!(" {k}={v}"));
        }
        out.push('\n');
    }
    if !view.datapath_drops.is_empty() {
        out.push_str("datapath drops:");
        for (k, v) in &view.datapath_drops {
            out.push_str(&format!(" {k}={v}"));
        }
        out.push('\n');
    }
    if let Some(policy) = &view.policy {
        render_policy(&mut out, policy);
    }
    out
}

fn render_policy(out: &mut String, policy: &crate::policy_engine::PolicyView) {
    out.push_str(&format!(
        "identity policy: {} documents, {} table entries, {} identities\n",
        policy.policies.len(),
        policy.table_entries,
        policy.identities.len()
    ));
    if !policy.endpoints.is_empty() {
        out.push_str(&format!(
            "{:<28} {:>8} {:<8} {:<8} {:<16} {:<12} {}\n",
            "ENDPOINT", "IDENTITY", "INGRESS", "EGRESS", "IPS", "INTERFACE", "STATE / LABELS"
        ));
    }
    let on_off = |b: bool| if b { "enforced" } else { "-" };
    for e in &policy.endpoints {
        let ips: Vec<String> = e.ips.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "{:<28} {:>8} {:<8} {:<8} {:<16} {:<12} {}  {}\n",
            e.name,
            e.identity.map_or("-".into(), |i| i.to_string()),
            on_off(e.ingress),
            on_off(e.egress),
            ips.join(","),
            if e.interface.is_empty() {
                "-"
            } else {
                &e.interface
            },
            e.state,
            e.labels,
        ));
    }
    for (key, why) in &policy.refused {
        out.push_str(&format!("refused {key}: {why}\n"));
    }
    if let Some(error) = &policy.error {
        out.push_str(&format!(
            "policy not programmed (previous policy kept): {error}\n"
        ));
    }
}

fn unix_to_text(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if secs >= now {
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(secs - now))
        )
    } else {
        format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(now - secs))
        )
    }
}
