//! Issue 3: error traces — C++ exceptions, Rust panics, fatal signals,
//! failing exits and return-value rules — with the path each error took, and
//! the traced program behaving exactly as without omegi.

use std::os::unix::process::ExitStatusExt;

use omegi_tests::{
    fixtures::{self, Linking, Profile},
    run::{self, Agent, Traced},
    spans::{exceptions, traces, SpanRecord},
};

fn agent() -> Agent {
    Agent::new(env!("CARGO_BIN_EXE_omegi-agent"))
}

/// Thread ids and pids in Rust's panic messages, and the heap addresses a
/// Go traceback prints as arguments, differ between runs.
fn without_ids(text: &str) -> String {
    let mut plain = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        plain.push(c);
        if c == '0' && chars.peek() == Some(&'x') {
            chars.next();
            plain.push_str("xN");
            while chars.peek().is_some_and(char::is_ascii_hexdigit) {
                chars.next();
            }
        }
    }
    let mut out = String::new();
    let mut chars = plain.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '(' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
            out.push('N');
        }
    }
    out
}

/// Runs `file` traced and untraced and checks the program cannot tell:
/// same stdout, stderr and exit status (code or signal).
fn trace_unharmed(file: &str, linking: Linking, args: &[&str], extra: &[&str]) -> Traced {
    trace_unharmed_as(file, linking, Profile::Debug, args, extra)
}

/// [`trace_unharmed`] with the fixture built with `profile`.
fn trace_unharmed_as(
    file: &str,
    linking: Linking,
    profile: Profile,
    args: &[&str],
    extra: &[&str],
) -> Traced {
    let exe = fixtures::build_as(file, linking, profile);
    let traced = agent().trace(&exe, args, extra);
    let plain = run::untraced(&exe, args);
    assert_eq!(
        (traced.status.code(), traced.status.signal()),
        (plain.status.code(), plain.status.signal()),
        "{file} {args:?}: exit differs; agent said:\n{}",
        traced.agent_stderr()
    );
    assert_eq!(
        traced.stdout,
        String::from_utf8_lossy(&plain.stdout),
        "{file} {args:?}: stdout"
    );
    assert_eq!(
        without_ids(&traced.program_stderr()),
        without_ids(&String::from_utf8_lossy(&plain.stderr)),
        "{file} {args:?}: stderr"
    );
    assert_eq!(
        traced.agent_stderr(),
        "",
        "{file} {args:?}: the agent complained"
    );
    for trace in traces(&traced.spans) {
        trace.check_well_formed();
    }
    traced
}

fn names_of_errors(spans: &[SpanRecord]) -> Vec<String> {
    spans
        .iter()
        .filter(|span| span.is_error())
        .map(|span| span.name.clone())
        .collect()
}

#[test]
fn cpp_exception_caught_by_a_user_function() {
    for linking in [Linking::Pie, Linking::NoPie] {
        let traced = trace_unharmed("cpp/errors_caught.cpp", linking, &[], &[]);
        let traces = traces(&traced.spans);
        assert_eq!(traces.len(), 1);
        assert_eq!(
            traces[0].shape(),
            "main(\
             handle_request(parse_record(parse_field(check_range))) \
             handle_request(parse_record(parse_field(check_range(ValidationError::ValidationError))) \
             ValidationError::~ValidationError) \
             outer(log_and_rethrow(parse_field(check_range(ValidationError::ValidationError))) \
             ValidationError::~ValidationError))"
        );
        // The spans the errors left, innermost first, and nothing else.
        assert_eq!(
            names_of_errors(&traced.spans),
            vec![
                "check_range",
                "parse_field",
                "parse_record",
                "check_range",
                "parse_field",
                "log_and_rethrow"
            ]
        );
        let messages: Vec<String> = traced
            .spans
            .iter()
            .filter(|span| span.is_error())
            .map(|span| {
                assert_eq!(span.end(), "unwound");
                span.status.message.clone().unwrap_or_default()
            })
            .collect();
        let rejected = "ValidationError: value 700 out of range";
        let rethrown = "ValidationError: value 500 out of range";
        assert_eq!(
            messages,
            vec![rejected, rejected, rejected, rethrown, rethrown, rethrown]
        );

        let errors = exceptions(&traced.spans);
        assert_eq!(errors.len(), 3);
        let (span, first) = errors[0];
        assert_eq!(span.name, "check_range");
        assert_eq!(first.text("exception.type"), "ValidationError");
        assert_eq!(first.text("exception.message"), "value 700 out of range");
        assert_eq!(
            first.flow(),
            vec!["check_range", "parse_field", "parse_record"]
        );
        assert_eq!(
            first.text("omegi.error.outcome"),
            "caught in handle_request"
        );
        let stack: Vec<String> = first
            .text("exception.stacktrace")
            .lines()
            .map(|line| line.rsplit('/').next().unwrap().to_owned())
            .collect();
        // The throw site, then the line of each call on the way there.
        assert_eq!(
            stack,
            vec![
                "errors_caught.cpp:13)",
                "errors_caught.cpp:18)",
                "errors_caught.cpp:23)",
                "errors_caught.cpp:29)",
                "errors_caught.cpp:56)"
            ]
        );
        assert!(first
            .text("exception.stacktrace")
            .starts_with("at check_range ("));

        // Caught, logged and rethrown: two legs of one exception.
        let (_, caught) = errors[1];
        assert_eq!(caught.flow(), vec!["check_range", "parse_field"]);
        assert_eq!(
            caught.text("omegi.error.outcome"),
            "caught in log_and_rethrow"
        );
        let (span, rethrown) = errors[2];
        assert_eq!(span.name, "log_and_rethrow");
        assert_eq!(rethrown.text("exception.type"), "ValidationError");
        assert_eq!(rethrown.text("exception.message"), "value 500 out of range");
        assert_eq!(rethrown.flow(), vec!["log_and_rethrow"]);
        assert_eq!(rethrown.text("omegi.error.outcome"), "caught in outer");
    }
}

#[test]
fn cpp_exception_nobody_catches_ends_in_sigabrt() {
    let traced = trace_unharmed("cpp/errors_uncaught.cpp", Linking::Pie, &[], &[]);
    assert_eq!(traced.status.signal(), Some(libc_sigabrt()));
    assert_eq!(
        names_of_errors(&traced.spans),
        vec!["load_config", "start_server", "main"]
    );
    let errors = exceptions(&traced.spans);
    assert_eq!(errors.len(), 1);
    let (span, error) = errors[0];
    assert_eq!(span.name, "load_config");
    assert_eq!(span.end(), "thread_exit");
    assert_eq!(error.text("exception.type"), "std::runtime_error");
    assert_eq!(error.text("exception.message"), "config file missing");
    assert_eq!(error.flow(), vec!["load_config", "start_server", "main"]);
    assert_eq!(
        error.text("omegi.error.outcome"),
        "the process was killed by SIGABRT"
    );
}

#[test]
fn cpp_exceptions_in_a_loop_on_threads_never_break_unwinding() {
    let traced = trace_unharmed("cpp/errors_stress.cpp", Linking::Pie, &[], &[]);
    // Seeds 0..600, a throw for every seed not ≡ 2 (mod 3).
    let errors = exceptions(&traced.spans);
    assert_eq!(errors.len(), 400);
    for (_, error) in &errors {
        assert_eq!(error.text("exception.type"), "std::out_of_range");
        assert_eq!(error.text("exception.message"), "bottom reached");
        assert_eq!(error.flow(), vec!["descend"; 9]);
        assert_eq!(error.text("omegi.error.outcome"), "caught in iteration");
    }
    assert_eq!(
        traced.spans.iter().filter(|span| span.is_error()).count(),
        400 * 9
    );
}

/// Go panics: an error made by `errors.New`, an index out of range and a
/// string, each recovered in a deferred call of `safely`; then one nobody
/// recovers, which ends the process with code 2. Each is an error trace with
/// the value's type and message, the calls it abandoned and its outcome.
/// And `os.Exit(3)` with `main.main` running is a failing exit.
#[test]
fn go_panics_and_failing_exits_are_error_traces() {
    for linking in [Linking::Pie, Linking::NoPie] {
        let described = |traced: &Traced| -> Vec<(String, String, String, Vec<String>)> {
            let mut errors: Vec<_> = exceptions(&traced.spans)
                .into_iter()
                .map(|(_, event)| {
                    (
                        event.text("exception.type"),
                        event.text("exception.message"),
                        event.text("omegi.error.outcome"),
                        event.flow(),
                    )
                })
                .collect();
            errors.sort();
            errors
        };
        let strings = |names: &[&str]| names.iter().map(|name| name.to_string()).collect();
        let caught = "caught in main.safely".to_owned();

        let traced = trace_unharmed("go/panics.go", linking, &["text"], &[]);
        assert_eq!(
            described(&traced),
            vec![
                (
                    "*errors.errorString".into(),
                    "negative amount".into(),
                    caught.clone(),
                    strings(&["main.charge", "main.checkout", "main.main.func1"]),
                ),
                (
                    "runtime.boundsError".into(),
                    "runtime error: index out of range [6] with length 3".into(),
                    caught.clone(),
                    strings(&["main.lookup", "main.main.func2"]),
                ),
                (
                    "string".into(),
                    "out of stock".into(),
                    caught.clone(),
                    strings(&["main.shout", "main.main.func3"]),
                ),
            ],
            "{linking:?}"
        );
        // The recovering call returned; the deferred call that recovered ran
        // under the panicking one, and returned too.
        for span in &traced.spans {
            let abandoned = matches!(
                span.name.as_str(),
                "main.charge" | "main.checkout" | "main.lookup" | "main.shout"
            ) || span.name.starts_with("main.main.func");
            if span.name == "main.charge" && !span.is_error() {
                // charge(1) returned before charge(-2) panicked.
                assert_eq!(span.end(), "returned");
                continue;
            }
            assert_eq!(span.is_error(), abandoned, "{span:?}");
            assert_eq!(
                span.end(),
                if abandoned { "unwound" } else { "returned" },
                "{span:?}"
            );
        }

        // Then a panic nobody recovers (Go exits with 2), and os.Exit(3):
        // one error each besides the recovered ones.
        for (mode, code, ending) in [
            (
                "crash",
                2,
                (
                    "*errors.errorString",
                    "negative amount",
                    strings(&["main.charge", "main.checkout", "main.main"]),
                ),
            ),
            (
                "exit",
                3,
                (
                    "exit",
                    "exit(3) with traced calls running",
                    strings(&["main.main"]),
                ),
            ),
        ] {
            let traced = trace_unharmed("go/panics.go", linking, &[mode], &[]);
            assert_eq!(traced.status.code(), Some(code), "{mode}");
            let uncaught: Vec<_> = described(&traced)
                .into_iter()
                .filter(|(_, _, outcome, _)| outcome != &caught)
                .collect();
            let (type_name, message, flow) = ending;
            assert_eq!(
                uncaught,
                vec![(
                    type_name.into(),
                    message.into(),
                    format!("the process exited with code {code}"),
                    flow,
                )],
                "{mode} {linking:?}"
            );
        }
    }
}

#[test]
fn rust_panics_caught_and_ending_a_thread() {
    for linking in [Linking::Pie, Linking::NoPie] {
        let traced = trace_unharmed("rust/errors_panics.rs", linking, &[], &[]);
        let traces = traces(&traced.spans);
        let shapes: Vec<String> = traces.iter().map(|trace| trace.shape()).collect();
        assert_eq!(
            shapes,
            vec![
                "errors_panics::main(\
                 errors_panics::handle_request(errors_panics::handle_request::{{closure}}(\
                 errors_panics::parse_field(errors_panics::check_range))) \
                 errors_panics::handle_request(errors_panics::handle_request::{{closure}}(\
                 errors_panics::parse_field(errors_panics::check_range))))",
                "errors_panics::main::{{closure}}(errors_panics::worker(\
                 errors_panics::parse_field(errors_panics::check_range)))",
            ]
        );
        let errors = exceptions(&traced.spans);
        assert_eq!(errors.len(), 2);
        let caught = errors
            .iter()
            .find(|(_, e)| {
                e.text("omegi.error.outcome") == "caught in errors_panics::handle_request"
            })
            .expect("the caught panic");
        assert_eq!(caught.1.text("exception.type"), "panic");
        assert_eq!(caught.1.text("exception.message"), "value 700 out of range");
        assert_eq!(
            caught.1.flow(),
            vec![
                "errors_panics::check_range",
                "errors_panics::parse_field",
                "errors_panics::handle_request::{{closure}}"
            ]
        );
        let ended = errors
            .iter()
            .find(|(_, e)| e.text("omegi.error.outcome") == "ended its thread")
            .expect("the panic that ended its thread");
        assert_eq!(ended.1.text("exception.message"), "value 900 out of range");
        assert_eq!(ended.1.flow().len(), 4);
        // The first request returned normally: none of its spans is an error.
        let first_request: Vec<&SpanRecord> = traces[0]
            .spans
            .iter()
            .filter(|span| span.end() == "returned" && span.name != "errors_panics::main")
            .collect();
        assert!(first_request.iter().all(|span| !span.is_error()));
        assert_eq!(
            traced.spans.iter().filter(|span| span.is_error()).count(),
            7
        );
    }
}

#[test]
fn rust_panics_in_optimized_builds_with_a_hook_of_their_own() {
    for profile in [Profile::Release, Profile::ReleaseLto] {
        for linking in [Linking::Pie, Linking::NoPie] {
            let what = format!("{profile:?} {linking:?}");
            let traced = trace_unharmed_as("rust/release_panics.rs", linking, profile, &[], &[]);
            let errors = exceptions(&traced.spans);
            let mut caught: Vec<(String, Vec<String>)> = errors
                .iter()
                .filter(|(_, e)| {
                    e.text("omegi.error.outcome") == "caught in release_panics::handle_request"
                })
                .map(|(_, e)| (e.text("exception.message"), e.flow()))
                .collect();
            caught.sort();
            // catch_unwind and its closure are inlined into handle_request:
            // the flow is the two calls the panic left.
            let flow = vec![
                "release_panics::check_range".to_owned(),
                "release_panics::parse_field".to_owned(),
            ];
            assert_eq!(
                caught,
                vec![
                    ("the answer is not allowed".to_owned(), flow.clone()),
                    ("value 700 out of range".to_owned(), flow.clone()),
                ],
                "{what}: the caught panics, with messages the program's own hook did not hide"
            );
            let ended: Vec<_> = errors
                .iter()
                .filter(|(_, e)| e.text("omegi.error.outcome") == "ended its thread")
                .collect();
            assert_eq!(ended.len(), 1, "{what}: {errors:?}");
            assert_eq!(
                ended[0].1.text("exception.message"),
                "value 900 out of range"
            );
            assert_eq!(
                ended[0].1.flow(),
                vec![
                    "release_panics::check_range",
                    "release_panics::parse_field",
                    "release_panics::worker"
                ],
                "{what}: worker did not catch the panic, it was left by it"
            );
            assert_eq!(errors.len(), 3, "{what}: {errors:?}");
            // The first request returned: nothing of it is an error.
            assert_eq!(
                traced.spans.iter().filter(|span| span.is_error()).count(),
                2 + 2 + 3,
                "{what}"
            );
        }
    }
}

#[test]
fn cpp_exceptions_in_optimized_builds() {
    for profile in [Profile::Release, Profile::ReleaseLto] {
        let traced = trace_unharmed_as("cpp/errors_caught.cpp", Linking::Pie, profile, &[], &[]);
        let mut errors: Vec<(String, String, Vec<String>)> = exceptions(&traced.spans)
            .iter()
            .map(|(_, e)| {
                (
                    e.text("exception.message"),
                    e.text("omegi.error.outcome"),
                    e.flow(),
                )
            })
            .collect();
        errors.sort();
        // -O2 inlines parse_field, parse_record and log_and_rethrow (the
        // rethrow happens inside outer): only check_range is left between
        // the throw and each catcher. -flto inlines outer into main too, so
        // main is where that catch is.
        let outer = match profile {
            Profile::ReleaseLto => "caught in main",
            _ => "caught in outer",
        };
        assert_eq!(
            errors,
            vec![
                (
                    "value 500 out of range".to_owned(),
                    outer.to_owned(),
                    vec!["check_range".to_owned()]
                ),
                (
                    "value 700 out of range".to_owned(),
                    "caught in handle_request".to_owned(),
                    vec!["check_range".to_owned()]
                ),
            ],
            "{profile:?}"
        );
    }
}

#[test]
fn rust_panic_abort_in_optimized_builds_ends_in_sigabrt() {
    for profile in [Profile::Release, Profile::ReleaseLto] {
        let traced = trace_unharmed_as("rust/errors_abort.rs", Linking::Pie, profile, &[], &[]);
        assert_eq!(traced.status.signal(), Some(libc_sigabrt()), "{profile:?}");
        let errors = exceptions(&traced.spans);
        assert_eq!(errors.len(), 1, "{profile:?}");
        let (_, error) = errors[0];
        assert_eq!(
            error.text("exception.message"),
            "empty input",
            "{profile:?}"
        );
        // read_header and decode are inlined into main.
        assert_eq!(error.flow(), vec!["errors_abort::main"], "{profile:?}");
        assert_eq!(
            error.text("omegi.error.outcome"),
            "the process was killed by SIGABRT"
        );
    }
}

#[test]
fn rust_panic_with_panic_abort_ends_in_sigabrt() {
    let traced = trace_unharmed("rust/errors_abort.rs", Linking::Pie, &[], &[]);
    assert_eq!(traced.status.signal(), Some(libc_sigabrt()));
    let errors = exceptions(&traced.spans);
    assert_eq!(errors.len(), 1);
    let (_, error) = errors[0];
    assert_eq!(error.text("exception.type"), "panic");
    assert_eq!(error.text("exception.message"), "empty input");
    assert_eq!(
        error.flow(),
        vec![
            "errors_abort::read_header",
            "errors_abort::decode",
            "errors_abort::main"
        ]
    );
    assert_eq!(
        error.text("omegi.error.outcome"),
        "the process was killed by SIGABRT"
    );
}

#[test]
fn rust_panics_in_a_loop_on_threads_never_break_unwinding() {
    let traced = trace_unharmed("rust/errors_stress.rs", Linking::Pie, &[], &[]);
    let errors = exceptions(&traced.spans);
    assert_eq!(errors.len(), 400);
    let mut flow = vec!["errors_stress::descend"; 9];
    flow.push("errors_stress::iteration::{{closure}}");
    for (_, error) in &errors {
        assert_eq!(error.text("exception.type"), "panic");
        assert_eq!(error.flow(), flow);
        assert_eq!(
            error.text("omegi.error.outcome"),
            "caught in errors_stress::iteration"
        );
    }
}

#[test]
fn fatal_signals_close_the_trace_as_an_error() {
    for (mode, signal, flow) in [
        ("segv", "SIGSEGV", vec!["read_value", "run", "main"]),
        ("fpe", "SIGFPE", vec!["divide", "run", "main"]),
        ("bus", "SIGBUS", vec!["touch_mapping", "run", "main"]),
        ("ill", "SIGILL", vec!["run", "main"]),
        ("abort", "SIGABRT", vec!["run", "main"]),
    ] {
        let traced = trace_unharmed("c/errors_signals.c", Linking::Pie, &[mode], &[]);
        assert!(
            traced.status.signal().is_some(),
            "{mode}: not killed by a signal"
        );
        let errors = exceptions(&traced.spans);
        assert_eq!(errors.len(), 1, "{mode}");
        let (span, error) = errors[0];
        assert_eq!(span.name, flow[0], "{mode}");
        assert_eq!(error.text("exception.type"), signal, "{mode}");
        assert_eq!(error.flow(), flow, "{mode}");
        assert_eq!(
            error.text("omegi.error.outcome"),
            format!("the process was killed by {signal}")
        );
        assert_eq!(names_of_errors(&traced.spans), flow, "{mode}");
    }
}

#[test]
fn a_failing_exit_with_calls_running_is_an_error() {
    let traced = trace_unharmed("c/errors_signals.c", Linking::NoPie, &["exit"], &[]);
    assert_eq!(traced.status.code(), Some(3));
    let errors = exceptions(&traced.spans);
    assert_eq!(errors.len(), 1);
    let (_, error) = errors[0];
    assert_eq!(error.text("exception.type"), "exit");
    assert_eq!(error.flow(), vec!["fail", "run", "main"]);
    assert_eq!(
        error.text("omegi.error.outcome"),
        "the process exited with code 3"
    );
}

#[test]
fn no_error_no_error_trace() {
    let traced = trace_unharmed("c/errors_signals.c", Linking::Pie, &["none"], &[]);
    assert!(exceptions(&traced.spans).is_empty());
    assert!(names_of_errors(&traced.spans).is_empty());
    // Without a rule, a -1 return is just a return.
    let traced = trace_unharmed("c/errors_signals.c", Linking::Pie, &["returns"], &[]);
    assert!(names_of_errors(&traced.spans).is_empty());
}

#[test]
fn return_value_rules_mark_failing_calls() {
    let traced = trace_unharmed(
        "c/errors_signals.c",
        Linking::Pie,
        &["returns"],
        &["--error-if", "parse_*:ret<0"],
    );
    let digits: Vec<&SpanRecord> = traced
        .spans
        .iter()
        .filter(|span| span.name == "parse_digit")
        .collect();
    assert_eq!(digits.len(), 2);
    assert!(!digits[0].is_error());
    assert!(digits[1].is_error());
    let errors = exceptions(&traced.spans);
    assert_eq!(errors.len(), 1);
    let (_, error) = errors[0];
    assert_eq!(error.text("exception.type"), "return value");
    assert_eq!(
        error.text("exception.message"),
        "returned -1 (--error-if parse_*:ret<0)"
    );
    assert_eq!(error.flow(), vec!["parse_digit"]);
    assert_eq!(names_of_errors(&traced.spans), vec!["parse_digit"]);
}

#[test]
fn a_bad_return_value_rule_is_refused() {
    let exe = fixtures::build("c/errors_signals.c", Linking::Pie);
    let traced = agent().trace(&exe, &["returns"], &["--error-if", "parse_*:ret<<0"]);
    assert_eq!(traced.status.code(), Some(1));
    let lines: Vec<&str> = traced.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", traced.stderr);
    assert!(lines[0].starts_with("omegi-agent: error: OMEGI_ERROR_IF (--error-if)"));
    assert!(lines[0].contains("GLOB:ret OP INTEGER"));
    assert!(traced.stdout.is_empty(), "the program must not have run");
}

/// The functions of `rust/results.rs` whose `Result` comes back in
/// registers, each called once with `Ok` and then once with `Err`.
const RESULT_FUNCTIONS: [&str; 11] = [
    "results::boxed_error",
    "results::check_unit",
    "results::find_config",
    "results::is_even",
    "results::make_box",
    "results::parse_i32",
    "results::parse_u32",
    "results::parse_u64",
    "results::parse_usize",
    "results::unit_error",
    "results::write_all",
];

/// The agent's lines for the functions `results::*:err` cannot check: the
/// two returned through memory, the one that cannot fail, and (optimized)
/// `write_all`'s tail jump.
fn result_warnings(profile: Profile) -> Vec<String> {
    let rule = "--error-if 'results::*:err'";
    let mut lines = vec![
        format!(
            "omegi-agent: warning: {rule} is not applied to results::in_memory: its \
             Result<alloc::string::String, results::Code> (24 bytes) is returned through \
             memory, not in registers"
        ),
        format!(
            "omegi-agent: warning: {rule} is not applied to results::wide_in_memory: its \
             Result<u64, results::Code> (16 bytes) is returned through memory, not in registers"
        ),
    ];
    lines.push(format!(
        "omegi-agent: warning: {rule} is not applied to results::never_fails: DWARF gives its \
         Result<u32, core::convert::Infallible> no Ok/Err discriminant (a Result whose error \
         type has no value, such as Infallible, never returns Err)"
    ));
    if profile != Profile::Debug {
        lines.push(format!(
            "omegi-agent: warning: {rule}: calls of results::write_all that leave by a tail \
             jump are not checked (the function jumped to makes the Result, and omegi does not \
             see it return)"
        ));
    }
    lines.sort();
    lines
}

#[test]
fn result_err_rules_mark_exactly_the_calls_that_returned_err() {
    for profile in [Profile::Debug, Profile::Release, Profile::ReleaseLto] {
        let exe = fixtures::build_as("rust/results.rs", Linking::Pie, profile);
        let traced = agent().trace(&exe, &["refused"], &["--error-if", "results::*:err"]);
        let plain = run::untraced(&exe, &["refused"]);
        assert_eq!(
            traced.status.code(),
            Some(0),
            "{profile:?}: {}",
            traced.stderr
        );
        assert_eq!(traced.stdout, String::from_utf8_lossy(&plain.stdout));
        let mut warnings: Vec<String> = traced.agent_stderr().lines().map(str::to_owned).collect();
        warnings.sort();
        assert_eq!(warnings, result_warnings(profile), "{profile:?}");
        for trace in traces(&traced.spans) {
            trace.check_well_formed();
        }
        // In an optimized build write_all's Err is made by the function it
        // jumps to: that call is not checked (the agent said so above).
        let expected: Vec<&str> = RESULT_FUNCTIONS
            .iter()
            .copied()
            .filter(|name| profile == Profile::Debug || *name != "results::write_all")
            .collect();
        let mut errors = names_of_errors(&traced.spans);
        errors.sort();
        assert_eq!(
            errors, expected,
            "{profile:?}: exactly one Err call of each"
        );
        for name in RESULT_FUNCTIONS {
            let mut calls: Vec<&SpanRecord> = traced
                .spans
                .iter()
                .filter(|span| span.name == name)
                .collect();
            calls.sort_by_key(|span| span.start_time_unix_nano);
            assert_eq!(calls.len(), 2, "{profile:?} {name}");
            assert!(!calls[0].is_error(), "{profile:?} {name}: the Ok call");
            if expected.contains(&name) {
                assert!(calls[1].is_error(), "{profile:?} {name}: the Err call");
            }
        }
        // Memory-returned shapes are not guessed at: never errors.
        assert!(traced
            .spans
            .iter()
            .filter(|span| span.name.contains("in_memory"))
            .all(|span| !span.is_error()));
        let errors = exceptions(&traced.spans);
        assert_eq!(
            errors.len(),
            expected.len(),
            "{profile:?}: one error trace each"
        );
        let (span, error) = errors
            .iter()
            .find(|(span, _)| span.name == "results::check_unit")
            .unwrap();
        assert!(span.is_error());
        assert_eq!(error.text("exception.type"), "results::Code");
        assert_eq!(
            error.text("exception.message"),
            "returned Err (--error-if results::*:err)"
        );
        assert_eq!(error.flow(), vec!["results::check_unit"]);
    }
}

#[test]
fn result_err_rules_survive_min_duration() {
    // The kernel evaluates the rule too: a failing call is never filtered.
    let exe = fixtures::build("rust/results.rs", Linking::Pie);
    let traced = agent().trace(
        &exe,
        &[] as &[&str],
        &[
            "--error-if",
            "results::{check_unit,is_even,parse_u64,write_all}:err",
            "--min-duration",
            "10s",
        ],
    );
    assert_eq!(traced.status.code(), Some(0), "{}", traced.stderr);
    let mut errors = names_of_errors(&traced.spans);
    errors.sort();
    assert_eq!(
        errors,
        vec![
            "results::check_unit",
            "results::is_even",
            "results::parse_u64",
            "results::write_all"
        ]
    );
    // The Ok calls were short: left out.
    for name in ["results::check_unit", "results::parse_u32"] {
        assert!(traced
            .spans
            .iter()
            .filter(|s| s.name == name)
            .all(SpanRecord::is_error));
    }
}

#[test]
fn a_result_err_rule_with_nothing_to_read_is_refused() {
    let exe = fixtures::build("rust/results.rs", Linking::Pie);
    for (rule, why) in [
        (
            "results::in_memory:err",
            "results::in_memory: its Result<alloc::string::String, results::Code> (24 bytes) \
             is returned through memory, not in registers",
        ),
        (
            "results::never_fails:err",
            "results::never_fails: DWARF gives its Result<u32, core::convert::Infallible> no \
             Ok/Err discriminant (a Result whose error type has no value, such as Infallible, \
             never returns Err)",
        ),
        (
            "results::main:err",
            "none of the 1 traced functions matching it returns a Result (by DWARF)",
        ),
        ("nothing::here:err", "no traced function matches it"),
    ] {
        let traced = agent().trace(&exe, &["refused"], &["--error-if", rule]);
        assert_eq!(traced.status.code(), Some(1), "{rule}");
        let lines: Vec<&str> = traced.stderr.lines().collect();
        assert_eq!(
            lines,
            vec![format!("omegi-agent: error: --error-if '{rule}': {why}")],
            "{rule}"
        );
        assert!(
            traced.stdout.is_empty(),
            "{rule}: the program must not have run"
        );
    }
}

fn libc_sigabrt() -> i32 {
    6
}

#[test]
fn leaf_functions_get_uretprobes_and_exceptions_still_unwind() {
    let exe = fixtures::build("cpp/leaves.cpp", Linking::Pie);
    let listing = std::process::Command::new(env!("CARGO_BIN_EXE_omegi-agent"))
        .arg("--project-root")
        .arg(fixtures::sources_dir())
        .arg("--list")
        .arg("--binary")
        .arg(&exe)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let line_of = |name: &str| {
        listing
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not listed:\n{listing}"))
            .to_owned()
    };
    assert!(
        listing.contains("uretprobes on leaf functions"),
        "{listing}"
    );
    for leaf in ["scale", "clamp"] {
        assert!(line_of(leaf).ends_with("(leaf: uretprobe)"), "{listing}");
    }
    for caller in ["step", "run", "main"] {
        assert!(!line_of(caller).contains("leaf"), "{listing}");
    }

    let traced = trace_unharmed("cpp/leaves.cpp", Linking::Pie, &[], &[]);
    assert_eq!(traced.stdout, "sum 425 errors 23\n");
    for leaf in ["scale", "clamp"] {
        let calls: Vec<&SpanRecord> = traced.spans.iter().filter(|s| s.name == leaf).collect();
        assert_eq!(calls.len(), 40, "{leaf}");
        assert!(calls.iter().all(|s| s.end() == "returned" && !s.is_error()));
    }
    let errors = exceptions(&traced.spans);
    assert_eq!(errors.len(), 23);
    for (_, error) in &errors {
        assert_eq!(error.flow(), vec!["step"]);
        assert_eq!(error.text("omegi.error.outcome"), "caught in run");
    }
}

#[test]
fn no_leaf_uretprobes_where_a_signal_handler_may_unwind() {
    // -fnon-call-exceptions lets a signal handler throw through a leaf.
    let exe = fixtures::build("cpp/leaves_noncall.cpp", Linking::Pie);
    let listing = std::process::Command::new(env!("CARGO_BIN_EXE_omegi-agent"))
        .arg("--project-root")
        .arg(fixtures::sources_dir())
        .args(["--list", "--binary"])
        .arg(&exe)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(
        listing
            .lines()
            .next()
            .unwrap()
            .contains("returns by return sites, the binary can unwind"),
        "{listing}"
    );
    assert!(!listing.contains("leaf"), "{listing}");
}
