//! The operations, executed on the worker thread that owns the netlink sockets: each one a few
//! netlink exchanges composed into what callers want (an idempotent link, a device configured
//! in as many messages as it takes, a whole dump joined into one [`Device`]).

use ipnet::IpNet;

use crate::device::{Device, DeviceConfig};
use crate::error::{Error, KernelError, Operation, TransportError};
use crate::link::{Link, LinkName, LinkSpec};
use crate::netlink::codec::DecodeError;
use crate::netlink::genl::{self, DumpReader};
use crate::netlink::route;
use crate::netlink::{Answer, Conn, Proto, Socket};
use crate::routing::Rule;

/// A request to the worker.
#[derive(Debug)]
pub(crate) enum Op {
    EnsureLink(LinkSpec),
    GetLink(LinkName),
    DeleteLink(LinkName),
    AddAddress(LinkName, IpNet),
    DeleteAddress(LinkName, IpNet),
    Configure(LinkName, DeviceConfig),
    ReadDevice(LinkName),
    ReplaceRoute(u32, IpNet, LinkName),
    DeleteRoute(u32, IpNet),
    Rule(Rule, bool),
}

/// The worker's answer to an [`Op`]. (`pub` in this private module only so the sealed
/// `FromReply` trait can name it.)
#[derive(Debug)]
pub enum Reply {
    Done,
    Link(Link),
    MaybeLink(Option<Link>),
    Deleted(bool),
    Device(Box<Device>),
}

pub(crate) struct Worker<S> {
    conn: Conn<S>,
    /// The `wireguard` family id, once resolved (it stays fixed while the module is loaded).
    family: Option<u16>,
    /// Largest `SET_DEVICE` message.
    set_limit: usize,
}

fn transport(op: &Operation) -> impl FnOnce(TransportError) -> Error + '_ {
    move |source| Error::Transport {
        op: op.clone(),
        source,
    }
}

fn refused(op: Operation, source: KernelError) -> Error {
    Error::Kernel { op, source }
}

impl<S: Socket> Worker<S> {
    pub(crate) fn new(route: S, genl: S, set_limit: usize) -> Self {
        Self {
            conn: Conn::new(route, genl),
            family: None,
            set_limit,
        }
    }

    pub(crate) fn run(&mut self, op: Op) -> Result<Reply, Error> {
        match op {
            Op::EnsureLink(spec) => self.ensure_link(&spec).map(Reply::Link),
            Op::GetLink(name) => self.get_link(&name).map(Reply::MaybeLink),
            Op::DeleteLink(name) => self.delete_link(&name).map(Reply::Deleted),
            Op::AddAddress(name, net) => self.address(&name, net, true).map(|()| Reply::Done),
            Op::DeleteAddress(name, net) => self.address(&name, net, false).map(|()| Reply::Done),
            Op::Configure(name, config) => self.configure(&name, &config).map(|()| Reply::Done),
            Op::ReadDevice(name) => self.read_device(&name).map(|d| Reply::Device(Box::new(d))),
            Op::ReplaceRoute(table, dst, name) => {
                self.replace_route(table, dst, &name).map(|()| Reply::Done)
            }
            Op::DeleteRoute(table, dst) => self.delete_route(table, dst).map(|()| Reply::Done),
            Op::Rule(rule, add) => self.rule(rule, add).map(|()| Reply::Done),
        }
    }

    /// One route request with at most one data reply.
    fn route_request(
        &mut self,
        op: &Operation,
        encode: impl FnOnce(&mut Vec<u8>, u32),
    ) -> Result<(Answer, Option<Link>), Error> {
        let msgs = self.conn.encode(0, |buf, next| {
            let seq = next();
            let start = buf.len();
            encode(buf, seq);
            vec![(start, seq)]
        });
        let mut link = None;
        let mut answers = self
            .conn
            .transact(Proto::Route, &msgs, &mut |_, msg| {
                if msg.ty == route::RTM_NEWLINK {
                    link = Some(route::decode_link(msg.payload)?);
                }
                Ok(())
            })
            .map_err(transport(op))?;
        Ok((answers.pop().unwrap_or(Ok(())), link))
    }

    fn get_link(&mut self, name: &LinkName) -> Result<Option<Link>, Error> {
        let op = Operation::GetLink(name.clone());
        let (answer, link) = self.route_request(&op, |buf, seq| {
            route::encode_get_link(buf, seq, name.as_str())
        })?;
        match answer {
            Ok(()) => Ok(link),
            Err(e) if e.errno == libc::ENODEV => Ok(None),
            Err(e) => Err(refused(op, e)),
        }
    }

    /// The existing WireGuard link of that name, `None` if there is none, an error if the name
    /// belongs to another kind of link.
    fn own_link(&mut self, name: &LinkName) -> Result<Option<Link>, Error> {
        match self.get_link(name)? {
            Some(link) if link.is_wireguard() => Ok(Some(link)),
            Some(link) => Err(Error::WrongKind {
                name: name.clone(),
                kind: link.kind,
            }),
            None => Ok(None),
        }
    }

    fn ensure_link(&mut self, spec: &LinkSpec) -> Result<Link, Error> {
        let name = &spec.name;
        // Two rounds: a link created by someone else between our look-up and our create makes
        // the create fail with EEXIST; the second look-up then judges that link.
        let mut link = None;
        for _ in 0..2 {
            if let Some(existing) = self.own_link(name)? {
                link = Some(existing);
                break;
            }
            let op = Operation::CreateLink(name.clone());
            let (answer, _) = self.route_request(&op, |buf, seq| {
                route::encode_create_link(buf, seq, name.as_str(), spec.mtu);
            })?;
            match answer {
                Ok(()) => {}
                Err(e) if e.errno == libc::EEXIST => {}
                // The kernel cannot find (or load) the `wireguard` link type.
                Err(e) if e.errno == libc::EOPNOTSUPP => return Err(Error::NoWireGuard),
                Err(e) => return Err(refused(op, e)),
            }
        }
        let Some(mut link) = link.map_or_else(|| self.own_link(name), |l| Ok(Some(l)))? else {
            return Err(refused(
                Operation::GetLink(name.clone()),
                KernelError {
                    errno: libc::ENODEV,
                    message: Some("the link vanished right after it was created".into()),
                },
            ));
        };
        if link.mtu != spec.mtu || !link.up {
            let op = Operation::SetLink(name.clone());
            let index = link.index;
            let (answer, _) = self.route_request(&op, |buf, seq| {
                route::encode_set_link(buf, seq, index, spec.mtu);
            })?;
            answer.map_err(|e| refused(op, e))?;
            link.mtu = spec.mtu;
            link.up = true;
        }
        for net in &spec.addresses {
            self.address_on(link.index, name, *net, true)?;
        }
        Ok(link)
    }

    fn delete_link(&mut self, name: &LinkName) -> Result<bool, Error> {
        let Some(link) = self.own_link(name)? else {
            return Ok(false);
        };
        let op = Operation::DeleteLink(name.clone());
        let (answer, _) = self.route_request(&op, |buf, seq| {
            route::encode_delete_link(buf, seq, link.index)
        })?;
        match answer {
            Ok(()) => Ok(true),
            Err(e) if e.errno == libc::ENODEV => Ok(false),
            Err(e) => Err(refused(op, e)),
        }
    }

    fn address(&mut self, name: &LinkName, net: IpNet, add: bool) -> Result<(), Error> {
        let Some(link) = self.own_link(name)? else {
            let op = if add {
                Operation::AddAddress(name.clone(), net)
            } else {
                Operation::DeleteAddress(name.clone(), net)
            };
            return Err(refused(
                op,
                KernelError {
                    errno: libc::ENODEV,
                    message: None,
                },
            ));
        };
        self.address_on(link.index, name, net, add)
    }

    fn address_on(
        &mut self,
        index: u32,
        name: &LinkName,
        net: IpNet,
        add: bool,
    ) -> Result<(), Error> {
        let op = if add {
            Operation::AddAddress(name.clone(), net)
        } else {
            Operation::DeleteAddress(name.clone(), net)
        };
        let (answer, _) = self.route_request(&op, |buf, seq| {
            route::encode_address(buf, seq, add, index, net)
        })?;
        match answer {
            Ok(()) => Ok(()),
            // Removing an address that is not there already has the wanted outcome.
            Err(e) if !add && e.errno == libc::EADDRNOTAVAIL => Ok(()),
            Err(e) => Err(refused(op, e)),
        }
    }

    fn replace_route(&mut self, table: u32, dst: IpNet, name: &LinkName) -> Result<(), Error> {
        let op = Operation::ReplaceRoute {
            table,
            dst,
            name: name.clone(),
        };
        let Some(link) = self.own_link(name)? else {
            return Err(refused(
                op,
                KernelError {
                    errno: libc::ENODEV,
                    message: None,
                },
            ));
        };
        let (answer, _) = self.route_request(&op, |buf, seq| {
            route::encode_route(buf, seq, table, dst, Some(link.index));
        })?;
        answer.map_err(|e| refused(op, e))
    }

    fn delete_route(&mut self, table: u32, dst: IpNet) -> Result<(), Error> {
        let op = Operation::DeleteRoute { table, dst };
        let (answer, _) = self.route_request(&op, |buf, seq| {
            route::encode_route(buf, seq, table, dst, None)
        })?;
        match answer {
            Ok(()) => Ok(()),
            // A route that is not there already has the wanted outcome.
            Err(e) if e.errno == libc::ESRCH || e.errno == libc::ENOENT => Ok(()),
            Err(e) => Err(refused(op, e)),
        }
    }

    fn rule(&mut self, rule: Rule, add: bool) -> Result<(), Error> {
        let op = if add {
            Operation::AddRule(rule)
        } else {
            Operation::DeleteRule(rule)
        };
        let (answer, _) =
            self.route_request(&op, |buf, seq| route::encode_rule(buf, seq, add, rule))?;
        match answer {
            Ok(()) => Ok(()),
            // The rule is there (a previous agent's) or already gone: the wanted outcome.
            Err(e) if add && e.errno == libc::EEXIST => Ok(()),
            Err(e) if !add && e.errno == libc::ENOENT => Ok(()),
            Err(e) => Err(refused(op, e)),
        }
    }

    fn family(&mut self) -> Result<u16, Error> {
        if let Some(id) = self.family {
            return Ok(id);
        }
        let op = Operation::ResolveFamily;
        let msgs = self.conn.encode(0, |buf, next| {
            let seq = next();
            genl::encode_get_family(buf, seq, genl::WG_GENL_NAME);
            vec![(0, seq)]
        });
        let mut id = None;
        let mut answers = self
            .conn
            .transact(Proto::Generic, &msgs, &mut |_, msg| {
                if msg.ty == genl::GENL_ID_CTRL {
                    id = Some(genl::decode_family(msg.payload)?);
                }
                Ok(())
            })
            .map_err(transport(&op))?;
        match answers.pop().unwrap_or(Ok(())) {
            Ok(()) => {}
            Err(e) if e.errno == libc::ENOENT => return Err(Error::NoWireGuard),
            Err(e) => return Err(refused(op, e)),
        }
        let id = id.ok_or_else(|| {
            transport(&op)(TransportError::Decode(DecodeError::Missing {
                what: "CTRL_CMD_NEWFAMILY reply",
            }))
        })?;
        self.family = Some(id);
        Ok(id)
    }

    fn configure(&mut self, name: &LinkName, config: &DeviceConfig) -> Result<(), Error> {
        let family = self.family()?;
        let limit = self.set_limit;
        let msgs = self
            .conn
            .encode(genl::encoded_bound(config, limit), |buf, next| {
                genl::encode_set_device(buf, family, name.as_str(), config, limit, next)
            });
        let parts = msgs.len();
        let op = |part| Operation::ConfigureDevice {
            name: name.clone(),
            part,
            parts,
        };
        let answers = self
            .conn
            .transact(Proto::Generic, &msgs, &mut |_, _| Ok(()))
            .map_err(|source| Error::Transport { op: op(1), source })?;
        // The first refusal is reported; later messages were still applied by the kernel.
        match answers
            .into_iter()
            .enumerate()
            .find_map(|(i, a)| a.err().map(|e| (i, e)))
        {
            None => Ok(()),
            Some((i, e)) => Err(refused(op(i + 1), e)),
        }
    }

    fn read_device(&mut self, name: &LinkName) -> Result<Device, Error> {
        let family = self.family()?;
        let op = Operation::ReadDevice(name.clone());
        let mut reader = DumpReader::default();
        let answer = {
            let reader = std::cell::RefCell::new(&mut reader);
            self.conn
                .dump(
                    Proto::Generic,
                    &|buf, seq| genl::encode_get_device(buf, family, seq, name.as_str()),
                    &mut |msg| {
                        if msg.ty == family {
                            reader.borrow_mut().message(msg.payload)?;
                        }
                        Ok(())
                    },
                    &mut || **reader.borrow_mut() = DumpReader::default(),
                )
                .map_err(transport(&op))?
        };
        answer.map_err(|e| refused(op.clone(), e))?;
        reader
            .finish()
            .map_err(|e| transport(&op)(TransportError::Decode(e)))
    }
}

#[cfg(test)]
mod tests {
    use crate::test_helpers::{FakeKernel, peer, preshared_key, private_key, public_key};
    use crate::{DeviceConfig, Error, Handle, LinkName, LinkSpec, PeerConfig, TransportError};

    fn name() -> LinkName {
        LinkName::default()
    }

    #[tokio::test]
    async fn routes_replace_and_delete_idempotently_and_rules_may_exist() {
        use crate::{Family, Rule};
        let kernel = FakeKernel::new();
        let h = Handle::with_fake(&kernel);
        h.links()
            .ensure(LinkSpec::default())
            .execute()
            .await
            .unwrap();
        let cidr: ipnet::IpNet = "10.244.2.0/24".parse().unwrap();
        for _ in 0..2 {
            h.routes()
                .replace(20051, cidr, name())
                .execute()
                .await
                .unwrap();
        }
        assert_eq!(kernel.routes(20051), [(cidr, "nodeseal0".to_owned())]);
        assert!(
            kernel.routes(254).is_empty(),
            "the main table is never touched"
        );
        for _ in 0..2 {
            h.routes().delete(20051, cidr).execute().await.unwrap();
        }
        assert!(kernel.routes(20051).is_empty());

        kernel.add_foreign_link("eth9", "veth");
        let e = h
            .routes()
            .replace(20051, cidr, LinkName::new("eth9").unwrap())
            .execute()
            .await
            .unwrap_err();
        assert!(matches!(e, Error::WrongKind { .. }), "{e}");

        let rule = Rule::all(Family::V4, 100, 20051);
        for _ in 0..2 {
            h.routes().add_rule(rule).execute().await.unwrap();
        }
        assert_eq!(kernel.rules(), [rule]);
        for _ in 0..2 {
            h.routes().delete_rule(rule).execute().await.unwrap();
        }
        assert!(kernel.rules().is_empty());

        // Routes through a deleted link go with it.
        h.routes()
            .replace(20051, cidr, name())
            .execute()
            .await
            .unwrap();
        h.links().delete(name()).execute().await.unwrap();
        assert!(kernel.routes(20051).is_empty());
    }

    #[tokio::test]
    async fn ensure_creates_once_then_reuses_and_refuses_foreign_kinds() {
        let kernel = FakeKernel::new();
        let h = Handle::with_fake(&kernel);
        let spec = LinkSpec::default()
            .mtu(1380)
            .address("10.99.0.1/32".parse().unwrap());
        let link = h.links().ensure(spec.clone()).execute().await.unwrap();
        assert!(
            link.is_wireguard() && link.up && link.mtu == 1380,
            "{link:?}"
        );
        let again = h.links().ensure(spec).execute().await.unwrap();
        assert_eq!(again.index, link.index, "reused, not recreated");
        assert_eq!(kernel.link("nodeseal0").unwrap().mtu, 1380);
        assert_eq!(
            kernel.addresses("nodeseal0"),
            ["10.99.0.1/32".parse().unwrap()]
        );

        kernel.add_foreign_link("eth9", "veth");
        let eth9 = LinkName::new("eth9").unwrap();
        let e = h
            .links()
            .ensure(LinkSpec::new(eth9.clone()))
            .execute()
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::WrongKind { name, kind } if *name == eth9 && kind.as_deref() == Some("veth")),
            "{e:?}"
        );
        let e = h.links().delete(eth9.clone()).execute().await.unwrap_err();
        assert!(matches!(e, Error::WrongKind { .. }), "{e:?}");
        assert!(
            kernel.link("eth9").is_some(),
            "a foreign link is never deleted"
        );

        h.links()
            .delete_address(name(), "10.99.0.1/32".parse().unwrap())
            .execute()
            .await
            .unwrap();
        assert!(kernel.addresses("nodeseal0").is_empty());
        assert!(h.links().delete(name()).execute().await.unwrap());
        assert!(!h.links().delete(name()).execute().await.unwrap());
        assert!(h.links().get(name()).execute().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_kernel_without_wireguard_says_so() {
        let kernel = FakeKernel::new();
        kernel.remove_wireguard();
        let h = Handle::with_fake(&kernel);
        let e = h
            .links()
            .ensure(LinkSpec::default())
            .execute()
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoWireGuard), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the kernel has no WireGuard (modprobe wireguard)"
        );
        let e = h.device(name()).get().execute().await.unwrap_err();
        assert!(matches!(e, Error::NoWireGuard), "{e:?}");
    }

    #[tokio::test]
    async fn device_configuration_reads_back_exactly() {
        let kernel = FakeKernel::new();
        let h = Handle::with_fake(&kernel);
        h.links()
            .ensure(LinkSpec::default())
            .execute()
            .await
            .unwrap();
        let key = private_key(0);
        let p1 = peer(1).persistent_keepalive(25);
        let p2 = peer(2).endpoint("[fd00::2]:4000".parse().unwrap());
        let config = DeviceConfig::new()
            .private_key(key.clone())
            .listen_port(51820)
            .fwmark(0x0e00)
            .peer(p1.clone())
            .peer(p2.clone());
        h.device(name()).configure(config).execute().await.unwrap();
        let dev = h.device(name()).get().execute().await.unwrap();
        assert_eq!(dev.private_key.as_ref(), Some(&key));
        assert_eq!(dev.public_key, Some(key.public_key()));
        assert_eq!((dev.listen_port, dev.fwmark), (51820, 0x0e00));
        assert_eq!(dev.peers.len(), 2);
        assert!(dev.peer(&p1.public_key).unwrap().matches(&p1));
        assert!(dev.peer(&p2.public_key).unwrap().matches(&p2));

        // Replace p1's allowed IPs and clear its PSK; remove p2.
        let p1b = PeerConfig::new(p1.public_key).allowed_ips(["10.200.0.0/16".parse().unwrap()]);
        h.device(name())
            .set_peer(p1b.clone())
            .execute()
            .await
            .unwrap();
        h.device(name())
            .remove_peer(p2.public_key)
            .execute()
            .await
            .unwrap();
        let dev = h.device(name()).get().execute().await.unwrap();
        assert_eq!(dev.peers.len(), 1);
        let got = &dev.peers[0];
        assert!(got.matches(&p1b), "{got:?}");
        assert_eq!(got.preshared_key, None);
        assert_eq!(got.endpoint, p1.endpoint, "an unset endpoint is kept");
        assert_eq!(got.persistent_keepalive_secs, 0);

        // replace_peers leaves only the new set.
        let config = DeviceConfig::new().replace_peers().peer(peer(3));
        h.device(name()).configure(config).execute().await.unwrap();
        let dev = h.device(name()).get().execute().await.unwrap();
        let keys: Vec<_> = dev.peers.iter().map(|p| p.public_key).collect();
        assert_eq!(keys, [public_key(3)]);
        assert_eq!(dev.peers[0].preshared_key, Some(preshared_key(3)));
    }

    #[tokio::test]
    async fn five_thousand_peers_round_trip_through_split_messages_and_dumps() {
        let kernel = FakeKernel::new();
        let h = Handle::with_fake(&kernel);
        h.links()
            .ensure(LinkSpec::default())
            .execute()
            .await
            .unwrap();
        let peers: Vec<PeerConfig> = (1..=5000).map(peer).collect();
        let config = peers
            .iter()
            .cloned()
            .fold(DeviceConfig::new().replace_peers(), DeviceConfig::peer);
        h.device(name()).configure(config).execute().await.unwrap();
        assert!(kernel.set_messages() > 20, "{}", kernel.set_messages());
        assert!(kernel.largest_set_message() <= 32 * 1024 + 200);
        let dev = h.device(name()).get().execute().await.unwrap();
        assert_eq!(dev.peers.len(), 5000);
        for (got, want) in dev.peers.iter().zip(&peers) {
            assert!(got.matches(want), "{got:?} vs {want:?}");
        }
    }

    #[tokio::test]
    async fn a_peer_with_many_allowed_ips_spans_messages_both_ways() {
        let kernel = FakeKernel::new();
        kernel.set_set_message_limit(1024);
        kernel.set_dump_budget(512);
        let h = Handle::with_fake(&kernel);
        h.links()
            .ensure(LinkSpec::default())
            .execute()
            .await
            .unwrap();
        let nets = (0..300u32).map(|i| {
            let [_, _, a, b] = i.to_be_bytes();
            // 10.128.0.0/9: clear of the fixture's own pod CIDRs.
            format!("10.{}.{b}.0/24", 128 + a).parse().unwrap()
        });
        let big = peer(1).allowed_ips(nets);
        let config = DeviceConfig::new().peer(big.clone()).peer(peer(2));
        h.device(name()).configure(config).execute().await.unwrap();
        assert!(kernel.set_messages() > 5, "{}", kernel.set_messages());
        let dev = h.device(name()).get().execute().await.unwrap();
        assert_eq!(dev.peers.len(), 2);
        assert_eq!(dev.peers[0].allowed_ips, big.allowed_ips, "order kept");
        assert!(dev.peers[1].matches(&peer(2)));
    }

    #[tokio::test]
    async fn interrupted_dumps_are_retried_then_reported() {
        let kernel = FakeKernel::new();
        let h = Handle::with_fake(&kernel);
        h.links()
            .ensure(LinkSpec::default())
            .execute()
            .await
            .unwrap();
        h.device(name()).set_peer(peer(1)).execute().await.unwrap();
        kernel.interrupt_next_dumps(2);
        let dev = h.device(name()).get().execute().await.unwrap();
        assert_eq!(dev.peers.len(), 1, "no duplicates from the retried dump");
        kernel.interrupt_next_dumps(100);
        let e = h.device(name()).get().execute().await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Transport {
                    source: TransportError::DumpInterrupted,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn kernel_refusals_name_the_operation() {
        let kernel = FakeKernel::new();
        let h = Handle::with_fake(&kernel);
        let missing = LinkName::new("nope0").unwrap();
        let e = h
            .device(missing)
            .set_peer(peer(1))
            .execute()
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        assert_eq!(e.to_string(), "cannot configure WireGuard device nope0");
        let e = h
            .links()
            .add_address(name(), "10.0.0.1/32".parse().unwrap())
            .execute()
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "cannot add address 10.0.0.1/32 to nodeseal0");
    }
}
