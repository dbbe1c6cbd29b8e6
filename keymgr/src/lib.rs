//! nodeseal-keymgr: node identities and the authenticated key agreement.
//!
//! What this crate owns:
//! - identifiers: [`TrustDomain`], [`SpiffeId`], [`NodeName`] (strict parsing, round-trip);
//! - the cluster CA ([`ClusterCa`]): generate or import, issue node X.509-SVIDs from validated
//!   CSRs ([`validate_csr`]), store the key 0600;
//! - the node side of identity: [`NodeKey`] (generated on the node), [`create_csr`],
//!   [`NodeIdentity`] (chain + key, the common form also built from SPIFFE Workload API data);
//! - the trust bundle in SPIFFE format ([`TrustBundle`]) and peer verification with revocation
//!   ([`TrustStore`]);
//! - the key-agreement protocol: [`initiate`] / [`accept`] run mutual TLS 1.3 over any async
//!   stream, exchange [`Hello`]s and return an [`Agreement`] with the verified peer, its Hello and
//!   the [`SessionKeys`] (see `PROTOCOL.md`).
//!
//! What it does not do: it never opens sockets, sleeps or spawns tasks (the agent owns the
//! runtime, timeouts and retries), never talks to a cluster store, and never programs the kernel.

#![warn(missing_docs)]

pub mod bundle;
pub mod ca;
pub mod claims;
pub mod csr;
pub mod handshake;
pub mod id;
pub mod keys;
pub mod protocol;
pub mod provider;
pub mod svid;
pub mod verifier;

#[cfg(any(test, feature = "testing"))]
pub mod test_helpers;

pub use bundle::{BundleError, TrustBundle};
pub use ca::{CaError, ClusterCa, IssueOptions};
pub use claims::{ClaimsError, NodeClaims};
pub use csr::{
    CsrError, ValidatedCsr, create_csr, renewal_proof, validate_csr, verify_renewal_proof,
};
pub use handshake::{
    Agreement, Channel, HandshakeConfig, HandshakeError, Incoming, accept, initiate,
};
pub use id::{IdError, NodeName, SpiffeId, TrustDomain};
pub use keys::{Aead, DirectionKeys, HostKeys, SaKey, SessionKeys, WgPsk};
pub use protocol::{
    Epoch, Hello, Message, MessageError, Mode, RejectReason, Spi, WgProof, WgPublicKey,
};
pub use svid::{NodeIdentity, NodeKey, SvidError, SvidInfo};
pub use verifier::{ExpectedPeer, PeerIdentity, PeerRole, TrustStore, VerifyError};
