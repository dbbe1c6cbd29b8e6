//! The `nodeseal` command line: CA set-up, the keymgr role, nodes, key rotation, status, and
//! identity policy (`policy`, `identity`, `endpoint`: see [`workload`]), and flow verdicts
//! (`observe`: see [`observe`]).
//!
//! Exit codes: 0 success, 1 failure, 2 usage error (clap), 3 `keys rotate --wait` timed out.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use nodeseal_keymgr::{
    ClusterCa, IssueOptions, NodeClaims, NodeKey, NodeName, TrustDomain, create_csr, validate_csr,
};
use nodeseal_store::{CertificateRecord, NodeRecord, NodeStatus, Revocation, Store};
use tokio_util::sync::CancellationToken;

use crate::config::{DEFAULT_STATUS_SOCKET, StoreArgs};

mod kube_policy;
mod observe;
mod workload;
use crate::identity::{pem, write_secret};

/// Exit code of `keys rotate --wait` when not every node reached the generation in time.
pub const EXIT_TIMEOUT: u8 = 3;

/// nodeseal: identity-bound transparent encryption for cluster nodes.
#[derive(Parser, Debug)]
#[command(name = "nodeseal", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The cluster CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run keymgr: publish the trust bundle and sign admitted nodes' CSRs.
    #[command(subcommand)]
    Keymgr(KeymgrCommand),
    /// Nodes in the cluster store.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Key rotation.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// This node's (or the cluster's) encryption status.
    Status(StatusArgs),
    /// Flow verdicts of this node's datapath (forwarded, dropped with the reason), like
    /// `hubble observe`.
    Observe(observe::ObserveArgs),
    /// Identity policy documents: apply, get, delete, trace.
    #[command(subcommand)]
    Policy(workload::PolicyCommand),
    /// Workload security identities.
    #[command(subcommand)]
    Identity(workload::IdentityCommand),
    /// Workloads (standalone modes): add, remove, list.
    #[command(subcommand)]
    Endpoint(workload::EndpointCommand),
    /// Print shell completions.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create a self-signed cluster CA (ECDSA P-256) in a directory (key file 0600).
    Init {
        /// Where to write `ca.crt` and `ca.key`.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// CA validity.
        #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Import an existing CA (e.g. an intermediate of the organisation's PKI) as the cluster CA:
    /// into the Secret `nodeseal-ca` with `--kubernetes`, otherwise into `--dir`.
    Import {
        /// The CA certificate (PEM), followed by its issuers up to the root.
        #[arg(long)]
        cert: PathBuf,
        /// Its PKCS#8 private key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// CA directory to write (`ca.crt`, `ca.key` 0600), without `--kubernetes`.
        #[arg(long, required_unless_present = "kubernetes")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Issue a node SVID directly from a CA directory (external PKI flows, air-gapped set-up).
    Issue {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of the CA.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Node name.
        #[arg(long)]
        node: String,
        /// Where to write `node.crt`, `node.key` (0600) and `bundle.pem`.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// A node IP the certificate admits (repeat for more). Without any, the certificate
        /// binds no claims, and only peers that take identities from files accept it.
        #[arg(long = "node-ip")]
        node_ips: Vec<std::net::IpAddr>,
        /// A pod CIDR the certificate admits (repeat for more); needs `--node-ip`.
        #[arg(long = "pod-cidr", requires = "node_ips")]
        pod_cidrs: Vec<ipnet::IpNet>,
    },
}

#[derive(Subcommand, Debug)]
enum KeymgrCommand {
    /// Run until interrupted.
    Run {
        /// CA directory (`ca.crt`, `ca.key`). Required without `--kubernetes`, where the CA
        /// lives in the Secret `nodeseal-ca` (created on first start).
        #[arg(long, env = "NODESEAL_CA_DIR", required_unless_present = "kubernetes")]
        ca_dir: Option<PathBuf>,
        /// Lifetime of issued node SVIDs.
        #[arg(long, env = "NODESEAL_SVID_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
        svid_ttl: Duration,
        /// Serve `/healthz` and `/readyz` here (the kubelet's probes). Ready once the cluster
        /// store is open and, without `--kubernetes`, the CA loaded; a standby replica is ready
        /// too (it takes over when the leader goes).
        #[arg(long, env = "NODESEAL_HEALTH_ADDR")]
        health_addr: Option<std::net::SocketAddr>,
        #[command(flatten)]
        kube: KeymgrKubeArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// keymgr's Kubernetes-mode settings.
#[derive(clap::Args, Debug)]
struct KeymgrKubeArgs {
    /// The agent's ServiceAccount: the only requester whose CSRs are signed.
    #[arg(
        long,
        env = "NODESEAL_AGENT_SERVICE_ACCOUNT",
        default_value = "nodeseal-agent"
    )]
    agent_service_account: String,
    /// The DaemonSet that must own the requesting pod.
    #[arg(
        long,
        env = "NODESEAL_AGENT_DAEMONSET",
        default_value = "nodeseal-agent"
    )]
    agent_daemonset: String,
    /// This replica's name in the leader-election Lease (the pod name).
    #[arg(long, env = "NODESEAL_POD_NAME")]
    pod_name: Option<String>,
    /// Lifetime of a CA created on first start.
    #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
    ca_ttl: Duration,
    /// How long a keymgr replica that stopped renewing keeps the leadership Lease.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// How long a security identity stays after the last pod with its labels went.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    identity_gc_grace: Duration,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// List nodes with their addresses and revocation state.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a node: every peer removes its SAs and refuses its handshakes.
    Revoke {
        /// Node name.
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Ask every node to rekey every peer (make-before-break).
    Rotate {
        /// Wait until every node uses new keys with every peer; print how long it took.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (exit code 3).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// All nodes, from the status they publish in the store.
    #[arg(long)]
    cluster: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    output: Format,
    /// The agent's status socket.
    #[arg(long, env = "NODESEAL_STATUS_SOCKET", default_value = DEFAULT_STATUS_SOCKET)]
    socket: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// This host's name (the pod name in a pod), for the leader-election Lease.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("keymgr-{}", std::process::id()))
}

/// Runs the command line.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Ca(CaCommand::Init {
            dir,
            trust_domain,
            ttl,
        }) => {
            let td = TrustDomain::new(&trust_domain).context("--trust-domain")?;
            if dir.join("ca.key").exists() {
                bail!(
                    "{} already holds a CA; refusing to overwrite it",
                    dir.display()
                );
            }
            std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
            let ca = ClusterCa::generate(td, ttl).context("generating the CA")?;
            ca.write_files(&dir).context("writing the CA")?;
            println!("created CA for {trust_domain} in {}", dir.display());
        }
        Command::Ca(CaCommand::Issue {
            dir,
            trust_domain,
            node,
            out,
            ttl,
            node_ips,
            pod_cidrs,
        }) => {
            let td = TrustDomain::new(&trust_domain).context("--trust-domain")?;
            let ca = ClusterCa::load_files(td.clone(), &dir).context("loading the CA")?;
            let node = NodeName::new(&node).context("--node")?;
            let key = NodeKey::generate().context("generating the node key")?;
            let csr = create_csr(&key, &td, &node).context("creating the CSR")?;
            let validated = validate_csr(csr.as_ref(), &td, &node).context("validating the CSR")?;
            let claims = (!node_ips.is_empty())
                .then(|| NodeClaims::new(&node_ips, &pod_cidrs))
                .transpose()
                .context("--node-ip/--pod-cidr")?;
            let chain = ca
                .issue(&validated, claims.as_ref(), &IssueOptions::with_ttl(ttl))
                .context("issuing the SVID")?;
            let chain_pem: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
            write_secret(&out.join("node.key"), key.to_pem().as_bytes())?;
            write_secret(&out.join("node.crt"), chain_pem.as_bytes())?;
            write_secret(
                &out.join("bundle.pem"),
                pem("CERTIFICATE", ca.trust_anchor()).as_bytes(),
            )?;
            println!("issued {} into {}", td.node_id(&node), out.display());
        }
        Command::Ca(CaCommand::Import {
            cert,
            key,
            dir,
            store,
        }) => {
            let td = TrustDomain::new(&store.trust_domain).context("--trust-domain")?;
            let cert_pem = std::fs::read(&cert).with_context(|| cert.display().to_string())?;
            let key_pem = zeroize::Zeroizing::new(
                std::fs::read(&key).with_context(|| key.display().to_string())?,
            );
            let ca = ClusterCa::import(td, &cert_pem, &key_pem).context("importing the CA")?;
            if store.kubernetes {
                let cluster = store
                    .connect()
                    .await
                    .context("connecting to the apiserver")?;
                let client = cluster.kube.context("no Kubernetes client")?;
                crate::kube_signer::import_ca(&client, &store.namespace, &ca).await?;
                println!(
                    "imported the CA into Secret {}/{}",
                    store.namespace,
                    crate::kube_signer::CA_SECRET
                );
            } else if let Some(dir) = dir {
                if dir.join("ca.key").exists() {
                    bail!(
                        "{} already holds a CA; refusing to overwrite it",
                        dir.display()
                    );
                }
                std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
                ca.write_files(&dir).context("writing the CA")?;
                println!("imported the CA into {}", dir.display());
            }
        }
        Command::Keymgr(KeymgrCommand::Run {
            ca_dir,
            svid_ttl,
            health_addr,
            kube,
            store,
        }) => {
            let td = TrustDomain::new(&store.trust_domain).context("--trust-domain")?;
            let readiness = crate::health::Readiness::waiting_for(&[
                crate::health::STEP_STORE,
                crate::health::STEP_CA,
            ]);
            let cancel = CancellationToken::new();
            if let Some(addr) = health_addr {
                // Up before the store, so that a slow apiserver shows as "not ready, waiting for
                // the cluster store" rather than as a dead process.
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding --health-addr {addr}"))?;
                tokio::spawn(crate::health::serve(
                    listener,
                    crate::health::Endpoints {
                        metrics: None,
                        readiness: Some(readiness.clone()),
                    },
                    cancel.child_token(),
                ));
            }
            let cluster = store.connect().await.context("opening the cluster store")?;
            readiness.done(crate::health::STEP_STORE);
            let signal = crate::shutdown::on_signals(cancel.clone());
            let options = IssueOptions::with_ttl(svid_ttl);
            match (&cluster.kube, ca_dir) {
                (Some(client), _) => {
                    // Only the leader loads the CA (from its Secret); a standby has none to load.
                    readiness.done(crate::health::STEP_CA);
                    let identity = match kube.pod_name {
                        Some(name) => name,
                        None => hostname(),
                    };
                    crate::kube_signer::run_keymgr(
                        crate::kube_signer::KeymgrSettings {
                            client: client.clone(),
                            store: cluster.store.clone(),
                            trust_domain: td,
                            namespace: store.namespace.clone(),
                            agent: crate::kube_signer::AgentIdentity {
                                namespace: store.namespace.clone(),
                                service_account: kube.agent_service_account,
                                daemon_set: kube.agent_daemonset,
                            },
                            identity,
                            options,
                            ca_ttl: kube.ca_ttl,
                            lease_duration: kube.lease_duration,
                            identities: crate::identity_allocator::AllocatorOptions {
                                grace: kube.identity_gc_grace,
                            },
                        },
                        cancel,
                    )
                    .await;
                }
                (None, Some(ca_dir)) => {
                    let ca = ClusterCa::load_files(td, &ca_dir).context("loading the CA")?;
                    readiness.done(crate::health::STEP_CA);
                    crate::signer::run(cluster.store, ca, options, cancel.clone()).await?;
                }
                (None, None) => bail!("--ca-dir is required without --kubernetes"),
            }
            signal.abort();
        }
        Command::Node(NodeCommand::List { store }) => {
            let store = store.open().await?;
            node_list(&store).await?;
        }
        Command::Node(NodeCommand::Revoke { name, store }) => {
            let store = store.open().await?;
            let node = nodeseal_store::NodeName::new(name.clone()).context("node name")?;
            store
                .put(&Revocation {
                    node,
                    serial: None,
                    revoked_at: SystemTime::now(),
                })
                .await?;
            println!("revoked {name}");
        }
        Command::Keys(KeysCommand::Rotate {
            wait,
            timeout,
            store,
        }) => {
            let store = store.open().await?;
            return rotate(&store, wait, timeout).await;
        }
        Command::Status(args) => return status(args).await,
        Command::Observe(args) => observe::observe(args).await?,
        Command::Policy(command) => workload::policy(command).await?,
        Command::Identity(command) => workload::identity(command).await?,
        Command::Endpoint(command) => workload::endpoint(command).await?,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "nodeseal", &mut std::io::stdout());
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn node_list(store: &Store) -> Result<()> {
    let nodes = store.list::<NodeRecord>().await?;
    let revoked = store.list::<Revocation>().await?;
    let certs = store.list::<CertificateRecord>().await?;
    println!(
        "{:<20} {:<16} {:<20} {:<9} CERTIFICATE",
        "NODE", "IP", "POD CIDRS", "REVOKED"
    );
    for n in &nodes.records {
        let is_revoked = revoked
            .records
            .iter()
            .any(|r| r.node == n.name && r.serial.is_none());
        let cert = certs
            .records
            .iter()
            .find(|c| c.node == n.name)
            .and_then(|c| nodeseal_keymgr::svid::certs_from_pem(c.chain_pem.as_bytes()).ok())
            .and_then(|chain| {
                chain
                    .first()
                    .and_then(|leaf| nodeseal_keymgr::SvidInfo::parse(leaf).ok())
            })
            .map_or_else(
                || "-".to_owned(),
                |info| {
                    format!(
                        "expires {}",
                        humantime::format_rfc3339_seconds(info.not_after)
                    )
                },
            );
        let cidrs: Vec<String> = n.pod_cidrs.iter().map(ToString::to_string).collect();
        println!(
            "{:<20} {:<16} {:<20} {:<9} {}",
            n.name.as_str(),
            n.handshake.ip().to_string(),
            cidrs.join(","),
            if is_revoked { "yes" } else { "no" },
            cert
        );
    }
    for bad in &nodes.invalid {
        eprintln!("invalid record: {bad}");
    }
    Ok(())
}

/// Bumps the generation; with `wait`, polls the published node status until every live node
/// reports every other live node at the new generation.
async fn rotate(store: &Store, wait: bool, timeout: Duration) -> Result<ExitCode> {
    let started = Instant::now();
    let target = store
        .bump_rekey_generation()
        .await
        .context("requesting the rotation")?;
    println!("requested key rotation generation {target}");
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let mut told_silent = false;
    loop {
        let Rotation { pending, silent } = rotation_pending(store, target).await?;
        if !told_silent && !silent.is_empty() {
            // In Kubernetes mode every Node is a node record, with or without a running agent.
            println!(
                "not waiting for nodes that report no status (no agent running): {}",
                silent.join(", ")
            );
            told_silent = true;
        }
        if pending.is_empty() {
            println!(
                "all nodes rekeyed to generation {target} in {:.3}s",
                started.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if started.elapsed() >= timeout {
            eprintln!("timed out after {timeout:?}; still waiting for:");
            for p in pending {
                eprintln!("  {p}");
            }
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where a rotation stands.
struct Rotation {
    /// "node → peer" pairs, among the nodes that report status, that have not reached the
    /// target generation.
    pending: Vec<String>,
    /// Nodes that report no status (no agent runs there): nothing to wait for.
    silent: Vec<String>,
}

async fn rotation_pending(store: &Store, target: u64) -> Result<Rotation> {
    let revoked: Vec<String> = store
        .list::<Revocation>()
        .await?
        .records
        .into_iter()
        .filter(|r| r.serial.is_none())
        .map(|r| r.node.as_str().to_owned())
        .collect();
    let nodes: Vec<String> = store
        .list::<NodeRecord>()
        .await?
        .records
        .into_iter()
        .map(|n| n.name.as_str().to_owned())
        .filter(|n| !revoked.contains(n))
        .collect();
    let statuses: BTreeMap<String, NodeStatus> = store
        .list::<NodeStatus>()
        .await?
        .records
        .into_iter()
        .map(|s| (s.node.as_str().to_owned(), s))
        .collect();
    let (nodes, silent): (Vec<String>, Vec<String>) =
        nodes.into_iter().partition(|n| statuses.contains_key(n));
    let mut pending = Vec::new();
    for node in &nodes {
        for peer in nodes.iter().filter(|p| *p != node) {
            let reached = statuses.get(node).is_some_and(|s| {
                s.peers
                    .iter()
                    .any(|(name, p)| name.as_str() == peer && p.generation >= target)
            });
            if !reached {
                pending.push(format!("{node} -> {peer}"));
            }
        }
    }
    Ok(Rotation { pending, silent })
}

async fn status(args: StatusArgs) -> Result<ExitCode> {
    if args.cluster {
        let store = args.store.open().await?;
        let statuses = store.list::<NodeStatus>().await?;
        match args.output {
            Format::Json => {
                let all: BTreeMap<&str, &NodeStatus> = statuses
                    .records
                    .iter()
                    .map(|s| (s.node.as_str(), s))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            }
            Format::Text => {
                println!(
                    "{:<20} {:>10} {:<20} {:>14}  REPORTED",
                    "NODE", "GENERATION", "PEER", "EPOCH"
                );
                for s in &statuses.records {
                    for (peer, p) in &s.peers {
                        println!(
                            "{:<20} {:>10} {:<20} {:>14}  {}",
                            s.node.as_str(),
                            p.generation,
                            peer.as_str(),
                            format!("{}.{}", p.epoch >> 32, p.epoch & 0xffff_ffff),
                            humantime::format_rfc3339_seconds(s.reported_at)
                        );
                    }
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let view = crate::status::fetch(&args.socket).await?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&view)?),
        Format::Text => print!("{}", crate::status::render(&view)),
    }
    Ok(ExitCode::SUCCESS)
}
