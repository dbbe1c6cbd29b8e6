//! The Helm chart (`deploy/helm/nodeseal`), the one place nodeseal's CRD, RBAC and admission
//! objects live: rendered by the real `helm` binary and applied to the fixture's apiserver, or
//! installed with `helm install`.
//!
//! Rendering goes through `helm template` rather than a Rust re-implementation of Go
//! templates, so every test applies exactly what a user's `helm install` would.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{Api, api::DynamicObject};

use crate::{apply::apply_yaml, server::KubeApiServer};

/// `<workspace root>/deploy/helm/nodeseal`.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/nodeseal")
}

/// The chart's `crds/` directory (`crds.yaml`): what Helm installs before the templates.
pub fn crds_dir() -> PathBuf {
    chart_dir().join("crds")
}

/// The `helm` binary `cargo xtask setup` builds (next to kube-apiserver).
pub fn helm_binary() -> PathBuf {
    crate::default_bin_dir().join("helm")
}

/// `--set` pairs as Helm takes them: `key=value` with dotted keys (`encryption.enabled=true`).
pub type Values<'a> = &'a [(&'a str, &'a str)];

/// Runs `helm` with `args` and returns its output whatever the exit status.
///
/// # Errors
/// Only when `helm` cannot be started.
pub fn helm(args: &[&str]) -> Result<Output> {
    let helm = helm_binary();
    Command::new(&helm)
        .args(args)
        // Keep helm's caches and repository config out of the user's home.
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("nodeseal-helm/cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("nodeseal-helm/config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("nodeseal-helm/data"),
        )
        .output()
        .with_context(|| format!("running {}", helm.display()))
}

/// `helm template` of the chart for release `nodeseal` in `namespace` with `values`: the
/// rendered templates as one multi-document YAML string (CRDs not included).
///
/// # Errors
/// helm missing, or rendering failed (the error carries helm's message, e.g. the schema
/// violation naming the value).
pub fn render_chart(namespace: &str, values: Values<'_>) -> Result<String> {
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    let mut args = vec!["template", "nodeseal", &*chart, "--namespace", namespace];
    let sets: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for set in &sets {
        args.extend(["--set", set.as_str()]);
    }
    let out = helm(&args)?;
    if !out.status.success() {
        bail!(
            "helm template {}: {}",
            sets.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("helm template printed non-UTF-8")
}

impl KubeApiServer {
    /// Applies the chart as `helm install` would place it, without a Helm release: the CRDs,
    /// then the templates rendered for `namespace` (created if missing) with `values`.
    /// Returns the applied template objects.
    ///
    /// # Errors
    /// As [`render_chart`] and [`KubeApiServer::apply_file`].
    pub async fn apply_chart(
        &self,
        namespace: &str,
        values: Values<'_>,
    ) -> Result<Vec<DynamicObject>> {
        self.create_namespace(namespace).await?;
        self.apply_file(&crds_dir().join("crds.yaml")).await?;
        let rendered = render_chart(namespace, values)?;
        apply_yaml(&self.admin_client(), &rendered)
            .await
            .context("applying the rendered chart")
    }

    /// `helm install RELEASE` of the chart into `namespace` (created if missing) with `values`,
    /// as cluster-admin, without `--wait` (no controller runs the workloads here); then waits
    /// until the CRD is Established.
    ///
    /// # Errors
    /// helm failing (its output in the error), or the CRD not Established in 30 s.
    pub async fn install_chart(
        &self,
        release: &str,
        namespace: &str,
        values: Values<'_>,
    ) -> Result<()> {
        let chart = chart_dir().to_string_lossy().into_owned();
        let sets: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec![
            "install",
            release,
            chart.as_str(),
            "--namespace",
            namespace,
            "--create-namespace",
        ];
        for set in &sets {
            args.extend(["--set", set.as_str()]);
        }
        let out = self.helm(&args)?;
        if !out.status.success() {
            bail!(
                "helm install {release} {}: {}{}",
                sets.join(" "),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        crate::wait_crd_established(
            &self.admin_client(),
            "nodesealnodes.nodeseal.io",
            std::time::Duration::from_secs(30),
        )
        .await
    }

    /// Runs `helm` against this apiserver as cluster-admin (`--kubeconfig` set), returning
    /// its output whatever the exit status.
    ///
    /// # Errors
    /// Only when `helm` cannot be started.
    pub fn helm(&self, args: &[&str]) -> Result<Output> {
        let kubeconfig = self.admin_kubeconfig_path().to_string_lossy().into_owned();
        let mut all = vec!["--kubeconfig", kubeconfig.as_str()];
        all.extend_from_slice(args);
        helm(&all)
    }

    /// The DaemonSet `namespace/name` (e.g. the chart's `nodeseal-agent`), for
    /// [`create_daemon_set_pod`](Self::create_daemon_set_pod).
    ///
    /// # Errors
    /// Any API error, e.g. not found.
    pub async fn daemon_set(&self, namespace: &str, name: &str) -> Result<DaemonSet> {
        Api::<DaemonSet>::namespaced(self.admin_client(), namespace)
            .get(name)
            .await
            .with_context(|| format!("getting DaemonSet {namespace}/{name}"))
    }
}
