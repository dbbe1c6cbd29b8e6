//! Identity-based network policy for nodeseal: CiliumNetworkPolicy-compatible L3/L4 rules
//! compiled to the eBPF policy table.
//!
//! The model is Cilium's. A workload's identity is a number standing for its security-relevant
//! label set ([`labels`]); the datapath knows packets' peers only by identity. Policies select
//! their subjects and peers by labels ([`selector`]), entities (host, remote-node, world,
//! cluster, all) or CIDRs. Documents of the supported kinds ([`document`]) are translated into
//! one internal model ([`rule`]), which [`compile`] turns into the entries of the BPF policy
//! table for the identities on this node, and which [`trace`] evaluates directly to explain a
//! verdict (`nodeseal policy trace`).
//!
//! Semantics, shared by every API:
//! - A direction of an endpoint is enforced (default deny) as soon as one rule of that
//!   direction, allow or deny, selects the endpoint; otherwise everything passes.
//! - In an enforced direction, traffic is allowed if and only if at least one allow rule
//!   matches it and no deny rule does: deny always wins, whatever the specificity.
//!
//! The crate is pure: no I/O, no BPF, no store. Identity allocation, map writes and the CLI
//! live elsewhere; they call [`document::parse`], [`compile::cidr_prefixes`],
//! [`compile::compile`] (or [`compile::Compiler`], which compiles only what changed) and
//! [`trace::trace`].

#![warn(missing_docs)]

pub mod compile;
pub mod document;
pub mod labels;
pub mod rule;
pub mod selector;
pub mod trace;

#[cfg(test)]
mod test_support;
