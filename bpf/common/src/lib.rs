//! Types shared by nodeseal's eBPF programs (`nodeseal-bpf-programs`) and their userspace loader
//! (`nodeseal-bpf`).
//!
//! This crate owns the binary contract between the two sides: the `skb->mark` layout the XFRM
//! policies match ([`mark`]), the drop and trace reason codes ([`reason`]), the `#[repr(C)]` map
//! keys and values ([`maps`]) and the event record written to the ring buffer ([`event`]).
//!
//! Invariants: every type here is `#[repr(C)]`, `Copy`, and has no implicit padding (each layout
//! is checked by a `const` assertion), so the kernel, the eBPF side and userspace agree on every
//! byte and uninitialised padding never reaches a map key. It is `#![no_std]` and has no
//! dependencies unless the `user` feature adds `aya` for its `Pod` impls.
//!
//! It deliberately holds no logic beyond pure encode/decode helpers.
#![no_std]
#![warn(missing_docs)]

pub mod event;
pub mod maps;
pub mod mark;
pub mod reason;

/// Reserved numeric security identities (Cilium's numbering).
pub mod identity {
    /// Wildcard in policy keys ("any peer"). Never assigned to an endpoint or prefix.
    pub const ANY: u32 = 0;
    /// The local host.
    pub const HOST: u32 = 1;
    /// Anything outside the cluster; also the identity of an address missing from the ipcache.
    pub const WORLD: u32 = 2;
    /// A pod the agent manages no endpoint for.
    pub const UNMANAGED: u32 = 3;
    /// A remote cluster node.
    pub const REMOTE_NODE: u32 = 6;
    /// First identity available for label-derived (workload) identities.
    pub const FIRST_WORKLOAD: u32 = 256;
}

/// Names of the maps as defined by the eBPF object; also the file names under the pin directory.
pub mod map_names {
    /// `ENDPOINTS`: ifindex → [`crate::maps::EndpointInfo`].
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// `ENDPOINTS_BY_IFINDEX`: array copy of the `ENDPOINTS` entries with an ifindex below
    /// [`crate::maps::capacity::ENDPOINTS_BY_IFINDEX`], indexed by ifindex, each slot one
    /// [`crate::maps::EndpointInfo::to_word`] (identity 0: not there, look in `ENDPOINTS`;
    /// mmapable). An array lookup is far cheaper than a hash lookup.
    pub const ENDPOINTS_BY_IFINDEX: &str = "ENDPOINTS_BY_IFINDEX";
    /// `IPCACHE_V4`: LPM trie of IPv4 prefixes → [`crate::maps::IpCacheEntry`].
    pub const IPCACHE_V4: &str = "IPCACHE_V4";
    /// `IPCACHE_V6`: LPM trie of IPv6 prefixes → [`crate::maps::IpCacheEntry`].
    pub const IPCACHE_V6: &str = "IPCACHE_V6";
    /// `IPCACHE4_L1`: first level of the IPv4 ipcache arrays, one
    /// [`crate::maps::IpCacheSlot`] per /16 (mmapable).
    pub const IPCACHE4_L1: &str = "IPCACHE4_L1";
    /// `IPCACHE4_CHUNKS`: 256-slot chunks of the IPv4 ipcache arrays (mmapable).
    pub const IPCACHE4_CHUNKS: &str = "IPCACHE4_CHUNKS";
    /// `IPCACHE6_CHUNKS`: the IPv6 ipcache arrays, chunks of [`crate::maps::Ipv6Chunk`]
    /// (mmapable).
    pub const IPCACHE6_CHUNKS: &str = "IPCACHE6_CHUNKS";
    /// `IPCACHE_EXACT_V6`: the IPv6 exact-match hash older loaders pinned; this version removes
    /// its pin at load (replaced by `IPCACHE6_CHUNKS`).
    pub const IPCACHE_EXACT_V6: &str = "IPCACHE_EXACT_V6";
    /// `IPCACHE_LENS`: [`crate::maps::PrefixLengths`] per address family.
    pub const IPCACHE_LENS: &str = "IPCACHE_LENS";
    /// `NODES`: node IP → [`crate::maps::NodeEntry`].
    pub const NODES: &str = "NODES";
    /// `CLEAR_PORTS`: the [`crate::maps::ClearPort`]s on which a remote node IP may send in
    /// clear with node encryption.
    pub const CLEAR_PORTS: &str = "CLEAR_PORTS";
    /// `PEER_SLOTS`: node id → [`crate::maps::PeerSlot`].
    pub const PEER_SLOTS: &str = "PEER_SLOTS";
    /// `POLICY_TABLE`: the policy rules, two copies of a cuckoo hash table of
    /// [`crate::maps::PolicySlot`] (mmapable).
    pub const POLICY_TABLE: &str = "POLICY_TABLE";
    /// `POLICY_HEADER`: one [`crate::maps::PolicyTableHeader`] naming the live copy (mmapable).
    pub const POLICY_HEADER: &str = "POLICY_HEADER";
    /// `CONFIG`: one [`crate::maps::Config`] at index 0.
    pub const CONFIG: &str = "CONFIG";
    /// `DROP_COUNTERS`: per-CPU `u64` packet counts indexed by [`crate::reason::DropReason`].
    pub const DROP_COUNTERS: &str = "DROP_COUNTERS";
    /// `CONNTRACK`: LRU hash of [`crate::maps::CtKey`] → [`crate::maps::CtEntry`], the flows
    /// whose replies pass policy.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// `POLICY_VERDICTS`: per-CPU `u64` counts of policy decisions, indexed by
    /// [`crate::maps::policy_verdict_slot`] (direction × allowed/denied).
    pub const POLICY_VERDICTS: &str = "POLICY_VERDICTS";
    /// `EVENTS`: ring buffer of [`crate::event::Event`].
    pub const EVENTS: &str = "EVENTS";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// tc ingress on the host side of a pod's veth (traffic leaving the pod).
    pub const FROM_POD: &str = "from_pod";
    /// tc ingress on the node's uplink.
    pub const FROM_NETWORK: &str = "from_network";
    /// tc egress on the host side of a pod's veth (traffic toward the pod).
    pub const TO_POD: &str = "to_pod";
    /// Returns "pass" without looking at the packet; the benchmark's baseline.
    pub const PASS: &str = "pass";
}
