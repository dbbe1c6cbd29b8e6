//! Test fixtures: the fake kernel and a synthetic peer mesh like the agent installs.
//!
//! Node `i` has node IP `172.16.0.0 + i` and pod CIDR `10.(i/256).(i%256).0/24`. Per peer and
//! epoch: one OUT state (local -> peer, mark `0x0e00 | peer << 16`), one IN state
//! (peer -> local, mark `0x0d00/0x0f00`), and OUT/IN/FWD policies with required templates.
//!
//! Not for timing the kernel: the per-peer reqid (base + i) and node IP (172.16.0.0 + i) cancel
//! in the kernel's IPv4 state hash by destination (`reqid ^ ntohl(daddr + saddr)`, folded to 16
//! bits), so the kernel puts every state of a mesh into one bucket and each insertion walks all
//! of them. The xfrm bench programs the agent's layout instead (one reqid).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

pub use crate::kernel::fake::FakeKernel;
use crate::{
    Aead, AeadAlgorithm, Direction, Mark, Ownership, PolicySpec, ReqId, Selector, Spi, StateSpec,
    Template,
};

/// First reqid of the fixture's ownership range.
pub const REQID_BASE: u32 = 0x4e53_0000;

/// The fixture's ownership rule: reqids `REQID_BASE..=REQID_BASE + 0xffff`.
#[must_use]
pub fn ownership() -> Ownership {
    let lo = ReqId::new(REQID_BASE).unwrap_or_else(|_| unreachable!("constant is non-zero"));
    let hi = ReqId::new(REQID_BASE + 0xffff).unwrap_or_else(|_| unreachable!("non-zero"));
    Ownership::new(lo..=hi)
}

/// Node IP of node `i`.
#[must_use]
pub fn node_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i))
}

/// Pod CIDR (/24) of node `i` (i < 65536).
#[must_use]
pub fn pod_cidr(i: u32) -> IpNet {
    let [_, _, hi, lo] = i.to_be_bytes();
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(10, hi, lo, 0), 24))
}

fn spi(from: u32, to: u32, epoch: u32) -> Spi {
    // Unique per receiving node: sender index and epoch, never in the reserved range.
    let v = 0x1000_0000 | ((from & 0xffff) << 8) | (epoch & 0xff) | (to & 0x0f) << 24;
    Spi::new(v).unwrap_or_else(|_| unreachable!("0x1000_0000 bit set"))
}

fn key(from: u32, to: u32, epoch: u32) -> Aead {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&from.to_be_bytes());
    k[4..8].copy_from_slice(&to.to_be_bytes());
    k[8..12].copy_from_slice(&epoch.to_be_bytes());
    k[12..].copy_from_slice(b"nodeseal");
    Aead::new(AeadAlgorithm::AesGcm128, &k).unwrap_or_else(|_| unreachable!("20 bytes"))
}

/// The OUT mark for traffic to `peer`.
#[must_use]
pub const fn out_mark(peer: u32) -> Mark {
    Mark::new(0x0e00 | (peer << 16), 0xffff_ff00)
}

/// The IN mark (what decrypted packets carry).
pub const IN_MARK: Mark = Mark::new(0x0d00, 0x0f00);

/// Reqid used for everything about `peer`.
#[must_use]
pub fn reqid(peer: u32) -> ReqId {
    ReqId::new(REQID_BASE + (peer & 0xffff)).unwrap_or_else(|_| unreachable!("non-zero"))
}

/// The 2 states and 3 policies node `local` installs for `peer` at `epoch`.
#[must_use]
pub fn peer_objects(local: u32, peer: u32, epoch: u32) -> (Vec<StateSpec>, Vec<PolicySpec>) {
    let (l, p) = (node_ip(local), node_ip(peer));
    let (lp, pp) = (pod_cidr(local), pod_cidr(peer));
    let sel_out = Selector::new(lp, pp).unwrap_or_else(|_| unreachable!("both v4"));
    let sel_in = Selector::new(pp, lp).unwrap_or_else(|_| unreachable!("both v4"));
    let r = reqid(peer);
    let state = |src, dst, spi, aead, sel| {
        StateSpec::new(src, dst, spi, r, aead, Some(sel))
            .unwrap_or_else(|_| unreachable!("both v4"))
    };
    let mut out = state(
        l,
        p,
        spi(local, peer, epoch),
        key(local, peer, epoch),
        sel_out,
    );
    out.mark = out_mark(peer);
    let mut inb = state(
        p,
        l,
        spi(peer, local, epoch),
        key(peer, local, epoch),
        sel_in,
    );
    inb.mark = IN_MARK;
    let t_out = Template::new(l, p, r).unwrap_or_else(|_| unreachable!("both v4"));
    let t_in = Template::new(p, l, r).unwrap_or_else(|_| unreachable!("both v4"));
    let mut pol_out = PolicySpec::new(sel_out, Direction::Out, t_out);
    pol_out.mark = out_mark(peer);
    let mut pol_in = PolicySpec::new(sel_in, Direction::In, t_in);
    pol_in.mark = IN_MARK;
    let mut pol_fwd = PolicySpec::new(sel_in, Direction::Fwd, t_in);
    pol_fwd.mark = IN_MARK;
    (vec![out, inb], vec![pol_out, pol_in, pol_fwd])
}

/// Everything node `local` installs for peers `1..=n` (skipping itself), with `epoch(peer)`.
#[must_use]
pub fn mesh(local: u32, n: u32, epoch: impl Fn(u32) -> u32) -> crate::Desired {
    let mut d = crate::Desired::default();
    for peer in (0..=n).filter(|p| *p != local) {
        let (s, p) = peer_objects(local, peer, epoch(peer));
        d.states.extend(s);
        d.policies.extend(p);
    }
    d
}
