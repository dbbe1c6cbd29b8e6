//! Programming benchmark: nodeseal-xfrm against `ip -batch`.
//!
//! For each N (default 100, 1000, 5000; override with `NODESEAL_BENCH_PEERS=100,1000`): program
//! a full peer set (per peer 2 ESP states + OUT/IN/FWD policies, /24 pod CIDRs, marks) into an
//! empty namespace with [`reconcile`], then reconcile a rekey of 10% of the peers; program the
//! same objects with `ip -batch` into another fresh namespace. Prints objects/s and ratios, and
//! the CPU time split into user (our encoding) and system (the kernel inserting, which runs in
//! the sending process).
//!
//! - `NODESEAL_BENCH_LAYOUT`: `agent` (default) programs the agent's layout (`agent/src/peer/ipsec/sa.rs`:
//!   one reqid, any <-> peer pod CIDR selectors); `pairs` the test fixture's (per-peer reqids,
//!   pod CIDR <-> pod CIDR), which the kernel hashes badly (see `test_helpers`).
//! - `NODESEAL_BENCH_HTHRESH`: IPv4 policy hash thresholds set in both namespaces first, as
//!   `LBITS/RBITS` or `BITS` for both (`0/24` hashes every policy of the agent's layout); by
//!   default, or with `kernel`, the kernel's 32/32 stay, as the agent leaves them, under which
//!   every pod-CIDR policy is inexact.
//! - `NODESEAL_BENCH_SPLIT=1`: programs the states, then the policies, and reports each.
//!
//! Needs root and a kernel with ESP (the VM: `cargo xtask vm --kernel 6.12 -- <bench binary>`).
//! Without them it prints why and exits 0, or 1 under `NODESEAL_REQUIRE_PRIVILEGED=1`.

use std::fmt::Write as _;
use std::fs::File;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nodeseal_xfrm::test_helpers::{self, mesh, ownership, peer_objects};
use nodeseal_xfrm::{
    Desired, Direction, FamilyThresholds, Handle, KernelErrorKind, Mark, PolicyHashThresholds,
    Selector, XfrmError, reconcile,
};

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
        let flags: Vec<&str> = [(s.esn, "esn"), (s.selector.is_none(), "af-unspec")]
            .iter()
            .filter_map(|(on, name)| on.then_some(*name))
            .collect();
        if !flags.is_empty() {
            let _ = write!(out, " flag {}", flags.join(" "));
        }
        if !s.mark.is_none() {
            let _ = write!(out, " {}", mark(s.mark));
        }
        let _ = write!(out, " aead rfc4106(gcm(aes)) 0x{key} 128");
        match s.selector {
            Some(sel) => {
                let _ = writeln!(out, " sel src {} dst {}", sel.src(), sel.dst());
            }
            None => out.push('\n'),
        }
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

/// `ip xfrm policy set hthresh4` bits: `24` (both sides) or `LBITS/RBITS`.
fn parse_hthresh(v: &str) -> Result<(u8, u8), String> {
    let bad = || format!("bad NODESEAL_BENCH_HTHRESH {v:?} (want BITS or LBITS/RBITS)");
    let (l, r) = v.split_once('/').unwrap_or((v, v));
    Ok((
        l.trim().parse().map_err(|_| bad())?,
        r.trim().parse().map_err(|_| bad())?,
    ))
}

/// IPv4 thresholds as given, IPv6 left at the kernel's default.
fn thresholds((local, remote): (u8, u8)) -> Result<PolicyHashThresholds, String> {
    PolicyHashThresholds::new(
        FamilyThresholds { local, remote },
        PolicyHashThresholds::KERNEL_DEFAULT.v6(),
    )
    .map_err(|e| e.to_string())
}

/// The agent's layout (`agent/src/sa.rs`) instead of the fixture's: one reqid for every object;
/// policies name this node's side as any address and the peer's by its pod CIDR (OUT: any ->
/// peer, IN/FWD: peer -> any) at priority 100, IN/FWD policies and IN states without a mark;
/// states select any traffic.
///
/// The reqid matters: the kernel's state hash by destination is
/// `reqid ^ ntohl(daddr + saddr)`, folded to 16 bits. The fixture's per-peer reqid (base + i) and
/// node IP (172.16.0.0 + i) cancel in it, so the fixture puts every state into one bucket, which
/// each insertion walks (`__find_acq_core`, `__xfrm_state_bump_genids`); one reqid does not.
fn agent_layout(mut d: Desired) -> Desired {
    let any = |net: IpNet| match net {
        IpNet::V4(_) => IpNet::V4(Ipv4Net::default()),
        IpNet::V6(_) => IpNet::V6(Ipv6Net::default()),
    };
    let reqid = test_helpers::reqid(1);
    for s in &mut d.states {
        s.reqid = reqid;
        // The agent's states carry either inner family.
        s.selector = None;
        if s.mark == test_helpers::IN_MARK {
            s.mark = Mark::NONE;
        }
    }
    for p in &mut d.policies {
        let (src, dst) = (p.selector.src(), p.selector.dst());
        let sel = match p.dir {
            Direction::Out => Selector::new(any(src), dst),
            Direction::In | Direction::Fwd => {
                p.mark = Mark::NONE;
                Selector::new(src, any(dst))
            }
        };
        if let Ok(sel) = sel {
            p.selector = sel;
        }
        p.priority = 100;
        for t in &mut p.templates {
            t.reqid = reqid;
        }
    }
    d
}

/// User and system CPU time of this process (`RUSAGE_SELF`) or its waited-for children.
#[derive(Clone, Copy)]
struct CpuTimes {
    user: Duration,
    sys: Duration,
}

impl CpuTimes {
    fn now(who: libc::c_int) -> Self {
        // SAFETY: getrusage writes one `rusage` into the zeroed struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `who` is RUSAGE_SELF or RUSAGE_CHILDREN.
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.cast_unsigned())
                + Duration::from_micros(t.tv_usec.cast_unsigned())
        };
        Self {
            user: tv(ru.ru_utime),
            sys: tv(ru.ru_stime),
        }
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            user: self.user.saturating_sub(earlier.user),
            sys: self.sys.saturating_sub(earlier.sys),
        }
    }
}

impl std::fmt::Display for CpuTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "user {:.3}s sys {:.3}s", secs(self.user), secs(self.sys))
    }
}

/// Runs `f`, returning its wall time and this process's CPU time over it.
fn timed<T>(f: impl FnOnce() -> Result<T, String>) -> Result<(Duration, CpuTimes), String> {
    let cpu = CpuTimes::now(libc::RUSAGE_SELF);
    let t0 = Instant::now();
    f()?;
    Ok((t0.elapsed(), CpuTimes::now(libc::RUSAGE_SELF).since(cpu)))
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
    let hthresh = match std::env::var("NODESEAL_BENCH_HTHRESH").as_deref() {
        Ok("kernel") | Err(_) => None,
        Ok(v) => Some(parse_hthresh(v)?),
    };
    let use_agent_layout = match std::env::var("NODESEAL_BENCH_LAYOUT").as_deref() {
        Ok("agent") | Err(_) => true,
        Ok("pairs") => false,
        Ok(other) => return Err(format!("bad NODESEAL_BENCH_LAYOUT {other:?}")),
    };
    let split = std::env::var("NODESEAL_BENCH_SPLIT").as_deref() == Ok("1");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "xfrm program bench: kernel {} hthresh4 {} layout {}",
        kernel.trim(),
        hthresh.map_or("kernel (32/32)".into(), |(l, r)| format!("{l}/{r}")),
        if use_agent_layout { "agent" } else { "pairs" },
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
        let layout = |d: Desired| if use_agent_layout { agent_layout(d) } else { d };
        let full = layout(mesh(0, n, |_| 1));
        let objects = full.states.len() + full.policies.len();

        // nodeseal: full programming, then a 10% rekey.
        let ns = Netns::new("nodeseal")?;
        let h = Handle::in_namespace(&ns.file).map_err(|e| e.to_string())?;
        if let Some(t) = hthresh {
            rt.block_on(h.set_policy_hash_thresholds(thresholds(t)?).execute())
                .map_err(|e| e.to_string())?;
        }
        let mut phases = String::new();
        let mut t_states = Duration::ZERO;
        if split {
            // States alone, then the policies on top: which kind of object grows in cost.
            let states_only = Desired {
                states: full.states.clone(),
                policies: Vec::new(),
            };
            let (t, cpu) = timed(|| {
                rt.block_on(reconcile(&h, &owner, states_only))
                    .map_err(|e| format!("states reconcile: {}", chain(&e)))
            })?;
            t_states = t;
            let _ = write!(
                phases,
                " states={:.3}s ({:.0} obj/s, {cpu})",
                secs(t),
                full.states.len() as f64 / secs(t)
            );
        }
        let (t_full, cpu_full) = timed(|| {
            rt.block_on(reconcile(&h, &owner, full.clone()))
                .map_err(|e| format!("full reconcile: {}", chain(&e)))
        })?;
        if split {
            let _ = write!(
                phases,
                " then-policies={:.3}s ({:.0} obj/s, {cpu_full})",
                secs(t_full),
                full.policies.len() as f64 / secs(t_full)
            );
        }
        // Split or not, the figure compared with ip -batch is everything programmed.
        let t_full = t_states + t_full;
        let rekey = layout(mesh(0, n, |p| if p % 10 == 0 { 2 } else { 1 }));
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
                layout(mesh(0, n, |p| if p % 10 == 0 { 2 } else { 1 })),
            ))
            .map_err(|e| format!("no-op reconcile: {}", chain(&e)))?;
        let t_noop = t0.elapsed();
        assert!(noop.is_noop(), "{noop:?}");
        drop(h);
        drop(ns);

        // iproute2: the same objects with ip -batch.
        let ns = Netns::new("ip")?;
        if let Some((l, r)) = hthresh {
            let s = Command::new("ip")
                .args(["-n", &ns.name, "xfrm", "policy", "set", "hthresh4"])
                .args([l.to_string(), r.to_string()])
                .status();
            if !s.is_ok_and(|s| s.success()) {
                return Err("ip xfrm policy set hthresh4 failed".into());
            }
        }
        let path = std::env::temp_dir().join(format!("nodeseal-xfrm-bench-{n}.batch"));
        std::fs::write(&path, ip_batch(&full)).map_err(|e| e.to_string())?;
        let children = CpuTimes::now(libc::RUSAGE_CHILDREN);
        let t0 = Instant::now();
        let out = Command::new("ip")
            .args(["-n", &ns.name, "-batch"])
            .arg(&path)
            .output()
            .map_err(|e| e.to_string())?;
        let t_ip = t0.elapsed();
        let cpu_ip = CpuTimes::now(libc::RUSAGE_CHILDREN).since(children);
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
        if split {
            println!("peers={n} phases:{phases}");
        } else {
            println!(
                "peers={n} cpu: nodeseal {cpu_full} ip-batch {cpu_ip} \
                 (sys = the kernel inserting, in the sending process)"
            );
        }
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
