//! SA key material derived from the TLS exporter.
//!
//! Every key is `export_keying_material(label = "EXPORTER-nodeseal-v1", context)` with
//! `context = purpose (1 byte) || epoch (u64 BE) || initiator's inbound SPI (u32 BE) ||
//! responder's inbound SPI (u32 BE)`. Purposes separate the two directions, the two AEADs and the
//! WireGuard PSK, so no two keys share exporter output. Keys are zeroized on drop, print as
//! `[redacted]`, and are neither `Clone` nor `Serialize`.
//!
//! With node encryption in IPsec mode, traffic between the node IPs has SAs of its own
//! ([`SessionKeys::host`]): their SPIs are the Hellos' `host_spi`, the context carries those in
//! place of the pod SAs' SPIs, and their purposes are distinct, so they share neither a key nor a
//! sequence space with the pod SAs.
//!
//! In WireGuard mode each side also proves it holds the private key of the WireGuard public key
//! it announced: [`SessionKeys::wg_possession_proof`] is an HMAC-SHA256, under a key of its own
//! from the exporter (so a proof is bound to this TLS session), of the side's role and the
//! X25519 secret of the two static WireGuard keys, which only a holder of one of the two private
//! keys can compute.

use std::fmt;

use zeroize::{Zeroize as _, Zeroizing};

use crate::protocol::{Epoch, Spi, WgProof};

/// Exporter label (RFC 8446 section 7.5; labels start with "EXPORTER").
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-nodeseal-v1";
/// Salt length of `rfc4106(gcm(aes))`.
pub const GCM_SALT_LEN: usize = 4;

const PURPOSE_I2R_AES128: u8 = 1;
const PURPOSE_I2R_AES256: u8 = 2;
const PURPOSE_R2I_AES128: u8 = 3;
const PURPOSE_R2I_AES256: u8 = 4;
const PURPOSE_WG_PSK: u8 = 5;
const PURPOSE_WG_POSSESSION: u8 = 6;
const PURPOSE_HOST_I2R_AES128: u8 = 7;
const PURPOSE_HOST_I2R_AES256: u8 = 8;
const PURPOSE_HOST_R2I_AES128: u8 = 9;
const PURPOSE_HOST_R2I_AES256: u8 = 10;
/// Prefixes what a possession proof authenticates.
const POSSESSION_LABEL: &[u8] = b"nodeseal wireguard key possession v1";

/// ESP AEAD algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Aead {
    /// `rfc4106(gcm(aes))` with a 128-bit key (160 bits with salt), ICV 128 bits.
    Aes128Gcm,
    /// `rfc4106(gcm(aes))` with a 256-bit key (288 bits with salt), ICV 128 bits.
    Aes256Gcm,
}

impl Aead {
    /// AES key length in bytes (without salt).
    pub fn key_len(self) -> usize {
        match self {
            Aead::Aes128Gcm => 16,
            Aead::Aes256Gcm => 32,
        }
    }
}

/// Key and salt of one ESP SA.
pub struct SaKey {
    aead: Aead,
    /// AES key followed by the 4-byte salt, as XFRM wants it.
    material: Zeroizing<Vec<u8>>,
}

impl SaKey {
    /// The algorithm.
    pub fn aead(&self) -> Aead {
        self.aead
    }

    /// The AES key.
    pub fn key(&self) -> &[u8] {
        &self.material[..self.aead.key_len()]
    }

    /// The 4-byte salt (nonce prefix).
    pub fn salt(&self) -> &[u8] {
        &self.material[self.aead.key_len()..]
    }

    /// Key followed by salt: the `rfc4106(gcm(aes))` key blob XFRM takes.
    pub fn rfc4106_key(&self) -> &[u8] {
        &self.material
    }
}

impl fmt::Debug for SaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SaKey({:?}, [redacted])", self.aead)
    }
}

/// A 32-byte WireGuard pre-shared key for one peer pair.
pub struct WgPsk(Zeroizing<[u8; 32]>);

impl WgPsk {
    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for WgPsk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WgPsk([redacted])")
    }
}

/// Keys for one direction of the pair.
#[derive(Debug)]
#[non_exhaustive]
pub struct DirectionKeys {
    /// The SPI of this direction's SA (chosen by the receiving side).
    pub spi: Spi,
    /// Key for AES-128-GCM.
    pub aes128_gcm: SaKey,
    /// Key for AES-256-GCM.
    pub aes256_gcm: SaKey,
}

impl DirectionKeys {
    /// The key for `aead`.
    pub fn key(&self, aead: Aead) -> &SaKey {
        match aead {
            Aead::Aes128Gcm => &self.aes128_gcm,
            Aead::Aes256Gcm => &self.aes256_gcm,
        }
    }
}

/// The keys of the host SAs: traffic between the two node IPs, apart from the pods' SAs.
#[derive(Debug)]
#[non_exhaustive]
pub struct HostKeys {
    /// Local → peer (SPI chosen by the peer).
    pub outbound: DirectionKeys,
    /// Peer → local (SPI chosen by us).
    pub inbound: DirectionKeys,
}

/// The SPIs of one pair of SAs, as the two Hellos chose them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpiPair {
    /// The initiator's inbound SPI.
    pub initiator: Spi,
    /// The responder's inbound SPI.
    pub responder: Spi,
}

/// Everything one handshake yields, from the local node's point of view.
#[derive(Debug)]
#[non_exhaustive]
pub struct SessionKeys {
    /// The epoch.
    pub epoch: Epoch,
    /// Local → peer (SPI chosen by the peer).
    pub outbound: DirectionKeys,
    /// Peer → local (SPI chosen by us).
    pub inbound: DirectionKeys,
    /// The SAs of traffic between the two node IPs (node encryption, IPsec mode), when both
    /// Hellos carried a `host_spi`.
    pub host: Option<HostKeys>,
    /// WireGuard PSK for the pair.
    pub wg_psk: WgPsk,
    /// The HMAC key of the WireGuard possession proofs.
    wg_possession: PossessionKey,
    /// Which side of the handshake we were.
    side: Side,
}

impl SessionKeys {
    /// Our proof that we hold the private key of the WireGuard public key we announced, given
    /// `shared`: X25519 of our private key and the peer's announced public key.
    pub fn wg_possession_proof(&self, shared: &[u8; 32]) -> WgProof {
        possession_proof(&self.wg_possession.0, self.side, shared)
    }

    /// Whether `proof` is the peer's proof over `shared` (X25519 of our private key and the
    /// public key the peer announced): only a holder of that key's private half (or of ours)
    /// can make it. Compared in constant time.
    pub fn verify_wg_possession(&self, shared: &[u8; 32], proof: &WgProof) -> bool {
        let theirs = match self.side {
            Side::Initiator => Side::Responder,
            Side::Responder => Side::Initiator,
        };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.wg_possession.0.as_slice());
        ring::hmac::verify(&key, &possession_message(theirs, shared), &proof.0).is_ok()
    }
}

/// The HMAC key of the possession proofs.
struct PossessionKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for PossessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PossessionKey([redacted])")
    }
}

/// The message a side's possession proof authenticates: the label, the side, the secret. The
/// side keeps a proof from being reflected back as the other side's.
fn possession_message(side: Side, shared: &[u8; 32]) -> Zeroizing<Vec<u8>> {
    let mut message = Zeroizing::new(Vec::with_capacity(POSSESSION_LABEL.len() + 33));
    message.extend_from_slice(POSSESSION_LABEL);
    message.push(match side {
        Side::Initiator => 1,
        Side::Responder => 2,
    });
    message.extend_from_slice(shared);
    message
}

fn possession_proof(key: &[u8; 32], side: Side, shared: &[u8; 32]) -> WgProof {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, &possession_message(side, shared));
    let mut proof = [0u8; 32];
    proof.copy_from_slice(tag.as_ref());
    WgProof(proof)
}

/// Which side of the handshake we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Initiator,
    Responder,
}

/// Derives all keys through `export(output, label, context)`: the pod SAs' on `spis`, the host
/// SAs' on `host_spis` when there are some.
pub(crate) fn derive<E>(
    mut export: impl FnMut(&mut [u8], &[u8], &[u8]) -> Result<(), E>,
    side: Side,
    epoch: Epoch,
    spis: SpiPair,
    host_spis: Option<SpiPair>,
) -> Result<SessionKeys, E> {
    let mut context = [0u8; 17];
    context[1..9].copy_from_slice(&epoch.0.to_be_bytes());
    let mut pair =
        |spis: SpiPair, purposes: [u8; 4]| -> Result<(DirectionKeys, DirectionKeys), E> {
            context[9..13].copy_from_slice(&spis.initiator.get().to_be_bytes());
            context[13..17].copy_from_slice(&spis.responder.get().to_be_bytes());
            let mut sa = |purpose: u8, aead: Aead| -> Result<SaKey, E> {
                let mut material = Zeroizing::new(vec![0u8; aead.key_len() + GCM_SALT_LEN]);
                context[0] = purpose;
                export(&mut material, EXPORTER_LABEL, &context)?;
                Ok(SaKey { aead, material })
            };
            // Initiator → responder travels on the SA whose SPI the responder chose.
            let i2r = DirectionKeys {
                spi: spis.responder,
                aes128_gcm: sa(purposes[0], Aead::Aes128Gcm)?,
                aes256_gcm: sa(purposes[1], Aead::Aes256Gcm)?,
            };
            let r2i = DirectionKeys {
                spi: spis.initiator,
                aes128_gcm: sa(purposes[2], Aead::Aes128Gcm)?,
                aes256_gcm: sa(purposes[3], Aead::Aes256Gcm)?,
            };
            Ok(match side {
                Side::Initiator => (i2r, r2i),
                Side::Responder => (r2i, i2r),
            })
        };
    let host = match host_spis {
        Some(spis) => {
            let (outbound, inbound) = pair(
                spis,
                [
                    PURPOSE_HOST_I2R_AES128,
                    PURPOSE_HOST_I2R_AES256,
                    PURPOSE_HOST_R2I_AES128,
                    PURPOSE_HOST_R2I_AES256,
                ],
            )?;
            Some(HostKeys { outbound, inbound })
        }
        None => None,
    };
    let (outbound, inbound) = pair(
        spis,
        [
            PURPOSE_I2R_AES128,
            PURPOSE_I2R_AES256,
            PURPOSE_R2I_AES128,
            PURPOSE_R2I_AES256,
        ],
    )?;
    let mut psk = Zeroizing::new([0u8; 32]);
    context[0] = PURPOSE_WG_PSK;
    export(psk.as_mut_slice(), EXPORTER_LABEL, &context)?;
    let mut wg_possession = Zeroizing::new([0u8; 32]);
    context[0] = PURPOSE_WG_POSSESSION;
    export(wg_possession.as_mut_slice(), EXPORTER_LABEL, &context)?;
    context.zeroize();
    Ok(SessionKeys {
        epoch,
        outbound,
        inbound,
        host,
        wg_psk: WgPsk(psk),
        wg_possession: PossessionKey(wg_possession),
        side,
    })
}
