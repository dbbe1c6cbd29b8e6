//! Map definitions. All pinned by name, so a restarted loader reuses the same maps.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use nodeseal_bpf_common::{
    maps::{
        ClearPort, Config, CtEntry, CtKey, EndpointInfo, IpCacheEntry, IpCacheSlot, Ipv6Chunk,
        MAP_FLAG_MMAPABLE, NodeEntry, NodeKey, POLICY_VERDICT_SLOTS, PeerSlot, PolicyBucket,
        PolicySlot, PolicyTableHeader, PrefixLengths, capacity,
    },
    reason::DropReason,
};

#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Slots are [`EndpointInfo::to_word`].
#[map]
pub static ENDPOINTS_BY_IFINDEX: Array<u64> =
    Array::pinned(capacity::ENDPOINTS_BY_IFINDEX, MAP_FLAG_MMAPABLE);

#[map]
pub static IPCACHE_V4: LpmTrie<[u8; 4], IpCacheEntry> = LpmTrie::pinned(capacity::IPCACHE, 0);

#[map]
pub static IPCACHE_V6: LpmTrie<[u8; 16], IpCacheEntry> = LpmTrie::pinned(capacity::IPCACHE, 0);

#[map]
pub static IPCACHE4_L1: Array<IpCacheSlot> =
    Array::pinned(IpCacheSlot::L1_SLOTS, MAP_FLAG_MMAPABLE);

#[map]
pub static IPCACHE4_CHUNKS: Array<IpCacheSlot> = Array::pinned(
    capacity::IPCACHE4_CHUNKS * IpCacheSlot::CHUNK_SLOTS,
    MAP_FLAG_MMAPABLE,
);

#[map]
pub static IPCACHE6_CHUNKS: Array<Ipv6Chunk> =
    Array::pinned(capacity::IPCACHE6_CHUNKS, MAP_FLAG_MMAPABLE);

#[map]
pub static IPCACHE_LENS: Array<PrefixLengths> = Array::pinned(2, 0);

#[map]
pub static NODES: HashMap<NodeKey, NodeEntry> = HashMap::pinned(capacity::NODES, 0);

#[map]
pub static CLEAR_PORTS: HashMap<ClearPort, u8> = HashMap::pinned(capacity::CLEAR_PORTS, 0);

#[map]
pub static PEER_SLOTS: Array<PeerSlot> = Array::pinned(capacity::PEER_SLOTS, 0);

#[map]
pub static POLICY_TABLE: Array<PolicyBucket> =
    Array::pinned(2 * PolicySlot::BUCKETS, MAP_FLAG_MMAPABLE);

#[map]
pub static POLICY_HEADER: Array<PolicyTableHeader> = Array::pinned(1, MAP_FLAG_MMAPABLE);

#[map]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map]
pub static DROP_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(DropReason::COUNT, 0);

/// Policy decisions by direction and verdict (`policy_verdict_slot`).
#[map]
pub static POLICY_VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(POLICY_VERDICT_SLOTS, 0);

#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(capacity::CONNTRACK, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);
