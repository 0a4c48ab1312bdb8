//! Python calls: the kernel side reports each Python call as a call of the
//! interpreter's eval function, with the call's code object in
//! `entry_ip`, and names each traced code object once
//! ([`PythonCodeEvent`]). Here each code object becomes a function of its
//! own in the table (`module.qualname`, its file and first line), so that
//! everything downstream (exporters, error flows) names Python calls as it
//! names any function.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use omegi_common::{PythonArgsEvent, PythonCodeEvent, PythonExceptionEvent, SpanEvent};

use super::errors::{ErrorInfo, ErrorKind, FlowStep, Outcome, StackFrame};
use crate::discovery::{
    python::{module_name, PythonTarget},
    Function, FunctionTable,
};

mod arguments;
mod lines;
mod objects;
pub mod resumes;

pub use arguments::python_list_repr;
pub use resumes::{Moves, Step, END_SUSPENDED};

/// The type name of a Python exception whose type could not be read.
pub const EXCEPTION: &str = "Python exception";

/// The exception `close()` raises in a suspended generator.
const GENERATOR_EXIT: &str = "GeneratorExit";

/// A Python exception leaving traced calls on one thread.
#[derive(Debug)]
struct Raised {
    info: ErrorInfo,
    /// The depth of the last call it left.
    depth: u32,
    trace_key: u64,
}

/// What a Python call's return says about an exception.
#[derive(Debug)]
pub enum Return {
    /// Nothing to do with one.
    Plain,
    /// The call was left by an exception (it returned NULL): its
    /// description.
    Raised(String),
    /// An exception ended here: caught by this call (or by code between
    /// traced calls); the error of the trace with this key.
    Ended(u64, ErrorInfo),
}

/// The code objects of a traced interpreter's processes.
#[derive(Debug)]
pub struct PythonCalls {
    table: Arc<FunctionTable>,
    /// The eval function's id: the `fn_id` every Python call arrives with.
    eval_id: u32,
    root: PathBuf,
    /// The interpreter, for reading its objects.
    python: Option<PythonTarget>,
    /// (process, code object) → its function's id.
    codes: HashMap<(u32, u64), u32>,
    /// Functions by (file, line, name): a module's code objects in another
    /// process (a fork) or seen again share one.
    functions: HashMap<(String, u32, String), u32>,
    /// Exceptions in flight, by thread.
    raised: HashMap<u32, Raised>,
    /// What the kernel side read of an exception about to leave a traced
    /// call, by thread: (type, message).
    read: HashMap<u32, (String, String)>,
    /// Functions `--include`/`--exclude` leave out: the kernel stops
    /// tracing their code once told, and the calls it made before go.
    left_out: std::collections::HashSet<u32>,
    /// By trace: the span ids of calls left out → their parents, for the
    /// calls under them (which ended first) to hang from the parent.
    skipped: HashMap<u64, HashMap<u64, u64>>,
    /// Generators and coroutines between their resumes.
    pub resumes: resumes::Resumes,
    /// The line tables of the functions' code, for the lines exceptions
    /// passed.
    lines: HashMap<u32, lines::LineTable>,
    /// The parameter names of the functions' code (`--capture-args`).
    parameters: HashMap<u32, Vec<String>>,
    /// Arguments read of calls whose spans have not come yet, by span id,
    /// and when they came (the spans of some never come: left out, too
    /// short for `--min-duration`).
    arguments: HashMap<u64, (Vec<String>, std::time::Instant)>,
}

impl PythonCalls {
    /// For a table with a Python interpreter's eval function.
    pub fn of(table: &Arc<FunctionTable>) -> Option<Self> {
        let python = table.python.as_ref()?;
        let eval = table
            .functions
            .iter()
            .find(|function| function.runs_python)?;
        Some(Self {
            table: Arc::clone(table),
            eval_id: eval.id,
            root: python.project_root.clone(),
            python: Some(python.clone()),
            codes: HashMap::new(),
            functions: HashMap::new(),
            raised: HashMap::new(),
            read: HashMap::new(),
            left_out: std::collections::HashSet::new(),
            skipped: HashMap::new(),
            resumes: resumes::Resumes::default(),
            lines: HashMap::new(),
            parameters: HashMap::new(),
            arguments: HashMap::new(),
        })
    }

    /// A traced code object's first call: its function. False when
    /// `--include`/`--exclude` leave it out.
    pub fn on_code(&mut self, event: &PythonCodeEvent) -> bool {
        let file = text(&event.filename);
        let qualname = text(&event.name);
        let key = (file.clone(), event.line, qualname.clone());
        let id = match self.functions.get(&key) {
            Some(&id) => id,
            None => {
                let path = PathBuf::from(&file);
                let module = module_name(&path, &self.root);
                let name = if qualname.is_empty() {
                    format!("{module}.?")
                } else if module.is_empty() {
                    qualname.clone()
                } else {
                    format!("{module}.{qualname}")
                };
                let mut function =
                    Function::described(0, &name, Some(&file), Some(event.line).filter(|&l| l > 0));
                function.symbol = qualname;
                function.python_module = Some(module);
                let kept = self
                    .python
                    .as_ref()
                    .is_none_or(|python| python.filter.keeps(&name));
                let id = self.table.add_found(function);
                self.functions.insert(key, id);
                if let Some(table) = self.line_table(event) {
                    self.lines.insert(id, table);
                }
                let parameters: Vec<String> = event
                    .parameters
                    .iter()
                    .map(|name| text(name))
                    .take_while(|name| !name.is_empty())
                    .collect();
                if !parameters.is_empty() {
                    self.parameters.insert(id, parameters);
                }

                if !kept {
                    self.left_out.insert(id);
                }
                id
            }
        };
        self.codes.insert((event.tgid, event.code), id);
        !self.left_out.contains(&id)
    }

    /// A code object's line table: as the kernel read it, else (a long
    /// one) from the process, which is then most likely still running.
    fn line_table(&self, event: &PythonCodeEvent) -> Option<lines::LineTable> {
        let python = self.python.as_ref()?;
        let length = event.line_table_len as usize;
        if length <= event.line_table.len() {
            return Some(lines::LineTable {
                first_line: event.line,
                table: event.line_table[..length].to_vec(),
                locations: python.minor >= 11,
            });
        }
        objects::line_table(event.tgid, event.code, event.line, python)
    }

    /// The function a span of `fn_id` with this `entry_ip` in process
    /// `tgid` is a call of: its code object's, for a Python call.
    pub fn function_of(&self, fn_id: u32, tgid: u32, entry_ip: u64) -> u32 {
        if fn_id != self.eval_id {
            return fn_id;
        }
        self.codes.get(&(tgid, entry_ip)).copied().unwrap_or(fn_id)
    }
}

impl PythonCalls {
    /// Whether a call of `fn_id` is left out (by `--include`/`--exclude`;
    /// made before the kernel was told): then the calls under it hang from
    /// its parent. An outermost call stays (its trace would lose its root).
    pub fn leave_out(&mut self, fn_id: u32, event: &SpanEvent, is_root: bool) -> bool {
        if is_root || !self.left_out.contains(&fn_id) {
            return false;
        }
        self.skipped
            .entry(event.trace_key)
            .or_default()
            .insert(event.span_id, event.parent_span_id);
        true
    }

    /// Trace `joined` became part of trace `into` (a generator's resume
    /// began it).
    pub fn join_trace(&mut self, joined: u64, into: u64) {
        if let Some(skipped) = self.skipped.remove(&joined) {
            self.skipped.entry(into).or_default().extend(skipped);
        }
        for raised in self.raised.values_mut() {
            if raised.trace_key == joined {
                raised.trace_key = into;
            }
        }
    }

    /// Hangs the calls of trace `trace_key` whose parent was left out from
    /// the nearest kept one.
    pub fn reparent(&mut self, trace_key: u64, spans: &mut [super::Span]) {
        let Some(skipped) = self.skipped.remove(&trace_key) else {
            return;
        };
        for span in spans {
            let mut parent = span.parent_span_id;
            // Bounded: a chain of left-out calls is at most the stack deep.
            for _ in 0..=skipped.len() {
                match skipped.get(&parent) {
                    Some(&above) => parent = above,
                    None => break,
                }
            }
            span.parent_span_id = parent;
        }
    }

    /// A traced call's arguments (`--capture-args`): kept until its span
    /// comes.
    pub fn on_args(&mut self, event: &PythonArgsEvent) {
        let id = self.codes.get(&(event.tgid, event.code)).copied();
        let names = id
            .and_then(|id| self.parameters.get(&id))
            .map_or(&[][..], Vec::as_slice);
        let described = arguments::describe(event, names);
        self.arguments
            .insert(event.span_id, (described, std::time::Instant::now()));
    }

    /// The arguments of the call with span `span_id`, if they were read.
    pub fn take_arguments(&mut self, span_id: u64) -> Vec<String> {
        if self.arguments.is_empty() {
            return Vec::new();
        }
        self.arguments
            .remove(&span_id)
            .map(|(arguments, _)| arguments)
            .unwrap_or_default()
    }

    /// Forgets the arguments of calls whose spans did not come within
    /// `kept`.
    pub fn forget_arguments_older_than(&mut self, kept: std::time::Duration) {
        let now = std::time::Instant::now();
        self.arguments
            .retain(|_, (_, since)| now.duration_since(*since) < kept);
    }

    /// Python calls the kernel side named (the interpreter ran code under
    /// the project root).
    pub fn functions_seen(&self) -> usize {
        self.functions.len()
    }

    /// An exception is leaving a traced call (its span comes next).
    pub fn on_exception(&mut self, event: &PythonExceptionEvent) {
        let type_name = self.qualified(event);
        let message = text(&event.message);
        self.read.insert(event.tid, (type_name, message));
        // A new exception: the last one on the thread ended unseen.
        self.raised.remove(&event.tid);
    }

    /// An exception type's name with its module (`PaymentDeclined` →
    /// `shop.errors.PaymentDeclined`), read from its `__module__` while the
    /// process lives, else from the module its class body ran in, when that
    /// was traced; a built-in's as it is (`ValueError`).
    fn qualified(&self, event: &PythonExceptionEvent) -> String {
        let type_name = text(&event.type_name);
        if type_name.is_empty() {
            return EXCEPTION.into();
        }
        if type_name.contains('.') {
            // A C extension's type names its module itself.
            return type_name;
        }
        let module = self
            .python
            .as_ref()
            .and_then(|python| objects::type_module(event.tgid, event.type_object, python))
            .or_else(|| {
                let mut modules = self
                    .functions
                    .keys()
                    .filter(|(_, _, qualname)| *qualname == type_name)
                    .map(|(file, _, _)| module_name(std::path::Path::new(file), &self.root));
                match (modules.next(), modules.next()) {
                    (Some(module), None) => Some(module),
                    _ => None,
                }
            });
        match module {
            Some(module) if !module.is_empty() && module != "builtins" => {
                format!("{module}.{type_name}")
            }
            _ => type_name,
        }
    }

    /// A Python call (of `fn_id`, its code's function) returned: with NULL
    /// when an exception left it. Consecutive NULL returns on a thread, each
    /// from the caller of the last, are one exception's flow; the first call
    /// above them that returns a value caught it.
    pub fn on_return(&mut self, event: &SpanEvent, fn_id: u32) -> Return {
        if event.fn_id != self.eval_id {
            return Return::Plain;
        }
        let tid = event.tid;
        if event.ret == 0 && !self.raised.contains_key(&tid) {
            // `close()` of a suspended generator: it is told to end by an
            // exception, which the interpreter takes back.
            if self
                .read
                .get(&tid)
                .is_some_and(|(type_name, _)| type_name == GENERATOR_EXIT)
            {
                self.read.remove(&tid);
                return Return::Plain;
            }
        }
        if event.ret == 0 {
            let read = &mut self.read;
            let raised = self.raised.entry(tid).or_insert_with(|| {
                let (type_name, message) = read
                    .remove(&tid)
                    .unwrap_or_else(|| (EXCEPTION.to_owned(), String::new()));
                // "others the type name": a message that is not a string.
                let message = if message.is_empty() {
                    type_name.clone()
                } else {
                    message
                };
                Raised {
                    info: ErrorInfo {
                        kind: ErrorKind::Exception,
                        type_name,
                        message,
                        flow: Vec::new(),
                        stack: Vec::new(),
                        outcome: Outcome::Unknown,
                    },
                    depth: event.depth,
                    trace_key: event.trace_key,
                }
            });
            raised.info.flow.push(FlowStep {
                fn_id,
                span_id: event.span_id,
            });
            raised.info.stack.push(StackFrame {
                fn_id,
                span_id: event.span_id,
                call_offset: 0,
                line: event
                    .code_unit
                    .checked_sub(1)
                    .and_then(|unit| self.lines.get(&fn_id)?.line_at(unit)),
            });
            raised.depth = event.depth;
            if event.depth == 0 {
                // It left every traced call: what became of it is not seen.
                let raised = self.raised.remove(&tid).expect("just inserted");
                return Return::Ended(raised.trace_key, raised.info);
            }
            return Return::Raised(raised.info.description());
        }
        let Some(raised) = self.raised.remove(&tid) else {
            return Return::Plain;
        };
        let mut info = raised.info;
        info.outcome = if event.depth < raised.depth {
            Outcome::CaughtBy {
                fn_id,
                span_id: event.span_id,
            }
        } else {
            // A call as deep as the last one left returned: something
            // between the traced calls caught it.
            Outcome::CaughtOutside
        };
        Return::Ended(raised.trace_key, info)
    }
}

/// The NUL-terminated text of a kernel buffer.
fn text(bytes: &[u8]) -> String {
    let end = bytes
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}
