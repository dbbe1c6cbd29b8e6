//! SA usage limits: the kernel's expire notices become rekeys of the peer whose SA it is.
//!
//! Every state carries byte and packet limits ([`crate::peer::ipsec::SaLimits`]). At the soft limit the
//! kernel sends a notice and the peer task rekeys at once, whatever its rekey clock says; at the
//! hard limit the kernel has already deleted the state, and the peer task rekeys too. This is
//! defence in depth under the time-based rekey: a key never carries more than its limit, however
//! fast the link.

use std::net::IpAddr;
use std::sync::Arc;

use nodeseal_xfrm::{Expire, ExpireMonitor, Handle, KernelState, MonitorEvent};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::peer::ipsec::REQID;
use crate::peer::{PeerCommand, PeerRegistry, error_chain};

const IPPROTO_ESP: u8 = 50;

/// What turns notices into peer commands.
pub struct ExpiryFollower {
    /// The running peer tasks.
    pub registry: Arc<PeerRegistry>,
    /// For a re-check after lost notices.
    pub xfrm: Handle,
    /// This node's IP (an IN state's destination).
    pub local: IpAddr,
    /// Counts notices.
    pub metrics: Arc<Metrics>,
}

impl ExpiryFollower {
    /// Follows `monitor` until `cancel`.
    pub async fn run(self, mut monitor: ExpireMonitor, cancel: CancellationToken) {
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => return,
                e = monitor.next() => e,
            };
            match event {
                Some(MonitorEvent::Expire(e)) => self.dispatch(&e).await,
                Some(MonitorEvent::Lost) => {
                    self.metrics.sa_limit_notice("lost");
                    warn!("XFRM expire notices were lost; checking every SA against its limits");
                    self.recheck().await;
                }
                None => {
                    warn!(
                        "XFRM expire notices stopped; SAs are still deleted at their hard limits"
                    );
                    return;
                }
            }
        }
    }

    /// Hands a notice about one of our states to its peer's task.
    async fn dispatch(&self, e: &Expire) {
        if e.reqid != REQID || e.proto != IPPROTO_ESP {
            return;
        }
        self.metrics
            .sa_limit_notice(if e.hard { "hard" } else { "soft" });
        // OUT states go to the peer, IN states come from it.
        let peer = if e.dst == self.local { e.src } else { e.dst };
        let Some((name, handle)) = self.registry.lookup(peer) else {
            debug!(%peer, "expire notice for a peer no task owns");
            return;
        };
        debug!(peer = %name, spi = e.spi, hard = e.hard, "SA usage limit");
        let _ = handle
            .commands
            .send(PeerCommand::SaExpired {
                spi: e.spi,
                hard: e.hard,
            })
            .await;
    }

    /// After lost notices: what the kernel's counters say crossed a soft limit is treated as
    /// if its notice had arrived (a hard limit needs no notice: the state is gone and the
    /// peer's next handshake replaces it).
    async fn recheck(&self) {
        let states = match self.xfrm.states().dump().execute().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %error_chain(&e), "cannot dump states after lost notices");
                return;
            }
        };
        for state in states.iter().filter(|s| crossed_soft_limit(s)) {
            let Some(spec) = &state.spec else {
                continue;
            };
            self.dispatch(&Expire {
                src: spec.src,
                dst: spec.dst,
                spi: state.spi,
                proto: state.proto,
                reqid: state.reqid,
                mark: state.mark,
                hard: false,
            })
            .await;
        }
    }
}

/// Whether a state's counters reached its soft byte or packet limit.
fn crossed_soft_limit(state: &KernelState) -> bool {
    let Some(spec) = &state.spec else {
        return false;
    };
    let soft = spec.lifetime.soft;
    soft.bytes.is_some_and(|b| state.stats.bytes >= b)
        || soft.packets.is_some_and(|p| state.stats.packets >= p)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use nodeseal_bpf::NodeId;
    use nodeseal_keymgr::NodeName;
    use nodeseal_xfrm::{Mark, Spi, StateStats};
    use tokio::sync::mpsc;

    use super::*;
    use crate::peer::ipsec::{EpochSas, KeySlot, SaLimits};
    use crate::peer::{LocalEnd, PeerEnd};
    use crate::peer::{PeerHandle, PeerStatus};

    const LOCAL: &str = "10.0.0.1";
    const PEER: &str = "10.0.0.2";

    fn follower() -> (ExpiryFollower, mpsc::Receiver<PeerCommand>) {
        let (tx, rx) = mpsc::channel(8);
        let registry = Arc::new(PeerRegistry::default());
        let name = NodeName::new("node2").unwrap();
        registry.insert(
            PEER.parse().unwrap(),
            name.clone(),
            PeerHandle {
                commands: tx,
                status: Arc::new(Mutex::new(PeerStatus::connecting(
                    &name,
                    PEER.parse().unwrap(),
                    NodeId(2),
                ))),
                cancel: CancellationToken::new(),
            },
        );
        let follower = ExpiryFollower {
            registry,
            xfrm: Handle::with_kernel(nodeseal_xfrm::test_helpers::FakeKernel::default()),
            local: LOCAL.parse().unwrap(),
            metrics: Arc::new(Metrics::new()),
        };
        (follower, rx)
    }

    fn notice(src: &str, dst: &str, reqid: u32, hard: bool) -> Expire {
        Expire {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            spi: 0x1234,
            proto: IPPROTO_ESP,
            reqid,
            mark: Mark::NONE,
            hard,
        }
    }

    #[tokio::test]
    async fn notices_reach_the_peer_whose_sa_it_is_and_foreign_ones_do_not() {
        let (follower, mut rx) = follower();
        // An OUT state (to the peer) and an IN state (from it) both belong to the peer.
        follower.dispatch(&notice(LOCAL, PEER, REQID, false)).await;
        follower.dispatch(&notice(PEER, LOCAL, REQID, true)).await;
        // Someone else's state, and a state with a node no task owns.
        follower.dispatch(&notice(LOCAL, PEER, 7, false)).await;
        follower
            .dispatch(&notice(LOCAL, "10.0.0.9", REQID, false))
            .await;
        let mut got = Vec::new();
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                PeerCommand::SaExpired { spi, hard } => got.push((spi, hard)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, [(0x1234, false), (0x1234, true)]);
        let text = follower.metrics.encode();
        assert!(
            text.contains(r#"nodeseal_sa_limit_notices_total{limit="soft"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"nodeseal_sa_limit_notices_total{limit="hard"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn counters_at_the_soft_limit_count_as_crossed() {
        let sas = EpochSas::new(
            &LocalEnd {
                ip: LOCAL.parse().unwrap(),
                pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()],
                second_ip: None,
            },
            &PeerEnd {
                node_id: NodeId(2),
                ip: PEER.parse().unwrap(),
                pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
                handshake_port: 4250,
                second_ip: None,
            },
            KeySlot::FIRST,
            (Spi::new(0x1001).unwrap(), &[1; 20]),
            (Spi::new(0x2002).unwrap(), &[2; 20]),
            SaLimits {
                bytes: Some(4000),
                packets: Some(400),
            },
        )
        .unwrap();
        let state = |bytes, packets| KernelState {
            dst: sas.outbound.dst,
            spi: sas.outbound.spi.get(),
            proto: IPPROTO_ESP,
            reqid: REQID,
            mark: sas.outbound.mark,
            spec: Some(sas.outbound.clone()),
            stats: StateStats {
                bytes,
                packets,
                ..StateStats::default()
            },
        };
        assert!(!crossed_soft_limit(&state(2999, 299)));
        assert!(crossed_soft_limit(&state(3000, 0)));
        assert!(crossed_soft_limit(&state(0, 300)));
        let mut foreign = state(5000, 500);
        foreign.spec = None;
        assert!(!crossed_soft_limit(&foreign));
    }
}
