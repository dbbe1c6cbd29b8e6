//! WireGuard device configuration ([`DeviceConfig`], [`PeerConfig`]) and what the kernel reports
//! back ([`Device`], [`Peer`]).
//!
//! A [`PeerConfig`] describes a peer completely: applying it replaces the peer's allowed IPs,
//! preshared key and keepalive, so the kernel ends up with exactly what was asked (the endpoint
//! is the exception: `None` keeps the one the kernel has, which it may have learnt by roaming).
//! Allowed IPs are stored with their host bits cleared, as the kernel does, so a configured
//! peer and the same peer read back compare equal.

use std::net::SocketAddr;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::key::{PresharedKey, PrivateKey, PublicKey};

/// Changes to one WireGuard device (`wg set DEV ...`). Unset fields are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceConfig {
    /// The device's private key.
    pub private_key: Option<PrivateKey>,
    /// The UDP port to listen on (0 lets the kernel pick one).
    pub listen_port: Option<u16>,
    /// The firewall mark of the device's outgoing UDP packets (0 clears it).
    pub fwmark: Option<u32>,
    /// Remove every peer not set by this configuration (`wg setconf`).
    pub replace_peers: bool,
    /// Peers to set or remove, in order.
    pub peers: Vec<PeerChange>,
}

impl DeviceConfig {
    /// No changes.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the private key.
    #[must_use]
    pub fn private_key(mut self, key: PrivateKey) -> Self {
        self.private_key = Some(key);
        self
    }

    /// Sets the listen port.
    #[must_use]
    pub const fn listen_port(mut self, port: u16) -> Self {
        self.listen_port = Some(port);
        self
    }

    /// Sets the firewall mark (0 clears it).
    #[must_use]
    pub const fn fwmark(mut self, mark: u32) -> Self {
        self.fwmark = Some(mark);
        self
    }

    /// Makes the peers of this configuration the only ones.
    #[must_use]
    pub const fn replace_peers(mut self) -> Self {
        self.replace_peers = true;
        self
    }

    /// Sets (adds or replaces) a peer.
    #[must_use]
    pub fn peer(mut self, peer: PeerConfig) -> Self {
        self.peers.push(PeerChange::Set(peer));
        self
    }

    /// Removes a peer (no error if it is not there).
    #[must_use]
    pub fn remove_peer(mut self, key: PublicKey) -> Self {
        self.peers.push(PeerChange::Remove(key));
        self
    }
}

/// One change to a device's peer list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// Add the peer or replace its settings (`wg set DEV peer KEY ...`).
    Set(PeerConfig),
    /// Remove the peer (`wg set DEV peer KEY remove`).
    #[doc(alias = "WGPEER_F_REMOVE_ME")]
    Remove(PublicKey),
}

/// A peer as nodeseal configures it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerConfig {
    /// The peer's public key (its identity on the device).
    pub public_key: PublicKey,
    /// The pair's preshared key; `None` clears it.
    pub preshared_key: Option<PresharedKey>,
    /// Where to send to; `None` keeps the kernel's current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// The inner source addresses accepted from the peer and the destinations routed to it;
    /// replaces the peer's current list.
    #[doc(alias = "WGPEER_F_REPLACE_ALLOWEDIPS")]
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives when idle; 0 turns them off.
    pub persistent_keepalive_secs: u16,
    /// Whether `allowed_ips` replaces the peer's list (the default) or is added to it. The
    /// kernel replaces a list by emptying it first, so packets to or from the peer that meet
    /// the empty list in between are dropped: a peer carrying traffic is updated by adding.
    pub replace_allowed_ips: bool,
}

impl PeerConfig {
    /// A peer with no preshared key, endpoint, allowed IPs or keepalive.
    #[must_use]
    pub const fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            preshared_key: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive_secs: 0,
            replace_allowed_ips: true,
        }
    }

    /// Adds `allowed_ips` to the peer's list instead of replacing it (see
    /// [`PeerConfig::replace_allowed_ips`]).
    #[must_use]
    pub const fn add_allowed_ips(mut self) -> Self {
        self.replace_allowed_ips = false;
        self
    }

    /// Sets the preshared key.
    #[must_use]
    pub fn preshared_key(mut self, key: PresharedKey) -> Self {
        self.preshared_key = Some(key);
        self
    }

    /// Sets the endpoint.
    #[must_use]
    pub const fn endpoint(mut self, endpoint: SocketAddr) -> Self {
        self.endpoint = Some(endpoint);
        self
    }

    /// Adds allowed IPs (host bits are cleared, as the kernel does).
    #[must_use]
    pub fn allowed_ips(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.allowed_ips.extend(nets.into_iter().map(|n| n.trunc()));
        self
    }

    /// Sets the keepalive interval in seconds (0: off).
    #[must_use]
    pub const fn persistent_keepalive(mut self, secs: u16) -> Self {
        self.persistent_keepalive_secs = secs;
        self
    }
}

/// A WireGuard device as the kernel reports it (`wg show DEV dump`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Device {
    /// The interface index.
    pub ifindex: u32,
    /// The interface name.
    pub name: String,
    /// The private key, if one is set. Reading it back is what lets a restarted agent take
    /// over a running device without changing its identity.
    pub private_key: Option<PrivateKey>,
    /// The public key, if a private key is set.
    pub public_key: Option<PublicKey>,
    /// The UDP port it listens on (0 while the device is down and no port was set).
    pub listen_port: u16,
    /// The firewall mark (0: none).
    pub fwmark: u32,
    /// The peers, in the kernel's order.
    pub peers: Vec<Peer>,
}

impl Device {
    /// The peer with this public key.
    #[must_use]
    pub fn peer(&self, key: &PublicKey) -> Option<&Peer> {
        self.peers.iter().find(|p| p.public_key == *key)
    }
}

/// A peer as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Peer {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// The preshared key; `None` if none is set (the kernel reports all zeroes).
    pub preshared_key: Option<PresharedKey>,
    /// The current endpoint, configured or learnt.
    pub endpoint: Option<SocketAddr>,
    /// The allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives (0: off).
    pub persistent_keepalive_secs: u16,
    /// When the last handshake completed; `None` if never.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

impl Peer {
    /// A peer with nothing but its key, for the decoder to fill in.
    pub(crate) const fn empty(public_key: PublicKey) -> Self {
        Self {
            public_key,
            preshared_key: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive_secs: 0,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    /// Whether the kernel holds exactly what `config` asks for (endpoint: if `config` sets one).
    /// Allowed IPs compare as sets.
    #[must_use]
    pub fn matches(&self, config: &PeerConfig) -> bool {
        let mut have = self.allowed_ips.clone();
        let mut want = config.allowed_ips.clone();
        have.sort_unstable();
        have.dedup();
        want.sort_unstable();
        want.dedup();
        let psk = config.preshared_key.as_ref().filter(|k| !k.is_zero());
        self.public_key == config.public_key
            && self.preshared_key.as_ref() == psk
            && (config.endpoint.is_none() || self.endpoint == config.endpoint)
            && have == want
            && self.persistent_keepalive_secs == config.persistent_keepalive_secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_ips_lose_host_bits_and_match_as_sets() {
        let key = PublicKey::from_bytes([1; 32]);
        let config = PeerConfig::new(key)
            .allowed_ips([
                "10.1.2.3/24".parse().unwrap(),
                "fd00::1/64".parse().unwrap(),
            ])
            .persistent_keepalive(25);
        assert_eq!(
            config.allowed_ips,
            vec![
                "10.1.2.0/24".parse::<IpNet>().unwrap(),
                "fd00::/64".parse().unwrap()
            ]
        );
        let mut peer = Peer::empty(key);
        peer.allowed_ips = vec!["fd00::/64".parse().unwrap(), "10.1.2.0/24".parse().unwrap()];
        peer.persistent_keepalive_secs = 25;
        peer.endpoint = Some("192.0.2.1:51820".parse().unwrap());
        assert!(peer.matches(&config));
        let with_psk = config
            .clone()
            .preshared_key(PresharedKey::from_bytes(&mut [9; 32]));
        assert!(!peer.matches(&with_psk));
        let zero_psk = config.preshared_key(PresharedKey::from_bytes(&mut [0; 32]));
        assert!(peer.matches(&zero_psk), "an all-zero key is no key");
    }
}
