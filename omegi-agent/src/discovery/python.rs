//! Python: a CPython interpreter is traced through its eval function
//! (`_PyEval_EvalFrameDefault`), which runs one Python call each time it is
//! entered, with the call's frame in `rsi`. The kernel side names the call
//! from the frame's code object and keeps only code whose file lies under the
//! project root (`omegi-ebpf/src/python.rs`); here we find the interpreter's
//! code, its version, and the byte offsets that version needs.
//!
//! From 3.11 a Python-to-Python call no longer enters the eval function: it
//! pushes a frame and jumps back into the running one. Only calls made from C
//! (the first call of a thread, a callback from `sorted`, a framework calling
//! a handler) are then seen, unless the interpreter is told to call its eval
//! function through `interp->eval_frame` (PEP 523), which turns the inlining
//! off: the opt-in eval hook (`attach/python_hook.rs`), whose addresses are
//! found here.

use std::path::{Path, PathBuf};

use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use object::{
    read::elf::{Dyn as _, ElfFile64, ProgramHeader as _},
    Object, ObjectSection, ObjectSymbol,
};
use omegi_common::PythonOffsets;

use super::{analyze_with_offsets, code, elf, DiscoveryError, Function, FunctionTable};

/// The eval function: one call of it runs one Python call.
pub const EVAL_FUNCTION: &str = "_PyEval_EvalFrameDefault";

/// The oldest and newest minor version of CPython 3 traced.
pub const SUPPORTED: (u8, u8) = (10, 13);

/// A Python interpreter being traced.
#[derive(Clone, Debug)]
pub struct PythonTarget {
    /// `3.N`'s `N`.
    pub minor: u8,
    /// The file that holds the interpreter: a `libpython3.N.so`, or the
    /// executable itself when it is linked in.
    pub library: PathBuf,
    /// For the kernel side (`root_len` is filled in at load).
    pub offsets: PythonOffsets,
    /// Code whose file lies under this directory is traced.
    pub project_root: PathBuf,
    /// `--include`/`--exclude`, on `module.qualname`.
    pub filter: super::NameFilter,
    /// Where the eval hook writes, when it could be found.
    pub hook: Option<EvalHookSites>,
}

impl PythonTarget {
    /// Whether Python-to-Python calls skip the eval function (3.11+), so
    /// that without the eval hook only calls made from C are seen.
    pub fn inlines_calls(&self) -> bool {
        self.minor >= 11
    }

    pub fn version(&self) -> String {
        format!("3.{}", self.minor)
    }
}

/// Link-time addresses the eval hook needs (add the library's load bias).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalHookSites {
    /// The word that holds the main interpreter's address
    /// (`_PyRuntime.interpreters.main`).
    pub main_interpreter: u64,
    /// Of `eval_frame` in the interpreter (`PyInterpreterState`).
    pub eval_frame_offset: u64,
    /// `_PyEval_EvalFrameDefault`.
    pub eval_function: u64,
}

/// The file a process runs its interpreter from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterpreterFile {
    /// Where to read it (through `/proc/PID/root` for a running process).
    pub read_path: PathBuf,
    /// Its path as the process sees it.
    pub path: PathBuf,
}

/// Whether the executable is a Python interpreter (it has the eval
/// function, or imports the C API from a `libpython`), and where the
/// interpreter's code is. `pid` is the running process, if there is one:
/// then the library is the one it mapped.
pub fn interpreter_file(
    read_path: &Path,
    binary: &Path,
    data: &[u8],
    pid: Option<u32>,
) -> Result<Option<InterpreterFile>, DiscoveryError> {
    let Ok(file) = object::File::parse(data) else {
        return Ok(None);
    };
    let defines_eval = file
        .symbols()
        .chain(file.dynamic_symbols())
        .any(|symbol| !symbol.is_undefined() && symbol.name() == Ok(EVAL_FUNCTION));
    if defines_eval {
        return Ok(Some(InterpreterFile {
            read_path: read_path.to_owned(),
            path: binary.to_owned(),
        }));
    }
    let Some(needed) = needed_libpython(data) else {
        return Ok(None);
    };
    let found = match pid {
        Some(pid) => mapped_library(pid, "libpython"),
        None => search_library(data, binary, &needed.name),
    };
    found
        .map(Some)
        .ok_or_else(|| DiscoveryError::PythonLibraryNotFound {
            binary: binary.to_owned(),
            library: needed.name,
        })
}

struct Needed {
    name: String,
}

/// The `DT_NEEDED` entry naming a `libpython3.*`.
fn needed_libpython(data: &[u8]) -> Option<Needed> {
    dynamic_strings(data, object::elf::DT_NEEDED)
        .into_iter()
        .find(|name| name.starts_with("libpython"))
        .map(|name| Needed { name })
}

/// The strings of the dynamic section's entries with `tag`.
fn dynamic_strings(data: &[u8], tag: u32) -> Vec<String> {
    let Ok(elf) = ElfFile64::<object::Endianness>::parse(data) else {
        return Vec::new();
    };
    let endian = elf.endian();
    let sections = elf.elf_section_table();
    let Ok(Some((entries, link))) = sections.dynamic(endian, data) else {
        return Vec::new();
    };
    let Ok(strings) = sections.strings(endian, data, link) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter(|entry| entry.tag32(endian) == Some(tag))
        .filter_map(|entry| entry.string(endian, strings).ok())
        .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
        .collect()
}

/// Where the dynamic loader would find `name` for `binary`: its
/// `RUNPATH`/`RPATH` (with `$ORIGIN`), `LD_LIBRARY_PATH`, then the system's
/// directories.
fn search_library(data: &[u8], binary: &Path, name: &str) -> Option<InterpreterFile> {
    let origin = binary.parent().unwrap_or(Path::new("/"));
    let mut directories: Vec<PathBuf> = Vec::new();
    for tag in [object::elf::DT_RUNPATH, object::elf::DT_RPATH] {
        for list in dynamic_strings(data, tag) {
            directories.extend(list.split(':').map(|entry| {
                PathBuf::from(
                    entry
                        .replace("${ORIGIN}", &origin.to_string_lossy())
                        .replace("$ORIGIN", &origin.to_string_lossy()),
                )
            }));
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        directories.extend(std::env::split_paths(&paths));
    }
    directories.extend(
        [
            "/lib/x86_64-linux-gnu",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/local/lib",
            "/lib64",
            "/usr/lib64",
            "/lib",
            "/usr/lib",
        ]
        .map(PathBuf::from),
    );
    directories
        .into_iter()
        .map(|directory| directory.join(name))
        .find(|path| path.is_file())
        .map(|path| InterpreterFile {
            read_path: path.clone(),
            path,
        })
}

/// The file of process `pid`'s mapping whose name starts with `prefix`.
fn mapped_library(pid: u32, prefix: &str) -> Option<InterpreterFile> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines().find_map(|line| {
        let path = line.split_whitespace().nth(5)?;
        let name = Path::new(path).file_name()?.to_str()?;
        name.starts_with(prefix).then(|| InterpreterFile {
            read_path: PathBuf::from(format!("/proc/{pid}/root{path}")),
            path: PathBuf::from(path),
        })
    })
}

/// The load bias of `library` in process `pid`: where the mapping of its
/// first bytes starts minus the link-time address of those bytes. The file
/// is recognised by device and inode, whatever path the process used.
pub fn load_bias(pid: u32, library: &Path, data: &[u8]) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(library).ok()?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let start = maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let range = fields.next()?;
        let _perms = fields.next()?;
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let _dev = fields.next()?;
        let inode: u64 = fields.next()?.parse().ok()?;
        (offset == 0 && inode == metadata.ino())
            .then(|| u64::from_str_radix(range.split('-').next()?, 16).ok())
            .flatten()
    })?;
    let elf = ElfFile64::<object::Endianness>::parse(data).ok()?;
    let endian = elf.endian();
    let first = elf
        .elf_program_headers()
        .iter()
        .filter(|header| header.p_type(endian) == object::elf::PT_LOAD)
        .map(|header| header.p_vaddr(endian) - header.p_offset(endian))
        .min()?;
    Some(start.wrapping_sub(first))
}

impl FunctionTable {
    /// The table of a Python interpreter: its eval function, whose calls
    /// the kernel side names from their code objects.
    pub fn python(
        binary: &Path,
        library: &InterpreterFile,
        data: &[u8],
        selection: &super::Selection,
    ) -> Result<Self, DiscoveryError> {
        let file = elf::parse(&library.path, data)?;
        let (major, minor) =
            version(&file, &library.path).ok_or_else(|| DiscoveryError::UnknownPython {
                path: library.path.clone(),
            })?;
        if major != 3 || !(SUPPORTED.0..=SUPPORTED.1).contains(&minor) {
            return Err(DiscoveryError::UnsupportedPython {
                path: library.path.clone(),
                version: format!("{major}.{minor}"),
            });
        }
        let offsets = offsets(minor);
        let eval = symbol(&file, EVAL_FUNCTION)
            .filter(|&(_, size)| size > 0)
            .ok_or_else(|| DiscoveryError::PythonWithoutEval {
                path: library.path.clone(),
            })?;
        let bytes = elf::code_at(&file, eval.0, eval.1).ok_or_else(|| {
            DiscoveryError::PythonWithoutEval {
                path: library.path.clone(),
            }
        })?;
        let mut analysis = analyze_with_offsets(
            &file,
            &[code::CodeRange {
                address: eval.0,
                bytes,
            }],
        )
        .map_err(|_| DiscoveryError::PythonWithoutEval {
            path: library.path.clone(),
        })?;
        // Only its returns end a Python call; a jump out of it is a part of
        // the function laid out elsewhere, not a tail call.
        analysis
            .exits
            .retain(|exit| exit.kind == code::ExitKind::Return);
        let mut table = FunctionTable::from_functions(
            binary,
            vec![Function {
                id: 0,
                name: EVAL_FUNCTION.into(),
                symbol: EVAL_FUNCTION.into(),
                file: None,
                line: None,
                address: eval.0,
                size: eval.1,
                code: analysis,
                runs_python: true,
                python_module: None,
            }],
        );
        table.has_dwarf = elf::has_dwarf(&file);
        table.exec_start = elf::executable_start(&file);
        table.python = Some(PythonTarget {
            minor,
            library: library.path.clone(),
            offsets,
            project_root: super::normalize(&selection.project_root),
            filter: super::NameFilter::new(selection)?,
            hook: hook_sites(&file, eval.0),
        });
        Ok(table)
    }
}

/// The version (major, minor): from `Py_Version` (3.11+, `PY_VERSION_HEX`),
/// else from the file's name (`libpython3.10.so.1.0`, `python3.10`).
fn version(file: &object::File<'_>, path: &Path) -> Option<(u8, u8)> {
    if let Some((address, _)) = symbol(file, "Py_Version") {
        let word = file.sections().find_map(|section| {
            let bytes = section.data_range(address, 4).ok().flatten()?;
            Some(u32::from_le_bytes(bytes.try_into().ok()?))
        });
        if let Some(hex) = word {
            return Some(((hex >> 24) as u8, (hex >> 16) as u8));
        }
    }
    let name = path.file_name()?.to_str()?;
    let rest = name
        .strip_prefix("libpython")
        .or_else(|| name.strip_prefix("python"))?;
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The byte offsets of each version (x86-64), from CPython's headers
/// (`pycore_frame.h`, `cpython/code.h`, `cpython/unicodeobject.h`) as
/// `gdb ptype /o` shows them in the pyenv builds; stable within a minor
/// version.
fn offsets(minor: u8) -> PythonOffsets {
    let (frame_code, code_filename, code_name, code_line, ascii_data) = match minor {
        // PyFrameObject.f_code; co_name (no co_qualname before 3.11).
        10 => (32, 104, 112, 40, 48),
        11 => (32, 112, 128, 72, 48),
        // 12, 13: _PyInterpreterFrame.f_code / f_executable first.
        _ => (0, 112, 128, 68, 40),
    };
    // PyThreadState: curexc_value and curexc_type, then current_exception.
    let (thread_exception, thread_exception_type) = match minor {
        10 => (96, 88),
        11 => (104, 96),
        12 => (96, 0),
        _ => (112, 0),
    };
    // A generator's state: 3.10 keeps it in its frame object; 3.11+ in
    // the generator, whose frame is embedded in it, five bytes after the
    // state (`gi_frame_state` at 75 and `gi_iframe` at 80 in 3.11, 67 and
    // 72 in 3.12 and 3.13); the frame's `owner` says whether it is one.
    let (code_flags, frame_owner, frame_state, state_created) = match minor {
        10 => (36, 0, 108, -2),
        11 => (48, 69, -5, -2),
        12 => (48, 70, -5, -2),
        _ => (48, 70, -5, -3),
    };
    // Where a frame is in its code: 3.10's `f_lasti`, an index; 3.11+'s
    // `prev_instr` (`instr_ptr` in 3.13) into `co_code_adaptive`.
    let (frame_instr, code_units) = match minor {
        10 => (96, 0),
        11 => (56, 184),
        12 => (56, 192),
        _ => (56, 200),
    };
    // The parameters: their counts in the code, their values first among
    // the frame's locals.
    let (code_argcount, code_kwonly, frame_locals) = match minor {
        10 => (16, 24, 352),
        11 => (56, 64, 72),
        _ => (52, 60, 72),
    };
    let (code_varnames, code_linetable) = match minor {
        10 => (72, 120),
        _ => (96, 136),
    };
    PythonOffsets {
        frame_code,
        code_filename,
        code_name,
        code_line,
        ascii_data,
        root_len: 0,
        thread_exception,
        thread_exception_type,
        code_flags,
        frame_owner,
        frame_state,
        state_created,
        frame_instr,
        code_units,
        code_argcount,
        code_kwonly,
        frame_locals,
        long_tagged: u32::from(minor >= 12),
        capture_args: 0,
        code_varnames,
        code_linetable,
        _pad: 0,
    }
}

/// A defined symbol's address and size, from the symbol table or the
/// dynamic one (a stripped interpreter keeps the C API's).
fn symbol(file: &object::File<'_>, name: &str) -> Option<(u64, u64)> {
    file.symbols()
        .chain(file.dynamic_symbols())
        .find(|symbol| !symbol.is_undefined() && symbol.name() == Ok(name))
        .map(|symbol| (symbol.address(), symbol.size()))
}

/// The eval hook's addresses, decoded from two small C API functions:
/// `_PyInterpreterState_SetEvalFrameFunc(interp, f)` stores into
/// `interp->eval_frame` (its first access through `rdi`), and
/// `PyInterpreterState_Main()` loads `_PyRuntime.interpreters.main` (through
/// the GOT's pointer to `_PyRuntime` and a displacement, or directly).
fn hook_sites(file: &object::File<'_>, eval_function: u64) -> Option<EvalHookSites> {
    let instructions = |name: &str| {
        let (address, size) = symbol(file, name)?;
        let bytes = elf::code_at(file, address, size.clamp(1, 256))?;
        let decoder = Decoder::with_ip(64, bytes, address, DecoderOptions::NONE);
        Some(decoder.into_iter().take(24).collect::<Vec<_>>())
    };
    let setter = instructions("_PyInterpreterState_SetEvalFrameFunc")?;
    let eval_frame_offset = setter.iter().find_map(|instruction| {
        (0..instruction.op_count())
            .any(|operand| instruction.op_kind(operand) == OpKind::Memory)
            .then_some(())
            .filter(|()| instruction.memory_base() == Register::RDI)
            .map(|()| instruction.memory_displacement64())
    })?;
    let main = instructions("PyInterpreterState_Main")?;
    let first = main.first()?;
    if first.mnemonic() != Mnemonic::Mov || !first.is_ip_rel_memory_operand() {
        return None;
    }
    let second = main.get(1)?;
    let main_interpreter = if second.mnemonic() == Mnemonic::Mov
        && second.memory_base() == Register::RAX
        && (0..second.op_count()).any(|operand| second.op_kind(operand) == OpKind::Memory)
    {
        let (runtime, _) = symbol(file, "_PyRuntime")?;
        runtime + second.memory_displacement64()
    } else {
        first.ip_rel_memory_address()
    };
    Some(EvalHookSites {
        main_interpreter,
        eval_frame_offset,
        eval_function,
    })
}

/// `shop/payments.py` under the root → `shop.payments`; a package's
/// `__init__.py` is the package. A file outside the root is named by its
/// stem.
pub fn module_name(file: &Path, root: &Path) -> String {
    let relative = file.strip_prefix(root).unwrap_or(file);
    let mut parts: Vec<String> = relative
        .components()
        .filter_map(|component| match component {
            std::path::Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    if let Some(last) = parts.last_mut() {
        if let Some(stem) = last.strip_suffix(".py") {
            *last = stem.to_owned();
        }
    }
    if parts.len() > 1 && parts.last().is_some_and(|last| last == "__init__") {
        parts.pop();
    }
    if !file.starts_with(root) {
        parts.drain(..parts.len().saturating_sub(1));
    }
    parts.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_named_from_their_path_under_the_root() {
        let root = Path::new("/app");
        assert_eq!(
            module_name(Path::new("/app/shop/payments.py"), root),
            "shop.payments"
        );
        assert_eq!(
            module_name(Path::new("/app/shop/__init__.py"), root),
            "shop"
        );
        assert_eq!(module_name(Path::new("/app/main.py"), root), "main");
        assert_eq!(module_name(Path::new("/elsewhere/x/y.py"), root), "y");
    }
}
