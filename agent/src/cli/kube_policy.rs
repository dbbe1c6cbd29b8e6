//! `nodeseal policy apply` in Kubernetes mode: policies are objects there, not records.
//!
//! The store derives policy records from NodesealNetworkPolicy,
//! NodesealClusterwideNetworkPolicy and NetworkPolicy objects, so applying a file creates or
//! updates those objects (server-side apply); `policy get` and `policy delete` work on the
//! derived records through the store as in the other modes.

use anyhow::{Context as _, Result, bail};
use nodeseal_store::{KubeOptions, KubeStore};

use crate::config::StoreArgs;

/// Applies a policy file (already checked by the caller) as Kubernetes objects.
pub(super) async fn apply(args: &StoreArgs, bytes: &[u8], named: bool) -> Result<()> {
    if named {
        bail!(
            "--name has no meaning with --kubernetes: each policy is stored as its own object, \
             named by its kind, namespace and metadata.name"
        );
    }
    let store = KubeStore::connect(KubeOptions {
        kubeconfig: args.kubeconfig.clone(),
        namespace: args.namespace.clone(),
        trust_domain: args.trust_domain.clone(),
    })
    .await
    .context("connecting to the apiserver")?;
    let applied = store.apply_policies(bytes).await?;
    for object in &applied {
        let qualified = match &object.namespace {
            Some(namespace) => format!("{namespace}/{}", object.name),
            None => object.name.clone(),
        };
        println!(
            "{} {qualified} applied (policy {})",
            object.source.kind(),
            object.record_name()
        );
    }
    Ok(())
}
