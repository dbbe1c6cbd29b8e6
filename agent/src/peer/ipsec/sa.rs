//! The XFRM layout of the fabric: which states and policies a peer gets, and how they are
//! recognised as ours.
//!
//! Per peer and key epoch: one OUT state (the peer's inbound SPI, our outbound key) and one IN
//! state (our inbound SPI). The OUT state carries the mark `encrypt(node id, slot)`; the eBPF
//! datapath writes that mark on packets for the peer, so switching a peer to a new epoch's state
//! is one map write of the slot (see `bpf/common`'s mark layout). Because the kernel looks an
//! OUT state up with the *policy's* mark, each active slot has its own OUT policy per peer pod
//! CIDR, with the same mark.
//!
//! The states carry inner traffic of either family (an empty selector, `flag af-unspec`): one
//! handshake keys a peer's IPv4 and IPv6 pod CIDRs alike, all through the tunnel between the two
//! node IPs, whichever family those are. Each policy has its CIDR's family and a template of the
//! node IPs' family.
//!
//! Per peer pod CIDR, IN and FWD policies with a *required* ESP template from the peer's node IP:
//! a packet whose inner source lies in that CIDR is accepted only if it was decrypted by a state
//! of the peer's tunnel. Plaintext claiming a peer pod's address, or a packet another
//! (authenticated) node encrypted with a forged inner source, is dropped by the kernel
//! (`XfrmInTmplMismatch` / `XfrmInNoPols`). That binds the inner source to the authenticated
//! peer.
//!
//! In strict mode a lower-priority OUT policy per peer pod CIDR blocks what carries no
//! encrypt mark, so nothing reaches a peer's pods in clear even if a packet escaped the eBPF
//! program (`XfrmOutPolBlock`).
//!
//! With node encryption ([`HostEncryption`]) traffic between the node IPs is encrypted too, on
//! SAs of its own per epoch ([`HostSas`], keys from the handshake's `host_spi`s):
//! - host traffic (this node's own packets, which no eBPF program marks) to the peer's node IP
//!   and pod CIDRs matches unmarked OUT policies with a template between the node IPs, below the
//!   marked ones; the kernel looks its state up with mark 0, which only the host OUT state
//!   (mark 0 over the owned bits) matches. Of two host OUT states the kernel takes the newest,
//!   so a flip adds the new one and deletes the older;
//! - pods' traffic to the peer's node IP is marked by the datapath and goes through the pod SAs
//!   (a marked OUT policy per slot for the node IP);
//! - IN and FWD policies require the peer's tunnel for the peer's node IP as a source, so
//!   plaintext from it is dropped by the kernel;
//! - exemptions stay in clear: the handshake ports (no chicken-and-egg after a peer lost its
//!   SAs), the operator's exempt TCP ports, and IPv6 neighbour discovery between the node IPs.
//!   They are policies above the host ones whose only template is optional, in transport mode
//!   (the kernel refuses optional tunnel templates in OUT policies), and names reqid
//!   [`EXEMPT_REQID`], which no state carries: the kernel finds nothing to apply and lets the
//!   packet pass. They cover the tunnel's node IPs; a dual-stack peer's second node IP is
//!   reached only through the tunnel. (A key manager listening for `XFRM_MSG_ACQUIRE` would be asked for such a
//!   state, and may hold a larval one for 30 s; nodeseal does not listen.)
//!
//! Every object carries reqid [`REQID`] (exemptions [`EXEMPT_REQID`]); [`ownership`] claims
//! exactly those, so nothing foreign is ever changed.
//!
//! Every policy names this node's side as "any" and the peer's side by its pod CIDR, so the
//! kernel could hash them all by the peer's prefix under [`POLICY_HASH_THRESHOLDS`]: under the
//! default thresholds pod-CIDR policies sit in the kernel's inexact structures, whose insertion
//! cost grows with the number of peers (see `nodeseal_xfrm::PolicyHashThresholds`).

use std::net::IpAddr;

use ipnet::IpNet;
use nodeseal_bpf::{NodeId, mark};
use nodeseal_xfrm::{
    Action, Aead, AeadAlgorithm, Direction, FamilyThresholds, Lifetime, Limits, Mark, Ownership,
    PolicyHashThresholds, PolicySpec, ReqId, Selector, SpecError, Spi, StateSpec, Template,
};

use crate::peer::{LocalEnd, PeerEnd};

/// The reqid of every nodeseal state and policy ("NS" and 1).
pub const REQID: u32 = 0x4e53_0001;

/// The reqid of the exemption policies' optional templates: no state carries it.
pub const EXEMPT_REQID: u32 = 0x4e53_0002;

/// Priority of the marked OUT policies (lower wins).
const PRIORITY_ENCRYPT: u32 = 100;
/// Priority of node encryption's exemptions: above the host policies, below the pods' (a pod's
/// packet to an exempt port stays encrypted).
const PRIORITY_EXEMPT: u32 = 120;
/// Priority of node encryption's host policies.
const PRIORITY_HOST: u32 = 150;
/// Priority of strict mode's block policies: below the marked ones.
const PRIORITY_STRICT_BLOCK: u32 = 200;
/// Priority of IN/FWD policies.
const PRIORITY_INBOUND: u32 = 100;

/// The anti-replay window of every state, in packets. The kernel's AES-GCM may complete a
/// packet's encryption later than the next one's (asynchronously, when the CPU cannot use its
/// vector unit at that moment), so packets of one SA arrive out of order; with extended
/// sequence numbers a packet older than the window is taken for the next 2^32 cycle and fails
/// its integrity check. 128 was measured too small: two 500-packet/s streams through one SA in
/// a loaded test VM (Linux 6.1) lost 415 packets that way (`XfrmInStateProtoError`, the IN
/// state's `failed` count) with 260 reordered. 4096 bits of bitmap is 512 bytes per state.
pub const REPLAY_WINDOW: u32 = 4096;

/// The policy hash thresholds (`ip xfrm policy set hthresh4 0 24 hthresh6 0 64`) under which
/// every policy of this layout is in the kernel's exact hash: any length for this node's side
/// (always "any" here), and the peer's pod CIDR from /24 (IPv4) or /64 (IPv6), the sizes
/// Kubernetes allocates per node by default (`--node-cidr-mask-size`). Longer CIDRs are hashed
/// too (several per bucket at worst: four /26s share a /24's bucket); a peer with a shorter one
/// still works, its policies merely stay inexact. A lower remote threshold would hash more
/// prefixes but put every peer of a cluster range into few buckets (all of 10.244.0.0/16 into
/// one at 16 bits), which is the same linear walk again.
///
/// The agent sets them at start-up (`app::run`); the XFRM bench measures them against the
/// kernel's defaults (`NODESEAL_BENCH_HTHRESH`).
pub const POLICY_HASH_THRESHOLDS: PolicyHashThresholds = match PolicyHashThresholds::new(
    FamilyThresholds {
        local: 0,
        remote: 24,
    },
    FamilyThresholds {
        local: 0,
        remote: 64,
    },
) {
    Ok(t) => t,
    // Evaluated at compile time: these constants are within 32 and 128 bits.
    Err(_) => panic!("policy hash thresholds out of range"),
};

/// How much one SA may carry, on top of the time-based rekey.
///
/// Each is a hard limit: the kernel deletes an SA that reaches it, so no key is used beyond it
/// even when rekeys keep failing. At three quarters of it (the soft limit) the kernel sends an
/// expire notice and the agent rekeys the peer at once, which leaves the last quarter for the
/// rekey to complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaLimits {
    /// Bytes per SA (`None`: no limit).
    pub bytes: Option<u64>,
    /// Packets per SA (`None`: no limit).
    pub packets: Option<u64>,
}

impl SaLimits {
    /// 2^38 bytes: TLS 1.3 bounds an AES-GCM key at 2^24.5 full-size (2^14-byte) records
    /// (RFC 8446, section 5.5), about 2^38.5 bytes; this stays below it whatever the packet size.
    pub const DEFAULT_BYTES: u64 = 1 << 38;
    /// 2^32 packets: what a 32-bit sequence number counts; ESN lifts that limit, this keeps
    /// one key's use within it anyway.
    pub const DEFAULT_PACKETS: u64 = 1 << 32;

    /// The XFRM lifetime of every state: these hard limits, soft limits at three quarters.
    #[must_use]
    pub fn lifetime(self) -> Lifetime {
        let soft = |limit: Option<u64>| limit.map(|v| v - v / 4);
        Lifetime {
            soft: Limits {
                bytes: soft(self.bytes),
                packets: soft(self.packets),
                ..Limits::default()
            },
            hard: Limits {
                bytes: self.bytes,
                packets: self.packets,
                ..Limits::default()
            },
        }
    }
}

impl Default for SaLimits {
    fn default() -> Self {
        Self {
            bytes: Some(Self::DEFAULT_BYTES),
            packets: Some(Self::DEFAULT_PACKETS),
        }
    }
}

/// A key slot of the `skb->mark` (1..=15; 0 means "no key").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct KeySlot(u8);

impl KeySlot {
    /// The first slot.
    pub const FIRST: Self = Self(1);

    /// A slot; `None` outside 1..=15.
    #[must_use]
    pub fn new(slot: u8) -> Option<Self> {
        (1..=mark::MAX_KEY_SLOT)
            .contains(&slot)
            .then_some(Self(slot))
    }

    /// The slot after this one, wrapping from 15 to 1.
    #[must_use]
    pub fn next(self) -> Self {
        if self.0 >= mark::MAX_KEY_SLOT {
            Self(1)
        } else {
            Self(self.0 + 1)
        }
    }

    /// The raw slot number.
    #[must_use]
    pub fn get(self) -> u8 {
        self.0
    }
}

impl std::fmt::Display for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The reqid as the xfrm crate's type.
fn reqid() -> ReqId {
    // REQID is a non-zero constant.
    ReqId::new(REQID).unwrap_or_else(|_| unreachable!("REQID is non-zero"))
}

fn exempt_reqid() -> ReqId {
    ReqId::new(EXEMPT_REQID).unwrap_or_else(|_| unreachable!("EXEMPT_REQID is non-zero"))
}

/// Which kernel objects are ours: exactly reqids [`REQID`] and [`EXEMPT_REQID`].
#[must_use]
pub fn ownership() -> Ownership {
    Ownership::new(reqid()..=exempt_reqid())
}

/// Node encryption in IPsec mode: what stays in clear between the node IPs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostEncryption {
    /// This node's handshake port.
    pub handshake_port: u16,
    /// TCP ports (source or destination) exempted by the operator.
    pub exempt_tcp_ports: Vec<u16>,
}

impl HostEncryption {
    /// The TCP ports that stay in clear with `peer`: both handshake ports and the exempt ones.
    fn ports(&self, peer: &PeerEnd) -> Vec<u16> {
        let mut ports = vec![self.handshake_port, peer.handshake_port];
        ports.extend(&self.exempt_tcp_ports);
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// The mark of the host OUT state: none of the owned bits set. The kernel looks the state up
/// with the unmarked host policy's mark, 0, which no pod state's mark matches; the pods'
/// lookups carry marks this one does not match.
pub(crate) const HOST_MARK: Mark = Mark::new(0, mark::OWNED_MASK);

/// One epoch's host SAs with a peer (node encryption).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSas {
    /// OUT state: to the peer, with the host SPI the peer chose, mark [`HOST_MARK`].
    pub outbound: StateSpec,
    /// IN state: from the peer, with the host SPI we chose.
    pub inbound: StateSpec,
}

/// One epoch's pair of SAs with a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochSas {
    /// Slot whose mark selects the OUT state.
    pub slot: KeySlot,
    /// OUT state: to the peer, with the SPI the peer chose.
    pub outbound: StateSpec,
    /// IN state: from the peer, with the SPI we chose.
    pub inbound: StateSpec,
    /// The host SAs, with node encryption when the peer agreed to it.
    pub host: Option<HostSas>,
}

/// The mark the datapath writes for `peer` using `slot`, compared over every bit nodeseal owns.
#[must_use]
pub fn encrypt_mark(peer: NodeId, slot: KeySlot) -> Mark {
    Mark::new(mark::encrypt(peer.0, slot.get()), mark::OWNED_MASK)
}

impl EpochSas {
    /// Builds the two states of an epoch, each with `limits`. `out_key` / `in_key` are
    /// `rfc4106(gcm(aes))` key and salt bytes (20 or 36).
    ///
    /// # Errors
    /// [`SpecError`] for a key of the wrong length or node IPs of different families.
    pub fn new(
        local: &LocalEnd,
        peer: &PeerEnd,
        slot: KeySlot,
        (out_spi, out_key): (Spi, &[u8]),
        (in_spi, in_key): (Spi, &[u8]),
        limits: SaLimits,
    ) -> Result<Self, SpecError> {
        let mut outbound = state(local.ip, peer.ip, (out_spi, out_key), limits)?;
        outbound.mark = encrypt_mark(peer.node_id, slot);
        let inbound = state(peer.ip, local.ip, (in_spi, in_key), limits)?;
        Ok(Self {
            slot,
            outbound,
            inbound,
            host: None,
        })
    }

    /// Adds the host SAs (node encryption), keyed like [`EpochSas::new`]'s.
    ///
    /// # Errors
    /// As [`EpochSas::new`].
    pub fn with_host(
        mut self,
        local: &LocalEnd,
        peer: &PeerEnd,
        out: (Spi, &[u8]),
        inbound: (Spi, &[u8]),
        limits: SaLimits,
    ) -> Result<Self, SpecError> {
        let mut outbound = state(local.ip, peer.ip, out, limits)?;
        outbound.mark = HOST_MARK;
        self.host = Some(HostSas {
            outbound,
            inbound: state(peer.ip, local.ip, inbound, limits)?,
        });
        Ok(self)
    }

    /// The OUT policies that send marked packets for the peer's pod CIDRs (and, with node
    /// encryption, its node IP) into this epoch's OUT state.
    ///
    /// # Errors
    /// [`SpecError`] if the node IPs differ in family.
    pub fn out_policies(
        &self,
        local: &LocalEnd,
        peer: &PeerEnd,
        host: Option<&HostEncryption>,
    ) -> Result<Vec<PolicySpec>, SpecError> {
        let template = Template::new(local.ip, peer.ip, reqid())?;
        let node_ips = host
            .map(|_| peer.node_ips().map(IpNet::from))
            .into_iter()
            .flatten();
        peer.pod_cidrs
            .iter()
            .copied()
            .chain(node_ips)
            .map(|cidr| {
                let selector = to_cidr(local.ip, cidr)?;
                let mut p = PolicySpec::new(selector, Direction::Out, template);
                p.priority = PRIORITY_ENCRYPT;
                p.mark = encrypt_mark(peer.node_id, self.slot);
                Ok(p)
            })
            .collect()
    }
}

/// A state from `src` to `dst` carrying inner traffic of either family, with the replay window
/// and `limits`. `key` is `rfc4106(gcm(aes))` key and salt bytes (20 or 36).
fn state(
    src: IpAddr,
    dst: IpAddr,
    (spi, key): (Spi, &[u8]),
    limits: SaLimits,
) -> Result<StateSpec, SpecError> {
    let algorithm = if key.len() == 36 {
        AeadAlgorithm::AesGcm256
    } else {
        AeadAlgorithm::AesGcm128
    };
    let mut state = StateSpec::new(src, dst, spi, reqid(), Aead::new(algorithm, key)?, None)?;
    state.lifetime = limits.lifetime();
    state.replay_window = REPLAY_WINDOW;
    Ok(state)
}

fn to_cidr(local: IpAddr, cidr: IpNet) -> Result<Selector, SpecError> {
    Selector::new(any_of(cidr), cidr).map_err(|_| SpecError::MixedEndpoints {
        src: local,
        dst: cidr.addr(),
    })
}

fn any_of(family: IpNet) -> IpNet {
    match family {
        IpNet::V4(_) => IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(_) => IpNet::V6(ipnet::Ipv6Net::default()),
    }
}

/// What stays in clear between the tunnel's node IPs in direction `dir` (In: from the peer,
/// Out: to it).
fn exemptions(
    local: &LocalEnd,
    peer: &PeerEnd,
    host: &HostEncryption,
    dir: Direction,
) -> Result<Vec<PolicySpec>, SpecError> {
    let template = match dir {
        Direction::Out => Template::new(local.ip, peer.ip, exempt_reqid())?,
        _ => Template::new(peer.ip, local.ip, exempt_reqid())?,
    };
    // Optional transport mode: the kernel refuses optional tunnel templates in OUT policies,
    // and a transport template keeps the selector's family, that of the tunnel's node IPs.
    let template = nodeseal_xfrm::Template {
        level: nodeseal_xfrm::TemplateLevel::Optional,
        mode: nodeseal_xfrm::TemplateMode::Transport,
        ..template
    };
    // The tunnel's node IP only: the handshake runs there, and everything to a dual-stack
    // peer's other node IP crosses the tunnel (which needs no neighbour discovery of that
    // family).
    let node = IpNet::from(peer.ip);
    let mixed = |_| SpecError::MixedEndpoints {
        src: local.ip,
        dst: peer.ip,
    };
    let selector = match dir {
        Direction::Out => Selector::new(any_of(node), node),
        _ => Selector::new(node, any_of(node)),
    }
    .map_err(mixed)?;
    let mut matches: Vec<(u8, Option<u16>, Option<u16>)> = Vec::new();
    for port in host.ports(peer) {
        matches.push((6, Some(port), None));
        matches.push((6, None, Some(port)));
    }
    if peer.ip.is_ipv6() {
        // Neighbour solicitations and advertisements between the node IPs: without them the
        // node IPs could not reach each other, ESP included.
        matches.push((58, Some(135), None));
        matches.push((58, Some(136), None));
    }
    matches
        .into_iter()
        .map(|(proto, sport, dport)| {
            let selector = selector.with_protocol(proto, sport, dport).map_err(mixed)?;
            let mut p = PolicySpec::new(selector, dir, template);
            p.priority = PRIORITY_EXEMPT;
            Ok(p)
        })
        .collect()
}

/// Node encryption's OUT policies for a peer: this node's unmarked traffic to the peer's node
/// IP and pod CIDRs goes through the host SAs, the exemptions aside. Without a host OUT state
/// the kernel drops it.
///
/// # Errors
/// [`SpecError`] if the node IPs differ in family.
pub fn host_out_policies(
    local: &LocalEnd,
    peer: &PeerEnd,
    host: &HostEncryption,
) -> Result<Vec<PolicySpec>, SpecError> {
    let template = Template::new(local.ip, peer.ip, reqid())?;
    let mut policies = exemptions(local, peer, host, Direction::Out)?;
    for cidr in peer
        .node_ips()
        .map(IpNet::from)
        .chain(peer.pod_cidrs.iter().copied())
    {
        let mut p = PolicySpec::new(to_cidr(local.ip, cidr)?, Direction::Out, template);
        p.priority = PRIORITY_HOST;
        p.mark = HOST_MARK;
        policies.push(p);
    }
    Ok(policies)
}

/// The epoch-independent policies of a peer: IN and FWD requiring its tunnel for its pod CIDRs
/// (and, with node encryption, its node IP, the exemptions aside), and (strict mode) the OUT
/// block for unmarked packets to them.
///
/// # Errors
/// [`SpecError`] if the node IPs differ in family.
pub fn peer_policies(
    local: &LocalEnd,
    peer: &PeerEnd,
    strict: bool,
    host: Option<&HostEncryption>,
) -> Result<Vec<PolicySpec>, SpecError> {
    let inbound = Template::new(peer.ip, local.ip, reqid())?;
    let outbound = Template::new(local.ip, peer.ip, reqid())?;
    let mut policies = Vec::new();
    if let Some(host) = host {
        policies.extend(exemptions(local, peer, host, Direction::In)?);
    }
    let node_ips: Vec<IpNet> = match host {
        Some(_) => peer.node_ips().map(IpNet::from).collect(),
        None => Vec::new(),
    };
    for cidr in peer.pod_cidrs.iter().chain(&node_ips) {
        let from_peer =
            Selector::new(*cidr, any_of(*cidr)).map_err(|_| SpecError::MixedEndpoints {
                src: cidr.addr(),
                dst: local.ip,
            })?;
        let is_node_ip = node_ips.contains(cidr);
        let priority = if is_node_ip {
            PRIORITY_HOST
        } else {
            PRIORITY_INBOUND
        };
        for dir in [Direction::In, Direction::Fwd] {
            let mut p = PolicySpec::new(from_peer, dir, inbound);
            p.priority = priority;
            policies.push(p);
        }
        if strict && !is_node_ip {
            // The template is never used (block wins first); it carries our reqid so the policy
            // is recognisably ours.
            let mut p = PolicySpec::new(to_cidr(local.ip, *cidr)?, Direction::Out, outbound);
            p.action = Action::Block;
            p.priority = PRIORITY_STRICT_BLOCK;
            policies.push(p);
        }
    }
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends() -> (LocalEnd, PeerEnd) {
        (
            LocalEnd {
                ip: "10.0.0.1".parse().unwrap(),
                pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()],
                second_ip: None,
            },
            PeerEnd {
                node_id: NodeId(7),
                ip: "10.0.0.2".parse().unwrap(),
                pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
                handshake_port: 4250,
                second_ip: None,
            },
        )
    }

    #[test]
    fn epoch_states_carry_the_slot_mark_on_out_only() {
        let (local, peer) = ends();
        let sas = EpochSas::new(
            &local,
            &peer,
            KeySlot::new(3).unwrap(),
            (Spi::new(0x1001).unwrap(), &[1; 20]),
            (Spi::new(0x2002).unwrap(), &[2; 20]),
            SaLimits {
                bytes: Some(4000),
                packets: None,
            },
        )
        .unwrap();
        assert_eq!(sas.outbound.mark, Mark::new(0x0007_3E00, 0xFFFF_FF00));
        for state in [&sas.outbound, &sas.inbound] {
            assert_eq!(
                (state.lifetime.soft.bytes, state.lifetime.hard.bytes),
                (Some(3000), Some(4000))
            );
            assert_eq!(state.lifetime.soft.packets, None);
            assert_eq!(state.replay_window, REPLAY_WINDOW);
            assert_eq!(state.validate(), Ok(()));
        }
        assert_eq!((sas.outbound.src, sas.outbound.dst), (local.ip, peer.ip));
        assert!(sas.inbound.mark.is_none());
        assert_eq!((sas.inbound.src, sas.inbound.dst), (peer.ip, local.ip));
        let out = sas.out_policies(&local, &peer, None).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].mark, sas.outbound.mark);
        assert_eq!(out[0].selector.dst(), peer.pod_cidrs[0]);
    }

    #[test]
    fn peer_policies_require_the_peer_tunnel_and_strict_blocks() {
        let (local, peer) = ends();
        let relaxed = peer_policies(&local, &peer, false, None).unwrap();
        assert_eq!(relaxed.len(), 2);
        for p in &relaxed {
            assert_eq!(p.selector.src(), peer.pod_cidrs[0]);
            assert_eq!(p.templates[0].src, peer.ip);
            assert_eq!(p.templates[0].level, nodeseal_xfrm::TemplateLevel::Required);
        }
        let strict = peer_policies(&local, &peer, true, None).unwrap();
        let block = strict.iter().find(|p| p.action == Action::Block).unwrap();
        assert_eq!(block.dir, Direction::Out);
        assert!(block.priority > PRIORITY_ENCRYPT);
        assert!(block.mark.is_none());
    }

    #[test]
    fn every_policy_is_hashed_under_the_thresholds_the_agent_sets() {
        let v6 = (
            LocalEnd {
                ip: "fd00::1".parse().unwrap(),
                pod_cidrs: vec!["fd00:10:244::/64".parse().unwrap()],
                second_ip: None,
            },
            PeerEnd {
                node_id: NodeId(9),
                ip: "fd00::2".parse().unwrap(),
                pod_cidrs: vec!["fd00:10:244:1::/64".parse().unwrap()],
                handshake_port: 4250,
                second_ip: None,
            },
        );
        for (local, peer) in [ends(), v6] {
            let key = [7; 20];
            let sas = EpochSas::new(
                &local,
                &peer,
                KeySlot::FIRST,
                (Spi::new(0x1001).unwrap(), &key),
                (Spi::new(0x2002).unwrap(), &key),
                SaLimits::default(),
            )
            .unwrap();
            let mut policies = sas.out_policies(&local, &peer, None).unwrap();
            policies.extend(peer_policies(&local, &peer, true, None).unwrap());
            assert_eq!(policies.len(), 4);
            for p in &policies {
                assert!(POLICY_HASH_THRESHOLDS.hashes(p), "{:?}", p.id());
                // What the thresholds change: by default every one of them is inexact.
                assert!(!PolicyHashThresholds::KERNEL_DEFAULT.hashes(p));
            }
        }
        // A peer with a shorter pod CIDR than the remote threshold is still served, inexactly.
        let (local, mut peer) = ends();
        peer.pod_cidrs = vec!["10.96.0.0/16".parse().unwrap()];
        let wide = peer_policies(&local, &peer, false, None).unwrap();
        assert!(wide.iter().all(|p| !POLICY_HASH_THRESHOLDS.hashes(p)));
    }

    #[test]
    fn a_dual_stack_peer_gets_policies_of_both_families_over_one_tunnel() {
        let (local, mut peer) = ends();
        peer.pod_cidrs.push("fd00:10:244:1::/64".parse().unwrap());
        let key = [7; 20];
        let sas = EpochSas::new(
            &local,
            &peer,
            KeySlot::FIRST,
            (Spi::new(0x1001).unwrap(), &key),
            (Spi::new(0x2002).unwrap(), &key),
            SaLimits::default(),
        )
        .unwrap();
        // One pair of states, open to either inner family.
        assert_eq!((sas.outbound.selector, sas.inbound.selector), (None, None));
        let mut policies = sas.out_policies(&local, &peer, None).unwrap();
        policies.extend(peer_policies(&local, &peer, true, None).unwrap());
        assert_eq!(policies.len(), 8);
        for cidr in &peer.pod_cidrs {
            let of_cidr: Vec<_> = policies
                .iter()
                .filter(|p| p.selector.src() == *cidr || p.selector.dst() == *cidr)
                .collect();
            assert_eq!(of_cidr.len(), 4, "{cidr}");
            for p in of_cidr {
                assert!(POLICY_HASH_THRESHOLDS.hashes(p), "{:?}", p.id());
                let t = &p.templates[0];
                assert!([t.src, t.dst].contains(&peer.ip), "{:?}", p.id());
                assert!([t.src, t.dst].contains(&local.ip), "{:?}", p.id());
            }
        }
    }

    #[test]
    fn node_encryption_encrypts_host_traffic_below_the_pods_and_above_it_lets_the_exemptions_pass()
    {
        let host = HostEncryption {
            handshake_port: 4250,
            exempt_tcp_ports: vec![6443, 4250],
        };
        let (local, peer) = ends();
        let out = host_out_policies(&local, &peer, &host).unwrap();
        let inbound = peer_policies(&local, &peer, true, Some(&host)).unwrap();
        let node_ip = IpNet::from(peer.ip);
        for p in &out {
            assert_eq!(p.dir, Direction::Out);
            assert_eq!(p.templates[0].dst, peer.ip);
        }
        let (exempt, encrypt): (Vec<_>, Vec<_>) = out
            .iter()
            .partition(|p| p.templates[0].reqid.get() == EXEMPT_REQID);
        // 4250 and 6443, each as source and destination port.
        assert_eq!(exempt.len(), 4);
        for p in &exempt {
            assert_eq!(p.selector.dst(), node_ip);
            assert_eq!(p.selector.proto(), Some(6));
            assert_eq!(p.templates[0].level, nodeseal_xfrm::TemplateLevel::Optional);
            assert!(PRIORITY_ENCRYPT < p.priority && p.priority < PRIORITY_HOST);
        }
        assert_eq!(encrypt.len(), 2, "node IP and pod CIDR");
        for p in &encrypt {
            assert_eq!((p.mark, p.priority), (HOST_MARK, PRIORITY_HOST));
            assert_eq!(p.templates[0].level, nodeseal_xfrm::TemplateLevel::Required);
            assert!(POLICY_HASH_THRESHOLDS.hashes(p), "{:?}", p.id());
        }
        let from_node_ip: Vec<_> = inbound
            .iter()
            .filter(|p| p.selector.src() == node_ip && p.templates[0].reqid.get() == REQID)
            .collect();
        assert_eq!(from_node_ip.len(), 2, "IN and FWD");
        assert!(from_node_ip.iter().all(|p| p.priority == PRIORITY_HOST));
        let exempt_in = inbound
            .iter()
            .filter(|p| p.templates[0].reqid.get() == EXEMPT_REQID)
            .count();
        assert_eq!(exempt_in, 4);
        assert_eq!(
            inbound.iter().filter(|p| p.action == Action::Block).count(),
            1,
            "strict mode blocks unmarked traffic to the pod CIDR only: host traffic has its SAs"
        );
        let sas = EpochSas::new(
            &local,
            &peer,
            KeySlot::FIRST,
            (Spi::new(0x1001).unwrap(), &[1; 20]),
            (Spi::new(0x2002).unwrap(), &[2; 20]),
            SaLimits::default(),
        )
        .unwrap()
        .with_host(
            &local,
            &peer,
            (Spi::new(0x3003).unwrap(), &[3; 20]),
            (Spi::new(0x4004).unwrap(), &[4; 20]),
            SaLimits::default(),
        )
        .unwrap();
        let host_sas = sas.host.as_ref().unwrap();
        assert_eq!(host_sas.outbound.mark, HOST_MARK);
        assert!(host_sas.inbound.mark.is_none());
        assert_eq!(host_sas.outbound.validate(), Ok(()));
        let slot_policies = sas.out_policies(&local, &peer, Some(&host)).unwrap();
        assert!(slot_policies.iter().any(|p| p.selector.dst() == node_ip));

        // IPv6 node IPs: neighbour discovery between them stays in clear both ways.
        let peer6 = PeerEnd {
            ip: "fd00::2".parse().unwrap(),
            ..peer.clone()
        };
        let local6 = LocalEnd {
            ip: "fd00::1".parse().unwrap(),
            ..local.clone()
        };
        let nd = |policies: &[PolicySpec]| {
            policies
                .iter()
                .filter(|p| p.selector.proto() == Some(58))
                .filter_map(|p| p.selector.sport())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            nd(&host_out_policies(&local6, &peer6, &host).unwrap()),
            [135, 136]
        );
        assert_eq!(
            nd(&peer_policies(&local6, &peer6, false, Some(&host)).unwrap()),
            [135, 136]
        );

        // A dual-stack peer's second node IP is covered like the first, through the tunnel
        // between the first ones.
        let second: IpAddr = "fd00::2".parse().unwrap();
        let dual = PeerEnd {
            second_ip: Some(second),
            ..peer.clone()
        };
        let out = host_out_policies(&local, &dual, &host).unwrap();
        let inbound = peer_policies(&local, &dual, true, Some(&host)).unwrap();
        let of_second = |policies: &[PolicySpec]| -> Vec<PolicySpec> {
            policies
                .iter()
                .filter(|p| [p.selector.src(), p.selector.dst()].contains(&IpNet::from(second)))
                .cloned()
                .collect()
        };
        // No exemptions there: everything to it crosses the tunnel.
        assert_eq!(of_second(&out).len(), 1);
        // IN and FWD.
        assert_eq!(of_second(&inbound).len(), 2);
        for p in of_second(&out).iter().chain(&of_second(&inbound)) {
            let t = p.templates[0];
            assert!([t.src, t.dst].contains(&peer.ip) && [t.src, t.dst].contains(&local.ip));
        }
        let slot_policies = sas.out_policies(&local, &dual, Some(&host)).unwrap();
        assert!(
            slot_policies
                .iter()
                .any(|p| p.selector.dst() == IpNet::from(second))
        );
    }

    #[test]
    fn default_limits_rekey_at_three_quarters() {
        let l = SaLimits::default().lifetime();
        assert_eq!(l.soft.bytes, Some(3 << 36));
        assert_eq!(l.soft.packets, Some(3 << 30));
        assert_eq!(l.hard.packets, Some(1 << 32));
        let none = SaLimits {
            bytes: None,
            packets: None,
        };
        assert_eq!(none.lifetime(), Lifetime::default());
    }

    #[test]
    fn slots_wrap_within_one_to_fifteen() {
        assert_eq!(KeySlot::new(15).unwrap().next(), KeySlot::FIRST);
        assert_eq!(KeySlot::FIRST.next().get(), 2);
        assert!(KeySlot::new(0).is_none() && KeySlot::new(16).is_none());
    }
}
