//! nodeseal-wireguard: kernel WireGuard, programmed over netlink.
//!
//! The kernel does the encryption; this crate is how nodeseal tells it what to do. It owns:
//! - keys: the node's X25519 [`PrivateKey`] (generated from OS randomness), peers'
//!   [`PublicKey`]s and per-pair [`PresharedKey`]s; secrets are wiped on drop and redacted in
//!   `Debug`;
//! - the link: [`LinkSpec`] (`nodeseal0` by default) created idempotently over rtnetlink
//!   (`RTM_NEWLINK` with kind `wireguard`), with its MTU, up state and addresses; a link of that
//!   name but another kind is never touched;
//! - the device: [`DeviceConfig`] / [`PeerConfig`] applied with `WG_CMD_SET_DEVICE` over
//!   WireGuard's generic netlink family, split into as many messages as a large peer set needs,
//!   and read back whole ([`Device`], [`Peer`]) from a `WG_CMD_GET_DEVICE` dump;
//! - routes into the link in a table of nodeseal's own and the [`Rule`] that consults it
//!   (`RTM_NEWROUTE` / `RTM_NEWRULE`), idempotent;
//! - one cheap-clone [`Handle`] per network namespace, whose requests finish with
//!   `.execute().await`.
//!
//! Minimum kernel: 5.6 (WireGuard in mainline), or an older kernel with the out-of-tree module.
//!
//! It deliberately does not know about nodeseal's peers, identities, epochs or the eBPF
//! datapath: the agent composes those. Nothing here logs.
//!
//! Keys are written straight into one zeroizing netlink buffer, which is wiped after sending;
//! receive buffers (dumps carry the private and preshared keys) are wiped after decoding.
//!
//! All kernel traffic goes through one seam (a netlink socket), with an in-memory fake kernel
//! behind the `testing` feature ([`test_helpers::FakeKernel`], [`Handle::with_fake`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use nodeseal_wireguard::{DeviceConfig, Handle, LinkSpec, PeerConfig, PrivateKey, PublicKey};
//! let handle = Handle::new()?;
//! let link = handle.links().ensure(LinkSpec::default().mtu(1420)).execute().await?;
//! let key = PrivateKey::generate()?;
//! let peer: PublicKey = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".parse()?;
//! let config = DeviceConfig::new()
//!     .private_key(key)
//!     .listen_port(51820)
//!     .peer(PeerConfig::new(peer).allowed_ips(["10.0.2.0/24".parse()?]));
//! handle.device(link.name.parse()?).configure(config).execute().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod device;
mod error;
#[cfg(any(test, feature = "testing"))]
mod fake;
mod handle;
mod key;
mod link;
mod netlink;
mod routing;
mod worker;

pub use device::{Device, DeviceConfig, Peer, PeerChange, PeerConfig};
pub use error::{Error, KernelError, Operation, TransportError};
pub use handle::{DeviceRequests, Handle, LinkRequests, Request, RouteRequests};
pub use key::{KEY_LEN, KeyError, PresharedKey, PrivateKey, PublicKey};
pub use link::{DEFAULT_LINK_NAME, DEFAULT_MTU, Link, LinkName, LinkNameError, LinkSpec};
pub use nodeseal_netlink::DecodeError;
pub use routing::{Family, FwMark, PortSide, Rule, RulePort};

/// Helpers for tests in this and other crates.
#[cfg(any(test, feature = "testing"))]
pub mod test_helpers;
