//! What a node SVID binds beyond the node's name: the node IPs and pod CIDRs its issuer admitted
//! for it ([`NodeClaims`]).
//!
//! A node's record in the cluster store is written by the node (or anyone with store write
//! access), so on its own it proves nothing about which addresses the node owns. The issuer
//! (keymgr) checks the claims once, when it signs: in standalone mode that no other node holds
//! them, in Kubernetes mode that the Node object (whose `spec.podCIDRs` the IPAM controller sets)
//! lists them. It writes them into the certificate, and every peer refuses a node whose record
//! claims more than its certificate admits. So authenticating as node X never lets X take over
//! an address or pod CIDR that keymgr did not give X.
//!
//! Encoding, readable with any X.509 tool: the node IPs are `iPAddress` subject alternative
//! names (the SPIFFE X.509-SVID rules allow SAN types besides the one URI); the pod CIDRs are the
//! subject's organizational unit, `pod-cidrs=` followed by the CIDRs separated by spaces. (A
//! private extension would need an OID under an arc we hold; the subject is the place X.509
//! gives to attributes the CA certifies about the subject.)

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use x509_parser::prelude::{GeneralName, X509Certificate};

/// How many node IPs and pod CIDRs a certificate may bind (as many as a store record holds).
pub const MAX_CLAIMS: usize = 16;
const POD_CIDRS_PREFIX: &str = "pod-cidrs=";

/// Why claims could not be read from a certificate, or do not cover what a node asks for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimsError {
    /// The certificate's claims are malformed.
    #[error("certificate claims are malformed: {0}")]
    Malformed(String),
    /// The certificate binds no claims at all (issued by a CA that does not admit them).
    #[error("its certificate binds no node IPs or pod CIDRs")]
    Unbound,
    /// An address the node uses is not among its admitted node IPs.
    #[error("node IP {ip} is not admitted for it (its certificate admits {admitted})")]
    NodeIp {
        /// The address asked for.
        ip: IpAddr,
        /// What the certificate admits.
        admitted: String,
    },
    /// A pod CIDR the node claims is not within its admitted ones.
    #[error("pod CIDR {cidr} is not admitted for it (its certificate admits {admitted})")]
    PodCidr {
        /// The CIDR asked for.
        cidr: IpNet,
        /// What the certificate admits.
        admitted: String,
    },
}

/// The node IPs and pod CIDRs an issuer admitted for a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NodeClaims {
    /// Underlay addresses the node may use.
    pub node_ips: Vec<IpAddr>,
    /// Pod CIDRs the node owns (canonical: no host bits).
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeClaims {
    /// Claims of `node_ips` and `pod_cidrs`, deduplicated and canonical.
    ///
    /// # Errors
    /// [`ClaimsError::Malformed`] with more than [`MAX_CLAIMS`] of either, or none of both.
    pub fn new(node_ips: &[IpAddr], pod_cidrs: &[IpNet]) -> Result<Self, ClaimsError> {
        let mut claims = Self::default();
        for ip in node_ips {
            if !claims.node_ips.contains(ip) {
                claims.node_ips.push(*ip);
            }
        }
        for cidr in pod_cidrs.iter().map(IpNet::trunc) {
            if !claims.pod_cidrs.contains(&cidr) {
                claims.pod_cidrs.push(cidr);
            }
        }
        claims.check()?;
        Ok(claims)
    }

    fn check(&self) -> Result<(), ClaimsError> {
        if self.node_ips.is_empty() {
            return Err(ClaimsError::Malformed("no node IP".into()));
        }
        if self.node_ips.len() > MAX_CLAIMS || self.pod_cidrs.len() > MAX_CLAIMS {
            return Err(ClaimsError::Malformed(format!(
                "more than {MAX_CLAIMS} node IPs or pod CIDRs"
            )));
        }
        Ok(())
    }

    /// Whether `ip` and every CIDR of `pod_cidrs` are admitted (a CIDR within an admitted one
    /// is).
    ///
    /// # Errors
    /// [`ClaimsError::NodeIp`] or [`ClaimsError::PodCidr`] naming the first one that is not.
    pub fn cover(&self, ip: IpAddr, pod_cidrs: &[IpNet]) -> Result<(), ClaimsError> {
        if !self.node_ips.contains(&ip) {
            return Err(ClaimsError::NodeIp {
                ip,
                admitted: self.to_string(),
            });
        }
        if let Some(cidr) = pod_cidrs
            .iter()
            .find(|c| !self.pod_cidrs.iter().any(|a| a.contains(*c)))
        {
            return Err(ClaimsError::PodCidr {
                cidr: *cidr,
                admitted: self.to_string(),
            });
        }
        Ok(())
    }

    /// The first address or CIDR these claims share with `other`, described.
    #[must_use]
    pub fn conflict_with(&self, other: &Self) -> Option<String> {
        if let Some(ip) = self.node_ips.iter().find(|ip| other.node_ips.contains(ip)) {
            return Some(format!("node IP {ip}"));
        }
        self.pod_cidrs.iter().find_map(|c| {
            other
                .pod_cidrs
                .iter()
                .find(|o| o.contains(c) || c.contains(*o))
                .map(|o| format!("pod CIDR {c} (overlaps {o})"))
        })
    }

    /// Writes the claims into certificate parameters about to be signed.
    pub(crate) fn apply(&self, params: &mut rcgen::CertificateParams) {
        params.subject_alt_names.extend(
            self.node_ips
                .iter()
                .map(|ip| rcgen::SanType::IpAddress(*ip)),
        );
        if !self.pod_cidrs.is_empty() {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationalUnitName, self.pod_cidrs_text());
        }
    }

    fn pod_cidrs_text(&self) -> String {
        let cidrs: Vec<String> = self.pod_cidrs.iter().map(ToString::to_string).collect();
        format!("{POD_CIDRS_PREFIX}{}", cidrs.join(" "))
    }

    /// Reads the claims of a parsed certificate: `None` when it binds none.
    ///
    /// # Errors
    /// [`ClaimsError::Malformed`] when they cannot be read.
    pub(crate) fn of(cert: &X509Certificate<'_>) -> Result<Option<Self>, ClaimsError> {
        let malformed = |e: &dyn fmt::Display| ClaimsError::Malformed(e.to_string());
        let mut node_ips = Vec::new();
        if let Some(san) = cert.subject_alternative_name().map_err(|e| malformed(&e))? {
            for name in &san.value.general_names {
                if let GeneralName::IPAddress(bytes) = name {
                    node_ips.push(ip_of(bytes).ok_or_else(|| {
                        ClaimsError::Malformed(format!("IP SAN of {} bytes", bytes.len()))
                    })?);
                }
            }
        }
        let mut pod_cidrs = Vec::new();
        for ou in cert.subject().iter_organizational_unit() {
            let text = ou.as_str().map_err(|e| malformed(&e))?;
            let Some(list) = text.strip_prefix(POD_CIDRS_PREFIX) else {
                continue;
            };
            for item in list.split_whitespace() {
                let cidr: IpNet = item
                    .parse()
                    .map_err(|_| ClaimsError::Malformed(format!("pod CIDR {item:?}")))?;
                if cidr.trunc() != cidr {
                    return Err(ClaimsError::Malformed(format!(
                        "pod CIDR {cidr} has host bits"
                    )));
                }
                pod_cidrs.push(cidr);
            }
        }
        if node_ips.is_empty() && pod_cidrs.is_empty() {
            return Ok(None);
        }
        let claims = Self {
            node_ips,
            pod_cidrs,
        };
        claims.check()?;
        Ok(Some(claims))
    }
}

impl fmt::Display for NodeClaims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ips: Vec<String> = self.node_ips.iter().map(ToString::to_string).collect();
        let cidrs: Vec<String> = self.pod_cidrs.iter().map(ToString::to_string).collect();
        write!(
            f,
            "node IPs [{}], pod CIDRs [{}]",
            ips.join(", "),
            cidrs.join(", ")
        )
    }
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(ips: &[&str], cidrs: &[&str]) -> NodeClaims {
        let ips: Vec<IpAddr> = ips.iter().map(|s| s.parse().unwrap()).collect();
        let cidrs: Vec<IpNet> = cidrs.iter().map(|s| s.parse().unwrap()).collect();
        NodeClaims::new(&ips, &cidrs).unwrap()
    }

    #[test]
    fn cover_admits_subsets_and_names_what_is_not_admitted() {
        let c = claims(
            &["10.0.0.1", "fd00::1"],
            &["10.244.1.0/24", "fd00:244:1::/64"],
        );
        c.cover(
            "10.0.0.1".parse().unwrap(),
            &["10.244.1.0/24".parse().unwrap()],
        )
        .unwrap();
        c.cover(
            "fd00::1".parse().unwrap(),
            &["10.244.1.128/25".parse().unwrap()],
        )
        .unwrap();
        let err = c.cover("10.0.0.2".parse().unwrap(), &[]).unwrap_err();
        assert!(matches!(err, ClaimsError::NodeIp { .. }), "{err}");
        let err = c
            .cover(
                "10.0.0.1".parse().unwrap(),
                &["10.244.0.0/16".parse().unwrap()],
            )
            .unwrap_err();
        assert!(err.to_string().contains("10.244.0.0/16"), "{err}");
    }

    #[test]
    fn conflicts_are_shared_ips_or_overlapping_cidrs() {
        let a = claims(&["10.0.0.1"], &["10.244.1.0/24"]);
        assert_eq!(
            a.conflict_with(&claims(&["10.0.0.2"], &["10.244.2.0/24"])),
            None
        );
        assert!(
            a.conflict_with(&claims(&["10.0.0.1"], &["10.244.2.0/24"]))
                .unwrap()
                .contains("10.0.0.1")
        );
        assert!(
            a.conflict_with(&claims(&["10.0.0.2"], &["10.244.0.0/16"]))
                .unwrap()
                .contains("overlaps")
        );
    }

    #[test]
    fn new_refuses_no_ip_and_too_many() {
        assert!(NodeClaims::new(&[], &[]).is_err());
        let many: Vec<IpAddr> = (1..=17u8).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        assert!(NodeClaims::new(&many, &[]).is_err());
    }
}
