//! The per-thread shadow stack: pushing calls, closing them, emitting spans.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns},
    EbpfContext,
};
use aya_log_ebpf::debug;
use omegi_common::{
    counter, end_reason, event_kind, span_flags, Frame, SpanEvent, ThreadStack,
    BUDGET_DURATION_CAP_NS, MAX_DEPTH,
};

use crate::{
    count, traced_thread, BUDGET_SHORT_NS, EMPTY_STACK, EVENTS, FUNCTIONS, MIN_DURATION_NS,
    SLOT_CLAIMS, SPLIT_AFTER_NS, THREADS, THREAD_SLOTS, THREAD_SLOTS_USED,
};

/// A traced function was entered: `sp` is `rsp` at its first instruction
/// (pointing at the return address), `ip` the probe's address, `fn_flags`
/// the [`span_flags`] its frames always carry (`OPEN_EXITS`).
#[inline(always)]
pub fn on_entry<C: EbpfContext>(ctx: &C, fn_id: u32, fn_flags: u32, sp: u64, ip: u64) {
    let tid = bpf_get_current_pid_tgid() as u32;
    // A thread has a stack only if its process is traced: in the steady
    // state one lookup finds both.
    let stack = match thread_stack(tid) {
        Some(stack) => stack,
        None => {
            let Some((tgid, tid)) = traced_thread() else {
                return;
            };
            let Some(stack) = new_thread_stack(tgid, tid) else {
                count(counter::THREADS_FULL);
                debug!(ctx, "thread table full, tid {}", tid);
                return;
            };
            stack
        }
    };
    let now = unsafe { bpf_ktime_get_ns() };
    push(ctx, stack, fn_id, fn_flags, sp, ip, now, tid);
}

/// Pushes a call on `stack` (a thread's, or a goroutine's with `tid` its
/// id), first closing the frames it shows were left unseen.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn push<C: EbpfContext>(
    ctx: &C,
    stack: &mut ThreadStack,
    fn_id: u32,
    fn_flags: u32,
    sp: u64,
    ip: u64,
    now: u64,
    tid: u32,
) {
    // A live caller's frame is strictly above ours; anything at or below it
    // has gone without our seeing it leave.
    close_frames_above(stack, sp, now, tid, end_reason::UNWOUND);

    let depth = stack.depth as usize;
    if depth >= MAX_DEPTH {
        count(counter::DEPTH_OVERFLOW);
        debug!(ctx, "deeper than {} calls, tid {}", MAX_DEPTH, tid);
        return;
    }
    let span_id = next_span_id(stack);
    let request = &stack.request;
    let (flags, parent_span_id, trace_key) = if request.span_id != 0 && depth as u32 == request.depth
    {
        // The HTTP request this thread is answering is its entry span.
        (0, request.span_id, request.span_id)
    } else if depth == 0 {
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
        object: 0,
    };
    stack.depth = depth as u32 + 1;
}

/// A probed exit (`ret`, tail jump, or uretprobe) ran with the frame's entry
/// stack pointer `sp`; `ret` is `rax`. An exit that matches no frame is
/// counted with `count_unmatched` (not for exits of a function most of whose
/// calls are not kept, the Python eval function's).
#[inline(always)]
pub fn on_exit(sp: u64, reason: u32, ret: u64, count_unmatched: bool) {
    let tid = bpf_get_current_pid_tgid() as u32;
    // No stack: the thread made no traced call, or its process is not traced.
    let Some(stack) = thread_stack(tid) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if !count_unmatched {
        close_frames_below(stack, sp, now, tid);
        let depth = stack.depth as usize;
        if depth == 0 || stack.frames[slot(depth - 1)].sp != sp {
            return;
        }
    }
    pop(stack, sp, reason, ret, now, tid);
}

/// Ends the call on `stack` whose frame is at `sp` (see [`push`]).
#[inline(always)]
pub fn pop(stack: &mut ThreadStack, sp: u64, reason: u32, ret: u64, now: u64, tid: u32) {
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
    end_frame(stack, &top, depth - 1, now, reason, tid, ret);
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
        end_frame(stack, &frame, depth - 1, now, why, tid, 0);
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
        end_frame(stack, &frame, depth - 1, now, end_reason::UNWOUND, tid, 0);
        stack.depth = depth as u32 - 1;
    }
}

/// A call ended: counts it for its function, then emits it, unless
/// `--min-duration` leaves it out. A call is kept when it lasted long enough,
/// when it did not end by returning (unwinding, thread exit: the error path),
/// while the thread unwinds, when its return value fails the function's
/// `--error-if` rule, or when a call under it was kept; a kept call marks its
/// caller's frame, so every ancestor of a kept call is kept too.
#[inline(always)]
fn end_frame(
    stack: &mut ThreadStack,
    frame: &Frame,
    index: usize,
    now: u64,
    reason: u32,
    tid: u32,
    ret: u64,
) {
    end_call(stack, frame, index, now, reason, tid, ret);
    if stack.request.span_id != 0 {
        crate::http::frame_left(stack, index as u32, now, tid);
    }
}

#[inline(always)]
fn end_call(
    stack: &mut ThreadStack,
    frame: &Frame,
    index: usize,
    now: u64,
    reason: u32,
    tid: u32,
    ret: u64,
) {
    let duration = now.wrapping_sub(frame.start_ns);
    // Set by the Python exit probe for the call it is ending, and only it.
    let code_unit = core::mem::take(&mut stack.python_code_unit);
    let function = FUNCTIONS.get_ptr_mut(frame.fn_id);
    if let Some(function) = function {
        // Plain adds, not atomic ones: two CPUs ending calls of the same
        // function at the same moment may lose a count, which the overhead
        // budget can afford, and a locked add on a shared line is not free.
        let function = unsafe { &mut *function };
        function.calls += 1;
        function.total_ns += if duration < BUDGET_DURATION_CAP_NS {
            duration
        } else {
            BUDGET_DURATION_CAP_NS
        };
        if duration < BUDGET_SHORT_NS.load() {
            function.short_calls += 1;
        }
        // Its exit probes are gone: a frame left open at its detach is
        // closed by evidence later, and would look unwound. Left out, unless
        // the thread really is unwinding (the error path is kept whole).
        if function.detached != 0
            && !matches!(reason, end_reason::RETURNED | end_reason::TAIL_CALL)
            && stack.unwinding == 0
        {
            count(counter::DETACHED_IN_FLIGHT);
            return;
        }
    }
    let min_duration = MIN_DURATION_NS.load();
    if min_duration != 0 {
        let ordinary_end = matches!(
            reason,
            end_reason::RETURNED | end_reason::TAIL_CALL | end_reason::REPLACED
        );
        if ordinary_end
            && duration < min_duration
            && stack.unwinding == 0
            && frame.flags & span_flags::KEEP == 0
            && !(reason == end_reason::RETURNED
                && function.is_some_and(|f| unsafe { (*f).rule_fails(ret) }))
        {
            count(counter::FILTERED);
            return;
        }
        if index > 0 {
            stack.frames[slot(index - 1)].flags |= span_flags::KEEP;
        }
    }
    emit_span(frame, index as u32, now, reason, stack.tgid, tid, ret, code_unit);
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn emit_span(
    frame: &Frame,
    depth: u32,
    end_ns: u64,
    reason: u32,
    tgid: u32,
    tid: u32,
    ret: u64,
    code_unit: u32,
) {
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
        code_unit,
        start_ns: frame.start_ns,
        end_ns,
        span_id: frame.span_id,
        parent_span_id: frame.parent_span_id,
        trace_key: frame.trace_key,
        ret,
        entry_ip: frame.entry_ip,
        object: frame.object,
    });
    // The agent drains on a timer: a wakeup per event would cost more than
    // the probe.
    entry.submit(BPF_RB_NO_WAKEUP as u64);
}

/// The stack of thread `tid`, if it has made traced calls: in its
/// `THREAD_SLOTS` slot (an array index, no hashing) when it owns the slot,
/// else in the `THREADS` hash map.
#[inline(always)]
pub fn thread_stack(tid: u32) -> Option<&'static mut ThreadStack> {
    if let Some(slot) = slot_index(tid).and_then(|index| THREAD_SLOTS.get_ptr_mut(index)) {
        let slot = unsafe { &mut *slot };
        if slot.owner == tid {
            return Some(slot);
        }
    }
    THREADS
        .get_ptr_mut(&tid)
        .map(|stack| unsafe { &mut *stack })
}

/// The slot of thread `tid`: `tid % THREAD_SLOTS_USED` (a power of two the
/// agent may lower, for tests; 0 keeps every stack in the hash map).
#[inline(always)]
fn slot_index(tid: u32) -> Option<u32> {
    let used = THREAD_SLOTS_USED.load();
    (used != 0).then(|| tid & (used - 1))
}

/// Creates the stack of a thread making its first traced call: in its slot
/// if no other thread holds it (claimed atomically in `SLOT_CLAIMS`), else
/// in the hash map.
#[inline(always)]
pub fn new_thread_stack(tgid: u32, tid: u32) -> Option<&'static mut ThreadStack> {
    if let Some(index) =
        slot_index(tid).filter(|index| SLOT_CLAIMS.insert(index, &tid, BPF_NOEXIST as u64).is_ok())
    {
        if let Some(slot) = THREAD_SLOTS.get_ptr_mut(index) {
            let slot = unsafe { &mut *slot };
            slot.depth = 0;
            slot.unwinding = 0;
            slot.tgid = tgid;
            slot.next_id = random_id();
            slot.request = Default::default();
            slot.python_raised = 0;
            slot.python_code_unit = 0;
            // Last: from here on lookups find the slot.
            slot.owner = tid;
            return Some(slot);
        }
        let _ = SLOT_CLAIMS.remove(&index);
    }
    let empty = EMPTY_STACK.get_ptr(0)?;
    // Fails only when the table is full (the lookup just found no stack).
    let _ = THREADS.insert(&tid, unsafe { &*empty }, BPF_NOEXIST as u64);
    let stack = unsafe { &mut *THREADS.get_ptr_mut(&tid)? };
    stack.tgid = tgid;
    stack.owner = tid;
    stack.next_id = random_id();
    Some(stack)
}

/// A thread exits: its stack (already emptied) goes, and its slot is free.
#[inline(always)]
pub fn free_thread_stack(stack: &mut ThreadStack, tid: u32) {
    let slot = slot_index(tid).filter(|&index| {
        THREAD_SLOTS
            .get_ptr(index)
            .is_some_and(|slot| core::ptr::eq(slot, stack))
    });
    match slot {
        Some(index) => {
            stack.depth = 0;
            stack.owner = 0;
            let _ = SLOT_CLAIMS.remove(&index);
        }
        None => {
            let _ = THREADS.remove(&tid);
        }
    }
}

/// A span id: the thread's counter, advanced by the golden ratio and mixed
/// (splitmix64, a bijection), from a random start per thread. Unique within
/// the thread, random-looking, and two helper calls cheaper per call than
/// asking the kernel for 64 random bits.
#[inline(always)]
pub fn next_span_id(stack: &mut ThreadStack) -> u64 {
    stack.next_id = stack.next_id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = stack.next_id;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if z == 0 {
        1
    } else {
        z
    }
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
pub fn random_id() -> u64 {
    let id = unsafe { ((bpf_get_prandom_u32() as u64) << 32) | bpf_get_prandom_u32() as u64 };
    if id == 0 {
        1
    } else {
        id
    }
}
