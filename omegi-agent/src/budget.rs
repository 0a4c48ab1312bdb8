//! The overhead budget (`--overhead-budget`): a function called very often
//! for very little time costs the traced program more in probes than it does
//! in work (a probe hit costs about 1 µs on a KVM guest, several when it is
//! single-stepped). Such a function is detached while tracing goes on, and
//! named in a warning and in the summary.
//!
//! The kernel counts, per function, the calls that ended and those shorter
//! than the budget's duration; the agent reads the counts once a second. A
//! function goes over the budget when, over the last second, more of its
//! calls than the budget's rate were shorter than the budget's duration.
//! Counting short calls rather than averaging durations keeps a few long
//! calls (a preempted thread) from hiding many short ones. Durations are
//! measured between the probes, so they include part of the probes' own
//! cost (about 0.8 µs on a KVM guest): the budget errs on the side of
//! keeping a function.

use std::{collections::HashSet, time::Duration};

use crate::attach::functions::FunctionCount;

/// Functions with more than `calls_per_second` calls a second shorter than
/// `mean_duration` are detached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub calls_per_second: u64,
    pub mean_duration: Duration,
}

impl Budget {
    /// Parses `CALLS,DURATION` (e.g. `100000,1us`; CALLS may end in `k` or
    /// `M`) or `off`. On error, says what is expected.
    pub fn parse(text: &str) -> Result<Option<Self>, String> {
        let expected = || "CALLS,DURATION (e.g. 100000,1us or 50k,500ns) or off".to_owned();
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") || text == "0" {
            return Ok(None);
        }
        let (calls, duration) = text.split_once(',').ok_or_else(expected)?;
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
            .ok_or_else(expected)?;
        let mean_duration = humantime::parse_duration(duration.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(expected)?;
        Ok(Some(Self {
            calls_per_second,
            mean_duration,
        }))
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} calls/s under {}",
            self.calls_per_second,
            humantime::format_duration(self.mean_duration)
        )
    }
}

/// A function over the budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HotFunction {
    pub id: u32,
    /// All its calls, per second.
    pub calls_per_second: f64,
    /// The share of them shorter than the budget's duration.
    pub short_share: f64,
    pub mean_ns: f64,
}

/// Watches the kernel's per-function counts against a budget.
#[derive(Debug)]
pub struct BudgetWatch {
    budget: Budget,
    last: Vec<FunctionCount>,
    detached: HashSet<u32>,
}

impl BudgetWatch {
    pub fn new(budget: Budget) -> Self {
        Self {
            budget,
            last: Vec::new(),
            detached: HashSet::new(),
        }
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Takes the counts now, `elapsed` after the previous ones, and returns
    /// the functions over the budget in that time (each once: they are
    /// taken as detached).
    pub fn check(&mut self, counts: Vec<FunctionCount>, elapsed: Duration) -> Vec<HotFunction> {
        let seconds = elapsed.as_secs_f64();
        let mut hot = Vec::new();
        if seconds > 0.0 && self.last.len() == counts.len() {
            for (id, (now, before)) in counts.iter().zip(&self.last).enumerate() {
                let id = id as u32;
                let calls = now.calls.saturating_sub(before.calls);
                if calls == 0 || self.detached.contains(&id) {
                    continue;
                }
                let short = now.short_calls.saturating_sub(before.short_calls);
                if short as f64 / seconds > self.budget.calls_per_second as f64 {
                    self.detached.insert(id);
                    hot.push(HotFunction {
                        id,
                        calls_per_second: calls as f64 / seconds,
                        short_share: short as f64 / calls as f64,
                        mean_ns: now.total_ns.saturating_sub(before.total_ns) as f64 / calls as f64,
                    });
                }
            }
        }
        self.last = counts;
        hot
    }
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

    #[test]
    fn parses_budgets() {
        assert_eq!(
            Budget::parse("100000,1us").unwrap(),
            Some(Budget {
                calls_per_second: 100_000,
                mean_duration: Duration::from_micros(1)
            })
        );
        assert_eq!(
            Budget::parse("50k/s, 500ns")
                .unwrap()
                .unwrap()
                .calls_per_second,
            50_000
        );
        assert_eq!(
            Budget::parse("2M,2us").unwrap().unwrap().calls_per_second,
            2_000_000
        );
        assert_eq!(Budget::parse("off").unwrap(), None);
        for bad in ["", "100000", "x,1us", "100000,soon", "0,1us", "10,0s"] {
            assert!(Budget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn detaches_frequent_short_functions_once() {
        let budget = Budget::parse("100000,1us").unwrap().unwrap();
        let mut watch = BudgetWatch::new(budget);
        let second = Duration::from_secs(1);
        // The first reading only sets the baseline.
        assert!(watch.check(vec![count(0, 0, 0); 4], second).is_empty());
        let hot = watch.check(
            vec![
                // 200k calls of 500 ns: over.
                count(200_000, 100_000_000, 200_000),
                // 200k calls of 2 µs: long enough to keep.
                count(200_000, 400_000_000, 0),
                // 50k calls of 100 ns: rare enough to keep.
                count(50_000, 5_000_000, 50_000),
                // 200k calls, most short, a few very long (a preempted
                // thread): the mean is long, the function is still hot.
                count(200_000, 2_000_000_000, 190_000),
            ],
            second,
        );
        let ids: Vec<u32> = hot.iter().map(|function| function.id).collect();
        assert_eq!(ids, vec![0, 3]);
        assert!((hot[0].calls_per_second - 200_000.0).abs() < 1.0);
        assert!((hot[0].mean_ns - 500.0).abs() < 1.0);
        assert!((hot[1].short_share - 0.95).abs() < 1e-9);
        // Calls still counted after detach (in flight) do not report it again.
        let again = watch.check(
            vec![
                count(400_000, 200_000_000, 400_000),
                count(400_000, 800_000_000, 0),
                count(100_000, 10_000_000, 100_000),
                count(400_000, 4_000_000_000, 380_000),
            ],
            second,
        );
        assert!(again.is_empty());
    }

    #[test]
    fn the_rate_is_per_second_of_the_window() {
        let budget = Budget::parse("100000,1us").unwrap().unwrap();
        let mut watch = BudgetWatch::new(budget);
        watch.check(vec![count(0, 0, 0)], Duration::from_secs(1));
        // 150k calls in 2 s is 75k/s: under the rate.
        let hot = watch.check(
            vec![count(150_000, 15_000_000, 150_000)],
            Duration::from_secs(2),
        );
        assert!(hot.is_empty());
    }
}
