//! The key-agreement handshake: mutual TLS 1.3 over any async byte stream, then one Hello each
//! way, then keys from the TLS exporter.
//!
//! ```text
//! initiator (TLS client)                     responder (TLS server)
//!   TLS 1.3 handshake, both sides verify the other's node SVID
//!   Hello{node, epoch, inbound_spi, ..}  ->
//!                                        <-  Hello{.., same epoch, inbound_spi, ..} | Reject
//!   both derive SessionKeys; optionally Installed{epoch} <-> Installed{epoch}
//! ```
//!
//! The functions here never sleep or spawn; callers wrap them in their runtime's timeout
//! (`keymgr/PROTOCOL.md` gives the values). Every handshake builds its own rustls config with a
//! verifier that knows which peer it expects, so a certificate for the wrong node fails the TLS
//! handshake itself. Resumption is disabled: each handshake is a full one with fresh ECDHE and a
//! fresh certificate check, which is what makes revocation immediate and rekeys forward secret.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::id::NodeName;
use crate::keys::{SessionKeys, Side, SpiPair, derive};
use crate::protocol::{
    Epoch, HEADER_LEN, Hello, Message, MessageError, Mode, RejectReason, WgProof, decode_body,
    decode_header, write_message,
};
use crate::svid::NodeIdentity;
use crate::verifier::{ExpectedPeer, PeerIdentity, PeerRole, TrustStore, VerifyError};

/// Default TCP port of the handshake listener.
pub const DEFAULT_HANDSHAKE_PORT: u16 = 4250;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The local identity cannot be used (key type, chain).
    #[error("local identity cannot be used for TLS: {detail}")]
    Identity {
        /// What rustls reported.
        detail: String,
    },
    /// We rejected the peer's certificate.
    #[error("peer certificate rejected")]
    PeerCertificate {
        /// Which check failed.
        #[source]
        source: VerifyError,
    },
    /// The peer offered only TLS versions other than 1.3.
    #[error("peer does not speak TLS 1.3")]
    UnsupportedTlsVersion,
    /// No common cipher suite, group or signature scheme.
    #[error("peer's TLS parameters are incompatible: {detail}")]
    Incompatible {
        /// What rustls reported.
        detail: String,
    },
    /// The peer aborted the TLS handshake with an alert (for example: it rejected our
    /// certificate).
    #[error("peer sent TLS alert {alert}")]
    AlertReceived {
        /// The alert.
        alert: String,
    },
    /// Another TLS failure.
    #[error("TLS failure: {detail}")]
    Tls {
        /// What rustls reported.
        detail: String,
    },
    /// The transport failed.
    #[error("transport error")]
    Io {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A protocol message was bad (version, size, encoding).
    #[error("protocol message error")]
    Message {
        /// What was wrong.
        #[source]
        source: MessageError,
    },
    /// A valid message that does not belong at this point.
    #[error("unexpected message, expected {expected}")]
    UnexpectedMessage {
        /// What was expected.
        expected: &'static str,
    },
    /// The peer refused to continue.
    #[error("peer rejected the handshake: {reason:?}")]
    Rejected {
        /// Its reason.
        reason: RejectReason,
    },
    /// The Hello names another node than the certificate.
    #[error("peer authenticated as {authenticated} but its Hello says {claimed}")]
    HelloNodeMismatch {
        /// Node from the certificate.
        authenticated: NodeName,
        /// Node in the Hello.
        claimed: NodeName,
    },
    /// The epochs differ.
    #[error("epoch mismatch: initiator {initiator}, responder {responder}")]
    EpochMismatch {
        /// The initiator's epoch.
        initiator: Epoch,
        /// The responder's epoch.
        responder: Epoch,
    },
    /// The modes differ.
    #[error("mode mismatch: ours {ours:?}, peer's {theirs:?}")]
    ModeMismatch {
        /// Our mode.
        ours: Mode,
        /// The peer's mode.
        theirs: Mode,
    },
    /// Our own Hello is for another node than our identity.
    #[error("BUG: local Hello names {hello}, identity is {identity}")]
    LocalHelloMismatch {
        /// Node in the Hello.
        hello: NodeName,
        /// Node of the identity.
        identity: NodeName,
    },
}

impl From<MessageError> for HandshakeError {
    fn from(source: MessageError) -> Self {
        Self::Message { source }
    }
}

/// Everything needed to run handshakes as this node: TLS policy, peer verification and our SVID.
///
/// Cheap to clone. Build a new one when the SVID is renewed; handshakes already running keep the
/// old one.
#[derive(Clone)]
pub struct HandshakeConfig {
    provider: Arc<CryptoProvider>,
    trust: TrustStore,
    certified: Arc<CertifiedKey>,
    local: NodeName,
}

impl HandshakeConfig {
    /// Combines the trust store (who we accept) with our identity (what we present).
    ///
    /// # Errors
    /// [`HandshakeError::Identity`] when the key cannot sign TLS handshakes.
    pub fn new(trust: TrustStore, identity: &NodeIdentity) -> Result<Self, HandshakeError> {
        let provider = crate::provider::crypto_provider();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key().pkcs8_der()));
        // Borrowed DER: no unzeroized copy of the key is made on the way into ring.
        let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| {
            HandshakeError::Identity {
                detail: e.to_string(),
            }
        })?;
        let certified = CertifiedKey::new(identity.chain().to_vec(), signing);
        Ok(Self {
            provider,
            trust,
            certified: Arc::new(certified),
            local: identity.node().clone(),
        })
    }

    /// Our node name.
    pub fn local_node(&self) -> &NodeName {
        &self.local
    }

    /// The trust store.
    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    fn check_local_hello(&self, hello: &Hello) -> Result<(), HandshakeError> {
        hello.validate()?;
        if hello.node != self.local {
            return Err(HandshakeError::LocalHelloMismatch {
                hello: hello.node.clone(),
                identity: self.local.clone(),
            });
        }
        Ok(())
    }

    fn client_config(&self, verifier: Arc<PeerVerifier>) -> Result<ClientConfig, HandshakeError> {
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(crate::provider::PROTOCOL_VERSIONS)
            .map_err(tls_config_error)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(FixedCert(self.certified.clone())));
        cfg.resumption = Resumption::disabled();
        cfg.enable_sni = false;
        Ok(cfg)
    }

    fn server_config(&self, verifier: Arc<PeerVerifier>) -> Result<ServerConfig, HandshakeError> {
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(crate::provider::PROTOCOL_VERSIONS)
            .map_err(tls_config_error)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(FixedCert(self.certified.clone())));
        cfg.session_storage = Arc::new(NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(cfg)
    }
}

impl std::fmt::Debug for HandshakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeConfig")
            .field("local", &self.local)
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

/// The authenticated channel left after a successful handshake.
pub struct Channel<S> {
    tls: TlsStream<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    /// Tells the peer our inbound SA for `epoch` is installed and waits until the peer says the
    /// same; after this both sides may switch their outbound traffic to the new SA.
    ///
    /// # Errors
    /// [`HandshakeError::Message`], [`HandshakeError::Rejected`],
    /// [`HandshakeError::UnexpectedMessage`], [`HandshakeError::EpochMismatch`].
    pub async fn confirm_installed(&mut self, epoch: Epoch) -> Result<(), HandshakeError> {
        write_message(&mut self.tls, &Message::Installed { epoch }).await?;
        match recv(&mut self.tls).await? {
            Message::Installed { epoch: e } if e == epoch => Ok(()),
            Message::Installed { epoch: e } => Err(HandshakeError::EpochMismatch {
                initiator: epoch,
                responder: e,
            }),
            Message::Reject { reason } => Err(HandshakeError::Rejected { reason }),
            Message::Hello(_) | Message::Possession { .. } => {
                Err(HandshakeError::UnexpectedMessage {
                    expected: "Installed",
                })
            }
        }
    }

    /// Sends our proof of holding the private key of the WireGuard public key we announced, and
    /// returns the peer's (WireGuard mode, after the Hellos, before installing). Sends before
    /// reading, so both sides can call it at once.
    ///
    /// # Errors
    /// [`HandshakeError::Message`], [`HandshakeError::Rejected`],
    /// [`HandshakeError::UnexpectedMessage`].
    pub async fn exchange_possession(&mut self, ours: WgProof) -> Result<WgProof, HandshakeError> {
        write_message(&mut self.tls, &Message::Possession { proof: ours }).await?;
        match recv(&mut self.tls).await? {
            Message::Possession { proof } => Ok(proof),
            Message::Reject { reason } => Err(HandshakeError::Rejected { reason }),
            Message::Hello(_) | Message::Installed { .. } => {
                Err(HandshakeError::UnexpectedMessage {
                    expected: "Possession",
                })
            }
        }
    }

    /// Sends a Reject and closes the channel.
    ///
    /// # Errors
    /// [`HandshakeError::Message`] or [`HandshakeError::Io`].
    pub async fn reject(mut self, reason: RejectReason) -> Result<(), HandshakeError> {
        write_message(&mut self.tls, &Message::Reject { reason }).await?;
        self.close().await
    }

    /// Sends TLS close_notify and shuts the stream down.
    ///
    /// # Errors
    /// [`HandshakeError::Io`].
    pub async fn close(mut self) -> Result<(), HandshakeError> {
        self.tls
            .shutdown()
            .await
            .map_err(|source| HandshakeError::Io { source })
    }

    /// The underlying transport (for example to read the peer's address).
    pub fn transport(&self) -> &S {
        self.tls.get_ref().0
    }
}

impl<S> std::fmt::Debug for Channel<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channel")
    }
}

/// A finished key agreement.
#[derive(Debug)]
#[non_exhaustive]
pub struct Agreement<S> {
    /// The verified peer.
    pub peer: PeerIdentity,
    /// What the peer announced.
    pub peer_hello: Hello,
    /// The derived keys.
    pub keys: SessionKeys,
    /// The channel, for `Installed` confirmation; drop or close it when done.
    pub channel: Channel<S>,
}

/// A responder's state after the peer's Hello arrived: decide, then [`Incoming::respond`] or
/// [`Incoming::reject`].
#[derive(Debug)]
pub struct Incoming<S> {
    config: HandshakeConfig,
    peer: PeerIdentity,
    peer_hello: Hello,
    channel: Channel<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Incoming<S> {
    /// The verified peer.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// The peer's Hello.
    pub fn peer_hello(&self) -> &Hello {
        &self.peer_hello
    }

    /// The transport (for example to compare the peer address with the node's IPs).
    pub fn transport(&self) -> &S {
        self.channel.transport()
    }

    /// Sends our Hello (same epoch and mode as the peer's) and derives the keys.
    ///
    /// # Errors
    /// [`HandshakeError::EpochMismatch`] or [`HandshakeError::ModeMismatch`] (a Reject is sent
    /// to the peer), message and transport errors.
    pub async fn respond(mut self, hello: Hello) -> Result<Agreement<S>, HandshakeError> {
        self.config.check_local_hello(&hello)?;
        if let Err((reason, err)) = check_agreement(&self.peer_hello, &hello) {
            let _ = self.channel.reject(reason).await;
            return Err(err);
        }
        write_message(&mut self.channel.tls, &Message::Hello(hello.clone())).await?;
        let keys = export_keys(
            &self.channel.tls,
            Side::Responder,
            hello.epoch,
            &self.peer_hello,
            &hello,
        )?;
        Ok(Agreement {
            peer: self.peer,
            peer_hello: self.peer_hello,
            keys,
            channel: self.channel,
        })
    }

    /// Refuses the handshake.
    ///
    /// # Errors
    /// Transport errors while sending the Reject.
    pub async fn reject(self, reason: RejectReason) -> Result<(), HandshakeError> {
        self.channel.reject(reason).await
    }
}

/// Runs the initiator side over `stream`: TLS with `peer` expected, our Hello, the peer's Hello,
/// keys.
///
/// # Errors
/// [`HandshakeError`]; [`HandshakeError::PeerCertificate`] says exactly why the peer's SVID was
/// refused.
pub async fn initiate<S>(
    config: &HandshakeConfig,
    stream: S,
    peer: &NodeName,
    hello: Hello,
) -> Result<Agreement<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    config.check_local_hello(&hello)?;
    let verifier = Arc::new(PeerVerifier::new(
        config,
        ExpectedPeer::Node(peer.clone()),
        PeerRole::Server,
    ));
    let client = config.client_config(verifier.clone())?;
    let name = ServerName::try_from(peer.as_str().to_owned()).map_err(|e| HandshakeError::Tls {
        detail: e.to_string(),
    })?;
    let tls = TlsConnector::from(Arc::new(client))
        .connect(name, stream)
        .await
        .map_err(|e| handshake_error(e, &verifier))?;
    let peer_id = verifier.identity()?;
    let mut tls = TlsStream::Client(tls);
    write_message(&mut tls, &Message::Hello(hello.clone())).await?;
    let peer_hello = match recv(&mut tls).await? {
        Message::Hello(h) => h,
        Message::Reject { reason } => return Err(HandshakeError::Rejected { reason }),
        Message::Installed { .. } | Message::Possession { .. } => {
            return Err(HandshakeError::UnexpectedMessage { expected: "Hello" });
        }
    };
    let channel = Channel { tls };
    if peer_hello.node != peer_id.node {
        let _ = channel.reject(RejectReason::InvalidHello).await;
        return Err(HandshakeError::HelloNodeMismatch {
            authenticated: peer_id.node,
            claimed: peer_hello.node,
        });
    }
    if let Err((reason, err)) = check_agreement(&hello, &peer_hello) {
        let _ = channel.reject(reason).await;
        return Err(err);
    }
    let keys = export_keys(
        &channel.tls,
        Side::Initiator,
        hello.epoch,
        &hello,
        &peer_hello,
    )?;
    Ok(Agreement {
        peer: peer_id,
        peer_hello,
        keys,
        channel,
    })
}

/// Runs the responder side up to the peer's Hello. `expected` is the node the transport's peer
/// address belongs to, or [`ExpectedPeer::AnyNode`] to decide after looking at
/// [`Incoming::peer`].
///
/// # Errors
/// [`HandshakeError`]; [`HandshakeError::UnsupportedTlsVersion`] for a TLS 1.2 client.
pub async fn accept<S>(
    config: &HandshakeConfig,
    stream: S,
    expected: ExpectedPeer,
) -> Result<Incoming<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let verifier = Arc::new(PeerVerifier::new(config, expected, PeerRole::Client));
    let server = config.server_config(verifier.clone())?;
    let tls = TlsAcceptor::from(Arc::new(server))
        .accept(stream)
        .await
        .map_err(|e| handshake_error(e, &verifier))?;
    let peer = verifier.identity()?;
    let mut channel = Channel {
        tls: TlsStream::Server(tls),
    };
    let peer_hello = match recv(&mut channel.tls).await {
        Ok(Message::Hello(h)) => h,
        Ok(Message::Reject { reason }) => return Err(HandshakeError::Rejected { reason }),
        Ok(Message::Installed { .. } | Message::Possession { .. }) => {
            let _ = channel.reject(RejectReason::InvalidHello).await;
            return Err(HandshakeError::UnexpectedMessage { expected: "Hello" });
        }
        Err(e @ HandshakeError::Message { .. }) => {
            let _ = channel.reject(RejectReason::InvalidHello).await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if peer_hello.node != peer.node {
        let _ = channel.reject(RejectReason::InvalidHello).await;
        return Err(HandshakeError::HelloNodeMismatch {
            authenticated: peer.node,
            claimed: peer_hello.node,
        });
    }
    Ok(Incoming {
        config: config.clone(),
        peer,
        peer_hello,
        channel,
    })
}

/// Which of two nodes initiates the handshake for their pair: the one with the lower node name.
/// A rekey wanted by the other one is requested by connecting anyway; on a collision see
/// [`keep_initiated_by`].
pub fn is_initiator(local: &NodeName, peer: &NodeName) -> bool {
    local < peer
}

/// Collision resolution when both nodes initiated at once for the same pair: keep the handshake
/// initiated by the lower node name, abandon the other (its responder answers
/// [`RejectReason::Collision`]).
pub fn keep_initiated_by<'a>(a: &'a NodeName, b: &'a NodeName) -> &'a NodeName {
    if a <= b { a } else { b }
}

/// Whether `ip` is one of the addresses the peer announced.
pub fn hello_lists_ip(hello: &Hello, ip: IpAddr) -> bool {
    hello.node_ips.contains(&ip)
}

/// Reads one message; transport errors keep their cause, so a TLS alert the peer sent after the
/// handshake (TLS 1.3 clients learn about a rejected certificate only then) is reported as such.
async fn recv<S: AsyncRead + AsyncWrite + Unpin>(
    tls: &mut TlsStream<S>,
) -> Result<Message, HandshakeError> {
    let mut header = [0u8; HEADER_LEN];
    tls.read_exact(&mut header).await.map_err(stream_error)?;
    let (ty, len) = decode_header(header)?;
    let mut body = vec![0u8; len];
    tls.read_exact(&mut body).await.map_err(stream_error)?;
    Ok(decode_body(ty, &body)?)
}

fn stream_error(e: std::io::Error) -> HandshakeError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => HandshakeError::AlertReceived {
            alert: format!("{a:?}"),
        },
        _ if e.kind() == std::io::ErrorKind::UnexpectedEof => HandshakeError::Message {
            source: MessageError::Truncated,
        },
        _ => HandshakeError::Io { source: e },
    }
}

fn check_agreement(
    initiator: &Hello,
    responder: &Hello,
) -> Result<(), (RejectReason, HandshakeError)> {
    if initiator.epoch != responder.epoch {
        return Err((
            RejectReason::EpochMismatch,
            HandshakeError::EpochMismatch {
                initiator: initiator.epoch,
                responder: responder.epoch,
            },
        ));
    }
    if initiator.mode != responder.mode {
        return Err((
            RejectReason::ModeMismatch,
            HandshakeError::ModeMismatch {
                ours: initiator.mode,
                theirs: responder.mode,
            },
        ));
    }
    Ok(())
}

fn export_keys<S>(
    tls: &TlsStream<S>,
    side: Side,
    epoch: Epoch,
    initiator: &Hello,
    responder: &Hello,
) -> Result<SessionKeys, HandshakeError> {
    let spis = SpiPair {
        initiator: initiator.inbound_spi,
        responder: responder.inbound_spi,
    };
    let host_spis = initiator
        .host_spi
        .zip(responder.host_spi)
        .map(|(initiator, responder)| SpiPair {
            initiator,
            responder,
        });
    let result = match tls {
        TlsStream::Client(s) => {
            let conn = s.get_ref().1;
            derive(
                |out: &mut [u8], label: &[u8], ctx: &[u8]| {
                    conn.export_keying_material(out, label, Some(ctx))
                        .map(|_| ())
                },
                side,
                epoch,
                spis,
                host_spis,
            )
        }
        TlsStream::Server(s) => {
            let conn = s.get_ref().1;
            derive(
                |out: &mut [u8], label: &[u8], ctx: &[u8]| {
                    conn.export_keying_material(out, label, Some(ctx))
                        .map(|_| ())
                },
                side,
                epoch,
                spis,
                host_spis,
            )
        }
    };
    result.map_err(|e| HandshakeError::Tls {
        detail: e.to_string(),
    })
}

fn tls_config_error(e: rustls::Error) -> HandshakeError {
    HandshakeError::Identity {
        detail: e.to_string(),
    }
}

fn handshake_error(e: std::io::Error, verifier: &PeerVerifier) -> HandshakeError {
    if let Some(err) = verifier.take_error() {
        return HandshakeError::PeerCertificate { source: err };
    }
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return HandshakeError::Io { source: e };
    };
    use rustls::PeerIncompatible as P;
    match tls {
        rustls::Error::PeerIncompatible(
            P::SupportedVersionsExtensionRequired
            | P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled
            | P::ServerDoesNotSupportTls12Or13
            | P::ServerTlsVersionIsDisabledByOurConfig,
        ) => HandshakeError::UnsupportedTlsVersion,
        rustls::Error::PeerIncompatible(p) => HandshakeError::Incompatible {
            detail: format!("{p:?}"),
        },
        rustls::Error::AlertReceived(a) => HandshakeError::AlertReceived {
            alert: format!("{a:?}"),
        },
        other => HandshakeError::Tls {
            detail: other.to_string(),
        },
    }
}

/// Resolves to our one certificate, as client and as server.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// One connection's verifier: checks the peer with the [`TrustStore`] and keeps the outcome so
/// the handshake can return the typed identity or error.
#[derive(Debug)]
struct PeerVerifier {
    trust: TrustStore,
    expected: ExpectedPeer,
    role: PeerRole,
    algs: WebPkiSupportedAlgorithms,
    outcome: Mutex<Option<Result<PeerIdentity, VerifyError>>>,
}

impl PeerVerifier {
    fn new(config: &HandshakeConfig, expected: ExpectedPeer, role: PeerRole) -> Self {
        Self {
            trust: config.trust.clone(),
            expected,
            role,
            algs: config.provider.signature_verification_algorithms,
            outcome: Mutex::new(None),
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        let result = self.trust.verify(&chain, now, self.role, &self.expected);
        let ret = match &result {
            Ok(_) => Ok(()),
            Err(e) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(e.clone()))),
            )),
        };
        *self.lock() = Some(result);
        ret
    }

    fn identity(&self) -> Result<PeerIdentity, HandshakeError> {
        match self.lock().take() {
            Some(Ok(id)) => Ok(id),
            Some(Err(source)) => Err(HandshakeError::PeerCertificate { source }),
            // rustls always calls the verifier before completing a handshake with mandatory
            // client auth and a custom server verifier.
            None => Err(HandshakeError::Tls {
                detail: "BUG: handshake completed without certificate verification".to_owned(),
            }),
        }
    }

    fn take_error(&self) -> Option<VerifyError> {
        match self.lock().take() {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Result<PeerIdentity, VerifyError>>> {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
