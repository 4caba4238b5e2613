//! One vsock connection: where it is in the protocol, the credit counters both ways, the
//! guest bytes held for its host socket, and the packets it owes the guest.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::muxer::BUF_ALLOC;
use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};

/// Control packets a connection owes the guest.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Owed {
    pub(super) request: bool,
    pub(super) response: bool,
    pub(super) shutdown: bool,
    pub(super) credit_update: bool,
    pub(super) rst: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Host-initiated, reading the `CONNECT <port>\n` line.
    AwaitConnect(Vec<u8>),
    /// Host-initiated, REQUEST sent (or owed), waiting for the guest's RESPONSE.
    LocalInit,
    Established,
}

pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) state: State,
    pub(super) host_port: u32,
    pub(super) guest_port: u32,
    /// Host-initiated: `host_port` is one of ours.
    pub(super) local: bool,
    /// Guest bytes the host socket did not take yet (at most BUF_ALLOC).
    pub(super) tx_buf: VecDeque<u8>,
    /// Bytes received from the guest / written to the host socket (virtio's fwd_cnt).
    pub(super) recv_cnt: u32,
    pub(super) fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    pub(super) fwd_cnt_sent: u32,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub(super) rx_cnt: u32,
    pub(super) owed: Owed,
    /// The host socket has data (or EOF, or an error) to read.
    pub(super) readable: bool,
    pub(super) host_eof: bool,
    /// The host socket hung up: no longer in the epoll set.
    pub(super) hup: bool,
    pub(super) guest_shut_send: bool,
    pub(super) guest_shut_rcv: bool,
    /// RST once the held guest bytes reached the host (the guest closed).
    pub(super) rst_after_flush: bool,
    /// In the rx queue.
    pub(super) queued: bool,
    /// LocalInit: when the guest's RESPONSE is due.
    pub(super) deadline: Option<Instant>,
    pub(super) interest: Option<EventSet>,
}

impl Conn {
    pub(super) fn new(
        stream: UnixStream,
        state: State,
        host_port: u32,
        guest_port: u32,
        local: bool,
    ) -> Self {
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
    pub(super) fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    pub(super) fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && !self.owed.rst
            && self.peer_credit() > 0
    }

    pub(super) fn has_rx_work(&self) -> bool {
        let o = self.owed;
        o.request || o.response || o.shutdown || o.credit_update || o.rst || self.can_send_data()
    }

    /// The events to watch now: read when we do not know the socket is readable, write
    /// while guest bytes wait for it.
    pub(super) fn wanted(&self) -> Option<EventSet> {
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

    pub(super) fn header(&self, op: u16, guest_cid: u64) -> Header {
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
    pub(super) fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(counted(n));
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
    pub(super) fn send_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        self.recv_cnt = self.recv_cnt.wrapping_add(counted(data.len()));
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
            self.fwd_cnt = self.fwd_cnt.wrapping_add(counted(done));
        }
        self.tx_buf.extend(&data[done..]);
        Ok(())
    }

    /// Owe the guest a CREDIT_UPDATE when the space it believes we have fell below half and
    /// we have freed some since we last told it.
    pub(super) fn note_credit(&mut self) {
        let believed_used = self.recv_cnt.wrapping_sub(self.fwd_cnt_sent);
        if self.fwd_cnt != self.fwd_cnt_sent
            && BUF_ALLOC.saturating_sub(believed_used) < BUF_ALLOC / 2
        {
            self.owed.credit_update = true;
        }
    }
}

/// `n` bytes in a credit counter or a header's `len`: the counters count mod 2^32 (virtio
/// 1.2 §5.10.6.3), and every `n` here is at most one buffer ([`BUF_ALLOC`]).
#[allow(clippy::cast_possible_truncation)]
fn counted(n: usize) -> u32 {
    n as u32
}

/// The next packet `conn` owes the guest, in the order the protocol needs.
pub(super) fn next_packet(
    conn: &mut Conn,
    guest_cid: u64,
    payload: &mut [u8],
) -> Option<(Header, usize)> {
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
                conn.rx_cnt = conn.rx_cnt.wrapping_add(counted(n));
                let mut h = conn.header(op::RW, guest_cid);
                h.len = counted(n);
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
