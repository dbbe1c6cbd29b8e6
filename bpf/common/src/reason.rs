//! Drop and trace reason codes. One code per explicit verdict of the datapath.
//!
//! The numeric values index the per-CPU `DROP_COUNTERS` array and appear in events, so they are
//! part of the pinned-map ABI: never renumber, only append.

/// Why a packet was dropped.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Destination is a remote pod/node but its peer has no ready SA and strict egress is on.
    NoSa = 1,
    /// ESP arrived from an address that is not a known node.
    UnknownNode = 2,
    /// Plaintext arrived on the uplink from a remote pod CIDR while strict ingress is on.
    Unencrypted = 3,
    /// Identity policy denied the packet (an explicit deny, or no allow while enforced).
    PolicyDenied = 4,
    /// IP header is invalid (bad version, header length, total length).
    Malformed = 5,
    /// The packet ends before a header the verdict needs.
    Truncated = 6,
    /// A non-first fragment (no L4 header, so no ports) met a policy that only allows specific
    /// ports.
    FragmentNoPorts = 7,
    /// More IPv6 extension headers than the parser walks (8).
    Ipv6ExtensionChain = 8,
    /// Traffic from an interface with no endpoint entry reached from-pod.
    UnknownEndpoint = 9,
    /// A pod sent a frame that is neither IPv4, IPv6 nor ARP (e.g. VLAN-tagged).
    UnsupportedL3 = 10,
    /// Plaintext arrived on the uplink with a source in this node's own pod CIDRs (encryption
    /// on). This node's pods never reach it from the wire, so the source is forged.
    LocalSourceSpoof = 11,
    /// Plaintext arrived on the uplink from a pod CIDR of a revoked node (encryption on).
    RevokedSource = 12,
    /// Plaintext arrived on the uplink from a remote node IP with node encryption and strict
    /// ingress on, not on a port that stays in clear.
    UnencryptedNode = 13,
}

impl DropReason {
    /// Every reason, in code order.
    pub const ALL: [Self; 13] = [
        Self::NoSa,
        Self::UnknownNode,
        Self::Unencrypted,
        Self::PolicyDenied,
        Self::Malformed,
        Self::Truncated,
        Self::FragmentNoPorts,
        Self::Ipv6ExtensionChain,
        Self::UnknownEndpoint,
        Self::UnsupportedL3,
        Self::LocalSourceSpoof,
        Self::RevokedSource,
        Self::UnencryptedNode,
    ];

    /// Size of the counters array (codes are `1..COUNT`; index 0 is unused).
    pub const COUNT: u32 = 16;

    /// The numeric code.
    #[must_use]
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Parses a numeric code.
    #[must_use]
    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::NoSa,
            2 => Self::UnknownNode,
            3 => Self::Unencrypted,
            4 => Self::PolicyDenied,
            5 => Self::Malformed,
            6 => Self::Truncated,
            7 => Self::FragmentNoPorts,
            8 => Self::Ipv6ExtensionChain,
            9 => Self::UnknownEndpoint,
            10 => Self::UnsupportedL3,
            11 => Self::LocalSourceSpoof,
            12 => Self::RevokedSource,
            13 => Self::UnencryptedNode,
            _ => return None,
        })
    }

    /// Stable snake-case name (metrics label value, CLI output).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoSa => "no_sa",
            Self::UnknownNode => "unknown_node",
            Self::Unencrypted => "unencrypted",
            Self::PolicyDenied => "policy_denied",
            Self::Malformed => "malformed",
            Self::Truncated => "truncated",
            Self::FragmentNoPorts => "fragment_no_ports",
            Self::Ipv6ExtensionChain => "ipv6_extension_chain",
            Self::UnknownEndpoint => "unknown_endpoint",
            Self::UnsupportedL3 => "unsupported_l3",
            Self::LocalSourceSpoof => "local_source_spoof",
            Self::RevokedSource => "revoked_source",
            Self::UnencryptedNode => "unencrypted_node",
        }
    }
}

/// What happened to a packet that passed, for trace events (only emitted with
/// [`crate::maps::Config::FLAG_TRACE`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceReason {
    /// Marked for encryption to a peer.
    Encrypt = 1,
    /// ESP from a known node, marked for decryption.
    Decrypt = 2,
    /// Sent in clear to a remote destination (no ready SA, strict off).
    Plaintext = 3,
    /// Passed (local destination, or nothing to do).
    Pass = 4,
}

impl TraceReason {
    /// Parses a numeric code.
    #[must_use]
    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Encrypt,
            2 => Self::Decrypt,
            3 => Self::Plaintext,
            4 => Self::Pass,
            _ => return None,
        })
    }

    /// Stable snake-case name (CLI output, flow records).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::Plaintext => "plaintext",
            Self::Pass => "pass",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_fit_the_counter_array() {
        for reason in DropReason::ALL {
            assert_eq!(DropReason::from_code(reason.code()), Some(reason));
            assert!(u32::from(reason.code()) < DropReason::COUNT);
        }
        assert_eq!(DropReason::from_code(0), None);
        assert_eq!(DropReason::from_code(200), None);
    }
}
