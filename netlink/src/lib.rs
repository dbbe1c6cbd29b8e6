//! The netlink plumbing shared by nodeseal's kernel crates (`nodeseal-xfrm`,
//! `nodeseal-wireguard`): a blocking netlink [`Socket`], entering a network namespace without
//! moving the caller's thread ([`in_namespace`]), and the family-independent framing in
//! [`codec`] (message headers, attributes, nested attributes, error and ACK replies).
//!
//! Family-specific messages (XFRM structures, rtnetlink links, WireGuard's generic netlink
//! attributes) stay in the crates that speak them; this crate only holds what every family
//! shares, so that it is written, checked against hostile lengths and tested once.
//!
//! ```no_run
//! use nodeseal_netlink::{Socket, codec};
//!
//! let socket = Socket::open(libc::NETLINK_ROUTE, 0)?;
//! socket.configure(4 * 1024 * 1024);
//! let mut buf = Vec::new();
//! let m = codec::begin(&mut buf, 18 /* RTM_GETLINK */, codec::NLM_F_REQUEST | codec::NLM_F_DUMP, 1);
//! buf.extend_from_slice(&[0; 16]); // struct ifinfomsg
//! codec::finish(&mut buf, m);
//! socket.send(&buf)?;
//! let mut reply = vec![0; 64 * 1024];
//! let n = socket.recv(&mut reply)?;
//! for msg in codec::messages(&reply[..n]) {
//!     let msg = msg?;
//!     if msg.ty == codec::NLMSG_ERROR {
//!         let (errno, text) = codec::decode_error(&msg)?;
//!         println!("errno {errno}: {text:?}");
//!     }
//! }
//! # Ok::<(), nodeseal_netlink::Error>(())
//! ```

pub mod codec;
mod socket;

pub use codec::DecodeError;
pub use socket::{Socket, in_namespace};

/// Failures of the netlink exchange itself: a socket call, or a reply that does not decode.
// Not `non_exhaustive`: the crates above convert it into their own transport errors variant by
// variant, and a new variant should make them decide where it goes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket call failed.
    #[error("netlink {call} failed")]
    Io {
        /// The call (`socket`, `bind`, `send`, `recv`, `setns`).
        call: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel sent something that does not decode (including a datagram larger than the
    /// receive buffer).
    #[error("malformed netlink reply")]
    Decode(#[from] DecodeError),
}
