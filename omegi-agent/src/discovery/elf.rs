//! Opening the target's ELF file and the facts about it that do not depend on
//! any one function.

use std::path::Path;

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

use super::DiscoveryError;

/// Symbols whose presence means the binary can unwind its stack (C++
/// exceptions, Rust panics, `pthread_exit`/`pthread_cancel`'s forced unwind).
/// A uretprobe replaces return addresses on the stack, which such an unwinder
/// cannot read: the program would die.
const UNWINDER_SYMBOLS: &[&str] = &[
    "_Unwind_RaiseException",
    "_Unwind_Resume",
    "_Unwind_ForcedUnwind",
    "__cxa_throw",
    "__gxx_personality_v0",
    "rust_eh_personality",
    "__rust_start_panic",
    "pthread_exit",
    "pthread_cancel",
];

/// Runtimes that walk their own stacks by return address, with no unwinder
/// of the C kind, each by a symbol of its runtime: OCaml's garbage collector
/// looks up every return address on the stack in its frame table (and loops
/// or crashes on one it does not know, such as a uretprobe's trampoline);
/// GHC's runtime keeps Haskell frames on a stack of its own. (Go walks its
/// stacks too; Go binaries are recognised apart, see `go.rs`.)
const STACK_WALKING_RUNTIMES: &[(&str, &str)] = &[
    ("caml_start_program", "OCaml"),
    ("caml_frametable", "OCaml"),
    ("hs_init_ghc", "GHC"),
];

/// The files one binary is read through. Usually both are the binary; when
/// it was stripped of its symbol table and a separate debug file has one
/// (see `debuginfo.rs`), the symbols come from there. Code, segments (file
/// offsets) and dynamic symbols always come from the binary: a debug file
/// keeps none of the code, and its segments' file offsets are its own.
#[derive(Clone, Copy)]
pub struct Files<'a, 'data> {
    pub code: &'a object::File<'data>,
    pub symbols: &'a object::File<'data>,
}

impl<'a, 'data> Files<'a, 'data> {
    /// The symbol table's symbols, then the binary's dynamic symbols.
    pub fn all_symbols(&self) -> impl Iterator<Item = object::Symbol<'data, 'a>> + 'a {
        self.symbols.symbols().chain(self.code.dynamic_symbols())
    }
}

/// Checks that `data` is an ELF file omegi can trace and parses it.
pub fn parse<'data>(path: &Path, data: &'data [u8]) -> Result<object::File<'data>, DiscoveryError> {
    let not_elf = || DiscoveryError::NotElf(path.to_owned());
    if !data.starts_with(b"\x7fELF") {
        return Err(not_elf());
    }
    let file = object::File::parse(data).map_err(|_| not_elf())?;
    match file.format() {
        object::BinaryFormat::Elf => {}
        _ => return Err(not_elf()),
    }
    if file.architecture() != object::Architecture::X86_64 || !file.is_64() {
        return Err(DiscoveryError::UnsupportedArchitecture {
            path: path.to_owned(),
            found: format!(
                "{:?}, {}-bit",
                file.architecture(),
                if file.is_64() { 64 } else { 32 }
            ),
        });
    }
    Ok(file)
}

/// Whether anything in the binary can unwind through user frames.
pub fn can_unwind(files: Files<'_, '_>) -> bool {
    references(files, UNWINDER_SYMBOLS) || stack_walking_runtime(files).is_some()
}

/// The runtime that reads return addresses off the stack itself, if the
/// binary has one (see [`STACK_WALKING_RUNTIMES`]): then no frame, not even
/// a leaf's, may have a uretprobe.
pub fn stack_walking_runtime(files: Files<'_, '_>) -> Option<&'static str> {
    STACK_WALKING_RUNTIMES
        .iter()
        .find(|(symbol, _)| references(files, &[symbol]))
        .map(|&(_, runtime)| runtime)
}

/// Whether the binary can unwind from a signal handler, through a frame
/// that made no call: asynchronous thread cancellation.
pub fn can_cancel_asynchronously(files: Files<'_, '_>) -> bool {
    references(files, &["pthread_setcanceltype"])
}

/// Whether the binary defines or imports one of `names`.
fn references(files: Files<'_, '_>, names: &[&str]) -> bool {
    files
        .all_symbols()
        .filter_map(|symbol| symbol.name().ok())
        .any(|name| {
            // Versioned imports look like `pthread_exit@GLIBC_2.34`.
            let base = name.split('@').next().unwrap_or(name);
            names.contains(&base)
        })
}

/// Whether the file carries DWARF debug information (in the file: a
/// `.debug_info` emptied to `NOBITS` by `objcopy --only-keep-debug` does
/// not count).
pub fn has_dwarf(file: &object::File<'_>) -> bool {
    file.section_by_name(".debug_info").is_some_and(|section| {
        section.size() > 0 && section.kind() != object::SectionKind::UninitializedData
    })
}

/// Maps a virtual address to its offset in the file, the form uprobes take.
/// PIE executables built by rustc do not have the two equal.
pub fn file_offset(file: &object::File<'_>, address: u64) -> Option<u64> {
    file.segments().find_map(|segment| {
        let (offset, size) = segment.file_range();
        let start = segment.address();
        (address >= start && address < start + size).then(|| address - start + offset)
    })
}

/// The link-time address of the lowest executable `PT_LOAD` segment, as the
/// kernel's ELF loader takes it for `mm->start_code` (before adding the load
/// bias); 0 when there is none.
pub fn executable_start(file: &object::File<'_>) -> u64 {
    const PF_X: u32 = 1;
    file.segments()
        .filter(|segment| {
            matches!(segment.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0)
        })
        .map(|segment| segment.address())
        .min()
        .unwrap_or(0)
}

/// Reads `size` bytes of code at virtual address `address`.
pub fn code_at<'data>(file: &object::File<'data>, address: u64, size: u64) -> Option<&'data [u8]> {
    file.sections()
        .filter(|section| section.kind() == object::SectionKind::Text)
        .find_map(|section| section.data_range(address, size).ok().flatten())
}
