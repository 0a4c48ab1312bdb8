//! The command line. Values that can also come from `OMEGI_*` variables are
//! taken as strings here and checked in [`config`](crate::config), where the
//! error can name the variable.

use std::{ffi::OsString, path::PathBuf};

use clap::{ArgGroup, Parser, ValueEnum};

use crate::attach::{AttachMode, ProbeLookup, ReturnProbes};

const EXAMPLES: &str = "\
Examples:
  sudo omegi-agent --pid 4242                 trace a running process
  sudo omegi-agent -- ./server --port 8080    start a program under tracing
  sudo omegi-agent --binary /app/server       every process of a binary, now and later
  omegi-agent --list --binary ./server        what would be traced, without attaching
  sudo omegi-agent --check                    what this kernel allows omegi to do

Every OMEGI_* variable can also be given as the flag beside it; a flag wins.
The otlp exporter reads the standard OTEL_EXPORTER_OTLP_* variables (ENDPOINT,
PROTOCOL, HEADERS, TIMEOUT, COMPRESSION, CERTIFICATE; see the README).";

/// Traces the user's own functions in a running program with eBPF uprobes and
/// ships every call as a span.
#[derive(Debug, Parser)]
#[command(name = "omegi-agent", version, about, after_help = EXAMPLES)]
#[command(group(ArgGroup::new("target").required(true).args(["pid", "binary", "command"])))]
pub struct Cli {
    /// Trace the running process PID (and the children it forks).
    #[arg(short, long, value_name = "PID")]
    pub pid: Option<String>,

    /// Trace every process that runs the executable PATH, now and later.
    /// Also OMEGI_BINARY (for a DaemonSet configured by variables only),
    /// used when no target is given on the command line.
    #[arg(short, long, value_name = "PATH")]
    pub binary: Option<PathBuf>,

    /// Start CMD with ARGS under tracing; probes are in place before it runs.
    #[arg(last = true, value_name = "CMD [ARGS]")]
    pub command: Vec<OsString>,

    /// Print the functions that would be traced, and what was skipped, then
    /// exit without attaching.
    #[arg(long)]
    pub list: bool,

    /// Print what this kernel allows and what omegi will do on it (loading
    /// every eBPF program through its verifier), then exit: 0 if omegi can
    /// trace here, 1 if not.
    #[arg(long, exclusive = true)]
    pub check: bool,

    /// Functions whose source file lies under this directory are traced.
    #[arg(
        long,
        env = "OMEGI_PROJECT_ROOT",
        default_value = "/app",
        value_name = "DIR"
    )]
    pub project_root: PathBuf,

    /// Trace only functions whose demangled name matches GLOB (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,

    /// Do not trace functions whose demangled name matches GLOB (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,

    /// Look for a stripped binary's separate debug file in DIR first
    /// (repeatable): DIR/.build-id/xx/rest.debug, DIR/NAME and
    /// DIR/<binary's directory>/NAME, NAME from its .gnu_debuglink. Then
    /// next to the binary, in .debug/ there and under /usr/lib/debug.
    /// OMEGI_DEBUG_DIR takes directories separated by ':'.
    #[arg(long = "debug-dir", value_name = "DIR")]
    pub debug_dir: Vec<PathBuf>,

    /// Name of the traced service, as registered on the Omegi web page.
    #[arg(long, env = "OMEGI_SERVICE_NAME", default_value = "test-server")]
    pub service_name: String,

    /// Where spans go: a comma-separated list of console, kafka.
    #[arg(
        long = "exporter",
        env = "OMEGI_EXPORTER_KIND",
        default_value = "console",
        value_name = "KINDS"
    )]
    pub exporter: String,

    /// One ordinary trace in N is exported (errors always are); an integer ≥ 1.
    #[arg(long, env = "OMEGI_FLOW_RATE", default_value = "5", value_name = "N")]
    pub flow_rate: String,

    /// Mark a call as an error when its return value says so, e.g.
    /// 'parse_*:ret<0' (repeatable; OMEGI_ERROR_IF takes rules separated by
    /// ';'). Grammar: GLOB:ret OP INTEGER (C int) or GLOB:ret64 OP INTEGER,
    /// OP one of < <= > >= == !=; or GLOB:err, a Rust function returning a
    /// Result that returned Err (e.g. 'myapp::*:err').
    #[arg(long = "error-if", value_name = "RULE")]
    pub error_if: Vec<String>,

    /// Console output: a call tree per trace, or one JSON object per span.
    #[arg(long, value_enum, default_value = "tree")]
    pub format: ConsoleFormat,

    /// Write console output to PATH instead of stdout.
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// A call made by a function that has been running longer than this
    /// starts a trace of its own (so each request under a long-lived loop is
    /// one trace); 0 turns it off.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub split_after: String,

    /// A trace with more ended spans than this is exported in pieces.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub max_trace_spans: usize,

    /// How calls' returns are seen: auto uses uretprobes only where the binary
    /// cannot unwind.
    #[arg(long, value_enum, default_value = "auto")]
    pub return_probes: ReturnProbes,

    /// Traces waiting for each exporter; when full, traces are dropped and
    /// counted.
    #[arg(long, default_value_t = 16384, value_name = "N")]
    pub queue_size: usize,

    /// Size of the kernel-to-agent ring buffer (power of two).
    #[arg(long, default_value = "8MiB", value_name = "SIZE")]
    pub ring_size: String,

    /// How often the ring buffer is drained.
    #[arg(long, default_value = "10ms", value_name = "DURATION", hide = true)]
    pub drain_interval: String,

    /// Longest the exporters may take, when tracing ends, to deliver what
    /// they hold; spans still undelivered then are counted as failed.
    #[arg(
        long,
        env = "OMEGI_FLUSH_TIMEOUT",
        default_value = "5s",
        value_name = "DURATION"
    )]
    pub flush_timeout: String,

    /// Print a one-line stats report on stderr every INTERVAL (10s when
    /// given alone).
    #[arg(
        long,
        env = "OMEGI_STATS",
        value_name = "INTERVAL",
        num_args = 0..=1,
        default_missing_value = "10s",
        require_equals = true
    )]
    pub stats: Option<String>,

    #[command(flatten)]
    pub kafka: crate::export::kafka::options::KafkaArgs,

    /// Leave out calls shorter than DURATION (e.g. 10us), decided in the
    /// kernel. Calls on an error path (unwound, ended by the thread's exit,
    /// failing an --error-if rule) and every caller of a kept call are always
    /// kept; the calls left out are counted in the summary. 0 keeps all.
    #[arg(long, default_value = "0", value_name = "DURATION")]
    pub min_duration: String,

    /// Bound the traced program's slowdown: when the probes' estimated CPU
    /// time (calls counted in the kernel × each probe kind's cost) is more
    /// than PERCENT of the CPU time the traced processes spend on their own
    /// work, detach, while tracing, the functions whose probes cost the most
    /// for the least (many short calls) until it fits; checked every second.
    /// Each one is named in a warning and in the summary. CALLS,DURATION is
    /// the old per-function rule (detach a function with more than CALLS
    /// calls a second shorter than DURATION); 'off' never detaches.
    #[arg(
        long,
        env = "OMEGI_OVERHEAD_BUDGET",
        default_value = crate::budget::DEFAULT,
        value_name = "PERCENT|CALLS,DURATION|off"
    )]
    pub overhead_budget: String,

    /// How function probes are linked to the kernel: uprobe_multi links
    /// (Linux 6.6+; thousands of probes in one call), one link per probe,
    /// or auto (multi where the kernel has it).
    #[arg(long, value_enum, default_value = "auto")]
    pub attach_mode: AttachMode,

    /// How a probe finds its function: by its attach cookie (Linux 5.15+),
    /// by its address (what older kernels need; to test that path on a new
    /// one), or auto.
    #[arg(long, value_enum, default_value = "auto", hide = true)]
    pub probe_lookup: ProbeLookup,

    /// Thread stacks kept in array slots (found without hashing; a power of
    /// two up to 1024); the others live in a hash map. For tests.
    #[arg(long, default_value_t = omegi_common::THREAD_SLOTS, value_name = "N", hide = true)]
    pub thread_slots: u32,

    /// Python 3.11+ runs a call of Python code from Python without entering
    /// its eval function, so only calls made from C are seen. This makes
    /// every call visible by setting the interpreter's eval-frame function
    /// (PEP 523) to its own default: one pointer written into the traced
    /// interpreter, set back at detach. Python code then runs without call
    /// inlining (slower calls). Clashes with debuggers that use PEP 523.
    #[arg(
        long,
        env = "OMEGI_PYTHON_EVAL_HOOK",
        value_parser = clap::builder::BoolishValueParser::new(),
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub python_eval_hook: bool,

    /// Send each traced Python call's arguments, as the seed library did
    /// (`name: type = value`): the value of an int, float, bool, None or
    /// str (its first 32 characters), the type's name for anything else;
    /// the first six parameters. Off by default: values can be personal
    /// data.
    #[arg(
        long,
        env = "OMEGI_CAPTURE_ARGS",
        value_parser = clap::builder::BoolishValueParser::new(),
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub capture_args: bool,

    /// Put each entry probe on the function's first instruction even when it
    /// is an endbr64 (single-stepped) followed by a cheaper one (for
    /// measuring what probe placement buys).
    #[arg(long, hide = true)]
    pub entry_at_first_instruction: bool,

    /// HTTP/1.x on the traced processes' TCP sockets: `read` makes every
    /// request served a SERVER span (the service's entry span, continuing the
    /// caller's trace when it sends a W3C traceparent) and every request made
    /// from a traced call a CLIENT span; `off` traces functions only.
    /// (Injecting traceparent into outgoing requests is not there yet.)
    #[arg(
        long,
        env = "OMEGI_PROPAGATION",
        default_value = "read",
        value_name = "read|off"
    )]
    pub propagation: String,

    /// Show the eBPF programs' own diagnostics.
    #[arg(long)]
    pub debug_ebpf: bool,

    /// Only warnings and errors on stderr (drops are always reported).
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,

    /// More detail on stderr (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The variable that names a binary to trace when the command line names
/// no target.
pub const BINARY_VARIABLE: &str = "OMEGI_BINARY";

/// `OMEGI_BINARY`, when set and not empty.
pub fn binary_from_env() -> Option<PathBuf> {
    std::env::var_os(BINARY_VARIABLE)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

impl Cli {
    /// Parses the command line; a target (`--pid`, `--binary`, `-- CMD`) is
    /// required unless `OMEGI_BINARY` names one. A target on the command
    /// line wins over `OMEGI_BINARY`.
    pub fn try_parse_args() -> Result<Self, clap::Error> {
        use clap::{CommandFactory, FromArgMatches};
        // `--check` needs no target.
        let checking = std::env::args_os().skip(1).any(|arg| arg == "--check");
        let required = binary_from_env().is_none() && !checking;
        let mut matches = Self::command()
            .mut_group("target", |group| group.required(required))
            .try_get_matches()?;
        let mut cli = Self::from_arg_matches_mut(&mut matches)?;
        if cli.pid.is_none() && cli.binary.is_none() && cli.command.is_empty() {
            cli.binary = binary_from_env();
        }
        Ok(cli)
    }
}

/// Format of the console exporter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConsoleFormat {
    /// A readable call tree per trace, with durations.
    Tree,
    /// One JSON object per span, one per line (OpenTelemetry field names).
    Json,
}
