//! Time inside the BPF programs per run, from the kernel's own statistics
//! (`kernel.bpf_stats_enabled`, on for the measurement and back after): the
//! programs' run time without the trap around them, so that what omegi's
//! programs do per hit (a shadow stack, two timestamps, a ring buffer
//! record) can be told apart from what the probe itself costs.

use std::{
    fmt::Write as _,
    fs,
    io::Read as _,
    process::{Command, Stdio},
};

use anyhow::{Context, Result};

use super::{counting_script, run_capture, Bench, Bpftrace};

impl Bench {
    /// Time spent in the BPF programs per run, from the kernel's own
    /// statistics (`kernel.bpf_stats_enabled`), read from the tracer's
    /// program descriptors while the target lingers.
    pub(super) fn bpf_program_time(&self) -> Result<Vec<BpfTime>> {
        let _stats = StatsEnabled::turn_on()?;
        let exe = self.bin.join("loop");
        let calls = "100000";
        let mut rows = Vec::new();
        // bpftrace.
        {
            let tracer = Bpftrace::start(&counting_script(&exe, "work"))?;
            run_capture(Command::new(&exe).arg(calls))?;
            let (runs, ns) = bpf_prog_stats(tracer.pid());
            rows.push(BpfTime::new(
                "bpftrace uprobe + uretprobe, counting",
                runs,
                ns,
            ));
        }
        for (name, extra) in [
            ("omegi (uretprobe)", &[][..]),
            ("omegi (return sites)", &["--return-probes", "sites"][..]),
        ] {
            let mut command = self.omegi("work", extra);
            command.arg("--").arg(&exe).arg(calls);
            command.env("BENCH_LINGER_MS", "1500");
            let mut child = command
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            let agent = child.id();
            let mut stdout = child.stdout.take().expect("piped");
            // The target prints its line, then lingers: read the stats then.
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while stdout.read(&mut byte)? == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            let (runs, ns) = bpf_prog_stats(agent);
            let _ = child.wait();
            rows.push(BpfTime::new(name, runs, ns));
        }
        for row in &rows {
            println!(
                "  {:<40} {:>9} runs  {:>6.0} ns per run",
                row.name,
                row.runs,
                row.ns_per_run()
            );
        }
        Ok(rows)
    }
}

pub(super) struct BpfTime {
    pub(super) name: String,
    pub(super) runs: u64,
    pub(super) ns: u64,
}

impl BpfTime {
    pub(super) fn new(name: &str, runs: u64, ns: u64) -> Self {
        Self {
            name: name.into(),
            runs,
            ns,
        }
    }

    pub(super) fn ns_per_run(&self) -> f64 {
        if self.runs == 0 {
            f64::NAN
        } else {
            self.ns as f64 / self.runs as f64
        }
    }
}

/// `kernel.bpf_stats_enabled` on while it lives (back to what it was after).
struct StatsEnabled {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsEnabled {
    fn turn_on() -> Result<Self> {
        let before = fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into());
        fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self { before })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, self.before.trim());
    }
}

/// Sums `run_cnt` and `run_time_ns` over the BPF programs process `pid`
/// holds open.
fn bpf_prog_stats(pid: u32) -> (u64, u64) {
    let mut runs = 0;
    let mut ns = 0;
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, 0);
    };
    for entry in entries.flatten() {
        let text = fs::read_to_string(entry.path()).unwrap_or_default();
        if !text.contains("prog_tag:") {
            continue;
        }
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("run_cnt:") {
                runs += value.trim().parse::<u64>().unwrap_or(0);
            } else if let Some(value) = line.strip_prefix("run_time_ns:") {
                ns += value.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    (runs, ns)
}

pub(super) fn markdown(md: &mut String, bpf_time: &[BpfTime]) {
    let _ = writeln!(
        md,
        "\n### Time inside the BPF programs\n\nFrom `kernel.bpf_stats_enabled` (the \
         programs' own run time, not the trap around them), (a) with 100,000 calls.\n\n\
         | tracer | program runs | ns per run |\n|---|---:|---:|"
    );
    for row in bpf_time {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} |",
            row.name,
            row.runs,
            row.ns_per_run()
        );
    }
}
