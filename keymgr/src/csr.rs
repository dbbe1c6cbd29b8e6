//! Certificate signing requests: created on the node ([`create_csr`]) and validated by keymgr
//! before signing ([`validate_csr`]).
//!
//! A CSR is accepted only when its signature is valid, its key is ECDSA P-256, it carries
//! exactly one SAN (a URI) holding `spiffe://<trust-domain>/node/<requester>` for the node that
//! asked, and it requests nothing else (no `cA`, no other extensions). What the issued
//! certificate says is decided by the CA, never copied from the request.

use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::{FromDer, GeneralName};

use crate::id::{IdError, NodeName, SpiffeId, TrustDomain};
use crate::svid::NodeKey;

/// Largest CSR accepted, in bytes; a P-256 CSR with one URI SAN is about 400 bytes.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Why a CSR was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// The CSR is larger than [`MAX_CSR_LEN`].
    #[error("CSR is {len} bytes, larger than the limit")]
    TooLarge {
        /// Size of the rejected CSR.
        len: usize,
    },
    /// Not a DER PKCS#10 request (for example truncated).
    #[error("CSR is not valid DER: {detail}")]
    Der {
        /// What the parser reported.
        detail: String,
    },
    /// Bytes follow the DER encoding.
    #[error("trailing bytes after the CSR")]
    TrailingData,
    /// The self-signature does not verify.
    #[error("CSR signature does not verify")]
    BadSignature,
    /// The key is not ECDSA P-256.
    #[error("CSR key type is not allowed (ECDSA P-256 required)")]
    KeyTypeNotAllowed,
    /// The CSR requests an extension other than subjectAltName (including basic constraints).
    #[error("CSR requests an extension other than subjectAltName")]
    UnexpectedExtension,
    /// The CSR has no URI SAN.
    #[error("CSR has no URI SAN")]
    NoUriSan,
    /// The CSR has more than one SAN, or a SAN that is not a URI.
    #[error("CSR has {count} SANs, exactly one URI SAN is allowed")]
    ExtraSans {
        /// Number of SANs found.
        count: usize,
    },
    /// The URI SAN is not a valid SPIFFE node ID.
    #[error("CSR URI SAN is not a valid SPIFFE node ID")]
    InvalidSpiffeId {
        /// The rule it breaks.
        #[source]
        source: IdError,
    },
    /// The SPIFFE ID belongs to another trust domain.
    #[error("CSR is for trust domain {found}, expected {expected}")]
    WrongTrustDomain {
        /// The cluster's trust domain.
        expected: TrustDomain,
        /// The trust domain in the CSR.
        found: TrustDomain,
    },
    /// The SPIFFE ID names a different node than the one that asked.
    #[error("CSR is for node {found}, but was submitted by node {requester}")]
    WrongNode {
        /// The node that submitted the CSR.
        requester: NodeName,
        /// The node named in the CSR.
        found: NodeName,
    },
    /// Creating the CSR failed.
    #[error("cannot create CSR: {detail}")]
    Create {
        /// What rcgen reported.
        detail: String,
    },
    /// The node holds a valid certificate, and the CSR carries no proof of its current key.
    #[error(
        "the node holds a valid certificate (until {not_after_unix} s since the epoch) and the \
         CSR carries no renewal proof signed with its key"
    )]
    RenewalProofMissing {
        /// When the node's current certificate expires.
        not_after_unix: u64,
    },
    /// The renewal proof is not a signature of this CSR by the current certificate's key.
    #[error("renewal proof does not verify with the node's current certificate: {detail}")]
    RenewalProofInvalid {
        /// What failed.
        detail: String,
    },
}

/// Domain separation for renewal proofs: the signature can never be mistaken for one the node
/// key makes in a TLS handshake.
const RENEWAL_CONTEXT: &[u8] = b"nodeseal node SVID renewal v1\0";

/// The proof that the node asking for `csr` holds `current`, the key of its still-valid
/// certificate: a signature over the new CSR. keymgr signs a CSR for a node that already holds
/// a valid certificate only with it, so store write access alone never yields a certificate for
/// a live node.
///
/// # Errors
/// [`CsrError::Create`] if signing fails.
pub fn renewal_proof(current: &NodeKey, csr: &[u8]) -> Result<Vec<u8>, CsrError> {
    use rcgen::SigningKey as _;
    let create = |e: rcgen::Error| CsrError::Create {
        detail: e.to_string(),
    };
    let kp = current.keypair().map_err(create)?;
    kp.0.sign(&[RENEWAL_CONTEXT, csr].concat()).map_err(create)
}

/// Checks a [`renewal_proof`] of `csr` against the leaf of the node's current certificate.
///
/// # Errors
/// [`CsrError::RenewalProofInvalid`].
pub fn verify_renewal_proof(
    current_leaf: &rustls_pki_types::CertificateDer<'_>,
    csr: &[u8],
    proof: &[u8],
) -> Result<(), CsrError> {
    let invalid = |detail: String| CsrError::RenewalProofInvalid { detail };
    let leaf = webpki::EndEntityCert::try_from(current_leaf).map_err(|e| invalid(e.to_string()))?;
    leaf.verify_signature(
        webpki::ring::ECDSA_P256_SHA256,
        &[RENEWAL_CONTEXT, csr].concat(),
        proof,
    )
    .map_err(|e| invalid(e.to_string()))
}

/// A CSR that passed [`validate_csr`]; the only input [`ClusterCa::issue`](crate::ClusterCa::issue)
/// accepts.
#[derive(Debug, Clone)]
pub struct ValidatedCsr {
    pub(crate) spiffe_id: SpiffeId,
    pub(crate) node: NodeName,
    /// SubjectPublicKeyInfo DER of the requested key.
    pub(crate) spki: Vec<u8>,
}

impl ValidatedCsr {
    /// The SPIFFE ID the certificate will carry.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The node that asked.
    pub fn node(&self) -> &NodeName {
        &self.node
    }
}

/// Creates a DER CSR for `spiffe://<td>/node/<node>` signed by `key`.
///
/// # Errors
/// [`CsrError::Create`] if signing fails.
pub fn create_csr(
    key: &NodeKey,
    td: &TrustDomain,
    node: &NodeName,
) -> Result<CertificateSigningRequestDer<'static>, CsrError> {
    let create = |e: rcgen::Error| CsrError::Create {
        detail: e.to_string(),
    };
    let id = td.node_id(node);
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node.as_str());
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(id.as_str()).map_err(create)?,
    )];
    let kp = key.keypair().map_err(create)?;
    let csr = params.serialize_request(&kp.0).map_err(create)?;
    Ok(csr.der().clone())
}

/// Validates a CSR submitted by `requester` for trust domain `td`.
///
/// # Errors
/// [`CsrError`] naming the first check that failed.
pub fn validate_csr(
    der: &[u8],
    td: &TrustDomain,
    requester: &NodeName,
) -> Result<ValidatedCsr, CsrError> {
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge { len: der.len() });
    }
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| CsrError::Der {
        detail: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingData);
    }
    let spki = &csr.certification_request_info.subject_pki;
    let is_p256 = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256);
    if !is_p256 {
        return Err(CsrError::KeyTypeNotAllowed);
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut sans = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                sans.extend(san.general_names.iter());
            }
            _ => return Err(CsrError::UnexpectedExtension),
        }
    }
    let uri = match sans.as_slice() {
        [] => return Err(CsrError::NoUriSan),
        [GeneralName::URI(uri)] => *uri,
        [_] => return Err(CsrError::NoUriSan),
        more => return Err(CsrError::ExtraSans { count: more.len() }),
    };
    let spiffe_id = SpiffeId::new(uri).map_err(|source| CsrError::InvalidSpiffeId { source })?;
    if !spiffe_id.is_member_of(td) {
        return Err(CsrError::WrongTrustDomain {
            expected: td.clone(),
            found: spiffe_id.trust_domain(),
        });
    }
    let node = spiffe_id
        .node_name()
        .map_err(|source| CsrError::InvalidSpiffeId { source })?;
    if &node != requester {
        return Err(CsrError::WrongNode {
            requester: requester.clone(),
            found: node,
        });
    }
    Ok(ValidatedCsr {
        spiffe_id,
        node,
        spki: spki.raw.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        "cluster.local".parse().unwrap()
    }

    fn csr_with(sans: Vec<rcgen::SanType>, key: &NodeKey, ca: bool) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let kp = key.keypair().unwrap();
        params.serialize_request(&kp.0).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn accepts_own_csr() {
        let key = NodeKey::generate().unwrap();
        let node: NodeName = "worker-1".parse().unwrap();
        let csr = create_csr(&key, &td(), &node).unwrap();
        let ok = validate_csr(&csr, &td(), &node).unwrap();
        assert_eq!(
            ok.spiffe_id().as_str(),
            "spiffe://cluster.local/node/worker-1"
        );
        assert_eq!(ok.node(), &node);
    }

    #[test]
    fn rejects_each_problem() {
        let key = NodeKey::generate().unwrap();
        let a: NodeName = "a".parse().unwrap();
        let good = create_csr(&key, &td(), &a).unwrap().to_vec();

        let other: NodeName = "b".parse().unwrap();
        assert!(matches!(
            validate_csr(&good, &td(), &other),
            Err(CsrError::WrongNode { .. })
        ));
        let other_td: TrustDomain = "other.td".parse().unwrap();
        assert!(matches!(
            validate_csr(&good, &other_td, &a),
            Err(CsrError::WrongTrustDomain { .. })
        ));
        assert!(matches!(
            validate_csr(&good[..good.len() - 5], &td(), &a),
            Err(CsrError::Der { .. })
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            validate_csr(&trailing, &td(), &a).unwrap_err(),
            CsrError::TrailingData
        );
        // Flip a byte inside the signature.
        let mut tampered = good.clone();
        let n = tampered.len();
        tampered[n - 3] ^= 0x01;
        assert_eq!(
            validate_csr(&tampered, &td(), &a).unwrap_err(),
            CsrError::BadSignature
        );
        let two = csr_with(
            vec![
                uri("spiffe://cluster.local/node/a"),
                uri("spiffe://cluster.local/node/b"),
            ],
            &key,
            false,
        );
        assert_eq!(
            validate_csr(&two, &td(), &a).unwrap_err(),
            CsrError::ExtraSans { count: 2 }
        );
        let none = csr_with(vec![], &key, false);
        assert_eq!(
            validate_csr(&none, &td(), &a).unwrap_err(),
            CsrError::NoUriSan
        );
        let ca = csr_with(vec![uri("spiffe://cluster.local/node/a")], &key, true);
        assert_eq!(
            validate_csr(&ca, &td(), &a).unwrap_err(),
            CsrError::UnexpectedExtension
        );
        let dots = csr_with(vec![uri("spiffe://cluster.local/node/../a")], &key, false);
        assert_eq!(
            validate_csr(&dots, &td(), &a).unwrap_err(),
            CsrError::InvalidSpiffeId {
                source: IdError::DotPathSegment
            }
        );
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![uri("spiffe://cluster.local/node/a")];
        let ed_csr = params.serialize_request(&ed).unwrap().der().to_vec();
        assert_eq!(
            validate_csr(&ed_csr, &td(), &a).unwrap_err(),
            CsrError::KeyTypeNotAllowed
        );
        assert!(matches!(
            validate_csr(&vec![0u8; MAX_CSR_LEN + 1], &td(), &a),
            Err(CsrError::TooLarge { .. })
        ));
    }
}
