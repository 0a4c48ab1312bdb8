//! The console exporter (the default): a call tree per trace, or JSON lines.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, BufWriter, Write},
    sync::{atomic::Ordering, Arc},
};

use anyhow::Context as _;
use tokio::sync::mpsc;

use super::{json, ExportContext, ExporterStats};
use crate::{
    assembly::{Span, SpanEnd, Status, Trace},
    cli::ConsoleFormat,
    config::ConsoleOptions,
};

/// Writes traces to stdout or a file.
pub struct ConsoleExporter {
    out: Box<dyn Write + Send>,
    format: ConsoleFormat,
    context: Arc<ExportContext>,
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
        Ok(Self {
            out,
            format: options.format,
            context,
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
                for span in &trace.spans {
                    let line = json::span_json(trace, span, &self.context);
                    writeln!(self.out, "{line}")?;
                }
                Ok(())
            }
            ConsoleFormat::Tree => {
                let text = render_tree(trace, &self.context);
                self.out.write_all(text.as_bytes())
            }
        }
    }
}

/// A trace as an indented call tree, children in the order they started.
pub fn render_tree(trace: &Trace, context: &ExportContext) -> String {
    let mut out = String::new();
    let first = trace.root().or(trace.spans.last());
    let (pid, tid) = first.map_or((0, 0), |span| (span.pid, span.tid));
    let duration = trace.root().map(|root| format_duration(root.duration_ns()));
    out.push_str(&format!(
        "trace {}  pid {pid}  tid {tid}{}{}\n",
        json::trace_id_hex(trace.trace_id),
        duration.map(|d| format!("  {d}")).unwrap_or_default(),
        if trace.complete {
            ""
        } else {
            "  (partial: the rest follows)"
        },
    ));

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
            "",
            index + 1 == tops.len(),
        );
    }
    out
}

fn render_span(
    out: &mut String,
    span: &Span,
    children: &HashMap<u64, Vec<&Span>>,
    context: &ExportContext,
    prefix: &str,
    last: bool,
) {
    let function = context.functions.get(span.fn_id);
    let name = function.map_or("?", |f| f.name.as_str());
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
    let mut notes = Vec::new();
    if span.end != SpanEnd::Returned {
        notes.push(span.end.as_str().replace('_', " "));
    }
    if let Status::Error(message) = &span.status {
        notes.push(format!("error: {message}"));
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!("  [{}]", notes.join(", "))
    };
    out.push_str(&format!(
        "{prefix}{} {name}  {}{location}{notes}\n",
        if last { "└─" } else { "├─" },
        format_duration(span.duration_ns()),
    ));
    let child_prefix = format!("{prefix}{}", if last { "   " } else { "│  " });
    if let Some(list) = children.get(&span.span_id) {
        for (index, child) in list.iter().enumerate() {
            render_span(
                out,
                child,
                children,
                context,
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
    use crate::discovery::{CodeAnalysis, Function, FunctionTable};
    use std::path::PathBuf;

    fn context() -> ExportContext {
        let function = |id: u32, name: &str, line| Function {
            id,
            name: name.into(),
            symbol: name.into(),
            file: Some(PathBuf::from("/app/src/main.c")),
            line: Some(line),
            address: 0,
            size: 1,
            code: CodeAnalysis::default(),
        };
        ExportContext {
            functions: Arc::new(FunctionTable {
                binary: "/app/server".into(),
                functions: vec![
                    function(0, "main", 10),
                    function(1, "work", 20),
                    function(2, "leaf", 30),
                ],
                skipped: HashMap::new(),
                has_dwarf: true,
                can_unwind: false,
            }),
            service_name: "svc".into(),
            project_root: "/app".into(),
        }
    }

    fn span(id: u64, parent: u64, fn_id: u32, start: u64, end: u64) -> Span {
        Span {
            span_id: id,
            parent_span_id: parent,
            caller_span_id: None,
            fn_id,
            pid: 7,
            tid: 8,
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
        };
        let text = render_tree(&trace, &context());
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
    fn durations() {
        assert_eq!(format_duration(850), "850 ns");
        assert_eq!(format_duration(12_300), "12.3 µs");
        assert_eq!(format_duration(1_234_000), "1.234 ms");
        assert_eq!(format_duration(2_500_000_000), "2.500 s");
    }
}
