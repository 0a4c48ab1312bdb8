//! An OTLP collector for the tests: the real protocol, on loopback.
//!
//! [`Collector::start`] serves the OTLP trace service twice, over gRPC
//! (`opentelemetry.proto.collector.trace.v1.TraceService/Export`, the
//! `opentelemetry-proto` crate's tonic service) and over HTTP (`POST
//! /v1/traces` with a protobuf body, gzip or not), and keeps every request it
//! accepted. It can be told to refuse the next requests (gRPC `UNAVAILABLE`,
//! HTTP 503, which a client should retry).
//!
//! [`Collector::start_tls`] serves both over TLS, with a certificate from a
//! CA made for the test ([`TestCertificates`]).
//!
//! [`unreachable_endpoint`] and [`SilentCollector`] stand for a collector
//! that is down and one that never answers.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value, AnyValue, KeyValue},
    trace::v1::{ResourceSpans, Span},
};
use prost::Message;

/// The OTLP protobuf types, for tests to name (`proto::tonic::trace::v1::…`).
pub use opentelemetry_proto as proto;

/// Which OTLP transport a request came over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// One accepted export request.
#[derive(Clone, Debug)]
pub struct Received {
    pub transport: Transport,
    /// Request headers (gRPC metadata), keys lowercase.
    pub headers: BTreeMap<String, String>,
    pub resource_spans: Vec<ResourceSpans>,
}

#[derive(Default)]
struct State {
    received: Mutex<Vec<Received>>,
    /// Requests still to refuse.
    refuse: AtomicU32,
    /// Requests refused so far.
    refused: AtomicU32,
}

impl State {
    fn refuse_this_one(&self) -> bool {
        let refuse = self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        refuse
    }

    fn keep(&self, received: Received) {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(received);
    }
}

/// A running collector (stops when dropped).
pub struct Collector {
    runtime: Option<tokio::runtime::Runtime>,
    state: Arc<State>,
    grpc: SocketAddr,
    http: SocketAddr,
    scheme: &'static str,
}

impl Collector {
    /// Starts both servers on free loopback ports.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts both servers with TLS, presenting `certificates.server_pem`.
    pub fn start_tls(certificates: &TestCertificates) -> Self {
        Self::start_with(Some(certificates))
    }

    fn start_with(tls: Option<&TestCertificates>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("otlp-collector")
            .build()
            .expect("collector runtime");
        let state = Arc::new(State::default());
        let (grpc, http) = runtime.block_on(async {
            let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            (grpc, http)
        });
        let grpc_addr = grpc.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();

        let service = TraceServiceServer::new(GrpcService {
            state: Arc::clone(&state),
        })
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(
                    tonic::transport::Identity::from_pem(&tls.server_pem, &tls.key_pem),
                ))
                .expect("gRPC TLS");
        }
        runtime.spawn(async move {
            server
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc))
                .await
                .expect("gRPC collector");
        });
        let acceptor = tls.map(TestCertificates::acceptor);
        let http_state = Arc::clone(&state);
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = http.accept().await else {
                    continue;
                };
                let state = Arc::clone(&http_state);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve_http(state, stream).await;
                            }
                        }
                        None => serve_http(state, stream).await,
                    }
                });
            }
        });
        Self {
            runtime: Some(runtime),
            state,
            grpc: grpc_addr,
            http: http_addr,
            scheme: if tls.is_some() { "https" } else { "http" },
        }
    }

    /// `http://127.0.0.1:PORT` of the gRPC server (`https://` with TLS).
    pub fn grpc_endpoint(&self) -> String {
        format!("{}://{}", self.scheme, self.grpc)
    }

    /// `http://127.0.0.1:PORT` of the HTTP server (a base: the client adds
    /// `/v1/traces`; `https://` with TLS).
    pub fn http_endpoint(&self) -> String {
        format!("{}://{}", self.scheme, self.http)
    }

    /// Refuse the next `n` requests (as an overloaded collector does).
    pub fn refuse_next(&self, n: u32) {
        self.state.refuse.store(n, Ordering::SeqCst);
    }

    /// Requests refused so far.
    pub fn refused(&self) -> u32 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Every request accepted so far.
    pub fn requests(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every span accepted so far, with its resource and scope.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let mut spans = Vec::new();
        for request in self.requests() {
            for resource_spans in request.resource_spans {
                let resource = resource_spans
                    .resource
                    .map(|r| attributes(&r.attributes))
                    .unwrap_or_default();
                for scope_spans in resource_spans.scope_spans {
                    let scope = scope_spans.scope.map(|s| s.name).unwrap_or_default();
                    for span in scope_spans.spans {
                        spans.push(ReceivedSpan {
                            resource: resource.clone(),
                            scope: scope.clone(),
                            transport: request.transport,
                            span,
                        });
                    }
                }
            }
        }
        spans
    }

    /// Waits until at least `count` spans have arrived (or `timeout` passed),
    /// and returns what arrived.
    pub fn wait_for_spans(&self, count: usize, timeout: Duration) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= count || Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

struct GrpcService {
    state: Arc<State>,
}

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.state.refuse_this_one() {
            return Err(tonic::Status::unavailable("the test collector refuses"));
        }
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        self.state.keep(Received {
            transport: Transport::Grpc,
            headers,
            resource_spans: request.into_inner().resource_spans,
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn serve_http<IO>(state: Arc<State>, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| handle_http(Arc::clone(&state), request));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

async fn handle_http(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let reply = |status: StatusCode, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    if request.method() != hyper::Method::POST || request.uri().path() != "/v1/traces" {
        return Ok(reply(StatusCode::NOT_FOUND, Vec::new()));
    }
    let headers: BTreeMap<String, String> = request
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let body = request.into_body().collect().await?.to_bytes();
    if state.refuse_this_one() {
        return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, Vec::new()));
    }
    if headers.get("content-type").map(String::as_str) != Some("application/x-protobuf") {
        return Ok(reply(StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new()));
    }
    let body = match headers.get("content-encoding").map(String::as_str) {
        Some("gzip") => {
            let mut out = Vec::new();
            let decoded = std::io::Read::read_to_end(
                &mut flate2::read::GzDecoder::new(body.as_ref()),
                &mut out,
            );
            if decoded.is_err() {
                return Ok(reply(StatusCode::BAD_REQUEST, Vec::new()));
            }
            Bytes::from(out)
        }
        None => body,
        Some(_) => return Ok(reply(StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new())),
    };
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return Ok(reply(StatusCode::BAD_REQUEST, Vec::new()));
    };
    state.keep(Received {
        transport: Transport::Http,
        headers,
        resource_spans: export.resource_spans,
    });
    let response = ExportTraceServiceResponse {
        partial_success: None,
    };
    Ok(reply(StatusCode::OK, response.encode_to_vec()))
}

/// An attribute value, simplified for assertions.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
    Other(String),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

fn value(value: &Option<AnyValue>) -> Value {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Value::Str(s.clone()),
        Some(any_value::Value::IntValue(i)) => Value::Int(*i),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        Some(any_value::Value::DoubleValue(d)) => Value::Double(*d),
        other => Value::Other(format!("{other:?}")),
    }
}

/// Attributes by key.
pub fn attributes(list: &[KeyValue]) -> BTreeMap<String, Value> {
    list.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

/// One received span and where it came from.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub resource: BTreeMap<String, Value>,
    pub scope: String,
    pub transport: Transport,
    pub span: Span,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ReceivedSpan {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    /// 16 zeros for a root (the wire has no bytes then), as in omegi's JSON.
    pub fn parent_span_id(&self) -> String {
        if self.span.parent_span_id.is_empty() {
            "0".repeat(16)
        } else {
            hex(&self.span.parent_span_id)
        }
    }
    pub fn attributes(&self) -> BTreeMap<String, Value> {
        attributes(&self.span.attributes)
    }
    pub fn attr(&self, key: &str) -> Option<Value> {
        self.attributes().remove(key)
    }
}

/// An endpoint where nothing listens (a collector that is down).
pub fn unreachable_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// A collector that takes connections and never answers: the kernel accepts
/// them into the listen backlog, nobody reads.
pub struct SilentCollector {
    listener: std::net::TcpListener,
}

impl SilentCollector {
    pub fn start() -> Self {
        Self {
            listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.listener.local_addr().unwrap())
    }
}

/// A CA and a server certificate (for `127.0.0.1` and `localhost`) signed by
/// it, made fresh: what a TLS collector presents and a client must trust.
pub struct TestCertificates {
    /// The CA certificate, PEM: what `OTEL_EXPORTER_OTLP_CERTIFICATE` names.
    pub ca_pem: String,
    pub server_pem: String,
    pub key_pem: String,
}

impl TestCertificates {
    pub fn generate() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "omegi test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server
            .distinguished_name
            .push(DnType::CommonName, "omegi test collector");
        let server = server.signed_by(&key, &ca).unwrap();
        Self {
            ca_pem: ca.pem(),
            server_pem: server.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the CA certificate to `dir/ca.pem` and returns its path.
    pub fn write_ca(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(self.server_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}
