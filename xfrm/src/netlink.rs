//! The netlink backend of the [`Kernel`] seam: a blocking `NETLINK_XFRM` socket.
//!
//! Why hand-written on `libc` rather than the rust-netlink crates (evaluated: netlink-packet-xfrm
//! 0.5, netlink-sys 0.9, xfrmnetlink 0.4): xfrmnetlink sends one request per round trip through
//! netlink-proto's connection task, so it cannot put hundreds of messages in one `sendmsg`, and
//! its requests copy keys into plain `Vec<u8>`s that neither it nor netlink-proto's internal
//! buffers wipe. netlink-packet-xfrm has the structs but also keeps keys in non-zeroizing
//! `Vec<u8>` attributes and serialises through its own buffers. The structures nodeseal needs
//! are six fixed layouts and a handful of attributes ([`codec`]), so writing them directly into
//! one zeroizing buffer is less code than adapting those crates, and gives exact control over
//! batching and key hygiene. netlink-sys would only wrap `socket`/`bind`/`send`/`recv`.
//!
//! Batching: requests are packed into chunks of up to [`CHUNK_BYTES`], one `sendmsg` each.
//! Only the last message of a chunk asks for an ACK; the kernel processes a chunk in order
//! inside `sendmsg` and always answers a failed message with an error carrying its sequence
//! number, so when the last ACK arrives every earlier failure has been matched to its request
//! by sequence number and every other request succeeded. A lost reply (receive buffer overrun,
//! `ENOBUFS`) is a [`TransportError`], never a silent success.

pub(crate) mod codec;

use std::io;
use std::os::fd::BorrowedFd;

use nodeseal_netlink::Socket;
pub(crate) use nodeseal_netlink::in_namespace;
use zeroize::{Zeroize, Zeroizing};

use crate::kernel::{Kernel, KernelError, Op, Reply, TransportError};
use codec::NLM_F_ACK;

/// Bytes of requests per `sendmsg`.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Room for one more message: larger than the largest state (4 KiB replay bitmap + key).
const MAX_MESSAGE: usize = 8 * 1024;
const RECV_BYTES: usize = 1024 * 1024;
const SOCKET_BUFFER: libc::c_int = 32 * 1024 * 1024;
const DUMP_RETRIES: usize = 5;

/// A `NETLINK_XFRM` socket bound to the network namespace it was opened in.
#[derive(Debug)]
pub struct NetlinkKernel {
    socket: Socket,
    seq: u32,
    send: Zeroizing<Vec<u8>>,
    recv: Zeroizing<Vec<u8>>,
}

pub(crate) fn io_err(call: &'static str) -> TransportError {
    TransportError::Io {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A `NETLINK_XFRM` socket bound in the calling thread's network namespace, member of the
/// multicast `groups` (a bitmask; 0 for a request socket).
pub(crate) fn socket(groups: u32) -> Result<Socket, TransportError> {
    Socket::open(libc::NETLINK_XFRM, groups).map_err(|e| match e {
        nodeseal_netlink::Error::Io {
            call: "socket",
            source,
        } if source.raw_os_error() == Some(libc::EPROTONOSUPPORT) => {
            TransportError::NoXfrmUser { source }
        }
        e => e.into(),
    })
}

impl NetlinkKernel {
    /// Opens a socket in the calling thread's current network namespace.
    ///
    /// # Errors
    /// [`TransportError::NoXfrmUser`] without `xfrm_user`; [`TransportError::Io`] otherwise.
    pub fn open() -> Result<Self, TransportError> {
        let socket = socket(0)?;
        socket.configure(SOCKET_BUFFER);
        Ok(Self {
            socket,
            seq: 1,
            send: Zeroizing::new(Vec::with_capacity(CHUNK_BYTES + MAX_MESSAGE)),
            recv: Zeroizing::new(vec![0; RECV_BYTES]),
        })
    }

    /// Opens a socket inside the network namespace `netns` (an open `/proc/PID/ns/net` or
    /// `/run/netns/NAME`), on a short-lived thread, so no caller thread changes namespace.
    /// The socket stays bound to that namespace for its lifetime.
    ///
    /// # Errors
    /// [`TransportError::Io`] with call `setns` if the namespace cannot be entered.
    pub fn open_in(netns: BorrowedFd<'_>) -> Result<Self, TransportError> {
        in_namespace(netns, Self::open)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn send_buffer(&mut self) -> Result<(), TransportError> {
        let result = self.socket.send(&self.send);
        // Wipe keys from the request buffer (keeps its capacity: no reallocation later).
        self.send.zeroize();
        Ok(result?)
    }

    /// Receives one datagram; returns its length within `self.recv`.
    fn recv_one(&mut self) -> Result<usize, TransportError> {
        Ok(self.socket.recv(&mut self.recv)?)
    }

    /// Sends the chunk in `self.send` and matches replies to `pending` (seq → index in `out`).
    fn flush(
        &mut self,
        ops: &[Op],
        pending: &mut Vec<(u32, usize)>,
        last_hdr: Option<usize>,
        out: &mut [Option<Result<Reply, KernelError>>],
    ) -> Result<(), TransportError> {
        let Some(last_hdr) = last_hdr else {
            return Ok(());
        };
        // Only the last message asks for an ACK; errors are always reported.
        let flags = u16::from_ne_bytes([self.send[last_hdr + 6], self.send[last_hdr + 7]]);
        self.send[last_hdr + 6..last_hdr + 8].copy_from_slice(&(flags | NLM_F_ACK).to_ne_bytes());
        self.send_buffer()?;
        let Some(&(last_seq, _)) = pending.last() else {
            return Ok(());
        };
        let index: std::collections::HashMap<u32, usize> = pending.iter().copied().collect();
        let mut done = false;
        while !done {
            let n = self.recv_one()?;
            for msg in codec::messages(&self.recv[..n]) {
                let Some(&i) = index.get(&msg.seq) else {
                    continue;
                };
                let decode = |source| TransportError::Decode { source };
                if msg.ty == codec::NLMSG_ERROR {
                    let (errno, text) = codec::decode_error(&msg).map_err(decode)?;
                    if errno != 0 {
                        out[i] = Some(Err(KernelError::new(errno, text, &ops[i])));
                    } else if out[i].is_none() {
                        out[i] = Some(Ok(Reply::Done));
                    }
                    done |= msg.seq == last_seq;
                } else if msg.ty == codec::XFRM_MSG_NEWSA {
                    let s = codec::decode_state(msg.payload).map_err(decode)?;
                    out[i] = Some(Ok(Reply::State(Box::new(s))));
                } else if msg.ty == codec::XFRM_MSG_NEWPOLICY {
                    let p = codec::decode_policy(msg.payload).map_err(decode)?;
                    out[i] = Some(Ok(Reply::Policy(Box::new(p))));
                }
            }
            self.recv[..n].zeroize();
        }
        // Everything before the final ACK that did not fail succeeded.
        for &(_, i) in pending.iter() {
            if out[i].is_none() {
                out[i] = Some(match ops[i] {
                    // A GET without a reply would be a kernel bug; report it as not found.
                    Op::GetState(_) | Op::GetPolicy(_) => {
                        Err(KernelError::new(libc::ENOENT, None, &ops[i]))
                    }
                    _ => Ok(Reply::Done),
                });
            }
        }
        pending.clear();
        Ok(())
    }

    fn dump(&mut self, op: &Op) -> Result<Result<Reply, KernelError>, TransportError> {
        let ty = match op {
            Op::DumpStates => codec::XFRM_MSG_GETSA,
            _ => codec::XFRM_MSG_GETPOLICY,
        };
        'retry: for _ in 0..DUMP_RETRIES {
            let seq = self.next_seq();
            codec::encode_dump(&mut self.send, ty, seq);
            self.send_buffer()?;
            let mut states = Vec::new();
            let mut policies = Vec::new();
            let mut interrupted = false;
            loop {
                let n = self.recv_one()?;
                let mut finished = None;
                for msg in codec::messages(&self.recv[..n]) {
                    if msg.seq != seq {
                        continue;
                    }
                    interrupted |= msg.flags & codec::NLM_F_DUMP_INTR != 0;
                    match msg.ty {
                        codec::NLMSG_DONE => finished = Some(Ok(())),
                        codec::NLMSG_ERROR => {
                            let (errno, text) = codec::decode_error(&msg)
                                .map_err(|source| TransportError::Decode { source })?;
                            finished = Some(Err(KernelError::new(errno, text, op)));
                        }
                        codec::XFRM_MSG_NEWSA => states.push(
                            codec::decode_state(msg.payload)
                                .map_err(|source| TransportError::Decode { source })?,
                        ),
                        codec::XFRM_MSG_NEWPOLICY => policies.push(
                            codec::decode_policy(msg.payload)
                                .map_err(|source| TransportError::Decode { source })?,
                        ),
                        _ => {}
                    }
                }
                self.recv[..n].zeroize();
                match finished {
                    None => {}
                    Some(Err(e)) => return Ok(Err(e)),
                    Some(Ok(())) if interrupted => continue 'retry,
                    Some(Ok(())) => {
                        return Ok(Ok(match op {
                            Op::DumpStates => Reply::States(states),
                            _ => Reply::Policies(policies),
                        }));
                    }
                }
            }
        }
        Err(TransportError::DumpInterrupted)
    }
}

impl Kernel for NetlinkKernel {
    fn submit(&mut self, ops: &[Op]) -> Result<Vec<Result<Reply, KernelError>>, TransportError> {
        let mut out: Vec<Option<Result<Reply, KernelError>>> = vec![None; ops.len()];
        let mut pending = Vec::new();
        let mut last_hdr = None;
        self.send.zeroize();
        for (i, op) in ops.iter().enumerate() {
            if matches!(op, Op::DumpStates | Op::DumpPolicies) {
                self.flush(ops, &mut pending, last_hdr.take(), &mut out)?;
                out[i] = Some(self.dump(op)?);
                continue;
            }
            if self.send.len() + MAX_MESSAGE > CHUNK_BYTES {
                self.flush(ops, &mut pending, last_hdr.take(), &mut out)?;
            }
            let seq = self.next_seq();
            let start = self.send.len();
            let buf = &mut *self.send;
            match op {
                Op::AddState(s) => codec::encode_state(buf, codec::XFRM_MSG_NEWSA, seq, s),
                Op::UpdateState(s) => codec::encode_state(buf, codec::XFRM_MSG_UPDSA, seq, s),
                Op::DeleteState(id) => codec::encode_state_id(buf, codec::XFRM_MSG_DELSA, seq, id),
                Op::GetState(id) => codec::encode_state_id(buf, codec::XFRM_MSG_GETSA, seq, id),
                Op::AddPolicy(p) => codec::encode_policy(buf, codec::XFRM_MSG_NEWPOLICY, seq, p),
                Op::UpdatePolicy(p) => codec::encode_policy(buf, codec::XFRM_MSG_UPDPOLICY, seq, p),
                Op::DeletePolicy(id) => {
                    codec::encode_policy_id(buf, codec::XFRM_MSG_DELPOLICY, seq, id);
                }
                Op::GetPolicy(id) => {
                    codec::encode_policy_id(buf, codec::XFRM_MSG_GETPOLICY, seq, id);
                }
                Op::SetPolicyHashThresholds { v4, v6 } => codec::encode_hthresh(buf, seq, *v4, *v6),
                Op::DumpStates | Op::DumpPolicies => {}
            }
            // Clear the ACK flag; `flush` sets it again on the chunk's last message.
            let flags = u16::from_ne_bytes([buf[start + 6], buf[start + 7]]) & !NLM_F_ACK;
            buf[start + 6..start + 8].copy_from_slice(&flags.to_ne_bytes());
            pending.push((seq, i));
            last_hdr = Some(start);
        }
        self.flush(ops, &mut pending, last_hdr, &mut out)?;
        let missing = out.iter().filter(|r| r.is_none()).count();
        if missing > 0 {
            return Err(TransportError::MissingAcks { missing });
        }
        Ok(out.into_iter().flatten().collect())
    }
}
