//! Acceptance scenarios of the agent: real `nodeseal-agent` processes per node namespace, keymgr,
//! a shared store; assertions read the wire capture, the status API and the counters.

use std::time::Duration;

use nodeseal_netns::{Fabric, FabricOptions, Feature, Topology, ping, require};

const CONVERGE: Duration = Duration::from_secs(60);

#[test]
fn pods_talk_across_nodes_only_through_esp() {
    if !require(
        "agent_basic",
        &[Feature::Netns, Feature::Esp, Feature::TcBpf],
    ) {
        return;
    }
    let topo = Topology::builder("agentbasic")
        .nodes(3)
        .pods_per_node(1)
        .build()
        .expect("topology");
    let fabric = Fabric::start(&topo, 3, FabricOptions::default()).expect("fabric");
    fabric
        .wait_established(&[0, 1, 2], CONVERGE)
        .expect("established");
    let capture = topo.capture().expect("capture");
    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                let r = ping(&topo.node(a).pod(0).ns, topo.node(b).pod(0).ip, 2).expect("ping");
                assert!(r.all_answered(), "node{a} -> node{b}: {r:?}");
            }
        }
    }
    capture
        .check_no_plaintext(&topo.pod_cidrs())
        .unwrap_or_else(|leak| panic!("{leak}"));
    let summary = capture.summary();
    // 6 ordered pairs, 2 requests + 2 replies each.
    assert!(summary.esp >= 24, "{summary}");
    // Each node's status shows its SPIs on the wire.
    let row = fabric.peer_row(0, "node1").expect("row");
    let out_spi = u32::from_str_radix(
        row["out_spi"].as_str().unwrap().trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert!(
        summary
            .esp_flows
            .keys()
            .any(|(s, d, spi)| s.to_string() == "10.0.0.1"
                && d.to_string() == "10.0.0.2"
                && *spi == out_spi),
        "{summary}\n{row}"
    );
    assert!(row["out_packets"].as_u64().unwrap() >= 2, "{row}");
}
