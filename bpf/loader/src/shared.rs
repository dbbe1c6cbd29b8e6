//! Array maps shared with the datapath through a memory mapping (`BPF_F_MMAPABLE`), written with
//! atomic stores, and the RCU grace period after which data the datapath stopped referring to
//! may be reused.
//!
//! Why: the verifier inlines array lookups, so the datapath's hot structures (ipcache arrays,
//! policy table, endpoint array) are arrays, not hash maps. An array slot written through the
//! `bpf()` syscall is copied with `memcpy`, which does not promise a reader an all-old or all-new
//! value; an aligned 8-byte atomic store through the mapping does, and it costs no syscall.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Map, MapData};
use nodeseal_bpf_common::maps::MAP_FLAG_MMAPABLE;

use crate::maps::MapError;

/// `MEMBARRIER_CMD_GLOBAL` (uapi `linux/membarrier.h`): returns after an RCU grace period.
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// How long to wait instead when the kernel refuses `membarrier(MEMBARRIER_CMD_GLOBAL)` (kernels
/// with `nohz_full` CPUs do). A tc program cannot sleep and runs with bottom halves disabled;
/// its length is bounded by the verifier, so a run ends within microseconds, far inside this.
/// (Not a guarantee on PREEMPT_RT kernels, where softirqs can be preempted.)
const GRACE_FALLBACK: std::time::Duration = std::time::Duration::from_millis(100);

/// Waits until every eBPF program run that started before the call has finished.
///
/// tc programs (and `BPF_PROG_TEST_RUN`) run inside RCU read-side critical sections, and
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for an RCU grace period (`synchronize_rcu`), so
/// after it no program still holds a pointer it read before the call. Takes milliseconds.
pub(crate) fn grace_period() {
    // SAFETY: membarrier takes no pointers; the flags argument must be 0.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        static WARNED: std::sync::Once = std::sync::Once::new();
        let error = std::io::Error::last_os_error();
        WARNED.call_once(|| {
            tracing::warn!(
                %error,
                "membarrier(MEMBARRIER_CMD_GLOBAL) refused (nohz_full?): waiting {GRACE_FALLBACK:?} \
                 instead of an RCU grace period before reusing datapath memory"
            );
        });
        std::thread::sleep(GRACE_FALLBACK);
    }
}

/// An mmapable array map, not mapped yet: [`SharedArray::map`] maps it. Big arrays that are
/// written rarely are mapped only while they are written, because a mapping of a BPF array is
/// populated at once and counts in the process's RSS.
pub(crate) struct SharedArray {
    name: &'static str,
    map: MapData,
    /// Size in `u64` words.
    len: usize,
}

impl std::fmt::Debug for SharedArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedArray")
            .field("name", &self.name)
            .field("words", &self.len)
            .finish_non_exhaustive()
    }
}

impl SharedArray {
    /// Checks that `map` is an mmapable array whose values are `value_size` bytes.
    pub(crate) fn open(map: Map, name: &'static str, value_size: u32) -> Result<Self, MapError> {
        let Map::Array(map) = map else {
            return Err(MapError::Layout {
                name,
                why: "not an array map".to_owned(),
            });
        };
        let info = map.info().map_err(|source| MapError::Kernel {
            op: "info",
            name,
            source,
        })?;
        if info.map_flags() & MAP_FLAG_MMAPABLE == 0 {
            return Err(MapError::Layout {
                name,
                why: "not created mmapable (pinned by an older loader? remove the pin)".to_owned(),
            });
        }
        if info.value_size() != value_size || !value_size.is_multiple_of(8) {
            return Err(MapError::Layout {
                name,
                why: format!(
                    "values are {} bytes, expected {value_size}",
                    info.value_size()
                ),
            });
        }
        let len = info.max_entries() as usize * (value_size as usize / 8);
        Ok(Self { name, map, len })
    }

    /// Size in `u64` words.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Maps the whole array into memory.
    pub(crate) fn map(&self) -> Result<Mapping, MapError> {
        let name = self.name;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let mapped_bytes = (self.len * 8).div_ceil(page) * page;
        // SAFETY: a new shared mapping of the map's fd; the kernel checks size and offset.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MapError::Mmap {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        let words = NonNull::new(ptr.cast::<AtomicU64>()).ok_or(MapError::Mmap {
            name,
            source: std::io::Error::other("mmap returned NULL"),
        })?;
        Ok(Mapping {
            name,
            words,
            len: self.len,
            mapped_bytes,
        })
    }
}

/// A shared mapping of an array map as `u64` words. The mapping holds its own reference to the
/// map, so it stays valid after the map's fd is closed.
pub(crate) struct Mapping {
    name: &'static str,
    words: NonNull<AtomicU64>,
    len: usize,
    mapped_bytes: usize,
}

// SAFETY: the mapping is only accessed through atomics; the pointer is owned by this value.
unsafe impl Send for Mapping {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for Mapping {}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("name", &self.name)
            .field("words", &self.len)
            .finish_non_exhaustive()
    }
}

impl Mapping {
    /// Opens and maps `map` for good (see [`SharedArray::open`]).
    pub(crate) fn open(map: Map, name: &'static str, value_size: u32) -> Result<Self, MapError> {
        SharedArray::open(map, name, value_size)?.map()
    }

    /// Number of `u64` words.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        assert!(
            index < self.len,
            "BUG: word {index} outside map {}",
            self.name
        );
        // SAFETY: in bounds (checked above) of a live mapping of `len` 8-byte aligned words
        // (the kernel maps array values page-aligned, and each value is a multiple of 8 bytes).
        unsafe { self.words.add(index).as_ref() }
    }

    /// Reads word `index`.
    pub(crate) fn load(&self, index: usize) -> u64 {
        self.word(index).load(Ordering::Acquire)
    }

    /// Writes word `index` in one store: the datapath reads the old or the new value. Release
    /// ordering: whatever was written before (a chunk a link points to) is visible first.
    pub(crate) fn store(&self, index: usize, value: u64) {
        self.word(index).store(value, Ordering::Release);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `SharedArray::map`; no reference into it
        // outlives self.
        unsafe {
            libc::munmap(self.words.as_ptr().cast(), self.mapped_bytes);
        }
    }
}
