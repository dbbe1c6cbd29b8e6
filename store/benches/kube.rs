//! `cargo xtask bench store`: the Kubernetes backend at cluster scale, against the directory
//! backend in the same run.
//!
//! With N nodes registered in a real kube-apiserver (a Node object and a NodesealNode each):
//! - how long a new watch takes to deliver the snapshot of all N node records (what an agent
//!   waits for before it knows its peers), Kubernetes against the directory backend holding
//!   the same N records: the ratio is the figure;
//! - the apiserver requests that watch causes in a quiet period (nothing changes), from the
//!   apiserver's own `apiserver_request_total`, per node per minute: the target is 0 besides
//!   the watches themselves.
//!
//! Arguments: `--nodes N` (default 1000), `--quiet S` seconds (default 30).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark: a failed set-up is a failed run"
)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use nodeseal_kube_fixture::{KubeApiServer, binaries_or_skip, crds_dir};
use nodeseal_store::test_helpers::node_record;
use nodeseal_store::{DirOptions, DirStore, Event, Kind, KubeStore, NodeName, NodeRecord, Store};

const ROUNDS: usize = 3;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Node `i`'s record: 10.<i/250>.<i%250>.1, pod CIDR 10.<128+i/250>.<i%250>.0/24.
fn record(i: u64) -> NodeRecord {
    let (hi, lo) = (
        u8::try_from(i / 250).unwrap(),
        u8::try_from(i % 250).unwrap(),
    );
    let mut r = node_record(&format!("node-{i}"), 1);
    let ip = IpAddr::V4(Ipv4Addr::new(10, hi, lo, 1));
    r.node_ips = vec![ip];
    r.handshake.set_ip(ip);
    r.pod_cidrs = vec![format!("10.{}.{lo}.0/24", 128 + hi).parse().unwrap()];
    r.name = NodeName::new(format!("node-{i}")).unwrap();
    r.spiffe_id =
        nodeseal_store::SpiffeId::new(format!("spiffe://cluster.local/node/node-{i}")).unwrap();
    r
}

/// Time from opening a watch to its snapshot holding `n` node records.
async fn snapshot_time(store: &Store, n: usize) -> Duration {
    let started = Instant::now();
    let mut events = store.watch(&[Kind::Node]);
    match events.next().await {
        Some(Event::Snapshot(snapshot)) => assert_eq!(snapshot.records.len(), n),
        other => panic!("expected a snapshot, got {other:?}"),
    }
    started.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Non-watch requests the apiserver has served on what an agent watches.
async fn requests(client: &kube::Client) -> BTreeMap<String, f64> {
    nodeseal_kube_fixture::metrics::non_watch_requests(
        client,
        &["nodes", "nodesealnodes", "configmaps"],
    )
    .await
    .expect("apiserver /metrics")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !binaries_or_skip("bench store") {
        return;
    }
    let nodes = arg("--nodes", 1000);
    let quiet = Duration::from_secs(arg("--quiet", 30));
    let n = usize::try_from(nodes).unwrap();

    let cluster = KubeApiServer::start().await.expect("control plane");
    cluster
        .apply_file(&crds_dir().join("crds.yaml"))
        .await
        .expect("CRDs");
    cluster
        .create_namespace("nodeseal")
        .await
        .expect("namespace");
    let kube = Store::new(KubeStore::from_client(
        cluster.admin_client(),
        "nodeseal".into(),
        "cluster.local".into(),
    ));
    let started = Instant::now();
    let cluster = &cluster;
    let kube_ref = &kube;
    futures::stream::iter(0..nodes)
        .map(|i| async move {
            let r = record(i);
            cluster
                .create_node(
                    r.name.as_str(),
                    r.node_ips[0],
                    &[r.pod_cidrs[0].to_string().as_str()],
                )
                .await
                .map_err(|e| format!("{e:#}"))?;
            kube_ref.put(&r).await.map_err(|e| e.to_string())
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .expect("registering nodes");
    let registered = started.elapsed();

    let dir = tempfile::tempdir().expect("tempdir");
    let dir_store = Store::new(
        DirStore::open(dir.path(), DirOptions::default())
            .await
            .expect("dir store"),
    );
    for i in 0..nodes {
        dir_store.put(&record(i)).await.expect("dir put");
    }
    // Interleaved rounds, so that both backends see the same machine load.
    let (mut kube_times, mut dir_times) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        kube_times.push(snapshot_time(&kube, n).await);
        dir_times.push(snapshot_time(&dir_store, n).await);
    }
    let (kube_median, dir_median) = (median(kube_times), median(dir_times));

    // Quiet period: one agent-like watch open, nothing changing.
    let mut watch = kube.watch(&[
        Kind::Node,
        Kind::Revocation,
        Kind::RekeyGeneration,
        Kind::TrustBundle,
    ]);
    let _ = watch.next().await;
    let admin = cluster.admin_client();
    let before = requests(&admin).await;
    let quiet_events = tokio::time::timeout(quiet, async {
        let mut count = 0u64;
        while watch.next().await.is_some() {
            count += 1;
        }
        count
    })
    .await
    .unwrap_or(0);
    let after = requests(&admin).await;
    // The two /metrics scrapes are not counted: they are on no resource.
    let extra: f64 = after
        .iter()
        .map(|(r, v)| v - before.get(r).copied().unwrap_or(0.0))
        .sum();
    let per_node_minute = extra / nodes as f64 / (quiet.as_secs_f64() / 60.0);

    println!("store bench, {nodes} nodes (Node + NodesealNode each) in kube-apiserver v1.37.2:");
    println!("  registering them (16 at a time):                {registered:.1?}");
    println!(
        "  watch snapshot of all node records, median of {ROUNDS}: kubernetes {kube_median:.1?}, directory {dir_median:.1?}, ratio {:.2}",
        kube_median.as_secs_f64() / dir_median.as_secs_f64()
    );
    println!(
        "  quiet {quiet:?} with a watch open: {extra} non-watch requests on nodes/nodesealnodes/configmaps ({per_node_minute:.4} per node per minute), {quiet_events} watch events"
    );
}
