//! The per-thread shadow stack: pushing calls, closing them, emitting spans.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    EbpfContext,
};
use aya_log_ebpf::debug;
use omegi_common::{
    counter, end_reason, event_kind, span_flags, Frame, SpanEvent, ThreadStack, MAX_DEPTH,
};

use crate::{count, traced_thread, EMPTY_STACK, EVENTS, SPLIT_AFTER_NS, THREADS};

/// A traced function was entered: `sp` is `rsp` at its first instruction
/// (pointing at the return address), `ip` the probe's address, `fn_flags`
/// the [`span_flags`] its frames always carry (`OPEN_EXITS`).
#[inline(always)]
pub fn on_entry<C: EbpfContext>(ctx: &C, fn_id: u32, fn_flags: u32, sp: u64, ip: u64) {
    let Some((tgid, tid)) = traced_thread() else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(stack) = thread_stack(tgid, tid) else {
        count(counter::THREADS_FULL);
        debug!(ctx, "thread table full, tid {}", tid);
        return;
    };

    // A live caller's frame is strictly above ours; anything at or below it
    // has gone without our seeing it leave.
    close_frames_above(stack, sp, now, tid, end_reason::UNWOUND);

    let depth = stack.depth as usize;
    if depth >= MAX_DEPTH {
        count(counter::DEPTH_OVERFLOW);
        debug!(ctx, "deeper than {} calls, tid {}", MAX_DEPTH, tid);
        return;
    }
    let span_id = random_id();
    let (flags, parent_span_id, trace_key) = if depth == 0 {
        (span_flags::TRACE_ROOT, 0, span_id)
    } else {
        let parent = &stack.frames[slot(depth - 1)];
        let split_after = SPLIT_AFTER_NS.load();
        if split_after != 0 && now.wrapping_sub(parent.start_ns) > split_after {
            (span_flags::TRACE_ROOT, parent.span_id, span_id)
        } else {
            (0, parent.span_id, parent.trace_key)
        }
    };
    stack.frames[slot(depth)] = Frame {
        fn_id,
        flags: flags | fn_flags,
        sp,
        start_ns: now,
        span_id,
        parent_span_id,
        trace_key,
        entry_ip: ip,
    };
    stack.depth = depth as u32 + 1;
}

/// A probed exit (`ret`, tail jump, or uretprobe) ran with the frame's entry
/// stack pointer `sp`; `ret` is `rax`.
#[inline(always)]
pub fn on_exit(sp: u64, reason: u32, ret: u64) {
    let Some((_, tid)) = traced_thread() else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(stack) = THREADS.get_ptr_mut(&tid) else {
        count(counter::UNMATCHED_EXIT);
        return;
    };
    let stack = unsafe { &mut *stack };
    // Frames below the one being left were left without a return.
    close_frames_below(stack, sp, now, tid);
    let depth = stack.depth as usize;
    if depth == 0 {
        count(counter::UNMATCHED_EXIT);
        return;
    }
    let top = stack.frames[slot(depth - 1)];
    if top.sp != sp {
        // Entered before we attached, or not traced (too deep).
        count(counter::UNMATCHED_EXIT);
        return;
    }
    let ret = if reason == end_reason::RETURNED {
        ret
    } else {
        0
    };
    emit_span(&top, depth as u32 - 1, now, reason, stack.tgid, tid, ret);
    stack.depth = depth as u32 - 1;
}

/// Closes, innermost first, the frames whose stack pointer is at or below
/// `sp`, with `reason` — except that a frame exactly at `sp` whose function
/// has `OPEN_EXITS` (it can leave by a jump no probe sees) was replaced by
/// that jump (`REPLACED`), unless the thread is unwinding. A frame at `sp`
/// whose every exit is probed did not jump away: it was unwound (an
/// exception caught by its caller, which then made the call at `sp`).
#[inline(always)]
pub fn close_frames_above(stack: &mut ThreadStack, sp: u64, now: u64, tid: u32, reason: u32) {
    for _ in 0..MAX_DEPTH {
        let depth = stack.depth as usize;
        if depth == 0 {
            break;
        }
        let frame = stack.frames[slot(depth - 1)];
        if frame.sp > sp {
            break;
        }
        let why = if frame.sp == sp
            && frame.flags & span_flags::OPEN_EXITS != 0
            && stack.unwinding == 0
            && reason == end_reason::UNWOUND
        {
            end_reason::REPLACED
        } else {
            reason
        };
        emit_span(&frame, depth as u32 - 1, now, why, stack.tgid, tid, 0);
        stack.depth = depth as u32 - 1;
    }
}

/// Closes as unwound the frames strictly below `sp`.
#[inline(always)]
fn close_frames_below(stack: &mut ThreadStack, sp: u64, now: u64, tid: u32) {
    for _ in 0..MAX_DEPTH {
        let depth = stack.depth as usize;
        if depth == 0 {
            break;
        }
        let frame = stack.frames[slot(depth - 1)];
        if frame.sp >= sp {
            break;
        }
        emit_span(
            &frame,
            depth as u32 - 1,
            now,
            end_reason::UNWOUND,
            stack.tgid,
            tid,
            0,
        );
        stack.depth = depth as u32 - 1;
    }
}

#[inline(always)]
fn emit_span(frame: &Frame, depth: u32, end_ns: u64, reason: u32, tgid: u32, tid: u32, ret: u64) {
    let Some(mut entry) = EVENTS.reserve::<SpanEvent>(0) else {
        count(counter::RING_FULL);
        return;
    };
    entry.write(SpanEvent {
        kind: event_kind::SPAN,
        end_reason: reason,
        tgid,
        tid,
        fn_id: frame.fn_id,
        flags: frame.flags,
        depth,
        _pad: 0,
        start_ns: frame.start_ns,
        end_ns,
        span_id: frame.span_id,
        parent_span_id: frame.parent_span_id,
        trace_key: frame.trace_key,
        ret,
    });
    // The agent drains on a timer: a wakeup per event would cost more than
    // the probe.
    entry.submit(BPF_RB_NO_WAKEUP as u64);
}

#[inline(always)]
fn thread_stack(tgid: u32, tid: u32) -> Option<&'static mut ThreadStack> {
    if let Some(stack) = THREADS.get_ptr_mut(&tid) {
        return Some(unsafe { &mut *stack });
    }
    let empty = EMPTY_STACK.get_ptr(0)?;
    THREADS
        .insert(&tid, unsafe { &*empty }, BPF_NOEXIST as u64)
        .ok()?;
    let stack = unsafe { &mut *THREADS.get_ptr_mut(&tid)? };
    stack.tgid = tgid;
    Some(stack)
}

/// The frame slot for a stack index. The index passes through a volatile
/// read so that LLVM cannot fold the bounds mask into the address arithmetic
/// (it turned `frames[(d - 1) & 63]` into `frames + d * 48 - 48`, which the
/// verifier rejects as a possibly negative offset).
#[inline(always)]
pub fn slot(index: usize) -> usize {
    let index = unsafe { core::ptr::read_volatile(&index) };
    index & (MAX_DEPTH - 1)
}

#[inline(always)]
fn random_id() -> u64 {
    let id = unsafe { ((bpf_get_prandom_u32() as u64) << 32) | bpf_get_prandom_u32() as u64 };
    if id == 0 {
        1
    } else {
        id
    }
}
