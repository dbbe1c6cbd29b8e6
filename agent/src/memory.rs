//! How the agent process spends memory on its allocator and runtime threads, set once at start,
//! before any thread exists (issue 16: the agent's peak RSS, which is what a DaemonSet's memory
//! limit has to cover on every node).
//!
//! Measured on the agent bench (`cargo xtask bench agent`, 2 vCPUs, 1000 peers): before these
//! settings 17 MiB of the agent's 29 MiB of anonymous memory sat in nine glibc arenas beside an
//! 11 MiB main heap. What this module sets, and why each trade-off is worth it:
//!
//! - glibc gives each thread that allocates an arena of its own, up to 8 per core. Memory
//!   freed in one arena is never reused by another, and an arena returns memory to the kernel
//!   only from its top, so each one keeps a high-water mark of its own. The agent's threads
//!   (runtime workers, blocking pool, the netlink workers) all allocate, and contention on one
//!   lock is no cost at the agent's allocation rate (handshakes, netlink batches).
//! - glibc raises its mmap threshold to the size of any mmapped block freed, up to 32 MiB,
//!   after which blocks of that size come from an arena and stay there after being freed.
//!   The agent's occasional big buffers (the policy table's layout, a store snapshot, status
//!   documents) would then raise the heap's high-water mark for good; a fixed threshold keeps
//!   them mapped and unmapped on free.
//! - The runtime keeps the default worker count (one per core): handshakes are CPU-bound and
//!   convergence time is what the other half of issue 16 measures, while all thread stacks
//!   together were about 250 KiB resident.

/// At most this many glibc malloc arenas (`M_ARENA_MAX`); the default is 8 per core.
pub const MALLOC_ARENAS: i32 = 1;

/// Allocations of at least this many bytes are mapped on their own and unmapped when freed
/// (`M_MMAP_THRESHOLD`); setting it also stops glibc from raising it (the default starts at
/// 128 KiB and grows with every mapped block freed).
pub const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Sets the allocator's limits. Call it first in `main`, before any thread is spawned (the
/// arena limit applies to threads that have not allocated yet).
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes plain integers and only changes allocator parameters; glibc
        // serialises it against concurrent allocation.
        let arenas = unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
        // SAFETY: as above.
        let threshold = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        if arenas != 1 || threshold != 1 {
            // Before logging is set up; the agent works either way, only with more memory.
            eprintln!(
                "nodeseal-agent: mallopt refused (arena limit {arenas}, mmap threshold {threshold})"
            );
        }
    }
}
