//! What a Python call costs traced (issue 11): a small function called in a
//! loop (`xtask/bench/python/calls.py`), untraced, traced by omegi (with the
//! eval hook, every call a probe pair), and decorated by the library omegi
//! replaces (`omegi-instrumentation-python` from PyPI, its decorator and
//! OpenTelemetry's batch processor), side by side on one interpreter. The
//! script's own clock; medians.
//!
//! The seed library and its pinned dependencies live in a virtual
//! environment of their own under the tools directory.

use std::{fmt::Write as _, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use super::{median, run_capture, AgentSummary, Bench};
use crate::run;

/// The seed library as its users installed it.
const SEED: &str = "omegi-instrumentation-python==0.0.8";

impl Bench {
    pub(super) fn python(&self) -> Result<Vec<PythonRow>> {
        let python = seed_environment()?;
        let script = self.sources.join("python/calls.py");
        let calls: u64 = if self.quick { 50_000 } else { 200_000 };
        // The seed's decorator costs about 100 µs a call: fewer calls.
        let seed_calls = calls / 10;
        let configs: [(&str, bool, bool); 3] = [
            ("untraced", false, false),
            ("traced by omegi (--python-eval-hook)", true, false),
            ("decorated by the seed library", false, true),
        ];
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        let mut spans = 0;
        for _ in 0..self.reps {
            for (index, &(_, traced, seed)) in configs.iter().enumerate() {
                let count = if seed { seed_calls } else { calls };
                let mut command = if traced {
                    let mut command = Command::new(&self.agent);
                    command
                        .arg("--project-root")
                        .arg(self.sources.join("python"))
                        .args(["--format", "json", "--output", "/dev/null"])
                        .args(["--overhead-budget", "off", "--python-eval-hook"])
                        .arg("--")
                        .arg(&python);
                    command
                } else {
                    Command::new(&python)
                };
                command.arg(&script).arg(count.to_string());
                if seed {
                    command.arg("seed");
                }
                let result = run_capture(&mut command)?;
                if !result.status.success() {
                    bail!("{command:?} failed: {}", result.stderr);
                }
                let per_call = result.fields.num("ns_per_call");
                if per_call.is_nan() {
                    bail!("{command:?} printed no time: {}", result.stderr);
                }
                times[index].push(per_call);
                if traced {
                    spans = AgentSummary::parse(&result.stderr).spans;
                    if spans < count {
                        bail!(
                            "omegi traced {spans} spans of {count} calls: {}",
                            result.stderr
                        );
                    }
                }
            }
        }
        let untraced = median(&times[0]);
        let rows: Vec<PythonRow> = configs
            .iter()
            .enumerate()
            .map(|(index, &(name, traced, seed))| PythonRow {
                name: name.to_owned(),
                calls: if seed { seed_calls } else { calls },
                ns_per_call: median(&times[index]),
                added_ns: median(&times[index]) - untraced,
                spans: if traced { spans } else { 0 },
            })
            .collect();
        for row in &rows {
            println!(
                "  {:<40} {:>10.0} ns a call  (+{:.0} ns)",
                row.name, row.ns_per_call, row.added_ns
            );
        }
        if let [_, omegi, seed] = &rows[..] {
            println!(
                "  the seed library adds {:.0}× what omegi adds to a call",
                seed.added_ns / omegi.added_ns
            );
        }
        Ok(rows)
    }
}

/// The seed library's virtual environment (made once, with pyenv's newest
/// 3.11 where there is one, else the machine's `python3`); its `python`.
fn seed_environment() -> Result<PathBuf> {
    let venv = crate::setup::tools_dir().join("python-seed");
    let python = venv.join("bin/python");
    let marker = venv.join("omegi-seed.txt");
    let imports = "import omegi.decorator.OmegiDecorator, opentelemetry.sdk.trace";
    let works = |python: &PathBuf| {
        Command::new(python)
            .args(["-c", imports])
            .output()
            .is_ok_and(|output| output.status.success())
    };
    if std::fs::read_to_string(&marker).is_ok_and(|text| text == SEED) && works(&python) {
        return Ok(python);
    }
    let base = pyenv_311().unwrap_or_else(|| PathBuf::from("python3"));
    println!(
        "  installing the seed library ({SEED}) in {}",
        venv.display()
    );
    run(Command::new(&base)
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--no-input"])
        .args([
            "--disable-pip-version-check",
            "--only-binary",
            ":all:",
            SEED,
        ]))?;
    if !works(&python) {
        bail!("the seed library in {} does not import", venv.display());
    }
    std::fs::write(&marker, SEED).context("writing the seed environment's marker")?;
    Ok(python)
}

/// pyenv's newest 3.11 (a shared libpython, as in the official images).
fn pyenv_311() -> Option<PathBuf> {
    let versions = PathBuf::from(std::env::var_os("HOME")?).join(".pyenv/versions");
    let mut homes: Vec<PathBuf> = std::fs::read_dir(versions)
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("3.11."))
        })
        .collect();
    homes.sort();
    Some(homes.pop()?.join("bin/python3.11"))
}

pub(super) struct PythonRow {
    pub(super) name: String,
    pub(super) calls: u64,
    pub(super) ns_per_call: f64,
    /// Over the untraced call.
    pub(super) added_ns: f64,
    pub(super) spans: u64,
}

pub(super) fn markdown(md: &mut String, rows: &[PythonRow]) {
    let [untraced, omegi, seed] = rows else {
        return;
    };
    let _ = writeln!(
        md,
        "\n## Python calls\n\n(f) A function returning its argument plus one, called in a \
         loop under CPython 3.11 (pyenv's build): untraced, traced by omegi with \
         `--python-eval-hook` (every call a span), and decorated by the seed library \
         (`{SEED}`: its decorator, OpenTelemetry's batch processor, an exporter that drops \
         everything). The script's own clock; medians. The seed library adds **{:.0}×** what \
         omegi adds to a call.\n\n\
         | run | calls | ns a call | added to a call (ns) | spans |\n|---|---:|---:|---:|---:|",
        seed.added_ns / omegi.added_ns
    );
    for row in [untraced, omegi, seed] {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {} |",
            row.name,
            row.calls,
            row.ns_per_call,
            row.added_ns,
            if row.spans > 0 {
                row.spans.to_string()
            } else {
                "–".into()
            }
        );
    }
}
