//! Attach: loading the eBPF programs and putting probes on the target.
//!
//! Probes go on the binary's inode, so they cover every process that runs it,
//! including ones that start later; the programs then keep only the processes
//! in their `TGIDS` map (DESIGN.md: aya's per-process uprobe scope delivered
//! no events on this kernel). Children of traced processes are added to the
//! map by the `sched_process_fork` tracepoint.

pub mod features;
pub mod functions;
pub mod http;
pub mod multi;
pub mod python_hook;
pub mod refusal;
pub mod system;

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
        ProgramError, TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use omegi_common::{
    end_reason, globals, names, span_flags, state, PythonCodeKey, PythonCodeVerdict, ThreadStack,
    ALL_PROCESSES_KEY, ENTRY_FLAGS_SHIFT, ENTRY_PYTHON_EVAL, EXIT_KIND_SHIFT, EXIT_PYTHON_EVAL,
    GENERATION_SHIFT, PYTHON_PATH_MAX,
};

pub use features::KernelFeatures;
pub use functions::FunctionCounters;

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
    #[error("the kernel {kernel} refused the eBPF program {program}: {reason} ({log_file})")]
    Refused {
        program: &'static str,
        kernel: String,
        reason: String,
        log_file: String,
    },
    #[error(
        "this kernel ({kernel}) has no attach cookies (Linux 5.15+), and telling probes apart \
         without them needs the kernel's BTF: {source}"
    )]
    NoProbeIdentity {
        kernel: String,
        source: features::BtfError,
    },
    #[error("--probe-lookup cookie: this kernel ({0}) has no attach cookies (Linux 5.15+)")]
    NoAttachCookies(String),
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
         pthread_exit) or its runtime walks its own stack (OCaml, GHC), and a uretprobe on a \
         frame that is walked kills the program"
    )]
    UretprobeOnUnwinder(String),
    #[error("no probe could be attached to {binary}: {first_error}")]
    NothingAttached { binary: String, first_error: String },
    #[error("uprobe_multi links (--attach-mode multi): {0}")]
    Multi(String),
    #[error("mapping the per-function counters: {0}")]
    Counters(std::io::Error),
    #[error(
        "this kernel ({kernel}) has no attach cookies (Linux 5.15+), which tracing a Python \
         interpreter in a shared library ({library}) needs"
    )]
    PythonNeedsCookies { kernel: String, library: String },
    #[error("the project root {0} is too long for Python code (255 bytes at most)")]
    PythonRootTooLong(String),
}

/// How calls' ends are seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReturnProbes {
    /// uretprobes where the binary cannot unwind; elsewhere return sites,
    /// and uretprobes on leaf functions (they call nothing, so nothing can
    /// unwind through them).
    Auto,
    /// Probes on each `ret` and tail jump: safe for every binary.
    Sites,
    /// The kernel's uretprobes: cheaper, only for binaries that cannot unwind.
    Uretprobe,
}

/// The return mechanism in use for a binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnMechanism {
    /// Probes on `ret` and tail jumps everywhere.
    Sites,
    /// Return sites, but uretprobes on leaf functions: a `ret` probe is
    /// single-stepped (about 10 µs on a KVM guest), a uretprobe's return is
    /// not, and a leaf is where calls are shortest and most frequent.
    LeafUretprobes,
    /// uretprobes everywhere (a binary that cannot unwind).
    Uretprobe,
}

impl ReturnMechanism {
    /// Resolves the user's choice against what the binary can do.
    pub fn choose(choice: ReturnProbes, table: &FunctionTable) -> Result<Self, AttachError> {
        if table.python.is_some() {
            // Python calls end at the eval function's `ret` (see
            // `uretprobe_for`), whatever was asked.
            return Ok(Self::Sites);
        }
        match (choice, table.can_unwind) {
            (ReturnProbes::Sites, _) => Ok(Self::Sites),
            (ReturnProbes::Auto, true) if table.leaf_uretprobes => Ok(Self::LeafUretprobes),
            (ReturnProbes::Auto, true) => Ok(Self::Sites),
            (ReturnProbes::Auto, false) | (ReturnProbes::Uretprobe, false) => Ok(Self::Uretprobe),
            (ReturnProbes::Uretprobe, true) => Err(AttachError::UretprobeOnUnwinder(
                table.binary.display().to_string(),
            )),
        }
    }

    /// Whether `function` gets a uretprobe (rather than probes on its exits).
    pub fn uretprobe_for(self, function: &Function) -> bool {
        match self {
            Self::Sites => false,
            // A Python call's return is its `ret` in the eval function: a
            // uretprobe per call would meet the kernel's limit of 64 pending
            // returns a thread at the 65th nested Python call.
            _ if function.runs_python => false,
            Self::LeafUretprobes => function.code.is_leaf(),
            Self::Uretprobe => true,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sites => "return sites",
            Self::LeafUretprobes => "return sites (uretprobes on leaf functions)",
            Self::Uretprobe => "uretprobe",
        }
    }
}

/// How function probes are linked to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// uprobe_multi links where the kernel has them (Linux 6.6+), else one
    /// link per probe.
    Auto,
    /// uprobe_multi links only: all probes of a kind in one system call.
    Multi,
    /// One perf-event link per probe (about 0.7 ms each).
    Single,
}

/// How a function probe finds its function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeLookup {
    /// By cookie where the kernel has attach cookies (5.15+), else by address.
    Auto,
    /// By the cookie it was attached with.
    Cookie,
    /// By its address, in a map (what kernels before 5.15 need).
    Address,
}

/// Settings of the kernel side.
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// Calls shorter than this are left out (`--min-duration`); zero keeps all.
    pub min_duration: Duration,
    /// Calls shorter than this count as short for the overhead budget; zero
    /// when there is no budget.
    pub budget_short: Duration,
    /// Thread stack slots used (`omegi_common::globals::THREAD_SLOTS_USED`).
    pub thread_slots: u32,
    /// How function probes are linked (`--attach-mode`).
    pub attach_mode: AttachMode,
    /// How function probes find their function (`--probe-lookup`).
    pub probe_lookup: ProbeLookup,
    /// See `SPLIT_AFTER_NS` in `omegi-common`.
    pub split_after: Duration,
    /// Trace every process that runs the binary (`--binary`).
    pub all_processes: bool,
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ring_size: u32,
    /// Turn on aya-log output from the programs.
    pub debug_ebpf: bool,
    /// Follow HTTP/1.x on traced processes' TCP sockets (`--propagation`).
    pub http: bool,
    /// Read traced Python calls' arguments (`--capture-args`).
    pub capture_args: bool,
}

/// The maps the agent reads while tracing.
pub struct KernelMaps {
    pub events: RingBuf<MapData>,
    pub counters: PerCpuArray<MapData, u64>,
    pub threads: BpfHashMap<MapData, u32, ThreadStack>,
    pub thread_slots: Array<MapData, ThreadStack>,
    /// A Go program's shadow stacks, by process and goroutine.
    pub goroutines: BpfHashMap<MapData, u64, ThreadStack>,
    /// Python code objects judged (the agent turns off those its filters
    /// leave out), for a Python interpreter.
    pub python_codes: Option<BpfHashMap<MapData, PythonCodeKey, PythonCodeVerdict>>,
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
    /// `uprobe_multi` links, or one link per probe.
    pub multi: bool,
    /// How long attaching the function probes took.
    pub took: Duration,
}

/// A probe's place: where it goes in the file, its link-time address (how
/// the programs of kernels without attach cookies find it), and its cookie
/// (without the generation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Site {
    file_offset: u64,
    address: u64,
    cookie: u64,
}

impl Site {
    fn new(site: &crate::discovery::ProbeSite, cookie: u64) -> Self {
        Self {
            file_offset: site.file_offset,
            address: site.address,
            cookie,
        }
    }
}

/// The probes of one traced function, as they are linked.
#[derive(Clone, Debug)]
struct FunctionProbes {
    id: u32,
    /// The entry probe (`omegi_entry`).
    entry: Site,
    /// Uretprobes at the entry (`omegi_uretprobe`), where the binary cannot
    /// unwind.
    returns: Vec<Site>,
    /// Probes on exit instructions (`omegi_exit`): every `ret` and tail jump
    /// with return sites; only the tail jumps with uretprobes, which see
    /// returns but not a `jmp` out of the function (unprobed, a tail call
    /// would end `replaced` when a traced function it jumps to starts, or
    /// else when that one returns).
    exits: Vec<Site>,
}

impl FunctionProbes {
    fn new(function: &Function, uretprobe: bool) -> Option<Self> {
        let entry = function.code.entry.as_ref()?;
        let id = u64::from(function.id);
        let exits = function
            .code
            .exits
            .iter()
            .filter(|exit| !uretprobe || exit.kind == ExitKind::TailJump)
            .map(|exit| {
                let reason = match exit.kind {
                    ExitKind::Return => end_reason::RETURNED,
                    ExitKind::TailJump => end_reason::TAIL_CALL,
                };
                let python = if function.runs_python {
                    EXIT_PYTHON_EVAL
                } else {
                    0
                };
                Site::new(
                    &exit.site,
                    (u64::from(reason) << EXIT_KIND_SHIFT) | python | id,
                )
            })
            .collect();
        Some(Self {
            id: function.id,
            entry: Site::new(entry, entry_cookie(function)),
            returns: if uretprobe {
                vec![Site::new(entry, id)]
            } else {
                Vec::new()
            },
            exits,
        })
    }
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
    let python = if function.runs_python {
        ENTRY_PYTHON_EVAL
    } else {
        0
    };
    (u64::from(flags) << ENTRY_FLAGS_SHIFT) | python | u64::from(function.id)
}

/// The links that hold the function probes.
enum FunctionLinks {
    None,
    /// `uprobe_multi` links of the current generation.
    Multi {
        target: PathBuf,
        generation: u8,
        links: Vec<OwnedFd>,
    },
    /// One link per probe: (function id, program, link).
    Single(Vec<(u32, &'static str, UProbeLinkId)>),
}

/// The loaded programs and their probes. Dropping it (or [`detach`]) removes
/// every probe from the target.
///
/// [`detach`]: Probes::detach
pub struct Probes {
    ebpf: Option<Ebpf>,
    tgids: BpfHashMap<MapData, u32, u8>,
    state: Array<MapData, u32>,
    /// What the kernel offers, as found at load.
    features: KernelFeatures,
    /// The function probe programs loaded for `uprobe_multi`, when the
    /// kernel took them.
    multi: Option<multi::MultiPrograms>,
    attach_mode: AttachMode,
    /// The function probe programs for links of one probe each.
    single: SinglePrograms,
    /// Probe sites by address, for [`SinglePrograms::BY_ADDRESS`].
    probe_sites: Option<BpfHashMap<MapData, u64, u64>>,
    /// The per-function counters' map, held open: the programs loaded
    /// after [`load`](Self::load) (the error path's) refer to it by this
    /// descriptor.
    _functions_map: MapData,
    /// What each attached function's probes are, to link them again.
    attached: Vec<FunctionProbes>,
    links: FunctionLinks,
    /// Whether HTTP spans are on, or why not.
    http: Result<(), String>,
}

/// The programs of function probes (entry, exit, uretprobe) for links of one
/// probe each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SinglePrograms {
    entry: &'static str,
    exit: &'static str,
    uretprobe: &'static str,
    /// The programs read their cookie with `bpf_get_attach_cookie` (these
    /// are also the ones loaded for `uprobe_multi` links); the others look
    /// the probe up by address in `PROBE_SITES`.
    cookies: bool,
}

impl SinglePrograms {
    const WITH_COOKIES: Self = Self {
        entry: names::PROG_ENTRY,
        exit: names::PROG_EXIT,
        uretprobe: names::PROG_URETPROBE,
        cookies: true,
    };
    const BY_ADDRESS: Self = Self {
        entry: names::PROG_ENTRY_BY_ADDRESS,
        exit: names::PROG_EXIT_BY_ADDRESS,
        uretprobe: names::PROG_URETPROBE_BY_ADDRESS,
        cookies: false,
    };

    fn all(self) -> [&'static str; 3] {
        [self.entry, self.exit, self.uretprobe]
    }
}

impl Probes {
    /// Loads the programs `table` needs and attaches the fork, exit, signal
    /// and `exit_group` tracepoints. The error path's probes are loaded by
    /// [`attach_error_hooks`](Self::attach_error_hooks), only those the
    /// binary's runtime has (each takes the verifier a while, and a C
    /// program needs no C++ throw probe).
    pub fn load(
        options: &KernelOptions,
        table: &FunctionTable,
    ) -> Result<(Self, KernelMaps, FunctionCounters), AttachError> {
        system::check_privileges()?;
        system::check_uprobes()?;
        let features = KernelFeatures::probe();
        tracing::debug!("kernel features: {features:?}");
        if options.attach_mode == AttachMode::Multi && !features.uprobe_multi {
            return Err(AttachError::Multi(format!(
                "this kernel ({}) has no uprobe_multi links (Linux 6.6+)",
                features.release
            )));
        }
        let single = match (options.probe_lookup, features.attach_cookies) {
            (ProbeLookup::Address, _) | (ProbeLookup::Auto, false) => SinglePrograms::BY_ADDRESS,
            (ProbeLookup::Cookie | ProbeLookup::Auto, true) => SinglePrograms::WITH_COOKIES,
            (ProbeLookup::Cookie, false) => {
                return Err(AttachError::NoAttachCookies(features.release.clone()))
            }
        };
        // uprobe_multi links carry cookies; the programs that find their
        // function by address are for links of one probe each.
        let multi_possible = features.uprobe_multi && single.cookies;
        if options.attach_mode == AttachMode::Multi && !multi_possible && features.uprobe_multi {
            return Err(AttachError::Multi(
                "uprobe_multi links need probes found by cookie (--probe-lookup)".into(),
            ));
        }
        let task_offsets = if single.cookies {
            features::TaskOffsets {
                task_mm: 0,
                mm_start_code: 0,
            }
        } else {
            features::task_offsets().map_err(|source| AttachError::NoProbeIdentity {
                kernel: features.release.clone(),
                source,
            })?
        };
        let probe_sites: usize = if single.cookies {
            1
        } else {
            table
                .functions
                .iter()
                .map(|function| 1 + function.code.exits.len())
                .sum()
        };

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

        let functions = table.functions.len();
        // A Go program's calls are kept per goroutine (see the kernel's
        // goroutine.rs): room for this many goroutines with calls in flight
        // at once, 3.6 kB each, reserved only for a Go program.
        let (goid_offset, goroutine_stacks) = match &table.go {
            Some(go) => (go.goid_offset, GOROUTINE_STACKS),
            None => (0u32, 1),
        };
        let split_after_ns = u64::try_from(options.split_after.as_nanos()).unwrap_or(u64::MAX);
        let min_duration_ns = u64::try_from(options.min_duration.as_nanos()).unwrap_or(u64::MAX);
        let budget_short_ns = u64::try_from(options.budget_short.as_nanos()).unwrap_or(u64::MAX);
        let all_processes = u8::from(options.all_processes);
        let log_level: u8 = if options.debug_ebpf { 0xff } else { 0 };
        let mut http = if options.http {
            Ok(())
        } else {
            Err("off (--propagation off)".to_owned())
        };
        let socket_offsets = match http {
            Ok(()) => match features::socket_offsets() {
                Ok(offsets) => Some(offsets),
                Err(error) => {
                    http = Err(error.to_string());
                    None
                }
            },
            Err(_) => None,
        };
        let (mut python_offsets, python_root) = python_settings(table, &features, single)?;
        python_offsets.capture_args = u32::from(options.capture_args);
        let http_enabled = u8::from(socket_offsets.is_some());
        let socket_offsets = socket_offsets.unwrap_or_default();
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::SPLIT_AFTER_NS, &split_after_ns, true)
            .override_global(globals::ALL_PROCESSES, &all_processes, true)
            .override_global(globals::FORK_CHILD_PID_OFFSET, &fork_child_pid, true)
            .override_global(globals::SIGNAL_SIG_OFFSET, &signal_sig, true)
            .override_global(globals::SIGNAL_HANDLER_OFFSET, &signal_handler, true)
            .override_global(globals::EXIT_CODE_OFFSET, &exit_code, true)
            .override_global(globals::EXIT_GROUP_DEAD_OFFSET, &group_dead, true)
            .override_global(globals::MIN_DURATION_NS, &min_duration_ns, true)
            .override_global(globals::BUDGET_SHORT_NS, &budget_short_ns, true)
            .override_global(globals::THREAD_SLOTS_USED, &options.thread_slots, true)
            .override_global(globals::TASK_MM_OFFSET, &task_offsets.task_mm, true)
            .override_global(
                globals::MM_START_CODE_OFFSET,
                &task_offsets.mm_start_code,
                true,
            )
            .override_global(globals::EXEC_START, &table.exec_start, true)
            .override_global(globals::GO_GOID_OFFSET, &goid_offset, true)
            .override_global(globals::HTTP_ENABLED, &http_enabled, true)
            .override_global(globals::SOCKET_OFFSETS, &socket_offsets, true)
            .override_global(globals::PYTHON_OFFSETS, &python_offsets, true)
            .map_max_entries(names::MAP_GOROUTINES, goroutine_stacks)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .map_max_entries(names::MAP_EVENTS, options.ring_size)
            .map_max_entries(
                names::MAP_FUNCTIONS,
                u32::try_from(functions.max(1)).unwrap_or(u32::MAX),
            )
            .map_max_entries(
                names::MAP_PROBE_SITES,
                u32::try_from(probe_sites.max(1)).unwrap_or(u32::MAX),
            )
            .load(EBPF_OBJECT)?;

        for (program, category, name) in [
            (names::PROG_FORK, "sched", "sched_process_fork"),
            (names::PROG_TASK_EXIT, "sched", "sched_process_exit"),
            (names::PROG_SIGNAL, "signal", "signal_deliver"),
            (names::PROG_EXIT_GROUP, "syscalls", "sys_enter_exit_group"),
        ] {
            let tracepoint: &mut TracePoint = program_mut(&mut ebpf, program)?;
            tracepoint
                .load()
                .map_err(|error| refusal::refused(program, error))?;
            tracepoint
                .attach(category, name)
                .map_err(|source| AttachError::Program {
                    name: program,
                    source,
                })?;
        }

        // HTTP spans are a part omegi can trace without: a kernel that
        // refuses them gets function spans only, and a line saying why.
        if http.is_ok() {
            if let Err(error) = http::attach(&mut ebpf) {
                http = Err(error.to_string());
            }
        }
        if let Err(why) = &http {
            if options.http {
                tracing::warn!("no HTTP spans: {why}");
            }
        }

        // The function probes, for uprobe_multi links, while every map is
        // still in `ebpf` to relocate them to. aya loads them for links of
        // one probe each only when these are not available (verifying them
        // takes a while).
        let multi = match options.attach_mode {
            AttachMode::Single => None,
            _ if !multi_possible => None,
            mode => {
                match multi::load_programs(EBPF_OBJECT, &ebpf, SinglePrograms::WITH_COOKIES.all()) {
                    Ok(programs) => Some(programs),
                    Err(error) if mode == AttachMode::Auto => {
                        tracing::debug!("no uprobe_multi, one link per probe: {error:#}");
                        None
                    }
                    Err(error) => return Err(AttachError::Multi(format!("{error:#}"))),
                }
            }
        };

        if multi.is_none() {
            for program in single.all() {
                load_uprobe(&mut ebpf, program)?;
            }
        }

        // Only now: the logger takes its map out of `ebpf`, which the multi
        // programs above needed to relocate their references to it.
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

        let maps = KernelMaps {
            events: take_map(&mut ebpf, names::MAP_EVENTS)?,
            counters: take_map(&mut ebpf, names::MAP_COUNTERS)?,
            threads: take_map(&mut ebpf, names::MAP_THREADS)?,
            thread_slots: take_map(&mut ebpf, names::MAP_THREAD_SLOTS)?,
            goroutines: take_map(&mut ebpf, names::MAP_GOROUTINES)?,
            python_codes: if table.python.is_some() {
                Some(take_map(&mut ebpf, names::MAP_PYTHON_CODES)?)
            } else {
                None
            },
            logger,
        };
        let tgids = take_map(&mut ebpf, names::MAP_TGIDS)?;
        let state = take_map(&mut ebpf, names::MAP_STATE)?;
        if let Some(root) = python_root {
            let mut roots: Array<MapData, [u8; PYTHON_PATH_MAX]> =
                take_map(&mut ebpf, names::MAP_PYTHON_ROOT)?;
            roots.set(0, root, 0).map_err(|source| AttachError::Map {
                name: names::MAP_PYTHON_ROOT,
                source,
            })?;
        }
        let probe_sites = if single.cookies {
            None
        } else {
            Some(take_map(&mut ebpf, names::MAP_PROBE_SITES)?)
        };
        let functions_map: MapData = take_map_data(&mut ebpf, names::MAP_FUNCTIONS)?;
        let counters = FunctionCounters::map(&functions_map, functions.max(1))
            .map_err(AttachError::Counters)?;
        Ok((
            Self {
                ebpf: Some(ebpf),
                tgids,
                state,
                features,
                multi,
                attach_mode: options.attach_mode,
                single,
                probe_sites,
                _functions_map: functions_map,
                attached: Vec::new(),
                links: FunctionLinks::None,
                http,
            },
            maps,
            counters,
        ))
    }

    /// Whether HTTP spans are on, or why not.
    pub fn http(&self) -> Result<(), &str> {
        self.http.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// What the kernel offers, as found at load.
    pub fn features(&self) -> &KernelFeatures {
        &self.features
    }

    /// Whether the function probes are linked with `uprobe_multi` (else one
    /// link per probe), and whether they find their function by cookie
    /// (else by address).
    pub fn function_probe_kind(&self) -> (bool, bool) {
        (self.multi.is_some(), self.single.cookies)
    }

    /// Loads every program of the error path, for `--check`: each one's
    /// name and what the kernel said.
    pub fn verify_error_programs(&mut self) -> Vec<(&'static str, Result<(), AttachError>)> {
        let ebpf = self
            .ebpf
            .as_mut()
            .expect("probes are attached before detach");
        ERROR_PROGRAMS
            .into_iter()
            .map(|program| (program, load_uprobe(ebpf, program)))
            .collect()
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
        let started = Instant::now();
        let probes: Vec<FunctionProbes> = table
            .functions
            .iter()
            .filter_map(|function| FunctionProbes::new(function, mechanism.uretprobe_for(function)))
            .collect();
        if probes.is_empty() {
            return Err(AttachError::NothingAttached {
                binary: target.display().to_string(),
                first_error: "no functions".into(),
            });
        }

        if let Some(programs) = &self.multi {
            match link_multi(programs, target, &probes, 0) {
                Ok(links) => {
                    let report = AttachReport {
                        functions: probes.len(),
                        entry_probes: probes.len(),
                        exit_probes: probes.iter().map(|p| p.exits.len() + p.returns.len()).sum(),
                        failed: 0,
                        multi: true,
                        took: started.elapsed(),
                    };
                    self.links = FunctionLinks::Multi {
                        target: target.to_owned(),
                        generation: 0,
                        links,
                    };
                    self.attached = probes;
                    return Ok(report);
                }
                Err(error) if self.attach_mode == AttachMode::Auto => {
                    tracing::debug!("uprobe_multi link refused, one link per probe: {error}");
                }
                Err(error) => return Err(AttachError::Multi(error.to_string())),
            }
        }
        self.attach_single(table, target, probes, started)
    }

    /// One perf-event link per probe (kernels without uprobe_multi). Each
    /// function's exits are watched before its entry, so that no call is
    /// entered before its way out is watched; a function whose entry probe
    /// fails loses its exit probes too.
    fn attach_single(
        &mut self,
        table: &FunctionTable,
        target: &Path,
        probes: Vec<FunctionProbes>,
        started: Instant,
    ) -> Result<AttachReport, AttachError> {
        let single = self.single;
        let ebpf = self
            .ebpf
            .as_mut()
            .expect("probes are attached before detach");
        if self.multi.take().is_some() {
            // Loaded for multi links, which the kernel then refused.
            for program in single.all() {
                load_uprobe(ebpf, program)?;
            }
        }
        let mut report = AttachReport::default();
        let mut first_error = None;
        let mut links = Vec::new();
        let mut attached = Vec::new();
        let name_of = |id: u32| table.get(id).map_or("?", |f| f.name.as_str());
        let cookie = |site: &Site| single.cookies.then_some(site.cookie);

        for function in probes {
            if let Some(sites) = &mut self.probe_sites {
                for site in std::iter::once(&function.entry).chain(&function.exits) {
                    sites
                        .insert(site.address, site.cookie, 0)
                        .map_err(|source| AttachError::Map {
                            name: names::MAP_PROBE_SITES,
                            source,
                        })?;
                }
            }
            let mut function_links = Vec::new();
            for (program, sites) in [
                (single.uretprobe, &function.returns),
                (single.exit, &function.exits),
            ] {
                let probe: &mut UProbe = program_mut(ebpf, program)?;
                for site in sites {
                    match attach_one(probe, site.file_offset, cookie(site), target) {
                        Ok(link) => {
                            function_links.push((function.id, program, link));
                            report.exit_probes += 1;
                        }
                        Err(error) => tracing::warn!(
                            "no exit probe at file offset {:#x} in {}: {error}",
                            site.file_offset,
                            name_of(function.id)
                        ),
                    }
                }
            }
            let entry: &mut UProbe = program_mut(ebpf, single.entry)?;
            match attach_one(
                entry,
                function.entry.file_offset,
                cookie(&function.entry),
                target,
            ) {
                Ok(link) => {
                    links.extend(function_links);
                    links.push((function.id, single.entry, link));
                    report.entry_probes += 1;
                    attached.push(function);
                }
                Err(error) => {
                    tracing::warn!("not tracing {}: {error}", name_of(function.id));
                    report.failed += 1;
                    first_error.get_or_insert(error.to_string());
                    for (_, program, link) in function_links {
                        report.exit_probes -= 1;
                        let probe: &mut UProbe = program_mut(ebpf, program)?;
                        let _ = probe.detach(link);
                    }
                }
            }
        }
        if report.entry_probes == 0 {
            return Err(AttachError::NothingAttached {
                binary: target.display().to_string(),
                first_error: first_error.unwrap_or_else(|| "no functions".into()),
            });
        }
        report.functions = report.entry_probes;
        report.took = started.elapsed();
        self.links = FunctionLinks::Single(links);
        self.attached = attached;
        Ok(report)
    }

    /// Removes the probes of the functions `ids` while the others stay
    /// traced. With multi links, the remaining functions are linked again as
    /// a new generation, which takes over atomically before the old links
    /// close, so no call of theirs is missed or seen twice. Returns how many
    /// functions were detached.
    ///
    /// On an error, [`is_attached`](Self::is_attached) says which functions
    /// are still linked: with multi links nothing changed (all of `ids`
    /// stay traced); with one link per probe, aya takes a link out of its
    /// table before removing it, so every link of `ids` is gone even when
    /// removing one failed (every one is tried).
    pub fn detach_functions(&mut self, ids: &[u32]) -> Result<usize, AttachError> {
        let before = self.attached.len();
        let remaining: Vec<FunctionProbes> = self
            .attached
            .iter()
            .filter(|function| !ids.contains(&function.id))
            .cloned()
            .collect();
        if remaining.len() == before {
            return Ok(0);
        }
        match &mut self.links {
            FunctionLinks::None => Ok(0),
            FunctionLinks::Multi {
                target,
                generation,
                links,
            } => {
                let programs = self
                    .multi
                    .as_ref()
                    .expect("multi links come from multi programs");
                let next = generation.wrapping_add(1);
                let new_links = if remaining.is_empty() {
                    Vec::new()
                } else {
                    link_multi(programs, target, &remaining, next)
                        .map_err(|error| AttachError::Multi(error.to_string()))?
                };
                self.state
                    .set(state::GENERATION, u32::from(next), 0)
                    .map_err(|source| AttachError::Map {
                        name: names::MAP_STATE,
                        source,
                    })?;
                *generation = next;
                // The old links close here; their probes no longer run.
                *links = new_links;
                let detached = before - remaining.len();
                self.attached = remaining;
                Ok(detached)
            }
            FunctionLinks::Single(links) => {
                let ebpf = self
                    .ebpf
                    .as_mut()
                    .expect("probes are attached before detach");
                let entry = self.single.entry;
                let (mut going, kept): (Vec<_>, Vec<_>) =
                    links.drain(..).partition(|(id, _, _)| ids.contains(id));
                *links = kept;
                // Entries first, the reverse of attaching: each detach
                // waits a grace period, and a function whose exits went
                // first would go on being entered, unmatched, meanwhile.
                going.sort_by_key(|(_, program, _)| *program != entry);
                // Every link is tried: one that fails has still been taken
                // out of aya's table (and its descriptor closed), so the
                // function is gone either way; the first error is said.
                let mut first_error = None;
                for (_, program, link) in going {
                    let result = program_mut(ebpf, program).and_then(|probe: &mut UProbe| {
                        probe.detach(link).map_err(|source| AttachError::Program {
                            name: program,
                            source,
                        })
                    });
                    if let Err(error) = result {
                        first_error.get_or_insert(error);
                    }
                }
                let detached = before - remaining.len();
                self.attached = remaining;
                match first_error {
                    Some(error) => Err(error),
                    None => Ok(detached),
                }
            }
        }
    }

    /// Whether function `id` still has probes linked.
    pub fn is_attached(&self, id: u32) -> bool {
        self.attached.iter().any(|function| function.id == id)
    }

    /// The process and thread ids traced by id (`TGIDS`; `--binary` is
    /// every process of the binary instead).
    pub fn traced_ids(&self) -> Vec<u32> {
        self.tgids
            .keys()
            .filter_map(Result::ok)
            .filter(|&id| id != ALL_PROCESSES_KEY)
            .collect()
    }

    /// Puts probes on the language runtime's throw, panic and catch points,
    /// so that exceptions and panics are seen with their type and message;
    /// loads only the programs of the hooks the binary has. `pid` is the
    /// running process, when there is one, whose own copy of a shared
    /// runtime (libstdc++) is probed; otherwise the system's. Returns how
    /// many probes were attached; failures are logged, not fatal (the error
    /// path is then seen only as unwound calls).
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
            (&hooks.cxx_throw, names::PROG_CXX_THROW),
            (&hooks.cxx_rethrow, names::PROG_CXX_RETHROW),
            (&hooks.cxx_begin_catch, names::PROG_CXX_CATCH),
        ]
        .into_iter()
        .filter_map(|(symbol, program)| Some((symbol.as_ref()?, program, "C++ runtime")));
        let rust = hooks
            .rust_panic
            .iter()
            .map(|&offset| (offset, names::PROG_RUST_PANIC))
            .chain(
                [
                    (&hooks.rust_payload_str, names::PROG_RUST_PANIC_STR),
                    (&hooks.rust_payload_string, names::PROG_RUST_PANIC_STRING),
                    (&hooks.rust_panic_catch, names::PROG_RUST_CATCH),
                ]
                .into_iter()
                .flat_map(|(offsets, program)| {
                    offsets.iter().map(move |&offset| (offset, program))
                }),
            )
            .map(|(file_offset, program)| {
                (
                    RuntimeSymbol::InBinary { file_offset },
                    program,
                    "Rust panic runtime",
                )
            })
            .collect::<Vec<_>>();
        let go = table
            .go
            .iter()
            .flat_map(|go| {
                [
                    (go.panics.gopanic, names::PROG_GO_PANIC),
                    (go.panics.exit, names::PROG_GO_EXIT),
                ]
            })
            .filter_map(|(offset, program)| Some((offset?, program)))
            .map(|(file_offset, program)| {
                (
                    RuntimeSymbol::InBinary { file_offset },
                    program,
                    "Go runtime",
                )
            });
        let hooks = cxx
            .map(|(symbol, program, runtime)| (symbol.clone(), program, runtime))
            .chain(rust)
            .chain(go);

        let mut attached = 0;
        let mut loaded = std::collections::HashMap::new();
        for (symbol, program, runtime) in hooks {
            let load = loaded
                .entry(program)
                .or_insert_with(|| {
                    program_mut::<UProbe>(ebpf, program)
                        .and_then(|probe| {
                            probe
                                .load()
                                .map_err(|error| refusal::refused(program, error))
                        })
                        .map_err(|error| error.to_string())
                })
                .clone();
            let result = load.and_then(|()| {
                let probe = program_mut::<UProbe>(ebpf, program).map_err(|e| e.to_string())?;
                match &symbol {
                    RuntimeSymbol::InBinary { file_offset } => {
                        attach_one(probe, *file_offset, None, target)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    }
                    RuntimeSymbol::Imported { name } => {
                        let library = shared_library(pid, "libstdc++");
                        let point = UProbeAttachPoint {
                            location: UProbeAttachLocation::Symbol(name),
                            cookie: None,
                        };
                        probe
                            .attach(point, &library, UProbeScope::AllProcesses)
                            .map(|_| ())
                            .map_err(|e| format!("{}: {e}", library.display()))
                    }
                }
            });
            match result {
                Ok(()) => attached += 1,
                Err(error) => tracing::warn!(
                    "no probe on the {runtime} ({program}): {} will show only as unwound calls: {error}",
                    if runtime.starts_with("C++") { "exceptions" } else { "panics" }
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
    /// removes it, but none records anything any more. Calls in flight stay
    /// on the threads' stacks, to be reported as unfinished, rather than
    /// losing the children they make while probes are removed. Emptying
    /// `TGIDS` stops new threads and the error path; a generation no probe
    /// carries stops threads that already have a stack (which skip the
    /// `TGIDS` lookup).
    ///
    /// [`detach`]: Probes::detach
    pub fn stop_tracing(&mut self) {
        let keys: Vec<u32> = self.tgids.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = self.tgids.remove(&key);
        }
        let _ = self.state.set(state::GENERATION, STOPPED_GENERATION, 0);
    }

    /// Removes every probe and tracepoint. Maps stay readable. Returns how
    /// many links were closed.
    ///
    /// Closing a perf-event link waits for RCU grace periods under the
    /// kernel's global tracing mutexes (NODE.md: 2–5 ms a link on 6.1), so
    /// links of one probe each are closed on several threads at once: the
    /// waits overlap where the mutexes allow, about twice as fast on 6.1. A
    /// `uprobe_multi` link needs one wait for all its probes.
    pub fn detach(&mut self) -> usize {
        let links = std::mem::replace(&mut self.links, FunctionLinks::None);
        let closed = match (links, self.ebpf.as_mut()) {
            (FunctionLinks::Single(links), Some(ebpf)) => {
                let owned: Vec<aya::programs::uprobe::UProbeLink> = links
                    .into_iter()
                    .filter_map(|(_, program, link)| {
                        program_mut::<UProbe>(ebpf, program)
                            .ok()?
                            .take_link(link)
                            .ok()
                    })
                    .collect();
                let count = owned.len();
                close_in_parallel(owned);
                count
            }
            (FunctionLinks::Multi { links, .. }, _) => links.len(),
            _ => 0,
        };
        self.multi = None;
        self.ebpf.take();
        closed
    }
}

/// Threads that close links of one probe each.
const CLOSING_THREADS: usize = 16;

/// Goroutines of a Go program that can have traced calls in flight at once.
const GOROUTINE_STACKS: u32 = 16384;

/// Drops `links` (closing each detaches its probe) on [`CLOSING_THREADS`]
/// threads.
fn close_in_parallel<T: Send>(links: Vec<T>) {
    if links.is_empty() {
        return;
    }
    let per_thread = links.len().div_ceil(CLOSING_THREADS);
    let mut links = links;
    std::thread::scope(|scope| {
        while !links.is_empty() {
            let rest = links.split_off(links.len().saturating_sub(per_thread));
            scope.spawn(move || drop(rest));
        }
    });
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

/// A `STATE[GENERATION]` no probe's cookie carries (those hold 8 bits).
const STOPPED_GENERATION: u32 = 0x100;

/// The programs of the language runtimes' error paths.
const ERROR_PROGRAMS: [&str; 9] = [
    names::PROG_RUST_CATCH,
    names::PROG_CXX_THROW,
    names::PROG_CXX_RETHROW,
    names::PROG_CXX_CATCH,
    names::PROG_RUST_PANIC,
    names::PROG_RUST_PANIC_STR,
    names::PROG_RUST_PANIC_STRING,
    names::PROG_GO_PANIC,
    names::PROG_GO_EXIT,
];

/// What the kernel side needs for a Python interpreter: the offsets of its
/// version, and the project root with a `/` (the bytes a traced code
/// object's file name starts with).
fn python_settings(
    table: &FunctionTable,
    features: &KernelFeatures,
    single: SinglePrograms,
) -> Result<(omegi_common::PythonOffsets, Option<[u8; PYTHON_PATH_MAX]>), AttachError> {
    let Some(python) = &table.python else {
        return Ok((Default::default(), None));
    };
    if !single.cookies && python.library != table.binary {
        // The programs that find a probe by address take the executable's
        // load bias; the interpreter is in a library.
        return Err(AttachError::PythonNeedsCookies {
            kernel: features.release.clone(),
            library: python.library.display().to_string(),
        });
    }
    let mut root = python.project_root.as_os_str().as_encoded_bytes().to_vec();
    if root.last() != Some(&b'/') {
        root.push(b'/');
    }
    if root.len() >= PYTHON_PATH_MAX {
        return Err(AttachError::PythonRootTooLong(
            python.project_root.display().to_string(),
        ));
    }
    let mut bytes = [0u8; PYTHON_PATH_MAX];
    bytes[..root.len()].copy_from_slice(&root);
    let mut offsets = python.offsets;
    offsets.root_len = root.len() as u32;
    Ok((offsets, Some(bytes)))
}

fn load_uprobe(ebpf: &mut Ebpf, program: &'static str) -> Result<(), AttachError> {
    let uprobe: &mut UProbe = program_mut(ebpf, program)?;
    uprobe
        .load()
        .map_err(|error| refusal::refused(program, error))
}

/// `cookie` is `None` for programs that do not read one (on kernels
/// without attach cookies aya refuses to attach with one).
fn attach_one(
    program: &mut UProbe,
    file_offset: u64,
    cookie: Option<u64>,
    target: &Path,
) -> Result<UProbeLinkId, ProgramError> {
    let point = UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(file_offset),
        cookie,
    };
    program.attach(point, target, UProbeScope::AllProcesses)
}

/// Links `functions` with one uprobe_multi link per program: exit and
/// return probes first, entries last, so that no call is entered before its
/// way out is watched.
fn link_multi(
    programs: &multi::MultiPrograms,
    target: &Path,
    functions: &[FunctionProbes],
    generation: u8,
) -> std::io::Result<Vec<OwnedFd>> {
    let tag = u64::from(generation) << GENERATION_SHIFT;
    let mut links = Vec::with_capacity(3);
    let mut link = |program: &OwnedFd, uretprobe: bool, sites: Vec<&Site>| {
        if sites.is_empty() {
            return Ok(());
        }
        let (offsets, cookies): (Vec<u64>, Vec<u64>) = sites
            .into_iter()
            .map(|site| (site.file_offset, site.cookie | tag))
            .unzip();
        links.push(multi::attach(
            program.as_fd(),
            target,
            &offsets,
            &cookies,
            uretprobe,
        )?);
        std::io::Result::Ok(())
    };
    link(
        &programs.exit,
        false,
        functions.iter().flat_map(|f| &f.exits).collect(),
    )?;
    link(
        &programs.uretprobe,
        true,
        functions.iter().flat_map(|f| &f.returns).collect(),
    )?;
    link(
        &programs.entry,
        false,
        functions.iter().map(|f| &f.entry).collect(),
    )?;
    Ok(links)
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

fn take_map_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, AttachError> {
    use aya::maps::Map;
    let map = ebpf.take_map(name).ok_or(AttachError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    match map {
        Map::Array(data) => Ok(data),
        _ => Err(AttachError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        }),
    }
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
