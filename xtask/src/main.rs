//! `cargo xtask`: the project's tasks.
//!
//! - `setup`: installs what building and testing need on a fresh machine
//!   (safe to run again; quick when everything is there); `--vm` adds what
//!   the VM tasks need.
//! - `build-ebpf`: builds the eBPF object alone.
//! - `test`: setup, then every test; `--kernel` runs the end-to-end suite in
//!   a VM on another kernel instead.
//! - `vm`: one command as root in a VM on another kernel.
//! - `demo`: setup, then omegi tracing a bundled demo program.
//! - `bench`: what omegi costs a traced program, against bpftrace; writes
//!   `BENCHMARKS.md`.

mod bench;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "omegi's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the build and test prerequisites (apt packages, nightly
    /// rust-src, bpf-linker, the tansu Kafka broker, the OpenTelemetry
    /// Python peers).
    Setup {
        /// Also what the VM tasks need (QEMU, virtme-ng, virtiofsd) and the
        /// kernels they boot.
        #[arg(long)]
        vm: bool,
    },
    /// Build the eBPF programs alone (building the agent also does this).
    BuildEbpf,
    /// Set up, then run every test (needs root: the tests attach real uprobes).
    Test {
        /// Run the end-to-end suite in a VM on this Debian kernel instead:
        /// 5.10, 6.1, 6.12, or `all` (one VM after the other).
        #[arg(long, value_name = "VERSION", value_parser = vm::parse_kernels)]
        kernel: Option<vm::Kernels>,
        #[command(flatten)]
        vm: vm::VmOptions,
        /// Passed to `cargo test` (e.g. a test name filter after `--`); with
        /// `--kernel`, to each test binary (a filter, `--nocapture`, …).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run one command as root in a VM booted with another Debian kernel, the
    /// host's root filesystem shared read-only; exits with its status.
    Vm {
        /// The kernel: 5.10, 6.1 or 6.12.
        #[arg(long, value_name = "VERSION")]
        kernel: vm::Series,
        #[command(flatten)]
        vm: vm::VmOptions,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Set up, then trace the bundled demo program and print its call trees.
    Demo,
    /// Measure what omegi costs a traced program, side by side with bpftrace
    /// (the kernel's floor), and write BENCHMARKS.md (needs root).
    Bench {
        /// Repetitions of each timed configuration (medians are reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// A shorter run: fewer calls, rates and functions.
        #[arg(long)]
        quick: bool,
        /// Where to write the report.
        #[arg(long, default_value = "BENCHMARKS.md")]
        output: PathBuf,
        /// Run one case only and print it, writing no report: `python` or
        /// `sqlite`.
        #[arg(long, value_name = "CASE")]
        only: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    let done = |result: Result<()>| result.map(|()| 0);
    let result = match Cli::parse().task {
        Task::Setup { vm } => {
            done(setup::all().and_then(|()| if vm { vm::setup() } else { Ok(()) }))
        }
        Task::BuildEbpf => done(build_ebpf()),
        Task::Test {
            kernel: Some(kernels),
            vm,
            args,
        } => vm::test(&kernels, &vm, &args),
        Task::Test { args, .. } => done(test(&args)),
        Task::Vm {
            kernel,
            vm,
            command,
        } => vm::vm(kernel, &vm, &command),
        Task::Demo => done(demo()),
        Task::Bench {
            reps,
            quick,
            output,
            only,
        } => done(bench::bench(&bench::Options {
            reps,
            quick,
            only,
            output: if output.is_absolute() {
                output
            } else {
                root().join(output)
            },
        })),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(error) => {
            eprintln!("cargo xtask: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// Runs a command to completion, failing on a non-zero exit.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    command
}

fn build_ebpf() -> Result<()> {
    setup::check_build_tools()?;
    let target_dir = root().join("target/ebpf");
    let mut command = Command::new("rustup");
    command
        .args(["run", "nightly", "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(root().join("omegi-ebpf"))
        .env("PATH", setup::path_with_tools())
        .env_remove("RUSTUP_TOOLCHAIN");
    run(&mut command)?;
    println!(
        "eBPF object: {}",
        target_dir
            .join("bpfel-unknown-none/release/omegi")
            .display()
    );
    Ok(())
}

pub fn require_root(task: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("`cargo xtask {task}` attaches real uprobes and needs root: run `sudo -E cargo xtask {task}`");
    }
    Ok(())
}

extern "C" {
    fn geteuid() -> u32;
}

fn test(args: &[String]) -> Result<()> {
    setup::all()?;
    require_root("test")?;
    run(cargo().args(["build", "--workspace"]))?;
    run(cargo()
        .args(["test", "--workspace"])
        .args(args)
        .env("OMEGI_TANSU", setup::tansu_binary())
        .env("OMEGI_PYTHON_OTEL", setup::python_otel())
        .env("OMEGI_GO_TOOLCHAINS", setup::go_toolchains_dir()))
}

fn demo() -> Result<()> {
    require_root("demo")?;
    setup::build_tools()?;
    run(cargo().args(["build", "--release", "-p", "omegi-agent"]))?;
    let source = root().join("tests/fixtures/rust/demo.rs");
    let out_dir = root().join("target/demo");
    std::fs::create_dir_all(&out_dir)?;
    let demo = out_dir.join("shop");
    run(Command::new("rustc")
        .args(["--edition", "2021", "-g", "-C", "opt-level=0", "-o"])
        .arg(&demo)
        .arg(&source))?;
    println!("$ sudo omegi-agent --project-root tests/fixtures -- target/demo/shop\n");
    run(Command::new(root().join("target/release/omegi-agent"))
        .arg("--project-root")
        .arg(root().join("tests/fixtures"))
        .arg("--")
        .arg(&demo))
}
