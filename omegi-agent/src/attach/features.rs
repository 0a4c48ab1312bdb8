//! What the running kernel offers omegi, found by asking it: each feature is
//! tried with a two-instruction program, not read off the version number
//! (distributions backport features, and a version says nothing of a
//! kernel's configuration).

use std::{ffi::CStr, io, path::Path};

use super::multi::{
    bpf, ProgLoadAttr, UprobeMultiAttr, BPF_LINK_CREATE, BPF_PROG_LOAD, BPF_PROG_TYPE_KPROBE,
    BPF_TRACE_UPROBE_MULTI,
};

/// Where the kernel publishes its own BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// `enum bpf_func_id`: `bpf_get_attach_cookie` (Linux 5.15).
const HELPER_GET_ATTACH_COOKIE: i32 = 174;

/// The kernel's features that decide how omegi traces.
#[derive(Clone, Debug)]
pub struct KernelFeatures {
    /// The kernel's release (`uname -r`), to name it in messages.
    pub release: String,
    /// `bpf_get_attach_cookie` in uprobe programs (5.15+): a probe knows its
    /// function from the cookie it was attached with. Without it the
    /// function is looked up by the probe's address.
    pub attach_cookies: bool,
    /// `uprobe_multi` links (6.6+): all probes of a program in one link,
    /// attached and detached in one system call each.
    pub uprobe_multi: bool,
    /// `uprobe_multi`'s pid filter selects processes, not threads (fixed in
    /// 6.10); omegi filters by process in its own map either way.
    pub uprobe_multi_pid_filter: bool,
    /// The kernel's BTF, which gives the field offsets the programs that
    /// find a probe by address need.
    pub btf: bool,
}

impl KernelFeatures {
    /// Asks the running kernel. Needs the privileges to load BPF programs
    /// (without them every feature reads as missing).
    pub fn probe() -> Self {
        let (uprobe_multi, uprobe_multi_pid_filter) = probe_uprobe_multi();
        Self {
            release: kernel_release(),
            attach_cookies: helper_exists(HELPER_GET_ATTACH_COOKIE),
            uprobe_multi,
            uprobe_multi_pid_filter,
            btf: Path::new(VMLINUX_BTF).exists(),
        }
    }
}

/// The kernel's release string, e.g. `6.1.0-41-cloud-amd64`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown kernel".into())
}

/// Byte offsets of the kernel fields the programs of kernels without attach
/// cookies read: `task_struct.mm` and `mm_struct.start_code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskOffsets {
    pub task_mm: u32,
    pub mm_start_code: u32,
}

/// Why [`task_offsets`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("this kernel publishes no BTF ({VMLINUX_BTF}: {0})")]
    Missing(io::Error),
    #[error("the kernel's BTF ({VMLINUX_BTF}) cannot be read: {0}")]
    Unreadable(String),
    #[error("the kernel's BTF has no {0}.{1}")]
    NoField(&'static str, &'static str),
}

/// Reads the [`TaskOffsets`] from the running kernel's BTF.
pub fn task_offsets() -> Result<TaskOffsets, BtfError> {
    let bytes = std::fs::read(VMLINUX_BTF).map_err(BtfError::Missing)?;
    task_offsets_in(&bytes)
}

/// [`task_offsets`] from BTF bytes.
pub fn task_offsets_in(btf: &[u8]) -> Result<TaskOffsets, BtfError> {
    let offset = btf_offsets(btf)?;
    Ok(TaskOffsets {
        task_mm: offset("task_struct", "mm")?,
        mm_start_code: offset("mm_struct", "start_code")?,
    })
}

/// Reads the [`SocketOffsets`](omegi_common::SocketOffsets) (HTTP on
/// sockets) from the running kernel's BTF.
pub fn socket_offsets() -> Result<omegi_common::SocketOffsets, BtfError> {
    let bytes = std::fs::read(VMLINUX_BTF).map_err(BtfError::Missing)?;
    socket_offsets_in(&bytes)
}

/// [`socket_offsets`] from BTF bytes.
pub fn socket_offsets_in(btf: &[u8]) -> Result<omegi_common::SocketOffsets, BtfError> {
    let offset = btf_offsets(btf)?;
    let sock = |field: &'static str| offset("sock", field);
    Ok(omegi_common::SocketOffsets {
        task_files: offset("task_struct", "files")?,
        files_fdt: offset("files_struct", "fdt")?,
        fdtable_fd: offset("fdtable", "fd")?,
        file_private_data: offset("file", "private_data")?,
        file_inode: offset("file", "f_inode")?,
        inode_mode: offset("inode", "i_mode")?,
        socket_type: offset("socket", "type")?,
        socket_sk: offset("socket", "sk")?,
        sk_daddr: sock("__sk_common.skc_daddr")?,
        sk_rcv_saddr: sock("__sk_common.skc_rcv_saddr")?,
        sk_dport: sock("__sk_common.skc_dport")?,
        sk_num: sock("__sk_common.skc_num")?,
        sk_family: sock("__sk_common.skc_family")?,
        sk_v6_daddr: sock("__sk_common.skc_v6_daddr")?,
        sk_v6_rcv_saddr: sock("__sk_common.skc_v6_rcv_saddr")?,
        _pad: 0,
    })
}

/// A lookup of `structure.field` byte offsets (a field path may go through
/// nested and anonymous members) in BTF bytes.
fn btf_offsets(
    btf: &[u8],
) -> Result<impl Fn(&'static str, &'static str) -> Result<u32, BtfError>, BtfError> {
    let types = btfparse::TypeInformation::new(&BtfBytes(btf))
        .map_err(|error| BtfError::Unreadable(format!("{error:?}")))?;
    Ok(
        move |structure: &'static str, field: &'static str| -> Result<u32, BtfError> {
            let missing = || BtfError::NoField(structure, field);
            let id = types.id_of(structure).ok_or_else(missing)?;
            match types.offset_of(id, field) {
                Ok((_, btfparse::Offset::ByteOffset(offset))) => Ok(offset),
                _ => Err(missing()),
            }
        },
    )
}

/// BTF bytes in memory, as btfparse reads them.
struct BtfBytes<'a>(&'a [u8]);

impl btfparse::Readable for BtfBytes<'_> {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
        {
            Some(bytes) => {
                buffer.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::EOF,
                "read past the end of the BTF data",
            )),
        }
    }
}

/// One eBPF instruction: opcode, registers (`src << 4 | dst`), offset,
/// immediate.
fn instruction(code: u8, registers: u8, offset: i16, immediate: i32) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[0] = code;
    bytes[1] = registers;
    bytes[2..4].copy_from_slice(&offset.to_le_bytes());
    bytes[4..8].copy_from_slice(&immediate.to_le_bytes());
    u64::from_le_bytes(bytes)
}

/// `r0 = 0; exit`.
fn return_zero() -> [u64; 2] {
    [instruction(0xb7, 0, 0, 0), instruction(0x95, 0, 0, 0)]
}

const LICENSE: &CStr = c"GPL";

/// Loads a uprobe (kprobe-type) program of `instructions`; the verifier's
/// log comes back with a failure.
fn load(instructions: &[u64], expected_attach_type: u32) -> Result<std::os::fd::OwnedFd, String> {
    let mut log = vec![0u8; 4096];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: instructions.len() as u32,
        insns: instructions.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type,
        ..ProgLoadAttr::default()
    };
    bpf(BPF_PROG_LOAD, &mut attr).map_err(|error| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        format!("{error}: {}", String::from_utf8_lossy(&log[..end]).trim())
    })
}

/// Whether uprobe programs may call helper number `helper` (one that takes
/// no arguments). Only a program that loads says yes: any failure (the
/// verifier's "unknown func", but also a locked-memory limit on kernels
/// before 5.11) leaves omegi on the way that needs less of the kernel.
fn helper_exists(helper: i32) -> bool {
    let [zero, exit] = return_zero();
    // call helper; r0 = 0; exit
    let program = [instruction(0x85, 0, 0, helper), zero, exit];
    match load(&program, 0) {
        Ok(_) => true,
        Err(log) => {
            tracing::debug!("helper {helper}: {log}");
            false
        }
    }
}

/// Whether the kernel makes `uprobe_multi` links, and whether their pid
/// filter is right, tried as libbpf tries them: a link on `/` fails with
/// EBADF where the kernel knows the link type, and, with an invalid pid,
/// with EINVAL before it looks at the file where the filter is fixed.
fn probe_uprobe_multi() -> (bool, bool) {
    let Ok(program) = load(&return_zero(), BPF_TRACE_UPROBE_MULTI) else {
        return (false, false);
    };
    let path = c"/";
    let offsets = [0u64];
    let cookies = [0u64];
    let attempt = |pid: u32| {
        use std::os::fd::AsFd;
        let Ok(mut attr) = UprobeMultiAttr::new(program.as_fd(), path, &offsets, &cookies, false)
        else {
            return None;
        };
        attr.target_fd = u32::MAX;
        attr.pid = pid;
        bpf(BPF_LINK_CREATE, &mut attr).err()?.raw_os_error()
    };
    let known = attempt(0) == Some(libc::EBADF);
    let pid_filter = known && attempt(u32::MAX) == Some(libc::EINVAL);
    (known, pid_filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_are_encoded_as_the_kernel_reads_them() {
        // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0.
        assert_eq!(
            instruction(0xb7, 0, 0, 0).to_le_bytes(),
            [0xb7, 0, 0, 0, 0, 0, 0, 0]
        );
        // BPF_JMP | BPF_CALL, imm 174.
        assert_eq!(
            instruction(0x85, 0, 0, 174).to_le_bytes(),
            [0x85, 0, 0, 0, 174, 0, 0, 0]
        );
    }

    #[test]
    fn the_kernel_release_is_read() {
        let release = kernel_release();
        assert!(
            release.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "{release}"
        );
    }

    #[test]
    fn task_offsets_come_from_this_kernels_btf() {
        // Every kernel omegi is tested on has BTF (DESIGN.md).
        let bytes = std::fs::read(VMLINUX_BTF).expect("this kernel publishes its BTF");
        let offsets = task_offsets_in(&bytes).expect("this kernel's BTF has both fields");
        // task_struct is large; mm is well inside it. start_code follows
        // the mmap bookkeeping at the start of mm_struct.
        assert!(offsets.task_mm > 64, "{offsets:?}");
        assert!(offsets.mm_start_code > 0, "{offsets:?}");
        assert!(matches!(
            task_offsets_in(b"not btf"),
            Err(BtfError::Unreadable(_))
        ));
    }

    #[test]
    fn socket_offsets_come_from_this_kernels_btf() {
        let bytes = std::fs::read(VMLINUX_BTF).expect("this kernel publishes its BTF");
        let offsets = socket_offsets_in(&bytes).expect("this kernel's BTF has every field");
        // struct sock starts with its sock_common: the IPv4 addresses first,
        // then the ports, then the family, then the IPv6 addresses.
        assert_eq!(offsets.sk_daddr, 0, "{offsets:?}");
        assert_eq!(offsets.sk_rcv_saddr, 4, "{offsets:?}");
        assert!(offsets.sk_dport < offsets.sk_num, "{offsets:?}");
        assert!(offsets.sk_family > offsets.sk_num, "{offsets:?}");
        assert!(offsets.sk_v6_daddr > offsets.sk_family, "{offsets:?}");
        assert!(offsets.task_files > 64, "{offsets:?}");
        assert!(offsets.socket_sk > offsets.socket_type, "{offsets:?}");
    }
}
