//! The host side of virtio-vsock over Unix sockets, with Firecracker's contract:
//!
//! - host-initiated: a host process connects to `uds_path` and writes `CONNECT <port>\n`; the
//!   guest gets a REQUEST from a local port of ours (2^30 up) to `port`, and once it accepts
//!   (RESPONSE) the host process reads `OK <local port>\n`; then bytes flow both ways.
//! - guest-initiated: a REQUEST to the host's CID on port P connects to `<uds_path>_P`; no
//!   listener there (or a full backlog) answers RST.
//!
//! Flow control is the protocol's credit (virtio 1.2 §5.10.6.3), never memory: wisp offers
//! each connection [`BUF_ALLOC`] bytes, holds what the host socket cannot take yet (at most
//! that much), and resets a connection whose guest sends past its credit. Host to guest,
//! wisp reads a socket only as far as the guest's credit and rx buffers go, so a guest that
//! stops reading stops the host writer through its socket buffer. At most
//! [`MAX_CONNECTIONS`] connections exist at once.
//!
//! The muxer watches its sockets with an epoll instance of its own, whose fd the device hands
//! to the VMM's event loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};
use crate::rate_limiter::Timer;

/// Receive buffer offered to the guest per connection: the most wisp ever holds for one.
pub const BUF_ALLOC: u32 = 64 << 10;
/// Connections at once (host- and guest-initiated together).
pub const MAX_CONNECTIONS: usize = 256;
/// Largest payload of one packet either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: usize = 64 << 10;
/// RSTs for packets that belong to no connection, waiting for rx buffers; more are dropped
/// (the guest then times out, as with a lost packet).
const MAX_STRAY_RST: usize = 256;
/// `CONNECT 4294967295\n` is 19 bytes.
const CONNECT_LINE_MAX: usize = 32;
/// Local ports of host-initiated connections, as Firecracker.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll data of the listener and the timer; connections use their id.
const LISTENER: u64 = u64::MAX;
const TIMER: u64 = u64::MAX - 1;
/// How long the guest has to answer a host connection's REQUEST (Firecracker's 2 s): a
/// guest that never answers does not leave the host process waiting for `OK` for ever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// `sun_path` holds 108 bytes with its NUL; `_4294967295` is appended for guest connects.
const MAX_UDS_PATH: usize = 107 - 11;

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("uds_path {path}: exists and is not a Unix socket; remove it or choose another path")]
    NotASocket { path: PathBuf },
    #[error("uds_path {path}: another process is listening on it")]
    InUse { path: PathBuf },
    #[error("uds_path {path}: {len} bytes; at most {MAX_UDS_PATH} (a Unix socket path holds 107, and `_<port>` is appended for guest connections)")]
    PathTooLong { path: PathBuf, len: usize },
    #[error("uds_path {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock epoll: {0}")]
    Epoll(#[source] io::Error),
    #[error("vsock timer: {0}")]
    Timer(#[source] io::Error),
}

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

/// Control packets a connection owes the guest.
#[derive(Debug, Default, Clone, Copy)]
struct Owed {
    request: bool,
    response: bool,
    shutdown: bool,
    credit_update: bool,
    rst: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, reading the `CONNECT <port>\n` line.
    AwaitConnect(Vec<u8>),
    /// Host-initiated, REQUEST sent (or owed), waiting for the guest's RESPONSE.
    LocalInit,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    host_port: u32,
    guest_port: u32,
    /// Host-initiated: `host_port` is one of ours.
    local: bool,
    /// Guest bytes the host socket did not take yet (at most BUF_ALLOC).
    tx_buf: VecDeque<u8>,
    /// Bytes received from the guest / written to the host socket (virtio's fwd_cnt).
    recv_cnt: u32,
    fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    fwd_cnt_sent: u32,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    owed: Owed,
    /// The host socket has data (or EOF, or an error) to read.
    readable: bool,
    host_eof: bool,
    /// The host socket hung up: no longer in the epoll set.
    hup: bool,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    /// RST once the held guest bytes reached the host (the guest closed).
    rst_after_flush: bool,
    /// In the rx queue.
    queued: bool,
    /// LocalInit: when the guest's RESPONSE is due.
    deadline: Option<Instant>,
    interest: Option<EventSet>,
}

impl Conn {
    fn new(stream: UnixStream, state: State, host_port: u32, guest_port: u32, local: bool) -> Self {
        Conn {
            stream,
            state,
            host_port,
            guest_port,
            local,
            tx_buf: VecDeque::new(),
            recv_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            owed: Owed::default(),
            readable: false,
            host_eof: false,
            hup: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            rst_after_flush: false,
            queued: false,
            deadline: None,
            interest: None,
        }
    }

    /// What the guest can still take (virtio 1.2 §5.10.6.3.1), in wrapping u32 counters.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && !self.owed.rst
            && self.peer_credit() > 0
    }

    fn has_rx_work(&self) -> bool {
        let o = self.owed;
        o.request || o.response || o.shutdown || o.credit_update || o.rst || self.can_send_data()
    }

    /// The events to watch now: read when we do not know the socket is readable, write
    /// while guest bytes wait for it.
    fn wanted(&self) -> Option<EventSet> {
        if self.hup || self.owed.rst {
            return None;
        }
        let mut e = EventSet::empty();
        let read = match self.state {
            State::AwaitConnect(_) => true,
            State::LocalInit => false,
            State::Established => !self.readable && !self.host_eof,
        };
        if read {
            e |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            e |= EventSet::OUT;
        }
        Some(e)
    }

    fn header(&self, op: u16, guest_cid: u64) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.host_port,
            dst_port: self.guest_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Writes held guest bytes to the host socket until it would block.
    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tx_buf.is_empty() {
            self.tx_buf = VecDeque::new();
            if self.guest_shut_send {
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        Ok(())
    }

    /// Guest payload for the host: written now as far as the socket takes it, the rest held.
    fn send_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        self.recv_cnt = self.recv_cnt.wrapping_add(data.len() as u32);
        let mut done = 0;
        if self.tx_buf.is_empty() {
            while done < data.len() {
                match self.stream.write(&data[done..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.fwd_cnt = self.fwd_cnt.wrapping_add(done as u32);
        }
        self.tx_buf.extend(&data[done..]);
        Ok(())
    }

    /// Owe the guest a CREDIT_UPDATE when the space it believes we have fell below half and
    /// we have freed some since we last told it.
    fn note_credit(&mut self) {
        let believed_used = self.recv_cnt.wrapping_sub(self.fwd_cnt_sent);
        if self.fwd_cnt != self.fwd_cnt_sent
            && BUF_ALLOC.saturating_sub(believed_used) < BUF_ALLOC / 2
        {
            self.owed.credit_update = true;
        }
    }
}

/// What the muxer has seen, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MuxerStats {
    pub conns_added: u64,
    pub conns_removed: u64,
    pub conns_killed: u64,
    pub stray_rst_dropped: u64,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// Fires when the earliest REQUEST_TIMEOUT is up.
    timer: Timer,
    conns: HashMap<u64, Conn>,
    /// (host port, guest port) -> connection id.
    by_ports: HashMap<(u32, u32), u64>,
    local_ports: HashSet<u32>,
    next_id: u64,
    next_local_port: u32,
    /// Connections with something for the guest, in turn.
    rx_queue: VecDeque<u64>,
    stray_rst: VecDeque<Header>,
    listening: bool,
    /// The socket file is gone (close): never unlink the path again, another process may
    /// own it by now.
    closed: bool,
    pub stats: MuxerStats,
}

impl Muxer {
    /// Listens on `uds_path` (a stale socket there, with no listener, is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, MuxerError> {
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
            .map_err(|source| MuxerError::Bind {
                path: path.clone(),
                source,
            })?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let timer = Timer::new().map_err(MuxerError::Timer)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(Muxer {
            guest_cid,
            uds_path: path,
            listener,
            epoll,
            timer,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            local_ports: HashSet::new(),
            next_id: 0,
            next_local_port: FIRST_LOCAL_PORT,
            rx_queue: VecDeque::new(),
            stray_rst: VecDeque::new(),
            listening: false,
            closed: false,
            stats: MuxerStats::default(),
        })
    }

    /// The fd the VMM's event loop watches: readable when a socket of ours has news.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Guest bytes held for host sockets that are not reading, over all connections.
    pub fn held_bytes(&self) -> usize {
        self.conns.values().map(|c| c.tx_buf.len()).sum()
    }

    /// The driver is ready: host connections are accepted from now on.
    pub fn activate(&mut self) {
        if !self.listening {
            let ev = EpollEvent::new(EventSet::IN, LISTENER);
            match self
                .epoll
                .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
            {
                Ok(()) => self.listening = true,
                Err(e) => log::error!("vsock: cannot watch {}: {e}", self.uds_path.display()),
            }
        }
    }

    /// The driver reset the device: every connection is closed (host processes see EOF);
    /// new host connections wait in the listen backlog until the driver is back.
    pub fn reset(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.remove(id);
        }
        self.rx_queue.clear();
        self.stray_rst.clear();
        if self.listening {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                self.listener.as_raw_fd(),
                EpollEvent::default(),
            );
            self.listening = false;
        }
    }

    /// Something is waiting for an rx buffer.
    pub fn has_rx(&self) -> bool {
        !self.stray_rst.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest, its payload read into `payload` (as much as fits and
    /// the guest's credit allows). None: nothing to send now.
    pub fn next_rx(&mut self, payload: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(h) = self.stray_rst.pop_front() {
            return Some((h, 0));
        }
        // Each connection once: one that has work but cannot make progress with this buffer
        // (e.g. one too small for data) goes back to the queue for a later buffer.
        for _ in 0..self.rx_queue.len() {
            let Some(id) = self.rx_queue.pop_front() else {
                break;
            };
            let guest_cid = self.guest_cid;
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            conn.queued = false;
            let packet = next_packet(conn, guest_cid, payload);
            if let Some((h, _)) = &packet {
                conn.fwd_cnt_sent = h.fwd_cnt;
                conn.owed.credit_update = false;
                if h.op == op::RST {
                    self.remove(id);
                    return packet;
                }
                if h.op == op::REQUEST {
                    conn.deadline = Some(Instant::now() + REQUEST_TIMEOUT);
                    self.arm_timer();
                }
            }
            self.update_interest(id);
            self.schedule(id);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    /// A packet the guest sent (its payload already read from guest memory, at most
    /// MAX_PAYLOAD bytes; `hdr.len` is the payload's length).
    pub fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            rate_limited_warn!(
                "vsock: packet from cid {} to cid {} ignored (the guest is cid {}, the host 2)",
                hdr.src_cid,
                hdr.dst_cid,
                self.guest_cid
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            return self.stray(hdr);
        }
        let Some(&id) = self.by_ports.get(&(hdr.dst_port, hdr.src_port)) else {
            match hdr.op {
                op::REQUEST => self.guest_connect(hdr),
                op::RST => {}
                _ => self.stray(hdr),
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.owed.rst {
            // Already being reset: the guest's packets no longer matter.
            return;
        }
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        let ok = match hdr.op {
            op::RST => {
                self.remove(id);
                return;
            }
            op::RESPONSE if conn.state == State::LocalInit => {
                conn.state = State::Established;
                conn.deadline = None;
                // The host process waits for this line before it writes: a socket that
                // cannot take 20 bytes now is not one we can serve.
                let line = format!("OK {}\n", conn.host_port);
                conn.stream.write_all(line.as_bytes()).is_ok()
            }
            op::RW if conn.state == State::Established && !conn.guest_shut_send => {
                let used = conn.recv_cnt.wrapping_sub(conn.fwd_cnt);
                let fits = (payload.len() as u64) + u64::from(used) <= u64::from(BUF_ALLOC);
                if !fits {
                    rate_limited_warn!(
                        "vsock: guest port {} sent {} bytes past its credit; connection reset",
                        hdr.src_port,
                        payload.len()
                    );
                }
                fits && conn.send_to_host(payload).is_ok()
            }
            op::CREDIT_UPDATE => true,
            op::CREDIT_REQUEST => {
                conn.owed.credit_update = true;
                true
            }
            op::SHUTDOWN if conn.state == State::Established => {
                conn.guest_shut_rcv |= hdr.flags & shutdown::RCV != 0;
                conn.guest_shut_send |= hdr.flags & shutdown::SEND != 0;
                if conn.guest_shut_rcv && conn.guest_shut_send {
                    // Closed: once what it sent reached the host, answer RST (Linux waits
                    // for it to finish the close).
                    conn.rst_after_flush = true;
                }
                conn.flush().is_ok()
            }
            _ => false,
        };
        if !ok || (conn.rst_after_flush && conn.tx_buf.is_empty()) {
            self.kill(id);
            return;
        }
        conn.note_credit();
        self.update_interest(id);
        self.schedule(id);
    }

    /// Handles up to `max` socket events; returns true if there may be more.
    pub fn process_events(&mut self, max: usize) -> bool {
        let mut events = [EpollEvent::default(); 64];
        let mut handled = 0;
        while handled < max {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    rate_limited_warn!("vsock: epoll_wait: {}", e);
                    return false;
                }
            };
            if n == 0 {
                return false;
            }
            // Handling events can add sockets (accepted connections) that are ready at
            // once: wait again until nothing is left.
            for ev in &events[..n] {
                self.on_event(ev.data(), ev.event_set());
            }
            handled += n;
        }
        true
    }

    fn on_event(&mut self, id: u64, set: EventSet) {
        if id == LISTENER {
            return self.accept();
        }
        if id == TIMER {
            return self.expire_requests();
        }
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if let State::AwaitConnect(line) = &mut conn.state {
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
            return;
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) && !conn.host_eof {
            conn.readable = true;
        }
        if set.contains(EventSet::OUT) && conn.flush().is_err() {
            return self.kill(id);
        }
        if conn.rst_after_flush && conn.tx_buf.is_empty() {
            return self.kill(id);
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Reported whatever we ask for: stop watching, and let reads (EOF or the error)
            // and writes (EPIPE) end the connection.
            conn.hup = true;
            if conn.guest_shut_rcv || conn.host_eof || conn.state != State::Established {
                return self.kill(id);
            }
        }
        conn.note_credit();
        self.update_interest(id);
        self.schedule(id);
    }

    /// Resets the host connections whose REQUEST the guest left unanswered too long.
    fn expire_requests(&mut self) {
        self.timer.clear();
        let now = Instant::now();
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            log::debug!("vsock: the guest did not answer a host connection in time");
            if let Some(c) = self.conns.get_mut(&id) {
                c.deadline = None;
            }
            self.kill(id);
        }
        self.arm_timer();
    }

    /// Arms the timer for the earliest pending deadline.
    fn arm_timer(&mut self) {
        let Some(next) = self.conns.values().filter_map(|c| c.deadline).min() else {
            return;
        };
        if let Err(e) = self
            .timer
            .arm(next.saturating_duration_since(Instant::now()))
        {
            rate_limited_warn!("vsock: cannot arm the request timer: {}", e);
        }
    }

    fn accept(&mut self) {
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

    fn guest_connect(&mut self, hdr: &Header) {
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

    fn add(&mut self, conn: Conn) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(id, conn);
        self.stats.conns_added += 1;
        id
    }

    /// An RST for a packet that has no connection (src and dst swapped).
    fn stray(&mut self, hdr: &Header) {
        if self.stray_rst.len() >= MAX_STRAY_RST {
            self.stats.stray_rst_dropped += 1;
            return;
        }
        self.stray_rst.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: hdr.type_,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Ends a connection the guest knows of with an RST (the connection goes once it is sent).
    fn kill(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if matches!(conn.state, State::AwaitConnect(_)) {
            return self.remove(id);
        }
        self.stats.conns_killed += 1;
        conn.owed = Owed {
            rst: true,
            ..Owed::default()
        };
        conn.tx_buf = VecDeque::new();
        let _ = conn.stream.shutdown(Shutdown::Both);
        self.update_interest(id);
        self.schedule(id);
    }

    fn remove(&mut self, id: u64) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        self.stats.conns_removed += 1;
        if conn.interest.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        if self.by_ports.get(&(conn.host_port, conn.guest_port)) == Some(&id) {
            self.by_ports.remove(&(conn.host_port, conn.guest_port));
        }
        if conn.local {
            self.local_ports.remove(&conn.host_port);
        }
    }

    fn schedule(&mut self, id: u64) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if !conn.queued && conn.has_rx_work() {
                conn.queued = true;
                self.rx_queue.push_back(id);
            }
        }
    }

    fn update_interest(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let wanted = conn.wanted();
        if wanted == conn.interest {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let result = match (conn.interest, wanted) {
            (None, Some(e)) => self
                .epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(e, id)),
            (Some(_), Some(e)) => {
                self.epoll
                    .ctl(ControlOperation::Modify, fd, EpollEvent::new(e, id))
            }
            (Some(_), None) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => conn.interest = wanted,
            Err(e) => {
                rate_limited_warn!("vsock: epoll_ctl: {}", e);
                self.kill(id);
            }
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            // At most MAX_CONNECTIONS are taken, so a free one comes quickly.
            if self.local_ports.insert(p) {
                return p;
            }
        }
    }
}

impl Muxer {
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

/// The next packet `conn` owes the guest, in the order the protocol needs.
fn next_packet(conn: &mut Conn, guest_cid: u64, payload: &mut [u8]) -> Option<(Header, usize)> {
    if conn.owed.rst {
        return Some((conn.header(op::RST, guest_cid), 0));
    }
    if conn.owed.request {
        conn.owed.request = false;
        return Some((conn.header(op::REQUEST, guest_cid), 0));
    }
    if conn.owed.response {
        conn.owed.response = false;
        return Some((conn.header(op::RESPONSE, guest_cid), 0));
    }
    // A read of 0 bytes would look like the host's EOF: only with room for data.
    if conn.can_send_data() && !payload.is_empty() {
        let n = payload.len().min(conn.peer_credit() as usize);
        match conn.stream.read(&mut payload[..n]) {
            Ok(0) => {
                conn.host_eof = true;
                conn.owed.shutdown = true;
            }
            Ok(n) => {
                conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                let mut h = conn.header(op::RW, guest_cid);
                h.len = n as u32;
                return Some((h, n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                conn.owed = Owed {
                    rst: true,
                    ..Owed::default()
                };
                return Some((conn.header(op::RST, guest_cid), 0));
            }
        }
    }
    if conn.owed.shutdown {
        conn.owed.shutdown = false;
        let mut h = conn.header(op::SHUTDOWN, guest_cid);
        h.flags = shutdown::RCV | shutdown::SEND;
        return Some((h, 0));
    }
    if conn.owed.credit_update {
        return Some((conn.header(op::CREDIT_UPDATE, guest_cid), 0));
    }
    None
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
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if path.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len() + 1;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}
