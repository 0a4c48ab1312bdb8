//! The kernel's `uprobe_multi` link (Linux 6.6+): one `BPF_LINK_CREATE` puts
//! a program on many offsets of one file, each offset with its own cookie.
//!
//! aya 0.14 makes one perf-event link per probe, which costs about 0.7 ms to
//! attach and more to detach (the kernel waits for a grace period per probe):
//! ten thousand functions would take seconds each way. A multi link registers
//! them all in one call and unregisters them with one wait.
//!
//! aya 0.14 cannot load a program with the `BPF_TRACE_UPROBE_MULTI` expected
//! attach type (nor parse the `uprobe.multi` section), and the kernel refuses
//! to make a multi link for a program loaded without it. So the agent loads
//! the three function probe programs a second time itself: it parses the
//! same object with aya-obj, relocates its map references to the maps aya
//! created (so both copies share every map), and loads the instructions with
//! the bpf syscall.

use std::{
    collections::HashSet,
    ffi::{CStr, CString},
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::{maps::Map, Ebpf};

/// `bpf(2)` commands.
pub(super) const BPF_PROG_LOAD: libc::c_long = 5;
pub(super) const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_prog_type`: uprobes are kprobe programs.
pub(super) const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `enum bpf_attach_type`.
pub const BPF_TRACE_UPROBE_MULTI: u32 = 48;
/// `link_create.uprobe_multi.flags`: return probes (uretprobes).
pub const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to the fields used here
/// (the kernel reads a shorter attr as if the rest were zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgLoadAttr {
    pub prog_type: u32,
    pub insn_cnt: u32,
    pub insns: u64,
    pub license: u64,
    pub log_level: u32,
    pub log_size: u32,
    pub log_buf: u64,
    pub kern_version: u32,
    pub prog_flags: u32,
    pub prog_name: [u8; 16],
    pub prog_ifindex: u32,
    pub expected_attach_type: u32,
    pub prog_btf_fd: u32,
    pub func_info_rec_size: u32,
}

/// The `BPF_LINK_CREATE` part of `union bpf_attr` with its `uprobe_multi`
/// member.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UprobeMultiAttr {
    pub prog_fd: u32,
    pub target_fd: u32,
    pub attach_type: u32,
    pub flags: u32,
    /// `const char *`: the file to probe.
    pub path: u64,
    /// `const __u64 *`: file offsets of the probes.
    pub offsets: u64,
    /// `const __u64 *`: USDT semaphore offsets (none here).
    pub ref_ctr_offsets: u64,
    /// `const __u64 *`: one `bpf_get_attach_cookie` value per offset.
    pub cookies: u64,
    pub cnt: u32,
    /// [`BPF_F_UPROBE_MULTI_RETURN`] or 0.
    pub multi_flags: u32,
    /// 0: every process that maps the file.
    pub pid: u32,
    pub _pad: u32,
}

/// Why a multi link could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MultiError {
    #[error("no probes to attach")]
    Empty,
    #[error("{offsets} offsets but {cookies} cookies")]
    Mismatch { offsets: usize, cookies: usize },
    #[error("too many probes for one link ({0})")]
    TooMany(usize),
}

impl UprobeMultiAttr {
    /// The attr for probes at `offsets` of `path`, with `cookies`. The
    /// pointers it holds borrow the arguments, which must outlive the
    /// syscall.
    pub fn new(
        prog_fd: BorrowedFd<'_>,
        path: &CStr,
        offsets: &[u64],
        cookies: &[u64],
        return_probes: bool,
    ) -> Result<Self, MultiError> {
        if offsets.is_empty() {
            return Err(MultiError::Empty);
        }
        if offsets.len() != cookies.len() {
            return Err(MultiError::Mismatch {
                offsets: offsets.len(),
                cookies: cookies.len(),
            });
        }
        let cnt = u32::try_from(offsets.len()).map_err(|_| MultiError::TooMany(offsets.len()))?;
        Ok(Self {
            prog_fd: prog_fd.as_raw_fd() as u32,
            attach_type: BPF_TRACE_UPROBE_MULTI,
            path: path.as_ptr() as u64,
            offsets: offsets.as_ptr() as u64,
            cookies: cookies.as_ptr() as u64,
            cnt,
            multi_flags: if return_probes {
                BPF_F_UPROBE_MULTI_RETURN
            } else {
                0
            },
            ..Self::default()
        })
    }
}

pub(super) fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid bpf_attr prefix of the given size; every
    // pointer in it refers to memory the caller keeps alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Creates a multi link: `program` on `offsets` of `path`, with `cookies`.
/// Dropping the returned descriptor removes every probe of the link.
pub fn attach(
    program: BorrowedFd<'_>,
    path: &Path,
    offsets: &[u64],
    cookies: &[u64],
    return_probes: bool,
) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let mut attr = UprobeMultiAttr::new(program, &path, offsets, cookies, return_probes)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error.to_string()))?;
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// The function probe programs, loaded for multi links.
pub struct MultiPrograms {
    pub entry: OwnedFd,
    pub exit: OwnedFd,
    pub uretprobe: OwnedFd,
}

/// Loads the programs named `entry`, `exit` and `uretprobe` of `object`
/// with the `uprobe_multi` attach type, their maps relocated to the maps of
/// `ebpf` (loaded from the same object, before any map was taken out of it).
pub fn load_programs(
    object: &[u8],
    ebpf: &Ebpf,
    [entry, exit, uretprobe]: [&str; 3],
) -> anyhow::Result<MultiPrograms> {
    use anyhow::Context as _;
    let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    let fds: std::collections::HashMap<&str, BorrowedFd<'_>> =
        ebpf.maps().map(|(name, map)| (name, map_fd(map))).collect();
    let maps: Vec<(String, i32, aya_obj::Map)> = obj
        .maps
        .iter()
        .filter_map(|(name, map)| {
            let fd = fds.get(name.as_str())?;
            Some((name.clone(), fd.as_raw_fd(), map.clone()))
        })
        .collect();
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(
        maps.iter().map(|(name, fd, map)| (name.as_str(), *fd, map)),
        &text_sections,
    )
    .context("relocating map references")?;
    obj.relocate_calls(&text_sections)
        .context("relocating calls")?;

    let load = |name: &str| -> anyhow::Result<OwnedFd> {
        let program = obj
            .programs
            .get(name)
            .with_context(|| format!("no program {name} in the eBPF object"))?;
        let function = obj
            .functions
            .get(&program.function_key())
            .with_context(|| format!("no code for {name}"))?;
        load_program(name, &function.instructions, &program.license)
            .with_context(|| format!("loading {name} for uprobe_multi"))
    };
    Ok(MultiPrograms {
        entry: load(entry)?,
        exit: load(exit)?,
        uretprobe: load(uretprobe)?,
    })
}

fn load_program(
    name: &str,
    instructions: &[aya_obj::generated::bpf_insn],
    license: &CStr,
) -> anyhow::Result<OwnedFd> {
    let mut log = vec![0u8; 1 << 20];
    let mut prog_name = [0u8; 16];
    for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: instructions.len() as u32,
        insns: instructions.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: BPF_TRACE_UPROBE_MULTI,
        ..ProgLoadAttr::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(_) => {
            // Again with the verifier's log, to say why.
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            match bpf(BPF_PROG_LOAD, &mut attr) {
                Ok(fd) => Ok(fd),
                Err(error) => {
                    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                    let text = String::from_utf8_lossy(&log[..end]);
                    let tail: Vec<&str> = text.lines().rev().take(5).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    anyhow::bail!("{error}: {}", tail.join(" / "))
                }
            }
        }
    }
}

/// The descriptor of a map aya created.
fn map_fd(map: &Map) -> BorrowedFd<'_> {
    let data = match map {
        Map::Array(data)
        | Map::ArrayOfMaps(data)
        | Map::BloomFilter(data)
        | Map::CgroupArray(data)
        | Map::CgroupStorage(data)
        | Map::CgrpStorage(data)
        | Map::CpuMap(data)
        | Map::DevMap(data)
        | Map::DevMapHash(data)
        | Map::HashMap(data)
        | Map::HashOfMaps(data)
        | Map::InodeStorage(data)
        | Map::LpmTrie(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuCgroupStorage(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data)
        | Map::PerfEventArray(data)
        | Map::ProgramArray(data)
        | Map::Queue(data)
        | Map::ReusePortSockArray(data)
        | Map::RingBuf(data)
        | Map::SockHash(data)
        | Map::SockMap(data)
        | Map::SkStorage(data)
        | Map::Stack(data)
        | Map::StackTraceMap(data)
        | Map::Unsupported(data)
        | Map::XskMap(data) => data,
    };
    data.fd().as_fd()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn attr_layouts_match_the_kernel() {
        // include/uapi/linux/bpf.h, union bpf_attr.
        assert_eq!(offset_of!(ProgLoadAttr, insns), 8);
        assert_eq!(offset_of!(ProgLoadAttr, license), 16);
        assert_eq!(offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(offset_of!(ProgLoadAttr, kern_version), 40);
        assert_eq!(offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(size_of::<ProgLoadAttr>(), 80);

        assert_eq!(offset_of!(UprobeMultiAttr, attach_type), 8);
        assert_eq!(offset_of!(UprobeMultiAttr, flags), 12);
        assert_eq!(offset_of!(UprobeMultiAttr, path), 16);
        assert_eq!(offset_of!(UprobeMultiAttr, offsets), 24);
        assert_eq!(offset_of!(UprobeMultiAttr, ref_ctr_offsets), 32);
        assert_eq!(offset_of!(UprobeMultiAttr, cookies), 40);
        assert_eq!(offset_of!(UprobeMultiAttr, cnt), 48);
        assert_eq!(offset_of!(UprobeMultiAttr, multi_flags), 52);
        assert_eq!(offset_of!(UprobeMultiAttr, pid), 56);
        assert_eq!(size_of::<UprobeMultiAttr>(), 64);
    }

    #[test]
    fn uprobe_multi_attr_points_at_its_arguments() {
        let program = std::fs::File::open("/dev/null").unwrap();
        let path = CString::new("/app/server").unwrap();
        let offsets = [0x1130u64, 0x1150, 0x11a0];
        let cookies = [0u64, 1, 2 | (1 << 48)];
        let attr = UprobeMultiAttr::new(program.as_fd(), &path, &offsets, &cookies, false).unwrap();
        assert_eq!(attr.prog_fd as i32, program.as_raw_fd());
        assert_eq!(attr.attach_type, BPF_TRACE_UPROBE_MULTI);
        assert_eq!(attr.flags, 0);
        assert_eq!(attr.cnt, 3);
        assert_eq!(attr.multi_flags, 0);
        assert_eq!(attr.pid, 0);
        assert_eq!(attr.ref_ctr_offsets, 0);
        assert_eq!(attr.path, path.as_ptr() as u64);
        assert_eq!(attr.offsets, offsets.as_ptr() as u64);
        assert_eq!(attr.cookies, cookies.as_ptr() as u64);

        let returns = UprobeMultiAttr::new(program.as_fd(), &path, &offsets, &cookies, true);
        assert_eq!(returns.unwrap().multi_flags, BPF_F_UPROBE_MULTI_RETURN);
    }

    #[test]
    fn uprobe_multi_attr_refuses_bad_lists() {
        let program = std::fs::File::open("/dev/null").unwrap();
        let path = CString::new("/x").unwrap();
        assert!(matches!(
            UprobeMultiAttr::new(program.as_fd(), &path, &[], &[], false),
            Err(MultiError::Empty)
        ));
        assert!(matches!(
            UprobeMultiAttr::new(program.as_fd(), &path, &[1, 2], &[1], false),
            Err(MultiError::Mismatch {
                offsets: 2,
                cookies: 1
            })
        ));
    }
}
