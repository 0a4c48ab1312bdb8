//! Real HTTP peers for the HTTP span tests (issue 8): the OpenTelemetry
//! Python peers of `tests/fixtures/python/otel_peer.py` (the SDK, Flask and
//! `requests` from PyPI, in the virtual environment `cargo xtask setup`
//! makes) and the `http_server` / `http_client` fixtures (C and Rust).
//!
//! A server of either kind prints `listening on PORT` once it listens:
//! [`PeerProcess::start`] waits for that line, so any command that ends in
//! such a server (the agent running one, too) can be started with it. The
//! Python peers write every span they finish as one JSON line on stdout,
//! read back as [`PeerSpan`]s.
//!
//! ```no_run
//! use omegi_tests::fixtures::{Linking, Profile};
//! use omegi_tests::peers::{HttpServer, PythonPeer};
//! let server = HttpServer::start_fixture("c/http_server.c", Linking::Pie, Profile::Debug, None);
//! let spans = PythonPeer::run_client(&[server.url("/hello"), server.url("/error")]);
//! let finished = server.terminate();
//! assert!(finished.status.success());
//! # let _ = spans;
//! ```
//!
//! A server traced by the agent is started the same way, since the agent
//! writes its spans to a file and leaves stdout to the program:
//!
//! ```no_run
//! # use omegi_tests::{fixtures::{build, Linking}, peers::PeerProcess, run::Agent};
//! # let agent = Agent::new("omegi-agent");
//! let spans_file = omegi_tests::scratch_dir("traced-server").join("spans.jsonl");
//! let mut command = agent.command(&[], &spans_file);
//! let exe = build("c/http_server.c", Linking::Pie);
//! command.arg("--").arg(&exe).args(["0", "1"]); // ends after one connection
//! let server = PeerProcess::start(command);
//! // ... requests to server.url("/hello") ...
//! let finished = server.wait();
//! ```

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::fixtures::{Linking, Profile};

/// How long a server may take to print `listening on PORT` (stretched by
/// [`crate::time_scale`]): Python with Flask and the SDK takes about a
/// second.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a peer may take to end once asked to, or a client to finish.
pub const END_TIMEOUT: Duration = Duration::from_secs(60);

/// One span that a Python peer finished, as its JSON line says.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct PeerSpan {
    pub name: String,
    /// `SERVER`, `CLIENT`, `INTERNAL`, …
    pub kind: String,
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// 16 lower-case hex digits.
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    /// Whether the parent came from another process (a `traceparent`).
    #[serde(default)]
    pub parent_is_remote: bool,
    /// `UNSET`, `OK` or `ERROR`.
    pub status: String,
    #[serde(default)]
    pub start_ns: u64,
    #[serde(default)]
    pub end_ns: u64,
    #[serde(default)]
    pub attributes: BTreeMap<String, serde_json::Value>,
}

impl PeerSpan {
    /// Attribute `key` as a string (the first one of a list of strings, as
    /// the captured `http.request.header.*` are).
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key)? {
            serde_json::Value::String(text) => Some(text),
            serde_json::Value::Array(values) => values.first()?.as_str(),
            _ => None,
        }
    }

    /// Attribute `key` as an integer.
    pub fn attr_i64(&self, key: &str) -> Option<i64> {
        self.attributes.get(key)?.as_i64()
    }

    /// The `traceparent` header the peer's server received, if any.
    pub fn received_traceparent(&self) -> Option<&str> {
        self.attr_str("http.request.header.traceparent")
    }
}

/// Parses a peer's JSON span lines (other lines are skipped).
pub fn parse_peer_spans(stdout: &str) -> Vec<PeerSpan> {
    stdout
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a peer span line that does not parse ({e}): {line}"))
        })
        .collect()
}

/// What a peer left once it ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    /// Its spans, in the order it finished them.
    pub spans: Vec<PeerSpan>,
    /// Its other stdout lines (`listening on PORT`, status lines, …).
    pub stdout: String,
    pub stderr: String,
}

/// A running server: started, listening, and read from as it runs. Dropping
/// it kills it.
pub struct PeerProcess {
    child: Child,
    port: u16,
    shown: String,
    spans: Arc<Mutex<Vec<PeerSpan>>>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl PeerProcess {
    /// Starts `command`, which must print `listening on PORT` on stdout
    /// within [`LISTEN_TIMEOUT`]; panics, with what it wrote on stderr,
    /// when it ends or takes longer.
    pub fn start(mut command: Command) -> PeerProcess {
        let shown = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (port_sender, port_receiver) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        let out_reader = {
            let (spans, stdout, shown) = (spans.clone(), stdout.clone(), shown.clone());
            std::thread::spawn(move || {
                for line in out.lines() {
                    let Ok(line) = line else { break };
                    if line.starts_with('{') {
                        match serde_json::from_str::<PeerSpan>(&line) {
                            Ok(span) => spans.lock().unwrap().push(span),
                            Err(e) => eprintln!(
                                "peers: {shown}: a span line that does not parse ({e}): {line}"
                            ),
                        }
                        continue;
                    }
                    if let Some(port) = line
                        .strip_prefix("listening on ")
                        .and_then(|port| port.trim().parse::<u16>().ok())
                    {
                        let _ = port_sender.send(port);
                    }
                    let mut stdout = stdout.lock().unwrap();
                    stdout.push_str(&line);
                    stdout.push('\n');
                }
            })
        };
        let mut err = child.stderr.take().unwrap();
        let err_reader = {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = err.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    stderr
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            })
        };
        let mut process = PeerProcess {
            child,
            port: 0,
            shown,
            spans,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        };
        let deadline = Instant::now() + crate::scaled(LISTEN_TIMEOUT);
        loop {
            match port_receiver.recv_timeout(Duration::from_millis(50)) {
                Ok(port) => {
                    process.port = port;
                    return process;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = process.child.wait();
                    std::thread::sleep(Duration::from_millis(50));
                    panic!(
                        "{} ended before it listened ({:?}):\n{}",
                        process.shown,
                        process.child.try_wait(),
                        process.stderr()
                    );
                }
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                // Its last lines may still be on their way.
                if let Ok(port) = port_receiver.recv_timeout(Duration::from_millis(200)) {
                    process.port = port;
                    return process;
                }
                panic!(
                    "{} ended ({status}) before it listened:\n{}",
                    process.shown,
                    process.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not print `listening on PORT` within {:?}:\n{}",
                    process.shown,
                    crate::scaled(LISTEN_TIMEOUT),
                    process.stderr()
                );
            }
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:PORT` followed by `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The spans it has written so far.
    pub fn spans(&self) -> Vec<PeerSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until it has written at least `count` spans (a request's
    /// SERVER span is written just after its response), and returns them
    /// all; panics after `timeout` (stretched by [`crate::time_scale`]).
    pub fn wait_for_spans(&self, count: usize, timeout: Duration) -> Vec<PeerSpan> {
        let deadline = Instant::now() + crate::scaled(timeout);
        loop {
            let spans = self.spans();
            if spans.len() >= count {
                return spans;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: {} spans after {:?}, {count} expected: {spans:#?}\nstderr:\n{}",
                    self.shown,
                    spans.len(),
                    crate::scaled(timeout),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it has written on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Asks it to end with SIGTERM and waits for it (killed after
    /// [`END_TIMEOUT`], which fails the test).
    pub fn terminate(self) -> Finished {
        // SAFETY: kill has no memory preconditions; the pid is our child's,
        // not yet waited for.
        unsafe { libc_kill(self.child.id() as i32, SIGTERM) };
        self.finish()
    }

    /// Waits for it to end by itself (a server given a number of requests
    /// or connections), [`END_TIMEOUT`] at most, after which the test fails.
    pub fn wait(self) -> Finished {
        self.finish()
    }

    fn finish(mut self) -> Finished {
        let status = crate::run::wait_with_timeout(&mut self.child, END_TIMEOUT);
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let Some(status) = status else {
            panic!(
                "{} did not end within {:?} (killed):\n{}",
                self.shown,
                crate::scaled(END_TIMEOUT),
                self.stderr()
            );
        };
        Finished {
            status,
            spans: self.spans(),
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

const SIGTERM: i32 = 15;

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

/// The virtual environment of the Python peers: `OMEGI_PYTHON_OTEL` (set
/// by `cargo xtask test`), else `python-otel` in the tools directory
/// (`OMEGI_TOOLS_DIR`, or `~/.local/share/omegi-tools`), as `cargo xtask
/// setup` makes it.
pub fn python_otel_dir() -> PathBuf {
    if let Some(path) = std::env::var_os("OMEGI_PYTHON_OTEL") {
        return PathBuf::from(path);
    }
    crate::tools_dir().join("python-otel")
}

/// The Python peers' interpreter; panics with what to do when the virtual
/// environment is missing.
pub fn python_otel() -> PathBuf {
    python_otel_in(&python_otel_dir()).unwrap_or_else(|message| panic!("{message}"))
}

/// The interpreter of the virtual environment `dir`, or why there is none
/// to use (`cargo xtask setup` writes `omegi-requirements.txt` last).
pub fn python_otel_in(dir: &Path) -> Result<PathBuf, String> {
    let python = dir.join("bin/python");
    if python.exists() && dir.join("omegi-requirements.txt").exists() {
        return Ok(python);
    }
    Err(format!(
        "the OpenTelemetry Python peers are not installed in {}: run `cargo xtask setup` \
         (or set OMEGI_PYTHON_OTEL to such a virtual environment)",
        dir.display()
    ))
}

/// `tests/fixtures/python/otel_peer.py`.
pub fn peer_script() -> PathBuf {
    crate::fixtures::sources_dir().join("python/otel_peer.py")
}

/// The OpenTelemetry Python peers (`otel_peer.py`).
pub struct PythonPeer;

impl PythonPeer {
    /// `python otel_peer.py ARGS…`, unbuffered.
    pub fn command<S: AsRef<OsStr>>(args: &[S]) -> Command {
        let mut command = Command::new(python_otel());
        command
            .arg(peer_script())
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        command
    }

    /// A Flask server on `port` (0: any free one): `/hello` 200, `/fail`
    /// 500, anything else 404; until [`PeerProcess::terminate`].
    pub fn server(port: u16) -> PeerProcess {
        PeerProcess::start(Self::command(&["server".to_owned(), port.to_string()]))
    }

    /// The same server, which ends by itself after `requests` requests
    /// ([`PeerProcess::wait`]).
    pub fn server_for(port: u16, requests: usize) -> PeerProcess {
        PeerProcess::start(Self::command(&[
            "server".to_owned(),
            port.to_string(),
            "--requests".to_owned(),
            requests.to_string(),
        ]))
    }

    /// A Flask server on `port` whose `/relay/REST` calls
    /// `downstream/REST` (e.g. `http://127.0.0.1:8080`) with instrumented
    /// `requests` and answers with its status.
    pub fn relay(port: u16, downstream: &str) -> PeerProcess {
        PeerProcess::start(Self::command(&[
            "relay".to_owned(),
            port.to_string(),
            downstream.to_owned(),
        ]))
    }

    /// The relay, ending by itself after `requests` requests.
    pub fn relay_for(port: u16, downstream: &str, requests: usize) -> PeerProcess {
        PeerProcess::start(Self::command(&[
            "relay".to_owned(),
            port.to_string(),
            downstream.to_owned(),
            "--requests".to_owned(),
            requests.to_string(),
        ]))
    }

    /// The client's command: one request per URL (`URL` or `METHOD URL`),
    /// on one `requests` session, inside one INTERNAL span `client-run`.
    pub fn client_command<S: AsRef<str>>(urls: &[S]) -> Command {
        let mut args = vec!["client".to_owned()];
        args.extend(urls.iter().map(|url| url.as_ref().to_owned()));
        Self::command(&args)
    }

    /// Runs the client to its end and returns its spans: a CLIENT span per
    /// request, then `client-run`. Panics when it fails (a request that
    /// could not be made) or takes longer than [`END_TIMEOUT`].
    pub fn run_client<S: AsRef<str>>(urls: &[S]) -> Vec<PeerSpan> {
        let (status, spans, stderr) = Self::try_run_client(urls);
        assert!(
            status.success(),
            "the Python client failed ({status}):\n{stderr}"
        );
        spans
    }

    /// Runs the client to its end, whatever its status (1 when a request
    /// could not be made: its CLIENT span is then an ERROR): the status,
    /// its spans and its stderr.
    pub fn try_run_client<S: AsRef<str>>(urls: &[S]) -> (ExitStatus, Vec<PeerSpan>, String) {
        let command = Self::client_command(urls);
        let shown = format!("{command:?}");
        let (status, stdout, stderr) = run_bounded(command, END_TIMEOUT);
        let spans = parse_peer_spans(&stdout);
        assert_eq!(
            stdout.lines().count(),
            spans.len(),
            "{shown}: stdout has lines other than spans:\n{stdout}"
        );
        (status, spans, stderr)
    }
}

/// [`PythonPeer::run_client`]: the client's spans, a CLIENT span per
/// request, then `client-run`.
pub fn run_client<S: AsRef<str>>(urls: &[S]) -> Vec<PeerSpan> {
    PythonPeer::run_client(urls)
}

/// The `http_server` fixtures (`c/http_server.c`, `rust/http_server.rs`).
pub struct HttpServer;

impl HttpServer {
    /// `exe 0 [CONNECTIONS]`: any free port; ends by itself after
    /// `connections` connections have closed, else at SIGTERM
    /// ([`PeerProcess::terminate`]), cleanly: open connections are shut
    /// down, every thread returns, and it exits 0.
    pub fn command(exe: &Path, connections: Option<usize>) -> Command {
        let mut command = Command::new(exe);
        command.arg("0");
        if let Some(connections) = connections {
            command.arg(connections.to_string());
        }
        command
    }

    /// Starts `exe` and waits until it listens.
    pub fn start(exe: &Path, connections: Option<usize>) -> PeerProcess {
        PeerProcess::start(Self::command(exe, connections))
    }

    /// Builds fixture `file` (`c/http_server.c` or `rust/http_server.rs`)
    /// and starts it.
    pub fn start_fixture(
        file: &str,
        linking: Linking,
        profile: Profile,
        connections: Option<usize>,
    ) -> PeerProcess {
        Self::start(
            &crate::fixtures::build_as(file, linking, profile),
            connections,
        )
    }
}

/// What `http_client` printed.
#[derive(Debug)]
pub struct ClientRun {
    pub status: ExitStatus,
    /// Its status lines (`HTTP/1.1 200 OK`), one per response read.
    pub status_lines: Vec<String>,
    /// The response bodies and its messages.
    pub stderr: String,
}

impl ClientRun {
    /// The status codes of the responses, in order.
    pub fn codes(&self) -> Vec<u16> {
        self.status_lines
            .iter()
            .filter_map(|line| line.split(' ').nth(1)?.parse().ok())
            .collect()
    }
}

/// The C `http_client` fixture.
pub struct HttpClient;

impl HttpClient {
    /// `exe PORT REQUEST…` with `env` (`HTTP_CLIENT_TRACEPARENT`,
    /// `HTTP_CLIENT_PAD`, `HTTP_CLIENT_SPLIT`, `HTTP_CLIENT_EPOLL`,
    /// `HTTP_FIXTURE_IO`: see the fixture); each request is
    /// `METHOD PATH [BODY]`.
    pub fn command(exe: &Path, port: u16, requests: &[&str], env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(exe);
        command.arg(port.to_string()).args(requests);
        for (key, value) in env {
            command.env(key, value);
        }
        command
    }

    /// Runs it to its end ([`END_TIMEOUT`] at most).
    pub fn run(exe: &Path, port: u16, requests: &[&str], env: &[(&str, &str)]) -> ClientRun {
        let (status, stdout, stderr) =
            run_bounded(Self::command(exe, port, requests, env), END_TIMEOUT);
        ClientRun {
            status,
            status_lines: stdout.lines().map(str::to_owned).collect(),
            stderr,
        }
    }
}

/// Runs `command` to its end with piped output; panics after `timeout`
/// (stretched by [`crate::time_scale`]).
fn run_bounded(mut command: Command, timeout: Duration) -> (ExitStatus, String, String) {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let status = crate::run::wait_with_timeout(&mut child, timeout);
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let status = status.unwrap_or_else(|| {
        panic!(
            "{shown} did not finish within {:?}:\n{stderr}",
            crate::scaled(timeout)
        )
    });
    (status, stdout, stderr)
}
