//! nodeseal-xfrm : not yet implemented; see the issues.
