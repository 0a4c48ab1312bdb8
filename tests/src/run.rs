//! Running fixtures, with and without the agent.

use std::{
    ffi::OsStr,
    io::Read,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use crate::spans::{parse_lines, SpanRecord};

/// Longest a fixture run may take before the test fails (and the run is
/// killed), on the host: [`wait_with_timeout`] stretches it in a VM
/// ([`crate::time_scale`]).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A traced run of a fixture.
#[derive(Debug)]
pub struct Traced {
    /// The agent's exit status (the program's, passed on).
    pub status: ExitStatus,
    /// Everything on stdout: the program's own output only, as the spans go
    /// to a file.
    pub stdout: String,
    /// Everything on stderr: the program's and the agent's lines.
    pub stderr: String,
    /// The spans the agent exported.
    pub spans: Vec<SpanRecord>,
}

impl Traced {
    /// The program's stderr: what is left once the agent's own lines
    /// (`omegi-agent: …`) are removed.
    pub fn program_stderr(&self) -> String {
        self.stderr
            .lines()
            .filter(|line| !line.starts_with("omegi-agent:"))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    /// The agent's own lines on stderr.
    pub fn agent_stderr(&self) -> String {
        self.stderr
            .lines()
            .filter(|line| line.starts_with("omegi-agent:"))
            .map(|line| format!("{line}\n"))
            .collect()
    }
}

/// The agent and the arguments every test run passes it.
#[derive(Clone, Debug)]
pub struct Agent {
    pub bin: PathBuf,
}

impl Agent {
    /// `bin` is `env!("CARGO_BIN_EXE_omegi-agent")` in the e2e tests.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        crate::require_root();
        Self { bin: bin.into() }
    }

    /// `omegi-agent [extra] --project-root tests/fixtures --format json
    /// --output FILE -- exe args`, waiting for it to end.
    pub fn trace<S: AsRef<OsStr>>(&self, exe: &Path, args: &[S], extra: &[&str]) -> Traced {
        let dir = crate::scratch_dir("trace");
        let spans_file = dir.join("spans.jsonl");
        let mut command = self.command(extra, &spans_file);
        command.arg("--").arg(exe).args(args);
        let (status, stdout, stderr) = run_to_end(command);
        let spans = parse_lines(&std::fs::read_to_string(&spans_file).unwrap_or_default());
        Traced {
            status,
            stdout,
            stderr,
            spans,
        }
    }

    /// Runs `--list --binary exe` with the fixtures' project root and
    /// `extra`: what would be traced, without attaching.
    pub fn list(&self, exe: &Path, extra: &[&str]) -> (ExitStatus, String, String) {
        let mut command = Command::new(&self.bin);
        command
            .arg("--project-root")
            .arg(crate::fixtures::sources_dir())
            .args(extra)
            .arg("--list")
            .arg("--binary")
            .arg(exe);
        run_to_end(command)
    }

    /// The agent command with the common arguments, writing spans to `spans_file`.
    pub fn command(&self, extra: &[&str], spans_file: &Path) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .arg("--project-root")
            .arg(crate::fixtures::sources_dir())
            .args(["--format", "json", "--quiet", "--output"])
            .arg(spans_file)
            .args(extra);
        command
    }
}

/// Runs `exe` without omegi.
pub fn untraced<S: AsRef<OsStr>>(exe: &Path, args: &[S]) -> Output {
    let mut command = Command::new(exe);
    command.args(args);
    let (status, stdout, stderr) = run_to_end(command);
    Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
    }
}

/// Runs to the end with piped output, failing the test after [`RUN_TIMEOUT`].
///
/// The command runs in a process group of its own, and a timeout kills the
/// whole group: a program the agent started would otherwise keep the pipes
/// open, and the test would wait on them forever instead of failing.
pub fn run_to_end(mut command: Command) -> (ExitStatus, String, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let stdout = reader(&mut child, true);
    let stderr = reader(&mut child, false);
    let Some(status) = wait_with_timeout(&mut child, RUN_TIMEOUT) else {
        // SAFETY: kill has no memory preconditions; the group is the child's.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        panic!(
            "{command:?} did not finish within {:?}; it printed:\n{}\n{}",
            crate::scaled(RUN_TIMEOUT),
            stdout.join().unwrap(),
            stderr.join().unwrap()
        )
    };
    (status, stdout.join().unwrap(), stderr.join().unwrap())
}

fn reader(child: &mut Child, stdout: bool) -> std::thread::JoinHandle<String> {
    let mut pipe: Box<dyn Read + Send> = if stdout {
        Box::new(child.stdout.take().unwrap())
    } else {
        Box::new(child.stderr.take().unwrap())
    };
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for `child`; kills it and returns `None` after `timeout` (times
/// [`crate::time_scale`]).
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + crate::scaled(timeout);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the agent, which must refuse: a non-zero exit (not a signal: a panic
/// aborting would be one), exactly one line on stderr starting with
/// `omegi-agent: error: `, nothing on stdout. Returns the line.
pub fn refused(command: Command) -> String {
    let shown = format!("{command:?}");
    let (status, stdout, stderr) = run_to_end(command);
    assert!(
        status.code().is_some_and(|code| code != 0),
        "{shown} ended with {status}: {stderr}"
    );
    assert_eq!(stdout, "", "{shown}");
    assert!(!stderr.contains("panicked"), "{shown}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{shown}: {stderr}");
    assert!(
        stderr.starts_with("omegi-agent: error: "),
        "{shown}: {stderr}"
    );
    stderr.trim_end().to_owned()
}
