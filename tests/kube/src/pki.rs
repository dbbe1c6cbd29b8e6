//! Throwaway PKI for one control plane: a CA, the apiserver's serving certificate, the admin
//! client certificate and the service-account token signing key.
//!
//! Everything is generated at fixture start with rcgen (ECDSA P-256, which both Go's crypto/tls
//! and the service-account JWT signer accept) and written as PEM into the fixture's temp dir.
//! Nothing here is ever committed: the STYLE rule "generate test PKI at test time".

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The first address of `--service-cluster-ip-range`: the `kubernetes` Service's ClusterIP, which
/// in-cluster clients dial, so the serving certificate has to name it.
pub const KUBERNETES_SERVICE_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 1));

/// A PEM certificate with its PEM private key.
#[derive(Clone)]
pub struct CertAndKey {
    /// PEM-encoded certificate.
    pub cert_pem: String,
    /// PEM-encoded PKCS#8 private key.
    pub key_pem: String,
}

impl std::fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Throwaway keys, but a habit worth keeping: no key material in Debug output.
        f.debug_struct("CertAndKey")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// All key material one control plane needs.
#[derive(Debug)]
pub struct ClusterPki {
    /// The CA that signs the serving and admin certificates and that `--client-ca-file` trusts.
    pub ca: CertAndKey,
    /// kube-apiserver's serving certificate.
    pub serving: CertAndKey,
    /// Client certificate `CN=nodeseal-test-admin, O=system:masters`.
    pub admin: CertAndKey,
    /// Service-account token signing key (private) and its SPKI public key.
    pub service_account: CertAndKey,
}

impl ClusterPki {
    /// Generates a fresh CA and the certificates signed by it. The serving certificate names
    /// 127.0.0.1, `bind`, the `kubernetes` Service IP and the usual DNS names.
    pub fn generate(bind: IpAddr) -> Result<Self> {
        let ca_key = KeyPair::generate().context("generating CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "nodeseal-test-kube-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA")?;
        let ca = CertAndKey {
            cert_pem: ca_cert.pem(),
            key_pem: ca_key.serialize_pem(),
        };
        let issuer = Issuer::new(ca_params, ca_key);

        let mut ips = vec![IpAddr::from([127, 0, 0, 1]), KUBERNETES_SERVICE_IP];
        if !ips.contains(&bind) {
            ips.push(bind);
        }
        let dns = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        let mut sans: Vec<SanType> = ips.into_iter().map(SanType::IpAddress).collect();
        for name in dns {
            sans.push(SanType::DnsName(name.try_into().context("DNS SAN")?));
        }
        let serving = leaf(
            &issuer,
            "kube-apiserver",
            None,
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        // O=system:masters is bound to cluster-admin by the bootstrap RBAC policy, so this
        // certificate works before any RBAC object of ours exists.
        let admin = leaf(
            &issuer,
            "nodeseal-test-admin",
            Some("system:masters"),
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;

        let sa_key = KeyPair::generate().context("generating service-account signing key")?;
        let service_account = CertAndKey {
            cert_pem: sa_key.public_key_pem(),
            key_pem: sa_key.serialize_pem(),
        };

        Ok(Self {
            ca,
            serving,
            admin,
            service_account,
        })
    }
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    organization: Option<&str>,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertAndKey> {
    let key = KeyPair::generate().context("generating leaf key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("signing certificate for {common_name}"))?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A PEM `CERTIFICATE REQUEST` for `common_name` with a fresh key, for tests that create
/// CertificateSigningRequests. Returns the request and the key.
pub fn csr_pem(common_name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().context("generating CSR key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = params.serialize_request(&key).context("serialising CSR")?;
    Ok((csr.pem().context("CSR to PEM")?, key.serialize_pem()))
}

/// A self-signed PEM certificate for `common_name`: stands in for what a signer writes into a
/// CSR's `status.certificate` (the apiserver only checks that it parses as PEM certificates).
pub fn self_signed_pem(common_name: &str) -> Result<String> {
    let key = KeyPair::generate().context("generating key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    Ok(params.self_signed(&key).context("self-signing")?.pem())
}
