//! Events: reading what the kernel side emits.
//!
//! The programs submit to the ring buffer without waking the reader (a wakeup
//! per event costs more than the probe), so one thread drains it on a timer
//! and feeds assembly directly; finished traces go to the exporters' queues.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray};
use omegi_common::{
    counter, event_kind, ErrorEvent, Frame, HttpEvent, PythonArgsEvent, PythonCodeEvent,
    PythonCodeKey, PythonExceptionEvent, SpanEvent, ThreadExitEvent,
};

use crate::{
    assembly::{Assembler, Clock, Trace, IDLE_PIECE_AFTER},
    attach::KernelMaps,
    export::Dispatcher,
};

/// How often idle traces are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// After a drain that found at least [`BUSY_DRAIN_RECORDS`] records, drains
/// come every [`BUSY_DRAIN_INTERVAL`] rather than every configured interval,
/// until one finds fewer than [`QUIET_DRAIN_RECORDS`]: under a high call
/// rate, smaller and more frequent batches keep the exporters' queues from
/// overflowing in bursts (measured at 500k calls/s: 10 ms batches of 5,000
/// one-span traces overflowed a 4,096-trace queue, 1 ms batches did not),
/// while a quiet agent still wakes only once per interval.
const BUSY_DRAIN_RECORDS: usize = 1024;
const QUIET_DRAIN_RECORDS: usize = 64;
const BUSY_DRAIN_INTERVAL: Duration = Duration::from_millis(1);

/// Counts kept by the reader.
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Span events read from the ring buffer.
    pub spans: AtomicU64,
    /// Traces (complete) and pieces handed to the exporters.
    pub traces: AtomicU64,
    pub pieces: AtomicU64,
    /// Records of a kind or size this agent does not know.
    pub malformed: AtomicU64,
    /// What went wrong with HTTP messages.
    pub http: Arc<crate::http::HttpStats>,
}

/// What the kernel side could not do, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Spans lost because the ring buffer was full.
    pub ring_full: u64,
    /// Calls not traced: nesting deeper than the shadow stack.
    pub depth_overflow: u64,
    /// Calls not traced: the thread table was full.
    pub threads_full: u64,
    /// Exits with no matching call (informational).
    pub unmatched_exits: u64,
    /// Calls left out by `--min-duration` (a choice, not a loss).
    pub filtered: u64,
    /// Error, thread-exit and HTTP records lost because the ring buffer
    /// was full.
    pub records_ring_full: u64,
    /// HTTP connections not followed: the kernel's table was full.
    pub connections_full: u64,
    /// Calls of functions detached by the overhead budget, in flight at
    /// their detach, left out (a choice, not a loss).
    pub detached_in_flight: u64,
}

impl KernelCounters {
    /// Reads the `COUNTERS` map.
    pub fn read(map: &PerCpuArray<MapData, u64>) -> Self {
        let sum = |index: u32| -> u64 {
            map.get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        Self {
            ring_full: sum(counter::RING_FULL),
            depth_overflow: sum(counter::DEPTH_OVERFLOW),
            threads_full: sum(counter::THREADS_FULL),
            unmatched_exits: sum(counter::UNMATCHED_EXIT),
            filtered: sum(counter::FILTERED),
            records_ring_full: sum(counter::RECORDS_RING_FULL),
            connections_full: sum(counter::CONNECTIONS_FULL),
            detached_in_flight: sum(counter::DETACHED_IN_FLIGHT),
        }
    }

    /// Spans or calls lost in the kernel.
    pub fn lost(&self) -> u64 {
        self.ring_full + self.depth_overflow + self.threads_full
    }
}

/// A record from the ring buffer.
#[derive(Clone, Debug)]
pub enum Event {
    Span(SpanEvent),
    Error(Box<ErrorEvent>),
    ThreadExit(ThreadExitEvent),
    Http(Box<HttpEvent>),
    PythonCode(Box<PythonCodeEvent>),
    PythonException(Box<PythonExceptionEvent>),
    PythonArgs(Box<PythonArgsEvent>),
}

/// Decodes one ring buffer record.
pub fn decode(record: &[u8]) -> Option<Event> {
    let kind = u32::from_ne_bytes(record.get(..4)?.try_into().ok()?);
    match kind {
        event_kind::SPAN => read::<SpanEvent>(record).map(Event::Span),
        event_kind::ERROR => read::<ErrorEvent>(record).map(|event| Event::Error(Box::new(event))),
        event_kind::THREAD_EXIT => read::<ThreadExitEvent>(record).map(Event::ThreadExit),
        event_kind::HTTP => read::<HttpEvent>(record).map(|event| Event::Http(Box::new(event))),
        event_kind::PYTHON_CODE => {
            read::<PythonCodeEvent>(record).map(|event| Event::PythonCode(Box::new(event)))
        }
        event_kind::PYTHON_EXCEPTION => read::<PythonExceptionEvent>(record)
            .map(|event| Event::PythonException(Box::new(event))),
        event_kind::PYTHON_ARGS => {
            read::<PythonArgsEvent>(record).map(|event| Event::PythonArgs(Box::new(event)))
        }
        _ => None,
    }
}

fn read<T: aya::Pod>(record: &[u8]) -> Option<T> {
    if record.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked above; `T` is plain old data and
    // `read_unaligned` does not need the record to be aligned.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<T>()) })
}

/// The draining thread.
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(KernelMaps, Assembler)>,
}

impl Reader {
    /// Starts draining `maps.events` every `interval`. Once a second it
    /// puts in `error_functions` the functions on error paths still being
    /// recorded (see [`Assembler::functions_on_error_paths`]).
    pub fn start(
        mut maps: KernelMaps,
        mut assembler: Assembler,
        dispatcher: Dispatcher,
        stats: Arc<ReaderStats>,
        interval: Duration,
        error_functions: Arc<std::sync::Mutex<std::collections::HashSet<u32>>>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("omegi-events".into())
            .spawn(move || {
                let mut last_sweep = Instant::now();
                let mut busy = false;
                loop {
                    // Read the flag before draining: once set, the probes are
                    // gone, and this last drain empties the ring.
                    let last_round = stopping.load(Ordering::Acquire);
                    let drained = drain(&mut maps, &mut assembler, &dispatcher, &stats);
                    if let Some(logger) = maps.logger.as_mut() {
                        logger.flush();
                    }
                    if last_sweep.elapsed() >= SWEEP_EVERY {
                        for piece in assembler.sweep_idle(IDLE_PIECE_AFTER) {
                            hand_on(piece, &dispatcher, &stats);
                        }
                        let on_error_paths = assembler.functions_on_error_paths();
                        *error_functions
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()) = on_error_paths;
                        last_sweep = Instant::now();
                    }
                    if last_round {
                        break;
                    }
                    busy =
                        drained >= BUSY_DRAIN_RECORDS || (busy && drained >= QUIET_DRAIN_RECORDS);
                    std::thread::sleep(if busy {
                        interval.min(BUSY_DRAIN_INTERVAL)
                    } else {
                        interval
                    });
                }
                (maps, assembler)
            })?;
        Ok(Self { stop, thread })
    }

    /// Drains what is left (call after the probes are detached) and gives
    /// back the maps and the assembler.
    pub fn stop(self) -> (KernelMaps, Assembler) {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .expect("the events thread does not panic")
    }
}

/// Reads every record in the ring buffer; returns how many.
fn drain(
    maps: &mut KernelMaps,
    assembler: &mut Assembler,
    dispatcher: &Dispatcher,
    stats: &ReaderStats,
) -> usize {
    let mut records = 0;
    while let Some(record) = maps.events.next() {
        records += 1;
        let traces = match decode(&record) {
            Some(Event::Span(event)) => {
                stats.spans.fetch_add(1, Ordering::Relaxed);
                assembler.on_span(&event)
            }
            Some(Event::Error(event)) => assembler.on_error(&event),
            Some(Event::ThreadExit(event)) => assembler.on_thread_exit(&event),
            Some(Event::Http(event)) => {
                assembler.on_http(&event);
                Vec::new()
            }
            Some(Event::PythonCode(event)) => {
                if !assembler.on_python_code(&event) {
                    untrace_python_code(&mut maps.python_codes, &event);
                }
                Vec::new()
            }
            Some(Event::PythonException(event)) => {
                assembler.on_python_exception(&event);
                Vec::new()
            }
            Some(Event::PythonArgs(event)) => {
                assembler.on_python_args(&event);
                Vec::new()
            }
            None => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                Vec::new()
            }
        };
        for trace in traces {
            hand_on(trace, dispatcher, stats);
        }
    }
    records
}

/// Turns off the kernel's tracing of a Python code object that
/// `--include`/`--exclude` leave out (the calls it made before are left out
/// by the assembly).
fn untrace_python_code(
    codes: &mut Option<
        aya::maps::HashMap<aya::maps::MapData, PythonCodeKey, omegi_common::PythonCodeVerdict>,
    >,
    event: &PythonCodeEvent,
) {
    let Some(codes) = codes.as_mut() else {
        return;
    };
    let key = PythonCodeKey {
        tgid: event.tgid,
        _pad: 0,
        code: event.code,
    };
    if let Ok(mut verdict) = codes.get(&key, 0) {
        verdict.traced = 0;
        let _ = codes.insert(key, verdict, 0);
    }
}

/// Gives a finished trace to the exporters.
pub fn hand_on(trace: Trace, dispatcher: &Dispatcher, stats: &ReaderStats) {
    let counter = if trace.complete {
        &stats.traces
    } else {
        &stats.pieces
    };
    counter.fetch_add(1, Ordering::Relaxed);
    dispatcher.dispatch(trace);
}

/// The calls still on traced threads' stacks, outermost first per thread.
pub fn calls_in_flight(maps: &KernelMaps) -> Vec<(u32, u32, Frame)> {
    let mut frames = Vec::new();
    let mut add = |tid: u32, stack: &omegi_common::ThreadStack| {
        let depth = (stack.depth as usize).min(stack.frames.len());
        frames.extend(
            stack.frames[..depth]
                .iter()
                .map(|frame| (stack.tgid, tid, *frame)),
        );
    };
    for entry in maps.threads.iter() {
        let Ok((tid, stack)) = entry else { continue };
        add(tid, &stack);
    }
    for entry in maps.goroutines.iter() {
        let Ok((_, stack)) = entry else { continue };
        add(stack.owner, &stack);
    }
    for index in 0..maps.thread_slots.len() {
        let Ok(stack) = maps.thread_slots.get(&index, 0) else {
            continue;
        };
        if stack.owner != 0 {
            add(stack.owner, &stack);
        }
    }
    frames
}

/// Monotonic now, for closing calls in flight.
pub fn now_ns() -> u64 {
    Clock::monotonic_now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_span_record() {
        let event = SpanEvent {
            kind: event_kind::SPAN,
            fn_id: 3,
            span_id: 9,
            ..SpanEvent::default()
        };
        // SAFETY: viewing a POD struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&event as *const SpanEvent).cast::<u8>(),
                std::mem::size_of::<SpanEvent>(),
            )
        };
        assert!(matches!(decode(bytes), Some(Event::Span(decoded)) if decoded == event));
        assert!(decode(&bytes[..8]).is_none());
        assert!(decode(&[0, 0, 0, 0, 1, 2, 3]).is_none());
    }
}
