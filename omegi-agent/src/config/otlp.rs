//! Settings of the OTLP exporter: the standard `OTEL_EXPORTER_OTLP_*`
//! variables, checked at start like every other value.
//!
//! The OpenTelemetry SDK warns about a bad value and goes on with a default
//! (an unknown protocol becomes `http/protobuf`, a malformed header is left
//! out), which sends spans somewhere the user did not ask for. omegi reads the
//! variables itself and refuses a bad one with one line naming it.
//!
//! Honoured, the per-signal `…_TRACES_…` variable winning over the general
//! one, as the specification says:
//!
//! | variable | value |
//! | --- | --- |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` | `http/protobuf` (default) or `grpc` |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` | an `http://` or `https://` URL |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` | `key=value,…` (values may be %-encoded) |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` | milliseconds per export, retries included |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION` | `gzip` or `none` |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE` | a PEM file of the CA certificates to trust (https) |
//!
//! Client certificates (`…_CLIENT_KEY`, `…_CLIENT_CERTIFICATE`) are refused:
//! omegi does not send one, and ignoring them would fail later and obscurely.
//!
//! The general `OTEL_EXPORTER_OTLP_ENDPOINT` is a base URL: over HTTP
//! `/v1/traces` is appended to it; `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is used
//! as it is. An empty variable counts as unset.

use std::{path::PathBuf, time::Duration};

use rustls::pki_types::{pem::PemObject, CertificateDer};

use super::ConfigError;

pub const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
pub const TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
pub const TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
pub const TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
pub const COMPRESSION: &str = "OTEL_EXPORTER_OTLP_COMPRESSION";
pub const TRACES_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION";
pub const CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
pub const TRACES_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE";
/// Client (mutual) TLS: not supported.
pub const CLIENT_TLS: [&str; 4] = [
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
];

/// The specification's default export timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// Protobuf over HTTP `POST` (the specification's default).
    HttpProtobuf,
    /// gRPC (`TraceService/Export`).
    Grpc,
}

impl OtlpProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpProtobuf => "http/protobuf",
            Self::Grpc => "grpc",
        }
    }

    fn default_endpoint(self) -> &'static str {
        match self {
            Self::HttpProtobuf => "http://localhost:4318/v1/traces",
            Self::Grpc => "http://localhost:4317",
        }
    }
}

/// Settings of the OTLP exporter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpOptions {
    pub protocol: OtlpProtocol,
    /// The URL requests go to (for HTTP, with its `/v1/traces` path).
    pub endpoint: String,
    /// The longest one export may take, retries included.
    pub timeout: Duration,
    /// Headers (gRPC metadata) sent with every request. The SDK reads the
    /// variable itself; this is the checked form, for messages and tests.
    pub headers: Vec<(String, String)>,
    pub gzip: bool,
    /// The CA certificates to trust for an `https://` endpoint, instead of
    /// the system's (`OTEL_EXPORTER_OTLP_CERTIFICATE`).
    pub ca_certificates: Option<CaCertificates>,
}

/// A PEM file of CA certificates, read at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaCertificates {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

impl CaCertificates {
    /// The certificates in the file (at least one: checked at start).
    pub fn certificates(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(&self.pem)
            .filter_map(Result::ok)
            .collect()
    }
}

/// Reads a variable of the process environment (empty or absent: `None`).
pub fn os_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
}

impl OtlpOptions {
    /// Reads and checks the variables through `env`.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &'static str| {
            env(name)
                .filter(|value| !value.trim().is_empty())
                .map(|value| (name, value))
        };
        let first = |specific: &'static str, general: &'static str| var(specific).or(var(general));

        let protocol = match first(TRACES_PROTOCOL, PROTOCOL) {
            None => OtlpProtocol::HttpProtobuf,
            Some((name, value)) => parse_protocol(name, &value)?,
        };
        let endpoint = match (var(TRACES_ENDPOINT), var(ENDPOINT)) {
            (Some((name, value)), _) => check_endpoint(name, &value, protocol)?,
            (None, Some((name, value))) => {
                let base = check_endpoint(name, &value, protocol)?;
                match protocol {
                    OtlpProtocol::Grpc => base,
                    OtlpProtocol::HttpProtobuf => {
                        format!("{}/v1/traces", base.trim_end_matches('/'))
                    }
                }
            }
            (None, None) => protocol.default_endpoint().to_owned(),
        };
        let timeout = match first(TRACES_TIMEOUT, TIMEOUT) {
            None => DEFAULT_TIMEOUT,
            Some((name, value)) => parse_timeout(name, &value)?,
        };
        let headers = match first(TRACES_HEADERS, HEADERS) {
            None => Vec::new(),
            Some((name, value)) => parse_headers(name, &value)?,
        };
        let gzip = match first(TRACES_COMPRESSION, COMPRESSION) {
            None => false,
            Some((name, value)) => parse_compression(name, &value)?,
        };
        let ca_certificates = match first(TRACES_CERTIFICATE, CERTIFICATE) {
            None => None,
            Some((name, value)) => Some(read_ca_certificates(name, &value)?),
        };
        if let Some((name, value)) = CLIENT_TLS.iter().find_map(|name| var(name)) {
            return Err(ConfigError {
                name,
                value,
                expected: "unset: omegi does not support client certificates (mutual TLS) yet"
                    .into(),
            });
        }
        Ok(Self {
            protocol,
            endpoint,
            timeout,
            headers,
            gzip,
            ca_certificates,
        })
    }
}

fn parse_protocol(name: &'static str, value: &str) -> Result<OtlpProtocol, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
        "grpc" => Ok(OtlpProtocol::Grpc),
        _ => Err(ConfigError {
            name,
            value: value.into(),
            expected: "grpc or http/protobuf (http/json is not supported)".into(),
        }),
    }
}

/// An endpoint must be an absolute `http://` or `https://` URL with a host: a
/// schemeless `host:port` is refused rather than guessed at.
fn check_endpoint(
    name: &'static str,
    value: &str,
    protocol: OtlpProtocol,
) -> Result<String, ConfigError> {
    let example = match protocol {
        OtlpProtocol::Grpc => "http://collector:4317",
        OtlpProtocol::HttpProtobuf => "http://collector:4318",
    };
    let error = |why: &str| ConfigError {
        name,
        value: value.into(),
        expected: format!("{why}, such as {example}"),
    };
    let trimmed = value.trim();
    let uri: http::Uri = trimmed
        .parse()
        .map_err(|_| error("an http:// or https:// URL of the OTLP collector"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(error("an http:// or https:// URL of the OTLP collector"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(error("a URL with a host"));
    }
    if uri.query().is_some() {
        return Err(error("a URL without a query"));
    }
    Ok(trimmed.to_owned())
}

fn read_ca_certificates(name: &'static str, value: &str) -> Result<CaCertificates, ConfigError> {
    let error = |why: String| ConfigError {
        name,
        value: value.into(),
        expected: format!("a PEM file of CA certificates ({why})"),
    };
    let path = PathBuf::from(value.trim());
    let pem = std::fs::read(&path).map_err(|e| error(format!("cannot read it: {e}")))?;
    let certificates = CaCertificates { path, pem };
    if certificates.certificates().is_empty() {
        return Err(error("no certificate found in it".into()));
    }
    Ok(certificates)
}

fn parse_timeout(name: &'static str, value: &str) -> Result<Duration, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(ConfigError {
            name,
            value: value.into(),
            expected: "a positive number of milliseconds, e.g. 10000".into(),
        }),
    }
}

fn parse_compression(name: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "gzip" => Ok(true),
        "none" => Ok(false),
        _ => Err(ConfigError {
            name,
            value: value.into(),
            expected: "gzip or none".into(),
        }),
    }
}

/// `key=value,key=value`, values %-decoded (W3C Baggage style, as the
/// specification says). Parsed with the SDK's rules, but any entry the SDK
/// would silently leave out is an error here.
pub fn parse_headers(
    name: &'static str,
    value: &str,
) -> Result<Vec<(String, String)>, ConfigError> {
    let error = |entry: &str| ConfigError {
        name,
        // The whole value may hold a secret: show only the bad entry's key.
        value: entry
            .split('=')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        expected: "comma-separated key=value pairs, e.g. api-key=abc123,tenant=a \
                   (each key a valid header name, each value non-empty; %-encode \
                   commas and other special characters)"
            .into(),
    };
    let mut headers = Vec::new();
    for entry in value.split_terminator(',').map(str::trim) {
        if entry.is_empty() {
            continue;
        }
        let (key, raw) = entry.split_once('=').ok_or_else(|| error(entry))?;
        let (key, raw) = (key.trim(), raw.trim());
        let decoded = percent_decode(raw).unwrap_or_else(|| raw.to_owned());
        if key.is_empty()
            || decoded.is_empty()
            || http::HeaderName::from_bytes(key.as_bytes()).is_err()
            || http::HeaderValue::from_str(&decoded).is_err()
        {
            return Err(error(entry));
        }
        headers.push((key.to_owned(), decoded));
    }
    Ok(headers)
}

/// `%XX` decoding; `None` when an escape is malformed or the result is not
/// UTF-8 (the SDK then keeps the value as written).
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn options(vars: &[(&str, &str)]) -> Result<OtlpOptions, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpOptions::from_env(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_follow_the_specification() {
        let o = options(&[]).unwrap();
        assert_eq!(o.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(o.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(o.timeout, Duration::from_secs(10));
        assert!(o.headers.is_empty());
        assert!(!o.gzip);
        let o = options(&[(PROTOCOL, "grpc")]).unwrap();
        assert_eq!(o.endpoint, "http://localhost:4317");
    }

    #[test]
    fn the_general_endpoint_is_a_base_over_http() {
        let o = options(&[(ENDPOINT, "http://c:4318")]).unwrap();
        assert_eq!(o.endpoint, "http://c:4318/v1/traces");
        let o = options(&[(ENDPOINT, "http://c:4318/otlp/")]).unwrap();
        assert_eq!(o.endpoint, "http://c:4318/otlp/v1/traces");
        let o = options(&[(ENDPOINT, "http://c:4317"), (PROTOCOL, "GRPC")]).unwrap();
        assert_eq!(
            (o.protocol, o.endpoint.as_str()),
            (OtlpProtocol::Grpc, "http://c:4317")
        );
    }

    #[test]
    fn per_signal_variables_win_and_are_taken_as_they_are() {
        let o = options(&[
            (ENDPOINT, "http://wrong:1"),
            (TRACES_ENDPOINT, "http://c:9/custom"),
            (PROTOCOL, "grpc"),
            (TRACES_PROTOCOL, "http/protobuf"),
            (TIMEOUT, "1"),
            (TRACES_TIMEOUT, "2500"),
        ])
        .unwrap();
        assert_eq!(o.endpoint, "http://c:9/custom");
        assert_eq!(o.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(o.timeout, Duration::from_millis(2500));
        // Empty means unset.
        let o = options(&[(TRACES_ENDPOINT, ""), (ENDPOINT, "http://c:1")]).unwrap();
        assert_eq!(o.endpoint, "http://c:1/v1/traces");
    }

    #[test]
    fn bad_values_name_the_variable_and_what_it_accepts() {
        for (vars, variable, accepted) in [
            (vec![(PROTOCOL, "udp")], PROTOCOL, "grpc or http/protobuf"),
            (
                vec![(TRACES_PROTOCOL, "http/json")],
                TRACES_PROTOCOL,
                "grpc or http/protobuf",
            ),
            (
                vec![(ENDPOINT, "not a url")],
                ENDPOINT,
                "http:// or https:// URL",
            ),
            (
                vec![(ENDPOINT, "collector:4317")],
                ENDPOINT,
                "http:// or https:// URL",
            ),
            (
                vec![(ENDPOINT, "ftp://c/")],
                ENDPOINT,
                "http:// or https:// URL",
            ),
            (vec![(TRACES_ENDPOINT, "http://")], TRACES_ENDPOINT, "URL"),
            (
                vec![(ENDPOINT, "http://c/?q=1")],
                ENDPOINT,
                "without a query",
            ),
            (
                vec![(CERTIFICATE, "/nonexistent/ca.pem")],
                CERTIFICATE,
                "cannot read it",
            ),
            (
                vec![(TRACES_CERTIFICATE, "/proc/version")],
                TRACES_CERTIFICATE,
                "no certificate",
            ),
            (
                vec![("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem")],
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
                "mutual TLS",
            ),
            (vec![(TIMEOUT, "10s")], TIMEOUT, "milliseconds"),
            (vec![(COMPRESSION, "zstd")], COMPRESSION, "gzip or none"),
            (vec![(HEADERS, "a=1,b")], HEADERS, "key=value"),
            (vec![(HEADERS, "bad key=1")], HEADERS, "key=value"),
        ] {
            let error = options(&vars).unwrap_err();
            let line = error.to_string();
            assert_eq!(error.name, variable, "{line}");
            assert!(line.starts_with(variable), "{line}");
            assert!(line.contains(accepted), "{line}");
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn headers_are_decoded_and_secrets_not_echoed() {
        let o = options(&[(HEADERS, "api-key=s%20ecret, tenant = a=b ,")]).unwrap();
        assert_eq!(
            o.headers,
            vec![
                ("api-key".to_owned(), "s ecret".to_owned()),
                ("tenant".to_owned(), "a=b".to_owned())
            ]
        );
        let error = options(&[(HEADERS, "api-key=topsecret,broken")]).unwrap_err();
        assert!(!error.to_string().contains("topsecret"), "{error}");
    }

    #[test]
    fn https_endpoints_are_accepted() {
        let o = options(&[(ENDPOINT, "https://c.example:4318")]).unwrap();
        assert_eq!(o.endpoint, "https://c.example:4318/v1/traces");
        assert_eq!(o.ca_certificates, None);
    }

    #[test]
    fn compression() {
        assert!(options(&[(COMPRESSION, "GZIP")]).unwrap().gzip);
        assert!(
            !options(&[(COMPRESSION, "gzip"), (TRACES_COMPRESSION, "none")])
                .unwrap()
                .gzip
        );
    }
}
