//! A minimal HTTP/1.1 server side: one request at a time from a stream (keep-alive,
//! pipelining), Content-Length bodies only, hard limits on header and body size and on the
//! time a request may take to arrive.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::{ApiFault, ApiLimits};

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    pub keep_alive: bool,
}

/// Why no request was read.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed, went idle past the idle timeout, or the socket failed: just close.
    Closed,
    /// Answer with this fault, then close the connection.
    Reject(ApiFault),
}

/// The request line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub target: String,
    pub content_length: usize,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

/// Parses the head (without the final CRLF CRLF). `max_body` turns a large Content-Length
/// into 413 here, before any of the body is read.
pub fn parse_head(head: &[u8], max_body: usize) -> Result<Head, ApiFault> {
    let text = std::str::from_utf8(head)
        .map_err(|_| ApiFault::bad_request("the request head is not valid UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && t.starts_with('/') => (m, t, v),
        _ => {
            return Err(ApiFault::bad_request(format!(
                "malformed request line {:?}",
                truncate(request_line)
            )))
        }
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => {
            return Err(ApiFault::new(
                505,
                format!(
                    "HTTP version {:?} is not supported; use HTTP/1.1",
                    truncate(version)
                ),
            ))
        }
    };
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(|| {
            ApiFault::bad_request(format!("malformed header line {:?}", truncate(line)))
        })?;
        if name.is_empty() || name.contains(|c: char| c.is_whitespace()) {
            return Err(ApiFault::bad_request(format!(
                "malformed header name {:?}",
                truncate(name)
            )));
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    ApiFault::bad_request(format!("invalid Content-Length {:?}", truncate(value)))
                })?;
            if content_length.is_some_and(|c| c != n) {
                return Err(ApiFault::bad_request("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiFault::new(
                411,
                "Transfer-Encoding (chunked bodies) is not supported; send a Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(ApiFault::new(
                    417,
                    format!("unsupported Expect {:?}", truncate(value)),
                ));
            }
            expect_continue = true;
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > max_body {
        return Err(ApiFault::new(
            413,
            format!("the request body is {content_length} bytes; the limit is {max_body}"),
        ));
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        content_length,
        keep_alive,
        expect_continue,
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A server-side connection: the stream and the bytes read past the last request.
pub struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Reads into `buf` within `deadline` (or `idle` if no deadline yet); `Ok(0)` is EOF.
    fn fill(&mut self, timeout: Duration) -> io::Result<usize> {
        // A zero timeout means "block forever" to set_read_timeout.
        let timeout = timeout.max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(timeout))?;
        let mut chunk = [0u8; 4096];
        let n = loop {
            match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads the next request.
    pub fn read_request(&mut self, limits: &ApiLimits) -> Result<Request, ReadError> {
        // Idle wait for the first byte of a request.
        while self.buf.is_empty() {
            match self.fill(limits.idle_timeout) {
                Ok(0) | Err(_) => return Err(ReadError::Closed),
                Ok(_) => {}
            }
        }
        let deadline = Instant::now() + limits.request_timeout;
        let timed_out = || {
            ReadError::Reject(ApiFault::new(
                408,
                format!(
                    "the request did not arrive within {} ms",
                    limits.request_timeout.as_millis()
                ),
            ))
        };
        let head_end = loop {
            if let Some(i) = find_head_end(&self.buf) {
                if i > limits.max_header_bytes {
                    return Err(header_too_large(limits));
                }
                break i;
            }
            if self.buf.len() > limits.max_header_bytes + 3 {
                return Err(header_too_large(limits));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            match self.fill(left) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(_) => return Err(ReadError::Closed),
            }
        };
        let head =
            parse_head(&self.buf[..head_end], limits.max_body_bytes).map_err(ReadError::Reject)?;
        let body_start = head_end + 4;
        let total = body_start + head.content_length;
        if head.expect_continue && self.buf.len() < total {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|_| ReadError::Closed)?;
        }
        while self.buf.len() < total {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            match self.fill(left) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(_) => return Err(ReadError::Closed),
            }
        }
        let body = self.buf[body_start..total].to_vec();
        self.buf.drain(..total);
        Ok(Request {
            method: head.method,
            target: head.target,
            body,
            keep_alive: head.keep_alive,
        })
    }

    /// Writes one response; a client that does not read gets `write_timeout` at most.
    pub fn write_response(
        &mut self,
        response: &Response,
        write_timeout: Duration,
    ) -> io::Result<()> {
        self.stream
            .set_write_timeout(Some(write_timeout.max(Duration::from_millis(1))))?;
        self.stream.write_all(&response.to_bytes())
    }
}

fn header_too_large(limits: &ApiLimits) -> ReadError {
    ReadError::Reject(ApiFault::new(
        431,
        format!(
            "the request line and headers exceed {} bytes",
            limits.max_header_bytes
        ),
    ))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// One response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Vec<u8>>,
    pub keep_alive: bool,
    /// For 405.
    pub allow: Option<String>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value, keep_alive: bool) -> Self {
        Self {
            status,
            body: Some(serde_json::to_vec(value).expect("a JSON value serializes")),
            keep_alive,
            allow: None,
        }
    }

    pub fn no_content(keep_alive: bool) -> Self {
        Self {
            status: 204,
            body: None,
            keep_alive,
            allow: None,
        }
    }

    pub fn fault(fault: &ApiFault, keep_alive: bool) -> Self {
        Self::json(fault.status, &fault.body(), keep_alive)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: wisp\r\n",
            self.status,
            reason(self.status)
        );
        if let Some(allow) = &self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        if !self.keep_alive {
            out.push_str("Connection: close\r\n");
        }
        match &self.body {
            Some(b) => out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )),
            // RFC 9110 §8.6: no Content-Length in a 204.
            None if self.status == 204 => out.push_str("\r\n"),
            None => out.push_str("Content-Length: 0\r\n\r\n"),
        }
        let mut bytes = out.into_bytes();
        if let Some(b) = &self.body {
            bytes.extend_from_slice(b);
        }
        bytes
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_put_head() {
        let h = parse_head(
            b"PUT /drives/root HTTP/1.1\r\nHost: localhost\r\nContent-Length: 12\r\nContent-Type: application/json",
            1024,
        )
        .unwrap();
        assert_eq!(h.method, "PUT");
        assert_eq!(h.target, "/drives/root");
        assert_eq!(h.content_length, 12);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
    }

    #[test]
    fn connection_header_and_http_1_0() {
        let h = parse_head(b"GET / HTTP/1.1\r\nConnection: close", 0).unwrap();
        assert!(!h.keep_alive);
        let h = parse_head(b"GET / HTTP/1.0", 0).unwrap();
        assert!(!h.keep_alive);
        let h = parse_head(b"GET / HTTP/1.0\r\nconnection: Keep-Alive", 0).unwrap();
        assert!(h.keep_alive);
    }

    #[test]
    fn refuses_chunked_oversized_and_malformed_heads() {
        let e = parse_head(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked", 1024).unwrap_err();
        assert_eq!(e.status, 411);
        let e = parse_head(b"PUT /vm HTTP/1.1\r\nContent-Length: 10485760", 65536).unwrap_err();
        assert_eq!(e.status, 413);
        assert!(e.fault_message.contains("10485760"), "{}", e.fault_message);
        let e = parse_head(b"PUT /vm HTTP/1.1\r\nContent-Length: -1", 1024).unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_head(
            b"PUT /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
            1024,
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(parse_head(b"GET / HTTP/2.0", 0).unwrap_err().status, 505);
        assert_eq!(parse_head(b"GET /", 0).unwrap_err().status, 400);
        assert_eq!(parse_head(b"GET / HTTP/1.1 x", 0).unwrap_err().status, 400);
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nNoColon", 0)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(parse_head(b"\xff / HTTP/1.1", 0).unwrap_err().status, 400);
    }

    #[test]
    fn response_bytes() {
        let r = Response::no_content(true).to_bytes();
        assert_eq!(r, b"HTTP/1.1 204 No Content\r\nServer: wisp\r\n\r\n");
        let r = Response::json(200, &serde_json::json!({"a": 1}), false).to_bytes();
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "HTTP/1.1 200 OK\r\nServer: wisp\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
    }
}
