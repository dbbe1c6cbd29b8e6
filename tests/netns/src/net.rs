//! Address helpers for topologies.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use anyhow::{Context, Result, bail};

/// An IP prefix such as `10.244.1.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// A prefix; host bits of `addr` are cleared.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            bail!("prefix length {len} is longer than {max}");
        }
        Ok(Self {
            addr: mask(addr, len),
            len,
        })
    }

    pub fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Self {
        Self {
            addr: mask(Ipv4Addr::new(a, b, c, d).into(), len.min(32)),
            len: len.min(32),
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .with_context(|| format!("{s:?} has no /length"))?;
        let addr: IpAddr = addr.parse().with_context(|| format!("address in {s:?}"))?;
        let len: u8 = len
            .parse()
            .with_context(|| format!("prefix length in {s:?}"))?;
        Self::new(addr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_and_round_trips() {
        let c: Cidr = "10.244.1.77/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.244.1.0/24");
        assert!(c.contains("10.244.1.200".parse().unwrap()));
        assert!(!c.contains("10.244.2.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }
}
