//! The Kafka exporter: the Omegi message format (see [`wire`]) on an error
//! topic and a flow topic, through librdkafka.
//!
//! # Delivery
//!
//! Traces arrive through the exporter's bounded queue (`--queue-size`), so
//! a slow or absent broker never slows assembly, the kernel side or the
//! traced program: when the queue is full, traces are dropped and counted.
//! Each trace becomes its messages here and is then delivered on its own:
//!
//! - librdkafka retries within an attempt (`message.timeout.ms`, 30 s here);
//! - a trace whose messages still failed is sent again after a backoff
//!   ([`FIRST_BACKOFF`], doubling up to [`MAX_BACKOFF`]) until
//!   `--kafka-retry-timeout` (default 5 min) has passed since it arrived;
//!   then it is dropped and counted as failed;
//! - at most [`IN_FLIGHT_KIB`] of messages (a trace counts 4 KiB at least,
//!   so at most 16,384 traces) are being delivered or waiting for a retry;
//!   past that the exporter stops taking traces from its queue, which then
//!   fills and drops;
//! - at shutdown, delivery goes on until `--flush-timeout` after the queue
//!   closed; what is left then (in flight or still queued) is counted as
//!   failed.
//!
//! A trace counts once: all its spans are *delivered* when every message it
//! needs is acknowledged by the broker, *failed* when it is given up,
//! *retried* when it needed more than one attempt, and *skipped* when it
//! needs no message (sampled out of the flow topic and holding no error).
//! Delivery is at least once: a trace retried after a lost acknowledgement
//! may arrive twice.
//!
//! # Topics
//!
//! Many clusters create topics on first use and many forbid it; tansu never
//! does. At start, and again whenever a delivery fails, omegi checks that
//! both topics exist and creates the missing ones through the admin API
//! (the broker's default partitions and replication), unless
//! `OMEGI_KAFKA_CREATE_TOPICS=false`. When a topic is missing and cannot be
//! created, a warning says so and deliveries keep being retried (the topic
//! may yet be created by someone else, or by the broker on first use).

pub mod options;
pub mod wire;

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::ClientContext,
    config::RDKafkaLogLevel,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};
use tokio::{
    sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};

use self::{
    options::KafkaOptions,
    wire::{Sender, TraceError},
};
use super::{ExportContext, ExporterStats};
use crate::assembly::Trace;

/// First wait before a failed trace is sent again.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Messages being delivered or waiting for a retry, at most (KiB).
pub const IN_FLIGHT_KIB: u32 = 64 * 1024;
/// librdkafka's own attempt at a message (`message.timeout.ms`).
const ATTEMPT_TIMEOUT_MS: &str = "30000";
/// How long a new trace waits for the first topic check before its first
/// attempt (so that the first traces do not race topic creation).
const FIRST_CHECK_WAIT: Duration = Duration::from_secs(10);
/// Topics are checked this often when nothing asks for it.
const TOPIC_RECHECK_EVERY: Duration = Duration::from_secs(10);
/// Longest wait between two topic checks that could not settle.
const MAX_CHECK_BACKOFF: Duration = Duration::from_secs(5);
/// Timeout of one metadata or admin request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Traces whose earlier piece held an error, remembered so that their later
/// pieces go to the error topic too.
const ERROR_MEMORY: usize = 10_000;

/// Whether the brokers were reachable last we heard.
#[derive(Debug, Default)]
struct Health {
    servers: String,
    unreachable: AtomicBool,
    /// Asks the topic checker to look again: a broker that was lost may
    /// come back without its topics (or a delivery failed).
    recheck: Notify,
}

impl Health {
    fn lost(&self, why: &str) {
        if !self.unreachable.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "kafka: cannot reach {} ({why}): traces are kept and retried",
                self.servers
            );
            self.recheck.notify_one();
        }
    }

    fn reached(&self) {
        if self.unreachable.swap(false, Ordering::Relaxed) {
            tracing::info!("kafka: {} reachable again", self.servers);
        }
    }
}

/// librdkafka's callbacks: its log lines at debug level (`-v`), and broker
/// outages as one warning each (not one per reconnection attempt).
struct Context {
    health: Arc<Health>,
    /// The last other error reported, so that one repeated on every
    /// reconnection is said once.
    last_error: std::sync::Mutex<String>,
}

impl Context {
    fn new(health: &Arc<Health>) -> Self {
        Self {
            health: Arc::clone(health),
            last_error: std::sync::Mutex::new(String::new()),
        }
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::warn!("kafka: librdkafka: {facility} {message}")
            }
            _ => tracing::debug!("kafka: librdkafka: {facility} {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::Resolve,
            ) => self.health.lost(reason),
            _ => {
                let text = format!("kafka: {error}: {reason}");
                let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
                if *last != text {
                    tracing::warn!("{text}");
                    *last = text;
                }
            }
        }
    }
}

/// One message to send.
#[derive(Debug)]
struct Message {
    topic: Arc<str>,
    payload: Vec<u8>,
}

/// What is shared by the delivery tasks.
struct Shared {
    producer: FutureProducer<Context>,
    options: KafkaOptions,
    health: Arc<Health>,
    stats: Arc<ExporterStats>,
    /// Set once the first topic check has ended, either way.
    first_check: watch::Receiver<bool>,
}

/// The Kafka exporter.
pub struct KafkaExporter {
    shared: Arc<Shared>,
    /// Taken by the topic checker when the exporter runs.
    admin: Option<AdminClient<Context>>,
    context: Arc<ExportContext>,
    first_check: watch::Sender<bool>,
    flush_timeout: Duration,
    max_message_bytes: usize,
    /// Trace ids whose earlier piece held an error (bounded, oldest forgotten).
    errored: HashSet<u128>,
    errored_order: VecDeque<u128>,
}

impl KafkaExporter {
    /// Sets up the client. Nothing is sent and nothing waits for a broker
    /// here: an absent broker is not an error at start.
    pub fn new(
        options: &KafkaOptions,
        context: Arc<ExportContext>,
        stats: Arc<ExporterStats>,
        flush_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let health = Arc::new(Health {
            servers: options.bootstrap_servers(),
            ..Health::default()
        });
        let config = client_config(options);
        let producer: FutureProducer<Context> =
            config
                .create_with_context(Context::new(&health))
                .map_err(|e| anyhow::anyhow!("kafka: cannot set up the client: {e}"))?;
        let admin: AdminClient<Context> = config
            .create_with_context(Context::new(&health))
            .map_err(|e| anyhow::anyhow!("kafka: cannot set up the admin client: {e}"))?;
        let max_message_bytes = options
            .client_property("message.max.bytes")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1_000_000);
        if options.token.is_empty() {
            tracing::warn!(
                "kafka: OMEGI_TOKEN is not set: the Omegi server drops messages without a valid token"
            );
        }
        let (first_check, first_check_seen) = watch::channel(false);
        Ok(Self {
            shared: Arc::new(Shared {
                producer,
                options: options.clone(),
                health,
                stats,
                first_check: first_check_seen,
            }),
            admin: Some(admin),
            context,
            first_check,
            flush_timeout,
            // Leave room for the record's own overhead.
            max_message_bytes: max_message_bytes * 9 / 10,
            errored: HashSet::new(),
            errored_order: VecDeque::new(),
        })
    }

    /// Delivers every trace that arrives until the queue closes, then
    /// flushes until the flush deadline.
    pub async fn run(mut self, mut queue: mpsc::Receiver<Arc<Trace>>) {
        let shared = Arc::clone(&self.shared);
        let stats = Arc::clone(&shared.stats);
        let checker = tokio::spawn(check_topics_forever(
            Arc::clone(&shared),
            self.admin.take().expect("run is called once"),
            self.first_check.clone(),
        ));
        let budget = Arc::new(Semaphore::new(IN_FLIGHT_KIB as usize));
        let mut tasks = JoinSet::new();
        // When the queue was first seen closed (shutdown began).
        let mut closed_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                trace = queue.recv() => {
                    let Some(trace) = trace else { break };
                    let spans = trace.spans.len() as u64;
                    let messages = self.messages_for(&trace);
                    if messages.is_empty() {
                        stats.sampled_out_spans.fetch_add(spans, Ordering::Relaxed);
                        continue;
                    }
                    let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
                    let cost = ((bytes / 1024) as u32).clamp(4, IN_FLIGHT_KIB);
                    // Waits while too much is in flight (the queue in front
                    // fills and drops instead), but not past the flush
                    // deadline once shutdown has begun.
                    let permit = loop {
                        tokio::select! {
                            permit = Arc::clone(&budget).acquire_many_owned(cost) => {
                                break Some(permit.expect("the semaphore is never closed"));
                            }
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                                if queue.is_closed() {
                                    let since = *closed_at.get_or_insert_with(tokio::time::Instant::now);
                                    if since.elapsed() >= self.flush_timeout {
                                        break None;
                                    }
                                }
                            }
                        }
                    };
                    let outcome = Outcome::new(Arc::clone(&stats), spans);
                    match permit {
                        Some(permit) => {
                            tasks.spawn(deliver(Arc::clone(&shared), messages, outcome, permit));
                        }
                        None => {
                            // Counted as failed (drop), with what is still queued.
                            drop(outcome);
                            while let Ok(trace) = queue.try_recv() {
                                stats
                                    .failed_spans
                                    .fetch_add(trace.spans.len() as u64, Ordering::Relaxed);
                            }
                            break;
                        }
                    }
                }
            }
        }

        // Shutdown: the queue is closed; deliver what is in flight until the
        // deadline, then count the rest as failed.
        let deadline = closed_at.unwrap_or_else(tokio::time::Instant::now) + self.flush_timeout;
        let drained = tokio::time::timeout_at(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            let before = stats.failed_spans.load(Ordering::Relaxed);
            let traces = tasks.len();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            let spans = stats.failed_spans.load(Ordering::Relaxed) - before;
            tracing::warn!(
                "kafka: {traces} traces ({spans} spans) not delivered by the flush deadline \
                 ({}; --flush-timeout)",
                humantime::format_duration(self.flush_timeout)
            );
        }
        checker.abort();
        let _ = checker.await;
        // Dropping the producer purges what librdkafka still holds (already
        // counted as failed above); its short flush runs off the runtime.
        drop(shared);
        let exporter = self;
        let _ = tokio::task::spawn_blocking(move || drop(exporter)).await;
    }

    /// The messages `trace` needs; none when it is sampled out and holds no
    /// error.
    fn messages_for(&mut self, trace: &Trace) -> Vec<Message> {
        let shared = Arc::clone(&self.shared);
        let context = Arc::clone(&self.context);
        let options = &shared.options;
        let sender = Sender {
            token: &options.token,
            service_name: &context.service_name,
        };
        let mut messages = Vec::new();
        let error: Option<TraceError> = wire::trace_error(trace, &context.functions);
        let earlier_error = self.errored.contains(&trace.trace_id);
        if error.is_some() || earlier_error {
            let topic: Arc<str> = Arc::from(options.topic_error.as_str());
            for payload in wire::error_messages(
                trace,
                error.as_ref(),
                &sender,
                &context,
                self.max_message_bytes,
            ) {
                messages.push(Message {
                    topic: Arc::clone(&topic),
                    payload,
                });
            }
            if trace.complete {
                self.errored.remove(&trace.trace_id);
            } else if !earlier_error {
                self.remember_error(trace.trace_id);
            }
        }
        if trace.sampled {
            if let Some(payload) = wire::flow_message(trace, &sender) {
                messages.push(Message {
                    topic: Arc::from(options.topic_flow.as_str()),
                    payload,
                });
            }
        }
        messages
    }

    fn remember_error(&mut self, trace_id: u128) {
        if self.errored.insert(trace_id) {
            self.errored_order.push_back(trace_id);
        }
        while self.errored_order.len() > ERROR_MEMORY {
            if let Some(old) = self.errored_order.pop_front() {
                self.errored.remove(&old);
            }
        }
    }
}

/// omegi's settings, then the passed-through ones (which win).
fn client_config(options: &KafkaOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", options.bootstrap_servers())
        .set("client.id", "omegi-agent")
        .set("message.timeout.ms", ATTEMPT_TIMEOUT_MS)
        // Above the exporter's own in-flight limit, so that this one binds.
        .set(
            "queue.buffering.max.kbytes",
            (2 * IN_FLIGHT_KIB).to_string(),
        )
        .set_log_level(RDKafkaLogLevel::Warning);
    for property in &options.client_config {
        config.set(&property.key, &property.value);
    }
    config
}

/// Counts a trace once, whatever happens to its delivery task (an aborted
/// task counts as failed).
struct Outcome {
    stats: Arc<ExporterStats>,
    spans: u64,
    retried: bool,
    settled: bool,
}

impl Outcome {
    fn new(stats: Arc<ExporterStats>, spans: u64) -> Self {
        Self {
            stats,
            spans,
            retried: false,
            settled: false,
        }
    }

    fn retrying(&mut self) {
        if !self.retried {
            self.retried = true;
            self.stats
                .retried_spans
                .fetch_add(self.spans, Ordering::Relaxed);
        }
    }

    fn delivered(mut self) {
        self.settled = true;
        self.stats.traces.fetch_add(1, Ordering::Relaxed);
        self.stats.spans.fetch_add(self.spans, Ordering::Relaxed);
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.settled {
            self.stats
                .failed_spans
                .fetch_add(self.spans, Ordering::Relaxed);
        }
    }
}

/// Errors that no retry can fix.
fn is_permanent(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::InvalidTopic
        )
    )
}

/// Delivers one trace's messages, retrying with backoff.
async fn deliver(
    shared: Arc<Shared>,
    mut messages: Vec<Message>,
    mut outcome: Outcome,
    _permit: OwnedSemaphorePermit,
) {
    let arrived = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut first_check = shared.first_check.clone();
    let _ = tokio::time::timeout(FIRST_CHECK_WAIT, first_check.wait_for(|done| *done)).await;
    loop {
        let mut pending = Vec::new();
        for message in &messages {
            let record = FutureRecord::<(), [u8]>::to(&message.topic).payload(&message.payload);
            pending.push(match shared.producer.send_result(record) {
                Ok(delivery) => Ok(delivery),
                Err((error, _)) => Err(error),
            });
        }
        let mut failed = Vec::new();
        let mut last_error = None;
        for (message, attempt) in messages.into_iter().zip(pending) {
            let result = match attempt {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((error, _))) => Err(error),
                    Err(_canceled) => Err(KafkaError::Canceled),
                },
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                failed.push(message);
                last_error = Some(error);
            }
        }
        let Some(error) = last_error else {
            shared.health.reached();
            outcome.delivered();
            return;
        };
        if is_permanent(&error) {
            tracing::warn!(
                "kafka: a trace of {} spans cannot be delivered: {error}",
                outcome.spans
            );
            return; // counted as failed on drop
        }
        shared.health.recheck.notify_one();
        outcome.retrying();
        if arrived.elapsed() + backoff > shared.options.retry_timeout {
            tracing::debug!(
                "kafka: giving up on a trace of {} spans: {error}",
                outcome.spans
            );
            return; // counted as failed on drop
        }
        tracing::debug!("kafka: delivery failed ({error}); retrying in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        messages = failed;
    }
}

/// The result of one topic check.
enum TopicCheck {
    /// Both topics exist (these were created now).
    Ready(Vec<String>),
    /// The brokers could not be asked.
    Unreachable(String),
    /// Topics missing and not created, and why.
    Missing(Vec<String>, String),
}

/// Checks the topics at start, then again whenever asked (a delivery
/// failed), retrying with backoff while it cannot settle.
async fn check_topics_forever(
    shared: Arc<Shared>,
    admin: AdminClient<Context>,
    first_check: watch::Sender<bool>,
) {
    let admin = Arc::new(admin);
    let mut backoff = FIRST_BACKOFF;
    let mut warned: Option<String> = None;
    loop {
        let check = check_topics(&shared, &admin).await;
        let settled = match check {
            TopicCheck::Ready(created) => {
                if !created.is_empty() {
                    tracing::info!("kafka: created topic(s) {}", created.join(", "));
                }
                warned = None;
                true
            }
            TopicCheck::Unreachable(why) => {
                shared.health.lost(&why);
                false
            }
            TopicCheck::Missing(topics, why) => {
                let text = format!(
                    "kafka: topic(s) {} missing on {} and not created: {why}; create them, or \
                     allow omegi to (OMEGI_KAFKA_CREATE_TOPICS=true); traces for them are \
                     retried for {} and then dropped",
                    topics.join(", "),
                    shared.health.servers,
                    humantime::format_duration(shared.options.retry_timeout),
                );
                if warned.as_deref() != Some(text.as_str()) {
                    tracing::warn!("{text}");
                    warned = Some(text);
                }
                false
            }
        };
        first_check.send_replace(true);
        if settled {
            backoff = FIRST_BACKOFF;
            // Also now and then: a broker may lose its topics without
            // omegi seeing an error first.
            let _ =
                tokio::time::timeout(TOPIC_RECHECK_EVERY, shared.health.recheck.notified()).await;
            // Failures come in bursts: one check for the burst.
            tokio::time::sleep(Duration::from_millis(500)).await;
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_CHECK_BACKOFF);
        }
    }
}

async fn check_topics(shared: &Arc<Shared>, admin: &Arc<AdminClient<Context>>) -> TopicCheck {
    let wanted = [
        shared.options.topic_error.clone(),
        shared.options.topic_flow.clone(),
    ];
    let metadata = {
        let shared = Arc::clone(shared);
        tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer as _;
            shared
                .producer
                .client()
                .fetch_metadata(None, REQUEST_TIMEOUT)
        })
        .await
    };
    let metadata = match metadata {
        Ok(Ok(metadata)) => metadata,
        Ok(Err(error)) => return TopicCheck::Unreachable(error.to_string()),
        Err(error) => return TopicCheck::Unreachable(error.to_string()),
    };
    let existing: HashSet<&str> = metadata
        .topics()
        .iter()
        .filter(|topic| topic.error().is_none())
        .map(|topic| topic.name())
        .collect();
    let mut missing: Vec<String> = wanted
        .iter()
        .filter(|topic| !existing.contains(topic.as_str()))
        .cloned()
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return TopicCheck::Ready(Vec::new());
    }
    if !shared.options.create_topics {
        return TopicCheck::Missing(missing, "OMEGI_KAFKA_CREATE_TOPICS is false".into());
    }
    // The broker's defaults for partitions and replication.
    let new_topics: Vec<NewTopic> = missing
        .iter()
        .map(|name| NewTopic::new(name, -1, TopicReplication::Fixed(-1)))
        .collect();
    let admin_options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    let results = match admin.create_topics(&new_topics, &admin_options).await {
        Ok(results) => results,
        Err(error) => {
            return TopicCheck::Missing(missing, format!("creating them failed: {error}"))
        }
    };
    let mut created = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => failures.push(format!("{name}: {code}")),
        }
    }
    if failures.is_empty() {
        TopicCheck::Ready(created)
    } else {
        TopicCheck::Missing(
            missing,
            format!("creating them failed ({})", failures.join("; ")),
        )
    }
}
