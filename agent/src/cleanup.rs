//! Removing everything the agent put into the kernel: its XFRM states and policies (by
//! ownership, never anyone else's), its WireGuard link (with the link go its peers and the
//! routes into it) and routing rules, and its eBPF programs and pins.
//!
//! A normal stop keeps all of it, so a restarted agent takes over without a gap. This runs only
//! when the agent is told to stop for good (`--cleanup-on-exit`, e.g. on `helm uninstall`) or
//! starts with encryption off after a run with it on.

use nodeseal_xfrm::Handle;
use tracing::{info, warn};

use crate::config::{AgentConfig, CleanupOnExit};
use crate::datapath::{DatapathError, DatapathHandle, DatapathSettings};

/// Why the kernel state could not be removed completely.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// Opening the XFRM netlink socket failed.
    #[error("opening the XFRM netlink socket")]
    Netlink(#[source] nodeseal_xfrm::XfrmError),
    /// Deleting our XFRM objects failed.
    #[error("deleting nodeseal's XFRM states and policies")]
    Xfrm(#[source] nodeseal_xfrm::ReconcileError),
    /// Removing the datapath failed.
    #[error("removing the eBPF datapath")]
    Datapath(#[source] DatapathError),
    /// Removing the WireGuard link or its routing rules failed.
    #[error("removing the WireGuard link and rules")]
    Wireguard(#[source] nodeseal_wireguard::Error),
    /// The blocking removal task panicked (our bug).
    #[error("BUG: the datapath removal task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// What was removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// XFRM states and policies deleted.
    pub xfrm_objects: usize,
    /// Whether a datapath was found and removed.
    pub datapath: bool,
    /// Whether a WireGuard link was found and removed.
    pub wireguard_link: bool,
}

/// Deletes the WireGuard link (a link of that name but another kind is someone else's: left
/// alone) and nodeseal's rules. Runs in either mode: a run in WireGuard mode may have left them.
async fn remove_wireguard(config: &AgentConfig) -> Result<bool, CleanupError> {
    use nodeseal_wireguard::{Error, Family, Rule};
    let handle = nodeseal_wireguard::Handle::new().map_err(CleanupError::Wireguard)?;
    let deleted = match handle
        .links()
        .delete(config.wireguard_link.clone())
        .execute()
        .await
    {
        Ok(deleted) => deleted,
        Err(Error::WrongKind { .. }) => false,
        Err(e) => return Err(CleanupError::Wireguard(e)),
    };
    for family in [Family::V4, Family::V6] {
        let rule = Rule::all(
            family,
            crate::peer::wireguard::RULE_PRIORITY,
            crate::peer::wireguard::ROUTE_TABLE,
        );
        let exemptions = crate::peer::wireguard::exemption_rules(
            family,
            config.handshake_port,
            &config.node_encryption_exempt_tcp_port,
        );
        for rule in std::iter::once(rule).chain(exemptions) {
            if let Err(e) = handle.routes().delete_rule(rule).execute().await {
                // IPv6 may be off on the node: then there is no such rule either.
                warn!(error = %crate::peer::error_chain(&e), ?rule, "removing a WireGuard rule");
            }
        }
    }
    Ok(deleted)
}

/// Removes our XFRM objects and the datapath: `loaded` when this process has it open,
/// otherwise whatever is pinned under the configured pin root.
///
/// # Errors
/// [`CleanupError`]; the XFRM part runs even when the datapath part fails and vice versa, and
/// the first failure is returned.
pub async fn remove_kernel_state(
    config: &AgentConfig,
    loaded: Option<&DatapathHandle>,
) -> Result<Removed, CleanupError> {
    let mut removed = Removed::default();
    // The datapath first: once its programs are gone nothing marks packets for the SAs.
    let datapath = match loaded {
        Some(handle) => handle
            .remove_from_kernel()
            .map(|_| true)
            .map_err(CleanupError::Datapath),
        // Reopening the pins loads the programs (verifier time: seconds on a slow machine), so
        // off the runtime's workers: the health endpoint keeps answering meanwhile.
        None => {
            let settings = settings(config);
            tokio::task::spawn_blocking(move || crate::datapath::remove_pinned(&settings))
                .await
                .map_err(CleanupError::Task)
                .and_then(|r| r.map(|r| r.is_some()).map_err(CleanupError::Datapath))
        }
    };
    let xfrm = match Handle::new() {
        Ok(handle) => {
            nodeseal_xfrm::reconcile::flush_owned(&handle, &crate::peer::ipsec::ownership())
                .await
                .map_err(CleanupError::Xfrm)
        }
        Err(e) => Err(CleanupError::Netlink(e)),
    };
    match xfrm {
        Ok(n) => removed.xfrm_objects = n,
        Err(e) => {
            warn!(error = %crate::peer::error_chain(&e), "removing XFRM state");
            if datapath.is_ok() {
                return Err(e);
            }
        }
    }
    match remove_wireguard(config).await {
        Ok(deleted) => removed.wireguard_link = deleted,
        Err(e) => warn!(error = %crate::peer::error_chain(&e), "removing WireGuard state"),
    }
    removed.datapath = datapath?;
    info!(
        xfrm_objects = removed.xfrm_objects,
        datapath = removed.datapath,
        wireguard_link = removed.wireguard_link,
        "kernel state removed"
    );
    Ok(removed)
}

/// The datapath settings a cleanup needs (where the pins are, which interfaces to detach).
fn settings(config: &AgentConfig) -> DatapathSettings {
    DatapathSettings {
        pin_root: config.bpf_pin_root.clone(),
        uplink: config.uplink.clone(),
        pod_interface_prefix: config.pod_interface_prefix.clone(),
        strict: config.strict_mode,
        local_pod_cidrs: Vec::new(),
        mode: config.datapath_mode(),
        node_encryption: config.node_encryption,
        clear_ports: config.clear_ports(),
    }
}

/// Whether the agent, now stopping, should remove its kernel state. `daemon_set` answers
/// "does the agent DaemonSet still exist, and is it not being deleted?" in Kubernetes mode.
pub async fn should_remove_on_exit<F, Fut>(policy: CleanupOnExit, daemon_set: Option<F>) -> bool
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<DaemonSetState, kube::Error>>,
{
    match policy {
        CleanupOnExit::Never => false,
        CleanupOnExit::Always => true,
        CleanupOnExit::WhenUninstalled => {
            let Some(query) = daemon_set else {
                info!(
                    "--cleanup-on-exit when-uninstalled needs Kubernetes mode; keeping kernel state"
                );
                return false;
            };
            match query().await {
                Ok(DaemonSetState::Present) => false,
                Ok(state) => {
                    info!(?state, "nodeseal is being uninstalled");
                    true
                }
                // Unsure: keeping state is the safe side (a restart stays hitless; an
                // uninstall leaves state that `--cleanup-on-exit always` or a reboot clears).
                Err(e) => {
                    warn!(error = %e, "cannot read the agent DaemonSet; keeping kernel state");
                    false
                }
            }
        }
    }
}

/// The agent DaemonSet as seen at shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonSetState {
    /// It exists and is not being deleted: a restart or rolling update.
    Present,
    /// It has a deletion timestamp.
    Deleting,
    /// It does not exist.
    Gone,
    /// The apiserver no longer accepts the agent's credentials (401) or its role (403): the
    /// release's ServiceAccount or RBAC is gone. `helm uninstall` deletes those right after the
    /// DaemonSet, usually before the agent pods are stopped, so this is the common way an
    /// uninstall looks from inside the agent; nothing else removes them.
    AccessRevoked,
}

/// Reads the DaemonSet `namespace/name`, with the agent's own credentials.
///
/// # Errors
/// API errors other than NotFound.
pub async fn daemon_set_state(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<DaemonSetState, kube::Error> {
    let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
        kube::Api::namespaced(client, namespace);
    match api.get_opt(name).await {
        Ok(None) => Ok(DaemonSetState::Gone),
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => Ok(DaemonSetState::Deleting),
        Ok(Some(_)) => Ok(DaemonSetState::Present),
        Err(kube::Error::Api(status)) if status.code == 401 || status.code == 403 => {
            Ok(DaemonSetState::AccessRevoked)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer = std::future::Ready<Result<DaemonSetState, kube::Error>>;

    fn answer(state: Result<DaemonSetState, kube::Error>) -> Option<impl FnOnce() -> Answer> {
        Some(move || std::future::ready(state))
    }

    fn none() -> Option<fn() -> Answer> {
        None
    }

    #[tokio::test]
    async fn never_and_always_do_not_ask() {
        assert!(
            !should_remove_on_exit(CleanupOnExit::Never, answer(Ok(DaemonSetState::Gone))).await
        );
        assert!(
            should_remove_on_exit(CleanupOnExit::Always, answer(Ok(DaemonSetState::Present))).await
        );
        assert!(should_remove_on_exit(CleanupOnExit::Always, none()).await);
    }

    #[tokio::test]
    async fn when_uninstalled_follows_the_daemon_set() {
        let policy = CleanupOnExit::WhenUninstalled;
        assert!(!should_remove_on_exit(policy, answer(Ok(DaemonSetState::Present))).await);
        assert!(should_remove_on_exit(policy, answer(Ok(DaemonSetState::Deleting))).await);
        assert!(should_remove_on_exit(policy, answer(Ok(DaemonSetState::Gone))).await);
        assert!(should_remove_on_exit(policy, answer(Ok(DaemonSetState::AccessRevoked))).await);
        // Without Kubernetes, or when the apiserver does not answer: keep state (hitless).
        assert!(!should_remove_on_exit(policy, none()).await);
        let unreachable = kube::Error::Service("connection refused".into());
        assert!(!should_remove_on_exit(policy, answer(Err(unreachable))).await);
    }
}
