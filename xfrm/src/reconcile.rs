//! Ownership and reconcile: make the kernel's nodeseal objects equal a desired set, touching
//! nothing else.
//!
//! An object is nodeseal's when [`Ownership`] says so: states by reqid range (and mark bits, if
//! configured); policies by the reqids of their templates (all in range), or, for template-less
//! allow/block policies, by mark bits. Everything else is foreign and is never changed or
//! deleted; a desired object that would collide with a foreign one is an error, not an
//! overwrite.
//!
//! The plan is minimal: equal objects are left alone; states that differ only in lifetimes or
//! output mark are updated in place (`UPDSA`); states that differ in anything the kernel cannot
//! change in place (key, selector, replay) are deleted and re-added; policies are atomically
//! replaced (`UPDPOLICY`). New states go in before policies change and old ones go last
//! (make-before-break). Reconciling twice in a row sends nothing the second time.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use crate::handle::{BatchError, BatchFailure, Handle, XfrmError};
use crate::kernel::{ObjectRef, Op, Reply};
use crate::netlink::codec::PolicyKey;
use crate::policy::{KernelPolicy, PolicySpec};
use crate::selector::Mark;
use crate::state::{KernelState, ReqId, SpecError, StateSpec};

/// Which kernel objects are nodeseal's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    reqids: RangeInclusive<u32>,
    mark_bits: Option<Mark>,
}

impl Ownership {
    /// Objects whose reqids lie in `reqids` are ours.
    #[must_use]
    pub fn new(reqids: RangeInclusive<ReqId>) -> Self {
        Self {
            reqids: reqids.start().get()..=reqids.end().get(),
            mark_bits: None,
        }
    }

    /// Additionally require that an object's mark compares `bits.mask` and equals `bits.value`
    /// there; also claims template-less policies with such marks.
    #[must_use]
    pub const fn with_mark_bits(mut self, bits: Mark) -> Self {
        self.mark_bits = Some(bits);
        self
    }

    fn mark_ok(&self, mark: Mark) -> bool {
        self.mark_bits.is_none_or(|bits| mark.contains_bits(bits))
    }

    fn owns_parts(&self, reqids: &[u32], mark: Mark, proto_esp: bool) -> bool {
        if !proto_esp || !self.mark_ok(mark) {
            return false;
        }
        if reqids.is_empty() {
            return self.mark_bits.is_some();
        }
        reqids.iter().all(|r| self.reqids.contains(r))
    }

    /// Whether a kernel state is ours.
    #[must_use]
    pub fn owns_state(&self, s: &KernelState) -> bool {
        s.reqid != 0 && self.owns_parts(&[s.reqid], s.mark, s.proto == 50)
    }

    /// Whether a kernel policy is ours.
    #[must_use]
    pub fn owns_policy(&self, p: &KernelPolicy) -> bool {
        self.owns_parts(&p.reqids, p.mark, true)
    }

    fn owns_state_spec(&self, s: &StateSpec) -> bool {
        self.owns_parts(&[s.reqid.get()], s.mark, true)
    }

    fn owns_policy_spec(&self, p: &PolicySpec) -> bool {
        let reqids: Vec<u32> = p.templates.iter().map(|t| t.reqid.get()).collect();
        self.owns_parts(&reqids, p.mark, true)
    }
}

/// The complete set of objects nodeseal wants in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// States.
    pub states: Vec<StateSpec>,
    /// Policies.
    pub policies: Vec<PolicySpec>,
}

/// Errors of [`reconcile`] and [`plan`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// A desired object would not count as ours, so the next run would not recognise it.
    #[error("desired {object} is outside the ownership rule (reqid range / mark bits)")]
    NotOwned {
        /// The object.
        object: ObjectRef,
    },
    /// A desired object has the identity of a foreign object, which we never replace.
    #[error("desired {object} collides with a foreign object")]
    ForeignConflict {
        /// The object.
        object: ObjectRef,
    },
    /// The same object is desired twice.
    #[error("{object} is desired twice")]
    Duplicate {
        /// The object.
        object: ObjectRef,
    },
    /// A desired state is invalid.
    #[error("invalid desired {object}")]
    Spec {
        /// The object.
        object: ObjectRef,
        /// What is wrong.
        #[source]
        source: SpecError,
    },
    /// Reading or writing the kernel failed.
    #[error("reconcile")]
    Xfrm(#[from] XfrmError),
}

/// What a reconcile did (or, from [`plan`], will do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// States added.
    pub states_added: usize,
    /// States updated in place.
    pub states_updated: usize,
    /// States deleted and re-added with the same id.
    pub states_replaced: usize,
    /// States deleted.
    pub states_deleted: usize,
    /// Policies added.
    pub policies_added: usize,
    /// Policies atomically replaced.
    pub policies_updated: usize,
    /// Policies deleted.
    pub policies_deleted: usize,
    /// Objects already as desired.
    pub unchanged: usize,
    /// Foreign states seen (left alone).
    pub foreign_states: usize,
    /// Foreign policies seen (left alone).
    pub foreign_policies: usize,
}

impl ReconcileReport {
    /// Whether nothing had to change.
    #[must_use]
    pub const fn is_noop(&self) -> bool {
        self.states_added
            + self.states_updated
            + self.states_replaced
            + self.states_deleted
            + self.policies_added
            + self.policies_updated
            + self.policies_deleted
            == 0
    }
}

type StateKey = (IpAddr, u32, Mark);

/// Computes the ordered requests that turn `current` into `desired`.
///
/// # Errors
/// [`ReconcileError`] if the desired set is inconsistent or collides with foreign objects.
pub fn plan(
    owner: &Ownership,
    desired: Desired,
    current_states: &[KernelState],
    current_policies: &[KernelPolicy],
) -> Result<(Vec<Op>, ReconcileReport), ReconcileError> {
    let mut report = ReconcileReport::default();
    let mut ours_s: HashMap<StateKey, &KernelState> = HashMap::new();
    let mut foreign_s: HashSet<StateKey> = HashSet::new();
    for s in current_states {
        if owner.owns_state(s) {
            ours_s.insert((s.dst, s.spi, s.mark), s);
        } else {
            report.foreign_states += 1;
            if s.proto == 50 {
                foreign_s.insert((s.dst, s.spi, s.mark));
            }
        }
    }
    let mut ours_p: HashMap<PolicyKey, &KernelPolicy> = HashMap::new();
    let mut foreign_p: HashSet<PolicyKey> = HashSet::new();
    for p in current_policies {
        if owner.owns_policy(p) {
            ours_p.insert(p.key, p);
        } else {
            report.foreign_policies += 1;
            foreign_p.insert(p.key);
        }
    }

    let mut add_states = Vec::new();
    let mut policy_ops = Vec::new();
    let mut delete_states = Vec::new();
    let mut seen_s = HashSet::new();
    for spec in desired.states {
        let object = ObjectRef::State(spec.id());
        spec.validate()
            .map_err(|source| ReconcileError::Spec { object, source })?;
        if !owner.owns_state_spec(&spec) {
            return Err(ReconcileError::NotOwned { object });
        }
        let key = (spec.dst, spec.spi.get(), spec.mark);
        if !seen_s.insert(key) {
            return Err(ReconcileError::Duplicate { object });
        }
        if foreign_s.contains(&key) {
            return Err(ReconcileError::ForeignConflict { object });
        }
        match ours_s.remove(&key).map(|k| k.spec.as_ref()) {
            None => {
                report.states_added += 1;
                add_states.push(Op::AddState(spec));
            }
            Some(Some(cur)) if *cur == spec => report.unchanged += 1,
            Some(Some(cur)) if cur.updatable_to(&spec) => {
                report.states_updated += 1;
                add_states.push(Op::UpdateState(spec));
            }
            Some(_) => {
                report.states_replaced += 1;
                add_states.push(Op::DeleteState(spec.id()));
                add_states.push(Op::AddState(spec));
            }
        }
    }
    let mut seen_p = HashSet::new();
    for spec in desired.policies {
        let object = ObjectRef::Policy(spec.id());
        if !owner.owns_policy_spec(&spec) {
            return Err(ReconcileError::NotOwned { object });
        }
        let key = PolicyKey::of(&spec.id());
        if !seen_p.insert(key) {
            return Err(ReconcileError::Duplicate { object });
        }
        if foreign_p.contains(&key) {
            return Err(ReconcileError::ForeignConflict { object });
        }
        match ours_p.remove(&key) {
            None => {
                report.policies_added += 1;
                policy_ops.push(Op::AddPolicy(spec));
            }
            Some(cur) if cur.spec.as_ref() == Some(&spec) => report.unchanged += 1,
            Some(_) => {
                report.policies_updated += 1;
                policy_ops.push(Op::UpdatePolicy(spec));
            }
        }
    }
    let mut stale_p: Vec<_> = ours_p.into_values().collect();
    stale_p.sort_by_key(|p| p.index);
    for p in stale_p {
        match p.spec.as_ref() {
            Some(spec) => {
                report.policies_deleted += 1;
                policy_ops.push(Op::DeletePolicy(spec.id()));
            }
            // Ours by reqid but its selector is not expressible as a `PolicyId` (e.g. an
            // interface-bound selector nodeseal never writes): left alone and counted as foreign.
            None => report.foreign_policies += 1,
        }
    }
    for s in ours_s.into_values() {
        match s.spec.as_ref() {
            Some(spec) => {
                report.states_deleted += 1;
                delete_states.push(Op::DeleteState(spec.id()));
            }
            None => match crate::state::Spi::new(s.spi) {
                Ok(spi) => {
                    report.states_deleted += 1;
                    delete_states.push(Op::DeleteState(crate::state::StateId {
                        dst: s.dst,
                        spi,
                        mark: s.mark,
                    }));
                }
                Err(_) => report.foreign_states += 1,
            },
        }
    }
    let mut ops = add_states;
    ops.append(&mut policy_ops);
    ops.append(&mut delete_states);
    Ok((ops, report))
}

/// Dumps the kernel, plans the minimal change to reach `desired` and applies it in one batch.
///
/// # Errors
/// Planning errors before anything is sent; [`XfrmError::Batch`] naming each refused object.
pub async fn reconcile(
    handle: &Handle,
    owner: &Ownership,
    desired: Desired,
) -> Result<ReconcileReport, ReconcileError> {
    let (states, policies) = dump_both(handle).await?;
    let (ops, report) = plan(owner, desired, &states, &policies)?;
    apply(handle, ops).await?;
    Ok(report)
}

/// Deletes every object [`Ownership`] claims, and nothing else. Returns how many were deleted.
///
/// # Errors
/// As for [`reconcile`].
pub async fn flush_owned(handle: &Handle, owner: &Ownership) -> Result<usize, ReconcileError> {
    let (states, policies) = dump_both(handle).await?;
    let (ops, report) = plan(owner, Desired::default(), &states, &policies)?;
    apply(handle, ops).await?;
    Ok(report.states_deleted + report.policies_deleted)
}

async fn dump_both(handle: &Handle) -> Result<(Vec<KernelState>, Vec<KernelPolicy>), XfrmError> {
    let mut results = handle
        .submit(vec![Op::DumpStates, Op::DumpPolicies])
        .await?;
    let policies = results.pop();
    let states = results.pop();
    match (states, policies) {
        (Some(Ok(Reply::States(s))), Some(Ok(Reply::Policies(p)))) => Ok((s, p)),
        (Some(Err(source)), _) => Err(XfrmError::Kernel {
            verb: "dump",
            object: ObjectRef::AllStates,
            source,
        }),
        (_, Some(Err(source))) => Err(XfrmError::Kernel {
            verb: "dump",
            object: ObjectRef::AllPolicies,
            source,
        }),
        _ => Err(XfrmError::UnexpectedReply {
            verb: "dump",
            object: ObjectRef::AllStates,
        }),
    }
}

async fn apply(handle: &Handle, ops: Vec<Op>) -> Result<(), XfrmError> {
    if ops.is_empty() {
        return Ok(());
    }
    let total = ops.len();
    let objects: Vec<_> = ops.iter().map(|o| (o.verb(), o.object())).collect();
    let results = handle.submit(ops).await?;
    let failures: Vec<_> = results
        .into_iter()
        .zip(objects)
        .filter_map(|(r, (verb, object))| {
            r.err().map(|error| BatchFailure {
                verb,
                object,
                error,
            })
        })
        .collect();
    if failures.is_empty() {
        return Ok(());
    }
    Err(BatchError { total, failures }.into())
}
