//! What can go wrong talking to the kernel, and about which operation.

use std::fmt;
use std::io;

use ipnet::IpNet;

use crate::link::LinkName;
use crate::routing::Rule;
use nodeseal_netlink::DecodeError;

/// Errors of [`Handle`](crate::Handle) requests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel has no WireGuard: the `wireguard` generic netlink family is not registered,
    /// or the `wireguard` link kind is unknown.
    #[error("the kernel has no WireGuard (modprobe wireguard)")]
    NoWireGuard,
    /// A link with the requested name exists but is not a WireGuard link; nodeseal does not
    /// touch it.
    #[error("link {name} exists but is of kind {}, not wireguard", .kind.as_deref().unwrap_or("(none)"))]
    WrongKind {
        /// The link's name.
        name: LinkName,
        /// Its `IFLA_INFO_KIND`.
        kind: Option<String>,
    },
    /// The kernel refused an operation.
    #[error("cannot {op}")]
    Kernel {
        /// What was attempted.
        op: Operation,
        /// What the kernel said.
        #[source]
        source: KernelError,
    },
    /// The netlink exchange itself failed.
    #[error("netlink transport failed during {op}")]
    Transport {
        /// What was attempted.
        op: Operation,
        /// What failed.
        #[source]
        source: TransportError,
    },
    /// The worker thread could not be started or has gone away.
    #[error("the WireGuard netlink worker thread is not running")]
    WorkerGone,
    /// BUG: the worker answered with the wrong kind of reply.
    #[error("BUG: the WireGuard netlink worker answered with the wrong kind of reply")]
    UnexpectedReply,
}

impl Error {
    /// The kernel's refusal, if that is what this is.
    #[must_use]
    pub const fn kernel_error(&self) -> Option<&KernelError> {
        match self {
            Self::Kernel { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Whether the kernel said the link or device does not exist (`ENODEV`/`ENOENT`).
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        self.kernel_error()
            .is_some_and(|k| k.errno == libc::ENODEV || k.errno == libc::ENOENT)
    }
}

/// The operation an [`Error`] is about, named the way `ip` / `wg` would do it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    /// Opening the netlink sockets.
    Open,
    /// Resolving the `wireguard` generic netlink family.
    ResolveFamily,
    /// Reading a link (`ip link show`).
    GetLink(LinkName),
    /// Creating the link (`ip link add`).
    CreateLink(LinkName),
    /// Setting MTU and up (`ip link set`).
    SetLink(LinkName),
    /// Deleting the link (`ip link del`).
    DeleteLink(LinkName),
    /// Adding an address (`ip address replace`).
    AddAddress(LinkName, IpNet),
    /// Removing an address (`ip address del`).
    DeleteAddress(LinkName, IpNet),
    /// Configuring the device (`wg set`); `part` of `parts` messages.
    ConfigureDevice {
        /// The link.
        name: LinkName,
        /// Which message failed, from 1.
        part: usize,
        /// How many messages the configuration took.
        parts: usize,
    },
    /// Reading the device (`wg show`).
    ReadDevice(LinkName),
    /// Adding or replacing a route into the link (`ip route replace`).
    ReplaceRoute {
        /// The table.
        table: u32,
        /// The destination.
        dst: IpNet,
        /// The link.
        name: LinkName,
    },
    /// Removing a route (`ip route del`).
    DeleteRoute {
        /// The table.
        table: u32,
        /// The destination.
        dst: IpNet,
    },
    /// Adding a policy rule (`ip rule add`).
    AddRule(Rule),
    /// Removing a policy rule (`ip rule del`).
    DeleteRule(Rule),
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open => f.write_str("open netlink sockets"),
            Self::ResolveFamily => f.write_str("resolve the wireguard generic netlink family"),
            Self::GetLink(n) => write!(f, "read link {n}"),
            Self::CreateLink(n) => write!(f, "create WireGuard link {n}"),
            Self::SetLink(n) => write!(f, "set MTU and up on link {n}"),
            Self::DeleteLink(n) => write!(f, "delete link {n}"),
            Self::AddAddress(n, a) => write!(f, "add address {a} to {n}"),
            Self::DeleteAddress(n, a) => write!(f, "remove address {a} from {n}"),
            Self::ConfigureDevice { name, part, parts } if *parts > 1 => {
                write!(
                    f,
                    "configure WireGuard device {name} (message {part} of {parts})"
                )
            }
            Self::ConfigureDevice { name, .. } => write!(f, "configure WireGuard device {name}"),
            Self::ReadDevice(n) => write!(f, "read WireGuard device {n}"),
            Self::ReplaceRoute { table, dst, name } => {
                write!(f, "route {dst} into {name} in table {table}")
            }
            Self::DeleteRoute { table, dst } => write!(f, "remove route {dst} from table {table}"),
            Self::AddRule(r) => write!(
                f,
                "add {:?} rule priority {} lookup {}",
                r.family, r.priority, r.table
            ),
            Self::DeleteRule(r) => write!(
                f,
                "remove {:?} rule priority {} lookup {}",
                r.family, r.priority, r.table
            ),
        }
    }
}

/// What the kernel said when it refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}", io::Error::from_raw_os_error(*.errno), .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct KernelError {
    /// The positive errno.
    pub errno: i32,
    /// The kernel's extended-ACK text, if any.
    pub message: Option<String>,
}

/// Failures of the netlink exchange itself, as opposed to a refused request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A socket call failed.
    #[error("netlink {call} failed")]
    Io {
        /// The call (`socket`, `bind`, `send`, `recv`, `setns`).
        call: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel sent something that does not decode.
    #[error("malformed netlink reply")]
    Decode(#[from] DecodeError),
    /// A dump stayed inconsistent (`NLM_F_DUMP_INTR`) after retries.
    #[error("dump kept being interrupted by concurrent changes")]
    DumpInterrupted,
}

impl From<nodeseal_netlink::Error> for TransportError {
    fn from(e: nodeseal_netlink::Error) -> Self {
        match e {
            nodeseal_netlink::Error::Io { call, source } => Self::Io { call, source },
            nodeseal_netlink::Error::Decode(source) => Self::Decode(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_operation_and_the_cause() {
        let name = LinkName::default();
        assert_eq!(
            Error::NoWireGuard.to_string(),
            "the kernel has no WireGuard (modprobe wireguard)"
        );
        let e = Error::WrongKind {
            name: name.clone(),
            kind: Some("veth".into()),
        };
        assert_eq!(
            e.to_string(),
            "link nodeseal0 exists but is of kind veth, not wireguard"
        );
        let e = Error::Kernel {
            op: Operation::ConfigureDevice {
                name,
                part: 2,
                parts: 3,
            },
            source: KernelError {
                errno: libc::EINVAL,
                message: Some("bad attribute".into()),
            },
        };
        assert_eq!(
            e.to_string(),
            "cannot configure WireGuard device nodeseal0 (message 2 of 3)"
        );
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(
            cause.contains("os error 22") && cause.ends_with(": bad attribute"),
            "{cause}"
        );
        assert!(!e.is_not_found());
    }
}
