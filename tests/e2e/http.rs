//! HTTP SERVER and CLIENT spans and the W3C trace context (issue 8), against
//! real peers on loopback: the OpenTelemetry Python SDK's client, server and
//! relay (Flask, `requests`), and the C and Rust `http_server` and C
//! `http_client` fixtures, traced by omegi from outside.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use omegi_tests::{
    fixtures::{build_as, Linking, Profile},
    kafka::{self, Broker},
    otlp::Collector,
    peers::{Finished, HttpClient, HttpServer, PeerProcess, PeerSpan, PythonPeer},
    run::Agent,
    scratch_dir,
    spans::{parse_lines, traces, SpanRecord, TraceView},
};

const AGENT: &str = env!("CARGO_BIN_EXE_omegi-agent");

const ZERO_SPAN: &str = "0000000000000000";

/// A server fixture started under the agent, which writes its spans to a
/// file; the server ends after `connections` connections, and the agent
/// with it.
struct TracedServer {
    process: PeerProcess,
    spans_file: PathBuf,
}

impl TracedServer {
    fn start(exe: &Path, connections: usize, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let spans_file = scratch_dir("http-server").join("spans.jsonl");
        // Not `Agent::command`: that one is `--quiet`, and the summary
        // (with what was ignored) is wanted here.
        let agent = Agent::new(AGENT);
        let mut command = Command::new(&agent.bin);
        command
            .arg("--project-root")
            .arg(omegi_tests::fixtures::sources_dir())
            .args(["--format", "json", "--output"])
            .arg(&spans_file)
            .args(extra);
        for (key, value) in env {
            command.env(key, value);
        }
        command
            .arg("--")
            .arg(exe)
            .args(["0", &connections.to_string()]);
        Self {
            process: PeerProcess::start(command),
            spans_file,
        }
    }

    fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    fn port(&self) -> u16 {
        self.process.port()
    }

    /// Waits for the server (and so the agent) to end; its spans.
    fn finish(self) -> (Finished, Vec<SpanRecord>) {
        let finished = self.process.wait();
        assert!(
            finished.status.success(),
            "agent or server failed: {}",
            finished.stderr
        );
        let spans = parse_lines(&std::fs::read_to_string(&self.spans_file).unwrap_or_default());
        (finished, spans)
    }
}

fn server_spans(spans: &[SpanRecord]) -> Vec<&SpanRecord> {
    let mut found: Vec<&SpanRecord> = spans.iter().filter(|s| s.kind == "SERVER").collect();
    found.sort_by_key(|span| span.start_time_unix_nano);
    found
}

/// The summary line's count of malformed traceparent headers.
fn malformed_count(stderr: &str) -> u64 {
    stderr
        .lines()
        .filter_map(|line| {
            let end = line.find(" malformed traceparent headers ignored")?;
            line[..end]
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .next_back()
        .unwrap_or(0)
}

/// The Python client's CLIENT spans (every span but its `client-run`).
fn python_calls(spans: &[PeerSpan]) -> Vec<&PeerSpan> {
    spans.iter().filter(|span| span.kind == "CLIENT").collect()
}

/// The Python CLIENT span that asked for `path_and_query`.
fn python_call_for<'a>(spans: &'a [PeerSpan], path_and_query: &str) -> &'a PeerSpan {
    python_calls(spans)
        .into_iter()
        .find(|span| {
            span.attr_str("url.full")
                .is_some_and(|url| url.ends_with(path_and_query))
        })
        .unwrap_or_else(|| panic!("no Python CLIENT span for {path_and_query}: {spans:#?}"))
}

/// The spans under `root` (by parent links), as a trace of their own: the
/// requests of one Python client share its trace id, each SERVER span is
/// the root of its own part of it.
fn subtree(spans: &[SpanRecord], root: &SpanRecord) -> TraceView {
    let mut members = vec![root.clone()];
    let mut index = 0;
    while index < members.len() {
        let id = members[index].span_id.clone();
        members.extend(
            spans
                .iter()
                .filter(|span| span.parent_span_id == id)
                .cloned(),
        );
        index += 1;
    }
    TraceView {
        trace_id: root.trace_id.clone(),
        spans: members,
    }
}

/// Checks a traced server's SERVER span for one request.
fn check_server_span(span: &SpanRecord, method: &str, path: &str, status: u16, port: u16) {
    assert_eq!(span.name, format!("{method} {path}"), "{span:?}");
    assert_eq!(span.attr("http.request.method").as_deref(), Some(method));
    assert_eq!(span.attr("url.path").as_deref(), Some(path));
    assert_eq!(
        span.attr("http.response.status_code"),
        Some(status.to_string())
    );
    assert_eq!(
        span.attr("network.protocol.version").as_deref(),
        Some("1.1")
    );
    assert_eq!(span.attr("server.port"), Some(port.to_string()));
    assert_eq!(span.attr("client.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(span.is_error(), status >= 500, "{span:?}");
}

#[test]
fn python_client_and_traced_c_and_rust_servers_make_one_trace() {
    for (file, profile) in [
        ("c/http_server.c", Profile::Debug),
        ("c/http_server.c", Profile::Release),
        ("rust/http_server.rs", Profile::Release),
    ] {
        let exe = build_as(file, Linking::Pie, profile);
        let server = TracedServer::start(&exe, 1, &[], &[]);
        let port = server.port();
        // One `requests` session: the three requests share a keep-alive
        // connection, each with its own traceparent.
        let urls = [
            server.url("/hello"),
            server.url("/error"),
            server.url("/missing?page=2"),
        ];
        let python = PythonPeer::run_client(&urls);
        let (_, spans) = server.finish();
        let served = server_spans(&spans);
        assert_eq!(served.len(), 3, "{file} {profile:?}: {spans:#?}");
        for (server_span, (path, query, status)) in served.iter().zip([
            ("/hello", "", 200),
            ("/error", "", 500),
            ("/missing", "?page=2", 404),
        ]) {
            check_server_span(server_span, "GET", path, status, port);
            // The caller's trace, and its CLIENT span as the parent.
            let call = python_call_for(&python, &format!("{path}{query}"));
            assert_eq!(server_span.trace_id, call.trace_id, "{file}");
            assert_eq!(server_span.parent_span_id, call.span_id, "{file}");
            // The calls made answering it are its children, in its trace.
            let trace = subtree(&spans, server_span);
            trace.check_well_formed();
            let shape = trace.shape();
            assert!(shape.contains("handle_request("), "{file}: {shape}");
            assert_eq!(
                shape.contains("fail_request"),
                path == "/error",
                "{file}: {shape}"
            );
            assert!(
                trace
                    .spans
                    .iter()
                    .all(|span| span.tid() == server_span.tid() && span.trace_id == call.trace_id),
                "{file}: {shape}"
            );
        }
        // The connection's own calls stay in a trace of their own.
        let connection = spans
            .iter()
            .find(|span| span.name.ends_with("handle_connection"))
            .expect("handle_connection traced");
        assert!(
            !served.iter().any(|s| s.trace_id == connection.trace_id),
            "{file}"
        );
    }
}

#[test]
fn a_python_service_between_a_client_and_a_traced_server_links_the_path() {
    let exe = build_as("c/http_server.c", Linking::Pie, Profile::Release);
    // The relay answers each request on a thread of its own, with a
    // connection of its own to the server.
    let server = TracedServer::start(&exe, 2, &[], &[]);
    let relay = PythonPeer::relay_for(0, &server.url(""), 2);
    let python = PythonPeer::run_client(&[relay.url("/relay/hello"), relay.url("/relay/error")]);
    let relayed = relay.wait();
    let (_, spans) = server.finish();
    let relay_calls: Vec<&PeerSpan> = relayed
        .spans
        .iter()
        .filter(|span| span.kind == "CLIENT")
        .collect();
    assert_eq!(relay_calls.len(), 2, "{:#?}", relayed.spans);
    let served = server_spans(&spans);
    assert_eq!(served.len(), 2, "{spans:#?}");
    for server_span in &served {
        let relay_call = relay_calls
            .iter()
            .find(|call| call.span_id == server_span.parent_span_id)
            .unwrap_or_else(|| panic!("no relay CLIENT span for {server_span:?}"));
        let path = server_span.name.trim_start_matches("GET ");
        let client_call = python_call_for(&python, &format!("/relay{path}"));
        assert_eq!(server_span.trace_id, client_call.trace_id);
        assert_eq!(server_span.trace_id, relay_call.trace_id);
    }
    assert_eq!(
        served
            .iter()
            .map(|span| span.name.as_str())
            .collect::<Vec<_>>(),
        ["GET /hello", "GET /error"]
    );
    assert!(served[1].is_error() && !served[0].is_error());
}

#[test]
fn keep_alive_split_large_and_malformed_contexts_each_right() {
    let client = build_as("c/http_client.c", Linking::Pie, Profile::Release);
    let exe = build_as("c/http_server.c", Linking::Pie, Profile::Release);
    let valid = [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        "00-11111111111111111111111111111111-2222222222222222-01",
    ];
    let malformed = [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
    ];
    // Every way the fixture can read: read, recv, readv, recvmsg.
    for io in ["read", "recv", "vec", "msg"] {
        let server = TracedServer::start(&exe, 3, &[], &[("HTTP_FIXTURE_IO", io)]);
        let port = server.port();
        // Three requests on one keep-alive connection, three contexts.
        let run = HttpClient::run(
            &client,
            port,
            &["GET /a", "POST /b", "GET /c"],
            &[("HTTP_CLIENT_TRACEPARENT", &valid.join(" "))],
        );
        assert_eq!(run.codes(), [200, 200, 200], "{}", run.stderr);
        // 5 KiB of headers before the traceparent, the request in two writes.
        let run = HttpClient::run(
            &client,
            port,
            &["GET /padded"],
            &[
                ("HTTP_CLIENT_TRACEPARENT", valid[0]),
                ("HTTP_CLIENT_PAD", "5120"),
                ("HTTP_CLIENT_SPLIT", "1"),
            ],
        );
        assert_eq!(run.codes(), [200], "{}", run.stderr);
        let run = HttpClient::run(
            &client,
            port,
            &["GET /m1", "GET /m2", "GET /m3", "GET /m4"],
            &[("HTTP_CLIENT_TRACEPARENT", &malformed.join(" "))],
        );
        assert_eq!(run.codes(), [200; 4], "{}", run.stderr);
        let (finished, spans) = server.finish();
        let served = server_spans(&spans);
        let names: Vec<&str> = served.iter().map(|span| span.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "GET /a",
                "POST /b",
                "GET /c",
                "GET /padded",
                "GET /m1",
                "GET /m2",
                "GET /m3",
                "GET /m4"
            ],
            "{io}: {spans:#?}"
        );
        for (span, context) in served.iter().zip(valid.iter().chain([&valid[0]])) {
            let parts: Vec<&str> = context.split('-').collect();
            assert_eq!(span.trace_id, parts[1], "{io} {}", span.name);
            assert_eq!(span.parent_span_id, parts[2], "{io} {}", span.name);
        }
        // Malformed ones are ignored whole: a trace of the server's own.
        for span in &served[4..] {
            assert_eq!(span.parent_span_id, ZERO_SPAN, "{io} {}", span.name);
            assert!(!valid.iter().any(|v| v.contains(&span.trace_id)));
        }
        assert_eq!(malformed_count(&finished.stderr), 4, "{}", finished.stderr);
        let ids: std::collections::HashSet<&str> =
            served.iter().map(|span| span.trace_id.as_str()).collect();
        assert_eq!(
            ids.len(),
            7,
            "{io}: one trace per request but the repeated context"
        );
    }
}

#[test]
fn two_clients_at_once_on_a_threaded_server() {
    let exe = build_as("c/http_server.c", Linking::Pie, Profile::Release);
    let server = TracedServer::start(&exe, 2, &[], &[]);
    let urls: Vec<String> = (0..20).map(|i| server.url(&format!("/n{i}"))).collect();
    let first = std::thread::spawn({
        let urls = urls.clone();
        move || PythonPeer::run_client(&urls)
    });
    let second = PythonPeer::run_client(&urls);
    let first = first.join().unwrap();
    let (_, spans) = server.finish();
    let served = server_spans(&spans);
    assert_eq!(served.len(), 40);
    let by_parent: HashMap<&str, &SpanRecord> = served
        .iter()
        .map(|span| (span.parent_span_id.as_str(), *span))
        .collect();
    for call in python_calls(&first)
        .into_iter()
        .chain(python_calls(&second))
    {
        let span = by_parent
            .get(call.span_id.as_str())
            .unwrap_or_else(|| panic!("no SERVER span for {call:?}"));
        assert_eq!(span.trace_id, call.trace_id);
        let path = call
            .attr_str("url.full")
            .and_then(|url| url.rsplit_once('/'))
            .map(|(_, last)| format!("GET /{last}"))
            .unwrap();
        assert_eq!(span.name, path);
        let trace = subtree(&spans, span);
        trace.check_well_formed();
        assert!(
            trace.shape().contains("handle_request("),
            "{}",
            trace.shape()
        );
    }
    let threads: std::collections::HashSet<u64> = served.iter().map(|span| span.tid()).collect();
    assert_eq!(threads.len(), 2, "a thread per connection");
}

#[test]
fn requests_a_traced_client_makes_are_client_spans_of_the_calling_function() {
    let client = build_as("c/http_client.c", Linking::Pie, Profile::Release);
    let exe = build_as("c/http_server.c", Linking::Pie, Profile::Release);
    for io in ["read", "recv", "vec", "msg"] {
        let server = HttpServer::start(&exe, Some(1));
        let port = server.port();
        let spans_file = scratch_dir("http-client").join("spans.jsonl");
        let mut command = Agent::new(AGENT).command(&[], &spans_file);
        command
            .env("HTTP_FIXTURE_IO", io)
            .arg("--")
            .arg(&client)
            .arg(port.to_string())
            .args(["GET /a?x=1", "GET /error"]);
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{io}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(server.wait().status.success());
        let spans = parse_lines(&std::fs::read_to_string(&spans_file).unwrap());
        let calls: Vec<&SpanRecord> = spans.iter().filter(|s| s.kind == "CLIENT").collect();
        assert_eq!(calls.len(), 2, "{io}: {spans:#?}");
        for (call, (path, status)) in calls.iter().zip([("/a", 200), ("/error", 500)]) {
            assert_eq!(call.name, format!("GET {path}"));
            assert_eq!(call.attr("url.path").as_deref(), Some(path));
            assert_eq!(
                call.attr("http.response.status_code"),
                Some(status.to_string())
            );
            assert_eq!(call.attr("server.port"), Some(port.to_string()));
            assert_eq!(call.attr("server.address").as_deref(), Some("127.0.0.1"));
            assert_eq!(call.is_error(), status >= 500);
            let parent = spans
                .iter()
                .find(|span| span.span_id == call.parent_span_id)
                .expect("the CLIENT span's parent");
            assert_eq!(parent.name, "call_service", "{io}");
            assert_eq!(parent.trace_id, call.trace_id);
        }
        for trace in traces(&spans) {
            trace.check_well_formed();
        }
    }
}

#[test]
fn requests_and_responses_are_byte_identical_with_and_without_omegi() {
    let client = build_as("c/http_client.c", Linking::Pie, Profile::Release);
    let exe = build_as("c/http_server.c", Linking::Pie, Profile::Release);
    let requests = ["GET /a", "POST /b some body", "GET /error", "GET /missing"];
    let env = [
        (
            "HTTP_CLIENT_TRACEPARENT",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("HTTP_CLIENT_PAD", "3000"),
    ];
    let run_once = |traced: bool| -> (String, String, Vec<u8>) {
        let dump = scratch_dir("http-bytes").join("requests.bin");
        let (lines, stderr) = if traced {
            let dump = dump.to_string_lossy().into_owned();
            let server = TracedServer::start(&exe, 1, &[], &[("HTTP_SERVER_DUMP", &dump)]);
            let run = HttpClient::run(&client, server.port(), &requests, &env);
            let (_, spans) = server.finish();
            assert_eq!(server_spans(&spans).len(), requests.len());
            (run.status_lines.join("\n"), run.stderr)
        } else {
            let mut command = HttpServer::command(&exe, Some(1));
            command.env("HTTP_SERVER_DUMP", &dump);
            let server = PeerProcess::start(command);
            let run = HttpClient::run(&client, server.port(), &requests, &env);
            assert!(server.wait().status.success());
            (run.status_lines.join("\n"), run.stderr)
        };
        (lines, stderr, std::fs::read(&dump).unwrap_or_default())
    };
    let plain = run_once(false);
    let traced = run_once(true);
    assert!(!plain.2.is_empty());
    assert_eq!(plain, traced);
}

#[test]
fn propagation_off_makes_no_http_spans() {
    let exe = build_as("c/http_server.c", Linking::Pie, Profile::Release);
    let server = TracedServer::start(&exe, 1, &["--propagation", "off"], &[]);
    let python = PythonPeer::run_client(&[server.url("/hello")]);
    let (_, spans) = server.finish();
    assert!(server_spans(&spans).is_empty(), "{spans:#?}");
    assert!(spans.iter().any(|span| span.name == "handle_request"));
    // The function spans make their own traces, as before.
    let call = python_calls(&python)[0];
    assert!(spans.iter().all(|span| span.trace_id != call.trace_id));
}

/// Writes `bytes` on a new connection, reads until the server closes or a
/// second passes, and returns what came back.
fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[test]
fn garbage_binary_huge_and_unfinished_requests_harm_nothing() {
    let exe = build_as("c/http_server.c", Linking::Pie, Profile::Release);
    let mut huge = b"GET /huge HTTP/1.1\r\n".to_vec();
    while huge.len() < 64 * 1024 {
        huge.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    huge.extend_from_slice(b"\r\n");
    let inputs: Vec<Vec<u8>> = vec![
        b"GET /garbage\r\n\x01\x02 not a header\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03binary, a TLS hello".to_vec(),
        huge,
        b"GET /unfinished HTTP/1.1\r\nHost: x\r\n".to_vec(),
        b"GET /fine HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
    ];
    let answers = |traced: bool| -> (Vec<Vec<u8>>, Vec<SpanRecord>, String) {
        if traced {
            let server = TracedServer::start(&exe, inputs.len(), &[], &[]);
            let answers = inputs
                .iter()
                .map(|input| exchange(server.port(), input))
                .collect();
            let (finished, spans) = server.finish();
            (answers, spans, finished.stderr)
        } else {
            let server = HttpServer::start(&exe, Some(inputs.len()));
            let answers = inputs
                .iter()
                .map(|input| exchange(server.port(), input))
                .collect();
            assert!(server.wait().status.success());
            (answers, Vec::new(), String::new())
        }
    };
    let (plain, _, _) = answers(false);
    let (traced, spans, stderr) = answers(true);
    assert_eq!(plain, traced, "the server answers the same");
    let served = server_spans(&spans);
    let names: Vec<&str> = served.iter().map(|span| span.name.as_str()).collect();
    // Nothing is made of the binary bytes; the huge head keeps its request
    // line; the request cut short is one span that was never answered.
    assert!(!names.iter().any(|name| name.contains("TLS")), "{names:?}");
    assert!(names.contains(&"GET /huge"), "{names:?}");
    assert!(names.contains(&"GET /fine"), "{names:?}");
    let unfinished = served
        .iter()
        .find(|span| span.name == "GET /unfinished")
        .unwrap_or_else(|| panic!("{names:?}"));
    assert_eq!(unfinished.attr("http.response.status_code"), None);
    assert_eq!(unfinished.end(), "not_answered");
    for trace in traces(&spans) {
        trace.check_well_formed();
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn through_kafka_a_reader_walks_from_the_traced_server_to_the_python_caller() {
    let broker = Broker::start();
    let exe = build_as("c/http_server.c", Linking::Pie, Profile::Release);
    let env = [
        ("OMEGI_EXPORTER_KIND", "kafka,console"),
        ("OMEGI_KAFKA_SERVER", &broker.address() as &str),
        ("OMEGI_FLOW_RATE", "1"),
        ("OMEGI_SERVICE_NAME", "c-orders"),
    ];
    let server = TracedServer::start(&exe, 1, &[], &env);
    let python = PythonPeer::run_client(&[server.url("/hello"), server.url("/error")]);
    let (_, _) = server.finish();
    let calls = python_calls(&python);
    let failed = python_call_for(&python, "/error");
    let errors = kafka::read_json(&broker.address(), "error", 1);
    let flows = kafka::read_json(&broker.address(), "flow", 3);
    // The error trace: the caller's trace id, the entry span last, a SERVER
    // span whose parent is the Python CLIENT span.
    let message = &errors[0];
    assert_eq!(message["traceId"], failed.trace_id.as_str(), "{message}");
    let spans = message["spans"].as_array().unwrap();
    let entry = spans.last().unwrap();
    assert_eq!(entry["kind"], "SERVER", "{message}");
    assert_eq!(entry["name"], "GET /error");
    assert_eq!(entry["parentSpanId"], failed.span_id.as_str());
    assert_eq!(entry["attributes"]["http.response.status_code"], "500");
    assert!(spans.iter().any(|span| span["name"] == "fail_request"));
    // A reader walks, as the collect server does, from the entry span to
    // the caller's span through parentSpanId.
    let caller = python
        .iter()
        .find(|span| span.span_id == entry["parentSpanId"].as_str().unwrap())
        .expect("the caller's span");
    assert_eq!(caller.trace_id, message["traceId"].as_str().unwrap());
    assert_eq!(caller.kind, "CLIENT");
    // Flow records: the entry span of each request continues the caller.
    for call in &calls {
        assert!(
            flows
                .iter()
                .any(|record| record["traceId"] == call.trace_id.as_str()
                    && record["parentSpanId"] == call.span_id.as_str()),
            "no flow record for {call:?}: {flows:#?}"
        );
    }
}

#[test]
fn through_otlp_the_server_span_has_the_remote_parent() {
    let collector = Collector::start();
    let exe = build_as("rust/http_server.rs", Linking::Pie, Profile::Release);
    let endpoint = collector.http_endpoint();
    let env = [
        ("OMEGI_EXPORTER_KIND", "otlp,console"),
        ("OMEGI_FLOW_RATE", "1"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint as &str),
    ];
    let server = TracedServer::start(&exe, 1, &[], &env);
    let python = PythonPeer::run_client(&[server.url("/hello")]);
    let (_, spans) = server.finish();
    let local = server_spans(&spans)[0].clone();
    let received = collector.wait_for_spans(spans.len(), Duration::from_secs(20));
    let call = python_calls(&python)[0];
    let span = received
        .iter()
        .find(|span| span.span_id() == local.span_id)
        .expect("the SERVER span in OTLP");
    assert_eq!(span.trace_id(), call.trace_id);
    assert_eq!(span.parent_span_id(), call.span_id);
    // SPAN_KIND_SERVER; the parent is flagged as remote (has-is-remote and
    // is-remote bits of the span's flags).
    assert_eq!(span.span.kind, 2);
    assert_eq!(span.span.flags & 0x300, 0x300, "{:?}", span.span.flags);
    assert_eq!(span.span.name, "GET /hello");
    let children = received
        .iter()
        .filter(|other| other.parent_span_id() == local.span_id)
        .count();
    assert!(children > 0);
}

#[test]
fn a_traced_go_server_continues_its_callers_traces() {
    // net/http reads and writes on whichever thread runs the goroutine: the
    // request is kept by its connection, and its span has no children yet.
    let exe = omegi_tests::fixtures::build("go/httpserver.go", Linking::Pie);
    let server = TracedServer::start(&exe, 3, &[], &[]);
    let port = server.port();
    let python = PythonPeer::run_client(&[
        server.url("/hello"),
        server.url("/error"),
        server.url("/again?x=1"),
    ]);
    let (finished, spans) = server.finish();
    assert!(
        finished.stdout.starts_with("listening on"),
        "{}",
        finished.stdout
    );
    let served = server_spans(&spans);
    assert_eq!(served.len(), 3, "{spans:#?}");
    for (span, (path, query, status)) in served.iter().zip([
        ("/hello", "", 200),
        ("/error", "", 500),
        ("/again", "?x=1", 200),
    ]) {
        check_server_span(span, "GET", path, status, port);
        let call = python_call_for(&python, &format!("{path}{query}"));
        assert_eq!(span.trace_id, call.trace_id);
        assert_eq!(span.parent_span_id, call.span_id);
    }
    // The handler's calls are traced as before, per goroutine.
    assert!(spans.iter().any(|span| span.name == "main.handle"));
}
