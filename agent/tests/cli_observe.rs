//! The `nodeseal` binary's `observe` and `status` against the agent's real status socket server
//! (with a fixed status and an observe hub fed by hand): the request line protocol end to end,
//! history filters, JSON and text output, `--follow` turning tracing on for exactly as long as
//! the client runs, and refused arguments.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up or expectation is a test failure"
)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nodeseal_agent::datapath::DatapathError;
use nodeseal_agent::observe::{Flow, ObserveHub, TraceSwitch, Verdict};
use nodeseal_agent::status::{NodeView, StatusSource};
use nodeseal_bpf::{DropEvent, DropReason, Outcome, Program, TraceReason};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

const NODESEAL: &str = env!("CARGO_BIN_EXE_nodeseal");

struct Fixed;

#[async_trait::async_trait]
impl StatusSource for Fixed {
    async fn snapshot(&self) -> NodeView {
        NodeView {
            node: "deathstar-node".into(),
            mode: "ipsec".into(),
            strict: true,
            node_encryption: false,
            spiffe_id: None,
            svid_not_after_unix: None,
            generation: 1,
            peers: Vec::new(),
            xfrm_errors: BTreeMap::new(),
            datapath_drops: BTreeMap::from([("policy_denied".to_owned(), 2)]),
            unusable_nodes: BTreeMap::new(),
            trust_bundle_error: None,
            wg_public_key: None,
            pod_mtu: None,
            policy: None,
        }
    }
}

#[derive(Default)]
struct Switch(Mutex<Vec<bool>>);

impl TraceSwitch for Switch {
    fn set_trace(&self, on: bool) -> Result<(), DatapathError> {
        self.0.lock().unwrap().push(on);
        Ok(())
    }
}

const XWING: u32 = 300;
const TIEFIGHTER: u32 = 301;
const DEATHSTAR: u32 = 302;

fn event(src_identity: u32, outcome: Outcome, port: u16) -> DropEvent {
    DropEvent {
        outcome,
        program: Program::ToPod,
        ip_version: 4,
        protocol: 6,
        src_identity,
        dst_identity: DEATHSTAR,
        ifindex: 4,
        mark: 0,
        src: Some(IpAddr::V4(Ipv4Addr::new(
            10,
            0,
            3,
            u8::try_from(src_identity - 290).unwrap(),
        ))),
        dst: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 7))),
        src_port: 40_000,
        dst_port: port,
        node_id: 0,
    }
}

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    hub: ObserveHub,
    switch: Arc<Switch>,
    cancel: CancellationToken,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let listener = nodeseal_agent::status::bind(&socket).expect("bind");
        let switch = Arc::new(Switch::default());
        let hub = ObserveHub::new(Some(Arc::clone(&switch) as Arc<dyn TraceSwitch>));
        hub.set_identity_labels(BTreeMap::from([
            (XWING, "k8s:org=alliance,k8s:class=xwing".to_owned()),
            (TIEFIGHTER, "k8s:org=empire,k8s:class=tiefighter".to_owned()),
            (DEATHSTAR, "k8s:org=empire,k8s:class=deathstar".to_owned()),
        ]));
        let cancel = CancellationToken::new();
        tokio::spawn(nodeseal_agent::status::serve(
            listener,
            Arc::new(Fixed),
            Some(hub.clone()),
            cancel.clone(),
        ));
        Self {
            _dir: dir,
            socket,
            hub,
            switch,
            cancel,
        }
    }
}

async fn nodeseal(socket: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(NODESEAL)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .await
        .expect("running nodeseal")
}

async fn ok(socket: &Path, args: &[&str]) -> String {
    let output = nodeseal(socket, args).await;
    assert!(
        output.status.success(),
        "nodeseal {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_and_status_over_the_status_socket() {
    let server = Server::start().await;
    let socket = server.socket.clone();
    server.hub.publish(
        vec![
            Ok(event(TIEFIGHTER, Outcome::Trace(TraceReason::Pass), 80)),
            Ok(event(XWING, Outcome::Drop(DropReason::PolicyDenied), 80)),
            Ok(event(XWING, Outcome::Drop(DropReason::PolicyDenied), 443)),
        ],
        SystemTime::now(),
    );

    // `status` still works with the request line.
    let status = ok(&socket, &["status", "-o", "json"]).await;
    let view: NodeView = serde_json::from_str(&status).expect("status json");
    assert_eq!(view.node, "deathstar-node");

    // History as JSON, filtered by the agent.
    let json = ok(
        &socket,
        &[
            "observe",
            "-o",
            "json",
            "--verdict",
            "dropped",
            "--from-label",
            "org=alliance",
            "--to-label",
            "class=deathstar",
            "--port",
            "80",
        ],
    )
    .await;
    let flows: Vec<Flow> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("flow json"))
        .collect();
    assert_eq!(flows.len(), 1, "{json}");
    assert_eq!(flows[0].verdict, Verdict::Dropped);
    assert_eq!(flows[0].drop_reason.as_deref(), Some("policy_denied"));
    assert_eq!(flows[0].source.identity, XWING);
    assert_eq!(flows[0].destination.port, Some(80));

    // Text: one hubble-like line per flow, oldest first.
    let text = ok(&socket, &["observe", "--since", "5m"]).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains(
            "10.0.3.11:40000 (id 301 k8s:org=empire,k8s:class=tiefighter) -> 10.0.1.7:80 \
             (id 302 k8s:org=empire,k8s:class=deathstar) FORWARDED (pass) TCP encrypted=false"
        ),
        "{text}"
    );
    assert!(lines[1].contains(" DROPPED (policy_denied) TCP"), "{text}");
    let last = ok(&socket, &["observe", "--last", "1"]).await;
    assert!(
        last.trim_end().ends_with("encrypted=false") && last.contains(":443 "),
        "{last}"
    );
    assert!(
        server.switch.0.lock().unwrap().is_empty(),
        "history needs no tracing"
    );

    server.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_turns_tracing_on_while_the_client_runs() {
    let server = Server::start().await;
    let mut child = tokio::process::Command::new(NODESEAL)
        .args(["observe", "-f", "-o", "json", "--socket"])
        .arg(&server.socket)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn observe -f");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.hub.tracers() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tracing never turned on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*server.switch.0.lock().unwrap(), vec![true]);
    server.hub.publish(
        vec![Ok(event(TIEFIGHTER, Outcome::Trace(TraceReason::Pass), 80))],
        SystemTime::now(),
    );
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("a flow in time")
        .expect("read")
        .expect("a line");
    let flow: Flow = serde_json::from_str(&line).expect("flow");
    assert_eq!(flow.verdict, Verdict::Forwarded);
    // The client dies (not a clean exit): the agent notices and turns tracing off.
    child.kill().await.expect("kill");
    while server.hub.tracers() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tracing never turned off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*server.switch.0.lock().unwrap(), vec![true, false]);

    // Only drops: tracing stays off.
    let mut drops = tokio::process::Command::new(NODESEAL)
        .args(["observe", "-f", "--verdict", "dropped", "--socket"])
        .arg(&server.socket)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn observe -f --verdict dropped");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.hub.tracers(), 0);
    drops.kill().await.expect("kill");
    server.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear() {
    let server = Server::start().await;
    // Refused by the CLI (usage error, exit 2), before reaching the agent.
    for (args, needle) in [
        (
            &["observe", "--verdict", "maybe"][..],
            "possible values: forwarded, dropped",
        ),
        (
            &["observe", "--from-label", "alliance"],
            "expected key=value",
        ),
        (&["observe", "--since", "yesterday"], "expected a duration"),
    ] {
        let output = nodeseal(&server.socket, args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // No agent at that path.
    let output = nodeseal(Path::new("/nonexistent/agent.sock"), &["observe"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is nodeseal-agent running?"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.cancel.cancel();
}
