//! nodeseal-xfrm: typed XFRM (IPsec) states and policies, programmed over netlink.
//!
//! The kernel does the encryption; this crate is how nodeseal tells it what to do. It owns:
//! - the typed model: [`StateSpec`] (ESP tunnel mode, AEAD `rfc4106(gcm(aes))` or
//!   `rfc7539esp(chacha20,poly1305)`), [`PolicySpec`], [`Selector`], [`Mark`], [`Spi`], [`ReqId`];
//! - programming through a cheap-clone [`Handle`] (`states()` / `policies()` / `batch()`), in
//!   the caller's or any other network namespace, many requests per `sendmsg`;
//! - ownership and [`reconcile()`](reconcile::reconcile): nodeseal's objects are recognised by
//!   reqid range and mark bits, and nothing foreign is ever changed or deleted;
//! - counters: per-state [`StateStats`] and the namespace-wide [`XfrmStat`];
//! - notices: [`ExpireMonitor`] reports states crossing their soft or hard limits.
//!
//! All kernel traffic goes through one seam, [`kernel::Kernel`], with the netlink backend and
//! an in-memory fake (`testing` feature) for kernel-free tests.
//!
//! It deliberately does not know the `skb->mark` bit layout (that belongs to `bpf/common`), key
//! derivation, or peers: the agent composes those.
//!
//! Keys are held in zeroizing buffers, redacted from `Debug`, written straight into one
//! zeroizing netlink buffer and wiped after sending; receive buffers (which carry keys in
//! dumps) are wiped after decoding.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use nodeseal_xfrm::{Aead, AeadAlgorithm, Handle, ReqId, Selector, Spi, StateSpec};
//! let handle = Handle::new()?;
//! let aead = Aead::new(AeadAlgorithm::AesGcm128, &[7; 20])?;
//! let sel = Selector::new("10.0.1.0/24".parse()?, "10.0.2.0/24".parse()?)?;
//! let spec = StateSpec::new(
//!     "192.168.0.1".parse()?, "192.168.0.2".parse()?,
//!     Spi::new(0x1000)?, ReqId::new(0x4e53_0001)?, aead, Some(sel),
//! )?;
//! handle.states().add(spec).execute().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod handle;
pub mod kernel;
mod monitor;
mod netlink;
mod policy;
pub mod reconcile;
mod selector;
mod spd;
mod state;
mod stats;

pub use handle::{
    Batch, BatchError, BatchFailure, Handle, PolicyRequests, Request, StateRequests, XfrmError,
};
pub use kernel::{KernelError, KernelErrorKind, ObjectRef, TransportError};
pub use monitor::{Expire, ExpireMonitor, MonitorEvent};
pub use netlink::NetlinkKernel;
pub use nodeseal_netlink::DecodeError;
pub use policy::{
    Action, Direction, KernelPolicy, PolicyId, PolicySpec, Template, TemplateLevel, TemplateMode,
};
pub use reconcile::{Desired, Ownership, ReconcileError, ReconcileReport, reconcile, sweep};
pub use selector::{Mark, Selector, SelectorError};
pub use spd::{FamilyThresholds, PolicyHashThresholds, ThresholdError};
pub use state::{
    Aead, AeadAlgorithm, KernelState, Lifetime, Limits, ReqId, SpecError, Spi, StateId, StateSpec,
    StateStats,
};
pub use stats::{StatError, XfrmStat};

/// Helpers for tests in this and other crates.
#[cfg(any(test, feature = "testing"))]
pub mod test_helpers;
