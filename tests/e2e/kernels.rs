//! What depends on the kernel (issue 13): the `--check` report, and the
//! mechanisms older kernels need, exercised on this one: probes that find
//! their function by address (kernels before 5.15 have no attach cookies)
//! and links of one probe each (before 6.6, no `uprobe_multi`). Each must see
//! exactly what the default mechanism sees. The same suite runs on older
//! kernels in VMs (`cargo xtask test --kernel`), where the defaults are those
//! mechanisms.

use std::process::Command;

use omegi_tests::{
    fixtures::{self, Linking, Profile},
    run::{self, Agent, Traced},
    spans::{exceptions, traces},
};

fn agent() -> Agent {
    Agent::new(env!("CARGO_BIN_EXE_omegi-agent"))
}

#[test]
fn check_reports_what_this_kernel_allows() {
    let output = Command::new(env!("CARGO_BIN_EXE_omegi-agent"))
        .arg("--check")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        stdout.starts_with(&format!("kernel {}", release.trim())),
        "{stdout}"
    );
    for line in [
        "privileges       yes",
        "uprobes          yes",
        "attach cookies   ",
        "uprobe_multi     ",
        "function probes  verified (",
        "tracepoints      fork, exit, fatal signals and exit_group attached",
        "error path       all 7 programs verified",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(
        stdout.ends_with("omegi can trace on this kernel\n"),
        "{stdout}"
    );
}

#[test]
fn check_takes_no_target() {
    let output = Command::new(env!("CARGO_BIN_EXE_omegi-agent"))
        .args(["--check", "--pid", "1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("'--check' cannot be used with"), "{stderr}");
}

/// What a run saw, in a form that does not depend on ids or timing: each
/// trace's shape with how calls ended, sorted, and each error's type,
/// message, flow and outcome.
fn seen(traced: &Traced) -> (Vec<String>, Vec<String>) {
    let mut shapes: Vec<String> = traces(&traced.spans)
        .iter()
        .map(|trace| trace.shape_with_ends())
        .collect();
    shapes.sort();
    let mut errors: Vec<String> = exceptions(&traced.spans)
        .iter()
        .map(|(span, event)| {
            format!(
                "{} {}: {} [{}] {}",
                span.name,
                event.text("exception.type"),
                event.text("exception.message"),
                event.flow().join(" > "),
                event.text("omegi.error.outcome")
            )
        })
        .collect();
    errors.sort();
    (shapes, errors)
}

#[test]
fn probes_found_by_address_and_single_links_see_what_the_defaults_see() {
    let cases = [
        ("c/calls.c", Linking::Pie, Profile::Debug),
        ("c/calls.c", Linking::NoPie, Profile::Debug),
        ("c/calls.c", Linking::Pie, Profile::Release),
        ("cpp/errors_caught.cpp", Linking::Pie, Profile::Debug),
        ("cpp/errors_caught.cpp", Linking::NoPie, Profile::Release),
        ("rust/errors_panics.rs", Linking::Pie, Profile::Debug),
        ("rust/release_panics.rs", Linking::Pie, Profile::Release),
    ];
    for (file, linking, profile) in cases {
        let exe = fixtures::build_as(file, linking, profile);
        let plain = run::untraced(&exe, &[] as &[&str]);
        let default = agent().trace(&exe, &[] as &[&str], &[]);
        let (shapes, errors) = seen(&default);
        assert!(!shapes.is_empty(), "{file}: nothing traced");
        for extra in [
            &["--attach-mode", "single"][..],
            &["--attach-mode", "single", "--probe-lookup", "address"][..],
        ] {
            let what = format!("{file} {linking:?} {profile:?} {extra:?}");
            let traced = agent().trace(&exe, &[] as &[&str], extra);
            assert_eq!(traced.status.code(), plain.status.code(), "{what}");
            assert_eq!(
                traced.stdout,
                String::from_utf8_lossy(&plain.stdout),
                "{what}"
            );
            assert_eq!(traced.agent_stderr(), "", "{what}");
            assert_eq!(seen(&traced), (shapes.clone(), errors.clone()), "{what}");
        }
    }
}

#[test]
fn multi_links_refuse_probes_found_by_address() {
    let exe = fixtures::build("c/calls.c", Linking::Pie);
    let line = run::refused({
        let mut command = agent().command(
            &["--attach-mode", "multi", "--probe-lookup", "address"],
            &omegi_tests::scratch_dir("lookup").join("spans.jsonl"),
        );
        command.arg("--").arg(&exe);
        command
    });
    assert!(
        line.contains("uprobe_multi") && line.contains("--probe-lookup"),
        "{line}"
    );
}
