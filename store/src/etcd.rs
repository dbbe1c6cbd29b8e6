//! [`EtcdStore`]: the cluster state in etcd (v3 API; tested against etcd 3.4).
//!
//! Keys are `<prefix><kind>/<id>`, prefix `/nodeseal/` by default. Node records hang on
//! leases. Every request has a deadline ([`EtcdOptions::request_timeout`]): while etcd is down,
//! operations fail with a transient [`StoreError::Backend`] instead of waiting. HTTP/2
//! keep-alive pings detect a dead connection under an idle watch.
//!
//! A watch reads a snapshot (one revision, over every watched prefix), then watches from the
//! next revision, so nothing falls between the two. When the connection or the watch fails
//! (etcd stopped, or the revision compacted), it reports once, retries with backoff, and
//! resyncs with a fresh snapshot: the caller never has to reason about missed events.
//!
//! Security ([`EtcdOptions::tls`], [`EtcdOptions::credentials`]): TLS verifies etcd against
//! the given CA bundle only (no system roots), optionally with a client certificate for etcd's
//! `--client-cert-auth`; etcd's own authentication sends the user name and password once
//! (Authenticate) and then a token with every request. An expired or invalidated token (etcd
//! restarted, token TTL, or any change to etcd's users and roles) is replaced by authenticating
//! again and the request is sent once more. The settings are checked at [`EtcdStore::connect`]:
//! an `https://` endpoint needs a CA bundle, TLS settings refuse `http://` endpoints, and
//! credentials refuse to go over plain http, where the password would cross the network in
//! clear.
//!
//! Values are records of at most [`MAX_RECORD_BYTES`]: a single-record read is refused from
//! gRPC's length prefix, before the value is received, and reported as a
//! [`RecordProblem::TooLarge`] of its key, as the directory backend does. Listings and watches
//! carry many records, so their responses have a larger bound; a too large value in them is
//! refused by the store's decoding, which names the key, and the other records still arrive.

mod security;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use futures::stream::BoxStream;
use tracing::{debug, info, warn};

pub use self::security::{
    EtcdClientCert, EtcdCredentials, EtcdPassword, EtcdSecurityError, EtcdTls, FileRole,
};
use super::backend::{Backoff, LeaseId, RawEvent, StoreBackend};
use super::error::{BoxError, RecordError, RecordProblem, StoreError};
use super::record::{Kind, MAX_RECORD_BYTES};

const BACKEND: &str = "etcd";
/// Largest response accepted for listings, snapshots and watches (many records).
const MAX_RESPONSE_BYTES: usize = 256 << 20;
/// Largest response accepted for a single-record read: the value plus room for its key and
/// etcd's response header and key-value metadata (a few hundred bytes in practice).
const MAX_GET_RESPONSE_BYTES: usize = MAX_RECORD_BYTES + (64 << 10);

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
    /// TLS towards etcd; required for `https://` endpoints, refused with `http://` ones.
    pub tls: Option<EtcdTls>,
    /// etcd user and password; requires TLS.
    pub credentials: Option<EtcdCredentials>,
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
            tls: None,
            credentials: None,
        }
    }

    /// Refuses combinations that would leave etcd unverified or a password in clear: an
    /// `https://` endpoint without a CA bundle, TLS with an `http://` endpoint, credentials
    /// without TLS. An endpoint without a scheme follows the TLS setting, as in the etcd client.
    fn check_transport(&self) -> Result<(), EtcdSecurityError> {
        for endpoint in &self.endpoints {
            let https = endpoint.starts_with("https://");
            let http = endpoint.starts_with("http://");
            if https && self.tls.is_none() {
                return Err(EtcdSecurityError::HttpsWithoutCa {
                    endpoint: endpoint.clone(),
                });
            }
            if http && self.tls.is_some() {
                return Err(EtcdSecurityError::PlainHttpWithTls {
                    endpoint: endpoint.clone(),
                });
            }
            if self.credentials.is_some() && self.tls.is_none() {
                return Err(EtcdSecurityError::CredentialsWithoutTls {
                    endpoint: endpoint.clone(),
                });
            }
        }
        Ok(())
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
    /// [`StoreError::Backend`] for an unusable endpoint URL.
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
        options.check_transport()?;
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_timeout(options.request_timeout)
            .with_keep_alive(options.keep_alive_interval, options.keep_alive_timeout)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &options.tls {
            let (tls, probe) = tls.load().await?;
            for endpoint in &options.endpoints {
                security::probe(&probe, endpoint, options.connect_timeout).await?;
            }
            connect = connect.with_tls(tls);
        }
        let mut op = "connect";
        let mut subject = options.endpoints.join(",");
        if let Some(credentials) = &options.credentials {
            // The client authenticates while connecting, so etcd must be reachable now; with
            // auto refresh it authenticates again when etcd says the token is invalid.
            connect = connect
                .with_user(
                    credentials.username.clone(),
                    credentials.password.expose().to_owned(),
                )
                .with_auto_token_refresh(true);
            op = "authenticate";
            subject = format!("as user {} at {subject}", credentials.username);
        }
        let client = tokio::time::timeout(
            options.connect_timeout,
            Client::connect(&options.endpoints, Some(connect)),
        )
        .await
        .map_err(|elapsed| unavailable(op, &subject, elapsed.into()))?
        .map_err(|e| map_error(op, &subject, e))?;
        info!(
            endpoints = ?options.endpoints,
            prefix = options.prefix,
            tls = options.tls.is_some(),
            client_cert = options.tls.as_ref().is_some_and(|tls| tls.client.is_some()),
            user = options.credentials.as_ref().map(|c| c.username.as_str()),
            "etcd store client ready"
        );
        Ok(Self { client, options })
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.options.prefix)
    }

    /// Runs one request on `subject` (a key, prefix or lease) with the deadline, and once
    /// more after authenticating again if etcd's users or roles changed since the token was
    /// issued (see [`auth_revision_old`]).
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        subject: &str,
        request: F,
    ) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_raw(op, subject, request)
            .await?
            .map_err(|e| map_error(op, subject, e))
    }

    /// As [`call`](Self::call), but etcd's own error is returned as it is, for the callers
    /// that must tell an unknown lease apart.
    async fn call_raw<T, F, Fut>(
        &self,
        op: &'static str,
        subject: &str,
        request: F,
    ) -> Result<Result<T, etcd_client::Error>, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.options.request_timeout;
        let result = with_deadline(timeout, op, subject, request()).await?;
        match result {
            Err(error) if self.options.credentials.is_some() && auth_revision_old(&error) => {
                debug!(
                    op,
                    subject, "etcd auth changed since the token was issued, re-authenticating"
                );
                with_deadline(
                    timeout,
                    "authenticate",
                    subject,
                    self.client.refresh_token(),
                )
                .await?
                .map_err(|e| map_error("authenticate", subject, e))?;
                with_deadline(timeout, op, subject, request()).await
            }
            other => Ok(other),
        }
    }
}

/// Runs one request with a deadline. A missed deadline is a transient [`StoreError`]; etcd's
/// own error is returned as it is, for the callers that must tell an unknown lease apart.
async fn with_deadline<T, F>(
    timeout: Duration,
    op: &'static str,
    subject: &str,
    request: F,
) -> Result<Result<T, etcd_client::Error>, StoreError>
where
    F: Future<Output = Result<T, etcd_client::Error>>,
{
    tokio::time::timeout(timeout, request)
        .await
        .map_err(|elapsed| unavailable(op, subject, elapsed.into()))
}

/// etcd could not be reached or did not answer in time: worth retrying.
fn unavailable(op: &'static str, subject: &str, source: BoxError) -> StoreError {
    StoreError::Backend {
        backend: BACKEND,
        op,
        subject: subject.to_owned(),
        transient: true,
        source,
    }
}

/// Connectivity problems are transient; what etcd refused (a request too large, a bad
/// argument) is not: sending it again gets the same answer.
fn map_error(op: &'static str, subject: &str, error: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    let connectivity = match &error {
        // A refused certificate needs someone to fix it; waiting does not help.
        _ if tls_refused(&error) => false,
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
    StoreError::Backend {
        backend: BACKEND,
        op,
        subject: subject.to_owned(),
        transient: connectivity,
        source: error.into(),
    }
}

/// Whether the TLS handshake failed (a certificate refused by either side, no common
/// protocol): rustls' error somewhere in the transport error's causes. tokio-rustls reports it
/// inside an `io::Error`, whose `source` skips the wrapped error, so that is looked into too.
fn tls_refused(error: &etcd_client::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if current.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        cause = current.source();
    }
    false
}

/// etcd refuses a token issued before its latest change to users, roles or permissions
/// (`ErrGRPCAuthOldRevision`) until the client authenticates again; the etcd client only
/// re-authenticates on an invalid token. The status code (InvalidArgument) is shared with other
/// refusals, so etcd's fixed message is the only way to tell this one apart; etcd's own Go client
/// matches it the same way.
fn auth_revision_old(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::InvalidArgument
            && status.message() == "etcdserver: revision of auth store is old")
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
        let kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_GET_RESPONSE_BYTES);
        let full = self.full_key(key);
        let result = self
            .call_raw("get", key, || {
                let mut kv = kv.clone();
                let full = full.clone();
                async move { kv.get(full, None).await }
            })
            .await?;
        match result {
            Ok(response) => Ok(response.kvs().first().map(|kv| kv.value().to_vec())),
            // Our decoding limit, from the response's length prefix (etcd itself answers
            // OutOfRange only for reads at a future revision, which this is not): the value
            // was not received. Like the directory backend, report one byte over the limit.
            Err(etcd_client::Error::GRpcStatus(status))
                if status.code() == tonic::Code::OutOfRange =>
            {
                warn!(
                    key,
                    limit = MAX_RECORD_BYTES,
                    "etcd value too large, not read"
                );
                Err(StoreError::Invalid(RecordError {
                    key: key.to_owned(),
                    problem: RecordProblem::TooLarge {
                        len: MAX_RECORD_BYTES + 1,
                        limit: MAX_RECORD_BYTES,
                    },
                }))
            }
            Err(error) => Err(map_error("get", key, error)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let full = self.full_key(&format!("{prefix}/"));
        let response = self
            .call("list", &format!("{prefix}/"), || {
                let mut kv = kv.clone();
                let full = full.clone();
                async move { kv.get(full, Some(GetOptions::new().with_prefix())).await }
            })
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
        let kv = self.client.kv_client();
        let full = self.full_key(key);
        let result = self
            .call_raw("put", key, || {
                let mut kv = kv.clone();
                let full = full.clone();
                let value = value.clone();
                let options = lease.map(|lease| PutOptions::new().with_lease(lease.0));
                async move { kv.put(full, value, options).await }
            })
            .await?;
        match (result, lease) {
            (Ok(_), _) => Ok(()),
            (Err(error), Some(lease)) if lease_not_found(&error) => {
                Err(StoreError::LeaseExpired { lease })
            }
            (Err(error), _) => Err(map_error("put", key, error)),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let kv = self.client.kv_client();
        let full = self.full_key(key);
        let response = self
            .call("delete", key, || {
                let mut kv = kv.clone();
                let full = full.clone();
                async move { kv.delete(full, None).await }
            })
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
        let kv = self.client.kv_client();
        let response = self
            .call("compare-and-swap", key, || {
                let mut kv = kv.clone();
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        Ok(response.succeeded())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let seconds = if ttl.subsec_nanos() > 0 {
            seconds.saturating_add(1)
        } else {
            seconds
        };
        let lease = self.client.lease_client();
        let response = self
            .call("lease grant", &format!("of {seconds} s"), || {
                let mut lease = lease.clone();
                async move { lease.grant(seconds, None).await }
            })
            .await?;
        debug!(lease = %LeaseId(response.id()), ttl = response.ttl(), "granted lease");
        Ok(LeaseId(response.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let client = self.client.lease_client();
        // etcd-client's keep_alive sends one renewal and waits for its answer; a TTL of 0 or
        // "not found" means the lease is gone.
        let subject = format!("lease {lease}");
        let result = self
            .call_raw("keep-alive", &subject, || {
                let mut client = client.clone();
                async move { client.keep_alive(lease.0).await.map(drop) }
            })
            .await?;
        match result {
            Ok(()) => Ok(()),
            Err(error) if lease_not_found(&error) => Err(StoreError::LeaseExpired { lease }),
            Err(error) => Err(map_error("keep-alive", &subject, error)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let client = self.client.lease_client();
        let subject = format!("lease {lease}");
        let result = self
            .call_raw("revoke", &subject, || {
                let mut client = client.clone();
                async move { client.revoke(lease.0).await }
            })
            .await?;
        match result {
            Ok(_) => Ok(()),
            // Already gone: what revoking was for.
            Err(error) if lease_not_found(&error) => Ok(()),
            Err(error) => Err(map_error("revoke", &subject, error)),
        }
    }

    fn watch(&self, kinds: &[Kind]) -> BoxStream<'static, RawEvent> {
        let store = self.clone();
        let prefixes: Vec<String> = kinds
            .iter()
            .map(|kind| format!("{}{}/", self.options.prefix, kind.as_str()))
            .collect();
        // For errors: which prefixes this watch is on, relative to the nodeseal prefix.
        let watched = kinds
            .iter()
            .map(|kind| format!("{}/", kind.as_str()))
            .collect::<Vec<_>>()
            .join(",");
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
                let watch_client = store
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
                let mut stream = match store
                    .call("watch", &watched, || {
                        let mut watch_client = watch_client.clone();
                        let first = first.clone();
                        let options = options(&first);
                        async move { watch_client.watch(first, Some(options)).await }
                    })
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
                        extra_failed = Some(map_error("watch", &watched, error));
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
                            break unavailable(
                                "watch",
                                &watched,
                                "etcd closed the watch stream".into(),
                            );
                        }
                        Err(error) => break map_error("watch", &watched, error),
                    };
                    if response.canceled() {
                        warn!(
                            reason = response.cancel_reason(),
                            compact_revision = response.compact_revision(),
                            "etcd cancelled the watch, resyncing"
                        );
                        // Transient: the resync that follows recovers (a compacted revision is
                        // the usual reason).
                        break unavailable(
                            "watch",
                            &watched,
                            format!("etcd cancelled the watch: {}", response.cancel_reason())
                                .into(),
                        );
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
        let kv = self
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
                .call("watch snapshot", prefix, || {
                    let mut kv = kv.clone();
                    let prefix = prefix.clone();
                    let options = options.clone();
                    async move { kv.get(prefix, Some(options)).await }
                })
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
    use futures::StreamExt as _;

    use super::*;
    use crate::test_helpers::{EtcdServer, node_record};
    use crate::{Event, RecordKind as _, Store};

    const WAIT: Duration = Duration::from_secs(20);

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
    async fn republish_replaces_the_record_under_the_same_lease() {
        let Some(server) = EtcdServer::start_or_skip("republish_replaces_the_record") else {
            return;
        };
        let (store, _) = store(&server).await;
        let mut events = store.watch(&[Kind::Node]);
        assert!(matches!(next(&mut events).await, Event::Snapshot(s) if s.records.is_empty()));

        let mut lease = store
            .publish_node(node_record("a", 1), Duration::from_secs(30))
            .await
            .expect("publish");
        assert!(
            matches!(next(&mut events).await, Event::Put(r) if r.key().to_string() == "nodes/a")
        );
        let mut changed = node_record("a", 1);
        changed.wireguard_public_key = Some(crate::WgPublicKey::from_bytes([1; 32]));
        let before = lease.lease();
        lease.republish(changed.clone()).await.expect("republish");
        assert_eq!(lease.lease(), before, "same lease");
        match next(&mut events).await {
            Event::Put(record) => assert_eq!(record, changed.clone().into_record()),
            other => panic!("expected the republished record, got {other:?}"),
        }
        // Another node's record cannot go under this node's lease.
        assert!(matches!(
            lease.republish(node_record("b", 2)).await,
            Err(StoreError::Invalid(_))
        ));
        // Revoking the lease deletes what hangs on it.
        lease.revoke().await.expect("revoke");
        assert!(matches!(next(&mut events).await, Event::Deleted(k) if k.to_string() == "nodes/a"));
    }

    /// A value over [`MAX_RECORD_BYTES`] written past nodeseal (etcd itself accepts up to
    /// 1.5 MiB) is refused wherever it is read, naming its key, as the directory backend does;
    /// the records around it still arrive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_values_are_refused_by_key_and_others_still_arrive() {
        let Some(server) = EtcdServer::start_or_skip("oversized_values_are_refused") else {
            return;
        };
        let (store, backend) = store(&server).await;
        let mut raw = Client::connect([server.endpoint()], None)
            .await
            .expect("raw etcd client");
        // Over the single-read response bound too (the limit plus 64 KiB), under etcd's 1.5 MiB.
        let oversized_len = MAX_RECORD_BYTES + (100 << 10);
        let oversized = vec![b' '; oversized_len];
        raw.put("/nodeseal/nodes/big", oversized.clone(), None)
            .await
            .expect("raw put of an oversized value");
        store.put(&node_record("a", 1)).await.expect("put a");
        let too_large = |key: &str, error: &crate::RecordError| {
            error.key == key
                && matches!(error.problem, RecordProblem::TooLarge { len, limit }
                if len > MAX_RECORD_BYTES && limit == MAX_RECORD_BYTES)
        };

        // A listing.
        let listing = store.list::<crate::NodeRecord>().await.expect("list");
        assert_eq!(listing.records, vec![node_record("a", 1)]);
        assert_eq!(listing.invalid.len(), 1, "{:?}", listing.invalid);
        assert!(
            too_large("nodes/big", &listing.invalid[0]),
            "{:?}",
            listing.invalid
        );
        assert_eq!(
            listing.invalid[0].to_string(),
            format!(
                "invalid record nodes/big: {oversized_len} bytes, more than the limit of {MAX_RECORD_BYTES}"
            )
        );

        // A single read: refused from the response's length, before the value is received.
        let error = store
            .get::<crate::NodeRecord>(&crate::NodeName::new("big").expect("name"))
            .await
            .expect_err("too large");
        assert!(
            matches!(&error, StoreError::Invalid(e) if too_large("nodes/big", e)),
            "{error:?}"
        );
        assert!(matches!(
            backend.get("nodes/big").await,
            Err(StoreError::Invalid(_))
        ));

        // A watch: in the snapshot, and as a change.
        let mut events = store.watch(&[Kind::Node]);
        match next(&mut events).await {
            Event::Snapshot(snapshot) => {
                assert_eq!(snapshot.records.len(), 1, "{snapshot:?}");
                assert_eq!(snapshot.invalid.len(), 1, "{snapshot:?}");
                assert!(too_large("nodes/big", &snapshot.invalid[0]), "{snapshot:?}");
            }
            other => panic!("expected the snapshot, got {other:?}"),
        }
        raw.put("/nodeseal/nodes/big2", oversized, None)
            .await
            .expect("raw put");
        store.put(&node_record("b", 2)).await.expect("put b");
        match next(&mut events).await {
            Event::Invalid(error) => assert!(too_large("nodes/big2", &error), "{error:?}"),
            other => panic!("expected the refusal of nodes/big2, got {other:?}"),
        }
        match next(&mut events).await {
            Event::Put(record) => assert_eq!(record.key().to_string(), "nodes/b"),
            other => panic!("expected nodes/b after the refusal, got {other:?}"),
        }
    }

    /// What etcd refuses is not transient (sending it again gets the same answer); etcd being
    /// away is. Either way the error names the backend, the operation and the key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_say_backend_operation_key_and_whether_transient() {
        let Some(mut server) = EtcdServer::start_or_skip("errors_say_backend_operation_key") else {
            return;
        };
        let (_, backend) = store(&server).await;
        // Above etcd's default request limit (1.5 MiB).
        let error = backend
            .put("nodes/big", vec![b' '; 2 << 20], None)
            .await
            .expect_err("etcd refuses a 2 MiB request");
        assert!(
            matches!(
                &error,
                StoreError::Backend {
                    backend: "etcd",
                    op: "put",
                    transient: false,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(!error.is_transient());
        assert_eq!(error.to_string(), "etcd store: put nodes/big failed");

        server.kill();
        let error = backend.get("nodes/a").await.expect_err("etcd is down");
        assert!(error.is_transient(), "{error:?}");
        assert_eq!(error.to_string(), "etcd store: get nodes/a failed");
        let error = backend
            .keep_alive(LeaseId(0x2a))
            .await
            .expect_err("etcd is down");
        assert!(error.is_transient(), "{error:?}");
        assert_eq!(error.to_string(), "etcd store: keep-alive lease 2a failed");
    }
}
