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
];

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
    tansu()
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

/// Whether `command` runs and succeeds (its output thrown away).
pub fn works(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
