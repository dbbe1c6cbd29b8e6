//! The row `nodeseal status` shows for a peer, and how the lifecycle's events change it.

use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use ipnet::IpNet;
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
    /// SPIs of the host SAs (node encryption in IPsec mode): OUT then IN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_spis: Option<[String; 2]>,
    /// The peer's WireGuard public key (base64) as its verified Hello announced it, in WireGuard
    /// mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_public_key: Option<String>,
    /// The epoch whose preshared key the WireGuard entry in use carries (the installation
    /// traffic uses), in WireGuard mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_psk_epoch: Option<u64>,
    /// When the latest WireGuard handshake with the peer completed (Unix seconds); absent when
    /// none has yet. Read from the device when status is read, as the fields below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_latest_handshake_unix: Option<u64>,
    /// The endpoint the WireGuard device holds for the peer (configured or learnt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_endpoint: Option<SocketAddr>,
    /// The allowed IPs the WireGuard device holds for the peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wg_allowed_ips: Vec<IpNet>,
    /// When the current keys were installed (Unix seconds).
    pub last_rekey_unix: Option<u64>,
    /// Successful key agreements.
    pub rekeys: u64,
    /// Failed handshakes.
    pub failures: u64,
    /// The last error.
    pub last_error: Option<String>,
    /// Bytes / packets through the current OUT and IN states (filled when status is read); in
    /// WireGuard mode the device's byte counters for the peer (no packet counts).
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
            host_spis: None,
            wg_public_key: None,
            wg_psk_epoch: None,
            wg_latest_handshake_unix: None,
            wg_endpoint: None,
            wg_allowed_ips: Vec::new(),
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
            self.wg_psk_epoch = None;
        }
    }

    /// Fills in what the WireGuard device holds for the peer key in use: latest handshake,
    /// endpoint, allowed IPs and byte counters. A row without a key in use, or whose key the
    /// device does not hold, is left as it is.
    pub fn fill_from_wireguard(&mut self, device: &nodeseal_wireguard::Device) {
        let Some(key) = self
            .wg_public_key
            .as_deref()
            .and_then(|k| k.parse::<nodeseal_wireguard::PublicKey>().ok())
        else {
            return;
        };
        let Some(held) = device.peer(&key) else {
            return;
        };
        self.wg_latest_handshake_unix = held
            .last_handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        self.wg_endpoint = held.endpoint;
        self.wg_allowed_ips.clone_from(&held.allowed_ips);
        (self.out_bytes, self.in_bytes) = (held.tx_bytes, held.rx_bytes);
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

    #[tokio::test]
    async fn a_wireguard_row_shows_what_the_device_holds_for_the_key_in_use() {
        use nodeseal_wireguard::test_helpers::FakeKernel;
        use nodeseal_wireguard::{DeviceConfig, Handle, LinkName, LinkSpec, PeerConfig, PublicKey};

        let kernel = FakeKernel::new();
        let handle = Handle::with_fake(&kernel);
        let link = handle
            .links()
            .ensure(LinkSpec::default())
            .execute()
            .await
            .unwrap();
        let name: LinkName = link.name.parse().unwrap();
        let key = PublicKey::from_bytes([7; 32]);
        let endpoint: SocketAddr = "10.0.0.2:51871".parse().unwrap();
        let pods: IpNet = "10.244.2.0/24".parse().unwrap();
        handle
            .device(name.clone())
            .configure(
                DeviceConfig::new()
                    .peer(PeerConfig::new(key).endpoint(endpoint).allowed_ips([pods])),
            )
            .execute()
            .await
            .unwrap();
        let device = || async { handle.device(name.clone()).get().execute().await.unwrap() };

        // No key in use: nothing is taken from the device.
        let mut s = row();
        s.fill_from_wireguard(&device().await);
        assert_eq!((s.wg_endpoint, s.wg_allowed_ips.len()), (None, 0));

        s.established(Epoch((1 << 32) | 5));
        s.wg_public_key = Some(key.to_string());
        s.wg_psk_epoch = Some((1 << 32) | 5);
        s.fill_from_wireguard(&device().await);
        assert_eq!(s.wg_latest_handshake_unix, None, "no handshake yet");
        assert_eq!(s.wg_endpoint, Some(endpoint));
        assert_eq!(s.wg_allowed_ips, vec![pods]);
        assert_eq!((s.out_bytes, s.in_bytes), (0, 0));
        let json = serde_json::to_value(&s).unwrap();
        assert!(json.get("wg_latest_handshake_unix").is_none(), "{json}");

        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert!(kernel.set_peer_traffic(&link.name, &key, Some(at), 1000, 2000));
        s.fill_from_wireguard(&device().await);
        assert_eq!(s.wg_latest_handshake_unix, Some(1_700_000_000));
        assert_eq!((s.in_bytes, s.out_bytes), (1000, 2000));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["wg_latest_handshake_unix"], 1_700_000_000u64);
        assert_eq!(json["wg_endpoint"], "10.0.0.2:51871");
        assert_eq!(json["wg_allowed_ips"], serde_json::json!(["10.244.2.0/24"]));
        assert_eq!(json["wg_psk_epoch"], (1u64 << 32) | 5);
        let back: PeerStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back.wg_endpoint, Some(endpoint));

        // A key the device does not hold (the peer restarted): the device's fields stay as read.
        s.wg_public_key = Some(PublicKey::from_bytes([8; 32]).to_string());
        s.fill_from_wireguard(&device().await);
        assert_eq!(s.wg_latest_handshake_unix, Some(1_700_000_000));

        s.set_state(PeerState::Connecting, None);
        assert_eq!((s.wg_public_key, s.wg_psk_epoch), (None, None));
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
