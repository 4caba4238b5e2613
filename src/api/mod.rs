//! The control API: Firecracker-compatible REST (HTTP/1.1, JSON) on a Unix socket.
//!
//! The API threads never touch VM state (DESIGN.md): they read and validate a request into an
//! [`ApiRequest`], hand it with a [`Responder`] to the main thread through [`ApiChannel`] (a
//! queue plus an eventfd for the main thread's epoll) and wait for its [`ApiResponse`].
//!
//! ```text
//! let api = api::start(Path::new("/run/wisp.sock"))?;
//! // epoll watches api.event_fd(); when it is readable:
//! while let Some((req, responder)) = api.try_recv() {
//!     responder.respond(handle(req));
//! }
//! ```
//!
//! Threads: one acceptor, and one thread per connection (at most
//! [`ApiLimits::max_connections`]; beyond that a connection gets 503 and is closed). Each
//! request must arrive whole within [`ApiLimits::request_timeout`] of its first byte, and an
//! idle keep-alive connection is closed after [`ApiLimits::idle_timeout`], so silent or
//! trickling clients cost a thread for a bounded time and never delay other clients.
//!
//! Status codes: 200 with JSON or 204 on success; 400 for a bad body or a request in the wrong
//! VM state; 404 for an unknown path and 405 (with `Allow`) for a known path with another
//! method (Firecracker answers 400 to both; any 4xx is an error to its SDKs); 408 for a request
//! not complete in time; 411 for chunked bodies; 413 for a body over 64 KiB; 431 for headers
//! over 8 KiB; 500 when the VMM dropped a request unanswered; 503 when it is gone, the
//! connection limit is reached, or its event loop did not take the request within
//! [`ApiLimits::dispatch_timeout`] (the request is then never carried out). Every error body is `{"fault_message": "..."}`.
//!
//! `GET /version` is answered by the API thread (it needs no VM state); `GET /` goes to the
//! main thread, which knows the VM's id and state (build the answer with [`InstanceInfo`]).

mod fuzz;
mod http;
mod pending;
mod preboot;
mod requests;
mod runtime;
mod server;

use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

pub use fuzz::fuzz_connection;
pub use pending::{FirecrackerConfig, PendingConfig};
pub use preboot::{Preboot, PrebootApiController, DEFAULT_ID};
pub use requests::{
    allowed_methods, parse_body, route, ActionType, Allowed, ApiRequest, BootSource, CacheType,
    CgroupConfig, CgroupUpdate, Drive, DriveUpdate, InstanceAction, InstanceInfo, InstanceState,
    LogLevel, LoggerConfig, MacAddr, MachineConfig, MachineConfigUpdate, Method, MetricsConfig,
    NetworkInterface, NetworkInterfaceUpdate, Routed, SerialConfig, VersionInfo, VmState,
    VmStateChange, FIRECRACKER_API_VERSION, ROUTES, UNSUPPORTED, VMM_VERSION,
};
pub use runtime::RuntimeApiController;

/// The OpenAPI 3 document of this API.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Errors of setting up the API socket and threads.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {}: another process is listening on it; pick another path or stop that process", path.display())]
    SocketInUse { path: PathBuf },
    #[error("API socket {}: the path exists and is not a socket; wisp will not remove it", path.display())]
    NotASocket { path: PathBuf },
    #[error("API socket {}: cannot remove the stale socket: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API socket {}: cannot {op}: {source}", path.display())]
    Socket {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API socket path {} is longer than the {max} bytes a Unix socket address holds", path.display())]
    PathTooLong { path: PathBuf, max: usize },
    #[error("cannot create the API eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start the API thread: {0}")]
    Spawn(std::io::Error),
}

/// An error answer: an HTTP status and Firecracker's `{"fault_message": ...}` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFault {
    pub status: u16,
    pub fault_message: String,
}

impl ApiFault {
    pub fn new(status: u16, fault_message: impl Into<String>) -> Self {
        Self {
            status,
            fault_message: fault_message.into(),
        }
    }

    pub fn bad_request(fault_message: impl Into<String>) -> Self {
        Self::new(400, fault_message)
    }

    pub fn internal(fault_message: impl Into<String>) -> Self {
        Self::new(500, fault_message)
    }

    /// 400 for a request that is valid but not in this VM state.
    pub fn wrong_state(req: &ApiRequest, started: bool) -> Self {
        let why = if started {
            "is only valid before InstanceStart, and the VM has started"
        } else {
            "is only valid once the VM has started (PUT /actions InstanceStart)"
        };
        Self::bad_request(format!("{} {why}", req.describe()))
    }

    /// The JSON body sent to the client.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "fault_message": self.fault_message })
    }
}

impl std::fmt::Display for ApiFault {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.fault_message)
    }
}

/// The main thread's answer: `Ok(None)` is 204 No Content, `Ok(Some(json))` 200 with that
/// body, `Err(fault)` the fault's status and `{"fault_message": ...}`.
pub type ApiResponse = Result<Option<serde_json::Value>, ApiFault>;

/// Carries one answer back to the waiting connection. Dropping it unanswered gives the client
/// a 500.
#[derive(Debug)]
pub struct Responder {
    tx: mpsc::SyncSender<ApiResponse>,
    claim: Arc<Claim>,
}

impl Responder {
    pub fn respond(self, response: ApiResponse) {
        // The client may be gone; nothing to do then.
        let _ = self.tx.send(response);
    }
}

/// Who has a queued request: nobody yet, the main thread (it is carried out), or its
/// connection, which gave up waiting (it is not carried out). Whoever moves it from
/// `WAITING` first wins.
#[derive(Debug, Default)]
struct Claim(AtomicU8);

const WAITING: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

impl Claim {
    fn set(&self, to: u8) -> bool {
        self.0
            .compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Timeouts and sizes of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Request line plus headers.
    pub max_header_bytes: usize,
    /// Bodies above this get 413 without being read.
    pub max_body_bytes: usize,
    /// A request must be complete this long after its first byte (else 408 and close).
    pub request_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections served at once; more get 503 and are closed.
    pub max_connections: usize,
    /// How long a request may wait for the main thread to take it: past that, while the
    /// event loop is busy, the client gets 503 and the request is dropped unexecuted. A
    /// request the main thread took is answered when it is done.
    pub dispatch_timeout: Duration,
}

/// Largest request body by default (Firecracker's `--http-api-max-payload-size`).
pub const DEFAULT_MAX_PAYLOAD_SIZE: usize = 64 << 10;

static MAX_PAYLOAD_SIZE: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_PAYLOAD_SIZE);

/// Sets the largest request body for servers started from now on (process-wide, as
/// Firecracker's flag).
pub fn set_max_payload_size(bytes: usize) {
    MAX_PAYLOAD_SIZE.store(bytes, Ordering::Relaxed);
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 8 << 10,
            max_body_bytes: MAX_PAYLOAD_SIZE.load(Ordering::Relaxed),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            dispatch_timeout: Duration::from_secs(5),
            max_connections: 128,
        }
    }
}

/// The main thread's side of the API.
pub struct ApiChannel {
    /// Dropped on shutdown: later requests get 503, queued ones 500.
    rx: Option<mpsc::Receiver<(ApiRequest, Responder)>>,
    evt: Arc<EventFd>,
    server: Option<server::ServerHandle>,
}

/// Creates the socket (mode 0600; a stale socket nobody listens on is replaced, a live one is
/// an error) and starts the API threads.
pub fn start(socket_path: &Path) -> Result<ApiChannel, ApiError> {
    start_with_limits(socket_path, ApiLimits::default())
}

pub fn start_with_limits(socket_path: &Path, limits: ApiLimits) -> Result<ApiChannel, ApiError> {
    let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::EventFd)?);
    let (tx, rx) = mpsc::channel();
    let server = server::ServerHandle::start(socket_path, limits, tx, evt.clone())?;
    Ok(ApiChannel {
        rx: Some(rx),
        evt,
        server: Some(server),
    })
}

impl ApiChannel {
    /// Readable when requests are queued; [`ApiChannel::try_recv`] clears it.
    pub fn event_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    /// The next queued request, if any. Call until `None` after each wake-up.
    pub fn try_recv(&self) -> Option<(ApiRequest, Responder)> {
        // Clear the eventfd first: a request queued after this read writes it again.
        let _ = self.evt.read();
        let rx = self.rx.as_ref()?;
        // Requests whose client stopped waiting (answered 503) are not carried out.
        std::iter::from_fn(|| rx.try_recv().ok()).find(|(_, r)| r.claim.set(TAKEN))
    }

    /// Waits up to `timeout` for a request (for loops without epoll).
    pub fn recv_timeout(&self, timeout: Duration) -> Option<(ApiRequest, Responder)> {
        let r = match &self.rx {
            Some(rx) => {
                let deadline = std::time::Instant::now() + timeout;
                std::iter::from_fn(|| {
                    rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                        .ok()
                })
                .find(|(_, r)| r.claim.set(TAKEN))
            }
            None => {
                std::thread::sleep(timeout);
                None
            }
        };
        let _ = self.evt.read();
        r
    }

    /// The socket path.
    pub fn socket_path(&self) -> Option<&Path> {
        self.server.as_ref().map(|s| s.socket_path())
    }

    /// Stops accepting connections and removes the socket file (if it is still ours).
    /// Requests still queued get 500, later ones on open connections 503.
    pub fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        self.rx = None;
    }
}

impl Drop for ApiChannel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
