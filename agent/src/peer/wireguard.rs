//! The WireGuard tunnel: a peer is one entry on the node's WireGuard device, and an epoch is the
//! preshared key that entry carries.
//!
//! The peer's public key is taken only from its Hello, which arrived inside the mutual-TLS
//! channel whose certificate the handshake verified; a key from the store or anywhere else
//! would let whoever writes the store impersonate the node. The preshared key of every epoch
//! comes from the TLS exporter (`SessionKeys::wg_psk`), so each rekey mixes fresh key material
//! into WireGuard's own sessions.
//!
//! A WireGuard peer holds one preshared key, so installing an epoch replaces the previous one
//! at once (WireGuard's next handshake uses it; the sessions in flight keep theirs, which is
//! what makes the change hitless). Each installed epoch remembers its key and the peer key it
//! was installed with: an epoch the peer never confirms is undone by writing the current
//! epoch's entry back. Flipping sets the peer's slot in the eBPF maps (strict mode lets traffic
//! to its pods pass once a slot is set), admits its node and routes its pod CIDRs into the link.
//!
//! Routing: the peers' pod CIDRs go into table [`ROUTE_TABLE`] (`<pod cidr> dev nodeseal0`),
//! which one rule per family at priority [`RULE_PRIORITY`] consults before the main table. A
//! peer gets its routes only once it has keys, so traffic to a peer without keys finds nothing
//! there and falls through to the main table: plaintext, unless strict mode drops it in the
//! eBPF datapath. With node encryption the peer's node IP is routed there too, and in strict
//! mode it stays routed while the peer has no keys (the host's packets are routed before any
//! eBPF program sees them; in the link, no entry means a drop); [`exemption_rules`] keep what
//! must stay outside the link out of that table.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;
use nodeseal_bpf::mark;
use nodeseal_keymgr::{Hello, Mode, NodeName, SessionKeys, WgPublicKey};
use nodeseal_wireguard::{
    DeviceRequests, Family, FwMark, Handle, LinkName, PeerConfig, PortSide, PresharedKey,
    PrivateKey, PublicKey, Rule, RulePort,
};
use rand::Rng;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use super::ipsec::KeySlot;
use super::{
    InstalledEpoch, KeyPossession, PeerDatapath, PeerEnd, PeerStatus, Tunnel, TunnelError,
    error_chain,
};

/// The UDP port WireGuard listens on unless configured otherwise.
pub const DEFAULT_PORT: u16 = 51871;

/// nodeseal's routing table: `0x4e53` ("NS"), far from the ids distributions and CNIs use
/// (main 254, local 255, Cilium's 200-202 and 2004-2005).
pub const ROUTE_TABLE: u32 = 0x4e53;
/// The priority of the rule that looks up [`ROUTE_TABLE`]: after `local` (0), before `main`
/// (32766).
pub const RULE_PRIORITY: u32 = 100;
/// The priority of the node-encryption exemptions, consulted just before [`RULE_PRIORITY`].
pub const EXEMPT_PRIORITY: u32 = RULE_PRIORITY - 1;
/// The kernel's main routing table.
const MAIN_TABLE: u32 = 254;

/// With node encryption the peers' node IPs are routed into the link, so what must stay
/// outside it is sent to the main table first: WireGuard's own UDP (the device's fwmark,
/// [`mark::MAGIC_WIREGUARD`]: otherwise its packets to a peer would loop back into the link),
/// the handshake port in both directions (keys must be agreed before the tunnel exists), and
/// the operator's exempt TCP ports (a kube-apiserver or etcd the agent reaches before keys).
#[must_use]
pub fn exemption_rules(family: Family, handshake_port: u16, exempt_tcp: &[u16]) -> Vec<Rule> {
    let main = Rule::all(family, EXEMPT_PRIORITY, MAIN_TABLE);
    let mut rules = vec![Rule {
        fwmark: Some(FwMark {
            value: mark::MAGIC_WIREGUARD,
            mask: mark::MAGIC_MASK,
        }),
        ..main
    }];
    for port in std::iter::once(handshake_port).chain(exempt_tcp.iter().copied()) {
        for side in [PortSide::Source, PortSide::Destination] {
            rules.push(Rule {
                port: Some(RulePort {
                    protocol: 6,
                    side,
                    port,
                }),
                ..main
            });
        }
    }
    rules
}

/// What every WireGuard tunnel of the node shares.
#[derive(Clone, Debug)]
pub struct WireguardSettings {
    /// The node's WireGuard link.
    pub link: LinkName,
    /// The UDP port every node's device listens on.
    pub port: u16,
    /// This node's public key, announced in our Hellos.
    pub public_key: PublicKey,
    /// Its private half, which the device holds too: it proves to each peer that the key we
    /// announce is ours.
    pub private_key: Arc<PrivateKey>,
    /// Which peer holds each key on the device.
    pub holders: KeyHolders,
    /// Each peer's node IP is routed into the link and allowed on its entry too.
    pub node_encryption: bool,
    /// Strict mode: with node encryption, a peer's node IP is routed into the link from the
    /// moment the peer is known until it is removed, keys or not, so the host's traffic to a
    /// peer without keys is dropped by the device rather than sent in clear.
    pub strict: bool,
}

/// Which peer holds each public key on the device. The device keeps one entry per key, so a
/// peer announcing a key another peer holds would take that entry over (its endpoint, its
/// allowed IPs): authenticated as itself, it would cut the other node off or draw its traffic.
/// The verified Hello proves who announces a key, not that the key is theirs; the first peer
/// to hold a key keeps it until its tunnel lets it go, and a second claimant is refused.
#[derive(Clone, Debug, Default)]
pub struct KeyHolders(Arc<Mutex<BTreeMap<PublicKey, String>>>);

impl KeyHolders {
    /// Records that `peer` holds `key`; `Err` names the peer that already does.
    fn claim(&self, key: PublicKey, peer: &str) -> Result<(), String> {
        let mut holders = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match holders.get(&key) {
            Some(holder) if holder != peer => Err(holder.clone()),
            _ => {
                holders.insert(key, peer.to_owned());
                Ok(())
            }
        }
    }

    /// Lets `key` go, if `peer` holds it.
    fn release(&self, key: &PublicKey, peer: &str) {
        let mut holders = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if holders.get(key).is_some_and(|h| h == peer) {
            holders.remove(key);
        }
    }
}

/// One epoch's entry on the device.
#[derive(Debug)]
struct Installed {
    epoch: InstalledEpoch,
    peer_key: PublicKey,
    psk: PresharedKey,
}

/// A peer's WireGuard tunnel.
#[derive(Debug)]
pub struct WireguardTunnel {
    wg: Handle,
    datapath: Arc<dyn PeerDatapath>,
    settings: WireguardSettings,
    /// The peer's node name, as the key holders know it.
    name: String,
    /// Installed epochs, oldest first; the device holds the last one's preshared key.
    epochs: Vec<Installed>,
    /// The epoch traffic uses.
    current: Option<InstalledEpoch>,
    /// The prefixes routed into the link, as routed (the peer's record may change since).
    routed: Vec<IpNet>,
    /// The peer's node IPs, routed into the link before and without keys (strict mode with
    /// node encryption); not among `routed`.
    held: Vec<IpNet>,
    /// Installations so far (names the next one).
    installs: u64,
    /// The key and allowed IPs this tunnel last wrote to the device.
    written: Option<(PublicKey, Vec<IpNet>)>,
}

/// The peer's WireGuard public key, which only its verified Hello gives.
fn peer_key(peer_hello: &Hello) -> Result<PublicKey, TunnelError> {
    let WgPublicKey(bytes) = peer_hello
        .wg_public_key
        .ok_or(TunnelError::MissingPeerKey)?;
    Ok(PublicKey::from_bytes(bytes))
}

/// The one slot a WireGuard peer uses: the device, not a mark, chooses the keys, so the slot
/// only tells the datapath (strict mode) that the peer has them.
const SLOT: KeySlot = KeySlot::FIRST;

impl WireguardTunnel {
    /// The tunnel to the peer `name` over the node's device.
    pub(crate) fn new(
        wg: Handle,
        datapath: Arc<dyn PeerDatapath>,
        settings: &WireguardSettings,
        name: &NodeName,
    ) -> Self {
        Self {
            wg,
            datapath,
            settings: settings.clone(),
            name: name.to_string(),
            epochs: Vec::new(),
            current: None,
            routed: Vec::new(),
            held: Vec::new(),
            installs: 0,
            written: None,
        }
    }

    /// What the peer's entry allows and the link routes to it: its pod CIDRs, and with node
    /// encryption its node IPs.
    fn prefixes(&self, peer: &PeerEnd) -> Vec<IpNet> {
        let mut prefixes = peer.pod_cidrs.clone();
        if self.settings.node_encryption {
            prefixes.extend(peer.node_ips().map(IpNet::from));
        }
        prefixes
    }

    /// Routes exactly `peer`'s prefixes into the link.
    async fn route(&mut self, peer: &PeerEnd) -> Result<(), TunnelError> {
        let prefixes = self.prefixes(peer);
        for cidr in &prefixes {
            self.wg
                .routes()
                .replace(ROUTE_TABLE, *cidr, self.settings.link.clone())
                .execute()
                .await?;
        }
        let stale: Vec<IpNet> = self
            .routed
            .iter()
            .filter(|c| !prefixes.contains(c) && !self.held.contains(c))
            .copied()
            .collect();
        self.routed = prefixes
            .into_iter()
            .filter(|c| !self.held.contains(c))
            .collect();
        for cidr in stale {
            self.wg.routes().delete(ROUTE_TABLE, cidr).execute().await?;
        }
        Ok(())
    }

    /// Takes the peer's routes out of the link, so its traffic falls through to the main table.
    async fn unroute(&mut self) -> Result<(), TunnelError> {
        for cidr in std::mem::take(&mut self.routed) {
            self.wg.routes().delete(ROUTE_TABLE, cidr).execute().await?;
        }
        Ok(())
    }

    /// The device entry for `key`. Its allowed IPs replace the entry's list only when they
    /// differ from what this tunnel wrote last: replacing empties the list first, which drops
    /// the peer's packets in between, so a rekey (and the first write after a restart, whose
    /// entry a previous agent left) adds them instead. Whatever else a previous agent's entry
    /// allowed goes at the sweep.
    fn entry(&self, peer: &PeerEnd, key: PublicKey, psk: PresharedKey) -> PeerConfig {
        let config = PeerConfig::new(key)
            .preshared_key(psk)
            .endpoint(SocketAddr::new(peer.ip, self.settings.port))
            // Only what the peer owns: WireGuard drops any other inner source from it.
            .allowed_ips(self.prefixes(peer));
        match &self.written {
            Some((k, ips)) if *k != key || *ips != config.allowed_ips => config,
            _ => config.add_allowed_ips(),
        }
    }

    /// Writes `config` to the device and remembers what it allowed.
    async fn write(&mut self, config: PeerConfig) -> Result<(), TunnelError> {
        let written = (config.public_key, config.allowed_ips.clone());
        self.device().set_peer(config).execute().await?;
        self.written = Some(written);
        Ok(())
    }

    fn device(&self) -> DeviceRequests<'_> {
        self.wg.device(self.settings.link.clone())
    }

    fn current(&self) -> Option<&Installed> {
        let epoch = self.current?;
        self.epochs.iter().find(|i| i.epoch == epoch)
    }

    fn key_in_use(&self, key: &PublicKey) -> bool {
        self.epochs.iter().any(|i| i.peer_key == *key)
    }

    /// Removes the entry under `key`, which no epoch uses any more, and lets the key go.
    async fn remove_key(&self, key: PublicKey) -> Result<(), TunnelError> {
        self.device().remove_peer(key).execute().await?;
        self.settings.holders.release(&key, &self.name);
        Ok(())
    }

    /// Removes device peers for `peer` whose key is not in `keep`: ours when `keep` is empty,
    /// and whatever a previous agent left (an entry for the same endpoint or pod CIDRs).
    async fn remove_others(
        &self,
        peer: &PeerEnd,
        keep: &[PublicKey],
    ) -> Result<usize, TunnelError> {
        let device = self.device().get().execute().await?;
        let mut removed = 0;
        for p in &device.peers {
            if keep.contains(&p.public_key) {
                continue;
            }
            let same_endpoint = p.endpoint.is_some_and(|e| e.ip() == peer.ip);
            let same_pods = p.allowed_ips.iter().any(|a| {
                peer.pod_cidrs
                    .iter()
                    .any(|c| c.contains(a) || a.contains(c))
            });
            if same_endpoint || same_pods {
                self.device().remove_peer(p.public_key).execute().await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Tunnel for WireguardTunnel {
    fn mode(&self) -> Mode {
        Mode::Wireguard
    }

    fn fresh_spi(&self) -> u32 {
        // WireGuard has no SPIs; the value only enters the key derivation. Values below
        // 0x10000 are reserved by the protocol.
        rand::rng().random_range(0x0001_0000..=u32::MAX)
    }

    async fn prepare(&mut self, peer: &PeerEnd) -> Result<(), TunnelError> {
        // The datapath drops pods' traffic to a peer without a slot; the host's, which no eBPF
        // program sees before routing, goes into the link, where no entry means a drop.
        let hold: Vec<IpNet> = peer.node_ips().map(IpNet::from).collect();
        if self.settings.strict && self.settings.node_encryption && self.held != hold {
            for old in std::mem::take(&mut self.held) {
                if !hold.contains(&old) {
                    self.wg.routes().delete(ROUTE_TABLE, old).execute().await?;
                }
            }
            for ip in &hold {
                self.wg
                    .routes()
                    .replace(ROUTE_TABLE, *ip, self.settings.link.clone())
                    .execute()
                    .await?;
            }
            self.held = hold;
        }
        Ok(())
    }

    fn key_possession(
        &self,
        keys: &SessionKeys,
        peer_hello: &Hello,
    ) -> Result<Option<KeyPossession>, TunnelError> {
        let peer_key = peer_key(peer_hello)?;
        let shared = self
            .settings
            .private_key
            .shared_secret(&peer_key)
            .ok_or(TunnelError::LowOrderPeerKey)?;
        Ok(Some(KeyPossession::new(keys, shared, peer_key.to_string())))
    }

    async fn install(
        &mut self,
        peer: &PeerEnd,
        keys: &SessionKeys,
        peer_hello: &Hello,
    ) -> Result<InstalledEpoch, TunnelError> {
        let peer_key = peer_key(peer_hello)?;
        if peer_key == self.settings.public_key {
            return Err(TunnelError::PeerKeyIsOurs);
        }
        self.settings
            .holders
            .claim(peer_key, &self.name)
            .map_err(|holder| TunnelError::PeerKeyHeld {
                key: peer_key.to_string(),
                holder,
            })?;
        let mut psk_bytes = Zeroizing::new(*keys.wg_psk.as_bytes());
        let psk = PresharedKey::from_bytes(&mut psk_bytes);
        if let Err(e) = self.write(self.entry(peer, peer_key, psk.clone())).await {
            if !self.key_in_use(&peer_key) {
                self.settings.holders.release(&peer_key, &self.name);
            }
            return Err(e);
        }
        self.installs += 1;
        let epoch = InstalledEpoch::new(keys.epoch, self.installs);
        self.epochs.push(Installed {
            epoch,
            peer_key,
            psk,
        });
        Ok(epoch)
    }

    async fn flip(&mut self, peer: &PeerEnd, epoch: InstalledEpoch) -> Result<(), TunnelError> {
        let Some(new) = self.epochs.iter().find(|i| i.epoch == epoch) else {
            return Err(TunnelError::UnknownEpoch(epoch));
        };
        let peer_key = new.peer_key;
        // Routes first: with the slot set and no route yet, the datapath would let traffic
        // pass and the main table would send it in clear.
        self.route(peer).await?;
        self.datapath.admit_node(peer.node_id, peer.ip)?;
        if let Some(second) = peer.second_ip {
            self.datapath.add_node_address(peer.node_id, second)?;
        }
        self.datapath.set_slot(peer.node_id, Some(SLOT))?;
        self.current = Some(epoch);
        info!(epoch = epoch.epoch.0, peer_key = %peer_key, "keys installed and in use");
        Ok(())
    }

    async fn retire(&mut self, peer: &PeerEnd, epoch: InstalledEpoch) -> Result<(), TunnelError> {
        let Some(pos) = self.epochs.iter().position(|i| i.epoch == epoch) else {
            return Err(TunnelError::UnknownEpoch(epoch));
        };
        let was_current = self.current == Some(epoch);
        let was_latest = pos + 1 == self.epochs.len();
        let old = self.epochs.remove(pos);
        if was_current {
            // Traffic stops being let through before the entry goes.
            if let Err(e) = self.datapath.set_slot(peer.node_id, None) {
                warn!(error = %error_chain(&e), "cannot clear peer slot");
            }
            self.current = None;
            self.unroute().await?;
            if !self.key_in_use(&old.peer_key) {
                self.remove_key(old.peer_key).await?;
            }
        } else if was_latest {
            // Never confirmed: the device holds its key, so the current epoch's entry goes back.
            if let Some(restore) = self
                .current()
                .map(|c| self.entry(peer, c.peer_key, c.psk.clone()))
            {
                self.write(restore).await?;
            }
            if !self.key_in_use(&old.peer_key) {
                self.remove_key(old.peer_key).await?;
            }
        } else if !self.key_in_use(&old.peer_key) {
            // A previous epoch: its preshared key is already replaced; only an entry under a key
            // the peer no longer uses (it restarted) is left to remove.
            self.remove_key(old.peer_key).await?;
        }
        debug!(epoch = %epoch, "epoch removed");
        Ok(())
    }

    async fn sweep(&mut self, peer: &PeerEnd) -> Result<usize, TunnelError> {
        let keep: Vec<PublicKey> = self.epochs.iter().map(|i| i.peer_key).collect();
        let mut changed = self.remove_others(peer, &keep).await?;
        // The entry a previous agent left may allow more than the peer owns now (its pod CIDRs
        // changed meanwhile): one replacing write, after traffic moved to our keys.
        if let Some((key, psk)) = self.current().map(|c| (c.peer_key, c.psk.clone())) {
            let wanted: Vec<IpNet> = self.prefixes(peer).iter().map(IpNet::trunc).collect();
            let device = self.device().get().execute().await?;
            let stale = device
                .peers
                .iter()
                .any(|p| p.public_key == key && p.allowed_ips.iter().any(|a| !wanted.contains(a)));
            if stale {
                let mut config = self.entry(peer, key, psk);
                config.replace_allowed_ips = true;
                self.write(config).await?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    async fn teardown(&mut self, peer: &PeerEnd) -> Result<usize, TunnelError> {
        if let Err(e) = self.datapath.set_slot(peer.node_id, None) {
            warn!(error = %error_chain(&e), "cannot clear peer slot");
        }
        self.unroute().await?;
        for held in std::mem::take(&mut self.held) {
            self.wg.routes().delete(ROUTE_TABLE, held).execute().await?;
        }
        // A previous agent's routes for the peer (this tunnel may never have flipped).
        for cidr in &self.prefixes(peer) {
            self.wg
                .routes()
                .delete(ROUTE_TABLE, *cidr)
                .execute()
                .await?;
        }
        let mut removed = 0;
        let mut keys: Vec<PublicKey> = self.epochs.iter().map(|i| i.peer_key).collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            self.remove_key(key).await?;
            removed += 1;
        }
        self.epochs.clear();
        self.current = None;
        Ok(removed + self.remove_others(peer, &[]).await?)
    }

    fn carries_spi(&self, _spi: u32) -> bool {
        // Usage-limit notices name XFRM states; WireGuard rekeys its sessions itself.
        false
    }

    fn announce(&self, hello: Hello) -> Hello {
        hello.with_wg_public_key(WgPublicKey(*self.settings.public_key.as_bytes()))
    }

    fn fill_status(&self, row: &mut PeerStatus) {
        let current = self.current();
        row.slot = current.map(|_| SLOT.get());
        row.wg_public_key = current.map(|c| c.peer_key.to_string());
        row.wg_psk_epoch = current.map(|c| c.epoch.epoch.0);
    }
}

#[cfg(test)]
mod tests {
    use nodeseal_keymgr::Epoch;
    use nodeseal_keymgr::test_helpers::TestPki;
    use nodeseal_wireguard::test_helpers::FakeKernel;
    use nodeseal_wireguard::{DeviceConfig, LinkSpec, PrivateKey};

    use super::*;
    use crate::peer::fakes::{Node, agreements, agreements_on_spis, hold_clock};

    struct Wg {
        kernel: FakeKernel,
        handle: Handle,
        settings: WireguardSettings,
    }

    async fn device() -> Wg {
        let kernel = FakeKernel::new();
        let handle = Handle::with_fake(&kernel);
        let link = handle
            .links()
            .ensure(LinkSpec::default())
            .execute()
            .await
            .expect("link");
        let key = PrivateKey::generate().expect("key");
        let public_key = key.public_key();
        let settings = WireguardSettings {
            link: link.name.parse().expect("name"),
            port: DEFAULT_PORT,
            public_key,
            private_key: Arc::new(key.clone()),
            holders: KeyHolders::default(),
            node_encryption: false,
            strict: true,
        };
        handle
            .device(settings.link.clone())
            .configure(
                DeviceConfig::new()
                    .private_key(key)
                    .listen_port(DEFAULT_PORT),
            )
            .execute()
            .await
            .expect("configure");
        Wg {
            kernel,
            handle,
            settings,
        }
    }

    fn tunnel(me: &Node, peer: &Node, wg: &Wg) -> WireguardTunnel {
        let datapath: Arc<dyn PeerDatapath> = me.datapath.clone();
        WireguardTunnel::new(wg.handle.clone(), datapath, &wg.settings, &peer.name)
    }

    fn hello_with_key(hello: &Hello, byte: u8) -> Hello {
        hello.clone().with_wg_public_key(WgPublicKey([byte; 32]))
    }

    async fn peers(wg: &Wg) -> Vec<nodeseal_wireguard::Peer> {
        wg.handle
            .device(wg.settings.link.clone())
            .get()
            .execute()
            .await
            .expect("dump")
            .peers
    }

    fn psk(keys: &SessionKeys) -> PresharedKey {
        let mut bytes = Zeroizing::new(*keys.wg_psk.as_bytes());
        PresharedKey::from_bytes(&mut bytes)
    }

    #[tokio::test(start_paused = true)]
    async fn the_peer_key_comes_from_the_hello_and_the_flip_sets_the_slot() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let wg = device().await;
        let mut t = tunnel(&a, &b, &wg);
        let peer = a.end_of(&b);
        t.prepare(&peer).await.expect("prepare");
        let (agreement, _) = agreements(&a, &b, Epoch(1)).await;
        let hello = hello_with_key(&agreement.peer_hello, 7);
        let installed = t
            .install(&peer, &agreement.keys, &hello)
            .await
            .expect("install");
        let peers = peers(&wg).await;
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].public_key, PublicKey::from_bytes([7; 32]));
        assert_eq!(peers[0].preshared_key, Some(psk(&agreement.keys)));
        assert_eq!(peers[0].endpoint, Some(SocketAddr::new(b.ip, DEFAULT_PORT)));
        assert_eq!(peers[0].allowed_ips, vec![b.cidr]);
        assert_eq!(
            a.datapath.slot_of(peer.node_id),
            None,
            "no slot before the flip"
        );

        assert!(
            wg.kernel.routes(ROUTE_TABLE).is_empty(),
            "no route before the flip"
        );
        t.flip(&peer, installed).await.expect("flip");
        assert_eq!(a.datapath.slot_of(peer.node_id), Some(SLOT));
        assert!(a.datapath.is_admitted(b.ip));
        assert_eq!(
            wg.kernel.routes(ROUTE_TABLE),
            [(b.cidr, wg.settings.link.to_string())]
        );
        assert!(!t.carries_spi(agreement.keys.inbound.spi.get()));
        let mut row = PeerStatus::connecting(&b.name, b.ip, peer.node_id);
        t.fill_status(&mut row);
        assert_eq!(
            row.wg_public_key,
            Some(PublicKey::from_bytes([7; 32]).to_string())
        );
        let announced = t.announce(a.hello(Epoch(2), 0x0001_0000));
        assert_eq!(
            announced.wg_public_key,
            Some(WgPublicKey(*wg.settings.public_key.as_bytes()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hello_without_a_key_is_refused_and_nothing_is_configured() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let wg = device().await;
        let mut t = tunnel(&a, &b, &wg);
        let peer = a.end_of(&b);
        let (agreement, _) = agreements(&a, &b, Epoch(1)).await;
        let e = t
            .install(&peer, &agreement.keys, &agreement.peer_hello)
            .await
            .unwrap_err();
        assert!(matches!(e, TunnelError::MissingPeerKey), "{e}");
        assert!(e.to_string().contains("wg_public_key"), "{e}");
        assert!(peers(&wg).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unconfirmed_epoch_restores_the_previous_psk() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let wg = device().await;
        let mut t = tunnel(&a, &b, &wg);
        let peer = a.end_of(&b);
        let (first, _) = agreements(&a, &b, Epoch(1)).await;
        let hello = hello_with_key(&first.peer_hello, 7);
        let one = t
            .install(&peer, &first.keys, &hello)
            .await
            .expect("install");
        t.flip(&peer, one).await.expect("flip");
        let (second, _) = agreements_on_spis(&a, &b, Epoch(2), (0x0003_0000, 0x0004_0000)).await;
        let two = t
            .install(&peer, &second.keys, &hello_with_key(&second.peer_hello, 7))
            .await
            .expect("second install");
        assert_ne!(psk(&first.keys), psk(&second.keys));
        assert_eq!(peers(&wg).await[0].preshared_key, Some(psk(&second.keys)));

        // The peer never confirmed: the first epoch's key is back, and traffic still flows.
        t.retire(&peer, two).await.expect("retire");
        let now = peers(&wg).await;
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].preshared_key, Some(psk(&first.keys)));
        assert_eq!(a.datapath.slot_of(peer.node_id), Some(SLOT));

        // A confirmed rekey to a peer that restarted with a new key: the old entry goes when
        // the previous epoch is retired.
        let (third, _) = agreements_on_spis(&a, &b, Epoch(3), (0x0005_0000, 0x0006_0000)).await;
        let three = t
            .install(&peer, &third.keys, &hello_with_key(&third.peer_hello, 8))
            .await
            .expect("third install");
        t.flip(&peer, three).await.expect("flip");
        t.retire(&peer, one).await.expect("retire the previous");
        let now = peers(&wg).await;
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].public_key, PublicKey::from_bytes([8; 32]));
        assert_eq!(now[0].preshared_key, Some(psk(&third.keys)));
    }

    #[tokio::test(start_paused = true)]
    async fn teardown_removes_the_peer_and_sweep_removes_a_previous_agents_entry() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let wg = device().await;
        let peer = a.end_of(&b);
        // A previous agent's entry for the same node, under the key the peer had then.
        let stale = PeerConfig::new(PublicKey::from_bytes([3; 32]))
            .endpoint(SocketAddr::new(b.ip, DEFAULT_PORT))
            .allowed_ips([b.cidr]);
        let foreign = PeerConfig::new(PublicKey::from_bytes([4; 32]))
            .endpoint("192.0.2.9:51820".parse().expect("endpoint"))
            .allowed_ips(["10.99.0.0/16".parse().expect("cidr")]);
        wg.handle
            .device(wg.settings.link.clone())
            .configure(DeviceConfig::new().peer(stale).peer(foreign))
            .execute()
            .await
            .expect("leftovers");

        let mut t = tunnel(&a, &b, &wg);
        let (agreement, _) = agreements(&a, &b, Epoch(1)).await;
        let installed = t
            .install(
                &peer,
                &agreement.keys,
                &hello_with_key(&agreement.peer_hello, 7),
            )
            .await
            .expect("install");
        t.flip(&peer, installed).await.expect("flip");
        assert_eq!(t.sweep(&peer).await.expect("sweep"), 1);
        let keys: Vec<PublicKey> = peers(&wg).await.iter().map(|p| p.public_key).collect();
        assert_eq!(keys.len(), 2, "ours and another node's stay");
        assert!(keys.contains(&PublicKey::from_bytes([7; 32])));
        assert!(keys.contains(&PublicKey::from_bytes([4; 32])));

        assert_eq!(wg.kernel.routes(ROUTE_TABLE).len(), 1);
        assert_eq!(t.teardown(&peer).await.expect("teardown"), 1);
        assert!(wg.kernel.routes(ROUTE_TABLE).is_empty());
        let keys: Vec<PublicKey> = peers(&wg).await.iter().map(|p| p.public_key).collect();
        assert_eq!(keys, vec![PublicKey::from_bytes([4; 32])]);
        assert_eq!(a.datapath.slot_of(peer.node_id), None);
        let mut row = PeerStatus::connecting(&b.name, b.ip, peer.node_id);
        t.fill_status(&mut row);
        assert_eq!((row.slot, row.wg_public_key), (None, None));
    }

    #[tokio::test(start_paused = true)]
    async fn teardown_removes_a_previous_agents_routes_and_slot() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let wg = device().await;
        let peer = a.end_of(&b);
        wg.handle
            .routes()
            .replace(ROUTE_TABLE, b.cidr, wg.settings.link.clone())
            .execute()
            .await
            .expect("leftover route");
        a.datapath.leave_slot(peer.node_id, SLOT);
        let mut t = tunnel(&a, &b, &wg);
        t.teardown(&peer).await.expect("teardown");
        assert!(wg.kernel.routes(ROUTE_TABLE).is_empty());
        assert_eq!(a.datapath.slot_of(peer.node_id), None);
    }

    #[tokio::test(start_paused = true)]
    async fn with_node_encryption_the_node_ip_is_allowed_and_held_in_the_link_without_keys() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let mut wg = device().await;
        wg.settings.node_encryption = true;
        // A dual-stack peer: both node IPs.
        let second: IpNet = "fd00::2/128".parse().expect("prefix");
        let peer = PeerEnd {
            second_ip: Some(second.addr()),
            ..a.end_of(&b)
        };
        let node_ip = IpNet::from(peer.ip);
        let mut t = tunnel(&a, &b, &wg);
        // Strict mode: before any key, the host's traffic to the peer goes into the link.
        t.prepare(&peer).await.expect("prepare");
        assert_eq!(wg.kernel.routes(ROUTE_TABLE).len(), 2);
        let (agreement, _) = agreements(&a, &b, Epoch(1)).await;
        let installed = t
            .install(
                &peer,
                &agreement.keys,
                &hello_with_key(&agreement.peer_hello, 7),
            )
            .await
            .expect("install");
        t.flip(&peer, installed).await.expect("flip");
        let entry = peers(&wg).await.remove(0);
        assert!(
            entry.allowed_ips.contains(&node_ip),
            "{:?}",
            entry.allowed_ips
        );
        assert!(entry.allowed_ips.contains(&b.cidr));
        assert!(entry.allowed_ips.contains(&second));
        assert_eq!(wg.kernel.routes(ROUTE_TABLE).len(), 3);
        assert_eq!(
            a.datapath.node_of_address(second.addr()),
            Some(peer.node_id)
        );
        // A sweep finds nothing stale in an entry that allows the node IPs.
        assert_eq!(t.sweep(&peer).await.expect("sweep"), 0);
        // Keys withdrawn: the pods' route goes, the node IPs' stay.
        t.retire(&peer, installed).await.expect("retire");
        assert_eq!(wg.kernel.routes(ROUTE_TABLE).len(), 2);
        t.teardown(&peer).await.expect("teardown");
        assert!(wg.kernel.routes(ROUTE_TABLE).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_announcing_a_key_another_peer_holds_or_ours_gets_nothing() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b, c) = (Node::new(&pki, 1), Node::new(&pki, 2), Node::new(&pki, 3));
        let wg = device().await;
        let (peer_b, peer_c) = (a.end_of(&b), a.end_of(&c));
        let mut to_b = tunnel(&a, &b, &wg);
        let mut to_c = tunnel(&a, &c, &wg);
        let (with_b, _) = agreements(&a, &b, Epoch(1)).await;
        let installed = to_b
            .install(
                &peer_b,
                &with_b.keys,
                &hello_with_key(&with_b.peer_hello, 7),
            )
            .await
            .expect("b's install");
        to_b.flip(&peer_b, installed).await.expect("flip");
        let before = peers(&wg).await;

        // c, authenticated as itself, announces b's key: refused, naming b; b's entry is as it was.
        let (with_c, _) = agreements(&a, &c, Epoch(1)).await;
        let e = to_c
            .install(
                &peer_c,
                &with_c.keys,
                &hello_with_key(&with_c.peer_hello, 7),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, TunnelError::PeerKeyHeld { .. }), "{e}");
        assert!(e.to_string().contains(&b.name.to_string()), "{e}");
        assert_eq!(peers(&wg).await, before);
        assert!(
            wg.kernel
                .routes(ROUTE_TABLE)
                .iter()
                .all(|(c, _)| *c == b.cidr)
        );

        // Our own key is refused too.
        let own = with_c
            .peer_hello
            .clone()
            .with_wg_public_key(WgPublicKey(*wg.settings.public_key.as_bytes()));
        let e = to_c.install(&peer_c, &with_c.keys, &own).await.unwrap_err();
        assert!(matches!(e, TunnelError::PeerKeyIsOurs), "{e}");
        assert_eq!(peers(&wg).await, before);

        // Once b's tunnel lets the key go (b removed), it is free again.
        to_b.teardown(&peer_b).await.expect("teardown");
        to_c.install(
            &peer_c,
            &with_c.keys,
            &hello_with_key(&with_c.peer_hello, 7),
        )
        .await
        .expect("a released key can be announced");
        let now = peers(&wg).await;
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].endpoint, Some(SocketAddr::new(c.ip, DEFAULT_PORT)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_cannot_prove_it_holds_the_key_it_announced_is_refused() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let wg = device().await;
        let t = tunnel(&a, &b, &wg);
        let (at_a, at_b) = agreements(&a, &b, Epoch(1)).await;
        let (b_key, stranger) = (
            PrivateKey::generate().expect("key"),
            PrivateKey::generate().expect("key"),
        );
        let announced = at_a
            .peer_hello
            .clone()
            .with_wg_public_key(WgPublicKey(*b_key.public_key().as_bytes()));
        let check = t
            .key_possession(&at_a.keys, &announced)
            .expect("possession")
            .expect("WireGuard proves possession");
        // b, which holds the key, proves it with its side of the agreement.
        let proof_by = |key: &PrivateKey| {
            let shared = key.shared_secret(&wg.settings.public_key).expect("secret");
            KeyPossession::new(&at_b.keys, shared, String::new()).ours
        };
        check
            .check(&at_a.keys, &proof_by(&b_key))
            .expect("the holder's proof");
        // Announcing b's key while holding another one proves nothing.
        let e = check.check(&at_a.keys, &proof_by(&stranger)).unwrap_err();
        assert!(matches!(e, TunnelError::PeerKeyNotHeld { .. }), "{e}");
        assert!(
            e.to_string().contains(&b_key.public_key().to_string()),
            "{e}"
        );
        // Nor does replaying our own proof.
        assert!(check.check(&at_a.keys, &check.ours).is_err());
        // A low-order key shares an all-zero secret with anyone: refused before any proof.
        let e = t
            .key_possession(&at_a.keys, &hello_with_key(&at_a.peer_hello, 0))
            .unwrap_err();
        assert!(matches!(e, TunnelError::LowOrderPeerKey), "{e}");
        assert!(format!("{check:?}").contains("[redacted]"), "{check:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rekey_after_the_pod_cidrs_changed_moves_the_allowed_ips_and_routes() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let wg = device().await;
        let mut t = tunnel(&a, &b, &wg);
        let mut peer = a.end_of(&b);
        let (first, _) = agreements(&a, &b, Epoch(1)).await;
        let one = t
            .install(&peer, &first.keys, &hello_with_key(&first.peer_hello, 7))
            .await
            .expect("install");
        t.flip(&peer, one).await.expect("flip");
        let moved: IpNet = "10.250.0.0/24".parse().expect("cidr");
        peer.pod_cidrs = vec![moved];
        let (second, _) = agreements_on_spis(&a, &b, Epoch(2), (0x0003_0000, 0x0004_0000)).await;
        let two = t
            .install(&peer, &second.keys, &hello_with_key(&second.peer_hello, 7))
            .await
            .expect("second install");
        t.flip(&peer, two).await.expect("flip");
        t.retire(&peer, one).await.expect("retire");
        let now = peers(&wg).await;
        assert_eq!(now.len(), 1);
        assert_eq!(
            now[0].allowed_ips,
            vec![moved],
            "the old CIDR is no longer allowed"
        );
        assert_eq!(
            wg.kernel.routes(ROUTE_TABLE),
            [(moved, wg.settings.link.to_string())]
        );
    }
}
