//! The `skb->mark` layout shared with the XFRM policies and states.
//!
//! Modelled on Cilium's scheme (`bpf/lib/ipsec.h`, `pkg/datapath/linux/linux_defaults`):
//!
//! ```text
//!  31            16 15   12 11    8 7       0
//! +----------------+-------+-------+---------+
//! |  peer node id  |  key  | magic |  (free) |
//! +----------------+-------+-------+---------+
//! ```
//!
//! * magic `0xE` in bits 8..12 marks a packet to encrypt (from-pod), `0xD` a packet that came in
//!   as ESP from an authenticated node (from-network);
//! * key slot (1..=15) in bits 12..16 selects which of the peer's SAs the OUT policy matches, so
//!   switching keys is one map write;
//! * the peer node id in bits 16..32 selects the peer's SA.
//!
//! The low byte is left to other users of the mark.

/// Mask of the magic nibble.
pub const MAGIC_MASK: u32 = 0x0F00;
/// Magic: encrypt this packet (set on egress from a pod).
pub const MAGIC_ENCRYPT: u32 = 0x0E00;
/// Magic: ESP from a known node; decrypt it (set on ingress from the network).
pub const MAGIC_DECRYPT: u32 = 0x0D00;
/// Magic: a packet WireGuard itself sends (the device's fwmark, with node encryption in
/// WireGuard mode): it goes by the main table, never into the link it came from.
pub const MAGIC_WIREGUARD: u32 = 0x0C00;
/// Bit position of the key slot.
pub const KEY_SHIFT: u32 = 12;
/// Mask of the key slot.
pub const KEY_MASK: u32 = 0xF000;
/// Bit position of the peer node id.
pub const NODE_SHIFT: u32 = 16;
/// Mask of the peer node id.
pub const NODE_MASK: u32 = 0xFFFF_0000;
/// Mask covering every bit nodeseal owns (magic, key and node id); XFRM marks use it.
pub const OWNED_MASK: u32 = MAGIC_MASK | KEY_MASK | NODE_MASK;
/// Highest usable key slot (slot 0 means "no key").
pub const MAX_KEY_SLOT: u8 = 15;

/// Mark for a packet to be encrypted for `node_id` with key `key_slot` (only the low 4 bits of
/// `key_slot` are used).
#[must_use]
pub const fn encrypt(node_id: u16, key_slot: u8) -> u32 {
    ((node_id as u32) << NODE_SHIFT) | (((key_slot as u32) << KEY_SHIFT) & KEY_MASK) | MAGIC_ENCRYPT
}

/// Mark for ESP received from `node_id`.
#[must_use]
pub const fn decrypt(node_id: u16) -> u32 {
    ((node_id as u32) << NODE_SHIFT) | MAGIC_DECRYPT
}

/// What a mark says, as far as nodeseal is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Encrypt for `node_id` with `key_slot`.
    Encrypt {
        /// Peer node id.
        node_id: u16,
        /// Key slot.
        key_slot: u8,
    },
    /// Decrypt; arrived from `node_id`.
    Decrypt {
        /// Peer node id.
        node_id: u16,
    },
    /// Not a nodeseal mark.
    Other,
}

/// Decodes a mark written by the datapath.
#[must_use]
pub const fn decode(mark: u32) -> Decoded {
    // The casts take bit fields that the masks and shifts bound to 16 and 4 bits.
    let node_id = ((mark & NODE_MASK) >> NODE_SHIFT) as u16;
    let key_slot = ((mark & KEY_MASK) >> KEY_SHIFT) as u8;
    match mark & MAGIC_MASK {
        MAGIC_ENCRYPT => Decoded::Encrypt { node_id, key_slot },
        MAGIC_DECRYPT => Decoded::Decrypt { node_id },
        _ => Decoded::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypt_matches_cilium_layout() {
        // node 0x0102, key 3 → 0x0102_3E00
        assert_eq!(encrypt(0x0102, 3), 0x0102_3E00);
        assert_eq!(
            decode(0x0102_3E00),
            Decoded::Encrypt {
                node_id: 0x0102,
                key_slot: 3
            }
        );
        assert_eq!(
            encrypt(7, 0x1F) & KEY_MASK,
            0xF000,
            "slot is truncated to 4 bits"
        );
    }

    #[test]
    fn decrypt_round_trips() {
        assert_eq!(decrypt(9), 0x0009_0D00);
        assert_eq!(decode(decrypt(9)), Decoded::Decrypt { node_id: 9 });
        assert_eq!(decode(0x0000_0042), Decoded::Other);
    }
}
