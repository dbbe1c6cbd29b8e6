//! One task per peer node: handshakes, the make-before-break SA lifecycle, rekeys and teardown.
//!
//! A rekey (also the first key agreement) goes:
//! 1. mutual TLS 1.3 handshake and Hellos (`keymgr`), which yields the SPIs and keys;
//! 2. install the new IN state, the new OUT state and its OUT policies under a fresh key slot;
//! 3. `Installed` exchange: each side has its IN state before the other sends with the new key;
//! 4. flip the peer's key slot in the eBPF map: one write, traffic moves to the new SA at once;
//! 5. after the grace period, delete the previous epoch's states and policies.
//!
//! The lower node name is the preferred initiator; the other side initiates too when it needs
//! keys and none arrive within [`RESPONDER_PATIENCE`]. When both connect at once, the handshake
//! initiated by the lower name wins ([`nodeseal_keymgr::handshake::keep_initiated_by`]).
//!
//! The task owns its peer's kernel state: on revocation or removal it deletes exactly that
//! peer's states and policies (identified by our reqid and the peer's node IP) and forgets the
//! peer in the eBPF maps. Cancellation by agent shutdown leaves everything in place, so traffic
//! keeps flowing across a restart.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use nodeseal_bpf::NodeId;
use nodeseal_keymgr::handshake::{self, Agreement, HandshakeConfig, Incoming};
use nodeseal_keymgr::{
    Aead as KeyAead, ClaimsError, Epoch, HandshakeError, Hello, Mode, NodeClaims, NodeName,
    RejectReason, SpiffeId,
};
use nodeseal_xfrm::{Handle, KernelPolicy, KernelState, Spi};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::datapath::DatapathHandle;
use crate::metrics::Metrics;
use crate::pace::Pace;
use crate::sa::{self, EpochSas, KeySlot, LocalEnd, PeerEnd, SaLimits};

/// How long the non-preferred initiator waits for the peer to start a needed handshake.
pub const RESPONDER_PATIENCE: Duration = Duration::from_secs(2);
/// Outgoing handshakes one node runs at once.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 32;
/// First retry delay after a failure; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the agent knows about a peer from the cluster store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Node name.
    pub name: NodeName,
    /// The SPIFFE ID the store lists for it.
    pub spiffe_id: SpiffeId,
    /// Node IP (tunnel endpoint, handshake address).
    pub ip: IpAddr,
    /// Handshake port.
    pub port: u16,
    /// Pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
}

/// Settings every peer task shares.
#[derive(Clone, Debug)]
pub struct PeerSettings {
    /// This node's tunnel end.
    pub local: LocalEnd,
    /// Rekey this often (initiator side).
    pub rekey_interval: Duration,
    /// Keep the previous epoch's SAs this long after a flip.
    pub grace: Duration,
    /// Remove a peer's SAs when no handshake succeeded for this long.
    pub retention: Duration,
    /// Strict mode.
    pub strict: bool,
    /// What one SA may carry before it is rekeyed (soft) and deleted (hard).
    pub sa_limits: SaLimits,
    /// Refuse peers whose SVID binds no node IPs and pod CIDRs (every issuer but an external
    /// PKI's binds them).
    pub require_claims: bool,
}

/// Commands to a peer task.
#[derive(Debug)]
pub enum PeerCommand {
    /// A verified handshake from the peer waits for our Hello.
    Incoming(Box<Incoming<TcpStream>>),
    /// Rekey now (rotation request of `generation`).
    Rekey {
        /// The cluster rekey generation asked for.
        generation: u64,
    },
    /// The store's view of the peer changed (pod CIDRs, IP, port).
    Update(PeerInfo),
    /// The peer was revoked or removed: tear everything down and stop.
    Remove {
        /// Why (for logs and status).
        reason: String,
        /// Told once the teardown is done (a successor at a new address waits for it: its
        /// routes and policies have the same selectors as the ones torn down).
        done: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// The kernel reported that a state with the peer crossed its usage limit.
    SaExpired {
        /// The state's SPI.
        spi: u32,
        /// Hard limit: the kernel deleted the state. Soft: rekey before it does.
        hard: bool,
    },
    /// A handshake from the peer's address failed before it reached us (recorded in status).
    HandshakeFailed {
        /// The error.
        error: String,
    },
}

/// Life-cycle state shown in `nodeseal status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// No keys yet.
    Connecting,
    /// Keys installed and in use.
    Established,
    /// The last handshake failed; retrying with backoff.
    Failed,
    /// Revoked or removed.
    Removed,
}

/// One row of `nodeseal status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Peer node name.
    pub name: String,
    /// Peer node IP.
    pub ip: IpAddr,
    /// Local node id of the peer.
    pub node_id: u16,
    /// State.
    pub state: PeerState,
    /// Current epoch.
    pub epoch: Option<u64>,
    /// The rekey generation of the current epoch (`keys rotate` target).
    pub generation: Option<u64>,
    /// Key slot in use.
    pub slot: Option<u8>,
    /// SPI of the OUT SA.
    pub out_spi: Option<String>,
    /// SPI of the IN SA.
    pub in_spi: Option<String>,
    /// When the current keys were installed (Unix seconds).
    pub last_rekey_unix: Option<u64>,
    /// Successful key agreements.
    pub rekeys: u64,
    /// Failed handshakes.
    pub failures: u64,
    /// The last error.
    pub last_error: Option<String>,
    /// Bytes / packets through the current OUT and IN states (filled when status is read).
    pub out_bytes: u64,
    /// Packets out.
    pub out_packets: u64,
    /// Bytes in.
    pub in_bytes: u64,
    /// Packets in.
    pub in_packets: u64,
}

impl PeerStatus {
    /// A peer without keys yet.
    #[must_use]
    pub fn connecting(name: &NodeName, ip: IpAddr, node_id: NodeId) -> Self {
        Self {
            name: name.to_string(),
            ip,
            node_id: node_id.0,
            state: PeerState::Connecting,
            epoch: None,
            generation: None,
            slot: None,
            out_spi: None,
            in_spi: None,
            last_rekey_unix: None,
            rekeys: 0,
            failures: 0,
            last_error: None,
            out_bytes: 0,
            out_packets: 0,
            in_bytes: 0,
            in_packets: 0,
        }
    }
}

/// Handle to a running peer task.
#[derive(Debug, Clone)]
pub struct PeerHandle {
    /// Command channel.
    pub commands: mpsc::Sender<PeerCommand>,
    /// Live status.
    pub status: Arc<Mutex<PeerStatus>>,
    /// Cancels the task without touching kernel state (shutdown).
    pub cancel: CancellationToken,
}

/// An epoch installed in the kernel.
#[derive(Debug)]
struct Installed {
    epoch: Epoch,
    sas: EpochSas,
}

/// The peer task's state.
pub struct PeerTask {
    info: PeerInfo,
    /// A changed record that the peer's last verified certificate does not admit: it takes
    /// effect only at a handshake whose certificate does (the peer may have been re-certified).
    proposed: Option<PeerInfo>,
    /// What the peer's certificate admitted at the last handshake.
    admitted: Option<NodeClaims>,
    node_id: NodeId,
    settings: PeerSettings,
    xfrm: Handle,
    datapath: DatapathHandle,
    handshake: watch::Receiver<Option<HandshakeConfig>>,
    generation: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<PeerStatus>>,
    current: Option<Installed>,
    retiring: Vec<(Installed, Instant)>,
    next_slot: KeySlot,
    policies_installed: bool,
    backoff: Duration,
    next_attempt: Option<Instant>,
    last_success: Option<Instant>,
    /// Since when handshakes with an established peer fail (the retention clock).
    unreachable_since: Option<Instant>,
    /// When the current keys are due for their periodic rekey.
    rekey_due: Option<Instant>,
    commands: mpsc::Receiver<PeerCommand>,
    /// Commands that arrived while a handshake was running, handled right after it.
    deferred: std::collections::VecDeque<PeerCommand>,
    handshake_permits: Arc<tokio::sync::Semaphore>,
    pace: Arc<Pace>,
    /// Whether a previous agent left SAs for this peer, to be swept after our first flip.
    has_leftovers: bool,
    /// When to delete objects of this peer that a previous agent left (after the first flip).
    sweep_at: Option<Instant>,
}

/// Shared resources for building peer tasks.
#[derive(Clone)]
pub struct PeerContext {
    /// Settings.
    pub settings: PeerSettings,
    /// XFRM handle.
    pub xfrm: Handle,
    /// eBPF maps.
    pub datapath: DatapathHandle,
    /// The current handshake config (None until the node has its SVID).
    pub handshake: watch::Receiver<Option<HandshakeConfig>>,
    /// Cluster rekey generation.
    pub generation: watch::Receiver<u64>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The agent's root token; each peer task gets a child, so that revoking a peer cancels
    /// exactly that task and shutdown cancels them all.
    pub cancel: CancellationToken,
    /// Node-wide bound on concurrent outgoing handshakes.
    pub handshake_permits: Arc<tokio::sync::Semaphore>,
    /// Node-wide handshake limits, following the measured speed.
    pub pace: Arc<Pace>,
    /// Peers a previous agent left SAs for (found at start-up): only their tasks sweep.
    pub leftover_peers: Arc<std::collections::HashSet<IpAddr>>,
}

/// Errors inside one key agreement attempt.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The node has no SVID yet.
    #[error("no node identity yet")]
    NoIdentity,
    /// Connecting failed.
    #[error("connecting to {addr}")]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed.
    #[error("handshake")]
    Handshake(#[from] nodeseal_keymgr::HandshakeError),
    /// It took too long.
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The peer accepted the connection but the handshake did not complete in time: this
    /// node's handshakes are slower than its limit (see [`Pace`]).
    #[error("handshake did not complete within {0:?} of connecting")]
    SlowHandshake(Duration),
    /// The peer announced something that contradicts the store.
    #[error("peer announced {what}")]
    Contradiction {
        /// What.
        what: String,
    },
    /// The peer's record claims a node IP or pod CIDR its certificate does not admit.
    #[error("the peer's record claims what its certificate does not admit: {0}")]
    NotAdmitted(String),
    /// Building SA specs failed (bad key length or address family mix).
    #[error("building SAs")]
    Spec(#[from] nodeseal_xfrm::SpecError),
    /// Programming the kernel failed.
    #[error("programming XFRM")]
    Xfrm(#[from] nodeseal_xfrm::XfrmError),
    /// Updating the eBPF maps failed.
    #[error("updating the eBPF maps")]
    Datapath(#[from] crate::datapath::DatapathError),
    /// The wire SPI could not be used as an XFRM SPI.
    #[error("SPI {0} is not usable")]
    BadSpi(u32),
}

/// What a handshake in progress was interrupted by.
enum Either<T> {
    Done(T),
    Command(Option<PeerCommand>),
}

/// Renders an error with its sources, for status and logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The generation an epoch belongs to: epochs are `generation << 32 | counter`.
#[must_use]
pub fn generation_of(epoch: Epoch) -> u64 {
    epoch.0 >> 32
}

impl PeerTask {
    /// Prepares the task for `info`: allocates the node id, publishes the peer's pod CIDRs to the
    /// datapath (strict mode drops traffic to them until keys exist) and, in strict mode, the
    /// peer's IN/FWD/block policies.
    ///
    /// # Errors
    /// [`PeerError`] from the datapath or XFRM.
    pub async fn new(info: PeerInfo, ctx: PeerContext) -> Result<(Self, PeerHandle), PeerError> {
        let node_id = ctx.datapath.node_id(info.ip)?;
        ctx.datapath.set_peer_routes(node_id, &info.pod_cidrs)?;
        // After a restart the previous agent's slot is still live; the next one must differ.
        let live_slot = ctx.datapath.slot(node_id)?;
        let next_slot = live_slot.map_or(KeySlot::FIRST, KeySlot::next);
        let mut status = PeerStatus::connecting(&info.name, info.ip, node_id);
        status.slot = live_slot.map(KeySlot::get);
        let status = Arc::new(Mutex::new(status));
        let (tx, rx) = mpsc::channel(64);
        let cancel = ctx.cancel.child_token();
        let info_ip = info.ip;
        // A little jitter, so that a node meeting many peers at once spreads its first
        // handshakes.
        let first_attempt =
            Instant::now() + Duration::from_millis(rand::rng().random_range(0..250));
        let mut task = Self {
            info,
            proposed: None,
            admitted: None,
            node_id,
            settings: ctx.settings,
            xfrm: ctx.xfrm,
            datapath: ctx.datapath,
            handshake: ctx.handshake,
            generation: ctx.generation,
            metrics: ctx.metrics,
            status: Arc::clone(&status),
            current: None,
            retiring: Vec::new(),
            next_slot,
            policies_installed: false,
            backoff: FIRST_BACKOFF,
            next_attempt: Some(first_attempt),
            last_success: None,
            unreachable_since: None,
            rekey_due: None,
            commands: rx,
            deferred: std::collections::VecDeque::new(),
            has_leftovers: ctx.leftover_peers.contains(&info_ip),
            handshake_permits: ctx.handshake_permits,
            pace: ctx.pace,
            sweep_at: None,
        };
        if task.settings.strict {
            task.install_peer_policies().await?;
        }
        Ok((
            task,
            PeerHandle {
                commands: tx,
                status,
                cancel,
            },
        ))
    }

    fn peer_end(&self) -> PeerEnd {
        PeerEnd {
            node_id: self.node_id,
            ip: self.info.ip,
            pod_cidrs: self.info.pod_cidrs.clone(),
        }
    }

    fn preferred_initiator(&self) -> bool {
        let local = self
            .handshake
            .borrow()
            .as_ref()
            .map(|c| c.local_node().clone());
        local.is_some_and(|l| handshake::is_initiator(&l, &self.info.name))
    }

    async fn install_peer_policies(&mut self) -> Result<(), PeerError> {
        let policies =
            sa::peer_policies(&self.settings.local, &self.peer_end(), self.settings.strict)?;
        let mut batch = self.xfrm.batch();
        for p in policies {
            batch = batch.update_policy(p);
        }
        batch.execute().await?;
        self.policies_installed = true;
        Ok(())
    }

    /// Runs until cancelled (shutdown: kernel state stays) or told to remove the peer.
    pub async fn run(mut self, cancel: CancellationToken) {
        let span = info_span!("peer", peer = %self.info.name, ip = %self.info.ip);
        async move {
            loop {
                if let Some(cmd) = self.deferred.pop_front() {
                    if self.handle(cmd).await {
                        return;
                    }
                    continue;
                }
                let wake = self.next_wake();
                tokio::select! {
                    () = cancel.cancelled() => return,
                    cmd = self.commands.recv() => match cmd {
                        None => return,
                        Some(cmd) => {
                            if self.handle(cmd).await {
                                return;
                            }
                        }
                    },
                    () = sleep_until(wake) => self.on_timer().await,
                    changed = self.generation.changed() => {
                        if changed.is_ok() {
                            let wanted = *self.generation.borrow_and_update();
                            self.on_generation(wanted);
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }

    fn next_wake(&self) -> Option<Instant> {
        let retire = self.retiring.iter().map(|(_, at)| *at).min();
        let expire = self
            .unreachable_since
            .filter(|_| self.current.is_some())
            .map(|since| since + self.settings.retention);
        [self.next_attempt, retire, self.sweep_at, expire]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether a handshake is due: no keys, keys of an older rotation generation, or the
    /// periodic rekey.
    fn needs_handshake(&self) -> bool {
        let wanted = *self.generation.borrow();
        match &self.current {
            None => true,
            Some(c) => {
                generation_of(c.epoch) < wanted
                    || self.rekey_due.is_some_and(|t| t <= Instant::now())
            }
        }
    }

    fn on_generation(&mut self, wanted: u64) {
        let have = self.current.as_ref().map(|c| generation_of(c.epoch));
        if have.is_some_and(|g| g >= wanted) {
            return;
        }
        let delay = if self.preferred_initiator() {
            Duration::ZERO
        } else {
            RESPONDER_PATIENCE
        };
        self.schedule(Instant::now() + delay);
    }

    fn schedule(&mut self, at: Instant) {
        self.next_attempt = Some(self.next_attempt.map_or(at, |t| t.min(at)));
    }

    /// Handles one command; returns whether the task must stop.
    async fn handle(&mut self, cmd: PeerCommand) -> bool {
        match cmd {
            PeerCommand::Remove { reason, done } => {
                self.teardown(&reason).await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return true;
            }
            // Boxed: handshake futures are large; see `attempt`.
            PeerCommand::Incoming(incoming) => Box::pin(self.respond(*incoming)).await,
            PeerCommand::Rekey { generation } => self.on_generation(generation),
            PeerCommand::Update(info) => {
                let refused = self
                    .admitted
                    .as_ref()
                    .and_then(|a| a.cover(info.ip, &info.pod_cidrs).err());
                if let Some(e) = refused {
                    // Routes follow only what a certificate admitted; ask the peer for a
                    // handshake in case it was re-certified for the new claims.
                    warn!(peer = %info.name, reason = %e, "peer record change not admitted");
                    self.record_failure(PeerError::NotAdmitted(e.to_string()).to_string());
                    self.proposed = Some(info);
                    self.schedule(Instant::now());
                } else if info.pod_cidrs != self.info.pod_cidrs || info.ip != self.info.ip {
                    self.proposed = None;
                    // A changed address plan needs new selectors: rebuild on the next handshake.
                    info!(peer = %info.name, "peer record changed; rekeying");
                    self.info = info;
                    if let Err(e) = self
                        .datapath
                        .set_peer_routes(self.node_id, &self.info.pod_cidrs)
                    {
                        warn!(error = %error_chain(&e), "cannot update peer routes");
                    }
                    self.schedule(Instant::now());
                } else {
                    self.info = info;
                }
            }
            PeerCommand::SaExpired { spi, hard } => self.on_expire(spi, hard),
            PeerCommand::HandshakeFailed { error } => self.record_failure(error),
        }
        false
    }

    /// A state crossed its soft limit (rekey now) or its hard limit (the kernel deleted it: the
    /// peer's traffic waits for new keys). Only the current epoch's states matter; older ones
    /// are retiring anyway.
    fn on_expire(&mut self, spi: u32, hard: bool) {
        let Some(current) = &self.current else {
            return;
        };
        if ![current.sas.outbound.spi, current.sas.inbound.spi]
            .iter()
            .any(|s| s.get() == spi)
        {
            return;
        }
        info!(
            spi = format_args!("{spi:#010x}"),
            hard, "SA reached its usage limit; rekeying"
        );
        self.rekey_due = Some(Instant::now());
        // Both ends see the limit at about the same packet; as with a rotation the preferred
        // initiator starts and the other steps in only if it does not. Past the hard limit
        // there is nothing to wait for.
        let delay = if hard || self.preferred_initiator() {
            Duration::ZERO
        } else {
            RESPONDER_PATIENCE
        };
        self.schedule(Instant::now() + delay);
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some(pos) = self.retiring.iter().position(|(_, at)| *at <= now) {
            due.push(self.retiring.swap_remove(pos).0);
        }
        for old in due {
            self.remove_epoch(&old).await;
        }
        if self.sweep_at.is_some_and(|t| t <= now) {
            self.sweep_at = None;
            self.sweep_stale().await;
        }
        if self.next_attempt.is_some_and(|t| t <= now) {
            self.next_attempt = None;
            Box::pin(self.attempt()).await;
        }
        self.expire_if_unreachable().await;
    }

    /// When handshakes with the peer have failed for `retention`, its SAs are removed: a peer
    /// that cannot prove its identity any more loses its keys, and strict mode drops its traffic
    /// from then on.
    async fn expire_if_unreachable(&mut self) {
        let Some(since) = self.unreachable_since else {
            return;
        };
        if self.current.is_none() || since.elapsed() < self.settings.retention {
            return;
        }
        warn!(retention = ?self.settings.retention, "peer unreachable for too long; removing its SAs");
        if let Err(e) = self.datapath.set_slot(self.node_id, None) {
            warn!(error = %error_chain(&e), "cannot clear peer slot");
        }
        if let Some(cur) = self.current.take() {
            self.remove_epoch(&cur).await;
        }
        self.set_state(
            PeerState::Failed,
            Some("peer unreachable; SAs removed".into()),
        );
    }

    /// Initiates a key agreement if one is due. While the TLS handshake runs, commands keep
    /// arriving: a handshake the peer initiated at the same time is resolved in favour of the
    /// lower node name (ours: the peer's is refused with `Collision`; theirs: ours is abandoned
    /// and theirs answered), everything else waits until the handshake is over.
    async fn attempt(&mut self) {
        if !self.needs_handshake() {
            return;
        }
        let Some(config) = self.handshake.borrow().clone() else {
            self.schedule(Instant::now() + Duration::from_secs(1));
            return;
        };
        let generation = *self.generation.borrow();
        let epoch = self.next_epoch(generation);
        let started = Instant::now();
        let hello = match self.hello(&config, epoch, self.fresh_spi()) {
            Ok(h) => h,
            Err(e) => return self.on_failure(&e),
        };
        let we_win = handshake::keep_initiated_by(config.local_node(), &self.info.name)
            == config.local_node();
        let addr = SocketAddr::new(self.info.ip, self.info.port);
        let peer = self.info.name.clone();
        let permits = Arc::clone(&self.handshake_permits);
        let limit = self.pace.handshake_timeout();
        // Boxed: the TLS state machine is large, and inlined it would make every idle peer
        // task (one per node in the cluster) as big as a handshake in progress.
        let mut tls = Box::pin(async move {
            // Bounded concurrency: a node meeting 1000 peers at once must not start 1000 TLS
            // handshakes that all run out of time. The timeout starts with the permit.
            let _permit = permits.acquire_owned().await;
            let began = Instant::now();
            let stream = match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(source)) => return (began, Err(PeerError::Connect { addr, source })),
                Err(_) => return (began, Err(PeerError::Timeout(limit))),
            };
            let _ = stream.set_nodelay(true);
            let rest = limit.saturating_sub(began.elapsed());
            let agreement =
                tokio::time::timeout(rest, handshake::initiate(&config, stream, &peer, hello))
                    .await
                    .map_or(Err(PeerError::SlowHandshake(limit)), |r| {
                        r.map_err(PeerError::from)
                    });
            (began, agreement)
        });
        let (began, agreement) = loop {
            let event = tokio::select! {
                r = &mut tls => Either::Done(r),
                cmd = self.commands.recv() => Either::Command(cmd),
            };
            match event {
                Either::Done(r) => break r,
                Either::Command(Some(PeerCommand::Incoming(incoming))) if we_win => {
                    debug!("simultaneous handshake: ours wins");
                    let _ = incoming.reject(RejectReason::Collision).await;
                }
                Either::Command(Some(PeerCommand::Incoming(incoming))) => {
                    debug!("simultaneous handshake: the peer's wins; answering it");
                    self.deferred.push_front(PeerCommand::Incoming(incoming));
                    return;
                }
                Either::Command(Some(other)) => self.deferred.push_back(other),
                Either::Command(None) => return,
            }
        };
        let result = match agreement {
            Ok(agreement) => {
                self.metrics.handshake("initiated");
                self.install(agreement).await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.pace.succeeded(began.elapsed());
                self.on_success(started);
            }
            // Our handshake lost a collision: the winning one is on its way to us.
            Err(PeerError::Handshake(HandshakeError::Rejected {
                reason: RejectReason::Collision,
            })) => debug!("our handshake lost a collision; waiting for the peer's"),
            Err(e) => {
                if matches!(e, PeerError::SlowHandshake(_)) {
                    self.pace.timed_out();
                }
                self.on_failure(&e);
            }
        }
    }

    fn next_epoch(&self, generation: u64) -> Epoch {
        let counter = self.current.as_ref().map_or(0, |c| {
            if generation_of(c.epoch) == generation {
                (c.epoch.0 & 0xffff_ffff) + 1
            } else {
                0
            }
        });
        // A restarted agent does not know the last counter; time keeps it increasing.
        let clock = unix_now() & 0xffff_ffff;
        Epoch(
            (generation.max(self.current.as_ref().map_or(0, |c| generation_of(c.epoch))) << 32)
                | counter.max(clock),
        )
    }

    fn hello(&self, config: &HandshakeConfig, epoch: Epoch, spi: u32) -> Result<Hello, PeerError> {
        let spi = nodeseal_keymgr::Spi::new(spi).map_err(|_| PeerError::BadSpi(spi))?;
        Ok(
            Hello::new(config.local_node().clone(), epoch, spi, Mode::Ipsec)
                .with_node_ips(vec![self.settings.local.ip])
                .with_pod_cidrs(self.settings.local.pod_cidrs.clone()),
        )
    }

    async fn respond(&mut self, incoming: Incoming<TcpStream>) {
        let Some(config) = self.handshake.borrow().clone() else {
            let _ = incoming.reject(RejectReason::Unavailable).await;
            return;
        };
        let epoch = incoming.peer_hello().epoch;
        let started = Instant::now();
        let answer = Box::pin(async {
            let hello = self.hello(&config, epoch, self.fresh_spi())?;
            Ok::<_, PeerError>(incoming.respond(hello).await?)
        });
        // The answering side allows the most any initiator waits (see `Pace`).
        let limit = Pace::MAX;
        let result = match tokio::time::timeout(limit, answer).await {
            Ok(Ok(agreement)) => {
                self.metrics.handshake("accepted");
                self.install(agreement).await
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PeerError::Timeout(limit)),
        };
        match result {
            Ok(()) => self.on_success(started),
            Err(e) => self.on_failure(&e),
        }
    }

    fn fresh_spi(&self) -> u32 {
        let mut rng = rand::rng();
        loop {
            let spi: u32 = rng.random();
            let in_use = self.installed().any(|i| i.sas.inbound.spi.get() == spi);
            if spi > 0xffff && !in_use {
                return spi;
            }
        }
    }

    /// Steps 2-5 of a rekey, given an agreement.
    async fn install(&mut self, mut agreement: Agreement<TcpStream>) -> Result<(), PeerError> {
        self.admit(&agreement)?;
        let hello = &agreement.peer_hello;
        if !handshake::hello_lists_ip(hello, self.info.ip) {
            return Err(PeerError::Contradiction {
                what: format!(
                    "node IPs {:?}, but the store lists {}",
                    hello.node_ips, self.info.ip
                ),
            });
        }
        if agreement.peer.spiffe_id != self.info.spiffe_id {
            return Err(PeerError::Contradiction {
                what: format!(
                    "identity {}, but the store lists {}",
                    agreement.peer.spiffe_id, self.info.spiffe_id
                ),
            });
        }
        if let Some(cidr) = self
            .info
            .pod_cidrs
            .iter()
            .find(|c| !hello.pod_cidrs.contains(c))
        {
            return Err(PeerError::Contradiction {
                what: format!(
                    "pod CIDRs {:?}, but the store lists {cidr} for it",
                    hello.pod_cidrs
                ),
            });
        }
        let keys = &agreement.keys;
        let out_spi = xfrm_spi(keys.outbound.spi.get())?;
        let in_spi = xfrm_spi(keys.inbound.spi.get())?;
        let slot = self.next_slot;
        let sas = EpochSas::new(
            &self.settings.local,
            &self.peer_end(),
            slot,
            (out_spi, keys.outbound.key(KeyAead::Aes128Gcm).rfc4106_key()),
            (in_spi, keys.inbound.key(KeyAead::Aes128Gcm).rfc4106_key()),
            self.settings.sa_limits,
        )?;
        let epoch = keys.epoch;
        let out_policies = sas.out_policies(&self.settings.local, &self.peer_end())?;
        let mut batch = self
            .xfrm
            .batch()
            .add_state(sas.inbound.clone())
            .add_state(sas.outbound.clone());
        for p in &out_policies {
            batch = batch.update_policy(p.clone());
        }
        batch.execute().await?;
        if !self.policies_installed {
            self.install_peer_policies().await?;
        }
        let installed = Installed { epoch, sas };
        // Not cancellable from outside once SAs are in the kernel: on any failure, including the
        // peer going quiet, the new epoch's SAs are removed again before returning.
        let confirm = self.pace.confirm_timeout();
        let confirmed =
            tokio::time::timeout(confirm, agreement.channel.confirm_installed(epoch)).await;
        let failure = match confirmed {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(PeerError::from(e)),
            Err(_) => Some(PeerError::Timeout(confirm)),
        };
        if let Some(e) = failure {
            self.remove_epoch(&installed).await;
            return Err(e);
        }
        let _ = agreement.channel.close().await;
        // ESP from the peer is accepted from now on.
        self.datapath.admit_node(self.node_id, self.info.ip)?;
        self.datapath.set_slot(self.node_id, Some(slot))?;
        self.next_slot = slot.next();
        info!(epoch = epoch.0, slot = %slot, out_spi = %out_spi, in_spi = %in_spi, "keys installed and in use");
        if let Some(previous) = self.current.replace(installed) {
            self.retiring
                .push((previous, Instant::now() + self.settings.grace));
        }
        Ok(())
    }

    /// Authenticated is not authorized: the node's record (written by the node itself) may claim
    /// only what its certificate's issuer admitted for it. A proposed record change the
    /// certificate admits takes effect here.
    fn admit(&mut self, agreement: &Agreement<TcpStream>) -> Result<(), PeerError> {
        let candidate = self.proposed.as_ref().unwrap_or(&self.info);
        match &agreement.peer.claims {
            Some(admitted) => admitted
                .cover(candidate.ip, &candidate.pod_cidrs)
                .map_err(|e| PeerError::NotAdmitted(e.to_string()))?,
            None if self.settings.require_claims => {
                return Err(PeerError::NotAdmitted(ClaimsError::Unbound.to_string()));
            }
            None => {}
        }
        self.admitted.clone_from(&agreement.peer.claims);
        if let Some(proposed) = self.proposed.take() {
            self.datapath
                .set_peer_routes(self.node_id, &proposed.pod_cidrs)?;
            self.info = proposed;
        }
        Ok(())
    }

    async fn remove_epoch(&self, old: &Installed) {
        let mut batch = self
            .xfrm
            .batch()
            .delete_state(old.sas.inbound.id())
            .delete_state(old.sas.outbound.id());
        let slot_in_use = self
            .current
            .as_ref()
            .is_some_and(|c| c.sas.slot == old.sas.slot);
        if !slot_in_use {
            match old.sas.out_policies(&self.settings.local, &self.peer_end()) {
                Ok(policies) => {
                    for p in policies {
                        batch = batch.delete_policy(p.id());
                    }
                }
                Err(e) => warn!(error = %error_chain(&e), "cannot rebuild old OUT policies"),
            }
        }
        match batch.execute().await {
            Ok(()) => debug!(epoch = old.epoch.0, "previous epoch removed"),
            Err(e) => {
                warn!(epoch = old.epoch.0, error = %error_chain(&e), "removing previous epoch")
            }
        }
    }

    /// Deletes this peer's objects that are neither current nor retiring: what a previous agent
    /// installed before a restart, once traffic has moved to our keys.
    async fn sweep_stale(&self) {
        let keep_states: Vec<_> = self
            .installed()
            .flat_map(|i| [i.sas.inbound.id(), i.sas.outbound.id()])
            .collect();
        let keep_slots: Vec<KeySlot> = self.installed().map(|i| i.sas.slot).collect();
        let peer = self.info.ip;
        let result = async {
            let states = self.xfrm.states().dump().execute().await?;
            let policies = self.xfrm.policies().dump().execute().await?;
            let mut batch = self.xfrm.batch();
            for spec in states
                .iter()
                .filter(|s| state_of_peer(s, peer))
                .filter_map(|s| s.spec.as_ref())
            {
                if !keep_states.contains(&spec.id()) {
                    batch = batch.delete_state(spec.id());
                }
            }
            for spec in policies
                .iter()
                .filter(|p| policy_of_peer(p, peer))
                .filter_map(|p| p.spec.as_ref())
            {
                // Only OUT policies of slots no longer in use are stale; IN/FWD/block are shared.
                let stale_slot = spec.dir == nodeseal_xfrm::Direction::Out
                    && !spec.mark.is_none()
                    && !keep_slots
                        .iter()
                        .any(|slot| sa::encrypt_mark(self.node_id, *slot) == spec.mark);
                if stale_slot {
                    batch = batch.delete_policy(spec.id());
                }
            }
            let n = batch.len();
            if n > 0 {
                batch.execute().await?;
            }
            Ok::<usize, nodeseal_xfrm::XfrmError>(n)
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => info!(objects = n, "removed SAs left by a previous agent"),
            Err(e) => warn!(error = %error_chain(&e), "sweeping stale SAs"),
        }
    }

    fn installed(&self) -> impl Iterator<Item = &Installed> {
        self.current
            .iter()
            .chain(self.retiring.iter().map(|(i, _)| i))
    }

    fn on_success(&mut self, started: Instant) {
        self.metrics.rekey_done(started.elapsed());
        self.backoff = FIRST_BACKOFF;
        if self.last_success.is_none() && self.has_leftovers {
            self.sweep_at = Some(Instant::now() + self.settings.grace);
        }
        self.last_success = Some(Instant::now());
        self.unreachable_since = None;
        // The preferred initiator keeps the rekey clock; the other side steps in only if it
        // does not.
        let interval = if self.preferred_initiator() {
            jitter(self.settings.rekey_interval)
        } else {
            self.settings.rekey_interval.mul_f64(1.25)
        };
        let due = Instant::now() + interval;
        self.rekey_due = Some(due);
        self.schedule(due);
        let wanted = *self.generation.borrow();
        self.on_generation(wanted);
        if let Ok(mut s) = self.status.lock() {
            let cur = self.current.as_ref();
            s.state = PeerState::Established;
            s.epoch = cur.map(|c| c.epoch.0);
            s.generation = cur.map(|c| generation_of(c.epoch));
            s.slot = cur.map(|c| c.sas.slot.get());
            s.out_spi = cur.map(|c| c.sas.outbound.spi.to_string());
            s.in_spi = cur.map(|c| c.sas.inbound.spi.to_string());
            s.last_rekey_unix = Some(unix_now());
            // Failures before this success stay counted in `failures`; the row shows no stale error.
            s.last_error = None;
            s.rekeys += 1;
        }
    }

    fn on_failure(&mut self, err: &PeerError) {
        let text = error_chain(err);
        warn!(error = %text, "key agreement failed");
        self.metrics.handshake("failed");
        self.record_failure(text);
        if self.current.is_some() && self.unreachable_since.is_none() {
            self.unreachable_since = Some(Instant::now());
        }
        self.schedule(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn record_failure(&mut self, error: String) {
        if let Ok(mut s) = self.status.lock() {
            s.failures += 1;
            s.last_error = Some(error);
            if self.current.is_none() {
                s.state = PeerState::Failed;
            }
        }
    }

    fn set_state(&self, state: PeerState, error: Option<String>) {
        if let Ok(mut s) = self.status.lock() {
            s.state = state;
            if error.is_some() {
                s.last_error = error;
            }
            if state != PeerState::Established {
                s.epoch = None;
                s.slot = None;
                s.out_spi = None;
                s.in_spi = None;
            }
        }
    }

    /// Deletes every state and policy of ours that belongs to this peer (by its node IP), also
    /// ones a previous agent left, and forgets the peer in the eBPF maps.
    async fn teardown(&mut self, reason: &str) {
        info!(reason, "removing peer");
        if let Err(e) = self
            .datapath
            .remove_peer(self.node_id, self.info.ip, &self.info.pod_cidrs)
        {
            warn!(error = %error_chain(&e), "cannot remove peer from the eBPF maps");
        }
        match remove_owned_for(&self.xfrm, self.info.ip).await {
            Ok(n) => info!(objects = n, "peer's XFRM objects removed"),
            Err(e) => warn!(error = %error_chain(&e), "cannot remove the peer's XFRM objects"),
        }
        self.current = None;
        self.retiring.clear();
        self.set_state(PeerState::Removed, Some(reason.to_owned()));
    }
}

fn xfrm_spi(raw: u32) -> Result<Spi, PeerError> {
    Spi::new(raw).map_err(|_| PeerError::BadSpi(raw))
}

/// ±10% so that a cluster's rekeys spread out.
fn jitter(base: Duration) -> Duration {
    let factor = rand::rng().random_range(0.9..1.1);
    base.mul_f64(factor)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Whether a kernel state is ours and belongs to the tunnel with `peer`.
pub fn state_of_peer(s: &KernelState, peer: IpAddr) -> bool {
    sa::ownership().owns_state(s)
        && s.spec
            .as_ref()
            .is_some_and(|spec| spec.src == peer || spec.dst == peer)
}

/// Whether a kernel policy is ours and belongs to the tunnel with `peer`.
pub fn policy_of_peer(p: &KernelPolicy, peer: IpAddr) -> bool {
    sa::ownership().owns_policy(p)
        && p.spec.as_ref().is_some_and(|spec| {
            spec.templates
                .iter()
                .any(|t| t.src == peer || t.dst == peer)
        })
}

/// Deletes all of our states and policies of the tunnel with `peer`.
///
/// # Errors
/// [`nodeseal_xfrm::XfrmError`] from the dump or the batch.
pub async fn remove_owned_for(
    xfrm: &Handle,
    peer: IpAddr,
) -> Result<usize, nodeseal_xfrm::XfrmError> {
    let states = xfrm.states().dump().execute().await?;
    let policies = xfrm.policies().dump().execute().await?;
    let mut batch = xfrm.batch();
    for p in policies.iter().filter(|p| policy_of_peer(p, peer)) {
        if let Some(spec) = &p.spec {
            batch = batch.delete_policy(spec.id());
        }
    }
    for s in states.iter().filter(|s| state_of_peer(s, peer)) {
        if let Some(spec) = &s.spec {
            batch = batch.delete_state(spec.id());
        }
    }
    let n = batch.len();
    if n > 0 {
        batch.execute().await?;
    }
    Ok(n)
}

/// The running peer tasks, by node IP (the address handshakes and ESP come from).
#[derive(Debug, Default)]
pub struct PeerRegistry {
    by_ip: std::sync::RwLock<std::collections::HashMap<IpAddr, (NodeName, PeerHandle)>>,
}

impl PeerRegistry {
    /// The peer at `ip`, if one is known.
    pub fn lookup(&self, ip: IpAddr) -> Option<(NodeName, PeerHandle)> {
        self.by_ip.read().ok()?.get(&ip).cloned()
    }

    /// Registers a peer task.
    pub fn insert(&self, ip: IpAddr, name: NodeName, handle: PeerHandle) {
        if let Ok(mut map) = self.by_ip.write() {
            map.insert(ip, (name, handle));
        }
    }

    /// Forgets the peer at `ip`.
    pub fn remove(&self, ip: IpAddr) -> Option<(NodeName, PeerHandle)> {
        self.by_ip.write().ok()?.remove(&ip)
    }

    /// Every registered peer.
    pub fn all(&self) -> Vec<(IpAddr, NodeName, PeerHandle)> {
        self.by_ip
            .read()
            .map(|m| {
                m.iter()
                    .map(|(ip, (n, h))| (*ip, n.clone(), h.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}
