//! One conformance suite for every store backend: the cases in `conformance/cases.rs`, written
//! once against [`Harness`], instantiated here per backend by [`conformance!`].
//!
//! Adding a backend takes a [`Harness`] implementation and one
//! `conformance!(name, constructor)` line; every case then runs against it.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up or expectation is a test failure"
)]

#[path = "conformance/cases.rs"]
mod cases;
#[cfg(feature = "etcd")]
#[path = "support/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cases::Harness;
use nodeseal_store::{Backoff, StoreBackend};

/// Instantiates every conformance case for one backend, as module `$backend`. `$harness` is
/// an expression of type `Option<impl Harness>` (`None`: the backend is unavailable here and
/// the test is skipped, having said why); `test` names the test in skip messages.
macro_rules! conformance {
    ($backend:ident, |$test:ident| $harness:expr) => {
        mod $backend {
            use super::*;

            conformance!(@case $test, $harness, round_trip);
            conformance!(@case $test, $harness, compare_and_swap);
            conformance!(@case $test, $harness, watch_order);
            conformance!(@case $test, $harness, malformed_records);
            conformance!(@case $test, $harness, leases);
            conformance!(@case $test, $harness, watch_resync);
            conformance!(@case $test, $harness, identity_allocation);
            conformance!(@case $test, $harness, policy_and_endpoint_records);
        }
    };
    (@case $test:ident, $harness:expr, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let $test = concat!(module_path!(), "::", stringify!($case));
            let Some(harness) = $harness else {
                return;
            };
            cases::$case(&harness).await;
        }
    };
}

#[cfg(feature = "dir")]
conformance!(dir, |test| Some(DirHarness::new(test).await));

#[cfg(feature = "etcd")]
conformance!(etcd, |test| EtcdHarness::start_or_skip(test).await);

// The same etcd with mutual TLS on its client port: TLS changes nothing the cases see, the
// resync after a restart included.
#[cfg(feature = "etcd")]
conformance!(etcd_tls, |test| EtcdHarness::start_tls_or_skip(test).await);

/// Backoff for watches under test: quick to notice that the backend is back.
fn quick_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    }
}

/// The directory backend on a temporary directory. Interrupting it moves the directory away
/// (what the watch sees when a shared directory is unmounted or replaced); resuming moves it
/// back.
#[cfg(feature = "dir")]
struct DirHarness {
    _temp: tempfile::TempDir,
    root: PathBuf,
    moved: PathBuf,
}

#[cfg(feature = "dir")]
impl DirHarness {
    async fn new(_test: &str) -> Self {
        let temp = tempfile::tempdir().expect("tempdir");
        let root = temp.path().join("state");
        let moved = temp.path().join("moved");
        let harness = Self {
            _temp: temp,
            root,
            moved,
        };
        // Creates the layout, so that interrupt can move it before any client opened it.
        harness.backend().await;
        harness
    }

    fn file(root: &Path, key: &str) -> PathBuf {
        root.join(format!("{key}.json"))
    }
}

#[cfg(feature = "dir")]
impl Harness for DirHarness {
    fn name(&self) -> &'static str {
        "directory"
    }

    async fn backend(&self) -> Arc<dyn StoreBackend> {
        let mut options = nodeseal_store::DirOptions::default();
        options.backoff = quick_backoff();
        Arc::new(
            nodeseal_store::DirStore::open(&self.root, options)
                .await
                .expect("open directory store"),
        )
    }

    async fn write_raw(&self, key: &str, bytes: &[u8]) {
        // Atomically, as a well-behaved foreign writer would: the watch must not see half a
        // file (which would be a different, flaky, invalid record).
        let target = Self::file(&self.root, key);
        let temp = target.with_file_name(".raw.tmp");
        std::fs::write(&temp, bytes).expect("write raw record");
        std::fs::rename(&temp, &target).expect("rename raw record");
    }

    async fn interrupt(&self) {
        std::fs::rename(&self.root, &self.moved).expect("move the store directory away");
    }

    async fn resume(&self) {
        std::fs::rename(&self.moved, &self.root).expect("move the store directory back");
    }

    fn has_leases(&self) -> bool {
        false
    }
}

/// The etcd backend on a real etcd server (`/usr/bin/etcd`) on loopback. Interrupting kills
/// the server (SIGKILL); resuming starts it again on the same data and ports.
#[cfg(feature = "etcd")]
struct EtcdHarness {
    server: Mutex<nodeseal_store::test_helpers::EtcdServer>,
    endpoint: String,
    /// With TLS: the client's settings, and the directory of the generated PKI.
    tls: Option<(nodeseal_store::EtcdTls, tempfile::TempDir)>,
}

#[cfg(feature = "etcd")]
impl EtcdHarness {
    async fn start_or_skip(test: &str) -> Option<Self> {
        let test = test.to_owned();
        let server = tokio::task::spawn_blocking(move || {
            nodeseal_store::test_helpers::EtcdServer::start_or_skip(&test)
        })
        .await
        .expect("etcd start task")?;
        Some(Self {
            endpoint: server.endpoint(),
            server: Mutex::new(server),
            tls: None,
        })
    }

    /// etcd requiring client certificates of a CA generated here; the client uses one.
    async fn start_tls_or_skip(test: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = pki::TestCa::new(dir.path(), "cluster");
        let server_files = ca.server("server");
        let client = ca.client("nodeseal", "client");
        let server_tls = nodeseal_store::test_helpers::EtcdServerTls {
            cert_file: server_files.cert,
            key_file: server_files.key,
            client_ca_file: Some(ca.ca_file()),
        };
        let test = test.to_owned();
        let server = tokio::task::spawn_blocking(move || {
            nodeseal_store::test_helpers::EtcdServer::start_with_or_skip(
                &test,
                Some(server_tls),
                &[],
            )
        })
        .await
        .expect("etcd start task")?;
        let tls =
            nodeseal_store::EtcdTls::new(ca.ca_file()).with_client_cert(client.cert, client.key);
        Some(Self {
            endpoint: server.endpoint(),
            server: Mutex::new(server),
            tls: Some((tls, dir)),
        })
    }

    fn with_server(&self, action: impl FnOnce(&mut nodeseal_store::test_helpers::EtcdServer)) {
        // Starting etcd waits for it to be healthy: not on a runtime thread's async path.
        tokio::task::block_in_place(|| {
            let mut server = self.server.lock().expect("etcd server lock");
            action(&mut server);
        });
    }
}

#[cfg(feature = "etcd")]
impl Harness for EtcdHarness {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn backend(&self) -> Arc<dyn StoreBackend> {
        let mut options = nodeseal_store::EtcdOptions::new([self.endpoint.clone()]);
        options.request_timeout = Duration::from_secs(2);
        options.connect_timeout = Duration::from_secs(2);
        options.keep_alive_interval = Duration::from_secs(1);
        options.keep_alive_timeout = Duration::from_secs(2);
        options.backoff = quick_backoff();
        options.tls = self.tls.as_ref().map(|(tls, _)| tls.clone());
        Arc::new(
            nodeseal_store::EtcdStore::connect(options)
                .await
                .expect("etcd client"),
        )
    }

    async fn write_raw(&self, key: &str, bytes: &[u8]) {
        // The backend's own put checks nothing: it is the raw access the cases need.
        self.backend()
            .await
            .put(key, bytes.to_vec(), None)
            .await
            .expect("raw put");
    }

    async fn interrupt(&self) {
        self.with_server(|server| server.kill());
    }

    async fn resume(&self) {
        self.with_server(|server| server.restart().expect("restart etcd"));
    }

    fn has_leases(&self) -> bool {
        true
    }
}
