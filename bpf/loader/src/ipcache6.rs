//! The IPv6 ipcache arrays (`IPCACHE6_CHUNKS`): a path-compressed multibit trie with 8-bit
//! strides built from the prefixes of the `IPCACHE_V6` LPM trie, which stays authoritative (see
//! `Ipv6Chunk` for the layout). A lookup reads at most 16 chunks whatever the number of
//! prefixes, and as many as the address's path has branching blocks (3 or 4 for a pod /64).
//!
//! The layout is a function of the prefix set alone: a slot's block holds a link exactly when
//! some prefix lies strictly inside it, and the linked chunk's `key`/`depth` is the longest
//! common prefix of those prefixes rounded down to a stride (at most 120). An update recomputes
//! that shape along the changed prefix's path only.
//!
//! Update protocol (as for the IPv4 arrays), so a reader racing an update finds the old or the
//! new answer for its address and never garbage, and a change to one prefix never disturbs the
//! lookup of an address it does not cover:
//! - every word is written with one atomic store;
//! - a slot whose block keeps its shape is rewritten in place (leaf to leaf, or the linked
//!   chunk's `miss` and overlapping slots, recursively);
//! - a block whose shape changes gets a new chunk, filled completely (with its own new
//!   children) before the slot that links to it is stored; the old subtree is unlinked by that
//!   same store and its chunks are reused only after an RCU grace period, when no datapath run
//!   can still be reading them.
//!
//! When the prefixes need more chunks than the array holds, the arrays are abandoned for the
//! trie (the caller switches `IPCACHE_LENS`) until they fit again and are rebuilt.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use nodeseal_bpf_common::maps::{IpCacheEntry, IpCacheSlot, Ipv6Chunk, capacity};

use crate::{
    maps::MapError,
    shared::{Mapping, grace_period},
};

const CHUNK_SLOTS: u32 = IpCacheSlot::CHUNK_SLOTS;

/// The prefixes need more chunks than the array holds: the datapath must walk the trie.
#[derive(Debug)]
pub(crate) struct OutOfChunks;

/// What a slot must hold for the prefix set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// No prefix lies strictly inside the block: the longest prefix covering it, or empty.
    Leaf(IpCacheSlot),
    /// Prefixes lie strictly inside the block: a chunk resolving `depth..depth + 8` under
    /// `key`, answering `miss` outside `key/depth`.
    Chunk {
        depth: u8,
        key: u128,
        miss: IpCacheSlot,
    },
}

/// A chunk's identity in the layout: linked chunks with the same `(depth, key)` are updated in
/// place, others replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkPlace {
    depth: u8,
    key: u128,
}

/// What [`Ipv6Arrays::set`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SetOutcome {
    /// The arrays are in sync and were updated.
    Applied,
    /// The arrays are out of sync (the datapath walks the trie); only the model changed.
    OutOfSync,
    /// As `OutOfSync`, but enough prefixes went away since the arrays ran out of chunks that a
    /// rebuild may fit.
    MayFitAgain,
}

/// Userspace model and writer of the IPv6 arrays.
#[derive(Debug)]
pub(crate) struct Ipv6Arrays {
    chunks: Mapping,
    prefixes: PrefixSet,
    free: Vec<u32>,
    /// Unlinked chunks waiting for a grace period.
    retired: Vec<u32>,
    /// The arrays agree with `prefixes` (else the datapath must use the trie).
    in_sync: bool,
    /// Number of prefixes when the arrays last ran out of chunks: while out of sync, a rebuild
    /// is tried again once a removal brings the count 1/8 below it (a full rebuild per change
    /// would make every update as slow as a load).
    failed_at: usize,
}

impl Ipv6Arrays {
    pub(crate) fn new(chunks: Mapping) -> Result<Self, MapError> {
        let capacity = chunks.len() / Ipv6Chunk::WORDS;
        if capacity < capacity::IPCACHE6_CHUNKS as usize
            || !chunks.len().is_multiple_of(Ipv6Chunk::WORDS)
        {
            return Err(MapError::Layout {
                name: "IPCACHE6_CHUNKS",
                why: format!(
                    "{} words, not {} chunks",
                    chunks.len(),
                    capacity::IPCACHE6_CHUNKS
                ),
            });
        }
        Ok(Self {
            chunks,
            prefixes: PrefixSet::default(),
            free: Vec::new(),
            retired: Vec::new(),
            in_sync: false,
            failed_at: 0,
        })
    }

    /// Whether the datapath may read the arrays.
    pub(crate) fn in_sync(&self) -> bool {
        self.in_sync
    }

    /// Chunks in use (linked or waiting for a grace period), for tests and status.
    pub(crate) fn chunks_in_use(&self) -> usize {
        capacity::IPCACHE6_CHUNKS as usize - self.free.len() - self.retired.len()
    }

    /// Sets (`Some`) or removes (`None`) the prefix `addr/len` (`addr` with host bits clear).
    /// While in sync the arrays are updated in place; `Err` means they are not in sync (any
    /// more), and the caller must make the datapath walk the trie before [`Self::resync`].
    /// While out of sync only the model changes.
    pub(crate) fn set(
        &mut self,
        addr: u128,
        len: u8,
        entry: Option<IpCacheEntry>,
    ) -> Result<SetOutcome, OutOfChunks> {
        self.set_model(addr, len, entry);
        if !self.in_sync {
            let shrunk = self.prefixes.len() + self.prefixes.len() / 8 <= self.failed_at;
            return Ok(if entry.is_none() && shrunk {
                SetOutcome::MayFitAgain
            } else {
                SetOutcome::OutOfSync
            });
        }
        let root = ChunkPlace { depth: 0, key: 0 };
        if let Err(e) = self.sync_chunk(Ipv6Chunk::ROOT, root, addr, len) {
            self.in_sync = false;
            self.failed_at = self.prefixes.len();
            return Err(e);
        }
        Ok(SetOutcome::Applied)
    }

    /// Records the prefix `addr/len` (`Some`) or its removal (`None`) in the model only.
    pub(crate) fn set_model(&mut self, addr: u128, len: u8, entry: Option<IpCacheEntry>) {
        self.prefixes.set(addr, len, entry);
    }

    /// Makes the arrays agree with the model after the datapath stopped reading them: waits a
    /// grace period, then rewrites every chunk.
    pub(crate) fn resync(&mut self) -> Result<(), OutOfChunks> {
        self.in_sync = false;
        grace_period();
        self.retired.clear();
        // Chunk 0 is the root, never allocated.
        self.free = (1..capacity::IPCACHE6_CHUNKS).rev().collect();
        self.write_header(Ipv6Chunk::ROOT, 0, 0, IpCacheSlot::EMPTY);
        for index in 0..CHUNK_SLOTS {
            let (start, len) = slot_block(0, 0, index);
            let slot = match self.prefixes.shape(start, len) {
                Shape::Leaf(slot) => slot,
                Shape::Chunk { depth, key, miss } => match self.build_chunk(depth, key, miss) {
                    Ok(chunk) => IpCacheSlot::link(chunk),
                    Err(e) => {
                        self.failed_at = self.prefixes.len();
                        return Err(e);
                    }
                },
            };
            self.store_slot(Ipv6Chunk::ROOT, index, slot);
        }
        self.in_sync = true;
        Ok(())
    }

    /// Brings the linked chunk `chunk` at `place` up to date with a change of `addr/len`: its
    /// slots whose blocks overlap the prefix.
    fn sync_chunk(
        &mut self,
        chunk: u32,
        place: ChunkPlace,
        addr: u128,
        len: u8,
    ) -> Result<(), OutOfChunks> {
        let ChunkPlace { depth, key } = place;
        if (addr ^ key) & mask(len.min(depth)) != 0 {
            return Ok(());
        }
        let (first, count) = if len <= depth {
            (0, CHUNK_SLOTS)
        } else {
            let first = slot_of(depth, addr);
            let count = 1u32 << (depth + 8).saturating_sub(len).min(8);
            (first, count)
        };
        for index in first..first + count {
            self.sync_slot(chunk, index, place, addr, len)?;
        }
        Ok(())
    }

    /// Rewrites slot `index` of `chunk` (at `place`) for a change of `addr/len` inside its
    /// block: in place while its shape stays, else with a new subtree.
    fn sync_slot(
        &mut self,
        chunk: u32,
        index: u32,
        place: ChunkPlace,
        addr: u128,
        len: u8,
    ) -> Result<(), OutOfChunks> {
        let current = self.load_slot(chunk, index);
        let (start, block_len) = slot_block(place.depth, place.key, index);
        match self.prefixes.shape(start, block_len) {
            Shape::Leaf(slot) => {
                if current != slot {
                    self.store_slot(chunk, index, slot);
                    if let Some(old) = current.chunk() {
                        self.retire(old);
                    }
                }
            }
            Shape::Chunk { depth, key, miss } => {
                let wanted = ChunkPlace { depth, key };
                if let Some(child) = current.chunk()
                    && self.place_of(child) == wanted
                {
                    // Same shape: the addresses outside `key/depth` change answer with one
                    // store, then the slots the prefix overlaps.
                    self.store_word(child, Ipv6Chunk::WORD_MISS, miss.0);
                    return self.sync_chunk(child, wanted, addr, len);
                }
                let new = self.build_chunk(depth, key, miss)?;
                self.store_slot(chunk, index, IpCacheSlot::link(new));
                if let Some(old) = current.chunk() {
                    self.retire(old);
                }
            }
        }
        Ok(())
    }

    /// A new, unlinked chunk (and its subtree) for `key/depth` from the model.
    fn build_chunk(&mut self, depth: u8, key: u128, miss: IpCacheSlot) -> Result<u32, OutOfChunks> {
        let chunk = self.alloc()?;
        self.write_header(chunk, depth, key, miss);
        for index in 0..CHUNK_SLOTS {
            let (start, len) = slot_block(depth, key, index);
            let slot = match self.prefixes.shape(start, len) {
                Shape::Leaf(slot) => slot,
                Shape::Chunk { depth, key, miss } => {
                    IpCacheSlot::link(self.build_chunk(depth, key, miss)?)
                }
            };
            self.store_slot(chunk, index, slot);
        }
        Ok(chunk)
    }

    /// Queues the unlinked subtree under `chunk` for reuse after a grace period.
    fn retire(&mut self, chunk: u32) {
        let mut pending = vec![chunk];
        while let Some(chunk) = pending.pop() {
            self.retired.push(chunk);
            for index in 0..CHUNK_SLOTS {
                if let Some(child) = self.load_slot(chunk, index).chunk() {
                    pending.push(child);
                }
            }
        }
    }

    fn alloc(&mut self) -> Result<u32, OutOfChunks> {
        if self.free.is_empty() && !self.retired.is_empty() {
            grace_period();
            self.free.append(&mut self.retired);
        }
        self.free.pop().ok_or(OutOfChunks)
    }

    fn place_of(&self, chunk: u32) -> ChunkPlace {
        let hi = self.load_word(chunk, Ipv6Chunk::WORD_KEY_HI);
        let lo = self.load_word(chunk, Ipv6Chunk::WORD_KEY_LO);
        let depth = self.load_word(chunk, Ipv6Chunk::WORD_DEPTH);
        ChunkPlace {
            depth: u8::try_from(depth).unwrap_or(u8::MAX),
            key: u128::from(hi) << 64 | u128::from(lo),
        }
    }

    fn write_header(&self, chunk: u32, depth: u8, key: u128, miss: IpCacheSlot) {
        let mask = mask(depth);
        for (word, value) in [
            (Ipv6Chunk::WORD_KEY_HI, (key >> 64) as u64),
            (Ipv6Chunk::WORD_KEY_LO, key as u64),
            (Ipv6Chunk::WORD_MASK_HI, (mask >> 64) as u64),
            (Ipv6Chunk::WORD_MASK_LO, mask as u64),
            (Ipv6Chunk::WORD_DEPTH, u64::from(depth)),
            (Ipv6Chunk::WORD_MISS, miss.0),
        ] {
            self.store_word(chunk, word, value);
        }
    }

    fn load_word(&self, chunk: u32, word: usize) -> u64 {
        self.chunks.load(chunk as usize * Ipv6Chunk::WORDS + word)
    }

    fn store_word(&self, chunk: u32, word: usize, value: u64) {
        if self.load_word(chunk, word) != value {
            self.chunks
                .store(chunk as usize * Ipv6Chunk::WORDS + word, value);
        }
    }

    fn load_slot(&self, chunk: u32, index: u32) -> IpCacheSlot {
        IpCacheSlot(self.load_word(chunk, Ipv6Chunk::WORD_SLOTS + index as usize))
    }

    fn store_slot(&self, chunk: u32, index: u32, slot: IpCacheSlot) {
        self.store_word(chunk, Ipv6Chunk::WORD_SLOTS + index as usize, slot.0);
    }
}

/// The IPv6 prefixes, indexed for the questions the layout asks.
#[derive(Debug, Default)]
struct PrefixSet {
    /// Every IPv6 prefix: (network address, length) → entry.
    entries: HashMap<(u128, u8), IpCacheEntry>,
    /// Network addresses per present prefix length: the range queries that find the prefixes
    /// inside a block, and the lengths to try when resolving one.
    by_len: BTreeMap<u8, BTreeSet<u128>>,
}

impl PrefixSet {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn set(&mut self, addr: u128, len: u8, entry: Option<IpCacheEntry>) {
        match entry {
            Some(e) => {
                if self.entries.insert((addr, len), e).is_none() {
                    self.by_len.entry(len).or_default().insert(addr);
                }
            }
            None => {
                if self.entries.remove(&(addr, len)).is_some()
                    && let Some(set) = self.by_len.get_mut(&len)
                {
                    set.remove(&addr);
                    if set.is_empty() {
                        self.by_len.remove(&len);
                    }
                }
            }
        }
    }

    /// What the slot for the block `start/len` must hold.
    fn shape(&self, start: u128, len: u8) -> Shape {
        let end = start | !mask(len);
        let mut inner: Option<(u8, u128, u128)> = None;
        for (&l, addrs) in self.by_len.range(len + 1..) {
            let mut found = addrs.range(start..=end);
            let Some(&first) = found.next() else {
                continue;
            };
            let last = found.next_back().copied().unwrap_or(first);
            inner = Some(match inner {
                None => (l, first, last),
                Some((min_len, lo, hi)) => (min_len.min(l), lo.min(first), hi.max(last)),
            });
        }
        let Some((min_len, lo, hi)) = inner else {
            return Shape::Leaf(self.leaf(start, len));
        };
        // Longest common prefix of the inner prefixes (as bit strings): at least `len`, as they
        // all lie inside the block. Rounded down to a stride, the chunk's depth is at least
        // `len` and every inner prefix is at least that long, so the chunk holds them all; the
        // last stride (120) takes the /128s.
        let common = u8::try_from((lo ^ hi).leading_zeros())
            .unwrap_or(128)
            .min(min_len);
        let depth = (common / 8 * 8).min(120);
        Shape::Chunk {
            depth,
            key: lo & mask(depth),
            miss: self.leaf(start, len),
        }
    }

    /// The longest prefix of length <= `len` covering the block `start/len`.
    fn leaf(&self, start: u128, len: u8) -> IpCacheSlot {
        for (&l, addrs) in self.by_len.range(..=len).rev() {
            let network = start & mask(l);
            if addrs.contains(&network)
                && let Some(entry) = self.entries.get(&(network, l))
            {
                return IpCacheSlot::leaf(*entry);
            }
        }
        IpCacheSlot::EMPTY
    }
}

/// The top `len` bits set.
fn mask(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// The block `(start, len)` of slot `index` of a chunk at `key/depth`.
fn slot_block(depth: u8, key: u128, index: u32) -> (u128, u8) {
    let shift = 120 - u32::from(depth);
    (key | u128::from(index) << shift, depth + 8)
}

/// The slot of `addr` in a chunk of `depth`, as the datapath computes it.
fn slot_of(depth: u8, addr: u128) -> u32 {
    Ipv6Chunk::slot_index(u64::from(depth), (addr >> 64) as u64, addr as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: u128 = 0xfd00_0010_0244u128 << 80;

    fn entry(identity: u32) -> Option<IpCacheEntry> {
        Some(IpCacheEntry {
            identity,
            ..IpCacheEntry::default()
        })
    }

    fn leaf(identity: u32) -> IpCacheSlot {
        IpCacheSlot::leaf(IpCacheEntry {
            identity,
            ..IpCacheEntry::default()
        })
    }

    /// The block of the root slot holding `fd00::/8`.
    fn fd_block() -> (u128, u8) {
        (0xfdu128 << 120, 8)
    }

    #[test]
    fn a_block_without_inner_prefixes_is_the_longest_covering_prefix() {
        let mut set = PrefixSet::default();
        let (start, len) = fd_block();
        assert_eq!(set.shape(start, len), Shape::Leaf(IpCacheSlot::EMPTY));
        set.set(0, 0, entry(1));
        set.set(0xfcu128 << 120, 7, entry(2));
        assert_eq!(set.shape(start, len), Shape::Leaf(leaf(2)));
        set.set(0xfcu128 << 120, 7, None);
        assert_eq!(set.shape(start, len), Shape::Leaf(leaf(1)));
    }

    #[test]
    fn chunks_skip_to_where_the_inner_prefixes_branch() {
        let mut set = PrefixSet::default();
        let (start, len) = fd_block();
        set.set(0, 0, entry(1));
        // A lone /64: one chunk at its own depth, whose slots are all that /64.
        set.set(PODS | 5 << 64, 64, entry(2));
        let lone = Shape::Chunk {
            depth: 64,
            key: PODS | 5 << 64,
            miss: leaf(1),
        };
        assert_eq!(set.shape(start, len), lone);
        // Two /64s differing in bit 61: the chunk resolves bits 56..64.
        set.set(PODS | 6 << 64, 64, entry(3));
        let pair = Shape::Chunk {
            depth: 56,
            key: PODS,
            miss: leaf(1),
        };
        assert_eq!(set.shape(start, len), pair);
        // A /52 above them: no inner prefix may be shorter than the chunk's depth.
        set.set(PODS, 52, entry(4));
        let capped = Shape::Chunk {
            depth: 48,
            key: PODS,
            miss: leaf(1),
        };
        assert_eq!(set.shape(start, len), capped);
        // Inside the /52's /56 block, the /64s again.
        assert_eq!(set.shape(PODS, 56), pair_below(leaf(4)));
    }

    fn pair_below(miss: IpCacheSlot) -> Shape {
        Shape::Chunk {
            depth: 56,
            key: PODS,
            miss,
        }
    }

    #[test]
    fn a_lone_host_route_takes_the_last_stride() {
        let mut set = PrefixSet::default();
        let host = PODS | 5 << 64 | 9;
        set.set(host, 128, entry(7));
        let (start, len) = fd_block();
        let want = Shape::Chunk {
            depth: 120,
            key: host & mask(120),
            miss: IpCacheSlot::EMPTY,
        };
        assert_eq!(set.shape(start, len), want);
        assert_eq!(set.shape(host, 128), Shape::Leaf(leaf(7)));
    }

    #[test]
    fn slot_blocks_and_indexes_agree() {
        let addr: u128 = 0xfd00_0010_0244_1388_0000_0000_0000_0009;
        for depth in (0..=120u8).step_by(8) {
            let index = slot_of(depth, addr);
            let (start, len) = slot_block(depth, addr & mask(depth), index);
            assert_eq!(len, depth + 8);
            assert_eq!(start, addr & mask(len), "depth {depth}");
        }
    }
}
