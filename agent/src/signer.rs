//! keymgr as a running role (`nodeseal keymgr run`): the only process that reads the cluster CA.
//! It publishes the trust bundle and signs the CSRs of admitted nodes.
//!
//! A node is admitted when it has a node record in the store and is not revoked. Write access to
//! the store is therefore the admission decision for a new node, as write access to `Node`
//! objects is in Kubernetes; a revoked node's certificate record is deleted and its CSRs are
//! refused. Authentication is not authorization, so what an admitted node may claim is decided
//! here too, and bound into its certificate ([`NodeClaims`]), which every peer checks the
//! node's record against:
//! - its node IPs and pod CIDRs must overlap no other node's that holds a valid certificate
//!   (first admitted, first served; a node whose record is deleted releases them);
//! - while a node holds a valid certificate, a new one is signed only with a renewal proof made
//!   with its key, so a store writer cannot obtain a certificate for a live node. A node that
//!   lost its key waits for its certificate to expire, or the operator revokes and re-adds it.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use futures::StreamExt as _;
use std::time::SystemTime;

use nodeseal_keymgr::{
    ClusterCa, ExpectedPeer, IssueOptions, NodeClaims, NodeName, PeerRole, TrustBundle, TrustStore,
    validate_csr, verify_renewal_proof,
};
use nodeseal_store::{CertificateRecord, CsrRecord, Event, Kind, NodeRecord, Record, Store};
use rustls_pki_types::CertificateDer;
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
    nodes: BTreeMap<String, NodeRecord>,
    revoked: BTreeSet<String>,
    csrs: BTreeMap<String, CsrRecord>,
    /// CSR text we already decided on, per node, so that a watch echo is not decided again.
    signed: BTreeMap<String, String>,
    /// Each node's newest certificate from this CA: its leaf and what it admits. Deleting the
    /// certificate record does not remove it from here (only revocation does): a store writer
    /// must not be able to release a live node's claims or skip its renewal proof.
    issued: BTreeMap<String, Issued>,
}

#[derive(Clone)]
struct Issued {
    leaf: CertificateDer<'static>,
    claims: Option<NodeClaims>,
    not_after: SystemTime,
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
    let own = TrustStore::new(TrustBundle::new(
        ca.trust_domain().clone(),
        vec![ca.trust_anchor().clone()],
    ))
    .map_err(|e| SignerError::Bundle(e.to_string()))?;
    let mut view = View::default();
    let mut events = store.watch(&[Kind::Node, Kind::Csr, Kind::Certificate, Kind::Revocation]);
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
                    issued: std::mem::take(&mut view.issued),
                    ..View::default()
                };
                for record in snapshot.records {
                    view.apply(record, &own);
                }
            }
            Event::Put(record) => view.apply(record, &own),
            Event::Deleted(key) => {
                if let Some(node) = key.node() {
                    match key.kind() {
                        Kind::Node => {
                            // The node is gone: its claims are free for another node.
                            view.nodes.remove(node.as_str());
                            view.issued.remove(node.as_str());
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
    fn apply(&mut self, record: Record, own: &TrustStore) {
        match record {
            Record::Node(n) => {
                self.nodes.insert(n.name.as_str().to_owned(), n);
            }
            Record::Csr(c) => {
                self.csrs.insert(c.node.as_str().to_owned(), c);
            }
            Record::Certificate(c) => self.learn_certificate(&c, own),
            Record::Revocation(r) if r.serial.is_none() => {
                self.issued.remove(r.node.as_str());
                self.revoked.insert(r.node.as_str().to_owned());
            }
            _ => {}
        }
    }

    /// Remembers a certificate record that this CA signed for that node (after a restart, the
    /// store is where keymgr finds what it issued); anything else is ignored with a warning.
    fn learn_certificate(&mut self, record: &CertificateRecord, own: &TrustStore) {
        let node = record.node.as_str();
        let chain = match nodeseal_keymgr::svid::certs_from_pem(record.chain_pem.as_bytes()) {
            Ok(chain) => chain,
            Err(e) => return warn!(%node, error = %e, "ignoring unreadable certificate record"),
        };
        let Ok(name) = NodeName::new(node) else {
            return;
        };
        let peer = match own.verify(
            &chain,
            SystemTime::now(),
            PeerRole::Client,
            &ExpectedPeer::Node(name),
        ) {
            Ok(peer) => peer,
            Err(e) => {
                return warn!(%node, error = %e, "ignoring a certificate record this CA did not issue");
            }
        };
        let newer = self
            .issued
            .get(node)
            .is_none_or(|known| known.not_after <= peer.not_after);
        if let (true, Some(leaf)) = (newer, chain.into_iter().next()) {
            self.issued.insert(
                node.to_owned(),
                Issued {
                    leaf,
                    claims: peer.claims,
                    not_after: peer.not_after,
                },
            );
        }
    }

    /// The live certificate of `node`, if it has one.
    fn live(&self, node: &str, now: SystemTime) -> Option<&Issued> {
        self.issued.get(node).filter(|i| i.not_after > now)
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
    let signature = ca
        .sign_bundle(json.as_bytes())
        .map_err(|e| SignerError::Bundle(e.to_string()))?;
    store
        .put(&nodeseal_store::TrustBundle {
            bundle: json,
            signature: Some(base64::engine::general_purpose::STANDARD.encode(signature)),
            signer_pem: Some(ca.chain_pem()),
        })
        .await?;
    info!(trust_domain = %td, authorities = bundle.authorities().len(), "trust bundle published");
    Ok(())
}

async fn sign_pending(store: &Store, ca: &ClusterCa, options: &IssueOptions, view: &mut View) {
    let pending: Vec<CsrRecord> = view
        .csrs
        .iter()
        .filter(|(node, csr)| view.signed.get(*node) != Some(&csr.csr_pem))
        .map(|(_, c)| c.clone())
        .collect();
    for csr in pending {
        let node = csr.node.as_str().to_owned();
        let Some(record) = view.nodes.get(&node) else {
            continue; // not admitted (yet): signed once its node record appears
        };
        let decided = if view.revoked.contains(&node) {
            Err("the node is revoked".to_owned())
        } else {
            admit(view, record, &csr).and_then(|claims| {
                sign_one(ca, options, &node, &csr.csr_pem, &claims).map(|c| (c, claims))
            })
        };
        let (chain, claims) = match decided {
            Ok(signed) => signed,
            Err(reason) => {
                warn!(%node, %reason, "refusing CSR");
                view.signed.insert(node, csr.csr_pem);
                continue;
            }
        };
        let chain_pem = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
        match store
            .put(&CertificateRecord {
                node: csr.node.clone(),
                chain_pem,
            })
            .await
        {
            Ok(()) => {
                info!(%node, %claims, "signed node SVID");
                // Known at once, not at the watch echo: the next CSR is checked against it.
                if let Some(leaf) = chain.into_iter().next()
                    && let Ok(info) = nodeseal_keymgr::SvidInfo::parse(&leaf)
                {
                    let issued = Issued {
                        leaf,
                        claims: Some(claims),
                        not_after: info.not_after,
                    };
                    view.issued.insert(node.clone(), issued);
                }
                view.signed.insert(node, csr.csr_pem);
            }
            Err(e) => warn!(%node, error = %e, "publishing certificate"),
        }
    }
}

/// What `record`'s node may be certified for, or why it may not.
fn admit(view: &View, record: &NodeRecord, csr: &CsrRecord) -> Result<NodeClaims, String> {
    let node = record.name.as_str();
    let claims = NodeClaims::new(&record.node_ips, &record.pod_cidrs).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    for (other, issued) in &view.issued {
        if other == node || issued.not_after <= now || view.revoked.contains(other) {
            continue;
        }
        if let Some(shared) = issued
            .claims
            .as_ref()
            .and_then(|theirs| claims.conflict_with(theirs))
        {
            return Err(format!(
                "its record claims {shared}, which is admitted to node {other}"
            ));
        }
    }
    if let Some(current) = view.live(node, now) {
        let der = pem_to_der(&csr.csr_pem, "CERTIFICATE REQUEST")
            .ok_or("CSR is not one PEM CERTIFICATE REQUEST block")?;
        let not_after_unix = current
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let proof = csr.renewal_proof.as_deref().ok_or_else(|| {
            nodeseal_keymgr::CsrError::RenewalProofMissing { not_after_unix }.to_string()
        })?;
        let proof = base64::engine::general_purpose::STANDARD
            .decode(proof)
            .map_err(|e| format!("renewal proof is not base64: {e}"))?;
        verify_renewal_proof(&current.leaf, &der, &proof).map_err(|e| e.to_string())?;
    }
    Ok(claims)
}

fn sign_one(
    ca: &ClusterCa,
    options: &IssueOptions,
    node: &str,
    csr_pem: &str,
    claims: &NodeClaims,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let der = pem_to_der(csr_pem, "CERTIFICATE REQUEST")
        .ok_or("CSR is not one PEM CERTIFICATE REQUEST block")?;
    let requester = NodeName::new(node).map_err(|e| e.to_string())?;
    let validated = validate_csr(&der, ca.trust_domain(), &requester).map_err(|e| e.to_string())?;
    ca.issue(&validated, Some(claims), options)
        .map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use std::net::{IpAddr, SocketAddr};
    use std::time::Duration;

    use ipnet::IpNet;
    use nodeseal_keymgr::{NodeIdentity, NodeKey, TrustDomain, create_csr, renewal_proof};
    use nodeseal_store::{DirOptions, DirStore, SpiffeId};

    use super::*;

    fn record(name: &str, ip: u8, cidr: &str) -> NodeRecord {
        let addr = IpAddr::from([10, 0, 0, ip]);
        NodeRecord {
            name: nodeseal_store::NodeName::new(name).unwrap(),
            node_ips: vec![addr],
            pod_cidrs: vec![cidr.parse().unwrap()],
            spiffe_id: SpiffeId::new(format!("spiffe://cluster.local/node/{name}")).unwrap(),
            handshake: SocketAddr::new(addr, 4250),
            wireguard_public_key: None,
        }
    }

    /// Puts a CSR for `node` with a fresh key, with a renewal proof made by `prover` if given.
    async fn request(store: &Store, node: &str, prover: Option<&NodeKey>) -> NodeKey {
        let td = TrustDomain::new("cluster.local").unwrap();
        let key = NodeKey::generate().unwrap();
        let csr = create_csr(&key, &td, &NodeName::new(node).unwrap()).unwrap();
        let renewal_proof = prover.map(|p| {
            base64::engine::general_purpose::STANDARD
                .encode(renewal_proof(p, csr.as_ref()).unwrap())
        });
        store
            .put(&CsrRecord {
                node: nodeseal_store::NodeName::new(node).unwrap(),
                csr_pem: pem("CERTIFICATE REQUEST", csr.as_ref()),
                renewal_proof,
            })
            .await
            .unwrap();
        key
    }

    /// The certificate keymgr published for `node`, once it is for `key` (bounded wait).
    async fn signed(store: &Store, node: &str, key: &NodeKey) -> NodeIdentity {
        let name = nodeseal_store::NodeName::new(node).unwrap();
        // 30 s: seen to take over 10 s on a loaded 2-core machine.
        for _ in 0..600 {
            if let Some(record) = store.get::<CertificateRecord>(&name).await.unwrap() {
                let chain =
                    nodeseal_keymgr::svid::certs_from_pem(record.chain_pem.as_bytes()).unwrap();
                let key = NodeKey::from_pem(key.to_pem().as_bytes()).unwrap();
                if let Ok(identity) = NodeIdentity::new(chain, key) {
                    return identity;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("keymgr did not sign {node}'s CSR within 30 s");
    }

    /// Whether the certificate published for `node` is still for `key`.
    async fn still_for(store: &Store, node: &str, key: &NodeKey) -> bool {
        let name = nodeseal_store::NodeName::new(node).unwrap();
        let record = store
            .get::<CertificateRecord>(&name)
            .await
            .unwrap()
            .unwrap();
        let chain = nodeseal_keymgr::svid::certs_from_pem(record.chain_pem.as_bytes()).unwrap();
        NodeIdentity::new(chain, NodeKey::from_pem(key.to_pem().as_bytes()).unwrap()).is_ok()
    }

    /// The signer decides CSRs in the order they arrive: once a later, admissible CSR of node
    /// `barrier` is signed, every earlier CSR has been decided.
    async fn barrier(store: &Store, n: u8) {
        let name = format!("barrier-{n}");
        store
            .put(&record(&name, 100 + n, &format!("10.245.{n}.0/24")))
            .await
            .unwrap();
        let key = request(store, &name, None).await;
        signed(store, &name, &key).await;
    }

    #[tokio::test]
    async fn claims_are_admitted_once_and_a_live_node_renews_only_with_its_key() {
        let root = std::env::temp_dir().join(format!("nodeseal-signer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = Store::new(DirStore::open(&root, DirOptions::default()).await.unwrap());
        let td = TrustDomain::new("cluster.local").unwrap();
        let ca = ClusterCa::generate(td, Duration::from_secs(3600)).unwrap();
        let cancel = CancellationToken::new();
        let signer = tokio::spawn(run(
            store.clone(),
            ca,
            IssueOptions::default(),
            cancel.clone(),
        ));

        // a is admitted with what its record claims, bound into its certificate.
        store.put(&record("a", 1, "10.244.1.0/24")).await.unwrap();
        let a_key = request(&store, "a", None).await;
        let a = signed(&store, "a", &a_key).await;
        let claims = a.info().claims.clone().unwrap();
        assert_eq!(claims.node_ips, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            claims.pod_cidrs,
            ["10.244.1.0/24".parse::<IpNet>().unwrap()]
        );

        // b claims part of a's pod CIDR, then a's node IP: refused both times.
        store.put(&record("b", 2, "10.244.1.128/25")).await.unwrap();
        request(&store, "b", None).await;
        barrier(&store, 1).await;
        store.put(&record("b", 1, "10.244.2.0/24")).await.unwrap();
        request(&store, "b", None).await;
        barrier(&store, 2).await;
        assert!(
            store
                .get::<CertificateRecord>(&nodeseal_store::NodeName::new("b").unwrap())
                .await
                .unwrap()
                .is_none(),
            "b must not be certified for a's pod CIDR or address"
        );
        // With claims of its own, b is admitted.
        store.put(&record("b", 2, "10.244.2.0/24")).await.unwrap();
        let b_key = request(&store, "b", None).await;
        let b = signed(&store, "b", &b_key).await;

        // A store writer asks for a certificate for the live node a: without a proof, and with
        // a proof made with another node's key. Both refused; a keeps its certificate.
        request(&store, "a", None).await;
        barrier(&store, 3).await;
        request(&store, "a", Some(b.key())).await;
        barrier(&store, 4).await;
        assert!(still_for(&store, "a", &a_key).await);

        // a renews with a proof made with its current key.
        let renewed_key = request(&store, "a", Some(a.key())).await;
        signed(&store, "a", &renewed_key).await;

        // a's record is deleted: what it held is free for b (which proves its own key).
        store
            .delete::<NodeRecord>(&nodeseal_store::NodeName::new("a").unwrap())
            .await
            .unwrap();
        store.put(&record("b", 2, "10.244.1.0/24")).await.unwrap();
        let b2_key = request(&store, "b", Some(b.key())).await;
        let b2 = signed(&store, "b", &b2_key).await;
        assert_eq!(
            b2.info().claims.as_ref().unwrap().pod_cidrs,
            ["10.244.1.0/24".parse::<IpNet>().unwrap()]
        );

        cancel.cancel();
        signer.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }
}
