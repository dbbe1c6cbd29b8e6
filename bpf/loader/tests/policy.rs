//! The policy table through BPF_PROG_TEST_RUN on the host kernel: batch replacement, removal of
//! a missing rule, the capacity limit (the old rules stay in force), rules surviving a reload of
//! the pinned maps, a table pinned by an older loader (the earlier bucket hash), and readers
//! racing table switches. Needs root and BPF; skips with a reason
//! otherwise (fails instead with NODESEAL_REQUIRE_PRIVILEGED=1).
#![expect(
    clippy::expect_used,
    reason = "test set-up helpers panic with context, like the tests"
)]

use std::{net::Ipv4Addr, time::Duration};

use nodeseal_bpf::{
    Datapath, DatapathConfig, Enforcement, Location, MapError, Mode, NodeId, PolicyDirection,
    PolicyRule, PolicyVerdict, Prefix, Program, Verdict, mark,
    test_helpers::{TestPinRoot, V4, check_while, ipv4, privileged_or_skip, proto, tcp},
};

/// `lo`: exists in every network namespace.
const IFINDEX: u32 = 1;
const POD_A: u32 = 1000;
const POD_B: u32 = 2000;
const PEER: NodeId = NodeId(7);
const SLOT: u8 = 3;
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 9);

/// Pod A (egress enforced) behind `lo`, pod B on node 7 with a ready key slot.
fn setup(dp: &mut Datapath) {
    dp.config
        .set(DatapathConfig {
            mode: Mode::Ipsec,
            ..DatapathConfig::default()
        })
        .expect("config");
    dp.ipcache
        .insert(
            Prefix::new(REMOTE_POD.into(), 24).expect("prefix"),
            POD_B,
            Location::RemotePod(PEER),
        )
        .expect("ipcache");
    dp.peer_slots.set(PEER, Some(SLOT)).expect("slot");
    dp.endpoints
        .insert(
            IFINDEX,
            POD_A,
            Enforcement {
                ingress: false,
                egress: true,
            },
        )
        .expect("endpoint");
}

fn egress(peer: Option<u32>, protocol: Option<u8>, port: Option<u16>) -> PolicyRule {
    PolicyRule {
        subject: POD_A,
        peer,
        protocol,
        port,
        direction: PolicyDirection::Egress,
    }
}

/// Whether pod A may send TCP to `port` on pod B (the packet is then marked for encryption).
fn allowed(dp: &Datapath, port: u16) -> bool {
    let frame = ipv4(
        LOCAL_POD,
        REMOTE_POD,
        proto::TCP,
        &tcp(40_000, port),
        &V4::default(),
    );
    let v = dp
        .test_run(Program::FromPod, &frame, IFINDEX, 0)
        .expect("test run");
    match v.action {
        Verdict::PASS => {
            assert_eq!(v.mark, mark::encrypt(PEER.0, SLOT), "port {port}");
            true
        }
        Verdict::DROP => false,
        other => panic!("port {port}: unexpected action {other}"),
    }
}

/// `n` rules for other subjects, so the live rules share the table with many others.
fn filler(n: u32, salt: u32) -> impl Iterator<Item = (PolicyRule, PolicyVerdict)> {
    (0..n).map(move |i| {
        (
            PolicyRule {
                subject: 5000 + i % 97,
                peer: Some(salt.wrapping_mul(7919).wrapping_add(i)),
                protocol: Some(proto::UDP),
                port: Some((i % 60_000) as u16 + 1),
                direction: PolicyDirection::Ingress,
            },
            PolicyVerdict::Allow,
        )
    })
}

#[test]
fn rules_replace_as_a_batch_hit_capacity_and_survive_reload() {
    let name = "policy_table";
    if !privileged_or_skip(name) {
        return;
    }
    let root = TestPinRoot::new(name);
    let mut dp = root.load().expect("load datapath");
    setup(&mut dp);
    assert!(!allowed(&dp, 8080), "no rules: default deny");

    let web = egress(Some(POD_B), Some(proto::TCP), Some(8080));
    let any_tcp = egress(None, Some(proto::TCP), None);
    let ssh = egress(Some(POD_B), Some(proto::TCP), Some(22));
    let rules = [
        (web, PolicyVerdict::Allow),
        (any_tcp, PolicyVerdict::Allow),
        (ssh, PolicyVerdict::Deny),
    ];
    dp.policy
        .replace_all(rules.into_iter().chain(filler(20_000, 1)))
        .expect("replace");
    assert_eq!(dp.policy.len(), 20_003);
    assert!(allowed(&dp, 8080), "exact rule");
    assert!(allowed(&dp, 9000), "any-peer, any-port rule");
    assert!(
        !allowed(&dp, 22),
        "explicit deny wins over the broader allow"
    );

    match dp
        .policy
        .remove(egress(Some(POD_B), Some(proto::UDP), Some(53)))
    {
        Err(MapError::NoSuchRule(_)) => {}
        other => panic!("removing a missing rule: {other:?}"),
    }
    match dp.policy.replace_all(filler(65_537, 2)) {
        Err(MapError::PolicyFull { rules: 65_537, .. }) => {}
        other => panic!("65,537 rules: {other:?}"),
    }
    assert!(
        allowed(&dp, 8080) && !allowed(&dp, 22),
        "old rules stay after a refused change"
    );

    // The full capacity fits.
    dp.policy
        .replace_all(rules.into_iter().chain(filler(65_533, 3)))
        .expect("65,536 rules");
    assert!(
        allowed(&dp, 8080) && allowed(&dp, 9000) && !allowed(&dp, 22),
        "full table"
    );

    dp.policy.remove(any_tcp).expect("remove");
    assert!(!allowed(&dp, 9000), "removed rule");
    drop(dp);

    let mut dp = root.load().expect("reload datapath");
    assert_eq!(
        dp.policy.len(),
        65_535,
        "rules read back from the pinned table"
    );
    assert_eq!(dp.policy.get(web).expect("get"), Some(PolicyVerdict::Allow));
    assert_eq!(dp.policy.get(ssh).expect("get"), Some(PolicyVerdict::Deny));
    assert_eq!(dp.policy.get(any_tcp).expect("get"), None);
    assert!(allowed(&dp, 8080) && !allowed(&dp, 9000), "after reload");
    // The reloaded handle switches copies correctly too.
    dp.policy
        .insert(any_tcp, PolicyVerdict::Allow)
        .expect("insert after reload");
    assert!(allowed(&dp, 9000), "inserted after reload");
    // One rule back into a full table: the copy is updated in place, not rebuilt. The slots
    // written are those where the other copy, one change behind (it still holds the rule
    // removed before the reload), differs from the new layout: a few at most, none when the
    // rule went back into the slot it left.
    let publication = dp.policy.last_publication().expect("published");
    assert!(!publication.rebuilt, "{publication:?}");
    assert_eq!(publication.rules_changed, 1, "{publication:?}");
    assert!(publication.slots_written <= 16, "{publication:?}");
}

#[test]
fn readers_see_old_or_new_rules_while_tables_switch() {
    let name = "policy_race";
    if !privileged_or_skip(name) {
        return;
    }
    let root = TestPinRoot::new(name);
    // The reader only runs programs; the writer owns the policy model.
    let reader = root.load_program_runner().expect("load reader");
    let mut dp = root.load().expect("load writer");
    setup(&mut dp);
    let web = (
        egress(Some(POD_B), Some(proto::TCP), Some(8080)),
        PolicyVerdict::Allow,
    );
    dp.policy.replace_all([web]).expect("first rules");
    let check = move |runs| {
        assert!(
            allowed(&reader, 8080),
            "allowed flow denied after {runs} runs"
        )
    };
    check_while(Duration::from_secs(60), check, || {
        for round in 0..60u32 {
            // Each switch rewrites the filler, whose insertions displace rules between the
            // buckets of each copy; the toggled rule shows the new copy is live when
            // replace_all returns.
            let toggled = (
                egress(Some(POD_B), Some(proto::TCP), Some(443)),
                if round % 2 == 0 {
                    PolicyVerdict::Allow
                } else {
                    PolicyVerdict::Deny
                },
            );
            dp.policy
                .replace_all([web, toggled].into_iter().chain(filler(round * 300, round)))
                .expect("replace");
            assert_eq!(allowed(&dp, 443), round % 2 == 0, "round {round}");
        }
    });
}

/// A table an older loader pinned, laid out by `policy_buckets_legacy` under a header without
/// the multiplicative bit: the datapath reads it as it is, the loader reads its rules back, and
/// the first change rebuilds it under the current hash.
#[test]
fn a_table_pinned_by_an_older_loader_is_read_then_rebuilt() {
    use nodeseal_bpf_common::maps::{
        PolicyBucket, PolicyKey, PolicySlot, policy_buckets, policy_buckets_legacy, policy_verdict,
    };

    let name = "policy_legacy";
    if !privileged_or_skip(name) {
        return;
    }
    let root = TestPinRoot::new(name);
    let mut dp = root.load().expect("load datapath");
    setup(&mut dp);
    drop(dp);

    let key = PolicyKey {
        subject: POD_A,
        peer: POD_B,
        port: 8080,
        protocol: proto::TCP,
        direction: PolicyKey::EGRESS,
    };
    let seed = 0x5eed_0001;
    let (legacy, _) = policy_buckets_legacy(key.word0(), key.word1(), seed);
    let (current, other) = policy_buckets(key.word0(), key.word1(), seed);
    assert!(
        legacy != current && legacy != other,
        "the test needs a key the two hashes place apart"
    );
    let mut bucket = PolicyBucket::default();
    bucket.slots[0] = PolicySlot::new(&key, policy_verdict::ALLOW);
    let table = aya::maps::MapData::from_pin(root.path().join("POLICY_TABLE")).expect("table pin");
    let mut table: aya::maps::Array<_, PolicyBucket> =
        aya::maps::Array::try_from(aya::maps::Map::Array(table)).expect("table");
    table.set(legacy, bucket, 0).expect("write bucket");
    let header =
        aya::maps::MapData::from_pin(root.path().join("POLICY_HEADER")).expect("header pin");
    let mut header: aya::maps::Array<_, u64> =
        aya::maps::Array::try_from(aya::maps::Map::Array(header)).expect("header");
    // Published, copy 0, `seed`: the layout of the older loader's `PolicyTableHeader::new`.
    header
        .set(0, (1u64 << 33) | u64::from(seed), 0)
        .expect("write header");

    let mut dp = root.load().expect("reload datapath");
    assert_eq!(dp.policy.len(), 1, "the older table's rule is read back");
    assert!(allowed(&dp, 8080), "the datapath reads the older layout");
    assert!(!allowed(&dp, 9090), "and nothing else");

    dp.policy
        .insert(
            egress(Some(POD_B), Some(proto::TCP), Some(9090)),
            PolicyVerdict::Allow,
        )
        .expect("insert");
    assert!(
        dp.policy.last_publication().expect("published").rebuilt,
        "an older layout is rebuilt, not updated in place"
    );
    assert!(allowed(&dp, 8080), "the older rule, under the current hash");
    assert!(allowed(&dp, 9090), "the new rule");
    assert!(!allowed(&dp, 443), "and nothing else");
}
