//! The crypto floor of one key agreement on one side (issue 16), timed in the bench's own
//! process on the machine of the run (in the VM: the same emulation as the agent): what the
//! agent cannot avoid per peer whatever it does around it. One side of a mutual TLS 1.3
//! handshake with ECDSA P-256 SVIDs and X25519 (ring, as the agent's rustls provider):
//! - one ECDSA P-256 signature (its CertificateVerify);
//! - one ECDSA P-256 verification (the peer's CertificateVerify);
//! - the peer's SVID checks: parse, SPIFFE rules, chain to the bundle (one ECDSA verification),
//!   through keymgr's own `TrustStore::verify`;
//! - one X25519 key generation and agreement.
//!
//! The agent's CPU per peer at convergence over this floor is the ratio (target ≤ 1.5);
//! it also carries the TLS records, transcripts, Hello JSON, XFRM programming and eBPF writes.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use nodeseal_keymgr::{ExpectedPeer, NodeIdentity, PeerRole, TrustStore};
use ring::agreement;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};

/// Repetitions of each primitive (after a tenth as warm-up); bounded, and short under TCG.
const ROUNDS: u32 = 200;

/// Per-primitive CPU costs, one side of one key agreement.
#[derive(Clone, Copy, Debug, Default)]
pub struct Floor {
    pub sign: Duration,
    pub verify: Duration,
    pub svid: Duration,
    pub x25519: Duration,
}

impl Floor {
    /// The sum: one side's unavoidable cost per key agreement.
    pub fn per_agreement(&self) -> Duration {
        self.sign + self.verify + self.svid + self.x25519
    }

    pub fn line(&self) -> String {
        format!(
            "crypto floor per key agreement, one side (this machine, this run): {:.0} µs = sign \
             {:.0} + verify {:.0} + SVID checks {:.0} + X25519 {:.0}",
            self.per_agreement().as_secs_f64() * 1e6,
            self.sign.as_secs_f64() * 1e6,
            self.verify.as_secs_f64() * 1e6,
            self.svid.as_secs_f64() * 1e6,
            self.x25519.as_secs_f64() * 1e6
        )
    }
}

/// Times the primitives with `peer`'s SVID checked against `trust`. Thread CPU time, not wall
/// time: the load generator's threads may be running beside it.
pub fn measure(trust: &TrustStore, peer: &NodeIdentity) -> Result<Floor> {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| anyhow::anyhow!("keygen"))?;
    let key =
        EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|_| anyhow::anyhow!("key"))?;
    // About the size of what TLS 1.3 signs in a CertificateVerify.
    let msg = [7u8; 130];
    let sign = per_op(|| {
        black_box(
            key.sign(&rng, black_box(&msg))
                .map_err(|_| anyhow::anyhow!("sign"))?,
        );
        Ok(())
    })?;
    let sig = key.sign(&rng, &msg).map_err(|_| anyhow::anyhow!("sign"))?;
    let public =
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key.public_key());
    let verify = per_op(|| {
        public
            .verify(black_box(&msg), sig.as_ref())
            .map_err(|_| anyhow::anyhow!("verify"))
    })?;
    let now = SystemTime::now();
    let svid = per_op(|| {
        black_box(trust.verify(peer.chain(), now, PeerRole::Client, &ExpectedPeer::AnyNode))
            .map(|_| ())
            .context("SVID checks")
    })?;
    let their = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
        .map_err(|_| anyhow::anyhow!("x25519"))?;
    let their_public = their
        .compute_public_key()
        .map_err(|_| anyhow::anyhow!("x25519"))?;
    let x25519 = per_op(|| {
        let ours = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .map_err(|_| anyhow::anyhow!("x25519"))?;
        black_box(
            ours.compute_public_key()
                .map_err(|_| anyhow::anyhow!("x25519"))?,
        );
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, their_public.as_ref());
        agreement::agree_ephemeral(ours, &peer, |secret| black_box(secret.len()))
            .map_err(|_| anyhow::anyhow!("x25519 agreement"))?;
        Ok(())
    })?;
    Ok(Floor {
        sign,
        verify,
        svid,
        x25519,
    })
}

/// CPU time per call of `f`, over [`ROUNDS`] calls after a warm-up.
fn per_op(mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    for _ in 0..ROUNDS / 10 {
        f()?;
    }
    let cpu0 = thread_cpu();
    let wall0 = Instant::now();
    for _ in 0..ROUNDS {
        f()?;
    }
    let cpu = thread_cpu().saturating_sub(cpu0);
    ensure!(
        wall0.elapsed() > Duration::ZERO,
        "the clock did not advance"
    );
    Ok(cpu / ROUNDS)
}

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, nanosecond resolution).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}
