//! Typed handles over the datapath's maps. Callers never build raw keys.

use std::net::IpAddr;

use aya::maps::{
    Array, HashMap, Map, MapData, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use nodeseal_bpf_common::{
    maps::{
        ClearPort, Config, EndpointInfo, IpCacheEntry, Ipv6Chunk, NodeEntry, NodeKey, PeerSlot,
        PolicyKey, PrefixLengths, capacity, policy_verdict_slot,
    },
    mark,
    reason::DropReason,
};

use crate::{
    ipcache4::Ipv4Arrays,
    ipcache6::{Ipv6Arrays, SetOutcome},
    policy::{PolicyDirection, PolicyRule},
    shared::Mapping,
};

/// Errors of the map handles.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// The object has no map of this name (a build mismatch: our bug).
    #[error("BUG: map {name} is not in the eBPF object")]
    Missing {
        /// Map name.
        name: &'static str,
    },
    /// The map's type or key/value size does not match the wrapper.
    #[error("map {name} does not match its typed wrapper")]
    Shape {
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// A map operation failed in the kernel (full map, missing key on removal, ...).
    #[error("{op} on map {name}")]
    Kernel {
        /// What was attempted.
        op: &'static str,
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// A prefix length larger than the address.
    #[error("prefix length {len} is too long for {addr}")]
    PrefixLength {
        /// The address.
        addr: IpAddr,
        /// The length given.
        len: u8,
    },
    /// A key slot outside 1..=15.
    #[error("key slot {0} is outside 1..=15")]
    KeySlot(u8),
    /// A policy rule with a port but no protocol.
    #[error("policy rule has port {port} but no protocol")]
    PortWithoutProtocol {
        /// The port.
        port: u16,
    },
    /// Removal of a policy rule that is not there.
    #[error("no such policy rule: {0:?}")]
    NoSuchRule(PolicyRule),
    /// More policy rules than the table holds.
    #[error("{rules} policy rules do not fit in the policy table (capacity {capacity})")]
    PolicyFull {
        /// Rules asked for.
        rules: usize,
        /// Most rules the table takes.
        capacity: usize,
    },
    /// A map does not have the layout this loader needs.
    #[error("map {name}: {why}")]
    Layout {
        /// Map name.
        name: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A shared array map could not be mapped into memory.
    #[error("mapping map {name} into memory")]
    Mmap {
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Dense numeric id of a node (16 bits: it goes into `skb->mark`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u16);

/// An IP prefix, with the host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// A prefix of `len` bits of `addr`; host bits are cleared.
    ///
    /// # Errors
    ///
    /// [`MapError::PrefixLength`] if `len` exceeds 32 (IPv4) or 128 (IPv6).
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, MapError> {
        let addr = match addr {
            IpAddr::V4(a) if len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) if len <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
            _ => return Err(MapError::PrefixLength { addr, len }),
        };
        Ok(Self { addr, len })
    }

    /// A host prefix (/32 or /128).
    #[must_use]
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }

    /// The network address.
    #[must_use]
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    #[must_use]
    pub const fn prefix_len(&self) -> u8 {
        self.len
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Where addresses of an ipcache prefix live, which decides encryption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// A pod on this node: no encryption.
    LocalPod,
    /// A pod on another node: encrypted for that node; plaintext from it is refused in strict
    /// ingress mode.
    RemotePod(NodeId),
    /// Another node's IP: encrypted only with node encryption.
    RemoteNode(NodeId),
    /// Anything else (world CIDRs, this host): never encrypted.
    External,
    /// A pod CIDR of a revoked node: never encrypted (strict egress drops traffic to it),
    /// plaintext from it is refused whenever encryption is on. Kept in the ipcache so that the
    /// node is more restricted than a member, not unknown.
    RevokedPod,
}

/// The ipcache: prefix → identity and location.
///
/// Each prefix is written to the `IPCACHE_V4` / `IPCACHE_V6` LPM trie (authoritative; what
/// [`IpCache::lookup`] reads) and to the family's ipcache arrays, which the datapath reads
/// first: for IPv4 at most three array reads per lookup (see
/// [`nodeseal_bpf_common::maps::IpCacheSlot`]), for IPv6 at most 16 and typically 3 or 4 (see
/// [`nodeseal_bpf_common::maps::Ipv6Chunk`]), whatever the number of prefixes. `IPCACHE_LENS`
/// says per family whether the arrays are in sync; when they are not (more chunks needed than
/// the arrays hold) the datapath walks the trie, always right, only slower.
pub struct IpCache {
    v4: LpmTrie<MapData, [u8; 4], IpCacheEntry>,
    v6: LpmTrie<MapData, [u8; 16], IpCacheEntry>,
    arrays_v4: Ipv4Arrays,
    arrays_v6: Ipv6Arrays,
    lens: Array<MapData, PrefixLengths>,
}

impl std::fmt::Debug for IpCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpCache").finish_non_exhaustive()
    }
}

impl IpCache {
    /// Opens the maps and rebuilds the IPv4 and IPv6 arrays from the tries (pinned maps may come
    /// from an earlier loader, or an older one: its `IPCACHE_LENS` states are replaced, never
    /// read).
    pub(crate) fn new(maps: IpCacheMaps) -> Result<Self, MapError> {
        let mut cache = Self {
            v4: shape(maps.v4, "IPCACHE_V4")?,
            v6: shape(maps.v6, "IPCACHE_V6")?,
            arrays_v4: Ipv4Arrays::new(
                Mapping::open(maps.l1_v4, "IPCACHE4_L1", 8)?,
                Mapping::open(maps.chunks_v4, "IPCACHE4_CHUNKS", 8)?,
            )?,
            arrays_v6: Ipv6Arrays::new(Mapping::open(
                maps.chunks_v6,
                "IPCACHE6_CHUNKS",
                u32::try_from(Ipv6Chunk::WORDS * 8).unwrap_or(u32::MAX),
            )?)?,
            lens: shape(maps.lens, "IPCACHE_LENS")?,
        };
        cache.resync_v4()?;
        cache.resync_v6()?;
        Ok(cache)
    }

    fn resync_v4(&mut self) -> Result<(), MapError> {
        // The datapath walks the trie while the arrays are rebuilt.
        self.set_lens(PrefixLengths::INDEX_V4, PrefixLengths::default())?;
        let mut prefixes = Vec::new();
        for item in self.v4.iter() {
            let (key, entry) = item.map_err(|source| kernel("iterate", "IPCACHE_V4", source))?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(32).min(32);
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            prefixes.push((u32::from_be_bytes(key.data()) & mask, len, entry));
        }
        for (addr, len, entry) in prefixes {
            // Out of sync while the datapath walks the trie: only the model is updated here.
            self.arrays_v4.set_model(addr, len, Some(entry));
        }
        match self.arrays_v4.resync() {
            Ok(()) => self.publish_arrays(PrefixLengths::INDEX_V4),
            Err(_) => {
                Self::warn_out_of_chunks("IPv4", capacity::IPCACHE4_CHUNKS);
                Ok(())
            }
        }
    }

    fn warn_out_of_chunks(family: &'static str, chunks: u32) {
        tracing::warn!(
            family,
            chunks,
            "ipcache prefixes need more array chunks than there are; the datapath walks the \
             trie instead (slower) until they fit again"
        );
    }

    /// Applies a v4 change to the arrays, switching the datapath between them and the trie as
    /// their state requires.
    fn update_v4(
        &mut self,
        addr: u32,
        len: u8,
        entry: Option<IpCacheEntry>,
    ) -> Result<(), MapError> {
        let was_in_sync = self.arrays_v4.in_sync();
        match self.arrays_v4.set(addr, len, entry) {
            Ok(()) if was_in_sync => Ok(()),
            Ok(()) => self.publish_arrays(PrefixLengths::INDEX_V4),
            Err(_) => {
                if was_in_sync {
                    self.set_lens(PrefixLengths::INDEX_V4, PrefixLengths::default())?;
                }
                Self::warn_out_of_chunks("IPv4", capacity::IPCACHE4_CHUNKS);
                Ok(())
            }
        }
    }

    /// Rebuilds the IPv6 arrays from the trie. Whatever state an older loader left in
    /// `IPCACHE_LENS` (its exact-hash probe list) is overwritten first, so the datapath walks
    /// the trie until the arrays are complete.
    fn resync_v6(&mut self) -> Result<(), MapError> {
        self.set_lens(PrefixLengths::INDEX_V6, PrefixLengths::default())?;
        let mut prefixes = Vec::new();
        for item in self.v6.iter() {
            let (key, entry) = item.map_err(|source| kernel("iterate", "IPCACHE_V6", source))?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(128).min(128);
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            prefixes.push((u128::from_be_bytes(key.data()) & mask, len, entry));
        }
        for (addr, len, entry) in prefixes {
            self.arrays_v6.set_model(addr, len, Some(entry));
        }
        self.rebuild_v6()
    }

    /// Rebuilds the IPv6 arrays from their model; the datapath must be walking the trie.
    fn rebuild_v6(&mut self) -> Result<(), MapError> {
        match self.arrays_v6.resync() {
            Ok(()) => self.publish_arrays(PrefixLengths::INDEX_V6),
            Err(_) => {
                Self::warn_out_of_chunks("IPv6", capacity::IPCACHE6_CHUNKS);
                Ok(())
            }
        }
    }

    /// Applies a v6 change to the arrays, switching the datapath between them and the trie as
    /// their state requires.
    fn update_v6(
        &mut self,
        addr: u128,
        len: u8,
        entry: Option<IpCacheEntry>,
    ) -> Result<(), MapError> {
        match self.arrays_v6.set(addr, len, entry) {
            Ok(SetOutcome::Applied | SetOutcome::OutOfSync) => Ok(()),
            Ok(SetOutcome::MayFitAgain) => self.rebuild_v6(),
            Err(_) => {
                self.set_lens(PrefixLengths::INDEX_V6, PrefixLengths::default())?;
                // An update in place needs the replaced subtree and its replacement at once; a
                // rebuild from scratch needs only the latter, and may still fit.
                self.rebuild_v6()
            }
        }
    }

    fn set_lens(&mut self, index: u32, value: PrefixLengths) -> Result<(), MapError> {
        self.lens
            .set(index, value, 0)
            .map_err(|source| kernel("set", "IPCACHE_LENS", source))
    }

    fn publish_arrays(&mut self, index: u32) -> Result<(), MapError> {
        let value = PrefixLengths {
            state: PrefixLengths::STATE_ARRAYS,
            ..PrefixLengths::default()
        };
        self.set_lens(index, value)
    }

    /// Maps `prefix` to `identity` at `location` (insert or replace).
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] if the trie is full.
    pub fn insert(
        &mut self,
        prefix: Prefix,
        identity: u32,
        location: Location,
    ) -> Result<(), MapError> {
        let (node_id, flags) = match location {
            Location::LocalPod => (0, IpCacheEntry::FLAG_POD),
            Location::RemotePod(NodeId(n)) => {
                (n, IpCacheEntry::FLAG_REMOTE | IpCacheEntry::FLAG_POD)
            }
            Location::RemoteNode(NodeId(n)) => {
                (n, IpCacheEntry::FLAG_REMOTE | IpCacheEntry::FLAG_NODE)
            }
            Location::External => (0, 0),
            Location::RevokedPod => (
                0,
                IpCacheEntry::FLAG_REMOTE | IpCacheEntry::FLAG_POD | IpCacheEntry::FLAG_REVOKED,
            ),
        };
        let entry = IpCacheEntry {
            identity,
            node_id,
            flags,
        };
        let len = u32::from(prefix.len);
        match prefix.addr {
            IpAddr::V4(a) => {
                self.v4
                    .insert(&Key::new(len, a.octets()), entry, 0)
                    .map_err(|source| kernel("insert", "IPCACHE_V4", source))?;
                self.update_v4(u32::from(a), prefix.len, Some(entry))?;
            }
            IpAddr::V6(a) => {
                self.v6
                    .insert(&Key::new(len, a.octets()), entry, 0)
                    .map_err(|source| kernel("insert", "IPCACHE_V6", source))?;
                self.update_v6(u128::from(a), prefix.len, Some(entry))?;
            }
        }
        Ok(())
    }

    /// Removes `prefix`.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] if it is not there.
    pub fn remove(&mut self, prefix: Prefix) -> Result<(), MapError> {
        let len = u32::from(prefix.len);
        match prefix.addr {
            IpAddr::V4(a) => {
                self.v4
                    .remove(&Key::new(len, a.octets()))
                    .map_err(|source| kernel("remove", "IPCACHE_V4", source))?;
                self.update_v4(u32::from(a), prefix.len, None)?;
            }
            IpAddr::V6(a) => {
                self.v6
                    .remove(&Key::new(len, a.octets()))
                    .map_err(|source| kernel("remove", "IPCACHE_V6", source))?;
                self.update_v6(u128::from(a), prefix.len, None)?;
            }
        }
        Ok(())
    }

    /// Whether the datapath finds IPv4 prefixes through the ipcache arrays (else it walks the
    /// trie: the prefixes need more chunks than the arrays hold).
    #[must_use]
    pub fn ipv4_arrays_in_use(&self) -> bool {
        self.arrays_v4.in_sync()
    }

    /// Whether the datapath finds IPv6 prefixes through the ipcache arrays (else it walks the
    /// trie: the prefixes need more chunks than the arrays hold).
    #[must_use]
    pub fn ipv6_arrays_in_use(&self) -> bool {
        self.arrays_v6.in_sync()
    }

    /// Chunks of the IPv6 ipcache arrays in use (linked, or unlinked and waiting for a grace
    /// period before reuse), out of
    /// [`nodeseal_bpf_common::maps::capacity::IPCACHE6_CHUNKS`].
    #[must_use]
    pub fn ipv6_chunks_in_use(&self) -> usize {
        self.arrays_v6.chunks_in_use()
    }

    /// Longest-prefix match for `addr`: `(identity, location)`.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] on a failed lookup other than "not found".
    pub fn lookup(&self, addr: IpAddr) -> Result<Option<(u32, Location)>, MapError> {
        let found = match addr {
            IpAddr::V4(a) => self.v4.get(&Key::new(32, a.octets()), 0),
            IpAddr::V6(a) => self.v6.get(&Key::new(128, a.octets()), 0),
        };
        let entry = match found {
            Ok(entry) => entry,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(source) => {
                return Err(kernel("lookup", ipcache_name(Prefix::host(addr)), source));
            }
        };
        Ok(Some((entry.identity, location_of(&entry))))
    }

    /// Every prefix of both tries with its identity and location (what a restarted agent finds
    /// pinned).
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] when iterating a trie fails.
    pub fn entries(&self) -> Result<Vec<(Prefix, u32, Location)>, MapError> {
        let mut all = Vec::new();
        for item in self.v4.iter() {
            let (key, entry) = item.map_err(|source| kernel("iterate", "IPCACHE_V4", source))?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(32);
            let prefix = Prefix::new(IpAddr::from(key.data()), len)?;
            all.push((prefix, entry.identity, location_of(&entry)));
        }
        for item in self.v6.iter() {
            let (key, entry) = item.map_err(|source| kernel("iterate", "IPCACHE_V6", source))?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(128);
            let prefix = Prefix::new(IpAddr::from(key.data()), len)?;
            all.push((prefix, entry.identity, location_of(&entry)));
        }
        Ok(all)
    }
}

fn location_of(entry: &IpCacheEntry) -> Location {
    let remote = entry.flags & IpCacheEntry::FLAG_REMOTE != 0;
    if entry.flags & IpCacheEntry::FLAG_REVOKED != 0 {
        Location::RevokedPod
    } else if remote && entry.flags & IpCacheEntry::FLAG_POD != 0 {
        Location::RemotePod(NodeId(entry.node_id))
    } else if remote {
        Location::RemoteNode(NodeId(entry.node_id))
    } else if entry.flags & IpCacheEntry::FLAG_POD != 0 {
        Location::LocalPod
    } else {
        Location::External
    }
}

/// The maps behind [`IpCache`], as taken from the object.
pub(crate) struct IpCacheMaps {
    pub(crate) v4: Map,
    pub(crate) v6: Map,
    pub(crate) l1_v4: Map,
    pub(crate) chunks_v4: Map,
    pub(crate) chunks_v6: Map,
    pub(crate) lens: Map,
}

fn shape<T>(map: Map, name: &'static str) -> Result<T, MapError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    map.try_into()
        .map_err(|source| MapError::Shape { name, source })
}

fn ipcache_name(prefix: Prefix) -> &'static str {
    if prefix.addr.is_ipv4() {
        "IPCACHE_V4"
    } else {
        "IPCACHE_V6"
    }
}

fn node_key(addr: IpAddr) -> NodeKey {
    let addr = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    NodeKey { addr }
}

fn kernel(op: &'static str, name: &'static str, source: aya::maps::MapError) -> MapError {
    MapError::Kernel { op, name, source }
}

/// `NODES`: node IP → node id. ESP from an IP not in here is dropped (`unknown_node`).
#[derive(Debug)]
pub struct Nodes {
    map: HashMap<MapData, NodeKey, NodeEntry>,
}

impl Nodes {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self {
            map: map.try_into().map_err(|source| MapError::Shape {
                name: "NODES",
                source,
            })?,
        })
    }

    /// Records that `ip` belongs to node `node`.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] if the map is full.
    pub fn insert(&mut self, ip: IpAddr, node: NodeId) -> Result<(), MapError> {
        let entry = NodeEntry {
            node_id: node.0,
            reserved: 0,
        };
        self.map
            .insert(node_key(ip), entry, 0)
            .map_err(|source| kernel("insert", "NODES", source))
    }

    /// Forgets `ip` (revocation: its ESP is dropped from now on).
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] if it is not there.
    pub fn remove(&mut self, ip: IpAddr) -> Result<(), MapError> {
        self.map
            .remove(&node_key(ip))
            .map_err(|source| kernel("remove", "NODES", source))
    }

    /// The node id of `ip`, if known.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] on a failed lookup other than "not found".
    pub fn get(&self, ip: IpAddr) -> Result<Option<NodeId>, MapError> {
        match self.map.get(&node_key(ip), 0) {
            Ok(entry) => Ok(Some(NodeId(entry.node_id))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(kernel("lookup", "NODES", source)),
        }
    }
}

/// `CLEAR_PORTS`: the ports on which a remote node IP may send in clear with node encryption
/// and strict ingress (see `Config::FLAG_NODE_ENCRYPTION`).
pub struct ClearPorts {
    map: HashMap<MapData, ClearPort, u8>,
}

impl ClearPorts {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self {
            map: map.try_into().map_err(|source| MapError::Shape {
                name: "CLEAR_PORTS",
                source,
            })?,
        })
    }

    /// Makes `ports` ((IP protocol, port) pairs) the whole set: the new ones are added before
    /// the old ones go, so a port in both sets never drops out.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] if the map is full or a write fails.
    pub fn set(&mut self, ports: &[(u8, u16)]) -> Result<(), MapError> {
        let key = |(protocol, port): (u8, u16)| ClearPort {
            protocol,
            reserved: 0,
            port,
        };
        let wanted: Vec<ClearPort> = ports.iter().copied().map(key).collect();
        for k in &wanted {
            self.map
                .insert(k, 1, 0)
                .map_err(|source| kernel("insert", "CLEAR_PORTS", source))?;
        }
        let stale: Vec<ClearPort> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for k in stale {
            self.map
                .remove(&k)
                .map_err(|source| kernel("remove", "CLEAR_PORTS", source))?;
        }
        Ok(())
    }

    /// The set, as (IP protocol, port) pairs, sorted.
    #[must_use]
    pub fn get(&self) -> Vec<(u8, u16)> {
        let mut ports: Vec<(u8, u16)> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.protocol, k.port))
            .collect();
        ports.sort_unstable();
        ports
    }
}

/// `PEER_SLOTS`: per peer node, the key slot its OUT SA matches and whether it is ready.
/// Changing a peer's slot is one 4-byte map write: the datapath switches keys atomically.
pub struct PeerSlots {
    map: Array<MapData, PeerSlot>,
}

impl PeerSlots {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self {
            map: map.try_into().map_err(|source| MapError::Shape {
                name: "PEER_SLOTS",
                source,
            })?,
        })
    }

    /// Makes traffic to `node` use `key_slot` (1..=15), or marks it not ready (`None`: strict
    /// egress drops it with `no_sa`, otherwise it goes in clear).
    ///
    /// # Errors
    ///
    /// [`MapError::KeySlot`] for a slot outside 1..=15; [`MapError::Kernel`] on failure.
    pub fn set(&mut self, node: NodeId, key_slot: Option<u8>) -> Result<(), MapError> {
        let value = match key_slot {
            Some(slot) if (1..=mark::MAX_KEY_SLOT).contains(&slot) => PeerSlot {
                key_slot: slot,
                flags: PeerSlot::FLAG_READY,
                reserved: 0,
            },
            Some(slot) => return Err(MapError::KeySlot(slot)),
            None => PeerSlot::default(),
        };
        self.map
            .set(u32::from(node.0), value, 0)
            .map_err(|source| kernel("set", "PEER_SLOTS", source))
    }

    /// The ready key slot of `node`, if any.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] on failure.
    pub fn get(&self, node: NodeId) -> Result<Option<u8>, MapError> {
        let slot = self
            .map
            .get(&u32::from(node.0), 0)
            .map_err(|source| kernel("lookup", "PEER_SLOTS", source))?;
        Ok((slot.flags & PeerSlot::FLAG_READY != 0 && slot.key_slot != 0).then_some(slot.key_slot))
    }
}

/// Which directions a policy selects an endpoint for (selected = default deny).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Enforcement {
    /// Traffic toward the endpoint.
    pub ingress: bool,
    /// Traffic from the endpoint.
    pub egress: bool,
}

/// `ENDPOINTS`: host-side veth ifindex → pod identity and enforcement (ifindexes below
/// [`nodeseal_bpf_common::maps::capacity::ENDPOINTS_BY_IFINDEX`] are also kept in an array the datapath reads first).
pub struct Endpoints {
    map: HashMap<MapData, u32, EndpointInfo>,
    /// Copy of the entries with an ifindex below its length ([`EndpointInfo::to_word`];
    /// identity 0: empty).
    by_ifindex: Mapping,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints").finish_non_exhaustive()
    }
}

impl Endpoints {
    /// Opens the maps and makes the array agree with the hash map (pinned maps may come from
    /// an earlier loader, or an older one without the array).
    pub(crate) fn new(map: Map, by_ifindex: Map) -> Result<Self, MapError> {
        let mut endpoints = Self {
            map: shape(map, "ENDPOINTS")?,
            by_ifindex: Mapping::open(by_ifindex, "ENDPOINTS_BY_IFINDEX", 8)?,
        };
        endpoints.resync()?;
        Ok(endpoints)
    }

    fn resync(&mut self) -> Result<(), MapError> {
        let mut want = vec![0u64; self.by_ifindex.len()];
        for item in self.map.iter() {
            let (ifindex, info) = item.map_err(|source| kernel("iterate", "ENDPOINTS", source))?;
            if let Some(slot) = want.get_mut(ifindex as usize) {
                *slot = info.to_word();
            }
        }
        for (index, word) in want.into_iter().enumerate() {
            if self.by_ifindex.load(index) != word {
                self.by_ifindex.store(index, word);
            }
        }
        Ok(())
    }

    /// Writes the array slot of `ifindex`, if it has one: one atomic store.
    fn set_slot(&mut self, ifindex: u32, value: EndpointInfo) {
        if (ifindex as usize) < self.by_ifindex.len() {
            self.by_ifindex.store(ifindex as usize, value.to_word());
        }
    }

    /// Registers the pod behind `ifindex`.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] if the map is full.
    pub fn insert(
        &mut self,
        ifindex: u32,
        identity: u32,
        enforcement: Enforcement,
    ) -> Result<(), MapError> {
        let mut flags = 0;
        if enforcement.ingress {
            flags |= EndpointInfo::FLAG_ENFORCE_INGRESS;
        }
        if enforcement.egress {
            flags |= EndpointInfo::FLAG_ENFORCE_EGRESS;
        }
        let info = EndpointInfo { identity, flags };
        self.map
            .insert(ifindex, info, 0)
            .map_err(|source| kernel("insert", "ENDPOINTS", source))?;
        // An identity-0 entry reads as an empty slot (0 marks one): the datapath then finds it
        // in the hash map.
        self.set_slot(ifindex, info);
        Ok(())
    }

    /// Unregisters `ifindex`.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] if it is not there.
    pub fn remove(&mut self, ifindex: u32) -> Result<(), MapError> {
        self.set_slot(ifindex, EndpointInfo::default());
        self.map
            .remove(&ifindex)
            .map_err(|source| kernel("remove", "ENDPOINTS", source))
    }

    /// Identity and enforcement of `ifindex`.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] on a failed lookup other than "not found".
    pub fn get(&self, ifindex: u32) -> Result<Option<(u32, Enforcement)>, MapError> {
        match self.map.get(&ifindex, 0) {
            Ok(e) => Ok(Some((
                e.identity,
                Enforcement {
                    ingress: e.flags & EndpointInfo::FLAG_ENFORCE_INGRESS != 0,
                    egress: e.flags & EndpointInfo::FLAG_ENFORCE_EGRESS != 0,
                },
            ))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(kernel("lookup", "ENDPOINTS", source)),
        }
    }
}

/// Datapath mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// No encryption datapath (policy only).
    #[default]
    None,
    /// IPsec: encrypt/decrypt marks.
    Ipsec,
    /// WireGuard: routing does the steering; strict mode still applies.
    Wireguard,
}

/// The datapath's global settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// Mode.
    pub mode: Mode,
    /// This node's id.
    pub local_node: Option<NodeId>,
    /// Drop traffic to remote pods whose peer has no ready SA (`no_sa`).
    pub strict_egress: bool,
    /// Drop plaintext from remote pod CIDRs on the uplink (`unencrypted`).
    pub strict_ingress: bool,
    /// Also encrypt pod traffic to remote node IPs.
    pub node_encryption: bool,
    /// Emit trace events for passed packets (debugging; costs per packet).
    pub trace: bool,
}

/// `CONFIG`.
pub struct ConfigMap {
    map: Array<MapData, Config>,
}

impl ConfigMap {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self {
            map: map.try_into().map_err(|source| MapError::Shape {
                name: "CONFIG",
                source,
            })?,
        })
    }

    /// Writes the settings (one map write; the programs see old or new, never a mix).
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] on failure.
    pub fn set(&mut self, config: DatapathConfig) -> Result<(), MapError> {
        let mut flags = 0;
        for (on, flag) in [
            (config.strict_egress, Config::FLAG_STRICT_EGRESS),
            (config.strict_ingress, Config::FLAG_STRICT_INGRESS),
            (config.node_encryption, Config::FLAG_NODE_ENCRYPTION),
            (config.trace, Config::FLAG_TRACE),
        ] {
            if on {
                flags |= flag;
            }
        }
        let value = Config {
            flags,
            local_node_id: config.local_node.map_or(0, |n| n.0),
            mode: match config.mode {
                Mode::None => Config::MODE_NONE,
                Mode::Ipsec => Config::MODE_IPSEC,
                Mode::Wireguard => Config::MODE_WIREGUARD,
            },
            reserved: 0,
        };
        self.map
            .set(0, value, 0)
            .map_err(|source| kernel("set", "CONFIG", source))
    }

    /// Reads the settings back.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] on failure.
    pub fn get(&self) -> Result<DatapathConfig, MapError> {
        let c = self
            .map
            .get(&0, 0)
            .map_err(|source| kernel("lookup", "CONFIG", source))?;
        Ok(DatapathConfig {
            mode: match c.mode {
                Config::MODE_IPSEC => Mode::Ipsec,
                Config::MODE_WIREGUARD => Mode::Wireguard,
                _ => Mode::None,
            },
            local_node: (c.local_node_id != 0).then_some(NodeId(c.local_node_id)),
            strict_egress: c.flags & Config::FLAG_STRICT_EGRESS != 0,
            strict_ingress: c.flags & Config::FLAG_STRICT_INGRESS != 0,
            node_encryption: c.flags & Config::FLAG_NODE_ENCRYPTION != 0,
            trace: c.flags & Config::FLAG_TRACE != 0,
        })
    }
}

/// `DROP_COUNTERS`: per-CPU packet counts by drop reason.
pub struct DropCounters {
    map: PerCpuArray<MapData, u64>,
}

impl DropCounters {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self {
            map: map.try_into().map_err(|source| MapError::Shape {
                name: "DROP_COUNTERS",
                source,
            })?,
        })
    }

    /// Drops counted for `reason`, summed over CPUs.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] on failure.
    pub fn get(&self, reason: DropReason) -> Result<u64, MapError> {
        let values = self
            .map
            .get(&u32::from(reason.code()), 0)
            .map_err(|source| kernel("lookup", "DROP_COUNTERS", source))?;
        Ok(values.iter().sum())
    }

    /// Every reason with its count.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] on failure.
    pub fn all(&self) -> Result<Vec<(DropReason, u64)>, MapError> {
        DropReason::ALL
            .into_iter()
            .map(|r| Ok((r, self.get(r)?)))
            .collect()
    }
}

/// `POLICY_VERDICTS`: how many packets the identity policy allowed and denied, per direction.
/// Counted on every policy decision (only for endpoints that enforce the direction), whether
/// tracing is on or not.
pub struct PolicyVerdicts {
    map: PerCpuArray<MapData, u64>,
}

/// Policy decisions counted by the datapath, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyVerdictCounts {
    /// Ingress packets allowed.
    pub ingress_allowed: u64,
    /// Ingress packets denied.
    pub ingress_denied: u64,
    /// Egress packets allowed.
    pub egress_allowed: u64,
    /// Egress packets denied.
    pub egress_denied: u64,
}

impl PolicyVerdictCounts {
    /// The count for `direction` and verdict (`allowed` or denied).
    #[must_use]
    pub const fn get(&self, direction: PolicyDirection, allowed: bool) -> u64 {
        match (direction, allowed) {
            (PolicyDirection::Ingress, true) => self.ingress_allowed,
            (PolicyDirection::Ingress, false) => self.ingress_denied,
            (PolicyDirection::Egress, true) => self.egress_allowed,
            (PolicyDirection::Egress, false) => self.egress_denied,
        }
    }
}

impl PolicyVerdicts {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self {
            map: map.try_into().map_err(|source| MapError::Shape {
                name: "POLICY_VERDICTS",
                source,
            })?,
        })
    }

    /// Decisions counted for `direction` with the given verdict, summed over CPUs.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] on failure.
    pub fn get(&self, direction: PolicyDirection, allowed: bool) -> Result<u64, MapError> {
        let raw = match direction {
            PolicyDirection::Ingress => PolicyKey::INGRESS,
            PolicyDirection::Egress => PolicyKey::EGRESS,
        };
        let values = self
            .map
            .get(&policy_verdict_slot(raw, allowed), 0)
            .map_err(|source| kernel("lookup", "POLICY_VERDICTS", source))?;
        Ok(values.iter().sum())
    }

    /// All four counts.
    ///
    /// # Errors
    ///
    /// [`MapError::Kernel`] on failure.
    pub fn all(&self) -> Result<PolicyVerdictCounts, MapError> {
        Ok(PolicyVerdictCounts {
            ingress_allowed: self.get(PolicyDirection::Ingress, true)?,
            ingress_denied: self.get(PolicyDirection::Ingress, false)?,
            egress_allowed: self.get(PolicyDirection::Egress, true)?,
            egress_denied: self.get(PolicyDirection::Egress, false)?,
        })
    }
}

impl std::fmt::Debug for PolicyVerdicts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyVerdicts").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for PeerSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSlots").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ConfigMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigMap").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DropCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropCounters").finish_non_exhaustive()
    }
}
