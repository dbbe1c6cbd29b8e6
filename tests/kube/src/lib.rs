//! A real Kubernetes control plane for nodeseal's Kubernetes-mode tests.
//!
//! [`KubeApiServer`] runs the Go-built `etcd` and `kube-apiserver` (from `cargo xtask setup`,
//! or `$NODESEAL_KUBE_BIN_DIR`) as child processes with a throwaway PKI, and hands out an admin
//! [`kube::Client`], kubeconfigs, and helpers that stand in for the kubelet and scheduler
//! (Nodes, Pods bound to nodes, pod-bound service-account tokens). It also renders the Helm
//! chart `deploy/helm/nodeseal` with the real `helm` and applies it (or `helm install`s it), so
//! tests check exactly what the chart ships.
//!
//! What it deliberately does not run: kubelet, container runtime, scheduler,
//! controller-manager. Nothing creates `default` ServiceAccounts, runs pods, garbage-collects
//! or signs CSRs; tests do what those would do, explicitly.
//!
//! Errors are `anyhow`: this is test-harness setup (STYLE.md), and its callers only report them.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let cluster = nodeseal_kube_fixture::KubeApiServer::start().await?;
//! let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(cluster.admin_client());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod apply;
mod chart;
pub mod metrics;
mod objects;
pub mod pki;
mod process;
mod server;

pub use apply::{apply_yaml, wait_crd_established};
pub use chart::{Values, chart_dir, crds_dir, helm, helm_binary, render_chart};
pub use objects::{MIN_TOKEN_TTL, register_node};
pub use server::{
    API_AUDIENCE, BIN_DIR_ENV, KubeApiServer, KubeApiServerBuilder, SERVICE_CLUSTER_IP_RANGE,
    binaries_or_skip, client_for_kubeconfig, default_bin_dir, missing_binaries,
};
