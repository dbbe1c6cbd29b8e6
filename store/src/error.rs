//! The store's errors: [`StoreError`] for operations, [`RecordError`] for a stored record that
//! fails validation.

use super::backend::LeaseId;

/// A boxed cause, for backends whose error types differ.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An operation on the store failed.
///
/// Failures of a backend are one variant, [`StoreError::Backend`], whichever backend it is: it
/// names the backend, the operation and what it was on, and says whether retrying may help.
/// Backend client types (etcd's, the file system's) only appear as its boxed `source`, so they
/// are not part of this crate's API. The other variants mean the same with every backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed an operation: unreachable or too slow (etcd down, request deadline),
    /// a file system error, a lock held too long, or a request the backend refused.
    #[error("{backend} store: {op}{} failed", on(subject))]
    Backend {
        /// The backend's name, as [`StoreBackend::name`](crate::StoreBackend::name):
        /// `"directory"`, `"etcd"`.
        backend: &'static str,
        /// The operation, e.g. `"get"`, `"compare-and-swap"`, `"rename"`, `"watch"`.
        op: &'static str,
        /// What the operation was on: a record key, a key prefix or a lease for etcd, a file or
        /// directory path for the directory backend. Empty when it was on nothing in particular.
        subject: String,
        /// Whether retrying later may succeed without anyone fixing anything (see
        /// [`StoreError::is_transient`]).
        transient: bool,
        /// The backend's own error.
        #[source]
        source: BoxError,
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
    /// A configuration value of a backend is unusable.
    #[error("invalid store configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// The etcd backend's TLS or authentication settings are unusable: a file missing or
    /// malformed, a key that does not match its certificate, or a combination that would leave
    /// etcd unverified or a password in clear.
    #[cfg(feature = "etcd")]
    #[error(transparent)]
    EtcdSecurity(#[from] crate::EtcdSecurityError),
}

impl StoreError {
    /// Whether retrying later may succeed without anyone fixing anything: a backend failure the
    /// backend marked transient (unreachable, deadline, I/O, lock contention) or lost
    /// compare-and-swap races.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Backend { transient, .. } => *transient,
            Self::Contended { .. } => true,
            Self::Invalid(_) | Self::LeaseExpired { .. } | Self::Config { .. } => false,
            #[cfg(feature = "etcd")]
            Self::EtcdSecurity(_) => false,
        }
    }
}

/// `" <subject>"`, or nothing for an empty subject: keeps the message free of double spaces.
fn on(subject: &str) -> String {
    if subject.is_empty() {
        String::new()
    } else {
        format!(" {subject}")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn backend_error(subject: &str, transient: bool) -> StoreError {
        StoreError::Backend {
            backend: "etcd",
            op: "connect",
            subject: subject.to_owned(),
            transient,
            source: "connection refused".into(),
        }
    }

    #[test]
    fn backend_errors_name_backend_operation_and_subject() {
        assert_eq!(
            backend_error("http://127.0.0.1:2379", true).to_string(),
            "etcd store: connect http://127.0.0.1:2379 failed"
        );
        assert_eq!(
            backend_error("", true).to_string(),
            "etcd store: connect failed"
        );
    }

    #[test]
    fn transient_is_what_the_backend_said_or_contention() {
        assert!(backend_error("x", true).is_transient());
        assert!(!backend_error("x", false).is_transient());
        let contended = StoreError::Contended {
            key: "rekey/cluster".to_owned(),
            attempts: 1000,
        };
        assert!(contended.is_transient());
        assert!(!StoreError::LeaseExpired { lease: LeaseId(1) }.is_transient());
        let config = StoreError::Config {
            reason: "no etcd endpoints".to_owned(),
        };
        assert!(!config.is_transient());
    }
}
