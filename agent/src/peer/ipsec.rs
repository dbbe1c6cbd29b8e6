//! The IPsec tunnel: a peer's epochs as XFRM states and policies, switched by key slot.
//!
//! [`sa`](self) says what the objects look like; this module installs and removes them, one
//! batch per step. An epoch is one IN and one OUT state plus OUT policies carrying the mark of
//! its key slot; flipping is one write of the peer's slot in the eBPF map, so traffic moves
//! between epochs without a window. Each epoch gets the slot after the previous one, and after
//! a restart the slot after the previous agent's, which is still live.
//!
//! With node encryption the epoch also has host SAs (see [`sa`](self)): the IN state is
//! installed with the epoch, the OUT state at the flip (the kernel uses the newest host OUT
//! state, so it must not exist before the peer confirmed its IN state), when the previous
//! epoch's goes.
//!
//! Sweep and teardown go through [`nodeseal_xfrm::sweep`] and `flush_owned` scoped to the
//! peer's node IP ([`nodeseal_xfrm::Ownership::with_endpoint`]), so they touch only this peer's
//! objects of our reqid: a sweep removes what this tunnel did not install (never rewriting a
//! state of its own), a teardown removes them all.

mod sa;

use std::sync::Arc;

use nodeseal_keymgr::{Aead as KeyAead, Hello, Mode, SessionKeys};
use nodeseal_xfrm::{Desired, Handle, PolicySpec, Spi, sweep};
use rand::Rng;
use tracing::{debug, info, warn};

#[cfg(test)]
pub(crate) use sa::peer_policies;
pub use sa::{
    EXEMPT_REQID, EpochSas, HostEncryption, HostSas, KeySlot, POLICY_HASH_THRESHOLDS, REQID,
    SaLimits, ownership,
};

use super::{
    InstalledEpoch, PeerDatapath, PeerEnd, PeerSettings, PeerStatus, Tunnel, TunnelError,
    error_chain,
};
use crate::peer::LocalEnd;

/// One epoch in the kernel.
#[derive(Debug)]
struct Installed {
    epoch: InstalledEpoch,
    sas: EpochSas,
    /// The OUT policies as installed: deleting exactly these stays right when the peer's pod
    /// CIDRs change between install and retirement.
    out_policies: Vec<PolicySpec>,
    /// Whether the host OUT state is in the kernel (from the flip until the next flip).
    host_out_added: bool,
}

/// A peer's IPsec tunnel.
#[derive(Debug)]
pub struct IpsecTunnel {
    xfrm: Handle,
    datapath: Arc<dyn PeerDatapath>,
    local: LocalEnd,
    strict: bool,
    limits: SaLimits,
    /// Node encryption.
    host: Option<HostEncryption>,
    /// Whether the host OUT policies are in place.
    host_out_installed: bool,
    /// The slot the datapath uses for the peer (after a restart: the previous agent's).
    live_slot: Option<KeySlot>,
    next_slot: KeySlot,
    /// Whether the peer's IN/FWD (and strict block) policies are in place.
    policies_installed: bool,
    /// Installed epochs, oldest first.
    epochs: Vec<Installed>,
    /// The epoch traffic uses.
    current: Option<InstalledEpoch>,
    /// Installations so far (names the next one).
    installs: u64,
}

impl IpsecTunnel {
    /// The tunnel to the peer with local id `peer`: reads the slot a previous agent may have
    /// left live, so that the first epoch takes another one.
    pub(crate) fn new(
        xfrm: Handle,
        datapath: Arc<dyn PeerDatapath>,
        settings: &PeerSettings,
        peer: nodeseal_bpf::NodeId,
    ) -> Result<Self, TunnelError> {
        let live_slot = datapath.slot(peer)?;
        Ok(Self {
            xfrm,
            datapath,
            local: settings.local.clone(),
            strict: settings.strict,
            limits: settings.sa_limits,
            host: settings.host_encryption.clone(),
            host_out_installed: false,
            live_slot,
            next_slot: live_slot.map_or(KeySlot::FIRST, KeySlot::next),
            policies_installed: false,
            epochs: Vec::new(),
            current: None,
            installs: 0,
        })
    }

    async fn install_peer_policies(&mut self, peer: &PeerEnd) -> Result<(), TunnelError> {
        let mut batch = self.xfrm.batch();
        for p in sa::peer_policies(&self.local, peer, self.strict, self.host.as_ref())? {
            batch = batch.update_policy(p);
        }
        batch.execute().await?;
        self.policies_installed = true;
        Ok(())
    }

    /// Sends this node's traffic for the peer into the host SAs (node encryption).
    async fn install_host_out_policies(&mut self, peer: &PeerEnd) -> Result<(), TunnelError> {
        let Some(host) = &self.host else {
            return Ok(());
        };
        let mut batch = self.xfrm.batch();
        for p in sa::host_out_policies(&self.local, peer, host)? {
            batch = batch.update_policy(p);
        }
        batch.execute().await?;
        self.host_out_installed = true;
        Ok(())
    }

    /// Lets this node's traffic for the peer go in clear again (not in strict mode).
    async fn remove_host_out_policies(&mut self, peer: &PeerEnd) -> Result<(), TunnelError> {
        let Some(host) = &self.host else {
            return Ok(());
        };
        let mut batch = self.xfrm.batch();
        for p in sa::host_out_policies(&self.local, peer, host)? {
            batch = batch.delete_policy(p.id());
        }
        batch.execute().await?;
        self.host_out_installed = false;
        Ok(())
    }

    /// Makes `epoch`'s host OUT state the only one: the kernel takes the newest, and an older
    /// one must not outlive the flip. Without host SAs in `epoch` (the peer did not offer
    /// them), strict mode keeps dropping host traffic; otherwise it goes in clear.
    async fn flip_host(
        &mut self,
        peer: &PeerEnd,
        epoch: InstalledEpoch,
    ) -> Result<(), TunnelError> {
        if self.host.is_none() {
            return Ok(());
        }
        let mut batch = self.xfrm.batch();
        let mut added = None;
        let mut deleted = Vec::new();
        for (i, installed) in self.epochs.iter().enumerate() {
            let Some(host) = &installed.sas.host else {
                continue;
            };
            if installed.epoch == epoch && !installed.host_out_added {
                batch = batch.add_state(host.outbound.clone());
                added = Some(i);
            } else if installed.epoch != epoch && installed.host_out_added {
                batch = batch.delete_state(host.outbound.id());
                deleted.push(i);
            }
        }
        batch.execute().await?;
        for i in deleted {
            self.epochs[i].host_out_added = false;
        }
        if let Some(i) = added {
            self.epochs[i].host_out_added = true;
        }
        let has_host = self
            .epochs
            .iter()
            .any(|i| i.epoch == epoch && i.sas.host.is_some());
        if has_host || self.strict {
            if !self.host_out_installed {
                self.install_host_out_policies(peer).await?;
            }
        } else if self.host_out_installed {
            warn!("the peer does not offer host SAs: its node IP is reached in clear");
            self.remove_host_out_policies(peer).await?;
        }
        Ok(())
    }

    /// Deletes an epoch's states, and its OUT policies unless the current epoch uses the same
    /// slot (then they are the same kernel objects).
    async fn remove(&self, old: &Installed) -> Result<(), TunnelError> {
        let mut batch = self
            .xfrm
            .batch()
            .delete_state(old.sas.inbound.id())
            .delete_state(old.sas.outbound.id());
        if let Some(host) = &old.sas.host {
            batch = batch.delete_state(host.inbound.id());
            if old.host_out_added {
                batch = batch.delete_state(host.outbound.id());
            }
        }
        let slot_in_use = self
            .current()
            .is_some_and(|c| c.sas.slot == old.sas.slot && c.epoch != old.epoch);
        if !slot_in_use {
            for p in &old.out_policies {
                batch = batch.delete_policy(p.id());
            }
        }
        batch.execute().await?;
        Ok(())
    }

    fn current(&self) -> Option<&Installed> {
        let epoch = self.current?;
        self.epochs.iter().find(|i| i.epoch == epoch)
    }

    /// What the kernel should hold for the peer: every installed epoch and the peer policies.
    fn desired(&self, peer: &PeerEnd) -> Result<Desired, TunnelError> {
        let mut desired = Desired::default();
        for i in &self.epochs {
            desired.states.push(i.sas.inbound.clone());
            desired.states.push(i.sas.outbound.clone());
            if let Some(host) = &i.sas.host {
                desired.states.push(host.inbound.clone());
                if i.host_out_added {
                    desired.states.push(host.outbound.clone());
                }
            }
            for p in &i.out_policies {
                // Two epochs on one slot share their OUT policies.
                if !desired.policies.iter().any(|q| q.id() == p.id()) {
                    desired.policies.push(p.clone());
                }
            }
        }
        if self.policies_installed {
            desired.policies.extend(sa::peer_policies(
                &self.local,
                peer,
                self.strict,
                self.host.as_ref(),
            )?);
        }
        if let (true, Some(host)) = (self.host_out_installed, &self.host) {
            desired
                .policies
                .extend(sa::host_out_policies(&self.local, peer, host)?);
        }
        Ok(desired)
    }
}

impl Tunnel for IpsecTunnel {
    fn mode(&self) -> Mode {
        Mode::Ipsec
    }

    fn fresh_spi(&self) -> u32 {
        let mut rng = rand::rng();
        loop {
            let spi: u32 = rng.random();
            let in_use = self.epochs.iter().any(|i| {
                i.sas.inbound.spi.get() == spi
                    || i.sas
                        .host
                        .as_ref()
                        .is_some_and(|h| h.inbound.spi.get() == spi)
            });
            // Below 0x10000 stays free for other IPsec users of the node.
            if spi > 0xffff && !in_use {
                return spi;
            }
        }
    }

    async fn prepare(&mut self, peer: &PeerEnd) -> Result<(), TunnelError> {
        // Strict mode blocks clear traffic to the peer's pods (and with node encryption to its
        // node IP) before any key exists.
        if self.strict {
            self.install_peer_policies(peer).await?;
            self.install_host_out_policies(peer).await?;
        }
        Ok(())
    }

    async fn install(
        &mut self,
        peer: &PeerEnd,
        keys: &SessionKeys,
        _peer_hello: &Hello,
    ) -> Result<InstalledEpoch, TunnelError> {
        let out_spi = xfrm_spi(keys.outbound.spi.get())?;
        let in_spi = xfrm_spi(keys.inbound.spi.get())?;
        let mut sas = EpochSas::new(
            &self.local,
            peer,
            self.next_slot,
            (out_spi, keys.outbound.key(KeyAead::Aes128Gcm).rfc4106_key()),
            (in_spi, keys.inbound.key(KeyAead::Aes128Gcm).rfc4106_key()),
            self.limits,
        )?;
        if let (Some(_), Some(host)) = (&self.host, &keys.host) {
            sas = sas.with_host(
                &self.local,
                peer,
                (
                    xfrm_spi(host.outbound.spi.get())?,
                    host.outbound.key(KeyAead::Aes128Gcm).rfc4106_key(),
                ),
                (
                    xfrm_spi(host.inbound.spi.get())?,
                    host.inbound.key(KeyAead::Aes128Gcm).rfc4106_key(),
                ),
                self.limits,
            )?;
        }
        let out_policies = sas.out_policies(&self.local, peer, self.host.as_ref())?;
        let mut batch = self
            .xfrm
            .batch()
            .add_state(sas.inbound.clone())
            .add_state(sas.outbound.clone());
        if let Some(host) = &sas.host {
            batch = batch.add_state(host.inbound.clone());
        }
        for p in &out_policies {
            batch = batch.update_policy(p.clone());
        }
        batch.execute().await?;
        self.installs += 1;
        let epoch = InstalledEpoch::new(keys.epoch, self.installs);
        let installed = Installed {
            epoch,
            sas,
            out_policies,
            host_out_added: false,
        };
        if !self.policies_installed
            && let Err(e) = self.install_peer_policies(peer).await
        {
            if let Err(undo) = self.remove(&installed).await {
                warn!(error = %error_chain(&undo), "cannot remove a half-installed epoch");
            }
            return Err(e);
        }
        self.epochs.push(installed);
        Ok(epoch)
    }

    async fn flip(&mut self, peer: &PeerEnd, epoch: InstalledEpoch) -> Result<(), TunnelError> {
        let Some(new) = self.epochs.iter().find(|i| i.epoch == epoch) else {
            return Err(TunnelError::UnknownEpoch(epoch));
        };
        let (slot, out_spi, in_spi) = (new.sas.slot, new.sas.outbound.spi, new.sas.inbound.spi);
        self.flip_host(peer, epoch).await?;
        // ESP from the peer is accepted from now on.
        self.datapath.admit_node(peer.node_id, peer.ip)?;
        if let Some(second) = peer.second_ip {
            self.datapath.add_node_address(peer.node_id, second)?;
        }
        self.datapath.set_slot(peer.node_id, Some(slot))?;
        self.live_slot = Some(slot);
        self.next_slot = slot.next();
        self.current = Some(epoch);
        info!(epoch = epoch.epoch.0, slot = %slot, out_spi = %out_spi, in_spi = %in_spi, "keys installed and in use");
        Ok(())
    }

    async fn retire(&mut self, peer: &PeerEnd, epoch: InstalledEpoch) -> Result<(), TunnelError> {
        let Some(pos) = self.epochs.iter().position(|i| i.epoch == epoch) else {
            return Err(TunnelError::UnknownEpoch(epoch));
        };
        if self.current == Some(epoch) {
            // Traffic stops using the keys before they go, so nothing is sent to a missing SA.
            if let Err(e) = self.datapath.set_slot(peer.node_id, None) {
                warn!(error = %error_chain(&e), "cannot clear peer slot");
            }
            self.live_slot = None;
            self.current = None;
            if !self.strict
                && self.host_out_installed
                && let Err(e) = self.remove_host_out_policies(peer).await
            {
                warn!(error = %error_chain(&e), "cannot let host traffic go in clear");
            }
        }
        let old = self.epochs.remove(pos);
        self.remove(&old).await?;
        debug!(epoch = %epoch, "epoch removed");
        Ok(())
    }

    async fn sweep(&mut self, peer: &PeerEnd) -> Result<usize, TunnelError> {
        let desired = self.desired(peer)?;
        // Never a reconcile: it would re-add a state of ours the kernel deleted at its hard
        // limit, with its key and a sequence restarting at 1 (see `nodeseal_xfrm::sweep`).
        let report = sweep(&self.xfrm, &ownership().with_endpoint(peer.ip), desired).await?;
        if report.states_left > 0 {
            debug!(
                states = report.states_left,
                "states of our epochs missing or changed in the kernel; left for the next rekey"
            );
        }
        Ok(report.states_deleted
            + report.policies_added
            + report.policies_updated
            + report.policies_deleted)
    }

    async fn teardown(&mut self, peer: &PeerEnd) -> Result<usize, TunnelError> {
        self.epochs.clear();
        self.current = None;
        self.live_slot = None;
        self.policies_installed = false;
        self.host_out_installed = false;
        let owner = ownership().with_endpoint(peer.ip);
        Ok(nodeseal_xfrm::reconcile::flush_owned(&self.xfrm, &owner).await?)
    }

    fn carries_spi(&self, spi: u32) -> bool {
        self.current().is_some_and(|c| {
            let host = c
                .sas
                .host
                .iter()
                .flat_map(|h| [h.outbound.spi, h.inbound.spi]);
            [c.sas.outbound.spi, c.sas.inbound.spi]
                .into_iter()
                .chain(host)
                .any(|s| s.get() == spi)
        })
    }

    fn announce(&self, hello: Hello) -> Hello {
        if self.host.is_none() {
            return hello;
        }
        let mut spi = self.fresh_spi();
        // Bounded: two draws from 2^32 values collide about never.
        for _ in 0..8 {
            if spi != hello.inbound_spi.get() {
                break;
            }
            spi = self.fresh_spi();
        }
        match nodeseal_keymgr::Spi::new(spi) {
            Ok(spi) if spi != hello.inbound_spi => hello.with_host_spi(spi),
            _ => hello,
        }
    }

    fn fill_status(&self, row: &mut PeerStatus) {
        let current = self.current();
        row.slot = current
            .map_or(self.live_slot, |c| Some(c.sas.slot))
            .map(KeySlot::get);
        row.out_spi = current.map(|c| c.sas.outbound.spi.to_string());
        row.in_spi = current.map(|c| c.sas.inbound.spi.to_string());
        row.host_spis = current
            .and_then(|c| c.sas.host.as_ref())
            .map(|h| [h.outbound.spi.to_string(), h.inbound.spi.to_string()]);
    }
}

fn xfrm_spi(raw: u32) -> Result<Spi, TunnelError> {
    Spi::new(raw).map_err(|_| TunnelError::BadSpi(raw))
}

#[cfg(test)]
mod tests {
    use nodeseal_keymgr::Epoch;
    use nodeseal_keymgr::test_helpers::TestPki;

    use super::*;
    use crate::peer::fakes::{
        Node, agreements, agreements_on_hellos, agreements_on_spis, hold_clock,
    };

    fn tunnel(me: &Node, peer: &Node, strict: bool) -> IpsecTunnel {
        let datapath: Arc<dyn PeerDatapath> = me.datapath.clone();
        IpsecTunnel::new(
            me.xfrm.clone(),
            datapath,
            &me.settings(strict),
            me.id_of(peer),
        )
        .expect("tunnel")
    }

    #[tokio::test(start_paused = true)]
    async fn a_flip_moves_the_slot_and_retiring_the_current_epoch_stops_traffic_first() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let mut t = tunnel(&a, &b, false);
        let peer = a.end_of(&b);
        t.prepare(&peer).await.expect("prepare");
        assert!(
            a.kernel.policies().is_empty(),
            "nothing before keys unless strict"
        );
        let (agreement, _) = agreements(&a, &b, Epoch(1)).await;
        let installed = t
            .install(&peer, &agreement.keys, &agreement.peer_hello)
            .await
            .expect("install");
        assert_eq!((a.kernel.states().len(), a.kernel.policies().len()), (2, 3));
        assert_eq!(
            a.datapath.slot_of(peer.node_id),
            None,
            "no traffic before the flip"
        );
        assert!(!t.carries_spi(agreement.keys.inbound.spi.get()));
        t.flip(&peer, installed).await.expect("flip");
        assert_eq!(a.datapath.slot_of(peer.node_id), Some(KeySlot::FIRST));
        assert!(a.datapath.is_admitted(b.ip));
        assert!(t.carries_spi(agreement.keys.inbound.spi.get()));
        assert!(t.carries_spi(agreement.keys.outbound.spi.get()));
        let mut row = PeerStatus::connecting(&b.name, b.ip, peer.node_id);
        t.fill_status(&mut row);
        assert_eq!(row.slot, Some(1));
        assert_eq!(
            row.in_spi,
            Some(agreement.keys.inbound.spi.get()).map(|s| Spi::new(s).expect("spi").to_string())
        );

        t.retire(&peer, installed).await.expect("retire");
        assert_eq!(a.datapath.slot_of(peer.node_id), None);
        assert!(a.kernel.states().is_empty());
        assert_eq!(
            a.kernel.policies().len(),
            2,
            "IN and FWD stay for the next keys"
        );
        assert!(!t.carries_spi(agreement.keys.inbound.spi.get()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_epoch_the_tunnel_does_not_have_is_a_bug_not_a_deletion() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let mut t = tunnel(&a, &b, true);
        let peer = a.end_of(&b);
        t.prepare(&peer).await.expect("prepare");
        let before = a.kernel.policies();
        assert_eq!(before.len(), 3, "strict: IN, FWD and block before any key");
        let unknown = InstalledEpoch::new(Epoch(9), 9);
        let e = t.flip(&peer, unknown).await.unwrap_err();
        assert!(
            matches!(e, TunnelError::UnknownEpoch(u) if u == unknown),
            "{e}"
        );
        let e = t.retire(&peer, unknown).await.unwrap_err();
        assert!(e.to_string().starts_with("BUG:"), "{e}");
        assert_eq!(a.kernel.policies(), before);
        assert_eq!(a.datapath.slot_of(peer.node_id), None);
    }

    #[tokio::test(start_paused = true)]
    async fn teardown_removes_the_peers_objects_and_forgets_its_epochs() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let mut t = tunnel(&a, &b, true);
        let peer = a.end_of(&b);
        let (agreement, _) = agreements(&a, &b, Epoch(1)).await;
        let installed = t
            .install(&peer, &agreement.keys, &agreement.peer_hello)
            .await
            .expect("install");
        t.flip(&peer, installed).await.expect("flip");
        assert_eq!(t.teardown(&peer).await.expect("teardown"), 2 + 4);
        assert!(a.kernel.states().is_empty() && a.kernel.policies().is_empty());
        assert_eq!(
            t.sweep(&peer).await.expect("sweep"),
            0,
            "nothing left to want"
        );
        assert!(!t.carries_spi(agreement.keys.inbound.spi.get()));
    }

    #[tokio::test(start_paused = true)]
    async fn two_installations_of_one_epoch_number_flip_and_retire_apart() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let mut t = tunnel(&a, &b, false);
        let peer = a.end_of(&b);
        let (first_agreement, _) = agreements(&a, &b, Epoch(7)).await;
        let first = t
            .install(&peer, &first_agreement.keys, &first_agreement.peer_hello)
            .await
            .expect("first install");
        t.flip(&peer, first).await.expect("first flip");
        // The same number again (a handshake started in the same second): other keys, the next slot.
        let (second_agreement, _) =
            agreements_on_spis(&a, &b, Epoch(7), (0x0003_0000, 0x0004_0000)).await;
        let second = t
            .install(&peer, &second_agreement.keys, &second_agreement.peer_hello)
            .await
            .expect("second install");
        assert_ne!(first, second);
        t.flip(&peer, second).await.expect("second flip");
        assert_eq!(
            a.datapath.slot_of(peer.node_id),
            Some(KeySlot::FIRST.next())
        );
        assert!(t.carries_spi(second_agreement.keys.inbound.spi.get()));
        assert!(!t.carries_spi(first_agreement.keys.inbound.spi.get()));

        // Retiring the first installation removes its states, not the ones in use.
        t.retire(&peer, first).await.expect("retire the first");
        let spis: Vec<u32> = a.kernel.states().iter().map(|s| s.spi).collect();
        let expected = [
            second_agreement.keys.inbound.spi.get(),
            second_agreement.keys.outbound.spi.get(),
        ];
        assert_eq!(spis.len(), 2, "{spis:x?}");
        assert!(expected.iter().all(|s| spis.contains(s)), "{spis:x?}");
        assert_eq!(
            a.datapath.slot_of(peer.node_id),
            Some(KeySlot::FIRST.next())
        );
        assert!(t.carries_spi(second_agreement.keys.inbound.spi.get()));
        let e = t.retire(&peer, first).await.unwrap_err();
        assert!(
            matches!(e, TunnelError::UnknownEpoch(u) if u == first),
            "{e}"
        );
    }

    fn host_tunnel(me: &Node, peer: &Node, strict: bool) -> IpsecTunnel {
        let mut settings = me.settings(strict);
        settings.host_encryption = Some(HostEncryption {
            handshake_port: 4250,
            exempt_tcp_ports: vec![6443],
        });
        let datapath: Arc<dyn PeerDatapath> = me.datapath.clone();
        IpsecTunnel::new(me.xfrm.clone(), datapath, &settings, me.id_of(peer)).expect("tunnel")
    }

    /// Agreements of `a` and `b` whose Hellos both offer host SAs.
    async fn host_agreements(
        a: &Node,
        b: &Node,
        ta: &IpsecTunnel,
        epoch: Epoch,
    ) -> (
        nodeseal_keymgr::handshake::Agreement<tokio::io::DuplexStream>,
        nodeseal_keymgr::handshake::Agreement<tokio::io::DuplexStream>,
    ) {
        let spi = ta.fresh_spi();
        let a_hello = ta.announce(a.hello(epoch, spi));
        let b_hello = b
            .hello(epoch, spi ^ 0x0100_0000)
            .with_host_spi(nodeseal_keymgr::Spi::new(0x0777_0000 + (epoch.0 as u32)).expect("spi"));
        agreements_on_hellos(a, b, (a_hello, b_hello)).await
    }

    fn host_out_states(node: &Node) -> Vec<u32> {
        node.kernel
            .states()
            .iter()
            .filter(|s| {
                s.mark == sa::HOST_MARK
                    && s.dst == "10.0.0.2".parse::<std::net::IpAddr>().expect("ip")
            })
            .map(|s| s.spi)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn node_encryption_adds_host_sas_whose_out_state_arrives_at_the_flip_and_is_replaced_at_the_next()
     {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let mut t = host_tunnel(&a, &b, true);
        let second: std::net::IpAddr = "fd00::2".parse().expect("ip");
        let peer = PeerEnd {
            second_ip: Some(second),
            ..a.end_of(&b)
        };
        t.prepare(&peer).await.expect("prepare");
        let prepared: Vec<_> = a
            .kernel
            .policies()
            .into_iter()
            .filter(|p| {
                p.spec.as_ref().is_some_and(|s| {
                    ![s.selector.src(), s.selector.dst()].contains(&ipnet::IpNet::from(second))
                })
            })
            .collect();
        // IN, FWD, block for the pod CIDR; IN, FWD for the node IP; OUT for the node IP and the
        // pod CIDR; exemptions: 2 ports x sport/dport x IN/OUT.
        assert_eq!(prepared.len(), 3 + 2 + 2 + 8, "{prepared:#?}");
        assert!(
            prepared
                .iter()
                .filter(|p| p.reqids == [EXEMPT_REQID])
                .all(|p| p.spec.as_ref().is_some_and(
                    |s| s.templates[0].level == nodeseal_xfrm::TemplateLevel::Optional
                ))
        );

        let (first, _) = host_agreements(&a, &b, &t, Epoch(1)).await;
        let host_keys = first.keys.host.as_ref().expect("host keys");
        let first_host_out = host_keys.outbound.spi.get();
        let e1 = t
            .install(&peer, &first.keys, &first.peer_hello)
            .await
            .expect("install");
        assert_eq!(a.kernel.states().len(), 3, "pod IN/OUT and host IN");
        assert!(
            host_out_states(&a).is_empty(),
            "no host OUT before the flip"
        );
        t.flip(&peer, e1).await.expect("flip");
        assert_eq!(host_out_states(&a), [first_host_out]);
        assert_eq!(a.datapath.node_of_address(second), Some(peer.node_id));
        assert!(t.carries_spi(host_keys.inbound.spi.get()));
        let mut row = PeerStatus::connecting(&b.name, b.ip, peer.node_id);
        t.fill_status(&mut row);
        assert!(row.host_spis.is_some());
        // The pods' traffic to the node IP takes the slot's OUT policy.
        let marked_to_node = a.kernel.policies().into_iter().any(|p| {
            p.spec.as_ref().is_some_and(|s| {
                s.dir == nodeseal_xfrm::Direction::Out
                    && s.mark == sa::encrypt_mark(peer.node_id, KeySlot::FIRST)
                    && s.selector.dst() == ipnet::IpNet::from(b.ip)
            })
        });
        assert!(marked_to_node);

        let (second, _) = host_agreements(&a, &b, &t, Epoch(2)).await;
        let second_host_out = second
            .keys
            .host
            .as_ref()
            .expect("host keys")
            .outbound
            .spi
            .get();
        let e2 = t
            .install(&peer, &second.keys, &second.peer_hello)
            .await
            .expect("install");
        assert_eq!(
            host_out_states(&a),
            [first_host_out],
            "the old one until the flip"
        );
        t.flip(&peer, e2).await.expect("flip");
        assert_eq!(host_out_states(&a), [second_host_out], "only the newest");
        assert_eq!(
            t.sweep(&peer).await.expect("sweep"),
            0,
            "the kernel holds what is wanted"
        );
        t.retire(&peer, e1).await.expect("retire");
        assert_eq!(
            a.kernel.states().len(),
            4,
            "epoch 2: pod IN/OUT, host IN/OUT"
        );
        t.teardown(&peer).await.expect("teardown");
        assert!(a.kernel.states().is_empty() && a.kernel.policies().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn without_strict_mode_host_traffic_is_encrypted_only_while_host_keys_are_current() {
        let _clock = hold_clock();
        let pki = TestPki::new();
        let (a, b) = (Node::new(&pki, 1), Node::new(&pki, 2));
        let mut t = host_tunnel(&a, &b, false);
        let peer = a.end_of(&b);
        t.prepare(&peer).await.expect("prepare");
        assert!(a.kernel.policies().is_empty());
        let host_out_policies = |node: &Node| {
            node.kernel
                .policies()
                .iter()
                .filter(|p| p.mark == sa::HOST_MARK)
                .count()
        };

        // A peer that offers no host SAs: its node IP stays reachable in clear.
        let (plain, _) = agreements(&a, &b, Epoch(1)).await;
        assert!(plain.keys.host.is_none());
        let e1 = t
            .install(&peer, &plain.keys, &plain.peer_hello)
            .await
            .expect("install");
        t.flip(&peer, e1).await.expect("flip");
        assert_eq!(host_out_policies(&a), 0);

        let (with_host, _) = host_agreements(&a, &b, &t, Epoch(2)).await;
        let e2 = t
            .install(&peer, &with_host.keys, &with_host.peer_hello)
            .await
            .expect("install");
        t.flip(&peer, e2).await.expect("flip");
        assert_eq!(host_out_policies(&a), 2, "node IP and pod CIDR");
        assert_eq!(host_out_states(&a).len(), 1);

        t.retire(&peer, e1).await.expect("retire");
        t.retire(&peer, e2).await.expect("retire the current epoch");
        assert_eq!(host_out_policies(&a), 0, "in clear again, not dropped");
        assert!(a.kernel.states().is_empty());
    }
}
