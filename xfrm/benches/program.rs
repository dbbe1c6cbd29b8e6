//! Programming benchmark: nodeseal-xfrm against `ip -batch`.
//!
//! For each N (default 100, 1000, 5000; override with `NODESEAL_BENCH_PEERS=100,1000`): program
//! a full peer set (per peer 2 ESP states + OUT/IN/FWD policies, /24 selectors, marks) into an
//! empty namespace with [`reconcile`], then reconcile a rekey of 10% of the peers; program the
//! same objects with `ip -batch` into another fresh namespace. Prints objects/s and ratios.
//! `NODESEAL_BENCH_HTHRESH=24` first sets the IPv4 policy hash thresholds to 24/24 in both
//! namespaces, so /24 policies are hashed rather than kept in the kernel's inexact list.
//!
//! Needs root and a kernel with ESP (the VM: `cargo xtask vm --kernel 6.12 -- <bench binary>`).
//! Without them it prints why and exits 0, or 1 under `NODESEAL_REQUIRE_PRIVILEGED=1`.

use std::fmt::Write as _;
use std::fs::File;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nodeseal_xfrm::test_helpers::{mesh, ownership, peer_objects};
use nodeseal_xfrm::{Desired, Handle, KernelErrorKind, Mark, XfrmError, reconcile};

struct Netns {
    name: String,
    file: File,
}

impl Netns {
    fn new(tag: &str) -> Result<Self, String> {
        let name = format!("nsxb-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip").args(["netns", "add", &name]).status();
        if !ok.is_ok_and(|s| s.success()) {
            return Err(format!("`ip netns add {name}` failed"));
        }
        let file = File::open(format!("/run/netns/{name}")).map_err(|e| e.to_string())?;
        Ok(Self { name, file })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn mark(m: Mark) -> String {
    format!("mark {:#x} mask {:#x}", m.value, m.mask)
}

/// The same objects as `desired`, as an `ip -batch` script.
fn ip_batch(desired: &Desired) -> String {
    let mut out = String::new();
    for s in &desired.states {
        let key: String = s
            .aead
            .key_material()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let _ = write!(
            out,
            "xfrm state add src {} dst {} proto esp spi {:#x} reqid {} mode tunnel",
            s.src,
            s.dst,
            s.spi.get(),
            s.reqid
        );
        if s.replay_window > 0 {
            let _ = write!(out, " replay-window {}", s.replay_window);
        }
        if s.esn {
            out.push_str(" flag esn");
        }
        if !s.mark.is_none() {
            let _ = write!(out, " {}", mark(s.mark));
        }
        let _ = writeln!(
            out,
            " aead rfc4106(gcm(aes)) 0x{key} 128 sel src {} dst {}",
            s.selector.src(),
            s.selector.dst()
        );
    }
    for p in &desired.policies {
        let _ = write!(
            out,
            "xfrm policy add src {} dst {} dir {} priority {}",
            p.selector.src(),
            p.selector.dst(),
            p.dir,
            p.priority
        );
        if !p.mark.is_none() {
            let _ = write!(out, " {}", mark(p.mark));
        }
        for t in &p.templates {
            let _ = write!(
                out,
                " tmpl src {} dst {} proto esp reqid {} mode tunnel",
                t.src, t.dst, t.reqid
            );
        }
        out.push('\n');
    }
    out
}

/// An error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn run() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root".into());
    }
    let peers: Vec<u32> = std::env::var("NODESEAL_BENCH_PEERS")
        .unwrap_or_else(|_| "100,1000,5000".into())
        .split(',')
        .map(|p| {
            p.trim()
                .parse()
                .map_err(|_| format!("bad peer count {p:?}"))
        })
        .collect::<Result<_, _>>()?;
    let hthresh: Option<u8> = match std::env::var("NODESEAL_BENCH_HTHRESH") {
        Ok(v) => Some(
            v.parse()
                .map_err(|_| format!("bad NODESEAL_BENCH_HTHRESH {v:?}"))?,
        ),
        Err(_) => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "xfrm program bench: kernel {} hthresh {}",
        kernel.trim(),
        hthresh.map_or("default".into(), |h| format!("{h}/{h}"))
    );

    // ESP probe.
    {
        let ns = Netns::new("probe")?;
        let h = Handle::in_namespace(&ns.file).map_err(|e| e.to_string())?;
        let (s, _) = peer_objects(0, 1, 1);
        match rt.block_on(h.states().add(s[0].clone()).execute()) {
            Ok(()) => {}
            Err(XfrmError::Kernel { source, .. })
                if matches!(source.kind, KernelErrorKind::MissingSupport { .. }) =>
            {
                return Err(format!("kernel cannot install ESP states: {source}"));
            }
            Err(e) => return Err(format!("probe: {}", chain(&e))),
        }
    }

    let owner = ownership();
    for n in peers {
        let full = mesh(0, n, |_| 1);
        let objects = full.states.len() + full.policies.len();

        // nodeseal: full programming, then a 10% rekey.
        let ns = Netns::new("nodeseal")?;
        let h = Handle::in_namespace(&ns.file).map_err(|e| e.to_string())?;
        if let Some(t) = hthresh {
            rt.block_on(h.set_policy_hash_thresholds((t, t), (128, 128)).execute())
                .map_err(|e| e.to_string())?;
        }
        let t0 = Instant::now();
        let r = rt
            .block_on(reconcile(&h, &owner, full.clone()))
            .map_err(|e| format!("full reconcile: {}", chain(&e)))?;
        let t_full = t0.elapsed();
        assert_eq!(r.states_added + r.policies_added, objects, "{r:?}");
        let rekey = mesh(0, n, |p| if p % 10 == 0 { 2 } else { 1 });
        let t0 = Instant::now();
        let r = rt
            .block_on(reconcile(&h, &owner, rekey))
            .map_err(|e| format!("10% reconcile: {}", chain(&e)))?;
        let t_delta = t0.elapsed();
        let changed = r.states_added + r.states_deleted;
        let t0 = Instant::now();
        let noop = rt
            .block_on(reconcile(
                &h,
                &owner,
                mesh(0, n, |p| if p % 10 == 0 { 2 } else { 1 }),
            ))
            .map_err(|e| format!("no-op reconcile: {}", chain(&e)))?;
        let t_noop = t0.elapsed();
        assert!(noop.is_noop(), "{noop:?}");
        drop(h);
        drop(ns);

        // iproute2: the same objects with ip -batch.
        let ns = Netns::new("ip")?;
        if let Some(t) = hthresh {
            let s = Command::new("ip")
                .args(["-n", &ns.name, "xfrm", "policy", "set", "hthresh4"])
                .args([t.to_string(), t.to_string()])
                .status();
            if !s.is_ok_and(|s| s.success()) {
                return Err("ip xfrm policy set hthresh4 failed".into());
            }
        }
        let path = std::env::temp_dir().join(format!("nodeseal-xfrm-bench-{n}.batch"));
        std::fs::write(&path, ip_batch(&full)).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let out = Command::new("ip")
            .args(["-n", &ns.name, "-batch"])
            .arg(&path)
            .output()
            .map_err(|e| e.to_string())?;
        let t_ip = t0.elapsed();
        let _ = std::fs::remove_file(&path);
        if !out.status.success() {
            return Err(format!(
                "ip -batch failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let h = Handle::in_namespace(&ns.file).map_err(|e| e.to_string())?;
        let states = rt
            .block_on(h.states().dump().execute())
            .map_err(|e| e.to_string())?;
        let policies = rt
            .block_on(h.policies().dump().execute())
            .map_err(|e| e.to_string())?;
        assert_eq!(
            states.len() + policies.len(),
            objects,
            "ip -batch installed everything"
        );

        let rate = |d: Duration| objects as f64 / secs(d);
        println!(
            "peers={n} objects={objects} nodeseal={:.3}s ({:.0} obj/s) ip-batch={:.3}s ({:.0} obj/s) \
             ratio(nodeseal/ip)={:.2} reconcile-10%={:.3}s ({changed} states changed, {:.1}% of full) \
             noop-reconcile={:.3}s",
            secs(t_full),
            rate(t_full),
            secs(t_ip),
            rate(t_ip),
            secs(t_full) / secs(t_ip),
            secs(t_delta),
            100.0 * secs(t_delta) / secs(t_full),
            secs(t_noop),
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; nothing else to parse.
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) if std::env::var("NODESEAL_REQUIRE_PRIVILEGED").as_deref() == Ok("1") => {
            eprintln!("xfrm bench failed: {reason}");
            ExitCode::FAILURE
        }
        Err(reason) => {
            println!("skipping xfrm bench: {reason}");
            ExitCode::SUCCESS
        }
    }
}
