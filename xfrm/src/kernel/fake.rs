//! An in-memory XFRM "kernel" for tests (the idea of aya's `sys/fake.rs`).
//!
//! Every object passes through the real netlink encoder and decoder on its way in, so what the
//! fake stores is what the real kernel would report back. It follows the kernel's semantics
//! where reconcile depends on them: `NEWSA`/`NEWPOLICY` refuse duplicates with `EEXIST`,
//! `UPDSA` changes only lifetimes and the output mark of an existing state, `UPDPOLICY`
//! inserts or atomically replaces, deletes of missing objects fail.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::kernel::{Kernel, KernelError, Op, Reply, TransportError};
use crate::netlink::codec::{self, PolicyKey};
use crate::policy::{Direction, KernelPolicy, PolicySpec, TemplateLevel, TemplateMode};
use crate::selector::Mark;
use crate::state::{KernelState, StateSpec};

type StateKey = (IpAddr, u32, u8, u32, u32);

#[derive(Debug, Default)]
struct Inner {
    states: BTreeMap<StateKey, KernelState>,
    policies: Vec<KernelPolicy>,
    messages: usize,
    no_aead: bool,
}

/// A cheap-clone handle to one fake kernel; clones share the same tables.
#[derive(Debug, Clone, Default)]
pub struct FakeKernel {
    inner: Arc<Mutex<Inner>>,
}

impl FakeKernel {
    /// An empty kernel.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread poisons the lock; the tables are still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes every state add fail like a kernel without the AEAD transform.
    pub fn refuse_aead(&self, refuse: bool) {
        self.lock().no_aead = refuse;
    }

    /// Puts a state in place directly, as other software would (may be any shape).
    pub fn insert_state(&self, state: KernelState) {
        let key = (
            state.dst,
            state.spi,
            state.proto,
            state.mark.value,
            state.mark.mask,
        );
        self.lock().states.insert(key, state);
    }

    /// All states.
    #[must_use]
    pub fn states(&self) -> Vec<KernelState> {
        self.lock().states.values().cloned().collect()
    }

    /// All policies.
    #[must_use]
    pub fn policies(&self) -> Vec<KernelPolicy> {
        self.lock().policies.clone()
    }

    /// How many requests (netlink messages) were submitted so far.
    #[must_use]
    pub fn messages(&self) -> usize {
        self.lock().messages
    }
}

fn through_codec_state(spec: &StateSpec) -> Result<KernelState, KernelError> {
    let mut buf = Vec::new();
    codec::encode_state(&mut buf, codec::XFRM_MSG_NEWSA, 1, spec);
    let msg = codec::messages(&buf).next();
    msg.and_then(|m| codec::decode_state(m.payload).ok())
        .ok_or_else(|| KernelError::new(libc::EINVAL, None, &Op::AddState(spec.clone())))
}

fn through_codec_policy(spec: &PolicySpec) -> Result<KernelPolicy, KernelError> {
    let mut buf = Vec::new();
    codec::encode_policy(&mut buf, codec::XFRM_MSG_NEWPOLICY, 1, spec);
    let msg = codec::messages(&buf).next();
    msg.and_then(|m| codec::decode_policy(m.payload).ok())
        .ok_or_else(|| KernelError::new(libc::EINVAL, None, &Op::AddPolicy(spec.clone())))
}

const fn state_key(dst: IpAddr, spi: u32, mark: Mark) -> StateKey {
    (dst, spi, 50, mark.value, mark.mask)
}

impl Inner {
    fn apply(&mut self, op: &Op) -> Result<Reply, KernelError> {
        let err = |errno: i32, msg: Option<&str>| KernelError::new(errno, msg.map(Into::into), op);
        match op {
            Op::AddState(spec) => {
                if self.no_aead {
                    return Err(err(
                        libc::ENOSYS,
                        Some("Requested AEAD algorithm not found"),
                    ));
                }
                let key = state_key(spec.dst, spec.spi.get(), spec.mark);
                if self.states.contains_key(&key) {
                    return Err(err(libc::EEXIST, None));
                }
                let state = through_codec_state(spec)?;
                self.states.insert(key, state);
                Ok(Reply::Done)
            }
            Op::UpdateState(spec) => {
                let key = state_key(spec.dst, spec.spi.get(), spec.mark);
                let Some(cur) = self.states.get_mut(&key) else {
                    return Err(err(libc::ESRCH, None));
                };
                let new = through_codec_state(spec)?;
                if let (Some(cur), Some(new)) = (cur.spec.as_mut(), new.spec) {
                    cur.lifetime = new.lifetime;
                    if !new.output_mark.is_none() {
                        cur.output_mark = new.output_mark;
                    }
                }
                Ok(Reply::Done)
            }
            Op::DeleteState(id) => self
                .states
                .remove(&state_key(id.dst, id.spi.get(), id.mark))
                .map(|_| Reply::Done)
                .ok_or_else(|| err(libc::ESRCH, None)),
            Op::GetState(id) => self
                .states
                .get(&state_key(id.dst, id.spi.get(), id.mark))
                .map(|s| Reply::State(Box::new(s.clone())))
                .ok_or_else(|| err(libc::ESRCH, None)),
            Op::DumpStates => Ok(Reply::States(self.states.values().cloned().collect())),
            Op::AddPolicy(spec) | Op::UpdatePolicy(spec) => {
                // As Linux's `validate_tmpl` does (seen on 6.12).
                let optional_tunnel = spec
                    .templates
                    .iter()
                    .any(|t| t.level == TemplateLevel::Optional && t.mode == TemplateMode::Tunnel);
                if spec.dir == Direction::Out && optional_tunnel {
                    return Err(err(
                        libc::EINVAL,
                        Some("Mode in optional template not allowed in outbound policy"),
                    ));
                }
                let new = through_codec_policy(spec)?;
                match self.policies.iter_mut().find(|p| p.key == new.key) {
                    Some(_) if matches!(op, Op::AddPolicy(_)) => Err(err(libc::EEXIST, None)),
                    Some(cur) => {
                        *cur = KernelPolicy {
                            index: cur.index,
                            ..new
                        };
                        Ok(Reply::Done)
                    }
                    None => {
                        let index = u32::try_from(self.policies.len()).unwrap_or(u32::MAX) * 8
                            + u32::from(new.dir);
                        self.policies.push(KernelPolicy { index, ..new });
                        Ok(Reply::Done)
                    }
                }
            }
            Op::DeletePolicy(id) => {
                let key = PolicyKey::of(id);
                let before = self.policies.len();
                self.policies.retain(|p| p.key != key);
                if self.policies.len() == before {
                    return Err(err(libc::ENOENT, None));
                }
                Ok(Reply::Done)
            }
            Op::GetPolicy(id) => {
                let key = PolicyKey::of(id);
                self.policies
                    .iter()
                    .find(|p| p.key == key)
                    .map(|p| Reply::Policy(Box::new(p.clone())))
                    .ok_or_else(|| err(libc::ENOENT, None))
            }
            Op::DumpPolicies => Ok(Reply::Policies(self.policies.clone())),
            Op::SetPolicyHashThresholds { .. } => Ok(Reply::Done),
        }
    }
}

impl Kernel for FakeKernel {
    fn submit(&mut self, ops: &[Op]) -> Result<Vec<Result<Reply, KernelError>>, TransportError> {
        let mut inner = self.lock();
        inner.messages += ops.len();
        Ok(ops.iter().map(|op| inner.apply(op)).collect())
    }
}
