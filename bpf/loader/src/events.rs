//! Reading drop/trace events from the `EVENTS` ring buffer.

use std::net::{IpAddr, Ipv6Addr};

use aya::maps::{Map, MapData, RingBuf};
use nodeseal_bpf_common::{
    event::Event,
    reason::{DropReason, TraceReason},
};

use crate::{load::Program, maps::MapError};

/// Errors decoding an event record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventError {
    /// The record is not the size of an event (an object/loader mismatch).
    #[error("event record of {len} bytes, expected {expected}")]
    Size {
        /// Bytes received.
        len: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// Unknown kind, reason or program code.
    #[error("unknown {field} code {code} in event")]
    Code {
        /// Which field.
        field: &'static str,
        /// The code.
        code: u8,
    },
}

/// What an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The packet was dropped.
    Drop(DropReason),
    /// The packet passed (tracing on).
    Trace(TraceReason),
}

/// A decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// Drop or trace, with its reason.
    pub outcome: Outcome,
    /// The program that decided.
    pub program: Program,
    /// IP version (0 when the IP header could not be parsed).
    pub ip_version: u8,
    /// L4 protocol (0 when not parsed).
    pub protocol: u8,
    /// Source identity (0 when not known yet).
    pub src_identity: u32,
    /// Destination identity (0 when not known yet).
    pub dst_identity: u32,
    /// Interface the program ran on.
    pub ifindex: u32,
    /// `skb->mark` after the verdict.
    pub mark: u32,
    /// Source address (`None` when the IP header was not parsed).
    pub src: Option<IpAddr>,
    /// Destination address.
    pub dst: Option<IpAddr>,
    /// L4 source port (0 if none).
    pub src_port: u16,
    /// L4 destination port (ICMP: type; 0 if none).
    pub dst_port: u16,
    /// Peer node id where one was involved (0 otherwise).
    pub node_id: u16,
}

impl DropEvent {
    /// Decodes one ring buffer record.
    ///
    /// # Errors
    ///
    /// [`EventError`] for a record of the wrong size or with unknown codes.
    pub fn parse(bytes: &[u8]) -> Result<Self, EventError> {
        let expected = size_of::<Event>();
        if bytes.len() != expected {
            return Err(EventError::Size {
                len: bytes.len(),
                expected,
            });
        }
        // SAFETY: `Event` is repr(C), integers only, no padding (nodeseal-bpf-common checks the
        // size), so any `size_of::<Event>()` bytes are a valid value; read_unaligned copes with
        // the ring buffer's alignment.
        let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let outcome = match e.kind {
            Event::KIND_DROP => {
                Outcome::Drop(DropReason::from_code(e.reason).ok_or(EventError::Code {
                    field: "drop reason",
                    code: e.reason,
                })?)
            }
            Event::KIND_TRACE => {
                Outcome::Trace(TraceReason::from_code(e.reason).ok_or(EventError::Code {
                    field: "trace reason",
                    code: e.reason,
                })?)
            }
            code => {
                return Err(EventError::Code {
                    field: "kind",
                    code,
                });
            }
        };
        let program = match e.program {
            Event::PROGRAM_FROM_POD => Program::FromPod,
            Event::PROGRAM_FROM_NETWORK => Program::FromNetwork,
            Event::PROGRAM_TO_POD => Program::ToPod,
            code => {
                return Err(EventError::Code {
                    field: "program",
                    code,
                });
            }
        };
        let addr = |raw: [u8; 16]| -> Option<IpAddr> {
            let v6 = Ipv6Addr::from(raw);
            match e.ip_version {
                4 => v6.to_ipv4_mapped().map(IpAddr::V4),
                6 => Some(IpAddr::V6(v6)),
                _ => None,
            }
        };
        Ok(Self {
            outcome,
            program,
            ip_version: e.ip_version,
            protocol: e.protocol,
            src_identity: e.src_identity,
            dst_identity: e.dst_identity,
            ifindex: e.ifindex,
            mark: e.mark,
            src: addr(e.src_addr),
            dst: addr(e.dst_addr),
            src_port: e.src_port,
            dst_port: e.dst_port,
            node_id: e.node_id,
        })
    }
}

/// Reader over the `EVENTS` ring buffer. Poll with [`EventReader::drain`]; for async use, the
/// reader is `AsRawFd` through [`EventReader::ring`] and can be wrapped in tokio's `AsyncFd`.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self {
            ring: map.try_into().map_err(|source| MapError::Shape {
                name: "EVENTS",
                source,
            })?,
        })
    }

    /// Takes every record available now. Records that do not decode are returned as errors in
    /// place, so one bad record does not hide the others.
    pub fn drain(&mut self) -> Vec<Result<DropEvent, EventError>> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            out.push(DropEvent::parse(&item));
        }
        out
    }

    /// Takes at most `limit` records available now, like [`EventReader::drain`]; a reader that
    /// holds a lock while draining bounds how long it holds it.
    pub fn drain_up_to(&mut self, limit: usize) -> Vec<Result<DropEvent, EventError>> {
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(item) = self.ring.next() else {
                break;
            };
            out.push(DropEvent::parse(&item));
        }
        out
    }

    /// The underlying ring buffer (for readiness polling).
    pub fn ring(&mut self) -> &mut RingBuf<MapData> {
        &mut self.ring
    }
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader").finish_non_exhaustive()
    }
}
