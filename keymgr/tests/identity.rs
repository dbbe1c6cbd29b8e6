//! CA → CSR → SVID → verify, every rejection with its own error, bundle format, and independent
//! readers (openssl CLI, the `spiffe` crate).

#![expect(
    clippy::unwrap_used,
    reason = "test helper functions panic on set-up failure"
)]

use std::process::Command;
use std::time::{Duration, SystemTime};

use nodeseal_keymgr::test_helpers::{TestPki, leaf_params};
use nodeseal_keymgr::{
    BundleError, ClusterCa, CsrError, ExpectedPeer, IdError, IssueOptions, NodeClaims, NodeKey,
    NodeName, PeerRole, SvidError, SvidInfo, TrustBundle, TrustDomain, TrustStore, VerifyError,
    create_csr, renewal_proof, svid::certs_from_pem, verify_renewal_proof,
};
use rustls_pki_types::CertificateDer;

fn node(s: &str) -> NodeName {
    s.parse().unwrap()
}

fn verify(
    store: &TrustStore,
    chain: &[CertificateDer<'static>],
    expected: &ExpectedPeer,
) -> Result<nodeseal_keymgr::PeerIdentity, VerifyError> {
    store.verify(chain, SystemTime::now(), PeerRole::Client, expected)
}

#[test]
fn round_trip_issue_and_verify() {
    let pki = TestPki::new();
    let id = pki.identity("worker-1");
    assert_eq!(
        id.info().spiffe_id.as_str(),
        "spiffe://cluster.local/node/worker-1"
    );
    let lifetime = id
        .info()
        .not_after
        .duration_since(id.info().not_before)
        .unwrap();
    assert_eq!(lifetime, Duration::from_secs(24 * 3600 + 60));
    assert!(id.info().serial.len() >= 16, "128-bit serial");
    let store = pki.trust_store();
    let peer = verify(&store, id.chain(), &ExpectedPeer::Node(node("worker-1"))).unwrap();
    assert_eq!(peer.node, node("worker-1"));
    store
        .verify(
            id.chain(),
            SystemTime::now(),
            PeerRole::Server,
            &ExpectedPeer::AnyNode,
        )
        .unwrap();
    // Two SVIDs get different serials.
    let other = pki.identity("worker-1");
    assert_ne!(other.info().serial, id.info().serial);
}

#[test]
fn each_rejection_has_its_own_error() {
    let pki = TestPki::new();
    let store = pki.trust_store();
    let any = ExpectedPeer::AnyNode;
    let leaf = |params: rcgen::CertificateParams| vec![pki.custom_leaf(&params).0];

    let mut two = leaf_params("spiffe://cluster.local/node/a");
    two.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/node/b".try_into().unwrap(),
    ));
    assert_eq!(
        verify(&store, &leaf(two), &any),
        Err(VerifyError::Svid {
            source: SvidError::MultipleUriSans { count: 2 }
        })
    );

    let mut ca_leaf = leaf_params("spiffe://cluster.local/node/a");
    ca_leaf.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    assert_eq!(
        verify(&store, &leaf(ca_leaf), &any),
        Err(VerifyError::Svid {
            source: SvidError::LeafIsCa
        })
    );

    let wrong_td = leaf_params("spiffe://other.domain/node/a");
    assert!(matches!(
        verify(&store, &leaf(wrong_td), &any),
        Err(VerifyError::WrongTrustDomain { .. })
    ));

    for (uri, want) in [
        ("spiffe://cluster.local/node/../a", IdError::DotPathSegment),
        ("spiffe://cluster.local/node//a", IdError::EmptyPathSegment),
        (
            "spiffe://Cluster.local/node/a",
            IdError::TrustDomainUppercase { ch: 'C' },
        ),
    ] {
        assert_eq!(
            verify(&store, &leaf(leaf_params(uri)), &any),
            Err(VerifyError::Svid {
                source: SvidError::InvalidSpiffeId { source: want }
            }),
            "{uri}"
        );
    }

    let mut no_ku = leaf_params("spiffe://cluster.local/node/a");
    no_ku.key_usages.clear();
    assert_eq!(
        verify(&store, &leaf(no_ku), &any),
        Err(VerifyError::Svid {
            source: SvidError::MissingKeyUsage
        })
    );

    let mut ku_no_ds = leaf_params("spiffe://cluster.local/node/a");
    ku_no_ds.key_usages = vec![rcgen::KeyUsagePurpose::KeyEncipherment];
    assert_eq!(
        verify(&store, &leaf(ku_no_ds), &any),
        Err(VerifyError::Svid {
            source: SvidError::MissingDigitalSignature
        })
    );

    let mut expired = leaf_params("spiffe://cluster.local/node/a");
    let now = time::OffsetDateTime::now_utc();
    expired.not_before = now - time::Duration::hours(2);
    expired.not_after = now - time::Duration::hours(1);
    assert!(matches!(
        verify(&store, &leaf(expired), &any),
        Err(VerifyError::Expired { .. })
    ));

    let mut future = leaf_params("spiffe://cluster.local/node/a");
    future.not_before = now + time::Duration::hours(1);
    future.not_after = now + time::Duration::hours(2);
    assert!(matches!(
        verify(&store, &leaf(future), &any),
        Err(VerifyError::NotYetValid { .. })
    ));

    let mut no_eku = leaf_params("spiffe://cluster.local/node/a");
    no_eku.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    assert_eq!(
        verify(&store, &leaf(no_eku), &any),
        Err(VerifyError::MissingExtendedKeyUsage)
    );

    let not_node = leaf_params("spiffe://cluster.local/workload/a");
    assert!(matches!(
        verify(&store, &leaf(not_node), &any),
        Err(VerifyError::NotANodeId { .. })
    ));

    let other_ca = TestPki::new();
    let foreign = other_ca.identity("a");
    assert_eq!(
        verify(&store, foreign.chain(), &any),
        Err(VerifyError::UnknownIssuer)
    );

    let good = pki.identity("a");
    assert_eq!(
        verify(&store, good.chain(), &ExpectedPeer::Node(node("b"))),
        Err(VerifyError::UnexpectedPeer {
            expected: node("b"),
            found: node("a"),
        })
    );

    let truncated = CertificateDer::from(good.chain()[0][..100].to_vec());
    assert!(matches!(
        verify(&store, &[truncated], &any),
        Err(VerifyError::Svid {
            source: SvidError::Der { .. }
        })
    ));
    assert_eq!(verify(&store, &[], &any), Err(VerifyError::NoCertificate));
    assert!(matches!(
        certs_from_pem(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"),
        Err(SvidError::Pem { .. })
    ));

    // Revocation by serial, then by SPIFFE ID; both checked after the chain.
    let other = pki.identity("a");
    store.revoke_serial(&good.info().serial);
    assert!(matches!(
        verify(&store, good.chain(), &any),
        Err(VerifyError::RevokedSerial { .. })
    ));
    verify(&store, other.chain(), &any).unwrap();
    store.revoke_id(good.info().spiffe_id.clone());
    assert_eq!(
        verify(&store, other.chain(), &any),
        Err(VerifyError::RevokedNode {
            id: good.info().spiffe_id.clone()
        })
    );
    store.set_revocations([], []);
    verify(&store, other.chain(), &any).unwrap();
}

#[test]
fn ttl_and_backdate_are_applied() {
    let pki = TestPki::new();
    let opts = IssueOptions::with_ttl(Duration::from_secs(600));
    let id = pki.identity_with("n1", &opts);
    let now = SystemTime::now();
    assert!(id.info().not_before < now - Duration::from_secs(50));
    assert!(id.info().not_after <= now + Duration::from_secs(600));
    assert!(id.info().not_after > now + Duration::from_secs(590));
    let renew = id.info().renew_at();
    let nb = id.info().not_before;
    let half = (id.info().not_after.duration_since(nb).unwrap()) / 2;
    assert!(renew <= nb + half && renew >= nb + half - half / 5);
}

#[test]
fn bundle_json_round_trip_and_rollover() {
    let pki = TestPki::new();
    let mut bundle = pki.bundle();
    let json = bundle.to_json().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["spiffe_sequence"], 1);
    assert_eq!(v["keys"][0]["use"], "x509-svid");
    assert_eq!(v["keys"][0]["kty"], "EC");
    assert_eq!(v["keys"][0]["crv"], "P-256");
    assert_eq!(v["keys"][0]["x5c"].as_array().unwrap().len(), 1);
    let back = TrustBundle::from_json(pki.trust_domain(), json.as_bytes()).unwrap();
    assert_eq!(back, bundle);

    // Rollover: old and new CA both trusted during the overlap.
    let old_id = pki.identity("a");
    let new_ca = ClusterCa::generate(pki.trust_domain(), Duration::from_secs(3600)).unwrap();
    assert!(bundle.add_authority(new_ca.trust_anchor().clone()));
    assert_eq!(bundle.sequence(), 2);
    let store = TrustStore::new(bundle.clone()).unwrap();
    let key = nodeseal_keymgr::NodeKey::generate().unwrap();
    let csr = nodeseal_keymgr::create_csr(&key, &pki.trust_domain(), &node("b")).unwrap();
    let valid = nodeseal_keymgr::validate_csr(&csr, &pki.trust_domain(), &node("b")).unwrap();
    let new_chain = new_ca
        .issue(&valid, None, &IssueOptions::default())
        .unwrap();
    let any = ExpectedPeer::AnyNode;
    verify(&store, old_id.chain(), &any).unwrap();
    verify(&store, &new_chain, &any).unwrap();
    assert!(bundle.remove_authority(pki.ca.trust_anchor()));
    assert_eq!(bundle.sequence(), 3);
    store.set_bundle(bundle).unwrap();
    assert_eq!(
        verify(&store, old_id.chain(), &any),
        Err(VerifyError::UnknownIssuer)
    );
    verify(&store, &new_chain, &any).unwrap();

    // Malformed bundles.
    assert!(matches!(
        TrustBundle::from_json(pki.trust_domain(), b"{"),
        Err(BundleError::Json { .. })
    ));
    let two = r#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":[]}]}"#;
    assert_eq!(
        TrustBundle::from_json(pki.trust_domain(), two.as_bytes()),
        Err(BundleError::X5cCount { count: 0 })
    );
    let leaf_b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&old_id.chain()[0])
    };
    let not_ca = format!(r#"{{"keys":[{{"use":"x509-svid","kty":"EC","x5c":["{leaf_b64}"]}}]}}"#);
    assert_eq!(
        TrustBundle::from_json(pki.trust_domain(), not_ca.as_bytes()),
        Err(BundleError::NotACa)
    );
    let jwt_only = r#"{"keys":[{"use":"jwt-svid","kty":"EC","kid":"x"}],"spiffe_sequence":4}"#;
    let b = TrustBundle::from_json(pki.trust_domain(), jwt_only.as_bytes());
    assert!(b.is_err() || b.unwrap().authorities().is_empty());
}

#[test]
fn ca_files_import_and_intermediate() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    pki.ca.write_files(dir.path()).unwrap();
    let mode = std::fs::metadata(dir.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let loaded = ClusterCa::load_files(pki.trust_domain(), dir.path()).unwrap();
    assert_eq!(loaded.certificate(), pki.ca.certificate());

    // An operator-provided root signs an intermediate; nodeseal imports the intermediate.
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root_params = rcgen::CertificateParams::default();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root = root_params.self_signed(&root_key).unwrap();
    let int_key = rcgen::KeyPair::generate().unwrap();
    let mut int_params = rcgen::CertificateParams::default();
    int_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    int_params.key_usages = root_params.key_usages.clone();
    int_params.distinguished_name = rcgen::DistinguishedName::new();
    int_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    let root_issuer = rcgen::Issuer::from_params(&root_params, &root_key);
    let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
    let chain_pem = format!("{}{}", int.pem(), root.pem());
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let ca = ClusterCa::import(
        td.clone(),
        chain_pem.as_bytes(),
        int_key.serialize_pem().as_bytes(),
    )
    .unwrap();
    assert_eq!(ca.trust_anchor().as_ref(), root.der().as_ref());
    let key = nodeseal_keymgr::NodeKey::generate().unwrap();
    let csr = nodeseal_keymgr::create_csr(&key, &td, &node("c")).unwrap();
    let valid = nodeseal_keymgr::validate_csr(&csr, &td, &node("c")).unwrap();
    let chain = ca.issue(&valid, None, &IssueOptions::default()).unwrap();
    assert_eq!(chain.len(), 2);
    let store = TrustStore::new(TrustBundle::new(
        td.clone(),
        vec![ca.trust_anchor().clone()],
    ))
    .unwrap();
    verify(&store, &chain, &ExpectedPeer::AnyNode).unwrap();

    // The imported intermediate signs bundle updates; nodes trusting the root accept them when
    // the intermediate's chain comes along, and not without it.
    let current = store.bundle();
    let mut next = current.clone();
    next.add_authority(pki.ca.trust_anchor().clone());
    let json = next.to_json().unwrap();
    let signature = ca.sign_bundle(json.as_bytes()).unwrap();
    let signer_chain = nodeseal_keymgr::svid::certs_from_pem(ca.chain_pem().as_bytes()).unwrap();
    current
        .accept_update(json.as_bytes(), Some(&signature), &signer_chain)
        .unwrap();
    assert!(
        current
            .accept_update(json.as_bytes(), Some(&signature), &signer_chain[..1])
            .is_err()
    );

    // Importing a leaf as CA, or a mismatched key, fails.
    let leaf_pem = pki.identity("z").chain_pem();
    assert!(matches!(
        ClusterCa::import(
            td.clone(),
            leaf_pem.as_bytes(),
            int_key.serialize_pem().as_bytes()
        ),
        Err(nodeseal_keymgr::CaError::NotACa)
    ));
    assert!(matches!(
        ClusterCa::import(
            td,
            chain_pem.as_bytes(),
            root_key.serialize_pem().as_bytes()
        ),
        Err(nodeseal_keymgr::CaError::Input { .. })
    ));
}

#[test]
fn admitted_claims_travel_in_the_svid_to_the_verified_peer_and_openssl_reads_them() {
    let pki = TestPki::new();
    let claims = NodeClaims::new(
        &["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        &[
            "10.244.7.0/24".parse().unwrap(),
            "fd00:244:7::/64".parse().unwrap(),
        ],
    )
    .unwrap();
    let id = pki.identity_claiming("worker-7", &claims);
    assert_eq!(id.info().claims.as_ref(), Some(&claims));
    let peer = verify(
        &pki.trust_store(),
        id.chain(),
        &ExpectedPeer::Node(node("worker-7")),
    )
    .unwrap();
    assert_eq!(peer.claims.as_ref(), Some(&claims));
    // A certificate issued without claims binds none, and says so.
    assert_eq!(pki.identity("worker-8").info().claims, None);

    assert!(openssl_available(), "openssl CLI is required for this test");
    let text = openssl_text(&id.chain_pem());
    assert!(text.contains("IP Address:10.0.0.7"), "{text}");
    assert!(text.contains("IP Address:FD00:0:0:0:0:0:0:7"), "{text}");
    assert!(
        text.contains("OU = pod-cidrs=10.244.7.0/24 fd00:244:7::/64"),
        "{text}"
    );
}

#[test]
fn a_renewal_proof_verifies_only_with_the_current_key_over_that_csr() {
    let pki = TestPki::new();
    let td = pki.trust_domain();
    let current = pki.identity("worker-3");
    let next_key = NodeKey::generate().unwrap();
    let csr = create_csr(&next_key, &td, &node("worker-3")).unwrap();
    let proof = renewal_proof(current.key(), &csr).unwrap();
    verify_renewal_proof(&current.chain()[0], &csr, &proof).unwrap();
    // Another node's key (a store writer's own identity) proves nothing.
    let thief = pki.identity("worker-4");
    let forged = renewal_proof(thief.key(), &csr).unwrap();
    let err = verify_renewal_proof(&current.chain()[0], &csr, &forged).unwrap_err();
    assert!(matches!(err, CsrError::RenewalProofInvalid { .. }), "{err}");
    // A proof is bound to its CSR: replayed onto another one it fails.
    let other = create_csr(&NodeKey::generate().unwrap(), &td, &node("worker-3")).unwrap();
    assert!(verify_renewal_proof(&current.chain()[0], &other, &proof).is_err());
    assert!(verify_renewal_proof(&current.chain()[0], &csr, &proof[..proof.len() / 2]).is_err());
}

#[test]
fn a_bundle_update_must_be_signed_by_an_authority_already_trusted() {
    let pki = TestPki::new();
    let current = pki.bundle();
    let ca = pki.ca.trust_anchor().clone();

    // The same authorities (a new sequence number only): no signature needed.
    let same = current.to_json().unwrap();
    assert_eq!(
        current.accept_update(same.as_bytes(), None, &[]).unwrap(),
        current
    );

    // A store writer's own CA, unsigned or signed by itself: refused.
    let rogue = ClusterCa::generate(pki.trust_domain(), Duration::from_secs(3600)).unwrap();
    let mut hijacked = current.clone();
    hijacked.add_authority(rogue.trust_anchor().clone());
    let json = hijacked.to_json().unwrap();
    let refused = |r: Result<TrustBundle, BundleError>| {
        assert!(
            matches!(r, Err(BundleError::UntrustedUpdate { .. })),
            "{r:?}"
        );
    };
    refused(current.accept_update(json.as_bytes(), None, &[]));
    let self_signed = rogue.sign_bundle(json.as_bytes()).unwrap();
    refused(current.accept_update(
        json.as_bytes(),
        Some(&self_signed),
        &[rogue.trust_anchor().clone()],
    ));
    // The rogue's signature presented as the trusted CA's: does not verify.
    refused(current.accept_update(
        json.as_bytes(),
        Some(&self_signed),
        std::slice::from_ref(&ca),
    ));

    // A rollover the trusted CA signs is accepted; its signature covers only that document.
    let new_ca = ClusterCa::generate(pki.trust_domain(), Duration::from_secs(3600)).unwrap();
    let mut rollover = current.clone();
    rollover.add_authority(new_ca.trust_anchor().clone());
    let json = rollover.to_json().unwrap();
    let signature = pki.ca.sign_bundle(json.as_bytes()).unwrap();
    let accepted = current
        .accept_update(json.as_bytes(), Some(&signature), std::slice::from_ref(&ca))
        .unwrap();
    assert_eq!(accepted.authorities().len(), 2);
    let other = hijacked.to_json().unwrap();
    refused(current.accept_update(
        other.as_bytes(),
        Some(&signature),
        std::slice::from_ref(&ca),
    ));
}

/// `openssl x509 -text` of the first certificate in `pem`.
fn openssl_text(pem: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cert.pem");
    std::fs::write(&path, pem).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn openssl_available() -> bool {
    Command::new("openssl").arg("version").output().is_ok()
}

#[test]
fn openssl_accepts_issued_svids() {
    assert!(openssl_available(), "openssl CLI is required for this test");
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let id = pki.identity("worker-7");
    let ca = dir.path().join("ca.pem");
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&ca, pki.ca.chain_pem()).unwrap();
    std::fs::write(&leaf, id.chain_pem()).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let out = Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(&ca)
            .arg(&leaf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl verify ({purpose}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = openssl_text(&id.chain_pem());
    assert!(
        text.contains("URI:spiffe://cluster.local/node/worker-7"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("X509v3 Key Usage: critical"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    // A certificate from another CA must not verify (the test can fail).
    let other = TestPki::new().identity("worker-7");
    std::fs::write(&leaf, other.chain_pem()).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&ca)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn spiffe_crate_parses_issued_svids() {
    let pki = TestPki::new();
    let id = pki.identity("worker-9");
    let chain: Vec<u8> = id.chain().iter().flat_map(|c| c.to_vec()).collect();
    let svid = spiffe::X509Svid::parse_from_der(&chain, id.key().pkcs8_der()).unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://cluster.local/node/worker-9"
    );
    let bundle = spiffe::X509Bundle::parse_from_der(
        spiffe::TrustDomain::new("cluster.local").unwrap(),
        pki.ca.trust_anchor(),
    )
    .unwrap();
    assert_eq!(bundle.authorities().len(), 1);
    // And our parser agrees with theirs on the ID.
    assert_eq!(
        SvidInfo::parse(&id.chain()[0]).unwrap().spiffe_id.as_str(),
        svid.spiffe_id().to_string()
    );
}

#[test]
fn identity_requires_matching_key_and_node_id() {
    let pki = TestPki::new();
    let id = pki.identity("n1");
    let other_key = nodeseal_keymgr::NodeKey::generate().unwrap();
    assert_eq!(
        nodeseal_keymgr::NodeIdentity::new(id.chain().to_vec(), other_key).unwrap_err(),
        SvidError::KeyMismatch
    );
    let key = nodeseal_keymgr::NodeKey::from_pem(id.key().to_pem().as_bytes()).unwrap();
    let again = nodeseal_keymgr::NodeIdentity::new(id.chain().to_vec(), key).unwrap();
    assert_eq!(again.node(), &node("n1"));
    assert_eq!(
        nodeseal_keymgr::NodeIdentity::new(vec![], nodeseal_keymgr::NodeKey::generate().unwrap())
            .unwrap_err(),
        SvidError::EmptyChain
    );
    let (leaf, leaf_key) = pki.custom_leaf(&leaf_params("spiffe://cluster.local/workload/x"));
    assert_eq!(
        nodeseal_keymgr::NodeIdentity::new(vec![leaf], leaf_key).unwrap_err(),
        SvidError::InvalidSpiffeId {
            source: IdError::NotANodeId
        }
    );
    assert!(!format!("{id:?}").contains("PRIVATE"));
}
