//! The host side's Unix sockets, with Firecracker's contract: the listener at `uds_path`, a
//! host process's `CONNECT <port>\n` line, and the guest's connects to `<uds_path>_<port>`.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::conn::{Conn, State};
use super::muxer::{Muxer, MuxerError, MAX_CONNECTIONS};
use super::packet::Header;

/// `sun_path` holds 108 bytes with its NUL; `_4294967295` is appended for guest connects.
pub(super) const MAX_UDS_PATH: usize = 107 - 11;
/// `CONNECT 4294967295\n` is 19 bytes.
const CONNECT_LINE_MAX: usize = 32;

/// Checks `path` as a place to listen, without touching it: not too long, and either absent
/// or a socket. The API and config layers call it to refuse a bad path early.
pub fn check_uds_path(path: &Path) -> Result<(), MuxerError> {
    let len = path.as_os_str().len();
    if len == 0 || len > MAX_UDS_PATH {
        return Err(MuxerError::PathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => Err(MuxerError::NotASocket {
            path: path.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// A non-blocking listener on `uds_path` (a stale socket there, with no listener, is
/// replaced).
pub(super) fn listen(uds_path: &Path) -> Result<UnixListener, MuxerError> {
    check_uds_path(uds_path)?;
    let path = uds_path.to_path_buf();
    if std::fs::symlink_metadata(uds_path).is_ok() {
        match UnixStream::connect(uds_path) {
            Ok(_) => return Err(MuxerError::InUse { path }),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                std::fs::remove_file(uds_path).map_err(|source| MuxerError::Bind {
                    path: path.clone(),
                    source,
                })?;
            }
            Err(source) => return Err(MuxerError::Bind { path, source }),
        }
    }
    let listener = UnixListener::bind(uds_path).map_err(|source| MuxerError::Bind {
        path: path.clone(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| MuxerError::Bind { path, source })?;
    Ok(listener)
}

impl Muxer {
    /// Host processes connecting to `uds_path`: each must first send its CONNECT line.
    pub(super) fn accept(&mut self) {
        for _ in 0..32 {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    rate_limited_warn!("vsock: accept on {}: {}", self.uds_path.display(), e);
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                rate_limited_warn!(
                    "vsock: {} connections already; a host connection is refused",
                    MAX_CONNECTIONS
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.add(Conn::new(
                stream,
                State::AwaitConnect(Vec::new()),
                0,
                0,
                true,
            ));
            self.update_interest(id);
        }
    }

    /// The guest's REQUEST to port P connects to `<uds_path>_P`; no listener there (or a full
    /// backlog) answers RST.
    pub(super) fn guest_connect(&mut self, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            return self.stray(hdr);
        }
        let mut path = self.uds_path.as_os_str().as_bytes().to_vec();
        path.extend_from_slice(format!("_{}", hdr.dst_port).as_bytes());
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: guest connect to port {}: {e}", hdr.dst_port);
                return self.stray(hdr);
            }
        };
        let mut conn = Conn::new(
            stream,
            State::Established,
            hdr.dst_port,
            hdr.src_port,
            false,
        );
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        conn.owed.response = true;
        let id = self.add(conn);
        self.by_ports.insert((hdr.dst_port, hdr.src_port), id);
        self.update_interest(id);
        self.schedule(id);
    }

    /// Reads a host connection's `CONNECT <port>\n` line as far as it came; once complete,
    /// the guest is owed a REQUEST from a local port of ours.
    pub(super) fn read_connect(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let State::AwaitConnect(line) = &mut conn.state else {
            return;
        };
        match read_connect_line(&mut conn.stream, line) {
            Ok(None) => {}
            Ok(Some(port)) => {
                let local = self.alloc_local_port();
                let conn = self.conns.get_mut(&id).expect("looked up above");
                conn.state = State::LocalInit;
                conn.host_port = local;
                conn.guest_port = port;
                conn.owed.request = true;
                self.by_ports.insert((local, port), id);
                self.update_interest(id);
                self.schedule(id);
            }
            Err(e) => {
                log::debug!("vsock: host connection dropped before CONNECT: {e}");
                self.remove(id);
            }
        }
    }

    /// The VM ends: every connection is closed and the socket file removed, so host
    /// processes see the end at once (the rest of the VM may be torn down later).
    pub fn close(&mut self) {
        self.reset();
        self.remove_socket_file();
    }

    fn remove_socket_file(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if std::fs::symlink_metadata(&self.uds_path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Our socket file goes with us (a host process would otherwise find a dead one).
        self.remove_socket_file();
    }
}

/// Reads the `CONNECT <port>\n` line a byte at a time (what follows it is the stream's data).
/// Ok(None): not complete yet.
fn read_connect_line(stream: &mut UnixStream, line: &mut Vec<u8>) -> io::Result<Option<u32>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    loop {
        let mut b = [0u8; 1];
        match stream.read(&mut b) {
            Ok(0) => return Err(bad("EOF before the CONNECT line")),
            Ok(_) if b[0] == b'\n' => {
                let text = std::str::from_utf8(line).map_err(|_| bad("CONNECT line not UTF-8"))?;
                let port = text
                    .strip_prefix("CONNECT ")
                    .and_then(|p| p.trim_end_matches('\r').parse::<u32>().ok())
                    .ok_or_else(|| bad("not `CONNECT <port>`"))?;
                return Ok(Some(port));
            }
            Ok(_) => {
                if line.len() >= CONNECT_LINE_MAX {
                    return Err(bad("CONNECT line too long"));
                }
                line.push(b[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A non-blocking connect to a Unix socket path: a listener whose backlog is full is an
/// error (EAGAIN), never a wait on the event loop.
fn connect_nonblocking(path: &[u8]) -> io::Result<UnixStream> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just created and own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    #[allow(clippy::cast_possible_truncation)] // AF_UNIX is 1
    let family = libc::AF_UNIX as libc::sa_family_t;
    addr.sun_family = family;
    if path.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    // At most size_of::<sockaddr_un>() (110), checked above.
    #[allow(clippy::cast_possible_truncation)]
    let len = (std::mem::size_of::<libc::sa_family_t>() + path.len() + 1) as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size.
    let r = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}
