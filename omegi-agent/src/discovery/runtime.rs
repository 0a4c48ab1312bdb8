//! The language runtimes' error entry points in a binary: where C++
//! exceptions are thrown and caught, where Rust panics start, are described
//! and are caught. The error path probes these.

use object::{ObjectSymbol, SymbolKind};

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
    /// The panic payloads' `PanicPayload::get` (file offsets), which
    /// `panic_with_hook` calls before any hook runs: those returning a
    /// `&&str` (`StaticStrPayload`, `begin_panic::Payload<&str>`) and those
    /// returning a `&String` (`FormatStringPayload`, freshly formatted, and
    /// `begin_panic::Payload<String>`).
    pub rust_payload_str: Vec<u64>,
    pub rust_payload_string: Vec<u64>,
    /// Where `catch_unwind` catches a panic (file offsets): each probe's
    /// entry `rsp` must be that of a call made by the frame that called the
    /// panicking closure, so that every traced call at or below it was
    /// unwound and the frames above it were not. That is every instance of
    /// std's `do_catch`, which the landing pad calls from that frame, and
    /// std's `catch_unwind::cleanup`, which `do_catch` calls: from that frame
    /// too where the optimizer inlined `do_catch` (always at `opt-level=3`,
    /// where no instance is left), one frame deeper where it did not (and
    /// then the `do_catch` probe has fired first and the second is ignored).
    /// Only when there is neither, `__rust_panic_cleanup` (called deeper
    /// still, so the catcher it reports may be one of the unwound calls).
    pub rust_panic_catch: Vec<u64>,
}

impl RuntimeHooks {
    /// Whether the binary can throw C++ exceptions or panic.
    pub fn any(&self) -> bool {
        self.cxx_throw.is_some() || self.rust_panic.is_some()
    }
}

/// What a panic payload's `get` returns.
#[derive(Debug, PartialEq, Eq)]
enum PayloadText {
    Str,
    String,
}

/// Whether `demangled` is a panic payload's `PanicPayload::get`, and what it
/// gives. The payload types' module moved (`begin_panic_handler`, then
/// `panic_handler`), so only the type's own name is matched.
fn payload_getter(demangled: &str) -> Option<PayloadText> {
    let payload = demangled
        .strip_prefix('<')?
        .strip_suffix(" as core::panic::PanicPayload>::get")?;
    let (path, generics) = payload.split_at(payload.find('<').unwrap_or(payload.len()));
    match (path.rsplit("::").next()?, generics) {
        ("StaticStrPayload", "") | ("Payload", "<&str>") => Some(PayloadText::Str),
        ("FormatStringPayload", "") | ("Payload", "<alloc::string::String>") => {
            Some(PayloadText::String)
        }
        _ => None,
    }
}

/// Finds the runtime's error entry points: by name in the symbol table
/// (the debug file's when the binary was stripped of its own), at file
/// offsets of the binary.
pub fn find(files: elf::Files<'_, '_>) -> RuntimeHooks {
    let mut hooks = RuntimeHooks::default();
    let mut cleanup = None;
    for symbol in files.all_symbols() {
        let Ok(raw) = symbol.name() else { continue };
        let name = raw.split('@').next().unwrap_or(raw);
        let defined = !symbol.is_undefined() && symbol.kind() == SymbolKind::Text;
        let offset = || {
            defined
                .then(|| elf::file_offset(files.code, symbol.address()))
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
        } else if name.contains("Payload") {
            let demangled = demangle(name);
            match payload_getter(&demangled) {
                Some(PayloadText::Str) => hooks.rust_payload_str.extend(offset()),
                Some(PayloadText::String) => hooks.rust_payload_string.extend(offset()),
                None => {}
            }
        } else if name.contains("do_catch") {
            let demangled = demangle(name);
            if demangled == "std::panicking::catch_unwind::do_catch"
                || demangled == "std::panicking::try::do_catch"
            {
                hooks.rust_panic_catch.extend(offset());
            }
        } else if name.contains("cleanup") {
            let demangled = demangle(name);
            if demangled == "std::panicking::catch_unwind::cleanup"
                || demangled == "std::panicking::try::cleanup"
            {
                hooks.rust_panic_catch.extend(offset());
            } else if name.contains("__rust_panic_cleanup") {
                cleanup = offset();
            }
        }
    }
    if hooks.rust_panic_catch.is_empty() {
        hooks.rust_panic_catch.extend(cleanup);
    }
    for offsets in [
        &mut hooks.rust_panic_catch,
        &mut hooks.rust_payload_str,
        &mut hooks.rust_payload_string,
    ] {
        offsets.sort_unstable();
        offsets.dedup();
    }
    hooks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_payload_getters_are_told_by_their_type() {
        let get = |payload: &str| format!("<{payload} as core::panic::PanicPayload>::get");
        for (payload, text) in [
            (
                "std::panicking::panic_handler::StaticStrPayload",
                PayloadText::Str,
            ),
            (
                "std::panicking::begin_panic_handler::StaticStrPayload",
                PayloadText::Str,
            ),
            (
                "std::panicking::begin_panic::Payload<&str>",
                PayloadText::Str,
            ),
            (
                "std::panicking::panic_handler::FormatStringPayload",
                PayloadText::String,
            ),
            (
                "std::panicking::begin_panic::Payload<alloc::string::String>",
                PayloadText::String,
            ),
        ] {
            assert_eq!(payload_getter(&get(payload)), Some(text), "{payload}");
        }
        for other in [
            get("std::panicking::begin_panic::Payload<i32>"),
            "<std::panicking::panic_handler::StaticStrPayload as core::panic::PanicPayload>::as_str"
                .into(),
            "std::panicking::payload_as_str".into(),
        ] {
            assert_eq!(payload_getter(&other), None, "{other}");
        }
    }
}
