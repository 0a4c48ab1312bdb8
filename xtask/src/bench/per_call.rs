//! The per-call overhead of omegi against the kernel's floor: bpftrace
//! probing the same functions with a uprobe and a uretprobe that count.
//! Each target program is run untraced, under bpftrace and under omegi,
//! the configurations interleaved repetition by repetition so that a noisy
//! neighbour slows them alike; overhead = (traced − untraced loop time) /
//! calls. The extra omegi configurations on (a) and (d) are the levers
//! BENCHMARKS.md weighs: return sites against uretprobes, one link per
//! probe, the entry probe left on `endbr64`.

use std::{fmt::Write as _, process::Command};

use anyhow::{bail, Result};

use super::{counting_script, median, run_capture, Bench, Bpftrace, RunResult, Target};

impl Bench {
    pub(super) fn per_call(&self) -> Result<Vec<PerCall>> {
        let targets = self.targets()?;
        let mut rows = Vec::new();
        for target in &targets {
            let path = target.exe.display();
            let pattern = &target.bpftrace_pattern;
            let mut configs: Vec<(String, Runner)> = vec![
                ("untraced".into(), Runner::Plain),
                (
                    "bpftrace: empty uprobe".into(),
                    Runner::Bpftrace(format!("uprobe:{path}:{pattern} {{}}")),
                ),
                (
                    "bpftrace: uprobe + uretprobe, counting".into(),
                    Runner::Bpftrace(counting_script(&target.exe, pattern)),
                ),
                ("omegi (default)".into(), Runner::Omegi(Vec::new())),
            ];
            match target.key {
                "a" => {
                    configs.push((
                        "omegi --return-probes sites".into(),
                        Runner::Omegi(vec!["--return-probes".into(), "sites".into()]),
                    ));
                    configs.push((
                        "omegi --attach-mode single".into(),
                        Runner::Omegi(vec!["--attach-mode".into(), "single".into()]),
                    ));
                }
                "d" => configs.push((
                    "omegi, entry probe on endbr64".into(),
                    Runner::Omegi(vec!["--entry-at-first-instruction".into()]),
                )),
                _ => {}
            }
            println!("  {}", target.label);
            let mut samples: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
            let mut calls = 0.0;
            let mut notes: Vec<String> = vec![String::new(); configs.len()];
            for _ in 0..self.reps {
                for (index, (_, runner)) in configs.iter().enumerate() {
                    let result = self.run_once(target, runner)?;
                    calls = result.fields.num("calls");
                    samples[index].push(result.fields.num("loop_ns"));
                    if let Some(drops) = result.drops {
                        notes[index] = drops;
                    }
                }
            }
            let untraced = median(&samples[0]);
            let mut results = Vec::new();
            for (index, (name, _)) in configs.iter().enumerate() {
                let wall = median(&samples[index]);
                let per_call = (wall - untraced) / calls;
                println!(
                    "    {name:<42} {:>9.3} ms  {per_call:>8.0} ns/call{}",
                    wall / 1e6,
                    if notes[index].is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", notes[index])
                    }
                );
                results.push(ConfigResult {
                    name: name.clone(),
                    wall_ns: wall,
                    per_call_ns: per_call,
                    note: notes[index].clone(),
                });
            }
            rows.push(PerCall {
                key: target.key.into(),
                label: target.label.into(),
                calls,
                results,
            });
        }
        Ok(rows)
    }

    fn run_once(&self, target: &Target, runner: &Runner) -> Result<RunResult> {
        let (mut command, _tracer) = match runner {
            Runner::Plain => (Command::new(&target.exe), None),
            Runner::Bpftrace(script) => (Command::new(&target.exe), Some(Bpftrace::start(script)?)),
            Runner::Omegi(extra) => {
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                let mut command = self.omegi(&target.include, &extra);
                command.arg("--").arg(&target.exe);
                (command, None)
            }
        };
        command.args(&target.args);
        let result = run_capture(&mut command)?;
        if !result.status.success() {
            bail!(
                "{:?} failed ({}): {}",
                command,
                result.status,
                result.stderr.trim()
            );
        }
        Ok(result)
    }
}

enum Runner {
    Plain,
    Bpftrace(String),
    Omegi(Vec<String>),
}

pub(super) struct ConfigResult {
    pub(super) name: String,
    pub(super) wall_ns: f64,
    pub(super) per_call_ns: f64,
    pub(super) note: String,
}

pub(super) struct PerCall {
    pub(super) key: String,
    pub(super) label: String,
    pub(super) calls: f64,
    pub(super) results: Vec<ConfigResult>,
}

impl PerCall {
    pub(super) fn per_call(&self, prefix: &str) -> Option<f64> {
        self.results
            .iter()
            .find(|result| result.name.starts_with(prefix))
            .map(|result| result.per_call_ns)
    }
}

pub(super) fn markdown(md: &mut String, per_call: &[PerCall]) {
    let _ = writeln!(
        md,
        "\n## Per-call overhead: omegi against the kernel's floor\n\n\
         Overhead per call = (traced − untraced loop time) / calls. The floor is bpftrace \
         probing the same function(s) with a uprobe and a uretprobe that count into a map; \
         \"empty uprobe\" is one uprobe with an empty program. omegi runs with its defaults \
         (`--return-probes auto`: uretprobes where the binary cannot unwind, probes on the \
         `ret` instructions where it can), exporting every span as JSON to /dev/null, with \
         `--overhead-budget off`. Ratio = omegi / bpftrace uprobe + uretprobe.\n"
    );
    for row in per_call {
        let floor = row.per_call("bpftrace: uprobe + uretprobe");
        let _ = writeln!(
            md,
            "### {}\n\n{:.0} calls.\n\n| configuration | loop time (ms) | overhead per call (ns) | ratio to the floor | note |\n|---|---:|---:|---:|---|",
            row.label, row.calls
        );
        for result in &row.results {
            let ratio = match floor {
                Some(floor) if result.name != "untraced" => {
                    format!("{:.2}", result.per_call_ns / floor)
                }
                _ => String::new(),
            };
            let per_call = if result.name == "untraced" {
                String::new()
            } else {
                format!("{:.0}", result.per_call_ns)
            };
            let _ = writeln!(
                md,
                "| {} | {:.2} | {} | {} | {} |",
                result.name,
                result.wall_ns / 1e6,
                per_call,
                ratio,
                if result.note.is_empty() {
                    String::new()
                } else {
                    format!("dropped: {}", result.note)
                }
            );
        }
        md.push('\n');
    }
}
