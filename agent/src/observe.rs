//! Flow observation (`nodeseal observe`): the datapath's drop and trace events as flow records.
//!
//! One reader task ([`run_reader`]) drains the `EVENTS` ring buffer whenever it is readable,
//! decodes each record into a [`Flow`] (with the labels of both identities) and hands it to the
//! [`ObserveHub`], which keeps the last [`HISTORY`] flows and broadcasts each to subscribers.
//! The status socket (`crate::status`) streams them to clients as newline-delimited JSON
//! ([`ObserveLine`]), filtered by an [`ObserveRequest`].
//!
//! Invariants:
//! - The reader is never slowed by a client: the broadcast buffer is bounded
//!   ([`SUBSCRIBER_BUFFER`]); a subscriber that falls behind loses the oldest flows and is told
//!   how many ([`ObserveLine::Lost`]).
//! - Trace events (passed packets) cost the datapath per packet, so they are off unless a
//!   client follows forwarded flows: each such client holds a [`TraceGuard`], and the trace
//!   flag is on while at least one guard lives (dropped when the client's connection ends, for
//!   whatever reason).
//! - A record that does not decode is counted ([`ObserveHub::malformed`]) and skipped.
//! - The datapath lock is held only for one bounded batch of records, never across `.await`.
//!
//! Flow times are wall-clock times at which the agent read the record (events carry no
//! timestamp), so they trail the packet by the reader's latency (normally well under 1 ms).
//!
//! It does not decide identities or labels: whoever knows them calls
//! [`ObserveHub::set_identity_labels`].

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodeseal_bpf::{DropEvent, EventError, Outcome, Program, identity, mark};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::datapath::{DatapathError, DatapathHandle};

/// Flows kept for `--since` / `--last` and for clients that do not follow.
pub const HISTORY: usize = 4096;
/// Flows a subscriber may fall behind before it loses the oldest.
pub const SUBSCRIBER_BUFFER: usize = 1024;
/// Records taken from the ring buffer per lock hold.
const DRAIN_BATCH: usize = 256;
/// Batches per wake-up before the reader yields to other tasks.
const BATCHES_PER_WAKE: usize = 16;
/// The reader drains at least this often even without a readiness notification: the ring
/// buffer's wake-ups are adaptive (only when the reader had caught up), so a missed one must
/// not stall it.
const POLL_FALLBACK: Duration = Duration::from_secs(1);
/// How long one flow line may take to write before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Label filters per direction in one request.
pub const MAX_LABEL_FILTERS: usize = 32;
/// Length of one label filter.
const MAX_LABEL_LEN: usize = 256;

/// Errors of flow observation.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The ring buffer could not be reached through the datapath.
    #[error("events ring buffer")]
    Datapath(#[source] DatapathError),
    /// The ring buffer's fd could not be polled.
    #[error("polling the events ring buffer")]
    Poll(#[source] std::io::Error),
    /// A label filter is not `key=value`, `source:key=value` or `reserved:name`.
    #[error(
        "label filter {filter:?}: expected key=value, source:key=value or reserved:name \
         (no commas or spaces, at most {MAX_LABEL_LEN} bytes)"
    )]
    Label {
        /// The filter as given.
        filter: String,
    },
    /// Too many label filters.
    #[error("{count} label filters; at most {MAX_LABEL_FILTERS} per direction")]
    TooManyLabels {
        /// How many were given.
        count: usize,
    },
    /// `last` beyond the history.
    #[error("last {last}: the agent keeps at most {HISTORY} flows")]
    Last {
        /// The value given.
        last: usize,
    },
}

/// Whether the packet went on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// Passed (a trace event).
    #[serde(alias = "forwarded")]
    Forwarded,
    /// Dropped (a drop event).
    #[serde(alias = "dropped")]
    Dropped,
}

impl Verdict {
    /// `FORWARDED` / `DROPPED`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "FORWARDED",
            Self::Dropped => "DROPPED",
        }
    }
}

/// Direction of a flow seen from the local endpoint, where the program tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowDirection {
    /// Toward a local pod (`to-pod`).
    Ingress,
    /// From a local pod (`from-pod`).
    Egress,
}

/// One side of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Address (absent when the IP header was not parsed).
    pub ip: Option<IpAddr>,
    /// L4 port (TCP, UDP, SCTP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Numeric security identity (0: not known when the verdict was reached).
    pub identity: u32,
    /// The identity's labels (`k=v,k=v`), or a reserved name; empty when unknown.
    pub labels: String,
}

/// One flow verdict, as `nodeseal observe` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When the agent read the event (RFC 3339, UTC, nanoseconds).
    pub time: String,
    /// The same instant in nanoseconds since the Unix epoch.
    pub time_unix_nanos: u64,
    /// FORWARDED or DROPPED.
    pub verdict: Verdict,
    /// Why it was dropped (`DropReason::as_str`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// What happened to a forwarded packet (`TraceReason::as_str`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_reason: Option<String>,
    /// `from-pod`, `from-network` or `to-pod`.
    pub program: String,
    /// Ingress (to a pod) or egress (from a pod); absent for the uplink program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<FlowDirection>,
    /// 4 or 6 (0: the IP header was not parsed).
    pub ip_version: u8,
    /// Sender.
    pub source: Peer,
    /// Receiver.
    pub destination: Peer,
    /// `TCP`, `UDP`, `ICMP`, ... or the protocol number; empty when not parsed.
    pub protocol: String,
    /// ICMP / ICMPv6 type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u16>,
    /// The peer node involved (encrypting to it, decrypting from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u16>,
    /// Encrypted toward a peer or arrived encrypted (trace reason or an ESP mark).
    pub encrypted: bool,
    /// Interface the program ran on.
    pub ifindex: u32,
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;

impl Flow {
    /// The flow of one decoded event read at `time`; `labels` names identities.
    #[must_use]
    pub fn from_event(event: &DropEvent, time: SystemTime, labels: impl Fn(u32) -> String) -> Self {
        let (verdict, drop_reason, trace_reason) = match event.outcome {
            Outcome::Drop(reason) => (Verdict::Dropped, Some(reason.as_str().to_owned()), None),
            Outcome::Trace(reason) => (Verdict::Forwarded, None, Some(reason.as_str().to_owned())),
        };
        let (program, direction) = match event.program {
            Program::FromPod => ("from-pod", Some(FlowDirection::Egress)),
            Program::ToPod => ("to-pod", Some(FlowDirection::Ingress)),
            Program::FromNetwork => ("from-network", None),
            _ => ("other", None),
        };
        let has_ports = matches!(event.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP);
        let port = |p: u16| (has_ports && p != 0).then_some(p);
        let magic = event.mark & mark::MAGIC_MASK;
        let encrypted = matches!(
            event.outcome,
            Outcome::Trace(nodeseal_bpf::TraceReason::Encrypt | nodeseal_bpf::TraceReason::Decrypt)
        ) || magic == mark::MAGIC_ENCRYPT
            || magic == mark::MAGIC_DECRYPT;
        let nanos = time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            time: humantime::format_rfc3339_nanos(time).to_string(),
            time_unix_nanos: nanos,
            verdict,
            drop_reason,
            trace_reason,
            program: program.to_owned(),
            direction,
            ip_version: event.ip_version,
            source: Peer {
                ip: event.src,
                port: port(event.src_port),
                identity: event.src_identity,
                labels: labels(event.src_identity),
            },
            destination: Peer {
                ip: event.dst,
                port: port(event.dst_port),
                identity: event.dst_identity,
                labels: labels(event.dst_identity),
            },
            protocol: protocol_name(event.protocol),
            icmp_type: matches!(event.protocol, IPPROTO_ICMP | IPPROTO_ICMPV6)
                .then_some(event.dst_port),
            node_id: (event.node_id != 0).then_some(event.node_id),
            encrypted,
            ifindex: event.ifindex,
        }
    }

    /// One line for people, like `hubble observe`:
    /// `Dec  2 07:10:01.123: 10.0.1.5:41234 (id 257 org=alliance) -> 10.0.2.7:80 (id 258 …)
    /// DROPPED (policy_denied) TCP encrypted=false`. Times are UTC.
    #[must_use]
    pub fn to_text(&self) -> String {
        let reason = self
            .drop_reason
            .as_deref()
            .or(self.trace_reason.as_deref())
            .unwrap_or("-");
        let protocol = match (self.protocol.as_str(), self.icmp_type) {
            ("", _) => "-".to_owned(),
            (name, Some(kind)) => format!("{name} type {kind}"),
            (name, None) => name.to_owned(),
        };
        format!(
            "{}: {} {} -> {} {} {} ({reason}) {protocol} encrypted={}",
            text_time(self.time_unix_nanos),
            text_address(&self.source),
            text_identity(&self.source),
            text_address(&self.destination),
            text_identity(&self.destination),
            self.verdict.as_str(),
            self.encrypted,
        )
    }
}

fn protocol_name(protocol: u8) -> String {
    match protocol {
        0 => String::new(),
        IPPROTO_ICMP => "ICMP".to_owned(),
        IPPROTO_TCP => "TCP".to_owned(),
        IPPROTO_UDP => "UDP".to_owned(),
        IPPROTO_ESP => "ESP".to_owned(),
        IPPROTO_ICMPV6 => "ICMPv6".to_owned(),
        IPPROTO_SCTP => "SCTP".to_owned(),
        other => other.to_string(),
    }
}

fn text_time(unix_nanos: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_nanos)) else {
        return "?".to_owned();
    };
    let month = t.month().to_string();
    format!(
        "{} {:>2} {:02}:{:02}:{:02}.{:03}",
        month.get(..3).unwrap_or("?"),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn text_address(peer: &Peer) -> String {
    match (peer.ip, peer.port) {
        (None, _) => "?".to_owned(),
        (Some(ip), None) => ip.to_string(),
        (Some(IpAddr::V4(ip)), Some(port)) => format!("{ip}:{port}"),
        (Some(IpAddr::V6(ip)), Some(port)) => format!("[{ip}]:{port}"),
    }
}

fn text_identity(peer: &Peer) -> String {
    if peer.labels.is_empty() {
        format!("(id {})", peer.identity)
    } else {
        format!("(id {} {})", peer.identity, peer.labels)
    }
}

/// The name of a reserved identity, if `id` is one.
#[must_use]
pub const fn reserved_name(id: u32) -> Option<&'static str> {
    match id {
        identity::HOST => Some("reserved:host"),
        identity::WORLD => Some("reserved:world"),
        identity::UNMANAGED => Some("reserved:unmanaged"),
        identity::REMOTE_NODE => Some("reserved:remote-node"),
        _ => None,
    }
}

/// What an observe client asks for: the body of `{"observe": {...}}` on the status socket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObserveRequest {
    /// Keep the connection open and stream new flows after the history.
    pub follow: bool,
    /// Only this verdict. Following anything but drops turns tracing on.
    pub verdict: Option<Verdict>,
    /// Every one of these must be among the source identity's labels.
    pub from_labels: Vec<String>,
    /// Every one of these must be among the destination identity's labels.
    pub to_labels: Vec<String>,
    /// Source or destination port.
    pub port: Option<u16>,
    /// History: only flows read at most this many milliseconds ago.
    pub since_ms: Option<u64>,
    /// History: only the last this many matching flows (none: every matching flow kept).
    pub last: Option<usize>,
}

impl ObserveRequest {
    /// Checks the request before anything is streamed.
    ///
    /// # Errors
    /// [`ObserveError::Label`], [`ObserveError::TooManyLabels`], [`ObserveError::Last`].
    pub fn validate(&self) -> Result<(), ObserveError> {
        for filters in [&self.from_labels, &self.to_labels] {
            if filters.len() > MAX_LABEL_FILTERS {
                return Err(ObserveError::TooManyLabels {
                    count: filters.len(),
                });
            }
            for filter in filters {
                validate_label_filter(filter)?;
            }
        }
        if let Some(last) = self.last
            && last > HISTORY
        {
            return Err(ObserveError::Last { last });
        }
        Ok(())
    }

    /// Whether the client needs trace events: it follows, and not only drops.
    #[must_use]
    pub fn wants_forwarded(&self) -> bool {
        self.follow && self.verdict != Some(Verdict::Dropped)
    }

    /// Whether `flow` passes the verdict, label and port filters (not `since`/`last`, which
    /// select from the history).
    #[must_use]
    pub fn matches(&self, flow: &Flow) -> bool {
        if self.verdict.is_some_and(|v| v != flow.verdict) {
            return false;
        }
        if let Some(port) = self.port
            && flow.source.port != Some(port)
            && flow.destination.port != Some(port)
        {
            return false;
        }
        self.from_labels
            .iter()
            .all(|want| has_label(&flow.source.labels, want))
            && self
                .to_labels
                .iter()
                .all(|want| has_label(&flow.destination.labels, want))
    }
}

/// Checks one `--from-label`/`--to-label` value.
///
/// # Errors
/// [`ObserveError::Label`].
pub fn validate_label_filter(filter: &str) -> Result<(), ObserveError> {
    let well_formed = !filter.is_empty()
        && filter.len() <= MAX_LABEL_LEN
        && !filter.contains(',')
        && !filter.chars().any(char::is_whitespace)
        && (filter
            .strip_prefix("reserved:")
            .is_some_and(|n| !n.is_empty())
            || filter
                .split_once('=')
                .is_some_and(|(key, _)| !key.is_empty() && !key.ends_with(':')));
    if well_formed {
        Ok(())
    } else {
        Err(ObserveError::Label {
            filter: filter.to_owned(),
        })
    }
}

/// Whether the labels text (`a=b,k8s:c=d` or a reserved name) holds `want`. A filter without a
/// source prefix (`org=empire`) also matches the label with one (`k8s:org=empire`).
fn has_label(labels: &str, want: &str) -> bool {
    let want_has_source = want.split('=').next().is_some_and(|key| key.contains(':'));
    labels.split(',').map(str::trim).any(|label| {
        if label == want {
            return true;
        }
        if want_has_source {
            return false;
        }
        // Strip the label's source (`k8s:`), which sits before the key's end.
        match (label.find(':'), label.find('=')) {
            (Some(colon), Some(eq)) if colon < eq => label.get(colon + 1..) == Some(want),
            _ => false,
        }
    })
}

/// One line of an observe stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObserveLine {
    /// A flow (boxed: far larger than the other lines).
    Flow(Box<Flow>),
    /// This many flows were lost because the client read too slowly (they may not all have
    /// matched its filter).
    Lost {
        /// How many.
        flows: u64,
    },
    /// The request was refused; the connection ends.
    Error {
        /// Why.
        message: String,
    },
}

/// Switches the datapath's trace events (the datapath, or a fake in tests).
pub trait TraceSwitch: Send + Sync + 'static {
    /// Turns trace events on or off.
    ///
    /// # Errors
    /// The datapath's error.
    fn set_trace(&self, on: bool) -> Result<(), DatapathError>;
}

impl TraceSwitch for DatapathHandle {
    fn set_trace(&self, on: bool) -> Result<(), DatapathError> {
        DatapathHandle::set_trace(self, on)
    }
}

struct History {
    flows: VecDeque<Arc<Flow>>,
}

struct Inner {
    tx: broadcast::Sender<Arc<Flow>>,
    /// Also serialises publication with subscription, so that a subscriber's history snapshot
    /// and its receiver neither overlap nor leave a gap.
    history: Mutex<History>,
    labels: RwLock<BTreeMap<u32, String>>,
    malformed: AtomicU64,
    /// Clients holding a [`TraceGuard`].
    tracers: Mutex<usize>,
    trace_switch: Option<Arc<dyn TraceSwitch>>,
}

/// Cheap-clone handle to the flow history, its subscribers and the identity labels.
#[derive(Clone)]
pub struct ObserveHub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ObserveHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObserveHub").finish_non_exhaustive()
    }
}

impl ObserveHub {
    /// A hub; `trace_switch` is what [`TraceGuard`]s switch (none: tracing cannot be turned
    /// on, e.g. without a datapath).
    #[must_use]
    pub fn new(trace_switch: Option<Arc<dyn TraceSwitch>>) -> Self {
        let (tx, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        Self {
            inner: Arc::new(Inner {
                tx,
                history: Mutex::new(History {
                    flows: VecDeque::with_capacity(HISTORY),
                }),
                labels: RwLock::new(BTreeMap::new()),
                malformed: AtomicU64::new(0),
                tracers: Mutex::new(0),
                trace_switch,
            }),
        }
    }

    /// Replaces the labels text of workload identities (reserved identities keep their
    /// names unless listed here).
    pub fn set_identity_labels(&self, labels: BTreeMap<u32, String>) {
        if let Ok(mut current) = self.inner.labels.write() {
            *current = labels;
        }
    }

    /// The labels text shown for `id`.
    #[must_use]
    pub fn labels_of(&self, id: u32) -> String {
        if let Ok(labels) = self.inner.labels.read()
            && let Some(text) = labels.get(&id)
        {
            return text.clone();
        }
        reserved_name(id).unwrap_or_default().to_owned()
    }

    /// Records that did not decode, since start.
    #[must_use]
    pub fn malformed(&self) -> u64 {
        self.inner.malformed.load(Ordering::Relaxed)
    }

    /// Turns decoded records read at `time` into flows: kept in the history and sent to every
    /// subscriber. Records that did not decode are counted and skipped.
    pub fn publish(&self, records: Vec<Result<DropEvent, EventError>>, time: SystemTime) {
        if records.is_empty() {
            return;
        }
        let mut flows = Vec::with_capacity(records.len());
        for record in records {
            match record {
                Ok(event) => flows.push(Arc::new(Flow::from_event(&event, time, |id| {
                    self.labels_of(id)
                }))),
                Err(e) => {
                    let total = self.inner.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                    debug!(error = %e, malformed = total, "skipped an event record that does not decode");
                }
            }
        }
        let Ok(mut history) = self.inner.history.lock() else {
            return;
        };
        for flow in flows {
            if history.flows.len() >= HISTORY {
                history.flows.pop_front();
            }
            history.flows.push_back(Arc::clone(&flow));
            // No subscriber is fine: the flow is in the history.
            let _ = self.inner.tx.send(flow);
        }
    }

    /// The history now and a receiver of every flow published after it.
    #[must_use]
    pub fn subscribe(&self) -> (Vec<Arc<Flow>>, broadcast::Receiver<Arc<Flow>>) {
        match self.inner.history.lock() {
            Ok(history) => (
                history.flows.iter().cloned().collect(),
                self.inner.tx.subscribe(),
            ),
            Err(_) => (Vec::new(), self.inner.tx.subscribe()),
        }
    }

    /// Keeps trace events on until the guard is dropped.
    #[must_use]
    pub fn trace_guard(&self) -> TraceGuard {
        self.change_tracers(true);
        TraceGuard { hub: self.clone() }
    }

    /// Clients holding a [`TraceGuard`].
    #[must_use]
    pub fn tracers(&self) -> usize {
        self.inner.tracers.lock().map_or(0, |n| *n)
    }

    fn change_tracers(&self, add: bool) {
        let Ok(mut count) = self.inner.tracers.lock() else {
            return;
        };
        let before = *count;
        *count = if add {
            before.saturating_add(1)
        } else {
            before.saturating_sub(1)
        };
        // Switched under the lock, so that a last client leaving and a first one arriving
        // cannot reorder their writes and leave the flag wrong.
        let switch_to = match (before, *count) {
            (0, 1) => Some(true),
            (1, 0) => Some(false),
            _ => None,
        };
        if let (Some(on), Some(switch)) = (switch_to, &self.inner.trace_switch)
            && let Err(e) = switch.set_trace(on)
        {
            warn!(error = %e, trace = on, "cannot switch datapath trace events");
        }
    }
}

/// Holds trace events on (see [`ObserveHub::trace_guard`]).
#[derive(Debug)]
pub struct TraceGuard {
    hub: ObserveHub,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        self.hub.change_tracers(false);
    }
}

/// Drains the `EVENTS` ring buffer into `hub` until cancelled.
///
/// # Errors
/// [`ObserveError`] when the ring buffer cannot be polled at all.
pub async fn run_reader(
    hub: ObserveHub,
    datapath: DatapathHandle,
    cancel: CancellationToken,
) -> Result<(), ObserveError> {
    let fd: OwnedFd = datapath.events_fd().map_err(ObserveError::Datapath)?;
    // SAFETY: `fd` is an open fd this `AsyncFd` owns from here on (an `OwnedFd` always returns
    // the same descriptor), so it stays valid and the same file for the `AsyncFd`'s lifetime.
    let ring = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| ObserveError::Poll(e.into()))?;
    loop {
        let mut ready = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = ring.readable() => Some(r.map_err(ObserveError::Poll)?),
            () = tokio::time::sleep(POLL_FALLBACK) => None,
        };
        let mut caught_up = false;
        for _ in 0..BATCHES_PER_WAKE {
            let batch = match datapath.drain_events(DRAIN_BATCH) {
                Ok(batch) => batch,
                Err(e) => {
                    warn!(error = %e, "reading datapath events");
                    caught_up = true;
                    break;
                }
            };
            let full = batch.len() == DRAIN_BATCH;
            hub.publish(batch, SystemTime::now());
            if !full {
                caught_up = true;
                break;
            }
        }
        // Only once the ring is empty: tokio keeps readiness that arrived after this guard
        // was handed out, so a record submitted meanwhile still wakes us.
        if caught_up && let Some(guard) = ready.as_mut() {
            guard.clear_ready();
        }
        if !caught_up {
            tokio::task::yield_now().await;
        }
    }
}

/// Streams flows to one client: the matching history (`since`, `last`), then, with `follow`,
/// every new matching flow until the client goes away or `cancel` fires. Holds a
/// [`TraceGuard`] while following forwarded flows.
///
/// # Errors
/// The I/O error that ended the stream (a client that went away is `Ok`).
pub async fn stream_flows<R, W>(
    hub: &ObserveHub,
    request: &ObserveRequest,
    mut reader: R,
    mut writer: W,
    cancel: CancellationToken,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let _trace = request.wants_forwarded().then(|| hub.trace_guard());
    let (history, mut live) = hub.subscribe();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let cutoff = request
        .since_ms
        .map_or(0, |ms| now.saturating_sub(ms.saturating_mul(1_000_000)));
    let matching: Vec<&Arc<Flow>> = history
        .iter()
        .filter(|f| f.time_unix_nanos >= cutoff && request.matches(f))
        .collect();
    let skip = request
        .last
        .map_or(0, |last| matching.len().saturating_sub(last));
    for flow in matching.into_iter().skip(skip) {
        write_line(&mut writer, &ObserveLine::Flow(Box::new(Flow::clone(flow)))).await?;
    }
    if !request.follow {
        return writer.shutdown().await;
    }
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            // The client sends nothing after its request: end of input (or an error) means it
            // went away, which must release its trace guard even when no flow comes.
            read = reader.read(&mut scratch) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
            received = live.recv() => match received {
                Ok(flow) => {
                    if request.matches(&flow) {
                        write_line(&mut writer, &ObserveLine::Flow(Box::new(Flow::clone(&flow)))).await?;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(flows)) => {
                    debug!(flows, "observe client fell behind");
                    write_line(&mut writer, &ObserveLine::Lost { flows }).await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
    }
}

/// Writes one JSON line, giving up after [`WRITE_TIMEOUT`].
///
/// # Errors
/// The write's error, or `TimedOut`.
pub async fn write_line<W: AsyncWrite + Unpin>(
    writer: &mut W,
    line: &ObserveLine,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&bytes)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use nodeseal_bpf::{DropReason, TraceReason};
    use tokio::io::AsyncBufReadExt;

    use super::*;

    fn event(outcome: Outcome, program: Program) -> DropEvent {
        DropEvent {
            outcome,
            program,
            ip_version: 4,
            protocol: IPPROTO_TCP,
            src_identity: 257,
            dst_identity: 258,
            ifindex: 7,
            mark: 0,
            src: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5))),
            dst: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 7))),
            src_port: 41234,
            dst_port: 80,
            node_id: 0,
        }
    }

    fn drop_event() -> DropEvent {
        event(Outcome::Drop(DropReason::PolicyDenied), Program::ToPod)
    }

    fn labels(id: u32) -> String {
        match id {
            257 => "k8s:org=alliance,k8s:class=xwing".to_owned(),
            258 => "org=empire,class=deathstar".to_owned(),
            other => reserved_name(other).unwrap_or_default().to_owned(),
        }
    }

    /// 2026-12-02T07:10:01.123Z.
    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_796_195_401_123)
    }

    #[derive(Default)]
    struct FakeSwitch(Mutex<Vec<bool>>);

    impl TraceSwitch for FakeSwitch {
        fn set_trace(&self, on: bool) -> Result<(), DatapathError> {
            self.0.lock().expect("fake switch").push(on);
            Ok(())
        }
    }

    #[test]
    fn a_drop_event_becomes_a_flow_with_labels() {
        let flow = Flow::from_event(&drop_event(), at(), labels);
        assert_eq!(flow.verdict, Verdict::Dropped);
        assert_eq!(flow.drop_reason.as_deref(), Some("policy_denied"));
        assert_eq!(flow.trace_reason, None);
        assert_eq!(flow.program, "to-pod");
        assert_eq!(flow.direction, Some(FlowDirection::Ingress));
        assert_eq!(flow.source.port, Some(41234));
        assert_eq!(flow.destination.labels, "org=empire,class=deathstar");
        assert_eq!(flow.protocol, "TCP");
        assert!(!flow.encrypted);
        assert_eq!(flow.time, "2026-12-02T07:10:01.123000000Z");
        let json = serde_json::to_value(&flow).expect("json");
        assert_eq!(json["verdict"], "DROPPED");
        assert_eq!(json["source"]["identity"], 257);
        let back: Flow = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, flow);
    }

    #[test]
    fn encrypted_comes_from_the_trace_reason_or_the_mark() {
        let encrypt = event(Outcome::Trace(TraceReason::Encrypt), Program::FromPod);
        let flow = Flow::from_event(&encrypt, at(), labels);
        assert!(flow.encrypted);
        assert_eq!(flow.verdict, Verdict::Forwarded);
        assert_eq!(flow.trace_reason.as_deref(), Some("encrypt"));
        assert_eq!(flow.direction, Some(FlowDirection::Egress));
        let mut decrypted = event(Outcome::Trace(TraceReason::Pass), Program::FromNetwork);
        decrypted.mark = mark::decrypt(9);
        let flow = Flow::from_event(&decrypted, at(), labels);
        assert!(flow.encrypted);
        assert_eq!(flow.direction, None);
        let plain = event(Outcome::Trace(TraceReason::Plaintext), Program::FromPod);
        assert!(!Flow::from_event(&plain, at(), labels).encrypted);
    }

    #[test]
    fn icmp_has_a_type_and_no_ports() {
        let mut ping = drop_event();
        ping.protocol = IPPROTO_ICMP;
        ping.src_port = 0;
        ping.dst_port = 8;
        let flow = Flow::from_event(&ping, at(), labels);
        assert_eq!((flow.source.port, flow.destination.port), (None, None));
        assert_eq!(flow.icmp_type, Some(8));
        assert!(
            flow.to_text().contains(" ICMP type 8 "),
            "{}",
            flow.to_text()
        );
    }

    #[test]
    fn text_format_is_one_hubble_like_line() {
        let flow = Flow::from_event(&drop_event(), at(), labels);
        assert_eq!(
            flow.to_text(),
            "Dec  2 07:10:01.123: 10.0.1.5:41234 (id 257 k8s:org=alliance,k8s:class=xwing) -> \
             10.0.2.7:80 (id 258 org=empire,class=deathstar) DROPPED (policy_denied) TCP \
             encrypted=false"
        );
        let mut unknown = drop_event();
        unknown.src = None;
        unknown.src_identity = 0;
        unknown.dst = Some("fd00::7".parse().expect("v6"));
        unknown.dst_identity = identity::WORLD;
        let text = Flow::from_event(&unknown, at(), labels).to_text();
        assert!(
            text.contains(": ? (id 0) -> [fd00::7]:80 (id 2 reserved:world) DROPPED"),
            "{text}"
        );
    }

    #[test]
    fn filters_match_verdict_port_and_labels() {
        let flow = Flow::from_event(&drop_event(), at(), labels);
        let req = |f: fn(&mut ObserveRequest)| {
            let mut r = ObserveRequest::default();
            f(&mut r);
            r.validate().expect("valid request");
            r.matches(&flow)
        };
        assert!(req(|_| {}));
        assert!(req(|r| r.verdict = Some(Verdict::Dropped)));
        assert!(!req(|r| r.verdict = Some(Verdict::Forwarded)));
        assert!(req(|r| r.port = Some(80)));
        assert!(req(|r| r.port = Some(41234)));
        assert!(!req(|r| r.port = Some(443)));
        // Without a source prefix a filter matches the prefixed label too.
        assert!(req(|r| r.from_labels = vec!["org=alliance".into()]));
        assert!(req(|r| r.from_labels = vec!["k8s:org=alliance".into()]));
        assert!(req(
            |r| r.from_labels = vec!["org=alliance".into(), "class=xwing".into()]
        ));
        assert!(!req(
            |r| r.from_labels = vec!["org=alliance".into(), "class=tie".into()]
        ));
        assert!(!req(|r| r.from_labels = vec!["k8s:org=empire".into()]));
        assert!(!req(|r| r.from_labels = vec!["any:org=alliance".into()]));
        assert!(req(|r| r.to_labels = vec!["org=empire".into()]));
        assert!(!req(|r| r.to_labels = vec!["org=alliance".into()]));
        // A label value is never matched by its prefix.
        assert!(!req(|r| r.to_labels = vec!["org=emp".into()]));
        let mut world = drop_event();
        world.src_identity = identity::WORLD;
        let world = Flow::from_event(&world, at(), labels);
        let mut r = ObserveRequest {
            from_labels: vec!["reserved:world".into()],
            ..ObserveRequest::default()
        };
        assert!(r.matches(&world));
        r.from_labels = vec!["reserved:host".into()];
        assert!(!r.matches(&world));
    }

    #[test]
    fn bad_filters_are_refused() {
        for bad in ["", "org", "=x", "k8s:=x", "a=b,c=d", "a b=c", "reserved:"] {
            assert!(
                matches!(validate_label_filter(bad), Err(ObserveError::Label { .. })),
                "{bad:?}"
            );
        }
        for good in [
            "org=empire",
            "k8s:org=empire",
            "reserved:world",
            "a=",
            "k=v=w",
        ] {
            validate_label_filter(good).expect(good);
        }
        let too_many = ObserveRequest {
            to_labels: vec!["a=b".into(); MAX_LABEL_FILTERS + 1],
            ..ObserveRequest::default()
        };
        assert!(matches!(
            too_many.validate(),
            Err(ObserveError::TooManyLabels { .. })
        ));
        let last = ObserveRequest {
            last: Some(HISTORY + 1),
            ..ObserveRequest::default()
        };
        assert!(matches!(last.validate(), Err(ObserveError::Last { .. })));
    }

    #[test]
    fn request_json_uses_lower_case_verdicts_and_refuses_unknown_fields() {
        let r: ObserveRequest =
            serde_json::from_str(r#"{"follow":true,"verdict":"dropped","port":80}"#)
                .expect("request");
        assert!(r.follow);
        assert_eq!(r.verdict, Some(Verdict::Dropped));
        assert!(!r.wants_forwarded());
        let r: ObserveRequest = serde_json::from_str(r#"{"verdict":"FORWARDED"}"#).expect("upper");
        assert_eq!(r.verdict, Some(Verdict::Forwarded));
        assert!(!r.wants_forwarded(), "history only needs no tracing");
        assert!(serde_json::from_str::<ObserveRequest>(r#"{"folow":true}"#).is_err());
        assert!(serde_json::from_str::<ObserveRequest>(r#"{"verdict":"lost"}"#).is_err());
        assert!(serde_json::from_str::<ObserveRequest>(r#"{"port":70000}"#).is_err());
    }

    #[test]
    fn history_keeps_the_last_flows_and_counts_malformed_records() {
        let hub = ObserveHub::new(None);
        let records: Vec<_> = (0..HISTORY + 10)
            .map(|i| {
                let mut e = drop_event();
                e.src_port = u16::try_from(i % 60_000).expect("port") + 1;
                Ok(e)
            })
            .chain([Err(EventError::Size {
                len: 3,
                expected: 64,
            })])
            .collect();
        hub.publish(records, at());
        let (history, _) = hub.subscribe();
        assert_eq!(history.len(), HISTORY);
        assert_eq!(
            history[0].source.port,
            Some(11),
            "the oldest ten were dropped"
        );
        assert_eq!(hub.malformed(), 1);
    }

    #[test]
    fn identity_labels_can_be_set_and_reserved_ones_have_names() {
        let hub = ObserveHub::new(None);
        assert_eq!(hub.labels_of(identity::REMOTE_NODE), "reserved:remote-node");
        assert_eq!(hub.labels_of(identity::UNMANAGED), "reserved:unmanaged");
        assert_eq!(hub.labels_of(identity::HOST), "reserved:host");
        assert_eq!(hub.labels_of(300), "");
        hub.set_identity_labels(BTreeMap::from([(300, "org=empire".to_owned())]));
        assert_eq!(hub.labels_of(300), "org=empire");
        hub.publish(vec![Ok(drop_event())], at());
        hub.set_identity_labels(BTreeMap::from([(257, "app=x".to_owned())]));
        hub.publish(vec![Ok(drop_event())], at());
        let (history, _) = hub.subscribe();
        assert_eq!(history[0].source.labels, "");
        assert_eq!(history[1].source.labels, "app=x");
    }

    #[test]
    fn trace_is_on_while_any_guard_lives() {
        let switch = Arc::new(FakeSwitch::default());
        let hub = ObserveHub::new(Some(Arc::clone(&switch) as Arc<dyn TraceSwitch>));
        let a = hub.trace_guard();
        let b = hub.trace_guard();
        assert_eq!(hub.tracers(), 2);
        drop(a);
        assert_eq!(*switch.0.lock().expect("switch"), vec![true]);
        drop(b);
        assert_eq!(hub.tracers(), 0);
        let c = hub.trace_guard();
        drop(c);
        assert_eq!(
            *switch.0.lock().expect("switch"),
            vec![true, false, true, false]
        );
    }

    async fn read_lines(client: tokio::io::DuplexStream) -> Vec<ObserveLine> {
        let mut lines = tokio::io::BufReader::new(client).lines();
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.expect("line") {
            out.push(serde_json::from_str(&line).expect("observe line"));
        }
        out
    }

    #[tokio::test]
    async fn without_follow_the_matching_history_is_sent_then_eof() {
        let switch = Arc::new(FakeSwitch::default());
        let hub = ObserveHub::new(Some(Arc::clone(&switch) as Arc<dyn TraceSwitch>));
        let now = SystemTime::now();
        let old = now - Duration::from_secs(120);
        let mut other = drop_event();
        other.dst_port = 443;
        hub.publish(vec![Ok(drop_event()), Ok(other)], old);
        hub.publish(vec![Ok(drop_event()), Ok(drop_event()), Ok(other)], now);
        let request = ObserveRequest {
            port: Some(80),
            since_ms: Some(60_000),
            ..ObserveRequest::default()
        };
        let (client, server) = tokio::io::duplex(1 << 16);
        let (read_half, write_half) = tokio::io::split(server);
        stream_flows(
            &hub,
            &request,
            read_half,
            write_half,
            CancellationToken::new(),
        )
        .await
        .expect("stream");
        let lines = read_lines(client).await;
        assert_eq!(lines.len(), 2, "{lines:?}");
        let last_one = ObserveRequest {
            last: Some(1),
            ..ObserveRequest::default()
        };
        let (client, server) = tokio::io::duplex(1 << 16);
        let (read_half, write_half) = tokio::io::split(server);
        stream_flows(
            &hub,
            &last_one,
            read_half,
            write_half,
            CancellationToken::new(),
        )
        .await
        .expect("stream");
        let lines = read_lines(client).await;
        assert!(
            matches!(&lines[..], [ObserveLine::Flow(f)] if f.destination.port == Some(443)),
            "{lines:?}"
        );
        assert!(
            switch.0.lock().expect("switch").is_empty(),
            "no tracing for history"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_follower_loses_flows_and_is_told_how_many() {
        let switch = Arc::new(FakeSwitch::default());
        let hub = ObserveHub::new(Some(Arc::clone(&switch) as Arc<dyn TraceSwitch>));
        let request = ObserveRequest {
            follow: true,
            ..ObserveRequest::default()
        };
        // A tiny pipe the client does not read: the streaming task blocks on its first write
        // while the reader side keeps publishing.
        let (client, server) = tokio::io::duplex(64);
        let (read_half, write_half) = tokio::io::split(server);
        let task_hub = hub.clone();
        let cancel = CancellationToken::new();
        let task_cancel = cancel.clone();
        let task = tokio::spawn(async move {
            stream_flows(&task_hub, &request, read_half, write_half, task_cancel).await
        });
        // Let the task subscribe.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            hub.tracers(),
            1,
            "following forwarded flows turns tracing on"
        );
        let published = SUBSCRIBER_BUFFER * 3;
        for _ in 0..published {
            // Publication never waits for the subscriber.
            hub.publish(vec![Ok(drop_event())], SystemTime::now());
        }
        // Read everything now: the first flow (already being written), a lost notice, then
        // the buffer's worth.
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(client).lines();
            let mut flows = 0u64;
            let mut lost = 0u64;
            while flows + lost < published as u64 {
                let Some(line) = lines.next_line().await.expect("line") else {
                    break;
                };
                match serde_json::from_str(&line).expect("line") {
                    ObserveLine::Flow(_) => flows += 1,
                    ObserveLine::Lost { flows: n } => lost += n,
                    ObserveLine::Error { message } => panic!("error line {message}"),
                }
            }
            (flows, lost, lines)
        });
        let (flows, lost, lines) = reader.await.expect("reader");
        assert!(lost > 0, "the slow client was told it lost flows");
        assert_eq!(
            flows + lost,
            published as u64,
            "every flow is shown or counted"
        );
        // The client goes away: the streaming task ends and tracing goes off.
        drop(lines);
        task.await.expect("task").expect("stream ends cleanly");
        assert_eq!(hub.tracers(), 0);
        assert_eq!(*switch.0.lock().expect("switch"), vec![true, false]);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_that_disconnects_without_flows_releases_tracing() {
        let switch = Arc::new(FakeSwitch::default());
        let hub = ObserveHub::new(Some(Arc::clone(&switch) as Arc<dyn TraceSwitch>));
        let request = ObserveRequest {
            follow: true,
            verdict: Some(Verdict::Forwarded),
            ..ObserveRequest::default()
        };
        let (client, server) = tokio::io::duplex(1024);
        let (read_half, write_half) = tokio::io::split(server);
        let task_hub = hub.clone();
        let task = tokio::spawn(async move {
            stream_flows(
                &task_hub,
                &request,
                read_half,
                write_half,
                CancellationToken::new(),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(hub.tracers(), 1);
        drop(client);
        task.await.expect("task").expect("stream");
        assert_eq!(hub.tracers(), 0);
        // Only drops: no tracing.
        let drops_only = ObserveRequest {
            follow: true,
            verdict: Some(Verdict::Dropped),
            ..ObserveRequest::default()
        };
        let (client, server) = tokio::io::duplex(1024);
        let (read_half, write_half) = tokio::io::split(server);
        let task_hub = hub.clone();
        let task = tokio::spawn(async move {
            stream_flows(
                &task_hub,
                &drops_only,
                read_half,
                write_half,
                CancellationToken::new(),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(hub.tracers(), 0);
        drop(client);
        task.await.expect("task").expect("stream");
        assert_eq!(*switch.0.lock().expect("switch"), vec![true, false]);
    }
}
