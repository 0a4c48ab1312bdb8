//! Spans as the agent exports them with `--format json`, and the call trees
//! they form.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::{Map, Value};

/// OpenTelemetry status of a span.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub code: String,
    #[serde(default)]
    pub message: Option<String>,
}

/// One exported span (one JSON line).
#[derive(Clone, Debug, Deserialize)]
pub struct SpanRecord {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub kind: String,
    pub start_time_unix_nano: u64,
    pub end_time_unix_nano: u64,
    pub status: Status,
    pub attributes: Map<String, Value>,
    pub resource: Map<String, Value>,
    /// OpenTelemetry span events (`exception` on the span where an error
    /// started).
    #[serde(default)]
    pub events: Vec<SpanEventRecord>,
}

/// An event on a span.
#[derive(Clone, Debug, Deserialize)]
pub struct SpanEventRecord {
    pub name: String,
    pub attributes: Map<String, Value>,
}

impl SpanEventRecord {
    /// A string attribute (empty when absent).
    pub fn text(&self, key: &str) -> String {
        self.attributes
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }

    /// `exception.flow` as a list of function names.
    pub fn flow(&self) -> Vec<String> {
        self.attributes
            .get("exception.flow")
            .and_then(Value::as_array)
            .map(|steps| {
                steps
                    .iter()
                    .filter_map(|step| step.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl SpanRecord {
    /// A string attribute, or a number shown as a string.
    pub fn attr(&self, key: &str) -> Option<String> {
        self.attributes.get(key).map(|value| match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }

    pub fn tid(&self) -> u64 {
        self.attributes["thread.id"].as_u64().expect("thread.id")
    }

    /// The goroutine of a Go function's call: such a span names no thread.
    pub fn goroutine(&self) -> u64 {
        assert!(
            !self.attributes.contains_key("thread.id"),
            "a Go call names its goroutine, not a thread: {self:?}"
        );
        self.attributes["go.goroutine.id"]
            .as_u64()
            .expect("go.goroutine.id")
    }

    pub fn pid(&self) -> u64 {
        self.attributes["process.pid"]
            .as_u64()
            .expect("process.pid")
    }

    /// How the call ended (`omegi.end`).
    pub fn end(&self) -> String {
        self.attr("omegi.end").unwrap_or_default()
    }

    pub fn duration_ns(&self) -> u64 {
        self.end_time_unix_nano - self.start_time_unix_nano
    }

    pub fn is_root(&self) -> bool {
        self.parent_span_id == "0000000000000000"
    }

    pub fn is_error(&self) -> bool {
        self.status.code == "ERROR"
    }

    /// The `exception` events on this span.
    pub fn exceptions(&self) -> impl Iterator<Item = &SpanEventRecord> {
        self.events.iter().filter(|event| event.name == "exception")
    }
}

/// Every `exception` event in `spans`, with the span it is on.
pub fn exceptions(spans: &[SpanRecord]) -> Vec<(&SpanRecord, &SpanEventRecord)> {
    spans
        .iter()
        .flat_map(|span| span.exceptions().map(move |event| (span, event)))
        .collect()
}

/// Parses JSON lines (blank lines ignored).
pub fn parse_lines(text: &str) -> Vec<SpanRecord> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad span line {line:?}: {e}"))
        })
        .collect()
}

/// The spans of one trace.
#[derive(Clone, Debug)]
pub struct TraceView {
    pub trace_id: String,
    /// In the order they were exported (ended).
    pub spans: Vec<SpanRecord>,
}

/// Groups spans by trace, ordered by each trace's earliest start.
pub fn traces(spans: &[SpanRecord]) -> Vec<TraceView> {
    let mut by_id: BTreeMap<String, Vec<SpanRecord>> = BTreeMap::new();
    for span in spans {
        by_id
            .entry(span.trace_id.clone())
            .or_default()
            .push(span.clone());
    }
    let mut traces: Vec<TraceView> = by_id
        .into_iter()
        .map(|(trace_id, spans)| TraceView { trace_id, spans })
        .collect();
    traces.sort_by_key(|trace| {
        trace
            .spans
            .iter()
            .map(|span| span.start_time_unix_nano)
            .min()
    });
    traces
}

impl TraceView {
    /// Whether `span` is this service's root: no parent, or a SERVER span
    /// whose parent is the caller's span, in another service.
    pub fn is_local_root(&self, span: &SpanRecord) -> bool {
        span.is_root()
            || (span.kind == "SERVER"
                && !self
                    .spans
                    .iter()
                    .any(|other| other.span_id == span.parent_span_id))
    }

    /// The span with no parent in this trace.
    pub fn root(&self) -> &SpanRecord {
        let roots: Vec<_> = self
            .spans
            .iter()
            .filter(|span| self.is_local_root(span))
            .collect();
        assert_eq!(
            roots.len(),
            1,
            "trace {} has {} roots",
            self.trace_id,
            roots.len()
        );
        roots[0]
    }

    /// The call tree as text: `name` or `name(child child …)`, children in
    /// the order they started.
    pub fn shape(&self) -> String {
        self.shape_by(|span| span.name.clone())
    }

    /// As [`shape`](Self::shape), with how each call ended when it did not
    /// return: `name[end]`, e.g. `step[tail_call]`, `validate[unwound]`.
    pub fn shape_with_ends(&self) -> String {
        self.shape_by(|span| match span.end().as_str() {
            "returned" => span.name.clone(),
            end => format!("{}[{end}]", span.name),
        })
    }

    /// The call tree as text with `label` naming each span.
    pub fn shape_by(&self, label: impl Fn(&SpanRecord) -> String) -> String {
        let children = self.children();
        let mut out = String::new();
        shape_of(self.root(), &children, &label, &mut out);
        out
    }

    /// Checks what every trace must satisfy: one root, ids well formed,
    /// parents present, durations positive and children inside their parent.
    pub fn check_well_formed(&self) {
        let by_id: HashMap<&str, &SpanRecord> = self
            .spans
            .iter()
            .map(|span| (span.span_id.as_str(), span))
            .collect();
        assert_eq!(
            by_id.len(),
            self.spans.len(),
            "duplicate span ids in {}",
            self.trace_id
        );
        assert_eq!(self.trace_id.len(), 32);
        self.root();
        for span in &self.spans {
            assert_eq!(span.span_id.len(), 16);
            assert!(
                span.end_time_unix_nano > span.start_time_unix_nano,
                "span {} has no duration",
                span.name
            );
            if self.is_local_root(span) {
                continue;
            }
            let parent = by_id
                .get(span.parent_span_id.as_str())
                .unwrap_or_else(|| panic!("parent of {} missing from its trace", span.name));
            assert!(
                parent.start_time_unix_nano <= span.start_time_unix_nano
                    && span.end_time_unix_nano <= parent.end_time_unix_nano,
                "{} is not inside its parent {}",
                span.name,
                parent.name
            );
        }
    }

    fn children(&self) -> HashMap<&str, Vec<&SpanRecord>> {
        let mut children: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
        for span in &self.spans {
            children
                .entry(span.parent_span_id.as_str())
                .or_default()
                .push(span);
        }
        for list in children.values_mut() {
            list.sort_by_key(|span| span.start_time_unix_nano);
        }
        children
    }
}

fn shape_of(
    span: &SpanRecord,
    children: &HashMap<&str, Vec<&SpanRecord>>,
    label: &dyn Fn(&SpanRecord) -> String,
    out: &mut String,
) {
    out.push_str(&label(span));
    if let Some(list) = children.get(span.span_id.as_str()) {
        out.push('(');
        for (index, child) in list.iter().enumerate() {
            if index > 0 {
                out.push(' ');
            }
            shape_of(child, children, label, out);
        }
        out.push(')');
    }
}
