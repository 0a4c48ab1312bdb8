//! Python (issue 11): unmodified CPython interpreters traced through their
//! eval function, on every version and build this machine has: pyenv's
//! 3.10–3.13 (shared libpython, from source) and Debian's `python3.11`
//! (stripped, libpython linked in). The fixture is the package in
//! `tests/fixtures/python/app`; its call trees are asserted exactly.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use omegi_tests::{
    run::{self, refused, Agent},
    spans::{self, parse_lines, traces, SpanRecord},
};

fn agent_bin() -> &'static str {
    Agent::new(env!("CARGO_BIN_EXE_omegi-agent"));
    env!("CARGO_BIN_EXE_omegi-agent")
}

/// The fixture package: the project root of these tests.
fn app() -> PathBuf {
    omegi_tests::fixtures::sources_dir().join("python/app")
}

/// A CPython interpreter here, and its minor version.
struct Interpreter {
    path: PathBuf,
    minor: u8,
    label: String,
    /// In a shared libpython (pyenv's), not linked in (Debian's).
    shared: bool,
}

/// Whether this kernel has attach cookies (5.15+): without them a probe is
/// found by its address in the executable, and an interpreter in a shared
/// library is refused.
fn kernel_has_attach_cookies() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse::<u32>().ok());
    let (major, minor) = (numbers.next().unwrap(), numbers.next().unwrap());
    (major, minor) >= (5, 15)
}

/// The one line a shared-library interpreter gets without attach cookies.
fn refused_without_cookies(python: &Interpreter, extra: &[&str]) {
    let mut command = agent(extra, Path::new("/dev/null"));
    command.arg("--").arg(&python.path).args(["-c", "pass"]);
    let line = refused(command);
    let library = python
        .path
        .parent()
        .unwrap()
        .join(format!("../lib/libpython3.{}.so.1.0", python.minor));
    let library = std::fs::canonicalize(library).unwrap();
    assert!(
        line.starts_with("omegi-agent: error: this kernel (")
            && line.ends_with(&format!(
                "has no attach cookies (Linux 5.15+), which tracing a Python interpreter in a \
                 shared library ({}) needs",
                library.display()
            )),
        "{line}"
    );
}

/// Where pyenv keeps its Pythons.
fn pyenv_versions() -> PathBuf {
    std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".pyenv"))
        .join("versions")
}

/// pyenv's newest `MAJOR.MINOR.*`.
fn pyenv_home(version: &str) -> PathBuf {
    let versions = pyenv_versions();
    let mut homes: Vec<PathBuf> = std::fs::read_dir(&versions)
        .unwrap_or_else(|error| panic!("pyenv's versions in {}: {error}", versions.display()))
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&format!("{version}.")))
        })
        .collect();
    homes.sort();
    homes
        .pop()
        .unwrap_or_else(|| panic!("pyenv has no Python {version} in {}", versions.display()))
}

/// pyenv's 3.10–3.13 and Debian's python3.11: all must be here.
fn interpreters() -> Vec<Interpreter> {
    let mut found = Vec::new();
    for minor in 10..=13u8 {
        let home = pyenv_home(&format!("3.{minor}"));
        found.push(Interpreter {
            path: home.join(format!("bin/python3.{minor}")),
            minor,
            label: format!("pyenv {}", home.display()),
            shared: true,
        });
    }
    let debian = PathBuf::from("/usr/bin/python3.11");
    assert!(debian.exists(), "Debian's python3.11 is not installed");
    found.push(Interpreter {
        path: debian,
        minor: 11,
        label: "Debian python3.11".into(),
        shared: false,
    });
    found
}

/// The first interpreter of 3.`at_least` or later that this kernel can
/// trace (without attach cookies, only one linked into its executable).
fn traceable_here(at_least: u8) -> Interpreter {
    let cookies = kernel_has_attach_cookies();
    interpreters()
        .into_iter()
        .find(|python| python.minor >= at_least && (cookies || !python.shared))
        .expect("an interpreter this kernel can trace")
}

/// Reads lines of `reader` until one holds `needle`; all it read.
fn read_until(reader: &mut impl BufRead, needle: &str) -> String {
    let mut said = String::new();
    while !said.contains(needle) {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "{said}");
        said.push_str(&line);
    }
    said
}

/// `omegi-agent --project-root APP --format json --output FILE
/// --split-after 0 [extra]`.
fn agent(extra: &[&str], spans_file: &Path) -> Command {
    let mut command = Command::new(agent_bin());
    command
        .arg("--project-root")
        .arg(app())
        .args(["--format", "json", "--output"])
        .arg(spans_file)
        // One trace per outermost call, however slow the machine: under
        // emulation the module's imports alone take longer than the
        // default split (its own tests are elsewhere).
        .args(["--split-after", "0"])
        .args(extra);
    command
}

/// `work()`'s calls, as each version names them (3.10's code objects have
/// no qualified name: a method is named without its class). A generator
/// (`prices`, resumed by `list`; again, left after one `next` and closed)
/// and each coroutine (`place` awaiting
/// `reserve` twice, each suspending on the way) is one call, however many
/// resumes it took. `init`: whether `Cart.__init__` is seen (see the 3.13
/// case below).
fn work_shape(minor: u8, init: bool) -> String {
    let method = |name: &str| {
        if minor == 10 {
            format!("shop.cart.{name}")
        } else {
            format!("shop.cart.Cart.{name}")
        }
    };
    let init = if init {
        format!("{} ", method("__init__"))
    } else {
        String::new()
    };
    format!(
        "main.work({init}{add} {add} shop.cart.by_price shop.cart.by_price shop.cart.prices \
         shop.cart.prices {ORDERS} {total} \
         shop.cart.fib(shop.cart.fib(shop.cart.fib shop.cart.fib) shop.cart.fib) \
         shop.payments.checkout({total} shop.payments.charge))",
        add = method("add"),
        total = method("total"),
    )
}

/// The imports the module runs before `work()`.
const IMPORTS: &str = "shop.<module> shop.cart.<module>(shop.cart.Cart) shop.orders.<module> \
    shop.payments.<module>(shop.errors.<module>(shop.errors.PaymentDeclined))";

/// `work()`'s orders: `place` awaiting `reserve` twice.
const ORDERS: &str = "shop.orders.place(shop.orders.reserve shop.orders.reserve)";

/// The module's last call, `place([5])` under an event loop that no traced
/// call runs.
const LAST_ORDER: &str = "shop.orders.place(shop.orders.reserve)";

/// Each `work()` trace has one error: the payment declined in `charge`,
/// caught by `checkout`.
fn check_caught_payment(spans: &[SpanRecord], label: &str) {
    let errors: Vec<(String, String, Vec<String>, String)> = spans::exceptions(spans)
        .into_iter()
        .map(|(_, event)| {
            (
                event.text("exception.type"),
                event.text("exception.message"),
                event.flow(),
                event.text("omegi.error.outcome"),
            )
        })
        .collect();
    let caught = (
        "shop.errors.PaymentDeclined".to_owned(),
        "card declined".to_owned(),
        vec!["shop.payments.charge".to_owned()],
        "caught in shop.payments.checkout".to_owned(),
    );
    assert_eq!(errors, vec![caught.clone(), caught], "{label}");
    // In Python's traceback format, with the line of the `raise`.
    let payments = app().join("shop/payments.py");
    let stacktrace = format!(
        "Traceback (most recent call last):\n  File \"{}\", line 6, in charge\n    \
         raise PaymentDeclined(\"card declined\")\nshop.errors.PaymentDeclined: card declined",
        payments.display()
    );
    for (_, event) in spans::exceptions(spans) {
        assert_eq!(event.text("exception.stacktrace"), stacktrace, "{label}");
    }
    let charges: Vec<&SpanRecord> = spans
        .iter()
        .filter(|span| span.name == "shop.payments.charge")
        .collect();
    assert!(charges.iter().all(|span| span.is_error()), "{label}");
    assert!(
        spans
            .iter()
            .filter(|span| span.name == "shop.payments.checkout")
            .all(|span| !span.is_error()),
        "{label}"
    );
}

/// Every Python call under the project root, on every version and build:
/// 3.10 needs nothing (every call enters the eval function); 3.11+ gets the
/// eval hook, in a running process (`--pid`). The program's output is its
/// untraced output, and the hook is set back when the agent detaches.
#[test]
fn every_call_traced_on_every_version_and_build() {
    let cookies = kernel_has_attach_cookies();
    for python in interpreters() {
        let label = &python.label;
        if python.shared && !cookies {
            refused_without_cookies(&python, &[]);
            continue;
        }
        let script = app().join("main.py");
        let plain = run::untraced(&python.path, &[&script]);
        let dir = omegi_tests::scratch_dir("python-every-call");
        let spans_file = dir.join("spans.jsonl");
        let (status, stdout) = if python.minor == 10 {
            let mut command = agent(&["--quiet"], &spans_file);
            command.arg("--").arg(&python.path).arg(&script);
            let (status, stdout, stderr) = run::run_to_end(command);
            assert_eq!(stderr, "", "{label}");
            (status, stdout)
        } else {
            trace_running(&python.path, &script, &spans_file)
        };
        assert_eq!(status.code(), plain.status.code(), "{label}");
        let expected_output = String::from_utf8_lossy(&plain.stdout);
        assert!(stdout.ends_with(&*expected_output), "{label}: {stdout}");
        let spans = parse_lines(&std::fs::read_to_string(&spans_file).unwrap());
        let mut shapes: Vec<String> = traces(&spans)
            .iter()
            .map(|trace| {
                trace.check_well_formed();
                trace.shape()
            })
            .collect();
        shapes.sort();
        let work = work_shape(python.minor, true);
        // 3.13 specialises a class's call into one that runs `__init__`
        // inline (CALL_ALLOC_AND_ENTER_INIT) without checking for an eval
        // hook: from the second call at a place, `__init__` is not seen.
        let again = work_shape(python.minor, python.minor != 13);
        let mut expected = if python.minor == 10 {
            // Started by the agent: the module's own call is seen too.
            vec![
                format!("main.<module>({IMPORTS} {work} {LAST_ORDER})"),
                again,
            ]
        } else {
            // Attached while the module waited: its call began before, and
            // each step of the last order's task began a trace of its own
            // (they are one call, in the first step's trace).
            vec![work.clone(), again, LAST_ORDER.to_owned()]
        };
        expected.sort();
        assert_eq!(shapes, expected, "{label}");
        check_caught_payment(&spans, label);
        let first = spans
            .iter()
            .find(|s| s.name == "shop.payments.charge")
            .unwrap();
        assert_eq!(
            first.attr("code.filepath").as_deref(),
            app().join("shop/payments.py").to_str(),
            "{label}"
        );
        assert_eq!(first.attr("code.lineno").as_deref(), Some("4"), "{label}");
        // The seed's attributes: the module, and the name in it.
        assert_eq!(
            first.attr("module").as_deref(),
            Some("shop.payments"),
            "{label}"
        );
        assert_eq!(first.attr("name").as_deref(), Some("charge"), "{label}");
        let total = spans.iter().find(|s| s.name.ends_with(".total")).unwrap();
        let expected_name = if python.minor == 10 {
            "total"
        } else {
            "Cart.total"
        };
        assert_eq!(
            total.attr("name").as_deref(),
            Some(expected_name),
            "{label}"
        );
    }
}

/// Starts `main.py wait` under `python`, attaches `--pid` with the eval
/// hook, lets it run once the hook is set, and waits for both to end.
fn trace_running(
    python: &Path,
    script: &Path,
    spans_file: &Path,
) -> (std::process::ExitStatus, String) {
    let mut program = Command::new(python)
        .arg(script)
        .arg("wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut output = BufReader::new(program.stdout.take().unwrap());
    let mut ready = String::new();
    output.read_line(&mut ready).unwrap();
    assert_eq!(ready, "ready\n");
    let mut agent = agent(&["--python-eval-hook"], spans_file)
        .arg("--pid")
        .arg(program.id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, hooked) = mpsc::channel();
    let stderr = BufReader::new(agent.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("eval hook set in process") {
                let _ = lines.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if hooked
        .recv_timeout(omegi_tests::scaled(Duration::from_secs(60)))
        .is_err()
    {
        let _ = program.kill();
        let _ = agent.kill();
        panic!("the agent set no eval hook:\n{}", reader.join().unwrap());
    }
    let mut input = program.stdin.take().unwrap();
    input.write_all(b"go\n").unwrap();
    // Like a server, it lives on after the calls: the agent reads what it
    // cannot read in the kernel (an exception's module) while it does.
    let deadline = std::time::Instant::now() + omegi_tests::scaled(Duration::from_secs(60));
    let complete_lines = || {
        let text = std::fs::read_to_string(spans_file).unwrap_or_default();
        parse_lines(text.rfind('\n').map_or("", |end| &text[..=end]))
    };
    while spans::exceptions(&complete_lines()).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no error traces came");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(input);
    let status = run::wait_with_timeout(&mut program, run::RUN_TIMEOUT).expect("program ends");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut output, &mut rest).unwrap();
    let agent_status = run::wait_with_timeout(&mut agent, run::RUN_TIMEOUT).expect("agent ends");
    let agent_stderr = reader.join().unwrap();
    assert!(agent_status.success(), "{agent_stderr}");
    assert!(!agent_stderr.contains("warning"), "{agent_stderr}");
    (status, format!("ready\n{rest}"))
}

/// With no eval hook, 3.12 runs Python-to-Python calls inside the caller's
/// eval loop: only calls made from C are seen (the module's, imports, a
/// class body, `__init__` from the type's call, `sorted`'s key function,
/// `list` resuming a generator, an event loop's steps of a coroutine but
/// not the coroutine it awaits), under the nearest traced caller, and the
/// agent says so in one line.
#[test]
fn without_the_eval_hook_calls_made_from_c_are_traced() {
    if !kernel_has_attach_cookies() {
        // 3.12 is a shared libpython here, refused on such kernels; the
        // static 3.11 without the hook is the test for those.
        eprintln!("no attach cookies: see without_attach_cookies_…");
        return;
    }
    let python = interpreters()
        .into_iter()
        .find(|python| python.minor == 12)
        .unwrap();
    let dir = omegi_tests::scratch_dir("python-no-hook");
    let spans_file = dir.join("spans.jsonl");
    let mut command = agent(&[], &spans_file);
    command
        .arg("--")
        .arg(&python.path)
        .arg(app().join("main.py"));
    let (status, _, stderr) = run::run_to_end(command);
    assert!(status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("--python-eval-hook"), "{stderr}");
    let spans = parse_lines(&std::fs::read_to_string(&spans_file).unwrap());
    let main = traces(&spans)
        .into_iter()
        .find(|trace| trace.root().name == "main.<module>")
        .expect("the module's trace");
    assert_eq!(
        main.shape(),
        format!(
            "main.<module>({IMPORTS} shop.cart.Cart.__init__ shop.cart.by_price \
             shop.cart.by_price shop.cart.prices shop.cart.prices shop.orders.place shop.orders.place)"
        )
    );
}

/// An exception nobody catches ends the program as untraced (exit 1, its
/// traceback on stderr); its flow is every traced call it left, with a
/// built-in type's name and its message.
#[test]
fn an_uncaught_exception_is_an_error_trace_and_ends_the_program_as_untraced() {
    // 3.10 sees every call; without attach cookies only the static 3.11
    // can be traced, with the hook.
    let python = traceable_here(10);
    let extra: &[&str] = if python.minor >= 11 {
        &["--quiet", "--python-eval-hook"]
    } else {
        &["--quiet"]
    };
    let script = app().join("main.py");
    let plain = run::untraced(&python.path, &[script.as_os_str(), "crash".as_ref()]);
    let dir = omegi_tests::scratch_dir("python-crash");
    let spans_file = dir.join("spans.jsonl");
    let mut command = agent(extra, &spans_file);
    command
        .arg("--")
        .arg(&python.path)
        .arg(&script)
        .arg("crash");
    let (status, stdout, stderr) = run::run_to_end(command);
    assert_eq!(status.code(), Some(1));
    assert_eq!(status.code(), plain.status.code());
    assert_eq!(stdout, String::from_utf8_lossy(&plain.stdout));
    assert_eq!(stderr, String::from_utf8_lossy(&plain.stderr));
    let spans = parse_lines(&std::fs::read_to_string(&spans_file).unwrap());
    let flows: Vec<Vec<String>> = spans::exceptions(&spans)
        .into_iter()
        .map(|(_, event)| event.flow())
        .filter(|flow| flow[0] == "main.crash")
        .collect();
    assert_eq!(
        flows,
        vec![vec!["main.crash".to_owned(), "main.<module>".to_owned()]]
    );
    // Its stack trace is the one Python printed: each file, the line it was
    // at and that line's text, most recent call last.
    let stacktrace = spans::exceptions(&spans)
        .into_iter()
        .map(|(_, event)| event.text("exception.stacktrace"))
        .find(|text| text.ends_with("ValueError: nobody catches this"))
        .expect("the crash's stack trace");
    assert_eq!(
        format!("{stacktrace}\n"),
        String::from_utf8_lossy(&plain.stderr)
    );
}

/// Interpreters omegi does not trace are refused in one line naming the
/// version; a project root with no Python code that runs is said once.
#[test]
fn unsupported_versions_are_refused_and_an_empty_root_is_said() {
    for (version, library) in [
        ("3.9", "libpython3.9.so.1.0"),
        ("2.7", "libpython2.7.so.1.0"),
    ] {
        let home = pyenv_home(version);
        let mut command = agent(&[], Path::new("/dev/null"));
        command
            .arg("--")
            .arg(home.join(format!("bin/python{version}")))
            .args(["-c", "pass"]);
        assert_eq!(
            refused(command),
            format!(
                "omegi-agent: error: {} is Python {version}, which omegi does not trace: it \
                 traces CPython 3.10–3.13",
                home.join("lib").join(library).display()
            )
        );
    }

    // A bad OMEGI_CAPTURE_ARGS is refused, not taken for off.
    let mut command = agent(&[], Path::new("/dev/null"));
    command
        .env("OMEGI_CAPTURE_ARGS", "maybe")
        .arg("--")
        .arg(&interpreters()[0].path)
        .args(["-c", "pass"]);
    assert_eq!(
        refused(command),
        "omegi-agent: error: invalid value 'maybe' for '--capture-args [<CAPTURE_ARGS>]': value was not a boolean (omegi-agent --help lists the options)"
    );

    let python = &interpreters()[0];
    let mut command = Command::new(agent_bin());
    command
        .args([
            "--project-root",
            "/nonexistent-root",
            "--format",
            "json",
            "--output",
        ])
        .arg("/dev/null")
        .arg("--")
        .arg(&python.path)
        .arg(app().join("main.py"));
    let (status, _, stderr) = run::run_to_end(command);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: there is no .py file under the project root /nonexistent-root"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "warning: no Python function under the project root /nonexistent-root ran while traced"
        ),
        "{stderr}"
    );

    // --list says what would be traced: the interpreter and the files.
    let mut command = Command::new(agent_bin());
    command
        .arg("--project-root")
        .arg(app())
        .arg("--list")
        .arg("--binary")
        .arg(&python.path);
    let (status, stdout, stderr) = run::run_to_end(command);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains(" is Python 3.10 ("), "{stdout}");
    assert!(
        stdout.contains("8 Python files under the project root"),
        "{stdout}"
    );
    assert!(stdout.contains("shop/payments.py"), "{stdout}");
}

/// A Flask service under gunicorn, as the seed's users run theirs, traced
/// by `--pid` of its worker after it started: a request whose handler
/// raises (Flask answers 500) is an error trace on the Kafka error topic in
/// the seed's format, with the service's name and token; a request that
/// succeeds is no error.
#[test]
fn a_flask_service_under_gunicorn_sends_its_error_trace_to_kafka() {
    use omegi_tests::kafka::{self, Broker};
    if !kernel_has_attach_cookies() {
        // The service's interpreter is pyenv's 3.11, a shared libpython,
        // refused on such kernels (see without_attach_cookies_…).
        eprintln!("no attach cookies: the service's interpreter cannot be traced here");
        return;
    }
    let broker = Broker::start();
    let service = omegi_tests::fixtures::sources_dir().join("python/service");
    let port = kafka::free_port();
    let mut gunicorn = Command::new(omegi_tests::peers::python_otel())
        .args(["-m", "gunicorn", "--workers", "1", "--bind"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--chdir")
        .arg(&service)
        .arg("orders.app:app")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + omegi_tests::scaled(Duration::from_secs(60));
    let worker = loop {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", gunicorn.id()))
                .unwrap_or_default();
        let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if let (true, Some(worker)) = (listening, children.split_whitespace().next()) {
            break worker.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gunicorn did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    let dir = omegi_tests::scratch_dir("python-gunicorn");
    let spans_file = dir.join("spans.jsonl");
    let mut agent = Command::new(agent_bin())
        .env("OMEGI_PROJECT_ROOT", &service)
        .env("OMEGI_KAFKA_SERVER", broker.address())
        .env("OMEGI_EXPORTER_KIND", "kafka,console")
        .env("OMEGI_SERVICE_NAME", "orders")
        .env("OMEGI_TOKEN", "token-orders")
        .env("OMEGI_PYTHON_EVAL_HOOK", "1")
        .env("OMEGI_CAPTURE_ARGS", "1")
        .args(["--format", "json", "--output"])
        .arg(&spans_file)
        .args(["--pid", &worker])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (hooked_tx, hooked) = mpsc::channel();
    let stderr = BufReader::new(agent.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("eval hook set in process") {
                let _ = hooked_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if hooked
        .recv_timeout(omegi_tests::scaled(Duration::from_secs(60)))
        .is_err()
    {
        let _ = gunicorn.kill();
        let _ = agent.kill();
        panic!("no eval hook:\n{}", reader.join().unwrap());
    }
    assert!(get(port, "/orders/apple").starts_with("HTTP/1.1 200"));
    assert!(get(port, "/orders/pear").starts_with("HTTP/1.1 500"));

    let errors = kafka::read_json(&broker.address(), "error", 1);
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(gunicorn.id() as i32, libc::SIGTERM) };
    let _ = run::wait_with_timeout(&mut gunicorn, run::RUN_TIMEOUT);
    let _ = run::wait_with_timeout(&mut agent, run::RUN_TIMEOUT);
    let agent_stderr = reader.join().unwrap();
    assert_eq!(errors.len(), 1, "{agent_stderr}");
    let message = &errors[0];
    assert_eq!(message["serviceName"], "orders");
    assert_eq!(message["token"], "token-orders");
    let error = &message["error"];
    assert_eq!(
        error["exception.type"], "orders.pricing.OutOfStock",
        "{message}"
    );
    assert_eq!(error["exception.message"], "no pear left");
    assert_eq!(
        error["exception.flow"],
        serde_json::json!({
            "step.1": "orders.pricing.reserve",
            "step.2": "orders.pricing.price",
            "step.3": "orders.app.order"
        })
    );
    // As the seed sent it (OpenTelemetry's Python SDK): Python's traceback.
    let app_file = service.join("orders/app.py");
    let pricing = service.join("orders/pricing.py");
    assert_eq!(
        error["exception.stacktrace"],
        format!(
            "Traceback (most recent call last):\n  \
             File \"{app}\", line 14, in order\n    \
             return {{\"item\": item, \"total\": price(item, 1)}}\n  \
             File \"{pricing}\", line 15, in price\n    \
             return reserve(item, count) * 2\n  \
             File \"{pricing}\", line 10, in reserve\n    \
             raise OutOfStock(f\"no {{item}} left\")\n\
             orders.pricing.OutOfStock: no pear left",
            app = app_file.display(),
            pricing = pricing.display(),
        ),
        "{message}"
    );
    let names: Vec<&str> = message["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|span| span["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"orders.app.order"), "{names:?}");
    // `--capture-args` in the seed's form: the `str()` of its list.
    let reserve = message["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|span| span["name"] == "orders.pricing.reserve")
        .expect("the reserve span");
    assert_eq!(
        reserve["attributes"]["arguments"], "['item: str = pear', 'count: int = 1']",
        "{reserve}"
    );
    let handler = message["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|span| span["name"] == "orders.app.order")
        .unwrap();
    assert_eq!(handler["attributes"]["module"], "orders.app");
    assert_eq!(handler["attributes"]["name"], "order");
    assert_eq!(handler["attributes"]["otel.status_code"], "ERROR");
}

/// A bare HTTP/1.0-style GET, answered and closed by the server: its reply.
fn get(port: u16, path: &str) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

/// `--exclude` on Python names: the excluded function's calls are gone and
/// the calls under them hang from the nearest traced caller.
#[test]
fn include_and_exclude_apply_to_python_names() {
    if !kernel_has_attach_cookies() {
        // 3.10 is a shared libpython here, refused on such kernels; what
        // the filters do does not depend on the kernel.
        eprintln!("no attach cookies: 3.10 cannot be traced here");
        return;
    }
    let python = interpreters().into_iter().next().unwrap();
    let dir = omegi_tests::scratch_dir("python-exclude");
    let spans_file = dir.join("spans.jsonl");
    let mut command = agent(
        &[
            "--quiet",
            "--exclude",
            "shop.cart.fib",
            "--exclude",
            "shop.payments.checkout",
        ],
        &spans_file,
    );
    command
        .arg("--")
        .arg(&python.path)
        .arg(app().join("main.py"));
    let (status, _, stderr) = run::run_to_end(command);
    assert!(status.success(), "{stderr}");
    let spans = parse_lines(&std::fs::read_to_string(&spans_file).unwrap());
    let thread = traces(&spans)
        .into_iter()
        .find(|trace| trace.root().name == "main.work")
        .expect("the thread's trace");
    thread.check_well_formed();
    assert_eq!(
        thread.shape(),
        format!(
            "main.work(shop.cart.__init__ shop.cart.add shop.cart.add shop.cart.by_price \
             shop.cart.by_price shop.cart.prices shop.cart.prices {ORDERS} shop.cart.total shop.cart.total \
             shop.payments.charge)"
        )
    );
}

/// Kernels before 5.15 have no attach cookies: probes are found by their
/// address in the executable (`--probe-lookup address` here, the default
/// there). An interpreter linked into its executable (Debian's) is traced
/// as with cookies; one in a shared libpython is refused in one line.
#[test]
fn without_attach_cookies_a_static_interpreter_is_traced_and_a_shared_one_refused() {
    let all = interpreters();
    let shared = all.iter().find(|python| python.shared).unwrap();
    refused_without_cookies(shared, &["--probe-lookup", "address"]);
    let debian = all.iter().find(|python| !python.shared).unwrap();
    let dir = omegi_tests::scratch_dir("python-by-address");
    let spans_file = dir.join("spans.jsonl");
    let mut command = agent(&["--quiet", "--probe-lookup", "address"], &spans_file);
    command
        .arg("--")
        .arg(&debian.path)
        .arg(app().join("main.py"));
    let (status, _, stderr) = run::run_to_end(command);
    assert!(status.success(), "{stderr}");
    let spans = parse_lines(&std::fs::read_to_string(&spans_file).unwrap());
    let main = traces(&spans)
        .into_iter()
        .find(|trace| trace.root().name == "main.<module>")
        .expect("the module's trace");
    main.check_well_formed();
    // No hook: the calls made from C (see the test without it).
    assert_eq!(
        main.shape(),
        format!(
            "main.<module>({IMPORTS} shop.cart.Cart.__init__ shop.cart.by_price \
             shop.cart.by_price shop.cart.prices shop.cart.prices {ORDERS} {LAST_ORDER})"
        )
    );
}

/// `--capture-args`: each call's first six arguments as the seed wrote
/// them, `name: type = value`, on every version and build: numbers, `bool`,
/// `None` and the start of an ASCII `str` by value, anything else by its
/// type's name. Without the option no call has any.
#[test]
fn capture_args_sends_each_calls_arguments_as_the_seed_did() {
    let cookies = kernel_has_attach_cookies();
    for python in interpreters() {
        let label = &python.label;
        if python.shared && !cookies {
            continue;
        }
        for capture in [true, false] {
            let dir = omegi_tests::scratch_dir("python-arguments");
            let spans_file = dir.join("spans.jsonl");
            let extra: &[&str] = if capture {
                &["--quiet", "--capture-args"]
            } else {
                &["--quiet"]
            };
            let mut command = agent(extra, &spans_file);
            command
                .arg("--")
                .arg(&python.path)
                .arg(app().join("arguments.py"));
            let (status, stdout, stderr) = run::run_to_end(command);
            assert!(status.success(), "{label}: {stderr}");
            assert_eq!(stdout, "[-42, 1180591620717411303424]\n", "{label}");
            let spans = parse_lines(&std::fs::read_to_string(&spans_file).unwrap());
            let arguments: Vec<Vec<String>> = spans
                .iter()
                .filter(|span| span.name == "arguments.order")
                .map(|span| {
                    span.attributes
                        .get("arguments")
                        .and_then(|value| value.as_array())
                        .map(|items| {
                            items
                                .iter()
                                .map(|item| item.as_str().unwrap().to_owned())
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect();
            let expected: Vec<Vec<String>> = if capture {
                vec![
                    vec![
                        "count: int = -42".into(),
                        "item: str = apple".into(),
                        "ratio: float = 2.5".into(),
                        "express: bool = True".into(),
                        "note: NoneType = None".into(),
                        "cart: Cart = <Cart object>".into(),
                    ],
                    vec![
                        "count: int = <more than 60 bits>".into(),
                        format!("item: str = {}…", "x".repeat(31)),
                        "ratio: float = 1e+20".into(),
                        "express: bool = False".into(),
                        "note: str = <non-ASCII str of length 1>".into(),
                        "cart: list = <list object>".into(),
                    ],
                ]
            } else {
                vec![Vec::new(), Vec::new()]
            };
            assert_eq!(arguments, expected, "{label}, capture {capture}");
        }
    }
}

/// A process forked after the eval hook was set (a gunicorn master's
/// worker) is a copy with the hook in it: at detach it is set back there
/// too. Seen from outside: a second agent without the hook then sees the
/// worker's calls made from C, but not those made from Python.
#[test]
fn the_eval_hook_is_set_back_in_forked_workers_at_detach() {
    let python = traceable_here(11);
    let mut program = Command::new(&python.path)
        .arg(app().join("forks.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = program.stdin.take().unwrap();
    let mut output = BufReader::new(program.stdout.take().unwrap());
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");

    let dir = omegi_tests::scratch_dir("python-forks");
    let mut hooking = agent(&["--python-eval-hook"], &dir.join("hooked.jsonl"))
        .arg("--pid")
        .arg(program.id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut hooking_err = BufReader::new(hooking.stderr.take().unwrap());
    let mut said = read_until(&mut hooking_err, "eval hook set in process");
    input.write_all(b"fork\n").unwrap();
    line.clear();
    output.read_line(&mut line).unwrap();
    let worker: u32 = line
        .strip_prefix("worker ")
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(hooking.id() as i32, libc::SIGINT) };
    let status = run::wait_with_timeout(&mut hooking, run::RUN_TIMEOUT).expect("agent ends");
    std::io::Read::read_to_string(&mut hooking_err, &mut said).unwrap();
    assert!(status.success(), "{said}");
    assert!(
        said.contains("eval hook set back in 1 forked processes too"),
        "{said}"
    );

    let spans_file = dir.join("after.jsonl");
    let mut watching = agent(&["-v"], &spans_file)
        .arg("--pid")
        .arg(worker.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut watching_err = BufReader::new(watching.stderr.take().unwrap());
    let mut said = read_until(&mut watching_err, &format!("process {worker} is traced"));
    input.write_all(b"run\n").unwrap();
    drop(input);
    line.clear();
    output.read_line(&mut line).unwrap();
    assert_eq!(line, "ranked [4, 3] fib 3\n");
    let status = run::wait_with_timeout(&mut program, run::RUN_TIMEOUT).expect("program ends");
    assert!(status.success());
    let status = run::wait_with_timeout(&mut watching, run::RUN_TIMEOUT).expect("agent ends");
    std::io::Read::read_to_string(&mut watching_err, &mut said).unwrap();
    assert!(status.success(), "{said}");
    let spans = parse_lines(&std::fs::read_to_string(&spans_file).unwrap());
    let mut names: Vec<&str> = spans.iter().map(|span| span.name.as_str()).collect();
    names.sort();
    // `fib` is called from Python: seen only if the hook were still set.
    assert_eq!(
        names,
        ["shop.cart.by_price", "shop.cart.by_price"],
        "{said}"
    );
}

/// An interpreter that exits while the agent attaches is said to have, in
/// one line (its files, reached through `/proc/PID/root`, went with it; the
/// kernel's refusal then said nothing about why).
#[test]
fn an_interpreter_that_exits_during_attach_is_said_to_have() {
    let python = traceable_here(11);
    let dir = omegi_tests::scratch_dir("python-exits");
    for delay in ["0.05", "0.1", "0.2", "0.4", "0.8"] {
        let mut target = Command::new(&python.path)
            .arg("-c")
            .arg(format!(
                "print('ready', flush=True); import time; time.sleep({delay})"
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(target.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = target.id();
        // Not reaped until the agent is done: the pid stays a zombie.
        let mut command = agent(&["--quiet"], &dir.join("spans.jsonl"));
        command.args(["--pid", &pid.to_string()]);
        let (status, _, stderr) = run::run_to_end(command);
        assert!(target.wait().unwrap().success());
        // Traced to its end, or gone before the agent began (a slow
        // machine): try a longer life.
        if status.success() || stderr.contains("has exited (its parent has not reaped it yet)") {
            continue;
        }
        // After the warning that 3.11+ without the hook sees calls from C.
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(
            errors,
            [format!(
                "omegi-agent: error: process {pid} exited while omegi was attaching"
            )],
            "{stderr}"
        );
        return;
    }
    panic!("the interpreter never exited during attach");
}
