//! nodeseal-store: the cluster-state store, what the agents, keymgr and the CLI share.
//!
//! [`Store`] is the typed, cheap-to-clone handle everything uses. Underneath, one trait,
//! [`StoreBackend`], has an implementation per backend, each behind a cargo feature:
//! - `dir` (default): `DirStore`, a local directory, one JSON file per record. The embedded
//!   default for a single host (netns demos, tests); several agent processes may share one
//!   directory.
//! - `etcd` (default): `EtcdStore`, etcd's v3 API, for real multi-host clusters, with leases
//!   for liveness.
//! - `kube`: `KubeStore`, the cluster's own objects: node records joined from the Node object
//!   (IPs, pod CIDRs: the authority) and the agent's NodesealNode, cluster records in
//!   ConfigMaps (see [`kube`]). It keeps no CSR or certificate records: in Kubernetes mode those
//!   are CertificateSigningRequests.
//!
//! The directory and etcd backends pass the same conformance suite (`tests/conformance.rs`):
//! round trips, compare-and-swap, watch order, malformed records, leases (or the documented
//! lack of them) and the watch's resync after an interruption. The Kubernetes backend's node
//! records must agree with Node objects, so it has its own tests of the same properties against
//! a real apiserver (`tests/kube.rs`).
//!
//! Records ([`NodeRecord`], [`CsrRecord`], [`CertificateRecord`], [`TrustBundle`],
//! [`Revocation`], [`RekeyGeneration`], [`NodeStatus`], and for identity policy [`Identity`],
//! [`IdentityClaim`], [`Endpoint`], [`PolicyDocument`]) are JSON under keys `<kind>/<id>`
//! (see [`Key`]). What a record says is input: it is validated whenever it is read, and a bad
//! record becomes a [`RecordError`] naming the key and the problem. Listings and watches skip
//! bad records and report them; they never fail because of one, and nothing here panics on
//! stored data. Writes are validated too, so nodeseal never stores what it would reject.
//!
//! [`Store::watch`] streams typed [`Event`]s: a snapshot first, then changes. When the backend
//! goes away (etcd stopped) the stream says so once ([`Event::Interrupted`]), retries with
//! bounded backoff and, once the backend is back, sends the whole state again
//! ([`Event::Resynced`]), so the caller's view is consistent whatever it missed.
//!
//! [`Store::allocate_identity`] gives a label set its cluster-wide identity with two
//! create-if-absent writes (the number, then the label set's claim on it), so every node agrees
//! whichever backend; [`Store::gc_identities`] deletes unused ones. In Kubernetes mode the
//! identity-policy records are ConfigMaps labelled with their kind for now (nodeseal's own CRDs
//! come later).
//!
//! Errors are one [`StoreError`] whatever the backend: a backend's failure is
//! [`StoreError::Backend`], which names the backend, the operation and the key or path, and
//! says whether it is transient; no backend client type appears in this API.
//!
//! Not here: any policy about what records mean (when to rekey, whom to sign for): that is the
//! agent's and keymgr's job. The Kubernetes backend does decide where a node's addresses come
//! from (its Node object), since that is the point of the backend.
//!
//! ```no_run
//! # async fn demo() -> Result<(), nodeseal_store::StoreError> {
//! use futures::StreamExt as _;
//! use nodeseal_store::{DirOptions, DirStore, Event, Kind, Store};
//!
//! let store = Store::new(DirStore::open("/run/nodeseal/state", DirOptions::default()).await?);
//! let generation = store.bump_rekey_generation().await?;
//! let mut events = store.watch(&[Kind::Node, Kind::Revocation]);
//! while let Some(event) = events.next().await {
//!     if let Event::Put(record) = event {
//!         println!("{} changed (rekey generation {generation})", record.key());
//!     }
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod backend;
#[cfg(feature = "dir")]
mod dir;
mod error;
#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "kube")]
pub mod kube;
mod lease;
mod record;
#[cfg(any(test, feature = "testing"))]
pub mod test_helpers;
mod types;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use nodeseal_policy::labels::Labels;
use tracing::{debug, warn};

pub use self::backend::{Backoff, LeaseId, RawEvent, StoreBackend};
#[cfg(feature = "dir")]
pub use self::dir::{DirOptions, DirStore};
pub use self::error::{BoxError, RecordError, RecordProblem, StoreError};
#[cfg(feature = "etcd")]
pub use self::etcd::{
    EtcdClientCert, EtcdCredentials, EtcdOptions, EtcdPassword, EtcdSecurityError, EtcdStore,
    EtcdTls, FileRole,
};
#[cfg(feature = "kube")]
pub use self::kube::{KubeOptions, KubeStore};
pub use self::lease::NodeLease;
pub use self::record::{
    CertificateRecord, CsrRecord, Endpoint, EndpointId, FIRST_WORKLOAD_IDENTITY, Identity,
    IdentityClaim, IdentityNumber, IdentityNumberError, Key, Kind, LabelsDigest, MAX_ADDRESSES,
    MAX_LABELS, MAX_POLICY_DOCUMENT_BYTES, MAX_RECORD_BYTES, NodeRecord, NodeStatus, PeerStatus,
    PolicyDocument, Record, RecordKind, RekeyGeneration, Revocation, RevocationId, TrustBundle,
    check_interface,
};
pub use self::types::{CertSerial, IdError, NodeName, SpiffeId, WgPublicKey};

use self::record::{decode_as, encode};

/// How many times [`Store::update`] retries a lost compare-and-swap before giving up.
const MAX_CAS_ATTEMPTS: u32 = 1000;

/// The typed handle on the cluster state. Cheap to clone; all clones share the backend.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Arc<dyn StoreBackend>,
}

/// The valid records of one kind, and the invalid ones that were skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing<R> {
    /// Valid records, in key order.
    pub records: Vec<R>,
    /// Records that failed validation (already logged at `warn`).
    pub invalid: Vec<RecordError>,
}

/// Every record the watch covers, at one point in time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Valid records, in key order.
    pub records: Vec<Record>,
    /// Records that failed validation (already logged at `warn`).
    pub invalid: Vec<RecordError>,
}

/// What a watch reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// The first event: the current state.
    Snapshot(Snapshot),
    /// A record was created or changed.
    Put(Record),
    /// A record was deleted (or, with etcd, its lease expired).
    Deleted(Key),
    /// A record was written but is invalid (already logged at `warn`). Treat its key as
    /// absent: whatever valid value it had before is gone.
    Invalid(RecordError),
    /// The backend was lost; the watch keeps retrying with bounded backoff. Sent once per
    /// outage. Whatever the caller knows stays as it was until [`Event::Resynced`].
    Interrupted(StoreError),
    /// The backend is back: the complete current state, which replaces the caller's view
    /// (records missing from it were deleted during the outage).
    Resynced(Snapshot),
}

impl Store {
    /// Wraps a backend.
    pub fn new(backend: impl StoreBackend) -> Self {
        Self {
            backend: Arc::new(backend),
        }
    }

    /// Wraps a shared backend.
    pub fn from_arc(backend: Arc<dyn StoreBackend>) -> Self {
        Self { backend }
    }

    /// The backend's name (`"directory"`, `"etcd"`).
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Reads one record.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] if the stored record is invalid; the backend's errors
    /// ([`StoreError::Backend`]).
    pub async fn get<R: RecordKind>(&self, id: &R::Id) -> Result<Option<R>, StoreError> {
        let key = R::key_of(id);
        match self.backend.get(&key.to_string()).await? {
            None => Ok(None),
            Some(value) => Ok(Some(decode_as::<R>(&key, &value)?)),
        }
    }

    /// Reads every record of a kind; invalid ones are logged, skipped and returned apart.
    ///
    /// # Errors
    ///
    /// The backend's errors.
    pub async fn list<R: RecordKind>(&self) -> Result<Listing<R>, StoreError> {
        let entries = self.backend.list(R::KIND.as_str()).await?;
        let mut listing = Listing {
            records: Vec::with_capacity(entries.len()),
            invalid: Vec::new(),
        };
        for (key, value) in entries {
            match decode_entry(&key, &value) {
                Ok(record) => match R::from_record(record) {
                    Some(record) => listing.records.push(record),
                    None => debug!(key, "listed key of another kind, skipped"),
                },
                Err(error) => listing.invalid.push(error),
            }
        }
        Ok(listing)
    }

    /// Writes a record after validating it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] if the record breaks a rule; the backend's errors.
    pub async fn put<R: RecordKind>(&self, record: &R) -> Result<(), StoreError> {
        let value = encode(record)?;
        self.backend
            .put(&record.key().to_string(), value, None)
            .await
    }

    /// Deletes a record; returns whether it existed.
    ///
    /// # Errors
    ///
    /// The backend's errors.
    pub async fn delete<R: RecordKind>(&self, id: &R::Id) -> Result<bool, StoreError> {
        self.backend.delete(&R::key_of(id).to_string()).await
    }

    /// Read-modify-write with compare-and-swap: calls `change` with the current record (or
    /// `None`) and stores what it returns if nobody wrote in between, retrying otherwise.
    /// `change` may run several times. Returns the record stored.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] if the current record is invalid (it is not overwritten: an
    /// operator should look) or the new one is; [`StoreError::Contended`] after
    /// 1000 lost attempts; the backend's errors.
    pub async fn update<R, F>(&self, id: &R::Id, mut change: F) -> Result<R, StoreError>
    where
        R: RecordKind,
        F: FnMut(Option<R>) -> R + Send,
    {
        let key = R::key_of(id);
        let key_text = key.to_string();
        for attempt in 1..=MAX_CAS_ATTEMPTS {
            let current = self.backend.get(&key_text).await?;
            let decoded = match &current {
                None => None,
                Some(value) => Some(decode_as::<R>(&key, value)?),
            };
            let next = change(decoded);
            if next.key() != key {
                return Err(RecordError {
                    key: key_text,
                    problem: RecordProblem::KeyMismatch {
                        expected: next.key().to_string(),
                    },
                }
                .into());
            }
            let value = encode(&next)?;
            if self
                .backend
                .compare_and_swap(&key_text, current.as_deref(), value)
                .await?
            {
                return Ok(next);
            }
            debug!(key = key_text, attempt, "compare-and-swap lost, retrying");
            // Contention is between a handful of writers: a short random pause spreads them.
            let pause =
                Duration::from_micros(rand::random_range(0..=(200 * u64::from(attempt.min(50)))));
            tokio::time::sleep(pause).await;
        }
        Err(StoreError::Contended {
            key: key_text,
            attempts: MAX_CAS_ATTEMPTS,
        })
    }

    /// Increments the cluster-wide rekey generation (from 0 if unset) with compare-and-swap,
    /// so concurrent callers never lose an increment. Returns the new generation.
    ///
    /// # Errors
    ///
    /// As [`update`](Self::update).
    pub async fn bump_rekey_generation(&self) -> Result<u64, StoreError> {
        let record = self
            .update::<RekeyGeneration, _>(&(), |current| RekeyGeneration {
                generation: current.map_or(0, |r| r.generation).saturating_add(1),
                requested_at: SystemTime::now(),
            })
            .await?;
        Ok(record.generation)
    }

    /// Creates a record only if its key is absent (etcd: a transaction on create revision 0;
    /// directory: under the store's lock; Kubernetes: create, which fails with AlreadyExists).
    /// Returns whether it created it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] if the record breaks a rule; the backend's errors.
    pub async fn create<R: RecordKind>(&self, record: &R) -> Result<bool, StoreError> {
        let value = encode(record)?;
        self.backend
            .compare_and_swap(&record.key().to_string(), None, value)
            .await
    }

    /// The identity of a label set, allocating the lowest free one (256 or above) if it has
    /// none. Every node gets the same number for the same labels, and different numbers for
    /// different labels, however many allocate at once:
    ///
    /// 1. the label set's [`IdentityClaim`] (keyed by the labels' digest), if present, names its
    ///    number;
    /// 2. otherwise the lowest number without an [`Identity`] record is taken by creating that
    ///    record (create-if-absent: a number has one owner), then the claim is created
    ///    (create-if-absent: a label set has one number). Whoever loses the claim releases the
    ///    number it took and uses the winner's.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] if a stored claim or identity is invalid, or a claim names a
    /// number that another label set holds; [`StoreError::Contended`] after 1000 lost races;
    /// the backend's errors.
    pub async fn allocate_identity(&self, labels: &Labels) -> Result<IdentityNumber, StoreError> {
        let digest = LabelsDigest::of(labels);
        for attempt in 1..=MAX_CAS_ATTEMPTS {
            if let Some(claim) = self.get::<IdentityClaim>(&digest).await? {
                if self.identity_matches(&claim).await? {
                    return Ok(claim.number);
                }
            } else {
                let number = self.lowest_free_identity().await?;
                let identity = Identity {
                    number,
                    labels: labels.clone(),
                };
                if self.create(&identity).await? {
                    let claim = IdentityClaim {
                        labels: labels.clone(),
                        number,
                    };
                    if self.create(&claim).await? {
                        debug!(identity = %number, labels = %labels, "allocated identity");
                        return Ok(number);
                    }
                    // Another allocation claimed the labels first: give the number back.
                    self.delete::<Identity>(&number).await?;
                }
            }
            debug!(labels = %labels, attempt, "identity allocation lost a race, retrying");
            let pause =
                Duration::from_micros(rand::random_range(0..=(200 * u64::from(attempt.min(50)))));
            tokio::time::sleep(pause).await;
        }
        Err(StoreError::Contended {
            key: IdentityClaim::key_of(&digest).to_string(),
            attempts: MAX_CAS_ATTEMPTS,
        })
    }

    /// Whether the claim's identity record exists with the claim's labels; recreates it if it
    /// is missing (an allocation that stopped half way, or a collection racing an allocation).
    async fn identity_matches(&self, claim: &IdentityClaim) -> Result<bool, StoreError> {
        let mismatch = |other: &Identity| {
            StoreError::Invalid(RecordError {
                key: claim.key().to_string(),
                problem: RecordProblem::Field {
                    field: "number",
                    reason: format!(
                        "identity {} belongs to other labels ({})",
                        claim.number, other.labels
                    ),
                },
            })
        };
        match self.get::<Identity>(&claim.number).await? {
            Some(identity) if identity.labels == claim.labels => Ok(true),
            Some(other) => Err(mismatch(&other)),
            None => {
                let identity = Identity {
                    number: claim.number,
                    labels: claim.labels.clone(),
                };
                if self.create(&identity).await? {
                    return Ok(true);
                }
                match self.get::<Identity>(&claim.number).await? {
                    Some(identity) if identity.labels == claim.labels => Ok(true),
                    Some(other) => Err(mismatch(&other)),
                    None => Ok(false),
                }
            }
        }
    }

    /// The lowest number without an identity record (an invalid record holds its number too).
    async fn lowest_free_identity(&self) -> Result<IdentityNumber, StoreError> {
        let listing = self.list::<Identity>().await?;
        let mut used: BTreeSet<IdentityNumber> = listing
            .records
            .iter()
            .map(|identity| identity.number)
            .collect();
        used.extend(listing.invalid.iter().filter_map(|error| {
            error
                .key
                .split_once('/')
                .and_then(|(_, id)| id.parse::<IdentityNumber>().ok())
        }));
        let mut candidate = IdentityNumber::FIRST;
        for number in used {
            if number != candidate {
                break;
            }
            candidate = candidate.next().ok_or_else(|| StoreError::Config {
                reason: "every identity number is in use".to_owned(),
            })?;
        }
        Ok(candidate)
    }

    /// Deletes the identities (and their claims) whose numbers are not in `in_use`; returns the
    /// numbers deleted. The claim goes first, so that a label set never points at a missing
    /// number for long. An allocation racing the collection of the same labels may recreate
    /// the identity it read the claim of (see [`allocate_identity`](Self::allocate_identity)),
    /// so callers collect only identities unused for a grace period.
    ///
    /// # Errors
    ///
    /// The backend's errors.
    pub async fn gc_identities(
        &self,
        in_use: &BTreeSet<IdentityNumber>,
    ) -> Result<Vec<IdentityNumber>, StoreError> {
        let claims = self.list::<IdentityClaim>().await?;
        for claim in &claims.records {
            if !in_use.contains(&claim.number) {
                self.delete::<IdentityClaim>(&LabelsDigest::of(&claim.labels))
                    .await?;
            }
        }
        let mut deleted = Vec::new();
        for identity in self.list::<Identity>().await?.records {
            if !in_use.contains(&identity.number)
                && self.delete::<Identity>(&identity.number).await?
            {
                deleted.push(identity.number);
            }
        }
        Ok(deleted)
    }

    /// Publishes this node's record with liveness: with etcd it is attached to a lease of
    /// `ttl` (etcd rounds up to whole seconds, minimum about 2 s) and disappears unless the
    /// returned [`NodeLease`] renews it. The directory backend has no leases: the record stays
    /// until deleted.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] if the record breaks a rule; the backend's errors.
    pub async fn publish_node(
        &self,
        record: NodeRecord,
        ttl: Duration,
    ) -> Result<NodeLease, StoreError> {
        NodeLease::publish(self.clone(), record, ttl).await
    }

    /// Watches the given kinds (all kinds if `kinds` is empty): [`Event::Snapshot`] first,
    /// then changes; across backend outages [`Event::Interrupted`] and [`Event::Resynced`].
    /// The stream never ends by itself; drop it to stop watching.
    ///
    /// Changes of one record arrive in order. Across kinds, the etcd backend (one etcd watcher
    /// per kind) may deliver changes out of their global order.
    pub fn watch(&self, kinds: &[Kind]) -> BoxStream<'static, Event> {
        let kinds: Vec<Kind> = if kinds.is_empty() {
            Kind::ALL.to_vec()
        } else {
            kinds.to_vec()
        };
        let backend = self.backend.name();
        self.backend
            .watch(&kinds)
            .filter_map(move |raw| {
                let event = typed_event(raw, &kinds, backend);
                async move { event }
            })
            .boxed()
    }

    pub(crate) fn backend(&self) -> &dyn StoreBackend {
        &*self.backend
    }
}

/// Parses a listed key and decodes its value; logs what is wrong.
fn decode_entry(key: &str, value: &[u8]) -> Result<Record, RecordError> {
    let result = Key::parse(key)
        .map_err(|problem| RecordError {
            key: key.to_owned(),
            problem,
        })
        .and_then(|parsed| Record::decode(&parsed, value));
    if let Err(error) = &result {
        warn!(key, %error, "skipping invalid record");
    }
    result
}

fn kind_of(key: &str) -> Option<Kind> {
    let prefix = key.split_once('/').map_or(key, |(prefix, _)| prefix);
    Kind::ALL.into_iter().find(|kind| kind.as_str() == prefix)
}

/// Keeps keys of watched kinds, and keys of no known kind (reported as invalid, so that a
/// stray key is visible rather than silently ignored).
fn wanted(key: &str, kinds: &[Kind]) -> bool {
    kind_of(key).is_none_or(|kind| kinds.contains(&kind))
}

fn snapshot(entries: Vec<(String, Vec<u8>)>, kinds: &[Kind]) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (key, value) in entries {
        if !wanted(&key, kinds) {
            continue;
        }
        match decode_entry(&key, &value) {
            Ok(record) => snapshot.records.push(record),
            Err(error) => snapshot.invalid.push(error),
        }
    }
    snapshot.records.sort_by_key(Record::key);
    snapshot
}

fn typed_event(raw: RawEvent, kinds: &[Kind], backend: &'static str) -> Option<Event> {
    match raw {
        RawEvent::Snapshot {
            entries,
            resync: false,
        } => Some(Event::Snapshot(snapshot(entries, kinds))),
        RawEvent::Snapshot {
            entries,
            resync: true,
        } => Some(Event::Resynced(snapshot(entries, kinds))),
        RawEvent::Put(key, value) => {
            if !wanted(&key, kinds) {
                return None;
            }
            Some(match decode_entry(&key, &value) {
                Ok(record) => Event::Put(record),
                Err(error) => Event::Invalid(error),
            })
        }
        RawEvent::Delete(key) => {
            if !wanted(&key, kinds) {
                return None;
            }
            match Key::parse(&key) {
                Ok(key) => Some(Event::Deleted(key)),
                Err(problem) => {
                    debug!(key, %problem, "deleted key is not a record key, ignored");
                    None
                }
            }
        }
        RawEvent::Interrupted(error) => {
            warn!(backend, error = %error, "store watch interrupted, retrying");
            Some(Event::Interrupted(error))
        }
        RawEvent::Unusable(error) => {
            if !wanted(&error.key, kinds) {
                return None;
            }
            warn!(backend, %error, "unusable record");
            Some(Event::Invalid(error))
        }
    }
}
