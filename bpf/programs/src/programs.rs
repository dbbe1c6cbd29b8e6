//! The tc entry points. Each maps its inputs to one explicit verdict (see the table in
//! `main.rs`).

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, maps::lpm_trie::Key, programs::TcContext};
use nodeseal_bpf_common::{
    event::Event,
    identity,
    maps::{
        ClearPort, Config, EndpointInfo, IpCacheEntry, IpCacheSlot, Ipv6Chunk, NodeKey, PeerSlot,
        PolicyKey, PrefixLengths,
    },
    mark,
    reason::{DropReason, TraceReason},
};

use crate::{
    conntrack,
    maps::{
        CLEAR_PORTS, CONFIG, ENDPOINTS, ENDPOINTS_BY_IFINDEX, IPCACHE_LENS, IPCACHE_V4, IPCACHE_V6,
        IPCACHE4_CHUNKS, IPCACHE4_L1, IPCACHE6_CHUNKS, NODES, PEER_SLOTS,
    },
    parse::{self, IPPROTO_ESP, L3, Packet},
    policy,
    verdict::{self, Who},
};

/// Baseline for the benchmark: passes every packet untouched.
#[classifier]
pub fn pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// tc ingress on the host side of a pod's veth: traffic leaving the pod.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    const PROGRAM: u8 = Event::PROGRAM_FROM_POD;
    match parse::l3(&ctx) {
        Ok((L3::Ip, parse::ETH_P_IP)) => from_pod_ip(&ctx, parse::ETH_P_IP),
        Ok((L3::Ip, _)) => from_pod_ip(&ctx, parse::ETH_P_IPV6),
        Ok((L3::Arp, _)) => TC_ACT_OK,
        Ok((L3::Other, _)) => verdict::drop(
            &ctx,
            PROGRAM,
            DropReason::UnsupportedL3,
            &Packet::new(),
            &Who::unknown(),
        ),
        Err(reason) => verdict::drop(&ctx, PROGRAM, reason, &Packet::new(), &Who::unknown()),
    }
}

/// `from_pod` for an IP packet of `ethertype`, inlined once per IP version with a constant
/// `ethertype`: each copy then knows its packet's version, so the compiler keeps no IPv6
/// address words around for IPv4 packets and merges no IPv4 and IPv6 values where the two
/// paths would otherwise join (values it spilled to the stack on every packet).
#[inline(always)]
fn from_pod_ip(ctx: &TcContext, ethertype: u16) -> i32 {
    const PROGRAM: u8 = Event::PROGRAM_FROM_POD;
    let mut p = Packet::new();
    let mut who = Who::unknown();
    let Some(endpoint) = endpoint(verdict::ifindex(ctx)) else {
        return verdict::drop(ctx, PROGRAM, DropReason::UnknownEndpoint, &p, &who);
    };
    who.src_identity = endpoint.identity;
    if let Err(reason) = parse::parse_ip(ctx, ethertype, &mut p) {
        return verdict::drop(ctx, PROGRAM, reason, &p, &who);
    }
    let dst = ipcache(&p, false);
    who.dst_identity = dst.identity;

    if endpoint.flags & EndpointInfo::FLAG_ENFORCE_EGRESS != 0
        && let Err(reason) =
            policy::check(endpoint.identity, who.dst_identity, PolicyKey::EGRESS, &p)
    {
        return verdict::drop(ctx, PROGRAM, reason, &p, &who);
    }
    // Only replies checked by ingress policy need the flow.
    if endpoint.flags & EndpointInfo::FLAG_ENFORCE_INGRESS != 0 {
        conntrack::track(&p, PolicyKey::EGRESS);
    }

    let cfg = config();
    let tracing = cfg.flags & Config::FLAG_TRACE != 0;
    let remote = dst.flags & IpCacheEntry::FLAG_REMOTE != 0
        && (dst.flags & IpCacheEntry::FLAG_POD != 0
            || cfg.flags & Config::FLAG_NODE_ENCRYPTION != 0);
    if !remote || cfg.mode == Config::MODE_NONE {
        return pass_verdict(ctx, tracing, PROGRAM, &p, &who);
    }
    who.node_id = dst.node_id;
    // A revoked node's pods get no key, whatever `PEER_SLOTS` says: in strict mode they are
    // dropped (`NoSa`) rather than sent in clear.
    let slot = if dst.flags & IpCacheEntry::FLAG_REVOKED != 0 {
        PeerSlot::default()
    } else {
        PEER_SLOTS
            .get(u32::from(dst.node_id))
            .copied()
            .unwrap_or_default()
    };
    if slot.flags & PeerSlot::FLAG_READY != 0 && slot.key_slot != 0 {
        if cfg.mode == Config::MODE_IPSEC {
            let old = verdict::mark(ctx) & !mark::OWNED_MASK;
            ctx.set_mark(old | mark::encrypt(dst.node_id, slot.key_slot));
        }
        if tracing {
            return verdict::trace(ctx, PROGRAM, TraceReason::Encrypt as u8, &p, &who);
        }
        return TC_ACT_OK;
    }
    if cfg.flags & Config::FLAG_STRICT_EGRESS != 0 {
        return verdict::drop(ctx, PROGRAM, DropReason::NoSa, &p, &who);
    }
    if tracing {
        return verdict::trace(ctx, PROGRAM, TraceReason::Plaintext as u8, &p, &who);
    }
    TC_ACT_OK
}

/// tc ingress on the node's uplink: node authentication and strict ingress.
#[classifier]
pub fn from_network(ctx: TcContext) -> i32 {
    const PROGRAM: u8 = Event::PROGRAM_FROM_NETWORK;
    let mut p = Packet::new();
    let mut who = Who::unknown();
    let ethertype = match parse::l3(&ctx) {
        Ok((L3::Ip, ethertype)) => ethertype,
        Ok((L3::Arp | L3::Other, _)) => return TC_ACT_OK,
        Err(reason) => return verdict::drop(&ctx, PROGRAM, reason, &p, &who),
    };
    if let Err(reason) = parse::parse_ip(&ctx, ethertype, &mut p) {
        return verdict::drop(&ctx, PROGRAM, reason, &p, &who);
    }
    let cfg = config();
    let tracing = cfg.flags & Config::FLAG_TRACE != 0;
    let current = verdict::mark(&ctx);
    // The inner packet of ESP we marked and the kernel decrypted comes through again; it was
    // authenticated by the SA (whose IN policy template binds its inner source).
    if current & mark::MAGIC_MASK == mark::MAGIC_DECRYPT {
        return pass_verdict(&ctx, tracing, PROGRAM, &p, &who);
    }
    if cfg.mode == Config::MODE_IPSEC && p.protocol == IPPROTO_ESP {
        let key = NodeKey {
            addr: p.src.bytes(),
        };
        let Some(node) = NODES.get_ptr(key) else {
            return verdict::drop(&ctx, PROGRAM, DropReason::UnknownNode, &p, &who);
        };
        // SAFETY: pointer from a successful lookup, read once.
        let node_id = unsafe { (*node).node_id };
        who.node_id = node_id;
        who.src_identity = identity::REMOTE_NODE;
        ctx.set_mark((current & !mark::OWNED_MASK) | mark::decrypt(node_id));
        if tracing {
            return verdict::trace(&ctx, PROGRAM, TraceReason::Decrypt as u8, &p, &who);
        }
        return TC_ACT_OK;
    }
    let encrypting = cfg.mode != Config::MODE_NONE;
    let strict = cfg.flags & Config::FLAG_STRICT_INGRESS != 0;
    let node_encryption = cfg.flags & Config::FLAG_NODE_ENCRYPTION != 0;
    if encrypting || strict {
        let src = ipcache(&p, true);
        let reason = plaintext_source_verdict(src.flags, encrypting, strict).or_else(|| {
            (strict
                && node_encryption
                && src.flags & (IpCacheEntry::FLAG_REMOTE | IpCacheEntry::FLAG_POD)
                    == IpCacheEntry::FLAG_REMOTE
                && !stays_in_clear(&p))
            .then_some(DropReason::UnencryptedNode)
        });
        if let Some(reason) = reason {
            who.src_identity = src.identity;
            who.node_id = src.node_id;
            return verdict::drop(&ctx, PROGRAM, reason, &p, &who);
        }
    }
    pass_verdict(&ctx, tracing, PROGRAM, &p, &who)
}

/// Whether plaintext from a remote node IP may arrive with node encryption: TCP or UDP on a
/// port of `CLEAR_PORTS` (either end: the handshake, the operator's exemptions, WireGuard's own
/// UDP), IPv6 neighbour discovery, or a path-MTU error (about the tunnel's own packets). ESP,
/// and what the kernel decrypted, never get here.
#[inline(always)]
fn stays_in_clear(p: &Packet) -> bool {
    if !p.has_ports {
        return false;
    }
    if p.is_neighbour_discovery() || p.is_pmtu_error() {
        return true;
    }
    match p.protocol {
        parse::IPPROTO_TCP | parse::IPPROTO_UDP => [p.src_port, p.dst_port].iter().any(|port| {
            let key = ClearPort {
                protocol: p.protocol,
                reserved: 0,
                port: *port,
            };
            // SAFETY: a map lookup; the value is not read.
            unsafe { CLEAR_PORTS.get(&key) }.is_some()
        }),
        _ => false,
    }
}

/// Why plaintext from the wire whose source the ipcache knows with `flags` is dropped, if it is.
///
/// - This node's own pod CIDRs (`FLAG_POD` without `FLAG_REMOTE`): its pods reach its other
///   pods through their veths, never through the uplink, and its traffic that went out
///   encrypted comes back (if ever) as ESP. So such a source on the wire is always forged, in
///   strict mode or not: dropped whenever encryption is on. (A device that hairpins pod
///   traffic back without SNAT would be refused too; it handles pod traffic in clear, which
///   encryption exists to rule out.) With encryption off, the node is not ours to police.
/// - A revoked node's pod CIDRs (`FLAG_REVOKED`): the operator took that node out of the
///   fabric; its pods must not reach ours in clear, also when strict ingress is off (which
///   exists so that members without SAs yet keep talking, not for nodes thrown out).
/// - A member's pod CIDRs: plaintext only in strict ingress (`Unencrypted`).
#[inline(always)]
fn plaintext_source_verdict(flags: u16, encrypting: bool, strict: bool) -> Option<DropReason> {
    let remote_pod = IpCacheEntry::FLAG_REMOTE | IpCacheEntry::FLAG_POD;
    if encrypting {
        if flags & remote_pod == IpCacheEntry::FLAG_POD {
            return Some(DropReason::LocalSourceSpoof);
        }
        if flags & IpCacheEntry::FLAG_REVOKED != 0 {
            return Some(DropReason::RevokedSource);
        }
    }
    if strict && flags & remote_pod == remote_pod {
        return Some(DropReason::Unencrypted);
    }
    None
}

/// tc egress on the host side of a pod's veth: traffic toward the pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    const PROGRAM: u8 = Event::PROGRAM_TO_POD;
    match parse::l3(&ctx) {
        Ok((L3::Ip, parse::ETH_P_IP)) => to_pod_ip(&ctx, parse::ETH_P_IP),
        Ok((L3::Ip, _)) => to_pod_ip(&ctx, parse::ETH_P_IPV6),
        Ok((L3::Arp, _)) => TC_ACT_OK,
        Ok((L3::Other, _)) => verdict::drop(
            &ctx,
            PROGRAM,
            DropReason::UnsupportedL3,
            &Packet::new(),
            &Who::unknown(),
        ),
        Err(reason) => verdict::drop(&ctx, PROGRAM, reason, &Packet::new(), &Who::unknown()),
    }
}

/// `to_pod` for an IP packet of `ethertype`, inlined once per IP version (see `from_pod_ip`).
#[inline(always)]
fn to_pod_ip(ctx: &TcContext, ethertype: u16) -> i32 {
    const PROGRAM: u8 = Event::PROGRAM_TO_POD;
    let mut p = Packet::new();
    let mut who = Who::unknown();
    let Some(endpoint) = endpoint(verdict::ifindex(ctx)) else {
        // Not a managed pod: nothing to enforce.
        return TC_ACT_OK;
    };
    who.dst_identity = endpoint.identity;
    if let Err(reason) = parse::parse_ip(ctx, ethertype, &mut p) {
        return verdict::drop(ctx, PROGRAM, reason, &p, &who);
    }
    who.src_identity = ipcache(&p, true).identity;
    if endpoint.flags & EndpointInfo::FLAG_ENFORCE_INGRESS != 0
        && let Err(reason) =
            policy::check(endpoint.identity, who.src_identity, PolicyKey::INGRESS, &p)
    {
        return verdict::drop(ctx, PROGRAM, reason, &p, &who);
    }
    // Only replies checked by egress policy need the flow.
    if endpoint.flags & EndpointInfo::FLAG_ENFORCE_EGRESS != 0 {
        conntrack::track(&p, PolicyKey::INGRESS);
    }
    let tracing = config().flags & Config::FLAG_TRACE != 0;
    pass_verdict(ctx, tracing, PROGRAM, &p, &who)
}

#[inline(always)]
fn pass_verdict(ctx: &TcContext, tracing: bool, program: u8, p: &Packet, who: &Who) -> i32 {
    if tracing {
        return verdict::trace(ctx, program, TraceReason::Pass as u8, p, who);
    }
    TC_ACT_OK
}

#[inline(always)]
fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn endpoint(ifindex: u32) -> Option<EndpointInfo> {
    // Identity 0 (`identity::ANY`, never an endpoint's) marks an empty array slot.
    if let Some(e) = ENDPOINTS_BY_IFINDEX.get_ptr(ifindex) {
        // SAFETY: pointer from a successful lookup; one aligned 8-byte load, which userspace's
        // atomic store makes all-old or all-new.
        let e = EndpointInfo::from_word(unsafe { core::ptr::read_volatile(e) });
        if e.identity != identity::ANY {
            return Some(e);
        }
    }
    // SAFETY: pointer from a successful lookup, copied at once.
    ENDPOINTS.get_ptr(ifindex).map(|e| unsafe { *e })
}

/// What the ipcache says of an address it does not know: outside the cluster (`WORLD`), on no
/// node, no flags. Every caller treats it exactly as a miss (no flag means nothing to encrypt and
/// no plaintext source to refuse).
const NOT_IN_IPCACHE: IpCacheEntry = IpCacheEntry {
    identity: identity::WORLD,
    node_id: 0,
    flags: 0,
};

/// Longest-prefix match of the packet's source (`src`) or destination address, or
/// [`NOT_IN_IPCACHE`].
///
/// A plain entry rather than an `Option`: the payload of a `None` is undefined, and the
/// compiler spilled that undefined register to the stack where the paths joined, which the
/// verifier refuses (`!read_ok`) as soon as a change elsewhere moves the register allocation.
#[inline(always)]
fn ipcache(p: &Packet, src: bool) -> IpCacheEntry {
    ipcache_lookup(p, src).unwrap_or(NOT_IN_IPCACHE)
}

/// Longest-prefix match of the packet's source (`src`) or destination address: the family's
/// ipcache arrays when `IPCACHE_LENS` says they are in sync, else the trie.
#[inline(always)]
fn ipcache_lookup(p: &Packet, src: bool) -> Option<IpCacheEntry> {
    let addr = if src { p.src } else { p.dst };
    if p.ip_version == 4 {
        if prefix_lengths(PrefixLengths::INDEX_V4).state == PrefixLengths::STATE_ARRAYS
            && let Ok(found) = ipcache_v4_arrays(addr.v4())
        {
            return found;
        }
        IPCACHE_V4
            .get(Key::new(32, addr.0[3].to_ne_bytes()))
            .copied()
    } else {
        // Any other state, including an older loader's `STATE_EXACT`, means the trie.
        if prefix_lengths(PrefixLengths::INDEX_V6).state == PrefixLengths::STATE_ARRAYS {
            let (hi, lo) = addr.halves();
            if let Ok(found) = ipcache_v6_arrays(hi, lo) {
                return found;
            }
        }
        IPCACHE_V6.get(Key::new(128, addr.bytes())).copied()
    }
}

/// At most [`Ipv6Chunk::MAX_LEVELS`] chunk reads (see `Ipv6Chunk`). `Err` if a link points
/// outside the chunk array or the walk does not end, which only a corrupted map can do: the
/// caller asks the trie instead.
#[inline(always)]
fn ipcache_v6_arrays(hi: u64, lo: u64) -> Result<Option<IpCacheEntry>, ()> {
    let mut chunk_index = Ipv6Chunk::ROOT;
    for _ in 0..Ipv6Chunk::MAX_LEVELS {
        let chunk = IPCACHE6_CHUNKS.get_ptr(chunk_index).ok_or(())?;
        // SAFETY: pointer from a successful lookup; each field is one aligned 8-byte load,
        // which userspace's atomic stores make all-old or all-new. The key, mask and depth of
        // a linked chunk never change (see `Ipv6Chunk`).
        let (key_hi, key_lo, mask_hi, mask_lo, depth) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*chunk).key_hi),
                core::ptr::read_volatile(&raw const (*chunk).key_lo),
                core::ptr::read_volatile(&raw const (*chunk).mask_hi),
                core::ptr::read_volatile(&raw const (*chunk).mask_lo),
                core::ptr::read_volatile(&raw const (*chunk).depth),
            )
        };
        let slot = if ((hi & mask_hi) ^ key_hi) | ((lo & mask_lo) ^ key_lo) != 0 {
            // SAFETY: as above.
            unsafe { core::ptr::read_volatile(&raw const (*chunk).miss) }
        } else {
            let index = Ipv6Chunk::slot_index(depth, hi, lo) as usize;
            // SAFETY: as above; `index` is below 256 (masked by `slot_index`), in bounds.
            unsafe {
                core::ptr::read_volatile(
                    (&raw const (*chunk).slots)
                        .cast::<IpCacheSlot>()
                        .add(index & 0xff),
                )
            }
        };
        match slot.chunk() {
            Some(next) => chunk_index = next,
            None => return Ok(slot.entry()),
        }
    }
    Err(())
}

/// At most three slot reads (see `IpCacheSlot`). `Err` if a link points outside the chunk
/// array, which only a corrupted map can do: the caller asks the trie instead.
#[inline(always)]
fn ipcache_v4_arrays(addr: u32) -> Result<Option<IpCacheEntry>, ()> {
    let mut slot = read_slot(IPCACHE4_L1.get_ptr(addr >> 16))?;
    for shift in [8u32, 0] {
        let Some(chunk) = slot.chunk() else {
            return Ok(slot.entry());
        };
        let index = chunk
            .wrapping_mul(IpCacheSlot::CHUNK_SLOTS)
            .wrapping_add((addr >> shift) & 0xff);
        slot = read_slot(IPCACHE4_CHUNKS.get_ptr(index))?;
    }
    // A third-level slot is never a link.
    Ok(slot.entry())
}

#[inline(always)]
fn read_slot(ptr: Option<*const IpCacheSlot>) -> Result<IpCacheSlot, ()> {
    let ptr = ptr.ok_or(())?;
    // SAFETY: pointer from a successful lookup; one aligned 8-byte load, which userspace's
    // atomic store makes all-old or all-new.
    Ok(unsafe { core::ptr::read_volatile(ptr) })
}

#[inline(always)]
fn prefix_lengths(index: u32) -> PrefixLengths {
    IPCACHE_LENS.get(index).copied().unwrap_or_default()
}
