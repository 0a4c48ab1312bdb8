//! Issue 2: tracing the user functions of C, C++ and Rust programs.
//!
//! Each fixture in `tests/fixtures` has a known call tree; these tests run it
//! under the agent, as PIE and non-PIE executables, and check the exact
//! traces (names, nesting, order, how each call ended) and that the program
//! itself behaved exactly as it does untraced.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    os::unix::{fs::PermissionsExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use omegi_tests::{
    fixtures::{self, Linking},
    run::{self, refused, Agent, Traced},
    spans::{parse_lines, traces, SpanRecord, TraceView},
};

const BOTH: [Linking; 2] = [Linking::Pie, Linking::NoPie];

fn agent() -> Agent {
    Agent::new(env!("CARGO_BIN_EXE_omegi-agent"))
}

/// Runs `exe` traced and untraced and checks that tracing did not change
/// what the program did: same stdout, same stderr, same exit code or signal.
/// Also checks that the agent had nothing to say (no warning, no drop).
fn trace_unharmed(exe: &Path, args: &[&str], extra: &[&str]) -> Traced {
    let traced = agent().trace(exe, args, extra);
    let plain = run::untraced(exe, args);
    let context = format!(
        "{} {args:?} {extra:?}; the agent said:\n{}",
        exe.display(),
        traced.agent_stderr()
    );
    assert_eq!(traced.status.code(), plain.status.code(), "{context}");
    assert_eq!(traced.status.signal(), plain.status.signal(), "{context}");
    assert_eq!(
        traced.stdout,
        String::from_utf8_lossy(&plain.stdout),
        "{context}"
    );
    assert_eq!(
        traced.program_stderr(),
        String::from_utf8_lossy(&plain.stderr),
        "{context}"
    );
    traced
}

/// The traces of a run, each checked: well formed (one root, parents present,
/// durations positive and nested), one thread per trace, every span naming
/// its source file (`source`, relative to `tests/fixtures`) and line.
fn checked_traces(traced: &Traced, source: &str) -> Vec<TraceView> {
    let file = fixtures::sources_dir().join(source);
    let traces = traces(&traced.spans);
    for trace in &traces {
        trace.check_well_formed();
        let root = trace.root();
        for span in &trace.spans {
            assert_eq!(span.tid(), root.tid(), "{} in {}", span.name, trace.shape());
            assert_eq!(span.pid(), root.pid(), "{} in {}", span.name, trace.shape());
            assert_eq!(span.kind, "INTERNAL");
            assert_eq!(
                span.attr("code.filepath").as_deref(),
                Some(file.to_str().unwrap()),
                "{}",
                span.name
            );
            let line: u32 = span.attr("code.lineno").unwrap().parse().unwrap();
            assert!(line > 0, "{}", span.name);
            assert_eq!(span.attr("code.function").as_deref(), Some(&*span.name));
        }
    }
    traces
}

/// Each trace as `shape_with_ends`: names, nesting, order, and how each call
/// that did not simply return ended.
fn shapes(traces: &[TraceView]) -> Vec<String> {
    traces.iter().map(TraceView::shape_with_ends).collect()
}

/// The spans of `trace` called `name`, in the order they started.
fn named<'a>(trace: &'a TraceView, name: &str) -> Vec<&'a SpanRecord> {
    let mut spans: Vec<_> = trace.spans.iter().filter(|s| s.name == name).collect();
    spans.sort_by_key(|span| span.start_time_unix_nano);
    spans
}

#[test]
fn c_calls_exact_traces_pie_and_nopie() {
    for linking in BOTH {
        let exe = fixtures::build("c/calls.c", linking);
        let traced = trace_unharmed(&exe, &[], &[]);
        assert_eq!(traced.status.code(), Some(3), "{}", traced.stderr);
        assert_eq!(traced.agent_stderr(), "");

        let traces = checked_traces(&traced, "c/calls.c");
        assert_eq!(
            shapes(&traces),
            vec![
                "main(compute(leaf fib(fib(fib fib) fib)))",
                "worker(compute(leaf leaf fib(fib(fib fib) fib)))",
            ],
            "{linking:?}"
        );
        assert_ne!(traces[0].root().tid(), traces[1].root().tid());
        assert_eq!(traces[0].root().pid(), traces[1].root().pid());
        // The main thread's tid is the process id.
        assert_eq!(traces[0].root().tid(), traces[0].root().pid());
    }
}

/// Several `ret`s, a direct `jmp` tail call and an indirect one, from real
/// -O2 code, with both ways of seeing returns.
#[test]
fn c_exits_tail_calls_and_several_returns() {
    for linking in BOTH {
        let exe = fixtures::build("c/exits.c", linking);
        for returns in ["auto", "sites"] {
            let traced = trace_unharmed(&exe, &[], &["--return-probes", returns]);
            assert_eq!(traced.stdout, "5\n0\n2\n");
            assert_eq!(traced.agent_stderr(), "");
            let traces = checked_traces(&traced, "c/exits.c");
            // `step` leaves by `jmp finish`: it ends there, and `finish` runs
            // as its sibling. `dispatch` leaves by `jmp *reg`, which no probe
            // sees: `finish` starting in its frame shows it was replaced.
            // `classify` returns through either of its two `ret`s.
            assert_eq!(
                shapes(&traces),
                vec![
                    "main(run(step[tail_call] finish classify dispatch[replaced] finish) \
                     classify classify(finish))"
                ],
                "{linking:?} --return-probes {returns}"
            );
            let trace = &traces[0];
            let step = named(trace, "step")[0];
            let finish = named(trace, "finish")[0];
            assert!(step.end_time_unix_nano <= finish.start_time_unix_nano);
            let dispatch = named(trace, "dispatch")[0];
            let replacing = named(trace, "finish")[1];
            assert!(dispatch.end_time_unix_nano <= replacing.start_time_unix_nano);
        }
    }
}

/// An exception thrown three user frames below the function that catches
/// it: those frames end `unwound`; the catching function goes on and
/// returns. Also a class, a template, recursion and a second thread.
#[test]
fn cpp_exception_caught_through_user_frames() {
    for linking in BOTH {
        let exe = fixtures::build("cpp/exceptions.cpp", linking);
        let traced = trace_unharmed(&exe, &[], &[]);
        assert_eq!(traced.status.code(), Some(0));
        assert_eq!(
            traced.stdout,
            "7\nrejected 30: over the limit\n-1\nrejected 50: over the limit\n5\n"
        );
        assert_eq!(traced.agent_stderr(), "");
        let traces = checked_traces(&traced, "cpp/exceptions.cpp");
        let rejected = "shop::handle(\
            shop::price[unwound](shop::validate[unwound](\
            shop::Checker::check[unwound](shop::Rejected::Rejected))) \
            shop::report shop::Rejected::~Rejected)";
        assert_eq!(
            shapes(&traces),
            vec![
                format!(
                    "main(shop::Checker::Checker \
                     shop::handle(shop::price(shop::validate(shop::Checker::check))) \
                     {rejected})"
                ),
                format!(
                    "main::{{lambda()#1}}::operator() const({rejected} shop::twice<int> \
                     shop::depth(shop::depth(shop::depth)))"
                ),
            ],
            "{linking:?}"
        );
        // The unwound frames end when the catch block calls `report`.
        for trace in &traces {
            let report = named(trace, "shop::report")[0];
            let price = named(trace, "shop::price").pop().unwrap();
            assert_eq!(price.end(), "unwound");
            assert!(price.end_time_unix_nano <= report.start_time_unix_nano);
        }
        assert_ne!(traces[0].root().tid(), traces[1].root().tid());
    }
}

/// A panic raised three user frames below `catch_unwind`: those frames end
/// `unwound`, the panic hook runs inside the panicking function, and the
/// program goes on.
#[test]
fn rust_panic_caught_by_catch_unwind() {
    for linking in BOTH {
        let exe = fixtures::build("rust/panics.rs", linking);
        let traced = trace_unharmed(&exe, &[], &[]);
        assert_eq!(traced.status.code(), Some(0));
        assert_eq!(
            traced.stdout,
            "5\nrefused: negative amount -3\n-1\nrefused: negative amount -1\n1\n"
        );
        assert_eq!(
            traced.program_stderr(),
            "panicked: negative amount -3\npanicked: negative amount -1\n"
        );
        assert_eq!(traced.agent_stderr(), "");
        let traces = checked_traces(&traced, "rust/panics.rs");
        let panicked = "panics::handle(\
            panics::handle::{{closure}}[unwound](panics::Ledger::add[unwound](\
            panics::validate[unwound](panics::quiet_hook))) panics::report)";
        assert_eq!(
            shapes(&traces),
            vec![
                format!(
                    "panics::main(panics::handle(panics::handle::{{{{closure}}}}(\
                     panics::Ledger::add(panics::validate))) {panicked})"
                ),
                format!(
                    "panics::main::{{{{closure}}}}({panicked} \
                     panics::depth(panics::depth(panics::depth)))"
                ),
            ],
            "{linking:?}"
        );
        assert_ne!(traces[0].root().tid(), traces[1].root().tid());
    }
}

/// The child a traced program forks is traced too, under its own pid.
#[test]
fn c_fork_child_is_traced_with_its_pid() {
    for linking in BOTH {
        let exe = fixtures::build("c/forks.c", linking);
        let dir = omegi_tests::scratch_dir("forks");
        let traced_pids = dir.join("traced-pids");
        let plain_pids = dir.join("plain-pids");
        // Not `trace_unharmed`: the two runs write their pids to different files.
        let traced = agent().trace(&exe, &[&traced_pids], &[]);
        let plain = run::untraced(&exe, &[&plain_pids]);
        assert_eq!(traced.status.code(), Some(0), "{}", traced.stderr);
        assert_eq!(traced.status.code(), plain.status.code());
        assert_eq!(traced.stdout, String::from_utf8_lossy(&plain.stdout));
        assert_eq!(
            traced.stdout,
            "child 14\nparent 9 17, child exited with 5\n"
        );
        assert_eq!(traced.program_stderr(), "");
        assert_eq!(traced.agent_stderr(), "");

        let pids = std::fs::read_to_string(&traced_pids).unwrap();
        let pids: Vec<u64> = pids
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        let (parent, child) = (pids[0], pids[1]);
        assert_ne!(parent, child);

        let traces = checked_traces(&traced, "c/forks.c");
        assert_eq!(
            shapes(&traces),
            vec![
                "main(square parent_work(square))",
                "child_work(square square square)"
            ],
            "{linking:?}"
        );
        assert_eq!(traces[0].root().pid(), parent);
        assert_eq!(traces[0].root().tid(), parent);
        assert_eq!(traces[1].root().pid(), child);
        assert_eq!(traces[1].root().tid(), child);
    }
}

/// A program killed by a signal: the agent ends with the same signal, the
/// program's output is the same, and the calls it was in end `thread_exit`.
#[test]
fn c_killed_by_a_signal_ends_the_agent_the_same_way() {
    for linking in BOTH {
        let exe = fixtures::build("c/crash.c", linking);
        for (how, signal) in [("abort", libc::SIGABRT), ("segv", libc::SIGSEGV)] {
            let traced = trace_unharmed(&exe, &[how], &[]);
            assert_eq!(traced.status.signal(), Some(signal), "{}", traced.stderr);
            assert_eq!(traced.status.code(), None);
            assert_eq!(traced.stdout, "before 1\n");
            assert_eq!(traced.program_stderr(), format!("about to die by {how}\n"));
            assert_eq!(traced.agent_stderr(), "");
            let traces = checked_traces(&traced, "c/crash.c");
            assert_eq!(
                shapes(&traces),
                vec![
                    "main[thread_exit](deeper(check) \
                     deeper[thread_exit](check explode[thread_exit]))"
                ],
                "{linking:?} {how}"
            );
        }
    }
}

/// Without DWARF the symbol table is used: same tree, no file or line, and a
/// warning saying so.
#[test]
fn c_without_dwarf_is_traced_from_the_symbol_table() {
    for linking in BOTH {
        let exe = fixtures::build("c/nodwarf.c", linking);
        let traced = trace_unharmed(&exe, &[], &[]);
        assert_eq!(traced.stdout, "12\n");
        let warning = traced.agent_stderr();
        assert!(
            warning.starts_with("omegi-agent: warning: ")
                && warning.contains("no DWARF debug info")
                && warning.lines().count() == 1,
            "{warning}"
        );
        let traces = traces(&traced.spans);
        assert_eq!(shapes(&traces), vec!["main(outer(inner inner))"]);
        for trace in &traces {
            trace.check_well_formed();
            for span in &trace.spans {
                assert_eq!(span.attr("code.filepath"), None);
                assert_eq!(span.attr("code.lineno"), None);
            }
        }
    }
}

#[test]
fn rust_without_debug_info_falls_back_to_the_symbol_table() {
    // std keeps its DWARF; the program's functions have none. Without the
    // fallback nothing would be traced.
    for linking in BOTH {
        let exe = fixtures::build("rust/nodebug.rs", linking);
        let traced = trace_unharmed(&exe, &[], &[]);
        assert_eq!(traced.stdout, "12\n");
        let warning = traced.agent_stderr();
        assert!(
            warning.contains("no DWARF debug info for your code (only for its runtime)")
                && warning.lines().count() == 1,
            "{warning}"
        );
        let traces = traces(&traced.spans);
        assert_eq!(traces.len(), 1);
        let names: BTreeSet<&str> = traced.spans.iter().map(|span| span.name.as_str()).collect();
        for wanted in ["nodebug::main", "nodebug::compute", "nodebug::double"] {
            assert!(names.contains(wanted), "{wanted} missing from {names:?}");
        }
        for name in &names {
            let subject = name.trim_start_matches('<');
            assert!(
                !["std::", "core::", "alloc::"]
                    .iter()
                    .any(|p| subject.starts_with(p)),
                "a runtime function was traced: {name}"
            );
        }
        assert_eq!(
            traced
                .spans
                .iter()
                .filter(|s| s.name == "nodebug::double")
                .count(),
            3
        );
    }
}

#[test]
fn calls_deeper_than_the_shadow_stack_are_counted_and_explained_with_debug_ebpf() {
    let exe = fixtures::build("c/deep.c", Linking::Pie);
    // main + down(80..=0): 82 calls, 64 fit on the shadow stack.
    let traced = trace_unharmed(&exe, &[], &[]);
    assert_eq!(traced.stdout, "80\n");
    assert_eq!(traced.spans.len(), 64);
    let said = traced.agent_stderr();
    assert!(
        said.contains("dropped: 18 calls not traced beyond depth 64"),
        "{said}"
    );
    assert!(!said.contains("debug:"), "{said}");

    // --debug-ebpf shows the eBPF programs' own messages.
    let traced = trace_unharmed(&exe, &[], &["--debug-ebpf"]);
    let said = traced.agent_stderr();
    let debug_lines = said
        .lines()
        .filter(|line| line.starts_with("omegi-agent: debug: deeper than 64 calls, tid "))
        .count();
    assert_eq!(debug_lines, 18, "{said}");
}

// --- --pid --------------------------------------------------------------

/// The looper fixture, started and waiting on its stdin.
struct Looper {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Looper {
    fn start(linking: Linking) -> Self {
        let exe = fixtures::build("rust/looper.rs", linking);
        let mut child = Command::new(&exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n");
        Self { child, stdout }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes its stdin: it stops its workers and exits.
    fn finish(mut self) -> (ExitStatus, String) {
        drop(self.child.stdin.take());
        let status = run::wait_with_timeout(&mut self.child, run::RUN_TIMEOUT)
            .expect("the looper exits when its stdin closes");
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        (status, rest)
    }
}

impl Drop for Looper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `omegi-agent --pid PID` writing spans to `spans_file`.
fn attach(pid: u32, spans_file: &Path) -> Child {
    agent()
        .command(&[], spans_file)
        .arg("--pid")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The complete lines written so far (the last one may be half written).
fn spans_so_far(spans_file: &Path) -> Vec<SpanRecord> {
    let text = std::fs::read_to_string(spans_file).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    parse_lines(complete)
}

const REQUEST: &str = "looper::handle_request(looper::parse looper::checksum(looper::checksum(\
    looper::checksum(looper::checksum(looper::checksum)))))";

/// The handled requests (traces rooted at `handle_request` that returned),
/// and the threads they ran on.
fn requests(spans: &[SpanRecord]) -> (Vec<TraceView>, BTreeSet<u64>) {
    let done: Vec<TraceView> = traces(spans)
        .into_iter()
        .filter(|trace| {
            trace.spans.iter().any(|span| {
                span.is_root() && span.name == "looper::handle_request" && span.end() == "returned"
            })
        })
        .collect();
    let threads = done.iter().map(|trace| trace.root().tid()).collect();
    (done, threads)
}

/// Waits until the agent has exported requests handled by all three workers.
fn wait_for_requests(agent: &mut Child, spans_file: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, threads) = requests(&spans_so_far(spans_file));
        if threads.len() == 3 {
            return;
        }
        if let Some(status) = agent.try_wait().unwrap() {
            let mut stderr = String::new();
            agent
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            panic!("the agent ended early ({status}): {stderr}");
        }
        assert!(
            Instant::now() < deadline,
            "no requests from three workers traced within a minute: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn agent_output(agent: Child) -> (ExitStatus, String, String) {
    let output = agent.wait_with_output().unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// What every `--pid` run on the looper must show: its own functions only,
/// none of std's, in the process attached to, the requests exactly.
fn check_pid_spans(spans: &[SpanRecord], pid: u32) {
    assert!(!spans.is_empty());
    for span in spans {
        assert_eq!(span.pid(), u64::from(pid), "{}", span.name);
        for prefix in ["std::", "core::", "alloc::", "<", "__rust", "_"] {
            assert!(!span.name.starts_with(prefix), "std's {} traced", span.name);
        }
        assert!(
            [
                "looper::handle_request",
                "looper::parse",
                "looper::checksum",
                "looper::serve",
            ]
            .contains(&span.name.as_str()),
            "unexpected span {}",
            span.name
        );
    }
    let traces = traces(spans);
    for trace in &traces {
        trace.check_well_formed();
    }
    let (done, threads) = requests(spans);
    assert_eq!(threads.len(), 3, "{threads:?}");
    assert!(
        !threads.contains(&u64::from(pid)),
        "the main thread only waits"
    );
    for trace in &done {
        assert_eq!(trace.shape(), REQUEST);
        assert!(trace.spans.iter().all(|span| span.end() == "returned"));
    }
}

/// `--pid` on a multi-threaded Rust program that is already running: its own
/// functions are traced on every worker thread, none of std's. The first
/// agent is stopped with Ctrl-C and the program runs on unharmed; a second
/// one attaches and ends by itself when the program exits.
#[test]
fn pid_attaches_to_a_running_rust_program() {
    for linking in BOTH {
        let looper = Looper::start(linking);
        let pid = looper.pid();
        let dir = omegi_tests::scratch_dir("pid");

        let first_spans = dir.join("first.jsonl");
        let mut first = attach(pid, &first_spans);
        wait_for_requests(&mut first, &first_spans);
        kill(Pid::from_raw(first.id() as i32), Signal::SIGINT).unwrap();
        let (status, stdout, stderr) = agent_output(first);
        assert_eq!(status.code(), Some(0), "{stderr}");
        assert_eq!(stdout, "");
        assert_eq!(stderr, "");
        check_pid_spans(
            &parse_lines(&std::fs::read_to_string(&first_spans).unwrap()),
            pid,
        );

        // Detached, the program goes on; attach again and let it exit.
        let second_spans = dir.join("second.jsonl");
        let mut second = attach(pid, &second_spans);
        wait_for_requests(&mut second, &second_spans);
        let (program_status, program_stdout) = looper.finish();
        assert_eq!(program_status.code(), Some(0));
        assert_eq!(program_stdout, "stopped\n");
        let status = run::wait_with_timeout(&mut second, run::RUN_TIMEOUT)
            .expect("the agent ends when the process it traces exits");
        let (_, _, stderr) = agent_output(second);
        assert_eq!(status.code(), Some(0), "{stderr}");
        assert_eq!(stderr, "");
        check_pid_spans(
            &parse_lines(&std::fs::read_to_string(&second_spans).unwrap()),
            pid,
        );
    }
}

// --- --list -------------------------------------------------------------

fn list(exe: &Path, extra: &[&str]) -> (ExitStatus, String, String) {
    agent().list(exe, extra)
}

/// Checks the last line, `N function symbols skipped: a reason, b reason`,
/// and returns the reasons.
fn skip_line(listing: &str) -> Vec<(usize, String)> {
    let last = listing.lines().last().unwrap();
    let (total, reasons) = last
        .split_once(" function symbols skipped: ")
        .unwrap_or_else(|| panic!("no skip line: {last:?}"));
    let reasons: Vec<(usize, String)> = reasons
        .split(", ")
        .map(|reason| {
            let (count, why) = reason.split_once(' ').unwrap();
            (count.parse().unwrap(), why.to_owned())
        })
        .collect();
    assert_eq!(
        total.parse::<usize>().unwrap(),
        reasons.iter().map(|(count, _)| count).sum::<usize>(),
        "{last}"
    );
    reasons
}

#[test]
fn list_shows_what_would_be_traced_and_what_was_skipped() {
    agent();
    let exe = fixtures::build("rust/panics.rs", Linking::Pie);
    let (status, listing, stderr) = list(&exe, &[]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "9 functions would be traced in {} (debug info: DWARF; returns by return sites \
             (uretprobes on leaf functions), the binary can unwind)",
            exe.display()
        )
    );
    assert_eq!(
        lines[1],
        "error path: Rust panics (std's panic entry, catch_unwind), fatal signals and failing exits"
    );
    let functions = &lines[2..lines.len() - 1];
    assert_eq!(functions.len(), 9, "{listing}");
    for (name, needle) in [
        ("panics::Ledger::add", "fn add("),
        ("panics::validate", "fn validate("),
        ("panics::depth", "fn depth("),
        ("panics::report", "fn report("),
        ("panics::handle", "fn handle("),
        ("panics::quiet_hook", "fn quiet_hook("),
        ("panics::main", "fn main("),
    ] {
        let location = format!(
            "{}:{}",
            fixtures::sources_dir().join("rust/panics.rs").display(),
            fixtures::line_of("rust/panics.rs", needle)
        );
        assert!(
            functions
                .iter()
                .any(|line| line.starts_with(&format!("  {name}  {location}  entry +"))),
            "{name} at {location} missing:\n{listing}"
        );
    }
    for line in functions {
        let name = line.trim_start().split("  ").next().unwrap();
        assert!(name.starts_with("panics::"), "{line}");
        assert!(line.contains("exits: 1 ret"), "{line}");
    }
    let reasons = skip_line(&listing);
    let outside = reasons
        .iter()
        .find(|(_, why)| why == "source outside the project root")
        .unwrap_or_else(|| panic!("std's functions are outside the project root:\n{listing}"));
    assert!(outside.0 > 0);

    // How the C exits fixture's functions can return.
    let exe = fixtures::build("c/exits.c", Linking::NoPie);
    let (status, listing, stderr) = list(&exe, &[]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(listing.starts_with("6 functions would be traced in "));
    assert!(listing
        .lines()
        .next()
        .unwrap()
        .ends_with("(debug info: DWARF; returns by uretprobe)"));
    let exits_of = |name: &str| {
        let line = listing
            .lines()
            .find(|line| line.starts_with(&format!("  {name}  ")))
            .unwrap_or_else(|| panic!("no {name}:\n{listing}"));
        line.split("exits: ").nth(1).unwrap().to_owned()
    };
    assert_eq!(exits_of("classify"), "2 ret");
    assert_eq!(exits_of("step"), "0 ret, 1 tail jmp");
    assert_eq!(
        exits_of("dispatch"),
        "0 ret, other exits closed by stack pointer"
    );
    assert_eq!(exits_of("finish"), "1 ret");

    // --include / --exclude are applied and counted.
    let (_, filtered, _) = list(&exe, &["--include", "f*", "--include", "s*"]);
    assert!(
        filtered.starts_with("2 functions would be traced"),
        "{filtered}"
    );
    assert!(skip_line(&filtered).contains(&(4, "left out by --include/--exclude".into())));
}

/// `omegi-agent --list … | head`: the reader closing the pipe early ends the
/// listing quietly, with no panic.
#[test]
fn list_into_a_closed_pipe_ends_quietly() {
    let exe = fixtures::build("rust/panics.rs", Linking::Pie);
    let mut child = agent_command(&["--project-root", "/", "--list", "--binary"])
        .arg(&exe)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the agent has written anything.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

/// `--list` attaches nothing, so it needs no privileges.
#[test]
fn list_works_unprivileged() {
    let unprivileged = Unprivileged::new();
    let exe = unprivileged.copy(&fixtures::build("c/calls.c", Linking::Pie));
    let (status, stdout, stderr) = run::run_to_end(unprivileged.agent(&[
        "--project-root",
        fixtures::sources_dir().to_str().unwrap(),
        "--list",
        "--binary",
        exe.to_str().unwrap(),
    ]));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stdout.starts_with("5 functions would be traced in "),
        "{stdout}"
    );
}

// --- bad input ----------------------------------------------------------

fn agent_command(args: &[&str]) -> Command {
    agent();
    let mut command = Command::new(env!("CARGO_BIN_EXE_omegi-agent"));
    command.args(args);
    command
}

#[test]
fn refuses_a_pid_that_does_not_exist() {
    // Above pid_max: no process can have it.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = (pid_max + 1).to_string();
    let line = refused(agent_command(&["--pid", &pid]));
    assert_eq!(
        line,
        format!("omegi-agent: error: no process with pid {pid}")
    );
}

#[test]
fn refuses_a_pid_that_has_exited_or_is_a_kernel_thread() {
    // A child that has exited and is not reaped yet keeps its pid.
    let mut zombie = Command::new("true").spawn().unwrap();
    let pid = zombie.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .contains(") Z ")
    {
        assert!(Instant::now() < deadline, "{pid} did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    let line = refused(agent_command(&["--pid", &pid.to_string()]));
    assert_eq!(
        line,
        format!(
            "omegi-agent: error: process {pid} has exited (its parent has not reaped it yet): \
             nothing to trace"
        )
    );
    zombie.wait().unwrap();

    // kthreadd.
    let line = refused(agent_command(&["--pid", "2"]));
    assert_eq!(
        line,
        "omegi-agent: error: process 2 is a kernel thread: it runs no program to trace"
    );
}

/// A process that exits while omegi attaches to it: the `vanish` fixture
/// exits as soon as it sees a probe written into its code. Attaching takes
/// many probes after the first, so the exit lands during attach; should the
/// agent ever finish first, it traces until the exit and ends cleanly, and
/// the attempt is made again.
#[test]
fn refuses_a_pid_that_exits_during_attach() {
    let exe = fixtures::build("c/vanish.c", Linking::Pie);
    let dir = omegi_tests::scratch_dir("vanish");
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let mut target = Command::new(&exe)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(target.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ready 23\n");
        let pid = target.id();
        // Not reaped until the agent is done: the pid stays a zombie.
        let mut command = agent().command(&[], &dir.join("spans.jsonl"));
        command.args(["--pid", &pid.to_string()]);
        let (status, stdout_agent, stderr) = run::run_to_end(command);
        // Either way the agent ended because the program had exited.
        if target.try_wait().unwrap().is_none() {
            let _ = target.kill();
            let _ = target.wait();
            panic!("the agent ended ({status}) before the program exited: {stderr}");
        }
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "probed\n");
        assert_eq!(target.wait().unwrap().code(), Some(0));
        assert_eq!(stdout_agent, "");
        if status.code() == Some(0) && stderr.is_empty() {
            outcomes.push("traced to the end".to_owned());
            continue;
        }
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr,
            format!("omegi-agent: error: process {pid} exited while omegi was attaching\n")
        );
        return;
    }
    panic!("the process never exited during attach: {outcomes:?}");
}

#[test]
fn refuses_to_run_unprivileged() {
    let unprivileged = Unprivileged::new();
    let exe = unprivileged.copy(&fixtures::build("c/calls.c", Linking::Pie));
    let line = refused(unprivileged.agent(&[
        "--project-root",
        fixtures::sources_dir().to_str().unwrap(),
        "--",
        exe.to_str().unwrap(),
    ]));
    assert!(
        line.contains("needs root (or CAP_BPF and CAP_PERFMON)"),
        "{line}"
    );
}

#[test]
fn refuses_a_stripped_binary() {
    use object::Object as _;
    let dir = omegi_tests::scratch_dir("stripped");
    let exe = dir.join("calls-stripped");
    std::fs::copy(fixtures::build("c/calls.c", Linking::Pie), &exe).unwrap();
    let status = Command::new("strip").arg(&exe).status().unwrap();
    assert!(status.success());
    // Still runs: the program is fine, omegi just cannot find its functions.
    assert_eq!(run::untraced(&exe, &[] as &[&str]).status.code(), Some(3));
    let line = refused(agent_command(&["--", exe.to_str().unwrap()]));
    // It has a build id (Debian's gcc links with --build-id) and no debug
    // link: only the system's .build-id directory can hold its debug file.
    let data = std::fs::read(&exe).unwrap();
    let id: String = object::File::parse(&*data)
        .unwrap()
        .build_id()
        .unwrap()
        .expect("a build id")
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    assert_eq!(
        line,
        format!(
            "omegi-agent: error: {} is stripped: it has neither a symbol table nor debug info, \
             so its functions cannot be found, and no separate debug file was found for it \
             (looked at /usr/lib/debug/.build-id/{}/{}.debug); give the directory that holds it \
             with --debug-dir (or OMEGI_DEBUG_DIR), or trace an unstripped build (or one with \
             -g)",
            exe.display(),
            &id[..2],
            &id[2..],
        )
    );
}

#[test]
fn refuses_what_is_not_an_elf_file() {
    let dir = omegi_tests::scratch_dir("script");
    let script = dir.join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hello\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let line = refused(agent_command(&["--", script.to_str().unwrap()]));
    assert_eq!(
        line,
        format!(
            "omegi-agent: error: {} is not an ELF executable",
            script.display()
        )
    );
}

#[test]
fn refuses_elf_files_for_other_machines() {
    let dir = omegi_tests::scratch_dir("foreign");
    // A fixture with its machine changed to AArch64 (e_machine = 183).
    let mut elf = std::fs::read(fixtures::build("c/calls.c", Linking::Pie)).unwrap();
    elf[18..20].copy_from_slice(&183u16.to_le_bytes());
    let arm = dir.join("arm64");
    std::fs::write(&arm, &elf).unwrap();
    let line = refused(agent_command(&[
        "--list",
        "--binary",
        arm.to_str().unwrap(),
    ]));
    assert_eq!(
        line,
        format!(
            "omegi-agent: error: {} is an ELF file for Aarch64, 64-bit; omegi traces x86-64 \
             (64-bit) programs only",
            arm.display()
        )
    );

    // A minimal 32-bit x86 executable header (ELFCLASS32, EM_386).
    let mut header = vec![0u8; 52];
    header[..7].copy_from_slice(b"\x7fELF\x01\x01\x01");
    header[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    header[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    header[20..24].copy_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    header[40..42].copy_from_slice(&52u16.to_le_bytes()); // e_ehsize
    header[42..44].copy_from_slice(&32u16.to_le_bytes()); // e_phentsize
    header[46..48].copy_from_slice(&40u16.to_le_bytes()); // e_shentsize
    let i386 = dir.join("i386");
    std::fs::write(&i386, &header).unwrap();
    std::fs::set_permissions(&i386, std::fs::Permissions::from_mode(0o755)).unwrap();
    let line = refused(agent_command(&["--", i386.to_str().unwrap()]));
    assert_eq!(
        line,
        format!(
            "omegi-agent: error: {} is an ELF file for I386, 32-bit; omegi traces x86-64 \
             (64-bit) programs only",
            i386.display()
        )
    );
}

#[test]
fn refuses_a_project_root_that_matches_nothing() {
    let exe = fixtures::build("c/calls.c", Linking::Pie);
    let root = omegi_tests::scratch_dir("empty-root");
    let line = refused(agent_command(&[
        "--project-root",
        root.to_str().unwrap(),
        "--",
        exe.to_str().unwrap(),
    ]));
    let prefix = format!(
        "omegi-agent: error: no function of {} to trace: none has its source under the \
         project root {} (",
        exe.display(),
        omegi_agent::discovery::normalize(&root).display()
    );
    assert!(line.starts_with(&prefix), "{line}");
    assert!(line.contains("5 source outside the project root"), "{line}");
    assert!(
        line.ends_with("set OMEGI_PROJECT_ROOT or --project-root to the directory of your sources"),
        "{line}"
    );
}

#[test]
fn refuses_a_command_that_does_not_exist() {
    let line = refused(agent_command(&["--", "omegi-no-such-command"]));
    assert_eq!(
        line,
        "omegi-agent: error: command not found: omegi-no-such-command"
    );
    let line = refused(agent_command(&["--", "./no/such/program"]));
    assert_eq!(line, "omegi-agent: error: ./no/such/program does not exist");
    let line = refused(agent_command(&["--binary", "/no/such/program"]));
    assert_eq!(line, "omegi-agent: error: /no/such/program does not exist");
}

#[test]
fn refuses_bad_flag_values() {
    let exe = fixtures::build("c/calls.c", Linking::Pie);
    let exe = exe.to_str().unwrap();
    for (args, expected) in [
        (
            vec!["--flow-rate", "0", "--", exe],
            "OMEGI_FLOW_RATE (--flow-rate) = \"0\" is not valid: an integer ≥ 1",
        ),
        (
            vec!["--split-after", "soon", "--", exe],
            "--split-after = \"soon\" is not valid: a duration",
        ),
        (
            vec!["--ring-size", "3MiB", "--", exe],
            "--ring-size = \"3MiB\" is not valid: a power of two",
        ),
        (
            vec!["--pid", "abc"],
            "--pid = \"abc\" is not valid: a process id",
        ),
        (
            vec!["--exporter", "pigeon", "--", exe],
            "OMEGI_EXPORTER_KIND (--exporter) = \"pigeon\" is not valid",
        ),
        (
            vec!["--include", "a[", "--", exe],
            "invalid --include/--exclude pattern \"a[\"",
        ),
        (
            vec!["--format", "xml", "--", exe],
            "invalid value 'xml' for '--format <FORMAT>' [possible values: tree, json]",
        ),
        (
            vec!["--max-trace-spans", "many", "--", exe],
            "invalid value 'many' for '--max-trace-spans <N>'",
        ),
        (
            vec!["--debug-dir", "/no/such/dir", "--", exe],
            "OMEGI_DEBUG_DIR (--debug-dir) = \"/no/such/dir\" is not valid: an existing directory",
        ),
        (
            vec!["--bogus", "--", exe],
            "unexpected argument '--bogus' found",
        ),
        (vec![], "the following required arguments were not provided"),
    ] {
        let line = refused(agent_command(&args));
        assert!(
            line.starts_with(&format!("omegi-agent: error: {expected}")),
            "{args:?}: {line}"
        );
    }
    // The same from the environment, named by its variable.
    let mut command = agent_command(&["--", exe]);
    command.env("OMEGI_FLOW_RATE", "often");
    let line = refused(command);
    assert!(
        line.starts_with("omegi-agent: error: OMEGI_FLOW_RATE (--flow-rate) = \"often\""),
        "{line}"
    );
    let mut command = agent_command(&["--", exe]);
    command.env("OMEGI_DEBUG_DIR", "/tmp:/no/such/dir");
    let line = refused(command);
    assert!(
        line.starts_with("omegi-agent: error: OMEGI_DEBUG_DIR (--debug-dir) = \"/no/such/dir\""),
        "{line}"
    );
}

// --- running unprivileged ------------------------------------------------

/// Runs the agent as `nobody` with no capabilities, from a copy readable by
/// everyone (the build tree may not be).
struct Unprivileged {
    dir: PathBuf,
    agent: PathBuf,
}

impl Unprivileged {
    fn new() -> Self {
        agent();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "omegi-unprivileged-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut unprivileged = Self {
            dir,
            agent: PathBuf::new(),
        };
        unprivileged.agent = unprivileged.copy(Path::new(env!("CARGO_BIN_EXE_omegi-agent")));
        unprivileged
    }

    fn copy(&self, file: &Path) -> PathBuf {
        let to = self.dir.join(file.file_name().unwrap());
        let mut out = std::fs::File::create(&to).unwrap();
        out.write_all(&std::fs::read(file).unwrap()).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        to
    }

    fn agent(&self, args: &[&str]) -> Command {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(&self.agent)
            .args(args)
            .current_dir(&self.dir);
        command
    }
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
