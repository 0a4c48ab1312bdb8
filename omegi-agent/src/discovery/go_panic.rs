//! What a Go panic tells: `runtime.gopanic(e any)` gets the panic value as
//! a type descriptor's address and a data word. The kernel side sends both
//! (with the string and the bytes the data word points to); the type's name
//! is read from the descriptor in the binary's own type data, and the name
//! decides which reading of the value is the right one.
//!
//! Go's linker keeps no symbol per type: the descriptors lie between
//! `runtime.types` and `runtime.etypes`, and a descriptor (`abi.Type`, the
//! same layout from Go 1.17 on) names itself by `Str`, the offset from
//! `runtime.types` of its name: a flags byte, a varint length, the bytes.

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

use super::elf;

/// Offset of `Str` (a `nameOff`, 32 bits) in a type descriptor.
const TYPE_STR: usize = 40;
/// Offset of `TFlag` in a type descriptor.
const TYPE_TFLAG: usize = 20;
/// `tflagExtraStar`: the name starts with a `*` that is not the type's.
const TFLAG_EXTRA_STAR: u8 = 2;

/// Where Go panics are seen in one binary, and how their values read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoPanics {
    /// File offset of `runtime.gopanic`.
    pub gopanic: Option<u64>,
    /// File offset of `runtime.exit.abi0`, where `os.Exit` ends the program.
    pub exit: Option<u64>,
    /// Link-time address of `runtime.types`.
    types_start: u64,
    /// The bytes from `runtime.types` to `runtime.etypes`, as in the file.
    types: Vec<u8>,
}

impl GoPanics {
    /// Finds `runtime.gopanic`, `runtime.exit` and the type data in `file`.
    pub fn find(file: &object::File<'_>) -> Self {
        let mut found = Self::default();
        let (mut start, mut end) = (None, None);
        for symbol in file.symbols() {
            match symbol.name() {
                Ok("runtime.gopanic") if symbol.kind() == SymbolKind::Text => {
                    found.gopanic = elf::file_offset(file, symbol.address());
                }
                // Assembly with the stack ABI, which the kernel side reads.
                Ok("runtime.exit.abi0") if symbol.kind() == SymbolKind::Text => {
                    found.exit = elf::file_offset(file, symbol.address());
                }
                Ok("runtime.types") => start = Some(symbol.address()),
                Ok("runtime.etypes") => end = Some(symbol.address()),
                _ => {}
            }
        }
        if let (Some(start), Some(end)) = (start, end) {
            let bytes = file.sections().find_map(|section| {
                let at = usize::try_from(start.checked_sub(section.address())?).ok()?;
                let len = usize::try_from(end.checked_sub(start)?).ok()?;
                section.data().ok()?.get(at..at.checked_add(len)?)
            });
            if let Some(bytes) = bytes {
                found.types_start = start;
                found.types = bytes.to_vec();
            }
        }
        found
    }

    /// The name of the type whose descriptor is at link-time `address`.
    pub fn type_name(&self, address: u64) -> Option<String> {
        let at = usize::try_from(address.checked_sub(self.types_start)?).ok()?;
        let descriptor = self.types.get(at..at.checked_add(TYPE_STR + 4)?)?;
        let tflag = descriptor[TYPE_TFLAG];
        let str_off = u32::from_le_bytes(descriptor[TYPE_STR..TYPE_STR + 4].try_into().ok()?);
        let name = self.types.get(usize::try_from(str_off).ok()?..)?;
        // The flags byte, then the length as a varint.
        let (mut len, mut shift, mut index) = (0usize, 0, 1);
        loop {
            let byte = *name.get(index)?;
            len |= usize::from(byte & 0x7f) << shift;
            index += 1;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 21 {
                return None;
            }
        }
        let text = std::str::from_utf8(name.get(index..index.checked_add(len)?)?).ok()?;
        let text = if tflag & TFLAG_EXTRA_STAR != 0 {
            text.strip_prefix('*')?
        } else {
            text
        };
        Some(text.to_owned())
    }
}

/// What a panic value says, given its type's name, the string read behind
/// its data word (when that read worked) and the bytes there.
///
/// A `string`, and the pointer types whose first field is the message
/// (`*errors.errorString`, `*fmt.wrapError`, `*fmt.wrapErrors`), have a
/// string header behind the data word; the runtime's own string errors too.
/// A `runtime.boundsError` is formatted as its `Error()` does. Any other
/// value is named by its type alone: reading it as a string would print
/// whatever its first words point to.
pub fn message(type_name: &str, text: Option<&str>, raw: &[u8]) -> String {
    match type_name {
        "string"
        | "*errors.errorString"
        | "*fmt.wrapError"
        | "*fmt.wrapErrors"
        | "runtime.errorString"
        | "runtime.plainError" => {
            let text = text.unwrap_or_default();
            if type_name.starts_with("runtime.") {
                format!("runtime error: {text}")
            } else {
                text.to_owned()
            }
        }
        "runtime.boundsError" => bounds_error(raw).unwrap_or_default(),
        _ => String::new(),
    }
}

/// `runtime.boundsError{x int64, y int, signed bool, code uint8}` as its
/// `Error()` prints it.
fn bounds_error(raw: &[u8]) -> Option<String> {
    let word = |at: usize| -> Option<i64> {
        Some(i64::from_le_bytes(raw.get(at..at + 8)?.try_into().ok()?))
    };
    let (x, y) = (word(0)?, word(8)?);
    let signed = *raw.get(16)? != 0;
    let code = *raw.get(17)?;
    // An unsigned index that does not fit an int64 shows as the unsigned
    // number it was.
    let x = if signed || x >= 0 {
        x.to_string()
    } else {
        (x as u64).to_string()
    };
    let text = match code {
        0 => format!("index out of range [{x}] with length {y}"),
        1 => format!("slice bounds out of range [:{x}] with length {y}"),
        2 => format!("slice bounds out of range [:{x}] with capacity {y}"),
        3 => format!("slice bounds out of range [{x}:{y}]"),
        4 => format!("slice bounds out of range [::{x}] with length {y}"),
        5 => format!("slice bounds out of range [::{x}] with capacity {y}"),
        6 => format!("slice bounds out of range [:{x}:{y}]"),
        7 => format!("slice bounds out of range [{x}:{y}:]"),
        8 => format!(
            "cannot convert slice with length {x} to array or pointer to array with length {y}"
        ),
        _ => return None,
    };
    Some(format!("runtime error: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(x: i64, y: i64, signed: bool, code: u8) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&x.to_le_bytes());
        raw.extend_from_slice(&y.to_le_bytes());
        raw.extend_from_slice(&[u8::from(signed), code, 0, 0, 0, 0, 0, 0]);
        raw
    }

    #[test]
    fn values_read_as_their_type_says() {
        assert_eq!(message("string", Some("out of stock"), &[]), "out of stock");
        assert_eq!(
            message("*errors.errorString", Some("negative amount"), &[]),
            "negative amount"
        );
        assert_eq!(
            message(
                "runtime.plainError",
                Some("assignment to entry in nil map"),
                &[]
            ),
            "runtime error: assignment to entry in nil map"
        );
        assert_eq!(
            message("runtime.boundsError", None, &bounds(5, 3, true, 0)),
            "runtime error: index out of range [5] with length 3"
        );
        assert_eq!(
            message("runtime.boundsError", None, &bounds(2, 1, true, 3)),
            "runtime error: slice bounds out of range [2:1]"
        );
        // Another type's first words are not a string of its own.
        assert_eq!(message("*main.PaymentError", Some("garbage"), &[]), "");
        assert_eq!(message("runtime.boundsError", None, &[1, 2]), "");
    }
}
