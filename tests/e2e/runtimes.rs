//! Runtimes that walk their own stacks by return address, where a uretprobe
//! is fatal wherever the walk meets it: Go (refused until it has a tracer of
//! its own) and OCaml (traced with probes on its exits only). Each program
//! is run for real, traced or refused, and must end exactly as untraced.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use omegi_agent::discovery::{DiscoveryError, FunctionTable, Selection};
use omegi_tests::{
    fixtures::{self, Linking},
    run::{self, refused, Agent},
};

const BOTH: [Linking; 2] = [Linking::Pie, Linking::NoPie];

fn agent() -> Agent {
    Agent::new(env!("CARGO_BIN_EXE_omegi-agent"))
}

fn agent_command(args: &[&str]) -> Command {
    agent();
    let mut command = Command::new(env!("CARGO_BIN_EXE_omegi-agent"));
    command
        .arg("--project-root")
        .arg(fixtures::sources_dir())
        .args(args);
    command
}

/// The Go fixture, built plain (PIE and not) and stripped with
/// `-ldflags=-s -w`.
fn go_builds() -> Vec<PathBuf> {
    let mut builds: Vec<PathBuf> = BOTH
        .iter()
        .map(|&linking| fixtures::build("go/growstack.go", linking))
        .collect();
    let dir = omegi_tests::scratch_dir("go-stripped");
    let stripped = dir.join("growstack-stripped");
    let status = fixtures::go_build()
        .args(["-ldflags=-s -w", "-o"])
        .arg(&stripped)
        .arg(fixtures::sources_dir().join("go/growstack.go"))
        .status()
        .unwrap();
    assert!(status.success());
    builds.push(stripped);
    builds
}

fn go_refusal(exe: &Path) -> String {
    format!(
        "omegi-agent: error: {} is a Go program (go1.19.8): omegi cannot trace Go programs yet, \
         and the probes it puts in C programs would crash one (the Go runtime walks and moves \
         goroutine stacks); nothing was attached",
        exe.display()
    )
}

#[test]
fn go_binaries_are_recognised_plain_pie_and_stripped() {
    for exe in go_builds() {
        let selection = Selection {
            project_root: "/".into(),
            include: vec![],
            exclude: vec![],
            debug_dirs: vec![],
        };
        match FunctionTable::discover(&exe, &selection) {
            Err(DiscoveryError::GoProgram { build, .. }) => {
                assert_eq!(build.version.as_deref(), Some("go1.19.8"), "{exe:?}");
            }
            other => panic!("{exe:?} not recognised as Go: {other:?}"),
        }
    }
}

#[test]
fn go_programs_are_refused_in_every_mode_and_never_started() {
    for exe in go_builds() {
        let path = exe.to_str().unwrap();
        let expected = go_refusal(&exe);
        // The command is not started: nothing on stdout, where it would
        // have printed its sum.
        assert_eq!(refused(agent_command(&["--", path])), expected);
        assert_eq!(refused(agent_command(&["--binary", path])), expected);
        assert_eq!(
            refused(agent_command(&["--list", "--binary", path])),
            expected
        );
        // Forcing uretprobes changes nothing.
        assert_eq!(
            refused(agent_command(&["--return-probes", "uretprobe", "--", path])),
            expected
        );
    }
}

/// `--pid` of a running Go program whose goroutine stacks keep growing: the
/// agent refuses, and the program ends exactly as it does untraced.
#[test]
fn go_program_refused_by_pid_runs_on_unharmed() {
    let exe = fixtures::build("go/growstack.go", Linking::Pie);
    let plain = run::untraced(&exe, &["40"]);
    assert!(plain.status.success());
    let mut program = Command::new(&exe)
        .arg("40")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let line = refused(agent_command(&["--pid", &program.id().to_string()]));
    assert_eq!(line, go_refusal(&std::fs::canonicalize(&exe).unwrap()));
    let status = run::wait_with_timeout(&mut program, run::RUN_TIMEOUT).unwrap();
    let output = program.wait_with_output().unwrap();
    assert_eq!(status.code(), plain.status.code());
    assert_eq!(output.stdout, plain.stdout);
    assert_eq!(output.stderr, plain.stderr);
}

/// OCaml's collector walks the stack of nested allocating calls while they
/// run: traced with probes on their exits (no uretprobe), the program is
/// unharmed and every call is a span.
#[test]
fn ocaml_is_traced_without_uretprobes_and_unharmed() {
    for linking in BOTH {
        let exe = fixtures::build("ocaml/gc_walk.ml", linking);
        let path = exe.to_str().unwrap();
        let (status, listing, stderr) =
            run::run_to_end(agent_command(&["--list", "--binary", path]));
        assert!(status.success(), "{stderr}");
        let summary = listing.lines().next().unwrap();
        assert!(
            summary.contains("returns by return sites, the OCaml runtime walks its stacks"),
            "{summary}"
        );
        assert!(!listing.contains("uretprobe"), "{listing}");

        let line = refused(agent_command(&["--return-probes", "uretprobe", "--", path]));
        assert!(line.contains("walks its own stack (OCaml, GHC)"), "{line}");

        let traced = agent().trace(&exe, &[] as &[&str], &[]);
        let plain = run::untraced(&exe, &[] as &[&str]);
        assert_eq!(
            traced.status.code(),
            plain.status.code(),
            "{}",
            traced.stderr
        );
        assert_eq!(traced.stdout, String::from_utf8_lossy(&plain.stdout));
        assert!(traced.stdout.starts_with("total "), "{}", traced.stdout);
        let count = |name: &str| {
            traced
                .spans
                .iter()
                .filter(|span| span.name.starts_with(name))
                .count()
        };
        // 1,000 lists of 40, built recursively (41 calls each) and folded
        // with a closure (once per element).
        assert_eq!(count("camlGc_walk__build_"), 41_000, "{linking:?}");
        assert_eq!(count("camlGc_walk__fun_"), 40_000, "{linking:?}");
        assert_eq!(count("camlGc_walk__checksum_"), 1_000, "{linking:?}");
    }
}
