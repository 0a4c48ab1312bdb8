//! omegi's kernel side.
//!
//! Every traced function has an entry probe and probes on its exits (its
//! `ret` and tail-jump instructions, or a uretprobe where the binary cannot
//! unwind). The probes keep a shadow stack per thread and emit one
//! [`SpanEvent`] into the `EVENTS` ring buffer when a call ends.
//!
//! A frame is matched to its exit by stack pointer, not by function: at a
//! function's first instruction `rsp` points at the return address, and it
//! points there again at the `ret` or tail jump that leaves it. Any frame whose
//! stack pointer is at or below a newer entry's, or below a newer exit's, can
//! no longer be live: it was left by unwinding, `longjmp` or a jump we did not
//! see, and is closed as such. This needs no probe on the unwinder and never
//! touches the traced program's stack.
//!
//! Nothing here formats or names anything: that is the agent's work.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext, Global,
};
use aya_log_ebpf::debug;
use omegi_common::{
    counter, end_reason, event_kind, span_flags, Frame, SpanEvent, ThreadStack, ALL_PROCESSES_KEY,
    ENTRY_FLAGS_SHIFT, EXIT_KIND_SHIFT, MAX_DEPTH,
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Processes to trace (tgid → 1); with `ALL_PROCESSES`, every process while
/// it holds `ALL_PROCESSES_KEY`. Emptied by the agent to stop tracing.
#[map]
static TGIDS: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);

/// Shadow stacks by thread id, created at a thread's first traced call and
/// removed when the thread exits.
#[map]
static THREADS: HashMap<u32, ThreadStack> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// An all-zero stack to insert from: a `ThreadStack` is too large for the BPF stack.
#[map]
static EMPTY_STACK: PerCpuArray<ThreadStack> = PerCpuArray::with_max_entries(1, 0);

#[no_mangle]
static SPLIT_AFTER_NS: Global<u64> = Global::new(0);

#[no_mangle]
static ALL_PROCESSES: Global<u8> = Global::new(0);

#[no_mangle]
static FORK_CHILD_PID_OFFSET: Global<u32> = Global::new(44);

#[uprobe]
pub fn omegi_entry(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let fn_id = cookie as u32;
    let fn_flags = (cookie >> ENTRY_FLAGS_SHIFT) as u32 & span_flags::OPEN_EXITS;
    let sp = unsafe { (*ctx.regs).rsp };
    on_entry(&ctx, fn_id, fn_flags, sp);
    0
}

/// A probe on a `ret` or tail jump: `rsp` is the frame's entry value again.
#[uprobe]
pub fn omegi_exit(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let reason = (cookie >> EXIT_KIND_SHIFT) as u32;
    let sp = unsafe { (*ctx.regs).rsp };
    on_exit(&ctx, sp, reason);
    0
}

/// The kernel's return probe: `ret` has already popped the return address.
#[uretprobe]
pub fn omegi_uretprobe(ctx: RetProbeContext) -> u32 {
    let sp = unsafe { (*ctx.regs).rsp }.wrapping_sub(8);
    on_exit(&ctx, sp, end_reason::RETURNED);
    0
}

/// `sched/sched_process_fork`: runs in the parent; follows children of traced
/// processes (a thread's id lands here too and is removed at its exit).
#[tracepoint]
pub fn omegi_fork(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if is_traced(tgid) && ALL_PROCESSES.load() == 0 {
        let offset = FORK_CHILD_PID_OFFSET.load() as usize;
        if let Ok(child) = unsafe { ctx.read_at::<u32>(offset) } {
            let _ = TGIDS.insert(&child, &1, 0);
        }
    }
    0
}

/// `sched/sched_process_exit`: runs in the exiting thread; closes what is
/// still on its stack.
#[tracepoint]
pub fn omegi_task_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if let Some(stack) = THREADS.get_ptr_mut(&tid) {
        let stack = unsafe { &mut *stack };
        let now = unsafe { bpf_ktime_get_ns() };
        close_frames_above(stack, u64::MAX, now, tgid, tid, end_reason::THREAD_EXIT);
        let _ = THREADS.remove(&tid);
    }
    if tid != tgid {
        let _ = TGIDS.remove(&tid);
    }
    0
}

#[inline(always)]
fn is_traced(tgid: u32) -> bool {
    let key = if ALL_PROCESSES.load() != 0 {
        ALL_PROCESSES_KEY
    } else {
        tgid
    };
    unsafe { TGIDS.get(&key) }.is_some()
}

#[inline(always)]
fn on_entry<C: EbpfContext>(ctx: &C, fn_id: u32, fn_flags: u32, sp: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !is_traced(tgid) {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(stack) = thread_stack(tgid, tid) else {
        count(counter::THREADS_FULL);
        debug!(ctx, "thread table full, tid {}", tid);
        return;
    };

    // A live caller's frame is strictly above ours; anything at or below it
    // has gone without our seeing it leave.
    close_frames_above(stack, sp, now, tgid, tid, end_reason::UNWOUND);

    let depth = stack.depth as usize;
    if depth >= MAX_DEPTH {
        count(counter::DEPTH_OVERFLOW);
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
    };
    stack.depth = depth as u32 + 1;
}

#[inline(always)]
fn on_exit<C: EbpfContext>(ctx: &C, sp: u64, reason: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !is_traced(tgid) {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(stack) = THREADS.get_ptr_mut(&tid) else {
        count(counter::UNMATCHED_EXIT);
        return;
    };
    let stack = unsafe { &mut *stack };
    // Frames below the one being left were left without a return.
    close_frames_below(stack, sp, now, tgid, tid);
    let depth = stack.depth as usize;
    if depth == 0 {
        count(counter::UNMATCHED_EXIT);
        return;
    }
    let top = stack.frames[slot(depth - 1)];
    if top.sp != sp {
        // Entered before we attached, or not traced (too deep).
        count(counter::UNMATCHED_EXIT);
        debug!(ctx, "unmatched exit, tid {}", tid);
        return;
    }
    emit_span(&top, depth as u32 - 1, now, reason, tgid, tid);
    stack.depth = depth as u32 - 1;
}

/// Closes, innermost first, the frames whose stack pointer is at or below
/// `sp`: reason `REPLACED` for one exactly at `sp` whose function has
/// `OPEN_EXITS` (a jump we could not see took it over), `reason` for the
/// others. A frame exactly at `sp` whose every exit is probed did not jump
/// away: it was unwound (an exception caught by its caller, which then made
/// the call at `sp`).
#[inline(always)]
fn close_frames_above(
    stack: &mut ThreadStack,
    sp: u64,
    now: u64,
    tgid: u32,
    tid: u32,
    reason: u32,
) {
    for _ in 0..MAX_DEPTH {
        let depth = stack.depth as usize;
        if depth == 0 {
            break;
        }
        let frame = stack.frames[slot(depth - 1)];
        if frame.sp > sp {
            break;
        }
        let why = if frame.sp == sp && frame.flags & span_flags::OPEN_EXITS != 0 {
            end_reason::REPLACED
        } else {
            reason
        };
        emit_span(&frame, depth as u32 - 1, now, why, tgid, tid);
        stack.depth = depth as u32 - 1;
    }
}

/// Closes as unwound the frames strictly below `sp`.
#[inline(always)]
fn close_frames_below(stack: &mut ThreadStack, sp: u64, now: u64, tgid: u32, tid: u32) {
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
            tgid,
            tid,
        );
        stack.depth = depth as u32 - 1;
    }
}

#[inline(always)]
fn emit_span(frame: &Frame, depth: u32, end_ns: u64, reason: u32, tgid: u32, tid: u32) {
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
    });
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
fn slot(index: usize) -> usize {
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

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
