//! Prometheus metrics (`/metrics`, served by [`crate::health::serve`]), registered under the
//! `nodeseal` prefix. Per-peer detail belongs in `nodeseal status`: a series per peer would be
//! one per node pair across the cluster. WireGuard mode's device counters are summed over the
//! peers, and its handshakes counted by freshness.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use nodeseal_bpf::{PolicyDirection, PolicyVerdictCounts};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::warn;

use crate::datapath::PolicyWrites;
use crate::peer::PeerStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyVerdictLabels {
    direction: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabel {
    handshake: &'static str,
}

/// WireGuard's REJECT_AFTER_TIME: a session older than this carries nothing.
const WIREGUARD_SESSION_SECS: u64 = 180;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    handshakes: Family<ResultLabel, Counter>,
    rekey_duration: Histogram,
    peers_established: Gauge,
    peers_total: Gauge,
    datapath_drops: Family<ReasonLabel, Gauge>,
    xfrm_errors: Family<ReasonLabel, Gauge>,
    sa_limit_notices: Family<LimitLabel, Counter>,
    policy_programming: Histogram,
    policy_programs: Family<ResultLabel, Counter>,
    policy_map_writes: Family<MapLabel, Counter>,
    policy_verdicts: Family<PolicyVerdictLabels, Counter>,
    /// The datapath's cumulative policy verdict counts last mirrored into `policy_verdicts`.
    policy_verdicts_seen: Mutex<PolicyVerdictCounts>,
    wireguard_rx_bytes: Gauge,
    wireguard_tx_bytes: Gauge,
    wireguard_sessions: Family<SessionLabel, Gauge>,
}

impl Metrics {
    /// Creates and registers every metric.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nodeseal");
        let handshakes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "handshakes",
            "Key-agreement handshakes by result (initiated, accepted, failed, refused; throttled, rate_limited: closed before TLS)",
            handshakes.clone(),
        );
        let rekey_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "rekey_duration_seconds",
            "Time from handshake start to the new keys being in use",
            rekey_duration.clone(),
        );
        let peers_established = Gauge::default();
        registry.register(
            "peers_established",
            "Peers with keys in use",
            peers_established.clone(),
        );
        let peers_total = Gauge::default();
        registry.register(
            "peers",
            "Peers known from the cluster store",
            peers_total.clone(),
        );
        let datapath_drops = Family::<ReasonLabel, Gauge>::default();
        registry.register(
            "datapath_drops",
            "Packets dropped by the eBPF datapath, by reason (cumulative)",
            datapath_drops.clone(),
        );
        let xfrm_errors = Family::<ReasonLabel, Gauge>::default();
        registry.register(
            "xfrm_errors",
            "Non-zero counters of /proc/net/xfrm_stat (cumulative)",
            xfrm_errors.clone(),
        );
        let sa_limit_notices = Family::<LimitLabel, Counter>::default();
        registry.register(
            "sa_limit_notices",
            "Kernel notices of SAs reaching their usage limit (soft: rekeyed, hard: deleted, \
             lost: notices dropped by a full socket buffer)",
            sa_limit_notices.clone(),
        );
        let policy_programming = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "policy_programming_seconds",
            "Time to compile and program identity policy after a change (endpoints, identities, \
             policies, nodes)",
            policy_programming.clone(),
        );
        let policy_programs = Family::<ResultLabel, Counter>::default();
        registry.register(
            "policy_programs",
            "Identity policy programs by result (ok; failed: the datapath kept the previous policy)",
            policy_programs.clone(),
        );
        let policy_map_writes = Family::<MapLabel, Counter>::default();
        registry.register(
            "policy_map_writes",
            "Entries identity policy programs wrote, by BPF map (policy: table slots, ipcache, \
             endpoints); a change writes about what it changes",
            policy_map_writes.clone(),
        );
        for map in ["policy", "ipcache", "endpoints"] {
            let _ = policy_map_writes.get_or_create(&MapLabel { map });
        }
        let policy_verdicts = Family::<PolicyVerdictLabels, Counter>::default();
        registry.register(
            "policy_verdicts",
            "Identity policy decisions of the eBPF datapath by direction (ingress, egress) and \
             verdict (allowed, denied), for endpoints that enforce that direction",
            policy_verdicts.clone(),
        );
        // All four series exist from the start, at 0: a rate over them works before the first
        // decision, and "no denials" reads as 0 rather than as a missing series.
        for direction in ["ingress", "egress"] {
            for verdict in ["allowed", "denied"] {
                let _ = policy_verdicts.get_or_create(&PolicyVerdictLabels { direction, verdict });
            }
        }
        let wireguard_rx_bytes = Gauge::default();
        registry.register(
            "wireguard_rx_bytes",
            "Bytes received from the WireGuard peers with keys in use, as the device counts them \
             per entry (an entry replaced starts again from 0)",
            wireguard_rx_bytes.clone(),
        );
        let wireguard_tx_bytes = Gauge::default();
        registry.register(
            "wireguard_tx_bytes",
            "Bytes sent to the WireGuard peers with keys in use, as the device counts them per \
             entry (an entry replaced starts again from 0)",
            wireguard_tx_bytes.clone(),
        );
        let wireguard_sessions = Family::<SessionLabel, Gauge>::default();
        registry.register(
            "wireguard_peers",
            "WireGuard peers with keys in use by their latest handshake: `current` within the \
             180 s a WireGuard session lasts, `expired` before that (normal for an idle pair: \
             WireGuard handshakes when there is traffic), `never`",
            wireguard_sessions.clone(),
        );
        for handshake in ["current", "expired", "never"] {
            let _ = wireguard_sessions.get_or_create(&SessionLabel { handshake });
        }
        Self {
            registry,
            wireguard_rx_bytes,
            wireguard_tx_bytes,
            wireguard_sessions,
            policy_programming,
            policy_programs,
            policy_map_writes,
            handshakes,
            rekey_duration,
            peers_established,
            peers_total,
            datapath_drops,
            xfrm_errors,
            sa_limit_notices,
            policy_verdicts,
            policy_verdicts_seen: Mutex::new(PolicyVerdictCounts::default()),
        }
    }

    /// Counts a handshake outcome.
    pub fn handshake(&self, result: &str) {
        self.handshakes
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts a kernel notice of an SA at its usage limit (`soft`, `hard` or `lost`).
    pub fn sa_limit_notice(&self, limit: &str) {
        self.sa_limit_notices
            .get_or_create(&LimitLabel {
                limit: limit.to_owned(),
            })
            .inc();
    }

    /// Records a completed rekey.
    pub fn rekey_done(&self, took: Duration) {
        self.rekey_duration.observe(took.as_secs_f64());
    }

    /// Records one identity policy program and what it wrote.
    pub fn policy_programmed(&self, took: Duration, ok: bool, writes: Option<&PolicyWrites>) {
        if let Some(writes) = writes {
            for (map, n) in [
                ("policy", writes.table_slots),
                ("ipcache", writes.ipcache),
                ("endpoints", writes.endpoints),
            ] {
                self.policy_map_writes
                    .get_or_create(&MapLabel { map })
                    .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
            }
        }
        self.policy_programming.observe(took.as_secs_f64());
        self.policy_programs
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    /// Sets the peer gauges.
    pub fn set_peers(&self, total: usize, established: usize) {
        self.peers_total
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        self.peers_established
            .set(i64::try_from(established).unwrap_or(i64::MAX));
    }

    /// Mirrors the datapath's drop counters.
    pub fn set_datapath_drop(&self, reason: &str, count: u64) {
        self.datapath_drops
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Mirrors the datapath's cumulative policy verdict counts into the
    /// `nodeseal_policy_verdicts_total` counters. A count below the last one seen means the
    /// maps were recreated (uninstalled and loaded again): the new count is all new decisions.
    pub fn set_policy_verdicts(&self, now: PolicyVerdictCounts) {
        let Ok(mut seen) = self.policy_verdicts_seen.lock() else {
            return;
        };
        for (direction, key) in [
            ("ingress", PolicyDirection::Ingress),
            ("egress", PolicyDirection::Egress),
        ] {
            for (verdict, allowed) in [("allowed", true), ("denied", false)] {
                let (before, after) = (seen.get(key, allowed), now.get(key, allowed));
                let delta = if after >= before {
                    after - before
                } else {
                    after
                };
                self.policy_verdicts
                    .get_or_create(&PolicyVerdictLabels { direction, verdict })
                    .inc_by(delta);
            }
        }
        *seen = now;
    }

    /// Mirrors what the WireGuard device holds for the peers with keys in use (`rows` filled
    /// by [`PeerStatus::fill_from_wireguard`]): their bytes, summed, and how many had their
    /// latest handshake within a session's lifetime of `now`, before, or never.
    pub fn set_wireguard_peers(&self, rows: &[PeerStatus], now: SystemTime) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let now_unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (mut rx, mut tx) = (0u64, 0u64);
        let (mut current, mut expired, mut never) = (0u64, 0u64, 0u64);
        for row in rows.iter().filter(|r| r.wg_public_key.is_some()) {
            rx = rx.saturating_add(row.in_bytes);
            tx = tx.saturating_add(row.out_bytes);
            match row.wg_latest_handshake_unix {
                Some(at) if now_unix.saturating_sub(at) <= WIREGUARD_SESSION_SECS => current += 1,
                Some(_) => expired += 1,
                None => never += 1,
            }
        }
        self.wireguard_rx_bytes.set(gauge(rx));
        self.wireguard_tx_bytes.set(gauge(tx));
        for (handshake, n) in [("current", current), ("expired", expired), ("never", never)] {
            self.wireguard_sessions
                .get_or_create(&SessionLabel { handshake })
                .set(gauge(n));
        }
    }

    /// Mirrors one xfrm_stat counter.
    pub fn set_xfrm_error(&self, reason: &str, count: u64) {
        self.xfrm_errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The text exposition.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            warn!("BUG: encoding metrics failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_peers_are_summed_and_counted_by_handshake() {
        let metrics = Metrics::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_300);
        let row = |name: &str, key: Option<u8>, handshake: Option<u64>, bytes: (u64, u64)| {
            let name = nodeseal_keymgr::NodeName::new(name).unwrap();
            let mut row =
                PeerStatus::connecting(&name, "10.0.0.2".parse().unwrap(), nodeseal_bpf::NodeId(3));
            row.wg_public_key =
                key.map(|k| nodeseal_wireguard::PublicKey::from_bytes([k; 32]).to_string());
            row.wg_latest_handshake_unix = handshake;
            (row.in_bytes, row.out_bytes) = bytes;
            row
        };
        let text = metrics.encode();
        assert!(
            text.contains("nodeseal_wireguard_peers{handshake=\"never\"} 0"),
            "{text}"
        );
        metrics.set_wireguard_peers(
            &[
                row("a", Some(1), Some(1_700_000_200), (1000, 2000)),
                row("b", Some(2), Some(1_700_000_000), (10, 20)),
                row("c", Some(3), None, (0, 0)),
                // No keys in use: not counted.
                row("d", None, Some(1_700_000_299), (5, 5)),
            ],
            now,
        );
        let text = metrics.encode();
        for line in [
            "nodeseal_wireguard_rx_bytes 1010",
            "nodeseal_wireguard_tx_bytes 2020",
            "nodeseal_wireguard_peers{handshake=\"current\"} 1",
            "nodeseal_wireguard_peers{handshake=\"expired\"} 1",
            "nodeseal_wireguard_peers{handshake=\"never\"} 1",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        assert!(!text.contains("peer="), "no per-peer series: {text}");
    }

    #[test]
    fn policy_verdicts_follow_the_datapath_counts() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        assert!(
            text.contains("# TYPE nodeseal_policy_verdicts counter"),
            "{text}"
        );
        metrics.set_policy_verdicts(PolicyVerdictCounts {
            ingress_allowed: 5,
            ingress_denied: 2,
            egress_allowed: 0,
            egress_denied: 1,
        });
        metrics.set_policy_verdicts(PolicyVerdictCounts {
            ingress_allowed: 7,
            ingress_denied: 2,
            egress_allowed: 0,
            egress_denied: 1,
        });
        let text = metrics.encode();
        for line in [
            "nodeseal_policy_verdicts_total{direction=\"ingress\",verdict=\"allowed\"} 7",
            "nodeseal_policy_verdicts_total{direction=\"ingress\",verdict=\"denied\"} 2",
            "nodeseal_policy_verdicts_total{direction=\"egress\",verdict=\"allowed\"} 0",
            "nodeseal_policy_verdicts_total{direction=\"egress\",verdict=\"denied\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        // Maps recreated: counting restarts from the new values, never backwards.
        metrics.set_policy_verdicts(PolicyVerdictCounts {
            ingress_allowed: 3,
            ..PolicyVerdictCounts::default()
        });
        let text = metrics.encode();
        assert!(
            text.contains(
                "nodeseal_policy_verdicts_total{direction=\"ingress\",verdict=\"allowed\"} 10"
            ),
            "{text}"
        );
    }
}
