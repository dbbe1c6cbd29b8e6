//! The cluster CA: a self-signed ECDSA P-256 root made here, or an intermediate the operator
//! imports. It signs node SVIDs from [`ValidatedCsr`]s only.
//!
//! The CA key is held as zeroizing PKCS#8 and is turned into a signing key only for the duration
//! of one signature. On disk (standalone mode) the key file is created with mode 0600.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rand::RngCore as _;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::claims::NodeClaims;
use crate::csr::ValidatedCsr;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{NodeKey, certs_from_pem, pem_encode};

/// Default lifetime of a node SVID.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default backdating of `notBefore`, to tolerate clock skew between nodes.
pub const DEFAULT_BACKDATE: Duration = Duration::from_secs(60);
/// Default lifetime of a generated root CA.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// File name of the CA certificate (chain) written by [`ClusterCa::write_files`].
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA key written by [`ClusterCa::write_files`] (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";

/// CA creation, import, issuance and storage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// Key generation or signing failed.
    #[error("CA crypto operation failed: {detail}")]
    Crypto {
        /// What the library reported.
        detail: String,
    },
    /// The certificate or key input is unusable.
    #[error("CA input is invalid")]
    Input {
        /// Why.
        #[source]
        source: crate::svid::SvidError,
    },
    /// The imported certificate is not a CA (no `cA=true` or no keyCertSign).
    #[error("imported certificate is not a CA certificate")]
    NotACa,
    /// The imported certificate names another trust domain in its URI SAN.
    #[error("CA certificate is for trust domain {found}, expected {expected}")]
    WrongTrustDomain {
        /// Configured trust domain.
        expected: TrustDomain,
        /// The trust domain in the CA's URI SAN.
        found: String,
    },
    /// Reading or writing a CA file failed.
    #[error("CA file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl CaError {
    pub(crate) fn crypto(e: rcgen::Error) -> Self {
        Self::Crypto {
            detail: e.to_string(),
        }
    }
}

/// How to issue a node SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct IssueOptions {
    /// Lifetime from now (default 24 h).
    pub ttl: Duration,
    /// How far before now `notBefore` is set (default 60 s).
    pub backdate: Duration,
}

impl Default for IssueOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_SVID_TTL,
            backdate: DEFAULT_BACKDATE,
        }
    }
}

impl IssueOptions {
    /// Options with the given TTL and the default backdate.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            ..Self::default()
        }
    }
}

/// The cluster CA.
pub struct ClusterCa {
    trust_domain: TrustDomain,
    /// The CA's own certificate followed by its issuers (for an imported intermediate).
    chain: Vec<CertificateDer<'static>>,
    key: NodeKey,
}

impl ClusterCa {
    /// Creates a self-signed ECDSA P-256 root for `td` valid for `ttl`.
    ///
    /// # Errors
    /// [`CaError::Crypto`] if key generation or signing fails.
    pub fn generate(td: TrustDomain, ttl: Duration) -> Result<Self, CaError> {
        let key = NodeKey::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "nodeseal");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("nodeseal cluster CA {td}"),
        );
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        // SPIFFE X.509-SVID spec 4.1: a signing certificate may carry the trust domain's ID.
        let td_id = format!("spiffe://{td}");
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(td_id).map_err(CaError::crypto)?,
        )];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - DEFAULT_BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        let kp = key.keypair().map_err(CaError::crypto)?;
        let cert = params.self_signed(&kp.0).map_err(CaError::crypto)?;
        Ok(Self {
            trust_domain: td,
            chain: vec![cert.der().clone()],
            key,
        })
    }

    /// Imports a CA: `cert_pem` holds the CA certificate first, then optionally its issuers up
    /// to the root; `key_pem` holds its PKCS#8 key.
    ///
    /// # Errors
    /// [`CaError::Input`] for unreadable PEM or a key that does not match, [`CaError::NotACa`],
    /// [`CaError::WrongTrustDomain`].
    pub fn import(td: TrustDomain, cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, CaError> {
        let chain = certs_from_pem(cert_pem).map_err(|source| CaError::Input { source })?;
        let key = NodeKey::from_pem(key_pem).map_err(|source| CaError::Input { source })?;
        let ca_der = chain.first().ok_or(CaError::Input {
            source: crate::svid::SvidError::EmptyChain,
        })?;
        let (_, cert) = X509Certificate::from_der(ca_der).map_err(|e| CaError::Input {
            source: crate::svid::SvidError::Der {
                detail: e.to_string(),
            },
        })?;
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca);
        let can_sign = cert
            .key_usage()
            .ok()
            .flatten()
            .is_none_or(|ku| ku.value.key_cert_sign());
        if !is_ca || !can_sign {
            return Err(CaError::NotACa);
        }
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name
                    && SpiffeId::new(uri).map_or(true, |id| !id.is_member_of(&td))
                {
                    return Err(CaError::WrongTrustDomain {
                        expected: td,
                        found: (*uri).to_owned(),
                    });
                }
            }
        }
        let kp = key.keypair().map_err(CaError::crypto)?;
        if rcgen::PublicKeyData::der_bytes(&kp.0) != &*cert.public_key().subject_public_key.data {
            return Err(CaError::Input {
                source: crate::svid::SvidError::KeyMismatch,
            });
        }
        Ok(Self {
            trust_domain: td,
            chain,
            key,
        })
    }

    /// Loads a CA written by [`ClusterCa::write_files`].
    ///
    /// # Errors
    /// [`CaError::Io`] and the errors of [`ClusterCa::import`].
    pub fn load_files(td: TrustDomain, dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read(&path).map_err(|source| CaError::Io { path, source })
        };
        let cert = read(CA_CERT_FILE)?;
        let key = zeroize::Zeroizing::new(read(CA_KEY_FILE)?);
        Self::import(td, &cert, &key)
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`, replacing existing files.
    ///
    /// # Errors
    /// [`CaError::Io`].
    pub fn write_files(&self, dir: &Path) -> Result<(), CaError> {
        write_file(&dir.join(CA_CERT_FILE), self.chain_pem().as_bytes(), 0o644)?;
        write_file(&dir.join(CA_KEY_FILE), self.key.to_pem().as_bytes(), 0o600)
    }

    /// Issues a node X.509-SVID for a validated CSR, binding the node IPs and pod CIDRs admitted
    /// for it (see [`NodeClaims`]); returns the chain to present, leaf first.
    ///
    /// # Errors
    /// [`CaError::Crypto`] if signing fails.
    pub fn issue(
        &self,
        csr: &ValidatedCsr,
        claims: Option<&NodeClaims>,
        opts: &IssueOptions,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let now = time::OffsetDateTime::now_utc();
        self.issue_at(csr, claims, opts, now)
    }

    pub(crate) fn issue_at(
        &self,
        csr: &ValidatedCsr,
        claims: Option<&NodeClaims>,
        opts: &IssueOptions,
        now: time::OffsetDateTime,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "nodeseal");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, csr.node().as_str());
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(csr.spiffe_id().as_str())
                .map_err(CaError::crypto)?,
        )];
        if let Some(claims) = claims {
            claims.apply(&mut params);
        }
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - opts.backdate;
        params.not_after = now + opts.ttl;
        params.serial_number = Some(random_serial());
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(&csr.spki).map_err(CaError::crypto)?;
        let kp = self.key.keypair().map_err(CaError::crypto)?;
        let ca_cert = &self.chain[0];
        let issuer = rcgen::Issuer::from_ca_cert_der(ca_cert, &kp.0).map_err(CaError::crypto)?;
        let leaf = params
            .signed_by(&public_key, &issuer)
            .map_err(CaError::crypto)?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates().iter().cloned());
        Ok(chain)
    }

    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn key(&self) -> &NodeKey {
        &self.key
    }

    /// Signs a trust bundle document (JSON) with the CA's key, so that nodes trusting this CA
    /// (or the root it chains to: send [`chain_pem`](Self::chain_pem) along) accept it as an
    /// update (see [`TrustBundle::accept_update`](crate::TrustBundle::accept_update)).
    ///
    /// # Errors
    /// [`CaError::Crypto`] if signing fails.
    pub fn sign_bundle(&self, bundle_json: &[u8]) -> Result<Vec<u8>, CaError> {
        use rcgen::SigningKey as _;
        let kp = self.key.keypair().map_err(CaError::crypto)?;
        kp.0.sign(&crate::bundle::signed_bytes(bundle_json))
            .map_err(CaError::crypto)
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA's own certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The certificate that belongs in the trust bundle: the last certificate of the imported
    /// chain (the root), or the CA itself when it was generated or imported alone.
    pub fn trust_anchor(&self) -> &CertificateDer<'static> {
        // `chain` is never empty: both constructors put the CA certificate first.
        &self.chain[self.chain.len() - 1]
    }

    /// Certificates sent after the leaf: the CA and its issuers, without the trust anchor.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.chain[..self.chain.len() - 1]
    }

    /// The CA chain as PEM.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }

    /// The CA's private key as PKCS#8 PEM, for storing it where only keymgr reads (the
    /// Kubernetes Secret of Kubernetes mode; [`write_files`](Self::write_files) otherwise).
    pub fn key_pem(&self) -> zeroize::Zeroizing<String> {
        self.key.to_pem()
    }

    /// Whether the CA certificate is still valid at `at`.
    pub fn is_valid_at(&self, at: SystemTime) -> bool {
        X509Certificate::from_der(&self.chain[0]).is_ok_and(|(_, c)| {
            let secs = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let t = i64::try_from(secs).unwrap_or(i64::MAX);
            c.validity().not_before.timestamp() <= t && t <= c.validity().not_after.timestamp()
        })
    }
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("trust_domain", &self.trust_domain)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// 128 random bits (SPIFFE and CA/B practice). rcgen encodes the serial as a positive INTEGER,
/// adding a leading zero byte when the top bit is set.
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    rcgen::SerialNumber::from_slice(&bytes)
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    // Write to a temporary file created with the final mode, then rename: the key is never
    // readable by others, not even briefly.
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}
