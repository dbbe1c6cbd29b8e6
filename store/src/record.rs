//! Record kinds, keys and the records themselves, with their JSON encoding and validation.
//!
//! Every record is JSON. Unknown fields are ignored, so a newer agent may add fields during a
//! rolling upgrade. Reading validates everything the type system does not already: a record is
//! either fully valid or a [`RecordError`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{RecordError, RecordProblem};
use super::types::{CertSerial, NodeName, SpiffeId, WgPublicKey, check_pem};

mod workload;

pub(crate) use self::workload::error_chain;
pub use self::workload::{
    Endpoint, EndpointId, FIRST_WORKLOAD_IDENTITY, Identity, IdentityClaim, IdentityNumber,
    IdentityNumberError, LabelsDigest, MAX_LABELS, MAX_POLICY_DOCUMENT_BYTES, PolicyDocument,
    check_interface,
};

/// Largest record value accepted, written or read (etcd's default request limit is 1.5 MiB).
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Most node IPs or pod CIDRs one node record may list.
pub const MAX_ADDRESSES: usize = 16;

/// The kinds of record, each under its own key prefix (`nodes/`, `csrs/`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Kind {
    /// [`NodeRecord`], one per node, published by the node itself.
    Node,
    /// [`CsrRecord`], one per node.
    Csr,
    /// [`CertificateRecord`], one per node, published by keymgr.
    Certificate,
    /// [`TrustBundle`], one per cluster.
    TrustBundle,
    /// [`Revocation`], per node or per node certificate.
    Revocation,
    /// [`RekeyGeneration`], one per cluster.
    RekeyGeneration,
    /// [`NodeStatus`], one per node.
    NodeStatus,
    /// [`Identity`], one per workload security identity.
    Identity,
    /// [`IdentityClaim`], one per label set with an identity.
    IdentityClaim,
    /// [`Endpoint`], one per workload of the standalone modes.
    Endpoint,
    /// [`PolicyDocument`], one per applied policy file.
    PolicyDocument,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 11] = [
        Kind::Node,
        Kind::Csr,
        Kind::Certificate,
        Kind::TrustBundle,
        Kind::Revocation,
        Kind::RekeyGeneration,
        Kind::NodeStatus,
        Kind::Identity,
        Kind::IdentityClaim,
        Kind::Endpoint,
        Kind::PolicyDocument,
    ];

    /// The key prefix (and directory name) of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Csr => "csrs",
            Kind::Certificate => "certificates",
            Kind::TrustBundle => "trust-bundle",
            Kind::Revocation => "revocations",
            Kind::RekeyGeneration => "rekey",
            Kind::NodeStatus => "node-status",
            Kind::Identity => "identities",
            Kind::IdentityClaim => "identity-claims",
            Kind::Endpoint => "endpoints",
            Kind::PolicyDocument => "policies",
        }
    }

    fn from_prefix(prefix: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == prefix)
    }

    /// Whether the kind has a single, cluster-wide record.
    pub fn is_singleton(self) -> bool {
        matches!(self, Kind::TrustBundle | Kind::RekeyGeneration)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The id of a cluster-wide record in its key.
const CLUSTER_ID: &str = "cluster";

/// Separates node and serial in a revocation key; never part of a node name.
const SERIAL_SEPARATOR: char = ':';

/// Which revocation: a whole node, or one certificate of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevocationId {
    /// The revoked node.
    pub node: NodeName,
    /// The revoked certificate, or `None` for every certificate of the node.
    pub serial: Option<CertSerial>,
}

/// Where a record lives: its kind and id. Text form `<kind>/<id>`, e.g. `nodes/worker-1`,
/// `revocations/worker-1:0a1b`, `rekey/cluster`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    kind: Kind,
    id: KeyId,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum KeyId {
    Node(NodeName),
    Revocation(RevocationId),
    Cluster,
    Identity(IdentityNumber),
    Claim(LabelsDigest),
    Endpoint(EndpointId),
    Named(NodeName),
}

impl Key {
    fn node_keyed(kind: Kind, node: &NodeName) -> Self {
        Self {
            kind,
            id: KeyId::Node(node.clone()),
        }
    }

    fn cluster(kind: Kind) -> Self {
        Self {
            kind,
            id: KeyId::Cluster,
        }
    }

    /// The record's kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The node the record is about, unless it is cluster-wide.
    pub fn node(&self) -> Option<&NodeName> {
        match &self.id {
            KeyId::Node(node) => Some(node),
            KeyId::Revocation(id) => Some(&id.node),
            KeyId::Endpoint(id) => Some(&id.node),
            KeyId::Cluster | KeyId::Identity(_) | KeyId::Claim(_) | KeyId::Named(_) => None,
        }
    }

    /// The id part of the key (after `<kind>/`).
    pub(crate) fn id_text(&self) -> String {
        match &self.id {
            KeyId::Node(node) => node.to_string(),
            KeyId::Revocation(RevocationId { node, serial: None }) => node.to_string(),
            KeyId::Revocation(RevocationId {
                node,
                serial: Some(serial),
            }) => format!("{node}{SERIAL_SEPARATOR}{serial}"),
            KeyId::Cluster => CLUSTER_ID.to_owned(),
            KeyId::Identity(number) => number.to_string(),
            KeyId::Claim(digest) => digest.to_string(),
            KeyId::Endpoint(id) => id.to_string(),
            KeyId::Named(name) => name.to_string(),
        }
    }

    /// Parses the text form `<kind>/<id>`.
    ///
    /// # Errors
    ///
    /// [`RecordProblem::BadKey`] if the kind is unknown or the id is not valid for it.
    pub fn parse(text: &str) -> Result<Self, RecordProblem> {
        let bad = |reason: String| RecordProblem::BadKey { reason };
        let (prefix, id) = text
            .split_once('/')
            .ok_or_else(|| bad("expected <kind>/<id>".to_owned()))?;
        let kind =
            Kind::from_prefix(prefix).ok_or_else(|| bad(format!("unknown kind {prefix:?}")))?;
        let node = |text: &str| NodeName::new(text).map_err(|e| bad(e.to_string()));
        let id = match kind {
            Kind::TrustBundle | Kind::RekeyGeneration => {
                if id != CLUSTER_ID {
                    return Err(bad(format!("the only {kind} id is {CLUSTER_ID:?}")));
                }
                KeyId::Cluster
            }
            Kind::Revocation => match id.split_once(SERIAL_SEPARATOR) {
                None => KeyId::Revocation(RevocationId {
                    node: node(id)?,
                    serial: None,
                }),
                Some((name, serial)) => {
                    let serial = CertSerial::new(serial).map_err(|e| bad(e.to_string()))?;
                    if serial.as_str() != serial_text(id) {
                        return Err(bad("serial must be lowercase hex".to_owned()));
                    }
                    KeyId::Revocation(RevocationId {
                        node: node(name)?,
                        serial: Some(serial),
                    })
                }
            },
            Kind::Node | Kind::Csr | Kind::Certificate | Kind::NodeStatus => KeyId::Node(node(id)?),
            Kind::Identity | Kind::IdentityClaim | Kind::Endpoint | Kind::PolicyDocument => {
                workload::parse_id(kind, id)
                    .unwrap_or_else(|| Err(format!("BUG: no key parser for {kind}")))
                    .map_err(bad)?
            }
        };
        Ok(Self { kind, id })
    }
}

/// The serial part of a revocation id (text after the separator).
fn serial_text(id: &str) -> &str {
    id.split_once(SERIAL_SEPARATOR)
        .map_or("", |(_, serial)| serial)
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id_text())
    }
}

/// A node's own description, published by its agent (with etcd, attached to a lease so that it
/// disappears when the agent stops renewing it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's name (also its key).
    pub name: NodeName,
    /// The node's IPs (underlay), 1 to [`MAX_ADDRESSES`], no duplicates, unicast.
    pub node_ips: Vec<IpAddr>,
    /// The pod CIDRs the node owns, at most [`MAX_ADDRESSES`], canonical (no host bits).
    pub pod_cidrs: Vec<IpNet>,
    /// The SPIFFE ID the node must present in the handshake.
    pub spiffe_id: SpiffeId,
    /// Where the node accepts handshakes; its IP is one of `node_ips`.
    pub handshake: SocketAddr,
    /// The node's WireGuard public key, in WireGuard mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<WgPublicKey>,
}

impl NodeRecord {
    fn check(&self) -> Result<(), RecordProblem> {
        let field = |field: &'static str, reason: &str| RecordProblem::Field {
            field,
            reason: reason.to_owned(),
        };
        if self.node_ips.is_empty() {
            return Err(field("node_ips", "empty"));
        }
        if self.node_ips.len() > MAX_ADDRESSES {
            return Err(field("node_ips", "more than 16 addresses"));
        }
        let mut seen = BTreeSet::new();
        for ip in &self.node_ips {
            if ip.is_unspecified() || ip.is_multicast() || is_broadcast(ip) {
                return Err(RecordProblem::Field {
                    field: "node_ips",
                    reason: format!("{ip} is not a unicast address"),
                });
            }
            if !seen.insert(ip) {
                return Err(RecordProblem::Field {
                    field: "node_ips",
                    reason: format!("{ip} listed twice"),
                });
            }
        }
        if self.pod_cidrs.len() > MAX_ADDRESSES {
            return Err(field("pod_cidrs", "more than 16 CIDRs"));
        }
        let mut seen = BTreeSet::new();
        for cidr in &self.pod_cidrs {
            if cidr.trunc() != *cidr {
                return Err(RecordProblem::Field {
                    field: "pod_cidrs",
                    reason: format!("{cidr} has host bits set"),
                });
            }
            if !seen.insert(cidr) {
                return Err(RecordProblem::Field {
                    field: "pod_cidrs",
                    reason: format!("{cidr} listed twice"),
                });
            }
        }
        if self.handshake.port() == 0 {
            return Err(field("handshake", "port 0"));
        }
        if !self.node_ips.contains(&self.handshake.ip()) {
            return Err(RecordProblem::Field {
                field: "handshake",
                reason: format!("{} is not one of node_ips", self.handshake.ip()),
            });
        }
        Ok(())
    }
}

fn is_broadcast(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// A node's certificate signing request, published by its agent for keymgr.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsrRecord {
    /// The node (also the key).
    pub node: NodeName,
    /// One PEM `CERTIFICATE REQUEST` block.
    pub csr_pem: String,
    /// While the node holds a valid certificate: the signature of the request by that
    /// certificate's key (base64), without which keymgr does not sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_proof: Option<String>,
}

/// A node's certificate chain, published by keymgr.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// The node (also the key).
    pub node: NodeName,
    /// PEM `CERTIFICATE` blocks, leaf first.
    pub chain_pem: String,
}

/// The cluster's trust bundle, published by keymgr.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundle {
    /// The SPIFFE bundle (JSON text). Opaque to the store, which only checks that it is a JSON
    /// object; keymgr parses it.
    pub bundle: String,
    /// keymgr's signature over `bundle` (base64), made with the key of `signer_pem`: nodes take
    /// a bundle that changes their authorities only when one they trust signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The signing CA's certificate (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_pem: Option<String>,
}

/// A revoked node, or one revoked certificate of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The revoked node.
    pub node: NodeName,
    /// The revoked certificate's serial, or `None` for the whole node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<CertSerial>,
    /// When it was revoked.
    #[serde(with = "rfc3339")]
    pub revoked_at: SystemTime,
}

impl Revocation {
    /// The revocation's id (its key).
    pub fn id(&self) -> RevocationId {
        RevocationId {
            node: self.node.clone(),
            serial: self.serial.clone(),
        }
    }
}

/// The cluster-wide rekey generation: `nodeseal keys rotate` increments it (with
/// compare-and-swap, see [`Store::bump_rekey_generation`](super::Store::bump_rekey_generation))
/// and every agent rekeys every peer when it grows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RekeyGeneration {
    /// The generation; only ever grows.
    pub generation: u64,
    /// When it was last bumped.
    #[serde(with = "rfc3339")]
    pub requested_at: SystemTime,
}

/// What a node reports about its peers, so that `keys rotate --wait` can see when every node
/// reached a generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The reporting node (also the key).
    pub node: NodeName,
    /// When it reported.
    #[serde(with = "rfc3339")]
    pub reported_at: SystemTime,
    /// The highest rekey generation the node has started acting on.
    pub generation: u64,
    /// Per peer: what is applied now.
    pub peers: BTreeMap<NodeName, PeerStatus>,
}

/// The keys in use with one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The key epoch currently used for sending to the peer.
    pub epoch: u64,
    /// The rekey generation that epoch was negotiated for.
    pub generation: u64,
}

/// Any record, as seen in listings of several kinds and in watch events.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// A [`NodeRecord`].
    Node(NodeRecord),
    /// A [`CsrRecord`].
    Csr(CsrRecord),
    /// A [`CertificateRecord`].
    Certificate(CertificateRecord),
    /// The [`TrustBundle`].
    TrustBundle(TrustBundle),
    /// A [`Revocation`].
    Revocation(Revocation),
    /// The [`RekeyGeneration`].
    RekeyGeneration(RekeyGeneration),
    /// A [`NodeStatus`].
    NodeStatus(NodeStatus),
    /// An [`Identity`].
    Identity(Identity),
    /// An [`IdentityClaim`].
    IdentityClaim(IdentityClaim),
    /// An [`Endpoint`].
    Endpoint(Endpoint),
    /// A [`PolicyDocument`].
    PolicyDocument(PolicyDocument),
}

impl Record {
    /// The key the record is stored under.
    pub fn key(&self) -> Key {
        match self {
            Record::Node(r) => r.key(),
            Record::Csr(r) => r.key(),
            Record::Certificate(r) => r.key(),
            Record::TrustBundle(r) => r.key(),
            Record::Revocation(r) => r.key(),
            Record::RekeyGeneration(r) => r.key(),
            Record::NodeStatus(r) => r.key(),
            Record::Identity(r) => r.key(),
            Record::IdentityClaim(r) => r.key(),
            Record::Endpoint(r) => r.key(),
            Record::PolicyDocument(r) => r.key(),
        }
    }

    /// Decodes and validates the value stored under `key`.
    pub(crate) fn decode(key: &Key, value: &[u8]) -> Result<Record, RecordError> {
        match key.kind {
            Kind::Node => decode_as::<NodeRecord>(key, value).map(Record::Node),
            Kind::Csr => decode_as::<CsrRecord>(key, value).map(Record::Csr),
            Kind::Certificate => {
                decode_as::<CertificateRecord>(key, value).map(Record::Certificate)
            }
            Kind::TrustBundle => decode_as::<TrustBundle>(key, value).map(Record::TrustBundle),
            Kind::Revocation => decode_as::<Revocation>(key, value).map(Record::Revocation),
            Kind::RekeyGeneration => {
                decode_as::<RekeyGeneration>(key, value).map(Record::RekeyGeneration)
            }
            Kind::NodeStatus => decode_as::<NodeStatus>(key, value).map(Record::NodeStatus),
            Kind::Identity => decode_as::<Identity>(key, value).map(Record::Identity),
            Kind::IdentityClaim => {
                decode_as::<IdentityClaim>(key, value).map(Record::IdentityClaim)
            }
            Kind::Endpoint => decode_as::<Endpoint>(key, value).map(Record::Endpoint),
            Kind::PolicyDocument => {
                decode_as::<PolicyDocument>(key, value).map(Record::PolicyDocument)
            }
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A record type: its kind, how its key is formed, and its validation. Implemented by the
/// record structs of this module only.
pub trait RecordKind:
    Serialize + DeserializeOwned + Clone + fmt::Debug + Send + Sync + 'static + sealed::Sealed
{
    /// The kind.
    const KIND: Kind;
    /// What identifies one record of this kind: [`NodeName`], [`RevocationId`], or `()` for
    /// cluster-wide records.
    type Id: Clone + fmt::Debug + Send + Sync;

    /// The key of the record with this id.
    fn key_of(id: &Self::Id) -> Key;

    /// The key this record is stored under.
    fn key(&self) -> Key;

    /// Checks the rules serde does not.
    #[doc(hidden)]
    fn check(&self) -> Result<(), RecordProblem>;

    /// Wraps into [`Record`].
    fn into_record(self) -> Record;

    /// Unwraps from [`Record`].
    fn from_record(record: Record) -> Option<Self>;
}

macro_rules! node_keyed {
    ($ty:ident, $kind:ident, $field:ident) => {
        impl sealed::Sealed for $ty {}

        impl RecordKind for $ty {
            const KIND: Kind = Kind::$kind;
            type Id = NodeName;

            fn key_of(id: &NodeName) -> Key {
                Key::node_keyed(Kind::$kind, id)
            }

            fn key(&self) -> Key {
                Self::key_of(&self.$field)
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

macro_rules! cluster_wide {
    ($ty:ident, $kind:ident) => {
        impl sealed::Sealed for $ty {}

        impl RecordKind for $ty {
            const KIND: Kind = Kind::$kind;
            type Id = ();

            fn key_of(_: &()) -> Key {
                Key::cluster(Kind::$kind)
            }

            fn key(&self) -> Key {
                Key::cluster(Kind::$kind)
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

node_keyed!(NodeRecord, Node, name);
node_keyed!(CsrRecord, Csr, node);
node_keyed!(CertificateRecord, Certificate, node);
node_keyed!(NodeStatus, NodeStatus, node);
cluster_wide!(TrustBundle, TrustBundle);
cluster_wide!(RekeyGeneration, RekeyGeneration);

impl sealed::Sealed for Revocation {}

impl RecordKind for Revocation {
    const KIND: Kind = Kind::Revocation;
    type Id = RevocationId;

    fn key_of(id: &RevocationId) -> Key {
        Key {
            kind: Kind::Revocation,
            id: KeyId::Revocation(id.clone()),
        }
    }

    fn key(&self) -> Key {
        Self::key_of(&self.id())
    }

    fn check(&self) -> Result<(), RecordProblem> {
        Ok(())
    }

    fn into_record(self) -> Record {
        Record::Revocation(self)
    }

    fn from_record(record: Record) -> Option<Self> {
        match record {
            Record::Revocation(r) => Some(r),
            _ => None,
        }
    }
}

impl CsrRecord {
    fn check(&self) -> Result<(), RecordProblem> {
        // An ECDSA P-256 signature is at most 72 bytes, 96 in base64.
        if self.renewal_proof.as_ref().is_some_and(|p| p.len() > 512) {
            return Err(RecordProblem::Field {
                field: "renewal_proof",
                reason: "longer than 512 bytes".into(),
            });
        }
        match check_pem(&self.csr_pem, "CERTIFICATE REQUEST") {
            Ok(1) => Ok(()),
            Ok(n) => Err(RecordProblem::Field {
                field: "csr_pem",
                reason: format!("{n} CSRs, expected one"),
            }),
            Err(reason) => Err(RecordProblem::Field {
                field: "csr_pem",
                reason,
            }),
        }
    }
}

impl CertificateRecord {
    fn check(&self) -> Result<(), RecordProblem> {
        check_pem(&self.chain_pem, "CERTIFICATE")
            .map(drop)
            .map_err(|reason| RecordProblem::Field {
                field: "chain_pem",
                reason,
            })
    }
}

impl TrustBundle {
    fn check(&self) -> Result<(), RecordProblem> {
        match serde_json::from_str::<serde_json::Value>(&self.bundle) {
            Ok(serde_json::Value::Object(_)) => Ok(()),
            Ok(_) => Err(RecordProblem::Field {
                field: "bundle",
                reason: "not a JSON object".to_owned(),
            }),
            Err(e) => Err(RecordProblem::Field {
                field: "bundle",
                reason: format!("not JSON: {e}"),
            }),
        }
    }
}

impl RekeyGeneration {
    fn check(&self) -> Result<(), RecordProblem> {
        Ok(())
    }
}

impl NodeStatus {
    fn check(&self) -> Result<(), RecordProblem> {
        if self.peers.contains_key(&self.node) {
            return Err(RecordProblem::Field {
                field: "peers",
                reason: "lists the node itself".to_owned(),
            });
        }
        Ok(())
    }
}

/// Serialises a record after checking it, so that nothing invalid is ever written.
pub(crate) fn encode<R: RecordKind>(record: &R) -> Result<Vec<u8>, RecordError> {
    let key = record.key();
    let error = |problem| RecordError {
        key: key.to_string(),
        problem,
    };
    record.check().map_err(error)?;
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| {
        error(RecordProblem::Json {
            reason: e.to_string(),
        })
    })?;
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(error(RecordProblem::TooLarge {
            len: bytes.len(),
            limit: MAX_RECORD_BYTES,
        }));
    }
    Ok(bytes)
}

/// Parses and validates the value stored under `key` as an `R`.
pub(crate) fn decode_as<R: RecordKind>(key: &Key, value: &[u8]) -> Result<R, RecordError> {
    let error = |problem| RecordError {
        key: key.to_string(),
        problem,
    };
    if value.len() > MAX_RECORD_BYTES {
        return Err(error(RecordProblem::TooLarge {
            len: value.len(),
            limit: MAX_RECORD_BYTES,
        }));
    }
    let record: R = serde_json::from_slice(value).map_err(|e| {
        error(RecordProblem::Json {
            reason: e.to_string(),
        })
    })?;
    record.check().map_err(error)?;
    let actual = record.key();
    if actual != *key {
        return Err(error(RecordProblem::KeyMismatch {
            expected: actual.to_string(),
        }));
    }
    Ok(record)
}

/// RFC 3339 timestamps (UTC) for `SystemTime` fields: readable in `cat` and `etcdctl get`.
mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _, ser::Error as _};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    pub(super) fn serialize<S: Serializer>(value: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let text = OffsetDateTime::from(*value)
            .format(&Rfc3339)
            .map_err(S::Error::custom)?;
        s.serialize_str(&text)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        OffsetDateTime::parse(&text, &Rfc3339)
            .map(SystemTime::from)
            .map_err(|e| D::Error::custom(format!("invalid RFC 3339 time {text:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_helpers::node_record;

    fn name(text: &str) -> NodeName {
        NodeName::new(text).expect("test node name")
    }

    #[test]
    fn keys_round_trip() {
        let keys = [
            NodeRecord::key_of(&name("worker-1")),
            CsrRecord::key_of(&name("a.b")),
            Revocation::key_of(&RevocationId {
                node: name("n"),
                serial: None,
            }),
            Revocation::key_of(&RevocationId {
                node: name("n"),
                serial: Some(CertSerial::new("0A").expect("hex")),
            }),
            TrustBundle::key_of(&()),
            RekeyGeneration::key_of(&()),
            NodeStatus::key_of(&name("x")),
        ];
        for key in keys {
            assert_eq!(Key::parse(&key.to_string()), Ok(key.clone()), "{key}");
        }
        assert_eq!(
            Revocation::key_of(&RevocationId {
                node: name("n"),
                serial: Some(CertSerial::new("0A").expect("hex")),
            })
            .to_string(),
            "revocations/n:0a"
        );
        for bad in [
            "nodes",
            "pods/x",
            "nodes/Bad",
            "rekey/other",
            "revocations/n:zz",
            "revocations/n:0A",
        ] {
            assert!(
                matches!(Key::parse(bad), Err(RecordProblem::BadKey { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn node_record_round_trips_and_checks() {
        let record = node_record("worker-1", 1);
        let bytes = encode(&record).expect("valid record");
        let decoded = Record::decode(&record.key(), &bytes).expect("decodes");
        assert_eq!(decoded, Record::Node(record.clone()));

        let mut bad = record.clone();
        bad.handshake = "10.9.9.9:4250".parse().expect("addr");
        assert_eq!(
            encode(&bad).map(drop),
            Err(RecordError {
                key: "nodes/worker-1".to_owned(),
                problem: RecordProblem::Field {
                    field: "handshake",
                    reason: "10.9.9.9 is not one of node_ips".to_owned()
                }
            })
        );
        let mut bad = record.clone();
        bad.pod_cidrs = vec!["10.244.1.1/24".parse().expect("cidr")];
        assert!(encode(&bad).is_err());
        let mut bad = record.clone();
        bad.node_ips.push(bad.node_ips[0]);
        assert!(encode(&bad).is_err());
        let mut bad = record;
        bad.node_ips = vec!["0.0.0.0".parse().expect("ip")];
        assert!(encode(&bad).is_err());
    }

    #[test]
    fn decode_names_key_and_problem() {
        let key = NodeRecord::key_of(&name("worker-1"));
        let err = Record::decode(&key, b"{not json").expect_err("malformed");
        assert_eq!(err.key, "nodes/worker-1");
        assert!(matches!(err.problem, RecordProblem::Json { .. }), "{err}");

        // Valid JSON, invalid node name inside: serde names the problem.
        let mut value = serde_json::to_value(node_record("worker-1", 1)).expect("json");
        value["name"] = "Worker_1".into();
        let err = Record::decode(&key, value.to_string().as_bytes()).expect_err("bad name");
        let RecordProblem::Json { reason } = &err.problem else {
            panic!("unexpected {err}");
        };
        assert!(reason.contains("invalid node name"), "{reason}");

        // A valid record stored under another node's key.
        let other = encode(&node_record("worker-2", 2)).expect("encode");
        assert_eq!(
            Record::decode(&key, &other),
            Err(RecordError {
                key: "nodes/worker-1".to_owned(),
                problem: RecordProblem::KeyMismatch {
                    expected: "nodes/worker-2".to_owned()
                }
            })
        );

        let huge = vec![b' '; MAX_RECORD_BYTES + 1];
        assert!(matches!(
            Record::decode(&key, &huge).map_err(|e| e.problem),
            Err(RecordProblem::TooLarge { .. })
        ));
    }

    #[test]
    fn other_kinds_check_their_fields() {
        let csr = CsrRecord {
            node: name("a"),
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAEC\n-----END CERTIFICATE REQUEST-----\n"
                    .to_owned(),
            renewal_proof: None,
        };
        assert!(encode(&csr).is_ok());
        let mut long_proof = csr.clone();
        long_proof.renewal_proof = Some("A".repeat(513));
        assert!(encode(&long_proof).is_err());
        let mut two = csr.clone();
        two.csr_pem = format!("{}{}", csr.csr_pem, csr.csr_pem);
        assert!(encode(&two).is_err());

        let bundle = TrustBundle {
            bundle: r#"{"keys":[]}"#.to_owned(),
            signature: None,
            signer_pem: None,
        };
        assert!(encode(&bundle).is_ok());
        assert!(
            encode(&TrustBundle {
                bundle: "[1]".to_owned(),
                signature: None,
                signer_pem: None,
            })
            .is_err()
        );

        let status = NodeStatus {
            node: name("a"),
            reported_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            generation: 3,
            peers: [(
                name("a"),
                PeerStatus {
                    epoch: 1,
                    generation: 3,
                },
            )]
            .into(),
        };
        assert!(encode(&status).is_err());

        let revocation = Revocation {
            node: name("a"),
            serial: Some(CertSerial::new("ff").expect("hex")),
            revoked_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        let bytes = encode(&revocation).expect("encode");
        let text = String::from_utf8(bytes.clone()).expect("utf8");
        assert!(text.contains("2023-11-14T22:13:20Z"), "{text}");
        assert_eq!(
            Record::decode(&revocation.key(), &bytes),
            Ok(Record::Revocation(revocation))
        );
    }
}
