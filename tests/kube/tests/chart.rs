//! The Helm chart (deploy/helm/nodeseal) rendered by the real `helm` over a matrix of values,
//! with assertions on the rendered objects; then installed, upgraded and uninstalled with
//! `helm` against the fixture's real kube-apiserver.
//!
//! No golden files: each test states what a value must change in the objects.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up or expectation is a test failure"
)]

use std::time::{Duration, Instant};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{Container, EnvVar},
    rbac::v1::{ClusterRole, PolicyRule, Role},
};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, PostParams},
    core::GroupVersionKind,
    discovery::pinned_kind,
};
use nodeseal_kube_fixture::{
    API_AUDIENCE, KubeApiServer, binaries_or_skip, chart_dir, helm, render_chart,
    wait_crd_established,
};
use serde::Deserialize as _;
use serde_json::Value;

const NS: &str = "nodeseal";
const CRD: &str = "nodesealnodes.nodeseal.io";

/// The rendered chart: every document, as JSON values.
struct Rendered(Vec<Value>);

impl Rendered {
    fn of(values: &[(&str, &str)]) -> Self {
        let yaml = render_chart(NS, values).expect("helm template");
        let docs = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde_yaml::Value::deserialize(d).expect("rendered YAML parses"))
            .filter(|v| !v.is_null())
            .map(|v| serde_json::to_value(v).expect("YAML to JSON"))
            .collect();
        Self(docs)
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn get<T: serde::de::DeserializeOwned>(&self, kind: &str, name: &str) -> T {
        let doc = self
            .find(kind, name)
            .unwrap_or_else(|| panic!("no {kind} {name} rendered; have {:?}", self.names()));
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind} {name}: {e}"))
    }

    fn names(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|d| {
                format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap_or("?"),
                    d["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect()
    }

    fn agent(&self) -> (DaemonSet, Container) {
        let ds: DaemonSet = self.get("DaemonSet", "nodeseal-agent");
        let container = ds
            .spec
            .template
            .spec
            .as_ref()
            .map(|p| p.containers[0].clone())
            .expect("agent container");
        (ds, container)
    }
}

fn env<'a>(container: &'a Container, name: &str) -> Option<&'a EnvVar> {
    container.env.as_ref()?.iter().find(|e| e.name == name)
}

fn env_value(container: &Container, name: &str) -> Option<String> {
    env(container, name).and_then(|e| e.value.clone())
}

fn capabilities(container: &Container) -> (Vec<String>, Vec<String>) {
    let caps = container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .expect("capabilities");
    (caps.add.unwrap_or_default(), caps.drop.unwrap_or_default())
}

#[test]
fn lint_strict_passes_for_each_value_set() {
    if !binaries_or_skip("chart::lint_strict_passes_for_each_value_set") {
        return;
    }
    let chart = chart_dir().to_string_lossy().into_owned();
    for sets in [
        &[][..],
        &["encryption.enabled=true"],
        &[
            "encryption.enabled=true",
            "encryption.strictMode.enabled=false",
            "metrics.serviceMonitor.enabled=true",
            "agent.legacyKernelCapabilities=true",
        ],
        &["metrics.enabled=false"],
    ] {
        let mut args = vec!["lint", "--strict", chart.as_str()];
        for set in sets {
            args.extend(["--set", set]);
        }
        let out = helm(&args).expect("helm lint");
        assert!(
            out.status.success(),
            "helm lint --strict {sets:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn defaults_render_agents_without_encryption_and_no_keymgr() {
    if !binaries_or_skip("chart::defaults_render_agents_without_encryption_and_no_keymgr") {
        return;
    }
    let r = Rendered::of(&[]);
    let (ds, agent) = r.agent();
    assert_eq!(
        env_value(&agent, "NODESEAL_ENCRYPTION").as_deref(),
        Some("false")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_ENCRYPTION_TYPE").as_deref(),
        Some("ipsec")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_NODE_ENCRYPTION").as_deref(),
        Some("false")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_NODE_ENCRYPTION_EXEMPT_TCP_PORTS").as_deref(),
        Some("6443")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_KUBERNETES").as_deref(),
        Some("true")
    );
    // No keymgr, nor anything only keymgr uses, when encryption is off.
    for (kind, name) in [
        ("Deployment", "nodeseal-keymgr"),
        ("PodDisruptionBudget", "nodeseal-keymgr"),
        ("ServiceAccount", "nodeseal-keymgr"),
        ("ClusterRole", "nodeseal-keymgr"),
        ("Role", "nodeseal-keymgr"),
        ("ValidatingAdmissionPolicy", "nodeseal-keymgr-object-names"),
    ] {
        assert!(
            r.find(kind, name).is_none(),
            "{kind} {name} rendered with encryption off"
        );
    }
    // The agent's own-node rule is there whatever encryption says.
    assert!(
        r.find("ValidatingAdmissionPolicy", "nodeseal-agent-own-node")
            .is_some()
    );
    assert!(
        r.find(
            "ValidatingAdmissionPolicyBinding",
            "nodeseal-agent-own-node"
        )
        .is_some()
    );
    assert!(r.find("ServiceMonitor", "nodeseal-agent").is_none());

    // The DaemonSet a node agent needs.
    let spec = &ds.spec;
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        serde_json::to_value(&strategy.rolling_update.as_ref().unwrap().max_unavailable).unwrap(),
        1
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("nodeseal-agent"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
    assert_eq!(tolerations[0].key, None, "tolerates every taint");
    // Node name from the downward API.
    let node = env(&agent, "NODESEAL_NODE_NAME").unwrap();
    let field = node
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    // Only the capabilities it needs, nothing privileged.
    let (add, drop) = capabilities(&agent);
    assert_eq!(add, ["NET_ADMIN", "BPF", "PERFMON"]);
    assert_eq!(drop, ["ALL"]);
    let security = agent.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    // Probes on the agent's health endpoint, which the agent serves on that address.
    let health = env_value(&agent, "NODESEAL_HEALTH_ADDR").unwrap();
    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/healthz"),
        (agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        let port = serde_json::to_value(&get.port).unwrap();
        assert_eq!(
            format!("{}:{port}", get.host.as_deref().unwrap()),
            health,
            "{path} probes where the agent listens"
        );
    }
    // bpffs and /run/nodeseal from the host.
    let volumes = pod.volumes.as_ref().unwrap();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    assert_eq!(host_path("bpffs").as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(host_path("run").as_deref(), Some("/run/nodeseal"));
    let mounts = agent.volume_mounts.as_ref().unwrap();
    let bpffs = mounts.iter().find(|m| m.name == "bpffs").unwrap();
    assert_eq!(bpffs.mount_path, "/sys/fs/bpf");
    assert!(
        env_value(&agent, "NODESEAL_BPF_PIN_ROOT")
            .unwrap()
            .starts_with("/sys/fs/bpf/")
    );
    assert!(
        env_value(&agent, "NODESEAL_STATUS_SOCKET")
            .unwrap()
            .starts_with("/run/nodeseal/")
    );
    // Metrics on by default: the Service selects the agent pods.
    let service = r.find("Service", "nodeseal-agent-metrics").unwrap();
    let selector = &service["spec"]["selector"];
    let labels = serde_json::to_value(&spec.template.metadata.as_ref().unwrap().labels).unwrap();
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&labels[k], v, "metrics Service selects agent pods by {k}");
    }
    assert!(env_value(&agent, "NODESEAL_METRICS_ADDR").is_some());
    assert_eq!(agent.args, None, "no extraArgs by default");
    // The one privileged step: a sysctl the agent's read-only /proc/sys cannot take.
    let init = pod.init_containers.as_ref().expect("init containers");
    assert_eq!(init.len(), 1);
    assert_eq!(
        init[0].command.as_ref().unwrap().last().unwrap(),
        "echo 0 > /proc/sys/net/core/xfrm_larval_drop"
    );
    let quiet = Rendered::of(&[("agent.sysctlInitContainer", "false")]);
    let (ds, _) = quiet.agent();
    assert_eq!(ds.spec.template.spec.unwrap().init_containers, None);
}

#[test]
fn encryption_on_renders_keymgr_consistent_with_the_agent() {
    if !binaries_or_skip("chart::encryption_on_renders_keymgr_consistent_with_the_agent") {
        return;
    }
    let r = Rendered::of(&[("encryption.enabled", "true")]);
    let (ds, agent) = r.agent();
    assert_eq!(
        env_value(&agent, "NODESEAL_ENCRYPTION").as_deref(),
        Some("true")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_STRICT_MODE").as_deref(),
        Some("true")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_REKEY_INTERVAL").as_deref(),
        Some("1h")
    );
    // Whole numbers, not the float form YAML numbers take in templates (2.74877906944e+11).
    assert_eq!(
        env_value(&agent, "NODESEAL_SA_MAX_BYTES").as_deref(),
        Some("274877906944")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_SA_MAX_PACKETS").as_deref(),
        Some("4294967296")
    );

    let deployment: Deployment = r.get("Deployment", "nodeseal-keymgr");
    let spec = &deployment.spec;
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    let keymgr = &pod.containers[0];
    assert!(
        pod.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root)
            .unwrap()
    );
    let security = keymgr.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(capabilities(keymgr), (vec![], vec!["ALL".to_string()]));
    // Probes on keymgr's health endpoint: the named port is where keymgr is told to listen.
    let health = env_value(keymgr, "NODESEAL_HEALTH_ADDR").unwrap();
    let ports = keymgr.ports.as_ref().unwrap();
    let port = ports.iter().find(|p| p.name.as_deref() == Some("health"));
    assert_eq!(
        port.map(|p| format!("0.0.0.0:{}", p.container_port)),
        Some(health)
    );
    for (probe, path) in [
        (keymgr.liveness_probe.as_ref(), "/healthz"),
        (keymgr.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(serde_json::to_value(&get.port).unwrap(), "health");
    }
    // keymgr signs only for the chart's agent DaemonSet and ServiceAccount, in the same
    // trust domain as the agents.
    assert_eq!(
        env_value(keymgr, "NODESEAL_AGENT_DAEMONSET"),
        ds.metadata.name
    );
    assert_eq!(
        env_value(keymgr, "NODESEAL_AGENT_SERVICE_ACCOUNT"),
        ds.spec
            .template
            .spec
            .as_ref()
            .and_then(|p| p.service_account_name.clone())
    );
    assert_eq!(
        env_value(keymgr, "NODESEAL_TRUST_DOMAIN"),
        env_value(&agent, "NODESEAL_TRUST_DOMAIN")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("nodeseal-keymgr"));

    let pdb = r.find("PodDisruptionBudget", "nodeseal-keymgr").unwrap();
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        serde_json::to_value(&spec.selector.match_labels).unwrap()
    );
    // The admission policies name the ServiceAccounts the pods run as.
    let own_node = r
        .find("ValidatingAdmissionPolicy", "nodeseal-agent-own-node")
        .unwrap();
    assert!(
        own_node["spec"]["matchConditions"][0]["expression"]
            .as_str()
            .unwrap()
            .contains(":nodeseal-agent$')")
    );
    let keymgr_names = r
        .find("ValidatingAdmissionPolicy", "nodeseal-keymgr-object-names")
        .unwrap();
    assert!(
        keymgr_names["spec"]["matchConditions"][0]["expression"]
            .as_str()
            .unwrap()
            .contains(":nodeseal-keymgr$')")
    );
    for binding in ["nodeseal-agent-own-node", "nodeseal-keymgr-object-names"] {
        let b = r.find("ValidatingAdmissionPolicyBinding", binding).unwrap();
        assert_eq!(b["spec"]["policyName"], binding);
        assert_eq!(b["spec"]["validationActions"], serde_json::json!(["Deny"]));
    }
}

fn grants(rules: &[PolicyRule], resource: &str, verb: &str) -> Vec<Option<Vec<String>>> {
    rules
        .iter()
        .filter(|r| r.resources.iter().flatten().any(|x| x == resource))
        .filter(|r| r.verbs.iter().any(|v| v == verb))
        .map(|r| r.resource_names.clone())
        .collect()
}

#[test]
fn rbac_is_least_privilege() {
    if !binaries_or_skip("chart::rbac_is_least_privilege") {
        return;
    }
    let r = Rendered::of(&[("encryption.enabled", "true")]);
    let roles: Vec<(String, Vec<PolicyRule>)> =
        r.0.iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
            .map(|d| {
                let name = format!("{}/{}", d["kind"], d["metadata"]["name"]);
                let rules = if d["kind"] == "Role" {
                    serde_json::from_value::<Role>(d.clone()).unwrap().rules
                } else {
                    serde_json::from_value::<ClusterRole>(d.clone())
                        .unwrap()
                        .rules
                };
                (name, rules.unwrap_or_default())
            })
            .collect();
    assert_eq!(roles.len(), 4, "{roles:?}");
    for (name, rules) in &roles {
        for rule in rules {
            let wild = |v: &Vec<String>| v.iter().any(|x| x == "*");
            assert!(
                !wild(&rule.verbs)
                    && !rule.resources.as_ref().is_some_and(wild)
                    && !rule.api_groups.as_ref().is_some_and(wild),
                "{name} has a wildcard rule: {rule:?}"
            );
            assert!(
                rule.non_resource_urls.is_none(),
                "{name}: non-resource URLs {rule:?}"
            );
        }
    }
    let rules_of = |name: &str| &roles.iter().find(|(n, _)| n == name).unwrap().1;
    // The agent never reads a Secret, approves or signs.
    for name in [
        "\"ClusterRole\"/\"nodeseal-agent\"",
        "\"Role\"/\"nodeseal-agent\"",
    ] {
        let rules = rules_of(name);
        for resource in [
            "secrets",
            "certificatesigningrequests/approval",
            "certificatesigningrequests/status",
            "signers",
        ] {
            assert!(
                !rules
                    .iter()
                    .any(|r| r.resources.iter().flatten().any(|x| x == resource)),
                "{name} grants {resource}"
            );
        }
    }
    // Identity policy: the agent reads pods, NetworkPolicies, nodeseal's policies and the
    // identity ConfigMaps, and writes none of them (keymgr allocates identities).
    for (resource, group_rules) in [
        ("pods", "\"ClusterRole\"/\"nodeseal-agent\""),
        ("namespaces", "\"ClusterRole\"/\"nodeseal-agent\""),
        ("networkpolicies", "\"ClusterRole\"/\"nodeseal-agent\""),
        (
            "nodesealnetworkpolicies",
            "\"ClusterRole\"/\"nodeseal-agent\"",
        ),
        (
            "nodesealclusterwidenetworkpolicies",
            "\"ClusterRole\"/\"nodeseal-agent\"",
        ),
        ("configmaps", "\"Role\"/\"nodeseal-agent\""),
    ] {
        let rules = rules_of(group_rules);
        for verb in ["list", "watch"] {
            assert_eq!(
                grants(rules, resource, verb),
                [None],
                "agent {verb} {resource}"
            );
        }
        for verb in ["create", "update", "patch", "delete"] {
            assert!(
                grants(rules, resource, verb).is_empty(),
                "agent may {verb} {resource}"
            );
        }
    }
    // Its one DaemonSet read is by name.
    assert_eq!(
        grants(rules_of("\"Role\"/\"nodeseal-agent\""), "daemonsets", "get"),
        [Some(vec!["nodeseal-agent".to_string()])]
    );
    // keymgr: the CA Secret by name (create cannot be narrowed by RBAC; the admission policy
    // does it), signing only nodeseal's signer.
    let keymgr = rules_of("\"Role\"/\"nodeseal-keymgr\"");
    assert_eq!(
        grants(keymgr, "secrets", "get"),
        [Some(vec!["nodeseal-ca".to_string()])]
    );
    assert!(grants(keymgr, "secrets", "list").is_empty());
    assert_eq!(
        grants(keymgr, "leases", "update"),
        [Some(vec!["nodeseal-keymgr".to_string()])]
    );
    // keymgr allocates identities: ConfigMap writes (names limited by admission) and every
    // pod read.
    for verb in ["create", "update", "delete"] {
        assert!(
            grants(keymgr, "configmaps", verb).contains(&None),
            "keymgr {verb} configmaps"
        );
    }
    let cluster = rules_of("\"ClusterRole\"/\"nodeseal-keymgr\"");
    for verb in ["get", "list", "watch"] {
        assert_eq!(grants(cluster, "pods", verb), [None], "keymgr {verb} pods");
        assert_eq!(
            grants(cluster, "namespaces", verb),
            [None],
            "keymgr {verb} namespaces"
        );
    }
    assert_eq!(
        grants(cluster, "signers", "sign"),
        [Some(vec!["nodeseal.io/node".to_string()])]
    );
}

#[test]
fn values_change_what_they_say() {
    if !binaries_or_skip("chart::values_change_what_they_say") {
        return;
    }
    let r = Rendered::of(&[
        ("encryption.enabled", "true"),
        ("encryption.strictMode.enabled", "false"),
        ("encryption.rekeyInterval", "30m"),
        ("encryption.saLimits.maxBytes", "1000000000"),
        ("encryption.saLimits.maxPackets", "0"),
        ("encryption.type", "wireguard"),
        ("identity.trustDomain", "example.org"),
        ("keymgr.replicas", "3"),
        ("image.repository", "registry.example/nodeseal"),
        ("image.tag", "v9"),
        ("agent.legacyKernelCapabilities", "true"),
        ("agent.updateStrategy.maxUnavailable", "10%"),
        ("metrics.serviceMonitor.enabled", "true"),
        ("priorityClassName", "node-agents"),
        ("extraArgs[0]", "--rekey-grace=60s"),
    ]);
    let (ds, agent) = r.agent();
    assert_eq!(
        env_value(&agent, "NODESEAL_STRICT_MODE").as_deref(),
        Some("false")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_REKEY_INTERVAL").as_deref(),
        Some("30m")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_SA_MAX_BYTES").as_deref(),
        Some("1000000000")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_SA_MAX_PACKETS").as_deref(),
        Some("0")
    );
    // Rendered as asked; the agent refuses it with a clear message (agent config tests).
    assert_eq!(
        env_value(&agent, "NODESEAL_ENCRYPTION_TYPE").as_deref(),
        Some("wireguard")
    );
    assert_eq!(
        env_value(&agent, "NODESEAL_TRUST_DOMAIN").as_deref(),
        Some("example.org")
    );
    assert_eq!(agent.image.as_deref(), Some("registry.example/nodeseal:v9"));
    assert_eq!(agent.args, Some(vec!["--rekey-grace=60s".to_string()]));
    let (add, _) = capabilities(&agent);
    assert_eq!(
        add,
        ["NET_ADMIN", "SYS_ADMIN"],
        "pre-5.8 kernels: no CAP_BPF"
    );
    let spec = ds.spec;
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.priority_class_name.as_deref(), Some("node-agents"));
    assert_eq!(
        serde_json::to_value(
            spec.update_strategy
                .unwrap()
                .rolling_update
                .unwrap()
                .max_unavailable
        )
        .unwrap(),
        "10%"
    );
    let keymgr: Deployment = r.get("Deployment", "nodeseal-keymgr");
    assert_eq!(keymgr.spec.replicas, Some(3));
    let monitor = r.find("ServiceMonitor", "nodeseal-agent").unwrap();
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");

    let quiet = Rendered::of(&[("metrics.enabled", "false")]);
    let (_, agent) = quiet.agent();
    assert!(quiet.find("Service", "nodeseal-agent-metrics").is_none());
    assert!(env_value(&agent, "NODESEAL_METRICS_ADDR").is_none());
    assert!(
        agent
            .ports
            .unwrap()
            .iter()
            .all(|p| p.name.as_deref() != Some("metrics"))
    );
}

#[test]
fn node_encryption_renders_in_either_mode() {
    if !binaries_or_skip("chart::node_encryption_renders_in_either_mode") {
        return;
    }
    for mode in ["ipsec", "wireguard"] {
        let r = Rendered::of(&[
            ("encryption.enabled", "true"),
            ("encryption.type", mode),
            ("encryption.nodeEncryption", "true"),
            ("encryption.nodeEncryptionExemptTcpPorts", "{6443,2379}"),
        ]);
        let (_, agent) = r.agent();
        assert_eq!(
            env_value(&agent, "NODESEAL_ENCRYPTION_TYPE").as_deref(),
            Some(mode)
        );
        assert_eq!(
            env_value(&agent, "NODESEAL_NODE_ENCRYPTION").as_deref(),
            Some("true")
        );
        assert_eq!(
            env_value(&agent, "NODESEAL_NODE_ENCRYPTION_EXEMPT_TCP_PORTS").as_deref(),
            Some("6443,2379")
        );
    }
}

#[test]
fn bad_values_are_rejected_naming_the_value() {
    if !binaries_or_skip("chart::bad_values_are_rejected_naming_the_value") {
        return;
    }
    for (set, named) in [
        (("encryption.type", "aes"), "/encryption/type"),
        (("encryption.enabled", "yes"), "/encryption/enabled"),
        (
            ("encryption.strictMode.enabled", "on"),
            "/encryption/strictMode/enabled",
        ),
        (
            ("encryption.rekeyInterval", "soon"),
            "/encryption/rekeyInterval",
        ),
        (
            ("encryption.saLimits.maxPackets", "-1"),
            "/encryption/saLimits/maxPackets",
        ),
        (("keymgr.replicas", "two"), "/keymgr/replicas"),
        (("keymgr.replicas", "0"), "/keymgr/replicas"),
        (
            ("identity.trustDomain", "Not A Domain"),
            "/identity/trustDomain",
        ),
        (("image.pullPolicy", "Sometimes"), "/image/pullPolicy"),
        (("metrics.port", "70000"), "/metrics/port"),
        (("agent.cleanupOnExit", "later"), "/agent/cleanupOnExit"),
        (("encryptoin.enabled", "true"), "encryptoin"),
        (
            ("encryption.nodeEncryptionExemptTcpPorts", "{0}"),
            "/encryption/nodeEncryptionExemptTcpPorts",
        ),
    ] {
        let e = render_chart(NS, &[set]).expect_err(&format!("{set:?} accepted"));
        let message = format!("{e:#}");
        assert!(message.contains(named), "{set:?}: {message}");
    }
}

/// Waits until `check` passes (RBAC and admission reach the apiserver's caches a moment
/// after they are written).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("{what}: still failing: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn run_helm(cluster: &KubeApiServer, args: &[&str]) -> String {
    let out = cluster.helm(args).expect("running helm");
    assert!(
        out.status.success(),
        "helm {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `object` (a rendered document) exists in the cluster.
async fn exists(client: &kube::Client, object: &Value) -> bool {
    let object: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    let types = object.types.clone().unwrap();
    let gvk = GroupVersionKind::try_from(&types).unwrap();
    let (resource, caps) = pinned_kind(client, &gvk).await.expect("discovery");
    let name = object.metadata.name.clone().unwrap();
    let api: Api<DynamicObject> = match caps.scope {
        kube::discovery::Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            object.metadata.namespace.as_deref().unwrap_or(NS),
            &resource,
        ),
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    api.get_opt(&name).await.expect("get").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_upgrade_uninstall_against_a_real_apiserver() {
    if !binaries_or_skip("chart::install_upgrade_uninstall_against_a_real_apiserver") {
        return;
    }
    let mut cluster = KubeApiServer::start().await.expect("control plane");
    let chart = chart_dir().to_string_lossy().into_owned();
    let admin = cluster.admin_client();

    // Install with encryption on: every object accepted by the apiserver.
    let started = Instant::now();
    let notes = run_helm(
        &cluster,
        &[
            "install",
            "nodeseal",
            &chart,
            "--namespace",
            NS,
            "--create-namespace",
            "--set",
            "encryption.enabled=true",
        ],
    );
    eprintln!("helm install took {:?}", started.elapsed());
    assert!(notes.contains("nodeseal status --cluster"), "{notes}");
    wait_crd_established(&admin, CRD, Duration::from_secs(30))
        .await
        .expect("CRD established");
    let on = Rendered::of(&[("encryption.enabled", "true")]);
    for doc in &on.0 {
        assert!(
            exists(&admin, doc).await,
            "{}/{} not in the cluster after helm install",
            doc["kind"],
            doc["metadata"]["name"]
        );
    }

    // The admission policy is active: an agent token bound to node-a cannot write node-b's
    // NodesealNode, but can write its own.
    cluster
        .create_node("node-a", "192.0.2.10".parse().unwrap(), &["10.244.1.0/24"])
        .await
        .expect("node");
    let pod = cluster
        .create_agent_pod(NS, "agent-a", "node-a", "nodeseal-agent")
        .await
        .expect("pod");
    let token = cluster
        .pod_bound_token(
            NS,
            "nodeseal-agent",
            "agent-a",
            pod.metadata.uid.as_deref().unwrap(),
            API_AUDIENCE,
            Duration::from_secs(3600),
        )
        .await
        .expect("token");
    let agent = cluster
        .client_for_token(&token)
        .await
        .expect("agent client");
    let gvk = GroupVersionKind::gvk("nodeseal.io", "v1alpha1", "NodesealNode");
    let nsn: Api<DynamicObject> = Api::all_with(
        agent,
        &ApiResource::from_gvk_with_plural(&gvk, "nodesealnodes"),
    );
    let record = |name: &str| -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nodeseal.io/v1alpha1",
            "kind": "NodesealNode",
            "metadata": { "name": name },
            "spec": { "handshakePort": 4250, "spiffeID": format!("spiffe://cluster.local/node/{name}") },
        }))
        .unwrap()
    };
    eventually("own-node policy refuses node-b", || {
        let nsn = nsn.clone();
        let other = record("node-b");
        async move {
            let dry = PostParams {
                dry_run: true,
                ..Default::default()
            };
            match nsn.create(&dry, &other).await {
                Err(kube::Error::Api(s))
                    if s.code == 403
                        && s.message.contains(
                            "bound to node node-a but tried to CREATE NodesealNode node-b",
                        ) =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    nsn.create(&PostParams::default(), &record("node-a"))
        .await
        .expect("agent-a writes its own NodesealNode");

    // Upgrade to encryption off: keymgr and its objects go, the agents stay.
    run_helm(
        &cluster,
        &[
            "upgrade",
            "nodeseal",
            &chart,
            "--namespace",
            NS,
            "--reuse-values",
            "--set",
            "encryption.enabled=false",
        ],
    );
    let off = Rendered::of(&[("encryption.enabled", "false")]);
    for doc in &on.0 {
        let kept = off
            .find(
                doc["kind"].as_str().unwrap(),
                doc["metadata"]["name"].as_str().unwrap(),
            )
            .is_some();
        assert_eq!(
            exists(&admin, doc).await,
            kept,
            "{}/{} after upgrade to encryption off",
            doc["kind"],
            doc["metadata"]["name"]
        );
    }
    let ds: DaemonSet = Api::namespaced(admin.clone(), NS)
        .get("nodeseal-agent")
        .await
        .expect("agent DaemonSet");
    let container = &ds.spec.template.spec.unwrap().containers[0];
    assert_eq!(
        env_value(container, "NODESEAL_ENCRYPTION").as_deref(),
        Some("false")
    );

    // Uninstall: every templated object is gone (and the release record), the CRD and the
    // NodesealNodes stay (Helm's convention for crds/).
    run_helm(
        &cluster,
        &["uninstall", "nodeseal", "--namespace", NS, "--wait"],
    );
    for doc in on.0.iter().chain(&off.0) {
        assert!(
            !exists(&admin, doc).await,
            "{}/{} left after helm uninstall",
            doc["kind"],
            doc["metadata"]["name"]
        );
    }
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), NS);
    let left = secrets
        .list(&kube::api::ListParams::default().labels("owner=helm"))
        .await
        .expect("list secrets");
    assert!(
        left.items.is_empty(),
        "helm release records left: {:?}",
        left.items.len()
    );
    wait_crd_established(&admin, CRD, Duration::from_secs(5))
        .await
        .expect("the CRD stays after uninstall");
    let admin_nsn: Api<DynamicObject> = Api::all_with(
        admin,
        &ApiResource::from_gvk_with_plural(&gvk, "nodesealnodes"),
    );
    assert!(admin_nsn.get_opt("node-a").await.unwrap().is_some());
    let out = run_helm(&cluster, &["list", "--all-namespaces", "--short"]);
    assert!(out.trim().is_empty(), "releases left: {out}");
}
