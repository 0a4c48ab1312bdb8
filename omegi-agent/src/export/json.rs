//! One JSON object per span, with OpenTelemetry field and attribute names
//! (`--format json`).

use serde_json::{json, Map, Value};

use super::{errors, ExportContext};
use crate::assembly::{ErrorInfo, Span, Status, Trace};

/// Lowercase hex of a 128-bit trace id (32 characters).
pub fn trace_id_hex(id: u128) -> String {
    format!("{id:032x}")
}

/// Lowercase hex of a 64-bit span id (16 characters; zeros for "none").
pub fn span_id_hex(id: u64) -> String {
    format!("{id:016x}")
}

/// The JSON form of one span of `trace`.
pub fn span_json(trace: &Trace, span: &Span, context: &ExportContext) -> Value {
    let function = context.functions.get(span.fn_id);
    let mut attributes = Map::new();
    if let Some(function) = function {
        attributes.insert("code.function".into(), function.name.clone().into());
        if let Some(file) = &function.file {
            attributes.insert("code.filepath".into(), file.display().to_string().into());
        }
        if let Some(line) = function.line {
            attributes.insert("code.lineno".into(), line.into());
        }
    }
    attributes.insert("thread.id".into(), span.tid.into());
    attributes.insert("process.pid".into(), span.pid.into());
    attributes.insert("omegi.end".into(), span.end.as_str().into());
    if let Some(caller) = span.caller_span_id {
        attributes.insert("omegi.caller.span_id".into(), span_id_hex(caller).into());
    }
    if !trace.complete {
        attributes.insert("omegi.trace.partial".into(), true.into());
    }
    let status = match &span.status {
        Status::Unset => json!({"code": "UNSET"}),
        Status::Ok => json!({"code": "OK"}),
        Status::Error(message) => json!({"code": "ERROR", "message": message}),
    };
    let mut value = json!({
        "name": function.map_or("?", |f| f.name.as_str()),
        "trace_id": trace_id_hex(trace.trace_id),
        "span_id": span_id_hex(span.span_id),
        "parent_span_id": span_id_hex(span.parent_span_id),
        "kind": "INTERNAL",
        "start_time_unix_nano": span.start_unix_ns,
        "end_time_unix_nano": span.end_unix_ns,
        "status": status,
        "attributes": attributes,
        "resource": {"service.name": context.service_name},
    });
    let events: Vec<Value> = trace
        .errors
        .iter()
        .filter(|error| error.flow.first().map(|step| step.span_id) == Some(span.span_id))
        .map(|error| exception_event(error, context))
        .collect();
    if !events.is_empty() {
        value["events"] = events.into();
    }
    value
}

/// The OpenTelemetry `exception` event, on the span where the error started.
fn exception_event(error: &ErrorInfo, context: &ExportContext) -> Value {
    let functions = &context.functions;
    json!({
        "name": "exception",
        "attributes": {
            "exception.type": error.type_name,
            "exception.message": error.message,
            "exception.stacktrace": errors::stacktrace(error, functions),
            "exception.flow": errors::flow(error, functions),
            "omegi.error.outcome": errors::outcome(error, functions),
        }
    })
}
