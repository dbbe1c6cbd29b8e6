//! nodeseal-spiffe-bridge : not yet implemented; see the issues.
