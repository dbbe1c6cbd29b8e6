//! Kernel scenarios for `nodeseal-xfrm`, each in a fresh network namespace.
//!
//! Policies work on any kernel with XFRM (the development host included); states need ESP and
//! the AEAD transforms ([`Feature::Esp`]), so those tests skip with a reason unless the kernel
//! has them (the VM runner's Debian kernels do). With `NODESEAL_REQUIRE_PRIVILEGED=1` a skip is
//! a failure.
//! iproute2 is the independent reader: after programming, `ip xfrm state` / `ip xfrm policy`
//! must list exactly our objects with the same SPIs, marks, selectors, algorithms and keys.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers and fixtures panic with context, like the tests themselves"
)]

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use fixture::{IN_MARK, mesh, ownership, peer_objects};
use nodeseal_netns::{Feature, Netns, REQUIRE_ENV, Topology, ping, require};
use nodeseal_xfrm::{
    Desired, ExpireMonitor, Handle, KernelErrorKind, Mark, MonitorEvent, PolicySpec, StateSpec,
    XfrmError, XfrmStat,
    reconcile::{flush_owned, reconcile},
};

/// A synthetic peer mesh like the agent installs (the same shape as
/// `nodeseal_xfrm::test_helpers`, which this package cannot see without the `testing` feature).
/// Node `i`: node IP `172.16.0.0 + i`, pod CIDR `10.(i/256).(i%256).0/24`.
mod fixture {
    use std::net::{IpAddr, Ipv4Addr};

    use nodeseal_xfrm::{
        Aead, AeadAlgorithm, Desired, Direction, Mark, Ownership, PolicySpec, ReqId, Selector, Spi,
        StateSpec, Template,
    };

    pub const REQID_BASE: u32 = 0x4e53_0000;
    pub const IN_MARK: Mark = Mark::new(0x0d00, 0x0f00);

    pub fn ownership() -> Ownership {
        Ownership::new(ReqId::new(REQID_BASE).unwrap()..=ReqId::new(REQID_BASE + 0xffff).unwrap())
    }

    pub fn node_ip(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i))
    }

    fn pod_cidr(i: u32) -> String {
        format!("10.{}.{}.0/24", (i >> 8) & 0xff, i & 0xff)
    }

    pub fn peer_objects(local: u32, peer: u32, epoch: u32) -> (Vec<StateSpec>, Vec<PolicySpec>) {
        let (l, p) = (node_ip(local), node_ip(peer));
        let sel_out = Selector::new(
            pod_cidr(local).parse().unwrap(),
            pod_cidr(peer).parse().unwrap(),
        )
        .unwrap();
        let sel_in = Selector::new(
            pod_cidr(peer).parse().unwrap(),
            pod_cidr(local).parse().unwrap(),
        )
        .unwrap();
        let r = ReqId::new(REQID_BASE + (peer & 0xffff)).unwrap();
        let spi = |from: u32, to: u32| {
            Spi::new(0x1000_0000 | (to & 0x0f) << 24 | (from & 0xffff) << 8 | (epoch & 0xff))
                .unwrap()
        };
        let key = |from: u32, to: u32| {
            let mut k = [0u8; 20];
            k[..4].copy_from_slice(&from.to_be_bytes());
            k[4..8].copy_from_slice(&to.to_be_bytes());
            k[8..12].copy_from_slice(&epoch.to_be_bytes());
            k[12..].copy_from_slice(b"netnstst");
            Aead::new(AeadAlgorithm::AesGcm128, &k).unwrap()
        };
        let out_mark = Mark::new(0x0e00 | (peer << 16), 0xffff_ff00);
        let mut out =
            StateSpec::new(l, p, spi(local, peer), r, key(local, peer), Some(sel_out)).unwrap();
        out.mark = out_mark;
        let mut inb =
            StateSpec::new(p, l, spi(peer, local), r, key(peer, local), Some(sel_in)).unwrap();
        inb.mark = IN_MARK;
        let t_out = Template::new(l, p, r).unwrap();
        let t_in = Template::new(p, l, r).unwrap();
        let mut po = PolicySpec::new(sel_out, Direction::Out, t_out);
        po.mark = out_mark;
        let mut pi = PolicySpec::new(sel_in, Direction::In, t_in);
        pi.mark = IN_MARK;
        let mut pf = PolicySpec::new(sel_in, Direction::Fwd, t_in);
        pf.mark = IN_MARK;
        (vec![out, inb], vec![po, pi, pf])
    }

    pub fn mesh(local: u32, n: u32, epoch: impl Fn(u32) -> u32) -> Desired {
        let mut d = Desired::default();
        for peer in (0..=n).filter(|p| *p != local) {
            let (s, p) = peer_objects(local, peer, epoch(peer));
            d.states.extend(s);
            d.policies.extend(p);
        }
        d
    }
}

/// Runs a future to completion on this thread (the netns package has no async runtime; the
/// xfrm handle's futures only wait on a oneshot from its worker thread).
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

/// An xfrm handle whose netlink socket lives in `ns`.
fn handle(ns: &Netns) -> Handle {
    let file = File::open(ns.path()).expect("opening the netns file");
    Handle::in_namespace(&file).expect("xfrm handle in namespace")
}

/// Splits `ip xfrm ...` output into one block per object (each starts with `src `).
fn blocks(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("src ") {
            out.push(String::new());
        }
        if let Some(b) = out.last_mut() {
            b.push_str(line.trim());
            b.push('\n');
        }
    }
    out
}

/// The words of a listed state's `flag` list (they end the line).
fn flags(block: &str) -> Vec<&str> {
    block
        .lines()
        .find_map(|l| l.split_once(" flag "))
        .map_or_else(Vec::new, |(_, list)| list.split_whitespace().collect())
}

fn mark_text(m: Mark) -> String {
    format!("{:#x}/{:#x}", m.value, m.mask)
}

/// Finds the one `ip xfrm policy` block describing `p` and checks every field.
fn assert_policy_listed(listing: &[String], p: &PolicySpec) {
    let head = format!("src {} dst {}", p.selector.src(), p.selector.dst());
    let dir = format!("dir {} priority {}", p.dir, p.priority);
    let matches: Vec<_> = listing
        .iter()
        .filter(|b| b.starts_with(&head) && b.contains(&dir))
        .filter(|b| p.mark.is_none() || b.contains(&format!("mark {}", mark_text(p.mark))))
        .collect();
    assert_eq!(
        matches.len(),
        1,
        "policy {} in listing:\n{listing:#?}",
        p.id()
    );
    let b = matches[0];
    for t in &p.templates {
        assert!(
            b.contains(&format!("tmpl src {} dst {}", t.src, t.dst)),
            "{b}"
        );
        assert!(
            b.contains(&format!("proto esp reqid {} mode tunnel", t.reqid)),
            "{b}"
        );
    }
}

/// Finds the one `ip xfrm state` block describing `s` and checks every field, key included.
fn assert_state_listed(listing: &[String], s: &StateSpec) {
    let head = format!("src {} dst {}", s.src, s.dst);
    let spi = format!(
        "proto esp spi {:#010x} reqid {} mode tunnel",
        s.spi.get(),
        s.reqid
    );
    let matches: Vec<_> = listing
        .iter()
        .filter(|b| b.starts_with(&head) && b.contains(&spi))
        .collect();
    assert_eq!(matches.len(), 1, "{} in listing:\n{listing:#?}", s.id());
    let b = matches[0];
    let key: String = s
        .aead
        .key_material()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    let aead = format!("aead {} 0x{key} 128", s.aead.algorithm().kernel_name());
    assert!(b.contains(&aead), "{b}\nexpected {aead}");
    match s.selector {
        Some(sel) => assert!(
            b.contains(&format!("sel src {} dst {}", sel.src(), sel.dst())),
            "{b}"
        ),
        None => assert!(flags(b).contains(&"af-unspec"), "{b}"),
    }
    if !s.mark.is_none() {
        assert!(b.contains(&format!("mark {}", mark_text(s.mark))), "{b}");
    }
    if s.esn {
        assert!(flags(b).contains(&"esn"), "{b}");
    }
    assert!(
        b.contains(&format!("replay-window {}", 0)) || s.replay_window > 0,
        "{b}"
    );
}

#[test]
fn policy_operations_cross_checked_with_iproute2() {
    if !require("policy_operations_cross_checked_with_iproute2", &[]) {
        return;
    }
    let ns = Netns::new("xfrm-pol").expect("netns");
    let h = handle(&ns);
    let (_, p) = peer_objects(0, 1, 1);
    for pol in &p {
        block_on(h.policies().add(pol.clone()).execute()).expect("adding policy");
    }
    let e = block_on(h.policies().add(p[0].clone()).execute()).expect_err("duplicate add");
    assert_eq!(
        e.kernel_error().map(|k| &k.kind),
        Some(&KernelErrorKind::Exists)
    );
    let listing = blocks(&ns.ip(&["xfrm", "policy"]).expect("ip xfrm policy"));
    assert_eq!(listing.len(), 3, "{listing:#?}");
    for pol in &p {
        assert_policy_listed(&listing, pol);
        let got = block_on(h.policies().get(pol.id()).execute()).expect("get policy");
        assert_eq!(got.spec.as_ref(), Some(pol));
    }
    // Atomic replace: priority change.
    let mut changed = p[1].clone();
    changed.priority = 42;
    block_on(h.policies().update(changed.clone()).execute()).expect("update policy");
    assert_policy_listed(
        &blocks(&ns.ip(&["xfrm", "policy"]).expect("ip xfrm policy")),
        &changed,
    );
    let dump = block_on(h.policies().dump().execute()).expect("dump");
    assert_eq!(dump.len(), 3);
    block_on(h.policies().delete(p[0].id()).execute()).expect("delete policy");
    let e = block_on(h.policies().delete(p[0].id()).execute()).expect_err("second delete");
    assert_eq!(
        e.kernel_error().map(|k| &k.kind),
        Some(&KernelErrorKind::NotFound)
    );
    assert_eq!(
        blocks(&ns.ip(&["xfrm", "policy"]).expect("ip xfrm policy")).len(),
        2
    );
}

#[test]
fn policy_reconcile_leaves_foreign_policies_alone_and_is_idempotent() {
    if !require(
        "policy_reconcile_leaves_foreign_policies_alone_and_is_idempotent",
        &[],
    ) {
        return;
    }
    let ns = Netns::new("xfrm-polrec").expect("netns");
    let h = handle(&ns);
    // Foreign: reqid 1 (outside our range), and one with no template.
    ns.ip(&[
        "xfrm",
        "policy",
        "add",
        "src",
        "10.200.0.0/16",
        "dst",
        "10.201.0.0/16",
        "dir",
        "out",
        "tmpl",
        "src",
        "192.0.2.1",
        "dst",
        "192.0.2.2",
        "proto",
        "esp",
        "reqid",
        "1",
        "mode",
        "tunnel",
    ])
    .expect("adding a foreign policy");
    ns.ip(&[
        "xfrm",
        "policy",
        "add",
        "src",
        "10.202.0.0/16",
        "dst",
        "10.203.0.0/16",
        "dir",
        "in",
        "action",
        "block",
    ])
    .expect("adding a foreign policy");
    let foreign = ns.ip(&["xfrm", "policy"]).expect("ip xfrm policy");
    let owner = ownership();
    let policies_only = |d: Desired| Desired {
        states: vec![],
        policies: d.policies,
    };
    let r = block_on(reconcile(&h, &owner, policies_only(mesh(0, 50, |_| 1)))).expect("reconcile");
    assert_eq!((r.policies_added, r.foreign_policies), (150, 2));
    let r = block_on(reconcile(&h, &owner, policies_only(mesh(0, 50, |_| 1)))).expect("again");
    assert!(r.is_noop(), "{r:?}");
    let desired = policies_only(mesh(0, 40, |_| 1));
    let listing = blocks(&ns.ip(&["xfrm", "policy"]).expect("ip xfrm policy"));
    assert_eq!(listing.len(), 152);
    for p in &desired.policies {
        assert_policy_listed(&listing, p);
    }
    let r = block_on(reconcile(&h, &owner, desired)).expect("shrink");
    assert_eq!(r.policies_deleted, 30);
    assert_eq!(block_on(flush_owned(&h, &owner)).expect("flush"), 120);
    assert_eq!(
        ns.ip(&["xfrm", "policy"]).expect("ip xfrm policy"),
        foreign,
        "foreign policies changed"
    );
}

#[test]
fn batch_reports_each_failed_object() {
    if !require("batch_reports_each_failed_object", &[]) {
        return;
    }
    let ns = Netns::new("xfrm-batch").expect("netns");
    let h = handle(&ns);
    let (_, p) = peer_objects(0, 1, 1);
    let (_, q) = peer_objects(0, 2, 1);
    let e = block_on(
        h.batch()
            .add_policy(p[0].clone())
            .add_policy(p[0].clone())
            .add_policy(q[0].clone())
            .delete_policy(q[1].id())
            .execute(),
    )
    .expect_err("batch with a duplicate and a missing delete");
    let XfrmError::Batch(b) = e else {
        panic!("{e:?}")
    };
    assert_eq!(b.total, 4);
    let failed: Vec<_> = b
        .failures
        .iter()
        .map(|f| (f.verb, f.object.to_string()))
        .collect();
    assert_eq!(
        failed,
        vec![
            ("add", p[0].id().to_string()),
            ("delete", q[1].id().to_string())
        ]
    );
    assert_eq!(
        blocks(&ns.ip(&["xfrm", "policy"]).expect("ip xfrm policy")).len(),
        2
    );
}

#[test]
fn states_without_esp_report_missing_modules() {
    if !require("states_without_esp_report_missing_modules", &[]) {
        return;
    }
    let ns = Netns::new("xfrm-noesp").expect("netns");
    let h = handle(&ns);
    let (s, _) = peer_objects(0, 1, 1);
    match block_on(h.states().add(s[0].clone()).execute()) {
        Ok(()) => eprintln!("kernel has ESP: nothing to check here"),
        Err(XfrmError::Kernel { source, .. }) => {
            let KernelErrorKind::MissingSupport { modules } = &source.kind else {
                panic!("unexpected error {source}")
            };
            assert!(
                modules.contains(&"esp4") && modules.contains(&"gcm"),
                "{modules:?}"
            );
            eprintln!("as expected without ESP: {source}");
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn state_operations_cross_checked_with_iproute2() {
    if !require(
        "state_operations_cross_checked_with_iproute2",
        &[Feature::Esp],
    ) {
        return;
    }
    let ns = Netns::new("xfrm-state").expect("netns");
    let h = handle(&ns);
    let (mut s, _) = peer_objects(0, 1, 1);
    s[1].output_mark = Mark::new(0x0d00, 0x0f00);
    let mut chacha = peer_objects(0, 2, 1).0.remove(0);
    chacha.aead =
        nodeseal_xfrm::Aead::new(nodeseal_xfrm::AeadAlgorithm::ChaCha20Poly1305, &[0x5a; 36])
            .expect("chacha key");
    let mut gcm256 = peer_objects(0, 3, 1).0.remove(0);
    gcm256.aead = nodeseal_xfrm::Aead::new(nodeseal_xfrm::AeadAlgorithm::AesGcm256, &[0x33; 36])
        .expect("key");
    // The agent's shape: either inner family over an IPv4 tunnel.
    let mut dual = peer_objects(0, 4, 1).0.remove(0);
    dual.selector = None;
    let all = [s[0].clone(), s[1].clone(), chacha, gcm256, dual];
    for st in &all {
        block_on(h.states().add(st.clone()).execute()).expect("adding state");
    }
    let listing = blocks(&ns.ip(&["xfrm", "state"]).expect("ip xfrm state"));
    assert_eq!(listing.len(), all.len(), "{listing:#?}");
    for st in &all {
        assert_state_listed(&listing, st);
        let got = block_on(h.states().get(st.id()).execute()).expect("get state");
        assert_eq!(got.spec.as_ref(), Some(st));
        assert_eq!(got.stats.packets, 0);
    }
    // In-place update of lifetimes.
    let mut upd = all[0].clone();
    upd.lifetime.hard.add_seconds = Some(7200);
    block_on(h.states().update(upd.clone()).execute()).expect("update");
    let got = block_on(h.states().get(upd.id()).execute()).expect("get");
    assert_eq!(got.spec.as_ref(), Some(&upd));
    let with_stats = ns.ip(&["-s", "xfrm", "state"]).expect("ip -s xfrm state");
    assert!(
        with_stats.contains("7200"),
        "ip -s shows the new lifetime:\n{with_stats}"
    );
    block_on(h.states().delete(all[0].id()).execute()).expect("delete");
    assert_eq!(
        blocks(&ns.ip(&["xfrm", "state"]).expect("ip xfrm state")).len(),
        all.len() - 1
    );
    // The namespace's own /proc/net/xfrm_stat, read by a process inside it.
    if let Ok(text) = ns.exec("cat", &["/proc/net/xfrm_stat"]) {
        let stat = XfrmStat::parse(&text).expect("xfrm_stat");
        assert_eq!(stat.in_no_states, 0, "fresh namespace");
        assert!(stat.other.is_empty(), "unknown counters {:?}", stat.other);
    } else {
        let why = "state_operations_cross_checked_with_iproute2: no /proc/net/xfrm_stat \
                   (CONFIG_XFRM_STATISTICS)";
        assert!(
            std::env::var(REQUIRE_ENV).as_deref() != Ok("1"),
            "{why} and {REQUIRE_ENV}=1"
        );
        eprintln!("SKIPPED the xfrm_stat check of {why}");
    }
}

/// The kernel's expire notices, as the agent's rekey-on-limit relies on them: one soft notice
/// while the state still works, one hard notice when the kernel deletes it, none for a state
/// without limits. Time limits stand in for byte and packet limits (the kernel's timer sends
/// the same notice), so no traffic is needed.
#[test]
fn expire_notices_report_soft_then_hard_limits() {
    if !require(
        "expire_notices_report_soft_then_hard_limits",
        &[Feature::Esp],
    ) {
        return;
    }
    let ns = Netns::new("xfrm-expire").expect("netns");
    let h = handle(&ns);
    let file = File::open(ns.path()).expect("opening the netns file");
    let mut monitor = ExpireMonitor::open_in(file.as_fd()).expect("expire monitor");
    let (mut states, _) = peer_objects(0, 1, 1);
    let unlimited = states.pop().expect("two states");
    let mut limited = states.pop().expect("two states");
    limited.lifetime.soft.add_seconds = Some(1);
    limited.lifetime.hard.add_seconds = Some(3);
    for st in [&limited, &unlimited] {
        block_on(h.states().add(st.clone()).execute()).expect("adding state");
    }
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    while seen.len() < 2 && started.elapsed() < std::time::Duration::from_secs(20) {
        match monitor.try_next() {
            Some(MonitorEvent::Expire(e)) => seen.push((e, started.elapsed())),
            Some(MonitorEvent::Lost) => panic!("notices lost on an idle namespace"),
            None => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
    assert_eq!(seen.len(), 2, "soft and hard notices within 20 s: {seen:?}");
    for (i, (e, at)) in seen.iter().enumerate() {
        assert_eq!(e.hard, i == 1, "soft first, then hard: {seen:?}");
        assert_eq!(
            (e.src, e.dst, e.spi, e.reqid, e.mark),
            (
                limited.src,
                limited.dst,
                limited.spi.get(),
                limited.reqid.get(),
                limited.mark
            ),
            "the notice names the limited state"
        );
        eprintln!(
            "expire notice {} after {at:?}",
            if e.hard { "hard" } else { "soft" }
        );
    }
    let listing = blocks(&ns.ip(&["xfrm", "state"]).expect("ip xfrm state"));
    assert_eq!(
        listing.len(),
        1,
        "the kernel deleted the limited state:\n{listing:#?}"
    );
    assert_state_listed(&listing, &unlimited);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        monitor.try_next().is_none(),
        "no notice for the unlimited state"
    );
}

#[test]
fn full_reconcile_with_foreign_states_cross_checked_with_iproute2() {
    if !require(
        "full_reconcile_with_foreign_states_cross_checked_with_iproute2",
        &[Feature::Esp],
    ) {
        return;
    }
    let ns = Netns::new("xfrm-staterec").expect("netns");
    let h = handle(&ns);
    ns.ip(&[
        "xfrm",
        "state",
        "add",
        "src",
        "192.0.2.1",
        "dst",
        "192.0.2.2",
        "proto",
        "esp",
        "spi",
        "0x2000",
        "reqid",
        "1",
        "mode",
        "tunnel",
        "aead",
        "rfc4106(gcm(aes))",
        "0x0102030405060708090a0b0c0d0e0f1011121314",
        "128",
    ])
    .expect("adding a foreign state");
    ns.ip(&[
        "xfrm",
        "policy",
        "add",
        "src",
        "10.200.0.0/16",
        "dst",
        "10.201.0.0/16",
        "dir",
        "out",
        "tmpl",
        "src",
        "192.0.2.1",
        "dst",
        "192.0.2.2",
        "proto",
        "esp",
        "reqid",
        "1",
        "mode",
        "tunnel",
    ])
    .expect("adding a foreign policy");
    let foreign_states = ns.ip(&["xfrm", "state"]).expect("ip xfrm state");
    let foreign_policies = ns.ip(&["xfrm", "policy"]).expect("ip xfrm policy");
    let owner = ownership();
    let r = block_on(reconcile(&h, &owner, mesh(0, 30, |_| 1))).expect("reconcile");
    assert_eq!((r.states_added, r.policies_added), (60, 90));
    assert_eq!((r.foreign_states, r.foreign_policies), (1, 1));
    assert!(
        block_on(reconcile(&h, &owner, mesh(0, 30, |_| 1)))
            .expect("again")
            .is_noop()
    );
    // Rekey a third of the peers: new SPIs in, old ones out; policies untouched.
    let rekeyed = mesh(0, 30, |p| if p % 3 == 0 { 2 } else { 1 });
    let r = block_on(reconcile(&h, &owner, rekeyed.clone())).expect("rekey");
    assert_eq!(
        (r.states_added, r.states_deleted, r.policies_updated),
        (20, 20, 0)
    );
    let states = blocks(&ns.ip(&["xfrm", "state"]).expect("ip xfrm state"));
    assert_eq!(states.len(), 61);
    for s in &rekeyed.states {
        assert_state_listed(&states, s);
    }
    let policies = blocks(&ns.ip(&["xfrm", "policy"]).expect("ip xfrm policy"));
    for p in &rekeyed.policies {
        assert_policy_listed(&policies, p);
    }
    let in_states = rekeyed.states.iter().filter(|s| s.mark == IN_MARK).count();
    assert_eq!(in_states, 30);
    assert_eq!(block_on(flush_owned(&h, &owner)).expect("flush"), 150);
    assert_eq!(
        ns.ip(&["xfrm", "state"]).expect("ip xfrm state"),
        foreign_states
    );
    assert_eq!(
        ns.ip(&["xfrm", "policy"]).expect("ip xfrm policy"),
        foreign_policies
    );
}

/// The SAs and policies node `me` installs towards `peer` in a harness topology (no marks:
/// without the BPF datapath every packet between the pod CIDRs is selected).
fn live_objects(
    me: &nodeseal_netns::Node,
    peer: &nodeseal_netns::Node,
    spi_out: u32,
    spi_in: u32,
) -> Desired {
    use nodeseal_xfrm::{Aead, AeadAlgorithm, Direction, ReqId, Selector, Spi, Template};
    let (l, p) = (
        std::net::IpAddr::from(me.ip),
        std::net::IpAddr::from(peer.ip),
    );
    let cidr = |n: &nodeseal_netns::Node| n.pod_cidr.to_string().parse().expect("pod cidr");
    let sel_out = Selector::new(cidr(me), cidr(peer)).expect("selector");
    let sel_in = Selector::new(cidr(peer), cidr(me)).expect("selector");
    let r = ReqId::new(fixture::REQID_BASE + 1).expect("reqid");
    // Both ends derive the same key per direction (in nodeseal it comes from the handshake).
    let key = |spi: u32| {
        let mut k = [0x42u8; 20];
        k[..4].copy_from_slice(&spi.to_be_bytes());
        Aead::new(AeadAlgorithm::AesGcm128, &k).expect("key")
    };
    let out = StateSpec::new(
        l,
        p,
        Spi::new(spi_out).expect("spi"),
        r,
        key(spi_out),
        Some(sel_out),
    )
    .expect("out state");
    let inb = StateSpec::new(
        p,
        l,
        Spi::new(spi_in).expect("spi"),
        r,
        key(spi_in),
        Some(sel_in),
    )
    .expect("in");
    let t_out = Template::new(l, p, r).expect("template");
    let t_in = Template::new(p, l, r).expect("template");
    Desired {
        states: vec![out, inb],
        policies: vec![
            PolicySpec::new(sel_out, Direction::Out, t_out),
            PolicySpec::new(sel_in, Direction::In, t_in),
            PolicySpec::new(sel_in, Direction::Fwd, t_in),
        ],
    }
}

#[test]
fn pod_to_pod_ping_crosses_the_wire_as_esp_only() {
    if !require(
        "pod_to_pod_ping_crosses_the_wire_as_esp_only",
        &[Feature::Netns, Feature::Esp],
    ) {
        return;
    }
    let topo = Topology::builder("xfrmlive")
        .nodes(2)
        .pods_per_node(1)
        .build()
        .expect("topology");
    let (a, b) = (topo.node(0), topo.node(1));
    let (spi_ab, spi_ba) = (0x00a0_0b01, 0x00b0_0a01);
    let owner = ownership();
    for (me, peer, out, inb) in [(a, b, spi_ab, spi_ba), (b, a, spi_ba, spi_ab)] {
        let h = handle(&me.ns);
        let r = block_on(reconcile(&h, &owner, live_objects(me, peer, out, inb)))
            .expect("programming node");
        assert_eq!((r.states_added, r.policies_added), (2, 3));
    }
    let capture = topo.capture().expect("capture");
    let result = ping(&a.pod(0).ns, b.pod(0).ip, 5).expect("ping");
    assert!(result.all_answered(), "{result:?}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let summary = capture.summary();
    assert!(summary.esp >= 10, "echo and reply as ESP: {summary}");
    capture
        .check_no_plaintext(&topo.pod_cidrs())
        .expect("no plaintext pod traffic on the wire");
    let flows: Vec<_> = summary.esp_flows.keys().copied().collect();
    assert_eq!(
        flows
            .iter()
            .map(|(_, _, spi)| *spi)
            .collect::<std::collections::BTreeSet<_>>(),
        [spi_ab, spi_ba].into_iter().collect(),
        "only our SAs carry traffic: {summary}"
    );
    // The kernel's per-state counters saw the traffic.
    let h = handle(&a.ns);
    let states = block_on(h.states().dump().execute()).expect("dump");
    for s in &states {
        assert!(s.stats.packets >= 5, "{s:?}");
        assert_eq!(s.stats.integrity_failures, 0);
    }
    let out = states.iter().find(|s| s.spi == spi_ab).expect("out state");
    assert_eq!(
        out.stats.output_seq, out.stats.packets,
        "output sequence counts packets"
    );
}
