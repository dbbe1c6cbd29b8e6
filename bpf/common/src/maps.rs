//! Map keys and values. All `#[repr(C)]` without implicit padding (see the `const` checks).

/// Value of `ENDPOINTS` (key: the ifindex of the host side of the pod's veth, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    /// Security identity of the pod.
    pub identity: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}

impl EndpointInfo {
    /// A policy selects this endpoint for ingress: default deny for traffic toward it.
    pub const FLAG_ENFORCE_INGRESS: u32 = 1;
    /// A policy selects this endpoint for egress: default deny for traffic from it.
    pub const FLAG_ENFORCE_EGRESS: u32 = 2;
}

/// Value of `IPCACHE_V4` / `IPCACHE_V6` (key: an LPM key of prefix length and address bytes in
/// network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpCacheEntry {
    /// Security identity of addresses in the prefix.
    pub identity: u32,
    /// For [`Self::FLAG_REMOTE`]: the node that hosts the prefix.
    pub node_id: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
}

impl IpCacheEntry {
    /// The prefix lives on another node (`node_id`): traffic to it is encrypted.
    pub const FLAG_REMOTE: u16 = 1;
    /// The prefix is (part of) a pod CIDR.
    pub const FLAG_POD: u16 = 2;
    /// The prefix is a node IP.
    pub const FLAG_NODE: u16 = 4;
}

/// Key of `IPCACHE_EXACT_V4`: one ipcache prefix, host bits cleared (the same prefix as in the
/// trie, so the same layout as its LPM key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpCacheKeyV4 {
    /// Prefix length, 0..=32.
    pub prefix_len: u32,
    /// Network address, network order.
    pub addr: [u8; 4],
}

/// Key of `IPCACHE_EXACT_V6`: as [`IpCacheKeyV4`] for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpCacheKeyV6 {
    /// Prefix length, 0..=128.
    pub prefix_len: u32,
    /// Network address, network order.
    pub addr: [u8; 16],
}

/// Value of `IPCACHE_LENS` (index [`Self::INDEX_V4`] / [`Self::INDEX_V6`]): how the datapath
/// finds the longest matching prefix.
///
/// The `IPCACHE_EXACT_*` hash maps hold the same prefixes as the tries. With
/// [`Self::STATE_EXACT`], the datapath looks the address up in them once per distinct prefix
/// length present, longest first (`lens[..count]`, descending); the first hit is the longest
/// match. That is a few hash lookups instead of a trie walk. Any other state (a fresh map is
/// all zero) means the datapath walks the trie, which is always authoritative.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PrefixLengths {
    /// `STATE_*`.
    pub state: u8,
    /// Number of valid entries of `lens` (with [`Self::STATE_EXACT`]).
    pub count: u8,
    /// Prefix lengths present, longest first.
    pub lens: [u8; Self::MAX_LENS],
}

impl PrefixLengths {
    /// Most distinct prefix lengths the datapath probes in the hash maps; with more, it walks
    /// the trie.
    pub const MAX_LENS: usize = 6;
    /// The exact maps are not (known to be) in sync with the trie: walk the trie.
    pub const STATE_TRIE: u8 = 0;
    /// Probe the exact maps for `lens[..count]`.
    pub const STATE_EXACT: u8 = 1;
    /// The exact maps are in sync but more than [`Self::MAX_LENS`] lengths are present: walk
    /// the trie.
    pub const STATE_TOO_MANY: u8 = 2;
    /// Index of the IPv4 entry.
    pub const INDEX_V4: u32 = 0;
    /// Index of the IPv6 entry.
    pub const INDEX_V6: u32 = 1;
}

/// Key of `NODES`: a node IP, IPv6 or IPv4-mapped IPv6 (`::ffff:a.b.c.d`), network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeKey {
    /// The address.
    pub addr: [u8; 16],
}

/// Value of `NODES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeEntry {
    /// The node's id (also its index in `PEER_SLOTS`).
    pub node_id: u16,
    /// Reserved, zero.
    pub reserved: u16,
}

/// Value of `PEER_SLOTS` (index: node id). One 4-byte value, so switching a peer to a new key
/// is a single map write.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerSlot {
    /// Key slot (1..=15) the OUT policy for this peer matches.
    pub key_slot: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Reserved, zero.
    pub reserved: u16,
}

impl PeerSlot {
    /// An SA is installed for this peer in `key_slot`.
    pub const FLAG_READY: u8 = 1;
}

/// Key of `POLICY`.
///
/// Lookup goes from most to least specific, first hit wins:
/// `(peer, proto, port)`, `(peer, proto, 0)`, `(peer, 0, 0)`, then the same three with
/// `peer = identity::ANY`. Port 0 and protocol 0 are wildcards. For ICMP/ICMPv6 the "port" is
/// the message type. Deny-over-allow precedence across specificities is resolved by the agent
/// writing explicit deny entries (Cilium does the same in its userspace map state).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyKey {
    /// Identity the policy applies to (the local endpoint).
    pub subject: u32,
    /// The other side's identity, or `identity::ANY`.
    pub peer: u32,
    /// Destination port in host order (ICMP: type), or 0 for any.
    pub port: u16,
    /// IP protocol number, or 0 for any.
    pub protocol: u8,
    /// [`Self::INGRESS`] or [`Self::EGRESS`].
    pub direction: u8,
}

impl PolicyKey {
    /// Traffic toward the subject.
    pub const INGRESS: u8 = 1;
    /// Traffic from the subject.
    pub const EGRESS: u8 = 2;
}

/// Value of `POLICY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyEntry {
    /// [`Self::ALLOW`] or [`Self::DENY`].
    pub verdict: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
}

impl PolicyEntry {
    /// Let the packet through.
    pub const ALLOW: u8 = 1;
    /// Drop it with `PolicyDenied`.
    pub const DENY: u8 = 2;
}

/// Value of `CONFIG` at index 0. All-zero (the state of a fresh map) means: no encryption,
/// nothing strict, no tracing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// `FLAG_*` bits.
    pub flags: u32,
    /// This node's id.
    pub local_node_id: u16,
    /// `MODE_*`.
    pub mode: u8,
    /// Reserved, zero.
    pub reserved: u8,
}

impl Config {
    /// Never send to a remote pod in clear: drop with `NoSa` when the peer has no ready SA.
    pub const FLAG_STRICT_EGRESS: u32 = 1;
    /// Drop plaintext from remote pod CIDRs arriving on the uplink (`Unencrypted`).
    pub const FLAG_STRICT_INGRESS: u32 = 2;
    /// Also encrypt pod traffic to remote node IPs.
    pub const FLAG_NODE_ENCRYPTION: u32 = 4;
    /// Emit trace events for passed packets too (costly; debugging only).
    pub const FLAG_TRACE: u32 = 8;
    /// No encryption datapath.
    pub const MODE_NONE: u8 = 0;
    /// IPsec: from-pod sets encrypt marks, from-network sets decrypt marks on ESP.
    pub const MODE_IPSEC: u8 = 1;
    /// WireGuard: routing sends remote traffic to the WireGuard device; no marks.
    pub const MODE_WIREGUARD: u8 = 2;
}

const _: () = {
    assert!(size_of::<EndpointInfo>() == 8);
    assert!(size_of::<IpCacheEntry>() == 8);
    assert!(size_of::<IpCacheKeyV4>() == 8);
    assert!(size_of::<IpCacheKeyV6>() == 20);
    assert!(size_of::<PrefixLengths>() == 8);
    assert!(size_of::<NodeKey>() == 16);
    assert!(size_of::<NodeEntry>() == 4);
    assert!(size_of::<PeerSlot>() == 4);
    assert!(size_of::<PolicyKey>() == 12);
    assert!(size_of::<PolicyEntry>() == 4);
    assert!(size_of::<Config>() == 8);
};

/// Maximum number of entries of each map (the loader can't resize pinned maps).
pub mod capacity {
    /// `ENDPOINTS`.
    pub const ENDPOINTS: u32 = 4096;
    /// `ENDPOINTS_BY_IFINDEX`: endpoints whose ifindex is below this are also in the array.
    pub const ENDPOINTS_BY_IFINDEX: u32 = 16_384;
    /// `IPCACHE_V4`, `IPCACHE_V6`, `IPCACHE_EXACT_V4` and `IPCACHE_EXACT_V6` each.
    pub const IPCACHE: u32 = 65_536;
    /// `NODES`.
    pub const NODES: u32 = 16_384;
    /// `PEER_SLOTS` (one per possible node id).
    pub const PEER_SLOTS: u32 = 65_536;
    /// `POLICY`.
    pub const POLICY: u32 = 65_536;
    /// `EVENTS` ring buffer size in bytes (a power of two, multiple of the page size).
    pub const EVENTS_BYTES: u32 = 256 * 1024;
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        Config, EndpointInfo, IpCacheEntry, IpCacheKeyV4, IpCacheKeyV6, NodeEntry, NodeKey,
        PeerSlot, PolicyEntry, PolicyKey, PrefixLengths,
    };

    // SAFETY: each type is #[repr(C)], Copy, made only of integers and has no padding (checked
    // by the size assertions above), so every byte pattern is a valid value.
    unsafe impl aya::Pod for EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IpCacheEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IpCacheKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IpCacheKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PrefixLengths {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
}
