//! Whether a Rust function returned `Err`, from its return registers, by the
//! layout DWARF gives its `Result` (`--error-if 'GLOB:err'`).
//!
//! rustc describes an enum such as `Result<T, E>` as a structure with a
//! variant part: a *discriminant* member (offset and size) and one variant
//! per case, each with the value the discriminant holds for it
//! (`DW_AT_discr_value`). Two encodings exist:
//!
//! - **tagged**: the discriminant is a tag of its own, every variant has a
//!   value (`Result<u32, Code>`: tag byte 0 for `Ok`, 1 for `Err`);
//! - **niche**: the discriminant is a field of one variant's payload whose
//!   invalid values stand for the other variants; that variant (the
//!   untagged one) has no value, the others one each (`Result<(), Code>`
//!   with `Code` of 3 cases: `Ok` is 3 in `Code`'s byte; `io::Result<()>`
//!   and `Result<Box<T>, ()>`: a null pointer is the empty variant).
//!
//! So `Err` is "discriminant == Err's value", or, when `Err` is the untagged
//! variant, "discriminant != Ok's value".
//!
//! Where the discriminant is at the `ret` depends on how rustc returns the
//! value (the Rust ABI on x86-64, checked on rustc 1.95 by disassembly):
//! - up to 8 bytes: in `rax` as the bytes of its memory image (a scalar, or
//!   a small aggregate cast to an integer), or as the first of a scalar pair
//!   (`rax`, then `rdx`) whose first scalar starts at offset 0;
//! - 9 to 16 bytes: in registers only when the layout is a *scalar pair*
//!   (first scalar in `rax`, second in `rdx`, or in `xmm0` for floats);
//!   any other aggregate of that size (`Result<u64, Code>`) goes through a
//!   hidden pointer to the caller's memory, and `rax` is not even that
//!   pointer at the `ret`;
//! - more than 16 bytes (`Result<String, E>`): through memory.
//!
//! A discriminant at offset 0 is the low bits of `rax` in every register
//! case (it is the first scalar of a pair, or the first bytes of the
//! image), so only that one is read: masked to its size, which is what the
//! kernel's rule does too (`FunctionState::rule_bits`). Whether a 9–16 byte
//! layout is a scalar pair is worked out as rustc does it (see
//! [`classify`]), conservatively: anything not recognised counts as
//! memory, and is refused. Everything else is refused with the reason,
//! never guessed: returned through memory, a discriminant elsewhere than at
//! the start of `rax` (or wider than 64 bits), a `Result` without a
//! discriminant (`Result<T, Infallible>`).

use std::fmt;

/// A type as DWARF describes it, reduced to what decides where its value is
/// returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypeShape {
    /// An integer, `bool`, `char` or fieldless enum of `size` bytes.
    Int { size: u64 },
    /// `f32`, `f64`.
    Float { size: u64 },
    /// A thin pointer: `&T`, `*const T`, `Box<T>` and `NonNull<T>` of a sized
    /// `T`.
    Pointer,
    /// A structure (struct, tuple, fat pointer, closure), or an enum when
    /// `variants` is there.
    Struct {
        /// As DWARF names it (`Result<u32, app::Code>`).
        name: String,
        size: u64,
        /// The data members (empty for one over 16 bytes: not read).
        fields: Vec<Field>,
        variants: Option<VariantPart>,
    },
    /// An array, a union, or anything else: never a scalar.
    Opaque { size: u64 },
}

/// A member of a [`TypeShape::Struct`] (or of one of its variants).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Bytes from the start of the enclosing structure.
    pub offset: u64,
    pub shape: TypeShape,
}

/// The variants of an enum and where its discriminant is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VariantPart {
    /// Offset and size in bytes of the discriminant.
    pub discriminant_offset: u64,
    pub discriminant_size: u64,
    pub variants: Vec<Variant>,
}

/// One case of an enum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    /// `Ok`, `Err`.
    pub name: String,
    /// The discriminant's value for this variant; `None` for the untagged
    /// variant of a niche layout.
    pub value: Option<u64>,
    /// The payload's members, offsets from the start of the enum.
    pub fields: Vec<Field>,
}

impl TypeShape {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            TypeShape::Int { size } | TypeShape::Float { size } | TypeShape::Opaque { size } => {
                *size
            }
            TypeShape::Pointer => 8,
            TypeShape::Struct { size, .. } => *size,
        }
    }
}

/// How to tell `Err` from `Ok` in `rax` at a function's `ret`: the low
/// `bits` bits, compared with `value` (masked the same way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrCheck {
    /// 8, 16, 32 or 64.
    pub bits: u32,
    /// The discriminant value compared with.
    pub value: u64,
    /// `true`: `Err` when the discriminant equals `value` (Err's own value);
    /// `false`: when it differs (`value` is Ok's, Err is untagged).
    pub err_if_equal: bool,
}

impl ErrCheck {
    /// The discriminant as read from `rax`.
    pub fn discriminant(&self, rax: u64) -> u64 {
        if self.bits >= 64 {
            rax
        } else {
            rax & ((1u64 << self.bits) - 1)
        }
    }

    /// Whether `rax` holds an `Err`.
    pub fn is_err(&self, rax: u64) -> bool {
        (self.discriminant(rax) == self.discriminant(self.value)) == self.err_if_equal
    }

    /// The value as the kernel rule compares it: sign-extended from `bits`
    /// (the kernel sign-extends `rax` the same way).
    pub fn kernel_value(&self) -> i64 {
        let shift = 64 - self.bits.min(64);
        ((self.value << shift) as i64) >> shift
    }
}

/// Why `Err` cannot be told from a function's return value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("its {type_name} ({size} bytes) is returned through memory, not in registers")]
    InMemory { type_name: String, size: u64 },
    #[error(
        "the discriminant of its {type_name} is at byte {offset} of the value, not at the \
         start of rax"
    )]
    DiscriminantElsewhere { type_name: String, offset: u64 },
    #[error("the discriminant of its {type_name} is {size} bytes wide (at most 8 are read)")]
    DiscriminantTooWide { type_name: String, size: u64 },
    #[error(
        "DWARF gives its {type_name} no Ok/Err discriminant (a Result whose error type has \
         no value, such as Infallible, never returns Err)"
    )]
    NoDiscriminant { type_name: String },
    #[error("its {type_name} does not have exactly the variants Ok and Err")]
    NotOkErr { type_name: String },
    #[error("DWARF describes its return type in a way omegi does not read: {0}")]
    Unreadable(String),
}

/// What a function returns, as far as `:err` rules care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReturnKind {
    /// Not a `Result` (or nothing, or no DWARF for the function).
    NotResult,
    /// A `Result` named `type_name` whose `Err` can be read from `rax`.
    Result { type_name: String, check: ErrCheck },
    /// A `Result` whose `Err` cannot be read.
    Refused(Refusal),
}

/// Whether a type of this name is a `Result` (`Result<T, E>` as DWARF names
/// it; `io::Result<T>` and other aliases are already resolved there).
pub fn is_result_name(name: &str) -> bool {
    name.starts_with("Result<")
}

/// Decides how `Err` shows in `rax` for a function returning `shape`.
pub fn err_check(shape: &TypeShape) -> ReturnKind {
    if let TypeShape::Struct { name, size, .. } = shape {
        if is_result_name(name) && *size > 16 {
            return ReturnKind::Refused(Refusal::InMemory {
                type_name: name.clone(),
                size: *size,
            });
        }
    }
    let TypeShape::Struct {
        name,
        size,
        variants: Some(part),
        ..
    } = shape
    else {
        return match shape {
            TypeShape::Struct { name, .. } if is_result_name(name) => {
                ReturnKind::Refused(Refusal::NoDiscriminant {
                    type_name: name.clone(),
                })
            }
            _ => ReturnKind::NotResult,
        };
    };
    if !is_result_name(name) {
        return ReturnKind::NotResult;
    }
    match decide(name, *size, shape, part) {
        Ok(check) => ReturnKind::Result {
            type_name: name.clone(),
            check,
        },
        Err(refusal) => ReturnKind::Refused(refusal),
    }
}

fn decide(
    name: &str,
    size: u64,
    shape: &TypeShape,
    part: &VariantPart,
) -> Result<ErrCheck, Refusal> {
    let type_name = || name.to_owned();
    let variant = |wanted: &str| part.variants.iter().find(|v| v.name == wanted);
    let (Some(ok), Some(err)) = (variant("Ok"), variant("Err")) else {
        return Err(Refusal::NotOkErr {
            type_name: type_name(),
        });
    };
    if part.variants.len() != 2 {
        return Err(Refusal::NotOkErr {
            type_name: type_name(),
        });
    }
    if size > 16 || (size > 8 && !matches!(classify(shape, 0), Repr::Pair(..))) {
        return Err(Refusal::InMemory {
            type_name: type_name(),
            size,
        });
    }
    if part.discriminant_offset != 0 {
        return Err(Refusal::DiscriminantElsewhere {
            type_name: type_name(),
            offset: part.discriminant_offset,
        });
    }
    let bits = match part.discriminant_size {
        1 => 8,
        2 => 16,
        4 => 32,
        8 => 64,
        size => {
            return Err(Refusal::DiscriminantTooWide {
                type_name: type_name(),
                size,
            })
        }
    };
    match (ok.value, err.value) {
        (_, Some(value)) => Ok(ErrCheck {
            bits,
            value,
            err_if_equal: true,
        }),
        (Some(value), None) => Ok(ErrCheck {
            bits,
            value,
            err_if_equal: false,
        }),
        (None, None) => Err(Refusal::NoDiscriminant {
            type_name: type_name(),
        }),
    }
}

/// A scalar as rustc's layout sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prim {
    /// An integer or a pointer of this many bytes (rustc unifies the two
    /// when they have the same size).
    Int(u64),
    Float(u64),
}

impl Prim {
    fn size(self) -> u64 {
        match self {
            Prim::Int(size) | Prim::Float(size) => size,
        }
    }
}

/// rustc's "backend representation" of a type, as far as it decides the
/// return registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repr {
    /// Size 0.
    Zst,
    Scalar(Prim),
    /// Two scalars, the second at this offset.
    Pair(Prim, Prim, u64),
    /// Anything else (an aggregate, returned as its bytes or through memory).
    Memory,
}

/// Deeper types than this are taken as memory (refused, not guessed).
const MAX_NESTING: usize = 12;

fn align_to(value: u64, align: u64) -> u64 {
    value.div_ceil(align.max(1)) * align.max(1)
}

/// The pair of `first` at 0 and `second` as rustc lays it out, if it has
/// this size and puts `second` at `offset`.
fn pair(first: Prim, second: Prim, offset: u64, size: u64) -> Repr {
    let expected_offset = align_to(first.size(), second.size());
    let expected_size = align_to(
        expected_offset + second.size(),
        first.size().max(second.size()),
    );
    if offset == expected_offset && size == expected_size {
        Repr::Pair(first, second, offset)
    } else {
        Repr::Memory
    }
}

/// The fields of non-zero size, by offset.
fn sized_fields(fields: &[Field]) -> Vec<&Field> {
    let mut sized: Vec<&Field> = fields.iter().filter(|f| f.shape.size() > 0).collect();
    sized.sort_by_key(|f| f.offset);
    sized
}

/// rustc's representation of `shape` (what `layout_of` computes), for the
/// cases that matter here; [`Repr::Memory`] when in doubt.
fn classify(shape: &TypeShape, depth: usize) -> Repr {
    if depth > MAX_NESTING {
        return Repr::Memory;
    }
    match shape {
        TypeShape::Int { size: 0 } => Repr::Zst,
        TypeShape::Int { size } if *size <= 16 => Repr::Scalar(Prim::Int(*size)),
        TypeShape::Float { size } if *size <= 16 => Repr::Scalar(Prim::Float(*size)),
        TypeShape::Pointer => Repr::Scalar(Prim::Int(8)),
        TypeShape::Struct {
            size,
            fields,
            variants: None,
            ..
        } => classify_struct(*size, fields, depth),
        TypeShape::Struct {
            size,
            variants: Some(part),
            ..
        } => classify_enum(*size, part, depth),
        _ => Repr::Memory,
    }
}

fn classify_struct(size: u64, fields: &[Field], depth: usize) -> Repr {
    let sized = sized_fields(fields);
    match sized.as_slice() {
        [] if size == 0 => Repr::Zst,
        // A newtype is what it wraps.
        [only] if only.offset == 0 && only.shape.size() == size => classify(&only.shape, depth + 1),
        [first, second] if first.offset == 0 => match (
            classify(&first.shape, depth + 1),
            classify(&second.shape, depth + 1),
        ) {
            (Repr::Scalar(a), Repr::Scalar(b)) => pair(a, b, second.offset, size),
            _ => Repr::Memory,
        },
        _ => Repr::Memory,
    }
}

fn classify_enum(size: u64, part: &VariantPart, depth: usize) -> Repr {
    let tag = Prim::Int(part.discriminant_size);
    let tagged = part.variants.iter().all(|v| v.value.is_some());
    if tagged {
        if part.discriminant_offset != 0 {
            return Repr::Memory;
        }
        // rustc: a scalar pair when every variant has at most one field of
        // non-zero size, all of them scalars of one kind and size, at one
        // offset.
        let mut common: Option<(Prim, u64)> = None;
        for variant in &part.variants {
            match sized_fields(&variant.fields).as_slice() {
                [] => {}
                [field] => {
                    let Repr::Scalar(prim) = classify(&field.shape, depth + 1) else {
                        return Repr::Memory;
                    };
                    match common {
                        None => common = Some((prim, field.offset)),
                        Some(seen) if seen == (prim, field.offset) => {}
                        Some(_) => return Repr::Memory,
                    }
                }
                _ => return Repr::Memory,
            }
        }
        return match common {
            None if size == part.discriminant_size => Repr::Scalar(tag),
            None => Repr::Memory,
            Some((prim, offset)) => pair(tag, prim, offset, size),
        };
    }
    // Niche: the enum is represented as its untagged variant's payload when
    // the other variants carry nothing and the payload is the whole size.
    let untagged: Vec<&Variant> = part.variants.iter().filter(|v| v.value.is_none()).collect();
    let [untagged] = untagged.as_slice() else {
        return Repr::Memory;
    };
    let others_empty = part
        .variants
        .iter()
        .filter(|v| v.value.is_some())
        .all(|v| sized_fields(&v.fields).is_empty());
    if !others_empty {
        return Repr::Memory;
    }
    let payload = TypeShape::Struct {
        name: String::new(),
        size,
        fields: untagged.fields.clone(),
        variants: None,
    };
    classify(&payload, depth + 1)
}

impl fmt::Display for ErrCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "low {} bits of rax {} {:#x}",
            self.bits,
            if self.err_if_equal { "==" } else { "!=" },
            self.value
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(size: u64) -> TypeShape {
        TypeShape::Int { size }
    }

    fn at(offset: u64, shape: TypeShape) -> Field {
        Field { offset, shape }
    }

    fn unit() -> TypeShape {
        int(0)
    }

    fn structure(name: &str, size: u64, fields: Vec<Field>) -> TypeShape {
        TypeShape::Struct {
            name: name.into(),
            size,
            fields,
            variants: None,
        }
    }

    /// `Result<…>` of `size` bytes, discriminant at `offset` of `tag` bytes.
    fn result(
        name: &str,
        size: u64,
        (offset, tag): (u64, u64),
        ok: (Option<u64>, Vec<Field>),
        err: (Option<u64>, Vec<Field>),
    ) -> TypeShape {
        TypeShape::Struct {
            name: name.into(),
            size,
            fields: Vec::new(),
            variants: Some(VariantPart {
                discriminant_offset: offset,
                discriminant_size: tag,
                variants: vec![
                    Variant {
                        name: "Ok".into(),
                        value: ok.0,
                        fields: ok.1,
                    },
                    Variant {
                        name: "Err".into(),
                        value: err.0,
                        fields: err.1,
                    },
                ],
            }),
        }
    }

    fn check(shape: &TypeShape) -> ErrCheck {
        match err_check(shape) {
            ReturnKind::Result { check, .. } => check,
            other => panic!("{other:?}"),
        }
    }

    fn refusal(shape: &TypeShape) -> Refusal {
        match err_check(shape) {
            ReturnKind::Refused(refusal) => refusal,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unit_ok_with_a_fieldless_error_enum_is_a_niche_in_its_byte() {
        // Result<(), Code> with Code { Missing, Invalid, TooBig }: Ok is 3.
        let shape = result(
            "Result<(), Code>",
            1,
            (0, 1),
            (Some(3), vec![at(0, unit())]),
            (None, vec![at(0, int(1))]),
        );
        let check = check(&shape);
        assert_eq!(
            check,
            ErrCheck {
                bits: 8,
                value: 3,
                err_if_equal: false
            }
        );
        assert!(check.is_err(0) && check.is_err(2));
        // Only al is the value: the rest of rax is whatever it was.
        assert!(!check.is_err(0xdead_be03));
    }

    #[test]
    fn a_small_tagged_result_is_its_memory_image_in_rax() {
        // Result<u32, Code>: tag byte 0, Code at 1, the u32 at 4.
        let shape = result(
            "Result<u32, Code>",
            8,
            (0, 1),
            (Some(0), vec![at(4, int(4))]),
            (Some(1), vec![at(1, int(1))]),
        );
        let check = check(&shape);
        assert!(check.err_if_equal && check.bits == 8 && check.value == 1);
        assert!(check.is_err(0x201));
        assert!(!check.is_err(0x0000_0010_0000_0200));
    }

    #[test]
    fn sixteen_bytes_come_back_in_registers_only_as_a_scalar_pair() {
        // Result<u64, ()>: (tag, u64), tag in rax.
        let pair = result(
            "Result<u64, ()>",
            16,
            (0, 1),
            (Some(0), vec![at(8, int(8))]),
            (Some(1), vec![at(8, unit())]),
        );
        assert_eq!(check(&pair).value, 1);
        // Result<usize, usize>: both payloads the same scalar at 8.
        let same = result(
            "Result<usize, usize>",
            16,
            (0, 8),
            (Some(0), vec![at(8, int(8))]),
            (Some(1), vec![at(8, int(8))]),
        );
        assert_eq!(check(&same).bits, 64);
        // Result<u64, Code>: the payloads differ, an aggregate: memory.
        let memory = result(
            "Result<u64, Code>",
            16,
            (0, 1),
            (Some(0), vec![at(8, int(8))]),
            (Some(1), vec![at(1, int(1))]),
        );
        assert!(matches!(
            refusal(&memory),
            Refusal::InMemory { size: 16, .. }
        ));
        // Result<(u32, u64), ()>: two fields in Ok after a tag, an aggregate.
        let two = result(
            "Result<(u32, u64), ()>",
            16,
            (0, 4),
            (Some(0), vec![at(4, int(4)), at(8, int(8))]),
            (Some(1), vec![]),
        );
        assert!(matches!(refusal(&two), Refusal::InMemory { .. }));
    }

    #[test]
    fn larger_results_are_returned_through_memory() {
        let string = structure(
            "String",
            24,
            vec![at(0, TypeShape::Pointer), at(8, int(8)), at(16, int(8))],
        );
        let shape = result(
            "Result<String, Code>",
            24,
            (0, 8),
            (None, vec![at(0, string)]),
            (Some(0x8000_0000_0000_0000), vec![at(8, int(1))]),
        );
        let error = refusal(&shape).to_string();
        assert_eq!(
            error,
            "its Result<String, Code> (24 bytes) is returned through memory, not in registers"
        );
    }

    #[test]
    fn pointer_niches_zero_is_the_other_variant() {
        // io::Result<()>: io::Error is a tagged pointer, 0 is Ok.
        let io_error = structure(
            "Error",
            8,
            vec![at(
                0,
                structure("Repr", 8, vec![at(0, TypeShape::Pointer), at(8, unit())]),
            )],
        );
        let io = result(
            "Result<(), std::io::error::Error>",
            8,
            (0, 8),
            (Some(0), vec![at(0, unit())]),
            (None, vec![at(0, io_error)]),
        );
        let check = check(&io);
        assert!(!check.err_if_equal && check.bits == 64 && check.value == 0);
        assert!(check.is_err(0x5555_0000_1234));
        assert!(!check.is_err(0));
        // Result<Box<T>, ()>: a null box is Err.
        let boxed = result(
            "Result<Box<u64>, ()>",
            8,
            (0, 8),
            (None, vec![at(0, TypeShape::Pointer)]),
            (Some(0), vec![]),
        );
        let check = super::tests::check(&boxed);
        assert!(check.err_if_equal && check.is_err(0) && !check.is_err(0x5555_0000_1000));
        // Result<(), Box<dyn Error>>: a fat pointer (a pair), niche in its
        // data pointer.
        let dyn_box = structure(
            "Box<dyn Error>",
            16,
            vec![at(0, TypeShape::Pointer), at(8, TypeShape::Pointer)],
        );
        let dynamic = result(
            "Result<(), Box<dyn Error>>",
            16,
            (0, 8),
            (Some(0), vec![]),
            (None, vec![at(0, dyn_box)]),
        );
        assert!(super::tests::check(&dynamic).is_err(0x5555_0000_2000));
    }

    #[test]
    fn a_discriminant_not_at_the_start_of_rax_is_refused() {
        // A niche in the second scalar of a pair (a float first: rax is not
        // even the second register then).
        let shape = result(
            "Result<(f64, &T), ()>",
            16,
            (8, 8),
            (
                None,
                vec![
                    at(0, TypeShape::Float { size: 8 }),
                    at(8, TypeShape::Pointer),
                ],
            ),
            (Some(0), vec![]),
        );
        assert!(matches!(
            refusal(&shape),
            Refusal::DiscriminantElsewhere { offset: 8, .. }
        ));
    }

    #[test]
    fn what_is_not_a_result_is_left_alone() {
        assert_eq!(err_check(&int(4)), ReturnKind::NotResult);
        assert_eq!(err_check(&TypeShape::Pointer), ReturnKind::NotResult);
        let option = TypeShape::Struct {
            name: "Option<u32>".into(),
            size: 8,
            fields: vec![],
            variants: Some(VariantPart {
                discriminant_offset: 0,
                discriminant_size: 4,
                variants: vec![],
            }),
        };
        assert_eq!(err_check(&option), ReturnKind::NotResult);
        // Result<u32, Infallible>: one variant, no discriminant.
        let infallible = structure("Result<u32, core::convert::Infallible>", 4, vec![]);
        assert!(matches!(
            refusal(&infallible),
            Refusal::NoDiscriminant { .. }
        ));
    }

    #[test]
    fn the_kernel_reads_the_discriminant_as_the_agent_does() {
        let values = [
            0u64,
            1,
            2,
            3,
            0xff,
            0x1ff,
            0xffff,
            0x1_0000,
            u64::MAX,
            0x5555_0000_0003,
        ];
        for check in [
            ErrCheck {
                bits: 8,
                value: 3,
                err_if_equal: false,
            },
            ErrCheck {
                bits: 8,
                value: 0xff,
                err_if_equal: true,
            },
            ErrCheck {
                bits: 16,
                value: 0xffff,
                err_if_equal: true,
            },
            ErrCheck {
                bits: 32,
                value: 1,
                err_if_equal: true,
            },
            ErrCheck {
                bits: 64,
                value: 0,
                err_if_equal: false,
            },
        ] {
            let kernel = omegi_common::FunctionState {
                rule_op: if check.err_if_equal {
                    omegi_common::rule_op::EQUAL
                } else {
                    omegi_common::rule_op::NOT_EQUAL
                },
                rule_bits: check.bits,
                rule_value: check.kernel_value(),
                ..Default::default()
            };
            for rax in values {
                assert_eq!(
                    kernel.rule_fails(rax),
                    check.is_err(rax),
                    "{check} with {rax:#x}"
                );
            }
        }
    }
}
