//! The console exporter (the default): a call tree per trace, or JSON lines.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, BufWriter, Write},
    sync::{atomic::Ordering, Arc},
};

use anyhow::Context as _;
use tokio::sync::mpsc;

use super::{errors, json, ExportContext, ExporterStats};
use crate::{
    assembly::{ErrorInfo, Span, SpanEnd, Status, Trace},
    cli::ConsoleFormat,
    config::ConsoleOptions,
};

/// Writes traces to stdout or a file.
pub struct ConsoleExporter {
    out: Box<dyn Write + Send>,
    json: json::SpanWriter,
    line: Vec<u8>,
    format: ConsoleFormat,
    context: Arc<ExportContext>,
    colors: Colors,
}

/// ANSI colours, used when writing to a terminal and `NO_COLOR` is unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Colors {
    pub enabled: bool,
}

impl Colors {
    /// Colours for stdout when it is a terminal and `NO_COLOR` is not set.
    pub fn for_stdout() -> Self {
        use std::io::IsTerminal;
        Self {
            enabled: io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.enabled {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn error(self, text: &str) -> String {
        self.paint("1;31", text)
    }

    fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }
}

impl ConsoleExporter {
    pub fn new(options: &ConsoleOptions, context: Arc<ExportContext>) -> anyhow::Result<Self> {
        let out: Box<dyn Write + Send> = match &options.output {
            Some(path) => {
                Box::new(BufWriter::new(File::create(path).with_context(|| {
                    format!("cannot write --output {}", path.display())
                })?))
            }
            None => Box::new(io::stdout()),
        };
        let colors = if options.output.is_some() {
            Colors { enabled: false }
        } else {
            Colors::for_stdout()
        };
        Ok(Self {
            out,
            json: json::SpanWriter::new(Arc::clone(&context)),
            line: Vec::new(),
            format: options.format,
            context,
            colors,
        })
    }

    /// Writes every trace that arrives until the queue closes.
    pub fn run(mut self, mut queue: mpsc::Receiver<Arc<Trace>>, stats: &ExporterStats) {
        while let Some(trace) = queue.blocking_recv() {
            let spans = trace.spans.len() as u64;
            let written = self.write(&trace).and_then(|()| {
                // Drain what is already queued before flushing: one flush per burst.
                if queue.is_empty() {
                    self.out.flush()
                } else {
                    Ok(())
                }
            });
            match written {
                Ok(()) => {
                    stats.traces.fetch_add(1, Ordering::Relaxed);
                    stats.spans.fetch_add(spans, Ordering::Relaxed);
                }
                Err(error) => {
                    stats.failed_spans.fetch_add(spans, Ordering::Relaxed);
                    tracing::warn!("console exporter: {error}");
                }
            }
        }
        let _ = self.out.flush();
    }

    fn write(&mut self, trace: &Trace) -> io::Result<()> {
        match self.format {
            ConsoleFormat::Json => {
                self.line.clear();
                for span in &trace.spans {
                    self.json.write(&mut self.line, trace, span);
                }
                self.out.write_all(&self.line)
            }
            ConsoleFormat::Tree => {
                let text = render_tree(trace, &self.context, self.colors);
                self.out.write_all(text.as_bytes())
            }
        }
    }
}

/// A trace as an indented call tree, children in the order they started.
pub fn render_tree(trace: &Trace, context: &ExportContext, colors: Colors) -> String {
    let mut out = String::new();
    let first = trace.root().or(trace.spans.last());
    let (pid, runner) = first.map_or((0, "tid 0".to_owned()), |span| {
        let what = if span.goroutine { "goroutine" } else { "tid" };
        (span.pid, format!("{what} {}", span.tid))
    });
    let duration = trace.root().map(|root| format_duration(root.duration_ns()));
    let title = if trace.is_error() {
        colors.error("error trace")
    } else {
        "trace".to_owned()
    };
    out.push_str(&format!(
        "{title} {}  pid {pid}  {runner}{}{}\n",
        json::trace_id_hex(trace.trace_id),
        duration.map(|d| format!("  {d}")).unwrap_or_default(),
        if trace.complete {
            ""
        } else {
            "  (partial: the rest follows)"
        },
    ));
    if let Some(parent) = trace.spans.iter().find_map(Span::remote_parent) {
        out.push_str(&format!(
            "  continues the caller's span {} (traceparent)\n",
            json::span_id_hex(parent.parent_id)
        ));
    }

    let ids: HashSet<u64> = trace.spans.iter().map(|span| span.span_id).collect();
    let mut children: HashMap<u64, Vec<&Span>> = HashMap::new();
    let mut tops = Vec::new();
    for span in &trace.spans {
        if span.parent_span_id != 0 && ids.contains(&span.parent_span_id) {
            children.entry(span.parent_span_id).or_default().push(span);
        } else {
            tops.push(span);
        }
    }
    for list in children.values_mut() {
        list.sort_by_key(|span| span.start_unix_ns);
    }
    tops.sort_by_key(|span| span.start_unix_ns);
    for (index, span) in tops.iter().enumerate() {
        if span.parent_span_id != 0 {
            out.push_str("(under a call still running)\n");
        }
        render_span(
            &mut out,
            span,
            &children,
            context,
            colors,
            "",
            index + 1 == tops.len(),
        );
    }
    for error in &trace.errors {
        render_error(&mut out, error, context, colors);
    }
    out
}

/// The error under its trace: what, through which calls, how it ended, and
/// where.
fn render_error(out: &mut String, error: &ErrorInfo, context: &ExportContext, colors: Colors) {
    let functions = &context.functions;
    out.push_str(&format!(
        "  {} {}\n",
        colors.error("error:"),
        error.description()
    ));
    out.push_str(&format!(
        "    flow: {}\n",
        errors::flow(error, functions).join(" → ")
    ));
    out.push_str(&format!("    {}\n", errors::outcome(error, functions)));
    for line in errors::stacktrace(error, functions).lines() {
        // `at name (file:line)` lines show the file under the root; a
        // Python traceback is shown as Python prints it.
        let location = line
            .starts_with("at ")
            .then(|| line.rsplit_once(" ("))
            .flatten();
        let line = match location {
            Some((call, location)) => {
                let location = location.trim_end_matches(')');
                let path = std::path::Path::new(location);
                let shown = path.strip_prefix(&context.project_root).unwrap_or(path);
                format!("{call} ({})", shown.display())
            }
            None => line.to_owned(),
        };
        out.push_str(&format!("    {}\n", colors.dim(&line)));
    }
}

fn render_span(
    out: &mut String,
    span: &Span,
    children: &HashMap<u64, Vec<&Span>>,
    context: &ExportContext,
    colors: Colors,
    prefix: &str,
    last: bool,
) {
    let function = context.functions.get(span.fn_id);
    let name = match &span.http {
        // `SERVER GET /orders  200`: the request and its answer.
        Some(http) => format!(
            "{} {}{}",
            http.kind_name(),
            http.name(),
            http.status
                .map(|status| format!("  {status}"))
                .unwrap_or_default()
        ),
        None => function.map_or_else(|| "?".to_owned(), |f| f.name.clone()),
    };
    let location = function
        .and_then(|f| {
            let file = f.file.as_ref()?;
            let shown = file.strip_prefix(&context.project_root).unwrap_or(file);
            Some(match f.line {
                Some(line) => format!("{}:{line}", shown.display()),
                None => shown.display().to_string(),
            })
        })
        .map(|location| format!("  {location}"))
        .unwrap_or_default();
    // The error's description is printed once, under the tree.
    let mut notes = Vec::new();
    if matches!(span.status, Status::Error(_)) {
        notes.push("✗".to_owned());
    }
    if span.end != SpanEnd::Returned {
        notes.push(span.end.as_str().replace('_', " "));
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!("  [{}]", notes.join(" "))
    };
    let line = format!(
        "{name}  {}{location}{notes}",
        format_duration(span.duration_ns())
    );
    let line = if matches!(span.status, Status::Error(_)) {
        colors.error(&line)
    } else {
        line
    };
    out.push_str(&format!(
        "{prefix}{} {line}\n",
        if last { "└─" } else { "├─" },
    ));
    let child_prefix = format!("{prefix}{}", if last { "   " } else { "│  " });
    if let Some(list) = children.get(&span.span_id) {
        for (index, child) in list.iter().enumerate() {
            render_span(
                out,
                child,
                children,
                context,
                colors,
                &child_prefix,
                index + 1 == list.len(),
            );
        }
    }
}

/// `850 ns`, `12.3 µs`, `1.234 ms`, `2.500 s`.
pub fn format_duration(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{:.1} µs", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.3} ms", ns as f64 / 1e6),
        _ => format!("{:.3} s", ns as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Function, FunctionTable};

    fn context() -> ExportContext {
        let function = |id: u32, name: &str, line| {
            Function::described(id, name, Some("/app/src/main.c"), Some(line))
        };
        ExportContext {
            functions: Arc::new(FunctionTable::from_functions(
                "/app/server",
                vec![
                    function(0, "main", 10),
                    function(1, "work", 20),
                    function(2, "leaf", 30),
                ],
            )),
            service_name: "svc".into(),
            project_root: "/app".into(),
        }
    }

    fn span(id: u64, parent: u64, fn_id: u32, start: u64, end: u64) -> Span {
        Span {
            span_id: id,
            parent_span_id: parent,
            caller_span_id: None,
            http: None,
            arguments: Vec::new(),
            fn_id,
            pid: 7,
            tid: 8,
            goroutine: false,
            start_unix_ns: start,
            end_unix_ns: end,
            end: SpanEnd::Returned,
            status: Status::Unset,
        }
    }

    #[test]
    fn tree_shows_nesting_in_start_order() {
        let trace = Trace {
            trace_id: 0xabc,
            spans: vec![
                span(3, 2, 2, 30, 40),
                span(2, 1, 1, 20, 50),
                span(4, 1, 2, 60, 70),
                span(1, 0, 0, 10, 2_000_010),
            ],
            complete: true,
            sampled: true,
            errors: Vec::new(),
        };
        let text = render_tree(&trace, &context(), Colors { enabled: false });
        let expected = "\
trace 00000000000000000000000000000abc  pid 7  tid 8  2.000 ms
└─ main  2.000 ms  src/main.c:10
   ├─ work  30 ns  src/main.c:20
   │  └─ leaf  10 ns  src/main.c:30
   └─ leaf  10 ns  src/main.c:30
";
        assert_eq!(text, expected);
    }

    #[test]
    fn json_line_has_otel_names() {
        let trace = Trace {
            trace_id: 1,
            spans: vec![span(1, 0, 0, 10, 20)],
            complete: true,
            sampled: true,
            errors: Vec::new(),
        };
        let value = json::span_json(&trace, &trace.spans[0], &context());
        assert_eq!(value["name"], "main");
        assert_eq!(value["trace_id"], "00000000000000000000000000000001");
        assert_eq!(value["parent_span_id"], "0000000000000000");
        assert_eq!(value["attributes"]["code.lineno"], 10);
        assert_eq!(value["attributes"]["thread.id"], 8);
        assert_eq!(value["status"]["code"], "UNSET");
        assert_eq!(value["end_time_unix_nano"], 20);
    }

    #[test]
    fn a_go_call_names_its_goroutine_not_a_thread() {
        let mut go_call = span(1, 0, 0, 10, 20);
        go_call.goroutine = true;
        let trace = Trace {
            trace_id: 1,
            spans: vec![go_call],
            complete: true,
            sampled: true,
            errors: Vec::new(),
        };
        let context = std::sync::Arc::new(context());
        let value = json::span_json(&trace, &trace.spans[0], &context);
        assert_eq!(value["attributes"]["go.goroutine.id"], 8);
        assert!(value["attributes"].get("thread.id").is_none());
        // The fast writer the JSON exporter uses says the same.
        let mut line = Vec::new();
        json::SpanWriter::new(context.clone()).write(&mut line, &trace, &trace.spans[0]);
        let written: serde_json::Value = serde_json::from_slice(&line).expect("one JSON line");
        assert_eq!(written["attributes"], value["attributes"]);
        let tree = render_tree(&trace, &context, Colors { enabled: false });
        assert!(tree.contains("pid 7  goroutine 8"), "{tree}");
    }

    #[test]
    fn error_traces_stand_out_in_colour() {
        use crate::assembly::{ErrorInfo, ErrorKind, FlowStep, Outcome};
        let mut failing = span(2, 1, 1, 20, 50);
        failing.status = Status::Error("boom".into());
        failing.end = SpanEnd::Unwound;
        let trace = Trace {
            trace_id: 1,
            spans: vec![failing, span(1, 0, 0, 10, 60)],
            complete: true,
            sampled: true,
            errors: vec![Arc::new(ErrorInfo {
                kind: ErrorKind::Exception,
                type_name: "Boom".into(),
                message: "bad".into(),
                flow: vec![FlowStep {
                    fn_id: 1,
                    span_id: 2,
                }],
                stack: Vec::new(),
                outcome: Outcome::CaughtBy {
                    fn_id: 0,
                    span_id: 1,
                },
            })],
        };
        let plain = render_tree(&trace, &context(), Colors { enabled: false });
        assert!(plain.starts_with("error trace "), "{plain}");
        assert!(
            plain.contains("work  30 ns  src/main.c:20  [✗ unwound]"),
            "{plain}"
        );
        assert!(
            plain.contains("  error: Boom: bad\n    flow: work\n    caught in main\n"),
            "{plain}"
        );
        assert!(!plain.contains('\x1b'));
        let coloured = render_tree(&trace, &context(), Colors { enabled: true });
        assert!(
            coloured.contains("\x1b[1;31merror trace\x1b[0m"),
            "{coloured}"
        );
    }

    #[test]
    fn fast_json_lines_equal_the_json_values() {
        use crate::assembly::{ErrorInfo, ErrorKind, FlowStep, Outcome};
        let mut failing = span(2, 1, 1, 20, 50);
        failing.status = Status::Error("bad \"quoted\" value\n".into());
        failing.end = SpanEnd::Unwound;
        let mut split = span(5, 0, 2, 21, 22);
        split.caller_span_id = Some(0xfeed);
        let unknown = span(6, 1, 99, 23, 24);
        let mut ok = span(7, 1, 0, 25, 26);
        ok.status = Status::Ok;
        let error = Arc::new(ErrorInfo {
            kind: ErrorKind::Exception,
            type_name: "Boom".into(),
            message: "bad".into(),
            flow: vec![FlowStep {
                fn_id: 1,
                span_id: 2,
            }],
            stack: Vec::new(),
            outcome: Outcome::CaughtBy {
                fn_id: 0,
                span_id: 1,
            },
        });
        let context = Arc::new(context());
        let mut writer = json::SpanWriter::new(Arc::clone(&context));
        for complete in [true, false] {
            let trace = Trace {
                trace_id: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
                spans: vec![
                    failing.clone(),
                    split.clone(),
                    unknown.clone(),
                    ok.clone(),
                    span(1, 0, 0, 10, 60),
                ],
                complete,
                sampled: true,
                errors: vec![Arc::clone(&error)],
            };
            let mut out = Vec::new();
            for span in &trace.spans {
                writer.write(&mut out, &trace, span);
            }
            let text = String::from_utf8(out).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), trace.spans.len());
            for (line, span) in lines.iter().zip(&trace.spans) {
                let fast: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(fast, json::span_json(&trace, span, &context), "{line}");
            }
        }
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(850), "850 ns");
        assert_eq!(format_duration(12_300), "12.3 µs");
        assert_eq!(format_duration(1_234_000), "1.234 ms");
        assert_eq!(format_duration(2_500_000_000), "2.500 s");
    }
}
