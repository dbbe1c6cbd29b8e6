//! A nodeseal fabric on a [`Topology`]: a cluster CA, keymgr and one real `nodeseal-agent`
//! process per node namespace, all sharing a directory store (or etcd). Used by the agent
//! scenarios and by `cargo xtask demo`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::net::Cidr;
use crate::{Process, Topology, wait_until};

/// Where each agent serves Prometheus metrics: loopback of its own node namespace.
const AGENT_METRICS: &str = "127.0.0.1:9962";

/// The workspace's built binaries (`target/<profile>/`), found next to the running test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Where the agents keep their state.
#[derive(Clone, Debug)]
pub enum StoreKind {
    /// A directory shared by all processes.
    Dir,
    /// etcd at these client URLs.
    Etcd(Vec<String>),
    /// Kubernetes mode: each process gets its own kubeconfig (a token bound to its pod).
    Kube(KubeConfigs),
}

/// kubeconfigs of a Kubernetes-mode fabric.
#[derive(Clone, Debug)]
pub struct KubeConfigs {
    /// The operator's (admin), for the CLI.
    pub admin: PathBuf,
    /// keymgr's (its ServiceAccount, bound to a keymgr pod).
    pub keymgr: PathBuf,
    /// Node `i`'s agent's (the agent ServiceAccount, bound to the agent pod on node `i`).
    pub agents: Vec<PathBuf>,
}

/// The datapath every agent of a fabric runs (`--encryption-type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encryption {
    /// ESP in the kernel's XFRM.
    #[default]
    Ipsec,
    /// Kernel WireGuard on the `nodeseal0` link.
    Wireguard,
}

impl Encryption {
    /// The value of `--encryption-type`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ipsec => "ipsec",
            Self::Wireguard => "wireguard",
        }
    }

    /// The kernel feature it needs.
    pub fn feature(self) -> crate::Feature {
        match self {
            Self::Ipsec => crate::Feature::Esp,
            Self::Wireguard => crate::Feature::WireGuard,
        }
    }

    /// The tunnel objects an established peer has on each end once a rekey's grace period is
    /// over: a pair of SAs, or one WireGuard device entry.
    pub fn entries_per_peer(self) -> usize {
        match self {
            Self::Ipsec => 2,
            Self::Wireguard => 1,
        }
    }
}

/// Which of the topology's addresses the agents take as node IP and pod CIDRs. Every plan but
/// [`AddressPlan::Ipv4`] needs a dual-stack topology.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AddressPlan {
    /// IPv4 node IPs and pod CIDRs.
    #[default]
    Ipv4,
    /// IPv4 and IPv6 pod CIDRs; node IPs of IPv6 when `ipv6_underlay`, else of IPv4.
    DualStack {
        /// The tunnels run between the nodes' IPv6 addresses.
        ipv6_underlay: bool,
    },
    /// IPv6 node IPs and pod CIDRs.
    Ipv6,
}

impl AddressPlan {
    /// Whether the plan uses the IPv6 addresses of a dual-stack topology.
    pub fn needs_ipv6(self) -> bool {
        self != Self::Ipv4
    }

    /// Whether the tunnels run between IPv6 node IPs.
    pub fn ipv6_underlay(self) -> bool {
        matches!(
            self,
            Self::Ipv6
                | Self::DualStack {
                    ipv6_underlay: true
                }
        )
    }

    /// `pod`'s addresses in the families of the plan's pod CIDRs (IPv4 first).
    pub fn pod_addresses(self, pod: &crate::Pod) -> Vec<IpAddr> {
        let v6 = pod.ip6.map(IpAddr::from);
        match self {
            Self::Ipv4 => vec![pod.ip.into()],
            Self::DualStack { .. } => std::iter::once(pod.ip.into()).chain(v6).collect(),
            Self::Ipv6 => v6.into_iter().collect(),
        }
    }

    /// Node `node`'s `--node-ip` and `--pod-cidr`s under this plan (the IPv4 ones where the
    /// topology has no IPv6).
    pub fn of(self, node: &crate::Node) -> (IpAddr, Vec<Cidr>) {
        let ip4 = IpAddr::from(node.ip);
        let ip6 = node.ip6.map_or(ip4, IpAddr::from);
        let cidr6 = node.pod_cidr6.unwrap_or(node.pod_cidr);
        match self {
            Self::Ipv4 => (ip4, vec![node.pod_cidr]),
            Self::DualStack { ipv6_underlay } => (
                if ipv6_underlay { ip6 } else { ip4 },
                vec![node.pod_cidr, cidr6],
            ),
            Self::Ipv6 => (ip6, vec![cidr6]),
        }
    }
}

/// Settings of a fabric.
#[derive(Clone, Debug)]
pub struct FabricOptions {
    /// Store backend.
    pub store: StoreKind,
    /// The datapath of every agent (the rogue's and impostors' too).
    pub encryption: Encryption,
    /// Keep old keys this long after a flip.
    pub grace: Duration,
    /// Rekey interval.
    pub rekey_interval: Duration,
    /// Strict mode.
    pub strict: bool,
    /// Remove a peer's SAs after its handshakes failed this long.
    pub retention: Duration,
    /// The agents' node IPs and pod CIDRs.
    pub addresses: AddressPlan,
    /// Extra arguments of node `i`'s agent (index `i`), after the fabric's own; a
    /// `--node-ip` or `--encryption-type` here replaces the fabric's.
    pub agent_args: Vec<Vec<String>>,
}

impl Default for FabricOptions {
    fn default() -> Self {
        Self {
            store: StoreKind::Dir,
            encryption: Encryption::Ipsec,
            grace: Duration::from_secs(2),
            rekey_interval: Duration::from_secs(3600),
            strict: true,
            retention: Duration::from_secs(600),
            addresses: AddressPlan::Ipv4,
            agent_args: Vec::new(),
        }
    }
}

/// The running fabric. Processes stop on drop; the topology (and so the kernel state) goes
/// with the [`Topology`].
pub struct Fabric {
    dir: PathBuf,
    underlay: std::sync::Arc<crate::Netns>,
    options: FabricOptions,
    keymgr: Option<Process>,
    agents: Vec<Option<Process>>,
    pin_base: PathBuf,
}

impl Fabric {
    /// Creates the CA, starts keymgr and one agent on each of the first `agents` nodes of
    /// `topo` (the others stay free, e.g. for a rogue node).
    pub fn start(topo: &Topology, agents: usize, options: FabricOptions) -> Result<Self> {
        if options.addresses.needs_ipv6() && topo.nodes().iter().any(|n| n.ip6.is_none()) {
            bail!(
                "address plan {:?} needs a dual-stack topology",
                options.addresses
            );
        }
        let dir = topo.log_dir().join("fabric");
        std::fs::create_dir_all(&dir)?;
        let pin_base = PathBuf::from("/sys/fs/bpf").join(format!(
            "nodeseal-test-{}",
            dir.to_string_lossy().replace('/', "_")
        ));
        let mut fabric = Self {
            dir,
            underlay: topo.underlay_shared(),
            options,
            keymgr: None,
            agents: Vec::new(),
            pin_base,
        };
        if !matches!(fabric.options.store, StoreKind::Kube(_)) {
            fabric.nodeseal(&["ca", "init", "--dir", &fabric.ca_dir().to_string_lossy()])?;
        }
        fabric.start_keymgr(topo)?;
        for i in 0..agents.min(topo.nodes().len()) {
            let agent = fabric.spawn_agent(topo, i)?;
            fabric.agents.push(Some(agent));
        }
        Ok(fabric)
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The store flags every process gets.
    pub fn store_args(&self) -> Vec<String> {
        match &self.options.store {
            StoreKind::Dir => vec![
                "--store-dir".into(),
                self.dir.join("store").to_string_lossy().into_owned(),
            ],
            StoreKind::Etcd(urls) => vec!["--etcd-endpoints".into(), urls.join(",")],
            StoreKind::Kube(configs) => kube_args(&configs.admin),
        }
    }

    /// The store flags of node `i`'s agent.
    fn agent_store_args(&self, i: usize) -> Vec<String> {
        match &self.options.store {
            StoreKind::Kube(configs) => configs
                .agents
                .get(i)
                .map_or_else(|| self.store_args(), |c| kube_args(c)),
            _ => self.store_args(),
        }
    }

    fn start_keymgr(&mut self, topo: &Topology) -> Result<()> {
        let mut cmd = topo
            .underlay()
            .command(&binary("nodeseal").to_string_lossy());
        cmd.args(["keymgr", "run"]);
        match &self.options.store {
            // The CA is created in the Secret nodeseal-ca by keymgr itself.
            StoreKind::Kube(configs) => cmd.args(kube_args(&configs.keymgr)),
            _ => cmd
                .args(["--ca-dir", &self.ca_dir().to_string_lossy()])
                .args(self.store_args()),
        };
        cmd.env("RUST_LOG", "info");
        self.keymgr = Some(topo.spawn_command("keymgr", cmd)?);
        Ok(())
    }

    /// The status socket of node `i`'s agent.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}.sock"))
    }

    /// Command line of node `i`'s agent, named `node<i>`.
    pub fn agent_command(&self, topo: &Topology, i: usize) -> Command {
        self.agent_command_named(topo, i, &format!("node{i}"), self.options.strict)
    }

    fn agent_command_named(&self, topo: &Topology, i: usize, name: &str, strict: bool) -> Command {
        let node = topo.node(i);
        let (ip, pod_cidrs) = self.options.addresses.of(node);
        let extra = self.options.agent_args.get(i).cloned().unwrap_or_default();
        // An address given in the node's extra arguments replaces the topology's.
        let node_ip = match extra.iter().position(|a| a == "--node-ip") {
            Some(_) => Vec::new(),
            None => vec!["--node-ip".to_owned(), ip.to_string()],
        };
        // So does a datapath.
        let encryption = match extra.iter().position(|a| a == "--encryption-type") {
            Some(_) => Vec::new(),
            None => vec![
                "--encryption-type".to_owned(),
                self.options.encryption.name().to_owned(),
            ],
        };
        let mut cmd = node.ns.command(&binary("nodeseal-agent").to_string_lossy());
        cmd.args(["--node-name", name])
            .args(&node_ip)
            .args(
                pod_cidrs
                    .iter()
                    .flat_map(|c| ["--pod-cidr".to_owned(), c.to_string()]),
            )
            .args([
                "--state-dir",
                &self.dir.join(format!("n{i}-state")).to_string_lossy(),
            ])
            .args(["--status-socket", &self.socket(i).to_string_lossy()])
            .args([
                "--bpf-pin-root",
                &self.pin_base.join(format!("n{i}")).to_string_lossy(),
            ])
            .args(["--rekey-grace", &humantime(self.options.grace)])
            .args(["--rekey-interval", &humantime(self.options.rekey_interval)])
            .args(["--strict-mode", if strict { "true" } else { "false" }])
            .args(["--peer-retention", &humantime(self.options.retention)])
            .args(["--metrics-addr", AGENT_METRICS])
            .args(&encryption)
            .args(self.agent_store_args(i))
            .args(&extra)
            .env("RUST_LOG", "info,nodeseal_agent=debug");
        cmd
    }

    fn spawn_agent(&self, topo: &Topology, i: usize) -> Result<Process> {
        topo.spawn_command(&format!("agent-node{i}"), self.agent_command(topo, i))
    }

    /// The datapath the agents run.
    pub fn encryption(&self) -> Encryption {
        self.options.encryption
    }

    /// The agents' address plan.
    pub fn addresses(&self) -> AddressPlan {
        self.options.addresses
    }

    /// Replaces the extra arguments of node `i`'s agent (from its next start on).
    pub fn set_agent_args(&mut self, i: usize, args: Vec<String>) {
        if self.options.agent_args.len() <= i {
            self.options.agent_args.resize(i + 1, Vec::new());
        }
        self.options.agent_args[i] = args;
    }

    /// SIGKILLs node `i`'s agent (kernel state stays).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut p) = self.agents.get_mut(i).and_then(Option::take) {
            p.kill();
        }
    }

    /// Starts node `i`'s agent: again after [`Fabric::kill_agent`], or for the first time on a node
    /// the fabric started without an agent.
    pub fn restart_agent(&mut self, topo: &Topology, i: usize) -> Result<()> {
        self.kill_agent(i);
        let agent = self.spawn_agent(topo, i)?;
        if self.agents.len() <= i {
            self.agents.resize_with(i + 1, || None);
        }
        self.agents[i] = Some(agent);
        Ok(())
    }

    /// Runs `nodeseal ARGS` in the underlay namespace (where etcd listens, when used) and
    /// returns stdout.
    pub fn nodeseal(&self, args: &[&str]) -> Result<String> {
        let out = self
            .underlay
            .command(&binary("nodeseal").to_string_lossy())
            .args(args)
            .output()
            .context("running nodeseal")?;
        if !out.status.success() {
            bail!(
                "nodeseal {} ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Like [`Fabric::nodeseal`] with the store flags appended.
    pub fn nodeseal_store(&self, args: &[&str]) -> Result<String> {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.extend(self.store_args());
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        self.nodeseal(&refs)
    }

    /// Node `i`'s status document (`nodeseal status -o json`).
    pub fn status(&self, i: usize) -> Result<Value> {
        let text = self.nodeseal(&[
            "status",
            "-o",
            "json",
            "--socket",
            &self.socket(i).to_string_lossy(),
        ])?;
        serde_json::from_str(&text).context("parsing status JSON")
    }

    /// Node `i`'s flow history (`nodeseal observe -o json` with `args`), one JSON object each.
    pub fn observe(&self, i: usize, args: &[&str]) -> Result<Vec<Value>> {
        let socket = self.socket(i);
        let mut all = vec!["observe", "-o", "json", "--socket"];
        let socket = socket.to_string_lossy();
        all.push(&socket);
        all.extend_from_slice(args);
        self.nodeseal(&all)?
            .lines()
            .map(|line| serde_json::from_str(line).context("parsing a flow line"))
            .collect()
    }

    /// `nodeseal observe -f -o json` on node `i` with `args`: the running client (stdout piped,
    /// one JSON flow per line). Kill it to stop following.
    pub fn observe_follow(&self, i: usize, args: &[&str]) -> Result<std::process::Child> {
        self.underlay
            .command(&binary("nodeseal").to_string_lossy())
            .args(["observe", "-f", "-o", "json", "--socket"])
            .arg(self.socket(i))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting nodeseal observe -f")
    }

    /// Node `i`'s status as text.
    pub fn status_text(&self, i: usize) -> Result<String> {
        self.nodeseal(&["status", "--socket", &self.socket(i).to_string_lossy()])
    }

    /// Node `i`'s row for `peer` (node name).
    pub fn peer_row(&self, i: usize, peer: &str) -> Option<Value> {
        let status = self.status(i).ok()?;
        status["peers"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == peer)
            .cloned()
    }

    /// Waits until every node has every other node (of `nodes`) established.
    pub fn wait_established(&self, nodes: &[usize], timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let ok = wait_until(timeout, || {
            nodes.iter().all(|&i| {
                nodes.iter().filter(|&&j| j != i).all(|&j| {
                    self.peer_row(i, &format!("node{j}"))
                        .is_some_and(|row| row["state"] == "established")
                })
            })
        });
        if !ok {
            let mut detail = String::new();
            for &i in nodes {
                detail.push_str(
                    &self
                        .status_text(i)
                        .unwrap_or_else(|e| format!("node{i}: {e:#}\n")),
                );
            }
            bail!(
                "fabric not established after {:?}:\n{detail}",
                started.elapsed()
            );
        }
        Ok(())
    }

    /// What node `i`'s agent serves on `/metrics` (Prometheus text), scraped without any status
    /// call.
    pub fn metrics(&self, topo: &Topology, i: usize) -> Result<String> {
        // A few tries: under qemu TCG with Kubernetes scenarios running beside it, one scrape
        // has been seen to get no answer within its 10 s.
        let mut last = None;
        for _ in 0..3 {
            match topo.node(i).ns.http_get(AGENT_METRICS, "/metrics") {
                Some((200, body)) => return Ok(body),
                other => last = other,
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        bail!("node{i}'s metrics endpoint answered {last:?} (3 tries)")
    }

    /// The agent process of node `i`, if running.
    pub fn agent(&mut self, i: usize) -> Option<&mut Process> {
        self.agents.get_mut(i).and_then(Option::as_mut)
    }

    /// The namespace-independent directory holding the CA, store and sockets.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs a rogue agent on node `node` under `name`, with an SVID from a CA of its own.
    pub fn spawn_rogue(&self, topo: &Topology, node: usize, name: &str) -> Result<Process> {
        let rogue_ca = self.dir.join("rogue-ca");
        let rogue_id = self.dir.join("rogue-id");
        self.nodeseal(&["ca", "init", "--dir", &rogue_ca.to_string_lossy()])?;
        self.nodeseal(&[
            "ca",
            "issue",
            "--dir",
            &rogue_ca.to_string_lossy(),
            "--node",
            name,
            "--out",
            &rogue_id.to_string_lossy(),
        ])?;
        // Not strict: it sends plaintext where it has no keys, which the honest nodes must drop.
        let mut cmd = self.agent_command_named(topo, node, name, false);
        cmd.args([
            "--identity-cert",
            &rogue_id.join("node.crt").to_string_lossy(),
        ])
        .args([
            "--identity-key",
            &rogue_id.join("node.key").to_string_lossy(),
        ])
        .args([
            "--trust-bundle-file",
            &rogue_id.join("bundle.pem").to_string_lossy(),
        ]);
        topo.spawn_command(&format!("rogue-{name}"), cmd)
    }

    /// Runs an agent on node `node` (with that node's credentials: its kubeconfig in
    /// Kubernetes mode) that claims to be node `claimed`, with `args` added.
    pub fn spawn_impostor(
        &self,
        topo: &Topology,
        node: usize,
        claimed: &str,
        args: &[&str],
    ) -> Result<Process> {
        let mut cmd = self.agent_command_named(topo, node, claimed, self.options.strict);
        cmd.args(args);
        topo.spawn_command(&format!("impostor-{claimed}"), cmd)
    }

    /// Removes the pinned maps of every agent (the kernel namespaces go with the topology).
    fn unpin(&self) {
        let _ = std::fs::remove_dir_all(&self.pin_base);
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for agent in self.agents.iter_mut().flatten() {
            agent.kill();
        }
        if let Some(k) = self.keymgr.as_mut() {
            k.kill();
        }
        self.unpin();
    }
}

fn humantime(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn kube_args(kubeconfig: &Path) -> Vec<String> {
    vec![
        "--kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.to_string_lossy().into_owned(),
    ]
}

/// A real etcd (Debian's `etcd-server`) for the store scenarios, listening on `ip` inside the
/// underlay namespace (client 2379, peer 2380), with its data under `dir`.
pub fn start_etcd(
    topo: &Topology,
    ip: std::net::Ipv4Addr,
    dir: &Path,
) -> Result<(Process, String)> {
    let client = format!("http://{ip}:2379");
    let peer = format!("http://{ip}:2380");
    let mut cmd = topo.underlay().command("etcd");
    cmd.args([
        "--name",
        "nodeseal-test",
        "--data-dir",
        &dir.to_string_lossy(),
    ])
    .args([
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
    ])
    .args([
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
    ])
    .args(["--initial-cluster", &format!("nodeseal-test={peer}")])
    .env("ETCD_UNSUPPORTED_ARCH", "");
    let mut process = topo.spawn_command("etcd", cmd)?;
    let addr: std::net::SocketAddr = format!("{ip}:2379").parse()?;
    let up = wait_until(Duration::from_secs(30), || {
        topo.underlay()
            .run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
    });
    if !up || !process.is_running() {
        bail!("etcd did not start:\n{}", process.log());
    }
    Ok((process, client))
}

/// One peer of a WireGuard device, as `wg show <link> dump` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgEntry {
    /// Public key (base64).
    pub public_key: String,
    /// Preshared key (base64), `(none)` when unset.
    pub preshared_key: String,
    /// `ip:port`, `(none)` when unknown.
    pub endpoint: String,
    /// Comma-separated CIDRs, `(none)` when empty.
    pub allowed_ips: String,
    /// Unix seconds of the latest handshake, 0 for never.
    pub latest_handshake: u64,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

impl WgEntry {
    /// Whether the entry's endpoint is at `ip` (`10.0.0.2:51820`, `[fd00::2]:51820`).
    pub fn is_at(&self, ip: impl Into<IpAddr>) -> bool {
        let host = self.endpoint.rsplit_once(':').map(|(host, _)| host);
        host.map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<IpAddr>().ok())
            == Some(ip.into())
    }
}

/// The peers of the `nodeseal0` WireGuard device in `ns`, read with `wg` (none without the
/// link).
pub fn wg_entries(ns: &crate::Netns) -> Vec<WgEntry> {
    let Ok(dump) = ns.exec("wg", &["show", "nodeseal0", "dump"]) else {
        return Vec::new();
    };
    // The first line is the device itself; each further line is a peer: public key, preshared
    // key, endpoint, allowed IPs, latest handshake, rx, tx, keepalive.
    dump.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            (f.len() >= 7).then(|| WgEntry {
                public_key: f[0].to_owned(),
                preshared_key: f[1].to_owned(),
                endpoint: f[2].to_owned(),
                allowed_ips: f[3].to_owned(),
                latest_handshake: f[4].parse().unwrap_or(0),
                rx_bytes: f[5].parse().unwrap_or(0),
                tx_bytes: f[6].parse().unwrap_or(0),
            })
        })
        .collect()
}

/// The node IP pairs of nodes `a` and `b`, one per family the topology has (the tunnel between
/// them uses one of them).
fn node_ip_pairs(topo: &Topology, a: usize, b: usize) -> Vec<(IpAddr, IpAddr)> {
    let (na, nb) = (topo.node(a), topo.node(b));
    let mut pairs = vec![(na.ip.into(), nb.ip.into())];
    if let (Some(x), Some(y)) = (na.ip6, nb.ip6) {
        pairs.push((x.into(), y.into()));
    }
    pairs
}

/// The tunnel objects node `a` has towards node `b` in the kernel: its ESP states between the
/// two node IPs, or its WireGuard entries at `b`'s address.
pub fn tunnel_entries(topo: &Topology, encryption: Encryption, a: usize, b: usize) -> usize {
    let ns = &topo.node(a).ns;
    node_ip_pairs(topo, a, b)
        .into_iter()
        .map(|(ip_a, ip_b)| match encryption {
            Encryption::Ipsec => esp_spis_between(ns, ip_a, ip_b).len(),
            Encryption::Wireguard => wg_entries(ns).iter().filter(|e| e.is_at(ip_b)).count(),
        })
        .sum()
}

/// What names the keys node `a` uses towards node `b` now, as the kernel holds them: the
/// SPIs of the ESP states between them, or the preshared keys of its WireGuard entries at `b`'s
/// address. A rekey changes it.
pub fn tunnel_keys(topo: &Topology, encryption: Encryption, a: usize, b: usize) -> Vec<String> {
    let ns = &topo.node(a).ns;
    let mut keys: Vec<String> = node_ip_pairs(topo, a, b)
        .into_iter()
        .flat_map(|(ip_a, ip_b)| match encryption {
            Encryption::Ipsec => esp_spis_between(ns, ip_a, ip_b)
                .iter()
                .map(|spi| format!("{spi:#010x}"))
                .collect::<Vec<_>>(),
            Encryption::Wireguard => wg_entries(ns)
                .into_iter()
                .filter(|e| e.is_at(ip_b))
                .map(|e| e.preshared_key)
                .collect(),
        })
        .collect();
    keys.sort();
    keys
}

/// SPIs of the ESP states in `ns` between `a` and `b` (either direction), read with iproute2.
pub fn esp_spis_between(ns: &crate::Netns, a: impl Into<IpAddr>, b: impl Into<IpAddr>) -> Vec<u32> {
    esp_spis_in(&ns.ip(&["xfrm", "state"]).unwrap_or_default(), a, b)
}

/// The SPIs of the ESP states between `a` and `b` (either direction) in `ip xfrm state` output.
pub fn esp_spis_in(text: &str, a: impl Into<IpAddr>, b: impl Into<IpAddr>) -> Vec<u32> {
    let (a, b) = (a.into(), b.into());
    let mut spis = Vec::new();
    let mut between = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("src ") {
            let mut words = rest.split_whitespace();
            let src = words.next().and_then(|w| w.parse::<IpAddr>().ok());
            let dst = words.nth(1).and_then(|w| w.parse::<IpAddr>().ok());
            between = (src == Some(a) && dst == Some(b)) || (src == Some(b) && dst == Some(a));
        } else if between
            && let Some(spi) = line.split_whitespace().skip_while(|w| *w != "spi").nth(1)
        {
            if let Ok(v) = u32::from_str_radix(spi.trim_start_matches("0x"), 16) {
                spis.push(v);
            }
            between = false;
        }
    }
    spis
}
