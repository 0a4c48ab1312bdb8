//! Return-value rules (`--error-if`): C-style functions report failure
//! through their return value, not by unwinding.
//!
//! ```text
//! RULE    := GLOB ":" VALUE OP INTEGER
//! VALUE   := "ret"     the low 32 bits, signed (C's int: -1, 0, …)
//!          | "ret64"   all 64 bits, signed (long, ssize_t, pointers)
//! OP      := "<" | "<=" | ">" | ">=" | "==" | "!="
//! INTEGER := decimal or 0x-hexadecimal, optionally negative
//! ```
//!
//! `GLOB` matches demangled function names as `--include` does. Examples:
//! `parse_*:ret<0`, `open_config:ret64==0`, `*::read_exact:ret!=0`.

use std::fmt;

use globset::{Glob, GlobMatcher};

/// A rule that cannot be parsed.
#[derive(Debug, thiserror::Error)]
#[error(
    "{reason}; expected GLOB:ret OP INTEGER or GLOB:ret64 OP INTEGER with OP one of \
     < <= > >= == != (e.g. 'parse_*:ret<0')"
)]
pub struct RuleError {
    pub rule: String,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Width {
    Int32,
    Int64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Less,
    LessEqual,
    Greater,
    GreaterEqual,
    Equal,
    NotEqual,
}

impl Op {
    const ALL: [(&'static str, Op); 6] = [
        ("<=", Op::LessEqual),
        (">=", Op::GreaterEqual),
        ("==", Op::Equal),
        ("!=", Op::NotEqual),
        ("<", Op::Less),
        (">", Op::Greater),
    ];

    fn holds(self, left: i64, right: i64) -> bool {
        match self {
            Op::Less => left < right,
            Op::LessEqual => left <= right,
            Op::Greater => left > right,
            Op::GreaterEqual => left >= right,
            Op::Equal => left == right,
            Op::NotEqual => left != right,
        }
    }
}

/// One parsed `--error-if` rule.
#[derive(Clone, Debug)]
pub struct ReturnRule {
    text: String,
    matcher: GlobMatcher,
    width: Width,
    op: Op,
    value: i64,
}

impl fmt::Display for ReturnRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl ReturnRule {
    /// Parses one rule.
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let error = |reason: &str| RuleError {
            rule: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (glob, condition) = text
            .rsplit_once(':')
            .ok_or_else(|| error("no ':' between the function pattern and the condition"))?;
        let glob = glob.trim();
        if glob.is_empty() {
            return Err(error("the function pattern is empty"));
        }
        let matcher = Glob::new(glob)
            .map_err(|e| error(&format!("bad function pattern: {e}")))?
            .compile_matcher();
        let condition = condition.trim();
        let (width, rest) = if let Some(rest) = condition.strip_prefix("ret64") {
            (Width::Int64, rest)
        } else if let Some(rest) = condition.strip_prefix("ret") {
            (Width::Int32, rest)
        } else {
            return Err(error("the condition must start with ret or ret64"));
        };
        let rest = rest.trim_start();
        let (op, number) = Op::ALL
            .iter()
            .find_map(|(symbol, op)| rest.strip_prefix(symbol).map(|number| (*op, number)))
            .ok_or_else(|| error("missing comparison operator"))?;
        let value =
            parse_integer(number.trim()).ok_or_else(|| error("the value is not an integer"))?;
        if width == Width::Int32 && i32::try_from(value).is_err() {
            return Err(error("the value does not fit a 32-bit int (use ret64)"));
        }
        Ok(Self {
            text: text.to_owned(),
            matcher,
            width,
            op,
            value,
        })
    }

    /// Whether the rule is about this function.
    pub fn applies_to(&self, function_name: &str) -> bool {
        self.matcher.is_match(function_name)
    }

    /// The return value as the rule reads it from `rax`.
    pub fn value_of(&self, rax: u64) -> i64 {
        match self.width {
            Width::Int32 => i64::from(rax as u32 as i32),
            Width::Int64 => rax as i64,
        }
    }

    /// The rule as the kernel side evaluates it (`omegi_common::FunctionState`):
    /// operator, whether all 64 bits count, value.
    pub fn kernel_form(&self) -> (u32, bool, i64) {
        use omegi_common::rule_op;
        let op = match self.op {
            Op::Less => rule_op::LESS,
            Op::LessEqual => rule_op::LESS_EQUAL,
            Op::Greater => rule_op::GREATER,
            Op::GreaterEqual => rule_op::GREATER_EQUAL,
            Op::Equal => rule_op::EQUAL,
            Op::NotEqual => rule_op::NOT_EQUAL,
        };
        (op, self.width == Width::Int64, self.value)
    }

    /// Whether `rax` is a failure by this rule.
    pub fn fails(&self, rax: u64) -> bool {
        self.op.holds(self.value_of(rax), self.value)
    }
}

/// The first rule that applies to each function of `table`, by function id.
pub fn for_functions(
    table: &crate::discovery::FunctionTable,
    rules: &[ReturnRule],
) -> std::collections::HashMap<u32, ReturnRule> {
    table
        .functions
        .iter()
        .filter_map(|function| {
            let rule = rules.iter().find(|rule| rule.applies_to(&function.name))?;
            Some((function.id, rule.clone()))
        })
        .collect()
}

fn parse_integer(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, text),
    };
    let magnitude = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<i64>().ok()?,
    };
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_rules_read_the_low_32_bits() {
        let rule = ReturnRule::parse("parse_*:ret<0").unwrap();
        assert!(rule.applies_to("parse_header"));
        assert!(!rule.applies_to("main"));
        // eax = -1 with garbage in the upper half of rax.
        assert!(rule.fails(0xdead_beef_ffff_ffff));
        assert!(!rule.fails(0));
        assert!(!rule.fails(7));
    }

    #[test]
    fn ret64_reads_all_of_rax() {
        let rule = ReturnRule::parse("open_config : ret64 == 0").unwrap();
        assert!(rule.fails(0));
        assert!(!rule.fails(0x5555_0000_0000));
        let rule = ReturnRule::parse("f:ret64<=-2").unwrap();
        assert!(rule.fails((-3i64) as u64));
        assert!(!rule.fails((-1i64) as u64));
    }

    #[test]
    fn every_operator_and_hex() {
        for (text, rax, fails) in [
            ("f:ret>1", 2, true),
            ("f:ret>=2", 2, true),
            ("f:ret!=0", 0, false),
            ("f:ret==0x10", 16, true),
            ("f:ret<=-1", u64::MAX, true),
        ] {
            assert_eq!(ReturnRule::parse(text).unwrap().fails(rax), fails, "{text}");
        }
    }

    #[test]
    fn bad_rules_are_explained() {
        for bad in [
            "parse_*",
            ":ret<0",
            "f:rax<0",
            "f:ret<<0",
            "f:ret0",
            "f:ret<zero",
            "f:ret<99999999999",
            "[:ret<0",
        ] {
            let error = ReturnRule::parse(bad).unwrap_err().to_string();
            assert!(error.contains("GLOB:ret"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_kernel_evaluates_rules_as_the_agent_does() {
        let values = [
            0u64,
            1,
            u64::from(u32::MAX),
            0xffff_ffff_0000_0005,
            7,
            u64::MAX,
        ];
        for text in [
            "f:ret<0",
            "f:ret<=1",
            "f:ret>5",
            "f:ret>=7",
            "f:ret==-1",
            "f:ret!=0",
            "f:ret64<0",
            "f:ret64==0xffffffff",
        ] {
            let rule = ReturnRule::parse(text).unwrap();
            let (op, wide, value) = rule.kernel_form();
            let kernel = omegi_common::FunctionState {
                rule_op: op,
                rule_wide: u32::from(wide),
                rule_value: value,
                ..Default::default()
            };
            for rax in values {
                assert_eq!(
                    kernel.rule_fails(rax),
                    rule.fails(rax),
                    "{text} with {rax:#x}"
                );
            }
        }
        assert!(!omegi_common::FunctionState::default().rule_fails(0));
    }
}
