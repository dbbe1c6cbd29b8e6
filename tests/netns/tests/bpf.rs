//! Kernel scenarios for `nodeseal-bpf`: verifier acceptance on the running kernel (the host's,
//! and the VM runner's Debian 6.1 / 6.12), policy on live pods, and attachments and maps that
//! survive a reload. Each skips with a printed reason when root, bpffs or veth/clsact are
//! missing, and fails instead with `NODESEAL_REQUIRE_PRIVILEGED=1`.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "scenario helpers panic with context, like the tests"
)]
#![expect(
    clippy::expect_used,
    reason = "test set-up helpers panic with context, like the tests"
)]

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use nodeseal_bpf::{
    Attachment, Datapath, DatapathConfig, DropReason, Enforcement, Location, Mode, Outcome,
    PolicyDirection, PolicyRule, PolicyVerdict, Prefix, Program, uses_tcx,
};
use nodeseal_netns::{Feature, Netns, REQUIRE_ENV, Topology, ping, require};

const ICMP: u8 = 1;

/// A unique pin root on bpffs (mounted if missing, as the agent does), removed on drop.
struct PinRoot(PathBuf);

impl PinRoot {
    fn new(name: &str) -> Option<Self> {
        let mounted = || {
            std::fs::read_to_string("/proc/self/mounts")
                .is_ok_and(|m| m.lines().any(|l| l.contains(" /sys/fs/bpf bpf ")))
        };
        if !mounted() {
            let _ = std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status();
        }
        if !mounted() {
            assert!(
                std::env::var(REQUIRE_ENV).as_deref() != Ok("1"),
                "{name}: no bpffs at /sys/fs/bpf and {REQUIRE_ENV}=1"
            );
            eprintln!("SKIPPED {name}: no bpffs at /sys/fs/bpf");
            return None;
        }
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/nodeseal-netns-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        Some(Self(path))
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// ifindex of `name` in the calling thread's network namespace.
fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).expect("interface name");
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    index
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn verifier_accepts_every_program() {
    if !require("verifier_accepts_every_program", &[]) {
        return;
    }
    let Some(root) = PinRoot::new("verifier") else {
        return;
    };
    // `load` runs every program through the verifier; a rejection carries the verifier log.
    let dp = Datapath::load(&root.0)
        .unwrap_or_else(|e| panic!("kernel {} rejected the datapath: {e:?}", kernel_release()));
    for program in Program::ALL {
        dp.program(program).expect("loaded program");
    }
    eprintln!(
        "kernel {}: all programs verified; attach mode {}",
        kernel_release(),
        if uses_tcx() { "tcx" } else { "clsact" }
    );
}

#[test]
fn policy_on_two_pods_of_one_node() {
    if !require(
        "policy_on_two_pods_of_one_node",
        &[Feature::Netns, Feature::TcBpf],
    ) {
        return;
    }
    let Some(root) = PinRoot::new("policy") else {
        return;
    };
    let topo = Topology::builder("bpfpol")
        .nodes(1)
        .pods_per_node(2)
        .build()
        .expect("topology");
    let node = topo.node(0);
    let (a, b) = (node.pod(0), node.pod(1));
    const ID_A: u32 = 1000;
    const ID_B: u32 = 2000;
    let pin = root.0.clone();
    node.ns.run(|| {
        let mut dp = Datapath::load(&pin).expect("load");
        dp.config
            .set(DatapathConfig {
                mode: Mode::None,
                ..DatapathConfig::default()
            })
            .expect("config");
        for (pod, id, enforce_ingress) in [(a, ID_A, false), (b, ID_B, true)] {
            dp.ipcache
                .insert(Prefix::host(pod.addr()), id, Location::LocalPod)
                .expect("ipcache");
            let enforcement = Enforcement {
                ingress: enforce_ingress,
                egress: false,
            };
            dp.endpoints
                .insert(ifindex(&pod.host_ifname), id, enforcement)
                .expect("endpoint");
            dp.attach(Attachment::FromPod, &pod.host_ifname)
                .expect("attach from_pod");
            dp.attach(Attachment::ToPod, &pod.host_ifname)
                .expect("attach to_pod");
        }
        let _ = dp.events.drain();

        // B enforces ingress with no rule: A's pings are dropped by to_pod on B's veth.
        let denied = ping(&a.ns, b.ip, 3).expect("ping");
        assert_eq!(denied.received, 0, "deny must block ping: {denied:?}");
        let drops: Vec<_> = dp
            .events
            .drain()
            .into_iter()
            .map(|e| e.expect("event decodes"))
            .filter(|e| e.outcome == Outcome::Drop(DropReason::PolicyDenied))
            // Other drops can show up too (the host's IPv6 neighbour discovery toward B, from an
            // address the ipcache does not know); we look for the echo requests.
            .filter(|e| e.src == Some(a.addr()))
            .collect();
        assert!(!drops.is_empty(), "a policy drop event for A's pings");
        let e = drops[0];
        assert_eq!(e.program, Program::ToPod);
        assert_eq!((e.src_identity, e.dst_identity), (ID_A, ID_B));
        assert_eq!((e.src, e.dst), (Some(a.addr()), Some(b.addr())));
        assert_eq!((e.protocol, e.dst_port), (ICMP, 8), "echo request");
        assert!(dp.counters.get(DropReason::PolicyDenied).expect("counter") >= 3);

        // Allow echo requests from A: the ping goes through.
        dp.policy
            .insert(
                PolicyRule {
                    subject: ID_B,
                    peer: Some(ID_A),
                    protocol: Some(ICMP),
                    port: Some(8),
                    direction: PolicyDirection::Ingress,
                },
                PolicyVerdict::Allow,
            )
            .expect("allow");
        let allowed = ping(&a.ns, b.ip, 3).expect("ping");
        assert!(
            allowed.all_answered(),
            "allow must let ping through: {allowed:?}"
        );

        // The same key flipped to deny: blocked again.
        dp.policy
            .insert(
                PolicyRule {
                    subject: ID_B,
                    peer: Some(ID_A),
                    protocol: Some(ICMP),
                    port: Some(8),
                    direction: PolicyDirection::Ingress,
                },
                PolicyVerdict::Deny,
            )
            .expect("deny");
        let denied = ping(&a.ns, b.ip, 2).expect("ping");
        assert_eq!(denied.received, 0, "explicit deny blocks ping");

        // B's ingress still denies A's echo requests, but B's own pings get their replies:
        // a reply passes the policy of the other direction (conntrack).
        let own = ping(&b.ns, a.ip, 3).expect("ping");
        assert!(
            own.all_answered(),
            "replies to B's pings must pass: {own:?}"
        );
        let denied = ping(&a.ns, b.ip, 2).expect("ping");
        assert_eq!(
            denied.received, 0,
            "B's pings open nothing for A's requests"
        );
        for pod in [a, b] {
            dp.detach(Attachment::FromPod, &pod.host_ifname)
                .expect("detach");
            dp.detach(Attachment::ToPod, &pod.host_ifname)
                .expect("detach");
        }
    });
}

/// Load, populate, attach, drop the loader, load again: maps and attachment are still there
/// and still act on traffic. Uses `lo` of a fresh namespace, so it also runs on kernels
/// without veth (the development host).
#[test]
fn pinned_maps_and_attachment_survive_reload() {
    if !require("pinned_maps_and_attachment_survive_reload", &[]) {
        return;
    }
    let Some(root) = PinRoot::new("reattach") else {
        return;
    };
    let ns = Netns::new("bpfpin").expect("netns");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    let pin = root.0.clone();
    let loopback = Ipv4Addr::LOCALHOST;
    // Loopback traffic claims to come from a remote pod: strict ingress drops it.
    ns.run(|| {
        let mut dp = Datapath::load(&pin).expect("first load");
        dp.config
            .set(DatapathConfig {
                mode: Mode::Ipsec,
                strict_ingress: true,
                ..DatapathConfig::default()
            })
            .expect("config");
        dp.ipcache
            .insert(
                Prefix::new(IpAddr::V4(loopback), 8).expect("prefix"),
                3000,
                Location::RemotePod(nodeseal_bpf::NodeId(9)),
            )
            .expect("ipcache");
        dp.attach(Attachment::FromNetwork, "lo").expect("attach");
    });
    // The first loader is gone. Traffic is still judged by the attached program.
    let blocked = ping(&ns, loopback, 2).expect("ping");
    assert_eq!(blocked.received, 0, "attachment must outlive its loader");
    ns.run(|| {
        let mut dp = Datapath::load(&pin).expect("second load");
        assert_eq!(
            dp.ipcache.lookup(IpAddr::V4(loopback)).expect("lookup"),
            Some((3000, Location::RemotePod(nodeseal_bpf::NodeId(9)))),
            "map contents survive"
        );
        let before = dp.counters.get(DropReason::Unencrypted).expect("counter");
        assert!(
            before >= 2,
            "drops counted in the pinned counters: {before}"
        );
        // Reattach (atomic replace) with the new loader's program; still enforcing.
        dp.attach(Attachment::FromNetwork, "lo").expect("reattach");
        let still = ping(&ns, loopback, 1).expect("ping");
        assert_eq!(still.received, 0);
        assert!(dp.counters.get(DropReason::Unencrypted).expect("counter") > before);
        // Strict off through the new handle: traffic flows.
        let mut cfg = dp.config.get().expect("config");
        cfg.strict_ingress = false;
        dp.config.set(cfg).expect("config");
        let flows = ping(&ns, loopback, 2).expect("ping");
        assert!(flows.all_answered(), "{flows:?}");
        dp.detach(Attachment::FromNetwork, "lo").expect("detach");
    });
}
