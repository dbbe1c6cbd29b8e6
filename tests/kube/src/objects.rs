//! Helpers that do what a kubelet, the scheduler or the controller-manager would do in a real
//! cluster, none of which run here: register Nodes, place Pods, mint bound tokens.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, Result};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Container, Namespace, Node, NodeSpec, Pod, PodSpec, ServiceAccount},
};
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::server::KubeApiServer;

/// TokenRequest rejects `expirationSeconds` below ten minutes.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(600);

impl KubeApiServer {
    /// Creates the DaemonSet `name` that agent pods are owned by (no controller runs it: pods
    /// come from [`create_daemon_set_pod`](Self::create_daemon_set_pod)).
    ///
    /// # Errors
    /// Any API error.
    pub async fn create_daemon_set(&self, namespace: &str, name: &str) -> Result<DaemonSet> {
        let api: Api<DaemonSet> = Api::namespaced(self.admin_client(), namespace);
        let ds: DaemonSet = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "namespace": namespace },
            "spec": {
                "selector": { "matchLabels": { "app": name } },
                "template": {
                    "metadata": { "labels": { "app": name } },
                    "spec": { "containers": [{ "name": "agent", "image": "nodeseal.invalid/agent:test" }] },
                },
            },
        }))
        .context("DaemonSet JSON")?;
        api.create(&PostParams::default(), &ds)
            .await
            .with_context(|| format!("creating DaemonSet {namespace}/{name}"))
    }

    /// Creates a pod of `owner` on `node_name` running as `service_account` (what the
    /// DaemonSet controller and the scheduler would do) and returns a kubeconfig whose token is
    /// bound to it (what the kubelet would mount).
    ///
    /// # Errors
    /// Any API error.
    pub async fn create_daemon_set_pod(
        &mut self,
        owner: &DaemonSet,
        name: &str,
        node_name: &str,
        service_account: &str,
    ) -> Result<std::path::PathBuf> {
        let namespace = owner.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.admin_client(), &namespace);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "namespace": namespace,
                "ownerReferences": [{
                    "apiVersion": "apps/v1",
                    "kind": "DaemonSet",
                    "name": owner.metadata.name,
                    "uid": owner.metadata.uid,
                    "controller": true,
                    "blockOwnerDeletion": true,
                }],
            },
            "spec": {
                "nodeName": node_name,
                "serviceAccountName": service_account,
                "automountServiceAccountToken": false,
                "containers": [{ "name": "agent", "image": "nodeseal.invalid/agent:test" }],
            },
        }))
        .context("Pod JSON")?;
        let created = api
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating Pod {namespace}/{name}"))?;
        let uid = created.metadata.uid.context("pod uid")?;
        let token = self
            .pod_bound_token(
                &namespace,
                service_account,
                name,
                &uid,
                crate::API_AUDIENCE,
                Duration::from_secs(3600),
            )
            .await?;
        self.kubeconfig_for_token(&token)
    }

    /// Creates a Namespace (no-op if it exists).
    ///
    /// # Errors
    /// Any API error other than AlreadyExists.
    pub async fn create_namespace(&self, name: &str) -> Result<Namespace> {
        let api: Api<Namespace> = Api::all(self.admin_client());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        create_or_get(&api, name, &ns).await
    }

    /// Creates a ServiceAccount (no-op if it exists). No controller-manager runs here, so not
    /// even `default` ServiceAccounts appear by themselves.
    ///
    /// # Errors
    /// Any API error other than AlreadyExists.
    pub async fn create_service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<ServiceAccount> {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin_client(), namespace);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        create_or_get(&api, name, &sa).await
    }

    /// Registers a Node as a kubelet would; see [`register_node`].
    ///
    /// # Errors
    /// Any API error.
    pub async fn create_node(
        &self,
        name: &str,
        internal_ip: IpAddr,
        pod_cidrs: &[&str],
    ) -> Result<Node> {
        register_node(&self.admin_client(), name, internal_ip, pod_cidrs).await
    }

    /// Creates a Pod already bound to `node_name` (`spec.nodeName`), running as
    /// `service_account`. No kubelet runs it; it exists so tokens can be bound to it.
    ///
    /// # Errors
    /// Any API error (for example a missing namespace or ServiceAccount).
    pub async fn create_agent_pod(
        &self,
        namespace: &str,
        name: &str,
        node_name: &str,
        service_account: &str,
    ) -> Result<Pod> {
        let api: Api<Pod> = Api::namespaced(self.admin_client(), namespace);
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("app.kubernetes.io/name".to_string(), name.to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node_name.into()),
                service_account_name: Some(service_account.into()),
                // Tokens come from pod_bound_token; a projected volume would add nothing.
                automount_service_account_token: Some(false),
                containers: vec![Container {
                    name: "agent".into(),
                    image: Some("nodeseal.invalid/agent:test".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        api.create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating Pod {namespace}/{name} on {node_name}"))
    }

    /// Creates a workload Pod bound to `node_name` with `labels`, as the scheduler would, then
    /// writes `status.podIPs` (and phase Running) through the status subresource, as the
    /// kubelet would; `ips` empty leaves the status unwritten (a pod not started yet). Creates
    /// the namespace's `default` ServiceAccount first (no controller-manager does here).
    ///
    /// # Errors
    /// Any API error.
    pub async fn create_workload_pod(
        &self,
        namespace: &str,
        name: &str,
        node_name: &str,
        labels: &[(&str, &str)],
        ips: &[&str],
        host_network: bool,
    ) -> Result<Pod> {
        self.create_service_account(namespace, "default").await?;
        let api: Api<Pod> = Api::namespaced(self.admin_client(), namespace);
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node_name.into()),
                host_network: Some(host_network),
                automount_service_account_token: Some(false),
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("nodeseal.invalid/app:test".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = api
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating Pod {namespace}/{name} on {node_name}"))?;
        if ips.is_empty() {
            return Ok(created);
        }
        let pod_ips: Vec<serde_json::Value> = ips
            .iter()
            .map(|ip| serde_json::json!({ "ip": ip }))
            .collect();
        let status = serde_json::json!({
            "status": { "phase": "Running", "podIP": ips[0], "podIPs": pod_ips }
        });
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("writing the status of Pod {namespace}/{name}"))
    }

    /// Mints a token for `service_account` bound to the Pod `pod_name`/`pod_uid` through the
    /// TokenRequest API, as the kubelet does for a projected token volume. The apiserver embeds
    /// the pod's `spec.nodeName` (and the Node's uid, if the Node exists), which surface as
    /// `authentication.kubernetes.io/{pod-name,pod-uid,node-name,node-uid}` user extras.
    ///
    /// `audience` must be [`crate::API_AUDIENCE`] for the token to authenticate to this
    /// apiserver; `ttl` is rounded down to seconds and must be at least [`MIN_TOKEN_TTL`].
    ///
    /// # Errors
    /// Any API error (wrong uid, pod not using `service_account`, TTL too short).
    pub async fn pod_bound_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod_name: &str,
        pod_uid: &str,
        audience: &str,
        ttl: Duration,
    ) -> Result<String> {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin_client(), namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.into()]),
                expiration_seconds: Some(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod_name.into()),
                    uid: Some(pod_uid.into()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let response = api
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .with_context(|| {
                format!("TokenRequest for {namespace}/{service_account} bound to pod {pod_name}")
            })?;
        response
            .status
            .and_then(|s| s.token)
            .context("TokenRequest answered without status.token")
    }
}

async fn create_or_get<K>(api: &Api<K>, name: &str, object: &K) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(status)) if status.code == 409 => api
            .get(name)
            .await
            .with_context(|| format!("getting existing {name}")),
        Err(e) => Err(e).with_context(|| format!("creating {name}")),
    }
}

/// Registers a Node as a kubelet would: `spec.podCIDRs` on create, then `status.addresses`
/// (one InternalIP) through the status subresource, since create ignores status.
///
/// # Errors
/// Any API error.
pub async fn register_node(
    client: &kube::Client,
    name: &str,
    internal_ip: IpAddr,
    pod_cidrs: &[&str],
) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidrs.first().map(|c| (*c).to_string()),
            pod_cidrs: Some(pod_cidrs.iter().map(|c| (*c).to_string()).collect()),
            ..Default::default()
        }),
        ..Default::default()
    };
    api.create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating Node {name}"))?;
    let status = serde_json::json!({
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": internal_ip.to_string() },
                { "type": "Hostname", "address": name },
            ],
        }
    });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("setting status.addresses of Node {name}"))
}
