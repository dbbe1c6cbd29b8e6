//! Test PKI made at test time with rcgen: a CA, node identities, and deliberately broken leaves.
//! Nothing here is fit for production use.

#![expect(
    clippy::expect_used,
    reason = "test helpers panic with context on set-up failures"
)]

use std::time::Duration;

use rustls_pki_types::CertificateDer;

use crate::{
    ClusterCa, IssueOptions, NodeClaims, NodeIdentity, NodeKey, NodeName, TrustBundle, TrustDomain,
    TrustStore, create_csr, validate_csr,
};

/// The trust domain tests use.
pub const TEST_TRUST_DOMAIN: &str = "cluster.local";

/// A CA plus helpers to issue good and broken leaves.
#[derive(Debug)]
pub struct TestPki {
    /// The CA.
    pub ca: ClusterCa,
}

impl TestPki {
    /// A fresh CA for [`TEST_TRUST_DOMAIN`].
    pub fn new() -> Self {
        Self::for_domain(TEST_TRUST_DOMAIN)
    }

    /// A fresh CA for `td`.
    pub fn for_domain(td: &str) -> Self {
        let td: TrustDomain = td.parse().expect("test trust domain");
        Self {
            ca: ClusterCa::generate(td, Duration::from_secs(3600)).expect("generating test CA"),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        self.ca.trust_domain().clone()
    }

    /// A bundle holding this CA.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.trust_domain(), vec![self.ca.trust_anchor().clone()])
    }

    /// A trust store holding this CA.
    pub fn trust_store(&self) -> TrustStore {
        TrustStore::new(self.bundle()).expect("test trust store")
    }

    /// A node identity through the real CSR flow.
    pub fn identity(&self, node: &str) -> NodeIdentity {
        self.identity_with(node, &IssueOptions::default())
    }

    /// A node identity with custom issue options.
    pub fn identity_with(&self, node: &str, opts: &IssueOptions) -> NodeIdentity {
        self.issue(node, None, opts)
    }

    /// A node identity whose certificate binds `claims`.
    pub fn identity_claiming(&self, node: &str, claims: &NodeClaims) -> NodeIdentity {
        self.issue(node, Some(claims), &IssueOptions::default())
    }

    fn issue(&self, node: &str, claims: Option<&NodeClaims>, opts: &IssueOptions) -> NodeIdentity {
        let node: NodeName = node.parse().expect("test node name");
        let key = NodeKey::generate().expect("node key");
        let csr = create_csr(&key, &self.trust_domain(), &node).expect("csr");
        let valid = validate_csr(&csr, &self.trust_domain(), &node).expect("validating csr");
        let chain = self.ca.issue(&valid, claims, opts).expect("issuing");
        NodeIdentity::new(chain, key).expect("identity")
    }

    /// A leaf signed by this CA from raw rcgen parameters (for broken certificates); returns the
    /// leaf and its key.
    pub fn custom_leaf(
        &self,
        params: &rcgen::CertificateParams,
    ) -> (CertificateDer<'static>, NodeKey) {
        let key = NodeKey::generate().expect("leaf key");
        let kp = key.keypair().expect("leaf keypair");
        let ca_kp = self.ca_key().keypair().expect("ca keypair");
        let issuer =
            rcgen::Issuer::from_ca_cert_der(self.ca.certificate(), &ca_kp.0).expect("issuer");
        let cert = params
            .signed_by(&kp.0, &issuer)
            .expect("signing custom leaf");
        (cert.der().clone(), key)
    }

    fn ca_key(&self) -> &NodeKey {
        self.ca.key()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// rcgen parameters of a good node leaf for `uri`; tests break one field at a time.
pub fn leaf_params(uri: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("uri"))];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::hours(1);
    params
}
