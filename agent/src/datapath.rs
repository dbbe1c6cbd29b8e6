//! The agent's view of the eBPF datapath: which interfaces carry which program, and what the
//! nodes, peer-slot and ipcache maps say about each peer.
//!
//! Map writes are single syscalls, so they run inline under a `std` mutex that is never held
//! across an `.await`. Maps are pinned (`bpf/loader`), so a restarted agent finds the previous
//! agent's node ids and slots and traffic keeps its keys until the new agent flips them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use nodeseal_bpf::{
    Attachment, Datapath, DatapathConfig, DropReason, Enforcement, Location, Mode, NodeId,
    PolicyRule, PolicyVerdict, Prefix, identity,
};
use tracing::{debug, info, warn};

use crate::peer::ipsec::KeySlot;

/// Errors of the datapath wiring.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Loading or verifying the programs failed.
    #[error("loading the eBPF datapath from {pin_root}")]
    Load {
        /// Pin root used.
        pin_root: PathBuf,
        /// Cause.
        #[source]
        source: Box<nodeseal_bpf::LoadError>,
    },
    /// Attaching a program failed.
    #[error("attaching {attachment:?} to {ifname}")]
    Attach {
        /// What.
        attachment: Attachment,
        /// Where.
        ifname: String,
        /// Cause.
        #[source]
        source: Box<nodeseal_bpf::AttachError>,
    },
    /// A map operation failed.
    #[error("updating eBPF map for {what}")]
    Map {
        /// What was being written.
        what: String,
        /// Cause.
        #[source]
        source: Box<nodeseal_bpf::MapError>,
    },
    /// Every 16-bit node id is taken.
    #[error("no free node id left")]
    NodeIdsExhausted,
    /// Removing the pins failed.
    #[error("removing the eBPF pins under {pin_root}")]
    Unpin {
        /// Pin root.
        pin_root: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Listing interfaces failed.
    #[error("listing network interfaces")]
    Interfaces(#[source] std::io::Error),
    /// The events ring buffer's fd could not be duplicated.
    #[error("duplicating the events ring buffer fd")]
    Events(#[source] std::io::Error),
    /// The mutex was poisoned by a panic elsewhere (our bug).
    #[error("BUG: datapath lock poisoned")]
    Poisoned,
}

/// Settings the datapath is loaded with.
#[derive(Clone, Debug)]
pub struct DatapathSettings {
    /// bpffs directory for this agent's maps and links.
    pub pin_root: PathBuf,
    /// The node's uplink (ESP and peer traffic arrive here).
    pub uplink: String,
    /// Host-side pod veths start with this.
    pub pod_interface_prefix: String,
    /// Drop instead of sending in clear / accepting clear.
    pub strict: bool,
    /// This node's pod CIDRs.
    pub local_pod_cidrs: Vec<IpNet>,
    /// The encryption mode (IPsec: pod traffic gets the encryption mark; WireGuard: routing
    /// takes it into the link).
    pub mode: Mode,
    /// Pods' traffic to remote node IPs is tunnel traffic too (strict mode drops it to a peer
    /// without keys), and in strict mode plaintext from remote node IPs is dropped unless on
    /// one of `clear_ports`.
    pub node_encryption: bool,
    /// (IP protocol, port) pairs on which remote node IPs may send in clear.
    pub clear_ports: Vec<(u8, u16)>,
}

/// What an endpoint entry of the datapath says: its identity and enforced directions.
pub type EndpointEntry = (u32, Enforcement);

/// The fallback entry of a pod interface no endpoint describes.
const UNMANAGED_ENDPOINT: EndpointEntry = (
    identity::UNMANAGED,
    Enforcement {
        ingress: false,
        egress: false,
    },
);

struct Inner {
    dp: Datapath,
    /// Pod interfaces with programs attached: name → ifindex.
    attached_pods: BTreeMap<String, u32>,
    /// The endpoint entry each pod interface should have (by name; the policy engine's view).
    /// Interfaces missing here are unmanaged.
    endpoints: BTreeMap<String, EndpointEntry>,
    /// The endpoint entry written for each ifindex.
    endpoints_written: BTreeMap<u32, EndpointEntry>,
    /// Entries the policy engine layers over the node-owned prefixes of the ipcache.
    overlays: Overlays,
    /// Node IPs admitted (their host prefixes belong to the nodes, never to an overlay).
    node_ips: BTreeSet<IpAddr>,
    local_pod_cidrs: Vec<IpNet>,
    /// Whether [`DatapathHandle::program_policy`] ran: until then a previous agent's endpoint
    /// entries are kept, so that a restart never lifts enforcement.
    policy_programmed: bool,
    used_ids: BTreeSet<u16>,
    /// Pod CIDRs published for peers ([`DatapathHandle::set_peer_routes`]), so that a CIDR a
    /// revoked node gives up goes back to the member that claims it too.
    routes: BTreeMap<IpNet, NodeId>,
    /// Revoked nodes (by name) whose pod CIDRs are kept in the ipcache as
    /// [`Location::RevokedPod`]. A CIDR listed here is never published for a peer.
    revoked: BTreeMap<String, Vec<IpNet>>,
}

/// Ipcache entries for single workloads and policy CIDRs, layered over the prefixes the
/// datapath owns (pod CIDRs, node IPs). An overlay may only refine who an address is, never
/// where it lives: a pod IP gets its identity only inside the pod CIDR of a member (with that
/// member's location) or of this node; a policy CIDR never lies inside a cluster prefix.
#[derive(Default)]
struct Overlays {
    /// Pod IP → the identity of its endpoint.
    workloads: BTreeMap<IpAddr, u32>,
    /// Policy CIDR → its CIDR identity.
    cidrs: BTreeMap<IpNet, u32>,
    /// Prefixes written, with what.
    written: BTreeMap<IpNet, (u32, Location)>,
}

impl Inner {
    fn is_revoked_cidr(&self, cidr: &IpNet) -> bool {
        self.revoked.values().any(|cidrs| cidrs.contains(cidr))
    }

    /// Where the pod at `ip` lives, if it is inside a pod CIDR of this node or of a member
    /// that is not revoked (longest match).
    fn pod_location(&self, ip: IpAddr) -> Option<Location> {
        if self.local_pod_cidrs.iter().any(|c| c.contains(&ip)) {
            return Some(Location::LocalPod);
        }
        if self.revoked.values().flatten().any(|c| c.contains(&ip)) {
            return None;
        }
        self.routes
            .iter()
            .filter(|(cidr, _)| cidr.contains(&ip))
            .max_by_key(|(cidr, _)| cidr.prefix_len())
            .map(|(_, id)| Location::RemotePod(*id))
    }

    /// Whether `cidr` may carry a policy CIDR identity: it must not lie inside (or be) a
    /// prefix of the cluster, whose addresses get their identity and location from it.
    fn is_outside_cluster(&self, cidr: &IpNet) -> bool {
        let inside = |c: &IpNet| c.contains(cidr);
        !(self.local_pod_cidrs.iter().any(inside)
            || self.routes.keys().any(inside)
            || self.revoked.values().flatten().any(inside)
            || self
                .node_ips
                .iter()
                .any(|ip| cidr.contains(ip) && cidr.prefix_len() == cidr.max_prefix_len()))
    }

    /// The overlay entries wanted inside `within` (all when `None`).
    fn wanted_overlays(&self, within: Option<IpNet>) -> BTreeMap<IpNet, (u32, Location)> {
        let mut wanted = BTreeMap::new();
        let inside = |net: &IpNet| within.is_none_or(|w| w.contains(net));
        for (cidr, id) in &self.overlays.cidrs {
            if inside(cidr) && self.is_outside_cluster(cidr) {
                wanted.insert(*cidr, (*id, Location::External));
            }
        }
        // After the CIDRs: a workload's own identity wins over a policy CIDR naming its IP.
        for (ip, id) in &self.overlays.workloads {
            let host = IpNet::from(*ip);
            if inside(&host)
                && let Some(location) = self.pod_location(*ip)
            {
                wanted.insert(host, (*id, location));
            }
        }
        wanted
    }

    /// Brings the overlay entries inside `within` (all when `None`) in line with what is
    /// wanted; returns the number of ipcache entries written. Inside a prefix just rewritten,
    /// entries are written even when `written` says they are there: that write may have
    /// replaced one of the same length. A whole refresh (a policy program) writes only what
    /// changed, as every base write refreshes the overlays within its prefix right after.
    fn refresh_overlays(&mut self, within: Option<IpNet>) -> Result<usize, DatapathError> {
        let wanted = self.wanted_overlays(within);
        let stale: Vec<IpNet> = self
            .overlays
            .written
            .keys()
            .filter(|net| within.is_none_or(|w| w.contains(*net)) && !wanted.contains_key(*net))
            .copied()
            .collect();
        let mut writes = stale.len();
        for net in stale {
            self.overlays.written.remove(&net);
            self.restore_base(net)?;
        }
        for (net, (id, location)) in wanted {
            if within.is_none() && self.overlays.written.get(&net) == Some(&(id, location)) {
                continue;
            }
            self.dp
                .ipcache
                .insert(prefix(net)?, id, location)
                .map_err(map_err(format!("identity {id} of {net}")))?;
            self.overlays.written.insert(net, (id, location));
            writes += 1;
        }
        Ok(writes)
    }

    /// Removes an overlay at `net`, putting back the entry the datapath owns there, if any.
    fn restore_base(&mut self, net: IpNet) -> Result<(), DatapathError> {
        if self.local_pod_cidrs.contains(&net) {
            return self
                .dp
                .ipcache
                .insert(prefix(net)?, identity::UNMANAGED, Location::LocalPod)
                .map_err(map_err(format!("local pod CIDR {net}")));
        }
        if self.is_revoked_cidr(&net) {
            return self.write_revoked(net);
        }
        if let Some(id) = self.routes.get(&net).copied() {
            return self
                .dp
                .ipcache
                .insert(prefix(net)?, identity::UNMANAGED, Location::RemotePod(id))
                .map_err(map_err(format!("pod CIDR {net}")));
        }
        // Already gone is fine.
        let _ = self.dp.ipcache.remove(prefix(net)?);
        Ok(())
    }

    /// Writes the endpoint entry of an attached interface when it differs from the one
    /// written; returns whether it wrote.
    fn write_endpoint(
        &mut self,
        ifindex: u32,
        entry: EndpointEntry,
    ) -> Result<bool, DatapathError> {
        if self.endpoints_written.get(&ifindex) == Some(&entry) {
            return Ok(false);
        }
        self.dp
            .endpoints
            .insert(ifindex, entry.0, entry.1)
            .map_err(map_err(format!("endpoint of ifindex {ifindex}")))?;
        self.endpoints_written.insert(ifindex, entry);
        Ok(true)
    }

    fn wanted_endpoint(&self, ifname: &str) -> EndpointEntry {
        self.endpoints
            .get(ifname)
            .copied()
            .unwrap_or(UNMANAGED_ENDPOINT)
    }

    fn write_revoked(&mut self, cidr: IpNet) -> Result<(), DatapathError> {
        // WORLD: a revoked node's pods are no workloads of the cluster for policy either.
        self.dp
            .ipcache
            .insert(prefix(cidr)?, identity::WORLD, Location::RevokedPod)
            .map_err(map_err(format!("revoked pod CIDR {cidr}")))
    }

    /// Gives a CIDR no revoked node lists any more back to the member that claims it, or
    /// removes it (an unknown address like any other).
    fn release_revoked(&mut self, cidr: IpNet) -> Result<(), DatapathError> {
        if self.is_revoked_cidr(&cidr) {
            return Ok(());
        }
        match self.routes.get(&cidr).copied() {
            Some(id) => {
                self.dp
                    .ipcache
                    .insert(prefix(cidr)?, identity::UNMANAGED, Location::RemotePod(id))
                    .map_err(map_err(format!("pod CIDR {cidr}")))?;
            }
            None => {
                // Already gone is fine.
                let _ = self.dp.ipcache.remove(prefix(cidr)?);
            }
        }
        self.refresh_overlays(Some(cidr)).map(|_| ())
    }
}

/// Cheap-clone handle to the loaded datapath.
#[derive(Clone)]
pub struct DatapathHandle {
    inner: Arc<Mutex<Inner>>,
    settings: Arc<DatapathSettings>,
}

impl std::fmt::Debug for DatapathHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathHandle")
            .field("pin_root", &self.settings.pin_root)
            .finish_non_exhaustive()
    }
}

fn map_err(what: impl Into<String>) -> impl FnOnce(nodeseal_bpf::MapError) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Map {
        what,
        source: Box::new(source),
    }
}

impl DatapathHandle {
    /// Loads (or reopens, after a restart) the datapath, writes its config and the local pod
    /// CIDRs, and attaches `from_network` to the uplink.
    ///
    /// # Errors
    /// [`DatapathError`] naming the step.
    pub fn load(settings: DatapathSettings) -> Result<Self, DatapathError> {
        let mut dp = Datapath::load(&settings.pin_root).map_err(|source| DatapathError::Load {
            pin_root: settings.pin_root.clone(),
            source: Box::new(source),
        })?;
        // Before the config: a restarted agent's programs are attached already.
        dp.clear_ports
            .set(&settings.clear_ports)
            .map_err(map_err("ports that stay in clear"))?;
        dp.config
            .set(DatapathConfig {
                mode: settings.mode,
                local_node: None,
                strict_egress: settings.strict,
                strict_ingress: settings.strict,
                node_encryption: settings.node_encryption,
                trace: false,
            })
            .map_err(map_err("config"))?;
        for cidr in &settings.local_pod_cidrs {
            dp.ipcache
                .insert(prefix(*cidr)?, identity::UNMANAGED, Location::LocalPod)
                .map_err(map_err(format!("local pod CIDR {cidr}")))?;
        }
        dp.attach(Attachment::FromNetwork, &settings.uplink)
            .map_err(|source| DatapathError::Attach {
                attachment: Attachment::FromNetwork,
                ifname: settings.uplink.clone(),
                source: Box::new(source),
            })?;
        info!(uplink = %settings.uplink, pin_root = %settings.pin_root.display(), "eBPF datapath attached");
        let overlays = Overlays {
            written: pinned_overlays(&dp),
            ..Overlays::default()
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                dp,
                attached_pods: BTreeMap::new(),
                endpoints: BTreeMap::new(),
                endpoints_written: BTreeMap::new(),
                overlays,
                node_ips: BTreeSet::new(),
                local_pod_cidrs: settings.local_pod_cidrs.clone(),
                policy_programmed: false,
                used_ids: BTreeSet::new(),
                routes: BTreeMap::new(),
                revoked: BTreeMap::new(),
            })),
            settings: Arc::new(settings),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, DatapathError> {
        self.inner.lock().map_err(|_| DatapathError::Poisoned)
    }

    /// Attaches `from_pod`/`to_pod` to pod interfaces that appeared and registers them as
    /// endpoints (with the entry [`Self::program_policy`] gave their name, else as unmanaged);
    /// forgets the ones that went away. Returns how many were attached now.
    ///
    /// # Errors
    /// [`DatapathError`]; an interface that vanished meanwhile is skipped.
    pub fn sync_pod_interfaces(&self) -> Result<usize, DatapathError> {
        let present = list_interfaces(&self.settings.pod_interface_prefix)?;
        let mut inner = self.lock()?;
        let mut attached = 0;
        for (ifname, ifindex) in &present {
            // The same name with another ifindex is a new interface (a pod replaced).
            if inner.attached_pods.get(ifname) == Some(ifindex) {
                continue;
            }
            for attachment in [Attachment::FromPod, Attachment::ToPod] {
                if let Err(source) = inner.dp.attach(attachment, ifname) {
                    warn!(ifname, error = %source, "cannot attach to pod interface");
                    continue;
                }
            }
            let pinned = if inner.policy_programmed {
                None
            } else {
                inner.dp.endpoints.get(*ifindex).ok().flatten()
            };
            let entry = match pinned {
                Some(entry) => {
                    inner.endpoints_written.insert(*ifindex, entry);
                    entry
                }
                None => {
                    let entry = inner.wanted_endpoint(ifname);
                    inner.endpoints_written.remove(ifindex);
                    inner.write_endpoint(*ifindex, entry)?;
                    entry
                }
            };
            inner.attached_pods.insert(ifname.clone(), *ifindex);
            attached += 1;
            debug!(
                ifname,
                ifindex,
                identity = entry.0,
                "pod interface attached"
            );
        }
        let gone: Vec<u32> = inner
            .attached_pods
            .iter()
            .filter(|(name, index)| !present.iter().any(|(n, i)| n == *name && i == *index))
            .map(|(_, index)| *index)
            .collect();
        for ifindex in gone {
            // The kernel freed the interface; its entry must not greet a later one that gets
            // the same ifindex.
            let _ = inner.dp.endpoints.remove(ifindex);
            inner.endpoints_written.remove(&ifindex);
        }
        inner
            .attached_pods
            .retain(|name, index| present.iter().any(|(n, i)| n == name && i == index));
        Ok(attached)
    }

    /// The node id for the peer at `ip`: the one a previous agent pinned, else one derived from
    /// the address (the low 16 bits of an IPv4 address), probing upwards past ids in use. The
    /// derivation makes a restarted agent pick the same ids as its predecessor even for peers it
    /// meets in another order.
    ///
    /// # Errors
    /// [`DatapathError::NodeIdsExhausted`] or a map error.
    pub fn node_id(&self, ip: IpAddr) -> Result<NodeId, DatapathError> {
        let mut inner = self.lock()?;
        if let Some(id) = inner
            .dp
            .nodes
            .get(ip)
            .map_err(map_err(format!("node {ip}")))?
        {
            inner.used_ids.insert(id.0);
            return Ok(id);
        }
        let preferred = match ip {
            IpAddr::V4(v4) => u32::from(v4) & 0xffff,
            IpAddr::V6(v6) => (u128::from(v6) & 0xffff) as u32,
        };
        let free = (0..0x1_0000u32)
            .map(|i| ((preferred + i) & 0xffff) as u16)
            .find(|id| *id != 0 && !inner.used_ids.contains(id))
            .ok_or(DatapathError::NodeIdsExhausted)?;
        inner.used_ids.insert(free);
        Ok(NodeId(free))
    }

    /// Publishes a peer's pod CIDRs: traffic to them is encrypted for it (or, in strict mode,
    /// dropped while it has no key slot) and plaintext from them is refused in strict mode.
    /// A CIDR a revoked node's record still lists stays refused (see [`Self::set_revoked`]);
    /// the peer gets it when that record goes.
    ///
    /// # Errors
    /// [`DatapathError::Map`].
    pub fn set_peer_routes(&self, id: NodeId, pod_cidrs: &[IpNet]) -> Result<(), DatapathError> {
        let mut inner = self.lock()?;
        for cidr in pod_cidrs {
            inner.routes.insert(*cidr, id);
            if inner.is_revoked_cidr(cidr) {
                warn!(node_id = id.0, %cidr, "pod CIDR is a revoked node's; kept refused");
                continue;
            }
            inner
                .dp
                .ipcache
                .insert(prefix(*cidr)?, identity::UNMANAGED, Location::RemotePod(id))
                .map_err(map_err(format!("pod CIDR {cidr}")))?;
            inner.refresh_overlays(Some(*cidr))?;
        }
        Ok(())
    }

    /// Admits the peer's node IP once it has authenticated: ESP from it is accepted from then on
    /// (before that it is dropped as from an unknown node).
    ///
    /// # Errors
    /// [`DatapathError::Map`].
    pub fn admit_node(&self, id: NodeId, ip: IpAddr) -> Result<(), DatapathError> {
        self.lock()?
            .dp
            .nodes
            .insert(ip, id)
            .map_err(map_err(format!("node {ip}")))?;
        self.add_node_address(id, ip)
    }

    /// Gives `ip` the identity of a remote node, `id` (a dual-stack peer's other node IP; its
    /// tunnel's is added by [`DatapathHandle::admit_node`]).
    ///
    /// # Errors
    /// [`DatapathError::Map`].
    pub fn add_node_address(&self, id: NodeId, ip: IpAddr) -> Result<(), DatapathError> {
        let mut inner = self.lock()?;
        if inner.node_ips.insert(ip) {
            inner.refresh_overlays(Some(IpNet::from(ip)))?;
        }
        inner
            .dp
            .ipcache
            .insert(
                Prefix::host(ip),
                identity::REMOTE_NODE,
                Location::RemoteNode(id),
            )
            .map_err(map_err(format!("node IP {ip}")))
    }

    /// Switches traffic to the peer to `slot` (one map write), or marks it not ready.
    ///
    /// # Errors
    /// [`DatapathError::Map`].
    pub fn set_slot(&self, id: NodeId, slot: Option<KeySlot>) -> Result<(), DatapathError> {
        self.lock()?
            .dp
            .peer_slots
            .set(id, slot.map(KeySlot::get))
            .map_err(map_err(format!("slot of node {}", id.0)))
    }

    /// The slot the datapath uses for the peer now (a previous agent's, after a restart).
    ///
    /// # Errors
    /// [`DatapathError::Map`].
    pub fn slot(&self, id: NodeId) -> Result<Option<KeySlot>, DatapathError> {
        let slot = self
            .lock()?
            .dp
            .peer_slots
            .get(id)
            .map_err(map_err(format!("slot of node {}", id.0)))?;
        Ok(slot.and_then(KeySlot::new))
    }

    /// Removes a peer: its ESP is dropped as from an unknown node, and its pods count as
    /// outside the fabric, except the pod CIDRs of revoked nodes, which stay refused.
    ///
    /// # Errors
    /// [`DatapathError::Map`] (entries already gone are fine).
    pub fn remove_peer(
        &self,
        id: NodeId,
        ips: &[IpAddr],
        pod_cidrs: &[IpNet],
    ) -> Result<(), DatapathError> {
        let mut inner = self.lock()?;
        let _ = inner.dp.peer_slots.set(id, None);
        for ip in ips {
            let _ = inner.dp.nodes.remove(*ip);
            let _ = inner.dp.ipcache.remove(Prefix::host(*ip));
            inner.node_ips.remove(ip);
        }
        for cidr in pod_cidrs {
            if inner.routes.get(cidr) == Some(&id) {
                inner.routes.remove(cidr);
            }
            // Before the CIDR goes: its pods' identities must not outlive it and keep
            // pointing at the peer.
            inner.refresh_overlays(Some(*cidr))?;
            if inner.is_revoked_cidr(cidr) {
                // Written again rather than left alone: the peer's task may have published
                // the CIDR after the revocation did.
                inner.write_revoked(*cidr)?;
            } else {
                let _ = inner.dp.ipcache.remove(prefix(*cidr)?);
            }
        }
        inner.used_ids.remove(&id.0);
        Ok(())
    }

    /// Keeps a revoked node's pod CIDRs in the ipcache as [`Location::RevokedPod`], in place
    /// of whatever entry they had: plaintext from them is dropped (`revoked_source`) whenever
    /// encryption is on, traffic to them is never encrypted (strict egress drops it). The
    /// CIDRs recorded for `node` before and not listed now are released. Returns whether
    /// anything changed.
    ///
    /// Removing them instead, as for a node that leaves, would make the node's pods unknown
    /// addresses, which pass: a revoked node would be less restricted than a member. They go
    /// only with the node's record ([`Self::forget_revoked`]).
    ///
    /// # Errors
    /// [`DatapathError::Map`].
    pub fn set_revoked(&self, node: &str, pod_cidrs: &[IpNet]) -> Result<bool, DatapathError> {
        let mut inner = self.lock()?;
        let old = inner
            .revoked
            .insert(node.to_owned(), pod_cidrs.to_vec())
            .unwrap_or_default();
        for cidr in pod_cidrs {
            // Its pods' identities go first: they point at the node, and would keep its traffic
            // encrypted for it over the refused CIDR.
            inner.refresh_overlays(Some(*cidr))?;
            inner.write_revoked(*cidr)?;
        }
        for cidr in old.iter().filter(|c| !pod_cidrs.contains(c)) {
            inner.release_revoked(*cidr)?;
        }
        Ok(old != pod_cidrs)
    }

    /// Forgets a revoked node whose record was deleted: its pod CIDRs go back to a member
    /// claiming them, or become unknown addresses like any other. Returns whether the node was
    /// kept revoked.
    ///
    /// # Errors
    /// [`DatapathError::Map`].
    pub fn forget_revoked(&self, node: &str) -> Result<bool, DatapathError> {
        let mut inner = self.lock()?;
        let Some(cidrs) = inner.revoked.remove(node) else {
            return Ok(false);
        };
        for cidr in cidrs {
            inner.release_revoked(cidr)?;
        }
        Ok(true)
    }

    /// The revoked nodes whose pod CIDRs are kept refused.
    ///
    /// # Errors
    /// [`DatapathError::Poisoned`].
    pub fn revoked_nodes(&self) -> Result<Vec<String>, DatapathError> {
        Ok(self.lock()?.revoked.keys().cloned().collect())
    }

    /// Programs identity policy: the policy table, the endpoint entry of each pod interface
    /// (by name; others are unmanaged) and the identities of pod IPs and policy CIDRs in the
    /// ipcache.
    ///
    /// An allowed flow is never dropped on the way from the old to the new state, provided
    /// the new table has entries for every identity an endpoint has before and after (the
    /// engine's two-step identity change): endpoints first lose the enforcement they do not
    /// keep, then the table is replaced in one step, then endpoints get their new identity and
    /// enforcement, and last the ipcache, whose identities the table already knows.
    ///
    /// # Errors
    /// [`DatapathError::Map`]; the table stays as it was when its replacement fails.
    pub fn program_policy(&self, program: PolicyProgram) -> Result<PolicyWrites, DatapathError> {
        let mut inner = self.lock()?;
        let attached: Vec<(String, u32)> = inner
            .attached_pods
            .iter()
            .map(|(name, index)| (name.clone(), *index))
            .collect();
        let wanted = |name: &str| {
            program
                .endpoints
                .get(name)
                .copied()
                .unwrap_or(UNMANAGED_ENDPOINT)
        };
        let mut writes = PolicyWrites::default();
        for (name, ifindex) in &attached {
            if let Some(&(old_id, old)) = inner.endpoints_written.get(ifindex) {
                let new = wanted(name).1;
                let kept = Enforcement {
                    ingress: old.ingress && new.ingress,
                    egress: old.egress && new.egress,
                };
                writes.endpoints += usize::from(inner.write_endpoint(*ifindex, (old_id, kept))?);
            }
        }
        inner
            .dp
            .policy
            .replace_all(program.rules)
            .map_err(map_err("policy table"))?;
        if let Some(table) = inner.dp.policy.last_publication() {
            writes.rules_changed = table.rules_changed;
            writes.table_slots = table.slots_written;
            writes.table_rebuilt = table.rebuilt;
        }
        for (name, ifindex) in &attached {
            writes.endpoints += usize::from(inner.write_endpoint(*ifindex, wanted(name))?);
        }
        inner.endpoints = program.endpoints;
        inner.policy_programmed = true;
        inner.overlays.workloads = program.workload_ips;
        inner.overlays.cidrs = program.cidr_identities;
        writes.ipcache = inner.refresh_overlays(None)?;
        Ok(writes)
    }

    /// The pod interfaces attached now, by name, with their ifindex.
    ///
    /// # Errors
    /// [`DatapathError::Poisoned`].
    pub fn pod_interfaces(&self) -> Result<BTreeMap<String, u32>, DatapathError> {
        Ok(self.lock()?.attached_pods.clone())
    }

    /// Detaches every program of this datapath (uplink and pod interfaces) and removes every
    /// pin: the uninstall path. Maps and programs die when this process closes them; nothing
    /// of the datapath survives it. Returns the detach failures (each logged), which do not
    /// stop the rest.
    ///
    /// # Errors
    /// [`DatapathError::Unpin`] when the pin root cannot be removed.
    pub fn remove_from_kernel(&self) -> Result<usize, DatapathError> {
        let mut inner = self.lock()?;
        remove_datapath(&mut inner.dp, &self.settings)
    }

    /// Drop counters by reason.
    ///
    /// # Errors
    /// [`DatapathError::Map`].
    pub fn drop_counters(&self) -> Result<Vec<(DropReason, u64)>, DatapathError> {
        self.lock()?
            .dp
            .counters
            .all()
            .map_err(map_err("drop counters"))
    }
}

/// What one [`DatapathHandle::program_policy`] wrote into the maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyWrites {
    /// Policy table rules added, removed or given another verdict.
    pub rules_changed: usize,
    /// Policy table slots written.
    pub table_slots: usize,
    /// The policy table was laid out from scratch.
    pub table_rebuilt: bool,
    /// ipcache entries written or restored.
    pub ipcache: usize,
    /// Endpoint entries written.
    pub endpoints: usize,
}

impl PolicyWrites {
    /// Adds the writes of `other`, a program made just before this one.
    pub fn add(&mut self, other: &Self) {
        self.rules_changed += other.rules_changed;
        self.table_slots += other.table_slots;
        self.table_rebuilt |= other.table_rebuilt;
        self.ipcache += other.ipcache;
        self.endpoints += other.endpoints;
    }
}

/// Everything [`DatapathHandle::program_policy`] writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyProgram {
    /// The policy table.
    pub rules: Vec<(PolicyRule, PolicyVerdict)>,
    /// Pod interface name → its endpoint entry.
    pub endpoints: BTreeMap<String, EndpointEntry>,
    /// Pod IP (of any node) → its endpoint's identity. Written only inside a pod CIDR of this
    /// node or of a member that is not revoked.
    pub workload_ips: BTreeMap<IpAddr, u32>,
    /// Policy CIDR → its identity. Written only outside the cluster's prefixes.
    pub cidr_identities: BTreeMap<IpNet, u32>,
}

// Observability (`crate::observe`): events, tracing and policy verdict counters. Kept together
// so that they stay apart from the endpoint and policy programming above.
impl DatapathHandle {
    /// A duplicate of the `EVENTS` ring buffer's fd, for readiness polling (tokio `AsyncFd`)
    /// without holding the lock while waiting.
    ///
    /// # Errors
    /// [`DatapathError::Events`] when the fd cannot be duplicated.
    pub fn events_fd(&self) -> Result<std::os::fd::OwnedFd, DatapathError> {
        use std::os::fd::AsFd as _;
        self.lock()?
            .dp
            .events
            .ring()
            .as_fd()
            .try_clone_to_owned()
            .map_err(DatapathError::Events)
    }

    /// Takes at most `limit` events from the ring buffer (under the lock, which a bounded
    /// batch keeps short for the map writers).
    ///
    /// # Errors
    /// [`DatapathError::Poisoned`].
    pub fn drain_events(
        &self,
        limit: usize,
    ) -> Result<Vec<Result<nodeseal_bpf::DropEvent, nodeseal_bpf::EventError>>, DatapathError> {
        Ok(self.lock()?.dp.events.drain_up_to(limit))
    }

    /// Turns trace events for passed packets on or off (the rest of the config is kept).
    ///
    /// # Errors
    /// [`DatapathError::Map`].
    pub fn set_trace(&self, on: bool) -> Result<(), DatapathError> {
        let mut inner = self.lock()?;
        let mut config = inner.dp.config.get().map_err(map_err("config"))?;
        if config.trace != on {
            config.trace = on;
            inner.dp.config.set(config).map_err(map_err("config"))?;
            info!(trace = on, "datapath trace events switched");
        }
        Ok(())
    }

    /// The policy decisions the datapath counted.
    ///
    /// # Errors
    /// [`DatapathError::Map`].
    pub fn policy_verdicts(&self) -> Result<nodeseal_bpf::PolicyVerdictCounts, DatapathError> {
        self.lock()?
            .dp
            .policy_verdicts
            .all()
            .map_err(map_err("policy verdict counters"))
    }
}

/// Removes a datapath a previous agent left pinned under `settings.pin_root` (this agent runs
/// with encryption off, or is cleaning up after one), as
/// [`DatapathHandle::remove_from_kernel`]. Returns `None` when there is nothing pinned.
///
/// # Errors
/// [`DatapathError::Load`] when the pins cannot be reopened (e.g. another agent holds them),
/// [`DatapathError::Unpin`].
pub fn remove_pinned(settings: &DatapathSettings) -> Result<Option<usize>, DatapathError> {
    if !settings.pin_root.exists() {
        return Ok(None);
    }
    // Reopening takes the pin root's lock, so a running agent's datapath is never removed
    // under it.
    let mut dp = Datapath::load(&settings.pin_root).map_err(|source| DatapathError::Load {
        pin_root: settings.pin_root.clone(),
        source: Box::new(source),
    })?;
    remove_datapath(&mut dp, settings).map(Some)
}

fn remove_datapath(dp: &mut Datapath, settings: &DatapathSettings) -> Result<usize, DatapathError> {
    let mut failures = 0;
    let mut detach = |attachment, ifname: &str| {
        if let Err(e) = dp.detach(attachment, ifname) {
            failures += 1;
            warn!(?attachment, ifname, error = %e, "cannot detach eBPF program");
        }
    };
    detach(Attachment::FromNetwork, &settings.uplink);
    for (ifname, _) in list_interfaces(&settings.pod_interface_prefix)? {
        detach(Attachment::FromPod, &ifname);
        detach(Attachment::ToPod, &ifname);
    }
    match std::fs::remove_dir_all(&settings.pin_root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DatapathError::Unpin {
                pin_root: settings.pin_root.clone(),
                source,
            });
        }
    }
    info!(pin_root = %settings.pin_root.display(), detach_failures = failures, "eBPF datapath removed");
    Ok(failures)
}

/// First identity of the policy CIDRs (Cilium's local identity scope): node-local numbers,
/// never allocated cluster-wide.
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;

/// The overlay entries a previous agent left in the pinned ipcache: pod IPs with an identity
/// and policy CIDRs. Adopted as written, so that the first [`DatapathHandle::program_policy`]
/// removes the ones nobody wants any more.
fn pinned_overlays(dp: &Datapath) -> BTreeMap<IpNet, (u32, Location)> {
    let entries = match dp.ipcache.entries() {
        Ok(entries) => entries,
        Err(e) => {
            warn!(error = %e, "cannot read the pinned ipcache; stale pod identities may remain until the pod CIDR is rewritten");
            return BTreeMap::new();
        }
    };
    entries
        .into_iter()
        .filter(|(prefix, id, location)| {
            let host = prefix.prefix_len() == if prefix.addr().is_ipv4() { 32 } else { 128 };
            match location {
                Location::LocalPod | Location::RemotePod(_) => host,
                Location::External => *id >= FIRST_CIDR_IDENTITY,
                _ => false,
            }
        })
        .filter_map(|(prefix, id, location)| {
            IpNet::new(prefix.addr(), prefix.prefix_len())
                .ok()
                .map(|net| (net, (id, location)))
        })
        .collect()
}

fn prefix(cidr: IpNet) -> Result<Prefix, DatapathError> {
    Prefix::new(cidr.network(), cidr.prefix_len()).map_err(map_err(format!("prefix {cidr}")))
}

/// Interfaces of this network namespace whose name starts with `prefix`, with their ifindex.
/// (`if_nameindex(3)` asks the kernel through a socket of the caller's namespace; sysfs would
/// show the namespace of whoever mounted it.)
fn list_interfaces(prefix: &str) -> Result<Vec<(String, u32)>, DatapathError> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, or null on error.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(DatapathError::Interfaces(std::io::Error::last_os_error()));
    }
    let mut found = Vec::new();
    let mut cursor = head;
    // SAFETY: every entry up to the terminating one (index 0, null name) is valid, and names are
    // NUL-terminated; the array is freed once, after the last read.
    unsafe {
        while (*cursor).if_index != 0 && !(*cursor).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*cursor).if_name)
                .to_string_lossy()
                .into_owned();
            if name.starts_with(prefix) {
                found.push((name, (*cursor).if_index));
            }
            cursor = cursor.add(1);
        }
        libc::if_freenameindex(head);
    }
    found.sort();
    Ok(found)
}
