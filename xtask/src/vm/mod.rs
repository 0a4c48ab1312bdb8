//! The tasks that run on other kernels: `cargo xtask vm --kernel VERSION --
//! CMD…` runs one command as root in a VM.
//!
//! A VM boots one of Debian's cloud kernels ([`kernels`]) under QEMU's
//! software emulation with the host's root filesystem read-only, through
//! virtme-ng and virtiofsd ([`tools`]); [`boot`] runs the command and gets
//! its output and status back. `/dev/kvm` on this kind of machine is nested
//! PVM, which cannot boot these kernels, so everything in the guest is 10 to
//! 50 times slower than on the host.

mod boot;
pub mod kernels;
pub mod tools;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};

pub use kernels::Series;

/// The VM's size and limits, shared by both tasks.
#[derive(clap::Args, Clone, Debug)]
pub struct VmOptions {
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Guest memory (QEMU's syntax).
    #[arg(long, default_value = "4G")]
    pub memory: String,
    /// Stop a VM that has run this many minutes (0: no limit).
    #[arg(long, value_name = "MINUTES")]
    pub timeout: Option<u64>,
}

/// Installs the VM tools and fetches every kernel (`cargo xtask setup --vm`).
pub fn setup() -> Result<()> {
    tools::install()?;
    for series in Series::ALL {
        let kernel = kernels::prepare(series)?;
        println!(
            "setup: kernel {series}: {} ({})",
            kernel.release, kernel.version
        );
    }
    Ok(())
}

/// `cargo xtask vm`: runs `command` as root in a VM booted with `series`,
/// with the host's root filesystem (read-only) and working directory, and
/// returns its exit status.
pub fn vm(series: Series, options: &VmOptions, command: &[String]) -> Result<u8> {
    crate::require_root("vm")?;
    tools::install()?;
    let kernel = kernels::prepare(series)?;
    let vm = boot::Vm {
        kernel: &kernel,
        cpus: options.cpus,
        memory: options.memory.clone(),
        overlays: Vec::new(),
        timeout: minutes(options.timeout, None),
        results: results_dir(&kernel)?,
    };
    eprintln!(
        "vm: booting {} ({}) under emulation; output in {}",
        kernel.release,
        kernel.version,
        vm.results.display()
    );
    let cwd = std::env::current_dir()?;
    let outcome = vm.run(&cwd, &[], command)?;
    let Some(status) = outcome.status else {
        anyhow::bail!(
            "the VM ended without running the command (after {:.0?}); its console: {}",
            outcome.total,
            vm.results.join("console.log").display()
        );
    };
    eprintln!(
        "vm: {} exited {status}: boot {}, in all {:.1?}",
        kernel.release,
        outcome
            .boot
            .map_or("?".into(), |boot| format!("{:.1?}", boot)),
        outcome.total
    );
    Ok(u8::try_from(status).unwrap_or(1))
}

/// Where a VM's script, output and status go: `<target>/vm/<release>/`.
fn results_dir(kernel: &kernels::Kernel) -> Result<PathBuf> {
    Ok(target_dir()?.join("vm").join(&kernel.release))
}

/// The workspace's target directory, as cargo has it (`CARGO_TARGET_DIR`
/// and configuration included).
fn target_dir() -> Result<PathBuf> {
    let output = crate::cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cargo metadata")?;
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("cargo metadata printed no JSON")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// `--timeout` in minutes, 0 for none, `default` when not given.
fn minutes(option: Option<u64>, default: Option<Duration>) -> Option<Duration> {
    match option {
        Some(0) => None,
        Some(minutes) => Some(Duration::from_secs(minutes * 60)),
        None => default,
    }
}
