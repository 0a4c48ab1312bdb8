//! The tasks that run on other kernels: `cargo xtask vm --kernel VERSION --
//! CMD…` (one command as root in a VM) and `cargo xtask test --kernel
//! VERSION|all` (the end-to-end suite in a VM).
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

use anyhow::{bail, Context, Result};

use crate::{run, setup};

pub use kernels::Series;

/// The VM's size and limits, shared by both tasks.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "VM")]
pub struct VmOptions {
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Guest memory (QEMU's syntax).
    #[arg(long, default_value = "4G")]
    pub memory: String,
    /// Stop a VM that has run this many minutes (0: no limit; the default
    /// is none for `vm`, 80 for `test --kernel`).
    #[arg(long, value_name = "MINUTES")]
    pub timeout: Option<u64>,
}

/// The kernels `--kernel` names.
#[derive(Clone, Debug)]
pub struct Kernels(pub Vec<Series>);

/// `--kernel`: one series, or `all`.
pub fn parse_kernels(text: &str) -> Result<Kernels> {
    if text == "all" {
        Ok(Kernels(Series::ALL.to_vec()))
    } else {
        Ok(Kernels(vec![text.parse()?]))
    }
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
        silence: None,
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
        bail!(
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

/// The end-to-end suites that run in the VM: the ones whose outcome depends
/// on the kernel. The Kafka and OTLP suites test exporters, which do not,
/// and stay on the host.
const KERNEL_SUITES: &[&str] = &[
    "kernels",
    "foundation",
    "errors",
    "discovery",
    "runtimes",
    "overhead",
    "python",
    "http",
];

/// What [`boot`] waits for when `--timeout` is not given: CI has 90 minutes
/// in all.
const SUITE_TIMEOUT: Duration = Duration::from_secs(80 * 60);

/// How long the suite may print nothing before its VM is taken to hang:
/// libtest reports a test still running after a minute, and no test takes
/// ten under emulation.
const SUITE_SILENCE: Duration = Duration::from_secs(12 * 60);

/// How many times longer the harness waits for a run in the VM
/// (`OMEGI_TEST_TIME_SCALE`, when the environment does not set it).
const TIME_SCALE: &str = "5";

/// `cargo xtask test --kernel`: builds the suites and the fixtures on the
/// host, then runs the suites in a VM per kernel, one after the other, and
/// returns the first failing suite's status (0 when all passed).
pub fn test(kernels: &Kernels, options: &VmOptions, args: &[String]) -> Result<u8> {
    crate::require_root("test")?;
    setup::build_tools()?;
    tools::install()?;
    let suites = build_suites()?;
    // The fixtures are built on the host, where compilers run at full speed.
    run(crate::cargo().args([
        "run",
        "--quiet",
        "-p",
        "omegi-tests",
        "--bin",
        "build-fixtures",
    ]))?;
    let target = target_dir()?;
    let mut summary = Vec::new();
    let mut code = 0;
    for &series in &kernels.0 {
        let kernel = kernels::prepare(series)?;
        let vm = boot::Vm {
            kernel: &kernel,
            cpus: options.cpus,
            memory: options.memory.clone(),
            // Fixtures, scratch directories and Go's cache are under the
            // target directory: the guest writes there, into its own memory.
            overlays: vec![target.clone()],
            timeout: minutes(options.timeout, Some(SUITE_TIMEOUT)),
            silence: Some(SUITE_SILENCE),
            results: results_dir(&kernel)?,
        };
        eprintln!(
            "vm: running the end-to-end suite on {} ({}) under emulation; logs in {}",
            kernel.release,
            kernel.version,
            vm.results.display()
        );
        let mut env = vec![(FIXTURES_PREBUILT_ENV, "1".to_owned())];
        if std::env::var_os("OMEGI_TEST_TIME_SCALE").is_none() {
            env.push(("OMEGI_TEST_TIME_SCALE", TIME_SCALE.to_owned()));
        }
        let script = suite_script(&vm.results, &suites, args);
        // cargo runs integration tests in their package's directory.
        let cwd = crate::root().join("omegi-agent");
        let line = match vm.run(&cwd, &env, &["/bin/sh".into(), "-c".into(), script]) {
            Ok(outcome) => {
                let status = outcome.status.unwrap_or(-1);
                if status != 0 && code == 0 {
                    code = u8::try_from(status).unwrap_or(1);
                }
                let result = match outcome.status {
                    Some(0) => "passed".to_owned(),
                    Some(status) => format!("failed ({status})"),
                    None => format!(
                        "no result (see {})",
                        vm.results.join("console.log").display()
                    ),
                };
                let failed = std::fs::read_to_string(vm.results.join("failed")).unwrap_or_default();
                format!(
                    "{series:<5} {:<28} {result}{}: boot {}, in all {:.0?}",
                    kernel.release,
                    if failed.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " in {}",
                            failed.split_whitespace().collect::<Vec<_>>().join(", ")
                        )
                    },
                    outcome
                        .boot
                        .map_or("?".into(), |boot| format!("{boot:.0?}")),
                    outcome.total
                )
            }
            Err(error) => {
                code = code.max(1);
                format!("{series:<5} {:<28} {error:#}", kernel.release)
            }
        };
        eprintln!("vm: {line}");
        summary.push(line);
    }
    if summary.len() > 1 {
        eprintln!("vm: the end-to-end suite on each kernel:");
        for line in &summary {
            eprintln!("  {line}");
        }
    }
    Ok(code)
}

/// The variable that lets the tests use the fixtures built on the host
/// (kept in step with `omegi_tests::fixtures::PREBUILT_ENV`).
const FIXTURES_PREBUILT_ENV: &str = "OMEGI_FIXTURES_PREBUILT";

/// Builds the test binaries of [`KERNEL_SUITES`] (and the agent) on the
/// host and returns them by suite, in that order.
fn build_suites() -> Result<Vec<(String, PathBuf)>> {
    let mut command = crate::cargo();
    command.args([
        "test",
        "-p",
        "omegi-agent",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for suite in KERNEL_SUITES {
        command.args(["--test", suite]);
    }
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the test binaries failed ({})", output.status);
    }
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(executable)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        if KERNEL_SUITES.contains(&name) {
            found.push((name.to_owned(), executable.into()));
        }
    }
    found.sort_by_key(|(name, _)| KERNEL_SUITES.iter().position(|suite| suite == name));
    if found.len() != KERNEL_SUITES.len() {
        bail!(
            "cargo built {} of the {} suites: {found:?}",
            found.len(),
            KERNEL_SUITES.len()
        );
    }
    Ok(found)
}

/// The guest's command: every suite with `args`, each one's status and time
/// in `<results>/suites`, the failing ones in `<results>/failed`; it exits
/// with the first failing suite's status.
fn suite_script(
    results: &std::path::Path,
    suites: &[(String, PathBuf)],
    args: &[String],
) -> String {
    let results = boot::quote(&results.to_string_lossy());
    let args: Vec<String> = args.iter().map(|arg| boot::quote(arg)).collect();
    let mut script = format!("status=0\nr={results}\n");
    for (name, exe) in suites {
        script.push_str(&format!(
            "echo; echo \"vm: suite {name}\"; start=$(date +%s)\n\
             {} {}\n\
             rc=$?; echo \"{name} $rc $(( $(date +%s) - start ))s\" >>\"$r/suites\"\n\
             if [ $rc != 0 ]; then echo {name} >>\"$r/failed\"; [ $status = 0 ] && status=$rc; fi\n",
            boot::quote(&exe.to_string_lossy()),
            args.join(" ")
        ));
    }
    script.push_str("exit $status\n");
    script
}
