//! Strictly parsed identifiers: [`TrustDomain`], [`SpiffeId`] and [`NodeName`].
//!
//! Parsing follows the SPIFFE ID specification (section 2): the scheme is exactly `spiffe`, the
//! trust domain uses only lowercase letters, digits, `.`, `-` and `_`, and every path segment is
//! non-empty, is not `.` or `..`, and uses only letters, digits, `.`, `-` and `_`. There is no
//! normalisation: an ID that is not already canonical is rejected, so `Display` of a parsed value
//! gives back exactly the input.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest SPIFFE ID accepted (SPIFFE ID spec: URIs should not exceed 2048 bytes).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name accepted (SPIFFE ID spec: 255 bytes).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest node name accepted (Kubernetes object names are DNS subdomains, RFC 1123).
pub const MAX_NODE_NAME_LEN: usize = 253;

const SCHEME_PREFIX: &str = "spiffe://";
const NODE_PATH_PREFIX: &str = "/node/";

/// Why a trust domain, SPIFFE ID or node name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The input was empty.
    #[error("empty identifier")]
    Empty,
    /// The SPIFFE ID does not start with `spiffe://`.
    #[error("SPIFFE ID must start with spiffe://")]
    WrongScheme,
    /// The SPIFFE ID has no trust domain.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain contains an uppercase letter (SPIFFE IDs are case sensitive and trust
    /// domains must be lowercase).
    #[error("trust domain contains uppercase character {ch:?}")]
    TrustDomainUppercase {
        /// The offending character.
        ch: char,
    },
    /// The trust domain contains a character outside `[a-z0-9._-]` (this includes a port, user
    /// info, percent-encoding, query or fragment).
    #[error("trust domain contains invalid character {ch:?}")]
    TrustDomainInvalidChar {
        /// The offending character.
        ch: char,
    },
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is {len} bytes, longer than the limit")]
    TrustDomainTooLong {
        /// Length of the rejected trust domain.
        len: usize,
    },
    /// The SPIFFE ID is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is {len} bytes, longer than the limit")]
    TooLong {
        /// Length of the rejected ID.
        len: usize,
    },
    /// The path contains an empty segment (`//`) or ends with `/`.
    #[error("path contains an empty segment or a trailing slash")]
    EmptyPathSegment,
    /// The path contains a `.` or `..` segment.
    #[error("path contains a dot segment")]
    DotPathSegment,
    /// The path contains a character outside `[a-zA-Z0-9._-]`.
    #[error("path contains invalid character {ch:?}")]
    PathInvalidChar {
        /// The offending character.
        ch: char,
    },
    /// A node name is not a lowercase RFC 1123 DNS subdomain.
    #[error("node name is not a lowercase DNS subdomain (RFC 1123)")]
    InvalidNodeName,
    /// The SPIFFE ID is well formed but its path is not `/node/<node-name>`.
    #[error("SPIFFE ID path is not /node/<node-name>")]
    NotANodeId,
}

/// A SPIFFE trust domain such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (without `spiffe://`).
    ///
    /// # Errors
    /// [`IdError`] naming the first rule the input breaks.
    pub fn new(name: &str) -> Result<Self, IdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of a node in this trust domain: `spiffe://<td>/node/<name>`.
    pub fn node_id(&self, node: &NodeName) -> SpiffeId {
        SpiffeId {
            uri: format!("{SCHEME_PREFIX}{}{NODE_PATH_PREFIX}{}", self.0, node.0),
            td_len: self.0.len(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE ID, `spiffe://<trust-domain><path>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_len: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID.
    ///
    /// # Errors
    /// [`IdError`] naming the first rule the input breaks.
    pub fn new(uri: &str) -> Result<Self, IdError> {
        if uri.is_empty() {
            return Err(IdError::Empty);
        }
        if uri.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong { len: uri.len() });
        }
        let rest = uri
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(IdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        if !path.is_empty() {
            validate_path(path)?;
        }
        Ok(Self {
            uri: uri.to_owned(),
            td_len: td.len(),
        })
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// Whether this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    /// The path part (empty for a trust domain's own ID).
    pub fn path(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len() + self.td_len..]
    }

    /// The node name when the path is exactly `/node/<node-name>`.
    ///
    /// # Errors
    /// [`IdError::NotANodeId`] for any other path, [`IdError::InvalidNodeName`] when the last
    /// segment is not a valid node name.
    pub fn node_name(&self) -> Result<NodeName, IdError> {
        let name = self
            .path()
            .strip_prefix(NODE_PATH_PREFIX)
            .filter(|n| !n.contains('/'))
            .ok_or(IdError::NotANodeId)?;
        NodeName::new(name)
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    fn trust_domain_str(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..SCHEME_PREFIX.len() + self.td_len]
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A Kubernetes node name: a lowercase RFC 1123 DNS subdomain of at most 253 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    /// Parses a node name.
    ///
    /// # Errors
    /// [`IdError::Empty`] or [`IdError::InvalidNodeName`].
    pub fn new(name: &str) -> Result<Self, IdError> {
        if name.is_empty() {
            return Err(IdError::Empty);
        }
        if name.len() > MAX_NODE_NAME_LEN {
            return Err(IdError::InvalidNodeName);
        }
        for label in name.split('.') {
            let bytes = label.as_bytes();
            let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            let ok = match (bytes.first(), bytes.last()) {
                (Some(first), Some(last)) => {
                    alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
                }
                _ => false,
            };
            if !ok {
                return Err(IdError::InvalidNodeName);
            }
        }
        Ok(Self(name.to_owned()))
    }

    /// The node name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeName({})", self.0)
    }
}

impl FromStr for NodeName {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

macro_rules! string_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_serde!(TrustDomain);
string_serde!(SpiffeId);
string_serde!(NodeName);

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong { len: td.len() });
    }
    for ch in td.chars() {
        match ch {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err(IdError::TrustDomainUppercase { ch }),
            _ => return Err(IdError::TrustDomainInvalidChar { ch }),
        }
    }
    Ok(())
}

/// `path` starts with `/`.
fn validate_path(path: &str) -> Result<(), IdError> {
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(IdError::EmptyPathSegment);
        }
        if segment == "." || segment == ".." {
            return Err(IdError::DotPathSegment);
        }
        if let Some(ch) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(IdError::PathInvalidChar { ch });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/node/worker-1",
            "spiffe://a_b-c.9/x/Y/z.q",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let node: NodeName = "worker-1.example".parse().unwrap();
        let id = td.node_id(&node);
        assert_eq!(id.as_str(), "spiffe://cluster.local/node/worker-1.example");
        assert_eq!(id.node_name().unwrap(), node);
        assert_eq!(id.trust_domain(), td);
        assert_eq!(id.path(), "/node/worker-1.example");
        assert_eq!(SpiffeId::new(id.as_str()).unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn rejects() {
        let cases = [
            ("", IdError::Empty),
            ("http://cluster.local/x", IdError::WrongScheme),
            ("SPIFFE://cluster.local/x", IdError::WrongScheme),
            ("spiffe:///node/a", IdError::EmptyTrustDomain),
            (
                "spiffe://Cluster.local/node/a",
                IdError::TrustDomainUppercase { ch: 'C' },
            ),
            (
                "spiffe://cluster.local:80/a",
                IdError::TrustDomainInvalidChar { ch: ':' },
            ),
            (
                "spiffe://u@cluster.local/a",
                IdError::TrustDomainInvalidChar { ch: '@' },
            ),
            ("spiffe://td/node/../a", IdError::DotPathSegment),
            ("spiffe://td/node/./a", IdError::DotPathSegment),
            ("spiffe://td/node//a", IdError::EmptyPathSegment),
            ("spiffe://td/node/a/", IdError::EmptyPathSegment),
            ("spiffe://td/", IdError::EmptyPathSegment),
            ("spiffe://td/a?b", IdError::PathInvalidChar { ch: '?' }),
            ("spiffe://td/a#b", IdError::PathInvalidChar { ch: '#' }),
            ("spiffe://td/a%41", IdError::PathInvalidChar { ch: '%' }),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::new(input), Err(want), "{input}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert!(matches!(SpiffeId::new(&long), Err(IdError::TooLong { .. })));
        for bad in ["", "-a", "a-", "A", "a..b", "a_b", &"a".repeat(254)] {
            assert!(NodeName::new(bad).is_err(), "{bad}");
        }
        let id = SpiffeId::new("spiffe://td/node/a/b").unwrap();
        assert_eq!(id.node_name(), Err(IdError::NotANodeId));
        let id = SpiffeId::new("spiffe://td/node/A").unwrap();
        assert_eq!(id.node_name(), Err(IdError::InvalidNodeName));
        assert!(serde_json::from_str::<NodeName>("\"Bad\"").is_err());
    }
}
