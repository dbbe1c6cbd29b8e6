//! keymgr as a running role (`nodeseal keymgr run`): the only process that reads the cluster CA.
//! It publishes the trust bundle and signs the CSRs of admitted nodes.
//!
//! A node is admitted when it has a node record in the store and is not revoked. Write access to
//! the store is therefore the admission decision, as write access to `Node` objects is in
//! Kubernetes; a revoked node's certificate record is deleted and its CSRs are refused.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use futures::StreamExt as _;
use nodeseal_keymgr::{ClusterCa, IssueOptions, NodeName, TrustBundle, validate_csr};
use nodeseal_store::{CertificateRecord, CsrRecord, Event, Kind, Record, Store};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::identity::pem;

/// Errors that stop the signer.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The store failed.
    #[error("cluster store")]
    Store(#[from] nodeseal_store::StoreError),
    /// The bundle could not be built.
    #[error("building the trust bundle: {0}")]
    Bundle(String),
}

/// The signer's view of the cluster.
#[derive(Default)]
struct View {
    nodes: BTreeSet<String>,
    revoked: BTreeSet<String>,
    csrs: BTreeMap<String, String>,
    /// CSR text we already signed, per node, so that a watch echo does not re-sign.
    signed: BTreeMap<String, String>,
}

/// Publishes the bundle (keeping other authorities already in it, for CA rollover) and signs
/// CSRs until cancelled.
///
/// # Errors
/// [`SignerError`] when the store is unusable at start.
pub async fn run(
    store: Store,
    ca: ClusterCa,
    options: IssueOptions,
    cancel: CancellationToken,
) -> Result<(), SignerError> {
    publish_bundle(&store, &ca).await?;
    let mut view = View::default();
    let mut events = store.watch(&[Kind::Node, Kind::Csr, Kind::Revocation]);
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            e = events.next() => e,
        };
        let Some(event) = event else { return Ok(()) };
        match event {
            Event::Snapshot(snapshot) | Event::Resynced(snapshot) => {
                view = View {
                    signed: std::mem::take(&mut view.signed),
                    ..View::default()
                };
                for record in snapshot.records {
                    view.apply(record);
                }
            }
            Event::Put(record) => view.apply(record),
            Event::Deleted(key) => {
                if let Some(node) = key.node() {
                    match key.kind() {
                        Kind::Node => {
                            view.nodes.remove(node.as_str());
                        }
                        Kind::Csr => {
                            view.csrs.remove(node.as_str());
                        }
                        _ => {}
                    }
                }
            }
            Event::Interrupted(e) => warn!(error = %e, "store unavailable; signing paused"),
            Event::Invalid(e) => warn!(error = %e, "ignoring invalid record"),
            // Event is non-exhaustive: an event kind the signer does not know changes nothing
            // it signs.
            other => debug!(event = ?other, "ignoring unknown store event"),
        }
        sign_pending(&store, &ca, &options, &mut view).await;
        delete_revoked(&store, &view).await;
    }
}

impl View {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Node(n) => {
                self.nodes.insert(n.name.as_str().to_owned());
            }
            Record::Csr(c) => {
                self.csrs.insert(c.node.as_str().to_owned(), c.csr_pem);
            }
            Record::Revocation(r) if r.serial.is_none() => {
                self.revoked.insert(r.node.as_str().to_owned());
            }
            _ => {}
        }
    }
}

/// Publishes the trust bundle with `ca` in it, keeping the other authorities it has.
///
/// # Errors
/// [`SignerError`].
pub async fn publish_bundle(store: &Store, ca: &ClusterCa) -> Result<(), SignerError> {
    let td = ca.trust_domain().clone();
    let mut bundle = match store.get::<nodeseal_store::TrustBundle>(&()).await? {
        Some(existing) => TrustBundle::from_json(td.clone(), existing.bundle.as_bytes())
            .unwrap_or_else(|e| {
                warn!(error = %e, "replacing the unreadable trust bundle in the store");
                TrustBundle::new(td.clone(), Vec::new())
            }),
        None => TrustBundle::new(td.clone(), Vec::new()),
    };
    bundle.add_authority(ca.trust_anchor().clone());
    let json = bundle
        .to_json()
        .map_err(|e| SignerError::Bundle(e.to_string()))?;
    store
        .put(&nodeseal_store::TrustBundle { bundle: json })
        .await?;
    info!(trust_domain = %td, authorities = bundle.authorities().len(), "trust bundle published");
    Ok(())
}

async fn sign_pending(store: &Store, ca: &ClusterCa, options: &IssueOptions, view: &mut View) {
    let pending: Vec<(String, String)> = view
        .csrs
        .iter()
        .filter(|(node, csr)| view.signed.get(*node) != Some(*csr))
        .map(|(n, c)| (n.clone(), c.clone()))
        .collect();
    for (node, csr_pem) in pending {
        if !view.nodes.contains(&node) {
            continue; // not admitted (yet): signed once its node record appears
        }
        if view.revoked.contains(&node) {
            warn!(%node, "refusing CSR of a revoked node");
            view.signed.insert(node, csr_pem);
            continue;
        }
        match sign_one(ca, options, &node, &csr_pem) {
            Ok(chain_pem) => {
                let Ok(name) = nodeseal_store::NodeName::new(node.clone()) else {
                    continue;
                };
                match store
                    .put(&CertificateRecord {
                        node: name,
                        chain_pem,
                    })
                    .await
                {
                    Ok(()) => {
                        info!(%node, "signed node SVID");
                        view.signed.insert(node, csr_pem);
                    }
                    Err(e) => warn!(%node, error = %e, "publishing certificate"),
                }
            }
            Err(reason) => {
                warn!(%node, %reason, "refusing CSR");
                view.signed.insert(node, csr_pem);
            }
        }
    }
}

fn sign_one(
    ca: &ClusterCa,
    options: &IssueOptions,
    node: &str,
    csr_pem: &str,
) -> Result<String, String> {
    let der = pem_to_der(csr_pem, "CERTIFICATE REQUEST")
        .ok_or("CSR is not one PEM CERTIFICATE REQUEST block")?;
    let requester = NodeName::new(node).map_err(|e| e.to_string())?;
    let validated = validate_csr(&der, ca.trust_domain(), &requester).map_err(|e| e.to_string())?;
    let chain = ca
        .issue(&validated, None, options)
        .map_err(|e| e.to_string())?;
    Ok(chain.iter().map(|c| pem("CERTIFICATE", c)).collect())
}

async fn delete_revoked(store: &Store, view: &View) {
    for node in &view.revoked {
        let Ok(name) = nodeseal_store::NodeName::new(node.clone()) else {
            continue;
        };
        match store.delete::<CertificateRecord>(&name).await {
            Ok(true) => info!(%node, "deleted the certificate of a revoked node"),
            Ok(false) => {}
            Err(e) => warn!(%node, error = %e, "deleting revoked certificate"),
        }
        let _ = store.delete::<CsrRecord>(&name).await;
    }
}

/// The DER inside the first PEM block with `label`.
#[must_use]
pub fn pem_to_der(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let b64: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}
