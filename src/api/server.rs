//! The socket, the acceptor thread and the connection threads.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::http::{Conn, ReadError, Response};
use super::requests::{allowed_methods, route, Routed};
use super::{ApiError, ApiFault, ApiLimits, ApiRequest, ApiResponse, Claim, Responder, ABANDONED};

/// Connection threads parse at most 64 KiB of JSON nested at most `MAX_JSON_DEPTH` deep.
/// Only the pages touched are resident.
const CONN_STACK_SIZE: usize = 1 << 20;

/// How long a connection thread whose client went away waits for the next connection before
/// it ends. A node agent opens one connection after another (probe the socket, PUT the boot
/// source and machine config, InstanceStart), and a new thread costs a clone and a seccomp
/// filter (its JIT) each: one thread kept idle serves them all.
const CONN_THREAD_IDLE: Duration = Duration::from_millis(500);

type Queue = mpsc::Sender<(ApiRequest, Responder)>;

pub struct ServerHandle {
    path: PathBuf,
    /// The socket file's (dev, ino): only that file is removed on shutdown.
    id: (u64, u64),
    stop: Arc<EventFd>,
    acceptor: Option<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn start(
        path: &Path,
        limits: ApiLimits,
        queue: Queue,
        evt: Arc<EventFd>,
    ) -> Result<Self, ApiError> {
        let listener = bind(path)?;
        crate::startup_trace::mark("api: socket listening");
        let meta = std::fs::symlink_metadata(path).map_err(|source| ApiError::Socket {
            op: "stat",
            path: path.to_path_buf(),
            source,
        })?;
        let id = (meta.dev(), meta.ino());
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::EventFd)?);
        let stop2 = stop.clone();
        let acceptor = thread::Builder::new()
            .name("wisp-api".into())
            .spawn(move || accept_loop(listener, stop2, limits, queue, evt))
            .map_err(|e| {
                let _ = std::fs::remove_file(path);
                ApiError::Spawn(e)
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            id,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    pub fn shutdown(mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the listening socket with mode 0600, replacing a stale socket file.
fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let sock_err = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| ApiError::Socket { op, path, source }
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiError::SocketInUse { path: path.into() }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| ApiError::RemoveStale {
                    path: path.into(),
                    source,
                })?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(sock_err("probe the existing socket")(source)),
        },
        Ok(_) => return Err(ApiError::NotASocket { path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(sock_err("stat")(source)),
    }

    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sock_err("create a socket")(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Linux unix_bind() creates the file with the socket inode's mode minus the umask, so
    // the socket is never reachable with wider permissions than 0600, not even for a moment.
    // SAFETY: fchmod on a valid fd.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
        return Err(sock_err("set the socket mode")(io::Error::last_os_error()));
    }
    let (addr, len) = sockaddr_un(path.as_os_str())?;
    // SAFETY: addr is a valid sockaddr_un of length len.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    };
    if r != 0 {
        return Err(sock_err("bind")(io::Error::last_os_error()));
    }
    // The umask may only have removed bits; make it exactly 0600.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(sock_err("chmod"))?;
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(sock_err("listen")(e));
    }
    Ok(UnixListener::from(fd))
}

fn sockaddr_un(path: &OsStr) -> Result<(libc::sockaddr_un, libc::socklen_t), ApiError> {
    // SAFETY: sockaddr_un is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    #[allow(clippy::cast_possible_truncation)] // AF_UNIX is 1
    let family = libc::AF_UNIX as libc::sa_family_t;
    addr.sun_family = family;
    let bytes = path.as_bytes();
    let max = addr.sun_path.len() - 1;
    if bytes.len() > max || bytes.is_empty() || bytes.contains(&0) {
        return Err(ApiError::PathTooLong {
            path: PathBuf::from(path),
            max,
        });
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // At most size_of::<sockaddr_un>() (110), checked above.
    #[allow(clippy::cast_possible_truncation)]
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    Ok((addr, len))
}

/// Waits for a connection or the stop eventfd.
fn wait_readable(listener: &UnixListener, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        return true;
    }
}

fn accept_loop(
    listener: UnixListener,
    stop: Arc<EventFd>,
    limits: ApiLimits,
    queue: Queue,
    evt: Arc<EventFd>,
) {
    // Process-directed signals (SIGTERM, SIGINT, SIGUSR1, ...) are for the main thread's
    // signalfd: never let the kernel pick an API thread for them. Connection threads
    // inherit this mask.
    crate::signals::block_async();
    crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Api);
    let active = Arc::new(AtomicUsize::new(0));
    // Connections for an idle connection thread: a rendezvous, so a hand-off succeeds only
    // while that thread waits. The mutex makes it at most one idle thread.
    let (handoff, idle) = mpsc::sync_channel::<(UnixStream, ActiveGuard)>(0);
    let idle = Arc::new(Mutex::new(idle));
    while wait_readable(&listener, &stop) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("API socket: accept failed: {e}");
                // EMFILE and friends: do not spin.
                thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if active.load(Ordering::Acquire) >= limits.max_connections {
            refuse(stream, "too many open API connections; retry later");
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let conn = (stream, ActiveGuard(active.clone()));
        let conn = match handoff.try_send(conn) {
            Ok(()) => continue,
            Err(mpsc::TrySendError::Full(c) | mpsc::TrySendError::Disconnected(c)) => c,
        };
        let (queue, evt, idle) = (queue.clone(), evt.clone(), idle.clone());
        let spawned = thread::Builder::new()
            .name("wisp-api-conn".into())
            .stack_size(CONN_STACK_SIZE)
            .spawn(move || {
                // On top of the acceptor's filter it inherits.
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::ApiConn);
                let (mut stream, mut guard) = conn;
                loop {
                    serve_connection(stream, &limits, &queue, &evt);
                    drop(guard);
                    // Another thread is the idle one, or none came in time: end.
                    let Ok(next) = idle.try_lock() else { return };
                    match next.recv_timeout(CONN_THREAD_IDLE) {
                        Ok(c) => (stream, guard) = c,
                        Err(_) => return,
                    }
                }
            });
        if let Err(e) = spawned {
            // The closure, its guard and the stream were dropped with the error.
            log::warn!("API socket: cannot start a connection thread: {e}");
        }
    }
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// 503 without blocking the acceptor: the answer fits the socket buffer or is dropped.
fn refuse(stream: UnixStream, message: &str) {
    let _ = stream.set_nonblocking(true);
    let resp = Response::fault(&ApiFault::new(503, message), false);
    let _ = io::Write::write_all(&mut &stream, &resp.to_bytes());
}

fn serve_connection(stream: UnixStream, limits: &ApiLimits, queue: &Queue, evt: &EventFd) {
    let mut conn = Conn::new(stream);
    loop {
        let req = match conn.read_request(limits) {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(ReadError::Reject(fault)) => {
                let _ =
                    conn.write_response(&Response::fault(&fault, false), limits.request_timeout);
                // Let the client read the answer before the close resets the connection.
                let _ = conn.stream().shutdown(std::net::Shutdown::Write);
                return;
            }
        };
        let keep_alive = req.keep_alive;
        let response = match route(&req.method, &req.target, &req.body) {
            Ok(Routed::Local(v)) => Response::json(200, &v, keep_alive),
            Ok(Routed::Request(r)) => {
                to_response(dispatch(r, queue, evt, limits.dispatch_timeout), keep_alive)
            }
            Err(fault) => {
                let mut resp = Response::fault(&fault, keep_alive);
                if fault.status == 405 {
                    resp.allow = Some(allowed_methods(&req.target).join(", "));
                }
                resp
            }
        };
        crate::metrics::count_api_request(&req.method, &req.target, response.status);
        log::debug!("API {} {} -> {}", req.method, req.target, response.status);
        if conn
            .write_response(&response, limits.request_timeout)
            .is_err()
            || !keep_alive
        {
            return;
        }
    }
}

/// Hands a request to the main thread and waits for its answer: at most `deadline` for the
/// main thread to take it (then 503, and it is never carried out), then as long as it takes.
fn dispatch(req: ApiRequest, queue: &Queue, evt: &EventFd, deadline: Duration) -> ApiResponse {
    let (tx, rx) = mpsc::sync_channel(1);
    let claim = Arc::new(Claim::default());
    let responder = Responder {
        tx,
        claim: claim.clone(),
    };
    if queue.send((req, responder)).is_err() {
        return Err(ApiFault::new(503, "the VMM is shutting down"));
    }
    let _ = evt.write(1);
    let dropped = |_| {
        Err(ApiFault::internal(
            "the VMM dropped the request without answering",
        ))
    };
    match rx.recv_timeout(deadline) {
        Ok(answer) => answer,
        Err(mpsc::RecvTimeoutError::Timeout) if claim.set(ABANDONED) => Err(ApiFault::new(
            503,
            format!(
                "the VMM's event loop did not take the request within {} s (it is busy); \
                 the request was not carried out: retry later",
                deadline.as_secs_f64()
            ),
        )),
        // Taken by the main thread: it is being carried out, and its answer comes.
        Err(mpsc::RecvTimeoutError::Timeout) => rx.recv().unwrap_or_else(dropped),
        Err(mpsc::RecvTimeoutError::Disconnected) => dropped(mpsc::RecvError),
    }
}

fn to_response(r: ApiResponse, keep_alive: bool) -> Response {
    match r {
        Ok(None) => Response::no_content(keep_alive),
        Ok(Some(v)) => Response::json(200, &v, keep_alive),
        Err(fault) => Response::fault(&fault, keep_alive),
    }
}
