//! [`EtcdStore`]: the cluster state in etcd (v3 API; tested against etcd 3.4).
//!
//! Keys are `<prefix><kind>/<id>`, prefix `/nodeseal/` by default. Node records hang on
//! leases. Every request has a deadline ([`EtcdOptions::request_timeout`]): while etcd is down,
//! operations fail with [`StoreError::Unavailable`] instead of waiting. HTTP/2 keep-alive pings
//! detect a dead connection under an idle watch.
//!
//! A watch reads a snapshot (one revision, over every watched prefix), then watches from the
//! next revision, so nothing falls between the two. When the connection or the watch fails
//! (etcd stopped, or the revision compacted), it reports once, retries with backoff, and
//! resyncs with a fresh snapshot: the caller never has to reason about missed events.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use futures::stream::BoxStream;
use tracing::{debug, info, warn};

use super::backend::{Backoff, LeaseId, RawEvent, StoreBackend};
use super::error::{BoxError, StoreError};
use super::record::Kind;

const BACKEND: &str = "etcd";
/// Largest response accepted (snapshots of many records).
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// Settings of the etcd backend.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of all nodeseal records; ends with `/`.
    pub prefix: String,
    /// Deadline of every request.
    pub request_timeout: Duration,
    /// Deadline of connection set-up.
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive ping interval; a connection is dead after `keep_alive_timeout` without
    /// an answer.
    pub keep_alive_interval: Duration,
    /// See `keep_alive_interval`.
    pub keep_alive_timeout: Duration,
    /// Backoff of the watch while etcd is unreachable.
    pub backoff: Backoff,
}

impl EtcdOptions {
    /// Default prefix.
    pub const DEFAULT_PREFIX: &'static str = "/nodeseal/";

    /// Options with defaults for these endpoints.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            keep_alive_interval: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(5),
            backoff: Backoff::default(),
        }
    }
}

/// The etcd backend. See the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    options: EtcdOptions,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Creates a client. Connections are made on demand, so this succeeds while etcd is down;
    /// the first request tells.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for no endpoints or a prefix not ending in `/`;
    /// [`StoreError::Etcd`] for an unusable endpoint URL.
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Config {
                reason: "no etcd endpoints".to_owned(),
            });
        }
        if !options.prefix.ends_with('/') {
            return Err(StoreError::Config {
                reason: format!("etcd prefix {:?} must end with '/'", options.prefix),
            });
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_timeout(options.request_timeout)
            .with_keep_alive(options.keep_alive_interval, options.keep_alive_timeout)
            .with_keep_alive_while_idle(true);
        let client = tokio::time::timeout(
            options.connect_timeout,
            Client::connect(&options.endpoints, Some(connect)),
        )
        .await
        .map_err(|elapsed| unavailable("connect", elapsed.into()))?
        .map_err(|e| map_error("connect", e))?;
        info!(endpoints = ?options.endpoints, prefix = options.prefix, "etcd store client ready");
        Ok(Self { client, options })
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.options.prefix)
    }

    /// Runs one request with the deadline.
    async fn call<T, F>(&self, op: &'static str, request: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        with_deadline(self.options.request_timeout, op, request).await
    }
}

async fn with_deadline<T, F>(
    timeout: Duration,
    op: &'static str,
    request: F,
) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(timeout, request).await {
        Ok(result) => result.map_err(|e| map_error(op, e)),
        Err(elapsed) => Err(unavailable(op, elapsed.into())),
    }
}

fn unavailable(op: &'static str, source: BoxError) -> StoreError {
    StoreError::Unavailable {
        backend: BACKEND,
        op,
        source,
    }
}

/// Connectivity problems become [`StoreError::Unavailable`]; the rest stay etcd errors.
fn map_error(op: &'static str, error: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    let connectivity = match &error {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
        ),
        _ => false,
    };
    if connectivity {
        unavailable(op, error.into())
    } else {
        StoreError::Etcd { op, source: error }
    }
}

fn lease_not_found(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound || status.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("not found"),
        _ => false,
    }
}

/// Strips the prefix; keys outside it (cannot happen with prefix requests) are skipped.
fn relative(prefix: &str, key: &[u8]) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    key.strip_prefix(prefix).map(str::to_owned)
}

#[async_trait::async_trait]
impl StoreBackend for EtcdStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut kv = self.client.kv_client();
        let response = self.call("get", kv.get(self.full_key(key), None)).await?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let full = self.full_key(&format!("{prefix}/"));
        let response = self
            .call("list", kv.get(full, Some(GetOptions::new().with_prefix())))
            .await?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| {
                relative(&self.options.prefix, kv.key()).map(|key| (key, kv.value().to_vec()))
            })
            .collect())
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        let options = lease.map(|lease| PutOptions::new().with_lease(lease.0));
        match self
            .call("put", kv.put(self.full_key(key), value, options))
            .await
        {
            Err(StoreError::Etcd { source, .. }) if lease_not_found(&source) => {
                // Checked above: `lease` is set when etcd reports an unknown lease.
                Err(StoreError::LeaseExpired {
                    lease: lease.unwrap_or(LeaseId(0)),
                })
            }
            other => other.map(drop),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut kv = self.client.kv_client();
        let response = self
            .call("delete", kv.delete(self.full_key(key), None))
            .await?;
        Ok(response.deleted() > 0)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let full = self.full_key(key);
        let compare = match expected {
            // create_revision 0: the key does not exist.
            None => Compare::create_revision(full.clone(), CompareOp::Equal, 0),
            Some(value) => Compare::value(full.clone(), CompareOp::Equal, value.to_vec()),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(full, new, None)]);
        let mut kv = self.client.kv_client();
        let response = self.call("compare-and-swap", kv.txn(txn)).await?;
        Ok(response.succeeded())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let seconds = if ttl.subsec_nanos() > 0 {
            seconds.saturating_add(1)
        } else {
            seconds
        };
        let mut lease = self.client.lease_client();
        let response = self.call("lease grant", lease.grant(seconds, None)).await?;
        debug!(lease = %LeaseId(response.id()), ttl = response.ttl(), "granted lease");
        Ok(LeaseId(response.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.lease_client();
        // etcd-client's keep_alive sends one renewal and waits for its answer; a TTL of 0 or
        // "not found" means the lease is gone.
        let result = with_deadline(self.options.request_timeout, "lease keep-alive", async {
            client.keep_alive(lease.0).await.map(drop)
        })
        .await;
        match result {
            Err(StoreError::Etcd { source, .. }) if lease_not_found(&source) => {
                Err(StoreError::LeaseExpired { lease })
            }
            other => other,
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.lease_client();
        match self.call("lease revoke", client.revoke(lease.0)).await {
            Err(StoreError::Etcd { source, .. }) if lease_not_found(&source) => Ok(()),
            other => other.map(drop),
        }
    }

    fn watch(&self, kinds: &[Kind]) -> BoxStream<'static, RawEvent> {
        let store = self.clone();
        let prefixes: Vec<String> = kinds
            .iter()
            .map(|kind| format!("{}{}/", self.options.prefix, kind.as_str()))
            .collect();
        Box::pin(async_stream::stream! {
            let mut sent_snapshot = false;
            let mut failures = 0u32;
            loop {
                if failures > 0 {
                    tokio::time::sleep(store.options.backoff.delay(failures)).await;
                }
                // Snapshot at one revision over every prefix.
                let (entries, revision) = match store.snapshot(&prefixes).await {
                    Ok(snapshot) => snapshot,
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        if failures == 1 {
                            yield RawEvent::Interrupted(error);
                        } else {
                            debug!(%error, failures, "etcd still unavailable");
                        }
                        continue;
                    }
                };
                if failures > 0 {
                    info!(revision, "etcd reachable again, resynced watch");
                }
                yield RawEvent::Snapshot { entries, resync: sent_snapshot };
                sent_snapshot = true;
                failures = 0;

                // Changes after the snapshot.
                let mut watch_client = store
                    .client
                    .watch_client()
                    .max_decoding_message_size(MAX_RESPONSE_BYTES);
                let options = |_: &str| {
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1)
                };
                let Some(first) = prefixes.first() else {
                    // Nothing to watch: stay quiet forever (the stream ends only when dropped).
                    futures::future::pending::<()>().await;
                    continue;
                };
                let mut stream = match with_deadline(
                    store.options.request_timeout,
                    "watch",
                    watch_client.watch(first.clone(), Some(options(first))),
                )
                .await
                {
                    Ok(stream) => stream,
                    Err(error) => {
                        failures = 1;
                        yield RawEvent::Interrupted(error);
                        continue;
                    }
                };
                let mut extra_failed = None;
                for prefix in prefixes.iter().skip(1) {
                    if let Err(error) = stream.watch(prefix.clone(), Some(options(prefix))).await {
                        extra_failed = Some(map_error("watch", error));
                        break;
                    }
                }
                if let Some(error) = extra_failed {
                    failures = 1;
                    yield RawEvent::Interrupted(error);
                    continue;
                }
                let error = loop {
                    let response = match stream.message().await {
                        Ok(Some(response)) => response,
                        Ok(None) => {
                            break unavailable("watch", "etcd closed the watch stream".into());
                        }
                        Err(error) => break map_error("watch", error),
                    };
                    if response.canceled() {
                        warn!(
                            reason = response.cancel_reason(),
                            compact_revision = response.compact_revision(),
                            "etcd cancelled the watch, resyncing"
                        );
                        break StoreError::Etcd {
                            op: "watch",
                            source: etcd_client::Error::WatchError(format!(
                                "watch cancelled: {}",
                                response.cancel_reason()
                            )),
                        };
                    }
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let Some(key) = relative(&store.options.prefix, kv.key()) else {
                            continue;
                        };
                        match event.event_type() {
                            EventType::Put => yield RawEvent::Put(key, kv.value().to_vec()),
                            EventType::Delete => yield RawEvent::Delete(key),
                        }
                    }
                };
                failures = 1;
                yield RawEvent::Interrupted(error);
            }
        })
    }
}

impl EtcdStore {
    /// Reads every key under `prefixes` at one revision; returns entries and that revision.
    async fn snapshot(
        &self,
        prefixes: &[String],
    ) -> Result<(Vec<(String, Vec<u8>)>, i64), StoreError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut entries = Vec::new();
        let mut revision = None;
        for prefix in prefixes {
            let mut options = GetOptions::new().with_prefix();
            if let Some(revision) = revision {
                options = options.with_revision(revision);
            }
            let response = self
                .call("watch snapshot", kv.get(prefix.clone(), Some(options)))
                .await?;
            if revision.is_none() {
                revision = Some(response.header().map_or(0, |h| h.revision()));
            }
            entries.extend(response.kvs().iter().filter_map(|kv| {
                relative(&self.options.prefix, kv.key()).map(|key| (key, kv.value().to_vec()))
            }));
        }
        Ok((entries, revision.unwrap_or(0)))
    }
}
