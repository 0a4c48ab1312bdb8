//! Where the Go runtime keeps a goroutine's id: the offset of `goid` in
//! `runtime.g`, which the kernel side reads from the `g` in `r14`.
//!
//! The binary's own DWARF says it exactly (the `runtime.g` structure type);
//! a binary without DWARF (`-ldflags=-w`) gets the offset of its Go version
//! from a table, checked against the DWARF of real builds (the
//! `go_offsets_match_the_table` test). The offset moved once: fields were
//! added before `goid` in 1.23 and removed again in 1.25.

use std::borrow::Cow;

use gimli::{EndianSlice, RunTimeEndian};
use object::{Object, ObjectSection};

/// Where a goroutine-id offset came from, for `--list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetSource {
    Dwarf,
    VersionTable,
}

/// `(major, minor)` of a `go1.21.13`-style version.
pub fn version_number(version: &str) -> Option<(u32, u32)> {
    let rest = version.strip_prefix("go")?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The offset of `goid` in `runtime.g` for Go `major.minor`, where known.
pub fn table_offset((major, minor): (u32, u32)) -> Option<u32> {
    match (major, minor) {
        (1, 17..=22) => Some(152),
        (1, 23..=24) => Some(160),
        (1, 25..) => Some(152),
        _ => None,
    }
}

/// The `DW_AT_data_member_location` of `goid` in the `runtime.g` type.
pub fn dwarf_offset(file: &object::File<'_>) -> Option<u32> {
    let sections: Vec<(gimli::SectionId, Cow<'_, [u8]>)> = [
        gimli::SectionId::DebugInfo,
        gimli::SectionId::DebugAbbrev,
        gimli::SectionId::DebugStr,
    ]
    .into_iter()
    .map(|id| {
        let data = file
            .section_by_name(id.name())
            .and_then(|section| section.uncompressed_data().ok())
            .unwrap_or(Cow::Borrowed(&[]));
        (id, data)
    })
    .collect();
    let load = |id: gimli::SectionId| -> Result<EndianSlice<'_, RunTimeEndian>, gimli::Error> {
        let data = sections
            .iter()
            .find(|(section, _)| *section == id)
            .map_or(&[][..], |(_, data)| &data[..]);
        Ok(EndianSlice::new(data, RunTimeEndian::Little))
    };
    let dwarf = gimli::Dwarf::load(load).ok()?;
    let mut units = dwarf.units();
    while let Ok(Some(header)) = units.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let name_of = |entry: &gimli::DebuggingInformationEntry<'_, '_, _>| {
            let value = entry.attr_value(gimli::DW_AT_name).ok()??;
            let text = dwarf.attr_string(&unit, value).ok()?;
            Some(text.to_string_lossy().into_owned())
        };
        let mut entries = unit.entries();
        let mut in_g: Option<isize> = None;
        let mut depth = 0isize;
        while let Ok(Some((delta, entry))) = entries.next_dfs() {
            depth += delta;
            if in_g.is_some_and(|g_depth| depth <= g_depth) {
                in_g = None;
            }
            let tag = entry.tag();
            if tag == gimli::DW_TAG_structure_type
                && in_g.is_none()
                && name_of(entry).as_deref() == Some("runtime.g")
            {
                in_g = Some(depth);
            } else if tag == gimli::DW_TAG_member
                && in_g.is_some()
                && name_of(entry).as_deref() == Some("goid")
            {
                let offset = entry
                    .attr_value(gimli::DW_AT_data_member_location)
                    .ok()??
                    .udata_value()?;
                return u32::try_from(offset).ok();
            }
        }
    }
    None
}

/// The goid offset of `file`, built by Go `version`.
pub fn goid_offset(
    file: &object::File<'_>,
    version: Option<(u32, u32)>,
) -> Option<(u32, OffsetSource)> {
    if let Some(offset) = dwarf_offset(file) {
        return Some((offset, OffsetSource::Dwarf));
    }
    table_offset(version?).map(|offset| (offset, OffsetSource::VersionTable))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(version_number("go1.19.8"), Some((1, 19)));
        assert_eq!(version_number("go1.23.4 X:boringcrypto"), Some((1, 23)));
        assert_eq!(version_number("go1.21rc2"), Some((1, 21)));
        assert_eq!(version_number("devel"), None);
    }

    #[test]
    fn the_table_has_the_1_23_move() {
        assert_eq!(table_offset((1, 22)), Some(152));
        assert_eq!(table_offset((1, 23)), Some(160));
        assert_eq!(table_offset((1, 25)), Some(152));
        assert_eq!(table_offset((1, 16)), None);
    }
}
