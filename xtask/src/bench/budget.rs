//! What `--overhead-budget` does to a program that calls a traced function
//! very often: (a) with many calls, the budget off and at its default. The
//! agent checks the kernel's per-function counts once a second and detaches
//! a function over the budget; the overhead per call and the spans kept show
//! what that guard trades.

use std::{fmt::Write as _, process::Command};

use anyhow::Result;

use super::{run_capture, AgentSummary, Bench};

impl Bench {
    pub(super) fn budget(&self) -> Result<Vec<BudgetRow>> {
        let exe = self.bin.join("loop");
        let calls = if self.quick { 1_500_000 } else { 3_000_000 };
        let mut rows = Vec::new();
        let plain = run_capture(Command::new(&exe).arg(calls.to_string()))?;
        let untraced = plain.fields.num("loop_ns");
        for (name, budget) in [
            ("--overhead-budget off", "off"),
            ("--overhead-budget 5% (default)", "5%"),
            ("--overhead-budget 100000,1us (per function)", "100000,1us"),
        ] {
            let mut command = Command::new(&self.agent);
            command
                .arg("--project-root")
                .arg(&self.sources)
                .args([
                    "--include",
                    "work",
                    "--format",
                    "json",
                    "--output",
                    "/dev/null",
                ])
                .args(["--overhead-budget", budget])
                .arg("--")
                .arg(&exe)
                .arg(calls.to_string());
            let result = run_capture(&mut command)?;
            let wall = result.fields.num("loop_ns");
            let summary = AgentSummary::parse(&result.stderr);
            let detached = result
                .stderr
                .lines()
                .find(|line| line.contains("detached ") && line.contains("calls/s"))
                .map(|line| line.trim_start_matches("omegi-agent: warning: ").to_owned())
                .unwrap_or_default();
            let row = BudgetRow {
                name: name.into(),
                calls: calls as f64,
                per_call_ns: (wall - untraced) / calls as f64,
                spans: summary.spans,
                detached,
            };
            println!(
                "  {:<42} {:>6.0} ns/call over {} calls, {} spans{}",
                row.name,
                row.per_call_ns,
                calls,
                row.spans,
                if row.detached.is_empty() {
                    String::new()
                } else {
                    format!("\n    {}", row.detached)
                }
            );
            rows.push(row);
        }
        Ok(rows)
    }
}

pub(super) struct BudgetRow {
    pub(super) name: String,
    pub(super) calls: f64,
    pub(super) per_call_ns: f64,
    pub(super) spans: u64,
    pub(super) detached: String,
}

pub(super) fn markdown(md: &mut String, budget: &[BudgetRow]) {
    let _ = writeln!(
        md,
        "\n## Overhead budget\n\n(a) with many calls, `--overhead-budget` off and at its \
         default. The agent checks the kernel's per-function counts once a second.\n\n\
         | setting | calls | overhead per call (ns) | spans | what the agent said |\n|---|---:|---:|---:|---|"
    );
    for row in budget {
        let _ = writeln!(
            md,
            "| `{}` | {:.0} | {:.0} | {} | {} |",
            row.name, row.calls, row.per_call_ns, row.spans, row.detached
        );
    }
}
