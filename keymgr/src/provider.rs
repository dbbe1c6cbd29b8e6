//! The process's TLS policy in one place: ring, TLS 1.3 only, AES-GCM suites only, X25519 only.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::{cipher_suite, default_provider, kx_group};

/// TLS protocol versions nodeseal speaks: 1.3 only.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The ring provider restricted to `TLS13_AES_256_GCM_SHA384`, `TLS13_AES_128_GCM_SHA256` and
/// X25519 key exchange.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    provider.kx_groups = vec![kx_group::X25519];
    Arc::new(provider)
}
