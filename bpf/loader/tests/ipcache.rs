//! Longest-prefix semantics of the datapath's ipcache through BPF_PROG_TEST_RUN on the host
//! kernel: the IPv4 arrays (nested prefixes, removals, random prefix sets against a reference
//! longest-prefix match, running out of chunks and back, readers racing writers), the IPv6
//! arrays (random nested prefixes against a reference, readers racing changes of the trie's
//! shape, the state an older loader pinned), a reload of the pinned maps.
//! The encrypt mark carries the node id of the prefix that matched. Needs root and BPF; skips
//! with a reason otherwise (fails instead with NODESEAL_REQUIRE_PRIVILEGED=1).
#![expect(
    clippy::expect_used,
    reason = "test set-up helpers panic with context, like the tests"
)]

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use nodeseal_bpf::{
    Datapath, DatapathConfig, Location, Mode, NodeId, Prefix, Program, Verdict, mark,
    test_helpers::{
        BPF_MAP_TYPE_HASH, TestPinRoot, V4, check_while, ipv4, ipv6, pin_scratch_map,
        privileged_or_skip, proto, tcp,
    },
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
fn longest_prefix_wins() {
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
    assert!(dp.ipcache.ipv4_arrays_in_use());

    // Replacing a prefix keeps its length counted once.
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 24, 6);
    assert_eq!(matched(&dp, v4(10, 1, 2, 5)), Some(6), "replaced /24");
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 24, 3);

    // Eight distinct lengths, overlapping the others.
    add(&mut dp, Ipv4Addr::new(10, 0, 0, 0), 8, 7);
    add(&mut dp, Ipv4Addr::new(10, 16, 0, 0), 12, 8);
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 23, 9);
    add(&mut dp, Ipv4Addr::new(10, 1, 2, 240), 28, 10);
    check_nested(&dp, "8 lengths", Some(7));
    assert_eq!(matched(&dp, v4(10, 16, 0, 1)), Some(8), "8 lengths: /12");
    assert_eq!(matched(&dp, v4(10, 1, 3, 1)), Some(9), "8 lengths: /23");
    assert_eq!(matched(&dp, v4(10, 1, 2, 241)), Some(10), "8 lengths: /28");

    // Back to four lengths.
    del(&mut dp, Ipv4Addr::new(10, 0, 0, 0), 8);
    del(&mut dp, Ipv4Addr::new(10, 16, 0, 0), 12);
    del(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 23);
    del(&mut dp, Ipv4Addr::new(10, 1, 2, 240), 28);
    check_nested(&dp, "4 lengths again", None);

    // A reload rebuilds the arrays and exact maps from the pinned trie.
    drop(dp);
    let mut dp = root.load().expect("reload datapath");
    check_nested(&dp, "after reload", None);
    assert!(dp.ipcache.ipv4_arrays_in_use());

    // Removing the last prefix of a length drops that length.
    del(&mut dp, Ipv4Addr::new(10, 1, 2, 128), 25);
    assert_eq!(matched(&dp, v4(10, 1, 2, 130)), Some(3), "/25 removed");
    del(&mut dp, Ipv4Addr::new(10, 1, 2, 200), 32);
    assert_eq!(matched(&dp, v4(10, 1, 2, 200)), Some(3), "/32 removed");
    del(&mut dp, Ipv4Addr::new(10, 1, 2, 0), 24);
    assert_eq!(matched(&dp, v4(10, 1, 2, 200)), Some(2), "/24 removed");

    // IPv6: nested /32, /48, /128 and a /0 default.
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

/// xorshift64: deterministic test input without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Longest match of `addr` in `prefixes` ((network, len) → node).
fn reference(prefixes: &HashMap<(u32, u8), u16>, addr: u32) -> Option<u16> {
    (0..=32u8).rev().find_map(|len| {
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        prefixes.get(&(addr & mask, len)).copied()
    })
}

#[test]
fn random_prefix_sets_match_a_reference_longest_prefix_match() {
    let name = "ipcache_random";
    if !privileged_or_skip(name) {
        return;
    }
    let root = TestPinRoot::new(name);
    let mut dp = root.load().expect("load datapath");
    setup(&mut dp);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let lens = [
        0u8, 8, 12, 15, 16, 17, 20, 23, 24, 24, 24, 25, 28, 30, 31, 32, 32, 32,
    ];
    let mut prefixes: HashMap<(u32, u8), u16> = HashMap::new();
    for round in 0..6 {
        // Changes: mostly inserts (some replacing a prefix), a third removals.
        for _ in 0..120 {
            let existing: Vec<(u32, u8)> = prefixes.keys().copied().collect();
            if !existing.is_empty() && rng.below(3) == 0 {
                let (addr, len) = existing[rng.below(existing.len() as u64) as usize];
                del(&mut dp, Ipv4Addr::from(addr), len);
                prefixes.remove(&(addr, len));
                continue;
            }
            let len = lens[rng.below(lens.len() as u64) as usize];
            if len == 0 && rng.below(4) != 0 {
                continue;
            }
            // Everything inside 10.0.0.0/14 so prefixes nest and share chunks.
            let addr = 0x0a00_0000 | (rng.next() as u32 & 0x0003_ffff);
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            let node = 1 + rng.below(20) as u16;
            add(&mut dp, Ipv4Addr::from(addr & mask), len, node);
            prefixes.insert((addr & mask, len), node);
        }
        assert!(dp.ipcache.ipv4_arrays_in_use(), "round {round}");
        // Probes: every prefix's first and last address and their neighbours, random addresses.
        let mut probes: Vec<u32> = Vec::new();
        for &(addr, len) in prefixes.keys() {
            let last = addr | !u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            probes.extend([addr, addr.wrapping_sub(1), last, last.wrapping_add(1)]);
        }
        probes.extend((0..200).map(|_| 0x0a00_0000 | (rng.next() as u32 & 0x0003_ffff)));
        for addr in probes {
            let dst = IpAddr::V4(Ipv4Addr::from(addr));
            assert_eq!(
                matched(&dp, dst),
                reference(&prefixes, addr),
                "round {round}: {dst} with {} prefixes",
                prefixes.len()
            );
        }
    }
    // The pinned trie rebuilds the same arrays.
    drop(dp);
    let dp = root.load().expect("reload datapath");
    for _ in 0..300 {
        let addr = 0x0a00_0000 | (rng.next() as u32 & 0x0003_ffff);
        let dst = IpAddr::V4(Ipv4Addr::from(addr));
        assert_eq!(
            matched(&dp, dst),
            reference(&prefixes, addr),
            "reloaded: {dst}"
        );
    }
}

#[test]
fn out_of_chunks_walks_the_trie_until_the_prefixes_fit_again() {
    let name = "ipcache_chunks";
    if !privileged_or_skip(name) {
        return;
    }
    let root = TestPinRoot::new(name);
    let mut dp = root.load().expect("load datapath");
    setup(&mut dp);
    // A host route in each /24 of 10.0.0.0/14 needs one chunk per /16 and one per /24:
    // 4 + 1024 chunks, more than the 1024 the arrays hold.
    let host = |i: u32| Ipv4Addr::from(0x0a00_0000 | i << 8 | 7);
    let node = |i: u32| 1 + (i % 20) as u16;
    add(&mut dp, Ipv4Addr::new(10, 0, 0, 0), 8, 20);
    let mut first_out = None;
    for i in 0..1024 {
        add(&mut dp, host(i), 32, node(i));
        if first_out.is_none() && !dp.ipcache.ipv4_arrays_in_use() {
            first_out = Some(i);
        }
    }
    let first_out = first_out.expect("the arrays never ran out of chunks");
    assert!(
        first_out > 1000,
        "ran out after only {first_out} host routes"
    );
    // The trie answers meanwhile.
    for i in [0, 1, 700, 1023] {
        let h = host(i);
        assert_eq!(matched(&dp, IpAddr::V4(h)), Some(node(i)), "trie: {h}");
        let next = Ipv4Addr::from(u32::from(h) + 1);
        assert_eq!(matched(&dp, IpAddr::V4(next)), Some(20), "trie: {next}");
    }
    // Removing host routes until they fit rebuilds the arrays.
    for i in (512..1024).rev() {
        del(&mut dp, host(i), 32);
    }
    assert!(dp.ipcache.ipv4_arrays_in_use(), "arrays not rebuilt");
    for i in [0, 1, 500, 511, 512, 1023] {
        let h = host(i);
        let want = if i < 512 { node(i) } else { 20 };
        assert_eq!(matched(&dp, IpAddr::V4(h)), Some(want), "arrays: {h}");
    }
}

/// Two datapaths on one pin root for the race tests (`None` without privileges): a reader that
/// only runs programs, loaded first so that the writer's load (which rebuilds the arrays) is the
/// last to set them up, and the writer, set up.
fn reader_and_writer(name: &str) -> Option<(TestPinRoot, Datapath, Datapath)> {
    if !privileged_or_skip(name) {
        return None;
    }
    let root = TestPinRoot::new(name);
    let reader = root.load_program_runner().expect("load reader");
    let mut dp = root.load().expect("load writer");
    setup(&mut dp);
    Some((root, reader, dp))
}

#[test]
fn readers_see_old_or_new_entries_while_chunks_are_recycled() {
    let Some((_root, reader, mut dp)) = reader_and_writer("ipcache_race") else {
        return;
    };
    // Nearly fill the chunks, so the churn below reuses retired ones (after grace periods).
    for i in 0..1000u32 {
        add(&mut dp, Ipv4Addr::from(0x0b00_0000 | i << 8 | 1), 32, 9);
    }
    add(&mut dp, Ipv4Addr::new(10, 1, 0, 0), 16, 1);
    let stable = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5));
    let check = move |runs| assert_eq!(matched(&reader, stable), Some(1), "after {runs} runs");
    check_while(Duration::from_secs(30), check, || {
        for round in 0..150u32 {
            // The /16 of `stable` turns from a leaf into a link to a new chunk and back.
            add(&mut dp, Ipv4Addr::new(10, 1, 200, 0), 24, 2);
            add(&mut dp, Ipv4Addr::new(10, 1, 200, 7), 32, 3);
            add(&mut dp, Ipv4Addr::new(10, 2, (round % 200) as u8, 9), 32, 4);
            let host = IpAddr::V4(Ipv4Addr::new(10, 1, 200, 7));
            assert_eq!(matched(&dp, host), Some(3), "round {round}");
            del(&mut dp, Ipv4Addr::new(10, 1, 200, 7), 32);
            del(&mut dp, Ipv4Addr::new(10, 1, 200, 0), 24);
            del(&mut dp, Ipv4Addr::new(10, 2, (round % 200) as u8, 9), 32);
        }
    });
    assert!(dp.ipcache.ipv4_arrays_in_use());
}

/// Longest match of `addr` in IPv6 `prefixes` ((network, len) → node).
fn reference6(prefixes: &HashMap<(u128, u8), u16>, addr: u128) -> Option<u16> {
    (0..=128u8).rev().find_map(|len| {
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        prefixes.get(&(addr & mask, len)).copied()
    })
}

fn mask6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// An address under fd00::/16 whose 16-bit groups come from a few values, so that random
/// prefixes nest, share blocks and branch at many depths.
fn clustered6(rng: &mut Rng) -> u128 {
    const GROUPS: [u128; 5] = [0, 1, 0x10, 0x244, 0x8000];
    let mut addr = 0xfd00u128 << 112;
    for group in 1..8 {
        addr |= GROUPS[rng.below(GROUPS.len() as u64) as usize] << (112 - 16 * group);
    }
    addr
}

fn add6(dp: &mut Datapath, addr: u128, len: u8, node: u16) {
    add(dp, Ipv6Addr::from(addr), len, node);
}

fn del6(dp: &mut Datapath, addr: u128, len: u8) {
    del(dp, Ipv6Addr::from(addr), len);
}

fn matched6(dp: &Datapath, addr: u128) -> Option<u16> {
    matched(dp, IpAddr::V6(Ipv6Addr::from(addr)))
}

#[test]
fn ipv6_random_nested_prefixes_match_a_reference_longest_prefix_match() {
    let name = "ipcache6_random";
    if !privileged_or_skip(name) {
        return;
    }
    let root = TestPinRoot::new(name);
    let mut dp = root.load().expect("load datapath");
    setup(&mut dp);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    // Every stride boundary, lengths between them, and the usual /48, /56, /64, /128.
    let lens = [
        0u8, 8, 16, 20, 24, 32, 40, 44, 48, 48, 52, 56, 56, 60, 63, 64, 64, 64, 64, 65, 72, 80, 96,
        100, 112, 120, 124, 127, 128, 128, 128, 128,
    ];
    let mut prefixes: HashMap<(u128, u8), u16> = HashMap::new();
    for round in 0..6 {
        // Changes: mostly inserts (some replacing a prefix), a third removals.
        for _ in 0..150 {
            let existing: Vec<(u128, u8)> = prefixes.keys().copied().collect();
            if !existing.is_empty() && rng.below(3) == 0 {
                let (addr, len) = existing[rng.below(existing.len() as u64) as usize];
                del6(&mut dp, addr, len);
                prefixes.remove(&(addr, len));
                continue;
            }
            let len = lens[rng.below(lens.len() as u64) as usize];
            if len == 0 && rng.below(4) != 0 {
                continue;
            }
            let addr = clustered6(&mut rng) & mask6(len);
            let node = 1 + rng.below(20) as u16;
            add6(&mut dp, addr, len, node);
            prefixes.insert((addr, len), node);
        }
        assert!(dp.ipcache.ipv6_arrays_in_use(), "round {round}");
        // Probes: every prefix's first and last address and their neighbours, random addresses
        // near the prefixes and anywhere.
        let mut probes: Vec<u128> = Vec::new();
        for &(addr, len) in prefixes.keys() {
            let last = addr | !mask6(len);
            probes.extend([addr, addr.wrapping_sub(1), last, last.wrapping_add(1)]);
        }
        probes.extend((0..200).map(|_| clustered6(&mut rng)));
        probes.extend((0..50).map(|_| u128::from(rng.next()) << 64 | u128::from(rng.next())));
        for addr in probes {
            assert_eq!(
                matched6(&dp, addr),
                reference6(&prefixes, addr),
                "round {round}: {} with {} prefixes",
                Ipv6Addr::from(addr),
                prefixes.len()
            );
        }
    }
    let chunks = dp.ipcache.ipv6_chunks_in_use();
    // The pinned trie rebuilds the same answers.
    drop(dp);
    let dp = root.load().expect("reload datapath");
    assert!(dp.ipcache.ipv6_arrays_in_use());
    assert!(
        dp.ipcache.ipv6_chunks_in_use() <= chunks,
        "a rebuild needs no more chunks than the updates left in use"
    );
    for _ in 0..300 {
        let addr = clustered6(&mut rng);
        assert_eq!(
            matched6(&dp, addr),
            reference6(&prefixes, addr),
            "reloaded: {}",
            Ipv6Addr::from(addr)
        );
    }
}

#[test]
fn ipv6_lookups_see_old_or_new_answers_while_chunks_change_shape() {
    let Some((_root, reader, mut dp)) = reader_and_writer("ipcache6_race") else {
        return;
    };
    // One /128 alone in each of 1,900 /48s: a chunk each, so that the churn below runs out of
    // free chunks and reuses retired ones (after grace periods).
    for i in 0..1900u128 {
        add6(&mut dp, 0x2001_0db8u128 << 96 | i << 80 | 1, 128, 9);
    }
    assert!(
        dp.ipcache.ipv6_chunks_in_use() > 1900,
        "the fillers take a chunk each"
    );
    let pods: u128 = 0xfd00_0010_0244u128 << 80;
    let stable_net = pods | 5 << 64;
    let flipping_net = pods | 6 << 64;
    add6(&mut dp, stable_net, 64, 1);
    add6(&mut dp, flipping_net, 64, 5);
    let stable = stable_net | 9;
    let flipping = flipping_net | 9;
    let unknown = pods | 7 << 64 | 1;
    let check = move |runs| {
        assert_eq!(matched6(&reader, stable), Some(1), "after {runs} runs");
        let flip = matched6(&reader, flipping);
        assert!(matches!(flip, Some(5 | 6)), "after {runs} runs: {flip:?}");
        assert_eq!(matched6(&reader, unknown), None, "after {runs} runs");
    };
    check_while(Duration::from_secs(30), check, || {
        for round in 0..150u128 {
            // The stable /64's slot turns from a leaf into a link (a /65 in its upper half, a
            // /128 next to the stable address), and a /48 outside its /48 moves the branching
            // point above it, which replaces the chunks on its path with new ones.
            let upper = stable_net | 1 << 63;
            let neighbour = stable_net | 10;
            let outside = 0xfd00_0010u128 << 96 | (round % 500) << 80;
            add6(&mut dp, upper, 65, 2);
            add6(&mut dp, neighbour, 128, 3);
            add6(&mut dp, outside, 48, 4);
            add6(&mut dp, flipping_net, 64, 5 + (round % 2) as u16);
            assert_eq!(matched6(&dp, neighbour), Some(3), "round {round}");
            assert_eq!(matched6(&dp, outside | 1), Some(4), "round {round}");
            del6(&mut dp, neighbour, 128);
            del6(&mut dp, upper, 65);
            del6(&mut dp, outside, 48);
        }
    });
    assert!(dp.ipcache.ipv6_arrays_in_use());
}

/// What an older loader pinned: `IPCACHE_LENS` telling its programs to probe the
/// `IPCACHE_EXACT_V6` hash once per listed prefix length, the hash itself, and no IPv6 arrays.
/// This version's datapath never reads the arrays under that state (it walks the trie, even
/// with garbage in the arrays), and its loader replaces the state, rebuilds the arrays from
/// the trie and removes the obsolete pin.
#[test]
fn ipv6_state_pinned_by_an_older_loader_is_rebuilt_not_misread() {
    use nodeseal_bpf_common::maps::{IpCacheSlot, Ipv6Chunk, PrefixLengths};

    let name = "ipcache6_legacy";
    if !privileged_or_skip(name) {
        return;
    }
    let root = TestPinRoot::new(name);
    let mut dp = root.load().expect("load datapath");
    setup(&mut dp);
    let pods: u128 = 0xfd00_0010_0244u128 << 80;
    add6(&mut dp, 0xfd00_0010u128 << 96, 32, 2);
    add6(&mut dp, pods | 5 << 64, 64, 1);
    add6(&mut dp, pods | 5 << 64 | 7, 128, 3);
    let cases = [
        (pods | 5 << 64 | 9, Some(1)),
        (pods | 5 << 64 | 7, Some(3)),
        (pods | 6 << 64 | 9, Some(2)),
        (0xfd00_0011u128 << 96, None),
    ];
    let check = |dp: &Datapath, label: &str| {
        for (addr, want) in cases {
            assert_eq!(
                matched6(dp, addr),
                want,
                "{label}: {}",
                Ipv6Addr::from(addr)
            );
        }
    };
    check(&dp, "arrays");

    let lens_pin = aya::maps::MapData::from_pin(root.path().join("IPCACHE_LENS")).expect("lens");
    let mut lens: aya::maps::Array<_, PrefixLengths> =
        aya::maps::Array::try_from(aya::maps::Map::Array(lens_pin)).expect("lens map");
    let older = PrefixLengths {
        state: PrefixLengths::STATE_EXACT,
        count: 2,
        lens: [128, 64, 0, 0, 0, 0],
    };
    lens.set(PrefixLengths::INDEX_V6, older, 0)
        .expect("write older state");
    // Garbage in the root chunk: every slot a link to chunk 7, whose slots would match node 20.
    let chunks_pin =
        aya::maps::MapData::from_pin(root.path().join("IPCACHE6_CHUNKS")).expect("chunks");
    let mut chunks: aya::maps::Array<_, Ipv6Chunk> =
        aya::maps::Array::try_from(aya::maps::Map::Array(chunks_pin)).expect("chunks map");
    let mut garbage = chunks.get(&Ipv6Chunk::ROOT, 0).expect("root chunk");
    garbage.slots = [IpCacheSlot::link(7); 256];
    chunks.set(Ipv6Chunk::ROOT, garbage, 0).expect("write root");
    check(&dp, "older loader's state: the trie");
    drop(dp);

    // Reload from what an older loader leaves: its exact hash pinned, no IPv6 arrays.
    drop(chunks);
    std::fs::remove_file(root.path().join("IPCACHE6_CHUNKS")).expect("unpin arrays");
    let exact = root.path().join("IPCACHE_EXACT_V6");
    pin_scratch_map(&exact, BPF_MAP_TYPE_HASH, 20, 8);
    let mut dp = root.load().expect("reload datapath");
    assert!(!exact.exists(), "the older exact hash is unpinned");
    assert!(dp.ipcache.ipv6_arrays_in_use());
    let state = lens.get(&PrefixLengths::INDEX_V6, 0).expect("read state");
    assert_eq!(state.state, PrefixLengths::STATE_ARRAYS);
    check(&dp, "rebuilt");
    add6(&mut dp, pods | 6 << 64, 64, 4);
    assert_eq!(
        matched6(&dp, pods | 6 << 64 | 9),
        Some(4),
        "updated after the rebuild"
    );
}

#[test]
fn ipv6_out_of_chunks_walks_the_trie_until_the_prefixes_fit_again() {
    let name = "ipcache6_chunks";
    if !privileged_or_skip(name) {
        return;
    }
    let root = TestPinRoot::new(name);
    let mut dp = root.load().expect("load datapath");
    setup(&mut dp);
    // A /128 alone in each /48 of 2001:db8::/32 takes a chunk of its own: 2,100 of them need
    // more than the 2,048 chunks there are.
    let host = |i: u128| 0x2001_0db8u128 << 96 | i << 80 | 7;
    let node = |i: u128| 1 + (i % 20) as u16;
    add6(&mut dp, 0x2001_0db8u128 << 96, 32, 20);
    let mut first_out = None;
    for i in 0..2100 {
        add6(&mut dp, host(i), 128, node(i));
        if first_out.is_none() && !dp.ipcache.ipv6_arrays_in_use() {
            first_out = Some(i);
        }
    }
    let first_out = first_out.expect("the arrays never ran out of chunks");
    assert!(
        first_out > 2000,
        "ran out after only {first_out} host routes"
    );
    // The trie answers meanwhile.
    for i in [0, 1, 1500, 2099] {
        assert_eq!(matched6(&dp, host(i)), Some(node(i)), "trie: host {i}");
        assert_eq!(
            matched6(&dp, host(i) + 1),
            Some(20),
            "trie: next to host {i}"
        );
    }
    // Removing host routes until they fit rebuilds the arrays.
    for i in (1700..2100).rev() {
        del6(&mut dp, host(i), 128);
    }
    assert!(dp.ipcache.ipv6_arrays_in_use(), "arrays not rebuilt");
    for i in [0, 1, 1699, 1700, 2099] {
        let want = if i < 1700 { node(i) } else { 20 };
        assert_eq!(matched6(&dp, host(i)), Some(want), "arrays: host {i}");
    }
}
