//! Building the fixture programs.
//!
//! A fixture is one source file under `tests/fixtures/<lang>/`. Its first
//! line may carry extra compiler flags for it:
//!
//! ```c
//! // omegi-fixture: -O2
//! ```
//!
//! Every fixture is built with debug info, once per test process and
//! linking kind, into `target/fixtures/<pie|nopie>/<lang>/`.

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

/// The directory holding the fixture sources: the project root to give the
/// agent.
pub fn sources_dir() -> PathBuf {
    crate::tests_dir().join("fixtures")
}

/// Builds `file` (relative to `tests/fixtures`, e.g. `c/calls.c`) and returns
/// the executable's path.
pub fn build(file: &str, linking: Linking) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<(String, Linking), PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|poison| poison.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(&(file.to_owned(), linking)) {
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
    let out_dir = crate::target_dir()
        .join("fixtures")
        .join(linking.dir_name())
        .join(lang_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    let output = out_dir.join(&stem);
    let extra = extra_flags(&source);

    let mut command = match lang {
        Lang::C | Lang::Cpp => {
            let mut cmd = Command::new(if lang == Lang::C { "gcc" } else { "g++" });
            cmd.args(["-g", "-O0", "-fno-omit-frame-pointer", "-pthread"]);
            match linking {
                Linking::Pie => cmd.args(["-fPIE", "-pie"]),
                Linking::NoPie => cmd.args(["-fno-pie", "-no-pie"]),
            };
            cmd.args(&extra);
            cmd
        }
        Lang::Rust => {
            let mut cmd = Command::new("rustc");
            cmd.args(["--edition", "2021", "-g", "-C", "opt-level=0"]);
            if linking == Linking::NoPie {
                cmd.args(["-C", "relocation-model=static"]);
            }
            cmd.args(&extra);
            cmd
        }
        Lang::Go => {
            let mut cmd = go_build();
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
    built.insert((file.to_owned(), linking), output.clone());
    output
}

/// Debian's Go 1.19 (the package does not put `go` on PATH).
pub const GO: &str = "/usr/lib/go-1.19/bin/go";

/// `go build` as the fixtures are built: this toolchain only, no network,
/// no module, no cgo, caches under the target directory.
pub fn go_build() -> Command {
    let mut cmd = Command::new(GO);
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
