//! Reading a few CPython objects of a live process (`/proc/PID/mem`, read
//! only): what the kernel side cannot afford, such as a dictionary lookup.
//! Layouts from CPython's headers (`cpython/dictobject.h`,
//! `internal/pycore_dict.h`), as `gdb ptype /o` shows them in the pyenv
//! builds; everything read is bounded and checked, and any failure (the
//! process gone, a freed object) is `None`.

use std::{fs::File, os::unix::fs::FileExt};

use super::lines::LineTable;
use crate::discovery::python::PythonTarget;

/// `PyTypeObject.tp_dict`.
const TP_DICT: u64 = 264;
/// `PyDictObject.ma_keys`, `ma_values`.
const MA_KEYS: u64 = 32;
const MA_VALUES: u64 = 40;
/// `PyASCIIObject.state` and its `compact` and `ascii` bits.
const STATE: u64 = 32;
const COMPACT_ASCII: u32 = (1 << 5) | (1 << 6);
/// A class's dictionary has a few dozen keys; a corrupt one is not walked
/// far.
const MAX_ENTRIES: u64 = 512;

/// The `__module__` of type `type_object` in process `pid`.
pub fn type_module(pid: u32, type_object: u64, python: &PythonTarget) -> Option<String> {
    if type_object == 0 {
        return None;
    }
    let memory = Memory(File::open(format!("/proc/{pid}/mem")).ok()?);
    let dict = memory.word(type_object + TP_DICT)?;
    if dict == 0 || memory.word(dict + MA_VALUES)? != 0 {
        // No dictionary, or a split one (not a class's).
        return None;
    }
    let keys = memory.word(dict + MA_KEYS)?;
    let table = EntryTable::of(&memory, keys, python.minor)?;
    let ascii_data = u64::from(python.offsets.ascii_data);
    (0..table.entries.min(MAX_ENTRIES)).find_map(|index| {
        let entry = table.first + index * table.entry_size;
        let key = memory.word(entry + table.key_at)?;
        if memory.ascii(key, ascii_data)? != "__module__" {
            return None;
        }
        memory.ascii(memory.word(entry + table.key_at + 8)?, ascii_data)
    })
}

/// `PyBytesObject.ob_size` and `ob_sval`.
const BYTES_SIZE: u64 = 16;
const BYTES_DATA: u64 = 32;
/// A line table of more than this is no real one (a long module's is a
/// few kilobytes).
const MAX_LINE_TABLE: u64 = 1 << 20;

/// The line table of code object `code` in process `pid`, whose first line
/// is `first_line`.
pub fn line_table(
    pid: u32,
    code: u64,
    first_line: u32,
    python: &PythonTarget,
) -> Option<LineTable> {
    // `co_linetable`.
    let table_at = if python.minor == 10 { 120 } else { 136 };
    let memory = Memory(File::open(format!("/proc/{pid}/mem")).ok()?);
    let bytes = memory.word(code + table_at)?;
    if bytes == 0 {
        return None;
    }
    let length = memory.word(bytes + BYTES_SIZE)?;
    if length > MAX_LINE_TABLE {
        return None;
    }
    let mut table = vec![0u8; length as usize];
    memory
        .0
        .read_exact_at(&mut table, bytes + BYTES_DATA)
        .ok()?;
    Some(LineTable {
        first_line,
        table,
        locations: python.minor >= 11,
    })
}

/// Where a dictionary's entries are.
struct EntryTable {
    first: u64,
    entries: u64,
    entry_size: u64,
    /// Of the key in an entry (the value follows it).
    key_at: u64,
}

impl EntryTable {
    fn of(memory: &Memory, keys: u64, minor: u8) -> Option<Self> {
        if minor == 10 {
            // dk_size @8, dk_nentries @32, indices @40 sized by dk_size;
            // entries {hash, key, value}.
            let size = memory.word(keys + 8)?;
            let index_bytes = match size {
                0..=0xff => 1,
                0x100..=0xffff => 2,
                0x1_0000..=0xffff_ffff => 4,
                _ => 8,
            };
            return Some(Self {
                first: keys + 40 + size.checked_mul(index_bytes)?,
                entries: memory.word(keys + 32)?,
                entry_size: 24,
                key_at: 8,
            });
        }
        // dk_log2_index_bytes @9, dk_kind @10, dk_nentries @24, indices
        // @32; entries {key, value} for str-only keys, else {hash, key, value}.
        let header = memory.bytes::<16>(keys)?;
        let index_bytes = 1u64.checked_shl(u32::from(header[9]))?;
        let general = header[10] == 0;
        Some(Self {
            first: keys + 32 + index_bytes,
            entries: memory.word(keys + 24)?,
            entry_size: if general { 24 } else { 16 },
            key_at: if general { 8 } else { 0 },
        })
    }
}

struct Memory(File);

impl Memory {
    fn bytes<const N: usize>(&self, address: u64) -> Option<[u8; N]> {
        let mut bytes = [0u8; N];
        self.0.read_exact_at(&mut bytes, address).ok()?;
        Some(bytes)
    }

    fn word(&self, address: u64) -> Option<u64> {
        self.bytes::<8>(address).map(u64::from_ne_bytes)
    }

    /// A compact ASCII `str` of at most 128 characters.
    fn ascii(&self, object: u64, ascii_data: u64) -> Option<String> {
        if object == 0 {
            return None;
        }
        let header = self.bytes::<40>(object)?;
        let length = u64::from_ne_bytes(header[16..24].try_into().ok()?);
        let state = u32::from_ne_bytes(header[STATE as usize..STATE as usize + 4].try_into().ok()?);
        if state & COMPACT_ASCII != COMPACT_ASCII || length > 128 {
            return None;
        }
        let mut text = vec![0u8; length as usize];
        self.0.read_exact_at(&mut text, object + ascii_data).ok()?;
        String::from_utf8(text).ok()
    }
}
