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

use nodeseal_agent::observe::{Flow, FlowDirection, Verdict as ObserveVerdict};
use nodeseal_bpf::{
    Attachment, Datapath, DatapathConfig, DropReason, Enforcement, Location, Mode, Outcome,
    PolicyDirection, PolicyRule, PolicyVerdict, Prefix, Program, TraceReason, Verdict,
    test_helpers::{V4, ipv4, proto, tcp},
    uses_tcx,
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

/// Source of the `BPF_PROG_TEST_RUN` packets below (identity `ID_CLIENT` in the ipcache).
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
/// Destination: the endpoint behind ifindex 1 (`lo`, present in every namespace).
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 6);
const ID_CLIENT: u32 = 1000;
const ID_SERVER: u32 = 2000;

/// A datapath whose endpoint on `lo` (identity `ID_SERVER`) enforces ingress and allows TCP
/// port 80 from `ID_CLIENT`; `trace` sets the trace flag.
fn policy_runner(root: &PinRoot, trace: bool) -> Datapath {
    let mut dp = Datapath::load(&root.0).expect("load");
    dp.config
        .set(DatapathConfig {
            mode: Mode::None,
            trace,
            ..DatapathConfig::default()
        })
        .expect("config");
    dp.ipcache
        .insert(
            Prefix::host(IpAddr::V4(CLIENT)),
            ID_CLIENT,
            Location::LocalPod,
        )
        .expect("ipcache");
    dp.endpoints
        .insert(
            1,
            ID_SERVER,
            Enforcement {
                ingress: true,
                egress: false,
            },
        )
        .expect("endpoint");
    dp.policy
        .insert(
            PolicyRule {
                subject: ID_SERVER,
                peer: Some(ID_CLIENT),
                protocol: Some(proto::TCP),
                port: Some(80),
                direction: PolicyDirection::Ingress,
            },
            PolicyVerdict::Allow,
        )
        .expect("allow");
    let _ = dp.events.drain();
    dp
}

fn tcp_to_server(port: u16) -> Vec<u8> {
    ipv4(
        CLIENT,
        SERVER,
        proto::TCP,
        &tcp(41_234, port),
        &V4::default(),
    )
}

/// Every policy decision is counted in `POLICY_VERDICTS` (the source of
/// `nodeseal_policy_verdicts_total`), with tracing off: no trace event is needed for it.
#[test]
fn policy_verdicts_are_counted_for_every_decision() {
    if !require("policy_verdicts_are_counted_for_every_decision", &[]) {
        return;
    }
    let Some(root) = PinRoot::new("verdicts") else {
        return;
    };
    let mut dp = policy_runner(&root, false);
    let before = dp.policy_verdicts.all().expect("verdict counters");
    let allowed = dp
        .test_run(Program::ToPod, &tcp_to_server(80), 1, 0)
        .expect("run allowed");
    assert_eq!(allowed.action, Verdict::PASS, "port 80 is allowed");
    for _ in 0..2 {
        let denied = dp
            .test_run(Program::ToPod, &tcp_to_server(81), 1, 0)
            .expect("run denied");
        assert_eq!(denied.action, Verdict::DROP, "port 81 is not allowed");
    }
    let after = dp.policy_verdicts.all().expect("verdict counters");
    assert_eq!(
        (
            after.ingress_allowed - before.ingress_allowed,
            after.ingress_denied - before.ingress_denied,
            after.egress_allowed - before.egress_allowed,
            after.egress_denied - before.egress_denied,
        ),
        (1, 2, 0, 0),
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        dp.policy_verdicts
            .get(PolicyDirection::Ingress, false)
            .expect("one counter"),
        after.ingress_denied
    );
    // Tracing off: only the two drops produced events.
    let events: Vec<_> = dp
        .events
        .drain()
        .into_iter()
        .map(|e| e.expect("event decodes"))
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e.outcome == Outcome::Drop(DropReason::PolicyDenied))
    );
    // An endpoint that does not enforce: no decision, nothing counted.
    dp.endpoints
        .insert(1, ID_SERVER, Enforcement::default())
        .expect("endpoint");
    dp.test_run(Program::ToPod, &tcp_to_server(81), 1, 0)
        .expect("run unenforced");
    assert_eq!(dp.policy_verdicts.all().expect("counters"), after);
}

/// With the trace flag on (what an `observe` client following forwarded flows turns on), a
/// passed packet produces a trace event that the agent shows as a FORWARDED flow.
#[test]
fn traced_pass_decodes_to_a_forwarded_flow() {
    if !require("traced_pass_decodes_to_a_forwarded_flow", &[]) {
        return;
    }
    let Some(root) = PinRoot::new("trace") else {
        return;
    };
    let mut dp = policy_runner(&root, true);
    let verdict = dp
        .test_run(Program::ToPod, &tcp_to_server(80), 1, 0)
        .expect("run");
    assert_eq!(verdict.action, Verdict::PASS);
    let events: Vec<_> = dp
        .events
        .drain()
        .into_iter()
        .map(|e| e.expect("event decodes"))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].outcome, Outcome::Trace(TraceReason::Pass));
    let flow = Flow::from_event(&events[0], std::time::SystemTime::now(), |id| {
        format!("id={id}")
    });
    assert_eq!(flow.verdict, ObserveVerdict::Forwarded);
    assert_eq!(flow.trace_reason.as_deref(), Some("pass"));
    assert_eq!(flow.program, "to-pod");
    assert_eq!(flow.direction, Some(FlowDirection::Ingress));
    assert_eq!(
        (flow.source.ip, flow.destination.ip),
        (Some(IpAddr::V4(CLIENT)), Some(IpAddr::V4(SERVER)))
    );
    assert_eq!(
        (flow.source.port, flow.destination.port),
        (Some(41_234), Some(80))
    );
    assert_eq!(
        (flow.source.identity, flow.destination.identity),
        (ID_CLIENT, ID_SERVER)
    );
    assert_eq!(flow.source.labels, format!("id={ID_CLIENT}"));
    assert_eq!(flow.protocol, "TCP");
    assert!(!flow.encrypted);
    // A denied packet with tracing on is still a drop, never a trace.
    dp.test_run(Program::ToPod, &tcp_to_server(81), 1, 0)
        .expect("run denied");
    let events: Vec<_> = dp
        .events
        .drain()
        .into_iter()
        .map(|e| e.expect("event decodes"))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let flow = Flow::from_event(&events[0], std::time::SystemTime::now(), |_| String::new());
    assert_eq!(flow.verdict, ObserveVerdict::Dropped);
    assert_eq!(flow.drop_reason.as_deref(), Some("policy_denied"));
}
