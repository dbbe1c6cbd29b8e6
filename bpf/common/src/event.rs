//! The record the datapath writes to the `EVENTS` ring buffer.

/// One drop or trace event. 64 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// [`Self::KIND_DROP`] or [`Self::KIND_TRACE`].
    pub kind: u8,
    /// A `DropReason` code for drops, a `TraceReason` code for traces.
    pub reason: u8,
    /// `PROGRAM_*`: which program decided.
    pub program: u8,
    /// IP protocol of the (innermost parsed) L4 header; 0 if not parsed.
    pub protocol: u8,
    /// 4 or 6; 0 if the IP header could not be parsed.
    pub ip_version: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
    /// Identity of the sender (0 if not known when the verdict was reached).
    pub src_identity: u32,
    /// Identity of the receiver (0 if not known when the verdict was reached).
    pub dst_identity: u32,
    /// Interface the program ran on.
    pub ifindex: u32,
    /// `skb->mark` after the verdict.
    pub mark: u32,
    /// L4 source port (host order), 0 if none.
    pub src_port: u16,
    /// L4 destination port (host order; ICMP: type), 0 if none.
    pub dst_port: u16,
    /// Peer node id, where one is involved.
    pub node_id: u16,
    /// Reserved, zero.
    pub reserved2: u16,
    /// Source address: IPv6, or IPv4-mapped IPv6.
    pub src_addr: [u8; 16],
    /// Destination address: IPv6, or IPv4-mapped IPv6.
    pub dst_addr: [u8; 16],
}

impl Event {
    /// A dropped packet.
    pub const KIND_DROP: u8 = 1;
    /// A passed packet (tracing enabled).
    pub const KIND_TRACE: u8 = 2;
    /// from-pod.
    pub const PROGRAM_FROM_POD: u8 = 1;
    /// from-network.
    pub const PROGRAM_FROM_NETWORK: u8 = 2;
    /// to-pod.
    pub const PROGRAM_TO_POD: u8 = 3;
}

const _: () = assert!(size_of::<Event>() == 64);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], Copy, integers only, no padding (size checked above).
unsafe impl aya::Pod for Event {}
