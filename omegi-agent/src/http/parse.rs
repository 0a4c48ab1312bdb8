//! HTTP/1.x heads and W3C trace context, from the bytes the kernel copied.

use std::fmt;

/// Headers parsed at most; a head with more is parsed again with room for
/// [`MAX_HEADERS_LARGE`] (a 16 KiB head holds at most ~4,000 short lines).
const MAX_HEADERS: usize = 64;
const MAX_HEADERS_LARGE: usize = 4096;

/// A request head: what the spans need of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target without its query (`url.path`).
    pub path: String,
    /// `1.0` or `1.1`.
    pub version: &'static str,
    pub host: Option<String>,
    /// The `traceparent` header, if it was there and valid.
    pub traceparent: Option<TraceParent>,
    /// Set when a `traceparent` header was there but malformed (ignored).
    pub malformed_traceparent: bool,
    pub tracestate: Option<String>,
}

/// What parsing a request's bytes so far gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The whole head is in.
    Complete(RequestHead),
    /// More bytes are needed.
    Partial,
    /// Not an HTTP/1.x request.
    Invalid,
}

/// Parses a request head from its first bytes.
pub fn request_head(bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => Parsed::Complete(head_of(&request)),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS_LARGE];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(bytes) {
                Ok(httparse::Status::Complete(_)) => Parsed::Complete(head_of(&request)),
                Ok(httparse::Status::Partial) => Parsed::Partial,
                Err(_) => Parsed::Invalid,
            }
        }
        Err(_) => Parsed::Invalid,
    }
}

/// The request line alone, for a head that never completed within the
/// bytes copied (a huge header block): its headers are not trusted.
pub fn request_line(bytes: &[u8]) -> Option<RequestHead> {
    let end = bytes.windows(2).position(|pair| pair == b"\r\n")?;
    let line = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let version = match version {
        "HTTP/1.1" => "1.1",
        "HTTP/1.0" => "1.0",
        _ => return None,
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    Some(RequestHead {
        method: method.to_owned(),
        path: path_of(target),
        version,
        ..RequestHead::default()
    })
}

fn head_of(request: &httparse::Request<'_, '_>) -> RequestHead {
    let mut head = RequestHead {
        method: request.method.unwrap_or_default().to_owned(),
        path: path_of(request.path.unwrap_or_default()),
        version: if request.version == Some(0) {
            "1.0"
        } else {
            "1.1"
        },
        ..RequestHead::default()
    };
    let mut traceparents = 0;
    for header in request.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        if header.name.eq_ignore_ascii_case("traceparent") {
            traceparents += 1;
            match TraceParent::parse(value.trim()) {
                Ok(parent) => head.traceparent = Some(parent),
                Err(_) => head.malformed_traceparent = true,
            }
        } else if header.name.eq_ignore_ascii_case("tracestate") {
            head.tracestate = Some(value.trim().to_owned());
        } else if header.name.eq_ignore_ascii_case("host") {
            head.host = Some(value.trim().to_owned());
        }
    }
    // Two traceparent headers: which one is the caller's cannot be told.
    if traceparents > 1 {
        head.traceparent = None;
        head.malformed_traceparent = true;
    }
    if head.traceparent.is_none() {
        head.tracestate = None;
    }
    head
}

/// `target` without its query or fragment.
fn path_of(target: &str) -> String {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    target[..end].to_owned()
}

/// The status code of a response from its first bytes (its status line).
pub fn response_status(bytes: &[u8]) -> Option<u16> {
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut response = httparse::Response::new(&mut headers);
    // The status line is parsed before the headers: a partial head, or too
    // many headers for none, still has its code.
    let _ = response.parse(bytes);
    response.code
}

/// A W3C Trace Context `traceparent` (level 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

/// Why a `traceparent` was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    Shape,
    Version,
    ZeroId,
}

impl TraceParent {
    /// Parses `version-traceid-parentid-flags`: lower-case hex, version
    /// `ff` invalid, a later version's extra fields allowed, all-zero ids
    /// invalid.
    pub fn parse(value: &str) -> Result<Self, Malformed> {
        let bytes = value.as_bytes();
        if bytes.len() < 55 {
            return Err(Malformed::Shape);
        }
        let hex = |range: std::ops::Range<usize>| -> Result<u128, Malformed> {
            let part = &value[range];
            if !part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(Malformed::Shape);
            }
            u128::from_str_radix(part, 16).map_err(|_| Malformed::Shape)
        };
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(Malformed::Shape);
        }
        let version = hex(0..2)?;
        if version == 0xff {
            return Err(Malformed::Version);
        }
        // Version 00 has exactly these fields; a later one may add some
        // after a '-'.
        if (version == 0 && bytes.len() != 55) || (bytes.len() > 55 && bytes[55] != b'-') {
            return Err(Malformed::Shape);
        }
        let trace_id = hex(3..35)?;
        let parent_id = hex(36..52)? as u64;
        let flags = hex(53..55)? as u8;
        if trace_id == 0 || parent_id == 0 {
            return Err(Malformed::ZeroId);
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_valid_and_round_trips() {
        let parent = TraceParent::parse(VALID).unwrap();
        assert_eq!(parent.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(parent.parent_id, 0x00f067aa0ba902b7);
        assert_eq!(parent.flags, 1);
        assert_eq!(parent.to_string(), VALID);
        // A later version may carry more fields.
        assert!(TraceParent::parse(&format!("01{}-extra", &VALID[2..])).is_ok());
    }

    #[test]
    fn traceparent_malformed_is_refused_whole() {
        for (value, why) in [
            ("", Malformed::Shape),
            (&VALID[..54], Malformed::Shape),
            (&format!("{VALID}0"), Malformed::Shape),
            (&VALID.to_uppercase(), Malformed::Shape),
            (&VALID.replace('-', "_"), Malformed::Shape),
            (&format!("ff{}", &VALID[2..]), Malformed::Version),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                Malformed::ZeroId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                Malformed::ZeroId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                Malformed::Shape,
            ),
        ] {
            assert_eq!(TraceParent::parse(value), Err(why), "{value:?}");
        }
    }

    #[test]
    fn request_heads_whole_split_and_large() {
        let head = b"GET /orders/7?debug=1 HTTP/1.1\r\nHost: shop\r\nTRACEPARENT: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: a=b\r\n\r\n";
        let Parsed::Complete(parsed) = request_head(head) else {
            panic!("complete head");
        };
        assert_eq!(parsed.method, "GET");
        assert_eq!(parsed.path, "/orders/7");
        assert_eq!(parsed.version, "1.1");
        assert_eq!(parsed.host.as_deref(), Some("shop"));
        assert_eq!(parsed.traceparent.unwrap().parent_id, 0x00f067aa0ba902b7);
        assert_eq!(parsed.tracestate.as_deref(), Some("a=b"));
        assert_eq!(request_head(&head[..40]), Parsed::Partial);
        assert_eq!(request_head(b"\x16\x03\x01\x02\x00binary"), Parsed::Invalid);

        // 5 KiB of headers before the traceparent, and more headers than
        // the first try has room for.
        let mut big = b"POST /upload HTTP/1.0\r\n".to_vec();
        for index in 0..200 {
            big.extend_from_slice(format!("x-filler-{index}: {}\r\n", "y".repeat(20)).as_bytes());
        }
        big.extend_from_slice(format!("traceparent: {VALID}\r\n\r\nbody").as_bytes());
        let Parsed::Complete(parsed) = request_head(&big) else {
            panic!("complete large head");
        };
        assert_eq!(parsed.version, "1.0");
        assert!(parsed.traceparent.is_some());
    }

    #[test]
    fn two_traceparents_or_a_bad_one_are_ignored() {
        let head =
            format!("GET / HTTP/1.1\r\ntraceparent: {VALID}\r\ntraceparent: {VALID}\r\n\r\n");
        let Parsed::Complete(parsed) = request_head(head.as_bytes()) else {
            panic!()
        };
        assert!(parsed.traceparent.is_none() && parsed.malformed_traceparent);
        let head = "GET / HTTP/1.1\r\ntraceparent: 00-xyz\r\ntracestate: a=b\r\n\r\n";
        let Parsed::Complete(parsed) = request_head(head.as_bytes()) else {
            panic!()
        };
        assert!(parsed.traceparent.is_none() && parsed.malformed_traceparent);
        assert!(parsed.tracestate.is_none());
    }

    #[test]
    fn status_lines_and_request_lines() {
        assert_eq!(
            response_status(b"HTTP/1.1 503 Busy\r\nContent-Le"),
            Some(503)
        );
        assert_eq!(response_status(b"HTTP/1.1 20"), None);
        let line = request_line(b"DELETE /a/b?c HTTP/1.1\r\nx: y").unwrap();
        assert_eq!(
            (line.method.as_str(), line.path.as_str()),
            ("DELETE", "/a/b")
        );
        assert!(request_line(b"get / HTTP/1.1\r\n").is_none());
    }
}
