//! Discovery on the fixture executables: which functions are found, with
//! which names, files and lines, where their probes go in the file, and what
//! is left out. Calls the agent's library directly; needs no privileges.
//!
//! Facts about the executables are read independently of the agent where it
//! matters: program headers parsed by hand for file offsets, `objdump` for
//! the instructions a function returns or jumps away by.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
};

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use omegi_agent::discovery::{
    ExitKind, Function, FunctionTable, ProbeCost, ProbeSite, Selection, SkipReason,
};
use omegi_tests::fixtures::{self, line_of, Linking};

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
