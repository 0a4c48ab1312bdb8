//! The language runtimes' error entry points in a binary: where C++
//! exceptions are thrown and caught, where Rust panics start, are described
//! and are caught. The error path probes these.

use object::{Object, ObjectSymbol, SymbolKind};

use super::{elf, names::demangle};

/// Where a runtime function can be probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeSymbol {
    /// Defined in the traced binary (statically linked runtime).
    InBinary { file_offset: u64 },
    /// Imported from a shared library (libstdc++) by this name.
    Imported { name: &'static str },
}

/// The error entry points a binary uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeHooks {
    /// `__cxa_throw`, `__cxa_rethrow`, `__cxa_begin_catch` (C++).
    pub cxx_throw: Option<RuntimeSymbol>,
    pub cxx_rethrow: Option<RuntimeSymbol>,
    pub cxx_begin_catch: Option<RuntimeSymbol>,
    /// `std::panicking::panic_with_hook` (called `rust_panic_with_hook`
    /// before Rust 1.89): every panic goes through it (file offset).
    pub rust_panic: Option<u64>,
    /// `std::panicking::payload_as_str`: the default hook gets the message
    /// from it (file offset).
    pub rust_panic_message: Option<u64>,
    /// Where `catch_unwind` catches a panic (file offsets): every instance
    /// of std's `do_catch`, which the unwinder calls in the frame that
    /// called the panicking closure — so every traced call below it was
    /// unwound. Only when there is none, `__rust_panic_cleanup` (called
    /// deeper, so the catcher it reports may be one of the unwound calls).
    pub rust_panic_catch: Vec<u64>,
}

impl RuntimeHooks {
    /// Whether the binary can throw C++ exceptions or panic.
    pub fn any(&self) -> bool {
        self.cxx_throw.is_some() || self.rust_panic.is_some()
    }
}

/// Finds the runtime's error entry points in `file`.
pub fn find(file: &object::File<'_>) -> RuntimeHooks {
    let mut hooks = RuntimeHooks::default();
    let mut cleanup = None;
    for symbol in file.symbols().chain(file.dynamic_symbols()) {
        let Ok(raw) = symbol.name() else { continue };
        let name = raw.split('@').next().unwrap_or(raw);
        let defined = !symbol.is_undefined() && symbol.kind() == SymbolKind::Text;
        let offset = || {
            defined
                .then(|| elf::file_offset(file, symbol.address()))
                .flatten()
        };
        let cxx = |slot: &mut Option<RuntimeSymbol>, wanted: &'static str| {
            if name != wanted {
                return;
            }
            match offset() {
                Some(file_offset) => *slot = Some(RuntimeSymbol::InBinary { file_offset }),
                None if slot.is_none() && symbol.is_undefined() => {
                    *slot = Some(RuntimeSymbol::Imported { name: wanted })
                }
                None => {}
            }
        };
        cxx(&mut hooks.cxx_throw, "__cxa_throw");
        cxx(&mut hooks.cxx_rethrow, "__cxa_rethrow");
        cxx(&mut hooks.cxx_begin_catch, "__cxa_begin_catch");

        if !defined {
            continue;
        }
        if name.contains("panic_with_hook") {
            let demangled = demangle(name);
            if demangled == "std::panicking::panic_with_hook"
                || demangled == "std::panicking::rust_panic_with_hook"
            {
                hooks.rust_panic = offset();
            }
        } else if name.contains("payload_as_str") {
            if demangle(name) == "std::panicking::payload_as_str" {
                hooks.rust_panic_message = offset();
            }
        } else if name.contains("do_catch") {
            let demangled = demangle(name);
            if demangled == "std::panicking::catch_unwind::do_catch"
                || demangled == "std::panicking::try::do_catch"
            {
                hooks.rust_panic_catch.extend(offset());
            }
        } else if name.contains("__rust_panic_cleanup") {
            cleanup = offset();
        }
    }
    if hooks.rust_panic_catch.is_empty() {
        hooks.rust_panic_catch.extend(cleanup);
    }
    hooks.rust_panic_catch.sort_unstable();
    hooks.rust_panic_catch.dedup();
    hooks
}
