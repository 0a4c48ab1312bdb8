//! Micro-benchmark: how many spans per second span assembly, and assembly
//! plus the console exporter's JSON writer, handle on one core.
//!
//! The events are ring-buffer records in the kernel's format (`SpanEvent`
//! bytes), decoded as the reader does, for two shapes of traces: one call
//! per trace (a hot function called from untraced code), and requests of 11
//! nested calls (depth 8) on 4 threads whose events interleave. Run by
//! `cargo xtask bench`; by hand:
//!
//! ```text
//! cargo run --release -p omegi-agent --example assembly_bench -- --spans 3000000
//! ```
//!
//! Prints `stage=… shape=… spans=N ns=T` lines (spaces in names as `_`).

use std::{collections::HashMap, sync::Arc, time::Instant};

use omegi_agent::{
    assembly::{Assembler, Clock, Trace},
    discovery::{Function, FunctionTable},
    events::{decode, Event},
    export::{json::SpanWriter, ExportContext},
};
use omegi_common::{end_reason, event_kind, span_flags, SpanEvent};

const STAGES: [&str; 8] = [
    "stage_handle",
    "stage_parse",
    "stage_validate",
    "stage_lookup",
    "stage_compute",
    "stage_transform",
    "stage_encode",
    "stage_checksum",
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let spans: usize = args
        .iter()
        .position(|arg| arg == "--spans")
        .and_then(|index| args.get(index + 1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(1_000_000);

    let context = Arc::new(context());
    for (shape, records) in [
        ("one call per trace", single_calls(spans)),
        ("11 nested calls per trace, 4 threads", nested(spans)),
    ] {
        // Warm up allocators and caches, then measure.
        run(&records[..records.len().min(50_000)], &context, true);
        for (stage, export) in [("assembly", false), ("assembly + JSON export", true)] {
            let started = Instant::now();
            let count = run(&records, &context, export);
            let ns = started.elapsed().as_nanos();
            println!(
                "stage={} shape={} spans={count} ns={ns}",
                stage.replace(' ', "_"),
                shape.replace(' ', "_")
            );
        }
    }
}

/// Decodes and assembles `records`; with `export`, writes every finished
/// trace as JSON lines into memory. Returns the number of spans.
fn run(records: &[Vec<u8>], context: &Arc<ExportContext>, export: bool) -> usize {
    let mut assembler = Assembler::new(Clock::with_offset(0), 10_000, 5, HashMap::new());
    let mut writer = SpanWriter::new(Arc::clone(context));
    let mut out = Vec::with_capacity(1 << 20);
    let mut spans = 0;
    let mut handle = |traces: Vec<Trace>, out: &mut Vec<u8>| {
        if export {
            for trace in traces {
                for span in &trace.spans {
                    writer.write(out, &trace, span);
                }
                if out.len() > 1 << 20 {
                    std::hint::black_box(&out);
                    out.clear();
                }
            }
        } else {
            std::hint::black_box(traces);
        }
    };
    for record in records {
        if let Some(Event::Span(event)) = decode(record) {
            spans += 1;
            let traces = assembler.on_span(&event);
            handle(traces, &mut out);
        }
    }
    handle(assembler.finish_all(&[], 0), &mut out);
    spans
}

fn bytes(event: &SpanEvent) -> Vec<u8> {
    // SAFETY: viewing a plain-old-data struct as bytes, as the ring buffer
    // holds it.
    unsafe {
        std::slice::from_raw_parts(
            (event as *const SpanEvent).cast::<u8>(),
            std::mem::size_of::<SpanEvent>(),
        )
    }
    .to_vec()
}

fn span_event(fn_id: u32, tid: u32, depth: u32, ids: (u64, u64, u64), time: u64) -> SpanEvent {
    let (span_id, parent_span_id, trace_key) = ids;
    SpanEvent {
        kind: event_kind::SPAN,
        end_reason: end_reason::RETURNED,
        tgid: 1000,
        tid,
        fn_id,
        flags: if depth == 0 {
            span_flags::TRACE_ROOT
        } else {
            0
        },
        depth,
        code_unit: 0,
        start_ns: time,
        end_ns: time + 500 + u64::from(8 - depth) * 100,
        span_id,
        parent_span_id,
        trace_key,
        ret: 0,
        entry_ip: 0,
        object: 0,
    }
}

/// Every call is a trace of its own.
fn single_calls(spans: usize) -> Vec<Vec<u8>> {
    (0..spans as u64)
        .map(|i| {
            let id = i * 2 + 1;
            bytes(&span_event(
                7,
                1000 + (i % 2) as u32,
                0,
                (id, 0, id),
                i * 1000,
            ))
        })
        .collect()
}

/// Requests of 11 calls: handle → parse → validate → lookup → compute →
/// 2 × (transform → encode → checksum), on 4 threads, events interleaved
/// as the threads' calls end.
fn nested(spans: usize) -> Vec<Vec<u8>> {
    let threads = 4;
    let mut streams: Vec<Vec<SpanEvent>> = vec![Vec::new(); threads];
    let mut next_id = 1u64;
    let mut id = || {
        next_id += 1;
        next_id
    };
    let requests = spans / 11;
    for request in 0..requests {
        let thread = request % threads;
        let tid = 2000 + thread as u32;
        let time = request as u64 * 20_000;
        let root = id();
        let chain: Vec<u64> = std::iter::once(root).chain((0..4).map(|_| id())).collect();
        let stream = &mut streams[thread];
        for round in 0..2 {
            let transform = id();
            let encode = id();
            let checksum = id();
            let base = time + round * 3_000;
            stream.push(span_event(7, tid, 7, (checksum, encode, root), base + 300));
            stream.push(span_event(6, tid, 6, (encode, transform, root), base + 200));
            stream.push(span_event(
                5,
                tid,
                5,
                (transform, chain[4], root),
                base + 100,
            ));
        }
        for depth in (0..5).rev() {
            let parent = if depth == 0 { 0 } else { chain[depth - 1] };
            stream.push(span_event(
                depth as u32,
                tid,
                depth as u32,
                (chain[depth], parent, root),
                time + depth as u64 * 10,
            ));
        }
    }
    let mut records = Vec::with_capacity(requests * 11);
    let mut cursors = vec![0usize; threads];
    loop {
        let mut progressed = false;
        for thread in 0..threads {
            if let Some(event) = streams[thread].get(cursors[thread]) {
                records.push(bytes(event));
                cursors[thread] += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    records
}

fn context() -> ExportContext {
    let functions = STAGES
        .iter()
        .enumerate()
        .map(|(id, name)| {
            Function::described(
                id as u32,
                name,
                Some("/app/src/nested.cpp"),
                Some(10 + id as u32),
            )
        })
        .collect();
    ExportContext {
        functions: Arc::new(FunctionTable::from_functions("/app/nested", functions)),
        service_name: "bench".into(),
        project_root: "/app".into(),
    }
}
