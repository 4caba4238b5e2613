//! One interface's MMDS responder: ARP replies for the MMDS address and a minimal TCP
//! server on port 80 (RFC 9293's passive open, in-order data only, one request and one
//! answer per connection, then FIN).
//!
//! There are no timers: answers are taken by the receive path only when the guest has a
//! buffer for them, so none is lost on the way, and a guest that lost one repeats itself
//! (a retransmitted SYN, a duplicate ACK), which makes the responder send again.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::http::{self, Parsed, MAX_REQUEST};
use super::{bump, Mmds, MmdsCounters};

pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The MMDS's own MAC (Firecracker's): the source of its frames and of its ARP replies.
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// Connections at once. A SYN beyond takes the place of the connection idle longest if it
/// has been idle [`EVICT_IDLE`], else it is refused with RST.
pub const MAX_CONNECTIONS: usize = 16;
pub const EVICT_IDLE: Duration = Duration::from_secs(10);
/// RSTs waiting for a receive buffer; more are dropped (the guest's stack retries).
const MAX_PENDING_RESETS: usize = 16;
/// Answer bytes queued over all connections, at least: beyond, an answer is replaced by 503.
const MIN_ANSWER_BUDGET: usize = 1 << 20;
const PORT: u16 = 80;
/// Largest segment the responder sends or announces.
const MSS: u16 = 1460;
const DEFAULT_PEER_MSS: u16 = 536;

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_LEN: usize = 28;
const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;
const PROTO_TCP: u8 = 6;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// Room a frame the stack writes may need: headers, the MSS option and one segment.
pub const MAX_OUT_FRAME: usize = ETH_LEN + IP_LEN + TCP_LEN + 4 + MSS as usize;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// One's-complement sum of `data` added to `sum` (RFC 1071), not folded.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// A length as sequence space or a checksum term: every length here is at most a 64 KiB
/// frame's.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn tcp_pseudo_sum(src: [u8; 4], dst: [u8; 4], tcp_len: usize) -> u32 {
    let s = csum_add(csum_add(0, &src), &dst);
    s + u32::from(PROTO_TCP) + len32(tcp_len)
}

/// `a` comes after `b` in sequence space (RFC 9293 §3.4).
fn seq_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// A TCP segment from the guest, checked.
struct Segment<'a> {
    mac: [u8; 6],
    ip: [u8; 4],
    port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: &'a [u8],
}

impl Segment<'_> {
    /// Sequence space the segment takes (its data, SYN and FIN).
    fn seq_len(&self) -> u32 {
        len32(self.payload.len())
            + u32::from(self.flags & SYN != 0)
            + u32::from(self.flags & FIN != 0)
    }
}

/// A RST waiting to be sent.
struct Reset {
    mac: [u8; 6],
    ip: [u8; 4],
    port: u16,
    seq: u32,
    /// With ACK, acknowledging this.
    ack: Option<u32>,
}

impl Reset {
    /// RFC 9293 §3.10.7.1: the answer to a segment for no connection.
    fn answering(seg: &Segment) -> Reset {
        let (seq, ack) = if seg.flags & ACK != 0 {
            (seg.ack, None)
        } else {
            (0, Some(seg.seq.wrapping_add(seg.seq_len())))
        };
        Reset {
            mac: seg.mac,
            ip: seg.ip,
            port: seg.port,
            seq,
            ack,
        }
    }
}

/// What to send next on a connection.
struct Out {
    flags: u8,
    seq: u32,
    /// Bytes of the answer: offset and length.
    data: (usize, usize),
}

struct Conn {
    mac: [u8; 6],
    ip: [u8; 4],
    port: u16,
    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    irs: u32,
    rcv_nxt: u32,
    peer_window: u16,
    peer_mss: u16,
    established: bool,
    request: Vec<u8>,
    /// The answer; a FIN follows it.
    answer: Option<Vec<u8>>,
    fin_received: bool,
    needs_ack: bool,
    last_active: Instant,
}

impl Conn {
    fn window(&self) -> u16 {
        if self.answer.is_some() {
            return u16::try_from(MAX_REQUEST).unwrap_or(u16::MAX);
        }
        u16::try_from(MAX_REQUEST - self.request.len()).unwrap_or(u16::MAX)
    }

    /// Offset into the answer of the next byte to send (its length once the FIN is due,
    /// one more once it is sent).
    fn send_offset(&self) -> usize {
        self.snd_nxt.wrapping_sub(self.iss.wrapping_add(1)) as usize
    }

    fn fin_acked(&self) -> bool {
        self.answer.as_ref().is_some_and(|a| {
            self.snd_una
                == self
                    .iss
                    .wrapping_add(1)
                    .wrapping_add(len32(a.len()).wrapping_add(1))
        })
    }

    fn done(&self) -> bool {
        self.fin_received && self.fin_acked() && !self.needs_ack
    }

    fn next(&mut self) -> Option<Out> {
        if !self.established {
            if self.snd_nxt == self.iss {
                self.snd_nxt = self.iss.wrapping_add(1);
                self.needs_ack = false;
                return Some(Out {
                    flags: SYN | ACK,
                    seq: self.iss,
                    data: (0, 0),
                });
            }
            return None;
        }
        if let Some(answer) = &self.answer {
            let off = self.send_offset();
            let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
            let room = u32::from(self.peer_window).saturating_sub(in_flight) as usize;
            if off < answer.len() && room > 0 {
                let n = room.min(usize::from(self.peer_mss)).min(answer.len() - off);
                let last = off + n == answer.len();
                let seq = self.snd_nxt;
                self.snd_nxt = seq.wrapping_add(len32(n) + u32::from(last));
                self.needs_ack = false;
                let flags = ACK | PSH | if last { FIN } else { 0 };
                return Some(Out {
                    flags,
                    seq,
                    data: (off, n),
                });
            }
            if off == answer.len() {
                let seq = self.snd_nxt;
                self.snd_nxt = seq.wrapping_add(1);
                self.needs_ack = false;
                return Some(Out {
                    flags: ACK | FIN,
                    seq,
                    data: (0, 0),
                });
            }
        }
        if self.needs_ack {
            self.needs_ack = false;
            return Some(Out {
                flags: ACK,
                seq: self.snd_nxt,
                data: (0, 0),
            });
        }
        None
    }

    fn wants_to_send(&self) -> bool {
        if !self.established {
            return self.snd_nxt == self.iss;
        }
        if self.needs_ack {
            return true;
        }
        match &self.answer {
            Some(a) => {
                let off = self.send_offset();
                let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
                off == a.len() || (off < a.len() && u32::from(self.peer_window) > in_flight)
            }
            None => false,
        }
    }
}

/// What a segment did to its connection.
enum Next {
    Keep,
    Remove,
    /// Remove it and answer the segment with RST.
    Refuse,
}

/// The MMDS responder of one interface.
pub struct MmdsStack {
    mmds: Arc<Mutex<Mmds>>,
    counters: Arc<MmdsCounters>,
    ip: [u8; 4],
    /// The requester's MAC and IP of an ARP request to answer (the latest wins).
    arp_reply: Option<([u8; 6], [u8; 4])>,
    conns: Vec<Conn>,
    resets: VecDeque<Reset>,
    /// Answer bytes held by the connections.
    queued: usize,
    /// Connection to look at first for the next frame (round robin).
    turn: usize,
    ip_id: u16,
    next_iss: u32,
}

impl MmdsStack {
    pub fn new(mmds: Arc<Mutex<Mmds>>, ip: Ipv4Addr) -> MmdsStack {
        let counters = mmds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counters();
        let mut seed = [0u8; 4];
        // SAFETY: getrandom writes at most 4 bytes into `seed`. A failure leaves zeros:
        // the initial sequence numbers only need to differ between connections.
        unsafe { libc::getrandom(seed.as_mut_ptr().cast(), 4, 0) };
        MmdsStack {
            mmds,
            counters,
            ip: ip.octets(),
            arp_reply: None,
            conns: Vec::new(),
            resets: VecDeque::new(),
            queued: 0,
            turn: 0,
            ip_id: 0,
            next_iss: u32::from_ne_bytes(seed),
        }
    }

    /// Whether a frame (its first bytes are enough: 42) is for the MMDS: an ARP packet
    /// asking for its address, or IPv4 to it.
    pub fn is_mmds_frame(&self, frame: &[u8]) -> bool {
        if frame.len() < ETH_LEN {
            return false;
        }
        match be16(frame, 12) {
            ETHERTYPE_ARP => frame.len() >= ETH_LEN + ARP_LEN && frame[38..42] == self.ip,
            ETHERTYPE_IPV4 => frame.len() >= ETH_LEN + IP_LEN && frame[30..34] == self.ip,
            _ => false,
        }
    }

    /// Counts a frame the transmit path detoured here (Firecracker's `rx_accepted`).
    pub fn note_detoured(&self) {
        bump(&self.counters.rx_accepted);
    }

    /// Takes a frame the guest sent to the MMDS. `csum_partial`: the driver left the TCP
    /// checksum for the device to fill in (VIRTIO_NET_HDR_F_NEEDS_CSUM), so it is not
    /// checked.
    pub fn receive(&mut self, frame: &[u8], csum_partial: bool, now: Instant) {
        if frame.len() < ETH_LEN {
            bump(&self.counters.rx_bad_eth);
            return;
        }
        let mac: [u8; 6] = frame[6..12].try_into().expect("6 bytes");
        match be16(frame, 12) {
            ETHERTYPE_ARP => self.receive_arp(&frame[ETH_LEN..]),
            ETHERTYPE_IPV4 => match self.parse_ipv4(mac, &frame[ETH_LEN..], csum_partial) {
                Ok(Some(seg)) => {
                    bump(&self.counters.rx_count);
                    self.receive_segment(&seg, now);
                }
                Ok(None) => bump(&self.counters.rx_accepted_unusual),
                Err(why) => {
                    bump(&self.counters.rx_accepted_err);
                    rate_limited_warn!("mmds: frame dropped: {}", why);
                }
            },
            _ => bump(&self.counters.rx_accepted_unusual),
        }
    }

    fn receive_arp(&mut self, arp: &[u8]) {
        // Ethernet (1), IPv4, 6-byte and 4-byte addresses, a request (1).
        if arp.len() < ARP_LEN
            || be16(arp, 0) != 1
            || be16(arp, 2) != ETHERTYPE_IPV4
            || arp[4] != 6
            || arp[5] != 4
            || be16(arp, 6) != 1
            || arp[24..28] != self.ip
        {
            bump(&self.counters.rx_accepted_unusual);
            return;
        }
        let sha: [u8; 6] = arp[8..14].try_into().expect("6 bytes");
        let spa: [u8; 4] = arp[14..18].try_into().expect("4 bytes");
        self.arp_reply = Some((sha, spa));
    }

    /// The TCP segment in an IPv4 packet to the MMDS; `Ok(None)` for packets of no use to
    /// it (other protocols, fragments).
    fn parse_ipv4<'a>(
        &self,
        mac: [u8; 6],
        ip: &'a [u8],
        csum_partial: bool,
    ) -> Result<Option<Segment<'a>>, &'static str> {
        if ip.len() < IP_LEN || ip[0] >> 4 != 4 {
            return Err("not an IPv4 header");
        }
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(be16(ip, 2));
        if ihl < IP_LEN || total < ihl || total > ip.len() {
            return Err("bad IPv4 header or total length");
        }
        if csum_fold(csum_add(0, &ip[..ihl])) != 0xffff {
            return Err("bad IPv4 header checksum");
        }
        // More fragments, or an offset: the MMDS does not reassemble.
        if be16(ip, 6) & 0x3fff != 0 || ip[9] != PROTO_TCP {
            return Ok(None);
        }
        let src: [u8; 4] = ip[12..16].try_into().expect("4 bytes");
        let tcp = &ip[ihl..total];
        if tcp.len() < TCP_LEN {
            return Err("TCP segment shorter than its header");
        }
        let doff = usize::from(tcp[12] >> 4) * 4;
        if doff < TCP_LEN || doff > tcp.len() {
            return Err("bad TCP data offset");
        }
        if !csum_partial
            && csum_fold(csum_add(tcp_pseudo_sum(src, self.ip, tcp.len()), tcp)) != 0xffff
        {
            return Err("bad TCP checksum");
        }
        let mut mss = None;
        let mut opts = &tcp[TCP_LEN..doff];
        while let [kind, rest @ ..] = opts {
            match kind {
                0 => break,
                1 => opts = rest,
                _ => {
                    let Some(&len) = rest.first() else { break };
                    let len = usize::from(len);
                    if len < 2 || len > opts.len() {
                        break;
                    }
                    if *kind == 2 && len == 4 {
                        mss = Some(be16(opts, 2));
                    }
                    opts = &opts[len..];
                }
            }
        }
        Ok(Some(Segment {
            mac,
            ip: src,
            port: be16(tcp, 0),
            dst_port: be16(tcp, 2),
            seq: be32(tcp, 4),
            ack: be32(tcp, 8),
            flags: tcp[13],
            window: be16(tcp, 14),
            mss,
            payload: &tcp[doff..],
        }))
    }

    fn push_reset(&mut self, r: Reset) {
        if self.resets.len() < MAX_PENDING_RESETS {
            self.resets.push_back(r);
        }
    }

    fn receive_segment(&mut self, seg: &Segment, now: Instant) {
        let found = self
            .conns
            .iter()
            .position(|c| c.ip == seg.ip && c.port == seg.port);
        let Some(i) = found else {
            return self.new_connection(seg, now);
        };
        match self.on_segment(i, seg, now) {
            Next::Keep => {
                if self.conns[i].done() {
                    self.remove(i);
                }
            }
            Next::Remove => self.remove(i),
            Next::Refuse => {
                self.remove(i);
                self.push_reset(Reset::answering(seg));
            }
        }
    }

    fn new_connection(&mut self, seg: &Segment, now: Instant) {
        if seg.flags & RST != 0 {
            return;
        }
        if seg.flags & (SYN | ACK | FIN) != SYN || seg.dst_port != PORT {
            return self.push_reset(Reset::answering(seg));
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            let oldest = (0..self.conns.len()).min_by_key(|&i| self.conns[i].last_active);
            match oldest {
                Some(i)
                    if now.saturating_duration_since(self.conns[i].last_active) >= EVICT_IDLE =>
                {
                    let c = &self.conns[i];
                    let r = Reset {
                        mac: c.mac,
                        ip: c.ip,
                        port: c.port,
                        seq: c.snd_nxt,
                        ack: Some(c.rcv_nxt),
                    };
                    self.remove(i);
                    self.push_reset(r);
                }
                _ => {
                    rate_limited_warn!(
                        "mmds: {} connections open; a new one is refused",
                        MAX_CONNECTIONS
                    );
                    return self.push_reset(Reset::answering(seg));
                }
            }
        }
        let iss = self.next_iss;
        // Far apart, so that a connection's numbers never meet the next one's.
        self.next_iss = iss.wrapping_add(0x0100_0000);
        let rcv_nxt = seg.seq.wrapping_add(1);
        self.conns.push(Conn {
            mac: seg.mac,
            ip: seg.ip,
            port: seg.port,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            irs: seg.seq,
            rcv_nxt,
            peer_window: seg.window,
            peer_mss: seg.mss.unwrap_or(DEFAULT_PEER_MSS).clamp(64, MSS),
            established: false,
            request: Vec::new(),
            answer: None,
            fin_received: false,
            needs_ack: false,
            last_active: now,
        });
        bump(&self.counters.connections_created);
    }

    fn on_segment(&mut self, i: usize, seg: &Segment, now: Instant) -> Next {
        let c = &mut self.conns[i];
        c.last_active = now;
        if seg.flags & RST != 0 {
            // RFC 5961 §3.2, simplified: only an in-window RST ends the connection.
            let off = seg.seq.wrapping_sub(c.rcv_nxt);
            return if off <= u32::from(c.window()) {
                Next::Remove
            } else {
                Next::Keep
            };
        }
        if seg.flags & SYN != 0 {
            if !c.established && seg.seq == c.irs && seg.flags & ACK == 0 {
                // Our SYN-ACK did not arrive (or was dropped): send it again.
                c.snd_nxt = c.iss;
            } else {
                // RFC 5961 §4.2: a SYN on a synchronized connection gets a challenge ACK.
                c.needs_ack = true;
            }
            return Next::Keep;
        }
        if seg.flags & ACK == 0 {
            return Next::Keep;
        }
        if !c.established {
            if seg.ack != c.iss.wrapping_add(1) {
                return Next::Refuse;
            }
            c.established = true;
            c.snd_una = seg.ack;
        } else if seq_gt(seg.ack, c.snd_nxt) {
            // Acknowledges what was never sent.
            c.needs_ack = true;
            return Next::Keep;
        } else if seq_gt(seg.ack, c.snd_una) {
            c.snd_una = seg.ack;
        } else if seg.ack == c.snd_una
            && seg.payload.is_empty()
            && seg.flags & FIN == 0
            && c.snd_nxt != c.snd_una
            && seg.window == c.peer_window
        {
            // A duplicate ACK: the guest is missing what follows; send it again.
            c.snd_nxt = c.snd_una;
        }
        c.peer_window = seg.window;

        let carries = !seg.payload.is_empty() || seg.flags & FIN != 0;
        if carries {
            let off = c.rcv_nxt.wrapping_sub(seg.seq) as usize;
            if seq_gt(seg.seq, c.rcv_nxt) || off > seg.payload.len() {
                // Out of order (ahead of what we have) or entirely old: say where we are.
                c.needs_ack = true;
                return Next::Keep;
            }
            let new = &seg.payload[off..];
            let take = if c.answer.is_none() {
                new.len().min(MAX_REQUEST - c.request.len())
            } else {
                // Bytes after the request are not read, only acknowledged.
                new.len()
            };
            if c.answer.is_none() {
                c.request.extend_from_slice(&new[..take]);
            }
            c.rcv_nxt = c.rcv_nxt.wrapping_add(len32(take));
            c.needs_ack = true;
            if seg.flags & FIN != 0 && take == new.len() && !c.fin_received {
                c.fin_received = true;
                c.rcv_nxt = c.rcv_nxt.wrapping_add(1);
            }
        }
        if carries && self.conns[i].answer.is_none() {
            self.answer(i, now);
        }
        Next::Keep
    }

    /// Answers the connection's request once it is complete (or can never be).
    fn answer(&mut self, i: usize, now: Instant) {
        let c = &self.conns[i];
        let (response, http10) = match http::parse(&c.request) {
            Parsed::Complete(req) => {
                let mut mmds = self.mmds.lock().unwrap_or_else(PoisonError::into_inner);
                (http::respond(&mut mmds, &req, now), req.http10)
            }
            Parsed::Invalid(why) => (http::bad_request(why), false),
            Parsed::Incomplete if c.request.len() >= MAX_REQUEST => (http::too_large(), false),
            Parsed::Incomplete if c.fin_received && c.request.is_empty() => {
                // Closed without asking anything: only a FIN back.
                self.conns[i].answer = Some(Vec::new());
                return;
            }
            Parsed::Incomplete if c.fin_received => {
                (http::bad_request("the request ended early"), false)
            }
            Parsed::Incomplete => return,
        };
        let limit = self
            .mmds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .limit();
        let budget = MIN_ANSWER_BUDGET.max(limit.saturating_mul(2));
        let mut bytes = response.to_bytes(http10);
        if self.queued.saturating_add(bytes.len()) > budget {
            bump(&self.counters.tx_errors);
            bytes = http::busy().to_bytes(http10);
        }
        self.queued += bytes.len();
        let c = &mut self.conns[i];
        c.request = Vec::new();
        c.answer = Some(bytes);
    }

    fn remove(&mut self, i: usize) {
        let c = self.conns.swap_remove(i);
        self.queued -= c.answer.map_or(0, |a| a.len());
        bump(&self.counters.connections_destroyed);
    }

    /// Whether a frame waits for the guest.
    pub fn has_frame(&self) -> bool {
        self.arp_reply.is_some()
            || !self.resets.is_empty()
            || self.conns.iter().any(Conn::wants_to_send)
    }

    /// Writes the next frame for the guest (no virtio-net header) into `buf`, which must
    /// hold [`MAX_OUT_FRAME`] bytes; returns its length.
    pub fn write_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        let n = self.next_frame(buf)?;
        bump(&self.counters.tx_frames);
        self.counters
            .tx_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Some(n)
    }

    fn next_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        if let Some((mac, ip)) = self.arp_reply.take() {
            return Some(self.write_arp_reply(buf, mac, ip));
        }
        if let Some(r) = self.resets.pop_front() {
            let flags = RST | if r.ack.is_some() { ACK } else { 0 };
            let t = Tcp {
                mac: r.mac,
                ip: r.ip,
                port: r.port,
                seq: r.seq,
                ack: r.ack.unwrap_or(0),
                flags,
                window: 0,
                mss: false,
            };
            return Some(self.write_tcp(buf, &t, &[]));
        }
        let n = self.conns.len();
        for k in 0..n {
            let i = (self.turn + k) % n;
            let Some(out) = self.conns[i].next() else {
                continue;
            };
            self.turn = i + 1;
            let c = &self.conns[i];
            let t = Tcp {
                mac: c.mac,
                ip: c.ip,
                port: c.port,
                seq: out.seq,
                ack: c.rcv_nxt,
                flags: out.flags,
                window: c.window(),
                mss: out.flags & SYN != 0,
            };
            let (off, len) = out.data;
            let answer = c.answer.as_deref().unwrap_or(&[]);
            // Split borrow: the frame is written from a copy of the slice bounds.
            let payload = answer[off..off + len].to_vec();
            let len = self.write_tcp(buf, &t, &payload);
            if self.conns[i].done() {
                self.remove(i);
            }
            return Some(len);
        }
        None
    }

    fn write_arp_reply(&self, buf: &mut [u8], mac: [u8; 6], ip: [u8; 4]) -> usize {
        buf[0..6].copy_from_slice(&mac);
        buf[6..12].copy_from_slice(&MMDS_MAC);
        buf[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        let a = &mut buf[ETH_LEN..ETH_LEN + ARP_LEN];
        a[0..2].copy_from_slice(&1u16.to_be_bytes());
        a[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        a[4] = 6;
        a[5] = 4;
        a[6..8].copy_from_slice(&2u16.to_be_bytes());
        a[8..14].copy_from_slice(&MMDS_MAC);
        a[14..18].copy_from_slice(&self.ip);
        a[18..24].copy_from_slice(&mac);
        a[24..28].copy_from_slice(&ip);
        ETH_LEN + ARP_LEN
    }

    fn write_tcp(&mut self, buf: &mut [u8], t: &Tcp, payload: &[u8]) -> usize {
        let opt_len = if t.mss { 4 } else { 0 };
        let tcp_len = TCP_LEN + opt_len + payload.len();
        let total = IP_LEN + tcp_len;
        buf[0..6].copy_from_slice(&t.mac);
        buf[6..12].copy_from_slice(&MMDS_MAC);
        buf[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = &mut buf[ETH_LEN..ETH_LEN + total];
        ip[0] = 0x45;
        ip[1] = 0;
        // At most MAX_OUT_FRAME: the payload is at most the MSS.
        ip[2..4].copy_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
        ip[4..6].copy_from_slice(&self.ip_id.to_be_bytes());
        self.ip_id = self.ip_id.wrapping_add(1);
        ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[10..12].fill(0);
        ip[12..16].copy_from_slice(&self.ip);
        ip[16..20].copy_from_slice(&t.ip);
        let c = !csum_fold(csum_add(0, &ip[..IP_LEN]));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let tcp = &mut ip[IP_LEN..];
        tcp[0..2].copy_from_slice(&PORT.to_be_bytes());
        tcp[2..4].copy_from_slice(&t.port.to_be_bytes());
        tcp[4..8].copy_from_slice(&t.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&t.ack.to_be_bytes());
        // Data offset in 32-bit words: 5, or 6 with the MSS option.
        tcp[12] = if t.mss { 6 << 4 } else { 5 << 4 };
        tcp[13] = t.flags;
        tcp[14..16].copy_from_slice(&t.window.to_be_bytes());
        tcp[16..20].fill(0);
        if t.mss {
            let [hi, lo] = MSS.to_be_bytes();
            tcp[20..24].copy_from_slice(&[2, 4, hi, lo]);
        }
        tcp[TCP_LEN + opt_len..].copy_from_slice(payload);
        let c = !csum_fold(csum_add(tcp_pseudo_sum(self.ip, t.ip, tcp_len), tcp));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        ETH_LEN + total
    }

    /// Forgets every connection and pending frame (the driver reset the device).
    pub fn reset(&mut self) {
        let n = self.conns.len() as u64;
        self.counters
            .connections_destroyed
            .fetch_add(n, Ordering::Relaxed);
        self.conns.clear();
        self.resets.clear();
        self.arp_reply = None;
        self.queued = 0;
    }

    /// Connections open (for tests and metrics).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

/// The header fields of a segment to write.
struct Tcp {
    mac: [u8; 6],
    ip: [u8; 4],
    port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: bool,
}

#[cfg(test)]
mod tests;
