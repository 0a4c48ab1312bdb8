//! What one probe costs on this machine, by the instruction under it: the
//! kernel emulates `push reg`, `nop`, direct `call`/`jmp` and single-steps
//! everything else out of line (a VM exit for the debug trap on a KVM guest).
//! This is the floor every other number stands on, and the reason omegi moves
//! entry probes off `endbr64` and why a probe on `ret` costs more than a
//! uretprobe's return. bpftrace puts empty programs on the `ic_*` functions of
//! `insn.c`, each starting with its instruction (bpftrace as Debian builds it
//! cannot probe at an offset inside a function).

use std::{collections::BTreeMap, fmt::Write as _, path::Path, process::Command};

use anyhow::{bail, Result};

use super::{median, Bench, Bpftrace, Fields};

impl Bench {
    pub(super) fn instruction_classes(&self) -> Result<Vec<InstructionCost>> {
        let exe = self.bin.join("insn");
        let calls = if self.quick { 20_000 } else { 50_000 };
        let path = exe.display().to_string();
        let classes = [
            "push", "nop", "nop5", "call", "jmp", "ret", "endbr64", "mov", "sub",
        ];
        let mut script = String::new();
        for (index, class) in classes.iter().enumerate() {
            let _ = write!(
                script,
                "{}uprobe:{path}:ic_{class}",
                if index == 0 { "" } else { "," }
            );
        }
        let _ = write!(script, " {{}} uretprobe:{path}:ic_uret {{}}");
        let mut plain: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut probed: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for _ in 0..self.reps.min(3) {
            for (line, sink) in [
                (self.insn_run(&exe, calls, None)?, &mut plain),
                (self.insn_run(&exe, calls, Some(&script))?, &mut probed),
            ] {
                for fields in line {
                    let class = fields.get_text("class");
                    sink.entry(class).or_default().push(fields.num("loop_ns"));
                }
            }
        }
        let per_hit = |class: &str| -> f64 {
            (median(probed.get(class).map_or(&[][..], |v| v))
                - median(plain.get(class).map_or(&[][..], |v| v)))
                / calls as f64
        };
        let mut costs = Vec::new();
        for class in classes {
            let ns = per_hit(class);
            let handling = match class {
                "push" | "nop" | "call" | "jmp" => "emulated",
                _ => "single-stepped",
            };
            println!("  {class:<10} {ns:>8.0} ns/hit ({handling})");
            costs.push(InstructionCost {
                class: class.into(),
                handling: handling.into(),
                ns,
            });
        }
        let uretprobe = per_hit("uretprobe") - per_hit("push");
        println!("  uretprobe return {uretprobe:>8.0} ns/hit (trampoline)");
        costs.push(InstructionCost {
            class: "uretprobe return".into(),
            handling: "trampoline (the entry's push is counted above)".into(),
            ns: uretprobe,
        });
        Ok(costs)
    }

    fn insn_run(&self, exe: &Path, calls: u64, script: Option<&str>) -> Result<Vec<Fields>> {
        let _tracer = script.map(Bpftrace::start).transpose()?;
        let output = Command::new(exe).arg(calls.to_string()).output()?;
        if !output.status.success() {
            bail!("{} failed: {}", exe.display(), output.status);
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(Fields::parse)
            .collect())
    }
}

pub(super) struct InstructionCost {
    pub(super) class: String,
    pub(super) handling: String,
    pub(super) ns: f64,
}

pub(super) fn markdown(md: &mut String, instructions: &[InstructionCost]) {
    let _ = writeln!(
        md,
        "## What a probe costs on this machine\n\n\
         Each `ic_*` function of `insn.c` starts with the instruction named; bpftrace puts \
         an empty program on it. Cost per hit = (probed − unprobed loop time) / calls. The \
         kernel emulates `push reg`, `nop`, direct `call`/`jmp`; it single-steps everything \
         else out of line, which on a KVM guest costs a VM exit for the debug trap (KVM \
         intercepts #DB on every guest since CVE-2015-8104).\n\n\
         | instruction under the probe | handling | ns per hit |\n|---|---|---:|"
    );
    for cost in instructions {
        let _ = writeln!(
            md,
            "| `{}` | {} | {:.0} |",
            cost.class, cost.handling, cost.ns
        );
    }
}
