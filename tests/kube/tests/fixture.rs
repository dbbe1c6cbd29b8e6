//! The fixture itself against the real binaries: startup, kubeconfigs, restart, and the
//! pod-bound token claims nodeseal's admission policy relies on.

#![allow(
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests"
)]

use std::{net::IpAddr, time::Duration};

use k8s_openapi::api::{
    authentication::v1::SelfSubjectReview,
    core::v1::{Namespace, Node},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use nodeseal_kube_fixture::{API_AUDIENCE, KubeApiServer};

const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";
const NODE_UID_KEY: &str = "authentication.kubernetes.io/node-uid";
const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_KEY: &str = "authentication.kubernetes.io/pod-uid";

async fn start() -> KubeApiServer {
    let cluster = KubeApiServer::start()
        .await
        .expect("starting etcd + kube-apiserver");
    eprintln!("control plane ready in {:?}", cluster.startup_time());
    cluster
}

#[tokio::test]
async fn admin_client_and_kubeconfig_work() {
    if !nodeseal_kube_fixture::binaries_or_skip("fixture::admin_client_and_kubeconfig_work") {
        return;
    }
    let cluster = start().await;
    let namespaces: Api<Namespace> = Api::all(cluster.admin_client());
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .expect("listing namespaces")
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(
        names.iter().any(|n| n == "default"),
        "namespaces: {names:?}"
    );

    // The admin kubeconfig is a plain kubeconfig file: the Go kubectl accepts it too.
    let kubectl = cluster.bin_dir().join("kubectl");
    if kubectl.is_file() {
        let out = std::process::Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(cluster.admin_kubeconfig_path())
            .args(["get", "--raw", "/readyz"])
            .output()
            .expect("running kubectl");
        assert!(
            out.status.success(),
            "kubectl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    } else {
        eprintln!(
            "skipping the kubectl check: {} not found",
            kubectl.display()
        );
    }
}

#[tokio::test]
async fn node_helper_sets_status_addresses_and_pod_cidrs() {
    if !nodeseal_kube_fixture::binaries_or_skip(
        "fixture::node_helper_sets_status_addresses_and_pod_cidrs",
    ) {
        return;
    }
    let cluster = start().await;
    let ip: IpAddr = "192.0.2.10".parse().expect("ip");
    cluster
        .create_node("node-a", ip, &["10.244.1.0/24", "fd00:1::/64"])
        .await
        .expect("node");
    let node = Api::<Node>::all(cluster.admin_client())
        .get("node-a")
        .await
        .expect("get node");
    let spec = node.spec.expect("spec");
    assert_eq!(
        spec.pod_cidrs.expect("podCIDRs"),
        ["10.244.1.0/24", "fd00:1::/64"]
    );
    let addresses = node
        .status
        .and_then(|s| s.addresses)
        .expect("status.addresses");
    assert!(
        addresses
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "192.0.2.10"),
        "{addresses:?}"
    );
}

/// Creates namespace, ServiceAccount and a pod on `node`, mints a pod-bound token and returns
/// what a SelfSubjectReview says about it.
async fn review_pod_token(
    cluster: &mut KubeApiServer,
    pod: &str,
    node: &str,
) -> (
    String,
    std::collections::BTreeMap<String, Vec<String>>,
    String,
) {
    cluster
        .create_namespace("nodeseal")
        .await
        .expect("namespace");
    cluster
        .create_service_account("nodeseal", "nodeseal-agent")
        .await
        .expect("service account");
    let created = cluster
        .create_agent_pod("nodeseal", pod, node, "nodeseal-agent")
        .await
        .expect("agent pod");
    let uid = created.metadata.uid.expect("pod uid");
    let token = cluster
        .pod_bound_token(
            "nodeseal",
            "nodeseal-agent",
            pod,
            &uid,
            API_AUDIENCE,
            Duration::from_secs(3600),
        )
        .await
        .expect("token request");
    let client = cluster
        .client_for_token(&token)
        .await
        .expect("token client");
    let review = Api::<SelfSubjectReview>::all(client)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview with the pod-bound token");
    let user = review
        .status
        .and_then(|s| s.user_info)
        .expect("status.userInfo");
    (
        user.username.expect("username"),
        user.extra.unwrap_or_default(),
        uid,
    )
}

#[tokio::test]
async fn pod_bound_token_carries_pod_and_node_claims() {
    if !nodeseal_kube_fixture::binaries_or_skip(
        "fixture::pod_bound_token_carries_pod_and_node_claims",
    ) {
        return;
    }
    let mut cluster = start().await;
    let node = cluster
        .create_node(
            "node-a",
            "192.0.2.10".parse().expect("ip"),
            &["10.244.1.0/24"],
        )
        .await
        .expect("node");
    let (username, extra, pod_uid) = review_pod_token(&mut cluster, "agent-a", "node-a").await;
    assert_eq!(username, "system:serviceaccount:nodeseal:nodeseal-agent");
    assert_eq!(
        extra.get(POD_NAME_KEY),
        Some(&vec!["agent-a".to_string()]),
        "{extra:?}"
    );
    assert_eq!(extra.get(POD_UID_KEY), Some(&vec![pod_uid]), "{extra:?}");
    assert_eq!(
        extra.get(NODE_NAME_KEY),
        Some(&vec!["node-a".to_string()]),
        "{extra:?}"
    );
    // The Node exists, so the apiserver binds its uid too.
    assert_eq!(
        extra.get(NODE_UID_KEY),
        Some(&vec![node.metadata.uid.expect("node uid")])
    );
}

/// Why the node-name claim does not need a Node object: the TokenRequest handler embeds the
/// pod's spec.nodeName even when the Node is missing, and only the node uid needs the Node
/// (pkg/registry/core/serviceaccount/storage/token.go, feature ServiceAccountTokenPodNodeInfo,
/// GA and locked on since 1.32).
#[tokio::test]
async fn node_name_claim_does_not_need_the_node_object() {
    if !nodeseal_kube_fixture::binaries_or_skip(
        "fixture::node_name_claim_does_not_need_the_node_object",
    ) {
        return;
    }
    let mut cluster = start().await;
    let (_, extra, _) = review_pod_token(&mut cluster, "agent-x", "node-without-object").await;
    assert_eq!(
        extra.get(NODE_NAME_KEY),
        Some(&vec!["node-without-object".to_string()])
    );
    assert_eq!(extra.get(NODE_UID_KEY), None, "{extra:?}");
}

#[tokio::test]
async fn restart_apiserver_keeps_state_and_clients() {
    if !nodeseal_kube_fixture::binaries_or_skip(
        "fixture::restart_apiserver_keeps_state_and_clients",
    ) {
        return;
    }
    let mut cluster = start().await;
    cluster
        .create_node(
            "node-a",
            "192.0.2.10".parse().expect("ip"),
            &["10.244.1.0/24"],
        )
        .await
        .expect("node");
    let client = cluster.admin_client();
    let addr = cluster.bind_addr();
    cluster
        .restart_apiserver()
        .await
        .expect("restarting kube-apiserver");
    assert_eq!(cluster.bind_addr(), addr);
    // The same client reconnects; the Node survived because etcd did.
    let node = Api::<Node>::all(client)
        .get("node-a")
        .await
        .expect("node after restart");
    assert_eq!(node.metadata.name.as_deref(), Some("node-a"));
}

/// Startup time, etcd spawn to /readyz ok, over five fresh control planes. Ignored by default:
/// it only measures. `cargo test -p nodeseal-kube-fixture --test fixture -- --ignored --nocapture`
#[tokio::test]
#[ignore = "measurement, not a check"]
async fn startup_time_five_runs() {
    if !nodeseal_kube_fixture::binaries_or_skip("fixture::startup_time_five_runs") {
        return;
    }
    let mut times = Vec::new();
    for _ in 0..5 {
        let cluster = start().await;
        times.push(cluster.startup_time());
        cluster.stop();
    }
    eprintln!("startup times: {times:?}");
}

/// The netns harness binds the apiserver to the underlay bridge's address; 127.0.0.2 stands in
/// for it here: the apiserver listens there and the serving certificate covers it.
#[tokio::test]
async fn binds_to_a_chosen_address() {
    if !nodeseal_kube_fixture::binaries_or_skip("fixture::binds_to_a_chosen_address") {
        return;
    }
    let bind: IpAddr = "127.0.0.2".parse().expect("ip");
    let cluster = KubeApiServer::builder()
        .bind(bind)
        .start()
        .await
        .expect("control plane");
    assert_eq!(cluster.bind_addr().ip(), bind);
    assert!(cluster.server_url().starts_with("https://127.0.0.2:"));
    Api::<Namespace>::all(cluster.admin_client())
        .get("default")
        .await
        .expect("TLS to 127.0.0.2 verifies against the fixture CA");
}
