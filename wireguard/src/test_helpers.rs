//! Test fixtures: the fake kernel and a synthetic peer set like the agent configures.
//!
//! Peer `i` has a public key and a preshared key made from `i` (not derived from a private key:
//! X25519 in a debug build would make a 5,000-peer fixture slow), endpoint
//! `172.16.0.0 + i` port 51820, and allowed IPs: its node IP (/32) and pod CIDR
//! `10.(i/256).(i%256).0/24`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};

pub use crate::fake::FakeKernel;
use crate::{PeerConfig, PresharedKey, PrivateKey, PublicKey};

/// The port every fixture peer listens on.
pub const PEER_PORT: u16 = 51820;

/// The node IP of peer `i`.
#[must_use]
pub fn node_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i))
}

/// The pod CIDR (/24) of peer `i` (`i < 65536`).
#[must_use]
pub fn pod_cidr(i: u32) -> IpNet {
    let [_, _, hi, lo] = i.to_be_bytes();
    IpNet::V4(
        Ipv4Net::new(Ipv4Addr::new(10, hi, lo, 0), 24)
            .unwrap_or_else(|_| unreachable!("24 is a valid IPv4 prefix")),
    )
}

/// The deterministic private key of peer `i`.
#[must_use]
pub fn private_key(i: u32) -> PrivateKey {
    let mut bytes = [0x5a; 32];
    bytes[..4].copy_from_slice(&i.to_be_bytes());
    PrivateKey::from_bytes(&mut bytes)
}

/// The deterministic public key of peer `i` (bytes made from `i`, no private key behind it).
#[must_use]
pub fn public_key(i: u32) -> PublicKey {
    let mut bytes = [0x77; 32];
    bytes[..4].copy_from_slice(&i.to_be_bytes());
    PublicKey::from_bytes(bytes)
}

/// The deterministic preshared key of the pair with peer `i`.
#[must_use]
pub fn preshared_key(i: u32) -> PresharedKey {
    let mut bytes = [0xa5; 32];
    bytes[28..].copy_from_slice(&i.to_be_bytes());
    PresharedKey::from_bytes(&mut bytes)
}

/// Peer `i` as the agent would configure it.
#[must_use]
pub fn peer(i: u32) -> PeerConfig {
    PeerConfig::new(public_key(i))
        .preshared_key(preshared_key(i))
        .endpoint(SocketAddr::new(node_ip(i), PEER_PORT))
        .allowed_ips([IpNet::from(node_ip(i)), pod_cidr(i)])
}
