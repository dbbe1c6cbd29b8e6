//! The Helm chart drives a 3-node fabric in Kubernetes mode: a real kube-apiserver with the
//! chart `helm install`ed (tests/netns/src/kube.rs), and this test playing the kubelet. It reads
//! the agent DaemonSet's and the keymgr Deployment's containers from the apiserver and runs
//! them as processes in the node namespaces: their command, args and environment (downward API
//! resolved, `$(VAR)` expanded), hostPath directories mapped to per-node directories (the
//! namespaces share one filesystem, a cluster's nodes do not), a token bound to the pod of the
//! chart's ServiceAccount, probes on the health endpoint the chart names. So the chart's RBAC,
//! settings and probes are what runs here.
//!
//! - encryption off: agents ready, nothing in the kernel, pods talk in clear;
//! - `helm upgrade --set encryption.enabled=true` under a UDP stream between pods, rolled out
//!   one agent at a time: the fabric comes up, ESP only on the wire; the stream's gap is
//!   measured and reported;
//! - back to false: every SA, XFRM policy and eBPF pin is gone;
//! - on again, then `helm uninstall`: the agents, stopped as the kubelet would after it,
//!   leave no XFRM state or eBPF pins behind.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "scenario helpers panic with context, like the tests"
)]

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use nodeseal_kube_fixture::{API_AUDIENCE, binaries_or_skip, chart_dir, helm_binary};
use nodeseal_netns::fabric::binary;
use nodeseal_netns::kube::{KubeControlPlane, NAMESPACE, RELEASE};
use nodeseal_netns::{Feature, Netns, Process, Topology, UdpStream, ping, require, wait_until};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(180);
const NODES: usize = 3;
/// Datagrams per second of the stream across the switch.
const RATE: u32 = 200;

/// What the kubelet does here, for the chart's workloads.
struct Kubelet<'a> {
    topo: &'a Topology,
    control: &'a KubeControlPlane,
    /// Per-node "host" directories and the keymgr's kubeconfig live here.
    dir: PathBuf,
    /// bpffs directory standing for each node's `/sys/fs/bpf`.
    bpf_base: PathBuf,
    agents: Vec<Option<Process>>,
    keymgr: Option<Process>,
}

impl<'a> Kubelet<'a> {
    fn new(topo: &'a Topology, control: &'a KubeControlPlane) -> Self {
        let dir = topo.log_dir().join("kubelet");
        std::fs::create_dir_all(&dir).unwrap();
        let bpf_base = PathBuf::from("/sys/fs/bpf").join(format!(
            "nodeseal-test-{}",
            dir.to_string_lossy().replace('/', "_")
        ));
        Self {
            topo,
            control,
            dir,
            bpf_base,
            agents: (0..NODES).map(|_| None).collect(),
            keymgr: None,
        }
    }

    fn helm(&self, args: &[&str]) -> String {
        let admin = self.control.configs().admin;
        let out = self
            .topo
            .underlay()
            .command(&helm_binary().to_string_lossy())
            .arg("--kubeconfig")
            .arg(&admin)
            .args(args)
            .output()
            .expect("running helm");
        assert!(
            out.status.success(),
            "helm {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn upgrade(&self, encryption: bool) {
        self.upgrade_with(encryption, true);
    }

    fn upgrade_with(&self, encryption: bool, strict: bool) {
        let chart = chart_dir().to_string_lossy().into_owned();
        let enabled = format!("encryption.enabled={encryption}");
        let strict = format!("encryption.strictMode.enabled={strict}");
        self.helm(&[
            "upgrade",
            RELEASE,
            &chart,
            "--namespace",
            NAMESPACE,
            "--reuse-values",
            "--set",
            &enabled,
            "--set",
            &strict,
        ]);
    }

    fn agent_container(&self) -> Container {
        let ds: DaemonSet = self
            .control
            .admin(|client| async move {
                Ok(Api::<DaemonSet>::namespaced(client, NAMESPACE)
                    .get("nodeseal-agent")
                    .await?)
            })
            .expect("agent DaemonSet");
        ds.spec.template.spec.unwrap().containers[0].clone()
    }

    /// Where a path inside node `i`'s containers lands: hostPath mounts become per-node
    /// directories; bpffs a per-node directory of the real bpffs.
    fn host_path(&self, container: &Container, i: usize, path: &str) -> String {
        for mount in container.volume_mounts.iter().flatten() {
            if let Some(rest) = path.strip_prefix(&mount.mount_path) {
                let base = if mount.mount_path == "/sys/fs/bpf" {
                    self.bpf_base.join(format!("node{i}"))
                } else {
                    self.dir
                        .join(format!("node{i}"))
                        .join(mount.mount_path.trim_start_matches('/'))
                };
                return format!("{}{rest}", base.display());
            }
        }
        path.to_owned()
    }

    /// The environment the kubelet would give `container` of pod `pod` on node `i`.
    fn environment(&self, container: &Container, i: usize, pod: &str) -> BTreeMap<String, String> {
        let node = self.topo.node(i);
        let mut env = BTreeMap::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => expand(v, &env),
                (None, Some(from)) => {
                    let field = &from.field_ref.as_ref().expect("fieldRef").field_path;
                    match field.as_str() {
                        "spec.nodeName" => format!("node{i}"),
                        "status.hostIP" => node.ip.to_string(),
                        "metadata.namespace" => NAMESPACE.to_owned(),
                        "metadata.name" => pod.to_owned(),
                        other => panic!("downward API field {other} not played here"),
                    }
                }
                (None, None) => String::new(),
            };
            let value = if value.starts_with('/') {
                self.host_path(container, i, &value)
            } else {
                value
            };
            env.insert(var.name.clone(), value);
        }
        env
    }

    fn command(
        &self,
        ns: &Netns,
        container: &Container,
        env: &BTreeMap<String, String>,
    ) -> Command {
        let argv: Vec<String> = container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .map(|a| expand(a, env))
            .collect();
        let mut cmd = ns.command(&binary(&argv[0]).to_string_lossy());
        cmd.args(&argv[1..])
            .env_clear()
            .envs(env)
            .env("RUST_LOG", "info,nodeseal_agent=debug");
        cmd
    }

    /// Starts node `i`'s agent from the DaemonSet as it is now, after stopping the running one
    /// (SIGTERM, as the kubelet does; the DaemonSet's grace period).
    fn roll_agent(&mut self, i: usize) {
        if let Some(mut old) = self.agents[i].take() {
            old.terminate(Duration::from_secs(15));
        }
        let container = self.agent_container();
        let mut env = self.environment(&container, i, &format!("nodeseal-agent-node{i}"));
        // The projected service-account token: a kubeconfig with the token bound to node i's
        // agent pod, which the fixture minted.
        env.insert(
            "NODESEAL_KUBECONFIG".into(),
            self.control.configs().agents[i]
                .to_string_lossy()
                .into_owned(),
        );
        let cmd = self.command(&self.topo.node(i).ns, &container, &env);
        let mut agent = self
            .topo
            .spawn_command(&format!("agent-node{i}"), cmd)
            .expect("agent");
        let health = env["NODESEAL_HEALTH_ADDR"].clone();
        let ns = &self.topo.node(i).ns;
        // The readiness probe, from inside the node (hostNetwork: the node's loopback).
        let ready = wait_until(CONVERGE, || {
            assert!(agent.is_running(), "agent node{i} exited:\n{}", agent.log());
            ns.http_get(&health, "/readyz")
                .is_some_and(|(code, _)| code == 200)
        });
        assert!(
            ready,
            "agent node{i} not ready: {:?}\n{}",
            ns.http_get(&health, "/readyz"),
            agent.log()
        );
        // The liveness probe: like the kubelet's (failureThreshold 6), one slow answer on a
        // loaded machine is not a failure, so it retries for a while.
        let live = wait_until(Duration::from_secs(30), || {
            ns.http_get(&health, "/healthz")
                .is_some_and(|(code, _)| code == 200)
        });
        assert!(live, "agent node{i} not live:\n{}", agent.log());
        self.agents[i] = Some(agent);
    }

    /// Starts keymgr from the Deployment with a fresh token: the chart recreated its
    /// ServiceAccount, so earlier tokens are void.
    fn start_keymgr(&mut self) {
        let deployment: Deployment = self
            .control
            .admin(|client| async move {
                Ok(Api::<Deployment>::namespaced(client, NAMESPACE)
                    .get("nodeseal-keymgr")
                    .await?)
            })
            .expect("keymgr Deployment");
        let container = deployment.spec.template.spec.unwrap().containers[0].clone();
        let token = self
            .control
            .admin(|client| async move {
                let pod = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
                    .get("nodeseal-keymgr-0")
                    .await?;
                let request = TokenRequest {
                    spec: Some(TokenRequestSpec {
                        audiences: Some(vec![API_AUDIENCE.into()]),
                        expiration_seconds: Some(3600),
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: pod.metadata.name,
                            uid: pod.metadata.uid,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let answer = Api::<ServiceAccount>::namespaced(client, NAMESPACE)
                    .create_token_request("nodeseal-keymgr", &PostParams::default(), &request)
                    .await?;
                answer
                    .status
                    .and_then(|s| s.token)
                    .ok_or_else(|| anyhow::anyhow!("TokenRequest without a token"))
            })
            .expect("keymgr token");
        // The fixture's keymgr kubeconfig with the new token in place of the old one.
        let old = std::fs::read_to_string(self.control.configs().keymgr).unwrap();
        let kubeconfig: String = old
            .lines()
            .map(|line| match line.split_once("token:") {
                Some((indent, _)) => format!("{indent}token: {token}\n"),
                None => format!("{line}\n"),
            })
            .collect();
        let path = self.dir.join("keymgr.kubeconfig");
        std::fs::write(&path, kubeconfig).unwrap();
        let mut env = self.environment(&container, 0, "nodeseal-keymgr-0");
        env.insert(
            "NODESEAL_KUBECONFIG".into(),
            path.to_string_lossy().into_owned(),
        );
        let cmd = self.command(self.topo.underlay(), &container, &env);
        self.keymgr = Some(self.topo.spawn_command("keymgr", cmd).expect("keymgr"));
    }

    fn stop_keymgr(&mut self) {
        if let Some(mut keymgr) = self.keymgr.take() {
            keymgr.terminate(Duration::from_secs(10));
        }
    }

    fn status(&self, i: usize) -> Value {
        let container = self.agent_container();
        let socket = self.host_path(&container, i, "/run/nodeseal/agent.sock");
        let out = self
            .topo
            .underlay()
            .command(&binary("nodeseal").to_string_lossy())
            .args(["status", "-o", "json", "--socket", &socket])
            .output()
            .expect("nodeseal status");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn established(&self) -> bool {
        (0..NODES).all(|i| {
            let status = self.status(i);
            let peers = status["peers"].as_array().cloned().unwrap_or_default();
            peers.len() == NODES - 1 && peers.iter().all(|p| p["state"] == "established")
        })
    }

    /// Our XFRM states and policies, and the pins, on node `i` (empty when clean).
    fn kernel_state(&self, i: usize) -> String {
        let ns = &self.topo.node(i).ns;
        let states = ns.ip(&["xfrm", "state"]).unwrap();
        let policies = ns.ip(&["xfrm", "policy"]).unwrap();
        let pins = self.bpf_base.join(format!("node{i}"));
        let mut left = String::new();
        if !states.trim().is_empty() {
            left.push_str(&format!("xfrm states:\n{states}\n"));
        }
        if policies.contains("proto esp") {
            left.push_str(&format!("xfrm policies:\n{policies}\n"));
        }
        if pins.join("nodeseal").exists() || dir_has_entries(&pins) {
            left.push_str(&format!("pins under {}\n", pins.display()));
        }
        left
    }
}

impl Drop for Kubelet<'_> {
    fn drop(&mut self) {
        // Processes first (their Drop kills them), then the bpffs directories they pinned in.
        self.agents.clear();
        self.keymgr = None;
        let _ = std::fs::remove_dir_all(&self.bpf_base);
    }
}

fn dir_has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// `$(VAR)` references expanded as the kubelet does (unknown ones stay as written).
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) if env.contains_key(&after[..end]) => {
                out.push_str(&env[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `GET path` on `addr` from inside `ns`: the status code and body.
#[test]
fn helm_upgrade_turns_encryption_on_and_off_on_kubernetes() {
    if !require("helm", &[Feature::Netns, Feature::Esp, Feature::TcBpf])
        || !binaries_or_skip("helm")
    {
        return;
    }
    let topo = Topology::builder("helm")
        .nodes(NODES)
        .pods_per_node(1)
        .build()
        .expect("topology");
    let control = KubeControlPlane::start(&topo, |i| vec![topo.node(i).pod_cidr.to_string()])
        .expect("control plane");
    let mut kubelet = Kubelet::new(&topo, &control);

    // Encryption off: the agents run and are ready, the kernel has nothing of ours.
    kubelet.upgrade(false);
    for i in 0..NODES {
        kubelet.roll_agent(i);
    }
    for i in 0..NODES {
        assert_eq!(kubelet.status(i)["mode"], "off", "node{i}");
        let left = kubelet.kernel_state(i);
        assert!(left.is_empty(), "node{i} with encryption off:\n{left}");
    }
    let (pod_a, pod_b) = (topo.node(0).pod(0), topo.node(1).pod(0));
    assert!(ping(&pod_a.ns, pod_b.ip, 2).expect("ping").all_answered());

    // On, under a stream, one agent at a time (maxUnavailable 1).
    let stream = UdpStream::start(
        &pod_a.ns,
        &pod_b.ns,
        SocketAddrV4::new(pod_b.ip, 7201),
        RATE,
        Duration::from_secs(600),
    )
    .expect("stream");
    std::thread::sleep(Duration::from_secs(1));
    let switch = Instant::now();
    kubelet.upgrade(true);
    kubelet.start_keymgr();
    for i in [2, 0, 1] {
        kubelet.roll_agent(i);
    }
    assert!(
        wait_until(CONVERGE, || kubelet.established()),
        "not established: {:#?}",
        (0..NODES).map(|i| kubelet.status(i)).collect::<Vec<_>>()
    );
    let converged = switch.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let capture = topo.capture().expect("capture");
    std::thread::sleep(Duration::from_secs(2));
    let report = stream
        .finish(Duration::from_secs(1))
        .expect("stream report");
    let gap = Duration::from_secs_f64(report.lost as f64 / f64::from(RATE));
    eprintln!(
        "helm upgrade encryption false->true: fabric established {converged:?} after the \
         upgrade; stream {report:?}; lost {} datagrams at {RATE}/s = {gap:?} without delivery",
        report.lost
    );
    assert!(report.received > 0 && report.duplicated == 0, "{report:?}");
    assert!(
        gap < converged + Duration::from_secs(5),
        "{gap:?} {report:?}"
    );
    assert!(ping(&pod_a.ns, pod_b.ip, 3).expect("ping").all_answered());
    let summary = capture.summary();
    assert!(summary.esp > 0, "{summary:?}");
    capture
        .check_no_plaintext(&topo.pod_cidrs())
        .expect("only ESP between pods");

    // Off again: every SA, policy and pin goes as each agent restarts.
    kubelet.upgrade(false);
    kubelet.stop_keymgr();
    for i in 0..NODES {
        kubelet.roll_agent(i);
    }
    for i in 0..NODES {
        let left = kubelet.kernel_state(i);
        assert!(left.is_empty(), "node{i} after encryption off:\n{left}");
    }
    assert!(ping(&pod_a.ns, pod_b.ip, 2).expect("ping").all_answered());

    // On again, with strict mode off during the rollout (plaintext between a node that has
    // switched and one that has not, until their SAs exist): the gap should all but vanish.
    let stream = UdpStream::start(
        &pod_a.ns,
        &pod_b.ns,
        SocketAddrV4::new(pod_b.ip, 7202),
        RATE,
        Duration::from_secs(600),
    )
    .expect("stream");
    std::thread::sleep(Duration::from_secs(1));
    let switch = Instant::now();
    kubelet.upgrade_with(true, false);
    kubelet.start_keymgr();
    for i in [2, 0, 1] {
        kubelet.roll_agent(i);
    }
    assert!(wait_until(CONVERGE, || kubelet.established()));
    let converged = switch.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let relaxed = stream
        .finish(Duration::from_secs(1))
        .expect("stream report");
    let relaxed_gap = Duration::from_secs_f64(relaxed.lost as f64 / f64::from(RATE));
    eprintln!(
        "helm upgrade encryption false->true with strictMode.enabled=false: fabric established \
         {converged:?} after the upgrade; stream {relaxed:?}; lost {} datagrams = {relaxed_gap:?}",
        relaxed.lost
    );
    assert!(
        relaxed.lost < report.lost,
        "strict mode off should shorten the switch's gap: {relaxed:?} vs {report:?}"
    );

    // Then uninstall: the agents, stopped after it, remove everything.
    for i in 0..NODES {
        assert!(
            !kubelet.kernel_state(i).is_empty(),
            "node{i} has SAs before uninstall"
        );
    }
    kubelet.helm(&["uninstall", RELEASE, "--namespace", NAMESPACE]);
    kubelet.stop_keymgr();
    for (i, agent) in kubelet.agents.iter_mut().enumerate() {
        let mut agent = agent.take().unwrap();
        let status = agent.terminate(Duration::from_secs(15));
        assert!(
            status.is_some_and(|s| s.success()),
            "agent node{i} after uninstall: {status:?}\n{}",
            agent.log()
        );
        assert!(
            agent.log().contains("SAs and datapath removed"),
            "{}",
            agent.log()
        );
    }
    for i in 0..NODES {
        let left = kubelet.kernel_state(i);
        assert!(left.is_empty(), "node{i} after helm uninstall:\n{left}");
    }
}
