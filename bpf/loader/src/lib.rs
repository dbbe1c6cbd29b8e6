//! nodeseal-bpf : not yet implemented; see the issues.
