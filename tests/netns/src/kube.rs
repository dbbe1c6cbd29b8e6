//! A Kubernetes control plane for a [`Topology`] (feature `kube`): the real etcd and
//! kube-apiserver of `nodeseal-kube-fixture` listening on the underlay bridge, the Helm chart
//! (rendered by `helm template`), a Node object per node, one pod of the chart's agent
//! DaemonSet per node and a keymgr pod, and a kubeconfig per process whose token is bound to
//! its pod, which is what a kubelet would mount. [`KubeConfigs`] plugs it into a [`crate::Fabric`].
//!
//! The control plane's processes and every client call run on a tokio runtime whose threads
//! all live in the underlay namespace: the apiserver's address is only reachable there and
//! from the node namespaces, never from the test's own namespace.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use nodeseal_kube_fixture::{API_AUDIENCE, KubeApiServer};

use crate::fabric::KubeConfigs;
use crate::{Netns, Topology};

/// Where the apiserver listens: an address of the underlay bridge.
pub const APISERVER_IP: &str = "10.0.0.254";
/// The release namespace.
pub const NAMESPACE: &str = "nodeseal";
/// The Helm release the control plane installs.
pub const RELEASE: &str = "nodeseal";

/// The control plane of a topology. Stops its processes on drop.
pub struct KubeControlPlane {
    rt: tokio::runtime::Runtime,
    cluster: Arc<tokio::sync::Mutex<Option<KubeApiServer>>>,
    configs: KubeConfigs,
}

impl KubeControlPlane {
    /// Starts it for `topo`. Node `i`'s Node object lists `pod_cidrs(i)` (the topology's CIDR
    /// for a normal node; empty for one the cluster has not allocated a range to yet).
    ///
    /// # Errors
    /// If the bridge address, the runtime or any API call fails.
    pub fn start(topo: &Topology, pod_cidrs: impl Fn(usize) -> Vec<String>) -> Result<Self> {
        topo.underlay()
            .ip(&["addr", "add", &format!("{APISERVER_IP}/24"), "dev", "br0"])
            .context("apiserver address on the underlay bridge")?;
        let rt = runtime_in(topo.underlay_shared())?;
        let nodes: Vec<(String, IpAddr, Vec<String>)> = topo
            .nodes()
            .iter()
            .map(|n| {
                (
                    format!("node{}", n.index),
                    IpAddr::V4(n.ip),
                    pod_cidrs(n.index),
                )
            })
            .collect();
        let (cluster, configs) = on(&rt, async move { provision(nodes).await })??;
        Ok(Self {
            rt,
            cluster: Arc::new(tokio::sync::Mutex::new(Some(cluster))),
            configs,
        })
    }

    /// Only the control plane, for a benchmark that brings its own nodes: etcd and
    /// kube-apiserver listening on `bind` inside `ns` (which must hold that address), the
    /// release namespace and the CRDs. Every kubeconfig of [`Self::configs`] is the admin's.
    ///
    /// # Errors
    /// If the runtime or any API call fails.
    pub fn start_bare(ns: Arc<Netns>, bind: IpAddr) -> Result<Self> {
        let rt = runtime_in(ns)?;
        let cluster = on(&rt, async move {
            let cluster = KubeApiServer::builder()
                .bind(bind)
                .ready_timeout(Duration::from_secs(180))
                .start()
                .await?;
            cluster.create_namespace(NAMESPACE).await?;
            cluster
                .apply_file(&nodeseal_kube_fixture::crds_dir().join("crds.yaml"))
                .await?;
            anyhow::Ok(cluster)
        })??;
        let admin = cluster.admin_kubeconfig_path().to_path_buf();
        Ok(Self {
            rt,
            cluster: Arc::new(tokio::sync::Mutex::new(Some(cluster))),
            configs: KubeConfigs {
                admin: admin.clone(),
                keymgr: admin,
                agents: Vec::new(),
            },
        })
    }

    /// The kubeconfigs of the fabric's processes.
    pub fn configs(&self) -> KubeConfigs {
        self.configs.clone()
    }

    /// Runs `f` with an admin client, inside the underlay.
    ///
    /// # Errors
    /// `f`'s error, or a stopped control plane.
    pub fn admin<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(kube::Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send,
    {
        let cluster = Arc::clone(&self.cluster);
        on(&self.rt, async move {
            let client = cluster
                .lock()
                .await
                .as_ref()
                .map(KubeApiServer::admin_client)
                .context("the control plane is stopped")?;
            f(client).await
        })?
    }

    /// Creates a workload Pod `namespace/name` on `node` with `labels` and `ip`, its status
    /// written as the kubelet would, or, when it exists, replaces its labels.
    ///
    /// # Errors
    /// Any API error.
    pub fn put_workload_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        labels: &[(String, String)],
        ip: IpAddr,
    ) -> Result<()> {
        use k8s_openapi::api::core::v1::Pod;
        let (namespace, name, node) = (namespace.to_owned(), name.to_owned(), node.to_owned());
        let labels = labels.to_vec();
        let cluster = Arc::clone(&self.cluster);
        on(&self.rt, async move {
            let guard = cluster.lock().await;
            let cluster = guard.as_ref().context("the control plane is stopped")?;
            let pods: kube::Api<Pod> = kube::Api::namespaced(cluster.admin_client(), &namespace);
            if pods.get_opt(&name).await?.is_some() {
                // A merge patch keeps labels it does not name: name the old ones as null.
                let old = pods.get(&name).await?.metadata.labels.unwrap_or_default();
                let mut wanted = serde_json::Map::new();
                for key in old.keys() {
                    wanted.insert(key.clone(), serde_json::Value::Null);
                }
                for (key, value) in &labels {
                    wanted.insert(key.clone(), value.clone().into());
                }
                let patch = serde_json::json!({"metadata": {"labels": wanted}});
                pods.patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .with_context(|| format!("relabelling Pod {namespace}/{name}"))?;
                return Ok(());
            }
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let ip = ip.to_string();
            cluster
                .create_workload_pod(&namespace, &name, &node, &labels, &[&ip], false)
                .await?;
            anyhow::Ok(())
        })?
    }

    /// Kills kube-apiserver and starts it again on the same port and etcd.
    ///
    /// # Errors
    /// If it does not come back.
    pub fn restart_apiserver(&self) -> Result<()> {
        let cluster = Arc::clone(&self.cluster);
        on(&self.rt, async move {
            match cluster.lock().await.as_mut() {
                Some(cluster) => cluster.restart_apiserver().await,
                None => anyhow::bail!("the control plane is stopped"),
            }
        })?
    }

    /// `kubectl` (the Go-built one) with the admin kubeconfig, run in the underlay.
    ///
    /// # Errors
    /// If it cannot run or fails.
    pub fn kubectl(&self, topo: &Topology, args: &[&str]) -> Result<String> {
        let kubectl = nodeseal_kube_fixture::default_bin_dir().join("kubectl");
        let out = topo
            .underlay()
            .command(&kubectl.to_string_lossy())
            .arg("--kubeconfig")
            .arg(&self.configs.admin)
            .args(args)
            .output()
            .context("running kubectl")?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for KubeControlPlane {
    fn drop(&mut self) {
        // The processes are children of the runtime's threads: stop them while those live.
        let cluster = Arc::clone(&self.cluster);
        let _ = on(&self.rt, async move {
            if let Some(cluster) = cluster.lock().await.take() {
                cluster.stop();
            }
        });
    }
}

/// A runtime whose threads all live in `ns`: the processes they spawn run there, and their
/// clients reach what only that namespace reaches.
fn runtime_in(ns: Arc<Netns>) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            // A thread outside the namespace could not reach the apiserver: fail loudly.
            if let Err(e) = ns.enter_this_thread() {
                panic!("entering namespace {}: {e:#}", ns.name());
            }
        })
        .build()
        .context("runtime")
}

/// Runs `future` on a worker of `rt` (inside its namespace), not on the calling thread.
fn on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    rt.block_on(rt.spawn(future))
        .context("control-plane task panicked")
}

async fn provision(
    nodes: Vec<(String, IpAddr, Vec<String>)>,
) -> Result<(KubeApiServer, KubeConfigs)> {
    let mut cluster = KubeApiServer::builder()
        .bind(APISERVER_IP.parse().context("apiserver address")?)
        // Under qemu TCG the apiserver takes tens of seconds to become ready.
        .ready_timeout(Duration::from_secs(180))
        .start()
        .await?;
    // A real `helm install` of the chart with keymgr (encryption.enabled): the release a
    // scenario may upgrade. The DaemonSet is the chart's, so keymgr's "owned by the agent
    // DaemonSet" check is against what users install.
    cluster
        .install_chart(RELEASE, NAMESPACE, &[("encryption.enabled", "true")])
        .await?;
    let ds = cluster.daemon_set(NAMESPACE, "nodeseal-agent").await?;
    let mut agents = Vec::new();
    for (name, ip, cidrs) in &nodes {
        let cidrs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        cluster.create_node(name, *ip, &cidrs).await?;
        let pod = format!("nodeseal-agent-{name}");
        agents.push(
            cluster
                .create_daemon_set_pod(&ds, &pod, name, "nodeseal-agent")
                .await?,
        );
    }
    let keymgr_node = nodes.first().map_or("node0", |(name, _, _)| name.as_str());
    let keymgr_pod = cluster
        .create_agent_pod(
            NAMESPACE,
            "nodeseal-keymgr-0",
            keymgr_node,
            "nodeseal-keymgr",
        )
        .await?;
    let token = cluster
        .pod_bound_token(
            NAMESPACE,
            "nodeseal-keymgr",
            "nodeseal-keymgr-0",
            keymgr_pod
                .metadata
                .uid
                .as_deref()
                .context("keymgr pod uid")?,
            API_AUDIENCE,
            Duration::from_secs(3600),
        )
        .await?;
    let keymgr = cluster.kubeconfig_for_token(&token)?;
    let configs = KubeConfigs {
        admin: cluster.admin_kubeconfig_path().to_path_buf(),
        keymgr,
        agents,
    };
    Ok((cluster, configs))
}

/// Puts the workload `name` (namespace `default`) with `labels` (`k=v,...`) on pod 0 of node
/// `node`: an endpoint record written with `nodeseal endpoint add` on a standalone store, or,
/// with a control plane, a Pod object (created, or relabelled).
///
/// # Errors
/// If the CLI or the API call fails.
pub fn put_workload(
    fabric: &crate::Fabric,
    control: Option<&KubeControlPlane>,
    topo: &Topology,
    node: usize,
    name: &str,
    labels: &str,
) -> Result<()> {
    let pod = topo.node(node).pod(0);
    let node_name = format!("node{node}");
    match control {
        None => {
            let ip = pod.ip.to_string();
            fabric.nodeseal_store(&[
                "endpoint",
                "add",
                "--node",
                &node_name,
                "--name",
                name,
                "--labels",
                labels,
                "--ip",
                &ip,
                "--interface",
                &pod.host_ifname,
            ])?;
            Ok(())
        }
        Some(control) => {
            let labels: Vec<(String, String)> = labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            control.put_workload_pod("default", name, &node_name, &labels, pod.addr())
        }
    }
}
