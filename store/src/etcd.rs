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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures::StreamExt as _;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::test_helpers::{EtcdServer, node_record};
    use crate::{Event, Key, NodeName, NodeRecord, Record, RecordKind as _, RecordProblem, Store};

    const WAIT: Duration = Duration::from_secs(20);

    fn name(text: &str) -> NodeName {
        NodeName::new(text).expect("test node name")
    }

    fn options(server: &EtcdServer) -> EtcdOptions {
        let mut options = EtcdOptions::new([server.endpoint()]);
        options.request_timeout = Duration::from_secs(2);
        options.connect_timeout = Duration::from_secs(2);
        options.keep_alive_interval = Duration::from_secs(1);
        options.keep_alive_timeout = Duration::from_secs(2);
        options.backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        };
        options
    }

    async fn store(server: &EtcdServer) -> (Store, EtcdStore) {
        let backend = EtcdStore::connect(options(server))
            .await
            .expect("etcd client");
        (Store::new(backend.clone()), backend)
    }

    async fn next(events: &mut BoxStream<'static, Event>) -> Event {
        tokio::time::timeout(WAIT, events.next())
            .await
            .expect("store event within 20 s")
            .expect("watch streams never end")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_cas_and_invalid_values_against_real_etcd() {
        let Some(server) = EtcdServer::start_or_skip("records_cas_and_invalid_values") else {
            return;
        };
        let (store, backend) = store(&server).await;
        let a = node_record("a", 1);
        store.put(&a).await.expect("put");
        assert_eq!(
            store.get::<NodeRecord>(&name("a")).await.expect("get"),
            Some(a.clone())
        );
        assert_eq!(
            store.get::<NodeRecord>(&name("zz")).await.expect("get"),
            None
        );

        // Garbage written by someone else is reported with its key, never fatal.
        backend
            .put("nodes/b", b"{\"name\":\"b\"}".to_vec(), None)
            .await
            .expect("raw put");
        backend
            .put("nodes/UPPER", b"{}".to_vec(), None)
            .await
            .expect("raw put");
        let listing = store.list::<NodeRecord>().await.expect("list");
        assert_eq!(listing.records, vec![a]);
        let keys: Vec<&str> = listing.invalid.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["nodes/UPPER", "nodes/b"]);
        assert!(matches!(
            listing.invalid[0].problem,
            RecordProblem::BadKey { .. }
        ));
        assert!(matches!(
            listing.invalid[1].problem,
            RecordProblem::Json { .. }
        ));
        assert!(matches!(
            store.get::<NodeRecord>(&name("b")).await,
            Err(StoreError::Invalid(_))
        ));

        assert!(
            store
                .delete::<NodeRecord>(&name("a"))
                .await
                .expect("delete")
        );
        assert!(
            !store
                .delete::<NodeRecord>(&name("a"))
                .await
                .expect("delete again")
        );

        // Compare-and-swap from concurrent tasks (two clients): no lost increment.
        let (other, _) = self::store(&server).await;
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..16u32 {
            let store = if task % 2 == 0 {
                store.clone()
            } else {
                other.clone()
            };
            tasks.spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..5 {
                    seen.push(store.bump_rekey_generation().await.expect("bump"));
                }
                seen
            });
        }
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(seen) = tasks.join_next().await {
                all.extend(seen.expect("task"));
            }
        })
        .await
        .expect("bumps finish within 60 s");
        all.sort_unstable();
        assert_eq!(all, (1..=80).collect::<Vec<u64>>());

        // Absent-key CAS: only one creator wins.
        assert!(
            backend
                .compare_and_swap("csrs/x", None, b"1".to_vec())
                .await
                .expect("cas")
        );
        assert!(
            !backend
                .compare_and_swap("csrs/x", None, b"2".to_vec())
                .await
                .expect("cas")
        );
        assert!(
            backend
                .compare_and_swap("csrs/x", Some(b"1"), b"3".to_vec())
                .await
                .expect("cas")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_expiry_removes_the_node_record() {
        let Some(server) = EtcdServer::start_or_skip("lease_expiry_removes_the_node_record") else {
            return;
        };
        let (store, _) = store(&server).await;
        let ttl = Duration::from_secs(2);

        // Renewed: survives several TTLs.
        let mut kept = store
            .publish_node(node_record("kept", 1), ttl)
            .await
            .expect("publish");
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let renewing = tokio::spawn(async move {
            let result = kept.run(stop).await;
            (kept, result)
        });

        let mut events = store.watch(&[Kind::Node]);
        assert!(matches!(next(&mut events).await, Event::Snapshot(s) if s.records.len() == 1));
        // Not renewed: gone after about the TTL.
        let started = std::time::Instant::now();
        let dying = store
            .publish_node(node_record("dying", 2), ttl)
            .await
            .expect("publish");
        assert!(
            matches!(next(&mut events).await, Event::Put(r) if r.key().to_string() == "nodes/dying")
        );
        match next(&mut events).await {
            Event::Deleted(key) => assert_eq!(key, NodeRecord::key_of(&name("dying"))),
            other => panic!("expected the expiry, got {other:?}"),
        }
        let lived = started.elapsed();
        assert!(
            lived >= Duration::from_millis(1500),
            "expired after {lived:?}"
        );
        assert!(
            store
                .get::<NodeRecord>(&name("kept"))
                .await
                .expect("get")
                .is_some(),
            "the renewed record must still be there after {lived:?}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            store
                .get::<NodeRecord>(&name("kept"))
                .await
                .expect("get")
                .is_some()
        );

        // Republishing replaces the record under the same lease.
        let mut kept_record = node_record("kept", 1);
        kept_record.wireguard_public_key = Some(crate::WgPublicKey::from_bytes([1; 32]));
        // (The renewal task owns `kept`; republish through a second lease handle instead.)
        let mut second = store
            .publish_node(node_record("second", 3), ttl)
            .await
            .expect("publish second");
        assert!(
            matches!(next(&mut events).await, Event::Put(r) if r.key().to_string() == "nodes/second")
        );
        let mut changed = node_record("second", 3);
        changed.wireguard_public_key = kept_record.wireguard_public_key;
        second.republish(changed.clone()).await.expect("republish");
        match next(&mut events).await {
            Event::Put(record) => assert_eq!(record, changed.into_record()),
            other => panic!("expected the republished record, got {other:?}"),
        }
        assert!(second.republish(node_record("other", 4)).await.is_err());
        second.revoke().await.expect("revoke second");
        assert!(
            matches!(next(&mut events).await, Event::Deleted(k) if k.to_string() == "nodes/second")
        );

        // Renewing a lease etcd forgot publishes the record again.
        let mut dying = dying;
        let old = dying.lease();
        dying.renew().await.expect("renew re-publishes");
        assert_ne!(dying.lease(), old);
        assert!(
            matches!(next(&mut events).await, Event::Put(r) if r.key().to_string() == "nodes/dying")
        );

        cancel.cancel();
        let (kept, result) = tokio::time::timeout(WAIT, renewing)
            .await
            .expect("renewal loop stops on cancel")
            .expect("join");
        result.expect("renewal loop");
        kept.revoke().await.expect("revoke");
        assert!(
            matches!(next(&mut events).await, Event::Deleted(k) if k.to_string() == "nodes/kept")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_covers_exactly_the_requested_kinds() {
        let Some(server) = EtcdServer::start_or_skip("watch_covers_exactly_the_requested_kinds")
        else {
            return;
        };
        let (store, _) = store(&server).await;
        store.put(&node_record("a", 1)).await.expect("put");
        assert_eq!(store.bump_rekey_generation().await.expect("bump"), 1);
        let mut events = store.watch(&[Kind::Node, Kind::RekeyGeneration]);
        match next(&mut events).await {
            Event::Snapshot(snapshot) => {
                let keys: Vec<String> = snapshot
                    .records
                    .iter()
                    .map(|r| r.key().to_string())
                    .collect();
                assert_eq!(keys, ["nodes/a", "rekey/cluster"]);
            }
            other => panic!("expected Snapshot, got {other:?}"),
        }
        // Both watched prefixes deliver; an unwatched kind does not.
        store
            .put(&crate::TrustBundle {
                bundle: "{}".to_owned(),
            })
            .await
            .expect("put bundle");
        assert_eq!(store.bump_rekey_generation().await.expect("bump"), 2);
        store.put(&node_record("b", 2)).await.expect("put");
        // One etcd watcher per kind: order holds per kind, not across kinds.
        let mut puts = Vec::new();
        while puts.len() < 2 {
            match next(&mut events).await {
                Event::Put(record) => puts.push(record),
                other => panic!("expected puts, got {other:?}"),
            }
        }
        puts.sort_by_key(Record::key);
        assert_eq!(
            puts,
            [
                node_record("b", 2).into_record(),
                Record::RekeyGeneration(
                    store
                        .get::<crate::RekeyGeneration>(&())
                        .await
                        .expect("get")
                        .expect("set")
                ),
            ]
        );
        // A record replaced by garbage is reported as invalid.
        store
            .backend()
            .put("nodes/b", b"null".to_vec(), None)
            .await
            .expect("raw put");
        match next(&mut events).await {
            Event::Invalid(error) => assert_eq!(error.key, "nodes/b"),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// Applies events to a view of the store, as an agent would.
    fn apply(view: &mut BTreeMap<Key, Record>, event: Event) {
        match event {
            Event::Snapshot(snapshot) | Event::Resynced(snapshot) => {
                *view = snapshot.records.into_iter().map(|r| (r.key(), r)).collect();
            }
            Event::Put(record) => {
                view.insert(record.key(), record);
            }
            Event::Deleted(key) => {
                view.remove(&key);
            }
            Event::Invalid(_) | Event::Interrupted(_) => {}
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_survives_etcd_restart_and_resyncs() {
        let Some(mut server) = EtcdServer::start_or_skip("watch_survives_etcd_restart") else {
            return;
        };
        let (store, _) = store(&server).await;
        store.put(&node_record("a", 1)).await.expect("put a");
        store.put(&node_record("b", 2)).await.expect("put b");
        let mut lease = store
            .publish_node(node_record("self", 9), Duration::from_secs(30))
            .await
            .expect("publish");
        let mut events = store.watch(&[Kind::Node]);
        let mut view = BTreeMap::new();
        let first = next(&mut events).await;
        assert!(
            matches!(&first, Event::Snapshot(s) if s.records.len() == 3),
            "{first:?}"
        );
        apply(&mut view, first);

        server.kill();
        match next(&mut events).await {
            Event::Interrupted(StoreError::Unavailable {
                backend: "etcd", ..
            }) => {}
            other => panic!("expected Interrupted(Unavailable), got {other:?}"),
        }
        // Operations fail fast with a typed error while etcd is down.
        let started = std::time::Instant::now();
        match store.get::<NodeRecord>(&name("a")).await {
            Err(error @ StoreError::Unavailable { .. }) => assert!(error.is_transient()),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(matches!(
            store.put(&node_record("c", 3)).await,
            Err(StoreError::Unavailable { .. })
        ));
        assert!(matches!(
            lease.renew().await,
            Err(StoreError::Unavailable { .. })
        ));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        // The watch retries quietly (one Interrupted per outage), with bounded backoff.
        if let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
            panic!("no event expected while etcd is down, got {event:?}");
        }

        server.restart().expect("restart etcd");
        // Changes by another client right after the restart, racing the watch's reconnect.
        let (other, _) = self::store(&server).await;
        other
            .delete::<NodeRecord>(&name("a"))
            .await
            .expect("delete a");
        other.put(&node_record("c", 3)).await.expect("put c");

        let expected: Vec<String> = ["nodes/b", "nodes/c", "nodes/self"]
            .map(str::to_owned)
            .into();
        let mut resynced = false;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let keys: Vec<String> = view.keys().map(ToString::to_string).collect();
            if resynced && keys == expected {
                break;
            }
            let event = tokio::time::timeout_at(deadline, events.next())
                .await
                .unwrap_or_else(|_| panic!("no resync to {expected:?} within 20 s; view {keys:?}"))
                .expect("watch streams never end");
            resynced |= matches!(event, Event::Resynced(_));
            apply(&mut view, event);
        }
        // The lease survived the short outage; renewing works again.
        lease.renew().await.expect("renew after restart");
        assert!(
            store
                .get::<NodeRecord>(&name("self"))
                .await
                .expect("get")
                .is_some()
        );
    }
}
