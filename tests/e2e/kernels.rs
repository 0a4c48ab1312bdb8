//! What depends on the kernel (issue 13): the `--check` report, and the
//! mechanisms older kernels need, exercised on this one: probes that find
//! their function by address (kernels before 5.15 have no attach cookies)
//! and links of one probe each (before 6.6, no `uprobe_multi`). Each must see
//! exactly what the default mechanism sees. The same suite runs on older
//! kernels in VMs (`cargo xtask test --kernel`), where the defaults are those
//! mechanisms.

use std::{
    io::{BufRead, BufReader, Read},
    os::unix::fs::FileExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

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
        "HTTP spans       syscall tracepoints attached, sockets found through BTF",
        "error path       all 9 programs verified",
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
    // Where the kernel has no uprobe_multi at all (before 6.6), that is
    // the reason given.
    assert!(
        line.contains("uprobe_multi")
            && (line.contains("--probe-lookup") || line.contains("Linux 6.6+")),
        "{line}"
    );
}

/// The byte at `address` of process `pid`'s memory: a uprobe there is an
/// `int3` (0xcc) written into the process's copy of the page.
fn code_byte(pid: u32, address: u64) -> u8 {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut byte = [0u8];
    mem.read_exact_at(&mut byte, address).unwrap();
    byte[0]
}

/// The link-time address of `symbol` in `exe` (non-PIE: also its address
/// in the process).
fn symbol_address(exe: &std::path::Path, symbol: &str) -> u64 {
    let output = Command::new("nm").arg(exe).output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.next()?;
            let name = fields.nth(1)?;
            (name == symbol).then(|| u64::from_str_radix(address, 16).ok())?
        })
        .unwrap_or_else(|| panic!("no {symbol} in {}", exe.display()))
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn no_probe_survives_a_kill_9_of_the_agent() {
    let exe = fixtures::build("c/steady.c", Linking::NoPie);
    let tick = symbol_address(&exe, "tick");
    let mut program = Command::new(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = program.id();
    let mut stdout = BufReader::new(program.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let original = code_byte(pid, tick);
    assert_ne!(original, 0xcc);

    let mut agent = agent()
        .command(&[], &omegi_tests::scratch_dir("kill9").join("spans.jsonl"))
        .arg("--pid")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the entry probe on tick", run::RUN_TIMEOUT, || {
        code_byte(pid, tick) == 0xcc
    });
    agent.kill().unwrap();
    agent.wait().unwrap();
    // The kernel removes the probes with the agent's last descriptor.
    wait_for(
        "the probe gone after kill -9",
        Duration::from_secs(30),
        || code_byte(pid, tick) == original,
    );

    drop(program.stdin.take());
    let status = run::wait_with_timeout(&mut program, run::RUN_TIMEOUT).expect("steady exits");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!((status.code(), rest.as_str()), (Some(0), "ticks counted\n"));
}
