//! The local status API: a Unix socket, read by `nodeseal status` and `nodeseal observe`. It
//! carries what an operator needs to debug one node: identity and expiry, one row per peer, the
//! kernel's XFRM error counters and the datapath's drop counters; and the flow stream.
//!
//! Protocol: the client writes one JSON request line, at most [`MAX_REQUEST`] bytes, within
//! [`REQUEST_TIMEOUT`]:
//! - `{"status":{}}`: the server answers one JSON [`NodeView`] document and closes.
//! - `{"observe":{...}}` ([`ObserveRequest`]): the server answers newline-delimited
//!   [`ObserveLine`]s: the matching history, then with `"follow":true` every new matching flow
//!   until the client closes the connection.
//!
//! A bad request is answered with one line `{"error":{"message":"..."}}`. A client that sends
//! nothing at all for [`LEGACY_GRACE`] (or closes its side at once) is answered the status
//! document, as before requests existed, so older `nodeseal status` binaries keep working.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::observe::{ObserveHub, ObserveLine, ObserveRequest};
use crate::peer::PeerStatus;

/// Largest status document a client accepts.
const MAX_RESPONSE: usize = 16 << 20;
/// Longest request line the server reads.
pub const MAX_REQUEST: usize = 4096;
/// How long a client has to send its whole request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A client silent this long from the start is answered the status (clients from before the
/// request line).
pub const LEGACY_GRACE: Duration = Duration::from_secs(1);
/// Connections served at once; more are refused with an error line.
const MAX_CLIENTS: usize = 64;
/// How long the status document may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The agent refused the request.
    #[error("the agent at {path} refused the request: {message}")]
    Refused {
        /// Path.
        path: PathBuf,
        /// The agent's message.
        message: String,
    },
}

/// Why a request line was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Longer than [`MAX_REQUEST`] without a newline.
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    /// Not complete within [`REQUEST_TIMEOUT`].
    #[error("request not received within {REQUEST_TIMEOUT:?}")]
    Timeout,
    /// Not a request.
    #[error(
        "bad request: {source}; expected one JSON line such as {{\"status\":{{}}}} or \
         {{\"observe\":{{\"follow\":true}}}}"
    )]
    Parse {
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// Reading failed.
    #[error("reading the request")]
    Io(#[source] std::io::Error),
}

/// What a client asks for (one JSON line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The node's status document.
    Status {},
    /// Flow records.
    Observe(ObserveRequest),
}

impl Request {
    /// The request as one line, newline included.
    #[must_use]
    pub fn to_line(&self) -> Vec<u8> {
        // Serialising these plain structs cannot fail; an empty line would be refused clearly.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
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
    /// Traffic between node IPs goes through the tunnel too (`--node-encryption`).
    #[serde(default)]
    pub node_encryption: bool,
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
    /// This node's WireGuard public key (base64), in WireGuard mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_public_key: Option<String>,
    /// The uplink's MTU and the largest pod packet the tunnel carries whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_mtu: Option<crate::mtu::PodMtu>,
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

/// Serves connections until cancelled, each on its own task (at most [`MAX_CLIENTS`]); `observe`
/// is `None` when there is no datapath to observe.
pub async fn serve(
    listener: UnixListener,
    source: Arc<dyn StatusSource>,
    observe: Option<ObserveHub>,
    cancel: CancellationToken,
) {
    // Connection tasks live in this set: they end with it when the server is cancelled.
    let mut clients = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let (reader, mut writer) = stream.into_split();
        if clients.len() >= MAX_CLIENTS {
            let message = format!("too many clients (at most {MAX_CLIENTS}); try again later");
            let _ =
                tokio::time::timeout(Duration::from_secs(1), refuse(&mut writer, message)).await;
            continue;
        }
        clients.spawn(handle(
            reader,
            writer,
            Arc::clone(&source),
            observe.clone(),
            cancel.child_token(),
        ));
    }
    clients.shutdown().await;
}

/// Answers one connection.
pub async fn handle<R, W>(
    mut reader: R,
    mut writer: W,
    source: Arc<dyn StatusSource>,
    observe: Option<ObserveHub>,
    cancel: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let request = match read_request(&mut reader).await {
        Ok(request) => request,
        Err(e) => {
            debug!(error = %e, "refused a status socket request");
            refuse(&mut writer, e.to_string()).await;
            return;
        }
    };
    match request {
        Request::Status {} => {
            let view = source.snapshot().await;
            let mut body = serde_json::to_vec(&view).unwrap_or_default();
            body.push(b'\n');
            let write = tokio::time::timeout(WRITE_TIMEOUT, async {
                writer.write_all(&body).await?;
                writer.shutdown().await
            })
            .await;
            if !matches!(write, Ok(Ok(()))) {
                debug!("status client went away");
            }
        }
        Request::Observe(request) => {
            let Some(hub) = observe else {
                refuse(
                    &mut writer,
                    "observe is not available: this agent runs no eBPF datapath (encryption off)"
                        .to_owned(),
                )
                .await;
                return;
            };
            if let Err(e) = request.validate() {
                refuse(&mut writer, e.to_string()).await;
                return;
            }
            if let Err(e) =
                crate::observe::stream_flows(&hub, &request, reader, writer, cancel).await
            {
                debug!(error = %e, "observe client went away");
            }
        }
    }
}

async fn refuse<W: AsyncWrite + Unpin>(writer: &mut W, message: String) {
    let _ = crate::observe::write_line(writer, &ObserveLine::Error { message }).await;
    let _ = writer.shutdown().await;
}

/// Reads the request line: bounded in length ([`MAX_REQUEST`]) and time ([`REQUEST_TIMEOUT`]).
/// A client that stays silent for [`LEGACY_GRACE`] or closes its side without a byte asks for
/// the status (the protocol before request lines).
///
/// # Errors
/// [`RequestError`].
pub async fn read_request<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Request, RequestError> {
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let mut line = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let first = match tokio::time::timeout(LEGACY_GRACE, reader.read(&mut chunk)).await {
        Err(_) | Ok(Ok(0)) => return Ok(Request::Status {}),
        Ok(Err(e)) => return Err(RequestError::Io(e)),
        Ok(Ok(n)) => n,
    };
    line.extend_from_slice(chunk.get(..first).unwrap_or_default());
    // Every pass adds at least one byte or ends, and the line is capped: bounded.
    loop {
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > MAX_REQUEST {
            return Err(RequestError::TooLong);
        }
        let read = tokio::time::timeout_at(deadline, reader.read(&mut chunk))
            .await
            .map_err(|_| RequestError::Timeout)?
            .map_err(RequestError::Io)?;
        if read == 0 {
            // The client closed its side after a request without a newline.
            break;
        }
        line.extend_from_slice(chunk.get(..read).unwrap_or_default());
    }
    if line.len() > MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    serde_json::from_slice(&line).map_err(|source| RequestError::Parse { source })
}

/// Reads the status of the agent listening on `path`.
///
/// # Errors
/// [`StatusError::Connect`], [`StatusError::Refused`] or [`StatusError::Decode`].
pub async fn fetch(path: &Path) -> Result<NodeView, StatusError> {
    let connect_err = |source| StatusError::Connect {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(connect_err)?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        stream.write_all(&Request::Status {}.to_line()).await?;
        let mut limited = (&mut stream).take(MAX_RESPONSE as u64);
        limited.read_to_end(&mut body).await
    })
    .await
    .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
    .map_err(connect_err)?;
    serde_json::from_slice(&body).map_err(|source| {
        match serde_json::from_slice::<ObserveLine>(&body) {
            Ok(ObserveLine::Error { message }) => StatusError::Refused {
                path: path.to_owned(),
                message,
            },
            _ => StatusError::Decode {
                path: path.to_owned(),
                source,
            },
        }
    })
}

/// Renders a status document for people.
#[must_use]
pub fn render(view: &NodeView) -> String {
    let mut out = format!(
        "node {}  mode {}{}{}  generation {}\n",
        view.node,
        view.mode,
        if view.strict { " (strict)" } else { "" },
        if view.node_encryption {
            " (node encryption)"
        } else {
            ""
        },
        view.generation
    );
    match (&view.spiffe_id, view.svid_not_after_unix) {
        (Some(id), Some(exp)) => {
            out.push_str(&format!("identity {id}  expires {}\n", unix_to_text(exp)))
        }
        _ => out.push_str("identity (none yet)\n"),
    }
    if let Some(mtu) = view.pod_mtu {
        out.push_str(&format!(
            "mtu uplink {}  pods {} (the largest pod MTU that needs no path-MTU discovery)\n",
            mtu.uplink, mtu.pod
        ));
    }
    if view.mode == "wireguard" {
        render_wireguard_peers(&mut out, &view.peers);
    } else {
        render_ipsec_peers(&mut out, &view.peers);
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

fn render_epoch(epoch: Option<u64>) -> String {
    epoch.map_or("-".into(), |e| format!("{}.{}", e >> 32, e & 0xffff_ffff))
}

fn render_ipsec_peers(out: &mut String, peers: &[PeerStatus]) {
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
    for p in peers {
        out.push_str(&format!(
            "{:<16} {:<15} {:<11} {:>14} {:>4} {:>10} {:>10} {:>9} {:>9} {:>6}  {}\n",
            p.name,
            p.ip.to_string(),
            format!("{:?}", p.state).to_lowercase(),
            render_epoch(p.epoch),
            p.slot.map_or("-".into(), |s| s.to_string()),
            p.out_spi.clone().unwrap_or_else(|| "-".into()),
            p.in_spi.clone().unwrap_or_else(|| "-".into()),
            p.out_packets,
            p.in_packets,
            p.failures,
            p.last_error.clone().unwrap_or_default(),
        ));
    }
}

/// WireGuard mode's peer rows: no SPIs or packet counts, but what the device holds for the
/// peer (latest handshake, endpoint, allowed IPs, bytes) and the epoch of its preshared key.
fn render_wireguard_peers(out: &mut String, peers: &[PeerStatus]) {
    out.push_str(&format!(
        "{:<16} {:<15} {:<11} {:>14} {:>14} {:<16} {:<21} {:<18} {:>10} {:>10} {:>6}  {}\n",
        "PEER",
        "IP",
        "STATE",
        "EPOCH",
        "PSK EPOCH",
        "HANDSHAKE",
        "ENDPOINT",
        "ALLOWED IPS",
        "BYTES OUT",
        "BYTES IN",
        "FAILS",
        "LAST ERROR"
    ));
    for p in peers {
        let allowed: Vec<String> = p.wg_allowed_ips.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "{:<16} {:<15} {:<11} {:>14} {:>14} {:<16} {:<21} {:<18} {:>10} {:>10} {:>6}  {}\n",
            p.name,
            p.ip.to_string(),
            format!("{:?}", p.state).to_lowercase(),
            render_epoch(p.epoch),
            render_epoch(p.wg_psk_epoch),
            p.wg_latest_handshake_unix
                .map_or_else(|| "never".into(), unix_to_text),
            p.wg_endpoint.map_or("-".into(), |e| e.to_string()),
            if allowed.is_empty() {
                "-".into()
            } else {
                allowed.join(",")
            },
            p.out_bytes,
            p.in_bytes,
            p.failures,
            p.last_error.clone().unwrap_or_default(),
        ));
    }
}

fn render_policy(out: &mut String, policy: &crate::policy_engine::PolicyView) {
    out.push_str(&format!(
        "identity policy: {} documents, {} table entries, {} identities\n",
        policy.policies.len(),
        policy.table_entries,
        policy.identities
    ));
    if let Some(w) = &policy.last_writes {
        out.push_str(&format!(
            "  last change wrote: {} policy table slots for {} changed rules{}, {} ipcache and {} \
             endpoint entries\n",
            w.table_slots,
            w.rules_changed,
            if w.table_rebuilt {
                " (table rebuilt)"
            } else {
                ""
            },
            w.ipcache,
            w.endpoints
        ));
    }
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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncBufReadExt;

    use super::*;
    use crate::observe::Verdict;

    struct Fixed;

    #[async_trait::async_trait]
    impl StatusSource for Fixed {
        async fn snapshot(&self) -> NodeView {
            NodeView {
                node: "node-a".into(),
                mode: "ipsec".into(),
                strict: true,
                node_encryption: false,
                spiffe_id: None,
                svid_not_after_unix: None,
                generation: 3,
                peers: Vec::new(),
                xfrm_errors: BTreeMap::new(),
                datapath_drops: BTreeMap::new(),
                unusable_nodes: BTreeMap::new(),
                trust_bundle_error: None,
                wg_public_key: None,
                pod_mtu: None,
                policy: None,
            }
        }
    }

    #[tokio::test]
    async fn wireguard_mode_renders_what_the_device_holds() {
        let mut view = Fixed.snapshot().await;
        view.mode = "wireguard".into();
        let name = nodeseal_keymgr::NodeName::new("node2").expect("name");
        let mut row = PeerStatus::connecting(
            &name,
            "10.0.0.2".parse().expect("ip"),
            nodeseal_bpf::NodeId(3),
        );
        row.epoch = Some((1 << 32) | 5);
        row.wg_psk_epoch = Some((1 << 32) | 5);
        row.wg_endpoint = Some("10.0.0.2:51871".parse().expect("endpoint"));
        row.wg_allowed_ips = vec!["10.244.2.0/24".parse().expect("cidr")];
        (row.out_bytes, row.in_bytes) = (2000, 1000);
        view.peers.push(row.clone());
        let text = render(&view);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[2].contains("PSK EPOCH") && lines[2].contains("HANDSHAKE"),
            "{text}"
        );
        assert!(!lines[2].contains("SPI"), "{text}");
        for part in [
            "node2",
            "1.5",
            "never",
            "10.0.0.2:51871",
            "10.244.2.0/24",
            "2000",
            "1000",
        ] {
            assert!(lines[3].contains(part), "{part} in {text}");
        }
        row.wg_latest_handshake_unix = Some(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs()
                - 30,
        );
        view.peers = vec![row];
        let text = render(&view);
        assert!(text.contains("30s ago"), "{text}");
        // IPsec mode keeps its SPI columns.
        view.mode = "ipsec".into();
        assert!(render(&view).contains("OUT SPI"));
    }

    async fn parse(bytes: &[u8]) -> Result<Request, RequestError> {
        let mut reader = bytes;
        read_request(&mut reader).await
    }

    #[tokio::test]
    async fn request_lines_parse() {
        assert_eq!(
            parse(b"{\"status\":{}}\n").await.expect("status"),
            Request::Status {}
        );
        let observe = parse(b"{\"observe\":{\"follow\":true,\"verdict\":\"dropped\"}}\n")
            .await
            .expect("observe");
        let Request::Observe(observe) = observe else {
            panic!("not observe: {observe:?}");
        };
        assert!(observe.follow);
        assert_eq!(observe.verdict, Some(Verdict::Dropped));
        // Without a newline, ended by the client closing its side.
        assert_eq!(
            parse(b"{\"observe\":{}}").await.expect("no newline"),
            Request::Observe(ObserveRequest::default())
        );
        // Nothing at all (a client from before requests, closing its side): the status.
        assert_eq!(parse(b"").await.expect("empty"), Request::Status {});
        // What the client helpers send round-trips.
        let request = Request::Observe(ObserveRequest {
            port: Some(80),
            ..ObserveRequest::default()
        });
        assert_eq!(parse(&request.to_line()).await.expect("line"), request);
    }

    #[tokio::test]
    async fn bad_requests_are_refused_with_a_reason() {
        for bad in [
            &b"hello\n"[..],
            b"{\"stats\":{}}\n",
            b"{\"status\":{},\"observe\":{}}\n",
            b"{\"observe\":{\"since\":5}}\n",
            b"{\"observe\":{\"port\":-1}}\n",
            b"\xff\xfe\n",
        ] {
            let err = parse(bad).await.expect_err("refused");
            assert!(matches!(err, RequestError::Parse { .. }), "{bad:?}: {err}");
            assert!(err.to_string().contains("expected one JSON line"), "{err}");
        }
        let long = vec![b' '; MAX_REQUEST + 10];
        assert!(matches!(parse(&long).await, Err(RequestError::TooLong)));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_means_status_and_a_stalled_request_times_out() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let silent = tokio::spawn(async move { read_request(&mut server).await });
        tokio::time::sleep(LEGACY_GRACE + Duration::from_millis(10)).await;
        assert_eq!(
            silent.await.expect("task").expect("status"),
            Request::Status {}
        );
        client.shutdown().await.expect("shutdown");

        let (mut client, mut server) = tokio::io::duplex(64);
        let stalled = tokio::spawn(async move { read_request(&mut server).await });
        client.write_all(b"{\"obs").await.expect("write");
        tokio::time::sleep(REQUEST_TIMEOUT + Duration::from_millis(10)).await;
        assert!(matches!(
            stalled.await.expect("task"),
            Err(RequestError::Timeout)
        ));
        drop(client);
    }

    async fn exchange(request: &[u8], observe: Option<ObserveHub>) -> Vec<String> {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (reader, writer) = tokio::io::split(server);
        client.write_all(request).await.expect("request");
        handle(
            reader,
            writer,
            Arc::new(Fixed),
            observe,
            CancellationToken::new(),
        )
        .await;
        let mut lines = tokio::io::BufReader::new(client).lines();
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.expect("line") {
            out.push(line);
        }
        out
    }

    #[tokio::test]
    async fn each_request_gets_its_answer() {
        let status = exchange(b"{\"status\":{}}\n", None).await;
        assert_eq!(status.len(), 1);
        let view: NodeView = serde_json::from_str(&status[0]).expect("status document");
        assert_eq!(view.node, "node-a");

        let refused = exchange(b"nonsense\n", None).await;
        let line: ObserveLine = serde_json::from_str(&refused[0]).expect("error line");
        assert!(
            matches!(&line, ObserveLine::Error { message } if message.starts_with("bad request")),
            "{line:?}"
        );

        let no_datapath = exchange(b"{\"observe\":{}}\n", None).await;
        assert!(
            no_datapath[0].contains("no eBPF datapath"),
            "{no_datapath:?}"
        );

        let hub = ObserveHub::new(None);
        let bad_filter = exchange(
            b"{\"observe\":{\"from_labels\":[\"nolabel\"]}}\n",
            Some(hub.clone()),
        )
        .await;
        assert!(
            bad_filter[0].contains("expected key=value"),
            "{bad_filter:?}"
        );
        let empty_history = exchange(b"{\"observe\":{}}\n", Some(hub)).await;
        assert!(empty_history.is_empty(), "{empty_history:?}");
    }
}
