//! Loading the eBPF object and pinning its maps.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    programs::{ProgramError, SchedClassifier},
};
use nodeseal_bpf_common::{map_names, program_names};

use crate::{
    events::EventReader,
    maps::{
        ClearPorts, ConfigMap, DropCounters, Endpoints, IpCache, IpCacheMaps, MapError, Nodes,
        PeerSlots, PolicyVerdicts,
    },
    policy::Policy,
};

/// Where the agent pins maps and links.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/nodeseal";

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeseal-datapath"));

/// Errors of [`Datapath::load`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The pin root could not be created.
    #[error("creating pin directory {path}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The object could not be loaded (maps created or reused, relocations).
    #[error("loading the eBPF object")]
    Object {
        /// Cause.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program is missing from the object (a build mismatch: our bug).
    #[error("BUG: program {name} is not in the eBPF object")]
    MissingProgram {
        /// Program name.
        name: &'static str,
    },
    /// The kernel (verifier) rejected a program.
    #[error("loading program {name} into the kernel")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause (carries the verifier log).
        #[source]
        source: ProgramError,
    },
    /// A map could not be opened with its typed wrapper.
    #[error("opening map")]
    Map(#[from] MapError),
    /// Another live `Datapath` (another agent, most likely) owns the pin root. Two writers
    /// would undo each other's map layouts.
    #[error("pin directory {path} is in use by another process (is another agent running?)")]
    PinDirInUse {
        /// The directory.
        path: PathBuf,
    },
    /// The pin root could not be locked.
    #[error("locking pin directory {path}")]
    PinDirLock {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The programs in the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Program {
    /// tc ingress on the host side of a pod veth.
    FromPod,
    /// tc ingress on the node's uplink.
    FromNetwork,
    /// tc egress on the host side of a pod veth.
    ToPod,
    /// Pass-through baseline (benchmarks).
    Pass,
}

impl Program {
    /// Every program.
    pub const ALL: [Self; 4] = [Self::FromPod, Self::FromNetwork, Self::ToPod, Self::Pass];

    /// The program's name in the object.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::FromPod => program_names::FROM_POD,
            Self::FromNetwork => program_names::FROM_NETWORK,
            Self::ToPod => program_names::TO_POD,
            Self::Pass => program_names::PASS,
        }
    }
}

/// The loaded datapath: programs verified and loaded, maps pinned, typed map handles.
pub struct Datapath {
    pub(crate) ebpf: Ebpf,
    pub(crate) pin_root: PathBuf,
    /// Holds the exclusive `flock` on the pin root (none for test-only program runners).
    _pin_lock: Option<std::fs::File>,
    /// The ipcache maps.
    pub ipcache: IpCache,
    /// `NODES`.
    pub nodes: Nodes,
    /// `CLEAR_PORTS`.
    pub clear_ports: ClearPorts,
    /// `PEER_SLOTS`.
    pub peer_slots: PeerSlots,
    /// `ENDPOINTS`.
    pub endpoints: Endpoints,
    /// `POLICY_TABLE` and `POLICY_HEADER`.
    pub policy: Policy,
    /// `CONFIG`.
    pub config: ConfigMap,
    /// `DROP_COUNTERS`.
    pub counters: DropCounters,
    /// `POLICY_VERDICTS`.
    pub policy_verdicts: PolicyVerdicts,
    /// `EVENTS`.
    pub events: EventReader,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_root", &self.pin_root)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads every program (the kernel verifies each) and opens the maps pinned under
    /// `pin_root`, creating and pinning the ones that do not exist yet. Holds an exclusive lock
    /// on `pin_root` for as long as the `Datapath` lives: one writer per pin root.
    ///
    /// Needs `CAP_BPF` (root) and a bpffs at or above `pin_root`.
    ///
    /// # Errors
    ///
    /// [`LoadError`] naming the step that failed; a verifier rejection is
    /// [`LoadError::Program`] and carries the verifier log; [`LoadError::PinDirInUse`] while
    /// another process (or another `Datapath` of this one) holds the pin root.
    pub fn load(pin_root: impl AsRef<Path>) -> Result<Self, LoadError> {
        Self::load_with(pin_root.as_ref(), true)
    }

    /// [`Datapath::load`], optionally without the pin-root lock: only for handles that run
    /// programs and never write maps (tests racing a writer).
    pub(crate) fn load_with(pin_root: &Path, exclusive: bool) -> Result<Self, LoadError> {
        let pin_root = pin_root.to_path_buf();
        std::fs::create_dir_all(&pin_root).map_err(|source| LoadError::PinDir {
            path: pin_root.clone(),
            source,
        })?;
        let pin_lock = if exclusive {
            Some(lock_pin_root(&pin_root)?)
        } else {
            None
        };
        let mut ebpf = EbpfLoader::new()
            // No kernel BTF: it is only the target of CO-RE relocations, which our programs
            // have none of (`the_object_needs_no_kernel_btf`). aya's `new()` has already read
            // and parsed all of /sys/kernel/btf/vmlinux by now (about 14 MiB resident on
            // Debian's 6.12: the agent's peak RSS with few peers, issue 16); dropping it here
            // at least frees it before the object is parsed and loaded rather than after.
            // Avoiding it altogether needs a loader that does not read it eagerly.
            .btf(None)
            .default_map_pin_directory(&pin_root)
            .load(OBJECT)
            .map_err(|source| LoadError::Object {
                source: Box::new(source),
            })?;
        remove_obsolete_pins(&pin_root);
        for program in Program::ALL {
            let name = program.name();
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(LoadError::MissingProgram { name })?
                .try_into()
                .map_err(|source| LoadError::Program { name, source })?;
            prog.load()
                .map_err(|source| LoadError::Program { name, source })?;
        }
        let ipcache = IpCache::new(IpCacheMaps {
            v4: take(&mut ebpf, map_names::IPCACHE_V4)?,
            v6: take(&mut ebpf, map_names::IPCACHE_V6)?,
            l1_v4: take(&mut ebpf, map_names::IPCACHE4_L1)?,
            chunks_v4: take(&mut ebpf, map_names::IPCACHE4_CHUNKS)?,
            chunks_v6: take(&mut ebpf, map_names::IPCACHE6_CHUNKS)?,
            lens: take(&mut ebpf, map_names::IPCACHE_LENS)?,
        })?;
        let nodes = Nodes::new(take(&mut ebpf, map_names::NODES)?)?;
        let clear_ports = ClearPorts::new(take(&mut ebpf, map_names::CLEAR_PORTS)?)?;
        let peer_slots = PeerSlots::new(take(&mut ebpf, map_names::PEER_SLOTS)?)?;
        let endpoints = Endpoints::new(
            take(&mut ebpf, map_names::ENDPOINTS)?,
            take(&mut ebpf, map_names::ENDPOINTS_BY_IFINDEX)?,
        )?;
        let policy = Policy::new(
            take(&mut ebpf, map_names::POLICY_TABLE)?,
            take(&mut ebpf, map_names::POLICY_HEADER)?,
        )?;
        let config = ConfigMap::new(take(&mut ebpf, map_names::CONFIG)?)?;
        let counters = DropCounters::new(take(&mut ebpf, map_names::DROP_COUNTERS)?)?;
        let policy_verdicts = PolicyVerdicts::new(take(&mut ebpf, map_names::POLICY_VERDICTS)?)?;
        let events = EventReader::new(take(&mut ebpf, map_names::EVENTS)?)?;
        tracing::debug!(pin_root = %pin_root.display(), "loaded eBPF datapath");
        Ok(Self {
            ebpf,
            pin_root,
            _pin_lock: pin_lock,
            ipcache,
            nodes,
            clear_ports,
            peer_slots,
            endpoints,
            policy,
            config,
            counters,
            policy_verdicts,
            events,
        })
    }

    /// The pin root this datapath uses.
    #[must_use]
    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    /// The loaded program (for `BPF_PROG_TEST_RUN` and introspection).
    ///
    /// # Errors
    ///
    /// [`LoadError::MissingProgram`] if the object lacks it (a build mismatch).
    pub fn program(&self, program: Program) -> Result<&SchedClassifier, LoadError> {
        let name = program.name();
        self.ebpf
            .program(name)
            .ok_or(LoadError::MissingProgram { name })?
            .try_into()
            .map_err(|source| LoadError::Program { name, source })
    }

    pub(crate) fn program_mut(
        &mut self,
        program: Program,
    ) -> Result<&mut SchedClassifier, LoadError> {
        let name = program.name();
        self.ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram { name })?
            .try_into()
            .map_err(|source| LoadError::Program { name, source })
    }

    /// Removes every pin under the pin root (maps and links) and the directory itself; the
    /// uninstall path. Attachments made through pinned TCX links go away once their last
    /// reference (this process's) is dropped; `clsact` filters need [`Datapath::detach`].
    ///
    /// # Errors
    ///
    /// The I/O error of the removal.
    pub fn unpin_all(self) -> std::io::Result<()> {
        let root = self.pin_root.clone();
        drop(self);
        std::fs::remove_dir_all(root)
    }
}

/// Takes an exclusive, non-blocking `flock` on the pin directory; the kernel drops it when the
/// process dies, so a crashed agent never leaves it behind.
fn lock_pin_root(pin_root: &Path) -> Result<std::fs::File, LoadError> {
    use std::os::fd::AsRawFd as _;
    let dir = std::fs::File::open(pin_root).map_err(|source| LoadError::PinDirLock {
        path: pin_root.to_path_buf(),
        source,
    })?;
    // SAFETY: flock on an fd we own; no pointers.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(dir);
    }
    let source = std::io::Error::last_os_error();
    if source.kind() == std::io::ErrorKind::WouldBlock {
        return Err(LoadError::PinDirInUse {
            path: pin_root.to_path_buf(),
        });
    }
    Err(LoadError::PinDirLock {
        path: pin_root.to_path_buf(),
        source,
    })
}

/// Maps earlier versions pinned and this one no longer uses (replaced by the IPv4 and IPv6
/// ipcache arrays and the policy table). Left pinned they would hold their memory until
/// uninstall. Programs of an older loader still attached keep their own references until
/// [`Datapath::attach`] replaces them, and do not read `IPCACHE_EXACT_V6` meanwhile: the new
/// loader's `IPCACHE_LENS` state for IPv6 is not the one that tells them to.
const OBSOLETE_PINS: [&str; 3] = ["IPCACHE_EXACT_V4", "POLICY", map_names::IPCACHE_EXACT_V6];

fn remove_obsolete_pins(pin_root: &Path) {
    for name in OBSOLETE_PINS {
        let path = pin_root.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(pin = %path.display(), "removed a map pin this version no longer uses")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(pin = %path.display(), error = %e, "cannot remove an obsolete map pin")
            }
        }
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, MapError> {
    ebpf.take_map(name).ok_or(MapError::Missing { name })
}

/// Offsets in the kernel's `struct __sk_buff` (uapi, stable).
const SKB_MARK: usize = 8;
const SKB_IFINDEX: usize = 40;
/// `sizeof(struct __sk_buff)` in current uapi headers.
const SKB_SIZE: usize = 192;

/// What a program decided for one packet run through `BPF_PROG_TEST_RUN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// tc return code (`TC_ACT_OK` = 0, `TC_ACT_SHOT` = 2).
    pub action: u32,
    /// `skb->mark` afterwards.
    pub mark: u32,
}

impl Verdict {
    /// `TC_ACT_OK`.
    pub const PASS: u32 = 0;
    /// `TC_ACT_SHOT`.
    pub const DROP: u32 = 2;
}

/// Errors of [`Datapath::test_run`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestRunError {
    /// The program is not loaded.
    #[error("program")]
    Program(#[from] LoadError),
    /// The kernel refused the run.
    #[error("BPF_PROG_TEST_RUN of {name}")]
    Run {
        /// Program name.
        name: &'static str,
        /// Cause.
        #[source]
        source: ProgramError,
    },
}

impl Datapath {
    /// Runs `program` on `frame` (an Ethernet frame, >= 14 bytes) with `BPF_PROG_TEST_RUN`,
    /// as if it arrived on interface `ifindex` (must exist in this network namespace; 1 is
    /// `lo`) with `skb->mark = mark`. Maps are the live ones: counters and events are real.
    ///
    /// # Errors
    ///
    /// [`TestRunError`] if the kernel refuses the run (short frame, unknown ifindex, ...).
    pub fn test_run(
        &self,
        program: Program,
        frame: &[u8],
        ifindex: u32,
        mark: u32,
    ) -> Result<Verdict, TestRunError> {
        let (verdict, _) = self.test_run_repeat(program, frame, ifindex, mark, 1)?;
        Ok(verdict)
    }

    /// Like [`Datapath::test_run`], `repeat` times in the kernel; also returns the kernel's
    /// average run time per packet.
    ///
    /// # Errors
    ///
    /// As [`Datapath::test_run`].
    pub fn test_run_repeat(
        &self,
        program: Program,
        frame: &[u8],
        ifindex: u32,
        mark: u32,
        repeat: u32,
    ) -> Result<(Verdict, std::time::Duration), TestRunError> {
        use aya::programs::{TestRun as _, TestRunOptions};

        let prog = self.program(program)?;
        let mut ctx_in = [0u8; SKB_SIZE];
        ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        ctx_in[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_SIZE];
        let mut data_out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut data_out);
        opts.ctx_in = Some(&ctx_in);
        opts.ctx_out = Some(&mut ctx_out);
        opts.repeat = repeat;
        let result = prog.test_run(opts).map_err(|source| TestRunError::Run {
            name: program.name(),
            source,
        })?;
        let mut mark_out = [0u8; 4];
        mark_out.copy_from_slice(&ctx_out[SKB_MARK..SKB_MARK + 4]);
        Ok((
            Verdict {
                action: result.return_value,
                mark: u32::from_ne_bytes(mark_out),
            },
            result.duration,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::OBJECT;

    fn u16_at(bytes: &[u8], at: usize) -> usize {
        u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes")).into()
    }

    fn u32_at(bytes: &[u8], at: usize) -> usize {
        u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize
    }

    fn u64_at(bytes: &[u8], at: usize) -> usize {
        u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize
    }

    /// The contents of the ELF64 (little-endian) section `name`.
    fn section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
        let (shoff, shentsize) = (u64_at(elf, 0x28), u16_at(elf, 0x3a));
        let (shnum, shstrndx) = (u16_at(elf, 0x3c), u16_at(elf, 0x3e));
        let header = |i: usize| shoff + i * shentsize;
        let names = u64_at(elf, header(shstrndx) + 0x18);
        (0..shnum).find_map(|i| {
            let h = header(i);
            let start = names + u32_at(elf, h);
            let end = start + elf[start..].iter().position(|&b| b == 0)?;
            let (offset, size) = (u64_at(elf, h + 0x18), u64_at(elf, h + 0x20));
            (&elf[start..end] == name.as_bytes()).then(|| &elf[offset..offset + size])
        })
    }

    /// `Datapath::load` gives aya no kernel BTF, which is only needed to relocate CO-RE
    /// accesses. A program that starts using them (reading kernel structures through BTF) needs
    /// it back: without it the relocations would not be applied.
    #[test]
    fn the_object_needs_no_kernel_btf() {
        let ext = section(OBJECT, ".BTF.ext").expect("the object carries .BTF.ext");
        // struct btf_ext_header: magic, version, flags, hdr_len, func_info_off/len,
        // line_info_off/len, then (when hdr_len covers it) core_relo_off/len.
        let hdr_len = u32_at(ext, 4);
        let core_relo_len = if hdr_len >= 32 { u32_at(ext, 28) } else { 0 };
        assert_eq!(core_relo_len, 0, "the eBPF object has CO-RE relocations");
    }
}
