//! Demangling symbol names (Rust legacy and v0, C++ Itanium) into the names a
//! person reads: Rust paths without the hash, C++ names without parameter
//! lists. Anything else is returned as it is.

/// The readable name for a linker symbol.
pub fn demangle(symbol: &str) -> String {
    if let Ok(rust) = rustc_demangle::try_demangle(symbol) {
        // `{:#}` leaves out the trailing hash.
        return format!("{rust:#}");
    }
    if symbol.starts_with("_Z") {
        if let Ok(cpp) = cpp_demangle::Symbol::new(symbol) {
            let options = cpp_demangle::DemangleOptions::new()
                .no_params()
                .no_return_type();
            if let Ok(name) = cpp.demangle_with_options(&options) {
                return name;
            }
        }
    }
    symbol.to_owned()
}

/// Prefixes of demangled names that belong to language runtimes and the C
/// library rather than to the user, for binaries without DWARF where the
/// project root cannot be applied.
const RUNTIME_PREFIXES: &[&str] = &[
    "std::",
    "core::",
    "alloc::",
    "<std::",
    "<core::",
    "<alloc::",
    "<&",
    "<*",
    "<[",
    "<(",
    "panic_unwind::",
    "panic_abort::",
    "std_detect::",
    "compiler_builtins::",
    "rustc_demangle::",
    "addr2line::",
    "gimli::",
    "object::",
    "miniz_oxide::",
    "adler2::",
    "hashbrown::",
    "memchr::",
    "__gnu_cxx::",
    "__cxxabiv1::",
    "__cxa_",
    "__rust",
    "__rdl_",
    "__rg_",
    "rust_",
];

/// C runtime start-up and tear-down code GCC links into every executable.
const CRT_FUNCTIONS: &[&str] = &[
    "deregister_tm_clones",
    "register_tm_clones",
    "frame_dummy",
    "atexit",
];

/// Whether a symbol belongs to a runtime (used only without DWARF).
pub fn is_runtime(symbol: &str, demangled: &str) -> bool {
    // Names starting with an underscore are reserved to the implementation in
    // C; mangled C++ (`_Z`) and Rust v0 (`_R`) names are not what that means.
    let reserved =
        symbol.starts_with('_') && !symbol.starts_with("_Z") && !symbol.starts_with("_R");
    // `<<alloc::vec::IntoIter<T> as Drop>::drop::Guard as Drop>::drop`: a
    // runtime type's impl, however deeply nested.
    let subject = demangled.trim_start_matches('<');
    reserved
        || CRT_FUNCTIONS.contains(&symbol)
        || RUNTIME_PREFIXES
            .iter()
            .any(|prefix| demangled.starts_with(prefix) || subject.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_legacy_loses_its_hash() {
        assert_eq!(
            demangle("_ZN7fixture7compute17h0123456789abcdefE"),
            "fixture::compute"
        );
    }

    #[test]
    fn rust_v0() {
        assert_eq!(demangle("_RNvCs1234_7fixture7compute"), "fixture::compute");
    }

    #[test]
    fn cpp_without_parameters() {
        assert_eq!(demangle("_ZN6shapes6Circle4areaEv"), "shapes::Circle::area");
        assert_eq!(demangle("_Z7computei"), "compute");
    }

    #[test]
    fn c_names_are_unchanged() {
        assert_eq!(demangle("fib"), "fib");
        assert_eq!(demangle("main"), "main");
    }

    #[test]
    fn runtime_symbols_are_recognised() {
        assert!(is_runtime("_start", "_start"));
        assert!(is_runtime("frame_dummy", "frame_dummy"));
        assert!(is_runtime(
            "_ZN3std2rt10lang_start17h0123456789abcdefE",
            "std::rt::lang_start"
        ));
        assert!(!is_runtime(
            "_ZN7fixture4main17h0123456789abcdefE",
            "fixture::main"
        ));
        assert!(!is_runtime("compute", "compute"));
        assert!(is_runtime(
            "_ZN1x4drop17h0123456789abcdefE",
            "<<alloc::vec::into_iter::IntoIter<T,A> as core::ops::drop::Drop>::drop::DropGuard<T,A> as core::ops::drop::Drop>::drop"
        ));
        assert!(!is_runtime(
            "_ZN1x1y17h0123456789abcdefE",
            "<shop::Cart as core::fmt::Debug>::fmt"
        ));
        assert!(!is_runtime("_Z7computei", "compute"));
    }
}
