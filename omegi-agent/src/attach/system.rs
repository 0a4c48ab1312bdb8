//! What the machine must offer before anything is loaded: privileges, uprobe
//! support, tracefs. Each check fails with a message saying what to do.

use std::path::{Path, PathBuf};

use super::AttachError;

/// Capability numbers from `linux/capability.h`.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Where tracefs is looked for, in order (the same places aya looks).
const TRACEFS_PATHS: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Checks that this process may load BPF programs and open uprobes.
pub fn check_privileges() -> Result<(), AttachError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if has_tracing_capabilities(effective) {
        Ok(())
    } else {
        Err(AttachError::NotPrivileged)
    }
}

/// Root, or CAP_BPF with CAP_PERFMON, or CAP_SYS_ADMIN (kernels before 5.8).
/// CAP_SYS_ADMIN is also needed to mount tracefs, which a DaemonSet gets by
/// being privileged.
pub fn has_tracing_capabilities(effective: u64) -> bool {
    let has = |cap: u32| effective & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// Checks that the kernel offers uprobes through perf events.
pub fn check_uprobes() -> Result<(), AttachError> {
    check_uprobes_in(Path::new("/sys/bus/event_source/devices"))
}

/// [`check_uprobes`] against another sysfs tree (tests).
pub fn check_uprobes_in(event_sources: &Path) -> Result<(), AttachError> {
    if event_sources.join("uprobe/type").exists() {
        Ok(())
    } else {
        Err(AttachError::NoUprobes)
    }
}

/// Finds tracefs, mounting it at `/sys/kernel/tracing` when it is not
/// mounted (it is not at boot on some machines, and tracepoints need it).
pub fn ensure_tracefs() -> Result<PathBuf, AttachError> {
    if let Some(path) = mounted_tracefs() {
        return Ok(path);
    }
    let target = Path::new(TRACEFS_PATHS[0]);
    nix::mount::mount(
        Some("tracefs"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| {
        AttachError::Tracefs(format!("mounting tracefs at {}: {errno}", target.display()))
    })?;
    mounted_tracefs().ok_or_else(|| AttachError::Tracefs("tracefs is empty after mounting".into()))
}

fn mounted_tracefs() -> Option<PathBuf> {
    TRACEFS_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|path| path.join("events").is_dir())
}

/// Reads the byte offset of a field from a tracepoint's `format` file.
pub fn tracepoint_field_offset(
    tracefs: &Path,
    category: &str,
    name: &str,
    field: &str,
) -> Result<u32, AttachError> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let format = std::fs::read_to_string(&path)
        .map_err(|error| AttachError::Tracefs(format!("reading {}: {error}", path.display())))?;
    parse_field_offset(&format, field)
        .ok_or_else(|| AttachError::Tracefs(format!("no field {field} in {}", path.display())))
}

/// Parses `field:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;`.
fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let declaration = line.trim().strip_prefix("field:")?;
        let (declaration, rest) = declaration.split_once(';')?;
        let name = declaration.split_whitespace().last()?;
        if name != field {
            return None;
        }
        let offset = rest.trim().strip_prefix("offset:")?;
        offset.split(';').next()?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities() {
        assert!(has_tracing_capabilities(u64::MAX));
        assert!(has_tracing_capabilities(1 << CAP_SYS_ADMIN));
        assert!(has_tracing_capabilities(
            (1 << CAP_BPF) | (1 << CAP_PERFMON)
        ));
        assert!(!has_tracing_capabilities(1 << CAP_BPF));
        assert!(!has_tracing_capabilities(0));
    }

    #[test]
    fn a_kernel_without_uprobes_is_reported() {
        let dir = std::env::temp_dir().join(format!("omegi-sysfs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kprobe")).unwrap();
        let error = check_uprobes_in(&dir).unwrap_err();
        assert!(error.to_string().contains("uprobe"), "{error}");
        std::fs::create_dir_all(dir.join("uprobe")).unwrap();
        std::fs::write(dir.join("uprobe/type"), "7\n").unwrap();
        assert!(check_uprobes_in(&dir).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fork_child_pid_offset() {
        let format = "name: sched_process_fork\nID: 312\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
            \tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
            \tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
            \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(format, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(format, "parent_pid"), Some(24));
        assert_eq!(parse_field_offset(format, "nothing"), None);
    }
}
