//! Booting a kernel under QEMU (through virtme-ng) to run one command as
//! root with the host's root filesystem, and getting its output and exit
//! status back.
//!
//! Without udev on the host, virtme-ng's init finds none of its console
//! ports: `vng` prints nothing of the guest's and exits 255 whatever the
//! command did. So the command runs from a script that writes its stdout,
//! stderr and exit status into a directory shared read-write with the guest
//! (`--rwdir`); the host copies the output through while the VM runs and
//! reads the status at the end.

use std::{
    fs::File,
    io::{Read, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{kernels::Kernel, tools};

/// How one VM is set up.
pub struct Vm<'a> {
    pub kernel: &'a Kernel,
    /// Guest CPUs (all run in turn by one QEMU thread: see `run`).
    pub cpus: u32,
    /// Guest memory, as QEMU takes it (`4G`).
    pub memory: String,
    /// Host directories the guest may write to, the writes kept in the
    /// guest's memory only (overlayfs; the host's copy is not changed).
    pub overlays: Vec<PathBuf>,
    /// Stop the VM after this long.
    pub timeout: Option<Duration>,
    /// Stop the VM when the command has printed nothing for this long: a
    /// guest that hangs (a test waiting forever, a kernel that locked up)
    /// then fails in minutes with its console shown, instead of using up
    /// the whole timeout.
    pub silence: Option<Duration>,
    /// Where the script, the output, the status and the VM's console log go;
    /// emptied first. Shared read-write with the guest at the same path.
    pub results: PathBuf,
}

/// How a command in a VM ended.
pub struct Outcome {
    /// The command's exit status (128 + N for a signal), or `None` when the
    /// VM ended without one (it did not boot, crashed, or timed out).
    pub status: Option<i32>,
    /// From starting QEMU to the command's start in the guest.
    pub boot: Option<Duration>,
    /// From starting QEMU to its end.
    pub total: Duration,
}

/// Environment variables passed from the host to the guest's command; the
/// guest's init starts it with an environment of its own.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TERM",
    "LANG",
    "LC_ALL",
    "RUST_BACKTRACE",
    "RUST_LOG",
    "CARGO_TARGET_DIR",
];

impl Vm<'_> {
    /// Runs `command` (program and arguments) in the guest as root, in
    /// `cwd`, with the host's variables named in [`PASSED_ENV`], those
    /// starting with `OMEGI_`, and `env` on top. The guest's stdout and
    /// stderr are copied to ours as they come.
    pub fn run(&self, cwd: &Path, env: &[(&str, String)], command: &[String]) -> Result<Outcome> {
        let results = &self.results;
        let _ = std::fs::remove_dir_all(results);
        std::fs::create_dir_all(results)
            .with_context(|| format!("cannot create {}", results.display()))?;
        let script = results.join("vm.sh");
        std::fs::write(&script, guest_script(results, cwd, env, command))?;

        let console = File::create(results.join("console.log"))?;
        let mut vng = Command::new(tools::vng_binary());
        vng.arg("--disable-kvm")
            .arg("--run")
            .arg(self.kernel.vmlinuz())
            .args(["--cpus", &self.cpus.to_string(), "--memory", &self.memory])
            // The kernel's console goes to the log: the only trace of a
            // guest that does not get as far as the command.
            .arg("--verbose")
            // A CPU stuck in the kernel then shows every CPU's stack, not
            // only its own: the one it waits on is the one that says why.
            .args(["--append", "softlockup_all_cpu_backtrace=1"])
            // One host thread runs every vCPU in turn. With a thread per
            // vCPU (QEMU's default under TCG), a uprobe written into code
            // another vCPU runs could wedge that vCPU: the writer then
            // waited forever for its TLB-flush IPI (a soft lockup in
            // flush_tlb_mm_range from uprobe_write_opcode) or the whole
            // guest stopped, in about half the runs of the Python suite.
            .arg("--qemu-opts=-accel tcg,thread=single")
            .arg(format!("--rwdir={}", results.display()));
        for dir in &self.overlays {
            vng.arg(format!("--overlay-rwdir={}", dir.display()));
        }
        vng.arg("--")
            .arg("/bin/sh")
            .arg(&script)
            .current_dir(results)
            .env("PATH", tools::path())
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            // Its own process group, so that a timeout or Ctrl-C can stop
            // vng, QEMU and virtiofsd together.
            .process_group(0);

        let start = Instant::now();
        install_interrupt_handler();
        let mut child = vng
            .spawn()
            .with_context(|| format!("cannot start {}", tools::vng_binary().display()))?;
        let mut stdout = Tail::new(results.join("stdout"), false);
        let mut stderr = Tail::new(results.join("stderr"), true);
        let started = results.join("started");
        let mut boot = None;
        let mut last_output = Instant::now();
        let ended = loop {
            if stdout.pump() | stderr.pump() {
                last_output = Instant::now();
            }
            if boot.is_none() && started.exists() {
                boot = Some(start.elapsed());
            }
            if let Some(status) = child.try_wait()? {
                break Ok(status);
            }
            let signal = INTERRUPTED.load(Ordering::Relaxed);
            if signal != 0 {
                stop(&mut child);
                break Err(format!("was stopped (xtask got signal {signal})"));
            }
            if self
                .timeout
                .is_some_and(|timeout| start.elapsed() > timeout)
            {
                show_processes(&child);
                stop(&mut child);
                break Err("timed out".to_owned());
            }
            if let Some(silence) = self.silence {
                if last_output.elapsed() > silence {
                    show_processes(&child);
                    stop(&mut child);
                    break Err(format!(
                        "printed nothing for {} minutes and was stopped",
                        silence.as_secs() / 60
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let total = start.elapsed();
        stdout.pump();
        stderr.pump();
        if let Err(why) = ended {
            show_console_tail(&results.join("console.log"));
            bail!(
                "the VM {why} after {:.0?}; its console: {}",
                total,
                results.join("console.log").display()
            );
        }
        let status = std::fs::read_to_string(results.join("status"))
            .ok()
            .and_then(|text| text.trim().parse().ok());
        Ok(Outcome {
            status,
            boot,
            total,
        })
    }
}

/// The script the guest runs: it marks its start, mounts bpffs (virtme-ng
/// mounts debugfs, tracefs and cgroup2 but not bpffs), and runs the command
/// with its output and status in the results directory.
fn guest_script(results: &Path, cwd: &Path, env: &[(&str, String)], command: &[String]) -> String {
    let mut script =
        String::from("#!/bin/sh\n# Written by cargo xtask: the command a VM runs, as root.\n");
    let results = quote(&results.to_string_lossy());
    script.push_str(&format!("r={results}\n: >\"$r/started\"\n"));
    script.push_str("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n");
    script.push_str(WATCHDOG);
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(key, _)| PASSED_ENV.contains(&key.as_str()) || key.starts_with("OMEGI_"))
        .collect();
    vars.extend(
        env.iter()
            .map(|(key, value)| (key.to_string(), value.clone())),
    );
    for (key, value) in vars {
        script.push_str(&format!("export {key}={}\n", quote(&value)));
    }
    script.push_str(&format!(
        "cd {} || {{ echo 125 >\"$r/status\"; exit; }}\n",
        quote(&cwd.to_string_lossy())
    ));
    let words: Vec<String> = command.iter().map(|word| quote(word)).collect();
    script.push_str(&format!(
        "{} <\"/dev/null\" >\"$r/stdout\" 2>\"$r/stderr\"\necho $? >\"$r/status\"\n",
        words.join(" ")
    ));
    script
}

/// Every five minutes, the guest's user processes and the kernel's list of
/// blocked tasks (sysrq `w`) go to the console, not to the shared directory
/// (a hang may be in the filesystem the output goes to): when a VM is
/// stopped for a hang, the console's tail then says what was stuck where.
const WATCHDOG: &str = "(while sleep 300; do \
    { echo \"vm watchdog: $(cut -d' ' -f1 /proc/uptime) s up\"; \
      ps -e -o pid,ppid,stat,etimes,wchan:28,args | grep -v ']$'; } >/dev/console 2>&1; \
    echo w >/proc/sysrq-trigger; done) &
";

/// `text` as one shell word.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Copies what a file gains to our stdout or stderr.
struct Tail {
    path: PathBuf,
    file: Option<File>,
    to_stderr: bool,
}

impl Tail {
    fn new(path: PathBuf, to_stderr: bool) -> Self {
        Self {
            path,
            file: None,
            to_stderr,
        }
    }

    /// Copies what came since the last call; whether anything did.
    fn pump(&mut self) -> bool {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let Some(file) = &mut self.file else {
            return false;
        };
        let mut bytes = Vec::new();
        let grew = file.read_to_end(&mut bytes).is_ok() && !bytes.is_empty();
        if grew {
            if self.to_stderr {
                let _ = std::io::stderr().write_all(&bytes);
            } else {
                let mut out = std::io::stdout();
                let _ = out.write_all(&bytes);
                let _ = out.flush();
            }
        }
        grew
    }
}

/// How much of the console a VM that did not end by itself leaves in our
/// output: CI keeps only what we print, not the log file.
const CONSOLE_TAIL_LINES: usize = 80;

/// Prints the console's last lines to stderr: the kernel's own account of
/// a hang (soft lockups, hung tasks, the watchdog's process list).
fn show_console_tail(console: &Path) {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..];
    eprintln!("vm: the console's last {} lines:", tail.len());
    for line in tail {
        eprintln!("  | {line}");
    }
}

/// The signal that asked us to stop (0: none yet).
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(signal: libc::c_int) {
    INTERRUPTED.store(signal, Ordering::Relaxed);
}

/// Ctrl-C and SIGTERM stop the VM (which is in a process group of its own
/// and so does not get the terminal's signal) rather than leave it running.
fn install_interrupt_handler() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Lists vng's process group on the host: whether QEMU and virtiofsd were
/// still there when the guest was taken to hang.
fn show_processes(child: &Child) {
    let listing = Command::new("ps")
        .args(["-e", "-o", "pgid=,pid=,stat=,etime=,time=,args="])
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    let group = child.id().to_string();
    eprintln!("vm: the VM's processes on the host (pgid pid stat elapsed cpu command):");
    for line in listing.lines() {
        if line.split_whitespace().next() == Some(group.as_str()) {
            eprintln!("  {}", line.trim());
        }
    }
}

/// Stops vng's process group (vng, QEMU, virtiofsd): SIGTERM, then SIGKILL.
fn stop(child: &mut Child) {
    let group = -(child.id() as libc::pid_t);
    // SAFETY: kill has no memory preconditions; the group is the child's own.
    unsafe { libc::kill(group, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { libc::kill(group, libc::SIGKILL) };
    let _ = child.wait();
}
