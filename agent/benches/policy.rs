//! Identity policy at scale: 1,000 policies over 10,000 workload identities, for the 100
//! endpoints of one node, then one rule changed (compiled from scratch, and by the compiler
//! the agent keeps, which encodes again only the subject-directions it changes). The
//! baseline, measured in the same run, is parsing the same 1,000 documents: what any agent
//! pays to read the policies at all. With root and BPF, the compiled tables are also
//! programmed into a real loaded datapath's policy table and the 10,000 pod IPs into its
//! ipcache, reporting time and map writes of the first program and of the change.
//!
//! `cargo xtask bench policy` (`cargo bench -p nodeseal-agent --bench policy`)

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark's set-up"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use nodeseal_agent::policy_engine::table_rules;
use nodeseal_bpf::test_helpers::{TestPinRoot, missing_privileges};
use nodeseal_bpf::{Location, NodeId, PolicyRule, PolicyVerdict, Prefix};
use nodeseal_policy::compile::{Compiler, Identities, compile};
use nodeseal_policy::document::parse;
use nodeseal_policy::labels::Labels;
use nodeseal_policy::rule::Policy;

const IDENTITIES: u32 = 10_000;
const POLICIES: usize = 1_000;
const LOCAL_ENDPOINTS: u32 = 100;
const ROUNDS: usize = 5;

/// Policy `j`: the pods of app a`j` accept team t`j % 50` on one port, deny team t49 outright,
/// and may reach the world on 443.
fn document(j: usize, port: u16) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{j}}}\nspec:\n  \
         endpointSelector: {{matchLabels: {{app: a{j}}}}}\n  ingress:\n  - fromEndpoints:\n    \
         - matchLabels: {{team: t{team}}}\n    toPorts:\n    - ports: [{{port: \"{port}\", protocol: TCP}}]\n  \
         ingressDeny:\n  - fromEndpoints:\n    - matchLabels: {{team: t49}}\n  egress:\n  \
         - toEntities: [world]\n    toPorts:\n    - ports: [{{port: \"443\", protocol: TCP}}]\n",
        team = j % 50
    )
}

fn documents(changed_port: u16) -> Vec<String> {
    (0..POLICIES)
        .map(|j| {
            document(
                j,
                if j == 0 {
                    changed_port
                } else {
                    8000 + (j % 100) as u16
                },
            )
        })
        .collect()
}

fn parse_all(documents: &[String]) -> Vec<Policy> {
    documents
        .iter()
        .flat_map(|d| parse(d.as_bytes()).expect("valid policy"))
        .collect()
}

fn best(mut run: impl FnMut() -> Duration) -> Duration {
    (0..ROUNDS).map(|_| run()).min().unwrap_or_default()
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    // Identity 256 + i: app a(i % 1000), team t(i % 50), namespace default.
    let workloads: BTreeMap<u32, Labels> = (0..IDENTITIES)
        .map(|i| {
            let text = format!(
                "app=a{},team=t{},io.kubernetes.pod.namespace=default,replica=r{i}",
                i % 1000,
                i % 50
            );
            (256 + i, Labels::parse([text.as_str()]).expect("labels"))
        })
        .collect();
    let identities = Identities {
        workloads,
        cidrs: BTreeMap::new(),
    };
    // This node's endpoints: apps a0..a99, so each is selected by one policy.
    let subjects: BTreeSet<u32> = (0..LOCAL_ENDPOINTS).map(|i| 256 + i).collect();

    let before = documents(8000);
    let after = documents(9000);
    let parse_time = best(|| {
        let t = Instant::now();
        std::hint::black_box(parse_all(&before));
        t.elapsed()
    });
    let policies = parse_all(&before);
    let changed = parse_all(&after);
    let mut compiled = None;
    let compile_time = best(|| {
        let t = Instant::now();
        compiled = Some(compile(&policies, &identities, &subjects).expect("compile"));
        t.elapsed()
    });
    let compiled = compiled.expect("compiled");
    let mut recompiled = None;
    let recompile_time = best(|| {
        let t = Instant::now();
        recompiled = Some(compile(&changed, &identities, &subjects).expect("compile"));
        t.elapsed()
    });
    let recompiled = recompiled.expect("recompiled");
    // The agent's way: one compiler kept across changes. Each round starts from the table
    // before the change, compiled untimed.
    let mut compiler = Compiler::default();
    let mut incremental = None;
    let incremental_time = best(|| {
        compiler
            .compile(&policies, &identities, &subjects)
            .expect("compile");
        let t = Instant::now();
        incremental = Some(
            compiler
                .compile(&changed, &identities, &subjects)
                .expect("compile"),
        );
        t.elapsed()
    });
    assert!(
        incremental.as_ref() == Some(&recompiled),
        "the incremental compile differs from a fresh one"
    );
    let stats = compiler.last_stats();
    let differing = compiled
        .entries
        .iter()
        .filter(|(k, v)| recompiled.entries.get(*k) != Some(*v))
        .count()
        + recompiled
            .entries
            .keys()
            .filter(|k| !compiled.entries.contains_key(*k))
            .count();

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "policy bench: {POLICIES} policies, {IDENTITIES} identities, {LOCAL_ENDPOINTS} local endpoints (best of {ROUNDS})"
    );
    println!(
        "  baseline: parse the {POLICIES} documents  {:9.1} ms",
        ms(parse_time)
    );
    println!(
        "  compile                                 {:9.1} ms  ratio {:5.2}  {} table entries",
        ms(compile_time),
        compile_time.as_secs_f64() / parse_time.as_secs_f64(),
        compiled.entries.len()
    );
    println!(
        "  one rule's port changed: recompile      {:9.1} ms  ratio {:5.2}  {} of {} entries differ",
        ms(recompile_time),
        recompile_time.as_secs_f64() / parse_time.as_secs_f64(),
        differing,
        recompiled.entries.len()
    );
    println!(
        "  one rule's port changed: incremental    {:9.1} ms  ratio {:5.2}  {} of {} subject-directions encoded",
        ms(incremental_time),
        incremental_time.as_secs_f64() / parse_time.as_secs_f64(),
        stats.compiled,
        stats.compiled + stats.reused
    );
    // What an agent holds: the identities, the parsed policies, a compiled table (two here) and
    // the compiler's kept entries.
    let compiled_rss = peak_rss_kib();
    match missing_privileges() {
        Some(why) => println!("  programming the BPF maps skipped: {why}"),
        None => {
            // One table per change, each with policy 0 on another port than the one before.
            let changes: Vec<Vec<_>> = (0..2 * ROUNDS)
                .map(|round| {
                    let port = 9000 + u16::try_from(round).expect("round");
                    table_rules(
                        &compile(&parse_all(&documents(port)), &identities, &subjects)
                            .expect("compile"),
                    )
                })
                .collect();
            program(&table_rules(&compiled), &changes, parse_time);
        }
    }
    println!(
        "  peak RSS after compiling                {compiled_rss:9} KiB; at the end {:9} KiB (with \
         the 4 MiB table mapped and the bench's {} extra tables)",
        peak_rss_kib(),
        2 * ROUNDS
    );
}

/// Programs `first` into a fresh datapath's policy table, then each of `changes` in turn (one
/// rule's port changed each time), as the agent does on each change; then writes every
/// workload's pod IP into the ipcache.
fn program(
    first: &[(PolicyRule, PolicyVerdict)],
    changes: &[Vec<(PolicyRule, PolicyVerdict)>],
    parse_time: Duration,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ratio = |d: Duration| d.as_secs_f64() / parse_time.as_secs_f64();
    let root = TestPinRoot::new("policy-bench");
    let mut dp = root.load().expect("load datapath");

    let t = Instant::now();
    dp.policy
        .replace_all(first.to_vec())
        .expect("first program");
    let first_time = t.elapsed();
    let first = dp.policy.last_publication().expect("published");
    println!(
        "  program the table (laid out from scratch) {:7.1} ms  ratio {:5.2}  {} slots written",
        ms(first_time),
        ratio(first_time),
        first.slots_written
    );
    let mut change_time = Duration::MAX;
    let mut writes = Vec::new();
    for rules in changes {
        let t = Instant::now();
        dp.policy.replace_all(rules.clone()).expect("change");
        change_time = change_time.min(t.elapsed());
        let publication = dp.policy.last_publication().expect("published");
        writes.push((
            publication.rules_changed,
            publication.slots_written,
            publication.rebuilt,
        ));
    }
    // The first change writes the second copy, never written before, whole; from then on a
    // copy is one change behind the live one, so a change writes its own slots and those of
    // the change before it.
    let first_change = writes.first().copied().unwrap_or_default();
    let (changed, slots, _) = writes.iter().skip(1).copied().max().unwrap_or_default();
    let rebuilds = writes.iter().filter(|(_, _, rebuilt)| *rebuilt).count();
    println!(
        "  one rule's port changed: reprogram      {:9.1} ms  ratio {:5.2}  {changed} rules changed, \
         at most {slots} slots written ({} into the copy never written before), {rebuilds} of {} \
         changes rebuilt the table",
        ms(change_time),
        ratio(change_time),
        first_change.1,
        writes.len()
    );

    // Pod IPs: 10 per node in the /24 pod CIDRs of 1,000 nodes, as the agent layers them.
    for node in 0..1_000u32 {
        let net = Ipv4Addr::from(0x0a00_0000 + (node << 8));
        dp.ipcache
            .insert(
                Prefix::new(net.into(), 24).expect("prefix"),
                nodeseal_bpf::identity::UNMANAGED,
                Location::RemotePod(NodeId(u16::try_from(node + 1).expect("node id"))),
            )
            .expect("pod CIDR");
    }
    let pod = |i: u32| {
        let node = i / 10;
        (
            Prefix::new(
                Ipv4Addr::from(0x0a00_0000 + (node << 8) + 2 + i % 10).into(),
                32,
            )
            .expect("prefix"),
            Location::RemotePod(NodeId(u16::try_from(node + 1).expect("node id"))),
        )
    };
    let t = Instant::now();
    for i in 0..IDENTITIES {
        let (prefix, location) = pod(i);
        dp.ipcache
            .insert(prefix, 256 + i, location)
            .expect("pod IP");
    }
    let pods_time = t.elapsed();
    let (prefix, location) = pod(0);
    let t = Instant::now();
    dp.ipcache
        .insert(prefix, 256 + IDENTITIES, location)
        .expect("pod IP");
    let one_time = t.elapsed();
    println!(
        "  ipcache: {IDENTITIES} pod IPs written        {:9.1} ms  ratio {:5.2}; one pod's identity changed: 1 entry, {:.3} ms",
        ms(pods_time),
        ratio(pods_time),
        ms(one_time)
    );
}
