//! Identity policy lookup in the policy table (see `PolicySlot` for its layout and update
//! protocol).

use nodeseal_bpf_common::{
    identity,
    maps::{
        PolicyKey, PolicySlot, PolicyTableHeader, policy_buckets, policy_buckets_legacy,
        policy_verdict, policy_verdict_slot,
    },
    reason::DropReason,
};

use crate::{
    conntrack,
    maps::{POLICY_HEADER, POLICY_TABLE, POLICY_VERDICTS},
    parse::{Fragment, Packet},
};

/// Checks `subject`'s policy in `direction` against `peer` for this packet and counts the
/// decision in `POLICY_VERDICTS`; call only when the endpoint enforces that direction. A packet
/// the rules deny passes when it replies to a flow tracked in the other direction (looked up
/// only then, so allowed traffic pays nothing for it). `Err` carries the drop reason.
#[inline(always)]
pub fn check(subject: u32, peer: u32, direction: u8, p: &Packet) -> Result<(), DropReason> {
    let mut verdict = decide(subject, peer, direction, p);
    let opened_by = if direction == PolicyKey::INGRESS {
        PolicyKey::EGRESS
    } else {
        PolicyKey::INGRESS
    };
    if verdict.is_err() && conntrack::is_reply(p, opened_by) {
        verdict = Ok(());
    }
    // Every decision is counted here, traced or not, so the metric does not depend on events
    // (which a full ring buffer or tracing being off would lose).
    if let Some(counter) =
        POLICY_VERDICTS.get_ptr_mut(policy_verdict_slot(direction, verdict.is_ok()))
    {
        // SAFETY: per-CPU slot of an array map; only this CPU writes it while we run.
        unsafe { *counter += 1 };
    }
    verdict
}

#[inline(always)]
fn decide(subject: u32, peer: u32, direction: u8, p: &Packet) -> Result<(), DropReason> {
    if p.is_pmtu_error() || p.is_neighbour_discovery() {
        return Ok(());
    }
    let verdict = live_table().and_then(|table| {
        lookup(table, subject, peer, direction, p).or_else(|| {
            if peer == identity::ANY {
                None
            } else {
                lookup(table, subject, identity::ANY, direction, p)
            }
        })
    });
    match verdict {
        Some(policy_verdict::ALLOW) => Ok(()),
        Some(_) => Err(DropReason::PolicyDenied),
        None if p.fragment == Fragment::Later => Err(DropReason::FragmentNoPorts),
        None => Err(DropReason::PolicyDenied),
    }
}

/// The live copy of the policy table: its first slot, its seed, and whether it is laid out by
/// `policy_buckets` (else by `policy_buckets_legacy`).
#[derive(Clone, Copy)]
struct Table {
    base: u32,
    seed: u32,
    multiplicative: bool,
}

/// `None` when nothing was published (no rules).
#[inline(always)]
fn live_table() -> Option<Table> {
    let header = POLICY_HEADER.get_ptr(0)?;
    // SAFETY: pointer from a successful lookup; one aligned 8-byte load, which userspace's
    // atomic store makes all-old or all-new.
    let header = PolicyTableHeader(unsafe { core::ptr::read_volatile(header.cast::<u64>()) });
    let (base, seed) = header.live()?;
    Some(Table {
        base,
        seed,
        multiplicative: header.multiplicative(),
    })
}

/// Most specific first: (proto, port), (proto, any port), (any proto, any port).
#[inline(always)]
fn lookup(table: Table, subject: u32, peer: u32, direction: u8, p: &Packet) -> Option<u8> {
    let mut key = PolicyKey {
        subject,
        peer,
        port: p.dst_port,
        protocol: p.protocol,
        direction,
    };
    if p.has_ports
        && p.dst_port != 0
        && let Some(v) = get(table, &key)
    {
        return Some(v);
    }
    key.port = 0;
    if let Some(v) = get(table, &key) {
        return Some(v);
    }
    key.protocol = 0;
    get(table, &key)
}

/// The verdict of exactly `key`: a look at the slots of its first bucket, then of its second.
#[inline(always)]
fn get(table: Table, key: &PolicyKey) -> Option<u8> {
    let word0 = key.word0();
    let word1 = key.word1();
    let (first, second) = if table.multiplicative {
        policy_buckets(word0, word1, table.seed)
    } else {
        policy_buckets_legacy(word0, word1, table.seed)
    };
    let copy = table.base / PolicySlot::BUCKET_SLOTS;
    let mut verdict = bucket_verdict(copy + first, word0, word1);
    if verdict == 0 {
        verdict = bucket_verdict(copy + second, word0, word1);
    }
    match verdict as u8 {
        0 => None,
        v => Some(v),
    }
}

/// The verdict the bucket holds for the key `(word0, word1)`, or 0.
///
/// Branch-free on purpose: a branch per slot gives the verifier one more path per slot into
/// the rest of the program, which the 6.1 verifier does not prune (`from_pod`: 179k
/// instructions verified with a branch per slot, 130k with one per bucket; 16k on 6.18).
#[inline(always)]
fn bucket_verdict(index: u32, word0: u64, word1: u32) -> u64 {
    let Some(bucket) = POLICY_TABLE.get_ptr(index) else {
        return 0;
    };
    // SAFETY: pointer from a successful lookup, copied at once. The copy is not written while
    // it is live (see `PolicySlot`).
    let bucket = unsafe { core::ptr::read_volatile(bucket) };
    // A key sits in one slot at most, so OR-ing the slots' terms gives its verdict.
    bucket.slots.iter().fold(0, |verdict, slot| {
        verdict | slot_verdict(slot, word0, word1)
    })
}

/// `slot`'s verdict if it holds the key, else 0, computed without a comparison (which the BPF
/// backend would turn into a branch).
#[inline(always)]
fn slot_verdict(slot: &PolicySlot, word0: u64, word1: u32) -> u64 {
    // 0 exactly when the key matches: the shift drops the verdict bits of `slot.word1`.
    let diff = (slot.word0 ^ word0) | ((slot.word1 ^ u64::from(word1)) << 32);
    // Bit 63 of `diff | -diff` is set exactly when `diff` is not 0.
    let miss = (diff | diff.wrapping_neg()) >> 63;
    (slot.word1 >> 32) & miss.wrapping_sub(1)
}
