//! Discovery: which functions of the target binary are the user's, and where
//! each one's probes go.
//!
//! The function table is built from the ELF symbol table. DWARF gives each
//! function its source file and line, and the project root (the seed's
//! `OMEGI_PROJECT_ROOT`) decides what is user code: a function is traced when
//! its source file lies under the root. Without DWARF, the symbol table is
//! used alone, leaving out runtime and C library symbols. A stripped
//! binary's DWARF (and symbols) may come from a separate debug file
//! (`debuginfo.rs`); its code always comes from the binary.

mod code;
mod debuginfo;
mod dwarf;
mod elf;
mod go;
mod go_offsets;
pub mod go_panic;
mod go_select;
mod names;
pub mod python;
pub mod result_layout;
mod runtime;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::{Component, Path, PathBuf},
};

use globset::{Glob, GlobSet, GlobSetBuilder};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

pub use code::{CodeAnalysis, Exit, ExitKind, ProbeCost, ProbeSite};
pub use debuginfo::{DebugFile, FoundBy, Searched};
pub use dwarf::SourceIndex;
pub use go::GoBuild;
pub use go_offsets::OffsetSource;
pub use go_select::GoTarget;
pub use names::demangle;
pub use runtime::{RuntimeHooks, RuntimeSymbol};

/// Why discovery could not produce a function table.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not an ELF executable")]
    NotElf(PathBuf),
    #[error("{path} is an ELF file for {found}; omegi traces x86-64 (64-bit) programs only")]
    UnsupportedArchitecture { path: PathBuf, found: String },
    #[error(
        "{path} is stripped: it has neither a symbol table nor debug info, so its functions \
         cannot be found, and no separate debug file was found for it ({searched}); give the \
         directory that holds it with --debug-dir (or OMEGI_DEBUG_DIR), or trace an \
         unstripped build (or one with -g)"
    )]
    Stripped { path: PathBuf, searched: Searched },
    #[error(
        "{debug_file} is not the debug info of {binary}: its build id is {debug_id}, the \
         binary's is {binary_id}; omegi does not use debug info from another build (its files \
         and lines would be wrong)"
    )]
    DebugBuildIdMismatch {
        binary: PathBuf,
        debug_file: PathBuf,
        binary_id: String,
        debug_id: String,
    },
    #[error(
        "{debug_file} is not the debug info of {binary}: its CRC-32 is {found:08x}, the \
         binary's .gnu_debuglink expects {expected:08x} (the file was changed or comes from \
         another build); omegi does not use debug info that does not match (its files and \
         lines would be wrong)"
    )]
    DebugLinkCrcMismatch {
        binary: PathBuf,
        debug_file: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{debug_file}, where the debug info of {binary} should be, cannot be used: {reason}")]
    DebugFileUnusable {
        binary: PathBuf,
        debug_file: PathBuf,
        reason: String,
    },
    #[error(
        "{path} is a Go program ({}) that omegi cannot trace: {reason}; nothing was attached",
        build.describe()
    )]
    GoProgram {
        path: PathBuf,
        build: GoBuild,
        reason: String,
    },
    #[error(
        "{binary} is a Python interpreter, but its {library} was not found (searched its \
         RUNPATH, LD_LIBRARY_PATH and the system's library directories); trace the running \
         process with --pid"
    )]
    PythonLibraryNotFound { binary: PathBuf, library: String },
    #[error("{path} is a Python interpreter of a version omegi cannot tell (no Py_Version, and its name says none)")]
    UnknownPython { path: PathBuf },
    #[error(
        "{path} is Python {version}, which omegi does not trace: it traces CPython 3.{}–3.{}",
        python::SUPPORTED.0,
        python::SUPPORTED.1
    )]
    UnsupportedPython { path: PathBuf, version: String },
    #[error(
        "{path} is a Python interpreter whose eval function ({}) cannot be probed",
        python::EVAL_FUNCTION
    )]
    PythonWithoutEval { path: PathBuf },
    #[error("cannot read the DWARF debug info: {0}")]
    Dwarf(gimli::Error),
    #[error("invalid --include/--exclude pattern {pattern:?}: {source}")]
    BadPattern {
        pattern: String,
        source: globset::Error,
    },
}

/// What decides which functions are traced.
#[derive(Clone, Debug)]
pub struct Selection {
    /// Functions whose source file lies under this directory are user code.
    pub project_root: PathBuf,
    /// Globs on demangled names; when not empty, only matching functions.
    pub include: Vec<String>,
    /// Globs on demangled names; matching functions are left out.
    pub exclude: Vec<String>,
    /// Where to look first for a stripped binary's separate debug file
    /// (`--debug-dir`), before the places GDB looks.
    pub debug_dirs: Vec<PathBuf>,
}

/// A function that will be traced.
#[derive(Clone, Debug)]
pub struct Function {
    /// Index in the table; the probes' cookie.
    pub id: u32,
    /// Demangled name.
    pub name: String,
    /// The linker symbol.
    pub symbol: String,
    /// Source file and line, when the binary has DWARF.
    pub file: Option<PathBuf>,
    pub line: Option<u32>,
    /// Virtual address and size of the function's body.
    pub address: u64,
    pub size: u64,
    /// Where the entry probe goes and the ways out found in the code.
    pub code: CodeAnalysis,
    /// A Python interpreter's eval function: each call of it runs one
    /// Python call, which the kernel side names from its code object (see
    /// `python.rs`). Its calls are named per code object, never by this
    /// function's name, and its returns are always probed where they are.
    pub runs_python: bool,
    /// A Python function's module (`shop.payments`); its `symbol` is then
    /// its qualified name in the module (`Cart.total`), the seed's `name`.
    pub python_module: Option<String>,
}

impl Function {
    /// A function known only by name and source place, with no code (a table
    /// built by hand, e.g. to render or export spans recorded elsewhere).
    pub fn described(id: u32, name: &str, file: Option<&str>, line: Option<u32>) -> Self {
        Self {
            id,
            name: name.into(),
            symbol: name.into(),
            file: file.map(PathBuf::from),
            line,
            address: 0,
            size: 1,
            code: CodeAnalysis::default(),
            runs_python: false,
            python_module: None,
        }
    }

    /// `file:line`, or the bare file, or nothing.
    pub fn location(&self) -> Option<String> {
        let file = self.file.as_ref()?.display();
        Some(match self.line {
            Some(line) => format!("{file}:{line}"),
            None => file.to_string(),
        })
    }
}

/// Why a function symbol was not traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// Its source file is not under the project root.
    OutsideProjectRoot,
    /// The binary has DWARF, but not for this function (start-up code, libc).
    NoDebugInfo,
    /// A runtime or C library symbol (only without DWARF).
    Runtime,
    /// Symbol size 0: nothing to probe.
    ZeroSize,
    /// Another symbol for the same address is traced.
    Alias,
    /// A part of a function the compiler split off (`foo.cold`).
    SplitPart,
    /// Left out by `--include`/`--exclude`.
    Filtered,
    /// A wrapper the Go compiler generated (source `<autogenerated>`).
    Generated,
    /// The code could not be read or decoded.
    Undecodable,
    /// Its first instruction is one the kernel refuses to probe (a `lock`
    /// or segment prefix, …; see `code::kernel_refuses`), and the entry
    /// probe cannot go on the next one.
    Unprobeable,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutsideProjectRoot => "source outside the project root",
            Self::NoDebugInfo => "no debug info",
            Self::Runtime => "runtime or libc symbol",
            Self::ZeroSize => "zero size",
            Self::Alias => "alias of a traced symbol",
            Self::SplitPart => "split-off part of a function",
            Self::Filtered => "left out by --include/--exclude",
            Self::Generated => "wrapper generated by the compiler",
            Self::Undecodable => "code could not be decoded",
            Self::Unprobeable => "first instruction not probeable by the kernel",
        })
    }
}

/// The functions of one binary that omegi traces.
#[derive(Debug)]
pub struct FunctionTable {
    /// The binary the table describes.
    pub binary: PathBuf,
    /// Indexed by [`Function::id`].
    pub functions: Vec<Function>,
    /// How many function symbols were left out, and why.
    pub skipped: HashMap<SkipReason, usize>,
    /// Whether the binary has DWARF, in it or in [`debug_file`](Self::debug_file).
    pub has_dwarf: bool,
    /// The separate debug file the DWARF (and, for a binary without a
    /// symbol table, the symbols) came from; `None` when they are the
    /// binary's own.
    pub debug_file: Option<DebugFile>,
    /// Whether the symbol table came from `debug_file` (the binary has none).
    pub symbols_from_debug_file: bool,
    /// Functions were taken from the symbol table because DWARF covers none
    /// of the user's code (no DWARF at all, or only the runtime's, as in a
    /// Rust program built without `-g` whose std keeps its debug info).
    pub from_symbol_table: bool,
    /// Whether an unwinder in the binary could walk through a uretprobe'd
    /// frame (and so uretprobes must not be used).
    pub can_unwind: bool,
    /// The runtime that walks the binary's stacks by return address itself
    /// (`OCaml`, `GHC`), which makes `can_unwind` true.
    pub stack_walking_runtime: Option<&'static str>,
    /// Whether leaf functions (see [`CodeAnalysis::is_leaf`]) may have
    /// uretprobes although the binary can unwind: nothing unwinds from a
    /// signal handler here (no asynchronous cancellation, no GCC
    /// `-fnon-call-exceptions` in the DWARF producers).
    pub leaf_uretprobes: bool,
    /// Where C++ exceptions and Rust panics can be seen.
    pub runtime: RuntimeHooks,
    /// The link-time address of the lowest executable segment: where a
    /// process maps it (the kernel's `mm->start_code`) minus this is the
    /// process's load bias.
    pub exec_start: u64,
    /// Source lines by address, for the call sites in error stack traces.
    pub sources: Option<std::sync::Arc<SourceIndex>>,
    /// A Go program: its calls are kept per goroutine.
    pub go: Option<GoTarget>,
    /// A Python interpreter: its Python calls are traced (`python.rs`).
    pub python: Option<python::PythonTarget>,
    /// Functions found while tracing (a Python program's code objects), ids
    /// from `functions.len()` on; appended by one thread, read by any.
    pub found: boxcar::Vec<Function>,
}

impl FunctionTable {
    /// A table of `functions` (ids their indices) for `binary`, as if
    /// discovered with DWARF: for tables built by hand.
    pub fn from_functions(binary: impl Into<PathBuf>, functions: Vec<Function>) -> Self {
        Self {
            binary: binary.into(),
            functions,
            skipped: HashMap::new(),
            has_dwarf: true,
            debug_file: None,
            symbols_from_debug_file: false,
            from_symbol_table: false,
            can_unwind: false,
            stack_walking_runtime: None,
            leaf_uretprobes: true,
            runtime: RuntimeHooks::default(),
            exec_start: 0,
            sources: None,
            go: None,
            python: None,
            found: boxcar::Vec::new(),
        }
    }

    /// The function with this id (a probe cookie, or one found while
    /// tracing).
    pub fn get(&self, id: u32) -> Option<&Function> {
        let index = id as usize;
        match index.checked_sub(self.functions.len()) {
            None => self.functions.get(index),
            Some(found) => self.found.get(found),
        }
    }

    /// Adds a function found while tracing; returns its id. Only one
    /// thread may add (the ids are counted before the push).
    pub fn add_found(&self, mut function: Function) -> u32 {
        let id = u32::try_from(self.functions.len() + self.found.count()).unwrap_or(u32::MAX);
        function.id = id;
        self.found.push(function);
        id
    }

    /// Loads `binary` and selects its user functions.
    pub fn discover(binary: &Path, selection: &Selection) -> Result<Self, DiscoveryError> {
        Self::discover_named(binary, binary, selection)
    }

    /// As [`discover`](Self::discover), reading the file at `path` (such as
    /// `/proc/PID/exe`) and naming it `binary` (the path the process ran).
    pub fn discover_named(
        path: &Path,
        binary: &Path,
        selection: &Selection,
    ) -> Result<Self, DiscoveryError> {
        let data = std::fs::read(path).map_err(|source| DiscoveryError::Io {
            path: binary.to_owned(),
            source,
        })?;
        Self::from_bytes(binary, &data, selection)
    }

    /// As [`discover`](Self::discover), on the file's bytes.
    pub fn from_bytes(
        binary: &Path,
        data: &[u8],
        selection: &Selection,
    ) -> Result<Self, DiscoveryError> {
        let file = elf::parse(binary, data)?;
        if let Some(build) = go::recognise(&file) {
            return go_select::discover(binary, &file, build, selection);
        }
        // Without DWARF of its own, the binary's may be in a file apart.
        let (separate, searched) = if elf::has_dwarf(&file) {
            (None, None)
        } else {
            match debuginfo::find(binary, &file, &selection.debug_dirs)? {
                debuginfo::Search::Found(found) => (Some(found), None),
                debuginfo::Search::NotFound(searched) => (None, Some(searched)),
            }
        };
        let debug_elf = separate
            .as_ref()
            .map(|found| elf::parse(&found.file.path, &found.data))
            .transpose()?;
        let binary_has_symbols = file.symbols().next().is_some();
        let symbols_from_debug_file = !binary_has_symbols
            && debug_elf
                .as_ref()
                .is_some_and(|debug| debug.symbols().next().is_some());
        let files = elf::Files {
            code: &file,
            symbols: match &debug_elf {
                Some(debug) if symbols_from_debug_file => debug,
                _ => &file,
            },
        };
        let dwarf_from_debug_file = debug_elf.as_ref().is_some_and(elf::has_dwarf);
        let dwarf_file = match &debug_elf {
            Some(debug) if dwarf_from_debug_file => debug,
            _ => &file,
        };
        let has_dwarf = elf::has_dwarf(dwarf_file);
        if files.symbols.symbols().next().is_none() && !has_dwarf {
            return Err(match separate {
                // The debug file belongs to the binary but holds nothing.
                Some(found) => DiscoveryError::DebugFileUnusable {
                    binary: binary.to_owned(),
                    debug_file: found.file.path,
                    reason: "it has neither DWARF nor a symbol table".into(),
                },
                None => DiscoveryError::Stripped {
                    path: binary.to_owned(),
                    searched: searched.unwrap_or_default(),
                },
            });
        }
        let sources = has_dwarf
            .then(|| dwarf::SourceIndex::load(dwarf_file))
            .transpose()?;
        let filter = NameFilter::new(selection)?;
        let root = normalize(&selection.project_root);
        let stack_walking_runtime = elf::stack_walking_runtime(files);

        let mut table = FunctionTable {
            binary: binary.to_owned(),
            functions: Vec::new(),
            skipped: HashMap::new(),
            has_dwarf,
            debug_file: separate
                .as_ref()
                .filter(|_| dwarf_from_debug_file || symbols_from_debug_file)
                .map(|found| found.file.clone()),
            symbols_from_debug_file,
            from_symbol_table: !has_dwarf,
            can_unwind: elf::can_unwind(files),
            stack_walking_runtime,
            leaf_uretprobes: !elf::can_cancel_asynchronously(files)
                && stack_walking_runtime.is_none()
                && sources
                    .as_ref()
                    .is_some_and(|sources| !sources.compiled_with("-fnon-call-exceptions")),
            runtime: runtime::find(files),
            exec_start: elf::executable_start(&file),
            sources: None,
            go: None,
            python: None,
            found: boxcar::Vec::new(),
        };
        let select = Selector {
            files,
            sources: sources.as_ref(),
            filter: &filter,
            root: &root,
            cold_parts: split_parts(files.symbols),
        };
        select.fill(&mut table, false);
        if table.functions.is_empty() && table.skipped.contains_key(&SkipReason::NoDebugInfo) {
            // DWARF, but none of it for the user's code (a Rust program built
            // without -g keeps std's): take the symbols it does not cover, as
            // for a binary without DWARF.
            let mut fallback = FunctionTable {
                binary: table.binary.clone(),
                functions: Vec::new(),
                skipped: HashMap::new(),
                has_dwarf,
                debug_file: table.debug_file.clone(),
                symbols_from_debug_file,
                from_symbol_table: true,
                can_unwind: table.can_unwind,
                stack_walking_runtime: table.stack_walking_runtime,
                leaf_uretprobes: table.leaf_uretprobes,
                runtime: table.runtime.clone(),
                exec_start: table.exec_start,
                sources: None,
                go: None,
                python: None,
                found: boxcar::Vec::new(),
            };
            select.fill(&mut fallback, true);
            if !fallback.functions.is_empty() {
                table = fallback;
            }
        }
        table.sources = sources.map(std::sync::Arc::new);
        Ok(table)
    }

    /// The source location of a call made `call_offset` bytes after
    /// `fn_id`'s entry probe (a return address): the line of the call.
    pub fn call_site(&self, fn_id: u32, call_offset: u32) -> Option<(PathBuf, Option<u32>)> {
        let function = self.get(fn_id)?;
        let entry = function.code.entry.as_ref()?;
        // A return address follows the call: step back into it.
        let address = entry.address + u64::from(call_offset).checked_sub(1)?;
        // The call may have been made by untraced code (an inlined-out
        // library function) between this frame and the next traced one.
        if !(function.address..function.address + function.size).contains(&address) {
            return None;
        }
        self.sources.as_ref()?.location(address)
    }

    /// Moves every entry probe back to its function's first instruction,
    /// even an `endbr64` the probe was moved past (see `code.rs`): what probe
    /// placement buys is measured against this.
    pub fn probe_entries_at_first_instruction(&mut self) {
        for function in &mut self.functions {
            let Some(entry) = function.code.entry.as_mut() else {
                continue;
            };
            let moved_by = entry.address - function.address;
            if moved_by > 0 {
                entry.address = function.address;
                entry.file_offset -= moved_by;
                entry.mnemonic = "endbr64".into();
                entry.cost = ProbeCost::SingleStepped;
            }
        }
    }

    /// How many function symbols were left out in all.
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }

    /// Where the debug info came from, for `--list`: `DWARF`, `DWARF from
    /// /usr/lib/debug/.build-id/4f/2c….debug (found by build id)`, `none,
    /// symbol table only`, …
    pub fn debug_info_summary(&self) -> String {
        let what = match (self.has_dwarf, self.symbols_from_debug_file) {
            (true, false) => "DWARF",
            (true, true) => "DWARF and symbols",
            (false, _) => "symbols",
        };
        let from = match &self.debug_file {
            None => String::new(),
            Some(debug) => format!(" from {} ({})", debug.path.display(), debug.found_by),
        };
        match (self.has_dwarf, self.from_symbol_table) {
            (_, false) => format!("{what}{from}"),
            (true, true) => format!("{what}{from} for the runtime only, symbol table"),
            (false, true) if self.debug_file.is_some() => {
                format!("none, symbol table only ({what}{from})")
            }
            (false, true) => "none, symbol table only".into(),
        }
    }
}

/// One pass over a binary's function symbols, adding the ones to trace to a
/// table and counting the others.
struct Selector<'a, 'data> {
    files: elf::Files<'a, 'data>,
    sources: Option<&'a dwarf::SourceIndex>,
    filter: &'a NameFilter,
    root: &'a Path,
    cold_parts: HashMap<String, (u64, u64)>,
}

impl Selector<'_, '_> {
    /// With `uncovered_as_symbols`, a symbol DWARF does not cover is taken
    /// as in a binary without DWARF (runtime names left out) instead of
    /// being skipped.
    fn fill(&self, table: &mut FunctionTable, uncovered_as_symbols: bool) {
        let mut seen_addresses = HashSet::new();
        for symbol in self.files.symbols.symbols() {
            if symbol.kind() != SymbolKind::Text || symbol.is_undefined() {
                continue;
            }
            let Ok(raw_name) = symbol.name() else {
                continue;
            };
            if !in_text_section(self.files.symbols, &symbol) {
                continue;
            }
            let skip = |table: &mut FunctionTable, reason| {
                *table.skipped.entry(reason).or_default() += 1;
            };
            if is_split_part(raw_name) {
                skip(table, SkipReason::SplitPart);
                continue;
            }
            if symbol.size() == 0 {
                skip(table, SkipReason::ZeroSize);
                continue;
            }
            let name = demangle(raw_name);
            let (file_path, line) = match self.sources {
                Some(sources) => match sources.location(symbol.address()) {
                    Some((path, line)) => (Some(normalize(&path)), line),
                    None if uncovered_as_symbols => (None, None),
                    None => {
                        skip(table, SkipReason::NoDebugInfo);
                        continue;
                    }
                },
                None => (None, None),
            };
            match &file_path {
                Some(path) if !path.starts_with(self.root) => {
                    skip(table, SkipReason::OutsideProjectRoot);
                    continue;
                }
                None if names::is_runtime(raw_name, &name) => {
                    skip(table, SkipReason::Runtime);
                    continue;
                }
                _ => {}
            }
            if !self.filter.keeps(&name) {
                skip(table, SkipReason::Filtered);
                continue;
            }
            if !seen_addresses.insert(symbol.address()) {
                skip(table, SkipReason::Alias);
                continue;
            }
            let mut ranges = Vec::new();
            ranges.extend(
                elf::code_at(self.files.code, symbol.address(), symbol.size()).map(|bytes| {
                    code::CodeRange {
                        address: symbol.address(),
                        bytes,
                    }
                }),
            );
            if ranges.is_empty() {
                skip(table, SkipReason::Undecodable);
                continue;
            }
            if let Some(&(address, size)) = self.cold_parts.get(raw_name) {
                ranges.extend(
                    elf::code_at(self.files.code, address, size)
                        .map(|bytes| code::CodeRange { address, bytes }),
                );
            }
            let analysis = match analyze_with_offsets(self.files.code, &ranges) {
                Ok(analysis) => analysis,
                Err(reason) => {
                    if reason == SkipReason::Unprobeable {
                        tracing::debug!("not tracing {name}: {reason}");
                    }
                    skip(table, reason);
                    continue;
                }
            };
            table.functions.push(Function {
                id: table.functions.len() as u32,
                name,
                symbol: raw_name.to_owned(),
                file: file_path,
                line,
                address: symbol.address(),
                size: symbol.size(),
                code: analysis,
                runs_python: false,
                python_module: None,
            });
        }
    }
}

/// Decodes a function and fills in the file offset of each probe site.
fn analyze_with_offsets(
    file: &object::File<'_>,
    ranges: &[code::CodeRange<'_>],
) -> Result<CodeAnalysis, SkipReason> {
    let mut analysis = code::analyze(ranges);
    if analysis.unprobeable_entry.is_some() {
        return Err(SkipReason::Unprobeable);
    }
    let offset = |address| elf::file_offset(file, address).ok_or(SkipReason::Undecodable);
    let entry = analysis.entry.as_mut().ok_or(SkipReason::Undecodable)?;
    entry.file_offset = offset(entry.address)?;
    for exit in &mut analysis.exits {
        exit.site.file_offset = offset(exit.site.address)?;
    }
    Ok(analysis)
}

/// `--include`/`--exclude`: which names are kept.
#[derive(Clone, Debug)]
pub struct NameFilter {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl NameFilter {
    pub fn new(selection: &Selection) -> Result<Self, DiscoveryError> {
        let build = |patterns: &[String]| -> Result<GlobSet, DiscoveryError> {
            let mut builder = GlobSetBuilder::new();
            for pattern in patterns {
                let glob = Glob::new(pattern).map_err(|source| DiscoveryError::BadPattern {
                    pattern: pattern.clone(),
                    source,
                })?;
                builder.add(glob);
            }
            builder
                .build()
                .map_err(|source| DiscoveryError::BadPattern {
                    pattern: patterns.join(" "),
                    source,
                })
        };
        Ok(Self {
            include: (!selection.include.is_empty())
                .then(|| build(&selection.include))
                .transpose()?,
            exclude: build(&selection.exclude)?,
        })
    }

    pub fn keeps(&self, name: &str) -> bool {
        self.include.as_ref().is_none_or(|set| set.is_match(name)) && !self.exclude.is_match(name)
    }
}

/// GCC moves unlikely code out of a function into a `name.cold` symbol.
fn is_split_part(symbol: &str) -> bool {
    symbol.contains(".cold")
}

/// `foo` → address and size of `foo.cold`.
fn split_parts(file: &object::File<'_>) -> HashMap<String, (u64, u64)> {
    file.symbols()
        .filter(|symbol| symbol.kind() == SymbolKind::Text)
        .filter_map(|symbol| {
            let name = symbol.name().ok()?;
            let (parent, _) = name.split_once(".cold")?;
            Some((parent.to_owned(), (symbol.address(), symbol.size())))
        })
        .collect()
}

fn in_text_section(file: &object::File<'_>, symbol: &object::Symbol<'_, '_>) -> bool {
    let Some(index) = symbol.section_index() else {
        return false;
    };
    file.section_by_index(index)
        .ok()
        .and_then(|section| section.name().ok().map(|name| name.starts_with(".text")))
        .unwrap_or(false)
}

/// Removes `.` and `..` components without touching the file system (the
/// paths come from another machine's build as often as from this one).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_removes_dot_components() {
        assert_eq!(
            normalize(Path::new("/app/./src/../lib/a.c")),
            Path::new("/app/lib/a.c")
        );
    }

    #[test]
    fn project_root_matches_whole_components() {
        assert!(normalize(Path::new("/app/src/a.c")).starts_with("/app"));
        assert!(!normalize(Path::new("/application/a.c")).starts_with("/app"));
    }

    #[test]
    fn name_filter() {
        let filter = NameFilter::new(&Selection {
            project_root: "/".into(),
            include: vec!["fixture::*".into()],
            exclude: vec!["*::helper".into()],
            debug_dirs: vec![],
        })
        .unwrap();
        assert!(filter.keeps("fixture::compute"));
        assert!(!filter.keeps("fixture::helper"));
        assert!(!filter.keeps("other::compute"));
    }

    #[test]
    fn bad_glob_is_an_error() {
        let error = NameFilter::new(&Selection {
            project_root: "/".into(),
            include: vec!["a[".into()],
            exclude: vec![],
            debug_dirs: vec![],
        })
        .err()
        .unwrap();
        assert!(error.to_string().contains("a["));
    }

    #[test]
    fn not_elf_is_rejected() {
        let error =
            FunctionTable::from_bytes(Path::new("x.sh"), b"#!/bin/sh\necho hi\n", &selection("/"))
                .unwrap_err();
        assert!(matches!(error, DiscoveryError::NotElf(_)), "{error}");
    }

    pub(crate) fn selection(root: &str) -> Selection {
        Selection {
            project_root: root.into(),
            include: vec![],
            exclude: vec![],
            debug_dirs: vec![],
        }
    }
}
