//! Watching the underlay wire: an `AF_PACKET` socket in the underlay namespace sees every frame
//! that crosses the bridge, and each is classified as ESP, WireGuard, plaintext IP, ARP or other.
//!
//! Every bridged frame appears twice to a packet socket (arriving on one port, leaving on
//! another); only arrivals are kept, and frames delivered to the bridge device itself are
//! ignored, so each frame on the wire is counted once.
//!
//! A capture can also keep each frame's bytes, and [`inject_frame`] puts such a frame back on
//! the wire: what an attacker who records the underlay can do (the replay scenario).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::Netns;
use crate::net::Cidr;

/// How many packets a capture keeps; counts continue past it.
const KEEP_PACKETS: usize = 200_000;

/// What a frame on the wire carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PacketClass {
    /// IPsec ESP between two addresses.
    Esp {
        src: IpAddr,
        dst: IpAddr,
        spi: u32,
        seq: u32,
    },
    /// A WireGuard message (type 1-4) over UDP.
    WireGuard {
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
        message_type: u8,
    },
    /// Any other IP packet: its addresses and protocol are readable on the wire.
    Plaintext {
        src: IpAddr,
        dst: IpAddr,
        protocol: u8,
        sport: Option<u16>,
        dport: Option<u16>,
    },
    Arp,
    /// An ethertype we do not classify (or a truncated frame).
    Other {
        ethertype: u16,
    },
}

impl fmt::Display for PacketClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Esp { src, dst, spi, seq } => {
                write!(f, "ESP {src} > {dst} spi 0x{spi:08x} seq {seq}")
            }
            Self::WireGuard {
                src,
                dst,
                sport,
                dport,
                message_type,
            } => write!(
                f,
                "WireGuard type {message_type} {src}:{sport} > {dst}:{dport}"
            ),
            Self::Plaintext {
                src,
                dst,
                protocol,
                sport,
                dport,
            } => {
                write!(f, "PLAINTEXT proto {protocol} {src}")?;
                if let Some(p) = sport {
                    write!(f, ":{p}")?;
                }
                write!(f, " > {dst}")?;
                if let Some(p) = dport {
                    write!(f, ":{p}")?;
                }
                Ok(())
            }
            Self::Arp => f.write_str("ARP"),
            Self::Other { ethertype } => write!(f, "ethertype 0x{ethertype:04x}"),
        }
    }
}

/// One captured frame.
#[derive(Clone, Debug)]
pub struct Packet {
    pub class: PacketClass,
    /// The underlay port it arrived on.
    pub ifindex: i32,
    pub len: usize,
    /// The whole Ethernet frame, when the capture keeps frames
    /// ([`WireCapture::start_keeping_frames`]): only on request, since a long capture of a
    /// stream would hold hundreds of megabytes.
    pub frame: Option<Vec<u8>>,
}

/// Counts by class, and the distinct ESP flows seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureSummary {
    pub esp: u64,
    pub wireguard: u64,
    pub plaintext: u64,
    pub arp: u64,
    pub other: u64,
    /// (src, dst, spi) → packets.
    pub esp_flows: BTreeMap<(IpAddr, IpAddr, u32), u64>,
}

impl fmt::Display for CaptureSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "esp={} wireguard={} plaintext={} arp={} other={}",
            self.esp, self.wireguard, self.plaintext, self.arp, self.other
        )?;
        for ((src, dst, spi), n) in &self.esp_flows {
            write!(f, "\n  esp {src} > {dst} spi 0x{spi:08x}: {n} packets")?;
        }
        Ok(())
    }
}

/// Plaintext packets that should have been encrypted.
#[derive(Debug)]
pub struct PlaintextLeak {
    pub packets: Vec<PacketClass>,
}

impl fmt::Display for PlaintextLeak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} plaintext packet(s) carrying a pod address crossed the wire:",
            self.packets.len()
        )?;
        for p in self.packets.iter().take(10) {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PlaintextLeak {}

/// The capture thread's output, shared with the topology for its failure report.
#[derive(Default)]
pub(crate) struct Shared {
    stop: AtomicBool,
    keep_frames: bool,
    packets: Mutex<Vec<Packet>>,
    dropped_beyond_keep: AtomicU64,
}

/// A running capture on every port of the underlay bridge.
pub struct WireCapture {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl WireCapture {
    /// Starts capturing in `underlay`, ignoring frames delivered to the device `bridge` itself.
    /// Returns once the socket is open, so no later packet is missed.
    pub fn start(underlay: &Netns, bridge: &str) -> Result<Self> {
        Self::open(underlay, bridge, false)
    }

    /// Like [`WireCapture::start`], keeping every frame's bytes in [`Packet::frame`].
    pub fn start_keeping_frames(underlay: &Netns, bridge: &str) -> Result<Self> {
        Self::open(underlay, bridge, true)
    }

    fn open(underlay: &Netns, bridge: &str, keep_frames: bool) -> Result<Self> {
        let shared = Arc::new(Shared {
            keep_frames,
            ..Shared::default()
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let worker = Arc::clone(&shared);
        let bridge = bridge.to_owned();
        let thread = underlay.spawn_thread("wire-capture", move || {
            let socket = match PacketSocket::open(&bridge) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            socket.run(&worker)
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("capture thread did not start")??;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// A copy of the packets captured so far.
    pub fn packets(&self) -> Vec<Packet> {
        self.shared.packets()
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Forgets what was captured so far (e.g. between phases of a scenario).
    pub fn clear(&self) {
        if let Ok(mut p) = self.shared.packets.lock() {
            p.clear();
        }
    }

    pub fn summary(&self) -> CaptureSummary {
        summarize(&self.packets())
    }

    /// Fails with the offending packets if any plaintext IP packet had a source or destination
    /// inside `cidrs` (the pod CIDRs).
    pub fn check_no_plaintext(&self, cidrs: &[Cidr]) -> std::result::Result<(), PlaintextLeak> {
        let packets: Vec<PacketClass> = self
            .packets()
            .into_iter()
            .filter_map(|p| match p.class {
                PacketClass::Plaintext { src, dst, .. }
                    if cidrs.iter().any(|c| c.contains(src) || c.contains(dst)) =>
                {
                    Some(p.class)
                }
                _ => None,
            })
            .collect();
        if packets.is_empty() {
            Ok(())
        } else {
            Err(PlaintextLeak { packets })
        }
    }

    /// Stops the capture and returns everything it kept.
    pub fn stop(mut self) -> Result<Vec<Packet>> {
        self.halt()?;
        Ok(self.packets())
    }

    fn halt(&mut self) -> Result<()> {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(r) => r?,
                Err(_) => bail!("capture thread panicked"),
            }
        }
        Ok(())
    }
}

impl Shared {
    fn packets(&self) -> Vec<Packet> {
        self.packets.lock().map(|p| p.clone()).unwrap_or_default()
    }

    pub(crate) fn summary(&self) -> CaptureSummary {
        summarize(&self.packets())
    }
}

impl Drop for WireCapture {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

fn summarize(packets: &[Packet]) -> CaptureSummary {
    let mut s = CaptureSummary::default();
    for p in packets {
        match &p.class {
            PacketClass::Esp { src, dst, spi, .. } => {
                s.esp += 1;
                *s.esp_flows.entry((*src, *dst, *spi)).or_default() += 1;
            }
            PacketClass::WireGuard { .. } => s.wireguard += 1,
            PacketClass::Plaintext { .. } => s.plaintext += 1,
            PacketClass::Arp => s.arp += 1,
            PacketClass::Other { .. } => s.other += 1,
        }
    }
    s
}

struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    bridge_ifindex: i32,
}

impl PacketSocket {
    fn open(bridge: &str) -> Result<Self> {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if raw < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        setsockopt(&fd, libc::SO_RCVTIMEO, &timeout)?;
        setsockopt(&fd, libc::SO_RCVBUFFORCE, &(16i32 << 20))?;
        let name = std::ffi::CString::new(bridge)?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let bridge_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        Ok(Self { fd, bridge_ifindex })
    }

    fn run(&self, shared: &Shared) -> Result<()> {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 65536];
        while !shared.stop.load(Ordering::Relaxed) {
            // SAFETY: zeroed sockaddr_ll is a valid value of this plain C struct.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut addr_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buf and addr are valid for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut addr).cast(),
                    &mut addr_len,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.kind() {
                    std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted => continue,
                    _ => bail!("recvfrom on the capture socket: {err}"),
                }
            }
            if addr.sll_pkttype == libc::PACKET_OUTGOING || addr.sll_ifindex == self.bridge_ifindex
            {
                continue;
            }
            let frame = &buf[..n as usize];
            let packet = Packet {
                class: classify(frame),
                ifindex: addr.sll_ifindex,
                len: frame.len(),
                frame: shared.keep_frames.then(|| frame.to_vec()),
            };
            if let Ok(mut kept) = shared.packets.lock() {
                if kept.len() < KEEP_PACKETS {
                    kept.push(packet);
                } else {
                    shared.dropped_beyond_keep.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
}

/// Sends `frame`, a whole Ethernet frame (e.g. one a capture kept), out of interface `ifname`
/// of `ns`, byte for byte: an attacker on the underlay replaying what it recorded, or forging
/// what it likes.
///
/// On the bridge itself the frame is switched to the port of its destination MAC; on a bridge
/// port ([`crate::Node::underlay_port`]) it goes straight to the one node behind it, past the
/// bridge, so no forwarding or address learning there decides whether it arrives. A capture
/// does not see frames sent on a port (it keeps arrivals only).
///
/// # Errors
/// When the frame has no Ethernet header, `ifname` does not exist in `ns`, or sending fails.
pub fn inject_frame(ns: &Netns, ifname: &str, frame: &[u8]) -> Result<()> {
    let (Some(dst_mac), Some(ethertype)) = (frame.get(..6), frame.get(12..14)) else {
        bail!("a frame of {} bytes has no Ethernet header", frame.len());
    };
    let mut mac = [0u8; 8];
    mac[..6].copy_from_slice(dst_mac);
    let ethertype = u16::from_be_bytes([ethertype[0], ethertype[1]]);
    // The socket and the interface index belong to the namespace of the thread that makes them.
    ns.run(|| send_raw(ifname, mac, ethertype, frame))
}

fn send_raw(ifname: &str, dst_mac: [u8; 8], ethertype: u16, frame: &[u8]) -> Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname}: {}", std::io::Error::last_os_error());
    }
    // Protocol 0: this socket only sends.
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if raw < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // SAFETY: a zeroed sockaddr_ll is a valid value of this plain C struct.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ethertype.to_be();
    addr.sll_ifindex = i32::try_from(ifindex).context("ifindex")?;
    addr.sll_halen = 6;
    addr.sll_addr = dst_mac;
    // SAFETY: `frame` and `addr` are valid for the lengths passed.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        bail!("sendto on {ifname}: {}", std::io::Error::last_os_error());
    }
    if usize::try_from(sent).ok() != Some(frame.len()) {
        bail!("sendto on {ifname} sent {sent} of {} bytes", frame.len());
    }
    Ok(())
}

fn setsockopt<T>(fd: &std::os::fd::OwnedFd, opt: libc::c_int, value: &T) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `value` points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("setsockopt {opt}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

const ETH_HEADER: usize = 14;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_TCP: u8 = 6;

/// Classifies an Ethernet frame.
pub fn classify(frame: &[u8]) -> PacketClass {
    let Some(ethertype) = frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return PacketClass::Other { ethertype: 0 };
    };
    let payload = &frame[ETH_HEADER.min(frame.len())..];
    let parsed = match ethertype {
        0x0806 => return PacketClass::Arp,
        0x0800 => parse_ipv4(payload),
        0x86dd => parse_ipv6(payload),
        _ => None,
    };
    let Some((src, dst, protocol, l4)) = parsed else {
        return PacketClass::Other { ethertype };
    };
    if protocol == IPPROTO_ESP
        && let (Some(spi), Some(seq)) = (be32(l4, 0), be32(l4, 4))
    {
        return PacketClass::Esp { src, dst, spi, seq };
    }
    let ports = match protocol {
        IPPROTO_UDP | IPPROTO_TCP => be16(l4, 0).zip(be16(l4, 2)),
        _ => None,
    };
    if protocol == IPPROTO_UDP
        && let (Some((sport, dport)), Some(body)) = (ports, l4.get(8..))
        && let Some(message_type) = wireguard_message_type(body)
    {
        return PacketClass::WireGuard {
            src,
            dst,
            sport,
            dport,
            message_type,
        };
    }
    PacketClass::Plaintext {
        src,
        dst,
        protocol,
        sport: ports.map(|p| p.0),
        dport: ports.map(|p| p.1),
    }
}

/// The smallest link MTU (IPv4's): WireGuard pads a packet to a multiple of 16 bytes but never
/// past its device's MTU, so a padded length that is no multiple of 16 is that MTU, at least
/// this.
const MIN_MTU: usize = 576;

/// WireGuard messages: a type byte 1-4, three zero bytes, and a length fixed by the type
/// (148, 92, 64) or, for transport data, a 16-byte header plus a padded, tagged payload.
fn wireguard_message_type(body: &[u8]) -> Option<u8> {
    let (&kind, rest) = body.split_first()?;
    if rest.get(..3)? != [0, 0, 0] {
        return None;
    }
    let fits = match kind {
        1 => body.len() == 148,
        2 => body.len() == 92,
        3 => body.len() == 64,
        4 => body
            .len()
            .checked_sub(32)
            .is_some_and(|padded| padded.is_multiple_of(16) || padded >= MIN_MTU),
        _ => false,
    };
    fits.then_some(kind)
}

type IpHeader<'a> = (IpAddr, IpAddr, u8, &'a [u8]);

fn parse_ipv4(p: &[u8]) -> Option<IpHeader<'_>> {
    let first = *p.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let protocol = *p.get(9)?;
    let src: [u8; 4] = p.get(12..16)?.try_into().ok()?;
    let dst: [u8; 4] = p.get(16..20)?.try_into().ok()?;
    let total = usize::from(be16(p, 2)?).min(p.len());
    Some((src.into(), dst.into(), protocol, p.get(ihl..total)?))
}

fn parse_ipv6(p: &[u8]) -> Option<IpHeader<'_>> {
    if *p.first()? >> 4 != 6 {
        return None;
    }
    let protocol = *p.get(6)?;
    let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
    Some((src.into(), dst.into(), protocol, p.get(40..)?))
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(p.get(at..at + 2)?.try_into().ok()?))
}

fn be32(p: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(p.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_frame(protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + l4.len()) as u16;
        f.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64]);
        f.push(protocol);
        f.extend_from_slice(&[0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(l4);
        f
    }

    #[test]
    fn classifies_esp_with_spi_and_sequence() {
        let frame = ipv4_frame(50, &[0xc0, 0, 0x10, 0x01, 0, 0, 0, 7, 1, 2, 3]);
        assert_eq!(
            classify(&frame),
            PacketClass::Esp {
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
                spi: 0xc000_1001,
                seq: 7
            }
        );
    }

    #[test]
    fn classifies_wireguard_by_message_shape_only() {
        let mut udp = vec![0xca, 0x6c, 0xca, 0x6c, 0, 0, 0, 0];
        let mut init = vec![1, 0, 0, 0];
        init.resize(148, 0xaa);
        udp.extend_from_slice(&init);
        assert!(matches!(
            classify(&ipv4_frame(17, &udp)),
            PacketClass::WireGuard {
                message_type: 1,
                ..
            }
        ));
        // Transport data padded up to a 1420-byte device MTU (no multiple of 16).
        let mut full = udp[..8].to_vec();
        let mut data = vec![4, 0, 0, 0];
        data.resize(32 + 1420, 0x55);
        full.extend_from_slice(&data);
        assert!(matches!(
            classify(&ipv4_frame(17, &full)),
            PacketClass::WireGuard {
                message_type: 4,
                ..
            }
        ));
        // Same ports, but a payload of the wrong length is not WireGuard.
        udp.truncate(8 + 100);
        assert!(matches!(
            classify(&ipv4_frame(17, &udp)),
            PacketClass::Plaintext {
                protocol: 17,
                sport: Some(51820),
                ..
            }
        ));
    }

    #[test]
    fn truncated_frames_are_other_not_panics() {
        let frame = ipv4_frame(1, &[8, 0, 0, 0]);
        for len in 0..frame.len() {
            let _ = classify(&frame[..len]);
        }
        assert_eq!(classify(&[0; 5]), PacketClass::Other { ethertype: 0 });
    }
}
