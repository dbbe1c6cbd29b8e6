//! Peer verification: chain to the trust bundle, the SPIFFE X.509-SVID rules, validity window,
//! revocation (by SPIFFE ID and by serial) and "is this the node I expected".
//!
//! [`TrustStore`] is a cheap-clone handle shared by every handshake; updating the bundle or the
//! revocation list through it affects the next verification. The rustls verifiers built from it
//! live in [`handshake`](crate::handshake), one per connection, so each knows which peer it
//! expects and can report the verified identity.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::{BundleError, TrustBundle};
use crate::id::{IdError, NodeName, SpiffeId, TrustDomain};
use crate::svid::{SvidError, SvidInfo};

/// Why a peer's certificate chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The peer sent no certificate.
    #[error("peer sent no certificate")]
    NoCertificate,
    /// The leaf breaks an X.509-SVID rule.
    #[error("peer certificate is not a valid X.509-SVID")]
    Svid {
        /// The rule it breaks.
        #[source]
        source: SvidError,
    },
    /// The SPIFFE ID belongs to another trust domain.
    #[error("peer is in trust domain {found}, expected {expected}")]
    WrongTrustDomain {
        /// Our trust domain.
        expected: TrustDomain,
        /// The peer's trust domain.
        found: TrustDomain,
    },
    /// The SPIFFE ID is not a node ID (`/node/<name>`).
    #[error("peer SPIFFE ID {id} is not a node ID")]
    NotANodeId {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
        /// Why.
        #[source]
        source: IdError,
    },
    /// The leaf's `notAfter` has passed.
    #[error("peer certificate expired")]
    Expired {
        /// The leaf's `notAfter`.
        not_after: SystemTime,
    },
    /// The leaf's `notBefore` is in the future.
    #[error("peer certificate is not yet valid")]
    NotYetValid {
        /// The leaf's `notBefore`.
        not_before: SystemTime,
    },
    /// No CA in the trust bundle signed the chain (another CA, possibly with the same name, or
    /// a tampered signature).
    #[error("peer certificate is not signed by a CA in the trust bundle")]
    UnknownIssuer,
    /// A signature in the chain uses an algorithm we do not accept.
    #[error("unsupported signature algorithm in the peer's certificate chain")]
    UnsupportedSignatureAlgorithm,
    /// The leaf lacks the extended key usage needed for its role.
    #[error("peer certificate lacks the required extended key usage")]
    MissingExtendedKeyUsage,
    /// Any other chain-building failure.
    #[error("peer certificate chain is invalid: {detail}")]
    Chain {
        /// What webpki reported.
        detail: String,
    },
    /// The peer's node has been revoked.
    #[error("peer {id} is revoked")]
    RevokedNode {
        /// The revoked SPIFFE ID.
        id: SpiffeId,
    },
    /// The peer's certificate serial has been revoked.
    #[error("peer certificate serial {serial} is revoked")]
    RevokedSerial {
        /// The serial, lowercase hex.
        serial: String,
    },
    /// A valid SVID, but for another node than the one expected.
    #[error("expected peer {expected}, but it presented an SVID for {found}")]
    UnexpectedPeer {
        /// The node we meant to talk to.
        expected: NodeName,
        /// The node the certificate names.
        found: NodeName,
    },
}

/// Which peer a handshake must be with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExpectedPeer {
    /// Exactly this node.
    Node(NodeName),
    /// Any node of the trust domain; the caller checks the returned [`PeerIdentity`] itself (a
    /// responder that maps the peer address to a node after the handshake).
    AnyNode,
}

/// Which side of the TLS handshake the peer was; selects the extended key usage required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is the TLS client (needs clientAuth).
    Client,
    /// The peer is the TLS server (needs serverAuth).
    Server,
}

/// A verified peer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerIdentity {
    /// The peer's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The node name from the SPIFFE ID.
    pub node: NodeName,
    /// The leaf's serial number (DER integer bytes, leading zeros stripped).
    pub serial: Vec<u8>,
    /// When the peer's leaf expires.
    pub not_after: SystemTime,
    /// The node IPs and pod CIDRs its issuer admitted (`None`: the leaf binds none).
    pub claims: Option<crate::claims::NodeClaims>,
}

/// Shared trust state: bundle, revoked nodes and revoked serials.
#[derive(Clone)]
pub struct TrustStore {
    inner: Arc<RwLock<TrustState>>,
    algs: &'static [&'static dyn SignatureVerificationAlgorithm],
}

struct TrustState {
    bundle: TrustBundle,
    anchors: Vec<TrustAnchor<'static>>,
    revoked_ids: HashSet<SpiffeId>,
    revoked_serials: HashSet<Vec<u8>>,
}

impl TrustStore {
    /// A store trusting `bundle`, with nothing revoked.
    ///
    /// # Errors
    /// [`BundleError::BadCertificate`] if an authority cannot be used as a trust anchor.
    pub fn new(bundle: TrustBundle) -> Result<Self, BundleError> {
        let anchors = anchors(&bundle)?;
        Ok(Self {
            inner: Arc::new(RwLock::new(TrustState {
                bundle,
                anchors,
                revoked_ids: HashSet::new(),
                revoked_serials: HashSet::new(),
            })),
            algs: crate::provider::crypto_provider()
                .signature_verification_algorithms
                .all,
        })
    }

    /// Replaces the bundle (for example after a CA rollover step). A bundle for another trust
    /// domain is accepted: the trust domain peers must be in follows the bundle.
    ///
    /// # Errors
    /// [`BundleError::BadCertificate`] if an authority cannot be used as a trust anchor; the old
    /// bundle stays in place.
    pub fn set_bundle(&self, bundle: TrustBundle) -> Result<(), BundleError> {
        let anchors = anchors(&bundle)?;
        let mut state = self.write();
        state.bundle = bundle;
        state.anchors = anchors;
        Ok(())
    }

    /// The current bundle.
    pub fn bundle(&self) -> TrustBundle {
        self.read().bundle.clone()
    }

    /// The trust domain peers must belong to.
    pub fn trust_domain(&self) -> TrustDomain {
        self.read().bundle.trust_domain().clone()
    }

    /// Refuses every certificate for `id` from now on.
    pub fn revoke_id(&self, id: SpiffeId) {
        self.write().revoked_ids.insert(id);
    }

    /// Refuses the certificate with this serial (DER integer bytes) from now on.
    pub fn revoke_serial(&self, serial: &[u8]) {
        self.write()
            .revoked_serials
            .insert(canonical_serial(serial).to_vec());
    }

    /// Replaces the whole revocation list (as read from the cluster store).
    pub fn set_revocations(
        &self,
        ids: impl IntoIterator<Item = SpiffeId>,
        serials: impl IntoIterator<Item = Vec<u8>>,
    ) {
        let mut state = self.write();
        state.revoked_ids = ids.into_iter().collect();
        state.revoked_serials = serials
            .into_iter()
            .map(|s| canonical_serial(&s).to_vec())
            .collect();
    }

    /// Whether `id` is revoked.
    pub fn is_revoked(&self, id: &SpiffeId) -> bool {
        self.read().revoked_ids.contains(id)
    }

    /// Verifies a peer's chain (leaf first) at `now`.
    ///
    /// # Errors
    /// [`VerifyError`] naming the first check that failed, in this order: SVID rules, trust
    /// domain, node ID, validity, chain, revocation, expected node.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
        role: PeerRole,
        expected: &ExpectedPeer,
    ) -> Result<PeerIdentity, VerifyError> {
        let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::NoCertificate)?;
        let (rest, cert) = X509Certificate::from_der(leaf).map_err(|e| VerifyError::Svid {
            source: SvidError::Der {
                detail: e.to_string(),
            },
        })?;
        if !rest.is_empty() {
            return Err(VerifyError::Svid {
                source: SvidError::TrailingData,
            });
        }
        let info = SvidInfo::from_parsed(&cert).map_err(|source| VerifyError::Svid { source })?;
        let state = self.read();
        let td = state.bundle.trust_domain();
        if !info.spiffe_id.is_member_of(td) {
            return Err(VerifyError::WrongTrustDomain {
                expected: td.clone(),
                found: info.spiffe_id.trust_domain(),
            });
        }
        let node = info
            .spiffe_id
            .node_name()
            .map_err(|source| VerifyError::NotANodeId {
                id: info.spiffe_id.clone(),
                source,
            })?;
        if now < info.not_before {
            return Err(VerifyError::NotYetValid {
                not_before: info.not_before,
            });
        }
        if now > info.not_after {
            return Err(VerifyError::Expired {
                not_after: info.not_after,
            });
        }
        let ee = webpki::EndEntityCert::try_from(leaf).map_err(map_webpki)?;
        let usage = match role {
            PeerRole::Client => webpki::KeyUsage::client_auth(),
            PeerRole::Server => webpki::KeyUsage::server_auth(),
        };
        let since_epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        ee.verify_for_usage(
            self.algs,
            &state.anchors,
            intermediates,
            UnixTime::since_unix_epoch(since_epoch),
            usage,
            None,
            None,
        )
        .map_err(map_webpki)?;
        if state.revoked_ids.contains(&info.spiffe_id) {
            return Err(VerifyError::RevokedNode { id: info.spiffe_id });
        }
        let serial = canonical_serial(&info.serial).to_vec();
        if state.revoked_serials.contains(&serial) {
            return Err(VerifyError::RevokedSerial {
                serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
            });
        }
        if let ExpectedPeer::Node(want) = expected
            && *want != node
        {
            return Err(VerifyError::UnexpectedPeer {
                expected: want.clone(),
                found: node,
            });
        }
        Ok(PeerIdentity {
            spiffe_id: info.spiffe_id,
            node,
            serial,
            not_after: info.not_after,
            claims: info.claims,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, TrustState> {
        // A panic while holding the lock cannot leave TrustState half-updated (every writer
        // assigns whole fields), so a poisoned lock is still consistent.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, TrustState> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.read();
        f.debug_struct("TrustStore")
            .field("trust_domain", state.bundle.trust_domain())
            .field("sequence", &state.bundle.sequence())
            .field("authorities", &state.anchors.len())
            .field("revoked_ids", &state.revoked_ids.len())
            .field("revoked_serials", &state.revoked_serials.len())
            .finish()
    }
}

fn anchors(bundle: &TrustBundle) -> Result<Vec<TrustAnchor<'static>>, BundleError> {
    bundle
        .authorities()
        .iter()
        .map(|der| {
            webpki::anchor_from_trusted_cert(der)
                .map(|a| a.to_owned())
                .map_err(|_| BundleError::BadCertificate)
        })
        .collect()
}

/// Serial numbers compare without the sign-padding zero byte.
fn canonical_serial(serial: &[u8]) -> &[u8] {
    let start = serial
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(serial.len().saturating_sub(1));
    &serial[start..]
}

fn map_webpki(e: webpki::Error) -> VerifyError {
    use webpki::Error as E;
    match e {
        // A CA with the same name as one in the bundle but another key shows up as a signature
        // failure; either way no trusted CA signed the certificate.
        E::UnknownIssuer | E::InvalidSignatureForPublicKey => VerifyError::UnknownIssuer,
        E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::UnsupportedSignatureAlgorithmContext(_) => VerifyError::UnsupportedSignatureAlgorithm,
        E::RequiredEkuNotFoundContext(_) => VerifyError::MissingExtendedKeyUsage,
        E::BadDer | E::BadDerTime | E::TrailingData(_) => VerifyError::Svid {
            source: SvidError::Der {
                detail: format!("{e:?}"),
            },
        },
        other => VerifyError::Chain {
            detail: format!("{other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_canonically() {
        assert_eq!(canonical_serial(&[0, 0x80, 1]), &[0x80, 1]);
        assert_eq!(canonical_serial(&[0]), &[0]);
        assert_eq!(canonical_serial(&[5]), &[5]);
    }
}
