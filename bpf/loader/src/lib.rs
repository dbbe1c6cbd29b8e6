//! Userspace side of nodeseal's eBPF datapath.
//!
//! Owns loading the programs (built from `nodeseal-bpf-programs` by this crate's build script and
//! embedded in the library), pinning their maps under a pin root (default
//! [`DEFAULT_PIN_ROOT`]), attaching them to interfaces (TCX on kernels >= 6.6, a `clsact` qdisc
//! before) and typed access to every map: [`IpCache`], [`Nodes`], [`PeerSlots`], [`Endpoints`],
//! [`Policy`], [`ConfigMap`], [`DropCounters`], [`PolicyVerdicts`] and the [`EventReader`].
//!
//! Restart invariant: maps are pinned by name under the pin root, and attachments are either
//! pinned TCX links (`<root>/links/…`) or `clsact` filters at a fixed priority and handle. A new
//! [`Datapath::load`] with the same root reuses the maps with their contents, and a new
//! [`Datapath::attach`] atomically replaces the program of an existing attachment. Dropping a
//! [`Datapath`] detaches nothing; only [`Datapath::detach`] and [`Datapath::unpin_all`] remove
//! kernel state.
//!
//! It does not decide anything: which prefixes, nodes and policies to write is the agent's job.
//!
//! ```no_run
//! use nodeseal_bpf::{Attachment, Datapath, DEFAULT_PIN_ROOT};
//!
//! let mut dp = Datapath::load(DEFAULT_PIN_ROOT)?;
//! dp.attach(Attachment::FromNetwork, "eth0")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod attach;
mod events;
mod ipcache4;
mod ipcache6;
mod load;
mod maps;
mod policy;
mod shared;

#[cfg(any(test, feature = "testing"))]
pub mod test_helpers;

pub use attach::{AttachError, Attachment, CLSACT_HANDLE, CLSACT_PRIORITY, uses_tcx};
pub use events::{DropEvent, EventError, EventReader, Outcome};
pub use load::{DEFAULT_PIN_ROOT, Datapath, LoadError, Program, TestRunError, Verdict};
pub use maps::{
    ClearPorts, ConfigMap, DatapathConfig, DropCounters, Endpoints, Enforcement, IpCache, Location,
    MapError, Mode, NodeId, Nodes, PeerSlots, PolicyVerdictCounts, PolicyVerdicts, Prefix,
};
pub use nodeseal_bpf_common::{identity, mark, reason::DropReason, reason::TraceReason};
pub use policy::{Policy, PolicyDirection, PolicyRule, PolicyVerdict, Publication};
