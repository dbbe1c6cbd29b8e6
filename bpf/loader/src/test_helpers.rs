//! Test helpers: crafted frames for `BPF_PROG_TEST_RUN`, privilege checks, unique pin roots.
#![expect(
    clippy::expect_used,
    reason = "test helpers: a frame too big to build is a test bug"
)]

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use crate::{Datapath, LoadError};

/// IP protocol numbers used by the builders.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ESP.
    pub const ESP: u8 = 50;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// GRE (an L4 protocol without ports).
    pub const GRE: u8 = 47;
}

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// An Ethernet frame around `payload`.
#[must_use]
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IPv4 header options of a test packet.
#[derive(Clone, Debug, Default)]
pub struct V4 {
    /// Options bytes (padded to a multiple of 4 by the builder).
    pub options: Vec<u8>,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    /// More-fragments flag.
    pub more_fragments: bool,
}

/// An IPv4 packet in an Ethernet frame.
#[must_use]
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8], v4: &V4) -> Vec<u8> {
    let mut options = v4.options.clone();
    while !options.len().is_multiple_of(4) {
        options.push(0); // EOL padding
    }
    let ihl = 20 + options.len();
    let total = u16::try_from(ihl + l4.len()).expect("test packet fits in 64 KiB");
    let ihl_words = u8::try_from(ihl / 4).expect("ihl fits");
    let mut h = vec![0x40 | ihl_words, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]); // id
    let frag = (v4.frag_offset & 0x1fff) | if v4.more_fragments { 0x2000 } else { 0 };
    h.extend_from_slice(&frag.to_be_bytes());
    h.push(64);
    h.push(protocol);
    h.extend_from_slice(&[0, 0]); // checksum: the programs do not check it
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&options);
    h.extend_from_slice(l4);
    ethernet(0x0800, &h)
}

/// An IPv6 extension header of a test packet.
#[derive(Clone, Debug)]
pub enum Ext {
    /// Hop-by-hop options (8 bytes, PadN).
    HopByHop,
    /// Destination options (8 bytes, PadN).
    DestOpts,
    /// Routing header type 0 with no addresses (8 bytes).
    Routing,
    /// Fragment header.
    Fragment {
        /// Offset in 8-byte units.
        offset: u16,
        /// More-fragments flag.
        more: bool,
    },
}

impl Ext {
    const fn number(&self) -> u8 {
        match self {
            Self::HopByHop => 0,
            Self::Routing => 43,
            Self::Fragment { .. } => 44,
            Self::DestOpts => 60,
        }
    }
}

/// An IPv6 packet with extension headers `ext` in an Ethernet frame.
#[must_use]
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, l4: &[u8], ext: &[Ext]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, e) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(protocol, Ext::number);
        match e {
            Ext::HopByHop | Ext::DestOpts => body.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
            Ext::Routing => body.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]),
            Ext::Fragment { offset, more } => {
                let v = (offset << 3) | u16::from(*more);
                body.extend_from_slice(&[next, 0]);
                body.extend_from_slice(&v.to_be_bytes());
                body.extend_from_slice(&[0, 0, 0x56, 0x78]);
            }
        }
    }
    body.extend_from_slice(l4);
    let first = ext.first().map_or(protocol, Ext::number);
    let mut h = vec![0x60, 0, 0, 0];
    let len = u16::try_from(body.len()).expect("test packet fits in 64 KiB");
    h.extend_from_slice(&len.to_be_bytes());
    h.push(first);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&body);
    ethernet(0x86DD, &h)
}

/// A TCP header (SYN).
#[must_use]
pub fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

/// A UDP header with 4 payload bytes.
#[must_use]
pub fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 12, 0, 0, 1, 2, 3, 4]);
    h
}

/// An ICMP/ICMPv6 header (`kind`, `code`) with an echo id/sequence.
#[must_use]
pub fn icmp(kind: u8, code: u8) -> Vec<u8> {
    vec![kind, code, 0, 0, 0, 1, 0, 1]
}

/// An ESP header (SPI, sequence) with 8 bytes of ciphertext.
#[must_use]
pub fn esp(spi: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&spi.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes());
    h.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]);
    h
}

/// Why privileged tests cannot run here, or `None` when they can.
#[must_use]
pub fn missing_privileges() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        return Some("not root".to_owned());
    }
    static MOUNT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serialised = MOUNT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !bpffs_mounted() {
        // Like the agent's start-up, mount bpffs where it is expected.
        let mounted = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .is_ok_and(|s| s.success());
        if !mounted || !bpffs_mounted() {
            return Some("no bpffs at /sys/fs/bpf and mounting one failed".to_owned());
        }
    }
    None
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace().skip(1);
            f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
        })
    })
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

/// Returns true when the test may run; otherwise prints why it is skipped, or panics when
/// `NODESEAL_REQUIRE_PRIVILEGED=1`.
#[must_use]
pub fn privileged_or_skip(test: &str) -> bool {
    let Some(why) = missing_privileges() else {
        return true;
    };
    assert!(
        std::env::var("NODESEAL_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "{test}: NODESEAL_REQUIRE_PRIVILEGED=1 but {why}"
    );
    eprintln!("SKIP {test}: {why}");
    false
}

/// Runs `check` over and over on another thread while `work` runs on this one, then returns
/// `work`'s result and how many checks ran (the reader racing a writer). `check` panics on a
/// wrong answer; it stops with `work`, or after `limit` in any case.
///
/// # Panics
///
/// If a check panicked, or none ran.
pub fn check_while<T>(
    limit: std::time::Duration,
    check: impl FnMut(u64) + Send,
    work: impl FnOnce() -> T,
) -> T {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    let (result, runs) = std::thread::scope(|scope| {
        let stop = &stop;
        let mut check = check;
        let reader = scope.spawn(move || {
            let deadline = std::time::Instant::now() + limit;
            let mut runs = 0u64;
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                check(runs);
                runs += 1;
            }
            runs
        });
        let result = work();
        stop.store(true, Ordering::Relaxed);
        (result, reader.join())
    });
    let runs = match runs {
        Ok(runs) => runs,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    assert!(runs > 0, "the checking thread never ran");
    result
}

/// `BPF_MAP_TYPE_HASH`, for [`pin_scratch_map`].
pub const BPF_MAP_TYPE_HASH: u32 = 1;
/// `BPF_MAP_TYPE_ARRAY`, for [`pin_scratch_map`].
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// Creates a small map (16 entries) of `map_type` with keys and values of the given sizes and
/// pins it at `path` with raw `bpf()` calls: what an older loader left behind.
///
/// # Panics
///
/// If the kernel refuses the map or the pin.
pub fn pin_scratch_map(path: &std::path::Path, map_type: u32, key_size: u32, value_size: u32) {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[map_type, key_size, value_size, 16]);
    // SAFETY: attr is a zeroed bpf_attr-sized buffer for BPF_MAP_CREATE.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), 128) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut pin = [0u64; 16];
    pin[0] = c_path.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: pin is a bpf_attr for BPF_OBJ_PIN (pathname, bpf_fd); c_path outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), 128) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: fd is the map fd created above; the pin keeps the map.
    unsafe { libc::close(fd as libc::c_int) };
}

/// A pin root unique to this process and `name`, removed on drop.
#[derive(Debug)]
pub struct TestPinRoot(PathBuf);

impl TestPinRoot {
    /// `/sys/fs/bpf/nodeseal-test-<pid>-<name>`.
    #[must_use]
    pub fn new(name: &str) -> Self {
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/nodeseal-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        Self(path)
    }

    /// The path.
    #[must_use]
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// Loads a datapath on this pin root.
    ///
    /// # Errors
    ///
    /// As [`Datapath::load`].
    pub fn load(&self) -> Result<Datapath, LoadError> {
        Datapath::load(&self.0)
    }

    /// Loads a second handle that only runs programs (`BPF_PROG_TEST_RUN`) on the same maps
    /// while another handle writes them: it skips the pin-root lock. Load it before the writer,
    /// whose load then sets up the maps; never write maps through it.
    ///
    /// # Errors
    ///
    /// As [`Datapath::load`].
    pub fn load_program_runner(&self) -> Result<Datapath, LoadError> {
        Datapath::load_with(&self.0, false)
    }
}

impl Drop for TestPinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
