//! The policy database's hash thresholds (`ip xfrm policy set hthresh4 … hthresh6 …`): which
//! policies the kernel keeps in its exact hash, and which in its "inexact" structures.
//!
//! The kernel hashes a policy by its selector's prefixes only if both are at least as long as the
//! thresholds of its family: `local` bits for the side that is this host (the source of an OUT
//! policy, the destination of an IN or FWD policy) and `remote` bits for the other side. The
//! defaults are 32/32 and 128/128, so only host-to-host selectors are hashed and a policy for a
//! pod CIDR is inexact. Before Linux 6.12 every inexact insertion walks the whole per-direction
//! list of inexact policies twice (to find its place by priority, then to renumber every entry),
//! so n policies cost O(n²): measured on 6.1 (qemu TCG), 15,000 pod-CIDR policies went in at
//! 402/s against 2,100/s for 3,000, and at 5,460/s once hashed. 6.12 dropped that list and its
//! per-prefix trees insert in about logarithmic time, so there the thresholds change little.
//!
//! Thresholds are per network namespace and change *where* a policy is stored: a lookup always
//! consults both the hash and the inexact structures and lets the lower priority win, so the
//! policy a packet matches could change only where two overlapping policies of equal priority
//! tie, one of them moving between the tables. Setting them makes the kernel rehash every policy
//! of the namespace once (asynchronously), foreign ones included.

use thiserror::Error;

use crate::policy::{Direction, PolicySpec};

/// The thresholds of one address family: prefix lengths from which a selector side is hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FamilyThresholds {
    /// Bits of this host's side (`lbits`).
    pub local: u8,
    /// Bits of the other side (`rbits`).
    pub remote: u8,
}

/// Both families' thresholds, as one `XFRM_MSG_NEWSPDINFO` sets them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyHashThresholds {
    v4: FamilyThresholds,
    v6: FamilyThresholds,
}

/// Thresholds the kernel would refuse (`EINVAL`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ThresholdError {
    /// A threshold longer than the family's addresses.
    #[error("ipv{family} hash threshold {bits} exceeds {max} bits")]
    TooLong {
        /// 4 or 6.
        family: u8,
        /// The threshold given.
        bits: u8,
        /// The address length.
        max: u8,
    },
}

impl PolicyHashThresholds {
    /// What a fresh network namespace starts with: only /32 and /128 selectors are hashed.
    pub const KERNEL_DEFAULT: Self = Self {
        v4: FamilyThresholds {
            local: 32,
            remote: 32,
        },
        v6: FamilyThresholds {
            local: 128,
            remote: 128,
        },
    };

    /// Thresholds for IPv4 and IPv6.
    ///
    /// # Errors
    /// [`ThresholdError::TooLong`] for more than 32 (IPv4) or 128 (IPv6) bits.
    pub const fn new(v4: FamilyThresholds, v6: FamilyThresholds) -> Result<Self, ThresholdError> {
        // `const` so that a layout can name its thresholds as a constant, checked at compile time.
        let checks = [
            (4, 32, v4.local),
            (4, 32, v4.remote),
            (6, 128, v6.local),
            (6, 128, v6.remote),
        ];
        let mut i = 0;
        while i < checks.len() {
            let (family, max, bits) = checks[i];
            if bits > max {
                return Err(ThresholdError::TooLong { family, bits, max });
            }
            i += 1;
        }
        Ok(Self { v4, v6 })
    }

    /// The IPv4 thresholds.
    #[must_use]
    pub const fn v4(&self) -> FamilyThresholds {
        self.v4
    }

    /// The IPv6 thresholds.
    #[must_use]
    pub const fn v6(&self) -> FamilyThresholds {
        self.v6
    }

    /// Whether the kernel keeps `policy` in its exact hash under these thresholds (the rule of
    /// the kernel's `__sel_hash`).
    #[must_use]
    pub fn hashes(&self, policy: &PolicySpec) -> bool {
        let sel = policy.selector;
        let t = if sel.is_ipv4() { self.v4 } else { self.v6 };
        let (src_bits, dst_bits) = match policy.dir {
            Direction::Out => (t.local, t.remote),
            Direction::In | Direction::Fwd => (t.remote, t.local),
        };
        sel.src().prefix_len() >= src_bits && sel.dst().prefix_len() >= dst_bits
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::policy::Template;
    use crate::selector::Selector;
    use crate::state::ReqId;

    fn policy(src: &str, dst: &str, dir: Direction) -> PolicySpec {
        let sel = Selector::new(src.parse().unwrap(), dst.parse().unwrap()).unwrap();
        let (a, b): (IpAddr, IpAddr) = if sel.is_ipv4() {
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap())
        } else {
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
        };
        PolicySpec::new(
            sel,
            dir,
            Template::new(a, b, ReqId::new(1).unwrap()).unwrap(),
        )
    }

    fn thresholds(v4: (u8, u8), v6: (u8, u8)) -> PolicyHashThresholds {
        let f = |(local, remote)| FamilyThresholds { local, remote };
        PolicyHashThresholds::new(f(v4), f(v6)).unwrap()
    }

    #[test]
    fn defaults_hash_only_host_selectors() {
        let d = PolicyHashThresholds::KERNEL_DEFAULT;
        assert!(d.hashes(&policy("10.0.0.1/32", "10.0.0.2/32", Direction::Out)));
        assert!(!d.hashes(&policy("10.0.0.1/32", "10.244.1.0/24", Direction::Out)));
        assert!(!d.hashes(&policy("fd00::1/128", "fd00:1::/64", Direction::In)));
    }

    #[test]
    fn local_and_remote_sides_swap_with_direction() {
        // Remote prefixes of /24 and any local side.
        let t = thresholds((0, 24), (0, 64));
        assert!(t.hashes(&policy("0.0.0.0/0", "10.244.1.0/24", Direction::Out)));
        assert!(t.hashes(&policy("10.244.1.0/24", "0.0.0.0/0", Direction::In)));
        assert!(t.hashes(&policy("10.244.1.0/24", "0.0.0.0/0", Direction::Fwd)));
        assert!(t.hashes(&policy("::/0", "fd00:1::/64", Direction::Out)));
        // A remote prefix shorter than the threshold stays inexact, in either direction.
        assert!(!t.hashes(&policy("0.0.0.0/0", "10.244.0.0/16", Direction::Out)));
        assert!(!t.hashes(&policy("10.244.0.0/16", "0.0.0.0/0", Direction::In)));
        // With local bits required, an any-local side is not hashed: the sides are not symmetric.
        let strict_local = thresholds((24, 24), (64, 64));
        assert!(!strict_local.hashes(&policy("0.0.0.0/0", "10.244.1.0/24", Direction::Out)));
        assert!(strict_local.hashes(&policy("10.244.0.0/24", "10.244.1.0/24", Direction::Out)));
    }

    #[test]
    fn thresholds_longer_than_addresses_are_refused() {
        let ok = FamilyThresholds {
            local: 0,
            remote: 24,
        };
        let long = FamilyThresholds {
            local: 33,
            remote: 0,
        };
        assert_eq!(
            PolicyHashThresholds::new(long, ok),
            Err(ThresholdError::TooLong {
                family: 4,
                bits: 33,
                max: 32
            })
        );
        let v6 = FamilyThresholds {
            local: 0,
            remote: 129,
        };
        assert_eq!(
            PolicyHashThresholds::new(ok, v6),
            Err(ThresholdError::TooLong {
                family: 6,
                bits: 129,
                max: 128
            })
        );
        assert!(PolicyHashThresholds::new(ok, ok).is_ok());
    }
}
