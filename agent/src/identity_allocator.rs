//! keymgr as the identity allocator of Kubernetes mode.
//!
//! Authentication is not authorization: a node agent proves which node it is, which does not
//! make it the right party to say which label sets exist cluster-wide. In Kubernetes mode agents
//! only read identities (their RBAC has no write on ConfigMaps); the keymgr leader allocates one
//! identity ([`Store::allocate_identity`]) for every distinct security label set of the
//! cluster's pods (the store's endpoint records, derived from Pods) and collects identities no
//! pod has used for a grace period ([`Store::gc_identities`]). The grace period covers a pod
//! that is replaced by one with the same labels (a rollout), so its identity number does not
//! change under the agents, and a watch that reports a deletion before the matching creation.
//!
//! Collection pauses while the watch is interrupted or an allocation failed: an identity is
//! deleted only when every current label set is known to hold its own number.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt as _;
use nodeseal_policy::labels::Labels;
use nodeseal_store::{Event, Identity, IdentityNumber, Kind, Record, Snapshot, Store, StoreError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How the allocator paces itself.
#[derive(Clone, Copy, Debug)]
pub struct AllocatorOptions {
    /// How long an identity stays after the last pod with its labels went.
    pub grace: Duration,
}

impl Default for AllocatorOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(60),
        }
    }
}

/// What the allocator knows.
struct Allocator {
    store: Store,
    options: AllocatorOptions,
    /// Endpoint key → its security labels.
    endpoints: BTreeMap<String, Labels>,
    /// The numbers allocated for label sets, as far as this term knows.
    allocated: BTreeMap<Labels, IdentityNumber>,
    /// Identities seen unused, and since when.
    unused_since: BTreeMap<IdentityNumber, Instant>,
    /// A complete view of the endpoints has arrived and no outage is pending.
    synced: bool,
    /// Label sets changed since the last allocation pass (or it failed).
    dirty: bool,
}

/// Runs until `cancel` fires: allocates identities for the pods' label sets and collects unused
/// ones. Store errors are logged and retried on the next tick; nothing here ends the loop
/// except `cancel` (or the watch ending, which the store never does).
pub async fn run(store: Store, options: AllocatorOptions, cancel: CancellationToken) {
    let mut events = store.watch(&[Kind::Endpoint]);
    let mut allocator = Allocator {
        store,
        options,
        endpoints: BTreeMap::new(),
        allocated: BTreeMap::new(),
        unused_since: BTreeMap::new(),
        synced: false,
        dirty: false,
    };
    // Often enough that an identity goes about `grace` after its last pod, and allocations
    // that failed are retried within seconds.
    let period = (options.grace / 4).clamp(Duration::from_millis(200), Duration::from_secs(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            event = events.next() => {
                let Some(event) = event else { return };
                allocator.on_event(event);
                allocator.allocate().await;
            }
            _ = tick.tick() => {
                allocator.allocate().await;
                if let Err(error) = allocator.collect().await {
                    warn!(%error, "collecting unused identities; retrying");
                }
            }
        }
    }
}

impl Allocator {
    fn on_event(&mut self, event: Event) {
        match event {
            Event::Snapshot(snapshot) | Event::Resynced(snapshot) => self.replace(snapshot),
            Event::Put(Record::Endpoint(endpoint)) => {
                let key = nodeseal_store::RecordKind::key(&endpoint).to_string();
                self.endpoints.insert(key, endpoint.security_labels());
                self.dirty = true;
            }
            Event::Deleted(key) => {
                self.endpoints.remove(&key.to_string());
            }
            // An unusable pod holds no identity (the agents treat it as absent too).
            Event::Invalid(error) => {
                self.endpoints.remove(&error.key);
            }
            Event::Interrupted(_) => self.synced = false,
            _ => {}
        }
    }

    fn replace(&mut self, snapshot: Snapshot) {
        self.endpoints = snapshot
            .records
            .into_iter()
            .filter_map(|record| match record {
                Record::Endpoint(endpoint) => Some((
                    nodeseal_store::RecordKind::key(&endpoint).to_string(),
                    endpoint.security_labels(),
                )),
                _ => None,
            })
            .collect();
        // The cluster may have changed during an outage: ask the store again.
        self.allocated.clear();
        self.synced = true;
        self.dirty = true;
    }

    /// Allocates a number for every label set that has none yet.
    async fn allocate(&mut self) {
        if !self.dirty || !self.synced {
            return;
        }
        let wanted: BTreeSet<&Labels> = self.endpoints.values().collect();
        let mut failed = false;
        for labels in wanted {
            if self.allocated.contains_key(labels) {
                continue;
            }
            match self.store.allocate_identity(labels).await {
                Ok(number) => {
                    debug!(identity = %number, %labels, "identity allocated");
                    self.allocated.insert(labels.clone(), number);
                }
                Err(error) => {
                    warn!(%labels, error = %error_text(&error), "allocating an identity; retrying");
                    failed = true;
                }
            }
        }
        self.dirty = failed;
    }

    /// Deletes identities unused for the grace period.
    async fn collect(&mut self) -> Result<(), StoreError> {
        if !self.synced || self.dirty {
            return Ok(());
        }
        let mut in_use = BTreeSet::new();
        for labels in self.endpoints.values() {
            match self.allocated.get(labels) {
                Some(number) => {
                    in_use.insert(*number);
                }
                // Not allocated yet: its claim may name any number, so collect nothing.
                None => return Ok(()),
            }
        }
        let listing = self.store.list::<Identity>().await?;
        let now = Instant::now();
        let existing: BTreeSet<IdentityNumber> = listing
            .records
            .iter()
            .map(|identity| identity.number)
            .collect();
        self.unused_since
            .retain(|number, _| existing.contains(number) && !in_use.contains(number));
        for number in existing.difference(&in_use) {
            self.unused_since.entry(*number).or_insert(now);
        }
        let expired = self
            .unused_since
            .values()
            .any(|since| now.duration_since(*since) >= self.options.grace);
        if !expired {
            return Ok(());
        }
        let mut keep = in_use;
        keep.extend(
            self.unused_since
                .iter()
                .filter(|(_, since)| now.duration_since(**since) < self.options.grace)
                .map(|(number, _)| *number),
        );
        // Invalid identity records hold their numbers: never collected here.
        keep.extend(listing.invalid.iter().filter_map(|error| {
            error
                .key
                .split_once('/')
                .and_then(|(_, id)| id.parse::<IdentityNumber>().ok())
        }));
        let deleted = self.store.gc_identities(&keep).await?;
        for number in &deleted {
            self.unused_since.remove(number);
        }
        self.allocated.retain(|_, number| !deleted.contains(number));
        if !deleted.is_empty() {
            let numbers: Vec<String> = deleted.iter().map(ToString::to_string).collect();
            info!(identities = %numbers.join(","), "collected identities no pod uses");
        }
        Ok(())
    }
}

fn error_text(error: &StoreError) -> String {
    crate::peer::error_chain(error)
}
