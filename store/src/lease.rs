//! [`NodeLease`]: keeps a node's own record alive in the store.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Store;
use super::backend::{Backoff, LeaseId};
use super::error::StoreError;
use super::record::{NodeRecord, RecordKind, encode};

/// This node's published record and the lease it hangs on. Renew it (by [`run`](Self::run),
/// or [`renew`](Self::renew) in the caller's own loop) more often than the TTL, or the record
/// disappears from etcd and peers treat the node as gone.
///
/// If the lease was lost anyway (etcd down for longer than the TTL), renewing grants a new
/// lease and publishes the record again, so the node reappears once etcd is back.
#[derive(Debug)]
pub struct NodeLease {
    store: Store,
    record: NodeRecord,
    ttl: Duration,
    lease: LeaseId,
}

impl NodeLease {
    pub(super) async fn publish(
        store: Store,
        record: NodeRecord,
        ttl: Duration,
    ) -> Result<Self, StoreError> {
        if ttl < Duration::from_secs(1) {
            return Err(StoreError::Config {
                reason: format!("node lease TTL {ttl:?} is shorter than 1 s"),
            });
        }
        let lease = Self::grant_and_put(&store, &record, ttl).await?;
        info!(node = %record.name, lease = %lease, ttl = ?ttl, "published node record");
        Ok(Self {
            store,
            record,
            ttl,
            lease,
        })
    }

    async fn grant_and_put(
        store: &Store,
        record: &NodeRecord,
        ttl: Duration,
    ) -> Result<LeaseId, StoreError> {
        let value = encode(record)?;
        let backend = store.backend();
        let lease = backend.grant_lease(ttl).await?;
        backend
            .put(&record.key().to_string(), value, Some(lease))
            .await?;
        Ok(lease)
    }

    /// The current lease.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The published record.
    pub fn record(&self) -> &NodeRecord {
        &self.record
    }

    /// Renews the lease once; if the backend lost it, grants a new one and publishes the
    /// record again.
    ///
    /// # Errors
    ///
    /// The backend's errors (a transient [`StoreError::Backend`] while etcd is down).
    pub async fn renew(&mut self) -> Result<(), StoreError> {
        match self.store.backend().keep_alive(self.lease).await {
            Ok(()) => Ok(()),
            Err(StoreError::LeaseExpired { lease }) => {
                warn!(node = %self.record.name, lease = %lease, "node lease expired, publishing again");
                self.lease = Self::grant_and_put(&self.store, &self.record, self.ttl).await?;
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Replaces the published record (e.g. a new WireGuard key) under the same lease.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] if the record is invalid or names another node; the
    /// backend's errors.
    pub async fn republish(&mut self, record: NodeRecord) -> Result<(), StoreError> {
        if record.name != self.record.name {
            return Err(super::RecordError {
                key: self.record.key().to_string(),
                problem: super::RecordProblem::KeyMismatch {
                    expected: record.key().to_string(),
                },
            }
            .into());
        }
        let value = encode(&record)?;
        let key = record.key().to_string();
        match self
            .store
            .backend()
            .put(&key, value, Some(self.lease))
            .await
        {
            Ok(()) => {}
            Err(StoreError::LeaseExpired { .. }) => {
                self.lease = Self::grant_and_put(&self.store, &record, self.ttl).await?;
            }
            Err(error) => return Err(error),
        }
        self.record = record;
        Ok(())
    }

    /// Renews every third of the TTL until `cancel` fires; on failure retries sooner, with
    /// bounded backoff, and keeps going. Cancelling leaves the lease to expire on its own (so a
    /// restarting agent's record does not flap); [`revoke`](Self::revoke) removes it at once.
    ///
    /// # Errors
    ///
    /// Only [`StoreError::Invalid`] (the record cannot be re-published); outages are retried.
    pub async fn run(&mut self, cancel: CancellationToken) -> Result<(), StoreError> {
        let period = self.ttl / 3;
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: period,
        };
        let mut failures = 0u32;
        loop {
            let wait = if failures == 0 {
                period
            } else {
                backoff.delay(failures)
            };
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            match self.renew().await {
                Ok(()) => {
                    if failures > 0 {
                        info!(node = %self.record.name, "node lease renewed again");
                    }
                    failures = 0;
                    debug!(node = %self.record.name, lease = %self.lease, "renewed node lease");
                }
                Err(StoreError::Invalid(error)) => return Err(StoreError::Invalid(error)),
                Err(error) => {
                    failures = failures.saturating_add(1);
                    warn!(node = %self.record.name, error = %error, failures, "renewing node lease failed");
                }
            }
        }
    }

    /// Ends the lease and deletes the record now.
    ///
    /// # Errors
    ///
    /// The backend's errors.
    pub async fn revoke(self) -> Result<(), StoreError> {
        let backend = self.store.backend();
        backend.revoke_lease(self.lease).await?;
        // etcd deleted it with the lease; the directory backend has no leases.
        backend.delete(&self.record.key().to_string()).await?;
        info!(node = %self.record.name, "revoked node lease");
        Ok(())
    }
}
