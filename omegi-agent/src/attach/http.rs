//! The syscall tracepoints that follow HTTP/1.x on traced processes' TCP
//! sockets (the kernel's `http.rs`): a program on the enter of each read and
//! write syscall, one on all their exits, one on `close`.

use aya::{programs::TracePoint, Ebpf};
use omegi_common::names;

use super::{program_mut, refusal, AttachError};

/// (program, syscall) for the enter tracepoints; every syscall here also
/// gets [`names::PROG_IO_EXIT`] on its exit.
const ENTERS: &[(&str, &str)] = &[
    (names::PROG_IO_READ, "read"),
    (names::PROG_IO_READ, "recvfrom"),
    (names::PROG_IO_WRITE, "write"),
    (names::PROG_IO_WRITE, "sendto"),
    (names::PROG_IO_READV, "readv"),
    (names::PROG_IO_WRITEV, "writev"),
    (names::PROG_IO_RECVMSG, "recvmsg"),
    (names::PROG_IO_SENDMSG, "sendmsg"),
];

const PROGRAMS: [&str; 8] = [
    names::PROG_IO_READ,
    names::PROG_IO_WRITE,
    names::PROG_IO_READV,
    names::PROG_IO_WRITEV,
    names::PROG_IO_RECVMSG,
    names::PROG_IO_SENDMSG,
    names::PROG_IO_EXIT,
    names::PROG_IO_CLOSE,
];

/// Loads and attaches the programs (they do nothing unless the agent set
/// `HTTP_ENABLED` at load). On failure none stays attached: half of them
/// (reads seen, closes not) would follow connections wrongly.
pub fn attach(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    let result = attach_all(ebpf);
    if result.is_err() {
        for program in PROGRAMS {
            if let Ok(tracepoint) = program_mut::<TracePoint>(ebpf, program) {
                let _ = tracepoint.unload();
            }
        }
    }
    result
}

fn attach_all(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    for program in PROGRAMS {
        let tracepoint: &mut TracePoint = program_mut(ebpf, program)?;
        tracepoint
            .load()
            .map_err(|error| refusal::refused(program, error))?;
    }
    let mut attach = |program: &'static str, tracepoint: String| -> Result<(), AttachError> {
        let loaded: &mut TracePoint = program_mut(ebpf, program)?;
        loaded
            .attach("syscalls", &tracepoint)
            .map(|_| ())
            .map_err(|source| AttachError::Program {
                name: program,
                source,
            })
    };
    for &(program, syscall) in ENTERS {
        attach(program, format!("sys_enter_{syscall}"))?;
        attach(names::PROG_IO_EXIT, format!("sys_exit_{syscall}"))?;
    }
    attach(names::PROG_IO_CLOSE, "sys_enter_close".into())
}
