//! Identity policy on the encrypted fabric: the Star Wars demo of Cilium's getting-started
//! guide, with real agents, endpoint records, a CiliumNetworkPolicy applied with `nodeseal
//! policy apply`, and the wire captured throughout.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "scenario helpers panic with context, like the tests"
)]

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use nodeseal_netns::forge;
use nodeseal_netns::kube::{KubeControlPlane, put_workload};
use nodeseal_netns::{
    Fabric, FabricOptions, Feature, StoreKind, TcpService, Topology, UdpStream, require,
    tcp_banner, wait_until,
};
use serde_json::Value;

/// Under qemu TCG on a loaded 2-core host, a 3-node fabric has been seen to take just over 60 s.
const CONVERGE: Duration = Duration::from_secs(120);
/// How long a change in the store may take to reach every node's datapath.
const PROPAGATE: Duration = Duration::from_secs(30);
/// A connection attempt that policy drops times out after this.
const CONNECT: Duration = Duration::from_secs(3);

const RULE1: &str = include_str!("../../../policy/examples/star-wars-rule1.yaml");

/// Node index of each ship, its name and labels.
const SHIPS: [(usize, &str, &str); 3] = [
    (0, "deathstar", "org=empire,class=deathstar"),
    (1, "tiefighter", "org=empire,class=tiefighter"),
    (2, "xwing", "org=alliance,class=xwing"),
];

/// Which store carries the scenario, and so where endpoints and policies come from: records
/// written with the CLI, or Pod and policy objects in a real kube-apiserver.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Dir,
    Kube,
}

/// A fabric of `nodes` nodes with one pod each, agents on all, established.
struct Cluster {
    fabric: Fabric,
    control: Option<KubeControlPlane>,
    topo: Topology,
    backend: Backend,
}

impl Cluster {
    fn start(name: &str, nodes: usize, backend: Backend) -> Option<Self> {
        if !require(name, &[Feature::Netns, Feature::Esp, Feature::TcBpf]) {
            return None;
        }
        if backend == Backend::Kube && !nodeseal_kube_fixture::binaries_or_skip(name) {
            return None;
        }
        let topo = Topology::builder(name)
            .nodes(nodes)
            .pods_per_node(1)
            .build()
            .expect("topology");
        let mut options = FabricOptions::default();
        let control = (backend == Backend::Kube).then(|| {
            let control =
                KubeControlPlane::start(&topo, |i| vec![topo.node(i).pod_cidr.to_string()])
                    .expect("control plane");
            options.store = StoreKind::Kube(control.configs());
            control
        });
        let fabric = Fabric::start(&topo, nodes, options).expect("fabric");
        let all: Vec<usize> = (0..nodes).collect();
        fabric
            .wait_established(&all, CONVERGE)
            .expect("established");
        Some(Self {
            fabric,
            control,
            topo,
            backend,
        })
    }

    fn put_workload(&self, node: usize, name: &str, labels: &str) {
        put_workload(
            &self.fabric,
            self.control.as_ref(),
            &self.topo,
            node,
            name,
            labels,
        )
        .expect("workload");
    }

    /// Waits until every node programmed its ship (without enforcement) and knows the three
    /// ships' identities.
    fn wait_ships_programmed(&self) {
        let fabric = &self.fabric;
        assert!(
            wait_until(PROPAGATE, || SHIPS
                .iter()
                .all(|(node, ship, _)| programmed(fabric, *node, ship, false))
                && identities_known(fabric, 3, 3)),
            "endpoints not programmed: {}",
            fabric.status_text(0).unwrap_or_default()
        );
    }

    fn apply(&self, file: &str, document: &str) {
        let path = self.fabric.dir().join(file);
        std::fs::write(&path, document).expect("writing the policy");
        self.fabric
            .nodeseal_store(&["policy", "apply", "-f", &path.to_string_lossy()])
            .expect("policy apply");
    }

    /// Deletes the CiliumNetworkPolicy `name` of namespace `default` (in Kubernetes mode stored
    /// as the NodesealNetworkPolicy of that name).
    fn delete_policy(&self, name: &str) {
        let stored = match self.backend {
            Backend::Dir => name.to_owned(),
            Backend::Kube => format!("nnp.default.{name}"),
        };
        self.fabric
            .nodeseal_store(&["policy", "delete", &stored])
            .expect("policy delete");
    }
}

fn policy_view(fabric: &Fabric, node: usize) -> Value {
    fabric
        .status(node)
        .map(|s| s["policy"].clone())
        .unwrap_or(Value::Null)
}

/// Node `node`'s endpoint `name` is ready with the given ingress enforcement.
fn programmed(fabric: &Fabric, node: usize, name: &str, ingress: bool) -> bool {
    let view = policy_view(fabric, node);
    view["endpoints"].as_array().is_some_and(|rows| {
        rows.iter().any(|e| {
            e["name"] == format!("default/{name}")
                && e["state"] == "ready"
                && e["ingress"] == ingress
        })
    })
}

fn identities_known(fabric: &Fabric, nodes: usize, count: u64) -> bool {
    (0..nodes).all(|i| {
        policy_view(fabric, i)["identities"]
            .as_u64()
            .is_some_and(|n| n >= count)
    })
}

fn policy_drops(fabric: &Fabric, node: usize) -> u64 {
    fabric
        .status(node)
        .ok()
        .and_then(|s| s["datapath_drops"]["policy_denied"].as_u64())
        .unwrap_or(0)
}

#[test]
fn star_wars_rule1_lets_only_the_empire_land_on_the_deathstar() {
    star_wars("starwars", Backend::Dir);
}

#[test]
fn star_wars_rule1_holds_for_pods_on_kubernetes() {
    star_wars("starwarsk8s", Backend::Kube);
}

/// The flows `nodeseal observe` on node `node` reports as dropped.
fn dropped_flows(fabric: &Fabric, node: usize) -> Vec<Value> {
    let socket = fabric.socket(node);
    let out = fabric
        .nodeseal(&[
            "observe",
            "--socket",
            &socket.to_string_lossy(),
            "--verdict",
            "dropped",
            "--last",
            "200",
            "-o",
            "json",
        ])
        .expect("nodeseal observe");
    out.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|v| v.get("flow").cloned().unwrap_or(v))
        .collect()
}

fn star_wars(name: &str, backend: Backend) {
    let Some(cluster) = Cluster::start(name, 3, backend) else {
        return;
    };
    let (topo, fabric) = (&cluster.topo, &cluster.fabric);
    let capture = topo.capture().expect("capture");
    for (node, ship, labels) in SHIPS {
        cluster.put_workload(node, ship, labels);
    }
    let deathstar = topo.node(0).pod(0);
    let _service = TcpService::start(&deathstar.ns, 80, "Ship landed\n").expect("service");
    let landing = SocketAddrV4::new(deathstar.ip, 80);
    let tiefighter = &topo.node(1).pod(0).ns;
    let xwing = topo.node(2).pod(0);

    // Without policy every ship lands.
    cluster.wait_ships_programmed();
    for (from, ship) in [(tiefighter, "tiefighter"), (&xwing.ns, "xwing")] {
        assert_eq!(
            tcp_banner(from, landing, CONNECT).as_deref(),
            Some("Ship landed\n"),
            "{ship} without policy"
        );
    }

    // rule1: ingress to the deathstar only from org=empire, on 80/TCP.
    cluster.apply("rule1.yaml", RULE1);
    assert!(
        wait_until(PROPAGATE, || programmed(fabric, 0, "deathstar", true)),
        "deathstar does not enforce ingress: {}",
        fabric.status_text(0).unwrap_or_default()
    );
    let drops_before = policy_drops(fabric, 0);
    assert_eq!(
        tcp_banner(tiefighter, landing, CONNECT).as_deref(),
        Some("Ship landed\n"),
        "the tiefighter must land"
    );
    assert_eq!(
        tcp_banner(&xwing.ns, landing, CONNECT),
        None,
        "the xwing must not land"
    );
    assert!(
        policy_drops(fabric, 0) > drops_before,
        "no policy drop counted on node0: {}",
        fabric.status_text(0).unwrap_or_default()
    );
    // `nodeseal observe` on the deathstar's node names the flow, its identities and why.
    let flows = dropped_flows(fabric, 0);
    let xwing_ip = xwing.ip.to_string();
    let denied = flows
        .iter()
        .find(|f| {
            f["drop_reason"] == "policy_denied"
                && f["source"]["ip"] == xwing_ip.as_str()
                && f["destination"]["port"] == 80
        })
        .unwrap_or_else(|| panic!("no policy_denied flow from the xwing in {flows:#?}"));
    assert_eq!(denied["verdict"], "DROPPED", "{denied}");
    assert_eq!(denied["program"], "to-pod", "{denied}");
    let labels = |side: &str| {
        denied[side]["labels"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(labels("source").contains("org=alliance"), "{denied}");
    assert!(
        labels("destination").contains("class=deathstar"),
        "{denied}"
    );
    let endpoints = policy_view(fabric, 2)["endpoints"].clone();
    let xwing_identity = endpoints.as_array().and_then(|rows| {
        rows.iter()
            .find(|e| e["name"] == "default/xwing")
            .map(|e| e["identity"].clone())
    });
    assert_eq!(
        Some(denied["source"]["identity"].clone()),
        xwing_identity,
        "the flow's source identity is the one the xwing's node gave it: {denied}\n{endpoints}"
    );
    // Another port of the deathstar is closed to the empire too (only 80/TCP is allowed).
    assert_eq!(
        tcp_banner(tiefighter, SocketAddrV4::new(deathstar.ip, 8080), CONNECT),
        None,
        "port 8080 must be dropped, not refused"
    );

    // A label change is an identity change: the xwing defects to the empire and lands.
    // How long a label change takes to change the verdict is reported (bounded by PROPAGATE).
    let relabelled = Instant::now();
    cluster.put_workload(2, "xwing", "org=empire,class=xwing");
    assert!(
        wait_until(PROPAGATE, || tcp_banner(&xwing.ns, landing, CONNECT)
            .is_some()),
        "the relabelled xwing never landed: {}",
        fabric.status_text(0).unwrap_or_default()
    );
    eprintln!(
        "{name}: label change to allowed in {:?}",
        relabelled.elapsed()
    );
    // And back: the alliance's identity is denied again.
    let relabelled = Instant::now();
    cluster.put_workload(2, "xwing", "org=alliance,class=xwing");
    assert!(
        wait_until(PROPAGATE, || tcp_banner(&xwing.ns, landing, CONNECT)
            .is_none()),
        "the xwing of the alliance landed again"
    );
    eprintln!(
        "{name}: label change to denied in {:?}, including the {CONNECT:?} of the probe that timed out",
        relabelled.elapsed()
    );

    // Policy deleted: enforcement is lifted and every ship lands again.
    cluster.delete_policy("rule1");
    assert!(
        wait_until(PROPAGATE, || programmed(fabric, 0, "deathstar", false)),
        "deathstar still enforces ingress: {}",
        fabric.status_text(0).unwrap_or_default()
    );
    assert_eq!(
        tcp_banner(&xwing.ns, landing, CONNECT).as_deref(),
        Some("Ship landed\n"),
        "the xwing without policy"
    );

    // Identity policy changes nothing on the wire: pod traffic crossed it only as ESP.
    capture
        .check_no_plaintext(&topo.pod_cidrs())
        .unwrap_or_else(|leak| panic!("{leak}"));
    assert!(capture.summary().esp > 0, "{}", capture.summary());
}

/// What the deathstar's node says the policy in force is: the documents' names.
fn policies_in_force(fabric: &Fabric, node: usize) -> Vec<String> {
    policy_view(fabric, node)["policies"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

const LANDING_BY_LABEL: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: landing
spec:
  endpointSelector:
    matchLabels: {class: deathstar}
  ingress:
  - fromEndpoints:
    - matchLabels: {org: empire}
    toPorts:
    - ports: [{port: \"7001\", protocol: UDP}]
";

/// The same flow allowed another way: any cluster member, a port range.
const LANDING_BY_ENTITY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: landing
spec:
  endpointSelector:
    matchLabels: {class: deathstar}
  ingress:
  - fromEntities: [cluster]
    toPorts:
    - ports: [{port: \"7000\", endPort: 7010, protocol: UDP}]
";

/// Denies what the stream is not: the alliance.
const NO_REBELS: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: no-rebels
spec:
  endpointSelector:
    matchLabels: {class: deathstar}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {org: alliance}
";

/// An allowed flow is never dropped while the policy that allows it is replaced by another
/// that still allows it, while another policy is added, or while either end changes labels
/// (a new identity) that the policy still allows.
#[test]
fn an_allowed_stream_survives_policy_and_label_changes() {
    let Some(cluster) = Cluster::start("polstream", 2, Backend::Dir) else {
        return;
    };
    let (topo, fabric) = (&cluster.topo, &cluster.fabric);
    cluster.put_workload(0, "deathstar", "org=empire,class=deathstar");
    cluster.put_workload(1, "tiefighter", "org=empire,class=tiefighter");
    cluster.apply("landing.yaml", LANDING_BY_LABEL);
    assert!(
        wait_until(PROPAGATE, || programmed(fabric, 0, "deathstar", true)
            && programmed(fabric, 1, "tiefighter", false)
            && identities_known(fabric, 2, 2)),
        "not programmed: {}",
        fabric.status_text(0).unwrap_or_default()
    );
    let (deathstar, tiefighter) = (topo.node(0).pod(0), topo.node(1).pod(0));
    let stream = UdpStream::start(
        &tiefighter.ns,
        &deathstar.ns,
        SocketAddrV4::new(deathstar.ip, 7001),
        500,
        Duration::from_secs(120),
    )
    .expect("stream");
    let settle = || std::thread::sleep(Duration::from_secs(2));
    settle();

    cluster.apply("landing.yaml", LANDING_BY_ENTITY);
    cluster.apply("no-rebels.yaml", NO_REBELS);
    assert!(
        wait_until(PROPAGATE, || policies_in_force(fabric, 0).len() == 2),
        "{}",
        fabric.status_text(0).unwrap_or_default()
    );
    settle();
    // New identities at both ends, still allowed.
    cluster.put_workload(
        1,
        "tiefighter",
        "org=empire,class=tiefighter,squadron=black",
    );
    cluster.put_workload(0, "deathstar", "org=empire,class=deathstar,shield=up");
    assert!(
        wait_until(PROPAGATE, || identities_known(fabric, 2, 4)
            && programmed(fabric, 0, "deathstar", true)),
        "{}",
        fabric.status_text(0).unwrap_or_default()
    );
    settle();
    let report = stream.finish(Duration::from_millis(500)).expect("report");
    eprintln!("stream across the changes: {report:?}");
    // The stream's own drops, as `nodeseal observe` saw them (other packets, such as the
    // host's IPv6 neighbour discovery toward the pod, may meet the deathstar's policy too).
    let flows = dropped_flows(fabric, 0);
    let tiefighter_ip = tiefighter.ip.to_string();
    let stream_drops = flows
        .iter()
        .filter(|f| f["source"]["ip"] == tiefighter_ip.as_str() && f["destination"]["port"] == 7001)
        .count();
    assert!(report.sent >= 2500, "{report:?}");
    assert_eq!(
        (report.lost, stream_drops),
        (0, 0),
        "{report:?}\n{}\ndropped flows: {flows:#?}",
        fabric.status_text(0).unwrap_or_default()
    );
    eprintln!("other drops at the deathstar: {flows:?}");
}

/// An authenticated peer that encrypts a packet whose inner source lies in another node's pod
/// CIDR (here: node1 sending as a pod of node2, to pass a policy that admits node2's pods)
/// gets nothing through: node0's kernel drops it after decryption (the SA's inner-source
/// binding), and counts it. The same injection with a source of node1's own CIDR arrives,
/// which shows the forged one was sent and decrypted.
#[test]
fn an_authenticated_peer_cannot_send_as_another_nodes_pods() {
    let Some(cluster) = Cluster::start("forgedsrc", 3, Backend::Dir) else {
        return;
    };
    let (topo, fabric) = (&cluster.topo, &cluster.fabric);
    let (node0, node1) = (topo.node(0), topo.node(1));
    let deathstar = node0.pod(0);
    let receiver = std::sync::Arc::new(deathstar.ns.run(|| {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 7300)).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        socket
    }));
    let mark = forge::out_state_mark(&node1.ns, node1.ip.into(), node0.ip.into())
        .expect("node1's OUT state toward node0 and its mark");
    let own = Ipv4Addr::new(10, 244, 1, 77);
    let forged = Ipv4Addr::new(10, 244, 2, 77);
    for addr in [own, forged] {
        node1
            .ns
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])
            .expect("address");
    }
    let received_from = |from: Ipv4Addr| {
        let receiver = std::sync::Arc::clone(&receiver);
        // Bounded: 20 reads of at most 500 ms.
        (0..20).any(|_| {
            let mut buf = [0u8; 64];
            matches!(receiver.recv_from(&mut buf), Ok((_, peer)) if peer.ip() == std::net::IpAddr::V4(from))
        })
    };
    let errors_before = xfrm_error_total(&node0.ns);
    let target = SocketAddrV4::new(deathstar.ip, 7300);
    forge::send_marked(&node1.ns, forged.into(), target.into(), mark).expect("send");
    assert!(
        !received_from(forged),
        "a forged inner source reached the pod"
    );
    let errors_after = xfrm_error_total(&node0.ns);
    assert!(
        errors_after > errors_before,
        "node0's kernel did not count the forged packet: {errors_before} -> {errors_after}\n{}",
        fabric.status_text(0).unwrap_or_default()
    );
    // The status names the counter (as `nodeseal status` shows it to an operator).
    let status = fabric.status(0).expect("status");
    eprintln!(
        "node0 xfrm errors after the forged packet: {}",
        status["xfrm_errors"]
    );
    assert!(
        status["xfrm_errors"].as_object().is_some_and(|m| m
            .keys()
            .any(|k| k.starts_with("XfrmIn") || k.starts_with("XfrmFwd"))),
        "{status}"
    );
    forge::send_marked(&node1.ns, own.into(), target.into(), mark).expect("send");
    assert!(
        received_from(own),
        "the control datagram from node1's own CIDR did not arrive"
    );
}

/// The sum of the non-zero error counters of `/proc/net/xfrm_stat` in `ns`.
fn xfrm_error_total(ns: &nodeseal_netns::Netns) -> u64 {
    let text = ns.exec("cat", &["/proc/net/xfrm_stat"]).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

const ALLOW_CLUSTER: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-cluster
spec:
  endpointSelector:
    matchLabels: {class: deathstar}
  ingress:
  - fromEntities: [cluster]
    toPorts:
    - ports: [{port: \"80\", protocol: TCP}]
";

const DENY_ALLIANCE: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: deny-alliance
spec:
  endpointSelector:
    matchLabels: {class: deathstar}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {org: alliance}
";

/// rule1 as a Kubernetes NetworkPolicy.
const RULE1_NETWORK_POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: rule1-k8s
  namespace: default
spec:
  podSelector:
    matchLabels: {class: deathstar}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {org: empire}
    ports:
    - {protocol: TCP, port: 80}
";

/// A client outside the cluster, on the underlay: allowed by CIDR, then left out by an except.
fn from_cidr(cidr: &str, except: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: from-outside
spec:
  endpointSelector:
    matchLabels: {{class: deathstar}}
  ingress:
  - fromCIDRSet:
    - cidr: {cidr}
      except: [{except}]
    toPorts:
    - ports: [{{port: \"80\", protocol: TCP}}]
"
    )
}

/// Whether node0 has exactly one policy document in force, stored as `name`.
fn only_in_force(fabric: &Fabric, name: &str) -> bool {
    let names = policies_in_force(fabric, 0);
    names.len() == 1 && names[0].ends_with(&format!("/{name}"))
}

/// Verdicts on the wire of the rule kinds besides rule1's: a deny over a broader allow, a
/// NetworkPolicy with rule1's meaning, and CIDR rules (with an except) for a client outside
/// the cluster.
#[test]
fn deny_networkpolicy_and_cidr_rules_decide_on_the_wire() {
    let Some(cluster) = Cluster::start("polkinds", 3, Backend::Dir) else {
        return;
    };
    let (topo, fabric) = (&cluster.topo, &cluster.fabric);
    for (node, ship, labels) in SHIPS {
        cluster.put_workload(node, ship, labels);
    }
    let deathstar = topo.node(0).pod(0);
    let _service = TcpService::start(&deathstar.ns, 80, "Ship landed\n").expect("service");
    let landing = SocketAddrV4::new(deathstar.ip, 80);
    let (tiefighter, xwing) = (&topo.node(1).pod(0).ns, &topo.node(2).pod(0).ns);
    // The client outside the cluster: an address of the underlay, routed to node0's pods.
    let outside = topo.underlay();
    outside
        .ip(&["addr", "add", "10.0.0.200/24", "dev", "br0"])
        .expect("outside address");
    outside
        .ip(&[
            "route",
            "add",
            "10.244.0.0/24",
            "via",
            &topo.node(0).ip.to_string(),
        ])
        .expect("route to node0's pods");
    cluster.wait_ships_programmed();
    assert!(
        tcp_banner(outside, landing, CONNECT).is_some(),
        "the outside client without policy"
    );
    let lands = |from: &nodeseal_netns::Netns| tcp_banner(from, landing, CONNECT).is_some();
    let wait_for = |what: &str, f: &dyn Fn() -> bool| {
        assert!(
            wait_until(PROPAGATE, f),
            "{what}: {}",
            fabric.status_text(0).unwrap_or_default()
        );
    };

    // A deny wins over a broader allow: the cluster may land, the alliance may not.
    cluster.apply("allow-cluster.yaml", ALLOW_CLUSTER);
    cluster.apply("deny-alliance.yaml", DENY_ALLIANCE);
    wait_for("both policies in force", &|| {
        policies_in_force(fabric, 0).len() == 2 && programmed(fabric, 0, "deathstar", true)
    });
    assert!(
        lands(tiefighter),
        "the cluster entity admits the tiefighter"
    );
    wait_for("the deny must win for the xwing", &|| !lands(xwing));
    assert!(!lands(outside), "the world is not in the cluster entity");

    // rule1 as a NetworkPolicy: the same verdicts as the CiliumNetworkPolicy.
    cluster.delete_policy("allow-cluster");
    cluster.delete_policy("deny-alliance");
    cluster.apply("rule1-k8s.yaml", RULE1_NETWORK_POLICY);
    wait_for("only the NetworkPolicy in force", &|| {
        only_in_force(fabric, "rule1-k8s") && programmed(fabric, 0, "deathstar", true)
    });
    assert!(lands(tiefighter), "NetworkPolicy: the empire lands");
    assert!(!lands(xwing), "NetworkPolicy: the alliance does not");
    assert!(!lands(outside), "NetworkPolicy: the world does not");

    // CIDR rules: the outside client's /24 is admitted, until an except leaves its /32 out.
    cluster.delete_policy("rule1-k8s");
    cluster.apply(
        "from-outside.yaml",
        &from_cidr("10.0.0.0/24", "10.0.0.201/32"),
    );
    wait_for("the outside client admitted by CIDR", &|| {
        only_in_force(fabric, "from-outside")
            && programmed(fabric, 0, "deathstar", true)
            && lands(outside)
    });
    assert!(
        !lands(xwing),
        "a CIDR rule does not select the cluster's pods"
    );
    cluster.apply(
        "from-outside.yaml",
        &from_cidr("10.0.0.0/24", "10.0.0.200/32"),
    );
    wait_for("the except leaves the outside client out", &|| {
        !lands(outside)
    });
}
