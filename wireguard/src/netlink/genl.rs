//! Generic netlink: resolving the `wireguard` family (`CTRL_CMD_GETFAMILY`) and WireGuard's own
//! messages (`WG_CMD_SET_DEVICE`, `WG_CMD_GET_DEVICE`), after `include/uapi/linux/wireguard.h`.
//!
//! Size limits shape the encoding. An attribute's length is 16 bits, so one message's peer list
//! (a single nested attribute) must stay under 64 KiB; large configurations are therefore split
//! into several `SET_DEVICE` messages of at most `limit` bytes. Device-wide settings and
//! `WGDEVICE_F_REPLACE_PEERS` go in the first message only. A peer whose allowed IPs do not fit
//! continues in the next message as its public key plus the remaining allowed IPs, without
//! `WGPEER_F_REPLACE_ALLOWEDIPS`, so the kernel appends them (the split `wg setconf` uses).
//! The kernel splits its `GET_DEVICE` dump the same way, and [`DumpReader`] joins it again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use super::codec::{self, Attr, DecodeError, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use super::route::{AF_INET, AF_INET6};
use crate::device::{Device, DeviceConfig, Peer, PeerChange, PeerConfig};
use crate::key::{KEY_LEN, PresharedKey, PrivateKey, PublicKey};

pub(crate) const GENL_ID_CTRL: u16 = 0x10;
pub(crate) const CTRL_CMD_GETFAMILY: u8 = 3;
#[cfg(any(test, feature = "testing"))]
pub(crate) const CTRL_CMD_NEWFAMILY: u8 = 1;
pub(crate) const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub(crate) const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub(crate) const GENL_HDRLEN: usize = 4;

pub(crate) const WG_GENL_NAME: &str = "wireguard";
pub(crate) const WG_GENL_VERSION: u8 = 1;
pub(crate) const WG_CMD_GET_DEVICE: u8 = 0;
pub(crate) const WG_CMD_SET_DEVICE: u8 = 1;

pub(crate) const WGDEVICE_A_IFINDEX: u16 = 1;
pub(crate) const WGDEVICE_A_IFNAME: u16 = 2;
pub(crate) const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
pub(crate) const WGDEVICE_A_PUBLIC_KEY: u16 = 4;
pub(crate) const WGDEVICE_A_FLAGS: u16 = 5;
pub(crate) const WGDEVICE_A_LISTEN_PORT: u16 = 6;
pub(crate) const WGDEVICE_A_FWMARK: u16 = 7;
pub(crate) const WGDEVICE_A_PEERS: u16 = 8;
pub(crate) const WGDEVICE_F_REPLACE_PEERS: u32 = 1;

pub(crate) const WGPEER_A_PUBLIC_KEY: u16 = 1;
pub(crate) const WGPEER_A_PRESHARED_KEY: u16 = 2;
pub(crate) const WGPEER_A_FLAGS: u16 = 3;
pub(crate) const WGPEER_A_ENDPOINT: u16 = 4;
pub(crate) const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
pub(crate) const WGPEER_A_LAST_HANDSHAKE_TIME: u16 = 6;
pub(crate) const WGPEER_A_RX_BYTES: u16 = 7;
pub(crate) const WGPEER_A_TX_BYTES: u16 = 8;
pub(crate) const WGPEER_A_ALLOWEDIPS: u16 = 9;
pub(crate) const WGPEER_F_REMOVE_ME: u32 = 1;
pub(crate) const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 2;

pub(crate) const WGALLOWEDIP_A_FAMILY: u16 = 1;
pub(crate) const WGALLOWEDIP_A_IPADDR: u16 = 2;
pub(crate) const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;

const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

/// The most a message's fixed part, one peer's attributes other than allowed IPs, and one
/// allowed IP can take; used to size buffers up front (see [`encoded_bound`]).
const MESSAGE_OVERHEAD: usize = 64;
const PEER_BOUND: usize = 160;
const ALLOWED_IP_BOUND: usize = 40;
/// The smallest message limit that always holds a header, one peer and one allowed IP.
pub(crate) const MIN_LIMIT: usize = MESSAGE_OVERHEAD + PEER_BOUND + ALLOWED_IP_BOUND + 64;

pub(crate) fn genl_header(buf: &mut Vec<u8>, cmd: u8, version: u8) {
    buf.push(cmd);
    buf.push(version);
    buf.extend_from_slice(&0u16.to_ne_bytes());
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub(crate) fn encode_get_family(buf: &mut Vec<u8>, seq: u32, name: &str) {
    let m = codec::begin(buf, GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq);
    genl_header(buf, CTRL_CMD_GETFAMILY, 1);
    codec::attr_str(buf, CTRL_ATTR_FAMILY_NAME, name);
    codec::finish(buf, m);
}

/// The family id in a `CTRL_CMD_NEWFAMILY` reply.
pub(crate) fn decode_family(payload: &[u8]) -> Result<u16, DecodeError> {
    let (_, rest) = codec::split_header("genlmsghdr", payload, GENL_HDRLEN)?;
    for a in codec::attrs(rest) {
        let a = a?;
        if a.ty == CTRL_ATTR_FAMILY_ID {
            return a.u16("CTRL_ATTR_FAMILY_ID");
        }
    }
    Err(DecodeError::Missing {
        what: "CTRL_ATTR_FAMILY_ID",
    })
}

/// `WG_CMD_GET_DEVICE` dump request for the device named `ifname` (`wg show IFNAME dump`).
pub(crate) fn encode_get_device(buf: &mut Vec<u8>, family: u16, seq: u32, ifname: &str) {
    let m = codec::begin(buf, family, NLM_F_REQUEST | NLM_F_DUMP, seq);
    genl_header(buf, WG_CMD_GET_DEVICE, WG_GENL_VERSION);
    codec::attr_str(buf, WGDEVICE_A_IFNAME, ifname);
    codec::finish(buf, m);
}

/// An upper bound of the bytes [`encode_set_device`] writes for `config`, so the caller can
/// reserve them before any key is written (a reallocating `Vec` would leave a copy of the keys
/// in freed memory).
pub(crate) fn encoded_bound(config: &DeviceConfig, limit: usize) -> usize {
    let payload: usize = config
        .peers
        .iter()
        .map(|c| match c {
            PeerChange::Set(p) => PEER_BOUND + ALLOWED_IP_BOUND * p.allowed_ips.len(),
            PeerChange::Remove(_) => PEER_BOUND,
        })
        .sum();
    // Each message is at least half full before the next starts, except around a peer that
    // did not fit (which then fits in the next one).
    let messages = 2 * payload / (limit - MESSAGE_OVERHEAD - PEER_BOUND) + 2;
    payload + messages * (MESSAGE_OVERHEAD + PEER_BOUND) + 64
}

/// Writes `config` as one or more `WG_CMD_SET_DEVICE` messages of at most `limit` bytes
/// (`limit >= MIN_LIMIT`), each asking for an ACK. Returns each message's `(offset, seq)`.
pub(crate) fn encode_set_device(
    buf: &mut Vec<u8>,
    family: u16,
    ifname: &str,
    config: &DeviceConfig,
    limit: usize,
    next_seq: &mut dyn FnMut() -> u32,
) -> Vec<(usize, u32)> {
    let mut e = SetEncoder {
        buf,
        family,
        ifname,
        limit: limit.max(MIN_LIMIT),
        next_seq,
        messages: Vec::new(),
        msg: 0,
        peers: None,
        peer_count: 0,
    };
    e.open();
    if let Some(key) = &config.private_key {
        codec::attr(e.buf, WGDEVICE_A_PRIVATE_KEY, key.secret_bytes());
    }
    if let Some(port) = config.listen_port {
        codec::attr_u16(e.buf, WGDEVICE_A_LISTEN_PORT, port);
    }
    if let Some(mark) = config.fwmark {
        codec::attr_u32(e.buf, WGDEVICE_A_FWMARK, mark);
    }
    if config.replace_peers {
        codec::attr_u32(e.buf, WGDEVICE_A_FLAGS, WGDEVICE_F_REPLACE_PEERS);
    }
    for change in &config.peers {
        match change {
            PeerChange::Set(peer) => e.set_peer(peer),
            PeerChange::Remove(key) => {
                let peer = e.start_peer(&|buf| {
                    codec::attr(buf, WGPEER_A_PUBLIC_KEY, key.as_bytes());
                    codec::attr_u32(buf, WGPEER_A_FLAGS, WGPEER_F_REMOVE_ME);
                });
                e.end_nest(peer);
            }
        }
    }
    e.close();
    e.messages
}

struct SetEncoder<'a> {
    buf: &'a mut Vec<u8>,
    family: u16,
    ifname: &'a str,
    limit: usize,
    next_seq: &'a mut dyn FnMut() -> u32,
    messages: Vec<(usize, u32)>,
    /// Offset of the open message.
    msg: usize,
    /// Offset of the open message's `WGDEVICE_A_PEERS` nest.
    peers: Option<usize>,
    /// Peers started in the open message.
    peer_count: usize,
}

impl SetEncoder<'_> {
    fn open(&mut self) {
        let seq = (self.next_seq)();
        self.msg = codec::begin(self.buf, self.family, NLM_F_REQUEST | NLM_F_ACK, seq);
        genl_header(self.buf, WG_CMD_SET_DEVICE, WG_GENL_VERSION);
        codec::attr_str(self.buf, WGDEVICE_A_IFNAME, self.ifname);
        self.messages.push((self.msg, seq));
        self.peers = None;
        self.peer_count = 0;
    }

    fn close(&mut self) {
        if let Some(nest) = self.peers.take() {
            self.end_nest(nest);
        }
        codec::finish(self.buf, self.msg);
    }

    fn end_nest(&mut self, nest: usize) {
        // `limit` keeps a whole message, and so every nest in it, far below 64 KiB.
        let _ = codec::nest_end(self.buf, nest);
    }

    fn full(&self) -> bool {
        self.buf.len() - self.msg > self.limit
    }

    /// Opens a peer nest starting with the attributes `head` writes. If they overflow a message
    /// that already holds peers, the peer moves to a fresh message (where it always stays, as
    /// `limit >= MIN_LIMIT`). Returns the open peer nest.
    fn start_peer(&mut self, head: &dyn Fn(&mut Vec<u8>)) -> usize {
        loop {
            if self.peers.is_none() {
                self.peers = Some(codec::nest_begin(self.buf, WGDEVICE_A_PEERS));
            }
            let mark = self.buf.len();
            let peer = codec::nest_begin(self.buf, 0);
            head(self.buf);
            if self.full() && self.peer_count > 0 {
                self.buf.truncate(mark);
                self.close();
                self.open();
                continue;
            }
            self.peer_count += 1;
            return peer;
        }
    }

    fn set_peer(&mut self, p: &PeerConfig) {
        let key = p.public_key.as_bytes();
        let mut peer = self.start_peer(&|buf| {
            codec::attr(buf, WGPEER_A_PUBLIC_KEY, key);
            if p.replace_allowed_ips {
                codec::attr_u32(buf, WGPEER_A_FLAGS, WGPEER_F_REPLACE_ALLOWEDIPS);
            }
            // Always written: `None` clears the key (the kernel reads all zeroes as none).
            match &p.preshared_key {
                Some(psk) => codec::attr(buf, WGPEER_A_PRESHARED_KEY, psk.secret_bytes()),
                None => codec::attr(buf, WGPEER_A_PRESHARED_KEY, &[0; KEY_LEN]),
            }
            if let Some(endpoint) = p.endpoint {
                put_endpoint(buf, endpoint);
            }
            codec::attr_u16(
                buf,
                WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
                p.persistent_keepalive_secs,
            );
        });
        let mut ips = codec::nest_begin(self.buf, WGPEER_A_ALLOWEDIPS);
        for net in &p.allowed_ips {
            let mark = self.buf.len();
            put_allowed_ip(self.buf, *net);
            if self.full() {
                // Continue the peer in the next message: its key and the remaining allowed
                // IPs, without REPLACE_ALLOWEDIPS, so the kernel appends them.
                self.buf.truncate(mark);
                self.end_nest(ips);
                self.end_nest(peer);
                self.close();
                self.open();
                peer = self.start_peer(&|buf| codec::attr(buf, WGPEER_A_PUBLIC_KEY, key));
                ips = codec::nest_begin(self.buf, WGPEER_A_ALLOWEDIPS);
                put_allowed_ip(self.buf, *net);
            }
        }
        self.end_nest(ips);
        self.end_nest(peer);
    }
}

fn put_endpoint(buf: &mut Vec<u8>, endpoint: SocketAddr) {
    let mut sa = Vec::with_capacity(SOCKADDR_IN6_LEN);
    match endpoint {
        SocketAddr::V4(a) => {
            sa.extend_from_slice(&AF_INET.to_ne_bytes());
            sa.extend_from_slice(&a.port().to_be_bytes());
            sa.extend_from_slice(&a.ip().octets());
            sa.resize(SOCKADDR_IN_LEN, 0);
        }
        SocketAddr::V6(a) => {
            sa.extend_from_slice(&AF_INET6.to_ne_bytes());
            sa.extend_from_slice(&a.port().to_be_bytes());
            sa.extend_from_slice(&a.flowinfo().to_be_bytes());
            sa.extend_from_slice(&a.ip().octets());
            sa.extend_from_slice(&a.scope_id().to_ne_bytes());
        }
    }
    codec::attr(buf, WGPEER_A_ENDPOINT, &sa);
}

fn put_allowed_ip(buf: &mut Vec<u8>, net: IpNet) {
    let nest = codec::nest_begin(buf, 0);
    match net.addr() {
        IpAddr::V4(a) => {
            codec::attr_u16(buf, WGALLOWEDIP_A_FAMILY, AF_INET);
            codec::attr(buf, WGALLOWEDIP_A_IPADDR, &a.octets());
        }
        IpAddr::V6(a) => {
            codec::attr_u16(buf, WGALLOWEDIP_A_FAMILY, AF_INET6);
            codec::attr(buf, WGALLOWEDIP_A_IPADDR, &a.octets());
        }
    }
    codec::attr_u8(buf, WGALLOWEDIP_A_CIDR_MASK, net.prefix_len());
    // 40 bytes at most.
    let _ = codec::nest_end(buf, nest);
}

// ---------------------------------------------------------------- reading

/// Joins the messages of one `WG_CMD_GET_DEVICE` dump into a [`Device`].
#[derive(Debug, Default)]
pub(crate) struct DumpReader {
    ifindex: Option<u32>,
    name: String,
    private_key: Option<PrivateKey>,
    public_key: Option<PublicKey>,
    listen_port: u16,
    fwmark: u32,
    peers: Vec<Peer>,
}

impl DumpReader {
    /// Reads one dump message's payload (after the netlink header).
    pub(crate) fn message(&mut self, payload: &[u8]) -> Result<(), DecodeError> {
        let (_, rest) = codec::split_header("genlmsghdr", payload, GENL_HDRLEN)?;
        for a in codec::attrs(rest) {
            let a = a?;
            match a.ty {
                WGDEVICE_A_IFINDEX => self.ifindex = Some(a.u32("WGDEVICE_A_IFINDEX")?),
                WGDEVICE_A_IFNAME => a.str("WGDEVICE_A_IFNAME")?.clone_into(&mut self.name),
                WGDEVICE_A_PRIVATE_KEY => {
                    let mut bytes = zeroize::Zeroizing::new(a.array("WGDEVICE_A_PRIVATE_KEY")?);
                    self.private_key = Some(PrivateKey::from_bytes(&mut bytes));
                }
                WGDEVICE_A_PUBLIC_KEY => {
                    self.public_key =
                        Some(PublicKey::from_bytes(a.array("WGDEVICE_A_PUBLIC_KEY")?));
                }
                WGDEVICE_A_LISTEN_PORT => self.listen_port = a.u16("WGDEVICE_A_LISTEN_PORT")?,
                WGDEVICE_A_FWMARK => self.fwmark = a.u32("WGDEVICE_A_FWMARK")?,
                WGDEVICE_A_PEERS => {
                    for (i, p) in a.nested().enumerate() {
                        let peer = decode_peer(&p?)?;
                        // The kernel continues a peer whose allowed IPs did not fit as the
                        // first peer of the next message, with the same key.
                        match self.peers.last_mut() {
                            Some(last) if i == 0 && last.public_key == peer.public_key => {
                                last.allowed_ips.extend(peer.allowed_ips);
                            }
                            _ => self.peers.push(peer),
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The device, once the dump is done.
    pub(crate) fn finish(self) -> Result<Device, DecodeError> {
        Ok(Device {
            ifindex: self.ifindex.ok_or(DecodeError::Missing {
                what: "WGDEVICE_A_IFINDEX",
            })?,
            name: self.name,
            private_key: self.private_key,
            public_key: self.public_key,
            listen_port: self.listen_port,
            fwmark: self.fwmark,
            peers: self.peers,
        })
    }
}

fn decode_peer(nest: &Attr<'_>) -> Result<Peer, DecodeError> {
    let mut key = None;
    let mut psk = None;
    let mut rest = Vec::new();
    for a in nest.nested() {
        let a = a?;
        match a.ty {
            WGPEER_A_PUBLIC_KEY => {
                key = Some(PublicKey::from_bytes(a.array("WGPEER_A_PUBLIC_KEY")?))
            }
            WGPEER_A_PRESHARED_KEY => {
                let k =
                    PresharedKey::try_from_slice(a.payload).map_err(|_| DecodeError::Length {
                        what: "WGPEER_A_PRESHARED_KEY",
                        len: a.payload.len(),
                    })?;
                psk = (!k.is_zero()).then_some(k);
            }
            _ => rest.push(a),
        }
    }
    let mut peer = Peer::empty(key.ok_or(DecodeError::Missing {
        what: "WGPEER_A_PUBLIC_KEY",
    })?);
    peer.preshared_key = psk;
    for a in rest {
        match a.ty {
            WGPEER_A_ENDPOINT => peer.endpoint = Some(decode_endpoint(a.payload)?),
            WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL => {
                peer.persistent_keepalive_secs = a.u16("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")?;
            }
            WGPEER_A_LAST_HANDSHAKE_TIME => peer.last_handshake = decode_time(a.payload)?,
            WGPEER_A_RX_BYTES => peer.rx_bytes = a.u64("WGPEER_A_RX_BYTES")?,
            WGPEER_A_TX_BYTES => peer.tx_bytes = a.u64("WGPEER_A_TX_BYTES")?,
            WGPEER_A_ALLOWEDIPS => {
                for ip in a.nested() {
                    peer.allowed_ips.push(decode_allowed_ip(&ip?)?);
                }
            }
            _ => {}
        }
    }
    Ok(peer)
}

fn decode_endpoint(b: &[u8]) -> Result<SocketAddr, DecodeError> {
    let what = "WGPEER_A_ENDPOINT";
    let family = b.get(..2).map(codec::ne_u16);
    match (b.len(), family) {
        (SOCKADDR_IN_LEN, Some(AF_INET)) => Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(b[4], b[5], b[6], b[7]),
            u16::from_be_bytes([b[2], b[3]]),
        ))),
        (SOCKADDR_IN6_LEN, Some(AF_INET6)) => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&b[8..24]);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                u16::from_be_bytes([b[2], b[3]]),
                u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                codec::ne_u32(&b[24..28]),
            )))
        }
        (SOCKADDR_IN_LEN | SOCKADDR_IN6_LEN, _) => Err(DecodeError::Invalid { what }),
        (len, _) => Err(DecodeError::Length { what, len }),
    }
}

/// A `struct __kernel_timespec`; all zeroes means "never".
fn decode_time(b: &[u8]) -> Result<Option<SystemTime>, DecodeError> {
    let what = "WGPEER_A_LAST_HANDSHAKE_TIME";
    let b: [u8; 16] = b
        .try_into()
        .map_err(|_| DecodeError::Length { what, len: b.len() })?;
    let mut half = [0u8; 8];
    half.copy_from_slice(&b[..8]);
    let secs = i64::from_ne_bytes(half);
    half.copy_from_slice(&b[8..]);
    let nanos = i64::from_ne_bytes(half);
    if secs == 0 && nanos == 0 {
        return Ok(None);
    }
    let secs = u64::try_from(secs).map_err(|_| DecodeError::Invalid { what })?;
    let nanos = u32::try_from(nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or(DecodeError::Invalid { what })?;
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::new(secs, nanos))
        .map(Some)
        .ok_or(DecodeError::Invalid { what })
}

fn decode_allowed_ip(nest: &Attr<'_>) -> Result<IpNet, DecodeError> {
    let mut family = None;
    let mut addr = None;
    let mut cidr = None;
    for a in nest.nested() {
        let a = a?;
        match a.ty {
            WGALLOWEDIP_A_FAMILY => family = Some(a.u16("WGALLOWEDIP_A_FAMILY")?),
            WGALLOWEDIP_A_IPADDR => addr = Some(a.payload),
            WGALLOWEDIP_A_CIDR_MASK => cidr = Some(a.u8("WGALLOWEDIP_A_CIDR_MASK")?),
            _ => {}
        }
    }
    let missing = |what| DecodeError::Missing { what };
    let addr = addr.ok_or(missing("WGALLOWEDIP_A_IPADDR"))?;
    let what = "WGALLOWEDIP_A_IPADDR";
    let ip = match family.ok_or(missing("WGALLOWEDIP_A_FAMILY"))? {
        AF_INET => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(addr).map_err(|_| {
            DecodeError::Length {
                what,
                len: addr.len(),
            }
        })?)),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(addr).map_err(
            |_| DecodeError::Length {
                what,
                len: addr.len(),
            },
        )?)),
        _ => {
            return Err(DecodeError::Invalid {
                what: "WGALLOWEDIP_A_FAMILY",
            });
        }
    };
    IpNet::new(ip, cidr.ok_or(missing("WGALLOWEDIP_A_CIDR_MASK"))?).map_err(|_| {
        DecodeError::Invalid {
            what: "WGALLOWEDIP_A_CIDR_MASK",
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_helpers::{peer, private_key};

    /// Every message of `buf` (at the given offsets) with its top-level attributes.
    fn split(buf: &[u8]) -> Vec<(codec::Message<'_>, Vec<Attr<'_>>)> {
        codec::messages(buf)
            .map(|m| {
                let m = m.unwrap();
                let attrs = codec::attrs(&m.payload[GENL_HDRLEN..])
                    .collect::<Result<_, _>>()
                    .unwrap();
                (m, attrs)
            })
            .collect()
    }

    fn encode(config: &DeviceConfig, limit: usize) -> (Vec<u8>, Vec<(usize, u32)>) {
        let mut buf = Vec::new();
        let mut seq = 10;
        let msgs = encode_set_device(&mut buf, 0x1b, "wg0", config, limit, &mut || {
            seq += 1;
            seq
        });
        assert!(buf.len() <= encoded_bound(config, limit), "the bound holds");
        (buf, msgs)
    }

    fn peers_of<'a>(attrs: &[Attr<'a>]) -> Vec<Vec<Attr<'a>>> {
        attrs
            .iter()
            .filter(|a| a.ty == WGDEVICE_A_PEERS)
            .flat_map(|a| a.nested())
            .map(|p| p.unwrap().nested().collect::<Result<_, _>>().unwrap())
            .collect()
    }

    #[test]
    fn small_configuration_is_one_message_with_every_attribute() {
        let mut p = peer(1);
        p.endpoint = Some("[fd00::1%3]:51820".parse().unwrap());
        p.persistent_keepalive_secs = 25;
        let config = DeviceConfig::new()
            .private_key(private_key(0))
            .listen_port(51820)
            .fwmark(0xe00)
            .replace_peers()
            .peer(p.clone())
            .remove_peer(peer(2).public_key);
        let (buf, msgs) = encode(&config, 32 * 1024);
        assert_eq!(msgs, vec![(0, 11)]);
        let split = split(&buf);
        let (m, attrs) = &split[0];
        assert_eq!(m.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!((m.payload[0], m.payload[1]), (WG_CMD_SET_DEVICE, 1));
        let tys: Vec<u16> = attrs.iter().map(|a| a.ty).collect();
        assert_eq!(
            tys,
            [
                WGDEVICE_A_IFNAME,
                WGDEVICE_A_PRIVATE_KEY,
                WGDEVICE_A_LISTEN_PORT,
                WGDEVICE_A_FWMARK,
                WGDEVICE_A_FLAGS,
                WGDEVICE_A_PEERS
            ]
        );
        assert_eq!(attrs[1].payload, private_key(0).secret_bytes());
        assert_eq!(attrs[2].u16("").unwrap(), 51820);
        assert_eq!(attrs[4].u32("").unwrap(), WGDEVICE_F_REPLACE_PEERS);
        let peers = peers_of(attrs);
        assert_eq!(peers.len(), 2);
        let set: Vec<u16> = peers[0].iter().map(|a| a.ty).collect();
        assert_eq!(
            set,
            [
                WGPEER_A_PUBLIC_KEY,
                WGPEER_A_FLAGS,
                WGPEER_A_PRESHARED_KEY,
                WGPEER_A_ENDPOINT,
                WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
                WGPEER_A_ALLOWEDIPS
            ]
        );
        assert_eq!(peers[0][1].u32("").unwrap(), WGPEER_F_REPLACE_ALLOWEDIPS);
        assert_eq!(
            decode_endpoint(peers[0][3].payload).unwrap(),
            p.endpoint.unwrap()
        );
        let ips: Vec<IpNet> = peers[0][5]
            .nested()
            .map(|a| decode_allowed_ip(&a.unwrap()).unwrap())
            .collect();
        assert_eq!(ips, p.allowed_ips);
        assert_eq!(peers[1].len(), 2);
        assert_eq!(peers[1][1].u32("").unwrap(), WGPEER_F_REMOVE_ME);
    }

    #[test]
    fn added_allowed_ips_are_sent_without_the_replace_flag() {
        // The peer's flags attribute, if any, and its allowed IPs, as encoded.
        fn encoded(p: &PeerConfig) -> (Option<u32>, Vec<IpNet>) {
            let (buf, msgs) = encode(&DeviceConfig::new().peer(p.clone()), 32 * 1024);
            assert_eq!(msgs.len(), 1);
            let split = split(&buf);
            let peers = peers_of(&split[0].1);
            assert_eq!(peers.len(), 1);
            let peer = &peers[0];
            assert_eq!(peer[0].ty, WGPEER_A_PUBLIC_KEY);
            assert_eq!(peer[0].payload, p.public_key.as_bytes());
            let flags = peer
                .iter()
                .find(|a| a.ty == WGPEER_A_FLAGS)
                .map(|a| a.u32("").unwrap());
            let list = peer.iter().find(|a| a.ty == WGPEER_A_ALLOWEDIPS).unwrap();
            let ips = list
                .nested()
                .map(|a| decode_allowed_ip(&a.unwrap()).unwrap())
                .collect();
            (flags, ips)
        }

        let nets: Vec<IpNet> = vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:244:1::/64".parse().unwrap(),
        ];
        let added = PeerConfig::new(peer(1).public_key)
            .allowed_ips(nets.clone())
            .add_allowed_ips();
        assert!(!added.replace_allowed_ips);
        let (flags, ips) = encoded(&added);
        assert!(
            flags.is_none_or(|f| f & WGPEER_F_REPLACE_ALLOWEDIPS == 0),
            "adding must not replace: flags {flags:?}"
        );
        assert_eq!(ips, nets, "the allowed IPs are still sent");

        let mut replaced = added;
        replaced.replace_allowed_ips = true;
        let (flags, ips) = encoded(&replaced);
        assert!(
            flags.is_some_and(|f| f & WGPEER_F_REPLACE_ALLOWEDIPS != 0),
            "replacing sets the flag: {flags:?}"
        );
        assert_eq!(ips, nets);
        // The default is to replace.
        let (flags, _) = encoded(&PeerConfig::new(peer(1).public_key).allowed_ips(nets));
        assert_eq!(flags, Some(WGPEER_F_REPLACE_ALLOWEDIPS));
    }

    #[test]
    fn many_peers_split_into_messages_under_the_limit() {
        let mut config = DeviceConfig::new()
            .private_key(private_key(0))
            .listen_port(1)
            .replace_peers();
        for i in 1..=5000 {
            config = config.peer(peer(i));
        }
        let limit = 32 * 1024;
        let (buf, msgs) = encode(&config, limit);
        let split = split(&buf);
        assert_eq!(split.len(), msgs.len());
        assert!(msgs.len() > 20, "{} messages", msgs.len());
        let mut keys = Vec::new();
        for (i, (m, attrs)) in split.iter().enumerate() {
            assert!(m.payload.len() + codec::NLMSG_HDRLEN <= limit + 200);
            assert_eq!(m.seq, 11 + u32::try_from(i).unwrap());
            // Device-wide settings and REPLACE_PEERS go in the first message only.
            let first_only = [
                WGDEVICE_A_PRIVATE_KEY,
                WGDEVICE_A_LISTEN_PORT,
                WGDEVICE_A_FLAGS,
            ];
            let has = attrs.iter().any(|a| first_only.contains(&a.ty));
            assert_eq!(has, i == 0, "message {i}");
            for p in peers_of(attrs) {
                assert_eq!(p[1].u32("").unwrap(), WGPEER_F_REPLACE_ALLOWEDIPS);
                keys.push(PublicKey::from_bytes(p[0].array("").unwrap()));
            }
        }
        let want: Vec<_> = (1..=5000).map(|i| peer(i).public_key).collect();
        assert_eq!(keys, want, "every peer exactly once, in order");
    }

    #[test]
    fn a_peer_with_more_allowed_ips_than_fit_continues_without_replace() {
        let nets: Vec<IpNet> = (0..200u32)
            .map(|i| IpNet::new(IpAddr::V6(Ipv6Addr::from(u128::from(i) << 64)), 64).unwrap())
            .collect();
        let config = DeviceConfig::new().peer(peer(1).allowed_ips(nets.clone()));
        let (buf, msgs) = encode(&config, MIN_LIMIT);
        assert!(msgs.len() > 3, "{} messages", msgs.len());
        let mut got = Vec::new();
        for (i, (_, attrs)) in split(&buf).iter().enumerate() {
            let peers = peers_of(attrs);
            assert_eq!(peers.len(), 1);
            let p = &peers[0];
            assert_eq!(p[0].payload, peer(1).public_key.as_bytes());
            let flags = p.iter().find(|a| a.ty == WGPEER_A_FLAGS);
            assert_eq!(flags.is_some(), i == 0, "only the first part replaces");
            let list = p.iter().find(|a| a.ty == WGPEER_A_ALLOWEDIPS).unwrap();
            got.extend(
                list.nested()
                    .map(|a| decode_allowed_ip(&a.unwrap()).unwrap()),
            );
        }
        let mut want = peer(1).allowed_ips;
        want.extend(nets);
        assert_eq!(got, want);
    }

    /// A dump message as the kernel writes it.
    fn dump_message(device: bool, peers: &[(PublicKey, Vec<IpNet>)]) -> Vec<u8> {
        let mut buf = Vec::new();
        genl_header(&mut buf, WG_CMD_GET_DEVICE, 1);
        if device {
            codec::attr_u32(&mut buf, WGDEVICE_A_IFINDEX, 4);
            codec::attr_str(&mut buf, WGDEVICE_A_IFNAME, "wg0");
            codec::attr_u16(&mut buf, WGDEVICE_A_LISTEN_PORT, 51820);
        }
        let nest = codec::nest_begin(&mut buf, WGDEVICE_A_PEERS);
        for (key, ips) in peers {
            let p = codec::nest_begin(&mut buf, 0);
            codec::attr(&mut buf, WGPEER_A_PUBLIC_KEY, key.as_bytes());
            let list = codec::nest_begin(&mut buf, WGPEER_A_ALLOWEDIPS);
            for ip in ips {
                put_allowed_ip(&mut buf, *ip);
            }
            assert!(codec::nest_end(&mut buf, list));
            assert!(codec::nest_end(&mut buf, p));
        }
        assert!(codec::nest_end(&mut buf, nest));
        buf
    }

    #[test]
    fn dump_parts_join_and_a_continued_peer_merges() {
        let (a, b) = (peer(1).public_key, peer(2).public_key);
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let mut reader = DumpReader::default();
        reader
            .message(&dump_message(true, &[(a, vec![net("10.0.0.0/24")])]))
            .unwrap();
        reader
            .message(&dump_message(
                false,
                &[(a, vec![net("10.0.1.0/24")]), (b, vec![])],
            ))
            .unwrap();
        reader
            .message(&dump_message(false, &[(b, vec![net("fd00::/64")])]))
            .unwrap();
        let device = reader.finish().unwrap();
        assert_eq!((device.ifindex, device.name.as_str()), (4, "wg0"));
        assert_eq!(device.listen_port, 51820);
        assert_eq!(device.peers.len(), 2);
        assert_eq!(
            device.peers[0].allowed_ips,
            [net("10.0.0.0/24"), net("10.0.1.0/24")]
        );
        assert_eq!(device.peers[1].allowed_ips, [net("fd00::/64")]);
        assert!(DumpReader::default().finish().is_err(), "no device part");
    }

    #[test]
    fn malformed_dumps_are_errors_not_panics() {
        let good = dump_message(
            true,
            &[(peer(1).public_key, vec!["10.0.0.0/8".parse().unwrap()])],
        );
        // Cut at every length: never a panic; an error whenever a nest is cut.
        for cut in 0..good.len() {
            let _ = DumpReader::default().message(&good[..cut]);
        }
        assert!(
            DumpReader::default()
                .message(&good[..good.len() - 3])
                .is_err()
        );
        assert!(DumpReader::default().message(&good[..2]).is_err());
        // Flip every byte in turn: decoding may fail but must not panic.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0xff;
            let _ = DumpReader::default().message(&bad);
        }
        // A peer without a public key.
        let mut buf = Vec::new();
        genl_header(&mut buf, WG_CMD_GET_DEVICE, 1);
        let nest = codec::nest_begin(&mut buf, WGDEVICE_A_PEERS);
        let p = codec::nest_begin(&mut buf, 0);
        codec::attr_u64(&mut buf, WGPEER_A_RX_BYTES, 1);
        assert!(codec::nest_end(&mut buf, p));
        assert!(codec::nest_end(&mut buf, nest));
        assert_eq!(
            DumpReader::default().message(&buf),
            Err(DecodeError::Missing {
                what: "WGPEER_A_PUBLIC_KEY"
            })
        );
        // Bad field shapes.
        assert!(decode_endpoint(&[2, 0, 1]).is_err());
        assert!(decode_endpoint(&[9; SOCKADDR_IN_LEN]).is_err());
        assert!(decode_time(&[1; 8]).is_err());
        let mut ts = [0u8; 16];
        ts[..8].copy_from_slice(&(-1i64).to_ne_bytes());
        assert!(decode_time(&ts).is_err());
        let mut ip = Vec::new();
        put_allowed_ip(&mut ip, "10.0.0.0/8".parse().unwrap());
        let at = ip.len() - 4; // the CIDR's value
        ip[at] = 33;
        let nest = codec::attrs(&ip).next().unwrap().unwrap();
        assert!(decode_allowed_ip(&nest).is_err());
    }

    #[test]
    fn handshake_time_endpoints_and_counters_decode() {
        let mut ts = [0u8; 16];
        ts[..8].copy_from_slice(&1_700_000_000i64.to_ne_bytes());
        ts[8..].copy_from_slice(&5i64.to_ne_bytes());
        assert_eq!(
            decode_time(&ts).unwrap(),
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!(decode_time(&[0; 16]).unwrap(), None);
        for e in ["192.0.2.7:51820", "[fd00::7]:1"] {
            let e: SocketAddr = e.parse().unwrap();
            let mut buf = Vec::new();
            put_endpoint(&mut buf, e);
            let a = codec::attrs(&buf).next().unwrap().unwrap();
            assert_eq!(decode_endpoint(a.payload).unwrap(), e);
        }
    }

    #[test]
    fn family_request_and_reply() {
        let mut buf = Vec::new();
        encode_get_family(&mut buf, 3, WG_GENL_NAME);
        let (m, attrs) = &split(&buf)[0];
        assert_eq!((m.ty, m.payload[0]), (GENL_ID_CTRL, CTRL_CMD_GETFAMILY));
        assert_eq!(attrs[0].str("").unwrap(), "wireguard");
        let mut reply = Vec::new();
        genl_header(&mut reply, CTRL_CMD_NEWFAMILY, 2);
        codec::attr_u16(&mut reply, CTRL_ATTR_FAMILY_ID, 0x1b);
        assert_eq!(decode_family(&reply).unwrap(), 0x1b);
        assert!(decode_family(&reply[..GENL_HDRLEN]).is_err());
    }
}
