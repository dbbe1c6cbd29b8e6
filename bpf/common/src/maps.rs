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
    /// As one `u64` (identity in bits 0..32, flags in 32..64): `ENDPOINTS_BY_IFINDEX` slots are
    /// written and read whole, so a reader never sees half of an update.
    #[must_use]
    pub const fn to_word(self) -> u64 {
        self.identity as u64 | (self.flags as u64) << 32
    }

    /// Inverse of [`Self::to_word`].
    #[must_use]
    pub const fn from_word(word: u64) -> Self {
        Self {
            identity: word as u32,
            flags: (word >> 32) as u32,
        }
    }

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
    /// The prefix is a pod CIDR of a revoked node (set with [`Self::FLAG_REMOTE`] and
    /// [`Self::FLAG_POD`], `node_id` 0): it never gets an encrypt mark, and plaintext from it is
    /// dropped (`RevokedSource`) whenever encryption is on. Keeping the prefix known, rather
    /// than removing it, is what keeps a revoked node more restricted than a member: an unknown
    /// source is "outside the fabric" and passes.
    pub const FLAG_REVOKED: u16 = 8;
}

/// Key of `IPCACHE_EXACT_V6`, the IPv6 exact-match hash older loaders pinned (this version
/// removes its pin at load and reads IPv6 prefixes from the arrays of [`Ipv6Chunk`] instead):
/// one IPv6 ipcache prefix, host bits cleared.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpCacheKeyV6 {
    /// Prefix length, 0..=128.
    pub prefix_len: u32,
    /// Network address, network order.
    pub addr: [u8; 16],
}

/// Value of `IPCACHE_LENS` (index [`Self::INDEX_V4`] / [`Self::INDEX_V6`]): whether the datapath
/// may read the family's ipcache arrays.
///
/// With [`Self::STATE_ARRAYS`] the datapath reads the arrays: `IPCACHE4_L1` /
/// `IPCACHE4_CHUNKS` ([`IpCacheSlot`]) for IPv4, `IPCACHE6_CHUNKS` ([`Ipv6Chunk`]) for IPv6.
/// Any other state (a fresh map is all zero) means the datapath walks the family's LPM trie,
/// which is always authoritative. Only a loader that has just rebuilt a family's arrays from
/// its trie publishes [`Self::STATE_ARRAYS`] for it.
///
/// Older loaders published [`Self::STATE_EXACT`] for IPv6 (probe `IPCACHE_EXACT_V6` once per
/// length in `lens[..count]`); this version's datapath reads that state as "walk the trie", and
/// this loader replaces it at load, so a pinned value from an older loader is never misread.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PrefixLengths {
    /// `STATE_*`.
    pub state: u8,
    /// Older loaders' IPv6 state only: number of valid entries of `lens`.
    pub count: u8,
    /// Older loaders' IPv6 state only: prefix lengths present, longest first.
    pub lens: [u8; Self::MAX_LENS],
}

impl PrefixLengths {
    /// Size of `lens`.
    pub const MAX_LENS: usize = 6;
    /// Walk the trie.
    pub const STATE_TRIE: u8 = 0;
    /// Published by older loaders for IPv6 only (the `IPCACHE_EXACT_V6` hash probed per
    /// length); this datapath walks the trie instead.
    pub const STATE_EXACT: u8 = 1;
    /// Published by older loaders for IPv6 with more lengths than `lens` holds: walk the trie.
    pub const STATE_TOO_MANY: u8 = 2;
    /// The family's ipcache arrays are in sync with its trie; read them.
    pub const STATE_ARRAYS: u8 = 3;
    /// Index of the IPv4 entry.
    pub const INDEX_V4: u32 = 0;
    /// Index of the IPv6 entry.
    pub const INDEX_V6: u32 = 1;
}

/// One entry of the IPv4 ipcache arrays, a multibit trie with strides 16/8/8 built by userspace
/// from the prefixes of the trie (prefix expansion, as in DIR-24-8 routing tables).
///
/// `IPCACHE4_L1` has one slot per /16 (index: the address's top 16 bits); `IPCACHE4_CHUNKS`
/// holds chunks of 256 slots, each for the 256 /24s of a /16 (second level) or the 256
/// addresses of a /24 (third level). A slot is empty (no prefix covers its block), a leaf (the
/// longest prefix covering its whole block) or a link to the chunk that resolves its block
/// further. A lookup reads at most three slots.
///
/// Each slot is one `u64`, written by userspace with a single atomic store through a shared
/// mapping and read by the datapath with a single load, so a reader sees the old or the new
/// slot and never a mix. Bits: 0..32 identity (a link: chunk number), 32..48 node id,
/// 48..64 [`IpCacheEntry`] flags plus [`Self::PRESENT`] / [`Self::LINK`].
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpCacheSlot(pub u64);

impl IpCacheSlot {
    /// No prefix covers this block.
    pub const EMPTY: Self = Self(0);
    /// Flag bit: a leaf.
    pub const PRESENT: u16 = 0x4000;
    /// Flag bit: a link to the chunk in bits 0..32.
    pub const LINK: u16 = 0x8000;
    /// Slots per chunk.
    pub const CHUNK_SLOTS: u32 = 256;
    /// Slots of `IPCACHE4_L1`.
    pub const L1_SLOTS: u32 = 65_536;

    /// A leaf holding `entry`.
    #[must_use]
    pub const fn leaf(entry: IpCacheEntry) -> Self {
        Self(
            entry.identity as u64
                | (entry.node_id as u64) << 32
                | ((entry.flags | Self::PRESENT) as u64) << 48,
        )
    }

    /// A link to chunk `chunk`.
    #[must_use]
    pub const fn link(chunk: u32) -> Self {
        Self(chunk as u64 | (Self::LINK as u64) << 48)
    }

    const fn flags(self) -> u16 {
        (self.0 >> 48) as u16
    }

    /// The chunk this slot links to, if it is a link.
    #[must_use]
    pub const fn chunk(self) -> Option<u32> {
        if self.flags() & Self::LINK != 0 {
            Some(self.0 as u32)
        } else {
            None
        }
    }

    /// The entry of a leaf (`None` for an empty slot or a link).
    #[must_use]
    pub const fn entry(self) -> Option<IpCacheEntry> {
        let flags = self.flags();
        if flags & Self::LINK != 0 || flags & Self::PRESENT == 0 {
            return None;
        }
        Some(IpCacheEntry {
            identity: self.0 as u32,
            node_id: (self.0 >> 32) as u16,
            flags: flags & !(Self::PRESENT | Self::LINK),
        })
    }
}

/// One chunk of the IPv6 ipcache arrays (`IPCACHE6_CHUNKS`): a path-compressed multibit trie
/// with 8-bit strides built by userspace from the prefixes of the `IPCACHE_V6` LPM trie, which
/// stays authoritative.
///
/// Chunk [`Self::ROOT`] resolves the top 8 bits of an address. Every other chunk is reached
/// through a link slot ([`IpCacheSlot::link`]) of its parent, which covers a block of
/// `8 * k` bits; the chunk resolves bits `depth..depth + 8` of the addresses whose top `depth`
/// bits are `key` (`depth` is a multiple of 8, at least the parent block's length). Between the
/// parent block and `depth` there is no branching: every prefix inside the parent block and
/// longer than it lies inside `key/depth`, so the levels in between are skipped (path
/// compression), and an address of the parent block outside `key/depth` matches what covers
/// the whole parent block, `miss`. A slot is empty, a leaf (the longest prefix covering its
/// block) or a link. Each level adds at least 8 bits, so a lookup reads at most
/// [`Self::MAX_LEVELS`] chunks, whatever the number of prefixes; typically 3 or 4 for a /64.
///
/// Concurrency (as for the IPv4 arrays): every word is written by userspace with one atomic
/// store through a shared mapping and read by the datapath with one load. A chunk is filled
/// completely before the slot linking it is stored; `key`, `mask` and `depth` never change while
/// the chunk is linked (a block whose shape changes gets a new chunk, and the old one is reused
/// only after an RCU grace period); `miss` and the slots change in place, each from the old
/// answer for its addresses to the new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Chunk {
    /// Top 64 bits of `key` (host order of the address's first 8 bytes), bits below `depth`
    /// clear.
    pub key_hi: u64,
    /// Low 64 bits of `key`.
    pub key_lo: u64,
    /// The top `depth` bits set, high half.
    pub mask_hi: u64,
    /// The top `depth` bits set, low half.
    pub mask_lo: u64,
    /// First bit the slots resolve: 0, 8, ..., 120.
    pub depth: u64,
    /// The answer for addresses of the parent block outside `key/depth`.
    pub miss: IpCacheSlot,
    /// Slot `i`: the addresses `key | i << (120 - depth)` / `depth + 8`.
    pub slots: [IpCacheSlot; IpCacheSlot::CHUNK_SLOTS as usize],
}

impl Ipv6Chunk {
    /// The chunk every lookup starts with (depth 0, matches every address).
    pub const ROOT: u32 = 0;
    /// Most chunks a lookup reads: one per 8-bit stride.
    pub const MAX_LEVELS: u32 = 16;
    /// Size in `u64` words.
    pub const WORDS: usize = 6 + IpCacheSlot::CHUNK_SLOTS as usize;
    /// Word offsets of the fields.
    pub const WORD_KEY_HI: usize = 0;
    /// See [`Self::WORD_KEY_HI`].
    pub const WORD_KEY_LO: usize = 1;
    /// See [`Self::WORD_KEY_HI`].
    pub const WORD_MASK_HI: usize = 2;
    /// See [`Self::WORD_KEY_HI`].
    pub const WORD_MASK_LO: usize = 3;
    /// See [`Self::WORD_KEY_HI`].
    pub const WORD_DEPTH: usize = 4;
    /// See [`Self::WORD_KEY_HI`].
    pub const WORD_MISS: usize = 5;
    /// See [`Self::WORD_KEY_HI`].
    pub const WORD_SLOTS: usize = 6;

    /// Index of the slot for the address `(hi, lo)` in a chunk of `depth` (at most 120, a
    /// multiple of 8). Branch-light and with shifts below 64, for the verifier.
    #[must_use]
    #[inline(always)]
    pub const fn slot_index(depth: u64, hi: u64, lo: u64) -> u32 {
        let word = if depth >= 64 { lo } else { hi };
        let shift = 56u64.wrapping_sub(depth & 63) & 63;
        ((word >> shift) & 0xff) as u32
    }
}

/// Key of `CONNTRACK`: a flow as its first packet crossed a pod's interface, so that replies
/// (the same flow with addresses and ports swapped) pass the policy of the other direction
/// without a rule, as Kubernetes and Cilium policies mean.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    /// Source address: IPv6, or IPv4-mapped IPv6.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// L4 source port (host order); 0 for protocols without ports (ICMP included).
    pub src_port: u16,
    /// L4 destination port.
    pub dst_port: u16,
    /// IP protocol.
    pub protocol: u8,
    /// [`PolicyKey::INGRESS`] (the first packet entered the pod) or [`PolicyKey::EGRESS`] (it
    /// left the pod): a flow opened toward a pod grants replies leaving it, and only those.
    pub direction: u8,
    /// Reserved, zero.
    pub reserved: [u8; 2],
}

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` of the flow's last packet either way; an entry older than its
    /// protocol's lifetime counts as absent.
    pub last_seen_ns: u64,
}

const _: () = assert!(size_of::<CtKey>() == 40);
const _: () = assert!(size_of::<CtEntry>() == 8);

/// Key of a policy rule, packed for the policy table (see [`PolicySlot`]).
///
/// Lookup goes from most to least specific, first hit wins:
/// `(peer, proto, port)`, `(peer, proto, 0)`, `(peer, 0, 0)`, then the same three with
/// `peer = identity::ANY`. Port 0 and protocol 0 are wildcards. For ICMP/ICMPv6 the "port" is
/// the message type. Deny-over-allow precedence across specificities is resolved by the agent
/// writing explicit deny entries (Cilium does the same in its userspace map state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
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

    /// First word of the packed key: subject and peer.
    #[must_use]
    pub const fn word0(&self) -> u64 {
        self.subject as u64 | (self.peer as u64) << 32
    }

    /// Second word of the packed key: port, protocol, direction. Never 0 for a valid key (the
    /// direction is 1 or 2), so it never matches an empty slot.
    #[must_use]
    pub const fn word1(&self) -> u32 {
        self.port as u32 | (self.protocol as u32) << 16 | (self.direction as u32) << 24
    }

    /// Inverse of [`Self::word0`] / [`Self::word1`].
    #[must_use]
    pub const fn unpack(word0: u64, word1: u32) -> Self {
        Self {
            subject: word0 as u32,
            peer: (word0 >> 32) as u32,
            port: word1 as u16,
            protocol: (word1 >> 16) as u8,
            direction: (word1 >> 24) as u8,
        }
    }
}

/// Verdicts of a policy rule.
pub mod policy_verdict {
    /// Let the packet through.
    pub const ALLOW: u8 = 1;
    /// Drop it with `PolicyDenied`.
    pub const DENY: u8 = 2;
}

/// Number of slots of the `POLICY_VERDICTS` per-CPU counters: direction × allowed/denied.
pub const POLICY_VERDICT_SLOTS: u32 = 4;

/// The `POLICY_VERDICTS` slot counting decisions in `direction` ([`PolicyKey::INGRESS`] or
/// [`PolicyKey::EGRESS`]) that were allowed or denied: ingress allowed 0, ingress denied 1,
/// egress allowed 2, egress denied 3. Branch-free, as the datapath calls it on every checked
/// packet; any other direction value lands in a valid slot rather than outside the array.
#[must_use]
pub const fn policy_verdict_slot(direction: u8, allowed: bool) -> u32 {
    ((direction as u32).wrapping_sub(1) & 1) * 2 + (!allowed) as u32
}

/// One slot of a `POLICY_TABLE` bucket ([`PolicyBucket`]): a rule (packed [`PolicyKey`] and
/// verdict) or empty (all zero).
///
/// The table is a bucketized cuckoo hash table built by userspace in an array: two copies of
/// [`Self::SLOTS_PER_COPY`] slots, [`Self::BUCKET_SLOTS`] slots per bucket; a rule sits in one
/// of the two buckets [`policy_buckets`] gives for its key under the copy's seed. The datapath
/// reads the copy [`PolicyTableHeader`] names; userspace rebuilds the other copy, switches the
/// header, and waits for an RCU grace period before it writes that copy again, so readers never
/// see a copy while it is written. Array reads are inlined by the verifier, unlike hash map
/// lookups.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicySlot {
    /// [`PolicyKey::word0`].
    pub word0: u64,
    /// [`PolicyKey::word1`] in bits 0..32, verdict (`policy_verdict::*`, 0 = empty slot) in
    /// bits 32..40.
    pub word1: u64,
}

impl PolicySlot {
    /// Slots per bucket (one 64-byte cache line).
    pub const BUCKET_SLOTS: u32 = 4;
    /// Buckets per copy (a power of two).
    pub const BUCKETS: u32 = 32_768;
    /// Slots per copy: twice the rule capacity, so the cuckoo build always finds room.
    pub const SLOTS_PER_COPY: u32 = Self::BUCKETS * Self::BUCKET_SLOTS;

    /// The slot holding `key` with `verdict`.
    #[must_use]
    pub const fn new(key: &PolicyKey, verdict: u8) -> Self {
        Self {
            word0: key.word0(),
            word1: key.word1() as u64 | (verdict as u64) << 32,
        }
    }

    /// The verdict if this slot holds the key `(word0, word1)`.
    #[must_use]
    pub const fn verdict_for(&self, word0: u64, word1: u32) -> Option<u8> {
        if self.word0 == word0 && self.word1 as u32 == word1 && self.word1 >> 32 != 0 {
            Some((self.word1 >> 32) as u8)
        } else {
            None
        }
    }
}

/// One value of `POLICY_TABLE`: a bucket of [`PolicySlot::BUCKET_SLOTS`] slots, one cache line,
/// read with one array lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyBucket {
    /// The slots.
    pub slots: [PolicySlot; PolicySlot::BUCKET_SLOTS as usize],
}

/// The two candidate buckets of a packed key under `seed` (distinct, below
/// [`PolicySlot::BUCKETS`]) in a table published with [`PolicyTableHeader::new`].
#[must_use]
pub const fn policy_buckets(word0: u64, word1: u32, seed: u32) -> (u32, u32) {
    // Multiplicative hashing: the key's words and the seed folded into one word, multiplied
    // once by an odd constant. The datapath reaches `word0` last (its peer identity comes from
    // the ipcache), so one multiply stands between it and the bucket load (three did in
    // `policy_buckets_legacy`, 1 to 3 ns more per packet in the datapath benchmark); `word1`
    // and the seed are mixed while it waits.
    let x = word0 ^ (word1 as u64 | (seed as u64) << 32).wrapping_mul(0x94D0_49BB_1331_11EB);
    let h = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    // The top bits of a product depend on every bit of its factors (the low bits only on the
    // low bits), so the first bucket is the top bits.
    let first = h >> (64 - PolicySlot::BUCKETS.trailing_zeros());
    let mask = PolicySlot::BUCKETS as u64 - 1;
    // XOR with an odd (so non-zero) value within the mask: another bucket, without a branch
    // (every branch here multiplies the datapath's verification paths).
    let second = first ^ ((h >> 32) & mask | 1);
    (first as u32, second as u32)
}

/// The buckets of tables published before [`policy_buckets`] (their header lacks
/// [`PolicyTableHeader::multiplicative`]). The datapath still reads such a table, which an
/// older loader pinned, until this loader replaces it: its first change of the policy rebuilds
/// the table rather than updating it in place.
#[must_use]
pub const fn policy_buckets_legacy(word0: u64, word1: u32, seed: u32) -> (u32, u32) {
    let mut h = (word0 ^ (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= (word1 as u64 | (seed as u64) << 32).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 29;
    let mask = PolicySlot::BUCKETS as u64 - 1;
    let first = h & mask;
    let second = first ^ ((h >> 32) & mask | 1);
    (first as u32, second as u32)
}

/// Value of `POLICY_HEADER` at index 0, one `u64` stored atomically: which copy of
/// `POLICY_TABLE` the datapath reads and that copy's hash seed. Zero (a fresh map) means no
/// table was published: no rule matches.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyTableHeader(pub u64);

impl PolicyTableHeader {
    const PUBLISHED: u64 = 1 << 33;
    const COPY: u64 = 1 << 32;
    const MULTIPLICATIVE: u64 = 1 << 34;

    /// Copy `copy` (0 or 1) laid out by [`policy_buckets`] with `seed` is live.
    #[must_use]
    pub const fn new(copy: u32, seed: u32) -> Self {
        Self(
            Self::PUBLISHED
                | Self::MULTIPLICATIVE
                | if copy == 0 { 0 } else { Self::COPY }
                | seed as u64,
        )
    }

    /// The live copy is laid out by [`policy_buckets`]; else by [`policy_buckets_legacy`] (a
    /// table an older loader published).
    #[must_use]
    pub const fn multiplicative(self) -> bool {
        self.0 & Self::MULTIPLICATIVE != 0
    }

    /// `(first slot of the live copy, seed)`, or `None` before the first publication.
    #[must_use]
    pub const fn live(self) -> Option<(u32, u32)> {
        if self.0 & Self::PUBLISHED == 0 {
            return None;
        }
        // Without a branch, so the verifier does not walk the policy lookup once per copy.
        let copy = ((self.0 & Self::COPY) >> 32) as u32;
        Some((copy * PolicySlot::SLOTS_PER_COPY, self.0 as u32))
    }
}

/// Key of `NODES`: a node IP, IPv6 or IPv4-mapped IPv6 (`::ffff:a.b.c.d`), network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeKey {
    /// The address.
    pub addr: [u8; 16],
}

/// Key of `CLEAR_PORTS`: a port (either end) on which traffic from a remote node IP may arrive
/// in clear with node encryption and strict ingress: the handshake port, the operator's exempt
/// ports, WireGuard's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ClearPort {
    /// IP protocol (TCP or UDP).
    pub protocol: u8,
    /// Zero.
    pub reserved: u8,
    /// The port, host order.
    pub port: u16,
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
    /// Node encryption: pod traffic to remote node IPs is tunnel traffic, and with strict
    /// ingress plaintext from a remote node IP is dropped (`UnencryptedNode`) unless it is
    /// on a port of `CLEAR_PORTS` or IPv6 neighbour discovery.
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

/// `BPF_F_MMAPABLE`: an array map userspace can map and write with atomic stores.
pub const MAP_FLAG_MMAPABLE: u32 = 1 << 10;

const _: () = {
    assert!(size_of::<EndpointInfo>() == 8);
    assert!(size_of::<IpCacheEntry>() == 8);
    assert!(size_of::<IpCacheSlot>() == 8);
    assert!(size_of::<Ipv6Chunk>() == Ipv6Chunk::WORDS * 8);
    assert!(core::mem::offset_of!(Ipv6Chunk, miss) == Ipv6Chunk::WORD_MISS * 8);
    assert!(core::mem::offset_of!(Ipv6Chunk, depth) == Ipv6Chunk::WORD_DEPTH * 8);
    assert!(core::mem::offset_of!(Ipv6Chunk, slots) == Ipv6Chunk::WORD_SLOTS * 8);
    assert!(size_of::<IpCacheKeyV6>() == 20);
    assert!(size_of::<PrefixLengths>() == 8);
    assert!(size_of::<NodeKey>() == 16);
    assert!(size_of::<NodeEntry>() == 4);
    assert!(size_of::<PeerSlot>() == 4);
    assert!(size_of::<PolicySlot>() == 16);
    assert!(size_of::<PolicyBucket>() == 64);
    assert!(size_of::<PolicyTableHeader>() == 8);
    assert!(size_of::<Config>() == 8);
    assert!(size_of::<ClearPort>() == 4);
};

/// Maximum number of entries of each map (the loader can't resize pinned maps).
pub mod capacity {
    /// `ENDPOINTS`.
    pub const ENDPOINTS: u32 = 4096;
    /// `ENDPOINTS_BY_IFINDEX`: endpoints whose ifindex is below this are also in the array.
    pub const ENDPOINTS_BY_IFINDEX: u32 = 16_384;
    /// `IPCACHE_V4` and `IPCACHE_V6` each.
    pub const IPCACHE: u32 = 65_536;
    /// Chunks of `IPCACHE4_CHUNKS` ([`super::IpCacheSlot`]; 2 KiB each). One per /16 that
    /// holds prefixes longer than /16, one per /24 that holds prefixes longer than /24; with
    /// more, the datapath falls back to the trie.
    pub const IPCACHE4_CHUNKS: u32 = 1024;
    /// Chunks of `IPCACHE6_CHUNKS` ([`super::Ipv6Chunk`]; 2 KiB each, all mapped by the
    /// agent). Path compression makes it one chunk per block of 256 addresses (of some stride)
    /// in which prefixes branch, plus one per prefix longer than /64 alone in its block: about 45
    /// for 10,000 /64s in one /48, about 1,000 for 1,000 scattered node /128s. With more, the
    /// datapath falls back to the trie.
    pub const IPCACHE6_CHUNKS: u32 = 2048;
    /// `NODES`.
    pub const NODES: u32 = 16_384;
    /// `CLEAR_PORTS`.
    pub const CLEAR_PORTS: u32 = 64;
    /// `PEER_SLOTS` (one per possible node id).
    pub const PEER_SLOTS: u32 = 65_536;
    /// Policy rules (`POLICY_TABLE` has two copies of twice this many slots).
    pub const POLICY: u32 = 65_536;
    /// `CONNTRACK` flows (an LRU map: the least recently used flow makes room).
    pub const CONNTRACK: u32 = 131_072;
    /// `EVENTS` ring buffer size in bytes (a power of two, multiple of the page size).
    pub const EVENTS_BYTES: u32 = 256 * 1024;
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        ClearPort, Config, CtEntry, CtKey, EndpointInfo, IpCacheEntry, IpCacheKeyV6, IpCacheSlot,
        Ipv6Chunk, NodeEntry, NodeKey, PeerSlot, PolicyBucket, PolicySlot, PolicyTableHeader,
        PrefixLengths,
    };

    // SAFETY: each type is #[repr(C)], Copy, made only of integers and has no padding (checked
    // by the size assertions above), so every byte pattern is a valid value.
    unsafe impl aya::Pod for EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IpCacheEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IpCacheSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IpCacheKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Ipv6Chunk {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PrefixLengths {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ClearPort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicySlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyTableHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_say_which_hash_laid_the_table_out() {
        let header = PolicyTableHeader::new(1, 42);
        assert!(header.multiplicative());
        assert_eq!(header.live(), Some((PolicySlot::SLOTS_PER_COPY, 42)));
        // What a loader from before the multiplicative hash published.
        let legacy = PolicyTableHeader(1 << 33 | 42);
        assert!(!legacy.multiplicative());
        assert_eq!(legacy.live(), Some((0, 42)));
    }

    #[test]
    fn both_hashes_give_two_distinct_buckets_in_range() {
        for i in 0..10_000u64 {
            let word0 = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for (first, second) in [
                policy_buckets(word0, i as u32 | 1 << 24, 7),
                policy_buckets_legacy(word0, i as u32 | 1 << 24, 7),
            ] {
                assert_ne!(first, second);
                assert!(first < PolicySlot::BUCKETS && second < PolicySlot::BUCKETS);
            }
        }
    }

    #[test]
    fn policy_verdict_slots_are_distinct_and_in_range() {
        let slots = [
            policy_verdict_slot(PolicyKey::INGRESS, true),
            policy_verdict_slot(PolicyKey::INGRESS, false),
            policy_verdict_slot(PolicyKey::EGRESS, true),
            policy_verdict_slot(PolicyKey::EGRESS, false),
        ];
        assert_eq!(slots, [0, 1, 2, 3]);
        for direction in [0, 3, 255] {
            assert!(policy_verdict_slot(direction, false) < POLICY_VERDICT_SLOTS);
        }
    }
}
