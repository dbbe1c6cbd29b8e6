//! The backend trait: bytes under text keys, compare-and-swap, leases and a resuming watch.
//! [`Store`](super::Store) adds the typed records on top.

use std::fmt;
use std::time::Duration;

use futures::stream::BoxStream;

use super::error::{RecordError, StoreError};
use super::record::Kind;

/// A backend lease: records put with it disappear when it is not renewed within its TTL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A change seen by a backend watch, before decoding. Keys are text (`<kind>/<id>`) because a
/// stored key may itself be invalid; [`Store::watch`](super::Store::watch) parses them.
#[derive(Debug)]
#[non_exhaustive]
pub enum RawEvent {
    /// Every record. `resync` is false for the first one of a watch, true after an
    /// interruption.
    Snapshot {
        /// Keys and values.
        entries: Vec<(String, Vec<u8>)>,
        /// Whether this replaces an earlier view after an interruption.
        resync: bool,
    },
    /// A record was created or changed.
    Put(String, Vec<u8>),
    /// A record was deleted (or its lease expired).
    Delete(String),
    /// The watch lost the backend; it retries with backoff and then sends a resync snapshot.
    Interrupted(StoreError),
    /// A record the backend assembles from several sources cannot be formed (the Kubernetes
    /// backend's node record when the Node object lacks an InternalIP). Its key is to be
    /// treated as absent. After a snapshot, one such event follows per unusable record.
    Unusable(RecordError),
}

/// A place to keep cluster state: the directory backend ([`DirStore`](super::DirStore)) and the
/// etcd backend ([`EtcdStore`](super::EtcdStore)) implement it. Keys are `<kind>/<id>` text;
/// values are opaque bytes.
#[async_trait::async_trait]
pub trait StoreBackend: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and errors: `"directory"`, `"etcd"`.
    fn name(&self) -> &'static str;

    /// Reads one value.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`], or [`StoreError::Invalid`] for a key the backend cannot store.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Reads every value whose key starts with `<prefix>/`.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Writes a value, attached to `lease` if given (backends without leases ignore it).
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get); [`StoreError::LeaseExpired`] if the lease is gone.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError>;

    /// Deletes a value; returns whether it existed.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// Writes `new` only if the current value is `expected` (`None`: absent). Returns whether
    /// it wrote.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError>;

    /// Creates a lease with this TTL.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease once.
    ///
    /// # Errors
    ///
    /// [`StoreError::LeaseExpired`] if the backend no longer knows it; otherwise as
    /// [`get`](Self::get).
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends a lease now, deleting its records.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Watches the keys of these kinds: a first snapshot, then changes. When the backend is lost it sends one
    /// [`RawEvent::Interrupted`], retries with bounded backoff, and sends a resync snapshot
    /// when it is back. The stream never ends by itself; drop it to stop.
    fn watch(&self, kinds: &[Kind]) -> BoxStream<'static, RawEvent>;
}

/// Exponential backoff with jitter, for reconnecting watches and lease renewals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 or more): doubling from `initial` up
    /// to `max`, then scaled by a random factor in [0.5, 1.0] so that many agents losing the
    /// same etcd do not come back in lockstep.
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(16);
        let base = self
            .initial
            .saturating_mul(1 << exponent)
            .min(self.max)
            .max(Duration::from_millis(1));
        base.mul_f64(rand::random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let first = backoff.delay(1);
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for failures in [5, 10, 40, u32::MAX] {
            let delay = backoff.delay(failures);
            assert!(delay <= Duration::from_secs(2), "{failures}: {delay:?}");
            assert!(delay >= Duration::from_millis(50), "{failures}: {delay:?}");
        }
    }
}
