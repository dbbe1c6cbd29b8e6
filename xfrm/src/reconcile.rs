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
//!
//! [`sweep`] is the variant for live keys: it never adds, updates or replaces a state. A state
//! whose keys carry traffic must not be written again with the same key: a re-added ESP state
//! starts its sequence numbers, from which AES-GCM's IVs derive, from 1 again, and a state the
//! kernel deleted at its hard limit must stay deleted. So a sweep only removes what is not
//! desired, and reports desired states that are missing or differ instead of rewriting them.

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
    endpoint: Option<IpAddr>,
}

impl Ownership {
    /// Objects whose reqids lie in `reqids` are ours.
    #[must_use]
    pub fn new(reqids: RangeInclusive<ReqId>) -> Self {
        Self {
            reqids: reqids.start().get()..=reqids.end().get(),
            mark_bits: None,
            endpoint: None,
        }
    }

    /// Additionally require that an object's mark compares `bits.mask` and equals `bits.value`
    /// there; also claims template-less policies with such marks.
    #[must_use]
    pub const fn with_mark_bits(mut self, bits: Mark) -> Self {
        self.mark_bits = Some(bits);
        self
    }

    /// Narrows the rule to the tunnel with one remote end: states from or to `endpoint`,
    /// policies with a template from or to it. Reconciling or flushing with it touches one
    /// peer's objects; everything else (other peers' included) counts as foreign and is left
    /// alone. States and policies the crate cannot describe carry no addresses to match, so they
    /// fall outside such a rule.
    #[must_use]
    pub const fn with_endpoint(mut self, endpoint: IpAddr) -> Self {
        self.endpoint = Some(endpoint);
        self
    }

    fn state_in_scope(&self, spec: Option<&StateSpec>) -> bool {
        self.endpoint
            .is_none_or(|ip| spec.is_some_and(|s| s.src == ip || s.dst == ip))
    }

    fn policy_in_scope(&self, spec: Option<&PolicySpec>) -> bool {
        self.endpoint.is_none_or(|ip| {
            spec.is_some_and(|p| p.templates.iter().any(|t| t.src == ip || t.dst == ip))
        })
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
        s.reqid != 0
            && self.owns_parts(&[s.reqid], s.mark, s.proto == 50)
            && self.state_in_scope(s.spec.as_ref())
    }

    /// Whether a kernel policy is ours.
    #[must_use]
    pub fn owns_policy(&self, p: &KernelPolicy) -> bool {
        self.owns_parts(&p.reqids, p.mark, true) && self.policy_in_scope(p.spec.as_ref())
    }

    fn owns_state_spec(&self, s: &StateSpec) -> bool {
        self.owns_parts(&[s.reqid.get()], s.mark, true) && self.state_in_scope(Some(s))
    }

    fn owns_policy_spec(&self, p: &PolicySpec) -> bool {
        let reqids: Vec<u32> = p.templates.iter().map(|t| t.reqid.get()).collect();
        self.owns_parts(&reqids, p.mark, true) && self.policy_in_scope(Some(p))
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
    /// ([`sweep`] only) desired states absent from the kernel, or different there, left as
    /// they are.
    pub states_left: usize,
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
    plan_with(
        owner,
        desired,
        current_states,
        current_policies,
        StateWrites::Allowed,
    )
}

/// Whether a plan may write states (see [`sweep`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum StateWrites {
    Allowed,
    Never,
}

fn plan_with(
    owner: &Ownership,
    desired: Desired,
    current_states: &[KernelState],
    current_policies: &[KernelPolicy],
    state_writes: StateWrites,
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
        let current = ours_s.remove(&key).map(|k| k.spec.as_ref());
        if state_writes == StateWrites::Never {
            match current {
                Some(Some(cur)) if *cur == spec => report.unchanged += 1,
                _ => report.states_left += 1,
            }
            continue;
        }
        match current {
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

/// Like [`reconcile`], except that states are only ever deleted: the owned states not in
/// `desired` go; desired states that are missing or differ are left as they are and counted in
/// [`ReconcileReport::states_left`] (see the module docs for why). Policies converge as in
/// [`reconcile`].
///
/// # Errors
/// As for [`reconcile`].
pub async fn sweep(
    handle: &Handle,
    owner: &Ownership,
    desired: Desired,
) -> Result<ReconcileReport, ReconcileError> {
    let (states, policies) = dump_both(handle).await?;
    let (ops, report) = plan_with(owner, desired, &states, &policies, StateWrites::Never)?;
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
            object: Box::new(ObjectRef::AllStates),
            source,
        }),
        (_, Some(Err(source))) => Err(XfrmError::Kernel {
            verb: "dump",
            object: Box::new(ObjectRef::AllPolicies),
            source,
        }),
        _ => Err(XfrmError::UnexpectedReply {
            verb: "dump",
            object: Box::new(ObjectRef::AllStates),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::KernelErrorKind;
    use crate::policy::{Action, Direction, PolicySpec};
    use crate::selector::Selector;
    use crate::state::{Aead, AeadAlgorithm, Lifetime, Limits, Spi, StateStats};
    use crate::test_helpers::{FakeKernel, IN_MARK, mesh, node_ip, ownership, peer_objects, reqid};

    fn setup() -> (FakeKernel, Handle) {
        let fake = FakeKernel::new();
        (fake.clone(), Handle::with_kernel(fake))
    }

    /// A foreign ESP state (reqid 1) and policy, plus a non-ESP-tunnel foreign state.
    async fn add_foreign(handle: &Handle, fake: &FakeKernel) -> (usize, usize) {
        let (mut s, mut p) = peer_objects(0, 9000, 1);
        s[0].reqid = ReqId::new(1).unwrap();
        p[0].templates[0].reqid = ReqId::new(1).unwrap();
        p[0].priority = 7;
        handle.states().add(s[0].clone()).execute().await.unwrap();
        handle.policies().add(p[0].clone()).execute().await.unwrap();
        fake.insert_state(KernelState {
            dst: "192.0.2.1".parse().unwrap(),
            spi: 0x10,
            proto: 51, // AH, transport: not describable, not ours
            reqid: REQID_IN_RANGE,
            mark: Mark::NONE,
            spec: None,
            stats: StateStats::default(),
        });
        (fake.states().len(), fake.policies().len())
    }

    const REQID_IN_RANGE: u32 = crate::test_helpers::REQID_BASE + 5;

    #[tokio::test]
    async fn reconcile_is_minimal_and_idempotent() {
        let (fake, handle) = setup();
        let owner = ownership();
        let r = reconcile(&handle, &owner, mesh(0, 20, |_| 1))
            .await
            .unwrap();
        assert_eq!((r.states_added, r.policies_added), (40, 60));
        assert_eq!((fake.states().len(), fake.policies().len()), (40, 60));

        let before = fake.messages();
        let r = reconcile(&handle, &owner, mesh(0, 20, |_| 1))
            .await
            .unwrap();
        assert!(r.is_noop(), "{r:?}");
        assert_eq!(r.unchanged, 100);
        assert_eq!(
            fake.messages() - before,
            2,
            "second run sends only the two dumps"
        );
    }

    #[tokio::test]
    async fn rekey_lifetime_key_and_policy_changes_plan_the_right_ops() {
        let (fake, handle) = setup();
        let owner = ownership();
        reconcile(&handle, &owner, mesh(0, 10, |_| 1))
            .await
            .unwrap();

        // Peer 3 rekeys (new SPIs), peer 10 leaves.
        let mut d = mesh(0, 9, |p| if p == 3 { 2 } else { 1 });
        // Peer 4: lifetime change on the IN state -> update in place.
        let lft = Lifetime {
            soft: Limits::default(),
            hard: Limits {
                add_seconds: Some(3600),
                ..Limits::default()
            },
        };
        let in4 = d
            .states
            .iter_mut()
            .find(|s| s.reqid == reqid(4) && s.mark == IN_MARK)
            .unwrap();
        in4.lifetime = lft;
        // Peer 5: same SPI, different key -> delete + add.
        let out5 = d
            .states
            .iter_mut()
            .find(|s| s.reqid == reqid(5) && s.mark != IN_MARK)
            .unwrap();
        out5.aead = Aead::new(AeadAlgorithm::AesGcm128, &[9; 20]).unwrap();
        let new_key5 = out5.clone();
        // Peer 6: policy priority change -> atomic replace.
        let pol6 = d
            .policies
            .iter_mut()
            .find(|p| p.templates[0].reqid == reqid(6))
            .unwrap();
        pol6.priority = 10;

        let r = reconcile(&handle, &owner, d.clone()).await.unwrap();
        assert_eq!(
            r,
            ReconcileReport {
                states_added: 2,
                states_updated: 1,
                states_replaced: 1,
                states_deleted: 2 + 2,
                policies_added: 0,
                policies_updated: 1,
                policies_deleted: 3,
                unchanged: 2 * 9 - 2 - 2 + 3 * 9 - 1,
                foreign_states: 0,
                foreign_policies: 0,
                states_left: 0,
            }
        );
        let states = fake.states();
        let in4k = states
            .iter()
            .find(|s| s.reqid == reqid(4).get() && s.mark == IN_MARK)
            .unwrap();
        assert_eq!(in4k.spec.as_ref().unwrap().lifetime, lft);
        assert!(states.iter().any(|s| s.spec.as_ref() == Some(&new_key5)));
        assert!(reconcile(&handle, &owner, d).await.unwrap().is_noop());
    }

    #[tokio::test]
    async fn a_sweep_deletes_what_is_not_desired_and_never_writes_a_state() {
        let (fake, handle) = setup();
        let owner = ownership();
        reconcile(&handle, &owner, mesh(0, 4, |_| 1)).await.unwrap();
        let mut desired = mesh(0, 3, |_| 1);
        // One desired state the kernel lost (deleted at its hard limit, say) ...
        let lost = desired.states[0].clone();
        handle.states().delete(lost.id()).execute().await.unwrap();
        // ... and one whose key differs from the kernel's.
        let differing = &mut desired.states[1];
        differing.aead = Aead::new(AeadAlgorithm::AesGcm128, &[9; 20]).unwrap();
        let differing_id = differing.id();
        let before: Vec<_> = fake.states();

        let r = sweep(&handle, &owner, desired).await.unwrap();
        assert_eq!(r.states_left, 2, "{r:?}");
        assert_eq!(
            (r.states_added, r.states_updated, r.states_replaced),
            (0, 0, 0)
        );
        assert_eq!(
            (r.states_deleted, r.policies_deleted),
            (2, 3),
            "peer 4 goes"
        );
        let after = fake.states();
        assert!(
            !after.iter().any(|s| s.spi == lost.spi.get()),
            "not re-added"
        );
        let kept = |states: &[KernelState]| {
            states
                .iter()
                .find(|s| s.spi == differing_id.spi.get() && s.dst == differing_id.dst)
                .and_then(|s| s.spec.clone())
        };
        assert_eq!(kept(&after), kept(&before), "not rewritten");
        assert_eq!(after.len(), 2 * 3 - 1);
    }

    #[tokio::test]
    async fn foreign_objects_are_never_touched() {
        let (fake, handle) = setup();
        let owner = ownership();
        let (fs, fp) = add_foreign(&handle, &fake).await;
        let foreign_states: Vec<_> = fake.states();
        let foreign_policies: Vec<_> = fake.policies();
        let r = reconcile(&handle, &owner, mesh(0, 5, |_| 1)).await.unwrap();
        assert_eq!((r.foreign_states, r.foreign_policies), (fs, fp));
        let r = reconcile(&handle, &owner, Desired::default())
            .await
            .unwrap();
        assert_eq!(r.states_deleted, 10);
        assert_eq!(fake.states(), foreign_states);
        assert_eq!(fake.policies(), foreign_policies);
        reconcile(&handle, &owner, mesh(0, 5, |_| 1)).await.unwrap();
        assert_eq!(flush_owned(&handle, &owner).await.unwrap(), 25);
        assert_eq!(fake.states(), foreign_states);
        assert_eq!(fake.policies(), foreign_policies);
    }

    #[tokio::test]
    async fn collisions_and_unowned_desires_are_refused_before_sending() {
        let (fake, handle) = setup();
        let owner = ownership();
        add_foreign(&handle, &fake).await;
        let before = fake.messages();
        // Same identity as the foreign policy (selector, dir, mark) but our reqid.
        let (_, p) = peer_objects(0, 9000, 1);
        let d = Desired {
            states: vec![],
            policies: vec![p[0].clone()],
        };
        let e = reconcile(&handle, &owner, d).await.unwrap_err();
        assert!(matches!(e, ReconcileError::ForeignConflict { .. }), "{e}");
        // A state with a reqid outside the range.
        let (mut s, _) = peer_objects(0, 1, 1);
        s[0].reqid = ReqId::new(2).unwrap();
        let d = Desired {
            states: vec![s[0].clone()],
            policies: vec![],
        };
        let e = reconcile(&handle, &owner, d).await.unwrap_err();
        assert!(matches!(e, ReconcileError::NotOwned { .. }), "{e}");
        let (s, _) = peer_objects(0, 1, 1);
        let d = Desired {
            states: vec![s[0].clone(), s[0].clone()],
            policies: vec![],
        };
        let e = reconcile(&handle, &owner, d).await.unwrap_err();
        assert!(matches!(e, ReconcileError::Duplicate { .. }), "{e}");
        assert_eq!(fake.messages() - before, 6, "only dumps were sent");
    }

    #[tokio::test]
    async fn an_endpoint_scope_touches_one_peer_only() {
        let (fake, handle) = setup();
        let owner = ownership();
        reconcile(&handle, &owner, mesh(0, 3, |_| 1)).await.unwrap();
        let (fs, fp) = (fake.states(), fake.policies());
        let peer2 = owner.clone().with_endpoint(node_ip(2));
        // Peer 2 rekeyed: its new epoch replaces the old one; peers 1 and 3 count as foreign.
        let (s, p) = peer_objects(0, 2, 2);
        let r = reconcile(
            &handle,
            &peer2,
            Desired {
                states: s,
                policies: p,
            },
        )
        .await
        .unwrap();
        assert_eq!((r.states_added, r.states_deleted), (2, 2));
        assert_eq!((r.foreign_states, r.foreign_policies), (4, 6));
        // A desired object of another peer is outside the scope.
        let (s1, _) = peer_objects(0, 1, 1);
        let d = Desired {
            states: s1,
            policies: vec![],
        };
        let e = reconcile(&handle, &peer2, d).await.unwrap_err();
        assert!(matches!(e, ReconcileError::NotOwned { .. }), "{e}");
        assert_eq!(flush_owned(&handle, &peer2).await.unwrap(), 5);
        let others =
            |ip| move |s: &KernelState| s.spec.as_ref().is_some_and(|x| x.dst != ip && x.src != ip);
        assert_eq!(
            fake.states(),
            fs.into_iter()
                .filter(others(node_ip(2)))
                .collect::<Vec<_>>()
        );
        assert_eq!(fake.policies().len(), fp.len() - 3);
    }

    #[tokio::test]
    async fn mark_bits_claim_template_less_policies() {
        let (fake, handle) = setup();
        let bits = Mark::new(0x0e00, 0x0f00);
        let owner = ownership().with_mark_bits(bits);
        let block = PolicySpec {
            selector: Selector::new("10.0.0.0/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap())
                .unwrap(),
            dir: Direction::Out,
            action: Action::Block,
            priority: 100,
            mark: Mark::new(0x0e00, 0xff00),
            templates: vec![],
        };
        let mut foreign_block = block.clone();
        foreign_block.mark = Mark::new(0x0100, 0xff00);
        handle
            .policies()
            .add(foreign_block)
            .execute()
            .await
            .unwrap();
        let d = Desired {
            states: vec![],
            policies: vec![block],
        };
        let r = reconcile(&handle, &owner, d).await.unwrap();
        assert_eq!((r.policies_added, r.foreign_policies), (1, 1));
        assert_eq!(flush_owned(&handle, &owner).await.unwrap(), 1);
        assert_eq!(fake.policies().len(), 1);
    }

    #[tokio::test]
    async fn batch_failures_name_each_object_and_missing_modules() {
        let (fake, handle) = setup();
        fake.refuse_aead(true);
        let e = reconcile(&handle, &ownership(), mesh(0, 2, |_| 1))
            .await
            .unwrap_err();
        let ReconcileError::Xfrm(XfrmError::Batch(b)) = e else {
            panic!("{e:?}")
        };
        assert_eq!((b.total, b.failures.len()), (10, 4));
        let (s, _) = peer_objects(0, 1, 1);
        assert_eq!(b.failures[0].object, ObjectRef::State(s[0].id()));
        assert!(matches!(
            &b.failures[0].error.kind,
            KernelErrorKind::MissingSupport { modules } if modules.contains(&"esp4")
        ));
        let text = b.to_string();
        assert!(
            text.contains("4 of 10") && text.contains("spi") && text.contains("esp4"),
            "{text}"
        );
        // The policies of the same batch were applied.
        assert_eq!(fake.policies().len(), 6);
    }

    #[tokio::test]
    async fn handle_requests_round_trip_through_the_seam() {
        let (_fake, handle) = setup();
        let (s, p) = peer_objects(0, 1, 1);
        handle.states().add(s[0].clone()).execute().await.unwrap();
        let e = handle
            .states()
            .add(s[0].clone())
            .execute()
            .await
            .unwrap_err();
        assert_eq!(e.kernel_error().unwrap().kind, KernelErrorKind::Exists);
        let got = handle.states().get(s[0].id()).execute().await.unwrap();
        assert_eq!(got.spec.as_ref(), Some(&s[0]));
        handle
            .policies()
            .update(p[0].clone())
            .execute()
            .await
            .unwrap();
        let got = handle.policies().get(p[0].id()).execute().await.unwrap();
        assert_eq!(got.spec.as_ref(), Some(&p[0]));
        handle.policies().delete(p[0].id()).execute().await.unwrap();
        handle.states().delete(s[0].id()).execute().await.unwrap();
        let e = handle
            .states()
            .delete(s[0].id())
            .execute()
            .await
            .unwrap_err();
        assert_eq!(e.kernel_error().unwrap().kind, KernelErrorKind::NotFound);
        assert!(handle.states().dump().execute().await.unwrap().is_empty());
        let mut bad = s[1].clone();
        bad.replay_window = u32::MAX;
        let e = handle
            .states()
            .add(bad.clone())
            .execute()
            .await
            .unwrap_err();
        assert!(matches!(e, XfrmError::Spec { .. }), "{e}");
        bad.replay_window = 0;
        let e = handle.states().add(bad).execute().await.unwrap_err();
        assert!(
            matches!(
                &e,
                XfrmError::Spec {
                    source: SpecError::EsnWithoutReplayWindow,
                    ..
                }
            ),
            "{e}"
        );
        let _ = Spi::new(300).unwrap();
    }
}
