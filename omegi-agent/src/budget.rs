//! The overhead budget (`--overhead-budget`, `OMEGI_OVERHEAD_BUDGET`): a
//! bound on how much the probes slow the traced program down.
//!
//! # Why a global budget
//!
//! Every traced call costs the program its probe hits: about 1 µs for a probe
//! the kernel emulates, about 10 µs for one it single-steps (every `ret`: a
//! VM exit on a KVM guest), about 0.6 µs for a uretprobe's return. A library
//! like SQLite has hundreds of small functions that are each called a few
//! thousand times a second: no one of them is "hot", but together their
//! probes made a 24 ms run last 23 s. A rule per function cannot see that;
//! this one adds up what all the probes cost and compares it with what the
//! program itself does.
//!
//! # How
//!
//! Four times a second for the first two seconds after attaching, then once
//! a second (`agent::watch_budget`), the agent reads the kernel's
//! per-function call counts (the
//! `FUNCTIONS` map, which it has mapped, so no system call) and the traced
//! processes' CPU time (`utime + stime` in `/proc/PID/stat`, summed over the
//! processes). The probes' CPU time is estimated as calls × the cost of the
//! function's probes ([`ProbeCosts`], by kind of probe, measured at start on
//! the machine by [`crate::probe_cost`]). The probes run on the
//! program's threads, so they are inside its CPU time: the program's own
//! work is the CPU time minus the estimate, and the slowdown is the estimate
//! over the work. When the slowdown is over the budget, the functions that
//! cost the most for the least (ranked by their probes' cost times that
//! cost per unit of their own time, the mean call duration: many short
//! calls first) are detached, one after the other, until the estimate of
//! what is left fits. Detaching cannot make the work smaller, so the order
//! and the stopping point follow from the plain numbers of one window
//! ([`choose`]). A function whose probes cost less than the budget's share
//! of its own time is within the budget by itself
//! and never chosen, whatever the others cost.
//!
//! Detached functions stay detached: when the load falls, nothing is
//! attached again (a function that was worth dropping once would likely be
//! again). The first second is not checked (it sets the baseline), so the
//! cost may go over the budget for up to two windows after the load rises
//! (the window it rises in, then the relink, a few milliseconds with
//! `uprobe_multi` links).
//!
//! Probes costing less than [`MIN_PROBE_CPU`] of one CPU never trigger the
//! budget: a mostly idle program whose few calls are a large share of its
//! tiny CPU time is not slowed in any way one could see.
//!
//! The old per-function rule (`CALLS,DURATION`: detach a function with more
//! than CALLS calls a second shorter than DURATION) is still accepted.
//!
//! A function that cannot be detached (the relink failed) stays counted as
//! attached: it is tried again at the next checks, and after
//! [`DETACH_ATTEMPTS`] failures given up on, with one warning.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    attach::{functions::FunctionCount, ReturnMechanism},
    discovery::{ExitKind, Function, ProbeCost},
};

/// The default budget: the probes may take 5% of the traced processes' CPU
/// time.
pub const DEFAULT: &str = "5%";

/// Probes costing less than this share of one CPU (10 ms a second) never
/// trigger the global budget.
pub const MIN_PROBE_CPU: f64 = 0.01;

/// How many times detaching a function is tried before it is given up on.
pub const DETACH_ATTEMPTS: u32 = 3;

/// A budget that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "a share of the program's CPU time the probes may take, above 0% and below 100% \
     (e.g. 5%), or CALLS,DURATION (e.g. 100000,1us: the old per-function rule), or off"
)]
pub struct BudgetError;

/// What `--overhead-budget` bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// The probes' estimated CPU time may be at most this share (0.05 for
    /// 5%) of the CPU time the traced processes spend on their own work.
    Slowdown(f64),
    /// The old per-function rule: a function with more than
    /// `calls_per_second` calls a second shorter than `mean_duration` is
    /// detached.
    PerFunction {
        calls_per_second: u64,
        mean_duration: Duration,
    },
}

impl Budget {
    /// Parses `5%` (or `2.5%`), `CALLS,DURATION` (e.g. `100000,1us`; CALLS
    /// may end in `k` or `M`) or `off` (`None`).
    pub fn parse(text: &str) -> Result<Option<Self>, BudgetError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") || text == "0" {
            return Ok(None);
        }
        if let Some(percent) = text.strip_suffix('%') {
            let percent: f64 = percent.trim().parse().map_err(|_| BudgetError)?;
            if !(percent > 0.0 && percent < 100.0) {
                return Err(BudgetError);
            }
            return Ok(Some(Self::Slowdown(percent / 100.0)));
        }
        let (calls, duration) = text.split_once(',').ok_or(BudgetError)?;
        let calls = calls.trim().trim_end_matches("/s");
        let (digits, multiplier) = if let Some(digits) = calls.strip_suffix(['k', 'K']) {
            (digits, 1_000)
        } else if let Some(digits) = calls.strip_suffix('M') {
            (digits, 1_000_000)
        } else {
            (calls, 1)
        };
        let calls_per_second = digits
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .filter(|&n| n > 0)
            .ok_or(BudgetError)?;
        let mean_duration = humantime::parse_duration(duration.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or(BudgetError)?;
        Ok(Some(Self::PerFunction {
            calls_per_second,
            mean_duration,
        }))
    }

    /// Calls shorter than this are counted apart by the kernel
    /// (`FunctionState::short_calls`); zero for the global budget, which
    /// does not need them.
    pub fn short_call(&self) -> Duration {
        match self {
            Self::Slowdown(_) => Duration::ZERO,
            Self::PerFunction { mean_duration, .. } => *mean_duration,
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Rounded to 0.01%: 0.07 * 100 is 7.000000000000001.
            Self::Slowdown(share) => write!(f, "{}%", (share * 1e4).round() / 1e2),
            Self::PerFunction {
                calls_per_second,
                mean_duration,
            } => write!(
                f,
                "{calls_per_second} calls/s under {}",
                humantime::format_duration(*mean_duration)
            ),
        }
    }
}

/// What one hit of each kind of probe costs the traced program, in ns of
/// CPU time (the trap, the BPF program and, when single-stepped, the step).
///
/// Measured at start on the machine ([`crate::probe_cost`]); when that
/// fails, [`KVM_GUEST`](Self::KVM_GUEST).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeCosts {
    /// A probe on an instruction the kernel emulates (`push`, `nop`, `call`,
    /// `jmp`).
    pub emulated_ns: f64,
    /// A probe on any other instruction, single-stepped (`ret`, `endbr64`,
    /// `mov`, …).
    pub single_stepped_ns: f64,
    /// A uretprobe's return (its entry hit is the entry probe's).
    pub uretprobe_return_ns: f64,
}

impl ProbeCosts {
    /// The figures measured on a KVM guest in wall-clock time (BENCHMARKS.md:
    /// 823 ns for an emulated `push`, 9,445 ns for a single-stepped `ret`,
    /// 389 ns for a uretprobe's return, plus about 200 ns of BPF program a
    /// hit). Measured as CPU time there, a single-step showed about half
    /// (part of its VM exit appears not to be counted as the process's time), so these err on the
    /// side of detaching.
    pub const KVM_GUEST: Self = Self {
        emulated_ns: 1_000.0,
        single_stepped_ns: 9_600.0,
        uretprobe_return_ns: 600.0,
    };

    fn of(&self, cost: ProbeCost) -> f64 {
        match cost {
            ProbeCost::Emulated => self.emulated_ns,
            ProbeCost::SingleStepped => self.single_stepped_ns,
        }
    }

    /// What one call of `function` costs in probes: its entry probe and the
    /// dearest way out (the uretprobe's return, or the dearest probed exit:
    /// which one a call takes is not counted). Zero for a function with no
    /// entry probe.
    pub fn per_call(&self, function: &Function, uretprobe: bool) -> f64 {
        let Some(entry) = &function.code.entry else {
            return 0.0;
        };
        let exits = function
            .code
            .exits
            .iter()
            .filter(|exit| !uretprobe || exit.kind == ExitKind::TailJump)
            .map(|exit| self.of(exit.site.cost));
        let returns = if uretprobe {
            self.uretprobe_return_ns
        } else {
            0.0
        };
        self.of(entry.cost) + exits.fold(returns, f64::max)
    }

    /// [`per_call`](Self::per_call) of every function of `functions`, by id,
    /// with the return mechanism in use.
    pub fn for_functions(&self, functions: &[Function], mechanism: ReturnMechanism) -> Vec<f64> {
        functions
            .iter()
            .map(|function| self.per_call(function, mechanism.uretprobe_for(function)))
            .collect()
    }
}

/// One function's calls over a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FunctionLoad {
    pub id: u32,
    pub calls: u64,
    /// Their summed duration (measured between the probes, children
    /// included; each call counted for at most
    /// [`BUDGET_DURATION_CAP_NS`](omegi_common::BUDGET_DURATION_CAP_NS), so
    /// that a preempted call does not hide many short ones).
    pub total_ns: u64,
    /// What one of its calls costs in probes.
    pub cost_per_call_ns: f64,
    /// Whether it may be chosen: not already detached, given up on, or on an
    /// error path being recorded (its cost counts all the same).
    pub detachable: bool,
}

impl FunctionLoad {
    /// The probes' CPU time over the window.
    pub fn probe_ns(&self) -> f64 {
        self.calls as f64 * self.cost_per_call_ns
    }

    /// The mean duration of a call.
    pub fn mean_ns(&self) -> f64 {
        self.total_ns as f64 / self.calls.max(1) as f64
    }

    /// Probe cost per ns of the function's own time: what detaching it
    /// saves for what it loses.
    fn waste(&self) -> f64 {
        self.cost_per_call_ns / self.mean_ns().max(1.0)
    }

    /// The order of detaching: what its probes cost times how wasteful
    /// they are, so many short calls go first, and a function of the same
    /// shape called once a second, whose detach saves nothing, goes last.
    fn rank(&self) -> f64 {
        self.probe_ns() * self.waste()
    }
}

/// What the probes cost over a window, and which functions to detach.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The probes' estimated CPU time, ns.
    pub probe_ns: f64,
    /// The traced processes' own work: their CPU time minus the probes'.
    pub work_ns: f64,
    /// Functions to detach, dearest for the least first.
    pub detach: Vec<FunctionLoad>,
}

impl Choice {
    /// The estimated slowdown: the probes' time over the work (0.05 = 5%).
    pub fn slowdown(&self) -> f64 {
        self.probe_ns / self.work_ns
    }
}

/// Chooses, from the loads of one window of `seconds` in which the traced
/// processes used `cpu_ns` of CPU time, the functions to detach so that the
/// probes' estimate fits within `share` of the work. A function whose own
/// probes cost no more than `share` of its own time is never chosen: it is
/// within the budget by itself, whatever the others cost. When the estimate is
/// larger than the CPU time (probes cheaper than the constants say), the
/// work is taken to be 1% of the CPU time.
pub fn choose(loads: &[FunctionLoad], cpu_ns: f64, seconds: f64, share: f64) -> Choice {
    let probe_ns: f64 = loads.iter().map(FunctionLoad::probe_ns).sum();
    let work_ns = (cpu_ns - probe_ns).max(cpu_ns * 0.01).max(1.0);
    let mut choice = Choice {
        probe_ns,
        work_ns,
        detach: Vec::new(),
    };
    let allowed = share * work_ns;
    if probe_ns <= allowed || probe_ns < MIN_PROBE_CPU * seconds * 1e9 {
        return choice;
    }
    let mut candidates: Vec<&FunctionLoad> = loads
        .iter()
        .filter(|load| load.detachable && load.probe_ns() > 0.0 && load.waste() > share)
        .collect();
    candidates.sort_by(|a, b| {
        b.rank()
            .total_cmp(&a.rank())
            .then(b.probe_ns().total_cmp(&a.probe_ns()))
            .then(a.id.cmp(&b.id))
    });
    let mut left = probe_ns;
    for load in candidates {
        if left <= allowed {
            break;
        }
        left -= load.probe_ns();
        choice.detach.push(*load);
    }
    choice
}

/// A function the budget chose to detach, with what it cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HotFunction {
    pub id: u32,
    /// All its calls, per second.
    pub calls_per_second: f64,
    pub mean_ns: f64,
    /// Its probes' estimated CPU time, ns a second (0 for the per-function
    /// rule).
    pub probe_ns_per_second: f64,
    /// The share of its calls shorter than the per-function rule's duration
    /// (0 for the global budget).
    pub short_share: f64,
}

/// Why the budget chose functions: the global estimate when it chose them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// The probes' estimated CPU time, ns a second.
    pub probe_ns_per_second: f64,
    /// The traced processes' CPU time, ns a second (probes included).
    pub cpu_ns_per_second: f64,
    /// Estimated slowdown of the traced processes before detaching.
    pub slowdown: f64,
    /// What it is estimated to be after.
    pub slowdown_after: f64,
}

/// Where a function stands with the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Attached,
    /// Chosen, waiting for [`BudgetWatch::detached`] or
    /// [`BudgetWatch::failed`].
    Chosen,
    Detached,
    /// Detaching it failed [`DETACH_ATTEMPTS`] times: it stays traced.
    GivenUp,
}

/// Watches the kernel's per-function counts and the traced processes' CPU
/// time against a budget, and chooses the functions to detach.
#[derive(Debug)]
pub struct BudgetWatch {
    budget: Budget,
    /// Probe cost of one call, by function id.
    costs: Vec<f64>,
    last: Vec<FunctionCount>,
    last_cpu: Option<CpuSample>,
    status: Vec<Status>,
    failures: HashMap<u32, u32>,
}

impl BudgetWatch {
    /// `costs`: each function's probe cost per call, by id (see
    /// [`ProbeCosts::for_functions`]).
    pub fn new(budget: Budget, costs: Vec<f64>) -> Self {
        let status = vec![Status::Attached; costs.len()];
        Self {
            budget,
            costs,
            last: Vec::new(),
            last_cpu: None,
            status,
            failures: HashMap::new(),
        }
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    fn is_candidate(&self, id: u32) -> bool {
        self.status.get(id as usize) == Some(&Status::Attached)
    }

    /// Takes the counts and the CPU time now, `elapsed` after the previous
    /// ones, and returns the functions to detach (to be confirmed with
    /// [`detached`](Self::detached) or [`failed`](Self::failed)) and, for the
    /// global budget, the estimate that chose them. `pinned` functions (on
    /// an error path being recorded) are never chosen.
    pub fn check(
        &mut self,
        counts: Vec<FunctionCount>,
        cpu: CpuSample,
        elapsed: Duration,
        pinned: &dyn Fn(u32) -> bool,
    ) -> (Vec<HotFunction>, Option<Verdict>) {
        let seconds = elapsed.as_secs_f64();
        let mut chosen = Vec::new();
        let mut verdict = None;
        // No CPU time at all: the traced processes are gone (or were never
        // read), and there is nothing to weigh the probes against.
        let no_cpu = matches!(self.budget, Budget::Slowdown(_))
            && self
                .last_cpu
                .as_ref()
                .is_some_and(|last| cpu.since(last) == 0);
        if seconds > 0.0 && self.last.len() == counts.len() && !no_cpu {
            let windows = counts.iter().zip(&self.last).enumerate();
            match self.budget {
                Budget::Slowdown(share) => {
                    let cpu_ns = self.last_cpu.as_ref().map_or(0, |last| cpu.since(last));
                    let loads: Vec<FunctionLoad> = windows
                        .map(|(id, (now, before))| FunctionLoad {
                            id: id as u32,
                            calls: now.calls.saturating_sub(before.calls),
                            total_ns: now.total_ns.saturating_sub(before.total_ns),
                            cost_per_call_ns: self.costs.get(id).copied().unwrap_or(0.0),
                            detachable: self.is_candidate(id as u32) && !pinned(id as u32),
                        })
                        .filter(|load| load.calls > 0)
                        .collect();
                    let choice = choose(&loads, cpu_ns as f64, seconds, share);
                    if !choice.detach.is_empty() {
                        let saved: f64 = choice.detach.iter().map(FunctionLoad::probe_ns).sum();
                        verdict = Some(Verdict {
                            probe_ns_per_second: choice.probe_ns / seconds,
                            cpu_ns_per_second: cpu_ns as f64 / seconds,
                            slowdown: choice.slowdown(),
                            slowdown_after: (choice.probe_ns - saved) / choice.work_ns,
                        });
                    }
                    chosen = choice
                        .detach
                        .iter()
                        .map(|load| HotFunction {
                            id: load.id,
                            calls_per_second: load.calls as f64 / seconds,
                            mean_ns: load.mean_ns(),
                            probe_ns_per_second: load.probe_ns() / seconds,
                            short_share: 0.0,
                        })
                        .collect();
                }
                Budget::PerFunction {
                    calls_per_second, ..
                } => {
                    for (id, (now, before)) in windows {
                        let calls = now.calls.saturating_sub(before.calls);
                        let id = id as u32;
                        if calls == 0 || !self.is_candidate(id) || pinned(id) {
                            continue;
                        }
                        let short = now.short_calls.saturating_sub(before.short_calls);
                        if short as f64 / seconds > calls_per_second as f64 {
                            chosen.push(HotFunction {
                                id,
                                calls_per_second: calls as f64 / seconds,
                                mean_ns: now.total_ns.saturating_sub(before.total_ns) as f64
                                    / calls as f64,
                                probe_ns_per_second: calls as f64
                                    * self.costs.get(id as usize).copied().unwrap_or(0.0)
                                    / seconds,
                                short_share: short as f64 / calls as f64,
                            });
                        }
                    }
                }
            }
        }
        for function in &chosen {
            self.status[function.id as usize] = Status::Chosen;
        }
        self.last = counts;
        self.last_cpu = Some(cpu);
        (chosen, verdict)
    }

    /// The functions `ids` are detached: never chosen again.
    pub fn detached(&mut self, ids: &[u32]) {
        for &id in ids {
            if let Some(status) = self.status.get_mut(id as usize) {
                *status = Status::Detached;
            }
            self.failures.remove(&id);
        }
    }

    /// Detaching `ids` failed: they are still attached and are chosen again
    /// when still over the budget, up to [`DETACH_ATTEMPTS`] times. Returns
    /// those given up on now (each once).
    pub fn failed(&mut self, ids: &[u32]) -> Vec<u32> {
        let mut given_up = Vec::new();
        for &id in ids {
            let Some(status) = self.status.get_mut(id as usize) else {
                continue;
            };
            let failures = self.failures.entry(id).or_default();
            *failures += 1;
            if *failures >= DETACH_ATTEMPTS {
                *status = Status::GivenUp;
                given_up.push(id);
            } else {
                *status = Status::Attached;
            }
        }
        given_up
    }
}

/// The CPU time (user + system, ns) of each traced process so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuSample(HashMap<u32, u64>);

impl CpuSample {
    /// From `(pid, ns)` pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u32, u64)>) -> Self {
        Self(pairs.into_iter().collect())
    }

    /// The processes' CPU time since `before`: a process that is new counts
    /// all its time (it started in the window), one that is gone counts
    /// nothing more.
    pub fn since(&self, before: &Self) -> u64 {
        self.0
            .iter()
            .map(|(pid, &now)| now.saturating_sub(before.0.get(pid).copied().unwrap_or(0)))
            .sum()
    }

    /// Reads the CPU time of the processes of `ids` (thread ids count as
    /// their process, once), and with `binary`, of every process running it
    /// (`--binary`).
    pub fn read(ids: &[u32], binary: Option<&Path>) -> Self {
        let mut pids: Vec<u32> = ids.iter().filter_map(|&id| tgid_of(id)).collect();
        if let Some(binary) = binary {
            pids.extend(processes_running(binary));
        }
        pids.sort_unstable();
        pids.dedup();
        Self::from_pairs(
            pids.into_iter()
                .filter_map(|pid| Some((pid, cpu_time_ns(pid)?))),
        )
    }
}

/// The process a thread id belongs to (`Tgid:` in `/proc/ID/status`).
fn tgid_of(id: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{id}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// `utime + stime` of process `pid`, in ns.
fn cpu_time_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks.saturating_mul(1_000_000_000) / clock_ticks())
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line, in clock
/// ticks; fields are counted from the last `)`, as the command may hold any.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    // After the command: state is field 3, utime field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// Processes whose executable is the file `binary` (same device and inode).
fn processes_running(binary: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(binary) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let exe = PathBuf::from(format!("/proc/{pid}/exe"));
            std::fs::metadata(exe)
                .is_ok_and(|meta| meta.dev() == target.dev() && meta.ino() == target.ino())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(calls: u64, total_ns: u64, short_calls: u64) -> FunctionCount {
        FunctionCount {
            calls,
            total_ns,
            short_calls,
        }
    }

    fn load(id: u32, calls: u64, mean_ns: u64, cost_per_call_ns: f64) -> FunctionLoad {
        FunctionLoad {
            id,
            calls,
            total_ns: calls * mean_ns,
            cost_per_call_ns,
            detachable: true,
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn cpu(ns: u64) -> CpuSample {
        CpuSample::from_pairs([(1, ns)])
    }

    fn never(_: u32) -> bool {
        false
    }

    #[test]
    fn parses_budgets() {
        assert_eq!(Budget::parse("5%").unwrap(), Some(Budget::Slowdown(0.05)));
        assert_eq!(
            Budget::parse(" 2.5 %").unwrap(),
            Some(Budget::Slowdown(0.025))
        );
        assert_eq!(
            Budget::parse(DEFAULT).unwrap(),
            Some(Budget::Slowdown(0.05))
        );
        assert_eq!(
            Budget::parse("100000,1us").unwrap(),
            Some(Budget::PerFunction {
                calls_per_second: 100_000,
                mean_duration: Duration::from_micros(1)
            })
        );
        assert!(matches!(
            Budget::parse("50k/s, 500ns").unwrap(),
            Some(Budget::PerFunction {
                calls_per_second: 50_000,
                ..
            })
        ));
        assert!(matches!(
            Budget::parse("2M,2us").unwrap(),
            Some(Budget::PerFunction {
                calls_per_second: 2_000_000,
                ..
            })
        ));
        assert_eq!(Budget::parse("off").unwrap(), None);
        assert_eq!(Budget::parse("OFF").unwrap(), None);
        for bad in [
            "",
            "100000",
            "x,1us",
            "100000,soon",
            "0,1us",
            "10,0s",
            "0%",
            "100%",
            "-5%",
            "x%",
            "5",
        ] {
            assert_eq!(Budget::parse(bad), Err(BudgetError), "{bad}");
        }
        assert_eq!(Budget::Slowdown(0.05).to_string(), "5%");
        assert_eq!(Budget::parse("7%").unwrap().unwrap().to_string(), "7%");
        assert_eq!(Budget::parse("2.5%").unwrap().unwrap().to_string(), "2.5%");
        assert_eq!(
            Budget::parse("5%").unwrap().unwrap().short_call(),
            Duration::ZERO
        );
    }

    #[test]
    fn within_the_budget_nothing_is_detached() {
        // 1 s of CPU, 40 ms of it probes: 4.2% of the work, under 5%.
        let loads = [load(0, 40_000, 100, 1_000.0)];
        let choice = choose(&loads, 1e9, 1.0, 0.05);
        assert!(choice.detach.is_empty());
        assert!((choice.slowdown() - 0.04 / 0.96).abs() < 1e-9);
    }

    #[test]
    fn many_short_calls_go_first_until_it_fits() {
        // 1 s of CPU: 0.6 s of it probes, work 0.4 s; 5% of it is 20 ms.
        let loads = [
            // 100 ns calls, 1 µs of probes each: 0.2 s.
            load(0, 200_000, 100, 1_000.0),
            // 10 µs calls, 1 µs each: 0.1 s, the least wasteful.
            load(1, 100_000, 10_000, 1_000.0),
            // 1 µs calls, 10 µs each (a ret single-stepped): 0.29 s.
            load(2, 29_000, 1_000, 10_000.0),
            // 2 µs calls, 1 µs each: 10 ms, kept if it fits.
            load(3, 10_000, 2_000, 1_000.0),
        ];
        let choice = choose(&loads, 1e9, 1.0, 0.05);
        let ids: Vec<u32> = choice.detach.iter().map(|l| l.id).collect();
        // By probe time × waste: 2 (0.29 s × 10), 0 (0.2 s × 10), 1
        // (0.1 s × 0.1); then the 10 ms of 3 (× 0.5) fit.
        assert_eq!(ids, vec![2, 0, 1]);
        assert!((choice.work_ns - 0.4e9).abs() < 1.0);
        assert!((choice.slowdown() - 1.5).abs() < 1e-9);

        // With a 50% budget (0.2 s allowed), the two worst are enough.
        let choice = choose(&loads, 1e9, 1.0, 0.5);
        let ids: Vec<u32> = choice.detach.iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![2, 0]);
    }

    #[test]
    fn a_function_within_the_budget_by_itself_stays() {
        // 0.5 s of probes on 100 ns calls, and 1,000 calls of 1 ms whose
        // 1 µs of probes are 0.1% of their time: only the first goes, even
        // though what is left does not fit when it cannot be detached.
        let loads = [
            load(0, 500_000, 100, 1_000.0),
            load(1, 1_000, 1_000_000, 1_000.0),
        ];
        let choice = choose(&loads, 1e9, 1.0, 0.05);
        assert_eq!(
            choice.detach.iter().map(|l| l.id).collect::<Vec<_>>(),
            vec![0]
        );
        let pinned = [
            FunctionLoad {
                detachable: false,
                ..loads[0]
            },
            loads[1],
        ];
        assert!(choose(&pinned, 1e9, 1.0, 0.05).detach.is_empty());
    }

    #[test]
    fn among_alike_functions_the_dearest_go_first() {
        // Ten hot functions and 400 of the same shape called once a second
        // (1,200 functions like many_hot.c): only hot ones go.
        let mut loads: Vec<FunctionLoad> = (0..10)
            .map(|id| load(id, 20_000, 5_000 + u64::from(id) * 100, 10_000.0))
            .collect();
        loads.extend((10..410).map(|id| load(id, 1, 4_000 + u64::from(id), 10_000.0)));
        // 2 s of probes... in 2.5 s of CPU: work 0.5 s, 25 ms allowed.
        let choice = choose(&loads, 2.5e9, 1.0, 0.05);
        let mut ids: Vec<u32> = choice.detach.iter().map(|l| l.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn hundreds_of_modest_functions_add_up() {
        // 300 functions at 3,000 calls/s each (the per-function rule would
        // keep every one): 0.9M calls, 1.6 µs each, 1.44 s of probes in
        // 1.5 s of CPU.
        let loads: Vec<FunctionLoad> = (0..300)
            .map(|id| load(id, 3_000, 200 + u64::from(id), 1_600.0))
            .collect();
        let choice = choose(&loads, 1.5e9, 1.0, 0.05);
        // Work 60 ms, 3 ms allowed: one function's 4.8 ms is too much, so
        // all go, the shortest first.
        assert_eq!(choice.detach.len(), 300);
        assert_eq!(choice.detach[0].id, 0);
        assert_eq!(choice.detach[299].id, 299);
    }

    #[test]
    fn an_idle_program_is_left_alone() {
        // 5 ms of probes a second against 20 ms of CPU: 33%, but under 1%
        // of a CPU.
        let loads = [load(0, 5_000, 100, 1_000.0)];
        assert!(choose(&loads, 20e6, 1.0, 0.05).detach.is_empty());
        // Twice as many over 2 s: still 5 ms a second.
        let loads = [load(0, 10_000, 100, 1_000.0)];
        assert!(choose(&loads, 40e6, 2.0, 0.05).detach.is_empty());
    }

    #[test]
    fn an_estimate_above_the_cpu_time_still_chooses() {
        // The constants overestimate (bare metal): 2 s of probes in 1 s.
        let loads = [
            load(0, 1_000_000, 100, 1_000.0),
            load(1, 1_000_000, 100, 1_000.0),
        ];
        let choice = choose(&loads, 1e9, 1.0, 0.05);
        assert_eq!(choice.detach.len(), 2);
        assert!((choice.work_ns - 1e7).abs() < 1.0);
    }

    #[test]
    fn the_watch_chooses_confirms_and_retries() {
        let mut watch = BudgetWatch::new(Budget::Slowdown(0.05), vec![1_000.0, 1_000.0, 0.0]);
        // The first reading only sets the baseline.
        let (hot, _) = watch.check(vec![count(0, 0, 0); 3], cpu(0), SECOND, &never);
        assert!(hot.is_empty());
        // 1 s of CPU; function 0: 500k calls of 100 ns (0.5 s of probes);
        // function 1: 1,000 calls of 1 ms (1 ms); 2 has no probes' cost.
        let counts = |n: u64| {
            vec![
                count(n * 500_000, n * 50_000_000, 0),
                count(n * 1_000, n * 1_000_000_000, 0),
                count(n * 10, n * 10, 0),
            ]
        };
        let (hot, verdict) = watch.check(counts(1), cpu(1_000_000_000), SECOND, &never);
        assert_eq!(hot.len(), 1);
        assert_eq!(hot[0].id, 0);
        assert!((hot[0].calls_per_second - 500_000.0).abs() < 1.0);
        assert!((hot[0].probe_ns_per_second - 0.5e9).abs() < 1.0);
        assert!((hot[0].mean_ns - 100.0).abs() < 1e-9);
        let verdict = verdict.unwrap();
        assert!((verdict.slowdown - 0.501 / 0.499).abs() < 1e-9);
        assert!(verdict.slowdown_after < 0.05);

        // The relink failed: still attached, chosen again.
        assert!(watch.failed(&[0]).is_empty());
        let (hot, _) = watch.check(counts(2), cpu(2_000_000_000), SECOND, &never);
        assert_eq!(hot.iter().map(|h| h.id).collect::<Vec<_>>(), vec![0]);
        assert!(watch.failed(&[0]).is_empty());
        let (hot, _) = watch.check(counts(3), cpu(3_000_000_000), SECOND, &never);
        assert_eq!(hot.len(), 1);
        // The third failure gives up on it, once.
        assert_eq!(watch.failed(&[0]), vec![0]);
        let (hot, _) = watch.check(counts(4), cpu(4_000_000_000), SECOND, &never);
        assert!(hot.is_empty());
    }

    #[test]
    fn detached_and_pinned_functions_are_not_chosen() {
        let mut watch = BudgetWatch::new(Budget::Slowdown(0.05), vec![1_000.0, 1_000.0]);
        watch.check(vec![count(0, 0, 0); 2], cpu(0), SECOND, &never);
        let counts = |n: u64| {
            vec![
                count(n * 400_000, n * 40_000_000, 0),
                count(n * 400_000, n * 40_000_000, 0),
            ]
        };
        // Function 1 is on an error path being recorded: not chosen, but
        // its cost counts.
        let pinned = |id: u32| id == 1;
        let (hot, verdict) = watch.check(counts(1), cpu(1_000_000_000), SECOND, &pinned);
        assert_eq!(hot.iter().map(|h| h.id).collect::<Vec<_>>(), vec![0]);
        assert!((verdict.unwrap().slowdown - 0.8 / 0.2).abs() < 1e-9);
        watch.detached(&[0]);
        // Calls of 0 still counted after its detach (in flight) do not
        // choose it again; 1 is free now.
        let (hot, _) = watch.check(counts(2), cpu(2_000_000_000), SECOND, &never);
        assert_eq!(hot.iter().map(|h| h.id).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn the_per_function_rule_still_works() {
        let budget = Budget::parse("100000,1us").unwrap().unwrap();
        let mut watch = BudgetWatch::new(budget, vec![1_000.0; 4]);
        watch.check(vec![count(0, 0, 0); 4], cpu(0), SECOND, &never);
        let (hot, verdict) = watch.check(
            vec![
                // 200k calls of 500 ns: over.
                count(200_000, 100_000_000, 200_000),
                // 200k calls of 2 µs: long enough to keep.
                count(200_000, 400_000_000, 0),
                // 50k calls of 100 ns: rare enough to keep.
                count(50_000, 5_000_000, 50_000),
                // Most short, a few very long (a preempted thread): hot.
                count(200_000, 2_000_000_000, 190_000),
            ],
            cpu(1_000_000_000),
            SECOND,
            &never,
        );
        assert!(verdict.is_none());
        let ids: Vec<u32> = hot.iter().map(|function| function.id).collect();
        assert_eq!(ids, vec![0, 3]);
        assert!((hot[0].mean_ns - 500.0).abs() < 1.0);
        assert!((hot[1].short_share - 0.95).abs() < 1e-9);
        // 150k calls in 2 s is 75k/s: under the rate.
        let mut watch = BudgetWatch::new(budget, vec![1_000.0]);
        watch.check(vec![count(0, 0, 0)], cpu(0), SECOND, &never);
        let (hot, _) = watch.check(
            vec![count(150_000, 15_000_000, 150_000)],
            cpu(1),
            Duration::from_secs(2),
            &never,
        );
        assert!(hot.is_empty());
    }

    #[test]
    fn cpu_time_is_summed_over_processes() {
        let before = CpuSample::from_pairs([(1, 100), (2, 50)]);
        // 1 used 30 more, 2 is gone, 3 is new with 20.
        let now = CpuSample::from_pairs([(1, 130), (3, 20)]);
        assert_eq!(now.since(&before), 50);
        let stat = "42 (a) b) c) R 1 42 42 0 -1 4194304 100 0 0 0 250 75 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert!(CpuSample::read(&[std::process::id()], None).0.len() == 1);
    }
}
