//! TLS and authentication settings of the etcd backend: the CA bundle that verifies etcd, an
//! optional client certificate and key (mutual TLS), and a user name with a password read from a
//! file (etcd's own authentication).
//!
//! Files are read and checked when the store connects, so a missing file, malformed PEM or a key
//! that does not belong to its certificate is an error naming the file before any connection is
//! tried, rather than a handshake failure later.
//!
//! Secrets (the client key, the password) live in `Zeroizing` buffers here and never appear in
//! `Debug` output or logs. The etcd client and tonic keep their own copies (the password as a
//! `String` to re-authenticate, the key inside the TLS configuration), which this crate cannot
//! wipe.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Identity, TlsOptions};
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use zeroize::Zeroizing;

/// Largest PEM or password file read: certificates bundles are small, and a larger file is
/// a mistake (a wrong path) that should not be read into memory whole.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// TLS towards etcd: the CA bundle that verifies the server, and optionally a client certificate
/// and key for etcd's `--client-cert-auth`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdTls {
    /// PEM bundle of the CAs that may sign etcd's server certificate. Only these are trusted
    /// (no system roots).
    pub ca_file: PathBuf,
    /// Client certificate chain (PEM) and its private key (PEM), for mutual TLS.
    pub client: Option<EtcdClientCert>,
}

impl EtcdTls {
    /// Verifies etcd with the CAs in `ca_file`, without a client certificate.
    pub fn new(ca_file: impl Into<PathBuf>) -> Self {
        Self {
            ca_file: ca_file.into(),
            client: None,
        }
    }

    /// Adds a client certificate and key (mutual TLS).
    #[must_use]
    pub fn with_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.client = Some(EtcdClientCert {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
        });
        self
    }

    /// Reads and checks the files and builds the client's TLS settings, and the same settings
    /// for [`probe`].
    ///
    /// # Errors
    ///
    /// [`EtcdSecurityError`] naming the file that cannot be read, holds no usable PEM, or whose
    /// key does not match its certificate.
    pub(crate) async fn load(&self) -> Result<(TlsOptions, ProbeConfig), EtcdSecurityError> {
        let ca_pem = read_limited(FileRole::CaBundle, &self.ca_file).await?;
        let cas = certificates(FileRole::CaBundle, &self.ca_file, &ca_pem)?;
        // Parse each CA as rustls will, so that a corrupt certificate is reported with its file
        // here and not as an opaque handshake failure.
        let mut roots = rustls::RootCertStore::empty();
        for ca in cas {
            roots
                .add(ca)
                .map_err(|source| EtcdSecurityError::Certificate {
                    role: FileRole::CaBundle,
                    path: self.ca_file.clone(),
                    source,
                })?;
        }
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(&ca_pem));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            // ring supports rustls' default versions, so this is not expected to fail.
            .map_err(|source| EtcdSecurityError::BugTlsConfig { source })?
            .with_root_certificates(roots);
        let mut probe = match &self.client {
            Some(client) => {
                let (identity, certified) = client.load(&provider).await?;
                tls = tls.identity(identity);
                builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                    certified,
                )))
            }
            None => builder.with_no_client_auth(),
        };
        probe.alpn_protocols = vec![b"h2".to_vec()];
        Ok((tls, ProbeConfig(Arc::new(probe))))
    }
}

/// The client's TLS settings as a rustls configuration, for [`probe`].
#[derive(Clone)]
pub(crate) struct ProbeConfig(Arc<rustls::ClientConfig>);

impl fmt::Debug for ProbeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Holds the client key: nothing of it is shown.
        f.write_str("ProbeConfig(..)")
    }
}

/// The HTTP/2 client preface and an empty SETTINGS frame: an HTTP/2 server that accepted the
/// connection answers with its own SETTINGS.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// Finds out whether etcd at `endpoint` and this client accept each other's certificates, with
/// one TLS handshake and one HTTP/2 exchange.
///
/// Why: when etcd refuses the client's certificate (missing, or from another CA), TLS 1.3 says
/// so with an alert after the handshake, and the gRPC stack reports only "connection closed".
/// Here the alert is read, so the error says which certificate was refused and by whom. An
/// unreachable etcd is not an error: connecting stays possible while etcd is down, and the
/// first request reports that.
///
/// # Errors
///
/// [`EtcdSecurityError::TlsRefused`] with rustls' reason.
pub(crate) async fn probe(
    config: &ProbeConfig,
    endpoint: &str,
    timeout: Duration,
) -> Result<(), EtcdSecurityError> {
    let Some((host, port)) = host_port(endpoint) else {
        // Malformed endpoints are the etcd client's to report.
        return Ok(());
    };
    let Ok(server_name) = ServerName::try_from(host.to_owned()) else {
        return Ok(());
    };
    let refused = |source| EtcdSecurityError::TlsRefused {
        endpoint: endpoint.to_owned(),
        source,
    };
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        let connector = tokio_rustls::TlsConnector::from(config.0.clone());
        let mut tls = connector.connect(server_name, tcp).await?;
        tls.write_all(H2_PREFACE).await?;
        tls.flush().await?;
        let mut answer = [0u8; 9];
        tls.read_exact(&mut answer).await?;
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Err(error)) => match error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls_error) => Err(refused(tls_error.clone())),
            None => Ok(()),
        },
        // Accepted, unreachable or slow: the requests will tell.
        Ok(Ok(())) | Err(_) => Ok(()),
    }
}

/// `host` and `port` of `https://host:port[/...]` (or without the scheme); IPv6 in brackets.
fn host_port(endpoint: &str) -> Option<(&str, u16)> {
    let rest = endpoint.strip_prefix("https://").unwrap_or(endpoint);
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port.parse().ok()?))
}

/// A client certificate chain and its key, both PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdClientCert {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl EtcdClientCert {
    async fn load(
        &self,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<(Identity, rustls::sign::CertifiedKey), EtcdSecurityError> {
        let cert_pem = read_limited(FileRole::ClientCert, &self.cert_file).await?;
        let key_pem = read_limited(FileRole::ClientKey, &self.key_file).await?;
        let chain = certificates(FileRole::ClientCert, &self.cert_file, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|error| pem_error(FileRole::ClientKey, &self.key_file, error))?;
        // Loading the pair the way rustls will use it catches an unsupported key type and a key
        // that belongs to another certificate, with both files named.
        let certified =
            rustls::sign::CertifiedKey::from_der(chain, key, provider).map_err(|source| {
                EtcdSecurityError::KeyMismatch {
                    key: self.key_file.clone(),
                    cert: self.cert_file.clone(),
                    source,
                }
            })?;
        Ok((Identity::from_pem(&*cert_pem, &*key_pem), certified))
    }
}

/// etcd authentication: a user name and its password.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdCredentials {
    /// The etcd user.
    pub username: String,
    /// Its password.
    pub password: EtcdPassword,
}

impl EtcdCredentials {
    /// Credentials from a user name and a password already in hand.
    pub fn new(username: impl Into<String>, password: EtcdPassword) -> Self {
        Self {
            username: username.into(),
            password,
        }
    }

    /// Credentials for `username`, the password from the first line of `password_file`
    /// (a trailing newline is not part of it), so that it never appears in a command line.
    ///
    /// # Errors
    ///
    /// [`EtcdSecurityError`] naming the file when it cannot be read or holds no password, or
    /// when the user name is empty.
    pub async fn from_password_file(
        username: impl Into<String>,
        password_file: &Path,
    ) -> Result<Self, EtcdSecurityError> {
        let username = username.into();
        if username.is_empty() {
            return Err(EtcdSecurityError::EmptyUsername);
        }
        let bytes = read_limited(FileRole::Password, password_file).await?;
        let text = std::str::from_utf8(&bytes).map_err(|_| EtcdSecurityError::BadPassword {
            path: password_file.to_owned(),
            reason: "not UTF-8",
        })?;
        let password = text.strip_suffix('\n').unwrap_or(text);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            return Err(EtcdSecurityError::BadPassword {
                path: password_file.to_owned(),
                reason: "empty",
            });
        }
        if password.contains('\n') {
            return Err(EtcdSecurityError::BadPassword {
                path: password_file.to_owned(),
                reason: "more than one line",
            });
        }
        Ok(Self {
            username,
            password: EtcdPassword(Zeroizing::new(password.to_owned())),
        })
    }
}

/// A password, wiped from memory on drop and never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdPassword(Zeroizing<String>);

impl EtcdPassword {
    /// Wraps a password (tests, and callers that hold it already).
    pub fn new(password: impl Into<String>) -> Self {
        Self(Zeroizing::new(password.into()))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EtcdPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EtcdPassword(<redacted>)")
    }
}

/// Which file of the etcd settings a problem is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileRole {
    /// The CA bundle.
    CaBundle,
    /// The client certificate chain.
    ClientCert,
    /// The client private key.
    ClientKey,
    /// The password file.
    Password,
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CaBundle => "CA bundle",
            Self::ClientCert => "client certificate",
            Self::ClientKey => "client key",
            Self::Password => "password file",
        })
    }
}

/// The etcd TLS or authentication settings are unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdSecurityError {
    /// A file cannot be read.
    #[error("etcd {role} {}: cannot read it", path.display())]
    Read {
        /// Which file.
        role: FileRole,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than any sane PEM or password file.
    #[error("etcd {role} {}: larger than {MAX_FILE_BYTES} bytes", path.display())]
    TooLarge {
        /// Which file.
        role: FileRole,
        /// Its path.
        path: PathBuf,
    },
    /// A PEM file is malformed or holds nothing of the expected type.
    #[error("etcd {role} {}: {reason}", path.display())]
    Pem {
        /// Which file.
        role: FileRole,
        /// Its path.
        path: PathBuf,
        /// What is wrong (e.g. no CERTIFICATE block, a bad base64 line).
        reason: String,
    },
    /// A PEM block is not a usable certificate.
    #[error("etcd {role} {}: not a usable certificate", path.display())]
    Certificate {
        /// Which file.
        role: FileRole,
        /// Its path.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The client key is unsupported or does not belong to the client certificate.
    #[error(
        "etcd client key {} is unusable or does not match client certificate {}",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The password file holds no single-line password.
    #[error("etcd password file {}: {reason}", path.display())]
    BadPassword {
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// A user name was given empty.
    #[error("etcd user name is empty")]
    EmptyUsername,
    /// An `https://` endpoint without a CA bundle: there would be nothing to verify etcd with.
    #[error("etcd endpoint {endpoint} uses https but no CA bundle is configured to verify it")]
    HttpsWithoutCa {
        /// The endpoint.
        endpoint: String,
    },
    /// TLS is configured but an endpoint is plain `http://`: its traffic would not be protected.
    #[error("etcd endpoint {endpoint} is plain http but TLS is configured; use https")]
    PlainHttpWithTls {
        /// The endpoint.
        endpoint: String,
    },
    /// etcd and this client do not accept each other's certificates: etcd refused the client's
    /// (none, or from a CA etcd does not trust), or the client refused etcd's (not from the CA
    /// bundle, or not for the endpoint's host).
    #[error("etcd at {endpoint}: TLS handshake refused")]
    TlsRefused {
        /// The endpoint.
        endpoint: String,
        /// rustls' reason: an alert from etcd, or why etcd's certificate was refused.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the provider's protocol versions (cannot happen with ring).
    #[error("BUG: TLS client configuration for etcd")]
    BugTlsConfig {
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// Credentials without TLS: etcd's Authenticate call would carry the password in clear.
    #[error(
        "etcd credentials for endpoint {endpoint} would be sent in clear; use https with a CA bundle"
    )]
    CredentialsWithoutTls {
        /// The endpoint.
        endpoint: String,
    },
}

/// Reads at most [`MAX_FILE_BYTES`], into a buffer wiped on drop (it may be a key or password).
async fn read_limited(
    role: FileRole,
    path: &Path,
) -> Result<Zeroizing<Vec<u8>>, EtcdSecurityError> {
    use tokio::io::AsyncReadExt as _;
    let read_error = |source| EtcdSecurityError::Read {
        role,
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(read_error)?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(EtcdSecurityError::TooLarge {
            role,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// Every CERTIFICATE block of a PEM file; none is an error.
fn certificates(
    role: FileRole,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, EtcdSecurityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(role, path, error))?;
    if certs.is_empty() {
        return Err(pem_error(role, path, pem::Error::NoItemsFound));
    }
    Ok(certs)
}

fn pem_error(role: FileRole, path: &Path, error: pem::Error) -> EtcdSecurityError {
    let reason = match error {
        pem::Error::NoItemsFound => match role {
            FileRole::ClientKey => "no PRIVATE KEY block".to_owned(),
            _ => "no CERTIFICATE block".to_owned(),
        },
        // The other pem errors describe the syntax problem without quoting key material.
        other => format!("malformed PEM: {other}"),
    };
    EtcdSecurityError::Pem {
        role,
        path: path.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_redacted() {
        let credentials = EtcdCredentials {
            username: "nodeseal".to_owned(),
            password: EtcdPassword::new("hunter2"),
        };
        let shown = format!("{credentials:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[tokio::test]
    async fn password_file_is_one_line_without_its_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("password");
        std::fs::write(&path, "s3cret\n").expect("write");
        let credentials = EtcdCredentials::from_password_file("nodeseal", &path)
            .await
            .expect("password");
        assert_eq!(credentials.password.expose(), "s3cret");

        std::fs::write(&path, "\n").expect("write");
        let error = EtcdCredentials::from_password_file("nodeseal", &path)
            .await
            .expect_err("empty password");
        assert_eq!(
            error.to_string(),
            format!("etcd password file {}: empty", path.display())
        );
        let missing = dir.path().join("missing");
        let error = EtcdCredentials::from_password_file("nodeseal", &missing)
            .await
            .expect_err("missing file");
        assert_eq!(
            error.to_string(),
            format!("etcd password file {}: cannot read it", missing.display())
        );
    }

    #[tokio::test]
    async fn a_file_without_certificates_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not pem at all\n").expect("write");
        let error = EtcdTls::new(&path)
            .load()
            .await
            .expect_err("no certificate");
        assert_eq!(
            error.to_string(),
            format!("etcd CA bundle {}: no CERTIFICATE block", path.display())
        );
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let error = EtcdTls::new(&path).load().await.expect_err("bad base64");
        assert!(
            error
                .to_string()
                .starts_with(&format!("etcd CA bundle {}: malformed PEM", path.display())),
            "{error}"
        );
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let error = EtcdTls::new(&path)
            .load()
            .await
            .expect_err("not a certificate");
        assert!(
            matches!(
                error,
                EtcdSecurityError::Certificate {
                    role: FileRole::CaBundle,
                    ..
                }
            ),
            "{error:?}"
        );
    }
}
