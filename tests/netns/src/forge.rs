//! Forged plaintext on the underlay wire: UDP datagrams with any source address, written as
//! Ethernet frames straight onto the underlay bridge, as any host on the node network could.
//! Routing never sees them on the way out, so nothing there refuses a source it does not own;
//! what the receiving node does with them is what the spoofing scenarios check.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::topology::UNDERLAY_BRIDGE;
use crate::{Netns, Node};

/// A locally administered, unicast MAC no interface of a topology uses.
const FORGER_MAC: [u8; 6] = [0x02, 0x6e, 0x73, 0x00, 0x00, 0x01];

/// Sends one UDP datagram `src:40000 -> dst` carrying `payload`, from the underlay namespace
/// onto its bridge, addressed to the MAC of `node`'s uplink (`eth0`).
///
/// # Errors
/// When the uplink's MAC cannot be read or the frame cannot be sent.
pub fn send_udp(
    underlay: &Netns,
    node: &Node,
    src: Ipv4Addr,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Result<()> {
    let mac = uplink_mac(node)?;
    let frame = udp_frame(mac, src, dst, payload)?;
    crate::capture::inject_frame(underlay, UNDERLAY_BRIDGE, &frame)
}

/// The mark of `ns`'s OUT state from `src` to `dst` (as iproute2 prints it: `mark 0xV/0xM`):
/// what a process of that node must put on a packet to have it encrypted for `dst`'s node.
pub fn out_state_mark(ns: &Netns, src: IpAddr, dst: IpAddr) -> Option<u32> {
    let text = ns.ip(&["xfrm", "state"]).ok()?;
    let header = format!("src {src} dst {dst}");
    let block = text
        .split("\nsrc ")
        .map(|b| {
            if b.starts_with("src ") {
                b.to_owned()
            } else {
                format!("src {b}")
            }
        })
        .find(|b| b.starts_with(&header))?;
    let value = block
        .split_whitespace()
        .skip_while(|w| *w != "mark")
        .nth(1)?;
    let value = value.split('/').next()?.trim_start_matches("0x");
    u32::from_str_radix(value, 16).ok()
}

/// Sends one UDP datagram from `src` (a local address of `ns`) to `dst` with `skb->mark`
/// `mark`, as a process of the node could: with an OUT state's mark, the node encrypts it for
/// the peer whatever its inner source.
///
/// # Errors
/// When binding, marking or sending fails.
pub fn send_marked(ns: &Netns, src: IpAddr, dst: SocketAddr, mark: u32) -> Result<()> {
    ns.run(move || {
        use std::os::fd::AsRawFd as _;
        let socket =
            UdpSocket::bind((src, 0)).with_context(|| format!("binding the source {src}"))?;
        // SAFETY: a valid socket fd and a u32 option value of the size passed.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                std::ptr::from_ref(&mark).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if set != 0 {
            bail!("SO_MARK: {}", std::io::Error::last_os_error());
        }
        socket
            .send_to(b"landing request", dst)
            .with_context(|| format!("sending to {dst}"))?;
        Ok(())
    })
}

/// Binds a UDP socket on `addr` inside `ns` (e.g. a pod's) for [`receive_for`].
///
/// # Errors
/// When binding fails.
pub fn bind_udp(ns: &Netns, addr: impl Into<std::net::SocketAddr>) -> Result<UdpSocket> {
    let addr = addr.into();
    ns.run(|| UdpSocket::bind(addr))
        .with_context(|| format!("binding UDP {addr}"))
}

/// Every payload `socket` receives during `window`.
///
/// # Errors
/// When the socket fails other than by timing out.
pub fn receive_for(socket: &UdpSocket, window: Duration) -> Result<Vec<Vec<u8>>> {
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(got);
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(got);
            }
            Err(e) => return Err(e).context("receiving"),
        }
    }
}

/// Sends `rounds` datagrams from each of `sources` (a tag and a source address; the tag is the
/// payload) onto the underlay to `node`'s `dst`, where `socket` listens, and counts per source
/// how many arrived within 2 s after the last.
///
/// # Errors
/// When sending or receiving fails.
pub fn tagged_arrivals(
    underlay: &Netns,
    node: &Node,
    sources: &[(&str, Ipv4Addr)],
    (dst, socket): (SocketAddrV4, &UdpSocket),
    rounds: usize,
) -> Result<Vec<usize>> {
    for _ in 0..rounds {
        for (tag, src) in sources {
            send_udp(underlay, node, *src, dst, tag.as_bytes())?;
        }
    }
    let got = receive_for(socket, Duration::from_secs(2))?;
    Ok(sources
        .iter()
        .map(|(tag, _)| {
            got.iter()
                .filter(|p| p.as_slice() == tag.as_bytes())
                .count()
        })
        .collect())
}

fn uplink_mac(node: &Node) -> Result<[u8; 6]> {
    // "2: eth0@if5: <...> ... link/ether 7a:1b:... brd ff:ff:..."
    let out = node.ns.ip(&["-o", "link", "show", "eth0"])?;
    let text = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no MAC in {out:?}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {text:?}");
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("bad MAC {text:?}"))?;
    }
    Ok(mac)
}

fn udp_frame(
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let udp_len = u16::try_from(8 + payload.len()).context("payload too long")?;
    let total = udp_len.checked_add(20).context("payload too long")?;
    let mut f = Vec::with_capacity(14 + usize::from(total));
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&FORGER_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0]); // id 0, don't fragment
    f.extend_from_slice(&[64, 17, 0, 0]); // TTL, UDP, checksum below
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.ip().octets());
    let sum = checksum(&f[ip_start..]);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    f.extend_from_slice(payload);
    Ok(f)
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_has_a_valid_ipv4_header() {
        let f = udp_frame(
            [2, 0, 0, 0, 0, 9],
            Ipv4Addr::new(10, 244, 0, 99),
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 10), 7100),
            b"abc",
        )
        .expect("frame");
        assert_eq!(f.len(), 14 + 20 + 8 + 3);
        // A header with its checksum in place sums to zero.
        assert_eq!(checksum(&f[14..34]), 0);
        assert_eq!(&f[26..30], &[10, 244, 0, 99]);
        assert_eq!(&f[36..38], &7100u16.to_be_bytes());
    }
}
