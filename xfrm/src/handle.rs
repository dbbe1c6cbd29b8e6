//! [`Handle`]: the rtnetlink-style entry point. Requests are built from `states()` /
//! `policies()` and finish with `.execute().await`.
//!
//! Netlink calls block, so the socket lives on one dedicated worker thread (which is also the
//! only thread that ever enters another network namespace); requests reach it over a channel
//! and answers come back on a oneshot, so async callers never block a runtime thread and
//! blocking callers can use any runtime. The worker ends when the last `Handle` clone drops.

use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::kernel::{Kernel, KernelError, ObjectRef, Op, Reply, TransportError};
use crate::netlink::NetlinkKernel;
use crate::policy::{KernelPolicy, PolicyId, PolicySpec};
use crate::spd::{FamilyThresholds, PolicyHashThresholds};
use crate::state::{KernelState, SpecError, StateId, StateSpec};

/// Errors of [`Handle`] requests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XfrmError {
    /// The netlink exchange failed.
    #[error("xfrm netlink transport")]
    Transport(#[from] TransportError),
    /// The kernel refused the request.
    #[error("cannot {verb} {object}")]
    Kernel {
        /// `add`, `update`, `delete`, `get`, `dump`.
        verb: &'static str,
        /// The object.
        object: Box<ObjectRef>,
        /// What the kernel said.
        #[source]
        source: KernelError,
    },
    /// Some requests of a batch were refused; the others were applied.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// The spec is invalid.
    #[error("invalid {object}")]
    Spec {
        /// The object.
        object: Box<ObjectRef>,
        /// What is wrong.
        #[source]
        source: SpecError,
    },
    /// The worker thread could not be started or has gone away.
    #[error("xfrm worker thread is not running")]
    WorkerGone,
    /// BUG: the kernel seam answered with the wrong kind of reply.
    #[error("BUG: unexpected reply to {verb} {object}")]
    UnexpectedReply {
        /// The request verb.
        verb: &'static str,
        /// The object.
        object: Box<ObjectRef>,
    },
}

impl XfrmError {
    /// The kernel's refusal, if that is what this is.
    #[must_use]
    pub const fn kernel_error(&self) -> Option<&KernelError> {
        match self {
            Self::Kernel { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// One refused request in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFailure {
    /// `add`, `update`, `delete`, ...
    pub verb: &'static str,
    /// The object.
    pub object: ObjectRef,
    /// What the kernel said.
    pub error: KernelError,
}

/// Some requests of a batch were refused; each failure names its object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} of {total} requests failed; first: {} {}: {}",
    .failures.len(),
    .failures.first().map_or("", |f| f.verb),
    .failures.first().map(|f| f.object.to_string()).unwrap_or_default(),
    .failures.first().map(|f| f.error.to_string()).unwrap_or_default()
)]
pub struct BatchError {
    /// Requests in the batch.
    pub total: usize,
    /// The refused ones, in order.
    pub failures: Vec<BatchFailure>,
}

type JobReply = Result<Vec<Result<Reply, KernelError>>, TransportError>;

struct Job {
    ops: Vec<Op>,
    reply: oneshot::Sender<JobReply>,
}

/// A cheap-clone handle to one XFRM worker (one netlink socket in one network namespace).
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("ops", &self.ops.len()).finish()
    }
}

impl Handle {
    /// A handle for the network namespace of the calling thread. Blocks briefly while the
    /// worker opens its socket.
    ///
    /// # Errors
    /// [`XfrmError::Transport`] if the socket cannot be opened (e.g. no `xfrm_user`).
    pub fn new() -> Result<Self, XfrmError> {
        Ok(Self::with_kernel(NetlinkKernel::open()?))
    }

    /// A handle for the network namespace `netns` (an open `/run/netns/NAME` or
    /// `/proc/PID/ns/net`). The calling thread never changes namespace.
    ///
    /// # Errors
    /// [`XfrmError::Transport`] if the namespace cannot be entered or the socket opened.
    pub fn in_namespace(netns: impl AsFd) -> Result<Self, XfrmError> {
        Ok(Self::with_kernel(NetlinkKernel::open_in(netns.as_fd())?))
    }

    /// A handle over any [`Kernel`] backend (e.g. the fake kernel in tests).
    #[must_use]
    pub fn with_kernel(mut kernel: impl Kernel) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        // If the thread cannot be spawned, `rx` drops and every request reports WorkerGone.
        let _ = std::thread::Builder::new()
            .name("nodeseal-xfrm".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let _ = job.reply.send(kernel.submit(&job.ops));
                }
            });
        Self { tx }
    }

    /// Requests about states (`ip xfrm state`).
    #[must_use]
    pub fn states(&self) -> StateRequests<'_> {
        StateRequests { handle: self }
    }

    /// Requests about policies (`ip xfrm policy`).
    #[must_use]
    pub fn policies(&self) -> PolicyRequests<'_> {
        PolicyRequests { handle: self }
    }

    /// A batch of requests sent in as few `sendmsg` calls as possible.
    pub fn batch(&self) -> Batch {
        Batch {
            handle: self.clone(),
            ops: Vec::new(),
        }
    }

    /// Sets the prefix lengths from which policies go into the kernel's exact hash, for the
    /// whole network namespace (`ip xfrm policy set hthresh4 LBITS RBITS hthresh6 LBITS RBITS`).
    /// Policies whose selectors are at least this specific are inserted and looked up in O(1);
    /// see [`PolicyHashThresholds`] for why that matters at scale.
    #[doc(alias = "XFRM_MSG_NEWSPDINFO")]
    pub fn set_policy_hash_thresholds(&self, thresholds: PolicyHashThresholds) -> Request<()> {
        let pair = |t: FamilyThresholds| (t.local, t.remote);
        Request::new(
            self,
            Op::SetPolicyHashThresholds {
                v4: pair(thresholds.v4()),
                v6: pair(thresholds.v6()),
            },
        )
    }

    /// Sends ops to the worker and waits for the per-op results.
    pub(crate) async fn submit(
        &self,
        ops: Vec<Op>,
    ) -> Result<Vec<Result<Reply, KernelError>>, XfrmError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { ops, reply })
            .map_err(|_| XfrmError::WorkerGone)?;
        Ok(rx.await.map_err(|_| XfrmError::WorkerGone)??)
    }
}

/// Builders for state requests.
#[derive(Debug)]
pub struct StateRequests<'a> {
    handle: &'a Handle,
}

impl StateRequests<'_> {
    /// Adds a state; fails with `EEXIST` if one with the same id exists.
    /// `ip xfrm state add ...`.
    #[doc(alias = "XFRM_MSG_NEWSA")]
    pub fn add(&self, spec: StateSpec) -> Request<()> {
        Request::new(self.handle, Op::AddState(spec))
    }

    /// Updates an existing state in place. The kernel only changes its lifetimes and output
    /// mark; keys, selector and replay settings need a new state (see [`crate::reconcile`]).
    /// `ip xfrm state update ...`.
    #[doc(alias = "XFRM_MSG_UPDSA")]
    pub fn update(&self, spec: StateSpec) -> Request<()> {
        Request::new(self.handle, Op::UpdateState(spec))
    }

    /// Deletes a state. `ip xfrm state delete dst D proto esp spi S [mark V mask M]`.
    #[doc(alias = "XFRM_MSG_DELSA")]
    pub fn delete(&self, id: StateId) -> Request<()> {
        Request::new(self.handle, Op::DeleteState(id))
    }

    /// Reads one state with its counters. `ip -s xfrm state get dst D proto esp spi S`.
    #[doc(alias = "XFRM_MSG_GETSA")]
    pub fn get(&self, id: StateId) -> Request<KernelState> {
        Request::new(self.handle, Op::GetState(id))
    }

    /// Lists all states, foreign ones included. `ip -s xfrm state list`.
    pub fn dump(&self) -> Request<Vec<KernelState>> {
        Request::new(self.handle, Op::DumpStates)
    }
}

/// Builders for policy requests.
#[derive(Debug)]
pub struct PolicyRequests<'a> {
    handle: &'a Handle,
}

impl PolicyRequests<'_> {
    /// Adds a policy; fails with `EEXIST` if one with the same selector, direction and mark
    /// exists. `ip xfrm policy add ...`.
    #[doc(alias = "XFRM_MSG_NEWPOLICY")]
    pub fn add(&self, spec: PolicySpec) -> Request<()> {
        Request::new(self.handle, Op::AddPolicy(spec))
    }

    /// Adds or atomically replaces a policy. `ip xfrm policy update ...`.
    #[doc(alias = "XFRM_MSG_UPDPOLICY")]
    pub fn update(&self, spec: PolicySpec) -> Request<()> {
        Request::new(self.handle, Op::UpdatePolicy(spec))
    }

    /// Deletes a policy. `ip xfrm policy delete src S dst D dir DIR [mark V mask M]`.
    #[doc(alias = "XFRM_MSG_DELPOLICY")]
    pub fn delete(&self, id: PolicyId) -> Request<()> {
        Request::new(self.handle, Op::DeletePolicy(id))
    }

    /// Reads one policy. `ip xfrm policy get src S dst D dir DIR`.
    #[doc(alias = "XFRM_MSG_GETPOLICY")]
    pub fn get(&self, id: PolicyId) -> Request<KernelPolicy> {
        Request::new(self.handle, Op::GetPolicy(id))
    }

    /// Lists all policies, foreign ones included. `ip xfrm policy list`.
    pub fn dump(&self) -> Request<Vec<KernelPolicy>> {
        Request::new(self.handle, Op::DumpPolicies)
    }
}

mod sealed {
    use crate::kernel::Reply;

    /// Converts the seam's reply into a request's output type.
    pub trait FromReply: Sized {
        fn from_reply(reply: Reply) -> Option<Self>;
    }
}
use sealed::FromReply;

impl FromReply for () {
    fn from_reply(reply: Reply) -> Option<Self> {
        matches!(reply, Reply::Done).then_some(())
    }
}

impl FromReply for KernelState {
    fn from_reply(reply: Reply) -> Option<Self> {
        match reply {
            Reply::State(s) => Some(*s),
            _ => None,
        }
    }
}

impl FromReply for KernelPolicy {
    fn from_reply(reply: Reply) -> Option<Self> {
        match reply {
            Reply::Policy(p) => Some(*p),
            _ => None,
        }
    }
}

impl FromReply for Vec<KernelState> {
    fn from_reply(reply: Reply) -> Option<Self> {
        match reply {
            Reply::States(s) => Some(s),
            _ => None,
        }
    }
}

impl FromReply for Vec<KernelPolicy> {
    fn from_reply(reply: Reply) -> Option<Self> {
        match reply {
            Reply::Policies(p) => Some(p),
            _ => None,
        }
    }
}

/// One request, ready to `execute`.
#[derive(Debug)]
#[must_use = "a request does nothing until executed"]
pub struct Request<T> {
    handle: Handle,
    op: Op,
    out: PhantomData<fn() -> T>,
}

impl<T: FromReply> Request<T> {
    fn new(handle: &Handle, op: Op) -> Self {
        Self {
            handle: handle.clone(),
            op,
            out: PhantomData,
        }
    }

    /// Sends the request and waits for the kernel's answer.
    ///
    /// # Errors
    /// [`XfrmError::Spec`] for an invalid state spec, [`XfrmError::Kernel`] if the kernel
    /// refused, [`XfrmError::Transport`] / [`XfrmError::WorkerGone`] if it could not be asked.
    pub async fn execute(self) -> Result<T, XfrmError> {
        let object = Box::new(self.op.object());
        let verb = self.op.verb();
        validate(&self.op)?;
        let mut results = self.handle.submit(vec![self.op]).await?;
        match results.pop() {
            Some(Ok(reply)) => {
                T::from_reply(reply).ok_or(XfrmError::UnexpectedReply { verb, object })
            }
            Some(Err(source)) => Err(XfrmError::Kernel {
                verb,
                object,
                source,
            }),
            None => Err(XfrmError::UnexpectedReply { verb, object }),
        }
    }
}

fn validate(op: &Op) -> Result<(), XfrmError> {
    if let Op::AddState(s) | Op::UpdateState(s) = op {
        s.validate().map_err(|source| XfrmError::Spec {
            object: Box::new(op.object()),
            source,
        })?;
    }
    Ok(())
}

/// Many requests applied in order, packed into few `sendmsg` calls.
#[derive(Debug)]
#[must_use = "a batch does nothing until executed"]
pub struct Batch {
    handle: Handle,
    ops: Vec<Op>,
}

impl Batch {
    /// Queues [`StateRequests::add`].
    pub fn add_state(mut self, spec: StateSpec) -> Self {
        self.ops.push(Op::AddState(spec));
        self
    }

    /// Queues [`StateRequests::update`].
    pub fn update_state(mut self, spec: StateSpec) -> Self {
        self.ops.push(Op::UpdateState(spec));
        self
    }

    /// Queues [`StateRequests::delete`].
    pub fn delete_state(mut self, id: StateId) -> Self {
        self.ops.push(Op::DeleteState(id));
        self
    }

    /// Queues [`PolicyRequests::add`].
    pub fn add_policy(mut self, spec: PolicySpec) -> Self {
        self.ops.push(Op::AddPolicy(spec));
        self
    }

    /// Queues [`PolicyRequests::update`].
    pub fn update_policy(mut self, spec: PolicySpec) -> Self {
        self.ops.push(Op::UpdatePolicy(spec));
        self
    }

    /// Queues [`PolicyRequests::delete`].
    pub fn delete_policy(mut self, id: PolicyId) -> Self {
        self.ops.push(Op::DeletePolicy(id));
        self
    }

    /// How many requests are queued.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing is queued.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Applies all requests in order. Refused requests do not stop the others.
    ///
    /// # Errors
    /// [`XfrmError::Batch`] naming every refused object; [`XfrmError::Spec`] (nothing sent) if
    /// a spec is invalid; transport errors as for [`Request::execute`].
    pub async fn execute(self) -> Result<(), XfrmError> {
        for op in &self.ops {
            validate(op)?;
        }
        let total = self.ops.len();
        let objects: Vec<_> = self.ops.iter().map(|o| (o.verb(), o.object())).collect();
        let results = self.handle.submit(self.ops).await?;
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
            Ok(())
        } else {
            Err(BatchError { total, failures }.into())
        }
    }
}
