//! keymgr's identity allocator against a real kube-apiserver: one identity per distinct
//! security label set of the cluster's pods, the same number for pods that share labels, and
//! collection after the grace period once no pod uses an identity.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up or expectation is a test failure"
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use nodeseal_agent::identity_allocator::{AllocatorOptions, run};
use nodeseal_kube_fixture::{KubeApiServer, binaries_or_skip, crds_dir};
use nodeseal_store::{Identity, IdentityNumber, KubeStore, Store};
use tokio_util::sync::CancellationToken;

const NS: &str = "nodeseal";
const WAIT: Duration = Duration::from_secs(30);

/// Polls the identities until `done` holds for them, for at most `WAIT`.
async fn identities_until(
    store: &Store,
    what: &str,
    done: impl Fn(&BTreeMap<String, IdentityNumber>) -> bool,
) -> BTreeMap<String, IdentityNumber> {
    let deadline = Instant::now() + WAIT;
    loop {
        let identities: BTreeMap<String, IdentityNumber> = store
            .list::<Identity>()
            .await
            .expect("list identities")
            .records
            .into_iter()
            .map(|identity| (identity.labels.to_string(), identity.number))
            .collect();
        if done(&identities) {
            return identities;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {identities:?} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymgr_allocates_pods_identities_and_collects_unused_ones() {
    if !binaries_or_skip(
        "kube_identities::keymgr_allocates_pods_identities_and_collects_unused_ones",
    ) {
        return;
    }
    let cluster = KubeApiServer::start().await.expect("kube-apiserver");
    cluster
        .apply_file(&crds_dir().join("crds.yaml"))
        .await
        .expect("CRDs");
    cluster.create_namespace(NS).await.expect("namespace");
    cluster.create_namespace("empire").await.expect("namespace");
    let store = Store::new(KubeStore::from_client(
        cluster.admin_client(),
        NS.to_owned(),
        "cluster.local".to_owned(),
    ));
    for (pod, node, labels, ip) in [
        (
            "deathstar",
            "node-1",
            [("class", "deathstar")],
            "10.244.1.10",
        ),
        (
            "tiefighter-1",
            "node-2",
            [("class", "tiefighter")],
            "10.244.2.10",
        ),
        (
            "tiefighter-2",
            "node-3",
            [("class", "tiefighter")],
            "10.244.3.10",
        ),
    ] {
        cluster
            .create_workload_pod("empire", pod, node, &labels, &[ip], false)
            .await
            .expect("pod");
    }
    // Not an endpoint: no identity for its labels.
    cluster
        .create_workload_pod(
            "empire",
            "node-agent",
            "node-1",
            &[("class", "host")],
            &["10.0.0.1"],
            true,
        )
        .await
        .expect("hostNetwork pod");

    let grace = Duration::from_secs(2);
    let cancel = CancellationToken::new();
    let allocator = tokio::spawn(run(
        store.clone(),
        AllocatorOptions { grace },
        cancel.clone(),
    ));

    // Pod labels, the namespace's labels (the apiserver's kubernetes.io/metadata.name) and
    // the namespace.
    let labels = |class: &str| {
        format!(
            "k8s:class={class},k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=empire,\
             k8s:io.kubernetes.pod.namespace=empire"
        )
    };
    let deathstar = labels("deathstar");
    let deathstar = deathstar.as_str();
    let tiefighter = labels("tiefighter");
    let tiefighter = tiefighter.as_str();
    let first = identities_until(&store, "two label sets allocated", |ids| ids.len() == 2).await;
    assert!(first.contains_key(deathstar), "{first:?}");
    assert!(first.contains_key(tiefighter), "{first:?}");

    // A new pod with known labels reuses the number; new labels get a new one.
    cluster
        .create_workload_pod(
            "empire",
            "xwing",
            "node-3",
            &[("class", "xwing")],
            &["10.244.3.11"],
            false,
        )
        .await
        .expect("pod");
    let second = identities_until(&store, "xwing allocated", |ids| ids.len() == 3).await;
    assert_eq!(second[deathstar], first[deathstar]);
    assert_eq!(second[tiefighter], first[tiefighter]);

    // One of two tiefighters goes: its identity stays. Both go: collected after the grace.
    let pods: Api<Pod> = Api::namespaced(cluster.admin_client(), "empire");
    let now = DeleteParams::default().grace_period(0);
    pods.delete("tiefighter-1", &now).await.expect("delete");
    tokio::time::sleep(grace * 2).await;
    let still = identities_until(&store, "tiefighter kept", |ids| ids.len() == 3).await;
    assert_eq!(still[tiefighter], first[tiefighter]);
    let gone_at = Instant::now();
    pods.delete("tiefighter-2", &now).await.expect("delete");
    pods.delete("xwing", &now).await.expect("delete");
    let left = identities_until(&store, "unused identities collected", |ids| ids.len() == 1).await;
    let took = gone_at.elapsed();
    assert!(left.contains_key(deathstar), "{left:?}");
    assert!(
        took >= grace,
        "collected after {took:?}, before the {grace:?} grace"
    );

    // A pod with the collected labels comes back: allocated again.
    cluster
        .create_workload_pod(
            "empire",
            "tiefighter-3",
            "node-2",
            &[("class", "tiefighter")],
            &["10.244.2.11"],
            false,
        )
        .await
        .expect("pod");
    identities_until(&store, "tiefighter again", |ids| {
        ids.contains_key(tiefighter)
    })
    .await;

    cancel.cancel();
    tokio::time::timeout(WAIT, allocator)
        .await
        .expect("the allocator stops when cancelled")
        .expect("no panic");
}
