//! The IPv4 ipcache arrays (`IPCACHE4_L1`, `IPCACHE4_CHUNKS`): a 16/8/8 multibit trie built from
//! the prefixes of the `IPCACHE_V4` LPM trie, which stays authoritative (see `IpCacheSlot` for
//! the layout).
//!
//! Update protocol, so a reader racing an update finds the old or the new answer for its
//! address and never garbage:
//! - every slot is written with one atomic store;
//! - a chunk is filled completely before the slot that links to it is stored;
//! - a chunk that is unlinked is only reused after an RCU grace period, when no datapath run
//!   can still be reading it.
//!
//! When the prefixes need more chunks than the array holds, the arrays are abandoned for the
//! trie (the caller switches `IPCACHE_LENS`) until they fit again and are rebuilt.

use std::collections::HashMap;

use nodeseal_bpf_common::maps::{IpCacheEntry, IpCacheSlot, capacity};

use crate::{
    maps::MapError,
    shared::{Mapping, grace_period},
};

const CHUNK_SLOTS: u32 = IpCacheSlot::CHUNK_SLOTS;

/// Userspace model and writer of the arrays.
#[derive(Debug)]
pub(crate) struct Ipv4Arrays {
    l1: Mapping,
    chunks: Mapping,
    /// Every IPv4 prefix: (network address, length) → entry.
    prefixes: HashMap<(u32, u8), IpCacheEntry>,
    /// Prefixes per length, to skip absent lengths when resolving a block.
    per_len: [u32; 33],
    /// /16 (top 16 bits) → prefixes longer than /16 inside it.
    deep16: HashMap<u32, u32>,
    /// /24 (top 24 bits) → prefixes longer than /24 inside it.
    deep24: HashMap<u32, u32>,
    /// Chunk of the second level of each /16 that has one.
    l2: HashMap<u32, u32>,
    /// Chunk of the third level of each /24 that has one.
    l3: HashMap<u32, u32>,
    free: Vec<u32>,
    /// Unlinked chunks waiting for a grace period.
    retired: Vec<u32>,
    /// The arrays agree with `prefixes` (else the datapath must use the trie).
    in_sync: bool,
}

/// The prefixes need more chunks than the arrays hold: the datapath must walk the trie.
#[derive(Debug)]
pub(crate) struct OutOfChunks;

impl Ipv4Arrays {
    pub(crate) fn new(l1: Mapping, chunks: Mapping) -> Result<Self, MapError> {
        let capacity = u32::try_from(chunks.len() / CHUNK_SLOTS as usize).unwrap_or(0);
        if l1.len() != IpCacheSlot::L1_SLOTS as usize || capacity < capacity::IPCACHE4_CHUNKS {
            return Err(MapError::Layout {
                name: "IPCACHE4_CHUNKS",
                why: format!("{} level-1 slots and {capacity} chunks", l1.len()),
            });
        }
        Ok(Self {
            l1,
            chunks,
            prefixes: HashMap::new(),
            per_len: [0; 33],
            deep16: HashMap::new(),
            deep24: HashMap::new(),
            l2: HashMap::new(),
            l3: HashMap::new(),
            free: (0..capacity::IPCACHE4_CHUNKS).rev().collect(),
            retired: Vec::new(),
            in_sync: false,
        })
    }

    /// Whether the datapath may read the arrays.
    pub(crate) fn in_sync(&self) -> bool {
        self.in_sync
    }

    /// Sets (`Some`) or removes (`None`) the prefix `addr/len` (`addr` with host bits clear).
    /// The arrays are updated in place while in sync, rebuilt if they were not and now fit;
    /// `Err` means they are not in sync.
    pub(crate) fn set(
        &mut self,
        addr: u32,
        len: u8,
        entry: Option<IpCacheEntry>,
    ) -> Result<(), OutOfChunks> {
        self.set_model(addr, len, entry);
        if !self.in_sync {
            if self.needed_chunks() > capacity::IPCACHE4_CHUNKS as usize {
                return Err(OutOfChunks);
            }
            return self.resync();
        }
        if self.needed_chunks() > capacity::IPCACHE4_CHUNKS as usize {
            self.in_sync = false;
            return Err(OutOfChunks);
        }
        let result = self.refresh(addr, len);
        if result.is_err() {
            self.in_sync = false;
        }
        result
    }

    /// Records the prefix `addr/len` (`Some`) or its removal (`None`) in the model only.
    pub(crate) fn set_model(&mut self, addr: u32, len: u8, entry: Option<IpCacheEntry>) {
        let existed = match entry {
            Some(e) => self.prefixes.insert((addr, len), e).is_some(),
            None => self.prefixes.remove(&(addr, len)).is_some(),
        };
        let delta: i64 = match (existed, entry.is_some()) {
            (false, true) => 1,
            (true, false) => -1,
            _ => 0,
        };
        if delta != 0 {
            self.count(addr, len, delta);
        }
    }

    /// Rewrites every slot from the model. Only call while the datapath does not read the
    /// arrays (it walks the trie), and after a grace period since it stopped: it frees every
    /// chunk at once.
    fn rebuild(&mut self) -> Result<(), OutOfChunks> {
        if self.needed_chunks() > capacity::IPCACHE4_CHUNKS as usize {
            return Err(OutOfChunks);
        }
        self.l2.clear();
        self.l3.clear();
        self.retired.clear();
        self.free = (0..capacity::IPCACHE4_CHUNKS).rev().collect();
        for block in 0..IpCacheSlot::L1_SLOTS {
            self.write_l1(block)?;
        }
        self.in_sync = true;
        Ok(())
    }

    /// Makes the arrays agree with the model after the datapath stopped reading them: waits a
    /// grace period, then rebuilds.
    pub(crate) fn resync(&mut self) -> Result<(), OutOfChunks> {
        self.in_sync = false;
        grace_period();
        self.rebuild()
    }

    fn count(&mut self, addr: u32, len: u8, delta: i64) {
        let bump = |count: &mut u32| {
            *count = u32::try_from(i64::from(*count) + delta).unwrap_or(0);
        };
        if let Some(c) = self.per_len.get_mut(usize::from(len)) {
            bump(c);
        }
        if len > 16 {
            bump(self.deep16.entry(addr >> 16).or_insert(0));
            if self.deep16.get(&(addr >> 16)) == Some(&0) {
                self.deep16.remove(&(addr >> 16));
            }
        }
        if len > 24 {
            bump(self.deep24.entry(addr >> 8).or_insert(0));
            if self.deep24.get(&(addr >> 8)) == Some(&0) {
                self.deep24.remove(&(addr >> 8));
            }
        }
    }

    fn needed_chunks(&self) -> usize {
        self.deep16.len() + self.deep24.len()
    }

    /// Rewrites the slots whose blocks overlap `addr/len`.
    fn refresh(&mut self, addr: u32, len: u8) -> Result<(), OutOfChunks> {
        let block16 = addr >> 16;
        if len <= 16 {
            let count = 1u32 << (16 - u32::from(len));
            for block in block16..block16 + count {
                self.write_l1(block)?;
            }
            return Ok(());
        }
        // A /16 gaining its first or losing its last longer prefix changes shape.
        let Some(&l2) = self.l2.get(&block16) else {
            return self.write_l1(block16);
        };
        if !self.deep16.contains_key(&block16) {
            return self.write_l1(block16);
        }
        let block24 = addr >> 8;
        if len <= 24 {
            let count = 1u32 << (24 - u32::from(len));
            for block in block24..block24 + count {
                self.write_l2(l2, block)?;
            }
            return Ok(());
        }
        let Some(&l3) = self.l3.get(&block24) else {
            return self.write_l2(l2, block24);
        };
        if !self.deep24.contains_key(&block24) {
            return self.write_l2(l2, block24);
        }
        let first = addr & 0xff;
        for low in first..first + (1u32 << (32 - u32::from(len))) {
            self.store_chunk(l3, low, self.leaf(block24 << 8 | low, 32));
        }
        Ok(())
    }

    /// Rewrites the level-1 slot of `block` (a /16), with its whole subtree.
    fn write_l1(&mut self, block: u32) -> Result<(), OutOfChunks> {
        let current = self.l2.get(&block).copied();
        if !self.deep16.contains_key(&block) {
            self.l1.store(block as usize, self.leaf(block << 16, 16).0);
            if let Some(chunk) = current {
                self.l2.remove(&block);
                self.retired.push(chunk);
                for sub in 0..CHUNK_SLOTS {
                    if let Some(l3) = self.l3.remove(&(block << 8 | sub)) {
                        self.retired.push(l3);
                    }
                }
            }
            return Ok(());
        }
        let chunk = match current {
            Some(chunk) => chunk,
            None => self.alloc()?,
        };
        for sub in 0..CHUNK_SLOTS {
            self.write_l2(chunk, block << 8 | sub)?;
        }
        if current.is_none() {
            self.l2.insert(block, chunk);
            self.l1.store(block as usize, IpCacheSlot::link(chunk).0);
        }
        Ok(())
    }

    /// Rewrites the slot of `block` (a /24) in level-2 chunk `l2`, with its third level.
    fn write_l2(&mut self, l2: u32, block: u32) -> Result<(), OutOfChunks> {
        let current = self.l3.get(&block).copied();
        if !self.deep24.contains_key(&block) {
            self.store_chunk(l2, block & 0xff, self.leaf(block << 8, 24));
            if let Some(chunk) = current {
                self.l3.remove(&block);
                self.retired.push(chunk);
            }
            return Ok(());
        }
        let chunk = match current {
            Some(chunk) => chunk,
            None => self.alloc()?,
        };
        for low in 0..CHUNK_SLOTS {
            self.store_chunk(chunk, low, self.leaf(block << 8 | low, 32));
        }
        if current.is_none() {
            self.l3.insert(block, chunk);
            self.store_chunk(l2, block & 0xff, IpCacheSlot::link(chunk));
        }
        Ok(())
    }

    fn store_chunk(&self, chunk: u32, index: u32, slot: IpCacheSlot) {
        self.chunks
            .store((chunk * CHUNK_SLOTS + index) as usize, slot.0);
    }

    /// The longest prefix of length <= `len` containing `addr`'s `/len` block.
    fn leaf(&self, addr: u32, len: u8) -> IpCacheSlot {
        for l in (0..=len).rev() {
            if self.per_len[usize::from(l)] == 0 {
                continue;
            }
            let mask = u32::MAX.checked_shl(32 - u32::from(l)).unwrap_or(0);
            if let Some(entry) = self.prefixes.get(&(addr & mask, l)) {
                return IpCacheSlot::leaf(*entry);
            }
        }
        IpCacheSlot::EMPTY
    }

    fn alloc(&mut self) -> Result<u32, OutOfChunks> {
        if self.free.is_empty() && !self.retired.is_empty() {
            grace_period();
            self.free.append(&mut self.retired);
        }
        self.free.pop().ok_or(OutOfChunks)
    }
}
