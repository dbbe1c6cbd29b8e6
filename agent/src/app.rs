//! The one place that wires the agent together: store, identity, datapath, XFRM, handshake
//! server, peer tasks, status and metrics.
//!
//! Shutdown (cancel the root token) stops accepting handshakes and stops every task, then waits
//! for them with a deadline. Kernel state (SAs, policies, pinned maps, attachments) is left in
//! place on purpose: a restarted agent finds it and traffic keeps flowing meanwhile. Only an
//! agent told to stop for good (`--cleanup-on-exit`) removes it.
//!
//! With `--encryption false` the agent only follows the cluster and reports status (see
//! [`run_without_encryption`]).

use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use futures::StreamExt as _;
use nodeseal_keymgr::handshake::HandshakeConfig;
use nodeseal_keymgr::{NodeName, SpiffeId, TrustBundle, TrustDomain, TrustStore};
use nodeseal_store::{Event, Kind, NodeRecord, Record, Store};
use nodeseal_xfrm::{ExpireMonitor, Handle, XfrmStat};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::cleanup::{daemon_set_state, remove_kernel_state, should_remove_on_exit};
use crate::config::{AgentConfig, EncryptionType};
use crate::datapath::{DatapathHandle, DatapathSettings};
use crate::expiry::ExpiryFollower;
use crate::health::{Endpoints, Readiness, STEP_DATAPATH, STEP_IDENTITY, STEP_REMOVED, STEP_STORE};
use crate::identity::{IdentitySource, LocalClaims, Obtained};
use crate::metrics::Metrics;
use crate::mtu::{PodMtu, Tunnel as MtuTunnel};
use crate::observe::ObserveHub;
use crate::pace::Pace;
use crate::peer::LocalEnd;
use crate::peer::ipsec::HostEncryption;
use crate::peer::wireguard::WireguardSettings;
use crate::peer::{
    PeerCommand, PeerContext, PeerInfo, PeerRegistry, PeerSettings, PeerState, PeerStatus,
    PeerTask, error_chain,
};
use crate::policy_engine::{PolicyEngine, PolicyView};
use crate::status::{NodeView, StatusSource};

/// How long shutdown waits for tasks.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);
/// TTL of the node record's lease (etcd).
const NODE_LEASE_TTL: Duration = Duration::from_secs(15);
/// How long one attempt waits for keymgr to sign.
const SIGN_TIMEOUT: Duration = Duration::from_secs(30);
/// Housekeeping period: pod interfaces, status publication, metrics.
const TICK: Duration = Duration::from_millis(500);
/// How often housekeeping reads the WireGuard device into the metrics (a dump of every peer; a
/// status read also refreshes them).
const WIREGUARD_REFRESH: Duration = Duration::from_secs(5);

struct Agent {
    node: NodeName,
    /// Nodes whose record the store reports unusable, and why (shown by `nodeseal status`).
    unusable_nodes: std::sync::Mutex<BTreeMap<String, String>>,
    /// Why the store's trust bundle was refused, if it was.
    bundle_error: std::sync::Mutex<Option<String>>,
    /// Pod CIDRs of each node's last usable record: what a revocation keeps refused in the
    /// datapath when it arrives after the record.
    /// Shared with the policy engine, which gives remote pod IPs an identity only inside their
    /// node's pod CIDRs; `nodes_changed` tells it about changes.
    pod_cidrs_of: Arc<std::sync::Mutex<BTreeMap<String, Vec<IpNet>>>>,
    nodes_changed: Arc<tokio::sync::Notify>,
    /// Becomes true once the first view of the nodes was applied.
    nodes_synced: watch::Sender<bool>,
    /// The policy engine's state, for the status.
    policy_view: Arc<std::sync::Mutex<PolicyView>>,
    /// This node's addresses: no peer may claim them.
    local: LocalEnd,
    /// The pod CIDRs of each peer with a task: a record claiming one of them is refused before
    /// it gets a route (the holder's certificate is checked at its handshake; the newcomer's
    /// route would otherwise redirect the holder's traffic before anything is checked).
    peer_cidrs: std::sync::Mutex<BTreeMap<String, Vec<IpNet>>>,
    trust_domain: TrustDomain,
    config: AgentConfig,
    store: Store,
    registry: Arc<PeerRegistry>,
    peer_ctx: PeerContext,
    trust: TrustStore,
    generation_tx: watch::Sender<u64>,
    svid: watch::Receiver<Option<(SpiffeId, SystemTime)>>,
    metrics: Arc<Metrics>,
    xfrm: Handle,
    /// The WireGuard device, in WireGuard mode.
    wireguard: Option<WireguardMode>,
    /// What fits through the tunnel (`None` when the uplink's MTU cannot be read).
    pod_mtu: Option<PodMtu>,
    datapath: DatapathHandle,
    /// Flows for `nodeseal observe`; whoever knows identity labels sets them here.
    observe: ObserveHub,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// The node's WireGuard device: what peer tasks need in WireGuard mode.
#[derive(Clone, Debug)]
struct WireguardMode {
    handle: nodeseal_wireguard::Handle,
    settings: WireguardSettings,
}

impl WireguardMode {
    /// The device and its peers, as the kernel holds them now.
    async fn read_device(&self) -> Result<nodeseal_wireguard::Device, nodeseal_wireguard::Error> {
        self.handle
            .device(self.settings.link.clone())
            .get()
            .execute()
            .await
    }
}

/// Sets the WireGuard device up: the link (created or reused) with an MTU that fits the uplink,
/// the node's private key, the listen port, and the rule that sends lookups to nodeseal's
/// routing table. Nothing of it is removed on shutdown, so traffic keeps flowing across a
/// restart.
///
/// The private key is generated here and never written to the store or to disk. A restarted
/// agent takes over the key the kernel device still holds, as it takes over the XFRM states in
/// IPsec mode: a new key would end every peer's WireGuard session at once and drop traffic until
/// each pair re-handshakes, while the per-pair preshared keys rotate at the new handshakes anyway.
/// The key changes when the link goes (reboot, `--cleanup-on-exit`).
async fn start_wireguard(
    config: &AgentConfig,
    local_ip: IpAddr,
    uplink_mtu: Option<u32>,
) -> Result<WireguardMode> {
    use nodeseal_wireguard::{DeviceConfig, Family, LinkSpec, PrivateKey, Rule};
    let handle =
        nodeseal_wireguard::Handle::new().context("opening the WireGuard netlink sockets")?;
    let mtu = uplink_mtu.map_or(nodeseal_wireguard::DEFAULT_MTU, |m| {
        PodMtu::new(MtuTunnel::Wireguard, m, local_ip).pod
    });
    let link = handle
        .links()
        .ensure(LinkSpec::new(config.wireguard_link.clone()).mtu(mtu))
        .execute()
        .await
        .with_context(|| format!("setting up the WireGuard link {}", config.wireguard_link))?;
    let kept = match handle
        .device(config.wireguard_link.clone())
        .get()
        .execute()
        .await
    {
        Ok(device) => device.private_key,
        Err(e) => {
            warn!(error = %error_chain(&e), "cannot read the WireGuard device; taking a new key");
            None
        }
    };
    let key = match kept {
        Some(key) => {
            info!("taking over the WireGuard key the device holds");
            key
        }
        None => PrivateKey::generate().context("generating the node's WireGuard key")?,
    };
    let public_key = key.public_key();
    let private_key = Arc::new(key.clone());
    // With node encryption WireGuard's own packets carry a mark that keeps them out of the
    // link they came from (see `wireguard::exemption_rules`); without, a mark a previous run
    // set goes.
    let fwmark = if config.node_encryption {
        nodeseal_bpf::mark::MAGIC_WIREGUARD
    } else {
        0
    };
    handle
        .device(config.wireguard_link.clone())
        .configure(
            DeviceConfig::new()
                .private_key(key)
                .listen_port(config.wireguard_port)
                .fwmark(fwmark),
        )
        .execute()
        .await
        .with_context(|| format!("configuring the WireGuard device {}", link.name))?;
    let own = if local_ip.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    for family in [Family::V4, Family::V6] {
        let rule = Rule::all(
            family,
            crate::peer::wireguard::RULE_PRIORITY,
            crate::peer::wireguard::ROUTE_TABLE,
        );
        match handle.routes().add_rule(rule).execute().await {
            Ok(()) => {}
            Err(e) if family == own => {
                return Err(e).context("adding the rule that routes pod traffic into WireGuard");
            }
            // The other family may be disabled on the node; the peers are all of ours.
            Err(e) => debug!(error = %error_chain(&e), ?family, "no rule for the other family"),
        }
        let exemptions = crate::peer::wireguard::exemption_rules(
            family,
            config.handshake_port,
            &config.node_encryption_exempt_tcp_port,
        );
        for rule in exemptions {
            let request = if config.node_encryption {
                handle.routes().add_rule(rule)
            } else {
                // A previous run's, with node encryption.
                handle.routes().delete_rule(rule)
            };
            match request.execute().await {
                Ok(()) => {}
                Err(e) if family == own && config.node_encryption => {
                    return Err(e).context("adding a rule that keeps traffic out of WireGuard");
                }
                Err(e) => debug!(error = %error_chain(&e), ?rule, "exemption rule"),
            }
        }
    }
    info!(link = %link.name, mtu, port = config.wireguard_port, %public_key, "WireGuard device ready");
    Ok(WireguardMode {
        handle,
        settings: WireguardSettings {
            link: config.wireguard_link.clone(),
            port: config.wireguard_port,
            public_key,
            private_key,
            holders: crate::peer::wireguard::KeyHolders::default(),
            node_encryption: config.node_encryption,
            strict: config.strict_mode,
        },
    })
}

/// Peers (by node IP) a previous agent left on the WireGuard device: their tasks sweep.
async fn leftover_wireguard_peers(wg: &WireguardMode) -> std::collections::HashSet<IpAddr> {
    match wg.read_device().await {
        Ok(device) => device
            .peers
            .iter()
            .filter_map(|p| p.endpoint.map(|e| e.ip()))
            .collect(),
        Err(e) => {
            warn!(error = %error_chain(&e), "cannot read the WireGuard device; no peer will be swept");
            std::collections::HashSet::new()
        }
    }
}

/// Runs the agent until `cancel` fires.
///
/// # Errors
/// Start-up failures (bad configuration, store, datapath, identity); afterwards errors are
/// logged and the agent keeps its last good state.
pub async fn run(config: AgentConfig, cancel: CancellationToken) -> Result<()> {
    config.validate()?;
    info!(config = %serde_json::to_string(&config).unwrap_or_default(), "starting nodeseal-agent");
    let tracker = TaskTracker::new();
    let metrics = Arc::new(Metrics::new());
    let readiness = if config.encryption {
        Readiness::waiting_for(&[STEP_STORE, STEP_DATAPATH, STEP_IDENTITY])
    } else {
        Readiness::waiting_for(&[STEP_STORE, STEP_REMOVED])
    };
    // Before anything that can wait (store, keymgr): liveness must answer meanwhile.
    serve_http(&config, &metrics, &readiness, &tracker, &cancel).await?;
    let trust_domain = TrustDomain::new(&config.store.trust_domain).context("--trust-domain")?;
    let node = NodeName::new(&config.node_name).context("--node-name")?;
    // The store may be down at start (etcd restarting): wait for it rather than exit.
    let Some(cluster) = retry("opening the cluster store", &cancel, || {
        config.store.connect()
    })
    .await
    else {
        return Ok(());
    };
    let store = cluster.store.clone();
    let local = match &cluster.kube {
        // The Node object, not our flags, says which addresses are ours; it may still lack
        // them while the node registers, so wait for them.
        Some(client) => {
            let Some(local) = retry("reading this node's Node object", &cancel, || {
                local_addresses_from_node(client, &config)
            })
            .await
            else {
                return Ok(());
            };
            local
        }
        None => LocalEnd {
            ip: config
                .node_ip
                .context("--node-ip is required without --kubernetes")?,
            pod_cidrs: config.pod_cidrs.iter().map(|c| c.trunc()).collect(),
            second_ip: config.second_node_ip,
        },
    };
    info!(node_ip = %local.ip, second_node_ip = ?local.second_ip, pod_cidrs = ?local.pod_cidrs, "local addresses");

    let record = NodeRecord {
        name: nodeseal_store::NodeName::new(config.node_name.clone()).context("--node-name")?,
        node_ips: std::iter::once(local.ip).chain(local.second_ip).collect(),
        pod_cidrs: local.pod_cidrs.clone(),
        spiffe_id: nodeseal_store::SpiffeId::new(trust_domain.node_id(&node).as_str().to_owned())
            .context("SPIFFE ID")?,
        handshake: SocketAddr::new(local.ip, config.handshake_port),
        wireguard_public_key: None,
    };
    let Some(mut lease) = retry("publishing the node record", &cancel, || {
        store.publish_node(record.clone(), NODE_LEASE_TTL)
    })
    .await
    else {
        return Ok(());
    };
    let lease_cancel = cancel.child_token();
    tracker.spawn(async move {
        if let Err(e) = lease.run(lease_cancel).await {
            warn!(error = %e, "node record lease ended");
        }
    });
    readiness.done(STEP_STORE);
    if !config.encryption {
        return run_without_encryption(config, store, node, metrics, readiness, tracker, cancel)
            .await;
    }

    let datapath = DatapathHandle::load(DatapathSettings {
        pin_root: config.bpf_pin_root.clone(),
        uplink: config.uplink.clone(),
        pod_interface_prefix: config.pod_interface_prefix.clone(),
        strict: config.strict_mode,
        local_pod_cidrs: local.pod_cidrs.clone(),
        mode: config.datapath_mode(),
        node_encryption: config.node_encryption,
        clear_ports: config.clear_ports(),
    })
    .context("loading the eBPF datapath")?;
    datapath
        .sync_pod_interfaces()
        .context("attaching to pod interfaces")?;
    readiness.done(STEP_DATAPATH);
    let uplink_mtu = crate::mtu::interface_mtu(&config.uplink).await;
    let wireguard = match config.encryption_type {
        EncryptionType::Wireguard => Some(start_wireguard(&config, local.ip, uplink_mtu).await?),
        EncryptionType::Ipsec => None,
    };
    let pod_mtu = uplink_mtu.map(|uplink| {
        let tunnel = match config.encryption_type {
            EncryptionType::Ipsec => MtuTunnel::Esp,
            EncryptionType::Wireguard => MtuTunnel::Wireguard,
        };
        PodMtu::new(tunnel, uplink, local.ip)
    });
    if let Some(m) = pod_mtu {
        info!(
            uplink = m.uplink,
            pod = m.pod,
            "pods whose MTU is at most the pod MTU need no path-MTU discovery through the tunnel"
        );
    }
    let xfrm = Handle::new().context("opening the XFRM netlink socket")?;
    let expire_notices =
        ExpireMonitor::open().context("subscribing to the kernel's XFRM expire notices")?;
    // A packet that meets a policy whose state is momentarily missing is queued until the state
    // appears instead of dropped (the kernel default drops it: XfrmOutNoStates), which keeps
    // make-before-break rekeys lossless at the edges. Per network namespace.
    if let Err(e) = std::fs::write("/proc/sys/net/core/xfrm_larval_drop", "0") {
        warn!(error = %e, "cannot set net.core.xfrm_larval_drop=0; rekeys may drop a packet");
    }
    // Pod-CIDR policies are "inexact" under the kernel's default hash thresholds (32/32), and
    // inexact insertion grows with the number of policies (quadratically before Linux 6.12), so
    // programming thousands of peers would slow down peer by peer. These thresholds put every
    // policy of our layout in the exact hash. Per network namespace, foreign policies included;
    // it changes where the kernel stores policies (which one matches changes only for overlapping
    // policies of equal priority, which ours never are) and makes it rehash them once.
    if let Err(e) = xfrm
        .set_policy_hash_thresholds(crate::peer::ipsec::POLICY_HASH_THRESHOLDS)
        .execute()
        .await
    {
        warn!(error = %e, "cannot set the XFRM policy hash thresholds; many peers will program slowly");
    }

    let local_claims = LocalClaims {
        ip: local.ip,
        pod_cidrs: local.pod_cidrs.clone(),
        second_ip: local.second_ip,
    };
    let source = match (
        &config.identity_cert,
        &config.identity_key,
        &config.trust_bundle_file,
    ) {
        (Some(cert), Some(key), Some(bundle)) => IdentitySource::Files {
            cert: cert.clone(),
            key: key.clone(),
            bundle: bundle.clone(),
        },
        _ => match &cluster.kube {
            Some(client) => IdentitySource::KubeCsr {
                store: store.clone(),
                client: client.clone(),
                state_dir: config.state_dir.clone(),
                sign_timeout: SIGN_TIMEOUT,
                local: local_claims,
            },
            None => IdentitySource::Keymgr {
                store: store.clone(),
                state_dir: config.state_dir.clone(),
                sign_timeout: SIGN_TIMEOUT,
                local: local_claims,
            },
        },
    };
    let Some(obtained) =
        obtain_until_cancelled(&source, &trust_domain, &node, false, &cancel).await
    else {
        return Ok(());
    };
    let trust = TrustStore::new(initial_bundle(&config, &source, &trust_domain, &obtained)?)
        .context("trust bundle")?;
    let (handshake_tx, handshake_rx) = watch::channel(None);
    let (svid_tx, svid_rx) = watch::channel(None);
    install_identity(&trust, &obtained, &handshake_tx, &svid_tx)?;
    readiness.done(STEP_IDENTITY);

    let listener = tokio::net::TcpListener::bind((local.ip, config.handshake_port))
        .await
        .with_context(|| {
            format!(
                "binding the handshake port {}:{}",
                local.ip, config.handshake_port
            )
        })?;
    let status_listener = crate::status::bind(&config.status_socket)?;
    let observe = start_observe(&datapath, &tracker, &cancel);

    let (generation_tx, generation_rx) = watch::channel(0u64);
    let registry = Arc::new(PeerRegistry::default());
    let peer_ctx = PeerContext {
        settings: PeerSettings {
            local: local.clone(),
            rekey_interval: config.rekey_interval,
            grace: config.rekey_grace,
            retention: config.peer_retention,
            strict: config.strict_mode,
            sa_limits: config.sa_limits(),
            // An external PKI (certificate files) cannot bind claims; keymgr always does.
            require_claims: !matches!(source, IdentitySource::Files { .. }),
            host_encryption: (config.node_encryption
                && config.encryption_type == EncryptionType::Ipsec)
                .then(|| HostEncryption {
                    handshake_port: config.handshake_port,
                    exempt_tcp_ports: config.node_encryption_exempt_tcp_port.clone(),
                }),
        },
        xfrm: xfrm.clone(),
        datapath: datapath.clone(),
        handshake: handshake_rx.clone(),
        generation: generation_rx,
        metrics: Arc::clone(&metrics),
        cancel: cancel.clone(),
        handshake_permits: Arc::new(tokio::sync::Semaphore::new(
            crate::peer::MAX_CONCURRENT_HANDSHAKES,
        )),
        pace: Arc::new(Pace::new()),
        leftover_peers: Arc::new(match &wireguard {
            Some(wg) => leftover_wireguard_peers(wg).await,
            None => leftover_peers(&xfrm, local.ip).await,
        }),
    };
    tracker.spawn(crate::server::serve(
        listener,
        Arc::clone(&registry),
        handshake_rx,
        Arc::clone(&metrics),
        tracker.clone(),
        cancel.child_token(),
    ));

    let agent = Arc::new(Agent {
        node,
        unusable_nodes: std::sync::Mutex::default(),
        bundle_error: std::sync::Mutex::default(),
        pod_cidrs_of: Arc::default(),
        nodes_changed: Arc::default(),
        nodes_synced: watch::channel(false).0,
        policy_view: Arc::default(),
        local: local.clone(),
        peer_cidrs: std::sync::Mutex::default(),
        trust_domain,
        config,
        store,
        registry,
        peer_ctx,
        trust,
        generation_tx,
        svid: svid_rx,
        metrics,
        xfrm,
        wireguard,
        pod_mtu,
        datapath,
        observe,
        tracker: tracker.clone(),
        cancel: cancel.clone(),
    });
    tracker.spawn(crate::status::serve(
        status_listener,
        Arc::clone(&agent) as Arc<dyn StatusSource>,
        Some(agent.observe.clone()),
        cancel.child_token(),
    ));
    tracker.spawn(renew_identity(
        Arc::clone(&agent),
        source,
        obtained,
        handshake_tx,
        svid_tx,
    ));
    tracker.spawn(housekeeping(Arc::clone(&agent)));
    tracker.spawn(
        PolicyEngine {
            node: agent.node.to_string(),
            store: agent.store.clone(),
            datapath: agent.datapath.clone(),
            // In Kubernetes mode keymgr allocates identities: nodes may only read them.
            allocate: cluster.kube.is_none(),
            local_pod_cidrs: agent.local.pod_cidrs.clone(),
            node_cidrs: Arc::clone(&agent.pod_cidrs_of),
            nodes_changed: Arc::clone(&agent.nodes_changed),
            nodes_synced: agent.nodes_synced.subscribe(),
            pod_interface_prefix: agent.config.pod_interface_prefix.clone(),
            metrics: Arc::clone(&agent.metrics),
            view: Arc::clone(&agent.policy_view),
            observe: agent.observe.clone(),
        }
        .run(cancel.child_token()),
    );
    tracker.spawn(
        ExpiryFollower {
            registry: Arc::clone(&agent.registry),
            xfrm: agent.xfrm.clone(),
            local: agent.local.ip,
            metrics: Arc::clone(&agent.metrics),
        }
        .run(expire_notices, cancel.child_token()),
    );
    info!(node = %agent.node, "agent ready");
    agent.watch_store().await;

    // Shutdown: stop everything; kernel state stays unless told to stop for good.
    cancel.cancel();
    stop_tasks(&tracker).await;
    let daemon_set = cluster.kube.clone().map(|client| {
        let namespace = agent.config.store.namespace.clone();
        let name = agent.config.daemonset.clone();
        move || async move { daemon_set_state(client, &namespace, &name).await }
    });
    if should_remove_on_exit(agent.config.cleanup_on_exit, daemon_set).await {
        remove_kernel_state(&agent.config, Some(&agent.datapath))
            .await
            .context("removing the kernel state on exit")?;
        info!("agent stopped; SAs and datapath removed");
    } else {
        info!("agent stopped; SAs and datapath left in place");
    }
    Ok(())
}

/// The flow hub for `nodeseal observe`, with its ring buffer reader running. Trace events
/// start off; observe clients switch them through the hub.
fn start_observe(
    datapath: &DatapathHandle,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> ObserveHub {
    let hub = ObserveHub::new(Some(
        Arc::new(datapath.clone()) as Arc<dyn crate::observe::TraceSwitch>
    ));
    let reader = crate::observe::run_reader(hub.clone(), datapath.clone(), cancel.child_token());
    tracker.spawn(async move {
        if let Err(e) = reader.await {
            warn!(error = %error_chain(&e), "datapath events reader stopped; observe shows no new flows");
        }
    });
    hub
}

async fn stop_tasks(tracker: &TaskTracker) {
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        warn!("tasks still running at the shutdown deadline; exiting anyway");
    }
}

/// Binds `--health-addr` and `--metrics-addr` (one server when they are the same address).
async fn serve_http(
    config: &AgentConfig,
    metrics: &Arc<Metrics>,
    readiness: &Readiness,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<()> {
    let mut servers: Vec<(SocketAddr, Endpoints)> = Vec::new();
    if let Some(addr) = config.health_addr {
        servers.push((
            addr,
            Endpoints {
                metrics: None,
                readiness: Some(readiness.clone()),
            },
        ));
    }
    if let Some(addr) = config.metrics_addr {
        match servers.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, endpoints)) => endpoints.metrics = Some(Arc::clone(metrics)),
            None => servers.push((
                addr,
                Endpoints {
                    metrics: Some(Arc::clone(metrics)),
                    readiness: None,
                },
            )),
        }
    }
    for (addr, endpoints) in servers {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP endpoints on {addr}"))?;
        tracker.spawn(crate::health::serve(
            listener,
            endpoints,
            cancel.child_token(),
        ));
    }
    Ok(())
}

/// Encryption off: follow the cluster and report status, with nothing in the kernel. What an
/// earlier run with encryption left (SAs, policies, eBPF programs and pins) is removed first,
/// so turning encryption off (`helm upgrade --set encryption.enabled=false`) takes effect as
/// each agent restarts.
async fn run_without_encryption(
    config: AgentConfig,
    store: Store,
    node: NodeName,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    tracker: TaskTracker,
    cancel: CancellationToken,
) -> Result<()> {
    // Not ready until this is done: "ready" means the node is as configured.
    let removed = remove_kernel_state(&config, None)
        .await
        .context("encryption is off: removing what an earlier run installed")?;
    readiness.done(STEP_REMOVED);
    info!(
        xfrm_objects = removed.xfrm_objects,
        datapath = removed.datapath,
        "encryption is off: no SAs, XFRM policies or eBPF programs on this node"
    );
    let passive = Arc::new(Passive {
        node,
        strict: config.strict_mode,
        nodes: std::sync::Mutex::default(),
        unusable_nodes: std::sync::Mutex::default(),
    });
    tracker.spawn(crate::status::serve(
        crate::status::bind(&config.status_socket)?,
        Arc::clone(&passive) as Arc<dyn StatusSource>,
        None,
        cancel.child_token(),
    ));
    // One status record, so `nodeseal status --cluster` lists the node (with no peers).
    if let Ok(name) = nodeseal_store::NodeName::new(passive.node.as_str()) {
        let record = nodeseal_store::NodeStatus {
            node: name,
            reported_at: SystemTime::now(),
            generation: 0,
            peers: BTreeMap::new(),
        };
        if let Err(e) = store.put(&record).await {
            warn!(error = %e, "publishing node status");
        }
    }
    info!(node = %passive.node, "agent ready (encryption off)");
    let mut events = store.watch(&[Kind::Node]);
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => break,
            e = events.next() => e,
        };
        let Some(event) = event else { break };
        passive.apply(event);
        let peers = passive.peer_count();
        metrics.set_peers(peers, 0);
    }
    cancel.cancel();
    stop_tasks(&tracker).await;
    info!("agent stopped (encryption off; nothing in the kernel)");
    Ok(())
}

/// The agent's view with encryption off: the nodes it would peer with, and the unusable ones.
struct Passive {
    node: NodeName,
    strict: bool,
    nodes: std::sync::Mutex<std::collections::BTreeSet<String>>,
    unusable_nodes: std::sync::Mutex<BTreeMap<String, String>>,
}

impl Passive {
    fn apply(&self, event: Event) {
        let (Ok(mut nodes), Ok(mut unusable)) = (self.nodes.lock(), self.unusable_nodes.lock())
        else {
            return;
        };
        match event {
            Event::Snapshot(snapshot) | Event::Resynced(snapshot) => {
                nodes.clear();
                unusable.clear();
                for record in snapshot.records {
                    if let Record::Node(n) = record {
                        nodes.insert(n.name.as_str().to_owned());
                    }
                }
            }
            Event::Put(Record::Node(n)) => {
                unusable.remove(n.name.as_str());
                nodes.insert(n.name.as_str().to_owned());
            }
            Event::Deleted(key) => {
                if let Some(name) = key.node() {
                    nodes.remove(name.as_str());
                    unusable.remove(name.as_str());
                }
            }
            Event::Invalid(e) => {
                if let Ok(key) = nodeseal_store::Key::parse(&e.key)
                    && key.kind() == Kind::Node
                    && let Some(name) = key.node()
                {
                    nodes.remove(name.as_str());
                    unusable.insert(name.to_string(), e.problem.to_string());
                }
            }
            Event::Interrupted(e) => warn!(error = %e, "cluster store unavailable"),
            other => debug!(event = ?other, "ignoring store event"),
        }
    }

    /// Nodes other than this one.
    fn peer_count(&self) -> usize {
        self.nodes
            .lock()
            .map(|n| n.iter().filter(|name| *name != self.node.as_str()).count())
            .unwrap_or(0)
    }
}

#[async_trait::async_trait]
impl StatusSource for Passive {
    async fn snapshot(&self) -> NodeView {
        NodeView {
            node: self.node.to_string(),
            mode: "off".into(),
            strict: self.strict,
            node_encryption: false,
            spiffe_id: None,
            svid_not_after_unix: None,
            generation: 0,
            peers: Vec::new(),
            xfrm_errors: BTreeMap::new(),
            datapath_drops: BTreeMap::new(),
            unusable_nodes: self
                .unusable_nodes
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            trust_bundle_error: None,
            wg_public_key: None,
            pod_mtu: None,
            policy: None,
        }
    }
}

/// Why this node's own addresses could not be read from its Node object.
#[derive(Debug, thiserror::Error)]
enum NodeObjectError {
    #[error("reading Node {0}")]
    Api(String, #[source] kube::Error),
    #[error("there is no Node object {0} (yet)")]
    Missing(String),
    #[error("Node {0}: {1}")]
    Unusable(String, nodeseal_store::RecordProblem),
}

/// This node's IP and pod CIDRs as its Node object says (Kubernetes mode). A `--node-ip` that
/// is one of the Node's InternalIPs picks among them; any other is ignored with a warning.
async fn local_addresses_from_node(
    client: &kube::Client,
    config: &AgentConfig,
) -> Result<LocalEnd, NodeObjectError> {
    let name = &config.node_name;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let node = nodes
        .get_opt(name)
        .await
        .map_err(|e| NodeObjectError::Api(name.clone(), e))?
        .ok_or_else(|| NodeObjectError::Missing(name.clone()))?;
    let facts = nodeseal_store::kube::objects::NodeFacts::of(&node)
        .map_err(|p| NodeObjectError::Unusable(name.clone(), p))?;
    let first = facts.internal_ips.first().copied().ok_or_else(|| {
        NodeObjectError::Unusable(
            name.clone(),
            nodeseal_store::RecordProblem::Field {
                field: "node_ips",
                reason: "no InternalIP".to_owned(),
            },
        )
    })?;
    let ip = match config.node_ip {
        Some(ip) if facts.internal_ips.contains(&ip) => ip,
        Some(ip) => {
            warn!(flag = %ip, node_object = ?facts.internal_ips, "--node-ip is not an InternalIP of this Node; using the Node object's");
            first
        }
        None => first,
    };
    if !config.pod_cidrs.is_empty() && config.pod_cidrs != facts.pod_cidrs {
        warn!(flag = ?config.pod_cidrs, node_object = ?facts.pod_cidrs, "--pod-cidr differs from the Node object's spec.podCIDRs; using the Node object's");
    }
    let second_ip = facts
        .internal_ips
        .iter()
        .copied()
        .find(|other| other.is_ipv4() != ip.is_ipv4());
    Ok(LocalEnd {
        ip,
        pod_cidrs: facts.pod_cidrs,
        second_ip,
    })
}

/// Runs `attempt` until it succeeds (backing off up to 10 s, logging each failure) or `cancel`
/// fires (`None`).
async fn retry<T, E, F, Fut>(what: &str, cancel: &CancellationToken, mut attempt: F) -> Option<T>
where
    E: std::error::Error,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(e) => warn!(error = %error_chain(&e), retry_in = ?delay, "{what} failed; retrying"),
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// The bundle this node starts trusting. With `--trust-bundle-file` (and keymgr issuing the
/// identity) the file pins it: the store's bundle is taken only if the pinned CA signed it,
/// where without a pin the first one is taken on trust. Either way, later changes need the
/// signature of a CA already trusted (see [`Agent::accept_bundle`]).
fn initial_bundle(
    config: &AgentConfig,
    source: &IdentitySource,
    td: &TrustDomain,
    obtained: &Obtained,
) -> Result<TrustBundle> {
    let (Some(pin), false) = (
        &config.trust_bundle_file,
        matches!(source, IdentitySource::Files { .. }),
    ) else {
        return Ok(obtained.bundle.clone());
    };
    let text = std::fs::read(pin).with_context(|| pin.display().to_string())?;
    let anchors = nodeseal_keymgr::svid::certs_from_pem(&text)
        .with_context(|| format!("{}: trust anchors", pin.display()))?;
    let pinned = TrustBundle::new(td.clone(), anchors);
    let json = obtained.bundle.to_json().context("trust bundle")?;
    // The store's bundle as keymgr published it (with its signature) is checked by the watch;
    // here only whether it adds nothing to the pin.
    Ok(match pinned.accept_update(json.as_bytes(), None, &[]) {
        Ok(same) => same,
        Err(e) => {
            info!(pin = %pin.display(), reason = %e, "starting with the pinned trust bundle");
            pinned
        }
    })
}

async fn obtain_until_cancelled(
    source: &IdentitySource,
    td: &TrustDomain,
    node: &NodeName,
    renew: bool,
    cancel: &CancellationToken,
) -> Option<Obtained> {
    retry("obtaining the node identity", cancel, || {
        source.obtain(td, node, renew)
    })
    .await
}

fn install_identity(
    trust: &TrustStore,
    obtained: &Obtained,
    handshake_tx: &watch::Sender<Option<HandshakeConfig>>,
    svid_tx: &watch::Sender<Option<(SpiffeId, SystemTime)>>,
) -> Result<()> {
    let config =
        HandshakeConfig::new(trust.clone(), &obtained.identity).context("handshake config")?;
    handshake_tx.send_replace(Some(config));
    let info = obtained.identity.info();
    svid_tx.send_replace(Some((info.spiffe_id.clone(), info.not_after)));
    Ok(())
}

/// Renews the SVID at its (jittered) half-life; handshakes in flight keep the old one.
async fn renew_identity(
    agent: Arc<Agent>,
    source: IdentitySource,
    mut current: Obtained,
    handshake_tx: watch::Sender<Option<HandshakeConfig>>,
    svid_tx: watch::Sender<Option<(SpiffeId, SystemTime)>>,
) {
    if matches!(source, IdentitySource::Files { .. }) {
        return;
    }
    loop {
        let at = current.identity.info().renew_at();
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            () = agent.cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let Some(next) = obtain_until_cancelled(
            &source,
            &agent.trust_domain,
            &agent.node,
            true,
            &agent.cancel,
        )
        .await
        else {
            return;
        };
        match install_identity(&agent.trust, &next, &handshake_tx, &svid_tx) {
            Ok(()) => {
                info!(spiffe_id = %next.identity.info().spiffe_id, "node SVID renewed");
                current = next;
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "renewed SVID unusable; keeping the current one")
            }
        }
    }
}

/// One peer's applied keys as the housekeeping tick compares them: (node IP, epoch, generation).
type AppliedKey = (IpAddr, u64, u64);

/// The epoch and generation every peer applied, by node name, as the node's status record
/// publishes them.
fn applied_by_name(
    registry: &PeerRegistry,
) -> BTreeMap<nodeseal_store::NodeName, nodeseal_store::PeerStatus> {
    let mut applied = BTreeMap::new();
    registry.for_each(|_, name, handle| {
        let Ok(s) = handle.status.lock() else {
            return;
        };
        if let (Some(epoch), Some(generation), Ok(n)) = (
            s.epoch,
            s.generation,
            nodeseal_store::NodeName::new(name.as_str()),
        ) {
            applied.insert(n, nodeseal_store::PeerStatus { epoch, generation });
        }
    });
    applied
}

/// Pod interfaces, status publication for `keys rotate --wait`, metrics.
async fn housekeeping(agent: Arc<Agent>) {
    // What was last published, as (generation, every peer's (IP, epoch, generation) by IP):
    // comparing this is all a tick costs while nothing changes; the store's map (a validated
    // name per peer) is built only when something did.
    let mut last_published: Option<(u64, Vec<AppliedKey>)> = None;
    let mut applied_now: Vec<AppliedKey> = Vec::new();
    let mut last_publish_at = std::time::Instant::now();
    let mut last_wireguard_refresh: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            () = agent.cancel.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
        if let Err(e) = agent.datapath.sync_pod_interfaces() {
            warn!(error = %error_chain(&e), "syncing pod interfaces");
        }
        // One pass over the registry in place (no copy of it): twice a second at every size.
        applied_now.clear();
        let (mut total, mut established) = (0, 0);
        agent.registry.for_each(|ip, _, handle| {
            total += 1;
            let Ok(s) = handle.status.lock() else {
                return;
            };
            if s.state == PeerState::Established {
                established += 1;
            }
            if let (Some(epoch), Some(generation)) = (s.epoch, s.generation) {
                applied_now.push((ip, epoch, generation));
            }
        });
        applied_now.sort_unstable();
        agent.metrics.set_peers(total, established);
        let _ = agent.refresh_counters();
        if agent.wireguard.is_some()
            && last_wireguard_refresh.is_none_or(|at| at.elapsed() >= WIREGUARD_REFRESH)
        {
            last_wireguard_refresh = Some(std::time::Instant::now());
            let mut rows: Vec<PeerStatus> = agent
                .registry
                .all()
                .iter()
                .filter_map(|(_, _, h)| h.status.lock().ok().map(|s| s.clone()))
                .collect();
            agent.refresh_wireguard(&mut rows).await;
        }
        let generation = *agent.generation_tx.borrow();
        // A periodic re-publication keeps `reported_at` fresh for `status --cluster`; against
        // the apiserver every write is a watch event on every node, so there only changes go.
        let refresh = agent.store.backend_name() != "kubernetes"
            && last_publish_at.elapsed() > Duration::from_secs(30);
        let unchanged = last_published
            .as_ref()
            .is_some_and(|(g, applied)| *g == generation && *applied == applied_now);
        if !unchanged || refresh {
            let Ok(node) = nodeseal_store::NodeName::new(agent.node.as_str()) else {
                continue;
            };
            let record = nodeseal_store::NodeStatus {
                node,
                reported_at: SystemTime::now(),
                generation,
                peers: applied_by_name(&agent.registry),
            };
            match agent.store.put(&record).await {
                Ok(()) => {
                    last_published = Some((generation, applied_now.clone()));
                    last_publish_at = std::time::Instant::now();
                }
                Err(e) => warn!(error = %e, "publishing node status"),
            }
        }
    }
}

impl Agent {
    /// Follows the store: peers come and go, revocations, rotation requests, bundle updates.
    /// During a store outage nothing changes in the datapath; the resync afterwards catches up.
    async fn watch_store(self: &Arc<Self>) {
        let mut events = self.store.watch(&[
            Kind::Node,
            Kind::Revocation,
            Kind::RekeyGeneration,
            Kind::TrustBundle,
        ]);
        loop {
            let event = tokio::select! {
                () = self.cancel.cancelled() => return,
                e = events.next() => e,
            };
            let Some(event) = event else { return };
            match event {
                Event::Snapshot(snapshot) | Event::Resynced(snapshot) => {
                    // The whole view again: unusable records are reported after it.
                    if let Ok(mut unusable) = self.unusable_nodes.lock() {
                        unusable.clear();
                    }
                    self.resync(snapshot.records).await;
                    self.nodes_synced.send_replace(true);
                }
                Event::Put(record) => self.apply(record).await,
                Event::Deleted(key) => {
                    if key.kind() == Kind::Node
                        && let Some(name) = key.node()
                    {
                        self.remove_peer_named(name.as_str(), "node record deleted")
                            .await;
                        if let Ok(mut unusable) = self.unusable_nodes.lock() {
                            unusable.remove(name.as_str());
                        }
                        self.forget_node(name.as_str());
                    }
                }
                Event::Interrupted(e) => {
                    warn!(error = %e, "cluster store unavailable; keeping the datapath as it is")
                }
                Event::Invalid(e) => {
                    warn!(error = %e, "ignoring invalid store record");
                    // An invalid record stands for no record: its node is no peer until it is
                    // fixed, and the status says why.
                    if let Ok(key) = nodeseal_store::Key::parse(&e.key)
                        && key.kind() == Kind::Node
                        && let Some(name) = key.node()
                    {
                        self.remove_peer_named(name.as_str(), "node record unusable")
                            .await;
                        if let Ok(mut unusable) = self.unusable_nodes.lock() {
                            unusable.insert(name.to_string(), e.problem.to_string());
                        }
                    }
                }
                // Event is non-exhaustive: a kind of event this agent does not know yet changes
                // nothing it acts on.
                other => debug!(event = ?other, "ignoring unknown store event"),
            }
        }
    }

    async fn resync(self: &Arc<Self>, records: Vec<Record>) {
        let mut nodes = Vec::new();
        let mut others = Vec::new();
        for r in records {
            match r {
                Record::Node(n) => nodes.push(n),
                other => others.push(other),
            }
        }
        // Revocations and the bundle first, so that no revoked node is (re)started below.
        for r in others {
            self.apply(r).await;
        }
        let listed: Vec<String> = nodes.iter().map(|n| n.name.as_str().to_owned()).collect();
        for (_, name, _) in self.registry.all() {
            if !listed.iter().any(|l| l == name.as_str()) {
                self.remove_peer_named(name.as_str(), "node record gone")
                    .await;
            }
        }
        let mut known: Vec<String> = self
            .pod_cidrs_of
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        known.extend(self.datapath.revoked_nodes().unwrap_or_default());
        for name in known {
            if !listed.contains(&name) {
                self.forget_node(&name);
            }
        }
        for n in nodes {
            self.apply(Record::Node(n)).await;
        }
    }

    async fn apply(self: &Arc<Self>, record: Record) {
        match record {
            Record::Node(n) => self.upsert_peer(n).await,
            Record::Revocation(r) => {
                let node = r.node.as_str().to_owned();
                match &r.serial {
                    None => {
                        if let Ok(name) = NodeName::new(&node) {
                            self.trust.revoke_id(self.trust_domain.node_id(&name));
                        }
                        // Before the peer goes: its CIDRs turn from encrypted to refused in
                        // place, never unknown (which would let its pods' plaintext in).
                        let cidrs = self
                            .pod_cidrs_of
                            .lock()
                            .ok()
                            .and_then(|m| m.get(&node).cloned());
                        if let Some(cidrs) = cidrs {
                            self.keep_revoked(&node, &cidrs);
                        }
                        self.remove_peer_named(&node, "revoked").await;
                    }
                    Some(serial) => {
                        if let Ok(bytes) = hex::decode(serial.as_str()) {
                            self.trust.revoke_serial(&bytes);
                        }
                    }
                }
            }
            Record::RekeyGeneration(g) => {
                self.generation_tx.send_if_modified(|current| {
                    let changed = g.generation > *current;
                    *current = (*current).max(g.generation);
                    changed
                });
            }
            Record::TrustBundle(b) => match self.accept_bundle(&b) {
                Ok(bundle) => {
                    if let Err(e) = self.trust.set_bundle(bundle) {
                        warn!(error = %e, "trust bundle update rejected; keeping the previous one");
                    }
                    self.set_bundle_error(None);
                }
                Err(e) => {
                    warn!(error = %e, "trust bundle in the store refused; keeping the previous one");
                    self.set_bundle_error(Some(e.to_string()));
                }
            },
            _ => {}
        }
    }

    async fn upsert_peer(self: &Arc<Self>, record: NodeRecord) {
        if let Ok(mut unusable) = self.unusable_nodes.lock() {
            unusable.remove(record.name.as_str());
        }
        if record.name.as_str() == self.node.as_str() {
            return;
        }
        let name = record.name.as_str().to_owned();
        let info = match peer_info(&record, &self.local) {
            Ok(info) => info,
            Err(reason) => {
                warn!(peer = %name, %reason, "ignoring unusable node record");
                if let Ok(mut unusable) = self.unusable_nodes.lock() {
                    unusable.insert(name, reason);
                }
                return;
            }
        };
        if let Some(reason) = self.overlapping_peer(&name, &info.pod_cidrs) {
            // Before the revocation check too: a record naming a node the operator then
            // revokes must not turn a member's pod CIDR into a refused one.
            warn!(peer = %name, %reason, "ignoring node record");
            if let Ok(mut unusable) = self.unusable_nodes.lock() {
                unusable.insert(name, reason);
            }
            return;
        }
        if let Ok(mut known) = self.pod_cidrs_of.lock()
            && known.insert(name.clone(), info.pod_cidrs.clone()).as_ref() != Some(&info.pod_cidrs)
        {
            self.nodes_changed.notify_one();
        }
        if self.trust.is_revoked(&info.spiffe_id) {
            // Never a peer again, but its record stands: its pod CIDRs stay refused (also
            // after a restart of this agent, or when the record changes them).
            self.keep_revoked(&name, &info.pod_cidrs);
            return;
        }
        if let Ok(mut held) = self.peer_cidrs.lock() {
            held.insert(name.clone(), info.pod_cidrs.clone());
        }
        if let Some((holder, handle)) = self.registry.lookup(info.ip) {
            if holder.as_str() != name {
                // Peers are keyed by address: taking the update would hand this node the
                // holder's SAs and traffic. The holder keeps it until its own record moves.
                let reason = format!(
                    "claims address {} of node {holder}, which holds it",
                    info.ip
                );
                warn!(peer = %name, %reason, "ignoring node record");
                if let Ok(mut unusable) = self.unusable_nodes.lock() {
                    unusable.insert(name, reason);
                }
                return;
            }
            let _ = handle
                .commands
                .send(PeerCommand::Update(Box::new(info)))
                .await;
            return;
        }
        // A node that moved: its task at the old address goes, with its SAs, so that one name
        // is never two peers and the old address stops receiving the node's traffic. The new
        // task starts once that teardown is done, so it cannot undo the new one's routes.
        let moved: Vec<(IpAddr, crate::peer::PeerHandle)> = self
            .registry
            .all()
            .into_iter()
            .filter(|(ip, peer, _)| peer.as_str() == name && *ip != info.ip)
            .map(|(ip, _, handle)| (ip, handle))
            .collect();
        for (old_ip, handle) in moved {
            info!(peer = %name, from = %old_ip, to = %info.ip, "node address changed");
            let (done, torn_down) = tokio::sync::oneshot::channel();
            let remove = PeerCommand::Remove {
                reason: format!("node address changed to {}", info.ip),
                done: Some(done),
            };
            if handle.commands.send(remove).await.is_ok() {
                // Bounded: a task stuck in a handshake must not stall the store watch forever.
                let _ = tokio::time::timeout(Duration::from_secs(30), torn_down).await;
            }
            self.registry.remove(old_ip);
        }
        let ip = info.ip;
        let started = match &self.wireguard {
            Some(wg) => PeerTask::new_wireguard(
                info.clone(),
                self.peer_ctx.clone(),
                wg.handle.clone(),
                &wg.settings,
            )
            .await
            .map(|(task, handle)| {
                self.tracker.spawn(task.run(handle.cancel.clone()));
                handle
            }),
            None => PeerTask::new(info.clone(), self.peer_ctx.clone())
                .await
                .map(|(task, handle)| {
                    self.tracker.spawn(task.run(handle.cancel.clone()));
                    handle
                }),
        };
        match started {
            Ok(handle) => {
                self.registry.insert(ip, info.name.clone(), handle);
                info!(peer = %name, %ip, "peer added");
            }
            Err(e) => warn!(peer = %name, error = %error_chain(&e), "cannot set up peer"),
        }
    }

    /// The store's bundle, if this node may take it: see [`TrustBundle::accept_update`].
    fn accept_bundle(
        &self,
        record: &nodeseal_store::TrustBundle,
    ) -> Result<TrustBundle, nodeseal_keymgr::BundleError> {
        let signature = record.signature.as_deref().and_then(|s| {
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s).ok()
        });
        let signer = record
            .signer_pem
            .as_deref()
            .and_then(|p| nodeseal_keymgr::svid::certs_from_pem(p.as_bytes()).ok())
            .unwrap_or_default();
        self.trust
            .bundle()
            .accept_update(record.bundle.as_bytes(), signature.as_deref(), &signer)
    }

    /// Shown by `nodeseal status`: why the store's bundle was refused.
    fn set_bundle_error(&self, error: Option<String>) {
        if let Ok(mut current) = self.bundle_error.lock() {
            *current = error;
        }
    }

    /// Reads the kernel's XFRM error counters and the datapath's drop counters (non-zero ones)
    /// and puts them into the metrics, which a scrape then shows without a status call.
    fn refresh_counters(&self) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        let xfrm_errors: BTreeMap<String, u64> = XfrmStat::read("/proc/net/xfrm_stat")
            .map(|s| {
                s.counters()
                    .into_iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect()
            })
            .unwrap_or_default();
        let datapath_drops: BTreeMap<String, u64> = self
            .datapath
            .drop_counters()
            .map(|all| {
                all.into_iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(r, v)| (r.as_str().to_owned(), v))
                    .collect()
            })
            .unwrap_or_default();
        for (reason, count) in &datapath_drops {
            self.metrics.set_datapath_drop(reason, *count);
        }
        for (reason, count) in &xfrm_errors {
            self.metrics.set_xfrm_error(reason, *count);
        }
        match self.datapath.policy_verdicts() {
            Ok(counts) => self.metrics.set_policy_verdicts(counts),
            Err(e) => debug!(error = %e, "reading policy verdict counters"),
        }
        (xfrm_errors, datapath_drops)
    }

    /// In WireGuard mode, fills `rows` with what the device holds for each peer's key in use
    /// (latest handshake, endpoint, allowed IPs, bytes) and mirrors that into the metrics.
    async fn refresh_wireguard(&self, rows: &mut [PeerStatus]) {
        let Some(wg) = &self.wireguard else {
            return;
        };
        match wg.read_device().await {
            Ok(device) => {
                for row in rows.iter_mut() {
                    row.fill_from_wireguard(&device);
                }
                self.metrics.set_wireguard_peers(rows, SystemTime::now());
            }
            Err(e) => debug!(error = %error_chain(&e), "reading the WireGuard device"),
        }
    }

    /// Why `cidrs` may not be `name`'s: another peer holds one that overlaps them.
    fn overlapping_peer(&self, name: &str, cidrs: &[IpNet]) -> Option<String> {
        let held = self.peer_cidrs.lock().ok()?;
        held.iter()
            .filter(|(holder, _)| *holder != name)
            .find_map(|(holder, theirs)| {
                cidrs.iter().find_map(|c| {
                    theirs
                        .iter()
                        .find(|t| t.contains(c) || c.contains(*t))
                        .map(|t| {
                            format!("claims pod CIDR {c}, which overlaps {t} of node {holder}")
                        })
                })
            })
    }

    /// Keeps a revoked node's pod CIDRs refused in the datapath (see
    /// [`DatapathHandle::set_revoked`]).
    fn keep_revoked(&self, node: &str, pod_cidrs: &[IpNet]) {
        match self.datapath.set_revoked(node, pod_cidrs) {
            Ok(true) => info!(peer = node, ?pod_cidrs, "revoked node's pod CIDRs refused"),
            Ok(false) => debug!(peer = node, "revoked node's pod CIDRs already refused"),
            Err(e) => {
                warn!(peer = node, error = %error_chain(&e), "cannot refuse a revoked node's pod CIDRs")
            }
        }
    }

    /// A node's record is gone: a revoked node's pod CIDRs become unknown addresses (or go to
    /// the member claiming them). Only here: while the record exists, a revoked node stays
    /// refused, which is the common case after `nodeseal node revoke`.
    fn forget_node(&self, node: &str) {
        if let Ok(mut known) = self.pod_cidrs_of.lock()
            && known.remove(node).is_some()
        {
            self.nodes_changed.notify_one();
        }
        match self.datapath.forget_revoked(node) {
            Ok(true) => info!(
                peer = node,
                "revoked node's record deleted; its pod CIDRs released"
            ),
            Ok(false) => {}
            Err(e) => {
                warn!(peer = node, error = %error_chain(&e), "cannot release a revoked node's pod CIDRs")
            }
        }
    }

    async fn remove_peer_named(&self, name: &str, reason: &str) {
        if let Ok(mut held) = self.peer_cidrs.lock() {
            held.remove(name);
        }
        for (ip, peer, handle) in self.registry.all() {
            if peer.as_str() == name {
                let _ = handle
                    .commands
                    .send(PeerCommand::Remove {
                        reason: reason.to_owned(),
                        done: None,
                    })
                    .await;
                self.registry.remove(ip);
            }
        }
    }
}

/// Peers (by node IP) that already have SAs of ours in the kernel: a previous agent's, which
/// their tasks sweep once traffic has moved to new keys.
async fn leftover_peers(xfrm: &Handle, local: IpAddr) -> std::collections::HashSet<IpAddr> {
    match xfrm.states().dump().execute().await {
        Ok(states) => states
            .iter()
            .filter(|s| crate::peer::ipsec::ownership().owns_state(s))
            .filter_map(|s| s.spec.as_ref())
            .map(|spec| {
                if spec.src == local {
                    spec.dst
                } else {
                    spec.src
                }
            })
            .collect(),
        Err(e) => {
            warn!(error = %error_chain(&e), "cannot read existing SAs; none will be swept");
            std::collections::HashSet::new()
        }
    }
}

/// A node record as a peer, refused when its handshake address is not of this node's family (a
/// pair's tunnel runs between two node IPs of one family) or when it claims this node's own
/// address or pod CIDRs (a peer there would take over local traffic). Its pod CIDRs of both
/// families ride that tunnel.
fn peer_info(record: &NodeRecord, local: &LocalEnd) -> Result<PeerInfo, String> {
    let (local_ip, local_pod_cidrs) = (local.ip, &local.pod_cidrs);
    let local_ips: Vec<IpAddr> = std::iter::once(local.ip).chain(local.second_ip).collect();
    let name = NodeName::new(record.name.as_str()).map_err(|e| e.to_string())?;
    let spiffe_id = SpiffeId::new(record.spiffe_id.as_str()).map_err(|e| e.to_string())?;
    let ip = record.handshake.ip();
    if ip.is_ipv4() != local_ip.is_ipv4() {
        return Err(format!("node IP {ip} is not of this node's family"));
    }
    if ip == local_ip {
        return Err(format!("claims address {ip}, which is this node's"));
    }
    // The first node IP of the other family; further ones (the record allows up to 16) play no
    // part in the fabric.
    let second_ip = record
        .node_ips
        .iter()
        .copied()
        .find(|other| other.is_ipv4() != ip.is_ipv4());
    if let Some(second) = second_ip.filter(|s| local_ips.contains(s)) {
        return Err(format!("claims address {second}, which is this node's"));
    }
    let pod_cidrs = record.pod_cidrs.clone();
    if let Some((theirs, ours)) = pod_cidrs.iter().find_map(|c| {
        local_pod_cidrs
            .iter()
            .find(|l| l.contains(c) || c.contains(*l))
            .map(|l| (c, l))
    }) {
        return Err(format!(
            "claims pod CIDR {theirs}, which overlaps this node's {ours}"
        ));
    }
    Ok(PeerInfo {
        name,
        spiffe_id,
        ip,
        port: record.handshake.port(),
        pod_cidrs,
        second_ip,
    })
}

#[async_trait::async_trait]
impl StatusSource for Agent {
    async fn snapshot(&self) -> NodeView {
        let mut peers: Vec<_> = self
            .registry
            .all()
            .into_iter()
            .filter_map(|(_, _, h)| h.status.lock().ok().map(|s| s.clone()))
            .collect();
        // Traffic counters from the kernel's view of each peer's current states.
        if let Ok(states) = self.xfrm.states().dump().execute().await {
            let by_spi: HashMap<u32, (u64, u64)> = states
                .iter()
                .filter(|s| crate::peer::ipsec::ownership().owns_state(s))
                .map(|s| (s.spi, (s.stats.bytes, s.stats.packets)))
                .collect();
            for p in &mut peers {
                let lookup = |spi: &Option<String>| {
                    spi.as_deref()
                        .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                        .and_then(|spi| by_spi.get(&spi).copied())
                        .unwrap_or_default()
                };
                (p.out_bytes, p.out_packets) = lookup(&p.out_spi);
                (p.in_bytes, p.in_packets) = lookup(&p.in_spi);
            }
        }
        // WireGuard: what the device holds per peer key.
        self.refresh_wireguard(&mut peers).await;
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let (xfrm_errors, datapath_drops) = self.refresh_counters();
        let svid = self.svid.borrow().clone();
        NodeView {
            node: self.node.to_string(),
            mode: match self.config.encryption_type {
                EncryptionType::Ipsec => "ipsec".into(),
                EncryptionType::Wireguard => "wireguard".into(),
            },
            strict: self.config.strict_mode,
            node_encryption: self.config.node_encryption,
            spiffe_id: svid.as_ref().map(|(id, _)| id.to_string()),
            svid_not_after_unix: svid
                .and_then(|(_, t)| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            generation: *self.generation_tx.borrow(),
            peers,
            xfrm_errors,
            datapath_drops,
            unusable_nodes: self
                .unusable_nodes
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            trust_bundle_error: self.bundle_error.lock().ok().and_then(|e| e.clone()),
            wg_public_key: self
                .wireguard
                .as_ref()
                .map(|wg| wg.settings.public_key.to_string()),
            pod_mtu: self.pod_mtu,
            policy: self.policy_view.lock().ok().map(|v| v.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn record(ip: &str, cidr: &str) -> NodeRecord {
        let ip: IpAddr = ip.parse().unwrap();
        NodeRecord {
            name: nodeseal_store::NodeName::new("b").unwrap(),
            node_ips: vec![ip],
            pod_cidrs: vec![cidr.parse().unwrap()],
            spiffe_id: nodeseal_store::SpiffeId::new("spiffe://cluster.local/node/b").unwrap(),
            handshake: std::net::SocketAddr::new(ip, 4250),
            wireguard_public_key: None,
        }
    }

    #[test]
    fn a_peer_may_not_claim_this_nodes_address_or_pod_cidrs() {
        let local = LocalEnd {
            ip: "10.0.0.1".parse().unwrap(),
            pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()],
            second_ip: Some("fd00::1".parse().unwrap()),
        };
        let info = peer_info(&record("10.0.0.2", "10.244.1.0/24"), &local).unwrap();
        assert_eq!(info.ip, "10.0.0.2".parse::<IpAddr>().unwrap());
        let own_ip = peer_info(&record("10.0.0.1", "10.244.1.0/24"), &local).unwrap_err();
        assert!(own_ip.contains("claims address 10.0.0.1"), "{own_ip}");
        let mut second = record("10.0.0.2", "10.244.1.0/24");
        second.node_ips.push("fd00::1".parse().unwrap());
        let own_second = peer_info(&second, &local).unwrap_err();
        assert!(
            own_second.contains("claims address fd00::1"),
            "{own_second}"
        );
        second.node_ips[1] = "fd00::2".parse().unwrap();
        // A third address of either family plays no part.
        second.node_ips.push("fd00::3".parse().unwrap());
        let info = peer_info(&second, &local).unwrap();
        assert_eq!(info.second_ip, Some("fd00::2".parse().unwrap()));
        for claimed in ["10.244.0.0/24", "10.244.0.128/25", "10.244.0.0/16"] {
            let error = peer_info(&record("10.0.0.2", claimed), &local).unwrap_err();
            assert!(
                error.contains(&format!("claims pod CIDR {claimed}")),
                "{error}"
            );
        }
    }

    #[test]
    fn a_dual_stack_peer_brings_both_families_over_one_underlay() {
        let local = LocalEnd {
            ip: "10.0.0.1".parse().unwrap(),
            pod_cidrs: vec![
                "10.244.0.0/24".parse().unwrap(),
                "fd00:10:244::/64".parse().unwrap(),
            ],
            second_ip: None,
        };
        let mut dual = record("10.0.0.2", "10.244.1.0/24");
        dual.pod_cidrs.push("fd00:10:244:1::/64".parse().unwrap());
        let info = peer_info(&dual, &local).unwrap();
        assert_eq!(info.pod_cidrs, dual.pod_cidrs);
        // IPv6 pods over an IPv4 underlay are checked against this node's IPv6 pods too.
        dual.pod_cidrs[1] = "fd00:10:244::/48".parse().unwrap();
        let error = peer_info(&dual, &local).unwrap_err();
        assert!(
            error.contains("overlaps this node's fd00:10:244::/64"),
            "{error}"
        );
        // A pair's tunnel is between node IPs of one family.
        let other = peer_info(&record("fd00::2", "10.244.1.0/24"), &local).unwrap_err();
        assert!(other.contains("not of this node's family"), "{other}");
    }
}
