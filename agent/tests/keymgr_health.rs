//! keymgr's probes: `/healthz` and `/readyz` on `--health-addr`, ready once the store is open
//! and the CA loaded (what the chart's keymgr Deployment probes).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up or expectation is a test failure"
)]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NODESEAL: &str = env!("CARGO_BIN_EXE_nodeseal");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nodeseal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    nodeseal_store::test_helpers::unused_port(Ipv4Addr::LOCALHOST.into()).unwrap()
}

/// The status line of `GET path`, or `None` while nothing listens.
fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.lines().next().map(str::to_owned)
}

#[test]
fn keymgr_answers_probes_once_its_ca_is_loaded() {
    let dir = scratch("keymgr-health");
    let ca = dir.join("ca");
    let init = Command::new(NODESEAL)
        .args(["ca", "init", "--dir", ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let port = free_port();
    let mut keymgr = Killed(
        Command::new(NODESEAL)
            .args(["keymgr", "run", "--ca-dir", ca.to_str().unwrap()])
            .args(["--store-dir", dir.join("store").to_str().unwrap()])
            .args(["--health-addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let mut ready = None;
    while started.elapsed() < Duration::from_secs(30) {
        ready = get(port, "/readyz");
        if ready.as_deref() == Some("HTTP/1.0 200 OK") {
            break;
        }
        assert!(keymgr.0.try_wait().unwrap().is_none(), "keymgr exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ready.as_deref(), Some("HTTP/1.0 200 OK"));
    assert_eq!(get(port, "/healthz").as_deref(), Some("HTTP/1.0 200 OK"));
    assert_eq!(
        get(port, "/metrics").as_deref(),
        Some("HTTP/1.0 404 Not Found")
    );
    drop(keymgr);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn keymgr_without_its_ca_is_never_ready_and_says_why() {
    let dir = scratch("keymgr-no-ca");
    let port = free_port();
    let out = Command::new(NODESEAL)
        .args([
            "keymgr",
            "run",
            "--ca-dir",
            dir.join("missing").to_str().unwrap(),
        ])
        .args(["--store-dir", dir.join("store").to_str().unwrap()])
        .args(["--health-addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loading the CA"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
