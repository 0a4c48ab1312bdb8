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

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use omegi_common::{end_reason, span_flags, SpanEvent};

/// A trace with no new span for this long is handed on as a piece.
pub const IDLE_PIECE_AFTER: Duration = Duration::from_secs(5);

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
}

impl SpanEnd {
    fn from_kernel(reason: u32) -> Self {
        match reason {
            end_reason::RETURNED => Self::Returned,
            end_reason::TAIL_CALL => Self::TailCall,
            end_reason::REPLACED => Self::Replaced,
            end_reason::UNWOUND => Self::Unwound,
            end_reason::THREAD_EXIT => Self::ThreadExit,
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
    pub tid: u32,
    /// Wall-clock, ns since the Unix epoch.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub end: SpanEnd,
    pub status: Status,
}

impl Span {
    pub fn duration_ns(&self) -> u64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns)
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
}

impl Trace {
    /// The root span, if this piece holds it.
    pub fn root(&self) -> Option<&Span> {
        self.spans.last().filter(|span| span.parent_span_id == 0)
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
}

/// Builds traces from span events.
pub struct Assembler {
    pending: HashMap<u64, PendingTrace>,
    clock: Clock,
    max_trace_spans: usize,
    flow_rate: u32,
}

impl Assembler {
    pub fn new(clock: Clock, max_trace_spans: usize, flow_rate: u32) -> Self {
        Self {
            pending: HashMap::new(),
            clock,
            max_trace_spans: max_trace_spans.max(1),
            flow_rate,
        }
    }

    /// Takes one ended call; returns a trace (or piece) when one is ready.
    pub fn on_span(&mut self, event: &SpanEvent) -> Option<Trace> {
        let is_root = event.flags & span_flags::TRACE_ROOT != 0;
        let span = Span {
            span_id: event.span_id,
            parent_span_id: if is_root { 0 } else { event.parent_span_id },
            caller_span_id: (is_root && event.parent_span_id != 0).then_some(event.parent_span_id),
            fn_id: event.fn_id,
            pid: event.tgid,
            tid: event.tid,
            start_unix_ns: self.clock.to_unix_ns(event.start_ns),
            end_unix_ns: self.clock.to_unix_ns(event.end_ns),
            end: SpanEnd::from_kernel(event.end_reason),
            status: Status::Unset,
        };
        self.add(event.trace_key, span, is_root)
    }

    fn add(&mut self, trace_key: u64, span: Span, is_root: bool) -> Option<Trace> {
        let pending = self
            .pending
            .entry(trace_key)
            .or_insert_with(|| PendingTrace {
                trace_id: new_trace_id(),
                spans: Vec::new(),
                last_activity: Instant::now(),
            });
        pending.spans.push(span);
        pending.last_activity = Instant::now();
        if is_root {
            let pending = self.pending.remove(&trace_key)?;
            return Some(self.finish(pending.trace_id, pending.spans, true));
        }
        if pending.spans.len() >= self.max_trace_spans {
            let trace_id = pending.trace_id;
            let spans = std::mem::take(&mut pending.spans);
            return Some(self.finish(trace_id, spans, false));
        }
        None
    }

    /// Hands on, as pieces, the traces idle for longer than `idle`.
    pub fn sweep_idle(&mut self, idle: Duration) -> Vec<Trace> {
        let now = Instant::now();
        let mut pieces = Vec::new();
        for pending in self.pending.values_mut() {
            if !pending.spans.is_empty() && now.duration_since(pending.last_activity) >= idle {
                let spans = std::mem::take(&mut pending.spans);
                pieces.push((pending.trace_id, spans));
            }
        }
        // A trace whose spans have all gone out keeps its id until its root
        // ends, so later pieces join it.
        pieces
            .into_iter()
            .map(|(trace_id, spans)| self.finish(trace_id, spans, false))
            .collect()
    }

    /// Ends assembly at detach: `in_flight` are the calls still on the
    /// threads' stacks (outermost first per thread), closed at `now_ns`
    /// (monotonic). Every trace still pending is handed on.
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
                ..SpanEvent::default()
            };
            traces.extend(self.on_span(&event));
        }
        let pending: Vec<_> = self.pending.drain().collect();
        for (_, trace) in pending {
            if !trace.spans.is_empty() {
                traces.push(self.finish(trace.trace_id, trace.spans, false));
            }
        }
        traces
    }

    /// Number of traces waiting for their root.
    pub fn pending_traces(&self) -> usize {
        self.pending.len()
    }

    fn finish(&self, trace_id: u128, spans: Vec<Span>, complete: bool) -> Trace {
        Trace {
            trace_id,
            spans,
            complete,
            sampled: is_sampled(trace_id, self.flow_rate),
        }
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

    fn assembler() -> Assembler {
        Assembler::new(Clock::with_offset(1_000), 10_000, 1)
    }

    #[test]
    fn a_trace_is_handed_on_when_its_root_ends() {
        let mut a = assembler();
        assert!(a.on_span(&event(3, 2, 1, 30, 40)).is_none());
        assert!(a.on_span(&event(2, 1, 1, 20, 50)).is_none());
        let trace = a.on_span(&event(1, 0, 1, 10, 60)).unwrap();
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
        let first = a.on_span(&event(1, 0, 1, 0, 1)).unwrap();
        let second = a.on_span(&event(2, 0, 2, 2, 3)).unwrap();
        assert_ne!(first.trace_id, second.trace_id);
    }

    #[test]
    fn unwound_spans_keep_their_end() {
        let mut a = assembler();
        let mut inner = event(2, 1, 1, 5, 9);
        inner.end_reason = end_reason::UNWOUND;
        a.on_span(&inner);
        let trace = a.on_span(&event(1, 0, 1, 0, 10)).unwrap();
        assert_eq!(trace.spans[0].end, SpanEnd::Unwound);
        assert_eq!(trace.spans[1].end, SpanEnd::Returned);
    }

    #[test]
    fn a_split_root_records_its_caller() {
        let mut a = assembler();
        let mut split = event(5, 1, 5, 100, 200);
        split.flags = span_flags::TRACE_ROOT;
        let trace = a.on_span(&split).unwrap();
        assert_eq!(trace.spans[0].parent_span_id, 0);
        assert_eq!(trace.spans[0].caller_span_id, Some(1));
    }

    #[test]
    fn big_traces_go_out_in_pieces_with_one_id() {
        let mut a = Assembler::new(Clock::with_offset(0), 2, 1);
        assert!(a.on_span(&event(2, 1, 1, 1, 2)).is_none());
        let piece = a.on_span(&event(3, 1, 1, 3, 4)).unwrap();
        assert!(!piece.complete);
        assert_eq!(piece.spans.len(), 2);
        let rest = a.on_span(&event(1, 0, 1, 0, 5)).unwrap();
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
        let rest = a.on_span(&event(1, 0, 1, 0, 5)).unwrap();
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
}
