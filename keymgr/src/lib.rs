//! nodeseal-keymgr : not yet implemented; see the issues.
