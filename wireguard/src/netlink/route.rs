//! rtnetlink messages for the link, its addresses, routes and policy rules (`ip link`,
//! `ip address`, `ip route`, `ip rule`).
//!
//! Layouts follow `include/uapi/linux/rtnetlink.h`, `if_link.h` and `fib_rules.h`:
//! `struct ifinfomsg` is 16 bytes, `struct ifaddrmsg` 8, `struct rtmsg` and
//! `struct fib_rule_hdr` 12.

use std::net::IpAddr;

use ipnet::IpNet;

use super::codec::{
    self, DecodeError, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use crate::link::Link;
use crate::routing::{Family, PortSide, Rule};

pub(crate) const RTM_NEWLINK: u16 = 16;
pub(crate) const RTM_DELLINK: u16 = 17;
pub(crate) const RTM_GETLINK: u16 = 18;
pub(crate) const RTM_NEWADDR: u16 = 20;
pub(crate) const RTM_DELADDR: u16 = 21;

pub(crate) const RTM_NEWROUTE: u16 = 24;
pub(crate) const RTM_DELROUTE: u16 = 25;
pub(crate) const RTM_NEWRULE: u16 = 32;
pub(crate) const RTM_DELRULE: u16 = 33;

pub(crate) const RTA_DST: u16 = 1;
pub(crate) const RTA_OIF: u16 = 4;
pub(crate) const RTA_TABLE: u16 = 15;
pub(crate) const FRA_PRIORITY: u16 = 6;
pub(crate) const FRA_FWMARK: u16 = 10;
pub(crate) const FRA_TABLE: u16 = 15;
pub(crate) const FRA_FWMASK: u16 = 16;
pub(crate) const FRA_IP_PROTO: u16 = 22;
pub(crate) const FRA_SPORT_RANGE: u16 = 23;
pub(crate) const FRA_DPORT_RANGE: u16 = 24;
/// `RT_TABLE_UNSPEC` in the one-byte table field: the table is in `RTA_TABLE` / `FRA_TABLE`,
/// which holds ids above 255.
const RT_TABLE_UNSPEC: u8 = 0;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_LINK: u8 = 253;
/// What `ip route del` puts in the scope: match any.
const RT_SCOPE_NOWHERE: u8 = 255;
const RTN_UNICAST: u8 = 1;
const FR_ACT_TO_TBL: u8 = 1;
/// The length of `struct rtmsg`, where a reader (the fake kernel, the tests) finds the attributes.
#[cfg(any(test, feature = "testing"))]
pub(crate) const RTMSG_LEN: usize = 12;

pub(crate) const IFLA_IFNAME: u16 = 3;
pub(crate) const IFLA_MTU: u16 = 4;
pub(crate) const IFLA_LINKINFO: u16 = 18;
pub(crate) const IFLA_INFO_KIND: u16 = 1;
pub(crate) const IFA_ADDRESS: u16 = 1;
pub(crate) const IFA_LOCAL: u16 = 2;
pub(crate) const IFF_UP: u32 = 1;

pub(crate) const AF_UNSPEC: u8 = 0;
pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;

pub(crate) const IFINFOMSG_LEN: usize = 16;
#[cfg(any(test, feature = "testing"))]
pub(crate) const IFADDRMSG_LEN: usize = 8;

/// The kind of link nodeseal creates.
pub(crate) const KIND: &str = "wireguard";

fn ifinfomsg(buf: &mut Vec<u8>, index: u32, flags: u32, change: u32) {
    buf.push(AF_UNSPEC);
    buf.push(0);
    buf.extend_from_slice(&0u16.to_ne_bytes()); // device type: any
    buf.extend_from_slice(&index.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&change.to_ne_bytes());
}

/// `RTM_GETLINK` for one link by name (`ip link show NAME`).
pub(crate) fn encode_get_link(buf: &mut Vec<u8>, seq: u32, name: &str) {
    let m = codec::begin(buf, RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    ifinfomsg(buf, 0, 0, 0);
    codec::attr_str(buf, IFLA_IFNAME, name);
    codec::finish(buf, m);
}

/// `RTM_NEWLINK` creating a WireGuard link; fails with `EEXIST` if the name is taken
/// (`ip link add NAME mtu MTU type wireguard`).
pub(crate) fn encode_create_link(buf: &mut Vec<u8>, seq: u32, name: &str, mtu: u32) {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let m = codec::begin(buf, RTM_NEWLINK, flags, seq);
    ifinfomsg(buf, 0, 0, 0);
    codec::attr_str(buf, IFLA_IFNAME, name);
    codec::attr_u32(buf, IFLA_MTU, mtu);
    let info = codec::nest_begin(buf, IFLA_LINKINFO);
    codec::attr_str(buf, IFLA_INFO_KIND, KIND);
    // A few dozen bytes: always fits an attribute.
    let _ = codec::nest_end(buf, info);
    codec::finish(buf, m);
}

/// `RTM_NEWLINK` on an existing link: sets its MTU and brings it up
/// (`ip link set dev NAME mtu MTU up`).
pub(crate) fn encode_set_link(buf: &mut Vec<u8>, seq: u32, index: u32, mtu: u32) {
    let m = codec::begin(buf, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    ifinfomsg(buf, index, IFF_UP, IFF_UP);
    codec::attr_u32(buf, IFLA_MTU, mtu);
    codec::finish(buf, m);
}

/// `RTM_DELLINK` (`ip link del dev NAME`).
pub(crate) fn encode_delete_link(buf: &mut Vec<u8>, seq: u32, index: u32) {
    let m = codec::begin(buf, RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    ifinfomsg(buf, index, 0, 0);
    codec::finish(buf, m);
}

/// `RTM_NEWADDR` with replace semantics, so adding an address twice succeeds
/// (`ip address replace ADDR dev NAME`), or `RTM_DELADDR` (`ip address del ADDR dev NAME`).
pub(crate) fn encode_address(buf: &mut Vec<u8>, seq: u32, add: bool, index: u32, net: IpNet) {
    let (ty, flags) = if add {
        (RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE)
    } else {
        (RTM_DELADDR, 0)
    };
    let m = codec::begin(buf, ty, NLM_F_REQUEST | NLM_F_ACK | flags, seq);
    let (family, octets): (u16, Vec<u8>) = match net.addr() {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    };
    buf.push(u8::try_from(family).unwrap_or_default());
    buf.push(net.prefix_len());
    buf.push(0); // flags
    buf.push(0); // scope: universe
    buf.extend_from_slice(&index.to_ne_bytes());
    codec::attr(buf, IFA_LOCAL, &octets);
    codec::attr(buf, IFA_ADDRESS, &octets);
    codec::finish(buf, m);
}

fn family_octets(net: IpNet) -> (u8, Vec<u8>) {
    match net.addr() {
        IpAddr::V4(a) => (2, a.octets().to_vec()),
        IpAddr::V6(a) => (10, a.octets().to_vec()),
    }
}

/// `RTM_NEWROUTE` with replace semantics (`ip route replace NET dev INDEX table TABLE`) or
/// `RTM_DELROUTE` (`ip route del NET table TABLE`). The host bits of `net` are cleared, as the
/// kernel refuses a destination with them set.
pub(crate) fn encode_route(buf: &mut Vec<u8>, seq: u32, table: u32, net: IpNet, oif: Option<u32>) {
    let net = net.trunc();
    let (ty, flags, protocol, scope, kind) = match oif {
        Some(_) => (
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_REPLACE,
            RTPROT_STATIC,
            RT_SCOPE_LINK,
            RTN_UNICAST,
        ),
        None => (RTM_DELROUTE, 0, 0, RT_SCOPE_NOWHERE, 0),
    };
    let m = codec::begin(buf, ty, NLM_F_REQUEST | NLM_F_ACK | flags, seq);
    let (family, octets) = family_octets(net);
    buf.extend_from_slice(&[
        family,
        net.prefix_len(),
        0, // src_len
        0, // tos
        RT_TABLE_UNSPEC,
        protocol,
        scope,
        kind,
    ]);
    buf.extend_from_slice(&0u32.to_ne_bytes()); // flags
    codec::attr_u32(buf, RTA_TABLE, table);
    codec::attr(buf, RTA_DST, &octets);
    if let Some(oif) = oif {
        codec::attr_u32(buf, RTA_OIF, oif);
    }
    codec::finish(buf, m);
}

/// `RTM_NEWRULE` (`ip rule add priority P lookup T`; `EEXIST` if the same rule is there) or
/// `RTM_DELRULE`.
pub(crate) fn encode_rule(buf: &mut Vec<u8>, seq: u32, add: bool, rule: Rule) {
    let (ty, flags) = if add {
        (RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL)
    } else {
        (RTM_DELRULE, 0)
    };
    let m = codec::begin(buf, ty, NLM_F_REQUEST | NLM_F_ACK | flags, seq);
    let family = match rule.family {
        Family::V4 => 2,
        Family::V6 => 10,
    };
    buf.extend_from_slice(&[
        family,
        0, // dst_len
        0, // src_len
        0, // tos
        RT_TABLE_UNSPEC,
        0,
        0,
        FR_ACT_TO_TBL,
    ]);
    buf.extend_from_slice(&0u32.to_ne_bytes()); // flags
    codec::attr_u32(buf, FRA_PRIORITY, rule.priority);
    codec::attr_u32(buf, FRA_TABLE, rule.table);
    if let Some(mark) = rule.fwmark {
        codec::attr_u32(buf, FRA_FWMARK, mark.value);
        codec::attr_u32(buf, FRA_FWMASK, mark.mask);
    }
    if let Some(port) = rule.port {
        codec::attr(buf, FRA_IP_PROTO, &[port.protocol]);
        let side = match port.side {
            PortSide::Source => FRA_SPORT_RANGE,
            PortSide::Destination => FRA_DPORT_RANGE,
        };
        // struct fib_rule_port_range: start and end, host order.
        let mut range = [0u8; 4];
        range[..2].copy_from_slice(&port.port.to_ne_bytes());
        range[2..].copy_from_slice(&port.port.to_ne_bytes());
        codec::attr(buf, side, &range);
    }
    codec::finish(buf, m);
}

/// An `RTM_NEWLINK` reply.
pub(crate) fn decode_link(payload: &[u8]) -> Result<Link, DecodeError> {
    let (hdr, rest) = codec::split_header("ifinfomsg", payload, IFINFOMSG_LEN)?;
    let index = codec::ne_u32(&hdr[4..8]);
    let flags = codec::ne_u32(&hdr[8..12]);
    let mut name = None;
    let mut mtu = 0;
    let mut kind = None;
    for a in codec::attrs(rest) {
        let a = a?;
        match a.ty {
            IFLA_IFNAME => name = Some(a.str("IFLA_IFNAME")?.to_owned()),
            IFLA_MTU => mtu = a.u32("IFLA_MTU")?,
            IFLA_LINKINFO => {
                for i in a.nested() {
                    let i = i?;
                    if i.ty == IFLA_INFO_KIND {
                        kind = Some(i.str("IFLA_INFO_KIND")?.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Link {
        index,
        name: name.ok_or(DecodeError::Missing {
            what: "IFLA_IFNAME",
        })?,
        kind,
        mtu,
        up: flags & IFF_UP != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8]) -> codec::Message<'_> {
        let mut it = codec::messages(buf);
        let m = it.next().unwrap().unwrap();
        assert!(it.next().is_none());
        m
    }

    #[test]
    fn create_link_carries_name_mtu_and_kind() {
        let mut buf = Vec::new();
        encode_create_link(&mut buf, 5, "nodeseal0", 1420);
        let m = one(&buf);
        assert_eq!(m.ty, RTM_NEWLINK);
        assert_eq!(
            m.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        // The reply decoder reads the same attributes back.
        let link = decode_link(m.payload).unwrap();
        assert_eq!(link.name, "nodeseal0");
        assert_eq!(link.mtu, 1420);
        assert!(link.is_wireguard());
        assert!(!link.up);
    }

    #[test]
    fn set_link_raises_iff_up_in_flags_and_change() {
        let mut buf = Vec::new();
        encode_set_link(&mut buf, 1, 7, 1380);
        let m = one(&buf);
        assert_eq!(codec::ne_u32(&m.payload[4..8]), 7);
        assert_eq!(codec::ne_u32(&m.payload[8..12]), IFF_UP);
        assert_eq!(codec::ne_u32(&m.payload[12..16]), IFF_UP);
    }

    #[test]
    fn addresses_carry_family_prefix_and_index() {
        let mut buf = Vec::new();
        encode_address(&mut buf, 1, true, 9, "fd00::1/64".parse().unwrap());
        let m = one(&buf);
        assert_eq!(m.ty, RTM_NEWADDR);
        assert_eq!(m.flags & NLM_F_REPLACE, NLM_F_REPLACE);
        assert_eq!(m.payload[0], 10);
        assert_eq!(m.payload[1], 64);
        assert_eq!(codec::ne_u32(&m.payload[4..8]), 9);
        let attrs: Vec<_> = codec::attrs(&m.payload[IFADDRMSG_LEN..])
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0].payload.len(), 16);
        let mut buf = Vec::new();
        encode_address(&mut buf, 1, false, 9, "10.0.0.1/24".parse().unwrap());
        let m = one(&buf);
        assert_eq!((m.ty, m.payload[0], m.payload[1]), (RTM_DELADDR, 2, 24));
    }

    #[test]
    fn routes_carry_table_destination_and_link() {
        let mut buf = Vec::new();
        encode_route(
            &mut buf,
            3,
            20051,
            "10.244.2.7/24".parse().unwrap(),
            Some(6),
        );
        let m = one(&buf);
        assert_eq!(m.ty, RTM_NEWROUTE);
        assert_eq!(
            m.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(&m.payload[..8], &[2, 24, 0, 0, 0, 4, 253, 1]);
        let attrs: Vec<_> = codec::attrs(&m.payload[RTMSG_LEN..])
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(attrs.len(), 3);
        assert_eq!(
            (attrs[0].ty, attrs[0].u32("t").unwrap()),
            (RTA_TABLE, 20051)
        );
        assert_eq!(
            (attrs[1].ty, attrs[1].payload),
            (RTA_DST, &[10, 244, 2, 0][..])
        );
        assert_eq!((attrs[2].ty, attrs[2].u32("o").unwrap()), (RTA_OIF, 6));

        let mut buf = Vec::new();
        encode_route(&mut buf, 4, 20051, "fd00:1::/64".parse().unwrap(), None);
        let m = one(&buf);
        assert_eq!(m.ty, RTM_DELROUTE);
        assert_eq!(m.flags & NLM_F_CREATE, 0);
        assert_eq!((m.payload[0], m.payload[1], m.payload[6]), (10, 64, 255));
        let attrs: Vec<_> = codec::attrs(&m.payload[RTMSG_LEN..])
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(attrs.len(), 2, "no link on delete");
        assert_eq!(attrs[1].payload.len(), 16);
    }

    #[test]
    fn rules_carry_family_priority_table_and_the_lookup_action() {
        let rule = Rule::all(Family::V6, 100, 20051);
        let mut buf = Vec::new();
        encode_rule(&mut buf, 1, true, rule);
        let m = one(&buf);
        assert_eq!(m.ty, RTM_NEWRULE);
        assert_eq!(
            m.flags & NLM_F_EXCL,
            NLM_F_EXCL,
            "an existing rule answers EEXIST"
        );
        assert_eq!(&m.payload[..8], &[10, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL]);
        let attrs: Vec<_> = codec::attrs(&m.payload[RTMSG_LEN..])
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            (attrs[0].ty, attrs[0].u32("p").unwrap()),
            (FRA_PRIORITY, 100)
        );
        assert_eq!(
            (attrs[1].ty, attrs[1].u32("t").unwrap()),
            (FRA_TABLE, 20051)
        );
        assert_eq!(attrs.len(), 2, "nothing else to match");
        let mut buf = Vec::new();
        encode_rule(&mut buf, 2, false, rule);
        assert_eq!(one(&buf).ty, RTM_DELRULE);
    }

    #[test]
    fn rules_match_a_mark_or_a_port() {
        let marked = Rule {
            fwmark: Some(crate::routing::FwMark {
                value: 0x0c00,
                mask: 0x0f00,
            }),
            ..Rule::all(Family::V4, 99, 254)
        };
        let port = Rule {
            port: Some(crate::routing::RulePort {
                protocol: 6,
                side: PortSide::Source,
                port: 4250,
            }),
            ..Rule::all(Family::V4, 99, 254)
        };
        for (rule, expected) in [
            (
                marked,
                vec![
                    (FRA_FWMARK, 0x0c00u32.to_ne_bytes().to_vec()),
                    (FRA_FWMASK, 0x0f00u32.to_ne_bytes().to_vec()),
                ],
            ),
            (
                port,
                vec![
                    (FRA_IP_PROTO, vec![6]),
                    (
                        FRA_SPORT_RANGE,
                        [4250u16.to_ne_bytes(), 4250u16.to_ne_bytes()].concat(),
                    ),
                ],
            ),
        ] {
            let mut buf = Vec::new();
            encode_rule(&mut buf, 1, true, rule);
            let m = one(&buf);
            let attrs: Vec<_> = codec::attrs(&m.payload[RTMSG_LEN..])
                .collect::<Result<_, _>>()
                .unwrap();
            let tail: Vec<(u16, Vec<u8>)> = attrs[2..]
                .iter()
                .map(|a| (a.ty, a.payload.to_vec()))
                .collect();
            assert_eq!(tail, expected, "{rule:?}");
        }
    }

    #[test]
    fn truncated_link_reply_is_an_error() {
        assert!(matches!(
            decode_link(&[0; 8]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut payload = vec![0u8; IFINFOMSG_LEN];
        // No name.
        codec::attr_u32(&mut payload, IFLA_MTU, 1500);
        assert_eq!(
            decode_link(&payload),
            Err(DecodeError::Missing {
                what: "IFLA_IFNAME"
            })
        );
    }
}
