//! `omegi-agent`: the command-line edge. Errors become one line on stderr
//! and a non-zero exit; the traced command's own exit status is passed on.

use std::{fmt, process::ExitCode};

use omegi_agent::{
    agent::{self, Outcome},
    cli::Cli,
    config::Config,
};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
    EnvFilter,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse_args() {
        Ok(cli) => cli,
        Err(error) => return usage_error(error),
    };
    init_logging(cli.quiet, cli.verbose, cli.debug_ebpf);
    raise_locked_memory_limit();
    if cli.check {
        return if omegi_agent::check::run() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let config = match Config::from_cli(cli) {
        Ok(config) => config,
        Err(error) => return fail(&error.into()),
    };
    match agent::run(config) {
        Ok(Outcome::Exit(code)) => ExitCode::from(code.clamp(0, 255) as u8),
        Ok(Outcome::Signal(signal)) => end_by_signal(signal),
        Err(error) => fail(&error),
    }
}

/// Kernels before 5.11 charge BPF maps and programs to `RLIMIT_MEMLOCK`
/// (often 8 MB or less; the preallocated maps need more), as libbpf and
/// bpftrace know: lift it, as they do. Later kernels charge memory cgroups
/// and ignore it.
fn raise_locked_memory_limit() {
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    if let Err(error) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!("cannot lift RLIMIT_MEMLOCK: {error}");
    }
}

/// A command line clap cannot parse gets the same one line as any other bad
/// input (`--help` and `--version` print as usual), and exit status 2.
fn usage_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        error.exit();
    }
    eprintln!(
        "omegi-agent: error: {} (omegi-agent --help lists the options)",
        one_line(&error.render().to_string())
    );
    ExitCode::from(2)
}

/// clap's message without its `error:` prefix, usage and help hint, on one
/// line.
fn one_line(rendered: &str) -> String {
    let mut out = String::new();
    for line in rendered.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("Usage:") || line.starts_with("For more information")
        {
            continue;
        }
        if !out.is_empty() {
            out.push_str(if line.starts_with("tip:") { "; " } else { " " });
        }
        out.push_str(line.strip_prefix("error: ").unwrap_or(line));
    }
    out
}

fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("omegi-agent: error: {error:#}");
    ExitCode::FAILURE
}

/// Ends this process with the signal that ended the traced command, so that
/// whoever started omegi sees the same status. No core dump of the agent.
fn end_by_signal(signal: i32) -> ExitCode {
    use nix::sys::{
        resource::{setrlimit, Resource},
        signal::{self as sig, SigHandler, Signal},
    };
    if let Ok(signal) = Signal::try_from(signal) {
        let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
        // SAFETY: restoring the default disposition before raising.
        unsafe {
            let _ = sig::signal(signal, SigHandler::SigDfl);
        }
        let _ = sig::raise(signal);
    }
    ExitCode::from((128 + signal).clamp(0, 255) as u8)
}

/// The agent's own messages go to stderr as `omegi-agent: …` lines.
/// `OMEGI_LOG` (an env-filter directive) overrides `-q`/`-v`. With
/// `--debug-ebpf`, the eBPF programs' own messages (aya-log records, whose
/// targets are the eBPF crate's modules, `omegi::…`) are shown too.
fn init_logging(quiet: bool, verbose: u8, debug_ebpf: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let ebpf = if debug_ebpf {
        ",omegi::stack=debug,omegi::errors=debug"
    } else {
        ""
    };
    let filter = EnvFilter::try_from_env("OMEGI_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},aya=warn,aya_obj=warn{ebpf}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(Plain)
        .init();
}

struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "omegi-agent: ")?;
        match *event.metadata().level() {
            Level::ERROR => write!(writer, "error: ")?,
            Level::WARN => write!(writer, "warning: ")?,
            Level::INFO => {}
            level => write!(writer, "{}: ", level.as_str().to_lowercase())?,
        }
        context
            .field_format()
            .format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
