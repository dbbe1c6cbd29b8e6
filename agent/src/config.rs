//! Configuration: the only code that reads flags or the environment. Every setting is a
//! `--kebab-case` flag and a `NODESEAL_SCREAMING_CASE` variable; the Helm chart sets the
//! variables (`deploy/helm/nodeseal/templates/agent-daemonset.yaml`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use ipnet::IpNet;
use nodeseal_store::{
    DirOptions, DirStore, EtcdCredentials, EtcdOptions, EtcdStore, EtcdTls, KubeOptions, KubeStore,
    Store, StoreError,
};
use serde::Serialize;

/// Default TCP port of the key-agreement handshake.
pub const DEFAULT_HANDSHAKE_PORT: u16 = 4250;
/// Default location of the embedded store.
pub const DEFAULT_STORE_DIR: &str = "/var/lib/nodeseal/store";
/// Default namespace of nodeseal's objects in Kubernetes mode.
pub const DEFAULT_NAMESPACE: &str = "nodeseal";
/// Default Unix socket of the status API.
pub const DEFAULT_STATUS_SOCKET: &str = "/run/nodeseal/agent.sock";

/// Default name of the agent's DaemonSet in Kubernetes mode (the Helm chart's).
pub const DEFAULT_DAEMONSET: &str = "nodeseal-agent";

/// The encryption datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EncryptionType {
    /// ESP in the kernel's XFRM, keyed per node pair.
    Ipsec,
    /// Kernel WireGuard: one link per node, a peer per node pair with a preshared key per
    /// epoch.
    Wireguard,
}

/// What the agent does with its kernel state (SAs, XFRM policies, eBPF programs and pins) when
/// it stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CleanupOnExit {
    /// Keep it: a restarted agent takes it over and traffic keeps flowing (hitless restart).
    Never,
    /// Remove it on every stop.
    Always,
    /// Remove it only when nodeseal is being uninstalled: in Kubernetes mode, when the agent's
    /// DaemonSet is gone or being deleted (`helm uninstall`); a restart or rolling update keeps
    /// it. Without Kubernetes this is `never`.
    WhenUninstalled,
}

/// A configuration the agent refuses to start with.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `--second-node-ip` is of the same family as `--node-ip`.
    #[error(
        "--second-node-ip {second} must be of the other family than --node-ip {first} (a node has one node IP per family)"
    )]
    SecondNodeIpFamily {
        /// `--node-ip`.
        first: IpAddr,
        /// `--second-node-ip`.
        second: IpAddr,
    },
    /// The health and metrics endpoints would share a port on different addresses.
    #[error(
        "--health-addr {health} and --metrics-addr {metrics} use the same port on different addresses; use one address (one server answers both) or two ports"
    )]
    HealthMetricsClash {
        /// `--health-addr`.
        health: SocketAddr,
        /// `--metrics-addr`.
        metrics: SocketAddr,
    },
}

/// Where the cluster state lives (shared by the agent, keymgr and the CLI).
#[derive(Args, Clone, Debug, Serialize)]
pub struct StoreArgs {
    /// Directory of the embedded store (single host; several agents may share it).
    #[arg(long, env = "NODESEAL_STORE_DIR", default_value = DEFAULT_STORE_DIR)]
    pub store_dir: PathBuf,
    /// etcd endpoints (comma-separated URLs); when set, etcd is used instead of the directory.
    #[arg(long, env = "NODESEAL_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// CA bundle (PEM) that verifies etcd's server certificate; required for `https://`
    /// endpoints, and only these CAs are trusted.
    #[arg(long, env = "NODESEAL_ETCD_CA_FILE", requires = "etcd_endpoints")]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`.
    #[arg(long, env = "NODESEAL_ETCD_CERT_FILE", requires_all = ["etcd_key_file", "etcd_ca_file"])]
    pub etcd_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `--etcd-cert-file`.
    #[arg(long, env = "NODESEAL_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user (etcd's authentication); needs `--etcd-password-file` and TLS.
    #[arg(long, env = "NODESEAL_ETCD_USERNAME", requires_all = ["etcd_password_file", "etcd_ca_file"])]
    pub etcd_username: Option<String>,
    /// File holding the etcd user's password (its first line), so that the password never
    /// appears in a command line or the environment.
    #[arg(long, env = "NODESEAL_ETCD_PASSWORD_FILE", requires = "etcd_username")]
    pub etcd_password_file: Option<PathBuf>,
    /// Kubernetes mode: Node objects, NodesealNodes, ConfigMaps and CertificateSigningRequests
    /// of the cluster are the store (in-cluster service account, or `--kubeconfig`).
    #[arg(long, env = "NODESEAL_KUBERNETES", conflicts_with = "etcd_endpoints")]
    pub kubernetes: bool,
    /// kubeconfig for Kubernetes mode (default: the pod's service account, else
    /// `$KUBECONFIG` or `~/.kube/config`).
    #[arg(long, env = "NODESEAL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of nodeseal's objects in Kubernetes mode (the Helm release's).
    #[arg(long, env = "NODESEAL_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Trust domain of the cluster: node `N` is `spiffe://<trust domain>/node/N`.
    #[arg(long, env = "NODESEAL_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
}

/// An opened store, and in Kubernetes mode the client the CSR flow uses.
#[derive(Clone)]
pub struct Cluster {
    /// The cluster store.
    pub store: Store,
    /// The Kubernetes client, in Kubernetes mode.
    pub kube: Option<kube::Client>,
}

impl StoreArgs {
    /// Opens the configured backend.
    ///
    /// # Errors
    /// [`StoreError`] when the directory cannot be created or etcd or the apiserver cannot be
    /// reached.
    pub async fn open(&self) -> Result<Store, StoreError> {
        Ok(self.connect().await?.store)
    }

    /// Opens the configured backend, keeping the Kubernetes client in Kubernetes mode.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn connect(&self) -> Result<Cluster, StoreError> {
        if self.kubernetes {
            let store = KubeStore::connect(KubeOptions {
                kubeconfig: self.kubeconfig.clone(),
                namespace: self.namespace.clone(),
                trust_domain: self.trust_domain.clone(),
            })
            .await?;
            let client = store.client().clone();
            Ok(Cluster {
                store: Store::new(store),
                kube: Some(client),
            })
        } else if self.etcd_endpoints.is_empty() {
            Ok(Cluster {
                store: Store::new(DirStore::open(&self.store_dir, DirOptions::default()).await?),
                kube: None,
            })
        } else {
            Ok(Cluster {
                store: Store::new(EtcdStore::connect(self.etcd_options().await?).await?),
                kube: None,
            })
        }
    }

    /// The etcd settings; reads the password file (again on every call, so that a retried
    /// connect picks up a rotated password).
    async fn etcd_options(&self) -> Result<EtcdOptions, StoreError> {
        let mut options = EtcdOptions::new(self.etcd_endpoints.iter().cloned());
        options.tls = self.etcd_ca_file.as_ref().map(|ca| {
            let tls = EtcdTls::new(ca);
            match (&self.etcd_cert_file, &self.etcd_key_file) {
                (Some(cert), Some(key)) => tls.with_client_cert(cert, key),
                _ => tls,
            }
        });
        if let (Some(username), Some(password_file)) =
            (&self.etcd_username, &self.etcd_password_file)
        {
            options.credentials =
                Some(EtcdCredentials::from_password_file(username, password_file).await?);
        }
        Ok(options)
    }
}

/// `nodeseal-agent` settings.
#[derive(Args, Clone, Debug, Serialize)]
pub struct AgentConfig {
    /// This node's name (DNS-1123); its SPIFFE ID is `spiffe://<trust domain>/node/<name>`.
    #[arg(long, env = "NODESEAL_NODE_NAME")]
    pub node_name: String,
    /// This node's IP: tunnel endpoint and handshake address. Required without
    /// `--kubernetes`; in Kubernetes mode the Node object's InternalIP is used and this flag,
    /// if given, must agree with it.
    #[arg(long, env = "NODESEAL_NODE_IP", required_unless_present = "kubernetes")]
    pub node_ip: Option<IpAddr>,
    /// This node's IP of the other family, on a dual-stack node: listed in its record (the
    /// certificate binds it), and with node encryption reached through the tunnel between the
    /// first node IPs. In Kubernetes mode the Node object's first InternalIP of the other family
    /// is used and this flag is ignored.
    #[arg(long, env = "NODESEAL_SECOND_NODE_IP")]
    pub second_node_ip: Option<IpAddr>,
    /// This node's pod CIDRs (comma-separated). Required without `--kubernetes`; in
    /// Kubernetes mode the Node object's `spec.podCIDRs` are used and this flag is ignored.
    #[arg(
        long = "pod-cidr",
        env = "NODESEAL_POD_CIDRS",
        value_delimiter = ',',
        required_unless_present = "kubernetes"
    )]
    pub pod_cidrs: Vec<IpNet>,
    /// The node's uplink, where ESP arrives.
    #[arg(long, env = "NODESEAL_UPLINK", default_value = "eth0")]
    pub uplink: String,
    /// Host-side pod interfaces start with this.
    #[arg(long, env = "NODESEAL_POD_INTERFACE_PREFIX", default_value = "lxc")]
    pub pod_interface_prefix: String,
    /// TCP port of the key-agreement handshake.
    #[arg(long, env = "NODESEAL_HANDSHAKE_PORT", default_value_t = DEFAULT_HANDSHAKE_PORT)]
    pub handshake_port: u16,
    /// Rekey every peer this often.
    #[arg(long, env = "NODESEAL_REKEY_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub rekey_interval: Duration,
    /// Keep the previous keys this long after switching (packets in flight still decrypt).
    #[arg(long, env = "NODESEAL_REKEY_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub rekey_grace: Duration,
    /// Bytes one SA may carry (0: no limit). The kernel deletes an SA at this limit; at three
    /// quarters of it the peer is rekeyed (the default, 2^38, keeps an AES-GCM key within the
    /// use TLS 1.3 allows one).
    #[arg(long, env = "NODESEAL_SA_MAX_BYTES", default_value_t = crate::peer::ipsec::SaLimits::DEFAULT_BYTES)]
    pub sa_max_bytes: u64,
    /// Packets one SA may carry (0: no limit); rekeyed at three quarters, as `--sa-max-bytes`.
    #[arg(long, env = "NODESEAL_SA_MAX_PACKETS", default_value_t = crate::peer::ipsec::SaLimits::DEFAULT_PACKETS)]
    pub sa_max_packets: u64,
    /// Remove a peer's SAs when no handshake with it succeeded for this long.
    #[arg(long, env = "NODESEAL_PEER_RETENTION", default_value = "10m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub peer_retention: Duration,
    /// Encrypt pod-to-pod traffic. With `false` the agent follows the cluster and reports
    /// status, but obtains no identity, installs no SAs, XFRM policies or eBPF programs, and
    /// removes any that an earlier run with encryption left (the Helm chart's
    /// `encryption.enabled`).
    #[arg(long, env = "NODESEAL_ENCRYPTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub encryption: bool,
    /// The encryption datapath.
    #[arg(long, env = "NODESEAL_ENCRYPTION_TYPE", value_enum, default_value_t = EncryptionType::Ipsec)]
    pub encryption_type: EncryptionType,
    /// The WireGuard link (created if missing, reused across restarts) in WireGuard mode.
    #[arg(long, env = "NODESEAL_WIREGUARD_LINK", default_value = nodeseal_wireguard::DEFAULT_LINK_NAME)]
    #[serde(serialize_with = "serialize_display")]
    pub wireguard_link: nodeseal_wireguard::LinkName,
    /// The UDP port of the WireGuard device; every node uses the same one.
    #[arg(long, env = "NODESEAL_WIREGUARD_PORT", default_value_t = crate::peer::wireguard::DEFAULT_PORT)]
    pub wireguard_port: u16,
    /// Also encrypt traffic between node IPs (host to host, host to remote pod, remote pod to
    /// host); every node of the cluster must agree. Stays in clear: the handshake port, the ports
    /// of `--node-encryption-exempt-tcp-port`, WireGuard's own UDP (WireGuard mode), and IPv6
    /// neighbour discovery between node IPs (IPsec mode).
    #[arg(long, env = "NODESEAL_NODE_ENCRYPTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub node_encryption: bool,
    /// TCP ports (source or destination) that stay outside the tunnel with node encryption:
    /// what the agent must reach before keys exist when it listens on a node IP, e.g. the
    /// kube-apiserver's 6443 or etcd's 2379 on control-plane nodes.
    #[arg(
        long,
        env = "NODESEAL_NODE_ENCRYPTION_EXEMPT_TCP_PORTS",
        value_delimiter = ','
    )]
    pub node_encryption_exempt_tcp_port: Vec<u16>,
    /// Drop traffic to and from remote pods that has no SA instead of sending it in clear.
    #[arg(long, env = "NODESEAL_STRICT_MODE", default_value_t = true, action = clap::ArgAction::Set)]
    pub strict_mode: bool,
    /// bpffs directory for this agent's pinned maps and links.
    #[arg(
        long,
        env = "NODESEAL_BPF_PIN_ROOT",
        default_value = "/sys/fs/bpf/nodeseal"
    )]
    pub bpf_pin_root: PathBuf,
    /// Directory for the node's private key and certificate (0600 files).
    #[arg(
        long,
        env = "NODESEAL_STATE_DIR",
        default_value = "/var/lib/nodeseal/node"
    )]
    pub state_dir: PathBuf,
    /// Status API socket.
    #[arg(long, env = "NODESEAL_STATUS_SOCKET", default_value = DEFAULT_STATUS_SOCKET)]
    pub status_socket: PathBuf,
    /// Serve Prometheus metrics here.
    #[arg(long, env = "NODESEAL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve `/healthz` (liveness: the agent runs) and `/readyz` (ready: identity obtained and
    /// datapath loaded, or following the cluster with encryption off) here. May equal
    /// `--metrics-addr`, then one server answers all three paths.
    #[arg(long, env = "NODESEAL_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
    /// What to do with the kernel state when the agent stops. The default keeps it, so a
    /// restart is hitless.
    #[arg(long, env = "NODESEAL_CLEANUP_ON_EXIT", value_enum, default_value_t = CleanupOnExit::Never)]
    pub cleanup_on_exit: CleanupOnExit,
    /// The agent's DaemonSet (Kubernetes mode), for `--cleanup-on-exit when-uninstalled`.
    #[arg(long, env = "NODESEAL_DAEMONSET", default_value = DEFAULT_DAEMONSET)]
    pub daemonset: String,
    /// Use this certificate chain (PEM) instead of the keymgr CSR flow (external PKI).
    #[arg(long, env = "NODESEAL_IDENTITY_CERT", requires_all = ["identity_key", "trust_bundle_file"])]
    pub identity_cert: Option<PathBuf>,
    /// Private key (PEM) for `--identity-cert`.
    #[arg(long, env = "NODESEAL_IDENTITY_KEY")]
    pub identity_key: Option<PathBuf>,
    /// Trust anchors (PEM): for `--identity-cert`; with keymgr issuing the identity, a pin: a
    /// trust bundle in the store is taken only if one of these CAs (or one it admitted)
    /// signed it.
    #[arg(long, env = "NODESEAL_TRUST_BUNDLE_FILE")]
    pub trust_bundle_file: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "NODESEAL_LOG_JSON")]
    pub log_json: bool,
    #[command(flatten)]
    /// The cluster store.
    pub store: StoreArgs,
}

fn serialize_display<S: serde::Serializer>(
    value: &impl std::fmt::Display,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

impl AgentConfig {
    /// The eBPF datapath's mode for `--encryption-type`.
    #[must_use]
    pub const fn datapath_mode(&self) -> nodeseal_bpf::Mode {
        match self.encryption_type {
            EncryptionType::Ipsec => nodeseal_bpf::Mode::Ipsec,
            EncryptionType::Wireguard => nodeseal_bpf::Mode::Wireguard,
        }
    }

    /// The (IP protocol, port) pairs a remote node IP may use in clear with node encryption: the
    /// handshake port and the exempt TCP ports, and in WireGuard mode WireGuard's own UDP port.
    #[must_use]
    pub fn clear_ports(&self) -> Vec<(u8, u16)> {
        const TCP: u8 = 6;
        const UDP: u8 = 17;
        let mut ports = vec![(TCP, self.handshake_port)];
        ports.extend(
            self.node_encryption_exempt_tcp_port
                .iter()
                .map(|port| (TCP, *port)),
        );
        if self.encryption_type == EncryptionType::Wireguard {
            ports.push((UDP, self.wireguard_port));
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Refuses settings the agent cannot honour, with the flag named, before anything starts.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let (Some(first), Some(second)) = (self.node_ip, self.second_node_ip)
            && first.is_ipv4() == second.is_ipv4()
        {
            return Err(ConfigError::SecondNodeIpFamily { first, second });
        }
        if let (Some(health), Some(metrics)) = (self.health_addr, self.metrics_addr)
            && health.port() == metrics.port()
            && health != metrics
        {
            return Err(ConfigError::HealthMetricsClash { health, metrics });
        }
        Ok(())
    }

    /// The usage limits of every SA (0 in a flag: no limit).
    #[must_use]
    pub fn sa_limits(&self) -> crate::peer::ipsec::SaLimits {
        crate::peer::ipsec::SaLimits {
            bytes: (self.sa_max_bytes > 0).then_some(self.sa_max_bytes),
            packets: (self.sa_max_packets > 0).then_some(self.sa_max_packets),
        }
    }

    /// A configuration for tests: names and addresses given, everything else defaulted, state
    /// under `dir`.
    #[cfg(any(test, feature = "testing"))]
    #[must_use]
    pub fn for_test(node: &str, ip: IpAddr, pod_cidr: IpNet, dir: &std::path::Path) -> Self {
        Self {
            node_name: node.to_owned(),
            node_ip: Some(ip),
            second_node_ip: None,
            pod_cidrs: vec![pod_cidr],
            uplink: "eth0".into(),
            pod_interface_prefix: "lxc".into(),
            handshake_port: DEFAULT_HANDSHAKE_PORT,
            encryption: true,
            encryption_type: EncryptionType::Ipsec,
            wireguard_link: nodeseal_wireguard::LinkName::default(),
            wireguard_port: crate::peer::wireguard::DEFAULT_PORT,
            node_encryption: false,
            node_encryption_exempt_tcp_port: Vec::new(),
            rekey_interval: Duration::from_secs(3600),
            rekey_grace: Duration::from_secs(2),
            peer_retention: Duration::from_secs(600),
            sa_max_bytes: crate::peer::ipsec::SaLimits::DEFAULT_BYTES,
            sa_max_packets: crate::peer::ipsec::SaLimits::DEFAULT_PACKETS,
            strict_mode: true,
            bpf_pin_root: dir.join("bpf"),
            state_dir: dir.join("node"),
            status_socket: dir.join("agent.sock"),
            metrics_addr: None,
            health_addr: None,
            cleanup_on_exit: CleanupOnExit::Never,
            daemonset: DEFAULT_DAEMONSET.into(),
            identity_cert: None,
            identity_key: None,
            trust_bundle_file: None,
            log_json: false,
            store: StoreArgs {
                store_dir: dir.join("store"),
                etcd_endpoints: Vec::new(),
                etcd_ca_file: None,
                etcd_cert_file: None,
                etcd_key_file: None,
                etcd_username: None,
                etcd_password_file: None,
                kubernetes: false,
                kubeconfig: None,
                namespace: DEFAULT_NAMESPACE.into(),
                trust_domain: "cluster.local".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: AgentConfig,
    }

    const BASE: &[&str] = &[
        "nodeseal-agent",
        "--node-name=n1",
        "--node-ip=10.0.0.1",
        "--pod-cidr=10.244.0.0/24",
    ];

    fn parse(extra: &[&str]) -> Result<AgentConfig, clap::Error> {
        Cli::try_parse_from(BASE.iter().chain(extra)).map(|c| c.config)
    }

    #[test]
    fn defaults_keep_encryption_on_and_kernel_state_on_exit() {
        let config = parse(&[]).unwrap();
        assert!(config.encryption);
        assert_eq!(config.encryption_type, EncryptionType::Ipsec);
        assert!(!config.node_encryption);
        assert_eq!(config.cleanup_on_exit, CleanupOnExit::Never);
        assert_eq!(config.health_addr, None);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn chart_settings_parse() {
        let config = parse(&[
            "--encryption=false",
            "--encryption-type=ipsec",
            "--node-encryption=false",
            "--cleanup-on-exit=when-uninstalled",
            "--health-addr=127.0.0.1:9963",
            "--metrics-addr=10.0.0.1:9962",
        ])
        .unwrap();
        assert!(!config.encryption);
        assert_eq!(config.cleanup_on_exit, CleanupOnExit::WhenUninstalled);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn wireguard_is_accepted_with_its_link_and_port() {
        let wireguard = parse(&["--encryption-type=wireguard"]).unwrap();
        assert_eq!(wireguard.validate(), Ok(()));
        assert_eq!(wireguard.wireguard_link.as_str(), "nodeseal0");
        assert_eq!(wireguard.wireguard_port, 51871);
        let custom = parse(&[
            "--encryption-type=wireguard",
            "--wireguard-link=wg-ns",
            "--wireguard-port=51000",
        ])
        .unwrap();
        assert_eq!(
            (custom.wireguard_link.as_str(), custom.wireguard_port),
            ("wg-ns", 51000)
        );
        let e = parse(&["--wireguard-link=a/b"]).err().unwrap().to_string();
        assert!(e.contains("a/b"), "{e}");
    }

    #[test]
    fn a_second_node_ip_must_be_of_the_other_family() {
        let dual = parse(&["--second-node-ip=fd00::1"]).unwrap();
        assert_eq!(dual.validate(), Ok(()));
        let same = parse(&["--second-node-ip=10.0.0.9"]).unwrap();
        let e = same.validate().unwrap_err();
        assert!(e.to_string().contains("--second-node-ip 10.0.0.9"), "{e}");
    }

    #[test]
    fn node_encryption_is_taken_in_either_mode_with_its_exempt_ports() {
        for mode in ["ipsec", "wireguard"] {
            let config = parse(&[
                "--node-encryption=true",
                &format!("--encryption-type={mode}"),
                "--node-encryption-exempt-tcp-port=6443,2379",
            ])
            .unwrap();
            assert_eq!(config.validate(), Ok(()));
            assert_eq!(config.node_encryption_exempt_tcp_port, [6443, 2379]);
            let wireguard_udp =
                (mode == "wireguard").then_some((17, crate::peer::wireguard::DEFAULT_PORT));
            let expected: Vec<(u8, u16)> = [(6, 2379), (6, DEFAULT_HANDSHAKE_PORT), (6, 6443)]
                .into_iter()
                .chain(wireguard_udp)
                .collect();
            assert_eq!(config.clear_ports(), expected);
        }
        let e = parse(&["--node-encryption-exempt-tcp-port=6443,https"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("https"), "{e}");
    }

    #[test]
    fn unknown_values_are_refused_by_the_parser() {
        let e = parse(&["--encryption-type=aes"]).err().unwrap().to_string();
        assert!(e.contains("aes") && e.contains("ipsec"), "{e}");
        let e = parse(&["--encryption=maybe"]).err().unwrap().to_string();
        assert!(e.contains("maybe"), "{e}");
        let e = parse(&["--cleanup-on-exit=sometimes"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("when-uninstalled"), "{e}");
    }

    #[test]
    fn health_may_share_the_metrics_server_or_use_its_own_port() {
        let shared = parse(&["--health-addr=0.0.0.0:9962", "--metrics-addr=0.0.0.0:9962"]).unwrap();
        assert_eq!(shared.validate(), Ok(()));
        let clash = parse(&[
            "--health-addr=127.0.0.1:9962",
            "--metrics-addr=0.0.0.0:9962",
        ])
        .unwrap();
        assert!(matches!(
            clash.validate(),
            Err(ConfigError::HealthMetricsClash { .. })
        ));
    }

    #[tokio::test]
    async fn etcd_tls_and_credentials_flags_become_store_options() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret\n").unwrap();
        let password_flag = format!("--etcd-password-file={}", password.display());
        let config = parse(&[
            "--etcd-endpoints=https://10.0.0.9:2379",
            "--etcd-ca-file=/etc/nodeseal/etcd/ca.pem",
            "--etcd-cert-file=/etc/nodeseal/etcd/client.pem",
            "--etcd-key-file=/etc/nodeseal/etcd/client-key.pem",
            "--etcd-username=nodeseal",
            &password_flag,
        ])
        .unwrap();
        let options = config.store.etcd_options().await.unwrap();
        assert_eq!(
            options.tls,
            Some(EtcdTls::new("/etc/nodeseal/etcd/ca.pem").with_client_cert(
                "/etc/nodeseal/etcd/client.pem",
                "/etc/nodeseal/etcd/client-key.pem"
            ))
        );
        let credentials = options.credentials.as_ref().unwrap();
        assert_eq!(credentials.username, "nodeseal");
        assert_eq!(
            credentials.password,
            nodeseal_store::EtcdPassword::new("s3cret")
        );
        // Neither the logged config nor the options' Debug show the password.
        let logged = serde_json::to_string(&config).unwrap();
        assert!(!logged.contains("s3cret"), "{logged}");
        assert!(!format!("{options:?}").contains("s3cret"));
    }

    #[test]
    fn etcd_security_flags_need_their_partners() {
        let endpoint = "--etcd-endpoints=https://10.0.0.9:2379";
        for (flags, missing) in [
            (
                vec![endpoint, "--etcd-ca-file=ca", "--etcd-cert-file=c"],
                "--etcd-key-file",
            ),
            (
                vec![endpoint, "--etcd-ca-file=ca", "--etcd-key-file=k"],
                "--etcd-cert-file",
            ),
            (
                vec![endpoint, "--etcd-ca-file=ca", "--etcd-username=u"],
                "--etcd-password-file",
            ),
            (vec![endpoint, "--etcd-password-file=p"], "--etcd-username"),
            (
                vec![endpoint, "--etcd-username=u", "--etcd-password-file=p"],
                "--etcd-ca-file",
            ),
            (vec!["--etcd-ca-file=ca"], "--etcd-endpoints"),
        ] {
            let error = parse(&flags).expect_err("refused").to_string();
            assert!(error.contains(missing), "{flags:?}: {error}");
        }
    }

    #[tokio::test]
    async fn https_etcd_without_a_ca_file_is_refused_naming_the_endpoint() {
        let config = parse(&["--etcd-endpoints=https://10.0.0.9:2379"]).unwrap();
        let error = config.store.open().await.expect_err("refused");
        assert_eq!(
            error.to_string(),
            "etcd endpoint https://10.0.0.9:2379 uses https but no CA bundle is configured to verify it"
        );
    }
}
