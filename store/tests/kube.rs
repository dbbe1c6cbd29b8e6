//! The Kubernetes backend against a real kube-apiserver (the Go-built binaries of `cargo xtask
//! setup`): node records are what the Node objects say, whatever an agent claims; cluster-wide
//! records are compare-and-swapped ConfigMaps; the watch follows Nodes and survives an
//! apiserver restart without a spurious deletion.
//!
//! The generic conformance suite does not fit this backend as it is: its node records must
//! match Node objects, and it keeps no CSR or certificate records (those are
//! CertificateSigningRequests in this mode). These cases cover the same properties here.
#![cfg(feature = "kube")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up or expectation is a test failure"
)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nodeseal_kube_fixture::{KubeApiServer, KubeApiServerBuilder, binaries_or_skip, crds_dir};
use nodeseal_store::kube::objects::{KEY_ANNOTATION, KIND_LABEL, NodesealNode, RECORD_DATA_KEY};
use nodeseal_store::test_helpers::node_record;
use nodeseal_store::{
    Event, Kind, KubeStore, NodeName, NodeRecord, NodeStatus, PeerStatus, Record, RecordKind as _,
    RekeyGeneration, Revocation, RevocationId, Store, StoreError, TrustBundle,
};

const NAMESPACE: &str = "nodeseal";
const TRUST_DOMAIN: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(30);

async fn cluster(test: &str) -> Option<KubeApiServer> {
    cluster_with(test, KubeApiServer::builder()).await
}

/// The apiserver of `builder`, with nodeseal's CRDs and namespace.
async fn cluster_with(test: &str, builder: KubeApiServerBuilder) -> Option<KubeApiServer> {
    if !binaries_or_skip(test) {
        return None;
    }
    let cluster = builder.start().await.expect("kube-apiserver");
    cluster
        .apply_file(&crds_dir().join("crds.yaml"))
        .await
        .expect("applying the CRDs");
    cluster
        .create_namespace(NAMESPACE)
        .await
        .expect("namespace");
    Some(cluster)
}

fn store(cluster: &KubeApiServer) -> Store {
    Store::new(KubeStore::from_client(
        cluster.admin_client(),
        NAMESPACE.to_owned(),
        TRUST_DOMAIN.to_owned(),
    ))
}

fn nodes_api(cluster: &KubeApiServer) -> Api<Node> {
    Api::all(cluster.admin_client())
}

fn name(text: &str) -> NodeName {
    NodeName::new(text).unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// What an agent would publish for node `name`, claiming addresses that are not its own.
fn greedy_claim(node: &str) -> NodeRecord {
    let mut record = node_record(node, 1);
    record.node_ips = vec![ip("10.9.9.9")];
    record.pod_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    record.handshake = SocketAddr::new(ip("10.9.9.9"), 4250);
    record
}

/// Each node registered as a kubelet would, and published as its agent would.
async fn register(cluster: &KubeApiServer, store: &Store, nodes: &[(&str, u8)]) {
    for &(node, index) in nodes {
        cluster
            .create_node(
                node,
                ip(&format!("10.0.0.{index}")),
                &[&format!("10.244.{index}.0/24")],
            )
            .await
            .expect("node");
        store.put(&node_record(node, index)).await.expect("publish");
    }
}

async fn next(events: &mut BoxStream<'static, Event>) -> Event {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("a store event within 30 s")
        .expect("watches never end")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_records_are_the_node_objects_facts() {
    let Some(cluster) = cluster("kube::node_records_are_the_node_objects_facts").await else {
        return;
    };
    let store = store(&cluster);
    cluster
        .create_node("a", ip("10.0.0.1"), &["10.244.1.0/24"])
        .await
        .expect("node a");

    // The agent claims other IPs and a /8: peers see only what the Node object says.
    store.put(&greedy_claim("a")).await.expect("publish a");
    let seen = store
        .get::<NodeRecord>(&name("a"))
        .await
        .expect("get a")
        .expect("a is published");
    assert_eq!(seen.node_ips, vec![ip("10.0.0.1")]);
    assert_eq!(seen.pod_cidrs, vec!["10.244.1.0/24".parse().unwrap()]);
    assert_eq!(seen.handshake, SocketAddr::new(ip("10.0.0.1"), 4250));
    assert_eq!(seen.spiffe_id.to_string(), "spiffe://cluster.local/node/a");
    let listing = store.list::<NodeRecord>().await.expect("list");
    assert_eq!(listing.records, vec![seen]);

    // A Node whose agent has not published is still a peer (it never answers; strict mode
    // drops its pods' plaintext), at the default handshake port.
    cluster
        .create_node("d", ip("10.0.0.4"), &["10.244.4.0/24"])
        .await
        .expect("node d");
    let d = store
        .get::<NodeRecord>(&name("d"))
        .await
        .expect("get d")
        .expect("every Node is a node record");
    assert_eq!(d.handshake, SocketAddr::new(ip("10.0.0.4"), 4250));
    assert_eq!(d.spiffe_id.to_string(), "spiffe://cluster.local/node/d");
    nodes_api(&cluster)
        .delete("d", &DeleteParams::default())
        .await
        .expect("delete d");

    // No Node object: nothing to publish for.
    let error = store.put(&greedy_claim("ghost")).await.unwrap_err();
    assert!(
        error.to_string().contains("no Node object ghost"),
        "{error}"
    );

    // A NodesealNode naming another node's SPIFFE ID is unusable, with the reason.
    let published: Api<NodesealNode> = Api::all(cluster.admin_client());
    let patch = serde_json::json!({ "spec": { "spiffeID": "spiffe://cluster.local/node/b" } });
    published
        .patch("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch a");
    match store.get::<NodeRecord>(&name("a")).await {
        Err(StoreError::Invalid(e)) => {
            assert!(e.to_string().contains("claims SPIFFE ID"), "{e}");
        }
        other => panic!("expected an invalid record, got {other:?}"),
    }

    // A Node without a pod CIDR: the record says which field is missing.
    cluster
        .create_node("c", ip("10.0.0.3"), &[])
        .await
        .expect("node c");
    store.put(&greedy_claim("c")).await.expect("publish c");
    match store.get::<NodeRecord>(&name("c")).await {
        Err(StoreError::Invalid(e)) => {
            assert!(e.to_string().contains("Node c has no pod CIDR"), "{e}");
        }
        other => panic!("expected an invalid record, got {other:?}"),
    }

    // The node's status report lives in its NodesealNode's status.
    let status = NodeStatus {
        node: name("c"),
        reported_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        generation: 3,
        peers: [(
            name("a"),
            PeerStatus {
                epoch: 2,
                generation: 3,
            },
        )]
        .into(),
    };
    store.put(&status).await.expect("put status");
    assert_eq!(
        store
            .get::<NodeStatus>(&name("c"))
            .await
            .expect("get status"),
        Some(status)
    );

    // Withdrawing a node deletes its NodesealNode only; the Node is the cluster's.
    assert!(
        store
            .delete::<NodeRecord>(&name("c"))
            .await
            .expect("delete")
    );
    assert!(!store.delete::<NodeRecord>(&name("c")).await.expect("again"));
    let nodes: Api<Node> = Api::all(cluster.admin_client());
    assert!(nodes.get_opt("c").await.expect("get node c").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_records_are_compare_and_swapped_config_maps() {
    let Some(cluster) = cluster("kube::cluster_records_are_compare_and_swapped_config_maps").await
    else {
        return;
    };
    const TASKS: u64 = 8;
    const INCREMENTS: u64 = 5;
    let stores = [store(&cluster), store(&cluster)];
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = stores[usize::from(task % 2 == 1)].clone();
        tasks.spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..INCREMENTS {
                seen.push(store.bump_rekey_generation().await.expect("bump"));
            }
            seen
        });
    }
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(seen) = tasks.join_next().await {
            all.extend(seen.expect("task"));
        }
    })
    .await
    .expect("bumps finish within 120 s");
    all.sort_unstable();
    assert_eq!(all, (1..=TASKS * INCREMENTS).collect::<Vec<u64>>());

    let bundle = TrustBundle {
        bundle: "{\"keys\":[]}".to_owned(),
        signature: None,
        signer_pem: None,
    };
    stores[0].put(&bundle).await.expect("bundle");
    assert_eq!(
        stores[1].get::<TrustBundle>(&()).await.expect("get"),
        Some(bundle)
    );
    let revocation = Revocation {
        node: name("x.y"),
        serial: Some("0a1b".parse().unwrap()),
        revoked_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    };
    let whole = Revocation {
        node: name("x"),
        serial: None,
        revoked_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    };
    stores[0].put(&revocation).await.expect("revoke serial");
    stores[0].put(&whole).await.expect("revoke node");
    let listed = stores[1].list::<Revocation>().await.expect("list");
    assert_eq!(listed.records.len(), 2, "{listed:?}");
    let id = RevocationId {
        node: name("x"),
        serial: None,
    };
    assert!(stores[1].delete::<Revocation>(&id).await.expect("delete"));
    assert_eq!(
        stores[0].list::<Revocation>().await.expect("list").records,
        vec![revocation]
    );

    // A record an operator broke by hand is reported, never fatal.
    let cms: Api<ConfigMap> = Api::namespaced(cluster.admin_client(), NAMESPACE);
    let broken: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "nodeseal-rekey",
            "labels": { KIND_LABEL: "rekey" },
            "annotations": { KEY_ANNOTATION: "rekey/cluster" },
        },
        "data": { RECORD_DATA_KEY: "{ not json" },
    }))
    .unwrap();
    cms.replace("nodeseal-rekey", &PostParams::default(), &{
        let mut b = broken;
        b.metadata.resource_version = cms
            .get("nodeseal-rekey")
            .await
            .expect("get rekey")
            .metadata
            .resource_version;
        b
    })
    .await
    .expect("break the rekey record");
    assert!(matches!(
        stores[0].get::<RekeyGeneration>(&()).await,
        Err(StoreError::Invalid(_))
    ));
    let mut events = stores[0].watch(&[Kind::RekeyGeneration, Kind::TrustBundle]);
    match next(&mut events).await {
        Event::Snapshot(snapshot) => {
            assert_eq!(snapshot.invalid.len(), 1, "{snapshot:?}");
            assert_eq!(snapshot.records.len(), 1, "the bundle: {snapshot:?}");
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_nodes_and_survives_an_apiserver_restart() {
    let Some(mut cluster) =
        cluster("kube::watch_follows_nodes_and_survives_an_apiserver_restart").await
    else {
        return;
    };
    let store = store(&cluster);
    register(&cluster, &store, &[("a", 1), ("b", 2)]).await;
    let mut events = store.watch(&[Kind::Node, Kind::RekeyGeneration]);
    match next(&mut events).await {
        Event::Snapshot(snapshot) => assert_eq!(
            snapshot.records,
            vec![
                node_record("a", 1).into_record(),
                node_record("b", 2).into_record()
            ]
        ),
        other => panic!("expected a snapshot, got {other:?}"),
    }

    // The cluster gives b another address: peers follow the Node object.
    let nodes: Api<Node> = Api::all(cluster.admin_client());
    let patch = serde_json::json!({
        "status": { "addresses": [{ "type": "InternalIP", "address": "10.0.0.22" }] }
    });
    nodes
        .patch_status("b", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("readdress b");
    match next(&mut events).await {
        Event::Put(Record::Node(b)) => {
            assert_eq!(b.node_ips, vec![ip("10.0.0.22")]);
            assert_eq!(b.handshake, SocketAddr::new(ip("10.0.0.22"), 4250));
        }
        other => panic!("expected b's new record, got {other:?}"),
    }

    // A node whose Node object has no InternalIP is reported unusable, with the reason.
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value::<Node>(serde_json::json!({
                "metadata": { "name": "c" },
                "spec": { "podCIDRs": ["10.244.3.0/24"] },
            }))
            .unwrap(),
        )
        .await
        .expect("node c");
    store.put(&node_record("c", 3)).await.expect("publish c");
    match next(&mut events).await {
        Event::Invalid(e) => {
            assert_eq!(e.key, "nodes/c");
            assert!(e.to_string().contains("Node c has no InternalIP"), "{e}");
        }
        other => panic!("expected c to be unusable, got {other:?}"),
    }
    // Once the cluster fills it in, c is a peer like the others.
    let patch = serde_json::json!({
        "status": { "addresses": [{ "type": "InternalIP", "address": "10.0.0.3" }] }
    });
    nodes
        .patch_status("c", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("address c");
    match next(&mut events).await {
        Event::Put(Record::Node(c)) => assert_eq!(c, node_record("c", 3)),
        other => panic!("expected c's record, got {other:?}"),
    }

    // An apiserver restart changes nothing: no deletion; a resync, if any, is the full state.
    cluster.restart_apiserver().await.expect("restart");
    let generation = store
        .bump_rekey_generation()
        .await
        .expect("bump after restart");
    loop {
        match next(&mut events).await {
            Event::Put(Record::RekeyGeneration(g)) if g.generation == generation => break,
            Event::Interrupted(_) | Event::Invalid(_) => {}
            Event::Resynced(snapshot) => {
                let names: Vec<String> = snapshot
                    .records
                    .iter()
                    .filter_map(|r| match r {
                        Record::Node(n) => Some(n.name.to_string()),
                        _ => None,
                    })
                    .collect();
                assert_eq!(names, ["a", "b", "c"], "{snapshot:?}");
            }
            other => panic!("unexpected event across an apiserver restart: {other:?}"),
        }
    }

    // The Node goes: so does its record.
    nodes
        .delete("a", &DeleteParams::default())
        .await
        .expect("delete node a");
    match next(&mut events).await {
        Event::Deleted(key) => assert_eq!(key.to_string(), "nodes/a"),
        other => panic!("expected a's deletion, got {other:?}"),
    }
}

/// A TCP relay to the apiserver that can be cut: while cut, it drops every relayed connection
/// and closes new ones at once, which is how a client sees an unreachable control plane.
struct Relay {
    addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay listener");
        let addr = listener.local_addr().expect("relay address");
        let (open, is_open) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut is_open = is_open.clone();
                if !*is_open.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = is_open.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Self { addr, open }
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

/// LIST requests the apiserver has served on Nodes (a watcher lists once at start, and again
/// only when told that its resourceVersion is gone).
async fn node_lists(cluster: &KubeApiServer) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = cluster
        .admin_client()
        .request_text(request)
        .await
        .expect("/metrics");
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"nodes\"")
                && l.contains("verb=\"LIST\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A watch that comes back after its resourceVersion was compacted away gets `410 Gone`,
/// re-lists, and reports what changed while it was away, without a spurious deletion of what
/// did not change. Watches go straight to etcd here (`--watch-cache=false`) and the apiserver
/// compacts etcd every second, so that the resourceVersion the client resumes from is gone for
/// certain; with the watch cache the same happens once the cache's window has moved past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_relists_after_410_gone_and_reports_only_changes() {
    let Some(cluster) = cluster_with(
        "kube::watch_relists_after_410_gone_and_reports_only_changes",
        KubeApiServer::builder()
            .apiserver_arg("--watch-cache=false")
            .apiserver_arg("--etcd-compaction-interval=1s"),
    )
    .await
    else {
        return;
    };
    let admin = store(&cluster);
    register(&cluster, &admin, &[("a", 1), ("b", 2)]).await;

    // The watching store reaches the apiserver only through the relay.
    let relay = Relay::start(cluster.bind_addr()).await;
    let kubeconfig =
        kube::config::Kubeconfig::read_from(cluster.admin_kubeconfig_path()).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    config.cluster_url = format!("https://{}", relay.addr).parse().expect("url");
    let watching = Store::new(KubeStore::from_client(
        kube::Client::try_from(config).expect("client"),
        NAMESPACE.to_owned(),
        TRUST_DOMAIN.to_owned(),
    ));
    let mut events = watching.watch(&[Kind::Node]);
    match next(&mut events).await {
        Event::Snapshot(s) => assert_eq!(s.records.len(), 2, "{s:?}"),
        other => panic!("expected a snapshot, got {other:?}"),
    }
    let lists_before = node_lists(&cluster).await;

    // Cut off, the cluster changes: b goes, c comes, and etcd compacts past what the watch saw.
    relay.set_open(false);
    nodes_api(&cluster)
        .delete("b", &DeleteParams::default())
        .await
        .expect("delete b");
    cluster
        .create_node("c", ip("10.0.0.3"), &["10.244.3.0/24"])
        .await
        .expect("node c");
    admin.put(&node_record("c", 3)).await.expect("publish c");
    // Two compaction periods: the apiserver compacts to the revision it saw one period before.
    tokio::time::sleep(Duration::from_secs(4)).await;
    relay.set_open(true);

    // Back: the view converges on {a, c}; a is never deleted or changed on the way.
    let a = node_record("a", 1).into_record();
    let mut view: std::collections::BTreeMap<String, Record> = [("nodes/a".to_owned(), a.clone())]
        .into_iter()
        .chain([("nodes/b".to_owned(), node_record("b", 2).into_record())])
        .collect();
    let want: std::collections::BTreeMap<String, Record> = [
        ("nodes/a".to_owned(), a.clone()),
        ("nodes/c".to_owned(), node_record("c", 3).into_record()),
    ]
    .into_iter()
    .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while view != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch did not catch up: {view:?}"
        );
        match next(&mut events).await {
            Event::Interrupted(_) => {}
            Event::Resynced(snapshot) => {
                view = snapshot
                    .records
                    .into_iter()
                    .map(|r| (r.key().to_string(), r))
                    .collect();
            }
            Event::Put(record) => {
                view.insert(record.key().to_string(), record);
            }
            Event::Deleted(key) => {
                view.remove(&key.to_string());
            }
            // Seen event by event, c is briefly a Node without its address.
            Event::Invalid(e) if e.key == "nodes/c" => {
                view.remove(&e.key);
            }
            other => panic!("unexpected event after the outage: {other:?}"),
        }
        assert_eq!(
            view.get("nodes/a"),
            Some(&a),
            "a changed on the way: {view:?}"
        );
    }
    // It re-listed: only a 410 makes a watcher list again.
    let lists_after = node_lists(&cluster).await;
    assert!(
        lists_after > lists_before,
        "no LIST of Nodes after the outage ({lists_before} before, {lists_after} after): the watch \
         resumed without a 410"
    );
}

/// Identity allocation through ConfigMaps (create fails with AlreadyExists for the loser):
/// concurrent allocations from two clients agree, one number per label set and no number
/// shared; endpoint and policy records cannot be written (they come from Pods and policy objects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_are_allocated_with_create_if_absent() {
    use std::collections::{BTreeMap, BTreeSet};

    use nodeseal_store::{Endpoint, Identity, IdentityNumber, PolicyDocument};

    let Some(cluster) = cluster("kube::identities_are_allocated_with_create_if_absent").await
    else {
        return;
    };
    const TASKS: usize = 6;
    const LABEL_SETS: usize = 3;
    let stores = [store(&cluster), store(&cluster)];
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = stores[task % 2].clone();
        tasks.spawn(async move {
            let mut got = Vec::new();
            for step in 0..LABEL_SETS {
                let set = format!("k8s:app=app-{}", (task + step) % LABEL_SETS);
                let labels = set.parse().expect("labels");
                got.push((
                    set,
                    store.allocate_identity(&labels).await.expect("allocate"),
                ));
            }
            got
        });
    }
    let results = tokio::time::timeout(Duration::from_secs(120), tasks.join_all())
        .await
        .expect("allocations within 120 s");
    let mut by_labels: BTreeMap<String, BTreeSet<IdentityNumber>> = BTreeMap::new();
    for (set, number) in results.into_iter().flatten() {
        by_labels.entry(set).or_default().insert(number);
    }
    let numbers: BTreeSet<u32> = by_labels
        .values()
        .map(|got| {
            assert_eq!(got.len(), 1, "{by_labels:?}");
            got.first().expect("one").get()
        })
        .collect();
    assert_eq!(numbers.len(), LABEL_SETS, "no number shared: {by_labels:?}");
    assert!(numbers.iter().all(|n| *n >= 256), "{numbers:?}");
    assert_eq!(
        stores[0]
            .list::<Identity>()
            .await
            .expect("list")
            .records
            .len(),
        LABEL_SETS
    );
    // Collection deletes the unused identities' ConfigMaps (claims first, then numbers).
    let keep = *by_labels["k8s:app=app-0"].first().expect("one");
    let deleted = stores[1]
        .gc_identities(&BTreeSet::from([keep]))
        .await
        .expect("gc");
    assert_eq!(deleted.len(), LABEL_SETS - 1, "{deleted:?}");
    let left = stores[0].list::<Identity>().await.expect("list").records;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].number, keep);
    assert_eq!(
        stores[0]
            .allocate_identity(&"k8s:app=app-0".parse().expect("labels"))
            .await
            .expect("again"),
        keep
    );

    // Endpoints and policies are not records in this mode: writing them is refused, naming
    // where they come from.
    let endpoint = Endpoint {
        node: name("node-1"),
        namespace: name("default"),
        name: name("tiefighter"),
        labels: "k8s:org=empire".parse().expect("labels"),
        ips: vec![ip("10.244.1.7")],
        interface: "lxc7".to_owned(),
    };
    let error = stores[0]
        .put(&endpoint)
        .await
        .expect_err("endpoint refused");
    assert!(
        error
            .to_string()
            .contains("endpoints come from Pod objects in Kubernetes mode"),
        "{error}"
    );
    let error = stores[0]
        .delete::<Endpoint>(&endpoint.id())
        .await
        .expect_err("endpoint delete refused");
    assert!(error.to_string().contains("Pod objects"), "{error}");
    let policy = PolicyDocument {
        name: name("allow-all"),
        document: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  \
                   name: allow-all\n  namespace: default\nspec:\n  podSelector: {}\n  \
                   ingress:\n  - {}\n"
            .to_owned(),
    };
    let error = stores[1].put(&policy).await.expect_err("policy refused");
    assert!(
        error.to_string().contains("nodeseal policy apply"),
        "{error}"
    );
}

/// The next event that is not about the kinds' bookkeeping: skips nothing, but waits at most
/// `WAIT` and names what it waited for.
async fn next_about(events: &mut BoxStream<'static, Event>, what: &str) -> Event {
    tokio::time::timeout(WAIT, events.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no store event within 30 s"))
        .expect("watches never end")
}

/// No event for a moment: what the watch must not report.
async fn quiet(events: &mut BoxStream<'static, Event>, what: &str) {
    if let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
        panic!("{what}: unexpected {event:?}");
    }
}

fn pods_api(cluster: &KubeApiServer, namespace: &str) -> Api<k8s_openapi::api::core::v1::Pod> {
    Api::namespaced(cluster.admin_client(), namespace)
}

/// Endpoints are the cluster's Pods: scheduled, with an address, not hostNetwork, not
/// finished. Labels and IPs come from the Pod; a label change is a Put, a deletion a Deleted;
/// a Pod that breaks the record's rules is reported invalid and the watch goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_the_pods() {
    use nodeseal_store::{Endpoint, EndpointId};

    let Some(cluster) = cluster("kube::endpoints_are_the_pods").await else {
        return;
    };
    let store = store(&cluster);
    cluster.create_namespace("empire").await.expect("namespace");
    let mut events = store.watch(&[Kind::Endpoint]);
    match next(&mut events).await {
        Event::Snapshot(s) => assert!(s.records.is_empty(), "{s:?}"),
        other => panic!("expected the first snapshot, got {other:?}"),
    }

    cluster
        .create_workload_pod(
            "empire",
            "deathstar",
            "node-1",
            &[("org", "empire"), ("class", "deathstar")],
            &["10.244.1.10", "fd00:1::10"],
            false,
        )
        .await
        .expect("pod");
    let endpoint = match next_about(&mut events, "deathstar appears").await {
        Event::Put(Record::Endpoint(endpoint)) => endpoint,
        other => panic!("expected deathstar's endpoint, got {other:?}"),
    };
    assert_eq!(endpoint.node, name("node-1"));
    assert_eq!(endpoint.namespace, name("empire"));
    assert_eq!(endpoint.name, name("deathstar"));
    assert_eq!(endpoint.ips, vec![ip("10.244.1.10"), ip("fd00:1::10")]);
    assert_eq!(endpoint.interface, "", "found by route");
    // The namespace's labels too (the apiserver labels every namespace with its name), as
    // Labels::for_pod builds them: what a NetworkPolicy namespaceSelector matches.
    assert_eq!(
        endpoint.security_labels().to_string(),
        "k8s:class=deathstar,\
         k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=empire,\
         k8s:io.kubernetes.pod.namespace=empire,k8s:org=empire"
    );
    let id = EndpointId {
        node: name("node-1"),
        namespace: name("empire"),
        name: name("deathstar"),
    };
    assert_eq!(
        store.get::<Endpoint>(&id).await.expect("get"),
        Some(endpoint.clone())
    );

    // A hostNetwork pod (the node's own traffic), a pod without an address yet and a pod
    // that has not been scheduled are no endpoints.
    cluster
        .create_workload_pod("empire", "host", "node-1", &[], &["10.0.0.1"], true)
        .await
        .expect("hostNetwork pod");
    cluster
        .create_workload_pod(
            "empire",
            "starting",
            "node-2",
            &[("org", "empire")],
            &[],
            false,
        )
        .await
        .expect("pod without IPs");
    quiet(&mut events, "hostNetwork and IP-less pods").await;
    let listing = store.list::<Endpoint>().await.expect("list");
    assert_eq!(listing.records, vec![endpoint.clone()]);
    assert_eq!(
        store.get::<Endpoint>(&id).await.expect("get"),
        Some(endpoint.clone())
    );

    // A label change is a Put of the same key.
    let patch = serde_json::json!({ "metadata": { "labels": { "class": "deathstar-2" } } });
    pods_api(&cluster, "empire")
        .patch("deathstar", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("relabel");
    match next_about(&mut events, "relabel").await {
        Event::Put(Record::Endpoint(changed)) => {
            assert_eq!(changed.id(), id);
            assert_eq!(
                changed.labels.to_string(),
                "k8s:class=deathstar-2,\
                 k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=empire,\
                 k8s:org=empire"
            );
        }
        other => panic!("expected the relabelled endpoint, got {other:?}"),
    }

    // A namespace label change is a Put of each of its endpoints.
    let patch = serde_json::json!({ "metadata": { "labels": { "team": "sith" } } });
    Api::<k8s_openapi::api::core::v1::Namespace>::all(cluster.admin_client())
        .patch("empire", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("label the namespace");
    match next_about(&mut events, "namespace relabel").await {
        Event::Put(Record::Endpoint(changed)) => {
            assert_eq!(changed.id(), id);
            assert!(
                changed
                    .labels
                    .to_string()
                    .contains("k8s:io.cilium.k8s.namespace.labels.team=sith"),
                "{changed:?}"
            );
        }
        other => panic!("expected the endpoint with its namespace's label, got {other:?}"),
    }

    // Writing endpoints is refused: Pods are the source.
    let error = store.put(&endpoint).await.expect_err("put refused");
    assert!(error.to_string().contains("Pod objects"), "{error}");

    // Too many labels for a record: reported invalid, naming the pod; the watch goes on.
    let many: Vec<(String, String)> = (0..70).map(|i| (format!("l{i}"), "v".to_owned())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    cluster
        .create_workload_pod("empire", "crowded", "node-2", &many, &["10.244.2.9"], false)
        .await
        .expect("pod with many labels");
    match next_about(&mut events, "invalid pod").await {
        Event::Invalid(error) => {
            assert_eq!(error.key, "endpoints/node-2:empire:crowded");
            assert!(error.to_string().contains("labels"), "{error}");
        }
        other => panic!("expected the crowded pod as invalid, got {other:?}"),
    }
    cluster
        .create_workload_pod(
            "empire",
            "tiefighter",
            "node-2",
            &[("org", "empire")],
            &["10.244.2.5"],
            false,
        )
        .await
        .expect("pod");
    match next_about(&mut events, "tiefighter after the invalid pod").await {
        Event::Put(Record::Endpoint(e)) => assert_eq!(e.name, name("tiefighter")),
        other => panic!("expected tiefighter, got {other:?}"),
    }

    // The kubelet's final status (Succeeded) ends an endpoint, as does deletion.
    let done = serde_json::json!({ "status": { "phase": "Succeeded" } });
    pods_api(&cluster, "empire")
        .patch_status("tiefighter", &PatchParams::default(), &Patch::Merge(&done))
        .await
        .expect("finish");
    match next_about(&mut events, "finished pod").await {
        Event::Deleted(key) => assert_eq!(key.to_string(), "endpoints/node-2:empire:tiefighter"),
        other => panic!("expected tiefighter gone, got {other:?}"),
    }
    pods_api(&cluster, "empire")
        .delete("deathstar", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete");
    match next_about(&mut events, "deleted pod").await {
        Event::Deleted(key) => assert_eq!(key.to_string(), "endpoints/node-1:empire:deathstar"),
        other => panic!("expected deathstar gone, got {other:?}"),
    }
    assert_eq!(store.get::<Endpoint>(&id).await.expect("get"), None);
}

const RULE1_NNP: &str = "apiVersion: nodeseal.io/v1alpha1
kind: NodesealNetworkPolicy
metadata:
  name: rule1
  namespace: empire
spec:
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: \"80\"
        protocol: TCP
";

const NETWORK_POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web
  namespace: empire
spec:
  podSelector:
    matchLabels:
      class: deathstar
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          org: empire
    ports:
    - protocol: TCP
      port: 80
";

/// Policy documents are the policy objects: NodesealNetworkPolicy (applied from a
/// CiliumNetworkPolicy file, too), NodesealClusterwideNetworkPolicy and NetworkPolicy. Each
/// parses to the rules of the equivalent file; an object the parser refuses is reported
/// invalid, naming the object and the field, and the watch goes on; deleting the record deletes
/// the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_documents_are_the_policy_objects() {
    use kube::api::{ApiResource, DynamicObject};
    use kube::core::GroupVersionKind;
    use nodeseal_store::PolicyDocument;

    let Some(cluster) = cluster("kube::policy_documents_are_the_policy_objects").await else {
        return;
    };
    let kube_store = KubeStore::from_client(
        cluster.admin_client(),
        NAMESPACE.to_owned(),
        TRUST_DOMAIN.to_owned(),
    );
    let store = Store::new(kube_store.clone());
    cluster.create_namespace("empire").await.expect("namespace");
    let mut events = store.watch(&[Kind::PolicyDocument]);
    match next(&mut events).await {
        Event::Snapshot(s) => assert!(s.records.is_empty(), "{s:?}"),
        other => panic!("expected the first snapshot, got {other:?}"),
    }
    let expect_put = |event: Event, name: &str| match event {
        Event::Put(Record::PolicyDocument(document)) => {
            assert_eq!(document.name.as_str(), name);
            document
        }
        other => panic!("expected policy {name}, got {other:?}"),
    };

    // `nodeseal policy apply` of a NodesealNetworkPolicy file.
    let applied = kube_store
        .apply_policies(RULE1_NNP.as_bytes())
        .await
        .expect("apply");
    assert_eq!(applied.len(), 1);
    let document = expect_put(next_about(&mut events, "rule1").await, "nnp.empire.rule1");
    assert_eq!(
        document.policies().expect("parses"),
        nodeseal_policy::document::parse(RULE1_NNP.as_bytes()).expect("file parses")
    );

    // A NetworkPolicy object, created as kubectl would.
    let np: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_yaml::from_str(NETWORK_POLICY).expect("NetworkPolicy YAML");
    Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(
        cluster.admin_client(),
        "empire",
    )
    .create(&PostParams::default(), &np)
    .await
    .expect("NetworkPolicy");
    let document = expect_put(next_about(&mut events, "web").await, "knp.empire.web");
    assert_eq!(
        document.policies().expect("parses"),
        nodeseal_policy::document::parse(NETWORK_POLICY.as_bytes()).expect("file parses")
    );

    // A Cilium cluster-wide file becomes a NodesealClusterwideNetworkPolicy.
    let ccnp = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  \
                name: no-world\nspec:\n  endpointSelector: {}\n  egressDeny:\n  - \
                toEntities: [world]\n";
    kube_store
        .apply_policies(ccnp.as_bytes())
        .await
        .expect("apply cluster-wide");
    let document = expect_put(next_about(&mut events, "no-world").await, "nccnp.no-world");
    let rules = |text: &str| {
        nodeseal_policy::document::parse(text.as_bytes())
            .expect("parses")
            .into_iter()
            .map(|p| (p.name, p.namespace, p.rules))
            .collect::<Vec<_>>()
    };
    assert_eq!(rules(&document.document), rules(ccnp));

    // An object the parser refuses (L7 rules): invalid, naming the object and the field.
    let gvk = GroupVersionKind::gvk("nodeseal.io", "v1alpha1", "NodesealNetworkPolicy");
    let nnps: Api<DynamicObject> = Api::namespaced_with(
        cluster.admin_client(),
        "empire",
        &ApiResource::from_gvk_with_plural(&gvk, "nodesealnetworkpolicies"),
    );
    let l7: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "nodeseal.io/v1alpha1",
        "kind": "NodesealNetworkPolicy",
        "metadata": { "name": "l7" },
        "spec": {
            "endpointSelector": {},
            "ingress": [{ "toPorts": [{ "ports": [{ "port": "80" }], "rules": { "http": [] } }] }],
        },
    }))
    .expect("object");
    nnps.create(&PostParams::default(), &l7)
        .await
        .expect("create");
    match next_about(&mut events, "l7").await {
        Event::Invalid(error) => {
            assert_eq!(error.key, "policies/nnp.empire.l7");
            let text = error.to_string();
            assert!(text.contains("NodesealNetworkPolicy empire/l7"), "{text}");
            assert!(text.contains("spec.ingress[0].toPorts[0].rules"), "{text}");
        }
        other => panic!("expected the L7 policy as invalid, got {other:?}"),
    }
    // The watch goes on after it.
    let mut allow = l7.clone();
    allow.metadata.name = Some("allow".to_owned());
    allow.data = serde_json::json!({ "spec": { "endpointSelector": {}, "ingress": [{}] } });
    nnps.create(&PostParams::default(), &allow)
        .await
        .expect("create");
    expect_put(next_about(&mut events, "allow").await, "nnp.empire.allow");

    // get and list through the store; the invalid one is listed as skipped, not as a record.
    let listing = store.list::<PolicyDocument>().await.expect("list");
    let names: Vec<&str> = listing.records.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "knp.empire.web",
            "nccnp.no-world",
            "nnp.empire.allow",
            "nnp.empire.rule1"
        ]
    );
    assert!(
        store
            .get::<PolicyDocument>(&name("nnp.empire.rule1"))
            .await
            .expect("get")
            .is_some()
    );

    // Deleting the record deletes the object (`nodeseal policy delete`).
    assert!(
        store
            .delete::<PolicyDocument>(&name("knp.empire.web"))
            .await
            .expect("delete")
    );
    match next_about(&mut events, "deleted web").await {
        Event::Deleted(key) => assert_eq!(key.to_string(), "policies/knp.empire.web"),
        other => panic!("expected web gone, got {other:?}"),
    }
    assert!(
        !store
            .delete::<PolicyDocument>(&name("knp.empire.web"))
            .await
            .expect("delete again")
    );
}

/// A cluster upgraded without nodeseal's policy CRDs (Helm never upgrades CRDs): the watch
/// still starts, with the NetworkPolicy objects, instead of waiting for kinds that are not
/// served; listing skips them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_starts_without_the_policy_crds() {
    use nodeseal_store::PolicyDocument;

    if !binaries_or_skip("kube::watch_starts_without_the_policy_crds") {
        return;
    }
    let cluster = KubeApiServer::start().await.expect("kube-apiserver");
    cluster
        .create_namespace(NAMESPACE)
        .await
        .expect("namespace");
    cluster.create_namespace("empire").await.expect("namespace");
    let np: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_yaml::from_str(NETWORK_POLICY).expect("NetworkPolicy YAML");
    Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(
        cluster.admin_client(),
        "empire",
    )
    .create(&PostParams::default(), &np)
    .await
    .expect("NetworkPolicy");
    let store = store(&cluster);
    let mut events = store.watch(&[Kind::PolicyDocument, Kind::Endpoint]);
    match next(&mut events).await {
        Event::Snapshot(s) => {
            let names: Vec<String> = s
                .records
                .iter()
                .filter_map(|r| match r {
                    Record::PolicyDocument(d) => Some(d.name.to_string()),
                    _ => None,
                })
                .collect();
            assert_eq!(names, ["knp.empire.web"], "{s:?}");
        }
        other => panic!("expected the first snapshot, got {other:?}"),
    }
    let listing = store.list::<PolicyDocument>().await.expect("list");
    assert_eq!(listing.records.len(), 1);
    // Nor is the missing CRD an outage: no Interrupted follows while its watcher retries.
    quiet(&mut events, "a missing CRD").await;
}
