//! The guest's HTTP/1.x requests to the MMDS and their answers (Firecracker's semantics):
//! `GET <path>` reads the document, `PUT /latest/api/token` makes a V2 session token.
//! One request per connection; every answer closes it.

use std::time::Instant;

use super::store::{GetError, Mmds, MmdsVersion};
use super::token::TokenError;

/// The largest request (line, headers and body) a connection buffers.
pub const MAX_REQUEST: usize = 4096;
pub const TOKEN_PATH: &str = "/latest/api/token";

const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];

/// A request read from a connection's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path (absolute-form URIs reduced to theirs; no query string).
    pub path: String,
    /// HTTP/1.0 (else 1.1); the answer uses the same version.
    pub http10: bool,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, names: &[&str]) -> Option<(&str, &str)> {
        self.headers
            .iter()
            .find(|(n, _)| names.contains(&n.as_str()))
            .map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

/// What the bytes received so far make.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    Complete(Request),
    /// Not a request we can answer; the answer is 400 with this reason.
    Invalid(&'static str),
}

/// Parses `buf` (everything the connection sent so far).
pub fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Parsed::Incomplete;
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Invalid("the request head is not UTF-8");
    };
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Invalid("malformed request line");
    };
    let http10 = match version {
        "HTTP/1.0" => true,
        "HTTP/1.1" => false,
        _ => return Parsed::Invalid("unsupported HTTP version"),
    };
    let mut headers = Vec::new();
    for l in lines {
        let Some((name, value)) = l.split_once(':') else {
            return Parsed::Invalid("malformed header");
        };
        if name.is_empty() || name.contains(' ') {
            return Parsed::Invalid("malformed header");
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let req = Request {
        method: method.to_string(),
        path: path_of(uri),
        http10,
        headers,
    };
    if req.header(&["transfer-encoding"]).is_some() {
        return Parsed::Invalid("chunked bodies are not supported");
    }
    // A body (none is needed) must still arrive whole before the answer.
    let body_len = match req.header(&["content-length"]) {
        None => 0,
        Some((_, v)) => match v.parse::<usize>() {
            Ok(n) => n,
            Err(_) => return Parsed::Invalid("invalid Content-Length"),
        },
    };
    let head_len = end + 4;
    if body_len > MAX_REQUEST.saturating_sub(head_len) {
        return Parsed::Invalid("the request is too large");
    }
    if buf.len() < head_len + body_len {
        return Parsed::Incomplete;
    }
    Parsed::Complete(req)
}

/// `http://host/a/b?x` and `/a//b?x` -> `/a/b`.
fn path_of(uri: &str) -> String {
    let mut p = uri;
    if let Some(rest) = p
        .strip_prefix("http://")
        .or_else(|| p.strip_prefix("https://"))
    {
        p = rest.find('/').map_or("", |i| &rest[i..]);
    }
    let p = p.split(['?', '#']).next().unwrap_or("");
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// An answer, ready to be written.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub json: bool,
    pub body: String,
    /// Extra header lines (`Name: value`).
    pub headers: Vec<String>,
}

impl Response {
    fn new(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            json: false,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self, http10: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            _ => "",
        };
        let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let ctype = if self.json {
            "application/json"
        } else {
            "text/plain"
        };
        let mut head = format!(
            "{version} {} {reason}\r\nServer: wisp\r\nConnection: close\r\nContent-Type: \
             {ctype}\r\nContent-Length: {}\r\n",
            self.status,
            self.body.len()
        );
        for h in &self.headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// The answer to a request that could not be parsed.
pub fn bad_request(reason: &str) -> Response {
    Response::new(400, reason)
}

/// The answer to a request that does not fit [`MAX_REQUEST`].
pub fn too_large() -> Response {
    Response::new(
        413,
        format!("The request is larger than {MAX_REQUEST} bytes."),
    )
}

/// The answer when the responder has no room for more answers.
pub fn busy() -> Response {
    Response::new(503, "The MMDS is busy; try again.")
}

/// Answers one request against the store.
pub fn respond(mmds: &mut Mmds, req: &Request, now: Instant) -> Response {
    if req.path.is_empty() || !req.path.starts_with('/') {
        return Response::new(400, "Invalid URI.");
    }
    match req.method.as_str() {
        "GET" => get(mmds, req, now),
        "PUT" => put(mmds, req, now),
        _ => {
            let mut r = Response::new(405, "Not allowed HTTP method.");
            r.headers.push("Allow: GET, PUT".into());
            r
        }
    }
}

fn get(mmds: &mut Mmds, req: &Request, now: Instant) -> Response {
    let counters = mmds.counters();
    let token = req.header(&TOKEN_HEADERS).map(|(_, v)| v);
    let valid = token.map(|t| mmds.token_is_valid(t, now));
    match valid {
        None => super::bump(&counters.rx_no_token),
        Some(false) => super::bump(&counters.rx_invalid_token),
        Some(true) => {}
    }
    if mmds.version() == MmdsVersion::V2 {
        match valid {
            None => {
                return Response::new(
                    401,
                    "No MMDS token provided. Use `X-metadata-token` or \
                     `X-aws-ec2-metadata-token` header to specify the session token.",
                )
            }
            Some(false) => return Response::new(401, "MMDS token not valid."),
            Some(true) => {}
        }
    }
    let json = req.header(&["accept"]).is_some_and(|(_, v)| {
        v.split(',')
            .any(|t| t.split(';').next().unwrap_or("").trim() == "application/json")
    });
    match mmds.get(&req.path, json) {
        Ok(body) => Response {
            status: 200,
            json: json && !mmds.imds_compat(),
            body,
            headers: Vec::new(),
        },
        Err(GetError::NotFound) => Response::new(404, format!("Resource not found: {}.", req.path)),
        Err(GetError::UnsupportedValueType) => Response::new(
            501,
            "Cannot retrieve value. The value has an unsupported type.",
        ),
    }
}

fn put(mmds: &mut Mmds, req: &Request, now: Instant) -> Response {
    if let Some((name, _)) = req.header(&["x-forwarded-for"]) {
        return Response::new(400, format!("Unsupported header name. Key: {name}"));
    }
    if req.path != TOKEN_PATH {
        return Response::new(404, format!("Resource not found: {}.", req.path));
    }
    let Some((name, ttl)) = req.header(&TTL_HEADERS) else {
        return Response::new(
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
             `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let result = match ttl.parse::<u32>() {
        Ok(seconds) => mmds.new_token(seconds, now).map(|t| (t, seconds)),
        Err(_) => Err(TokenError::InvalidTtl(ttl.to_string())),
    };
    match result {
        Ok((token, seconds)) => {
            let mut r = Response::new(200, token);
            r.headers.push(format!("{name}: {seconds}"));
            r
        }
        Err(e @ TokenError::InvalidTtl(_)) => Response::new(400, e.to_string()),
        Err(e) => Response::new(500, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Request {
        match parse(text.as_bytes()) {
            Parsed::Complete(r) => r,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn parses_requests_and_waits_for_the_rest() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Parsed::Incomplete);
        let r = req("GET http://169.254.169.254//latest//meta-data?x=1 HTTP/1.0\r\nAccept: application/json\r\n\r\n");
        assert_eq!(r.path, "/latest/meta-data");
        assert!(r.http10);
        assert_eq!(
            r.headers,
            vec![("accept".into(), "application/json".into())]
        );
        assert_eq!(
            parse(b"PUT /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nab"),
            Parsed::Incomplete
        );
        assert!(matches!(
            parse(b"PUT /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
            Parsed::Complete(_)
        ));
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/2\r\n\r\n",
            b"GET / HTTP/1.1\r\nnocolon\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(parse(bad), Parsed::Invalid(_)), "{bad:?}");
        }
    }

    #[test]
    fn v2_needs_a_valid_token_and_v1_does_not() {
        let mut m = Mmds::new(1000);
        m.put(serde_json::json!({"a": "b"})).unwrap();
        let t0 = Instant::now();
        let get = |m: &mut Mmds, tok: Option<&str>, at| {
            let h = tok.map_or(String::new(), |t| format!("X-metadata-token: {t}\r\n"));
            respond(m, &req(&format!("GET /a HTTP/1.1\r\n{h}\r\n")), at)
        };
        assert_eq!(get(&mut m, None, t0).status, 200);
        m.set_version(MmdsVersion::V2);
        assert_eq!(get(&mut m, None, t0).status, 401);
        let r = respond(
            &mut m,
            &req("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n"),
            t0,
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.headers,
            vec!["x-metadata-token-ttl-seconds: 60".to_string()]
        );
        let token = r.body;
        let ok = get(&mut m, Some(&token), t0);
        assert_eq!((ok.status, ok.body.as_str()), (200, "b"));
        assert_eq!(get(&mut m, Some("0000"), t0).status, 401);
        let later = t0 + std::time::Duration::from_secs(60);
        assert_eq!(
            get(&mut m, Some(&token), later).body,
            "MMDS token not valid."
        );
        for (text, status) in [
            ("PUT /latest/api/token HTTP/1.1\r\n\r\n", 400),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n", 400),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: x\r\n\r\n", 400),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-Forwarded-For: a\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n",
                400,
            ),
            ("PUT /other HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n", 404),
            ("DELETE /a HTTP/1.1\r\n\r\n", 405),
        ] {
            assert_eq!(respond(&mut m, &req(text), t0).status, status, "{text}");
        }
    }
}
