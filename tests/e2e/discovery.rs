//! Discovery on the fixture executables: which functions are found, with
//! which names, files and lines, where their probes go in the file, and what
//! is left out. Calls the agent's library directly; needs no privileges.
//! The tests of separate debug info (at the end) also run the agent on the
//! stripped builds, as root like the other end-to-end tests.
//!
//! Facts about the executables are read independently of the agent where it
//! matters: program headers parsed by hand for file offsets, `objdump` for
//! the instructions a function returns or jumps away by, `readelf` for build
//! ids.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
};

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use omegi_agent::discovery::{
    DiscoveryError, ExitKind, FoundBy, Function, FunctionTable, ProbeCost, ProbeSite, Selection,
    SkipReason,
};
use omegi_tests::{
    fixtures::{self, line_of, Linking},
    run::{self, refused, Agent},
    spans::{parse_lines, traces},
};

const BOTH: [Linking; 2] = [Linking::Pie, Linking::NoPie];

fn selection(root: PathBuf) -> Selection {
    Selection {
        project_root: root,
        include: vec![],
        exclude: vec![],
        debug_dirs: vec![],
    }
}

fn discover(file: &str, linking: Linking) -> FunctionTable {
    let exe = fixtures::build(file, linking);
    FunctionTable::discover(&exe, &selection(fixtures::sources_dir()))
        .unwrap_or_else(|e| panic!("{file} {linking:?}: {e}"))
}

fn names(table: &FunctionTable) -> Vec<String> {
    let mut names: Vec<String> = table.functions.iter().map(|f| f.name.clone()).collect();
    names.sort();
    names
}

fn function<'a>(table: &'a FunctionTable, name: &str) -> &'a Function {
    let mut found = table.functions.iter().filter(|f| f.name == name);
    let function = found
        .next()
        .unwrap_or_else(|| panic!("{name} not found in {:?}", names(table)));
    assert!(found.next().is_none(), "{name} found twice");
    function
}

fn skipped(table: &FunctionTable, reason: SkipReason) -> usize {
    table.skipped.get(&reason).copied().unwrap_or(0)
}

/// Checks each function's file and line against the line of its definition
/// in the source (`needle` is text found only on that line).
fn check_locations(table: &FunctionTable, source: &str, definitions: &[(&str, &str)]) {
    let file = fixtures::sources_dir().join(source);
    for function in &table.functions {
        assert_eq!(
            function.file.as_deref(),
            Some(file.as_path()),
            "{}",
            function.name
        );
    }
    for (name, needle) in definitions {
        let function = function(table, name);
        assert_eq!(
            function.line,
            Some(line_of(source, needle)),
            "{name} in {}",
            table.binary.display()
        );
    }
}

#[test]
fn c_functions_are_found_with_file_and_line() {
    for linking in BOTH {
        let table = discover("c/calls.c", linking);
        assert!(table.has_dwarf);
        assert!(!table.can_unwind, "plain C has no unwinder");
        assert_eq!(names(&table), ["compute", "fib", "leaf", "main", "worker"]);
        check_locations(
            &table,
            "c/calls.c",
            &[
                ("leaf", "int leaf(int x)"),
                ("fib", "int fib(int n)"),
                ("compute", "int compute(int n)"),
                ("worker", "void *worker(void *arg)"),
                ("main", "int main(void)"),
            ],
        );
        for function in &table.functions {
            // gcc -O0 starts every function with `push rbp`: the emulated
            // instruction the entry probe goes on, at the first byte.
            let entry = function.code.entry.as_ref().unwrap();
            assert_eq!(entry.address, function.address, "{}", function.name);
            assert_eq!(entry.mnemonic, "push");
            assert_eq!(entry.cost, ProbeCost::Emulated);
            assert!(function.code.exits_complete(), "{}", function.name);
            assert_eq!(function.code.exits.len(), 1, "{}", function.name);
            assert_eq!(function.code.exits[0].kind, ExitKind::Return);
        }
    }
}

#[test]
fn rust_names_are_demangled_without_their_hash() {
    for linking in BOTH {
        let table = discover("rust/panics.rs", linking);
        assert!(table.has_dwarf);
        assert!(table.can_unwind, "Rust panics unwind");
        assert_eq!(
            names(&table),
            [
                "panics::Ledger::add",
                "panics::depth",
                "panics::handle",
                "panics::handle::{{closure}}",
                "panics::main",
                "panics::main::{{closure}}",
                "panics::quiet_hook",
                "panics::report",
                "panics::validate",
            ]
        );
        for function in &table.functions {
            // Legacy mangling: `_ZN6panics8validate17h<16 hex>E`; the name
            // keeps the path and drops the hash.
            assert!(
                function.symbol.starts_with("_ZN6panics"),
                "{}",
                function.symbol
            );
            let hash = function.symbol.rsplit("17h").next().unwrap();
            assert_eq!(hash.len(), 17, "{}", function.symbol);
            assert!(!function.name.contains(&hash[..16]), "{}", function.name);
        }
        check_locations(
            &table,
            "rust/panics.rs",
            &[
                ("panics::Ledger::add", "fn add("),
                ("panics::validate", "fn validate("),
                ("panics::depth", "fn depth("),
                ("panics::report", "fn report("),
                ("panics::handle", "fn handle("),
                ("panics::quiet_hook", "fn quiet_hook("),
                ("panics::main", "fn main("),
                (
                    "panics::handle::{{closure}}",
                    "catch_unwind(AssertUnwindSafe(||",
                ),
                ("panics::main::{{closure}}", "thread::spawn(||"),
            ],
        );
        // std's generic code instantiated in this crate has std's source
        // paths: outside the project root.
        assert!(skipped(&table, SkipReason::OutsideProjectRoot) > 50);
    }
}

#[test]
fn cpp_names_are_demangled() {
    for linking in BOTH {
        let table = discover("cpp/exceptions.cpp", linking);
        assert!(table.can_unwind, "C++ exceptions unwind");
        assert_eq!(
            names(&table),
            [
                "main",
                "main::{lambda()#1}::operator() const",
                "shop::Checker::Checker",
                "shop::Checker::check",
                "shop::Rejected::Rejected",
                // The complete-object and the deleting destructor.
                "shop::Rejected::~Rejected",
                "shop::Rejected::~Rejected",
                "shop::depth",
                "shop::handle",
                "shop::price",
                "shop::report",
                "shop::twice<int>",
                "shop::validate",
            ]
        );
        let destructors: BTreeSet<&str> = table
            .functions
            .iter()
            .filter(|f| f.name == "shop::Rejected::~Rejected")
            .map(|f| f.symbol.as_str())
            .collect();
        assert!(
            destructors.contains("_ZN4shop8RejectedD0Ev"),
            "{destructors:?}"
        );
        check_locations(
            &table,
            "cpp/exceptions.cpp",
            &[
                ("shop::Checker::Checker", "explicit Checker(int limit)"),
                ("shop::Checker::check", "int check(int amount) const"),
                ("shop::Rejected::Rejected", "explicit Rejected(int amount)"),
                ("shop::validate", "int validate("),
                ("shop::price", "int price("),
                ("shop::report", "void report("),
                ("shop::handle", "int handle("),
                ("shop::twice<int>", "T twice(T x)"),
                ("shop::depth", "int depth(int n)"),
                ("main", "int main()"),
            ],
        );
        // Constructors and destructors are emitted under two symbols at one
        // address (C1/C2, D1/D2): traced once.
        assert!(skipped(&table, SkipReason::Alias) >= 2);
        // libstdc++'s inline and template code comes from its headers.
        assert!(skipped(&table, SkipReason::OutsideProjectRoot) > 0);
    }
}

/// The defined function symbols in `.text` sections (name, size), read with
/// `object` from the file: what discovery looks at.
fn text_symbols(exe: &Path) -> Vec<(String, u64)> {
    let data = std::fs::read(exe).unwrap();
    let file = object::File::parse(&*data).unwrap();
    file.symbols()
        .filter(|symbol| symbol.kind() == SymbolKind::Text && !symbol.is_undefined())
        .filter(|symbol| {
            symbol
                .section_index()
                .and_then(|index| file.section_by_index(index).ok())
                .and_then(|section| section.name().ok().map(|n| n.starts_with(".text")))
                .unwrap_or(false)
        })
        .map(|symbol| (symbol.name().unwrap().to_owned(), symbol.size()))
        .collect()
}

fn zero_size_symbols(exe: &Path) -> BTreeSet<String> {
    text_symbols(exe)
        .into_iter()
        .filter(|(_, size)| *size == 0)
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn zero_size_and_out_of_root_functions_are_skipped() {
    for linking in BOTH {
        let exe = fixtures::build("c/calls.c", linking);
        let table = discover("c/calls.c", linking);
        // The C runtime's `frame_dummy` and friends are labels without a
        // size: nothing to probe.
        let zero = zero_size_symbols(&exe);
        assert!(zero.contains("frame_dummy"), "{zero:?}");
        assert_eq!(skipped(&table, SkipReason::ZeroSize), zero.len());
        for function in &table.functions {
            assert!(function.size > 0);
            assert!(!zero.contains(&function.symbol));
        }

        // The same binary with a project root its sources are not under.
        let elsewhere =
            FunctionTable::discover(&exe, &selection(fixtures::sources_dir().join("rust")))
                .unwrap();
        assert!(elsewhere.functions.is_empty());
        assert_eq!(skipped(&elsewhere, SkipReason::OutsideProjectRoot), 5);
        assert_eq!(elsewhere.skipped_total(), table.skipped_total() + 5);

        // A root is a directory, not a prefix of a name: tests/fixtures/c
        // holds calls.c, tests/fixtures/cpp does not.
        let c =
            FunctionTable::discover(&exe, &selection(fixtures::sources_dir().join("c"))).unwrap();
        assert_eq!(c.functions.len(), 5);
        let cpp =
            FunctionTable::discover(&exe, &selection(fixtures::sources_dir().join("cpp"))).unwrap();
        assert!(cpp.functions.is_empty());
    }

    // In Rust, std is outside the root: none of it is traced.
    for linking in BOTH {
        let table = discover("rust/panics.rs", linking);
        for function in &table.functions {
            for prefix in ["std::", "core::", "alloc::", "<", "__rust"] {
                assert!(!function.name.starts_with(prefix), "{}", function.name);
            }
        }
    }
}

/// `PT_LOAD` segments (vaddr, file offset, file size) and `e_type`, parsed by
/// hand from the ELF header.
fn load_segments(exe: &Path) -> (u16, Vec<(u64, u64, u64)>) {
    let data = std::fs::read(exe).unwrap();
    let u16_at = |at: usize| u16::from_le_bytes(data[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
    assert_eq!(&data[..5], b"\x7fELF\x02", "64-bit ELF");
    let e_type = u16_at(16);
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
    let segments = (0..phnum as usize)
        .map(|index| phoff + index * phentsize)
        .filter(|&header| u32_at(header) == 1) // PT_LOAD
        .map(|header| (u64_at(header + 16), u64_at(header + 8), u64_at(header + 32)))
        .collect();
    (e_type, segments)
}

fn expected_offset(segments: &[(u64, u64, u64)], address: u64) -> u64 {
    let (vaddr, offset, _) = segments
        .iter()
        .find(|(vaddr, _, size)| address >= *vaddr && address < vaddr + size)
        .unwrap_or_else(|| panic!("{address:#x} is in no loaded segment"));
    address - vaddr + offset
}

/// Every probe site's file offset is its address minus its segment's vaddr
/// plus the segment's offset, and the file holds the instruction named there.
#[test]
fn probe_file_offsets_pie_and_nopie() {
    for file in [
        "c/calls.c",
        "c/exits.c",
        "cpp/exceptions.cpp",
        "rust/panics.rs",
    ] {
        for linking in BOTH {
            let exe = fixtures::build(file, linking);
            let data = std::fs::read(&exe).unwrap();
            let (e_type, segments) = load_segments(&exe);
            // ET_DYN for PIE, ET_EXEC for fixed addresses.
            let expected_type = if linking == Linking::Pie { 3 } else { 2 };
            assert_eq!(e_type, expected_type, "{file} {linking:?}");
            let table = discover(file, linking);
            assert!(!table.functions.is_empty());
            let mut moved = false;
            for function in &table.functions {
                let entry = function.code.entry.as_ref().unwrap();
                let sites =
                    std::iter::once(entry).chain(function.code.exits.iter().map(|exit| &exit.site));
                for site in sites {
                    assert!(
                        site.address >= function.address
                            && site.address < function.address + function.size,
                        "{} {site:?}",
                        function.name
                    );
                    assert_eq!(
                        site.file_offset,
                        expected_offset(&segments, site.address),
                        "{file} {linking:?} {} {site:?}",
                        function.name
                    );
                    moved |= site.file_offset != site.address;
                    check_instruction_in_file(&data, site, &function.name);
                }
            }
            // gcc's PIE output maps its code at vaddr == offset; fixed
            // addresses and rustc's PIE output do not: there the conversion
            // matters for every probe.
            if linking == Linking::NoPie || file.ends_with(".rs") {
                assert!(moved, "{file} {linking:?}: address and offset equal");
            }
        }
    }
    // rustc's PIE output is the case where a function's address and file
    // offset differ even though the executable's base address is 0.
    let table = discover("rust/panics.rs", Linking::Pie);
    let validate = function(&table, "panics::validate");
    assert_ne!(
        validate.code.entry.as_ref().unwrap().file_offset,
        validate.address
    );
}

/// The first byte(s) in the file at the site's offset are the instruction the
/// site names.
fn check_instruction_in_file(data: &[u8], site: &ProbeSite, function: &str) {
    let bytes = &data[site.file_offset as usize..];
    let matches = match site.mnemonic.as_str() {
        // push rax..rdi / push r8..r15
        "push" => {
            (0x50..=0x57).contains(&bytes[0])
                || (bytes[0] == 0x41 && (0x50..=0x57).contains(&bytes[1]))
        }
        "ret" => bytes[0] == 0xc3 || bytes[..2] == [0xf3, 0xc3],
        "jmp" => bytes[0] == 0xe9 || bytes[0] == 0xeb,
        "endbr64" => bytes[..4] == [0xf3, 0x0f, 0x1e, 0xfa],
        _ => true,
    };
    assert!(
        matches,
        "{function}: {} at file offset {:#x} but the file has {:02x?}",
        site.mnemonic,
        site.file_offset,
        &bytes[..4]
    );
}

/// Instructions of each function, from `objdump -d`: name → (address, text).
fn disassemble(exe: &Path) -> HashMap<String, Vec<(u64, String)>> {
    let output = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "intel"])
        .arg(exe)
        .output()
        .expect("objdump (binutils) is installed");
    assert!(output.status.success());
    let mut functions: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    let mut current = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Some(name) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")) {
            current = Some(name.1.to_owned());
            continue;
        }
        let Some(name) = &current else { continue };
        let Some((address, text)) = line.trim_start().split_once(":\t") else {
            continue;
        };
        let Ok(address) = u64::from_str_radix(address, 16) else {
            continue;
        };
        functions
            .entry(name.clone())
            .or_default()
            .push((address, text.trim().to_owned()));
    }
    functions
}

fn exits_of(function: &Function, kind: ExitKind) -> Vec<u64> {
    function
        .code
        .exits
        .iter()
        .filter(|exit| exit.kind == kind)
        .map(|exit| exit.site.address)
        .collect()
}

/// The return sites found by decoding are the `ret`s and tail `jmp`s that
/// objdump shows in the -O2 fixture.
#[test]
fn return_sites_are_found() {
    for linking in BOTH {
        let exe = fixtures::build("c/exits.c", linking);
        let table = discover("c/exits.c", linking);
        let code = disassemble(&exe);
        let at = |name: &str, prefix: &str| -> Vec<u64> {
            code[name]
                .iter()
                .filter(|(_, text)| text.starts_with(prefix))
                .map(|(address, _)| *address)
                .collect()
        };

        let classify = function(&table, "classify");
        let rets = at("classify", "ret");
        assert_eq!(
            rets.len(),
            2,
            "classify has two rets: {:?}",
            code["classify"]
        );
        assert_eq!(exits_of(classify, ExitKind::Return), rets);
        assert!(exits_of(classify, ExitKind::TailJump).is_empty());
        assert!(classify.code.exits_complete());

        let step = function(&table, "step");
        let tail = at("step", "jmp");
        assert_eq!(tail.len(), 1, "{:?}", code["step"]);
        assert!(code["step"]
            .iter()
            .any(|(_, text)| text.ends_with("<finish>")));
        assert_eq!(exits_of(step, ExitKind::TailJump), tail);
        assert!(exits_of(step, ExitKind::Return).is_empty());
        assert!(step.code.exits_complete());

        // `jmp rax`: no exit site, counted, and the function marked as one
        // whose frames may be closed by stack pointer.
        let dispatch = function(&table, "dispatch");
        assert!(dispatch.code.exits.is_empty());
        assert_eq!(dispatch.code.indirect_jumps, 1);
        assert!(!dispatch.code.exits_complete());

        for name in ["finish", "run", "main"] {
            let f = function(&table, name);
            assert_eq!(exits_of(f, ExitKind::Return), at(name, "ret"), "{name}");
            assert!(f.code.exits_complete());
        }
    }
}

/// Without DWARF, the symbol table: the user's functions, no file or line,
/// the C runtime's start-up code left out.
#[test]
fn without_dwarf_the_symbol_table_is_used() {
    for linking in BOTH {
        let exe = fixtures::build("c/nodwarf.c", linking);
        let table = discover("c/nodwarf.c", linking);
        assert!(!table.has_dwarf);
        assert_eq!(names(&table), ["inner", "main", "outer"]);
        for function in &table.functions {
            assert_eq!(function.file, None);
            assert_eq!(function.line, None);
        }
        // `_start` has a size and code, and is not the user's.
        let data = std::fs::read(&exe).unwrap();
        let file = object::File::parse(&*data).unwrap();
        assert!(file
            .symbols()
            .any(|s| s.name() == Ok("_start") && s.size() > 0));
        assert!(skipped(&table, SkipReason::Runtime) >= 1);
        assert_eq!(skipped(&table, SkipReason::NoDebugInfo), 0);
        assert_eq!(skipped(&table, SkipReason::OutsideProjectRoot), 0);
        // The project root cannot apply: any root gives the same functions.
        let anywhere = FunctionTable::discover(&exe, &selection("/nowhere".into())).unwrap();
        assert_eq!(names(&anywhere), names(&table));
    }
}

/// The skip reasons a table reports add up to the function symbols it did
/// not take, for every fixture.
#[test]
fn every_function_symbol_is_traced_or_counted() {
    for file in [
        "c/calls.c",
        "c/exits.c",
        "c/nodwarf.c",
        "cpp/exceptions.cpp",
        "rust/panics.rs",
    ] {
        for linking in BOTH {
            let exe = fixtures::build(file, linking);
            let table = discover(file, linking);
            let count = text_symbols(&exe).len();
            assert_eq!(
                table.functions.len() + table.skipped_total(),
                count,
                "{file} {linking:?}: {:?}",
                table.skipped
            );
        }
    }
}

// --- separate debug info ------------------------------------------------

/// How a shipped binary is stripped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strip {
    /// `strip --strip-all`: no symbol table either (symbols come from the
    /// debug file too).
    All,
    /// `strip --strip-debug`: the symbol table stays in the binary.
    Debug,
}

/// How to ship a fixture.
#[derive(Clone, Copy, Debug)]
struct Shipping {
    strip: Strip,
    /// `objcopy --add-gnu-debuglink` to the debug file.
    debuglink: bool,
    /// `objcopy --only-keep-debug --compress-debug-sections` (as Debian's
    /// dh_strip makes `-dbgsym` files).
    compress: bool,
    /// Another optimization level, for a different build of the same source.
    other_build: bool,
}

const STRIPPED_WITH_LINK: Shipping = Shipping {
    strip: Strip::All,
    debuglink: true,
    compress: false,
    other_build: false,
};

/// A fixture built the way programs ship: `-O2 -g` (`opt-level=3` and `-g`
/// for Rust), its DWARF copied out with `objcopy --only-keep-debug`, the
/// binary stripped and, when asked, given a `.gnu_debuglink` to the debug
/// file.
struct Shipped {
    /// The fixture source, relative to `tests/fixtures`.
    source: &'static str,
    /// The scratch directory everything is in (no symlinks, no `..`).
    dir: PathBuf,
    /// The stripped executable, `DIR/bin/NAME`.
    exe: PathBuf,
    /// The same build before stripping.
    unstripped: PathBuf,
    /// The debug file, `DIR/keep/NAME.debug`: in none of the places
    /// searched until a test puts a copy there.
    debug: PathBuf,
}

impl Shipped {
    fn build(source: &'static str, how: Shipping) -> Self {
        let dir = omegi_tests::scratch_dir("shipped").canonicalize().unwrap();
        let stem = Path::new(source).file_stem().unwrap().to_str().unwrap();
        for sub in ["bin", "keep", "unstripped"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let exe = dir.join("bin").join(stem);
        let unstripped = dir.join("unstripped").join(stem);
        let debug = dir.join("keep").join(format!("{stem}.debug"));
        let path = fixtures::sources_dir().join(source);
        let mut compile = match Path::new(source).extension().unwrap().to_str().unwrap() {
            "c" | "cpp" => {
                let mut cmd = Command::new(if source.ends_with(".c") { "gcc" } else { "g++" });
                cmd.args(["-O2", "-g", "-pthread"]);
                if how.other_build {
                    cmd.arg("-O1");
                }
                cmd
            }
            "rs" => {
                let mut cmd = Command::new("rustc");
                cmd.args(["--edition", "2021", "-g", "-C"]);
                cmd.arg(if how.other_build {
                    "opt-level=2"
                } else {
                    "opt-level=3"
                });
                cmd
            }
            other => panic!("no shipping for .{other}"),
        };
        tool(compile.arg(&path).arg("-o").arg(&exe));
        std::fs::copy(&exe, &unstripped).unwrap();
        let mut keep = Command::new("objcopy");
        keep.arg("--only-keep-debug");
        if how.compress {
            keep.arg("--compress-debug-sections=zlib");
        }
        tool(keep.arg(&exe).arg(&debug));
        tool(
            Command::new("strip")
                .arg(match how.strip {
                    Strip::All => "--strip-all",
                    Strip::Debug => "--strip-debug",
                })
                .arg(&exe),
        );
        if how.debuglink {
            tool(
                Command::new("objcopy")
                    .arg(format!("--add-gnu-debuglink={}", debug.display()))
                    .arg(&exe),
            );
        }
        Self {
            source,
            dir,
            exe,
            unstripped,
            debug,
        }
    }

    /// The debug file's name, as the debug link has it.
    fn debug_name(&self) -> String {
        self.debug.file_name().unwrap().to_str().unwrap().to_owned()
    }

    /// The directory of the executable.
    fn bin_dir(&self) -> PathBuf {
        self.exe.parent().unwrap().to_owned()
    }

    /// Copies `file` to `place` (making its directories) and returns `place`.
    fn put(&self, file: &Path, place: PathBuf) -> PathBuf {
        std::fs::create_dir_all(place.parent().unwrap()).unwrap();
        std::fs::copy(file, &place).unwrap();
        place
    }

    /// A new empty directory under the scratch directory.
    fn new_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `DIR/.build-id/xx/rest.debug` for this executable's build id.
    fn build_id_path(&self, dir: &Path) -> PathBuf {
        let id = build_id(&self.exe);
        dir.join(".build-id")
            .join(&id[..2])
            .join(format!("{}.debug", &id[2..]))
    }
}

/// Runs a build tool, which must succeed.
fn tool(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The build id of `file` in hex, as `readelf -n` prints it.
fn build_id(file: &Path) -> String {
    let output = Command::new("readelf")
        .arg("-n")
        .arg(file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in {}:\n{text}", file.display()))
        .to_owned()
}

fn discover_with(exe: &Path, debug_dirs: &[PathBuf]) -> Result<FunctionTable, DiscoveryError> {
    let mut selection = selection(fixtures::sources_dir());
    selection.debug_dirs = debug_dirs.to_vec();
    FunctionTable::discover(exe, &selection)
}

/// The function names of each shipped fixture, and the text on the line
/// that defines each.
fn shipped_definitions(source: &str) -> &'static [(&'static str, &'static str)] {
    match source {
        "c/shipped.c" => &[
            ("main", "int main(void)"),
            ("price", "int price(int item)"),
            ("total", "int total(int count)"),
        ],
        "cpp/shipped.cpp" => &[
            ("main", "int main()"),
            ("shop::Cart::weight", "int Cart::weight() const {"),
            ("shop::check", "int check(int amount)"),
            ("shop::handle", "int handle(int amount)"),
        ],
        "rust/shipped.rs" => &[
            ("shipped::Order::weight", "fn weight("),
            ("shipped::main", "fn main("),
            ("shipped::price", "fn price("),
            ("shipped::total", "fn total("),
        ],
        other => panic!("{other} is not shipped"),
    }
}

/// Discovery on a stripped binary with its debug file found gives the same
/// table as on the build before stripping: the same functions at the same
/// addresses with the same files and lines and probe sites, the same
/// runtime hooks (found by name in the debug file's symbol table when the
/// binary has none, at the binary's file offsets) and the same unwinding
/// facts. Without the debug file, the stripped binary is refused (or, with
/// its symbol table left, traced from it without lines).
#[test]
fn a_stripped_binary_with_its_debug_file_is_discovered_as_if_unstripped() {
    for source in ["c/shipped.c", "cpp/shipped.cpp", "rust/shipped.rs"] {
        for strip in [Strip::All, Strip::Debug] {
            let shipped = Shipped::build(
                source,
                Shipping {
                    strip,
                    ..STRIPPED_WITH_LINK
                },
            );
            let context = format!("{source} {strip:?}");
            let reference = discover_with(&shipped.unstripped, &[]).unwrap();
            assert!(reference.debug_file.is_none(), "{context}");
            let definitions = shipped_definitions(source);
            let mut expected: Vec<&str> = definitions.iter().map(|(name, _)| *name).collect();
            expected.sort();
            assert_eq!(names(&reference), expected, "{context}");
            for (name, needle) in definitions {
                // -O2 code starts on the definition or a line of the body.
                let line = function(&reference, name).line.unwrap();
                let defined = line_of(source, needle);
                assert!(
                    (defined..defined + 4).contains(&line),
                    "{context}: {name} at {line}"
                );
            }

            // Not found yet.
            match (strip, discover_with(&shipped.exe, &[])) {
                (Strip::All, Err(DiscoveryError::Stripped { searched, .. })) => {
                    assert!(searched
                        .paths
                        .contains(&shipped.bin_dir().join(shipped.debug_name())));
                }
                (Strip::Debug, Ok(table)) => {
                    assert!(table.from_symbol_table, "{context}");
                    assert!(
                        table.functions.iter().all(|f| f.line.is_none()),
                        "{context}"
                    );
                }
                (_, other) => panic!("{context}: {other:?}"),
            }

            let placed = shipped.put(&shipped.debug, shipped.bin_dir().join(shipped.debug_name()));
            let table = discover_with(&shipped.exe, &[]).unwrap();
            let debug_file = table.debug_file.as_ref().expect("the debug file is used");
            assert_eq!(debug_file.path, placed, "{context}");
            assert_eq!(debug_file.found_by, FoundBy::DebugLink, "{context}");
            assert_eq!(
                table.symbols_from_debug_file,
                strip == Strip::All,
                "{context}"
            );
            assert!(table.has_dwarf && !table.from_symbol_table, "{context}");

            let describe = |f: &Function| {
                (
                    f.name.clone(),
                    f.symbol.clone(),
                    f.file.clone(),
                    f.line,
                    f.address,
                    f.size,
                    f.code.clone(),
                )
            };
            assert_eq!(
                table.functions.iter().map(describe).collect::<Vec<_>>(),
                reference.functions.iter().map(describe).collect::<Vec<_>>(),
                "{context}"
            );
            assert_eq!(table.skipped, reference.skipped, "{context}");
            assert_eq!(table.runtime, reference.runtime, "{context}");
            assert_eq!(table.can_unwind, reference.can_unwind, "{context}");
            assert_eq!(
                table.leaf_uretprobes, reference.leaf_uretprobes,
                "{context}"
            );
            assert_eq!(table.exec_start, reference.exec_start, "{context}");
            // What the comparison covers: the runtimes' hooks are there.
            match source {
                "cpp/shipped.cpp" => assert!(table.runtime.cxx_throw.is_some() && table.can_unwind),
                "rust/shipped.rs" => {
                    assert!(
                        table.runtime.rust_panic.is_some(),
                        "{context}: {:?}",
                        table.runtime
                    );
                    assert!(!table.runtime.rust_panic_catch.is_empty());
                    assert!(table.can_unwind);
                }
                _ => assert!(!table.can_unwind),
            }
        }
    }
}

/// Runs the stripped executable under the agent and checks that the program
/// did what it does untraced, and that every span names the fixture's
/// source file and the line its function has in the unstripped build.
/// Returns the traces' shapes.
fn traced_with_lines(shipped: &Shipped, extra: &[&str]) -> Vec<String> {
    let agent = Agent::new(env!("CARGO_BIN_EXE_omegi-agent"));
    let traced = agent.trace(&shipped.exe, &[] as &[&str], extra);
    check_traced(
        shipped,
        traced.status,
        &traced.stdout,
        &traced.stderr,
        &traced.spans,
    )
}

fn check_traced(
    shipped: &Shipped,
    status: std::process::ExitStatus,
    stdout: &str,
    stderr: &str,
    spans: &[omegi_tests::spans::SpanRecord],
) -> Vec<String> {
    let plain = run::untraced(&shipped.exe, &[] as &[&str]);
    assert_eq!(status.code(), plain.status.code(), "{stderr}");
    assert_eq!(stdout, String::from_utf8_lossy(&plain.stdout), "{stderr}");
    let reference = discover_with(&shipped.unstripped, &[]).unwrap();
    let file = fixtures::sources_dir().join(shipped.source);
    assert!(!spans.is_empty(), "no spans: {stderr}");
    for span in spans {
        assert_eq!(
            span.attr("code.filepath").as_deref(),
            Some(file.to_str().unwrap()),
            "{}: {stderr}",
            span.name
        );
        let line: u32 = span
            .attr("code.lineno")
            .unwrap_or_else(|| panic!("{} has no line", span.name))
            .parse()
            .unwrap();
        assert_eq!(
            Some(line),
            function(&reference, &span.name).line,
            "{}",
            span.name
        );
    }
    traces(spans)
        .iter()
        .map(|trace| {
            trace.check_well_formed();
            trace.shape_with_ends()
        })
        .collect()
}

/// `--list`'s first line, for the stripped executable with `extra`.
fn list_summary(shipped: &Shipped, extra: &[&str]) -> String {
    let (status, stdout, stderr) =
        Agent::new(env!("CARGO_BIN_EXE_omegi-agent")).list(&shipped.exe, extra);
    assert_eq!(status.code(), Some(0), "{stderr}");
    stdout.lines().next().unwrap_or_default().to_owned()
}

/// The agent's command for the stripped executable, with `extra`.
fn agent_command(shipped: &Shipped, extra: &[&str]) -> Command {
    let agent = Agent::new(env!("CARGO_BIN_EXE_omegi-agent"));
    let mut command = agent.command(extra, &shipped.dir.join("spans.jsonl"));
    command.arg("--").arg(&shipped.exe);
    command
}

/// The one-line refusal of a stripped binary whose debug file is nowhere.
fn not_found(exe: &Path, looked_at: &[PathBuf]) -> String {
    let looked_at: Vec<String> = looked_at.iter().map(|p| p.display().to_string()).collect();
    format!(
        "omegi-agent: error: {} is stripped: it has neither a symbol table nor debug info, so its \
         functions cannot be found, and no separate debug file was found for it (looked at {}); \
         give the directory that holds it with --debug-dir (or OMEGI_DEBUG_DIR), or trace an \
         unstripped build (or one with -g)",
        exe.display(),
        looked_at.join(", ")
    )
}

/// A `.gnu_debuglink` is followed as GDB follows it: next to the binary, in
/// `.debug/` next to it, under a `--debug-dir` directly and under it
/// followed by the binary's directory (the `/usr/lib/debug` layout, here in
/// a scratch tree). A C program at -O2, stripped of everything.
#[test]
fn a_debug_link_is_followed_next_to_the_binary_and_under_debug_dirs() {
    let shipped = Shipped::build("c/shipped.c", STRIPPED_WITH_LINK);
    let name = shipped.debug_name();
    let bin = shipped.bin_dir();
    let id = build_id(&shipped.exe);
    let system_by_id = PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &id[..2],
        &id[2..]
    ));
    let system_by_link = Path::new("/usr/lib/debug")
        .join(bin.strip_prefix("/").unwrap())
        .join(&name);

    // Nowhere yet: refused, every place named.
    let line = refused(agent_command(&shipped, &[]));
    assert_eq!(
        line,
        not_found(
            &shipped.exe,
            &[
                system_by_id.clone(),
                bin.join(&name),
                bin.join(".debug").join(&name),
                system_by_link.clone(),
            ]
        )
    );
    let tree = shipped.new_dir("debug-tree");
    let tree_arg = tree.to_str().unwrap();
    let line = refused(agent_command(&shipped, &["--debug-dir", tree_arg]));
    assert_eq!(
        line,
        not_found(
            &shipped.exe,
            &[
                shipped.build_id_path(&tree),
                tree.join(&name),
                tree.join(bin.strip_prefix("/").unwrap()).join(&name),
                system_by_id,
                bin.join(&name),
                bin.join(".debug").join(&name),
                system_by_link,
            ]
        )
    );

    for (place, extra) in [
        (bin.join(&name), vec![]),
        (bin.join(".debug").join(&name), vec![]),
        (tree.join(&name), vec!["--debug-dir", tree_arg]),
        (
            tree.join(bin.strip_prefix("/").unwrap()).join(&name),
            vec!["--debug-dir", tree_arg],
        ),
    ] {
        let placed = shipped.put(&shipped.debug, place);
        assert_eq!(
            traced_with_lines(&shipped, &extra),
            ["main(total(price price price))"],
            "{}",
            placed.display()
        );
        assert_eq!(
            list_summary(&shipped, &extra),
            format!(
                "3 functions would be traced in {} (debug info: DWARF and symbols from {} \
                 (found by .gnu_debuglink); returns by uretprobe)",
                shipped.exe.display(),
                placed.display()
            )
        );
        std::fs::remove_file(&placed).unwrap();
    }
}

/// A C++ program at -O2 with no debug link, its compressed debug info in a
/// `.build-id` tree (as Debian's `-dbgsym` packages install it under
/// `/usr/lib/debug`) given by `--debug-dir` or `OMEGI_DEBUG_DIR`; an
/// exception thrown and caught in its own code.
#[test]
fn the_build_id_layout_under_a_debug_dir() {
    let shipped = Shipped::build(
        "cpp/shipped.cpp",
        Shipping {
            debuglink: false,
            compress: true,
            ..STRIPPED_WITH_LINK
        },
    );
    let tree = shipped.new_dir("debug-tree");
    let placed = shipped.put(&shipped.debug, shipped.build_id_path(&tree));
    // Without the tree, only the system's .build-id directory is looked at.
    let line = refused(agent_command(&shipped, &[]));
    assert_eq!(
        line,
        not_found(
            &shipped.exe,
            &[shipped.build_id_path(Path::new("/usr/lib/debug"))]
        )
    );

    let expected = ["main(shop::Cart::weight shop::handle(shop::check) \
                     shop::handle(shop::check[unwound]))"];
    let tree_arg = tree.to_str().unwrap();
    assert_eq!(
        traced_with_lines(&shipped, &["--debug-dir", tree_arg]),
        expected
    );
    assert_eq!(
        list_summary(&shipped, &["--debug-dir", tree_arg]),
        format!(
            "4 functions would be traced in {} (debug info: DWARF and symbols from {} \
             (found by build id); returns by return sites (uretprobes on leaf functions), the \
             binary can unwind)",
            shipped.exe.display(),
            placed.display()
        )
    );

    // OMEGI_DEBUG_DIR: directories separated by ':', the tree second.
    let empty = shipped.new_dir("empty");
    let mut command = agent_command(&shipped, &[]);
    command.env(
        "OMEGI_DEBUG_DIR",
        format!("{}:{}", empty.display(), tree.display()),
    );
    let (status, stdout, stderr) = run::run_to_end(command);
    let spans = parse_lines(&std::fs::read_to_string(shipped.dir.join("spans.jsonl")).unwrap());
    assert_eq!(
        check_traced(&shipped, status, &stdout, &stderr, &spans),
        expected
    );
}

/// A Rust program built as `cargo build --release` with debug info builds
/// it, stripped of everything, its debug file where `/usr/lib/debug` +
/// the binary's directory would have it (in a scratch tree given by
/// `--debug-dir`). Its symbols, and std's panic hooks with them, come from
/// the debug file.
#[test]
fn a_rust_release_build_with_its_debug_info_apart() {
    let shipped = Shipped::build("rust/shipped.rs", STRIPPED_WITH_LINK);
    let tree = shipped.new_dir("usr-lib-debug");
    shipped.put(
        &shipped.debug,
        tree.join(shipped.bin_dir().strip_prefix("/").unwrap())
            .join(shipped.debug_name()),
    );
    assert_eq!(
        traced_with_lines(&shipped, &["--debug-dir", tree.to_str().unwrap()]),
        [
            "shipped::main(shipped::total(shipped::price shipped::price shipped::price \
          shipped::Order::weight))"
        ]
    );
}

/// The refusal of a debug file of another build.
fn build_id_mismatch(shipped: &Shipped, debug_file: &Path, other: &Shipped) -> String {
    format!(
        "omegi-agent: error: {} is not the debug info of {}: its build id is {}, the binary's is \
         {}; omegi does not use debug info from another build (its files and lines would be \
         wrong)",
        debug_file.display(),
        shipped.exe.display(),
        build_id(&other.unstripped),
        build_id(&shipped.exe),
    )
}

/// The debug file of another build of the same program, put where the
/// binary's build id or debug link points, is refused: one line naming both
/// files and both build ids, a non-zero exit, nothing traced.
#[test]
fn a_debug_file_of_another_build_is_refused() {
    let shipped = Shipped::build("c/shipped.c", STRIPPED_WITH_LINK);
    let other = Shipped::build(
        "c/shipped.c",
        Shipping {
            other_build: true,
            ..STRIPPED_WITH_LINK
        },
    );
    assert_ne!(build_id(&shipped.exe), build_id(&other.exe));
    assert_eq!(shipped.debug_name(), other.debug_name());

    // By build id, under a --debug-dir.
    let tree = shipped.new_dir("debug-tree");
    let wrong = shipped.put(&other.debug, shipped.build_id_path(&tree));
    let line = refused(agent_command(
        &shipped,
        &["--debug-dir", tree.to_str().unwrap()],
    ));
    assert_eq!(line, build_id_mismatch(&shipped, &wrong, &other));
    std::fs::remove_file(&wrong).unwrap();

    // By debug link, next to the binary: the build id is checked first.
    let wrong = shipped.put(&other.debug, shipped.bin_dir().join(shipped.debug_name()));
    let line = refused(agent_command(&shipped, &[]));
    assert_eq!(line, build_id_mismatch(&shipped, &wrong, &other));
    let spans = std::fs::read_to_string(shipped.dir.join("spans.jsonl")).unwrap_or_default();
    assert_eq!(spans, "", "nothing is traced");
}

/// A debug file changed since the debug link was made (here recompressed:
/// the same build id, other bytes) fails the link's CRC and is refused; a
/// matching one further down the search is used instead, with a warning
/// about the one skipped.
#[test]
fn a_debug_file_that_fails_its_crc_is_refused() {
    let shipped = Shipped::build("c/shipped.c", STRIPPED_WITH_LINK);
    let changed = shipped.dir.join("keep").join("changed.debug");
    std::fs::copy(&shipped.debug, &changed).unwrap();
    tool(
        Command::new("objcopy")
            .arg("--compress-debug-sections=zlib")
            .arg(&changed),
    );
    assert_eq!(build_id(&changed), build_id(&shipped.exe));
    let data = std::fs::read(&shipped.exe).unwrap();
    let (_, expected) = object::File::parse(&*data)
        .unwrap()
        .gnu_debuglink()
        .unwrap()
        .expect("a debug link");
    let found = crc32fast::hash(&std::fs::read(&changed).unwrap());
    assert_eq!(
        expected,
        crc32fast::hash(&std::fs::read(&shipped.debug).unwrap())
    );
    assert_ne!(found, expected);

    let wrong = shipped.put(&changed, shipped.bin_dir().join(shipped.debug_name()));
    let refusal = format!(
        "{} is not the debug info of {}: its CRC-32 is {found:08x}, the binary's .gnu_debuglink \
         expects {expected:08x} (the file was changed or comes from another build); omegi does \
         not use debug info that does not match (its files and lines would be wrong)",
        wrong.display(),
        shipped.exe.display(),
    );
    let line = refused(agent_command(&shipped, &[]));
    assert_eq!(line, format!("omegi-agent: error: {refusal}"));

    // The right one in .debug/: used, and the skipped one named.
    let right = shipped.put(
        &shipped.debug,
        shipped.bin_dir().join(".debug").join(shipped.debug_name()),
    );
    let agent = Agent::new(env!("CARGO_BIN_EXE_omegi-agent"));
    let traced = agent.trace(&shipped.exe, &[] as &[&str], &[]);
    assert_eq!(
        traced.agent_stderr(),
        format!(
            "omegi-agent: warning: {refusal}; using {} instead\n",
            right.display()
        )
    );
    assert_eq!(
        check_traced(
            &shipped,
            traced.status,
            &traced.stdout,
            &traced.stderr,
            &traced.spans
        ),
        ["main(total(price price price))"]
    );
}
