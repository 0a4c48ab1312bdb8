//! Issue 5: what omegi does to keep its cost down — uprobe_multi links,
//! `--min-duration` and the overhead budget — checked for what they keep and
//! drop, never for how fast they are.

use std::{collections::HashMap, path::Path};

use omegi_tests::{
    fixtures::{self, Linking},
    run::{self, Agent, Traced},
    spans::{parse_lines, traces, SpanRecord},
};

fn agent() -> Agent {
    Agent::new(env!("CARGO_BIN_EXE_omegi-agent"))
}

/// Like `Agent::trace`, with the agent's info lines (the summary) on stderr.
fn trace_verbose(exe: &Path, extra: &[&str]) -> Traced {
    let dir = omegi_tests::scratch_dir("overhead");
    let spans_file = dir.join("spans.jsonl");
    let mut command = agent().command(extra, &spans_file);
    command.env("OMEGI_LOG", "info").arg("--").arg(exe);
    let (status, stdout, stderr) = run::run_to_end(command);
    Traced {
        status,
        stdout,
        stderr,
        spans: parse_lines(&std::fs::read_to_string(&spans_file).unwrap_or_default()),
    }
}

fn by_name(spans: &[SpanRecord]) -> HashMap<&str, Vec<&SpanRecord>> {
    let mut names: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
    for span in spans {
        names.entry(span.name.as_str()).or_default().push(span);
    }
    names
}

#[test]
fn uprobe_multi_and_single_links_trace_alike() {
    let exe = fixtures::build("c/calls.c", Linking::Pie);
    for (mode, said) in [
        ("multi", "with uprobe_multi links"),
        ("single", "one link per probe"),
    ] {
        for returns in ["auto", "sites"] {
            let traced = trace_verbose(&exe, &["--attach-mode", mode, "--return-probes", returns]);
            assert_eq!(traced.status.code(), Some(3), "{}", traced.stderr);
            assert!(traced.stderr.contains(said), "{mode}: {}", traced.stderr);
            let traces = traces(&traced.spans);
            let shapes: Vec<String> = traces.iter().map(|t| t.shape()).collect();
            assert_eq!(
                shapes,
                vec![
                    "main(compute(leaf fib(fib(fib fib) fib)))",
                    "worker(compute(leaf leaf fib(fib(fib fib) fib)))",
                ],
                "{mode} {returns}"
            );
            for trace in &traces {
                trace.check_well_formed();
            }
        }
    }
}

#[test]
fn min_duration_keeps_error_paths_and_ancestors() {
    let exe = fixtures::build("c/min_duration.c", Linking::Pie);
    let min_ns = 20_000_000;
    let traced = trace_verbose(
        &exe,
        &[
            "--min-duration",
            "20ms",
            "--error-if",
            "failing_check:ret<0",
        ],
    );
    let plain = run::untraced(&exe, &[] as &[&str]);
    assert_eq!(traced.status.code(), Some(0), "{}", traced.stderr);
    assert_eq!(traced.stdout.as_bytes(), plain.stdout.as_slice());

    let names = by_name(&traced.spans);
    let count = |name: &str| names.get(name).map_or(0, Vec::len);
    // Long enough.
    for name in ["main", "run", "slow_parent", "slow_child"] {
        assert_eq!(count(name), 1, "{name} kept: {:?}", names.keys());
    }
    // The failing check, and its short caller.
    assert_eq!(count("failing_check"), 1, "only the failing call");
    assert!(names["failing_check"][0].is_error());
    assert_eq!(count("short_caller"), 1);
    // Frames left by longjmp, and the short function they were under.
    for name in ["deep", "deeper"] {
        assert_eq!(count(name), 1, "{name}");
        assert_eq!(names[name][0].end(), "unwound", "{name}");
    }
    assert_eq!(count("jumper"), 1);
    // The short calls are (nearly all) gone; a stray one would have had to
    // last 20 ms.
    assert!(
        count("fast_leaf") <= 10,
        "{} fast_leaf kept",
        count("fast_leaf")
    );

    // Every kept span earned it.
    let kept_children: HashMap<&str, usize> =
        traced
            .spans
            .iter()
            .fold(HashMap::new(), |mut parents, span| {
                *parents.entry(span.parent_span_id.as_str()).or_default() += 1;
                parents
            });
    for span in &traced.spans {
        let earned = span.duration_ns() >= min_ns
            || span.is_error()
            || span.end() != "returned"
            || kept_children.contains_key(span.span_id.as_str());
        assert!(earned, "{} kept without reason: {span:?}", span.name);
    }
    for trace in traces(&traced.spans) {
        trace.check_well_formed();
    }

    // The calls left out are counted, and called a choice.
    let filtered = traced
        .stderr
        .lines()
        .find_map(|line| {
            let (before, _) = line.split_once(" calls shorter than --min-duration left out")?;
            before.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("no count of calls left out: {}", traced.stderr));
    assert!(filtered >= 990, "{filtered} left out");
    assert!(traced.stderr.contains("by choice, not lost"));
    assert!(!traced.stderr.contains("dropped:"), "{}", traced.stderr);
}

#[test]
fn the_overhead_budget_detaches_a_hot_function_and_keeps_the_others() {
    let exe = fixtures::build("c/hot.c", Linking::Pie);
    for mode in ["multi", "single"] {
        let traced = trace_verbose(
            &exe,
            &["--overhead-budget", "10000,1s", "--attach-mode", mode],
        );
        assert_eq!(traced.status.code(), Some(0), "{}", traced.stderr);
        let counts: HashMap<&str, u64> = traced
            .stdout
            .split_whitespace()
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                Some((key, value.parse().ok()?))
            })
            .collect();
        let names = by_name(&traced.spans);
        let spans_of = |name: &str| names.get(name).map_or(0, Vec::len) as u64;

        assert!(
            traced.stderr.contains("warning: detached hot: "),
            "{mode}: {}",
            traced.stderr
        );
        assert!(
            traced
                .stderr
                .contains("1 function detached by the overhead budget (--overhead-budget): hot"),
            "{mode}: {}",
            traced.stderr
        );
        assert!(
            spans_of("hot") < counts["hot"],
            "{mode}: hot still traced to the end"
        );
        // Every call of the others is seen exactly once, before and after
        // their probes were linked again without `hot`.
        assert_eq!(spans_of("cold"), counts["cold"], "{mode}: cold");
        assert_eq!(spans_of("main"), 1, "{mode}: main");
        assert_eq!(names["main"][0].end(), "returned", "{mode}: main");
        assert!(!traced.stderr.contains("dropped:"), "{}", traced.stderr);
    }
}

#[test]
fn thread_stacks_in_slots_and_in_the_hash_map_trace_alike() {
    // Default: every thread in its own array slot; 1: the first thread in
    // the slot, the others in the hash map; 0: all in the hash map.
    let calls = fixtures::build("c/calls.c", Linking::Pie);
    let caught = fixtures::build("cpp/errors_caught.cpp", Linking::Pie);
    let summary = |traced: &Traced| {
        let shapes: Vec<String> = traces(&traced.spans).iter().map(|t| t.shape()).collect();
        let errors: Vec<(String, Vec<String>)> = omegi_tests::spans::exceptions(&traced.spans)
            .into_iter()
            .map(|(span, event)| (span.name.clone(), event.flow()))
            .collect();
        (traced.status.code(), shapes, errors)
    };
    for exe in [&calls, &caught] {
        let reference = summary(&agent().trace(exe, &[] as &[&str], &[]));
        assert!(!reference.1.is_empty());
        for slots in ["1", "0"] {
            let traced = agent().trace(exe, &[] as &[&str], &["--thread-slots", slots]);
            for trace in traces(&traced.spans) {
                trace.check_well_formed();
            }
            assert_eq!(summary(&traced), reference, "--thread-slots {slots}");
        }
    }
}
