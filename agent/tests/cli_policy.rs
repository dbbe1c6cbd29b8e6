//! The `nodeseal` binary's identity-policy commands against a directory store: the Star Wars
//! rule of Cilium's guide applied, traced, listed and deleted; a refused document stores
//! nothing and names its field; endpoints get identities.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up or expectation is a test failure"
)]

use std::path::Path;
use std::process::{Command, Output};

const NODESEAL: &str = env!("CARGO_BIN_EXE_nodeseal");

/// Cilium's getting-started (Star Wars) L3/L4 policy.
const RULE1: &str = include_str!("../../policy/examples/star-wars-rule1.yaml");

fn nodeseal(store: &Path, args: &[&str]) -> Output {
    Command::new(NODESEAL)
        .args(args)
        .arg("--store-dir")
        .arg(store)
        .env_remove("NODESEAL_ETCD_ENDPOINTS")
        .env_remove("NODESEAL_KUBERNETES")
        .output()
        .expect("running nodeseal")
}

fn ok(store: &Path, args: &[&str]) -> String {
    let output = nodeseal(store, args);
    assert!(
        output.status.success(),
        "nodeseal {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf8")
}

fn trace(store: &Path, src: &str) -> String {
    ok(
        store,
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

#[test]
fn policy_identity_and_endpoint_commands_work_on_a_directory_store() {
    let temp = tempfile::tempdir().expect("temp dir");
    let store = temp.path().join("store");
    let file = temp.path().join("rule1.yaml");
    std::fs::write(&file, RULE1).unwrap();

    // Before any policy: allowed, not enforced.
    let before = trace(&store, "org=alliance,class=xwing");
    assert!(before.contains("verdict: ALLOWED"), "{before}");

    let applied = ok(&store, &["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(applied.contains("policy rule1 stored"), "{applied}");
    let listed = ok(&store, &["policy", "get"]);
    assert!(
        listed.contains("rule1") && listed.contains("CiliumNetworkPolicy default/rule1"),
        "{listed}"
    );
    let json = ok(&store, &["policy", "get", "rule1", "-o", "json"]);
    let value: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(value[0]["name"], "rule1");

    let xwing = trace(&store, "org=alliance,class=xwing");
    assert!(xwing.contains("ingress: denied by default"), "{xwing}");
    assert!(xwing.contains("verdict: DENIED"), "{xwing}");
    let tiefighter = trace(&store, "org=empire,class=tiefighter");
    assert!(
        tiefighter.contains("allowed by CiliumNetworkPolicy \"default/rule1\" rule 0"),
        "{tiefighter}"
    );
    assert!(tiefighter.contains("verdict: ALLOWED"), "{tiefighter}");

    // An L7 rule is refused by field, with a failing exit code, and nothing is stored.
    let l7 = temp.path().join("l7.yaml");
    std::fs::write(
        &l7,
        RULE1.replace("rule1", "rule2") + "      rules:\n        http:\n        - method: POST\n",
    )
    .unwrap();
    let refused = nodeseal(&store, &["policy", "apply", "-f", l7.to_str().unwrap()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("spec.ingress[0].toPorts[0].rules"),
        "{stderr}"
    );
    assert!(!ok(&store, &["policy", "get"]).contains("rule2"));

    // The same name in another namespace does not replace rule1 silently.
    let other = temp.path().join("other.yaml");
    std::fs::write(
        &other,
        RULE1.replace("  name: rule1\n", "  name: rule1\n  namespace: other\n"),
    )
    .unwrap();
    let clash = nodeseal(&store, &["policy", "apply", "-f", other.to_str().unwrap()]);
    assert!(!clash.status.success());
    let stderr = String::from_utf8_lossy(&clash.stderr);
    assert!(stderr.contains("give --name"), "{stderr}");
    let stored = ok(
        &store,
        &[
            "policy",
            "apply",
            "-f",
            other.to_str().unwrap(),
            "--name",
            "rule1-other",
        ],
    );
    assert!(stored.contains("policy rule1-other stored"), "{stored}");
    ok(&store, &["policy", "delete", "rule1-other"]);
    // Re-applying the same policy replaces it.
    let again = ok(&store, &["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(again.contains("policy rule1 replaced"), "{again}");

    // Endpoints: the same labels share an identity, others get another one.
    let add = |name: &str, labels: &str, ip: &str| {
        ok(
            &store,
            &[
                "endpoint",
                "add",
                "--node",
                "node-1",
                "--name",
                name,
                "--labels",
                labels,
                "--ip",
                ip,
                "--interface",
                &format!("lxc-{name}"),
            ],
        )
    };
    assert!(
        add("deathstar-1", "org=empire,class=deathstar", "10.244.1.10").contains("identity 256")
    );
    assert!(
        add("deathstar-2", "org=empire,class=deathstar", "10.244.1.11").contains("identity 256")
    );
    assert!(add("xwing", "org=alliance,class=xwing", "10.244.1.12").contains("identity 257"));
    let endpoints = ok(&store, &["endpoint", "list"]);
    assert!(
        endpoints.contains("default/xwing") && endpoints.contains("257"),
        "{endpoints}"
    );
    let identities = ok(&store, &["identity", "list"]);
    assert!(
        identities.contains("256") && identities.contains("k8s:class=deathstar"),
        "{identities}"
    );
    let one = ok(&store, &["identity", "get", "257"]);
    assert!(one.contains("k8s:org=alliance"), "{one}");
    let removed = ok(
        &store,
        &["endpoint", "remove", "--node", "node-1", "--name", "xwing"],
    );
    assert!(removed.contains("removed"), "{removed}");
    assert!(!ok(&store, &["endpoint", "list"]).contains("xwing"));
    // xwing's identity is unused now; the deathstars' is kept.
    let collected = ok(&store, &["identity", "gc"]);
    assert!(
        collected.contains("deleted 1 unused identities: 257"),
        "{collected}"
    );
    assert!(
        !nodeseal(&store, &["identity", "get", "257"])
            .status
            .success()
    );
    assert!(ok(&store, &["identity", "get", "256"]).contains("k8s:class=deathstar"));

    ok(&store, &["policy", "delete", "rule1"]);
    assert!(trace(&store, "org=alliance,class=xwing").contains("verdict: ALLOWED"));
    assert!(
        !nodeseal(&store, &["policy", "delete", "rule1"])
            .status
            .success()
    );
}
