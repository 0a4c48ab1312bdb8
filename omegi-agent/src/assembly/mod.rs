//! Span assembly: ended calls from the kernel become traces.
//!
//! The kernel side already knows each span's parent and the trace root it
//! belongs to (`trace_key`, the root's span id). Assembly gives every trace a
//! random 128-bit id, converts times to wall-clock, collects a trace's spans
//! until its root ends, and hands the finished trace on.
//!
//! # Traces whose root does not end
//!
//! A server's `main` or a worker's loop may never return. Three rules keep
//! such roots from holding memory:
//!
//! 1. In the kernel: a call made by a function that has been running for
//!    longer than `--split-after` (default 1 s) starts a trace of its own, so
//!    each request handled under a long-lived loop is its own trace. Its
//!    caller is kept in the `omegi.caller.span_id` attribute.
//! 2. Here: a trace that reaches `--max-trace-spans` ended spans, or that has
//!    had no new span for [`IDLE_PIECE_AFTER`], is handed on as a *piece*
//!    (same trace id, `complete: false`); the rest follows in later pieces.
//! 3. At detach: calls still in flight are handed on as unfinished spans
//!    ending at the detach time.
//!
//! # Errors
//!
//! [`errors`] follows each error along its thread; the spans it passes
//! through get status ERROR and the traces it touched carry its
//! [`ErrorInfo`]. A finished trace whose error is still in flight (a panic
//! caught outside traced code: does the thread carry on or end?) waits for
//! the error to end. An error trace whose root is still running is handed on
//! as a piece after [`ERROR_PIECE_AFTER`] rather than waiting for the root.

pub mod errors;
mod python;
pub mod rules;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use omegi_common::{
    end_reason, span_flags, ErrorEvent, HttpEvent, PythonCodeEvent, PythonExceptionEvent,
    SpanEvent, ThreadExitEvent,
};

use crate::http::{HttpSpan, Messages, Side, TraceParent};

pub use errors::{ErrorInfo, ErrorKind, FlowStep, Outcome, StackFrame};
use errors::{ThreadError, Transition};
pub use python::python_list_repr;
pub use rules::{FunctionRule, ReturnRule};

/// A trace with no new span for this long is handed on as a piece.
pub const IDLE_PIECE_AFTER: Duration = Duration::from_secs(5);

/// An error trace whose root is still running goes out as a piece after
/// this long.
pub const ERROR_PIECE_AFTER: Duration = Duration::from_secs(1);

/// The caller's context of a request whose trace has no spans yet is
/// forgotten after this long (its SERVER span was lost).
pub const REMOTE_CONTEXT_KEPT: Duration = Duration::from_secs(600);

/// An error in flight with nothing new for this long is ended as it stands.
pub const ERROR_SETTLE_AFTER: Duration = Duration::from_secs(2);

/// How a span ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanEnd {
    /// Through a probed `ret` (or the uretprobe).
    Returned,
    /// Through a probed tail jump.
    TailCall,
    /// Another traced function took over its stack frame (an indirect tail
    /// call).
    Replaced,
    /// The stack moved above it without a return (unwinding, `longjmp`).
    Unwound,
    /// Its thread exited while it was running.
    ThreadExit,
    /// Still running when omegi detached.
    Unfinished,
    /// An HTTP client call whose connection closed before its response.
    ConnectionClosed,
    /// An HTTP request the server gave up before answering it.
    NotAnswered,
    /// A Python generator or coroutine still suspended when the call it
    /// was first resumed in ended, or long after its last resume.
    Suspended,
}

impl SpanEnd {
    fn from_kernel(reason: u32) -> Self {
        match reason {
            end_reason::RETURNED => Self::Returned,
            end_reason::TAIL_CALL => Self::TailCall,
            end_reason::REPLACED => Self::Replaced,
            end_reason::UNWOUND => Self::Unwound,
            end_reason::THREAD_EXIT => Self::ThreadExit,
            end_reason::CONNECTION_CLOSED => Self::ConnectionClosed,
            end_reason::NOT_ANSWERED => Self::NotAnswered,
            python::END_SUSPENDED => Self::Suspended,
            _ => Self::Unfinished,
        }
    }

    /// The value of the `omegi.end` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Returned => "returned",
            Self::TailCall => "tail_call",
            Self::Replaced => "replaced",
            Self::Unwound => "unwound",
            Self::ThreadExit => "thread_exit",
            Self::Unfinished => "unfinished",
            Self::ConnectionClosed => "connection_closed",
            Self::NotAnswered => "not_answered",
            Self::Suspended => "suspended",
        }
    }
}

/// OpenTelemetry span status.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    Unset,
    Ok,
    Error(String),
}

/// One traced call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub span_id: u64,
    /// 0 for the trace's root.
    pub parent_span_id: u64,
    /// For a root split off a long-running caller: the caller's span id (in
    /// another trace).
    pub caller_span_id: Option<u64>,
    /// Function id in the [`FunctionTable`](crate::discovery::FunctionTable).
    pub fn_id: u32,
    pub pid: u32,
    /// The thread the call ran on, or for a Go function the goroutine (its
    /// id's low 32 bits): a Go program's calls are kept per goroutine, which
    /// may move between threads.
    pub tid: u32,
    /// Whether `tid` is a goroutine's id.
    pub goroutine: bool,
    /// Wall-clock, ns since the Unix epoch.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub end: SpanEnd,
    pub status: Status,
    /// For an HTTP request (then `fn_id` is `omegi_common::NO_FUNCTION`).
    pub http: Option<Box<HttpSpan>>,
    /// A Python call's arguments with `--capture-args`, as the seed wrote
    /// them: `name: type = value`.
    pub arguments: Vec<String>,
}

impl Span {
    pub fn duration_ns(&self) -> u64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns)
    }

    /// The parent exporters name: the traced parent, or for a server span
    /// that continues a caller's trace, the caller's span (in another
    /// service); 0 for a root.
    pub fn exported_parent_span_id(&self) -> u64 {
        if self.parent_span_id != 0 {
            return self.parent_span_id;
        }
        self.remote_parent().map_or(0, |parent| parent.parent_id)
    }

    /// The caller's context a server span continues.
    pub fn remote_parent(&self) -> Option<TraceParent> {
        self.http.as_ref()?.remote_parent()
    }

    /// The attribute that names what ran the call: `thread.id`, or
    /// `go.goroutine.id` for a Go function (a goroutine's thread is not
    /// known, and changes).
    pub fn runner_attribute(&self) -> &'static str {
        if self.goroutine {
            "go.goroutine.id"
        } else {
            "thread.id"
        }
    }

    /// OpenTelemetry's span kind name.
    pub fn kind_name(&self) -> &'static str {
        self.http
            .as_ref()
            .map_or("INTERNAL", |http| http.kind_name())
    }
}

/// A trace, or a piece of one.
#[derive(Clone, Debug)]
pub struct Trace {
    pub trace_id: u128,
    /// Spans in the order they ended: children before parents, the root last.
    pub spans: Vec<Span>,
    /// `true` when this holds the root and everything under it that was not
    /// handed on in earlier pieces.
    pub complete: bool,
    /// Chosen by the flow sampling rule (see [`is_sampled`]).
    pub sampled: bool,
    /// The errors whose path runs through this trace (empty for most).
    pub errors: Vec<Arc<ErrorInfo>>,
}

impl Trace {
    /// The root span, if this piece holds it.
    pub fn root(&self) -> Option<&Span> {
        self.spans.last().filter(|span| span.parent_span_id == 0)
    }

    /// Whether this is an error trace (exported whatever the sampling says).
    pub fn is_error(&self) -> bool {
        !self.errors.is_empty()
    }
}

/// The Omegi/OpenTelemetry `TraceIdRatioBased` rule: keep a trace when the
/// low 64 bits of its id are below `2^64 / rate`. Deterministic on the id, so
/// every service decides the same way for a trace.
pub fn is_sampled(trace_id: u128, rate: u32) -> bool {
    if rate <= 1 {
        return true;
    }
    let bound = ((1u128 << 64) as f64 / f64::from(rate)).round() as u128;
    (trace_id & u128::from(u64::MAX)) < bound
}

/// Converts the kernel's monotonic clock to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Wall-clock ns minus monotonic ns.
    offset_ns: i128,
}

impl Clock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        let realtime = read_clock(libc::CLOCK_REALTIME);
        let monotonic = read_clock(libc::CLOCK_MONOTONIC);
        Self {
            offset_ns: realtime as i128 - monotonic as i128,
        }
    }

    /// A clock with a known offset (tests, replay).
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    pub fn to_unix_ns(self, monotonic_ns: u64) -> u64 {
        (monotonic_ns as i128 + self.offset_ns).max(0) as u64
    }

    /// The monotonic clock now, as the kernel's `bpf_ktime_get_ns` reads it.
    pub fn monotonic_now() -> u64 {
        read_clock(libc::CLOCK_MONOTONIC)
    }
}

fn read_clock(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct PendingTrace {
    trace_id: u128,
    spans: Vec<Span>,
    last_activity: Instant,
    /// Set when an error that touched this trace ended while its root runs.
    error_since: Option<Instant>,
}

/// Builds traces from kernel events.
pub struct Assembler {
    pending: HashMap<u64, PendingTrace, BuildIdHasher>,
    clock: Clock,
    max_trace_spans: usize,
    flow_rate: u32,
    /// The `--error-if` rule for each function id that has one.
    rules: HashMap<u32, FunctionRule>,
    /// The error in flight on each thread.
    thread_errors: HashMap<u32, ThreadError>,
    /// Ended errors by the trace key they touched, until that trace goes out.
    trace_errors: HashMap<u64, Vec<Arc<ErrorInfo>>>,
    /// Finished traces waiting for their thread's error to end: (tid, key, trace).
    parked: Vec<(u32, u64, Trace)>,
    /// The type and message of the last exception caught on each thread, for
    /// a `throw;` in its handler.
    last_exception: HashMap<u32, (String, String)>,
    /// The bytes of HTTP requests in flight.
    http: Messages,
    /// The caller's context of each trace (by key) that continues one, and
    /// when it came.
    remote: HashMap<u64, (TraceParent, Instant)>,
    /// How a Go program's panic values read, for a Go program.
    go_panics: Option<errors::GoPanicValues>,
    /// A Python interpreter's code objects, for a Python program.
    python: Option<python::PythonCalls>,
}

impl Assembler {
    /// `rules` maps function ids to the return-value rule that applies to
    /// them (see [`rules::for_functions`]).
    pub fn new(
        clock: Clock,
        max_trace_spans: usize,
        flow_rate: u32,
        rules: HashMap<u32, FunctionRule>,
    ) -> Self {
        Self {
            pending: HashMap::default(),
            clock,
            max_trace_spans: max_trace_spans.max(1),
            flow_rate,
            rules,
            thread_errors: HashMap::new(),
            trace_errors: HashMap::new(),
            parked: Vec::new(),
            last_exception: HashMap::new(),
            http: Messages::default(),
            remote: HashMap::new(),
            go_panics: None,
            python: None,
        }
    }

    /// Names a Python interpreter's calls by their code objects (`table` is
    /// the interpreter's; the functions found are added to it).
    pub fn with_python(mut self, table: &Arc<crate::discovery::FunctionTable>) -> Self {
        self.python = python::PythonCalls::of(table);
        self
    }

    /// Takes a Python code object's name and place; false when
    /// `--include`/`--exclude` leave it out (the kernel should stop tracing
    /// it).
    pub fn on_python_code(&mut self, event: &PythonCodeEvent) -> bool {
        match &mut self.python {
            Some(python) => python.on_code(event),
            None => true,
        }
    }

    /// Takes a traced Python call's arguments (`--capture-args`).
    pub fn on_python_args(&mut self, event: &omegi_common::PythonArgsEvent) {
        if let Some(python) = &mut self.python {
            python.on_args(event);
        }
    }

    /// Takes what a Python exception leaving a traced call is.
    pub fn on_python_exception(&mut self, event: &PythonExceptionEvent) {
        if let Some(python) = &mut self.python {
            python.on_exception(event);
        }
    }

    /// How many Python functions under the project root ran, for a Python
    /// interpreter.
    pub fn python_functions_seen(&self) -> Option<usize> {
        self.python
            .as_ref()
            .map(python::PythonCalls::functions_seen)
    }

    /// The function a call is of: for a Python call, its code object's.
    fn function_of(&self, fn_id: u32, tgid: u32, entry_ip: u64) -> u32 {
        match &self.python {
            Some(python) => python.function_of(fn_id, tgid, entry_ip),
            None => fn_id,
        }
    }

    /// Names the values of a Go program's panics (`table` is the program's).
    pub fn with_go_panics(mut self, table: &Arc<crate::discovery::FunctionTable>) -> Self {
        self.go_panics = errors::GoPanicValues::of(table);
        self
    }

    /// Counts HTTP problems into `stats` (the agent's summary).
    pub fn with_http_stats(mut self, stats: Arc<crate::http::HttpStats>) -> Self {
        self.http = Messages::new(stats);
        self
    }

    /// Takes bytes of an HTTP message.
    pub fn on_http(&mut self, event: &HttpEvent) {
        if let Some(parent) = self.http.on_event(event) {
            // A server span's id is its trace's key.
            self.remote.insert(event.span_id, (parent, Instant::now()));
        }
    }

    /// The id of a new trace: its caller's, when it continues one.
    fn trace_id_for(&self, trace_key: u64) -> u128 {
        self.remote
            .get(&trace_key)
            .map_or_else(new_trace_id, |(parent, _)| parent.trace_id)
    }

    /// Takes one ended call; returns the traces (or pieces) that are ready.
    pub fn on_span(&mut self, event: &SpanEvent) -> Vec<Trace> {
        let mut ready = Vec::new();
        let fn_id = self.function_of(event.fn_id, event.tgid, event.entry_ip);
        let Some(event) = self.fold_resume(event, fn_id, &mut ready) else {
            return ready;
        };
        let event = &*event;
        let is_root = event.flags & span_flags::TRACE_ROOT != 0;
        if let Some(python) = &mut self.python {
            if python.leave_out(fn_id, event, is_root) {
                return ready;
            }
        }
        let mut span = Span {
            span_id: event.span_id,
            parent_span_id: if is_root { 0 } else { event.parent_span_id },
            caller_span_id: (is_root && event.parent_span_id != 0).then_some(event.parent_span_id),
            fn_id,
            pid: event.tgid,
            tid: event.tid,
            goroutine: event.flags & span_flags::GOROUTINE != 0,
            start_unix_ns: self.clock.to_unix_ns(event.start_ns),
            end_unix_ns: self.clock.to_unix_ns(event.end_ns),
            end: SpanEnd::from_kernel(event.end_reason),
            status: Status::Unset,
            http: None,
            arguments: match &mut self.python {
                Some(python) => python.take_arguments(event.span_id),
                None => Vec::new(),
            },
        };
        if event.flags & (span_flags::HTTP_SERVER | span_flags::HTTP_CLIENT) != 0 {
            let side = if event.flags & span_flags::HTTP_SERVER != 0 {
                Side::Server
            } else {
                Side::Client
            };
            let http = self.http.take(event.span_id, side);
            if let Some(status) = http.status.filter(|_| http.is_error_status()) {
                span.status = Status::Error(format!("HTTP {status}"));
            } else if span.end == SpanEnd::ConnectionClosed {
                span.status = Status::Error("the connection closed before a response".into());
            }
            span.http = Some(Box::new(http));
        }

        if let Some(error) = (!self.thread_errors.is_empty())
            .then(|| self.thread_errors.get_mut(&event.tid))
            .flatten()
        {
            if error.claims(span.end) {
                span.status = Status::Error(error.info.description());
                error.add_step(fn_id, event.span_id, event.trace_key);
            } else if error.ends_on_return() && span.end == SpanEnd::Returned {
                // Caught outside the traced calls, and the thread carried on.
                ready.extend(self.resolve(event.tid));
            }
        }
        if span.end == SpanEnd::Returned {
            if let Some(python) = &mut self.python {
                match python.on_return(event, fn_id) {
                    python::Return::Plain => {}
                    python::Return::Raised(description) => {
                        span.status = Status::Error(description);
                    }
                    python::Return::Ended(trace_key, info) => {
                        if event.ret == 0 {
                            span.status = Status::Error(info.description());
                        }
                        self.trace_errors
                            .entry(trace_key)
                            .or_default()
                            .push(Arc::new(info));
                    }
                }
            }
        }
        if span.end == SpanEnd::Returned && !self.rules.is_empty() {
            if let Some(rule) = self.rules.get(&event.fn_id) {
                if rule.fails(event.ret) {
                    let (type_name, message) = rule.describe(event.ret);
                    let info =
                        errors::return_value_error(type_name, message, event.fn_id, event.span_id);
                    span.status = Status::Error(info.description());
                    self.trace_errors
                        .entry(event.trace_key)
                        .or_default()
                        .push(Arc::new(info));
                }
            }
        }
        if is_root {
            // Generators first resumed in this trace and still suspended
            // go out in it.
            let suspended = match &mut self.python {
                Some(python) => python.resumes.take_in_trace(event.trace_key),
                None => Vec::new(),
            };
            for event in suspended {
                ready.extend(self.on_span(&event));
            }
        }
        ready.extend(self.add(event.trace_key, span, is_root));
        ready
    }

    /// A generator's or coroutine's resumes are one call (see
    /// [`python::resumes`]): `None` while it is suspended (or for the call
    /// that only made it), else the event that stands for the call.
    fn fold_resume<'a>(
        &mut self,
        event: &'a SpanEvent,
        fn_id: u32,
        ready: &mut Vec<Trace>,
    ) -> Option<std::borrow::Cow<'a, SpanEvent>> {
        use std::borrow::Cow;
        let Some(python) = &mut self.python else {
            return Some(Cow::Borrowed(event));
        };
        if event.object == 0 {
            return Some(Cow::Borrowed(event));
        }
        match python.resumes.step(event, fn_id) {
            python::Step::Plain(freed) => {
                if let Some(freed) = freed {
                    ready.extend(self.on_span(&freed));
                }
                Some(Cow::Borrowed(event))
            }
            python::Step::Drop => None,
            python::Step::Held(mut moves) => {
                if let Some(freed) = moves.freed.take() {
                    ready.extend(self.on_span(&freed));
                }
                let first = moves.rename.is_none();
                self.apply_moves(moves);
                if first && event.flags & span_flags::TRACE_ROOT != 0 {
                    // Its trace waits for it; later resumes' traces join it.
                    let trace_id = self.trace_id_for(event.trace_key);
                    self.pending
                        .entry(event.trace_key)
                        .or_insert_with(|| PendingTrace {
                            trace_id,
                            spans: Vec::new(),
                            last_activity: Instant::now(),
                            error_since: None,
                        });
                }
                None
            }
            python::Step::Whole(whole, mut moves) => {
                if let Some(freed) = moves.freed.take() {
                    ready.extend(self.on_span(&freed));
                }
                self.apply_moves(moves);
                Some(Cow::Owned(whole))
            }
        }
    }

    /// What a generator's later resume changes: the calls it made hang from
    /// its first resume, and a trace it began joins the first one's.
    fn apply_moves(&mut self, moves: python::Moves) {
        if let Some((trace_key, from, to, since_ns)) = moves.rename {
            if let Some(pending) = self.pending.get_mut(&trace_key) {
                // Spans are in the order they ended: the resume's calls are
                // the last ones, none ended before it began.
                let since = self.clock.to_unix_ns(since_ns);
                for span in pending.spans.iter_mut().rev() {
                    if span.end_unix_ns < since {
                        break;
                    }
                    if span.parent_span_id == from {
                        span.parent_span_id = to;
                    }
                }
            }
        }
        if let Some((joined, into)) = moves.join {
            let spans = self
                .pending
                .remove(&joined)
                .map(|pending| pending.spans)
                .unwrap_or_default();
            self.remote.remove(&joined);
            if let Some(errors) = self.trace_errors.remove(&joined) {
                self.trace_errors.entry(into).or_default().extend(errors);
            }
            if let Some(python) = &mut self.python {
                python.join_trace(joined, into);
            }
            let trace_id = self.trace_id_for(into);
            let pending = self.pending.entry(into).or_insert_with(|| PendingTrace {
                trace_id,
                spans: Vec::new(),
                last_activity: Instant::now(),
                error_since: None,
            });
            pending.spans.extend(spans);
            pending.last_activity = Instant::now();
        }
    }

    /// Takes one event of the error path.
    pub fn on_error(&mut self, event: &ErrorEvent) -> Vec<Trace> {
        let tid = event.tid;
        let go_panics = self.go_panics.as_ref();
        match errors::transition(event, self.thread_errors.get_mut(&tid), go_panics) {
            Transition::Start(mut error) => {
                let ready = self.resolve(tid);
                if event.error_kind == omegi_common::error_kind::CXX_RETHROW {
                    // `throw;` in a handler: the exception caught there goes on.
                    if let Some((type_name, message)) = self.last_exception.get(&tid) {
                        error.info.type_name = type_name.clone();
                        error.info.message = message.clone();
                    }
                }
                self.thread_errors.insert(tid, error);
                ready
            }
            Transition::Resolve(outcome) => {
                if let Some(error) = self.thread_errors.get_mut(&tid) {
                    error.info.outcome = outcome;
                }
                self.resolve(tid)
            }
            Transition::AwaitEnd => {
                if let Some(error) = self.thread_errors.get_mut(&tid) {
                    errors::enter_awaiting_end(error);
                }
                Vec::new()
            }
            Transition::Terminal(outcome) => {
                if let Some(error) = self.thread_errors.get_mut(&tid) {
                    errors::enter_terminal(error, outcome);
                }
                Vec::new()
            }
            Transition::Continue | Transition::Ignore => Vec::new(),
        }
    }

    /// A thread that made traced calls exited: its error, if any, ends.
    pub fn on_thread_exit(&mut self, event: &ThreadExitEvent) -> Vec<Trace> {
        self.last_exception.remove(&event.tid);
        if let Some(error) = self.thread_errors.get_mut(&event.tid) {
            if error.info.outcome == Outcome::CaughtOutside
                || error.info.outcome == Outcome::Unknown
            {
                error.info.outcome = Outcome::ThreadEnded;
            }
        }
        self.resolve(event.tid)
    }

    fn add(&mut self, trace_key: u64, span: Span, is_root: bool) -> Option<Trace> {
        if is_root {
            let tid = span.tid;
            // A root ends its trace; one that called nothing traced never
            // had a pending entry (the common case of a hot leaf function).
            let (trace_id, spans) = match self.pending.remove(&trace_key) {
                Some(mut pending) => {
                    pending.spans.push(span);
                    (pending.trace_id, pending.spans)
                }
                None => (self.trace_id_for(trace_key), vec![span]),
            };
            self.remote.remove(&trace_key);
            let trace = self.finish(trace_key, trace_id, spans, true);
            let error_in_flight = !self.thread_errors.is_empty()
                && self
                    .thread_errors
                    .get(&tid)
                    .is_some_and(|error| error.touched.contains(&trace_key));
            if error_in_flight {
                self.parked.push((tid, trace_key, trace));
                return None;
            }
            return Some(trace);
        }
        let now = Instant::now();
        let trace_id = if self.pending.contains_key(&trace_key) {
            0
        } else {
            self.trace_id_for(trace_key)
        };
        let pending = self
            .pending
            .entry(trace_key)
            .or_insert_with(|| PendingTrace {
                trace_id,
                spans: Vec::new(),
                last_activity: now,
                error_since: None,
            });
        pending.spans.push(span);
        pending.last_activity = now;
        if pending.spans.len() >= self.max_trace_spans {
            let trace_id = pending.trace_id;
            let spans = std::mem::take(&mut pending.spans);
            return Some(self.finish(trace_key, trace_id, spans, false));
        }
        None
    }

    /// Ends the error in flight on `tid`: the traces it touched carry it, and
    /// those that waited for it are ready.
    fn resolve(&mut self, tid: u32) -> Vec<Trace> {
        let Some(error) = self.thread_errors.remove(&tid) else {
            return Vec::new();
        };
        if error.info.kind == ErrorKind::Exception {
            self.last_exception.insert(
                tid,
                (error.info.type_name.clone(), error.info.message.clone()),
            );
        }
        // An exception caught where it was thrown never left a call.
        if !error.info.flow.is_empty() {
            let info = errors::freeze(&error);
            for key in &error.touched {
                self.trace_errors
                    .entry(*key)
                    .or_default()
                    .push(Arc::clone(&info));
                if let Some(pending) = self.pending.get_mut(key) {
                    pending.error_since.get_or_insert_with(Instant::now);
                }
            }
        }
        let mut ready = Vec::new();
        let mut index = 0;
        while index < self.parked.len() {
            if self.parked[index].0 == tid {
                let (_, key, mut trace) = self.parked.swap_remove(index);
                trace
                    .errors
                    .extend(self.trace_errors.remove(&key).unwrap_or_default());
                ready.push(trace);
            } else {
                index += 1;
            }
        }
        ready
    }

    /// Hands on, as pieces, the traces idle for longer than `idle` and the
    /// error traces whose root is still running; ends errors that have
    /// settled.
    pub fn sweep_idle(&mut self, idle: Duration) -> Vec<Trace> {
        let now = Instant::now();
        // A request whose SERVER span never came (lost in a full ring
        // buffer) must not keep its context for good; one still being
        // answered by calls keeps it while they run.
        let pending = &self.pending;
        self.remote.retain(|key, (_, since)| {
            now.duration_since(*since) < REMOTE_CONTEXT_KEPT || pending.contains_key(key)
        });
        let settled: Vec<u32> = self
            .thread_errors
            .iter()
            .filter(|(_, error)| now.duration_since(error.updated) >= ERROR_SETTLE_AFTER)
            .map(|(tid, _)| *tid)
            .collect();
        let mut ready = Vec::new();
        for tid in settled {
            ready.extend(self.resolve(tid));
        }
        let stale = match &mut self.python {
            Some(python) => python.resumes.take_stale(),
            None => Vec::new(),
        };
        for event in stale {
            ready.extend(self.on_span(&event));
        }
        if let Some(python) = &mut self.python {
            python.forget_arguments_older_than(python::resumes::SUSPENDED_KEPT);
        }
        let mut pieces = Vec::new();
        for (key, pending) in &mut self.pending {
            let error_waiting = pending
                .error_since
                .is_some_and(|since| now.duration_since(since) >= ERROR_PIECE_AFTER);
            let idle_too_long = now.duration_since(pending.last_activity) >= idle;
            if !pending.spans.is_empty() && (error_waiting || idle_too_long) {
                pending.error_since = None;
                pieces.push((*key, pending.trace_id, std::mem::take(&mut pending.spans)));
            }
        }
        // A trace whose spans have all gone out keeps its id until its root
        // ends, so later pieces join it.
        ready.extend(
            pieces
                .into_iter()
                .map(|(key, trace_id, spans)| self.finish(key, trace_id, spans, false)),
        );
        ready
    }

    /// Ends assembly at detach: `in_flight` are the calls still on the
    /// threads' stacks (outermost first per thread), closed at `now_ns`
    /// (monotonic). Every error ends and every trace still pending is handed
    /// on.
    pub fn finish_all(
        &mut self,
        in_flight: &[(u32, u32, omegi_common::Frame)],
        now_ns: u64,
    ) -> Vec<Trace> {
        let mut traces = Vec::new();
        // Innermost first, as spans end.
        for &(tgid, tid, frame) in in_flight.iter().rev() {
            let event = SpanEvent {
                end_reason: u32::MAX,
                tgid,
                tid,
                fn_id: frame.fn_id,
                flags: frame.flags,
                start_ns: frame.start_ns,
                end_ns: now_ns,
                span_id: frame.span_id,
                parent_span_id: frame.parent_span_id,
                trace_key: frame.trace_key,
                entry_ip: frame.entry_ip,
                object: frame.object,
                ..SpanEvent::default()
            };
            traces.extend(self.on_span(&event));
        }
        let suspended = match &mut self.python {
            Some(python) => python.resumes.take_all(u32::MAX, now_ns),
            None => Vec::new(),
        };
        for event in suspended {
            traces.extend(self.on_span(&event));
        }
        let threads: Vec<u32> = self.thread_errors.keys().copied().collect();
        for tid in threads {
            traces.extend(self.resolve(tid));
        }
        let pending: Vec<_> = self.pending.drain().collect();
        for (key, trace) in pending {
            if !trace.spans.is_empty() {
                traces.push(self.finish(key, trace.trace_id, trace.spans, false));
            }
        }
        traces
    }

    /// The functions of the spans already recorded in traces an error
    /// touched that have not gone out yet: the overhead budget leaves them
    /// attached, so that such a trace is not cut short by their detach.
    pub fn functions_on_error_paths(&self) -> std::collections::HashSet<u32> {
        let keys = self.trace_errors.keys().chain(
            self.thread_errors
                .values()
                .flat_map(|error| error.touched.iter()),
        );
        let mut functions = std::collections::HashSet::new();
        for key in keys {
            if let Some(trace) = self.pending.get(key) {
                functions.extend(trace.spans.iter().map(|span| span.fn_id));
            }
        }
        for trace in self.pending.values() {
            if trace
                .spans
                .iter()
                .any(|span| matches!(span.status, Status::Error(_)))
            {
                functions.extend(trace.spans.iter().map(|span| span.fn_id));
            }
        }
        functions
    }

    /// Number of traces waiting for their root.
    pub fn pending_traces(&self) -> usize {
        self.pending.len()
    }

    fn finish(&mut self, key: u64, trace_id: u128, mut spans: Vec<Span>, complete: bool) -> Trace {
        if let Some(python) = &mut self.python {
            python.reparent(key, &mut spans);
        }
        let errors = if self.trace_errors.is_empty() {
            Vec::new()
        } else {
            self.trace_errors.remove(&key).unwrap_or_default()
        };
        Trace {
            trace_id,
            spans,
            complete,
            sampled: is_sampled(trace_id, self.flow_rate),
            errors,
        }
    }
}

/// Hashes the pending traces' keys, which are span ids the kernel made
/// random already: one multiplication instead of SipHash (assembly hashes
/// one key per span).
#[derive(Clone, Copy, Default)]
pub struct BuildIdHasher;

impl std::hash::BuildHasher for BuildIdHasher {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Clone, Copy, Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

fn new_trace_id() -> u128 {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omegi_common::Frame;

    fn event(span_id: u64, parent: u64, trace_key: u64, start: u64, end: u64) -> SpanEvent {
        SpanEvent {
            kind: omegi_common::event_kind::SPAN,
            end_reason: end_reason::RETURNED,
            tgid: 10,
            tid: 11,
            fn_id: span_id as u32,
            flags: if span_id == trace_key {
                span_flags::TRACE_ROOT
            } else {
                0
            },
            start_ns: start,
            end_ns: end,
            span_id,
            parent_span_id: parent,
            trace_key,
            ..SpanEvent::default()
        }
    }

    fn one(mut traces: Vec<Trace>) -> Trace {
        assert_eq!(traces.len(), 1, "{traces:?}");
        traces.remove(0)
    }

    fn assembler() -> Assembler {
        Assembler::new(Clock::with_offset(1_000), 10_000, 1, HashMap::new())
    }

    #[test]
    fn a_trace_is_handed_on_when_its_root_ends() {
        let mut a = assembler();
        assert!(a.on_span(&event(3, 2, 1, 30, 40)).is_empty());
        assert!(a.on_span(&event(2, 1, 1, 20, 50)).is_empty());
        let trace = one(a.on_span(&event(1, 0, 1, 10, 60)));
        assert!(trace.complete);
        let ids: Vec<u64> = trace.spans.iter().map(|s| s.span_id).collect();
        assert_eq!(ids, vec![3, 2, 1]);
        assert_eq!(trace.root().unwrap().span_id, 1);
        assert_eq!(trace.spans[0].start_unix_ns, 1_030);
        assert_eq!(a.pending_traces(), 0);
    }

    #[test]
    fn separate_roots_get_separate_trace_ids() {
        let mut a = assembler();
        let first = one(a.on_span(&event(1, 0, 1, 0, 1)));
        let second = one(a.on_span(&event(2, 0, 2, 2, 3)));
        assert_ne!(first.trace_id, second.trace_id);
    }

    #[test]
    fn unwound_spans_keep_their_end() {
        let mut a = assembler();
        let mut inner = event(2, 1, 1, 5, 9);
        inner.end_reason = end_reason::UNWOUND;
        a.on_span(&inner);
        let trace = one(a.on_span(&event(1, 0, 1, 0, 10)));
        assert_eq!(trace.spans[0].end, SpanEnd::Unwound);
        assert_eq!(trace.spans[1].end, SpanEnd::Returned);
    }

    #[test]
    fn a_split_root_records_its_caller() {
        let mut a = assembler();
        let mut split = event(5, 1, 5, 100, 200);
        split.flags = span_flags::TRACE_ROOT;
        let trace = one(a.on_span(&split));
        assert_eq!(trace.spans[0].parent_span_id, 0);
        assert_eq!(trace.spans[0].caller_span_id, Some(1));
    }

    #[test]
    fn big_traces_go_out_in_pieces_with_one_id() {
        let mut a = Assembler::new(Clock::with_offset(0), 2, 1, HashMap::new());
        assert!(a.on_span(&event(2, 1, 1, 1, 2)).is_empty());
        let piece = one(a.on_span(&event(3, 1, 1, 3, 4)));
        assert!(!piece.complete);
        assert_eq!(piece.spans.len(), 2);
        let rest = one(a.on_span(&event(1, 0, 1, 0, 5)));
        assert!(rest.complete);
        assert_eq!(rest.trace_id, piece.trace_id);
        assert_eq!(rest.spans.len(), 1);
    }

    #[test]
    fn idle_traces_go_out_as_pieces() {
        let mut a = assembler();
        a.on_span(&event(2, 1, 1, 1, 2));
        assert!(a.sweep_idle(Duration::from_secs(3600)).is_empty());
        let pieces = a.sweep_idle(Duration::ZERO);
        assert_eq!(pieces.len(), 1);
        assert!(!pieces[0].complete);
        let rest = one(a.on_span(&event(1, 0, 1, 0, 5)));
        assert_eq!(rest.trace_id, pieces[0].trace_id);
    }

    #[test]
    fn calls_in_flight_at_detach_are_unfinished() {
        let mut a = assembler();
        a.on_span(&event(3, 2, 1, 30, 40));
        let frame = |span_id, parent, start| Frame {
            fn_id: 7,
            flags: if parent == 0 {
                span_flags::TRACE_ROOT
            } else {
                0
            },
            sp: 0,
            start_ns: start,
            span_id,
            parent_span_id: parent,
            trace_key: 1,
            entry_ip: 0,
            object: 0,
        };
        let traces = a.finish_all(&[(10, 11, frame(1, 0, 10)), (10, 11, frame(2, 1, 20))], 99);
        assert_eq!(traces.len(), 1);
        let trace = &traces[0];
        assert!(trace.complete);
        let ends: Vec<_> = trace.spans.iter().map(|s| (s.span_id, s.end)).collect();
        assert_eq!(
            ends,
            vec![
                (3, SpanEnd::Returned),
                (2, SpanEnd::Unfinished),
                (1, SpanEnd::Unfinished)
            ]
        );
        assert_eq!(trace.spans[2].end_unix_ns, 1_099);
    }

    #[test]
    fn sampling_follows_the_trace_id_rule() {
        assert!(is_sampled(u128::MAX, 1));
        // Low 64 bits below 2^64/4 are kept at rate 4, others not.
        assert!(is_sampled((1u128 << 64) | ((1u128 << 62) - 1), 4));
        assert!(!is_sampled(1u128 << 62, 4));
        let kept = (0..10_000u128)
            .filter(|i| is_sampled(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835), 5))
            .count();
        assert!((1_800..2_200).contains(&kept), "{kept}");
    }

    fn error_event(kind: u32, frames: &[(u32, u64)]) -> ErrorEvent {
        // SAFETY: plain old data; all zeroes is a valid value.
        let mut event: ErrorEvent = unsafe { std::mem::zeroed() };
        event.kind = omegi_common::event_kind::ERROR;
        event.error_kind = kind;
        event.tgid = 10;
        event.tid = 11;
        event.depth = frames.len() as u32;
        for (slot, &(fn_id, span_id)) in event.frames.iter_mut().zip(frames) {
            slot.fn_id = fn_id;
            slot.span_id = span_id;
        }
        event
    }

    fn set_text(event: &mut ErrorEvent, index: usize, text: &str) {
        event.texts[index][..text.len()].copy_from_slice(text.as_bytes());
        event.text_lens[index] = text.len() as u16;
    }

    fn ended(mut event: SpanEvent, reason: u32) -> SpanEvent {
        event.end_reason = reason;
        event
    }

    #[test]
    fn a_caught_exception_marks_the_calls_it_left() {
        use omegi_common::{error_kind, text};
        let mut a = assembler();
        // main(1) → handle(2) → parse(3) → validate(4) throws; handle catches.
        let mut throw = error_event(error_kind::CXX_THROW, &[(1, 1), (2, 2), (3, 3), (4, 4)]);
        set_text(&mut throw, text::TYPE, "St16invalid_argument");
        set_text(&mut throw, text::BASE, "St11logic_error");
        set_text(&mut throw, text::MESSAGE, "too big");
        assert!(a.on_error(&throw).is_empty());
        assert!(a
            .on_span(&ended(event(4, 3, 1, 40, 50), end_reason::UNWOUND))
            .is_empty());
        // At the catch, a frame at the same address is unwound too.
        assert!(a
            .on_span(&ended(event(3, 2, 1, 30, 50), end_reason::REPLACED))
            .is_empty());
        assert!(a
            .on_error(&error_event(error_kind::CXX_CATCH, &[(1, 1), (2, 2)]))
            .is_empty());
        assert!(a.on_span(&event(2, 1, 1, 20, 60)).is_empty());
        let trace = one(a.on_span(&event(1, 0, 1, 10, 70)));
        assert!(trace.is_error());
        let error = &trace.errors[0];
        assert_eq!(error.type_name, "std::invalid_argument");
        assert_eq!(error.message, "too big");
        assert_eq!(error.description(), "std::invalid_argument: too big");
        let flow: Vec<u32> = error.flow.iter().map(|step| step.fn_id).collect();
        assert_eq!(flow, vec![4, 3]);
        assert_eq!(
            error.outcome,
            Outcome::CaughtBy {
                fn_id: 2,
                span_id: 2
            }
        );
        let stack: Vec<u32> = error.stack.iter().map(|frame| frame.fn_id).collect();
        assert_eq!(stack, vec![4, 3, 2, 1]);
        let statuses: Vec<bool> = trace
            .spans
            .iter()
            .map(|span| matches!(span.status, Status::Error(_)))
            .collect();
        assert_eq!(statuses, vec![true, true, false, false]);
    }

    #[test]
    fn an_exception_caught_where_it_was_thrown_is_no_error() {
        use omegi_common::error_kind;
        let mut a = assembler();
        a.on_error(&error_event(error_kind::CXX_THROW, &[(1, 1)]));
        a.on_error(&error_event(error_kind::CXX_CATCH, &[(1, 1)]));
        let trace = one(a.on_span(&event(1, 0, 1, 10, 70)));
        assert!(!trace.is_error());
    }

    #[test]
    fn a_message_is_only_read_from_types_that_hold_one() {
        use omegi_common::{error_kind, text};
        let mut a = assembler();
        let mut throw = error_event(error_kind::CXX_THROW, &[(1, 1), (2, 2)]);
        set_text(&mut throw, text::TYPE, "i");
        set_text(&mut throw, text::MESSAGE, "garbage");
        a.on_error(&throw);
        a.on_span(&ended(event(2, 1, 1, 20, 30), end_reason::UNWOUND));
        a.on_error(&error_event(error_kind::CXX_CATCH, &[(1, 1)]));
        let trace = one(a.on_span(&event(1, 0, 1, 10, 70)));
        assert_eq!(trace.errors[0].type_name, "int");
        assert_eq!(trace.errors[0].message, "");
    }

    #[test]
    fn a_panic_out_of_a_thread_waits_for_the_thread_to_end() {
        use omegi_common::{error_kind, text};
        let mut a = assembler();
        a.on_error(&error_event(error_kind::RUST_PANIC, &[(1, 1), (2, 2)]));
        let mut message = error_event(error_kind::RUST_PANIC_MESSAGE, &[]);
        set_text(&mut message, text::MESSAGE, "boom");
        a.on_error(&message);
        a.on_span(&ended(event(2, 1, 1, 20, 30), end_reason::UNWOUND));
        // The root is unwound too: the trace is complete, but how the panic
        // ends is not known yet.
        assert!(a
            .on_span(&ended(event(1, 0, 1, 10, 30), end_reason::UNWOUND))
            .is_empty());
        assert!(a
            .on_error(&error_event(error_kind::RUST_CATCH, &[]))
            .is_empty());
        let exit = ThreadExitEvent {
            kind: omegi_common::event_kind::THREAD_EXIT,
            tgid: 10,
            tid: 11,
            ..ThreadExitEvent::default()
        };
        let trace = one(a.on_thread_exit(&exit));
        let error = &trace.errors[0];
        assert_eq!(error.description(), "panic: boom");
        assert_eq!(error.outcome, Outcome::ThreadEnded);
        assert_eq!(error.flow.len(), 2);
    }

    #[test]
    fn a_panic_caught_outside_traced_code_ends_when_the_thread_carries_on() {
        use omegi_common::error_kind;
        let mut a = assembler();
        a.on_error(&error_event(error_kind::RUST_PANIC, &[(1, 1)]));
        assert!(a
            .on_span(&ended(event(1, 0, 1, 10, 30), end_reason::UNWOUND))
            .is_empty());
        a.on_error(&error_event(error_kind::RUST_CATCH, &[]));
        // A new call on that thread returns: the thread carried on.
        let mut traces = a.on_span(&event(5, 0, 5, 40, 50));
        assert_eq!(traces.len(), 2);
        let error_trace = traces.remove(0);
        assert_eq!(error_trace.errors[0].outcome, Outcome::CaughtOutside);
        assert!(!traces[0].is_error());
    }

    #[test]
    fn a_fatal_signal_marks_the_calls_left_open() {
        use omegi_common::error_kind;
        let mut a = assembler();
        let mut signal = error_event(error_kind::SIGNAL, &[(1, 1), (2, 2)]);
        signal.value = 11;
        a.on_error(&signal);
        a.on_span(&ended(event(2, 1, 1, 20, 30), end_reason::THREAD_EXIT));
        assert!(a
            .on_span(&ended(event(1, 0, 1, 10, 30), end_reason::THREAD_EXIT))
            .is_empty());
        let exit = ThreadExitEvent {
            tid: 11,
            ..ThreadExitEvent::default()
        };
        let trace = one(a.on_thread_exit(&exit));
        let error = &trace.errors[0];
        assert_eq!(error.type_name, "SIGSEGV");
        assert_eq!(error.outcome, Outcome::Terminated { signal: 11 });
        assert!(trace
            .spans
            .iter()
            .all(|span| matches!(span.status, Status::Error(_))));
    }

    #[test]
    fn an_uncaught_exception_ends_in_its_signal() {
        use omegi_common::{error_kind, text};
        let mut a = assembler();
        let mut throw = error_event(error_kind::CXX_THROW, &[(1, 1)]);
        set_text(&mut throw, text::TYPE, "St13runtime_error");
        set_text(&mut throw, text::MESSAGE, "no");
        a.on_error(&throw);
        let mut signal = error_event(error_kind::SIGNAL, &[(1, 1)]);
        signal.value = 6;
        a.on_error(&signal);
        a.on_span(&ended(event(1, 0, 1, 10, 30), end_reason::THREAD_EXIT));
        let trace = one(a.on_thread_exit(&ThreadExitEvent {
            tid: 11,
            ..ThreadExitEvent::default()
        }));
        let error = &trace.errors[0];
        assert_eq!(error.description(), "std::runtime_error: no");
        assert_eq!(error.outcome, Outcome::Terminated { signal: 6 });
    }

    #[test]
    fn a_failing_exit_marks_the_calls_left_open() {
        use omegi_common::error_kind;
        let mut a = assembler();
        let mut exit = error_event(error_kind::EXIT, &[(1, 1), (2, 2)]);
        exit.value = 3;
        a.on_error(&exit);
        a.on_span(&ended(event(2, 1, 1, 20, 30), end_reason::THREAD_EXIT));
        a.on_span(&ended(event(1, 0, 1, 10, 30), end_reason::THREAD_EXIT));
        let trace = one(a.on_thread_exit(&ThreadExitEvent {
            tid: 11,
            ..ThreadExitEvent::default()
        }));
        assert_eq!(trace.errors[0].outcome, Outcome::Exited { code: 3 });
        assert_eq!(trace.errors[0].flow.len(), 2);
    }

    /// A `ret` rule, as it applies to any function.
    fn parse_ret_rule(text: &str) -> FunctionRule {
        ReturnRule::parse(text)
            .unwrap()
            .apply(|| unreachable!())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn return_value_rules_mark_one_call() {
        let rule = parse_ret_rule("parse_*:ret<0");
        let mut a = Assembler::new(Clock::with_offset(0), 100, 1, HashMap::from([(2, rule)]));
        let mut failing = event(2, 1, 1, 20, 30);
        failing.ret = u64::from(u32::MAX); // eax = -1
        a.on_span(&failing);
        let trace = one(a.on_span(&event(1, 0, 1, 10, 40)));
        assert!(trace.is_error());
        assert_eq!(
            trace.errors[0].message,
            "returned -1 (--error-if parse_*:ret<0)"
        );
        assert!(matches!(trace.spans[0].status, Status::Error(_)));
        assert_eq!(trace.spans[1].status, Status::Unset);
    }

    #[test]
    fn functions_of_an_error_trace_still_recording_are_on_error_paths() {
        let rule = parse_ret_rule("parse_*:ret<0");
        let mut a = Assembler::new(Clock::with_offset(0), 100, 1, HashMap::from([(2, rule)]));
        // Trace 1: its call of 3 returned fine, then 2 failed; the root runs.
        a.on_span(&event(3, 1, 1, 12, 15));
        let mut failing = event(2, 1, 1, 20, 30);
        failing.ret = u64::from(u32::MAX);
        a.on_span(&failing);
        // Trace 5: nothing wrong.
        a.on_span(&event(6, 5, 5, 50, 60));
        let mut on_paths: Vec<u32> = a.functions_on_error_paths().into_iter().collect();
        on_paths.sort_unstable();
        assert_eq!(on_paths, vec![2, 3]);
        // Once the trace has gone out, nothing is held.
        one(a.on_span(&event(1, 0, 1, 10, 40)));
        assert!(a.functions_on_error_paths().is_empty());
    }

    #[test]
    fn an_error_trace_whose_root_runs_on_goes_out_as_a_piece() {
        use omegi_common::error_kind;
        let mut a = assembler();
        a.on_error(&error_event(error_kind::CXX_THROW, &[(1, 1), (2, 2)]));
        a.on_span(&ended(event(2, 1, 1, 20, 30), end_reason::UNWOUND));
        a.on_error(&error_event(error_kind::CXX_CATCH, &[(1, 1)]));
        // Not yet: the root may end soon.
        assert!(a.sweep_idle(IDLE_PIECE_AFTER).is_empty());
        std::thread::sleep(ERROR_PIECE_AFTER);
        let piece = one(a.sweep_idle(IDLE_PIECE_AFTER));
        assert!(!piece.complete && piece.is_error());
    }
}
