//! spiffe-bridge against a real SPIFFE Workload API gRPC server started in the test: tonic over a
//! Unix socket, SVIDs made with rcgen, the `workload.spiffe.io: true` header enforced as the
//! SPIFFE Workload Endpoint spec requires.

#![expect(clippy::unwrap_used, reason = "test helpers panic on set-up failure")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodeseal_spiffe_bridge::{BridgeError, SvidSelector, WorkloadSource};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};

/// `X509SVIDRequest` (empty).
#[derive(Clone, PartialEq, prost::Message)]
struct X509SvidRequest {}

/// `X509SVIDResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    federated_bundles: std::collections::HashMap<String, Vec<u8>>,
}

/// `X509SVID`.
#[derive(Clone, PartialEq, prost::Message)]
struct X509Svid {
    #[prost(string, tag = "1")]
    spiffe_id: String,
    #[prost(bytes = "vec", tag = "2")]
    x509_svid: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    x509_svid_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    hint: String,
}

const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";

/// The Workload API server: streams the current response and every later change.
#[derive(Clone)]
struct WorkloadApi {
    current: watch::Receiver<X509SvidResponse>,
    /// End each stream after its first response (like an agent restart).
    one_shot: bool,
}

impl tonic::server::NamedService for WorkloadApi {
    const NAME: &'static str = "SpiffeWorkloadAPI";
}

struct FetchX509<'a>(&'a WorkloadApi);

impl tonic::server::ServerStreamingService<X509SvidRequest> for FetchX509<'_> {
    type Response = X509SvidResponse;
    type ResponseStream = tonic::codegen::BoxStream<X509SvidResponse>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, _req: tonic::Request<X509SvidRequest>) -> Self::Future {
        let rx = self.0.current.clone();
        let one_shot = self.0.one_shot;
        Box::pin(async move {
            let stream: tonic::codegen::BoxStream<X509SvidResponse> = if one_shot {
                Box::pin(tokio_stream::once(Ok(rx.borrow().clone())))
            } else {
                Box::pin(tokio_stream::wrappers::WatchStream::new(rx).map(Ok))
            };
            Ok(tonic::Response::new(stream))
        })
    }
}

impl<B> Service<http::Request<B>> for WorkloadApi
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let header_ok = req
                .headers()
                .get("workload.spiffe.io")
                .is_some_and(|v| v == "true");
            if !header_ok {
                return Ok(
                    tonic::Status::invalid_argument("security header missing from request")
                        .into_http(),
                );
            }
            if req.uri().path() != FETCH_X509_SVID {
                return Ok(tonic::Status::unimplemented("not served by this test").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.server_streaming(FetchX509(&this), req).await)
        })
    }
}

struct Pki {
    ca_key: rcgen::KeyPair,
    ca_params: rcgen::CertificateParams,
    ca_der: Vec<u8>,
}

impl Pki {
    fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_der = ca_params.self_signed(&ca_key).unwrap().der().to_vec();
        Self {
            ca_key,
            ca_params,
            ca_der,
        }
    }

    fn svid(&self, id: &str) -> X509Svid {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        X509Svid {
            spiffe_id: id.to_owned(),
            x509_svid: cert.der().to_vec(),
            x509_svid_key: key.serialize_der(),
            bundle: self.ca_der.clone(),
            hint: String::new(),
        }
    }
}

fn response(svids: Vec<X509Svid>) -> X509SvidResponse {
    X509SvidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles: Default::default(),
    }
}

async fn serve(path: &Path, rx: watch::Receiver<X509SvidResponse>) {
    serve_with(path, rx, false).await;
}

async fn serve_with(path: &Path, rx: watch::Receiver<X509SvidResponse>, one_shot: bool) {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkloadApi {
                current: rx,
                one_shot,
            })
            .serve_with_incoming(incoming),
    );
}

fn socket(dir: &tempfile::TempDir) -> (PathBuf, String) {
    let path = dir.path().join("api.sock");
    let endpoint = format!("unix:{}", path.display());
    (path, endpoint)
}

#[tokio::test]
async fn fetches_and_follows_updates() {
    let pki = Pki::new();
    let first = pki.svid("spiffe://example.org/node/worker-1");
    let (tx, rx) = watch::channel(response(vec![first.clone()]));
    let dir = tempfile::tempdir().unwrap();
    let (path, endpoint) = socket(&dir);
    serve(&path, rx).await;

    let source = WorkloadSource::connect(&endpoint, SvidSelector::Default)
        .await
        .unwrap();
    let svid = source.fetch().await.unwrap();
    assert_eq!(svid.spiffe_id(), "spiffe://example.org/node/worker-1");
    assert_eq!(svid.trust_domain(), "example.org");
    assert_eq!(svid.chain_der(), std::slice::from_ref(&first.x509_svid));
    assert_eq!(
        svid.key_pkcs8_der().as_slice(),
        first.x509_svid_key.as_slice()
    );
    assert_eq!(svid.bundle_der(), std::slice::from_ref(&pki.ca_der));
    assert!(format!("{svid:?}").contains("[redacted]"));

    let mut watcher = source.watch();
    let initial = watcher.next().await.unwrap();
    assert_eq!(initial.chain_der(), std::slice::from_ref(&first.x509_svid));

    // Rotation: the agent sees the new SVID without asking again.
    let second = pki.svid("spiffe://example.org/node/worker-1");
    tx.send(response(vec![second.clone()])).unwrap();
    let rotated = tokio::time::timeout(Duration::from_secs(10), watcher.next())
        .await
        .expect("update within 10 s")
        .unwrap();
    assert_eq!(rotated.chain_der(), std::slice::from_ref(&second.x509_svid));
    assert_ne!(rotated.chain_der(), initial.chain_der());

    // Selecting a specific SVID among several.
    let other = pki.svid("spiffe://example.org/workload/x");
    tx.send(response(vec![other, second.clone()])).unwrap();
    let by_id = WorkloadSource::connect(
        &endpoint,
        SvidSelector::SpiffeId("spiffe://example.org/node/worker-1".into()),
    )
    .await
    .unwrap();
    assert_eq!(
        by_id.fetch().await.unwrap().chain_der(),
        std::slice::from_ref(&second.x509_svid)
    );
    let missing = WorkloadSource::connect(
        &endpoint,
        SvidSelector::SpiffeId("spiffe://example.org/node/nope".into()),
    )
    .await
    .unwrap();
    assert!(matches!(
        missing.fetch().await,
        Err(BridgeError::NoMatchingSvid { .. })
    ));
}

#[tokio::test]
async fn server_enforces_security_header() {
    let pki = Pki::new();
    let (_tx, rx) = watch::channel(response(vec![pki.svid("spiffe://example.org/node/a")]));
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = socket(&dir);
    serve(&path, rx).await;

    // A raw gRPC client without the header is refused with InvalidArgument.
    let uds = path.clone();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:0")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let uds = uds.clone();
            async move {
                let s = tokio::net::UnixStream::connect(uds).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let call = |with_header: bool| {
        let mut req = tonic::Request::new(X509SvidRequest {});
        if with_header {
            req.metadata_mut()
                .insert("workload.spiffe.io", "true".parse().unwrap());
        }
        req
    };
    let err = grpc
        .server_streaming(
            call(false),
            http::uri::PathAndQuery::from_static(FETCH_X509_SVID),
            tonic_prost::ProstCodec::<X509SvidRequest, X509SvidResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    grpc.ready().await.unwrap();
    let mut ok = grpc
        .server_streaming(
            call(true),
            http::uri::PathAndQuery::from_static(FETCH_X509_SVID),
            tonic_prost::ProstCodec::<X509SvidRequest, X509SvidResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let first = ok.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
}

#[tokio::test]
async fn unreachable_endpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, endpoint) = socket(&dir);
    let res = match WorkloadSource::connect(&endpoint, SvidSelector::Default).await {
        Ok(source) => source.fetch().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(matches!(res, Err(BridgeError::WorkloadApi { .. })));
    assert!(matches!(
        WorkloadSource::connect("http://nope", SvidSelector::Default).await,
        Err(BridgeError::WorkloadApi { .. })
    ));
}

#[tokio::test]
async fn watcher_reconnects_after_stream_ends() {
    let pki = Pki::new();
    let first = pki.svid("spiffe://example.org/node/worker-2");
    let (tx, rx) = watch::channel(response(vec![first.clone()]));
    let dir = tempfile::tempdir().unwrap();
    let (path, endpoint) = socket(&dir);
    serve_with(&path, rx, true).await;
    let source = WorkloadSource::connect(&endpoint, SvidSelector::Default)
        .await
        .unwrap();
    let mut watcher = source.watch();
    assert_eq!(
        watcher.next().await.unwrap().chain_der(),
        std::slice::from_ref(&first.x509_svid)
    );
    assert!(matches!(
        watcher.next().await,
        Err(BridgeError::StreamEnded)
    ));
    let second = pki.svid("spiffe://example.org/node/worker-2");
    tx.send(response(vec![second.clone()])).unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), watcher.next())
        .await
        .expect("reconnect within 10 s")
        .unwrap();
    assert_eq!(again.chain_der(), std::slice::from_ref(&second.x509_svid));
}
