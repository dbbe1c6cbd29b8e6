//! Key agreements per second: full mutual TLS 1.3 handshake (ECDSA P-256 SVIDs, X25519,
//! AES-GCM) + Hello exchange + key derivation over loopback TCP, both sides on one thread, so
//! the figure is "key agreements per second per core with both ends' work on that core".
//! Then the same primitives are timed alone to show what dominates.
//!
//! Run: `cargo bench -p nodeseal-keymgr --bench handshake` (env `KEYMGR_BENCH_N`, default 2000).

#![expect(clippy::unwrap_used, reason = "benchmark set-up panics on failure")]
#![expect(clippy::print_stdout, reason = "the benchmark reports on stdout")]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use nodeseal_keymgr::test_helpers::TestPki;
use nodeseal_keymgr::{
    Epoch, ExpectedPeer, HandshakeConfig, Hello, Mode, NodeName, PeerRole, Spi, accept, initiate,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (USER_HZ = 100 on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn per_op(n: u32, f: impl FnMut()) -> Duration {
    let mut f = f;
    for _ in 0..n / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed() / n
}

fn main() {
    let n: u32 = std::env::var("KEYMGR_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let pki = TestPki::new();
    let store = pki.trust_store();
    let id_a = pki.identity("node-a");
    let id_b = pki.identity("node-b");
    let a = HandshakeConfig::new(store.clone(), &id_a).unwrap();
    let b = HandshakeConfig::new(store.clone(), &id_b).unwrap();
    let node_b: NodeName = "node-b".parse().unwrap();
    let hello = |cfg: &HandshakeConfig, spi: u32| {
        Hello::new(
            cfg.local_node().clone(),
            Epoch(1),
            Spi::new(spi).unwrap(),
            Mode::Ipsec,
        )
        .with_node_ips(vec!["127.0.0.1".parse().unwrap()])
        .with_pod_cidrs(vec!["10.0.1.0/24".parse().unwrap()])
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (elapsed, cpu) = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let one = || async {
            let client = async {
                let stream = TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                initiate(&a, stream, &node_b, hello(&a, 0x1000))
                    .await
                    .unwrap()
            };
            let server = async {
                let (stream, _) = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                let incoming = accept(&b, stream, ExpectedPeer::AnyNode).await.unwrap();
                incoming.respond(hello(&b, 0x2000)).await.unwrap()
            };
            let (x, y) = tokio::join!(client, server);
            assert_eq!(
                x.keys.outbound.aes256_gcm.rfc4106_key(),
                y.keys.inbound.aes256_gcm.rfc4106_key()
            );
        };
        for _ in 0..n / 10 {
            one().await;
        }
        let cpu0 = cpu_seconds();
        let start = Instant::now();
        for _ in 0..n {
            one().await;
        }
        (start.elapsed(), cpu_seconds() - cpu0)
    });
    let per = elapsed / n;
    let rate = f64::from(n) / elapsed.as_secs_f64();
    println!("keymgr handshake benchmark ({n} key agreements, loopback TCP, one thread)");
    println!(
        "  {rate:.0} key agreements/s per core (both sides on the core), {:.0} µs each; \
         process CPU {:.2} s for {:.2} s wall",
        per.as_secs_f64() * 1e6,
        cpu,
        elapsed.as_secs_f64()
    );
    let cpu_rate = f64::from(n) / cpu.max(f64::EPSILON);
    println!(
        "  {cpu_rate:.0} key agreements per CPU-second (wall rate is lower when the machine is \
         shared: the gap is time the thread was not running)"
    );
    println!(
        "  per node (one side each): about {:.0} handshakes/s per core (CPU-bound)",
        cpu_rate * 2.0
    );

    // Primitive costs, same process.
    let provider = nodeseal_keymgr::provider::crypto_provider();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id_a.key().pkcs8_der()));
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&key_der).unwrap();
    let signer = signing
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .unwrap();
    let msg = [7u8; 130];
    let t_sign = per_op(n, || {
        black_box(signer.sign(black_box(&msg)).unwrap());
    });
    let sig = signer.sign(&msg).unwrap();
    let leaf = x509_parser::parse_x509_certificate(&id_a.chain()[0])
        .unwrap()
        .1;
    let spki = leaf.public_key().subject_public_key.data.to_vec();
    let alg = webpki::ring::ECDSA_P256_SHA256;
    let t_verify = per_op(n, || {
        alg.verify_signature(black_box(&spki), &msg, &sig).unwrap();
    });
    let kx = provider.kx_groups[0];
    let peer_pub = kx.start().unwrap().pub_key().to_vec();
    let t_ecdhe = per_op(n, || {
        let active = kx.start().unwrap();
        black_box(active.complete(&peer_pub).unwrap());
    });
    let now = SystemTime::now();
    let t_certs = per_op(n, || {
        black_box(
            store
                .verify(id_a.chain(), now, PeerRole::Client, &ExpectedPeer::AnyNode)
                .unwrap(),
        );
    });

    // Break down CPU time, not wall time: wall time also counts waiting for the CPU.
    let total = cpu / f64::from(n);
    let parts = [
        (
            "ECDSA P-256 sign (CertificateVerify) x2",
            2.0 * t_sign.as_secs_f64(),
        ),
        (
            "ECDSA P-256 verify (CertificateVerify) x2",
            2.0 * t_verify.as_secs_f64(),
        ),
        (
            "SVID checks: parse + SPIFFE rules + chain (1 ECDSA verify) x2",
            2.0 * t_certs.as_secs_f64(),
        ),
        ("X25519 keygen + agreement x2", 2.0 * t_ecdhe.as_secs_f64()),
    ];
    println!("  breakdown per key agreement ({:.0} µs):", total * 1e6);
    let mut sum = 0.0;
    for (name, t) in parts {
        sum += t;
        println!(
            "    {:>7.1} µs  {:>5.1}%  {name}",
            t * 1e6,
            100.0 * t / total
        );
    }
    let rest = (total - sum).max(0.0);
    println!(
        "    {:>7.1} µs  {:>5.1}%  rest: TLS record AEAD, transcript hashes, HKDF/exporter, \
         Hello JSON, per-connection config, TCP syscalls, runtime",
        rest * 1e6,
        100.0 * rest / total
    );
    println!(
        "  primitives: sign {:.1} µs, verify {:.1} µs, X25519 {:.1} µs, SVID verify {:.1} µs",
        t_sign.as_secs_f64() * 1e6,
        t_verify.as_secs_f64() * 1e6,
        t_ecdhe.as_secs_f64() * 1e6,
        t_certs.as_secs_f64() * 1e6
    );
    let target = 500.0;
    println!(
        "  target >= {target:.0}/s per core: {}",
        if rate.max(cpu_rate) >= target {
            "met"
        } else {
            "NOT met"
        }
    );
}
