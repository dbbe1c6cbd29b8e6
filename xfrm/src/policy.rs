//! XFRM policies: which traffic must (or may) go through which states.

use std::fmt;
use std::net::IpAddr;

use crate::selector::{Mark, Selector, same_family};
use crate::state::{ReqId, SpecError};

/// Policy direction (`XFRM_POLICY_IN/OUT/FWD`). `ip xfrm policy ... dir in|out|fwd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic delivered to this host.
    In,
    /// Traffic sent by this host.
    Out,
    /// Traffic forwarded by this host (e.g. to pods).
    Fwd,
}

impl Direction {
    pub(crate) const fn to_kernel(self) -> u8 {
        match self {
            Self::In => 0,
            Self::Out => 1,
            Self::Fwd => 2,
        }
    }

    pub(crate) const fn from_kernel(dir: u8) -> Option<Self> {
        match dir {
            0 => Some(Self::In),
            1 => Some(Self::Out),
            2 => Some(Self::Fwd),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::In => "in",
            Self::Out => "out",
            Self::Fwd => "fwd",
        })
    }
}

/// What a policy does with matching traffic. `ip xfrm policy ... action allow|block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Allow (through the templates, if any).
    Allow,
    /// Drop.
    Block,
}

/// Whether a template must be satisfied (`level required`) or may be skipped (`level use`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TemplateLevel {
    /// Traffic must have been (or be) transformed by a matching state.
    Required,
    /// Use a matching state if there is one (`level use`).
    Optional,
}

/// The mode of the states a template asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TemplateMode {
    /// Tunnel mode: the template's addresses are the outer ones (`mode tunnel`).
    Tunnel,
    /// Transport mode (`mode transport`): the kernel looks states up by the packet's own
    /// addresses and keeps the template's only as given. An optional template that no state
    /// satisfies lets the packet pass in clear; the kernel refuses optional *tunnel* templates
    /// in OUT policies, but not transport ones.
    Transport,
}

/// An ESP template (`struct xfrm_user_tmpl`).
///
/// `ip xfrm policy ... tmpl src SRC dst DST proto esp reqid R mode tunnel [level use]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Template {
    /// Outer source.
    pub src: IpAddr,
    /// Outer destination.
    pub dst: IpAddr,
    /// Reqid of the states that satisfy this template.
    pub reqid: ReqId,
    /// Required or optional.
    pub level: TemplateLevel,
    /// Tunnel or transport mode.
    pub mode: TemplateMode,
}

impl Template {
    /// A required ESP tunnel template.
    ///
    /// # Errors
    /// [`SpecError::MixedEndpoints`] if `src` and `dst` differ in family.
    pub fn new(src: IpAddr, dst: IpAddr, reqid: ReqId) -> Result<Self, SpecError> {
        if !same_family(src, dst) {
            return Err(SpecError::MixedEndpoints { src, dst });
        }
        Ok(Self {
            src,
            dst,
            reqid,
            level: TemplateLevel::Required,
            mode: TemplateMode::Tunnel,
        })
    }
}

/// The identity of a policy in the kernel: selector, direction and mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyId {
    /// Selector.
    pub selector: Selector,
    /// Direction.
    pub dir: Direction,
    /// Mark.
    pub mark: Mark,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy {} dir {}", self.selector, self.dir)?;
        if !self.mark.is_none() {
            write!(f, " mark {}", self.mark)?;
        }
        Ok(())
    }
}

/// A policy (`struct xfrm_userpolicy_info` and templates).
///
/// `ip xfrm policy add src S dst D dir out priority P mark V mask M action allow
/// tmpl src A dst B proto esp reqid R mode tunnel`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolicySpec {
    /// Selector.
    pub selector: Selector,
    /// Direction.
    pub dir: Direction,
    /// Allow or block.
    pub action: Action,
    /// Priority (lower wins).
    pub priority: u32,
    /// Mark.
    pub mark: Mark,
    /// Templates (ESP tunnel); empty for plain allow/block policies.
    pub templates: Vec<Template>,
}

impl PolicySpec {
    /// An allow policy with one template, priority 0, no mark.
    #[must_use]
    pub fn new(selector: Selector, dir: Direction, template: Template) -> Self {
        Self {
            selector,
            dir,
            action: Action::Allow,
            priority: 0,
            mark: Mark::NONE,
            templates: vec![template],
        }
    }

    /// The kernel identity of this policy.
    #[must_use]
    pub const fn id(&self) -> PolicyId {
        PolicyId {
            selector: self.selector,
            dir: self.dir,
            mark: self.mark,
        }
    }
}

/// A policy as the kernel reports it, ours or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPolicy {
    /// Raw direction (socket policies are not listed).
    pub dir: u8,
    /// Kernel index.
    pub index: u32,
    /// Mark.
    pub mark: Mark,
    /// Reqids of all templates (0 = any).
    pub reqids: Vec<u32>,
    /// The typed spec, when nodeseal can describe the policy.
    pub spec: Option<PolicySpec>,
    /// Raw identity (selector bytes, dir, mark) used to detect collisions with foreign policies.
    pub(crate) key: crate::netlink::codec::PolicyKey,
}
