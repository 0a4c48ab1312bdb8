//! HTTP spans: the requests a traced process serves (`SERVER`) and makes
//! (`CLIENT`) on TCP sockets, and the W3C trace context they carry in.
//!
//! The kernel (`omegi-ebpf/src/http.rs`) recognises a request by its first
//! bytes on a socket, keeps the span in the thread's shadow stack so that the
//! calls made while answering it are its children, and copies the message's
//! bytes here under the span's id. This module parses them; assembly asks it
//! for the [`HttpSpan`] of an HTTP span when the span ends, and for the
//! caller's trace context as soon as a request's head is in, so that the
//! whole trace takes the caller's trace id.

pub mod parse;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
};

use omegi_common::{http_part, Endpoint, HttpEvent, HTTP_MAX_COPY};

pub use parse::{RequestHead, TraceParent};

/// What omegi does with HTTP (`--propagation`, `OMEGI_PROPAGATION`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Propagation {
    /// HTTP/1.x SERVER and CLIENT spans; an incoming `traceparent` makes the
    /// server's trace continue the caller's.
    #[default]
    Read,
    /// No HTTP spans: the traced functions only.
    Off,
}

/// Which side of a request a span is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// What an HTTP span knows of its request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpSpan {
    pub side: Side,
    /// `None` when the request's head never came in whole.
    pub request: Option<RequestHead>,
    pub status: Option<u16>,
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
}

impl HttpSpan {
    /// The span name: `METHOD /path` (`HTTP` when the head was not seen).
    pub fn name(&self) -> String {
        match &self.request {
            Some(head) => format!("{} {}", head.method, head.path),
            None => "HTTP".to_owned(),
        }
    }

    /// OpenTelemetry's span kind name.
    pub fn kind_name(&self) -> &'static str {
        match self.side {
            Side::Server => "SERVER",
            Side::Client => "CLIENT",
        }
    }

    /// A 5xx response (a server's or a client's) is an error.
    pub fn is_error_status(&self) -> bool {
        self.status.is_some_and(|status| status >= 500)
    }

    /// The caller's context this server span continues.
    pub fn remote_parent(&self) -> Option<TraceParent> {
        (self.side == Side::Server)
            .then(|| self.request.as_ref()?.traceparent)
            .flatten()
    }

    /// OpenTelemetry semantic-convention attributes (HTTP and network).
    pub fn attributes(&self) -> Vec<(&'static str, AttributeValue)> {
        let mut attributes = Vec::new();
        if let Some(head) = &self.request {
            attributes.push(("http.request.method", head.method.clone().into()));
            attributes.push(("url.path", head.path.clone().into()));
            attributes.push(("network.protocol.version", head.version.to_owned().into()));
        }
        if let Some(status) = self.status {
            attributes.push(("http.response.status_code", i64::from(status).into()));
        }
        match self.side {
            Side::Server => {
                if let Some(local) = self.local {
                    attributes.push(("server.port", i64::from(local.port()).into()));
                }
                if let Some(peer) = self.peer {
                    attributes.push(("client.address", peer.ip().to_string().into()));
                    attributes.push(("client.port", i64::from(peer.port()).into()));
                }
            }
            Side::Client => {
                let host = self.request.as_ref().and_then(|head| head.host.clone());
                let address = host
                    .map(|host| {
                        host.rsplit_once(':')
                            .map_or(host.clone(), |(name, _)| name.to_owned())
                    })
                    .or_else(|| self.peer.map(|peer| peer.ip().to_string()));
                if let Some(address) = address {
                    attributes.push(("server.address", address.into()));
                }
                if let Some(peer) = self.peer {
                    attributes.push(("server.port", i64::from(peer.port()).into()));
                }
            }
        }
        if let Some(state) = self
            .request
            .as_ref()
            .filter(|_| self.side == Side::Server)
            .and_then(|head| head.tracestate.clone())
        {
            attributes.push(("w3c.tracestate", state.into()));
        }
        attributes
    }
}

/// An attribute value: text or a number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttributeValue {
    Text(String),
    Int(i64),
}

impl From<String> for AttributeValue {
    fn from(value: String) -> Self {
        Self::Text(value)
    }
}

impl From<i64> for AttributeValue {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

/// What went wrong with HTTP messages, reported in the summary.
#[derive(Debug, Default)]
pub struct HttpStats {
    /// `traceparent` headers ignored as malformed.
    pub malformed_traceparents: AtomicU64,
    /// Requests whose bytes were not HTTP/1.x after all (their spans are
    /// dropped), or whose head did not fit in the bytes copied.
    pub unparsable_requests: AtomicU64,
    /// Messages forgotten because too many were open at once.
    pub forgotten: AtomicU64,
}

/// Open messages kept at most: requests that never end (a client that
/// stopped mid-head) must not grow the agent without bound.
const MAX_OPEN: usize = 65_536;

struct Message {
    side: Side,
    bytes: Vec<u8>,
    head: Option<RequestHead>,
    /// The head can no longer complete (not HTTP, or too large).
    settled: bool,
    status: Option<u16>,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
}

/// Collects the bytes of open HTTP messages by span id.
#[derive(Default)]
pub struct Messages {
    open: HashMap<u64, Message>,
    stats: std::sync::Arc<HttpStats>,
}

impl Messages {
    pub fn new(stats: std::sync::Arc<HttpStats>) -> Self {
        Self {
            open: HashMap::new(),
            stats,
        }
    }

    /// Takes bytes from the kernel; returns the caller's context when this
    /// completed the head of a server request that carries one.
    pub fn on_event(&mut self, event: &HttpEvent) -> Option<TraceParent> {
        let side = match event.part {
            http_part::SERVER_REQUEST | http_part::SERVER_RESPONSE => Side::Server,
            _ => Side::Client,
        };
        if !self.open.contains_key(&event.span_id) && self.open.len() >= MAX_OPEN {
            self.stats.forgotten.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let message = self.open.entry(event.span_id).or_insert_with(|| Message {
            side,
            bytes: Vec::new(),
            head: None,
            settled: false,
            status: None,
            local: socket_address(&event.local),
            peer: socket_address(&event.peer),
        });
        let data = &event.data[..(event.len as usize).min(event.data.len())];
        match event.part {
            http_part::SERVER_RESPONSE | http_part::CLIENT_RESPONSE => {
                if message.status.is_none() {
                    message.status = parse::response_status(data);
                }
                None
            }
            _ => {
                if message.settled {
                    return None;
                }
                message.bytes.extend_from_slice(data);
                match parse::request_head(&message.bytes) {
                    parse::Parsed::Complete(head) => {
                        message.settled = true;
                        message.bytes = Vec::new();
                        if head.malformed_traceparent {
                            self.stats
                                .malformed_traceparents
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        let parent = (side == Side::Server).then_some(head.traceparent).flatten();
                        message.head = Some(head);
                        parent
                    }
                    parse::Parsed::Partial if message.bytes.len() < HTTP_MAX_COPY as usize => None,
                    parse::Parsed::Partial => {
                        // A head larger than what is copied: its request
                        // line stands, its headers are not trusted.
                        message.settled = true;
                        message.head = parse::request_line(&message.bytes);
                        message.bytes = Vec::new();
                        self.stats
                            .unparsable_requests
                            .fetch_add(1, Ordering::Relaxed);
                        None
                    }
                    parse::Parsed::Invalid => {
                        message.settled = true;
                        message.bytes = Vec::new();
                        None
                    }
                }
            }
        }
    }

    /// The span `span_id` ended: what is known of its request. A request
    /// whose bytes were lost (a full ring buffer, counted there) or were not
    /// HTTP after all (counted here) is a span named `HTTP` with no request.
    pub fn take(&mut self, span_id: u64, side: Side) -> HttpSpan {
        let Some(message) = self.open.remove(&span_id) else {
            return HttpSpan {
                side,
                request: None,
                status: None,
                local: None,
                peer: None,
            };
        };
        let request = match message.head {
            Some(head) => Some(head),
            // The head never completed: what its request line says.
            None if !message.settled && !message.bytes.is_empty() => {
                parse::request_line(&message.bytes)
            }
            None => None,
        };
        if request.is_none() && (message.settled || !message.bytes.is_empty()) {
            self.stats
                .unparsable_requests
                .fetch_add(1, Ordering::Relaxed);
        }
        HttpSpan {
            side: message.side,
            request,
            status: message.status,
            local: message.local,
            peer: message.peer,
        }
    }
}

fn socket_address(endpoint: &Endpoint) -> Option<SocketAddr> {
    let ip = match endpoint.family {
        2 => IpAddr::V4(Ipv4Addr::new(
            endpoint.addr[0],
            endpoint.addr[1],
            endpoint.addr[2],
            endpoint.addr[3],
        )),
        10 => {
            let v6 = Ipv6Addr::from(endpoint.addr);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, endpoint.port))
}
