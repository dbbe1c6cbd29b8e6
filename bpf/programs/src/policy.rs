//! Identity policy lookup.

use nodeseal_bpf_common::{
    identity,
    maps::{PolicyEntry, PolicyKey},
    reason::DropReason,
};

use crate::{
    maps::POLICY,
    parse::{Fragment, Packet},
};

/// Checks `subject`'s policy in `direction` against `peer` for this packet; call only when the
/// endpoint enforces that direction. `Err` carries the drop reason.
#[inline(always)]
pub fn check(subject: u32, peer: u32, direction: u8, p: &Packet) -> Result<(), DropReason> {
    if p.is_pmtu_error() {
        return Ok(());
    }
    let verdict = lookup(subject, peer, direction, p).or_else(|| {
        if peer == identity::ANY {
            None
        } else {
            lookup(subject, identity::ANY, direction, p)
        }
    });
    match verdict {
        Some(PolicyEntry::ALLOW) => Ok(()),
        Some(_) => Err(DropReason::PolicyDenied),
        None if p.fragment == Fragment::Later => Err(DropReason::FragmentNoPorts),
        None => Err(DropReason::PolicyDenied),
    }
}

/// Most specific first: (proto, port), (proto, any port), (any proto, any port).
#[inline(always)]
fn lookup(subject: u32, peer: u32, direction: u8, p: &Packet) -> Option<u8> {
    let mut key = PolicyKey {
        subject,
        peer,
        port: p.dst_port,
        protocol: p.protocol,
        direction,
    };
    if p.has_ports && p.dst_port != 0 {
        if let Some(v) = get(&key) {
            return Some(v);
        }
    }
    key.port = 0;
    if let Some(v) = get(&key) {
        return Some(v);
    }
    key.protocol = 0;
    get(&key)
}

#[inline(always)]
fn get(key: &PolicyKey) -> Option<u8> {
    // SAFETY: the pointer comes from a successful map lookup and is read once, immediately.
    POLICY.get_ptr(key).map(|v| unsafe { (*v).verdict })
}
