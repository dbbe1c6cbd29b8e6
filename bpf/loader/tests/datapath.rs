//! BPF_PROG_TEST_RUN table tests on the host kernel: crafted packets × map states → verdict,
//! mark, counter increments and events. Needs root and BPF; skips with a reason otherwise
//! (fails instead with NODESEAL_REQUIRE_PRIVILEGED=1).
//!
//! Frames shorter than Ethernet + the bare IPv4/IPv6 header are refused by the kernel's
//! BPF_PROG_TEST_RUN itself (EINVAL), so truncation is exercised at the points the test runner
//! accepts: IPv4 total length beyond the frame, L4 headers and IPv6 extension headers cut short.
//! The programs treat a cut IP header through the same failed-load path (`truncated`).
#![expect(
    clippy::expect_used,
    reason = "test set-up helpers panic with context, like the tests"
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nodeseal_bpf::{
    Datapath, DatapathConfig, DropReason, Enforcement, LoadError, Location, Mode, NodeId, Outcome,
    Policy, PolicyDirection, PolicyRule, PolicyVerdict, Prefix, Program, Verdict, identity, mark,
    test_helpers::{
        BPF_MAP_TYPE_ARRAY, Ext, TestPinRoot, V4, esp, ethernet, icmp, ipv4, ipv6, pin_scratch_map,
        privileged_or_skip, proto, tcp, udp,
    },
};

/// `lo`: exists in every network namespace, so BPF_PROG_TEST_RUN accepts it.
const IFINDEX: u32 = 1;
const POD_A: u32 = 1000;
const POD_B: u32 = 2000;
const PEER: NodeId = NodeId(7);
const SLOT: u8 = 3;

const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
const LOCAL_POD2: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 6);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 9);
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 7);
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 99);
const WORLD: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);
const LOCAL_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 5);
const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 9);
const PEER_NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 7);

#[derive(Clone, Copy, Debug)]
enum Expect {
    Pass { mark: u32 },
    Drop(DropReason),
}

struct Case {
    name: &'static str,
    program: Program,
    frame: Vec<u8>,
    mark_in: u32,
    expect: Expect,
}

fn case(name: &'static str, program: Program, frame: Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        program,
        frame,
        mark_in: 0,
        expect,
    }
}

fn v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv4(src, dst, protocol, l4, &V4::default())
}

fn ip(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

fn prefix(a: impl Into<IpAddr>, len: u8) -> Prefix {
    Prefix::new(a.into(), len).expect("valid prefix")
}

/// Node with pod CIDR 10.0.1.0/24 (fd00:1::/64), one peer (node 7: 192.168.0.7, fd00:ff::7,
/// pods 10.0.2.0/24 and fd00:2::/64) with key slot 3 ready, IPsec, strict both ways, and the
/// local pod A (identity 1000) behind ifindex 1.
fn base_state(dp: &mut Datapath) {
    dp.config
        .set(DatapathConfig {
            mode: Mode::Ipsec,
            local_node: Some(NodeId(1)),
            strict_egress: true,
            strict_ingress: true,
            ..DatapathConfig::default()
        })
        .expect("config");
    let c = &mut dp.ipcache;
    c.insert(
        prefix(Ipv4Addr::new(10, 0, 1, 0), 24),
        POD_A,
        Location::LocalPod,
    )
    .expect("local v4");
    c.insert(
        prefix(Ipv4Addr::new(10, 0, 2, 0), 24),
        POD_B,
        Location::RemotePod(PEER),
    )
    .expect("remote v4");
    c.insert(
        Prefix::host(ip(PEER_NODE)),
        identity::REMOTE_NODE,
        Location::RemoteNode(PEER),
    )
    .expect("peer node");
    c.insert(prefix(LOCAL_POD6, 64), POD_A, Location::LocalPod)
        .expect("local v6");
    c.insert(prefix(REMOTE_POD6, 64), POD_B, Location::RemotePod(PEER))
        .expect("remote v6");
    dp.nodes.insert(ip(PEER_NODE), PEER).expect("node v4");
    dp.nodes.insert(PEER_NODE6.into(), PEER).expect("node v6");
    dp.peer_slots.set(PEER, Some(SLOT)).expect("slot");
    dp.endpoints
        .insert(IFINDEX, POD_A, Enforcement::default())
        .expect("endpoint");
}

fn counts(dp: &Datapath) -> Vec<(DropReason, u64)> {
    dp.counters.all().expect("counters")
}

fn check(dp: &mut Datapath, c: &Case) {
    let _ = dp.events.drain();
    let before = counts(dp);
    let v = dp
        .test_run(c.program, &c.frame, IFINDEX, c.mark_in)
        .unwrap_or_else(|e| panic!("{}: test run: {e:?}", c.name));
    let after = counts(dp);
    let events = dp.events.drain();
    let drops: Vec<_> = events
        .iter()
        .map(|e| {
            e.as_ref()
                .unwrap_or_else(|e| panic!("{}: bad event {e}", c.name))
        })
        .filter(|e| matches!(e.outcome, Outcome::Drop(_)))
        .collect();
    match c.expect {
        Expect::Pass { mark } => {
            assert_eq!(
                v,
                Verdict {
                    action: Verdict::PASS,
                    mark
                },
                "{}: expected pass with mark {mark:#x}",
                c.name
            );
            assert_eq!(before, after, "{}: a pass must not count a drop", c.name);
            assert!(drops.is_empty(), "{}: a pass must not emit drops", c.name);
        }
        Expect::Drop(reason) => {
            assert_eq!(
                v.action,
                Verdict::DROP,
                "{}: expected drop {reason:?}",
                c.name
            );
            for ((r, b), (_, a)) in before.iter().zip(&after) {
                let want = if *r == reason { b + 1 } else { *b };
                assert_eq!(*a, want, "{}: counter {r:?}", c.name);
            }
            assert_eq!(drops.len(), 1, "{}: one drop event", c.name);
            assert_eq!(drops[0].outcome, Outcome::Drop(reason), "{}: event", c.name);
            assert_eq!(drops[0].program, c.program, "{}: event program", c.name);
        }
    }
}

fn load(name: &str) -> Option<(TestPinRoot, Datapath)> {
    if !privileged_or_skip(name) {
        return None;
    }
    let root = TestPinRoot::new(name);
    let mut dp = root.load().expect("load datapath (verifier)");
    base_state(&mut dp);
    Some((root, dp))
}

const ENC: Expect = Expect::Pass {
    mark: mark::encrypt(PEER.0, SLOT),
};
const CLEAR: Expect = Expect::Pass { mark: 0 };

#[test]
fn from_pod_encryption_and_parsing() {
    let Some((_root, mut dp)) = load("from_pod_table") else {
        return;
    };
    let p = Program::FromPod;
    let with_opts = V4 {
        options: vec![0x94, 0x04, 0, 0, 1, 1, 1, 0], // router alert + NOPs
        ..V4::default()
    };
    let later_frag = V4 {
        frag_offset: 185,
        ..V4::default()
    };
    let first_frag = V4 {
        more_fragments: true,
        ..V4::default()
    };
    let mut bad_ihl = v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80));
    bad_ihl[14] = 0x44;
    let mut bad_version = v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80));
    bad_version[14] = 0x65;
    let mut total_too_long = v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80));
    total_too_long[16..18].copy_from_slice(&200u16.to_be_bytes());
    let mut total_below_ihl = v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80));
    total_below_ihl[16..18].copy_from_slice(&10u16.to_be_bytes());
    let nine_ext = vec![Ext::DestOpts; 9];
    let eight_ext = vec![Ext::DestOpts; 8];
    let cases = [
        case(
            "v4 tcp to remote pod",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(40000, 80)),
            ENC,
        ),
        case(
            "v4 udp to remote pod",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::UDP, &udp(40000, 53)),
            ENC,
        ),
        case(
            "v4 icmp to remote pod",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::ICMP, &icmp(8, 0)),
            ENC,
        ),
        case(
            "v4 esp (nested) to remote pod",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::ESP, &esp(0x1000)),
            ENC,
        ),
        case(
            "v4 gre (no ports) to remote pod",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::GRE, &[0; 8]),
            ENC,
        ),
        case(
            "v4 with options",
            p,
            ipv4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80), &with_opts),
            ENC,
        ),
        case(
            "v4 first fragment",
            p,
            ipv4(LOCAL_POD, REMOTE_POD, proto::UDP, &udp(1, 53), &first_frag),
            ENC,
        ),
        case(
            "v4 later fragment",
            p,
            ipv4(LOCAL_POD, REMOTE_POD, proto::UDP, &[7; 16], &later_frag),
            ENC,
        ),
        case(
            "v4 to local pod",
            p,
            v4(LOCAL_POD, LOCAL_POD2, proto::TCP, &tcp(1, 80)),
            CLEAR,
        ),
        case(
            "v4 to world",
            p,
            v4(LOCAL_POD, WORLD, proto::TCP, &tcp(1, 443)),
            CLEAR,
        ),
        case(
            "v4 to peer node ip (no node encryption)",
            p,
            v4(LOCAL_POD, PEER_NODE, proto::TCP, &tcp(1, 10250)),
            CLEAR,
        ),
        case(
            "v6 tcp to remote pod",
            p,
            ipv6(LOCAL_POD6, REMOTE_POD6, proto::TCP, &tcp(1, 80), &[]),
            ENC,
        ),
        case(
            "v6 udp to remote pod",
            p,
            ipv6(LOCAL_POD6, REMOTE_POD6, proto::UDP, &udp(1, 53), &[]),
            ENC,
        ),
        case(
            "v6 icmpv6 to remote pod",
            p,
            ipv6(LOCAL_POD6, REMOTE_POD6, proto::ICMPV6, &icmp(128, 0), &[]),
            ENC,
        ),
        case(
            "v6 hbh+routing+dstopts",
            p,
            ipv6(
                LOCAL_POD6,
                REMOTE_POD6,
                proto::TCP,
                &tcp(1, 80),
                &[Ext::HopByHop, Ext::Routing, Ext::DestOpts],
            ),
            ENC,
        ),
        case(
            "v6 8 ext headers",
            p,
            ipv6(LOCAL_POD6, REMOTE_POD6, proto::TCP, &tcp(1, 80), &eight_ext),
            ENC,
        ),
        case(
            "v6 later fragment",
            p,
            ipv6(
                LOCAL_POD6,
                REMOTE_POD6,
                proto::UDP,
                &[1; 16],
                &[Ext::Fragment {
                    offset: 100,
                    more: false,
                }],
            ),
            ENC,
        ),
        case(
            "v6 first fragment",
            p,
            ipv6(
                LOCAL_POD6,
                REMOTE_POD6,
                proto::UDP,
                &udp(1, 53),
                &[Ext::Fragment {
                    offset: 0,
                    more: true,
                }],
            ),
            ENC,
        ),
        case(
            "v6 to local pod",
            p,
            ipv6(
                LOCAL_POD6,
                Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 6),
                proto::TCP,
                &tcp(1, 80),
                &[],
            ),
            CLEAR,
        ),
        case("arp", p, ethernet(0x0806, &[0; 28]), CLEAR),
        case(
            "vlan-tagged frame",
            p,
            ethernet(0x8100, &[0; 46]),
            Expect::Drop(DropReason::UnsupportedL3),
        ),
        case(
            "v4 ihl < 5",
            p,
            bad_ihl,
            Expect::Drop(DropReason::Malformed),
        ),
        case(
            "v4 ethertype, v6 header",
            p,
            bad_version,
            Expect::Drop(DropReason::Malformed),
        ),
        case(
            "v4 total length beyond frame",
            p,
            total_too_long,
            Expect::Drop(DropReason::Truncated),
        ),
        case(
            "v4 total length below header",
            p,
            total_below_ihl,
            Expect::Drop(DropReason::Malformed),
        ),
        case(
            "v4 tcp header cut short",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &[0, 1]),
            Expect::Drop(DropReason::Truncated),
        ),
        case(
            "v6 9 ext headers",
            p,
            ipv6(LOCAL_POD6, REMOTE_POD6, proto::TCP, &tcp(1, 80), &nine_ext),
            Expect::Drop(DropReason::Ipv6ExtensionChain),
        ),
        case(
            "v6 ext header cut short",
            p,
            ipv6(LOCAL_POD6, REMOTE_POD6, 0, &[], &[]),
            Expect::Drop(DropReason::Truncated),
        ),
    ];
    for c in &cases {
        check(&mut dp, c);
    }

    // The mark keeps bits nodeseal does not own.
    let mut keep = case(
        "foreign mark bits kept",
        p,
        v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80)),
        Expect::Pass {
            mark: mark::encrypt(PEER.0, SLOT) | 0x42,
        },
    );
    keep.mark_in = 0x42;
    check(&mut dp, &keep);

    // Key switch is one map write.
    dp.peer_slots.set(PEER, Some(4)).expect("slot 4");
    check(
        &mut dp,
        &case(
            "after key switch",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80)),
            Expect::Pass {
                mark: mark::encrypt(PEER.0, 4),
            },
        ),
    );

    // No ready SA: strict drops, non-strict sends in clear.
    dp.peer_slots.set(PEER, None).expect("not ready");
    check(
        &mut dp,
        &case(
            "no SA, strict",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80)),
            Expect::Drop(DropReason::NoSa),
        ),
    );
    check(
        &mut dp,
        &case(
            "no SA, strict, v6",
            p,
            ipv6(LOCAL_POD6, REMOTE_POD6, proto::TCP, &tcp(1, 80), &[]),
            Expect::Drop(DropReason::NoSa),
        ),
    );
    check(
        &mut dp,
        &case(
            "no SA, local destination unaffected",
            p,
            v4(LOCAL_POD, LOCAL_POD2, proto::TCP, &tcp(1, 80)),
            CLEAR,
        ),
    );
    let mut cfg = dp.config.get().expect("config");
    cfg.strict_egress = false;
    dp.config.set(cfg).expect("config");
    check(
        &mut dp,
        &case(
            "no SA, not strict",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80)),
            CLEAR,
        ),
    );

    // Node encryption covers remote node IPs.
    dp.peer_slots.set(PEER, Some(SLOT)).expect("slot");
    cfg.node_encryption = true;
    dp.config.set(cfg).expect("config");
    check(
        &mut dp,
        &case(
            "peer node ip with node encryption",
            p,
            v4(LOCAL_POD, PEER_NODE, proto::TCP, &tcp(1, 10250)),
            ENC,
        ),
    );

    // WireGuard mode: routing steers; no marks.
    cfg.mode = Mode::Wireguard;
    dp.config.set(cfg).expect("config");
    check(
        &mut dp,
        &case(
            "wireguard: no mark",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80)),
            CLEAR,
        ),
    );

    // Unknown endpoint.
    dp.endpoints.remove(IFINDEX).expect("remove endpoint");
    check(
        &mut dp,
        &case(
            "unknown endpoint",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80)),
            Expect::Drop(DropReason::UnknownEndpoint),
        ),
    );
}

fn rule(
    subject: u32,
    peer: Option<u32>,
    protocol: Option<u8>,
    port: Option<u16>,
    direction: PolicyDirection,
) -> PolicyRule {
    PolicyRule {
        subject,
        peer,
        protocol,
        port,
        direction,
    }
}

fn allow(policy: &mut Policy, r: PolicyRule) {
    policy.insert(r, PolicyVerdict::Allow).expect("allow");
}

#[test]
fn from_pod_egress_policy() {
    let Some((_root, mut dp)) = load("egress_policy") else {
        return;
    };
    let p = Program::FromPod;
    dp.endpoints
        .insert(
            IFINDEX,
            POD_A,
            Enforcement {
                ingress: false,
                egress: true,
            },
        )
        .expect("enforce egress");
    let egress = PolicyDirection::Egress;
    let tcp80 = || v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(40000, 80));
    check(
        &mut dp,
        &case(
            "enforced, no rules",
            p,
            tcp80(),
            Expect::Drop(DropReason::PolicyDenied),
        ),
    );
    allow(
        &mut dp.policy,
        rule(POD_A, Some(POD_B), Some(proto::TCP), Some(80), egress),
    );
    let later = V4 {
        frag_offset: 10,
        ..V4::default()
    };
    let pmtu = v4(LOCAL_POD, REMOTE_POD, proto::ICMP, &icmp(3, 4));
    let cases = [
        case("allowed port", p, tcp80(), ENC),
        case(
            "other port",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(40000, 81)),
            Expect::Drop(DropReason::PolicyDenied),
        ),
        case(
            "other protocol",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::UDP, &udp(40000, 80)),
            Expect::Drop(DropReason::PolicyDenied),
        ),
        case(
            "other peer (world)",
            p,
            v4(LOCAL_POD, WORLD, proto::TCP, &tcp(40000, 80)),
            Expect::Drop(DropReason::PolicyDenied),
        ),
        case(
            "later fragment vs port rule",
            p,
            ipv4(LOCAL_POD, REMOTE_POD, proto::TCP, &[0; 16], &later),
            Expect::Drop(DropReason::FragmentNoPorts),
        ),
        case("icmp frag-needed always passes", p, pmtu, ENC),
        case(
            "icmp echo not allowed",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::ICMP, &icmp(8, 0)),
            Expect::Drop(DropReason::PolicyDenied),
        ),
        case(
            "v6 allowed port",
            p,
            ipv6(LOCAL_POD6, REMOTE_POD6, proto::TCP, &tcp(1, 80), &[]),
            ENC,
        ),
    ];
    for c in &cases {
        check(&mut dp, c);
    }
    // Protocol-wide allow lets later fragments through.
    allow(
        &mut dp.policy,
        rule(POD_A, Some(POD_B), Some(proto::TCP), None, egress),
    );
    check(
        &mut dp,
        &case(
            "later fragment vs protocol rule",
            p,
            ipv4(LOCAL_POD, REMOTE_POD, proto::TCP, &[0; 16], &later),
            ENC,
        ),
    );
    // A more specific deny wins over the broader allow.
    dp.policy
        .insert(
            rule(POD_A, Some(POD_B), Some(proto::TCP), Some(22), egress),
            PolicyVerdict::Deny,
        )
        .expect("deny 22");
    check(
        &mut dp,
        &case(
            "specific deny",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 22)),
            Expect::Drop(DropReason::PolicyDenied),
        ),
    );
    check(
        &mut dp,
        &case(
            "broader allow",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 23)),
            ENC,
        ),
    );
    // Any-peer wildcard.
    allow(
        &mut dp.policy,
        rule(POD_A, None, Some(proto::UDP), Some(53), egress),
    );
    check(
        &mut dp,
        &case(
            "any-peer dns",
            p,
            v4(LOCAL_POD, WORLD, proto::UDP, &udp(1, 53)),
            CLEAR,
        ),
    );
    // The drop event names both identities and the flow.
    let _ = dp.events.drain();
    let v = dp
        .test_run(
            p,
            &v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(40000, 22)),
            IFINDEX,
            0,
        )
        .expect("run");
    assert_eq!(v.action, Verdict::DROP);
    let events = dp.events.drain();
    let e = events[0].as_ref().expect("event");
    assert_eq!(e.outcome, Outcome::Drop(DropReason::PolicyDenied));
    assert_eq!((e.src_identity, e.dst_identity), (POD_A, POD_B));
    assert_eq!((e.src, e.dst), (Some(ip(LOCAL_POD)), Some(ip(REMOTE_POD))));
    assert_eq!(
        (e.protocol, e.src_port, e.dst_port),
        (proto::TCP, 40000, 22)
    );
    assert_eq!(e.ip_version, 4);
    assert_eq!(e.ifindex, IFINDEX);
    assert_eq!(e.program, Program::FromPod);
    assert!(dp.counters.get(DropReason::PolicyDenied).expect("counter") > 0);
    dp.policy
        .remove(rule(POD_A, Some(POD_B), Some(proto::TCP), Some(22), egress))
        .expect("remove deny");
    check(
        &mut dp,
        &case(
            "deny removed",
            p,
            v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 22)),
            ENC,
        ),
    );
}

#[test]
fn from_network_node_authentication_and_strict_ingress() {
    let Some((_root, mut dp)) = load("from_network_table") else {
        return;
    };
    let p = Program::FromNetwork;
    let local_node = Ipv4Addr::new(192, 168, 0, 1);
    let later = V4 {
        frag_offset: 64,
        ..V4::default()
    };
    let mut truncated_total = v4(PEER_NODE, local_node, proto::ESP, &esp(1));
    truncated_total[16..18].copy_from_slice(&400u16.to_be_bytes());
    let dec = Expect::Pass {
        mark: mark::decrypt(PEER.0),
    };
    let cases = [
        case(
            "esp from known node",
            p,
            v4(PEER_NODE, local_node, proto::ESP, &esp(0x1234_5678)),
            dec,
        ),
        case(
            "esp v6 from known node",
            p,
            ipv6(
                PEER_NODE6,
                Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 1),
                proto::ESP,
                &esp(0x1234_5678),
                &[],
            ),
            dec,
        ),
        case(
            "esp v6 after dstopts",
            p,
            ipv6(
                PEER_NODE6,
                Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 1),
                proto::ESP,
                &esp(1),
                &[Ext::DestOpts],
            ),
            dec,
        ),
        case(
            "esp from unknown node",
            p,
            v4(STRANGER, local_node, proto::ESP, &esp(0x1234_5678)),
            Expect::Drop(DropReason::UnknownNode),
        ),
        case(
            "esp later fragment from unknown node",
            p,
            ipv4(STRANGER, local_node, proto::ESP, &[0; 16], &later),
            Expect::Drop(DropReason::UnknownNode),
        ),
        case(
            "plaintext from remote pod",
            p,
            v4(REMOTE_POD, LOCAL_POD, proto::UDP, &udp(1, 53)),
            Expect::Drop(DropReason::Unencrypted),
        ),
        case(
            "plaintext v6 from remote pod",
            p,
            ipv6(REMOTE_POD6, LOCAL_POD6, proto::TCP, &tcp(1, 80), &[]),
            Expect::Drop(DropReason::Unencrypted),
        ),
        case(
            "plaintext icmp from remote pod",
            p,
            v4(REMOTE_POD, LOCAL_POD, proto::ICMP, &icmp(0, 0)),
            Expect::Drop(DropReason::Unencrypted),
        ),
        case(
            "plaintext from peer node ip (handshake)",
            p,
            v4(PEER_NODE, local_node, proto::TCP, &tcp(50000, 4250)),
            CLEAR,
        ),
        case(
            "plaintext from world",
            p,
            v4(WORLD, LOCAL_POD, proto::TCP, &tcp(443, 50000)),
            CLEAR,
        ),
        case("arp", p, ethernet(0x0806, &[0; 28]), CLEAR),
        case("non-ip ethertype", p, ethernet(0x88cc, &[0; 46]), CLEAR),
        case(
            "truncated v4",
            p,
            truncated_total.clone(),
            Expect::Drop(DropReason::Truncated),
        ),
    ];
    for c in &cases {
        check(&mut dp, c);
    }
    // The decrypted inner packet carries our decrypt mark: accepted.
    let mut inner = case(
        "decrypted inner packet",
        p,
        v4(REMOTE_POD, LOCAL_POD, proto::UDP, &udp(1, 53)),
        Expect::Pass {
            mark: mark::decrypt(PEER.0),
        },
    );
    inner.mark_in = mark::decrypt(PEER.0);
    check(&mut dp, &inner);
    // Event of an unencrypted drop names the remote pod's identity and node.
    let _ = dp.events.drain();
    dp.test_run(
        p,
        &v4(REMOTE_POD, LOCAL_POD, proto::UDP, &udp(1, 53)),
        IFINDEX,
        0,
    )
    .expect("run");
    let events = dp.events.drain();
    let e = events[0].as_ref().expect("event");
    assert_eq!((e.src_identity, e.node_id), (POD_B, PEER.0));
    // Revocation: the node leaves NODES, its ESP is refused.
    dp.nodes.remove(ip(PEER_NODE)).expect("revoke");
    check(
        &mut dp,
        &case(
            "esp from revoked node",
            p,
            v4(PEER_NODE, local_node, proto::ESP, &esp(1)),
            Expect::Drop(DropReason::UnknownNode),
        ),
    );
    // Strict ingress off: plaintext from a remote pod passes.
    let mut cfg = dp.config.get().expect("config");
    cfg.strict_ingress = false;
    dp.config.set(cfg).expect("config");
    check(
        &mut dp,
        &case(
            "plaintext, not strict",
            p,
            v4(REMOTE_POD, LOCAL_POD, proto::UDP, &udp(1, 53)),
            CLEAR,
        ),
    );
}

/// Node encryption with strict ingress: plaintext from a remote node IP is dropped
/// (`UnencryptedNode`) unless it is TCP or UDP on a port of `CLEAR_PORTS` (either end), IPv6
/// neighbour discovery or a path-MTU error; the set is replaced whole; ESP, and what the kernel
/// decrypted, pass as before; without node encryption, or without strict ingress, nothing
/// changes.
#[test]
fn from_network_with_node_encryption_drops_plaintext_from_node_ips_but_the_clear_ports() {
    let Some((_root, mut dp)) = load("from_network_node_clear") else {
        return;
    };
    let p = Program::FromNetwork;
    let local_node = Ipv4Addr::new(192, 168, 0, 1);
    let local_node6 = Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 1);
    dp.ipcache
        .insert(
            Prefix::host(PEER_NODE6.into()),
            identity::REMOTE_NODE,
            Location::RemoteNode(PEER),
        )
        .expect("peer node v6");
    dp.clear_ports
        .set(&[(proto::TCP, 4250), (proto::UDP, 51871), (proto::TCP, 6443)])
        .expect("clear ports");
    assert_eq!(
        dp.clear_ports.get(),
        [(proto::TCP, 4250), (proto::TCP, 6443), (proto::UDP, 51871)]
    );
    let mut cfg = dp.config.get().expect("config");
    cfg.node_encryption = true;
    cfg.strict_ingress = true;
    dp.config.set(cfg).expect("config");
    let drop = Expect::Drop(DropReason::UnencryptedNode);
    let dec = Expect::Pass {
        mark: mark::decrypt(PEER.0),
    };
    let cases = [
        case(
            "tcp to a service port",
            p,
            v4(PEER_NODE, local_node, proto::TCP, &tcp(50000, 10250)),
            drop,
        ),
        case(
            "udp to a service port",
            p,
            v4(PEER_NODE, local_node, proto::UDP, &udp(50000, 53)),
            drop,
        ),
        case(
            "icmp echo",
            p,
            v4(PEER_NODE, local_node, proto::ICMP, &icmp(8, 0)),
            drop,
        ),
        case(
            "tcp v6",
            p,
            ipv6(PEER_NODE6, local_node6, proto::TCP, &tcp(50000, 22), &[]),
            drop,
        ),
        case(
            "handshake, to us",
            p,
            v4(PEER_NODE, local_node, proto::TCP, &tcp(50000, 4250)),
            CLEAR,
        ),
        case(
            "handshake, our connection's answer",
            p,
            v4(PEER_NODE, local_node, proto::TCP, &tcp(4250, 50000)),
            CLEAR,
        ),
        case(
            "an exempt port",
            p,
            v4(PEER_NODE, local_node, proto::TCP, &tcp(6443, 50000)),
            CLEAR,
        ),
        case(
            "wireguard's udp",
            p,
            v4(PEER_NODE, local_node, proto::UDP, &udp(51871, 51871)),
            CLEAR,
        ),
        case(
            "the handshake port over udp",
            p,
            v4(PEER_NODE, local_node, proto::UDP, &udp(50000, 4250)),
            drop,
        ),
        case(
            "neighbour solicitation",
            p,
            ipv6(PEER_NODE6, local_node6, proto::ICMPV6, &icmp(135, 0), &[]),
            CLEAR,
        ),
        case(
            "fragmentation needed",
            p,
            v4(PEER_NODE, local_node, proto::ICMP, &icmp(3, 4)),
            CLEAR,
        ),
        case(
            "esp",
            p,
            v4(PEER_NODE, local_node, proto::ESP, &esp(0x1234_5678)),
            dec,
        ),
        case(
            "plaintext from world",
            p,
            v4(WORLD, local_node, proto::TCP, &tcp(443, 50000)),
            CLEAR,
        ),
    ];
    for c in &cases {
        check(&mut dp, c);
    }
    // Replacing the set takes the old ports out.
    dp.clear_ports
        .set(&[(proto::TCP, 4250)])
        .expect("clear ports");
    check(
        &mut dp,
        &case(
            "a port no longer exempt",
            p,
            v4(PEER_NODE, local_node, proto::TCP, &tcp(6443, 50000)),
            drop,
        ),
    );
    for (node_encryption, strict_ingress) in [(false, true), (true, false)] {
        cfg.node_encryption = node_encryption;
        cfg.strict_ingress = strict_ingress;
        dp.config.set(cfg).expect("config");
        check(
            &mut dp,
            &case(
                "node encryption and strict ingress not both on",
                p,
                v4(PEER_NODE, local_node, proto::TCP, &tcp(50000, 10250)),
                CLEAR,
            ),
        );
    }
}

/// Plaintext on the uplink whose source claims this node's own pod CIDRs is forged: dropped
/// with `LocalSourceSpoof` whenever encryption is on, strict or not. A revoked node's pod
/// CIDRs stay in the ipcache as `RevokedPod`: plaintext from them is dropped with
/// `RevokedSource` (also with strict ingress off, unlike a member's), traffic to them never
/// gets an encrypt mark and is dropped in strict egress.
#[test]
fn from_network_refuses_local_source_spoofs_and_revoked_nodes() {
    let Some((_root, mut dp)) = load("spoof_table") else {
        return;
    };
    let net = Program::FromNetwork;
    let pod = Program::FromPod;
    let local_spoof = Ipv4Addr::new(10, 0, 1, 77);
    let local_spoof6 = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x77);
    let revoked_pod = Ipv4Addr::new(10, 0, 3, 9);
    let revoked_pod6 = Ipv6Addr::new(0xfd00, 3, 0, 0, 0, 0, 0, 9);
    let revoked = NodeId(8);
    let revoked_node = Ipv4Addr::new(192, 168, 0, 8);
    // node 8 was a member with a ready slot, then got revoked: its pod CIDRs are rewritten as
    // revoked, its node IP leaves NODES (its slot is left ready on purpose: the revoked flag
    // alone must keep traffic from being marked for it).
    dp.peer_slots.set(revoked, Some(SLOT)).expect("slot");
    dp.ipcache
        .insert(
            prefix(revoked_pod, 24),
            identity::WORLD,
            Location::RevokedPod,
        )
        .expect("revoked v4");
    dp.ipcache
        .insert(
            prefix(revoked_pod6, 64),
            identity::WORLD,
            Location::RevokedPod,
        )
        .expect("revoked v6");
    assert_eq!(
        dp.ipcache.lookup(ip(revoked_pod)).expect("lookup"),
        Some((identity::WORLD, Location::RevokedPod))
    );
    let strict_cases = [
        case(
            "plaintext udp from a local pod address",
            net,
            v4(local_spoof, LOCAL_POD, proto::UDP, &udp(1, 53)),
            Expect::Drop(DropReason::LocalSourceSpoof),
        ),
        case(
            "plaintext v6 from a local pod address",
            net,
            ipv6(local_spoof6, LOCAL_POD6, proto::TCP, &tcp(1, 80), &[]),
            Expect::Drop(DropReason::LocalSourceSpoof),
        ),
        case(
            "plaintext udp from a revoked node's pod",
            net,
            v4(revoked_pod, LOCAL_POD, proto::UDP, &udp(1, 53)),
            Expect::Drop(DropReason::RevokedSource),
        ),
        case(
            "plaintext v6 from a revoked node's pod",
            net,
            ipv6(revoked_pod6, LOCAL_POD6, proto::UDP, &udp(1, 53), &[]),
            Expect::Drop(DropReason::RevokedSource),
        ),
        case(
            "esp from the revoked node",
            net,
            v4(
                revoked_node,
                Ipv4Addr::new(192, 168, 0, 1),
                proto::ESP,
                &esp(1),
            ),
            Expect::Drop(DropReason::UnknownNode),
        ),
        case(
            "to a revoked node's pod, strict egress",
            pod,
            v4(LOCAL_POD, revoked_pod, proto::UDP, &udp(1, 53)),
            Expect::Drop(DropReason::NoSa),
        ),
        // A member's plaintext is still what it was: refused as unencrypted in strict mode.
        case(
            "plaintext from a member's pod",
            net,
            v4(REMOTE_POD, LOCAL_POD, proto::UDP, &udp(1, 53)),
            Expect::Drop(DropReason::Unencrypted),
        ),
    ];
    for c in &strict_cases {
        check(&mut dp, c);
    }
    // The drop event names what the ipcache knows of the forged source.
    let _ = dp.events.drain();
    dp.test_run(
        net,
        &v4(local_spoof, LOCAL_POD, proto::UDP, &udp(1, 53)),
        IFINDEX,
        0,
    )
    .expect("run");
    let events = dp.events.drain();
    let e = events[0].as_ref().expect("event");
    assert_eq!(e.outcome, Outcome::Drop(DropReason::LocalSourceSpoof));
    assert_eq!(e.src_identity, POD_A);

    // Strict off both ways: a member's plaintext passes, forged local sources and revoked
    // nodes' pods do not; traffic to a revoked node's pods goes in clear, never marked.
    let mut cfg = dp.config.get().expect("config");
    cfg.strict_ingress = false;
    cfg.strict_egress = false;
    dp.config.set(cfg).expect("config");
    let lax_cases = [
        case(
            "plaintext from a local pod address, not strict",
            net,
            v4(local_spoof, LOCAL_POD, proto::UDP, &udp(1, 53)),
            Expect::Drop(DropReason::LocalSourceSpoof),
        ),
        case(
            "plaintext from a revoked node's pod, not strict",
            net,
            v4(revoked_pod, LOCAL_POD, proto::UDP, &udp(1, 53)),
            Expect::Drop(DropReason::RevokedSource),
        ),
        case(
            "plaintext from a member's pod, not strict",
            net,
            v4(REMOTE_POD, LOCAL_POD, proto::UDP, &udp(1, 53)),
            CLEAR,
        ),
        case(
            "to a revoked node's pod, not strict",
            pod,
            v4(LOCAL_POD, revoked_pod, proto::UDP, &udp(1, 53)),
            CLEAR,
        ),
        case(
            "to a member's pod, not strict",
            pod,
            v4(LOCAL_POD, REMOTE_POD, proto::UDP, &udp(1, 53)),
            ENC,
        ),
    ];
    for c in &lax_cases {
        check(&mut dp, c);
    }

    // Revoking a member rewrites its prefix in place: from then on its pods' plaintext is
    // refused as revoked, and its still-ready slot is never used.
    dp.ipcache
        .insert(
            prefix(Ipv4Addr::new(10, 0, 2, 0), 24),
            identity::WORLD,
            Location::RevokedPod,
        )
        .expect("revoke member");
    check(
        &mut dp,
        &case(
            "plaintext from a just-revoked member's pod",
            net,
            v4(REMOTE_POD, LOCAL_POD, proto::UDP, &udp(1, 53)),
            Expect::Drop(DropReason::RevokedSource),
        ),
    );
    check(
        &mut dp,
        &case(
            "to a just-revoked member's pod",
            pod,
            v4(LOCAL_POD, REMOTE_POD, proto::UDP, &udp(1, 53)),
            CLEAR,
        ),
    );

    // Encryption off: nothing of ours to police.
    cfg.mode = Mode::None;
    dp.config.set(cfg).expect("config");
    for (name, src) in [
        ("local pod address, encryption off", local_spoof),
        ("revoked pod, encryption off", revoked_pod),
    ] {
        check(
            &mut dp,
            &case(
                name,
                net,
                v4(src, LOCAL_POD, proto::UDP, &udp(1, 53)),
                CLEAR,
            ),
        );
    }
}

#[test]
fn to_pod_ingress_policy() {
    let Some((_root, mut dp)) = load("to_pod_table") else {
        return;
    };
    let p = Program::ToPod;
    let ping = || v4(REMOTE_POD, LOCAL_POD, proto::ICMP, &icmp(8, 0));
    check(&mut dp, &case("not enforced", p, ping(), CLEAR));
    dp.endpoints
        .insert(
            IFINDEX,
            POD_A,
            Enforcement {
                ingress: true,
                egress: false,
            },
        )
        .expect("enforce ingress");
    check(
        &mut dp,
        &case(
            "enforced, no rules",
            p,
            ping(),
            Expect::Drop(DropReason::PolicyDenied),
        ),
    );
    let _ = dp.events.drain();
    dp.test_run(p, &ping(), IFINDEX, 0).expect("run");
    let events = dp.events.drain();
    let e = events[0].as_ref().expect("event");
    assert_eq!(
        (e.src_identity, e.dst_identity),
        (POD_B, POD_A),
        "event identities"
    );
    assert_eq!(e.program, Program::ToPod);
    assert_eq!(e.dst_port, 8, "icmp type in the port slot");

    let ingress = PolicyDirection::Ingress;
    allow(
        &mut dp.policy,
        rule(POD_A, Some(POD_B), Some(proto::ICMP), Some(8), ingress),
    );
    check(&mut dp, &case("echo allowed", p, ping(), CLEAR));
    check(
        &mut dp,
        &case(
            "tcp still denied",
            p,
            v4(REMOTE_POD, LOCAL_POD, proto::TCP, &tcp(1, 80)),
            Expect::Drop(DropReason::PolicyDenied),
        ),
    );
    check(
        &mut dp,
        &case(
            "world denied",
            p,
            v4(WORLD, LOCAL_POD, proto::ICMP, &icmp(8, 0)),
            Expect::Drop(DropReason::PolicyDenied),
        ),
    );
    allow(&mut dp.policy, rule(POD_A, None, None, None, ingress));
    check(
        &mut dp,
        &case(
            "allow all",
            p,
            v4(WORLD, LOCAL_POD, proto::TCP, &tcp(1, 80)),
            CLEAR,
        ),
    );
    check(
        &mut dp,
        &case(
            "v6 allow all",
            p,
            ipv6(REMOTE_POD6, LOCAL_POD6, proto::UDP, &udp(1, 80), &[]),
            CLEAR,
        ),
    );
    check(
        &mut dp,
        &case(
            "truncated still dropped",
            p,
            v4(REMOTE_POD, LOCAL_POD, proto::TCP, &[0]),
            Expect::Drop(DropReason::Truncated),
        ),
    );
    dp.policy
        .replace_all(Vec::<(PolicyRule, PolicyVerdict)>::new())
        .expect("no rules");
    let from_world6 = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    for (kind, expect) in [
        (133, CLEAR),
        (135, CLEAR),
        (136, CLEAR),
        (128, Expect::Drop(DropReason::PolicyDenied)),
    ] {
        check(
            &mut dp,
            &case(
                "neighbour discovery passes, echo does not",
                p,
                ipv6(from_world6, LOCAL_POD6, proto::ICMPV6, &icmp(kind, 0), &[]),
                expect,
            ),
        );
    }
    dp.endpoints.remove(IFINDEX).expect("remove");
    check(&mut dp, &case("unmanaged interface", p, ping(), CLEAR));
}

/// Replies pass the policy of the other direction without a rule; nothing else does.
#[test]
fn replies_pass_the_policy_of_the_other_direction() {
    let Some((_root, mut dp)) = load("conntrack_table") else {
        return;
    };
    dp.endpoints
        .insert(
            IFINDEX,
            POD_A,
            Enforcement {
                ingress: true,
                egress: true,
            },
        )
        .expect("enforce both ways");
    let (egress, ingress) = (PolicyDirection::Egress, PolicyDirection::Ingress);
    allow(
        &mut dp.policy,
        rule(POD_A, Some(POD_B), Some(proto::TCP), Some(80), egress),
    );
    allow(
        &mut dp.policy,
        rule(POD_A, Some(POD_B), Some(proto::ICMP), Some(8), egress),
    );
    allow(
        &mut dp.policy,
        rule(POD_A, Some(POD_B), Some(proto::UDP), Some(53), ingress),
    );
    let (out, inn) = (Program::FromPod, Program::ToPod);
    let denied = Expect::Drop(DropReason::PolicyDenied);
    let from_b = |protocol, l4: &[u8]| v4(REMOTE_POD, LOCAL_POD, protocol, l4);
    let to_b = |protocol, l4: &[u8]| v4(LOCAL_POD, REMOTE_POD, protocol, l4);
    let echo_reply_of = |id: u8| vec![0, 0, 0, 0, 0, id, 0, 1];
    let cases = [
        // Before A opened anything, B's answers are no replies.
        case(
            "tcp answer unasked",
            inn,
            from_b(proto::TCP, &tcp(80, 40000)),
            denied,
        ),
        case(
            "echo reply unasked",
            inn,
            from_b(proto::ICMP, &icmp(0, 0)),
            denied,
        ),
        // A opens flows its egress policy allows.
        case("tcp out", out, to_b(proto::TCP, &tcp(40000, 80)), ENC),
        case("echo out", out, to_b(proto::ICMP, &icmp(8, 0)), ENC),
        case("tcp reply", inn, from_b(proto::TCP, &tcp(80, 40000)), CLEAR),
        case("echo reply", inn, from_b(proto::ICMP, &icmp(0, 0)), CLEAR),
        // Only the flow's own reply.
        case(
            "other port pair",
            inn,
            from_b(proto::TCP, &tcp(80, 40001)),
            denied,
        ),
        case(
            "same ports, B as client",
            inn,
            from_b(proto::TCP, &tcp(40000, 80)),
            denied,
        ),
        case(
            "other echo id",
            inn,
            from_b(proto::ICMP, &echo_reply_of(2)),
            denied,
        ),
        case(
            "echo request is no reply",
            inn,
            from_b(proto::ICMP, &icmp(8, 0)),
            denied,
        ),
        case(
            "udp on the tcp flow's ports",
            inn,
            from_b(proto::UDP, &udp(80, 40000)),
            denied,
        ),
        // A flow B opens toward A grants A's replies leaving, and only those.
        case("udp in", inn, from_b(proto::UDP, &udp(5000, 53)), CLEAR),
        case("udp reply out", out, to_b(proto::UDP, &udp(53, 5000)), ENC),
        case(
            "udp not a reply out",
            out,
            to_b(proto::UDP, &udp(53, 5001)),
            denied,
        ),
        // An inbound flow does not make its mirror image inbound a reply.
        case("mirror in", inn, from_b(proto::UDP, &udp(53, 5000)), denied),
    ];
    for c in &cases {
        check(&mut dp, c);
    }
}

#[test]
fn pinned_maps_survive_reload() {
    if !privileged_or_skip("pinned_maps_survive_reload") {
        return;
    }
    let root = TestPinRoot::new("reload");
    {
        let mut dp = root.load().expect("first load");
        base_state(&mut dp);
        dp.test_run(Program::FromPod, &ethernet(0x8100, &[0; 46]), IFINDEX, 0)
            .expect("run");
    }
    let dp = root.load().expect("second load");
    assert_eq!(dp.peer_slots.get(PEER).expect("slot"), Some(SLOT));
    assert_eq!(dp.nodes.get(ip(PEER_NODE)).expect("node"), Some(PEER));
    assert_eq!(
        dp.ipcache.lookup(ip(REMOTE_POD)).expect("ipcache"),
        Some((POD_B, Location::RemotePod(PEER)))
    );
    assert_eq!(dp.config.get().expect("config").mode, Mode::Ipsec);
    assert_eq!(
        dp.counters.get(DropReason::UnsupportedL3).expect("counter"),
        1
    );
    // The new programs use the old maps.
    let v = dp
        .test_run(
            Program::FromPod,
            &v4(LOCAL_POD, REMOTE_POD, proto::TCP, &tcp(1, 80)),
            IFINDEX,
            0,
        )
        .expect("run");
    assert_eq!(v.mark, mark::encrypt(PEER.0, SLOT));
}

#[test]
fn load_removes_pins_of_maps_this_version_no_longer_uses() {
    if !privileged_or_skip("obsolete_pins") {
        return;
    }
    let root = TestPinRoot::new("obsolete");
    drop(root.load().expect("first load"));
    for name in ["POLICY", "IPCACHE_EXACT_V4"] {
        pin_scratch_map(&root.path().join(name), BPF_MAP_TYPE_ARRAY, 4, 8);
        assert!(root.path().join(name).exists());
    }
    let _dp = root.load().expect("second load");
    for name in ["POLICY", "IPCACHE_EXACT_V4"] {
        assert!(!root.path().join(name).exists(), "{name} still pinned");
    }
    assert!(
        root.path().join("POLICY_TABLE").exists(),
        "current maps stay pinned"
    );
}

#[test]
fn a_pin_root_has_one_writer_at_a_time() {
    if !privileged_or_skip("pin_root_lock") {
        return;
    }
    let root = TestPinRoot::new("lock");
    let first = root.load().expect("first load");
    match root.load() {
        Err(LoadError::PinDirInUse { path }) => assert_eq!(path, root.path()),
        other => panic!("second writer on a busy pin root: {other:?}"),
    }
    drop(first);
    root.load().expect("load after the first writer is gone");
}
