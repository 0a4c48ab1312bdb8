//! Python calls: the interpreter's eval function runs one Python call each
//! time it is entered (every call in 3.10; in 3.11+ only calls made from C,
//! unless the agent's eval hook turns inlining off), with the call's frame in
//! `rsi`. The probe on its entry reads the frame's code object and keeps the
//! call only when the code's file lies under the project root; the probe on
//! its `ret` ends it like any function's.
//!
//! Whether a code object is traced is decided once, at its first call, and
//! kept in `PYTHON_CODES` with what identifies it (its file and name objects
//! and first line), so that a code object freed and another allocated at the
//! same address is judged again. A traced code object's name and place go to
//! the agent once, as a [`PythonCodeEvent`]: the process may have exited by
//! the time its spans are named.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, generated},
    macros::map,
    maps::{Array, LruHashMap},
    programs::ProbeContext,
    Global,
};
use omegi_common::{
    counter, end_reason, event_kind, span_flags, PythonCodeEvent, PythonCodeKey, PythonCodeVerdict,
    PythonArg, PythonArgsEvent, PythonExceptionEvent, PythonOffsets, python_arg, PYTHON_ARGS_MAX,
    PYTHON_LINE_TABLE_MAX, PYTHON_NAME_MAX, PYTHON_PATH_MAX,
};

use crate::{count, stack, EVENTS};

#[no_mangle]
static PYTHON_OFFSETS: Global<PythonOffsets> = Global::new(PythonOffsets {
    frame_code: 0,
    code_filename: 0,
    code_name: 0,
    code_line: 0,
    ascii_data: 0,
    root_len: 0,
    thread_exception: 0,
    thread_exception_type: 0,
    code_flags: 0,
    frame_owner: 0,
    frame_state: 0,
    state_created: 0,
    frame_instr: 0,
    code_units: 0,
    code_argcount: 0,
    code_kwonly: 0,
    frame_locals: 0,
    long_tagged: 0,
    capture_args: 0,
    code_varnames: 0,
    code_linetable: 0,
    _pad: 0,
});

/// The project root with a trailing `/` (set by the agent).
#[map]
static PYTHON_ROOT: Array<[u8; PYTHON_PATH_MAX]> = Array::with_max_entries(1, 0);

/// Code objects judged, by process. Least recently used entries make room
/// (the processes that exited, code not called for long): an evicted code
/// object is judged, and if traced named, again at its next call.
#[map]
static PYTHON_CODES: LruHashMap<PythonCodeKey, PythonCodeVerdict> = LruHashMap::with_max_entries(65536, 0);

/// `PyASCIIObject.state`'s `compact` and `ascii` bits: the characters follow
/// the object's header, one byte each.
const COMPACT_ASCII: u32 = (1 << 5) | (1 << 6);

/// The byte offset of `PyASCIIObject.state`.
const STATE_OFFSET: u64 = 32;

/// The eval function was entered: push the call if its code is traced.
#[inline(always)]
pub fn on_entry(ctx: &ProbeContext, fn_id: u32) {
    let regs = unsafe { &*ctx.regs };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // Only a traced process's calls cost the reads below.
    if stack::thread_stack(tid).is_none() && crate::traced_thread().is_none() {
        return;
    }
    let offsets = PYTHON_OFFSETS.load();
    let code = read_u64(regs.rsi + u64::from(offsets.frame_code));
    if code == 0 || !traced(tgid, code, &offsets) {
        return;
    }
    stack::on_entry(ctx, fn_id, 0, regs.rsp, code);
    if let Some(stack) = stack::thread_stack(tid) {
        stack.python_thread = regs.rdi;
        let depth = stack.depth as usize;
        if depth > 0 {
            let top = &mut stack.frames[stack::slot(depth - 1)];
            if top.sp == regs.rsp {
                top.object = regs.rsi;
                let resumable = read_u32(code + u64::from(offsets.code_flags)) & CO_RESUMABLE != 0;
                let first = resumable
                    && generator_state(regs.rsi, &offsets)
                        .is_some_and(|state| i32::from(state) == offsets.state_created);
                if resumable {
                    top.flags |= span_flags::PYTHON_GENERATOR_CODE;
                }
                if first {
                    top.flags |= span_flags::PYTHON_FIRST_RESUME;
                }
                // A generator's arguments are its first resume's.
                if offsets.capture_args != 0 && (!resumable || first) {
                    let span_id = top.span_id;
                    emit_args(tgid, tid, span_id, code, regs.rsi, &offsets);
                }
            }
        }
    }
}

/// The eval function returned (`rax` its result): a NULL result from a
/// traced call means an exception left it; the first traced call it leaves
/// says what it is. Then the call ends like any.
#[inline(always)]
pub fn on_exit(regs: &pt_regs) {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(stack) = stack::thread_stack(tid) else {
        return;
    };
    let depth = stack.depth as usize;
    if depth > 0 {
        let top = &mut stack.frames[stack::slot(depth - 1)];
        if top.sp == regs.rsp {
            let left = depth as u32; // 1 + the call's depth
            if regs.rax != 0 && top.flags & span_flags::PYTHON_GENERATOR_CODE != 0 {
                top.flags |= generator_exit(top.object);
            }
            let top = *top;
            if regs.rax == 0 {
                stack.python_code_unit = code_unit(top.entry_ip, top.object);
                if stack.python_raised != left + 1 {
                    emit_exception(stack.tgid, tid, top.span_id, stack.python_thread);
                }
                stack.python_raised = left;
            } else if stack.python_raised != 0 {
                stack.python_raised = 0;
            }
        }
    }
    stack::on_exit(regs.rsp, end_reason::RETURNED, regs.rax, false);
}

/// `CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR`: code whose calls
/// make a generator, which then runs in resumes.
const CO_RESUMABLE: u32 = 0x20 | 0x80 | 0x200;

/// The 3.11+ `FRAME_OWNED_BY_GENERATOR`.
const OWNED_BY_GENERATOR: u8 = 1;

/// How a call of a generator's code left `frame` with a value: as a
/// generator's suspension ([`span_flags::PYTHON_SUSPENDED`]), as the call
/// that made the generator ([`span_flags::PYTHON_CREATION`]), or neither
/// (0).
#[inline(always)]
fn generator_exit(frame: u64) -> u32 {
    match generator_state(frame, &PYTHON_OFFSETS.load()) {
        None => span_flags::PYTHON_CREATION,
        Some(state) if state < 0 => span_flags::PYTHON_SUSPENDED,
        Some(_) => 0,
    }
}

/// The state of the generator whose frame (of a generator's code) is
/// `frame`; `None` when the frame is not a generator's (3.11+: the call
/// that makes the generator runs in a frame of its own).
#[inline(always)]
fn generator_state(frame: u64, offsets: &PythonOffsets) -> Option<i8> {
    if offsets.frame_owner != 0 && read_u8(frame + u64::from(offsets.frame_owner)) != OWNED_BY_GENERATOR {
        return None;
    }
    Some(read_u8(frame.wrapping_add(offsets.frame_state as i64 as u64)) as i8)
}

/// `--capture-args`: the first arguments of a call of `code` in `frame`,
/// each as a number, the start of a string, or its type's name.
#[inline(always)]
fn emit_args(tgid: u32, tid: u32, span_id: u64, code: u64, frame: u64, offsets: &PythonOffsets) {
    let params = read_u32(code + u64::from(offsets.code_argcount))
        .saturating_add(read_u32(code + u64::from(offsets.code_kwonly)));
    if params == 0 {
        return;
    }
    let params = if params as usize > PYTHON_ARGS_MAX {
        PYTHON_ARGS_MAX as u32
    } else {
        params
    };
    let Some(mut entry) = EVENTS.reserve::<PythonArgsEvent>(0) else {
        count(counter::RECORDS_RING_FULL);
        return;
    };
    let event = unsafe { &mut *entry.as_mut_ptr() };
    event.kind = event_kind::PYTHON_ARGS;
    event.tgid = tgid;
    event.tid = tid;
    event.count = params;
    event.span_id = span_id;
    event.code = code;
    let locals = frame + u64::from(offsets.frame_locals);
    for index in 0..PYTHON_ARGS_MAX {
        let arg = &mut event.args[index];
        arg.kind = 0;
        arg.length = 0;
        arg.value = 0;
        arg.text[0] = 0;
        if index as u32 >= params {
            continue;
        }
        read_arg(read_u64(locals + 8 * index as u64), arg, offsets);
    }
    entry.submit(0);
}

/// `tp_name`'s first eight bytes, little-endian, for the types told apart.
const NAME_INT: u64 = 0x0074_6e69; // "int\0"
const NAME_BOOL: u64 = 0x006c_6f6f_62; // "bool\0"
const NAME_FLOAT: u64 = 0x0074_616f_6c66; // "float\0"
const NAME_STR: u64 = 0x0072_7473; // "str\0"
const NAME_NONE: u64 = 0x6570_7954_656e_6f4e; // "NoneType"

/// `PyLongObject`'s digits: 30 bits each, after the size or tag.
const LONG_DIGITS: u64 = 24;
/// `PyFloatObject.ob_fval`; a `str`'s or an `int`'s size.
const FLOAT_VALUE: u64 = 16;
const OBJECT_SIZE: u64 = 16;

#[inline(always)]
fn read_arg(object: u64, arg: &mut PythonArg, offsets: &PythonOffsets) {
    if object == 0 {
        return;
    }
    let type_object = read_u64(object + 8);
    let type_name = read_u64(type_object + TP_NAME);
    let name = read_u64(type_name);
    // Compared with the NUL that ends each name.
    if name & 0xffff_ffff == NAME_INT || name & 0xff_ffff_ffff == NAME_BOOL {
        arg.kind = if name & 0xffff_ffff == NAME_INT {
            python_arg::INT
        } else {
            python_arg::BOOL
        };
        let size = read_u64(object + OBJECT_SIZE);
        // Digits and sign: a signed count, or (3.12+) count << 3 with the
        // sign in the low bits (0 positive, 1 zero, 2 negative).
        let (digits, negative) = if offsets.long_tagged != 0 {
            (size >> 3, size & 3 == 2)
        } else {
            let signed = size as i64;
            (signed.unsigned_abs(), signed < 0)
        };
        if digits > 2 {
            arg.kind = python_arg::BIG_INT;
            return;
        }
        let low = u64::from(read_u32(object + LONG_DIGITS));
        let high = if digits == 2 {
            u64::from(read_u32(object + LONG_DIGITS + 4))
        } else {
            0
        };
        let magnitude = if digits == 0 { 0 } else { low | (high << 30) };
        arg.value = if negative {
            magnitude.wrapping_neg()
        } else {
            magnitude
        };
    } else if name & 0xffff_ffff_ffff == NAME_FLOAT {
        arg.kind = python_arg::FLOAT;
        arg.value = read_u64(object + FLOAT_VALUE);
    } else if name & 0xffff_ffff == NAME_STR {
        arg.kind = python_arg::STR;
        arg.length = read_u64(object + OBJECT_SIZE) as u32;
        if read_u32(object + STATE_OFFSET) & COMPACT_ASCII == COMPACT_ASCII {
            read_str(object + u64::from(offsets.ascii_data), &mut arg.text);
        }
    } else if name == NAME_NONE {
        arg.kind = python_arg::NONE;
    } else {
        arg.kind = python_arg::OTHER;
        read_str(type_name, &mut arg.text);
    }
}

/// 1 + the code unit of `code` that `frame` is at (0 when not known), for
/// the line an exception passed.
#[inline(always)]
fn code_unit(code: u64, frame: u64) -> u32 {
    let offsets = PYTHON_OFFSETS.load();
    let at = frame + u64::from(offsets.frame_instr);
    let unit = if offsets.code_units == 0 {
        u64::from(read_u32(at))
    } else {
        let instruction = read_u64(at);
        let first = code + u64::from(offsets.code_units);
        if instruction < first {
            return 0;
        }
        (instruction - first) / 2
    };
    // A code object of a billion units is no real one.
    if unit >= u64::from(u32::MAX >> 2) {
        return 0;
    }
    unit as u32 + 1
}

/// The thread's pending exception: its type's name and its message.
#[inline(always)]
fn emit_exception(tgid: u32, tid: u32, span_id: u64, thread: u64) {
    let offsets = PYTHON_OFFSETS.load();
    let Some(mut entry) = EVENTS.reserve::<PythonExceptionEvent>(0) else {
        count(counter::RECORDS_RING_FULL);
        return;
    };
    let event = unsafe { &mut *entry.as_mut_ptr() };
    event.kind = event_kind::PYTHON_EXCEPTION;
    event.tgid = tgid;
    event.tid = tid;
    event._pad = 0;
    event.span_id = span_id;
    event.type_name[0] = 0;
    event.message[0] = 0;
    let value = read_u64(thread + u64::from(offsets.thread_exception));
    // Before 3.12 the type is kept apart, and the value may be unset or a
    // bare message a C function set.
    let explicit_type = if offsets.thread_exception_type != 0 {
        read_u64(thread + u64::from(offsets.thread_exception_type))
    } else {
        0
    };
    let value_type = if value != 0 { read_u64(value + 8) } else { 0 };
    let exception_type = if explicit_type != 0 {
        explicit_type
    } else {
        value_type
    };
    event.type_object = exception_type;
    read_str(read_u64(exception_type + TP_NAME), &mut event.type_name);
    // `str` as a little-endian word with its NUL.
    let value_is_str = value_type != 0 && read_u32(read_u64(value_type + TP_NAME)) == 0x0072_7473;
    let text = if value_is_str {
        value
    } else {
        let args = read_u64(value + EXCEPTION_ARGS);
        if args != 0 && read_u64(args + TUPLE_SIZE) > 0 {
            read_u64(args + TUPLE_ITEMS)
        } else {
            0
        }
    };
    if text != 0 && read_u32(text + STATE_OFFSET) & COMPACT_ASCII == COMPACT_ASCII {
        read_str(text + u64::from(offsets.ascii_data), &mut event.message);
    }
    entry.submit(0);
}

/// `PyTypeObject.tp_name`; `PyBaseExceptionObject.args`; a tuple's
/// `ob_size` and first item.
const TP_NAME: u64 = 24;
const EXCEPTION_ARGS: u64 = 24;
const TUPLE_SIZE: u64 = 16;
const TUPLE_ITEMS: u64 = 24;
/// `PyBytesObject.ob_sval` (its size is where a tuple's is).
const BYTES_DATA: u64 = 32;

#[inline(always)]
fn read_str<const N: usize>(address: u64, into: &mut [u8; N]) {
    if address == 0 {
        return;
    }
    unsafe {
        generated::bpf_probe_read_user_str(into.as_mut_ptr().cast(), N as u32, address as *const _)
    };
}

/// Whether calls of `code` in process `tgid` are traced (see the module's
/// doc).
#[inline(always)]
fn traced(tgid: u32, code: u64, offsets: &PythonOffsets) -> bool {
    let filename = read_u64(code + u64::from(offsets.code_filename));
    let name = read_u64(code + u64::from(offsets.code_name));
    let line = read_u32(code + u64::from(offsets.code_line));
    let key = PythonCodeKey {
        tgid,
        _pad: 0,
        code,
    };
    if let Some(known) = unsafe { PYTHON_CODES.get(&key) } {
        if known.filename == filename && known.name == name && known.line == line {
            return known.traced != 0;
        }
    }
    let traced = judge(tgid, code, filename, name, line, offsets);
    let verdict = PythonCodeVerdict {
        filename,
        name,
        line,
        traced: u32::from(traced),
    };
    let _ = PYTHON_CODES.insert(&key, &verdict, 0);
    traced
}

/// Compares the code's file name with the project root; a traced code's
/// name and place go to the agent.
#[inline(always)]
fn judge(tgid: u32, code: u64, filename: u64, name: u64, line: u32, offsets: &PythonOffsets) -> bool {
    if read_u32(filename + STATE_OFFSET) & COMPACT_ASCII != COMPACT_ASCII {
        return false;
    }
    let Some(root) = PYTHON_ROOT.get(0) else {
        return false;
    };
    // The event is filled in where it lies, then kept only for traced code.
    let Some(mut entry) = EVENTS.reserve::<PythonCodeEvent>(0) else {
        // Judged again at its next call, when the agent may have caught up.
        count(counter::RECORDS_RING_FULL);
        return false;
    };
    let event = unsafe { &mut *entry.as_mut_ptr() };
    let read = unsafe {
        generated::bpf_probe_read_user_str(
            event.filename.as_mut_ptr().cast(),
            PYTHON_PATH_MAX as u32,
            (filename + u64::from(offsets.ascii_data)) as *const _,
        )
    };
    let root_len = offsets.root_len as usize;
    let mut under_root = read > 0;
    for i in 0..PYTHON_PATH_MAX {
        if i >= root_len || !under_root {
            break;
        }
        if event.filename[i] != root[i] {
            under_root = false;
        }
    }
    if !under_root {
        entry.discard(0);
        return false;
    }
    event.kind = event_kind::PYTHON_CODE;
    event.tgid = tgid;
    event.code = code;
    event.line = line;
    event.name[0] = 0;
    // The line table: a `bytes` object's size and characters. A read past
    // a short table's end may fault at a page's edge: then the agent reads
    // it.
    let table = read_u64(code + u64::from(offsets.code_linetable));
    event.line_table_len = read_u64(table + TUPLE_SIZE) as u32;
    let read = unsafe {
        generated::bpf_probe_read_user(
            event.line_table.as_mut_ptr().cast(),
            PYTHON_LINE_TABLE_MAX as u32,
            (table + BYTES_DATA) as *const _,
        )
    };
    if read != 0 {
        event.line_table_len = u32::MAX;
    }
    for index in 0..PYTHON_ARGS_MAX {
        event.parameters[index][0] = 0;
    }
    if offsets.capture_args != 0 {
        let names = read_u64(code + u64::from(offsets.code_varnames));
        let count = read_u64(names + TUPLE_SIZE);
        for index in 0..PYTHON_ARGS_MAX {
            if index as u64 >= count {
                break;
            }
            let name = read_u64(names + TUPLE_ITEMS + 8 * index as u64);
            if read_u32(name + STATE_OFFSET) & COMPACT_ASCII == COMPACT_ASCII {
                read_str(name + u64::from(offsets.ascii_data), &mut event.parameters[index]);
            }
        }
    }
    if read_u32(name + STATE_OFFSET) & COMPACT_ASCII == COMPACT_ASCII {
        unsafe {
            generated::bpf_probe_read_user_str(
                event.name.as_mut_ptr().cast(),
                PYTHON_NAME_MAX as u32,
                (name + u64::from(offsets.ascii_data)) as *const _,
            )
        };
    }
    entry.submit(0);
    true
}

#[inline(always)]
fn read_u64(address: u64) -> u64 {
    let mut value = 0u64;
    unsafe {
        generated::bpf_probe_read_user((&mut value as *mut u64).cast(), 8, address as *const _)
    };
    value
}

#[inline(always)]
fn read_u8(address: u64) -> u8 {
    let mut value = 0u8;
    unsafe {
        generated::bpf_probe_read_user((&mut value as *mut u8).cast(), 1, address as *const _)
    };
    value
}

#[inline(always)]
fn read_u32(address: u64) -> u32 {
    let mut value = 0u32;
    unsafe {
        generated::bpf_probe_read_user((&mut value as *mut u32).cast(), 4, address as *const _)
    };
    value
}
