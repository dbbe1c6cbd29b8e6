//! The identity policy: rules in `POLICY_TABLE`, a cuckoo hash table laid out in an array that
//! userspace builds and the datapath reads with inlined array lookups (see `PolicySlot`).
//!
//! Update protocol: the table has two copies. A change starts from the layout of the copy the
//! datapath reads, removes and inserts only the rules that changed (same seed), writes the
//! slots where the other copy differs from that layout, then switches `POLICY_HEADER` to it
//! with one atomic store. Before the next change writes the other copy, an RCU grace period
//! makes sure no datapath run still reads it. So a change writes a number of slots close to
//! the number of rules it changes, and costs a grace period (milliseconds): batch changes
//! with [`Policy::replace_all`]. When an insertion finds no room under the live seed, the copy
//! is rebuilt whole with a fresh one.

use std::collections::BTreeMap;
use std::hash::BuildHasher as _;

use aya::maps::Map;
use nodeseal_bpf_common::maps::{
    PolicyKey, PolicySlot, PolicyTableHeader, capacity, policy_buckets, policy_verdict,
};

use crate::{
    maps::MapError,
    shared::{Mapping, SharedArray, grace_period},
};

/// Direction of a policy rule, seen from its subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyDirection {
    /// Traffic toward the subject.
    Ingress,
    /// Traffic from the subject.
    Egress,
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyVerdict {
    /// Let it through.
    Allow,
    /// Drop with `policy_denied`.
    Deny,
}

/// One policy map entry. Lookup is most-specific-first (port, then any port, then any protocol;
/// a specific peer before any peer); the agent writes explicit denies where a broader deny must
/// win over a narrower allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyRule {
    /// The local endpoint's identity.
    pub subject: u32,
    /// The other side's identity; `None` for any.
    pub peer: Option<u32>,
    /// IP protocol; `None` for any.
    pub protocol: Option<u8>,
    /// Destination port (ICMP: type); `None` for any. Needs a protocol.
    pub port: Option<u16>,
    /// Direction.
    pub direction: PolicyDirection,
}

impl PolicyRule {
    fn key(&self) -> Result<PolicyKey, MapError> {
        if let (None, Some(port)) = (self.protocol, self.port) {
            return Err(MapError::PortWithoutProtocol { port });
        }
        Ok(PolicyKey {
            subject: self.subject,
            peer: self.peer.unwrap_or(nodeseal_bpf_common::identity::ANY),
            port: self.port.unwrap_or(0),
            protocol: self.protocol.unwrap_or(0),
            direction: match self.direction {
                PolicyDirection::Ingress => PolicyKey::INGRESS,
                PolicyDirection::Egress => PolicyKey::EGRESS,
            },
        })
    }
}

impl PolicyVerdict {
    const fn code(self) -> u8 {
        match self {
            Self::Allow => policy_verdict::ALLOW,
            Self::Deny => policy_verdict::DENY,
        }
    }
}

/// Cuckoo displacements tried per rule before a build gives up on a seed.
const MAX_KICKS: usize = 512;
/// Seeds tried per build (with twice as many slots as rules, the first one practically always
/// works).
const MAX_SEEDS: usize = 8;

/// `POLICY_TABLE` and `POLICY_HEADER`: rules for endpoints whose [`crate::Enforcement`]
/// selects the direction.
pub struct Policy {
    /// Mapped only while read or written (4 MiB, which the agent mostly never touches).
    table: SharedArray,
    header: Mapping,
    rules: BTreeMap<PolicyKey, u8>,
    /// The copy the datapath reads, once one was published.
    live: Option<u32>,
    seeds: std::collections::hash_map::RandomState,
    builds: u64,
    last: Option<Publication>,
}

/// What the last change of the policy table wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Publication {
    /// Rules in the table after it.
    pub rules: usize,
    /// Rules added, removed or given another verdict.
    pub rules_changed: usize,
    /// Slots written into the copy that became live.
    pub slots_written: usize,
    /// The copy was laid out from scratch under a fresh seed (the first table, or a change
    /// that found no room under the live seed) rather than updated in place.
    pub rebuilt: bool,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("rules", &self.rules.len())
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Opens the maps and reads back the rules of the live copy (pinned maps may come from an
    /// earlier loader).
    pub(crate) fn new(table: Map, header: Map) -> Result<Self, MapError> {
        let table = SharedArray::open(table, "POLICY_TABLE", 64)?;
        let header = Mapping::open(header, "POLICY_HEADER", 8)?;
        let slots = 2 * PolicySlot::SLOTS_PER_COPY as usize;
        if table.len() != 2 * slots || header.len() != 1 {
            return Err(MapError::Layout {
                name: "POLICY_TABLE",
                why: format!("{} words, expected {}", table.len(), 2 * slots),
            });
        }
        let mut policy = Self {
            table,
            header,
            rules: BTreeMap::new(),
            live: None,
            seeds: std::collections::hash_map::RandomState::new(),
            builds: 0,
            last: None,
        };
        if let Some((first, _)) = PolicyTableHeader(policy.header.load(0)).live() {
            policy.live = Some(first / PolicySlot::SLOTS_PER_COPY);
            let table = policy.table.map()?;
            for i in first as usize..(first + PolicySlot::SLOTS_PER_COPY) as usize {
                let word0 = table.load(2 * i);
                let word1 = table.load(2 * i + 1);
                let verdict = (word1 >> 32) as u8;
                match verdict {
                    0 => {}
                    policy_verdict::ALLOW | policy_verdict::DENY => {
                        policy
                            .rules
                            .insert(PolicyKey::unpack(word0, word1 as u32), verdict);
                    }
                    other => tracing::warn!(
                        slot = i,
                        verdict = other,
                        "POLICY_TABLE slot with an unknown verdict ignored; it is dropped at the \
                         next change"
                    ),
                }
            }
        }
        Ok(policy)
    }

    /// Inserts or replaces a rule.
    ///
    /// # Errors
    ///
    /// [`MapError::PortWithoutProtocol`]; [`MapError::PolicyFull`] beyond
    /// [`capacity::POLICY`] rules.
    pub fn insert(&mut self, rule: PolicyRule, verdict: PolicyVerdict) -> Result<(), MapError> {
        let mut rules = self.rules.clone();
        rules.insert(rule.key()?, verdict.code());
        self.publish(rules)
    }

    /// Removes a rule.
    ///
    /// # Errors
    ///
    /// [`MapError::PortWithoutProtocol`]; [`MapError::NoSuchRule`] if it is not there;
    pub fn remove(&mut self, rule: PolicyRule) -> Result<(), MapError> {
        let key = rule.key()?;
        let mut rules = self.rules.clone();
        if rules.remove(&key).is_none() {
            return Err(MapError::NoSuchRule(rule));
        }
        self.publish(rules)
    }

    /// Replaces every rule with `rules` in one change (one grace period however many rules).
    ///
    /// # Errors
    ///
    /// As [`Policy::insert`]; on error the previous rules stay in force.
    pub fn replace_all(
        &mut self,
        rules: impl IntoIterator<Item = (PolicyRule, PolicyVerdict)>,
    ) -> Result<(), MapError> {
        let mut new = BTreeMap::new();
        for (rule, verdict) in rules {
            new.insert(rule.key()?, verdict.code());
        }
        self.publish(new)
    }

    /// The verdict of exactly `rule`, if it is there.
    ///
    /// # Errors
    ///
    /// [`MapError::PortWithoutProtocol`].
    pub fn get(&self, rule: PolicyRule) -> Result<Option<PolicyVerdict>, MapError> {
        Ok(self.rules.get(&rule.key()?).map(|v| {
            if *v == policy_verdict::ALLOW {
                PolicyVerdict::Allow
            } else {
                PolicyVerdict::Deny
            }
        }))
    }

    /// Number of rules.
    #[must_use]
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// No rules.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// What the last change wrote, once there was one.
    #[must_use]
    pub fn last_publication(&self) -> Option<Publication> {
        self.last
    }

    /// Lays `rules` out in the copy the datapath does not read and switches to it.
    fn publish(&mut self, rules: BTreeMap<PolicyKey, u8>) -> Result<(), MapError> {
        if self.live.is_some() && rules == self.rules {
            self.last = Some(Publication {
                rules: rules.len(),
                ..Publication::default()
            });
            return Ok(());
        }
        if rules.len() > capacity::POLICY as usize {
            return Err(MapError::PolicyFull {
                rules: rules.len(),
                capacity: capacity::POLICY as usize,
            });
        }
        let copy_words = 2 * PolicySlot::SLOTS_PER_COPY as usize;
        let table = self.table.map()?;
        let header = PolicyTableHeader(self.header.load(0));
        // A copy an older loader laid out by `policy_buckets_legacy` is rebuilt, not updated.
        let live = self
            .live
            .zip(header.live())
            .filter(|_| header.multiplicative());
        self.builds += 1;
        let rng = self.seeds.hash_one(self.builds) | 1;
        let updated = live.and_then(|(live, (_, seed))| {
            let base = live as usize * copy_words;
            let mut slots: Vec<PolicySlot> = (0..PolicySlot::SLOTS_PER_COPY as usize)
                .map(|i| PolicySlot {
                    word0: table.load(base + 2 * i),
                    word1: table.load(base + 2 * i + 1),
                })
                .collect();
            update(&mut slots, &self.rules, &rules, seed, rng).then_some((seed, slots))
        });
        let rebuilt = updated.is_none();
        let (seed, slots) = match updated {
            Some(layout) => layout,
            None => self.build(&rules)?,
        };
        // Runs that read the header before the last switch may still read the other copy.
        let target = match self.live {
            Some(live) => {
                grace_period();
                1 - live
            }
            None => 0,
        };
        let base = target as usize * copy_words;
        let mut slots_written = 0;
        for (i, slot) in slots.iter().enumerate() {
            let (w0, w1) = (base + 2 * i, base + 2 * i + 1);
            if table.load(w0) != slot.word0 || table.load(w1) != slot.word1 {
                table.store(w0, slot.word0);
                table.store(w1, slot.word1);
                slots_written += 1;
            }
        }
        drop(table);
        self.header.store(0, PolicyTableHeader::new(target, seed).0);
        self.live = Some(target);
        self.last = Some(Publication {
            rules: rules.len(),
            rules_changed: changed_rules(&self.rules, &rules).count(),
            slots_written,
            rebuilt,
        });
        self.rules = rules;
        Ok(())
    }

    /// Lays every rule out from scratch (cuckoo hashing with random-walk displacement),
    /// trying fresh seeds if a placement fails.
    fn build(
        &mut self,
        rules: &BTreeMap<PolicyKey, u8>,
    ) -> Result<(u32, Vec<PolicySlot>), MapError> {
        for _ in 0..MAX_SEEDS {
            self.builds += 1;
            let random = self.seeds.hash_one(self.builds);
            let seed = random as u32;
            if let Some(slots) = place(rules, seed, random | 1) {
                return Ok((seed, slots));
            }
        }
        Err(MapError::PolicyFull {
            rules: rules.len(),
            capacity: capacity::POLICY as usize,
        })
    }
}

/// The keys whose verdict differs between `old` and `new` (added, removed or changed), with
/// their new verdict (`None`: removed).
fn changed_rules<'a>(
    old: &'a BTreeMap<PolicyKey, u8>,
    new: &'a BTreeMap<PolicyKey, u8>,
) -> impl Iterator<Item = (&'a PolicyKey, Option<u8>)> {
    let gone = old
        .keys()
        .filter(|key| !new.contains_key(*key))
        .map(|key| (key, None));
    let set = new
        .iter()
        .filter(|(key, verdict)| old.get(*key) != Some(*verdict))
        .map(|(key, verdict)| (key, Some(*verdict)));
    gone.chain(set)
}

/// Turns `slots`, the layout of `old` under `seed`, into a layout of `new` under the same seed,
/// touching only the slots of the rules that changed (and those cuckoo moves displace). False
/// when `old` is not where it should be or a new rule finds no room: lay out from scratch.
fn update(
    slots: &mut [PolicySlot],
    old: &BTreeMap<PolicyKey, u8>,
    new: &BTreeMap<PolicyKey, u8>,
    seed: u32,
    mut rng: u64,
) -> bool {
    for (key, verdict) in changed_rules(old, new) {
        let existing = old.contains_key(key).then(|| slot_of(slots, key, seed));
        match (existing, verdict) {
            (Some(None), _) => return false,
            (Some(Some(i)), verdict) => {
                if let Some(slot) = slots.get_mut(i) {
                    *slot = verdict.map_or_else(PolicySlot::default, |v| PolicySlot::new(key, v));
                }
            }
            (None, Some(verdict)) => {
                if !insert(slots, PolicySlot::new(key, verdict), seed, &mut rng) {
                    return false;
                }
            }
            (None, None) => {}
        }
    }
    true
}

/// The index of the slot holding `key`, looking where the datapath looks.
fn slot_of(slots: &[PolicySlot], key: &PolicyKey, seed: u32) -> Option<usize> {
    let (word0, word1) = (key.word0(), key.word1());
    let (first, second) = policy_buckets(word0, word1, seed);
    let per_bucket = PolicySlot::BUCKET_SLOTS as usize;
    [first, second].into_iter().find_map(|bucket| {
        let start = bucket as usize * per_bucket;
        (start..start + per_bucket).find(|&i| {
            slots
                .get(i)
                .is_some_and(|s| s.verdict_for(word0, word1).is_some())
        })
    })
}

fn place(rules: &BTreeMap<PolicyKey, u8>, seed: u32, mut rng: u64) -> Option<Vec<PolicySlot>> {
    let mut slots = vec![PolicySlot::default(); PolicySlot::SLOTS_PER_COPY as usize];
    rules
        .iter()
        .all(|(key, verdict)| insert(&mut slots, PolicySlot::new(key, *verdict), seed, &mut rng))
        .then_some(slots)
}

/// Puts `item` in one of its two buckets, displacing others along a random walk; false when
/// no room turned up within [`MAX_KICKS`] moves (one rule is then out of the table).
fn insert(slots: &mut [PolicySlot], mut item: PolicySlot, seed: u32, rng: &mut u64) -> bool {
    let per_bucket = PolicySlot::BUCKET_SLOTS as usize;
    let free_in = |slots: &[PolicySlot], bucket: u32| {
        let start = bucket as usize * per_bucket;
        (start..start + per_bucket).find(|&i| slots.get(i).is_some_and(|s| s.word1 >> 32 == 0))
    };
    for _ in 0..MAX_KICKS {
        let (first, second) = policy_buckets(item.word0, item.word1 as u32, seed);
        if let Some(i) = free_in(slots, first).or_else(|| free_in(slots, second)) {
            if let Some(slot) = slots.get_mut(i) {
                *slot = item;
                return true;
            }
            return false;
        }
        // xorshift64: which bucket and which of its slots to displace.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let bucket = if *rng & 1 == 0 { first } else { second };
        let victim = bucket as usize * per_bucket + (*rng >> 1) as usize % per_bucket;
        if let Some(slot) = slots.get_mut(victim) {
            std::mem::swap(slot, &mut item);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(n: u32) -> BTreeMap<PolicyKey, u8> {
        (0..n)
            .map(|i| {
                let key = PolicyKey {
                    subject: 256 + i % 300,
                    peer: i.wrapping_mul(2_654_435_761),
                    port: (i % 65_535) as u16,
                    protocol: 6,
                    direction: PolicyKey::EGRESS,
                };
                (
                    key,
                    if i % 3 == 0 {
                        policy_verdict::DENY
                    } else {
                        policy_verdict::ALLOW
                    },
                )
            })
            .collect()
    }

    /// What the datapath does: look in the two buckets of the key.
    fn find(slots: &[PolicySlot], key: &PolicyKey, seed: u32) -> Option<u8> {
        let (first, second) = policy_buckets(key.word0(), key.word1(), seed);
        [first, second].into_iter().find_map(|bucket| {
            let start = (bucket * PolicySlot::BUCKET_SLOTS) as usize;
            slots[start..start + PolicySlot::BUCKET_SLOTS as usize]
                .iter()
                .find_map(|s| s.verdict_for(key.word0(), key.word1()))
        })
    }

    #[test]
    fn a_full_table_places_every_rule_where_the_datapath_looks() {
        let rules = rules(capacity::POLICY);
        let slots = place(&rules, 0x1234_5678, 0x9e37_79b9_7f4a_7c15).expect("placement");
        for (key, verdict) in &rules {
            assert_eq!(find(&slots, key, 0x1234_5678), Some(*verdict), "{key:?}");
        }
        let absent = PolicyKey {
            subject: 1,
            peer: 2,
            port: 3,
            protocol: 17,
            direction: PolicyKey::INGRESS,
        };
        assert_eq!(find(&slots, &absent, 0x1234_5678), None);
        let used = slots.iter().filter(|s| s.word1 >> 32 != 0).count();
        assert_eq!(used, rules.len());
    }

    #[test]
    fn an_update_touches_only_the_slots_of_changed_rules() {
        let seed = 0x0bad_cafe;
        let old = rules(20_000);
        let before = place(&old, seed, 0x9e37_79b9_7f4a_7c15).expect("placement");
        let mut new = old.clone();
        let keys: Vec<PolicyKey> = old.keys().copied().collect();
        new.remove(&keys[0]);
        new.remove(&keys[1]);
        new.insert(
            keys[2],
            policy_verdict::DENY + policy_verdict::ALLOW - old[&keys[2]],
        );
        for i in 0..400 {
            let mut key = keys[3];
            key.port = 60_000 + i;
            new.insert(key, policy_verdict::ALLOW);
        }
        let mut after = before.clone();
        assert!(update(&mut after, &old, &new, seed, 0x2545_f491_4f6c_dd1d));
        for (key, verdict) in &new {
            assert_eq!(find(&after, key, seed), Some(*verdict), "{key:?}");
        }
        assert_eq!(find(&after, &keys[0], seed), None);
        assert_eq!(find(&after, &keys[1], seed), None);
        let used = after.iter().filter(|s| s.word1 >> 32 != 0).count();
        assert_eq!(used, new.len());
        let written = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert_eq!(changed_rules(&old, &new).count(), 403);
        // Each inserted rule moves a few others at most, at 15% load.
        assert!((403..=600).contains(&written), "{written} slots written");
    }

    #[test]
    fn an_update_of_a_layout_missing_a_rule_asks_for_a_rebuild() {
        let seed = 99;
        let old = rules(100);
        let mut slots = place(&old, seed, 5).expect("placement");
        let first = *old.keys().next().expect("a rule");
        let i = slot_of(&slots, &first, seed).expect("placed");
        slots[i] = PolicySlot::default();
        let mut new = old.clone();
        new.remove(&first);
        assert!(!update(&mut slots, &old, &new, seed, 5));
    }

    #[test]
    fn more_rules_than_slots_cannot_be_placed() {
        let rules = rules(PolicySlot::SLOTS_PER_COPY + 1);
        assert!(place(&rules, 7, 0x2545_f491_4f6c_dd1d).is_none());
    }

    #[test]
    fn slots_pack_and_unpack_keys() {
        let key = PolicyKey {
            subject: u32::MAX,
            peer: 7,
            port: 65_535,
            protocol: 132,
            direction: PolicyKey::INGRESS,
        };
        assert_eq!(PolicyKey::unpack(key.word0(), key.word1()), key);
        let slot = PolicySlot::new(&key, policy_verdict::DENY);
        assert_eq!(
            slot.verdict_for(key.word0(), key.word1()),
            Some(policy_verdict::DENY)
        );
        assert_eq!(
            PolicySlot::default().verdict_for(0, 0),
            None,
            "an empty slot matches nothing"
        );
    }
}
