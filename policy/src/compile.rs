//! Compiles policies into the entries of the BPF policy table for the identities on this node.
//!
//! The datapath (`bpf/programs/src/policy.rs`) looks up `(peer, protocol, port)` (only for
//! packets with a port other than 0), then `(peer, protocol, 0)`, then `(peer, 0, 0)`, then
//! the same three with the wildcard peer [`identity::ANY`]; the first hit decides and a miss
//! denies. The semantics to reproduce (see the crate docs) is "allowed iff an allow rule
//! matches and no deny rule does", so the compiler, not the datapath, resolves deny over allow:
//!
//! 1. Per enforced (subject, direction), the rules that match every peer (`all`) give the
//!    verdicts of the wildcard peer; they are encoded against "a miss denies".
//! 2. Every other peer identity named by some rule gets the verdicts of the rules that match it
//!    plus the wildcard rules, encoded against "a miss falls through to the wildcard entries".
//!    Peers matched by the same rules share one encoding; a peer whose verdicts equal the
//!    wildcard's gets no entries.
//! 3. The encoding of one peer is the smallest set of entries over the three-level lookup
//!    (any protocol, one protocol, one port) that gives the wanted verdict for every packet:
//!    an exact search over the tree of protocols and ports the rules name, so deny entries are
//!    written only where a broader allow would otherwise win, and allow entries only where the
//!    level above would not already give them.
//!
//! Port ranges are expanded to one entry per port (the table has no ranges); a compile whose
//! entries exceed [`capacity::POLICY`] is refused.
//!
//! A [`Compiler`] keeps the entries of each (subject, direction) between calls and encodes
//! again only those whose rules, or the identities their peers can match, changed: one rule
//! changed re-encodes the subjects that rule applies to, not the node. The free [`compile`]
//! is a compiler used once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map::Entry};
use std::hash::{BuildHasher, RandomState};

use ipnet::IpNet;
use nodeseal_bpf_common::{
    identity,
    maps::{EndpointInfo, PolicyKey, capacity, policy_verdict},
};
use thiserror::Error;

use crate::{
    labels::{Labels, NAMESPACE_KEY},
    rule::{Action, Direction, Entity, Peer, PeerIdentity, Policy, Rule},
    selector::Operator,
};

/// The identities policies can name, besides the reserved ones (host, world, remote-node),
/// which are known by number.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identities {
    /// Workload identities and their labels.
    pub workloads: BTreeMap<u32, Labels>,
    /// CIDR identities, for the prefixes [`cidr_prefixes`] asked for (and any others).
    pub cidrs: BTreeMap<IpNet, u32>,
}

/// The prefixes the policies' CIDR rules need identities for: every `cidr` and every `except`
/// (an address in an except prefix must get that prefix's identity, which the rule does not
/// match, rather than the identity of the enclosing cidr).
#[must_use]
pub fn cidr_prefixes(policies: &[Policy]) -> BTreeSet<IpNet> {
    let mut prefixes = BTreeSet::new();
    for rule in policies.iter().flat_map(|p| &p.rules) {
        for peer in &rule.peers {
            if let Peer::Cidr { cidr, except } = peer {
                prefixes.insert(*cidr);
                prefixes.extend(except.iter().copied());
            }
        }
    }
    prefixes
}

/// What to program for the subjects on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Which directions each subject enforces (every subject asked for has an entry).
    pub enforcement: BTreeMap<u32, Enforcement>,
    /// The policy table.
    pub entries: BTreeMap<MapEntryKey, Verdict>,
}

/// The directions a subject enforces (default deny).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enforcement {
    /// Traffic toward the subject is checked.
    pub ingress: bool,
    /// Traffic from the subject is checked.
    pub egress: bool,
}

impl Enforcement {
    /// The `EndpointInfo` flags.
    #[must_use]
    pub fn endpoint_flags(self) -> u32 {
        let mut flags = 0;
        if self.ingress {
            flags |= EndpointInfo::FLAG_ENFORCE_INGRESS;
        }
        if self.egress {
            flags |= EndpointInfo::FLAG_ENFORCE_EGRESS;
        }
        flags
    }

    fn set(&mut self, direction: Direction) {
        match direction {
            Direction::Ingress => self.ingress = true,
            Direction::Egress => self.egress = true,
        }
    }
}

/// A key of the policy table; 0 in `peer`, `protocol` or `port` is the wildcard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MapEntryKey {
    /// The endpoint's identity.
    pub subject: u32,
    /// The other side's identity, or [`identity::ANY`].
    pub peer: u32,
    /// IP protocol, or 0 for any.
    pub protocol: u8,
    /// Destination port, or 0 for any.
    pub port: u16,
    /// Direction seen from the subject.
    pub direction: Direction,
}

impl MapEntryKey {
    /// The datapath's key.
    #[must_use]
    pub fn to_policy_key(self) -> PolicyKey {
        PolicyKey {
            subject: self.subject,
            peer: self.peer,
            port: self.port,
            protocol: self.protocol,
            direction: self.direction.key_value(),
        }
    }
}

/// The verdict of a table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Let the packet through.
    Allow,
    /// Drop it (policy denied).
    Deny,
}

impl Verdict {
    /// The datapath's value (`policy_verdict`).
    #[must_use]
    pub fn map_value(self) -> u8 {
        match self {
            Self::Allow => policy_verdict::ALLOW,
            Self::Deny => policy_verdict::DENY,
        }
    }
}

/// Why a compile was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CompileError {
    /// More entries than the table holds. `policy` is the one contributing the most port
    /// entries to the subject and direction being compiled when the table filled up.
    #[error(
        "the policy table would need more than {capacity} entries; policy {policy:?} contributes the most"
    )]
    TooManyEntries {
        /// `namespace/name` or `name`.
        policy: String,
        /// The table's capacity.
        capacity: usize,
    },
    /// A subject the identities do not describe.
    #[error("subject identity {identity} is not a known workload identity")]
    UnknownSubject {
        /// The identity.
        identity: u32,
    },
    /// An identity that is reserved, the wildcard, or given twice.
    #[error("identity {identity} is reserved or given twice")]
    ConflictingIdentity {
        /// The identity.
        identity: u32,
    },
}

/// Compiles `policies` for the `subjects` on this node, from scratch.
///
/// # Errors
///
/// [`CompileError`]: more entries than [`capacity::POLICY`], a subject missing from
/// `identities.workloads`, or an identity number used twice (or reserved).
pub fn compile(
    policies: &[Policy],
    identities: &Identities,
    subjects: &BTreeSet<u32>,
) -> Result<Compiled, CompileError> {
    Compiler::default().compile(policies, identities, subjects)
}

/// Compiles policies change after change, encoding again only the enforced (subject,
/// direction) units whose inputs changed and reusing the entries of the others.
///
/// A unit's entries depend only on the rules that apply to the subject in that direction and
/// on the identities those rules' peers match. So a unit keeps its rules (compared by value,
/// in order) and a keyed hash of each part of [`Identities`] its peers can match: workloads
/// (endpoint selectors, `cluster`), CIDRs (CIDR peers, `world`), or neither (`host` and
/// `remote-node` are reserved identities, `all` is every identity). Every call still checks
/// the identities and finds each subject's rules, so its result and errors are those of
/// [`compile`].
#[derive(Debug, Default)]
pub struct Compiler {
    /// Keys the identities' hashes. Random per compiler, so that no input can be crafted to
    /// collide with another and make a unit look unchanged.
    hasher: RandomState,
    units: HashMap<(u32, Direction), Unit>,
    last_stats: CompileStats,
}

/// How much of a compile was done again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileStats {
    /// Enforced (subject, direction) units encoded.
    pub compiled: usize,
    /// Units whose entries were reused from the calls before.
    pub reused: usize,
}

/// The entries of one enforced (subject, direction), and what they were encoded from.
#[derive(Debug)]
struct Unit {
    rules: Vec<Rule>,
    identities: IdentitiesRead,
    /// `(peer, protocol, port, verdict)`.
    entries: Vec<(u32, u8, u16, Verdict)>,
}

/// The hashes of the parts of the identities a unit's peers can match; `None` for a part they
/// cannot, whose changes leave the unit as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IdentitiesRead {
    workloads: Option<u64>,
    cidrs: Option<u64>,
}

impl Compiler {
    /// Compiles `policies` for the `subjects` on this node: the same result as [`compile`],
    /// but only the units whose rules or matched identities changed since the calls before
    /// are encoded ([`Compiler::last_stats`]).
    ///
    /// # Errors
    ///
    /// As [`compile`]. A failed call drops no unit: each still matches what it was encoded
    /// from.
    pub fn compile(
        &mut self,
        policies: &[Policy],
        identities: &Identities,
        subjects: &BTreeSet<u32>,
    ) -> Result<Compiled, CompileError> {
        let universe = universe(identities)?;
        let rules: Vec<(usize, &Rule)> = policies
            .iter()
            .enumerate()
            .flat_map(|(index, policy)| policy.rules.iter().map(move |rule| (index, rule)))
            .collect();
        // Which peers each rule matches, computed the first time a unit to encode needs it.
        let mut peer_sets: Vec<Option<PeerSet>> = vec![None; rules.len()];
        // Hashed at most once per call, and only when some unit's peers can match that part.
        let mut workloads_hash = None;
        let mut cidrs_hash = None;
        let mut compiled = Compiled::default();
        let mut stats = CompileStats::default();
        let mut enforced: HashSet<(u32, Direction)> = HashSet::new();
        let index = SubjectIndex::new(&rules);
        for &subject in subjects {
            let labels = identities
                .workloads
                .get(&subject)
                .ok_or(CompileError::UnknownSubject { identity: subject })?;
            let enforcement = compiled.enforcement.entry(subject).or_default();
            let selecting = index.selecting(&rules, labels);
            for direction in [Direction::Ingress, Direction::Egress] {
                let relevant: Vec<usize> = selecting
                    .iter()
                    .copied()
                    .filter(|&i| rules[i].1.direction == direction)
                    .collect();
                if relevant.is_empty() {
                    continue;
                }
                enforcement.set(direction);
                enforced.insert((subject, direction));
                let (reads_workloads, reads_cidrs) = relevant
                    .iter()
                    .map(|&i| identities_read(rules[i].1))
                    .fold((false, false), |(w, c), (rw, rc)| (w || rw, c || rc));
                let read = IdentitiesRead {
                    workloads: reads_workloads.then(|| {
                        *workloads_hash
                            .get_or_insert_with(|| self.hasher.hash_one(&identities.workloads))
                    }),
                    cidrs: reads_cidrs.then(|| {
                        *cidrs_hash.get_or_insert_with(|| self.hasher.hash_one(&identities.cidrs))
                    }),
                };
                // The fresh compile fails at the first unit that takes the table past its
                // capacity: checking each unit as a whole fails at the same one.
                let room = (capacity::POLICY as usize).saturating_sub(compiled.entries.len());
                let overflow = || CompileError::TooManyEntries {
                    policy: blame(policies, &rules, &relevant),
                    capacity: capacity::POLICY as usize,
                };
                let unit = match self.units.entry((subject, direction)) {
                    Entry::Occupied(unit)
                        if unit.get().identities == read
                            && unit
                                .get()
                                .rules
                                .iter()
                                .eq(relevant.iter().map(|&i| rules[i].1)) =>
                    {
                        stats.reused += 1;
                        unit.into_mut()
                    }
                    unit => {
                        for &i in &relevant {
                            if peer_sets[i].is_none() {
                                peer_sets[i] = Some(PeerSet::of(rules[i].1, &universe));
                            }
                        }
                        let entries = encode_unit(&rules, &relevant, &peer_sets, room)
                            .ok_or_else(overflow)?;
                        stats.compiled += 1;
                        unit.insert_entry(Unit {
                            rules: relevant.iter().map(|&i| rules[i].1.clone()).collect(),
                            identities: read,
                            entries,
                        })
                        .into_mut()
                    }
                };
                if unit.entries.len() > room {
                    return Err(overflow());
                }
                compiled.entries.extend(unit.entries.iter().map(
                    |&(peer, protocol, port, verdict)| {
                        let key = MapEntryKey {
                            subject,
                            peer,
                            protocol,
                            port,
                            direction,
                        };
                        (key, verdict)
                    },
                ));
            }
        }
        // Subjects gone or no longer enforcing a direction.
        self.units.retain(|key, _| enforced.contains(key));
        self.last_stats = stats;
        Ok(compiled)
    }

    /// What the last successful [`Compiler::compile`] encoded and reused.
    #[must_use]
    pub fn last_stats(&self) -> CompileStats {
        self.last_stats
    }
}

/// Whether a rule's peers can match (workloads, CIDR identities); the other identities they
/// can match are reserved ones, which never change.
fn identities_read(rule: &Rule) -> (bool, bool) {
    if rule.peers.contains(&Peer::Entity(Entity::All)) {
        // `PeerSet::All`: the rule matches every identity without looking at any.
        return (false, false);
    }
    rule.peers
        .iter()
        .fold((false, false), |(workloads, cidrs), peer| match peer {
            Peer::Endpoints(_) | Peer::Entity(Entity::Cluster) => (true, cidrs),
            Peer::Cidr { .. } | Peer::Entity(Entity::World) => (workloads, true),
            Peer::Entity(Entity::Host | Entity::RemoteNode | Entity::All) => (workloads, cidrs),
        })
}

/// The `(peer, protocol, port, verdict)` entries of one (subject, direction), from its
/// `relevant` rules, whose peer sets are computed; `None` when they are more than `room`.
fn encode_unit(
    rules: &[(usize, &Rule)],
    relevant: &[usize],
    peer_sets: &[Option<PeerSet>],
    room: usize,
) -> Option<Vec<(u32, u8, u16, Verdict)>> {
    let mut wildcard = Verdicts::default();
    let mut by_peer: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for &i in relevant {
        match &peer_sets[i] {
            Some(PeerSet::All) => wildcard.add(rules[i].1),
            Some(PeerSet::Some(ids)) => {
                for &id in ids {
                    by_peer.entry(id).or_default().push(i);
                }
            }
            None => {}
        }
    }
    let mut entries = Vec::new();
    let mut write = |peer: u32, encoded: &[(u8, u16, Verdict)]| {
        if entries.len() + encoded.len() > room {
            return None;
        }
        entries.extend(
            encoded
                .iter()
                .map(|&(protocol, port, verdict)| (peer, protocol, port, verdict)),
        );
        Some(())
    };
    write(identity::ANY, &encode(&wildcard, &Fallback::Deny))?;

    let mut groups: BTreeMap<Vec<usize>, Vec<u32>> = BTreeMap::new();
    for (peer, matched) in by_peer {
        groups.entry(matched).or_default().push(peer);
    }
    for (matched, peers) in groups {
        let mut verdicts = wildcard.clone();
        for i in matched {
            verdicts.add(rules[i].1);
        }
        let encoded = encode(&verdicts, &Fallback::Wildcard(&wildcard));
        for peer in peers {
            write(peer, &encoded)?;
        }
    }
    Some(entries)
}

/// Every identity a peer can have, with what rules can tell about it.
fn universe(identities: &Identities) -> Result<Vec<(u32, PeerIdentity<'_>)>, CompileError> {
    let mut universe = vec![
        (identity::HOST, PeerIdentity::Host),
        (identity::WORLD, PeerIdentity::World),
        (identity::REMOTE_NODE, PeerIdentity::RemoteNode),
        (identity::UNMANAGED, PeerIdentity::Unmanaged),
    ];
    let mut seen: BTreeSet<u32> = universe.iter().map(|(id, _)| *id).collect();
    seen.insert(identity::ANY);
    let workloads = identities
        .workloads
        .iter()
        .map(|(id, labels)| (*id, PeerIdentity::Workload(labels)));
    let cidrs = identities
        .cidrs
        .iter()
        .map(|(prefix, id)| (*id, PeerIdentity::Cidr(*prefix)));
    for (id, peer) in workloads.chain(cidrs) {
        if !seen.insert(id) {
            return Err(CompileError::ConflictingIdentity { identity: id });
        }
        universe.push((id, peer));
    }
    Ok(universe)
}

/// The name of the policy with the most port entries among `relevant` rules.
fn blame(policies: &[Policy], rules: &[(usize, &Rule)], relevant: &[usize]) -> String {
    let mut weight: BTreeMap<usize, u64> = BTreeMap::new();
    for &i in relevant {
        let (policy, rule) = rules[i];
        let ports: u64 = rule
            .ports
            .iter()
            .map(|spec| {
                let ports = spec
                    .ports
                    .map_or(1, |r| u64::from(r.last() - r.first()) + 1);
                ports * spec.protocol.numbers().len() as u64
            })
            .sum();
        *weight.entry(policy).or_default() += ports.max(1);
    }
    let heaviest = weight
        .into_iter()
        .max_by_key(|&(index, weight)| (weight, std::cmp::Reverse(index)))
        .map(|(index, _)| index);
    match heaviest.and_then(|index| policies.get(index)) {
        Some(Policy {
            name,
            namespace: Some(namespace),
            ..
        }) => format!("{namespace}/{name}"),
        Some(policy) => policy.name.clone(),
        None => String::new(),
    }
}

/// Finds the rules whose subject selector matches a label set without evaluating every
/// selector: each selector with an `In` requirement is filed under the labels that requirement
/// accepts (a subject it selects carries one of them), preferring a requirement on another key
/// than the namespace, which every namespaced policy's selector has. Only the rules filed under
/// a subject's labels, and those with no `In` requirement, are evaluated for it.
struct SubjectIndex<'a> {
    /// (key without source, value) → rules, in rule order.
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
    /// Rules without an `In` requirement, in rule order.
    unfiled: Vec<usize>,
}

impl<'a> SubjectIndex<'a> {
    fn new(rules: &[(usize, &'a Rule)]) -> Self {
        let mut index = Self {
            by_label: HashMap::new(),
            unfiled: Vec::new(),
        };
        for (i, (_, rule)) in rules.iter().enumerate() {
            let mut anchor = None;
            for requirement in rule.subject.requirements() {
                if let Operator::In(values) = requirement.operator() {
                    let key = requirement.key().key();
                    anchor = Some((key, values));
                    if key != NAMESPACE_KEY {
                        break;
                    }
                }
            }
            match anchor {
                Some((key, values)) => {
                    for value in values {
                        index.by_label.entry((key, value)).or_default().push(i);
                    }
                }
                None => index.unfiled.push(i),
            }
        }
        index
    }

    /// The rules whose subject selector matches `labels`, in rule order.
    fn selecting(&self, rules: &[(usize, &Rule)], labels: &Labels) -> Vec<usize> {
        let mut candidates: Vec<usize> = labels
            .iter()
            .filter_map(|(key, value)| self.by_label.get(&(key.key(), value)))
            .flatten()
            .chain(&self.unfiled)
            .copied()
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        candidates.retain(|&i| rules[i].1.subject.matches(labels));
        candidates
    }
}

/// The peers a rule matches.
#[derive(Clone, Debug)]
enum PeerSet {
    /// Every identity, including ones not known yet.
    All,
    /// These identities.
    Some(Vec<u32>),
}

impl PeerSet {
    fn of(rule: &Rule, universe: &[(u32, PeerIdentity<'_>)]) -> Self {
        if rule.peers.contains(&Peer::Entity(Entity::All)) {
            return Self::All;
        }
        Self::Some(
            universe
                .iter()
                .filter(|(_, peer)| rule.matches_peer(peer))
                .map(|(id, _)| *id)
                .collect(),
        )
    }
}

/// The traffic some rules of one action cover.
#[derive(Clone, Debug, Default)]
struct Coverage {
    /// Every protocol.
    all: bool,
    protocols: BTreeMap<u8, ProtocolCoverage>,
}

#[derive(Clone, Debug, Default)]
struct ProtocolCoverage {
    /// Every port of the protocol.
    whole: bool,
    ports: PortBits,
}

impl Coverage {
    fn add(&mut self, rule: &Rule) {
        if rule.ports.is_empty() {
            self.all = true;
            return;
        }
        for spec in &rule.ports {
            for &protocol in spec.protocol.numbers() {
                let coverage = self.protocols.entry(protocol).or_default();
                match spec.ports {
                    None => coverage.whole = true,
                    Some(range) => coverage.ports.insert(range.first(), range.last()),
                }
            }
        }
    }

    /// Covers packets of a protocol no rule names.
    fn other(&self) -> bool {
        self.all
    }

    /// Covers packets of `protocol` to a port no rule names (or without a port).
    fn rest(&self, protocol: u8) -> bool {
        self.all || self.protocols.get(&protocol).is_some_and(|c| c.whole)
    }

    fn port(&self, protocol: u8, port: u16) -> bool {
        self.rest(protocol)
            || self
                .protocols
                .get(&protocol)
                .is_some_and(|c| c.ports.contains(port))
    }
}

/// A set of ports, one bit each, allocated on first insert.
#[derive(Clone, Debug, Default)]
struct PortBits(Vec<u64>);

impl PortBits {
    const WORDS: usize = 1 << 10;

    fn insert(&mut self, first: u16, last: u16) {
        if self.0.is_empty() {
            self.0 = vec![0; Self::WORDS];
        }
        for port in first..=last {
            self.0[usize::from(port >> 6)] |= 1 << (port & 63);
        }
    }

    fn contains(&self, port: u16) -> bool {
        self.0
            .get(usize::from(port >> 6))
            .is_some_and(|word| word & (1 << (port & 63)) != 0)
    }

    fn union_into(&self, into: &mut Vec<u64>) {
        if self.0.is_empty() {
            return;
        }
        if into.is_empty() {
            *into = vec![0; Self::WORDS];
        }
        for (to, from) in into.iter_mut().zip(&self.0) {
            *to |= from;
        }
    }
}

/// The verdicts of a set of rules for one peer: allow iff allowed and not denied.
#[derive(Clone, Debug, Default)]
struct Verdicts {
    allow: Coverage,
    deny: Coverage,
}

impl Verdicts {
    fn add(&mut self, rule: &Rule) {
        match rule.action {
            Action::Allow => self.allow.add(rule),
            Action::Deny => self.deny.add(rule),
        }
    }

    fn other(&self) -> Verdict {
        verdict(self.allow.other(), self.deny.other())
    }

    fn rest(&self, protocol: u8) -> Verdict {
        verdict(self.allow.rest(protocol), self.deny.rest(protocol))
    }

    fn port(&self, protocol: u8, port: u16) -> Verdict {
        verdict(
            self.allow.port(protocol, port),
            self.deny.port(protocol, port),
        )
    }

    fn coverages(&self) -> [&Coverage; 2] {
        [&self.allow, &self.deny]
    }
}

fn verdict(allowed: bool, denied: bool) -> Verdict {
    if allowed && !denied {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}

/// What a packet gets when none of a peer's three lookups hits.
enum Fallback<'a> {
    /// The wildcard peer's miss: drop.
    Deny,
    /// A named peer's miss: the wildcard peer's entries, which give these verdicts.
    Wildcard(&'a Verdicts),
}

impl Fallback<'_> {
    fn other(&self) -> Verdict {
        match self {
            Self::Deny => Verdict::Deny,
            Self::Wildcard(verdicts) => verdicts.other(),
        }
    }

    fn rest(&self, protocol: u8) -> Verdict {
        match self {
            Self::Deny => Verdict::Deny,
            Self::Wildcard(verdicts) => verdicts.rest(protocol),
        }
    }

    fn port(&self, protocol: u8, port: u16) -> Verdict {
        match self {
            Self::Deny => Verdict::Deny,
            Self::Wildcard(verdicts) => verdicts.port(protocol, port),
        }
    }

    fn coverages(&self) -> Vec<&Coverage> {
        match self {
            Self::Deny => Vec::new(),
            Self::Wildcard(verdicts) => verdicts.coverages().to_vec(),
        }
    }
}

/// What a lookup level inherits from the levels above it for the same peer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Above {
    /// No entry above: a miss here falls back.
    Miss,
    /// An entry above decides.
    Entry(Verdict),
}

impl Above {
    fn resolve(self, fallback: Verdict) -> Verdict {
        match self {
            Self::Miss => fallback,
            Self::Entry(verdict) => verdict,
        }
    }
}

/// The fewest `(protocol, port, verdict)` entries (0 = wildcard) that make the three lookups
/// of one peer give `wanted` for every packet, when a miss on all three gives `fallback`.
fn encode(wanted: &Verdicts, fallback: &Fallback<'_>) -> Vec<(u8, u16, Verdict)> {
    // The protocols and ports where `wanted` or `fallback` can change: everywhere else a
    // packet is decided by the level above.
    let mut tree: BTreeMap<u8, Vec<u64>> = BTreeMap::new();
    for coverage in wanted.coverages().into_iter().chain(fallback.coverages()) {
        for (&protocol, c) in &coverage.protocols {
            c.ports.union_into(tree.entry(protocol).or_default());
        }
    }
    let tree: Vec<(u8, Vec<u16>)> = tree
        .into_iter()
        .map(|(protocol, bits)| (protocol, set_ports(&bits)))
        .collect();

    let leaf_cost = |protocol: u8, ports: &[u16], above: Above| {
        ports
            .iter()
            .filter(|&&port| {
                above.resolve(fallback.port(protocol, port)) != wanted.port(protocol, port)
            })
            .count()
    };
    // (cost, entry at the protocol level) of one protocol's subtree.
    let protocol_plan = |protocol: u8, ports: &[u16], above: Above| {
        let rest = wanted.rest(protocol);
        let without = (above.resolve(fallback.rest(protocol)) == rest)
            .then(|| leaf_cost(protocol, ports, above));
        let with = 1 + leaf_cost(protocol, ports, Above::Entry(rest));
        match without {
            Some(cost) if cost <= with => (cost, None),
            _ => (with, Some(rest)),
        }
    };
    let subtree_cost = |above: Above| -> usize {
        tree.iter()
            .map(|(protocol, ports)| protocol_plan(*protocol, ports, above).0)
            .sum()
    };

    let other = wanted.other();
    let without_root = (fallback.other() == other).then(|| subtree_cost(Above::Miss));
    let root = match without_root {
        Some(cost) if cost <= 1 + subtree_cost(Above::Entry(other)) => Above::Miss,
        _ => Above::Entry(other),
    };
    let mut entries = Vec::new();
    if let Above::Entry(verdict) = root {
        entries.push((0, 0, verdict));
    }
    for (protocol, ports) in &tree {
        let protocol = *protocol;
        let above = match protocol_plan(protocol, ports, root).1 {
            Some(verdict) => {
                entries.push((protocol, 0, verdict));
                Above::Entry(verdict)
            }
            None => root,
        };
        for &port in ports {
            let verdict = wanted.port(protocol, port);
            if above.resolve(fallback.port(protocol, port)) != verdict {
                entries.push((protocol, port, verdict));
            }
        }
    }
    entries
}

fn set_ports(bits: &[u64]) -> Vec<u16> {
    let mut ports = Vec::new();
    for (index, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let bit = word.trailing_zeros() as usize;
            // 1024 words of 64 bits: index * 64 + bit < 65536.
            if let Ok(port) = u16::try_from(index * 64 + bit) {
                ports.push(port);
            }
            word &= word - 1;
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        document::parse,
        rule::{PortRange, PortSpec, Protocol},
        test_support::{Case, RULE1, Rng, random_case, semantic_allows},
    };

    const DEATHSTAR: u32 = 256;
    const TIEFIGHTER: u32 = 257;
    const XWING: u32 = 258;

    fn star_wars() -> Identities {
        let pod = |org: &str, class: &str| {
            Labels::for_pod(
                "default",
                &[
                    ("org".to_owned(), org.to_owned()),
                    ("class".to_owned(), class.to_owned()),
                ]
                .into(),
                &BTreeMap::new(),
            )
        };
        Identities {
            workloads: [
                (DEATHSTAR, pod("empire", "deathstar")),
                (TIEFIGHTER, pod("empire", "tiefighter")),
                (XWING, pod("alliance", "xwing")),
            ]
            .into(),
            cidrs: BTreeMap::new(),
        }
    }

    fn all_subjects(identities: &Identities) -> BTreeSet<u32> {
        identities.workloads.keys().copied().collect()
    }

    /// The datapath's lookup (`bpf/programs/src/policy.rs`), over `compiled`.
    fn datapath_allows(
        compiled: &Compiled,
        subject: u32,
        direction: Direction,
        peer: u32,
        protocol: u8,
        port: u16,
    ) -> bool {
        let enforcement = compiled
            .enforcement
            .get(&subject)
            .copied()
            .unwrap_or_default();
        let enforced = match direction {
            Direction::Ingress => enforcement.ingress,
            Direction::Egress => enforcement.egress,
        };
        if !enforced {
            return true;
        }
        // TCP, UDP, SCTP and ICMP packets carry "ports" (ICMP: the type).
        let has_ports = matches!(protocol, 6 | 17 | 132 | 1);
        let get = |peer: u32, protocol: u8, port: u16| {
            compiled
                .entries
                .get(&MapEntryKey {
                    subject,
                    peer,
                    protocol,
                    port,
                    direction,
                })
                .copied()
        };
        let lookup = |peer: u32| {
            if has_ports
                && port != 0
                && let Some(verdict) = get(peer, protocol, port)
            {
                return Some(verdict);
            }
            get(peer, protocol, 0).or_else(|| get(peer, 0, 0))
        };
        let verdict = lookup(peer).or_else(|| {
            if peer == identity::ANY {
                None
            } else {
                lookup(identity::ANY)
            }
        });
        verdict == Some(Verdict::Allow)
    }

    /// The index finds exactly the rules whose subject selector matches, in rule order, for
    /// selectors of every shape: on a label, on the namespace alone, on a source, with
    /// `In`/`NotIn`/`Exists`, and empty (clusterwide).
    #[test]
    fn the_subject_index_selects_what_evaluating_every_selector_selects() {
        let document = |kind: &str, name: &str, namespace: Option<&str>, selector: &str| {
            let namespace = namespace.map_or(String::new(), |n| format!(", namespace: {n}"));
            format!(
                "apiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {{name: {name}{namespace}}}\n\
                 spec:\n  endpointSelector: {selector}\n  ingress: [{{fromEntities: [world]}}]\n  \
                 egress: [{{toEntities: [world]}}]\n"
            )
        };
        let cnp = |name, namespace, selector| {
            document("CiliumNetworkPolicy", name, Some(namespace), selector)
        };
        let ccnp =
            |name, selector| document("CiliumClusterwideNetworkPolicy", name, None, selector);
        let yaml = [
            cnp("app-a", "default", "{matchLabels: {app: a}}"),
            cnp("whole-namespace", "default", "{}"),
            cnp("app-a-other", "other", "{matchLabels: {app: a}}"),
            cnp(
                "tiers",
                "default",
                "{matchExpressions: [{key: tier, operator: In, values: [web, api]}]}",
            ),
            cnp(
                "not-a",
                "default",
                "{matchExpressions: [{key: app, operator: NotIn, values: [a]}]}",
            ),
            cnp("k8s-source", "other", "{matchLabels: {'k8s:app': b}}"),
            ccnp("everyone", "{}"),
            ccnp(
                "any-tier",
                "{matchExpressions: [{key: tier, operator: Exists}]}",
            ),
            ccnp("app-c", "{matchLabels: {app: c, tier: db}}"),
        ]
        .join("---\n");
        let policies = parse(yaml.as_bytes()).unwrap();
        let rules: Vec<(usize, &Rule)> = policies
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.rules.iter().map(move |r| (i, r)))
            .collect();
        let index = SubjectIndex::new(&rules);
        assert!(!index.by_label.is_empty() && !index.unfiled.is_empty());
        let mut selected = BTreeSet::new();
        for namespace in ["default", "other", "kube-system"] {
            for app in [None, Some("a"), Some("b"), Some("c")] {
                for tier in [None, Some("web"), Some("db")] {
                    let labels: BTreeMap<String, String> = [("app", app), ("tier", tier)]
                        .into_iter()
                        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned())))
                        .collect();
                    let labels = Labels::for_pod(namespace, &labels, &BTreeMap::new());
                    let every: Vec<usize> = (0..rules.len())
                        .filter(|&i| rules[i].1.subject.matches(&labels))
                        .collect();
                    assert_eq!(index.selecting(&rules, &labels), every, "{labels:?}");
                    selected.extend(every);
                }
            }
        }
        assert_eq!(selected.len(), rules.len(), "every rule selects some case");
    }

    #[test]
    fn star_wars_rule1() {
        let identities = star_wars();
        let policies = parse(RULE1.as_bytes()).unwrap();
        let compiled = compile(&policies, &identities, &all_subjects(&identities)).unwrap();
        let allows = |peer, protocol, port| {
            datapath_allows(
                &compiled,
                DEATHSTAR,
                Direction::Ingress,
                peer,
                protocol,
                port,
            )
        };
        assert!(allows(TIEFIGHTER, 6, 80));
        assert!(!allows(TIEFIGHTER, 6, 81));
        assert!(!allows(TIEFIGHTER, 17, 80));
        assert!(!allows(TIEFIGHTER, 1, 8));
        assert!(!allows(XWING, 6, 80));
        assert!(!allows(identity::WORLD, 6, 80));
        assert_eq!(
            compiled.enforcement[&DEATHSTAR],
            Enforcement {
                ingress: true,
                egress: false
            }
        );
        assert_eq!(compiled.enforcement[&XWING], Enforcement::default());
        assert_eq!(
            compiled.enforcement[&DEATHSTAR].endpoint_flags(),
            EndpointInfo::FLAG_ENFORCE_INGRESS
        );
        // The deathstar is of the empire too: it may reach itself.
        assert!(allows(DEATHSTAR, 6, 80));
        // Smallest table: one entry per empire identity.
        let key = |peer| MapEntryKey {
            subject: DEATHSTAR,
            peer,
            protocol: 6,
            port: 80,
            direction: Direction::Ingress,
        };
        assert_eq!(
            compiled.entries,
            BTreeMap::from([
                (key(DEATHSTAR), Verdict::Allow),
                (key(TIEFIGHTER), Verdict::Allow)
            ])
        );
        assert_eq!(
            key(TIEFIGHTER).to_policy_key().direction,
            PolicyKey::INGRESS
        );
    }

    #[test]
    fn deny_wins_over_a_broader_allow() {
        let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n\
            spec:\n  endpointSelector: {matchLabels: {class: deathstar}}\n\
            \x20 ingress: [{fromEntities: [cluster]}]\n\
            \x20 ingressDeny: [{fromEndpoints: [{matchLabels: {class: tiefighter}}], toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]}]\n";
        let identities = star_wars();
        let compiled = compile(
            &parse(text.as_bytes()).unwrap(),
            &identities,
            &all_subjects(&identities),
        )
        .unwrap();
        let allows = |peer, protocol, port| {
            datapath_allows(
                &compiled,
                DEATHSTAR,
                Direction::Ingress,
                peer,
                protocol,
                port,
            )
        };
        assert!(!allows(TIEFIGHTER, 6, 80));
        assert!(allows(TIEFIGHTER, 6, 81));
        assert!(allows(TIEFIGHTER, 1, 0));
        assert!(allows(XWING, 6, 80));
        assert!(allows(identity::HOST, 6, 80));
        assert!(!allows(identity::WORLD, 6, 80));
        let key = |protocol, port| MapEntryKey {
            subject: DEATHSTAR,
            peer: TIEFIGHTER,
            protocol,
            port,
            direction: Direction::Ingress,
        };
        assert_eq!(compiled.entries.get(&key(0, 0)), Some(&Verdict::Allow));
        assert_eq!(compiled.entries.get(&key(6, 80)), Some(&Verdict::Deny));
    }

    #[test]
    fn default_deny_and_entities() {
        let text = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\n\
            specs:\n- endpointSelector: {matchLabels: {class: xwing}}\n  ingress: [{}]\n\
            - endpointSelector: {matchLabels: {class: tiefighter}}\n  egress: [{toEntities: [host, world]}]\n";
        let identities = star_wars();
        let compiled = compile(
            &parse(text.as_bytes()).unwrap(),
            &identities,
            &all_subjects(&identities),
        )
        .unwrap();
        for peer in [
            DEATHSTAR,
            TIEFIGHTER,
            identity::HOST,
            identity::WORLD,
            12_345,
        ] {
            assert!(!datapath_allows(
                &compiled,
                XWING,
                Direction::Ingress,
                peer,
                6,
                80
            ));
        }
        assert!(compiled.enforcement[&XWING].ingress);
        let egress = |peer| datapath_allows(&compiled, TIEFIGHTER, Direction::Egress, peer, 17, 53);
        assert!(egress(identity::HOST));
        assert!(egress(identity::WORLD));
        assert!(!egress(identity::REMOTE_NODE));
        assert!(!egress(DEATHSTAR));
        assert!(!egress(99_999));
    }

    #[test]
    fn cidr_with_except() {
        let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n\
            spec:\n  endpointSelector: {}\n\
            \x20 egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}], toPorts: [{ports: [{port: \"443\"}]}]}]\n";
        let policies = parse(text.as_bytes()).unwrap();
        let prefixes = cidr_prefixes(&policies);
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            prefixes,
            BTreeSet::from([net("10.0.0.0/8"), net("10.1.0.0/16")])
        );
        let mut identities = star_wars();
        identities.cidrs = [
            (net("10.0.0.0/8"), 1 << 24),
            (net("10.1.0.0/16"), (1 << 24) + 1),
            (net("10.2.0.0/16"), (1 << 24) + 2),
        ]
        .into();
        let compiled = compile(&policies, &identities, &all_subjects(&identities)).unwrap();
        let egress = |peer, protocol| {
            datapath_allows(
                &compiled,
                TIEFIGHTER,
                Direction::Egress,
                peer,
                protocol,
                443,
            )
        };
        assert!(egress(1 << 24, 6));
        assert!(egress(1 << 24, 17));
        assert!(egress((1 << 24) + 2, 132));
        assert!(!egress((1 << 24) + 1, 6));
        assert!(!egress(identity::WORLD, 6));
        assert!(!egress(XWING, 6));
    }

    #[test]
    fn network_policy_compiles_like_the_equivalent_cnp() {
        let network_policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
            metadata: {name: rule1}\nspec:\n  podSelector: {matchLabels: {org: empire, class: deathstar}}\n\
            \x20 ingress:\n  - from: [{podSelector: {matchLabels: {org: empire}}}]\n    ports: [{port: 80, protocol: TCP}]\n";
        let identities = star_wars();
        let subjects = all_subjects(&identities);
        let from_np = compile(
            &parse(network_policy.as_bytes()).unwrap(),
            &identities,
            &subjects,
        );
        let from_cnp = compile(&parse(RULE1.as_bytes()).unwrap(), &identities, &subjects);
        assert_eq!(from_np.unwrap(), from_cnp.unwrap());
    }

    #[test]
    fn refuses_more_entries_than_the_table_holds() {
        let text = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: wide}\n\
            spec:\n  endpointSelector: {}\n\
            \x20 ingress: [{fromEntities: [cluster], toPorts: [{ports: [{port: \"2\", endPort: 40000}]}]}]\n";
        let identities = star_wars();
        let err = compile(
            &parse(text.as_bytes()).unwrap(),
            &identities,
            &all_subjects(&identities),
        )
        .unwrap_err();
        assert_eq!(
            err,
            CompileError::TooManyEntries {
                policy: "wide".into(),
                capacity: 65_536
            }
        );
        // One range of every port is one entry.
        let whole = text.replace("\"2\", endPort: 40000", "\"1\", endPort: 65535");
        let compiled = compile(
            &parse(whole.as_bytes()).unwrap(),
            &identities,
            &all_subjects(&identities),
        )
        .unwrap();
        assert!(compiled.entries.len() < 100, "{}", compiled.entries.len());
    }

    #[test]
    fn refuses_unknown_subjects_and_conflicting_identities() {
        let identities = star_wars();
        assert_eq!(
            compile(&[], &identities, &BTreeSet::from([999])),
            Err(CompileError::UnknownSubject { identity: 999 })
        );
        let mut conflicting = star_wars();
        conflicting
            .cidrs
            .insert("10.0.0.0/8".parse().unwrap(), DEATHSTAR);
        assert_eq!(
            compile(&[], &conflicting, &BTreeSet::new()),
            Err(CompileError::ConflictingIdentity {
                identity: DEATHSTAR
            })
        );
        let mut reserved = star_wars();
        reserved.workloads.insert(identity::HOST, Labels::new());
        assert!(compile(&[], &reserved, &BTreeSet::new()).is_err());
    }

    #[test]
    fn wildcard_rules_use_the_wildcard_peer() {
        let rule = Rule {
            subject: crate::selector::Selector::everything(),
            direction: Direction::Egress,
            action: Action::Allow,
            peers: vec![Peer::Entity(Entity::All)],
            ports: vec![PortSpec::new(Protocol::Udp, PortRange::new(53, 53))],
            origin: "spec.egress[0]".into(),
        };
        let policy = Policy {
            name: "dns".into(),
            namespace: None,
            kind: crate::rule::PolicyKind::CiliumClusterwideNetworkPolicy,
            rules: vec![rule],
        };
        let identities = star_wars();
        let compiled = compile(&[policy], &identities, &all_subjects(&identities)).unwrap();
        assert_eq!(compiled.entries.len(), 3);
        assert!(
            compiled
                .entries
                .keys()
                .all(|k| k.peer == identity::ANY && k.port == 53)
        );
    }

    /// Policy `j` of a fleet: the pods of app a`j` accept team t`j % 30` on one port, deny
    /// team t29 outright, and may reach the world on 443 (the bench's policies, smaller).
    fn fleet_policy(j: usize, port: u16) -> Vec<Policy> {
        let text = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{j}}}\nspec:\n  \
             endpointSelector: {{matchLabels: {{app: a{j}}}}}\n  ingress:\n  - fromEndpoints:\n    \
             - matchLabels: {{team: t{team}}}\n    toPorts:\n    - ports: [{{port: \"{port}\", protocol: TCP}}]\n  \
             ingressDeny:\n  - fromEndpoints:\n    - matchLabels: {{team: t29}}\n  egress:\n  \
             - toEntities: [world]\n    toPorts:\n    - ports: [{{port: \"443\", protocol: TCP}}]\n",
            team = j % 30
        );
        parse(text.as_bytes()).unwrap()
    }

    /// Workload `256 + i`: app a`i % 300`, team t`i % 30`.
    fn fleet_workload(i: u32) -> (u32, Labels) {
        let text = format!(
            "app=a{},team=t{},io.kubernetes.pod.namespace=default,replica=r{i}",
            i % 300,
            i % 30
        );
        (256 + i, Labels::parse([text.as_str()]).unwrap())
    }

    #[test]
    fn incremental_compile_equals_a_fresh_one_and_encodes_only_what_changed() {
        let mut policies: Vec<Policy> = (0..300)
            .flat_map(|j| fleet_policy(j, 8000 + (j % 100) as u16))
            .collect();
        let mut identities = Identities {
            workloads: (0..600).map(fleet_workload).collect(),
            cidrs: BTreeMap::new(),
        };
        // Apps a0..a39, one policy each: 40 ingress and 40 egress units.
        let mut subjects: BTreeSet<u32> = (256..296).collect();
        let mut compiler = Compiler::default();
        let mut check = |policies: &[Policy], identities: &Identities, subjects: &BTreeSet<u32>| {
            let incremental = compiler.compile(policies, identities, subjects).unwrap();
            // Not `assert_eq!`: thousands of entries would bury the difference.
            let fresh = compile(policies, identities, subjects).unwrap();
            assert!(incremental == fresh, "differs from a fresh compile");
            (incremental, compiler.last_stats(), compiler.units.len())
        };
        let stats = |compiled, reused| CompileStats { compiled, reused };

        let (first, first_stats, units) = check(&policies, &identities, &subjects);
        assert_eq!((first_stats, units), (stats(80, 0), 80));
        assert_eq!(check(&policies, &identities, &subjects).1, stats(0, 80));

        // Policy 0's port: subject 256's ingress only.
        policies.splice(0..1, fleet_policy(0, 9000));
        let (changed, changed_stats, _) = check(&policies, &identities, &subjects);
        assert_eq!(changed_stats, stats(1, 79));
        assert!(
            changed
                .entries
                .keys()
                .any(|k| k.subject == 256 && k.port == 9000)
        );
        assert_eq!(changed.entries.len(), first.entries.len());

        // A new workload of team t5: every ingress unit's peers are workloads, so each is
        // encoded again; the egress units' peers are the world and CIDRs, reused.
        let (id, labels) = fleet_workload(605);
        identities.workloads.insert(id, labels);
        let (added, added_stats, _) = check(&policies, &identities, &subjects);
        assert_eq!(added_stats, stats(40, 40));
        assert!(
            added
                .entries
                .keys()
                .any(|k| k.subject == 256 + 5 && k.peer == id)
        );

        // A CIDR identity: now the egress units.
        identities
            .cidrs
            .insert("10.0.0.0/8".parse().unwrap(), 1 << 24);
        let (cidr, cidr_stats, _) = check(&policies, &identities, &subjects);
        assert_eq!(cidr_stats, stats(40, 40));
        assert!(cidr.entries.keys().any(|k| k.peer == 1 << 24));

        // A subject leaves: its units go, and come back encoded.
        subjects.remove(&256);
        let (_, removed_stats, units) = check(&policies, &identities, &subjects);
        assert_eq!((removed_stats, units), (stats(0, 78), 78));
        subjects.insert(256);
        assert_eq!(check(&policies, &identities, &subjects).1, stats(2, 78));

        // A subject no policy selects any more: enforces nothing, keeps no unit.
        policies.remove(0);
        let (unselected, unselected_stats, units) = check(&policies, &identities, &subjects);
        assert_eq!((unselected_stats, units), (stats(0, 78), 78));
        assert_eq!(unselected.enforcement[&256], Enforcement::default());
    }

    /// One compiler through random changes (policies replaced, added, removed; identities and
    /// subjects changed) gives exactly what a fresh compile gives, errors included.
    #[test]
    fn incremental_compile_follows_random_changes() {
        let mut rng = Rng::new(0x1c0_4e11);
        let Case {
            mut policies,
            mut identities,
            ..
        } = random_case(&mut rng);
        let mut compiler = Compiler::default();
        let mut reused = 0;
        for step in 0..400 {
            let other = random_case(&mut rng);
            let index = rng.below(policies.len());
            match rng.below(5) {
                0 => policies[index] = other.policies[0].clone(),
                1 => policies.push(other.policies[0].clone()),
                2 if policies.len() > 1 => {
                    policies.remove(index);
                }
                3 => identities = other.identities,
                _ => {}
            }
            let subjects: BTreeSet<u32> = identities
                .workloads
                .keys()
                .copied()
                .filter(|_| rng.chance(80))
                .collect();
            let incremental = compiler.compile(&policies, &identities, &subjects);
            assert_eq!(
                incremental,
                compile(&policies, &identities, &subjects),
                "step {step}"
            );
            reused += compiler.last_stats().reused;
        }
        assert!(reused > 1_000, "{reused}");
    }

    /// The compiled table, read by the datapath's lookup, gives the same verdict as the rules'
    /// semantics, for random policy sets and every subject, peer, protocol and port that
    /// matters.
    #[test]
    fn datapath_over_compiled_table_equals_semantics() {
        const CASES: usize = 300;
        let mut rng = Rng::new(0x5eed_1dea);
        let mut checked = 0_usize;
        let mut entries = 0_usize;
        for case_index in 0..CASES {
            let Case {
                policies,
                identities,
                peers,
                ports,
            } = random_case(&mut rng);
            let subjects = all_subjects(&identities);
            let compiled = compile(&policies, &identities, &subjects).unwrap();
            entries += compiled.entries.len();
            for &subject in &subjects {
                for direction in [Direction::Ingress, Direction::Egress] {
                    for &peer in &peers {
                        let expected =
                            semantic_allows(&policies, &identities, subject, direction, peer);
                        for protocol in [6, 17, 132, 1, 0] {
                            for &port in &ports {
                                let actual = datapath_allows(
                                    &compiled, subject, direction, peer, protocol, port,
                                );
                                assert_eq!(
                                    actual,
                                    expected(protocol, port),
                                    "case {case_index}: subject {subject} {direction} peer {peer} \
                                     proto {protocol} port {port}\npolicies: {policies:#?}"
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        println!("checked {checked} flows over {CASES} random policy sets ({entries} entries)");
        assert!(checked > 1_000_000, "{checked}");
    }
}
