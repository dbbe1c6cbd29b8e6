//! Traffic selectors and marks: the parts shared by states and policies.
//!
//! `Mark` is opaque here on purpose: the bit layout of `skb->mark` belongs to `bpf/common`, and only
//! the agent converts between the two.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// An XFRM mark and mask (`struct xfrm_mark`). A packet matches when `skb->mark & mask == value`.
///
/// `ip xfrm ... mark VALUE mask MASK`.
#[doc(alias = "XFRMA_MARK")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Mark {
    /// Value the masked packet mark must equal.
    pub value: u32,
    /// Bits of the packet mark that are compared.
    pub mask: u32,
}

impl Mark {
    /// No mark: matches every packet (`value = 0, mask = 0`).
    pub const NONE: Self = Self { value: 0, mask: 0 };

    /// A mark with the given value and mask.
    #[must_use]
    pub const fn new(value: u32, mask: u32) -> Self {
        Self { value, mask }
    }

    /// Whether this is the empty mark the kernel omits from dumps.
    #[must_use]
    pub const fn is_none(&self) -> bool {
        self.value == 0 && self.mask == 0
    }

    /// Whether every bit of `bits.mask` is compared by this mark and equals `bits.value`.
    #[must_use]
    pub const fn contains_bits(&self, bits: Mark) -> bool {
        self.mask & bits.mask == bits.mask && self.value & bits.mask == bits.value & bits.mask
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

/// Errors building a [`Selector`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// Source and destination are of different address families.
    #[error("selector mixes address families: source {src}, destination {dst}")]
    MixedFamilies {
        /// The source prefix.
        src: IpNet,
        /// The destination prefix.
        dst: IpNet,
    },
    /// Ports (or ICMP type and code) were given without a protocol that has them.
    #[error(
        "selector ports need protocol tcp (6), udp (17), sctp (132), icmp (1) or ipv6-icmp (58), got {proto:?}"
    )]
    PortsWithoutProtocol {
        /// The protocol that was given.
        proto: Option<u8>,
    },
}

/// The traffic an XFRM state or policy applies to (`struct xfrm_selector`).
///
/// Prefixes are stored truncated to their network address, which is what the kernel compares.
/// `ip xfrm policy ... src SRC dst DST [proto P [sport S] [dport D]]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Selector {
    src: IpNet,
    dst: IpNet,
    proto: Option<u8>,
    sport: Option<u16>,
    dport: Option<u16>,
}

impl Selector {
    /// A selector for all traffic from `src` to `dst`.
    ///
    /// # Errors
    /// [`SelectorError::MixedFamilies`] if one is IPv4 and the other IPv6.
    pub fn new(src: IpNet, dst: IpNet) -> Result<Self, SelectorError> {
        if src.addr().is_ipv4() != dst.addr().is_ipv4() {
            return Err(SelectorError::MixedFamilies { src, dst });
        }
        Ok(Self {
            src: src.trunc(),
            dst: dst.trunc(),
            proto: None,
            sport: None,
            dport: None,
        })
    }

    /// Restricts the selector to an IP protocol and, optionally, exact ports. For ICMP and
    /// ICMPv6 the kernel compares the message type in place of the source port and the code in
    /// place of the destination port (`ip xfrm ... proto ipv6-icmp type 135`).
    ///
    /// # Errors
    /// [`SelectorError::PortsWithoutProtocol`] if ports are given for a protocol with neither
    /// ports nor ICMP types.
    pub fn with_protocol(
        mut self,
        proto: u8,
        sport: Option<u16>,
        dport: Option<u16>,
    ) -> Result<Self, SelectorError> {
        if (sport.is_some() || dport.is_some()) && !matches!(proto, 1 | 6 | 17 | 58 | 132) {
            return Err(SelectorError::PortsWithoutProtocol { proto: Some(proto) });
        }
        self.proto = Some(proto);
        self.sport = sport;
        self.dport = dport;
        Ok(self)
    }

    /// The source prefix.
    #[must_use]
    pub const fn src(&self) -> IpNet {
        self.src
    }

    /// The destination prefix.
    #[must_use]
    pub const fn dst(&self) -> IpNet {
        self.dst
    }

    /// The IP protocol, `None` for any.
    #[must_use]
    pub const fn proto(&self) -> Option<u8> {
        self.proto
    }

    /// The exact source port, `None` for any.
    #[must_use]
    pub const fn sport(&self) -> Option<u16> {
        self.sport
    }

    /// The exact destination port, `None` for any.
    #[must_use]
    pub const fn dport(&self) -> Option<u16> {
        self.dport
    }

    /// Whether this selects IPv4 traffic.
    #[must_use]
    pub const fn is_ipv4(&self) -> bool {
        matches!(self.src, IpNet::V4(_))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)?;
        if let Some(p) = self.proto {
            write!(f, " proto {p}")?;
        }
        let (sport, dport) = match self.proto {
            Some(1 | 58) => ("type", "code"),
            _ => ("sport", "dport"),
        };
        if let Some(p) = self.sport {
            write!(f, " {sport} {p}")?;
        }
        if let Some(p) = self.dport {
            write!(f, " {dport} {p}")?;
        }
        Ok(())
    }
}

/// Whether two addresses are of the same family.
pub(crate) const fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_truncates_and_rejects_mixed_families() {
        let s = Selector::new(
            "10.1.2.3/24".parse().unwrap(),
            "10.9.9.9/16".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(s.src().to_string(), "10.1.2.0/24");
        assert_eq!(s.dst().to_string(), "10.9.0.0/16");
        let err = Selector::new("10.0.0.0/8".parse().unwrap(), "fd00::/64".parse().unwrap());
        assert!(matches!(err, Err(SelectorError::MixedFamilies { .. })));
        let err = s.with_protocol(50, Some(5), None);
        assert_eq!(
            err,
            Err(SelectorError::PortsWithoutProtocol { proto: Some(50) })
        );
        let neighbour_solicitation =
            Selector::new("::/0".parse().unwrap(), "fd00::2/128".parse().unwrap())
                .unwrap()
                .with_protocol(58, Some(135), None)
                .unwrap();
        assert_eq!(
            neighbour_solicitation.to_string(),
            "::/0 -> fd00::2/128 proto 58 type 135"
        );
    }

    #[test]
    fn mark_contains_bits() {
        let m = Mark::new(0x0001_0e00, 0xffff_ff00);
        assert!(m.contains_bits(Mark::new(0x0e00, 0x0f00)));
        assert!(!m.contains_bits(Mark::new(0x0d00, 0x0f00)));
        assert!(!Mark::new(0x0e00, 0x0e00).contains_bits(Mark::new(0x0e00, 0x0f00)));
        assert_eq!(m.to_string(), "0x10e00/0xffffff00");
    }
}
