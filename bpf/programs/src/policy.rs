//! Identity policy lookup in the policy table (see `PolicySlot` for its layout and update
//! protocol).

use nodeseal_bpf_common::{
    identity,
    maps::{PolicyKey, PolicySlot, PolicyTableHeader, policy_buckets, policy_verdict},
    reason::DropReason,
};

use crate::{
    maps::{POLICY_HEADER, POLICY_TABLE},
    parse::{Fragment, Packet},
};

/// Checks `subject`'s policy in `direction` against `peer` for this packet; call only when the
/// endpoint enforces that direction. `Err` carries the drop reason.
#[inline(always)]
pub fn check(subject: u32, peer: u32, direction: u8, p: &Packet) -> Result<(), DropReason> {
    if p.is_pmtu_error() {
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

/// `(first slot of the live copy, seed)`; `None` when nothing was published (no rules).
#[inline(always)]
fn live_table() -> Option<(u32, u32)> {
    let header = POLICY_HEADER.get_ptr(0)?;
    // SAFETY: pointer from a successful lookup; one aligned 8-byte load, which userspace's
    // atomic store makes all-old or all-new.
    PolicyTableHeader(unsafe { core::ptr::read_volatile(header.cast::<u64>()) }).live()
}

/// Most specific first: (proto, port), (proto, any port), (any proto, any port).
#[inline(always)]
fn lookup(table: (u32, u32), subject: u32, peer: u32, direction: u8, p: &Packet) -> Option<u8> {
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

/// The verdict of exactly `key`: a look at the slots of its two buckets.
#[inline(always)]
fn get((base, seed): (u32, u32), key: &PolicyKey) -> Option<u8> {
    let word0 = key.word0();
    let word1 = key.word1();
    let (first, second) = policy_buckets(word0, word1, seed);
    for bucket in [first, second] {
        let start = base + bucket * PolicySlot::BUCKET_SLOTS;
        for i in 0..PolicySlot::BUCKET_SLOTS {
            let slot = POLICY_TABLE.get_ptr(start + i)?;
            // SAFETY: pointer from a successful lookup, copied at once. The copy is not written
            // while it is live (see `PolicySlot`).
            let slot = unsafe { core::ptr::read_volatile(slot) };
            if let Some(verdict) = slot.verdict_for(word0, word1) {
                return Some(verdict);
            }
        }
    }
    None
}
