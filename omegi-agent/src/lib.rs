//! omegi's agent: traces the user's own functions in a running program with
//! eBPF uprobes, with no change to the program, and ships every call as a
//! span.
//!
//! The modules follow the data flow:
//!
//! ```text
//! config ─▶ discovery ─▶ attach ─▶ events ─▶ assembly ─▶ export
//! ```
//!
//! - [`config`]: the command line and `OMEGI_*` variables, checked once.
//! - [`discovery`]: the target's user functions (ELF, DWARF) and where each
//!   one's entry and exit probes go (x86-64 decoding).
//! - [`attach`]: loading the eBPF programs and putting the probes in place.
//! - [`events`]: draining the ring buffer the kernel side writes to.
//! - [`assembly`]: ended calls become spans and traces; [`http`] parses the
//!   HTTP requests the kernel saw on sockets (SERVER and CLIENT spans, the
//!   caller's `traceparent`).
//! - [`export`]: traces leave the agent (console, Kafka, OTLP).
//!
//! [`process`] starts or watches the traced program, [`budget`] detaches
//! functions too hot for their probes, and [`agent`] wires the stages
//! together and owns shutdown.

pub mod agent;
pub mod assembly;
pub mod attach;
pub mod budget;
pub mod check;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod events;
pub mod export;
pub mod http;
pub mod probe_cost;
pub mod process;
