//! The Python eval hook (`--python-eval-hook`, opt-in): from 3.11 CPython
//! runs a Python-to-Python call inside the running eval loop, unseen by a
//! probe on the eval function, unless `interp->eval_frame` (PEP 523) is set;
//! then every call goes through that pointer. Setting it to the default
//! eval function itself changes nothing but that: each call enters the eval
//! function, where the probes see it. This is the one place omegi writes
//! into a traced process, so it is asked for, and undone at detach (only if
//! the pointer still holds what we wrote). An agent killed with `kill -9`
//! leaves the pointer set: the program runs on correctly, with calls a
//! little slower.
//!
//! The interpreter is found through `_PyRuntime.interpreters.main`; a
//! process started by the agent has none until the interpreter is set up,
//! so [`EvalHook::install_when_ready`] waits for it.

use std::{
    fs::File,
    os::unix::fs::FileExt,
    path::Path,
    time::{Duration, Instant},
};

use crate::discovery::python::{load_bias, PythonTarget};

/// Why the hook could not be set.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("the interpreter's eval-frame pointer could not be found in {0}")]
    NoSites(String),
    #[error("process {pid} has not mapped {library}")]
    NotMapped { pid: u32, library: String },
    #[error("process {pid}'s memory cannot be accessed: {source}")]
    Memory { pid: u32, source: std::io::Error },
    #[error("process {0} has no Python interpreter set up yet")]
    NotReady(u32),
    #[error("process {0} ended before its interpreter was set up")]
    Gone(u32),
    #[error(
        "process {0} already has an eval-frame function (a debugger or profiler using PEP 523); \
         omegi leaves it alone"
    )]
    Taken(u32),
}

/// The hook as set in one process.
#[derive(Debug)]
pub struct EvalHook {
    pid: u32,
    /// Of `interp->eval_frame` in the process.
    address: u64,
    /// What was written there.
    value: u64,
    /// Where the interpreter's file is mapped (its load bias).
    bias: u64,
}

impl EvalHook {
    /// Sets the hook in `pid`, whose interpreter is `python` (read from
    /// `library`, whose bytes are `data`).
    pub fn install(
        pid: u32,
        python: &PythonTarget,
        library: &Path,
        data: &[u8],
    ) -> Result<Self, HookError> {
        let sites = python
            .hook
            .ok_or_else(|| HookError::NoSites(python.library.display().to_string()))?;
        let bias = load_bias(pid, library, data).ok_or_else(|| HookError::NotMapped {
            pid,
            library: python.library.display().to_string(),
        })?;
        let memory = memory(pid)?;
        let interpreter = read_u64(&memory, pid, sites.main_interpreter.wrapping_add(bias))?;
        if interpreter == 0 {
            return Err(HookError::NotReady(pid));
        }
        let address = interpreter.wrapping_add(sites.eval_frame_offset);
        let value = sites.eval_function.wrapping_add(bias);
        match read_u64(&memory, pid, address)? {
            0 => {}
            current if current == value => {}
            _ => return Err(HookError::Taken(pid)),
        }
        memory
            .write_at(&value.to_ne_bytes(), address)
            .map_err(|source| HookError::Memory { pid, source })?;
        Ok(Self {
            pid,
            address,
            value,
            bias,
        })
    }

    /// As [`install`](Self::install), waiting up to `patience` for a
    /// starting process's interpreter to be set up.
    pub fn install_when_ready(
        pid: u32,
        python: &PythonTarget,
        library: &Path,
        data: &[u8],
        patience: Duration,
    ) -> Result<Self, HookError> {
        let deadline = Instant::now() + patience;
        loop {
            if !crate::process::is_alive(pid) {
                return Err(HookError::Gone(pid));
            }
            match Self::install(pid, python, library, data) {
                Err(HookError::NotReady(_) | HookError::NotMapped { .. })
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_micros(200));
                }
                other => return other,
            }
        }
    }

    /// Sets the pointer back to none, if it still holds ours, in the
    /// process and in the processes it forked since (a gunicorn master's
    /// workers: a copy of its memory, hook included), which map the
    /// interpreter (`library`, bytes `data`) where it did and have not run
    /// another program. Returns how many forks it was set back in.
    pub fn remove(self, library: &Path, data: &[u8]) -> Result<usize, HookError> {
        let forks: Vec<u32> = crate::process::descendants(self.pid)
            .into_iter()
            .filter(|&child| load_bias(child, library, data) == Some(self.bias))
            .collect();
        let mut set_back = 0;
        for &child in &forks {
            // A fork that has exited since is no failure.
            if matches!(self.set_back(child), Ok(true)) {
                set_back += 1;
            }
        }
        self.set_back(self.pid)?;
        Ok(set_back)
    }

    /// Writes none over the pointer in `pid` if it holds ours; whether it
    /// did.
    fn set_back(&self, pid: u32) -> Result<bool, HookError> {
        let result = memory(pid).and_then(|memory| {
            if read_u64(&memory, pid, self.address)? != self.value {
                return Ok(false);
            }
            memory
                .write_at(&0u64.to_ne_bytes(), self.address)
                .map_err(|source| HookError::Memory { pid, source })?;
            Ok(true)
        });
        match result {
            // The process has exited, and its memory with it.
            Err(_) if !crate::process::is_alive(pid) => Ok(false),
            other => other,
        }
    }
}

fn memory(pid: u32) -> Result<File, HookError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|source| HookError::Memory { pid, source })
}

fn read_u64(memory: &File, pid: u32, address: u64) -> Result<u64, HookError> {
    let mut bytes = [0u8; 8];
    memory
        .read_exact_at(&mut bytes, address)
        .map_err(|source| HookError::Memory { pid, source })?;
    Ok(u64::from_ne_bytes(bytes))
}
