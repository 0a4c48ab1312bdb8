//! Configuration: the command line and `OMEGI_*` variables, checked once at
//! start. Every bad value is rejected with one line naming the variable (or
//! flag) and what it accepts.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use crate::{
    assembly::ReturnRule,
    attach::{KernelOptions, ReturnProbes},
    budget::Budget,
    cli::{Cli, ConsoleFormat},
    discovery::Selection,
    export::kafka::options::KafkaOptions,
    http::Propagation,
};

pub mod otlp;
pub use otlp::OtlpOptions;

/// A value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{name} = {value:?} is not valid: {expected}")]
pub struct ConfigError {
    /// The variable and flag, e.g. `OMEGI_FLOW_RATE (--flow-rate)`.
    pub name: &'static str,
    pub value: String,
    pub expected: String,
}

/// What to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A running process.
    Pid(u32),
    /// A command to start.
    Command(Vec<OsString>),
    /// Every process of an executable.
    Binary(PathBuf),
}

/// Where spans go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExporterKind {
    Console,
    Otlp,
    Kafka,
}

impl ExporterKind {
    pub const ALL: &'static [(&'static str, ExporterKind)] = &[
        ("console", ExporterKind::Console),
        ("kafka", ExporterKind::Kafka),
        ("otlp", ExporterKind::Otlp),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, kind)| *kind == self)
            .map(|(name, _)| *name)
            .unwrap_or("?")
    }
}

/// Settings of the console exporter.
#[derive(Clone, Debug)]
pub struct ConsoleOptions {
    pub format: ConsoleFormat,
    /// `None` writes to stdout.
    pub output: Option<PathBuf>,
}

/// Everything the agent runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub target: Target,
    pub list_only: bool,
    pub selection: Selection,
    pub service_name: String,
    pub exporters: Vec<ExporterKind>,
    pub flow_rate: u32,
    pub console: ConsoleOptions,
    /// Settings of the OTLP exporter (from the `OTEL_EXPORTER_OTLP_*`
    /// variables), when it is selected.
    pub otlp: Option<OtlpOptions>,
    /// Longest the exporters may take, when tracing ends, to deliver what they
    /// hold; what is left then is counted as failed.
    pub flush_timeout: Duration,
    pub kernel: KernelOptions,
    pub return_probes: ReturnProbes,
    pub max_trace_spans: usize,
    pub queue_size: usize,
    pub drain_interval: Duration,
    /// `--error-if` / `OMEGI_ERROR_IF` return-value rules.
    pub error_rules: Vec<ReturnRule>,
    pub kafka: KafkaOptions,
    /// Print a stats line on stderr this often.
    pub stats_interval: Option<Duration>,
    /// `--overhead-budget`: the bound on the probes' cost, past which
    /// functions are detached.
    pub budget: Option<Budget>,
    /// `--entry-at-first-instruction` (benchmarking probe placement).
    pub entry_at_first_instruction: bool,
    /// `--python-eval-hook`: make every Python call enter the eval function.
    pub python_eval_hook: bool,
}

impl Config {
    /// Checks the command line (with the environment folded in by clap).
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let target = match (cli.pid, cli.binary, cli.command) {
            (Some(pid), _, _) => Target::Pid(parse_pid(&pid)?),
            (None, Some(binary), _) => Target::Binary(binary),
            (None, None, command) => Target::Command(command),
        };
        let split_after = parse_duration("--split-after", &cli.split_after)?;
        let exporters = parse_exporters(&cli.exporter)?;
        let budget = Budget::parse(&cli.overhead_budget).map_err(|error| ConfigError {
            name: "OMEGI_OVERHEAD_BUDGET (--overhead-budget)",
            value: cli.overhead_budget.clone(),
            expected: error.to_string(),
        })?;
        let kernel = KernelOptions {
            split_after,
            all_processes: matches!(target, Target::Binary(_)),
            ring_size: parse_ring_size(&cli.ring_size)?,
            debug_ebpf: cli.debug_ebpf,
            min_duration: parse_duration("--min-duration", &cli.min_duration)?,
            budget_short: budget.map_or(Duration::ZERO, |budget| budget.short_call()),
            thread_slots: parse_thread_slots(cli.thread_slots)?,
            attach_mode: cli.attach_mode,
            probe_lookup: cli.probe_lookup,
            http: parse_propagation(&cli.propagation)? != Propagation::Off,
            capture_args: cli.capture_args,
        };
        Ok(Self {
            target,
            list_only: cli.list,
            selection: Selection {
                project_root: parse_project_root(cli.project_root)?,
                include: cli.include,
                exclude: cli.exclude,
                debug_dirs: parse_debug_dirs(&cli.debug_dir, std::env::var_os(DEBUG_DIR_VARIABLE))?,
            },
            service_name: parse_service_name(cli.service_name)?,
            exporters: exporters.clone(),
            flow_rate: parse_flow_rate(&cli.flow_rate)?,
            console: ConsoleOptions {
                format: cli.format,
                output: cli.output,
            },
            otlp: if exporters.contains(&ExporterKind::Otlp) {
                Some(OtlpOptions::from_env(otlp::os_env)?)
            } else {
                None
            },
            flush_timeout: parse_duration(
                "OMEGI_FLUSH_TIMEOUT (--flush-timeout)",
                &cli.flush_timeout,
            )?,
            kernel,
            return_probes: cli.return_probes,
            max_trace_spans: positive("--max-trace-spans", cli.max_trace_spans)?,
            queue_size: positive("--queue-size", cli.queue_size)?,
            drain_interval: parse_duration("--drain-interval", &cli.drain_interval)?,
            error_rules: parse_error_rules(&cli.error_if, std::env::var("OMEGI_ERROR_IF").ok())?,
            kafka: KafkaOptions::from_args(&cli.kafka, std::env::vars())?,
            stats_interval: match &cli.stats {
                Some(value) => Some(parse_duration("OMEGI_STATS (--stats)", value)?)
                    .filter(|interval| !interval.is_zero()),
                None => None,
            },
            budget,
            entry_at_first_instruction: cli.entry_at_first_instruction,
            python_eval_hook: cli.python_eval_hook,
        })
    }
}

/// `--error-if` rules (flags win: the variable is read only when no flag is
/// given).
fn parse_error_rules(
    flags: &[String],
    variable: Option<String>,
) -> Result<Vec<ReturnRule>, ConfigError> {
    let from_variable;
    let texts: Vec<&str> = if !flags.is_empty() {
        flags.iter().map(String::as_str).collect()
    } else {
        from_variable = variable.unwrap_or_default();
        from_variable
            .split(';')
            .map(str::trim)
            .filter(|rule| !rule.is_empty())
            .collect()
    };
    texts
        .into_iter()
        .map(|text| {
            ReturnRule::parse(text).map_err(|error| ConfigError {
                name: "OMEGI_ERROR_IF (--error-if)",
                value: text.into(),
                expected: error.to_string(),
            })
        })
        .collect()
}

/// The variable that names directories to look for separate debug files in.
pub const DEBUG_DIR_VARIABLE: &str = "OMEGI_DEBUG_DIR";

/// `--debug-dir` / `OMEGI_DEBUG_DIR` (flags win: the variable, directories
/// separated by `:`, is read only when no flag is given). Each must be an
/// existing directory; relative ones are taken from the current directory.
fn parse_debug_dirs(
    flags: &[PathBuf],
    variable: Option<OsString>,
) -> Result<Vec<PathBuf>, ConfigError> {
    let dirs: Vec<PathBuf> = if !flags.is_empty() {
        flags.to_vec()
    } else {
        let variable = variable.unwrap_or_default();
        std::env::split_paths(&variable)
            .filter(|dir| !dir.as_os_str().is_empty())
            .collect()
    };
    dirs.into_iter()
        .map(|dir| {
            if !dir.is_dir() {
                return Err(ConfigError {
                    name: "OMEGI_DEBUG_DIR (--debug-dir)",
                    value: dir.display().to_string(),
                    expected: "an existing directory (several separated by ':' in \
                               OMEGI_DEBUG_DIR)"
                        .into(),
                });
            }
            let absolute = if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir()
                    .map(|cwd| cwd.join(&dir))
                    .unwrap_or(dir)
            };
            Ok(crate::discovery::normalize(&absolute))
        })
        .collect()
}

fn parse_pid(value: &str) -> Result<u32, ConfigError> {
    match value.trim().parse::<u32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(ConfigError {
            name: "--pid",
            value: value.into(),
            expected: "a process id (a positive integer)".into(),
        }),
    }
}

fn parse_project_root(root: PathBuf) -> Result<PathBuf, ConfigError> {
    if root.is_absolute() {
        Ok(crate::discovery::normalize(&root))
    } else if root.as_os_str().is_empty() {
        Err(ConfigError {
            name: "OMEGI_PROJECT_ROOT (--project-root)",
            value: String::new(),
            expected: "a directory".into(),
        })
    } else {
        // A relative root means "relative to where I am", as a shell user expects.
        Ok(crate::discovery::normalize(
            &std::env::current_dir()
                .map(|dir| dir.join(&root))
                .unwrap_or(root),
        ))
    }
}

fn parse_service_name(name: String) -> Result<String, ConfigError> {
    if name.trim().is_empty() {
        return Err(ConfigError {
            name: "OMEGI_SERVICE_NAME (--service-name)",
            value: name,
            expected: "a non-empty name".into(),
        });
    }
    Ok(name)
}

/// `OMEGI_EXPORTER_KIND`: a comma list of known exporters.
pub fn parse_exporters(value: &str) -> Result<Vec<ExporterKind>, ConfigError> {
    let known = || {
        let names: Vec<_> = ExporterKind::ALL.iter().map(|(name, _)| *name).collect();
        format!("a comma-separated list of {}", names.join(", "))
    };
    let mut kinds = Vec::new();
    for part in value.split(',').map(str::trim) {
        let kind = ExporterKind::ALL
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(part))
            .map(|(_, kind)| *kind)
            .ok_or_else(|| ConfigError {
                name: "OMEGI_EXPORTER_KIND (--exporter)",
                value: value.into(),
                expected: known(),
            })?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

/// `OMEGI_PROPAGATION`: `read` or `off`.
pub fn parse_propagation(value: &str) -> Result<Propagation, ConfigError> {
    match value.trim() {
        "read" => Ok(Propagation::Read),
        "off" => Ok(Propagation::Off),
        other => Err(ConfigError {
            name: "OMEGI_PROPAGATION (--propagation)",
            value: value.into(),
            expected: if other == "inject" {
                "read or off (injecting traceparent into outgoing requests is not supported yet)"
                    .into()
            } else {
                "read (HTTP spans, incoming traceparent followed) or off".into()
            },
        }),
    }
}

/// `OMEGI_FLOW_RATE`: an integer ≥ 1.
pub fn parse_flow_rate(value: &str) -> Result<u32, ConfigError> {
    match value.trim().parse::<u32>() {
        Ok(rate) if rate >= 1 => Ok(rate),
        _ => Err(ConfigError {
            name: "OMEGI_FLOW_RATE (--flow-rate)",
            value: value.into(),
            expected: "an integer ≥ 1 (one ordinary trace in N is exported)".into(),
        }),
    }
}

pub(crate) fn parse_duration(name: &'static str, value: &str) -> Result<Duration, ConfigError> {
    if value.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(value.trim()).map_err(|_| ConfigError {
        name,
        value: value.into(),
        expected: "a duration such as 500ms, 1s or 2m (0 for none)".into(),
    })
}

fn parse_ring_size(value: &str) -> Result<u32, ConfigError> {
    let error = || ConfigError {
        name: "--ring-size",
        value: value.into(),
        expected: "a power of two of at least 4KiB and at most 1GiB, e.g. 8MiB".into(),
    };
    let trimmed = value.trim();
    let (digits, multiplier) = [("KiB", 1u64 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)]
        .iter()
        .find_map(|(suffix, multiplier)| {
            trimmed
                .strip_suffix(suffix)
                .map(|digits| (digits, *multiplier))
        })
        .unwrap_or((trimmed, 1));
    let bytes = digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(error)?;
    if bytes.is_power_of_two() && (4096..=1 << 30).contains(&bytes) {
        Ok(bytes as u32)
    } else {
        Err(error())
    }
}

fn parse_thread_slots(slots: u32) -> Result<u32, ConfigError> {
    if slots == 0 || (slots.is_power_of_two() && slots <= omegi_common::THREAD_SLOTS) {
        Ok(slots)
    } else {
        Err(ConfigError {
            name: "--thread-slots",
            value: slots.to_string(),
            expected: format!("0 or a power of two up to {}", omegi_common::THREAD_SLOTS),
        })
    }
}

fn positive(name: &'static str, value: usize) -> Result<usize, ConfigError> {
    if value == 0 {
        Err(ConfigError {
            name,
            value: "0".into(),
            expected: "a positive integer".into(),
        })
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn propagation() {
        assert_eq!(parse_propagation("read").unwrap(), Propagation::Read);
        assert_eq!(parse_propagation(" off").unwrap(), Propagation::Off);
        for bad in ["inject", "on", ""] {
            let error = parse_propagation(bad).unwrap_err().to_string();
            assert!(error.contains("OMEGI_PROPAGATION"), "{error}");
        }
    }

    #[test]
    fn flow_rate() {
        assert_eq!(parse_flow_rate("5").unwrap(), 5);
        assert_eq!(parse_flow_rate("1").unwrap(), 1);
        for bad in ["0", "-1", "abc", "1.5", ""] {
            let error = parse_flow_rate(bad).unwrap_err().to_string();
            assert!(error.contains("OMEGI_FLOW_RATE"), "{error}");
        }
    }

    #[test]
    fn exporters() {
        assert_eq!(
            parse_exporters("console").unwrap(),
            vec![ExporterKind::Console]
        );
        assert_eq!(
            parse_exporters("console, CONSOLE").unwrap(),
            vec![ExporterKind::Console]
        );
        assert_eq!(
            parse_exporters("kafka,console").unwrap(),
            vec![ExporterKind::Kafka, ExporterKind::Console]
        );
        let error = parse_exporters("carrier-pigeon").unwrap_err().to_string();
        assert!(
            error.contains("OMEGI_EXPORTER_KIND") && error.contains("console"),
            "{error}"
        );
        assert!(parse_exporters("").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration("x", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert!(parse_duration("x", "soon").is_err());
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_size("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_ring_size("65536").unwrap(), 65536);
        assert!(parse_ring_size("3MiB").is_err());
        assert!(parse_ring_size("1").is_err());
    }

    #[test]
    fn error_rules() {
        let rules = parse_error_rules(&["f:ret<0".into()], Some("g:ret==1".into())).unwrap();
        assert_eq!(rules.len(), 1);
        let rules = parse_error_rules(&[], Some("f:ret<0; g:ret64==0;".into())).unwrap();
        assert_eq!(rules.len(), 2);
        let error = parse_error_rules(&["f:ret<<0".into()], None)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("OMEGI_ERROR_IF") && error.contains("GLOB:ret"),
            "{error}"
        );
    }

    #[test]
    fn thread_slots() {
        assert_eq!(parse_thread_slots(0).unwrap(), 0);
        assert_eq!(parse_thread_slots(1).unwrap(), 1);
        assert_eq!(parse_thread_slots(1024).unwrap(), 1024);
        assert!(parse_thread_slots(3).is_err());
        assert!(parse_thread_slots(2048).is_err());
    }

    #[test]
    fn debug_dirs() {
        let here = std::env::temp_dir();
        let other = std::env::current_dir().unwrap();
        // Flags win over the variable.
        let dirs =
            parse_debug_dirs(std::slice::from_ref(&here), Some("/no/such/dir".into())).unwrap();
        assert_eq!(dirs, [crate::discovery::normalize(&here)]);
        // The variable: ':'-separated, empty parts skipped.
        let joined = format!("{}::{}:", here.display(), other.display());
        let dirs = parse_debug_dirs(&[], Some(joined.into())).unwrap();
        assert_eq!(dirs.len(), 2);
        assert!(parse_debug_dirs(&[], None).unwrap().is_empty());
        // Relative directories are taken from the current one.
        let dirs = parse_debug_dirs(&[".".into()], None).unwrap();
        assert_eq!(dirs, [crate::discovery::normalize(&other)]);
        let error = parse_debug_dirs(&[], Some("/no/such/dir".into()))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("OMEGI_DEBUG_DIR (--debug-dir)") && error.contains("/no/such/dir"),
            "{error}"
        );
    }

    #[test]
    fn pids() {
        assert_eq!(parse_pid("42").unwrap(), 42);
        assert!(parse_pid("0").is_err());
        assert!(parse_pid("x").is_err());
    }
}
