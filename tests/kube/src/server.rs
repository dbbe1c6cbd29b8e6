//! [`KubeApiServer`]: etcd plus kube-apiserver as child processes, their PKI and kubeconfigs.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use tempfile::TempDir;

use crate::{
    pki::ClusterPki,
    process::{Process, tail},
};

/// Environment variable naming the directory that holds `kube-apiserver`, `kubectl`, `etcd`
/// and `helm`.
pub const BIN_DIR_ENV: &str = "NODESEAL_KUBE_BIN_DIR";

/// The service-account issuer, also the audience tokens need to authenticate to the apiserver
/// (`--api-audiences`). It is what kubeadm uses, so tokens look like a real cluster's.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// `--service-cluster-ip-range`. Its first address is [`crate::pki::KUBERNETES_SERVICE_IP`].
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";

const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(20);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);
const LOG_TAIL_LINES: usize = 40;

/// The directory the Kubernetes binaries are taken from: `$NODESEAL_KUBE_BIN_DIR`, else
/// `<target dir>/nodeseal-k8s/bin` where `cargo xtask setup` builds them. The target dir is
/// `$CARGO_TARGET_DIR` (relative to the workspace root if relative) or `<workspace root>/target`.
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    // This crate lives at <workspace>/tests/kube.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => workspace.join(dir), // join keeps an absolute `dir` as is
        None => workspace.join("target"),
    };
    target.join("nodeseal-k8s/bin")
}

/// The binaries [`KubeApiServer`] runs.
const CONTROL_PLANE_BINARIES: &[&str] = &["etcd", "kube-apiserver"];
/// Every binary the Kubernetes-mode tests use: the control plane, and `helm`, which renders and
/// installs the chart (the only copy of nodeseal's CRD, RBAC and admission objects).
const TEST_BINARIES: &[&str] = &["etcd", "kube-apiserver", "helm"];

/// Why the Kubernetes-mode tests cannot run here (etcd, kube-apiserver or helm missing from
/// `bin_dir`), or `None`. Tests use it to skip with a printed reason instead of failing on a
/// machine without `cargo xtask setup`; with `NODESEAL_REQUIRE_PRIVILEGED=1` they fail instead.
pub fn missing_binaries(bin_dir: &Path) -> Option<String> {
    missing_of(bin_dir, TEST_BINARIES)
}

fn missing_of(bin_dir: &Path, names: &[&str]) -> Option<String> {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|b| !bin_dir.join(b).is_file())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} not found in {}: run `cargo xtask setup` or set {BIN_DIR_ENV}",
            missing.join(", "),
            bin_dir.display()
        )
    })
}

/// Whether the Kubernetes binaries (control plane and helm) are here. When they are not,
/// prints why `test` is skipped and returns false, unless `NODESEAL_REQUIRE_PRIVILEGED=1`
/// (every test must run), which panics instead.
///
/// # Panics
/// Under `NODESEAL_REQUIRE_PRIVILEGED=1` when a binary is missing.
pub fn binaries_or_skip(test: &str) -> bool {
    let Some(reason) = missing_binaries(&default_bin_dir()) else {
        return true;
    };
    assert!(
        std::env::var("NODESEAL_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "{test}: NODESEAL_REQUIRE_PRIVILEGED=1 but {reason}"
    );
    eprintln!("SKIPPED {test}: {reason}");
    false
}

/// Settings for [`KubeApiServer`]; see [`KubeApiServer::builder`].
#[derive(Debug, Clone)]
pub struct KubeApiServerBuilder {
    bind: IpAddr,
    bin_dir: Option<PathBuf>,
    ready_timeout: Duration,
    extra_args: Vec<String>,
}

impl Default for KubeApiServerBuilder {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            bin_dir: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            extra_args: Vec::new(),
        }
    }
}

impl KubeApiServerBuilder {
    /// Address kube-apiserver binds and advertises (default 127.0.0.1). Pass the underlay
    /// bridge's address so processes in other network namespaces can reach it; the serving
    /// certificate covers it. etcd always stays on 127.0.0.1: only the apiserver talks to it.
    pub fn bind(mut self, ip: IpAddr) -> Self {
        self.bind = ip;
        self
    }

    /// Directory holding `etcd` and `kube-apiserver` (default: [`default_bin_dir`]).
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// How long to wait for `/readyz` after (re)starting kube-apiserver (default 60 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// An extra kube-apiserver flag (`--name=value`), appended after the fixture's own, so it
    /// wins over them.
    pub fn apiserver_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Starts etcd and kube-apiserver and waits until `/readyz` answers `ok`.
    ///
    /// Async because it waits on the apiserver through a [`kube::Client`]; call it inside a
    /// tokio runtime. Call it from the thread that will drop the fixture (as `#[tokio::test]`
    /// does): the children get `PR_SET_PDEATHSIG`, which follows the spawning thread.
    ///
    /// # Errors
    /// Missing binaries, PKI or file errors, a child exiting early, or readiness not reached in
    /// time (the error carries the tail of the apiserver's log).
    pub async fn start(self) -> Result<KubeApiServer> {
        let bin_dir = self.bin_dir.clone().unwrap_or_else(default_bin_dir);
        if let Some(reason) = missing_of(&bin_dir, CONTROL_PLANE_BINARIES) {
            bail!(reason);
        }
        let dir = tempfile::Builder::new()
            .prefix("nodeseal-kube-")
            .tempdir()
            .context("creating fixture temp dir")?;
        let root = dir.path();
        let pki = ClusterPki::generate(self.bind)?;
        let files = [
            ("ca.crt", &pki.ca.cert_pem),
            ("apiserver.crt", &pki.serving.cert_pem),
            ("apiserver.key", &pki.serving.key_pem),
            ("sa.pub", &pki.service_account.cert_pem),
            ("sa.key", &pki.service_account.key_pem),
        ];
        for (name, pem) in files {
            std::fs::write(root.join(name), pem).with_context(|| format!("writing {name}"))?;
        }

        let started = Instant::now();
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let etcd_client = free_port(localhost)?;
        let etcd_peer = free_port(localhost)?;
        let mut etcd = Process::spawn(
            "etcd",
            &bin_dir.join("etcd"),
            &etcd_args(root, etcd_client, etcd_peer),
            &root.join("etcd.log"),
        )?;
        wait_for_tcp(
            &mut etcd,
            SocketAddr::new(localhost, etcd_client),
            ETCD_READY_TIMEOUT,
        )
        .await?;

        let port = free_port(self.bind)?;
        let mut args = apiserver_args(root, self.bind, port, etcd_client);
        args.extend(self.extra_args.iter().cloned());
        let apiserver = Process::spawn(
            "kube-apiserver",
            &bin_dir.join("kube-apiserver"),
            &args,
            &root.join("kube-apiserver.log"),
        )?;

        let server_url = format!("https://{}", SocketAddr::new(self.bind, port));
        let admin_kubeconfig_path = root.join("admin.kubeconfig");
        let admin_kubeconfig = kubeconfig_yaml(
            &server_url,
            &pki.ca.cert_pem,
            "nodeseal-test-admin",
            Credential::ClientCert {
                cert_pem: &pki.admin.cert_pem,
                key_pem: &pki.admin.key_pem,
            },
        )?;
        std::fs::write(&admin_kubeconfig_path, admin_kubeconfig)
            .context("writing admin kubeconfig")?;
        let admin = client_for_kubeconfig(&admin_kubeconfig_path).await?;

        let mut server = KubeApiServer {
            etcd,
            apiserver,
            admin,
            admin_kubeconfig_path,
            server_url,
            ca_pem: pki.ca.cert_pem.clone(),
            bind: self.bind,
            port,
            bin_dir,
            args,
            ready_timeout: self.ready_timeout,
            startup: Duration::ZERO,
            kubeconfigs: 0,
            dir,
        };
        server.wait_ready().await?;
        server.startup = started.elapsed();
        Ok(server)
    }
}

/// A real Kubernetes control plane (etcd + kube-apiserver, no kubelet, no controller-manager,
/// no scheduler) for one test.
///
/// Dropping it SIGKILLs both processes, reaps them and removes the temp dir; when the test is
/// panicking it first prints the last 40 lines of each log to stderr.
pub struct KubeApiServer {
    // Field order matters for Drop: processes die before the temp dir is removed.
    apiserver: Process,
    etcd: Process,
    admin: Client,
    admin_kubeconfig_path: PathBuf,
    server_url: String,
    ca_pem: String,
    bind: IpAddr,
    port: u16,
    bin_dir: PathBuf,
    args: Vec<String>,
    ready_timeout: Duration,
    startup: Duration,
    kubeconfigs: usize,
    dir: TempDir,
}

impl KubeApiServer {
    /// Settings for a control plane; `KubeApiServer::builder().start().await` is [`Self::start`].
    pub fn builder() -> KubeApiServerBuilder {
        KubeApiServerBuilder::default()
    }

    /// Starts a control plane on 127.0.0.1 with default settings; see
    /// [`KubeApiServerBuilder::start`].
    ///
    /// # Errors
    /// As [`KubeApiServerBuilder::start`].
    pub async fn start() -> Result<Self> {
        Self::builder().start().await
    }

    /// A client authenticated as `O=system:masters` (cluster-admin through bootstrap RBAC).
    pub fn admin_client(&self) -> Client {
        self.admin.clone()
    }

    /// The admin kubeconfig (client certificate, CA embedded), usable with kubectl.
    pub fn admin_kubeconfig_path(&self) -> &Path {
        &self.admin_kubeconfig_path
    }

    /// `https://<bind>:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The cluster CA (PEM) that signed the serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The address kube-apiserver listens on.
    pub fn bind_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// The directory the binaries were taken from (kubectl is expected there too).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// How long the first start took, etcd spawn to `/readyz` ok.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Writes a kubeconfig that authenticates with a bearer `token` (CA embedded) and returns
    /// its path; each call writes a new file in the fixture's temp dir.
    ///
    /// # Errors
    /// Serialising or writing the file.
    pub fn kubeconfig_for_token(&mut self, token: &str) -> Result<PathBuf> {
        self.kubeconfigs += 1;
        let path = self
            .dir
            .path()
            .join(format!("token-{}.kubeconfig", self.kubeconfigs));
        let yaml = kubeconfig_yaml(
            &self.server_url,
            &self.ca_pem,
            "token-user",
            Credential::Token(token),
        )?;
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// A client that authenticates with a bearer `token`, built through
    /// [`Self::kubeconfig_for_token`] so the kubeconfig path is exercised too.
    ///
    /// # Errors
    /// As [`Self::kubeconfig_for_token`] and [`client_for_kubeconfig`].
    pub async fn client_for_token(&mut self, token: &str) -> Result<Client> {
        let path = self.kubeconfig_for_token(token)?;
        client_for_kubeconfig(&path).await
    }

    /// SIGKILLs kube-apiserver and starts it again on the same port with the same etcd and
    /// flags, then waits for `/readyz`. Existing clients reconnect on their own.
    ///
    /// # Errors
    /// Spawning, or readiness not reached in time.
    pub async fn restart_apiserver(&mut self) -> Result<()> {
        self.apiserver.kill();
        self.apiserver = Process::spawn(
            "kube-apiserver",
            &self.bin_dir.join("kube-apiserver"),
            &self.args,
            &self.dir.path().join("kube-apiserver.log"),
        )?;
        self.wait_ready().await
    }

    /// Kills both processes and removes the temp dir, without printing logs.
    pub fn stop(mut self) {
        self.apiserver.kill();
        self.etcd.kill();
    }

    /// Paths of the kube-apiserver and etcd logs.
    pub fn log_paths(&self) -> (&Path, &Path) {
        (self.apiserver.log(), self.etcd.log())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if let Err(e) = self.apiserver.check_running() {
                bail!(
                    "{e}; kube-apiserver log tail:\n{}",
                    self.apiserver.log_tail(LOG_TAIL_LINES)
                );
            }
            self.etcd.check_running()?;
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .context("building /readyz")?;
            // Each probe is bounded too: a hung TLS handshake must not outlast the deadline.
            let last = match tokio::time::timeout(PROBE_TIMEOUT, self.admin.request_text(req)).await
            {
                Ok(Ok(body)) if body.trim() == "ok" => return Ok(()),
                Ok(Ok(body)) => body,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "probe timed out".into(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "kube-apiserver not ready after {:?} (last /readyz: {last}); log tail:\n{}",
                    self.ready_timeout,
                    self.apiserver.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl std::fmt::Debug for KubeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApiServer")
            .field("server_url", &self.server_url)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        self.apiserver.kill();
        self.etcd.kill();
        if std::thread::panicking() {
            for p in [&self.apiserver, &self.etcd] {
                eprintln!(
                    "---- last {LOG_TAIL_LINES} lines of {} ----\n{}",
                    p.log().display(),
                    tail(p.log(), LOG_TAIL_LINES)
                );
            }
        }
        // `dir` (TempDir) is removed when the fields drop, after the processes are gone.
    }
}

/// Builds a client from a kubeconfig file (its current context).
///
/// # Errors
/// Reading or parsing the file, or building the client.
pub async fn client_for_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("kubeconfig to client config")?;
    Client::try_from(config).context("building kube client")
}

enum Credential<'a> {
    ClientCert { cert_pem: &'a str, key_pem: &'a str },
    Token(&'a str),
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &str, cred: Credential<'_>) -> Result<String> {
    let user_entry = match cred {
        Credential::ClientCert { cert_pem, key_pem } => serde_json::json!({
            "client-certificate-data": B64.encode(cert_pem),
            "client-key-data": B64.encode(key_pem),
        }),
        Credential::Token(token) => serde_json::json!({ "token": token }),
    };
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "nodeseal-test",
            "cluster": { "server": server, "certificate-authority-data": B64.encode(ca_pem) },
        }],
        "users": [{ "name": user, "user": user_entry }],
        "contexts": [{
            "name": "nodeseal-test",
            "context": { "cluster": "nodeseal-test", "user": user },
        }],
        "current-context": "nodeseal-test",
    });
    serde_yaml::to_string(&doc).context("serialising kubeconfig")
}

fn etcd_args(root: &Path, client: u16, peer: u16) -> Vec<String> {
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    vec![
        "--name=nodeseal-test".into(),
        format!("--data-dir={}", root.join("etcd").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=nodeseal-test={peer_url}"),
        // Throwaway data: skipping fsync makes every write (and so apiserver start) faster.
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ]
}

fn apiserver_args(root: &Path, bind: IpAddr, port: u16, etcd_client: u16) -> Vec<String> {
    let file = |name: &str| root.join(name).display().to_string();
    vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
        format!("--bind-address={bind}"),
        format!("--advertise-address={bind}"),
        // 1.37 refuses a loopback advertise address for the `kubernetes` Service's endpoints
        // ("may not be in the loopback range"). No pod here dials that Service, so nothing
        // needs the endpoints: turn the reconciler off rather than advertise a fake address.
        "--endpoint-reconciler-type=none".into(),
        format!("--secure-port={port}"),
        // Without it the apiserver writes self-signed certs to /var/run/kubernetes.
        format!("--cert-dir={}", file("cert-dir")),
        format!("--tls-cert-file={}", file("apiserver.crt")),
        format!("--tls-private-key-file={}", file("apiserver.key")),
        format!("--client-ca-file={}", file("ca.crt")),
        "--authorization-mode=Node,RBAC".into(),
        // As kubeadm and managed clusters run it: node agents (nodeseal's sysctl init container)
        // need privileged containers, which the apiserver refuses otherwise.
        "--allow-privileged=true".into(),
        "--anonymous-auth=false".into(),
        format!("--service-account-issuer={API_AUDIENCE}"),
        format!("--service-account-key-file={}", file("sa.pub")),
        format!("--service-account-signing-key-file={}", file("sa.key")),
        format!("--api-audiences={API_AUDIENCE}"),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        "--profiling=false".into(),
        "--v=1".into(),
    ]
}

fn free_port(ip: IpAddr) -> Result<u16> {
    nodeseal_store::test_helpers::unused_port(ip)
        .with_context(|| format!("finding a free port on {ip}"))
}

async fn wait_for_tcp(process: &mut Process, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Err(e) = process.check_running() {
            bail!("{e}; log tail:\n{}", process.log_tail(LOG_TAIL_LINES));
        }
        if TcpStream::connect_timeout(&addr, POLL).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "nothing listening on {addr} after {timeout:?}; log tail:\n{}",
                process.log_tail(LOG_TAIL_LINES)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
