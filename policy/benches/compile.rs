//! Compile cost at scale: 1,000 policies over 10,000 workload identities, for the 100 endpoints
//! of one node, then one rule changed. The baseline, measured in the same run, is parsing the
//! same 1,000 documents: what any agent pays to read the policies at all.
//!
//! `cargo bench -p nodeseal-policy --bench compile`

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark's set-up"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nodeseal_policy::compile::{Identities, compile};
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
        "policy compile bench: {POLICIES} policies, {IDENTITIES} identities, {LOCAL_ENDPOINTS} local endpoints (best of {ROUNDS})"
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
        "  one rule's port changed: recompile      {:9.1} ms  ratio {:5.2}  {} of {} entries differ (the table is republished whole)",
        ms(recompile_time),
        recompile_time.as_secs_f64() / parse_time.as_secs_f64(),
        differing,
        recompiled.entries.len()
    );
    println!(
        "  peak RSS                                {:9} KiB",
        peak_rss_kib()
    );
}
