//! A program the kernel refused: one line that says which program, which
//! kernel and why, with the verifier's log (thousands of lines) in a file
//! that the line names.

use std::path::PathBuf;

use aya::programs::ProgramError;

use super::{features::kernel_release, AttachError};

/// Turns a failed load of `program` into one line, keeping the verifier's
/// log in a file (and in the debug log, `-v`). Other failures pass through.
pub fn refused(program: &'static str, error: ProgramError) -> AttachError {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => refused_with_log(program, &io_error.to_string(), &verifier_log.to_string()),
        source => AttachError::Program {
            name: program,
            source,
        },
    }
}

/// [`refused`] from the system call's error and the verifier's log.
pub fn refused_with_log(program: &'static str, io_error: &str, log: &str) -> AttachError {
    tracing::debug!("verifier log of {program}:\n{log}");
    let log_file = (!log.trim().is_empty())
        .then(|| save_log(program, log))
        .flatten();
    AttachError::Refused {
        program,
        kernel: kernel_release(),
        reason: reason(log).unwrap_or_else(|| io_error.to_owned()),
        log_file: log_file.map_or_else(
            || "no verifier log".to_owned(),
            |path| format!("verifier log in {}", path.display()),
        ),
    }
}

/// Writes the log where the user can read it, under the temporary directory.
fn save_log(program: &str, log: &str) -> Option<PathBuf> {
    let path = std::env::temp_dir().join(format!("omegi-verifier-{program}.log"));
    match std::fs::write(&path, log) {
        Ok(()) => Some(path),
        Err(error) => {
            tracing::warn!(
                "cannot write the verifier log to {}: {error}",
                path.display()
            );
            None
        }
    }
}

/// The reason a verifier log gives, in words a user can act on: the limit
/// it hit, the helper or map kind the kernel lacks, or else its last
/// message.
pub fn reason(log: &str) -> Option<String> {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if let Some(line) = lines
        .iter()
        .find(|l| l.contains("BPF program is too large"))
    {
        let walked = line
            .split("Processed ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("over a million");
        return Some(format!(
            "too complex to verify: the verifier walked {walked} instructions, over its limit of 1000000"
        ));
    }
    if let Some(line) = lines
        .iter()
        .find(|l| l.starts_with("unknown func") || l.starts_with("invalid func"))
    {
        let helper = line.split_whitespace().nth(2).unwrap_or("?");
        return Some(format!(
            "it calls the helper {helper}, which this kernel does not have"
        ));
    }
    if lines
        .iter()
        .any(|l| l.contains("Switch to preallocated hash maps"))
    {
        return Some(
            "it uses a hash map that allocates, which this kernel refuses in tracing programs"
                .into(),
        );
    }
    // The verifier ends with statistics; the message is just before them.
    lines
        .iter()
        .rev()
        .find(|l| {
            !(l.starts_with("processed ")
                || l.starts_with("verification time")
                || l.starts_with("stack depth")
                || l.starts_with("max_states_per_insn"))
        })
        .map(|l| (*l).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_too_large_names_the_limit() {
        let log = "0: (bf) r6 = r1\n...\nBPF program is too large. Processed 1000001 insn\n\
                   processed 1000001 insns (limit 1000000) max_states_per_insn 19 total_states 41234\n";
        assert_eq!(
            reason(log).unwrap(),
            "too complex to verify: the verifier walked 1000001 instructions, over its limit of 1000000"
        );
    }

    #[test]
    fn a_missing_helper_is_named() {
        let log = "0: R1=ctx(off=0,imm=0) R10=fp0\n0: (85) call unknown#174\n\
                   unknown func bpf_get_attach_cookie#174\nprocessed 1 insns\n";
        assert_eq!(
            reason(log).unwrap(),
            "it calls the helper bpf_get_attach_cookie#174, which this kernel does not have"
        );
    }

    #[test]
    fn an_allocating_map_is_named() {
        let log = "trace type programs with run-time allocated hash maps are unsafe. \
                   Switch to preallocated hash maps.\n";
        assert!(reason(log).unwrap().contains("hash map that allocates"));
    }

    #[test]
    fn otherwise_the_last_message_before_the_statistics() {
        let log = "5: (79) r1 = *(u64 *)(r6 +0)\nR6 invalid mem access 'scalar'\n\
                   processed 6 insns (limit 1000000)\nverification time 12 usec\n";
        assert_eq!(reason(log).unwrap(), "R6 invalid mem access 'scalar'");
        assert_eq!(reason("\n"), None);
    }

    #[test]
    fn the_message_is_one_line_and_the_log_is_kept() {
        let log = "line\n".repeat(5000) + "BPF program is too large. Processed 1000001 insn\n";
        let error = refused_with_log("omegi_test_program", "Argument list too long", &log);
        let message = error.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("omegi_test_program"), "{message}");
        assert!(message.contains(&kernel_release()), "{message}");
        let path = std::env::temp_dir().join("omegi-verifier-omegi_test_program.log");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), log);
        let _ = std::fs::remove_file(path);
    }
}
