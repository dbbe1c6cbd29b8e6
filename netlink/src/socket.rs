//! A blocking netlink socket on `libc`, and opening one inside another network namespace.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::{DecodeError, Error};

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

fn io_err(call: &'static str) -> Error {
    Error::Io {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A netlink socket, bound in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// Opens a socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_XFRM`, ...) and binds it in the
    /// calling thread's network namespace, member of the multicast `groups` (a bitmask; 0 for a
    /// request socket).
    ///
    /// # Errors
    /// [`Error::Io`] with call `socket` (e.g. `EPROTONOSUPPORT` when the kernel lacks the
    /// protocol) or `bind`.
    pub fn open(protocol: libc::c_int, groups: u32) -> Result<Self, Error> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if raw < 0 {
            return Err(io_err("socket"));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = groups;
        // SAFETY: `addr` is a valid sockaddr_nl and its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io_err("bind"));
        }
        Ok(Self { fd })
    }

    /// Sets an integer socket option; returns whether the kernel accepted it.
    pub fn set_option(&self, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> bool {
        // SAFETY: `value` is a live c_int and its size is passed; the fd is open.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    }

    /// Asks for extended ACKs (the kernel's error text), capped ACKs (errors echo only the
    /// request's header) and send and receive buffers of `buffer` bytes (beyond `rmem_max`
    /// where allowed).
    ///
    /// Best effort: without these the socket still works, with less precise errors (no
    /// extended ACK text), longer error replies (the whole request echoed) or smaller buffers.
    pub fn configure(&self, buffer: libc::c_int) {
        self.set_option(SOL_NETLINK, NETLINK_EXT_ACK, 1);
        self.set_option(SOL_NETLINK, NETLINK_CAP_ACK, 1);
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if !self.set_option(libc::SOL_SOCKET, force, buffer) {
                self.set_option(libc::SOL_SOCKET, plain, buffer);
            }
        }
    }

    /// Sends `datagram` (one or more messages), retrying when interrupted by a signal.
    ///
    /// # Errors
    /// [`Error::Io`] with call `send`.
    pub fn send(&self, datagram: &[u8]) -> Result<(), Error> {
        let mut sent = 0;
        while sent < datagram.len() {
            // SAFETY: the pointer and length describe initialised bytes of `datagram`.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    datagram[sent..].as_ptr().cast(),
                    datagram.len() - sent,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io {
                    call: "send",
                    source: e,
                });
            }
            // Netlink datagrams are all-or-nothing; a short count would be a kernel bug.
            sent += n.cast_unsigned();
        }
        Ok(())
    }

    /// Receives one datagram into `buf`, retrying when interrupted by a signal; returns its
    /// length.
    ///
    /// # Errors
    /// [`Error::Io`] with call `recv`; [`DecodeError::Truncated`] when the datagram was larger
    /// than `buf` (it is never silently cut).
    pub fn recv(&self, buf: &mut [u8]) -> Result<usize, Error> {
        loop {
            // SAFETY: the buffer is valid for `len` bytes; MSG_TRUNC reports the real length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io {
                    call: "recv",
                    source: e,
                });
            }
            let n = n.cast_unsigned();
            if n > buf.len() {
                return Err(Error::Decode(DecodeError::Truncated {
                    what: "netlink datagram",
                    len: buf.len(),
                    need: n,
                }));
            }
            return Ok(n);
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Runs `open` on a short-lived thread inside `netns` (an open `/proc/PID/ns/net` or
/// `/run/netns/NAME`), so no caller thread changes namespace (`setns` is per thread); sockets
/// it opens stay bound to that namespace for their lifetime.
///
/// # Errors
/// [`Error::Io`] with call `setns` (converted into `E`) if the namespace cannot be entered;
/// otherwise whatever `open` returns.
pub fn in_namespace<T: Send, E: Send + From<Error>>(
    netns: BorrowedFd<'_>,
    open: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this (scoped, about to exit) thread only.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io_err("setns").into());
            }
            open()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::Io {
                call: "setns",
                source: io::Error::other("BUG: namespace thread panicked"),
            }
            .into())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn a_route_socket_answers_a_bad_request_with_an_error() {
        let socket = Socket::open(libc::NETLINK_ROUTE, 0).unwrap();
        socket.configure(1024 * 1024);
        // A message type rtnetlink does not know, asking for an ACK.
        let mut buf = Vec::new();
        let m = codec::begin(&mut buf, 0x3ff, codec::NLM_F_REQUEST | codec::NLM_F_ACK, 5);
        codec::finish(&mut buf, m);
        socket.send(&buf).unwrap();
        let mut reply = vec![0; 8192];
        let n = socket.recv(&mut reply).unwrap();
        let msg = codec::messages(&reply[..n]).next().unwrap().unwrap();
        assert_eq!((msg.ty, msg.seq), (codec::NLMSG_ERROR, 5));
        let (errno, _) = codec::decode_error(&msg).unwrap();
        assert_ne!(errno, 0);
    }

    #[test]
    fn a_datagram_larger_than_the_buffer_is_an_error() {
        let socket = Socket::open(libc::NETLINK_ROUTE, 0).unwrap();
        let mut buf = Vec::new();
        let m = codec::begin(&mut buf, 0x3ff, codec::NLM_F_REQUEST | codec::NLM_F_ACK, 6);
        codec::finish(&mut buf, m);
        socket.send(&buf).unwrap();
        let mut reply = vec![0; 8];
        assert!(matches!(
            socket.recv(&mut reply),
            Err(Error::Decode(DecodeError::Truncated { .. }))
        ));
    }
}
