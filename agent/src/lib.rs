//! nodeseal-agent: the node agent of nodeseal, the keymgr role and the `nodeseal` CLI.
//!
//! - [`app`] wires everything: the cluster-state store (the `nodeseal-store` crate),
//!   [`identity`] (node key, SVID through the keymgr CSR flow), [`datapath`] (the eBPF maps and
//!   attachments), [`peer`] (one task per peer: handshakes, make-before-break rekeys, teardown,
//!   over a kernel tunnel: [`peer::ipsec`] and its XFRM layout), [`expiry`] (SA usage limits),
//!   [`server`] (the handshake listener), [`status`], [`observe`] (flows from the datapath's
//!   events) and [`metrics`].
//! - [`signer`] is keymgr as a running role; [`cli`] is the `nodeseal` command line.
//!
//! The agent never touches XFRM objects or BPF pins it does not own, and leaves its kernel state
//! in place when it stops, so traffic survives restarts; [`cleanup`] removes it when the agent
//! is told to stop for good. [`health`] serves `/healthz`, `/readyz` and `/metrics`.

#![warn(missing_docs)]

pub mod app;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod expiry;
pub mod health;
pub mod identity;
pub mod identity_allocator;
pub mod kube_identity;
pub mod kube_signer;
pub mod leader;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod mtu;
pub mod observe;
pub mod pace;
pub mod peer;
pub mod policy_engine;
pub mod server;
pub mod shutdown;
pub mod signer;
pub mod status;
