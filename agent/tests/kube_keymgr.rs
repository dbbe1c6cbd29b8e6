//! keymgr's Kubernetes mode against a real kube-apiserver, with the RBAC, admission policies
//! and agent DaemonSet of the Helm chart (`deploy/helm/nodeseal`): every client below
//! authenticates with a token bound to a pod, as it would in a cluster.
//!
//! - an agent gets its own node's SVID through a CertificateSigningRequest;
//! - a CSR for another node's identity, from a pod the agent DaemonSet does not own, or for a
//!   revoked node is Denied with the failed check, and no certificate is issued;
//! - keymgr created the CA Secret and published the trust bundle the agents read;
//! - of two keymgr replicas one leads; when it stops, the other takes over and signs.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up or expectation is a test failure"
)]

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, ListParams};
use nodeseal_agent::identity::IdentityError;
use nodeseal_agent::kube_identity::request_certificate;
use nodeseal_agent::kube_signer::{AgentIdentity, KeymgrSettings, LEASE_NAME, run_keymgr};
use nodeseal_keymgr::{IssueOptions, NodeKey, NodeName, TrustDomain};
use nodeseal_kube_fixture::{API_AUDIENCE, KubeApiServer, binaries_or_skip, client_for_kubeconfig};
use nodeseal_store::{KubeStore, Revocation, Store, TrustBundle};
use tokio_util::sync::CancellationToken;

const NS: &str = "nodeseal";
const DAEMONSET: &str = "nodeseal-agent";
const SIGN_TIMEOUT: Duration = Duration::from_secs(30);

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

fn kube_store(client: &Client) -> Store {
    Store::new(KubeStore::from_client(
        client.clone(),
        NS.to_owned(),
        "cluster.local".to_owned(),
    ))
}

/// A client whose token is bound to a new pod on `node_name` running as `service_account`,
/// owned by the DaemonSet `owner` if given.
async fn pod_client(
    cluster: &mut KubeApiServer,
    pod: &str,
    node_name: &str,
    service_account: &str,
    owner: Option<&DaemonSet>,
) -> Client {
    let kubeconfig = match owner {
        Some(ds) => cluster
            .create_daemon_set_pod(ds, pod, node_name, service_account)
            .await
            .expect("DaemonSet pod"),
        None => {
            let created = cluster
                .create_agent_pod(NS, pod, node_name, service_account)
                .await
                .expect("pod");
            let uid = created.metadata.uid.expect("pod uid");
            let token = cluster
                .pod_bound_token(
                    NS,
                    service_account,
                    pod,
                    &uid,
                    API_AUDIENCE,
                    Duration::from_secs(3600),
                )
                .await
                .expect("pod-bound token");
            cluster.kubeconfig_for_token(&token).expect("kubeconfig")
        }
    };
    client_for_kubeconfig(&kubeconfig).await.expect("client")
}

struct Setup {
    cluster: KubeApiServer,
    agent_a: Client,
    agent_b: Client,
    impostor: Client,
    keymgr: [Client; 2],
}

async fn setup() -> Setup {
    let mut cluster = KubeApiServer::start().await.expect("control plane");
    cluster
        .apply_chart(NS, &[("encryption.enabled", "true")])
        .await
        .expect("applying the chart");
    for (name, ip, cidr) in [
        ("node-a", "192.0.2.10", "10.244.1.0/24"),
        ("node-b", "192.0.2.11", "10.244.2.0/24"),
    ] {
        cluster
            .create_node(name, ip.parse().unwrap(), &[cidr])
            .await
            .expect("node");
    }
    // The chart's DaemonSet: keymgr checks agent pods are owned by it.
    let ds = cluster
        .daemon_set(NS, DAEMONSET)
        .await
        .expect("the chart's DaemonSet");
    let agent_a = pod_client(
        &mut cluster,
        "agent-a",
        "node-a",
        "nodeseal-agent",
        Some(&ds),
    )
    .await;
    let agent_b = pod_client(
        &mut cluster,
        "agent-b",
        "node-b",
        "nodeseal-agent",
        Some(&ds),
    )
    .await;
    // Runs as the agent's ServiceAccount on node-a, but no DaemonSet owns it.
    let impostor = pod_client(&mut cluster, "impostor", "node-a", "nodeseal-agent", None).await;
    let keymgr = [
        pod_client(&mut cluster, "keymgr-0", "node-a", "nodeseal-keymgr", None).await,
        pod_client(&mut cluster, "keymgr-1", "node-b", "nodeseal-keymgr", None).await,
    ];
    // RBAC reaches the authorizer a moment after it is written.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Api::<CertificateSigningRequest>::all(keymgr[0].clone())
        .list(&ListParams::default())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "keymgr RBAC not in force");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Setup {
        cluster,
        agent_a,
        agent_b,
        impostor,
        keymgr,
    }
}

fn keymgr(
    client: &Client,
    identity: &str,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let settings = KeymgrSettings {
        client: client.clone(),
        store: kube_store(client),
        trust_domain: td(),
        namespace: NS.to_owned(),
        agent: AgentIdentity {
            namespace: NS.to_owned(),
            service_account: "nodeseal-agent".to_owned(),
            daemon_set: DAEMONSET.to_owned(),
        },
        identity: identity.to_owned(),
        options: IssueOptions::with_ttl(Duration::from_secs(3600)),
        ca_ttl: Duration::from_secs(86_400),
        lease_duration: Duration::from_secs(3),
        identities: nodeseal_agent::identity_allocator::AllocatorOptions::default(),
    };
    tokio::spawn(run_keymgr(settings, cancel.child_token()))
}

async fn request(client: &Client, name: &str) -> Result<String, IdentityError> {
    let key = NodeKey::generate().unwrap();
    request_certificate(client, &td(), &node(name), key, SIGN_TIMEOUT)
        .await
        .map(|identity| identity.info().spiffe_id.to_string())
}

async fn lease_holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), NS)
        .get_opt(LEASE_NAME)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymgr_signs_only_for_the_node_the_agent_pod_runs_on() {
    if !binaries_or_skip("kube_keymgr::keymgr_signs_only_for_the_node_the_agent_pod_runs_on") {
        return;
    }
    let setup = setup().await;
    let cancel = CancellationToken::new();
    let first = CancellationToken::new();
    let replica0 = keymgr(&setup.keymgr[0], "keymgr-0", &first);
    let deadline = Instant::now() + Duration::from_secs(20);
    while lease_holder(&setup.cluster.admin_client()).await.as_deref() != Some("keymgr-0") {
        assert!(Instant::now() < deadline, "keymgr-0 never led");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replica1 = keymgr(&setup.keymgr[1], "keymgr-1", &cancel);

    // The agent on node-a gets node-a's identity.
    assert_eq!(
        request(&setup.agent_a, "node-a")
            .await
            .expect("node-a's SVID"),
        "spiffe://cluster.local/node/node-a"
    );
    // The bundle the agents trust was published by keymgr, from the CA it keeps in a Secret.
    let bundle = kube_store(&setup.agent_a)
        .get::<TrustBundle>(&())
        .await
        .expect("agent reads the bundle");
    assert!(bundle.is_some(), "keymgr published the trust bundle");

    // node-a's agent asks for node-b's identity: denied, with the reason, no certificate.
    match request(&setup.agent_a, "node-b").await {
        Err(IdentityError::Denied { csr, reason }) => {
            assert!(
                reason.contains("node node-a") && reason.contains("node-b"),
                "{reason}"
            );
            let object = Api::<CertificateSigningRequest>::all(setup.cluster.admin_client())
                .get(&csr)
                .await
                .expect("the denied CSR");
            let issued = object.status.and_then(|s| s.certificate);
            assert!(issued.is_none(), "no certificate for a denied CSR");
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    // A pod of the agent's ServiceAccount that the DaemonSet does not own.
    match request(&setup.impostor, "node-a").await {
        Err(IdentityError::Denied { reason, .. }) => {
            assert!(reason.contains("not owned by DaemonSet"), "{reason}");
        }
        other => panic!("expected a denial, got {other:?}"),
    }

    // The leader stops: the standby takes the Lease and signs.
    first.cancel();
    replica0.await.expect("replica 0");
    let deadline = Instant::now() + Duration::from_secs(30);
    while lease_holder(&setup.cluster.admin_client()).await.as_deref() != Some("keymgr-1") {
        assert!(Instant::now() < deadline, "keymgr-1 never took over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        request(&setup.agent_b, "node-b")
            .await
            .expect("node-b's SVID"),
        "spiffe://cluster.local/node/node-b"
    );

    // A revoked node gets nothing.
    kube_store(&setup.cluster.admin_client())
        .put(&Revocation {
            node: nodeseal_store::NodeName::new("node-b").unwrap(),
            serial: None,
            revoked_at: SystemTime::now(),
        })
        .await
        .expect("revoke node-b");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match request(&setup.agent_b, "node-b").await {
            Err(IdentityError::Denied { reason, .. }) => {
                assert!(reason.contains("revoked"), "{reason}");
                break;
            }
            // keymgr's revocation watch had not delivered it yet.
            Ok(_) if Instant::now() < deadline => {}
            other => panic!("expected a denial for a revoked node, got {other:?}"),
        }
    }
    cancel.cancel();
    replica1.await.expect("replica 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_ca_is_the_one_keymgr_signs_with() {
    if !binaries_or_skip("kube_keymgr::an_imported_ca_is_the_one_keymgr_signs_with") {
        return;
    }
    let setup = setup().await;
    let admin = setup.cluster.admin_client();
    let ca = nodeseal_keymgr::ClusterCa::generate(td(), Duration::from_secs(86_400)).unwrap();
    nodeseal_agent::kube_signer::import_ca(&admin, NS, &ca)
        .await
        .expect("import");
    let again = nodeseal_agent::kube_signer::import_ca(&admin, NS, &ca).await;
    assert!(
        again.unwrap_err().to_string().contains("already exists"),
        "an existing CA is never overwritten"
    );
    // keymgr (with its own token) loads it rather than creating one.
    let loaded = nodeseal_agent::kube_signer::load_or_create_ca(
        &setup.keymgr[0],
        NS,
        &td(),
        Duration::from_secs(86_400),
    )
    .await
    .expect("keymgr loads the CA");
    assert_eq!(loaded.certificate(), ca.certificate());
}

/// With the chart's RBAC and admission policies: keymgr (the leader) allocates the pods'
/// identities and collects them when the pods go; an agent reads identities but its own
/// allocation is refused (403), as a node must not decide which label sets exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymgr_allocates_identities_agents_cannot() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::DeleteParams;
    use nodeseal_store::{Identity, StoreError};

    if !binaries_or_skip("kube_keymgr::keymgr_allocates_identities_agents_cannot") {
        return;
    }
    let setup = setup().await;
    setup
        .cluster
        .create_namespace("empire")
        .await
        .expect("namespace");
    setup
        .cluster
        .create_workload_pod(
            "empire",
            "deathstar",
            "node-a",
            &[("class", "deathstar")],
            &["10.244.1.10"],
            false,
        )
        .await
        .expect("pod");
    let cancel = CancellationToken::new();
    let replica = {
        let client = &setup.keymgr[0];
        let settings = KeymgrSettings {
            client: client.clone(),
            store: kube_store(client),
            trust_domain: td(),
            namespace: NS.to_owned(),
            agent: AgentIdentity {
                namespace: NS.to_owned(),
                service_account: "nodeseal-agent".to_owned(),
                daemon_set: DAEMONSET.to_owned(),
            },
            identity: "keymgr-0".to_owned(),
            options: IssueOptions::with_ttl(Duration::from_secs(3600)),
            ca_ttl: Duration::from_secs(86_400),
            lease_duration: Duration::from_secs(3),
            identities: nodeseal_agent::identity_allocator::AllocatorOptions {
                grace: Duration::from_secs(1),
            },
        };
        tokio::spawn(run_keymgr(settings, cancel.child_token()))
    };

    // The agent sees the identity keymgr allocated for deathstar's labels.
    let agent_store = kube_store(&setup.agent_a);
    let deadline = Instant::now() + SIGN_TIMEOUT;
    let identity = loop {
        let listed = agent_store
            .list::<Identity>()
            .await
            .expect("agent lists identities");
        if let Some(identity) = listed
            .records
            .into_iter()
            .find(|i| i.labels.to_string().starts_with("k8s:class=deathstar,"))
        {
            break identity;
        }
        assert!(Instant::now() < deadline, "keymgr allocated no identity");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(identity.number.get() >= 256);

    // The agent cannot allocate one itself.
    let error = agent_store
        .allocate_identity(&"k8s:org=alliance".parse().unwrap())
        .await
        .expect_err("agents cannot write identities");
    match &error {
        StoreError::Backend { source, .. } => {
            let api = source
                .downcast_ref::<kube::Error>()
                .expect("a Kubernetes error");
            assert!(
                matches!(api, kube::Error::Api(status) if status.code == 403),
                "{api:?}"
            );
        }
        other => panic!("expected a 403, got {other:?}"),
    }

    // The pod goes: keymgr collects its identity after the grace period.
    Api::<Pod>::namespaced(setup.cluster.admin_client(), "empire")
        .delete("deathstar", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete");
    let deadline = Instant::now() + SIGN_TIMEOUT;
    while agent_store
        .get::<Identity>(&identity.number)
        .await
        .expect("get")
        .is_some()
    {
        assert!(Instant::now() < deadline, "identity never collected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cancel.cancel();
    replica.await.expect("keymgr stops");
}
