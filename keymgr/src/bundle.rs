//! The trust bundle in the SPIFFE bundle format (SPIFFE Trust Domain and Bundle spec, section 4):
//! a JWK Set whose X.509 authorities are keys with `"use": "x509-svid"` and the CA certificate in
//! `x5c`, plus `spiffe_sequence`.
//!
//! CA rollover: add the new CA ([`TrustBundle::add_authority`]), wait until every node has the new
//! bundle, switch issuance to the new CA, and remove the old one
//! ([`TrustBundle::remove_authority`]) once the last leaf it signed has expired. Every change
//! increments the sequence number.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::id::TrustDomain;

/// The `use` value of X.509 authorities in a SPIFFE bundle.
pub const X509_SVID_USE: &str = "x509-svid";
/// Largest bundle document accepted, in bytes.
pub const MAX_BUNDLE_LEN: usize = 1024 * 1024;

/// Why a bundle could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not a JSON JWK Set.
    #[error("bundle is not a JWK Set: {detail}")]
    Json {
        /// What the JSON parser reported.
        detail: String,
    },
    /// The document exceeds [`MAX_BUNDLE_LEN`].
    #[error("bundle is {len} bytes, larger than the limit")]
    TooLarge {
        /// Size of the rejected document.
        len: usize,
    },
    /// An `x509-svid` key does not carry exactly one certificate in `x5c`.
    #[error("x509-svid key has {count} x5c entries, exactly one is required")]
    X5cCount {
        /// Number of entries found.
        count: usize,
    },
    /// An `x5c` entry is not base64 DER of a certificate.
    #[error("x5c entry is not a base64 DER certificate")]
    BadCertificate,
    /// An authority is not a CA certificate.
    #[error("bundle authority is not a CA certificate")]
    NotACa,
    /// The JWK's public key parameters disagree with the certificate in `x5c`.
    #[error("JWK parameters do not match its x5c certificate")]
    KeyMismatch,
    /// The authority's key type cannot be written as a JWK.
    #[error("unsupported authority key type")]
    UnsupportedKey,
    /// An update that changes the authorities is not signed by one this node already trusts.
    #[error("bundle update refused: {detail}")]
    UntrustedUpdate {
        /// Why.
        detail: String,
    },
}

/// Domain separation for bundle signatures.
const BUNDLE_SIGNATURE_CONTEXT: &[u8] = b"nodeseal trust bundle v1\0";

/// The bytes a bundle signature covers.
pub(crate) fn signed_bytes(bundle_json: &[u8]) -> Vec<u8> {
    [BUNDLE_SIGNATURE_CONTEXT, bundle_json].concat()
}

/// Whether `issuer`'s key signed `cert`.
fn issued_by(cert: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> bool {
    let (Ok((_, cert)), Ok((_, issuer))) = (
        X509Certificate::from_der(cert),
        X509Certificate::from_der(issuer),
    ) else {
        return false;
    };
    cert.verify_signature(Some(issuer.public_key())).is_ok()
}

/// The X.509 authorities of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    sequence: u64,
    refresh_hint: Option<u64>,
    authorities: Vec<CertificateDer<'static>>,
}

#[derive(Serialize, Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Jwk {
    #[serde(rename = "use", default)]
    use_: Option<String>,
    kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    x5c: Vec<String>,
}

impl TrustBundle {
    /// Whether `next_json` may replace this bundle: the same authorities (only the sequence or
    /// refresh hint changed) always may; different ones only with `signature` over `next_json`
    /// by `signer`, an authority of this bundle. So whoever can write the store cannot make a
    /// node trust a CA of theirs: only a CA the node already trusts can introduce another
    /// (keymgr signs every bundle it publishes with its CA key).
    ///
    /// # Errors
    /// [`BundleError`] when `next_json` is malformed or the update is not signed by one of this
    /// bundle's authorities.
    pub fn accept_update(
        &self,
        next_json: &[u8],
        signature: Option<&[u8]>,
        signer_chain: &[CertificateDer<'_>],
    ) -> Result<Self, BundleError> {
        let next = Self::from_json(self.trust_domain.clone(), next_json)?;
        if next.authorities == self.authorities {
            return Ok(next);
        }
        let untrusted = |detail: &str| BundleError::UntrustedUpdate {
            detail: detail.to_owned(),
        };
        let (Some(signature), Some(signer)) = (signature, signer_chain.first()) else {
            return Err(untrusted(
                "it changes the authorities and carries no signature",
            ));
        };
        // The signer is a trusted authority, or (an imported intermediate CA) chains up to one.
        let trusted =
            |c: &CertificateDer<'_>| self.authorities.iter().any(|a| a.as_ref() == c.as_ref());
        let anchored = signer_chain.iter().position(trusted).is_some_and(|top| {
            signer_chain[..=top]
                .windows(2)
                .all(|pair| issued_by(&pair[0], &pair[1]))
        });
        if !anchored {
            return Err(untrusted("it is signed by a CA this node does not trust"));
        }
        let cert = webpki::EndEntityCert::try_from(signer)
            .map_err(|e| untrusted(&format!("signer certificate: {e}")))?;
        // The CA signs with its own key's algorithm (an imported CA may be P-384 or Ed25519).
        let message = signed_bytes(next_json);
        let verified = [
            webpki::ring::ECDSA_P256_SHA256,
            webpki::ring::ECDSA_P384_SHA384,
            webpki::ring::ED25519,
        ]
        .into_iter()
        .any(|alg| cert.verify_signature(alg, &message, signature).is_ok());
        if !verified {
            return Err(untrusted(
                "its signature does not verify with the signer's key",
            ));
        }
        Ok(next)
    }

    /// A bundle holding `authorities`, sequence 1.
    pub fn new(trust_domain: TrustDomain, authorities: Vec<CertificateDer<'static>>) -> Self {
        Self {
            trust_domain,
            sequence: 1,
            refresh_hint: None,
            authorities,
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// `spiffe_sequence`: increases with every change.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The CA certificates.
    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    /// Sets `spiffe_refresh_hint` (seconds).
    pub fn set_refresh_hint(&mut self, secs: Option<u64>) {
        self.refresh_hint = secs;
    }

    /// Adds a CA (rollover start); returns false if it was already present.
    pub fn add_authority(&mut self, cert: CertificateDer<'static>) -> bool {
        if self.authorities.contains(&cert) {
            return false;
        }
        self.authorities.push(cert);
        self.sequence += 1;
        true
    }

    /// Removes a CA (rollover end); returns false if it was not present.
    pub fn remove_authority(&mut self, cert: &CertificateDer<'_>) -> bool {
        let before = self.authorities.len();
        self.authorities.retain(|c| c.as_ref() != cert.as_ref());
        let removed = self.authorities.len() != before;
        if removed {
            self.sequence += 1;
        }
        removed
    }

    /// The SPIFFE bundle JSON document.
    ///
    /// # Errors
    /// [`BundleError::UnsupportedKey`] or [`BundleError::BadCertificate`] for an authority that
    /// cannot be described as a JWK.
    pub fn to_json(&self) -> Result<String, BundleError> {
        let keys = self
            .authorities
            .iter()
            .map(|der| {
                let (kty, crv, x, y) = jwk_params(der)?;
                Ok(Jwk {
                    use_: Some(X509_SVID_USE.to_owned()),
                    kty,
                    crv: Some(crv),
                    x: Some(x),
                    y: Some(y),
                    x5c: vec![STANDARD.encode(der)],
                })
            })
            .collect::<Result<Vec<_>, BundleError>>()?;
        let set = JwkSet {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: self.refresh_hint,
        };
        serde_json::to_string_pretty(&set).map_err(|e| BundleError::Json {
            detail: e.to_string(),
        })
    }

    /// Parses a SPIFFE bundle document for `trust_domain`. Keys with another `use` (such as
    /// `jwt-svid`) are skipped.
    ///
    /// # Errors
    /// [`BundleError`] naming what is wrong.
    pub fn from_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        if json.len() > MAX_BUNDLE_LEN {
            return Err(BundleError::TooLarge { len: json.len() });
        }
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| BundleError::Json {
            detail: e.to_string(),
        })?;
        let mut authorities = Vec::new();
        for key in set.keys {
            if key.use_.as_deref() != Some(X509_SVID_USE) {
                continue;
            }
            let [b64] = key.x5c.as_slice() else {
                return Err(BundleError::X5cCount {
                    count: key.x5c.len(),
                });
            };
            let der = STANDARD
                .decode(b64)
                .map_err(|_| BundleError::BadCertificate)?;
            let (kty, crv, x, y) = jwk_params(&der)?;
            if key.kty != kty
                || key.crv.as_deref().is_some_and(|c| c != crv)
                || key.x.as_deref().is_some_and(|v| v != x)
                || key.y.as_deref().is_some_and(|v| v != y)
            {
                return Err(BundleError::KeyMismatch);
            }
            authorities.push(CertificateDer::from(der));
        }
        Ok(Self {
            trust_domain,
            sequence: set.spiffe_sequence.unwrap_or(0),
            refresh_hint: set.spiffe_refresh_hint,
            authorities,
        })
    }
}

/// `(kty, crv, x, y)` of an EC CA certificate; rejects non-CA certificates.
fn jwk_params(der: &[u8]) -> Result<(String, String, String, String), BundleError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|_| BundleError::BadCertificate)?;
    if !rest.is_empty() {
        return Err(BundleError::BadCertificate);
    }
    if !cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca)
    {
        return Err(BundleError::NotACa);
    }
    let spki = cert.public_key();
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(BundleError::UnsupportedKey);
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .ok_or(BundleError::UnsupportedKey)?;
    let (crv, len) = if curve == OID_EC_P256 {
        ("P-256", 32)
    } else if curve == OID_NIST_EC_P384 {
        ("P-384", 48)
    } else {
        return Err(BundleError::UnsupportedKey);
    };
    // Uncompressed point: 0x04 || x || y.
    let point = &*spki.subject_public_key.data;
    if point.len() != 1 + 2 * len || point[0] != 0x04 {
        return Err(BundleError::UnsupportedKey);
    }
    Ok((
        "EC".to_owned(),
        crv.to_owned(),
        URL_SAFE_NO_PAD.encode(&point[1..=len]),
        URL_SAFE_NO_PAD.encode(&point[1 + len..]),
    ))
}
