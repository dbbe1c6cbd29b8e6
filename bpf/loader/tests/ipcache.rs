//! Longest-prefix semantics of the datapath's ipcache (exact hash maps probed per prefix length,
//! or the trie when too many lengths are present) through BPF_PROG_TEST_RUN on the host kernel:
//! nested prefixes, removals, more lengths than the probe list holds, a reload of the pinned
//! maps, and IPv6. The encrypt mark carries the node id of the prefix that matched. Needs root
//! and BPF; skips with a reason otherwise (fails instead with NODESEAL_REQUIRE_PRIVILEGED=1).
#![expect(
    clippy::expect_used,
    reason = "test set-up helpers panic with context, like the tests"
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nodeseal_bpf::{
    Datapath, DatapathConfig, Location, Mode, NodeId, Prefix, Program, Verdict, mark,
    test_helpers::{TestPinRoot, V4, ipv4, ipv6, privileged_or_skip, proto, tcp},
};

/// `lo`: exists in every network namespace.
const IFINDEX: u32 = 1;
const SLOT: u8 = 2;
const SRC: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 5);
const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xaa, 0, 0, 0, 0, 0, 1);

fn setup(dp: &mut Datapath) {
    dp.config
        .set(DatapathConfig {
            mode: Mode::Ipsec,
            ..DatapathConfig::default()
        })
        .expect("config");
    dp.endpoints
        .insert(IFINDEX, 100, nodeseal_bpf::Enforcement::default())
        .expect("endpoint");
    for node in 1..=20 {
        dp.peer_slots.set(NodeId(node), Some(SLOT)).expect("slot");
    }
}

fn add(dp: &mut Datapath, addr: impl Into<IpAddr>, len: u8, node: u16) {
    let prefix = Prefix::new(addr.into(), len).expect("prefix");
    dp.ipcache
        .insert(
            prefix,
            256 + u32::from(node),
            Location::RemotePod(NodeId(node)),
        )
        .expect("insert");
}

fn del(dp: &mut Datapath, addr: impl Into<IpAddr>, len: u8) {
    let prefix = Prefix::new(addr.into(), len).expect("prefix");
    dp.ipcache.remove(prefix).expect("remove");
}

/// The node whose prefix matched `dst` (from the encrypt mark), or `None` for no match.
fn matched(dp: &Datapath, dst: IpAddr) -> Option<u16> {
    let frame = match dst {
        IpAddr::V4(d) => ipv4(SRC, d, proto::TCP, &tcp(1, 80), &V4::default()),
        IpAddr::V6(d) => ipv6(SRC6, d, proto::TCP, &tcp(1, 80), &[]),
    };
    let v = dp
        .test_run(Program::FromPod, &frame, IFINDEX, 0)
        .expect("test run");
    assert_eq!(v.action, Verdict::PASS, "{dst}: not strict, must pass");
    if v.mark == 0 {
        return None;
    }
    let node = (1..=20).find(|n| mark::encrypt(*n, SLOT) == v.mark);
    assert!(node.is_some(), "{dst}: unexpected mark {:#x}", v.mark);
    node
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// The nested /16, /24, /25, /32 set and what each probe address must match.
/// `outside`: what 10.2.0.1 (outside the /16) must match.
fn check_nested(dp: &Datapath, label: &str, outside: Option<u16>) {
    let cases = [
        (v4(10, 1, 9, 9), Some(2)),
        (v4(10, 1, 2, 5), Some(3)),
        (v4(10, 1, 2, 130), Some(4)),
        (v4(10, 1, 2, 200), Some(5)),
        (v4(10, 1, 2, 201), Some(4)),
        (v4(10, 2, 0, 1), outside),
    ];
    for (dst, want) in cases {
        assert_eq!(matched(dp, dst), want, "{label}: {dst}");
    }
}

#[test]
fn longest_prefix_wins_through_exact_maps_and_trie_fallback() {
    let name = "ipcache_lpm";
    if !privileged_or_skip(name) {
        return;
    }
    let root = TestPinRoot::new(name);
    let mut dp = root.load().expect("load datapath");
    setup(&mut dp);
    assert_eq!(matched(&dp, v4(10, 1, 2, 5)), None, "empty ipcache");

    add(&mut dp, Ipv4Addr::new(10, 1, 0, 0), 16, 2);
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 24, 3);
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 128), 25, 4);
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 200), 32, 5);
    check_nested(&dp, "4 lengths", None);

    // Replacing a prefix keeps its length counted once.
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 24, 6);
    assert_eq!(matched(&dp, v4(10, 1, 2, 5)), Some(6), "replaced /24");
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 24, 3);

    // Eight distinct lengths: more than the probe list holds, the trie decides.
    add(&mut dp, Ipv4Addr::new(10, 0, 0, 0), 8, 7);
    add(&mut dp, Ipv4Addr::new(10, 16, 0, 0), 12, 8);
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 23, 9);
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 240), 28, 10);
    check_nested(&dp, "8 lengths", Some(7));
    assert_eq!(matched(&dp, v4(10, 16, 0, 1)), Some(8), "8 lengths: /12");
    assert_eq!(matched(&dp, v4(10, 1, 3, 1)), Some(9), "8 lengths: /23");
    assert_eq!(matched(&dp, v4(10, 1, 2, 241)), Some(10), "8 lengths: /28");

    // Back to four lengths: the exact maps decide again.
    del(&mut dp, Ipv4Addr::new(10, 0, 0, 0), 8);
    del(&mut dp, Ipv4Addr::new(10, 16, 0, 0), 12);
    del(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 23);
    del(&mut dp, Ipv4Addr::new(10, 1, 2, 240), 28);
    check_nested(&dp, "4 lengths again", None);

    // A reload rebuilds the exact maps from the pinned trie.
    drop(dp);
    let mut dp = root.load().expect("reload datapath");
    check_nested(&dp, "after reload", None);

    // Removing the last prefix of a length drops that length.
    del(&mut dp, Ipv4Addr::new(10, 1, 2, 128), 25);
    assert_eq!(matched(&dp, v4(10, 1, 2, 130)), Some(3), "/25 removed");
    del(&mut dp, Ipv4Addr::new(10, 1, 2, 200), 32);
    assert_eq!(matched(&dp, v4(10, 1, 2, 200)), Some(3), "/32 removed");
    del(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 24);
    assert_eq!(matched(&dp, v4(10, 1, 2, 200)), Some(2), "/24 removed");

    // IPv6: nested /48, /64, /128 and a /0 default.
    let net = |x: u16, y: u16| Ipv6Addr::new(0xfd00, x, y, 0, 0, 0, 0, 0);
    add(&mut dp, net(2, 0), 32, 11);
    add(&mut dp, net(2, 3), 48, 12);
    add(&mut dp, Ipv6Addr::new(0xfd00, 2, 3, 0, 0, 0, 0, 9), 128, 13);
    let probe = |x: u16, y: u16, z: u16| IpAddr::V6(Ipv6Addr::new(0xfd00, x, y, 0, 0, 0, 0, z));
    assert_eq!(matched(&dp, probe(2, 3, 9)), Some(13), "v6 /128");
    assert_eq!(matched(&dp, probe(2, 3, 8)), Some(12), "v6 /48");
    assert_eq!(matched(&dp, probe(2, 4, 8)), Some(11), "v6 /32");
    assert_eq!(matched(&dp, probe(3, 4, 8)), None, "v6 no match");
    add(&mut dp, Ipv6Addr::UNSPECIFIED, 0, 14);
    assert_eq!(matched(&dp, probe(3, 4, 8)), Some(14), "v6 /0");
    assert_eq!(matched(&dp, probe(2, 3, 9)), Some(13), "v6 /128 over /0");
}
