//! virtio-vsock driven through the virtio-mmio registers by the host-side driver harness,
//! with real Unix sockets on the host side.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use super::packet::{op, shutdown, Header, HDR_LEN, HOST_CID, TYPE_STREAM};
use super::{check_uds_path, MuxerError};
use super::{Vsock, BUF_ALLOC, MAX_CONNECTIONS, RX_QUEUE, TX_QUEUE};
use crate::test_utils::TempDir;
use crate::virtio::testing::{regs, used_ring, Buf, Driver};
use crate::virtio::{device_type, features};

const CID: u64 = 3;
const RX_BUF: u32 = HDR_LEN as u32 + 4096;
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A guest driver for the device: rx buffers kept posted, packets sent one at a time.
struct Guest {
    d: Driver,
    _dir: TempDir,
    uds: PathBuf,
    /// Descriptor head -> buffer address of each posted rx buffer.
    rx_posted: HashMap<u16, u64>,
    rx_free: Vec<u64>,
    rx_seen: u16,
    tx_hdr: u64,
    tx_data: u64,
    /// The tx queue's avail index.
    tx_published: u16,
}

impl Guest {
    fn new() -> Guest {
        Guest::with_rx_buffers(32)
    }

    fn with_rx_buffers(n: usize) -> Guest {
        let dir = TempDir::new();
        let uds = dir.path().join("v.sock");
        let dev = Vsock::new(CID, &uds).unwrap();
        let mut d = Driver::new(Box::new(dev));
        d.queue_size = 64;
        let f = d.device_features();
        d.start_queues(f, 3);
        let tx_hdr = d.alloc(HDR_LEN as u64);
        let tx_data = d.alloc(128 << 10);
        let rx_free = (0..n).map(|_| d.alloc(u64::from(RX_BUF))).collect();
        let mut g = Guest {
            d,
            _dir: dir,
            uds,
            rx_posted: HashMap::new(),
            rx_free,
            rx_seen: 0,
            tx_hdr,
            tx_data,
            tx_published: 0,
        };
        g.post_rx();
        g
    }

    /// Posts every free rx buffer and notifies the rx queue.
    fn post_rx(&mut self) {
        while let Some(addr) = self.rx_free.pop() {
            let head = self
                .d
                .add_chain_to(RX_QUEUE as u32, &[Buf::writable(addr, RX_BUF)]);
            self.d.publish_to(RX_QUEUE as u32, head);
            self.rx_posted.insert(head, addr);
        }
        self.d.kick(RX_QUEUE as u32);
    }

    /// Sends one packet (header and payload in two readable descriptors).
    fn send(&mut self, hdr: Header, payload: &[u8]) {
        self.publish_tx(hdr, payload);
        self.d.kick(TX_QUEUE as u32);
    }

    /// Sends one packet as Linux's driver does with EVENT_IDX (negotiated here): it kicks only
    /// when its new avail index passes the avail_event the device published (virtio 1.2
    /// §2.7.10, vring_need_event). Returns whether it kicked.
    fn send_as_linux(&mut self, hdr: Header, payload: &[u8]) -> bool {
        let old = self.tx_published;
        self.publish_tx(hdr, payload);
        let new = self.tx_published;
        let event = self.avail_event(TX_QUEUE as u32);
        let kick = new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old);
        if kick {
            self.d.kick(TX_QUEUE as u32);
        }
        kick
    }

    /// The avail_event the device published for queue `q` (after the used ring's entries).
    fn avail_event(&self, q: u32) -> u16 {
        use vm_memory::{Bytes, GuestAddress};
        let at = used_ring(q) + 4 + 8 * u64::from(self.d.queue_size);
        self.d.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Puts one packet in the tx queue (header and payload in two readable descriptors).
    fn publish_tx(&mut self, hdr: Header, payload: &[u8]) {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        use vm_memory::{Bytes, GuestAddress};
        self.d
            .mem
            .write_slice(&hdr.to_bytes(), GuestAddress(self.tx_hdr))
            .unwrap();
        self.d
            .mem
            .write_slice(payload, GuestAddress(self.tx_data))
            .unwrap();
        let mut bufs = vec![Buf::readable(self.tx_hdr, HDR_LEN as u32)];
        if !payload.is_empty() {
            bufs.push(Buf::readable(self.tx_data, payload.len() as u32));
        }
        let head = self.d.add_chain_to(TX_QUEUE as u32, &bufs);
        self.d.publish_to(TX_QUEUE as u32, head);
        self.tx_published = self.tx_published.wrapping_add(1);
    }

    /// Lets the device see its sockets (as the event loop would when its epoll fd is ready)
    /// and finish any work it rescheduled.
    fn pump(&mut self) {
        self.d.handler.process_device_fd(0);
        self.d.run_turns(TX_QUEUE as u32, 100);
    }

    /// The packets the device put in the rx queue since the last call; their buffers are
    /// posted again.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.d.used_idx_of(RX_QUEUE as u32) {
            let (id, len) = self.d.used_elem_of(RX_QUEUE as u32, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = self
                .rx_posted
                .remove(&(id as u16))
                .expect("a posted buffer");
            let bytes = self.d.read_bytes(addr, len as usize);
            let hdr = Header::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
            assert_eq!(hdr.len as usize, len as usize - HDR_LEN, "{hdr:?}");
            out.push((hdr, bytes[HDR_LEN..].to_vec()));
            self.rx_free.push(addr);
        }
        if !out.is_empty() {
            self.post_rx();
        }
        out
    }

    fn pump_recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.pump();
        self.recv()
    }

    fn connections(&self) -> usize {
        self.d
            .device::<Vsock>()
            .with(|v| v.muxer().connection_count())
    }

    fn held_bytes(&self) -> usize {
        self.d.device::<Vsock>().with(|v| v.muxer().held_bytes())
    }

    /// A host process connecting to guest port `port`: returns the stream after `OK`, and
    /// the local port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let p = self.pump_recv();
        assert_eq!(p.len(), 1, "{p:?}");
        let req = p[0].0;
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port, req.type_),
            (op::REQUEST, HOST_CID, CID, port, TYPE_STREAM)
        );
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        self.send(reply(&req, op::RESPONSE, 1 << 20, 0), &[]);
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            s.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        assert_eq!(
            String::from_utf8(line).unwrap(),
            format!("OK {}\n", req.src_port)
        );
        (s, req.src_port)
    }
}

/// A guest packet on the connection `to` came from (ports swapped).
fn reply(to: &Header, op: u16, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: to.dst_port,
        dst_port: to.src_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// A guest packet from guest port `gport` to host port `hport`.
fn guest_pkt(gport: u32, hport: u32, op: u16, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: gport,
        dst_port: hport,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// The host end sees the connection closed: EOF, or a reset when it had sent bytes that
/// were never read.
fn assert_closed(s: &mut UnixStream) {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("connection still open: {other:?}"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[test]
fn is_a_vsock_device_with_the_guest_cid_in_config_space() {
    let dir = TempDir::new();
    let dev = Vsock::new(0x1_0000_0007, &dir.path().join("v.sock")).unwrap();
    let mut d = Driver::new(Box::new(dev));
    assert_eq!(d.read32(regs::DEVICE_ID), device_type::VSOCK);
    assert_eq!(d.read32(regs::DEVICE_ID), 19);
    assert_eq!(d.read32(regs::CONFIG), 7);
    assert_eq!(d.read32(regs::CONFIG + 4), 1);
    assert_eq!(
        d.device_features() & features::VERSION_1,
        features::VERSION_1
    );
    // Three queues.
    for q in 0..3 {
        d.write32(regs::QUEUE_SEL, q);
        assert_eq!(d.read32(regs::QUEUE_NUM_MAX), 256);
    }
    d.write32(regs::QUEUE_SEL, 3);
    assert_eq!(d.read32(regs::QUEUE_NUM_MAX), 0);
}

#[test]
fn host_initiated_connection_gets_ok_and_bytes_flow_both_ways() {
    let mut g = Guest::new();
    let (mut s, local) = g.host_connect(52);
    assert_eq!(local, FIRST_LOCAL_PORT);
    // Host -> guest.
    let data = pattern(10_000, 1);
    s.write_all(&data).unwrap();
    let mut got = Vec::new();
    for (h, p) in g.pump_recv() {
        assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, local, 52));
        got.extend(p);
    }
    assert_eq!(got, data);
    // Guest -> host.
    let back = pattern(30_000, 9);
    g.send(
        guest_pkt(52, local, op::RW, 1 << 20, got.len() as u32),
        &back,
    );
    let mut read = vec![0u8; back.len()];
    s.read_exact(&mut read).unwrap();
    assert_eq!(read, back);
    assert_eq!(g.connections(), 1);
}

#[test]
fn guest_connections_reach_a_listener_at_uds_path_port_and_get_rst_without_one() {
    let mut g = Guest::new();
    // Nobody listens on port 1234 yet: RST.
    g.send(guest_pkt(5000, 1234, op::REQUEST, 1 << 20, 0), &[]);
    let p = g.pump_recv();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].0.op, p[0].0.src_port, p[0].0.dst_port, p[0].0.dst_cid),
        (op::RST, 1234, 5000, CID)
    );
    assert_eq!(g.connections(), 0);
    // With a listener at <uds_path>_1234.
    let mut path = g.uds.clone().into_os_string();
    path.push("_1234");
    let listener = UnixListener::bind(&path).unwrap();
    g.send(guest_pkt(5001, 1234, op::REQUEST, 1 << 20, 0), &[]);
    let p = g.pump_recv();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].0.op, p[0].0.src_port, p[0].0.dst_port),
        (op::RESPONSE, 1234, 5001)
    );
    let (mut host, _) = listener.accept().unwrap();
    g.send(guest_pkt(5001, 1234, op::RW, 1 << 20, 0), b"hello host");
    let mut b = [0u8; 10];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello host");
    host.write_all(b"hello guest").unwrap();
    let p = g.pump_recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1, b"hello guest");
    drop(listener);
}

#[test]
fn packets_for_no_connection_and_bad_packets_get_rst() {
    let mut g = Guest::new();
    let (_s, local) = g.host_connect(7);
    // Data, a credit request and a shutdown for a connection that does not exist.
    for o in [op::RW, op::CREDIT_REQUEST, op::SHUTDOWN, op::RESPONSE] {
        g.send(guest_pkt(9, 77, o, 4096, 0), b"x");
        let p = g.pump_recv();
        assert_eq!(p.len(), 1, "op {o}");
        assert_eq!((p[0].0.op, p[0].0.dst_port), (op::RST, 9), "op {o}");
    }
    // An RST for nothing is not answered.
    g.send(guest_pkt(9, 77, op::RST, 4096, 0), &[]);
    assert!(g.pump_recv().is_empty());
    // An unknown op on a live connection resets it.
    g.send(guest_pkt(7, local, 99, 4096, 0), &[]);
    let p = g.pump_recv();
    assert_eq!((p[0].0.op, p[0].0.dst_port), (op::RST, 7));
    assert_eq!(g.connections(), 0);
    // A second REQUEST on a live connection resets it too.
    let (_s2, local2) = g.host_connect(8);
    g.send(guest_pkt(8, local2, op::REQUEST, 4096, 0), &[]);
    assert_eq!(g.pump_recv()[0].0.op, op::RST);
    assert_eq!(g.connections(), 0);
}

#[test]
fn the_guests_credit_bounds_what_the_host_can_push() {
    let mut g = Guest::new();
    let (mut s, local) = g.host_connect(52);
    // The guest takes 8 KiB: announce that.
    g.send(guest_pkt(52, local, op::CREDIT_UPDATE, 8192, 0), &[]);
    let data = pattern(100_000, 3);
    s.set_nonblocking(true).unwrap();
    let written = s.write(&data).unwrap();
    assert!(written >= 20_000, "the socket buffer took only {written}");
    let mut got = Vec::new();
    for (h, p) in g.pump_recv() {
        assert_eq!(h.op, op::RW);
        got.extend(p);
    }
    assert_eq!(got.len(), 8192, "sent past the guest's credit");
    // Nothing more until the guest says it consumed some.
    assert!(g.pump_recv().is_empty());
    g.send(guest_pkt(52, local, op::CREDIT_UPDATE, 8192, 4096), &[]);
    let more: Vec<u8> = g.pump_recv().into_iter().flat_map(|(_, p)| p).collect();
    assert_eq!(more.len(), 4096);
    got.extend(more);
    // Then a large window lets the rest through, in order.
    let mut fwd = 8192 + 4096;
    while got.len() < written {
        g.send(
            guest_pkt(52, local, op::CREDIT_UPDATE, 1 << 20, fwd as u32),
            &[],
        );
        let p = g.pump_recv();
        assert!(!p.is_empty(), "stalled at {} of {written}", got.len());
        for (_, payload) in p {
            fwd += payload.len();
            got.extend(payload);
        }
    }
    assert_eq!(&got[..], &data[..written]);
}

#[test]
fn a_host_peer_that_stops_reading_holds_at_most_the_credit_then_a_greedy_guest_is_reset() {
    let mut g = Guest::new();
    let (s, local) = g.host_connect(52);
    // The host never reads. The guest sends as its credit allows.
    let chunk = pattern(16 << 10, 5);
    let (mut sent, mut fwd_cnt, mut buf_alloc) = (0u64, 0u32, BUF_ALLOC);
    for _ in 0..10_000 {
        let credit = u64::from(buf_alloc) - (sent - u64::from(fwd_cnt));
        if credit < chunk.len() as u64 {
            // Ask, as a driver would, and look at what comes back.
            g.send(guest_pkt(52, local, op::CREDIT_REQUEST, 1 << 20, 0), &[]);
            let p = g.pump_recv();
            let Some((h, _)) = p.last() else { break };
            if h.fwd_cnt == fwd_cnt {
                break;
            }
            (fwd_cnt, buf_alloc) = (h.fwd_cnt, h.buf_alloc);
            continue;
        }
        g.send(guest_pkt(52, local, op::RW, 1 << 20, 0), &chunk);
        sent += chunk.len() as u64;
        assert!(g.held_bytes() <= BUF_ALLOC as usize);
    }
    // The host socket's buffer filled, then wisp held at most one credit's worth.
    assert!(sent >= u64::from(BUF_ALLOC), "sent {sent}");
    assert!(sent < 100 << 20, "no back-pressure after {sent} bytes");
    let held = g.held_bytes();
    assert!(held > 0 && held <= BUF_ALLOC as usize, "held {held}");
    assert_eq!(u64::from(fwd_cnt) + held as u64, sent);
    // A guest that ignores its credit is reset, and what was held is gone.
    g.send(guest_pkt(52, local, op::RW, 1 << 20, 0), &chunk);
    let p = g.pump_recv();
    assert_eq!(p.last().unwrap().0.op, op::RST);
    assert_eq!(g.held_bytes(), 0);
    assert_eq!(g.connections(), 0);
    drop(s);
}

#[test]
fn a_guest_that_stops_reading_stops_the_host_writer_without_wisp_buffering() {
    // One rx buffer only, never given back: the guest reads nothing more.
    let mut g = Guest::with_rx_buffers(2);
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    g.pump();
    let req = g.recv()[0].0;
    g.send(reply(&req, op::RESPONSE, 1 << 20, 0), &[]);
    let mut ok = [0u8; 14];
    s.read_exact(&mut ok).unwrap();
    // Buffers are not re-posted from here on.
    g.rx_free.clear();
    s.set_nonblocking(true).unwrap();
    let mut written = 0usize;
    let block = vec![7u8; 64 << 10];
    for _ in 0..1000 {
        match s.write(&block) {
            Ok(n) => written += n,
            Err(_) => break,
        }
        g.d.handler.process_device_fd(0);
        g.d.run_turns(TX_QUEUE as u32, 100);
    }
    // The host writer is blocked by its socket buffer; wisp holds nothing.
    assert!(
        written < 64 << 20,
        "host wrote {written} bytes without blocking"
    );
    assert_eq!(g.held_bytes(), 0);
    assert_eq!(g.connections(), 1);
}

#[test]
fn host_close_becomes_shutdown_and_the_guests_rst_ends_the_connection() {
    let mut g = Guest::new();
    let (mut s, local) = g.host_connect(52);
    s.write_all(b"last words").unwrap();
    drop(s);
    let p = g.pump_recv();
    let ops: Vec<u16> = p.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, [op::RW, op::SHUTDOWN], "{p:?}");
    assert_eq!(p[0].1, b"last words");
    assert_eq!(p[1].0.flags, shutdown::RCV | shutdown::SEND);
    assert_eq!(g.connections(), 1);
    g.send(guest_pkt(52, local, op::RST, 1 << 20, 10), &[]);
    g.pump();
    assert_eq!(g.connections(), 0);
}

/// A host stream that used up the guest's credit exactly, then ended: only the guest's
/// CREDIT_UPDATE can get the device to read the host's EOF, and Linux's driver (EVENT_IDX)
/// kicks for it only if the device asked for a kick at that index. Seen with a Linux guest:
/// 256 KiB from the host filled its credit and the stream never ended.
#[test]
fn a_credit_update_sent_as_linux_sends_it_reaches_the_device_and_the_hosts_end_follows() {
    let mut g = Guest::new();
    let (mut s, local) = g.host_connect(52);
    g.send(guest_pkt(52, local, op::CREDIT_UPDATE, 4096, 0), &[]);
    s.write_all(&pattern(4096, 1)).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let p = g.pump_recv();
    let ops: Vec<u16> = p.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, [op::RW], "{p:?}");
    assert_eq!(p[0].1, pattern(4096, 1));
    // The guest read it all; nothing happens on the host side from now on.
    assert!(
        g.send_as_linux(guest_pkt(52, local, op::CREDIT_UPDATE, 4096, 4096), &[]),
        "the device asked for no kick at the guest's next tx chain"
    );
    let p = g.recv();
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].0.op, p[0].0.flags),
        (op::SHUTDOWN, shutdown::RCV | shutdown::SEND)
    );
}

/// Out of rx buffers with packets to deliver, the device asks for a kick at the next buffer
/// (avail_event), and delivers once it comes.
#[test]
fn a_device_out_of_rx_buffers_asks_for_a_kick_at_the_next_one() {
    let mut g = Guest::with_rx_buffers(1);
    // Two refused connections: two RSTs for one buffer.
    g.send(guest_pkt(5000, 1234, op::REQUEST, 1 << 20, 0), &[]);
    g.send(guest_pkt(5001, 1234, op::REQUEST, 1 << 20, 0), &[]);
    assert_eq!(g.d.used_idx_of(RX_QUEUE as u32), 1);
    assert_eq!(g.avail_event(RX_QUEUE as u32), 1);
    let p = g.recv();
    assert_eq!((p.len(), p[0].0.dst_port), (1, 5000));
    let p = g.recv();
    assert_eq!((p.len(), p[0].0.op, p[0].0.dst_port), (1, op::RST, 5001));
}

#[test]
fn guest_close_reaches_the_host_as_eof_after_its_data_and_is_answered_with_rst() {
    let mut g = Guest::new();
    let (mut s, local) = g.host_connect(52);
    g.send(guest_pkt(52, local, op::RW, 1 << 20, 0), b"bye");
    let mut h = guest_pkt(52, local, op::SHUTDOWN, 1 << 20, 0);
    h.flags = shutdown::RCV | shutdown::SEND;
    g.send(h, &[]);
    let p = g.pump_recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0.op, op::RST);
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"bye");
    assert_eq!(g.connections(), 0);
}

#[test]
fn many_concurrent_streams_keep_their_bytes_apart() {
    let mut g = Guest::with_rx_buffers(48);
    let mut conns = Vec::new();
    for i in 0..16u32 {
        conns.push(g.host_connect(100 + i));
    }
    let locals: Vec<u32> = conns.iter().map(|(_, l)| *l).collect();
    let mut unique = locals.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 16, "local ports reused: {locals:?}");
    for (i, (s, _)) in conns.iter_mut().enumerate() {
        s.write_all(&pattern(5000, i as u8)).unwrap();
    }
    let mut got: HashMap<u32, Vec<u8>> = HashMap::new();
    for _ in 0..20 {
        for (h, p) in g.pump_recv() {
            assert_eq!(h.op, op::RW);
            got.entry(h.dst_port).or_default().extend(p);
        }
    }
    for i in 0..16u32 {
        assert_eq!(got[&(100 + i)], pattern(5000, i as u8), "stream {i}");
    }
    // And back, interleaved.
    for round in 0..3u8 {
        for (i, (_, local)) in conns.iter().enumerate() {
            let msg = [i as u8, round];
            g.send(guest_pkt(100 + i as u32, *local, op::RW, 1 << 20, 0), &msg);
        }
    }
    for (i, (s, _)) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 6];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b, [i as u8, 0, i as u8, 1, i as u8, 2]);
    }
}

#[test]
fn connections_past_the_limit_are_refused() {
    let mut g = Guest::with_rx_buffers(48);
    let mut streams = Vec::new();
    for i in 0..MAX_CONNECTIONS {
        let mut s = UnixStream::connect(&g.uds).unwrap();
        s.write_all(format!("CONNECT {i}\n").as_bytes()).unwrap();
        streams.push(s);
        if i % 32 == 31 {
            g.pump_recv();
        }
    }
    g.pump_recv();
    assert_eq!(g.connections(), MAX_CONNECTIONS);
    // One more host connection is closed at once.
    let mut extra = UnixStream::connect(&g.uds).unwrap();
    extra.write_all(b"CONNECT 9999\n").unwrap();
    g.pump_recv();
    assert_closed(&mut extra);
    // And a guest REQUEST is refused with RST.
    let mut path = g.uds.clone().into_os_string();
    path.push("_80");
    let _l = UnixListener::bind(&path).unwrap();
    g.send(guest_pkt(4000, 80, op::REQUEST, 4096, 0), &[]);
    let p = g.pump_recv();
    assert_eq!(p.last().unwrap().0.op, op::RST);
    assert_eq!(g.connections(), MAX_CONNECTIONS);
}

#[test]
fn bad_connect_lines_close_the_host_connection() {
    let mut g = Guest::new();
    for line in [
        &b"HELLO 52\n"[..],
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        &[b'C'; 40],
    ] {
        let mut s = UnixStream::connect(&g.uds).unwrap();
        s.write_all(line).unwrap();
        assert!(g.pump_recv().is_empty());
        assert_closed(&mut s);
    }
    assert_eq!(g.connections(), 0);
}

#[test]
fn malformed_tx_chains_are_returned_and_the_device_goes_on() {
    let mut g = Guest::new();
    let hdr = g.tx_hdr;
    // A device-writable descriptor in a tx chain; a header cut short; an RW whose len
    // is more than the chain holds.
    let cases: [&[Buf]; 2] = [
        &[Buf::writable(hdr, HDR_LEN as u32)],
        &[Buf::readable(hdr, 20)],
    ];
    for bufs in cases {
        let head = g.d.add_chain_to(TX_QUEUE as u32, bufs);
        g.d.publish_to(TX_QUEUE as u32, head);
        g.d.kick(TX_QUEUE as u32);
    }
    let (mut s, local) = g.host_connect(52);
    let mut h = guest_pkt(52, local, op::RW, 1 << 20, 0);
    h.len = 5000;
    use vm_memory::{Bytes, GuestAddress};
    g.d.mem
        .write_slice(&h.to_bytes(), GuestAddress(hdr))
        .unwrap();
    let head = g.d.add_chain_to(
        TX_QUEUE as u32,
        &[
            Buf::readable(hdr, HDR_LEN as u32),
            Buf::readable(g.tx_data, 100),
        ],
    );
    g.d.publish_to(TX_QUEUE as u32, head);
    g.d.kick(TX_QUEUE as u32);
    let malformed = g.d.device::<Vsock>().with(|v| {
        v.counters()
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed)
    });
    assert_eq!(malformed, 3);
    // Every chain came back (with the RESPONSE of host_connect); the connection still works.
    assert_eq!(g.d.used_idx_of(TX_QUEUE as u32), 4);
    g.send(guest_pkt(52, local, op::RW, 1 << 20, 0), b"still here");
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still here");
}

#[test]
fn a_reset_closes_every_connection_and_the_next_driver_starts_clean() {
    let mut g = Guest::new();
    let (mut s, _) = g.host_connect(52);
    g.d.write32(regs::STATUS, 0);
    assert_eq!(g.connections(), 0);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0, "the host connection is closed");
    // Host connections made while the driver is away wait for it.
    let mut waiting = UnixStream::connect(&g.uds).unwrap();
    waiting.write_all(b"CONNECT 60\n").unwrap();
    let f = g.d.device_features();
    g.d.start_queues(f, 3);
    g.rx_posted.clear();
    g.rx_seen = 0;
    g.rx_free = (0..8).map(|_| g.d.alloc(u64::from(RX_BUF))).collect();
    g.post_rx();
    let p = g.pump_recv();
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].0.op, p[0].0.dst_port), (op::REQUEST, 60));
}

#[test]
fn uds_path_must_be_free_or_a_stale_socket() {
    let dir = TempDir::new();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        check_uds_path(&file),
        Err(MuxerError::NotASocket { .. })
    ));
    assert!(matches!(
        Vsock::new(3, &file),
        Err(MuxerError::NotASocket { .. })
    ));
    assert!(matches!(
        Vsock::new(3, dir.path()),
        Err(MuxerError::NotASocket { .. })
    ));
    let long = dir.path().join("x".repeat(100));
    assert!(matches!(
        check_uds_path(&long),
        Err(MuxerError::PathTooLong { .. })
    ));
    // A live listener is not taken over; a stale socket is replaced.
    let live = dir.path().join("live.sock");
    let l = UnixListener::bind(&live).unwrap();
    assert!(matches!(
        Vsock::new(3, &live),
        Err(MuxerError::InUse { .. })
    ));
    drop(l);
    let v = Vsock::new(3, &live).unwrap();
    assert!(UnixStream::connect(&live).is_ok());
    // Our socket file goes with the device (or when the VM ends), and only once.
    let mut v = v;
    v.close_host_side();
    assert!(!live.exists());
    let other = UnixListener::bind(&live).unwrap();
    drop(v);
    assert!(live.exists(), "a later owner's socket was removed");
    drop(other);
    assert!(std::fs::metadata(&file).is_ok());
}

#[test]
fn an_rx_buffer_without_room_for_data_is_returned_empty_and_nothing_is_lost() {
    let mut g = Guest::with_rx_buffers(0);
    let rxq = RX_QUEUE as u32;
    // A buffer that holds a header and nothing more.
    let small = g.d.alloc(HDR_LEN as u64);
    let head =
        g.d.add_chain_to(rxq, &[Buf::writable(small, HDR_LEN as u32)]);
    g.d.publish_to(rxq, head);
    g.d.kick(rxq);
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    g.pump();
    assert_eq!(g.d.used_idx_of(rxq), 1);
    assert_eq!(g.d.used_elem_of(rxq, 0), (u32::from(head), 0));
    g.rx_seen = 1;
    let malformed = g.d.device::<Vsock>().with(|v| {
        v.counters()
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed)
    });
    assert_eq!(malformed, 1);
    // The REQUEST waited for a usable buffer.
    g.rx_free = (0..4).map(|_| g.d.alloc(u64::from(RX_BUF))).collect();
    g.post_rx();
    let p = g.pump_recv();
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!((p[0].0.op, p[0].0.dst_port), (op::REQUEST, 52));
    assert_eq!(g.connections(), 1);
}

#[test]
fn a_host_connection_the_guest_never_answers_is_reset_after_the_timeout() {
    let mut g = Guest::new();
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let p = g.pump_recv();
    assert_eq!(p[0].0.op, op::REQUEST);
    let started = std::time::Instant::now();
    // The guest says nothing. The muxer's timer wakes the loop once REQUEST_TIMEOUT is up.
    let mut packets = Vec::new();
    while g.connections() > 0 {
        assert!(
            started.elapsed() < super::muxer::REQUEST_TIMEOUT * 30,
            "still waiting"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        packets.extend(g.pump_recv());
    }
    assert!(started.elapsed() >= super::muxer::REQUEST_TIMEOUT);
    // The guest is told, and the host process sees the connection end without an OK.
    assert_eq!(packets.len(), 1, "{packets:?}");
    assert_eq!((packets[0].0.op, packets[0].0.dst_port), (op::RST, 52));
    assert_closed(&mut s);
}
