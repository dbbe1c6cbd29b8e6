//! Hand-written encoding and decoding of the few XFRM netlink structures nodeseal uses.
//!
//! Layouts follow `include/uapi/linux/xfrm.h` on 64-bit Linux (`xfrm_usersa_info` is 224 bytes,
//! `xfrm_userpolicy_info` 168, `xfrm_user_tmpl` 64). Everything is written straight into the
//! caller's buffer, so key material exists in exactly one netlink buffer, which the sender wipes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::monitor::Expire;
use crate::policy::{
    Action, Direction, KernelPolicy, PolicyId, PolicySpec, Template, TemplateLevel, TemplateMode,
};
use crate::selector::{Mark, Selector};
use crate::state::{
    Aead, AeadAlgorithm, KernelState, Lifetime, Limits, ReqId, Spi, StateId, StateSpec, StateStats,
};

// The family-independent framing lives in `nodeseal-netlink`, shared with `nodeseal-wireguard`.
pub(crate) use nodeseal_netlink::codec::{
    DecodeError, Message, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, NLMSG_HDRLEN, attr, begin, finish,
};

pub(crate) const XFRM_MSG_NEWSA: u16 = 0x10;
pub(crate) const XFRM_MSG_DELSA: u16 = 0x11;
pub(crate) const XFRM_MSG_GETSA: u16 = 0x12;
pub(crate) const XFRM_MSG_NEWPOLICY: u16 = 0x13;
pub(crate) const XFRM_MSG_DELPOLICY: u16 = 0x14;
pub(crate) const XFRM_MSG_GETPOLICY: u16 = 0x15;
pub(crate) const XFRM_MSG_UPDPOLICY: u16 = 0x19;
pub(crate) const XFRM_MSG_UPDSA: u16 = 0x1a;
pub(crate) const XFRM_MSG_NEWSPDINFO: u16 = 0x24;
pub(crate) const XFRM_MSG_EXPIRE: u16 = 0x18;
/// The multicast group of `XFRM_MSG_EXPIRE` notices (`XFRMNLGRP_EXPIRE`).
pub(crate) const XFRMNLGRP_EXPIRE: u32 = 2;

const XFRMA_TMPL: u16 = 5;
const XFRMA_REPLAY_VAL: u16 = 10;
const XFRMA_ALG_AEAD: u16 = 18;
const XFRMA_MARK: u16 = 21;
const XFRMA_REPLAY_ESN_VAL: u16 = 23;
const XFRMA_SET_MARK: u16 = 29;
const XFRMA_SET_MARK_MASK: u16 = 30;
/// Attributes that make a state something nodeseal does not describe.
const XFRMA_FOREIGN_STATE: [u16; 7] = [
    1,  // ALG_AUTH
    2,  // ALG_CRYPT
    3,  // ALG_COMP
    4,  // ENCAP
    8,  // SEC_CTX
    20, // ALG_AUTH_TRUNC
    31, // IF_ID
];
const XFRMA_POLICY_TYPE: u16 = 16;
const XFRMA_IF_ID: u16 = 31;
const XFRMA_SPD_IPV4_HTHRESH: u16 = 3;
const XFRMA_SPD_IPV6_HTHRESH: u16 = 4;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_ESP: u8 = 50;
const XFRM_MODE_TRANSPORT: u8 = 0;
const XFRM_MODE_TUNNEL: u8 = 1;
const XFRM_STATE_ESN: u8 = 128;
/// The state's selector is empty and its inner family open (`flag af-unspec`).
const XFRM_STATE_AF_UNSPEC: u8 = 32;
const XFRM_INF: u64 = u64::MAX;

const SELECTOR_LEN: usize = 56;
const USERSA_INFO_LEN: usize = 224;
/// `struct xfrm_user_expire`: the state, `hard`, padding to 8.
const USER_EXPIRE_LEN: usize = 232;
const USERSA_ID_LEN: usize = 24;
const USERPOLICY_INFO_LEN: usize = 168;
const USERPOLICY_ID_LEN: usize = 64;
const USER_TMPL_LEN: usize = 64;
const ALGO_AEAD_HDR_LEN: usize = 72;
const REPLAY_ESN_HDR_LEN: usize = 24;

/// The raw identity of a policy: selector bytes (as the kernel keeps them), direction and mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PolicyKey([u8; SELECTOR_LEN + 1 + 8]);

impl PolicyKey {
    fn from_raw(sel: &[u8], dir: u8, mark: Mark) -> Self {
        let mut k = [0u8; SELECTOR_LEN + 1 + 8];
        k[..SELECTOR_LEN].copy_from_slice(&sel[..SELECTOR_LEN]);
        // `user` is the creating uid: not part of what the kernel matches on.
        k[SELECTOR_LEN - 4..SELECTOR_LEN].fill(0);
        k[SELECTOR_LEN] = dir;
        k[SELECTOR_LEN + 1..SELECTOR_LEN + 5].copy_from_slice(&mark.value.to_ne_bytes());
        k[SELECTOR_LEN + 5..].copy_from_slice(&mark.mask.to_ne_bytes());
        Self(k)
    }

    pub(crate) fn of(id: &PolicyId) -> Self {
        let mut sel = Vec::with_capacity(SELECTOR_LEN);
        put_selector(&mut sel, &id.selector);
        Self::from_raw(&sel, id.dir.to_kernel(), id.mark)
    }
}

// ---------------------------------------------------------------- writing

fn pad4(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn pad_to(buf: &mut Vec<u8>, start: usize, len: usize) {
    buf.resize(start + len, 0);
}

fn attr_header(buf: &mut Vec<u8>, ty: u16, payload_len: usize) {
    let len = u16::try_from(4 + payload_len).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
}

fn put_addr(buf: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            buf.extend_from_slice(&a.octets());
            buf.extend_from_slice(&[0; 12]);
        }
        IpAddr::V6(a) => buf.extend_from_slice(&a.octets()),
    }
}

const fn family_of(addr: IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn put_selector(buf: &mut Vec<u8>, sel: &Selector) {
    let port = |p: Option<u16>| match p {
        Some(p) => (p.to_be_bytes(), [0xff, 0xff]),
        None => ([0, 0], [0, 0]),
    };
    put_addr(buf, sel.dst().addr());
    put_addr(buf, sel.src().addr());
    let (dport, dmask) = port(sel.dport());
    let (sport, smask) = port(sel.sport());
    buf.extend_from_slice(&dport);
    buf.extend_from_slice(&dmask);
    buf.extend_from_slice(&sport);
    buf.extend_from_slice(&smask);
    buf.extend_from_slice(&family_of(sel.src().addr()).to_ne_bytes());
    buf.push(sel.dst().prefix_len());
    buf.push(sel.src().prefix_len());
    buf.push(sel.proto().unwrap_or(0));
    buf.extend_from_slice(&[0; 3]);
    buf.extend_from_slice(&0i32.to_ne_bytes()); // ifindex
    buf.extend_from_slice(&0u32.to_ne_bytes()); // user
}

fn put_lifetime(buf: &mut Vec<u8>, lft: &Lifetime) {
    let limit = |v: Option<u64>| v.unwrap_or(XFRM_INF).to_ne_bytes();
    let secs = |v: Option<u64>| v.unwrap_or(0).to_ne_bytes();
    buf.extend_from_slice(&limit(lft.soft.bytes));
    buf.extend_from_slice(&limit(lft.hard.bytes));
    buf.extend_from_slice(&limit(lft.soft.packets));
    buf.extend_from_slice(&limit(lft.hard.packets));
    buf.extend_from_slice(&secs(lft.soft.add_seconds));
    buf.extend_from_slice(&secs(lft.hard.add_seconds));
    buf.extend_from_slice(&secs(lft.soft.use_seconds));
    buf.extend_from_slice(&secs(lft.hard.use_seconds));
}

fn put_mark(buf: &mut Vec<u8>, ty: u16, mark: Mark) {
    if mark.is_none() {
        return;
    }
    let mut m = [0u8; 8];
    m[..4].copy_from_slice(&mark.value.to_ne_bytes());
    m[4..].copy_from_slice(&mark.mask.to_ne_bytes());
    attr(buf, ty, &m);
}

/// `XFRM_MSG_NEWSA` / `XFRM_MSG_UPDSA`. The key is written directly into `buf`.
pub(crate) fn encode_state(buf: &mut Vec<u8>, ty: u16, seq: u32, spec: &StateSpec) {
    let start = begin(buf, ty, NLM_F_REQUEST | NLM_F_ACK, seq);
    let info = buf.len();
    match &spec.selector {
        Some(sel) => put_selector(buf, sel),
        None => buf.resize(buf.len() + SELECTOR_LEN, 0),
    }
    // xfrm_id
    put_addr(buf, spec.dst);
    buf.extend_from_slice(&spec.spi.get().to_be_bytes());
    buf.push(IPPROTO_ESP);
    buf.extend_from_slice(&[0; 3]);
    put_addr(buf, spec.src);
    put_lifetime(buf, &spec.lifetime);
    buf.resize(buf.len() + 32 + 12, 0); // curlft, stats
    buf.extend_from_slice(&0u32.to_ne_bytes()); // seq
    buf.extend_from_slice(&spec.reqid.get().to_ne_bytes());
    buf.extend_from_slice(&family_of(spec.dst).to_ne_bytes());
    buf.push(XFRM_MODE_TUNNEL);
    buf.push(0); // legacy replay_window: must be 0 when XFRMA_REPLAY_ESN_VAL is used
    let esn = if spec.esn { XFRM_STATE_ESN } else { 0 };
    let af_unspec = if spec.selector.is_none() {
        XFRM_STATE_AF_UNSPEC
    } else {
        0
    };
    buf.push(esn | af_unspec);
    pad_to(buf, info, USERSA_INFO_LEN);

    let alg = spec.aead.algorithm();
    let key = spec.aead.key_material();
    attr_header(buf, XFRMA_ALG_AEAD, ALGO_AEAD_HDR_LEN + key.len());
    let name_at = buf.len();
    buf.extend_from_slice(alg.kernel_name().as_bytes());
    pad_to(buf, name_at, 64);
    let key_bits = u32::try_from(key.len() * 8).unwrap_or(0);
    buf.extend_from_slice(&key_bits.to_ne_bytes());
    buf.extend_from_slice(&AeadAlgorithm::ICV_BITS.to_ne_bytes());
    buf.extend_from_slice(key);
    pad4(buf);

    if spec.esn || spec.replay_window > 0 {
        let bmp_len = spec.replay_window.div_ceil(32).max(1);
        attr_header(
            buf,
            XFRMA_REPLAY_ESN_VAL,
            REPLAY_ESN_HDR_LEN + 4 * bmp_len as usize,
        );
        for v in [bmp_len, 0, 0, 0, 0, spec.replay_window] {
            buf.extend_from_slice(&v.to_ne_bytes());
        }
        buf.resize(buf.len() + 4 * bmp_len as usize, 0);
    }
    put_mark(buf, XFRMA_MARK, spec.mark);
    if !spec.output_mark.is_none() {
        attr(buf, XFRMA_SET_MARK, &spec.output_mark.value.to_ne_bytes());
        attr(
            buf,
            XFRMA_SET_MARK_MASK,
            &spec.output_mark.mask.to_ne_bytes(),
        );
    }
    finish(buf, start);
}

/// `XFRM_MSG_DELSA` / `XFRM_MSG_GETSA` for one state.
pub(crate) fn encode_state_id(buf: &mut Vec<u8>, ty: u16, seq: u32, id: &StateId) {
    let start = begin(buf, ty, NLM_F_REQUEST | NLM_F_ACK, seq);
    let at = buf.len();
    put_addr(buf, id.dst);
    buf.extend_from_slice(&id.spi.get().to_be_bytes());
    buf.extend_from_slice(&family_of(id.dst).to_ne_bytes());
    buf.push(IPPROTO_ESP);
    pad_to(buf, at, USERSA_ID_LEN);
    put_mark(buf, XFRMA_MARK, id.mark);
    finish(buf, start);
}

/// `XFRM_MSG_NEWPOLICY` / `XFRM_MSG_UPDPOLICY`.
pub(crate) fn encode_policy(buf: &mut Vec<u8>, ty: u16, seq: u32, spec: &PolicySpec) {
    let start = begin(buf, ty, NLM_F_REQUEST | NLM_F_ACK, seq);
    let info = buf.len();
    put_selector(buf, &spec.selector);
    put_lifetime(buf, &Lifetime::default());
    buf.resize(buf.len() + 32, 0); // curlft
    buf.extend_from_slice(&spec.priority.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // index: the kernel picks it
    buf.push(spec.dir.to_kernel());
    buf.push(match spec.action {
        Action::Allow => 0,
        Action::Block => 1,
    });
    pad_to(buf, info, USERPOLICY_INFO_LEN);
    if !spec.templates.is_empty() {
        attr_header(buf, XFRMA_TMPL, USER_TMPL_LEN * spec.templates.len());
        for t in &spec.templates {
            let at = buf.len();
            put_addr(buf, t.dst);
            buf.extend_from_slice(&[0; 4]); // spi: any
            buf.push(IPPROTO_ESP);
            buf.extend_from_slice(&[0; 3]);
            buf.extend_from_slice(&family_of(t.dst).to_ne_bytes());
            buf.extend_from_slice(&[0; 2]);
            put_addr(buf, t.src);
            buf.extend_from_slice(&t.reqid.get().to_ne_bytes());
            buf.push(match t.mode {
                TemplateMode::Tunnel => XFRM_MODE_TUNNEL,
                TemplateMode::Transport => XFRM_MODE_TRANSPORT,
            });
            buf.push(0); // share
            buf.push(u8::from(t.level == TemplateLevel::Optional));
            buf.push(0);
            for _ in 0..3 {
                buf.extend_from_slice(&u32::MAX.to_ne_bytes()); // any algorithm
            }
            pad_to(buf, at, USER_TMPL_LEN);
        }
    }
    put_mark(buf, XFRMA_MARK, spec.mark);
    finish(buf, start);
}

/// `XFRM_MSG_DELPOLICY` / `XFRM_MSG_GETPOLICY` for one policy.
pub(crate) fn encode_policy_id(buf: &mut Vec<u8>, ty: u16, seq: u32, id: &PolicyId) {
    let start = begin(buf, ty, NLM_F_REQUEST | NLM_F_ACK, seq);
    let at = buf.len();
    put_selector(buf, &id.selector);
    buf.extend_from_slice(&0u32.to_ne_bytes()); // index
    buf.push(id.dir.to_kernel());
    pad_to(buf, at, USERPOLICY_ID_LEN);
    put_mark(buf, XFRMA_MARK, id.mark);
    finish(buf, start);
}

/// A dump request (`XFRM_MSG_GETSA` or `XFRM_MSG_GETPOLICY` with `NLM_F_DUMP`).
pub(crate) fn encode_dump(buf: &mut Vec<u8>, ty: u16, seq: u32) {
    let start = begin(buf, ty, NLM_F_REQUEST | NLM_F_DUMP, seq);
    finish(buf, start);
}

/// `XFRM_MSG_NEWSPDINFO` setting the policy hash prefix thresholds.
pub(crate) fn encode_hthresh(buf: &mut Vec<u8>, seq: u32, v4: (u8, u8), v6: (u8, u8)) {
    let start = begin(buf, XFRM_MSG_NEWSPDINFO, NLM_F_REQUEST | NLM_F_ACK, seq);
    buf.extend_from_slice(&0u32.to_ne_bytes());
    attr(buf, XFRMA_SPD_IPV4_HTHRESH, &[v4.0, v4.1]);
    attr(buf, XFRMA_SPD_IPV6_HTHRESH, &[v6.0, v6.1]);
    finish(buf, start);
}

// ---------------------------------------------------------------- reading

/// Splits a receive buffer into messages; stops at the first malformed header.
pub(crate) fn messages(buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    nodeseal_netlink::codec::messages(buf).map_while(Result::ok)
}

/// An `NLMSG_ERROR` payload: errno (positive, 0 = ACK) and the extended-ACK message.
pub(crate) fn decode_error(msg: &Message<'_>) -> Result<(i32, Option<String>), DecodeError> {
    // Kept from before the shared decoder: an error reply always echoes at least the request's
    // header, so a shorter one is malformed here.
    need("nlmsgerr", msg.payload, 4 + NLMSG_HDRLEN)?;
    nodeseal_netlink::codec::decode_error(msg)
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), DecodeError> {
    if buf.len() < n {
        return Err(DecodeError::Truncated {
            what,
            len: buf.len(),
            need: n,
        });
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(x)
}

fn be32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Iterates `(type, payload)` of netlink attributes; stops at the first malformed one.
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    nodeseal_netlink::codec::attrs(buf)
        .map_while(Result::ok)
        .map(|a| (a.ty, a.payload))
}

fn addr_at(b: &[u8], at: usize, family: u16) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
            b[at],
            b[at + 1],
            b[at + 2],
            b[at + 3],
        ))),
        AF_INET6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[at..at + 16]);
            Ok(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => Err(DecodeError::Family { family }),
    }
}

/// Decodes a raw selector into the typed one, if it is one nodeseal can express exactly.
fn decode_selector(b: &[u8]) -> Option<Selector> {
    let family = u16_at(b, 40);
    let dst = addr_at(b, 0, family).ok()?;
    let src = addr_at(b, 16, family).ok()?;
    let dst = IpNet::new(dst, b[42]).ok()?;
    let src = IpNet::new(src, b[43]).ok()?;
    let port = |at: usize| match (u16::from_be_bytes([b[at], b[at + 1]]), u16_at(b, at + 2)) {
        (0, 0) => Some(None),
        (p, 0xffff) => Some(Some(p)),
        _ => None,
    };
    let dport = port(32)?;
    let sport = port(36)?;
    let mut sel = Selector::new(src, dst).ok()?;
    if b[44] != 0 {
        sel = sel.with_protocol(b[44], sport, dport).ok()?;
    } else if sport.is_some() || dport.is_some() {
        return None;
    }
    // Only when re-encoding gives the kernel's bytes (truncated prefixes, no ifindex).
    let mut again = Vec::with_capacity(SELECTOR_LEN);
    put_selector(&mut again, &sel);
    (again[..SELECTOR_LEN - 4] == b[..SELECTOR_LEN - 4]).then_some(sel)
}

fn decode_limits(b: &[u8], soft: bool) -> Limits {
    let o = usize::from(!soft) * 8;
    let limit = |v: u64| (v != XFRM_INF).then_some(v);
    let secs = |v: u64| (v != 0).then_some(v);
    Limits {
        bytes: limit(u64_at(b, o)),
        packets: limit(u64_at(b, 16 + o)),
        add_seconds: secs(u64_at(b, 32 + o)),
        use_seconds: secs(u64_at(b, 48 + o)),
    }
}

fn decode_lifetime(b: &[u8]) -> Lifetime {
    Lifetime {
        soft: decode_limits(b, true),
        hard: decode_limits(b, false),
    }
}

fn decode_mark(v: &[u8]) -> Mark {
    if v.len() < 8 {
        return Mark::NONE;
    }
    Mark::new(u32_at(v, 0), u32_at(v, 4))
}

/// Decodes an `XFRM_MSG_NEWSA` payload (dump entry or GETSA reply).
pub(crate) fn decode_state(p: &[u8]) -> Result<KernelState, DecodeError> {
    need("xfrm_usersa_info", p, USERSA_INFO_LEN)?;
    let family = u16_at(p, 212);
    let dst = addr_at(p, 56, family)?;
    let src = addr_at(p, 80, family)?;
    let spi = be32_at(p, 72);
    let proto = p[76];
    let reqid = u32_at(p, 208);
    let mode = p[214];
    let legacy_window = p[215];
    let flags = p[216];
    let mut stats = StateStats {
        bytes: u64_at(p, 160),
        packets: u64_at(p, 168),
        add_time: u64_at(p, 176),
        use_time: u64_at(p, 184),
        replay_window_drops: u32_at(p, 192),
        replay_drops: u32_at(p, 196),
        integrity_failures: u32_at(p, 200),
        output_seq: 0,
        input_seq: 0,
    };
    let mut mark = Mark::NONE;
    let mut output_mark = Mark::NONE;
    let mut aead = None;
    let mut esn_window = None;
    let mut foreign = false;
    for (ty, v) in attrs(&p[USERSA_INFO_LEN..]) {
        match ty {
            XFRMA_ALG_AEAD if v.len() >= ALGO_AEAD_HDR_LEN => {
                let name = v[..64].split(|b| *b == 0).next().unwrap_or_default();
                let name = std::str::from_utf8(name).unwrap_or_default();
                let key_bits = u32_at(v, 64);
                let icv = u32_at(v, 68);
                let key = &v[ALGO_AEAD_HDR_LEN..];
                aead = AeadAlgorithm::from_kernel(name, key_bits, icv)
                    .filter(|a| a.key_len() * 8 == key_bits as usize)
                    .and_then(|a| Aead::new(a, key.get(..a.key_len())?).ok());
                if aead.is_none() {
                    foreign = true;
                }
            }
            XFRMA_REPLAY_ESN_VAL if v.len() >= REPLAY_ESN_HDR_LEN => {
                stats.output_seq = u64::from(u32_at(v, 12)) << 32 | u64::from(u32_at(v, 4));
                stats.input_seq = u64::from(u32_at(v, 16)) << 32 | u64::from(u32_at(v, 8));
                esn_window = Some(u32_at(v, 20));
            }
            XFRMA_REPLAY_VAL if v.len() >= 12 => {
                stats.output_seq = u64::from(u32_at(v, 0));
                stats.input_seq = u64::from(u32_at(v, 4));
            }
            XFRMA_MARK => mark = decode_mark(v),
            XFRMA_SET_MARK if v.len() >= 4 => output_mark.value = u32_at(v, 0),
            XFRMA_SET_MARK_MASK if v.len() >= 4 => output_mark.mask = u32_at(v, 0),
            t if XFRMA_FOREIGN_STATE.contains(&t) => foreign = true,
            _ => {}
        }
    }
    let esn = flags & XFRM_STATE_ESN != 0;
    let replay_window = match esn_window {
        Some(w) if legacy_window == 0 => Some(w),
        Some(_) => None,
        None if esn => None,
        None => Some(u32::from(legacy_window)),
    };
    let spec = (|| {
        if foreign || proto != IPPROTO_ESP || mode != XFRM_MODE_TUNNEL {
            return None;
        }
        if flags & !(XFRM_STATE_ESN | XFRM_STATE_AF_UNSPEC) != 0 {
            return None;
        }
        // The kernel keeps the selector empty with family 0 for an `af-unspec` state.
        let selector = if flags & XFRM_STATE_AF_UNSPEC != 0 {
            p[..SELECTOR_LEN].iter().all(|b| *b == 0).then_some(None)?
        } else {
            Some(decode_selector(&p[..SELECTOR_LEN])?)
        };
        Some(StateSpec {
            src,
            dst,
            spi: Spi::new(spi).ok()?,
            reqid: ReqId::new(reqid).ok()?,
            aead: aead?,
            esn,
            replay_window: replay_window?,
            mark,
            output_mark,
            selector,
            lifetime: decode_lifetime(&p[96..160]),
        })
    })();
    Ok(KernelState {
        dst,
        spi,
        proto,
        reqid,
        mark,
        spec,
        stats,
    })
}

/// Decodes an `XFRM_MSG_EXPIRE` payload (`struct xfrm_user_expire`, then the state's mark).
/// The kernel sends no key material with it.
pub(crate) fn decode_expire(p: &[u8]) -> Result<Expire, DecodeError> {
    need("xfrm_user_expire", p, USER_EXPIRE_LEN)?;
    let family = u16_at(p, 212);
    let mark = attrs(&p[USER_EXPIRE_LEN..])
        .find(|(ty, _)| *ty == XFRMA_MARK)
        .map_or(Mark::NONE, |(_, v)| decode_mark(v));
    Ok(Expire {
        src: addr_at(p, 80, family)?,
        dst: addr_at(p, 56, family)?,
        spi: be32_at(p, 72),
        proto: p[76],
        reqid: u32_at(p, 208),
        mark,
        hard: p[USERSA_INFO_LEN] != 0,
    })
}

fn decode_template(t: &[u8]) -> (u32, Option<Template>) {
    let reqid = u32_at(t, 44);
    let family = u16_at(t, 24);
    let tmpl = (|| {
        let dst = addr_at(t, 0, family).ok()?;
        let src = addr_at(t, 28, family).ok()?;
        let spi = be32_at(t, 16);
        let any_alg = (52..64).step_by(4).all(|at| u32_at(t, at) == u32::MAX);
        let mode = match t[48] {
            XFRM_MODE_TUNNEL => TemplateMode::Tunnel,
            XFRM_MODE_TRANSPORT => TemplateMode::Transport,
            _ => return None,
        };
        if spi != 0 || t[20] != IPPROTO_ESP || t[49] != 0 || !any_alg {
            return None;
        }
        let level = match t[50] {
            0 => TemplateLevel::Required,
            _ => TemplateLevel::Optional,
        };
        Some(Template {
            src,
            dst,
            reqid: ReqId::new(reqid).ok()?,
            level,
            mode,
        })
    })();
    (reqid, tmpl)
}

/// Decodes an `XFRM_MSG_NEWPOLICY` payload (dump entry or GETPOLICY reply).
pub(crate) fn decode_policy(p: &[u8]) -> Result<KernelPolicy, DecodeError> {
    need("xfrm_userpolicy_info", p, USERPOLICY_INFO_LEN)?;
    let priority = u32_at(p, 152);
    let index = u32_at(p, 156);
    let dir = p[160];
    let action = p[161];
    let flags = p[162];
    let share = p[163];
    let mut mark = Mark::NONE;
    let mut reqids = Vec::new();
    let mut templates = Some(Vec::new());
    let mut foreign = false;
    for (ty, v) in attrs(&p[USERPOLICY_INFO_LEN..]) {
        match ty {
            XFRMA_TMPL => {
                for t in v.chunks_exact(USER_TMPL_LEN) {
                    let (reqid, tmpl) = decode_template(t);
                    reqids.push(reqid);
                    match (tmpl, templates.as_mut()) {
                        (Some(t), Some(ts)) => ts.push(t),
                        _ => templates = None,
                    }
                }
            }
            XFRMA_MARK => mark = decode_mark(v),
            XFRMA_POLICY_TYPE => foreign |= v.first().is_some_and(|t| *t != 0),
            XFRMA_IF_ID => foreign |= v.len() >= 4 && u32_at(v, 0) != 0,
            8 => foreign = true, // SEC_CTX
            _ => {}
        }
    }
    let key = PolicyKey::from_raw(&p[..SELECTOR_LEN], dir, mark);
    let spec = (|| {
        if foreign
            || flags != 0
            || share != 0
            || decode_lifetime(&p[56..120]) != Lifetime::default()
        {
            return None;
        }
        Some(PolicySpec {
            selector: decode_selector(&p[..SELECTOR_LEN])?,
            dir: Direction::from_kernel(dir)?,
            action: match action {
                0 => Action::Allow,
                1 => Action::Block,
                _ => return None,
            },
            priority,
            mark,
            templates: templates?,
        })
    })();
    Ok(KernelPolicy {
        dir,
        index,
        mark,
        reqids,
        spec,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeseal_netlink::codec::{NLM_F_ACK_TLVS, NLM_F_CAPPED, NLMSGERR_ATTR_MSG};

    fn sel(src: &str, dst: &str) -> Selector {
        Selector::new(src.parse().unwrap(), dst.parse().unwrap()).unwrap()
    }

    fn state(alg: AeadAlgorithm) -> StateSpec {
        let aead = Aead::new(alg, &(0..alg.key_len() as u8).collect::<Vec<_>>()).unwrap();
        StateSpec::new(
            "192.168.0.1".parse().unwrap(),
            "192.168.0.2".parse().unwrap(),
            Spi::new(0x1234_5678).unwrap(),
            ReqId::new(0x4e53_0001).unwrap(),
            aead,
            Some(sel("10.0.1.0/24", "10.0.2.0/24")),
        )
        .unwrap()
    }

    /// Pulls the payload of the single message in `buf`, checking the header.
    fn payload(buf: &[u8], ty: u16) -> Vec<u8> {
        let msgs: Vec<_> = messages(buf).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].ty, ty);
        assert_eq!(msgs[0].seq, 7);
        assert_eq!(u32_at(buf, 0) as usize, buf.len());
        msgs[0].payload.to_vec()
    }

    #[test]
    fn fixed_layouts_have_kernel_sizes() {
        let mut b = Vec::new();
        put_selector(&mut b, &sel("10.0.0.0/8", "10.1.0.0/16"));
        assert_eq!(b.len(), SELECTOR_LEN);
        let mut b = Vec::new();
        encode_state_id(
            &mut b,
            XFRM_MSG_DELSA,
            1,
            &StateId {
                dst: "1.2.3.4".parse().unwrap(),
                spi: Spi::new(300).unwrap(),
                mark: Mark::NONE,
            },
        );
        assert_eq!(b.len(), NLMSG_HDRLEN + USERSA_ID_LEN);
    }

    #[test]
    fn state_round_trips_every_attribute() {
        for alg in [
            AeadAlgorithm::AesGcm128,
            AeadAlgorithm::AesGcm256,
            AeadAlgorithm::ChaCha20Poly1305,
        ] {
            let mut spec = state(alg);
            spec.mark = Mark::new(0x0003_0e00, 0xffff_ff00);
            spec.output_mark = Mark::new(0x0d00, 0x0f00);
            spec.replay_window = 1024;
            spec.lifetime = Lifetime {
                soft: Limits {
                    bytes: Some(1 << 40),
                    packets: Some(1 << 30),
                    add_seconds: Some(3000),
                    use_seconds: None,
                },
                hard: Limits {
                    bytes: None,
                    packets: Some(1 << 31),
                    add_seconds: Some(3600),
                    use_seconds: Some(60),
                },
            };
            spec.selector = spec
                .selector
                .map(|s| s.with_protocol(17, Some(53), None).unwrap());
            let mut buf = Vec::new();
            encode_state(&mut buf, XFRM_MSG_NEWSA, 7, &spec);
            let p = payload(&buf, XFRM_MSG_NEWSA);
            let k = decode_state(&p).unwrap();
            assert_eq!(k.spec.as_ref(), Some(&spec), "{alg:?}");
            assert_eq!(
                (k.spi, k.proto, k.reqid, k.mark),
                (0x1234_5678, 50, 0x4e53_0001, spec.mark)
            );
        }
    }

    #[test]
    fn state_without_esn_or_window_and_ipv6_round_trips() {
        let mut spec = state(AeadAlgorithm::AesGcm128);
        spec.esn = false;
        spec.replay_window = 0;
        assert_eq!(spec.validate(), Ok(()));
        spec.src = "fd00::1".parse().unwrap();
        spec.dst = "fd00::2".parse().unwrap();
        spec.selector = Some(sel("fd10:1::/64", "fd10:2::/64"));
        let mut buf = Vec::new();
        encode_state(&mut buf, XFRM_MSG_UPDSA, 7, &spec);
        let k = decode_state(&payload(&buf, XFRM_MSG_UPDSA)).unwrap();
        assert_eq!(k.spec, Some(spec));
    }

    #[test]
    fn a_state_of_either_inner_family_round_trips_with_an_empty_selector() {
        let mut spec = state(AeadAlgorithm::AesGcm128);
        spec.selector = None;
        let mut buf = Vec::new();
        encode_state(&mut buf, XFRM_MSG_NEWSA, 7, &spec);
        let p = payload(&buf, XFRM_MSG_NEWSA);
        assert!(p[..SELECTOR_LEN].iter().all(|b| *b == 0));
        assert_eq!(p[216], XFRM_STATE_ESN | XFRM_STATE_AF_UNSPEC);
        assert_eq!(decode_state(&p).unwrap().spec, Some(spec));
        // A selector the kernel would not keep with that flag is not one of ours.
        let mut odd = p.clone();
        odd[40] = 2;
        assert_eq!(decode_state(&odd).unwrap().spec, None);
    }

    #[test]
    fn expire_notice_names_the_state_and_its_limit() {
        let mut spec = state(AeadAlgorithm::AesGcm128);
        spec.mark = Mark::new(0x0003_0e00, 0xffff_ff00);
        let mut buf = Vec::new();
        encode_state(&mut buf, XFRM_MSG_NEWSA, 7, &spec);
        let p = payload(&buf, XFRM_MSG_NEWSA);
        // The kernel's layout: the usersa_info, `hard`, padding, then only the mark attribute.
        for hard in [false, true] {
            let mut e = p[..USERSA_INFO_LEN].to_vec();
            e.push(u8::from(hard));
            e.resize(USER_EXPIRE_LEN, 0);
            put_mark(&mut e, XFRMA_MARK, spec.mark);
            let x = decode_expire(&e).unwrap();
            assert_eq!(
                x,
                Expire {
                    src: spec.src,
                    dst: spec.dst,
                    spi: 0x1234_5678,
                    proto: 50,
                    reqid: 0x4e53_0001,
                    mark: spec.mark,
                    hard,
                }
            );
        }
        assert!(matches!(
            decode_expire(&p[..USERSA_INFO_LEN]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn state_counters_decode_with_esn_high_bits() {
        let spec = state(AeadAlgorithm::AesGcm128);
        let mut buf = Vec::new();
        encode_state(&mut buf, XFRM_MSG_NEWSA, 7, &spec);
        let mut p = payload(&buf, XFRM_MSG_NEWSA);
        p[160..168].copy_from_slice(&1000u64.to_ne_bytes());
        p[168..176].copy_from_slice(&10u64.to_ne_bytes());
        p[192..196].copy_from_slice(&1u32.to_ne_bytes());
        p[196..200].copy_from_slice(&2u32.to_ne_bytes());
        p[200..204].copy_from_slice(&3u32.to_ne_bytes());
        // replay_esn attribute follows the aead attribute (4 + 72 + 20 bytes)
        let esn = USERSA_INFO_LEN + 4 + ALGO_AEAD_HDR_LEN + 20 + 4;
        p[esn + 4..esn + 8].copy_from_slice(&5u32.to_ne_bytes()); // oseq
        p[esn + 12..esn + 16].copy_from_slice(&2u32.to_ne_bytes()); // oseq_hi
        p[esn + 8..esn + 12].copy_from_slice(&9u32.to_ne_bytes()); // seq
        let k = decode_state(&p).unwrap();
        assert_eq!(
            k.stats,
            StateStats {
                bytes: 1000,
                packets: 10,
                replay_window_drops: 1,
                replay_drops: 2,
                integrity_failures: 3,
                output_seq: (2 << 32) | 5,
                input_seq: 9,
                ..StateStats::default()
            }
        );
        assert_eq!(k.spec, Some(spec), "counters are not part of the spec");
    }

    #[test]
    fn foreign_state_shapes_have_no_spec() {
        let spec = state(AeadAlgorithm::AesGcm128);
        let mut buf = Vec::new();
        encode_state(&mut buf, XFRM_MSG_NEWSA, 7, &spec);
        let mut p = payload(&buf, XFRM_MSG_NEWSA);
        p[214] = 0; // transport mode
        let k = decode_state(&p).unwrap();
        assert_eq!(k.spec, None);
        assert_eq!(k.reqid, spec.reqid.get());
        // A CBC/HMAC state (ALG_CRYPT attribute) is not ours to describe.
        let mut p = payload(&buf, XFRM_MSG_NEWSA);
        p.truncate(USERSA_INFO_LEN);
        attr(&mut p, 2, &[0; 72]);
        assert_eq!(decode_state(&p).unwrap().spec, None);
        assert!(matches!(
            decode_state(&p[..100]),
            Err(DecodeError::Truncated { need: 224, .. })
        ));
    }

    #[test]
    fn policy_round_trips_every_attribute() {
        let t = |s: &str, d: &str, r: u32| Template {
            src: s.parse().unwrap(),
            dst: d.parse().unwrap(),
            reqid: ReqId::new(r).unwrap(),
            level: TemplateLevel::Required,
            mode: TemplateMode::Tunnel,
        };
        for dir in [Direction::In, Direction::Out, Direction::Fwd] {
            let mut spec = PolicySpec::new(
                sel("10.0.1.0/24", "10.0.2.0/24"),
                dir,
                t("1.1.1.1", "2.2.2.2", 5),
            );
            spec.priority = 1234;
            spec.mark = Mark::new(0x0e00, 0x0f00);
            spec.templates.push(Template {
                level: TemplateLevel::Optional,
                mode: TemplateMode::Transport,
                ..t("3.3.3.3", "4.4.4.4", 6)
            });
            let mut buf = Vec::new();
            encode_policy(&mut buf, XFRM_MSG_NEWPOLICY, 7, &spec);
            let k = decode_policy(&payload(&buf, XFRM_MSG_NEWPOLICY)).unwrap();
            assert_eq!(k.spec.as_ref(), Some(&spec));
            assert_eq!(k.reqids, vec![5, 6]);
            assert_eq!(k.key, PolicyKey::of(&spec.id()));
        }
        let mut block = PolicySpec::new(
            sel("fd00::/48", "fd01::/48"),
            Direction::Fwd,
            t("fd00::1", "fd00::2", 9),
        );
        block.templates.clear();
        block.action = Action::Block;
        let mut buf = Vec::new();
        encode_policy(&mut buf, XFRM_MSG_UPDPOLICY, 7, &block);
        let k = decode_policy(&payload(&buf, XFRM_MSG_UPDPOLICY)).unwrap();
        assert_eq!(k.spec, Some(block));
        assert!(k.reqids.is_empty());
    }

    #[test]
    fn policy_id_and_dump_and_spdinfo_encode() {
        let id = PolicyId {
            selector: sel("10.0.0.0/24", "10.0.1.0/24"),
            dir: Direction::Out,
            mark: Mark::new(1, 1),
        };
        let mut buf = Vec::new();
        encode_policy_id(&mut buf, XFRM_MSG_DELPOLICY, 7, &id);
        let p = payload(&buf, XFRM_MSG_DELPOLICY);
        assert_eq!(p.len(), USERPOLICY_ID_LEN + 12);
        assert_eq!(decode_selector(&p[..SELECTOR_LEN]), Some(id.selector));
        assert_eq!(p[60], 1);
        let mut buf = Vec::new();
        encode_dump(&mut buf, XFRM_MSG_GETSA, 7);
        assert!(payload(&buf, XFRM_MSG_GETSA).is_empty());
        assert_eq!(u16_at(&buf, 6), NLM_F_REQUEST | NLM_F_DUMP);
        let mut buf = Vec::new();
        encode_hthresh(&mut buf, 7, (24, 24), (64, 64));
        let p = payload(&buf, XFRM_MSG_NEWSPDINFO);
        let a: Vec<_> = attrs(&p[4..]).collect();
        assert_eq!(a, vec![(3, &[24u8, 24][..]), (4, &[64u8, 64][..])]);
    }

    #[test]
    fn selector_with_ifindex_or_odd_port_mask_is_not_ours() {
        let mut b = Vec::new();
        put_selector(&mut b, &sel("10.0.0.0/24", "10.0.1.0/24"));
        assert!(decode_selector(&b).is_some());
        let mut c = b.clone();
        c[48] = 3; // ifindex
        assert_eq!(decode_selector(&c), None);
        let mut c = b.clone();
        c[44] = 6;
        c[34] = 0xff; // dport mask 0xff00
        assert_eq!(decode_selector(&c), None);
        let mut c = b;
        c[0] = 10;
        c[3] = 7; // host bits set in a /24 destination
        assert_eq!(decode_selector(&c), None);
    }

    #[test]
    fn error_messages_decode_with_extack_text() {
        let mut buf = Vec::new();
        let start = begin(&mut buf, NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 7);
        buf.extend_from_slice(&(-libc::ENOSYS).to_ne_bytes());
        let inner = begin(&mut buf, XFRM_MSG_NEWSA, NLM_F_REQUEST, 7);
        finish(&mut buf, inner);
        let inner_len = buf.len() - inner;
        buf[inner..inner + 4].copy_from_slice(&(300u32).to_ne_bytes());
        assert_eq!(inner_len, NLMSG_HDRLEN);
        attr(
            &mut buf,
            NLMSGERR_ATTR_MSG,
            b"Requested AEAD algorithm not found\0",
        );
        finish(&mut buf, start);
        let msg = messages(&buf).next().unwrap();
        assert_eq!(
            decode_error(&msg).unwrap(),
            (
                libc::ENOSYS,
                Some("Requested AEAD algorithm not found".to_owned())
            )
        );
    }
}
