//! The words every exporter uses for an error: its flow, where it ended, and
//! its stack trace with source lines. Kept here so that the console, JSON,
//! Kafka and OTLP forms say the same thing.

use crate::{
    assembly::{ErrorInfo, Outcome},
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
/// making (or its own first line when that is not known).
pub fn stacktrace(info: &ErrorInfo, functions: &FunctionTable) -> String {
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

fn name(functions: &FunctionTable, fn_id: u32) -> String {
    functions
        .get(fn_id)
        .map_or_else(|| format!("function #{fn_id}"), |f| f.name.clone())
}
