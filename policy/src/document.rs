//! Policy documents (YAML streams or JSON) parsed into [`Policy`] values.
//!
//! Accepted kinds: `cilium.io/v2` `CiliumNetworkPolicy` (with `spec` and/or `specs`) and
//! `CiliumClusterwideNetworkPolicy`, the same spec as `nodeseal.io/v1alpha1`
//! `NodesealNetworkPolicy` / `NodesealClusterwideNetworkPolicy`, and `networking.k8s.io/v1`
//! `NetworkPolicy`. Only the L3/L4 subset nodeseal enforces is accepted; every other field,
//! known or not, is refused with the document and the field's path, so that no rule is ever
//! silently weaker or stronger than it reads. `metadata` fields other than `name` and
//! `namespace` and a top-level `status` are accepted and ignored: they are object bookkeeping,
//! not policy.
//!
//! Semantics chosen where the APIs leave room (each follows the API's own documentation):
//! - Namespaced kinds without `metadata.namespace` are in `default` (as `kubectl apply`).
//!   Cluster-wide kinds must not name one.
//! - Cilium: the subject is `endpointSelector`, restricted to the policy's namespace for the
//!   namespaced kinds; `{}` selects every endpoint (of the namespace). In a namespaced policy,
//!   `fromEndpoints`/`toEndpoints` selectors are restricted to the policy's namespace unless
//!   they name `io.kubernetes.pod.namespace` themselves. A rule with `toPorts` but no peer
//!   applies to every peer; a rule with neither (`ingress: [{}]`) matches nothing but still
//!   puts the direction into default deny, as does a present but empty section
//!   (`ingress: []`). Several peer kinds in one rule (`fromEndpoints` and `fromCIDR`) are a
//!   union. `protocol` defaults to `ANY` (TCP, UDP and SCTP); `port` may be a number or a
//!   numeric string and may be left out (every port of the protocol).
//! - NetworkPolicy: `policyTypes` defaults to `Ingress`, plus `Egress` when `egress` is
//!   present; a direction in `policyTypes` without rules denies everything; rules for a
//!   direction missing from an explicit `policyTypes` are refused (Kubernetes would ignore
//!   them). An empty or missing `from`/`to` means every peer, empty or missing `ports` every
//!   port. `podSelector` alone selects pods of the policy's namespace; `namespaceSelector`
//!   matches the namespace labels Cilium copies onto pods (`io.cilium.k8s.namespace.labels.*`);
//!   both together must both match. `protocol` defaults to TCP; ports must be numbers.
//! - CIDRs with host bits set are truncated to their prefix (`10.0.0.1/8` is `10.0.0.0/8`);
//!   Cilium CIDR fields also take a bare address (a host prefix). An `except` must lie inside
//!   its `cidr`.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Map, Value};
use thiserror::Error;

use crate::{
    labels::NAMESPACE_KEY,
    rule::{
        Action, Direction, Entity, Peer, Policy, PolicyKind, PortRange, PortSpec, Protocol, Rule,
    },
    selector::{RawExpression, Selector, SelectorProblem},
};

/// Largest input [`parse`] reads, checked before parsing.
pub const MAX_INPUT_BYTES: usize = 1 << 20;

/// The namespace of a namespaced policy that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Parses every policy in `input`: a YAML stream (documents separated by `---`; empty
/// documents are skipped), or JSON (one object, or an array of objects).
///
/// # Errors
///
/// [`DocumentError`]: input over [`MAX_INPUT_BYTES`] or not UTF-8, a syntax error, or the
/// first document that is not a supported policy, with the field's path.
pub fn parse(input: &[u8]) -> Result<Vec<Policy>, DocumentError> {
    if input.len() > MAX_INPUT_BYTES {
        return Err(DocumentError::TooLarge {
            size: input.len(),
            limit: MAX_INPUT_BYTES,
        });
    }
    let text = std::str::from_utf8(input).map_err(|source| DocumentError::NotUtf8 { source })?;
    let documents = if text.trim_start().starts_with(['{', '[']) {
        match serde_json::from_str(text).map_err(|source| DocumentError::Json { source })? {
            Value::Array(items) => items,
            value => vec![value],
        }
    } else {
        let mut documents = Vec::new();
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(document).map_err(|source| DocumentError::Yaml {
                index: index + 1,
                source,
            })?;
            documents.push(value);
        }
        documents
    };
    let mut policies = Vec::new();
    for (index, value) in documents.iter().enumerate() {
        if !value.is_null() {
            policies.push(parse_document(value, index + 1)?);
        }
    }
    Ok(policies)
}

/// Why documents were refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// The input is larger than [`MAX_INPUT_BYTES`].
    #[error("input is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The input is not UTF-8.
    #[error("input is not UTF-8")]
    NotUtf8 {
        /// Where it is not.
        #[source]
        source: std::str::Utf8Error,
    },
    /// A YAML document does not parse.
    #[error("document {index}: invalid YAML")]
    Yaml {
        /// 1-based position in the stream.
        index: usize,
        /// The parser's error.
        #[source]
        source: serde_yaml::Error,
    },
    /// The JSON input does not parse.
    #[error("invalid JSON")]
    Json {
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A document is not a supported policy.
    #[error("{document}: {path}: {problem}")]
    Invalid {
        /// Which document.
        document: DocumentName,
        /// The field, e.g. `spec.ingress[0].toPorts[0].rules`.
        path: String,
        /// What is wrong with it.
        problem: Problem,
    },
}

/// A document in an error: its `metadata.name` once known, else its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentName {
    /// 1-based position in the input.
    Position(usize),
    /// `metadata.name`.
    Named(String),
}

impl fmt::Display for DocumentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Position(index) => write!(f, "document {index}"),
            Self::Named(name) => write!(f, "policy {name:?}"),
        }
    }
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Problem {
    /// A required field is absent.
    #[error("missing")]
    Missing,
    /// A field nodeseal does not know.
    #[error("unknown field")]
    UnknownField,
    /// A field outside the supported subset.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The value has the wrong type.
    #[error("expected {0}")]
    WrongType(&'static str),
    /// `apiVersion` and `kind` name no supported kind.
    #[error("unsupported kind {kind:?} of apiVersion {api_version:?}")]
    UnsupportedKind {
        /// `apiVersion`.
        api_version: String,
        /// `kind`.
        kind: String,
    },
    /// `metadata.namespace` on a cluster-wide kind.
    #[error("a cluster-wide policy has no namespace")]
    NamespaceOnClusterwide,
    /// A port outside 1–65535.
    #[error("port {0} is not between 1 and 65535")]
    PortOutOfRange(String),
    /// A named port.
    #[error("named ports are not supported ({0:?})")]
    NamedPort(String),
    /// `endPort` below `port`.
    #[error("endPort {end_port} is below port {port}")]
    EndPortBeforePort {
        /// `port`.
        port: u16,
        /// `endPort`.
        end_port: u16,
    },
    /// `endPort` without `port`.
    #[error("endPort needs a port")]
    EndPortWithoutPort,
    /// Not a CIDR.
    #[error("{0:?} is not a CIDR")]
    BadCidr(String),
    /// An `except` not inside its `cidr`.
    #[error("{except} is not inside {cidr}")]
    ExceptOutsideCidr {
        /// The except prefix.
        except: IpNet,
        /// The cidr.
        cidr: IpNet,
    },
    /// Not one of `cluster`, `host`, `remote-node`, `world`, `all`.
    #[error("unknown entity {0:?} (supported: cluster, host, remote-node, world, all)")]
    UnknownEntity(String),
    /// Not a supported protocol.
    #[error("unknown protocol {0:?} (supported: {1})")]
    UnknownProtocol(String, &'static str),
    /// Not `Ingress` or `Egress`.
    #[error("unknown policy type {0:?} (expected Ingress or Egress)")]
    UnknownPolicyType(String),
    /// NetworkPolicy rules for a direction its `policyTypes` leaves out.
    #[error("rules for a direction missing from policyTypes")]
    RulesWithoutPolicyType,
    /// A NetworkPolicy peer with no selector and no ipBlock.
    #[error("a peer needs podSelector, namespaceSelector or ipBlock")]
    EmptyPeer,
    /// A NetworkPolicy peer with ipBlock and a selector.
    #[error("ipBlock cannot be combined with podSelector or namespaceSelector")]
    IpBlockWithSelector,
    /// An empty list where entries are required.
    #[error("must not be empty")]
    Empty,
    /// A bad label selector.
    #[error(transparent)]
    Selector(SelectorProblem),
}

/// A problem at a field path; turned into [`DocumentError::Invalid`] once the document's name
/// is known.
type Located<T> = Result<T, (String, Problem)>;

fn parse_document(value: &Value, position: usize) -> Result<Policy, DocumentError> {
    let mut document = DocumentName::Position(position);
    let invalid =
        |document: &DocumentName, (path, problem): (String, Problem)| DocumentError::Invalid {
            document: document.clone(),
            path,
            problem,
        };
    let mut top = Node::root(value)
        .object()
        .map_err(|e| invalid(&document, e))?;
    let header = parse_header(&mut top).map_err(|e| invalid(&document, e))?;
    document = DocumentName::Named(header.name.clone());
    let rules = parse_body(&mut top, header.kind, header.namespace.as_deref())
        .and_then(|rules| top.finish().map(|()| rules))
        .map_err(|e| invalid(&document, e))?;
    Ok(Policy {
        name: header.name,
        namespace: header.namespace,
        kind: header.kind,
        rules,
    })
}

struct Header {
    kind: PolicyKind,
    name: String,
    namespace: Option<String>,
}

fn parse_header(top: &mut Fields<'_>) -> Located<Header> {
    let api_version_node = top.required("apiVersion")?;
    let api_version = api_version_node.string()?;
    let kind_node = top.required("kind")?;
    let kind_name = kind_node.string()?;
    let kind = match (api_version, kind_name) {
        ("cilium.io/v2", "CiliumNetworkPolicy") => PolicyKind::CiliumNetworkPolicy,
        ("cilium.io/v2", "CiliumClusterwideNetworkPolicy") => {
            PolicyKind::CiliumClusterwideNetworkPolicy
        }
        ("nodeseal.io/v1alpha1", "NodesealNetworkPolicy") => PolicyKind::NodesealNetworkPolicy,
        ("nodeseal.io/v1alpha1", "NodesealClusterwideNetworkPolicy") => {
            PolicyKind::NodesealClusterwideNetworkPolicy
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => PolicyKind::NetworkPolicy,
        _ => {
            return kind_node.fail(Problem::UnsupportedKind {
                api_version: api_version.to_owned(),
                kind: kind_name.to_owned(),
            });
        }
    };
    // Other metadata (labels, annotations, uid, …) is object bookkeeping, not policy.
    let mut metadata = top.required("metadata")?.object()?;
    let name_node = metadata.required("name")?;
    let name = name_node.string()?;
    if name.is_empty() {
        return name_node.fail(Problem::Missing);
    }
    let namespace = match metadata.take("namespace") {
        Some(node) if !kind.is_namespaced() => return node.fail(Problem::NamespaceOnClusterwide),
        Some(node) => Some(node.string()?.to_owned()),
        None => None,
    };
    let namespace = kind
        .is_namespaced()
        .then(|| namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()));
    // Written by the cluster about the object, not part of the policy.
    top.take("status");
    Ok(Header {
        kind,
        name: name.to_owned(),
        namespace,
    })
}

fn parse_body(
    top: &mut Fields<'_>,
    kind: PolicyKind,
    namespace: Option<&str>,
) -> Located<Vec<Rule>> {
    let mut rules = Vec::new();
    if kind == PolicyKind::NetworkPolicy {
        let namespace = namespace.unwrap_or(DEFAULT_NAMESPACE);
        network_policy_spec(&top.required("spec")?, namespace, &mut rules)?;
        return Ok(rules);
    }
    let spec = top.take("spec");
    let specs = top.take("specs");
    if spec.is_none() && specs.is_none() {
        return top.missing("spec");
    }
    if let Some(spec) = spec {
        cilium_spec(&spec, namespace, &mut rules)?;
    }
    if let Some(specs) = specs {
        for spec in specs.list()? {
            cilium_spec(&spec, namespace, &mut rules)?;
        }
    }
    Ok(rules)
}

/// Fields of a Cilium rule section that nodeseal refuses, with the reason given.
const CILIUM_UNSUPPORTED: &[(&str, &str)] = &[
    ("fromRequires", "fromRequires is not supported"),
    ("toRequires", "toRequires is not supported"),
    ("toFQDNs", "toFQDNs (DNS-based rules) is not supported"),
    ("toServices", "toServices is not supported"),
    ("fromGroups", "fromGroups is not supported"),
    ("toGroups", "toGroups is not supported"),
    ("fromNodes", "fromNodes is not supported"),
    ("toNodes", "toNodes is not supported"),
    ("icmps", "ICMP rules are not supported"),
    ("authentication", "authentication is not supported"),
];

fn cilium_spec(node: &Node<'_>, namespace: Option<&str>, rules: &mut Vec<Rule>) -> Located<()> {
    let mut spec = node.object()?;
    spec.refuse(
        "nodeSelector",
        "host policies (nodeSelector) are not supported",
    )?;
    spec.refuse("enableDefaultDeny", "enableDefaultDeny is not supported")?;
    spec.refuse("labels", "rule labels are not supported")?;
    // Documentation only.
    spec.take("description");
    let selector = label_selector(&spec.required("endpointSelector")?)?;
    let subject = match namespace {
        Some(namespace) => selector.in_namespace(namespace),
        None => selector,
    };
    for (section, direction, action) in [
        ("ingress", Direction::Ingress, Action::Allow),
        ("ingressDeny", Direction::Ingress, Action::Deny),
        ("egress", Direction::Egress, Action::Allow),
        ("egressDeny", Direction::Egress, Action::Deny),
    ] {
        let Some(section) = spec.take(section) else {
            continue;
        };
        let items = section.list()?;
        if items.is_empty() {
            rules.push(enforce_only(&subject, direction, action, &section.path));
        }
        for item in items {
            let (peers, ports) = cilium_rule(&item, direction, namespace)?;
            rules.push(Rule {
                subject: subject.clone(),
                direction,
                action,
                peers,
                ports,
                origin: item.path.clone(),
            });
        }
    }
    spec.finish()
}

/// A rule that matches nothing but puts `direction` into default deny.
fn enforce_only(subject: &Selector, direction: Direction, action: Action, origin: &str) -> Rule {
    Rule {
        subject: subject.clone(),
        direction,
        action,
        peers: Vec::new(),
        ports: Vec::new(),
        origin: origin.to_owned(),
    }
}

fn cilium_rule(
    node: &Node<'_>,
    direction: Direction,
    namespace: Option<&str>,
) -> Located<(Vec<Peer>, Vec<PortSpec>)> {
    let [endpoints, entities, cidrs, cidr_sets] = match direction {
        Direction::Ingress => ["fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet"],
        Direction::Egress => ["toEndpoints", "toEntities", "toCIDR", "toCIDRSet"],
    };
    let mut rule = node.object()?;
    for (field, reason) in CILIUM_UNSUPPORTED {
        rule.refuse(field, reason)?;
    }
    let mut peers = Vec::new();
    for item in rule.take_list(endpoints)? {
        let selector = label_selector(&item)?;
        let selector = match namespace {
            Some(namespace) if !selector.mentions_key(NAMESPACE_KEY) => {
                selector.in_namespace(namespace)
            }
            _ => selector,
        };
        peers.push(Peer::Endpoints(selector));
    }
    for item in rule.take_list(entities)? {
        let name = item.string()?;
        let entity = Entity::from_name(name)
            .ok_or_else(|| (item.path.clone(), Problem::UnknownEntity(name.to_owned())))?;
        peers.push(Peer::Entity(entity));
    }
    for item in rule.take_list(cidrs)? {
        let cidr = cidr(&item, true)?;
        peers.push(Peer::Cidr {
            cidr,
            except: Vec::new(),
        });
    }
    for item in rule.take_list(cidr_sets)? {
        let mut set = item.object()?;
        set.refuse("cidrGroupRef", "cidrGroupRef is not supported")?;
        set.refuse("cidrGroupSelector", "cidrGroupSelector is not supported")?;
        let cidr_peer = cidr_with_except(&mut set, true)?;
        set.finish()?;
        peers.push(cidr_peer);
    }
    let mut ports = Vec::new();
    for item in rule.take_list("toPorts")? {
        let mut port_rule = item.object()?;
        port_rule.refuse("rules", "L7 rules are not supported")?;
        port_rule.refuse("serverNames", "serverNames is not supported")?;
        port_rule.refuse("originatingTLS", "originatingTLS is not supported")?;
        port_rule.refuse("terminatingTLS", "terminatingTLS is not supported")?;
        port_rule.refuse("listener", "listener is not supported")?;
        let list = port_rule.required("ports")?;
        let items = list.list()?;
        if items.is_empty() {
            return list.fail(Problem::Empty);
        }
        for port in items {
            ports.push(port_spec(&port, PortDialect::Cilium)?);
        }
        port_rule.finish()?;
    }
    rule.finish()?;
    // Cilium: an L4-only rule applies to every peer.
    if peers.is_empty() && !ports.is_empty() {
        peers.push(Peer::Entity(Entity::All));
    }
    Ok((peers, ports))
}

fn network_policy_spec(node: &Node<'_>, namespace: &str, rules: &mut Vec<Rule>) -> Located<()> {
    let mut spec = node.object()?;
    let subject = label_selector(&spec.required("podSelector")?)?.in_namespace(namespace);
    let mut types = None;
    if let Some(list) = spec.take("policyTypes") {
        let mut listed = (false, false);
        for item in list.list()? {
            match item.string()? {
                "Ingress" => listed.0 = true,
                "Egress" => listed.1 = true,
                other => return item.fail(Problem::UnknownPolicyType(other.to_owned())),
            }
        }
        types = Some((listed, list.path.clone()));
    }
    let ingress = spec.take("ingress");
    let egress = spec.take("egress");
    spec.finish()?;
    let ((ingress_on, egress_on), types_path) = types.unwrap_or_else(|| {
        (
            (true, egress.is_some()),
            format!("{}.podSelector", node.path),
        )
    });
    for (section, on, direction) in [
        (ingress, ingress_on, Direction::Ingress),
        (egress, egress_on, Direction::Egress),
    ] {
        if !on {
            if let Some(section) = section {
                return section.fail(Problem::RulesWithoutPolicyType);
            }
            continue;
        }
        let items = match &section {
            Some(section) => section.list()?,
            None => Vec::new(),
        };
        if items.is_empty() {
            let origin = section
                .as_ref()
                .map_or(types_path.as_str(), |s| s.path.as_str());
            rules.push(enforce_only(&subject, direction, Action::Allow, origin));
        }
        for item in items {
            let (peers, ports) = network_policy_rule(&item, direction, namespace)?;
            rules.push(Rule {
                subject: subject.clone(),
                direction,
                action: Action::Allow,
                peers,
                ports,
                origin: item.path.clone(),
            });
        }
    }
    Ok(())
}

fn network_policy_rule(
    node: &Node<'_>,
    direction: Direction,
    namespace: &str,
) -> Located<(Vec<Peer>, Vec<PortSpec>)> {
    let mut rule = node.object()?;
    let peers_field = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let mut peers = Vec::new();
    for item in rule.take_list(peers_field)? {
        let mut peer = item.object()?;
        let pods = peer
            .take("podSelector")
            .map(|n| label_selector(&n))
            .transpose()?;
        let namespaces = peer
            .take("namespaceSelector")
            .map(|n| label_selector(&n))
            .transpose()?;
        let block = peer.take("ipBlock");
        peer.finish()?;
        peers.push(match (pods, namespaces, block) {
            (None, None, Some(block)) => {
                let mut fields = block.object()?;
                let cidr_peer = cidr_with_except(&mut fields, false)?;
                fields.finish()?;
                cidr_peer
            }
            (_, _, Some(_)) => return item.fail(Problem::IpBlockWithSelector),
            (Some(pods), None, None) => Peer::Endpoints(pods.in_namespace(namespace)),
            (None, Some(namespaces), None) => Peer::Endpoints(namespaces.of_namespace_labels()),
            (Some(pods), Some(namespaces), None) => {
                Peer::Endpoints(pods.and(namespaces.of_namespace_labels()))
            }
            (None, None, None) => return item.fail(Problem::EmptyPeer),
        });
    }
    // Kubernetes: an empty or missing from/to matches every peer.
    if peers.is_empty() {
        peers.push(Peer::Entity(Entity::All));
    }
    let mut ports = Vec::new();
    for item in rule.take_list("ports")? {
        ports.push(port_spec(&item, PortDialect::NetworkPolicy)?);
    }
    rule.finish()?;
    Ok((peers, ports))
}

/// Which API's port rules apply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PortDialect {
    /// `protocol` TCP/UDP/SCTP/ANY (default ANY), `port` a number or numeric string.
    Cilium,
    /// `protocol` TCP/UDP/SCTP (default TCP), `port` a number.
    NetworkPolicy,
}

fn port_spec(node: &Node<'_>, dialect: PortDialect) -> Located<PortSpec> {
    let mut fields = node.object()?;
    let protocol = match fields.take("protocol") {
        None if dialect == PortDialect::Cilium => Protocol::Any,
        None => Protocol::Tcp,
        Some(node) => match (node.string()?, dialect) {
            ("TCP", _) => Protocol::Tcp,
            ("UDP", _) => Protocol::Udp,
            ("SCTP", _) => Protocol::Sctp,
            ("ANY", PortDialect::Cilium) => Protocol::Any,
            (other, PortDialect::Cilium) => {
                return node.fail(Problem::UnknownProtocol(
                    other.to_owned(),
                    "TCP, UDP, SCTP, ANY",
                ));
            }
            (other, PortDialect::NetworkPolicy) => {
                return node.fail(Problem::UnknownProtocol(other.to_owned(), "TCP, UDP, SCTP"));
            }
        },
    };
    let port = fields
        .take("port")
        .map(|n| port_number(&n, dialect == PortDialect::Cilium).map(|p| (p, n)))
        .transpose()?;
    let end_port = fields
        .take("endPort")
        .map(|n| port_number(&n, false).map(|p| (p, n)))
        .transpose()?;
    fields.finish()?;
    let range = match (port, end_port) {
        (None, None) => None,
        (None, Some((_, end_node))) => return end_node.fail(Problem::EndPortWithoutPort),
        (Some((port, _)), None) => PortRange::new(port, port),
        (Some((port, _)), Some((end_port, end_node))) => match PortRange::new(port, end_port) {
            Some(range) => Some(range),
            None => return end_node.fail(Problem::EndPortBeforePort { port, end_port }),
        },
    };
    Ok(PortSpec::new(protocol, range))
}

/// A port in 1–65535, as a number (or a string of digits when `strings` is set).
fn port_number(node: &Node<'_>, strings: bool) -> Located<u16> {
    let number = match node.value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            if !strings {
                return node.fail(Problem::WrongType("a port number"));
            }
            // Too many digits for a u64 is out of range too.
            Some(text.parse::<u64>().unwrap_or(u64::MAX))
        }
        Value::String(text) => return node.fail(Problem::NamedPort(text.clone())),
        _ => return node.fail(Problem::WrongType("a port number")),
    };
    match number.and_then(|n| u16::try_from(n).ok()) {
        Some(port) if port != 0 => Ok(port),
        _ => node.fail(Problem::PortOutOfRange(node.value.to_string())),
    }
}

/// `cidr` and `except` of a Cilium CIDR set or a NetworkPolicy ipBlock.
fn cidr_with_except(fields: &mut Fields<'_>, bare_addresses: bool) -> Located<Peer> {
    let cidr = cidr(&fields.required("cidr")?, bare_addresses)?;
    let mut except = Vec::new();
    for item in fields.take_list("except")? {
        let prefix = self::cidr(&item, bare_addresses)?;
        if !cidr.contains(&prefix) {
            return item.fail(Problem::ExceptOutsideCidr {
                except: prefix,
                cidr,
            });
        }
        except.push(prefix);
    }
    Ok(Peer::Cidr { cidr, except })
}

fn cidr(node: &Node<'_>, bare_addresses: bool) -> Located<IpNet> {
    let text = node.string()?;
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    match text.parse::<IpAddr>() {
        Ok(address) if bare_addresses => Ok(IpNet::from(address)),
        _ => node.fail(Problem::BadCidr(text.to_owned())),
    }
}

fn label_selector(node: &Node<'_>) -> Located<Selector> {
    let mut fields = node.object()?;
    let mut match_labels = Vec::new();
    if let Some(labels) = fields.take("matchLabels") {
        let mut labels = labels.object()?;
        let map = labels.map;
        for key in map.keys() {
            if let Some(value) = labels.take(key) {
                match_labels.push((key.clone(), value.string()?.to_owned()));
            }
        }
        labels.finish()?;
    }
    let mut match_expressions = Vec::new();
    for item in fields.take_list("matchExpressions")? {
        let mut expression = item.object()?;
        let key = expression.required("key")?.string()?.to_owned();
        let operator = expression.required("operator")?.string()?.to_owned();
        let values = match expression.take("values") {
            Some(values) => Some(
                values
                    .list()?
                    .iter()
                    .map(|v| v.string().map(str::to_owned))
                    .collect::<Located<Vec<_>>>()?,
            ),
            None => None,
        };
        expression.finish()?;
        match_expressions.push(RawExpression {
            key,
            operator,
            values,
        });
    }
    fields.finish()?;
    Selector::from_parts(&match_labels, &match_expressions)
        .map_err(|e| (join(&node.path, &e.path), Problem::Selector(e.problem)))
}

/// A value and its path in the document.
struct Node<'a> {
    value: &'a Value,
    path: String,
}

impl<'a> Node<'a> {
    fn root(value: &'a Value) -> Self {
        Self {
            value,
            path: String::new(),
        }
    }

    fn fail<T>(&self, problem: Problem) -> Located<T> {
        Err((self.path.clone(), problem))
    }

    fn object(&self) -> Located<Fields<'a>> {
        match self.value {
            Value::Object(map) => Ok(Fields {
                map,
                path: self.path.clone(),
                seen: Vec::new(),
            }),
            _ => self.fail(Problem::WrongType("an object")),
        }
    }

    fn list(&self) -> Located<Vec<Node<'a>>> {
        match self.value {
            Value::Array(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(index, value)| Node {
                    value,
                    path: format!("{}[{index}]", self.path),
                })
                .collect()),
            _ => self.fail(Problem::WrongType("a list")),
        }
    }

    fn string(&self) -> Located<&'a str> {
        match self.value {
            Value::String(text) => Ok(text),
            _ => self.fail(Problem::WrongType("a string")),
        }
    }
}

/// The fields of an object; [`Fields::finish`] refuses the ones nobody took.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: String,
    seen: Vec<&'a str>,
}

impl<'a> Fields<'a> {
    /// The field `key`, `None` when absent or null (Kubernetes treats both alike).
    fn take(&mut self, key: &str) -> Option<Node<'a>> {
        let (key, value) = self.map.get_key_value(key)?;
        self.seen.push(key);
        (!value.is_null()).then(|| Node {
            value,
            path: join(&self.path, key),
        })
    }

    fn required(&mut self, key: &str) -> Located<Node<'a>> {
        match self.take(key) {
            Some(node) => Ok(node),
            None => self.missing(key),
        }
    }

    fn missing<T>(&self, key: &str) -> Located<T> {
        Err((join(&self.path, key), Problem::Missing))
    }

    /// The items of the list `key`; none when absent.
    fn take_list(&mut self, key: &str) -> Located<Vec<Node<'a>>> {
        self.take(key).map_or(Ok(Vec::new()), |node| node.list())
    }

    /// Refuses the field `key` if present (even when null: it was written on purpose).
    fn refuse(&mut self, key: &str, reason: &'static str) -> Located<()> {
        if self.map.contains_key(key) {
            return Err((join(&self.path, key), Problem::Unsupported(reason)));
        }
        Ok(())
    }

    fn finish(self) -> Located<()> {
        match self
            .map
            .keys()
            .find(|key| !self.seen.contains(&key.as_str()))
        {
            Some(key) => Err((join(&self.path, key), Problem::UnknownField)),
            None => Ok(()),
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::RULE1;

    fn one(text: &str) -> Policy {
        let mut policies = parse(text.as_bytes()).unwrap();
        assert_eq!(policies.len(), 1);
        policies.remove(0)
    }

    fn error(text: &str) -> String {
        parse(text.as_bytes()).unwrap_err().to_string()
    }

    fn cnp_with_ingress(ingress: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: rule1}}\n\
             spec:\n  endpointSelector: {{}}\n  ingress:\n{ingress}"
        )
    }

    #[test]
    fn star_wars_rule1() {
        let policy = one(RULE1);
        assert_eq!(policy.name, "rule1");
        assert_eq!(policy.namespace.as_deref(), Some("default"));
        assert_eq!(policy.kind, PolicyKind::CiliumNetworkPolicy);
        assert_eq!(policy.rules.len(), 1);
        let rule = &policy.rules[0];
        assert_eq!(rule.origin, "spec.ingress[0]");
        assert_eq!(
            (rule.direction, rule.action),
            (Direction::Ingress, Action::Allow)
        );
        assert_eq!(
            rule.ports,
            [PortSpec::new(Protocol::Tcp, PortRange::new(80, 80))]
        );
        let deathstar = "org=empire,class=deathstar,io.kubernetes.pod.namespace=default";
        assert!(rule.subject.matches(&deathstar.parse().unwrap()));
        let elsewhere = "org=empire,class=deathstar,io.kubernetes.pod.namespace=other";
        assert!(!rule.subject.matches(&elsewhere.parse().unwrap()));
        let [Peer::Endpoints(peer)] = rule.peers.as_slice() else {
            panic!("one endpoint peer expected: {:?}", rule.peers);
        };
        // Scoped to the policy's namespace.
        assert!(
            peer.matches(
                &"org=empire,io.kubernetes.pod.namespace=default"
                    .parse()
                    .unwrap()
            )
        );
        assert!(!peer.matches(&"org=empire,io.kubernetes.pod.namespace=x".parse().unwrap()));
    }

    #[test]
    fn refuses_l7_rules_naming_the_field() {
        let text = cnp_with_ingress(
            "  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules:\n        http: [{method: GET}]\n",
        );
        assert_eq!(
            error(&text),
            "policy \"rule1\": spec.ingress[0].toPorts[0].rules: L7 rules are not supported"
        );
    }

    #[test]
    fn refuses_unsupported_and_unknown_fields() {
        let cases = [
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchName: x.io}]\n",
                "policy \"p\": spec.egress[0].toFQDNs: toFQDNs (DNS-based rules) is not supported",
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toServices: []\n",
                "policy \"p\": spec.egress[0].toServices: toServices is not supported",
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromRequires: [{}]\n",
                "policy \"p\": spec.ingress[0].fromRequires: fromRequires is not supported",
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - icmps: [{fields: []}]\n",
                "policy \"p\": spec.ingress[0].icmps: ICMP rules are not supported",
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoint: [{}]\n",
                "policy \"p\": spec.ingress[0].fromEndpoint: unknown field",
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabel: {a: b}}\n",
                "policy \"p\": spec.endpointSelector.matchLabel: unknown field",
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"443\"}], serverNames: [a.io]}]\n",
                "policy \"p\": spec.egress[0].toPorts[0].serverNames: serverNames is not supported",
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"443\"}], originatingTLS: {}}]\n",
                "policy \"p\": spec.egress[0].toPorts[0].originatingTLS: originatingTLS is not supported",
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: http}]}]\n",
                "policy \"p\": spec.ingress[0].toPorts[0].ports[0].port: named ports are not supported (\"http\")",
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  nodeSelector: {}\n  ingress: []\n",
                "policy \"p\": spec.nodeSelector: host policies (nodeSelector) are not supported",
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\nextra: 1\n",
                "policy \"p\": extra: unknown field",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(error(text), expected, "{text}");
        }
    }

    #[test]
    fn refuses_bad_values() {
        let ingress = |rule: &str| error(&cnp_with_ingress(&format!("  - {rule}\n")));
        let at = |path: &str, problem: &str| {
            format!("policy \"rule1\": spec.ingress[0].{path}: {problem}")
        };
        assert_eq!(
            ingress("toPorts: [{ports: [{port: \"0\"}]}]"),
            at(
                "toPorts[0].ports[0].port",
                "port \"0\" is not between 1 and 65535"
            )
        );
        assert_eq!(
            ingress("toPorts: [{ports: [{port: 65536}]}]"),
            at(
                "toPorts[0].ports[0].port",
                "port 65536 is not between 1 and 65535"
            )
        );
        assert_eq!(
            ingress("toPorts: [{ports: [{port: \"90\", endPort: 80}]}]"),
            at("toPorts[0].ports[0].endPort", "endPort 80 is below port 90")
        );
        assert_eq!(
            ingress("toPorts: [{ports: [{endPort: 80}]}]"),
            at("toPorts[0].ports[0].endPort", "endPort needs a port")
        );
        assert_eq!(
            ingress("toPorts: [{ports: [{port: \"53\", protocol: ICMP}]}]"),
            at(
                "toPorts[0].ports[0].protocol",
                "unknown protocol \"ICMP\" (supported: TCP, UDP, SCTP, ANY)"
            )
        );
        assert_eq!(
            ingress("toPorts: [{ports: []}]"),
            at("toPorts[0].ports", "must not be empty")
        );
        assert_eq!(
            ingress("fromEntities: [cluster, kube-apiserver]"),
            at(
                "fromEntities[1]",
                "unknown entity \"kube-apiserver\" (supported: cluster, host, remote-node, world, all)"
            )
        );
        assert_eq!(
            ingress("fromCIDR: [10.0.0.0/33]"),
            at("fromCIDR[0]", "\"10.0.0.0/33\" is not a CIDR")
        );
        assert_eq!(
            ingress("fromCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]"),
            at(
                "fromCIDRSet[0].except[0]",
                "11.0.0.0/16 is not inside 10.0.0.0/8"
            )
        );
        assert_eq!(
            ingress("fromEndpoints: [{matchExpressions: [{key: a, operator: In}]}]"),
            at(
                "fromEndpoints[0].matchExpressions[0].values",
                "operator In needs at least one value"
            )
        );
        assert_eq!(
            ingress("fromEndpoints: [{matchLabels: {a: 1}}]"),
            at("fromEndpoints[0].matchLabels.a", "expected a string")
        );
    }

    #[test]
    fn refuses_bad_documents() {
        assert_eq!(
            error(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {namespace: x}\nspec: {}\n"
            ),
            "document 1: metadata.name: missing"
        );
        assert_eq!(
            error("---\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"),
            "document 2: kind: unsupported kind \"ConfigMap\" of apiVersion \"v1\""
        );
        assert_eq!(
            error(
                "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: c, namespace: x}\nspec: {endpointSelector: {}}\n"
            ),
            "document 1: metadata.namespace: a cluster-wide policy has no namespace"
        );
        assert_eq!(
            error("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"),
            "policy \"p\": spec: missing"
        );
        let big = vec![b' '; MAX_INPUT_BYTES + 1];
        assert!(matches!(
            parse(&big),
            Err(DocumentError::TooLarge { size, .. }) if size == MAX_INPUT_BYTES + 1
        ));
        assert!(matches!(
            parse(b"a: [b"),
            Err(DocumentError::Yaml { index: 1, .. })
        ));
        assert!(matches!(
            parse(b"{\"a\": "),
            Err(DocumentError::Json { .. })
        ));
    }

    #[test]
    fn streams_json_specs_and_own_api_group() {
        let text = format!(
            "{RULE1}---\n---\napiVersion: nodeseal.io/v1alpha1\nkind: NodesealClusterwideNetworkPolicy\n\
             metadata: {{name: c, labels: {{a: b}}}}\nspecs:\n- endpointSelector: {{}}\n  egress: [{{}}]\n\
             - endpointSelector: {{}}\n  ingressDeny:\n  - fromEntities: [world]\n"
        );
        let policies = parse(text.as_bytes()).unwrap();
        assert_eq!(policies.len(), 2);
        let clusterwide = &policies[1];
        assert_eq!(
            clusterwide.kind,
            PolicyKind::NodesealClusterwideNetworkPolicy
        );
        assert_eq!(clusterwide.namespace, None);
        let origins: Vec<_> = clusterwide
            .rules
            .iter()
            .map(|r| r.origin.as_str())
            .collect();
        assert_eq!(origins, ["specs[0].egress[0]", "specs[1].ingressDeny[0]"]);
        assert!(clusterwide.rules[0].peers.is_empty());
        assert_eq!(clusterwide.rules[1].action, Action::Deny);

        let json = r#"{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "j", "namespace": "prod"},
            "spec": {"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}]}}"#;
        let policy = one(json);
        assert_eq!(policy.namespace.as_deref(), Some("prod"));
        // L4-only: every peer.
        assert_eq!(policy.rules[0].peers, [Peer::Entity(Entity::All)]);
        assert!(parse(b"").unwrap().is_empty());
    }

    #[test]
    fn cidr_forms() {
        let policy = one(&cnp_with_ingress(
            "  - fromCIDR: [10.1.2.3/8, 192.168.0.1]\n    fromCIDRSet: [{cidr: \"2001:db8::/32\", except: [\"2001:db8:1::/48\"]}]\n",
        ));
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            policy.rules[0].peers,
            [
                Peer::Cidr {
                    cidr: net("10.0.0.0/8"),
                    except: vec![]
                },
                Peer::Cidr {
                    cidr: net("192.168.0.1/32"),
                    except: vec![]
                },
                Peer::Cidr {
                    cidr: net("2001:db8::/32"),
                    except: vec![net("2001:db8:1::/48")]
                },
            ]
        );
    }

    #[test]
    fn endpoint_selectors_naming_a_namespace_are_not_rescoped() {
        let policy = one(&cnp_with_ingress(
            "  - fromEndpoints: [{matchLabels: {\"k8s:io.kubernetes.pod.namespace\": kube-system}}]\n",
        ));
        let Peer::Endpoints(selector) = &policy.rules[0].peers[0] else {
            panic!("endpoints expected");
        };
        assert!(selector.matches(&"io.kubernetes.pod.namespace=kube-system".parse().unwrap()));
    }

    #[test]
    fn network_policy_semantics() {
        let text = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}}
    - namespaceSelector: {matchLabels: {team: ops}}
    - namespaceSelector: {matchLabels: {team: dev}}
      podSelector: {matchLabels: {app: debug}}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports:
    - port: 5432
    - protocol: UDP
      port: 1000
      endPort: 2000
  - {}
";
        let policy = one(text);
        assert_eq!(policy.rules.len(), 3);
        let [first, open, egress] = policy.rules.as_slice() else {
            unreachable!()
        };
        let pod = |ns: &str, app: &str, team: &str| {
            crate::labels::Labels::for_pod(
                ns,
                &[("app".to_owned(), app.to_owned())].into(),
                &[("team".to_owned(), team.to_owned())].into(),
            )
        };
        let matches = |labels: &crate::labels::Labels| {
            first.matches_peer(&crate::rule::PeerIdentity::Workload(labels))
        };
        assert!(matches(&pod("prod", "web", "x")));
        assert!(!matches(&pod("other", "web", "x")));
        assert!(matches(&pod("other", "anything", "ops")));
        assert!(matches(&pod("other", "debug", "dev")));
        assert!(!matches(&pod("other", "web", "dev")));
        assert!(first.subject.matches(&pod("prod", "db", "")));
        assert!(!first.subject.matches(&pod("dev", "db", "")));
        assert_eq!(
            first.ports,
            [
                PortSpec::new(Protocol::Tcp, PortRange::new(5432, 5432)),
                PortSpec::new(Protocol::Udp, PortRange::new(1000, 2000)),
            ]
        );
        assert_eq!(open.peers, [Peer::Entity(Entity::All)]);
        assert!(open.ports.is_empty());
        // Egress in policyTypes without rules: deny all.
        assert_eq!(
            (egress.direction, egress.peers.len()),
            (Direction::Egress, 0)
        );
        assert_eq!(egress.origin, "spec.policyTypes");
    }

    #[test]
    fn network_policy_defaults_and_refusals() {
        let np = |spec: &str| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np}}\nspec:\n{spec}"
            )
        };
        // No policyTypes, no rules: ingress denied, egress untouched.
        let policy = one(&np("  podSelector: {}\n"));
        assert_eq!(policy.rules.len(), 1);
        assert_eq!(policy.rules[0].direction, Direction::Ingress);
        assert!(policy.rules[0].peers.is_empty());
        // egress present: both directions.
        let policy = one(&np(
            "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}]}]\n",
        ));
        let directions: Vec<_> = policy.rules.iter().map(|r| r.direction).collect();
        assert_eq!(directions, [Direction::Ingress, Direction::Egress]);
        assert_eq!(
            error(&np(
                "  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n"
            )),
            "policy \"np\": spec.ingress: rules for a direction missing from policyTypes"
        );
        assert_eq!(
            error(&np("  podSelector: {}\n  ingress: [{from: [{}]}]\n")),
            "policy \"np\": spec.ingress[0].from[0]: a peer needs podSelector, namespaceSelector or ipBlock"
        );
        assert_eq!(
            error(&np(
                "  podSelector: {}\n  ingress: [{from: [{podSelector: {}, ipBlock: {cidr: 10.0.0.0/8}}]}]\n"
            )),
            "policy \"np\": spec.ingress[0].from[0]: ipBlock cannot be combined with podSelector or namespaceSelector"
        );
        assert_eq!(
            error(&np(
                "  podSelector: {}\n  ingress: [{ports: [{port: http}]}]\n"
            )),
            "policy \"np\": spec.ingress[0].ports[0].port: named ports are not supported (\"http\")"
        );
        assert_eq!(
            error(&np(
                "  podSelector: {}\n  ingress: [{ports: [{protocol: ANY}]}]\n"
            )),
            "policy \"np\": spec.ingress[0].ports[0].protocol: unknown protocol \"ANY\" (supported: TCP, UDP, SCTP)"
        );
        assert_eq!(
            error(&np(
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.1}}]}]\n"
            )),
            "policy \"np\": spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.1\" is not a CIDR"
        );
        assert_eq!(
            error(&np("  podSelector: {}\n  policyTypes: [Both]\n")),
            "policy \"np\": spec.policyTypes[0]: unknown policy type \"Both\" (expected Ingress or Egress)"
        );
    }
}
