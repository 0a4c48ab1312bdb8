//! What a probe hit costs on this machine, measured once at start for the
//! overhead budget.
//!
//! The cost depends on the machine more than on anything omegi does: a
//! single-stepped probe is a VM exit on a KVM guest (about 10 µs) and far
//! cheaper on bare metal. The budget compares the probes' cost with the
//! traced processes' CPU time as the kernel accounts it, so the costs are
//! measured in the same accounting: the agent probes three tiny functions of
//! its own (their first instruction a `push`, which the kernel emulates, or a
//! `mov`, which it single-steps; and a uretprobe), calls each a few thousand
//! times, and reads its thread's CPU time. The probes are tracefs uprobe
//! events with a filter that records nothing, so no BPF program runs: the
//! time of omegi's programs ([`BPF_PROGRAM_NS`] a hit, BENCHMARKS.md) is
//! added. It takes a few tens of milliseconds (agents of the same binary
//! take turns, holding a lock on it: the probes are on the file); when
//! anything fails the agent uses [`ProbeCosts::KVM_GUEST`] and says so.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::budget::ProbeCosts;

/// omegi's BPF program time per probe hit (BENCHMARKS.md: 179–207 ns).
pub const BPF_PROGRAM_NS: f64 = 200.0;

/// Calls of each function per measure.
const CALLS: u32 = 3_000;

/// Why the costs could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("the agent's own code is not in a file mapping")]
    NotMapped,
    #[error("implausible cost of {kind}: {ns:.0} ns a hit")]
    Implausible { kind: &'static str, ns: f64 },
}

core::arch::global_asm!(
    ".pushsection .text.omegi_probe_cost,\"ax\",@progbits",
    ".globl omegi_probe_cost_push",
    ".type omegi_probe_cost_push,@function",
    ".p2align 4",
    "omegi_probe_cost_push:",
    "push rbp",
    "pop rbp",
    "mov eax, edi",
    "ret",
    ".size omegi_probe_cost_push, .-omegi_probe_cost_push",
    ".globl omegi_probe_cost_step",
    ".type omegi_probe_cost_step,@function",
    ".p2align 4",
    "omegi_probe_cost_step:",
    "mov eax, edi",
    "ret",
    ".size omegi_probe_cost_step, .-omegi_probe_cost_step",
    ".popsection",
);

unsafe extern "C" {
    fn omegi_probe_cost_push(x: i32) -> i32;
    fn omegi_probe_cost_step(x: i32) -> i32;
}

/// Measures the costs; `tracefs` is where tracefs is mounted.
pub fn measure(tracefs: &Path) -> Result<ProbeCosts, MeasureError> {
    let push = omegi_probe_cost_push as unsafe extern "C" fn(i32) -> i32 as usize as u64;
    let step = omegi_probe_cost_step as unsafe extern "C" fn(i32) -> i32 as usize as u64;
    let (binary, push_offset) = file_offset(push)?;
    let (_, step_offset) = file_offset(step)?;
    // A uprobe is on the file: another agent of the same binary measuring
    // at the same time would trap in our calls. One at a time.
    let lock =
        fs::File::open(&binary).map_err(|e| MeasureError::Io(binary.display().to_string(), e))?;
    // SAFETY: flock on a descriptor we own; released when `lock` closes.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(MeasureError::Io(
            binary.display().to_string(),
            std::io::Error::last_os_error(),
        ));
    }
    let group = format!("omegi_cost_{}", std::process::id());
    let mut events = Events {
        tracefs: tracefs.to_owned(),
        group: group.clone(),
        names: Vec::new(),
    };
    let target = binary.display();
    events.add("push", &format!("p:{group}/push {target}:{push_offset:#x}"))?;
    events.add("step", &format!("p:{group}/step {target}:{step_offset:#x}"))?;
    events.add("ret", &format!("r:{group}/ret {target}:{push_offset:#x}"))?;

    let base_push = per_call_ns(omegi_probe_cost_push);
    let base_step = per_call_ns(omegi_probe_cost_step);
    let measured = |name: &str, function: unsafe extern "C" fn(i32) -> i32, base: f64| {
        events.enable(name, true)?;
        // The least of three: a preempted run only adds.
        let ns = (0..3)
            .map(|_| per_call_ns(function))
            .fold(f64::INFINITY, f64::min);
        events.enable(name, false)?;
        Ok::<f64, MeasureError>(ns - base)
    };
    let push_hit = measured("push", omegi_probe_cost_push, base_push)?;
    let step_hit = measured("step", omegi_probe_cost_step, base_step)?;
    let ret_total = measured("ret", omegi_probe_cost_push, base_push)?;
    let costs = ProbeCosts {
        emulated_ns: push_hit + BPF_PROGRAM_NS,
        single_stepped_ns: step_hit + BPF_PROGRAM_NS,
        // The uretprobe's entry hit is the emulated push's.
        uretprobe_return_ns: (ret_total - push_hit).max(0.0) + BPF_PROGRAM_NS,
    };
    for (kind, ns) in [
        ("an emulated probe", push_hit),
        ("a single-stepped probe", step_hit),
        ("a uretprobe", ret_total),
    ] {
        if !(10.0..1_000_000.0).contains(&ns) {
            return Err(MeasureError::Implausible { kind, ns });
        }
    }
    Ok(costs)
}

/// Thread CPU time per call of `function`, over [`CALLS`] calls.
fn per_call_ns(function: unsafe extern "C" fn(i32) -> i32) -> f64 {
    let start = thread_cpu_ns();
    let mut sum = 0i32;
    for i in 0..CALLS {
        // SAFETY: the functions above take an int and return it, touching
        // nothing else.
        sum = sum.wrapping_add(unsafe { function(std::hint::black_box(i as i32)) });
    }
    std::hint::black_box(sum);
    (thread_cpu_ns() - start) as f64 / f64::from(CALLS)
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The file and offset in it of the code at `address` in this process.
fn file_offset(address: u64) -> Result<(PathBuf, u64), MeasureError> {
    let maps = fs::read_to_string("/proc/self/maps")
        .map_err(|e| MeasureError::Io("/proc/self/maps".into(), e))?;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(_perms), Some(offset), Some(_dev), Some(_inode), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset)) = (
            u64::from_str_radix(start, 16),
            u64::from_str_radix(end, 16),
            u64::from_str_radix(offset, 16),
        ) else {
            continue;
        };
        if (start..end).contains(&address) && path.starts_with('/') {
            return Ok((PathBuf::from(path), address - start + offset));
        }
    }
    Err(MeasureError::NotMapped)
}

/// uprobe events this measure added, removed when dropped.
struct Events {
    tracefs: PathBuf,
    group: String,
    names: Vec<String>,
}

impl Events {
    fn write(&self, file: &Path, text: &str) -> Result<(), MeasureError> {
        let io = |e| MeasureError::Io(file.display().to_string(), e);
        let mut handle = fs::OpenOptions::new().append(true).open(file).map_err(io)?;
        handle.write_all(text.as_bytes()).map_err(io)
    }

    fn add(&mut self, name: &str, definition: &str) -> Result<(), MeasureError> {
        self.write(
            &self.tracefs.join("uprobe_events"),
            &format!("{definition}\n"),
        )?;
        self.names.push(name.to_owned());
        // Nothing is recorded: the filter matches no process.
        let event = self.tracefs.join("events").join(&self.group).join(name);
        self.write(&event.join("filter"), "common_pid == 0\n")
    }

    fn enable(&self, name: &str, on: bool) -> Result<(), MeasureError> {
        let event = self.tracefs.join("events").join(&self.group).join(name);
        self.write(&event.join("enable"), if on { "1\n" } else { "0\n" })
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = self.enable(name, false);
            let _ = self.write(
                &self.tracefs.join("uprobe_events"),
                &format!("-:{}/{name}\n", self.group),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probed_functions_are_found_in_the_file() {
        // What the uprobes will sit on: `push rbp` (emulated), `mov eax, edi`
        // (single-stepped).
        for (function, bytes) in [
            (
                omegi_probe_cost_push as unsafe extern "C" fn(i32) -> i32,
                &[0x55, 0x5d][..],
            ),
            (omegi_probe_cost_step, &[0x89, 0xf8, 0xc3][..]),
        ] {
            let (file, offset) = file_offset(function as usize as u64).unwrap();
            let contents = fs::read(&file).unwrap();
            let offset = offset as usize;
            assert_eq!(&contents[offset..offset + bytes.len()], bytes, "{file:?}");
            // SAFETY: as in `per_call_ns`.
            assert_eq!(unsafe { function(41) }, 41);
        }
    }
}
