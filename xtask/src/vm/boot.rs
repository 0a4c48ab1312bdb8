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
    /// Guest CPUs (QEMU runs one host thread per CPU under TCG).
    pub cpus: u32,
    /// Guest memory, as QEMU takes it (`4G`).
    pub memory: String,
    /// Host directories the guest may write to, the writes kept in the
    /// guest's memory only (overlayfs; the host's copy is not changed).
    pub overlays: Vec<PathBuf>,
    /// Stop the VM after this long.
    pub timeout: Option<Duration>,
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
        let ended = loop {
            stdout.pump();
            stderr.pump();
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
                stop(&mut child);
                break Err("timed out".to_owned());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let total = start.elapsed();
        stdout.pump();
        stderr.pump();
        if let Err(why) = ended {
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

    fn pump(&mut self) {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let Some(file) = &mut self.file else {
            return;
        };
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_ok() && !bytes.is_empty() {
            if self.to_stderr {
                let _ = std::io::stderr().write_all(&bytes);
            } else {
                let mut out = std::io::stdout();
                let _ = out.write_all(&bytes);
                let _ = out.flush();
            }
        }
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
