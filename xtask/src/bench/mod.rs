//! `cargo xtask bench`: what omegi costs the traced program, against the
//! kernel's floor (bpftrace's hand-made uprobe + uretprobe), on this machine.
//!
//! Everything runs side by side in one go: each configuration is run several
//! times, interleaved with the others, and the medians are compared, so that
//! a noisy neighbour slows every configuration alike. The target programs are
//! in `xtask/bench/`; each times its own loop and prints `key=value` pairs.
//! The results are printed and written to `BENCHMARKS.md`.
//!
//! Each case is a module: its runs (methods of [`Bench`]), the rows they
//! measure and its section of `BENCHMARKS.md`. `report` puts the sections
//! together, with the targets and levers that read across cases; what the
//! cases share (running a target, bpftrace, the agent's summary, medians) is
//! here.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{root, run};

mod assembly;
mod attach;
mod bpf_time;
mod budget;
mod exceptions;
mod http;
mod instructions;
mod per_call;
mod python;
mod rates;
mod report;
mod sqlite;

use report::{Machine, Report};

/// What `cargo xtask bench` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// Repetitions of each timed configuration (medians are reported).
    pub reps: usize,
    /// Fewer calls, rates and functions: a few minutes instead of ~15.
    pub quick: bool,
    /// Where the report goes.
    pub output: PathBuf,
    /// One case to run alone (printed, no report).
    pub only: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            reps: 5,
            quick: false,
            output: PathBuf::from("BENCHMARKS.md"),
            only: None,
        }
    }
}

pub fn bench(options: &Options) -> Result<()> {
    crate::require_root("bench")?;
    crate::setup::build_tools()?;
    run(crate::cargo().args(["build", "--release", "-p", "omegi-agent"]))?;
    run(crate::cargo().args([
        "build",
        "--release",
        "-p",
        "omegi-agent",
        "--example",
        "assembly_bench",
    ]))?;
    let bench = Bench::prepare(options)?;
    match options.only.as_deref() {
        None => {}
        Some("python") => return bench.python().map(drop),
        Some("sqlite") => return bench.sqlite().map(drop),
        Some(other) => bail!("no bench case {other:?} to run alone (python, sqlite)"),
    }
    let started = Instant::now();
    let machine = Machine::read();
    println!("bench: {}", machine.summary());

    let mut report = Report {
        machine,
        options: options.clone(),
        ..Report::default()
    };
    println!("\n== probe cost per instruction class (bpftrace, empty programs)");
    report.instructions = bench.instruction_classes()?;
    println!("\n== per-call overhead: omegi against bpftrace");
    report.per_call = bench.per_call()?;
    println!("\n== exception safety");
    report.exceptions = bench.exception_safety()?;
    println!("\n== BPF program time per probe hit");
    report.bpf_time = bench.bpf_program_time()?;
    println!("\n== call rates: loss, agent CPU and memory");
    report.rates = bench.rate_sweep()?;
    println!("\n== drain interval at a high rate");
    report.drain = bench.drain_intervals()?;
    println!("\n== --min-duration at a high rate");
    report.min_duration = bench.min_duration()?;
    println!("\n== overhead budget");
    report.budget = bench.budget()?;
    println!("\n== a real library: SQLite");
    report.sqlite = bench.sqlite()?;
    println!("\n== Python calls: omegi against the seed library");
    report.python = bench.python()?;
    println!("\n== HTTP server throughput under wrk");
    report.http = bench.http()?;
    println!("\n== attach and detach time");
    report.attach = bench.attach_times()?;
    println!("\n== assembly and export throughput (one core)");
    report.assembly = bench.assembly()?;
    report.took = started.elapsed();

    let markdown = report.markdown();
    fs::write(&options.output, &markdown)
        .with_context(|| format!("writing {}", options.output.display()))?;
    println!("\n{}", report.console_summary());
    println!(
        "bench: done in {:.0} s; report in {}",
        report.took.as_secs_f64(),
        options.output.display()
    );
    Ok(())
}

/// The built target programs and where things are.
struct Bench {
    agent: PathBuf,
    assembly_bench: PathBuf,
    /// Sources of the bench programs: the project root given to omegi.
    sources: PathBuf,
    bin: PathBuf,
    reps: usize,
    quick: bool,
}

/// A target program and what to probe in it.
#[derive(Clone, Debug)]
struct Target {
    key: &'static str,
    label: &'static str,
    exe: PathBuf,
    args: Vec<String>,
    /// The probed functions, as a bpftrace wildcard on symbols.
    bpftrace_pattern: String,
    /// The same functions, as an omegi --include glob on demangled names.
    include: String,
}

impl Bench {
    fn prepare(options: &Options) -> Result<Self> {
        let sources = root().join("xtask/bench");
        let bin = root().join("target/bench");
        fs::create_dir_all(&bin)?;
        let bench = Self {
            agent: root().join("target/release/omegi-agent"),
            assembly_bench: root().join("target/release/examples/assembly_bench"),
            sources,
            bin,
            reps: options.reps.max(1),
            quick: options.quick,
        };
        bench.build_targets()?;
        Ok(bench)
    }

    fn build_targets(&self) -> Result<()> {
        let source = |name: &str| self.sources.join(name);
        let out = |name: &str| self.bin.join(name);
        // Frame pointers give the small functions the usual `push %rbp`
        // prologue (an emulated instruction), as in (a), (b) and (d).
        let c_flags = ["-O2", "-g", "-fno-omit-frame-pointer", "-pthread"];
        let gcc = |src: &str, exe: &str, extra: &[&str]| {
            run(Command::new("gcc")
                .args(c_flags)
                .args(extra)
                .arg(source(src))
                .arg("-o")
                .arg(out(exe)))
        };
        gcc("loop.c", "loop", &[])?;
        gcc("loop.c", "loop_cet", &["-fcf-protection=full"])?;
        gcc("paced.c", "paced", &[])?;
        gcc("insn.c", "insn", &[])?;
        run(Command::new("g++")
            .args(c_flags)
            .arg(source("loop.cpp"))
            .arg("-o")
            .arg(out("loop_cpp")))?;
        // (c) as distribution packages are built: -O2, no frame pointers.
        run(Command::new("g++")
            .args(["-O2", "-g", "-pthread"])
            .arg(source("nested.cpp"))
            .arg("-o")
            .arg(out("nested")))?;
        run(Command::new("gcc")
            .args(["-O2", "-g", "-pthread"])
            .arg(root().join("tests/fixtures/c/http_server.c"))
            .arg("-o")
            .arg(out("http_server")))?;
        run(Command::new("rustc")
            .args(["--edition", "2021", "-g", "-C", "opt-level=2"])
            .args(["-C", "force-frame-pointers=yes", "-o"])
            .arg(out("loop_rs"))
            .arg(source("loop.rs")))?;
        Ok(())
    }

    fn calls(&self) -> u64 {
        if self.quick {
            100_000
        } else {
            200_000
        }
    }

    fn targets(&self) -> Result<Vec<Target>> {
        let calls = self.calls().to_string();
        let rust_work = symbol_containing(&self.bin.join("loop_rs"), "4loop4work")?;
        let cpp_work = symbol_containing(&self.bin.join("loop_cpp"), "4worki")?;
        let cpp_leaf = symbol_containing(&self.bin.join("loop_cpp"), "4leafi")?;
        let requests = if self.quick { "1000" } else { "2000" };
        Ok(vec![
            Target {
                key: "a",
                label: "(a) C loop, one small function",
                exe: self.bin.join("loop"),
                args: vec![calls.clone()],
                bpftrace_pattern: "work".into(),
                include: "work".into(),
            },
            Target {
                key: "b-cpp",
                label: "(b) C++ loop (can unwind)",
                exe: self.bin.join("loop_cpp"),
                args: vec![calls.clone()],
                bpftrace_pattern: cpp_work,
                include: "work".into(),
            },
            Target {
                key: "b-leaf",
                label: "(b) C++ loop, a leaf function (can unwind)",
                exe: self.bin.join("loop_cpp"),
                args: vec![calls.clone(), "leaf".into()],
                bpftrace_pattern: cpp_leaf,
                include: "leaf".into(),
            },
            Target {
                key: "b-rust",
                label: "(b) Rust loop (can unwind)",
                exe: self.bin.join("loop_rs"),
                args: vec![calls.clone()],
                bpftrace_pattern: rust_work,
                include: "loop::work".into(),
            },
            Target {
                key: "c",
                label: "(c) C++ nested calls, depth 8, 4 threads",
                exe: self.bin.join("nested"),
                args: vec!["4".into(), requests.into()],
                bpftrace_pattern: "stage_*".into(),
                include: "stage_*".into(),
            },
            Target {
                key: "d",
                label: "(d) C loop, endbr64; push %rbp",
                exe: self.bin.join("loop_cet"),
                args: vec![calls],
                bpftrace_pattern: "work".into(),
                include: "work".into(),
            },
        ])
    }

    /// The agent's command line for a bench run: spans as JSON to
    /// /dev/null (every span formatted, nothing kept), no overhead budget.
    fn omegi(&self, include: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(&self.agent);
        command
            .arg("--project-root")
            .arg(&self.sources)
            .args(["--include", include])
            .args(["--format", "json", "--output", "/dev/null"])
            .args(["--overhead-budget", "off"])
            .args(extra);
        command
    }
}

// ------------------------------------------------------------------ helpers

/// `key=value` pairs from a target's output line.
#[derive(Clone, Debug, Default)]
struct Fields(BTreeMap<String, String>);

impl Fields {
    fn parse(line: &str) -> Self {
        Self(
            line.split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
        )
    }

    fn num(&self, key: &str) -> f64 {
        self.0
            .get(key)
            .and_then(|value| value.parse().ok())
            .unwrap_or(f64::NAN)
    }

    fn get_text(&self, key: &str) -> String {
        self.0.get(key).cloned().unwrap_or_default()
    }
}

struct RunResult {
    status: ExitStatus,
    fields: Fields,
    stderr: String,
    /// The agent's drop line, if it dropped anything.
    drops: Option<String>,
}

fn run_capture(command: &mut Command) -> Result<RunResult> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    Ok(result_of(output.status, &output.stdout, &output.stderr))
}

fn result_of(status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> RunResult {
    let stdout = String::from_utf8_lossy(stdout);
    let stderr = String::from_utf8_lossy(stderr).into_owned();
    let fields = stdout
        .lines()
        .rev()
        .map(Fields::parse)
        .find(|fields| fields.0.contains_key("calls"))
        .unwrap_or_default();
    let drops = stderr.lines().find_map(|line| {
        line.split_once("dropped: ")
            .map(|(_, rest)| rest.to_owned())
    });
    RunResult {
        status,
        fields,
        stderr,
        drops,
    }
}

/// A bpftrace process with its probes attached; stopped (SIGINT, by pid) on
/// drop.
struct Bpftrace {
    child: Child,
    log: PathBuf,
}

impl Bpftrace {
    fn start(script: &str) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let log = std::env::temp_dir().join(format!(
            "omegi-bench-bpftrace-{}-{}.log",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = fs::File::create(&log)?;
        // BEGIN runs once every probe is attached.
        let script = format!("BEGIN {{ printf(\"omegi-bench: ready\\n\"); }} {script}");
        let child = Command::new("bpftrace")
            .arg("-e")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0)
            .spawn()
            .context("starting bpftrace (cargo xtask setup installs it)")?;
        let mut tracer = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = fs::read_to_string(&tracer.log).unwrap_or_default();
            if text.contains("omegi-bench: ready") {
                return Ok(tracer);
            }
            if let Some(status) = tracer.child.try_wait()? {
                bail!("bpftrace ended ({status}) before attaching: {text}\nscript: {script}");
            }
            if Instant::now() > deadline {
                tracer.stop();
                bail!("bpftrace did not attach within a minute: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        // SAFETY: signalling the bpftrace process we started, by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = fs::remove_file(&self.log);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.log);
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The kernel's floor, as bpftrace writes it by hand: a uprobe and a
/// uretprobe on `pattern` in `exe`, each counting into a map.
fn counting_script(exe: &Path, pattern: &str) -> String {
    let path = exe.display();
    format!(
        "uprobe:{path}:{pattern} {{ @calls = count(); }} \
         uretprobe:{path}:{pattern} {{ @returns = count(); }}"
    )
}

/// The first defined text symbol of `exe` containing `part`.
fn symbol_containing(exe: &Path, part: &str) -> Result<String> {
    let output = Command::new("nm").arg("--defined-only").arg(exe).output()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, kind, name) = (fields.next()?, fields.next()?, fields.next()?);
            (matches!(kind, "T" | "t") && name.contains(part)).then(|| name.to_owned())
        })
        .next()
        .with_context(|| format!("no symbol with {part} in {}", exe.display()))
}

/// The number right after `marker` in `text`.
fn number_after(text: &str, marker: &str) -> Option<f64> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(|a, b| a.total_cmp(b));
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

/// What the agent's summary says.
#[derive(Default)]
struct AgentSummary {
    spans: u64,
    lost: u64,
    lost_text: String,
    filtered: u64,
}

impl AgentSummary {
    fn parse(stderr: &str) -> Self {
        let mut summary = Self::default();
        for line in stderr.lines() {
            let line = line.trim_start_matches("omegi-agent: ");
            if line.contains(" traces, ") {
                summary.spans = number_after(line, "traces, ").unwrap_or(0.0) as u64;
                if let Some(filtered) = line
                    .find(" calls shorter than --min-duration")
                    .and_then(|end| line[..end].rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                {
                    summary.filtered = filtered;
                }
            }
            if let Some(rest) = line.strip_prefix("warning: dropped: ") {
                summary.lost_text = rest.to_owned();
                summary.lost = rest
                    .split("; ")
                    .filter_map(|part| part.split_whitespace().next()?.parse::<u64>().ok())
                    .sum();
            }
        }
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_agents_summary() {
        let stderr = "omegi-agent: tracing 1 functions of x (attached in 12.5 ms with uprobe_multi links)\n\
                      omegi-agent: 10 traces, 1234 spans, 99 calls shorter than --min-duration left out (by choice, not lost); console: 1200 spans exported\n\
                      omegi-agent: warning: dropped: 30 spans lost in a full ring buffer; 4 spans dropped, console queue full\n";
        let summary = AgentSummary::parse(stderr);
        assert_eq!(summary.spans, 1234);
        assert_eq!(summary.filtered, 99);
        assert_eq!(summary.lost, 34);
        assert_eq!(number_after(stderr, "attached in "), Some(12.5));
        let quiet = AgentSummary::parse(
            "omegi-agent: 2 traces, 5 spans; console: 5 spans exported; nothing dropped\n",
        );
        assert_eq!((quiet.spans, quiet.lost, quiet.filtered), (5, 0, 0));
    }

    #[test]
    fn medians_and_fields() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let fields = Fields::parse("calls=200 loop_ns=1500 class=push");
        assert_eq!(fields.num("calls"), 200.0);
        assert_eq!(fields.get_text("class"), "push");
        assert!(fields.num("missing").is_nan());
    }

    #[test]
    fn counting_script_is_one_line() {
        assert_eq!(
            counting_script(Path::new("/b/loop"), "work"),
            "uprobe:/b/loop:work { @calls = count(); } uretprobe:/b/loop:work { @returns = count(); }"
        );
    }
}
