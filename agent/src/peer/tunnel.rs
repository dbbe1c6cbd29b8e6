//! The kernel side of a peer's encryption, behind one trait so that the peer lifecycle
//! (`task`) is written once for every kind of tunnel.
//!
//! The lifecycle speaks in epochs: a handshake's keys are installed as a new epoch beside the
//! current one, both sides confirm, the tunnel flips traffic to it, and the previous epoch is
//! retired after a grace period. A tunnel keeps track of the epochs it has in the kernel, so
//! that it can sweep whatever else a previous agent left for the peer and remove everything at
//! teardown. IPsec ([`super::ipsec`]) maps an epoch to a pair of XFRM states under a key slot.
//! WireGuard ([`super::wireguard`]) maps an epoch to the pair's preshared key
//! (`SessionKeys::wg_psk`); its peer key comes from the verified Hello, never the store.

use std::future::Future;
use std::net::IpAddr;

use ipnet::IpNet;
use nodeseal_bpf::NodeId;
use nodeseal_keymgr::{Epoch, Hello, Mode, SessionKeys, WgProof};
use zeroize::Zeroizing;

use super::PeerStatus;
use crate::datapath::DatapathError;

/// This node's side of every tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEnd {
    /// The node IP tunnels start from.
    pub ip: IpAddr,
    /// This node's pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// This node's IP of the other family, on a dual-stack node (`--second-node-ip`): listed in
    /// its record, and with node encryption reached through the tunnel like the first.
    pub second_ip: Option<IpAddr>,
}

/// A peer's side of its tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEnd {
    /// The local id for the peer (goes into marks and the eBPF maps).
    pub node_id: NodeId,
    /// The peer's node IP.
    pub ip: IpAddr,
    /// The peer's pod CIDRs (of either family).
    pub pod_cidrs: Vec<IpNet>,
    /// The peer's handshake port (stays in clear with node encryption).
    pub handshake_port: u16,
    /// The peer's node IP of the other family, if its record lists one its certificate admits.
    pub second_ip: Option<IpAddr>,
}

impl PeerEnd {
    /// The peer's node IPs: the tunnel's, then the other family's.
    pub fn node_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.ip).chain(self.second_ip)
    }
}

/// The kernel side of one peer's tunnel. One value per peer, owned by the peer's task, which
/// calls it in order: `prepare` once, then per key agreement `install` followed by `flip` (or,
/// when the peer does not confirm, `retire` of the same epoch), `retire` of previous epochs,
/// `sweep` once after a restart, and `teardown` when the peer is removed.
pub trait Tunnel: Send {
    /// The mode announced in Hellos (a peer in another mode refuses the handshake).
    fn mode(&self) -> Mode;

    /// A fresh inbound SPI for our Hello (it also enters the key derivation); never one an
    /// installed epoch receives on.
    fn fresh_spi(&self) -> u32;

    /// Puts in place what the peer needs before it has keys (IPsec strict mode: the policies
    /// that block clear traffic to its pods).
    fn prepare(&mut self, peer: &PeerEnd) -> impl Future<Output = Result<(), TunnelError>> + Send;

    /// Before anything of a key agreement is installed: our proof that we hold the key our
    /// Hello announced, and what checks the peer's (WireGuard); `None` when the tunnel's keys
    /// come from the agreement alone (IPsec).
    fn key_possession(
        &self,
        _keys: &SessionKeys,
        _peer_hello: &Hello,
    ) -> Result<Option<KeyPossession>, TunnelError> {
        Ok(None)
    }

    /// Installs the keys of a new epoch beside the current one; traffic keeps the current keys
    /// until [`Tunnel::flip`]. On error nothing of the new epoch stays behind.
    fn install(
        &mut self,
        peer: &PeerEnd,
        keys: &SessionKeys,
        peer_hello: &Hello,
    ) -> impl Future<Output = Result<InstalledEpoch, TunnelError>> + Send;

    /// Moves the peer's traffic to `epoch`, installed and confirmed by both sides. The previous
    /// epoch still receives until it is retired.
    fn flip(
        &mut self,
        peer: &PeerEnd,
        epoch: InstalledEpoch,
    ) -> impl Future<Output = Result<(), TunnelError>> + Send;

    /// Removes `epoch` from the kernel: a previous one after its grace period, one the peer
    /// never confirmed, or the current one (then traffic to the peer stops using keys first).
    fn retire(
        &mut self,
        peer: &PeerEnd,
        epoch: InstalledEpoch,
    ) -> impl Future<Output = Result<(), TunnelError>> + Send;

    /// Removes the peer's objects that are not this tunnel's epochs (what a previous agent
    /// left); returns how many objects changed.
    fn sweep(&mut self, peer: &PeerEnd) -> impl Future<Output = Result<usize, TunnelError>> + Send;

    /// Removes every object of the peer, a previous agent's too; returns how many.
    fn teardown(
        &mut self,
        peer: &PeerEnd,
    ) -> impl Future<Output = Result<usize, TunnelError>> + Send;

    /// Whether the current epoch sends or receives on `spi` (usage-limit notices name SAs).
    fn carries_spi(&self, spi: u32) -> bool;

    /// Adds what the tunnel announces to our Hello (WireGuard: this node's public key).
    fn announce(&self, hello: Hello) -> Hello {
        hello
    }

    /// Writes the tunnel's part of the status row (IPsec: slot and SPIs of the current epoch).
    fn fill_status(&self, row: &mut PeerStatus);
}

/// One key-possession exchange: the proof we send, and the secret the peer's proof is checked
/// against (X25519 of our private key and the public key the peer announced).
pub struct KeyPossession {
    /// Our proof.
    pub ours: WgProof,
    shared: Zeroizing<[u8; 32]>,
    /// The key the peer announced (base64), for the error.
    peer_key: String,
}

impl KeyPossession {
    /// Our proof under `keys`, over `shared`, towards a peer that announced `peer_key`.
    pub(crate) fn new(keys: &SessionKeys, shared: Zeroizing<[u8; 32]>, peer_key: String) -> Self {
        Self {
            ours: keys.wg_possession_proof(&shared),
            shared,
            peer_key,
        }
    }

    /// Checks that `theirs` proves the peer holds the private half of the key it announced.
    ///
    /// # Errors
    /// [`TunnelError::PeerKeyNotHeld`].
    pub fn check(&self, keys: &SessionKeys, theirs: &WgProof) -> Result<(), TunnelError> {
        if keys.verify_wg_possession(&self.shared, theirs) {
            Ok(())
        } else {
            Err(TunnelError::PeerKeyNotHeld {
                key: self.peer_key.clone(),
            })
        }
    }
}

impl std::fmt::Debug for KeyPossession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPossession")
            .field("ours", &self.ours)
            .field("peer_key", &self.peer_key)
            .field("shared", &"[redacted]")
            .finish()
    }
}

/// One installation of an epoch's keys, as the lifecycle names it to [`Tunnel::flip`] and
/// [`Tunnel::retire`]. Epoch numbers alone are not unique per peer: the responder takes the
/// initiator's, and handshakes started in the same second by the two ends, or by an agent and
/// its restarted successor, can carry the same number, so a flip or retirement by number could
/// act on another installation than the one meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstalledEpoch {
    /// The epoch number agreed in the handshake.
    pub epoch: Epoch,
    /// Unique among one tunnel's installations.
    install: u64,
}

impl InstalledEpoch {
    /// Names installation number `install` (unique per tunnel) of `epoch`.
    pub(crate) fn new(epoch: Epoch, install: u64) -> Self {
        Self { epoch, install }
    }
}

impl std::fmt::Display for InstalledEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (installation {})", self.epoch, self.install)
    }
}

/// Errors of a tunnel's kernel programming.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// Building SA specs failed (bad key length or address family mix).
    #[error("building SAs")]
    Spec(#[from] nodeseal_xfrm::SpecError),
    /// Programming the kernel failed.
    #[error("programming XFRM")]
    Xfrm(#[from] nodeseal_xfrm::XfrmError),
    /// Reconciling the peer's XFRM objects failed.
    #[error("reconciling the peer's XFRM objects")]
    Reconcile(#[from] nodeseal_xfrm::ReconcileError),
    /// Updating the eBPF maps failed.
    #[error("updating the eBPF maps")]
    Datapath(#[from] DatapathError),
    /// Programming the WireGuard device or its routes failed.
    #[error("programming WireGuard")]
    Wireguard(#[from] nodeseal_wireguard::Error),
    /// The peer's verified Hello carries no WireGuard public key, the only source of its key.
    #[error("the peer's Hello carries no wg_public_key")]
    MissingPeerKey,
    /// The peer's WireGuard public key is a low-order point: the secret it shares with any key
    /// is all zeros, so it cannot be bound to anyone.
    #[error("the peer's WireGuard public key is a low-order point")]
    LowOrderPeerKey,
    /// The peer did not prove it holds the private half of the WireGuard key it announced.
    #[error("the peer did not prove it holds the WireGuard key {key} it announced")]
    PeerKeyNotHeld {
        /// The key (base64).
        key: String,
    },
    /// The peer's verified Hello announces this node's own WireGuard public key.
    #[error("the peer's Hello announces this node's own WireGuard public key")]
    PeerKeyIsOurs,
    /// The peer's verified Hello announces a WireGuard public key another peer holds on the
    /// device; taking it would hand that peer's entry over.
    #[error("the peer announces WireGuard public key {key}, which {holder} holds")]
    PeerKeyHeld {
        /// The key (base64).
        key: String,
        /// The node holding it.
        holder: String,
    },
    /// The SPI the peer chose cannot be used.
    #[error("SPI {0} is not usable")]
    BadSpi(u32),
    /// The lifecycle named an epoch the tunnel does not have.
    #[error("BUG: epoch {0} is not installed")]
    UnknownEpoch(InstalledEpoch),
}
