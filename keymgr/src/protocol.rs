//! The messages exchanged inside the authenticated TLS channel and their framing.
//!
//! Frame: `version: u8`, `type: u8`, `length: u16` (big endian), then `length` bytes of body
//! (JSON, unknown fields rejected). See `keymgr/PROTOCOL.md` for the state machine.
//! [`decode_frame`] is pure and total: any input gives a message or a [`MessageError`].

use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::id::NodeName;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Frame header length.
pub const HEADER_LEN: usize = 4;
/// Largest message body accepted or sent.
pub const MAX_BODY_LEN: usize = 8 * 1024;
/// Most node IPs a Hello may carry.
pub const MAX_NODE_IPS: usize = 16;
/// Most pod CIDRs a Hello may carry.
pub const MAX_POD_CIDRS: usize = 64;

/// Why a message could not be read, decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The stream ended or failed inside a frame.
    #[error("stream error while reading or writing a message ({kind})")]
    Io {
        /// The I/O error kind.
        kind: std::io::ErrorKind,
    },
    /// Fewer bytes than the header announces.
    #[error("truncated frame")]
    Truncated,
    /// Bytes after the announced body.
    #[error("trailing bytes after the frame")]
    TrailingData,
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found}")]
    UnsupportedVersion {
        /// The version byte received.
        found: u8,
    },
    /// Unknown message type.
    #[error("unknown message type {found}")]
    UnknownType {
        /// The type byte received.
        found: u8,
    },
    /// The announced body is larger than [`MAX_BODY_LEN`].
    #[error("message body of {len} bytes exceeds the limit")]
    TooLarge {
        /// The announced length.
        len: usize,
    },
    /// The body is not a valid message of its type.
    #[error("malformed message body: {detail}")]
    Body {
        /// What the decoder reported.
        detail: String,
    },
    /// A field has a value the protocol does not allow.
    #[error("invalid value in field {field}")]
    InvalidField {
        /// The field.
        field: &'static str,
    },
}

/// An ESP SPI chosen by nodeseal. 0..=255 are reserved (RFC 4303), so `new` rejects them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Spi(u32);

impl Spi {
    /// Checks that `value` is not reserved.
    ///
    /// # Errors
    /// [`MessageError::InvalidField`] for 0..=255.
    pub fn new(value: u32) -> Result<Self, MessageError> {
        if value <= 255 {
            return Err(MessageError::InvalidField { field: "spi" });
        }
        Ok(Self(value))
    }

    /// The SPI value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Spi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:08x}", self.0)
    }
}

impl Serialize for Spi {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> Deserialize<'de> for Spi {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Spi::new(u32::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Key epoch: increases with every rekey of a peer pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Datapath mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// XFRM ESP tunnel mode.
    Ipsec,
    /// Kernel WireGuard.
    Wireguard,
}

/// A WireGuard (Curve25519) public key; base64 on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WgPublicKey(#[serde(with = "base64_32")] pub [u8; 32]);

impl fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublicKey({})", STANDARD.encode(self.0))
    }
}

/// A side's proof that it holds the private key of the WireGuard public key it announced
/// (`SessionKeys::wg_possession_proof`); base64 on the wire. Not secret: it is bound to one TLS
/// session and to one pair of keys.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WgProof(#[serde(with = "base64_32")] pub [u8; 32]);

impl fmt::Debug for WgProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgProof({})", STANDARD.encode(self.0))
    }
}

/// 32 bytes as a base64 string.
mod base64_32 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = STANDARD.decode(text).map_err(serde::de::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("must be 32 bytes"))
    }
}

/// What each side tells the other after the TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Hello {
    /// The sender's node name (must match its certificate).
    pub node: NodeName,
    /// The key epoch; the responder echoes the initiator's.
    pub epoch: Epoch,
    /// The SPI the sender chose for its inbound SA from the receiver.
    pub inbound_spi: Spi,
    /// The sender's node IPs.
    pub node_ips: Vec<IpAddr>,
    /// The pod CIDRs the sender owns.
    pub pod_cidrs: Vec<IpNet>,
    /// The datapath mode.
    pub mode: Mode,
    /// The sender's WireGuard public key (required in WireGuard mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_public_key: Option<WgPublicKey>,
    /// With node encryption in IPsec mode: the SPI the sender chose for the inbound SA of the
    /// receiver's host traffic (traffic between node IPs has SAs of its own, see
    /// [`crate::SessionKeys::host`]). Host SAs exist only when both sides send one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_spi: Option<Spi>,
}

impl Hello {
    /// A Hello with the required fields; add addresses and the WireGuard key with the setters.
    pub fn new(node: NodeName, epoch: Epoch, inbound_spi: Spi, mode: Mode) -> Self {
        Self {
            node,
            epoch,
            inbound_spi,
            node_ips: Vec::new(),
            pod_cidrs: Vec::new(),
            mode,
            wg_public_key: None,
            host_spi: None,
        }
    }

    /// Sets the node IPs.
    pub fn with_node_ips(mut self, ips: Vec<IpAddr>) -> Self {
        self.node_ips = ips;
        self
    }

    /// Sets the pod CIDRs.
    pub fn with_pod_cidrs(mut self, cidrs: Vec<IpNet>) -> Self {
        self.pod_cidrs = cidrs;
        self
    }

    /// Sets the WireGuard public key.
    pub fn with_wg_public_key(mut self, key: WgPublicKey) -> Self {
        self.wg_public_key = Some(key);
        self
    }

    /// Sets the SPI of the inbound host SA (node encryption, IPsec mode).
    pub fn with_host_spi(mut self, spi: Spi) -> Self {
        self.host_spi = Some(spi);
        self
    }

    /// Checks the protocol's limits and rules.
    ///
    /// # Errors
    /// [`MessageError::InvalidField`] naming the field.
    pub fn validate(&self) -> Result<(), MessageError> {
        let invalid = |field| Err(MessageError::InvalidField { field });
        if self.node_ips.len() > MAX_NODE_IPS
            || self
                .node_ips
                .iter()
                .any(|ip| ip.is_unspecified() || ip.is_multicast())
        {
            return invalid("node_ips");
        }
        if self.pod_cidrs.len() > MAX_POD_CIDRS || self.pod_cidrs.iter().any(|c| c.trunc() != *c) {
            return invalid("pod_cidrs");
        }
        if self.mode == Mode::Wireguard && self.wg_public_key.is_none() {
            return invalid("wg_public_key");
        }
        // Host SAs are IPsec's; one SPI for two SAs would give them one sequence space.
        if self
            .host_spi
            .is_some_and(|h| self.mode != Mode::Ipsec || h == self.inbound_spi)
        {
            return invalid("host_spi");
        }
        Ok(())
    }
}

/// Why a side refuses to continue, sent before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RejectReason {
    /// The responder already runs a handshake with this peer that wins collision resolution.
    Collision,
    /// The peer is not the node listed for its address.
    UnexpectedPeer,
    /// The modes differ.
    ModeMismatch,
    /// The epochs differ.
    EpochMismatch,
    /// The Hello was invalid.
    InvalidHello,
    /// The responder is shutting down or overloaded.
    Unavailable,
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Sent by the initiator, then answered by the responder.
    Hello(Hello),
    /// "My inbound SA for this epoch is installed"; sent by both sides.
    Installed {
        /// The epoch installed.
        epoch: Epoch,
    },
    /// "I hold the private key of the WireGuard public key in my Hello"; sent by both sides in
    /// WireGuard mode, after the Hellos and before installing anything.
    Possession {
        /// The proof.
        proof: WgProof,
    },
    /// Refusal, then the sender closes.
    Reject {
        /// Why.
        reason: RejectReason,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstalledBody {
    epoch: Epoch,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PossessionBody {
    proof: WgProof,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RejectBody {
    reason: RejectReason,
}

const TYPE_HELLO: u8 = 1;
const TYPE_INSTALLED: u8 = 2;
const TYPE_REJECT: u8 = 3;
const TYPE_POSSESSION: u8 = 4;

/// Parses a frame header: `(type, body length)`.
///
/// # Errors
/// [`MessageError::UnsupportedVersion`], [`MessageError::UnknownType`],
/// [`MessageError::TooLarge`].
pub fn decode_header(header: [u8; HEADER_LEN]) -> Result<(u8, usize), MessageError> {
    let [version, ty, hi, lo] = header;
    if version != PROTOCOL_VERSION {
        return Err(MessageError::UnsupportedVersion { found: version });
    }
    if !matches!(
        ty,
        TYPE_HELLO | TYPE_INSTALLED | TYPE_REJECT | TYPE_POSSESSION
    ) {
        return Err(MessageError::UnknownType { found: ty });
    }
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_BODY_LEN {
        return Err(MessageError::TooLarge { len });
    }
    Ok((ty, len))
}

/// Decodes a message body of type `ty`.
///
/// # Errors
/// [`MessageError::Body`], [`MessageError::InvalidField`], [`MessageError::UnknownType`].
pub fn decode_body(ty: u8, body: &[u8]) -> Result<Message, MessageError> {
    let body_err = |e: serde_json::Error| MessageError::Body {
        detail: e.to_string(),
    };
    match ty {
        TYPE_HELLO => {
            let hello: Hello = serde_json::from_slice(body).map_err(body_err)?;
            hello.validate()?;
            Ok(Message::Hello(hello))
        }
        TYPE_INSTALLED => {
            let b: InstalledBody = serde_json::from_slice(body).map_err(body_err)?;
            Ok(Message::Installed { epoch: b.epoch })
        }
        TYPE_REJECT => {
            let b: RejectBody = serde_json::from_slice(body).map_err(body_err)?;
            Ok(Message::Reject { reason: b.reason })
        }
        TYPE_POSSESSION => {
            let b: PossessionBody = serde_json::from_slice(body).map_err(body_err)?;
            Ok(Message::Possession { proof: b.proof })
        }
        found => Err(MessageError::UnknownType { found }),
    }
}

/// Decodes one complete frame (header and body, nothing after it).
///
/// # Errors
/// Any [`MessageError`] but `Io`.
pub fn decode_frame(frame: &[u8]) -> Result<Message, MessageError> {
    let header: [u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(MessageError::Truncated)?;
    let (ty, len) = decode_header(header)?;
    let body = &frame[HEADER_LEN..];
    if body.len() < len {
        return Err(MessageError::Truncated);
    }
    if body.len() > len {
        return Err(MessageError::TrailingData);
    }
    decode_body(ty, body)
}

/// Encodes a message as one frame.
///
/// # Errors
/// [`MessageError::InvalidField`] for an invalid Hello, [`MessageError::TooLarge`].
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, MessageError> {
    let body_err = |e: serde_json::Error| MessageError::Body {
        detail: e.to_string(),
    };
    let (ty, body) = match msg {
        Message::Hello(h) => {
            h.validate()?;
            (TYPE_HELLO, serde_json::to_vec(h).map_err(body_err)?)
        }
        Message::Installed { epoch } => (
            TYPE_INSTALLED,
            serde_json::to_vec(&InstalledBody { epoch: *epoch }).map_err(body_err)?,
        ),
        Message::Reject { reason } => (
            TYPE_REJECT,
            serde_json::to_vec(&RejectBody { reason: *reason }).map_err(body_err)?,
        ),
        Message::Possession { proof } => (
            TYPE_POSSESSION,
            serde_json::to_vec(&PossessionBody { proof: *proof }).map_err(body_err)?,
        ),
    };
    let len = u16::try_from(body.len())
        .ok()
        .filter(|l| usize::from(*l) <= MAX_BODY_LEN)
        .ok_or(MessageError::TooLarge { len: body.len() })?;
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&[PROTOCOL_VERSION, ty]);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads one message from a stream.
///
/// # Errors
/// [`MessageError`]; the size limit is checked before the body is read.
pub async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Message, MessageError> {
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).await.map_err(io_err)?;
    let (ty, len) = decode_header(header)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(io_err)?;
    decode_body(ty, &body)
}

/// Writes one message to a stream and flushes it.
///
/// # Errors
/// [`MessageError`].
pub async fn write_message<S: AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &Message,
) -> Result<(), MessageError> {
    let frame = encode_frame(msg)?;
    stream.write_all(&frame).await.map_err(io_err)?;
    stream.flush().await.map_err(io_err)
}

fn io_err(e: std::io::Error) -> MessageError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        MessageError::Truncated
    } else {
        MessageError::Io { kind: e.kind() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello::new(
            "node-a".parse().unwrap(),
            Epoch(7),
            Spi::new(0x1234_5678).unwrap(),
            Mode::Wireguard,
        )
        .with_node_ips(vec![
            "192.0.2.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ])
        .with_pod_cidrs(vec!["10.0.1.0/24".parse().unwrap()])
        .with_wg_public_key(WgPublicKey([9; 32]))
    }

    #[test]
    fn round_trip() {
        for msg in [
            Message::Hello(hello()),
            Message::Installed { epoch: Epoch(3) },
            Message::Reject {
                reason: RejectReason::Collision,
            },
            Message::Possession {
                proof: WgProof([5; 32]),
            },
        ] {
            let frame = encode_frame(&msg).unwrap();
            assert_eq!(decode_frame(&frame).unwrap(), msg);
        }
    }

    #[test]
    fn rejects_bad_frames() {
        let frame = encode_frame(&Message::Hello(hello())).unwrap();
        let mut v2 = frame.clone();
        v2[0] = 2;
        assert_eq!(
            decode_frame(&v2),
            Err(MessageError::UnsupportedVersion { found: 2 })
        );
        let mut ty = frame.clone();
        ty[1] = 99;
        assert_eq!(
            decode_frame(&ty),
            Err(MessageError::UnknownType { found: 99 })
        );
        let big = [PROTOCOL_VERSION, TYPE_HELLO, 0xff, 0xff];
        assert_eq!(
            decode_frame(&big),
            Err(MessageError::TooLarge { len: 0xffff })
        );
        assert_eq!(decode_frame(&frame[..10]), Err(MessageError::Truncated));
        assert_eq!(decode_frame(&frame[..2]), Err(MessageError::Truncated));
        let mut trailing = frame.clone();
        trailing.push(b' ');
        assert_eq!(decode_frame(&trailing), Err(MessageError::TrailingData));
        let body = br#"{"node":"a","epoch":1,"inbound_spi":7,"node_ips":[],"pod_cidrs":[],"mode":"ipsec"}"#;
        assert!(matches!(
            decode_body(TYPE_HELLO, body),
            Err(MessageError::Body { .. })
        ));
        let body = br#"{"node":"a","epoch":1,"inbound_spi":700,"node_ips":[],"pod_cidrs":["10.0.0.1/24"],"mode":"ipsec"}"#;
        assert_eq!(
            decode_body(TYPE_HELLO, body),
            Err(MessageError::InvalidField { field: "pod_cidrs" })
        );
        let body = br#"{"node":"a","epoch":1,"inbound_spi":700,"node_ips":[],"pod_cidrs":[],"mode":"wireguard"}"#;
        assert_eq!(
            decode_body(TYPE_HELLO, body),
            Err(MessageError::InvalidField {
                field: "wg_public_key"
            })
        );
        for body in [
            &br#"{"node":"a","epoch":1,"inbound_spi":700,"node_ips":[],"pod_cidrs":[],"mode":"ipsec","host_spi":700}"#[..],
            br#"{"node":"a","epoch":1,"inbound_spi":700,"node_ips":[],"pod_cidrs":[],"mode":"wireguard","wg_public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","host_spi":701}"#,
        ] {
            assert_eq!(
                decode_body(TYPE_HELLO, body),
                Err(MessageError::InvalidField { field: "host_spi" }),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let body = br#"{"node":"a","epoch":1,"inbound_spi":700,"node_ips":[],"pod_cidrs":[],"mode":"ipsec","host_spi":701}"#;
        assert!(decode_body(TYPE_HELLO, body).is_ok());
        let body = br#"{"node":"a","epoch":1,"inbound_spi":700,"node_ips":[],"pod_cidrs":[],"mode":"ipsec","extra":1}"#;
        assert!(matches!(
            decode_body(TYPE_HELLO, body),
            Err(MessageError::Body { .. })
        ));
        for body in [
            &br#"{"proof":"AAAA"}"#[..],
            br#"{"proof":"not base64!"}"#,
            br#"{}"#,
        ] {
            assert!(
                matches!(
                    decode_body(TYPE_POSSESSION, body),
                    Err(MessageError::Body { .. })
                ),
                "{body:?}"
            );
        }
    }

    #[tokio::test]
    async fn stream_limits_checked_before_reading_body() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[PROTOCOL_VERSION, TYPE_HELLO, 0x40, 0x00])
            .await
            .unwrap();
        assert_eq!(
            read_message(&mut b).await,
            Err(MessageError::TooLarge { len: 0x4000 })
        );
        write_message(&mut a, &Message::Installed { epoch: Epoch(1) })
            .await
            .unwrap();
        drop(a);
        assert_eq!(
            read_message(&mut b).await,
            Ok(Message::Installed { epoch: Epoch(1) })
        );
        assert_eq!(read_message(&mut b).await, Err(MessageError::Truncated));
    }
}
