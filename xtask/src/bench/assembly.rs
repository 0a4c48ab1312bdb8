//! Assembly and export throughput on one core, with no probes at all:
//! `omegi-agent/examples/assembly_bench.rs` feeds recorded-format events to
//! `Assembler::on_span`, then to the console exporter's JSON writer, and
//! reports spans per second by stage and trace shape. This is the agent's
//! side of the cost, measured apart from the kernel's (the target of ≥ 1M
//! spans/s assembled per agent core).

use std::{fmt::Write as _, process::Command};

use anyhow::{bail, Context, Result};

use super::{Bench, Fields};

impl Bench {
    pub(super) fn assembly(&self) -> Result<Vec<AssemblyRow>> {
        let spans = if self.quick { "1000000" } else { "3000000" };
        let output = Command::new(&self.assembly_bench)
            .args(["--spans", spans])
            .output()
            .context("running the assembly micro-benchmark")?;
        if !output.status.success() {
            bail!(
                "assembly_bench failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let rows: Vec<AssemblyRow> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(Fields::parse)
            .filter(|fields| fields.0.contains_key("stage"))
            .map(|fields| AssemblyRow {
                stage: fields.get_text("stage").replace('_', " "),
                shape: fields.get_text("shape").replace('_', " "),
                spans: fields.num("spans"),
                ns: fields.num("ns"),
            })
            .collect();
        for row in &rows {
            println!(
                "  {:<28} {:<34} {:>6.2} M spans/s",
                row.stage,
                row.shape,
                row.spans_per_second() / 1e6
            );
        }
        Ok(rows)
    }
}

pub(super) struct AssemblyRow {
    pub(super) stage: String,
    pub(super) shape: String,
    pub(super) spans: f64,
    pub(super) ns: f64,
}

impl AssemblyRow {
    pub(super) fn spans_per_second(&self) -> f64 {
        self.spans / (self.ns / 1e9)
    }
}

pub(super) fn markdown(md: &mut String, assembly: &[AssemblyRow]) {
    let _ = writeln!(
        md,
        "\n## Assembly and export throughput on one core\n\n`omegi-agent/examples/assembly_bench.rs` \
         feeds recorded-format events (ring buffer records, decoded as the reader does) to \
         `Assembler::on_span` on one thread, then to the console exporter's JSON writer \
         (into memory).\n\n| stage | trace shape | spans/s |\n|---|---|---:|"
    );
    for row in assembly {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} |",
            row.stage,
            row.shape,
            row.spans_per_second()
        );
    }
}
