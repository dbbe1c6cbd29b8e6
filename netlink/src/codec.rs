//! Netlink framing shared by every netlink family: message headers, attributes (nested ones
//! included) and the kernel's error replies.
//!
//! Writing appends to the caller's buffer, so key material exists in exactly one netlink buffer,
//! which the sender wipes. Reading never trusts a length: every header and attribute is checked
//! against what is actually there, and anything that does not fit is a [`DecodeError`], not a
//! panic.

/// Length of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// An error or ACK (`struct nlmsgerr`).
pub const NLMSG_ERROR: u16 = 2;
/// The end of a dump.
pub const NLMSG_DONE: u16 = 3;

/// The message is a request.
pub const NLM_F_REQUEST: u16 = 0x1;
/// Part of a multipart reply.
pub const NLM_F_MULTI: u16 = 0x2;
/// Asks for an ACK even on success.
pub const NLM_F_ACK: u16 = 0x4;
/// The dump was inconsistent (the objects changed while it was read).
pub const NLM_F_DUMP_INTR: u16 = 0x10;
/// Asks for a dump (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;
/// New requests: replace an existing object.
pub const NLM_F_REPLACE: u16 = 0x100;
/// New requests: fail if the object exists.
pub const NLM_F_EXCL: u16 = 0x200;
/// New requests: create the object if it does not exist.
pub const NLM_F_CREATE: u16 = 0x400;
/// Error replies: the echoed request was cut to its header (`NETLINK_CAP_ACK`).
pub const NLM_F_CAPPED: u16 = 0x100;
/// Error replies: extended-ACK attributes follow the echoed request (`NETLINK_EXT_ACK`).
pub const NLM_F_ACK_TLVS: u16 = 0x200;
/// The extended-ACK attribute carrying the kernel's error text.
pub const NLMSGERR_ATTR_MSG: u16 = 1;

const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Errors decoding what the kernel sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A header, structure or attribute claims more bytes than there are.
    #[error("{what} truncated: {len} bytes, need {need}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A fixed-size value has the wrong size.
    #[error("{what} has {len} bytes")]
    Length {
        /// What was being decoded.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A required attribute is absent.
    #[error("{what} missing")]
    Missing {
        /// The attribute.
        what: &'static str,
    },
    /// A value the kernel never sends.
    #[error("invalid {what}")]
    Invalid {
        /// What was invalid.
        what: &'static str,
    },
    /// An address family other than IPv4/IPv6.
    #[error("unknown address family {family}")]
    Family {
        /// The raw family.
        family: u16,
    },
}

// ---------------------------------------------------------------- writing

/// Starts a netlink message; returns its offset for [`finish`].
pub fn begin(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    start
}

/// Writes the final length into the header of the message at `start`.
pub fn finish(buf: &mut [u8], start: usize) {
    let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn pad4(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Appends an attribute.
pub fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = u16::try_from(NLA_HDRLEN + payload.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    pad4(buf);
}

/// Appends a `u8` attribute.
pub fn attr_u8(buf: &mut Vec<u8>, ty: u16, v: u8) {
    attr(buf, ty, &[v]);
}

/// Appends a `u16` attribute (native byte order).
pub fn attr_u16(buf: &mut Vec<u8>, ty: u16, v: u16) {
    attr(buf, ty, &v.to_ne_bytes());
}

/// Appends a `u32` attribute (native byte order).
pub fn attr_u32(buf: &mut Vec<u8>, ty: u16, v: u32) {
    attr(buf, ty, &v.to_ne_bytes());
}

/// Appends a `u64` attribute (native byte order).
pub fn attr_u64(buf: &mut Vec<u8>, ty: u16, v: u64) {
    attr(buf, ty, &v.to_ne_bytes());
}

/// A NUL-terminated string attribute.
pub fn attr_str(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let len = u16::try_from(NLA_HDRLEN + s.len() + 1).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    pad4(buf);
}

/// Starts a nested attribute; returns its offset for [`nest_end`].
pub fn nest_begin(buf: &mut Vec<u8>, ty: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    start
}

/// Writes the length of the nest at `start`. Returns `false` (leaving the length unset) when
/// the nest is larger than an attribute can say (64 KiB); callers keep nests far below that.
#[must_use]
pub fn nest_end(buf: &mut [u8], start: usize) -> bool {
    let Ok(len) = u16::try_from(buf.len() - start) else {
        return false;
    };
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    true
}

// ---------------------------------------------------------------- reading

/// One netlink message header and its payload.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// `nlmsg_type`.
    pub ty: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// Everything after the header, up to `nlmsg_len`.
    pub payload: &'a [u8],
}

/// Splits a datagram into messages. A header whose length does not fit the datagram is an
/// error (and ends the iteration), never a panic.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = Result<Message<'_>, DecodeError>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let header = match buf.get(..NLMSG_HDRLEN) {
            Some(h) => h,
            None => {
                let len = buf.len();
                buf = &[];
                return Some(Err(DecodeError::Truncated {
                    what: "netlink header",
                    len,
                    need: NLMSG_HDRLEN,
                }));
            }
        };
        let len = ne_u32(&header[0..4]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            let have = buf.len();
            buf = &[];
            return Some(Err(DecodeError::Truncated {
                what: "netlink message",
                len: have,
                need: len.max(NLMSG_HDRLEN),
            }));
        }
        let msg = Message {
            ty: ne_u16(&header[4..6]),
            flags: ne_u16(&header[6..8]),
            seq: ne_u32(&header[8..12]),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some(Ok(msg))
    })
}

/// An `NLMSG_ERROR` payload: the errno (positive; 0 is an ACK) and the extended-ACK text.
///
/// # Errors
/// [`DecodeError`] when the payload is shorter than the errno or the errno is `i32::MIN`.
pub fn decode_error(msg: &Message<'_>) -> Result<(i32, Option<String>), DecodeError> {
    let p = msg.payload;
    let errno_bytes = p.get(..4).ok_or(DecodeError::Truncated {
        what: "netlink error",
        len: p.len(),
        need: 4,
    })?;
    let errno = i32::from_ne_bytes([
        errno_bytes[0],
        errno_bytes[1],
        errno_bytes[2],
        errno_bytes[3],
    ])
    .checked_neg()
    .ok_or(DecodeError::Invalid { what: "errno" })?;
    if msg.flags & NLM_F_ACK_TLVS == 0 {
        return Ok((errno, None));
    }
    // The error echoes the request's header (and, unless capped, its payload) before the TLVs.
    let inner_len = p.get(4..8).map_or(0, |b| ne_u32(b) as usize);
    let skip = if msg.flags & NLM_F_CAPPED != 0 {
        4 + NLMSG_HDRLEN
    } else {
        4 + inner_len.next_multiple_of(4)
    };
    let mut text = None;
    for a in attrs(p.get(skip..).unwrap_or_default()) {
        let Ok(a) = a else { break };
        if a.ty == NLMSGERR_ATTR_MSG {
            let v = a.payload.split(|b| *b == 0).next().unwrap_or_default();
            text = Some(String::from_utf8_lossy(v).into_owned());
        }
    }
    Ok((errno, text))
}

/// One attribute: its type (without the nested/byte-order flags) and payload.
#[derive(Debug, Clone, Copy)]
pub struct Attr<'a> {
    /// The type, without `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER`.
    pub ty: u16,
    /// The payload, without padding.
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    fn exact<const N: usize>(&self, what: &'static str) -> Result<[u8; N], DecodeError> {
        <[u8; N]>::try_from(self.payload).map_err(|_| DecodeError::Length {
            what,
            len: self.payload.len(),
        })
    }

    /// A `u8` attribute; another length is a [`DecodeError::Length`] naming `what`.
    ///
    /// # Errors
    /// [`DecodeError::Length`].
    pub fn u8(&self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.exact::<1>(what)?[0])
    }

    /// A `u16` attribute (native byte order); another length is a [`DecodeError::Length`] naming `what`.
    ///
    /// # Errors
    /// [`DecodeError::Length`].
    pub fn u16(&self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_ne_bytes(self.exact(what)?))
    }

    /// A `u32` attribute (native byte order); another length is a [`DecodeError::Length`] naming `what`.
    ///
    /// # Errors
    /// [`DecodeError::Length`].
    pub fn u32(&self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_ne_bytes(self.exact(what)?))
    }

    /// A `u64` attribute (native byte order); another length is a [`DecodeError::Length`] naming `what`.
    ///
    /// # Errors
    /// [`DecodeError::Length`].
    pub fn u64(&self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_ne_bytes(self.exact(what)?))
    }

    /// A fixed-size byte array attribute.
    ///
    /// # Errors
    /// [`DecodeError::Length`] when it has another length.
    pub fn array<const N: usize>(&self, what: &'static str) -> Result<[u8; N], DecodeError> {
        self.exact(what)
    }

    /// A string attribute, up to its first NUL.
    ///
    /// # Errors
    /// [`DecodeError::Invalid`] when it is not UTF-8.
    pub fn str(&self, what: &'static str) -> Result<&'a str, DecodeError> {
        let v = self.payload.split(|b| *b == 0).next().unwrap_or_default();
        std::str::from_utf8(v).map_err(|_| DecodeError::Invalid { what })
    }

    /// The attributes nested inside this one.
    pub fn nested(&self) -> impl Iterator<Item = Result<Attr<'a>, DecodeError>> + use<'a> {
        attrs(self.payload)
    }
}

/// Iterates the attributes in `buf`. An attribute whose length does not fit is an error (and
/// ends the iteration).
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = Result<Attr<'_>, DecodeError>> {
    std::iter::from_fn(move || {
        // Trailing bytes shorter than a header are alignment padding.
        if buf.len() < NLA_HDRLEN {
            return None;
        }
        let len = ne_u16(&buf[0..2]) as usize;
        if len < NLA_HDRLEN || len > buf.len() {
            let have = buf.len();
            buf = &[];
            return Some(Err(DecodeError::Truncated {
                what: "netlink attribute",
                len: have,
                need: len.max(NLA_HDRLEN),
            }));
        }
        let a = Attr {
            ty: ne_u16(&buf[2..4]) & NLA_TYPE_MASK,
            payload: &buf[NLA_HDRLEN..len],
        };
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some(Ok(a))
    })
}

/// Checks that `buf` holds at least a fixed header of `need` bytes; returns it and the rest.
///
/// # Errors
/// [`DecodeError::Truncated`] naming `what` when `buf` is shorter.
pub fn split_header<'a>(
    what: &'static str,
    buf: &'a [u8],
    need: usize,
) -> Result<(&'a [u8], &'a [u8]), DecodeError> {
    if buf.len() < need {
        return Err(DecodeError::Truncated {
            what,
            len: buf.len(),
            need,
        });
    }
    let rest = buf.get(need.next_multiple_of(4)..).unwrap_or_default();
    Ok((&buf[..need], rest))
}

/// The native-endian `u16` at the start of `b` (which must hold 2 bytes).
pub fn ne_u16(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

/// The native-endian `u32` at the start of `b` (which must hold 4 bytes).
pub fn ne_u32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_round_trip_with_padding_and_flags() {
        let mut buf = Vec::new();
        let m = begin(&mut buf, 0x20, NLM_F_REQUEST, 7);
        attr_str(&mut buf, 2, "wg0");
        let outer = nest_begin(&mut buf, 8);
        let inner = nest_begin(&mut buf, 0);
        attr_u8(&mut buf, 3, 24);
        attr_u16(&mut buf, 1, 2);
        attr_u64(&mut buf, 7, u64::MAX - 1);
        assert!(nest_end(&mut buf, inner));
        assert!(nest_end(&mut buf, outer));
        attr_u32(&mut buf, 5, 0xdead_beef);
        finish(&mut buf, m);
        assert_eq!(buf.len() % 4, 0);

        let msgs: Vec<_> = messages(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].ty, msgs[0].seq), (0x20, 7));
        let top: Vec<_> = attrs(msgs[0].payload).collect::<Result<_, _>>().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0].str("name").unwrap(), "wg0");
        assert_eq!(top[1].ty, 8, "the nested flag is masked off");
        assert_eq!(top[2].u32("x").unwrap(), 0xdead_beef);
        let elems: Vec<_> = top[1].nested().collect::<Result<_, _>>().unwrap();
        assert_eq!(elems.len(), 1);
        let fields: Vec<_> = elems[0].nested().collect::<Result<_, _>>().unwrap();
        assert_eq!(fields[0].u8("cidr").unwrap(), 24);
        assert_eq!(fields[1].u16("family").unwrap(), 2);
        assert_eq!(fields[2].u64("bytes").unwrap(), u64::MAX - 1);
        assert_eq!(
            fields[0].u32("cidr"),
            Err(DecodeError::Length {
                what: "cidr",
                len: 1
            })
        );
    }

    #[test]
    fn truncated_headers_and_attributes_are_errors() {
        let mut buf = Vec::new();
        let m = begin(&mut buf, 0x20, 0, 1);
        attr_u32(&mut buf, 1, 5);
        finish(&mut buf, m);
        // The datagram ends inside the message.
        let cut = &buf[..buf.len() - 2];
        let got: Vec<_> = messages(cut).collect();
        assert!(
            matches!(got[..], [Err(DecodeError::Truncated { .. })]),
            "{got:?}"
        );
        // Shorter than a header.
        assert!(matches!(
            messages(&buf[..10]).next(),
            Some(Err(DecodeError::Truncated { .. }))
        ));
        // A header claiming less than itself.
        let mut bad = buf.clone();
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(matches!(messages(&bad).next(), Some(Err(_))));
        // An attribute longer than its message.
        let mut bad = buf.clone();
        bad[NLMSG_HDRLEN..NLMSG_HDRLEN + 2].copy_from_slice(&200u16.to_ne_bytes());
        let msg = messages(&bad).next().unwrap().unwrap();
        assert!(matches!(
            attrs(msg.payload).next(),
            Some(Err(DecodeError::Truncated { .. }))
        ));
    }

    #[test]
    fn errors_decode_with_extended_ack_text() {
        // errno -17, the echoed header (capped), then NLMSGERR_ATTR_MSG.
        let mut buf = Vec::new();
        let m = begin(&mut buf, NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 9);
        buf.extend_from_slice(&(-17i32).to_ne_bytes());
        let echoed = begin(&mut buf, 0x20, NLM_F_REQUEST, 9);
        finish(&mut buf, echoed);
        attr_str(&mut buf, NLMSGERR_ATTR_MSG, "File exists");
        finish(&mut buf, m);
        let msg = messages(&buf).next().unwrap().unwrap();
        assert_eq!(
            decode_error(&msg).unwrap(),
            (17, Some("File exists".to_owned()))
        );
        let short = Message {
            ty: NLMSG_ERROR,
            flags: 0,
            seq: 1,
            payload: &[1, 2],
        };
        assert!(decode_error(&short).is_err());
    }
}
