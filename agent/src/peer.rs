//! One task per peer node: handshakes, the make-before-break key lifecycle, rekeys and teardown.
//!
//! A rekey (also the first key agreement) goes:
//! 1. mutual TLS 1.3 handshake and Hellos (`keymgr`), which yields the SPIs and keys;
//! 2. the tunnel installs the new epoch beside the current one (IPsec: IN state, OUT state and
//!    its OUT policies under a fresh key slot);
//! 3. `Installed` exchange: each side has its inbound keys before the other sends with them;
//! 4. the tunnel flips: traffic moves to the new epoch at once (IPsec: one write of the peer's
//!    key slot in the eBPF map);
//! 5. after the grace period, the tunnel retires the previous epoch.
//!
//! The lower node name is the preferred initiator; the other side initiates too when it needs
//! keys and none arrive within [`RESPONDER_PATIENCE`]. When both connect at once, the handshake
//! initiated by the lower name wins ([`nodeseal_keymgr::handshake::keep_initiated_by`]).
//!
//! The task owns its peer's kernel state: on revocation or removal it deletes exactly that
//! peer's objects (IPsec: by our reqid and the peer's node IP) and forgets the peer in the eBPF
//! maps. Cancellation by agent shutdown leaves everything in place, so traffic keeps flowing
//! across a restart.
//!
//! The parts: `task` is the loop and its decisions, `schedule` says when (backoff, rekey,
//! grace, retention) as a pure struct over [`Instant`](tokio::time::Instant), `status` is the
//! row `nodeseal status` shows, [`Tunnel`] is the kernel side with [`ipsec`] as its XFRM
//! implementation, and `PeerDatapath` is what the loop needs of the eBPF maps.

#[cfg(test)]
mod fakes;
mod schedule;
mod status;
mod task;
mod tunnel;

pub mod ipsec;
pub mod wireguard;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use nodeseal_bpf::NodeId;
use nodeseal_keymgr::handshake::{HandshakeConfig, Incoming};
use nodeseal_keymgr::{Epoch, NodeName, SpiffeId};
use nodeseal_xfrm::Handle;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::datapath::{DatapathError, DatapathHandle};
use crate::metrics::Metrics;
use crate::pace::Pace;
use ipsec::{HostEncryption, KeySlot, SaLimits};

pub use status::{PeerState, PeerStatus};
pub use task::PeerTask;
pub use tunnel::{InstalledEpoch, KeyPossession, LocalEnd, PeerEnd, Tunnel, TunnelError};

/// How long the non-preferred initiator waits for the peer to start a needed handshake.
pub const RESPONDER_PATIENCE: Duration = Duration::from_secs(2);
/// Outgoing handshakes one node runs at once.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 32;

/// What the agent knows about a peer from the cluster store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Node name.
    pub name: NodeName,
    /// The SPIFFE ID the store lists for it.
    pub spiffe_id: SpiffeId,
    /// Node IP (tunnel endpoint, handshake address).
    pub ip: IpAddr,
    /// Handshake port.
    pub port: u16,
    /// Pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// The node IP of the other family, on a dual-stack node.
    pub second_ip: Option<IpAddr>,
}

/// Settings every peer task shares.
#[derive(Clone, Debug)]
pub struct PeerSettings {
    /// This node's tunnel end.
    pub local: LocalEnd,
    /// Rekey this often (initiator side).
    pub rekey_interval: Duration,
    /// Keep the previous epoch's SAs this long after a flip.
    pub grace: Duration,
    /// Remove a peer's SAs when no handshake succeeded for this long.
    pub retention: Duration,
    /// Strict mode.
    pub strict: bool,
    /// What one SA may carry before it is rekeyed (soft) and deleted (hard).
    pub sa_limits: SaLimits,
    /// Refuse peers whose SVID binds no node IPs and pod CIDRs (every issuer but an external
    /// PKI's binds them).
    pub require_claims: bool,
    /// Node encryption in IPsec mode (`None`: off, or WireGuard mode, whose device does it).
    pub host_encryption: Option<HostEncryption>,
}

/// Commands to a peer task.
#[derive(Debug)]
pub enum PeerCommand {
    /// A verified handshake from the peer waits for our Hello.
    Incoming(Box<Incoming<TcpStream>>),
    /// Rekey now (rotation request of `generation`).
    Rekey {
        /// The cluster rekey generation asked for.
        generation: u64,
    },
    /// The store's view of the peer changed (pod CIDRs, IP, port). Boxed: a channel's
    /// first block holds 32 commands whatever its capacity, so every peer task pays 32 times
    /// the largest variant up front, and a `PeerInfo` would more than double it.
    Update(Box<PeerInfo>),
    /// The peer was revoked or removed: tear everything down and stop.
    Remove {
        /// Why (for logs and status).
        reason: String,
        /// Told once the teardown is done (a successor at a new address waits for it: its
        /// routes and policies have the same selectors as the ones torn down).
        done: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// The kernel reported that a state with the peer crossed its usage limit.
    SaExpired {
        /// The state's SPI.
        spi: u32,
        /// Hard limit: the kernel deleted the state. Soft: rekey before it does.
        hard: bool,
    },
    /// A handshake from the peer's address failed before it reached us (recorded in status).
    HandshakeFailed {
        /// The error.
        error: String,
    },
}

/// Handle to a running peer task.
#[derive(Debug, Clone)]
pub struct PeerHandle {
    /// Command channel.
    pub commands: mpsc::Sender<PeerCommand>,
    /// Live status.
    pub status: Arc<Mutex<PeerStatus>>,
    /// Cancels the task without touching kernel state (shutdown).
    pub cancel: CancellationToken,
}

/// Shared resources for building peer tasks.
#[derive(Clone)]
pub struct PeerContext {
    /// Settings.
    pub settings: PeerSettings,
    /// XFRM handle.
    pub xfrm: Handle,
    /// eBPF maps.
    pub datapath: DatapathHandle,
    /// The current handshake config (None until the node has its SVID).
    pub handshake: watch::Receiver<Option<HandshakeConfig>>,
    /// Cluster rekey generation.
    pub generation: watch::Receiver<u64>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The agent's root token; each peer task gets a child, so that revoking a peer cancels
    /// exactly that task and shutdown cancels them all.
    pub cancel: CancellationToken,
    /// Node-wide bound on concurrent outgoing handshakes.
    pub handshake_permits: Arc<tokio::sync::Semaphore>,
    /// Node-wide handshake limits, following the measured speed.
    pub pace: Arc<Pace>,
    /// Peers a previous agent left SAs for (found at start-up): only their tasks sweep.
    pub leftover_peers: Arc<std::collections::HashSet<IpAddr>>,
}

/// Errors inside one key agreement attempt.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The node has no SVID yet.
    #[error("no node identity yet")]
    NoIdentity,
    /// Connecting failed.
    #[error("connecting to {addr}")]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed.
    #[error("handshake")]
    Handshake(#[from] nodeseal_keymgr::HandshakeError),
    /// It took too long.
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The peer accepted the connection but the handshake did not complete in time: this
    /// node's handshakes are slower than its limit (see [`Pace`]).
    #[error("handshake did not complete within {0:?} of connecting")]
    SlowHandshake(Duration),
    /// The peer announced something that contradicts the store.
    #[error("peer announced {what}")]
    Contradiction {
        /// What.
        what: String,
    },
    /// The peer's record claims a node IP or pod CIDR its certificate does not admit.
    #[error("the peer's record claims what its certificate does not admit: {0}")]
    NotAdmitted(String),
    /// Updating the peer's routes or node id in the eBPF maps failed.
    #[error("updating the eBPF maps")]
    Datapath(#[from] DatapathError),
    /// The kernel side of the tunnel refused the keys (its text is the tunnel's own).
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// The SPI we chose for our Hello is reserved.
    #[error("SPI {0} is not usable")]
    BadSpi(u32),
}

/// Renders an error with its sources, for status and logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

/// The generation an epoch belongs to: epochs are `generation << 32 | counter`.
#[must_use]
pub fn generation_of(epoch: Epoch) -> u64 {
    epoch.0 >> 32
}

/// What a peer's lifecycle needs of the eBPF datapath: its node id, the routes of its pod
/// CIDRs, its key slot and whether its ESP is admitted. [`DatapathHandle`] is the real one; the
/// seam lets the lifecycle be tested without loading programs.
pub(crate) trait PeerDatapath: Send + Sync + std::fmt::Debug {
    /// The local id of the node at `ip`, allocated on first use.
    fn node_id(&self, ip: IpAddr) -> Result<NodeId, DatapathError>;
    /// Routes `pod_cidrs` to the node (strict mode drops what has no keys yet).
    fn set_peer_routes(&self, id: NodeId, pod_cidrs: &[IpNet]) -> Result<(), DatapathError>;
    /// Accepts ESP from the node from now on.
    fn admit_node(&self, id: NodeId, ip: IpAddr) -> Result<(), DatapathError>;
    /// Gives the node's other node IP (dual-stack) the node's identity.
    fn add_node_address(&self, id: NodeId, ip: IpAddr) -> Result<(), DatapathError>;
    /// Points traffic for the node at `slot` (`None`: no keys).
    fn set_slot(&self, id: NodeId, slot: Option<KeySlot>) -> Result<(), DatapathError>;
    /// The slot in use, possibly a previous agent's.
    fn slot(&self, id: NodeId) -> Result<Option<KeySlot>, DatapathError>;
    /// Forgets the node (its node IPs `ips`, the tunnel's first): id, routes, slot and
    /// admission.
    fn remove_peer(
        &self,
        id: NodeId,
        ips: &[IpAddr],
        pod_cidrs: &[IpNet],
    ) -> Result<(), DatapathError>;
}

impl PeerDatapath for DatapathHandle {
    fn node_id(&self, ip: IpAddr) -> Result<NodeId, DatapathError> {
        DatapathHandle::node_id(self, ip)
    }

    fn set_peer_routes(&self, id: NodeId, pod_cidrs: &[IpNet]) -> Result<(), DatapathError> {
        DatapathHandle::set_peer_routes(self, id, pod_cidrs)
    }

    fn admit_node(&self, id: NodeId, ip: IpAddr) -> Result<(), DatapathError> {
        DatapathHandle::admit_node(self, id, ip)
    }

    fn add_node_address(&self, id: NodeId, ip: IpAddr) -> Result<(), DatapathError> {
        DatapathHandle::add_node_address(self, id, ip)
    }

    fn set_slot(&self, id: NodeId, slot: Option<KeySlot>) -> Result<(), DatapathError> {
        DatapathHandle::set_slot(self, id, slot)
    }

    fn slot(&self, id: NodeId) -> Result<Option<KeySlot>, DatapathError> {
        DatapathHandle::slot(self, id)
    }

    fn remove_peer(
        &self,
        id: NodeId,
        ips: &[IpAddr],
        pod_cidrs: &[IpNet],
    ) -> Result<(), DatapathError> {
        DatapathHandle::remove_peer(self, id, ips, pod_cidrs)
    }
}

/// The running peer tasks, by node IP (the address handshakes and ESP come from).
#[derive(Debug, Default)]
pub struct PeerRegistry {
    by_ip: std::sync::RwLock<std::collections::HashMap<IpAddr, (NodeName, PeerHandle)>>,
}

impl PeerRegistry {
    /// The peer at `ip`, if one is known.
    pub fn lookup(&self, ip: IpAddr) -> Option<(NodeName, PeerHandle)> {
        self.by_ip.read().ok()?.get(&ip).cloned()
    }

    /// Registers a peer task.
    pub fn insert(&self, ip: IpAddr, name: NodeName, handle: PeerHandle) {
        if let Ok(mut map) = self.by_ip.write() {
            map.insert(ip, (name, handle));
        }
    }

    /// Forgets the peer at `ip`.
    pub fn remove(&self, ip: IpAddr) -> Option<(NodeName, PeerHandle)> {
        self.by_ip.write().ok()?.remove(&ip)
    }

    /// Calls `f` with every registered peer in place, without copying the registry (the
    /// housekeeping tick visits every peer twice a second). `f` must not touch the registry.
    pub fn for_each(&self, mut f: impl FnMut(IpAddr, &NodeName, &PeerHandle)) {
        if let Ok(map) = self.by_ip.read() {
            for (ip, (name, handle)) in map.iter() {
                f(*ip, name, handle);
            }
        }
    }

    /// Every registered peer.
    pub fn all(&self) -> Vec<(IpAddr, NodeName, PeerHandle)> {
        self.by_ip
            .read()
            .map(|m| {
                m.iter()
                    .map(|(ip, (n, h))| (*ip, n.clone(), h.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::PeerCommand;

    /// Every peer task's command channel allocates 32 commands up front (tokio's block size),
    /// so the largest variant is paid 32 times per peer whether or not it is ever sent.
    #[test]
    fn a_peer_command_stays_small() {
        assert!(
            std::mem::size_of::<PeerCommand>() <= 48,
            "PeerCommand is {} bytes: box the large variant",
            std::mem::size_of::<PeerCommand>()
        );
    }
}
