//! The row `nodeseal status` shows for a peer, and how the lifecycle's events change it.

use std::net::IpAddr;
use std::time::SystemTime;

use nodeseal_bpf::NodeId;
use nodeseal_keymgr::{Epoch, NodeName};
use serde::{Deserialize, Serialize};

use super::generation_of;

/// Life-cycle state shown in `nodeseal status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// No keys yet.
    Connecting,
    /// Keys installed and in use.
    Established,
    /// The last handshake failed; retrying with backoff.
    Failed,
    /// Revoked or removed.
    Removed,
}

/// One row of `nodeseal status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Peer node name.
    pub name: String,
    /// Peer node IP.
    pub ip: IpAddr,
    /// Local node id of the peer.
    pub node_id: u16,
    /// State.
    pub state: PeerState,
    /// Current epoch.
    pub epoch: Option<u64>,
    /// The rekey generation of the current epoch (`keys rotate` target).
    pub generation: Option<u64>,
    /// Key slot in use.
    pub slot: Option<u8>,
    /// SPI of the OUT SA.
    pub out_spi: Option<String>,
    /// SPI of the IN SA.
    pub in_spi: Option<String>,
    /// The peer's WireGuard public key (base64) as its verified Hello announced it, in WireGuard
    /// mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_public_key: Option<String>,
    /// When the current keys were installed (Unix seconds).
    pub last_rekey_unix: Option<u64>,
    /// Successful key agreements.
    pub rekeys: u64,
    /// Failed handshakes.
    pub failures: u64,
    /// The last error.
    pub last_error: Option<String>,
    /// Bytes / packets through the current OUT and IN states (filled when status is read).
    pub out_bytes: u64,
    /// Packets out.
    pub out_packets: u64,
    /// Bytes in.
    pub in_bytes: u64,
    /// Packets in.
    pub in_packets: u64,
}

impl PeerStatus {
    /// A peer without keys yet.
    #[must_use]
    pub fn connecting(name: &NodeName, ip: IpAddr, node_id: NodeId) -> Self {
        Self {
            name: name.to_string(),
            ip,
            node_id: node_id.0,
            state: PeerState::Connecting,
            epoch: None,
            generation: None,
            slot: None,
            out_spi: None,
            in_spi: None,
            wg_public_key: None,
            last_rekey_unix: None,
            rekeys: 0,
            failures: 0,
            last_error: None,
            out_bytes: 0,
            out_packets: 0,
            in_bytes: 0,
            in_packets: 0,
        }
    }
}

impl PeerStatus {
    /// A key agreement succeeded and `epoch` carries the traffic; the tunnel fills in its own
    /// fields (slot, SPIs) afterwards.
    pub(super) fn established(&mut self, epoch: Epoch) {
        self.state = PeerState::Established;
        self.epoch = Some(epoch.0);
        self.generation = Some(generation_of(epoch));
        self.last_rekey_unix = Some(unix_now());
        // Failures before this success stay counted in `failures`; the row shows no stale error.
        self.last_error = None;
        self.rekeys += 1;
    }

    /// A handshake failed; a peer that still has keys stays established.
    pub(super) fn failed(&mut self, error: String, has_keys: bool) {
        self.failures += 1;
        self.last_error = Some(error);
        if !has_keys {
            self.state = PeerState::Failed;
        }
    }

    /// Moves to `state`; any state but `Established` shows no keys.
    pub(super) fn set_state(&mut self, state: PeerState, error: Option<String>) {
        self.state = state;
        if error.is_some() {
            self.last_error = error;
        }
        if state != PeerState::Established {
            self.epoch = None;
            self.slot = None;
            self.out_spi = None;
            self.in_spi = None;
            self.wg_public_key = None;
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> PeerStatus {
        let name = NodeName::new("node2").unwrap();
        PeerStatus::connecting(&name, "10.0.0.2".parse().unwrap(), NodeId(3))
    }

    #[test]
    fn a_success_clears_the_last_error_but_keeps_the_count() {
        let mut s = row();
        s.failed("refused".into(), false);
        assert_eq!((s.state, s.failures), (PeerState::Failed, 1));
        s.established(Epoch((2 << 32) | 7));
        assert_eq!(s.state, PeerState::Established);
        assert_eq!((s.epoch, s.generation), (Some((2 << 32) | 7), Some(2)));
        assert_eq!(
            (s.failures, s.rekeys, s.last_error.as_deref()),
            (1, 1, None)
        );
        // With keys in place a failure is recorded but the peer stays established.
        s.failed("timed out".into(), true);
        assert_eq!(s.state, PeerState::Established);
        assert_eq!(s.last_error.as_deref(), Some("timed out"));
    }

    #[test]
    fn leaving_established_forgets_the_keys() {
        let mut s = row();
        s.established(Epoch(1));
        s.slot = Some(2);
        s.out_spi = Some("0x00010000".into());
        s.set_state(PeerState::Removed, Some("revoked".into()));
        assert_eq!((s.epoch, s.slot, s.out_spi), (None, None, None));
        assert_eq!(s.last_error.as_deref(), Some("revoked"));
    }
}
