//! `cargo xtask demo`: a 3-node nodeseal fabric with 2 pods per node in network namespaces.
//!
//! It starts keymgr and one real agent per node on a shared directory store, shows every node's
//! `nodeseal status`, a sample of the underlay wire (ESP only), a `nodeseal keys rotate --wait`
//! under a UDP stream, the Star Wars identity policy of Cilium's getting-started guide (with
//! `nodeseal observe` naming the denied flow), and a rogue node with a certificate from another
//! CA being refused.
//!
//! With `--kubernetes` the store is a real kube-apiserver on the underlay (Node objects,
//! NodesealNodes, CertificateSigningRequests signed by keymgr, the shipped RBAC and admission
//! policies), and the last act is an agent that claims another node's name with its own
//! node's credentials, refused by the admission policy.
//!
//! With `--encryption-type wireguard` the agents encrypt with kernel WireGuard instead of IPsec:
//! the same acts, WireGuard instead of ESP on the wire, and `wg show` of node0 beside its
//! `nodeseal status`.
//!
//! With `--dual-stack` every pod has an IPv6 address too, every node an IPv6 pod CIDR, and the
//! pods ping each other at both addresses through the one tunnel per pair of nodes.

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nodeseal_netns::kube::{KubeControlPlane, put_workload};
use nodeseal_netns::{
    AddressPlan, Encryption, Fabric, FabricOptions, Feature, PacketClass, StoreKind, TcpService,
    Topology, UdpStream, ping, require, tcp_banner,
};

const RULE1: &str = include_str!("../../../../policy/examples/star-wars-rule1.yaml");

/// What the demo runs with (its arguments).
struct Args {
    kubernetes: bool,
    encryption: Encryption,
    addresses: AddressPlan,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut args = Self {
            kubernetes: false,
            encryption: Encryption::Ipsec,
            addresses: AddressPlan::Ipv4,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mode = match arg.as_str() {
                "--kubernetes" => {
                    args.kubernetes = true;
                    continue;
                }
                "--dual-stack" => {
                    args.addresses = AddressPlan::DualStack {
                        ipv6_underlay: false,
                    };
                    continue;
                }
                "--encryption-type" => it.next().unwrap_or_default(),
                other => match other.strip_prefix("--encryption-type=") {
                    Some(mode) => mode.to_owned(),
                    None => bail!(
                        "unknown argument {other:?} (expected --kubernetes, --dual-stack, --encryption-type ipsec|wireguard)"
                    ),
                },
            };
            args.encryption = match mode.as_str() {
                "ipsec" => Encryption::Ipsec,
                "wireguard" => Encryption::Wireguard,
                _ => bail!("--encryption-type must be ipsec or wireguard, not {mode:?}"),
            };
        }
        Ok(args)
    }

    /// What crosses the underlay: the encryption's protocol.
    fn wire(&self) -> &'static str {
        match self.encryption {
            Encryption::Ipsec => "ESP",
            Encryption::Wireguard => "WireGuard",
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse()?;
    let kubernetes = args.kubernetes;
    let wireguard = args.encryption == Encryption::Wireguard;
    let kernel = [Feature::Netns, args.encryption.feature(), Feature::TcBpf];
    if !require("demo", &kernel) {
        bail!("this kernel cannot run the demo (see above); `cargo xtask demo` boots one that can");
    }
    banner("building 3 nodes x 2 pods (plus a spare node for a rogue) in network namespaces");
    let mut builder = Topology::builder("demo").nodes(4).pods_per_node(2);
    if args.addresses.needs_ipv6() {
        builder = builder.dual_stack();
    }
    let topo = builder.build()?;
    for node in &topo.nodes()[..3] {
        let (ip, cidrs) = args.addresses.of(node);
        let pods: Vec<String> = node
            .pods
            .iter()
            .flat_map(|p| args.addresses.pod_addresses(p))
            .map(|a| a.to_string())
            .collect();
        let cidrs: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
        println!(
            "  node{}  {ip}  pods {} ({})",
            node.index,
            cidrs.join(" "),
            pods.join(", ")
        );
    }

    // Every node, the rogue's included, runs the chosen datapath.
    let mut options = FabricOptions {
        encryption: args.encryption,
        addresses: args.addresses,
        ..FabricOptions::default()
    };
    let control = if kubernetes {
        banner("starting etcd and kube-apiserver on the underlay; Node objects, agent pods, RBAC");
        let pod_cidrs = |i| {
            let (_, cidrs) = args.addresses.of(topo.node(i));
            cidrs.iter().map(ToString::to_string).collect()
        };
        let control = KubeControlPlane::start(&topo, pod_cidrs)?;
        options.store = StoreKind::Kube(control.configs());
        print!(
            "{}",
            control.kubectl(&topo, &["get", "nodes", "-o", "wide"])?
        );
        Some(control)
    } else {
        None
    };
    banner(&format!(
        "starting keymgr and three nodeseal agents ({}, {})",
        if kubernetes {
            "Kubernetes mode"
        } else {
            "embedded directory store"
        },
        if wireguard { "WireGuard" } else { "IPsec" }
    ));
    let fabric = Fabric::start(&topo, 3, options)?;
    fabric.wait_established(&[0, 1, 2], Duration::from_secs(90))?;
    for i in 0..3 {
        println!("\n$ nodeseal status    # on node{i}");
        print!("{}", fabric.status_text(i)?);
    }

    banner("pod-to-pod traffic across nodes; what the underlay wire carries");
    let capture = topo.capture()?;
    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                let from = &topo.node(a).pod(0);
                let sources = args.addresses.pod_addresses(from);
                for to in args.addresses.pod_addresses(topo.node(b).pod(1)) {
                    let source = sources
                        .iter()
                        .find(|s| s.is_ipv4() == to.is_ipv4())
                        .map_or_else(|| from.ip.to_string(), ToString::to_string);
                    let r = ping(&from.ns, to, 2)?;
                    println!(
                        "  ping {source} -> {to}: {}/{} replies",
                        r.received, r.transmitted
                    );
                    ensure!(r.all_answered(), "ping {source} -> {to} failed");
                }
            }
        }
    }
    let packets = capture.packets();
    println!(
        "\n  sample of the wire ({} frames captured):",
        packets.len()
    );
    for p in packets
        .iter()
        .filter(|p| !matches!(p.class, PacketClass::Arp))
        .take(12)
    {
        println!("    {}", p.class);
    }
    println!("\n  summary: {}", capture.summary());
    capture
        .check_no_plaintext(&topo.pod_cidrs())
        .map_err(|leak| anyhow::anyhow!("{leak}"))?;
    println!("  no plaintext packet carrying a pod address crossed the wire");
    if wireguard {
        let summary = capture.summary();
        ensure!(
            summary.wireguard > 0 && summary.esp == 0,
            "expected WireGuard and no ESP on the wire: {summary}"
        );
        println!("\n$ nodeseal status    # on node0, after the pings");
        print!("{}", fabric.status_text(0)?);
        println!("\n$ wg show nodeseal0    # on node0 (private and preshared keys hidden)");
        print!(
            "{}",
            topo.node(0)
                .ns
                .exec("wg", &["show", "nodeseal0"])
                .context("wg show")?
        );
    }

    banner("nodeseal keys rotate --wait, under a 500 packets/s UDP stream");
    let (a, b) = (topo.node(0).pod(0), topo.node(1).pod(0));
    let stream = UdpStream::start(
        &a.ns,
        &b.ns,
        SocketAddrV4::new(b.ip, 7100),
        500,
        Duration::from_secs(60),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    println!("$ nodeseal keys rotate --wait");
    print!("{}", fabric.nodeseal_store(&["keys", "rotate", "--wait"])?);
    std::thread::sleep(Duration::from_secs(3));
    let report = stream.finish(Duration::from_millis(500))?;
    println!(
        "  stream {} -> {}: sent {}, received {}, lost {}, duplicated {}, reordered {}",
        a.ip, b.ip, report.sent, report.received, report.lost, report.duplicated, report.reordered
    );
    println!("\n$ nodeseal status    # on node0, after the rotation");
    print!("{}", fabric.status_text(0)?);

    star_wars(&topo, &fabric, control.as_ref())?;

    if let Some(control) = &control {
        return kubernetes_finale(&topo, &fabric, control, args.wire());
    }

    banner("a rogue node with a certificate from another CA joins the store");
    let _rogue = fabric.spawn_rogue(&topo, 3, "rogue")?;
    let refused = nodeseal_netns::wait_until(Duration::from_secs(60), || {
        fabric.peer_row(0, "rogue").is_some_and(|row| {
            row["state"] != "established"
                && row["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("certificate"))
        })
    });
    println!("$ nodeseal status    # on node0");
    print!("{}", fabric.status_text(0)?);
    ensure!(refused, "node0 did not refuse the rogue");
    let attempt = ping(&topo.node(3).pod(0).ns, topo.node(0).pod(0).ip, 3)?;
    println!(
        "  ping from the rogue's pod {} -> {}: {}/{} replies",
        topo.node(3).pod(0).ip,
        topo.node(0).pod(0).ip,
        attempt.received,
        attempt.transmitted
    );
    ensure!(attempt.received == 0, "the rogue reached a pod");
    println!("\n$ nodeseal node list");
    print!(
        "{}",
        fabric
            .nodeseal_store(&["node", "list"])
            .context("node list")?
    );
    banner(&format!(
        "demo complete: {} only on the wire, hitless rotation, identity policy, rogue refused",
        args.wire()
    ));
    Ok(())
}

/// Kubernetes mode's last act: the certificates keymgr issued through the CSR API, then an
/// agent on node3 that claims to be node0 with node3's own pod token.
fn kubernetes_finale(
    topo: &Topology,
    fabric: &Fabric,
    control: &KubeControlPlane,
    wire: &str,
) -> Result<()> {
    println!("\n$ kubectl get csr    # node certificates, approved and signed by keymgr");
    print!("{}", control.kubectl(topo, &["get", "csr"])?);
    println!("\n$ kubectl get nodesealnodes");
    print!("{}", control.kubectl(topo, &["get", "nodesealnodes"])?);

    banner("an agent on node3 claims to be node0, with node3's own pod token");
    // Another handshake port, so that its record differs from node0's and must be written.
    let impostor = fabric.spawn_impostor(topo, 3, "node0", &["--handshake-port", "4251"])?;
    let refused = nodeseal_netns::wait_until(Duration::from_secs(60), || {
        impostor
            .log()
            .contains("is bound to node node3 but tried to")
    });
    let line = impostor
        .log()
        .lines()
        .find(|l| l.contains("is bound to node node3"))
        .and_then(|l| l.find("nodeseal-agent token").map(|at| l[at..].to_owned()))
        .unwrap_or_default();
    println!("  impostor's log: {line}");
    ensure!(refused, "the admission policy did not refuse the impostor");
    let attempt = ping(&topo.node(3).pod(0).ns, topo.node(0).pod(0).ip, 3)?;
    println!(
        "  ping from node3's pod {} -> {}: {}/{} replies",
        topo.node(3).pod(0).ip,
        topo.node(0).pod(0).ip,
        attempt.received,
        attempt.transmitted
    );
    ensure!(attempt.received == 0, "node3's pod reached a pod");
    println!(
        "\n$ nodeseal status    # on node0: node3 runs no agent, so it has no keys and its pods' plaintext is dropped"
    );
    print!("{}", fabric.status_text(0)?);
    banner(&format!(
        "demo complete (Kubernetes mode): {wire} only, hitless rotation, identity policy, impostor refused"
    ));
    Ok(())
}

/// The policy of Cilium's Star Wars demo on the encrypted fabric: only the empire lands on the
/// deathstar, and `nodeseal observe` names the xwing that did not.
fn star_wars(topo: &Topology, fabric: &Fabric, control: Option<&KubeControlPlane>) -> Result<()> {
    banner(
        "identity policy: the Star Wars demo (deathstar on node0, tiefighter on node1, xwing on node2)",
    );
    let ships = [
        (0, "deathstar", "org=empire,class=deathstar"),
        (1, "tiefighter", "org=empire,class=tiefighter"),
        (2, "xwing", "org=alliance,class=xwing"),
    ];
    for (node, name, labels) in ships {
        put_workload(fabric, control, topo, node, name, labels)?;
        println!(
            "  {name} ({labels}) on node{node}: {}",
            topo.node(node).pod(0).ip
        );
    }
    let deathstar = topo.node(0).pod(0);
    let _service = TcpService::start(&deathstar.ns, 80, "Ship landed\n")?;
    let landing = SocketAddrV4::new(deathstar.ip, 80);
    let ready = nodeseal_netns::wait_until(Duration::from_secs(60), || {
        (0..3).all(|i| {
            fabric.status(i).is_ok_and(|s| {
                s["policy"]["endpoints"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e["state"] == "ready"))
                    && s["policy"]["identities"].as_u64().is_some_and(|n| n >= 3)
            })
        })
    });
    if !ready {
        for i in 0..3 {
            println!("\n$ nodeseal status    # on node{i}");
            print!("{}", fabric.status_text(i)?);
        }
        bail!("the ships' endpoints were not programmed");
    }
    let attempt = |ship: usize| {
        let banner = tcp_banner(&topo.node(ship).pod(0).ns, landing, Duration::from_secs(3));
        println!(
            "  {} -> deathstar:80: {}",
            ships[ship].1,
            banner.as_deref().map_or("timed out", str::trim_end)
        );
        banner.is_some()
    };
    println!("\n  without policy:");
    ensure!(
        attempt(1) && attempt(2),
        "a ship could not land without policy"
    );

    let rule = fabric.dir().join("rule1.yaml");
    std::fs::write(&rule, RULE1)?;
    println!(
        "\n$ nodeseal policy apply -f rule1.yaml    # ingress to the deathstar only from org=empire on 80/TCP"
    );
    print!(
        "{}",
        fabric.nodeseal_store(&["policy", "apply", "-f", &rule.to_string_lossy()])?
    );
    let enforced = nodeseal_netns::wait_until(Duration::from_secs(30), || {
        fabric.status(0).is_ok_and(|s| {
            s["policy"]["endpoints"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["ingress"] == true))
        })
    });
    ensure!(enforced, "the deathstar does not enforce ingress");
    println!("\n$ nodeseal status    # on node0");
    print!("{}", fabric.status_text(0)?);
    println!("\n  with rule1:");
    ensure!(attempt(1), "the tiefighter must land");
    ensure!(!attempt(2), "the xwing must not land");
    let socket = fabric.socket(0);
    println!(
        "\n$ nodeseal observe --verdict dropped --to-label class=deathstar --last 3    # on node0"
    );
    print!(
        "{}",
        fabric.nodeseal(&[
            "observe",
            "--socket",
            &socket.to_string_lossy(),
            "--verdict",
            "dropped",
            "--to-label",
            "class=deathstar",
            "--last",
            "3",
        ])?
    );
    Ok(())
}

fn banner(text: &str) {
    println!("\n=== {text}");
}
