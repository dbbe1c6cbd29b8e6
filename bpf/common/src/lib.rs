//! nodeseal-bpf-common : not yet implemented; see the issues.
