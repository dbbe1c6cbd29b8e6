//! The node's identity: its private key (generated here, never leaving the node, kept 0600 in the
//! state directory), its X.509-SVID obtained through the keymgr CSR flow (or given as files), and
//! the trust bundle. Renewed at half-life; a failed renewal keeps the still-valid SVID.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ipnet::IpNet;
use nodeseal_keymgr::svid::certs_from_pem;
use nodeseal_keymgr::{
    NodeIdentity, NodeKey, NodeName, TrustBundle, TrustDomain, create_csr, renewal_proof,
};
use nodeseal_store::{CertificateRecord, CsrRecord, Store};
use tracing::{info, warn};
use zeroize::Zeroizing;

/// How often the store is polled for the signed certificate.
const CERT_POLL: Duration = Duration::from_millis(250);

/// Errors obtaining the identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a file in the state directory failed.
    #[error("{path}")]
    File {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A key, certificate or bundle did not parse or match.
    #[error("{what}")]
    Invalid {
        /// What was wrong.
        what: String,
    },
    /// The store failed.
    #[error("cluster store")]
    Store(#[from] nodeseal_store::StoreError),
    /// keymgr denied the node's CertificateSigningRequest (Kubernetes mode).
    #[error("keymgr denied CertificateSigningRequest {csr}: {reason}")]
    Denied {
        /// The CSR object.
        csr: String,
        /// keymgr's message: which check failed.
        reason: String,
    },
    /// The apiserver refused a request (Kubernetes mode).
    #[error("{what}")]
    Kube {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// keymgr did not sign in time.
    #[error(
        "no certificate from keymgr after {0:?} (is `nodeseal keymgr run` up, and the node admitted?)"
    )]
    NotSigned(Duration),
}

pub(crate) fn invalid(what: impl std::fmt::Display) -> IdentityError {
    IdentityError::Invalid {
        what: what.to_string(),
    }
}

/// Where the identity comes from.
#[derive(Clone)]
pub enum IdentitySource {
    /// The keymgr CSR flow through the cluster store.
    Keymgr {
        /// The store.
        store: Store,
        /// Where the key and certificate are kept.
        state_dir: PathBuf,
        /// How long to wait for keymgr per attempt.
        sign_timeout: Duration,
        /// This node's address and pod CIDRs: a stored certificate that does not admit them
        /// (the node moved) is renewed, or peers would refuse the node.
        local: LocalClaims,
    },
    /// Kubernetes mode: a CertificateSigningRequest that keymgr approves for the node the
    /// agent pod runs on; the trust bundle from the store (keymgr's ConfigMap).
    KubeCsr {
        /// The store (for the trust bundle).
        store: Store,
        /// The agent's client (its pod-bound token is what keymgr checks).
        client: kube::Client,
        /// Where the key and certificate are kept.
        state_dir: PathBuf,
        /// As for `Keymgr`.
        local: LocalClaims,
        /// How long to wait for keymgr per attempt.
        sign_timeout: Duration,
    },
    /// Files written by an external PKI.
    Files {
        /// Certificate chain (PEM).
        cert: PathBuf,
        /// Private key (PEM).
        key: PathBuf,
        /// Trust anchors (PEM).
        bundle: PathBuf,
    },
}

impl std::fmt::Debug for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Keymgr { state_dir, .. } => f
                .debug_struct("Keymgr")
                .field("state_dir", state_dir)
                .finish_non_exhaustive(),
            Self::KubeCsr { state_dir, .. } => f
                .debug_struct("KubeCsr")
                .field("state_dir", state_dir)
                .finish_non_exhaustive(),
            Self::Files { cert, key, bundle } => f
                .debug_struct("Files")
                .field("cert", cert)
                .field("key", key)
                .field("bundle", bundle)
                .finish(),
        }
    }
}

/// An identity with its trust bundle.
pub struct Obtained {
    /// The SVID and key.
    pub identity: NodeIdentity,
    /// Trust anchors.
    pub bundle: TrustBundle,
}

impl IdentitySource {
    /// Obtains a valid identity: the stored one if it is still before its renewal time
    /// (`fresh_only` = false) or not expired, otherwise a new one.
    ///
    /// # Errors
    /// [`IdentityError`].
    pub async fn obtain(
        &self,
        td: &TrustDomain,
        node: &NodeName,
        renew: bool,
    ) -> Result<Obtained, IdentityError> {
        match self {
            Self::Files { cert, key, bundle } => {
                let chain = certs_from_pem(&read(cert)?)
                    .map_err(|e| invalid(format!("{}: {e}", cert.display())))?;
                let key = NodeKey::from_pem(&read(key)?)
                    .map_err(|e| invalid(format!("{}: {e}", key.display())))?;
                let identity = NodeIdentity::new(chain, key)
                    .map_err(|e| invalid(format!("{}: {e}", cert.display())))?;
                let anchors = certs_from_pem(&read(bundle)?)
                    .map_err(|e| invalid(format!("{}: {e}", bundle.display())))?;
                Ok(Obtained {
                    identity,
                    bundle: TrustBundle::new(td.clone(), anchors),
                })
            }
            Self::Keymgr {
                store,
                state_dir,
                sign_timeout,
                local,
            } => {
                obtain_signed(store, state_dir, td, renew, local, |key, current| {
                    request_certificate(store, td, node, key, current, *sign_timeout)
                })
                .await
            }
            Self::KubeCsr {
                store,
                client,
                state_dir,
                sign_timeout,
                local,
            } => {
                // The pod-bound token is the proof here: keymgr checks the requesting pod runs on
                // the node.
                obtain_signed(store, state_dir, td, renew, local, |key, _current| {
                    crate::kube_identity::request_certificate(client, td, node, key, *sign_timeout)
                })
                .await
            }
        }
    }
}

/// This node's address and pod CIDRs, which its certificate must admit.
#[derive(Clone, Debug)]
pub struct LocalClaims {
    /// The node's underlay address.
    pub ip: IpAddr,
    /// Its pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// Its node IP of the other family, if any.
    pub second_ip: Option<IpAddr>,
}

/// The stored SVID while it is before its renewal time (unless `renew`) and admits `local`,
/// otherwise a new key and a certificate for it from `request`, which gets the stored SVID
/// while it is valid (to prove possession of its key).
async fn obtain_signed<F, Fut>(
    store: &Store,
    state_dir: &Path,
    td: &TrustDomain,
    renew: bool,
    local: &LocalClaims,
    request: F,
) -> Result<Obtained, IdentityError>
where
    F: FnOnce(NodeKey, Option<NodeIdentity>) -> Fut,
    Fut: std::future::Future<Output = Result<NodeIdentity, IdentityError>>,
{
    let bundle = fetch_bundle(store, td).await?;
    let key_path = state_dir.join("node.key");
    let cert_path = state_dir.join("node.crt");
    let stored = stored_identity(&key_path, &cert_path);
    let reusable = stored.as_ref().is_some_and(|identity| {
        let info = identity.info();
        match info.claims.as_ref().map(|c| {
            c.cover(local.ip, &local.pod_cidrs)
                .and_then(|()| local.second_ip.map_or(Ok(()), |ip| c.cover(ip, &[])))
        }) {
            Some(Ok(())) => !renew && SystemTime::now() < info.renew_at(),
            Some(Err(e)) => {
                info!(reason = %e, "stored SVID does not admit this node; renewing");
                false
            }
            None => {
                info!("stored SVID binds no node IPs or pod CIDRs; renewing");
                false
            }
        }
    });
    let stored = match stored {
        Some(identity) if reusable => {
            info!(spiffe_id = %identity.info().spiffe_id, "using stored node SVID");
            return Ok(Obtained { identity, bundle });
        }
        other => other,
    };
    // A new key for every certificate: a leaked key dies with its certificate.
    let key = NodeKey::generate().map_err(|e| invalid(format!("generating node key: {e}")))?;
    let identity = request(key, stored).await?;
    write_secret(&key_path, identity.key().to_pem().as_bytes())?;
    write_secret(&cert_path, identity.chain_pem().as_bytes())?;
    info!(spiffe_id = %identity.info().spiffe_id, "node SVID issued");
    Ok(Obtained { identity, bundle })
}

/// The trust bundle keymgr published.
///
/// # Errors
/// [`IdentityError`] if there is none yet or it is malformed.
pub async fn fetch_bundle(store: &Store, td: &TrustDomain) -> Result<TrustBundle, IdentityError> {
    let record = store
        .get::<nodeseal_store::TrustBundle>(&())
        .await?
        .ok_or_else(|| invalid("keymgr has not published a trust bundle yet"))?;
    TrustBundle::from_json(td.clone(), record.bundle.as_bytes())
        .map_err(|e| invalid(format!("trust bundle in the store: {e}")))
}

/// The stored SVID while it has not expired.
fn stored_identity(key_path: &Path, cert_path: &Path) -> Option<NodeIdentity> {
    let key = NodeKey::from_pem(&read(key_path).ok()?).ok()?;
    let chain = certs_from_pem(&std::fs::read(cert_path).ok()?).ok()?;
    let identity = NodeIdentity::new(chain, key)
        .inspect_err(|e| warn!(error = %e, "stored SVID unusable; requesting a new one"))
        .ok()?;
    (SystemTime::now() < identity.info().not_after).then_some(identity)
}

async fn request_certificate(
    store: &Store,
    td: &TrustDomain,
    node: &NodeName,
    key: NodeKey,
    current: Option<NodeIdentity>,
    timeout: Duration,
) -> Result<NodeIdentity, IdentityError> {
    let csr = create_csr(&key, td, node).map_err(|e| invalid(format!("creating CSR: {e}")))?;
    let store_node = nodeseal_store::NodeName::new(node.as_str()).map_err(invalid)?;
    let renewal_proof = match &current {
        Some(current) => Some(
            base64::engine::general_purpose::STANDARD.encode(
                renewal_proof(current.key(), csr.as_ref())
                    .map_err(|e| invalid(format!("signing the renewal proof: {e}")))?,
            ),
        ),
        None => None,
    };
    store
        .put(&CsrRecord {
            node: store_node.clone(),
            csr_pem: pem("CERTIFICATE REQUEST", csr.as_ref()),
            renewal_proof,
        })
        .await?;
    let key_pem = key.to_pem();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(record) = store.get::<CertificateRecord>(&store_node).await? {
            let chain = certs_from_pem(record.chain_pem.as_bytes())
                .map_err(|e| invalid(format!("certificate in the store: {e}")))?;
            let candidate = NodeKey::from_pem(key_pem.as_bytes()).map_err(invalid)?;
            // An older certificate (another key) may still be there until keymgr signs ours.
            if let Ok(identity) = NodeIdentity::new(chain, candidate) {
                return Ok(identity);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(IdentityError::NotSigned(timeout));
        }
        tokio::time::sleep(CERT_POLL).await;
    }
}

/// PEM text of one DER block.
#[must_use]
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, IdentityError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| IdentityError::File {
            path: path.to_owned(),
            source,
        })
}

/// Writes a 0600 file atomically (temp file, fsync, rename), creating missing directories
/// 0700.
///
/// # Errors
/// [`IdentityError::File`].
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let file_err = |source| IdentityError::File {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(file_err)?;
    }
    let tmp = path.with_extension("tmp");
    // A temp file left by a crash keeps the mode it was created with, whatever `mode` says
    // here: start from a new file, so a key never lands in a file others can read.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_err(e)),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(file_err)?;
    f.write_all(bytes).map_err(file_err)?;
    f.sync_all().map_err(file_err)?;
    std::fs::rename(&tmp, path).map_err(file_err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

    use super::write_secret;

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn secrets_are_0600_in_a_0700_directory_even_over_a_stale_temp_file() {
        let root = std::env::temp_dir().join(format!("nodeseal-secret-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let state = root.join("state");
        let key = state.join("node.key");
        write_secret(&key, b"first").unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&key), 0o600);

        // A crash left a world-readable temp file behind.
        let tmp = key.with_extension("tmp");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&key, b"second").unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"second");
        assert!(!tmp.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
