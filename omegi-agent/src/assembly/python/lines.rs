//! Source lines of Python code: a code object's line table (`co_linetable`)
//! maps each code unit to its line, the way the interpreter's own
//! `PyCode_Addr2Line` does for a traceback. Two formats: 3.10's pairs of
//! (bytes of code, line delta), and 3.11+'s location table (PEP 657), of
//! which only the lines are read.

/// A code object's line table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineTable {
    /// `co_firstlineno`: where the deltas start.
    pub first_line: u32,
    /// `co_linetable`'s bytes.
    pub table: Vec<u8>,
    /// 3.11+'s location table (else 3.10's pairs).
    pub locations: bool,
}

impl LineTable {
    /// The line of code unit `unit` (two bytes each), `None` for an
    /// instruction with no line or past the table.
    pub fn line_at(&self, unit: u32) -> Option<u32> {
        let address = i64::from(unit) * 2;
        let line = if self.locations {
            self.scan_locations(address)
        } else {
            self.scan_pairs(address)
        }?;
        u32::try_from(line).ok().filter(|&line| line > 0)
    }

    /// 3.10: (code bytes, signed line delta) pairs; -128 is no line.
    fn scan_pairs(&self, address: i64) -> Option<i64> {
        let mut line = i64::from(self.first_line);
        let mut end = 0i64;
        for pair in self.table.chunks_exact(2) {
            let start = end;
            end += i64::from(pair[0]);
            let delta = pair[1] as i8;
            let here = if delta == -128 {
                None
            } else {
                line += i64::from(delta);
                Some(line)
            };
            if start <= address && address < end {
                return here;
            }
        }
        None
    }

    /// 3.11+: entries, each starting with a byte with its top bit set:
    /// bits 3–6 the kind, bits 0–2 the code units it covers less one.
    fn scan_locations(&self, address: i64) -> Option<i64> {
        let bytes = &self.table;
        let mut line = i64::from(self.first_line);
        let mut end = 0i64;
        let mut at = 0usize;
        while at < bytes.len() {
            let head = bytes[at];
            if head & 0x80 == 0 {
                return None;
            }
            let kind = (head >> 3) & 15;
            line += match kind {
                // No location; the short forms (same line).
                15 | 0..=9 => 0,
                // No columns, or the long form: a signed varint.
                13 | 14 => signed_varint(&bytes[at + 1..])?,
                // One line, with the delta in the kind.
                _ => i64::from(kind - 10),
            };
            let start = end;
            end += (i64::from(head & 7) + 1) * 2;
            if start <= address && address < end {
                return (kind != 15).then_some(line);
            }
            at += 1;
            while at < bytes.len() && bytes[at] & 0x80 == 0 {
                at += 1;
            }
        }
        None
    }
}

/// A varint of 6-bit chunks, the 7th bit saying another follows.
fn varint(bytes: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (index, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 63) << (6 * index);
        if byte & 64 == 0 {
            return Some(value);
        }
    }
    None
}

fn signed_varint(bytes: &[u8]) -> Option<i64> {
    let value = varint(bytes)?;
    let magnitude = (value >> 1) as i64;
    Some(if value & 1 != 0 {
        -magnitude
    } else {
        magnitude
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The same function compiled by each version; the lines its code
    /// units have, as the interpreter's `co_lines()` / `co_positions()`
    /// gave them.
    const SOURCE_LINES_310: [u32; 21] = [
        3, 4, 4, 6, 6, 6, 6, 7, 6, 6, 6, 8, 8, 8, 8, 8, 8, 9, 9, 9, 8,
    ];

    #[test]
    fn python_3_10_pairs() {
        let table = LineTable {
            first_line: 2,
            table: hex("020104010802020106ff0c02060102ff"),
            locations: false,
        };
        let lines: Vec<u32> = (0..21).map(|unit| table.line_at(unit).unwrap()).collect();
        assert_eq!(lines, SOURCE_LINES_310);
        assert_eq!(table.line_at(21), None);
    }

    #[test]
    fn python_3_12_locations() {
        let table = LineTable {
            first_line: 2,
            table: hex(
                "8000f002060511d80c0d8801e40f159064976a916a936cd81617f303011019f000010919f8e40b1\
                 af200010511d90f10f003010511fa",
            ),
            locations: true,
        };
        let lines: Vec<Option<u32>> = (0..45).map(|unit| table.line_at(unit)).collect();
        let mut expected = vec![Some(2), Some(3), Some(4), Some(4)];
        expected.extend([Some(6); 20]);
        expected.push(Some(7));
        expected.extend([Some(6); 5]);
        expected.push(None);
        expected.extend([Some(8); 8]);
        expected.extend([Some(9), Some(9), Some(8), None, None, None]);
        assert_eq!(lines, expected);
    }
}
