//! Fakes for the peer lifecycle's tests: an in-memory datapath and nodes that each have a fake
//! XFRM kernel, a datapath and an identity from a test CA, with handshakes run in-process over
//! duplex streams.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipnet::IpNet;
use nodeseal_bpf::NodeId;
use nodeseal_keymgr::handshake::{self, Agreement, HandshakeConfig};
use nodeseal_keymgr::test_helpers::TestPki;
use nodeseal_keymgr::{Epoch, ExpectedPeer, Hello, Mode, NodeName, Spi, SpiffeId};
use nodeseal_xfrm::Handle;
use nodeseal_xfrm::test_helpers::FakeKernel;
use tokio::io::DuplexStream;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::ipsec::{IpsecTunnel, KeySlot, SaLimits};
use super::task::TaskContext;
use super::{LocalEnd, PeerDatapath, PeerHandle, PeerInfo, PeerSettings, PeerTask};
use crate::datapath::DatapathError;
use crate::metrics::Metrics;
use crate::pace::Pace;

/// The eBPF maps a peer task writes, in memory.
#[derive(Debug, Default)]
pub struct FakeDatapath {
    maps: Mutex<Maps>,
}

#[derive(Debug, Default)]
struct Maps {
    ids: HashMap<IpAddr, NodeId>,
    routes: HashMap<NodeId, Vec<IpNet>>,
    slots: HashMap<NodeId, KeySlot>,
    admitted: HashSet<IpAddr>,
    addresses: HashMap<IpAddr, NodeId>,
}

impl FakeDatapath {
    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().expect("fake datapath lock")
    }

    /// The slot traffic to `id` uses.
    pub fn slot_of(&self, id: NodeId) -> Option<KeySlot> {
        self.maps().slots.get(&id).copied()
    }

    /// Sets a slot as a previous agent would have left it.
    pub fn leave_slot(&self, id: NodeId, slot: KeySlot) {
        self.maps().slots.insert(id, slot);
    }

    /// Whether ESP from `ip` is admitted.
    pub fn is_admitted(&self, ip: IpAddr) -> bool {
        self.maps().admitted.contains(&ip)
    }

    /// The routes of node `id`.
    pub fn routes_of(&self, id: NodeId) -> Vec<IpNet> {
        self.maps().routes.get(&id).cloned().unwrap_or_default()
    }

    /// The node a dual-stack peer's other node IP was given to.
    pub fn node_of_address(&self, ip: IpAddr) -> Option<NodeId> {
        self.maps().addresses.get(&ip).copied()
    }

    /// Whether the node at `ip` has an id.
    pub fn knows(&self, ip: IpAddr) -> bool {
        self.maps().ids.contains_key(&ip)
    }
}

impl PeerDatapath for FakeDatapath {
    fn node_id(&self, ip: IpAddr) -> Result<NodeId, DatapathError> {
        let mut maps = self.maps();
        let next = u16::try_from(maps.ids.len() + 1).expect("few test nodes");
        Ok(*maps.ids.entry(ip).or_insert(NodeId(next)))
    }

    fn set_peer_routes(&self, id: NodeId, pod_cidrs: &[IpNet]) -> Result<(), DatapathError> {
        self.maps().routes.insert(id, pod_cidrs.to_vec());
        Ok(())
    }

    fn admit_node(&self, _id: NodeId, ip: IpAddr) -> Result<(), DatapathError> {
        self.maps().admitted.insert(ip);
        Ok(())
    }

    fn add_node_address(&self, id: NodeId, ip: IpAddr) -> Result<(), DatapathError> {
        self.maps().addresses.insert(ip, id);
        Ok(())
    }

    fn set_slot(&self, id: NodeId, slot: Option<KeySlot>) -> Result<(), DatapathError> {
        let mut maps = self.maps();
        match slot {
            Some(slot) => maps.slots.insert(id, slot),
            None => maps.slots.remove(&id),
        };
        Ok(())
    }

    fn slot(&self, id: NodeId) -> Result<Option<KeySlot>, DatapathError> {
        Ok(self.slot_of(id))
    }

    fn remove_peer(
        &self,
        id: NodeId,
        ips: &[IpAddr],
        _pod_cidrs: &[IpNet],
    ) -> Result<(), DatapathError> {
        let mut maps = self.maps();
        maps.addresses.retain(|_, owner| *owner != id);
        for ip in ips {
            maps.ids.remove(ip);
            maps.admitted.remove(ip);
        }
        maps.routes.remove(&id);
        maps.slots.remove(&id);
        Ok(())
    }
}

/// The grace period of test nodes.
pub const GRACE: Duration = Duration::from_secs(30);
/// The retention of test nodes.
pub const RETENTION: Duration = Duration::from_secs(300);

/// A node of a test cluster: `node{n}` at `10.0.0.{n}` with pods in `10.244.{n}.0/24`.
pub struct Node {
    pub name: NodeName,
    pub ip: IpAddr,
    pub cidr: IpNet,
    pub config: HandshakeConfig,
    pub kernel: FakeKernel,
    pub xfrm: Handle,
    pub datapath: Arc<FakeDatapath>,
}

impl Node {
    pub fn new(pki: &TestPki, n: u8) -> Self {
        let name: NodeName = format!("node{n}").parse().expect("node name");
        let identity = pki.identity(name.as_str());
        let kernel = FakeKernel::new();
        Self {
            config: HandshakeConfig::new(pki.trust_store(), &identity).expect("handshake config"),
            ip: format!("10.0.0.{n}").parse().expect("node ip"),
            cidr: format!("10.244.{n}.0/24").parse().expect("pod cidr"),
            name,
            xfrm: Handle::with_kernel(kernel.clone()),
            kernel,
            datapath: Arc::new(FakeDatapath::default()),
        }
    }

    /// What this node's store says about it.
    pub fn info(&self) -> PeerInfo {
        PeerInfo {
            name: self.name.clone(),
            spiffe_id: SpiffeId::new(&format!("spiffe://cluster.local/node/{}", self.name))
                .expect("spiffe id"),
            ip: self.ip,
            port: 4250,
            pod_cidrs: vec![self.cidr],
            second_ip: None,
        }
    }

    pub fn settings(&self, strict: bool) -> PeerSettings {
        PeerSettings {
            local: LocalEnd {
                ip: self.ip,
                pod_cidrs: vec![self.cidr],
                second_ip: None,
            },
            rekey_interval: Duration::from_secs(3600),
            grace: GRACE,
            retention: RETENTION,
            strict,
            sa_limits: SaLimits::default(),
            require_claims: false,
            host_encryption: None,
        }
    }

    /// This node's task for `peer`. The task has no handshake config of its own, so its timer
    /// never dials out: tests drive every handshake themselves.
    pub async fn task_for(
        &self,
        peer: &Node,
        strict: bool,
        leftovers: bool,
    ) -> (PeerTask<IpsecTunnel>, PeerHandle) {
        let settings = self.settings(strict);
        let datapath: Arc<dyn PeerDatapath> = self.datapath.clone();
        let node_id = datapath.node_id(peer.ip).expect("node id");
        datapath
            .set_peer_routes(node_id, &[peer.cidr])
            .expect("routes");
        let tunnel = IpsecTunnel::new(self.xfrm.clone(), Arc::clone(&datapath), &settings, node_id)
            .expect("tunnel");
        let ctx = TaskContext {
            settings,
            handshake: watch::channel(None).1,
            generation: watch::channel(0).1,
            metrics: Arc::new(Metrics::new()),
            cancel: CancellationToken::new(),
            handshake_permits: Arc::new(Semaphore::new(1)),
            pace: Arc::new(Pace::new()),
            leftovers,
        };
        PeerTask::start(peer.info(), node_id, ctx, datapath, tunnel)
            .await
            .expect("peer task")
    }

    /// This node's Hello for `epoch`, receiving on `spi`.
    pub fn hello(&self, epoch: Epoch, spi: u32) -> Hello {
        Hello::new(
            self.name.clone(),
            epoch,
            Spi::new(spi).expect("spi"),
            Mode::Ipsec,
        )
        .with_node_ips(vec![self.ip])
        .with_pod_cidrs(vec![self.cidr])
    }

    /// The tunnel end this node gives `peer`.
    pub fn end_of(&self, peer: &Node) -> super::PeerEnd {
        super::PeerEnd {
            node_id: self.id_of(peer),
            ip: peer.ip,
            pod_cidrs: vec![peer.cidr],
            handshake_port: 4250,
            second_ip: None,
        }
    }

    /// The node id this node gave `peer`.
    pub fn id_of(&self, peer: &Node) -> NodeId {
        self.datapath.node_id(peer.ip).expect("node id")
    }
}

/// Keeps paused time from jumping while it lives.
///
/// The fake XFRM kernel answers from its own thread (as the netlink worker does). While a test
/// waits for it, a current-thread runtime with paused time sees nothing to do and jumps to the
/// next timer, such as the other side's confirm timeout. A blocking task in flight inhibits
/// that jump, so tests hold one for their whole body and move time only with
/// `tokio::time::advance`.
pub struct ClockHold {
    release: Option<std::sync::mpsc::Sender<()>>,
}

/// Holds the clock until the returned guard drops.
pub fn hold_clock() -> ClockHold {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    drop(tokio::task::spawn_blocking(move || {
        // Returns when the sender drops.
        let _ = wait.recv();
    }));
    ClockHold {
        release: Some(release),
    }
}

impl Drop for ClockHold {
    fn drop(&mut self) {
        self.release.take();
    }
}

/// The keys of one handshake between `a` (initiating) and `b`, without any peer task: each
/// side's agreement, in memory.
pub async fn agreements(
    a: &Node,
    b: &Node,
    epoch: Epoch,
) -> (Agreement<DuplexStream>, Agreement<DuplexStream>) {
    agreements_on_spis(a, b, epoch, (0x0001_0000, 0x0002_0000)).await
}

/// [`agreements`] with the inbound SPIs `a` and `b` announce.
pub async fn agreements_on_spis(
    a: &Node,
    b: &Node,
    epoch: Epoch,
    (a_spi, b_spi): (u32, u32),
) -> (Agreement<DuplexStream>, Agreement<DuplexStream>) {
    agreements_on_hellos(a, b, (a.hello(epoch, a_spi), b.hello(epoch, b_spi))).await
}

/// The agreements of `a` (initiator) and `b` exchanging these Hellos.
pub async fn agreements_on_hellos(
    a: &Node,
    b: &Node,
    (a_hello, b_hello): (Hello, Hello),
) -> (Agreement<DuplexStream>, Agreement<DuplexStream>) {
    let (a_end, b_end) = tokio::io::duplex(64 * 1024);
    let initiate = handshake::initiate(&a.config, a_end, &b.name, a_hello);
    let respond = async {
        let incoming = handshake::accept(&b.config, b_end, ExpectedPeer::Node(a.name.clone()))
            .await
            .expect("accepting");
        incoming.respond(b_hello).await.expect("responding")
    };
    let (a_side, b_side) = tokio::join!(initiate, respond);
    (a_side.expect("initiating"), b_side)
}
