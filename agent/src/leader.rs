//! Leader election among keymgr replicas through a `coordination.k8s.io/v1` Lease, so that one
//! replica signs at a time while the others stand by.
//!
//! The holder renews the Lease every `lease_duration / 3`; a candidate takes it over only once
//! the holder has not renewed for a whole `lease_duration`. A leader that cannot renew for
//! `lease_duration` stops its work before another replica can take over, so two replicas
//! never sign at once. Every write is a compare-and-swap on the Lease's resourceVersion.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Who competes for which Lease, and how long a lease lasts.
#[derive(Clone, Debug)]
pub struct Election {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica (its pod name).
    pub identity: String,
    /// How long a holder that stopped renewing keeps the Lease.
    pub lease_duration: Duration,
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold the Lease (acquired or renewed).
    Leading,
    /// Someone else holds a live Lease.
    Following(String),
}

impl Election {
    fn renew_period(&self) -> Duration {
        self.lease_duration / 3
    }

    /// Runs `work` whenever this replica leads, cancelling the token it was given when
    /// leadership is lost; returns when `cancel` fires.
    pub async fn run<F, Fut>(&self, client: Client, cancel: CancellationToken, mut work: F)
    where
        F: FnMut(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let leases: Api<Lease> = Api::namespaced(client, &self.namespace);
        let mut following: Option<String> = None;
        loop {
            match self.attempt(&leases).await {
                Ok(Attempt::Leading) => {
                    info!(lease = %self.lease_name, identity = %self.identity, "leading");
                    following = None;
                    let term = cancel.child_token();
                    let task = tokio::spawn(work(term.clone()));
                    self.hold(&leases, &cancel).await;
                    term.cancel();
                    let _ = task.await;
                    if cancel.is_cancelled() {
                        return;
                    }
                    warn!(lease = %self.lease_name, "lost leadership; standing by");
                }
                Ok(Attempt::Following(holder)) => {
                    if following.as_deref() != Some(holder.as_str()) {
                        info!(lease = %self.lease_name, %holder, "standing by");
                        following = Some(holder);
                    }
                }
                Err(error) => warn!(lease = %self.lease_name, %error, "leader election"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.renew_period()) => {}
            }
        }
    }

    /// Renews until a renewal has failed for a whole lease duration (or someone else holds
    /// the Lease), or `cancel` fires.
    async fn hold(&self, leases: &Api<Lease>, cancel: &CancellationToken) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.renew_period()) => {}
            }
            match self.attempt(leases).await {
                Ok(Attempt::Leading) => last_renewed = tokio::time::Instant::now(),
                Ok(Attempt::Following(holder)) => {
                    warn!(%holder, "the Lease was taken over");
                    return;
                }
                Err(error) => {
                    warn!(%error, "renewing the Lease");
                    // Stop before the Lease can expire for the others (renewals are a third of
                    // it apart, so this leaves one renew period of margin).
                    if last_renewed.elapsed() + self.renew_period() >= self.lease_duration {
                        return;
                    }
                }
            }
        }
    }

    async fn attempt(&self, leases: &Api<Lease>) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = leases.get_opt(&self.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease_name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    Ok(Attempt::Following("(another replica)".to_owned()))
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != self.identity {
            let duration = spec
                .lease_duration_seconds
                .map_or(self.lease_duration, |s| {
                    Duration::from_secs(u64::try_from(s).unwrap_or(0))
                });
            let renewed = spec.renew_time.as_ref().map(|t| t.0);
            let expired = renewed.is_none_or(|renewed| {
                SignedDuration::try_from(duration)
                    .ok()
                    .and_then(|d| renewed.checked_add(d).ok())
                    .is_none_or(|expiry| expiry < now)
            });
            if !holder.is_empty() && !expired {
                return Ok(Attempt::Following(holder));
            }
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        match leases
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Ok(Attempt::Following("(another replica, just now)".to_owned()))
            }
            Err(e) => Err(e),
        }
    }
}
