//! Go programs: shadow stacks per goroutine, not per thread.
//!
//! A goroutine runs on whichever thread the scheduler gives it and may
//! return on another one than it was called on, and one thread runs many
//! goroutines, so a Go call is kept on its goroutine's stack. The current
//! goroutine's `g` is in `r14` at a function's first instruction and at its
//! `RET` (the register ABI of Go 1.17 and later); its id is read at the
//! offset the agent found for the binary's Go version (`GO_GOID_OFFSET`).
//!
//! Goroutine stacks move when they grow (`runtime.copystack`), which shifts
//! every frame by the same amount as the stack's top, `g.stack.hi`: the
//! distance `stack.hi - rsp` of a live frame never changes, so frames are
//! matched by it. It is turned into a virtual stack pointer that decreases
//! as calls nest, so that the thread stacks' rules (`stack.rs`: callers
//! above, frames left unseen closed) apply unchanged. A function whose stack
//! check calls `morestack` starts again from its first instruction on the
//! new stack: the entry probe fires twice for one call, at the same
//! distance, and the second is not a new call.
//!
//! A stack exists while the goroutine has traced calls in flight and is
//! removed when its outermost one ends, so goroutines that ended take no
//! room.

use aya_ebpf::{
    bindings::{pt_regs, BPF_NOEXIST},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    EbpfContext,
};
use omegi_common::{counter, span_flags, ThreadStack};

use crate::{count, stack, traced_thread, EMPTY_STACK, GOROUTINES, GO_GOID_OFFSET};

/// Offset of `stack.hi` in `runtime.g` (`stack` is its first member, a
/// `{lo, hi uintptr}`), the same in every Go version.
const STACK_HI_OFFSET: u64 = 8;

/// Where virtual stack pointers count down from: far above any distance.
const VIRTUAL_TOP: u64 = 1 << 62;

/// Whether the traced binary is a Go program.
#[inline(always)]
pub fn enabled() -> bool {
    GO_GOID_OFFSET.load() != 0
}

/// The current goroutine's map key and id, and the virtual stack pointer of
/// `rsp` on its stack.
#[inline(always)]
fn current(regs: &pt_regs, tgid: u32) -> Option<(u64, u64, u64)> {
    let g = regs.r14;
    if g == 0 {
        return None;
    }
    let goid: u64 =
        unsafe { bpf_probe_read_user((g + u64::from(GO_GOID_OFFSET.load())) as *const u64) }
            .ok()?;
    let hi: u64 = unsafe { bpf_probe_read_user((g + STACK_HI_OFFSET) as *const u64) }.ok()?;
    let distance = hi.wrapping_sub(regs.rsp);
    if distance >= VIRTUAL_TOP {
        // Not on this goroutine's stack (a system stack): nothing to match.
        return None;
    }
    // goids are never reused within a process; 40 bits of one are far more
    // than a process starts.
    let key = (u64::from(tgid) << 40) | (goid & ((1 << 40) - 1));
    Some((key, goid, VIRTUAL_TOP - distance))
}

/// The current goroutine's calls, their `GOROUTINES` key and its id (low 32
/// bits), if it has some.
#[inline(always)]
pub fn current_stack(regs: &pt_regs, tgid: u32) -> Option<(&'static mut ThreadStack, u64, u32)> {
    let (key, goid, _) = current(regs, tgid)?;
    Some((stack_by_key(key)?, key, goid as u32))
}

/// The calls of the goroutine `key`.
#[inline(always)]
pub fn stack_by_key(key: u64) -> Option<&'static mut ThreadStack> {
    GOROUTINES.get_ptr_mut(&key).map(|stack| unsafe { &mut *stack })
}

/// A traced Go function was entered.
#[inline(always)]
pub fn on_entry<C: EbpfContext>(ctx: &C, regs: &pt_regs, fn_id: u32, fn_flags: u32) {
    let Some((tgid, _)) = traced_thread() else {
        return;
    };
    let Some((key, goid, sp)) = current(regs, tgid) else {
        return;
    };
    let stack = match GOROUTINES.get_ptr_mut(&key) {
        Some(stack) => unsafe { &mut *stack },
        None => {
            let Some(stack) = new_stack(key, tgid, goid) else {
                count(counter::THREADS_FULL);
                return;
            };
            stack
        }
    };
    let depth = stack.depth as usize;
    if depth > 0 {
        let top = &stack.frames[stack::slot(depth - 1)];
        if top.fn_id == fn_id && top.sp == sp {
            // Back from morestack: the same call on a grown stack.
            return;
        }
    }
    let now = unsafe { bpf_ktime_get_ns() };
    stack::push(
        ctx,
        stack,
        fn_id,
        fn_flags | span_flags::GOROUTINE,
        sp,
        regs.rip,
        now,
        goid as u32,
    );
}

/// A traced Go function's `RET` ran.
#[inline(always)]
pub fn on_exit(regs: &pt_regs, reason: u32) {
    let Some((tgid, _)) = traced_thread() else {
        return;
    };
    let Some((key, goid, sp)) = current(regs, tgid) else {
        return;
    };
    let Some(stack) = GOROUTINES.get_ptr_mut(&key) else {
        return;
    };
    let stack = unsafe { &mut *stack };
    let now = unsafe { bpf_ktime_get_ns() };
    if stack.unwinding != 0 && stack.depth > 0 {
        // A return under calls that never returned, while panicking: this
        // call recovered (Go resumes it at its `deferreturn`).
        let top = stack.frames[stack::slot(stack.depth as usize - 1)].sp;
        if top < sp {
            crate::errors::go_recovered(stack, sp, now, tgid, goid as u32);
        }
    }
    stack::pop(stack, sp, reason, regs.rax, now, goid as u32);
    if stack.depth == 0 {
        let _ = GOROUTINES.remove(&key);
    }
}

#[inline(always)]
fn new_stack(key: u64, tgid: u32, goid: u64) -> Option<&'static mut ThreadStack> {
    let empty = EMPTY_STACK.get_ptr(0)?;
    // Fails only when the table is full (the lookup just found no stack).
    let _ = GOROUTINES.insert(&key, unsafe { &*empty }, BPF_NOEXIST as u64);
    let stack = unsafe { &mut *GOROUTINES.get_ptr_mut(&key)? };
    stack.depth = 0;
    stack.tgid = tgid;
    stack.owner = goid as u32;
    stack.next_id = stack::random_id();
    Some(stack)
}
