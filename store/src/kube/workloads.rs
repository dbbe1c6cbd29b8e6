//! Endpoints and policy documents in Kubernetes mode: derived from the cluster's own objects,
//! never written as records.
//!
//! | record | object |
//! | --- | --- |
//! | `endpoints/<node>:<namespace>:<pod>` | Pod `<namespace>/<pod>`, scheduled on `<node>` |
//! | `policies/nnp.<namespace>.<name>` | `nodeseal.io/v1alpha1` NodesealNetworkPolicy |
//! | `policies/nccnp.<name>` | `nodeseal.io/v1alpha1` NodesealClusterwideNetworkPolicy |
//! | `policies/knp.<namespace>.<name>` | `networking.k8s.io/v1` NetworkPolicy |
//!
//! A Pod is an endpoint once it is scheduled (`spec.nodeName`), has an address
//! (`status.podIPs`, or the older `status.podIP`), is not `hostNetwork` (its traffic is the
//! node's) and has not finished (phase Succeeded or Failed: its addresses may be reused). Its
//! labels are the Pod's labels and its namespace's labels as
//! `io.cilium.k8s.namespace.labels.<key>` (what NetworkPolicy's namespaceSelector matches), all
//! with source `k8s`, as `Labels::for_pod` builds them; the namespace name is added by
//! [`Endpoint::security_labels`](crate::Endpoint::security_labels), as for every endpoint.
//! Its interface is empty: the agent finds the host side by route.
//!
//! A policy record's name is the object's kind prefix, namespace and name joined by dots.
//! Namespaces hold no dots, so the name reads back unambiguously ([`policy_object_of`]). An
//! object whose joined name exceeds a store name's 253 characters is reported invalid (a
//! `BadKey` naming the object) rather than renamed. Its
//! document is the object itself (apiVersion, kind, name, namespace and every top-level field
//! but `status`), as JSON, which nodeseal-policy parses like a file.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use kube::core::GroupVersionKind;
use nodeseal_policy::labels::{LabelKey, Labels, NAMESPACE_LABELS_PREFIX};
use serde::Deserialize as _;
use serde_json::{Map, Value};

use super::objects::{GROUP, VERSION};
use crate::error::RecordProblem;
use crate::record::{Endpoint, Kind, MAX_ADDRESSES, PolicyDocument, encode};
use crate::types::NodeName;

/// Kind of nodeseal's namespaced policy resource (a CiliumNetworkPolicy spec).
pub const NETWORK_POLICY_KIND: &str = "NodesealNetworkPolicy";
/// Kind of nodeseal's cluster-scoped policy resource.
pub const CLUSTERWIDE_POLICY_KIND: &str = "NodesealClusterwideNetworkPolicy";

/// Where a policy document comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicySource {
    /// `nodeseal.io/v1alpha1` NodesealNetworkPolicy (namespaced).
    Nodeseal,
    /// `nodeseal.io/v1alpha1` NodesealClusterwideNetworkPolicy (cluster-scoped).
    NodesealClusterwide,
    /// `networking.k8s.io/v1` NetworkPolicy (namespaced).
    Kubernetes,
}

impl PolicySource {
    /// Every source.
    pub const ALL: [Self; 3] = [Self::Nodeseal, Self::NodesealClusterwide, Self::Kubernetes];

    fn prefix(self) -> &'static str {
        match self {
            Self::Nodeseal => "nnp",
            Self::NodesealClusterwide => "nccnp",
            Self::Kubernetes => "knp",
        }
    }

    /// The object's `apiVersion`.
    pub fn api_version(self) -> String {
        match self {
            Self::Nodeseal | Self::NodesealClusterwide => format!("{GROUP}/{VERSION}"),
            Self::Kubernetes => "networking.k8s.io/v1".to_owned(),
        }
    }

    /// The object's `kind`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Nodeseal => NETWORK_POLICY_KIND,
            Self::NodesealClusterwide => CLUSTERWIDE_POLICY_KIND,
            Self::Kubernetes => "NetworkPolicy",
        }
    }

    /// Whether objects of this source live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Self::NodesealClusterwide)
    }

    /// The API resource, for a dynamic [`kube::Api`].
    pub fn api_resource(self) -> ApiResource {
        let (group, version, plural) = match self {
            Self::Nodeseal => (GROUP, VERSION, "nodesealnetworkpolicies"),
            Self::NodesealClusterwide => (GROUP, VERSION, "nodesealclusterwidenetworkpolicies"),
            Self::Kubernetes => ("networking.k8s.io", "v1", "networkpolicies"),
        };
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, self.kind()),
            plural,
        )
    }

    /// The source whose objects a document of `api_version`/`kind` is applied as: the Cilium
    /// kinds become nodeseal's, which have the same spec.
    pub fn for_document(api_version: &str, kind: &str) -> Option<Self> {
        match (api_version, kind) {
            ("cilium.io/v2", "CiliumNetworkPolicy") => Some(Self::Nodeseal),
            ("cilium.io/v2", "CiliumClusterwideNetworkPolicy") => Some(Self::NodesealClusterwide),
            (v, NETWORK_POLICY_KIND) if v == format!("{GROUP}/{VERSION}") => Some(Self::Nodeseal),
            (v, CLUSTERWIDE_POLICY_KIND) if v == format!("{GROUP}/{VERSION}") => {
                Some(Self::NodesealClusterwide)
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => Some(Self::Kubernetes),
            _ => None,
        }
    }
}

/// The record name of a policy object's document.
pub fn policy_record_name(source: PolicySource, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(namespace) if source.namespaced() => {
            format!("{}.{namespace}.{name}", source.prefix())
        }
        _ => format!("{}.{name}", source.prefix()),
    }
}

/// The object a policy record name stands for: its source, namespace and name.
pub fn policy_object_of(record_name: &str) -> Option<(PolicySource, Option<String>, String)> {
    let (prefix, rest) = record_name.split_once('.')?;
    let source = PolicySource::ALL
        .into_iter()
        .find(|s| s.prefix() == prefix)?;
    if source.namespaced() {
        let (namespace, name) = rest.split_once('.')?;
        Some((source, Some(namespace.to_owned()), name.to_owned()))
    } else {
        Some((source, None, rest.to_owned()))
    }
}

/// A derived record: its key, and its JSON or what makes it unusable.
pub type Derived = (String, Result<Vec<u8>, RecordProblem>);

/// The policy document record of a policy object.
pub fn policy_record(source: PolicySource, object: &DynamicObject) -> Derived {
    let name = object.metadata.name.as_deref().unwrap_or_default();
    let namespace = object.metadata.namespace.as_deref();
    let record_name = policy_record_name(source, namespace, name);
    let key = format!("{}/{record_name}", Kind::PolicyDocument.as_str());
    let object_name = match namespace {
        Some(namespace) => format!("{} {namespace}/{name}", source.kind()),
        None => format!("{} {name}", source.kind()),
    };
    let result = NodeName::new(record_name)
        .map_err(|e| RecordProblem::BadKey {
            reason: format!("{object_name} makes no valid policy name: {e}"),
        })
        .and_then(|store_name| {
            let document = policy_document_text(source, object);
            encode(&PolicyDocument {
                name: store_name,
                document,
            })
            .map_err(|error| match error.problem {
                RecordProblem::Field { field, reason } => RecordProblem::Field {
                    field,
                    reason: format!("{object_name}: {reason}"),
                },
                other => other,
            })
        });
    (key, result)
}

/// The object as a policy document: what a file holding it would say.
fn policy_document_text(source: PolicySource, object: &DynamicObject) -> String {
    let mut metadata = Map::new();
    if let Some(name) = &object.metadata.name {
        metadata.insert("name".to_owned(), Value::String(name.clone()));
    }
    if let (Some(namespace), true) = (&object.metadata.namespace, source.namespaced()) {
        metadata.insert("namespace".to_owned(), Value::String(namespace.clone()));
    }
    let mut document = Map::new();
    document.insert("apiVersion".to_owned(), Value::String(source.api_version()));
    document.insert("kind".to_owned(), Value::String(source.kind().to_owned()));
    document.insert("metadata".to_owned(), Value::Object(metadata));
    if let Value::Object(fields) = &object.data {
        for (field, value) in fields {
            // status is the cluster's report, not policy; the rest were set above.
            if !matches!(
                field.as_str(),
                "status" | "metadata" | "apiVersion" | "kind"
            ) {
                document.insert(field.clone(), value.clone());
            }
        }
    }
    // Serialising a Value of strings and JSON values cannot fail; an empty document would be
    // refused by the parser anyway.
    serde_json::to_string_pretty(&Value::Object(document)).unwrap_or_default()
}

/// What of a Pod makes its endpoint record: kept by the watch instead of the whole object, and
/// combined with its namespace's labels when the record is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    key: String,
    node: String,
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    ips: Vec<String>,
}

impl PodView {
    /// The Pod's view, or `None` if the Pod is no endpoint (see the module docs).
    pub fn of(pod: &Pod) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
        if spec.host_network == Some(true) {
            return None;
        }
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let mut ips: Vec<String> = status
            .pod_ips
            .iter()
            .flatten()
            .map(|ip| ip.ip.clone())
            .collect();
        if ips.is_empty() {
            ips.extend(status.pod_ip.clone());
        }
        ips.retain(|t| !t.is_empty());
        if ips.is_empty() {
            return None;
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        Some(Self {
            key: format!("{}/{node}:{namespace}:{name}", Kind::Endpoint.as_str()),
            node: node.to_owned(),
            namespace,
            name,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
        })
    }

    /// The record's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The Pod's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The endpoint record, with the labels of the Pod's namespace (`None`: the namespace is
    /// not known, so the record has none of its labels).
    ///
    /// # Errors
    ///
    /// The [`RecordProblem`] naming the Pod and the field that breaks the record's rules.
    pub fn record(
        &self,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> Result<Vec<u8>, RecordProblem> {
        let (node, namespace, name) = (&self.node, &self.namespace, &self.name);
        let bad_name = |e: crate::types::IdError| RecordProblem::BadKey {
            reason: format!("Pod {namespace}/{name} on node {node}: {e}"),
        };
        let field = |field: &'static str, reason: String| RecordProblem::Field {
            field,
            reason: format!("Pod {namespace}/{name}: {reason}"),
        };
        if self.ips.len() > MAX_ADDRESSES {
            return Err(field(
                "ips",
                format!("more than {MAX_ADDRESSES} addresses in status.podIPs"),
            ));
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for text in &self.ips {
            let ip: IpAddr = text.parse().map_err(|_| {
                field(
                    "ips",
                    format!("status.podIPs holds {text:?}, which is not an IP address"),
                )
            })?;
            // podIP and podIPs may repeat an address.
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        // As Labels::for_pod builds them, without the namespace name, which
        // Endpoint::security_labels adds.
        let mut labels = Labels::new();
        for (key, value) in &self.labels {
            labels.insert(LabelKey::k8s(key), value.clone());
        }
        for (key, value) in namespace_labels.into_iter().flatten() {
            labels.insert(
                LabelKey::k8s(&format!("{NAMESPACE_LABELS_PREFIX}{key}")),
                value.clone(),
            );
        }
        let endpoint = Endpoint {
            node: NodeName::new(node.as_str()).map_err(bad_name)?,
            namespace: NodeName::new(namespace.as_str()).map_err(bad_name)?,
            name: NodeName::new(name.as_str()).map_err(bad_name)?,
            labels,
            ips,
            interface: String::new(),
        };
        encode(&endpoint).map_err(|error| match error.problem {
            RecordProblem::Field { field: f, reason } => field(f, reason),
            other => other,
        })
    }
}

/// The endpoint record of a Pod in a namespace with `namespace_labels`, or `None` if the Pod
/// is no endpoint.
pub fn endpoint_record(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Option<Derived> {
    let view = PodView::of(pod)?;
    let value = view.record(namespace_labels);
    Some((view.key, value))
}

/// Why a document cannot be applied as Kubernetes objects.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// nodeseal-policy refused the document.
    #[error("the document is refused: {0}")]
    Refused(#[from] nodeseal_policy::document::DocumentError),
    /// A document of a kind that has no Kubernetes object here.
    #[error(
        "document {index}: {api_version} {kind} cannot be applied in Kubernetes mode (CiliumNetworkPolicy and NodesealNetworkPolicy become NodesealNetworkPolicy, CiliumClusterwideNetworkPolicy and NodesealClusterwideNetworkPolicy become NodesealClusterwideNetworkPolicy, NetworkPolicy stays NetworkPolicy)"
    )]
    UnsupportedKind {
        /// 1-based position.
        index: usize,
        /// `apiVersion`.
        api_version: String,
        /// `kind`.
        kind: String,
    },
    /// The documents could not be split into objects although the parser accepted them (the
    /// two readings disagree; nothing is applied).
    #[error("the document could not be split into objects: {reason}")]
    Unsplittable {
        /// What failed.
        reason: String,
    },
}

/// One object to apply: its source, namespace (for namespaced sources) and the object's JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObject {
    /// What it becomes.
    pub source: PolicySource,
    /// Its namespace (`default` if the document names none), for namespaced sources.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
    /// The object to apply.
    pub object: Value,
}

impl PolicyObject {
    /// The record name its document will have.
    pub fn record_name(&self) -> String {
        policy_record_name(self.source, self.namespace.as_deref(), &self.name)
    }
}

/// The objects a policy document (YAML stream or JSON) becomes. The document is parsed by
/// nodeseal-policy first: what it refuses is refused here, before anything is written.
///
/// # Errors
///
/// [`ApplyError`].
pub fn policy_objects(input: &[u8]) -> Result<Vec<PolicyObject>, ApplyError> {
    nodeseal_policy::document::parse(input)?;
    let values = raw_documents(input)?;
    let mut objects = Vec::new();
    for (position, value) in values.into_iter().enumerate() {
        let Value::Object(mut fields) = value else {
            continue;
        };
        let text = |fields: &Map<String, Value>, name: &str| {
            fields
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let api_version = text(&fields, "apiVersion");
        let kind = text(&fields, "kind");
        let Some(source) = PolicySource::for_document(&api_version, &kind) else {
            return Err(ApplyError::UnsupportedKind {
                index: position + 1,
                api_version,
                kind,
            });
        };
        let metadata = match fields.remove("metadata") {
            Some(Value::Object(metadata)) => metadata,
            _ => Map::new(),
        };
        let name = text(&metadata, "name");
        let namespace = source.namespaced().then(|| {
            Some(text(&metadata, "namespace"))
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| nodeseal_policy::document::DEFAULT_NAMESPACE.to_owned())
        });
        // Only what the author says about the object; uid, resourceVersion and the like are
        // the cluster's.
        let mut kept = Map::new();
        for field in ["name", "labels", "annotations"] {
            if let Some(value) = metadata.get(field) {
                kept.insert(field.to_owned(), value.clone());
            }
        }
        if let Some(namespace) = &namespace {
            kept.insert("namespace".to_owned(), Value::String(namespace.clone()));
        }
        fields.remove("status");
        fields.insert("apiVersion".to_owned(), Value::String(source.api_version()));
        fields.insert("kind".to_owned(), Value::String(source.kind().to_owned()));
        fields.insert("metadata".to_owned(), Value::Object(kept));
        objects.push(PolicyObject {
            source,
            namespace,
            name,
            object: Value::Object(fields),
        });
    }
    Ok(objects)
}

/// The documents of a YAML stream or JSON input, as nodeseal-policy splits them.
fn raw_documents(input: &[u8]) -> Result<Vec<Value>, ApplyError> {
    // parse() accepted the input, so it is UTF-8 and well-formed; an error here means the two
    // readings differ, and nothing is applied.
    let unsplittable = |reason: String| ApplyError::Unsplittable { reason };
    let text = std::str::from_utf8(input).map_err(|e| unsplittable(e.to_string()))?;
    if text.trim_start().starts_with(['{', '[']) {
        return match serde_json::from_str(text).map_err(|e| unsplittable(e.to_string()))? {
            Value::Array(items) => Ok(items),
            value => Ok(vec![value]),
        };
    }
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        documents.push(Value::deserialize(document).map_err(|e| unsplittable(e.to_string()))?);
    }
    Ok(documents)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::record::decode_as;
    use crate::record::{Key, RecordKind as _};

    fn pod(labels: &[(&str, &str)], ips: &[&str]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("xwing".to_owned()),
                namespace: Some("default".to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".to_owned()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".to_owned()),
                pod_ips: Some(
                    ips.iter()
                        .map(|ip| PodIP {
                            ip: (*ip).to_owned(),
                        })
                        .collect(),
                ),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn pods_become_endpoints_with_their_labels_and_no_interface() {
        let team = BTreeMap::from([("team".to_owned(), "rebels".to_owned())]);
        let (key, value) = endpoint_record(
            &pod(
                &[("org", "alliance"), ("class", "xwing")],
                &["10.244.3.5", "fd00::5"],
            ),
            Some(&team),
        )
        .expect("an endpoint");
        assert_eq!(key, "endpoints/node-1:default:xwing");
        let key = Key::parse(&key).expect("key");
        let endpoint = decode_as::<Endpoint>(&key, &value.expect("valid")).expect("decodes");
        assert_eq!(endpoint.interface, "");
        assert_eq!(endpoint.ips.len(), 2);
        assert_eq!(
            endpoint.security_labels().to_string(),
            "k8s:class=xwing,k8s:io.cilium.k8s.namespace.labels.team=rebels,\
             k8s:io.kubernetes.pod.namespace=default,k8s:org=alliance"
        );
        let by_pod = Labels::for_pod(
            "default",
            &BTreeMap::from([
                ("org".to_owned(), "alliance".to_owned()),
                ("class".to_owned(), "xwing".to_owned()),
            ]),
            &team,
        );
        assert_eq!(endpoint.security_labels(), by_pod, "as Labels::for_pod");
        assert_eq!(endpoint.key(), key);
    }

    #[test]
    fn pods_that_are_no_endpoints_and_bad_pods() {
        let mut host = pod(&[], &["10.0.0.1"]);
        if let Some(spec) = host.spec.as_mut() {
            spec.host_network = Some(true);
        }
        assert!(endpoint_record(&host, None).is_none());
        assert!(endpoint_record(&pod(&[], &[]), None).is_none());
        let mut done = pod(&[], &["10.244.3.5"]);
        if let Some(status) = done.status.as_mut() {
            status.phase = Some("Succeeded".to_owned());
        }
        assert!(endpoint_record(&done, None).is_none());
        let mut pending = pod(&[], &["10.244.3.5"]);
        pending.spec = Some(PodSpec::default());
        assert!(endpoint_record(&pending, None).is_none());

        let (_, bad) = endpoint_record(&pod(&[], &["not-an-ip"]), None).expect("reported");
        let problem = bad.expect_err("invalid");
        assert!(
            problem.to_string().contains("Pod default/xwing"),
            "{problem}"
        );
        let many: Vec<(String, String)> = (0..=crate::MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (_, bad) = endpoint_record(&pod(&many, &["10.244.3.5"]), None).expect("reported");
        assert!(matches!(
            bad,
            Err(RecordProblem::Field {
                field: "labels",
                ..
            })
        ));
    }

    #[test]
    fn policy_names_read_back() {
        for (source, namespace, name) in [
            (PolicySource::Nodeseal, Some("default"), "rule1.v2"),
            (PolicySource::NodesealClusterwide, None, "all.nodes"),
            (PolicySource::Kubernetes, Some("kube-system"), "deny"),
        ] {
            let record = policy_record_name(source, namespace, name);
            assert_eq!(
                policy_object_of(&record),
                Some((source, namespace.map(str::to_owned), name.to_owned())),
                "{record}"
            );
        }
        assert_eq!(
            policy_record_name(PolicySource::Kubernetes, Some("a"), "b"),
            "knp.a.b"
        );
        assert!(policy_object_of("rule1").is_none());
        assert!(policy_object_of("nnp.only-namespace").is_none());
    }

    #[test]
    fn cilium_documents_apply_as_nodeseal_objects() {
        let input = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  \
                     name: rule1\n  uid: x\nspec:\n  endpointSelector:\n    matchLabels:\n      \
                     org: empire\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                     metadata: {name: deny, namespace: prod}\nspec:\n  podSelector: {}\n";
        let objects = policy_objects(input.as_bytes()).expect("applies");
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].source, PolicySource::Nodeseal);
        assert_eq!(objects[0].record_name(), "nnp.default.rule1");
        assert_eq!(objects[0].object["kind"], "NodesealNetworkPolicy");
        assert_eq!(objects[0].object["metadata"]["namespace"], "default");
        assert!(objects[0].object["metadata"].get("uid").is_none());
        assert_eq!(objects[1].record_name(), "knp.prod.deny");
        let refused = policy_objects(b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n");
        assert!(refused.is_err());
    }
}
