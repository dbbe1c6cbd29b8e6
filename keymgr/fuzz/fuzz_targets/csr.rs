//! CSR validation: arbitrary DER never panics, and anything accepted names the requesting node
//! in the configured trust domain.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeseal_keymgr::{NodeName, TrustDomain, validate_csr};

fuzz_target!(|data: &[u8]| {
    let td: TrustDomain = "cluster.local".parse().expect("static trust domain");
    let node: NodeName = "worker-1".parse().expect("static node name");
    if let Ok(csr) = validate_csr(data, &td, &node) {
        assert_eq!(csr.node(), &node);
        assert!(csr.spiffe_id().is_member_of(&td));
    }
});
