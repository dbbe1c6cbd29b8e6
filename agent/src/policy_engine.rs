//! Identity policy on this node: endpoints and their identities, policy documents, compiled
//! into the eBPF policy table, endpoint entries and ipcache identities.
//!
//! Inputs come from the cluster store: endpoint records (every node's: the local ones are
//! enforced, the remote ones give their pod IPs an identity), identities, policy documents.
//! In the standalone modes the engine allocates the identities of its own endpoints itself
//! (compare-and-swap in the store, so every node agrees); in Kubernetes mode keymgr does, and
//! the engine waits for the identity to appear.
//!
//! Authentication is not authorization: an endpoint record only gives an identity to IPs inside
//! the pod CIDRs of the node it names (checked here against that node's record, and again by
//! the datapath against the CIDRs it routes to a member), so neither a record nor a node can
//! lend an identity to another node's addresses.
//!
//! Every change compiles through one [`compile::Compiler`], which encodes again only the
//! (endpoint identity, direction) pairs whose rules or matched identities changed, and
//! programs the difference of the table; a compile or map error keeps the last programmed
//! state and is reported in the status.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use ipnet::IpNet;
use nodeseal_bpf::{Enforcement, PolicyDirection, PolicyRule, PolicyVerdict};
use nodeseal_policy::compile::{self, CompileStats, Compiled, Compiler, Identities, Verdict};
use nodeseal_policy::labels::Labels;
use nodeseal_policy::rule::{Direction, Policy};
use nodeseal_store::{Endpoint, Event, Kind, Record, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::datapath::{DatapathHandle, FIRST_CIDR_IDENTITY, PolicyProgram, PolicyWrites};
use crate::metrics::Metrics;
use crate::observe::ObserveHub;
use crate::peer::error_chain;

/// How long one identity allocation may take before the endpoint is retried later.
/// The state of an endpoint with everything it needs.
const READY: &str = "ready";
const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Period of the retry of what could not be done (identity allocation, interface lookup).
const RETRY: Duration = Duration::from_secs(2);
/// Changes arriving within this window are programmed together.
const SETTLE: Duration = Duration::from_millis(50);
/// How long the first program waits for the agent's first view of the nodes (the pod CIDRs
/// that remote pod IPs are checked against).
const NODES_WAIT: Duration = Duration::from_secs(30);

/// What the engine is given.
pub struct PolicyEngine {
    /// This node's name.
    pub node: String,
    /// The cluster store.
    pub store: Store,
    /// The datapath it programs.
    pub datapath: DatapathHandle,
    /// Whether it allocates the identities of its endpoints (standalone modes).
    pub allocate: bool,
    /// This node's pod CIDRs.
    pub local_pod_cidrs: Vec<IpNet>,
    /// Each peer's pod CIDRs from its last usable node record (the agent keeps it).
    pub node_cidrs: Arc<Mutex<BTreeMap<String, Vec<IpNet>>>>,
    /// Notified when `node_cidrs` changed.
    pub nodes_changed: Arc<Notify>,
    /// Becomes true once the agent applied its first view of the nodes.
    pub nodes_synced: watch::Receiver<bool>,
    /// Pod interfaces start with this (for endpoints whose interface is found by route).
    pub pod_interface_prefix: String,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// What `nodeseal status` shows.
    pub view: Arc<Mutex<PolicyView>>,
    /// Flows of `nodeseal observe`, whose identities it names.
    pub observe: ObserveHub,
}

/// The engine's state as `nodeseal status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyView {
    /// This node's endpoints.
    pub endpoints: Vec<EndpointView>,
    /// Identities known.
    #[serde(default)]
    pub identities: usize,
    /// Policy documents in force (store names).
    pub policies: Vec<String>,
    /// Entries of the policy table.
    pub table_entries: usize,
    /// What the last change wrote into the maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_writes: Option<PolicyWrites>,
    /// Records refused (key → why), e.g. a policy document the parser refuses or an endpoint
    /// claiming an IP outside its node's pod CIDRs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<String, String>,
    /// Why the last program failed (the datapath keeps the state before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When policy was last programmed (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed_at_unix: Option<u64>,
}

/// One local endpoint, like a row of `cilium-dbg endpoint list`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointView {
    /// `namespace/name`.
    pub name: String,
    /// Its identity, once allocated.
    pub identity: Option<u32>,
    /// Its security labels.
    pub labels: String,
    /// Its IPs.
    pub ips: Vec<IpAddr>,
    /// Host-side interface (empty when not found yet).
    pub interface: String,
    /// Ingress enforced.
    pub ingress: bool,
    /// Egress enforced.
    pub egress: bool,
    /// `ready`, or what it waits for.
    pub state: String,
}

#[derive(Default)]
struct State {
    /// Endpoint records by store key.
    endpoints: BTreeMap<String, Endpoint>,
    /// Identity number → labels.
    identities: BTreeMap<u32, Labels>,
    /// Identity store key → number (to forget it on deletion).
    identity_keys: BTreeMap<String, u32>,
    /// Labels text → number.
    numbers: BTreeMap<String, u32>,
    /// Parsed policy documents by store key.
    documents: BTreeMap<String, Vec<Policy>>,
    /// Refused records by key.
    refused: BTreeMap<String, String>,
    /// Node-local CIDR identities, stable while their prefix is in some policy.
    cidr_identities: BTreeMap<IpNet, u32>,
    /// The identity each local endpoint's interface was last programmed with.
    programmed: BTreeMap<String, u32>,
    /// Whether the store view arrived.
    synced: bool,
    /// The last program written: the same one again is not rewritten (the periodic retry
    /// recomputes the plan to update the status).
    last_program: Option<PolicyProgram>,
    /// An identity was added or removed since `nodeseal observe` last got the labels.
    identities_changed: bool,
    /// The last program left something to do (an identity to allocate, an interface to find).
    pending: bool,
    /// Keeps each subject's compiled entries, so a change encodes only what it touches.
    compiler: Compiler,
}

impl PolicyEngine {
    /// Runs until `cancel` fires.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut events = self
            .store
            .watch(&[Kind::Endpoint, Kind::Identity, Kind::PolicyDocument]);
        let mut state = State::default();
        let mut nodes_ready = false;
        let nodes_deadline = tokio::time::Instant::now() + NODES_WAIT;
        let mut dirty = false;
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                event = events.next() => {
                    let Some(event) = event else { return };
                    dirty |= state.apply(event);
                    continue_settling(&mut events, &mut state, &mut dirty).await;
                }
                () = self.nodes_changed.notified() => dirty = true,
                changed = self.nodes_synced.changed(), if !nodes_ready => {
                    if changed.is_err() || *self.nodes_synced.borrow() {
                        nodes_ready = true;
                        dirty = true;
                    }
                }
                () = tokio::time::sleep_until(nodes_deadline), if !nodes_ready => {
                    warn!("no view of the nodes yet; programming policy without remote pod identities");
                    nodes_ready = true;
                    dirty = true;
                }
                _ = retry.tick() => dirty |= state.pending,
            }
            if dirty && state.synced && (nodes_ready || *self.nodes_synced.borrow()) {
                nodes_ready = true;
                dirty = false;
                self.program(&mut state).await;
            }
        }
    }

    /// Compiles and programs the current state; on failure the datapath keeps what it had.
    async fn program(&self, state: &mut State) {
        let started = Instant::now();
        if self.allocate {
            self.allocate_identities(state).await;
        }
        let mut plan = plan(state, &self.local_inputs());
        state.pending = plan.views.iter().any(|v| v.state != READY);
        let outcome = self.apply(state, &plan);
        if let Ok(Applied { enforcement, .. }) = &outcome {
            for view in &mut plan.views {
                let e = view.identity.and_then(|id| enforcement.get(&id));
                view.ingress = e.is_some_and(|e| e.ingress);
                view.egress = e.is_some_and(|e| e.egress);
            }
        }
        let took = started.elapsed();
        let writes = outcome.as_ref().ok().and_then(|applied| applied.writes);
        self.metrics
            .policy_programmed(took, outcome.is_ok(), writes.as_ref());
        if std::mem::take(&mut state.identities_changed) {
            self.observe.set_identity_labels(
                state
                    .identities
                    .iter()
                    .map(|(n, l)| (*n, l.to_string()))
                    .collect(),
            );
        }
        let mut view = self.view.lock().ok();
        if let Some(view) = view.as_deref_mut() {
            view.endpoints = plan.views.clone();
            view.identities = state.identities.len();
            view.policies = state.documents.keys().cloned().collect();
            view.refused = state.refused.clone();
            view.refused.extend(plan.refused.clone());
        }
        match outcome {
            Ok(Applied {
                entries,
                writes,
                compile_stats,
                ..
            }) => {
                debug!(
                    entries,
                    encoded = compile_stats.compiled,
                    reused = compile_stats.reused,
                    took_ms = took.as_millis(),
                    ?writes,
                    "identity policy programmed"
                );
                if let Some(view) = view.as_deref_mut() {
                    view.table_entries = entries;
                    if writes.is_some() {
                        view.last_writes = writes;
                    }
                    view.error = None;
                    view.programmed_at_unix = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs());
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot program identity policy; the datapath keeps its previous policy");
                if let Some(view) = view.as_deref_mut() {
                    view.error = Some(e);
                }
            }
        }
    }

    fn local_inputs(&self) -> LocalInputs {
        LocalInputs {
            node: self.node.clone(),
            local_pod_cidrs: self.local_pod_cidrs.clone(),
            node_cidrs: self
                .node_cidrs
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            interfaces: self.datapath.pod_interfaces().unwrap_or_default(),
            pod_interface_prefix: self.pod_interface_prefix.clone(),
        }
    }

    /// Programs `plan`. An endpoint whose identity changes switches in a first program whose
    /// table has the entries of its old and new identities; the second drops the old ones. So
    /// the table has the entries of the identity it has at every moment.
    fn apply(&self, state: &mut State, plan: &Plan) -> Result<Applied, String> {
        let policies: Vec<Policy> = state.documents.values().flatten().cloned().collect();
        state.cidr_identities = cidr_identities(&policies, &state.cidr_identities);
        let identities = Identities {
            workloads: state.identities.clone(),
            cidrs: state.cidr_identities.clone(),
        };
        let subjects: BTreeSet<u32> = plan.endpoints.values().copied().collect();
        let leaving: BTreeSet<u32> = state
            .programmed
            .iter()
            .filter(|(ifname, old)| plan.endpoints.get(*ifname) != Some(old))
            .map(|(_, old)| *old)
            .filter(|old| !subjects.contains(old) && identities.workloads.contains_key(old))
            .collect();
        let mut first = None;
        if !leaving.is_empty() {
            state.last_program = None;
            let both: BTreeSet<u32> = subjects.union(&leaving).copied().collect();
            let compiled = state
                .compiler
                .compile(&policies, &identities, &both)
                .map_err(|e| format!("compiling policy: {e}"))?;
            first = Some((
                self.datapath
                    .program_policy(program_of(&compiled, plan, &identities))
                    .map_err(|e| error_chain(&e))?,
                state.compiler.last_stats(),
            ));
        }
        let compiled = state
            .compiler
            .compile(&policies, &identities, &subjects)
            .map_err(|e| format!("compiling policy: {e}"))?;
        // The second compile of an identity switch only drops the leaving identities' units:
        // the first one did all the encoding.
        let stats = first
            .as_ref()
            .map_or_else(|| state.compiler.last_stats(), |(_, stats)| *stats);
        let program = program_of(&compiled, plan, &identities);
        let entries = program.rules.len();
        if leaving.is_empty() && state.last_program.as_ref() == Some(&program) {
            return Ok(Applied {
                entries,
                enforcement: compiled.enforcement,
                writes: None,
                compile_stats: stats,
            });
        }
        // Unknown until it succeeds: a failed write may have left part of it.
        state.last_program = None;
        let mut writes = self
            .datapath
            .program_policy(program.clone())
            .map_err(|e| error_chain(&e))?;
        if let Some((first, _)) = first {
            writes.add(&first);
        }
        state.last_program = Some(program);
        state.programmed = plan.endpoints.clone();
        Ok(Applied {
            entries,
            enforcement: compiled.enforcement,
            writes: Some(writes),
            compile_stats: stats,
        })
    }

    /// Allocates the identities this node's endpoints lack (standalone modes).
    async fn allocate_identities(&self, state: &mut State) {
        let wanted: BTreeMap<String, Labels> = state
            .endpoints
            .values()
            .filter(|e| e.node.as_str() == self.node)
            .map(|e| e.security_labels())
            .filter(|labels| !state.numbers.contains_key(&labels.to_string()))
            .map(|labels| (labels.to_string(), labels))
            .collect();
        for (text, labels) in wanted {
            match tokio::time::timeout(ALLOCATE_TIMEOUT, self.store.allocate_identity(&labels))
                .await
            {
                Ok(Ok(number)) => {
                    info!(identity = number.get(), labels = %text, "identity allocated");
                    state.numbers.insert(text, number.get());
                    state.identities.insert(number.get(), labels);
                }
                Ok(Err(e)) => warn!(labels = %text, error = %e, "cannot allocate an identity"),
                Err(_) => warn!(labels = %text, "identity allocation timed out"),
            }
        }
    }
}

/// Takes the events already waiting, and those arriving within [`SETTLE`], so that a burst
/// (a snapshot followed by puts, a policy applied with its endpoints) is programmed once.
async fn continue_settling(
    events: &mut futures::stream::BoxStream<'static, Event>,
    state: &mut State,
    dirty: &mut bool,
) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    for _ in 0..10_000 {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) => *dirty |= state.apply(event),
            Ok(None) | Err(_) => return,
        }
    }
}

impl State {
    /// Applies a store event; returns whether anything changed.
    fn apply(&mut self, event: Event) -> bool {
        match event {
            Event::Snapshot(snapshot) | Event::Resynced(snapshot) => {
                self.endpoints.clear();
                self.identities.clear();
                self.identity_keys.clear();
                self.numbers.clear();
                self.documents.clear();
                self.refused.clear();
                self.identities_changed = true;
                for record in snapshot.records {
                    self.put(record);
                }
                for e in snapshot.invalid {
                    self.refused.insert(e.key.clone(), e.problem.to_string());
                }
                self.synced = true;
                true
            }
            Event::Put(record) => {
                self.put(record);
                true
            }
            Event::Deleted(key) => {
                self.forget(&key.to_string());
                true
            }
            Event::Invalid(e) => {
                warn!(key = %e.key, problem = %e.problem, "ignoring invalid policy record");
                // An invalid record stands for no record.
                self.forget(&e.key);
                self.refused.insert(e.key.clone(), e.problem.to_string());
                true
            }
            Event::Interrupted(e) => {
                warn!(error = %e, "cluster store unavailable; identity policy stays as it is");
                false
            }
            other => {
                debug!(event = ?other, "ignoring unknown store event");
                false
            }
        }
    }

    fn put(&mut self, record: Record) {
        let key = record.key().to_string();
        self.forget(&key);
        match record {
            Record::Endpoint(endpoint) => {
                self.endpoints.insert(key, endpoint);
            }
            Record::Identity(identity) => {
                self.identities_changed = true;
                let number = identity.number.get();
                self.numbers.insert(identity.labels.to_string(), number);
                self.identities.insert(number, identity.labels);
                self.identity_keys.insert(key, number);
            }
            Record::PolicyDocument(document) => match document.policies() {
                Ok(policies) => {
                    self.documents.insert(key, policies);
                }
                Err(e) => {
                    self.refused.insert(key, error_chain(&e));
                }
            },
            _ => {}
        }
    }

    fn forget(&mut self, key: &str) {
        self.refused.remove(key);
        self.endpoints.remove(key);
        self.documents.remove(key);
        if let Some(number) = self.identity_keys.remove(key)
            && let Some(labels) = self.identities.remove(&number)
        {
            self.numbers.remove(&labels.to_string());
            self.identities_changed = true;
        }
    }
}

/// What [`PolicyEngine::apply`] did.
struct Applied {
    /// Entries of the policy table.
    entries: usize,
    /// What each subject enforces.
    enforcement: BTreeMap<u32, compile::Enforcement>,
    /// What was written; nothing when the program was the one in force.
    writes: Option<PolicyWrites>,
    /// (subject, direction) units the compile encoded and reused.
    compile_stats: CompileStats,
}

/// What the plan needs from the node.
struct LocalInputs {
    node: String,
    local_pod_cidrs: Vec<IpNet>,
    node_cidrs: BTreeMap<String, Vec<IpNet>>,
    /// Attached pod interfaces: name → ifindex.
    interfaces: BTreeMap<String, u32>,
    pod_interface_prefix: String,
}

/// What to program, before compiling.
#[derive(Debug, Default)]
struct Plan {
    /// Local interface → its endpoint's identity.
    endpoints: BTreeMap<String, u32>,
    /// Pod IP → identity (every node's endpoints, checked against their node's pod CIDRs).
    workload_ips: BTreeMap<IpAddr, u32>,
    /// Local endpoints for the status.
    views: Vec<EndpointView>,
    /// Endpoint records refused, by key.
    refused: BTreeMap<String, String>,
}

fn plan(state: &State, local: &LocalInputs) -> Plan {
    let mut plan = Plan::default();
    let mut claimed: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut conflicts: BTreeSet<IpAddr> = BTreeSet::new();
    for (key, endpoint) in &state.endpoints {
        let is_local = endpoint.node.as_str() == local.node;
        let labels = endpoint.security_labels();
        let identity = state.numbers.get(&labels.to_string()).copied();
        let cidrs: &[IpNet] = if is_local {
            &local.local_pod_cidrs
        } else {
            local
                .node_cidrs
                .get(endpoint.node.as_str())
                .map_or(&[], Vec::as_slice)
        };
        let outside: Vec<IpAddr> = endpoint
            .ips
            .iter()
            .filter(|ip| !cidrs.iter().any(|c| c.contains(*ip)))
            .copied()
            .collect();
        if !outside.is_empty() {
            plan.refused.insert(
                key.clone(),
                format!(
                    "IPs {outside:?} are outside the pod CIDRs of node {}",
                    endpoint.node
                ),
            );
        }
        if let Some(identity) = identity {
            for ip in endpoint.ips.iter().filter(|ip| !outside.contains(ip)) {
                if let Some(other) = claimed.insert(*ip, key.clone())
                    && other != *key
                {
                    conflicts.insert(*ip);
                    plan.refused
                        .insert(key.clone(), format!("IP {ip} is claimed by {other} too"));
                }
                plan.workload_ips.insert(*ip, identity);
            }
        }
        if !is_local {
            continue;
        }
        let interface = if endpoint.interface.is_empty() {
            endpoint
                .ips
                .iter()
                .find_map(|ip| route_interface(*ip, &local.pod_interface_prefix))
                .unwrap_or_default()
        } else {
            endpoint.interface.clone()
        };
        let state_text = match (identity, interface.is_empty()) {
            (None, _) => "waiting for an identity".to_owned(),
            (Some(_), true) => "waiting for its interface (no route to its IPs)".to_owned(),
            (Some(_), false) if !local.interfaces.contains_key(&interface) => {
                format!("waiting for interface {interface}")
            }
            (Some(_), false) if !outside.is_empty() => {
                "refused: IPs outside this node's pod CIDRs".to_owned()
            }
            (Some(_), false) => READY.to_owned(),
        };
        if let Some(identity) = identity
            && !interface.is_empty()
            && outside.is_empty()
        {
            plan.endpoints.insert(interface.clone(), identity);
        }
        plan.views.push(EndpointView {
            name: format!("{}/{}", endpoint.namespace, endpoint.name),
            identity,
            labels: labels.to_string(),
            ips: endpoint.ips.clone(),
            interface,
            ingress: false,
            egress: false,
            state: state_text,
        });
    }
    // An IP two endpoints claim gets neither identity: which one is right is not ours to guess.
    for ip in conflicts {
        plan.workload_ips.remove(&ip);
    }
    plan
}

/// Stable node-local identities for the prefixes the policies' CIDR rules name.
fn cidr_identities(policies: &[Policy], current: &BTreeMap<IpNet, u32>) -> BTreeMap<IpNet, u32> {
    let wanted = compile::cidr_prefixes(policies);
    let mut kept: BTreeMap<IpNet, u32> = current
        .iter()
        .filter(|(prefix, _)| wanted.contains(*prefix))
        .map(|(p, id)| (*p, *id))
        .collect();
    let mut used: BTreeSet<u32> = kept.values().copied().collect();
    let mut next = FIRST_CIDR_IDENTITY;
    for prefix in wanted {
        if kept.contains_key(&prefix) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        used.insert(next);
        kept.insert(prefix, next);
    }
    kept
}

/// The policy table's rules for `compiled`.
#[must_use]
pub fn table_rules(compiled: &Compiled) -> Vec<(PolicyRule, PolicyVerdict)> {
    compiled
        .entries
        .iter()
        .map(|(key, verdict)| {
            let rule = PolicyRule {
                subject: key.subject,
                peer: (key.peer != nodeseal_bpf::identity::ANY).then_some(key.peer),
                protocol: (key.protocol != 0).then_some(key.protocol),
                port: (key.port != 0).then_some(key.port),
                direction: match key.direction {
                    Direction::Ingress => PolicyDirection::Ingress,
                    Direction::Egress => PolicyDirection::Egress,
                },
            };
            let verdict = match verdict {
                Verdict::Allow => PolicyVerdict::Allow,
                Verdict::Deny => PolicyVerdict::Deny,
            };
            (rule, verdict)
        })
        .collect()
}

fn program_of(compiled: &Compiled, plan: &Plan, identities: &Identities) -> PolicyProgram {
    let rules = table_rules(compiled);
    let endpoints = plan
        .endpoints
        .iter()
        .map(|(ifname, identity)| {
            let enforcement = compiled
                .enforcement
                .get(identity)
                .copied()
                .unwrap_or_default();
            (
                ifname.clone(),
                (
                    *identity,
                    Enforcement {
                        ingress: enforcement.ingress,
                        egress: enforcement.egress,
                    },
                ),
            )
        })
        .collect();
    PolicyProgram {
        rules,
        endpoints,
        workload_ips: plan.workload_ips.clone(),
        cidr_identities: identities.cidrs.clone(),
    }
}

/// The pod interface the main routing table sends `ip` to (longest match among routes through
/// interfaces starting with `prefix`), for endpoints whose record leaves the interface to the
/// node. Read from procfs, which shows the reader's network namespace.
fn route_interface(ip: IpAddr, prefix: &str) -> Option<String> {
    type RouteParser = fn(&str) -> Option<(String, IpNet)>;
    let (path, parse): (&str, RouteParser) = match ip {
        IpAddr::V4(_) => ("/proc/net/route", parse_route_v4),
        IpAddr::V6(_) => ("/proc/net/ipv6_route", parse_route_v6),
    };
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(parse)
        .filter(|(ifname, net)| ifname.starts_with(prefix) && net.contains(&ip))
        .max_by_key(|(_, net)| net.prefix_len())
        .map(|(ifname, _)| ifname)
}

/// A line of `/proc/net/route`: `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`,
/// addresses as little-endian hex.
fn parse_route_v4(line: &str) -> Option<(String, IpNet)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (ifname, dst, mask) = (fields.first()?, fields.get(1)?, fields.get(7)?);
    let dst = u32::from_str_radix(dst, 16).ok()?.swap_bytes();
    let mask = u32::from_str_radix(mask, 16).ok()?.swap_bytes();
    let len = u8::try_from(mask.count_ones()).ok()?;
    let net = IpNet::new(IpAddr::from(std::net::Ipv4Addr::from(dst)), len).ok()?;
    Some(((*ifname).to_owned(), net))
}

/// A line of `/proc/net/ipv6_route`: `dst dst_len src src_len next_hop metric refcnt use flags
/// iface`, hex.
fn parse_route_v6(line: &str) -> Option<(String, IpNet)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (dst, len, ifname) = (fields.first()?, fields.get(1)?, fields.get(9)?);
    let dst = u128::from_str_radix(dst, 16).ok()?;
    let len = u8::from_str_radix(len, 16).ok()?;
    let net = IpNet::new(IpAddr::from(std::net::Ipv6Addr::from(dst)), len).ok()?;
    Some(((*ifname).to_owned(), net))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use nodeseal_store::{Identity, IdentityNumber, NodeName, PolicyDocument, Snapshot};

    fn endpoint(node: &str, name: &str, labels: &str, ips: &[&str], interface: &str) -> Endpoint {
        Endpoint {
            node: NodeName::new(node).unwrap(),
            namespace: NodeName::new("default").unwrap(),
            name: NodeName::new(name).unwrap(),
            labels: Labels::parse([labels]).unwrap(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            interface: interface.to_owned(),
        }
    }

    fn identity_of(endpoint: &Endpoint, number: u32) -> Record {
        Record::Identity(Identity {
            number: IdentityNumber::new(number).unwrap(),
            labels: endpoint.security_labels(),
        })
    }

    fn local() -> LocalInputs {
        LocalInputs {
            node: "node0".into(),
            local_pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()],
            node_cidrs: [("node1".to_owned(), vec!["10.244.1.0/24".parse().unwrap()])].into(),
            interfaces: [("lxc0".to_owned(), 7)].into(),
            pod_interface_prefix: "lxc".into(),
        }
    }

    fn state_with(records: Vec<Record>) -> State {
        let mut state = State::default();
        state.apply(Event::Snapshot(Snapshot {
            records,
            invalid: Vec::new(),
        }));
        state
    }

    #[test]
    fn an_endpoint_lends_its_identity_only_to_ips_inside_its_nodes_pod_cidrs() {
        let deathstar = endpoint(
            "node0",
            "deathstar",
            "class=deathstar",
            &["10.244.0.10"],
            "lxc0",
        );
        // node1's record claims an address of node0's pods and one of its own.
        let forger = endpoint(
            "node1",
            "forger",
            "class=forger",
            &["10.244.0.11", "10.244.1.10"],
            "lxc0",
        );
        // A node the agent knows no pod CIDRs of gets nothing.
        let stranger = endpoint("node9", "stranger", "class=x", &["10.244.9.10"], "lxc0");
        let state = state_with(vec![
            Record::Endpoint(deathstar.clone()),
            identity_of(&deathstar, 256),
            Record::Endpoint(forger.clone()),
            identity_of(&forger, 257),
            Record::Endpoint(stranger.clone()),
            identity_of(&stranger, 258),
        ]);
        let plan = plan(&state, &local());
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(
            plan.workload_ips,
            [(ip("10.244.0.10"), 256), (ip("10.244.1.10"), 257)].into()
        );
        assert_eq!(plan.endpoints, [("lxc0".to_owned(), 256)].into());
        assert_eq!(plan.refused.len(), 2, "{:?}", plan.refused);
        assert!(
            plan.refused
                .values()
                .any(|why| why.contains("10.244.0.11") && why.contains("node1")),
            "{:?}",
            plan.refused
        );
        assert_eq!(plan.views.len(), 1);
        assert_eq!(plan.views[0].state, "ready");
    }

    #[test]
    fn an_ip_two_endpoints_claim_gets_neither_identity() {
        let a = endpoint("node1", "a", "app=a", &["10.244.1.10"], "lxc0");
        let b = endpoint(
            "node1",
            "b",
            "app=b",
            &["10.244.1.10", "10.244.1.11"],
            "lxc1",
        );
        let state = state_with(vec![
            Record::Endpoint(a.clone()),
            identity_of(&a, 256),
            Record::Endpoint(b.clone()),
            identity_of(&b, 257),
        ]);
        let plan = plan(&state, &local());
        let ip: IpAddr = "10.244.1.11".parse().unwrap();
        assert_eq!(plan.workload_ips, [(ip, 257)].into());
    }

    #[test]
    fn local_endpoints_wait_for_their_identity_and_interface() {
        let no_identity = endpoint("node0", "a", "app=a", &["10.244.0.10"], "lxc0");
        let not_attached = endpoint("node0", "b", "app=b", &["10.244.0.11"], "lxc5");
        // The interface is found by route; this host has no route to a pod interface for it.
        let by_route = endpoint("node0", "c", "app=c", &["10.244.0.12"], "");
        let state = state_with(vec![
            Record::Endpoint(no_identity),
            Record::Endpoint(not_attached.clone()),
            identity_of(&not_attached, 300),
            Record::Endpoint(by_route.clone()),
            identity_of(&by_route, 301),
        ]);
        let plan = plan(&state, &local());
        let states: BTreeMap<&str, &str> = plan
            .views
            .iter()
            .map(|v| (v.name.as_str(), v.state.as_str()))
            .collect();
        assert_eq!(states["default/a"], "waiting for an identity");
        assert_eq!(states["default/b"], "waiting for interface lxc5");
        assert!(states["default/c"].starts_with("waiting for its interface"));
        // An interface that is not attached yet is programmed by name for when it is.
        assert_eq!(plan.endpoints, [("lxc5".to_owned(), 300)].into());
    }

    #[test]
    fn records_that_fail_to_parse_or_go_away_are_forgotten() {
        let a = endpoint("node0", "a", "app=a", &["10.244.0.10"], "lxc0");
        let good = PolicyDocument {
            name: NodeName::new("rule1").unwrap(),
            document: include_str!("../../policy/examples/star-wars-rule1.yaml").to_owned(),
        };
        let mut state = state_with(vec![
            Record::Endpoint(a.clone()),
            identity_of(&a, 256),
            Record::PolicyDocument(good.clone()),
        ]);
        assert_eq!(state.documents.len(), 1);
        assert_eq!(state.numbers.len(), 1);
        let key = identity_of(&a, 256).key();
        assert!(state.apply(Event::Deleted(key)));
        assert!(state.identities.is_empty() && state.numbers.is_empty());
        let bad = PolicyDocument {
            document: good.document.replace("port: \"80\"", "port: \"eighty\""),
            ..good
        };
        state.apply(Event::Put(Record::PolicyDocument(bad)));
        assert!(
            state.documents.is_empty(),
            "a refused document stands for none"
        );
        assert_eq!(state.refused.len(), 1, "{:?}", state.refused);
    }

    #[test]
    fn cidr_identities_stay_put_while_their_prefix_is_used() {
        let doc = |cidrs: &str| {
            nodeseal_policy::document::parse(
                format!(
                    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\n\
                     spec:\n  endpointSelector: {{}}\n  egress:\n  - toCIDR: [{cidrs}]\n"
                )
                .as_bytes(),
            )
            .unwrap()
        };
        let first = cidr_identities(&doc("192.0.2.0/24, 198.51.100.0/24"), &BTreeMap::new());
        assert_eq!(
            first.values().copied().collect::<Vec<_>>(),
            [FIRST_CIDR_IDENTITY, FIRST_CIDR_IDENTITY + 1]
        );
        let second = cidr_identities(&doc("198.51.100.0/24, 203.0.113.0/24"), &first);
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        assert_eq!(second[&net("198.51.100.0/24")], FIRST_CIDR_IDENTITY + 1);
        assert_eq!(second[&net("203.0.113.0/24")], FIRST_CIDR_IDENTITY);
        assert_eq!(second.len(), 2);
    }

    #[test]
    fn procfs_routes_parse() {
        assert_eq!(
            parse_route_v4("lxc0\t0AF4000A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0"),
            Some(("lxc0".to_owned(), "10.0.244.10/32".parse().unwrap()))
        );
        assert_eq!(parse_route_v4("Iface\tDestination\tGateway"), None);
        assert_eq!(
            parse_route_v6(
                "fd000000000000000000000000000010 80 00000000000000000000000000000000 00 \
                 00000000000000000000000000000000 00000100 00000001 00000000 00000001 lxc1"
            ),
            Some(("lxc1".to_owned(), "fd00::10/128".parse().unwrap()))
        );
        assert_eq!(parse_route_v6("garbage"), None);
    }
}
