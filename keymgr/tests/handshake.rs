//! Both sides of the key agreement in-process over `tokio::io::duplex`.

#![expect(
    clippy::unwrap_used,
    reason = "test helper functions panic on set-up failure"
)]

use std::sync::Arc;

use nodeseal_keymgr::protocol::{PROTOCOL_VERSION, read_message};
use nodeseal_keymgr::test_helpers::TestPki;
use nodeseal_keymgr::{
    Aead, Agreement, Epoch, ExpectedPeer, HandshakeConfig, HandshakeError, Hello, MessageError,
    Mode, NodeIdentity, NodeName, RejectReason, Spi, TrustStore, VerifyError, WgPublicKey, accept,
    initiate,
};
use tokio::io::{AsyncWriteExt as _, DuplexStream, duplex};

fn node(s: &str) -> NodeName {
    s.parse().unwrap()
}

fn hello(name: &str, epoch: u64, spi: u32) -> Hello {
    Hello::new(
        node(name),
        Epoch(epoch),
        Spi::new(spi).unwrap(),
        Mode::Ipsec,
    )
    .with_node_ips(vec!["192.0.2.1".parse().unwrap()])
    .with_pod_cidrs(vec!["10.0.1.0/24".parse().unwrap()])
}

struct Pair {
    a: HandshakeConfig,
    b: HandshakeConfig,
}

fn pair(pki: &TestPki) -> Pair {
    let store = pki.trust_store();
    Pair {
        a: HandshakeConfig::new(store.clone(), &pki.identity("node-a")).unwrap(),
        b: HandshakeConfig::new(store, &pki.identity("node-b")).unwrap(),
    }
}

type Both = (
    Result<Agreement<DuplexStream>, HandshakeError>,
    Result<Agreement<DuplexStream>, HandshakeError>,
);

async fn run(
    initiator: &HandshakeConfig,
    expected_responder: &str,
    i_hello: Hello,
    responder: &HandshakeConfig,
    expected_initiator: ExpectedPeer,
    r_hello: Hello,
) -> Both {
    let (c, s) = duplex(16 * 1024);
    let expected_responder = node(expected_responder);
    let client = initiate(initiator, c, &expected_responder, i_hello);
    let server = async {
        let incoming = accept(responder, s, expected_initiator).await?;
        incoming.respond(r_hello).await
    };
    tokio::join!(client, server)
}

#[tokio::test]
async fn keys_agree_per_direction_and_differ_across_directions_and_epochs() {
    let pki = TestPki::new();
    let p = pair(&pki);
    let (ra, rb) = run(
        &p.a,
        "node-b",
        hello("node-a", 1, 0x1000),
        &p.b,
        ExpectedPeer::Node(node("node-a")),
        hello("node-b", 1, 0x2000),
    )
    .await;
    let (mut a, mut b) = (ra.unwrap(), rb.unwrap());
    assert_eq!(a.peer.node, node("node-b"));
    assert_eq!(b.peer.node, node("node-a"));
    assert_eq!(a.peer_hello.inbound_spi.get(), 0x2000);
    assert_eq!(b.peer_hello.pod_cidrs, vec!["10.0.1.0/24".parse().unwrap()]);
    for aead in [Aead::Aes128Gcm, Aead::Aes256Gcm] {
        let a_out = a.keys.outbound.key(aead);
        let b_in = b.keys.inbound.key(aead);
        assert_eq!(a_out.rfc4106_key(), b_in.rfc4106_key());
        assert_eq!(
            a.keys.inbound.key(aead).rfc4106_key(),
            b.keys.outbound.key(aead).rfc4106_key()
        );
        assert_ne!(a_out.rfc4106_key(), a.keys.inbound.key(aead).rfc4106_key());
        assert_eq!(a_out.key().len(), aead.key_len());
        assert_eq!(a_out.salt().len(), 4);
    }
    // SPIs: a's outbound SA uses the SPI b chose for its inbound.
    assert_eq!(a.keys.outbound.spi.get(), 0x2000);
    assert_eq!(b.keys.inbound.spi.get(), 0x2000);
    assert_eq!(a.keys.inbound.spi.get(), 0x1000);
    assert_eq!(a.keys.wg_psk.as_bytes(), b.keys.wg_psk.as_bytes());
    assert!(!format!("{:?}", a.keys).contains(&format!("{:?}", &a.keys.wg_psk.as_bytes()[0..4])));
    assert!(format!("{:?}", a.keys).contains("redacted"));

    // make-before-break confirmation round.
    let (x, y) = tokio::join!(
        a.channel.confirm_installed(Epoch(1)),
        b.channel.confirm_installed(Epoch(1))
    );
    x.unwrap();
    y.unwrap();

    // A second handshake (rekey, epoch 2): fresh keys, different from epoch 1.
    let (ra2, rb2) = run(
        &p.a,
        "node-b",
        hello("node-a", 2, 0x1000),
        &p.b,
        ExpectedPeer::AnyNode,
        hello("node-b", 2, 0x2000),
    )
    .await;
    let (a2, b2) = (ra2.unwrap(), rb2.unwrap());
    assert_eq!(
        a2.keys.outbound.aes256_gcm.rfc4106_key(),
        b2.keys.inbound.aes256_gcm.rfc4106_key()
    );
    assert_ne!(
        a2.keys.outbound.aes256_gcm.rfc4106_key(),
        a.keys.outbound.aes256_gcm.rfc4106_key()
    );
    assert_ne!(a2.keys.wg_psk.as_bytes(), a.keys.wg_psk.as_bytes());
}

/// Node encryption in IPsec mode: host SAs get their own keys, agreed per direction, under the
/// SPIs of the Hellos' `host_spi`, distinct from the pod SAs' keys; a side that sends no
/// `host_spi` gets none.
#[tokio::test]
async fn host_sas_get_keys_of_their_own_only_when_both_sides_ask() {
    let pki = TestPki::new();
    let p = pair(&pki);
    let host = |h: Hello, spi: u32| h.with_host_spi(Spi::new(spi).unwrap());
    let (ra, rb) = run(
        &p.a,
        "node-b",
        host(hello("node-a", 1, 0x1000), 0x1001),
        &p.b,
        ExpectedPeer::Node(node("node-a")),
        host(hello("node-b", 1, 0x2000), 0x2001),
    )
    .await;
    let (a, b) = (ra.unwrap(), rb.unwrap());
    let (a_host, b_host) = (a.keys.host.as_ref().unwrap(), b.keys.host.as_ref().unwrap());
    assert_eq!(a_host.outbound.spi.get(), 0x2001);
    assert_eq!(a_host.inbound.spi.get(), 0x1001);
    assert_eq!(b_host.outbound.spi.get(), 0x1001);
    for aead in [Aead::Aes128Gcm, Aead::Aes256Gcm] {
        let a_out = a_host.outbound.key(aead).rfc4106_key();
        assert_eq!(a_out, b_host.inbound.key(aead).rfc4106_key());
        assert_eq!(
            a_host.inbound.key(aead).rfc4106_key(),
            b_host.outbound.key(aead).rfc4106_key()
        );
        assert_ne!(a_out, a_host.inbound.key(aead).rfc4106_key());
        assert_ne!(a_out, a.keys.outbound.key(aead).rfc4106_key());
        assert_ne!(a_out, a.keys.inbound.key(aead).rfc4106_key());
    }
    assert!(
        !format!("{:?}", a.keys)
            .contains(&format!("{:?}", &a_host.outbound.aes128_gcm.key()[0..4]))
    );

    let (ra, rb) = run(
        &p.a,
        "node-b",
        host(hello("node-a", 2, 0x1000), 0x1001),
        &p.b,
        ExpectedPeer::Node(node("node-a")),
        hello("node-b", 2, 0x2000),
    )
    .await;
    let (a, b) = (ra.unwrap(), rb.unwrap());
    assert!(a.keys.host.is_none() && b.keys.host.is_none());
}

/// node-a and node-b agree in WireGuard mode, announcing keys `[1; 32]` and `[2; 32]`.
async fn wireguard_agreement(p: &Pair) -> Both {
    let wg = |n: &str, spi, k| {
        Hello::new(node(n), Epoch(5), Spi::new(spi).unwrap(), Mode::Wireguard)
            .with_wg_public_key(WgPublicKey([k; 32]))
    };
    run(
        &p.a,
        "node-b",
        wg("node-a", 300, 1),
        &p.b,
        ExpectedPeer::AnyNode,
        wg("node-b", 400, 2),
    )
    .await
}

#[tokio::test]
async fn wireguard_mode_carries_public_key() {
    let pki = TestPki::new();
    let p = pair(&pki);
    let (ra, rb) = wireguard_agreement(&p).await;
    let (a, b) = (ra.unwrap(), rb.unwrap());
    assert_eq!(a.peer_hello.wg_public_key, Some(WgPublicKey([2; 32])));
    assert_eq!(b.peer_hello.wg_public_key, Some(WgPublicKey([1; 32])));
    assert_eq!(a.keys.wg_psk.as_bytes(), b.keys.wg_psk.as_bytes());
}

/// Both sides prove they hold their WireGuard keys over the channel. A proof verifies only with
/// the same X25519 secret, only in this session, and only as the other side's.
#[tokio::test]
async fn wireguard_possession_proofs_verify_only_with_the_shared_secret_and_the_right_side() {
    let pki = TestPki::new();
    let p = pair(&pki);
    let (ra, rb) = wireguard_agreement(&p).await;
    let (mut a, mut b) = (ra.unwrap(), rb.unwrap());
    let (shared, other) = ([7u8; 32], [8u8; 32]);
    let (a_proof, b_proof) = (
        a.keys.wg_possession_proof(&shared),
        b.keys.wg_possession_proof(&shared),
    );
    let (at_a, at_b) = tokio::join!(
        a.channel.exchange_possession(a_proof),
        b.channel.exchange_possession(b_proof)
    );
    let (at_a, at_b) = (at_a.unwrap(), at_b.unwrap());
    assert_eq!((at_a, at_b), (b_proof, a_proof));
    assert!(a.keys.verify_wg_possession(&shared, &at_a));
    assert!(b.keys.verify_wg_possession(&shared, &at_b));
    // Without the secret (a key announced but not held), the proof is another one.
    assert!(
        !a.keys
            .verify_wg_possession(&shared, &b.keys.wg_possession_proof(&other))
    );
    assert!(!a.keys.verify_wg_possession(&other, &at_a));
    // A side's own proof reflected back is not the other side's.
    assert!(!a.keys.verify_wg_possession(&shared, &a_proof));
    // A proof from another session does not verify in this one.
    let (rc, _) = wireguard_agreement(&p).await;
    let c = rc.unwrap();
    assert!(!c.keys.verify_wg_possession(&shared, &at_a));
    assert!(!format!("{:?}", a.keys).contains(&format!("{:?}", &shared[..4])));
}

#[tokio::test]
async fn peer_with_valid_svid_for_other_node_is_refused() {
    let pki = TestPki::new();
    let store = pki.trust_store();
    let a = HandshakeConfig::new(store.clone(), &pki.identity("node-a")).unwrap();
    // node-c answers where node-b was expected.
    let c = HandshakeConfig::new(store, &pki.identity("node-c")).unwrap();
    let (ra, rc) = run(
        &a,
        "node-b",
        hello("node-a", 1, 0x1000),
        &c,
        ExpectedPeer::AnyNode,
        hello("node-c", 1, 0x2000),
    )
    .await;
    assert!(matches!(
        ra.unwrap_err(),
        HandshakeError::PeerCertificate {
            source: VerifyError::UnexpectedPeer { .. }
        }
    ));
    assert!(rc.is_err());

    // Responder side: expects node-b, node-a connects.
    let b = HandshakeConfig::new(pki.trust_store(), &pki.identity("node-b")).unwrap();
    let (ra, rb) = run(
        &a,
        "node-b",
        hello("node-a", 1, 0x1000),
        &b,
        ExpectedPeer::Node(node("node-z")),
        hello("node-b", 1, 0x2000),
    )
    .await;
    assert!(matches!(
        rb.unwrap_err(),
        HandshakeError::PeerCertificate {
            source: VerifyError::UnexpectedPeer { .. }
        }
    ));
    assert!(matches!(
        ra.unwrap_err(),
        HandshakeError::AlertReceived { .. }
    ));
}

#[tokio::test]
async fn revoked_and_foreign_peers_are_refused() {
    let pki = TestPki::new();
    let p = pair(&pki);
    p.b.trust()
        .revoke_id("spiffe://cluster.local/node/node-a".parse().unwrap());
    let (_, rb) = run(
        &p.a,
        "node-b",
        hello("node-a", 1, 0x1000),
        &p.b,
        ExpectedPeer::AnyNode,
        hello("node-b", 1, 0x2000),
    )
    .await;
    assert!(matches!(
        rb.unwrap_err(),
        HandshakeError::PeerCertificate {
            source: VerifyError::RevokedNode { .. }
        }
    ));

    let other = TestPki::new();
    let mallory = HandshakeConfig::new(pki.trust_store(), &other.identity("node-a")).unwrap();
    let b = HandshakeConfig::new(pki.trust_store(), &pki.identity("node-b")).unwrap();
    let (_, rb) = run(
        &mallory,
        "node-b",
        hello("node-a", 1, 0x1000),
        &b,
        ExpectedPeer::AnyNode,
        hello("node-b", 1, 0x2000),
    )
    .await;
    let err = rb.unwrap_err();
    assert!(
        matches!(
            err,
            HandshakeError::PeerCertificate {
                source: VerifyError::UnknownIssuer
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn epoch_and_mode_mismatch_are_rejected() {
    let pki = TestPki::new();
    let p = pair(&pki);
    let (ra, rb) = run(
        &p.a,
        "node-b",
        hello("node-a", 1, 0x1000),
        &p.b,
        ExpectedPeer::AnyNode,
        hello("node-b", 2, 0x2000),
    )
    .await;
    assert!(matches!(
        rb.unwrap_err(),
        HandshakeError::EpochMismatch { .. }
    ));
    assert!(matches!(
        ra.unwrap_err(),
        HandshakeError::Rejected {
            reason: RejectReason::EpochMismatch
        }
    ));
    let mut wg = hello("node-b", 1, 0x2000);
    wg.mode = Mode::Wireguard;
    wg.wg_public_key = Some(WgPublicKey([1; 32]));
    let (ra, rb) = run(
        &p.a,
        "node-b",
        hello("node-a", 1, 0x1000),
        &p.b,
        ExpectedPeer::AnyNode,
        wg,
    )
    .await;
    assert!(matches!(
        rb.unwrap_err(),
        HandshakeError::ModeMismatch { .. }
    ));
    assert!(matches!(
        ra.unwrap_err(),
        HandshakeError::Rejected {
            reason: RejectReason::ModeMismatch
        }
    ));
}

/// A raw rustls client inside the authenticated channel sends bad frames.
async fn raw_client_then(
    pki: &TestPki,
    id: &NodeIdentity,
    frame: Vec<u8>,
) -> Result<nodeseal_keymgr::Incoming<DuplexStream>, HandshakeError> {
    let b = HandshakeConfig::new(pki.trust_store(), &pki.identity("node-b")).unwrap();
    let (c, s) = duplex(16 * 1024);
    let client = async move {
        let cfg = raw_client_config(pki, id, &[&rustls::version::TLS13]);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let name = rustls_pki_types::ServerName::try_from("node-b").unwrap();
        let mut tls = connector.connect(name, c).await.unwrap();
        tls.write_all(&frame).await.unwrap();
        tls.flush().await.unwrap();
        // Keep the stream open until the server has read and answered.
        let _ = read_message(&mut tls).await;
    };
    let (_, res) = tokio::join!(client, accept(&b, s, ExpectedPeer::AnyNode));
    res
}

fn raw_client_config(
    pki: &TestPki,
    id: &NodeIdentity,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.trust_anchor().clone()).unwrap();
    #[derive(Debug)]
    struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(id.key().pkcs8_der().to_vec().into());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_client_auth_cert(id.chain().to_vec(), key)
        .unwrap()
}

#[tokio::test]
async fn oversize_and_wrong_version_messages_are_rejected() {
    let pki = TestPki::new();
    let id = pki.identity("node-a");
    let res = raw_client_then(&pki, &id, vec![PROTOCOL_VERSION, 1, 0xff, 0xff]).await;
    assert!(matches!(
        res.unwrap_err(),
        HandshakeError::Message {
            source: MessageError::TooLarge { len: 0xffff }
        }
    ));
    let res = raw_client_then(&pki, &id, vec![9, 1, 0, 2, b'{', b'}']).await;
    assert!(matches!(
        res.unwrap_err(),
        HandshakeError::Message {
            source: MessageError::UnsupportedVersion { found: 9 }
        }
    ));
    // A Hello claiming another node than the certificate.
    let frame = nodeseal_keymgr::protocol::encode_frame(&nodeseal_keymgr::Message::Hello(hello(
        "node-x", 1, 0x1000,
    )))
    .unwrap();
    let res = raw_client_then(&pki, &id, frame).await;
    assert!(matches!(
        res.unwrap_err(),
        HandshakeError::HelloNodeMismatch { .. }
    ));
}

#[tokio::test]
async fn tls12_client_is_refused() {
    let pki = TestPki::new();
    let id = pki.identity("node-a");
    let b = HandshakeConfig::new(pki.trust_store(), &pki.identity("node-b")).unwrap();
    let (c, s) = duplex(16 * 1024);
    let cfg = raw_client_config(&pki, &id, &[&rustls::version::TLS12]);
    let client = async move {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let name = rustls_pki_types::ServerName::try_from("node-b").unwrap();
        connector.connect(name, c).await
    };
    let (cres, sres) = tokio::join!(client, accept(&b, s, ExpectedPeer::AnyNode));
    assert!(cres.is_err());
    assert!(
        matches!(sres, Err(HandshakeError::UnsupportedTlsVersion)),
        "{sres:?}"
    );
}

#[test]
fn trust_store_is_shared() {
    let pki = TestPki::new();
    let store: TrustStore = pki.trust_store();
    let clone = store.clone();
    clone.revoke_id("spiffe://cluster.local/node/x".parse().unwrap());
    assert!(store.is_revoked(&"spiffe://cluster.local/node/x".parse().unwrap()));
}

#[tokio::test]
async fn local_hello_must_name_local_node() {
    let pki = TestPki::new();
    let p = pair(&pki);
    let (c, _s) = duplex(1024);
    let err = initiate(&p.a, c, &node("node-b"), hello("node-z", 1, 0x1000))
        .await
        .unwrap_err();
    assert!(matches!(err, HandshakeError::LocalHelloMismatch { .. }));
}
