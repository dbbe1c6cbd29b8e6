//! The one seam all XFRM traffic goes through: [`Kernel`], with the netlink backend
//! ([`crate::netlink::NetlinkKernel`]) and an in-memory fake ([`fake::FakeKernel`], behind the
//! `testing` feature) that reconcile and ownership tests run against.

#[cfg(any(test, feature = "testing"))]
pub mod fake;

use std::fmt;
use std::io;

use crate::policy::{KernelPolicy, PolicyId, PolicySpec};
use crate::state::{KernelState, StateId, StateSpec};
use nodeseal_netlink::DecodeError;

/// One request to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// `XFRM_MSG_NEWSA`.
    AddState(StateSpec),
    /// `XFRM_MSG_UPDSA`.
    UpdateState(StateSpec),
    /// `XFRM_MSG_DELSA`.
    DeleteState(StateId),
    /// `XFRM_MSG_GETSA`.
    GetState(StateId),
    /// `XFRM_MSG_GETSA` with `NLM_F_DUMP`.
    DumpStates,
    /// `XFRM_MSG_NEWPOLICY`.
    AddPolicy(PolicySpec),
    /// `XFRM_MSG_UPDPOLICY`.
    UpdatePolicy(PolicySpec),
    /// `XFRM_MSG_DELPOLICY`.
    DeletePolicy(PolicyId),
    /// `XFRM_MSG_GETPOLICY`.
    GetPolicy(PolicyId),
    /// `XFRM_MSG_GETPOLICY` with `NLM_F_DUMP`.
    DumpPolicies,
    /// `XFRM_MSG_NEWSPDINFO` with the IPv4 and IPv6 policy hash thresholds (local, remote bits).
    SetPolicyHashThresholds {
        /// IPv4 (lbits, rbits).
        v4: (u8, u8),
        /// IPv6 (lbits, rbits).
        v6: (u8, u8),
    },
}

impl Op {
    /// The object this request is about, for error messages.
    #[must_use]
    pub fn object(&self) -> ObjectRef {
        match self {
            Self::AddState(s) | Self::UpdateState(s) => ObjectRef::State(s.id()),
            Self::DeleteState(id) | Self::GetState(id) => ObjectRef::State(*id),
            Self::AddPolicy(p) | Self::UpdatePolicy(p) => ObjectRef::Policy(p.id()),
            Self::DeletePolicy(id) | Self::GetPolicy(id) => ObjectRef::Policy(*id),
            Self::DumpStates => ObjectRef::AllStates,
            Self::DumpPolicies => ObjectRef::AllPolicies,
            Self::SetPolicyHashThresholds { .. } => ObjectRef::PolicyDatabase,
        }
    }

    /// What the request does, as a verb for error messages.
    #[must_use]
    pub const fn verb(&self) -> &'static str {
        match self {
            Self::AddState(_) | Self::AddPolicy(_) => "add",
            Self::UpdateState(_) | Self::UpdatePolicy(_) | Self::SetPolicyHashThresholds { .. } => {
                "update"
            }
            Self::DeleteState(_) | Self::DeletePolicy(_) => "delete",
            Self::GetState(_) | Self::GetPolicy(_) => "get",
            Self::DumpStates | Self::DumpPolicies => "dump",
        }
    }
}

/// The object a request or error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ObjectRef {
    /// One state.
    State(StateId),
    /// One policy.
    Policy(PolicyId),
    /// The state table.
    AllStates,
    /// The policy table.
    AllPolicies,
    /// The policy database settings.
    PolicyDatabase,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::State(id) => id.fmt(f),
            Self::Policy(id) => id.fmt(f),
            Self::AllStates => f.write_str("all states"),
            Self::AllPolicies => f.write_str("all policies"),
            Self::PolicyDatabase => f.write_str("policy database"),
        }
    }
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// Acknowledged.
    Done,
    /// `GetState` result.
    State(Box<KernelState>),
    /// `GetPolicy` result.
    Policy(Box<KernelPolicy>),
    /// `DumpStates` result.
    States(Vec<KernelState>),
    /// `DumpPolicies` result.
    Policies(Vec<KernelPolicy>),
}

/// What the kernel said when it refused one request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} (errno {errno}{})", .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct KernelError {
    /// The positive errno.
    pub errno: i32,
    /// The kernel's extended-ACK text, if any (e.g. "Requested AEAD algorithm not found").
    pub message: Option<String>,
    /// The classified cause.
    pub kind: KernelErrorKind,
}

impl KernelError {
    /// Classifies an errno and extended-ACK text for a request about `op`.
    #[must_use]
    pub fn new(errno: i32, message: Option<String>, op: &Op) -> Self {
        let text = message.as_deref().unwrap_or_default();
        let family_esp = match op {
            Op::AddState(s) | Op::UpdateState(s) if s.dst.is_ipv6() => "esp6",
            _ => "esp4",
        };
        let alg_modules = match op {
            Op::AddState(s) | Op::UpdateState(s) => s.aead.algorithm().modules(),
            _ => &[],
        };
        let missing = |mods: &[&'static str]| {
            let mut m = vec![family_esp, "xfrm_user"];
            m.extend_from_slice(mods);
            m
        };
        let kind = match errno {
            libc::EEXIST => KernelErrorKind::Exists,
            libc::ENOSYS => KernelErrorKind::MissingSupport {
                modules: missing(alg_modules),
            },
            libc::ENOENT if text.contains("algorithm") => KernelErrorKind::MissingSupport {
                modules: missing(alg_modules),
            },
            libc::ENOENT | libc::ESRCH => KernelErrorKind::NotFound,
            libc::EPROTONOSUPPORT => KernelErrorKind::MissingSupport {
                modules: vec![family_esp, "xfrm_user"],
            },
            libc::EINVAL if text.contains("cryptographic") => KernelErrorKind::MissingSupport {
                modules: {
                    let mut m = missing(alg_modules);
                    m.extend_from_slice(&["drbg", "jitterentropy_rng (or module autoload)"]);
                    m
                },
            },
            libc::EPERM | libc::EACCES => KernelErrorKind::PermissionDenied,
            _ => KernelErrorKind::Other,
        };
        Self {
            errno,
            message,
            kind,
        }
    }
}

/// Classified kernel refusals.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelErrorKind {
    /// The object already exists (`EEXIST`).
    Exists,
    /// No such object (`ENOENT`/`ESRCH`).
    NotFound,
    /// The kernel lacks ESP or the AEAD transform; these modules (or built-ins) are needed.
    MissingSupport {
        /// Module names, e.g. `esp4`, `xfrm_user`, `gcm`.
        modules: Vec<&'static str>,
    },
    /// Not allowed (needs `CAP_NET_ADMIN` in the namespace).
    PermissionDenied,
    /// Anything else; see the errno.
    Other,
}

impl fmt::Display for KernelErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exists => f.write_str("already exists"),
            Self::NotFound => f.write_str("not found"),
            Self::MissingSupport { modules } => {
                write!(
                    f,
                    "kernel lacks IPsec support; needs modules {}",
                    modules.join(", ")
                )
            }
            Self::PermissionDenied => f.write_str("permission denied (needs CAP_NET_ADMIN)"),
            Self::Other => f.write_str("kernel error"),
        }
    }
}

/// Failures of the transport itself (socket, framing), as opposed to refusals of one request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A socket call failed.
    #[error("netlink {call} failed")]
    Io {
        /// The call (`socket`, `send`, `recv`, `setns`...).
        call: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel has no `NETLINK_XFRM` (module `xfrm_user` missing).
    #[error("the kernel has no NETLINK_XFRM; load module xfrm_user")]
    NoXfrmUser {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel sent something that does not decode.
    #[error("malformed netlink reply")]
    Decode {
        /// What was wrong.
        #[source]
        source: DecodeError,
    },
    /// A dump stayed inconsistent (`NLM_F_DUMP_INTR`) after retries.
    #[error("dump kept being interrupted by concurrent changes")]
    DumpInterrupted,
    /// No reply arrived for some requests.
    #[error("{missing} requests got no acknowledgement")]
    MissingAcks {
        /// How many.
        missing: usize,
    },
}

impl From<nodeseal_netlink::Error> for TransportError {
    fn from(e: nodeseal_netlink::Error) -> Self {
        match e {
            nodeseal_netlink::Error::Io { call, source } => Self::Io { call, source },
            nodeseal_netlink::Error::Decode(source) => Self::Decode { source },
        }
    }
}

/// The seam: executes a batch of requests in order, one result per request.
///
/// Implementations must process requests in order and keep going after a refused one (the
/// kernel does the same within one `sendmsg`).
pub trait Kernel: Send + 'static {
    /// Runs `ops` and returns one result per op, in order.
    ///
    /// # Errors
    /// [`TransportError`] if the exchange itself failed; refusals of individual requests are the
    /// inner `Err`s.
    fn submit(&mut self, ops: &[Op]) -> Result<Vec<Result<Reply, KernelError>>, TransportError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::{Mark, Selector};
    use crate::state::{Aead, AeadAlgorithm, ReqId, Spi};

    #[test]
    fn errors_name_missing_modules() {
        let spec = StateSpec::new(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            Spi::new(300).unwrap(),
            ReqId::new(1).unwrap(),
            Aead::new(AeadAlgorithm::AesGcm128, &[1; 20]).unwrap(),
            Some(
                Selector::new("fd10::/64".parse().unwrap(), "fd11::/64".parse().unwrap()).unwrap(),
            ),
        )
        .unwrap();
        let op = Op::AddState(spec);
        let e = KernelError::new(
            libc::ENOSYS,
            Some("Requested AEAD algorithm not found".into()),
            &op,
        );
        let KernelErrorKind::MissingSupport { modules } = &e.kind else {
            panic!("{e:?}")
        };
        assert!(
            modules.contains(&"esp6") && modules.contains(&"gcm"),
            "{modules:?}"
        );
        assert!(e.to_string().contains("Requested AEAD algorithm not found"));
        let e = KernelError::new(libc::EPROTONOSUPPORT, None, &op);
        assert_eq!(
            e.kind,
            KernelErrorKind::MissingSupport {
                modules: vec!["esp6", "xfrm_user"]
            }
        );
        let del = Op::DeleteState(StateId {
            dst: "1.1.1.1".parse().unwrap(),
            spi: Spi::new(300).unwrap(),
            mark: Mark::NONE,
        });
        assert_eq!(
            KernelError::new(libc::ESRCH, None, &del).kind,
            KernelErrorKind::NotFound
        );
        assert_eq!(
            KernelError::new(libc::EEXIST, None, &del).kind,
            KernelErrorKind::Exists
        );
        assert_eq!(del.object().to_string(), "state dst 1.1.1.1 spi 0x0000012c");
    }
}
