//! The HTTP peers of issue 8's tests, tested by themselves, without omegi:
//! the OpenTelemetry Python client, server and relay really propagate W3C
//! trace context to each other, and the `http_server` (C and Rust) and
//! `http_client` fixtures answer and ask as they say, keep-alive, split and
//! pipelined requests included. Nothing here needs root.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    time::Duration,
};

use omegi_tests::{
    fixtures::{build_as, Linking, Profile},
    peers::{python_otel_in, HttpClient, HttpServer, PeerProcess, PeerSpan, PythonPeer},
    scratch_dir,
};

const PROFILES: [Profile; 3] = [Profile::Debug, Profile::Release, Profile::ReleaseLto];

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks the client's spans: one CLIENT span per URL, in order, then
/// `client-run`, their parent, all one trace. Returns the CLIENT spans.
fn client_spans(spans: &[PeerSpan], urls: &[String]) -> Vec<PeerSpan> {
    assert_eq!(spans.len(), urls.len() + 1, "{spans:#?}");
    let run = spans.last().unwrap();
    assert_eq!(run.name, "client-run");
    assert_eq!(run.kind, "INTERNAL");
    assert_eq!(run.parent_span_id, None);
    assert!(is_hex(&run.trace_id, 32), "{run:?}");
    assert!(is_hex(&run.span_id, 16), "{run:?}");
    let calls = spans[..urls.len()].to_vec();
    for (span, url) in calls.iter().zip(urls) {
        let (method, url) = url.split_once(' ').unwrap_or(("GET", url));
        assert_eq!(span.kind, "CLIENT", "{span:?}");
        assert_eq!(span.name, method, "{span:?}");
        assert_eq!(span.attr_str("http.request.method"), Some(method));
        assert_eq!(span.attr_str("url.full"), Some(url), "{span:?}");
        assert_eq!(span.trace_id, run.trace_id, "{span:?}");
        assert_eq!(span.parent_span_id.as_deref(), Some(run.span_id.as_str()));
        assert!(!span.parent_is_remote);
        assert!(is_hex(&span.span_id, 16), "{span:?}");
        assert!(span.start_ns >= run.start_ns && span.end_ns <= run.end_ns);
    }
    let mut ids: Vec<&str> = spans.iter().map(|span| span.span_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), spans.len(), "span ids repeat: {spans:#?}");
    calls
}

/// A CLIENT span's status code, and the span status the requests
/// instrumentation gives it (ERROR for 4xx and 5xx).
fn assert_client_status(span: &PeerSpan, code: i64) {
    assert_eq!(
        span.attr_i64("http.response.status_code"),
        Some(code),
        "{span:?}"
    );
    let status = if code >= 400 { "ERROR" } else { "UNSET" };
    assert_eq!(span.status, status, "{span:?}");
}

#[test]
fn python_client_to_python_server_continues_the_trace() {
    let server = PythonPeer::server_for(0, 3);
    let port = server.port();
    let urls = vec![
        server.url("/hello"),
        server.url("/fail"),
        format!("POST {}", server.url("/nowhere")),
    ];
    let spans = PythonPeer::run_client(&urls);
    let calls = client_spans(&spans, &urls);
    assert_client_status(&calls[0], 200);
    assert_client_status(&calls[1], 500);
    assert_client_status(&calls[2], 404);

    let finished = server.wait();
    assert!(finished.status.success(), "{}", finished.stderr);
    // Nothing but spans and the one line on stdout.
    assert_eq!(finished.stdout, format!("listening on {}\n", port));
    let served = finished.spans;
    assert_eq!(served.len(), 3, "{served:#?}");
    for ((server_span, client_span), (path, code)) in
        served
            .iter()
            .zip(&calls)
            .zip([("/hello", 200), ("/fail", 500), ("/nowhere", 404)])
    {
        assert_eq!(server_span.kind, "SERVER", "{server_span:?}");
        assert_eq!(server_span.attr_str("url.path"), Some(path));
        assert_eq!(
            server_span.attr_i64("http.response.status_code"),
            Some(code)
        );
        // W3C propagation: the same trace, the client's span as the parent.
        assert_eq!(server_span.trace_id, client_span.trace_id);
        assert_eq!(
            server_span.parent_span_id.as_deref(),
            Some(client_span.span_id.as_str()),
            "{server_span:?} is not the child of {client_span:?}"
        );
        assert!(server_span.parent_is_remote, "{server_span:?}");
        let traceparent = server_span.received_traceparent().unwrap_or_default();
        assert!(
            traceparent.starts_with(&format!(
                "00-{}-{}-",
                client_span.trace_id, client_span.span_id
            )),
            "{traceparent:?}"
        );
        // A server's 5xx is an error, its 4xx is not.
        let status = if code >= 500 { "ERROR" } else { "UNSET" };
        assert_eq!(server_span.status, status, "{server_span:?}");
    }
    assert_eq!(served[0].name, "GET /hello");
    assert_eq!(served[1].name, "GET /fail");
}

/// The Python client against an `http_server` fixture: status codes by
/// path, every request on one keep-alive connection (the server ends after
/// one), the bodies echoing method and path.
fn python_client_against(file: &str, profile: Profile) {
    let server = HttpServer::start_fixture(file, Linking::Pie, profile, Some(1));
    let urls = vec![
        server.url("/hello"),
        server.url("/error"),
        server.url("/missing"),
        format!("POST {}", server.url("/orders?id=7")),
        server.url("/error?again=1"),
    ];
    let spans = PythonPeer::run_client(&urls);
    let calls = client_spans(&spans, &urls);
    for (span, code) in calls.iter().zip([200, 500, 404, 200, 500]) {
        assert_client_status(span, code);
        assert_eq!(span.attr_i64("server.port"), Some(i64::from(server.port())));
    }
    let finished = server.wait();
    assert!(
        finished.status.success(),
        "{file} {profile:?}: {}",
        finished.stderr
    );
    assert!(
        finished.stderr.contains("http_server: 1 connections"),
        "{file} {profile:?}: {}",
        finished.stderr
    );
    assert!(finished.spans.is_empty());
}

#[test]
fn python_client_to_c_server() {
    for profile in PROFILES {
        python_client_against("c/http_server.c", profile);
    }
}

#[test]
fn python_client_to_rust_server() {
    for profile in PROFILES {
        python_client_against("rust/http_server.rs", profile);
    }
}

/// Reads from `stream` until it closes.
fn read_to_close(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .expect("the server closes the connection");
    String::from_utf8(bytes).unwrap()
}

fn response(status: &str, body: &str, connection: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        body.len()
    )
}

/// Two pipelined requests sent in pieces that cut the request line, a
/// header and the body: both answered, in order, byte for byte; then a
/// malformed request: 400 and closed.
fn split_and_pipelined(server: &PeerProcess) {
    let requests = "GET /first HTTP/1.1\r\nHost: x\r\n\r\n\
                    POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world";
    let mut stream = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    stream.set_nodelay(true).unwrap();
    for piece in [
        &requests[..7],
        &requests[7..40],
        &requests[40..110],
        &requests[110..],
    ] {
        stream.write_all(piece.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(
        read_to_close(&mut stream),
        response("200 OK", "GET /first\n", "keep-alive")
            + &response("200 OK", "POST /second\n", "close")
    );

    let mut stream = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    stream.write_all(b"NONSENSE\r\n\r\n").unwrap();
    let answer = read_to_close(&mut stream);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer:?}"
    );
}

#[test]
fn servers_take_split_and_pipelined_requests() {
    for file in ["c/http_server.c", "rust/http_server.rs"] {
        for profile in [Profile::Debug, Profile::ReleaseLto] {
            let server = HttpServer::start_fixture(file, Linking::Pie, profile, Some(2));
            split_and_pipelined(&server);
            let finished = server.wait();
            assert!(finished.status.success(), "{file}: {}", finished.stderr);
            assert!(finished.stderr.contains("http_server: 2 connections"));
        }
    }
}

#[test]
fn c_client_keep_alive_against_c_server() {
    let client = build_as("c/http_client.c", Linking::Pie, Profile::Release);
    let requests = [
        "GET /a",
        "POST /b some body",
        "GET /error",
        "GET /missing",
        "HEAD /c",
    ];
    for profile in PROFILES {
        let server = HttpServer::start_fixture("c/http_server.c", Linking::Pie, profile, Some(1));
        let run = HttpClient::run(&client, server.port(), &requests, &[]);
        assert!(run.status.success(), "{profile:?}: {}", run.stderr);
        assert_eq!(
            run.status_lines,
            [
                "HTTP/1.1 200 OK",
                "HTTP/1.1 200 OK",
                "HTTP/1.1 500 Internal Server Error",
                "HTTP/1.1 404 Not Found",
                "HTTP/1.1 200 OK",
            ]
        );
        assert_eq!(run.codes(), [200, 200, 500, 404, 200]);
        assert_eq!(
            run.stderr,
            "GET /a\nPOST /b\nfailed GET /error\nnot found GET /missing\n"
        );
        let finished = server.wait();
        assert!(finished.status.success(), "{}", finished.stderr);
        assert!(finished.stderr.contains("http_server: 1 connections"));
    }
}

/// The C client's options, every system call pair of both fixtures: the C
/// server dumps what it received, which must be the client's requests byte
/// for byte, its own `traceparent`s after 5 KiB of padding.
#[test]
fn c_client_options_reach_the_c_server_exactly() {
    let client = build_as("c/http_client.c", Linking::Pie, Profile::Debug);
    let server_exe = build_as("c/http_server.c", Linking::Pie, Profile::Release);
    let dir = scratch_dir("http-peers-dump");
    let parents = [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319d-00f067aa0ba902b7-00",
    ];
    for (n, io) in ["read", "recv", "vec", "msg"].into_iter().enumerate() {
        let dump = dir.join(format!("{io}.dump"));
        let mut command = HttpServer::command(&server_exe, Some(1));
        command
            .env("HTTP_FIXTURE_IO", io)
            .env("HTTP_SERVER_DUMP", &dump);
        let server = PeerProcess::start(command);
        let split = if n % 2 == 0 { "1" } else { "0" };
        let run = HttpClient::run(
            &client,
            server.port(),
            &["GET /one", "POST /two", "GET /three"],
            &[
                ("HTTP_FIXTURE_IO", io),
                ("HTTP_CLIENT_TRACEPARENT", &parents.join(" ")),
                ("HTTP_CLIENT_PAD", "5120"),
                ("HTTP_CLIENT_SPLIT", split),
                ("HTTP_CLIENT_EPOLL", "1"),
            ],
        );
        assert!(run.status.success(), "{io}: {}", run.stderr);
        assert_eq!(run.codes(), [200, 200, 200], "{io}");
        let finished = server.wait();
        assert!(finished.status.success(), "{io}: {}", finished.stderr);
        let received = std::fs::read_to_string(&dump).unwrap();
        let requests: Vec<&str> = received
            .split_inclusive("\r\n\r\n")
            .filter(|part| part.contains(" HTTP/1.1\r\n"))
            .collect();
        assert_eq!(requests.len(), 3, "{io}: {received}");
        for (request, (line, parent)) in requests.iter().zip([
            ("GET /one HTTP/1.1", parents[0]),
            ("POST /two HTTP/1.1", parents[1]),
            ("GET /three HTTP/1.1", parents[1]),
        ]) {
            let request = request.trim_start_matches("hello");
            assert!(
                request.starts_with(&format!("{line}\r\n")),
                "{io}: {request}"
            );
            let at_parent = request
                .find(&format!("\r\ntraceparent: {parent}\r\n"))
                .unwrap_or_else(|| panic!("{io}: no traceparent {parent} in {request}"));
            assert!(at_parent > 5000, "{io}: padding first");
            assert_eq!(request.matches("traceparent").count(), 1, "{io}");
        }
        assert!(requests[2].contains("Connection: close\r\n"));
        assert!(received.contains("Content-Length: 5\r\n\r\nhello"), "{io}");
    }
}

/// The C client's own `traceparent`s (a program with its own SDK) are
/// continued by the Python server, request by request; the client opens a
/// new connection after each of Werkzeug's `Connection: close`.
#[test]
fn c_client_traceparent_continued_by_python_server() {
    let client = build_as("c/http_client.c", Linking::Pie, Profile::Debug);
    let server = PythonPeer::server_for(0, 3);
    let parents = [
        ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
        ("5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7"),
        ("6bf92f3577b34da6a3ce929d0e0e4736", "20f067aa0ba902b7"),
    ];
    let values: Vec<String> = parents
        .iter()
        .map(|(trace, span)| format!("00-{trace}-{span}-01"))
        .collect();
    let run = HttpClient::run(
        &client,
        server.port(),
        &["GET /hello", "POST /fail", "GET /hello"],
        &[("HTTP_CLIENT_TRACEPARENT", &values.join(" "))],
    );
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.codes(), [200, 500, 200]);
    let finished = server.wait();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert_eq!(finished.spans.len(), 3, "{:#?}", finished.spans);
    for (span, (trace, parent)) in finished.spans.iter().zip(parents) {
        assert_eq!(span.kind, "SERVER");
        assert_eq!(span.trace_id, trace, "{span:?}");
        assert_eq!(span.parent_span_id.as_deref(), Some(parent), "{span:?}");
        assert!(span.parent_is_remote);
    }
    assert_eq!(finished.spans[1].status, "ERROR");
}

/// Python client -> Python relay -> C server: one trace through both
/// Python processes, the relay's CLIENT span the child of its SERVER span,
/// the C server's statuses relayed.
#[test]
fn python_relay_calls_c_server() {
    let c_server = HttpServer::start_fixture("c/http_server.c", Linking::Pie, Profile::Debug, None);
    let relay = PythonPeer::relay_for(0, &c_server.url(""), 3);
    let urls = vec![
        relay.url("/relay/hello"),
        relay.url("/relay/error"),
        format!("POST {}", relay.url("/relay/missing?x=1")),
    ];
    let spans = PythonPeer::run_client(&urls);
    let calls = client_spans(&spans, &urls);
    for (span, code) in calls.iter().zip([200, 500, 404]) {
        assert_client_status(span, code);
    }
    let finished = relay.wait();
    assert!(finished.status.success(), "{}", finished.stderr);
    let relay_servers: Vec<&PeerSpan> = finished
        .spans
        .iter()
        .filter(|s| s.kind == "SERVER")
        .collect();
    let relay_clients: Vec<&PeerSpan> = finished
        .spans
        .iter()
        .filter(|s| s.kind == "CLIENT")
        .collect();
    assert_eq!(relay_servers.len(), 3, "{:#?}", finished.spans);
    assert_eq!(relay_clients.len(), 3, "{:#?}", finished.spans);
    for (((server_span, client_span), call), (path, code)) in relay_servers
        .iter()
        .zip(&relay_clients)
        .zip(&calls)
        .zip([("/hello", 200), ("/error", 500), ("/missing?x=1", 404)])
    {
        assert_eq!(server_span.trace_id, call.trace_id);
        assert_eq!(
            server_span.parent_span_id.as_deref(),
            Some(call.span_id.as_str())
        );
        assert_eq!(client_span.trace_id, call.trace_id);
        assert_eq!(
            client_span.parent_span_id.as_deref(),
            Some(server_span.span_id.as_str())
        );
        assert_eq!(
            client_span.attr_str("url.full"),
            Some(c_server.url(path).as_str())
        );
        assert_eq!(
            client_span.attr_i64("http.response.status_code"),
            Some(code)
        );
        assert_eq!(
            server_span.attr_i64("http.response.status_code"),
            Some(code)
        );
    }
    // SIGTERM ends the C server cleanly: every thread returns, status 0.
    let c_finished = c_server.terminate();
    assert!(c_finished.status.success(), "{c_finished:?}");
    assert!(
        c_finished.stderr.contains("http_server: 3 connections"),
        "{}",
        c_finished.stderr
    );
}

#[test]
fn missing_venv_says_what_to_do() {
    let dir = scratch_dir("no-venv");
    let message = python_otel_in(&dir).unwrap_err();
    assert!(message.contains("run `cargo xtask setup`"), "{message}");
    assert!(python_otel_in(Path::new("/nonexistent")).is_err());
}

/// SIGTERM ends both servers cleanly, an idle keep-alive connection open.
#[test]
fn sigterm_ends_servers_cleanly() {
    for file in ["c/http_server.c", "rust/http_server.rs"] {
        let server = HttpServer::start_fixture(file, Linking::Pie, Profile::Release, None);
        let mut stream = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        stream
            .write_all(b"GET /kept HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let expected = response("200 OK", "GET /kept\n", "keep-alive");
        let mut answer = vec![0u8; expected.len()];
        stream.read_exact(&mut answer).unwrap();
        assert_eq!(String::from_utf8(answer).unwrap(), expected);
        let finished = server.terminate();
        assert!(finished.status.success(), "{file}: {finished:?}");
        assert!(
            finished.stderr.contains("http_server: 1 connections"),
            "{file}: {}",
            finished.stderr
        );
        // The server closed the idle connection.
        assert_eq!(read_to_close(&mut stream), "");
    }
}

/// Two clients at once on both threaded servers: a connection kept open
/// (one request answered, the next not yet sent) while the C client makes
/// all its requests on another.
#[test]
fn two_clients_at_once_on_threaded_servers() {
    let client = build_as("c/http_client.c", Linking::Pie, Profile::Debug);
    for file in ["c/http_server.c", "rust/http_server.rs"] {
        let server = HttpServer::start_fixture(file, Linking::Pie, Profile::Debug, Some(2));
        let mut first = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        first
            .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let expected = response("200 OK", "GET /first\n", "keep-alive");
        let mut answer = vec![0u8; expected.len()];
        first.read_exact(&mut answer).unwrap();
        assert_eq!(String::from_utf8(answer).unwrap(), expected);

        let run = HttpClient::run(
            &client,
            server.port(),
            &["GET /one", "GET /error", "POST /two"],
            &[],
        );
        assert!(run.status.success(), "{file}: {}", run.stderr);
        assert_eq!(run.codes(), [200, 500, 200], "{file}");

        first
            .write_all(b"GET /missing HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        assert_eq!(
            read_to_close(&mut first),
            response("404 Not Found", "not found GET /missing\n", "close")
        );
        let finished = server.wait();
        assert!(finished.status.success(), "{file}: {}", finished.stderr);
        assert!(finished.stderr.contains("http_server: 2 connections"));
    }
}

/// A request that cannot connect: the client goes on, exits 1, and its
/// CLIENT span is an ERROR.
#[test]
fn python_client_connection_refused() {
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = PythonPeer::server_for(0, 1);
    let urls = vec![
        format!("http://127.0.0.1:{port}/nobody"),
        server.url("/hello"),
    ];
    let (status, spans, stderr) = PythonPeer::try_run_client(&urls);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let calls = client_spans(&spans, &urls);
    assert_eq!(calls[0].status, "ERROR", "{:?}", calls[0]);
    assert_eq!(calls[0].attr_i64("http.response.status_code"), None);
    assert_client_status(&calls[1], 200);
    assert!(server.wait().status.success());
}
