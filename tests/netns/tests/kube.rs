//! The fabric in Kubernetes mode: a real kube-apiserver (and its etcd) in the underlay
//! namespace, the manifests nodeseal ships, one agent pod per node (a DaemonSet's, standing in
//! for what the kubelet would run) whose bound token the real `nodeseal-agent` process uses,
//! and keymgr with its own pod token. One boot of the control plane carries every check:
//! - pods talk only through ESP; keymgr created the CA Secret and signed each node's CSR;
//! - a node's agent claiming a wider pod CIDR gets only its Node object's into its peers'
//!   XFRM policies;
//! - a Node without a pod CIDR is an error in `nodeseal status`, other peers unaffected;
//! - an apiserver restart in the middle of a UDP stream loses nothing and tears down no SA;
//! - `nodeseal keys rotate --wait` works through the API;
//! - deleting a Node removes its SAs on every peer.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "scenario helpers panic with context, like the tests"
)]

use std::net::SocketAddrV4;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, PostParams};
use nodeseal_kube_fixture::binaries_or_skip;
use nodeseal_netns::fabric::esp_spis_between;
use nodeseal_netns::kube::KubeControlPlane;
use nodeseal_netns::{
    Fabric, FabricOptions, Feature, StoreKind, Topology, UdpStream, ping, require,
};
use nodeseal_store::kube::objects::NodesealNode;

const CONVERGE: Duration = Duration::from_secs(120);

#[test]
fn backend_carries_the_fabric_on_kubernetes() {
    if !require("kube", &[Feature::Netns, Feature::Esp, Feature::TcBpf])
        || !binaries_or_skip("kube")
    {
        return;
    }
    let topo = Topology::builder("kube")
        .nodes(3)
        .pods_per_node(1)
        .build()
        .expect("topology");
    // node2's Node has no pod CIDR (yet): the cluster has not allocated one.
    let control = KubeControlPlane::start(&topo, |i| {
        if i == 2 {
            Vec::new()
        } else {
            vec![topo.node(i).pod_cidr.to_string()]
        }
    })
    .expect("control plane");
    let configs = control.configs();

    let options = FabricOptions {
        store: StoreKind::Kube(configs),
        // node1's agent claims a /16; the Node object says /24.
        agent_args: vec![vec![], vec!["--pod-cidr".into(), "10.244.0.0/16".into()]],
        ..FabricOptions::default()
    };
    let fabric = Fabric::start(&topo, 2, options).expect("fabric");
    fabric
        .wait_established(&[0, 1], CONVERGE)
        .expect("established");
    let (pod_a, pod_b) = (topo.node(0).pod(0), topo.node(1).pod(0));
    let capture = topo.capture().expect("capture");
    assert!(ping(&pod_a.ns, pod_b.ip, 2).expect("ping").all_answered());

    // Only node1's Node-object CIDR is in node0's policies, though node1's agent was told more.
    let policies = topo.node(0).ns.ip(&["xfrm", "policy"]).expect("policies");
    assert!(policies.contains("10.244.1.0/24"), "{policies}");
    assert!(!policies.contains("10.244.0.0/16"), "{policies}");

    // node2 publishes (its agent would, once started) but its Node has no pod CIDR.
    let nodes = fabric.nodeseal_store(&["node", "list"]).expect("node list");
    assert!(nodes.contains("node1"), "{nodes}");
    control
        .admin(|client| async move {
            let mut object = NodesealNode::default();
            object.metadata.name = Some("node2".into());
            object.spec.handshake_port = 4250;
            object.spec.spiffe_id = "spiffe://cluster.local/node/node2".into();
            Api::<NodesealNode>::all(client)
                .create(&PostParams::default(), &object)
                .await?;
            Ok(())
        })
        .expect("NodesealNode node2");
    let shown = nodeseal_netns::wait_until(Duration::from_secs(30), || {
        fabric
            .status_text(0)
            .is_ok_and(|t| t.contains("unusable node node2") && t.contains("no pod CIDR"))
    });
    assert!(shown, "{}", fabric.status_text(0).unwrap_or_default());
    assert!(ping(&pod_a.ns, pod_b.ip, 1).expect("ping").all_answered());

    // apiserver restart under a UDP stream: nothing lost, no SA replaced.
    let before = fabric.peer_row(0, "node1").expect("row");
    let stream = UdpStream::start(
        &pod_a.ns,
        &pod_b.ns,
        SocketAddrV4::new(pod_b.ip, 7101),
        200,
        Duration::from_secs(120),
    )
    .expect("stream");
    std::thread::sleep(Duration::from_millis(500));
    control.restart_apiserver().expect("apiserver restart");
    std::thread::sleep(Duration::from_secs(3));
    let report = stream.finish(Duration::from_millis(500)).expect("report");
    eprintln!("stream across the apiserver restart: {report:?}");
    assert!(report.sent >= 200, "{report:?}");
    assert_eq!((report.lost, report.duplicated), (0, 0), "{report:?}");
    let after = fabric.peer_row(0, "node1").expect("row");
    assert_eq!(before["out_spi"], after["out_spi"], "{before}\n{after}");
    assert_eq!(before["in_spi"], after["in_spi"], "{before}\n{after}");

    // Rotation through the API.
    let out = fabric
        .nodeseal_store(&["keys", "rotate", "--wait", "--timeout", "90s"])
        .expect("keys rotate --wait");
    assert!(out.contains("all nodes rekeyed"), "{out}");
    assert!(ping(&pod_a.ns, pod_b.ip, 2).expect("ping").all_answered());
    capture
        .check_no_plaintext(&topo.pod_cidrs())
        .unwrap_or_else(|leak| panic!("{leak}"));

    // The cluster deletes node1: its SAs go on node0.
    control
        .admin(|client| async move {
            Api::<Node>::all(client)
                .delete("node1", &DeleteParams::default())
                .await?;
            Ok(())
        })
        .expect("delete node1");
    let gone = nodeseal_netns::wait_until(Duration::from_secs(30), || {
        fabric.peer_row(0, "node1").is_none()
            && esp_spis_between(&topo.node(0).ns, topo.node(0).ip, topo.node(1).ip).is_empty()
    });
    assert!(
        gone,
        "{}\n{}",
        fabric.status_text(0).unwrap_or_default(),
        topo.node(0).ns.ip(&["xfrm", "state"]).unwrap_or_default()
    );
    drop(fabric);
    drop(control);
}
