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

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind};

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
            if index == 0 && first_two.len() < 2 {
                first_two.push(instruction);
            }
            match instruction.flow_control() {
                FlowControl::Return => analysis.exits.push(Exit {
                    site: site(&instruction),
                    kind: ExitKind::Return,
                }),
                FlowControl::UnconditionalBranch if is_near_direct(&instruction) => {
                    let target = instruction.near_branch_target();
                    if inside(target) {
                        internal_targets.insert(target);
                    } else {
                        analysis.exits.push(Exit {
                            site: site(&instruction),
                            kind: ExitKind::TailJump,
                        });
                    }
                }
                FlowControl::ConditionalBranch if is_near_direct(&instruction) => {
                    let target = instruction.near_branch_target();
                    if inside(target) {
                        internal_targets.insert(target);
                    } else {
                        analysis.conditional_exits += 1;
                    }
                }
                // `jmp *disp(%rip)`: a tail call through the GOT or a
                // function pointer in static memory (a jump table needs an
                // index register), so it leaves the function.
                FlowControl::IndirectBranch if is_rip_relative_memory(&instruction) => {
                    analysis.exits.push(Exit {
                        site: site(&instruction),
                        kind: ExitKind::TailJump,
                    })
                }
                FlowControl::IndirectBranch => analysis.indirect_jumps += 1,
                FlowControl::Call | FlowControl::IndirectCall => analysis.calls += 1,
                _ => {}
            }
        }
    }
    analysis.entry = choose_entry(body.address, &first_two, &internal_targets);
    analysis
}

/// The entry probe goes on the first instruction, unless that is an `endbr64`
/// (single-stepped) followed by an emulated one: `endbr64` does not touch the
/// stack, so the probe one instruction later sees the same stack pointer and
/// arguments for a fraction of the cost. Not if code inside the function
/// jumps to that second instruction: the probe would fire mid-call.
fn choose_entry(
    start: u64,
    first_two: &[Instruction],
    internal_targets: &HashSet<u64>,
) -> Option<ProbeSite> {
    let first = first_two.first()?;
    debug_assert_eq!(first.ip(), start);
    if first.code() == Code::Endbr64 {
        if let Some(second) = first_two.get(1) {
            if cost(second) == ProbeCost::Emulated && !internal_targets.contains(&second.ip()) {
                return Some(site(second));
            }
        }
    }
    Some(site(first))
}

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
