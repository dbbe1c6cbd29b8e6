//! Drops, counters and events.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use nodeseal_bpf_common::{event::Event, reason::DropReason};

use crate::{
    maps::{DROP_COUNTERS, EVENTS},
    parse::Packet,
};

/// Identities and node known when the verdict was reached.
pub struct Who {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub node_id: u16,
}

impl Who {
    pub const fn unknown() -> Self {
        Self {
            src_identity: 0,
            dst_identity: 0,
            node_id: 0,
        }
    }
}

#[inline(always)]
pub fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to the program.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: as in `mark`.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Counts the drop, emits its event, and returns the drop verdict.
#[inline(always)]
pub fn drop(ctx: &TcContext, program: u8, reason: DropReason, p: &Packet, who: &Who) -> i32 {
    if let Some(counter) = DROP_COUNTERS.get_ptr_mut(u32::from(reason.code())) {
        // SAFETY: per-CPU slot of an array map; only this CPU writes it while we run.
        unsafe { *counter += 1 };
    }
    emit(ctx, Event::KIND_DROP, reason.code(), program, p, who);
    TC_ACT_SHOT
}

/// Emits a trace event (callers check the trace flag) and returns the pass verdict.
#[inline(always)]
pub fn trace(ctx: &TcContext, program: u8, reason: u8, p: &Packet, who: &Who) -> i32 {
    emit(ctx, Event::KIND_TRACE, reason, program, p, who);
    TC_ACT_OK
}

#[inline(always)]
fn emit(ctx: &TcContext, kind: u8, reason: u8, program: u8, p: &Packet, who: &Who) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        // Ring buffer full: the counter above still records the drop.
        return;
    };
    entry.write(Event {
        kind,
        reason,
        program,
        protocol: p.protocol,
        ip_version: p.ip_version,
        reserved: [0; 3],
        src_identity: who.src_identity,
        dst_identity: who.dst_identity,
        ifindex: ifindex(ctx),
        mark: mark(ctx),
        src_port: p.src_port,
        dst_port: p.dst_port,
        node_id: who.node_id,
        reserved2: 0,
        src_addr: p.src.bytes(),
        dst_addr: p.dst.bytes(),
    });
    entry.submit(0);
}
