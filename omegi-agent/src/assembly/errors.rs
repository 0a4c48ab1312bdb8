//! The error path: which spans an error passed through, and how it ended.
//!
//! Per thread, an error starts at a throw, a panic, a fatal signal, a failing
//! exit (kernel events with the stack at that moment) or a return-value rule.
//! While it is in flight, the calls it unwinds (or, for a signal or exit, the
//! calls the dying thread leaves open) are its *flow*: their spans get status
//! ERROR, innermost first. It ends when it is caught (by a traced function,
//! or outside them), when its thread ends, or when the process dies; then the
//! traces it touched carry its [`ErrorInfo`].

use std::{collections::HashSet, sync::Arc, time::Instant};

use omegi_common::{error_kind, text, ErrorEvent, ERROR_TEXT_LEN};

/// What kind of error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A C++ exception.
    Exception,
    /// A Rust panic.
    Panic,
    /// A fatal signal (SIGSEGV, SIGABRT, …) with no handler.
    Signal,
    /// `exit` with a non-zero code while traced calls were running.
    Exit,
    /// A return value that an `--error-if` rule calls a failure.
    ReturnValue,
}

/// A traced call on the stack when the error happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackFrame {
    pub fn_id: u32,
    pub span_id: u64,
    /// Bytes from the function's entry probe to the return address of the
    /// call towards the error (0 = unknown); see
    /// [`FunctionTable::call_site`](crate::discovery::FunctionTable::call_site).
    pub call_offset: u32,
    /// The source line it was at, when known without `call_offset` (a
    /// Python call: from its code's line table).
    pub line: Option<u32>,
}

/// A call the error left without returning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowStep {
    pub fn_id: u32,
    pub span_id: u64,
}

/// How an error ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A handler in this traced call caught it.
    CaughtBy { fn_id: u32, span_id: u64 },
    /// Caught by code outside the traced functions, which carried on.
    CaughtOutside,
    /// It ended its thread (a panic out of a thread's function).
    ThreadEnded,
    /// The process died of this signal.
    Terminated { signal: i32 },
    /// The process exited with this code.
    Exited { code: i32 },
    /// The function returned the failing value to its caller.
    Returned,
    /// Not known (omegi detached first, or nothing followed in time).
    Unknown,
}

/// An error, as exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorInfo {
    pub kind: ErrorKind,
    /// `exception.type`: a C++ type, `panic`, a signal name, `exit`, `return value`.
    pub type_name: String,
    /// `exception.message`.
    pub message: String,
    /// The calls it left, innermost first (`exception.flow`).
    pub flow: Vec<FlowStep>,
    /// The traced calls in flight when it happened, innermost first.
    pub stack: Vec<StackFrame>,
    pub outcome: Outcome,
}

impl ErrorInfo {
    /// The status description of a span on the error's flow.
    pub fn description(&self) -> String {
        if self.message.is_empty() || self.message == self.type_name {
            self.type_name.clone()
        } else {
            format!("{}: {}", self.type_name, self.message)
        }
    }
}

/// Where an error on a thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Thrown or panicking: the calls closed now were unwound.
    Unwinding,
    /// Caught outside the traced calls: the thread either carries on (a
    /// normal return follows) or ends (its exit follows).
    AwaitingEnd,
    /// The process is ending: the calls closed now were left open by it.
    Terminal,
}

/// An error in flight on one thread.
#[derive(Debug)]
pub struct ThreadError {
    pub info: ErrorInfo,
    phase: Phase,
    /// Trace keys of the spans it marked.
    pub touched: HashSet<u64>,
    pub updated: Instant,
}

impl ThreadError {
    fn new(
        kind: ErrorKind,
        type_name: String,
        message: String,
        event: &ErrorEvent,
        phase: Phase,
    ) -> Self {
        Self {
            info: ErrorInfo {
                kind,
                type_name,
                message,
                flow: Vec::new(),
                stack: stack_of(event),
                outcome: Outcome::Unknown,
            },
            phase,
            touched: HashSet::new(),
            updated: Instant::now(),
        }
    }

    /// Whether a call that ended this way is on the error's path.
    pub fn claims(&self, end: super::SpanEnd) -> bool {
        use super::SpanEnd;
        match self.phase {
            Phase::Unwinding => matches!(end, SpanEnd::Unwound | SpanEnd::Replaced),
            Phase::Terminal => matches!(end, SpanEnd::ThreadExit | SpanEnd::Unwound),
            Phase::AwaitingEnd => false,
        }
    }

    /// Whether a normal return now means the error was caught and the
    /// thread carried on.
    pub fn ends_on_return(&self) -> bool {
        self.phase == Phase::AwaitingEnd
    }

    /// Records a call the error left.
    pub fn add_step(&mut self, fn_id: u32, span_id: u64, trace_key: u64) {
        self.info.flow.push(FlowStep { fn_id, span_id });
        self.touched.insert(trace_key);
        self.updated = Instant::now();
    }
}

/// What an error event does to the thread's error state.
pub enum Transition {
    /// A new error starts (any previous one on the thread is resolved first).
    Start(ThreadError),
    /// The error in flight goes on (a rethrow, its message arrived).
    Continue,
    /// The error in flight ended this way; it is resolved now.
    Resolve(Outcome),
    /// The error in flight was caught outside traced code: wait for the
    /// thread to carry on or end.
    AwaitEnd,
    /// The process is dying of the error in flight, with this outcome.
    Terminal(Outcome),
    /// Nothing to do.
    Ignore,
}

/// Decides what an error event means, given the error in flight on its
/// thread (if any). Applies small updates (message) in place.
pub fn transition(
    event: &ErrorEvent,
    current: Option<&mut ThreadError>,
    go_panics: Option<&GoPanicValues>,
) -> Transition {
    let in_flight = current;
    match event.error_kind {
        error_kind::CXX_THROW => {
            let (type_name, message) = cxx_exception(event);
            Transition::Start(ThreadError::new(
                ErrorKind::Exception,
                type_name,
                message,
                event,
                Phase::Unwinding,
            ))
        }
        error_kind::CXX_RETHROW => match in_flight {
            Some(error) => {
                error.phase = Phase::Unwinding;
                error.updated = Instant::now();
                Transition::Continue
            }
            None => Transition::Start(ThreadError::new(
                ErrorKind::Exception,
                "exception".into(),
                String::new(),
                event,
                Phase::Unwinding,
            )),
        },
        error_kind::RUST_PANIC => Transition::Start(ThreadError::new(
            ErrorKind::Panic,
            "panic".into(),
            String::new(),
            event,
            Phase::Unwinding,
        )),
        error_kind::RUST_PANIC_MESSAGE => {
            if let Some(error) = in_flight.filter(|e| e.info.kind == ErrorKind::Panic) {
                error.info.message = event_text(event, text::MESSAGE);
                error.updated = Instant::now();
            }
            Transition::Continue
        }
        error_kind::GO_PANIC => {
            let (type_name, message) = match go_panics {
                Some(values) => values.describe(event),
                None => ("panic".to_owned(), String::new()),
            };
            Transition::Start(ThreadError::new(
                ErrorKind::Panic,
                type_name,
                message,
                event,
                Phase::Unwinding,
            ))
        }
        error_kind::CXX_CATCH | error_kind::RUST_CATCH | error_kind::GO_RECOVER => {
            if in_flight.is_none() {
                return Transition::Ignore;
            }
            match innermost(event) {
                Some(frame) => Transition::Resolve(Outcome::CaughtBy {
                    fn_id: frame.fn_id,
                    span_id: frame.span_id,
                }),
                None => Transition::AwaitEnd,
            }
        }
        error_kind::SIGNAL => {
            let signal = event.value as i32;
            match in_flight {
                Some(_) => Transition::Terminal(Outcome::Terminated { signal }),
                None => {
                    let name = signal_name(signal);
                    let mut error = ThreadError::new(
                        ErrorKind::Signal,
                        name.clone(),
                        format!("killed by signal {signal}"),
                        event,
                        Phase::Terminal,
                    );
                    error.info.outcome = Outcome::Terminated { signal };
                    Transition::Start(error)
                }
            }
        }
        error_kind::EXIT => {
            let code = event.value as i32;
            match in_flight {
                Some(error) if matches!(error.info.outcome, Outcome::Terminated { .. }) => {
                    Transition::Ignore
                }
                Some(_) => Transition::Terminal(Outcome::Exited { code }),
                None => {
                    let mut error = ThreadError::new(
                        ErrorKind::Exit,
                        "exit".into(),
                        format!("exit({code}) with traced calls running"),
                        event,
                        Phase::Terminal,
                    );
                    error.info.outcome = Outcome::Exited { code };
                    Transition::Start(error)
                }
            }
        }
        _ => Transition::Ignore,
    }
}

/// Applies a phase change the transition asked for.
pub fn enter_terminal(error: &mut ThreadError, outcome: Outcome) {
    error.phase = Phase::Terminal;
    error.info.outcome = outcome;
    error.updated = Instant::now();
}

pub fn enter_awaiting_end(error: &mut ThreadError) {
    error.phase = Phase::AwaitingEnd;
    error.info.outcome = Outcome::CaughtOutside;
    error.updated = Instant::now();
}

/// An error for a return value a rule calls a failure.
pub fn return_value_error(
    type_name: String,
    message: String,
    fn_id: u32,
    span_id: u64,
) -> ErrorInfo {
    ErrorInfo {
        kind: ErrorKind::ReturnValue,
        type_name,
        message,
        flow: vec![FlowStep { fn_id, span_id }],
        stack: vec![StackFrame {
            fn_id,
            span_id,
            call_offset: 0,
            line: None,
        }],
        outcome: Outcome::Returned,
    }
}

/// Freezes an error for export.
pub fn freeze(error: &ThreadError) -> Arc<ErrorInfo> {
    Arc::new(error.info.clone())
}

/// How a Go program's panic values read: its type names (the table's
/// [`GoPanics`](crate::discovery::go_panic::GoPanics)), and where each traced
/// function's entry probe is, to take the load bias off a type descriptor's
/// runtime address.
#[derive(Debug)]
pub struct GoPanicValues(Arc<crate::discovery::FunctionTable>);

impl GoPanicValues {
    /// For `table`'s program, if it is a Go program.
    pub fn of(table: &Arc<crate::discovery::FunctionTable>) -> Option<Self> {
        table.go.is_some().then(|| Self(Arc::clone(table)))
    }

    /// The panic's type name (`panic` when it is not known) and message.
    fn describe(&self, event: &ErrorEvent) -> (String, String) {
        // The outermost frame's entry probe ran at its link-time address
        // plus the load bias.
        let type_name = (event.depth > 0)
            .then(|| {
                let frame = &event.frames[0];
                let function = self.0.functions.get(frame.fn_id as usize)?;
                let bias = frame
                    .entry_ip
                    .wrapping_sub(function.code.entry.as_ref()?.address);
                self.0
                    .go
                    .as_ref()?
                    .panics
                    .type_name((event.value as u64).wrapping_sub(bias))
            })
            .flatten();
        let Some(type_name) = type_name else {
            return ("panic".to_owned(), String::new());
        };
        let type_name = type_name.as_str();
        let text = std::str::from_utf8(event.text(text::MESSAGE)).ok();
        let raw_len = usize::from(event.text_lens[text::GO_VALUE]).min(ERROR_TEXT_LEN);
        let raw = &event.texts[text::GO_VALUE][..raw_len];
        let message = crate::discovery::go_panic::message(type_name, text, raw);
        (type_name.to_owned(), message)
    }
}

fn stack_of(event: &ErrorEvent) -> Vec<StackFrame> {
    let depth = (event.depth as usize).min(event.frames.len());
    (0..depth)
        .rev()
        .map(|index| StackFrame {
            fn_id: event.frames[index].fn_id,
            span_id: event.frames[index].span_id,
            call_offset: event.call_offset(index),
            line: None,
        })
        .collect()
}

fn innermost(event: &ErrorEvent) -> Option<&omegi_common::ErrorFrame> {
    let depth = (event.depth as usize).min(event.frames.len());
    depth.checked_sub(1).map(|index| &event.frames[index])
}

fn event_text(event: &ErrorEvent, index: usize) -> String {
    String::from_utf8_lossy(event.text(index)).into_owned()
}

/// libstdc++ types whose object holds the `what()` string right after the
/// vtable.
const MESSAGE_HOLDERS: &[&str] = &[
    "std::runtime_error",
    "std::logic_error",
    "std::invalid_argument",
    "std::domain_error",
    "std::length_error",
    "std::out_of_range",
    "std::range_error",
    "std::overflow_error",
    "std::underflow_error",
];

/// The thrown type's readable name and, when it is (or directly derives
/// from) a type that keeps its message where the kernel side read it, the
/// message.
fn cxx_exception(event: &ErrorEvent) -> (String, String) {
    let type_name = demangle_type(&event_text(event, text::TYPE));
    let holds_message = [text::TYPE, text::BASE, text::BASE2].iter().any(|&index| {
        let name = if index == text::TYPE {
            type_name.clone()
        } else {
            demangle_type(&event_text(event, index))
        };
        MESSAGE_HOLDERS.contains(&name.as_str())
    });
    let message = if holds_message {
        event_text(event, text::MESSAGE)
    } else {
        String::new()
    };
    let type_name = if type_name.is_empty() {
        "exception".into()
    } else {
        type_name
    };
    (type_name, message)
}

/// `St13runtime_error` → `std::runtime_error` (a `std::type_info::name()`).
pub fn demangle_type(name: &str) -> String {
    let name = name.strip_prefix('*').unwrap_or(name);
    if name.is_empty() {
        return String::new();
    }
    cpp_demangle::Symbol::new(format!("_ZTS{name}"))
        .ok()
        .and_then(|symbol| symbol.demangle().ok())
        .and_then(|text| text.strip_prefix("typeinfo name for ").map(str::to_owned))
        .unwrap_or_default()
}

/// `SIGSEGV` for 11.
pub fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names() {
        assert_eq!(demangle_type("St13runtime_error"), "std::runtime_error");
        assert_eq!(demangle_type("N6shapes10ParseErrorE"), "shapes::ParseError");
        assert_eq!(demangle_type("i"), "int");
        assert_eq!(
            demangle_type("*N12_GLOBAL__N_13BadE"),
            "(anonymous namespace)::Bad"
        );
        assert_eq!(demangle_type("\u{1}garbage"), "");
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(11), "SIGSEGV");
        assert_eq!(signal_name(6), "SIGABRT");
    }
}
