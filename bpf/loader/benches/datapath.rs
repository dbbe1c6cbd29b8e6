//! ns per packet of `from_pod` (egress enforced) and `to_pod` (ingress enforced) with a
//! populated ipcache (10,000 prefixes) and policy (10,000 entries per direction), against the
//! pass-through program on the same packets in the same run (BPF_PROG_TEST_RUN, repeat).
//! Then the cost of trace events (what `nodeseal observe` turns on while a client follows
//! forwarded flows): `from_pod` and `to_pod` with policy enforced, trace off against trace on,
//! in the same run. Needs root and BPF; prints why and exits 0 otherwise.
//!
//! Run: `cargo bench -p nodeseal-bpf --bench datapath`.
#![expect(
    clippy::expect_used,
    reason = "benchmark set-up: failing loudly is the point"
)]

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use nodeseal_bpf::{
    Datapath, DatapathConfig, Enforcement, Location, Mode, NodeId, PolicyDirection, PolicyRule,
    PolicyVerdict, Prefix, Program, Verdict,
    test_helpers::{TestPinRoot, V4, ipv4, ipv6, missing_privileges, proto, tcp},
};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 7;
/// Packets per run in the trace part: with tracing on each one is a 64-byte event (72 bytes
/// with the ring's header), and the 256 KiB ring must not fill within a run, or the runs would
/// time failed reservations. The ring is drained after every run, as the agent's reader does.
const TRACE_REPEAT: u32 = 2_000;
/// Runs per figure in the trace part (the best is kept).
const TRACE_RUNS: usize = 150;

fn main() {
    if let Some(why) = missing_privileges() {
        println!("SKIP datapath bench: {why}");
        return;
    }
    let root = TestPinRoot::new("bench");
    let mut dp = root.load().expect("load datapath");
    dp.config
        .set(DatapathConfig {
            mode: Mode::Ipsec,
            strict_egress: true,
            ..DatapathConfig::default()
        })
        .expect("config");
    // 10,000 /24 pod CIDRs of 1,000 remote nodes: 10.0.0.0/24 ... 10.39.15.0/24.
    let started = Instant::now();
    for i in 0u32..10_000 {
        let net = Ipv4Addr::from(0x0a00_0000 + (i << 8));
        let node = NodeId(u16::try_from(i / 10 + 1).expect("node id"));
        dp.ipcache
            .insert(
                Prefix::new(net.into(), 24).expect("prefix"),
                256 + i,
                Location::RemotePod(node),
            )
            .expect("ipcache");
        if i % 10 == 0 {
            dp.peer_slots.set(node, Some(1)).expect("slot");
        }
    }
    let ipcache_ms = started.elapsed().as_secs_f64() * 1e3;
    // 10,000 policy entries per direction for the subject: one per peer identity.
    let started = Instant::now();
    dp.policy
        .replace_all((0u32..20_000).map(|i| {
            (
                PolicyRule {
                    subject: 100,
                    peer: Some(256 + i % 10_000),
                    protocol: Some(proto::TCP),
                    port: Some(8080),
                    direction: if i < 10_000 {
                        PolicyDirection::Egress
                    } else {
                        PolicyDirection::Ingress
                    },
                },
                PolicyVerdict::Allow,
            )
        }))
        .expect("policy");
    let policy_ms = started.elapsed().as_secs_f64() * 1e3;
    dp.endpoints
        .insert(
            1,
            100,
            Enforcement {
                ingress: false,
                egress: true,
            },
        )
        .expect("endpoint");
    // Destination in the middle of the table, allowed by an exact-port rule.
    let dst = Ipv4Addr::from(0x0a00_0000 + (5_000 << 8) + 9);
    let frame = ipv4(
        Ipv4Addr::new(10, 200, 0, 5),
        dst,
        proto::TCP,
        &tcp(40_000, 8080),
        &V4::default(),
    );
    let (verdict, _) = dp
        .test_run_repeat(Program::FromPod, &frame, 1, 0, 1)
        .expect("from_pod");
    assert_eq!(verdict.action, 0, "benchmark packet must pass");
    assert_ne!(
        verdict.mark, 0,
        "benchmark packet must be marked for encryption"
    );

    // Toward the pod, from the remote pod the from_pod packet went to; allowed by an exact
    // ingress rule.
    let to_pod_frame = ipv4(
        dst,
        Ipv4Addr::new(10, 200, 0, 5),
        proto::TCP,
        &tcp(40_000, 8080),
        &V4::default(),
    );
    let run_ns = |dp: &Datapath, program: Program, frame: &[u8]| {
        let (_, t) = dp
            .test_run_repeat(program, frame, 1, 0, REPEAT)
            .expect("test run");
        t.as_secs_f64() * 1e9
    };
    // Interleaved, so a slow spell of the machine hits both sides of the ratio.
    let (mut pass, mut from_pod) = (f64::MAX, f64::MAX);
    for _ in 0..ROUNDS {
        pass = pass.min(run_ns(&dp, Program::Pass, &frame));
        from_pod = from_pod.min(run_ns(&dp, Program::FromPod, &frame));
    }
    // to_pod with ingress enforced (and egress not: no flow is tracked for the replies).
    dp.endpoints
        .insert(
            1,
            100,
            Enforcement {
                ingress: true,
                egress: false,
            },
        )
        .expect("endpoint");
    let (verdict, _) = dp
        .test_run_repeat(Program::ToPod, &to_pod_frame, 1, 0, 1)
        .expect("to_pod");
    assert_eq!(
        verdict.action,
        Verdict::PASS,
        "to_pod bench packet must pass"
    );
    let (mut pass_in, mut to_pod) = (f64::MAX, f64::MAX);
    for _ in 0..ROUNDS {
        pass_in = pass_in.min(run_ns(&dp, Program::Pass, &to_pod_frame));
        to_pod = to_pod.min(run_ns(&dp, Program::ToPod, &to_pod_frame));
    }
    // Without the egress policy check, to show what the policy lookup costs.
    dp.endpoints
        .insert(1, 100, Enforcement::default())
        .expect("endpoint");
    let no_policy = (0..ROUNDS)
        .map(|_| run_ns(&dp, Program::FromPod, &frame))
        .fold(f64::MAX, f64::min);
    println!("datapath bench (BPF_PROG_TEST_RUN, repeat {REPEAT}, best of {ROUNDS})");
    println!("  pass-through              {pass:8.1} ns/packet");
    println!("  from_pod (10k+10k)        {from_pod:8.1} ns/packet");
    println!(
        "  ratio                     {:8.2} (target <= 2)",
        from_pod / pass
    );
    println!("  from_pod, no policy check {no_policy:8.1} ns/packet");
    println!("  pass-through (to_pod pkt) {pass_in:8.1} ns/packet");
    println!("  to_pod (10k+10k)          {to_pod:8.1} ns/packet");
    println!("  ratio                     {:8.2}", to_pod / pass_in);
    println!(
        "  set-up: 10,000 ipcache inserts {:.0} ms, 20,000 policy rules in one replace_all {:.0} ms",
        ipcache_ms, policy_ms
    );
    ipv6_beside_ipv4(&mut dp, &frame);
    trace_cost(&mut dp, &frame, &to_pod_frame);
}

/// The same nodes' IPv6 pod CIDRs (10,000 /64s, the same identities, so the same policy
/// entries decide), and `from_pod` with egress enforced for an IPv6 packet next to the IPv4
/// one, interleaved in the same run, each against the pass-through on its own packet; then
/// `to_pod` with ingress enforced for the IPv6 reply direction.
fn ipv6_beside_ipv4(dp: &mut Datapath, v4_frame: &[u8]) {
    let started = Instant::now();
    for i in 0u32..10_000 {
        let net = Ipv6Addr::new(
            0xfd00,
            0x10,
            0x244,
            u16::try_from(i).expect("net"),
            0,
            0,
            0,
            0,
        );
        let node = NodeId(u16::try_from(i / 10 + 1).expect("node id"));
        dp.ipcache
            .insert(
                Prefix::new(net.into(), 64).expect("prefix"),
                256 + i,
                Location::RemotePod(node),
            )
            .expect("ipcache");
    }
    let ipcache_ms = started.elapsed().as_secs_f64() * 1e3;
    dp.endpoints
        .insert(
            1,
            100,
            Enforcement {
                ingress: false,
                egress: true,
            },
        )
        .expect("endpoint");
    let v6_frame = ipv6(
        Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 5),
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 5_000, 0, 0, 0, 9),
        proto::TCP,
        &tcp(40_000, 8080),
        &[],
    );
    let (verdict, _) = dp
        .test_run_repeat(Program::FromPod, &v6_frame, 1, 0, 1)
        .expect("from_pod");
    assert_eq!(verdict.action, 0, "IPv6 benchmark packet must pass");
    assert_ne!(verdict.mark, 0, "IPv6 benchmark packet must be marked");
    let run_ns = |dp: &Datapath, program: Program, frame: &[u8]| {
        let (_, t) = dp
            .test_run_repeat(program, frame, 1, 0, REPEAT)
            .expect("test run");
        t.as_secs_f64() * 1e9
    };
    // best[family][pass, from_pod]
    let mut best = [[f64::MAX; 2]; 2];
    for _ in 0..ROUNDS {
        for (family, frame) in [v4_frame, &v6_frame[..]].into_iter().enumerate() {
            for (i, program) in [Program::Pass, Program::FromPod].into_iter().enumerate() {
                best[family][i] = best[family][i].min(run_ns(dp, program, frame));
            }
        }
    }
    // to_pod with ingress enforced, from the remote pod the IPv6 from_pod packet went to.
    dp.endpoints
        .insert(
            1,
            100,
            Enforcement {
                ingress: true,
                egress: false,
            },
        )
        .expect("endpoint");
    let v6_to_pod_frame = ipv6(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 5_000, 0, 0, 0, 9),
        Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 5),
        proto::TCP,
        &tcp(40_000, 8080),
        &[],
    );
    let (verdict, _) = dp
        .test_run_repeat(Program::ToPod, &v6_to_pod_frame, 1, 0, 1)
        .expect("to_pod");
    assert_eq!(
        verdict.action,
        Verdict::PASS,
        "IPv6 to_pod bench packet must pass"
    );
    // [pass, to_pod]
    let mut best_to_pod = [f64::MAX; 2];
    for _ in 0..ROUNDS {
        for (i, program) in [Program::Pass, Program::ToPod].into_iter().enumerate() {
            best_to_pod[i] = best_to_pod[i].min(run_ns(dp, program, &v6_to_pod_frame));
        }
    }
    println!(
        "IPv6 beside IPv4 (10k /24 and 10k /64 pod CIDRs in the ipcache; 10k IPv6 inserts {ipcache_ms:.0} ms)"
    );
    for (family, name) in ["IPv4", "IPv6"].iter().enumerate() {
        let [pass, from_pod] = best[family];
        println!(
            "  {name} from_pod {from_pod:6.1} ns  pass-through {pass:6.1} ns  ratio {:5.2}",
            from_pod / pass
        );
    }
    println!(
        "  IPv6 / IPv4 from_pod      {:5.2}",
        best[1][1] / best[0][1]
    );
    let [pass, to_pod] = best_to_pod;
    println!(
        "  IPv6 to_pod   {to_pod:6.1} ns  pass-through {pass:6.1} ns  ratio {:5.2}",
        to_pod / pass
    );
    ipv6_update_costs(dp);
}

/// What IPv6 ipcache updates cost beyond the plain inserts above: a default route covering all
/// 10,000 /64s (every slot under it is rewritten, in place) and 1,000 node /128s scattered over
/// as many /64s (one array chunk each).
fn ipv6_update_costs(dp: &mut Datapath) {
    let default_route = Prefix::new(Ipv6Addr::UNSPECIFIED.into(), 0).expect("prefix");
    let started = Instant::now();
    dp.ipcache
        .insert(default_route, 2, Location::External)
        .expect("ipcache");
    dp.ipcache.remove(default_route).expect("ipcache");
    let default_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    for i in 0u16..1_000 {
        let ip = Ipv6Addr::new(0x2001, 0xdb8, i, 7, 0, 0, 0, 1);
        let node = NodeId(i / 10 * 10 + 1);
        dp.ipcache
            .insert(Prefix::host(ip.into()), 6, Location::RemoteNode(node))
            .expect("ipcache");
    }
    let hosts_ms = started.elapsed().as_secs_f64() * 1e3;
    println!(
        "  IPv6 ipcache updates: ::/0 inserted and removed over the 10k /64s {default_ms:.1} ms; \
         1,000 scattered node /128s {hosts_ms:.0} ms ({} array chunks in use, arrays in use: {})",
        dp.ipcache.ipv6_chunks_in_use(),
        dp.ipcache.ipv6_arrays_in_use()
    );
}

/// `from_pod` (egress enforced, encrypt mark) and `to_pod` (ingress enforced) with trace events
/// off and on, interleaved in the same run; ratios against trace off.
fn trace_cost(dp: &mut Datapath, from_pod_frame: &[u8], to_pod_frame: &[u8]) {
    let enforce_both = Enforcement {
        ingress: true,
        egress: true,
    };
    dp.endpoints.insert(1, 100, enforce_both).expect("endpoint");
    let base = dp.config.get().expect("config");
    let set_trace = |dp: &mut Datapath, trace: bool| {
        dp.config
            .set(DatapathConfig { trace, ..base })
            .expect("config");
    };
    let cases: [(Program, &[u8]); 2] = [
        (Program::FromPod, from_pod_frame),
        (Program::ToPod, to_pod_frame),
    ];
    for (program, frame) in cases {
        set_trace(dp, true);
        let (verdict, _) = dp
            .test_run_repeat(program, frame, 1, 0, 1)
            .expect("test run");
        assert_eq!(
            verdict.action,
            Verdict::PASS,
            "{program:?}: bench packet must pass"
        );
        let events = dp.events.drain();
        assert_eq!(
            events.len(),
            1,
            "{program:?}: one trace event per passed packet"
        );
    }
    // best[case][trace]
    let mut best = [[f64::MAX; 2]; 2];
    let mut events = 0usize;
    for _ in 0..TRACE_RUNS {
        for trace in [false, true] {
            set_trace(dp, trace);
            for (i, (program, frame)) in cases.iter().enumerate() {
                let (_, t) = dp
                    .test_run_repeat(*program, frame, 1, 0, TRACE_REPEAT)
                    .expect("test run");
                best[i][usize::from(trace)] =
                    best[i][usize::from(trace)].min(t.as_secs_f64() * 1e9);
                events += dp.events.drain().len();
            }
        }
    }
    set_trace(dp, false);
    let expected = TRACE_RUNS * 2 * TRACE_REPEAT as usize;
    println!(
        "trace events (repeat {TRACE_REPEAT}, ring drained after each run, best of {TRACE_RUNS}; \
         {events} of {expected} events read)"
    );
    for (i, name) in ["from_pod (policy, encrypt)", "to_pod (policy)"]
        .iter()
        .enumerate()
    {
        let [off, on] = best[i];
        println!(
            "  {name:<27} trace off {off:6.1} ns  on {on:6.1} ns  ratio {:5.2}",
            on / off
        );
    }
}
