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
//! The error path (`errors.rs`) adds probes on the C++ and Rust runtimes'
//! throw and catch points and tracepoints for fatal signals and exits; they
//! report with the thread's stack and mark the thread as unwinding.
//!
//! Nothing here formats or names anything: that is the agent's work.
#![no_std]
#![no_main]

mod errors;
mod goroutine;
mod http;
mod python;
mod stack;

use aya_ebpf::{
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext, Global,
};
use omegi_common::{
    counter, end_reason, event_kind, span_flags, state, FunctionState, ThreadExitEvent,
    ThreadStack, ALL_PROCESSES_KEY, ENTRY_FLAGS_SHIFT, ENTRY_PYTHON_EVAL, EXIT_KIND_SHIFT,
    EXIT_PYTHON_EVAL, GENERATION_SHIFT,
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
/// removed when the thread exits, for threads whose `THREAD_SLOTS` slot was
/// taken (see `stack::thread_stack`). Preallocated: kernels before 6.1 refuse
/// tracing programs a hash map that allocates (and allocating in a probe
/// costs), so this many stacks (15 MB) are reserved whatever the load; a
/// thread beyond them is counted (`THREADS_FULL`), not traced.
#[map]
static THREADS: HashMap<u32, ThreadStack> = HashMap::with_max_entries(4096, 0);

/// Shadow stacks in slot `tid % THREAD_SLOTS`, owned by `ThreadStack::owner`.
#[map]
static THREAD_SLOTS: Array<ThreadStack> = Array::with_max_entries(omegi_common::THREAD_SLOTS, 0);

/// Who holds each `THREAD_SLOTS` slot (slot → tid): inserting with
/// BPF_NOEXIST is the atomic claim.
#[map]
static SLOT_CLAIMS: HashMap<u32, u32> = HashMap::with_max_entries(omegi_common::THREAD_SLOTS, 0);

/// An all-zero stack to insert from: a `ThreadStack` is too large for the BPF stack.
#[map]
static EMPTY_STACK: PerCpuArray<ThreadStack> = PerCpuArray::with_max_entries(1, 0);

/// Values the agent changes while tracing (`omegi_common::state`).
#[map]
static STATE: Array<u32> = Array::with_max_entries(state::COUNT, 0);

/// Per-function counts and rules, indexed by function id; sized by the agent
/// to its function table and mapped into its memory.
#[map]
static FUNCTIONS: Array<FunctionState> =
    Array::with_max_entries(1, aya_ebpf::bindings::BPF_F_MMAPABLE);

/// Probe sites by link-time address → the cookie they would carry, for the
/// programs of kernels without attach cookies (`*_by_address`); sized by the
/// agent (1 where unused).
#[map]
static PROBE_SITES: HashMap<u64, u64> = HashMap::with_max_entries(1, 0);

/// Shadow stacks of a Go program's goroutines (`goroutine.rs`), keyed by
/// process and goroutine id; sized by the agent (1 for other programs).
#[map]
static GOROUTINES: HashMap<u64, ThreadStack> = HashMap::with_max_entries(1, 0);

/// The goroutine (its `GOROUTINES` key) that panicked last in each Go
/// process, until a call recovers: a panic nobody recovers ends the process,
/// and the exit closes that goroutine's calls as the error's.
#[map]
static GO_PANICKING: HashMap<u32, u64> = HashMap::with_max_entries(1024, 0);

/// See `omegi_common::globals::GO_GOID_OFFSET`.
#[no_mangle]
static GO_GOID_OFFSET: Global<u32> = Global::new(0);

#[no_mangle]
static TASK_MM_OFFSET: Global<u32> = Global::new(0);

#[no_mangle]
static MM_START_CODE_OFFSET: Global<u32> = Global::new(0);

#[no_mangle]
static EXEC_START: Global<u64> = Global::new(0);

#[no_mangle]
static SPLIT_AFTER_NS: Global<u64> = Global::new(0);

#[no_mangle]
static MIN_DURATION_NS: Global<u64> = Global::new(0);

#[no_mangle]
static BUDGET_SHORT_NS: Global<u64> = Global::new(0);

#[no_mangle]
static THREAD_SLOTS_USED: Global<u32> = Global::new(omegi_common::THREAD_SLOTS);

#[no_mangle]
static ALL_PROCESSES: Global<u8> = Global::new(0);

#[no_mangle]
static FORK_CHILD_PID_OFFSET: Global<u32> = Global::new(44);

/// Byte offset of `group_dead` in `sched_process_exit` (0: the kernel does
/// not have the field).
#[no_mangle]
static EXIT_GROUP_DEAD_OFFSET: Global<u32> = Global::new(0);

// The three function probes below are loaded twice: by aya, for links of
// one probe each, and by the agent itself with the `uprobe_multi` attach
// type, for links of many probes (attach/multi.rs). The code is the same.
// Kernels without attach cookies (before 5.15) get the `*_by_address`
// variants instead.

#[uprobe]
pub fn omegi_entry(ctx: ProbeContext) -> u32 {
    on_entry(&ctx, unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    0
}

/// A probe on a `ret` or tail jump: `rsp` is the frame's entry value again.
#[uprobe]
pub fn omegi_exit(ctx: ProbeContext) -> u32 {
    on_exit(&ctx, unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    0
}

/// The kernel's return probe: `ret` has already popped the return address.
#[uretprobe]
pub fn omegi_uretprobe(ctx: RetProbeContext) -> u32 {
    on_return(&ctx, unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    0
}

#[uprobe]
pub fn omegi_entry_by_address(ctx: ProbeContext) -> u32 {
    if let Some(cookie) = site_cookie(&ctx) {
        on_entry(&ctx, cookie);
    }
    0
}

#[uprobe]
pub fn omegi_exit_by_address(ctx: ProbeContext) -> u32 {
    if let Some(cookie) = site_cookie(&ctx) {
        on_exit(&ctx, cookie);
    }
    0
}

/// A uretprobe needs no cookie but its generation, which links of one probe
/// each never change (0).
#[uretprobe]
pub fn omegi_uretprobe_by_address(ctx: RetProbeContext) -> u32 {
    on_return(&ctx, 0);
    0
}

#[inline(always)]
fn on_entry(ctx: &ProbeContext, cookie: u64) {
    if !current_generation(cookie) {
        return;
    }
    if cookie & ENTRY_PYTHON_EVAL != 0 {
        python::on_entry(ctx, cookie as u32);
        return;
    }
    let fn_flags = (cookie >> ENTRY_FLAGS_SHIFT) as u32 & span_flags::OPEN_EXITS;
    let regs = unsafe { &*ctx.regs };
    if goroutine::enabled() {
        goroutine::on_entry(ctx, regs, cookie as u32, fn_flags);
        return;
    }
    stack::on_entry(ctx, cookie as u32, fn_flags, regs.rsp, regs.rip);
}

#[inline(always)]
fn on_exit(ctx: &ProbeContext, cookie: u64) {
    if !current_generation(cookie) {
        return;
    }
    let reason = (cookie >> EXIT_KIND_SHIFT) as u32 & 0xff;
    let regs = unsafe { &*ctx.regs };
    if goroutine::enabled() {
        goroutine::on_exit(regs, reason);
        return;
    }
    if cookie & EXIT_PYTHON_EVAL != 0 {
        python::on_exit(regs);
        return;
    }
    stack::on_exit(regs.rsp, reason, regs.rax, true);
}

#[inline(always)]
fn on_return(ctx: &RetProbeContext, cookie: u64) {
    if !current_generation(cookie) {
        return;
    }
    let regs = unsafe { &*ctx.regs };
    stack::on_exit(regs.rsp.wrapping_sub(8), end_reason::RETURNED, regs.rax, true);
}

/// The cookie of the probe that fired, found by its address: `rip` (the
/// probe's address in this process) minus the process's load bias is the
/// site's link-time address. The bias is the kernel's `mm->start_code`
/// (where the executable's lowest executable segment was mapped) minus that
/// segment's link-time address; 0 for an executable that is not PIE.
#[inline(always)]
fn site_cookie(ctx: &ProbeContext) -> Option<u64> {
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let mm: *const u8 = unsafe {
        bpf_probe_read_kernel(task.add(TASK_MM_OFFSET.load() as usize) as *const *const u8)
    }
    .ok()?;
    let start_code: u64 = unsafe {
        bpf_probe_read_kernel(mm.add(MM_START_CODE_OFFSET.load() as usize) as *const u64)
    }
    .ok()?;
    let bias = start_code.wrapping_sub(EXEC_START.load());
    let ip = unsafe { (*ctx.regs).rip };
    unsafe { PROBE_SITES.get(&ip.wrapping_sub(bias)) }.copied()
}

/// Whether a function probe belongs to the probe set in use (see
/// `GENERATION_SHIFT`).
#[inline(always)]
fn current_generation(cookie: u64) -> bool {
    let generation = ((cookie >> GENERATION_SHIFT) & 0xff) as u32;
    let current = STATE.get(state::GENERATION).copied().unwrap_or(0);
    generation == current
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
/// still on its stack and says the thread is gone.
#[tracepoint]
pub fn omegi_task_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if let Some(stack) = stack::thread_stack(tid) {
        let now = unsafe { bpf_ktime_get_ns() };
        stack::close_frames_above(stack, u64::MAX, now, tid, end_reason::THREAD_EXIT);
        http::thread_exit(stack, now, tid);
        stack::free_thread_stack(stack, tid);
        match EVENTS.reserve::<ThreadExitEvent>(0) {
            Some(mut entry) => {
                entry.write(ThreadExitEvent {
                    kind: event_kind::THREAD_EXIT,
                    tgid,
                    tid,
                    _pad: 0,
                    time_ns: now,
                });
                entry.submit(0);
            }
            None => count(counter::RECORDS_RING_FULL),
        }
    }
    if tid != tgid {
        let _ = TGIDS.remove(&tid);
    }
    // The last thread of a process: forget the process, so that a traced
    // program forking many short-lived children never fills the map, and a
    // reused pid is not traced by mistake.
    let group_dead_offset = EXIT_GROUP_DEAD_OFFSET.load() as usize;
    if group_dead_offset != 0 && unsafe { ctx.read_at::<u8>(group_dead_offset) }.unwrap_or(0) != 0 {
        let _ = TGIDS.remove(&tgid);
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

/// The current thread's ids, if its process is traced.
#[inline(always)]
fn traced_thread() -> Option<(u32, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    is_traced(tgid).then_some((tgid, tid))
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
