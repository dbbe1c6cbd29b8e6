//! nodeseal-spiffe-bridge: the node's X.509-SVID and trust bundle from a SPIFFE Workload API
//! (for clusters that already run SPIRE), instead of keymgr's CA.
//!
//! What it owns: connecting to the Workload API (`unix:` or `tcp:` endpoint, normally the value of
//! [`ENDPOINT_SOCKET_ENV`], read by the agent's config), picking the node's SVID, and following
//! updates ([`SvidWatcher`]), reconnecting with backoff when the stream ends.
//!
//! What it hands over is plain data ([`NodeSvid`]: DER chain, zeroizing PKCS#8 key, the trust
//! domain's CA certificates); the agent turns it into keymgr's `NodeIdentity` and `TrustBundle`,
//! which validate it. This crate does not depend on keymgr (crates do not depend sideways), does
//! not verify peers, and never writes keys anywhere.

#![warn(missing_docs)]

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context};
use zeroize::Zeroizing;

/// The environment variable naming the Workload API endpoint (SPIFFE Workload Endpoint spec).
pub const ENDPOINT_SOCKET_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";
/// First reconnect delay after the update stream fails.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Workload API errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// Connecting, calling or reading the Workload API failed.
    #[error("workload API request failed")]
    WorkloadApi {
        /// The client's error.
        #[source]
        source: WorkloadApiError,
    },
    /// The response holds no SVID matching the selector.
    #[error("workload API returned no SVID matching {selector}")]
    NoMatchingSvid {
        /// The selector.
        selector: String,
    },
    /// The response holds no bundle for the SVID's trust domain.
    #[error("workload API returned no bundle for trust domain {trust_domain}")]
    NoBundle {
        /// The SVID's trust domain.
        trust_domain: String,
    },
    /// The update stream ended; the watcher reconnects on the next call.
    #[error("workload API update stream ended")]
    StreamEnded,
}

impl From<WorkloadApiError> for BridgeError {
    fn from(source: WorkloadApiError) -> Self {
        Self::WorkloadApi { source }
    }
}

/// Which of the workload's SVIDs is the node identity.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SvidSelector {
    /// The first (default) SVID of the response.
    Default,
    /// The SVID with exactly this SPIFFE ID.
    SpiffeId(String),
}

impl fmt::Display for SvidSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SvidSelector::Default => f.write_str("the default SVID"),
            SvidSelector::SpiffeId(id) => write!(f, "SPIFFE ID {id}"),
        }
    }
}

/// A node SVID and its trust domain's bundle, as plain data.
pub struct NodeSvid {
    spiffe_id: String,
    trust_domain: String,
    chain: Vec<Vec<u8>>,
    key: Zeroizing<Vec<u8>>,
    bundle: Vec<Vec<u8>>,
}

impl NodeSvid {
    /// The SVID's SPIFFE ID.
    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// The SVID's trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Certificate chain, leaf first, each DER.
    pub fn chain_der(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// The private key, PKCS#8 DER (secret; zeroized on drop).
    pub fn key_pkcs8_der(&self) -> &Zeroizing<Vec<u8>> {
        &self.key
    }

    /// The trust domain's X.509 authorities, each DER.
    pub fn bundle_der(&self) -> &[Vec<u8>] {
        &self.bundle
    }

    /// Picks the SVID and its bundle out of a Workload API context.
    ///
    /// # Errors
    /// [`BridgeError::NoMatchingSvid`], [`BridgeError::NoBundle`].
    pub fn from_context(ctx: &X509Context, selector: &SvidSelector) -> Result<Self, BridgeError> {
        let svid = match selector {
            SvidSelector::Default => ctx.default_svid(),
            SvidSelector::SpiffeId(id) => ctx
                .svids()
                .iter()
                .find(|s| s.spiffe_id().to_string() == *id),
        }
        .ok_or_else(|| BridgeError::NoMatchingSvid {
            selector: selector.to_string(),
        })?;
        let td = svid.spiffe_id().trust_domain();
        let bundle = ctx
            .bundle_set()
            .get(td)
            .ok_or_else(|| BridgeError::NoBundle {
                trust_domain: td.to_string(),
            })?;
        Ok(Self {
            spiffe_id: svid.spiffe_id().to_string(),
            trust_domain: td.to_string(),
            chain: svid
                .cert_chain()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect(),
            key: Zeroizing::new(svid.private_key().as_ref().to_vec()),
            bundle: bundle
                .authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect(),
        })
    }
}

impl fmt::Debug for NodeSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain_len", &self.chain.len())
            .field("key", &"[redacted]")
            .field("bundle_len", &self.bundle.len())
            .finish()
    }
}

/// A connected Workload API client.
#[derive(Clone)]
pub struct WorkloadSource {
    client: WorkloadApiClient,
    selector: SvidSelector,
}

impl WorkloadSource {
    /// Connects to `endpoint` (`unix:/path`, `unix:///path` or `tcp:host:port`).
    ///
    /// # Errors
    /// [`BridgeError::WorkloadApi`] for a bad endpoint or a failed connection.
    pub async fn connect(endpoint: &str, selector: SvidSelector) -> Result<Self, BridgeError> {
        let client = WorkloadApiClient::connect_to(endpoint).await?;
        Ok(Self { client, selector })
    }

    /// Fetches the current node SVID and bundle once.
    ///
    /// # Errors
    /// [`BridgeError`].
    pub async fn fetch(&self) -> Result<NodeSvid, BridgeError> {
        let ctx = self.client.fetch_x509_context().await?;
        NodeSvid::from_context(&ctx, &self.selector)
    }

    /// A watcher that yields every update (the first item is the current SVID).
    pub fn watch(&self) -> SvidWatcher {
        SvidWatcher {
            source: self.clone(),
            stream: None,
            backoff: MIN_BACKOFF,
            failed: false,
        }
    }
}

impl fmt::Debug for WorkloadSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadSource")
            .field("selector", &self.selector)
            .finish_non_exhaustive()
    }
}

type ContextStream = Pin<Box<dyn Stream<Item = Result<X509Context, WorkloadApiError>> + Send>>;

/// Follows SVID and bundle updates over the Workload API's streaming RPC.
pub struct SvidWatcher {
    source: WorkloadSource,
    stream: Option<ContextStream>,
    backoff: Duration,
    failed: bool,
}

impl SvidWatcher {
    /// Waits for the next update.
    ///
    /// An error means the stream failed or ended; it is returned so the caller can log and count
    /// it, and the next call reopens the stream after a backoff (doubling from [`MIN_BACKOFF`] to
    /// [`MAX_BACKOFF`], reset by a successful update). Cancel-safe only between updates: drop the
    /// future and the watcher reconnects on the next call.
    ///
    /// # Errors
    /// [`BridgeError`].
    pub async fn next(&mut self) -> Result<NodeSvid, BridgeError> {
        if self.failed {
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            self.failed = false;
        }
        let result = self.next_inner().await;
        match &result {
            Ok(svid) => {
                self.backoff = MIN_BACKOFF;
                tracing::debug!(spiffe_id = %svid.spiffe_id, "workload API update");
            }
            Err(e) => {
                tracing::warn!(error = %e, "workload API stream failed; will reconnect");
                self.stream = None;
                self.failed = true;
            }
        }
        result
    }

    async fn next_inner(&mut self) -> Result<NodeSvid, BridgeError> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let s = self.source.client.stream_x509_contexts().await?;
                self.stream.insert(Box::pin(s))
            }
        };
        match stream.next().await {
            Some(Ok(ctx)) => NodeSvid::from_context(&ctx, &self.source.selector),
            Some(Err(e)) => Err(e.into()),
            None => Err(BridgeError::StreamEnded),
        }
    }
}

impl fmt::Debug for SvidWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidWatcher")
            .field("source", &self.source)
            .field("connected", &self.stream.is_some())
            .field("backoff", &self.backoff)
            .finish()
    }
}
