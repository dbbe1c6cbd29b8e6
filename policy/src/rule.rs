//! The one internal model every supported policy API is translated into, and what a rule
//! matches.
//!
//! A [`Rule`] says: for endpoints its `subject` selects, traffic in `direction` with a peer in
//! `peers` and traffic in `ports` is allowed (or denied). Namespace scoping is already applied
//! (see [`crate::document`]), so a rule means the same whatever API it came from.
//!
//! Conventions of the model:
//! - `peers` empty: the rule matches no peer. It still puts its subjects' direction into
//!   default deny (Cilium's `ingress: [{}]`, Kubernetes' `policyTypes` without rules).
//! - "any peer" is [`Peer::Entity`]`(`[`Entity::All`]`)`: Kubernetes' empty `from`, Cilium's
//!   L4-only rule (`toPorts` without `from*`).
//! - `ports` empty: all traffic, every protocol (ICMP too).
//! - Endpoint selectors match workloads only, never reserved identities; CIDR peers match CIDR
//!   identities only (as in Cilium), never workloads or the `world` identity itself.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use nodeseal_bpf_common::maps::PolicyKey;

use crate::{labels::Labels, selector::Selector};

/// IP protocol numbers the model knows.
pub mod protocol_number {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// SCTP.
    pub const SCTP: u8 = 132;
}

/// A policy as parsed from one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `metadata.name`.
    pub name: String,
    /// The namespace of a namespaced kind (`default` when the document names none).
    pub namespace: Option<String>,
    /// The document's kind.
    pub kind: PolicyKind,
    /// The rules, in document order.
    pub rules: Vec<Rule>,
}

/// The kinds of policy documents accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum PolicyKind {
    /// `cilium.io/v2` `CiliumNetworkPolicy` (namespaced).
    CiliumNetworkPolicy,
    /// `cilium.io/v2` `CiliumClusterwideNetworkPolicy`.
    CiliumClusterwideNetworkPolicy,
    /// `nodeseal.io/v1alpha1` `NodesealNetworkPolicy`: a CiliumNetworkPolicy spec in
    /// nodeseal's API group (namespaced).
    NodesealNetworkPolicy,
    /// `nodeseal.io/v1alpha1` `NodesealClusterwideNetworkPolicy`.
    NodesealClusterwideNetworkPolicy,
    /// `networking.k8s.io/v1` `NetworkPolicy` (namespaced).
    NetworkPolicy,
}

impl PolicyKind {
    /// The kind as written in documents.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Self::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            Self::NodesealNetworkPolicy => "NodesealNetworkPolicy",
            Self::NodesealClusterwideNetworkPolicy => "NodesealClusterwideNetworkPolicy",
            Self::NetworkPolicy => "NetworkPolicy",
        }
    }

    /// Whether objects of this kind live in a namespace.
    #[must_use]
    pub fn is_namespaced(self) -> bool {
        matches!(
            self,
            Self::CiliumNetworkPolicy | Self::NodesealNetworkPolicy | Self::NetworkPolicy
        )
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule of a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The endpoints the rule applies to.
    pub subject: Selector,
    /// Traffic toward (ingress) or from (egress) the subject.
    pub direction: Direction,
    /// Allow or deny.
    pub action: Action,
    /// The other side; empty matches nothing.
    pub peers: Vec<Peer>,
    /// The traffic; empty means all traffic.
    pub ports: Vec<PortSpec>,
    /// Where the rule was written, e.g. `spec.ingress[0]`.
    pub origin: String,
}

impl Rule {
    /// Whether the rule matches `peer`.
    #[must_use]
    pub fn matches_peer(&self, peer: &PeerIdentity<'_>) -> bool {
        self.peers.iter().any(|p| p.matches(peer))
    }

    /// Whether the rule matches traffic of `protocol` to `port` (0 for none).
    #[must_use]
    pub fn matches_traffic(&self, protocol: u8, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|p| p.matches(protocol, port))
    }
}

/// Direction of traffic, seen from the subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Toward the subject.
    Ingress,
    /// From the subject.
    Egress,
}

impl Direction {
    /// The value of [`PolicyKey::direction`].
    #[must_use]
    pub fn key_value(self) -> u8 {
        match self {
            Self::Ingress => PolicyKey::INGRESS,
            Self::Egress => PolicyKey::EGRESS,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// What a rule does with the traffic it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Allowed unless a deny rule matches too.
    Allow,
    /// Denied, whatever allows it.
    Deny,
}

/// The other side of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Peer {
    /// Workloads whose labels the selector matches.
    Endpoints(Selector),
    /// A group of identities.
    Entity(Entity),
    /// Addresses inside `cidr` but outside every `except`.
    Cidr {
        /// The prefix (host bits cleared).
        cidr: IpNet,
        /// Prefixes inside `cidr` that are left out.
        except: Vec<IpNet>,
    },
}

impl Peer {
    /// Whether this peer includes `identity`.
    #[must_use]
    pub fn matches(&self, identity: &PeerIdentity<'_>) -> bool {
        match (self, identity) {
            (Self::Entity(entity), _) => entity.matches(identity),
            (Self::Endpoints(selector), PeerIdentity::Workload(labels)) => selector.matches(labels),
            (Self::Cidr { cidr, except }, PeerIdentity::Cidr(prefix)) => {
                cidr.contains(prefix) && !except.iter().any(|e| e.contains(prefix))
            }
            _ => false,
        }
    }
}

/// Cilium's entities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Entity {
    /// Every workload, the host and remote nodes.
    Cluster,
    /// The local host.
    Host,
    /// Other cluster nodes.
    RemoteNode,
    /// Everything outside the cluster: the `world` identity and every CIDR identity.
    World,
    /// Every identity, including ones allocated after the policy was compiled.
    All,
}

impl Entity {
    /// Parses an entity name as written in `fromEntities`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "cluster" => Self::Cluster,
            "host" => Self::Host,
            "remote-node" => Self::RemoteNode,
            "world" => Self::World,
            "all" => Self::All,
            _ => return None,
        })
    }

    /// Whether the entity includes `identity`.
    #[must_use]
    pub fn matches(self, identity: &PeerIdentity<'_>) -> bool {
        use PeerIdentity as P;
        match self {
            Self::All => true,
            Self::Cluster => {
                matches!(
                    identity,
                    P::Workload(_) | P::Host | P::RemoteNode | P::Unmanaged
                )
            }
            Self::Host => matches!(identity, P::Host),
            Self::RemoteNode => matches!(identity, P::RemoteNode),
            Self::World => matches!(identity, P::World | P::Cidr(_)),
        }
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cluster => "cluster",
            Self::Host => "host",
            Self::RemoteNode => "remote-node",
            Self::World => "world",
            Self::All => "all",
        })
    }
}

/// What a peer identity is, as far as rules can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerIdentity<'a> {
    /// A workload with these labels.
    Workload(&'a Labels),
    /// The local host.
    Host,
    /// Another node.
    RemoteNode,
    /// A pod of the cluster that no endpoint describes (the pod CIDRs' fallback identity): in
    /// the cluster, but no selector can name it.
    Unmanaged,
    /// An address outside the cluster that no CIDR identity covers.
    World,
    /// The identity of an address prefix (an address is its host prefix).
    Cidr(IpNet),
    /// An identity the rules know nothing about; only `all` matches it.
    Unknown,
}

impl PeerIdentity<'_> {
    /// The identity of one address outside the cluster.
    #[must_use]
    pub fn address(address: IpAddr) -> Self {
        Self::Cidr(IpNet::from(address))
    }
}

/// Traffic of a protocol, to all ports or a port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    /// The protocol.
    pub protocol: Protocol,
    /// `None`: every port (also packets without ports, such as non-first fragments).
    pub ports: Option<PortRange>,
}

impl PortSpec {
    /// Traffic of `protocol` to `ports`. A range of every port 1–65535 means the whole
    /// protocol, so it compiles to one entry instead of 65,535.
    #[must_use]
    pub fn new(protocol: Protocol, ports: Option<PortRange>) -> Self {
        let ports = ports.filter(|r| (r.first, r.last) != (1, u16::MAX));
        Self { protocol, ports }
    }

    /// Whether it matches traffic of `protocol` to `port`.
    #[must_use]
    pub fn matches(&self, protocol: u8, port: u16) -> bool {
        self.protocol.numbers().contains(&protocol) && self.ports.is_none_or(|r| r.contains(port))
    }
}

/// The protocols a port rule can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// TCP, UDP and SCTP (Cilium's `ANY`).
    Any,
}

impl Protocol {
    /// The IP protocol numbers it stands for.
    #[must_use]
    pub fn numbers(self) -> &'static [u8] {
        use protocol_number::{SCTP, TCP, UDP};
        match self {
            Self::Tcp => &[TCP],
            Self::Udp => &[UDP],
            Self::Sctp => &[SCTP],
            Self::Any => &[TCP, UDP, SCTP],
        }
    }
}

/// A non-empty range of destination ports, `first..=last`, never including 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// `first..=last`; `None` when `first` is 0 or `last < first`.
    #[must_use]
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first != 0 && first <= last).then_some(Self { first, last })
    }

    /// The first port.
    #[must_use]
    pub fn first(self) -> u16 {
        self.first
    }

    /// The last port.
    #[must_use]
    pub fn last(self) -> u16 {
        self.last
    }

    /// Whether `port` is in the range.
    #[must_use]
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities() {
        let labels = Labels::new();
        let prefix: IpNet = "10.0.0.0/8".parse().unwrap();
        let all = [
            PeerIdentity::Workload(&labels),
            PeerIdentity::Host,
            PeerIdentity::RemoteNode,
            PeerIdentity::World,
            PeerIdentity::Cidr(prefix),
            PeerIdentity::Unknown,
            PeerIdentity::Unmanaged,
        ];
        let matched =
            |entity: Entity| -> Vec<bool> { all.iter().map(|p| entity.matches(p)).collect() };
        assert_eq!(matched(Entity::All), [true; 7]);
        assert_eq!(
            matched(Entity::Cluster),
            [true, true, true, false, false, false, true]
        );
        assert_eq!(
            matched(Entity::World),
            [false, false, false, true, true, false, false]
        );
        assert_eq!(
            matched(Entity::Host),
            [false, true, false, false, false, false, false]
        );
        assert_eq!(
            matched(Entity::RemoteNode),
            [false, false, true, false, false, false, false]
        );
    }

    #[test]
    fn cidr_peer_with_except() {
        let peer = Peer::Cidr {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec!["10.1.0.0/16".parse().unwrap()],
        };
        let cidr = |s: &str| PeerIdentity::Cidr(s.parse().unwrap());
        assert!(peer.matches(&cidr("10.0.0.0/8")));
        assert!(peer.matches(&cidr("10.2.0.0/16")));
        assert!(!peer.matches(&cidr("10.1.0.0/16")));
        assert!(!peer.matches(&cidr("10.1.2.0/24")));
        assert!(!peer.matches(&cidr("0.0.0.0/0")));
        assert!(peer.matches(&PeerIdentity::address("10.3.0.1".parse().unwrap())));
        assert!(!peer.matches(&PeerIdentity::World));
        assert!(!peer.matches(&PeerIdentity::Workload(&Labels::new())));
    }

    #[test]
    fn ports() {
        let spec = PortSpec::new(Protocol::Any, PortRange::new(80, 81));
        assert!(spec.matches(6, 80) && spec.matches(17, 81) && spec.matches(132, 80));
        assert!(!spec.matches(6, 82) && !spec.matches(1, 80) && !spec.matches(6, 0));
        let whole = PortSpec::new(Protocol::Tcp, PortRange::new(1, 65535));
        assert_eq!(whole.ports, None);
        assert!(whole.matches(6, 0));
        assert_eq!(PortRange::new(0, 5), None);
        assert_eq!(PortRange::new(6, 5), None);
    }
}
