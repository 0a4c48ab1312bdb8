//! The kernel's per-function state (the `FUNCTIONS` array), mapped into the
//! agent's memory: call counts and summed durations, read every second for
//! the overhead budget without a system call, and each function's
//! `--error-if` rule, written once before the probes go in.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::MapData;
use omegi_common::FunctionState;

/// Calls of one function so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FunctionCount {
    pub calls: u64,
    pub total_ns: u64,
    /// Calls shorter than the overhead budget's duration.
    pub short_calls: u64,
}

/// The `FUNCTIONS` map, mapped.
pub struct FunctionCounters {
    base: NonNull<FunctionState>,
    count: usize,
    length: usize,
}

// SAFETY: the mapping is shared memory the kernel updates; this side only
// reads counts (volatile, 8-byte aligned words) and writes rules before the
// probes run.
unsafe impl Send for FunctionCounters {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for FunctionCounters {}

impl FunctionCounters {
    /// Maps the first `count` entries of `map` (created `BPF_F_MMAPABLE`).
    pub fn map(map: &MapData, count: usize) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = count * std::mem::size_of::<FunctionState>();
        let length = bytes.div_ceil(page).max(1) * page;
        // SAFETY: a fresh shared mapping of the map's descriptor; the kernel
        // checks the length against the map's size.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(address.cast()).ok_or_else(io::Error::last_os_error)?,
            count,
            length,
        })
    }

    /// Number of functions.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Calls of every function so far, by function id.
    pub fn read(&self) -> Vec<FunctionCount> {
        (0..self.count)
            .map(|index| {
                // SAFETY: in bounds of the mapping; volatile because the
                // kernel writes these counters concurrently.
                unsafe {
                    let entry = self.base.as_ptr().add(index);
                    FunctionCount {
                        calls: std::ptr::read_volatile(&raw const (*entry).calls),
                        total_ns: std::ptr::read_volatile(&raw const (*entry).total_ns),
                        short_calls: std::ptr::read_volatile(&raw const (*entry).short_calls),
                    }
                }
            })
            .collect()
    }

    /// Sets the `--error-if` rule of function `id` (see
    /// [`FunctionState`](omegi_common::FunctionState)).
    pub fn set_rule(&self, id: u32, op: u32, bits: u32, value: i64) {
        let index = id as usize;
        if index >= self.count {
            return;
        }
        // SAFETY: in bounds; the kernel only reads these fields.
        unsafe {
            let entry = self.base.as_ptr().add(index);
            std::ptr::write_volatile(&raw mut (*entry).rule_value, value);
            std::ptr::write_volatile(&raw mut (*entry).rule_bits, bits);
            std::ptr::write_volatile(&raw mut (*entry).rule_op, op);
        }
    }
}

impl FunctionCounters {
    /// Marks function `id` as being detached by the overhead budget (or,
    /// `false`, not: its detach failed), see
    /// [`FunctionState::detached`](omegi_common::FunctionState::detached).
    pub fn set_detached(&self, id: u32, detached: bool) {
        let index = id as usize;
        if index >= self.count {
            return;
        }
        // SAFETY: in bounds; the kernel only reads this field.
        unsafe {
            let entry = self.base.as_ptr().add(index);
            std::ptr::write_volatile(&raw mut (*entry).detached, u32::from(detached));
        }
    }
}

impl Drop for FunctionCounters {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.length) };
    }
}
