//! nodeseal-agent : not yet implemented; see the issues.
