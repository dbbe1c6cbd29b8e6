//! The `nodeseal` binary's identity-policy commands in Kubernetes mode, against a real
//! kube-apiserver: `policy apply` creates NodesealNetworkPolicy objects (a CiliumNetworkPolicy
//! file becomes one), `get`, `trace` and `delete` work on the records the store derives from
//! them, and `endpoint add` is refused (endpoints are Pods).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up or expectation is a test failure"
)]

use std::path::Path;
use std::process::{Command, Output};

use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::GroupVersionKind;
use nodeseal_kube_fixture::{KubeApiServer, binaries_or_skip, crds_dir};

const NODESEAL: &str = env!("CARGO_BIN_EXE_nodeseal");

/// Cilium's getting-started (Star Wars) L3/L4 policy.
const RULE1: &str = include_str!("../../policy/examples/star-wars-rule1.yaml");

fn nodeseal(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(NODESEAL)
        .args(args)
        .args(["--kubernetes", "--namespace", "nodeseal", "--kubeconfig"])
        .arg(kubeconfig)
        .env_remove("NODESEAL_ETCD_ENDPOINTS")
        .env_remove("NODESEAL_STORE_DIR")
        .output()
        .expect("running nodeseal")
}

fn ok(kubeconfig: &Path, args: &[&str]) -> String {
    let output = nodeseal(kubeconfig, args);
    assert!(
        output.status.success(),
        "nodeseal {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf8")
}

fn failure(kubeconfig: &Path, args: &[&str]) -> String {
    let output = nodeseal(kubeconfig, args);
    assert!(!output.status.success(), "nodeseal {args:?} succeeded");
    String::from_utf8(output.stderr).expect("utf8")
}

fn trace(kubeconfig: &Path, src: &str) -> String {
    ok(
        kubeconfig,
        &[
            "policy",
            "trace",
            "--src-labels",
            src,
            "--dst-labels",
            "org=empire,class=deathstar",
            "--src-namespace",
            "default",
            "--dst-namespace",
            "default",
            "--dport",
            "80/TCP",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_commands_apply_kubernetes_objects() {
    if !binaries_or_skip("cli_kube_policy::policy_commands_apply_kubernetes_objects") {
        return;
    }
    let cluster = KubeApiServer::start().await.expect("kube-apiserver");
    cluster
        .apply_file(&crds_dir().join("crds.yaml"))
        .await
        .expect("CRDs");
    cluster
        .create_namespace("nodeseal")
        .await
        .expect("namespace");
    let kubeconfig = cluster.admin_kubeconfig_path().to_owned();
    let temp = tempfile::tempdir().expect("temp dir");
    let file = temp.path().join("rule1.yaml");
    std::fs::write(&file, RULE1).unwrap();

    let applied = ok(
        &kubeconfig,
        &["policy", "apply", "-f", file.to_str().unwrap()],
    );
    assert!(
        applied.contains("NodesealNetworkPolicy default/rule1 applied (policy nnp.default.rule1)"),
        "{applied}"
    );
    let gvk = GroupVersionKind::gvk("nodeseal.io", "v1alpha1", "NodesealNetworkPolicy");
    let nnps: Api<DynamicObject> = Api::namespaced_with(
        cluster.admin_client(),
        "default",
        &ApiResource::from_gvk_with_plural(&gvk, "nodesealnetworkpolicies"),
    );
    let object = nnps.get("rule1").await.expect("the object exists");
    assert!(
        object.data["spec"]["endpointSelector"].is_object(),
        "{object:?}"
    );

    let listed = ok(&kubeconfig, &["policy", "get"]);
    assert!(
        listed.contains("nnp.default.rule1")
            && listed.contains("NodesealNetworkPolicy default/rule1"),
        "{listed}"
    );
    let xwing = trace(&kubeconfig, "org=alliance,class=xwing");
    assert!(xwing.contains("verdict: DENIED"), "{xwing}");
    let tiefighter = trace(&kubeconfig, "org=empire,class=tiefighter");
    assert!(tiefighter.contains("verdict: ALLOWED"), "{tiefighter}");

    // Applying again updates the same object.
    ok(
        &kubeconfig,
        &["policy", "apply", "-f", file.to_str().unwrap()],
    );
    let error = failure(
        &kubeconfig,
        &[
            "policy",
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--name",
            "x",
        ],
    );
    assert!(error.contains("--name has no meaning"), "{error}");

    let deleted = ok(&kubeconfig, &["policy", "delete", "nnp.default.rule1"]);
    assert!(deleted.contains("deleted"), "{deleted}");
    assert!(nnps.get_opt("rule1").await.expect("get").is_none());
    assert!(trace(&kubeconfig, "org=alliance,class=xwing").contains("verdict: ALLOWED"));

    let error = failure(
        &kubeconfig,
        &[
            "endpoint",
            "add",
            "--node",
            "node-1",
            "--name",
            "xwing",
            "--labels",
            "org=alliance",
            "--ip",
            "10.244.3.5",
            "--interface",
            "lxc1",
        ],
    );
    assert!(
        error.contains("endpoints come from Pod objects in Kubernetes mode"),
        "{error}"
    );
}
