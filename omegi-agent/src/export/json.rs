//! One JSON object per span, with OpenTelemetry field and attribute names
//! (`--format json`).

use serde_json::{json, Map, Value};

use super::{errors, ExportContext};
use crate::{
    assembly::{ErrorInfo, Span, Status, Trace},
    http::{AttributeValue, HttpSpan},
};

/// Lowercase hex of a 128-bit trace id (32 characters).
pub fn trace_id_hex(id: u128) -> String {
    format!("{id:032x}")
}

/// Lowercase hex of a 64-bit span id (16 characters; zeros for "none").
pub fn span_id_hex(id: u64) -> String {
    format!("{id:016x}")
}

/// A span's name: its function's, or `METHOD /path` for an HTTP request.
pub fn span_name(span: &Span, context: &ExportContext) -> String {
    match &span.http {
        Some(http) => http.name(),
        None => context
            .functions
            .get(span.fn_id)
            .map_or_else(|| "?".to_owned(), |f| f.name.clone()),
    }
}

fn attribute_json(value: AttributeValue) -> Value {
    match value {
        AttributeValue::Text(text) => text.into(),
        AttributeValue::Int(number) => number.into(),
    }
}

/// The `"name":…` field and the attributes (each followed by a comma) of an
/// HTTP span, for [`SpanWriter`].
fn http_parts_json(http: &HttpSpan) -> (String, String) {
    let mut attributes = String::new();
    for (key, value) in http.attributes() {
        attributes.push_str(&format!("{}:{},", json!(key), attribute_json(value)));
    }
    (format!("\"name\":{}", json!(http.name())), attributes)
}

/// The JSON form of one span of `trace`.
pub fn span_json(trace: &Trace, span: &Span, context: &ExportContext) -> Value {
    let function = context.functions.get(span.fn_id);
    let mut attributes = Map::new();
    if let Some(http) = &span.http {
        for (key, value) in http.attributes() {
            attributes.insert(key.into(), attribute_json(value));
        }
    }
    if let Some(function) = function {
        attributes.insert("code.function".into(), function.name.clone().into());
        if let Some(file) = &function.file {
            attributes.insert("code.filepath".into(), file.display().to_string().into());
        }
        if let Some(line) = function.line {
            attributes.insert("code.lineno".into(), line.into());
        }
        if let Some(module) = &function.python_module {
            // The seed's own attributes for a Python function.
            attributes.insert("module".into(), module.clone().into());
            attributes.insert("name".into(), function.symbol.clone().into());
        }
    }
    attributes.insert(span.runner_attribute().into(), span.tid.into());
    attributes.insert("process.pid".into(), span.pid.into());
    if !span.arguments.is_empty() {
        attributes.insert("arguments".into(), span.arguments.clone().into());
    }
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
        "name": span_name(span, context),
        "trace_id": trace_id_hex(trace.trace_id),
        "span_id": span_id_hex(span.span_id),
        "parent_span_id": span_id_hex(span.exported_parent_span_id()),
        "kind": span.kind_name(),
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

/// Writes spans as [`span_json`] would, one line each, without building a
/// JSON value per span: the parts that only depend on the function (name,
/// file, line) and the service are rendered once and reused. About ten times
/// faster than going through `serde_json::Value`, which matters when every
/// span of a busy program goes to the console.
pub struct SpanWriter {
    context: std::sync::Arc<ExportContext>,
    /// Per function id: `"name":…` and the `code.*` attributes, rendered.
    functions: Vec<Option<(String, String)>>,
    /// `"resource":{…}`.
    resource: String,
}

impl SpanWriter {
    pub fn new(context: std::sync::Arc<ExportContext>) -> Self {
        let resource = format!(
            "\"resource\":{}",
            json!({"service.name": context.service_name})
        );
        Self {
            context,
            functions: Vec::new(),
            resource,
        }
    }

    /// Appends the JSON line (with its newline) of `span` of `trace` to `out`.
    pub fn write(&mut self, out: &mut Vec<u8>, trace: &Trace, span: &Span) {
        let http_parts;
        let (name, code) = match &span.http {
            Some(http) => {
                http_parts = http_parts_json(http);
                (http_parts.0.as_str(), http_parts.1.as_str())
            }
            None => self.function_parts(span.fn_id),
        };
        out.extend_from_slice(b"{");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b",\"trace_id\":\"");
        push_hex(out, trace.trace_id, 32);
        out.extend_from_slice(b"\",\"span_id\":\"");
        push_hex(out, u128::from(span.span_id), 16);
        out.extend_from_slice(b"\",\"parent_span_id\":\"");
        push_hex(out, u128::from(span.exported_parent_span_id()), 16);
        out.extend_from_slice(b"\",\"kind\":\"");
        out.extend_from_slice(span.kind_name().as_bytes());
        out.extend_from_slice(b"\",\"start_time_unix_nano\":");
        push_decimal(out, span.start_unix_ns);
        out.extend_from_slice(b",\"end_time_unix_nano\":");
        push_decimal(out, span.end_unix_ns);
        out.extend_from_slice(b",\"status\":");
        match &span.status {
            Status::Unset => out.extend_from_slice(b"{\"code\":\"UNSET\"}"),
            Status::Ok => out.extend_from_slice(b"{\"code\":\"OK\"}"),
            Status::Error(message) => {
                out.extend_from_slice(b"{\"code\":\"ERROR\",\"message\":");
                let _ = serde_json::to_writer(&mut *out, message);
                out.push(b'}');
            }
        }
        out.extend_from_slice(b",\"attributes\":{");
        out.extend_from_slice(code.as_bytes());
        out.push(b'"');
        out.extend_from_slice(span.runner_attribute().as_bytes());
        out.extend_from_slice(b"\":");
        push_decimal(out, u64::from(span.tid));
        out.extend_from_slice(b",\"process.pid\":");
        push_decimal(out, u64::from(span.pid));
        out.extend_from_slice(b",\"omegi.end\":\"");
        out.extend_from_slice(span.end.as_str().as_bytes());
        out.push(b'"');
        if let Some(caller) = span.caller_span_id {
            out.extend_from_slice(b",\"omegi.caller.span_id\":\"");
            push_hex(out, u128::from(caller), 16);
            out.push(b'"');
        }
        if !trace.complete {
            out.extend_from_slice(b",\"omegi.trace.partial\":true");
        }
        if !span.arguments.is_empty() {
            out.extend_from_slice(b",\"arguments\":");
            let _ = serde_json::to_writer(&mut *out, &span.arguments);
        }
        out.extend_from_slice(b"},");
        out.extend_from_slice(self.resource.as_bytes());
        let events: Vec<Value> = trace
            .errors
            .iter()
            .filter(|error| error.flow.first().map(|step| step.span_id) == Some(span.span_id))
            .map(|error| exception_event(error, &self.context))
            .collect();
        if !events.is_empty() {
            out.extend_from_slice(b",\"events\":");
            let _ = serde_json::to_writer(&mut *out, &events);
        }
        out.extend_from_slice(b"}\n");
    }

    fn function_parts(&mut self, fn_id: u32) -> (&str, &str) {
        let index = fn_id as usize;
        if self.functions.len() <= index {
            self.functions.resize(index + 1, None);
        }
        let context = &self.context;
        let (name, code) = self.functions[index].get_or_insert_with(|| {
            let function = context.functions.get(fn_id);
            let name = function.map_or("?", |f| f.name.as_str());
            let mut code = String::new();
            if let Some(function) = function {
                code.push_str(&format!("\"code.function\":{},", json!(function.name)));
                if let Some(file) = &function.file {
                    code.push_str(&format!(
                        "\"code.filepath\":{},",
                        json!(file.display().to_string())
                    ));
                }
                if let Some(line) = function.line {
                    code.push_str(&format!("\"code.lineno\":{line},"));
                }
                if let Some(module) = &function.python_module {
                    code.push_str(&format!(
                        "\"module\":{},\"name\":{},",
                        json!(module),
                        json!(function.symbol)
                    ));
                }
            }
            (format!("\"name\":{}", json!(name)), code)
        });
        (name, code)
    }
}

/// Lowercase hex of `value`, `digits` wide (zero-padded).
fn push_hex(out: &mut Vec<u8>, value: u128, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..digits).rev() {
        out.push(HEX[((value >> (shift * 4)) & 0xf) as usize]);
    }
}

/// `value` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
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
