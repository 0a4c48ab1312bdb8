//! Go binaries: recognised before anything is probed.
//!
//! A Go program must never get a uretprobe: the runtime walks return
//! addresses itself (stack copying when a goroutine's stack grows, the
//! garbage collector, panics), and a uretprobe's trampoline address on a
//! goroutine stack is fatal (`fatal error: unknown caller pc`). The probes
//! omegi puts in C programs do not fit Go either (calls are per goroutine,
//! not per thread), so until Go has a tracer of its own a Go binary is
//! refused with a clear message.
//!
//! Every Go linker since 1.13 writes a `.go.buildinfo` section (it backs
//! `runtime/debug.ReadBuildInfo`) and keeps it, like `.gopclntab`, when the
//! binary is stripped with `-ldflags=-s -w`.

use object::{Object, ObjectSection};

/// The build-info magic at the start of `.go.buildinfo`.
const BUILD_INFO_MAGIC: &[u8] = b"\xff Go buildinf:";

/// Header flag: the version and module strings follow the header inline
/// (Go 1.18+); before, the header held pointers to them.
const FLAG_VERSION_INLINE: u8 = 0x2;

/// What the build info says of a Go binary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoBuild {
    /// The toolchain, e.g. `go1.19.8` (only for Go 1.18+ binaries).
    pub version: Option<String>,
    /// The main module's path (`mod` line), when built in module mode.
    pub main_module: Option<String>,
}

impl GoBuild {
    /// `go1.19.8`, or `Go` when the version could not be read.
    pub fn describe(&self) -> String {
        self.version.clone().unwrap_or_else(|| "Go".into())
    }
}

/// The Go build info of `file`, if it is a Go program.
pub fn recognise(file: &object::File<'_>) -> Option<GoBuild> {
    if let Some(section) = file.section_by_name(".go.buildinfo") {
        let data = section.data().unwrap_or_default();
        return Some(parse_build_info(data).unwrap_or_default());
    }
    // A linker too old for build info still writes the pc-line table.
    file.section_by_name(".gopclntab")
        .map(|_| GoBuild::default())
}

/// Reads the inline header of `.go.buildinfo`: 14 bytes of magic, the
/// pointer size, the flags, padding to 32 bytes, then two strings, each
/// prefixed by its length as a varint: the version and the module info.
fn parse_build_info(data: &[u8]) -> Option<GoBuild> {
    if !data.starts_with(BUILD_INFO_MAGIC) || data.len() < 32 {
        return None;
    }
    if data[15] & FLAG_VERSION_INLINE == 0 {
        return None;
    }
    let mut rest = &data[32..];
    let version = read_string(&mut rest)?;
    let module_info = read_string(&mut rest).unwrap_or_default();
    let main_module = module_info.lines().find_map(|line| {
        let mut fields = line.split('\t');
        (fields.next() == Some("mod"))
            .then(|| fields.next().map(str::to_owned))
            .flatten()
    });
    Some(GoBuild {
        version: Some(version),
        main_module,
    })
}

/// A varint-length-prefixed string, advancing `data` past it.
fn read_string(data: &mut &[u8]) -> Option<String> {
    let mut len: u64 = 0;
    let mut shift = 0;
    loop {
        let (&byte, rest) = data.split_first()?;
        *data = rest;
        len |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
    let len = usize::try_from(len).ok().filter(|&len| len <= data.len())?;
    let (text, rest) = data.split_at(len);
    *data = rest;
    Some(String::from_utf8_lossy(text).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(strings: &[&str]) -> Vec<u8> {
        let mut data = BUILD_INFO_MAGIC.to_vec();
        data.push(8);
        data.push(FLAG_VERSION_INLINE);
        data.resize(32, 0);
        for text in strings {
            data.push(text.len() as u8);
            data.extend_from_slice(text.as_bytes());
        }
        data
    }

    #[test]
    fn reads_version_and_main_module() {
        let info = "0w\u{af}\u{c}path\texample.com/shop\nmod\texample.com/shop\t(devel)\t\n";
        let build = parse_build_info(&header(&["go1.21.13", info])).unwrap();
        assert_eq!(build.version.as_deref(), Some("go1.21.13"));
        assert_eq!(build.main_module.as_deref(), Some("example.com/shop"));
    }

    #[test]
    fn old_pointer_header_has_no_version() {
        let mut data = header(&[]);
        data[15] = 0;
        assert_eq!(parse_build_info(&data), None);
    }

    #[test]
    fn truncated_strings_are_not_read_past_the_end() {
        let mut data = header(&[]);
        data.push(200);
        data.extend_from_slice(b"go1");
        assert_eq!(parse_build_info(&data), None);
        let mut data = header(&[]);
        data.extend_from_slice(&[0xff; 12]);
        assert_eq!(parse_build_info(&data), None);
    }
}
