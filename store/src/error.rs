//! The store's errors: [`StoreError`] for operations, [`RecordError`] for a stored record that
//! fails validation.

use std::path::PathBuf;
use std::time::Duration;

use super::backend::LeaseId;

/// A boxed cause, for backends whose error types differ.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An operation on the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or did not answer in time (etcd down, request timeout).
    /// Retrying later may succeed.
    #[error("store backend {backend} unavailable during {op}")]
    Unavailable {
        /// `"etcd"` or `"directory"`.
        backend: &'static str,
        /// The operation, e.g. `"get"`, `"watch"`.
        op: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// A file system operation of the directory backend failed.
    #[error("{op} {path} failed")]
    Io {
        /// What was being done, e.g. `"rename"`.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// etcd rejected a request (not a connectivity problem).
    #[error("etcd {op} failed")]
    Etcd {
        /// The operation, e.g. `"txn"`.
        op: &'static str,
        /// The cause.
        #[source]
        source: etcd_client::Error,
    },
    /// A stored record, or a record about to be stored, is invalid.
    #[error(transparent)]
    Invalid(#[from] RecordError),
    /// Another writer kept changing the record: compare-and-swap lost every attempt.
    #[error("compare-and-swap on {key} lost {attempts} attempts to concurrent writers")]
    Contended {
        /// The record's key.
        key: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// The lease is not known to the backend any more (expired, or revoked).
    #[error("lease {lease} expired or unknown")]
    LeaseExpired {
        /// The lease.
        lease: LeaseId,
    },
    /// The directory backend's lock file stayed locked by another writer.
    #[error("lock file {path} still locked after {waited:?}")]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// A configuration value of a backend is unusable.
    #[error("invalid store configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// BUG: a blocking file task of the directory backend panicked or was cancelled.
    #[error("BUG: directory store task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl StoreError {
    /// Whether retrying later may succeed without anyone fixing anything (backend
    /// unavailable, I/O failure, lock or compare-and-swap contention).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. }
                | Self::Io { .. }
                | Self::Contended { .. }
                | Self::LockTimeout { .. }
        )
    }
}

/// A record that failed validation: the key it is stored under and what is wrong with it.
///
/// Reading skips such records and reports them; they never stop a listing or a watch.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid record {key}: {problem}")]
pub struct RecordError {
    /// The key, as stored (it may itself be the problem).
    pub key: String,
    /// What is wrong.
    pub problem: RecordProblem,
}

/// What is wrong with a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordProblem {
    /// The key does not name a record kind and a valid id.
    #[error("bad key: {reason}")]
    BadKey {
        /// Why.
        reason: String,
    },
    /// The value is larger than [`MAX_RECORD_BYTES`](super::MAX_RECORD_BYTES).
    #[error("{len} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The value's length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The value is not the record's JSON shape (serde's message names the field and position).
    #[error("malformed JSON: {reason}")]
    Json {
        /// serde's message.
        reason: String,
    },
    /// A field parsed but breaks a rule.
    #[error("field {field}: {reason}")]
    Field {
        /// The field.
        field: &'static str,
        /// The rule it breaks.
        reason: String,
    },
    /// The record describes another key than the one it is stored under (e.g. the node record
    /// of `b` stored as `nodes/a`).
    #[error("record belongs under {expected}")]
    KeyMismatch {
        /// The key the record's content belongs under.
        expected: String,
    },
}
