//! `--capture-args`: a Python call's arguments as the seed library wrote
//! them, `name: type = value` (`f"{name}: {type(value).__name__} = {value}"`),
//! from what the kernel read at the call's entry ([`PythonArgsEvent`]): the
//! value of an `int`, `float`, `bool`, `None` or `str`, the type's name for
//! anything else.

use omegi_common::{python_arg, PythonArg, PythonArgsEvent};

use super::text;

/// The arguments of the call `event` describes; `names` are its code's
/// parameter names, as many as were read.
pub fn describe(event: &PythonArgsEvent, names: &[String]) -> Vec<String> {
    let count = (event.count as usize).min(event.args.len());
    event.args[..count]
        .iter()
        .enumerate()
        .map(|(index, arg)| {
            let name = names
                .get(index)
                .cloned()
                .unwrap_or_else(|| format!("arg{index}"));
            let (type_name, value) = type_and_value(arg);
            format!("{name}: {type_name} = {value}")
        })
        .collect()
}

/// What `type(value).__name__` and `str(value)` say, as far as the kernel
/// read them.
fn type_and_value(arg: &PythonArg) -> (String, String) {
    let owned = |type_name: &str, value: String| (type_name.to_owned(), value);
    match arg.kind {
        python_arg::NONE => owned("NoneType", "None".into()),
        python_arg::INT => owned("int", (arg.value as i64).to_string()),
        python_arg::BIG_INT => owned("int", "<more than 60 bits>".into()),
        python_arg::BOOL => owned("bool", if arg.value != 0 { "True" } else { "False" }.into()),
        python_arg::FLOAT => owned("float", float_repr(f64::from_bits(arg.value))),
        python_arg::STR => {
            let start = text(&arg.text);
            let shown = start.chars().count();
            let value = if shown == 0 && arg.length > 0 {
                format!("<non-ASCII str of length {}>", arg.length)
            } else if (shown as u32) < arg.length {
                format!("{start}…")
            } else {
                start
            };
            owned("str", value)
        }
        python_arg::OTHER => {
            let type_name = text(&arg.text);
            let value = format!("<{type_name} object>");
            (type_name, value)
        }
        _ => owned("?", "<not readable>".into()),
    }
}

/// Python's `repr` of a float: the shortest text that reads back, with
/// `.0` on whole numbers and an exponent outside 1e-4 ≤ |x| < 1e16.
fn float_repr(value: f64) -> String {
    if value.is_nan() {
        return "nan".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.into();
    }
    let magnitude = value.abs();
    if magnitude != 0.0 && !(1e-4..1e16).contains(&magnitude) {
        // Rust writes `1e20`, `1.5e-7`; Python `1e+20`, `1.5e-07`.
        let text = format!("{value:e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let (sign, digits) = match exponent.strip_prefix('-') {
            Some(digits) => ('-', digits),
            None => ('+', exponent),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let text = value.to_string();
    if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    }
}

/// The seed's Kafka attributes are `str()` of each value: a list of
/// arguments is its Python `repr`, `['a: int = 1', 'b: str = x']`.
pub fn python_list_repr(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| str_repr(item)).collect();
    format!("[{}]", quoted.join(", "))
}

/// Python's `repr` of a `str`: single quotes unless it holds one and no
/// double quote.
fn str_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for character in text.chars() {
        match character {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(kind: u32, value: u64, text: &str, length: u32) -> PythonArg {
        let mut arg = PythonArg {
            kind,
            length,
            value,
            ..PythonArg::default()
        };
        arg.text[..text.len()].copy_from_slice(text.as_bytes());
        arg
    }

    #[test]
    fn values_as_the_seed_wrote_them() {
        let mut event = PythonArgsEvent {
            kind: 0,
            tgid: 1,
            tid: 1,
            count: 6,
            span_id: 1,
            code: 1,
            args: [PythonArg::default(); omegi_common::PYTHON_ARGS_MAX],
        };
        event.args[0] = arg(python_arg::INT, (-42i64) as u64, "", 0);
        event.args[1] = arg(python_arg::STR, 0, "apple", 5);
        event.args[2] = arg(python_arg::FLOAT, 2.5f64.to_bits(), "", 0);
        event.args[3] = arg(python_arg::BOOL, 1, "", 0);
        event.args[4] = arg(python_arg::NONE, 0, "", 0);
        event.args[5] = arg(python_arg::OTHER, 0, "Cart", 0);
        let names: Vec<String> = ["n", "item", "ratio", "fast", "note"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            describe(&event, &names),
            [
                "n: int = -42",
                "item: str = apple",
                "ratio: float = 2.5",
                "fast: bool = True",
                "note: NoneType = None",
                "arg5: Cart = <Cart object>",
            ]
        );
    }

    #[test]
    fn floats_and_long_strings_read_as_python_prints_them() {
        assert_eq!(float_repr(3.0), "3.0");
        assert_eq!(float_repr(0.1), "0.1");
        assert_eq!(float_repr(1e20), "1e+20");
        assert_eq!(float_repr(-1.5e-7), "-1.5e-07");
        assert_eq!(
            type_and_value(&arg(python_arg::STR, 0, "abc", 40)).1,
            "abc…"
        );
        assert_eq!(
            python_list_repr(&["a: str = it's".into(), "b: int = 1".into()]),
            "[\"a: str = it's\", 'b: int = 1']"
        );
    }
}
