//! The peer loop: handshakes, what their results mean for the peer, and the calls into its
//! [`Tunnel`] in lifecycle order (install, confirm, flip, retire, sweep, teardown).
//!
//! When things happen is the [`Schedule`]'s business; what the kernel holds is the tunnel's.
//! This module decides: whether a handshake is needed, whether the peer's claims are admitted,
//! which epoch comes next, and what the status row says.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nodeseal_bpf::NodeId;
use nodeseal_keymgr::handshake::{self, Agreement, HandshakeConfig, Incoming};
use nodeseal_keymgr::{ClaimsError, Epoch, HandshakeError, Hello, NodeClaims, RejectReason};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::ipsec::IpsecTunnel;
use super::schedule::{Schedule, Timing, patience};
use super::wireguard::{WireguardSettings, WireguardTunnel};
use super::{
    InstalledEpoch, PeerCommand, PeerContext, PeerDatapath, PeerEnd, PeerError, PeerHandle,
    PeerInfo, PeerSettings, PeerState, PeerStatus, Tunnel, error_chain, generation_of,
};
use crate::metrics::Metrics;
use crate::pace::Pace;

/// What a task needs besides its tunnel and datapath (from [`PeerContext`]).
pub(crate) struct TaskContext {
    pub settings: PeerSettings,
    pub handshake: watch::Receiver<Option<HandshakeConfig>>,
    pub generation: watch::Receiver<u64>,
    pub metrics: Arc<Metrics>,
    pub cancel: CancellationToken,
    pub handshake_permits: Arc<Semaphore>,
    pub pace: Arc<Pace>,
    /// Whether a previous agent left objects for this peer.
    pub leftovers: bool,
}

/// One peer's task.
pub struct PeerTask<T: Tunnel = IpsecTunnel> {
    info: PeerInfo,
    /// A changed record that the peer's last verified certificate does not admit: it takes
    /// effect only at a handshake whose certificate does (the peer may have been re-certified).
    proposed: Option<PeerInfo>,
    /// What the peer's certificate admitted at the last handshake.
    admitted: Option<NodeClaims>,
    node_id: NodeId,
    settings: PeerSettings,
    tunnel: T,
    datapath: Arc<dyn PeerDatapath>,
    handshake: watch::Receiver<Option<HandshakeConfig>>,
    generation: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<PeerStatus>>,
    /// The epoch traffic uses.
    current: Option<InstalledEpoch>,
    schedule: Schedule,
    commands: mpsc::Receiver<PeerCommand>,
    /// Commands that arrived while a handshake was running, handled right after it.
    deferred: VecDeque<PeerCommand>,
    handshake_permits: Arc<Semaphore>,
    pace: Arc<Pace>,
}

/// What a handshake in progress was interrupted by.
enum Either<T> {
    Done(T),
    Command(Option<PeerCommand>),
}

impl PeerTask<IpsecTunnel> {
    /// Prepares the task for `info`: allocates the node id, publishes the peer's pod CIDRs to the
    /// datapath (strict mode drops traffic to them until keys exist) and, in strict mode, the
    /// peer's IN/FWD/block policies.
    ///
    /// # Errors
    /// [`PeerError`] from the datapath or XFRM.
    pub async fn new(info: PeerInfo, ctx: PeerContext) -> Result<(Self, PeerHandle), PeerError> {
        let xfrm = ctx.xfrm.clone();
        let (datapath, node_id, task) = task_context(&info, ctx)?;
        let tunnel = IpsecTunnel::new(xfrm, Arc::clone(&datapath), &task.settings, node_id)?;
        Self::start(info, node_id, task, datapath, tunnel).await
    }
}

/// What a task needs before its tunnel exists, for every kind of tunnel: the peer's node id,
/// its pod CIDRs published to the datapath, and the shared context.
fn task_context(
    info: &PeerInfo,
    ctx: PeerContext,
) -> Result<(Arc<dyn PeerDatapath>, NodeId, TaskContext), PeerError> {
    let datapath: Arc<dyn PeerDatapath> = Arc::new(ctx.datapath);
    let node_id = datapath.node_id(info.ip)?;
    datapath.set_peer_routes(node_id, &info.pod_cidrs)?;
    let task = TaskContext {
        leftovers: ctx.leftover_peers.contains(&info.ip),
        settings: ctx.settings,
        handshake: ctx.handshake,
        generation: ctx.generation,
        metrics: ctx.metrics,
        cancel: ctx.cancel,
        handshake_permits: ctx.handshake_permits,
        pace: ctx.pace,
    };
    Ok((datapath, node_id, task))
}

impl PeerTask<WireguardTunnel> {
    /// Prepares the task for `info` in WireGuard mode: allocates the node id and publishes the
    /// peer's pod CIDRs to the datapath (strict mode drops traffic to them until keys exist).
    /// The peer's entry on the device `wg` is written at its first key agreement.
    ///
    /// # Errors
    /// [`PeerError`] from the datapath.
    pub async fn new_wireguard(
        info: PeerInfo,
        ctx: PeerContext,
        wg: nodeseal_wireguard::Handle,
        settings: &WireguardSettings,
    ) -> Result<(Self, PeerHandle), PeerError> {
        let (datapath, node_id, task) = task_context(&info, ctx)?;
        let tunnel = WireguardTunnel::new(wg, Arc::clone(&datapath), settings, &info.name);
        Self::start(info, node_id, task, datapath, tunnel).await
    }
}

impl<T: Tunnel> PeerTask<T> {
    /// The task over `tunnel`, once the peer has its node id and routes.
    pub(crate) async fn start(
        info: PeerInfo,
        node_id: NodeId,
        ctx: TaskContext,
        datapath: Arc<dyn PeerDatapath>,
        mut tunnel: T,
    ) -> Result<(Self, PeerHandle), PeerError> {
        let mut status = PeerStatus::connecting(&info.name, info.ip, node_id);
        tunnel.fill_status(&mut status);
        let status = Arc::new(Mutex::new(status));
        let (tx, rx) = mpsc::channel(64);
        let cancel = ctx.cancel.child_token();
        // A little jitter, so that a node meeting many peers at once spreads its first
        // handshakes.
        let first_attempt =
            Instant::now() + Duration::from_millis(rand::rng().random_range(0..250));
        let timing = Timing {
            rekey_interval: ctx.settings.rekey_interval,
            grace: ctx.settings.grace,
            retention: ctx.settings.retention,
        };
        let peer = PeerEnd {
            node_id,
            ip: info.ip,
            pod_cidrs: info.pod_cidrs.clone(),
            handshake_port: info.port,
            second_ip: info.second_ip,
        };
        tunnel.prepare(&peer).await?;
        let task = Self {
            info,
            proposed: None,
            admitted: None,
            node_id,
            settings: ctx.settings,
            tunnel,
            datapath,
            handshake: ctx.handshake,
            generation: ctx.generation,
            metrics: ctx.metrics,
            status: Arc::clone(&status),
            current: None,
            schedule: Schedule::new(timing, first_attempt, ctx.leftovers),
            commands: rx,
            deferred: VecDeque::new(),
            handshake_permits: ctx.handshake_permits,
            pace: ctx.pace,
        };
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
            handshake_port: self.info.port,
            second_ip: self.info.second_ip,
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
                let wake = self.schedule.next_wake(self.current.is_some());
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

    /// Whether a handshake is due: no keys, keys of an older rotation generation, or the
    /// periodic rekey.
    fn needs_handshake(&self) -> bool {
        let wanted = *self.generation.borrow();
        match self.current {
            None => true,
            Some(c) => generation_of(c.epoch) < wanted || self.schedule.rekey_due(Instant::now()),
        }
    }

    fn on_generation(&mut self, wanted: u64) {
        if self
            .current
            .is_some_and(|c| generation_of(c.epoch) >= wanted)
        {
            return;
        }
        let delay = patience(self.preferred_initiator());
        self.schedule.attempt_at(Instant::now() + delay);
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
            PeerCommand::Update(info) => self.on_update(*info),
            PeerCommand::SaExpired { spi, hard } => self.on_expire(spi, hard),
            PeerCommand::HandshakeFailed { error } => self.record_failure(error),
        }
        false
    }

    fn on_update(&mut self, info: PeerInfo) {
        let refused = self.admitted.as_ref().and_then(|a| covers(a, &info).err());
        if let Some(e) = refused {
            // Routes follow only what a certificate admitted; ask the peer for a handshake in
            // case it was re-certified for the new claims.
            warn!(peer = %info.name, reason = %e, "peer record change not admitted");
            self.record_failure(PeerError::NotAdmitted(e.to_string()).to_string());
            self.proposed = Some(info);
            self.schedule.attempt_at(Instant::now());
        } else if info.pod_cidrs != self.info.pod_cidrs
            || info.ip != self.info.ip
            || info.second_ip != self.info.second_ip
        {
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
            self.schedule.attempt_at(Instant::now());
        } else {
            self.info = info;
        }
    }

    /// A state crossed its soft limit (rekey now) or its hard limit (the kernel deleted it: the
    /// peer's traffic waits for new keys). Only the current epoch's states matter; older ones
    /// are retiring anyway.
    fn on_expire(&mut self, spi: u32, hard: bool) {
        if self.current.is_none() || !self.tunnel.carries_spi(spi) {
            return;
        }
        info!(
            spi = format_args!("{spi:#010x}"),
            hard, "SA reached its usage limit; rekeying"
        );
        // Both ends see the limit at about the same packet; as with a rotation the preferred
        // initiator starts and the other steps in only if it does not. Past the hard limit
        // there is nothing to wait for.
        let delay = patience(hard || self.preferred_initiator());
        self.schedule.rekey_now(Instant::now(), delay);
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        let peer = self.peer_end();
        for old in self.schedule.take_retirements(now) {
            match self.tunnel.retire(&peer, old).await {
                Ok(()) => debug!(epoch = %old, "previous epoch removed"),
                Err(e) => warn!(epoch = %old, error = %error_chain(&e), "removing previous epoch"),
            }
        }
        if self.schedule.take_sweep(now) {
            match self.tunnel.sweep(&peer).await {
                Ok(0) => {}
                Ok(n) => info!(objects = n, "removed SAs left by a previous agent"),
                Err(e) => warn!(error = %error_chain(&e), "sweeping stale SAs"),
            }
        }
        if self.schedule.take_attempt(now) {
            Box::pin(self.attempt()).await;
        }
        self.expire_if_unreachable().await;
    }

    /// When handshakes with the peer have failed for the retention period, its keys are
    /// removed: a peer that cannot prove its identity any more loses them, and strict mode
    /// drops its traffic from then on.
    async fn expire_if_unreachable(&mut self) {
        if !self
            .schedule
            .unreachable_too_long(Instant::now(), self.current.is_some())
        {
            return;
        }
        warn!(retention = ?self.settings.retention, "peer unreachable for too long; removing its SAs");
        if let Some(current) = self.current.take() {
            let peer = self.peer_end();
            if let Err(e) = self.tunnel.retire(&peer, current).await {
                warn!(epoch = %current, error = %error_chain(&e), "removing the current epoch");
            }
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
            self.schedule
                .attempt_at(Instant::now() + Duration::from_secs(1));
            return;
        };
        let generation = *self.generation.borrow();
        let epoch = self.next_epoch(generation);
        let started = Instant::now();
        let hello = match self.hello(&config, epoch, self.tunnel.fresh_spi()) {
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
        self.conclude_initiated(agreement, began, started).await;
    }

    /// Installs the keys of a handshake we initiated and records the outcome.
    async fn conclude_initiated<S>(
        &mut self,
        agreement: Result<Agreement<S>, PeerError>,
        began: Instant,
        started: Instant,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
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
        let current = self.current.map(|c| c.epoch);
        let counter = current.map_or(0, |c| {
            if generation_of(c) == generation {
                (c.0 & 0xffff_ffff) + 1
            } else {
                0
            }
        });
        // A restarted agent does not know the last counter; time keeps it increasing.
        let clock = unix_now() & 0xffff_ffff;
        Epoch((generation.max(current.map_or(0, generation_of)) << 32) | counter.max(clock))
    }

    fn hello(&self, config: &HandshakeConfig, epoch: Epoch, spi: u32) -> Result<Hello, PeerError> {
        let spi = nodeseal_keymgr::Spi::new(spi).map_err(|_| PeerError::BadSpi(spi))?;
        Ok(self.tunnel.announce(
            Hello::new(config.local_node().clone(), epoch, spi, self.tunnel.mode())
                .with_node_ips(
                    std::iter::once(self.settings.local.ip)
                        .chain(self.settings.local.second_ip)
                        .collect(),
                )
                .with_pod_cidrs(self.settings.local.pod_cidrs.clone()),
        ))
    }

    async fn respond<S>(&mut self, incoming: Incoming<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Some(config) = self.handshake.borrow().clone() else {
            let _ = incoming.reject(RejectReason::Unavailable).await;
            return;
        };
        self.respond_with(&config, incoming).await;
    }

    async fn respond_with<S>(&mut self, config: &HandshakeConfig, incoming: Incoming<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let epoch = incoming.peer_hello().epoch;
        let started = Instant::now();
        let hello = self.hello(config, epoch, self.tunnel.fresh_spi());
        let answer = Box::pin(async { Ok::<_, PeerError>(incoming.respond(hello?).await?) });
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

    /// Steps 2-5 of a rekey, given an agreement.
    async fn install<S>(&mut self, mut agreement: Agreement<S>) -> Result<(), PeerError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
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
        let confirm = self.pace.confirm_timeout();
        if let Some(possession) = self
            .tunnel
            .key_possession(&agreement.keys, &agreement.peer_hello)?
        {
            let theirs = tokio::time::timeout(
                confirm,
                agreement.channel.exchange_possession(possession.ours),
            )
            .await
            .map_err(|_| PeerError::Timeout(confirm))??;
            possession.check(&agreement.keys, &theirs)?;
        }
        let peer = self.peer_end();
        let installed = self
            .tunnel
            .install(&peer, &agreement.keys, &agreement.peer_hello)
            .await?;
        // Not cancellable from outside once keys are in the kernel: on any failure, including
        // the peer going quiet, the new epoch is removed again before returning.
        let confirmed = tokio::time::timeout(
            confirm,
            agreement.channel.confirm_installed(installed.epoch),
        )
        .await;
        let failure = match confirmed {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(PeerError::from(e)),
            Err(_) => Some(PeerError::Timeout(confirm)),
        };
        if let Some(e) = failure {
            self.abandon(&peer, installed).await;
            return Err(e);
        }
        let _ = agreement.channel.close().await;
        if let Err(e) = self.tunnel.flip(&peer, installed).await {
            self.abandon(&peer, installed).await;
            return Err(e.into());
        }
        if let Some(previous) = self.current.replace(installed) {
            self.schedule.retire_later(Instant::now(), previous);
        }
        Ok(())
    }

    /// Removes an epoch that never carried traffic.
    async fn abandon(&mut self, peer: &PeerEnd, epoch: InstalledEpoch) {
        if let Err(e) = self.tunnel.retire(peer, epoch).await {
            warn!(epoch = %epoch, error = %error_chain(&e), "removing an unconfirmed epoch");
        }
    }

    /// Authenticated is not authorized: the node's record (written by the node itself) may claim
    /// only what its certificate's issuer admitted for it. A proposed record change the
    /// certificate admits takes effect here.
    fn admit<S>(&mut self, agreement: &Agreement<S>) -> Result<(), PeerError> {
        let candidate = self.proposed.as_ref().unwrap_or(&self.info);
        match &agreement.peer.claims {
            Some(admitted) => {
                covers(admitted, candidate).map_err(|e| PeerError::NotAdmitted(e.to_string()))?;
            }
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

    fn on_success(&mut self, started: Instant) {
        self.metrics.rekey_done(started.elapsed());
        let jitter = rand::rng().random_range(0.9..1.1);
        let rekey_in = self
            .schedule
            .rekey_interval(self.preferred_initiator(), jitter);
        self.schedule.succeeded(Instant::now(), rekey_in);
        let wanted = *self.generation.borrow();
        self.on_generation(wanted);
        if let Ok(mut s) = self.status.lock() {
            if let Some(installed) = self.current {
                s.established(installed.epoch);
            }
            self.tunnel.fill_status(&mut s);
        }
    }

    fn on_failure(&mut self, err: &PeerError) {
        let text = error_chain(err);
        warn!(error = %text, "key agreement failed");
        self.metrics.handshake("failed");
        self.record_failure(text);
        self.schedule.failed(Instant::now(), self.current.is_some());
    }

    fn record_failure(&mut self, error: String) {
        if let Ok(mut s) = self.status.lock() {
            s.failed(error, self.current.is_some());
        }
    }

    fn set_state(&self, state: PeerState, error: Option<String>) {
        if let Ok(mut s) = self.status.lock() {
            s.set_state(state, error);
        }
    }

    /// Deletes every kernel object of this peer, also ones a previous agent left, and forgets
    /// the peer in the eBPF maps.
    async fn teardown(&mut self, reason: &str) {
        info!(reason, "removing peer");
        if let Err(e) = self.datapath.remove_peer(
            self.node_id,
            &self.peer_end().node_ips().collect::<Vec<_>>(),
            &self.info.pod_cidrs,
        ) {
            warn!(error = %error_chain(&e), "cannot remove peer from the eBPF maps");
        }
        let peer = self.peer_end();
        match self.tunnel.teardown(&peer).await {
            Ok(n) => info!(objects = n, "peer's XFRM objects removed"),
            Err(e) => warn!(error = %error_chain(&e), "cannot remove the peer's XFRM objects"),
        }
        self.current = None;
        self.schedule.clear_retirements();
        self.set_state(PeerState::Removed, Some(reason.to_owned()));
    }
}

/// Whether `claims` admit every address `info` gives the peer: its node IPs and pod CIDRs.
fn covers(claims: &NodeClaims, info: &PeerInfo) -> Result<(), ClaimsError> {
    claims.cover(info.ip, &info.pod_cidrs)?;
    match info.second_ip {
        Some(ip) => claims.cover(ip, &[]),
        None => Ok(()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use nodeseal_keymgr::ExpectedPeer;
    use nodeseal_keymgr::test_helpers::TestPki;
    use nodeseal_xfrm::{Direction, KernelPolicy, KernelState};

    use super::*;
    use crate::peer::fakes::{GRACE, Node, RETENTION, hold_clock};
    use crate::peer::ipsec::{EpochSas, KeySlot, SaLimits};

    type Task = PeerTask<IpsecTunnel>;

    /// A full key agreement: `a` initiates, `b` answers; both install, confirm and flip.
    async fn agree(a: (&Node, &mut Task), b: (&Node, &mut Task)) {
        let ((a_node, a_task), (b_node, b_task)) = (a, b);
        let (a_end, b_end) = tokio::io::duplex(64 * 1024);
        let hello = a_task
            .hello(
                &a_node.config,
                a_task.next_epoch(0),
                a_task.tunnel.fresh_spi(),
            )
            .expect("hello");
        let started = Instant::now();
        let initiator = async {
            let agreement = handshake::initiate(&a_node.config, a_end, &b_node.name, hello)
                .await
                .map_err(PeerError::from);
            a_task.conclude_initiated(agreement, started, started).await;
        };
        let responder = async {
            let expected = ExpectedPeer::Node(a_node.name.clone());
            let incoming = handshake::accept(&b_node.config, b_end, expected)
                .await
                .expect("accepting");
            b_task.respond_with(&b_node.config, incoming).await;
        };
        tokio::join!(initiator, responder);
    }

    /// Two nodes and the task each runs for the other.
    async fn pair(strict: bool) -> (Node, Task, Node, Task) {
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let (ta, _) = a.task_for(&b, strict, false).await;
        let (tb, _) = b.task_for(&a, strict, false).await;
        (a, ta, b, tb)
    }

    fn status(task: &Task) -> PeerStatus {
        task.status.lock().expect("status").clone()
    }

    fn states_with(node: &Node, peer: IpAddr) -> Vec<KernelState> {
        node.kernel
            .states()
            .into_iter()
            .filter(|s| {
                s.spec
                    .as_ref()
                    .is_some_and(|x| x.src == peer || x.dst == peer)
            })
            .collect()
    }

    fn out_policies(node: &Node) -> Vec<KernelPolicy> {
        node.kernel
            .policies()
            .into_iter()
            .filter(|p| p.spec.as_ref().is_some_and(|s| s.dir == Direction::Out))
            .collect()
    }

    fn spis(states: &[KernelState]) -> Vec<u32> {
        let mut v: Vec<u32> = states.iter().map(|s| s.spi).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_second_node_ip_needs_the_certificates_admission_like_the_first() {
        let pki = TestPki::new();
        let node = Node::new(&pki, 2);
        let mut info = node.info();
        let second: IpAddr = "fd00::2".parse().expect("ip");
        let claims = |ips: &[IpAddr]| NodeClaims::new(ips, &[node.cidr]).expect("claims");
        assert!(covers(&claims(&[node.ip]), &info).is_ok());
        info.second_ip = Some(second);
        let e = covers(&claims(&[node.ip]), &info).unwrap_err();
        assert!(e.to_string().contains("fd00::2"), "{e}");
        assert!(covers(&claims(&[node.ip, second]), &info).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_agreement_installs_confirms_and_flips_on_both_sides() {
        let _clock = hold_clock();
        let (a, mut ta, b, mut tb) = pair(false).await;
        assert!(a.kernel.states().is_empty(), "no keys before a handshake");
        agree((&a, &mut ta), (&b, &mut tb)).await;
        for (node, task, peer) in [(&a, &ta, &b), (&b, &tb, &a)] {
            let row = status(task);
            assert_eq!(row.state, PeerState::Established, "{row:?}");
            assert_eq!((row.rekeys, row.failures, row.slot), (1, 0, Some(1)));
            // One IN and one OUT state, an OUT policy for the slot, IN and FWD for the peer.
            assert_eq!(node.kernel.states().len(), 2);
            assert_eq!(node.kernel.policies().len(), 3);
            let id = node.id_of(peer);
            assert_eq!(node.datapath.slot_of(id), Some(KeySlot::FIRST));
            assert!(node.datapath.is_admitted(peer.ip));
            assert_eq!(node.datapath.routes_of(id), [peer.cidr]);
        }
        // What one sends on, the other receives on.
        assert_eq!(spis(&a.kernel.states()), spis(&b.kernel.states()));
        assert_eq!(status(&ta).out_spi, status(&tb).in_spi);
    }

    #[tokio::test(start_paused = true)]
    async fn strict_mode_blocks_clear_traffic_before_any_key() {
        let _clock = hold_clock();
        let (a, _ta, _b, _tb) = pair(true).await;
        let policies = a.kernel.policies();
        assert_eq!(policies.len(), 3, "IN, FWD and the strict block");
        assert!(a.kernel.states().is_empty());
        assert!(policies.iter().any(|p| {
            p.spec
                .as_ref()
                .is_some_and(|s| s.action == nodeseal_xfrm::Action::Block)
        }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rekey_keeps_the_previous_epoch_for_the_grace_period() {
        let _clock = hold_clock();
        let (a, mut ta, b, mut tb) = pair(false).await;
        agree((&a, &mut ta), (&b, &mut tb)).await;
        let first = spis(&a.kernel.states());
        let first_epoch = ta.current.expect("keys").epoch;
        agree((&a, &mut ta), (&b, &mut tb)).await;
        assert!(ta.current.expect("keys").epoch > first_epoch);
        assert_eq!(
            a.kernel.states().len(),
            4,
            "both epochs receive during the grace period"
        );
        assert_eq!(out_policies(&a).len(), 2, "one OUT policy per live slot");
        assert_eq!(a.datapath.slot_of(a.id_of(&b)), KeySlot::new(2));
        assert_eq!(status(&ta).slot, Some(2));

        tokio::time::advance(GRACE - Duration::from_millis(1)).await;
        ta.on_timer().await;
        assert_eq!(
            a.kernel.states().len(),
            4,
            "not before the grace period is over"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        ta.on_timer().await;
        let left = spis(&a.kernel.states());
        assert_eq!(left.len(), 2);
        assert!(
            left.iter().all(|s| !first.contains(s)),
            "the first epoch is gone"
        );
        assert_eq!(out_policies(&a).len(), 1);
        assert_eq!(a.kernel.policies().len(), 3, "IN and FWD stay");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unconfirmed_epoch_is_removed_and_the_old_keys_stay_in_use() {
        let _clock = hold_clock();
        let (a, mut ta, b, mut tb) = pair(false).await;
        agree((&a, &mut ta), (&b, &mut tb)).await;
        let before = spis(&a.kernel.states());
        let epoch = ta.current;
        // b answers the next handshake but goes away before confirming.
        let (a_end, b_end) = tokio::io::duplex(64 * 1024);
        let hello = ta
            .hello(&a.config, ta.next_epoch(0), ta.tunnel.fresh_spi())
            .expect("hello");
        let b_hello = |epoch| tb.hello(&b.config, epoch, 0x0002_0000).expect("hello");
        let started = Instant::now();
        let initiator = async {
            let agreement = handshake::initiate(&a.config, a_end, &b.name, hello)
                .await
                .map_err(PeerError::from);
            ta.conclude_initiated(agreement, started, started).await;
        };
        let responder = async {
            let incoming = handshake::accept(&b.config, b_end, ExpectedPeer::Node(a.name.clone()))
                .await
                .expect("accepting");
            let reply = b_hello(incoming.peer_hello().epoch);
            drop(incoming.respond(reply).await.expect("responding"));
        };
        tokio::join!(initiator, responder);
        assert_eq!(
            spis(&a.kernel.states()),
            before,
            "only the confirmed epoch is left"
        );
        assert_eq!(ta.current, epoch);
        assert_eq!(a.datapath.slot_of(a.id_of(&b)), Some(KeySlot::FIRST));
        let row = status(&ta);
        assert_eq!((row.state, row.failures), (PeerState::Established, 1));
        assert!(row.last_error.is_some());
        // A retry is planned within the first backoff.
        let retry = Instant::now() + super::super::schedule::FIRST_BACKOFF;
        assert!(ta.schedule.take_attempt(retry));
        // The slot the abandoned epoch had is used by the next one.
        agree((&a, &mut ta), (&b, &mut tb)).await;
        assert_eq!(status(&ta).slot, Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_peer_loses_its_keys_after_the_retention_period() {
        let _clock = hold_clock();
        let (a, mut ta, b, mut tb) = pair(false).await;
        agree((&a, &mut ta), (&b, &mut tb)).await;
        ta.on_failure(&PeerError::Timeout(Duration::from_secs(10)));
        assert_eq!(status(&ta).state, PeerState::Established, "keys still work");
        tokio::time::advance(RETENTION - Duration::from_secs(1)).await;
        ta.on_timer().await;
        assert_eq!(a.kernel.states().len(), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        ta.on_timer().await;
        assert!(a.kernel.states().is_empty(), "{:?}", a.kernel.states());
        assert!(out_policies(&a).is_empty());
        assert_eq!(
            a.datapath.slot_of(a.id_of(&b)),
            None,
            "traffic stops using keys"
        );
        let row = status(&ta);
        assert_eq!(row.state, PeerState::Failed);
        assert_eq!(
            row.last_error.as_deref(),
            Some("peer unreachable; SAs removed")
        );
        assert_eq!((row.epoch, row.slot), (None, None));
        // Keys come back with the next successful handshake, on a new slot.
        agree((&a, &mut ta), (&b, &mut tb)).await;
        assert_eq!(status(&ta).state, PeerState::Established);
        assert_eq!(a.datapath.slot_of(a.id_of(&b)), KeySlot::new(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_usage_limit_notice_for_the_current_sa_brings_the_rekey_forward() {
        let _clock = hold_clock();
        let (a, mut ta, b, mut tb) = pair(false).await;
        agree((&a, &mut ta), (&b, &mut tb)).await;
        let now = Instant::now();
        assert!(!ta.schedule.rekey_due(now));
        ta.on_expire(0x1234_5678, true);
        assert!(!ta.schedule.rekey_due(now), "not an SA of this peer");
        let in_spi = states_with(&a, b.ip)
            .iter()
            .find(|s| s.dst == a.ip)
            .expect("IN state")
            .spi;
        ta.on_expire(in_spi, true);
        assert!(ta.schedule.rekey_due(now));
        assert_eq!(
            ta.schedule.next_wake(true),
            Some(now),
            "past the hard limit: at once"
        );
        assert!(ta.needs_handshake());
    }

    #[tokio::test(start_paused = true)]
    async fn removal_deletes_this_peers_objects_and_nothing_else() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b, c) = (Node::new(&pki, 1), Node::new(&pki, 2), Node::new(&pki, 3));
        let (mut ta, _) = a.task_for(&b, true, false).await;
        let (mut tb, _) = b.task_for(&a, true, false).await;
        let (mut tac, _) = a.task_for(&c, true, false).await;
        let (mut tc, _) = c.task_for(&a, true, false).await;
        agree((&a, &mut ta), (&b, &mut tb)).await;
        agree((&a, &mut tac), (&c, &mut tc)).await;
        let of_c = (states_with(&a, c.ip), a.kernel.policies().len() / 2);
        let (done, told) = tokio::sync::oneshot::channel();
        let stop = ta
            .handle(PeerCommand::Remove {
                reason: "revoked".into(),
                done: Some(done),
            })
            .await;
        assert!(stop);
        told.await.expect("teardown reported done");
        assert!(states_with(&a, b.ip).is_empty());
        assert_eq!(
            a.kernel.states(),
            of_c.0,
            "the other peer's states are untouched"
        );
        assert_eq!(a.kernel.policies().len(), of_c.1);
        assert!(!a.datapath.knows(b.ip) && a.datapath.knows(c.ip));
        let row = status(&ta);
        assert_eq!(row.state, PeerState::Removed);
        assert_eq!(row.last_error.as_deref(), Some("revoked"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_previous_agents_objects_are_swept_a_grace_period_after_the_first_flip() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b, c) = (Node::new(&pki, 1), Node::new(&pki, 2), Node::new(&pki, 3));
        // The previous agent on a: an epoch with b on slot 1 and its IN/FWD policies, and
        // something with c, which is not this task's business.
        for peer in [&b, &c] {
            let settings = a.settings(false);
            let end = crate::peer::PeerEnd {
                node_id: a.id_of(peer),
                ip: peer.ip,
                pod_cidrs: vec![peer.cidr],
                handshake_port: 4250,
                second_ip: None,
            };
            let old = EpochSas::new(
                &settings.local,
                &end,
                KeySlot::FIRST,
                (nodeseal_xfrm::Spi::new(0x0100_0000).expect("spi"), &[7; 20]),
                (
                    nodeseal_xfrm::Spi::new(0x0200_0000 + u32::from(end.node_id.0)).expect("spi"),
                    &[8; 20],
                ),
                SaLimits::default(),
            )
            .expect("old epoch");
            let mut batch = a
                .xfrm
                .batch()
                .add_state(old.inbound.clone())
                .add_state(old.outbound.clone());
            for p in old
                .out_policies(&settings.local, &end, None)
                .expect("policies")
            {
                batch = batch.add_policy(p);
            }
            for p in crate::peer::ipsec::peer_policies(&settings.local, &end, false, None)
                .expect("policies")
            {
                batch = batch.add_policy(p);
            }
            batch.execute().await.expect("previous agent's objects");
            a.datapath.leave_slot(end.node_id, KeySlot::FIRST);
        }
        let of_c = states_with(&a, c.ip);
        let (mut ta, _) = a.task_for(&b, false, true).await;
        assert_eq!(
            status(&ta).slot,
            Some(1),
            "the previous agent's slot is shown"
        );
        let (mut tb, _) = b.task_for(&a, false, false).await;
        agree((&a, &mut ta), (&b, &mut tb)).await;
        assert_eq!(
            a.datapath.slot_of(a.id_of(&b)),
            KeySlot::new(2),
            "the next slot"
        );
        assert_eq!(
            states_with(&a, b.ip).len(),
            4,
            "the old epoch still receives"
        );
        tokio::time::advance(GRACE).await;
        ta.on_timer().await;
        let with_b = states_with(&a, b.ip);
        assert_eq!(
            spis(&with_b),
            spis(&b.kernel.states()),
            "only our epoch is left"
        );
        assert_eq!(
            states_with(&a, c.ip),
            of_c,
            "another peer's objects are untouched"
        );
        // b: OUT for slot 2, IN, FWD; c: OUT for slot 1, IN, FWD.
        assert_eq!(a.kernel.policies().len(), 6);
    }
}
