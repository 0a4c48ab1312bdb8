//! `omegi-agent --check`: what this kernel allows and what omegi will do on
//! it. Every line is found by trying (the feature probes, and loading every
//! program through the verifier), not read off the version number.

use std::time::Duration;

use crate::{
    attach::{features, system, AttachMode, KernelFeatures, KernelOptions, ProbeLookup, Probes},
    discovery::FunctionTable,
};

/// Prints the report on stdout; returns whether omegi can trace here.
pub fn run() -> bool {
    let features = KernelFeatures::probe();
    let mut report = Report::default();
    say(format_args!("kernel {}", features.release));

    report.line(
        "privileges",
        system::check_privileges().map(|()| "yes".to_owned()),
    );
    report.line("uprobes", system::check_uprobes().map(|()| "yes".into()));
    report.line(
        "tracefs",
        system::ensure_tracefs().map(|path| path.display().to_string()),
    );
    if report.failed {
        return report.finish();
    }
    let cookies = if features.attach_cookies {
        Ok("yes: each probe knows its function".to_owned())
    } else {
        features::task_offsets()
            .map(|offsets| {
                format!(
                    "no (before 5.15): probes find their function by address (from the kernel's \
                     BTF: task_struct.mm at {}, mm_struct.start_code at {})",
                    offsets.task_mm, offsets.mm_start_code
                )
            })
            .map_err(|error| format!("no, and probes cannot be told apart without them: {error}"))
    };
    report.line("attach cookies", cookies);
    report.note(
        "uprobe_multi",
        if features.uprobe_multi {
            format!(
                "yes: all probes attached and detached in one system call each{}",
                if features.uprobe_multi_pid_filter {
                    ""
                } else {
                    " (its pid filter is per thread before 6.10; omegi filters processes itself)"
                }
            )
        } else {
            "no (before 6.6): one link per probe, about 1 ms each to attach and up to 0.1 s \
             each to detach"
                .into()
        },
    );
    report.note("BTF", if features.btf { "yes" } else { "no" }.into());

    // The real programs, through this kernel's verifier.
    let options = KernelOptions {
        min_duration: Duration::ZERO,
        budget_short: Duration::ZERO,
        thread_slots: omegi_common::THREAD_SLOTS,
        attach_mode: AttachMode::Auto,
        probe_lookup: ProbeLookup::Auto,
        split_after: Duration::ZERO,
        all_processes: false,
        ring_size: 1 << 16,
        debug_ebpf: false,
        http: true,
        capture_args: true,
    };
    let table = FunctionTable::from_functions("--check", Vec::new());
    match Probes::load(&options, &table) {
        Ok((mut probes, _maps, _counters)) => {
            let (multi, cookies) = probes.function_probe_kind();
            report.note(
                "function probes",
                format!(
                    "verified ({}, {})",
                    if multi {
                        "uprobe_multi links"
                    } else {
                        "one link per probe"
                    },
                    if cookies { "by cookie" } else { "by address" }
                ),
            );
            report.note(
                "tracepoints",
                "fork, exit, fatal signals and exit_group attached".into(),
            );
            report.note(
                "HTTP spans",
                match probes.http() {
                    Ok(()) => "syscall tracepoints attached, sockets found through BTF".into(),
                    Err(why) => format!("no: {why}"),
                },
            );
            let errors: Vec<(&str, _)> = probes.verify_error_programs();
            let refused: Vec<String> = errors
                .iter()
                .filter_map(|(name, result)| result.as_ref().err().map(|e| format!("{name}: {e}")))
                .collect();
            if refused.is_empty() {
                report.note(
                    "error path",
                    format!("all {} programs verified", errors.len()),
                );
            } else {
                report.note(
                    "error path",
                    format!(
                        "{} of {} programs refused (exceptions and panics then show only as \
                         unwound calls): {}",
                        refused.len(),
                        errors.len(),
                        refused.join("; ")
                    ),
                );
            }
        }
        Err(error) => report.line("programs", Err(error)),
    }
    report.finish()
}

/// The lines printed so far, and whether one said omegi cannot trace.
#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn line<E: std::fmt::Display>(&mut self, what: &str, result: Result<String, E>) {
        match result {
            Ok(text) => say(format_args!("  {what:<16} {text}")),
            Err(error) => {
                say(format_args!("  {what:<16} NO: {error}"));
                self.failed = true;
            }
        }
    }

    fn note(&mut self, what: &str, text: String) {
        say(format_args!("  {what:<16} {text}"));
    }

    fn finish(self) -> bool {
        let ok = !self.failed;
        say(format_args!(
            "{}",
            if ok {
                "omegi can trace on this kernel"
            } else {
                "omegi cannot trace on this kernel"
            }
        ));
        ok
    }
}

/// One line on stdout; a reader that went away (`--check | head`) is no
/// error.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}
