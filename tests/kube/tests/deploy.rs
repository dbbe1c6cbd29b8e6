//! The RBAC and admission objects of the Helm chart (deploy/helm/nodeseal) against a real
//! apiserver: who may write what.
//!
//! The chart is rendered by the real `helm template` and applied with the fixture's server-side
//! apply, so errors name the document.

#![allow(
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests"
)]

use std::{
    future::Future,
    time::{Duration, Instant},
};

use k8s_openapi::{
    ByteString,
    api::{
        certificates::v1::{
            CertificateSigningRequest, CertificateSigningRequestCondition,
            CertificateSigningRequestSpec, CertificateSigningRequestStatus,
        },
        core::v1::Secret,
    },
};
use kube::{
    Api, Client,
    api::{
        ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams,
        PostParams,
    },
    core::GroupVersionKind,
};
use nodeseal_kube_fixture::{API_AUDIENCE, KubeApiServer, pki};

const NS: &str = "nodeseal";
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(20);

struct Cluster {
    cluster: KubeApiServer,
    agent_a: Client,
    agent_b: Client,
    keymgr: Client,
}

fn nodesealnodes(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("nodeseal.io", "v1alpha1", "NodesealNode");
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "nodesealnodes"),
    )
}

fn nodeseal_node(name: &str, port: u16) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "nodeseal.io/v1alpha1",
        "kind": "NodesealNode",
        "metadata": { "name": name },
        "spec": {
            "handshakePort": port,
            "spiffeID": format!("spiffe://cluster.local/nodeseal/node/{name}"),
            "certificateSerial": "0a1b2c",
            "certificateNotAfter": "2030-01-01T00:00:00Z",
        },
    }))
    .expect("NodesealNode JSON")
}

/// Retries `check` until it returns Ok or `PROPAGATION_TIMEOUT` passes: RBAC and admission
/// policies reach the apiserver's authorizer and admission chain through informers, a moment
/// after they are written.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + PROPAGATION_TIMEOUT;
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("{what}: still failing: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The status code and message of an API error; panics on success or a non-API error.
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.message),
        other => panic!("{what}: expected an API error, got {other:?}"),
    }
}

async fn token_client(cluster: &mut KubeApiServer, pod: &str, node: &str, sa: &str) -> Client {
    let created = cluster
        .create_agent_pod(NS, pod, node, sa)
        .await
        .expect("pod");
    let uid = created.metadata.uid.expect("pod uid");
    let token = cluster
        .pod_bound_token(NS, sa, pod, &uid, API_AUDIENCE, Duration::from_secs(3600))
        .await
        .expect("pod-bound token");
    cluster
        .client_for_token(&token)
        .await
        .expect("token client")
}

async fn setup() -> Cluster {
    let mut cluster = KubeApiServer::start()
        .await
        .expect("starting control plane");
    // encryption.enabled renders keymgr's objects too.
    cluster
        .apply_chart(NS, &[("encryption.enabled", "true")])
        .await
        .expect("applying the chart");
    for (name, ip, cidr) in [
        ("node-a", "192.0.2.10", "10.244.1.0/24"),
        ("node-b", "192.0.2.11", "10.244.2.0/24"),
    ] {
        cluster
            .create_node(name, ip.parse().expect("ip"), &[cidr])
            .await
            .expect("node");
    }
    let agent_a = token_client(&mut cluster, "agent-a", "node-a", "nodeseal-agent").await;
    let agent_b = token_client(&mut cluster, "agent-b", "node-b", "nodeseal-agent").await;
    let keymgr = token_client(&mut cluster, "keymgr-0", "node-a", "nodeseal-keymgr").await;

    // Wait until RBAC and the admission policy are in force. The policy probe is a dry run,
    // so nothing is written if the policy is not active yet.
    eventually("agent RBAC", || async {
        nodesealnodes(&agent_a)
            .list(&ListParams::default())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
    eventually("keymgr RBAC", || async {
        Api::<CertificateSigningRequest>::all(keymgr.clone())
            .list(&ListParams::default())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
    eventually("own-node admission policy", || async {
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        match nodesealnodes(&agent_a)
            .create(&dry, &nodeseal_node("node-b", 4250))
            .await
        {
            Err(kube::Error::Api(s)) if s.message.contains("bound to node node-a") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("keymgr admission policy", || async {
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("probe".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match Api::<Secret>::namespaced(keymgr.clone(), NS)
            .create(&dry, &secret)
            .await
        {
            Err(kube::Error::Api(s)) if s.message.contains("may create only") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    Cluster {
        cluster,
        agent_a,
        agent_b,
        keymgr,
    }
}

#[tokio::test]
async fn agent_writes_only_its_own_nodesealnode() {
    if !nodeseal_kube_fixture::binaries_or_skip("deploy::agent_writes_only_its_own_nodesealnode") {
        return;
    }
    let Cluster {
        cluster,
        agent_a,
        agent_b,
        ..
    } = setup().await;
    let pp = PostParams::default();
    let mine = nodesealnodes(&agent_a);

    // (a) own record: create, update spec, write status.
    mine.create(&pp, &nodeseal_node("node-a", 4250))
        .await
        .expect("agent-a creates node-a");
    let spec = serde_json::json!({ "spec": { "handshakePort": 4251 } });
    let updated = mine
        .patch("node-a", &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .expect("agent-a updates node-a");
    assert_eq!(updated.data["spec"]["handshakePort"], 4251);
    let mut replaced = updated.clone();
    replaced.data["spec"]["certificateSerial"] = "ff".into();
    mine.replace("node-a", &pp, &replaced)
        .await
        .expect("agent-a replaces node-a");
    let status = serde_json::json!({ "status": { "summary": { "peersUp": 1, "epoch": 3 } } });
    let with_status = mine
        .patch_status("node-a", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("agent-a writes node-a status");
    assert_eq!(with_status.data["status"]["summary"]["epoch"], 3);

    // (b) another node's record: refused by the admission policy, whatever the verb.
    let (code, message) = api_error(
        mine.create(&pp, &nodeseal_node("node-b", 4250)).await,
        "agent-a creates node-b",
    );
    assert_eq!(code, 403);
    assert!(
        message.contains("bound to node node-a but tried to CREATE NodesealNode node-b"),
        "{message}"
    );
    nodesealnodes(&agent_b)
        .create(&pp, &nodeseal_node("node-b", 4250))
        .await
        .expect("agent-b creates its own node-b");
    let (code, message) = api_error(
        mine.patch("node-b", &PatchParams::default(), &Patch::Merge(&spec))
            .await,
        "agent-a updates node-b",
    );
    assert_eq!(code, 403);
    assert!(
        message.contains("bound to node node-a but tried to UPDATE NodesealNode node-b"),
        "{message}"
    );
    let (code, message) = api_error(
        mine.patch_status("node-b", &PatchParams::default(), &Patch::Merge(&status))
            .await,
        "agent-a writes node-b status",
    );
    assert_eq!(code, 403);
    assert!(
        message.contains("tried to UPDATE NodesealNode node-b"),
        "{message}"
    );
    let (code, message) = api_error(
        mine.delete("node-b", &DeleteParams::default()).await,
        "agent-a deletes node-b",
    );
    assert_eq!(code, 403);
    assert!(
        message.contains("bound to node node-a but tried to DELETE NodesealNode node-b"),
        "{message}"
    );

    // node-b is untouched, and the admin is not subject to the policy.
    let admin = nodesealnodes(&cluster.admin_client());
    let b = admin.get("node-b").await.expect("node-b");
    assert_eq!(b.data["spec"]["handshakePort"], 4250);
    admin
        .delete("node-b", &DeleteParams::default())
        .await
        .expect("admin deletes node-b");
    // An agent may delete its own record.
    mine.delete("node-a", &DeleteParams::default())
        .await
        .expect("agent-a deletes node-a");
}

fn csr(name: &str, signer: &str, usages: &[&str]) -> CertificateSigningRequest {
    let (request, _key) = pki::csr_pem(name).expect("CSR");
    CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.into_bytes()),
            signer_name: signer.into(),
            usages: Some(usages.iter().map(|u| (*u).to_string()).collect()),
            ..Default::default()
        },
        status: None,
    }
}

fn approved(mut csr: CertificateSigningRequest, by: &str) -> CertificateSigningRequest {
    csr.status = Some(CertificateSigningRequestStatus {
        conditions: Some(vec![CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some("NodesealTest".into()),
            message: Some(format!("approved by {by}")),
            ..Default::default()
        }]),
        ..Default::default()
    });
    csr
}

#[tokio::test]
async fn agent_cannot_read_secrets_or_approve_csrs() {
    if !nodeseal_kube_fixture::binaries_or_skip("deploy::agent_cannot_read_secrets_or_approve_csrs")
    {
        return;
    }
    let Cluster {
        cluster, agent_a, ..
    } = setup().await;
    let admin_secrets: Api<Secret> = Api::namespaced(cluster.admin_client(), NS);
    let ca = Secret {
        metadata: ObjectMeta {
            name: Some("nodeseal-ca".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    admin_secrets
        .create(&PostParams::default(), &ca)
        .await
        .expect("admin creates nodeseal-ca");

    // (c) no access to secrets at all.
    let secrets: Api<Secret> = Api::namespaced(agent_a.clone(), NS);
    let (code, _) = api_error(secrets.get("nodeseal-ca").await, "agent reads nodeseal-ca");
    assert_eq!(code, 403);
    let (code, _) = api_error(
        secrets.list(&ListParams::default()).await,
        "agent lists secrets",
    );
    assert_eq!(code, 403);
    let (code, _) = api_error(
        Api::<Secret>::all(agent_a.clone())
            .list(&ListParams::default())
            .await,
        "agent lists secrets cluster-wide",
    );
    assert_eq!(code, 403);

    // (d) may ask for a node certificate, may not approve or sign it.
    let csrs: Api<CertificateSigningRequest> = Api::all(agent_a);
    let created = csrs
        .create(
            &PostParams::default(),
            &csr(
                "node-a-1",
                "nodeseal.io/node",
                &["client auth", "server auth"],
            ),
        )
        .await
        .expect("agent creates a nodeseal.io/node CSR");
    let (code, message) = api_error(
        csrs.replace_subresource(
            "approval",
            "node-a-1",
            &PostParams::default(),
            &approved(created.clone(), "agent"),
        )
        .await,
        "agent approves its own CSR",
    );
    assert_eq!(code, 403, "{message}");
    let mut signed = created;
    signed.status = Some(CertificateSigningRequestStatus {
        certificate: Some(ByteString(
            pki::self_signed_pem("node-a").expect("cert").into_bytes(),
        )),
        ..Default::default()
    });
    let (code, message) = api_error(
        csrs.replace_status("node-a-1", &PostParams::default(), &signed)
            .await,
        "agent signs its own CSR",
    );
    assert_eq!(code, 403, "{message}");
}

#[tokio::test]
async fn keymgr_reads_ca_secret_and_approves_only_its_signer() {
    if !nodeseal_kube_fixture::binaries_or_skip(
        "deploy::keymgr_reads_ca_secret_and_approves_only_its_signer",
    ) {
        return;
    }
    let Cluster {
        cluster,
        agent_a,
        keymgr,
        ..
    } = setup().await;
    let pp = PostParams::default();

    // (e) the CA secret: keymgr creates it (only under its own name) and reads it back.
    let secrets: Api<Secret> = Api::namespaced(keymgr.clone(), NS);
    let named = |name: &str| Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some([("ca.crt".to_string(), "placeholder".to_string())].into()),
        ..Default::default()
    };
    secrets
        .create(&pp, &named("nodeseal-ca"))
        .await
        .expect("keymgr creates nodeseal-ca");
    let read = secrets
        .get("nodeseal-ca")
        .await
        .expect("keymgr reads nodeseal-ca");
    assert!(read.data.is_some_and(|d| d.contains_key("ca.crt")));
    let (code, message) = api_error(
        secrets.create(&pp, &named("other")).await,
        "keymgr creates other",
    );
    assert_eq!(code, 403);
    assert!(
        message.contains("may create only the secrets object nodeseal-ca, not other"),
        "{message}"
    );
    let (code, _) = api_error(
        secrets.list(&ListParams::default()).await,
        "keymgr lists secrets",
    );
    assert_eq!(code, 403);

    // Approve and sign the agent's CSR.
    Api::<CertificateSigningRequest>::all(agent_a)
        .create(
            &pp,
            &csr(
                "node-a-1",
                "nodeseal.io/node",
                &["client auth", "server auth"],
            ),
        )
        .await
        .expect("agent creates CSR");
    let csrs: Api<CertificateSigningRequest> = Api::all(keymgr.clone());
    let pending = csrs.get("node-a-1").await.expect("keymgr reads CSR");
    let requester = pending.spec.username.clone().expect("spec.username");
    assert_eq!(requester, "system:serviceaccount:nodeseal:nodeseal-agent");
    let pod = pending
        .spec
        .extra
        .as_ref()
        .and_then(|e| e.get("authentication.kubernetes.io/pod-name"))
        .and_then(|v| v.first().cloned())
        .expect("CSR records the requester's pod");
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(keymgr.clone(), NS);
    let node = pods
        .get(&pod)
        .await
        .expect("keymgr gets the requesting pod")
        .spec
        .and_then(|s| s.node_name);
    assert_eq!(node.as_deref(), Some("node-a"));
    let approved_csr = csrs
        .replace_subresource("approval", "node-a-1", &pp, &approved(pending, "keymgr"))
        .await
        .expect("keymgr approves a nodeseal.io/node CSR");
    let mut signed = approved_csr;
    if let Some(status) = signed.status.as_mut() {
        status.certificate = Some(ByteString(
            pki::self_signed_pem("node-a").expect("cert").into_bytes(),
        ));
    }
    let signed = csrs
        .replace_status("node-a-1", &pp, &signed)
        .await
        .expect("keymgr signs it");
    assert!(
        signed
            .status
            .and_then(|s| s.certificate)
            .is_some_and(|c| !c.0.is_empty())
    );

    // Another signer: the CSR exists (created by the admin), keymgr may not approve it.
    let admin_csrs: Api<CertificateSigningRequest> = Api::all(cluster.admin_client());
    let foreign = admin_csrs
        .create(
            &pp,
            &csr(
                "someone",
                "kubernetes.io/kube-apiserver-client",
                &["digital signature", "client auth"],
            ),
        )
        .await
        .expect("admin creates a kube-apiserver-client CSR");
    let (code, message) = api_error(
        csrs.replace_subresource("approval", "someone", &pp, &approved(foreign, "keymgr"))
            .await,
        "keymgr approves a kubernetes.io CSR",
    );
    assert_eq!(code, 403);
    assert!(
        message.contains("kubernetes.io/kube-apiserver-client"),
        "{message}"
    );
}

/// An identity ConfigMap as the store writes it (`nodeseal-identities-<hash>`).
fn identity_config_map(name: &str) -> k8s_openapi::api::core::v1::ConfigMap {
    k8s_openapi::api::core::v1::ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("nodeseal.io/kind".to_string(), "identities".to_string())].into()),
            ..Default::default()
        },
        data: Some(
            [(
                "record.json".to_string(),
                r#"{"number":256,"labels":"k8s:org=empire"}"#.to_string(),
            )]
            .into(),
        ),
        ..Default::default()
    }
}

/// Identity policy in Kubernetes mode: agents read pods, policies and identities but cannot
/// write an identity (authentication is not authorization: a node must not decide which label
/// sets exist); keymgr, the allocator, can create, update and delete identity ConfigMaps and
/// no other ConfigMap but the trust bundle.
#[tokio::test]
async fn only_keymgr_writes_identities() {
    use k8s_openapi::api::core::v1::{ConfigMap, Pod};
    use k8s_openapi::api::networking::v1::NetworkPolicy;

    if !nodeseal_kube_fixture::binaries_or_skip("deploy::only_keymgr_writes_identities") {
        return;
    }
    let Cluster {
        cluster,
        agent_a,
        keymgr,
        ..
    } = setup().await;
    let pp = PostParams::default();
    let name = "nodeseal-identities-0123456789abcdef0123";

    // The agent reads what the policy engine needs, everywhere.
    Api::<Pod>::all(agent_a.clone())
        .list(&ListParams::default())
        .await
        .expect("agent lists pods");
    Api::<k8s_openapi::api::core::v1::Namespace>::all(agent_a.clone())
        .list(&ListParams::default())
        .await
        .expect("agent lists namespaces");
    Api::<NetworkPolicy>::all(agent_a.clone())
        .list(&ListParams::default())
        .await
        .expect("agent lists NetworkPolicies");
    for (kind, plural) in [
        ("NodesealNetworkPolicy", "nodesealnetworkpolicies"),
        (
            "NodesealClusterwideNetworkPolicy",
            "nodesealclusterwidenetworkpolicies",
        ),
    ] {
        let gvk = GroupVersionKind::gvk("nodeseal.io", "v1alpha1", kind);
        Api::<DynamicObject>::all_with(
            agent_a.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        )
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("agent lists {kind}: {e}"));
    }

    // The agent cannot create an identity, nor a policy.
    let agent_cms: Api<ConfigMap> = Api::namespaced(agent_a.clone(), NS);
    let (code, message) = api_error(
        agent_cms.create(&pp, &identity_config_map(name)).await,
        "agent creates an identity",
    );
    assert_eq!(code, 403, "{message}");
    let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "allow-all", "namespace": NS },
        "spec": { "podSelector": {}, "ingress": [{}] },
    }))
    .expect("NetworkPolicy");
    let (code, _) = api_error(
        Api::<NetworkPolicy>::namespaced(agent_a.clone(), NS)
            .create(&pp, &np)
            .await,
        "agent creates a NetworkPolicy",
    );
    assert_eq!(code, 403);

    // keymgr creates, updates and deletes it; the agent reads it.
    let keymgr_cms: Api<ConfigMap> = Api::namespaced(keymgr.clone(), NS);
    let mut created = keymgr_cms
        .create(&pp, &identity_config_map(name))
        .await
        .expect("keymgr creates an identity");
    agent_cms.get(name).await.expect("agent reads the identity");
    created.data = identity_config_map(name).data;
    keymgr_cms
        .replace(name, &pp, &created)
        .await
        .expect("keymgr updates an identity");
    let (code, _) = api_error(
        agent_cms.delete(name, &DeleteParams::default()).await,
        "agent deletes an identity",
    );
    assert_eq!(code, 403);
    keymgr_cms
        .delete(name, &DeleteParams::default())
        .await
        .expect("keymgr deletes an identity");
    // keymgr reads every pod (to allocate their label sets' identities).
    Api::<Pod>::all(keymgr.clone())
        .list(&ListParams::default())
        .await
        .expect("keymgr lists pods");

    // Any other ConfigMap stays out of keymgr's reach (admission, as RBAC cannot name them).
    let (code, message) = api_error(
        keymgr_cms.create(&pp, &identity_config_map("other")).await,
        "keymgr creates another ConfigMap",
    );
    assert_eq!(code, 403);
    assert!(
        message.contains("identity ConfigMaps, not other"),
        "{message}"
    );
    Api::<ConfigMap>::namespaced(cluster.admin_client(), NS)
        .create(&pp, &identity_config_map("operator-owned"))
        .await
        .expect("an operator's ConfigMap");
    let (code, message) = api_error(
        keymgr_cms
            .delete("operator-owned", &DeleteParams::default())
            .await,
        "keymgr deletes another ConfigMap",
    );
    assert_eq!(code, 403);
    assert!(message.contains("may delete only"), "{message}");
}
