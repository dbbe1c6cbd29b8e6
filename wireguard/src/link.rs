//! The WireGuard network interface: its name, the shape nodeseal wants it in ([`LinkSpec`]) and
//! what the kernel reports about it ([`Link`]).
//!
//! A link is identified by name. nodeseal owns exactly one, `nodeseal0` unless configured
//! otherwise; an existing link of that name is reused only if it is a WireGuard link, so a
//! misconfigured name can never take over somebody else's interface.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

/// The link name nodeseal uses unless configured otherwise.
pub const DEFAULT_LINK_NAME: &str = "nodeseal0";
/// The MTU of a WireGuard link over a 1500-byte underlay: 1500 less the worst-case IPv6 + UDP +
/// WireGuard overhead (80 bytes), as `wg-quick` picks.
pub const DEFAULT_MTU: u32 = 1420;
/// The kernel's `IFNAMSIZ` less the terminating NUL.
const MAX_NAME_LEN: usize = 15;

/// Why a string is not a usable interface name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkNameError {
    /// Empty or longer than 15 bytes.
    #[error("interface name {name:?} must be 1 to {MAX_NAME_LEN} bytes")]
    Length {
        /// The name given.
        name: String,
    },
    /// Contains `/`, `:`, whitespace or a control character, or is `.` / `..`.
    #[error("interface name {name:?} contains characters the kernel refuses")]
    Characters {
        /// The name given.
        name: String,
    },
}

/// A network interface name the kernel accepts (what `dev_valid_name` checks).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkName(String);

impl LinkName {
    /// Checks `name` against the kernel's rules.
    ///
    /// # Errors
    /// [`LinkNameError`] naming the problem.
    pub fn new(name: &str) -> Result<Self, LinkNameError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(LinkNameError::Length { name: name.into() });
        }
        let bad = |c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control();
        if name == "." || name == ".." || name.chars().any(bad) {
            return Err(LinkNameError::Characters { name: name.into() });
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for LinkName {
    /// [`DEFAULT_LINK_NAME`].
    fn default() -> Self {
        Self(DEFAULT_LINK_NAME.to_owned())
    }
}

impl fmt::Display for LinkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LinkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl FromStr for LinkName {
    type Err = LinkNameError;

    fn from_str(s: &str) -> Result<Self, LinkNameError> {
        Self::new(s)
    }
}

/// The WireGuard link as nodeseal wants it: `ip link add NAME type wireguard`,
/// `ip link set NAME mtu MTU up`, `ip address replace ADDR dev NAME` for each address.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkSpec {
    /// The interface name.
    pub name: LinkName,
    /// The MTU.
    pub mtu: u32,
    /// Addresses to put on the link (others already there are left alone).
    pub addresses: Vec<IpNet>,
}

impl LinkSpec {
    /// A link named `name` with [`DEFAULT_MTU`] and no addresses.
    #[must_use]
    pub const fn new(name: LinkName) -> Self {
        Self {
            name,
            mtu: DEFAULT_MTU,
            addresses: Vec::new(),
        }
    }

    /// Sets the MTU.
    #[must_use]
    pub const fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }

    /// Adds an address to put on the link.
    #[must_use]
    pub fn address(mut self, address: IpNet) -> Self {
        self.addresses.push(address);
        self
    }
}

impl Default for LinkSpec {
    fn default() -> Self {
        Self::new(LinkName::default())
    }
}

/// A link as the kernel reports it (`ip -d link show NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Link {
    /// The interface index.
    pub index: u32,
    /// The interface name.
    pub name: String,
    /// `IFLA_INFO_KIND` (`wireguard`, `veth`, ...); `None` for links without one (physical
    /// devices, loopback).
    pub kind: Option<String>,
    /// The MTU.
    pub mtu: u32,
    /// Whether it is administratively up (`IFF_UP`).
    pub up: bool,
}

impl Link {
    /// Whether this is a WireGuard link.
    #[must_use]
    pub fn is_wireguard(&self) -> bool {
        self.kind.as_deref() == Some("wireguard")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernels_rules() {
        assert_eq!(LinkName::default().as_str(), "nodeseal0");
        assert_eq!(LinkName::new("wg-0.a_b").unwrap().to_string(), "wg-0.a_b");
        assert!(LinkName::new("123456789012345").is_ok());
        for bad in ["", "1234567890123456"] {
            assert!(matches!(
                LinkName::new(bad),
                Err(LinkNameError::Length { .. })
            ));
        }
        for bad in [".", "..", "a/b", "a:1", "a b", "a\nb"] {
            assert!(
                matches!(LinkName::new(bad), Err(LinkNameError::Characters { .. })),
                "{bad:?}"
            );
        }
    }
}
