//! The Omegi Kafka message format (`omegi-wire-format.md`): what a trace
//! becomes on the error and flow topics.
//!
//! Everything the collect server reads is decided here, and only here:
//!
//! - [`trace_error`]: what makes a trace an error trace, and what fills the
//!   `error` object;
//! - [`error_messages`]: the error topic's message(s) for a trace;
//! - [`flow_message`]: the flow topic's record for a trace;
//! - [`wire_span`]: one span as the server reads it.

use serde_json::{json, Map, Value};

use crate::{
    assembly::{ErrorInfo, Outcome, Span, Status, Trace},
    discovery::FunctionTable,
    export::{errors, json::span_id_hex, json::trace_id_hex, ExportContext},
    http::{AttributeValue, Side},
};

/// The `tracer` field: which instrumentation sent the message (the Python
/// library sends `omegi-tracer-python`).
pub const TRACER: &str = "omegi-agent-ebpf";

/// The `exception.type` of an error whose status message names no type.
pub const DEFAULT_ERROR_TYPE: &str = "Error";

/// `"YYYY-MM-DD HH:MM:SS.mmm"` in UTC (milliseconds truncated), as the server
/// parses with `datetime.fromisoformat`.
pub fn format_time(unix_ns: u64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ns))
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| "1970-01-01 00:00:00.000".into())
}

/// Who sends: the fields every message starts with.
#[derive(Clone, Debug)]
pub struct Sender<'a> {
    pub token: &'a str,
    pub service_name: &'a str,
}

/// The error a trace holds, as the `error` object of the error topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceError {
    /// `exception.type`.
    pub exception_type: String,
    /// `exception.message`.
    pub message: String,
    /// `exception.flow`: the functions the error passed through, innermost
    /// first (`step.1`).
    pub flow: Vec<String>,
    /// `exception.stacktrace`.
    pub stacktrace: String,
    /// The error came from another service (an outgoing HTTP call failed
    /// and this service's own code raised nothing): the object is `{}`, as
    /// the format asks, and the server indexes the spans only.
    pub from_another_service: bool,
}

impl TraceError {
    pub fn to_json(&self) -> Value {
        if self.from_another_service {
            return json!({});
        }
        let flow: Map<String, Value> = self
            .flow
            .iter()
            .enumerate()
            .map(|(index, name)| (format!("step.{}", index + 1), Value::from(name.as_str())))
            .collect();
        json!({
            "exception.type": self.exception_type,
            "exception.message": self.message,
            "exception.flow": flow,
            "exception.stacktrace": self.stacktrace,
        })
    }
}

/// The one place that decides what an error trace is and what its `error`
/// object says.
///
/// - A trace (or piece) is an **error trace** when assembly attached an
///   error to it ([`Trace::errors`]: an exception, a panic, a fatal signal, a
///   failing exit or a return-value rule whose path runs through it), or when
///   one of its spans has [`Status::Error`].
/// - With an attached error, the object says what assembly found: its type,
///   message and `exception.flow` (the calls it left, `step.1` the
///   innermost), and `exception.stacktrace` is `Type: message` then the
///   traced calls in flight when it happened, innermost first, one
///   `  at name (file:line)` line each (the line of the call each was making);
///   for a Python exception, Python's traceback text.
///   When several errors touched the trace, the one that escaped (ended the
///   thread or the process, or was caught outside the traced functions) is
///   reported, else the first.
/// - Without one (a span's status alone), the error's **origin** is the
///   first span with error status in end order; type and message come from
///   its status (`"Type: message"`, else type [`DEFAULT_ERROR_TYPE`]); the
///   flow is the origin and its parents while they have error status; the
///   stack trace is the origin's chain of callers in this trace.
pub fn trace_error(trace: &Trace, functions: &FunctionTable) -> Option<TraceError> {
    if let Some(error) = reported_error(trace) {
        // A Python exception's is Python's traceback, as the seed sent it.
        let stacktrace = errors::python_traceback(error, functions).unwrap_or_else(|| {
            let mut stacktrace = error.description();
            for line in errors::stacktrace(error, functions).lines() {
                stacktrace.push_str("\n  ");
                stacktrace.push_str(line);
            }
            stacktrace
        });
        return Some(TraceError {
            exception_type: error.type_name.clone(),
            message: error.message.clone(),
            flow: errors::flow(error, functions),
            stacktrace,
            from_another_service: false,
        });
    }
    let origin = trace
        .spans
        .iter()
        .find(|span| matches!(span.status, Status::Error(_)))?;
    let Status::Error(status_message) = &origin.status else {
        return None;
    };
    let (exception_type, message) = split_status_message(status_message);
    let chain = ancestors(trace, origin);
    let flow = chain
        .iter()
        .take_while(|span| matches!(span.status, Status::Error(_)))
        .map(|span| span_name(span, functions))
        .collect();
    let mut stacktrace = format!("{exception_type}: {message}");
    for span in &chain {
        stacktrace.push_str("\n  at ");
        stacktrace.push_str(&span_name(span, functions));
        if let Some(location) = functions.get(span.fn_id).and_then(|f| f.location()) {
            stacktrace.push_str(&format!(" ({location})"));
        }
    }
    let from_another_service = origin
        .http
        .as_ref()
        .is_some_and(|http| http.side == Side::Client);
    Some(TraceError {
        exception_type,
        message,
        flow,
        stacktrace,
        from_another_service,
    })
}

/// Of the errors attached to `trace`, the one a single `error` object tells.
fn reported_error(trace: &Trace) -> Option<&ErrorInfo> {
    trace
        .errors
        .iter()
        .find(|error| {
            matches!(
                error.outcome,
                Outcome::Terminated { .. }
                    | Outcome::Exited { .. }
                    | Outcome::ThreadEnded
                    | Outcome::CaughtOutside
            )
        })
        .or_else(|| trace.errors.first())
        .map(|error| &**error)
}

/// `"Type: message"` → (`Type`, `message`); otherwise (`Error`, text).
fn split_status_message(text: &str) -> (String, String) {
    if let Some((kind, message)) = text.split_once(": ") {
        let is_type = !kind.is_empty()
            && kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '.' | '<' | '>'));
        if is_type {
            return (kind.to_owned(), message.to_owned());
        }
    }
    (DEFAULT_ERROR_TYPE.to_owned(), text.to_owned())
}

/// `span`, its parent, its parent's parent… as far as the trace holds them.
fn ancestors<'t>(trace: &'t Trace, span: &'t Span) -> Vec<&'t Span> {
    let mut chain = vec![span];
    let mut current = span;
    while current.parent_span_id != 0 {
        let Some(parent) = trace
            .spans
            .iter()
            .find(|s| s.span_id == current.parent_span_id)
        else {
            break;
        };
        if chain.len() > trace.spans.len() {
            break; // a cycle cannot happen, but never loop forever
        }
        chain.push(parent);
        current = parent;
    }
    chain
}

fn span_name(span: &Span, functions: &FunctionTable) -> String {
    if let Some(http) = &span.http {
        return http.name();
    }
    functions
        .get(span.fn_id)
        .map_or_else(|| format!("fn#{}", span.fn_id), |f| f.name.clone())
}

/// A demangled name split into (`module`, `name`) at its last `::` outside
/// `<…>` and `(…)`: `shop::cart::total` → (`shop::cart`, `total`).
pub fn split_qualified(name: &str) -> Option<(&str, &str)> {
    let bytes = name.as_bytes();
    let mut depth = 0i32;
    let mut split = None;
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'<' | b'(' => depth += 1,
            b'>' | b')' => depth -= 1,
            b':' if depth == 0 && bytes.get(index + 1) == Some(&b':') => {
                split = Some(index);
                index += 1;
            }
            _ => {}
        }
        index += 1;
    }
    split
        .filter(|&at| at > 0 && at + 2 < name.len())
        .map(|at| (&name[..at], &name[at + 2..]))
}

/// One span as the server reads it. Attribute values are strings:
///
/// - `module`, `name`: as the Python library's (its module and function):
///   a Python function's own; otherwise the demangled name split at its
///   last `::`; a name without `::` (C) has its source file, relative to
///   the project root, as module.
/// - `thread.id`, `process.pid`, `code.function`, `code.filepath`,
///   `code.lineno`, `omegi.end` (how the call ended), and when they apply
///   `omegi.caller.span_id`, `omegi.trace.partial`, `otel.status_code` and
///   `otel.status_description`.
pub fn wire_span(trace: &Trace, span: &Span, context: &ExportContext) -> Value {
    let function = context.functions.get(span.fn_id);
    let full_name = span_name(span, &context.functions);
    let mut attributes = Map::new();
    let mut put = |key: &str, value: String| {
        attributes.insert(key.to_owned(), Value::String(value));
    };
    let python = function.and_then(|f| Some((f.python_module.clone()?, f.symbol.clone())));
    let (module, short) = match split_qualified(&full_name) {
        _ if span.http.is_some() => ("http".to_owned(), full_name.clone()),
        // A Python function: as the seed named it.
        _ if python.is_some() => python.clone().unwrap_or_default(),
        Some((module, short)) => (module.to_owned(), short.to_owned()),
        None => {
            let module = function
                .and_then(|f| f.file.as_ref())
                .map(|file| {
                    file.strip_prefix(&context.project_root)
                        .unwrap_or(file)
                        .display()
                        .to_string()
                })
                .unwrap_or_else(|| {
                    context
                        .functions
                        .binary
                        .file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
            (module, full_name.clone())
        }
    };
    put("module", module);
    put("name", short);
    put(span.runner_attribute(), span.tid.to_string());
    put("process.pid", span.pid.to_string());
    if !span.arguments.is_empty() {
        // The seed's `str()` of its list, as its formatter wrote it.
        put(
            "arguments",
            crate::assembly::python_list_repr(&span.arguments),
        );
    }
    if let Some(http) = &span.http {
        for (key, value) in http.attributes() {
            put(
                key,
                match value {
                    AttributeValue::Text(text) => text,
                    AttributeValue::Int(number) => number.to_string(),
                },
            );
        }
    } else {
        put("code.function", full_name.clone());
    }
    if let Some(function) = function {
        if let Some(file) = &function.file {
            put("code.filepath", file.display().to_string());
        }
        if let Some(line) = function.line {
            put("code.lineno", line.to_string());
        }
    }
    put("omegi.end", span.end.as_str().to_owned());
    if let Some(caller) = span.caller_span_id {
        put("omegi.caller.span_id", span_id_hex(caller));
    }
    if !trace.complete {
        put("omegi.trace.partial", "true".to_owned());
    }
    match &span.status {
        Status::Unset => {}
        Status::Ok => put("otel.status_code", "OK".to_owned()),
        Status::Error(message) => {
            put("otel.status_code", "ERROR".to_owned());
            put("otel.status_description", message.clone());
        }
    }
    json!({
        "name": full_name,
        "spanId": span_id_hex(span.span_id),
        "parentSpanId": span_id_hex(span.exported_parent_span_id()),
        "kind": span.kind_name(),
        "spanEnterTime": format_time(span.start_unix_ns),
        "spanExitTime": format_time(span.end_unix_ns),
        "attributes": attributes,
    })
}

fn header(trace: &Trace, sender: &Sender) -> Map<String, Value> {
    let mut message = Map::new();
    message.insert("tracer".into(), TRACER.into());
    message.insert("traceId".into(), trace_id_hex(trace.trace_id).into());
    message.insert("token".into(), sender.token.into());
    message.insert("serviceName".into(), sender.service_name.into());
    message
}

/// The error topic's message(s) for `trace`: its spans, in the order they
/// ended, with `error` (`{}` when `None`: a piece or part of a trace whose
/// error is reported in another message).
///
/// A message stays under `max_bytes`: the spans of a big trace are spread
/// over several messages with the same `traceId`; the first carries the
/// `error` object, the others `{}` (the server then only indexes their
/// spans, so the error is counted once).
pub fn error_messages(
    trace: &Trace,
    error: Option<&TraceError>,
    sender: &Sender,
    context: &ExportContext,
    max_bytes: usize,
) -> Vec<Vec<u8>> {
    let error_json = error.map_or_else(|| json!({}), TraceError::to_json);
    let spans: Vec<Value> = trace
        .spans
        .iter()
        .map(|span| wire_span(trace, span, context))
        .collect();
    let sizes: Vec<usize> = spans
        .iter()
        .map(|span| span.to_string().len() + 1)
        .collect();
    let build = |error: &Value, spans: &[Value]| -> Vec<u8> {
        let mut message = header(trace, sender);
        message.insert("error".into(), error.clone());
        message.insert("spans".into(), Value::Array(spans.to_vec()));
        Value::Object(message).to_string().into_bytes()
    };
    let overhead = build(&error_json, &[]).len();
    let mut messages = Vec::new();
    let mut start = 0;
    loop {
        let error = if messages.is_empty() {
            error_json.clone()
        } else {
            json!({})
        };
        // At least one span per message, however big.
        let mut size = overhead;
        let mut end = start;
        while end < spans.len() && (end == start || size + sizes[end] <= max_bytes) {
            size += sizes[end];
            end += 1;
        }
        messages.push(build(&error, &spans[start..end]));
        if end >= spans.len() {
            return messages;
        }
        start = end;
    }
}

/// The flow topic's record for `trace`: its entry span (the root). `None`
/// for a piece that does not hold the root: the record goes out with the
/// piece that does.
pub fn flow_message(trace: &Trace, sender: &Sender) -> Option<Vec<u8>> {
    let root = trace.root()?;
    let mut message = header(trace, sender);
    message.insert("spanId".into(), span_id_hex(root.span_id).into());
    message.insert(
        "parentSpanId".into(),
        span_id_hex(root.exported_parent_span_id()).into(),
    );
    message.insert(
        "spanEnterTime".into(),
        format_time(root.start_unix_ns).into(),
    );
    message.insert("spanExitTime".into(), format_time(root.end_unix_ns).into());
    Some(Value::Object(message).to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        assembly::SpanEnd,
        discovery::{Function, FunctionTable},
    };

    fn context() -> ExportContext {
        ExportContext {
            functions: Arc::new(FunctionTable::from_functions(
                "/srv/bin/shop",
                vec![
                    Function::described(0, "handle_request", Some("/app/src/server.c"), Some(10)),
                    Function::described(1, "shop::cart::total", Some("/app/src/cart.rs"), Some(20)),
                    Function::described(2, "db::Conn<T>::query", Some("/app/src/db.cpp"), Some(30)),
                    Function::described(3, "leaf", None, None),
                ],
            )),
            service_name: "shop".into(),
            project_root: "/app".into(),
        }
    }

    fn span(id: u64, parent: u64, fn_id: u32, start: u64, end: u64, status: Status) -> Span {
        Span {
            span_id: id,
            parent_span_id: parent,
            caller_span_id: None,
            http: None,
            arguments: Vec::new(),
            fn_id,
            pid: 70,
            tid: 71,
            goroutine: false,
            start_unix_ns: start,
            end_unix_ns: end,
            end: SpanEnd::Returned,
            status,
        }
    }

    fn err(text: &str) -> Status {
        Status::Error(text.into())
    }

    /// 2024-05-20 01:02:03.456789 UTC in ns.
    const T0: u64 = 1_716_166_923_456_789_000;

    fn sender() -> Sender<'static> {
        Sender {
            token: "tok",
            service_name: "shop",
        }
    }

    #[test]
    fn times_are_utc_milliseconds_truncated() {
        assert_eq!(format_time(T0), "2024-05-20 01:02:03.456");
        assert_eq!(format_time(0), "1970-01-01 00:00:00.000");
        assert_eq!(format_time(999_999), "1970-01-01 00:00:00.000");
        assert_eq!(format_time(1_000_000), "1970-01-01 00:00:00.001");
    }

    #[test]
    fn a_trace_without_error_status_is_not_an_error_trace() {
        let trace = Trace {
            trace_id: 1,
            spans: vec![
                span(2, 1, 1, T0, T0 + 1, Status::Unset),
                span(1, 0, 0, T0, T0 + 2, Status::Ok),
            ],
            complete: true,
            sampled: false,
            errors: Vec::new(),
        };
        assert_eq!(trace_error(&trace, &context().functions), None);
    }

    #[test]
    fn error_object_from_spans_with_error_status() {
        // handle_request → total → query → leaf; the error is raised in
        // query, passes through total, and handle_request handles it.
        let trace = Trace {
            trace_id: 0xabc,
            spans: vec![
                span(4, 3, 3, T0 + 3, T0 + 4, Status::Unset),
                span(
                    3,
                    2,
                    2,
                    T0 + 2,
                    T0 + 5,
                    err("std::out_of_range: vector::at"),
                ),
                span(
                    2,
                    1,
                    1,
                    T0 + 1,
                    T0 + 6,
                    err("std::out_of_range: vector::at"),
                ),
                span(1, 0, 0, T0, T0 + 7, Status::Ok),
            ],
            complete: true,
            sampled: false,
            errors: Vec::new(),
        };
        let error = trace_error(&trace, &context().functions).unwrap();
        assert_eq!(error.exception_type, "std::out_of_range");
        assert_eq!(error.message, "vector::at");
        assert_eq!(error.flow, vec!["db::Conn<T>::query", "shop::cart::total"]);
        assert_eq!(
            error.stacktrace,
            "std::out_of_range: vector::at\n  at db::Conn<T>::query (/app/src/db.cpp:30)\n  at \
             shop::cart::total (/app/src/cart.rs:20)\n  at handle_request (/app/src/server.c:10)"
        );
        let json = error.to_json();
        assert_eq!(json["exception.flow"]["step.1"], "db::Conn<T>::query");
        assert_eq!(json["exception.flow"]["step.2"], "shop::cart::total");
        assert_eq!(json["exception.flow"].as_object().unwrap().len(), 2);
        assert_eq!(json["exception.type"], "std::out_of_range");
        assert_eq!(json["exception.message"], "vector::at");
    }

    #[test]
    fn a_status_message_without_a_type_is_an_error_of_type_error() {
        let trace = Trace {
            trace_id: 1,
            spans: vec![span(1, 0, 0, T0, T0 + 1, err("ran out of widgets: 3 left"))],
            complete: true,
            sampled: false,
            errors: Vec::new(),
        };
        let error = trace_error(&trace, &context().functions).unwrap();
        assert_eq!(error.exception_type, DEFAULT_ERROR_TYPE);
        assert_eq!(error.message, "ran out of widgets: 3 left");
        assert_eq!(error.flow, vec!["handle_request"]);
    }

    #[test]
    fn the_first_error_to_end_is_the_origin() {
        // Two errors in one trace: the earlier-ending one (the innermost of
        // its path) is reported.
        let trace = Trace {
            trace_id: 1,
            spans: vec![
                span(3, 1, 3, T0 + 1, T0 + 2, err("SIGSEGV: segmentation fault")),
                span(2, 1, 2, T0 + 3, T0 + 4, err("Later: second")),
                span(1, 0, 0, T0, T0 + 5, err("SIGSEGV: segmentation fault")),
            ],
            complete: true,
            sampled: false,
            errors: Vec::new(),
        };
        let error = trace_error(&trace, &context().functions).unwrap();
        assert_eq!(error.exception_type, "SIGSEGV");
        assert_eq!(error.flow, vec!["leaf", "handle_request"]);
        // No file:line for a function without one.
        assert!(
            error.stacktrace.contains("\n  at leaf\n"),
            "{}",
            error.stacktrace
        );
    }

    #[test]
    fn names_split_into_module_and_name() {
        assert_eq!(
            split_qualified("shop::cart::total"),
            Some(("shop::cart", "total"))
        );
        assert_eq!(
            split_qualified("db::Conn<std::string>::query"),
            Some(("db::Conn<std::string>", "query"))
        );
        assert_eq!(
            split_qualified("demo::main::{{closure}}"),
            Some(("demo::main", "{{closure}}"))
        );
        assert_eq!(split_qualified("fib"), None);
        assert_eq!(split_qualified("<T as x::Y>"), None);
    }

    #[test]
    fn wire_spans_have_the_server_fields_with_string_attributes() {
        let context = context();
        let mut root = span(0x11, 0, 0, T0, T0 + 5_000_000, Status::Unset);
        root.caller_span_id = Some(0x99);
        let child = span(0x22, 0x11, 1, T0 + 1_000_000, T0 + 2_000_000, err("E: x"));
        let trace = Trace {
            trace_id: 0xabc,
            spans: vec![child.clone(), root.clone()],
            complete: false,
            sampled: true,
            errors: Vec::new(),
        };
        let value = wire_span(&trace, &root, &context);
        let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            vec![
                "attributes",
                "kind",
                "name",
                "parentSpanId",
                "spanEnterTime",
                "spanExitTime",
                "spanId"
            ]
        );
        assert_eq!(value["name"], "handle_request");
        assert_eq!(value["spanId"], "0000000000000011");
        assert_eq!(value["parentSpanId"], "0000000000000000");
        assert_eq!(value["kind"], "INTERNAL");
        assert_eq!(value["spanEnterTime"], "2024-05-20 01:02:03.456");
        assert_eq!(value["spanExitTime"], "2024-05-20 01:02:03.461");
        let attributes = value["attributes"].as_object().unwrap();
        assert!(attributes.values().all(Value::is_string), "{attributes:?}");
        assert_eq!(attributes["module"], "src/server.c");
        assert_eq!(attributes["name"], "handle_request");
        assert_eq!(attributes["thread.id"], "71");
        assert_eq!(attributes["process.pid"], "70");
        assert_eq!(attributes["code.lineno"], "10");
        assert_eq!(attributes["omegi.end"], "returned");
        assert_eq!(attributes["omegi.caller.span_id"], "0000000000000099");
        assert_eq!(attributes["omegi.trace.partial"], "true");
        assert!(!attributes.contains_key("otel.status_code"));

        let value = wire_span(&trace, &child, &context);
        assert_eq!(value["parentSpanId"], "0000000000000011");
        assert_eq!(value["attributes"]["module"], "shop::cart");
        assert_eq!(value["attributes"]["name"], "total");
        assert_eq!(value["attributes"]["otel.status_code"], "ERROR");
        assert_eq!(value["attributes"]["otel.status_description"], "E: x");

        // No DWARF file: the module is the binary's name.
        let leaf = span(0x33, 0x11, 3, T0, T0 + 1, Status::Unset);
        assert_eq!(
            wire_span(&trace, &leaf, &context)["attributes"]["module"],
            "shop"
        );
    }

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn error_message_has_every_field_and_spans_in_end_order() {
        let context = context();
        let trace = Trace {
            trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
            spans: vec![
                span(3, 2, 2, T0 + 2, T0 + 3, err("ValueError: boom")),
                span(2, 1, 1, T0 + 1, T0 + 4, err("ValueError: boom")),
                span(1, 0, 0, T0, T0 + 5, err("ValueError: boom")),
            ],
            complete: true,
            sampled: false,
            errors: Vec::new(),
        };
        let error = trace_error(&trace, &context.functions);
        let messages = error_messages(&trace, error.as_ref(), &sender(), &context, 1_000_000);
        assert_eq!(messages.len(), 1);
        let message = parse(&messages[0]);
        let keys: Vec<&String> = message.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            vec![
                "error",
                "serviceName",
                "spans",
                "token",
                "traceId",
                "tracer"
            ]
        );
        assert_eq!(message["tracer"], TRACER);
        assert_eq!(message["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(message["token"], "tok");
        assert_eq!(message["serviceName"], "shop");
        assert_eq!(message["error"]["exception.type"], "ValueError");
        assert_eq!(
            message["error"]["exception.flow"]["step.3"],
            "handle_request"
        );
        let ids: Vec<&str> = message["spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["spanId"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            vec!["0000000000000003", "0000000000000002", "0000000000000001"]
        );

        // Without an error of its own (a later piece): `"error": {}`.
        let messages = error_messages(&trace, None, &sender(), &context, 1_000_000);
        assert_eq!(parse(&messages[0])["error"], json!({}));
    }

    #[test]
    fn big_error_traces_are_spread_over_messages_under_the_limit() {
        let context = context();
        let mut spans: Vec<Span> = (2..=300)
            .map(|id| span(id, 1, 3, T0, T0 + 1, err("Boom: x")))
            .collect();
        spans.push(span(1, 0, 0, T0, T0 + 2, err("Boom: x")));
        let trace = Trace {
            trace_id: 7,
            spans,
            complete: true,
            sampled: false,
            errors: Vec::new(),
        };
        let error = trace_error(&trace, &context.functions);
        let limit = 20_000;
        let messages = error_messages(&trace, error.as_ref(), &sender(), &context, limit);
        assert!(messages.len() > 1);
        let mut ids = Vec::new();
        for (index, bytes) in messages.iter().enumerate() {
            assert!(bytes.len() <= limit, "{} > {limit}", bytes.len());
            let message = parse(bytes);
            assert_eq!(message["traceId"], "00000000000000000000000000000007");
            if index == 0 {
                assert_eq!(message["error"]["exception.type"], "Boom");
            } else {
                assert_eq!(message["error"], json!({}));
            }
            for span in message["spans"].as_array().unwrap() {
                ids.push(span["spanId"].as_str().unwrap().to_owned());
            }
        }
        let expected: Vec<String> = trace.spans.iter().map(|s| span_id_hex(s.span_id)).collect();
        assert_eq!(ids, expected, "every span once, in end order");
    }

    #[test]
    fn flow_record_is_the_entry_span() {
        let trace = Trace {
            trace_id: 0xabc,
            spans: vec![
                span(2, 1, 1, T0 + 1_000_000, T0 + 2_000_000, Status::Unset),
                span(1, 0, 0, T0, T0 + 3_000_000, Status::Unset),
            ],
            complete: true,
            sampled: true,
            errors: Vec::new(),
        };
        let message = parse(&flow_message(&trace, &sender()).unwrap());
        assert_eq!(
            message,
            json!({
                "tracer": TRACER,
                "traceId": "00000000000000000000000000000abc",
                "token": "tok",
                "serviceName": "shop",
                "spanId": "0000000000000001",
                "parentSpanId": "0000000000000000",
                "spanEnterTime": "2024-05-20 01:02:03.456",
                "spanExitTime": "2024-05-20 01:02:03.459",
            })
        );
        // A piece without its root has no flow record.
        let piece = Trace {
            trace_id: 0xabc,
            spans: vec![trace.spans[0].clone()],
            complete: false,
            sampled: true,
            errors: Vec::new(),
        };
        assert!(flow_message(&piece, &sender()).is_none());
    }
}
