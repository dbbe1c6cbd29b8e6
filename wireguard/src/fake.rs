//! An in-memory kernel for tests: it sits behind the same [`Socket`] seam as the real netlink
//! sockets, so every request passes through the real encoder, is parsed here the way the kernel
//! parses it, and every answer (ACKs, errors, multi-part dumps) passes through the real decoder.
//! The fake cannot drift from the wire format without its tests noticing.
//!
//! It follows the kernel where callers depend on it: `SET_DEVICE` semantics (replace peers,
//! replace or append allowed IPs, an allowed IP moving between peers, remove), dumps split at a
//! size budget with a peer's allowed IPs continued in the next message, `EEXIST` / `ENODEV` /
//! `EOPNOTSUPP` where the kernel returns them. It does no cryptography and moves no packets.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use ipnet::IpNet;

use crate::error::TransportError;
use crate::key::{KEY_LEN, PrivateKey, PublicKey};
use crate::link::Link;
use crate::netlink::codec::{self, Attr, DecodeError, Message};
use crate::netlink::genl::{self as g, GENL_HDRLEN};
use crate::netlink::route::{self as r, AF_INET, AF_INET6};
use crate::netlink::{Proto, SET_MESSAGE_LIMIT, Socket};
use crate::routing::{Family, Rule};

/// The family id the fake gives `wireguard`.
const FAMILY: u16 = 0x1b;
/// How much the kernel puts into one dump message (about a page).
const DEFAULT_DUMP_BUDGET: usize = 4096;

#[derive(Debug)]
struct FakeLink {
    name: String,
    kind: Option<String>,
    mtu: u32,
    up: bool,
    addresses: BTreeSet<IpNet>,
    wg: Option<WgDevice>,
}

#[derive(Debug, Default)]
struct WgDevice {
    private_key: Option<PrivateKey>,
    listen_port: u16,
    fwmark: u32,
    peers: Vec<FakePeer>,
}

#[derive(Debug)]
struct FakePeer {
    key: PublicKey,
    psk: [u8; KEY_LEN],
    endpoint: Option<SocketAddr>,
    keepalive: u16,
    allowed: Vec<IpNet>,
    /// The latest handshake as the kernel reports it (seconds, nanoseconds; zeroes: never).
    handshake: (i64, i64),
    rx_bytes: u64,
    tx_bytes: u64,
}

#[derive(Debug)]
struct State {
    wireguard: bool,
    links: BTreeMap<u32, FakeLink>,
    next_index: u32,
    dump_budget: usize,
    set_limit: usize,
    interrupt_dumps: usize,
    set_messages: usize,
    largest_set_message: usize,
    /// (table, destination) to the output link's index.
    routes: BTreeMap<(u32, IpNet), u32>,
    rules: BTreeSet<Rule>,
}

impl Default for State {
    fn default() -> Self {
        let mut links = BTreeMap::new();
        links.insert(
            1,
            FakeLink {
                name: "lo".into(),
                kind: None,
                mtu: 65536,
                up: true,
                addresses: BTreeSet::new(),
                wg: None,
            },
        );
        Self {
            wireguard: true,
            links,
            next_index: 2,
            dump_budget: DEFAULT_DUMP_BUDGET,
            set_limit: SET_MESSAGE_LIMIT,
            interrupt_dumps: 0,
            set_messages: 0,
            largest_set_message: 0,
            routes: BTreeMap::new(),
            rules: BTreeSet::new(),
        }
    }
}

/// A cheap-clone handle to one fake kernel; clones share the same state.
#[derive(Debug, Clone, Default)]
pub struct FakeKernel {
    inner: Arc<Mutex<State>>,
}

impl FakeKernel {
    /// A kernel with WireGuard and only a loopback link.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread poisons the lock; the state is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes the kernel lack WireGuard (no family, no link kind).
    pub fn remove_wireguard(&self) {
        self.lock().wireguard = false;
    }

    /// Adds a link of another kind, as other software would.
    pub fn add_foreign_link(&self, name: &str, kind: &str) {
        let mut s = self.lock();
        let index = s.next_index;
        s.next_index += 1;
        s.links.insert(
            index,
            FakeLink {
                name: name.into(),
                kind: Some(kind.into()),
                mtu: 1500,
                up: false,
                addresses: BTreeSet::new(),
                wg: None,
            },
        );
    }

    /// Sets the largest `SET_DEVICE` message handles over this kernel send (to exercise
    /// splitting with few peers).
    pub fn set_set_message_limit(&self, bytes: usize) {
        self.lock().set_limit = bytes;
    }

    /// Sets how many bytes the kernel puts in one dump message.
    pub fn set_dump_budget(&self, bytes: usize) {
        self.lock().dump_budget = bytes;
    }

    /// Flags the next `n` device dumps as interrupted by a concurrent change.
    pub fn interrupt_next_dumps(&self, n: usize) {
        self.lock().interrupt_dumps = n;
    }

    /// Makes the peer `key` of link `name` report traffic, as if packets had moved: its latest
    /// handshake (`None`: never) and its byte counters. Returns whether the peer exists.
    pub fn set_peer_traffic(
        &self,
        name: &str,
        key: &PublicKey,
        latest_handshake: Option<SystemTime>,
        rx_bytes: u64,
        tx_bytes: u64,
    ) -> bool {
        let handshake = latest_handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or((0, 0), |d| {
                (
                    i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    i64::from(d.subsec_nanos()),
                )
            });
        let mut s = self.lock();
        let peer = s
            .links
            .values_mut()
            .filter(|l| l.name == name)
            .filter_map(|l| l.wg.as_mut())
            .flat_map(|d| d.peers.iter_mut())
            .find(|p| p.key == *key);
        let Some(peer) = peer else {
            return false;
        };
        peer.handshake = handshake;
        peer.rx_bytes = rx_bytes;
        peer.tx_bytes = tx_bytes;
        true
    }

    /// How many `SET_DEVICE` messages arrived so far.
    #[must_use]
    pub fn set_messages(&self) -> usize {
        self.lock().set_messages
    }

    /// The size of the largest `SET_DEVICE` message so far.
    #[must_use]
    pub fn largest_set_message(&self) -> usize {
        self.lock().largest_set_message
    }

    /// The link named `name`, as `RTM_GETLINK` would report it.
    #[must_use]
    pub fn link(&self, name: &str) -> Option<Link> {
        let s = self.lock();
        s.links
            .iter()
            .find(|(_, l)| l.name == name)
            .map(|(i, l)| link_of(*i, l))
    }

    /// The addresses on link `name`.
    #[must_use]
    pub fn addresses(&self, name: &str) -> Vec<IpNet> {
        let s = self.lock();
        s.links
            .values()
            .find(|l| l.name == name)
            .map(|l| l.addresses.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The routes of `table`: destination and output link name.
    #[must_use]
    pub fn routes(&self, table: u32) -> Vec<(IpNet, String)> {
        let s = self.lock();
        s.routes
            .iter()
            .filter(|((t, _), _)| *t == table)
            .map(|((_, dst), oif)| {
                let name = s.links.get(oif).map(|l| l.name.clone()).unwrap_or_default();
                (*dst, name)
            })
            .collect()
    }

    /// The policy rules nodeseal added.
    #[must_use]
    pub fn rules(&self) -> Vec<Rule> {
        self.lock().rules.iter().copied().collect()
    }

    pub(crate) fn set_message_limit(&self) -> usize {
        self.lock().set_limit
    }

    /// A route socket and a generic socket onto this kernel.
    pub(crate) fn sockets(&self) -> (FakeSocket, FakeSocket) {
        let socket = |proto| FakeSocket {
            proto,
            kernel: self.clone(),
            queue: VecDeque::new(),
        };
        (socket(Proto::Route), socket(Proto::Generic))
    }
}

fn link_of(index: u32, l: &FakeLink) -> Link {
    Link {
        index,
        name: l.name.clone(),
        kind: l.kind.clone(),
        mtu: l.mtu,
        up: l.up,
    }
}

/// One socket onto a [`FakeKernel`]: requests are handled during `send`, answers queued.
#[derive(Debug)]
pub(crate) struct FakeSocket {
    proto: Proto,
    kernel: FakeKernel,
    queue: VecDeque<Vec<u8>>,
}

impl Socket for FakeSocket {
    fn send(&mut self, datagram: &[u8]) -> Result<(), TransportError> {
        let mut s = self.kernel.lock();
        for msg in codec::messages(datagram) {
            let msg = msg.map_err(TransportError::Decode)?;
            let answers = match self.proto {
                Proto::Route => s.route(&msg),
                Proto::Generic => s.generic(&msg),
            };
            self.queue.extend(answers);
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let datagram = self.queue.pop_front().ok_or_else(|| TransportError::Io {
            call: "recv",
            source: std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "the fake kernel has nothing more to say",
            ),
        })?;
        let n = datagram.len();
        if n > buf.len() {
            return Err(TransportError::Decode(DecodeError::Truncated {
                what: "netlink datagram",
                len: buf.len(),
                need: n,
            }));
        }
        buf[..n].copy_from_slice(&datagram);
        Ok(n)
    }
}

/// The ACK (`errno` 0) or error for `msg`.
fn answer(msg: &Message<'_>, errno: i32) -> Vec<u8> {
    let mut buf = Vec::new();
    let m = codec::begin(&mut buf, codec::NLMSG_ERROR, 0x100, msg.seq); // capped
    buf.extend_from_slice(&(-errno).to_ne_bytes());
    let echo = codec::begin(&mut buf, msg.ty, msg.flags, msg.seq);
    codec::finish(&mut buf, echo);
    codec::finish(&mut buf, m);
    buf
}

fn attrs_of(payload: &[u8], header: usize) -> Result<Vec<Attr<'_>>, DecodeError> {
    let (_, rest) = codec::split_header("request header", payload, header)?;
    codec::attrs(rest).collect()
}

fn find<'a>(attrs: &[Attr<'a>], ty: u16) -> Option<Attr<'a>> {
    attrs.iter().find(|a| a.ty == ty).copied()
}

impl State {
    fn by_name(&mut self, name: &str) -> Option<(u32, &mut FakeLink)> {
        self.links
            .iter_mut()
            .find(|(_, l)| l.name == name)
            .map(|(i, l)| (*i, l))
    }

    fn route(&mut self, msg: &Message<'_>) -> Vec<Vec<u8>> {
        match self.route_inner(msg) {
            Ok(mut replies) => {
                replies.push(answer(msg, 0));
                replies
            }
            Err(errno) => vec![answer(msg, errno)],
        }
    }

    fn route_inner(&mut self, msg: &Message<'_>) -> Result<Vec<Vec<u8>>, i32> {
        let header = match msg.ty {
            r::RTM_NEWADDR | r::RTM_DELADDR => r::IFADDRMSG_LEN,
            r::RTM_NEWROUTE | r::RTM_DELROUTE | r::RTM_NEWRULE | r::RTM_DELRULE => r::RTMSG_LEN,
            _ => r::IFINFOMSG_LEN,
        };
        let attrs = attrs_of(msg.payload, header).map_err(|_| libc::EINVAL)?;
        let index = codec::ne_u32(&msg.payload[4..8]);
        let name = find(&attrs, r::IFLA_IFNAME).and_then(|a| a.str("").ok().map(str::to_owned));
        match msg.ty {
            r::RTM_GETLINK => {
                let (i, l) = self
                    .by_name(&name.ok_or(libc::EINVAL)?)
                    .ok_or(libc::ENODEV)?;
                Ok(vec![encode_link_reply(msg.seq, i, l)])
            }
            r::RTM_NEWLINK if index == 0 => {
                let name = name.ok_or(libc::EINVAL)?;
                if self.by_name(&name).is_some() {
                    return Err(libc::EEXIST);
                }
                let kind = find(&attrs, r::IFLA_LINKINFO)
                    .and_then(|a| a.nested().flatten().find(|i| i.ty == r::IFLA_INFO_KIND))
                    .and_then(|k| k.str("").ok().map(str::to_owned));
                if kind.as_deref() != Some(r::KIND) || !self.wireguard {
                    return Err(libc::EOPNOTSUPP);
                }
                let mtu = find(&attrs, r::IFLA_MTU).map_or(Ok(1420), |a| a.u32(""));
                let index = self.next_index;
                self.next_index += 1;
                self.links.insert(
                    index,
                    FakeLink {
                        name,
                        kind,
                        mtu: mtu.map_err(|_| libc::EINVAL)?,
                        up: false,
                        addresses: BTreeSet::new(),
                        wg: Some(WgDevice::default()),
                    },
                );
                Ok(vec![])
            }
            r::RTM_NEWLINK => {
                let link = self.links.get_mut(&index).ok_or(libc::ENODEV)?;
                if let Some(mtu) = find(&attrs, r::IFLA_MTU) {
                    link.mtu = mtu.u32("").map_err(|_| libc::EINVAL)?;
                }
                let flags = codec::ne_u32(&msg.payload[8..12]);
                let change = codec::ne_u32(&msg.payload[12..16]);
                if change & r::IFF_UP != 0 {
                    link.up = flags & r::IFF_UP != 0;
                }
                Ok(vec![])
            }
            r::RTM_DELLINK => {
                self.links.remove(&index).ok_or(libc::ENODEV)?;
                // The kernel flushes the routes through a link that goes.
                self.routes.retain(|_, oif| *oif != index);
                Ok(vec![])
            }
            r::RTM_NEWADDR | r::RTM_DELADDR => {
                let prefix = msg.payload[1];
                let addr = find(&attrs, r::IFA_LOCAL).ok_or(libc::EINVAL)?;
                let ip = ip_of(addr.payload).ok_or(libc::EINVAL)?;
                let net = IpNet::new(ip, prefix).map_err(|_| libc::EINVAL)?;
                let link = self.links.get_mut(&index).ok_or(libc::ENODEV)?;
                if msg.ty == r::RTM_NEWADDR {
                    link.addresses.insert(net);
                } else if !link.addresses.remove(&net) {
                    return Err(libc::EADDRNOTAVAIL);
                }
                Ok(vec![])
            }
            r::RTM_NEWROUTE | r::RTM_DELROUTE => {
                let table = find(&attrs, r::RTA_TABLE)
                    .ok_or(libc::EINVAL)?
                    .u32("")
                    .map_err(|_| libc::EINVAL)?;
                let dst = find(&attrs, r::RTA_DST).ok_or(libc::EINVAL)?;
                let ip = ip_of(dst.payload).ok_or(libc::EINVAL)?;
                let net = IpNet::new(ip, msg.payload[1]).map_err(|_| libc::EINVAL)?;
                if net.trunc() != net {
                    return Err(libc::EINVAL);
                }
                if msg.ty == r::RTM_DELROUTE {
                    self.routes.remove(&(table, net)).ok_or(libc::ESRCH)?;
                    return Ok(vec![]);
                }
                let oif = find(&attrs, r::RTA_OIF)
                    .ok_or(libc::EINVAL)?
                    .u32("")
                    .map_err(|_| libc::EINVAL)?;
                if !self.links.contains_key(&oif) {
                    return Err(libc::ENODEV);
                }
                if msg.flags & codec::NLM_F_REPLACE == 0 && self.routes.contains_key(&(table, net))
                {
                    return Err(libc::EEXIST);
                }
                self.routes.insert((table, net), oif);
                Ok(vec![])
            }
            r::RTM_NEWRULE | r::RTM_DELRULE => {
                let family = match msg.payload[0] {
                    2 => Family::V4,
                    10 => Family::V6,
                    _ => return Err(libc::EAFNOSUPPORT),
                };
                let u32_of = |ty| {
                    find(&attrs, ty)
                        .ok_or(libc::EINVAL)
                        .and_then(|a| a.u32("").map_err(|_| libc::EINVAL))
                };
                let port = |ty, side| {
                    let range = find(&attrs, ty)?;
                    let proto = find(&attrs, r::FRA_IP_PROTO)?;
                    Some(crate::RulePort {
                        protocol: *proto.payload.first()?,
                        side,
                        port: u16::from_ne_bytes([*range.payload.first()?, *range.payload.get(1)?]),
                    })
                };
                let rule = Rule {
                    family,
                    priority: u32_of(r::FRA_PRIORITY)?,
                    table: u32_of(r::FRA_TABLE)?,
                    fwmark: u32_of(r::FRA_FWMARK).ok().map(|value| crate::FwMark {
                        value,
                        mask: u32_of(r::FRA_FWMASK).unwrap_or(u32::MAX),
                    }),
                    port: port(r::FRA_SPORT_RANGE, crate::PortSide::Source)
                        .or_else(|| port(r::FRA_DPORT_RANGE, crate::PortSide::Destination)),
                };
                if msg.ty == r::RTM_DELRULE {
                    return if self.rules.remove(&rule) {
                        Ok(vec![])
                    } else {
                        Err(libc::ENOENT)
                    };
                }
                if !self.rules.insert(rule) && msg.flags & codec::NLM_F_EXCL != 0 {
                    return Err(libc::EEXIST);
                }
                Ok(vec![])
            }
            _ => Err(libc::EOPNOTSUPP),
        }
    }

    fn generic(&mut self, msg: &Message<'_>) -> Vec<Vec<u8>> {
        let cmd = msg.payload.first().copied();
        match (msg.ty, cmd) {
            (g::GENL_ID_CTRL, Some(g::CTRL_CMD_GETFAMILY)) => {
                let attrs = attrs_of(msg.payload, GENL_HDRLEN).unwrap_or_default();
                let name = find(&attrs, g::CTRL_ATTR_FAMILY_NAME).and_then(|a| a.str("").ok());
                if !self.wireguard || name != Some(g::WG_GENL_NAME) {
                    return vec![answer(msg, libc::ENOENT)];
                }
                let mut buf = Vec::new();
                let m = codec::begin(&mut buf, g::GENL_ID_CTRL, 0, msg.seq);
                g::genl_header(&mut buf, g::CTRL_CMD_NEWFAMILY, 2);
                codec::attr_str(&mut buf, g::CTRL_ATTR_FAMILY_NAME, g::WG_GENL_NAME);
                codec::attr_u16(&mut buf, g::CTRL_ATTR_FAMILY_ID, FAMILY);
                codec::finish(&mut buf, m);
                vec![buf, answer(msg, 0)]
            }
            (FAMILY, Some(g::WG_CMD_SET_DEVICE)) if self.wireguard => {
                self.set_messages += 1;
                self.largest_set_message = self
                    .largest_set_message
                    .max(msg.payload.len() + codec::NLMSG_HDRLEN);
                vec![answer(msg, self.set_device(msg.payload).err().unwrap_or(0))]
            }
            (FAMILY, Some(g::WG_CMD_GET_DEVICE)) if self.wireguard => match self.dump(msg) {
                Ok(datagrams) => datagrams,
                Err(errno) => vec![answer(msg, errno)],
            },
            _ => vec![answer(msg, libc::EOPNOTSUPP)],
        }
    }

    fn device(&mut self, attrs: &[Attr<'_>]) -> Result<(u32, &mut FakeLink), i32> {
        let name = find(attrs, g::WGDEVICE_A_IFNAME)
            .and_then(|a| a.str("").ok().map(str::to_owned))
            .ok_or(libc::EINVAL)?;
        let (index, link) = self.by_name(&name).ok_or(libc::ENODEV)?;
        if link.wg.is_none() {
            return Err(libc::EOPNOTSUPP);
        }
        Ok((index, link))
    }

    fn set_device(&mut self, payload: &[u8]) -> Result<(), i32> {
        let attrs = attrs_of(payload, GENL_HDRLEN).map_err(|_| libc::EINVAL)?;
        let (_, link) = self.device(&attrs)?;
        let Some(dev) = link.wg.as_mut() else {
            return Err(libc::EOPNOTSUPP);
        };
        let einval = |_| libc::EINVAL;
        if let Some(a) = find(&attrs, g::WGDEVICE_A_PRIVATE_KEY) {
            dev.private_key = Some(PrivateKey::from_bytes(&mut a.array("").map_err(einval)?));
        }
        if let Some(a) = find(&attrs, g::WGDEVICE_A_LISTEN_PORT) {
            dev.listen_port = a.u16("").map_err(einval)?;
        }
        if let Some(a) = find(&attrs, g::WGDEVICE_A_FWMARK) {
            dev.fwmark = a.u32("").map_err(einval)?;
        }
        if let Some(a) = find(&attrs, g::WGDEVICE_A_FLAGS)
            && a.u32("").map_err(einval)? & g::WGDEVICE_F_REPLACE_PEERS != 0
        {
            dev.peers.clear();
        }
        let Some(peers) = find(&attrs, g::WGDEVICE_A_PEERS) else {
            return Ok(());
        };
        for p in peers.nested() {
            let p: Vec<Attr<'_>> = p
                .map_err(einval)?
                .nested()
                .collect::<Result<_, _>>()
                .map_err(einval)?;
            let key = PublicKey::from_bytes(
                find(&p, g::WGPEER_A_PUBLIC_KEY)
                    .ok_or(libc::EINVAL)?
                    .array("")
                    .map_err(einval)?,
            );
            let flags = find(&p, g::WGPEER_A_FLAGS)
                .map_or(Ok(0), |a| a.u32(""))
                .map_err(einval)?;
            if flags & g::WGPEER_F_REMOVE_ME != 0 {
                dev.peers.retain(|x| x.key != key);
                continue;
            }
            let i = match dev.peers.iter().position(|x| x.key == key) {
                Some(i) => i,
                None => {
                    dev.peers.push(FakePeer {
                        key,
                        psk: [0; KEY_LEN],
                        endpoint: None,
                        keepalive: 0,
                        allowed: Vec::new(),
                        handshake: (0, 0),
                        rx_bytes: 0,
                        tx_bytes: 0,
                    });
                    dev.peers.len() - 1
                }
            };
            if let Some(a) = find(&p, g::WGPEER_A_PRESHARED_KEY) {
                dev.peers[i].psk = a.array("").map_err(einval)?;
            }
            if let Some(a) = find(&p, g::WGPEER_A_ENDPOINT) {
                dev.peers[i].endpoint = Some(endpoint_of(a.payload).ok_or(libc::EINVAL)?);
            }
            if let Some(a) = find(&p, g::WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL) {
                dev.peers[i].keepalive = a.u16("").map_err(einval)?;
            }
            if flags & g::WGPEER_F_REPLACE_ALLOWEDIPS != 0 {
                dev.peers[i].allowed.clear();
            }
            if let Some(list) = find(&p, g::WGPEER_A_ALLOWEDIPS) {
                for ip in list.nested() {
                    let ip: Vec<Attr<'_>> = ip
                        .map_err(einval)?
                        .nested()
                        .collect::<Result<_, _>>()
                        .map_err(einval)?;
                    let addr = find(&ip, g::WGALLOWEDIP_A_IPADDR).ok_or(libc::EINVAL)?;
                    let cidr = find(&ip, g::WGALLOWEDIP_A_CIDR_MASK)
                        .ok_or(libc::EINVAL)?
                        .u8("")
                        .map_err(einval)?;
                    let net = IpNet::new(ip_of(addr.payload).ok_or(libc::EINVAL)?, cidr)
                        .map_err(|_| libc::EINVAL)?
                        .trunc();
                    // An allowed IP belongs to one peer: setting it moves it.
                    for other in &mut dev.peers {
                        other.allowed.retain(|n| *n != net);
                    }
                    dev.peers[i].allowed.push(net);
                }
            }
        }
        Ok(())
    }

    /// A `GET_DEVICE` dump split at the budget, the kernel's way.
    fn dump(&mut self, msg: &Message<'_>) -> Result<Vec<Vec<u8>>, i32> {
        let attrs = attrs_of(msg.payload, GENL_HDRLEN).map_err(|_| libc::EINVAL)?;
        let budget = self.dump_budget;
        let flags = if self.interrupt_dumps > 0 {
            self.interrupt_dumps -= 1;
            codec::NLM_F_MULTI | codec::NLM_F_DUMP_INTR
        } else {
            codec::NLM_F_MULTI
        };
        let (index, link) = self.device(&attrs)?;
        let name = link.name.clone();
        let Some(dev) = link.wg.as_ref() else {
            return Err(libc::EOPNOTSUPP);
        };
        let mut out = Vec::new();
        let mut m = DumpMessage::open(msg.seq, flags);
        codec::attr_u16(&mut m.buf, g::WGDEVICE_A_LISTEN_PORT, dev.listen_port);
        codec::attr_u32(&mut m.buf, g::WGDEVICE_A_FWMARK, dev.fwmark);
        codec::attr_u32(&mut m.buf, g::WGDEVICE_A_IFINDEX, index);
        codec::attr_str(&mut m.buf, g::WGDEVICE_A_IFNAME, &name);
        if let Some(key) = &dev.private_key {
            codec::attr(&mut m.buf, g::WGDEVICE_A_PRIVATE_KEY, key.secret_bytes());
            codec::attr(
                &mut m.buf,
                g::WGDEVICE_A_PUBLIC_KEY,
                key.public_key().as_bytes(),
            );
        }
        m.peers = Some(codec::nest_begin(&mut m.buf, g::WGDEVICE_A_PEERS));
        for peer in &dev.peers {
            let mut next_ip = 0;
            let mut continuing = false;
            loop {
                let mark = m.buf.len();
                let nest = codec::nest_begin(&mut m.buf, 0);
                codec::attr(&mut m.buf, g::WGPEER_A_PUBLIC_KEY, peer.key.as_bytes());
                if !continuing {
                    put_peer_state(&mut m.buf, peer);
                }
                if m.buf.len() > budget && m.peer_count > 0 {
                    m.buf.truncate(mark);
                    out.push(m.close());
                    m = DumpMessage::open(msg.seq, flags);
                    m.peers = Some(codec::nest_begin(&mut m.buf, g::WGDEVICE_A_PEERS));
                    continue;
                }
                m.peer_count += 1;
                let ips = codec::nest_begin(&mut m.buf, g::WGPEER_A_ALLOWEDIPS);
                let mut added = 0;
                while let Some(net) = peer.allowed.get(next_ip) {
                    let mark = m.buf.len();
                    put_allowed_ip(&mut m.buf, *net);
                    // Always at least one per message, so the dump makes progress.
                    if m.buf.len() > budget && (added > 0 || m.peer_count > 1) {
                        m.buf.truncate(mark);
                        break;
                    }
                    added += 1;
                    next_ip += 1;
                }
                let _ = codec::nest_end(&mut m.buf, ips);
                let _ = codec::nest_end(&mut m.buf, nest);
                if next_ip < peer.allowed.len() {
                    out.push(m.close());
                    m = DumpMessage::open(msg.seq, flags);
                    m.peers = Some(codec::nest_begin(&mut m.buf, g::WGDEVICE_A_PEERS));
                    continuing = true;
                    continue;
                }
                break;
            }
        }
        let mut last = m.close();
        let done = codec::begin(&mut last, codec::NLMSG_DONE, codec::NLM_F_MULTI, msg.seq);
        last.extend_from_slice(&0i32.to_ne_bytes());
        codec::finish(&mut last, done);
        out.push(last);
        Ok(out)
    }
}

struct DumpMessage {
    buf: Vec<u8>,
    peers: Option<usize>,
    peer_count: usize,
}

impl DumpMessage {
    fn open(seq: u32, flags: u16) -> Self {
        let mut buf = Vec::new();
        codec::begin(&mut buf, FAMILY, flags, seq);
        g::genl_header(&mut buf, g::WG_CMD_GET_DEVICE, g::WG_GENL_VERSION);
        Self {
            buf,
            peers: None,
            peer_count: 0,
        }
    }

    fn close(mut self) -> Vec<u8> {
        if let Some(p) = self.peers {
            let _ = codec::nest_end(&mut self.buf, p);
        }
        codec::finish(&mut self.buf, 0);
        self.buf
    }
}

fn put_peer_state(buf: &mut Vec<u8>, peer: &FakePeer) {
    codec::attr(buf, g::WGPEER_A_PRESHARED_KEY, &peer.psk);
    let mut ts = Vec::with_capacity(16);
    ts.extend_from_slice(&peer.handshake.0.to_ne_bytes());
    ts.extend_from_slice(&peer.handshake.1.to_ne_bytes());
    codec::attr(buf, g::WGPEER_A_LAST_HANDSHAKE_TIME, &ts);
    codec::attr_u16(
        buf,
        g::WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
        peer.keepalive,
    );
    codec::attr_u64(buf, g::WGPEER_A_TX_BYTES, peer.tx_bytes);
    codec::attr_u64(buf, g::WGPEER_A_RX_BYTES, peer.rx_bytes);
    codec::attr_u32(buf, 10, 1); // WGPEER_A_PROTOCOL_VERSION
    if let Some(e) = peer.endpoint {
        let mut sa = Vec::new();
        match e {
            SocketAddr::V4(a) => {
                sa.extend_from_slice(&AF_INET.to_ne_bytes());
                sa.extend_from_slice(&a.port().to_be_bytes());
                sa.extend_from_slice(&a.ip().octets());
                sa.resize(16, 0);
            }
            SocketAddr::V6(a) => {
                sa.extend_from_slice(&AF_INET6.to_ne_bytes());
                sa.extend_from_slice(&a.port().to_be_bytes());
                sa.extend_from_slice(&a.flowinfo().to_be_bytes());
                sa.extend_from_slice(&a.ip().octets());
                sa.extend_from_slice(&a.scope_id().to_ne_bytes());
            }
        }
        codec::attr(buf, g::WGPEER_A_ENDPOINT, &sa);
    }
}

fn put_allowed_ip(buf: &mut Vec<u8>, net: IpNet) {
    let nest = codec::nest_begin(buf, 0);
    let (family, octets) = match net.addr() {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    };
    codec::attr_u16(buf, g::WGALLOWEDIP_A_FAMILY, family);
    codec::attr(buf, g::WGALLOWEDIP_A_IPADDR, &octets);
    codec::attr_u8(buf, g::WGALLOWEDIP_A_CIDR_MASK, net.prefix_len());
    let _ = codec::nest_end(buf, nest);
}

fn ip_of(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => <[u8; 16]>::try_from(b)
            .ok()
            .map(|o| IpAddr::V6(Ipv6Addr::from(o))),
        _ => None,
    }
}

fn endpoint_of(b: &[u8]) -> Option<SocketAddr> {
    let family = codec::ne_u16(b.get(..2)?);
    let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    match (family, b.len()) {
        (AF_INET, 16) => Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(b[4], b[5], b[6], b[7]),
            port,
        ))),
        (AF_INET6, 28) => {
            let ip = <[u8; 16]>::try_from(&b[8..24]).ok()?;
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                codec::ne_u32(&b[24..28]),
            )))
        }
        _ => None,
    }
}

fn encode_link_reply(seq: u32, index: u32, l: &FakeLink) -> Vec<u8> {
    let mut buf = Vec::new();
    let m = codec::begin(&mut buf, r::RTM_NEWLINK, 0, seq);
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&index.to_ne_bytes());
    buf.extend_from_slice(&u32::from(l.up).to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    codec::attr_str(&mut buf, r::IFLA_IFNAME, &l.name);
    codec::attr_u32(&mut buf, r::IFLA_MTU, l.mtu);
    if let Some(kind) = &l.kind {
        let info = codec::nest_begin(&mut buf, r::IFLA_LINKINFO);
        codec::attr_str(&mut buf, r::IFLA_INFO_KIND, kind);
        let _ = codec::nest_end(&mut buf, info);
    }
    codec::finish(&mut buf, m);
    buf
}
