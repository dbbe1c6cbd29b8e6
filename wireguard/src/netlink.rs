//! The netlink transport: two blocking sockets (`NETLINK_ROUTE` for the link, `NETLINK_GENERIC`
//! for WireGuard's family) behind one small seam, [`Socket`], so the same request logic runs
//! against the kernel and against the in-memory fake kernel (`testing` feature).
//!
//! Why hand-written on `libc`, like `nodeseal-xfrm`, rather than `rtnetlink` +
//! `netlink-packet-wireguard`: those crates send requests through netlink-proto's connection
//! task and serialise keys through their own plain `Vec<u8>` buffers that nobody wipes, and
//! `netlink-packet-wireguard` leaves splitting a large peer set across messages to the caller.
//! What nodeseal needs is a dozen attributes and two fixed headers ([`route`], [`genl`]),
//! written straight into one zeroizing buffer, with exact control over message splitting
//! (5,000 peers do not fit one message) and over how replies are matched to requests.
//!
//! Requests are pipelined: up to [`WINDOW`] messages are sent, each asking for an ACK, before
//! their answers are read. The kernel handles each message inside `send`, in order, and answers
//! every one (with an ACK or an error carrying its sequence number), so the answers identify
//! exactly which message failed. Dumps are retried when the kernel flags them inconsistent
//! (`NLM_F_DUMP_INTR`: the peer list changed while it was being read).

/// The family-independent framing, shared with `nodeseal-xfrm`.
pub(crate) use nodeseal_netlink::codec;
pub(crate) mod genl;
pub(crate) mod route;

use std::collections::HashMap;

use zeroize::{Zeroize, Zeroizing};

use crate::error::{KernelError, TransportError};
pub(crate) use nodeseal_netlink::in_namespace;

use codec::{DecodeError, Message, NLM_F_DUMP_INTR, NLMSG_DONE, NLMSG_ERROR};

/// Messages sent before their answers are read.
pub(crate) const WINDOW: usize = 32;
/// Largest `WG_CMD_SET_DEVICE` message; keeps the peer list (one attribute, 16-bit length)
/// well under 64 KiB.
pub(crate) const SET_MESSAGE_LIMIT: usize = 32 * 1024;
/// Receive buffer: more than the kernel puts in one dump datagram (32 KiB).
const RECV_BYTES: usize = 128 * 1024;
const SOCKET_BUFFER: libc::c_int = 4 * 1024 * 1024;
const DUMP_RETRIES: usize = 5;

/// The two netlink protocols used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    /// `NETLINK_ROUTE`: links and addresses.
    Route,
    /// `NETLINK_GENERIC`: the family controller and WireGuard.
    Generic,
}

/// One netlink socket: sends datagrams, receives them whole.
pub(crate) trait Socket: Send + 'static {
    /// Sends one datagram (one or more messages).
    fn send(&mut self, datagram: &[u8]) -> Result<(), TransportError>;
    /// Receives one datagram into `buf`; returns its length. A datagram larger than `buf` is
    /// an error, never silently cut.
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError>;
}

/// A kernel netlink socket, bound in the network namespace it was opened in.
#[derive(Debug)]
pub(crate) struct NetlinkSocket(nodeseal_netlink::Socket);

impl NetlinkSocket {
    /// Opens and binds a socket of `proto` in the calling thread's network namespace.
    pub(crate) fn open(proto: Proto) -> Result<Self, TransportError> {
        let protocol = match proto {
            Proto::Route => libc::NETLINK_ROUTE,
            Proto::Generic => libc::NETLINK_GENERIC,
        };
        let socket = nodeseal_netlink::Socket::open(protocol, 0)?;
        socket.configure(SOCKET_BUFFER);
        Ok(Self(socket))
    }
}

impl Socket for NetlinkSocket {
    fn send(&mut self, datagram: &[u8]) -> Result<(), TransportError> {
        Ok(self.0.send(datagram)?)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        Ok(self.0.recv(buf)?)
    }
}

/// The outcome of one request message.
pub(crate) type Answer = Result<(), KernelError>;

/// Both sockets with their buffers. Request and receive buffers are zeroizing: they carry
/// private and preshared keys (in `SET_DEVICE` requests and `GET_DEVICE` replies), and are
/// wiped after every exchange.
pub(crate) struct Conn<S> {
    route: S,
    genl: S,
    seq: u32,
    send: Zeroizing<Vec<u8>>,
    recv: Zeroizing<Vec<u8>>,
}

impl<S: Socket> Conn<S> {
    pub(crate) fn new(route: S, genl: S) -> Self {
        Self {
            route,
            genl,
            seq: 0,
            send: Zeroizing::new(Vec::new()),
            recv: Zeroizing::new(vec![0; RECV_BYTES]),
        }
    }

    /// Clears the request buffer, reserves `capacity` bytes in it (before anything secret is
    /// written, so it never reallocates with keys inside) and lets `f` encode messages, with a
    /// sequence number source.
    pub(crate) fn encode<R>(
        &mut self,
        capacity: usize,
        f: impl FnOnce(&mut Vec<u8>, &mut dyn FnMut() -> u32) -> R,
    ) -> R {
        let Self { send, seq, .. } = self;
        send.zeroize();
        send.reserve(capacity);
        let mut next = || {
            *seq = seq.wrapping_add(1).max(1);
            *seq
        };
        f(send, &mut next)
    }

    /// Sends the encoded messages starting at the `(offset, seq)`s (contiguous, in order, each
    /// asking for an ACK) and returns each one's answer. Data replies (e.g. the link a
    /// `GETLINK` asked for) go to `on_reply` with the message's index.
    pub(crate) fn transact(
        &mut self,
        proto: Proto,
        msgs: &[(usize, u32)],
        on_reply: &mut dyn FnMut(usize, &Message<'_>) -> Result<(), DecodeError>,
    ) -> Result<Vec<Answer>, TransportError> {
        let result = self.transact_inner(proto, msgs, on_reply);
        self.send.zeroize();
        result
    }

    fn transact_inner(
        &mut self,
        proto: Proto,
        msgs: &[(usize, u32)],
        on_reply: &mut dyn FnMut(usize, &Message<'_>) -> Result<(), DecodeError>,
    ) -> Result<Vec<Answer>, TransportError> {
        let mut answers: Vec<Option<Answer>> = vec![None; msgs.len()];
        let total = self.send.len();
        for (w, window) in msgs.chunks(WINDOW).enumerate() {
            let first = w * WINDOW;
            let mut pending = HashMap::with_capacity(window.len());
            for (k, &(start, seq)) in window.iter().enumerate() {
                let end = msgs.get(first + k + 1).map_or(total, |m| m.0);
                let Self {
                    send, route, genl, ..
                } = self;
                let socket = match proto {
                    Proto::Route => route,
                    Proto::Generic => genl,
                };
                socket.send(&send[start..end])?;
                pending.insert(seq, first + k);
            }
            while !pending.is_empty() {
                self.receive(proto, &mut |msg| {
                    let Some(&i) = pending.get(&msg.seq) else {
                        return Ok(());
                    };
                    match msg.ty {
                        NLMSG_ERROR => {
                            let (errno, message) = codec::decode_error(msg)?;
                            answers[i] = Some(if errno == 0 {
                                Ok(())
                            } else {
                                Err(KernelError { errno, message })
                            });
                            pending.remove(&msg.seq);
                        }
                        NLMSG_DONE => {}
                        _ => on_reply(i, msg)?,
                    }
                    Ok(())
                })?;
            }
        }
        // Every message was answered (the loop above only ends when none is pending).
        Ok(answers.into_iter().map(|a| a.unwrap_or(Ok(()))).collect())
    }

    /// Receives one datagram and hands each message in it to `each`; the datagram is wiped
    /// afterwards, whatever happened.
    fn receive(
        &mut self,
        proto: Proto,
        each: &mut dyn FnMut(&Message<'_>) -> Result<(), DecodeError>,
    ) -> Result<(), TransportError> {
        let Self {
            recv, route, genl, ..
        } = self;
        let socket = match proto {
            Proto::Route => route,
            Proto::Generic => genl,
        };
        let n = socket.recv(recv)?;
        let result = codec::messages(&recv[..n]).try_for_each(|m| each(&m?));
        recv[..n].zeroize();
        Ok(result?)
    }

    /// Runs a dump: `encode` writes the request with the given sequence number, `on_reply` sees
    /// every data message. If the kernel flags the dump inconsistent, `restart` is called and
    /// the dump starts over.
    pub(crate) fn dump(
        &mut self,
        proto: Proto,
        encode: &dyn Fn(&mut Vec<u8>, u32),
        on_reply: &mut dyn FnMut(&Message<'_>) -> Result<(), DecodeError>,
        restart: &mut dyn FnMut(),
    ) -> Result<Answer, TransportError> {
        for _ in 0..DUMP_RETRIES {
            restart();
            let seq = self.encode(0, |buf, next| {
                let seq = next();
                encode(buf, seq);
                seq
            });
            let sent = {
                let Self {
                    send, route, genl, ..
                } = self;
                match proto {
                    Proto::Route => route.send(send),
                    Proto::Generic => genl.send(send),
                }
            };
            self.send.zeroize();
            sent?;
            let mut interrupted = false;
            let mut finished: Option<Answer> = None;
            while finished.is_none() {
                self.receive(proto, &mut |msg| {
                    if msg.seq != seq {
                        return Ok(());
                    }
                    interrupted |= msg.flags & NLM_F_DUMP_INTR != 0;
                    match msg.ty {
                        NLMSG_ERROR => {
                            let (errno, message) = codec::decode_error(msg)?;
                            finished = Some(if errno == 0 {
                                Ok(())
                            } else {
                                Err(KernelError { errno, message })
                            });
                        }
                        // A dump that failed half-way ends with DONE carrying the error.
                        NLMSG_DONE => {
                            let errno = msg
                                .payload
                                .get(..4)
                                .map_or(0, |b| -(codec::ne_u32(b).cast_signed()));
                            finished = Some(if errno == 0 {
                                Ok(())
                            } else {
                                Err(KernelError {
                                    errno,
                                    message: None,
                                })
                            });
                        }
                        _ => on_reply(msg)?,
                    }
                    Ok(())
                })?;
            }
            match finished {
                Some(Ok(())) if interrupted => {}
                Some(answer) => return Ok(answer),
                None => {}
            }
        }
        Err(TransportError::DumpInterrupted)
    }
}
