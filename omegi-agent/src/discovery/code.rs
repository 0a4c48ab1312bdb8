//! Reading a function's x86-64 code: where to put its entry probe and where it
//! can leave.
//!
//! Exits are found by decoding, never by a uretprobe in a binary that can
//! unwind (see DESIGN.md). A function leaves through a `ret`, or through a
//! tail call: an unconditional direct `jmp` out of its own code. Both are
//! probed. What decoding cannot settle (an indirect `jmp`, which may be a jump
//! table or a tail call through a pointer; a conditional jump out of the
//! function) is recorded, and frames left that way are closed by the kernel
//! side's stack-pointer rule at the thread's next traced event.

use std::collections::HashSet;

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, OpKind,
};

/// How costly a probe on an instruction is. The kernel emulates a few
/// instructions; every other one is single-stepped out of line, which is a
/// VM exit on a KVM guest and costs about ten times as much (DESIGN.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeCost {
    /// `push reg`, `nop`, direct `call`/`jmp`/`jcc`: emulated by the kernel.
    Emulated,
    /// Anything else (`ret`, `endbr64`, `mov`, `sub`, …): single-stepped.
    SingleStepped,
}

/// One instruction a probe goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// Virtual address.
    pub address: u64,
    /// Offset in the file, the form uprobes take (filled in by discovery,
    /// which has the segment table).
    pub file_offset: u64,
    /// Mnemonic in Intel syntax, lowercase (e.g. `push`, `ret`, `jmp`).
    pub mnemonic: String,
    pub cost: ProbeCost,
}

/// How a function leaves at an exit site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// A `ret`.
    Return,
    /// An unconditional direct `jmp` out of the function.
    TailJump,
}

/// An exit site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub site: ProbeSite,
    pub kind: ExitKind,
}

/// What decoding a function found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CodeAnalysis {
    /// Where the entry probe goes; `None` if the code could not be decoded.
    pub entry: Option<ProbeSite>,
    pub exits: Vec<Exit>,
    /// Indirect `jmp`s: a jump table or a tail call through a pointer.
    pub indirect_jumps: u32,
    /// Conditional jumps whose target is outside the function.
    pub conditional_exits: u32,
    /// `call` instructions, direct or not.
    pub calls: u32,
    /// Bytes that did not decode as instructions.
    pub invalid_bytes: bool,
    /// `ret`s and tail jumps left unprobed because the kernel refuses a
    /// probe on them (see [`kernel_refuses`]).
    pub unprobeable_exits: u32,
    /// Why there is no entry probe although the code decoded: the kernel
    /// refuses to probe the first instruction and the probe cannot go on the
    /// next one.
    pub unprobeable_entry: Option<&'static str>,
}

impl CodeAnalysis {
    /// Whether the function calls nothing and leaves only by `ret`: then no
    /// exception or panic can start below its frame, so no unwinder walks
    /// through it while it runs, and a uretprobe is safe even in a binary
    /// that can unwind (but see `FunctionTable::leaf_uretprobes`).
    pub fn is_leaf(&self) -> bool {
        self.calls == 0
            && self.exits_complete()
            && self.exits.iter().all(|exit| exit.kind == ExitKind::Return)
    }

    /// Whether every way out of the function is probed. When not, a frame
    /// left some other way is closed when the thread's stack shows it gone.
    pub fn exits_complete(&self) -> bool {
        !self.exits.is_empty()
            && self.indirect_jumps == 0
            && self.conditional_exits == 0
            && self.unprobeable_exits == 0
            && !self.invalid_bytes
    }
}

/// A contiguous piece of a function's code: its body, or a part the compiler
/// moved elsewhere (GCC's `foo.cold`).
#[derive(Clone, Copy, Debug)]
pub struct CodeRange<'a> {
    pub address: u64,
    pub bytes: &'a [u8],
}

impl CodeRange<'_> {
    fn contains(&self, address: u64) -> bool {
        address >= self.address && address < self.address + self.bytes.len() as u64
    }
}

/// Decodes a function whose first range is its entry.
pub fn analyze(ranges: &[CodeRange<'_>]) -> CodeAnalysis {
    let mut analysis = CodeAnalysis::default();
    let Some(body) = ranges.first() else {
        return analysis;
    };
    let inside = |target: u64| ranges.iter().any(|range| range.contains(target));

    let mut internal_targets = HashSet::new();
    let mut first_two = Vec::with_capacity(2);
    for (index, range) in ranges.iter().enumerate() {
        let mut decoder = Decoder::with_ip(64, range.bytes, range.address, DecoderOptions::NONE);
        let mut instruction = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut instruction);
            if instruction.is_invalid() {
                analysis.invalid_bytes = true;
                continue;
            }
            let start = (instruction.ip() - range.address) as usize;
            let refused = kernel_refuses(&range.bytes[start..start + instruction.len()]);
            if index == 0 && first_two.len() < 2 {
                first_two.push((instruction, refused));
            }
            let exit = match instruction.flow_control() {
                FlowControl::Return => Some(ExitKind::Return),
                FlowControl::UnconditionalBranch if is_near_direct(&instruction) => {
                    let target = instruction.near_branch_target();
                    if inside(target) {
                        internal_targets.insert(target);
                        None
                    } else {
                        Some(ExitKind::TailJump)
                    }
                }
                FlowControl::ConditionalBranch if is_near_direct(&instruction) => {
                    let target = instruction.near_branch_target();
                    if inside(target) {
                        internal_targets.insert(target);
                    } else {
                        analysis.conditional_exits += 1;
                    }
                    None
                }
                // `jmp *disp(%rip)`: a tail call through the GOT or a
                // function pointer in static memory (a jump table needs an
                // index register), so it leaves the function.
                FlowControl::IndirectBranch if is_rip_relative_memory(&instruction) => {
                    Some(ExitKind::TailJump)
                }
                FlowControl::IndirectBranch => {
                    analysis.indirect_jumps += 1;
                    None
                }
                FlowControl::Call | FlowControl::IndirectCall => {
                    analysis.calls += 1;
                    None
                }
                _ => None,
            };
            match (exit, refused) {
                (Some(kind), None) => analysis.exits.push(Exit {
                    site: site(&instruction),
                    kind,
                }),
                // Left to the stack-pointer rule, like an indirect jump.
                (Some(_), Some(_)) => analysis.unprobeable_exits += 1,
                (None, _) => {}
            }
        }
    }
    match choose_entry(body.address, &first_two, &internal_targets) {
        Ok(entry) => analysis.entry = entry,
        Err(reason) => analysis.unprobeable_entry = Some(reason),
    }
    analysis
}

/// The entry probe goes on the first instruction, unless that is an `endbr64`
/// (single-stepped) followed by an emulated one: `endbr64` does not touch the
/// stack, so the probe one instruction later sees the same stack pointer and
/// arguments for a fraction of the cost. Not if code inside the function
/// jumps to that second instruction: the probe would fire mid-call.
///
/// When the kernel refuses a probe on the first instruction (SQLite's
/// `unixShmBarrier` starts with `lock orq $0,(%rsp)`, a memory barrier), the
/// probe goes on the second if the first only falls through and writes no
/// register (it may write memory, even the return address: a uretprobe
/// placed after it saves what the function will return to): the entry
/// program reads only the stack pointer and the probe's address. Otherwise
/// the function cannot be traced (`Err`, why). `Ok(None)`: nothing decoded.
fn choose_entry(
    start: u64,
    first_two: &[(Instruction, Option<&'static str>)],
    internal_targets: &HashSet<u64>,
) -> Result<Option<ProbeSite>, &'static str> {
    let Some((first, refused)) = first_two.first() else {
        return Ok(None);
    };
    debug_assert_eq!(first.ip(), start);
    let second = first_two
        .get(1)
        .filter(|(second, refused)| refused.is_none() && !internal_targets.contains(&second.ip()))
        .map(|(second, _)| second);
    if let Some(reason) = refused {
        return match second {
            Some(second) if steps_over(first) && !internal_targets.contains(&start) => {
                Ok(Some(site(second)))
            }
            _ => Err(reason),
        };
    }
    if first.code() == Code::Endbr64 {
        if let Some(second) = second.filter(|second| cost(second) == ProbeCost::Emulated) {
            return Ok(Some(site(second)));
        }
    }
    Ok(Some(site(first)))
}

/// Whether `instruction` goes on to the next one and changes no register
/// (flags aside), so that a probe on the next sees the stack pointer the
/// function was entered with.
fn steps_over(instruction: &Instruction) -> bool {
    if instruction.flow_control() != FlowControl::Next {
        return false;
    }
    let mut factory = InstructionInfoFactory::new();
    let info = factory.info(instruction);
    let writes_a_register = info.used_registers().iter().any(|used| {
        matches!(
            used.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        )
    });
    !writes_a_register
}

/// Why the kernel refuses a uprobe on the instruction made of `bytes`, if
/// it does: `uprobe_register` then fails with -ENOTSUPP (error 524). This
/// mirrors `prepare_uprobe` (kernel/events/uprobes.c: an `int3` is refused)
/// and `arch_uprobe_analyze_insn` (arch/x86/kernel/uprobes.c:
/// `uprobe_init_insn` refuses the `es`, `cs`, `ss`, `ds` and `lock`
/// prefixes, `mov ss` and the opcodes its `good_insns_64` and
/// `good_2byte_insns` tables leave out, also after a VEX or EVEX prefix;
/// `branch_setup_xol_ops` refuses a relative `call`, `jmp` or `jcc` with a
/// `66` prefix).
///
/// The kernel checks this only when it writes the breakpoint into a process
/// that maps the file. When omegi starts the program, the probes are linked
/// before the binary is mapped, and the kernel ignores the error when it
/// maps it: such a probe is silently never armed. When the program is
/// already running (`--pid`, or the overhead budget linking the remaining
/// functions again), the error fails the whole `uprobe_multi` link, every
/// function with it. So no probe may go on such an instruction.
///
/// Later kernels (6.18 among them) accept every two- and three-byte opcode
/// (`0f` is in their `good_insns_64`); earlier ones look two-byte opcodes up
/// in `good_2byte_insns` and refuse three-byte ones (`0f 38`, `0f 3a`).
/// The earlier, stricter rule is kept so that a probe placed here works on
/// every kernel omegi starts on.
pub fn kernel_refuses(bytes: &[u8]) -> Option<&'static str> {
    let mut at = 0;
    let mut operand_size = false;
    while let Some(&byte) = bytes.get(at) {
        match byte {
            0x26 | 0x2e | 0x36 | 0x3e => return Some("a segment prefix"),
            0xf0 => return Some("a lock prefix"),
            0x66 => operand_size = true,
            0x64 | 0x65 | 0x67 | 0xf2 | 0xf3 => {}
            _ => break,
        }
        at += 1;
    }
    if matches!(bytes.get(at), Some(0x40..=0x4f)) {
        at += 1; // REX
    }
    let vex_length = match bytes.get(at) {
        Some(0xc5) => Some(2),
        Some(0xc4) => Some(3),
        Some(0x62) => Some(4), // EVEX
        _ => None,
    };
    if let Some(length) = vex_length {
        // VEX and EVEX carry one opcode byte, looked up like a one-byte one.
        let opcode = *bytes.get(at + length)?;
        return (!good(&GOOD_INSNS_64, opcode)).then_some("an opcode uprobes do not handle");
    }
    let opcode = *bytes.get(at)?;
    if opcode == 0xcc {
        return Some("a breakpoint");
    }
    if !good(&GOOD_INSNS_64, opcode) {
        return Some("an opcode uprobes do not handle");
    }
    let branch = match opcode {
        0x0f => {
            let second = *bytes.get(at + 1)?;
            if matches!(second, 0x38 | 0x3a) || !good(&GOOD_2BYTE_INSNS, second) {
                return Some("an opcode uprobes do not handle");
            }
            (0x80..=0x8f).contains(&second)
        }
        // mov to ss masks exceptions for one instruction.
        0x8e if bytes.get(at + 1).is_some_and(|modrm| (modrm >> 3) & 7 == 2) => {
            return Some("a mov to ss")
        }
        0x70..=0x7f | 0xe8 | 0xe9 | 0xeb => true,
        _ => false,
    };
    (branch && operand_size).then_some("a branch with a 66 prefix")
}

fn good(table: &[[u8; 16]; 16], opcode: u8) -> bool {
    table[usize::from(opcode >> 4)][usize::from(opcode & 0xf)] == 1
}

/// `good_insns_64` of arch/x86/kernel/uprobes.c (Linux 6.18), a row per
/// high nibble. Prefix bytes (26, 2e, 36, 3e, 40-4f, c4, c5, f0) are never
/// looked up here: they are taken as prefixes first.
#[rustfmt::skip]
const GOOD_INSNS_64: [[u8; 16]; 16] = [
    /*        0  1  2  3  4  5  6  7  8  9  a  b  c  d  e  f */
    /* 00 */ [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1],
    /* 10 */ [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
    /* 20 */ [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0],
    /* 30 */ [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0],
    /* 40 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 50 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 60 */ [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
    /* 70 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 80 */ [1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 90 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1],
    /* a0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* b0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* c0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
    /* d0 */ [1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* e0 */ [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0],
    /* f0 */ [1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1],
];

/// `good_2byte_insns` of arch/x86/kernel/uprobes.c: the second byte after
/// `0f`.
#[rustfmt::skip]
const GOOD_2BYTE_INSNS: [[u8; 16]; 16] = [
    /*        0  1  2  3  4  5  6  7  8  9  a  b  c  d  e  f */
    /* 00 */ [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1],
    /* 10 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 20 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 30 */ [0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 40 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 50 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 60 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 70 */ [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1],
    /* 80 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* 90 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* a0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1],
    /* b0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* c0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* d0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* e0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    /* f0 */ [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
];

fn site(instruction: &Instruction) -> ProbeSite {
    ProbeSite {
        address: instruction.ip(),
        file_offset: 0,
        mnemonic: mnemonic(instruction),
        cost: cost(instruction),
    }
}

fn mnemonic(instruction: &Instruction) -> String {
    format!("{:?}", instruction.mnemonic()).to_lowercase()
}

fn is_rip_relative_memory(instruction: &Instruction) -> bool {
    instruction.op0_kind() == OpKind::Memory
        && instruction.memory_base() == iced_x86::Register::RIP
        && instruction.memory_index() == iced_x86::Register::None
}

fn is_near_direct(instruction: &Instruction) -> bool {
    matches!(
        instruction.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    )
}

/// Mirrors the kernel's x86 uprobe emulation (`branch_setup_xol_ops` and
/// `push_setup_xol_ops` in arch/x86/kernel/uprobes.c).
pub fn cost(instruction: &Instruction) -> ProbeCost {
    let emulated = match instruction.mnemonic() {
        Mnemonic::Nop => true,
        Mnemonic::Push => instruction.op0_kind() == OpKind::Register,
        Mnemonic::Call | Mnemonic::Jmp => is_near_direct(instruction),
        _ => {
            instruction.flow_control() == FlowControl::ConditionalBranch
                && is_near_direct(instruction)
        }
    };
    if emulated {
        ProbeCost::Emulated
    } else {
        ProbeCost::SingleStepped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analyze_bytes(bytes: &[u8]) -> CodeAnalysis {
        analyze(&[CodeRange {
            address: 0x1000,
            bytes,
        }])
    }

    #[test]
    fn gcc_o0_prologue_probes_the_first_push() {
        // push rbp; mov rbp,rsp; mov eax,1; pop rbp; ret
        let a = analyze_bytes(&[0x55, 0x48, 0x89, 0xe5, 0xb8, 1, 0, 0, 0, 0x5d, 0xc3]);
        let entry = a.entry.clone().unwrap();
        assert_eq!((entry.address, entry.cost), (0x1000, ProbeCost::Emulated));
        assert_eq!(a.exits.len(), 1);
        assert_eq!(a.exits[0].site.address, 0x100a);
        assert_eq!(a.exits[0].kind, ExitKind::Return);
        assert_eq!(a.exits[0].site.cost, ProbeCost::SingleStepped);
        assert!(a.exits_complete());
    }

    #[test]
    fn endbr64_then_push_moves_the_entry_probe() {
        // endbr64; push rbp; pop rbp; ret
        let a = analyze_bytes(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x5d, 0xc3]);
        let entry = a.entry.clone().unwrap();
        assert_eq!(entry.address, 0x1004);
        assert_eq!(entry.mnemonic, "push");
        assert_eq!(entry.cost, ProbeCost::Emulated);
    }

    #[test]
    fn endbr64_then_mov_stays_on_the_first_byte() {
        // endbr64; mov eax,1; ret
        let a = analyze_bytes(&[0xf3, 0x0f, 0x1e, 0xfa, 0xb8, 1, 0, 0, 0, 0xc3]);
        assert_eq!(a.entry.unwrap().address, 0x1000);
    }

    #[test]
    fn entry_is_not_moved_onto_a_jump_target() {
        // endbr64; push rbp; pop rbp; jmp 0x1004 (back to the push)
        let a = analyze_bytes(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x5d, 0xeb, 0xfc]);
        assert_eq!(a.entry.unwrap().address, 0x1000);
    }

    #[test]
    fn the_kernels_refusals_are_mirrored() {
        // Checked against Linux 6.18 here: a uprobe on each, in a running
        // process, is refused with error 524 exactly where `Some`.
        let refused: &[&[u8]] = &[
            &[0xf0, 0x48, 0x83, 0x0c, 0x24, 0x00], // lock or qword [rsp],0
            &[0xf0, 0x0f, 0xc1, 0x07],             // lock xadd [rdi],eax
            &[0x2e, 0x90],                         // cs nop
            &[0x3e, 0x48, 0x89, 0xf8],             // ds mov rax,rdi
            &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0], // cs nop word [...]
            &[0xcc],                               // int3
            &[0xc5, 0xfe, 0x6f, 0x07],             // vmovdqu ymm0,[rdi]
            &[0x62, 0xf1, 0xfe, 0x48, 0x6f, 0x07], // vmovdqu64 zmm0,[rdi]
            &[0x66, 0xe9, 0, 0],                   // jmp rel16
            &[0x8e, 0xd0],                         // mov ss,eax
            // Refused by kernels before 6.18 only (good_2byte_insns).
            &[0x0f, 0x0b], // ud2
            &[0x0f, 0x05], // syscall
        ];
        for bytes in refused {
            assert!(kernel_refuses(bytes).is_some(), "{bytes:02x?}");
        }
        let accepted: &[&[u8]] = &[
            &[0xc3],                                     // ret
            &[0xf3, 0xc3],                               // repz ret
            &[0xf2, 0xc3],                               // bnd ret
            &[0xf3, 0x0f, 0x1e, 0xfa],                   // endbr64
            &[0x55],                                     // push rbp
            &[0x41, 0x57],                               // push r15
            &[0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0], // mov rax,fs:[0]
            &[0x48, 0x87, 0x07],                         // xchg [rdi],rax
            &[0xc5, 0xf8, 0x77],                         // vzeroupper
            &[0x0f, 0x1f, 0x44, 0x00, 0x00],             // nop dword [rax+rax]
            &[0x66, 0x90],                               // xchg ax,ax
            &[0xf3, 0x0f, 0x10, 0x07],                   // movss xmm0,[rdi]
            &[0x0f, 0x31],                               // rdtsc
            &[0xe9, 0, 0, 0, 0],                         // jmp rel32
            &[0x0f, 0x84, 0, 0, 0, 0],                   // je rel32
            &[0xe8, 0, 0, 0, 0],                         // call rel32
        ];
        for bytes in accepted {
            assert_eq!(kernel_refuses(bytes), None, "{bytes:02x?}");
        }
    }

    #[test]
    fn a_barrier_at_the_entry_moves_the_probe_past_it() {
        // lock or qword [rsp],0; add qword [rip+0x100],1; ret (SQLite's
        // unixShmBarrier, gcc -O2)
        let a = analyze_bytes(&[
            0xf0, 0x48, 0x83, 0x0c, 0x24, 0x00, 0x48, 0x83, 0x05, 0, 1, 0, 0, 1, 0xc3,
        ]);
        let entry = a.entry.clone().unwrap();
        assert_eq!(entry.address, 0x1006);
        assert_eq!(entry.mnemonic, "add");
        assert_eq!(a.unprobeable_entry, None);
        assert!(a.is_leaf());
    }

    #[test]
    fn an_unprobeable_entry_that_writes_a_register_is_no_entry() {
        // lock xadd [rdi],eax; ret
        let a = analyze_bytes(&[0xf0, 0x0f, 0xc1, 0x07, 0xc3]);
        assert_eq!(a.entry, None);
        assert_eq!(a.unprobeable_entry, Some("a lock prefix"));
        // lock or qword [rsp],0; then a loop back to the start.
        let a = analyze_bytes(&[0xf0, 0x48, 0x83, 0x0c, 0x24, 0x00, 0xeb, 0xf8]);
        assert_eq!(a.entry, None);
    }

    #[test]
    fn an_unprobeable_exit_is_left_to_the_stack_pointer_rule() {
        // push rbp; pop rbp; cs ret
        let a = analyze_bytes(&[0x55, 0x5d, 0x2e, 0xc3]);
        assert!(a.exits.is_empty());
        assert_eq!(a.unprobeable_exits, 1);
        assert!(!a.exits_complete());
        assert!(!a.is_leaf());
    }

    #[test]
    fn several_returns_are_all_exits() {
        // test edi,edi; je +2; xor eax,eax; ret; mov eax,1; ret
        let a = analyze_bytes(&[
            0x85, 0xff, 0x74, 0x03, 0x31, 0xc0, 0xc3, 0xb8, 1, 0, 0, 0, 0xc3,
        ]);
        let returns: Vec<u64> = a.exits.iter().map(|exit| exit.site.address).collect();
        assert_eq!(returns, vec![0x1006, 0x100c]);
        assert!(a.exits_complete());
    }

    #[test]
    fn direct_jump_out_is_a_tail_call_exit() {
        // add edi,1; jmp 0x2000
        let a = analyze_bytes(&[0x83, 0xc7, 0x01, 0xe9, 0xf8, 0x0f, 0x00, 0x00]);
        assert_eq!(a.exits.len(), 1);
        assert_eq!(a.exits[0].kind, ExitKind::TailJump);
        assert_eq!(a.exits[0].site.cost, ProbeCost::Emulated);
        assert!(a.exits_complete());
    }

    #[test]
    fn a_jump_through_the_got_is_a_tail_call_exit() {
        // lea rdi,[rip+0]; jmp qword ptr [rip+0x40d8e]
        let a = analyze_bytes(&[
            0x48, 0x8d, 0x3d, 0, 0, 0, 0, 0xff, 0x25, 0x8e, 0x0d, 0x04, 0x00,
        ]);
        assert_eq!(a.exits.len(), 1);
        assert_eq!(a.exits[0].kind, ExitKind::TailJump);
        assert_eq!(a.exits[0].site.address, 0x1007);
        assert_eq!(a.indirect_jumps, 0);
        assert!(a.exits_complete());
        // jmp qword ptr [rax*8+0x2000]: a jump table, not an exit.
        let table = analyze_bytes(&[0xff, 0x24, 0xc5, 0x00, 0x20, 0x00, 0x00, 0xc3]);
        assert_eq!(table.indirect_jumps, 1);
        assert!(!table.exits_complete());
    }

    #[test]
    fn indirect_and_conditional_exits_leave_the_exits_incomplete() {
        // jne 0x2000 (out); jmp rax; ret
        let a = analyze_bytes(&[0x0f, 0x85, 0xfa, 0x0f, 0x00, 0x00, 0xff, 0xe0, 0xc3]);
        assert_eq!(a.conditional_exits, 1);
        assert_eq!(a.indirect_jumps, 1);
        assert_eq!(a.exits.len(), 1);
        assert!(!a.exits_complete());
    }

    #[test]
    fn jump_into_a_cold_part_is_not_an_exit() {
        let body = [0x0f, 0x85, 0xfa, 0x0f, 0x00, 0x00, 0xc3]; // jne 0x2000; ret
        let cold = [0xc3]; // ret
        let a = analyze(&[
            CodeRange {
                address: 0x1000,
                bytes: &body,
            },
            CodeRange {
                address: 0x2000,
                bytes: &cold,
            },
        ]);
        assert_eq!(a.conditional_exits, 0);
        assert_eq!(a.exits.len(), 2);
        assert!(a.exits_complete());
    }

    #[test]
    fn leaves_call_nothing_and_only_return() {
        // lea eax,[rdi+1]; ret
        assert!(analyze_bytes(&[0x8d, 0x47, 0x01, 0xc3]).is_leaf());
        // call 0x2000; ret
        assert!(!analyze_bytes(&[0xe8, 0xfb, 0x0f, 0x00, 0x00, 0xc3]).is_leaf());
        // call rax; ret
        assert!(!analyze_bytes(&[0xff, 0xd0, 0xc3]).is_leaf());
        // add edi,1; jmp 0x2000 (a tail call: the callee runs on our return address)
        assert!(!analyze_bytes(&[0x83, 0xc7, 0x01, 0xe9, 0xf8, 0x0f, 0x00, 0x00]).is_leaf());
        // jmp rax
        assert!(!analyze_bytes(&[0xff, 0xe0]).is_leaf());
    }

    #[test]
    fn a_function_that_never_returns_has_no_exits() {
        // call 0x2000 (a noreturn function); int3
        let a = analyze_bytes(&[0xe8, 0xfb, 0x0f, 0x00, 0x00, 0xcc]);
        assert!(a.exits.is_empty());
        assert!(!a.exits_complete());
    }
}
