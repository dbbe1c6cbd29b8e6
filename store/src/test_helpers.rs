//! Test support for the store (feature `testing`): sample records and a real etcd server on
//! loopback.

#![allow(
    clippy::expect_used,
    reason = "test support: bad test input and a failed etcd start are test failures"
)]

use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{NodeName, NodeRecord, SpiffeId};

/// Debian's etcd server.
pub const ETCD_BINARY: &str = "/usr/bin/etcd";

/// How long [`EtcdServer::start`] and [`EtcdServer::restart`] wait for etcd to be healthy.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A valid node record for node `name` with index `index` (1..=250): node IP `10.0.0.<index>`,
/// pod CIDR `10.244.<index>.0/24`, SPIFFE ID `spiffe://cluster.local/node/<name>`, handshake
/// port 4250.
///
/// # Panics
///
/// If `name` is not a valid node name or `index` is 0 or above 250 (test input).
pub fn node_record(name: &str, index: u8) -> NodeRecord {
    assert!((1..=250).contains(&index), "test node index {index}");
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, index));
    NodeRecord {
        name: NodeName::new(name).expect("test node name"),
        node_ips: vec![ip],
        pod_cidrs: vec![format!("10.244.{index}.0/24").parse().expect("test CIDR")],
        spiffe_id: SpiffeId::new(format!("spiffe://cluster.local/node/{name}"))
            .expect("test SPIFFE ID"),
        handshake: SocketAddr::new(ip, 4250),
        wireguard_public_key: None,
    }
}

/// Whether tests must fail rather than skip when something they need is missing
/// (`NODESEAL_REQUIRE_PRIVILEGED=1`, set by `cargo xtask test` and CI).
pub fn require_everything() -> bool {
    std::env::var_os("NODESEAL_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1")
}

/// Sets of free ports tried before giving up on starting a test etcd.
const PORT_ATTEMPTS: u32 = 5;

/// TLS on a test etcd server's client port (files in PEM).
#[derive(Clone, Debug)]
pub struct EtcdServerTls {
    /// The server's certificate (for 127.0.0.1).
    pub cert_file: PathBuf,
    /// Its key.
    pub key_file: PathBuf,
    /// With a CA bundle, etcd requires client certificates signed by it (`--client-cert-auth`).
    pub client_ca_file: Option<PathBuf>,
}

/// A real etcd server on 127.0.0.1 with a temporary data directory and free ports, stopped
/// (SIGKILL) and removed on drop. If the test panics, the drop prints the end of etcd's log.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    data: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP port of `/health` (and metrics), so health is checked the same way with TLS.
    metrics_port: u16,
    tls: Option<EtcdServerTls>,
    extra_args: Vec<String>,
    starts: u32,
}

impl EtcdServer {
    /// Starts etcd, or returns `None` after printing why the test is skipped when
    /// [`ETCD_BINARY`] is missing.
    ///
    /// # Panics
    ///
    /// If etcd is missing and [`require_everything`] is set, or if it does not become healthy
    /// within [`ETCD_START_TIMEOUT`].
    pub fn start_or_skip(test: &str) -> Option<Self> {
        Self::start_with_or_skip(test, None, &[])
    }

    /// As [`start_or_skip`](Self::start_or_skip), with TLS on the client port and more
    /// command-line arguments for etcd (e.g. `--auth-token-ttl=1`).
    ///
    /// # Panics
    ///
    /// As [`start_or_skip`](Self::start_or_skip).
    pub fn start_with_or_skip(
        test: &str,
        tls: Option<EtcdServerTls>,
        extra_args: &[&str],
    ) -> Option<Self> {
        if !Path::new(ETCD_BINARY).exists() {
            let reason = format!("{ETCD_BINARY} not found (Debian package etcd-server)");
            assert!(
                !require_everything(),
                "{test}: {reason}, and NODESEAL_REQUIRE_PRIVILEGED=1"
            );
            println!("SKIPPED {test}: {reason}");
            return None;
        }
        Some(Self::start_with(tls, extra_args).expect("starting etcd"))
    }

    /// Starts etcd on free loopback ports and waits until it is healthy.
    ///
    /// # Errors
    ///
    /// If the data directory or ports cannot be had, etcd cannot be spawned, or it is not
    /// healthy within [`ETCD_START_TIMEOUT`].
    pub fn start() -> io::Result<Self> {
        Self::start_with(None, &[])
    }

    /// Starts etcd with TLS on the client port and more arguments, and waits until healthy.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_with(tls: Option<EtcdServerTls>, extra_args: &[&str]) -> io::Result<Self> {
        // A free port is only free until someone binds it: with test binaries starting servers
        // in parallel, another etcd can take one of ours first. Then try other ports.
        let mut attempt = 1;
        loop {
            let data = tempfile::Builder::new()
                .prefix("nodeseal-etcd-")
                .tempdir()?;
            let mut server = Self {
                child: None,
                data,
                client_port: free_port()?,
                peer_port: free_port()?,
                metrics_port: free_port()?,
                tls: tls.clone(),
                extra_args: extra_args.iter().map(|&arg| arg.to_owned()).collect(),
                starts: 0,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e)
                    if attempt < PORT_ATTEMPTS
                        && e.to_string().contains("address already in use") =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The client URL (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn log_path(&self) -> PathBuf {
        self.data.path().join("etcd.log")
    }

    fn spawn(&mut self) -> io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(ETCD_BINARY);
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cert-file={}", tls.cert_file.display()))
                .arg(format!("--key-file={}", tls.key_file.display()));
            if let Some(ca) = &tls.client_ca_file {
                command
                    .arg(format!("--trusted-ca-file={}", ca.display()))
                    .arg("--client-cert-auth");
            }
        }
        let child = command
            .args(&self.extra_args)
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                self.metrics_port
            ))
            .arg("--name=nodeseal-test")
            .arg(format!(
                "--data-dir={}",
                self.data.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=nodeseal-test={peer}"))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.starts += 1;
        self.wait_healthy()
    }

    fn wait_healthy(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(io::Error::other(format!(
                    "etcd exited with {status}; log:\n{}",
                    self.log_tail()
                )));
            }
            if health(self.metrics_port).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "etcd not healthy after {ETCD_START_TIMEOUT:?}; log:\n{}",
                        self.log_tail()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills etcd with SIGKILL (its data stays) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data directory and ports.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }

    /// The last lines of etcd's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "etcd (started {} times, client port {}) log tail:\n{}",
                self.starts,
                self.client_port,
                self.log_tail()
            );
        }
    }
}

fn free_port() -> io::Result<u16> {
    unused_port(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// A TCP port that is free on `ip` now and that the kernel will not hand out on its own: it
/// lies below the ephemeral range (`net.ipv4.ip_local_port_range`), so an outgoing connection
/// of a test running in parallel cannot take it between this call and the server's bind (a
/// port from `bind(0)` can be, and CI once saw etcd fail with "address already in use").
/// Ports are walked from an offset that differs per process, and never repeat within one.
///
/// # Errors
///
/// When no port in the range can be bound.
pub fn unused_port(ip: IpAddr) -> io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u16 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low > LOWEST + 1_000)
        .unwrap_or(32_768);
    let span = u32::from(ephemeral_low - LOWEST);
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..1_000 {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + u16::try_from(start.wrapping_add(step) % span).unwrap_or(0);
        if TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free port on {ip} between {LOWEST} and {ephemeral_low}"),
    ))
}

/// `GET /health` over plain HTTP/1.0; true when etcd answers `"health":"true"`.
fn health(port: u16) -> io::Result<bool> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.contains("\"health\":\"true\""))
}
