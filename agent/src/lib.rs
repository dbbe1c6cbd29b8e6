//! nodeseal-agent: the node agent of nodeseal.
//!
//! Modules so far:
//! - [`store`]: the cluster-state store (node records, CSRs, certificates, trust bundle,
//!   revocations, rekey generation, node status) with a local-directory and an etcd backend.

#![warn(missing_docs)]

pub mod store;
