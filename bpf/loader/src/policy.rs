//! The identity policy: rules in `POLICY_TABLE`, a cuckoo hash table laid out in an array that
//! userspace builds and the datapath reads with inlined array lookups (see `PolicySlot`).
//!
//! Update protocol: the table has two copies. A change rebuilds the copy the datapath is not
//! reading from the full rule set, then switches `POLICY_HEADER` to it with one atomic store.
//! Before the next change writes the other copy, an RCU grace period makes sure no datapath run
//! still reads it. So every change costs a grace period (milliseconds): batch changes with
//! [`Policy::replace_all`].

use std::collections::BTreeMap;

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

    /// Builds `rules` into the copy the datapath does not read and switches to it.
    fn publish(&mut self, rules: BTreeMap<PolicyKey, u8>) -> Result<(), MapError> {
        if rules.len() > capacity::POLICY as usize {
            return Err(MapError::PolicyFull {
                rules: rules.len(),
                capacity: capacity::POLICY as usize,
            });
        }
        let (target, wait) = match self.live {
            // Runs that read the header before the last switch may still read the other copy.
            Some(live) => (1 - live, true),
            None => (0, false),
        };
        let (seed, slots) = self.build(&rules)?;
        if wait {
            grace_period();
        }
        let table = self.table.map()?;
        let base = 2 * (target * PolicySlot::SLOTS_PER_COPY) as usize;
        for (i, slot) in slots.iter().enumerate() {
            table.store(base + 2 * i, slot.word0);
            table.store(base + 2 * i + 1, slot.word1);
        }
        drop(table);
        self.header.store(0, PolicyTableHeader::new(target, seed).0);
        self.live = Some(target);
        self.rules = rules;
        Ok(())
    }

    /// Places every rule in one of its two buckets (cuckoo hashing with random-walk
    /// displacement), trying fresh seeds if a placement fails.
    fn build(
        &mut self,
        rules: &BTreeMap<PolicyKey, u8>,
    ) -> Result<(u32, Vec<PolicySlot>), MapError> {
        use std::hash::BuildHasher as _;
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

fn place(rules: &BTreeMap<PolicyKey, u8>, seed: u32, mut rng: u64) -> Option<Vec<PolicySlot>> {
    let per_bucket = PolicySlot::BUCKET_SLOTS as usize;
    let mut slots = vec![PolicySlot::default(); PolicySlot::SLOTS_PER_COPY as usize];
    let free_in = |slots: &[PolicySlot], bucket: u32| {
        let start = bucket as usize * per_bucket;
        (start..start + per_bucket).find(|&i| slots.get(i).is_some_and(|s| s.word1 >> 32 == 0))
    };
    for (key, verdict) in rules {
        let mut item = PolicySlot::new(key, *verdict);
        let mut placed = false;
        for _ in 0..MAX_KICKS {
            let (first, second) = policy_buckets(item.word0, item.word1 as u32, seed);
            if let Some(i) = free_in(&slots, first).or_else(|| free_in(&slots, second)) {
                if let Some(slot) = slots.get_mut(i) {
                    *slot = item;
                    placed = true;
                }
                break;
            }
            // xorshift64: which bucket and which of its slots to displace.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let bucket = if rng & 1 == 0 { first } else { second };
            let victim = bucket as usize * per_bucket + (rng >> 1) as usize % per_bucket;
            if let Some(slot) = slots.get_mut(victim) {
                std::mem::swap(slot, &mut item);
            }
        }
        if !placed {
            return None;
        }
    }
    Some(slots)
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
