//! Connection tracking for policy: a flow's replies pass the policy of the other direction.
//!
//! Only what policy needs: no TCP state machine, an entry lives until its protocol's lifetime
//! passes without a packet (Cilium's defaults: 6 h for TCP, 60 s otherwise), or until the LRU
//! map needs its room. A flow is tracked only where its replies meet policy (the endpoint
//! enforces the other direction): that keeps the lookups off every other packet. A flow that
//! was open when such enforcement began is tracked from its next packet out; a reply before
//! that meets policy (and, denied, is retransmitted). Non-first fragments carry no ports and are never tracked or replies.
//! Of ICMP only echo is tracked: a request opens a flow keyed by its identifier, and only an
//! echo reply with that identifier is its reply (any other ICMP meets policy as it is).

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use nodeseal_bpf_common::maps::{CtEntry, CtKey};

use crate::{
    maps::CONNTRACK,
    parse::{Fragment, IPPROTO_TCP, Packet},
};

const TCP_LIFETIME_NS: u64 = 6 * 3600 * 1_000_000_000;
const OTHER_LIFETIME_NS: u64 = 60 * 1_000_000_000;
/// How stale a tracked flow's time may get before a packet refreshes it.
const REFRESH_NS: u64 = 1_000_000_000;

/// The flow of `p` (`reversed`: as its reply would see it) when it crossed the pod in
/// `direction`. ICMP echo is keyed by its identifier alone.
#[inline(always)]
fn key(p: &Packet, direction: u8, reversed: bool) -> CtKey {
    let (sport, dport) = if p.is_icmp() {
        // The identifier is the same both ways.
        (p.src_port, 0)
    } else if !p.has_ports {
        (0, 0)
    } else if reversed {
        (p.dst_port, p.src_port)
    } else {
        (p.src_port, p.dst_port)
    };
    let (src, dst) = if reversed {
        (p.dst, p.src)
    } else {
        (p.src, p.dst)
    };
    CtKey {
        src: src.bytes(),
        dst: dst.bytes(),
        src_port: sport,
        dst_port: dport,
        protocol: p.protocol,
        direction,
        reserved: [0; 2],
    }
}

#[inline(always)]
fn lifetime(protocol: u8) -> u64 {
    if protocol == IPPROTO_TCP {
        TCP_LIFETIME_NS
    } else {
        OTHER_LIFETIME_NS
    }
}

/// Whether `p` replies to a live flow whose first packet crossed the pod in `direction`;
/// refreshes that flow.
#[inline(always)]
pub fn is_reply(p: &Packet, direction: u8) -> bool {
    if p.fragment == Fragment::Later || (p.is_icmp() && p.icmp_echo() != Some(false)) {
        return false;
    }
    let Some(entry) = CONNTRACK.get_ptr_mut(&key(p, direction, true)) else {
        return false;
    };
    // SAFETY: no preconditions. Tick granularity is plenty against lifetimes of a minute and
    // more, and costs a fraction of the precise clock.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: pointer from a successful lookup; an 8-byte aligned field, read and written once.
    unsafe {
        let age = now.saturating_sub((*entry).last_seen_ns);
        if age > lifetime(p.protocol) {
            return false;
        }
        if age > REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
    }
    true
}

/// Records (or refreshes) the flow of `p`, which crossed the pod in `direction`.
#[inline(always)]
pub fn track(p: &Packet, direction: u8) {
    if p.fragment == Fragment::Later || (p.is_icmp() && p.icmp_echo() != Some(true)) {
        return;
    }
    let key = key(p, direction, false);
    // SAFETY: no preconditions. Tick granularity is plenty against lifetimes of a minute and
    // more, and costs a fraction of the precise clock.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup; aligned 8-byte accesses. Written at most
        // about once a second per flow, so that a busy flow does not dirty the line per packet.
        unsafe {
            if now.saturating_sub((*entry).last_seen_ns) > REFRESH_NS {
                (*entry).last_seen_ns = now;
            }
        }
        return;
    }
    // A full map evicts its least recently used flow; an error leaves the flow untracked,
    // whose replies then meet policy like any packet.
    let _ = CONNTRACK.insert(&key, &CtEntry { last_seen_ns: now }, 0);
}
