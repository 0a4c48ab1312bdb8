//! What the running kernel offers omegi, found by asking it: each feature is
//! tried with a two-instruction program, not read off the version number
//! (distributions backport features, and a version says nothing of a
//! kernel's configuration).

use std::{
    ffi::CStr,
    io::{self, Write},
    os::fd::{AsRawFd, FromRawFd},
    path::Path,
};

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
    task_offsets_in(&KernelTypes::load()?)
}

/// [`task_offsets`] from parsed BTF.
pub fn task_offsets_in(types: &KernelTypes) -> Result<TaskOffsets, BtfError> {
    Ok(TaskOffsets {
        task_mm: types.offset("task_struct", "mm")?,
        mm_start_code: types.offset("mm_struct", "start_code")?,
    })
}

/// Reads the [`SocketOffsets`](omegi_common::SocketOffsets) (HTTP on
/// sockets) from the running kernel's BTF.
pub fn socket_offsets() -> Result<omegi_common::SocketOffsets, BtfError> {
    socket_offsets_in(&KernelTypes::load()?)
}

/// [`socket_offsets`] from parsed BTF.
pub fn socket_offsets_in(types: &KernelTypes) -> Result<omegi_common::SocketOffsets, BtfError> {
    let offset = |structure, field| types.offset(structure, field);
    let sock = |field| offset("sock", field);
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

/// The kernel's types, to look up where a field lies in a structure.
///
/// btf-rs's mmap backend reads a type only when it is asked for: the few
/// structures omegi needs cost milliseconds, where parsing all of the
/// kernel's hundred thousand types first took over a second in a debug
/// build (and twenty under the kernel VMs' emulation), at every start. The
/// bytes are copied into a memory file first: only recent kernels let
/// sysfs's copy be mapped (this machine's 6.18 does; the 5.10 and 6.1 the
/// tests boot are not relied on to).
pub struct KernelTypes(btf_rs::Btf);

impl KernelTypes {
    /// The running kernel's types ([`VMLINUX_BTF`]).
    pub fn load() -> Result<Self, BtfError> {
        Self::from_bytes(&std::fs::read(VMLINUX_BTF).map_err(BtfError::Missing)?)
    }

    /// Types from BTF bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BtfError> {
        let unreadable = |error: &dyn std::fmt::Display| BtfError::Unreadable(error.to_string());
        // SAFETY: the name is a valid C string; the descriptor returned is
        // new and owned by nobody else.
        let file = unsafe {
            let fd = libc::memfd_create(c"omegi-btf".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return Err(unreadable(&io::Error::last_os_error()));
            }
            std::fs::File::from(std::os::fd::OwnedFd::from_raw_fd(fd))
        };
        (&file).write_all(bytes).map_err(|e| unreadable(&e))?;
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        btf_rs::Btf::from_file_with_backend(path, btf_rs::Backend::Mmap)
            .map(Self)
            .map_err(|e| unreadable(&e))
    }

    /// The byte offset of `path` (`field`, or `field.field…` through nested
    /// and anonymous members) in `struct structure`.
    pub fn offset(&self, structure: &'static str, path: &'static str) -> Result<u32, BtfError> {
        let missing = || BtfError::NoField(structure, path);
        let mut current = self
            .0
            .resolve_types_by_name(structure)
            .map_err(|_| missing())?
            .into_iter()
            .find_map(|found| match found {
                btf_rs::Type::Struct(structure) => Some(structure),
                _ => None,
            })
            .ok_or_else(missing)?;
        let mut bits = 0;
        let mut fields = path.split('.').peekable();
        while let Some(field) = fields.next() {
            let (offset, member) = self.member(&current, field).ok_or_else(missing)?;
            bits += offset;
            if fields.peek().is_some() {
                current = self.composite(&member).ok_or_else(missing)?;
            }
        }
        if bits % 8 != 0 {
            return Err(missing());
        }
        Ok(bits / 8)
    }

    /// `name` in `structure`, or in one of its anonymous structures and
    /// unions: its bit offset from `structure`'s start, and the member.
    fn member(&self, structure: &btf_rs::Struct, name: &str) -> Option<(u32, btf_rs::Member)> {
        for member in &structure.members {
            let member_name = self.0.resolve_name(member).unwrap_or_default();
            if member_name == name {
                return Some((member.bit_offset(), member.clone()));
            }
            if member_name.is_empty() {
                if let Some(inner) = self.composite(member) {
                    if let Some((offset, found)) = self.member(&inner, name) {
                        return Some((member.bit_offset() + offset, found));
                    }
                }
            }
        }
        None
    }

    /// The structure or union a member is, through typedefs and qualifiers.
    fn composite(&self, member: &btf_rs::Member) -> Option<btf_rs::Struct> {
        let mut current = self.0.resolve_chained_type(member).ok()?;
        loop {
            current = match current {
                btf_rs::Type::Struct(found) | btf_rs::Type::Union(found) => return Some(found),
                btf_rs::Type::Typedef(ref link) => self.0.resolve_chained_type(link).ok()?,
                btf_rs::Type::Const(ref link)
                | btf_rs::Type::Volatile(ref link)
                | btf_rs::Type::Restrict(ref link) => self.0.resolve_chained_type(link).ok()?,
                btf_rs::Type::TypeTag(ref link) => self.0.resolve_chained_type(link).ok()?,
                _ => return None,
            };
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
        let types = KernelTypes::load().expect("this kernel publishes its BTF");
        let offsets = task_offsets_in(&types).expect("this kernel's BTF has both fields");
        // task_struct is large; mm is well inside it. start_code follows
        // the mmap bookkeeping at the start of mm_struct.
        assert!(offsets.task_mm > 64, "{offsets:?}");
        assert!(offsets.mm_start_code > 0, "{offsets:?}");
        assert!(matches!(
            KernelTypes::from_bytes(b"not btf"),
            Err(BtfError::Unreadable(_))
        ));
        assert!(matches!(
            types.offset("task_struct", "no_such_field"),
            Err(BtfError::NoField("task_struct", "no_such_field"))
        ));
    }

    #[test]
    fn socket_offsets_come_from_this_kernels_btf() {
        let types = KernelTypes::load().expect("this kernel publishes its BTF");
        let offsets = socket_offsets_in(&types).expect("this kernel's BTF has every field");
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
