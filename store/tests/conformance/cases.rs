//! The conformance cases: what every [`StoreBackend`] must do, written once against
//! [`Harness`]. `tests/conformance.rs` runs each case against each backend.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use nodeseal_store::test_helpers::node_record;
use nodeseal_store::{
    Event, Key, Kind, MAX_RECORD_BYTES, NodeName, NodeRecord, Record, RecordKind as _,
    RecordProblem, RekeyGeneration, Store, StoreBackend, StoreError, TrustBundle,
};
use tokio_util::sync::CancellationToken;

/// How long a case waits for one watch event. Generous: the etcd backend reconnects with
/// backoff after a restart, and the machine may be busy.
pub const WAIT: Duration = Duration::from_secs(20);

/// One backend under test, with the powers the cases need beyond the store's own API.
pub trait Harness: Send + Sync {
    /// The backend's name, as [`StoreBackend::name`] reports it.
    fn name(&self) -> &'static str;

    /// A new client (or instance) of the backend, on the same state as every other one this
    /// harness made: two of them behave like two processes.
    async fn backend(&self) -> Arc<dyn StoreBackend>;

    /// Stores `bytes` under `key` the way a foreign writer could, bypassing every check
    /// (keys that are not record keys, values that are not records).
    async fn write_raw(&self, key: &str, bytes: &[u8]);

    /// Takes the backend away from its clients (a stopped server, a vanished directory).
    async fn interrupt(&self);

    /// Brings the backend back after [`interrupt`](Self::interrupt), with its state.
    async fn resume(&self);

    /// Whether records published with a lease vanish when the lease is not renewed. Backends
    /// without leases keep such records until they are deleted.
    fn has_leases(&self) -> bool;

    /// A [`Store`] on a new client.
    async fn store(&self) -> Store {
        Store::from_arc(self.backend().await)
    }
}

fn name(text: &str) -> NodeName {
    NodeName::new(text).expect("test node name")
}

/// The next watch event, within [`WAIT`].
pub async fn next(events: &mut BoxStream<'static, Event>) -> Event {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("store event within 20 s")
        .expect("watch streams never end")
}

/// Applies an event to a view of the store, as an agent would.
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
        // Event is non-exhaustive; Invalid and Interrupted leave the view as it was.
        _ => {}
    }
}

fn keys(view: &BTreeMap<Key, Record>) -> Vec<String> {
    view.keys().map(ToString::to_string).collect()
}

/// Asserts that `error` is a failure of this harness's backend that retrying may cure, and
/// that its message names the backend.
fn assert_transient_backend_error<H: Harness>(harness: &H, error: &StoreError) {
    match error {
        StoreError::Backend {
            backend, transient, ..
        } => {
            assert_eq!(*backend, harness.name(), "{error}");
            assert!(*transient, "{error}");
        }
        other => panic!("expected a transient backend error, got {other:?}"),
    }
    assert!(error.is_transient());
    assert!(
        error.to_string().contains(harness.name()),
        "message names the backend: {error}"
    );
}

/// Put, get, list and delete of records of several kinds.
pub async fn round_trip<H: Harness>(harness: &H) {
    let store = harness.store().await;
    assert_eq!(store.backend_name(), harness.name());
    let a = node_record("a", 1);
    let b = node_record("b", 2);
    store.put(&b).await.expect("put b");
    store.put(&a).await.expect("put a");
    let bundle = TrustBundle {
        bundle: "{\"keys\":[]}".to_owned(),
        signature: None,
        signer_pem: None,
    };
    store.put(&bundle).await.expect("put bundle");

    assert_eq!(
        store.get::<NodeRecord>(&name("a")).await.expect("get a"),
        Some(a.clone())
    );
    assert_eq!(
        store.get::<NodeRecord>(&name("zz")).await.expect("get zz"),
        None
    );
    assert_eq!(
        store.get::<TrustBundle>(&()).await.expect("get bundle"),
        Some(bundle)
    );
    // Another client sees the same state.
    let other = harness.store().await;
    let listing = other.list::<NodeRecord>().await.expect("list");
    assert_eq!(listing.records, vec![a.clone(), b.clone()], "key order");
    assert!(listing.invalid.is_empty(), "{:?}", listing.invalid);

    // Overwrite.
    let mut changed = a.clone();
    changed.handshake.set_port(4251);
    store.put(&changed).await.expect("overwrite a");
    assert_eq!(
        other.get::<NodeRecord>(&name("a")).await.expect("get a"),
        Some(changed)
    );

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
    assert_eq!(
        store.get::<NodeRecord>(&name("a")).await.expect("get a"),
        None
    );
    let listing = store.list::<NodeRecord>().await.expect("list");
    assert_eq!(listing.records, vec![b]);
}

/// Compare-and-swap: creating an absent key, losing with a stale expectation, and no lost
/// increment among concurrent [`Store::update`]s from two clients.
pub async fn compare_and_swap<H: Harness>(harness: &H) {
    const TASKS: u64 = 16;
    const INCREMENTS: u64 = 5;

    let backend = harness.backend().await;
    assert!(
        backend
            .compare_and_swap("csrs/x", None, b"1".to_vec())
            .await
            .expect("create absent")
    );
    assert!(
        !backend
            .compare_and_swap("csrs/x", None, b"2".to_vec())
            .await
            .expect("create again"),
        "only one creator wins"
    );
    assert!(
        !backend
            .compare_and_swap("csrs/x", Some(b"2"), b"3".to_vec())
            .await
            .expect("stale expectation"),
        "a wrong expected value loses"
    );
    assert!(
        backend
            .compare_and_swap("csrs/x", Some(b"1"), b"3".to_vec())
            .await
            .expect("swap")
    );
    assert_eq!(
        backend.get("csrs/x").await.expect("get"),
        Some(b"3".to_vec())
    );

    let stores = [harness.store().await, harness.store().await];
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = stores[usize::from(task % 2 == 1)].clone();
        tasks.spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..INCREMENTS {
                let record = store
                    .update::<RekeyGeneration, _>(&(), |current| RekeyGeneration {
                        generation: current.map_or(0, |r| r.generation) + 1,
                        requested_at: std::time::SystemTime::now(),
                    })
                    .await
                    .expect("update");
                seen.push(record.generation);
            }
            seen
        });
    }
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(seen) = tasks.join_next().await {
            all.extend(seen.expect("update task"));
        }
    })
    .await
    .expect("updates finish within 120 s");
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=TASKS * INCREMENTS).collect::<Vec<u64>>(),
        "every update saw a distinct generation: none was lost"
    );
    let stored = stores[0].get::<RekeyGeneration>(&()).await.expect("get");
    assert_eq!(stored.map(|r| r.generation), Some(TASKS * INCREMENTS));
}

/// A watch sends the snapshot, then every change of the watched kinds, in order per key:
/// a backend may coalesce quick successive writes of one key (the directory backend
/// rescans), but never reorders them, and it always ends at the latest state. Unwatched
/// kinds send nothing.
pub async fn watch_order<H: Harness>(harness: &H) {
    let store = harness.store().await;
    store.put(&node_record("a", 1)).await.expect("put a");
    let mut events = store.watch(&[Kind::Node, Kind::RekeyGeneration]);
    match next(&mut events).await {
        Event::Snapshot(snapshot) => {
            assert_eq!(snapshot.records, vec![node_record("a", 1).into_record()]);
            assert!(snapshot.invalid.is_empty());
        }
        other => panic!("expected the snapshot first, got {other:?}"),
    }

    // Per key, the states written, in order (None: deleted).
    let writer = harness.store().await;
    let mut written: BTreeMap<String, Vec<Option<Record>>> = BTreeMap::new();
    for port in [4300, 4301, 4302] {
        let mut a = node_record("a", 1);
        a.handshake.set_port(port);
        writer.put(&a).await.expect("put a");
        written
            .entry("nodes/a".to_owned())
            .or_default()
            .push(Some(a.into_record()));
    }
    writer
        .put(&TrustBundle {
            bundle: "{}".to_owned(),
            signature: None,
            signer_pem: None,
        })
        .await
        .expect("put unwatched bundle");
    writer.put(&node_record("b", 2)).await.expect("put b");
    written
        .entry("nodes/b".to_owned())
        .or_default()
        .push(Some(node_record("b", 2).into_record()));
    writer
        .delete::<NodeRecord>(&name("a"))
        .await
        .expect("delete a");
    written.entry("nodes/a".to_owned()).or_default().push(None);
    let generation = writer.bump_rekey_generation().await.expect("bump");
    let rekey = writer
        .get::<RekeyGeneration>(&())
        .await
        .expect("get rekey")
        .expect("rekey set");
    assert_eq!(rekey.generation, generation);
    written
        .entry(RekeyGeneration::key_of(&()).to_string())
        .or_default()
        .push(Some(rekey.into_record()));

    // Collect until every key reached its last written state.
    let mut seen: BTreeMap<String, Vec<Option<Record>>> = BTreeMap::new();
    let done = |seen: &BTreeMap<String, Vec<Option<Record>>>| {
        written.iter().all(|(key, states)| {
            seen.get(key).and_then(|s| s.last()) == Some(&states[states.len() - 1])
        })
    };
    while !done(&seen) {
        match next(&mut events).await {
            Event::Put(record) => {
                let key = record.key().to_string();
                assert!(written.contains_key(&key), "event for unwatched {key}");
                seen.entry(key).or_default().push(Some(record));
            }
            Event::Deleted(key) => {
                let key = key.to_string();
                assert!(written.contains_key(&key), "event for unwatched {key}");
                seen.entry(key).or_default().push(None);
            }
            other => panic!("expected puts and deletes, got {other:?}"),
        }
    }
    for (key, states) in &seen {
        let mut remaining = written[key].iter();
        for state in states {
            assert!(
                remaining.any(|w| w == state),
                "{key}: events {states:?} are not the writes {:?} in order",
                written[key]
            );
        }
    }
    // Nothing else arrives: no event for the unwatched kind, no duplicate.
    if let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
        panic!("no more events expected, got {event:?}");
    }
}

/// Values nobody should have stored (bad JSON, too large, a key that is not a record key,
/// content that belongs under another key) are reported as invalid with their key and
/// skipped: never fatal in get, list, update or watch.
pub async fn malformed_records<H: Harness>(harness: &H) {
    let store = harness.store().await;
    store.put(&node_record("good", 1)).await.expect("put good");
    harness.write_raw("nodes/broken", b"{\"name\": ").await;
    let mut huge = serde_json::to_vec(&node_record("huge", 2)).expect("json");
    huge.resize(MAX_RECORD_BYTES + 1, b' ');
    harness.write_raw("nodes/huge", &huge).await;
    harness.write_raw("nodes/Bad_Name", b"{}").await;
    let impostor = serde_json::to_vec(&node_record("other", 3)).expect("json");
    harness.write_raw("nodes/impostor", &impostor).await;

    let listing = store
        .list::<NodeRecord>()
        .await
        .expect("list never fails on bad records");
    assert_eq!(listing.records, vec![node_record("good", 1)]);
    let problems: Vec<(&str, &RecordProblem)> = listing
        .invalid
        .iter()
        .map(|e| (e.key.as_str(), &e.problem))
        .collect();
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(
        matches!(
            problems[0],
            ("nodes/Bad_Name", RecordProblem::BadKey { .. })
        ),
        "{problems:?}"
    );
    assert!(
        matches!(problems[1], ("nodes/broken", RecordProblem::Json { .. })),
        "{problems:?}"
    );
    assert!(
        matches!(problems[2], ("nodes/huge", RecordProblem::TooLarge { .. })),
        "{problems:?}"
    );
    assert_eq!(
        problems[3],
        (
            "nodes/impostor",
            &RecordProblem::KeyMismatch {
                expected: "nodes/other".to_owned()
            }
        )
    );

    for (id, key) in [
        ("broken", "nodes/broken"),
        ("huge", "nodes/huge"),
        ("impostor", "nodes/impostor"),
    ] {
        match store.get::<NodeRecord>(&name(id)).await {
            Err(StoreError::Invalid(error)) => assert_eq!(error.key, key),
            other => panic!("{key}: expected a typed invalid-record error, got {other:?}"),
        }
    }
    // An invalid record is not overwritten by a read-modify-write: an operator should look.
    match store
        .update::<NodeRecord, _>(&name("broken"), |_| node_record("broken", 4))
        .await
    {
        Err(StoreError::Invalid(error)) => assert_eq!(error.key, "nodes/broken"),
        other => panic!("expected update to refuse the invalid record, got {other:?}"),
    }

    let mut events = store.watch(&[Kind::Node]);
    match next(&mut events).await {
        Event::Snapshot(snapshot) => {
            assert_eq!(snapshot.records, vec![node_record("good", 1).into_record()]);
            let keys: Vec<&str> = snapshot.invalid.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(
                keys,
                [
                    "nodes/Bad_Name",
                    "nodes/broken",
                    "nodes/huge",
                    "nodes/impostor"
                ]
            );
        }
        other => panic!("expected the snapshot, got {other:?}"),
    }
    harness.write_raw("nodes/late", b"[]").await;
    match next(&mut events).await {
        Event::Invalid(error) => assert_eq!(error.key, "nodes/late"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    // A valid record replaced by garbage is reported too; the watch goes on.
    harness.write_raw("nodes/good", b"null").await;
    match next(&mut events).await {
        Event::Invalid(error) => assert_eq!(error.key, "nodes/good"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    store.put(&node_record("fine", 5)).await.expect("put fine");
    match next(&mut events).await {
        Event::Put(record) => assert_eq!(record, node_record("fine", 5).into_record()),
        other => panic!("expected Put, got {other:?}"),
    }
}

/// Node records published with a TTL. With leases: a record whose lease is not renewed
/// vanishes after about the TTL, a renewed one stays, and renewing a lost lease publishes the
/// record again. Without: the record stays until revoked (the documented behaviour of the
/// directory backend).
pub async fn leases<H: Harness>(harness: &H) {
    let store = harness.store().await;
    let ttl = Duration::from_secs(2);
    let mut events = store.watch(&[Kind::Node]);
    assert!(matches!(next(&mut events).await, Event::Snapshot(s) if s.records.is_empty()));

    let mut kept = store
        .publish_node(node_record("kept", 1), ttl)
        .await
        .expect("publish kept");
    assert!(
        matches!(next(&mut events).await, Event::Put(r) if r.key().to_string() == "nodes/kept")
    );
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let renewing = tokio::spawn(async move {
        let result = kept.run(stop).await;
        (kept, result)
    });

    let started = Instant::now();
    let mut dying = store
        .publish_node(node_record("dying", 2), ttl)
        .await
        .expect("publish dying");
    assert!(
        matches!(next(&mut events).await, Event::Put(r) if r.key().to_string() == "nodes/dying")
    );
    if harness.has_leases() {
        match next(&mut events).await {
            Event::Deleted(key) => assert_eq!(key, NodeRecord::key_of(&name("dying"))),
            other => panic!("expected the lease to expire, got {other:?}"),
        }
        let lived = started.elapsed();
        assert!(lived >= ttl * 3 / 4, "expired after {lived:?}");
        // Renewing a lease the backend forgot grants a new one and publishes again.
        let old = dying.lease();
        dying.renew().await.expect("renew re-publishes");
        assert_ne!(dying.lease(), old);
        assert!(
            matches!(next(&mut events).await, Event::Put(r) if r.key().to_string() == "nodes/dying")
        );
    } else {
        tokio::time::sleep(ttl + ttl / 2).await;
        assert!(
            store
                .get::<NodeRecord>(&name("dying"))
                .await
                .expect("get dying")
                .is_some(),
            "without leases the record stays: gone after {:?}",
            started.elapsed()
        );
        dying.renew().await.expect("renew without leases");
    }
    // Several TTLs on, the renewed record is still there. (The re-published `dying` may have
    // expired again by now: nobody renews it.)
    tokio::time::sleep(ttl).await;
    assert!(
        store
            .get::<NodeRecord>(&name("kept"))
            .await
            .expect("get kept")
            .is_some(),
        "renewed record gone after {:?}",
        started.elapsed()
    );

    cancel.cancel();
    let (kept, result) = tokio::time::timeout(WAIT, renewing)
        .await
        .expect("renewal loop stops on cancel")
        .expect("join renewal loop");
    result.expect("renewal loop");
    // Revoking removes the record at once, lease or not (revoking a lease that already
    // expired is no error).
    kept.revoke().await.expect("revoke kept");
    dying.revoke().await.expect("revoke dying");
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        match next(&mut events).await {
            Event::Deleted(key) => deleted.push(key.to_string()),
            other => panic!("expected the revocations, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, ["nodes/dying", "nodes/kept"]);
}

/// The backend goes away while a watch runs: one [`Event::Interrupted`] naming the backend,
/// operations fail fast with transient errors, and once it is back [`Event::Resynced`] brings
/// the caller's view to the current state, including what changed right after the return.
pub async fn watch_resync<H: Harness>(harness: &H) {
    let store = harness.store().await;
    store.put(&node_record("a", 1)).await.expect("put a");
    store.put(&node_record("b", 2)).await.expect("put b");
    let mut lease = store
        .publish_node(node_record("self", 9), Duration::from_secs(30))
        .await
        .expect("publish self");
    let mut events = store.watch(&[Kind::Node]);
    let mut view = BTreeMap::new();
    let first = next(&mut events).await;
    assert!(
        matches!(&first, Event::Snapshot(s) if s.records.len() == 3),
        "{first:?}"
    );
    apply(&mut view, first);

    harness.interrupt().await;
    match next(&mut events).await {
        Event::Interrupted(error) => assert_transient_backend_error(harness, &error),
        other => panic!("expected Interrupted, got {other:?}"),
    }
    let started = Instant::now();
    match store.put(&node_record("c", 3)).await {
        Err(error) => assert_transient_backend_error(harness, &error),
        Ok(()) => panic!("put succeeded while the backend was away"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failing took {:?}",
        started.elapsed()
    );
    // One Interrupted per outage: the watch retries quietly.
    if let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(1), events.next()).await {
        panic!("no event expected while the backend is away, got {event:?}");
    }

    harness.resume().await;
    // Changes by another client right after the return, racing the watch's resync.
    let other = harness.store().await;
    other
        .delete::<NodeRecord>(&name("a"))
        .await
        .expect("delete a");
    other.put(&node_record("c", 3)).await.expect("put c");

    let expected = ["nodes/b", "nodes/c", "nodes/self"];
    let mut resynced = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(resynced && keys(&view) == expected) {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no resync to {expected:?} within 20 s; view {:?}",
                    keys(&view)
                )
            })
            .expect("watch streams never end");
        assert!(
            !matches!(event, Event::Interrupted(_)),
            "interrupted again: {event:?}"
        );
        resynced |= matches!(event, Event::Resynced(_));
        apply(&mut view, event);
    }
    // And the watch goes on after the resync.
    other.put(&node_record("d", 4)).await.expect("put d");
    match next(&mut events).await {
        Event::Put(record) => assert_eq!(record, node_record("d", 4).into_record()),
        other => panic!("expected Put after the resync, got {other:?}"),
    }
    // The lease survived the short outage; renewing works again.
    lease.renew().await.expect("renew after the return");
    assert!(
        store
            .get::<NodeRecord>(&name("self"))
            .await
            .expect("get self")
            .is_some()
    );
}

fn labels(text: &str) -> nodeseal_policy::labels::Labels {
    text.parse().expect("test labels")
}

/// Concurrent allocations from several clients: one number per label set, no number shared by
/// two label sets, the lowest free numbers used, and repeated allocations stable. A collection
/// then frees exactly the unused identities, and their numbers are reused.
pub async fn identity_allocation<H: Harness>(harness: &H) {
    use std::collections::BTreeSet;

    use nodeseal_store::{Identity, IdentityClaim, IdentityNumber};

    const TASKS: usize = 8;
    const LABEL_SETS: usize = 5;
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(harness.store().await);
    }
    let sets: Vec<String> = (0..LABEL_SETS)
        .map(|i| format!("k8s:app=app-{i},k8s:io.kubernetes.pod.namespace=default"))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = stores[task % stores.len()].clone();
        let sets = sets.clone();
        tasks.spawn(async move {
            let mut got = Vec::new();
            // Each task walks the label sets from a different starting point, so that tasks
            // race on the same sets at the same time.
            for step in 0..LABEL_SETS {
                let set = &sets[(task + step) % LABEL_SETS];
                let number = store
                    .allocate_identity(&labels(set))
                    .await
                    .expect("allocate");
                got.push((set.clone(), number));
            }
            got
        });
    }
    let mut by_labels: BTreeMap<String, BTreeSet<IdentityNumber>> = BTreeMap::new();
    let results = tokio::time::timeout(Duration::from_secs(120), tasks.join_all())
        .await
        .expect("allocations within 120 s");
    for (set, number) in results.into_iter().flatten() {
        by_labels.entry(set).or_default().insert(number);
    }
    assert_eq!(by_labels.len(), LABEL_SETS);
    let mut numbers = BTreeSet::new();
    for (set, got) in &by_labels {
        assert_eq!(got.len(), 1, "{set} got several identities: {got:?}");
        assert!(
            numbers.insert(*got.first().expect("one")),
            "shared number: {by_labels:?}"
        );
    }
    // A number taken by an allocation that then lost the claim is given back, so a gap may
    // remain until the next allocation; but every number is a workload one.
    assert!(numbers.iter().all(|n| n.get() >= 256), "{numbers:?}");
    let store = harness.store().await;
    let identities = store.list::<Identity>().await.expect("list identities");
    assert!(identities.invalid.is_empty(), "{:?}", identities.invalid);
    assert_eq!(identities.records.len(), LABEL_SETS, "no leftover numbers");
    for identity in &identities.records {
        assert_eq!(
            by_labels[&identity.labels.to_string()],
            BTreeSet::from([identity.number])
        );
    }
    assert_eq!(
        store
            .list::<IdentityClaim>()
            .await
            .expect("claims")
            .records
            .len(),
        LABEL_SETS
    );
    // Stable.
    let first = by_labels[&sets[0]].first().copied().expect("one");
    assert_eq!(
        store
            .allocate_identity(&labels(&sets[0]))
            .await
            .expect("again"),
        first
    );

    // Collection: keep the first set's identity only.
    let deleted = store
        .gc_identities(&BTreeSet::from([first]))
        .await
        .expect("gc");
    assert_eq!(deleted.len(), LABEL_SETS - 1, "{deleted:?}");
    let left = store.list::<Identity>().await.expect("list").records;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].number, first);
    assert_eq!(
        store
            .list::<IdentityClaim>()
            .await
            .expect("claims")
            .records
            .len(),
        1
    );
    // Freed numbers are reused, the kept one is not.
    let again = store
        .allocate_identity(&labels("k8s:app=new"))
        .await
        .expect("allocate after gc");
    assert_ne!(again, first);
    assert!(
        again < *numbers.last().expect("some"),
        "{again} reuses a freed number"
    );
}

/// Endpoint and policy records round-trip; a stored policy document that no longer parses is
/// reported as an invalid record naming its key, and listings carry on.
pub async fn policy_and_endpoint_records<H: Harness>(harness: &H) {
    use nodeseal_store::{Endpoint, PolicyDocument};

    let store = harness.store().await;
    let endpoint = Endpoint {
        node: name("node-1"),
        namespace: name("default"),
        name: name("deathstar"),
        labels: labels("k8s:class=deathstar,k8s:org=empire"),
        ips: vec!["10.244.1.10".parse().expect("ip")],
        interface: "lxc1234".to_owned(),
    };
    store.put(&endpoint).await.expect("put endpoint");
    assert_eq!(
        store.get::<Endpoint>(&endpoint.id()).await.expect("get"),
        Some(endpoint.clone())
    );
    assert_eq!(
        store.list::<Endpoint>().await.expect("list").records,
        vec![endpoint.clone()]
    );

    let policy = PolicyDocument {
        name: name("rule1"),
        document: "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: rule1\n\
                   spec:\n  endpointSelector:\n    matchLabels:\n      org: empire\n  ingress:\n  \
                   - fromEndpoints:\n    - matchLabels:\n        org: empire\n"
            .to_owned(),
    };
    store.put(&policy).await.expect("put policy");
    assert_eq!(
        store
            .get::<PolicyDocument>(&policy.name)
            .await
            .expect("get"),
        Some(policy.clone())
    );

    // An unsupported field: refused on write, naming the field.
    let mut bad = policy.clone();
    bad.name = name("bad");
    bad.document.push_str(
        "    toPorts:\n    - ports:\n      - port: \"80\"\n      rules:\n        http: []\n",
    );
    let error = store.put(&bad).await.expect_err("refused");
    assert!(error.to_string().contains("rules"), "{error}");

    // The same written by a foreign writer: reported on read, by key.
    let raw = serde_json::json!({ "name": "bad", "document": bad.document });
    harness
        .write_raw("policies/bad", raw.to_string().as_bytes())
        .await;
    let error = store
        .get::<PolicyDocument>(&name("bad"))
        .await
        .expect_err("invalid");
    let StoreError::Invalid(error) = error else {
        panic!("unexpected {error}");
    };
    assert_eq!(error.key, "policies/bad");
    let listing = store.list::<PolicyDocument>().await.expect("list");
    assert_eq!(listing.records, vec![policy]);
    assert_eq!(listing.invalid.len(), 1);
    assert_eq!(listing.invalid[0].key, "policies/bad");
}
