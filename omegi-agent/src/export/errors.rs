//! The words every exporter uses for an error: its flow, where it ended, and
//! its stack trace with source lines. Kept here so that the console, JSON,
//! Kafka and OTLP forms say the same thing.

use crate::{
    assembly::{ErrorInfo, ErrorKind, Outcome},
    discovery::FunctionTable,
};

/// `exception.flow`: the names of the calls the error left, innermost first.
pub fn flow(info: &ErrorInfo, functions: &FunctionTable) -> Vec<String> {
    info.flow
        .iter()
        .map(|step| name(functions, step.fn_id))
        .collect()
}

/// How the error ended, in words.
pub fn outcome(info: &ErrorInfo, functions: &FunctionTable) -> String {
    match info.outcome {
        Outcome::CaughtBy { fn_id, .. } => format!("caught in {}", name(functions, fn_id)),
        Outcome::CaughtOutside => "caught outside the traced functions".into(),
        Outcome::ThreadEnded => "ended its thread".into(),
        Outcome::Terminated { signal } => format!(
            "the process was killed by {}",
            crate::assembly::errors::signal_name(signal)
        ),
        Outcome::Exited { code } => format!("the process exited with code {code}"),
        Outcome::Returned => "returned to its caller".into(),
        Outcome::Unknown => "end not seen".into(),
    }
}

/// `exception.stacktrace`: the traced calls in flight when the error
/// happened, innermost first, each with the source line of the call it was
/// making (or its own first line when that is not known); for a Python
/// exception, Python's own traceback ([`python_traceback`]).
pub fn stacktrace(info: &ErrorInfo, functions: &FunctionTable) -> String {
    if let Some(traceback) = python_traceback(info, functions) {
        return traceback;
    }
    let mut out = String::new();
    for frame in &info.stack {
        let location = functions
            .call_site(frame.fn_id, frame.call_offset)
            .or_else(|| {
                let function = functions.get(frame.fn_id)?;
                Some((function.file.clone()?, function.line))
            })
            .map(|(file, line)| match line {
                Some(line) => format!(" ({}:{line})", file.display()),
                None => format!(" ({})", file.display()),
            })
            .unwrap_or_default();
        out.push_str(&format!("at {}{location}\n", name(functions, frame.fn_id)));
    }
    out
}

/// A Python exception's path in the traceback format Python prints (and
/// OpenTelemetry's Python SDK sends as `exception.stacktrace`): the calls
/// it left, most recent last, each with the line it was at and that line's
/// text when the file can be read here, then `Type: message`. `None` for an
/// error that is not a Python exception.
pub fn python_traceback(info: &ErrorInfo, functions: &FunctionTable) -> Option<String> {
    if info.kind != ErrorKind::Exception || info.stack.is_empty() {
        return None;
    }
    let frames: Option<Vec<_>> = info
        .stack
        .iter()
        .map(|frame| {
            let function = functions.get(frame.fn_id)?;
            function.python_module.as_ref()?;
            Some((function, frame.line.or(function.line)))
        })
        .collect();
    let mut out = String::from("Traceback (most recent call last):\n");
    for (function, line) in frames?.into_iter().rev() {
        let file = function
            .file
            .as_ref()
            .map_or_else(|| "<unknown>".into(), |file| file.display().to_string());
        // Python names the code (`co_name`), not its qualified name.
        let name = function.symbol.rsplit('.').next().unwrap_or_default();
        match line {
            Some(line) => {
                out.push_str(&format!("  File \"{file}\", line {line}, in {name}\n"));
                if let Some(text) = function
                    .file
                    .as_deref()
                    .and_then(|file| source_line(file, line))
                {
                    out.push_str(&format!("    {text}\n"));
                }
            }
            None => out.push_str(&format!("  File \"{file}\", in {name}\n")),
        }
    }
    out.push_str(&info.description());
    Some(out)
}

/// Line `line` (from 1) of a source file, trimmed; `None` when it cannot
/// be read here (a file in a container, gone since) or is blank.
fn source_line(file: &std::path::Path, line: u32) -> Option<String> {
    use std::io::BufRead;
    let reader = std::io::BufReader::new(std::fs::File::open(file).ok()?);
    let text = reader.lines().nth(line.checked_sub(1)? as usize)?.ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn name(functions: &FunctionTable, fn_id: u32) -> String {
    functions
        .get(fn_id)
        .map_or_else(|| format!("function #{fn_id}"), |f| f.name.clone())
}
