//! Export: finished traces leave the agent.
//!
//! Each exporter runs on its own behind a bounded queue. Assembly never waits
//! for an exporter: when a queue is full the trace is dropped for that
//! exporter and its spans are counted, so a slow console or broker never slows
//! the kernel side or the traced program, and nothing is lost silently.

pub mod console;
pub mod errors;
pub mod json;
pub mod kafka;
pub mod otlp;
pub mod sampling;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use tokio::sync::mpsc;

use crate::{
    assembly::Trace,
    config::{Config, ExporterKind},
    discovery::FunctionTable,
};

/// What exporters need besides the trace.
#[derive(Debug)]
pub struct ExportContext {
    pub functions: Arc<FunctionTable>,
    pub service_name: String,
    pub project_root: PathBuf,
}

/// Counts of one exporter.
#[derive(Debug, Default)]
pub struct ExporterStats {
    pub name: &'static str,
    /// Traces (or pieces) and spans written out / delivered.
    pub traces: AtomicU64,
    pub spans: AtomicU64,
    /// Spans whose delivery was retried at least once (delivered or not).
    pub retried_spans: AtomicU64,
    /// Spans dropped because the exporter's queue was full.
    pub queue_full_spans: AtomicU64,
    /// Spans that could not be delivered (an I/O or delivery error, after
    /// retries, or still undelivered at the shutdown deadline).
    pub failed_spans: AtomicU64,
    /// Spans of traces left out by the flow sampling (not lost: not chosen).
    pub sampled_out_spans: AtomicU64,
}

impl ExporterStats {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    /// Spans that will never arrive.
    pub fn dropped_spans(&self) -> u64 {
        self.queue_full_spans.load(Ordering::Relaxed) + self.failed_spans.load(Ordering::Relaxed)
    }
}

/// Hands traces to every exporter's queue.
#[derive(Clone)]
pub struct Dispatcher {
    queues: Vec<(mpsc::Sender<Arc<Trace>>, Arc<ExporterStats>)>,
}

impl Dispatcher {
    /// Offers `trace` to each exporter without waiting.
    pub fn dispatch(&self, trace: Trace) {
        let spans = trace.spans.len() as u64;
        let trace = Arc::new(trace);
        for (queue, stats) in &self.queues {
            if queue.try_send(Arc::clone(&trace)).is_err() {
                stats.queue_full_spans.fetch_add(spans, Ordering::Relaxed);
            }
        }
    }
}

/// An exporter's worker: a thread for blocking writers, a task for network
/// clients.
enum Worker {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

/// The running exporters.
pub struct Exporters {
    pub dispatcher: Dispatcher,
    pub stats: Vec<Arc<ExporterStats>>,
    workers: Vec<Worker>,
}

impl Exporters {
    /// Starts the exporters named in the configuration.
    pub fn start(config: &Config, context: Arc<ExportContext>) -> anyhow::Result<Self> {
        let mut queues = Vec::new();
        let mut stats = Vec::new();
        let mut workers = Vec::new();
        for &kind in &config.exporters {
            let (sender, receiver) = mpsc::channel(config.queue_size);
            let exporter_stats = Arc::new(ExporterStats::new(kind.name()));
            match kind {
                ExporterKind::Console => {
                    let exporter =
                        console::ConsoleExporter::new(&config.console, Arc::clone(&context))?;
                    let worker_stats = Arc::clone(&exporter_stats);
                    workers.push(Worker::Thread(
                        std::thread::Builder::new()
                            .name("omegi-console".into())
                            .spawn(move || exporter.run(receiver, &worker_stats))?,
                    ));
                }
                ExporterKind::Otlp => {
                    let options = config.otlp.as_ref().ok_or_else(|| {
                        anyhow::anyhow!("the OTLP exporter was selected without its settings")
                    })?;
                    workers.push(Worker::Task(otlp::spawn(
                        options,
                        config.flush_timeout,
                        Arc::clone(&context),
                        receiver,
                        Arc::clone(&exporter_stats),
                    )?));
                }
                ExporterKind::Kafka => {
                    let exporter = kafka::KafkaExporter::new(
                        &config.kafka,
                        Arc::clone(&context),
                        Arc::clone(&exporter_stats),
                        config.flush_timeout,
                    )?;
                    workers.push(Worker::Task(tokio::spawn(exporter.run(receiver))));
                }
            }
            queues.push((sender, Arc::clone(&exporter_stats)));
            stats.push(exporter_stats);
        }
        Ok(Self {
            dispatcher: Dispatcher { queues },
            stats,
            workers,
        })
    }

    /// Closes the queues and waits for every exporter to write out what it
    /// holds. Other clones of the dispatcher must have been dropped.
    pub async fn finish(self) {
        drop(self.dispatcher);
        for worker in self.workers {
            match worker {
                Worker::Thread(thread) => {
                    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                }
                Worker::Task(task) => {
                    let _ = task.await;
                }
            }
        }
    }
}
