//! Fixtures shared by the unit tests.

/// Cilium's getting-started (Star Wars) L3/L4 policy.
pub(crate) const RULE1: &str = include_str!("../examples/star-wars-rule1.yaml");

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use nodeseal_bpf_common::identity;

use crate::{
    compile::{Identities, cidr_prefixes},
    labels::Labels,
    rule::{
        Action, Direction, Entity, Peer, PeerIdentity, Policy, PolicyKind, PortRange, PortSpec,
        Protocol, Rule,
    },
    selector::{RawExpression, Selector},
};

/// A small deterministic generator (splitmix64), so that failures reproduce.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub(crate) fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A random policy set and the identities to evaluate it over.
pub(crate) struct Case {
    pub(crate) policies: Vec<Policy>,
    pub(crate) identities: Identities,
    /// Every peer identity worth checking: reserved, workloads, CIDRs and one unknown.
    pub(crate) peers: Vec<u32>,
    /// Ports covering the rules' ports, range edges and others.
    pub(crate) ports: Vec<u16>,
}

const NAMESPACES: [&str; 2] = ["n1", "n2"];
const CIDR_POOL: [&str; 8] = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.2.0.0/16",
    "192.168.0.0/16",
    "0.0.0.0/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
];
const RANGES: [(u16, u16); 9] = [
    (53, 53),
    (80, 80),
    (443, 443),
    (79, 81),
    (1000, 1003),
    (1, 65535),
    (65534, 65535),
    (2, 2),
    (440, 450),
];
/// An identity no rule knows (allocated after the compile).
pub(crate) const UNKNOWN_PEER: u32 = 99_999;

pub(crate) fn random_case(rng: &mut Rng) -> Case {
    let mut workloads = BTreeMap::new();
    for index in 0..(4 + rng.below(9)) {
        let namespace = *rng.pick(&NAMESPACES);
        let mut pod = BTreeMap::new();
        if rng.chance(80) {
            pod.insert("app".to_owned(), (*rng.pick(&["a", "b", "c"])).to_owned());
        }
        if rng.chance(50) {
            pod.insert("tier".to_owned(), (*rng.pick(&["x", "y"])).to_owned());
        }
        let team = if namespace == "n1" { "red" } else { "blue" };
        let namespace_labels = BTreeMap::from([("team".to_owned(), team.to_owned())]);
        workloads.insert(
            identity::FIRST_WORKLOAD + index as u32,
            Labels::for_pod(namespace, &pod, &namespace_labels),
        );
    }
    let mut policies = Vec::new();
    for index in 0..(1 + rng.below(4)) {
        let namespace = rng.chance(60).then(|| (*rng.pick(&NAMESPACES)).to_owned());
        let kind = if namespace.is_some() {
            PolicyKind::CiliumNetworkPolicy
        } else {
            PolicyKind::CiliumClusterwideNetworkPolicy
        };
        let rules = (0..(1 + rng.below(4)))
            .map(|rule_index| random_rule(rng, namespace.as_deref(), rule_index))
            .collect();
        policies.push(Policy {
            name: format!("p{index}"),
            namespace,
            kind,
            rules,
        });
    }
    let mut prefixes = cidr_prefixes(&policies);
    for _ in 0..2 {
        prefixes.insert(
            rng.pick(&CIDR_POOL)
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
    }
    let cidrs: BTreeMap<IpNet, u32> = prefixes
        .into_iter()
        .enumerate()
        .map(|(index, prefix)| (prefix, (1 << 24) + index as u32))
        .collect();
    let mut peers = vec![
        identity::HOST,
        identity::WORLD,
        identity::REMOTE_NODE,
        identity::UNMANAGED,
        UNKNOWN_PEER,
    ];
    peers.extend(workloads.keys());
    peers.extend(cidrs.values());
    let mut ports: BTreeSet<u16> = [0, 1, 8080].into();
    for (first, last) in RANGES {
        ports.extend([first, last, first.saturating_sub(1), last.saturating_add(1)]);
    }
    Case {
        policies,
        identities: Identities { workloads, cidrs },
        peers,
        ports: ports.into_iter().collect(),
    }
}

fn random_selector(rng: &mut Rng) -> Selector {
    let expression = |key: &str, operator: &str, values: &[&str]| RawExpression {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
    };
    let mut selector = Selector::everything();
    for _ in 0..rng.below(3) {
        let app = *rng.pick(&["a", "b", "c"]);
        let (labels, expressions) = match rng.below(7) {
            0 => (vec![("app".to_owned(), app.to_owned())], vec![]),
            1 => (vec![], vec![expression("any:app", "In", &[app, "b"])]),
            2 => (vec![], vec![expression("k8s:app", "NotIn", &[app])]),
            3 => (vec![], vec![expression("tier", "Exists", &[])]),
            4 => (vec![], vec![expression("tier", "DoesNotExist", &[])]),
            5 => (
                vec![(
                    "k8s:io.kubernetes.pod.namespace".to_owned(),
                    (*rng.pick(&NAMESPACES)).to_owned(),
                )],
                vec![],
            ),
            _ => {
                let team = *rng.pick(&["red", "blue"]);
                let namespaces = Selector::from_parts(&[("team".to_owned(), team.to_owned())], &[])
                    .unwrap_or_else(|_| unreachable!());
                selector = selector.and(namespaces.of_namespace_labels());
                continue;
            }
        };
        let part = Selector::from_parts(&labels, &expressions).unwrap_or_else(|_| unreachable!());
        selector = selector.and(part);
    }
    selector
}

fn random_rule(rng: &mut Rng, namespace: Option<&str>, index: usize) -> Rule {
    let subject = random_selector(rng);
    let subject = match namespace {
        Some(namespace) => subject.in_namespace(namespace),
        None => subject,
    };
    let mut peers = Vec::new();
    let peer_count = if rng.chance(10) { 0 } else { 1 + rng.below(3) };
    for _ in 0..peer_count {
        peers.push(match rng.below(3) {
            0 => {
                let selector = random_selector(rng);
                Peer::Endpoints(match namespace {
                    Some(namespace) if rng.chance(70) => selector.in_namespace(namespace),
                    _ => selector,
                })
            }
            1 => Peer::Entity(*rng.pick(&[
                Entity::Cluster,
                Entity::Host,
                Entity::RemoteNode,
                Entity::World,
                Entity::All,
            ])),
            _ => {
                let parse = |s: &str| s.parse::<IpNet>().unwrap_or_else(|_| unreachable!());
                let chosen: &&str = rng.pick(&CIDR_POOL);
                let cidr = parse(chosen);
                let except = CIDR_POOL
                    .iter()
                    .map(|s| parse(s))
                    .filter(|e| e != &cidr && cidr.contains(e) && rng.chance(50))
                    .collect();
                Peer::Cidr { cidr, except }
            }
        });
    }
    let mut ports = Vec::new();
    if rng.chance(50) {
        for _ in 0..(1 + rng.below(3)) {
            let protocol =
                *rng.pick(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Any]);
            let range = if rng.chance(20) {
                None
            } else {
                let (first, last) = *rng.pick(&RANGES);
                PortRange::new(first, last)
            };
            ports.push(PortSpec::new(protocol, range));
        }
    }
    let direction = *rng.pick(&[Direction::Ingress, Direction::Egress]);
    let action = if rng.chance(30) {
        Action::Deny
    } else {
        Action::Allow
    };
    Rule {
        subject,
        direction,
        action,
        peers,
        ports,
        origin: format!("spec.rules[{index}]"),
    }
}

/// What rules can tell about identity `peer`.
pub(crate) fn peer_identity(identities: &Identities, peer: u32) -> PeerIdentity<'_> {
    match peer {
        identity::HOST => PeerIdentity::Host,
        identity::WORLD => PeerIdentity::World,
        identity::REMOTE_NODE => PeerIdentity::RemoteNode,
        identity::UNMANAGED => PeerIdentity::Unmanaged,
        _ => {
            if let Some(labels) = identities.workloads.get(&peer) {
                return PeerIdentity::Workload(labels);
            }
            identities
                .cidrs
                .iter()
                .find(|(_, id)| **id == peer)
                .map_or(PeerIdentity::Unknown, |(prefix, _)| {
                    PeerIdentity::Cidr(*prefix)
                })
        }
    }
}

/// The rules' meaning, evaluated directly: not enforced (no rule of the direction selects the
/// subject) allows; else allowed iff an allow rule matches and no deny rule does. Returns the
/// verdict for each (protocol, port) of the flow between `subject` and `peer`.
pub(crate) fn semantic_allows<'a>(
    policies: &'a [Policy],
    identities: &'a Identities,
    subject: u32,
    direction: Direction,
    peer: u32,
) -> impl Fn(u8, u16) -> bool + 'a {
    let labels = &identities.workloads[&subject];
    let selected: Vec<&Rule> = policies
        .iter()
        .flat_map(|p| &p.rules)
        .filter(|r| r.direction == direction && r.subject.matches(labels))
        .collect();
    let enforced = !selected.is_empty();
    let peer = peer_identity(identities, peer);
    let matching: Vec<&Rule> = selected
        .into_iter()
        .filter(|r| r.matches_peer(&peer))
        .collect();
    move |protocol, port| {
        let hit = |action| {
            matching
                .iter()
                .any(|r| r.action == action && r.matches_traffic(protocol, port))
        };
        !enforced || (hit(Action::Allow) && !hit(Action::Deny))
    }
}
