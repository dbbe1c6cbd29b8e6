//! The etcd backend against a real etcd with TLS on its client port: mutual TLS, refusals of
//! clients or servers from the wrong CA, etcd's password authentication and token refresh, and
//! settings refused before connecting (bad files, https without a CA, a password over http).
//! The PKI is generated here at test time.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up or expectation is a test failure"
)]

#[path = "support/pki.rs"]
mod pki;

use std::path::Path;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, Identity, Permission, TlsOptions};
use futures::StreamExt as _;
use nodeseal_store::test_helpers::{EtcdServer, EtcdServerTls, node_record};
use nodeseal_store::{
    Backoff, EtcdCredentials, EtcdOptions, EtcdPassword, EtcdSecurityError, EtcdStore, EtcdTls,
    Event, FileRole, Kind, NodeRecord, Store, StoreBackend as _, StoreError,
};
use pki::{CertFiles, TestCa};

const WAIT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "correct horse battery staple";

/// A CA, etcd's server certificate and a client certificate of that CA, and a second CA with a
/// client certificate of its own.
struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
    server: CertFiles,
    client: CertFiles,
    other_ca: TestCa,
    other_client: CertFiles,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new(dir.path(), "cluster");
        let server = ca.server("server");
        // Not an etcd user: with auth on, only the password can make this client someone.
        let client = ca.client("nodeseal-client", "client");
        let other_ca = TestCa::new(dir.path(), "other");
        let other_client = other_ca.client("nodeseal-client", "other-client");
        Self {
            dir,
            ca,
            server,
            client,
            other_ca,
            other_client,
        }
    }

    fn server_tls(&self, client_cert_auth: bool) -> EtcdServerTls {
        EtcdServerTls {
            cert_file: self.server.cert.clone(),
            key_file: self.server.key.clone(),
            client_ca_file: client_cert_auth.then(|| self.ca.ca_file()),
        }
    }

    /// The store's TLS settings with the right CA and the right client certificate.
    fn mtls(&self) -> EtcdTls {
        EtcdTls::new(self.ca.ca_file()).with_client_cert(&self.client.cert, &self.client.key)
    }
}

fn options(server: &EtcdServer, tls: Option<EtcdTls>) -> EtcdOptions {
    let mut options = EtcdOptions::new([server.endpoint()]);
    options.request_timeout = Duration::from_secs(3);
    options.connect_timeout = Duration::from_secs(3);
    options.keep_alive_interval = Duration::from_secs(1);
    options.keep_alive_timeout = Duration::from_secs(2);
    options.backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    options.tls = tls;
    options
}

/// The error and its causes, one per line: what an operator would read.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(current) = cause {
        text.push_str("\n  caused by: ");
        text.push_str(&current.to_string());
        cause = current.source();
    }
    text
}

async fn start(test: &str, tls: EtcdServerTls, extra: Vec<String>) -> Option<EtcdServer> {
    let test = test.to_owned();
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        EtcdServer::start_with_or_skip(&test, Some(tls), &extra)
    })
    .await
    .expect("etcd start task")
}

async fn next(events: &mut futures::stream::BoxStream<'static, Event>) -> Event {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("store event within 20 s")
        .expect("watch streams never end")
}

/// Puts, reads, watches and leases through the typed store, all over mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_works_over_mutual_tls() {
    let pki = Pki::new();
    let Some(server) = start(
        "store_works_over_mutual_tls",
        pki.server_tls(true),
        Vec::new(),
    )
    .await
    else {
        return;
    };
    assert!(server.endpoint().starts_with("https://"));
    let store = Store::new(
        EtcdStore::connect(options(&server, Some(pki.mtls())))
            .await
            .expect("connect over mTLS"),
    );
    let mut events = store.watch(&[Kind::Node]);
    assert!(matches!(next(&mut events).await, Event::Snapshot(s) if s.records.is_empty()));
    let lease = store
        .publish_node(node_record("a", 1), Duration::from_secs(30))
        .await
        .expect("publish over mTLS");
    assert!(matches!(next(&mut events).await, Event::Put(r) if r.key().to_string() == "nodes/a"));
    let read: Option<NodeRecord> = store
        .get(&nodeseal_store::NodeName::new("a").unwrap())
        .await
        .expect("get");
    assert_eq!(read, Some(node_record("a", 1)));
    assert_eq!(store.bump_rekey_generation().await.expect("cas"), 1);
    lease.revoke().await.expect("revoke");
    assert!(matches!(next(&mut events).await, Event::Deleted(k) if k.to_string() == "nodes/a"));
}

/// A client that etcd must refuse, or that must refuse etcd: connecting fails with the
/// endpoint named and rustls' reason (the alert etcd sent, or why etcd's certificate is
/// refused), and it is not transient (waiting fixes nothing).
async fn assert_refused(server: &EtcdServer, tls: EtcdTls, expected: &[rustls::Error]) {
    let error = EtcdStore::connect(options(server, Some(tls)))
        .await
        .expect_err("refused");
    let text = chain(&error);
    println!("{text}");
    assert!(
        !error.is_transient(),
        "a TLS refusal is not transient: {text}"
    );
    match &error {
        StoreError::EtcdSecurity(EtcdSecurityError::TlsRefused { endpoint, source }) => {
            assert_eq!(*endpoint, server.endpoint());
            assert!(
                expected.contains(source),
                "expected one of {expected:?}: {text}"
            );
        }
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
    assert!(
        text.starts_with(&format!(
            "etcd at {}: TLS handshake refused",
            server.endpoint()
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_certificate_is_refused() {
    let pki = Pki::new();
    let Some(server) = start(
        "a_client_without_certificate",
        pki.server_tls(true),
        Vec::new(),
    )
    .await
    else {
        return;
    };
    assert_refused(
        &server,
        EtcdTls::new(pki.ca.ca_file()),
        // TLS 1.3 has an alert for this (etcd 3.7); etcd 3.4's older Go sends the generic one.
        &[
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let Some(server) = start(
        "a_client_certificate_from_another_ca",
        pki.server_tls(true),
        Vec::new(),
    )
    .await
    else {
        return;
    };
    let tls = EtcdTls::new(pki.ca.ca_file())
        .with_client_cert(&pki.other_client.cert, &pki.other_client.key);
    assert_refused(
        &server,
        tls,
        // Newer Go TLS says which check failed; older Go (etcd 3.4's) says only "bad".
        &[
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_from_another_ca_is_refused() {
    let pki = Pki::new();
    let Some(server) = start("a_server_from_another_ca", pki.server_tls(true), Vec::new()).await
    else {
        return;
    };
    // The client trusts only the other CA: etcd's certificate is unknown to it.
    let tls =
        EtcdTls::new(pki.other_ca.ca_file()).with_client_cert(&pki.client.cert, &pki.client.key);
    assert_refused(
        &server,
        tls,
        &[rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        )],
    )
    .await;
}

/// Sets up etcd's authentication the way an operator would (root user and role, a `nodeseal`
/// user allowed `/nodeseal/` only, `auth enable`), over mutual TLS.
async fn enable_auth(server: &EtcdServer, pki: &Pki) -> Client {
    let tls = TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(
            std::fs::read(pki.ca.ca_file()).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(&pki.client.cert).unwrap(),
            std::fs::read(&pki.client.key).unwrap(),
        ));
    let mut admin = Client::connect(
        [server.endpoint()],
        Some(ConnectOptions::new().with_tls(tls.clone())),
    )
    .await
    .expect("admin client");
    admin
        .user_add("root", "root-password", None)
        .await
        .expect("user add root");
    admin
        .user_grant_role("root", "root")
        .await
        .expect("grant root");
    admin.role_add("nodeseal").await.expect("role add");
    admin
        .role_grant_permission(
            "nodeseal",
            Permission::read_write("/nodeseal/").with_prefix(),
        )
        .await
        .expect("grant /nodeseal/");
    admin
        .user_add("nodeseal", PASSWORD, None)
        .await
        .expect("user add nodeseal");
    admin
        .user_grant_role("nodeseal", "nodeseal")
        .await
        .expect("grant nodeseal");
    admin.auth_enable().await.expect("auth enable");
    Client::connect(
        [server.endpoint()],
        Some(
            ConnectOptions::new()
                .with_tls(tls)
                .with_user("root", "root-password")
                .with_auto_token_refresh(true),
        ),
    )
    .await
    .expect("root client")
}

async fn password_file(dir: &Path, password: &str) -> std::path::PathBuf {
    let path = dir.join(format!("password-{}", password.len()));
    std::fs::write(&path, format!("{password}\n")).unwrap();
    path
}

/// With etcd's authentication on: the right password works (and keeps working after the token
/// expired and after etcd's users changed, both of which invalidate the token), a wrong one is
/// refused at connect with the user named, and no password at all gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_authentication_and_token_refresh() {
    let pki = Pki::new();
    // JWT tokens, as recommended for production: they carry the auth revision they were issued
    // at (so a change of users makes them stale) and expire after 2 s here (so the test sees
    // a refresh).
    let signing = rcgen::KeyPair::generate().expect("JWT key");
    let private = pki.dir.path().join("jwt.key");
    let public = pki.dir.path().join("jwt.pub");
    std::fs::write(&private, signing.serialize_pem()).unwrap();
    std::fs::write(&public, signing.public_key_pem()).unwrap();
    let jwt = format!(
        "--auth-token=jwt,pub-key={},priv-key={},sign-method=ES256,ttl=2s",
        public.display(),
        private.display()
    );
    let Some(server) = start(
        "password_authentication_and_token_refresh",
        pki.server_tls(true),
        vec![jwt],
    )
    .await
    else {
        return;
    };
    let mut root = enable_auth(&server, &pki).await;

    let right = password_file(pki.dir.path(), PASSWORD).await;
    let mut with_password = options(&server, Some(pki.mtls()));
    with_password.credentials = Some(
        EtcdCredentials::from_password_file("nodeseal", &right)
            .await
            .expect("password file"),
    );
    assert!(
        !format!("{with_password:?}").contains(PASSWORD),
        "the password never shows in Debug"
    );
    let store = Store::new(
        EtcdStore::connect(with_password)
            .await
            .expect("authenticated"),
    );
    store
        .put(&node_record("a", 1))
        .await
        .expect("put as nodeseal");

    // A watch opened now keeps streaming after its token expired.
    let mut early = store.watch(&[Kind::Node]);
    assert!(matches!(next(&mut early).await, Event::Snapshot(s) if s.records.len() == 1));

    // The token expires; the next request authenticates again by itself, and so does a watch
    // opened after expiry (its first event is the snapshot, no interruption).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut late = store.watch(&[Kind::Node]);
    match next(&mut late).await {
        Event::Snapshot(snapshot) => assert_eq!(snapshot.records.len(), 1),
        other => panic!("expected the snapshot of a watch opened after expiry, got {other:?}"),
    }
    let listed = store
        .list::<NodeRecord>()
        .await
        .expect("list after token expiry");
    assert_eq!(listed.records, vec![node_record("a", 1)]);
    store.put(&node_record("c", 3)).await.expect("put c");
    for events in [&mut early, &mut late] {
        match next(events).await {
            Event::Put(record) => assert_eq!(record.key().to_string(), "nodes/c"),
            other => panic!("expected nodes/c on both watches, got {other:?}"),
        }
    }

    // Any change to etcd's users makes older tokens stale ("revision of auth store is old").
    root.user_add("someone-else", "x", None)
        .await
        .expect("user add");
    store
        .put(&node_record("b", 2))
        .await
        .expect("put after an auth change");
    assert_eq!(store.bump_rekey_generation().await.expect("cas"), 1);

    // A wrong password: refused when connecting, naming the user and etcd's reason.
    let wrong = password_file(pki.dir.path(), "not the password").await;
    let mut with_wrong = options(&server, Some(pki.mtls()));
    with_wrong.credentials = Some(
        EtcdCredentials::from_password_file("nodeseal", &wrong)
            .await
            .unwrap(),
    );
    let error = EtcdStore::connect(with_wrong)
        .await
        .expect_err("wrong password");
    let text = chain(&error);
    println!("{text}");
    assert!(
        text.starts_with(&format!(
            "etcd store: authenticate as user nodeseal at {} failed",
            server.endpoint()
        )),
        "{text}"
    );
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!error.is_transient(), "{text}");
    assert!(!text.contains("not the password"), "{text}");

    // Without a password the client certificate's name is no etcd user: nothing is allowed.
    let anonymous = EtcdStore::connect(options(&server, Some(pki.mtls())))
        .await
        .expect("client");
    let error = anonymous.get("nodes/a").await.expect_err("no user");
    println!("{}", chain(&error));
    assert!(!error.is_transient(), "{}", chain(&error));
}

/// What is refused before any connection: missing or malformed files (named), a key of
/// another certificate, https without a CA bundle, TLS with an http endpoint, a password over
/// plain http.
#[tokio::test]
async fn unusable_settings_are_refused_before_connecting() {
    let pki = Pki::new();
    let https = "https://127.0.0.1:1".to_owned();
    let connect = |endpoint: &str, tls: Option<EtcdTls>, credentials: Option<EtcdCredentials>| {
        let mut options = EtcdOptions::new([endpoint.to_owned()]);
        options.tls = tls;
        options.credentials = credentials;
        EtcdStore::connect(options)
    };
    let security = |result: Result<EtcdStore, StoreError>| match result {
        Err(StoreError::EtcdSecurity(error)) => error,
        other => panic!("expected a security settings error, got {other:?}"),
    };

    let missing = pki.dir.path().join("missing-ca.pem");
    let error = security(connect(&https, Some(EtcdTls::new(&missing)), None).await);
    assert!(
        matches!(&error, EtcdSecurityError::Read { role: FileRole::CaBundle, path, .. } if *path == missing),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!("etcd CA bundle {}: cannot read it", missing.display())
    );

    // A key file holding a certificate instead.
    let tls = EtcdTls::new(pki.ca.ca_file()).with_client_cert(&pki.client.cert, &pki.client.cert);
    let error = security(connect(&https, Some(tls), None).await);
    assert_eq!(
        error.to_string(),
        format!(
            "etcd client key {}: no PRIVATE KEY block",
            pki.client.cert.display()
        )
    );

    // The server's key with the client's certificate.
    let tls = EtcdTls::new(pki.ca.ca_file()).with_client_cert(&pki.client.cert, &pki.server.key);
    let error = security(connect(&https, Some(tls), None).await);
    assert!(
        matches!(error, EtcdSecurityError::KeyMismatch { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "etcd client key {} is unusable or does not match client certificate {}",
            pki.server.key.display(),
            pki.client.cert.display()
        )
    );

    let error = security(connect(&https, None, None).await);
    assert_eq!(
        error.to_string(),
        "etcd endpoint https://127.0.0.1:1 uses https but no CA bundle is configured to verify it"
    );
    let error = security(connect("http://127.0.0.1:1", Some(pki.mtls()), None).await);
    assert!(
        matches!(error, EtcdSecurityError::PlainHttpWithTls { .. }),
        "{error:?}"
    );
    let credentials = EtcdCredentials::new("nodeseal", EtcdPassword::new(PASSWORD));
    let error = security(connect("http://127.0.0.1:1", None, Some(credentials)).await);
    assert!(
        matches!(error, EtcdSecurityError::CredentialsWithoutTls { .. }),
        "{error:?}"
    );
}
