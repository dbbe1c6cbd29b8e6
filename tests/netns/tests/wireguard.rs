//! Kernel scenarios for `nodeseal-wireguard`, each in a fresh network namespace.
//!
//! They need a kernel with WireGuard ([`Feature::WireGuard`]); the development host lacks it, so
//! they skip with a reason there and run in the VM runner's Debian kernels. With
//! `NODESEAL_REQUIRE_PRIVILEGED=1` a skip is a failure.
//! `wg` (wireguard-tools) and `ip` are the independent readers: after the crate programmed a
//! device, `wg show DEV dump` must list exactly the keys, preshared keys, endpoints, allowed IPs
//! and port that were set, and `ip -d link` the link kind, MTU and state.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers and fixtures panic with context, like the tests themselves"
)]

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ipnet::IpNet;
use nodeseal_netns::{Feature, Netns, ping, require};
use nodeseal_wireguard::test_helpers::{peer, preshared_key};
use nodeseal_wireguard::{
    Device, DeviceConfig, Error, Handle, LinkName, LinkSpec, PeerConfig, PresharedKey, PrivateKey,
    PublicKey,
};

/// Runs a future to completion on this thread (the netns package has no async runtime; the
/// handle's futures only wait on a oneshot from its worker thread).
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// A handle whose netlink sockets live in `ns`.
fn handle(ns: &Netns) -> Handle {
    let file = File::open(ns.path()).expect("opening the netns file");
    Handle::in_namespace(&file).expect("wireguard handle in namespace")
}

fn link() -> LinkName {
    LinkName::default()
}

/// A private key from `wg genkey` (with its base64 text), and its public key from `wg pubkey`:
/// the crate's X25519 derivation is checked against the reference tool.
fn key_from_wg(ns: &Netns) -> (PrivateKey, String) {
    let text = ns.exec("wg", &["genkey"]).expect("wg genkey");
    let mut bytes = [0u8; 32];
    let n = BASE64
        .decode_slice(text.trim(), &mut bytes)
        .expect("wg genkey prints base64");
    assert_eq!(n, 32);
    let key = PrivateKey::from_bytes(&mut bytes);
    let mut cmd = ns.command("wg");
    cmd.arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("wg pubkey");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().expect("wg pubkey output");
    let public: PublicKey = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("wg pubkey prints a key");
    assert_eq!(
        key.public_key(),
        public,
        "X25519 derivation matches wg pubkey"
    );
    (key, text.trim().to_owned())
}

/// One peer line of `wg show DEV dump`.
#[derive(Debug, PartialEq, Eq)]
struct WgPeer {
    preshared_key: String,
    endpoint: String,
    allowed_ips: Vec<String>,
    keepalive: String,
}

/// `wg show DEV dump`: (private key, public key, port, fwmark) and the peers by public key.
fn wg_dump(ns: &Netns) -> ([String; 4], BTreeMap<String, WgPeer>) {
    let text = ns
        .exec("wg", &["show", link().as_str(), "dump"])
        .expect("wg show dump");
    let mut lines = text.lines();
    let head: Vec<String> = lines
        .next()
        .expect("device line")
        .split('\t')
        .map(str::to_owned)
        .collect();
    let head: [String; 4] = head.try_into().expect("4 device fields");
    let mut peers = BTreeMap::new();
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 8, "peer line {line:?}");
        let mut allowed_ips: Vec<String> = if f[3] == "(none)" {
            vec![]
        } else {
            f[3].split(',').map(str::to_owned).collect()
        };
        allowed_ips.sort();
        peers.insert(
            f[0].to_owned(),
            WgPeer {
                preshared_key: f[1].to_owned(),
                endpoint: f[2].to_owned(),
                allowed_ips,
                keepalive: f[7].to_owned(),
            },
        );
    }
    (head, peers)
}

/// What `wg show dump` must print for `p`, whose preshared key is `psk_b64` (or `(none)`).
fn expected(p: &PeerConfig, psk_b64: &str) -> WgPeer {
    let mut allowed_ips: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
    allowed_ips.sort();
    WgPeer {
        preshared_key: psk_b64.to_owned(),
        endpoint: p
            .endpoint
            .map_or_else(|| "(none)".to_owned(), |e| e.to_string()),
        allowed_ips,
        keepalive: match p.persistent_keepalive_secs {
            0 => "off".to_owned(),
            n => n.to_string(),
        },
    }
}

/// The fixture's preshared key of peer `i`, in base64 (the bytes `test_helpers` builds it from).
fn fixture_psk_b64(i: u32) -> String {
    let mut bytes = [0xa5u8; 32];
    bytes[28..].copy_from_slice(&i.to_be_bytes());
    assert_eq!(
        PresharedKey::from_bytes(&mut bytes.clone()),
        preshared_key(i),
        "the test rebuilds the fixture's key"
    );
    BASE64.encode(bytes)
}

/// Compares the crate's own dump with `wg show dump`.
fn assert_dump_agrees_with_wg(dev: &Device, ns: &Netns) {
    let (head, peers) = wg_dump(ns);
    assert_eq!(
        Some(head[1].as_str()),
        dev.public_key.map(|k| k.to_string()).as_deref()
    );
    assert_eq!(head[2], dev.listen_port.to_string());
    assert_eq!(dev.peers.len(), peers.len());
    for p in &dev.peers {
        let w = peers
            .get(&p.public_key.to_string())
            .expect("peer in wg dump");
        let mut ips: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
        ips.sort();
        assert_eq!(ips, w.allowed_ips, "{}", p.public_key);
        assert_eq!(p.preshared_key.is_some(), w.preshared_key != "(none)");
        assert_eq!(
            p.endpoint
                .map_or_else(|| "(none)".to_owned(), |e| e.to_string()),
            w.endpoint
        );
    }
}

#[test]
fn wireguard_link_and_device_cross_checked_with_wg() {
    if !require(
        "wireguard_link_and_device_cross_checked_with_wg",
        &[Feature::WireGuard],
    ) {
        return;
    }
    let ns = Netns::new("wg-dev").expect("netns");
    let h = handle(&ns);
    let spec = LinkSpec::default()
        .mtu(1380)
        .address("10.77.0.1/24".parse().unwrap());
    let made = block_on(h.links().ensure(spec.clone()).execute()).expect("creating the link");
    let shown = ns
        .ip(&["-d", "link", "show", "dev", link().as_str()])
        .expect("ip link show");
    assert!(shown.contains("mtu 1380"), "{shown}");
    assert!(shown.contains("wireguard"), "{shown}");
    assert!(shown.contains(",UP"), "{shown}");
    let addrs = ns
        .ip(&["-o", "address", "show", "dev", link().as_str()])
        .expect("ip address show");
    assert!(addrs.contains("inet 10.77.0.1/24"), "{addrs}");
    let again = block_on(h.links().ensure(spec).execute()).expect("ensuring again");
    assert_eq!(again.index, made.index, "the existing link is reused");

    // A link of another kind under the name we ask for is refused, and left alone.
    ns.ip(&["link", "add", "dummy7", "type", "dummy"])
        .expect("ip link add dummy");
    let dummy = LinkName::new("dummy7").unwrap();
    let e = block_on(h.links().ensure(LinkSpec::new(dummy.clone())).execute())
        .expect_err("a dummy link is not ours");
    assert!(
        matches!(&e, Error::WrongKind { name, kind } if *name == dummy && kind.as_deref() == Some("dummy")),
        "{e:?}"
    );
    assert!(e.to_string().contains("dummy7"), "{e}");
    ns.ip(&["link", "show", "dev", "dummy7"])
        .expect("the dummy link is still there");

    let (key, key_b64) = key_from_wg(&ns);
    let p1 = peer(1).persistent_keepalive(25);
    let p2 = peer(2).endpoint("[fd00::2]:4000".parse().unwrap());
    let config = DeviceConfig::new()
        .private_key(key.clone())
        .listen_port(51820)
        .fwmark(0x0e00)
        .peer(p1.clone())
        .peer(p2.clone());
    block_on(h.device(link()).configure(config).execute()).expect("configuring the device");

    let (head, peers) = wg_dump(&ns);
    assert_eq!(head[0], key_b64, "the private key wg genkey made");
    assert_eq!(head[1], key.public_key().to_string());
    assert_eq!(head[2], "51820");
    assert_eq!(head[3], "0xe00");
    let dev = block_on(h.device(link()).get().execute()).expect("reading the device");
    assert_eq!(
        dev.private_key.as_ref(),
        Some(&key),
        "private key read back"
    );
    assert_eq!(peers.len(), 2, "{peers:#?}");
    assert_eq!(
        peers[&p1.public_key.to_string()],
        expected(&p1, &fixture_psk_b64(1))
    );
    assert_eq!(
        peers[&p2.public_key.to_string()],
        expected(&p2, &fixture_psk_b64(2))
    );
    assert_dump_agrees_with_wg(&dev, &ns);

    // Replace p1's allowed IPs (and clear its PSK and keepalive): the old ones are gone.
    let p1b = PeerConfig::new(p1.public_key).allowed_ips([
        "10.200.0.0/16".parse().unwrap(),
        "fd10::/64".parse().unwrap(),
    ]);
    block_on(h.device(link()).set_peer(p1b.clone()).execute()).expect("replacing allowed IPs");
    let (_, peers) = wg_dump(&ns);
    let mut want = expected(&p1b, "(none)");
    want.endpoint = p1.endpoint.unwrap().to_string();
    assert_eq!(peers[&p1.public_key.to_string()], want);

    // Remove p2.
    block_on(h.device(link()).remove_peer(p2.public_key).execute()).expect("removing a peer");
    let (_, peers) = wg_dump(&ns);
    assert_eq!(peers.len(), 1);
    assert!(peers.contains_key(&p1.public_key.to_string()));
    let dev = block_on(h.device(link()).get().execute()).expect("reading the device");
    assert!(dev.peers[0].matches(&p1b.clone().endpoint(p1.endpoint.unwrap())));
    assert_dump_agrees_with_wg(&dev, &ns);

    assert!(block_on(h.links().delete(link()).execute()).expect("deleting"));
    assert!(ns.ip(&["link", "show", "dev", link().as_str()]).is_err());
}

#[test]
fn wireguard_thousand_peers_round_trip() {
    if !require("wireguard_thousand_peers_round_trip", &[Feature::WireGuard]) {
        return;
    }
    let ns = Netns::new("wg-many").expect("netns");
    let h = handle(&ns);
    block_on(h.links().ensure(LinkSpec::default()).execute()).expect("creating the link");
    let mut peers: Vec<PeerConfig> = (1..=1000).map(peer).collect();
    // One peer with 2,000 allowed IPs (56 KB of them): more than one SET_DEVICE message and one
    // dump message hold, so both continue the peer in a following message.
    let many = (0..2000u32).map(|i| {
        let [_, _, hi, lo] = i.to_be_bytes();
        IpNet::from(std::net::IpAddr::from([100, 64, hi, lo]))
    });
    peers.push(peer(1001).allowed_ips(many));
    let config = peers.iter().cloned().fold(
        DeviceConfig::new()
            .private_key(PrivateKey::generate().unwrap())
            .listen_port(51821)
            .replace_peers(),
        DeviceConfig::peer,
    );
    block_on(h.device(link()).configure(config).execute()).expect("configuring 1001 peers");
    let (_, listed) = wg_dump(&ns);
    assert_eq!(listed.len(), 1001);
    for (i, p) in (1..).zip(&peers) {
        assert_eq!(
            listed[&p.public_key.to_string()],
            expected(p, &fixture_psk_b64(i)),
            "peer {i}"
        );
    }
    let dev = block_on(h.device(link()).get().execute()).expect("dumping 1001 peers");
    assert_eq!(dev.peers.len(), 1001);
    for (got, want) in dev.peers.iter().zip(&peers) {
        assert!(got.matches(want), "{got:?} vs {want:?}");
    }
    assert_dump_agrees_with_wg(&dev, &ns);
    // Replacing the set with its first half removes the rest.
    let config = peers[..500]
        .iter()
        .cloned()
        .fold(DeviceConfig::new().replace_peers(), DeviceConfig::peer);
    block_on(h.device(link()).configure(config).execute()).expect("replacing the peer set");
    assert_eq!(wg_dump(&ns).1.len(), 500);
}

#[test]
fn wireguard_ping_through_the_tunnel_between_two_namespaces() {
    if !require(
        "wireguard_ping_through_the_tunnel_between_two_namespaces",
        &[Feature::Netns, Feature::WireGuard],
    ) {
        return;
    }
    let a = Netns::new("wg-a").expect("netns a");
    let b = Netns::new("wg-b").expect("netns b");
    a.ip(&[
        "link",
        "add",
        "va",
        "type",
        "veth",
        "peer",
        "name",
        "vb",
        "netns",
        b.name(),
    ])
    .expect("veth pair");
    a.ip(&["address", "add", "192.168.50.1/24", "dev", "va"])
        .unwrap();
    b.ip(&["address", "add", "192.168.50.2/24", "dev", "vb"])
        .unwrap();
    a.ip(&["link", "set", "va", "up"]).unwrap();
    b.ip(&["link", "set", "vb", "up"]).unwrap();

    let (ha, hb) = (handle(&a), handle(&b));
    let (ka, kb) = (
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
    );
    let psk = PresharedKey::generate().unwrap();
    let side = |h: &Handle,
                own: &PrivateKey,
                addr: &str,
                other: &PrivateKey,
                endpoint: &str,
                peer_ip: &str| {
        block_on(
            h.links()
                .ensure(LinkSpec::default().address(addr.parse().unwrap()))
                .execute(),
        )
        .expect("creating the link");
        let peer = PeerConfig::new(other.public_key())
            .preshared_key(psk.clone())
            .endpoint(endpoint.parse::<SocketAddr>().unwrap())
            .allowed_ips([peer_ip.parse::<IpNet>().unwrap()]);
        let config = DeviceConfig::new()
            .private_key(own.clone())
            .listen_port(51820)
            .peer(peer);
        block_on(h.device(link()).configure(config).execute()).expect("configuring");
    };
    side(
        &ha,
        &ka,
        "10.77.0.1/24",
        &kb,
        "192.168.50.2:51820",
        "10.77.0.2/32",
    );
    side(
        &hb,
        &kb,
        "10.77.0.2/24",
        &ka,
        "192.168.50.1:51820",
        "10.77.0.1/32",
    );

    // The first packet waits for the handshake; then every one must come back.
    let _ = ping(&a, Ipv4Addr::new(10, 77, 0, 2), 1);
    let r = ping(&a, Ipv4Addr::new(10, 77, 0, 2), 3).expect("ping");
    assert!(r.all_answered(), "{r:?}");

    let dev = block_on(ha.device(link()).get().execute()).expect("reading a");
    let p = &dev.peers[0];
    assert!(p.last_handshake.is_some(), "{p:?}");
    assert!(p.rx_bytes > 0 && p.tx_bytes > 0, "{p:?}");
    assert_eq!(p.preshared_key.as_ref(), Some(&psk));
    let shown = a
        .exec("wg", &["show", link().as_str(), "latest-handshakes"])
        .expect("wg show latest-handshakes");
    let secs: u64 = shown
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a handshake time");
    assert!(secs > 0, "wg reports a handshake: {shown}");
}
