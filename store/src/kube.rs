//! The Kubernetes backend: the cluster's own objects are the store.
//!
//! Which object holds which record, and who may write it, is in [`objects`]. What matters for
//! security: a node record's IPs and pod CIDRs come from the Node object, written by the
//! cluster, never from the agent; the agent's NodesealNode contributes only its handshake port
//! and WireGuard key, and its SPIFFE ID must be the one its name implies. A Node that lacks an
//! InternalIP or a pod CIDR yields an invalid record naming the missing field, so peers report
//! it and skip that node.
//!
//! Every Node object is a node record, whether its agent has published a NodesealNode or not
//! (then with the default handshake port): a node without an agent is a peer that never
//! answers, whose pods' plaintext strict mode drops. Deleting a node record withdraws only the
//! agent's NodesealNode.
//!
//! There are no leases: a node leaves the fabric when its Node is deleted, which is how
//! Kubernetes says a node is gone.
//!
//! The watch runs one `kube-runtime` watcher per object type (Node, NodesealNode, ConfigMaps
//! labelled [`objects::KIND_LABEL`]), each resuming from its last resourceVersion, re-listing
//! after a `410 Gone` and backing off exponentially while the apiserver is unreachable.
//! The records it reports are recomputed only for the objects an event
//! touched, and sent only when they changed, so an apiserver restart or a re-list changes
//! nothing downstream unless the cluster changed.

pub mod objects;
pub mod workloads;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::{BoxStream, select_all};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource as _, ResourceExt as _};
use tracing::{debug, warn};

use self::objects::{
    KIND_LABEL, NodesealNode, NodesealNodeStatus, compose_node_record, config_map_for,
    config_map_name, config_map_record, in_config_map, published_spec,
};
use self::workloads::{
    Derived, PodView, PolicyObject, PolicySource, endpoint_record, policy_object_of, policy_record,
};
use crate::backend::{LeaseId, RawEvent, StoreBackend};
use crate::error::{BoxError, RecordError, RecordProblem, StoreError};
use crate::record::{Key, Kind, NodeRecord};
use crate::types::NodeName;

const BACKEND: &str = "kubernetes";

/// How to reach the apiserver and where nodeseal's namespaced objects live.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// A kubeconfig file; `None`: the in-cluster service account, else `$KUBECONFIG` or
    /// `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of nodeseal's ConfigMaps (the Helm release's).
    pub namespace: String,
    /// The trust domain: a node's SPIFFE ID is `spiffe://<trust domain>/node/<name>`.
    pub trust_domain: String,
}

/// The Kubernetes backend. Cheap to clone.
#[derive(Clone)]
pub struct KubeStore {
    client: Client,
    namespace: String,
    trust_domain: String,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("namespace", &self.namespace)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn backend_error(op: &'static str, subject: &str, error: kube::Error) -> StoreError {
    let transient = match &error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        // Connection refused, TLS or HTTP failures, timeouts: the apiserver may come back.
        _ => true,
    };
    StoreError::Backend {
        backend: BACKEND,
        op,
        subject: subject.to_owned(),
        transient,
        source: Box::new(error) as BoxError,
    }
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

fn unusable(key: &str, problem: RecordProblem) -> StoreError {
    StoreError::Invalid(RecordError {
        key: key.to_owned(),
        problem,
    })
}

/// Why a record of a kind derived from cluster objects cannot be written as a record.
fn derived_only(kind: Kind) -> StoreError {
    StoreError::Config {
        reason: if kind == Kind::Endpoint {
            "endpoints come from Pod objects in Kubernetes mode; they cannot be written".to_owned()
        } else {
            "policies come from NodesealNetworkPolicy, NodesealClusterwideNetworkPolicy and \
             NetworkPolicy objects in Kubernetes mode: `nodeseal policy apply -f` creates them"
                .to_owned()
        },
    }
}

fn unsupported(kind: Kind) -> StoreError {
    StoreError::Config {
        reason: format!(
            "{kind} records are not kept in the Kubernetes backend: certificates go through \
             certificates.k8s.io CertificateSigningRequests"
        ),
    }
}

impl KubeStore {
    /// Connects with the given kubeconfig (or the in-cluster / default configuration) and checks
    /// that the apiserver answers.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] if the configuration cannot be read; a transient backend error if
    /// the apiserver does not answer.
    pub async fn connect(options: KubeOptions) -> Result<Self, StoreError> {
        let config = match &options.kubeconfig {
            Some(path) => {
                let kubeconfig =
                    kube::config::Kubeconfig::read_from(path).map_err(|e| StoreError::Config {
                        reason: format!("kubeconfig {}: {e}", path.display()),
                    })?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|e| StoreError::Config {
                        reason: format!("kubeconfig {}: {e}", path.display()),
                    })?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| StoreError::Config {
                    reason: format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}"),
                })?,
        };
        let client = Client::try_from(config).map_err(|e| StoreError::Config {
            reason: format!("Kubernetes client: {e}"),
        })?;
        client
            .apiserver_version()
            .await
            .map_err(|e| backend_error("connect", "", e))?;
        Ok(Self::from_client(
            client,
            options.namespace,
            options.trust_domain,
        ))
    }

    /// Wraps an existing client.
    pub fn from_client(client: Client, namespace: String, trust_domain: String) -> Self {
        Self {
            client,
            namespace,
            trust_domain,
        }
    }

    /// The client (the agent and keymgr use it for CertificateSigningRequests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn published(&self) -> Api<NodesealNode> {
        Api::all(self.client.clone())
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::all(self.client.clone())
    }

    fn namespaces(&self) -> Api<Namespace> {
        Api::all(self.client.clone())
    }

    /// Every object of a policy source, in all namespaces.
    fn policies(&self, source: PolicySource) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &source.api_resource())
    }

    /// Objects of a policy source in one namespace (or cluster-scoped ones).
    fn policies_in(&self, source: PolicySource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(namespace) => {
                Api::namespaced_with(self.client.clone(), namespace, &source.api_resource())
            }
            None => Api::all_with(self.client.clone(), &source.api_resource()),
        }
    }

    /// The endpoint record `key` names, from its Pod.
    async fn get_endpoint(&self, key: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut parts = id.split(':');
        let (Some(_node), Some(namespace), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Ok(None);
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| backend_error("get", key, e))?;
        let Some(pod) = pod else { return Ok(None) };
        let labels = self
            .namespaces()
            .get_opt(namespace)
            .await
            .map_err(|e| backend_error("get", key, e))?
            .and_then(|ns| ns.metadata.labels);
        derived_value(key, endpoint_record(&pod, labels.as_ref()))
    }

    /// The policy document record `key` names, from its object.
    async fn get_policy(&self, key: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((source, namespace, name)) = policy_object_of(id) else {
            return Ok(None);
        };
        let object = match self
            .policies_in(source, namespace.as_deref())
            .get_opt(&name)
            .await
        {
            Ok(object) => object,
            // The CRD is not installed: no object of that kind.
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(backend_error("get", key, e)),
        };
        derived_value(key, object.map(|o| policy_record(source, &o)))
    }

    /// Creates or updates the objects a policy document (YAML stream or JSON, the same input
    /// as `nodeseal policy apply -f`) becomes: CiliumNetworkPolicy and NodesealNetworkPolicy
    /// documents as NodesealNetworkPolicy objects, the cluster-wide kinds as
    /// NodesealClusterwideNetworkPolicy, NetworkPolicy as NetworkPolicy. Server-side apply
    /// with field manager `nodeseal`. Returns what was applied, in document order.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] if nodeseal-policy refuses the document (nothing is written);
    /// the apiserver's errors.
    pub async fn apply_policies(&self, input: &[u8]) -> Result<Vec<PolicyObject>, StoreError> {
        let objects = workloads::policy_objects(input).map_err(|e| StoreError::Config {
            reason: crate::record::error_chain(&e),
        })?;
        let params = PatchParams::apply("nodeseal").force();
        for object in &objects {
            let api = self.policies_in(object.source, object.namespace.as_deref());
            api.patch(&object.name, &params, &Patch::Apply(&object.object))
                .await
                .map_err(|e| backend_error("apply", &object.record_name(), e))?;
        }
        Ok(objects)
    }

    fn node_value(
        &self,
        key: &str,
        node: Option<&Node>,
        published: Option<&NodesealNode>,
    ) -> Option<Result<Vec<u8>, StoreError>> {
        let node = node?;
        Some(
            compose_node_record(&self.trust_domain, node, published)
                .map_err(|problem| unusable(key, problem))
                .and_then(|record| encode(key, &record)),
        )
    }

    async fn get_node(&self, key: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let published = self
            .published()
            .get_opt(name)
            .await
            .map_err(|e| backend_error("get", key, e))?;
        let node = self
            .nodes()
            .get_opt(name)
            .await
            .map_err(|e| backend_error("get", key, e))?;
        self.node_value(key, node.as_ref(), published.as_ref())
            .transpose()
    }

    /// Creates or replaces the agent's NodesealNode from its node record. `expected`: the
    /// published object must still be the one `expected_rv` names (compare-and-swap).
    async fn put_node(
        &self,
        key: &str,
        value: &[u8],
        current: Option<NodesealNode>,
    ) -> Result<bool, StoreError> {
        let record: NodeRecord = serde_json::from_slice(value).map_err(|e| {
            unusable(
                key,
                RecordProblem::Json {
                    reason: e.to_string(),
                },
            )
        })?;
        let name = record.name.as_str();
        let spec = published_spec(&record);
        match current {
            Some(mut existing) => {
                if existing.spec == spec {
                    return Ok(true);
                }
                existing.spec = spec;
                match self
                    .published()
                    .replace(name, &PostParams::default(), &existing)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if is_conflict(&e) => Ok(false),
                    Err(e) => Err(backend_error("put", key, e)),
                }
            }
            None => {
                // Owned by the Node: deleting the Node deletes what its agent published.
                let node = self
                    .nodes()
                    .get_opt(name)
                    .await
                    .map_err(|e| backend_error("put", key, e))?
                    .ok_or_else(|| StoreError::Config {
                        reason: format!(
                            "there is no Node object {name}: in Kubernetes mode a node joins \
                             once the cluster has registered it"
                        ),
                    })?;
                let mut object = NodesealNode {
                    spec,
                    ..NodesealNode::default()
                };
                object.metadata.name = Some(name.to_owned());
                object.metadata.owner_references = node.controller_owner_ref(&()).map(|owner| {
                    vec![OwnerReference {
                        controller: None,
                        block_owner_deletion: None,
                        ..owner
                    }]
                });
                match self
                    .published()
                    .create(&PostParams::default(), &object)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if is_conflict(&e) => Ok(false),
                    Err(e) => Err(backend_error("put", key, e)),
                }
            }
        }
    }

    async fn get_config_map(&self, key: &Key) -> Result<Option<ConfigMap>, StoreError> {
        self.config_maps()
            .get_opt(&config_map_name(key))
            .await
            .map_err(|e| backend_error("get", &key.to_string(), e))
    }

    /// Writes a ConfigMap-backed record; with `current` it must still be that object.
    async fn put_config_map(
        &self,
        key: &Key,
        value: &[u8],
        current: Option<ConfigMap>,
    ) -> Result<bool, StoreError> {
        let mut object = config_map_for(key, &self.namespace, value);
        let result = match current {
            Some(existing) => {
                object.metadata.resource_version = existing.metadata.resource_version;
                self.config_maps()
                    .replace(&config_map_name(key), &PostParams::default(), &object)
                    .await
            }
            None => {
                self.config_maps()
                    .create(&PostParams::default(), &object)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(backend_error("put", &key.to_string(), e)),
        }
    }

    async fn put_status(
        &self,
        name: &str,
        value: &[u8],
        current: Option<NodesealNode>,
    ) -> Result<bool, StoreError> {
        let summary: serde_json::Value =
            serde_json::from_slice(value).map_err(|e| StoreError::Config {
                reason: format!("node status is not JSON: {e}"),
            })?;
        let Some(mut object) = current else {
            return Err(StoreError::Config {
                reason: format!(
                    "NodesealNode {name} does not exist: the node record is published first"
                ),
            });
        };
        object.status = Some(NodesealNodeStatus {
            summary: Some(summary),
        });
        match self
            .published()
            .replace_status(name, &PostParams::default(), &object)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(backend_error("put", name, e)),
        }
    }
}

fn encode(key: &str, record: &NodeRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec_pretty(record).map_err(|e| {
        unusable(
            key,
            RecordProblem::Json {
                reason: e.to_string(),
            },
        )
    })
}

fn status_value(object: &NodesealNode) -> Option<Vec<u8>> {
    let summary = object.status.as_ref()?.summary.as_ref()?;
    serde_json::to_vec_pretty(summary).ok()
}

/// The value of a derived record if it is the one `key` names: `None` when there is none (or
/// the object makes another key), the problem when it is unusable.
fn derived_value(key: &str, derived: Option<Derived>) -> Result<Option<Vec<u8>>, StoreError> {
    match derived {
        Some((derived_key, value)) if derived_key == key => {
            value.map(Some).map_err(|problem| unusable(key, problem))
        }
        _ => Ok(None),
    }
}

fn parse_key(key: &str) -> Result<Key, StoreError> {
    Key::parse(key).map_err(|problem| unusable(key, problem))
}

fn node_name(key: &Key) -> Result<&NodeName, StoreError> {
    key.node().ok_or_else(|| StoreError::Config {
        reason: format!("{key} names no node"),
    })
}

#[async_trait::async_trait]
impl StoreBackend for KubeStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let parsed = parse_key(key)?;
        match parsed.kind() {
            Kind::Node => self.get_node(key, node_name(&parsed)?.as_str()).await,
            Kind::NodeStatus => Ok(self
                .published()
                .get_opt(node_name(&parsed)?.as_str())
                .await
                .map_err(|e| backend_error("get", key, e))?
                .as_ref()
                .and_then(status_value)),
            Kind::Endpoint => {
                let id = key.split_once('/').map_or("", |(_, id)| id);
                self.get_endpoint(key, id).await
            }
            Kind::PolicyDocument => {
                let id = key.split_once('/').map_or("", |(_, id)| id);
                self.get_policy(key, id).await
            }
            kind if in_config_map(kind) => Ok(self
                .get_config_map(&parsed)
                .await?
                .as_ref()
                .and_then(config_map_record)
                .map(|(_, value)| value)),
            // CertificateSigningRequests, not records, in this mode.
            _ => Ok(None),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.as_str() == prefix) else {
            return Ok(Vec::new());
        };
        let mut entries = Vec::new();
        match kind {
            Kind::Node => {
                let published: BTreeMap<String, NodesealNode> = self
                    .published()
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| backend_error("list", prefix, e))?
                    .items
                    .into_iter()
                    .map(|n| (n.name_any(), n))
                    .collect();
                let nodes = self
                    .nodes()
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| backend_error("list", prefix, e))?;
                for node in &nodes.items {
                    let name = node.name_any();
                    let key = format!("{prefix}/{name}");
                    match self.node_value(&key, Some(node), published.get(&name)) {
                        Some(Ok(value)) => entries.push((key, value)),
                        // Listings skip what is unusable; the watch reports it.
                        Some(Err(error)) => warn!(%error, "skipping node"),
                        None => {}
                    }
                }
            }
            Kind::NodeStatus => {
                let published = self
                    .published()
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| backend_error("list", prefix, e))?;
                for object in &published.items {
                    if let Some(value) = status_value(object) {
                        entries.push((format!("{prefix}/{}", object.name_any()), value));
                    }
                }
            }
            Kind::Endpoint => {
                let pods = self
                    .pods()
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| backend_error("list", prefix, e))?;
                let namespaces: BTreeMap<String, BTreeMap<String, String>> = self
                    .namespaces()
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| backend_error("list", prefix, e))?
                    .items
                    .into_iter()
                    .map(|ns| (ns.name_any(), ns.metadata.labels.unwrap_or_default()))
                    .collect();
                let record = |pod: &Pod| {
                    endpoint_record(
                        pod,
                        namespaces.get(pod.metadata.namespace.as_deref().unwrap_or_default()),
                    )
                };
                entries.extend(
                    pods.items
                        .iter()
                        .filter_map(record)
                        .filter_map(|(key, value)| match value {
                            Ok(value) => Some((key, value)),
                            // Listings skip what is unusable; the watch reports it.
                            Err(problem) => {
                                warn!(%key, %problem, "skipping endpoint");
                                None
                            }
                        }),
                );
            }
            Kind::PolicyDocument => {
                for source in PolicySource::ALL {
                    let objects = match self.policies(source).list(&ListParams::default()).await {
                        Ok(objects) => objects.items,
                        Err(e) if is_not_found(&e) => {
                            warn!(kind = source.kind(), "the CRD is not installed");
                            Vec::new()
                        }
                        Err(e) => return Err(backend_error("list", prefix, e)),
                    };
                    for object in &objects {
                        match policy_record(source, object) {
                            (key, Ok(value)) => entries.push((key, value)),
                            (key, Err(problem)) => warn!(%key, %problem, "skipping policy"),
                        }
                    }
                }
            }
            kind if in_config_map(kind) => {
                let listed = self
                    .config_maps()
                    .list(&ListParams::default().labels(&format!("{KIND_LABEL}={prefix}")))
                    .await
                    .map_err(|e| backend_error("list", prefix, e))?;
                entries.extend(listed.items.iter().filter_map(config_map_record));
            }
            _ => {}
        }
        entries.sort();
        Ok(entries)
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        _lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let parsed = parse_key(key)?;
        for _ in 0..16 {
            if self.write(&parsed, key, None, &value).await? {
                return Ok(());
            }
        }
        Err(StoreError::Contended {
            key: key.to_owned(),
            attempts: 16,
        })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let parsed = parse_key(key)?;
        let result = match parsed.kind() {
            Kind::Node => self
                .published()
                .delete(node_name(&parsed)?.as_str(), &DeleteParams::default())
                .await
                .map(|_| ()),
            Kind::NodeStatus => {
                let name = node_name(&parsed)?.as_str();
                let patch = serde_json::json!({ "status": { "summary": null } });
                return match self
                    .published()
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if is_not_found(&e) => Ok(false),
                    Err(e) => Err(backend_error("delete", key, e)),
                };
            }
            Kind::Endpoint => return Err(derived_only(Kind::Endpoint)),
            // Deleting a policy record deletes the object it comes from.
            Kind::PolicyDocument => {
                let id = key.split_once('/').map_or("", |(_, id)| id);
                let Some((source, namespace, name)) = policy_object_of(id) else {
                    return Ok(false);
                };
                self.policies_in(source, namespace.as_deref())
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map(|_| ())
            }
            kind if in_config_map(kind) => self
                .config_maps()
                .delete(&config_map_name(&parsed), &DeleteParams::default())
                .await
                .map(|_| ()),
            kind => return Err(unsupported(kind)),
        };
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(backend_error("delete", key, e)),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let parsed = parse_key(key)?;
        self.write(&parsed, key, Some(expected), &new).await
    }

    async fn grant_lease(&self, _ttl: Duration) -> Result<LeaseId, StoreError> {
        // No leases: a node's liveness is its Node object.
        Ok(LeaseId(0))
    }

    async fn keep_alive(&self, _lease: LeaseId) -> Result<(), StoreError> {
        Ok(())
    }

    async fn revoke_lease(&self, _lease: LeaseId) -> Result<(), StoreError> {
        Ok(())
    }

    fn watch(&self, kinds: &[Kind]) -> BoxStream<'static, RawEvent> {
        watch::run(self.clone(), kinds)
    }
}

impl KubeStore {
    /// One write attempt: `expected` = `Some(value)` makes it a compare-and-swap against the
    /// record's current value. Returns whether it wrote (false: lost to another writer).
    async fn write(
        &self,
        parsed: &Key,
        key: &str,
        expected: Option<Option<&[u8]>>,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        match parsed.kind() {
            Kind::Node | Kind::NodeStatus => {
                let name = node_name(parsed)?.as_str();
                let published = self
                    .published()
                    .get_opt(name)
                    .await
                    .map_err(|e| backend_error("get", key, e))?;
                if let Some(expected) = expected {
                    let current = if parsed.kind() == Kind::Node {
                        self.get_node(key, name).await.ok().flatten()
                    } else {
                        published.as_ref().and_then(status_value)
                    };
                    if current.as_deref() != expected {
                        return Ok(false);
                    }
                }
                if parsed.kind() == Kind::Node {
                    self.put_node(key, value, published).await
                } else {
                    self.put_status(name, value, published).await
                }
            }
            kind @ (Kind::Endpoint | Kind::PolicyDocument) => Err(derived_only(kind)),
            kind if in_config_map(kind) => {
                let current = self.get_config_map(parsed).await?;
                if let Some(expected) = expected {
                    let current_value =
                        current.as_ref().and_then(config_map_record).map(|(_, v)| v);
                    if current_value.as_deref() != expected {
                        return Ok(false);
                    }
                }
                self.put_config_map(parsed, value, current).await
            }
            kind => Err(unsupported(kind)),
        }
    }
}

mod watch {
    //! The merged watch over Nodes, NodesealNodes and record ConfigMaps.

    use super::*;

    /// An event of one of the underlying watchers.
    enum Source {
        Node(Box<Result<watcher::Event<Node>, watcher::Error>>),
        Published(Result<watcher::Event<NodesealNode>, watcher::Error>),
        ConfigMap(Result<watcher::Event<ConfigMap>, watcher::Error>),
        /// Pods or policy objects, already turned into what makes their records.
        Derived(Feed, Result<DerivedEvent, watcher::Error>),
        Namespace(Result<watcher::Event<Namespace>, watcher::Error>),
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Feed {
        Nodes,
        Published,
        ConfigMaps,
        Pods,
        /// Namespace labels, part of every endpoint's labels.
        Namespaces,
        Policies(PolicySource),
    }

    /// What one object contributes: a finished record (policies) or what makes one together
    /// with its namespace's labels (pods).
    enum Item {
        Record(Derived),
        Pod(PodView),
    }

    impl Item {
        fn key(&self) -> &str {
            match self {
                Item::Record((key, _)) => key,
                Item::Pod(view) => view.key(),
            }
        }
    }

    type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

    /// A watcher event of an object that makes at most one record: the object's id
    /// (`namespace/name`) and what makes the record, derived as the event arrives so that the
    /// object itself is not kept.
    enum DerivedEvent {
        Init,
        InitApply(String, Option<Item>),
        InitDone,
        Apply(String, Option<Item>),
        Delete(String),
    }

    fn derive<K: kube::Resource>(
        event: watcher::Event<K>,
        record: impl Fn(&K) -> Option<Item>,
    ) -> DerivedEvent {
        let id = |object: &K| {
            format!(
                "{}/{}",
                object.meta().namespace.as_deref().unwrap_or_default(),
                object.meta().name.as_deref().unwrap_or_default()
            )
        };
        match event {
            watcher::Event::Init => DerivedEvent::Init,
            watcher::Event::InitApply(o) => DerivedEvent::InitApply(id(&o), record(&o)),
            watcher::Event::InitDone => DerivedEvent::InitDone,
            watcher::Event::Apply(o) => DerivedEvent::Apply(id(&o), record(&o)),
            watcher::Event::Delete(o) => DerivedEvent::Delete(id(&o)),
        }
    }

    /// The records one derived feed makes, by object id, and by key.
    #[derive(Default)]
    struct DerivedRecords {
        objects: BTreeMap<String, Item>,
        /// Objects listed since the watcher's `Init`, swapped in at `InitDone`.
        relisting: Option<BTreeMap<String, Item>>,
        by_key: BTreeMap<String, String>,
    }

    impl DerivedRecords {
        /// Applies an event; returns whether a listing just completed.
        fn apply(&mut self, event: DerivedEvent, touched: &mut BTreeSet<String>) -> bool {
            match event {
                DerivedEvent::Init => self.relisting = Some(BTreeMap::new()),
                DerivedEvent::InitApply(id, record) => {
                    if let (Some(list), Some(record)) = (&mut self.relisting, record) {
                        list.insert(id, record);
                    }
                }
                DerivedEvent::InitDone => {
                    let list = self.relisting.take().unwrap_or_default();
                    touched.extend(
                        self.objects
                            .values()
                            .chain(list.values())
                            .map(|item| item.key().to_owned()),
                    );
                    self.by_key = list
                        .iter()
                        .map(|(id, item)| (item.key().to_owned(), id.clone()))
                        .collect();
                    self.objects = list;
                    return true;
                }
                DerivedEvent::Apply(id, record) => {
                    self.remove(&id, touched);
                    if let Some(item) = record {
                        touched.insert(item.key().to_owned());
                        self.by_key.insert(item.key().to_owned(), id.clone());
                        self.objects.insert(id, item);
                    }
                }
                DerivedEvent::Delete(id) => self.remove(&id, touched),
            }
            false
        }

        fn remove(&mut self, id: &str, touched: &mut BTreeSet<String>) {
            if let Some(item) = self.objects.remove(id) {
                let key = item.key().to_owned();
                if self.by_key.get(&key).is_some_and(|owner| owner == id) {
                    self.by_key.remove(&key);
                }
                touched.insert(key);
            }
        }

        fn value(
            &self,
            key: &str,
            namespaces: &NamespaceLabels,
        ) -> Option<Result<Vec<u8>, RecordProblem>> {
            let id = self.by_key.get(key)?;
            match self.objects.get(id)? {
                Item::Record((_, value)) => Some(value.clone()),
                Item::Pod(view) => Some(view.record(namespaces.get(view.namespace()))),
            }
        }

        /// The keys of the objects in `namespace` (ids are `namespace/name`).
        fn keys_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = String> + 'a {
            let prefix = format!("{namespace}/");
            self.objects
                .range(prefix.clone()..)
                .take_while(move |(id, _)| id.starts_with(&prefix))
                .map(|(_, item)| item.key().to_owned())
        }
    }

    /// The objects seen so far, the records they make, and each watcher's progress.
    struct State {
        store: KubeStore,
        kinds: Vec<Kind>,
        nodes: BTreeMap<String, Node>,
        published: BTreeMap<String, NodesealNode>,
        config_maps: BTreeMap<String, (String, Vec<u8>)>,
        /// Endpoints (from Pods) and policy documents (from policy objects), by feed.
        derived: BTreeMap<Feed, DerivedRecords>,
        namespaces: NamespaceLabels,
        /// Objects listed since a watcher's `Init`, swapped in at `InitDone`.
        relisting: Relisting,
        /// What was last reported per key: a value, or the problem that makes it unusable.
        reported: BTreeMap<String, Result<Vec<u8>, RecordProblem>>,
        /// Feeds that have completed a first listing.
        ready: BTreeSet<Feed>,
        feeds: BTreeSet<Feed>,
        /// Whether an error was reported and no resync has followed yet.
        interrupted: bool,
        started: bool,
    }

    #[derive(Default)]
    struct Relisting {
        nodes: Option<BTreeMap<String, Node>>,
        published: Option<BTreeMap<String, NodesealNode>>,
        config_maps: Option<BTreeMap<String, (String, Vec<u8>)>>,
        namespaces: Option<NamespaceLabels>,
    }

    pub(super) fn run(store: KubeStore, kinds: &[Kind]) -> BoxStream<'static, RawEvent> {
        let kinds = kinds.to_vec();
        let wants = |k: Kind| kinds.contains(&k);
        let mut streams: Vec<BoxStream<'static, Source>> = Vec::new();
        let mut feeds = BTreeSet::new();
        if wants(Kind::Node) {
            feeds.insert(Feed::Nodes);
            streams.push(
                watcher(store.nodes(), watcher::Config::default())
                    .default_backoff()
                    .map(|e| Source::Node(Box::new(e)))
                    .boxed(),
            );
        }
        if wants(Kind::Node) || wants(Kind::NodeStatus) {
            feeds.insert(Feed::Published);
            streams.push(
                watcher(store.published(), watcher::Config::default())
                    .default_backoff()
                    .map(Source::Published)
                    .boxed(),
            );
        }
        if kinds.iter().any(|k| in_config_map(*k)) {
            feeds.insert(Feed::ConfigMaps);
            streams.push(
                watcher(
                    store.config_maps(),
                    watcher::Config::default().labels(KIND_LABEL),
                )
                .default_backoff()
                .map(Source::ConfigMap)
                .boxed(),
            );
        }
        if wants(Kind::Endpoint) {
            // Every node's pods, not only this node's: the agent maps remote pod IPs to their
            // identities too.
            feeds.insert(Feed::Pods);
            streams.push(
                watcher(store.pods(), watcher::Config::default())
                    .default_backoff()
                    .map(|r| {
                        Source::Derived(
                            Feed::Pods,
                            r.map(|e| derive(e, |pod| PodView::of(pod).map(Item::Pod))),
                        )
                    })
                    .boxed(),
            );
            feeds.insert(Feed::Namespaces);
            streams.push(
                watcher(store.namespaces(), watcher::Config::default())
                    .default_backoff()
                    .map(Source::Namespace)
                    .boxed(),
            );
        }
        if wants(Kind::PolicyDocument) {
            for source in PolicySource::ALL {
                let feed = Feed::Policies(source);
                feeds.insert(feed);
                streams.push(
                    watcher(store.policies(source), watcher::Config::default())
                        .default_backoff()
                        .map(move |r| {
                            Source::Derived(
                                feed,
                                r.map(|e| {
                                    derive(e, |o| Some(Item::Record(policy_record(source, o))))
                                }),
                            )
                        })
                        .boxed(),
                );
            }
        }
        let derived = feeds
            .iter()
            .filter(|f| matches!(f, Feed::Pods | Feed::Policies(_)))
            .map(|f| (*f, DerivedRecords::default()))
            .collect();
        let mut state = State {
            store,
            kinds,
            nodes: BTreeMap::new(),
            published: BTreeMap::new(),
            config_maps: BTreeMap::new(),
            derived,
            namespaces: BTreeMap::new(),
            relisting: Relisting::default(),
            reported: BTreeMap::new(),
            ready: BTreeSet::new(),
            feeds,
            interrupted: false,
            started: false,
        };
        if streams.is_empty() {
            // Only kinds this backend does not keep: an empty snapshot, then nothing.
            return futures::stream::once(async {
                RawEvent::Snapshot {
                    entries: Vec::new(),
                    resync: false,
                }
            })
            .chain(futures::stream::pending())
            .boxed();
        }
        let mut merged = select_all(streams);
        async_stream::stream! {
            while let Some(source) = merged.next().await {
                for event in state.apply(source) {
                    yield event;
                }
            }
        }
        .boxed()
    }

    impl State {
        fn apply(&mut self, source: Source) -> Vec<RawEvent> {
            let mut touched = BTreeSet::new();
            let (feed, result) = match source {
                Source::Node(r) => (Feed::Nodes, (*r).map(|e| self.on_node(e, &mut touched))),
                Source::Published(r) => (
                    Feed::Published,
                    r.map(|e| self.on_published(e, &mut touched)),
                ),
                Source::ConfigMap(r) => (
                    Feed::ConfigMaps,
                    r.map(|e| self.on_config_map(e, &mut touched)),
                ),
                Source::Derived(feed, r) => {
                    let records = self.derived.entry(feed).or_default();
                    (feed, r.map(|e| records.apply(e, &mut touched)))
                }
                Source::Namespace(r) => (
                    Feed::Namespaces,
                    r.map(|e| self.on_namespace(e, &mut touched)),
                ),
            };
            let mut out = Vec::new();
            match result {
                Err(error) if is_missing_crd(feed, &error) => {
                    // A cluster upgraded without the policy CRDs (Helm never upgrades CRDs):
                    // that kind has no objects, and the other feeds must not wait for it.
                    if self.ready.insert(feed) {
                        warn!(?feed, %error, "policy CRD not installed; no policies of that kind");
                    }
                    if !self.started && self.ready == self.feeds {
                        self.started = true;
                        self.recompute_all();
                        out.extend(self.snapshot(false));
                    }
                    return out;
                }
                Err(error) => {
                    if !self.interrupted && self.started {
                        self.interrupted = true;
                        out.push(RawEvent::Interrupted(StoreError::Backend {
                            backend: BACKEND,
                            op: "watch",
                            subject: String::new(),
                            transient: true,
                            source: Box::new(error) as BoxError,
                        }));
                    } else {
                        debug!(%error, "Kubernetes watch still failing");
                    }
                    return out;
                }
                Ok(listing_done) => {
                    if listing_done {
                        self.ready.insert(feed);
                    }
                }
            }
            if !self.started {
                if self.ready != self.feeds {
                    return out;
                }
                self.started = true;
                self.recompute_all();
                out.extend(self.snapshot(false));
                return out;
            }
            let changes = self.recompute(&touched);
            if self.interrupted {
                // The watchers are back: the whole view, as the store's contract asks.
                self.interrupted = false;
                out.extend(self.snapshot(true));
            } else {
                out.extend(changes);
            }
            out
        }

        /// Applies a Node event; returns whether a listing just completed.
        fn on_node(&mut self, event: watcher::Event<Node>, touched: &mut BTreeSet<String>) -> bool {
            match event {
                watcher::Event::Init => self.relisting.nodes = Some(BTreeMap::new()),
                watcher::Event::InitApply(node) => {
                    if let Some(list) = &mut self.relisting.nodes {
                        list.insert(node.name_any(), node);
                    }
                }
                watcher::Event::InitDone => {
                    let list = self.relisting.nodes.take().unwrap_or_default();
                    touched.extend(self.nodes.keys().chain(list.keys()).map(|n| node_key(n)));
                    self.nodes = list;
                    return true;
                }
                watcher::Event::Apply(node) => {
                    touched.insert(node_key(&node.name_any()));
                    self.nodes.insert(node.name_any(), node);
                }
                watcher::Event::Delete(node) => {
                    touched.insert(node_key(&node.name_any()));
                    self.nodes.remove(&node.name_any());
                }
            }
            false
        }

        fn on_published(
            &mut self,
            event: watcher::Event<NodesealNode>,
            touched: &mut BTreeSet<String>,
        ) -> bool {
            let mut touch = |name: &str| {
                touched.insert(node_key(name));
                touched.insert(format!("{}/{name}", Kind::NodeStatus.as_str()));
            };
            match event {
                watcher::Event::Init => self.relisting.published = Some(BTreeMap::new()),
                watcher::Event::InitApply(object) => {
                    if let Some(list) = &mut self.relisting.published {
                        list.insert(object.name_any(), object);
                    }
                }
                watcher::Event::InitDone => {
                    let list = self.relisting.published.take().unwrap_or_default();
                    for name in self.published.keys().chain(list.keys()) {
                        touch(name);
                    }
                    self.published = list;
                    return true;
                }
                watcher::Event::Apply(object) => {
                    touch(&object.name_any());
                    self.published.insert(object.name_any(), object);
                }
                watcher::Event::Delete(object) => {
                    touch(&object.name_any());
                    self.published.remove(&object.name_any());
                }
            }
            false
        }

        fn on_config_map(
            &mut self,
            event: watcher::Event<ConfigMap>,
            touched: &mut BTreeSet<String>,
        ) -> bool {
            match event {
                watcher::Event::Init => self.relisting.config_maps = Some(BTreeMap::new()),
                watcher::Event::InitApply(cm) => {
                    if let (Some(list), Some(record)) =
                        (&mut self.relisting.config_maps, config_map_record(&cm))
                    {
                        list.insert(cm.name_any(), record);
                    }
                }
                watcher::Event::InitDone => {
                    let list = self.relisting.config_maps.take().unwrap_or_default();
                    touched.extend(
                        self.config_maps
                            .values()
                            .chain(list.values())
                            .map(|(key, _)| key.clone()),
                    );
                    self.config_maps = list;
                    return true;
                }
                watcher::Event::Apply(cm) => {
                    if let Some((old_key, _)) = self.config_maps.remove(&cm.name_any()) {
                        touched.insert(old_key);
                    }
                    if let Some(record) = config_map_record(&cm) {
                        touched.insert(record.0.clone());
                        self.config_maps.insert(cm.name_any(), record);
                    }
                }
                watcher::Event::Delete(cm) => {
                    if let Some((old_key, _)) = self.config_maps.remove(&cm.name_any()) {
                        touched.insert(old_key);
                    }
                }
            }
            false
        }

        /// Applies a Namespace event: the endpoints of a namespace whose labels changed are
        /// touched. Returns whether a listing just completed.
        fn on_namespace(
            &mut self,
            event: watcher::Event<Namespace>,
            touched: &mut BTreeSet<String>,
        ) -> bool {
            let labels_of = |ns: &Namespace| ns.metadata.labels.clone().unwrap_or_default();
            let mut changed: BTreeSet<String> = BTreeSet::new();
            let mut done = false;
            match event {
                watcher::Event::Init => self.relisting.namespaces = Some(BTreeMap::new()),
                watcher::Event::InitApply(ns) => {
                    if let Some(list) = &mut self.relisting.namespaces {
                        list.insert(ns.name_any(), labels_of(&ns));
                    }
                }
                watcher::Event::InitDone => {
                    let list = self.relisting.namespaces.take().unwrap_or_default();
                    for name in self.namespaces.keys().chain(list.keys()) {
                        if self.namespaces.get(name) != list.get(name) {
                            changed.insert(name.clone());
                        }
                    }
                    self.namespaces = list;
                    done = true;
                }
                watcher::Event::Apply(ns) => {
                    let labels = labels_of(&ns);
                    if self.namespaces.get(&ns.name_any()) != Some(&labels) {
                        changed.insert(ns.name_any());
                    }
                    self.namespaces.insert(ns.name_any(), labels);
                }
                watcher::Event::Delete(ns) => {
                    if self.namespaces.remove(&ns.name_any()).is_some() {
                        changed.insert(ns.name_any());
                    }
                }
            }
            if let Some(pods) = self.derived.get(&Feed::Pods) {
                for namespace in &changed {
                    touched.extend(pods.keys_in(namespace));
                }
            }
            done
        }

        /// The current record (or problem) under `key`, if any.
        fn value_of(&self, key: &str) -> Option<Result<Vec<u8>, RecordProblem>> {
            let (prefix, id) = key.split_once('/')?;
            let kind = Kind::ALL.into_iter().find(|k| k.as_str() == prefix)?;
            if !self.kinds.contains(&kind) {
                return None;
            }
            match kind {
                Kind::Node => {
                    let value =
                        self.store
                            .node_value(key, self.nodes.get(id), self.published.get(id))?;
                    Some(value.map_err(|error| match error {
                        StoreError::Invalid(e) => e.problem,
                        other => RecordProblem::Json {
                            reason: other.to_string(),
                        },
                    }))
                }
                Kind::NodeStatus => self.published.get(id).and_then(status_value).map(Ok),
                Kind::Endpoint | Kind::PolicyDocument => self
                    .derived
                    .values()
                    .find_map(|d| d.value(key, &self.namespaces)),
                _ => self
                    .config_maps
                    .values()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| Ok(v.clone())),
            }
        }

        fn recompute_all(&mut self) {
            let mut keys: BTreeSet<String> = self.nodes.keys().map(|n| node_key(n)).collect();
            for name in self.published.keys() {
                keys.insert(node_key(name));
                keys.insert(format!("{}/{name}", Kind::NodeStatus.as_str()));
            }
            keys.extend(self.config_maps.values().map(|(k, _)| k.clone()));
            for records in self.derived.values() {
                keys.extend(records.by_key.keys().cloned());
            }
            self.reported.clear();
            for key in keys {
                if let Some(value) = self.value_of(&key) {
                    self.reported.insert(key, value);
                }
            }
        }

        /// Recomputes the touched keys; returns the events for those that changed.
        fn recompute(&mut self, touched: &BTreeSet<String>) -> Vec<RawEvent> {
            let mut out = Vec::new();
            for key in touched {
                let now = self.value_of(key);
                if now.as_ref() == self.reported.get(key) {
                    continue;
                }
                match now {
                    None => {
                        self.reported.remove(key);
                        out.push(RawEvent::Delete(key.clone()));
                    }
                    Some(Ok(value)) => {
                        self.reported.insert(key.clone(), Ok(value.clone()));
                        out.push(RawEvent::Put(key.clone(), value));
                    }
                    Some(Err(problem)) => {
                        self.reported.insert(key.clone(), Err(problem.clone()));
                        out.push(RawEvent::Unusable(RecordError {
                            key: key.clone(),
                            problem,
                        }));
                    }
                }
            }
            out
        }

        /// The whole view: a snapshot of the usable records, then one event per unusable one.
        fn snapshot(&self, resync: bool) -> Vec<RawEvent> {
            let mut entries = Vec::new();
            let mut unusable = Vec::new();
            for (key, value) in &self.reported {
                match value {
                    Ok(value) => entries.push((key.clone(), value.clone())),
                    Err(problem) => unusable.push(RawEvent::Unusable(RecordError {
                        key: key.clone(),
                        problem: problem.clone(),
                    })),
                }
            }
            let mut events = vec![RawEvent::Snapshot { entries, resync }];
            events.extend(unusable);
            events
        }
    }

    /// Whether a policy feed failed because its CRD is not served (404 on the list).
    fn is_missing_crd(feed: Feed, error: &watcher::Error) -> bool {
        matches!(
            feed,
            Feed::Policies(PolicySource::Nodeseal | PolicySource::NodesealClusterwide)
        ) && matches!(
            error,
            watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e)
                if is_not_found(e)
        )
    }

    fn node_key(name: &str) -> String {
        format!("{}/{name}", Kind::Node.as_str())
    }
}
