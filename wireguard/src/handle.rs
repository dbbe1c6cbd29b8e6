//! [`Handle`]: the rtnetlink-style entry point. Requests are built from `links()` /
//! `device(name)` and finish with `.execute().await`.
//!
//! Netlink calls block, so the sockets live on one dedicated worker thread (the only thread
//! that ever enters another network namespace); requests reach it over a channel and answers
//! come back on a oneshot, so async callers never block a runtime thread. The worker ends when
//! the last `Handle` clone drops.

use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::sync::mpsc;

use ipnet::IpNet;
use tokio::sync::oneshot;

use crate::device::{Device, DeviceConfig, PeerConfig};
use crate::error::{Error, Operation};
use crate::key::PublicKey;
use crate::link::{Link, LinkName, LinkSpec};
use crate::netlink::{self, NetlinkSocket, Proto, SET_MESSAGE_LIMIT, Socket};
use crate::routing::Rule;
use crate::worker::{Op, Reply, Worker};

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Reply, Error>>,
}

/// A cheap-clone handle to one worker (two netlink sockets in one network namespace).
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

fn open_sockets() -> Result<(NetlinkSocket, NetlinkSocket), crate::TransportError> {
    Ok((
        NetlinkSocket::open(Proto::Route)?,
        NetlinkSocket::open(Proto::Generic)?,
    ))
}

impl Handle {
    /// A handle for the network namespace of the calling thread.
    ///
    /// # Errors
    /// [`Error::Transport`] if a socket cannot be opened.
    pub fn new() -> Result<Self, Error> {
        let (route, genl) = open_sockets().map_err(|source| Error::Transport {
            op: Operation::Open,
            source,
        })?;
        Ok(Self::spawn(route, genl, SET_MESSAGE_LIMIT))
    }

    /// A handle for the network namespace `netns` (an open `/run/netns/NAME` or
    /// `/proc/PID/ns/net`). The calling thread never changes namespace.
    ///
    /// # Errors
    /// [`Error::Transport`] if the namespace cannot be entered or a socket opened.
    pub fn in_namespace(netns: impl AsFd) -> Result<Self, Error> {
        let (route, genl) =
            netlink::in_namespace(netns.as_fd(), open_sockets).map_err(|source| {
                Error::Transport {
                    op: Operation::Open,
                    source,
                }
            })?;
        Ok(Self::spawn(route, genl, SET_MESSAGE_LIMIT))
    }

    /// A handle over the in-memory fake kernel, whose clones share its state.
    #[cfg(any(test, feature = "testing"))]
    #[must_use]
    pub fn with_fake(kernel: &crate::test_helpers::FakeKernel) -> Self {
        let (route, genl) = kernel.sockets();
        Self::spawn(route, genl, kernel.set_message_limit())
    }

    fn spawn<S: Socket>(route: S, genl: S, set_limit: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        // If the thread cannot be spawned, `rx` drops and every request reports WorkerGone.
        let _ = std::thread::Builder::new()
            .name("nodeseal-wg".into())
            .spawn(move || {
                let mut worker = Worker::new(route, genl, set_limit);
                while let Ok(job) = rx.recv() {
                    let _ = job.reply.send(worker.run(job.op));
                }
            });
        Self { tx }
    }

    /// Requests about the WireGuard link (`ip link`, `ip address`).
    #[must_use]
    pub const fn links(&self) -> LinkRequests<'_> {
        LinkRequests { handle: self }
    }

    /// Requests about routes into the link and policy rules (`ip route`, `ip rule`).
    #[must_use]
    pub const fn routes(&self) -> RouteRequests<'_> {
        RouteRequests { handle: self }
    }

    /// Requests about the WireGuard device on link `name` (`wg`).
    #[must_use]
    pub const fn device(&self, name: LinkName) -> DeviceRequests<'_> {
        DeviceRequests { handle: self, name }
    }

    async fn submit(&self, op: Op) -> Result<Reply, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { op, reply })
            .map_err(|_| Error::WorkerGone)?;
        rx.await.map_err(|_| Error::WorkerGone)?
    }
}

/// Builders for link requests.
#[derive(Debug)]
pub struct LinkRequests<'a> {
    handle: &'a Handle,
}

impl LinkRequests<'_> {
    /// Makes sure the link exists as `spec` says: creates it if missing (an existing WireGuard
    /// link of that name is reused), sets the MTU, brings it up and adds the addresses.
    /// `ip link add NAME type wireguard; ip link set NAME mtu MTU up; ip address replace ...`.
    ///
    /// Fails with [`Error::WrongKind`] if the name belongs to a link of another kind, and with
    /// [`Error::NoWireGuard`] if the kernel has no WireGuard.
    #[doc(alias = "RTM_NEWLINK")]
    pub fn ensure(&self, spec: LinkSpec) -> Request<Link> {
        Request::new(self.handle, Op::EnsureLink(spec))
    }

    /// Reads a link of any kind; `None` if there is none. `ip -d link show NAME`.
    #[doc(alias = "RTM_GETLINK")]
    pub fn get(&self, name: LinkName) -> Request<Option<Link>> {
        Request::new(self.handle, Op::GetLink(name))
    }

    /// Deletes the WireGuard link (and with it the device and all its peers); `false` if there
    /// was none. A link of another kind is never deleted ([`Error::WrongKind`]).
    /// `ip link del NAME`.
    #[doc(alias = "RTM_DELLINK")]
    pub fn delete(&self, name: LinkName) -> Request<bool> {
        Request::new(self.handle, Op::DeleteLink(name))
    }

    /// Adds an address to the WireGuard link (again is fine). `ip address replace NET dev NAME`.
    #[doc(alias = "RTM_NEWADDR")]
    pub fn add_address(&self, name: LinkName, net: IpNet) -> Request<()> {
        Request::new(self.handle, Op::AddAddress(name, net))
    }

    /// Removes an address from the WireGuard link (absent is fine). `ip address del NET dev NAME`.
    #[doc(alias = "RTM_DELADDR")]
    pub fn delete_address(&self, name: LinkName, net: IpNet) -> Request<()> {
        Request::new(self.handle, Op::DeleteAddress(name, net))
    }
}

/// Builders for route and rule requests.
#[derive(Debug)]
pub struct RouteRequests<'a> {
    handle: &'a Handle,
}

impl RouteRequests<'_> {
    /// Routes `dst` into the WireGuard link `name` in `table`, replacing a route to `dst` that
    /// is there. `ip route replace DST dev NAME table TABLE`.
    ///
    /// Fails with [`Error::WrongKind`] if `name` is not a WireGuard link.
    #[doc(alias = "RTM_NEWROUTE")]
    pub fn replace(&self, table: u32, dst: IpNet, name: LinkName) -> Request<()> {
        Request::new(self.handle, Op::ReplaceRoute(table, dst, name))
    }

    /// Removes the route to `dst` from `table` (absent is fine). `ip route del DST table TABLE`.
    #[doc(alias = "RTM_DELROUTE")]
    pub fn delete(&self, table: u32, dst: IpNet) -> Request<()> {
        Request::new(self.handle, Op::DeleteRoute(table, dst))
    }

    /// Adds `rule` (already there is fine). `ip rule add priority P lookup T`.
    #[doc(alias = "RTM_NEWRULE")]
    pub fn add_rule(&self, rule: Rule) -> Request<()> {
        Request::new(self.handle, Op::Rule(rule, true))
    }

    /// Removes `rule` (absent is fine). `ip rule del priority P lookup T`.
    #[doc(alias = "RTM_DELRULE")]
    pub fn delete_rule(&self, rule: Rule) -> Request<()> {
        Request::new(self.handle, Op::Rule(rule, false))
    }
}

/// Builders for requests about one WireGuard device.
#[derive(Debug)]
pub struct DeviceRequests<'a> {
    handle: &'a Handle,
    name: LinkName,
}

impl DeviceRequests<'_> {
    /// Applies `config` (`wg set` / `wg setconf`). Large configurations are split into several
    /// messages; each is applied by the kernel on its own, so a failure part-way leaves the
    /// earlier parts applied (the error says which message failed).
    #[doc(alias = "WG_CMD_SET_DEVICE")]
    pub fn configure(self, config: DeviceConfig) -> Request<()> {
        Request::new(self.handle, Op::Configure(self.name, config))
    }

    /// Adds a peer or replaces its settings. `wg set NAME peer KEY ...`.
    pub fn set_peer(self, peer: PeerConfig) -> Request<()> {
        self.configure(DeviceConfig::new().peer(peer))
    }

    /// Removes a peer (absent is fine). `wg set NAME peer KEY remove`.
    pub fn remove_peer(self, key: PublicKey) -> Request<()> {
        self.configure(DeviceConfig::new().remove_peer(key))
    }

    /// Reads the device, its keys and all peers with their counters. `wg show NAME dump`.
    #[doc(alias = "WG_CMD_GET_DEVICE")]
    pub fn get(self) -> Request<Device> {
        Request::new(self.handle, Op::ReadDevice(self.name))
    }
}

mod sealed {
    use crate::worker::Reply;

    /// Converts the worker's reply into a request's output type.
    pub trait FromReply: Sized {
        fn from_reply(reply: Reply) -> Option<Self>;
    }
}
use sealed::FromReply;

impl FromReply for () {
    fn from_reply(reply: Reply) -> Option<Self> {
        matches!(reply, Reply::Done).then_some(())
    }
}

impl FromReply for Link {
    fn from_reply(reply: Reply) -> Option<Self> {
        match reply {
            Reply::Link(l) => Some(l),
            _ => None,
        }
    }
}

impl FromReply for Option<Link> {
    fn from_reply(reply: Reply) -> Option<Self> {
        match reply {
            Reply::MaybeLink(l) => Some(l),
            _ => None,
        }
    }
}

impl FromReply for bool {
    fn from_reply(reply: Reply) -> Option<Self> {
        match reply {
            Reply::Deleted(b) => Some(b),
            _ => None,
        }
    }
}

impl FromReply for Device {
    fn from_reply(reply: Reply) -> Option<Self> {
        match reply {
            Reply::Device(d) => Some(*d),
            _ => None,
        }
    }
}

/// One request, ready to `execute`.
#[derive(Debug)]
#[must_use = "a request does nothing until executed"]
pub struct Request<T> {
    handle: Handle,
    op: Op,
    out: PhantomData<fn() -> T>,
}

impl<T: FromReply> Request<T> {
    fn new(handle: &Handle, op: Op) -> Self {
        Self {
            handle: handle.clone(),
            op,
            out: PhantomData,
        }
    }

    /// Sends the request to the worker and waits for the outcome.
    ///
    /// # Errors
    /// [`Error`] naming the operation that failed.
    pub async fn execute(self) -> Result<T, Error> {
        let reply = self.handle.submit(self.op).await?;
        // The worker answers each op with its own reply kind; anything else is our bug.
        T::from_reply(reply).ok_or(Error::UnexpectedReply)
    }
}
