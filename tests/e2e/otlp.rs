//! Issue 4, OTLP: spans to an OpenTelemetry collector over gRPC and
//! HTTP/protobuf.
//!
//! Each run exports to the console (JSON lines) and to OTLP at once, so what
//! the collector received is compared with what the agent traced in the same
//! run, span by span. The collector (`omegi_tests::otlp`) speaks the real
//! protocol on loopback.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    sync::Arc,
    time::Duration,
};

use omegi_agent::{
    assembly::{is_sampled, Span, SpanEnd, Status, Trace},
    config::otlp::{OtlpOptions, OtlpProtocol},
    discovery::{Function, FunctionTable},
    export::{otlp, ExportContext, ExporterStats},
};
use omegi_tests::{
    fixtures::{self, Linking},
    otlp::{
        proto::tonic::trace::v1::{span::SpanKind, status::StatusCode},
        unreachable_endpoint, Collector, ReceivedSpan, SilentCollector, TestCertificates,
        Transport, Value,
    },
    run::{self, run_to_end},
    spans::{parse_lines, traces, SpanRecord},
};

const FIXTURE: &str = "c/otlp_orders.c";
const TRACES: usize = 32;
const SPANS: usize = 128;
const SHAPE: &str = "order_handle(order_validate order_price(order_tax))";

/// Every variable the agent reads that these tests set: removed from the
/// inherited environment so that only what a test gives counts.
const VARIABLES: &[&str] = &[
    "OMEGI_EXPORTER_KIND",
    "OMEGI_FLOW_RATE",
    "OMEGI_SERVICE_NAME",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_INSECURE",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OMEGI_LOG",
];

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// What the console exporter wrote in the same run.
    console: Vec<SpanRecord>,
}

impl Run {
    /// The agent's own lines.
    fn agent_lines(&self) -> String {
        self.stderr
            .lines()
            .filter(|line| line.starts_with("omegi-agent:"))
            .map(|line| format!("{line}\n"))
            .collect()
    }
}

fn agent_bin() -> PathBuf {
    omegi_tests::require_root();
    PathBuf::from(env!("CARGO_BIN_EXE_omegi-agent"))
}

fn orders() -> PathBuf {
    fixtures::build(FIXTURE, Linking::Pie)
}

/// Runs the agent on `exe` with `env` (and nothing else of the inherited
/// OMEGI/OTEL configuration), the console exporter writing JSON to a file;
/// the orders fixture's own functions only.
fn traced(exe: &Path, env: &[(&str, &str)], extra: &[&str]) -> Run {
    traced_functions(exe, "order_*", env, extra)
}

/// [`traced`], tracing the functions matching `include`.
fn traced_functions(exe: &Path, include: &str, env: &[(&str, &str)], extra: &[&str]) -> Run {
    let dir = omegi_tests::scratch_dir("otlp");
    let console = dir.join("spans.jsonl");
    let mut command = Command::new(agent_bin());
    for name in VARIABLES {
        command.env_remove(name);
    }
    command
        .envs(env.iter().copied())
        .arg("--project-root")
        .arg(fixtures::sources_dir())
        .args(["--include", include, "--format", "json", "--output"])
        .arg(&console)
        .args(extra)
        .arg("--")
        .arg(exe);
    let (status, stdout, stderr) = run_to_end(command);
    Run {
        status,
        stdout,
        stderr,
        console: parse_lines(&std::fs::read_to_string(&console).unwrap_or_default()),
    }
}

/// Checks the run itself: the program ran as without omegi, and the console
/// saw the known traces.
fn check_program_and_console(exe: &Path, run: &Run) {
    let plain = run::untraced(exe, &[] as &[&str]);
    assert_eq!(run.status.code(), plain.status.code(), "{}", run.stderr);
    assert_eq!(run.stdout.as_bytes(), plain.stdout.as_slice());
    assert_eq!(run.console.len(), SPANS, "{}", run.stderr);
    let traces = traces(&run.console);
    assert_eq!(traces.len(), TRACES);
    for trace in &traces {
        trace.check_well_formed();
        assert_eq!(trace.shape(), SHAPE);
    }
}

/// The number just before `what`, after `prefix`, in the agent's summary
/// (its `… traces, … spans; …` line and its `dropped: …` line): e.g. `otlp: `
/// and `skipped (not sampled)` in `…; otlp: 32 spans exported, 96 skipped (not sampled); …`.
fn summary_count(run: &Run, prefix: &str, what: &str) -> Option<u64> {
    let text: String = run
        .agent_lines()
        .lines()
        .filter(|line| line.contains(" traces, ") || line.contains("dropped: "))
        .collect::<Vec<_>>()
        .join("\n");
    let after = &text[text.find(prefix)? + prefix.len()..];
    let before = &after[..after.find(what)?];
    before
        .split_whitespace()
        .last()?
        .trim_matches(|c| c == '(' || c == ',')
        .parse()
        .ok()
}

/// Every received span is the console span with the same ids, field for field.
fn check_same_spans(received: &[ReceivedSpan], console: &[SpanRecord], service: &str) {
    let by_id: BTreeMap<&str, &SpanRecord> = console
        .iter()
        .map(|span| (span.span_id.as_str(), span))
        .collect();
    let received_ids: BTreeSet<String> = received.iter().map(|s| s.span_id()).collect();
    assert_eq!(received_ids.len(), received.len(), "a span arrived twice");
    for got in received {
        let want = by_id
            .get(got.span_id().as_str())
            .unwrap_or_else(|| panic!("span {} was not traced", got.span_id()));
        let name = &want.name;
        assert_eq!(got.span.name, *name);
        assert_eq!(got.trace_id(), want.trace_id, "{name}");
        assert_eq!(got.parent_span_id(), want.parent_span_id, "{name}");
        assert_eq!(
            got.span.start_time_unix_nano, want.start_time_unix_nano,
            "{name}"
        );
        assert_eq!(
            got.span.end_time_unix_nano, want.end_time_unix_nano,
            "{name}"
        );
        assert_eq!(got.span.kind, SpanKind::Internal as i32, "{name}");
        let status = got.span.status.clone().unwrap_or_default();
        assert_eq!(status.code, StatusCode::Unset as i32, "{name}");
        assert!(got.span.events.is_empty(), "{name}");

        let attributes = got.attributes();
        assert_eq!(
            attributes.keys().collect::<Vec<_>>(),
            [
                "code.filepath",
                "code.function",
                "code.lineno",
                "omegi.end",
                "process.pid",
                "thread.id"
            ],
            "{name}"
        );
        assert_eq!(attributes["code.function"], Value::Str(name.clone()));
        let file = want.attr("code.filepath").unwrap();
        assert!(file.ends_with("/fixtures/c/otlp_orders.c"), "{file}");
        assert_eq!(attributes["code.filepath"], Value::Str(file));
        assert_eq!(
            attributes["code.lineno"],
            Value::Int(want.attributes["code.lineno"].as_i64().unwrap())
        );
        assert_eq!(attributes["thread.id"], Value::Int(want.tid() as i64));
        assert_eq!(attributes["process.pid"], Value::Int(want.pid() as i64));
        assert_eq!(attributes["omegi.end"], Value::Str("returned".into()));

        assert_eq!(got.scope, "omegi");
        assert_eq!(
            got.resource.get("service.name"),
            Some(&Value::Str(service.into()))
        );
    }
}

fn spans_in_traces(console: &[SpanRecord], keep: impl Fn(&str) -> bool) -> Vec<SpanRecord> {
    console
        .iter()
        .filter(|span| keep(&span.trace_id))
        .cloned()
        .collect()
}

fn trace_ids<'a>(ids: impl Iterator<Item = &'a str>) -> BTreeSet<String> {
    ids.map(str::to_owned).collect()
}

#[test]
fn grpc_delivers_exactly_what_was_traced() {
    let exe = orders();
    let collector = Collector::start();
    let endpoint = collector.grpc_endpoint();
    let run = traced(
        &exe,
        &[
            ("OMEGI_EXPORTER_KIND", "otlp,console"),
            ("OMEGI_FLOW_RATE", "1"),
            ("OMEGI_SERVICE_NAME", "orders-grpc"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-omegi-test=grpc%20ok,tenant=a",
            ),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e"),
        ],
        &["--quiet"],
    );
    check_program_and_console(&exe, &run);
    assert_eq!(run.agent_lines(), "", "nothing dropped, nothing to say");

    // The agent flushed before it exited: everything is there already.
    let received = collector.spans();
    assert_eq!(received.len(), SPANS);
    check_same_spans(&received, &run.console, "orders-grpc");
    for span in &received {
        assert_eq!(span.transport, Transport::Grpc);
        assert_eq!(
            span.resource.get("deployment.environment"),
            Some(&Value::Str("e2e".into()))
        );
        assert_eq!(
            span.resource
                .get("process.executable.path")
                .and_then(Value::as_str),
            Some(exe.to_str().unwrap())
        );
    }
    for request in collector.requests() {
        assert_eq!(request.headers.get("x-omegi-test").unwrap(), "grpc ok");
        assert_eq!(request.headers.get("tenant").unwrap(), "a");
    }
}

#[test]
fn http_protobuf_delivers_exactly_what_was_traced() {
    let exe = orders();
    let collector = Collector::start();
    let endpoint = collector.http_endpoint();
    let run = traced(
        &exe,
        &[
            ("OMEGI_EXPORTER_KIND", "console,otlp"),
            ("OMEGI_FLOW_RATE", "1"),
            ("OMEGI_SERVICE_NAME", "orders-http"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            // The general endpoint is a base: /v1/traces is added.
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-omegi-test=http"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ],
        &["--quiet"],
    );
    check_program_and_console(&exe, &run);
    assert_eq!(run.agent_lines(), "");
    let received = collector.spans();
    assert_eq!(received.len(), SPANS);
    check_same_spans(&received, &run.console, "orders-http");
    assert!(received.iter().all(|s| s.transport == Transport::Http));
    for request in collector.requests() {
        assert_eq!(request.headers.get("x-omegi-test").unwrap(), "http");
        assert_eq!(request.headers.get("content-encoding").unwrap(), "gzip");
    }
}

#[test]
fn the_per_signal_endpoint_is_used_as_it_is() {
    let exe = orders();
    let collector = Collector::start();
    let endpoint = format!("{}/v1/traces", collector.http_endpoint());
    let run = traced(
        &exe,
        &[
            ("OMEGI_EXPORTER_KIND", "otlp,console"),
            ("OMEGI_FLOW_RATE", "1"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
            // Loses to the per-signal endpoint.
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &unreachable_endpoint()),
        ],
        &["--quiet"],
    );
    check_program_and_console(&exe, &run);
    let received = collector.spans();
    check_same_spans(&received, &run.console, "test-server");
    assert_eq!(received.len(), SPANS, "{}", run.stderr);
}

/// An `https://` collector is checked against the CA certificates in
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`: with the collector's CA everything
/// arrives, over both protocols; with another CA nothing does, and the
/// spans are counted as failed.
#[test]
fn https_collectors_are_verified() {
    let exe = orders();
    let certificates = TestCertificates::generate();
    let dir = omegi_tests::scratch_dir("otlp-tls");
    let right_ca = certificates.write_ca(&dir);
    let other_dir = omegi_tests::scratch_dir("otlp-tls-other");
    let wrong_ca = TestCertificates::generate().write_ca(&other_dir);
    let collector = Collector::start_tls(&certificates);
    for (protocol, transport, endpoint) in [
        ("grpc", Transport::Grpc, collector.grpc_endpoint()),
        ("http/protobuf", Transport::Http, collector.http_endpoint()),
    ] {
        assert!(endpoint.starts_with("https://"));
        let run = traced(
            &exe,
            &[
                ("OMEGI_EXPORTER_KIND", "otlp,console"),
                ("OMEGI_FLOW_RATE", "1"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", right_ca.to_str().unwrap()),
            ],
            &["--quiet"],
        );
        check_program_and_console(&exe, &run);
        assert_eq!(run.agent_lines(), "", "{protocol}");
        let received: Vec<ReceivedSpan> = collector
            .spans()
            .into_iter()
            .filter(|span| span.transport == transport)
            .collect();
        assert_eq!(received.len(), SPANS, "{protocol}");
        check_same_spans(&received, &run.console, "test-server");

        let run = traced(
            &exe,
            &[
                ("OMEGI_EXPORTER_KIND", "otlp,console"),
                ("OMEGI_FLOW_RATE", "1"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                    wrong_ca.to_str().unwrap(),
                ),
            ],
            &["--quiet"],
        );
        check_program_and_console(&exe, &run);
        let lines = run.agent_lines();
        assert!(
            lines.contains("otlp: cannot deliver"),
            "{protocol}: {lines}"
        );
        assert_eq!(
            summary_count(&run, "dropped: ", "spans failed to export to otlp"),
            Some(SPANS as u64),
            "{protocol}: {lines}"
        );
        let still: usize = collector
            .spans()
            .iter()
            .filter(|span| span.transport == transport)
            .count();
        assert_eq!(still, SPANS, "{protocol}: nothing more arrived");
    }
}

/// With N > 1 exactly the traces the trace-id rule picks arrive, whole; with
/// the default `OMEGI_FLOW_RATE` too.
#[test]
fn flow_sampling_follows_the_trace_id_rule() {
    let exe = orders();
    for (rate, env_rate) in [(3u32, Some("3")), (5, None)] {
        let collector = Collector::start();
        let endpoint = collector.grpc_endpoint();
        let mut env = vec![
            ("OMEGI_EXPORTER_KIND", "otlp,console"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ];
        if let Some(rate) = env_rate {
            env.push(("OMEGI_FLOW_RATE", rate));
        }
        let run = traced(&exe, &env, &[]);
        check_program_and_console(&exe, &run);

        let chosen = |trace_id: &str| is_sampled(u128::from_str_radix(trace_id, 16).unwrap(), rate);
        let expected = spans_in_traces(&run.console, chosen);
        let received = collector.spans();
        let got: BTreeSet<String> = received.iter().map(ReceivedSpan::trace_id).collect();
        let want = trace_ids(expected.iter().map(|s| s.trace_id.as_str()));
        assert_eq!(got, want, "rate {rate}");
        assert_eq!(received.len(), expected.len(), "whole traces, rate {rate}");
        check_same_spans(&received, &expected, "test-server");
        // Some chosen, some not (at rate 3 with 32 traces, all or none has a
        // chance below 1e-5; the default rate is only checked for equality,
        // as none chosen has a chance near 1e-3 there).
        if rate == 3 {
            assert!(
                !want.is_empty() && want.len() < TRACES,
                "rate {rate}: {}",
                want.len()
            );
        }
        assert_eq!(
            summary_count(&run, "otlp: ", "spans exported"),
            Some(expected.len() as u64),
            "{}",
            run.agent_lines()
        );
        assert_eq!(
            summary_count(&run, "otlp: ", "skipped (not sampled)"),
            Some((SPANS - expected.len()) as u64),
            "{}",
            run.agent_lines()
        );
    }
}

/// A collector that is down: the program runs as it does without omegi, the
/// agent ends, and every span it could not deliver is in the summary.
#[test]
fn a_collector_that_is_down_loses_nothing_silently() {
    let exe = orders();
    for protocol in ["grpc", "http/protobuf"] {
        let endpoint = unreachable_endpoint();
        let run = traced(
            &exe,
            &[
                ("OMEGI_EXPORTER_KIND", "otlp,console"),
                ("OMEGI_FLOW_RATE", "1"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ],
            &["--quiet"],
        );
        check_program_and_console(&exe, &run);
        let lines = run.agent_lines();
        assert!(
            lines.contains("otlp: cannot deliver") && lines.contains(&endpoint),
            "{protocol}: {lines}"
        );
        assert_eq!(
            summary_count(&run, "dropped: ", "spans failed to export to otlp"),
            Some(SPANS as u64),
            "{protocol}: {lines}"
        );
    }
}

/// A collector that takes the connection and never answers: exports time
/// out, the flush deadline ends the agent, and the spans are counted.
#[test]
fn a_silent_collector_does_not_hold_the_agent() {
    let exe = orders();
    for protocol in ["grpc", "http/protobuf"] {
        let silent = SilentCollector::start();
        let endpoint = silent.endpoint();
        let run = traced(
            &exe,
            &[
                ("OMEGI_EXPORTER_KIND", "otlp,console"),
                ("OMEGI_FLOW_RATE", "1"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
            ],
            &["--quiet", "--flush-timeout", "2s"],
        );
        check_program_and_console(&exe, &run);
        assert_eq!(
            summary_count(&run, "dropped: ", "spans failed to export to otlp"),
            Some(SPANS as u64),
            "{protocol}: {}",
            run.agent_lines()
        );
    }
}

/// A collector that refuses the first requests (as an overloaded one does):
/// the SDK retries, everything arrives, and the retries are counted.
#[test]
fn refused_requests_are_retried_and_counted() {
    let exe = orders();
    for protocol in ["grpc", "http/protobuf"] {
        let collector = Collector::start();
        collector.refuse_next(2);
        let endpoint = match protocol {
            "grpc" => collector.grpc_endpoint(),
            _ => collector.http_endpoint(),
        };
        let run = traced(
            &exe,
            &[
                ("OMEGI_EXPORTER_KIND", "otlp,console"),
                ("OMEGI_FLOW_RATE", "1"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ],
            &[],
        );
        check_program_and_console(&exe, &run);
        assert_eq!(collector.refused(), 2, "{protocol}");
        let received = collector.spans();
        assert_eq!(received.len(), SPANS, "{protocol}: {}", run.agent_lines());
        check_same_spans(&received, &run.console, "test-server");
        let lines = run.agent_lines();
        assert!(lines.contains("nothing dropped"), "{protocol}: {lines}");
        let retried = summary_count(&run, "otlp: ", "retried)");
        assert!(
            retried.is_some_and(|n| n > 0 && n <= SPANS as u64),
            "{protocol}: {lines}"
        );
    }
}

/// Bad values are refused before anything runs, in one line naming the
/// variable and what it accepts.
#[test]
fn bad_otlp_configuration_is_refused_at_start() {
    let exe = orders();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "udp")],
            "OTEL_EXPORTER_OTLP_PROTOCOL = \"udp\" is not valid: grpc or http/protobuf",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")],
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL = \"http/json\" is not valid: grpc or http/protobuf",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")],
            "OTEL_EXPORTER_OTLP_ENDPOINT = \"not a url\" is not valid: an http:// or https:// URL",
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            ],
            "OTEL_EXPORTER_OTLP_ENDPOINT = \"collector:4317\" is not valid: an http:// or https:// \
             URL of the OTLP collector, such as http://collector:4317",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")],
            "OTEL_EXPORTER_OTLP_CERTIFICATE = \"/nonexistent/ca.pem\" is not valid: a PEM file of \
             CA certificates (cannot read it",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/omegi/key.pem")],
            "OTEL_EXPORTER_OTLP_CLIENT_KEY = \"/etc/omegi/key.pem\" is not valid: unset: omegi does \
             not support client certificates",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")],
            "OTEL_EXPORTER_OTLP_TIMEOUT = \"10s\" is not valid: a positive number of milliseconds",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_COMPRESSION", "br")],
            "OTEL_EXPORTER_OTLP_COMPRESSION = \"br\" is not valid: gzip or none",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_HEADERS", "api-key=topsecret42,broken")],
            "OTEL_EXPORTER_OTLP_HEADERS = \"broken\" is not valid: comma-separated key=value pairs",
        ),
    ];
    for (env, message) in cases {
        let mut env = env.to_vec();
        env.push(("OMEGI_EXPORTER_KIND", "otlp"));
        let run = traced(&exe, &env, &[]);
        assert_eq!(run.status.code(), Some(1), "{env:?}: {}", run.stderr);
        assert_eq!(run.stdout, "", "the program must not have started");
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{env:?}: {}", run.stderr);
        assert!(
            lines[0].starts_with(&format!("omegi-agent: error: {message}")),
            "{env:?}: {}",
            lines[0]
        );
        assert!(!run.stderr.contains("topsecret42"), "{}", run.stderr);
    }

    let run = traced(&exe, &[("OMEGI_EXPORTER_KIND", "otlp,zipkin")], &[]);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        run.stderr.starts_with(
            "omegi-agent: error: OMEGI_EXPORTER_KIND (--exporter) = \"otlp,zipkin\" is not valid: \
             a comma-separated list of console, kafka, otlp"
        ),
        "{}",
        run.stderr
    );

    // OTEL variables are not omegi's business unless the OTLP exporter is on.
    let run = traced(
        &exe,
        &[
            ("OMEGI_EXPORTER_KIND", "console"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "udp"),
        ],
        &["--quiet"],
    );
    check_program_and_console(&exe, &run);
}

/// Through the exporter itself (no kernel side): an error trace that the
/// flow sampling did not choose still goes out, whole, with its status and
/// `exception` event; an ordinary unchosen trace does not.
#[test]
fn error_traces_always_go_out_with_their_exception() {
    let collector = Collector::start();
    for (protocol, endpoint) in [
        (OtlpProtocol::Grpc, collector.grpc_endpoint()),
        (
            OtlpProtocol::HttpProtobuf,
            format!("{}/v1/traces", collector.http_endpoint()),
        ),
    ] {
        let before = collector.spans().len();
        let options = OtlpOptions {
            protocol,
            endpoint,
            timeout: Duration::from_secs(10),
            headers: Vec::new(),
            gzip: false,
            ca_certificates: None,
        };
        let function = |id: u32, name: &str, line| {
            Function::described(id, name, Some("/app/src/server.c"), Some(line))
        };
        let context = Arc::new(ExportContext {
            functions: Arc::new(FunctionTable::from_functions(
                "/app/server",
                vec![function(0, "handle", 10), function(1, "parse", 20)],
            )),
            service_name: "errors".into(),
            project_root: "/app".into(),
        });
        let span = |id: u64, parent: u64, fn_id: u32, status: Status| Span {
            span_id: id,
            parent_span_id: parent,
            caller_span_id: None,
            http: None,
            arguments: Vec::new(),
            fn_id,
            pid: 40,
            tid: 41,
            goroutine: false,
            start_unix_ns: 1_700_000_000_000_000_000 + id,
            end_unix_ns: 1_700_000_000_000_005_000 - id,
            end: SpanEnd::Unwound,
            status,
        };
        let error_trace = Trace {
            trace_id: 0xfeed_0000_0000_0000_ffff_ffff_ffff_ffff,
            spans: vec![
                span(0x22, 0x11, 1, Status::Error("bad request line".into())),
                span(0x11, 0, 0, Status::Unset),
            ],
            complete: true,
            sampled: false,
            errors: Vec::new(),
        };
        let ordinary = Trace {
            trace_id: 0xbeef,
            spans: vec![span(0x33, 0, 0, Status::Ok)],
            complete: true,
            sampled: false,
            errors: Vec::new(),
        };
        let stats = Arc::new(ExporterStats {
            name: "otlp",
            ..Default::default()
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (sender, receiver) = tokio::sync::mpsc::channel(8);
            let task = otlp::spawn(
                &options,
                Duration::from_secs(30),
                context,
                receiver,
                Arc::clone(&stats),
            )
            .unwrap();
            sender.send(Arc::new(ordinary)).await.unwrap();
            sender.send(Arc::new(error_trace)).await.unwrap();
            drop(sender);
            task.await.unwrap();
        });
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(load(&stats.spans), 2);
        assert_eq!(load(&stats.traces), 1);
        assert_eq!(load(&stats.sampled_out_spans), 1);
        assert_eq!(load(&stats.failed_spans), 0);

        let received = &collector.spans()[before..];
        assert_eq!(received.len(), 2, "{protocol:?}");
        let failing = received.iter().find(|s| s.span.name == "parse").unwrap();
        let root = received.iter().find(|s| s.span.name == "handle").unwrap();
        assert_eq!(
            failing.trace_id(),
            format!("{:032x}", 0xfeed_0000_0000_0000_ffff_ffff_ffff_ffffu128)
        );
        assert_eq!(failing.parent_span_id(), root.span_id());
        assert_eq!(root.parent_span_id(), "0000000000000000");
        let status = failing.span.status.clone().unwrap();
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "bad request line");
        assert_eq!(
            root.span.status.clone().unwrap_or_default().code,
            StatusCode::Unset as i32
        );
        assert_eq!(
            failing.attr("omegi.end"),
            Some(Value::Str("unwound".into()))
        );
        assert_eq!(
            failing.resource.get("service.name"),
            Some(&Value::Str("errors".into()))
        );

        assert_eq!(failing.span.events.len(), 1);
        let event = &failing.span.events[0];
        assert_eq!(event.name, "exception");
        assert_eq!(event.time_unix_nano, failing.span.end_time_unix_nano);
        let fields = omegi_tests::otlp::attributes(&event.attributes);
        assert_eq!(
            fields.get("exception.message"),
            Some(&Value::Str("bad request line".into()))
        );
        assert_eq!(
            fields.get("exception.stacktrace"),
            Some(&Value::Str(
                "at parse (/app/src/server.c:20)\nat handle (/app/src/server.c:10)".into()
            ))
        );
        assert!(root.span.events.is_empty());
    }
}

#[test]
fn a_real_exception_arrives_with_its_type_message_and_stack() {
    use std::os::unix::process::ExitStatusExt;
    let collector = Collector::start();
    let exe = fixtures::build("cpp/errors_uncaught.cpp", Linking::Pie);
    // A flow rate no ordinary trace passes: the error trace goes out anyway.
    let run = traced_functions(
        &exe,
        "*",
        &[
            ("OMEGI_EXPORTER_KIND", "otlp,console"),
            ("OMEGI_FLOW_RATE", "1000000"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.grpc_endpoint()),
        ],
        &[],
    );
    assert_eq!(run.status.signal(), Some(6), "{}", run.stderr);
    let received = collector.wait_for_spans(3, Duration::from_secs(60));
    let mut names: Vec<String> = received.iter().map(|s| s.span.name.clone()).collect();
    names.sort();
    assert_eq!(names, vec!["load_config", "main", "start_server"]);
    for span in &received {
        let status = span.span.status.clone().unwrap();
        assert_eq!(status.code, StatusCode::Error as i32, "{}", span.span.name);
        assert_eq!(status.message, "std::runtime_error: config file missing");
        assert_eq!(span.span.events.len(), 1, "{}", span.span.name);
        let event = &span.span.events[0];
        assert_eq!(event.name, "exception");
        let attributes = omegi_tests::otlp::attributes(&event.attributes);
        assert_eq!(
            attributes.get("exception.type").and_then(Value::as_str),
            Some("std::runtime_error")
        );
        assert_eq!(
            attributes.get("exception.message").and_then(Value::as_str),
            Some("config file missing")
        );
        let stacktrace = attributes
            .get("exception.stacktrace")
            .and_then(Value::as_str)
            .unwrap()
            .to_owned();
        let first = stacktrace.lines().next().unwrap();
        assert!(
            first.starts_with("at load_config (") && first.ends_with("errors_uncaught.cpp:7)"),
            "{stacktrace}"
        );
        assert_eq!(stacktrace.lines().count(), 3, "{stacktrace}");
    }
}
