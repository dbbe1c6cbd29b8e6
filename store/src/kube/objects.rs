//! The Kubernetes objects the backend reads and writes, and how records map onto them.
//!
//! | record | object | written by |
//! | --- | --- | --- |
//! | `nodes/<n>` | Node `n` (IPs, pod CIDRs) joined with NodesealNode `n` (handshake port, SPIFFE ID, WireGuard key) | the cluster (Node); the agent of `n` (NodesealNode, admission-checked) |
//! | `node-status/<n>` | NodesealNode `n`, `status.summary` | the agent of `n` |
//! | `trust-bundle/cluster` | ConfigMap `nodeseal-trust-bundle` | keymgr |
//! | `rekey/cluster` | ConfigMap `nodeseal-rekey` | the CLI (an operator) |
//! | `revocations/<id>` | ConfigMap `nodeseal-revocation-<hash>` | the CLI (an operator) |
//! | `identities/<n>` | ConfigMap `nodeseal-identities-<hash>` | keymgr (the only allocator) |
//! | `identity-claims/<digest>` | ConfigMap `nodeseal-identity-claims-<hash>` | keymgr |
//! | `endpoints/…`, `policies/…` | Pods, policy objects ([`super::workloads`]) | never as records |
//!
//! ConfigMap-backed records keep their key in the annotation [`KEY_ANNOTATION`] and their JSON
//! in `data["record.json"]`; the label [`KIND_LABEL`] lets one watch select them all.
//! CSRs and certificates are not records here: in this mode they are `certificates.k8s.io/v1`
//! CertificateSigningRequests, handled by the agent and keymgr directly.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::ClusterResourceScope;
use serde::{Deserialize, Serialize};

use crate::error::RecordProblem;
use crate::record::{Key, Kind, MAX_ADDRESSES, NodeRecord};
use crate::types::{NodeName, SpiffeId, WgPublicKey};

/// API group of nodeseal's custom resources.
pub const GROUP: &str = "nodeseal.io";
/// Version of nodeseal's custom resources.
pub const VERSION: &str = "v1alpha1";
/// Kind of the per-node custom resource.
pub const KIND: &str = "NodesealNode";
/// Label on every ConfigMap-backed record: the record kind (`revocations`, ...).
pub const KIND_LABEL: &str = "nodeseal.io/kind";
/// Annotation on every ConfigMap-backed record: its store key.
pub const KEY_ANNOTATION: &str = "nodeseal.io/key";
/// The data entry holding the record's JSON.
pub const RECORD_DATA_KEY: &str = "record.json";

/// What an agent publishes about its node (cluster-scoped, named after the node). The agent
/// may write only its own (a ValidatingAdmissionPolicy compares the name with the node-name
/// claim of its service-account token); its IPs and pod CIDRs are never here, they are the
/// Node object's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodesealNode {
    /// `nodeseal.io/v1alpha1`.
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// `NodesealNode`.
    pub kind: String,
    /// Standard metadata; the name is the node's.
    pub metadata: ObjectMeta,
    /// What the agent publishes.
    pub spec: NodesealNodeSpec,
    /// What the agent reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodesealNodeStatus>,
}

impl Default for NodesealNode {
    fn default() -> Self {
        Self {
            api_version: format!("{GROUP}/{VERSION}"),
            kind: KIND.to_owned(),
            metadata: ObjectMeta::default(),
            spec: NodesealNodeSpec::default(),
            status: None,
        }
    }
}

/// [`NodesealNode`]'s spec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodesealNodeSpec {
    /// TCP port of the key-agreement handshake, on the node's InternalIP.
    pub handshake_port: u16,
    /// The SPIFFE ID the agent presents; must be the node's own.
    #[serde(rename = "spiffeID")]
    pub spiffe_id: String,
    /// Serial of the node's current certificate (hex), for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// Expiry of the node's current certificate (RFC 3339), for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<String>,
    /// The node's WireGuard public key (base64), in WireGuard mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
}

/// [`NodesealNode`]'s status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodesealNodeStatus {
    /// The node's status record (`node-status/<n>`), as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<serde_json::Value>,
}

impl kube::Resource for NodesealNode {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "nodesealnodes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The ConfigMap holding a cluster-wide or revocation record.
pub fn config_map_name(key: &Key) -> String {
    match key.kind() {
        Kind::TrustBundle => "nodeseal-trust-bundle".to_owned(),
        Kind::RekeyGeneration => "nodeseal-rekey".to_owned(),
        // A revocation id (`node:serial`) is no valid object name, and node names may hold
        // dots: a hash keeps distinct ids apart.
        _ => {
            let digest = ring::digest::digest(&ring::digest::SHA256, key.to_string().as_bytes());
            format!("nodeseal-{}-{}", key.kind(), &hex::encode(digest)[..20])
        }
    }
}

/// Whether records of this kind are kept in ConfigMaps.
pub fn in_config_map(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::TrustBundle
            | Kind::RekeyGeneration
            | Kind::Revocation
            | Kind::Identity
            | Kind::IdentityClaim
    )
}

/// A ConfigMap-backed record's key and JSON, if the ConfigMap is one of ours.
pub fn config_map_record(cm: &ConfigMap) -> Option<(String, Vec<u8>)> {
    let key = cm.metadata.annotations.as_ref()?.get(KEY_ANNOTATION)?;
    let value = cm.data.as_ref()?.get(RECORD_DATA_KEY)?;
    Some((key.clone(), value.clone().into_bytes()))
}

/// A ConfigMap holding `value` under `key`.
pub fn config_map_for(key: &Key, namespace: &str, value: &[u8]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(key)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                KIND_LABEL.to_owned(),
                key.kind().as_str().to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                KEY_ANNOTATION.to_owned(),
                key.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            RECORD_DATA_KEY.to_owned(),
            String::from_utf8_lossy(value).into_owned(),
        )])),
        ..ConfigMap::default()
    }
}

/// What the Node object says a node owns: its InternalIPs and pod CIDRs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// `status.addresses` of type InternalIP, in order, without duplicates.
    pub internal_ips: Vec<IpAddr>,
    /// `spec.podCIDRs` (or the older `spec.podCIDR`), canonical.
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeFacts {
    /// Reads the facts of a Node object; a Node that lacks them, or lists malformed ones, is a
    /// problem that names the field.
    ///
    /// # Errors
    ///
    /// [`RecordProblem::Field`] naming the Node object's field.
    pub fn of(node: &Node) -> Result<Self, RecordProblem> {
        let name = node.metadata.name.as_deref().unwrap_or("?");
        let problem = |field: &'static str, reason: String| RecordProblem::Field { field, reason };
        let mut internal_ips = Vec::new();
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map_or(&[][..], Vec::as_slice);
        for address in addresses.iter().filter(|a| a.type_ == "InternalIP") {
            let ip: IpAddr = address.address.parse().map_err(|_| {
                problem(
                    "node_ips",
                    format!(
                        "Node {name} lists InternalIP {:?}, which is not an IP address",
                        address.address
                    ),
                )
            })?;
            if !internal_ips.contains(&ip) {
                internal_ips.push(ip);
            }
        }
        if internal_ips.is_empty() {
            return Err(problem(
                "node_ips",
                format!("Node {name} has no InternalIP in status.addresses"),
            ));
        }
        let spec = node.spec.as_ref();
        let texts: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
            Some(list) if !list.is_empty() => list.iter().collect(),
            _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
        };
        if texts.is_empty() {
            return Err(problem(
                "pod_cidrs",
                format!("Node {name} has no pod CIDR in spec.podCIDRs"),
            ));
        }
        let mut pod_cidrs = Vec::new();
        for text in texts {
            let cidr: IpNet = text.parse().map_err(|_| {
                problem(
                    "pod_cidrs",
                    format!("Node {name} lists pod CIDR {text:?}, which is not a CIDR"),
                )
            })?;
            let cidr = cidr.trunc();
            if !pod_cidrs.contains(&cidr) {
                pod_cidrs.push(cidr);
            }
        }
        if internal_ips.len() > MAX_ADDRESSES || pod_cidrs.len() > MAX_ADDRESSES {
            return Err(problem(
                "node_ips",
                format!("Node {name} lists more than {MAX_ADDRESSES} addresses or CIDRs"),
            ));
        }
        Ok(Self {
            internal_ips,
            pod_cidrs,
        })
    }
}

/// The SPIFFE ID of node `name` in `trust_domain`: in this mode it follows from the node's name,
/// never from what the node publishes.
pub fn node_spiffe_id(trust_domain: &str, name: &NodeName) -> String {
    format!("spiffe://{trust_domain}/node/{name}")
}

/// The handshake port of a node whose agent has not published (yet): the chart's default.
pub const DEFAULT_HANDSHAKE_PORT: u16 = 4250;

/// The node record peers act on: IPs and pod CIDRs from the Node object (the authority), the
/// handshake port and WireGuard key from the agent's NodesealNode, whose SPIFFE ID must be the
/// node's own.
///
/// Every Node is a node record, published or not: a node without an agent is a peer that never
/// answers, so strict mode drops its pods' plaintext instead of not knowing their addresses.
///
/// # Errors
///
/// [`RecordProblem`] naming what is missing or claimed wrongly.
pub fn compose_node_record(
    trust_domain: &str,
    node: &Node,
    published: Option<&NodesealNode>,
) -> Result<NodeRecord, RecordProblem> {
    let raw_name = node.metadata.name.clone().unwrap_or_default();
    let name = NodeName::new(raw_name).map_err(|e| RecordProblem::BadKey {
        reason: e.to_string(),
    })?;
    let facts = NodeFacts::of(node)?;
    let expected = node_spiffe_id(trust_domain, &name);
    let (port, wireguard_key) = match published {
        Some(published) => {
            if published.spec.spiffe_id != expected {
                return Err(RecordProblem::Field {
                    field: "spiffe_id",
                    reason: format!(
                        "NodesealNode {name} claims SPIFFE ID {:?}; node {name} can only be {expected}",
                        published.spec.spiffe_id
                    ),
                });
            }
            if published.spec.handshake_port == 0 {
                return Err(RecordProblem::Field {
                    field: "handshake",
                    reason: format!("NodesealNode {name} has handshake port 0"),
                });
            }
            (
                published.spec.handshake_port,
                published.spec.wireguard_public_key.as_deref(),
            )
        }
        None => (DEFAULT_HANDSHAKE_PORT, None),
    };
    let spiffe_id = SpiffeId::new(expected).map_err(|e| RecordProblem::Field {
        field: "spiffe_id",
        reason: e.to_string(),
    })?;
    let wireguard_public_key = wireguard_key
        .map(str::parse::<WgPublicKey>)
        .transpose()
        .map_err(|e| RecordProblem::Field {
            field: "wireguard_public_key",
            reason: e.to_string(),
        })?;
    let Some(&first_ip) = facts.internal_ips.first() else {
        return Err(RecordProblem::Field {
            field: "node_ips",
            reason: format!("Node {name} has no InternalIP in status.addresses"),
        });
    };
    Ok(NodeRecord {
        name,
        handshake: SocketAddr::new(first_ip, port),
        node_ips: facts.internal_ips,
        pod_cidrs: facts.pod_cidrs,
        spiffe_id,
        wireguard_public_key,
    })
}

/// What an agent's node record becomes in its NodesealNode: only what is the agent's to say.
pub fn published_spec(record: &NodeRecord) -> NodesealNodeSpec {
    NodesealNodeSpec {
        handshake_port: record.handshake.port(),
        spiffe_id: record.spiffe_id.to_string(),
        certificate_serial: None,
        certificate_not_after: None,
        wireguard_public_key: record
            .wireguard_public_key
            .as_ref()
            .map(ToString::to_string),
    }
}
