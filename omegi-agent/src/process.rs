//! The traced process: finding its executable, starting a command so that
//! probes are in place before it runs, and noticing when it exits.

use std::{
    ffi::{CString, OsString},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use nix::{
    sys::wait::{waitpid, WaitStatus},
    unistd::Pid,
};

/// Problems with the process or program to trace.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    #[error("process {pid} has no executable to trace ({reason})")]
    NoExecutable { pid: u32, reason: String },
    #[error("process {0} has exited (its parent has not reaped it yet): nothing to trace")]
    Exited(u32),
    #[error("process {0} is a kernel thread: it runs no program to trace")]
    KernelThread(u32),
    #[error("process {0} exited while omegi was attaching")]
    ExitedDuringAttach(u32),
    #[error("command not found: {0}")]
    CommandNotFound(String),
    #[error("{0} does not exist")]
    NoSuchFile(PathBuf),
    #[error("cannot start {program}: {reason}")]
    Start { program: String, reason: String },
}

/// The executable of a running process, as a path the kernel can resolve
/// (`/proc/PID/exe` reaches the file even inside another mount namespace).
pub fn executable_of(pid: u32) -> Result<PathBuf, ProcessError> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if !proc_dir.exists() {
        return Err(ProcessError::NoSuchProcess(pid));
    }
    let exe = proc_dir.join("exe");
    match std::fs::read_link(&exe) {
        Ok(_) => Ok(exe),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(match read_stat(pid) {
            Some(stat) if stat.has_exited() => ProcessError::Exited(pid),
            Some(stat) if stat.is_kernel_thread() => ProcessError::KernelThread(pid),
            _ => ProcessError::NoExecutable {
                pid,
                reason: "it is exiting".into(),
            },
        }),
        Err(error) => Err(ProcessError::NoExecutable {
            pid,
            reason: error.to_string(),
        }),
    }
}

/// What `/proc/PID/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    /// `R`, `S`, `D`, `Z` (exited, not reaped), `X` (dead), …
    state: char,
    /// `PF_*` flags.
    flags: u64,
}

impl Stat {
    /// `PF_KTHREAD` from `linux/sched.h`.
    const PF_KTHREAD: u64 = 0x0020_0000;

    /// Parses `pid (comm) state ppid pgrp session tty tpgid flags …`; the
    /// command name may hold spaces and parentheses, so fields are counted
    /// from the last `)`.
    fn parse(text: &str) -> Option<Self> {
        let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let flags = fields.nth(5)?.parse().ok()?;
        Some(Self { state, flags })
    }

    fn has_exited(self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }

    fn is_kernel_thread(self) -> bool {
        self.flags & Self::PF_KTHREAD != 0
    }
}

fn read_stat(pid: u32) -> Option<Stat> {
    Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Where `program` is, searched in `PATH` as a shell would.
pub fn resolve_command(program: &OsString) -> Result<PathBuf, ProcessError> {
    let shown = program.to_string_lossy().into_owned();
    if Path::new(program).components().count() > 1 {
        let path = PathBuf::from(program);
        return if path.exists() {
            Ok(path)
        } else {
            Err(ProcessError::NoSuchFile(path))
        };
    }
    which::which(program).map_err(|_| ProcessError::CommandNotFound(shown))
}

/// The processes descended from `pid` (its children, theirs, …), from
/// each `/proc/PID/stat`'s parent field.
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|child| {
            let text = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
            let parent = fields.nth(1)?.parse().ok()?;
            Some((child, parent))
        })
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(child, _) in parents.iter().filter(|(_, of)| *of == parent) {
            if !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}

/// Whether the process exists and has not exited: a zombie (exited, not yet
/// reaped by its parent) still has a pid but runs nothing.
pub fn is_alive(pid: u32) -> bool {
    read_stat(pid).is_some_and(|stat| !stat.has_exited())
}

/// A forked child that waits, before `exec`, until tracing is in place.
///
/// It is forked while the agent still has one thread (before the async
/// runtime starts), so the child may only make async-signal-safe calls: it
/// reads one byte from a pipe, then `execv`s. If the agent fails and closes
/// the pipe, the child exits with 127 without ever running the program.
pub struct GatedChild {
    pid: u32,
    gate: OwnedFd,
    exec_error: OwnedFd,
    program: String,
}

impl GatedChild {
    /// Forks; the child waits at the gate. Call only while single-threaded.
    pub fn spawn(path: &Path, argv: &[OsString]) -> Result<Self, ProcessError> {
        let program = path.display().to_string();
        let start_error = |reason: String| ProcessError::Start {
            program: program.clone(),
            reason,
        };
        let c_path =
            CString::new(path.as_os_str().as_bytes()).map_err(|e| start_error(e.to_string()))?;
        let c_args = argv
            .iter()
            .map(|arg| CString::new(arg.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| start_error(e.to_string()))?;
        let mut arg_pointers: Vec<*const libc::c_char> =
            c_args.iter().map(|arg| arg.as_ptr()).collect();
        arg_pointers.push(std::ptr::null());

        let (gate_read, gate_write) = cloexec_pipe().map_err(|e| start_error(e.to_string()))?;
        let (error_read, error_write) = cloexec_pipe().map_err(|e| start_error(e.to_string()))?;

        // SAFETY: single-threaded (documented precondition); the child only
        // calls async-signal-safe functions on memory prepared above.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(start_error(std::io::Error::last_os_error().to_string()));
        }
        if pid == 0 {
            unsafe {
                libc::close(gate_write.as_raw_fd());
                libc::close(error_read.as_raw_fd());
                let mut byte = 0u8;
                if libc::read(gate_read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) != 1 {
                    libc::_exit(127);
                }
                libc::execv(c_path.as_ptr(), arg_pointers.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(
                    error_write.as_raw_fd(),
                    (&errno as *const i32).cast(),
                    std::mem::size_of::<i32>(),
                );
                libc::_exit(127);
            }
        }
        drop(gate_read);
        drop(error_write);
        Ok(Self {
            pid: pid as u32,
            gate: gate_write,
            exec_error: error_read,
            program,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Lets the child `exec` the program, and checks that it did.
    pub fn release(self) -> Result<u32, ProcessError> {
        let written = nix::unistd::write(&self.gate, &[1]);
        drop(self.gate);
        let mut errno = [0u8; 4];
        // EOF (0 bytes) means the exec succeeded and closed the pipe.
        let read = nix::unistd::read(&self.exec_error, &mut errno);
        match (written, read) {
            (Ok(1), Ok(0)) => Ok(self.pid),
            (_, Ok(4)) => {
                let _ = waitpid(Pid::from_raw(self.pid as i32), None);
                Err(ProcessError::Start {
                    program: self.program,
                    reason: std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno))
                        .to_string(),
                })
            }
            (written, read) => Err(ProcessError::Start {
                program: self.program,
                reason: format!("the gate pipe failed ({written:?}, {read:?})"),
            }),
        }
    }
}

fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// How a started program ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

/// Waits (blocking) for our child to end.
pub fn wait_child(pid: u32) -> ExitKind {
    loop {
        match waitpid(Pid::from_raw(pid as i32), None) {
            Ok(WaitStatus::Exited(_, code)) => return ExitKind::Code(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return ExitKind::Signal(signal as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return ExitKind::Code(0),
        }
    }
}

/// Resolves when process `pid` (not our child) has exited.
pub async fn wait_exit(pid: u32) -> std::io::Result<()> {
    // SAFETY: pidfd_open takes a pid and flags; the result is a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(error);
    }
    // SAFETY: a new descriptor owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns the descriptor, which stays open as long as it.
    let pidfd =
        unsafe { tokio::io::unix::AsyncFd::register(pidfd) }.map_err(|e| e.into_parts().1)?;
    let _ready = pidfd.readable().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_read_from_after_the_command_name() {
        let stat = Stat::parse("42 (a) b (c)) S 1 42 42 0 -1 4194560 120 0 0 0").unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.flags, 4194560);
        assert!(!stat.has_exited() && !stat.is_kernel_thread());
        let kthread = Stat::parse("2 (kthreadd) S 0 0 0 0 -1 2129984 0 0").unwrap();
        assert!(kthread.is_kernel_thread());
        assert!(Stat::parse("7 (x) Z 1 7 7 0 -1 4227084 0")
            .unwrap()
            .has_exited());
        assert_eq!(Stat::parse("7 (x"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(is_alive(std::process::id()));
        assert!(read_stat(std::process::id()).is_some());
    }
}
