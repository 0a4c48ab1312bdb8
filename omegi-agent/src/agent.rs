//! The agent's life: discover, attach, run the target, and on the way out
//! detach, flush and report. The stages live in their own modules; this one
//! only wires them together and owns shutdown.

use std::{
    fmt::Write as _,
    io::Write as _,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    assembly::{Assembler, Clock},
    attach::{python_hook::EvalHook, FunctionCounters, Probes, ReturnMechanism},
    budget::{Budget, BudgetWatch, CpuSample, HotFunction, ProbeCosts, Verdict},
    config::{Config, Target},
    discovery::{python, FunctionTable, ProbeCost},
    events::{self, KernelCounters, Reader, ReaderStats},
    export::{ExportContext, Exporters},
    process::{self, ExitKind, GatedChild, ProcessError},
};

/// How the agent should end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit with this code.
    Exit(i32),
    /// End the way the traced command ended: killed by this signal.
    Signal(i32),
}

/// Runs the agent to the end. Must be called before any other thread starts
/// (a command is forked from here).
pub fn run(config: Config) -> anyhow::Result<Outcome> {
    // With --pid, probes go on the executable through a descriptor of our
    // own: `/proc/PID/exe` stops resolving the moment the process exits,
    // which may happen while probes are being attached (then the exit is
    // reported once, not as a failure per probe).
    let mut _exe_held_open = None;
    let (binary, attach_path) = match &config.target {
        Target::Pid(pid) => {
            let exe = process::executable_of(*pid)?;
            let file = std::fs::File::open(&exe).map_err(|error| ProcessError::NoExecutable {
                pid: *pid,
                reason: error.to_string(),
            })?;
            let held = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            _exe_held_open = Some(file);
            // Named by the path the process ran (its link), read through
            // our descriptor.
            let shown = std::fs::read_link(&exe).unwrap_or(exe);
            (shown, held)
        }
        Target::Binary(path) => {
            if !path.exists() {
                return Err(ProcessError::NoSuchFile(path.clone()).into());
            }
            (path.clone(), path.clone())
        }
        Target::Command(argv) => {
            let path = process::resolve_command(&argv[0])?;
            (path.clone(), path)
        }
    };

    // A Python interpreter is traced through its eval function, which may
    // live in a library: the probes go there.
    let running_pid = match config.target {
        Target::Pid(pid) => Some(pid),
        _ => None,
    };
    let exe_data =
        std::fs::read(&attach_path).map_err(|source| crate::discovery::DiscoveryError::Io {
            path: binary.clone(),
            source,
        })?;
    let interpreter = python::interpreter_file(&attach_path, &binary, &exe_data, running_pid)?;
    let (mut table, attach_path) = match interpreter {
        Some(interpreter) => {
            let data = std::fs::read(&interpreter.read_path).map_err(|source| {
                crate::discovery::DiscoveryError::Io {
                    path: interpreter.path.clone(),
                    source,
                }
            })?;
            let table = FunctionTable::python(&binary, &interpreter, &data, &config.selection)?;
            (table, interpreter.read_path)
        }
        None => (
            FunctionTable::from_bytes(&binary, &exe_data, &config.selection)?,
            attach_path,
        ),
    };
    drop(exe_data);
    if config.entry_at_first_instruction {
        table.probe_entries_at_first_instruction();
    }
    if table.from_symbol_table {
        tracing::warn!(
            "{} has no DWARF debug info{}: tracing functions from the symbol table, without \
             file:line and without applying the project root (runtime and libc symbols are left \
             out); build with -g for both, or point --debug-dir at its separate debug info",
            binary.display(),
            if table.has_dwarf {
                " for your code (only for its runtime)"
            } else {
                ""
            },
        );
    }
    if config.list_only {
        let mechanism = ReturnMechanism::choose(config.return_probes, &table)?;
        let listing = describe_table(&table, mechanism);
        let mut stdout = std::io::stdout().lock();
        match stdout
            .write_all(listing.as_bytes())
            .and_then(|()| stdout.flush())
        {
            // `omegi-agent --list … | head`: the reader has seen enough.
            Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(anyhow::Error::new(error).context("writing the list to stdout"));
            }
            _ => return Ok(Outcome::Exit(0)),
        }
    }
    if table.functions.is_empty() {
        bail!(
            "no function of {} to trace: none has its source under the project root {} \
             ({} function symbols skipped: {}); set OMEGI_PROJECT_ROOT or --project-root to \
             the directory of your sources",
            binary.display(),
            config.selection.project_root.display(),
            table.skipped_total(),
            skip_summary(&table),
        );
    }
    let mechanism = ReturnMechanism::choose(config.return_probes, &table)?;
    // Before the program starts: an `err` rule that applies to nothing
    // stops here.
    let applied = crate::assembly::rules::for_functions(&table, &config.error_rules)?;
    for line in &applied.warnings {
        tracing::warn!("{line}");
    }
    let rules = applied.rules;

    let child = match &config.target {
        Target::Command(argv) => Some(GatedChild::spawn(&binary, argv)?),
        _ => None,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(trace(config, table, rules, attach_path, mechanism, child));
    // A waiting `waitpid` may still sit in the blocking pool.
    runtime.shutdown_background();
    outcome
}

/// Why tracing stopped.
enum Ending {
    /// The started command ended.
    ChildEnded(ExitKind),
    /// The traced process (or every process) is gone.
    TargetExited,
    /// Ctrl-C or SIGTERM.
    Interrupted,
}

async fn trace(
    config: Config,
    table: FunctionTable,
    rules: std::collections::HashMap<u32, crate::assembly::FunctionRule>,
    attach_path: PathBuf,
    mechanism: ReturnMechanism,
    child: Option<GatedChild>,
) -> anyhow::Result<Outcome> {
    let (mut probes, maps, counters) = Probes::load(&config.kernel, &table)?;
    // The kernel side needs the rules too: --min-duration keeps failing calls.
    for (id, rule) in &rules {
        let (op, bits, value) = rule.kernel_form();
        counters.set_rule(*id, op, bits, value);
    }
    if let Some(python) = &table.python {
        // A NULL result is how a Python call ends by an exception: such
        // calls are kept by --min-duration like any failing call.
        for function in table.functions.iter().filter(|f| f.runs_python) {
            counters.set_rule(function.id, omegi_common::rule_op::EQUAL, 64, 0);
        }
        tracing::info!(
            "{} is Python {} ({}): tracing the Python functions whose files lie under {}",
            table.binary.display(),
            python.version(),
            python.library.display(),
            python.project_root.display(),
        );
        if python_files(&python.project_root).is_empty() {
            tracing::warn!(
                "there is no .py file under the project root {}: nothing will be traced unless \
                 the program's files are there (OMEGI_PROJECT_ROOT, --project-root)",
                python.project_root.display()
            );
        }
        if python.inlines_calls() && !config.python_eval_hook {
            tracing::warn!(
                "Python {} runs a Python function called from Python inside its caller's eval \
                 loop: only calls made from C are traced (a thread's first, callbacks, a \
                 framework's call of a handler); --python-eval-hook makes every call visible \
                 (one pointer written into the interpreter, set back at detach)",
                python.version()
            );
        }
    }
    let report = match probes.attach_functions(&table, &attach_path, mechanism) {
        Ok(report) => report,
        Err(error) => {
            // Its files (through /proc/PID/root) went with it: the error
            // the kernel gives then says less than this.
            if let Target::Pid(pid) = &config.target {
                if !process::is_alive(*pid) {
                    return Err(ProcessError::ExitedDuringAttach(*pid).into());
                }
            }
            return Err(error.into());
        }
    };
    let running_pid = match config.target {
        Target::Pid(pid) => Some(pid),
        _ => None,
    };
    let error_hooks = probes.attach_error_hooks(&table, &attach_path, running_pid);
    tracing::debug!("{error_hooks} probes on the language runtime's error path");
    tracing::info!(
        "tracing {} functions of {} ({} entry and {} exit probes; returns by {}; attached in {:.1} ms{})",
        report.functions,
        table.binary.display(),
        report.entry_probes,
        report.exit_probes,
        mechanism.as_str(),
        report.took.as_secs_f64() * 1e3,
        if report.multi {
            " with uprobe_multi links"
        } else {
            ", one link per probe"
        },
    );

    let table = Arc::new(table);
    let context = Arc::new(ExportContext {
        functions: Arc::clone(&table),
        service_name: config.service_name.clone(),
        project_root: config.selection.project_root.clone(),
    });
    let exporters = Exporters::start(&config, context)?;
    let reader_stats = Arc::new(ReaderStats::default());
    let error_functions = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let assembler = Assembler::new(
        Clock::now(),
        config.max_trace_spans,
        config.flow_rate,
        rules,
    )
    .with_http_stats(Arc::clone(&reader_stats.http))
    .with_go_panics(&table)
    .with_python(&table);
    let reader = Reader::start(
        maps,
        assembler,
        exporters.dispatcher.clone(),
        Arc::clone(&reader_stats),
        config.drain_interval,
        Arc::clone(&error_functions),
    )?;

    let stats_task = config.stats_interval.map(|interval| {
        let reader_stats = Arc::clone(&reader_stats);
        let exporter_stats = exporters.stats.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                // On stderr whatever the log level: the user asked for it.
                eprintln!(
                    "omegi-agent: {}",
                    stats_line(&reader_stats, &exporter_stats, 0)
                );
            }
        })
    });
    let probes = Arc::new(Mutex::new(probes));
    let detached = Arc::new(Mutex::new(Vec::new()));
    let budget_task = config.budget.map(|budget| {
        let costs = probe_costs().for_functions(&table.functions, mechanism);
        tokio::spawn(watch_budget(
            BudgetWatch::new(budget, costs),
            BudgetContext {
                probes: Arc::clone(&probes),
                counters,
                table: Arc::clone(&table),
                detached: Arc::clone(&detached),
                error_functions: Arc::clone(&error_functions),
                all_processes_of: matches!(config.target, Target::Binary(_))
                    .then(|| attach_path.clone()),
            },
        ))
    });

    let hooks = PythonHooks::new(&config, &table, &attach_path);
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let ending = match (&config.target, child) {
        (Target::Command(_), Some(child)) => {
            lock(&probes).trace_process(child.pid())?;
            let pid = child.release()?;
            hooks.install_when_ready(pid);
            let mut waiting = tokio::task::spawn_blocking(move || process::wait_child(pid));
            let mut signals_seen = 0;
            loop {
                tokio::select! {
                    ended = &mut waiting => break Ending::ChildEnded(ended?),
                    _ = interrupt.recv() => {
                        // The terminal sent SIGINT to the program too.
                        signals_seen += 1;
                    }
                    _ = terminate.recv() => {
                        signals_seen += 1;
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGTERM,
                        );
                    }
                }
                if signals_seen > 1 {
                    tracing::warn!("stopping: the program {pid} keeps running untraced");
                    break Ending::Interrupted;
                }
                tracing::info!(
                    "waiting for the program to exit (signal again to stop tracing now)"
                );
            }
        }
        (Target::Pid(pid), _) => {
            let pid = *pid;
            lock(&probes).trace_process(pid)?;
            if !process::is_alive(pid) {
                return Err(ProcessError::ExitedDuringAttach(pid).into());
            }
            tracing::debug!("process {pid} is traced");
            hooks.install(pid);
            tokio::select! {
                exited = process::wait_exit(pid) => { exited?; Ending::TargetExited }
                _ = interrupt.recv() => Ending::Interrupted,
                _ = terminate.recv() => Ending::Interrupted,
            }
        }
        _ => {
            lock(&probes).trace_all_processes()?;
            tokio::select! {
                _ = interrupt.recv() => Ending::Interrupted,
                _ = terminate.recv() => Ending::Interrupted,
            }
        }
    };

    // Shutdown: stop recording at once (removing probes one by one would
    // leave calls half seen), detach, drain, then what is still running,
    // then let the exporters write out everything they hold.
    if let Some(task) = budget_task {
        task.abort();
        let _ = task.await;
    }
    hooks.remove_all();
    let detaching = Instant::now();
    let links = {
        let mut probes = lock(&probes);
        probes.stop_tracing();
        probes.detach()
    };
    tracing::info!(
        "probes removed in {:.2} s ({links} links)",
        detaching.elapsed().as_secs_f64()
    );
    let (maps, mut assembler) = reader.stop();
    if assembler.python_functions_seen() == Some(0) {
        tracing::warn!(
            "no Python function under the project root {} ran while traced: is \
             OMEGI_PROJECT_ROOT (--project-root) the directory of the program's .py files?",
            config.selection.project_root.display()
        );
    }
    let mut in_flight = events::calls_in_flight(&maps);
    {
        // A detached function's call still on a stack lost its exit probe:
        // it is left out, never reported half seen.
        let detached = lock(&detached);
        in_flight.retain(|(_, _, frame)| detached.iter().all(|d: &Dropped| d.id != frame.fn_id));
    }
    for trace in assembler.finish_all(&in_flight, events::now_ns()) {
        events::hand_on(trace, &exporters.dispatcher, &reader_stats);
    }
    let counters = KernelCounters::read(&maps.counters);
    let exporter_stats = exporters.stats.clone();
    exporters.finish().await;
    if let Some(task) = stats_task {
        task.abort();
        // The last line, with everything settled.
        eprintln!(
            "omegi-agent: {}",
            stats_line(&reader_stats, &exporter_stats, in_flight.len())
        );
    }

    report_summary(&reader_stats, &counters, &exporter_stats, in_flight.len());
    let detached = lock(&detached);
    if !detached.is_empty() {
        // Every one, for the record (the warnings while tracing name only
        // the costliest of each round).
        tracing::warn!(
            "{} function{} detached by the overhead budget (--overhead-budget): {}",
            detached.len(),
            if detached.len() == 1 { "" } else { "s" },
            detached
                .iter()
                .map(|function| format!(
                    "{} ({:.0} calls/s, {})",
                    function.name,
                    function.hot.calls_per_second,
                    cpu_per_second(function.hot.probe_ns_per_second)
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(match ending {
        Ending::ChildEnded(ExitKind::Code(code)) => Outcome::Exit(code),
        Ending::ChildEnded(ExitKind::Signal(signal)) => Outcome::Signal(signal),
        Ending::TargetExited | Ending::Interrupted => Outcome::Exit(0),
    })
}

/// The eval hooks set in traced Python processes (`--python-eval-hook`).
struct PythonHooks {
    /// What installing needs: the interpreter and its file's bytes; `None`
    /// when there is nothing to hook.
    interpreter: Option<Arc<(crate::discovery::python::PythonTarget, PathBuf, Vec<u8>)>>,
    set: Arc<Mutex<Vec<EvalHook>>>,
}

impl PythonHooks {
    fn new(config: &Config, table: &FunctionTable, library: &std::path::Path) -> Self {
        if config.python_eval_hook && table.python.is_none() {
            tracing::warn!(
                "--python-eval-hook is for Python interpreters; {} is not one",
                table.binary.display()
            );
        }
        let interpreter = table
            .python
            .as_ref()
            .filter(|python| config.python_eval_hook && python.inlines_calls())
            .filter(|_| {
                if matches!(config.target, Target::Binary(_)) {
                    tracing::warn!(
                        "--python-eval-hook is for --pid and a command: with --binary, the \
                         processes are not known in advance (only calls made from C are traced)"
                    );
                    return false;
                }
                true
            })
            .and_then(|python| {
                let data = std::fs::read(library).ok()?;
                Some(Arc::new((python.clone(), library.to_owned(), data)))
            });
        Self {
            interpreter,
            set: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// In a running interpreter.
    fn install(&self, pid: u32) {
        let Some(interpreter) = &self.interpreter else {
            return;
        };
        let (python, library, data) = &**interpreter;
        match EvalHook::install(pid, python, library, data) {
            Ok(hook) => {
                tracing::info!("eval hook set in process {pid}: every Python call is traced");
                lock(&self.set).push(hook);
            }
            Err(error) => {
                tracing::warn!("no eval hook (only calls made from C are traced): {error}")
            }
        }
    }

    /// In a process just started, once its interpreter is set up.
    fn install_when_ready(&self, pid: u32) {
        let Some(interpreter) = self.interpreter.clone() else {
            return;
        };
        let set = Arc::clone(&self.set);
        std::thread::spawn(move || {
            let (python, library, data) = &*interpreter;
            match EvalHook::install_when_ready(pid, python, library, data, Duration::from_secs(30))
            {
                Ok(hook) => {
                    tracing::debug!("eval hook set in process {pid}");
                    lock(&set).push(hook);
                }
                // A short program may end before its interpreter is set up.
                Err(crate::attach::python_hook::HookError::Gone(_)) => {}
                Err(error) => {
                    tracing::warn!("no eval hook (only calls made from C are traced): {error}")
                }
            }
        });
    }

    /// Sets every hook back, in the processes forked since too.
    fn remove_all(&self) {
        let Some(interpreter) = &self.interpreter else {
            return;
        };
        let (_, library, data) = &**interpreter;
        for hook in lock(&self.set).drain(..) {
            match hook.remove(library, data) {
                Ok(0) => {}
                Ok(forks) => tracing::info!("eval hook set back in {forks} forked processes too"),
                Err(error) => tracing::warn!("could not set the eval hook back: {error}"),
            }
        }
    }
}

/// The `.py` files under `root` (at most 1,000, hidden directories and
/// virtual environments' `site-packages` left out), sorted.
fn python_files(root: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut directories = vec![root.to_owned()];
    while let Some(directory) = directories.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name == "site-packages" || name == "__pycache__" {
                continue;
            }
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => directories.push(path),
                Ok(_) if name.ends_with(".py") => files.push(path),
                _ => {}
            }
            if files.len() >= 1000 {
                break;
            }
        }
    }
    files.sort();
    files
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a probe hit costs here, measured (see [`crate::probe_cost`]), or
/// the KVM guest's figures when that fails.
fn probe_costs() -> ProbeCosts {
    let measured = crate::attach::system::ensure_tracefs()
        .map_err(|error| error.to_string())
        .and_then(|tracefs| {
            crate::probe_cost::measure(&tracefs).map_err(|error| error.to_string())
        });
    match measured {
        Ok(costs) => {
            tracing::info!(
                "probe costs measured here for the overhead budget: {:.2} µs emulated, \
                 {:.2} µs single-stepped, {:.2} µs a uretprobe's return",
                costs.emulated_ns / 1e3,
                costs.single_stepped_ns / 1e3,
                costs.uretprobe_return_ns / 1e3,
            );
            costs
        }
        Err(error) => {
            let costs = ProbeCosts::KVM_GUEST;
            tracing::info!(
                "could not measure what a probe costs here ({error}): the overhead budget \
                 assumes a KVM guest's ({:.1} µs emulated, {:.1} µs single-stepped, {:.1} µs a \
                 uretprobe's return)",
                costs.emulated_ns / 1e3,
                costs.single_stepped_ns / 1e3,
                costs.uretprobe_return_ns / 1e3,
            );
            costs
        }
    }
}

/// A function the overhead budget detached.
struct Dropped {
    id: u32,
    name: String,
    hot: HotFunction,
}

/// What the budget's task works with.
struct BudgetContext {
    probes: Arc<Mutex<Probes>>,
    counters: FunctionCounters,
    table: Arc<FunctionTable>,
    detached: Arc<Mutex<Vec<Dropped>>>,
    /// Functions on error paths still being recorded (never detached).
    error_functions: Arc<Mutex<std::collections::HashSet<u32>>>,
    /// `--binary`: every process running this file is traced.
    all_processes_of: Option<PathBuf>,
}

impl BudgetContext {
    fn name(&self, id: u32) -> String {
        self.table
            .get(id)
            .map_or_else(|| format!("#{id}"), |function| function.name.clone())
    }

    fn cpu(&self) -> CpuSample {
        let ids = lock(&self.probes).traced_ids();
        CpuSample::read(&ids, self.all_processes_of.as_deref())
    }
}

/// "12.3 ms of CPU a second", for a probe cost.
fn cpu_per_second(ns_per_second: f64) -> String {
    format!("≈{:.1} ms of CPU a second in probes", ns_per_second / 1e6)
}

/// How often the overhead budget decides: every [`BUDGET_EARLY_PERIOD`] in
/// the first [`BUDGET_EARLY`] after attaching (a program that is over in
/// less than a second, or whose start is its hot part, would otherwise run
/// a whole second with every probe), then once a second.
const BUDGET_EARLY: Duration = Duration::from_secs(2);
const BUDGET_EARLY_PERIOD: Duration = Duration::from_millis(250);
const BUDGET_PERIOD: Duration = Duration::from_secs(1);

/// Detaches the functions over the overhead budget, four times a second at
/// first, then once a second. A function is taken as detached only once its
/// probes are gone; one whose detach failed stays traced and is tried again,
/// then given up on with one warning.
async fn watch_budget(mut watch: BudgetWatch, context: BudgetContext) {
    let started = Instant::now();
    let mut last = started;
    // The first look only takes the counts the next ones are compared with.
    let mut next = started;
    loop {
        tokio::time::sleep_until(next.into()).await;
        let now = Instant::now();
        // From now, not from when it was due: a slow detach delays the next
        // look rather than bunching looks together.
        next = now
            + if now.duration_since(started) < BUDGET_EARLY {
                BUDGET_EARLY_PERIOD
            } else {
                BUDGET_PERIOD
            };
        let cpu = context.cpu();
        let pinned = lock(&context.error_functions).clone();
        let (hot, verdict) = watch.check(context.counters.read(), cpu, now - last, &|id| {
            pinned.contains(&id)
        });
        last = now;
        if hot.is_empty() {
            continue;
        }
        let ids: Vec<u32> = hot.iter().map(|function| function.id).collect();
        // Marked first: a call in flight when its probes go is left out
        // rather than closed later as unwound.
        for &id in &ids {
            context.counters.set_detached(id, true);
        }
        let result = tokio::task::block_in_place(|| lock(&context.probes).detach_functions(&ids));
        let (still, gone): (Vec<&HotFunction>, Vec<&HotFunction>) = {
            let probes = lock(&context.probes);
            hot.iter()
                .partition(|function| probes.is_attached(function.id))
        };
        let still_ids: Vec<u32> = still.iter().map(|function| function.id).collect();
        for &id in &still_ids {
            context.counters.set_detached(id, false);
        }
        if let Err(error) = &result {
            let given_up = watch.failed(&still_ids);
            if !given_up.is_empty() {
                let names: Vec<String> = given_up.iter().map(|&id| context.name(id)).collect();
                tracing::warn!(
                    "could not detach {} over the overhead budget ({error}), tried {} times: \
                     {} stay{} traced",
                    names.join(", "),
                    crate::budget::DETACH_ATTEMPTS,
                    if names.len() == 1 { "it" } else { "they" },
                    if names.len() == 1 { "s" } else { "" },
                );
            } else if !still_ids.is_empty() {
                tracing::info!(
                    "could not detach {} function{} over the overhead budget ({error}); \
                     trying again",
                    still_ids.len(),
                    if still_ids.len() == 1 { "" } else { "s" },
                );
            } else {
                tracing::warn!("detaching functions over the overhead budget: {error}");
            }
        }
        let gone_ids: Vec<u32> = gone.iter().map(|function| function.id).collect();
        watch.detached(&gone_ids);
        if let (Some(verdict), false) = (verdict, gone.is_empty()) {
            report_verdict(verdict, watch.budget(), gone.len());
        }
        let mut gone = gone;
        gone.sort_by(|a, b| b.probe_ns_per_second.total_cmp(&a.probe_ns_per_second));
        for (index, function) in gone.iter().enumerate() {
            let name = context.name(function.id);
            if index < NAMED_DETACHED {
                report_detached(&name, function, watch.budget());
            }
            lock(&context.detached).push(Dropped {
                id: function.id,
                name,
                hot: **function,
            });
        }
        if gone.len() > NAMED_DETACHED {
            tracing::warn!(
                "detached {} more function{} over the overhead budget (all are named at the end)",
                gone.len() - NAMED_DETACHED,
                if gone.len() - NAMED_DETACHED == 1 {
                    ""
                } else {
                    "s"
                },
            );
        }
    }
}

/// How many detached functions a message names one by one, the costliest
/// first; the others are counted (a library of thousands of functions can
/// lose hundreds at once, which would be a page of warnings).
const NAMED_DETACHED: usize = 8;

fn report_verdict(verdict: Verdict, budget: Budget, count: usize) {
    let share = if verdict.probe_ns_per_second < verdict.cpu_ns_per_second {
        format!("{:.1}% of their own work", verdict.slowdown * 100.0)
    } else {
        // The costs assumed are a KVM guest's; this machine's are lower, or
        // its CPU time leaves out the VM exits of single-stepping.
        "more than all of it".to_owned()
    };
    tracing::warn!(
        "the probes took an estimated {:.1} ms of CPU a second from the traced processes, \
         which used {:.1} ms a second in all: {share}, over the overhead budget of {budget}: \
         detaching {count} function{} (≈{:.1}% after; --overhead-budget off keeps every \
         function)",
        verdict.probe_ns_per_second / 1e6,
        verdict.cpu_ns_per_second / 1e6,
        if count == 1 { "" } else { "s" },
        verdict.slowdown_after * 100.0,
    );
}

fn report_detached(name: &str, function: &HotFunction, budget: Budget) {
    match budget {
        Budget::Slowdown(_) => tracing::warn!(
            "detached {name}: {:.0} calls/s of {:.2} µs, {}",
            function.calls_per_second,
            function.mean_ns / 1e3,
            cpu_per_second(function.probe_ns_per_second),
        ),
        Budget::PerFunction { mean_duration, .. } => tracing::warn!(
            "detached {name}: {:.0} calls/s, {:.0}% of them shorter than {} (mean {:.2} µs), \
             is over the overhead budget of {budget}: its probes cost the program more than its \
             work (--overhead-budget off keeps it)",
            function.calls_per_second,
            function.short_share * 100.0,
            humantime::format_duration(mean_duration),
            function.mean_ns / 1e3,
        ),
    }
}

fn report_summary(
    reader: &ReaderStats,
    kernel: &KernelCounters,
    exporters: &[Arc<crate::export::ExporterStats>],
    in_flight: usize,
) {
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let mut line = format!(
        "{} traces, {} spans",
        load(&reader.traces),
        load(&reader.spans) + in_flight as u64,
    );
    if load(&reader.pieces) > 0 {
        let _ = write!(line, ", {} partial pieces", load(&reader.pieces));
    }
    if in_flight > 0 {
        let _ = write!(line, ", {in_flight} calls still running at detach");
    }
    let mut lost = Vec::new();
    if kernel.ring_full > 0 {
        lost.push(format!(
            "{} spans lost in a full ring buffer",
            kernel.ring_full
        ));
    }
    if kernel.records_ring_full > 0 {
        lost.push(format!(
            "{} error, thread-exit or HTTP records lost in a full ring buffer",
            kernel.records_ring_full
        ));
    }
    if kernel.connections_full > 0 {
        lost.push(format!(
            "{} HTTP connections not followed: connection table full",
            kernel.connections_full
        ));
    }
    let http = &reader.http;
    if load(&http.malformed_traceparents) > 0 {
        let _ = write!(
            line,
            ", {} malformed traceparent headers ignored",
            load(&http.malformed_traceparents)
        );
    }
    if load(&http.unparsable_requests) > 0 {
        lost.push(format!(
            "{} HTTP requests whose head could not be parsed (spans named HTTP)",
            load(&http.unparsable_requests)
        ));
    }
    if load(&http.forgotten) > 0 {
        lost.push(format!(
            "{} HTTP messages forgotten: too many open at once",
            load(&http.forgotten)
        ));
    }
    if kernel.depth_overflow > 0 {
        lost.push(format!(
            "{} calls not traced beyond depth {}",
            kernel.depth_overflow,
            omegi_common::MAX_DEPTH
        ));
    }
    if kernel.threads_full > 0 {
        lost.push(format!(
            "{} calls not traced: thread table full",
            kernel.threads_full
        ));
    }
    if kernel.detached_in_flight > 0 {
        let _ = write!(
            line,
            ", {} calls of detached functions in flight at their detach left out (never half \
             recorded)",
            kernel.detached_in_flight
        );
    }
    if kernel.filtered > 0 {
        let _ = write!(
            line,
            ", {} calls shorter than --min-duration left out (by choice, not lost)",
            kernel.filtered
        );
    }
    if load(&reader.malformed) > 0 {
        lost.push(format!("{} unreadable events", load(&reader.malformed)));
    }
    for stats in exporters {
        let _ = write!(line, "; {}", exporter_counts(stats));
        let queue_full = load(&stats.queue_full_spans);
        let failed = load(&stats.failed_spans);
        if queue_full > 0 {
            lost.push(format!(
                "{queue_full} spans dropped, {} queue full",
                stats.name
            ));
        }
        if failed > 0 {
            lost.push(format!("{failed} spans failed to export to {}", stats.name));
        }
    }
    if lost.is_empty() {
        tracing::info!("{line}; nothing dropped");
    } else {
        tracing::info!("{line}");
        tracing::warn!("dropped: {}", lost.join("; "));
    }
}

/// One exporter's counts: `kafka: 120 spans exported (8 retried), 30
/// skipped (not sampled)`.
fn exporter_counts(stats: &crate::export::ExporterStats) -> String {
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let mut text = format!("{}: {} spans exported", stats.name, load(&stats.spans));
    let retried = load(&stats.retried_spans);
    if retried > 0 {
        let _ = write!(text, " ({retried} retried)");
    }
    let skipped = load(&stats.sampled_out_spans);
    if skipped > 0 {
        let _ = write!(text, ", {skipped} skipped (not sampled)");
    }
    text
}

/// The `--stats` line: what was read and what each exporter did so far.
/// `in_flight`: calls still running at detach, which become spans too.
fn stats_line(
    reader: &ReaderStats,
    exporters: &[Arc<crate::export::ExporterStats>],
    in_flight: usize,
) -> String {
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let mut line = format!(
        "stats: {} traces, {} spans",
        load(&reader.traces),
        load(&reader.spans) + in_flight as u64
    );
    for stats in exporters {
        let _ = write!(
            line,
            "; {}: {} exported, {} retried, {} skipped, {} dropped (queue full), {} failed",
            stats.name,
            load(&stats.spans),
            load(&stats.retried_spans),
            load(&stats.sampled_out_spans),
            load(&stats.queue_full_spans),
            load(&stats.failed_spans),
        );
    }
    line
}

/// `--list`: what would be traced and what was skipped.
pub fn describe_table(table: &FunctionTable, mechanism: ReturnMechanism) -> String {
    let mut out = String::new();
    if let Some(python) = &table.python {
        let _ = writeln!(
            out,
            "{} is Python {} ({}): every Python function whose file lies under {} is \
             traced as it is called (from 3.11 only calls made from C, unless \
             --python-eval-hook), named module.qualname; exceptions that leave them are error \
             traces",
            table.binary.display(),
            python.version(),
            python.library.display(),
            python.project_root.display(),
        );
        let files = python_files(&python.project_root);
        let _ = writeln!(out, "{} Python files under the project root", files.len());
        for file in files {
            let _ = writeln!(out, "  {}", file.display());
        }
        return out;
    }
    let _ = writeln!(
        out,
        "{} functions would be traced in {} (debug info: {}; returns by {}{})",
        table.functions.len(),
        table.binary.display(),
        table.debug_info_summary(),
        mechanism.as_str(),
        match (table.stack_walking_runtime, table.can_unwind) {
            (Some(runtime), _) => format!(", the {runtime} runtime walks its stacks"),
            (None, true) => ", the binary can unwind".into(),
            (None, false) => String::new(),
        },
    );
    let hooks = &table.runtime;
    let mut error_path = Vec::new();
    if hooks.cxx_throw.is_some() {
        error_path.push("C++ exceptions (__cxa_throw, __cxa_begin_catch)");
    }
    if hooks.rust_panic.is_some() {
        error_path.push("Rust panics (std's panic entry, catch_unwind)");
    }
    if table
        .go
        .as_ref()
        .is_some_and(|go| go.panics.gopanic.is_some())
    {
        error_path.push(
            "Go panics (runtime.gopanic, the recovering call's return) and exits (runtime.exit)",
        );
    }
    error_path.push("fatal signals and failing exits");
    let _ = writeln!(out, "error path: {}", error_path.join(", "));
    for function in &table.functions {
        let entry = function.code.entry.as_ref().map_or(String::new(), |site| {
            format!(
                "entry +{} {}{}",
                site.address - function.address,
                site.mnemonic,
                if site.cost == ProbeCost::Emulated {
                    ""
                } else {
                    " (single-stepped)"
                }
            )
        });
        let returns = function
            .code
            .exits
            .iter()
            .filter(|exit| exit.kind == crate::discovery::ExitKind::Return)
            .count();
        let tail_jumps = function.code.exits.len() - returns;
        let mut exits = format!("{returns} ret");
        if tail_jumps > 0 {
            let _ = write!(exits, ", {tail_jumps} tail jmp");
        }
        if !function.code.exits_complete() {
            exits.push_str(", other exits closed by stack pointer");
        }
        if mechanism == ReturnMechanism::LeafUretprobes && mechanism.uretprobe_for(function) {
            exits.push_str(" (leaf: uretprobe)");
        }
        let _ = writeln!(
            out,
            "  {}  {}  {entry}  exits: {exits}",
            function.name,
            function.location().unwrap_or_else(|| "-".into()),
        );
    }
    let _ = writeln!(
        out,
        "{} function symbols skipped: {}",
        table.skipped_total(),
        skip_summary(table)
    );
    out
}

fn skip_summary(table: &FunctionTable) -> String {
    let mut reasons: Vec<_> = table.skipped.iter().collect();
    reasons.sort();
    if reasons.is_empty() {
        return "none".into();
    }
    reasons
        .iter()
        .map(|(reason, count)| format!("{count} {reason}"))
        .collect::<Vec<_>>()
        .join(", ")
}
