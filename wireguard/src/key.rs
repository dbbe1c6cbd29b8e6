//! WireGuard keys: the node's X25519 [`PrivateKey`], a peer's [`PublicKey`] and a pair's
//! [`PresharedKey`].
//!
//! Secrets (private and preshared keys) are zeroized on drop, print as `<redacted>` in `Debug`,
//! have no `Display`, and compare in constant time. Public keys print as base64, the way `wg`
//! shows them, so they can be compared with `wg show` and logged.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Bytes in every WireGuard key (`WG_KEY_LEN`).
pub const KEY_LEN: usize = 32;

/// Errors building keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The operating system's random source failed.
    #[error("cannot read {KEY_LEN} random bytes from the operating system: {reason}")]
    Random {
        /// What `getrandom` reported.
        reason: String,
    },
    /// Not 32 bytes.
    #[error("a WireGuard key is {KEY_LEN} bytes, got {len}")]
    Length {
        /// The length given.
        len: usize,
    },
    /// Not base64 of 32 bytes.
    #[error("not a base64 WireGuard key")]
    Base64,
}

/// A node's X25519 private key (`wg genkey`).
///
/// The key is clamped when built (as `wg genkey` does and as the kernel does when it stores
/// one), so reading a configured device back yields the same bytes. Clamping does not change
/// the X25519 scalar, so the public key is the same either way.
#[derive(Clone)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// A fresh key from the operating system's random source.
    ///
    /// # Errors
    /// [`KeyError::Random`] if the random source fails (it does not block after boot).
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self::from_bytes(&mut *random_bytes()?))
    }

    /// A key from its 32 bytes (clamped; see the type's docs); the caller's array is wiped.
    #[must_use]
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
        let mut key = *bytes;
        bytes.zeroize();
        key[0] &= 248;
        key[31] &= 127;
        key[31] |= 64;
        Self(key)
    }

    /// The matching public key (`wg pubkey`).
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// The X25519 secret shared with whoever holds the private half of `peer`; `None` when it
    /// is all zeros (`peer` is a low-order point, and anyone can compute that secret).
    #[must_use]
    pub fn shared_secret(&self, peer: &PublicKey) -> Option<Zeroizing<[u8; KEY_LEN]>> {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(peer.0));
        shared
            .was_contributory()
            .then(|| Zeroizing::new(shared.to_bytes()))
    }

    /// The raw key, for writing into a netlink buffer.
    pub(crate) const fn secret_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PrivateKey").field(&"<redacted>").finish()
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for PrivateKey {}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(&self.0, &other.0)
    }
}

impl Eq for PrivateKey {}

/// A peer's X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// A key from its 32 bytes.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl TryFrom<&[u8]> for PublicKey {
    type Error = KeyError;

    fn try_from(bytes: &[u8]) -> Result<Self, KeyError> {
        let bytes =
            <[u8; KEY_LEN]>::try_from(bytes).map_err(|_| KeyError::Length { len: bytes.len() })?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for PublicKey {
    /// Base64, as `wg` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    /// Parses the base64 form `wg` prints.
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let mut out = [0u8; KEY_LEN];
        match BASE64.decode_slice(s.trim(), &mut out) {
            Ok(KEY_LEN) => Ok(Self(out)),
            _ => Err(KeyError::Base64),
        }
    }
}

/// A per-pair symmetric key mixed into WireGuard's handshake (`wg genpsk`).
///
/// The kernel treats an all-zero key as "no preshared key".
#[derive(Clone)]
pub struct PresharedKey([u8; KEY_LEN]);

impl PresharedKey {
    /// A fresh key from the operating system's random source.
    ///
    /// # Errors
    /// [`KeyError::Random`] if the random source fails.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self(*random_bytes()?))
    }

    /// A key from its 32 bytes; the caller's array is wiped.
    #[must_use]
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
        let key = Self(*bytes);
        bytes.zeroize();
        key
    }

    /// A key from a slice of exactly 32 bytes (e.g. TLS exporter output). The slice is not
    /// wiped: it belongs to the caller.
    ///
    /// # Errors
    /// [`KeyError::Length`] if the slice is not 32 bytes.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return Err(KeyError::Length { len: bytes.len() });
        }
        key.copy_from_slice(bytes);
        Ok(Self(*key))
    }

    /// Whether this is the all-zero key, which the kernel reads as "none".
    #[must_use]
    pub fn is_zero(&self) -> bool {
        constant_time_eq(&self.0, &[0; KEY_LEN])
    }

    /// The raw key, for writing into a netlink buffer.
    pub(crate) const fn secret_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PresharedKey").field(&"<redacted>").finish()
    }
}

impl Drop for PresharedKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for PresharedKey {}

impl PartialEq for PresharedKey {
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(&self.0, &other.0)
    }
}

impl Eq for PresharedKey {}

/// 32 random bytes in a buffer that is wiped on drop.
fn random_bytes() -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(&mut *bytes).map_err(|e| KeyError::Random {
        reason: e.to_string(),
    })?;
    Ok(bytes)
}

/// Compares without an early exit, so timing does not tell how many leading bytes match.
fn constant_time_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_holders_compute_one_shared_secret_and_a_low_order_key_gets_none() {
        let (a, b, c) = (
            PrivateKey::generate().unwrap(),
            PrivateKey::generate().unwrap(),
            PrivateKey::generate().unwrap(),
        );
        let ab = a.shared_secret(&b.public_key()).unwrap();
        assert_eq!(ab, b.shared_secret(&a.public_key()).unwrap());
        assert_ne!(ab, c.shared_secret(&a.public_key()).unwrap());
        // The identity point (0) and the order-4 point 1 give an all-zero secret.
        let mut one = [0u8; KEY_LEN];
        one[0] = 1;
        for low in [[0u8; KEY_LEN], one] {
            assert!(a.shared_secret(&PublicKey::from_bytes(low)).is_none());
        }
    }

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 section 6.1: Alice's private key and public key.
        let private = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let key = PrivateKey::from_bytes(&mut private.clone());
        assert_eq!(key.public_key(), PublicKey::from_bytes(public));
    }

    #[test]
    fn private_keys_are_clamped_and_random() {
        let a = PrivateKey::generate().unwrap();
        let b = PrivateKey::generate().unwrap();
        assert_ne!(a, b);
        for k in [&a, &b] {
            let bytes = k.secret_bytes();
            assert_eq!(bytes[0] & 7, 0);
            assert_eq!(bytes[31] & 0xc0, 0x40);
        }
        // Clamping is idempotent and keeps the public key.
        let again = PrivateKey::from_bytes(&mut a.secret_bytes().clone());
        assert_eq!(again, a);
        assert_eq!(again.public_key(), a.public_key());
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let private = PrivateKey::from_bytes(&mut [0x41; KEY_LEN]);
        let mut raw = [0x42; KEY_LEN];
        let psk = PresharedKey::from_bytes(&mut raw);
        assert_eq!(raw, [0; KEY_LEN], "the caller's copy is wiped");
        assert_eq!(format!("{private:?}"), "PrivateKey(\"<redacted>\")");
        assert_eq!(format!("{psk:?}"), "PresharedKey(\"<redacted>\")");
        let public = private.public_key();
        assert!(format!("{public:?}").contains(&public.to_string()));
    }

    #[test]
    fn public_keys_round_trip_through_base64() {
        let key = PublicKey::from_bytes([7; KEY_LEN]);
        let text = key.to_string();
        assert_eq!(text, "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=");
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::Base64));
        assert_eq!("not base64!".parse::<PublicKey>(), Err(KeyError::Base64));
        assert_eq!(
            PublicKey::try_from(&[1u8; 31][..]),
            Err(KeyError::Length { len: 31 })
        );
    }

    #[test]
    fn preshared_keys_compare_and_know_zero() {
        let a = PresharedKey::generate().unwrap();
        let b = PresharedKey::try_from_slice(a.secret_bytes()).unwrap();
        assert_eq!(a, b);
        assert!(!a.is_zero());
        assert!(PresharedKey::from_bytes(&mut [0; KEY_LEN]).is_zero());
        assert_eq!(
            PresharedKey::try_from_slice(&[1; 16]),
            Err(KeyError::Length { len: 16 })
        );
    }

    fn hex(s: &str) -> [u8; KEY_LEN] {
        let mut out = [0u8; KEY_LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
