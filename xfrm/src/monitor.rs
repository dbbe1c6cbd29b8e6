//! Kernel notices about states: `XFRM_MSG_EXPIRE` from the `XFRMNLGRP_EXPIRE` group.
//!
//! A state with byte or packet limits ([`crate::Lifetime`]) makes the kernel send one notice when
//! it crosses its soft limit (time to rekey) and one when it crosses its hard limit (the kernel
//! has deleted it). [`ExpireMonitor`] reads them on its own thread and hands them to async code.
//! Notices carry no key material.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use nodeseal_netlink::Socket;
use tokio::sync::mpsc;

use crate::kernel::TransportError;
use crate::netlink::{self, codec};
use crate::selector::Mark;

/// Notices queued for the reader; the kernel's socket buffer holds more behind them.
const QUEUE: usize = 1024;
/// How often the reader thread checks that someone still listens.
const POLL: Duration = Duration::from_millis(500);
const RECV_BYTES: usize = 64 * 1024;

/// One state crossed a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expire {
    /// Outer source address.
    pub src: IpAddr,
    /// Outer destination address.
    pub dst: IpAddr,
    /// SPI (raw, network order decoded).
    pub spi: u32,
    /// IPsec protocol number.
    pub proto: u8,
    /// Reqid.
    pub reqid: u32,
    /// The state's mark.
    pub mark: Mark,
    /// Hard limit: the kernel deleted the state. Soft: it still works, replace it.
    pub hard: bool,
}

/// What the monitor reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorEvent {
    /// A state crossed a limit.
    Expire(Expire),
    /// The socket's buffer overran: some notices were lost. A listener that must not miss one
    /// should check the states it cares about.
    Lost,
}

/// Receives the expire notices of one network namespace.
#[derive(Debug)]
pub struct ExpireMonitor {
    events: mpsc::Receiver<MonitorEvent>,
}

impl ExpireMonitor {
    /// Subscribes in the calling thread's network namespace.
    ///
    /// # Errors
    /// [`TransportError`] if the socket cannot be opened or its reader thread started.
    pub fn open() -> Result<Self, TransportError> {
        Self::start(netlink::socket(1 << (codec::XFRMNLGRP_EXPIRE - 1))?)
    }

    /// Subscribes in the network namespace `netns`; no caller thread changes namespace.
    ///
    /// # Errors
    /// As [`Self::open`], and [`TransportError::Io`] with call `setns`.
    pub fn open_in(netns: BorrowedFd<'_>) -> Result<Self, TransportError> {
        let fd = netlink::in_namespace(netns, || {
            netlink::socket(1 << (codec::XFRMNLGRP_EXPIRE - 1))
        })?;
        Self::start(fd)
    }

    fn start(fd: Socket) -> Result<Self, TransportError> {
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: libc::suseconds_t::try_from(POLL.as_micros()).unwrap_or(500_000),
        };
        // SAFETY: `timeout` is a live timeval and its size is passed; the fd is open.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(netlink::io_err("setsockopt"));
        }
        let (tx, events) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("nodeseal-xfrm-expire".into())
            .spawn(move || read_notices(&fd, &tx))
            .map_err(|source| TransportError::Io {
                call: "spawn",
                source,
            })?;
        Ok(Self { events })
    }

    /// The next notice; `None` once the reader stopped (a socket error it cannot recover from).
    pub async fn next(&mut self) -> Option<MonitorEvent> {
        self.events.recv().await
    }

    /// The next notice if one is queued, without waiting (for callers without a runtime).
    pub fn try_next(&mut self) -> Option<MonitorEvent> {
        self.events.try_recv().ok()
    }
}

/// The reader thread: until the monitor is dropped or the socket fails.
fn read_notices(fd: &Socket, tx: &mpsc::Sender<MonitorEvent>) {
    let mut buf = vec![0u8; RECV_BYTES];
    while !tx.is_closed() {
        // SAFETY: the buffer is valid for its length; the fd is open.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                Some(libc::ENOBUFS) => {
                    if tx.blocking_send(MonitorEvent::Lost).is_err() {
                        return;
                    }
                    continue;
                }
                _ => return,
            }
        }
        let n = n.cast_unsigned().min(buf.len());
        for msg in codec::messages(&buf[..n]) {
            if msg.ty != codec::XFRM_MSG_EXPIRE {
                continue;
            }
            // A notice the decoder cannot read is one we cannot act on; the hard limit still
            // holds in the kernel.
            let Ok(expire) = codec::decode_expire(msg.payload) else {
                continue;
            };
            if tx.blocking_send(MonitorEvent::Expire(expire)).is_err() {
                return;
            }
        }
    }
}
