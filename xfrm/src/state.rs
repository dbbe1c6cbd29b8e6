//! XFRM states (security associations): the typed model nodeseal programs.
//!
//! nodeseal only installs ESP tunnel-mode states with an AEAD. States of other shapes that the
//! kernel holds (other software's) are still listed, as [`KernelState`] without a spec.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use zeroize::Zeroizing;

use crate::selector::{Mark, Selector, same_family};

/// Errors building a [`StateSpec`] or its parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// SPIs 0..=255 are reserved by RFC 4303.
    #[error("spi {spi} is reserved (0..=255)")]
    ReservedSpi {
        /// The rejected value.
        spi: u32,
    },
    /// Reqid 0 means "any" in templates and cannot name a state.
    #[error("reqid 0 is reserved")]
    ZeroReqId,
    /// Text that is not a number.
    #[error("not a number: {text:?}")]
    NotANumber {
        /// The text that failed to parse.
        text: String,
    },
    /// Key material of the wrong length for the algorithm.
    #[error("{algorithm} needs {expected} bytes of key and salt, got {got}")]
    KeyLength {
        /// The algorithm.
        algorithm: AeadAlgorithm,
        /// Expected length including the 4-byte salt.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// Tunnel endpoints of different families.
    #[error("tunnel endpoints mix address families: {src} -> {dst}")]
    MixedEndpoints {
        /// Outer source.
        src: IpAddr,
        /// Outer destination.
        dst: IpAddr,
    },
    /// The kernel refuses ESN without an anti-replay window.
    #[error("extended sequence numbers need a replay window greater than 0")]
    EsnWithoutReplayWindow,
    /// The replay window is larger than the kernel's ESN bitmap.
    #[error("replay window {window} exceeds the maximum of {max}")]
    ReplayWindow {
        /// Requested window.
        window: u32,
        /// The maximum.
        max: u32,
    },
}

/// ESP Security Parameter Index. 0..=255 are reserved (RFC 4303), so [`Spi::new`] rejects them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Spi(u32);

impl Spi {
    /// A SPI; values 0..=255 are rejected.
    ///
    /// # Errors
    /// [`SpecError::ReservedSpi`] for 0..=255.
    pub const fn new(spi: u32) -> Result<Self, SpecError> {
        if spi <= 255 {
            return Err(SpecError::ReservedSpi { spi });
        }
        Ok(Self(spi))
    }

    /// The SPI in host byte order.
    #[must_use]
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Spi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

impl FromStr for Spi {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(parse_u32(s)?)
    }
}

/// Request id tying policy templates to states. 0 ("any") is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(u32);

impl ReqId {
    /// A reqid; 0 is rejected.
    ///
    /// # Errors
    /// [`SpecError::ZeroReqId`] for 0.
    pub const fn new(reqid: u32) -> Result<Self, SpecError> {
        if reqid == 0 {
            return Err(SpecError::ZeroReqId);
        }
        Ok(Self(reqid))
    }

    /// The raw value.
    #[must_use]
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for ReqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for ReqId {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(parse_u32(s)?)
    }
}

fn parse_u32(s: &str) -> Result<u32, SpecError> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| SpecError::NotANumber { text: s.to_owned() })
}

/// The AEAD transforms nodeseal installs. The ICV is always 128 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AeadAlgorithm {
    /// `rfc4106(gcm(aes))` with a 128-bit key and 4-byte salt.
    AesGcm128,
    /// `rfc4106(gcm(aes))` with a 256-bit key and 4-byte salt.
    AesGcm256,
    /// `rfc7539esp(chacha20,poly1305)` with a 256-bit key and 4-byte salt.
    ChaCha20Poly1305,
}

impl AeadAlgorithm {
    /// ICV length in bits (always 128).
    pub const ICV_BITS: u32 = 128;

    /// The kernel crypto API name.
    #[must_use]
    pub const fn kernel_name(self) -> &'static str {
        match self {
            Self::AesGcm128 | Self::AesGcm256 => "rfc4106(gcm(aes))",
            Self::ChaCha20Poly1305 => "rfc7539esp(chacha20,poly1305)",
        }
    }

    /// Key plus salt length in bytes.
    #[must_use]
    pub const fn key_len(self) -> usize {
        match self {
            Self::AesGcm128 => 16 + 4,
            Self::AesGcm256 | Self::ChaCha20Poly1305 => 32 + 4,
        }
    }

    /// The kernel modules this transform needs besides `esp4`/`esp6` and `xfrm_user`.
    #[must_use]
    pub const fn modules(self) -> &'static [&'static str] {
        match self {
            Self::AesGcm128 | Self::AesGcm256 => &[
                "gcm",
                "ghash-generic",
                "aesni_intel or aes_generic",
                "seqiv",
            ],
            Self::ChaCha20Poly1305 => &["chacha20poly1305", "chacha_generic", "poly1305_generic"],
        }
    }

    pub(crate) fn from_kernel(name: &str, key_bits: u32, icv_bits: u32) -> Option<Self> {
        if icv_bits != Self::ICV_BITS {
            return None;
        }
        match (name, key_bits) {
            ("rfc4106(gcm(aes))", 160) => Some(Self::AesGcm128),
            ("rfc4106(gcm(aes))", 288) => Some(Self::AesGcm256),
            ("rfc7539esp(chacha20,poly1305)", 288) => Some(Self::ChaCha20Poly1305),
            _ => None,
        }
    }
}

impl fmt::Display for AeadAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = (self.key_len() - 4) * 8;
        write!(f, "{} ({bits}-bit key)", self.kernel_name())
    }
}

/// An AEAD transform and its key material (key followed by the 4-byte salt).
///
/// The material is zeroized on drop and never printed. `Clone` exists because the reconcile
/// engine and the fake kernel keep copies; every copy is zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Aead {
    algorithm: AeadAlgorithm,
    key: Zeroizing<Vec<u8>>,
}

impl Aead {
    /// An AEAD from key material that is the key followed by the 4-byte salt.
    ///
    /// # Errors
    /// [`SpecError::KeyLength`] if the material's length does not fit the algorithm.
    pub fn new(algorithm: AeadAlgorithm, key_and_salt: &[u8]) -> Result<Self, SpecError> {
        if key_and_salt.len() != algorithm.key_len() {
            return Err(SpecError::KeyLength {
                algorithm,
                expected: algorithm.key_len(),
                got: key_and_salt.len(),
            });
        }
        let mut key = Zeroizing::new(Vec::with_capacity(key_and_salt.len()));
        key.extend_from_slice(key_and_salt);
        Ok(Self { algorithm, key })
    }

    /// The algorithm.
    #[must_use]
    pub const fn algorithm(&self) -> AeadAlgorithm {
        self.algorithm
    }

    /// The key material (key || salt). Handle with care.
    #[must_use]
    pub fn key_material(&self) -> &[u8] {
        &self.key
    }
}

impl fmt::Debug for Aead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aead")
            .field("algorithm", &self.algorithm)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Soft or hard expiry limits of a state or policy (`struct xfrm_lifetime_cfg` half).
///
/// `None` means no limit. `ip xfrm state ... limit byte-soft N time-hard S ...`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Bytes processed.
    pub bytes: Option<u64>,
    /// Packets processed.
    pub packets: Option<u64>,
    /// Seconds since the state was added.
    pub add_seconds: Option<u64>,
    /// Seconds since the state was first used.
    pub use_seconds: Option<u64>,
}

/// Soft limits (the kernel sends an expire notice) and hard limits (the state is deleted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lifetime {
    /// Soft limits.
    pub soft: Limits,
    /// Hard limits.
    pub hard: Limits,
}

/// The identity of an ESP state in the kernel: destination, SPI and mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StateId {
    /// Outer destination address.
    pub dst: IpAddr,
    /// SPI.
    pub spi: Spi,
    /// Mark the state was installed with.
    pub mark: Mark,
}

impl fmt::Display for StateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "state dst {} spi {}", self.dst, self.spi)?;
        if !self.mark.is_none() {
            write!(f, " mark {}", self.mark)?;
        }
        Ok(())
    }
}

/// An ESP tunnel-mode state (`struct xfrm_usersa_info` and attributes).
///
/// `ip xfrm state add src SRC dst DST proto esp spi SPI reqid R mode tunnel
/// aead 'rfc4106(gcm(aes))' KEY 128 [flag esn] replay-window W mark V mask M
/// output-mark V mask M sel src S dst D` (or `flag af-unspec` and no `sel` for a state that
/// carries inner traffic of either family).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateSpec {
    /// Outer source address (this end of the tunnel for OUT states).
    pub src: IpAddr,
    /// Outer destination address.
    pub dst: IpAddr,
    /// SPI.
    pub spi: Spi,
    /// Reqid, which templates of policies refer to.
    pub reqid: ReqId,
    /// The AEAD transform and key.
    pub aead: Aead,
    /// Extended sequence numbers (64-bit).
    pub esn: bool,
    /// Anti-replay window in packets (0 = none; up to 4096).
    pub replay_window: u32,
    /// Mark a packet must carry to use this state.
    pub mark: Mark,
    /// Mark set on packets after this state processed them (`output-mark`).
    pub output_mark: Mark,
    /// Inner traffic this state may carry. `None`: any inner traffic of either family (an empty
    /// selector with `XFRM_STATE_AF_UNSPEC`), so one tunnel between two nodes carries their
    /// pods' IPv4 and IPv6 alike, over an underlay of either family; what may enter it is then
    /// the policies' to say.
    pub selector: Option<Selector>,
    /// Expiry limits.
    pub lifetime: Lifetime,
}

impl StateSpec {
    /// The largest replay window the kernel accepts (`XFRMA_REPLAY_ESN_MAX` bytes of bitmap).
    pub const MAX_REPLAY_WINDOW: u32 = 4096 * 8;

    /// A state with the required parts; ESN on, replay window 128, no marks, no lifetimes.
    ///
    /// # Errors
    /// [`SpecError::MixedEndpoints`] if `src` and `dst` differ in family.
    pub fn new(
        src: IpAddr,
        dst: IpAddr,
        spi: Spi,
        reqid: ReqId,
        aead: Aead,
        selector: Option<Selector>,
    ) -> Result<Self, SpecError> {
        if !same_family(src, dst) {
            return Err(SpecError::MixedEndpoints { src, dst });
        }
        Ok(Self {
            src,
            dst,
            spi,
            reqid,
            aead,
            esn: true,
            replay_window: 128,
            mark: Mark::NONE,
            output_mark: Mark::NONE,
            selector,
            lifetime: Lifetime::default(),
        })
    }

    /// The kernel identity of this state.
    #[must_use]
    pub const fn id(&self) -> StateId {
        StateId {
            dst: self.dst,
            spi: self.spi,
            mark: self.mark,
        }
    }

    /// Checks the invariants the public fields can break.
    ///
    /// # Errors
    /// The first violated invariant.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !same_family(self.src, self.dst) {
            return Err(SpecError::MixedEndpoints {
                src: self.src,
                dst: self.dst,
            });
        }
        if self.esn && self.replay_window == 0 {
            return Err(SpecError::EsnWithoutReplayWindow);
        }
        if self.replay_window > Self::MAX_REPLAY_WINDOW {
            return Err(SpecError::ReplayWindow {
                window: self.replay_window,
                max: Self::MAX_REPLAY_WINDOW,
            });
        }
        Ok(())
    }

    /// Whether `other` differs from `self` only in what `XFRM_MSG_UPDSA` can change in place
    /// (lifetimes and output mark). Everything else (keys, selector, replay) needs a new state.
    #[must_use]
    pub fn updatable_to(&self, other: &Self) -> bool {
        // UPDSA only replaces the output mark when the new one is non-empty: clearing it needs
        // a new state.
        if other.output_mark.is_none() && !self.output_mark.is_none() {
            return false;
        }
        let mut a = self.clone();
        a.lifetime = other.lifetime;
        a.output_mark = other.output_mark;
        a == *other
    }
}

/// Per-state counters from the kernel (`curlft`, `stats`, replay state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateStats {
    /// Bytes processed.
    pub bytes: u64,
    /// Packets processed.
    pub packets: u64,
    /// Unix time the state was added.
    pub add_time: u64,
    /// Unix time the state was first used (0 = never).
    pub use_time: u64,
    /// Packets dropped as outside the replay window.
    pub replay_window_drops: u32,
    /// Packets dropped as replays.
    pub replay_drops: u32,
    /// Packets that failed the integrity check.
    pub integrity_failures: u32,
    /// Last output sequence number, including the ESN high 32 bits.
    pub output_seq: u64,
    /// Highest input sequence number seen, including the ESN high 32 bits.
    pub input_seq: u64,
}

/// A state as the kernel reports it, ours or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelState {
    /// Outer destination.
    pub dst: IpAddr,
    /// Raw SPI (foreign states may use any value).
    pub spi: u32,
    /// IPsec protocol number (50 = ESP).
    pub proto: u8,
    /// Reqid (0 = none).
    pub reqid: u32,
    /// Mark.
    pub mark: Mark,
    /// The typed spec, when the state is an ESP tunnel state nodeseal can describe.
    pub spec: Option<StateSpec>,
    /// Counters.
    pub stats: StateStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spi_and_reqid_reject_reserved_values() {
        assert_eq!(Spi::new(255), Err(SpecError::ReservedSpi { spi: 255 }));
        assert_eq!(Spi::new(256).unwrap().get(), 256);
        assert_eq!("0x1000".parse::<Spi>().unwrap().get(), 0x1000);
        assert_eq!(Spi::new(0x1000).unwrap().to_string(), "0x00001000");
        assert_eq!(ReqId::new(0), Err(SpecError::ZeroReqId));
        assert!(matches!(
            "x".parse::<ReqId>(),
            Err(SpecError::NotANumber { .. })
        ));
        assert_eq!("17".parse::<ReqId>().unwrap().to_string(), "17");
    }

    #[test]
    fn aead_checks_length_and_redacts() {
        let err = Aead::new(AeadAlgorithm::AesGcm128, &[0; 16]);
        assert_eq!(
            err,
            Err(SpecError::KeyLength {
                algorithm: AeadAlgorithm::AesGcm128,
                expected: 20,
                got: 16
            })
        );
        let aead = Aead::new(AeadAlgorithm::AesGcm256, &[0xab; 36]).unwrap();
        let dbg = format!("{aead:?}");
        assert!(dbg.contains("redacted") && !dbg.contains("ab") && !dbg.contains("171"));
        assert_eq!(
            AeadAlgorithm::from_kernel("rfc7539esp(chacha20,poly1305)", 288, 128),
            Some(AeadAlgorithm::ChaCha20Poly1305)
        );
        assert_eq!(
            AeadAlgorithm::from_kernel("rfc4106(gcm(aes))", 160, 64),
            None
        );
    }
}
