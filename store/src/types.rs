//! Validated identifiers used in store records: [`NodeName`], [`SpiffeId`], [`WgPublicKey`],
//! [`CertSerial`], and the PEM shape check shared by the CSR and certificate records.
//!
//! These are the store's own types: the agent converts them to and from the other crates'
//! types. The one nodeseal crate the store depends on is nodeseal-policy, for label sets and to
//! validate stored policy documents (see `record/workload.rs`).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Why a value failed to parse as one of the store's identifiers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Not a DNS-1123 subdomain.
    #[error("invalid node name {value:?}: {reason}")]
    NodeName {
        /// The rejected input (truncated to 80 characters).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a SPIFFE ID.
    #[error("invalid SPIFFE ID {value:?}: {reason}")]
    SpiffeId {
        /// The rejected input (truncated to 80 characters).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a base64 Curve25519 public key.
    #[error("invalid WireGuard public key: {reason}")]
    WgPublicKey {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a certificate serial number in hex.
    #[error("invalid certificate serial {value:?}: {reason}")]
    CertSerial {
        /// The rejected input (truncated to 80 characters).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Keeps rejected input in error messages short.
fn excerpt(value: &str) -> String {
    value.chars().take(80).collect()
}

/// A Kubernetes node name: a DNS-1123 subdomain (at most 253 characters; dot-separated labels of
/// 1 to 63 lowercase letters, digits and `-`, each starting and ending with a letter or digit).
///
/// It is also a safe file name and etcd key segment: it never contains `/`, `:` or NUL and never
/// starts with `.`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

impl NodeName {
    /// Longest accepted name (DNS-1123 subdomain).
    pub const MAX_LEN: usize = 253;

    /// Parses and validates a node name.
    ///
    /// # Errors
    ///
    /// [`IdError::NodeName`] naming the rule the input breaks.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        match Self::check(&value) {
            Ok(()) => Ok(Self(value)),
            Err(reason) => Err(IdError::NodeName {
                value: excerpt(&value),
                reason,
            }),
        }
    }

    fn check(value: &str) -> Result<(), &'static str> {
        if value.is_empty() {
            return Err("empty");
        }
        if value.len() > Self::MAX_LEN {
            return Err("longer than 253 characters");
        }
        for label in value.split('.') {
            if label.is_empty() {
                return Err("empty label");
            }
            if label.len() > 63 {
                return Err("label longer than 63 characters");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err("only lowercase letters, digits, '-' and '.' are allowed");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err("labels must start and end with a letter or digit");
            }
        }
        Ok(())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeName {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for NodeName {
    type Error = IdError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<NodeName> for String {
    fn from(value: NodeName) -> Self {
        value.0
    }
}

/// A SPIFFE ID (`spiffe://<trust domain>/<path>`) with a non-empty path, checked against the
/// SPIFFE ID specification's character rules. The store does not require the nodeseal node
/// shape (`/node/<name>`): with SPIRE the agent's identity may have another path; the handshake
/// verifier compares presented IDs with the one recorded here.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId(String);

impl SpiffeId {
    /// Longest accepted ID (the SPIFFE specification's URI limit).
    pub const MAX_LEN: usize = 2048;
    const SCHEME: &'static str = "spiffe://";

    /// Parses and validates a SPIFFE ID.
    ///
    /// # Errors
    ///
    /// [`IdError::SpiffeId`] naming the rule the input breaks.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        match Self::check(&value) {
            Ok(()) => Ok(Self(value)),
            Err(reason) => Err(IdError::SpiffeId {
                value: excerpt(&value),
                reason,
            }),
        }
    }

    fn check(value: &str) -> Result<(), &'static str> {
        if value.len() > Self::MAX_LEN {
            return Err("longer than 2048 bytes");
        }
        let Some(rest) = value.strip_prefix(Self::SCHEME) else {
            return Err("scheme must be spiffe://");
        };
        let Some((trust_domain, path)) = rest.split_once('/') else {
            return Err("missing path");
        };
        if trust_domain.is_empty() {
            return Err("empty trust domain");
        }
        if !trust_domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return Err("trust domain allows only lowercase letters, digits, '.', '-' and '_'");
        }
        for segment in path.split('/') {
            if segment.is_empty() {
                return Err("empty path segment");
            }
            if segment == "." || segment == ".." {
                return Err("path segments '.' and '..' are not allowed");
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err("path allows only letters, digits, '.', '-' and '_'");
            }
        }
        Ok(())
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0[Self::SCHEME.len()..];
        // Invariant from `check`: there is a '/' after the trust domain.
        rest.split_once('/').map_or(rest, |(td, _)| td)
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<SpiffeId> for String {
    fn from(value: SpiffeId) -> Self {
        value.0
    }
}

/// A WireGuard (Curve25519) public key, in WireGuard's text form: standard base64 of 32 bytes.
///
/// Public, so no secrecy handling; a node's key is published for operators to see, while peers
/// take the key from the authenticated handshake, never from this record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WgPublicKey([u8; 32]);

impl WgPublicKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublicKey({self})")
    }
}

impl FromStr for WgPublicKey {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| IdError::WgPublicKey {
                reason: "not standard base64",
            })?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| IdError::WgPublicKey {
            reason: "not 32 bytes",
        })?;
        Ok(Self(bytes))
    }
}

impl TryFrom<String> for WgPublicKey {
    type Error = IdError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<WgPublicKey> for String {
    fn from(value: WgPublicKey) -> Self {
        value.to_string()
    }
}

/// An X.509 certificate serial number as lowercase hex without separators (RFC 5280 allows at
/// most 20 octets, so at most 40 digits). Input in upper case is accepted and lowered.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CertSerial(String);

impl CertSerial {
    /// Parses a hex serial number.
    ///
    /// # Errors
    ///
    /// [`IdError::CertSerial`] if the input is empty, longer than 40 digits or not hex.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        let reason = if value.is_empty() {
            Some("empty")
        } else if value.len() > 40 {
            Some("longer than 40 hex digits (20 octets)")
        } else if !value.bytes().all(|b| b.is_ascii_hexdigit()) {
            Some("only hex digits are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(IdError::CertSerial {
                value: excerpt(&value),
                reason,
            }),
            None => Ok(Self(value.to_ascii_lowercase())),
        }
    }

    /// The serial as lowercase hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CertSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for CertSerial {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for CertSerial {
    type Error = IdError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<CertSerial> for String {
    fn from(value: CertSerial) -> Self {
        value.0
    }
}

/// Checks that `text` is only PEM blocks with `label` (surrounding whitespace allowed) whose
/// bodies are valid base64, and returns how many there are. The store checks the shape only;
/// keymgr parses the DER.
pub(crate) fn check_pem(text: &str, label: &str) -> Result<usize, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut blocks = 0;
    let mut body: Option<String> = None;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        let number = index + 1;
        match body.as_mut() {
            None if line.is_empty() => {}
            None if line == begin => body = Some(String::new()),
            None => return Err(format!("line {number}: expected {begin:?}")),
            Some(data) if line == end => {
                if data.is_empty() {
                    return Err(format!("line {number}: empty {label} block"));
                }
                base64::engine::general_purpose::STANDARD
                    .decode(data.as_bytes())
                    .map_err(|_| format!("line {number}: {label} block is not valid base64"))?;
                blocks += 1;
                body = None;
            }
            Some(data) => {
                if line.starts_with("-----") {
                    return Err(format!("line {number}: expected {end:?}"));
                }
                data.push_str(line);
            }
        }
    }
    if body.is_some() {
        return Err(format!("missing {end:?}"));
    }
    if blocks == 0 {
        return Err(format!("no {label} block"));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for good in ["a", "worker-1", "node.example.com", "0", &"a".repeat(63)] {
            assert_eq!(NodeName::new(good).expect(good).as_str(), good);
        }
        for (bad, reason) in [
            ("", "empty"),
            (
                "Worker",
                "only lowercase letters, digits, '-' and '.' are allowed",
            ),
            ("-a", "labels must start and end with a letter or digit"),
            ("a-", "labels must start and end with a letter or digit"),
            ("a..b", "empty label"),
            (".a", "empty label"),
            (
                "a/b",
                "only lowercase letters, digits, '-' and '.' are allowed",
            ),
            (
                "a:b",
                "only lowercase letters, digits, '-' and '.' are allowed",
            ),
        ] {
            assert_eq!(
                NodeName::new(bad),
                Err(IdError::NodeName {
                    value: bad.to_owned(),
                    reason
                }),
                "{bad:?}"
            );
        }
        assert!(NodeName::new("a".repeat(64)).is_err());
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(NodeName::new(long).is_err());
    }

    #[test]
    fn spiffe_ids() {
        let id = SpiffeId::new("spiffe://cluster.local/node/worker-1").expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.to_string().parse::<SpiffeId>(), Ok(id));
        for bad in [
            "http://cluster.local/node/a",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe:///node/a",
            "spiffe://Cluster.local/node/a",
            "spiffe://cluster.local/node//a",
            "spiffe://cluster.local/node/../a",
            "spiffe://cluster.local/node/a?x=1",
        ] {
            assert!(SpiffeId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wireguard_keys_round_trip() {
        let key = WgPublicKey::from_bytes([7; 32]);
        let text = key.to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<WgPublicKey>(), Ok(key));
        assert_eq!(
            "AAAA".parse::<WgPublicKey>(),
            Err(IdError::WgPublicKey {
                reason: "not 32 bytes"
            })
        );
        assert!("not base64!".parse::<WgPublicKey>().is_err());
    }

    #[test]
    fn cert_serials() {
        assert_eq!(CertSerial::new("0A1b").expect("hex").as_str(), "0a1b");
        assert!(CertSerial::new("").is_err());
        assert!(CertSerial::new("xyz").is_err());
        assert!(CertSerial::new("a".repeat(41)).is_err());
    }

    #[test]
    fn pem_shapes() {
        let one = "-----BEGIN CERTIFICATE-----\nAAEC\nAwQ=\n-----END CERTIFICATE-----\n";
        assert_eq!(check_pem(one, "CERTIFICATE"), Ok(1));
        assert_eq!(check_pem(&format!("{one}\n{one}"), "CERTIFICATE"), Ok(2));
        assert!(check_pem(one, "CERTIFICATE REQUEST").is_err());
        assert!(check_pem("", "CERTIFICATE").is_err());
        assert!(check_pem("-----BEGIN CERTIFICATE-----\nAAEC\n", "CERTIFICATE").is_err());
        assert!(
            check_pem(
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----",
                "CERTIFICATE"
            )
            .is_err()
        );
        assert!(check_pem(&format!("junk\n{one}"), "CERTIFICATE").is_err());
    }
}
