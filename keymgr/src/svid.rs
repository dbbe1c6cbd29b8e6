//! X.509-SVID parsing and the SPIFFE leaf rules; the node's own identity ([`NodeIdentity`]).
//!
//! [`SvidInfo::parse`] applies the rules of the SPIFFE X.509-SVID specification that can be
//! checked on the leaf alone (section 4 and 5): exactly one URI SAN holding a valid SPIFFE ID,
//! `cA=false`, a key usage extension that is critical, has `digitalSignature` and has neither
//! `keyCertSign` nor `cRLSign`. Chain building, validity and revocation are the
//! [`verifier`](crate::verifier)'s job.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use zeroize::Zeroizing;

use crate::id::{IdError, NodeName, SpiffeId};

/// Why a certificate is not a valid X.509-SVID, or why PEM/DER input could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The bytes are not a DER certificate (for example truncated).
    #[error("certificate is not valid DER: {detail}")]
    Der {
        /// What the parser reported.
        detail: String,
    },
    /// Bytes follow the certificate's DER encoding.
    #[error("trailing bytes after the certificate")]
    TrailingData,
    /// The PEM input could not be parsed or held no certificate.
    #[error("no PEM certificate could be read ({detail})")]
    Pem {
        /// What went wrong.
        detail: String,
    },
    /// The certificate chain is empty.
    #[error("empty certificate chain")]
    EmptyChain,
    /// The leaf has no URI SAN.
    #[error("leaf has no URI SAN")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("leaf has {count} URI SANs, exactly one is allowed")]
    MultipleUriSans {
        /// Number of URI SANs found.
        count: usize,
    },
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID")]
    InvalidSpiffeId {
        /// The rule it breaks.
        #[source]
        source: IdError,
    },
    /// The leaf says `cA=true`.
    #[error("leaf certificate has cA=true")]
    LeafIsCa,
    /// The leaf has no key usage extension.
    #[error("leaf has no key usage extension")]
    MissingKeyUsage,
    /// The key usage extension is not marked critical.
    #[error("leaf key usage extension is not critical")]
    KeyUsageNotCritical,
    /// Key usage lacks `digitalSignature`.
    #[error("leaf key usage lacks digitalSignature")]
    MissingDigitalSignature,
    /// Key usage has `keyCertSign` or `cRLSign`, which a leaf must not have.
    #[error("leaf key usage has keyCertSign or cRLSign")]
    ForbiddenKeyUsage,
    /// An extension the SVID rules look at appears twice or cannot be decoded.
    #[error("leaf extension cannot be decoded: {detail}")]
    BadExtension {
        /// What the parser reported.
        detail: String,
    },
    /// The node IPs or pod CIDRs the leaf binds cannot be read.
    #[error("leaf claims: {0}")]
    Claims(#[from] crate::claims::ClaimsError),
    /// The private key does not belong to the leaf certificate, or cannot be read.
    #[error("private key does not match the leaf certificate")]
    KeyMismatch,
}

/// What a valid X.509-SVID leaf says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    /// The SPIFFE ID from the URI SAN.
    pub spiffe_id: SpiffeId,
    /// The serial number as its DER integer bytes.
    pub serial: Vec<u8>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The node IPs and pod CIDRs the issuer admitted; `None` when the leaf binds none.
    pub claims: Option<crate::claims::NodeClaims>,
}

impl SvidInfo {
    /// Parses a DER leaf certificate and applies the SPIFFE leaf rules.
    ///
    /// # Errors
    /// [`SvidError`] naming the first rule the certificate breaks.
    pub fn parse(der: &[u8]) -> Result<Self, SvidError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Der {
            detail: e.to_string(),
        })?;
        if !rest.is_empty() {
            return Err(SvidError::TrailingData);
        }
        Self::from_parsed(&cert)
    }

    pub(crate) fn from_parsed(cert: &X509Certificate<'_>) -> Result<Self, SvidError> {
        let bad_ext = |e: x509_parser::error::X509Error| SvidError::BadExtension {
            detail: e.to_string(),
        };
        let san = cert.subject_alternative_name().map_err(bad_ext)?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|s| s.value.general_names.iter())
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        let uri = match uris.as_slice() {
            [] => return Err(SvidError::NoUriSan),
            [one] => *one,
            more => return Err(SvidError::MultipleUriSans { count: more.len() }),
        };
        let spiffe_id =
            SpiffeId::new(uri).map_err(|source| SvidError::InvalidSpiffeId { source })?;
        if cert
            .basic_constraints()
            .map_err(bad_ext)?
            .is_some_and(|bc| bc.value.ca)
        {
            return Err(SvidError::LeafIsCa);
        }
        let ku = cert
            .key_usage()
            .map_err(bad_ext)?
            .ok_or(SvidError::MissingKeyUsage)?;
        if !ku.critical {
            return Err(SvidError::KeyUsageNotCritical);
        }
        if !ku.value.digital_signature() {
            return Err(SvidError::MissingDigitalSignature);
        }
        if ku.value.key_cert_sign() || ku.value.crl_sign() {
            return Err(SvidError::ForbiddenKeyUsage);
        }
        let validity = cert.validity();
        Ok(Self {
            spiffe_id,
            serial: cert.raw_serial().to_vec(),
            not_before: unix_to_system(validity.not_before.timestamp()),
            not_after: unix_to_system(validity.not_after.timestamp()),
            claims: crate::claims::NodeClaims::of(cert)?,
        })
    }

    /// When this leaf should be renewed: at half its lifetime, minus a random jitter of up to a
    /// tenth of the lifetime so that nodes issued together do not renew together.
    pub fn renew_at(&self) -> SystemTime {
        self.renew_at_with(&mut rand::rng())
    }

    /// [`SvidInfo::renew_at`] with a caller-supplied random source (for tests).
    pub fn renew_at_with<R: Rng + ?Sized>(&self, rng: &mut R) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        let half = lifetime / 2;
        let max_jitter_ms = u64::try_from((lifetime / 10).as_millis()).unwrap_or(u64::MAX);
        let jitter = Duration::from_millis(rng.random_range(0..=max_jitter_ms));
        self.not_before + half.saturating_sub(jitter)
    }
}

/// X.509 times (years 0..=9999) always fit a `SystemTime` on Linux; should one not, the epoch is
/// used, which makes a `notAfter` look expired (the safe side).
fn unix_to_system(secs: i64) -> SystemTime {
    let t = match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH.checked_add(Duration::from_secs(s)),
        Err(_) => UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs())),
    };
    t.unwrap_or(UNIX_EPOCH)
}

/// Reads every `CERTIFICATE` block from PEM text.
///
/// # Errors
/// [`SvidError::Pem`] when the text is not PEM or holds no certificate.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, SvidError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SvidError::Pem {
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(SvidError::Pem {
            detail: "no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

/// A node's private key: ECDSA P-256, generated on the node, never sent anywhere.
///
/// The PKCS#8 encoding is zeroized on drop and never printed.
pub struct NodeKey {
    pkcs8: Zeroizing<Vec<u8>>,
}

impl NodeKey {
    /// Generates a fresh ECDSA P-256 key.
    ///
    /// # Errors
    /// [`crate::CaError::Crypto`] if the system random source fails.
    pub fn generate() -> Result<Self, crate::ca::CaError> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(crate::ca::CaError::crypto)?;
        Ok(Self::from_keypair(kp))
    }

    /// Wraps an existing PKCS#8 DER key (ECDSA P-256 or P-384, or Ed25519).
    ///
    /// # Errors
    /// [`SvidError::KeyMismatch`] when the bytes are not a usable PKCS#8 key.
    pub fn from_pkcs8_der(pkcs8: Zeroizing<Vec<u8>>) -> Result<Self, SvidError> {
        let key = Self { pkcs8 };
        key.keypair().map_err(|_| SvidError::KeyMismatch)?;
        Ok(key)
    }

    /// Reads a PKCS#8 `PRIVATE KEY` PEM block.
    ///
    /// # Errors
    /// [`SvidError::Pem`] or [`SvidError::KeyMismatch`].
    pub fn from_pem(pem: &[u8]) -> Result<Self, SvidError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| SvidError::Pem {
            detail: e.to_string(),
        })?;
        Self::from_pkcs8_der(Zeroizing::new(der.secret_pkcs8_der().to_vec()))
    }

    /// The PKCS#8 DER encoding (secret: keep it in zeroizing buffers).
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// PKCS#8 PEM (secret).
    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem_encode("PRIVATE KEY", &self.pkcs8))
    }

    pub(crate) fn from_keypair(mut kp: rcgen::KeyPair) -> Self {
        let pkcs8 = Zeroizing::new(kp.serialize_der());
        zeroize::Zeroize::zeroize(&mut kp);
        Self { pkcs8 }
    }

    /// A short-lived rcgen key pair for signing; zeroized by [`ZeroizingKeyPair`]'s drop.
    pub(crate) fn keypair(&self) -> Result<ZeroizingKeyPair, rcgen::Error> {
        let der = PrivatePkcs8KeyDer::from(self.pkcs8.as_slice());
        rcgen::KeyPair::try_from(&der).map(ZeroizingKeyPair)
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeKey([redacted])")
    }
}

/// rcgen's key pair keeps its PKCS#8 bytes in a plain `Vec`; wipe them when done.
pub(crate) struct ZeroizingKeyPair(pub(crate) rcgen::KeyPair);

impl Drop for ZeroizingKeyPair {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

pub(crate) fn pem_encode(tag: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

/// A node's own identity: its X.509-SVID chain (leaf first) and the matching private key.
///
/// keymgr-issued identities and those from a SPIFFE Workload API (spiffe-bridge) both end up in
/// this form; the handshake presents it to peers.
pub struct NodeIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: NodeKey,
    info: SvidInfo,
    node: NodeName,
}

impl NodeIdentity {
    /// Checks that `chain[0]` is a valid node SVID (`spiffe://<td>/node/<name>`) and that `key`
    /// belongs to it.
    ///
    /// # Errors
    /// [`SvidError`] for a bad leaf, a non-node SPIFFE ID or a key that does not match.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: NodeKey) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let (rest, cert) = X509Certificate::from_der(leaf).map_err(|e| SvidError::Der {
            detail: e.to_string(),
        })?;
        if !rest.is_empty() {
            return Err(SvidError::TrailingData);
        }
        let info = SvidInfo::from_parsed(&cert)?;
        let node = info
            .spiffe_id
            .node_name()
            .map_err(|source| SvidError::InvalidSpiffeId { source })?;
        let kp = key.keypair().map_err(|_| SvidError::KeyMismatch)?;
        if rcgen::PublicKeyData::der_bytes(&kp.0) != &*cert.public_key().subject_public_key.data {
            return Err(SvidError::KeyMismatch);
        }
        Ok(Self {
            chain,
            key,
            info,
            node,
        })
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key.
    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    /// What the leaf says (SPIFFE ID, serial, validity).
    pub fn info(&self) -> &SvidInfo {
        &self.info
    }

    /// The node name from the SPIFFE ID.
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// The leaf and any intermediates as PEM.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("spiffe_id", &self.info.spiffe_id)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn renewal_is_half_life_jittered_earlier() {
        let nb = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let info = SvidInfo {
            spiffe_id: SpiffeId::new("spiffe://td/node/a").unwrap(),
            serial: vec![1],
            not_before: nb,
            not_after: nb + Duration::from_secs(24 * 3600),
            claims: None,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            let at = info.renew_at_with(&mut rng);
            let off = at.duration_since(nb).unwrap();
            assert!(off <= Duration::from_secs(12 * 3600), "{off:?}");
            assert!(off >= Duration::from_secs(12 * 3600 - 24 * 360), "{off:?}");
            seen.insert(off);
        }
        assert!(seen.len() > 50, "jitter must vary");
    }

    #[test]
    fn garbage_pem_and_der() {
        assert!(matches!(
            certs_from_pem(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
            Err(SvidError::Pem { .. })
        ));
        assert!(matches!(
            certs_from_pem(b"hello"),
            Err(SvidError::Pem { .. })
        ));
        assert!(matches!(
            SvidInfo::parse(&[0x30, 0x82, 0x01]),
            Err(SvidError::Der { .. })
        ));
        assert!(format!("{:?}", NodeKey::generate().unwrap()).contains("redacted"));
    }
}
