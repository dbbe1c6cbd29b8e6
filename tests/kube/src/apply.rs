//! Applying manifests (the chart's CRDs, rendered templates) with server-side apply.
//!
//! Done in Rust rather than by running `kubectl apply -f`: errors come back as typed API
//! statuses with the offending document named, no second binary has to match the apiserver,
//! and the netns harness can apply from any thread without writing kubeconfigs.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams},
    core::GroupVersionKind,
    discovery::{Scope, pinned_kind},
};
use serde::Deserialize as _;

use crate::server::KubeApiServer;

const FIELD_MANAGER: &str = "nodeseal-kube-fixture";
const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(30);

impl KubeApiServer {
    /// Applies every document of a multi-document YAML file (server-side apply, forced, as
    /// cluster-admin) and waits until the CustomResourceDefinitions among them are Established.
    ///
    /// # Errors
    /// Unreadable file, a document that is not a Kubernetes object, an unknown kind, an API
    /// rejection, or a CRD not Established within 30 s.
    pub async fn apply_file(&self, path: &Path) -> Result<Vec<DynamicObject>> {
        let yaml =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        apply_yaml(&self.admin_client(), &yaml)
            .await
            .with_context(|| format!("applying {}", path.display()))
    }
}

/// Applies a multi-document YAML string; see [`KubeApiServer::apply_file`].
///
/// # Errors
/// As [`KubeApiServer::apply_file`].
pub async fn apply_yaml(client: &Client, yaml: &str) -> Result<Vec<DynamicObject>> {
    let mut applied = Vec::new();
    let mut crds = Vec::new();
    // Parse every document before the first request: the YAML parser cannot be held across an
    // await in a future that must be Send (runtimes whose tasks move between threads).
    let documents = serde_yaml::Deserializer::from_str(yaml)
        .enumerate()
        .map(|(index, document)| {
            serde_yaml::Value::deserialize(document)
                .map(|value| (index, value))
                .with_context(|| format!("parsing YAML document {index}"))
        })
        .collect::<Result<Vec<_>>>()?;
    for (index, value) in documents {
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let object: DynamicObject = serde_yaml::from_value(value)
            .with_context(|| format!("document {index} is not a Kubernetes object"))?;
        let types = object
            .types
            .clone()
            .with_context(|| format!("document {index} has no kind"))?;
        let gvk = GroupVersionKind::try_from(&types)
            .with_context(|| format!("document {index}: bad apiVersion {}", types.api_version))?;
        let name = object
            .metadata
            .name
            .clone()
            .with_context(|| format!("document {index} ({}) has no name", gvk.kind))?;
        let (resource, caps) = pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("discovering {}/{}", types.api_version, gvk.kind))?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => {
                let ns = object.metadata.namespace.as_deref().unwrap_or("default");
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let result = api
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .with_context(|| format!("applying {} {name}", gvk.kind))?;
        if gvk.group == "apiextensions.k8s.io" && gvk.kind == "CustomResourceDefinition" {
            crds.push(name);
        }
        applied.push(result);
    }
    for crd in crds {
        wait_crd_established(client, &crd, CRD_ESTABLISHED_TIMEOUT).await?;
    }
    Ok(applied)
}

/// Waits until the CRD `name` has condition `Established=True`, so its kind can be used.
///
/// # Errors
/// API errors, or the timeout.
pub async fn wait_crd_established(client: &Client, name: &str, timeout: Duration) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let crd = api
            .get(name)
            .await
            .with_context(|| format!("getting CRD {name}"))?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("CRD {name} not Established after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
