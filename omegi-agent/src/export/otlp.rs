//! The OTLP exporter (`OMEGI_EXPORTER_KIND=otlp`): spans to an OpenTelemetry
//! collector over gRPC or HTTP/protobuf, with the `opentelemetry-otlp` SDK
//! exporter.
//!
//! omegi's spans are finished when they reach an exporter: they already have
//! their trace and span ids, parents and times. So they are not re-created
//! through a tracer (which would give them new ids): each one is mapped to the
//! SDK's [`SpanData`] ([`span_data`]) and handed to the SDK's
//! [`SpanExporter`] directly, which encodes and sends them.
//!
//! # Delivery
//!
//! One tokio task takes traces from the exporter's bounded queue, keeps those
//! the sampling policy keeps ([`sampling`](super::sampling)), and sends what
//! is queued in requests of at most [`MAX_BATCH_SPANS`] spans, one request at
//! a time. The SDK retries a request the specification calls retryable
//! (gRPC `UNAVAILABLE`…, HTTP 429/502/503/504 and connection failures) with
//! backoff, within the export timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`). omegi
//! counts every attempt (a gRPC interceptor, a wrapper around the HTTP client),
//! so spans sent more than once are counted as retried, and spans the SDK
//! gave up on as failed. While the collector is slow or away, the queue fills
//! and further traces are dropped and counted there: tracing never waits.
//!
//! When tracing ends, the task sends what is left until the flush deadline
//! (`--flush-timeout`); spans still undelivered then are counted as failed.

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use opentelemetry::{
    trace::{
        Event, SpanContext, SpanId, SpanKind, Status as OtelStatus, TraceFlags, TraceId, TraceState,
    },
    InstrumentationScope, KeyValue,
};
use opentelemetry_http::{hyper::HyperClient, HttpClient, HttpError};
use opentelemetry_otlp::{
    tonic_types::transport::{Certificate, ClientTlsConfig},
    Protocol, WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _,
};
use opentelemetry_sdk::{
    resource::EnvResourceDetector,
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
    Resource,
};
use tokio::sync::mpsc;

use super::{json, sampling, ExportContext, ExporterStats};
use crate::{
    assembly::{Span, Status, Trace},
    config::otlp::{OtlpOptions, OtlpProtocol},
    export::errors,
    http::{AttributeValue, Side},
};

/// Most spans in one request (the SDK's default batch size).
pub const MAX_BATCH_SPANS: usize = 512;

/// How often a running export looks at the shutdown deadline.
const DEADLINE_CHECK: Duration = Duration::from_millis(50);

/// An error of a traced call, as OpenTelemetry's `exception` event carries it.
///
/// Built from omegi's model in one place ([`exception`]); richer error
/// detection (the exception's type, the program's own stack) fills the same
/// fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exception {
    /// `exception.type`, when known.
    pub kind: Option<String>,
    /// `exception.message`.
    pub message: String,
    /// `exception.stacktrace`: the traced calls the error passed through,
    /// innermost first.
    pub stacktrace: String,
}

/// The error `span` ended with, if any: the trace's [`ErrorInfo`] whose
/// flow passes through the span (type, message, the stack with call-site
/// lines), or, for an error status without one, the status text and the
/// chain of traced callers.
pub fn exception(trace: &Trace, span: &Span, context: &ExportContext) -> Option<Exception> {
    let Status::Error(message) = &span.status else {
        return None;
    };
    let error = trace
        .errors
        .iter()
        .find(|error| error.flow.iter().any(|step| step.span_id == span.span_id));
    Some(match error {
        Some(error) => Exception {
            kind: Some(error.type_name.clone()),
            message: if error.message.is_empty() {
                error.type_name.clone()
            } else {
                error.message.clone()
            },
            stacktrace: errors::stacktrace(error, &context.functions),
        },
        None => Exception {
            kind: None,
            message: message.clone(),
            stacktrace: call_path(trace, span, context),
        },
    })
}

/// The chain of traced calls from `span` up to its trace's root, one per
/// line, innermost first: `at name (file:line)`, the line being where the
/// function starts.
pub fn call_path(trace: &Trace, span: &Span, context: &ExportContext) -> String {
    let by_id: HashMap<u64, &Span> = trace.spans.iter().map(|s| (s.span_id, s)).collect();
    let mut lines = Vec::new();
    let mut current = Some(span);
    while let Some(call) = current {
        let function = context.functions.get(call.fn_id);
        let name = function.map_or("?", |f| f.name.as_str());
        let location = function.and_then(|f| f.location());
        lines.push(match location {
            Some(location) => format!("at {name} ({location})"),
            None => format!("at {name}"),
        });
        if lines.len() > trace.spans.len() {
            break; // A cycle cannot happen; do not loop if it did.
        }
        current = match call.parent_span_id {
            0 => {
                if let Some(caller) = call.caller_span_id {
                    lines.push(format!(
                        "at … (called by span {} of another trace)",
                        json::span_id_hex(caller)
                    ));
                }
                None
            }
            parent => {
                let found = by_id.get(&parent).copied();
                if found.is_none() {
                    lines.push(format!(
                        "at … (span {}, in another piece of this trace)",
                        json::span_id_hex(parent)
                    ));
                }
                found
            }
        };
    }
    lines.join("\n")
}

/// The `exception` event of the semantic conventions.
pub fn exception_event(exception: Exception, at: SystemTime) -> Event {
    let mut fields = Vec::with_capacity(3);
    if let Some(kind) = exception.kind {
        fields.push(KeyValue::new("exception.type", kind));
    }
    fields.push(KeyValue::new("exception.message", exception.message));
    fields.push(KeyValue::new("exception.stacktrace", exception.stacktrace));
    Event::new("exception", at, fields, 0)
}

fn unix_time(ns: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
}

/// The scope every omegi span is reported under.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("omegi")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// The resource: `service.name` from `OMEGI_SERVICE_NAME`, the traced
/// executable, and whatever `OTEL_RESOURCE_ATTRIBUTES` adds.
pub fn resource(context: &ExportContext) -> Resource {
    Resource::builder_empty()
        .with_detector(Box::new(EnvResourceDetector::new()))
        .with_attribute(KeyValue::new(
            "process.executable.path",
            context.functions.binary.display().to_string(),
        ))
        .with_service_name(context.service_name.clone())
        .build()
}

/// One omegi span as OpenTelemetry span data, with omegi's ids and times.
///
/// Attributes by the OpenTelemetry semantic conventions (`code.function`,
/// `code.filepath`, `code.lineno`, `thread.id`), `process.pid`, and omegi's
/// own (`omegi.end`, `omegi.caller.span_id`, `omegi.trace.partial`), as in
/// the JSON format ([`json::span_json`]). An error becomes the span's status
/// and an `exception` event at the span's end.
pub fn span_data(
    trace: &Trace,
    span: &Span,
    context: &ExportContext,
    scope: &InstrumentationScope,
) -> SpanData {
    let function = context.functions.get(span.fn_id);
    let mut attributes = Vec::with_capacity(8);
    let mut trace_state = TraceState::NONE;
    let mut span_kind = SpanKind::Internal;
    if let Some(http) = &span.http {
        span_kind = match http.side {
            Side::Server => SpanKind::Server,
            Side::Client => SpanKind::Client,
        };
        for (key, value) in http.attributes() {
            if key == "w3c.tracestate" {
                // The caller's vendors' state goes on as the W3C field.
                if let AttributeValue::Text(text) = &value {
                    trace_state = text.parse().unwrap_or(TraceState::NONE);
                }
                continue;
            }
            attributes.push(match value {
                AttributeValue::Text(text) => KeyValue::new(key, text),
                AttributeValue::Int(number) => KeyValue::new(key, number),
            });
        }
    }
    if let Some(function) = function {
        attributes.push(KeyValue::new("code.function", function.name.clone()));
        if let Some(file) = &function.file {
            attributes.push(KeyValue::new("code.filepath", file.display().to_string()));
        }
        if let Some(line) = function.line {
            attributes.push(KeyValue::new("code.lineno", i64::from(line)));
        }
        if let Some(module) = &function.python_module {
            // The seed's own attributes for a Python function.
            attributes.push(KeyValue::new("module", module.clone()));
            attributes.push(KeyValue::new("name", function.symbol.clone()));
        }
    }
    attributes.push(KeyValue::new(span.runner_attribute(), i64::from(span.tid)));
    if !span.arguments.is_empty() {
        // The seed's: a string array.
        let arguments = span.arguments.iter().cloned().map(Into::into).collect();
        attributes.push(KeyValue::new(
            "arguments",
            opentelemetry::Value::Array(opentelemetry::Array::String(arguments)),
        ));
    }
    attributes.push(KeyValue::new("process.pid", i64::from(span.pid)));
    attributes.push(KeyValue::new("omegi.end", span.end.as_str()));
    if let Some(caller) = span.caller_span_id {
        attributes.push(KeyValue::new(
            "omegi.caller.span_id",
            json::span_id_hex(caller),
        ));
    }
    if !trace.complete {
        attributes.push(KeyValue::new("omegi.trace.partial", true));
    }

    let status = match &span.status {
        Status::Unset => OtelStatus::Unset,
        Status::Ok => OtelStatus::Ok,
        Status::Error(message) => OtelStatus::Error {
            description: Cow::Owned(message.clone()),
        },
    };
    let mut events = SpanEvents::default();
    if let Some(exception) = exception(trace, span, context) {
        events
            .events
            .push(exception_event(exception, unix_time(span.end_unix_ns)));
    }

    SpanData {
        span_context: SpanContext::new(
            TraceId::from(trace.trace_id),
            SpanId::from(span.span_id),
            TraceFlags::SAMPLED,
            false,
            trace_state,
        ),
        parent_span_id: SpanId::from(span.exported_parent_span_id()),
        parent_span_is_remote: span.remote_parent().is_some(),
        span_kind,
        name: Cow::Owned(json::span_name(span, context)),
        start_time: unix_time(span.start_unix_ns),
        end_time: unix_time(span.end_unix_ns),
        attributes,
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

/// What the transport saw of the current export: attempts and the last
/// transport-level error (the SDK reports only "network error").
#[derive(Debug, Default)]
struct Attempts {
    count: AtomicU32,
    last_error: Mutex<Option<String>>,
}

impl Attempts {
    fn start(&self) {
        self.count.store(0, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The HTTP client the SDK sends through: hyper, counting attempts.
#[derive(Debug)]
struct CountingClient {
    inner: Arc<dyn HttpClient>,
    attempts: Arc<Attempts>,
}

#[async_trait]
impl HttpClient for CountingClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        self.attempts.count.fetch_add(1, Ordering::Relaxed);
        let result = self.inner.send_bytes(request).await;
        let error = match &result {
            Err(error) => Some(error_chain(error.as_ref())),
            Ok(response) if !response.status().is_success() => {
                Some(format!("HTTP status {}", response.status()))
            }
            Ok(_) => None,
        };
        if error.is_some() {
            *self
                .attempts
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = error;
        }
        result
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn build_exporter(
    options: &OtlpOptions,
    attempts: &Arc<Attempts>,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let https = options
        .endpoint
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| uri.scheme_str().map(|s| s.eq_ignore_ascii_case("https")))
        .unwrap_or(false);
    // Endpoint, protocol, timeout and TLS are given here; headers and
    // compression the SDK reads from the (already checked) environment.
    let exporter = match options.protocol {
        OtlpProtocol::Grpc => {
            let attempts = Arc::clone(attempts);
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(options.endpoint.clone())
                .with_protocol(Protocol::Grpc)
                .with_timeout(options.timeout)
                .with_interceptor(move |request| {
                    attempts.count.fetch_add(1, Ordering::Relaxed);
                    Ok(request)
                });
            if https {
                builder = builder.with_tls_config(grpc_tls(options)?);
            }
            builder.build()
        }
        OtlpProtocol::HttpProtobuf => {
            let inner: Arc<dyn HttpClient> = if https {
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(rustls_config(options)?)
                    .https_or_http()
                    .enable_http1()
                    .build();
                Arc::new(HyperClient::new(connector, options.timeout, None))
            } else {
                Arc::new(HyperClient::with_default_connector(options.timeout, None))
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(options.endpoint.clone())
                .with_protocol(Protocol::HttpBinary)
                .with_timeout(options.timeout)
                .with_http_client(CountingClient {
                    inner,
                    attempts: Arc::clone(attempts),
                })
                .build()
        }
    };
    exporter.with_context(|| {
        format!(
            "cannot set up the OTLP exporter ({} to {})",
            options.protocol.as_str(),
            options.endpoint
        )
    })
}

/// The certificates an `https://` collector is checked against: the file in
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`, else the system's.
fn trusted_roots(options: &OtlpOptions) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    match &options.ca_certificates {
        Some(file) => {
            let (added, _) = roots.add_parsable_certificates(file.certificates());
            if added == 0 {
                anyhow::bail!(
                    "no usable CA certificate in {} (OTEL_EXPORTER_OTLP_CERTIFICATE)",
                    file.path.display()
                );
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                anyhow::bail!(
                    "no CA certificates found on this system to check {} against: install them \
                     (Debian: ca-certificates) or name a PEM file in \
                     OTEL_EXPORTER_OTLP_CERTIFICATE",
                    options.endpoint
                );
            }
        }
    }
    Ok(roots)
}

fn rustls_config(options: &OtlpOptions) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS set-up")?
        .with_root_certificates(trusted_roots(options)?)
        .with_no_client_auth())
}

fn grpc_tls(options: &OtlpOptions) -> anyhow::Result<ClientTlsConfig> {
    // Checked here so that a missing store fails at start, not at export.
    trusted_roots(options)?;
    Ok(match &options.ca_certificates {
        Some(file) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&file.pem)),
        None => ClientTlsConfig::new().with_native_roots(),
    })
}

/// A span waiting to be sent, and whether it is its trace's last one here.
type Pending = (SpanData, bool);

/// The exporter's task.
struct Worker {
    exporter: opentelemetry_otlp::SpanExporter,
    attempts: Arc<Attempts>,
    context: Arc<ExportContext>,
    scope: InstrumentationScope,
    endpoint: String,
    /// Longest one export may take before it is given up (the SDK bounds it
    /// by the export timeout already; this is a safety net).
    export_limit: Duration,
    flush_timeout: Duration,
    /// Set once the queue is closed: when the flush ends.
    deadline: Option<Instant>,
    /// The last export failed (failures are reported once until one succeeds).
    failing: bool,
}

/// Starts the OTLP exporter's task on the current tokio runtime.
pub fn spawn(
    options: &OtlpOptions,
    flush_timeout: Duration,
    context: Arc<ExportContext>,
    queue: mpsc::Receiver<Arc<Trace>>,
    stats: Arc<ExporterStats>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let attempts = Arc::new(Attempts::default());
    let mut exporter = build_exporter(options, &attempts)?;
    exporter.set_resource(&resource(&context));
    tracing::info!(
        "otlp: exporting to {} ({})",
        options.endpoint,
        options.protocol.as_str()
    );
    let worker = Worker {
        exporter,
        attempts,
        context,
        scope: scope(),
        endpoint: options.endpoint.clone(),
        export_limit: options.timeout * 2 + Duration::from_secs(1),
        flush_timeout,
        deadline: None,
        failing: false,
    };
    Ok(tokio::spawn(worker.run(queue, stats)))
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::Receiver<Arc<Trace>>, stats: Arc<ExporterStats>) {
        let mut pending: Vec<Pending> = Vec::new();
        let mut undelivered = 0;
        loop {
            if pending.is_empty() {
                match queue.recv().await {
                    Some(trace) => self.take(&trace, &mut pending, &stats),
                    None => break,
                }
            }
            // Whatever else is queued already goes in the same request.
            while pending.len() < MAX_BATCH_SPANS {
                match queue.try_recv() {
                    Ok(trace) => self.take(&trace, &mut pending, &stats),
                    Err(_) => break,
                }
            }
            if pending.is_empty() {
                continue;
            }
            let rest = pending.split_off(pending.len().min(MAX_BATCH_SPANS));
            let request = std::mem::replace(&mut pending, rest);
            let cut = self.deliver(request, &queue, &stats).await;
            if cut > 0 || self.deadline_passed(&queue) {
                undelivered = cut;
                break;
            }
        }

        // Past the flush deadline: what is left will not be delivered.
        undelivered += pending.len() as u64;
        queue.close();
        while let Ok(trace) = queue.try_recv() {
            if sampling::keep(&trace) {
                undelivered += trace.spans.len() as u64;
            } else {
                stats
                    .sampled_out_spans
                    .fetch_add(trace.spans.len() as u64, Ordering::Relaxed);
            }
        }
        if undelivered > 0 {
            stats.failed_spans.fetch_add(undelivered, Ordering::Relaxed);
            tracing::warn!(
                "otlp: {undelivered} spans still undelivered at the flush deadline ({})",
                humantime::format_duration(self.flush_timeout)
            );
        }
        let _ = self.exporter.shutdown_with_timeout(Duration::from_secs(1));
    }

    /// Adds the spans of `trace` to `pending`, if the sampling keeps it.
    fn take(&self, trace: &Trace, pending: &mut Vec<Pending>, stats: &ExporterStats) {
        if !sampling::keep(trace) {
            stats
                .sampled_out_spans
                .fetch_add(trace.spans.len() as u64, Ordering::Relaxed);
            return;
        }
        let last = trace.spans.len().saturating_sub(1);
        pending.extend(trace.spans.iter().enumerate().map(|(index, span)| {
            (
                span_data(trace, span, &self.context, &self.scope),
                index == last,
            )
        }));
    }

    /// The flush deadline, once the queue is closed.
    fn deadline(&mut self, queue: &mpsc::Receiver<Arc<Trace>>) -> Option<Instant> {
        if self.deadline.is_none() && queue.is_closed() {
            self.deadline = Some(Instant::now() + self.flush_timeout);
        }
        self.deadline
    }

    fn deadline_passed(&mut self, queue: &mpsc::Receiver<Arc<Trace>>) -> bool {
        self.deadline(queue)
            .is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// Sends one request and counts the outcome. Returns the number of spans
    /// still undelivered when the flush deadline cut the request short (the
    /// caller counts them), else 0.
    async fn deliver(
        &mut self,
        request: Vec<Pending>,
        queue: &mpsc::Receiver<Arc<Trace>>,
        stats: &ExporterStats,
    ) -> u64 {
        let spans = request.len() as u64;
        let traces = request.iter().filter(|(_, last)| *last).count() as u64;
        let batch: Vec<SpanData> = request.into_iter().map(|(span, _)| span).collect();

        self.attempts.start();
        let started = Instant::now();
        let result = {
            let export = self.exporter.export(batch);
            tokio::pin!(export);
            let mut check = tokio::time::interval(DEADLINE_CHECK);
            loop {
                tokio::select! {
                    result = &mut export => break result.map_err(|e| e.to_string()),
                    _ = check.tick() => {
                        if self.deadline.is_none() && queue.is_closed() {
                            self.deadline = Some(Instant::now() + self.flush_timeout);
                        }
                        if self.deadline.is_some_and(|d| Instant::now() >= d) {
                            return spans;
                        }
                        if started.elapsed() > self.export_limit {
                            break Err(format!(
                                "no answer within {}",
                                humantime::format_duration(self.export_limit)
                            ));
                        }
                    }
                }
            }
        };

        if self.attempts.count.load(Ordering::Relaxed) > 1 {
            stats.retried_spans.fetch_add(spans, Ordering::Relaxed);
        }
        match result {
            Ok(()) => {
                stats.spans.fetch_add(spans, Ordering::Relaxed);
                stats.traces.fetch_add(traces, Ordering::Relaxed);
                if self.failing {
                    self.failing = false;
                    tracing::info!("otlp: delivering to {} again", self.endpoint);
                }
                0
            }
            Err(error) => {
                stats.failed_spans.fetch_add(spans, Ordering::Relaxed);
                let detail = self
                    .attempts
                    .last_error()
                    .map(|cause| format!(" ({cause})"))
                    .unwrap_or_default();
                if self.failing {
                    tracing::debug!("otlp: {spans} spans not delivered: {error}{detail}");
                } else {
                    self.failing = true;
                    tracing::warn!(
                        "otlp: cannot deliver {spans} spans to {}: {error}{detail}; going on, \
                         failed spans are counted",
                        self.endpoint
                    );
                }
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        assembly::SpanEnd,
        discovery::{Function, FunctionTable},
    };
    use opentelemetry::Value;

    fn context() -> ExportContext {
        let function = |id: u32, name: &str, line| {
            Function::described(id, name, Some("/app/src/main.c"), Some(line))
        };
        ExportContext {
            functions: Arc::new(FunctionTable::from_functions(
                "/app/server",
                vec![
                    function(0, "main", 10),
                    function(1, "work", 20),
                    function(2, "parse", 30),
                ],
            )),
            service_name: "svc".into(),
            project_root: "/app".into(),
        }
    }

    fn span(id: u64, parent: u64, fn_id: u32, status: Status) -> Span {
        Span {
            span_id: id,
            parent_span_id: parent,
            caller_span_id: None,
            http: None,
            arguments: Vec::new(),
            fn_id,
            pid: 7,
            tid: 8,
            goroutine: false,
            start_unix_ns: 1_700_000_000_000_000_000 + id,
            end_unix_ns: 1_700_000_000_000_001_000 - id,
            end: SpanEnd::Returned,
            status,
        }
    }

    fn attribute<'a>(data: &'a [KeyValue], key: &str) -> Option<&'a Value> {
        data.iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    fn error_trace() -> Trace {
        Trace {
            trace_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            spans: vec![
                span(3, 2, 2, Status::Error("bad input".into())),
                span(2, 1, 1, Status::Unset),
                span(1, 0, 0, Status::Unset),
            ],
            complete: true,
            sampled: false,
            errors: Vec::new(),
        }
    }

    #[test]
    fn ids_times_and_attributes_are_omegis() {
        let trace = error_trace();
        let context = context();
        let data = span_data(&trace, &trace.spans[1], &context, &scope());
        assert_eq!(
            data.span_context.trace_id().to_string(),
            json::trace_id_hex(trace.trace_id)
        );
        assert_eq!(data.span_context.span_id(), SpanId::from(2));
        assert_eq!(data.parent_span_id, SpanId::from(1));
        assert!(data.span_context.is_sampled());
        assert_eq!(data.span_kind, SpanKind::Internal);
        assert_eq!(data.name, "work");
        assert_eq!(
            data.start_time,
            unix_time(trace.spans[1].start_unix_ns),
            "start time kept to the nanosecond"
        );
        assert_eq!(data.end_time, unix_time(trace.spans[1].end_unix_ns));
        let attrs = &data.attributes;
        assert_eq!(
            attribute(attrs, "code.function"),
            Some(&Value::from("work"))
        );
        assert_eq!(
            attribute(attrs, "code.filepath"),
            Some(&Value::from("/app/src/main.c"))
        );
        assert_eq!(attribute(attrs, "code.lineno"), Some(&Value::I64(20)));
        assert_eq!(attribute(attrs, "thread.id"), Some(&Value::I64(8)));
        assert_eq!(attribute(attrs, "process.pid"), Some(&Value::I64(7)));
        assert_eq!(
            attribute(attrs, "omegi.end"),
            Some(&Value::from("returned"))
        );
        assert_eq!(attribute(attrs, "omegi.trace.partial"), None);
        assert_eq!(data.status, OtelStatus::Unset);
        assert!(data.events.is_empty());
        assert_eq!(data.instrumentation_scope.name(), "omegi");

        let root = span_data(&trace, &trace.spans[2], &context, &scope());
        assert_eq!(root.parent_span_id, SpanId::INVALID);
    }

    #[test]
    fn an_error_is_a_status_and_an_exception_event() {
        let trace = error_trace();
        let data = span_data(&trace, &trace.spans[0], &context(), &scope());
        assert_eq!(
            data.status,
            OtelStatus::Error {
                description: "bad input".into()
            }
        );
        assert_eq!(data.events.len(), 1);
        let event = &data.events[0];
        assert_eq!(event.name, "exception");
        assert_eq!(event.timestamp, data.end_time);
        assert_eq!(
            attribute(&event.attributes, "exception.message"),
            Some(&Value::from("bad input"))
        );
        assert_eq!(
            attribute(&event.attributes, "exception.stacktrace"),
            Some(&Value::from(
                "at parse (/app/src/main.c:30)\nat work (/app/src/main.c:20)\nat main (/app/src/main.c:10)"
            ))
        );
        // Unknown until error detection supplies it.
        assert_eq!(attribute(&event.attributes, "exception.type"), None);
    }

    #[test]
    fn exception_mapping() {
        let trace = error_trace();
        assert_eq!(
            exception(&trace, &trace.spans[0], &context()),
            Some(Exception {
                kind: None,
                message: "bad input".into(),
                stacktrace: "at parse (/app/src/main.c:30)\nat work (/app/src/main.c:20)\n\
                             at main (/app/src/main.c:10)"
                    .into(),
            })
        );
        assert_eq!(exception(&trace, &trace.spans[1], &context()), None);

        // With a type (from richer error detection), the event carries it.
        let event = exception_event(
            Exception {
                kind: Some("SIGSEGV".into()),
                message: "invalid read".into(),
                stacktrace: "at f".into(),
            },
            unix_time(5),
        );
        assert_eq!(
            attribute(&event.attributes, "exception.type"),
            Some(&Value::from("SIGSEGV"))
        );
        assert_eq!(event.timestamp, unix_time(5));
        assert_eq!(event.attributes.len(), 3);
    }

    #[test]
    fn call_paths_say_where_they_are_cut() {
        let mut trace = error_trace();
        trace.spans.truncate(2); // The root went out in another piece.
        trace.complete = false;
        let path = call_path(&trace, &trace.spans[0], &context());
        assert_eq!(
            path,
            "at parse (/app/src/main.c:30)\nat work (/app/src/main.c:20)\n\
             at … (span 0000000000000001, in another piece of this trace)"
        );
        let data = span_data(&trace, &trace.spans[0], &context(), &scope());
        assert_eq!(
            attribute(&data.attributes, "omegi.trace.partial"),
            Some(&Value::Bool(true))
        );

        let mut split = span(9, 0, 1, Status::Error("x".into()));
        split.caller_span_id = Some(0xabc);
        let trace = Trace {
            trace_id: 5,
            spans: vec![split],
            complete: true,
            sampled: true,
            errors: Vec::new(),
        };
        let path = call_path(&trace, &trace.spans[0], &context());
        assert_eq!(
            path,
            "at work (/app/src/main.c:20)\nat … (called by span 0000000000000abc of another trace)"
        );
    }

    #[test]
    fn the_resource_names_the_service() {
        let resource = resource(&context());
        assert_eq!(
            resource.get(&opentelemetry::Key::new("service.name")),
            Some(Value::from("svc"))
        );
        assert_eq!(
            resource.get(&opentelemetry::Key::new("process.executable.path")),
            Some(Value::from("/app/server"))
        );
    }
}
