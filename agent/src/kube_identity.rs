//! The node certificate in Kubernetes mode: a `certificates.k8s.io/v1` CertificateSigningRequest
//! of signer `nodeseal.io/node`, created with the agent pod's own token (so keymgr can check
//! which pod, and so which node, asked), then watched until keymgr signs or denies it.

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use nodeseal_keymgr::svid::certs_from_pem;
use nodeseal_keymgr::{NodeIdentity, NodeKey, NodeName, TrustDomain, create_csr};

use crate::identity::{IdentityError, invalid, pem};
use crate::kube_signer::{ALLOWED_USAGES, SIGNER_NAME};

/// The CSR object's name: unique per request (the spec of a CSR cannot change), recognisable
/// per node.
fn csr_name(node: &NodeName, request: &[u8]) -> String {
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, request));
    let node = node.as_str();
    if node.len() <= 200 {
        format!("nodeseal-{node}-{}", &digest[..12])
    } else {
        format!("nodeseal-{}", &digest[..40])
    }
}

/// Requests a certificate for `key` and waits for it.
///
/// # Errors
/// [`IdentityError::Denied`] with keymgr's reason, [`IdentityError::NotSigned`] on timeout,
/// [`IdentityError::Kube`] when the apiserver refuses.
pub async fn request_certificate(
    client: &Client,
    td: &TrustDomain,
    node: &NodeName,
    key: NodeKey,
    timeout: Duration,
) -> Result<NodeIdentity, IdentityError> {
    let csr = create_csr(&key, td, node).map_err(|e| invalid(format!("creating CSR: {e}")))?;
    let request = pem("CERTIFICATE REQUEST", csr.as_ref()).into_bytes();
    let name = csr_name(node, &request);
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let object = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request),
            signer_name: SIGNER_NAME.to_owned(),
            usages: Some(ALLOWED_USAGES.iter().map(|u| (*u).to_owned()).collect()),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    };
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(source) => {
            return Err(IdentityError::Kube {
                what: format!("creating CertificateSigningRequest {name}"),
                source,
            });
        }
    }
    let key_pem = key.to_pem();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let wait = async {
        while let Some(event) = events.next().await {
            let csr = match event {
                Ok(watcher::Event::Apply(csr) | watcher::Event::InitApply(csr)) => csr,
                Ok(_) => continue,
                Err(error) => {
                    tracing::warn!(%error, csr = %name, "watching the CSR; retrying");
                    continue;
                }
            };
            let Some(status) = csr.status else { continue };
            if let Some(refusal) = status
                .conditions
                .iter()
                .flatten()
                .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
            {
                return Err(IdentityError::Denied {
                    csr: name.clone(),
                    reason: refusal.message.clone().unwrap_or_default(),
                });
            }
            let Some(certificate) = status.certificate.filter(|c| !c.0.is_empty()) else {
                continue;
            };
            let chain = certs_from_pem(&certificate.0)
                .map_err(|e| invalid(format!("certificate of CSR {name}: {e}")))?;
            let candidate = NodeKey::from_pem(key_pem.as_bytes()).map_err(invalid)?;
            return NodeIdentity::new(chain, candidate)
                .map_err(|e| invalid(format!("certificate of CSR {name}: {e}")));
        }
        Err(IdentityError::NotSigned(timeout))
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or(Err(IdentityError::NotSigned(timeout)))
}
