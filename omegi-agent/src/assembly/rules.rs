//! Return-value rules (`--error-if`): C-style functions report failure
//! through their return value, not by unwinding; Rust functions by
//! returning `Err`.
//!
//! ```text
//! RULE    := GLOB ":" VALUE OP INTEGER
//!          | GLOB ":" "err"  a Rust function returning Result<_, E> returned Err
//! VALUE   := "ret"     the low 32 bits, signed (C's int: -1, 0, …)
//!          | "ret64"   all 64 bits, signed (long, ssize_t, pointers)
//! OP      := "<" | "<=" | ">" | ">=" | "==" | "!="
//! INTEGER := decimal or 0x-hexadecimal, optionally negative
//! ```
//!
//! `GLOB` matches demangled function names as `--include` does. Examples:
//! `parse_*:ret<0`, `open_config:ret64==0`, `*::read_exact:ret!=0`,
//! `myapp::*:err`. An `err` rule applies to the matching functions whose
//! DWARF return type is a `Result` that comes back in registers
//! (`discovery::result_layout` says how `Err` is read there); each
//! matching one that cannot be read is named, with the reason, and left
//! without the rule; a rule left with no function at all is an error.

use std::{collections::HashMap, fmt};

use globset::{Glob, GlobMatcher};

use crate::discovery::result_layout::{self, ErrCheck, Refusal, ReturnKind};

/// A rule that cannot be parsed.
#[derive(Debug, thiserror::Error)]
#[error(
    "{reason}; expected GLOB:ret OP INTEGER or GLOB:ret64 OP INTEGER with OP one of \
     < <= > >= == != (e.g. 'parse_*:ret<0'), or GLOB:err (e.g. 'myapp::*:err')"
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

/// What a rule tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Condition {
    /// `ret OP INTEGER`, `ret64 OP INTEGER`.
    Compare { width: Width, op: Op, value: i64 },
    /// `err`: the function's `Result` is `Err`.
    Err,
}

/// One parsed `--error-if` rule.
#[derive(Clone, Debug)]
pub struct ReturnRule {
    text: String,
    matcher: GlobMatcher,
    condition: Condition,
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
        if condition == "err" {
            return Ok(Self {
                text: text.to_owned(),
                matcher,
                condition: Condition::Err,
            });
        }
        let (width, rest) = if let Some(rest) = condition.strip_prefix("ret64") {
            (Width::Int64, rest)
        } else if let Some(rest) = condition.strip_prefix("ret") {
            (Width::Int32, rest)
        } else {
            return Err(error(
                "the condition must be err or start with ret or ret64",
            ));
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
            condition: Condition::Compare { width, op, value },
        })
    }

    /// Whether the rule is about this function.
    pub fn applies_to(&self, function_name: &str) -> bool {
        self.matcher.is_match(function_name)
    }

    /// The rule as it applies to one function, whose return type
    /// `return_kind` gives (asked only for an `err` rule): `None` when the
    /// rule is not about such a function (an `err` rule and a function that
    /// does not return a `Result`), `Err` when the function's `Result`
    /// cannot be read.
    pub fn apply(
        &self,
        return_kind: impl FnOnce() -> ReturnKind,
    ) -> Option<Result<FunctionRule, Refusal>> {
        let test = match self.condition {
            Condition::Compare { width, op, value } => Test::Compare { width, op, value },
            Condition::Err => match return_kind() {
                ReturnKind::NotResult => return None,
                ReturnKind::Refused(refusal) => return Some(Err(refusal)),
                ReturnKind::Result { type_name, check } => Test::Err { type_name, check },
            },
        };
        Some(Ok(FunctionRule {
            rule: self.text.clone(),
            test,
        }))
    }

    /// Whether this is an `err` rule.
    pub fn is_err_rule(&self) -> bool {
        self.condition == Condition::Err
    }
}

/// What a [`FunctionRule`] tests.
#[derive(Clone, Debug)]
enum Test {
    Compare { width: Width, op: Op, value: i64 },
    Err { type_name: String, check: ErrCheck },
}

/// An `--error-if` rule applied to one function.
#[derive(Clone, Debug)]
pub struct FunctionRule {
    /// The rule as written.
    rule: String,
    test: Test,
}

impl fmt::Display for FunctionRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rule)
    }
}

impl FunctionRule {
    /// Whether `rax` is a failure by this rule.
    pub fn fails(&self, rax: u64) -> bool {
        match &self.test {
            Test::Compare { width, op, value } => op.holds(value_of(*width, rax), *value),
            Test::Err { check, .. } => check.is_err(rax),
        }
    }

    /// The rule as the kernel side evaluates it (`omegi_common::FunctionState`):
    /// operator, how many low bits of `rax` count, value.
    pub fn kernel_form(&self) -> (u32, u32, i64) {
        use omegi_common::rule_op;
        match &self.test {
            Test::Compare { width, op, value } => {
                let op = match op {
                    Op::Less => rule_op::LESS,
                    Op::LessEqual => rule_op::LESS_EQUAL,
                    Op::Greater => rule_op::GREATER,
                    Op::GreaterEqual => rule_op::GREATER_EQUAL,
                    Op::Equal => rule_op::EQUAL,
                    Op::NotEqual => rule_op::NOT_EQUAL,
                };
                let bits = match width {
                    Width::Int32 => 32,
                    Width::Int64 => 64,
                };
                (op, bits, *value)
            }
            Test::Err { check, .. } => (
                if check.err_if_equal {
                    rule_op::EQUAL
                } else {
                    rule_op::NOT_EQUAL
                },
                check.bits,
                check.kernel_value(),
            ),
        }
    }

    /// The error's type and message for a call that returned `rax` and
    /// failed the rule.
    pub fn describe(&self, rax: u64) -> (String, String) {
        match &self.test {
            Test::Compare { width, .. } => (
                "return value".into(),
                format!(
                    "returned {} (--error-if {})",
                    value_of(*width, rax),
                    self.rule
                ),
            ),
            Test::Err { type_name, .. } => (
                err_type_name(type_name),
                format!("returned Err (--error-if {})", self.rule),
            ),
        }
    }
}

/// `E` of `Result<T, E>` (the whole name when it cannot be split).
fn err_type_name(result: &str) -> String {
    let Some(inner) = result
        .strip_prefix("Result<")
        .and_then(|rest| rest.strip_suffix('>'))
    else {
        return result.to_owned();
    };
    // The comma between T and E is the last one outside brackets.
    let mut depth = 0i32;
    let mut split = None;
    for (index, c) in inner.char_indices() {
        match c {
            '<' | '(' | '[' => depth += 1,
            '>' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => split = Some(index),
            _ => {}
        }
    }
    match split {
        Some(index) => inner[index + 1..].trim().to_owned(),
        None => result.to_owned(),
    }
}

/// The return value as a comparison rule reads it from `rax`.
fn value_of(width: Width, rax: u64) -> i64 {
    match width {
        Width::Int32 => i64::from(rax as u32 as i32),
        Width::Int64 => rax as i64,
    }
}

/// An `err` rule that applies to no function.
#[derive(Debug, thiserror::Error)]
#[error("--error-if '{rule}': {why}")]
pub struct NoFunctionError {
    /// The rule as written.
    pub rule: String,
    /// Why nothing is left: no match, no `Result`, or each refusal.
    pub why: String,
}

/// The rules as they apply to a function table.
#[derive(Debug, Default)]
pub struct Applied {
    /// The first rule that applies to each function, by function id.
    pub rules: HashMap<u32, FunctionRule>,
    /// One line per function an `err` rule could not apply to, with why,
    /// and per function whose calls it checks only when they return.
    pub warnings: Vec<String>,
}

/// The first rule that applies to each function of `table`, by function id.
/// An `err` rule reads each matching function's return type from the
/// table's DWARF; a function whose `Result` cannot be read is refused (a
/// line in [`Applied::warnings`]) and a later rule may still apply to it.
/// An `err` rule that applies to no function is an error, which names the
/// functions refused.
pub fn for_functions(
    table: &crate::discovery::FunctionTable,
    rules: &[ReturnRule],
) -> Result<Applied, NoFunctionError> {
    let mut applied = Applied::default();
    let mut applied_per_rule = vec![0usize; rules.len()];
    let mut matched_per_rule = vec![0usize; rules.len()];
    let mut refused_per_rule: Vec<Vec<String>> = vec![Vec::new(); rules.len()];
    let return_types = match &table.sources {
        Some(sources) if rules.iter().any(ReturnRule::is_err_rule) => {
            let addresses: Vec<u64> = table
                .functions
                .iter()
                .filter(|function| {
                    rules
                        .iter()
                        .any(|rule| rule.is_err_rule() && rule.applies_to(&function.name))
                })
                .map(|function| function.address)
                .collect();
            sources.return_types(&addresses)
        }
        _ => HashMap::new(),
    };
    for function in &table.functions {
        for (index, rule) in rules.iter().enumerate() {
            if !rule.applies_to(&function.name) {
                continue;
            }
            matched_per_rule[index] += 1;
            let return_kind = || match return_types.get(&function.address) {
                Some(Ok(Some(shape))) => result_layout::err_check(shape),
                Some(Ok(None)) | None => ReturnKind::NotResult,
                Some(Err(reason)) => ReturnKind::Refused(Refusal::Unreadable(reason.clone())),
            };
            match rule.apply(return_kind) {
                None => continue,
                Some(Ok(function_rule)) => {
                    applied_per_rule[index] += 1;
                    if rule.is_err_rule() && leaves_by_jumps(&function.code) {
                        applied.warnings.push(format!(
                            "--error-if '{rule}': calls of {} that leave by a tail jump are not \
                             checked (the function jumped to makes the Result, and omegi does \
                             not see it return)",
                            function.name
                        ));
                    }
                    applied.rules.insert(function.id, function_rule);
                    break;
                }
                Some(Err(refusal)) => {
                    refused_per_rule[index].push(format!("{}: {refusal}", function.name));
                }
            }
        }
    }
    for refused in &mut refused_per_rule {
        // Monomorphized copies of a function share its name.
        let mut seen = std::collections::HashSet::new();
        refused.retain(|line| seen.insert(line.clone()));
    }
    let mut seen = std::collections::HashSet::new();
    applied.warnings.retain(|line| seen.insert(line.clone()));
    for (index, rule) in rules.iter().enumerate() {
        let refused = &refused_per_rule[index];
        if !rule.is_err_rule() || applied_per_rule[index] > 0 {
            applied.warnings.extend(
                refused
                    .iter()
                    .map(|line| format!("--error-if '{rule}' is not applied to {line}")),
            );
            continue;
        }
        let why = match matched_per_rule[index] {
            0 => "no traced function matches it".to_owned(),
            _ if !refused.is_empty() => refused.join("; "),
            _ if table.sources.is_none() => {
                "the binary has no DWARF to read return types from".to_owned()
            }
            matched => format!(
                "none of the {matched} traced functions matching it returns a Result (by DWARF)"
            ),
        };
        return Err(NoFunctionError {
            rule: rule.to_string(),
            why,
        });
    }
    Ok(applied)
}

/// Whether a function can leave by a jump to another function (whose
/// return value is then its own, and is not seen).
fn leaves_by_jumps(code: &crate::discovery::CodeAnalysis) -> bool {
    code.conditional_exits > 0
        || code
            .exits
            .iter()
            .any(|exit| exit.kind == crate::discovery::ExitKind::TailJump)
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

    /// A comparison rule, applied (its function's return type is not asked).
    fn compare(text: &str) -> FunctionRule {
        ReturnRule::parse(text)
            .unwrap()
            .apply(|| unreachable!("a comparison rule reads no return type"))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn int_rules_read_the_low_32_bits() {
        let parsed = ReturnRule::parse("parse_*:ret<0").unwrap();
        assert!(parsed.applies_to("parse_header"));
        assert!(!parsed.applies_to("main"));
        let rule = compare("parse_*:ret<0");
        // eax = -1 with garbage in the upper half of rax.
        assert!(rule.fails(0xdead_beef_ffff_ffff));
        assert!(!rule.fails(0));
        assert!(!rule.fails(7));
    }

    #[test]
    fn ret64_reads_all_of_rax() {
        let rule = compare("open_config : ret64 == 0");
        assert!(rule.fails(0));
        assert!(!rule.fails(0x5555_0000_0000));
        let rule = compare("f:ret64<=-2");
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
            assert_eq!(compare(text).fails(rax), fails, "{text}");
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
            let rule = compare(text);
            let (op, bits, value) = rule.kernel_form();
            let kernel = omegi_common::FunctionState {
                rule_op: op,
                rule_bits: bits,
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

    #[test]
    fn err_rules_apply_to_functions_returning_a_result() {
        let rule = ReturnRule::parse("app::* : err").unwrap();
        assert!(rule.is_err_rule() && rule.applies_to("app::load"));
        assert!(rule.apply(|| ReturnKind::NotResult).is_none());
        let refusal = Refusal::InMemory {
            type_name: "Result<String, E>".into(),
            size: 24,
        };
        assert_eq!(
            rule.apply(|| ReturnKind::Refused(refusal.clone()))
                .unwrap()
                .unwrap_err(),
            refusal
        );
        let applied = rule
            .apply(|| ReturnKind::Result {
                type_name: "Result<(), app::Code>".into(),
                check: ErrCheck {
                    bits: 8,
                    value: 3,
                    err_if_equal: false,
                },
            })
            .unwrap()
            .unwrap();
        assert!(applied.fails(1) && !applied.fails(0x103));
        assert_eq!(
            applied.kernel_form(),
            (omegi_common::rule_op::NOT_EQUAL, 8, 3)
        );
        assert_eq!(
            applied.describe(1),
            (
                "app::Code".to_owned(),
                "returned Err (--error-if app::* : err)".to_owned()
            )
        );
        assert!(ReturnRule::parse("f:erro")
            .unwrap_err()
            .to_string()
            .contains("GLOB:err"));
    }

    #[test]
    fn the_error_type_is_e_of_the_result() {
        for (result, error) in [
            ("Result<(), app::Code>", "app::Code"),
            (
                "Result<alloc::vec::Vec<(u8, u16), Global>, std::io::error::Error>",
                "std::io::error::Error",
            ),
            ("Result<&app::Config, app::NotFound>", "app::NotFound"),
            ("Weird", "Weird"),
        ] {
            assert_eq!(err_type_name(result), error);
        }
    }
}
