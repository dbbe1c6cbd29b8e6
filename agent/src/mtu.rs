//! How large a pod's packets may be: the uplink's MTU less what the tunnel adds.
//!
//! A pod whose interface MTU is larger than this relies on path-MTU discovery for every flow to
//! a remote pod (the node answers an oversized packet that may not be fragmented with ICMP
//! "fragmentation needed" and drops it), and on fragmentation of the encrypted packet for
//! datagrams that may be. Pods at this MTU need neither: their largest packet crosses the
//! underlay whole. nodeseal is not the CNI, so it reports the figure (status, metrics) for the
//! CNI's MTU setting rather than changing pod interfaces.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// ESP header (SPI, sequence number) and the 8-byte IV of `rfc4106(gcm(aes))`.
const ESP_HEADER_AND_IV: u32 = 8 + 8;
/// The AES-GCM ICV.
const ESP_ICV: u32 = 16;
/// ESP's trailer: pad length and next header; the padding before it aligns to 4 bytes.
const ESP_TRAILER: u32 = 2;
/// WireGuard's worst case per packet: outer IPv6 (40) + UDP (8) + WireGuard header and tag
/// (32), so the link's MTU is safe whichever family the underlay uses.
const WIREGUARD_OVERHEAD: u32 = 80;

/// The tunnel a pod's packet to a remote pod goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// ESP in tunnel mode with AES-GCM, outer header of the underlay's family.
    Esp,
    /// The WireGuard link.
    Wireguard,
}

/// The MTU figures of the node, as `nodeseal status` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMtu {
    /// The uplink's MTU.
    pub uplink: u32,
    /// The largest packet a pod can send to a remote pod without fragmentation or path-MTU
    /// discovery: the MTU the CNI should give pod interfaces.
    pub pod: u32,
}

impl PodMtu {
    /// The figures for `tunnel` over an uplink of MTU `uplink` whose node IP is `node_ip`.
    #[must_use]
    pub fn new(tunnel: Tunnel, uplink: u32, node_ip: IpAddr) -> Self {
        let pod = match tunnel {
            Tunnel::Esp => esp_inner_mtu(uplink, node_ip),
            Tunnel::Wireguard => uplink.saturating_sub(WIREGUARD_OVERHEAD),
        };
        Self { uplink, pod }
    }
}

/// The largest inner packet that ESP tunnel mode with AES-GCM fits into `uplink` bytes, as the
/// kernel computes it for the "fragmentation needed" it sends (`xfrm_state_mtu`): the space
/// after the outer IP header, ESP header, IV and ICV, rounded down to ESP's 4-byte alignment,
/// less the trailer.
fn esp_inner_mtu(uplink: u32, node_ip: IpAddr) -> u32 {
    let outer = match node_ip {
        IpAddr::V4(_) => 20,
        IpAddr::V6(_) => 40,
    };
    let space = uplink.saturating_sub(outer + ESP_HEADER_AND_IV + ESP_ICV);
    (space & !3).saturating_sub(ESP_TRAILER)
}

/// The MTU of the interface `name` in the calling thread's network namespace, read over
/// rtnetlink (sysfs shows the namespace it was mounted in, which a namespaced agent does not
/// share); `None`, with the reason logged, when it cannot be read.
pub async fn interface_mtu(name: &str) -> Option<u32> {
    let cannot = |error: &dyn std::fmt::Display| {
        tracing::warn!(interface = name, %error, "cannot read the interface's MTU");
    };
    let link = nodeseal_wireguard::LinkName::new(name)
        .map_err(|e| cannot(&e))
        .ok()?;
    let handle = nodeseal_wireguard::Handle::new()
        .map_err(|e| cannot(&e))
        .ok()?;
    match handle.links().get(link).execute().await {
        Ok(Some(link)) => Some(link.mtu),
        Ok(None) => {
            cannot(&"no such interface");
            None
        }
        Err(e) => {
            cannot(&e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);

    /// The ESP packet an inner packet of `len` bytes becomes: outer header, ESP header, IV, the
    /// payload with its trailer padded to 4 bytes, ICV.
    fn esp_packet(len: u32, outer: u32) -> u32 {
        outer + ESP_HEADER_AND_IV + (len + ESP_TRAILER).div_ceil(4) * 4 + ESP_ICV
    }

    #[test]
    fn the_esp_pod_mtu_is_the_largest_inner_packet_that_fits() {
        for (ip, outer) in [(V4, 20), (V6, 40)] {
            for uplink in [1280, 1400, 1450, 1500, 1501, 1502, 1503, 9000] {
                let pod = PodMtu::new(Tunnel::Esp, uplink, ip).pod;
                // Every size up to it fits, whatever its padding; one more does not.
                for len in pod.saturating_sub(4)..=pod {
                    assert!(esp_packet(len, outer) <= uplink, "{uplink} {len}");
                }
                assert!(esp_packet(pod + 1, outer) > uplink, "{uplink} {pod}");
            }
        }
        // What the kernel answers for a 1500-byte uplink (checked by the netns scenarios).
        assert_eq!(PodMtu::new(Tunnel::Esp, 1500, V4).pod, 1446);
        assert_eq!(PodMtu::new(Tunnel::Esp, 1500, V6).pod, 1426);
    }

    #[test]
    fn the_wireguard_pod_mtu_is_the_links() {
        assert_eq!(PodMtu::new(Tunnel::Wireguard, 1500, V4).pod, 1420);
        assert_eq!(PodMtu::new(Tunnel::Wireguard, 60, V4).pod, 0);
    }
}
