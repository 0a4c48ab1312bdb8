//! Attach: loading the eBPF programs and putting probes on the target.
//!
//! Probes go on the binary's inode, so they cover every process that runs it,
//! including ones that start later; the programs then keep only the processes
//! in their `TGIDS` map (DESIGN.md: aya's per-process uprobe scope delivered
//! no events on this kernel). Children of traced processes are added to the
//! map by the `sched_process_fork` tracepoint.

pub mod system;

use std::{path::Path, time::Duration};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
        ProgramError, TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use omegi_common::{
    end_reason, error_kind, globals, names, span_flags, ThreadStack, ALL_PROCESSES_KEY,
    ENTRY_FLAGS_SHIFT, EXIT_KIND_SHIFT,
};

use crate::discovery::{ExitKind, Function, FunctionTable, RuntimeSymbol};

/// The eBPF object built by `build.rs` from `omegi-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/omegi.bpf.o"));

/// Why probes could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "omegi-agent needs root (or CAP_BPF and CAP_PERFMON) to load eBPF programs; run it with sudo"
    )]
    NotPrivileged,
    #[error("this kernel has no uprobe support (CONFIG_UPROBE_EVENTS); omegi cannot trace here")]
    NoUprobes,
    #[error("tracefs: {0}")]
    Tracefs(String),
    #[error("loading the eBPF programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "--return-probes uretprobe refused: {0} can unwind (C++ exceptions, Rust panics or \
         pthread_exit), and unwinding through a uretprobe kills the program"
    )]
    UretprobeOnUnwinder(String),
    #[error("no probe could be attached to {binary}: {first_error}")]
    NothingAttached { binary: String, first_error: String },
}

/// How calls' ends are seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReturnProbes {
    /// uretprobes where the binary cannot unwind, return sites elsewhere.
    Auto,
    /// Probes on each `ret` and tail jump: safe for every binary.
    Sites,
    /// The kernel's uretprobes: cheaper, only for binaries that cannot unwind.
    Uretprobe,
}

/// The return mechanism in use for a binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnMechanism {
    Sites,
    Uretprobe,
}

impl ReturnMechanism {
    /// Resolves the user's choice against what the binary can do.
    pub fn choose(choice: ReturnProbes, table: &FunctionTable) -> Result<Self, AttachError> {
        match (choice, table.can_unwind) {
            (ReturnProbes::Sites, _) | (ReturnProbes::Auto, true) => Ok(Self::Sites),
            (ReturnProbes::Auto, false) | (ReturnProbes::Uretprobe, false) => Ok(Self::Uretprobe),
            (ReturnProbes::Uretprobe, true) => Err(AttachError::UretprobeOnUnwinder(
                table.binary.display().to_string(),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sites => "return sites",
            Self::Uretprobe => "uretprobe",
        }
    }
}

/// Settings of the kernel side.
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// See `SPLIT_AFTER_NS` in `omegi-common`.
    pub split_after: Duration,
    /// Trace every process that runs the binary (`--binary`).
    pub all_processes: bool,
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ring_size: u32,
    /// Turn on aya-log output from the programs.
    pub debug_ebpf: bool,
}

/// The maps the agent reads while tracing.
pub struct KernelMaps {
    pub events: RingBuf<MapData>,
    pub counters: PerCpuArray<MapData, u64>,
    pub threads: BpfHashMap<MapData, u32, ThreadStack>,
    /// Kernel-side diagnostics, with `--debug-ebpf`.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// What was attached.
#[derive(Clone, Debug, Default)]
pub struct AttachReport {
    pub functions: usize,
    pub entry_probes: usize,
    pub exit_probes: usize,
    /// Functions whose entry probe could not be attached (logged).
    pub failed: usize,
}

/// The loaded programs and their probes. Dropping it (or [`detach`]) removes
/// every probe from the target.
///
/// [`detach`]: Probes::detach
pub struct Probes {
    ebpf: Option<Ebpf>,
    tgids: BpfHashMap<MapData, u32, u8>,
}

impl Probes {
    /// Loads the programs and attaches the fork and exit tracepoints.
    pub fn load(options: &KernelOptions) -> Result<(Self, KernelMaps), AttachError> {
        system::check_privileges()?;
        system::check_uprobes()?;
        let tracefs = system::ensure_tracefs()?;
        let offset = |category, name, field| {
            system::tracepoint_field_offset(&tracefs, category, name, field)
        };
        let fork_child_pid = offset("sched", "sched_process_fork", "child_pid")?;
        let signal_sig = offset("signal", "signal_deliver", "sig")?;
        let signal_handler = offset("signal", "signal_deliver", "sa_handler")?;
        let exit_code = offset("syscalls", "sys_enter_exit_group", "error_code")?;
        // Newer kernels only; without it exited processes stay in TGIDS.
        let group_dead = offset("sched", "sched_process_exit", "group_dead").unwrap_or(0);

        let split_after_ns = u64::try_from(options.split_after.as_nanos()).unwrap_or(u64::MAX);
        let all_processes = u8::from(options.all_processes);
        let log_level: u8 = if options.debug_ebpf { 0xff } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::SPLIT_AFTER_NS, &split_after_ns, true)
            .override_global(globals::ALL_PROCESSES, &all_processes, true)
            .override_global(globals::FORK_CHILD_PID_OFFSET, &fork_child_pid, true)
            .override_global(globals::SIGNAL_SIG_OFFSET, &signal_sig, true)
            .override_global(globals::SIGNAL_HANDLER_OFFSET, &signal_handler, true)
            .override_global(globals::EXIT_CODE_OFFSET, &exit_code, true)
            .override_global(globals::EXIT_GROUP_DEAD_OFFSET, &group_dead, true)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .map_max_entries(names::MAP_EVENTS, options.ring_size)
            .load(EBPF_OBJECT)?;

        let logger = if options.debug_ebpf {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(logger) => Some(logger),
                Err(error) => {
                    tracing::warn!("eBPF logging unavailable: {error}");
                    None
                }
            }
        } else {
            None
        };

        for (program, category, name) in [
            (names::PROG_FORK, "sched", "sched_process_fork"),
            (names::PROG_TASK_EXIT, "sched", "sched_process_exit"),
            (names::PROG_SIGNAL, "signal", "signal_deliver"),
            (names::PROG_EXIT_GROUP, "syscalls", "sys_enter_exit_group"),
        ] {
            let tracepoint: &mut TracePoint = program_mut(&mut ebpf, program)?;
            tracepoint.load().map_err(|source| AttachError::Program {
                name: program,
                source,
            })?;
            tracepoint
                .attach(category, name)
                .map_err(|source| AttachError::Program {
                    name: program,
                    source,
                })?;
        }
        for program in [
            names::PROG_ENTRY,
            names::PROG_EXIT,
            names::PROG_URETPROBE,
            names::PROG_CXX_THROW,
            names::PROG_CXX_CATCH,
            names::PROG_RUST_PANIC,
            names::PROG_RUST_PANIC_MESSAGE,
            names::PROG_RUST_CATCH,
        ] {
            let uprobe: &mut UProbe = program_mut(&mut ebpf, program)?;
            uprobe.load().map_err(|source| AttachError::Program {
                name: program,
                source,
            })?;
        }

        let maps = KernelMaps {
            events: take_map(&mut ebpf, names::MAP_EVENTS)?,
            counters: take_map(&mut ebpf, names::MAP_COUNTERS)?,
            threads: take_map(&mut ebpf, names::MAP_THREADS)?,
            logger,
        };
        let tgids = take_map(&mut ebpf, names::MAP_TGIDS)?;
        Ok((
            Self {
                ebpf: Some(ebpf),
                tgids,
            },
            maps,
        ))
    }

    /// Puts entry and exit probes on every function of `table`, in the file
    /// at `target` (which may be a `/proc/PID/exe` link: the kernel follows
    /// it to the inode).
    pub fn attach_functions(
        &mut self,
        table: &FunctionTable,
        target: &Path,
        mechanism: ReturnMechanism,
    ) -> Result<AttachReport, AttachError> {
        let ebpf = self
            .ebpf
            .as_mut()
            .expect("probes are attached before detach");
        let mut report = AttachReport::default();
        let mut first_error = None;
        let mut attached = vec![false; table.functions.len()];

        let entry: &mut UProbe = program_mut(ebpf, names::PROG_ENTRY)?;
        for function in &table.functions {
            let Some(site) = &function.code.entry else {
                continue;
            };
            match attach_one(entry, site.file_offset, entry_cookie(function), target) {
                Ok(()) => {
                    attached[function.id as usize] = true;
                    report.entry_probes += 1;
                }
                Err(error) => {
                    tracing::warn!("not tracing {}: {error}", function.name);
                    report.failed += 1;
                    first_error.get_or_insert(error.to_string());
                }
            }
        }
        if report.entry_probes == 0 {
            return Err(AttachError::NothingAttached {
                binary: target.display().to_string(),
                first_error: first_error.unwrap_or_else(|| "no functions".into()),
            });
        }

        if mechanism == ReturnMechanism::Uretprobe {
            let uretprobe: &mut UProbe = program_mut(ebpf, names::PROG_URETPROBE)?;
            for function in table.functions.iter().filter(|f| attached[f.id as usize]) {
                let site = function.code.entry.as_ref().expect("attached above");
                match attach_one(uretprobe, site.file_offset, u64::from(function.id), target) {
                    Ok(()) => report.exit_probes += 1,
                    Err(error) => {
                        tracing::warn!("no return probe on {}: {error}", function.name)
                    }
                }
            }
        }
        // Exit sites: every `ret` and tail jump with return sites; only the
        // tail jumps with uretprobes, which see returns but not a `jmp` out
        // of the function (unprobed, a tail call would end `replaced` when a
        // traced function it jumps to starts, or else when that one returns).
        let exit: &mut UProbe = program_mut(ebpf, names::PROG_EXIT)?;
        for function in table.functions.iter().filter(|f| attached[f.id as usize]) {
            for site in &function.code.exits {
                if mechanism == ReturnMechanism::Uretprobe && site.kind == ExitKind::Return {
                    continue;
                }
                let reason = match site.kind {
                    ExitKind::Return => end_reason::RETURNED,
                    ExitKind::TailJump => end_reason::TAIL_CALL,
                };
                let cookie = (u64::from(reason) << EXIT_KIND_SHIFT) | u64::from(function.id);
                match attach_one(exit, site.site.file_offset, cookie, target) {
                    Ok(()) => report.exit_probes += 1,
                    Err(error) => tracing::warn!(
                        "no exit probe at {:#x} in {}: {error}",
                        site.site.address,
                        function.name
                    ),
                }
            }
        }
        report.functions = report.entry_probes;
        Ok(report)
    }

    /// Puts probes on the language runtime's throw, panic and catch points,
    /// so that exceptions and panics are seen with their type and message.
    /// `pid` is the running process, when there is one, whose own copy of a
    /// shared runtime (libstdc++) is probed; otherwise the system's. Returns
    /// how many probes were attached; failures are logged, not fatal (the
    /// error path is then seen only as unwound calls).
    pub fn attach_error_hooks(
        &mut self,
        table: &FunctionTable,
        target: &Path,
        pid: Option<u32>,
    ) -> usize {
        let ebpf = self
            .ebpf
            .as_mut()
            .expect("probes are attached before detach");
        let hooks = &table.runtime;
        let cxx = [
            (
                &hooks.cxx_throw,
                names::PROG_CXX_THROW,
                error_kind::CXX_THROW,
            ),
            (
                &hooks.cxx_rethrow,
                names::PROG_CXX_THROW,
                error_kind::CXX_RETHROW,
            ),
            (
                &hooks.cxx_begin_catch,
                names::PROG_CXX_CATCH,
                error_kind::CXX_CATCH,
            ),
        ];
        let rust = [
            (hooks.rust_panic, names::PROG_RUST_PANIC),
            (hooks.rust_panic_message, names::PROG_RUST_PANIC_MESSAGE),
        ]
        .into_iter()
        .filter_map(|(offset, program)| Some((offset?, program)))
        .chain(
            hooks
                .rust_panic_catch
                .iter()
                .map(|&offset| (offset, names::PROG_RUST_CATCH)),
        );
        let mut attached = 0;
        for (symbol, program, kind) in cxx {
            let Some(symbol) = symbol else { continue };
            let result = program_mut::<UProbe>(ebpf, program)
                .map_err(|e| e.to_string())
                .and_then(|probe| match symbol {
                    RuntimeSymbol::InBinary { file_offset } => {
                        attach_one(probe, *file_offset, u64::from(kind), target)
                            .map_err(|e| e.to_string())
                    }
                    RuntimeSymbol::Imported { name } => {
                        let library = shared_library(pid, "libstdc++");
                        let point = UProbeAttachPoint {
                            location: UProbeAttachLocation::Symbol(name),
                            cookie: Some(u64::from(kind)),
                        };
                        probe
                            .attach(point, &library, UProbeScope::AllProcesses)
                            .map(|_| ())
                            .map_err(|e| format!("{}: {e}", library.display()))
                    }
                });
            match result {
                Ok(()) => attached += 1,
                Err(error) => tracing::warn!(
                    "no probe on the C++ runtime ({program}): exceptions will show only as unwound calls: {error}"
                ),
            }
        }
        for (offset, program) in rust {
            let result = program_mut::<UProbe>(ebpf, program)
                .map_err(|e| e.to_string())
                .and_then(|probe| attach_one(probe, offset, 0, target).map_err(|e| e.to_string()));
            match result {
                Ok(()) => attached += 1,
                Err(error) => tracing::warn!(
                    "no probe on the Rust panic runtime ({program}): panics will show only as unwound calls: {error}"
                ),
            }
        }
        attached
    }

    /// Starts tracing the process `pid` (its threads and later children too).
    pub fn trace_process(&mut self, pid: u32) -> Result<(), AttachError> {
        self.tgids
            .insert(pid, 1, 0)
            .map_err(|source| AttachError::Map {
                name: names::MAP_TGIDS,
                source,
            })
    }

    /// Starts tracing every process that runs the probed binary (`--binary`).
    pub fn trace_all_processes(&mut self) -> Result<(), AttachError> {
        self.trace_process(ALL_PROCESSES_KEY)
    }

    /// Stops tracing at once: every probe still fires until [`detach`]
    /// removes it, one by one, but none records anything any more. Calls in
    /// flight stay on the threads' stacks, to be reported as unfinished,
    /// rather than losing the children they make while probes are removed.
    ///
    /// [`detach`]: Probes::detach
    pub fn stop_tracing(&mut self) {
        let keys: Vec<u32> = self.tgids.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = self.tgids.remove(&key);
        }
    }

    /// Removes every probe and tracepoint. Maps stay readable.
    pub fn detach(&mut self) {
        self.ebpf.take();
    }
}

/// The shared library whose file name starts with `prefix`: the one mapped
/// by `pid` (through `/proc/PID/root`, so a container's own copy), or the
/// system's from `ld.so.cache` (aya resolves a bare name there).
fn shared_library(pid: Option<u32>, prefix: &str) -> std::path::PathBuf {
    let mapped = pid.and_then(|pid| {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        let path = maps.lines().find_map(|line| {
            let path = line.split_whitespace().nth(5)?;
            let name = Path::new(path).file_name()?.to_str()?;
            name.starts_with(prefix).then(|| path.to_owned())
        })?;
        Some(std::path::PathBuf::from(format!("/proc/{pid}/root{path}")))
    });
    mapped.unwrap_or_else(|| prefix.into())
}

/// The entry probe's cookie: the function id, and whether the function can
/// leave by a jump no probe sees (then a call starting in its frame replaced
/// it; otherwise the frame was unwound).
fn entry_cookie(function: &Function) -> u64 {
    let flags = if function.code.exits_complete() {
        0
    } else {
        span_flags::OPEN_EXITS
    };
    (u64::from(flags) << ENTRY_FLAGS_SHIFT) | u64::from(function.id)
}

fn attach_one(
    program: &mut UProbe,
    file_offset: u64,
    cookie: u64,
    target: &Path,
) -> Result<(), ProgramError> {
    let point = UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(file_offset),
        cookie: Some(cookie),
    };
    program.attach(point, target, UProbeScope::AllProcesses)?;
    Ok(())
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, AttachError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(AttachError::Program {
        name,
        source: ProgramError::UnexpectedProgramType,
    })?;
    program
        .try_into()
        .map_err(|source| AttachError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, AttachError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(AttachError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| AttachError::Map { name, source })
}
