//! A cluster in namespaces: an underlay namespace holding bridge `br0`, node namespaces wired to
//! it by veth pairs, and pod namespaces behind each node, routed the way Cilium's native routing
//! does it (a /32 per pod over its veth, each peer's pod CIDR via the peer's node IP).
//!
//! Addresses: node `i` is `10.0.0.(i+1)/24` on its `eth0`; its pod CIDR is `10.244.i.0/24`, with
//! the gateway `10.244.i.1` on its loopback; pod `j` of node `i` is `10.244.i.(10+j)/32` on its
//! `eth0`, whose peer in the node is `lxc<j>`.
//!
//! A dual-stack topology ([`TopologyBuilder::dual_stack`]) adds IPv6 everywhere: node `i` is
//! also `fd00::(i+1)/64`, its IPv6 pod CIDR `fd00:10:244:i::/64`, pod `j` is also
//! `fd00:10:244:i::(10+j)/128`, whose default route goes via `fe80::1` (the link-local address of
//! every `lxc<j>`), and each peer's IPv6 pod CIDR is routed via the peer's IPv6 node IP. Which
//! families the agents use is the fabric's choice.
//!
//! When a test panics while a topology is alive, its drop prints a failure report: every
//! namespace's addresses, routes and XFRM state, the logs of processes started through it, and a
//! summary of the wire captures.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use crate::capture::{self, WireCapture};
use crate::net::Cidr;
use crate::{Netns, Process};

/// The bridge joining the nodes, in the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";

pub struct TopologyBuilder {
    name: String,
    nodes: usize,
    pods_per_node: usize,
    dual_stack: bool,
}

impl TopologyBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    pub fn pods_per_node(mut self, n: usize) -> Self {
        self.pods_per_node = n;
        self
    }

    /// IPv6 addresses and routes beside the IPv4 ones, on the underlay and for the pods.
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    pub fn build(self) -> Result<Topology> {
        hold_kernel_timestamps_on();
        anyhow::ensure!(
            (1..=200).contains(&self.nodes) && self.pods_per_node <= 200,
            "topology of {} nodes x {} pods does not fit the address plan",
            self.nodes,
            self.pods_per_node
        );
        let short: String = self
            .name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        let log_dir = std::env::temp_dir()
            .join("nodeseal-netns")
            .join(format!("{short}-{}", std::process::id()));
        let underlay = Netns::new(&format!("{short}-u"))?;
        underlay.ip(&["link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
        underlay.ip(&["link", "set", UNDERLAY_BRIDGE, "up"])?;
        let mut topo = Topology {
            name: self.name,
            underlay: Arc::new(underlay),
            nodes: Vec::new(),
            log_dir,
            logs: Mutex::new(Vec::new()),
            captures: Mutex::new(Vec::new()),
        };
        for i in 0..self.nodes {
            let node = Node::create(
                &topo.underlay,
                &short,
                i,
                self.pods_per_node,
                self.dual_stack,
            )?;
            topo.nodes.push(node);
        }
        for node in &topo.nodes {
            for peer in topo.nodes.iter().filter(|p| p.index != node.index) {
                node.ns.ip(&[
                    "route",
                    "add",
                    &peer.pod_cidr.to_string(),
                    "via",
                    &peer.ip.to_string(),
                ])?;
                if let (Some(cidr), Some(via)) = (peer.pod_cidr6, peer.ip6) {
                    node.ns.ip(&[
                        "-6",
                        "route",
                        "add",
                        &cidr.to_string(),
                        "via",
                        &via.to_string(),
                    ])?;
                }
            }
        }
        Ok(topo)
    }
}

pub struct Topology {
    name: String,
    underlay: Arc<Netns>,
    nodes: Vec<Node>,
    log_dir: PathBuf,
    logs: Mutex<Vec<(String, PathBuf)>>,
    captures: Mutex<Vec<Arc<capture::Shared>>>,
}

impl Topology {
    /// Starts describing a topology; `name` (the test's) prefixes every namespace.
    pub fn builder(name: &str) -> TopologyBuilder {
        TopologyBuilder {
            name: name.to_owned(),
            nodes: 2,
            pods_per_node: 1,
            dual_stack: false,
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// The underlay namespace, shared (for helpers that outlive a borrow of the topology).
    pub fn underlay_shared(&self) -> Arc<Netns> {
        Arc::clone(&self.underlay)
    }

    /// Every node's pod CIDRs (IPv4, and IPv6 in a dual-stack topology).
    pub fn pod_cidrs(&self) -> Vec<Cidr> {
        self.nodes
            .iter()
            .flat_map(|n| std::iter::once(n.pod_cidr).chain(n.pod_cidr6))
            .collect()
    }

    /// Where processes started through [`Topology::spawn`] write their logs.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Starts capturing every frame on the underlay wire.
    pub fn capture(&self) -> Result<WireCapture> {
        Ok(self.register(WireCapture::start(&self.underlay, UNDERLAY_BRIDGE)?))
    }

    /// Like [`Topology::capture`], keeping each frame's bytes (to replay them).
    pub fn capture_frames(&self) -> Result<WireCapture> {
        Ok(self.register(WireCapture::start_keeping_frames(
            &self.underlay,
            UNDERLAY_BRIDGE,
        )?))
    }

    /// Makes `capture`'s summary part of the failure report.
    fn register(&self, capture: WireCapture) -> WireCapture {
        if let Ok(mut c) = self.captures.lock() {
            c.push(capture.shared());
        }
        capture
    }

    /// Starts `cmd` inside `ns`, logging to `<log_dir>/<name>.log`; the log is part of the
    /// failure report.
    pub fn spawn(&self, ns: &Netns, name: &str, program: &str, args: &[&str]) -> Result<Process> {
        let mut cmd = ns.command(program);
        cmd.args(args);
        self.spawn_command(name, cmd)
    }

    /// Like [`Topology::spawn`] for a prepared command (environment, working directory...).
    pub fn spawn_command(&self, name: &str, cmd: Command) -> Result<Process> {
        let process = Process::spawn(name, cmd, &self.log_dir)?;
        if let Ok(mut logs) = self.logs.lock() {
            logs.push((name.to_owned(), process.log_path().to_owned()));
        }
        Ok(process)
    }

    /// The failure report: namespace state, process logs, capture summaries.
    pub fn report(&self) -> String {
        let mut out = format!("===== nodeseal-netns report for {} =====\n", self.name);
        out.push_str("----- underlay -----\n");
        for args in [&["-br", "addr"][..], &["route"]] {
            out.push_str(&format!("$ ip {}\n", args.join(" ")));
            out.push_str(
                &self
                    .underlay
                    .ip(args)
                    .unwrap_or_else(|e| format!("{e:#}\n")),
            );
        }
        for node in &self.nodes {
            out.push_str(&format!(
                "----- node {} ({}, pods {}) -----\n",
                node.index, node.ip, node.pod_cidr
            ));
            for args in [
                &["-br", "addr"][..],
                &["-s", "link"],
                &["route"],
                &["-s", "xfrm", "state"],
                &["xfrm", "policy"],
            ] {
                out.push_str(&format!("$ ip {}\n", args.join(" ")));
                out.push_str(&node.ns.ip(args).unwrap_or_else(|e| format!("{e:#}\n")));
            }
            // /proc/net follows a process's main thread: a thread that entered the namespace
            // reads its own view through thread-self.
            let stat = node
                .ns
                .run(|| std::fs::read_to_string("/proc/thread-self/net/xfrm_stat"));
            let nonzero: Vec<String> = stat
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim_end().ends_with(" 0") && !l.trim_end().ends_with("\t0"))
                .map(str::to_owned)
                .collect();
            out.push_str(&format!(
                "$ grep -v ' 0$' /proc/net/xfrm_stat\n{}\n",
                nonzero.join("\n")
            ));
            for pod in &node.pods {
                out.push_str(&format!("--- pod {} ({})\n", pod.ns.name(), pod.ip));
                out.push_str(&pod.ns.ip(&["-br", "addr"]).unwrap_or_default());
                let snmp = pod
                    .ns
                    .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"));
                for line in snmp
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.starts_with("Udp:"))
                {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        if let Ok(logs) = self.logs.lock() {
            for (name, path) in logs.iter() {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(200)..];
                out.push_str(&format!(
                    "----- log of {name} ({}, last {} lines) -----\n{}\n",
                    path.display(),
                    tail.len(),
                    tail.join("\n")
                ));
            }
        }
        if let Ok(captures) = self.captures.lock() {
            for (i, shared) in captures.iter().enumerate() {
                out.push_str(&format!("----- wire capture {i}: {}\n", shared.summary()));
            }
        }
        out
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
            eprintln!("(logs kept in {})", self.log_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
    }
}

/// A node: its namespace, underlay addresses, pod CIDRs and pods.
pub struct Node {
    pub index: usize,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub pod_cidr: Cidr,
    /// In a dual-stack topology.
    pub ip6: Option<Ipv6Addr>,
    /// In a dual-stack topology.
    pub pod_cidr6: Option<Cidr>,
    pub pods: Vec<Pod>,
}

impl Node {
    fn create(
        underlay: &Netns,
        prefix: &str,
        index: usize,
        pods: usize,
        dual_stack: bool,
    ) -> Result<Self> {
        let i = u8::try_from(index).context("node index")?;
        let ns = Netns::new(&format!("{prefix}-n{i}"))?;
        let ip = Ipv4Addr::new(10, 0, 0, i + 1);
        let port = underlay_port(index);
        ns.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            underlay.name(),
        ])?;
        underlay.ip(&["link", "set", &port, "master", UNDERLAY_BRIDGE, "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        let gateway = Ipv4Addr::new(10, 244, i, 1);
        ns.ip(&["addr", "add", &format!("{gateway}/32"), "dev", "lo"])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        for key in ["all", "default", "eth0"] {
            ns.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0")?;
        }
        let (ip6, pod_cidr6) = if dual_stack {
            let ip6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i) + 1);
            // No duplicate address detection: the addresses are unique by construction, and
            // DAD would hold them back for a second or more.
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            let cidr = Cidr::new(
                Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(i), 0, 0, 0, 0).into(),
                64,
            )?;
            (Some(ip6), Some(cidr))
        } else {
            (None, None)
        };
        let mut node = Self {
            index,
            ns,
            ip,
            pod_cidr: Cidr::v4(10, 244, i, 0, 24),
            ip6,
            pod_cidr6,
            pods: Vec::new(),
        };
        for j in 0..pods {
            let pod = Pod::create(&node, prefix, j, gateway)?;
            node.pods.push(pod);
        }
        Ok(node)
    }

    pub fn pod(&self, j: usize) -> &Pod {
        &self.pods[j]
    }

    /// The bridge port in the underlay namespace whose veth peer is this node's `eth0`.
    pub fn underlay_port(&self) -> String {
        underlay_port(self.index)
    }
}

fn underlay_port(node_index: usize) -> String {
    format!("n{node_index}")
}

/// A pod: a namespace behind its node's `lxc<j>`.
pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// In a dual-stack topology.
    pub ip6: Option<Ipv6Addr>,
    /// The host-side veth in the node namespace.
    pub host_ifname: String,
}

impl Pod {
    fn create(node: &Node, prefix: &str, index: usize, gateway: Ipv4Addr) -> Result<Self> {
        let j = u8::try_from(index + 10).context("pod index")?;
        let i = u8::try_from(node.index).context("node index")?;
        let ns = Netns::new(&format!("{prefix}-n{i}p{index}"))?;
        let ip = Ipv4Addr::new(10, 244, i, j);
        let host_ifname = format!("lxc{index}");
        node.ns.ip(&[
            "link",
            "add",
            &host_ifname,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        node.ns.ip(&["link", "set", &host_ifname, "up"])?;
        node.ns
            .sysctl(&format!("net.ipv4.conf.{host_ifname}.rp_filter"), "0")?;
        node.ns
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_ifname])?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            &gateway.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
            "src",
            &ip.to_string(),
        ])?;
        let ip6 = node
            .pod_cidr6
            .map(|_| Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(i), 0, 0, 0, u16::from(j)));
        if let Some(ip6) = ip6 {
            let ip6 = ip6.to_string();
            // The pod's gateway: the same link-local address on every host-side veth, as
            // Cilium's; the node answers neighbour solicitations for it on that link.
            node.ns.ip(&[
                "-6",
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &host_ifname,
                "nodad",
            ])?;
            node.ns.ip(&[
                "-6",
                "route",
                "add",
                &format!("{ip6}/128"),
                "dev",
                &host_ifname,
            ])?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0", "src", &ip6,
            ])?;
        }
        Ok(Self {
            ns,
            ip,
            ip6,
            host_ifname,
        })
    }

    pub fn addr(&self) -> IpAddr {
        self.ip.into()
    }
}

/// iputils' `ping` turns the kernel's global packet-timestamp key on and off with every run, and
/// each flip patches kernel text. Under qemu TCG a CPU has been seen to execute a half-patched
/// site while a capture was active (an `int3` Oops in `dev_queue_xmit_nit`, then a guest
/// panic). One socket holding timestamps on for the life of the test process means no flips
/// while scenarios run. Best effort: without it the tests are the same, only that risk returns.
fn hold_kernel_timestamps_on() {
    static KEEPER: std::sync::OnceLock<Option<std::os::fd::OwnedFd>> = std::sync::OnceLock::new();
    KEEPER.get_or_init(|| {
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if raw < 0 {
            return None;
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let on: libc::c_int = 1;
        // SAFETY: setsockopt(2) on a socket we own, with a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMP,
                std::ptr::from_ref(&on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        (rc == 0).then_some(socket)
    });
}
