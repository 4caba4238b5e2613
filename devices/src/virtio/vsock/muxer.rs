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
//! to the VMM's event loop. Each connection's protocol state is a [`Conn`] (`conn.rs`); the
//! Unix-socket side (listening, the CONNECT line, guest connects) is in `uds.rs`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::conn::{next_packet, Conn, Owed, State};
use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};
use super::uds::{listen, MAX_UDS_PATH};
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
/// Local ports of host-initiated connections, as Firecracker.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll data of the listener and the timer; connections use their id.
const LISTENER: u64 = u64::MAX;
const TIMER: u64 = u64::MAX - 1;
/// How long the guest has to answer a host connection's REQUEST (Firecracker's 2 s): a
/// guest that never answers does not leave the host process waiting for `OK` for ever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

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

/// What the muxer has seen, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MuxerStats {
    pub conns_added: u64,
    pub conns_removed: u64,
    pub conns_killed: u64,
    pub stray_rst_dropped: u64,
}

pub struct Muxer {
    pub(super) guest_cid: u64,
    pub(super) uds_path: PathBuf,
    pub(super) listener: UnixListener,
    pub(super) epoll: Epoll,
    /// Fires when the earliest REQUEST_TIMEOUT is up.
    pub(super) timer: Timer,
    pub(super) conns: HashMap<u64, Conn>,
    /// (host port, guest port) -> connection id.
    pub(super) by_ports: HashMap<(u32, u32), u64>,
    pub(super) local_ports: HashSet<u32>,
    pub(super) next_id: u64,
    pub(super) next_local_port: u32,
    /// Connections with something for the guest, in turn.
    pub(super) rx_queue: VecDeque<u64>,
    pub(super) stray_rst: VecDeque<Header>,
    pub(super) listening: bool,
    /// The socket file is gone (close): never unlink the path again, another process may
    /// own it by now.
    pub(super) closed: bool,
    pub stats: MuxerStats,
}

impl Muxer {
    /// Listens on `uds_path` (a stale socket there, with no listener, is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, MuxerError> {
        let listener = listen(uds_path)?;
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
            uds_path: uds_path.to_path_buf(),
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
        if matches!(conn.state, State::AwaitConnect(_)) {
            return self.read_connect(id);
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

    pub(super) fn add(&mut self, conn: Conn) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(id, conn);
        self.stats.conns_added += 1;
        id
    }

    /// An RST for a packet that has no connection (src and dst swapped).
    pub(super) fn stray(&mut self, hdr: &Header) {
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

    pub(super) fn remove(&mut self, id: u64) {
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

    pub(super) fn schedule(&mut self, id: u64) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if !conn.queued && conn.has_rx_work() {
                conn.queued = true;
                self.rx_queue.push_back(id);
            }
        }
    }

    pub(super) fn update_interest(&mut self, id: u64) {
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

    pub(super) fn alloc_local_port(&mut self) -> u32 {
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
