//! Routes into the WireGuard link and the policy rule that consults them.
//!
//! nodeseal keeps its routes in a table of its own, so that it never edits the main table the
//! node's network set-up owns, and so that taking a peer's routes away (it has no keys) lets
//! its traffic fall through to whatever the main table says. One rule per address family sends
//! lookups to that table before the main one.

use ipnet::IpNet;

/// An address family of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `net`.
    #[must_use]
    pub const fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Self::V4,
            IpNet::V6(_) => Self::V6,
        }
    }
}

/// `ip rule add priority PRIORITY [fwmark M/M] [ipproto P sport|dport N] lookup TABLE` for one
/// family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    /// The address family.
    pub family: Family,
    /// The rule's priority (lower is consulted first; the main table's rule is 32766).
    pub priority: u32,
    /// The routing table it looks up.
    pub table: u32,
    /// Only for packets whose mark, under the mask, is the value (`fwmark V/M`).
    pub fwmark: Option<FwMark>,
    /// Only for packets of one protocol and port.
    pub port: Option<RulePort>,
}

impl Rule {
    /// The rule for every packet of `family`: `ip rule add priority P lookup T`.
    #[must_use]
    pub const fn all(family: Family, priority: u32, table: u32) -> Self {
        Self {
            family,
            priority,
            table,
            fwmark: None,
            port: None,
        }
    }
}

/// `fwmark VALUE/MASK` of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FwMark {
    /// What the masked mark must be.
    pub value: u32,
    /// The bits compared.
    pub mask: u32,
}

/// Which port of a packet a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSide {
    /// `sport N`.
    Source,
    /// `dport N`.
    Destination,
}

/// `ipproto P sport|dport N` of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RulePort {
    /// The IP protocol (6 TCP, 17 UDP).
    pub protocol: u8,
    /// Source or destination.
    pub side: PortSide,
    /// The port.
    pub port: u16,
}
