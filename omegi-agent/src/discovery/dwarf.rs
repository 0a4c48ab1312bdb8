//! Source locations from DWARF, through `addr2line`.

use std::{
    borrow::Cow,
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use addr2line::Context;
use gimli::{EndianArcSlice, RunTimeEndian};
use object::{Object, ObjectSection};

use super::DiscoveryError;

type Reader = EndianArcSlice<RunTimeEndian>;

/// Answers "which source file and line is this function in".
/// The context is behind a lock: addr2line parses units lazily and is not
/// `Sync`; lookups after discovery are rare (error stack traces).
pub struct SourceIndex {
    context: Mutex<Context<Reader>>,
    /// The distinct `DW_AT_producer`s of the compile units (GCC records its
    /// command-line switches there by default).
    producers: Vec<String>,
}

impl fmt::Debug for SourceIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SourceIndex")
    }
}

impl SourceIndex {
    /// Loads the DWARF sections of `file` (decompressing them if needed).
    pub fn load(file: &object::File<'_>) -> Result<Self, DiscoveryError> {
        let endian = RunTimeEndian::Little;
        let load_section = |id: gimli::SectionId| -> Result<Reader, gimli::Error> {
            let data = file
                .section_by_name(id.name())
                .and_then(|section| section.uncompressed_data().ok())
                .unwrap_or(Cow::Borrowed(&[]));
            Ok(EndianArcSlice::new(Arc::from(&*data), endian))
        };
        let dwarf = gimli::Dwarf::load(load_section).map_err(DiscoveryError::Dwarf)?;
        let producers = producers(&dwarf);
        let context = Context::from_dwarf(dwarf).map_err(DiscoveryError::Dwarf)?;
        Ok(Self {
            context: Mutex::new(context),
            producers,
        })
    }

    /// Whether some compile unit's producer names `switch` (e.g.
    /// `-fnon-call-exceptions`), as far as the compiler recorded it.
    pub fn compiled_with(&self, switch: &str) -> bool {
        self.producers
            .iter()
            .any(|producer| producer.split_whitespace().any(|word| word == switch))
    }

    /// The file and line of the code at `address`, as written in the function
    /// that contains it (not in a function inlined there). Relative paths are
    /// already joined to the compile unit's directory by `addr2line`.
    pub fn location(&self, address: u64) -> Option<(PathBuf, Option<u32>)> {
        let context = self
            .context
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut frames = context.find_frames(address).skip_all_loads().ok()?;
        let mut outermost = None;
        while let Ok(Some(frame)) = frames.next() {
            if let Some(location) = frame.location {
                if let Some(file) = location.file {
                    outermost = Some((PathBuf::from(file), location.line));
                }
            }
        }
        outermost.or_else(|| {
            let location = context.find_location(address).ok()??;
            Some((PathBuf::from(location.file?), location.line))
        })
    }
}

fn producers(dwarf: &gimli::Dwarf<Reader>) -> Vec<String> {
    let mut producers = std::collections::BTreeSet::new();
    let mut headers = dwarf.units();
    while let Ok(Some(header)) = headers.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let mut entries = unit.entries();
        let Ok(Some((_, root))) = entries.next_dfs() else {
            continue;
        };
        let Ok(Some(value)) = root.attr_value(gimli::DW_AT_producer) else {
            continue;
        };
        if let Ok(text) = dwarf.attr_string(&unit, value) {
            use gimli::Reader as _;
            if let Ok(text) = text.to_string_lossy() {
                producers.insert(text.into_owned());
            }
        }
    }
    producers.into_iter().collect()
}
