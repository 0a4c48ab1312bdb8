//! Separate debug info: the DWARF of a stripped binary, kept in a file of
//! its own.
//!
//! Programs are rarely shipped with their DWARF inside: distributions and
//! release pipelines build with `-g`, move the debug sections out
//! (`objcopy --only-keep-debug`), strip the binary (`strip --strip-all` or
//! `--strip-debug`) and leave it a pointer to the debug file. Without that
//! file omegi sees no source files, so it cannot apply the project root nor
//! give spans a `file:line`. Two pointers exist, and this module follows
//! both the way GDB does:
//!
//! - the **build id** (`.note.gnu.build-id`, which the linker writes and
//!   `strip` keeps): `DIR/.build-id/xx/rest.debug`, where `xx` is the first
//!   byte in hex and `rest` the others (Debian's `-dbgsym` packages install
//!   to `/usr/lib/debug/.build-id/`);
//! - the **debug link** (`.gnu_debuglink`, from `objcopy
//!   --add-gnu-debuglink`): a file name and the CRC-32 of the debug file,
//!   looked for next to the binary, in a `.debug/` directory next to it, and
//!   under `/usr/lib/debug/` followed by the binary's own directory.
//!
//! Directories given with `--debug-dir` (or `OMEGI_DEBUG_DIR`) are searched
//! first, with the same layouts: `DIR/.build-id/xx/rest.debug`,
//! `DIR/NAME` and `DIR/<the binary's directory>/NAME`.
//!
//! A debug file from another build of the program would give every
//! function a wrong file and line, so a candidate is taken only when it
//! belongs to the binary: its build id must be the binary's (when both have
//! one), and a file found by its debug link must have the CRC the link
//! records. A candidate that fails is skipped, as GDB skips it; if no other
//! one fits, discovery fails with an error that names both files, rather
//! than trace with wrong lines.
//!
//! Only the DWARF (and the symbol table, when the binary has none) comes
//! from the debug file: the code that probes go on, its addresses and its
//! file offsets are read from the binary itself (the debug file keeps the
//! section headers but none of the code, and its segments' file offsets are
//! not the binary's).

use std::{
    fmt,
    path::{Path, PathBuf},
};

use object::Object;

use super::{elf, DiscoveryError};

/// Where distributions install debug files (GDB's default
/// `debug-file-directory`).
pub const SYSTEM_DEBUG_DIR: &str = "/usr/lib/debug";

/// How a separate debug file was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoundBy {
    /// Under a `.build-id/` directory, by the binary's build id.
    BuildId,
    /// By the name in the binary's `.gnu_debuglink`, its CRC checked.
    DebugLink,
}

impl fmt::Display for FoundBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BuildId => "found by build id",
            Self::DebugLink => "found by .gnu_debuglink",
        })
    }
}

/// The separate debug file a binary's debug info was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebugFile {
    pub path: PathBuf,
    pub found_by: FoundBy,
}

/// A debug file that belongs to the binary, with its contents.
pub struct Found {
    pub file: DebugFile,
    pub data: Vec<u8>,
}

/// What a binary says about its separate debug file, and the places looked
/// at for it: for the message when none was found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Searched {
    /// The binary's build id, in hex.
    pub build_id: Option<String>,
    /// The file name in its `.gnu_debuglink`.
    pub debuglink: Option<String>,
    /// Every path looked at, in order.
    pub paths: Vec<PathBuf>,
}

impl fmt::Display for Searched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.paths.is_empty() {
            return f.write_str("it names none: no build id and no .gnu_debuglink");
        }
        f.write_str("looked at ")?;
        for (index, path) in self.paths.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", path.display())?;
        }
        Ok(())
    }
}

/// The result of a search.
pub enum Search {
    Found(Found),
    NotFound(Searched),
}

/// A place a debug file may be.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Candidate {
    path: PathBuf,
    found_by: FoundBy,
}

/// Looks for the separate debug file of `binary` (whose parsed contents are
/// `file`), in `debug_dirs` first, then where GDB looks.
///
/// A candidate that exists but does not belong to the binary is skipped;
/// when no candidate fits and one was skipped, the first one skipped is the
/// error.
pub fn find(
    binary: &Path,
    file: &object::File<'_>,
    debug_dirs: &[PathBuf],
) -> Result<Search, DiscoveryError> {
    let build_id = file.build_id().ok().flatten().filter(|id| id.len() >= 2);
    let debuglink = file.gnu_debuglink().ok().flatten().and_then(|(name, crc)| {
        let name = std::str::from_utf8(name).ok()?;
        is_plain_file_name(name).then(|| (name.to_owned(), crc))
    });
    let binary_dir = binary_directory(binary);
    let candidates = candidates(
        &binary_dir,
        build_id,
        debuglink.as_ref().map(|(name, _)| name.as_str()),
        debug_dirs,
    );
    let mut refused = Vec::new();
    for candidate in &candidates {
        let data = match std::fs::read(&candidate.path) {
            Ok(data) => data,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            // A directory of that name, or one we may not read.
            Err(error) => {
                refused.push(DiscoveryError::DebugFileUnusable {
                    binary: binary.to_owned(),
                    debug_file: candidate.path.clone(),
                    reason: error.to_string(),
                });
                continue;
            }
        };
        match check(
            binary,
            build_id,
            debuglink.as_ref().map(|(_, crc)| *crc),
            candidate,
            &data,
        ) {
            Ok(()) => {
                for skipped in &refused {
                    tracing::warn!("{skipped}; using {} instead", candidate.path.display());
                }
                return Ok(Search::Found(Found {
                    file: DebugFile {
                        path: candidate.path.clone(),
                        found_by: candidate.found_by,
                    },
                    data,
                }));
            }
            Err(error) => refused.push(error),
        }
    }
    if !refused.is_empty() {
        return Err(refused.swap_remove(0));
    }
    Ok(Search::NotFound(Searched {
        build_id: build_id.map(hex),
        debuglink: debuglink.map(|(name, _)| name),
        paths: candidates
            .into_iter()
            .map(|candidate| candidate.path)
            .collect(),
    }))
}

/// Whether `data`, found at `candidate`, is the debug file of the binary
/// with this build id and debug link CRC.
fn check(
    binary: &Path,
    build_id: Option<&[u8]>,
    debuglink_crc: Option<u32>,
    candidate: &Candidate,
    data: &[u8],
) -> Result<(), DiscoveryError> {
    let unusable = |reason: String| DiscoveryError::DebugFileUnusable {
        binary: binary.to_owned(),
        debug_file: candidate.path.clone(),
        reason,
    };
    let debug = elf::parse(&candidate.path, data).map_err(|error| {
        unusable(match error {
            DiscoveryError::NotElf(_) => "it is not an ELF file".into(),
            other => other.to_string(),
        })
    })?;
    let debug_id = debug.build_id().ok().flatten();
    if let Some(expected) = build_id {
        // By build id the file must carry that very id; by debug link a
        // file without one is judged by its CRC alone.
        let matches = match debug_id {
            Some(found) => found == expected,
            None => candidate.found_by == FoundBy::DebugLink,
        };
        if !matches {
            return Err(DiscoveryError::DebugBuildIdMismatch {
                binary: binary.to_owned(),
                debug_file: candidate.path.clone(),
                binary_id: hex(expected),
                debug_id: debug_id.map_or_else(|| "missing".into(), hex),
            });
        }
    }
    if candidate.found_by == FoundBy::DebugLink {
        let expected = debuglink_crc.unwrap_or_default();
        let found = crc32fast::hash(data);
        if found != expected {
            return Err(DiscoveryError::DebugLinkCrcMismatch {
                binary: binary.to_owned(),
                debug_file: candidate.path.clone(),
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// The places to look, in order: each of `debug_dirs` with every layout,
/// then the build id under `/usr/lib/debug`, then the debug link next to
/// the binary, in `.debug/` next to it and under `/usr/lib/debug` + the
/// binary's directory (GDB's order). Without a build id or a debug link,
/// the layouts that need it are left out.
fn candidates(
    binary_dir: &Path,
    build_id: Option<&[u8]>,
    debuglink: Option<&str>,
    debug_dirs: &[PathBuf],
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut add = |path: PathBuf, found_by| {
        if !out.iter().any(|candidate| candidate.path == path) {
            out.push(Candidate { path, found_by });
        }
    };
    let by_build_id = build_id.map(build_id_path);
    // `/usr/lib/debug` + `/opt/app/bin` is `/usr/lib/debug/opt/app/bin`.
    let under = |dir: &Path| dir.join(binary_dir.strip_prefix("/").unwrap_or(binary_dir));
    for dir in debug_dirs {
        if let Some(relative) = &by_build_id {
            add(dir.join(relative), FoundBy::BuildId);
        }
        if let Some(name) = debuglink {
            add(dir.join(name), FoundBy::DebugLink);
            if binary_dir.is_absolute() {
                add(under(dir).join(name), FoundBy::DebugLink);
            }
        }
    }
    let system = Path::new(SYSTEM_DEBUG_DIR);
    if let Some(relative) = &by_build_id {
        add(system.join(relative), FoundBy::BuildId);
    }
    if let Some(name) = debuglink {
        add(binary_dir.join(name), FoundBy::DebugLink);
        add(binary_dir.join(".debug").join(name), FoundBy::DebugLink);
        if binary_dir.is_absolute() {
            add(under(system).join(name), FoundBy::DebugLink);
        }
    }
    out
}

/// `.build-id/4f/2c1c35….debug` for build id `4f2c1c35…`.
fn build_id_path(build_id: &[u8]) -> PathBuf {
    let hex = hex(build_id);
    let (first, rest) = hex.split_at(2);
    Path::new(".build-id")
        .join(first)
        .join(format!("{rest}.debug"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The directory of the binary as its real path has it (a debug file lies
/// next to the file, not next to a symlink to it); as given when that
/// cannot be resolved.
fn binary_directory(binary: &Path) -> PathBuf {
    let real = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_owned());
    match real.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// A debug link names a file, never a path (objcopy stores the base name);
/// anything else is not followed.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(candidates: &[Candidate]) -> Vec<(String, FoundBy)> {
        candidates
            .iter()
            .map(|c| (c.path.display().to_string(), c.found_by))
            .collect()
    }

    #[test]
    fn build_id_layout() {
        assert_eq!(
            build_id_path(&[0x4f, 0x2c, 0x1c, 0x35]),
            Path::new(".build-id/4f/2c1c35.debug")
        );
    }

    #[test]
    fn debug_dirs_come_first_then_gdb_order() {
        let candidates = candidates(
            Path::new("/opt/shop/bin"),
            Some(&[0xab, 0xcd, 0xef]),
            Some("shop.debug"),
            &["/srv/debug".into(), "/more".into()],
        );
        use FoundBy::*;
        let expected = [
            ("/srv/debug/.build-id/ab/cdef.debug", BuildId),
            ("/srv/debug/shop.debug", DebugLink),
            ("/srv/debug/opt/shop/bin/shop.debug", DebugLink),
            ("/more/.build-id/ab/cdef.debug", BuildId),
            ("/more/shop.debug", DebugLink),
            ("/more/opt/shop/bin/shop.debug", DebugLink),
            ("/usr/lib/debug/.build-id/ab/cdef.debug", BuildId),
            ("/opt/shop/bin/shop.debug", DebugLink),
            ("/opt/shop/bin/.debug/shop.debug", DebugLink),
            ("/usr/lib/debug/opt/shop/bin/shop.debug", DebugLink),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(path, by)| (path.to_string(), *by))
            .collect();
        assert_eq!(paths(&candidates), expected);
    }

    #[test]
    fn layouts_without_their_pointer_are_left_out() {
        let only_id = candidates(Path::new("/bin"), Some(&[1, 2]), None, &[]);
        assert_eq!(
            paths(&only_id),
            [(
                "/usr/lib/debug/.build-id/01/02.debug".to_string(),
                FoundBy::BuildId
            )]
        );
        let none = candidates(Path::new("/bin"), None, None, &["/d".into()]);
        assert!(none.is_empty());
        let searched = Searched::default();
        assert_eq!(
            searched.to_string(),
            "it names none: no build id and no .gnu_debuglink"
        );
    }

    #[test]
    fn the_same_place_is_looked_at_once() {
        // --debug-dir /usr/lib/debug adds nothing new.
        let candidates = candidates(
            Path::new("/opt/bin"),
            Some(&[1, 2]),
            Some("x.debug"),
            &["/usr/lib/debug".into()],
        );
        let mut seen = std::collections::HashSet::new();
        assert!(candidates.iter().all(|c| seen.insert(c.path.clone())));
        assert_eq!(candidates.len(), 5);
    }

    #[test]
    fn debug_link_crc_is_the_gnu_one() {
        // The CRC-32 `objcopy --add-gnu-debuglink` and GDB compute (the
        // zlib/IEEE polynomial): its check value.
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn debug_links_name_files_only() {
        assert!(is_plain_file_name("shop.debug"));
        for bad in ["", ".", "..", "../etc/passwd", "/etc/passwd", "a/b"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn relative_binaries_keep_a_directory() {
        assert_eq!(
            binary_directory(Path::new("no-such-binary")),
            Path::new(".")
        );
    }
}
