//! Call rates under omegi: what the agent loses, the CPU it uses and its
//! memory, with `paced.c` calling `work` at a set rate on 2 threads. The
//! sweep finds where drops start (and says so honestly near the CPUs'
//! saturation, where they come and go between runs); the idle run (rate 0)
//! tells the agent's start-up cost from its cost per call. The same runs at
//! a high rate weigh `--drain-interval` and `--min-duration`. Resource use
//! comes from `wait4`: the agent's own CPU plus that of the program it
//! started and waited for, from which the program's own is subtracted.

use std::{
    fmt::Write as _,
    io::Read as _,
    os::unix::process::ExitStatusExt as _,
    process::{Child, Command, ExitStatus, Stdio},
};

use anyhow::{bail, Context, Result};

use super::{result_of, AgentSummary, Bench, RunResult};

impl Bench {
    /// How long each paced run lasts.
    fn paced_seconds(&self) -> f64 {
        if self.quick {
            2.0
        } else {
            3.0
        }
    }

    fn paced(&self, rate: u64, seconds: f64, extra: &[&str]) -> Result<RateRow> {
        let exe = self.bin.join("paced");
        let mut command = self.omegi("work", extra);
        command
            .arg("--")
            .arg(&exe)
            .args([rate.to_string(), "2".into(), seconds.to_string()]);
        let (result, usage) = run_with_usage(&mut command)?;
        if !result.status.success() {
            bail!("{command:?} failed: {}", result.stderr.trim());
        }
        let calls = result.fields.num("calls");
        let wall = result.fields.num("loop_ns");
        let program_cpu = result.fields.num("cpu_ns");
        let agent_cpu = (usage.cpu_ns - program_cpu).max(0.0);
        let summary = AgentSummary::parse(&result.stderr);
        Ok(RateRow {
            requested: rate,
            achieved: calls / (wall / 1e9),
            spans: summary.spans,
            lost: summary.lost,
            lost_text: summary.lost_text,
            filtered: summary.filtered,
            agent_cpu_percent: agent_cpu / wall * 100.0,
            program_cpu_percent: program_cpu / wall * 100.0,
            peak_rss_kib: usage.max_rss_kib,
            setting: extra.join(" "),
        })
    }

    pub(super) fn rate_sweep(&self) -> Result<Vec<RateRow>> {
        let seconds = self.paced_seconds();
        // 0: the agent started, attached and idle for the same time, to
        // tell its start-up cost from its cost per call.
        let rates: &[u64] = if self.quick {
            &[0, 10_000, 100_000, 500_000, 1_000_000]
        } else {
            &[
                0, 10_000, 100_000, 200_000, 300_000, 500_000, 700_000, 1_000_000, 5_000_000,
            ]
        };
        let mut rows = Vec::new();
        for &rate in rates {
            let row = self.paced(rate, seconds, &[])?;
            print_rate(&row);
            rows.push(row);
        }
        Ok(rows)
    }

    pub(super) fn drain_intervals(&self) -> Result<Vec<RateRow>> {
        let seconds = self.paced_seconds();
        let intervals: &[&str] = if self.quick {
            &["1ms", "10ms", "100ms"]
        } else {
            &["1ms", "5ms", "10ms", "50ms", "100ms"]
        };
        let mut rows = Vec::new();
        for interval in intervals {
            let row = self.paced(500_000, seconds, &["--drain-interval", interval])?;
            print_rate(&row);
            rows.push(row);
        }
        Ok(rows)
    }

    pub(super) fn min_duration(&self) -> Result<Vec<RateRow>> {
        let seconds = self.paced_seconds();
        let mut rows = Vec::new();
        for setting in [&[][..], &["--min-duration", "20us"][..]] {
            let row = self.paced(500_000, seconds, setting)?;
            print_rate(&row);
            rows.push(row);
        }
        Ok(rows)
    }
}

fn print_rate(row: &RateRow) {
    println!(
        "  {:>9} req  {:>9.0} calls/s  {:>9} spans  lost {:>7}  agent CPU {:>5.1}%  RSS {:>6.1} MiB{}{}",
        row.requested,
        row.achieved,
        row.spans,
        row.lost,
        row.agent_cpu_percent,
        row.peak_rss_kib as f64 / 1024.0,
        if row.setting.is_empty() {
            String::new()
        } else {
            format!("  [{}]", row.setting)
        },
        if row.filtered > 0 {
            format!("  ({} left out by choice)", row.filtered)
        } else {
            String::new()
        }
    );
}

pub(super) struct RateRow {
    pub(super) requested: u64,
    pub(super) achieved: f64,
    pub(super) spans: u64,
    pub(super) lost: u64,
    pub(super) lost_text: String,
    pub(super) filtered: u64,
    pub(super) agent_cpu_percent: f64,
    pub(super) program_cpu_percent: f64,
    pub(super) peak_rss_kib: u64,
    pub(super) setting: String,
}

/// Resource use of a finished child and everything it waited for.
struct Usage {
    cpu_ns: f64,
    max_rss_kib: u64,
}

/// Runs `command` and returns its output and resource use (`wait4`): the
/// agent's own CPU plus that of the program it started and waited for.
fn run_with_usage(command: &mut Command) -> Result<(RunResult, Usage)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let stdout = reader(&mut child, true);
    let stderr = reader(&mut child, false);
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; `child` is not waited on elsewhere.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let cpu = |time: libc::timeval| time.tv_sec as f64 * 1e9 + time.tv_usec as f64 * 1e3;
    Ok((
        result_of(ExitStatus::from_raw(status), &stdout, &stderr),
        Usage {
            cpu_ns: cpu(usage.ru_utime) + cpu(usage.ru_stime),
            max_rss_kib: usage.ru_maxrss as u64,
        },
    ))
}

fn reader(child: &mut Child, stdout: bool) -> std::thread::JoinHandle<Vec<u8>> {
    let mut pipe: Box<dyn std::io::Read + Send> = if stdout {
        Box::new(child.stdout.take().expect("piped"))
    } else {
        Box::new(child.stderr.take().expect("piped"))
    };
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

pub(super) fn markdown(
    md: &mut String,
    rates: &[RateRow],
    drain: &[RateRow],
    min_duration: &[RateRow],
) {
    let idle_cpu = rates
        .iter()
        .find(|row| row.requested == 0)
        .map_or(0.0, |row| row.agent_cpu_percent);
    let rate_table = |md: &mut String, rows: &[RateRow], title: &str| {
        if !title.is_empty() {
            let _ = writeln!(md, "\n{title}");
        }
        let _ = writeln!(
            md,
            "\n| requested calls/s | achieved calls/s | setting | spans | lost | agent CPU (% of a core) | above idle | program CPU (%) | peak RSS (MiB) |\n|---:|---:|---|---:|---|---:|---:|---:|---:|"
        );
        for row in rows {
            let lost = if row.lost == 0 {
                if row.filtered > 0 {
                    format!("0 ({} left out by --min-duration, by choice)", row.filtered)
                } else {
                    "0".to_owned()
                }
            } else {
                format!("{} ({})", row.lost, row.lost_text)
            };
            let _ = writeln!(
                md,
                "| {} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                if row.requested == 0 {
                    "0 (idle)".to_owned()
                } else {
                    row.requested.to_string()
                },
                row.achieved,
                if row.setting.is_empty() {
                    "defaults".to_owned()
                } else {
                    format!("`{}`", row.setting)
                },
                row.spans,
                lost,
                row.agent_cpu_percent,
                (row.agent_cpu_percent - idle_cpu).max(0.0),
                row.program_cpu_percent,
                row.peak_rss_kib as f64 / 1024.0
            );
        }
    };
    let _ = writeln!(
        md,
        "\n## Call rates: loss, agent CPU and memory\n\n`paced.c` calls `work` at a set \
         rate on 2 threads for a few seconds under omegi (uretprobes, every span exported as \
         JSON to /dev/null, `--overhead-budget off`). Lost = every span the agent's summary \
         reports as dropped (ring buffer full, exporter queue full); achieved is below \
         requested when the probes themselves use up the CPUs. Agent CPU is the agent's own \
         user + system time (the BPF programs run in the program's time). Peak RSS is the \
         agent's (the largest of the agent and the program). The idle row is the agent \
         started, attached and idle for as long: its start-up (verifying the BPF programs \
         is most of it) spread over the run; \"above idle\" is what the calls cost it."
    );
    rate_table(md, rates, "");
    md.push_str(&loss_sentence(rates));
    rate_table(
        md,
        drain,
        "### Drain interval (`--drain-interval`) at 500k calls/s requested",
    );
    rate_table(
        md,
        min_duration,
        "### `--min-duration` at 500k calls/s requested (every call of `work` is short)",
    );
}

/// Where drops start, in words: every run below the first rate with
/// drops was loss-free; near the CPUs' saturation some runs drop and
/// others do not, which is said too.
fn loss_sentence(rates: &[RateRow]) -> String {
    let measured: Vec<&RateRow> = rates.iter().filter(|row| row.requested > 0).collect();
    let first_drop = measured
        .iter()
        .filter(|row| row.lost > 0)
        .map(|row| row.achieved)
        .min_by(|a, b| a.total_cmp(b));
    let below = |limit: f64| {
        measured
            .iter()
            .filter(|row| row.lost == 0 && row.achieved < limit)
            .map(|row| row.achieved)
            .max_by(|a, b| a.total_cmp(b))
    };
    match first_drop {
        None => match below(f64::INFINITY) {
            Some(best) => format!(
                "\nNo span lost at any rate measured, up to **{best:.0} calls/s** (the highest \
                 rates requested are beyond what the program's 2 threads can call under the \
                 probes on 2 CPUs).\n"
            ),
            None => String::new(),
        },
        Some(drop) => {
            let lossless_above = measured
                .iter()
                .filter(|row| row.lost == 0 && row.achieved >= drop)
                .map(|row| row.achieved)
                .max_by(|a, b| a.total_cmp(b));
            format!(
                "\nNo span lost up to **{:.0} calls/s**; the first drops came at {drop:.0} \
                 calls/s{}. Drops there are the exporter's queue overflowing while the \
                 program's probes and the agent share 2 saturated CPUs.\n",
                below(drop).unwrap_or(0.0),
                lossless_above.map_or(String::new(), |rate| format!(
                    ", while a run at {rate:.0} calls/s lost nothing: near saturation, drops \
                     come and go between runs"
                )),
            )
        }
    }
}

pub(super) fn best_loss_free_rate(rates: &[RateRow]) -> Option<f64> {
    rates
        .iter()
        .filter(|row| row.lost == 0 && row.requested > 0)
        .map(|row| row.achieved)
        .max_by(|a, b| a.total_cmp(b))
}
