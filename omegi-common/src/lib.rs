//! The contract between omegi's eBPF programs and its agent.
//!
//! Everything here is `#[repr(C)]` and crosses the kernel/user boundary
//! unchanged: events read from the ring buffer, counter indices, and the
//! values the agent writes into the programs' globals before loading them.
//! Keep it small; names, formats and policy belong to the agent.
#![no_std]

/// Deepest nesting of traced calls kept per thread. Deeper calls are not
/// traced and are counted in [`counter::DEPTH_OVERFLOW`].
pub const MAX_DEPTH: usize = 64;

/// Slots of the `THREAD_SLOTS` array (a power of two): a thread's stack
/// lives in slot `tid % THREAD_SLOTS` when that slot is free at its first
/// traced call, in the `THREADS` hash map otherwise. An array slot is found
/// without hashing, which saves about 50 ns a probe hit.
pub const THREAD_SLOTS: u32 = 1024;

/// An exit probe's cookie is `(end_reason << EXIT_KIND_SHIFT) | fn_id`.
pub const EXIT_KIND_SHIFT: u64 = 32;

/// An entry probe's cookie is `(flags << ENTRY_FLAGS_SHIFT) | fn_id`, where
/// `flags` are [`span_flags`] the function's frames always carry (only
/// [`span_flags::OPEN_EXITS`]).
pub const ENTRY_FLAGS_SHIFT: u64 = 32;

/// An entry cookie flag (above the span flags): the function is a Python
/// interpreter's eval function, which runs one Python call; what the call
/// is comes from its frame (`python.rs` in the kernel side).
pub const ENTRY_PYTHON_EVAL: u64 = 1 << (ENTRY_FLAGS_SHIFT + 15);

/// An exit cookie flag: an exit of the Python eval function. Most of its
/// calls are not traced (code outside the project root), so an exit that
/// matches no frame is expected and not counted as unmatched.
pub const EXIT_PYTHON_EVAL: u64 = 1 << (EXIT_KIND_SHIFT + 15);

/// The `TGIDS` key that turns tracing on for every process when
/// `ALL_PROCESSES` is set (no process has pid 0). The agent stops tracing at
/// once, for every probe, by emptying `TGIDS` before it detaches them one by
/// one; otherwise the calls made while probes go would be half seen.
pub const ALL_PROCESSES_KEY: u32 = 0;

/// Every function probe's cookie also carries the generation of the probe
/// set it belongs to, `(generation & 0xff) << GENERATION_SHIFT`. A probe runs
/// only while its generation is the current one (`STATE[state::GENERATION]`):
/// the agent replaces a set of probes (to drop a function from it) by
/// attaching the new set, switching the generation, then closing the old set,
/// so that no call is seen twice or missed.
pub const GENERATION_SHIFT: u64 = 48;

/// Indices into the `STATE` array (values the agent changes while tracing).
pub mod state {
    /// The current probe generation (see [`GENERATION_SHIFT`](super::GENERATION_SHIFT)).
    pub const GENERATION: u32 = 0;
    /// Number of entries.
    pub const COUNT: u32 = 1;
}

/// Kinds of records in the events ring buffer. Every record starts with a
/// `u32` holding one of these.
pub mod event_kind {
    /// A [`SpanEvent`](super::SpanEvent): one traced call ended.
    pub const SPAN: u32 = 1;
    /// An [`ErrorEvent`](super::ErrorEvent): something on the error path.
    pub const ERROR: u32 = 2;
    /// A [`ThreadExitEvent`](super::ThreadExitEvent): a thread that made
    /// traced calls exited (after its open calls were closed).
    pub const THREAD_EXIT: u32 = 3;
    /// An [`HttpEvent`](super::HttpEvent): bytes of an HTTP/1.x message on a
    /// traced process's TCP socket.
    pub const HTTP: u32 = 4;
    /// A [`PythonCodeEvent`](super::PythonCodeEvent): a Python code object
    /// under the project root, seen for the first time.
    pub const PYTHON_CODE: u32 = 5;
    /// A [`PythonExceptionEvent`](super::PythonExceptionEvent): an exception
    /// left a traced Python call (the first it left).
    pub const PYTHON_EXCEPTION: u32 = 6;
    /// A [`PythonArgsEvent`](super::PythonArgsEvent): a traced Python
    /// call's arguments (`--capture-args`).
    pub const PYTHON_ARGS: u32 = 7;
}

/// What a [`PythonArg`] holds.
pub mod python_arg {
    /// `None`.
    pub const NONE: u32 = 1;
    /// An `int` that fits in 60 bits: `value` (two's complement).
    pub const INT: u32 = 2;
    /// An `int` too large for that.
    pub const BIG_INT: u32 = 3;
    /// A `bool`: `value` 0 or 1.
    pub const BOOL: u32 = 4;
    /// A `float`: `value` its bits.
    pub const FLOAT: u32 = 5;
    /// A `str`: `text` its first characters when ASCII, `length` its
    /// length.
    pub const STR: u32 = 6;
    /// Anything else: `text` its type's name.
    pub const OTHER: u32 = 7;
}

/// Arguments a [`PythonArgsEvent`] carries at most (the first ones).
pub const PYTHON_ARGS_MAX: usize = 6;

/// Bytes of an argument's text.
pub const PYTHON_ARG_TEXT: usize = 32;

/// One argument of a Python call, read at its entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PythonArg {
    /// One of [`python_arg`]; 0 when it could not be read.
    pub kind: u32,
    /// A `str`'s length in characters.
    pub length: u32,
    pub value: u64,
    /// NUL-terminated.
    pub text: [u8; PYTHON_ARG_TEXT],
}

/// The arguments of a traced Python call (span `span_id`), with
/// `--capture-args`: the first [`PYTHON_ARGS_MAX`] of its positional and
/// keyword-only parameters, in order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PythonArgsEvent {
    /// Always [`event_kind::PYTHON_ARGS`].
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// Arguments read (the call's parameters, at most [`PYTHON_ARGS_MAX`]).
    pub count: u32,
    pub span_id: u64,
    /// The call's code object (its parameters' names are the agent's to
    /// read).
    pub code: u64,
    pub args: [PythonArg; PYTHON_ARGS_MAX],
}

/// Why a traced call's span ended.
pub mod end_reason {
    /// A probed `ret` ran (or the uretprobe fired).
    pub const RETURNED: u32 = 0;
    /// A probed tail jump left the function.
    pub const TAIL_CALL: u32 = 1;
    /// Another traced function started in the same stack frame of a function
    /// with [`OPEN_EXITS`](super::span_flags::OPEN_EXITS): the call was
    /// replaced by a jump we could not see (an indirect tail call).
    pub const REPLACED: u32 = 2;
    /// The stack moved above the frame without a return: unwinding (an
    /// exception or a panic) or `longjmp`.
    pub const UNWOUND: u32 = 3;
    /// The thread exited with the call still on its stack.
    pub const THREAD_EXIT: u32 = 4;
    /// An HTTP client call whose connection closed before a response came.
    pub const CONNECTION_CLOSED: u32 = 5;
    /// A server request that the thread gave up before answering it (it
    /// read the next request, or the connection closed).
    pub const NOT_ANSWERED: u32 = 6;
}

/// Flags of a [`SpanEvent`] (and of a [`Frame`]).
pub mod span_flags {
    /// The span starts a trace of its own (see `SpanEvent::trace_key`).
    pub const TRACE_ROOT: u32 = 1;
    /// The function can leave by a jump no probe sees (an indirect jump, a
    /// conditional jump out of it). Only then can a traced call starting in
    /// its stack frame mean it was replaced; for a function whose every exit
    /// is probed, that frame was left by unwinding or `longjmp`.
    pub const OPEN_EXITS: u32 = 2;
    /// Kernel side: a call under this frame was kept, so `--min-duration`
    /// must keep this one too (a trace never loses the path to a kept span).
    pub const KEEP: u32 = 4;
    /// A call of a Go function, kept per goroutine: the event's `tid` holds
    /// the goroutine's id (its low 32 bits), not a thread id.
    pub const GOROUTINE: u32 = 8;
    /// An HTTP request read from a socket (a `SERVER` span; its bytes came
    /// as [`HttpEvent`](super::HttpEvent)s with its span id). Its `fn_id` is
    /// [`NO_FUNCTION`](super::NO_FUNCTION).
    pub const HTTP_SERVER: u32 = 16;
    /// An HTTP request written to a socket (a `CLIENT` span).
    pub const HTTP_CLIENT: u32 = 32;
    /// A Python generator or coroutine left its frame suspended (it yielded
    /// or awaited): a later resume of the same frame goes on with the call.
    pub const PYTHON_SUSPENDED: u32 = 64;
    /// The call of a generator or coroutine function that only made the
    /// generator (3.11+: its code starts with `RETURN_GENERATOR`); the call
    /// itself is its resumes.
    pub const PYTHON_CREATION: u32 = 128;
    /// A Python generator's or coroutine's first resume (its frame was new):
    /// never a later resume of another generator that lay at the same
    /// address and was freed unfinished.
    pub const PYTHON_FIRST_RESUME: u32 = 256;
    /// Kernel side: the Python call's code makes generators (its flags, read
    /// at the call's entry, are not read again at its exit).
    pub const PYTHON_GENERATOR_CODE: u32 = 512;
}

/// The most a call counts for in [`FunctionState::total_ns`]: 1 ms.
pub const BUDGET_DURATION_CAP_NS: u64 = 1_000_000;

/// What the kernel side keeps per traced function (the `FUNCTIONS` array,
/// indexed by function id, which the agent maps into its memory): counts for
/// the overhead budget, and the function's `--error-if` rule, so that
/// `--min-duration` never drops a failing call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FunctionState {
    /// Calls that ended (kernel; plain increments, so two CPUs ending calls
    /// of the function at the same instant may lose one).
    pub calls: u64,
    /// Their summed duration in ns, each call counted for at most
    /// [`BUDGET_DURATION_CAP_NS`] (kernel): one call preempted for 30 ms
    /// would otherwise make a function of a hundred 5 µs calls look like
    /// one that works 300 µs a call.
    pub total_ns: u64,
    /// Those shorter than `BUDGET_SHORT_NS` (kernel).
    pub short_calls: u64,
    /// The return-value rule: one of [`rule_op`] (0: none), compared with
    /// `rule_value` (agent).
    pub rule_op: u32,
    /// How many low bits of `rax` the rule reads, sign-extended: 32 (a C
    /// `int`), 64, or 8 and 16 (a Rust `Result`'s discriminant); any other
    /// value reads 32 (agent).
    pub rule_bits: u32,
    pub rule_value: i64,
    /// 1 once the overhead budget is detaching the function (agent, before
    /// its probes go): a call of it that was in flight, whose exit probe is
    /// gone, would otherwise be closed later as unwound, a false error path.
    /// Such a call is left out unless the thread is really unwinding
    /// (counted as [`counter::DETACHED_IN_FLIGHT`]).
    pub detached: u32,
    pub _reserved: u32,
}

/// Comparison operators of a [`FunctionState`] rule.
pub mod rule_op {
    pub const NONE: u32 = 0;
    pub const LESS: u32 = 1;
    pub const LESS_EQUAL: u32 = 2;
    pub const GREATER: u32 = 3;
    pub const GREATER_EQUAL: u32 = 4;
    pub const EQUAL: u32 = 5;
    pub const NOT_EQUAL: u32 = 6;
}

impl FunctionState {
    /// Whether `rax` fails the function's rule (false without a rule).
    #[inline(always)]
    pub fn rule_fails(&self, rax: u64) -> bool {
        let value = match self.rule_bits {
            64 => rax as i64,
            16 => rax as u16 as i16 as i64,
            8 => rax as u8 as i8 as i64,
            _ => rax as u32 as i32 as i64,
        };
        let limit = self.rule_value;
        match self.rule_op {
            rule_op::LESS => value < limit,
            rule_op::LESS_EQUAL => value <= limit,
            rule_op::GREATER => value > limit,
            rule_op::GREATER_EQUAL => value >= limit,
            rule_op::EQUAL => value == limit,
            rule_op::NOT_EQUAL => value != limit,
            _ => false,
        }
    }
}

/// One traced call that ended, as the kernel saw it.
///
/// Spans of one thread arrive in the order they ended, so a span's children
/// always arrive before it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanEvent {
    /// Always [`event_kind::SPAN`].
    pub kind: u32,
    /// One of [`end_reason`].
    pub end_reason: u32,
    /// Process id (the kernel's tgid).
    pub tgid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// Index of the function in the agent's function table (the probe cookie).
    pub fn_id: u32,
    /// [`span_flags`].
    pub flags: u32,
    /// Nesting depth on the thread's shadow stack, 0 for an outermost call.
    pub depth: u32,
    /// For a Python call an exception left: 1 + the code unit its frame
    /// was at (where the exception passed); 0 otherwise.
    pub code_unit: u32,
    /// Start, kernel monotonic clock (ns).
    pub start_ns: u64,
    /// End, kernel monotonic clock (ns).
    pub end_ns: u64,
    /// Random, non-zero.
    pub span_id: u64,
    /// The enclosing traced call's span id, 0 for an outermost call.
    pub parent_span_id: u64,
    /// Span id of the trace root this span belongs to (its own id for a root).
    pub trace_key: u64,
    /// `rax` when the call returned through a `ret` (its return value);
    /// 0 for other ends.
    pub ret: u64,
    /// The frame's [`Frame::entry_ip`]: for a Python call, its code object.
    pub entry_ip: u64,
    /// The frame's [`Frame::object`].
    pub object: u64,
}

/// Bytes of a Python source file's path a [`PythonCodeEvent`] carries (and
/// the most a project root may have).
pub const PYTHON_PATH_MAX: usize = 256;

/// Bytes of a Python function's qualified name a [`PythonCodeEvent`] carries.
pub const PYTHON_NAME_MAX: usize = 128;

/// The first call of a Python code object whose file lies under the project
/// root, in process `tgid`: its name and place, read once in the kernel
/// (the process may be gone by the time its spans are named).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PythonCodeEvent {
    /// Always [`event_kind::PYTHON_CODE`].
    pub kind: u32,
    pub tgid: u32,
    /// The code object's address (a [`SpanEvent::entry_ip`] of its calls).
    pub code: u64,
    /// `co_firstlineno`.
    pub line: u32,
    /// Bytes of `co_linetable`, whose first [`PYTHON_LINE_TABLE_MAX`] are in
    /// `line_table`; `u32::MAX` when they could not be read (the agent
    /// then reads the table itself).
    pub line_table_len: u32,
    /// `co_filename`, NUL-terminated (ASCII only).
    pub filename: [u8; PYTHON_PATH_MAX],
    /// `co_qualname` (3.11+) or `co_name`, NUL-terminated.
    pub name: [u8; PYTHON_NAME_MAX],
    /// `co_linetable`'s start (see `line_table_len`), read here because the
    /// process may be gone before an exception's lines are named.
    pub line_table: [u8; PYTHON_LINE_TABLE_MAX],
    /// The names of its first [`PYTHON_ARGS_MAX`] locals (its parameters
    /// come first), NUL-terminated, with `--capture-args`.
    pub parameters: [[u8; PYTHON_ARG_TEXT]; PYTHON_ARGS_MAX],
}

/// Bytes of a code object's line table a [`PythonCodeEvent`] carries (a
/// function of some forty lines).
pub const PYTHON_LINE_TABLE_MAX: usize = 256;

/// An exception leaving the traced Python call `span_id` on thread `tid`,
/// the first traced call it leaves: its type and message as the thread
/// state holds them at that call's NULL return.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PythonExceptionEvent {
    /// Always [`event_kind::PYTHON_EXCEPTION`].
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub _pad: u32,
    pub span_id: u64,
    /// The exception's type object, for the agent to read its module.
    pub type_object: u64,
    /// The type's `tp_name`, NUL-terminated.
    pub type_name: [u8; PYTHON_NAME_MAX],
    /// `str(args[0])` when it is an ASCII `str` (or the pending value
    /// itself, when a C function set a bare string), NUL-terminated.
    pub message: [u8; PYTHON_PATH_MAX],
}

/// A key of the kernel's `PYTHON_CODES` map: a code object in a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonCodeKey {
    pub tgid: u32,
    pub _pad: u32,
    pub code: u64,
}

/// What a code object was when it was judged (its file and name objects
/// and first line), and whether its calls are traced (1) or not (0; the
/// agent sets 0 for code `--include`/`--exclude` leave out).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonCodeVerdict {
    pub filename: u64,
    pub name: u64,
    pub line: u32,
    pub traced: u32,
}

/// Where the kernel side finds a Python call's code and the code's name
/// (bytes, for the interpreter's version), set by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonOffsets {
    /// Of the code object in the frame the eval function gets in `rsi`
    /// (a `PyFrameObject` in 3.10, a `_PyInterpreterFrame` from 3.11).
    pub frame_code: u32,
    /// Of `co_filename`, `co_qualname` (or `co_name`), `co_firstlineno`.
    pub code_filename: u32,
    pub code_name: u32,
    pub code_line: u32,
    /// Of the characters of a compact ASCII `str` (48 to 3.11, 40 from 3.12).
    pub ascii_data: u32,
    /// Bytes of the project root (with its trailing `/`) in `PYTHON_ROOT`.
    pub root_len: u32,
    /// Of the pending exception in `PyThreadState`: `current_exception`
    /// (3.12+) or `curexc_value`.
    pub thread_exception: u32,
    /// Of `curexc_type` before 3.12 (the value may be unset, or not yet an
    /// exception object); 0 from 3.12.
    pub thread_exception_type: u32,
    /// Of `co_flags` in a code object.
    pub code_flags: u32,
    /// Of the frame's `owner` (3.11+: a generator's frame is owned by the
    /// generator); 0 when frames have none (3.10).
    pub frame_owner: u32,
    /// Of a generator's state (negative while suspended), from its frame:
    /// `PyFrameObject.f_state` (3.10), or the generator's `gi_frame_state`
    /// just before its embedded frame (3.11+, then negative).
    pub frame_state: i32,
    /// That state's value before the first resume (`FRAME_CREATED`).
    pub state_created: i32,
    /// Of the frame's instruction: `f_lasti` (3.10, a code unit index), or
    /// a pointer to the code unit (`prev_instr`, `instr_ptr`; 3.11+).
    pub frame_instr: u32,
    /// Of the code units in a code object (`co_code_adaptive`, 3.11+); 0
    /// when the frame holds an index.
    pub code_units: u32,
    /// Of `co_argcount` and `co_kwonlyargcount`.
    pub code_argcount: u32,
    pub code_kwonly: u32,
    /// Of the frame's locals, the arguments first (`f_localsplus`,
    /// `localsplus`).
    pub frame_locals: u32,
    /// 1 when an `int` keeps its digit count in `lv_tag` (3.12+: count << 3,
    /// sign in the low bits), 0 when in a signed `ob_size`.
    pub long_tagged: u32,
    /// 1 with `--capture-args` (set by the agent).
    pub capture_args: u32,
    /// Of `co_varnames` (3.10) or `co_localsplusnames`, and of
    /// `co_linetable`.
    pub code_varnames: u32,
    pub code_linetable: u32,
    pub _pad: u32,
}

/// The `fn_id` of a span that is not a function call (an HTTP span).
pub const NO_FUNCTION: u32 = u32::MAX;

/// Bytes of an HTTP message one [`HttpEvent`] carries.
pub const HTTP_CHUNK: usize = 4096;

/// Bytes of one HTTP request (head and body) copied at most, in chunks:
/// enough for a large header block, bounded for a stream that never ends.
pub const HTTP_MAX_COPY: u32 = 16384;

/// Bytes of a response copied: its status line.
pub const HTTP_RESPONSE_COPY: u32 = 256;

/// Which message an [`HttpEvent`] carries bytes of.
pub mod http_part {
    /// A request read by a server (the span is `HTTP_SERVER`).
    pub const SERVER_REQUEST: u32 = 1;
    /// The start of the response a server wrote.
    pub const SERVER_RESPONSE: u32 = 2;
    /// A request written by a client (the span is `HTTP_CLIENT`).
    pub const CLIENT_REQUEST: u32 = 3;
    /// The start of the response the client read.
    pub const CLIENT_RESPONSE: u32 = 4;
}

/// One end of a TCP connection, as the kernel's socket holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// IPv4 in the first 4 bytes, or IPv6; network byte order.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` (2) or `AF_INET6` (10); 0 when not known.
    pub family: u16,
    pub _pad: u32,
}

/// Bytes of an HTTP/1.x message on a traced process's TCP socket: the
/// agent parses them (the kernel only recognises a request line or status
/// line by its first bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HttpEvent {
    /// Always [`event_kind::HTTP`].
    pub kind: u32,
    /// One of [`http_part`].
    pub part: u32,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    /// Valid bytes of `data`.
    pub len: u32,
    /// The span the message belongs to.
    pub span_id: u64,
    pub local: Endpoint,
    pub peer: Endpoint,
    pub data: [u8; HTTP_CHUNK],
}

/// Byte offsets of the kernel fields that lead from a file descriptor to
/// its socket and the socket's addresses, read from the kernel's BTF by the
/// agent (fields of `struct sock` are those of its `__sk_common`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub socket_type: u32,
    pub socket_sk: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_family: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub _pad: u32,
}

/// A request a server thread is answering (see `ThreadStack::request`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerRequest {
    /// The `HTTP_SERVER` span's id; 0 when there is none.
    pub span_id: u64,
    pub start_ns: u64,
    /// When the response's first bytes were written; 0 until then.
    pub responded_ns: u64,
    /// Traced calls the thread makes at this depth are the request's
    /// children; it drops when the thread's stack does (the call that read
    /// the request returned).
    pub depth: u32,
    pub fd: u32,
}

/// What an [`ErrorEvent`] reports.
pub mod error_kind {
    /// `__cxa_throw`: a C++ exception is thrown.
    pub const CXX_THROW: u32 = 1;
    /// `__cxa_rethrow`: `throw;` rethrows the exception being handled.
    pub const CXX_RETHROW: u32 = 2;
    /// `__cxa_begin_catch`: a C++ catch handler starts.
    pub const CXX_CATCH: u32 = 3;
    /// std's panic entry point: a Rust panic starts.
    pub const RUST_PANIC: u32 = 4;
    /// The panic's message, as the default panic hook reads it.
    pub const RUST_PANIC_MESSAGE: u32 = 5;
    /// `__rust_panic_cleanup`: `catch_unwind` caught a panic.
    pub const RUST_CATCH: u32 = 6;
    /// A fatal signal is delivered with its default action (`value`).
    pub const SIGNAL: u32 = 7;
    /// `exit_group` with a non-zero code (`value`) while traced calls run.
    pub const EXIT: u32 = 8;
    /// `runtime.gopanic`: a Go panic starts on a goroutine (`tid` is its id;
    /// `value` the runtime address of the panic value's type descriptor).
    pub const GO_PANIC: u32 = 9;
    /// A traced Go function returned while its goroutine panicked, below
    /// frames that never returned: it recovered the panic (`recover` in one
    /// of its deferred calls), and the frames above it were abandoned.
    pub const GO_RECOVER: u32 = 10;
}

/// Length of each text field of an [`ErrorEvent`].
pub const ERROR_TEXT_LEN: usize = 128;

/// A frame of the stack at an error: the traced calls in flight, outermost
/// first. The kernel copies what it has and reads one word of user memory per
/// frame, with no branch: where in each function the call was made is worked
/// out by the agent ([`ErrorEvent::call_offset`]), so that the copy stays a
/// straight line the verifier of every kernel walks once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorFrame {
    pub fn_id: u32,
    pub _pad: u32,
    pub span_id: u64,
    /// `rip` at the frame's entry probe.
    pub entry_ip: u64,
    /// The word at the frame's entry `rsp`: its return address, where its
    /// caller resumes (0 when unreadable).
    pub return_address: u64,
}

/// Something on the error path, with the thread's stack at that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ErrorEvent {
    /// Always [`event_kind::ERROR`].
    pub kind: u32,
    /// One of [`error_kind`].
    pub error_kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// Kernel monotonic clock (ns).
    pub time_ns: u64,
    /// Signal number or exit code.
    pub value: i64,
    /// Valid entries of `frames`.
    pub depth: u32,
    pub _pad: u32,
    /// Where the innermost frame called into the runtime (the return address
    /// at a throw), 0 when unknown.
    pub innermost_return: u64,
    /// What the read of each of `texts` returned, as the kernel's string
    /// helper counts it (the terminating NUL included); 0, or more than
    /// [`ERROR_TEXT_LEN`] (a failed read's negative error), when absent. See
    /// [`ErrorEvent::text`].
    pub text_lens: [u16; 4],
    /// The traced calls in flight, outermost first.
    pub frames: [ErrorFrame; MAX_DEPTH],
    /// See [`text`].
    pub texts: [[u8; ERROR_TEXT_LEN]; 4],
}

impl ErrorEvent {
    /// Where in frame `index` the call towards the error was made, as an
    /// offset from the function's entry: the next frame's return address (or
    /// [`innermost_return`](Self::innermost_return) for the innermost frame)
    /// minus this frame's entry address; 0 when unknown or not in the
    /// function.
    pub fn call_offset(&self, index: usize) -> u32 {
        let depth = (self.depth as usize).min(MAX_DEPTH);
        if index >= depth {
            return 0;
        }
        let return_address = if index + 1 < depth {
            self.frames[index + 1].return_address
        } else {
            self.innermost_return
        };
        let offset = return_address.wrapping_sub(self.frames[index].entry_ip);
        if return_address == 0 || offset >= u64::from(u32::MAX) {
            0
        } else {
            offset as u32
        }
    }

    /// The bytes of text `index` (see [`text`]): up to what the read
    /// returned and to the first NUL.
    pub fn text(&self, index: usize) -> &[u8] {
        let read = usize::from(self.text_lens[index]);
        let bytes = &self.texts[index][..read.min(ERROR_TEXT_LEN)];
        if read > ERROR_TEXT_LEN {
            return &[];
        }
        match bytes.iter().position(|&b| b == 0) {
            Some(end) => &bytes[..end],
            None => bytes,
        }
    }
}

/// Indices into [`ErrorEvent::texts`].
pub mod text {
    /// C++: the thrown type's name as `std::type_info::name()` gives it.
    pub const TYPE: usize = 0;
    /// C++: its base class's name, and that one's base's (read as if the
    /// type info were a `__si_class_type_info`; the agent checks them).
    pub const BASE: usize = 1;
    pub const BASE2: usize = 2;
    /// Rust: the panic message. C++: the string a `std::runtime_error` or
    /// `std::logic_error` holds (read as if the object were one; the agent
    /// uses it only when the type is one of those). Go: the string a string
    /// header behind the panic value's data word points to (which is what a
    /// `string`, an `*errors.errorString` and an `*fmt.wrapError` have).
    pub const MESSAGE: usize = 3;
    /// Go: the first bytes behind the panic value's data word, as they are
    /// (a `runtime.boundsError`'s fields); `BASE`'s slot.
    pub const GO_VALUE: usize = 1;
}

/// A thread that made traced calls exited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadExitEvent {
    /// Always [`event_kind::THREAD_EXIT`].
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub _pad: u32,
    pub time_ns: u64,
}

/// One traced call in flight on a thread's shadow stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    pub fn_id: u32,
    /// [`span_flags`].
    pub flags: u32,
    /// `rsp` at the function's entry: the address of its return address.
    pub sp: u64,
    pub start_ns: u64,
    pub span_id: u64,
    pub parent_span_id: u64,
    pub trace_key: u64,
    /// `rip` at the entry probe, to locate call sites within the function.
    pub entry_ip: u64,
    /// For a Python call, the interpreter frame it runs (`rsi` at the eval
    /// function's entry): a generator's or coroutine's is the same at each
    /// resume. 0 otherwise.
    pub object: u64,
}

/// A thread's shadow stack (the `THREADS` map's value). The agent reads it at
/// detach to report the calls still in flight.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ThreadStack {
    /// Number of valid frames, innermost at `frames[depth - 1]`.
    pub depth: u32,
    /// The thread's process.
    pub tgid: u32,
    /// 1 between a throw (or panic) and its catch: frames left in that time
    /// were unwound, even one at the same stack address as a new call.
    pub unwinding: u32,
    /// The thread id whose stack this is; 0 for a free `THREAD_SLOTS` slot.
    pub owner: u32,
    /// Where the thread's span ids go on from (random at its first call).
    pub next_id: u64,
    /// The HTTP request the thread is answering, if any.
    pub request: ServerRequest,
    /// A Python thread's `PyThreadState` (the eval function's first
    /// argument), where its exception in flight is found.
    pub python_thread: u64,
    /// 1 + the depth of the traced Python call an exception left last,
    /// while it is leaving calls (one after another, inner to outer); 0
    /// otherwise. A NULL return not just above it is a new exception.
    pub python_raised: u32,
    /// The [`SpanEvent::code_unit`] of the call being left, between the
    /// Python exit probe and its span.
    pub python_code_unit: u32,
    pub frames: [Frame; MAX_DEPTH],
}

/// Indices into the `COUNTERS` per-CPU array: things the kernel side could not
/// do, reported by the agent so that nothing is lost silently.
pub mod counter {
    /// Spans lost because the ring buffer was full.
    pub const RING_FULL: u32 = 0;
    /// Calls not traced because the thread's shadow stack was full.
    pub const DEPTH_OVERFLOW: u32 = 1;
    /// Calls not traced because the thread table was full.
    pub const THREADS_FULL: u32 = 2;
    /// Probed exits that matched no traced call (attached mid-call, or a
    /// frame already closed by evidence). Informational, not a loss.
    pub const UNMATCHED_EXIT: u32 = 3;
    /// Calls shorter than `--min-duration` left out on purpose (a choice,
    /// not a loss).
    pub const FILTERED: u32 = 4;
    /// Error and thread-exit records lost because the ring buffer was full
    /// (not spans: kept apart so that span counts add up exactly).
    pub const RECORDS_RING_FULL: u32 = 5;
    /// HTTP connections not followed: the connection table was full.
    pub const CONNECTIONS_FULL: u32 = 6;
    /// Calls of functions the overhead budget detached that were in flight
    /// at their detach and not seen to return: left out, never half
    /// recorded (a choice, not a loss).
    pub const DETACHED_IN_FLIGHT: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
}

/// Names of the globals the agent sets before loading the programs.
pub mod globals {
    /// `u64`: a call made by a traced function that has been running for
    /// longer than this many ns starts a trace of its own. 0 turns it off.
    pub const SPLIT_AFTER_NS: &str = "SPLIT_AFTER_NS";
    /// `u8`: 1 traces every process that runs the probed code (`--binary`)
    /// while the `TGIDS` map holds [`ALL_PROCESSES_KEY`](super::ALL_PROCESSES_KEY),
    /// 0 only the processes in the `TGIDS` map.
    pub const ALL_PROCESSES: &str = "ALL_PROCESSES";
    /// `u32`: byte offset of `child_pid` in the `sched_process_fork`
    /// tracepoint record (read from tracefs at start).
    pub const FORK_CHILD_PID_OFFSET: &str = "FORK_CHILD_PID_OFFSET";
    /// `u32`: byte offset of `group_dead` in `sched_process_exit`, 0 when the
    /// kernel's record has no such field.
    pub const EXIT_GROUP_DEAD_OFFSET: &str = "EXIT_GROUP_DEAD_OFFSET";
    /// `u32`: byte offsets of `sig` and `sa_handler` in the `signal_deliver`
    /// tracepoint record.
    pub const SIGNAL_SIG_OFFSET: &str = "SIGNAL_SIG_OFFSET";
    pub const SIGNAL_HANDLER_OFFSET: &str = "SIGNAL_HANDLER_OFFSET";
    /// `u32`: byte offset of `error_code` in `sys_enter_exit_group`.
    pub const EXIT_CODE_OFFSET: &str = "EXIT_CODE_OFFSET";
    /// `u64`: calls that return (or tail-call) in less than this many ns are
    /// not emitted, unless they are on an error path or a call under them
    /// was kept (`--min-duration`). 0 keeps every call.
    pub const MIN_DURATION_NS: &str = "MIN_DURATION_NS";
    /// `u64`: calls shorter than this count as short for the overhead
    /// budget (`FunctionState::short_calls`); 0 counts none.
    pub const BUDGET_SHORT_NS: &str = "BUDGET_SHORT_NS";
    /// `u32`: how many `THREAD_SLOTS` slots are used (a power of two, at
    /// most `THREAD_SLOTS`; 0 keeps every stack in the hash map).
    pub const THREAD_SLOTS_USED: &str = "THREAD_SLOTS_USED";
    /// `u32`: byte offsets of `task_struct.mm` and `mm_struct.start_code`
    /// (from the kernel's BTF), for the programs that find a probe by its
    /// address on kernels without attach cookies.
    pub const TASK_MM_OFFSET: &str = "TASK_MM_OFFSET";
    pub const MM_START_CODE_OFFSET: &str = "MM_START_CODE_OFFSET";
    /// `u64`: the link-time address of the probed executable's lowest
    /// executable segment: the kernel's `mm->start_code` minus this is the
    /// process's load bias.
    pub const EXEC_START: &str = "EXEC_START";
    /// `u32`: byte offset of `goid` in the Go runtime's `g` (from the
    /// binary's DWARF or the per-version table); 0 when the traced binary is
    /// not Go. Non-zero switches the function probes to goroutine stacks.
    pub const GO_GOID_OFFSET: &str = "GO_GOID_OFFSET";
    /// `u8`: 1 follows HTTP/1.x on traced processes' TCP sockets.
    pub const HTTP_ENABLED: &str = "HTTP_ENABLED";
    /// [`SocketOffsets`](super::SocketOffsets), from the kernel's BTF.
    pub const SOCKET_OFFSETS: &str = "SOCKET_OFFSETS";
    /// [`PythonOffsets`](super::PythonOffsets), for a Python interpreter.
    pub const PYTHON_OFFSETS: &str = "PYTHON_OFFSETS";
}

/// Names of the programs and maps in the eBPF object.
pub mod names {
    /// Shadow stacks of Go programs, by goroutine id.
    pub const MAP_GOROUTINES: &str = "GOROUTINES";
    pub const PROG_ENTRY: &str = "omegi_entry";
    pub const PROG_EXIT: &str = "omegi_exit";
    pub const PROG_URETPROBE: &str = "omegi_uretprobe";
    /// The function probes for kernels without attach cookies (before
    /// 5.15), which find a probe's function by its address in `PROBE_SITES`.
    pub const PROG_ENTRY_BY_ADDRESS: &str = "omegi_entry_by_address";
    pub const PROG_EXIT_BY_ADDRESS: &str = "omegi_exit_by_address";
    pub const PROG_URETPROBE_BY_ADDRESS: &str = "omegi_uretprobe_by_address";
    pub const PROG_FORK: &str = "omegi_fork";
    pub const PROG_TASK_EXIT: &str = "omegi_task_exit";
    pub const PROG_CXX_THROW: &str = "omegi_cxx_throw";
    pub const PROG_CXX_RETHROW: &str = "omegi_cxx_rethrow";
    pub const PROG_CXX_CATCH: &str = "omegi_cxx_catch";
    pub const PROG_RUST_PANIC: &str = "omegi_rust_panic";
    pub const PROG_RUST_PANIC_STR: &str = "omegi_rust_panic_str";
    pub const PROG_RUST_PANIC_STRING: &str = "omegi_rust_panic_string";
    pub const PROG_RUST_CATCH: &str = "omegi_rust_catch";
    pub const PROG_GO_PANIC: &str = "omegi_go_panic";
    pub const PROG_GO_EXIT: &str = "omegi_go_exit";
    pub const PROG_SIGNAL: &str = "omegi_signal";
    pub const PROG_EXIT_GROUP: &str = "omegi_exit_group";
    pub const MAP_EVENTS: &str = "EVENTS";
    pub const MAP_COUNTERS: &str = "COUNTERS";
    pub const MAP_TGIDS: &str = "TGIDS";
    pub const MAP_THREADS: &str = "THREADS";
    pub const MAP_THREAD_SLOTS: &str = "THREAD_SLOTS";
    pub const MAP_STATE: &str = "STATE";
    pub const MAP_FUNCTIONS: &str = "FUNCTIONS";
    pub const MAP_PROBE_SITES: &str = "PROBE_SITES";
    pub const MAP_CONNECTIONS: &str = "CONNECTIONS";
    /// The project root's bytes, for Python code's file names.
    pub const MAP_PYTHON_ROOT: &str = "PYTHON_ROOT";
    /// Python code objects seen, by process, and whether they are traced.
    pub const MAP_PYTHON_CODES: &str = "PYTHON_CODES";
    /// HTTP on sockets: the programs on syscall tracepoints.
    pub const PROG_IO_READ: &str = "omegi_io_read";
    pub const PROG_IO_WRITE: &str = "omegi_io_write";
    pub const PROG_IO_READV: &str = "omegi_io_readv";
    pub const PROG_IO_WRITEV: &str = "omegi_io_writev";
    pub const PROG_IO_RECVMSG: &str = "omegi_io_recvmsg";
    pub const PROG_IO_SENDMSG: &str = "omegi_io_sendmsg";
    pub const PROG_IO_EXIT: &str = "omegi_io_exit";
    pub const PROG_IO_CLOSE: &str = "omegi_io_close";
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data, `#[repr(C)]`, no padding the kernel leaves unset.
unsafe impl aya::Pod for SpanEvent {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for ErrorEvent {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for ThreadExitEvent {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for ThreadStack {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for FunctionState {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for HttpEvent {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SocketOffsets {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PythonOffsets {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PythonCodeEvent {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PythonExceptionEvent {}

#[cfg(feature = "user")]
unsafe impl aya::Pod for PythonArgsEvent {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PythonCodeKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PythonCodeVerdict {}
