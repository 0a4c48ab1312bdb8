//! Which traces an exporter that samples sends on (the OTLP exporter; the
//! Omegi message format has the same rule).
//!
//! - A trace holding an error (a span with [`Status::Error`]) is always sent,
//!   whole: the path the error took is the point of tracing.
//! - Any other trace is sent when [`Trace::sampled`] says so: one in
//!   `OMEGI_FLOW_RATE`, decided on the trace id by the deterministic
//!   `TraceIdRatioBased` rule ([`is_sampled`](crate::assembly::is_sampled)).
//!
//! Deciding on the id rather than by a counter or at random means every piece
//! of a trace that goes out in pieces gets the same decision, and any other
//! service using the same rule keeps the same traces. One consequence: when a
//! trace goes out in pieces and only a later piece holds the error, the
//! earlier pieces of an unsampled trace are already gone.

use crate::assembly::{Status, Trace};

/// Whether `trace` holds an error.
pub fn has_error(trace: &Trace) -> bool {
    trace.is_error()
        || trace
            .spans
            .iter()
            .any(|span| matches!(span.status, Status::Error(_)))
}

/// Whether a sampling exporter sends `trace`.
pub fn keep(trace: &Trace) -> bool {
    trace.sampled || has_error(trace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assembly::{Span, SpanEnd};

    fn trace(sampled: bool, status: Status) -> Trace {
        Trace {
            trace_id: 1,
            spans: vec![Span {
                span_id: 1,
                parent_span_id: 0,
                caller_span_id: None,
                http: None,
                arguments: Vec::new(),
                fn_id: 0,
                pid: 1,
                tid: 1,
                goroutine: false,
                start_unix_ns: 1,
                end_unix_ns: 2,
                end: SpanEnd::Returned,
                status,
            }],
            complete: true,
            sampled,
            errors: Vec::new(),
        }
    }

    #[test]
    fn errors_always_others_by_the_sample() {
        assert!(keep(&trace(true, Status::Unset)));
        assert!(!keep(&trace(false, Status::Unset)));
        assert!(!keep(&trace(false, Status::Ok)));
        assert!(keep(&trace(false, Status::Error("boom".into()))));
        assert!(keep(&trace(true, Status::Error("boom".into()))));
    }
}
