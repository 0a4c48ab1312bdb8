//! The error path: throws, panics, catches, fatal signals and failing exits.
//!
//! Each reports an [`ErrorEvent`] carrying the thread's traced calls in
//! flight, but only for a thread that has some: an error that never crosses a
//! traced function is none of omegi's business. A throw or panic marks the
//! thread as unwinding until its catch, which closes the frames the unwinder
//! left behind.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated},
    macros::{tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
    Global,
};
use omegi_common::{
    counter, end_reason, error_kind, event_kind, text, ErrorEvent, ThreadStack, ERROR_TEXT_LEN,
    MAX_DEPTH,
};

use crate::{count, goroutine, stack, traced_thread, EVENTS, GO_PANICKING};

#[no_mangle]
static SIGNAL_SIG_OFFSET: Global<u32> = Global::new(8);

#[no_mangle]
static SIGNAL_HANDLER_OFFSET: Global<u32> = Global::new(24);

#[no_mangle]
static EXIT_CODE_OFFSET: Global<u32> = Global::new(16);

/// Byte offsets of a Rust `String`'s buffer pointer and length (`{cap,
/// ptr, len}` in std since 1.67).
#[no_mangle]
static STRING_PTR_OFFSET: Global<u32> = Global::new(8);

#[no_mangle]
static STRING_LEN_OFFSET: Global<u32> = Global::new(16);

/// Signals whose default action ends the process with a core dump: the
/// program's own fault or abort (SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE,
/// SIGSEGV, SIGSYS).
const FATAL_SIGNALS: u64 =
    (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 11) | (1 << 31);

/// `__cxa_throw(void *object, std::type_info *type, void (*destructor)(void *))`.
#[uprobe]
pub fn omegi_cxx_throw(ctx: ProbeContext) -> u32 {
    let regs = unsafe { &*ctx.regs };
    let (object, type_info) = (regs.rdi, regs.rsi);
    // Where the throw statement called into the runtime.
    let Some(event) = start_error(error_kind::CXX_THROW, read_u64(regs.rsp)) else {
        return 0;
    };
    // std::type_info is {vtable, const char *name}; a class with one public
    // base (__si_class_type_info) adds the base's type_info. Read as if it
    // were one, whatever it is: a read of a null or wrong pointer fails and
    // leaves nothing, and the agent checks the names. No branch here: every
    // one would double what the verifier walks.
    read_str(read_u64(type_info + 8), event, text::TYPE);
    let base = read_u64(type_info + 16);
    read_str(read_u64(base + 8), event, text::BASE);
    let base2 = read_u64(base + 16);
    read_str(read_u64(base2 + 8), event, text::BASE2);
    // libstdc++'s runtime_error and logic_error hold their what() string
    // right after the vtable (a __cow_string: one char pointer).
    read_str(read_u64(object + 8), event, text::MESSAGE);
    submit(event);
    0
}

/// `__cxa_rethrow()`: the exception being handled leaves again.
#[uprobe]
pub fn omegi_cxx_rethrow(ctx: ProbeContext) -> u32 {
    let throw_site = read_u64(unsafe { (*ctx.regs).rsp });
    if let Some(event) = start_error(error_kind::CXX_RETHROW, throw_site) {
        submit(event);
    }
    0
}

/// `__cxa_begin_catch`: a handler starts in the function that called it.
#[uprobe]
pub fn omegi_cxx_catch(ctx: ProbeContext) -> u32 {
    on_catch(unsafe { (*ctx.regs).rsp }, error_kind::CXX_CATCH);
    0
}

/// std's panic entry point (`std::panicking::panic_with_hook`, called after
/// the panic's payload is built and before the hook runs).
#[uprobe]
pub fn omegi_rust_panic(_ctx: ProbeContext) -> u32 {
    if let Some(event) = start_error(error_kind::RUST_PANIC, 0) {
        submit(event);
    }
    0
}

/// Return of a panic payload's `PanicPayload::get` that gives a `&&str`
/// (`StaticStrPayload` of `panic!("literal")`, `begin_panic`'s `&str`
/// payload). `panic_with_hook` calls `get` before running whatever hook is
/// installed, the default or the program's own, so the message is read here
/// rather than from the default hook.
#[uretprobe]
pub fn omegi_rust_panic_str(ctx: RetProbeContext) -> u32 {
    // &&str: the &str is {ptr, len}.
    let str_ref = unsafe { (*ctx.regs).rax };
    panic_message(read_u64(str_ref), read_u64(str_ref + 8));
    0
}

/// Return of a payload's `get` that gives a `&String`
/// (`FormatStringPayload` of `panic!("{x}")`, which `get` has just
/// formatted, and `begin_panic`'s `String` payload).
#[uretprobe]
pub fn omegi_rust_panic_string(ctx: RetProbeContext) -> u32 {
    let string = unsafe { (*ctx.regs).rax };
    panic_message(
        read_u64(string + u64::from(STRING_PTR_OFFSET.load())),
        read_u64(string + u64::from(STRING_LEN_OFFSET.load())),
    );
    0
}

/// Reports `len` bytes at `ptr` as the message of the panic in flight on
/// this thread, if it panics through traced calls.
#[inline(always)]
fn panic_message(ptr: u64, len: u64) {
    let Some((tgid, tid)) = traced_thread() else {
        return;
    };
    let Some(stack) = stack::thread_stack(tid) else {
        return;
    };
    if stack.unwinding == 0 {
        return;
    }
    let Some(event) = reserve(error_kind::RUST_PANIC_MESSAGE, tgid, tid) else {
        return;
    };
    read_bytes(ptr, len, event, text::MESSAGE);
    submit(event);
}

/// Copies up to [`ERROR_TEXT_LEN`] of the `len` bytes at `ptr` into the
/// event's text `index`, its length 0 when the read failed.
#[inline(always)]
fn read_bytes(ptr: u64, len: u64, event: &mut ErrorEvent, index: usize) {
    let index = index & 3;
    let len = (len as usize).min(ERROR_TEXT_LEN);
    let destination = &mut event.texts[index];
    let read = unsafe {
        generated::bpf_probe_read_user(destination.as_mut_ptr().cast(), len as u32, ptr as *const _)
    };
    event.text_lens[index] = if read == 0 { len as u16 } else { 0 };
}

/// How many bytes behind a Go panic value's data word go to the agent as
/// they are: a `runtime.boundsError` (two words, a flag and a code).
const GO_VALUE_BYTES: u64 = 24;

/// `runtime.gopanic(e any)`, in Go's register ABI: RAX is the panic value's
/// type descriptor, RBX its data word. The goroutine's traced calls are the
/// error's path. The agent names the type from the binary's type symbols
/// and decides which reading of the value is right for it: the string
/// header behind the data word (`panic("text")` and `*errors.errorString`
/// alike), or the raw bytes there.
#[uprobe]
pub fn omegi_go_panic(ctx: ProbeContext) -> u32 {
    let Some((tgid, _)) = traced_thread() else {
        return 0;
    };
    let regs = unsafe { &*ctx.regs };
    let Some((stack, key, goid)) = goroutine::current_stack(regs, tgid) else {
        return 0;
    };
    if stack.depth == 0 {
        return 0;
    }
    stack.unwinding = 1;
    let _ = GO_PANICKING.insert(&tgid, &key, 0);
    let Some(event) = reserve(error_kind::GO_PANIC, tgid, goid) else {
        return 0;
    };
    copy_stack(stack, event, 0);
    event.value = regs.rax as i64;
    let data = regs.rbx;
    read_bytes(read_u64(data), read_u64(data + 8), event, text::MESSAGE);
    read_bytes(data, GO_VALUE_BYTES, event, text::GO_VALUE);
    submit(event);
    0
}

/// A Go call at `sp` returned while its goroutine panicked, with traced
/// calls above it still open: it recovered. Those calls were abandoned; the
/// recovering call is the innermost one left, and returns next.
#[inline(always)]
pub fn go_recovered(stack: &mut ThreadStack, sp: u64, now: u64, tgid: u32, goid: u32) {
    stack::close_frames_above(stack, sp - 1, now, goid, end_reason::UNWOUND);
    stack.unwinding = 0;
    let _ = GO_PANICKING.remove(&tgid);
    if let Some(event) = reserve(error_kind::GO_RECOVER, tgid, goid) {
        copy_stack(stack, event, 0);
        submit(event);
    }
}

/// `__rust_panic_cleanup`: `catch_unwind` caught a panic.
#[uprobe]
pub fn omegi_rust_catch(ctx: ProbeContext) -> u32 {
    on_catch(unsafe { (*ctx.regs).rsp }, error_kind::RUST_CATCH);
    0
}

/// `signal/signal_deliver`, in the receiving thread: a fatal signal with its
/// default action is about to end the process.
#[tracepoint]
pub fn omegi_signal(ctx: TracePointContext) -> u32 {
    let signal: i32 = unsafe { ctx.read_at(SIGNAL_SIG_OFFSET.load() as usize) }.unwrap_or(0);
    let handler: u64 = unsafe { ctx.read_at(SIGNAL_HANDLER_OFFSET.load() as usize) }.unwrap_or(1);
    // SIG_DFL is 0; with a handler the program deals with the signal itself.
    if handler != 0 || !(1..64).contains(&signal) || FATAL_SIGNALS & (1 << signal) == 0 {
        return 0;
    }
    if let Some(event) = start_error(error_kind::SIGNAL, 0) {
        event.value = i64::from(signal);
        submit(event);
    }
    0
}

/// `syscalls/sys_enter_exit_group`: the process exits; a non-zero code with
/// traced calls still running on this thread is an error.
#[tracepoint]
pub fn omegi_exit_group(ctx: TracePointContext) -> u32 {
    let code: i64 = unsafe { ctx.read_at(EXIT_CODE_OFFSET.load() as usize) }.unwrap_or(0);
    let code = i64::from(code as i32);
    if code == 0 {
        return 0;
    }
    if let Some(event) = start_error(error_kind::EXIT, 0) {
        event.value = code;
        submit(event);
    }
    if goroutine::enabled() {
        go_panic_exit(code);
    }
    0
}

/// `runtime.exit(code int32)`, where `os.Exit` ends a Go program, called
/// on the goroutine's own stack: a non-zero code with traced calls running
/// on the goroutine is a failing exit, as `exit_group` is for a thread. (A
/// fatal panic calls it on the system stack, where no goroutine's calls are
/// found: the panic's own exit below reports that one.) It is assembly with
/// Go's stack ABI (`runtime.exit.abi0`): the code is the word above the
/// return address.
#[uprobe]
pub fn omegi_go_exit(ctx: ProbeContext) -> u32 {
    let Some((tgid, _)) = traced_thread() else {
        return 0;
    };
    let regs = unsafe { &*ctx.regs };
    let code = i64::from(read_u64(regs.rsp + 8) as i32);
    if code == 0 {
        return 0;
    }
    let Some((stack, _, goid)) = goroutine::current_stack(regs, tgid) else {
        return 0;
    };
    if stack.depth == 0 {
        return 0;
    }
    go_exit(stack, tgid, goid, code);
    0
}

/// Reports a Go process's exit with `code` on goroutine `goid`, whose
/// calls the exit then closes, as a thread's exit closes a thread's.
#[inline(always)]
fn go_exit(stack: &mut ThreadStack, tgid: u32, goid: u32, code: i64) {
    if let Some(event) = reserve(error_kind::EXIT, tgid, goid) {
        copy_stack(stack, event, 0);
        event.value = code;
        submit(event);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    stack::close_frames_above(stack, u64::MAX, now, goid, end_reason::THREAD_EXIT);
}

/// A Go process exits with `code` after a panic nobody recovered (Go exits
/// with 2): the exit is reported on the panicking goroutine.
#[inline(always)]
fn go_panic_exit(code: i64) {
    let Some((tgid, _)) = traced_thread() else {
        return;
    };
    let Some(&key) = (unsafe { GO_PANICKING.get(&tgid) }) else {
        return;
    };
    let _ = GO_PANICKING.remove(&tgid);
    let Some(stack) = goroutine::stack_by_key(key) else {
        return;
    };
    let goid = stack.owner;
    go_exit(stack, tgid, goid, code);
}

/// Starts an error event with the current thread's stack, if the thread has
/// traced calls in flight. Throws and panics mark the thread as unwinding.
#[inline(always)]
fn start_error(kind: u32, innermost_return: u64) -> Option<&'static mut ErrorEvent> {
    let (tgid, tid) = traced_thread()?;
    let stack = stack::thread_stack(tid)?;
    if stack.depth == 0 {
        return None;
    }
    if matches!(
        kind,
        error_kind::CXX_THROW | error_kind::CXX_RETHROW | error_kind::RUST_PANIC
    ) {
        stack.unwinding = 1;
    }
    let event = reserve(kind, tgid, tid)?;
    copy_stack(stack, event, innermost_return);
    Some(event)
}

/// A catch handler starts with `rsp` = `sp`: every traced frame at or below
/// it was unwound; the catcher is the innermost frame left.
#[inline(always)]
fn on_catch(sp: u64, kind: u32) {
    let Some((tgid, tid)) = traced_thread() else {
        return;
    };
    let Some(stack) = stack::thread_stack(tid) else {
        return;
    };
    if stack.unwinding == 0 {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    stack::close_frames_above(stack, sp, now, tid, end_reason::UNWOUND);
    stack.unwinding = 0;
    if let Some(event) = reserve(kind, tgid, tid) {
        copy_stack(stack, event, 0);
        submit(event);
    }
}

#[inline(always)]
fn reserve(kind: u32, tgid: u32, tid: u32) -> Option<&'static mut ErrorEvent> {
    let Some(entry) = EVENTS.reserve::<ErrorEvent>(0) else {
        count(counter::RECORDS_RING_FULL);
        return None;
    };
    // The entry is submitted by `submit` through this same pointer.
    let event = unsafe { &mut *entry.as_ptr().cast_mut() };
    core::mem::forget(entry);
    event.kind = event_kind::ERROR;
    event.error_kind = kind;
    event.tgid = tgid;
    event.tid = tid;
    event.time_ns = unsafe { bpf_ktime_get_ns() };
    event.value = 0;
    event.depth = 0;
    event._pad = 0;
    event.innermost_return = 0;
    event.text_lens = [0; 4];
    Some(event)
}

#[inline(always)]
fn submit(event: &'static mut ErrorEvent) {
    unsafe { generated::bpf_ringbuf_submit((event as *mut ErrorEvent).cast(), 0) };
}

/// Copies the traced calls in flight, outermost first, each with the return
/// address at its entry stack pointer (the agent works out the call sites,
/// see `ErrorEvent::call_offset`). All `MAX_DEPTH` slots, valid or not, and
/// no branch: a straight line that every kernel's verifier walks once (a
/// loop that stops at the depth, with a branch or two per frame, was too
/// much for 6.1's).
#[inline(always)]
fn copy_stack(stack: &ThreadStack, event: &mut ErrorEvent, innermost_return: u64) {
    event.depth = (stack.depth as usize).min(MAX_DEPTH) as u32;
    event.innermost_return = innermost_return;
    for index in 0..MAX_DEPTH {
        let frame = &stack.frames[stack::slot(index)];
        let out = &mut event.frames[stack::slot(index)];
        out.fn_id = frame.fn_id;
        out._pad = 0;
        out.span_id = frame.span_id;
        out.entry_ip = frame.entry_ip;
        out.return_address = read_u64(frame.sp);
    }
}

/// The word at `address` in the current process, 0 when it cannot be read
/// (the helper zeroes its destination on failure). No branch.
#[inline(always)]
fn read_u64(address: u64) -> u64 {
    let mut value = 0u64;
    unsafe {
        generated::bpf_probe_read_user(
            (&mut value as *mut u64).cast(),
            8,
            address as *const _,
        )
    };
    value
}

/// Reads a NUL-terminated string at `address` into `event.texts[index]`,
/// keeping what the helper returned for the agent to judge (no branch).
#[inline(always)]
fn read_str(address: u64, event: &mut ErrorEvent, index: usize) {
    let index = index & 3;
    let destination = &mut event.texts[index];
    let read = unsafe {
        generated::bpf_probe_read_user_str(
            destination.as_mut_ptr().cast(),
            ERROR_TEXT_LEN as u32,
            address as *const _,
        )
    };
    event.text_lens[index] = read as u16;
}
