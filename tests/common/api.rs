//! The one HTTP/1.1 client of the integration tests, for wisp's API socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One request on a connection of its own; returns (status, body).
pub fn api_call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Client::connect(sock);
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A server that refuses a body by its Content-Length (413) answers and closes before
    // reading it: the write then fails, and the answer is still there to read.
    if let Err(e) = c.stream.write_all(req.as_bytes()) {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "writing the request: {e}"
        );
    }
    let r = c
        .read_response()
        .expect("an answer before the server closed");
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// Waits until the API socket accepts connections.
pub fn wait_api_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "API socket {} never accepted",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body {:?}: {e}", String::from_utf8_lossy(&self.body)))
    }
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .expect("a fault_message string")
            .to_string()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A small HTTP/1.1 client over a UnixStream: keep-alive, raw bytes when a test needs
/// them, responses read by Content-Length.
pub struct Client {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect to the API socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Response {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        self.send_raw(req.as_bytes());
        self.read_response().expect("a response")
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    pub fn put(&mut self, path: &str, body: &str) -> Response {
        self.request("PUT", path, Some(body))
    }

    pub fn patch(&mut self, path: &str, body: &str) -> Response {
        self.request("PATCH", path, Some(body))
    }

    /// One response, or None if the server closed first.
    pub fn read_response(&mut self) -> Option<Response> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if !self.fill() {
                return None;
            }
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_string(), v.trim().to_string())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let total = head_end + 4 + len;
        while self.buf.len() < total {
            assert!(self.fill(), "connection closed inside a response body");
        }
        let body = self.buf[head_end + 4..total].to_vec();
        self.buf.drain(..total);
        Some(Response {
            status,
            headers,
            body,
        })
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
            Err(e) => panic!("read from the API socket: {e}"),
        }
    }

    /// True if the server closed the connection (EOF or reset) within the read timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}
