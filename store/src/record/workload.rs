//! Identity-policy records: [`Identity`] (a numeric security identity and its labels),
//! [`IdentityClaim`] (the label set's claim on its number, what makes allocation agree across
//! nodes), [`Endpoint`] (a workload of the standalone modes) and [`PolicyDocument`] (a stored
//! CiliumNetworkPolicy / NetworkPolicy document).
//!
//! Labels are kept as [`Labels`] of nodeseal-policy, written as its canonical `Display` text.
//! The store depends on nodeseal-policy (an exception to "the store depends on no other nodeseal
//! crate") because a policy document must be validated on every read with the same parser that
//! enforces it: a second, looser check here would let a document that the agent refuses sit in
//! the store unreported.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use nodeseal_policy::labels::Labels;
use serde::{Deserialize, Serialize};

use super::{Key, KeyId, Kind, MAX_ADDRESSES, Record, RecordKind, RecordProblem, sealed};
use crate::types::NodeName;

/// The lowest identity a workload label set gets (`identity::FIRST_WORKLOAD` of nodeseal-bpf's
/// common crate); lower numbers are reserved (host 1, world 2, remote-node 6).
pub const FIRST_WORKLOAD_IDENTITY: u32 = 256;

/// Most labels one label set may have.
pub const MAX_LABELS: usize = 64;

/// Longest canonical label text accepted.
pub const MAX_LABELS_TEXT: usize = 16 * 1024;

/// Largest policy document stored.
pub const MAX_POLICY_DOCUMENT_BYTES: usize = 512 * 1024;

/// Longest host-side interface name (Linux `IFNAMSIZ` - 1).
const MAX_INTERFACE_NAME: usize = 15;

/// A workload's numeric security identity: 256 or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct IdentityNumber(u32);

impl IdentityNumber {
    /// The first workload identity.
    pub const FIRST: Self = Self(FIRST_WORKLOAD_IDENTITY);

    /// Checks that `value` is a workload identity (>= 256).
    ///
    /// # Errors
    ///
    /// [`IdentityNumberError`] for reserved numbers.
    pub fn new(value: u32) -> Result<Self, IdentityNumberError> {
        if value < FIRST_WORKLOAD_IDENTITY {
            return Err(IdentityNumberError { value });
        }
        Ok(Self(value))
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The next number, if any.
    pub fn next(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }
}

/// A reserved number (below 256) given as a workload identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("identity {value} is reserved: workload identities start at 256")]
pub struct IdentityNumberError {
    /// The number.
    pub value: u32,
}

impl TryFrom<u32> for IdentityNumber {
    type Error = IdentityNumberError;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<IdentityNumber> for u32 {
    fn from(value: IdentityNumber) -> Self {
        value.0
    }
}

impl fmt::Display for IdentityNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Honours width and alignment, for tables.
        f.pad(&self.0.to_string())
    }
}

impl FromStr for IdentityNumber {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        // Canonical decimal only, so that one number has one key.
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.starts_with('0') {
            return Err(format!("{text:?} is not a decimal identity number"));
        }
        let value: u32 = text
            .parse()
            .map_err(|_| format!("{text:?} is out of range"))?;
        Self::new(value).map_err(|e| e.to_string())
    }
}

/// The id of an [`IdentityClaim`]: SHA-256 of the canonical label text, lowercase hex. Label
/// text can be long and hold any character, so it does not name keys or files itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelsDigest(String);

impl LabelsDigest {
    /// The digest of a label set.
    pub fn of(labels: &Labels) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, labels.to_string().as_bytes());
        Self(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
    }

    fn parse(text: &str) -> Result<Self, String> {
        if text.len() != 64
            || !text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("{text:?} is not a lowercase hex SHA-256"));
        }
        Ok(Self(text.to_owned()))
    }

    /// The hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LabelsDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which endpoint: the node it runs on, its namespace and name (each a DNS-1123 name). Text
/// form `node:namespace:name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId {
    /// The node.
    pub node: NodeName,
    /// The namespace.
    pub namespace: NodeName,
    /// The endpoint's name.
    pub name: NodeName,
}

impl EndpointId {
    fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split(':');
        let (Some(node), Some(namespace), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("expected <node>:<namespace>:<name>".to_owned());
        };
        let part = |text: &str| NodeName::new(text).map_err(|e| e.to_string());
        Ok(Self {
            node: part(node)?,
            namespace: part(namespace)?,
            name: part(name)?,
        })
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.node, self.namespace, self.name)
    }
}

/// A cluster-wide security identity: a number and the label set it stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The number (also the key).
    pub number: IdentityNumber,
    /// The security-relevant labels.
    #[serde(with = "labels_text")]
    pub labels: Labels,
}

/// A label set's claim on its identity number. Created only if absent, it is what makes
/// concurrent allocations of one label set agree (see
/// [`Store::allocate_identity`](crate::Store::allocate_identity)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityClaim {
    /// The label set (its digest is the key).
    #[serde(with = "labels_text")]
    pub labels: Labels,
    /// The number it holds.
    pub number: IdentityNumber,
}

/// A workload: in the standalone modes (directory, etcd) written by `nodeseal endpoint add`
/// or the test harness; in Kubernetes mode derived from Pod objects, never written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The node it runs on.
    pub node: NodeName,
    /// Its namespace.
    pub namespace: NodeName,
    /// Its name.
    pub name: NodeName,
    /// Its own labels (without the namespace label, which [`Endpoint::security_labels`] adds).
    #[serde(with = "labels_text")]
    pub labels: Labels,
    /// Its IPs, 1 to [`MAX_ADDRESSES`], unicast, no duplicates.
    pub ips: Vec<IpAddr>,
    /// The host-side interface (veth) name; empty means "the agent finds the host-side
    /// interface by route" (to one of [`ips`](Self::ips)), which is what endpoints derived
    /// from Pods in Kubernetes mode say.
    pub interface: String,
}

impl Endpoint {
    /// The endpoint's id (its key).
    pub fn id(&self) -> EndpointId {
        EndpointId {
            node: self.node.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The labels its identity is allocated for: its labels plus its namespace as
    /// `io.kubernetes.pod.namespace` (which wins over a label of that name).
    pub fn security_labels(&self) -> Labels {
        let mut labels = self.labels.clone();
        labels.insert(
            nodeseal_policy::labels::LabelKey::k8s(nodeseal_policy::labels::NAMESPACE_KEY),
            self.namespace.to_string(),
        );
        labels
    }
}

/// A stored policy document: CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or
/// NetworkPolicy, YAML or JSON, one or more documents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDocument {
    /// The name it is stored under (`nodeseal policy apply` uses the file's first policy name).
    pub name: NodeName,
    /// The document as given.
    pub document: String,
}

impl PolicyDocument {
    /// Parses the document with nodeseal-policy.
    ///
    /// # Errors
    ///
    /// The parser's error, naming the document and field.
    pub fn policies(
        &self,
    ) -> Result<Vec<nodeseal_policy::rule::Policy>, nodeseal_policy::document::DocumentError> {
        nodeseal_policy::document::parse(self.document.as_bytes())
    }

    fn check(&self) -> Result<(), RecordProblem> {
        if self.document.len() > MAX_POLICY_DOCUMENT_BYTES {
            return Err(RecordProblem::Field {
                field: "document",
                reason: format!(
                    "{} bytes, more than {MAX_POLICY_DOCUMENT_BYTES}",
                    self.document.len()
                ),
            });
        }
        match self.policies() {
            Ok(policies) if policies.is_empty() => Err(RecordProblem::Field {
                field: "document",
                reason: "holds no policy".to_owned(),
            }),
            Ok(_) => Ok(()),
            Err(error) => Err(RecordProblem::Field {
                field: "document",
                reason: error_chain(&error),
            }),
        }
    }
}

/// An error and its sources, `: `-separated (the parser's position is in the source).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn check_labels(labels: &Labels) -> Result<(), RecordProblem> {
    if labels.len() > MAX_LABELS {
        return Err(RecordProblem::Field {
            field: "labels",
            reason: format!("{} labels, more than {MAX_LABELS}", labels.len()),
        });
    }
    Ok(())
}

impl Identity {
    fn check(&self) -> Result<(), RecordProblem> {
        check_labels(&self.labels)
    }
}

impl IdentityClaim {
    fn check(&self) -> Result<(), RecordProblem> {
        check_labels(&self.labels)
    }
}

impl Endpoint {
    fn check(&self) -> Result<(), RecordProblem> {
        check_labels(&self.labels)?;
        let field = |field: &'static str, reason: String| RecordProblem::Field { field, reason };
        if self.ips.is_empty() {
            return Err(field("ips", "empty".to_owned()));
        }
        if self.ips.len() > MAX_ADDRESSES {
            return Err(field("ips", format!("more than {MAX_ADDRESSES} addresses")));
        }
        let mut seen = BTreeSet::new();
        for ip in &self.ips {
            if ip.is_unspecified() || ip.is_multicast() || super::is_broadcast(ip) {
                return Err(field("ips", format!("{ip} is not a unicast address")));
            }
            if !seen.insert(ip) {
                return Err(field("ips", format!("{ip} listed twice")));
            }
        }
        if self.interface.is_empty() {
            return Ok(());
        }
        check_interface(&self.interface).map_err(|reason| field("interface", reason))
    }
}

/// Checks a Linux interface name: 1 to 15 bytes, no `/`, whitespace, `:` or NUL, not `.`/`..`.
pub fn check_interface(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_INTERFACE_NAME {
        return Err(format!(
            "{name:?} is not 1 to {MAX_INTERFACE_NAME} bytes long"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace() || !b.is_ascii())
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

macro_rules! record_kind {
    ($ty:ident, $kind:ident, $id:ty, $key_id:ident, |$this:ident| $make_id:expr) => {
        impl sealed::Sealed for $ty {}

        impl RecordKind for $ty {
            const KIND: Kind = Kind::$kind;
            type Id = $id;

            fn key_of(id: &$id) -> Key {
                Key {
                    kind: Kind::$kind,
                    id: KeyId::$key_id(id.clone()),
                }
            }

            fn key(&self) -> Key {
                let $this = self;
                Self::key_of(&$make_id)
            }

            fn check(&self) -> Result<(), RecordProblem> {
                <$ty>::check(self)
            }

            fn into_record(self) -> Record {
                Record::$kind(self)
            }

            fn from_record(record: Record) -> Option<Self> {
                match record {
                    Record::$kind(r) => Some(r),
                    _ => None,
                }
            }
        }
    };
}

record_kind!(Identity, Identity, IdentityNumber, Identity, |this| this
    .number);
record_kind!(IdentityClaim, IdentityClaim, LabelsDigest, Claim, |this| {
    LabelsDigest::of(&this.labels)
});
record_kind!(Endpoint, Endpoint, EndpointId, Endpoint, |this| this.id());
record_kind!(PolicyDocument, PolicyDocument, NodeName, Named, |this| this
    .name
    .clone());

/// Parses the id part of a key of one of this module's kinds.
pub(super) fn parse_id(kind: Kind, id: &str) -> Option<Result<KeyId, String>> {
    Some(match kind {
        Kind::Identity => id.parse().map(KeyId::Identity),
        Kind::IdentityClaim => LabelsDigest::parse(id).map(KeyId::Claim),
        Kind::Endpoint => EndpointId::parse(id).map(KeyId::Endpoint),
        Kind::PolicyDocument => NodeName::new(id)
            .map(KeyId::Named)
            .map_err(|e| e.to_string()),
        _ => return None,
    })
}

/// Labels as their canonical text; reading refuses text that is not canonical (so that one
/// label set has one text, one digest and one claim).
mod labels_text {
    use nodeseal_policy::labels::Labels;
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    use super::MAX_LABELS_TEXT;

    pub(super) fn serialize<S: Serializer>(value: &Labels, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() > MAX_LABELS_TEXT {
            return Err(D::Error::custom(format!(
                "labels are {} bytes, more than {MAX_LABELS_TEXT}",
                text.len()
            )));
        }
        let labels: Labels = text
            .parse()
            .map_err(|e| D::Error::custom(format!("invalid labels: {e}")))?;
        if labels.to_string() != text {
            return Err(D::Error::custom(format!(
                "labels {text:?} are not in canonical form {:?}",
                labels.to_string()
            )));
        }
        Ok(labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RecordError;
    use crate::record::{decode_as, encode};

    fn name(text: &str) -> NodeName {
        NodeName::new(text).expect("test name")
    }

    fn labels(text: &str) -> Labels {
        text.parse().expect("test labels")
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            node: name("node-1"),
            namespace: name("default"),
            name: name("xwing"),
            labels: labels("k8s:class=xwing,k8s:org=alliance"),
            ips: vec!["10.244.3.5".parse().expect("ip")],
            interface: "lxc0a1b".to_owned(),
        }
    }

    const RULE1: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  \
                         name: rule1\nspec:\n  endpointSelector:\n    matchLabels:\n      \
                         org: empire\n";

    #[test]
    fn keys_round_trip() {
        let digest = LabelsDigest::of(&labels("k8s:app=web"));
        let keys = [
            Identity::key_of(&IdentityNumber::new(256).expect("256")),
            IdentityClaim::key_of(&digest),
            Endpoint::key_of(&endpoint().id()),
            PolicyDocument::key_of(&name("rule1")),
        ];
        for key in keys {
            assert_eq!(Key::parse(&key.to_string()), Ok(key.clone()), "{key}");
        }
        assert_eq!(
            Endpoint::key_of(&endpoint().id()).to_string(),
            "endpoints/node-1:default:xwing"
        );
        assert_eq!(
            Endpoint::key_of(&endpoint().id()).node(),
            Some(&name("node-1"))
        );
        for bad in [
            "identities/255",
            "identities/0256",
            "identities/abc",
            "identities/4294967296",
            "identity-claims/abc",
            "identity-claims/ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789",
            "endpoints/node-1:default",
            "endpoints/node-1:default:x:y",
            "endpoints/node-1:Default:x",
            "policies/Rule_1",
        ] {
            assert!(
                matches!(Key::parse(bad), Err(RecordProblem::BadKey { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn identity_numbers_below_256_are_reserved() {
        assert!(IdentityNumber::new(255).is_err());
        assert_eq!(IdentityNumber::new(256).map(u32::from), Ok(256));
        assert!(serde_json::from_str::<IdentityNumber>("6").is_err());
        assert_eq!("300".parse::<IdentityNumber>().map(u32::from), Ok(300));
        assert_eq!(format!("{:<5}|", IdentityNumber::FIRST), "256  |");
    }

    #[test]
    fn identity_round_trips_with_canonical_labels_only() {
        let identity = Identity {
            number: IdentityNumber::new(300).expect("300"),
            labels: labels("org=empire,k8s:class=deathstar"),
        };
        let bytes = encode(&identity).expect("encode");
        let text = String::from_utf8(bytes.clone()).expect("utf8");
        assert!(
            text.contains("\"k8s:class=deathstar,k8s:org=empire\""),
            "{text}"
        );
        assert_eq!(
            decode_as::<Identity>(&identity.key(), &bytes),
            Ok(identity.clone())
        );

        // Not canonical (no source, unsorted): refused, naming the canonical form.
        let value = br#"{"number":300,"labels":"org=empire,class=deathstar"}"#;
        let error = decode_as::<Identity>(&identity.key(), value).expect_err("not canonical");
        assert!(error.to_string().contains("canonical"), "{error}");
        // Stored under another number's key.
        let other = Identity::key_of(&IdentityNumber::new(301).expect("301"));
        assert!(matches!(
            decode_as::<Identity>(&other, &bytes),
            Err(RecordError {
                problem: RecordProblem::KeyMismatch { .. },
                ..
            })
        ));
        // A claim is keyed by its labels' digest.
        let claim = IdentityClaim {
            labels: identity.labels.clone(),
            number: identity.number,
        };
        let bytes = encode(&claim).expect("encode claim");
        let wrong = IdentityClaim::key_of(&LabelsDigest::of(&labels("k8s:org=alliance")));
        assert!(decode_as::<IdentityClaim>(&wrong, &bytes).is_err());
        assert_eq!(decode_as::<IdentityClaim>(&claim.key(), &bytes), Ok(claim));
    }

    #[test]
    fn labels_are_bounded() {
        let many: Vec<String> = (0..=MAX_LABELS).map(|i| format!("k{i}=v")).collect();
        let identity = Identity {
            number: IdentityNumber::FIRST,
            labels: labels(&many.join(",")),
        };
        assert!(matches!(
            encode(&identity),
            Err(RecordError {
                problem: RecordProblem::Field {
                    field: "labels",
                    ..
                },
                ..
            })
        ));
        let long = format!(
            r#"{{"number":256,"labels":"k8s:a={}"}}"#,
            "x".repeat(MAX_LABELS_TEXT)
        );
        let error = decode_as::<Identity>(&identity.key(), long.as_bytes()).expect_err("long");
        assert!(error.to_string().contains("more than"), "{error}");
    }

    #[test]
    fn endpoint_checks_ips_and_interface() {
        let good = endpoint();
        let bytes = encode(&good).expect("encode");
        assert_eq!(decode_as::<Endpoint>(&good.key(), &bytes), Ok(good.clone()));
        assert_eq!(
            good.security_labels().to_string(),
            "k8s:class=xwing,k8s:io.kubernetes.pod.namespace=default,k8s:org=alliance"
        );
        let field_of = |endpoint: &Endpoint| match encode(endpoint) {
            Err(RecordError {
                problem: RecordProblem::Field { field, .. },
                ..
            }) => field,
            other => panic!("unexpected {other:?}"),
        };
        let mut bad = good.clone();
        bad.ips.clear();
        assert_eq!(field_of(&bad), "ips");
        let mut bad = good.clone();
        bad.ips.push(bad.ips[0]);
        assert_eq!(field_of(&bad), "ips");
        let mut bad = good.clone();
        bad.ips = vec!["224.0.0.1".parse().expect("ip")];
        assert_eq!(field_of(&bad), "ips");
        let mut by_route = good.clone();
        by_route.interface = String::new();
        let bytes = encode(&by_route).expect("an empty interface: found by route");
        assert_eq!(decode_as::<Endpoint>(&good.key(), &bytes), Ok(by_route));
        for name in ["a/b", "..", "sixteen-chars-xx", "a b"] {
            let mut bad = good.clone();
            bad.interface = name.to_owned();
            assert_eq!(field_of(&bad), "interface", "{name:?}");
        }
    }

    #[test]
    fn policy_documents_are_parsed_on_write_and_read() {
        let good = PolicyDocument {
            name: name("rule1"),
            document: RULE1.to_owned(),
        };
        let bytes = encode(&good).expect("encode");
        assert_eq!(
            decode_as::<PolicyDocument>(&good.key(), &bytes),
            Ok(good.clone())
        );

        let mut l7 = good.clone();
        l7.document.push_str(
            "  ingress:\n  - toPorts:\n    - ports:\n      - port: \"80\"\n      rules:\n        \
             http: []\n",
        );
        let error = encode(&l7).expect_err("L7 rules refused");
        assert_eq!(error.key, "policies/rule1");
        assert!(
            error
                .to_string()
                .contains("spec.ingress[0].toPorts[0].rules"),
            "{error}"
        );

        // Stored by someone else: reported by key, never a panic.
        let raw = serde_json::json!({ "name": "rule1", "document": l7.document });
        let error = decode_as::<PolicyDocument>(&good.key(), raw.to_string().as_bytes())
            .expect_err("refused on read");
        assert_eq!(error.key, "policies/rule1");
        assert!(matches!(
            error.problem,
            RecordProblem::Field {
                field: "document",
                ..
            }
        ));

        let empty = PolicyDocument {
            name: name("empty"),
            document: String::new(),
        };
        assert!(encode(&empty).is_err());
        let huge = PolicyDocument {
            name: name("huge"),
            document: format!("{RULE1}#{}", "x".repeat(MAX_POLICY_DOCUMENT_BYTES)),
        };
        assert!(encode(&huge).is_err());
    }
}
