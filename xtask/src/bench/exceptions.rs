//! Whether the traced program survives an exception or a panic unwinding
//! through a probed function. A uretprobe rewrites the return address on the
//! stack, so unwinding through its frame kills the program; omegi puts none
//! where the binary can unwind (leaf functions aside). This is why the floor
//! for (b) is one that is not safe to use there, and the per-call table
//! is read with this one beside it.

use std::{
    fmt::Write as _,
    os::unix::process::ExitStatusExt as _,
    process::{Command, ExitStatus},
};

use anyhow::Result;

use super::{counting_script, run_capture, symbol_containing, Bench, Bpftrace, RunResult};

impl Bench {
    pub(super) fn exception_safety(&self) -> Result<Vec<ExceptionCheck>> {
        let mut checks = Vec::new();
        for (label, exe, pattern, include) in [
            (
                "C++: work() throws once, main catches",
                self.bin.join("loop_cpp"),
                symbol_containing(&self.bin.join("loop_cpp"), "4worki")?,
                "work",
            ),
            (
                "Rust: work() panics once, main catches",
                self.bin.join("loop_rs"),
                symbol_containing(&self.bin.join("loop_rs"), "4loop4work")?,
                "loop::work",
            ),
        ] {
            let args = ["2000", "1000"];
            let script = counting_script(&exe, &pattern);
            let bpftrace = {
                let _tracer = Bpftrace::start(&script)?;
                run_capture(Command::new(&exe).args(args))?
            };
            let mut command = self.omegi(include, &[]);
            command.arg("--").arg(&exe).args(args);
            let omegi = run_capture(&mut command)?;
            let outcome = |result: &RunResult| {
                if result.status.success() && result.fields.num("caught") == 1.0 {
                    "caught, exit 0".to_owned()
                } else {
                    describe_status(result.status)
                }
            };
            let check = ExceptionCheck {
                label: label.into(),
                bpftrace: outcome(&bpftrace),
                omegi: outcome(&omegi),
            };
            println!(
                "  {label}: bpftrace uprobe+uretprobe: {}; omegi: {}",
                check.bpftrace, check.omegi
            );
            checks.push(check);
        }
        Ok(checks)
    }
}

pub(super) struct ExceptionCheck {
    pub(super) label: String,
    pub(super) bpftrace: String,
    pub(super) omegi: String,
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(6)) => "killed by SIGABRT".into(),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

pub(super) fn markdown(md: &mut String, exceptions: &[ExceptionCheck]) {
    let _ = writeln!(
        md,
        "### Exception safety\n\nThe same C++ and Rust loops, where one call of `work` throws \
         (panics) and `main` catches it.\n\n| program | bpftrace uprobe + uretprobe | omegi |\n|---|---|---|"
    );
    for check in exceptions {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            check.label, check.bpftrace, check.omegi
        );
    }
}
