//! Packet parsing: Ethernet, IPv4 (with options), IPv6 (with extension headers), L4 ports.
//!
//! Fixed-size reads go straight to the linear packet data when it is long enough (direct packet
//! access, bounds-checked against `data_end`), and fall back to `bpf_skb_load_bytes` otherwise,
//! so non-linear skbs parse the same as linear ones: a failed fallback read means the packet is
//! shorter than the header (`Truncated`). IPv6 extension headers (rare) always use the helper,
//! which keeps the verifier's path count small.

use aya_ebpf::programs::TcContext;
use nodeseal_bpf_common::reason::DropReason;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// How many IPv6 extension headers the parser walks before giving up.
const MAX_IPV6_EXTENSIONS: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    None,
    /// First fragment (offset 0, more fragments): carries the L4 header.
    First,
    /// Any later fragment: no L4 header.
    Later,
}

/// What the ethertype says.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    Ip,
    Arp,
    Other,
}

/// An IPv6 or IPv4-mapped IPv6 address in network order, held as four words, each the
/// native-endian load of four of its bytes (so its memory is the address's 16 bytes).
///
/// Not `[u8; 16]`: the compiler splits a byte array that the parser fills byte by byte into 16
/// values, which the BPF registers cannot hold, and spilled them to the stack and back on every
/// packet (7 of `from_pod`'s 52 ns in the datapath benchmark).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Addr(pub [u32; 4]);

impl Addr {
    pub const ZERO: Self = Self([0; 4]);

    /// `::ffff:a.b.c.d` for `word`, the IPv4 address as loaded from the packet.
    #[inline(always)]
    pub const fn v4_mapped(word: u32) -> Self {
        Self([0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), word])
    }

    /// The IPv4 address of an IPv4-mapped address, in host order.
    #[inline(always)]
    pub const fn v4(self) -> u32 {
        u32::from_be(self.0[3])
    }

    /// The address's bytes, network order.
    #[inline(always)]
    pub const fn bytes(self) -> [u8; 16] {
        // SAFETY: `[u32; 4]` and `[u8; 16]` have the same size and every bit pattern is valid
        // for both; the words hold the bytes in memory order.
        unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(self.0) }
    }

    /// The address as two host-order halves (high, low).
    #[inline(always)]
    pub fn halves(self) -> (u64, u64) {
        let w = self.0.map(|w| u64::from(u32::from_be(w)));
        (w[0] << 32 | w[1], w[2] << 32 | w[3])
    }
}

pub struct Packet {
    /// 4 or 6 (0 until parsed).
    pub ip_version: u8,
    /// L4 protocol after extension headers.
    pub protocol: u8,
    /// IPv6, or IPv4-mapped IPv6.
    pub src: Addr,
    pub dst: Addr,
    pub fragment: Fragment,
    /// Source port; ICMP/ICMPv6 echo request and reply: the echo identifier.
    pub src_port: u16,
    /// Destination port; ICMP/ICMPv6: the message type.
    pub dst_port: u16,
    /// ICMP code (valid when `protocol` is ICMP/ICMPv6 and `has_ports`).
    pub icmp_code: u8,
    /// The L4 header was read: ports (or ICMP type/code) are valid.
    pub has_ports: bool,
}

impl Packet {
    pub const fn new() -> Self {
        Self {
            ip_version: 0,
            protocol: 0,
            src: Addr::ZERO,
            dst: Addr::ZERO,
            fragment: Fragment::None,
            src_port: 0,
            dst_port: 0,
            icmp_code: 0,
            has_ports: false,
        }
    }

    /// ICMP or ICMPv6 (whose "ports" are the message type and code).
    pub fn is_icmp(&self) -> bool {
        self.protocol == IPPROTO_ICMP || self.protocol == IPPROTO_ICMPV6
    }

    /// For an ICMP/ICMPv6 echo message: `Some(true)` for a request, `Some(false)` for a reply.
    pub fn icmp_echo(&self) -> Option<bool> {
        if !self.has_ports {
            return None;
        }
        match (self.protocol, self.dst_port) {
            (IPPROTO_ICMP, 8) | (IPPROTO_ICMPV6, 128) => Some(true),
            (IPPROTO_ICMP, 0) | (IPPROTO_ICMPV6, 129) => Some(false),
            _ => None,
        }
    }

    /// ICMPv6 router/neighbour solicitation and advertisement, redirect (types 133 to 137):
    /// what IPv6 needs to reach a neighbour at all, as ARP for IPv4 (which passes untouched).
    pub fn is_neighbour_discovery(&self) -> bool {
        self.has_ports
            && self.protocol == IPPROTO_ICMPV6
            && self.ip_version == 6
            && (133..=137).contains(&self.dst_port)
    }

    /// ICMP "fragmentation needed" or ICMPv6 "packet too big": path MTU discovery.
    pub fn is_pmtu_error(&self) -> bool {
        self.has_ports
            && ((self.protocol == IPPROTO_ICMP && self.dst_port == 3 && self.icmp_code == 4)
                || (self.protocol == IPPROTO_ICMPV6 && self.dst_port == 2))
    }
}

/// Reads a `T` at `off`: directly from the linear data when it is there, else through
/// `bpf_skb_load_bytes`.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, DropReason> {
    let start = ctx.data();
    if start + off + size_of::<T>() <= ctx.data_end() {
        // SAFETY: `start + off .. start + off + size_of::<T>()` lies inside the linear packet
        // data (checked against `data_end` just above, which the verifier also enforces); `T`
        // is plain bytes, read unaligned.
        return Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
    }
    ctx.load::<T>(off).map_err(|_| DropReason::Truncated)
}

/// Reads `N` consecutive 4-byte words at `off` straight from the linear data when it is
/// there, else through `bpf_skb_load_bytes`.
///
/// One 4-byte load per word, in assembly: behind the 14-byte Ethernet header the IP header's
/// words are rarely 4-byte aligned, and the BPF backend turns every load it cannot prove
/// aligned into four byte loads, shifts and ors (about 60 instructions for an IPv4 header, 2 to
/// 4 ns of `from_pod` in the datapath benchmark). The verifier accepts misaligned packet loads
/// on architectures with efficient unaligned access (x86-64, arm64), which is what it checks
/// at load time; elsewhere it refuses the program rather than running it slowly.
#[inline(always)]
fn read_words<const N: usize>(ctx: &TcContext, off: usize) -> Result<[u32; N], DropReason> {
    let start = ctx.data();
    if start + off + 4 * N <= ctx.data_end() {
        let mut words = [0u32; N];
        for (i, word) in words.iter_mut().enumerate() {
            let value: u64;
            // SAFETY: the 4 bytes at `start + off + 4 * i` lie inside the linear packet data
            // (checked against `data_end` above, which the verifier also enforces).
            unsafe {
                core::arch::asm!(
                    "{v} = *(u32 *)({p} + 0)",
                    v = lateout(reg) value,
                    p = in(reg) start + off + 4 * i,
                    options(readonly, nostack, preserves_flags, pure),
                );
            }
            *word = value as u32;
        }
        return Ok(words);
    }
    ctx.load::<[u32; N]>(off).map_err(|_| DropReason::Truncated)
}

/// Reads the ethertype.
#[inline(always)]
pub fn l3(ctx: &TcContext) -> Result<(L3, u16), DropReason> {
    let proto = u16::from_be(read::<u16>(ctx, 12)?);
    let l3 = match proto {
        ETH_P_IP | ETH_P_IPV6 => L3::Ip,
        ETH_P_ARP => L3::Arp,
        _ => L3::Other,
    };
    Ok((l3, proto))
}

/// Parses the IP header (IPv4 or IPv6 per `ethertype`) and the L4 ports into `p`.
#[inline(always)]
pub fn parse_ip(ctx: &TcContext, ethertype: u16, p: &mut Packet) -> Result<(), DropReason> {
    let l4 = if ethertype == ETH_P_IP {
        parse_v4(ctx, p)?
    } else {
        parse_v6(ctx, p)?
    };
    if p.fragment == Fragment::Later {
        return Ok(());
    }
    match p.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports = read_words::<1>(ctx, l4)?[0].to_ne_bytes();
            p.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            p.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
            p.has_ports = true;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // Only the ICMP of the packet's own IP version is ICMP; the other is an unknown
            // protocol and gets no "ports".
            let own = (p.ip_version == 4 && p.protocol == IPPROTO_ICMP)
                || (p.ip_version == 6 && p.protocol == IPPROTO_ICMPV6);
            if own {
                let h = read::<[u8; 2]>(ctx, l4)?;
                p.dst_port = u16::from(h[0]);
                p.icmp_code = h[1];
                p.has_ports = true;
                if p.icmp_echo().is_some() {
                    // The echo identifier pairs a reply with its request (conntrack).
                    let id = read::<[u8; 2]>(ctx, l4 + 4)?;
                    p.src_port = u16::from_be_bytes(id);
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Returns the offset of the L4 header.
#[inline(always)]
fn parse_v4(ctx: &TcContext, p: &mut Packet) -> Result<usize, DropReason> {
    // Whole words, not bytes: see `Addr`.
    let h = read_words::<5>(ctx, ETH_HLEN)?;
    let [version_ihl, _, total_hi, total_lo] = h[0].to_ne_bytes();
    if version_ihl >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    p.ip_version = 4;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(DropReason::Malformed);
    }
    // Total length 0 is what BIG TCP (GSO > 64 KiB) puts there: the skb length rules.
    let total = usize::from(u16::from_be_bytes([total_hi, total_lo]));
    if total != 0 {
        if total < ihl {
            return Err(DropReason::Malformed);
        }
        if ETH_HLEN + total > ctx.len() as usize {
            return Err(DropReason::Truncated);
        }
    }
    let [_, _, frag_hi, frag_lo] = h[1].to_ne_bytes();
    let frag = u16::from_be_bytes([frag_hi, frag_lo]);
    p.fragment = if frag & 0x1fff != 0 {
        Fragment::Later
    } else if frag & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    p.protocol = h[2].to_ne_bytes()[1];
    p.src = Addr::v4_mapped(h[3]);
    p.dst = Addr::v4_mapped(h[4]);
    // Options (ihl > 20) are skipped, not interpreted.
    Ok(ETH_HLEN + ihl)
}

/// Returns the offset of the L4 header (or of the fragment payload).
#[inline(always)]
fn parse_v6(ctx: &TcContext, p: &mut Packet) -> Result<usize, DropReason> {
    // Whole words, not bytes: see `Addr`.
    let h = read_words::<10>(ctx, ETH_HLEN)?;
    if h[0].to_ne_bytes()[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    p.ip_version = 6;
    let [payload_hi, payload_lo, next_header, _] = h[1].to_ne_bytes();
    // Payload length 0 is a jumbogram or BIG TCP: the skb length rules.
    let payload = usize::from(u16::from_be_bytes([payload_hi, payload_lo]));
    if payload != 0 && ETH_HLEN + 40 + payload > ctx.len() as usize {
        return Err(DropReason::Truncated);
    }
    p.src = Addr([h[2], h[3], h[4], h[5]]);
    p.dst = Addr([h[6], h[7], h[8], h[9]]);

    let mut next = next_header;
    let mut off = ETH_HLEN + 40;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let e = ctx
                    .load::<[u8; 2]>(off)
                    .map_err(|_| DropReason::Truncated)?;
                next = e[0];
                off += (usize::from(e[1]) + 1) * 8;
            }
            IPPROTO_AH => {
                let e = ctx
                    .load::<[u8; 2]>(off)
                    .map_err(|_| DropReason::Truncated)?;
                next = e[0];
                off += (usize::from(e[1]) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let e = ctx
                    .load::<[u8; 4]>(off)
                    .map_err(|_| DropReason::Truncated)?;
                next = e[0];
                off += 8;
                let frag = u16::from_be_bytes([e[2], e[3]]);
                if frag & 0xfff8 != 0 {
                    // Later fragment: what follows is payload, not headers.
                    p.fragment = Fragment::Later;
                    p.protocol = next;
                    return Ok(off);
                }
                if frag & 1 != 0 {
                    p.fragment = Fragment::First;
                }
            }
            _ => {
                p.protocol = next;
                return Ok(off);
            }
        }
    }
    p.protocol = next;
    match next {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
            Err(DropReason::Ipv6ExtensionChain)
        }
        _ => Ok(off),
    }
}
