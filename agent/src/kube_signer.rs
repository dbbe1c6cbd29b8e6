//! keymgr in Kubernetes mode: the CA lives in a Secret, node certificates are issued through
//! `certificates.k8s.io/v1` CertificateSigningRequests of signer [`SIGNER_NAME`], and only the
//! leader of the keymgr replicas signs.
//!
//! A CSR is approved and signed only when every check of [`admit`] holds; otherwise it gets a
//! `Denied` condition whose message names the failed check. The checks bind the certificate to
//! the node the requesting pod runs on, as Antrea's IPsec signer does, and add the SPIFFE rules:
//! - the requester is the agent's ServiceAccount;
//! - its bound token names a Pod (name and UID, from `status.userInfo.extra`) that exists with
//!   that UID, is owned by the agent DaemonSet and runs on node N;
//! - the CSR asks for N's SPIFFE ID and nothing else ([`validate_csr`]), and only the usages a
//!   node SVID has;
//! - node N exists and is not revoked.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use nodeseal_keymgr::{ClusterCa, IssueOptions, NodeClaims, NodeName, TrustDomain, validate_csr};
use nodeseal_store::kube::objects::NodeFacts;
use nodeseal_store::{Event, Kind, Record, Store};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::identity::pem;
use crate::signer::pem_to_der;

/// The signer name of node SVID requests.
pub const SIGNER_NAME: &str = "nodeseal.io/node";
/// The Secret holding the cluster CA (`ca.crt`, `ca.key`).
pub const CA_SECRET: &str = "nodeseal-ca";
const CA_CERT_KEY: &str = "ca.crt";
const CA_KEY_KEY: &str = "ca.key";
/// Usages a node SVID may carry (TLS client and server, ECDSA signatures).
pub const ALLOWED_USAGES: [&str; 3] = ["digital signature", "client auth", "server auth"];
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Who may ask for node certificates.
#[derive(Clone, Debug)]
pub struct AgentIdentity {
    /// Namespace of the agent's ServiceAccount and pods.
    pub namespace: String,
    /// The agent's ServiceAccount.
    pub service_account: String,
    /// The DaemonSet that owns the agent pods.
    pub daemon_set: String,
}

impl AgentIdentity {
    fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// Why a CSR was denied: the message of its `Denied` condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denial(pub String);

fn deny(message: impl Into<String>) -> Denial {
    Denial(message.into())
}

/// What [`admit`] needs to know besides the CSR.
pub struct Facts<'a> {
    /// The pod the requester's token is bound to, if it exists.
    pub pod: Option<&'a Pod>,
    /// Names of the nodes that exist.
    pub node_exists: bool,
    /// Whether the node is revoked.
    pub revoked: bool,
}

/// The pod a CSR's requester token is bound to: (name, uid), from the request's extra fields.
///
/// # Errors
/// [`Denial`] if the requester is not the agent or the token is not bound to a pod.
pub fn requesting_pod(
    csr: &CertificateSigningRequest,
    agent: &AgentIdentity,
) -> Result<(String, String), Denial> {
    let spec = &csr.spec;
    let username = spec.username.as_deref().unwrap_or("");
    if username != agent.username() {
        return Err(deny(format!(
            "requester {username:?} is not the agent service account {}",
            agent.username()
        )));
    }
    let extra = spec.extra.as_ref();
    let single = |key: &str| -> Result<String, Denial> {
        match extra.and_then(|e| e.get(key)).map(Vec::as_slice) {
            Some([value]) if !value.is_empty() => Ok(value.clone()),
            _ => Err(deny(format!(
                "the requester's token is not bound to a pod (no single {key} in the request)"
            ))),
        }
    };
    Ok((single(POD_NAME_EXTRA)?, single(POD_UID_EXTRA)?))
}

/// Decides a node-certificate request. Returns the node the certificate is for.
///
/// # Errors
/// [`Denial`] naming the first check that failed.
pub fn admit(
    csr: &CertificateSigningRequest,
    agent: &AgentIdentity,
    trust_domain: &TrustDomain,
    facts: &Facts<'_>,
) -> Result<NodeName, Denial> {
    let (pod_name, pod_uid) = requesting_pod(csr, agent)?;
    let pod = facts.pod.ok_or_else(|| {
        deny(format!(
            "pod {}/{pod_name} named by the requester's token does not exist",
            agent.namespace
        ))
    })?;
    if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
        return Err(deny(format!(
            "pod {}/{pod_name} has another UID than the requester's token (the pod was replaced)",
            agent.namespace
        )));
    }
    let owned_by_agent = pod.owner_references().iter().any(|owner| {
        owner.kind == "DaemonSet"
            && owner.name == agent.daemon_set
            && owner.api_version == "apps/v1"
    });
    if !owned_by_agent {
        return Err(deny(format!(
            "pod {}/{pod_name} is not owned by DaemonSet {}",
            agent.namespace, agent.daemon_set
        )));
    }
    let node_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .ok_or_else(|| {
            deny(format!(
                "pod {}/{pod_name} is not scheduled to a node",
                agent.namespace
            ))
        })?;
    let node = NodeName::new(node_name)
        .map_err(|e| deny(format!("pod {pod_name} runs on an invalid node name: {e}")))?;
    let usages: BTreeSet<&str> = csr
        .spec
        .usages
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    if let Some(extra) = usages.iter().find(|u| !ALLOWED_USAGES.contains(u)) {
        return Err(deny(format!(
            "usage {extra:?} is not one a node SVID has (allowed: {})",
            ALLOWED_USAGES.join(", ")
        )));
    }
    let der = pem_to_der(
        &String::from_utf8_lossy(&csr.spec.request.0),
        "CERTIFICATE REQUEST",
    )
    .ok_or_else(|| deny("spec.request is not one PEM CERTIFICATE REQUEST block"))?;
    validate_csr(&der, trust_domain, &node).map_err(|e| {
        deny(format!(
            "the CSR does not ask for node {node}'s identity and nothing else: {e}"
        ))
    })?;
    if !facts.node_exists {
        return Err(deny(format!("node {node} does not exist")));
    }
    if facts.revoked {
        return Err(deny(format!("node {node} is revoked")));
    }
    Ok(node)
}

/// Whether a CSR was already decided (approved, denied or failed).
pub fn is_decided(csr: &CertificateSigningRequest) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| matches!(c.type_.as_str(), "Approved" | "Denied" | "Failed"))
        })
}

/// Loads the CA from its Secret, or creates both when the Secret does not exist yet.
///
/// # Errors
/// The apiserver's errors, or a Secret whose contents are not a CA for `td`.
pub async fn load_or_create_ca(
    client: &Client,
    namespace: &str,
    td: &TrustDomain,
    ca_ttl: Duration,
) -> anyhow::Result<ClusterCa> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..3 {
        if let Some(secret) = secrets.get_opt(CA_SECRET).await? {
            let data = secret.data.unwrap_or_default();
            let cert = data
                .get(CA_CERT_KEY)
                .ok_or_else(|| anyhow::anyhow!("Secret {CA_SECRET} has no {CA_CERT_KEY}"))?;
            let key = Zeroizing::new(
                data.get(CA_KEY_KEY)
                    .ok_or_else(|| anyhow::anyhow!("Secret {CA_SECRET} has no {CA_KEY_KEY}"))?
                    .0
                    .clone(),
            );
            return ClusterCa::import(td.clone(), &cert.0, &key)
                .map_err(|e| anyhow::anyhow!("Secret {namespace}/{CA_SECRET}: {e}"));
        }
        let ca = ClusterCa::generate(td.clone(), ca_ttl)?;
        let secret = ca_secret(namespace, &ca);
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(secret = CA_SECRET, %namespace, "created the cluster CA");
                return Ok(ca);
            }
            // Another replica created it first: use theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("Secret {namespace}/{CA_SECRET} kept changing while it was created")
}

/// What keymgr needs in Kubernetes mode.
pub struct KeymgrSettings {
    /// keymgr's client (its ServiceAccount's RBAC is what it may do).
    pub client: Client,
    /// The store (trust bundle ConfigMap, revocations).
    pub store: Store,
    /// The cluster's trust domain.
    pub trust_domain: TrustDomain,
    /// The release namespace (CA Secret, Lease).
    pub namespace: String,
    /// Who may request node certificates.
    pub agent: AgentIdentity,
    /// This replica's name in the Lease.
    pub identity: String,
    /// Issued certificates' options.
    pub options: IssueOptions,
    /// Lifetime of a CA created here.
    pub ca_ttl: Duration,
    /// Leader-election Lease duration.
    pub lease_duration: Duration,
    /// The identity allocator's settings (the leader allocates pods' identities).
    pub identities: crate::identity_allocator::AllocatorOptions,
}

/// Name of keymgr's leader-election Lease.
pub const LEASE_NAME: &str = "nodeseal-keymgr";

/// Runs keymgr until `cancel` fires: while this replica leads, it allocates the pods'
/// security identities ([`crate::identity_allocator`]), loads (or creates) the CA, publishes
/// the trust bundle and decides CSRs.
pub async fn run_keymgr(settings: KeymgrSettings, cancel: CancellationToken) {
    let election = crate::leader::Election {
        namespace: settings.namespace.clone(),
        lease_name: LEASE_NAME.to_owned(),
        identity: settings.identity.clone(),
        lease_duration: settings.lease_duration,
    };
    let settings = Arc::new(settings);
    election
        .run(settings.client.clone(), cancel, move |term| {
            let settings = Arc::clone(&settings);
            async move { lead(&settings, term).await }
        })
        .await;
}

/// One term as leader.
async fn lead(settings: &KeymgrSettings, term: CancellationToken) {
    // Identities do not depend on the CA: allocation starts at once and ends with the term.
    let stop_allocator = term.child_token();
    let allocator = tokio::spawn(crate::identity_allocator::run(
        settings.store.clone(),
        settings.identities,
        stop_allocator.clone(),
    ));
    lead_signer(settings, &term).await;
    stop_allocator.cancel();
    if let Err(error) = allocator.await {
        warn!(%error, "the identity allocator task failed");
    }
}

/// The signing part of a term: CA, trust bundle, CSRs.
async fn lead_signer(settings: &KeymgrSettings, term: &CancellationToken) {
    let term = term.clone();
    let ca = loop {
        match load_or_create_ca(
            &settings.client,
            &settings.namespace,
            &settings.trust_domain,
            settings.ca_ttl,
        )
        .await
        {
            Ok(ca) => break ca,
            Err(error) => warn!(error = %format!("{error:#}"), "loading the cluster CA; retrying"),
        }
        tokio::select! {
            () = term.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    };
    while let Err(error) = crate::signer::publish_bundle(&settings.store, &ca).await {
        warn!(error = %crate::peer::error_chain(&error), "publishing the trust bundle; retrying");
        tokio::select! {
            () = term.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    let revoked = Arc::new(std::sync::RwLock::new(BTreeSet::new()));
    let follower = tokio::spawn(follow_revocations(
        settings.store.clone(),
        Arc::clone(&revoked),
        term.clone(),
    ));
    let is_revoked = move |node: &NodeName| {
        revoked
            .read()
            .map_or(true, |set| set.contains(node.as_str()))
    };
    run(
        settings.client.clone(),
        settings.agent.clone(),
        ca,
        settings.options,
        is_revoked,
        term,
    )
    .await;
    follower.abort();
}

/// Keeps `revoked` equal to the nodes the store lists as revoked.
async fn follow_revocations(
    store: Store,
    revoked: Arc<std::sync::RwLock<BTreeSet<String>>>,
    cancel: CancellationToken,
) {
    let mut events = store.watch(&[Kind::Revocation]);
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            e = events.next() => e,
        };
        let Some(event) = event else { return };
        let Ok(mut set) = revoked.write() else { return };
        match event {
            Event::Snapshot(s) | Event::Resynced(s) => {
                set.clear();
                for record in s.records {
                    if let Record::Revocation(r) = record
                        && r.serial.is_none()
                    {
                        set.insert(r.node.as_str().to_owned());
                    }
                }
            }
            Event::Put(Record::Revocation(r)) if r.serial.is_none() => {
                set.insert(r.node.as_str().to_owned());
            }
            Event::Deleted(key) => {
                if let Some(node) = key.node() {
                    set.remove(node.as_str());
                }
            }
            _ => {}
        }
    }
}

/// The Secret holding `ca` (certificate chain and PKCS#8 key).
fn ca_secret(namespace: &str, ca: &ClusterCa) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(
            [
                (
                    CA_CERT_KEY.to_owned(),
                    ByteString(ca.chain_pem().into_bytes()),
                ),
                (
                    CA_KEY_KEY.to_owned(),
                    ByteString(ca.key_pem().as_bytes().to_vec()),
                ),
            ]
            .into(),
        ),
        ..Secret::default()
    }
}

/// Stores an existing CA (`nodeseal ca import`) as the cluster CA, before keymgr first starts.
/// An existing CA Secret is never overwritten: replacing the CA under running agents is a CA
/// rollover, not an import.
///
/// # Errors
/// The apiserver's errors; a clear one when the Secret already exists.
pub async fn import_ca(client: &Client, namespace: &str, ca: &ClusterCa) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match secrets
        .create(&PostParams::default(), &ca_secret(namespace, ca))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => anyhow::bail!(
            "Secret {namespace}/{CA_SECRET} already exists: the cluster has a CA; delete the \
             Secret first only if no node depends on it"
        ),
        Err(e) => Err(e.into()),
    }
}

/// Approves and signs, or denies, every undecided CSR of [`SIGNER_NAME`] until cancelled.
/// `revoked` tells whether a node is revoked (from the store's revocation records).
pub async fn run(
    client: Client,
    agent: AgentIdentity,
    ca: ClusterCa,
    options: IssueOptions,
    revoked: impl Fn(&NodeName) -> bool + Send,
    cancel: CancellationToken,
) {
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &agent.namespace);
    let nodes: Api<Node> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    let mut events = watcher(csrs.clone(), config).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            e = events.next() => e,
        };
        let csr = match event {
            None => return,
            Some(Ok(watcher::Event::Apply(csr) | watcher::Event::InitApply(csr))) => csr,
            Some(Ok(_)) => continue,
            Some(Err(error)) => {
                warn!(%error, "watching CertificateSigningRequests; retrying");
                continue;
            }
        };
        if is_decided(&csr) {
            continue;
        }
        let name = csr.name_any();
        let decision = decide(&csr, &agent, ca.trust_domain(), &pods, &nodes, &revoked).await;
        let result = match decision {
            Ok((node, claims)) => {
                approve_and_sign(&csrs, &csr, &ca, &options, &node, &claims).await
            }
            Err(denial) => {
                warn!(csr = %name, reason = %denial, "denying node certificate request");
                set_condition(&csrs, &name, "Denied", "NodesealCheckFailed", &denial.0).await
            }
        };
        if let Err(error) = result {
            warn!(csr = %name, %error, "deciding a node certificate request");
        }
    }
}

async fn decide(
    csr: &CertificateSigningRequest,
    agent: &AgentIdentity,
    td: &TrustDomain,
    pods: &Api<Pod>,
    nodes: &Api<Node>,
    revoked: &impl Fn(&NodeName) -> bool,
) -> Result<(NodeName, NodeClaims), Denial> {
    let (pod_name, _) = requesting_pod(csr, agent)?;
    let pod = pods
        .get_opt(&pod_name)
        .await
        .map_err(|e| deny(format!("looking up pod {pod_name}: {e}")))?;
    let node_name = pod
        .as_ref()
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.node_name.clone());
    let (node_object, is_revoked) = match node_name.as_deref().map(NodeName::new) {
        Some(Ok(node)) => (
            nodes
                .get_opt(node.as_str())
                .await
                .map_err(|e| deny(format!("looking up node {node}: {e}")))?,
            revoked(&node),
        ),
        _ => (None, false),
    };
    let node = admit(
        csr,
        agent,
        td,
        &Facts {
            pod: pod.as_ref(),
            node_exists: node_object.is_some(),
            revoked: is_revoked,
        },
    )?;
    // What the certificate admits is what the Node object says the node owns: its InternalIPs
    // and the pod CIDRs the IPAM controller assigned, never what the agent asks for.
    let facts = node_object
        .as_ref()
        .map(NodeFacts::of)
        .transpose()
        .map_err(|e| deny(format!("node {node}: {e}")))?
        .ok_or_else(|| deny(format!("node {node} does not exist")))?;
    let claims = NodeClaims::new(&facts.internal_ips, &facts.pod_cidrs)
        .map_err(|e| deny(format!("node {node}: {e}")))?;
    Ok((node, claims))
}

async fn approve_and_sign(
    csrs: &Api<CertificateSigningRequest>,
    csr: &CertificateSigningRequest,
    ca: &ClusterCa,
    options: &IssueOptions,
    node: &NodeName,
    claims: &NodeClaims,
) -> anyhow::Result<()> {
    let name = csr.name_any();
    let der = pem_to_der(
        &String::from_utf8_lossy(&csr.spec.request.0),
        "CERTIFICATE REQUEST",
    )
    .ok_or_else(|| anyhow::anyhow!("CSR {name} is no PEM request"))?;
    let validated = validate_csr(&der, ca.trust_domain(), node)?;
    let chain = ca.issue(&validated, Some(claims), options)?;
    set_condition(
        csrs,
        &name,
        "Approved",
        "NodesealNodeIdentity",
        &format!("the requesting pod runs on node {node}; admitted {claims}"),
    )
    .await?;
    let chain_pem: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    // RBAC grants keymgr `update` (not `patch`) on the status subresource.
    let mut approved = csrs.get(&name).await?;
    approved
        .status
        .get_or_insert_with(Default::default)
        .certificate = Some(ByteString(chain_pem.into_bytes()));
    csrs.replace_status(&name, &PostParams::default(), &approved)
        .await?;
    info!(csr = %name, %node, "signed node SVID");
    Ok(())
}

async fn set_condition(
    csrs: &Api<CertificateSigningRequest>,
    name: &str,
    type_: &str,
    reason: &str,
    message: &str,
) -> anyhow::Result<()> {
    let current = csrs.get(name).await?;
    let mut conditions = current
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    conditions.push(CertificateSigningRequestCondition {
        type_: type_.to_owned(),
        status: "True".to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_update_time: Some(Time(Timestamp::now())),
        ..CertificateSigningRequestCondition::default()
    });
    // A PUT with the resourceVersion read above (RBAC grants `update` on the approval
    // subresource): a concurrent decision makes this fail instead of stacking conditions.
    let mut decided = current;
    decided
        .status
        .get_or_insert_with(Default::default)
        .conditions = Some(conditions);
    csrs.replace_subresource("approval", name, &PostParams::default(), &decided)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::expect_used,
        clippy::unwrap_used,
        reason = "tests: bad test input is a test failure"
    )]

    use nodeseal_keymgr::{NodeKey, create_csr};

    use super::*;

    fn agent() -> AgentIdentity {
        AgentIdentity {
            namespace: "nodeseal".into(),
            service_account: "nodeseal-agent".into(),
            daemon_set: "nodeseal-agent".into(),
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    /// A CSR for `for_node`'s identity, sent by `username` with a token bound to pod `agent-a`.
    fn csr(for_node: &str, username: &str, usages: &[&str]) -> CertificateSigningRequest {
        let key = NodeKey::generate().unwrap();
        let der = create_csr(&key, &td(), &NodeName::new(for_node).unwrap()).unwrap();
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "nodeseal-x" },
            "spec": {
                "request": base64_of(pem("CERTIFICATE REQUEST", der.as_ref()).as_bytes()),
                "signerName": SIGNER_NAME,
                "usages": usages,
                "username": username,
                "extra": {
                    POD_NAME_EXTRA: ["agent-a"],
                    POD_UID_EXTRA: ["uid-a"],
                },
            },
        }))
        .unwrap()
    }

    fn base64_of(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn pod(uid: &str, node: &str, owner: Option<&str>) -> Pod {
        let owners: Vec<serde_json::Value> = owner
            .map(|name| {
                serde_json::json!({
                    "apiVersion": "apps/v1", "kind": "DaemonSet", "name": name,
                    "uid": "ds-uid", "controller": true,
                })
            })
            .into_iter()
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "agent-a", "namespace": "nodeseal", "uid": uid,
                          "ownerReferences": owners },
            "spec": { "nodeName": node, "containers": [] },
        }))
        .unwrap()
    }

    const AGENT: &str = "system:serviceaccount:nodeseal:nodeseal-agent";
    const USAGES: &[&str] = &ALLOWED_USAGES;

    fn decide(csr: &CertificateSigningRequest, pod: Option<&Pod>) -> Result<NodeName, Denial> {
        admit(
            csr,
            &agent(),
            &td(),
            &Facts {
                pod,
                node_exists: true,
                revoked: false,
            },
        )
    }

    fn denied(result: Result<NodeName, Denial>, expected: &str) {
        match result {
            Err(Denial(message)) => assert!(message.contains(expected), "{message}"),
            Ok(node) => panic!("admitted {node}, expected a denial containing {expected:?}"),
        }
    }

    #[test]
    fn admits_the_agent_pod_of_the_node_it_runs_on() {
        let pod = pod("uid-a", "node-a", Some("nodeseal-agent"));
        let node = decide(&csr("node-a", AGENT, USAGES), Some(&pod)).unwrap();
        assert_eq!(node.as_str(), "node-a");
    }

    #[test]
    fn denies_each_failed_check_with_its_reason() {
        let good = pod("uid-a", "node-a", Some("nodeseal-agent"));
        denied(
            decide(
                &csr("node-a", "system:serviceaccount:default:other", USAGES),
                Some(&good),
            ),
            "is not the agent service account",
        );
        let mut unbound = csr("node-a", AGENT, USAGES);
        unbound.spec.extra = None;
        denied(decide(&unbound, Some(&good)), "not bound to a pod");
        denied(
            decide(&csr("node-a", AGENT, USAGES), None),
            "does not exist",
        );
        denied(
            decide(
                &csr("node-a", AGENT, USAGES),
                Some(&pod("uid-old", "node-a", Some("nodeseal-agent"))),
            ),
            "another UID",
        );
        denied(
            decide(
                &csr("node-a", AGENT, USAGES),
                Some(&pod("uid-a", "node-a", None)),
            ),
            "not owned by DaemonSet nodeseal-agent",
        );
        denied(
            decide(
                &csr("node-a", AGENT, USAGES),
                Some(&pod("uid-a", "node-a", Some("other"))),
            ),
            "not owned by DaemonSet nodeseal-agent",
        );
        denied(
            decide(&csr("node-b", AGENT, USAGES), Some(&good)),
            "does not ask for node node-a's identity",
        );
        denied(
            decide(
                &csr("node-a", AGENT, &["digital signature", "key encipherment"]),
                Some(&good),
            ),
            "usage \"key encipherment\"",
        );
        let csr = csr("node-a", AGENT, USAGES);
        let facts = |node_exists, revoked| Facts {
            pod: Some(&good),
            node_exists,
            revoked,
        };
        denied(
            admit(&csr, &agent(), &td(), &facts(false, false)),
            "node node-a does not exist",
        );
        denied(
            admit(&csr, &agent(), &td(), &facts(true, true)),
            "node node-a is revoked",
        );
    }

    #[test]
    fn garbage_requests_are_denied_not_panics() {
        let good = pod("uid-a", "node-a", Some("nodeseal-agent"));
        let mut garbage = csr("node-a", AGENT, USAGES);
        garbage.spec.request = ByteString(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .to_vec(),
        );
        denied(
            decide(&garbage, Some(&good)),
            "does not ask for node node-a's identity",
        );
        garbage.spec.request = ByteString(vec![0xff; 64]);
        denied(
            decide(&garbage, Some(&good)),
            "not one PEM CERTIFICATE REQUEST block",
        );
    }
}
