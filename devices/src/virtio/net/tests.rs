//! virtio-net driven through the virtio-mmio registers by the host-side driver harness,
//! over real taps in a network namespace each test creates (and removes, also on failure).
//! Host-side traffic comes from AF_PACKET sockets on the tap inside that namespace.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::device::mac_from_name;
use super::{
    features as netf, gso, hdr_flags, Net, NetCounters, NetCountersSnapshot, HDR_LEN, RX_QUEUE,
    TX_QUEUE,
};
use crate::bus::BusDevice;
use crate::mmds::{Mmds, MmdsStack, MmdsVersion, DEFAULT_IPV4, MMDS_MAC};
use crate::rate_limiter::{BucketParams, BucketUpdate, RateLimiter};
use crate::tap::{Tap, TapError};
use crate::test_utils::{Rng, TestNetns};
use crate::virtio::testing::{regs, used_ring, Buf, Driver};
use crate::virtio::{features, status};

const TAP: &str = "wtap0";
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// IEEE local experimental ethertype: the namespace's stack ignores these frames.
const ETH_TEST: u16 = 0x88b5;

// ---------------------------------------------------------------------------------------
// Network namespace

/// (tx_packets, tx_dropped) of an interface as the kernel counts them: for a tap, the
/// frames its reader took and the frames dropped because its queue was full.
fn tx_stats(ns: &TestNetns, dev: &str) -> (u64, u64) {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-s", "-j", "link", "show", dev])
        .output()
        .expect("ip");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let tx = &v[0]["stats64"]["tx"];
    (
        tx["packets"].as_u64().expect("packets"),
        tx["dropped"].as_u64().expect("dropped"),
    )
}

// ---------------------------------------------------------------------------------------
// Host side: AF_PACKET sockets in the namespace

struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens an AF_PACKET socket bound to `dev`; call inside the namespace. With
    /// `vnet_hdr`, frames carry a 10-byte virtio_net_hdr (PACKET_VNET_HDR).
    fn bind(dev: &str, vnet_hdr: bool) -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket calls, results checked.
        unsafe {
            let raw = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            );
            assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(raw);
            if vnet_hdr {
                let one: libc::c_int = 1;
                let r = libc::setsockopt(
                    raw,
                    libc::SOL_PACKET,
                    libc::PACKET_VNET_HDR,
                    (&one as *const libc::c_int).cast(),
                    4,
                );
                assert_eq!(r, 0, "PACKET_VNET_HDR");
            }
            let name = std::ffi::CString::new(dev).unwrap();
            let ifindex = libc::if_nametoindex(name.as_ptr());
            assert_ne!(ifindex, 0, "no interface {dev}");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            let r = libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            PacketSocket { fd }
        }
    }

    /// Sends straight to the device's transmit function, past the qdisc
    /// (PACKET_QDISC_BYPASS): when `send` returns, the tap has queued the frame or refused
    /// it (then `send` fails with ENOBUFS), nothing is left in flight in the kernel.
    fn bypass_qdisc(self) -> PacketSocket {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on our socket with a c_int option.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(
            r,
            0,
            "PACKET_QDISC_BYPASS: {}",
            std::io::Error::last_os_error()
        );
        self
    }

    fn send(&self, frame: &[u8]) {
        if let Err(e) = self.try_send(frame) {
            panic!("send: {e}");
        }
    }

    fn try_send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: `frame` is valid for reads.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        assert_eq!(n, frame.len() as isize, "short send");
        Ok(())
    }

    /// The next frame within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        if !wait_readable(self.fd.as_raw_fd(), timeout) {
            return None;
        }
        let mut buf = vec![0u8; 70000];
        // SAFETY: `buf` is valid for writes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }
}

fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) == 1 }
}

// ---------------------------------------------------------------------------------------
// Frames

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    eth(dst, src, ETH_TEST, &pattern(len - 14, seed))
}

/// Internet checksum of `data` added to `sum` (not folded, not inverted).
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn pseudo_sum(src: [u8; 4], dst: [u8; 4], tcp_len: usize) -> u32 {
    let mut s = csum_add(0, &src);
    s = csum_add(s, &dst);
    s + 6 + tcp_len as u32
}

/// An IPv4/TCP frame carrying `payload`. With `partial`, the TCP checksum field holds the
/// pseudo-header sum only (as a driver leaves it with NEEDS_CSUM); else the full checksum.
fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    seq: u32,
    payload: &[u8],
    partial: bool,
) -> Vec<u8> {
    let tcp_len = 20 + payload.len();
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let pseudo = pseudo_sum(src, dst, tcp_len);
    let c = if partial {
        csum_fold(pseudo)
    } else {
        !csum_fold(csum_add(pseudo, &tcp))
    };
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut l3 = ip;
    l3.extend_from_slice(&tcp);
    eth(dst_mac, src_mac, 0x0800, &l3)
}

/// virtio_net_hdr_v1 bytes.
fn vnet_hdr(
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

// ---------------------------------------------------------------------------------------
// The device under test and its event loop

/// Everything one test needs; drop order: driver (closes the tap), socket, namespace.
struct Env {
    d: Driver,
    ep: OwnedFd,
    host: PacketSocket,
    rx_bufs: HashMap<u16, (u64, u32)>,
    rx_seen: u16,
    /// Used rx entries taken from the ring, not yet returned as frames.
    used_q: std::collections::VecDeque<(u64, u32)>,
    tx_area: u64,
    counters: Arc<NetCounters>,
    ns: TestNetns,
}

const ALL_OFFLOADS: u64 = netf::CSUM
    | netf::GUEST_CSUM
    | netf::GUEST_TSO4
    | netf::GUEST_TSO6
    | netf::GUEST_ECN
    | netf::HOST_TSO4
    | netf::HOST_TSO6
    | netf::HOST_ECN;

/// A namespace with the tap up (MAC [`HOST_MAC`]), the device on it started with `accepted`
/// features, and an AF_PACKET socket on the tap.
fn env(accepted: u64) -> Env {
    env_with(accepted, 64)
}

fn env_with(accepted: u64, queue_size: u16) -> Env {
    env_limited(accepted, queue_size, None)
}

/// Like `env_with`, the device with (rx, tx) rate limiters.
fn env_limited(
    accepted: u64,
    queue_size: u16,
    limiters: Option<(RateLimiter, RateLimiter)>,
) -> Env {
    env_full(accepted, queue_size, limiters, None)
}

fn env_full(
    accepted: u64,
    queue_size: u16,
    limiters: Option<(RateLimiter, RateLimiter)>,
    mmds: Option<MmdsStack>,
) -> Env {
    let ns = TestNetns::new();
    let tap = ns.enter(|| Tap::open(TAP).expect("open tap"));
    ns.ip(&["link", "set", TAP, "address", "02:00:00:00:00:01", "up"]);
    let host = ns.enter(|| PacketSocket::bind(TAP, false));
    let mut net = Net::new(tap, Some(GUEST_MAC), Some(1500)).unwrap();
    if let Some((rx, tx)) = limiters {
        net = net.with_rate_limiters(rx, tx);
    }
    if let Some(stack) = mmds {
        net = net.with_mmds(stack);
    }
    let counters = net.counters();
    let mut d = Driver::new(Box::new(net));
    d.queue_size = queue_size;
    d.start_queues(accepted | features::VERSION_1, 2);
    let device_fds = d.handler.device_fds();
    // SAFETY: epoll calls on fds that outlive the epoll (closed before the driver drops).
    let ep = unsafe {
        let ep = OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC));
        let add = |fd: RawFd, events: u32, data: u64| {
            let mut ev = libc::epoll_event { events, u64: data };
            assert_eq!(
                libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev),
                0
            );
        };
        // As the VMM's event loop: the tap (and the limiters' timers) edge-triggered, queue
        // eventfds level-triggered.
        for (i, &fd) in device_fds.iter().enumerate() {
            add(fd, (libc::EPOLLIN | libc::EPOLLET) as u32, 100 + i as u64);
        }
        for (i, e) in d.handler.queue_evts().iter().enumerate() {
            add(e.as_raw_fd(), libc::EPOLLIN as u32, i as u64);
        }
        ep
    };
    let tx_area = d.alloc(70000);
    Env {
        d,
        ep,
        host,
        rx_bufs: HashMap::new(),
        rx_seen: 0,
        used_q: Default::default(),
        tx_area,
        counters,
        ns,
    }
}

impl Env {
    /// Runs the event loop until `until` holds or `timeout` passes; returns whether it held.
    fn pump(&mut self, timeout: Duration, mut until: impl FnMut(&mut Env) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if until(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.poll(5);
        }
    }

    /// Runs the event loop until no event is pending: every notification and tap edge the
    /// test caused so far has been handled, however slowly this thread is scheduled.
    fn settle(&mut self) {
        let deadline = Instant::now() + T;
        while self.poll(0) > 0 {
            assert!(
                Instant::now() < deadline,
                "event loop still busy after {T:?}"
            );
        }
    }

    /// One epoll_wait of at most `timeout_ms`; handles and returns the events it got.
    fn poll(&mut self, timeout_ms: i32) -> usize {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: `evs` has room for 8 events.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), evs.as_mut_ptr(), 8, timeout_ms) };
        let n = n.max(0) as usize;
        for ev in &evs[..n] {
            match ev.u64 {
                fd @ 100.. => self.d.handler.process_device_fd(fd as usize - 100),
                q => self.d.handler.process_queue(q as usize),
            }
        }
        n
    }

    /// Posts a device-writable rx buffer of `len` bytes at `addr` (one descriptor).
    fn post_rx_at(&mut self, addr: u64, len: u32) {
        let head = self
            .d
            .add_chain_to(RX_QUEUE as u32, &[Buf::writable(addr, len)]);
        self.rx_bufs.insert(head, (addr, len));
        self.d.publish_to(RX_QUEUE as u32, head);
    }

    fn post_rx(&mut self, n: usize, len: u32) -> Vec<u64> {
        let addrs: Vec<u64> = (0..n).map(|_| self.d.alloc(u64::from(len))).collect();
        for &a in &addrs {
            self.post_rx_at(a, len);
        }
        self.d.kick(RX_QUEUE as u32);
        addrs
    }

    /// Used rx entries not yet seen: (buffer address, used length).
    fn take_used_rx(&mut self) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        while self.rx_seen != self.d.used_idx_of(RX_QUEUE as u32) {
            let (id, len) = self.d.used_elem_of(RX_QUEUE as u32, self.rx_seen);
            let (addr, cap) = self.rx_bufs[&(id as u16)];
            assert!(len <= cap, "used length {len} > buffer {cap}");
            out.push((addr, len));
            self.rx_seen = self.rx_seen.wrapping_add(1);
        }
        out
    }

    /// Next received frame (header, frame) from the used ring, following num_buffers.
    fn recv_frame(&mut self, timeout: Duration) -> Option<([u8; HDR_LEN], Vec<u8>)> {
        let mut got = None;
        self.pump(timeout, |e| {
            let used = e.take_used_rx();
            e.used_q.extend(used);
            let Some(&(addr, len)) = e.used_q.front() else {
                return false;
            };
            assert!(len as usize >= HDR_LEN, "used length {len} < header");
            let hdr = e.d.read_bytes(addr, HDR_LEN);
            let num = u16::from_le_bytes([hdr[10], hdr[11]]) as usize;
            assert!(num >= 1, "num_buffers 0");
            if e.used_q.len() < num {
                return false;
            }
            let mut bytes = Vec::new();
            for (a, l) in e.used_q.drain(..num) {
                bytes.extend(e.d.read_bytes(a, l as usize));
            }
            got = Some((
                bytes[..HDR_LEN].try_into().unwrap(),
                bytes[HDR_LEN..].to_vec(),
            ));
            true
        });
        got
    }

    /// Sends `bufs` as a tx chain (no kick).
    fn add_tx(&mut self, bufs: &[Buf]) {
        let head = self.d.add_chain_to(TX_QUEUE as u32, bufs);
        self.d.publish_to(TX_QUEUE as u32, head);
    }

    /// Writes header + frame into the tx area as `pieces` descriptors, kicks tx and checks
    /// the chain came back with length 0.
    fn transmit(&mut self, hdr: [u8; HDR_LEN], frame: &[u8], pieces: usize) {
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(frame);
        self.d
            .mem
            .write_slice(&bytes, GuestAddress(self.tx_area))
            .unwrap();
        let step = bytes.len().div_ceil(pieces);
        let bufs: Vec<Buf> = (0..bytes.len())
            .step_by(step)
            .map(|off| {
                Buf::readable(
                    self.tx_area + off as u64,
                    step.min(bytes.len() - off) as u32,
                )
            })
            .collect();
        self.kick_tx(&bufs);
    }

    fn kick_tx(&mut self, bufs: &[Buf]) {
        let before = self.d.used_idx_of(TX_QUEUE as u32);
        self.add_tx(bufs);
        self.d.kick(TX_QUEUE as u32);
        assert_eq!(
            self.d.used_idx_of(TX_QUEUE as u32),
            before.wrapping_add(1),
            "tx chain not returned"
        );
        assert_eq!(self.d.used_elem_of(TX_QUEUE as u32, before).1, 0);
    }

    fn counters(&self) -> NetCountersSnapshot {
        self.counters.snapshot()
    }

    /// Frames from the tap until one with ethertype [`ETH_TEST`] (or TCP) arrives.
    fn host_recv(&self) -> Option<Vec<u8>> {
        self.host.recv(T)
    }
}

// ---------------------------------------------------------------------------------------
// Tests

/// Bound on waiting for something that must happen (a frame, a counter). Generous: on a
/// busy 2-core CI machine a test thread can be off the CPU for seconds, and a passing
/// test never waits this long.
const T: Duration = Duration::from_secs(20);

#[test]
fn config_space_has_mac_link_up_and_mtu() {
    let ns = TestNetns::new();
    let tap = ns.enter(|| Tap::open(TAP).unwrap());
    let net = Net::new(tap, Some(GUEST_MAC), Some(9000)).unwrap();
    let mut d = Driver::new(Box::new(net));
    assert_eq!(d.read32(regs::DEVICE_ID), 1);
    let f = d.device_features();
    for bit in [
        features::VERSION_1,
        netf::MAC,
        netf::STATUS,
        netf::MTU,
        netf::MRG_RXBUF,
        ALL_OFFLOADS,
    ] {
        assert_eq!(f & bit, bit, "feature {bit:#x} not offered");
    }
    let mut cfg = [0u8; 12];
    for (i, b) in cfg.iter_mut().enumerate() {
        let mut x = [0u8; 1];
        d.transport.read(regs::CONFIG + i as u64, &mut x);
        *b = x[0];
    }
    assert_eq!(&cfg[0..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000, "mtu");
    // 16-bit reads of status and mtu.
    let mut two = [0u8; 2];
    d.transport.read(regs::CONFIG + 6, &mut two);
    assert_eq!(two, [1, 0]);

    // Without MTU the feature is not offered.
    let tap = ns.enter(|| Tap::open("wtap1").unwrap());
    let mut d = Driver::new(Box::new(Net::new(tap, Some(GUEST_MAC), None).unwrap()));
    assert_eq!(d.device_features() & netf::MTU, 0);
}

#[test]
fn tap_mtu_is_set_on_the_host_end() {
    let ns = TestNetns::new();
    let tap = ns.enter(|| Tap::open("wtap0").unwrap());
    ns.enter(|| tap.set_mtu(9000)).unwrap();
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "-o", "link", "show", "wtap0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" mtu 9000 "), "{text}");
    // Below what the kernel takes for an Ethernet device: a clear error, the MTU unchanged.
    let e = ns.enter(|| tap.set_mtu(40)).unwrap_err().to_string();
    assert!(e.contains("cannot set MTU 40"), "{e}");
}

#[test]
fn offloads_can_be_left_unoffered() {
    let ns = TestNetns::new();
    let tap = ns.enter(|| Tap::open("wtap0").unwrap());
    let mut d = Driver::new(Box::new(
        Net::new(tap, Some(GUEST_MAC), None)
            .unwrap()
            .without_offloads(),
    ));
    let f = d.device_features();
    for (name, bit) in [
        ("CSUM", netf::CSUM),
        ("GUEST_CSUM", netf::GUEST_CSUM),
        ("GUEST_TSO4", netf::GUEST_TSO4),
        ("GUEST_TSO6", netf::GUEST_TSO6),
        ("HOST_TSO4", netf::HOST_TSO4),
        ("HOST_TSO6", netf::HOST_TSO6),
    ] {
        assert_eq!(f & bit, 0, "{name} offered");
    }
    // Everything else is still there.
    for bit in [
        netf::MAC,
        netf::STATUS,
        netf::MRG_RXBUF,
        features::VERSION_1,
    ] {
        assert_ne!(f & bit, 0);
    }
}

#[test]
fn generated_mac_is_stable_local_unicast_and_per_name() {
    let ns = TestNetns::new();
    let (a, b, c) = ns.enter(|| {
        let a = Net::new(Tap::open("wnet-a").unwrap(), None, None)
            .unwrap()
            .mac();
        // The same name again (the first tap is gone with its fd): the same MAC.
        let b = Net::new(Tap::open("wnet-a").unwrap(), None, None)
            .unwrap()
            .mac();
        let c = Net::new(Tap::open("wnet-b").unwrap(), None, None)
            .unwrap()
            .mac();
        (a, b, c)
    });
    assert_eq!(a, b);
    assert_ne!(a, c);
    for m in [a, c] {
        assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast: {m:02x?}");
    }
    assert_eq!(a, mac_from_name("wnet-a"));
    assert!(matches!(
        Net::new(
            ns.enter(|| Tap::open("wnet-c").unwrap()),
            Some([0x01, 0, 0, 0, 0, 1]),
            None
        ),
        Err(super::NetError::MulticastMac { .. })
    ));
}

#[test]
fn tap_open_errors_name_the_tap_and_the_cause() {
    let ns = TestNetns::new();
    ns.enter(|| {
        let long = "a-name-longer-than-15";
        match Tap::open(long) {
            Err(e @ TapError::NameTooLong { .. }) => assert!(e.to_string().contains(long)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Tap::open("a/b"),
            Err(TapError::InvalidName { .. })
        ));
        assert!(matches!(Tap::open(""), Err(TapError::InvalidName { .. })));
        let first = Tap::open("wbusy0").unwrap();
        match Tap::open("wbusy0") {
            Err(e @ TapError::Busy { .. }) => {
                assert!(e.to_string().contains("wbusy0") && e.to_string().contains("busy"))
            }
            other => panic!("second open: {other:?}"),
        }
        // "lo" exists and is not a tap.
        assert!(matches!(Tap::open("lo"), Err(TapError::NotATap { .. })));
        drop(first);
        // Closed: the non-persistent tap is gone and can be made again.
        Tap::open("wbusy0").unwrap();
    });
    let out = Command::new("ip")
        .args(["-n", &ns.name, "link", "show", "wbusy0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a created tap must not persist");
}

#[test]
fn tap_from_fd_takes_a_preopened_tap() {
    let ns = TestNetns::new();
    let tap = ns.enter(|| {
        let t = Tap::open("wfd0").unwrap();
        // SAFETY: dup of an fd we own.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(t.as_raw_fd())) };
        drop(t);
        Tap::from_fd(dup).unwrap()
    });
    assert_eq!(tap.name(), "wfd0");
    let file = std::fs::File::open("/dev/null").unwrap();
    assert!(matches!(
        Tap::from_fd(file.into()),
        Err(TapError::NotATapFd { .. })
    ));
}

fn frames_from_the_tap_arrive(accepted: u64, buf_len: u32) {
    let mut e = env(accepted);
    e.post_rx(16, buf_len);
    let sizes = [60usize, 1514, 200];
    for (i, &len) in sizes.iter().enumerate() {
        let f = test_frame(GUEST_MAC, HOST_MAC, len, i as u8);
        e.host.send(&f);
        let (hdr, got) = e.recv_frame(T).expect("frame reached the guest");
        assert_eq!(got, f, "frame {i} arrived intact");
        // No offload in play: flags 0 or DATA_VALID, gso NONE, num_buffers as the buffers.
        assert_eq!(hdr[0] & !hdr_flags::DATA_VALID, 0);
        assert_eq!(hdr[1], gso::NONE);
        let num = u16::from_le_bytes([hdr[10], hdr[11]]);
        let expect = if accepted & netf::MRG_RXBUF != 0 {
            (len + HDR_LEN).div_ceil(buf_len as usize) as u16
        } else {
            1
        };
        assert_eq!(num, expect, "num_buffers for a {len}-byte frame");
    }
    let c = e.counters();
    assert_eq!(c.rx_frames, 3);
    assert_eq!(c.rx_bytes, sizes.iter().sum::<usize>() as u64);
    assert_eq!(c.rx_dropped, 0);
}

#[test]
fn frames_from_the_tap_arrive_in_big_guest_buffers() {
    frames_from_the_tap_arrive(0, 2048);
}

#[test]
fn frames_from_the_tap_span_mergeable_buffers() {
    frames_from_the_tap_arrive(netf::MRG_RXBUF, 512);
}

#[test]
fn frames_from_the_tap_arrive_with_event_idx() {
    frames_from_the_tap_arrive(netf::MRG_RXBUF | features::RING_EVENT_IDX, 1536);
}

#[test]
fn guest_frames_leave_the_tap_intact() {
    let mut e = env(netf::MRG_RXBUF);
    for (i, (len, pieces)) in [(60usize, 1usize), (1514, 1), (1514, 5), (100, 3), (15, 2)]
        .into_iter()
        .enumerate()
    {
        let f = test_frame(HOST_MAC, GUEST_MAC, len, 0x40 + i as u8);
        e.transmit([0; HDR_LEN], &f, pieces);
        assert_eq!(e.host_recv().as_deref(), Some(&f[..]), "frame {i}");
    }
    let c = e.counters();
    assert_eq!((c.tx_frames, c.tx_malformed, c.tx_errors), (5, 0, 0));
    assert_eq!(c.tx_bytes, 60 + 1514 + 1514 + 100 + 15);
    // A tx chain raises the interrupt (no EVENT_IDX: always).
    assert!(e.d.take_interrupts() > 0);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted_and_the_next_frame_goes_out() {
    let mut e = env(ALL_OFFLOADS);
    let good = test_frame(HOST_MAC, GUEST_MAC, 200, 9);
    let mut bytes = vec![0u8; HDR_LEN];
    bytes.extend_from_slice(&good);
    e.d.mem
        .write_slice(&bytes, GuestAddress(e.tx_area))
        .unwrap();
    let a = e.tx_area;
    let n = bytes.len() as u32;
    let mem_end = crate::virtio::testing::MEM_SIZE as u64;
    let big = e.d.alloc(70000);
    let bad_chains: Vec<(&str, Vec<Buf>)> = vec![
        (
            "writable descriptor",
            vec![Buf::readable(a, 12), Buf::writable(a + 12, n - 12)],
        ),
        ("header too short", vec![Buf::readable(a, 11)]),
        ("oversized frame", vec![Buf::readable(big, 65550 + 12 + 1)]),
        (
            "outside guest memory",
            vec![Buf::readable(a, 12), Buf::readable(mem_end - 100, 200)],
        ),
        (
            "beyond the address space",
            vec![Buf::readable(a, 12), Buf::readable(u64::MAX - 10, 100)],
        ),
        ("runt frame", vec![Buf::readable(a, 12 + 13)]),
    ];
    for (i, (what, bufs)) in bad_chains.iter().enumerate() {
        e.kick_tx(bufs);
        assert_eq!(
            e.counters().tx_malformed,
            i as u64 + 1,
            "{what} not counted"
        );
        assert_eq!(e.counters().tx_frames, 0, "{what} sent");
    }
    // Headers asking for offloads the driver did not negotiate, or unknown ones.
    let mut e2 = env(0);
    for (what, hdr) in [
        (
            "NEEDS_CSUM without CSUM",
            vnet_hdr(hdr_flags::NEEDS_CSUM, 0, 0, 0, 14, 16),
        ),
        (
            "TSO without HOST_TSO4",
            vnet_hdr(0, gso::TCPV4, 54, 1448, 0, 0),
        ),
        ("UFO", vnet_hdr(0, gso::UDP, 42, 1000, 0, 0)),
    ] {
        let before = e2.counters().tx_malformed;
        e2.transmit(hdr, &good, 1);
        assert_eq!(e2.counters().tx_malformed, before + 1, "{what} not counted");
    }
    // A broken chain: a descriptor whose NEXT points to itself.
    let head = e.d.reserve_descs_in(TX_QUEUE as u32, 1);
    e.d.write_desc(
        crate::virtio::testing::desc_table(TX_QUEUE as u32),
        head,
        a,
        n,
        crate::virtio::testing::VIRTQ_DESC_F_NEXT,
        head,
    );
    let before = e.d.used_idx_of(TX_QUEUE as u32);
    e.d.publish_to(TX_QUEUE as u32, head);
    e.d.kick(TX_QUEUE as u32);
    assert_eq!(e.d.used_idx_of(TX_QUEUE as u32), before.wrapping_add(1));
    assert_eq!(e.counters().tx_malformed, bad_chains.len() as u64 + 1);
    // Nothing came out of the tap, and the next good frame does.
    assert!(e.host.recv(Duration::from_millis(100)).is_none());
    e.kick_tx(&[Buf::readable(a, 12), Buf::readable(a + 12, n - 12)]);
    assert_eq!(e.host_recv().as_deref(), Some(&good[..]));
    assert_eq!(e.counters().tx_frames, 1);
    assert_eq!(e.d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn malformed_rx_chains_are_returned_unused_and_rx_goes_on() {
    let mut e = env(netf::MRG_RXBUF);
    let a = e.d.alloc(2048);
    // A device-readable buffer and a buffer outside guest memory, then a good one.
    let h = e.d.add_chain_to(RX_QUEUE as u32, &[Buf::readable(a, 2048)]);
    e.rx_bufs.insert(h, (a, 2048));
    e.d.publish_to(RX_QUEUE as u32, h);
    let mem_end = crate::virtio::testing::MEM_SIZE as u64;
    let h =
        e.d.add_chain_to(RX_QUEUE as u32, &[Buf::writable(mem_end - 10, 2048)]);
    e.rx_bufs.insert(h, (mem_end - 10, 2048));
    e.d.publish_to(RX_QUEUE as u32, h);
    let good = e.d.alloc(2048);
    e.post_rx_at(good, 2048);
    e.d.kick(RX_QUEUE as u32);
    let f = test_frame(GUEST_MAC, HOST_MAC, 300, 3);
    e.host.send(&f);
    let mut used = Vec::new();
    assert!(e.pump(T, |e| {
        used.extend(e.take_used_rx());
        used.len() == 3
    }));
    assert_eq!(used[0], (a, 0));
    assert_eq!(used[1], (mem_end - 10, 0));
    assert_eq!(used[2], (good, (HDR_LEN + 300) as u32));
    assert_eq!(e.d.read_bytes(good + HDR_LEN as u64, 300), f);
    assert_eq!(e.counters().rx_bad_chains, 2);
    assert_eq!(e.counters().rx_frames, 1);
}

/// The flood test's body runs in a child process of the test binary (the variable names
/// it), so that other tests' allocations do not blur the RSS it measures.
const FLOOD_CHILD: &str = "WISP_NET_FLOOD_CHILD";
/// A bound for the whole child; it takes about a second.
const FLOOD_CHILD_LIMIT: Duration = Duration::from_secs(180);

#[test]
fn flood_without_rx_buffers_keeps_the_device_responsive_and_its_memory_flat() {
    const NAME: &str =
        "virtio::net::tests::flood_without_rx_buffers_keeps_the_device_responsive_and_its_memory_flat";
    if std::env::var_os(FLOOD_CHILD).is_some() {
        flood_in_this_process();
    } else {
        run_test_in_child(NAME);
    }
}

/// Runs test `name` alone in a new process of this test binary and checks it passed.
fn run_test_in_child(name: &str) {
    use std::io::Read;
    use std::process::Stdio;
    // /proc/self/exe, not current_exe(): cargo may relink the test binary at its path
    // while this process runs (the path then names a new file, or none); the running
    // executable stays reachable through /proc.
    let mut child = Command::new("/proc/self/exe")
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env(FLOOD_CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the test binary again through /proc/self/exe");
    let drain = |mut p: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = p.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + FLOOD_CHILD_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            // Its namespace guard did not run.
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("wisp-test-{}-0", child.id())])
                .status();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = stdout.join().expect("stdout reader");
    let err = stderr.join().expect("stderr reader");
    assert!(
        status.is_some_and(|s| s.success()) && out.contains("1 passed"),
        "child ({}): {out}\n{err}",
        status.map_or(format!("killed after {FLOOD_CHILD_LIMIT:?}"), |s| s
            .to_string())
    );
}

/// Frame `i` of a flood: a full-size frame with its index in the payload.
fn flood_frame(i: u32) -> Vec<u8> {
    let mut f = test_frame(GUEST_MAC, HOST_MAC, 1514, i as u8);
    f[14..18].copy_from_slice(&i.to_be_bytes());
    f
}

fn flood_in_this_process() {
    const FLOOD: u32 = 20_000;
    let mut e = env_with(netf::MRG_RXBUF, 16);
    let rss_before = rss_kib();
    // No rx buffers posted: the host floods the tap. Past the qdisc, each send returns
    // once the tap queued the frame or refused it, so the sender knows which ones it holds.
    let sender = e.ns.enter(|| PacketSocket::bind(TAP, false).bypass_qdisc());
    let flood = std::thread::spawn(move || {
        let mut queued = Vec::new();
        let mut refused = 0u64;
        for i in 0..FLOOD {
            match sender.try_send(&flood_frame(i)) {
                Ok(()) => queued.push(i),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => refused += 1,
                Err(e) => panic!("flood frame {i}: {e}"),
            }
        }
        (queued, refused)
    });
    let tx_frame = test_frame(HOST_MAC, GUEST_MAC, 1000, 77);
    let mut sent = 0;
    while !flood.is_finished() || sent < 20 {
        // The event loop runs (tap edges keep coming), and tx still works meanwhile.
        e.pump(Duration::from_millis(5), |_| false);
        e.transmit([0; HDR_LEN], &tx_frame, 2);
        sent += 1;
    }
    let (queued, refused) = flood.join().expect("flood thread");
    // Every tap edge of the flood handled.
    e.settle();
    let c = e.counters();
    assert_eq!(c.tx_frames, sent, "tx kept working during the flood");
    assert_eq!(c.rx_frames, 0);
    // wisp took nothing from the tap; the kernel's queue holds what fits and drops the rest.
    let (taken, dropped) = tx_stats(&e.ns, TAP);
    assert_eq!(taken, 0, "frames read from the tap without rx buffers");
    assert!(
        refused > 0,
        "the tap's own queue overflowed, not wisp's memory"
    );
    assert_eq!(
        dropped, refused,
        "the tap dropped exactly the frames it refused"
    );
    let rss_after = rss_kib();
    eprintln!(
        "flood: the tap queued {} and refused {refused} of {FLOOD} frames; RSS {rss_before} -> {rss_after} KiB",
        queued.len()
    );
    assert!(
        rss_after < rss_before + 4 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Waiting for buffers: rx notifications are on (used.flags has no NO_NOTIFY).
    let flags: u16 =
        e.d.mem
            .read_obj(GuestAddress(used_ring(RX_QUEUE as u32)))
            .unwrap();
    assert_eq!(flags, 0, "the driver must be asked to kick rx");

    // Buffers come back: the queued frames flow in, in order, intact.
    let bufs = e.post_rx(16, 2048);
    for (n, &i) in queued.iter().enumerate() {
        let (_, frame) = e
            .recv_frame(T)
            .unwrap_or_else(|| panic!("queued frame {i} ({n} of {}) not received", queued.len()));
        assert_eq!(frame, flood_frame(i), "queued frame {i}");
        if (n + 1) % 16 == 0 {
            // All 16 buffers used: recycle them as a driver would.
            for &a in &bufs {
                e.post_rx_at(a, 2048);
            }
            e.d.kick(RX_QUEUE as u32);
        }
    }
    // Nothing beyond them, and new traffic flows (into a buffer still posted, or the 16
    // just recycled).
    e.settle();
    let extra = e.take_used_rx();
    assert!(
        extra.is_empty() && e.used_q.is_empty(),
        "frames the tap never queued reached the guest"
    );
    let after = test_frame(GUEST_MAC, HOST_MAC, 600, 0xa5);
    e.host.send(&after);
    let (_, frame) = e.recv_frame(T).expect("a frame sent after the flood");
    assert_eq!(frame, after);
    let c = e.counters();
    assert_eq!(c.rx_frames, queued.len() as u64 + 1);
    assert_eq!(c.rx_dropped, 0);
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Checks an IPv4/TCP frame's lengths and checksums; returns (TTL, seq, payload).
fn parse_tcp_segment(frame: &[u8]) -> (u8, u32, Vec<u8>) {
    assert!(frame.len() >= 54, "{}-byte frame", frame.len());
    assert_eq!(&frame[12..14], &[0x08, 0x00], "IPv4");
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(tot, ip.len(), "IP total length matches the frame");
    assert_eq!(
        csum_fold(csum_add(0, &ip[..ihl])),
        0xffff,
        "IP header checksum"
    );
    let tcp = &ip[ihl..tot];
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    assert_eq!(
        csum_fold(csum_add(pseudo_sum(src, dst, tcp.len()), tcp)),
        0xffff,
        "TCP checksum"
    );
    let seq = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
    let doff = usize::from(tcp[12] >> 4) * 4;
    (ip[8], seq, tcp[doff..].to_vec())
}

const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const FAR_IP: [u8; 4] = [10, 0, 1, 2];
const TSO_PAYLOAD: usize = 30_000;
const MSS: u16 = 1448;

#[test]
fn guest_tso_frame_leaves_the_tap_as_valid_mtu_sized_segments() {
    let mut e = env(ALL_OFFLOADS | netf::MRG_RXBUF);
    // The namespace routes the guest's packets from wtap0 to wtap1, a tap without
    // offloads whose reader we are: the kernel must cut the GSO frame there.
    let ns = &e.ns;
    let out = ns.enter(|| {
        let t = Tap::open("wtap1").unwrap();
        t.set_vnet_hdr_size(HDR_LEN as i32).unwrap();
        t
    });
    ns.sysctl("net.ipv4.ip_forward=1");
    ns.sysctl("net.ipv4.conf.all.rp_filter=0");
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", TAP]);
    ns.ip(&["addr", "add", "10.0.1.1/24", "dev", "wtap1"]);
    ns.ip(&["link", "set", "wtap1", "up"]);
    ns.ip(&[
        "neigh",
        "add",
        "10.0.1.2",
        "lladdr",
        "02:00:00:00:01:02",
        "dev",
        "wtap1",
        "nud",
        "permanent",
    ]);
    let payload = pattern(TSO_PAYLOAD, 5);
    let frame = tcp_frame(HOST_MAC, GUEST_MAC, GUEST_IP, FAR_IP, 1000, &payload, true);
    let hdr = vnet_hdr(hdr_flags::NEEDS_CSUM, gso::TCPV4, 54, MSS, 34, 16);
    e.transmit(hdr, &frame, 4);
    assert_eq!(e.counters().tx_frames, 1);
    assert_eq!(e.counters().tx_bytes, frame.len() as u64);

    let mut data = vec![0u8; TSO_PAYLOAD];
    let mut covered = 0;
    let mut segments = 0;
    let mut buf = vec![0u8; 70000];
    let deadline = Instant::now() + T;
    while covered < TSO_PAYLOAD && Instant::now() < deadline {
        if !wait_readable(out.as_raw_fd(), Duration::from_millis(100)) {
            continue;
        }
        let Ok(n) = out.read(&mut buf) else { continue };
        let f = &buf[HDR_LEN..n];
        if f.len() < 14 || f[12..14] != [0x08, 0x00] {
            continue; // e.g. ARP from the namespace
        }
        assert_eq!(buf[1], gso::NONE, "wtap1 has no TSO: no GSO frame");
        assert!(f.len() <= 1514, "segment of {} bytes", f.len());
        let (ttl, seq, p) = parse_tcp_segment(f);
        assert_eq!(ttl, 63, "forwarded");
        assert!(p.len() <= usize::from(MSS));
        let off = (seq - 1000) as usize;
        data[off..off + p.len()].copy_from_slice(&p);
        covered += p.len();
        segments += 1;
    }
    assert_eq!(covered, TSO_PAYLOAD, "all payload arrived");
    assert_eq!(segments, TSO_PAYLOAD.div_ceil(usize::from(MSS)));
    assert_eq!(data, payload);
}

/// The host sends one 30 KB TCP GSO packet to the guest through the tap (AF_PACKET with a
/// virtio-net header); returns what the guest received.
fn host_sends_gso_packet(accepted: u64) -> Vec<([u8; HDR_LEN], Vec<u8>)> {
    let mut e = env(accepted | netf::MRG_RXBUF);
    let gso_sock = e.ns.enter(|| PacketSocket::bind(TAP, true));
    e.post_rx(64, 1536);
    let payload = pattern(TSO_PAYLOAD, 11);
    let frame = tcp_frame(GUEST_MAC, HOST_MAC, FAR_IP, GUEST_IP, 5000, &payload, true);
    // struct virtio_net_hdr (10 bytes) for PACKET_VNET_HDR.
    let hdr = vnet_hdr(hdr_flags::NEEDS_CSUM, gso::TCPV4, 54, MSS, 34, 16);
    let mut pkt = hdr[..10].to_vec();
    pkt.extend_from_slice(&frame);
    gso_sock.send(&pkt);
    let mut frames = Vec::new();
    let mut covered = 0;
    while covered < TSO_PAYLOAD {
        let Some((h, f)) = e.recv_frame(T) else { break };
        if f.len() >= 54 && f[12..14] == [0x08, 0x00] {
            covered += f.len() - 54;
        }
        frames.push((h, f));
    }
    assert_eq!(covered, TSO_PAYLOAD, "all payload reached the guest");
    assert_eq!(e.counters().rx_dropped, 0);
    frames
}

#[test]
fn with_guest_tso_negotiated_the_guest_receives_one_gso_frame() {
    let frames = host_sends_gso_packet(ALL_OFFLOADS);
    assert_eq!(frames.len(), 1, "the tap passed the GSO packet whole");
    let (h, f) = &frames[0];
    assert_eq!(h[0] & hdr_flags::NEEDS_CSUM, hdr_flags::NEEDS_CSUM);
    assert_eq!(h[1], gso::TCPV4);
    assert_eq!(u16::from_le_bytes([h[4], h[5]]), MSS, "gso_size");
    assert_eq!(u16::from_le_bytes([h[6], h[7]]), 34, "csum_start");
    assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16, "csum_offset");
    assert_eq!(
        u16::from_le_bytes([h[10], h[11]]) as usize,
        (HDR_LEN + f.len()).div_ceil(1536),
        "num_buffers"
    );
    assert_eq!(f.len(), 54 + TSO_PAYLOAD);
    assert_eq!(&f[54..], &pattern(TSO_PAYLOAD, 11)[..]);
}

#[test]
fn without_guest_offloads_the_guest_receives_checksummed_segments() {
    let frames = host_sends_gso_packet(0);
    assert_eq!(frames.len(), TSO_PAYLOAD.div_ceil(usize::from(MSS)));
    let mut data = vec![0u8; TSO_PAYLOAD];
    for (h, f) in &frames {
        assert_eq!(h[0] & hdr_flags::NEEDS_CSUM, 0, "no partial checksum");
        assert_eq!(h[1], gso::NONE);
        assert!(f.len() <= 1514);
        let (_, seq, p) = parse_tcp_segment(f);
        let off = (seq - 5000) as usize;
        data[off..off + p.len()].copy_from_slice(&p);
    }
    assert_eq!(data, pattern(TSO_PAYLOAD, 11));
}

#[test]
fn inconsistent_offload_features_are_refused_at_activation() {
    let ns = TestNetns::new();
    let tap = ns.enter(|| Tap::open(TAP).unwrap());
    let mut d = Driver::new(Box::new(Net::new(tap, None, None).unwrap()));
    // GUEST_TSO4 without GUEST_CSUM (virtio 1.2 §5.1.3.1).
    d.negotiate(features::VERSION_1 | netf::GUEST_TSO4);
    d.setup_queue(0);
    d.setup_queue(1);
    let s = d.driver_ok();
    assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
    assert!(d.handler.device_fds().is_empty());
}

#[test]
fn reset_stops_watching_the_tap_and_a_new_driver_gets_frames() {
    let mut e = env(netf::MRG_RXBUF);
    assert_eq!(e.d.handler.device_fds().len(), 1);
    e.d.write32(regs::STATUS, 0);
    assert!(e.d.handler.device_fds().is_empty(), "tap no longer watched");
    // A frame sent while the device is reset waits in the tap.
    let f = test_frame(GUEST_MAC, HOST_MAC, 100, 1);
    e.host.send(&f);
    e.d.start_queues(features::VERSION_1 | netf::MRG_RXBUF, 2);
    e.rx_bufs.clear();
    e.rx_seen = 0;
    e.post_rx(4, 2048);
    let (_, got) = e.recv_frame(T).expect("frame after re-activation");
    assert_eq!(got, f);
}

#[test]
fn waiting_for_rx_buffers_with_event_idx_asks_for_the_next_kick() {
    let mut e = env(netf::MRG_RXBUF | features::RING_EVENT_IDX);
    e.post_rx(2, 2048);
    for i in 0..3 {
        e.host.send(&test_frame(GUEST_MAC, HOST_MAC, 100, i));
    }
    // Two frames fit; the third waits in the device for a buffer.
    assert!(e.pump(T, |e| e.counters().rx_frames == 2));
    e.settle();
    assert_eq!(e.counters().rx_frames, 2);
    // avail_event (after the used ring's entries) is the driver's next avail index, so
    // the very next buffer it posts is notified (virtio 1.2 §2.7.10).
    let avail_event: u16 =
        e.d.mem
            .read_obj(GuestAddress(
                used_ring(RX_QUEUE as u32) + 4 + 8 * u64::from(e.d.queue_size),
            ))
            .unwrap();
    assert_eq!(avail_event, 2);
    e.post_rx(1, 2048);
    assert!(e.pump(T, |e| e.counters().rx_frames == 3));
}

#[test]
fn frames_the_tap_refuses_are_counted_and_tx_goes_on() {
    let mut e = env(0);
    let f = test_frame(HOST_MAC, GUEST_MAC, 100, 1);
    e.ns.ip(&["link", "set", TAP, "down"]);
    e.transmit([0; HDR_LEN], &f, 1);
    let c = e.counters();
    assert_eq!((c.tx_frames, c.tx_errors, c.tx_malformed), (0, 1, 0));
    e.ns.ip(&["link", "set", TAP, "up"]);
    // The old socket carries ENETDOWN from the link change; a fresh one listens.
    let host = e.ns.enter(|| PacketSocket::bind(TAP, false));
    e.transmit([0; HDR_LEN], &f, 1);
    assert_eq!(host.recv(T).as_deref(), Some(&f[..]));
    assert_eq!(e.counters().tx_frames, 1);
}

/// Device time per received frame (not a pass/fail test): run with
/// `cargo test --release -p wisp-devices rx_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn rx_cost() {
    for (len, frames) in [
        (60usize, 20_000usize),
        (1514, 20_000),
        (TSO_PAYLOAD + 54, 2_000),
    ] {
        let mut e = env_with(ALL_OFFLOADS | netf::MRG_RXBUF, 256);
        e.ns.ip(&["link", "set", TAP, "txqueuelen", "30000"]);
        let sock = e.ns.enter(|| PacketSocket::bind(TAP, true));
        let bufs = e.post_rx(256, 4096);
        let frame = if len > 1514 {
            let f = tcp_frame(
                GUEST_MAC,
                HOST_MAC,
                FAR_IP,
                GUEST_IP,
                1,
                &pattern(TSO_PAYLOAD, 1),
                true,
            );
            let mut p = vnet_hdr(hdr_flags::NEEDS_CSUM, gso::TCPV4, 54, MSS, 34, 16)[..10].to_vec();
            p.extend_from_slice(&f);
            p
        } else {
            let mut p = vec![0u8; 10];
            p.extend_from_slice(&test_frame(GUEST_MAC, HOST_MAC, len, 0));
            p
        };
        for _ in 0..frames {
            sock.send(&frame);
        }
        let mut busy = Duration::ZERO;
        let start = Instant::now();
        while e.counters().rx_frames < frames as u64 && start.elapsed() < Duration::from_secs(60) {
            // Recycle every buffer the device used, as a driver would.
            let used = e.take_used_rx();
            if !used.is_empty() {
                for (a, _) in used {
                    e.post_rx_at(a, 4096);
                }
                e.d.write32(regs::QUEUE_NOTIFY, RX_QUEUE as u32);
            }
            let t = Instant::now();
            e.d.handler.process_queue(RX_QUEUE);
            e.d.handler.process_device_fd(0);
            busy += t.elapsed();
        }
        let _ = bufs;
        let n = e.counters().rx_frames;
        assert_eq!(n, frames as u64);
        eprintln!(
            "rx {len:>6}-byte frames: {:>7.2} us of device time per frame ({n} frames)",
            busy.as_secs_f64() * 1e6 / n as f64
        );
    }
    // The copy the bounce buffer adds, for comparison.
    let mem = crate::virtio::testing::guest_memory();
    for len in [72usize, 1526, TSO_PAYLOAD + 66] {
        let src = vec![1u8; len];
        let t = Instant::now();
        for i in 0..10_000u64 {
            mem.write_slice(&src, GuestAddress(0x10000 + (i % 16) * 0x10000))
                .unwrap();
        }
        eprintln!(
            "copy {len:>6} bytes into guest memory: {:.2} us",
            t.elapsed().as_secs_f64() * 1e6 / 10_000.0
        );
    }
}

/// Writes a random chain of 1..=6 descriptors into queue `q`, pointing into `scratch`
/// (64 KiB), near the end of guest memory or anywhere; returns its head.
fn random_chain(e: &mut Env, rng: &mut Rng, q: u32, scratch: u64) -> u16 {
    let mem_size = crate::virtio::testing::MEM_SIZE as u64;
    let n = 1 + rng.below(6) as u16;
    let head = e.d.reserve_descs_in(q, n);
    for i in 0..n {
        let idx = (head + i) % e.d.queue_size;
        let addr = match rng.below(8) {
            0 => rng.next(),
            1 => mem_size - rng.below(64),
            _ => scratch + rng.below(60 << 10),
        };
        let len = match rng.below(4) {
            0 => rng.below(16) as u32,
            1 => 12,
            2 => 64 * (1 + rng.below(32) as u32),
            _ => rng.next() as u32,
        };
        let mut flags = match rng.below(4) {
            0 => crate::virtio::testing::VIRTQ_DESC_F_WRITE,
            1 => 0,
            // Mostly the direction the queue expects.
            _ if q == RX_QUEUE as u32 => crate::virtio::testing::VIRTQ_DESC_F_WRITE,
            _ => 0,
        };
        if i + 1 < n || rng.below(10) == 0 {
            flags |= crate::virtio::testing::VIRTQ_DESC_F_NEXT;
        }
        if rng.below(40) == 0 {
            flags |= crate::virtio::testing::VIRTQ_DESC_F_INDIRECT;
        }
        let next = if rng.below(10) == 0 {
            rng.below(80) as u16
        } else {
            (idx + 1) % e.d.queue_size
        };
        let table = crate::virtio::testing::desc_table(q);
        e.d.write_desc(table, idx, addr, len, flags, next);
    }
    head
}

/// Guest memory changed only inside `allowed` (address, length) ranges.
fn assert_only_changed(before: &[u8], after: &[u8], allowed: &[(u64, u64)], what: &str) {
    let mut start = 0usize;
    let mut ranges: Vec<(usize, usize)> = allowed
        .iter()
        .map(|&(a, l)| (a as usize, (a + l) as usize))
        .collect();
    ranges.sort();
    ranges.push((before.len(), before.len()));
    for (a, end) in ranges {
        let a = a.min(before.len());
        if start < a && before[start..a] != after[start..a] {
            let i = (start..a).find(|&i| before[i] != after[i]).unwrap();
            panic!("{what}: guest memory changed at {i:#x}, outside the buffers");
        }
        start = start.max(end.min(before.len()));
    }
}

#[test]
fn random_hostile_tx_chains_are_dropped_without_touching_guest_memory() {
    let mut e = env(ALL_OFFLOADS | features::RING_INDIRECT_DESC);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let scratch = e.d.alloc(64 << 10);
    let used = (
        used_ring(TX_QUEUE as u32),
        6 + 8 * u64::from(e.d.queue_size),
    );
    for round in 0..500 {
        // A plausible header and frame in the scratch area now and then.
        if rng.below(2) == 0 {
            let off = scratch + rng.below(60 << 10);
            let mut b = vnet_hdr(
                [0, hdr_flags::NEEDS_CSUM][rng.below(2) as usize],
                [gso::NONE, gso::TCPV4, gso::TCPV6, gso::UDP][rng.below(4) as usize],
                rng.next() as u16,
                rng.next() as u16,
                rng.next() as u16,
                rng.next() as u16,
            )
            .to_vec();
            b.extend_from_slice(&test_frame(HOST_MAC, GUEST_MAC, 64, round as u8));
            let end = (scratch + (64 << 10)).min(off + b.len() as u64);
            e.d.mem
                .write_slice(&b[..(end - off) as usize], GuestAddress(off))
                .unwrap();
        }
        let head = random_chain(&mut e, &mut rng, TX_QUEUE as u32, scratch);
        let before = e.d.used_idx_of(TX_QUEUE as u32);
        e.d.publish_to(TX_QUEUE as u32, head);
        let snap = e.d.snapshot();
        e.d.kick(TX_QUEUE as u32);
        assert_eq!(
            e.d.used_idx_of(TX_QUEUE as u32),
            before.wrapping_add(1),
            "round {round}: chain not returned"
        );
        assert_eq!(e.d.used_elem_of(TX_QUEUE as u32, before).1, 0);
        // Transmit never writes guest memory, only the used ring.
        assert_only_changed(&snap, &e.d.snapshot(), &[used], &format!("round {round}"));
    }
    let c = e.counters();
    assert_eq!(c.tx_frames + c.tx_malformed + c.tx_errors, 500);
    assert!(c.tx_malformed > 250, "{c:?}");
    // Drain what the tap passed, then the device still sends a good frame.
    while e.host.recv(Duration::from_millis(20)).is_some() {}
    let f = test_frame(HOST_MAC, GUEST_MAC, 300, 1);
    e.transmit([0; HDR_LEN], &f, 3);
    let mut seen = false;
    while let Some(got) = e.host_recv() {
        if got == f {
            seen = true;
            break;
        }
    }
    assert!(seen, "good frame after the hostile ones");
    assert_eq!(e.d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn random_hostile_rx_chains_only_receive_into_their_own_buffers() {
    let mut e = env(netf::MRG_RXBUF | features::RING_INDIRECT_DESC);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let scratch = e.d.alloc(64 << 10);
    let mem_size = crate::virtio::testing::MEM_SIZE as u64;
    let allowed = [
        (scratch, 64 << 10),
        (mem_size - 64, 64),
        (
            used_ring(RX_QUEUE as u32),
            6 + 8 * u64::from(e.d.queue_size),
        ),
    ];
    for round in 0..300u32 {
        let head = random_chain(&mut e, &mut rng, RX_QUEUE as u32, scratch);
        e.d.publish_to(RX_QUEUE as u32, head);
        let snap = e.d.snapshot();
        e.d.kick(RX_QUEUE as u32);
        let len = [60, 200, 1514][rng.below(3) as usize];
        e.host
            .send(&test_frame(GUEST_MAC, HOST_MAC, len, round as u8));
        e.settle();
        assert_only_changed(&snap, &e.d.snapshot(), &allowed, &format!("round {round}"));
        for i in e.rx_seen..e.d.used_idx_of(RX_QUEUE as u32) {
            let (_, l) = e.d.used_elem_of(RX_QUEUE as u32, i);
            assert!(l as usize <= HDR_LEN + 1514, "round {round}: used len {l}");
        }
        e.rx_seen = e.d.used_idx_of(RX_QUEUE as u32);
    }
    let c = e.counters();
    assert!(c.rx_bad_chains > 50 && c.rx_frames >= 5, "{c:?}");
    assert_eq!(e.d.status() & status::DEVICE_NEEDS_RESET, 0);
    // Good buffers: frames flow again, up to a marker sent last.
    e.used_q.clear();
    let bufs = e.post_rx(32, 2048);
    let marker = test_frame(GUEST_MAC, HOST_MAC, 99, 0xee);
    e.host.send(&marker);
    let mut seen = false;
    let mut got = 0u32;
    // Frames the tap queued during the hostile rounds come first.
    while let Some((_, f)) = e.recv_frame(T) {
        if f == marker {
            seen = true;
            break;
        }
        got += 1;
        if got.is_multiple_of(32) {
            for &a in &bufs {
                e.post_rx_at(a, 2048);
            }
            e.d.kick(RX_QUEUE as u32);
        }
    }
    assert!(seen, "marker frame after the hostile buffers");
}

#[test]
fn tap_open_attaches_to_a_persistent_tap_and_leaves_it_in_place() {
    let ns = TestNetns::new();
    ns.ip(&["tuntap", "add", "dev", "wpre0", "mode", "tap"]);
    ns.ip(&["tuntap", "add", "dev", "wmq0", "mode", "tap", "multi_queue"]);
    ns.enter(|| {
        let t = Tap::open("wpre0").unwrap();
        // The header size can be set: IFF_VNET_HDR took on the existing tap.
        t.set_vnet_hdr_size(HDR_LEN as i32).unwrap();
        assert!(matches!(Tap::open("wmq0"), Err(TapError::NotATap { .. })));
    });
    // Still there after wisp's fd closed.
    ns.ip(&["link", "show", "wpre0"]);
}

/// Device time per transmitted frame (not a pass/fail test): run with
/// `cargo test --release -p wisp-devices tx_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn tx_cost() {
    for (len, frames) in [
        (60usize, 20_000u32),
        (1514, 20_000),
        (TSO_PAYLOAD + 54, 2_000),
    ] {
        let mut e = env_with(ALL_OFFLOADS, 256);
        let (hdr, frame) = if len > 1514 {
            let f = tcp_frame(
                HOST_MAC,
                GUEST_MAC,
                GUEST_IP,
                FAR_IP,
                1,
                &pattern(TSO_PAYLOAD, 1),
                true,
            );
            (
                vnet_hdr(hdr_flags::NEEDS_CSUM, gso::TCPV4, 54, MSS, 34, 16),
                f,
            )
        } else {
            ([0; HDR_LEN], test_frame(HOST_MAC, GUEST_MAC, len, 0))
        };
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(&frame);
        e.d.mem
            .write_slice(&bytes, GuestAddress(e.tx_area))
            .unwrap();
        let buf = Buf::readable(e.tx_area, bytes.len() as u32);
        let mut busy = Duration::ZERO;
        let mut sent = 0;
        while sent < frames {
            // A full ring of chains per notification, as a busy driver would leave it.
            for _ in 0..256 {
                e.add_tx(&[buf]);
            }
            sent += 256;
            e.d.write32(regs::QUEUE_NOTIFY, TX_QUEUE as u32);
            let t = Instant::now();
            e.d.handler.process_queue(TX_QUEUE);
            busy += t.elapsed();
        }
        let c = e.counters();
        assert_eq!(c.tx_frames, u64::from(sent));
        eprintln!(
            "tx {len:>6}-byte frames: {:>7.2} us of device time per frame ({sent} frames)",
            busy.as_secs_f64() * 1e6 / f64::from(sent)
        );
    }
}

#[test]
fn frame_larger_than_the_rx_buffer_is_dropped_and_the_next_one_delivered() {
    // Without MRG_RXBUF each buffer must hold a whole frame.
    let mut e = env(0);
    e.post_rx(2, 512);
    e.host.send(&test_frame(GUEST_MAC, HOST_MAC, 1514, 1));
    let small = test_frame(GUEST_MAC, HOST_MAC, 100, 2);
    e.host.send(&small);
    let (_, got) = e.recv_frame(T).expect("small frame");
    assert_eq!(got, small);
    assert_eq!(e.counters().rx_dropped, 1);

    // With MRG_RXBUF, a frame larger than every buffer the ring can hold (4 x 256 bytes).
    let mut e = env_with(netf::MRG_RXBUF, 4);
    e.post_rx(4, 256);
    e.host.send(&test_frame(GUEST_MAC, HOST_MAC, 1514, 3));
    e.host.send(&small);
    let (h, got) = e.recv_frame(T).expect("small frame");
    assert_eq!(got, small);
    assert_eq!(u16::from_le_bytes([h[10], h[11]]), 1);
    assert_eq!(e.counters().rx_dropped, 1);
}

#[test]
fn tx_head_index_outside_the_queue_needs_a_reset() {
    let mut e = env(0);
    let q = TX_QUEUE as u32;
    e.d.publish_to(q, 500);
    e.d.kick(q);
    assert_eq!(e.d.used_idx_of(q), 0);
    assert_ne!(e.d.status() & status::DEVICE_NEEDS_RESET, 0);
    // The device takes nothing more from the guest until it is reset.
    let mut bytes = vec![0u8; HDR_LEN];
    bytes.extend_from_slice(&test_frame(HOST_MAC, GUEST_MAC, 100, 1));
    e.d.mem
        .write_slice(&bytes, GuestAddress(e.tx_area))
        .unwrap();
    e.add_tx(&[Buf::readable(e.tx_area, bytes.len() as u32)]);
    e.d.kick(q);
    assert_eq!(e.d.used_idx_of(q), 0);
    assert_eq!(e.counters().tx_frames, 0);
}

fn limiter(ops: Option<(u64, u64)>) -> RateLimiter {
    let bucket = ops.map(|(size, refill_time_ms)| BucketParams {
        size,
        one_time_burst: 0,
        refill_time_ms,
    });
    RateLimiter::new(None, bucket).unwrap()
}

#[test]
fn throttled_tx_frames_wait_in_the_ring_and_leave_when_the_timer_fires() {
    // Two frames at once, then one every 50 ms.
    let limiters = (limiter(None), limiter(Some((2, 100))));
    let mut e = env_limited(0, 64, Some(limiters));
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| test_frame(HOST_MAC, GUEST_MAC, 100, 0x60 + i))
        .collect();
    for (i, f) in frames.iter().enumerate() {
        let mut bytes = vec![0u8; HDR_LEN];
        bytes.extend_from_slice(f);
        let addr = e.tx_area + i as u64 * 256;
        e.d.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        e.add_tx(&[Buf::readable(addr, bytes.len() as u32)]);
    }
    e.d.kick(TX_QUEUE as u32);
    // The bucket's two went out; three wait in the ring, not dropped.
    assert_eq!(e.d.used_idx_of(TX_QUEUE as u32), 2);
    let c = e.counters();
    assert_eq!(c.tx_frames, 2);
    assert!(c.tx_rate_limiter_throttled >= 1);
    // The limiter's timer sends the rest, in order.
    assert!(e.pump(T, |e| e.d.used_idx_of(TX_QUEUE as u32) == 5));
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(e.host_recv().as_deref(), Some(&f[..]), "frame {i}");
    }
    let c = e.counters();
    assert_eq!((c.tx_frames, c.tx_malformed, c.tx_errors), (5, 0, 0));
    assert!((1..=3).contains(&c.tx_rate_limiter_events), "{c:?}");
}

#[test]
fn throttled_rx_leaves_frames_in_the_tap_until_the_limit_is_lifted() {
    // One frame every ten minutes.
    let limiters = (limiter(Some((1, 600_000))), limiter(None));
    let mut e = env_limited(netf::MRG_RXBUF, 64, Some(limiters));
    e.post_rx(16, 2048);
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|i| test_frame(GUEST_MAC, HOST_MAC, 300, 0x70 + i))
        .collect();
    for f in &frames {
        e.host.send(f);
    }
    let (_, got) = e.recv_frame(T).expect("the first frame");
    assert_eq!(got, frames[0]);
    // Give the others every chance to be read: they must stay in the tap's queue (the
    // kernel counts what wisp read as the tap's tx, and would count drops).
    std::thread::sleep(Duration::from_millis(200));
    e.settle();
    assert_eq!(tx_stats(&e.ns, TAP), (1, 0));
    let c = e.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 0));
    assert!(c.rx_rate_limiter_throttled >= 1);
    // Lifted through the VMM's handle: the two waiting come in at once.
    let off = BucketParams {
        size: 0,
        one_time_burst: 0,
        refill_time_ms: 0,
    };
    assert!(e
        .d
        .device::<Net>()
        .with(|n| n.update_rx_rate_limiter(BucketUpdate::Keep, BucketUpdate::Set(off))));
    for f in &frames[1..] {
        let (_, got) = e.recv_frame(T).expect("a frame held in the tap");
        assert_eq!(&got, f);
    }
    assert_eq!(tx_stats(&e.ns, TAP), (3, 0));
}

// ---------------------------------------------------------------------------------------
// The metadata service on the interface

const MMDS_IP: [u8; 4] = [169, 254, 169, 254];

fn env_mmds(accepted: u64) -> (Env, Arc<std::sync::Mutex<Mmds>>) {
    let mut m = Mmds::new(51200);
    m.put(serde_json::json!({"latest": {"meta-data": {"instance-id": "i-42"}}}))
        .unwrap();
    let m = Arc::new(std::sync::Mutex::new(m));
    let stack = MmdsStack::new(m.clone(), DEFAULT_IPV4);
    (env_full(accepted, 64, None, Some(stack)), m)
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&GUEST_MAC);
    a.extend_from_slice(&GUEST_IP);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    eth([0xff; 6], GUEST_MAC, 0x0806, &a)
}

/// A TCP segment from the guest (port 40000) to `dst` port 80; with `partial` the checksum
/// is left as NEEDS_CSUM leaves it (the pseudo-header sum).
fn guest_tcp(
    dst: [u8; 4],
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
    partial: bool,
) -> Vec<u8> {
    guest_tcp_from(40000, dst, seq, ack, flags, payload, partial)
}

fn guest_tcp_from(
    port: u16,
    dst: [u8; 4],
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
    partial: bool,
) -> Vec<u8> {
    let tcp_len = 20 + payload.len();
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&GUEST_IP);
    ip[16..20].copy_from_slice(&dst);
    let c = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&port.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let pseudo = pseudo_sum(GUEST_IP, dst, tcp_len);
    let c = if partial {
        csum_fold(pseudo)
    } else {
        !csum_fold(csum_add(pseudo, &tcp))
    };
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    eth(MMDS_MAC, GUEST_MAC, 0x0800, &ip)
}

/// (flags, seq, ack, payload) of a segment the MMDS sent, its checksums checked.
fn mmds_segment(f: &[u8]) -> (u8, u32, u32, Vec<u8>) {
    assert_eq!(&f[0..6], &GUEST_MAC);
    assert_eq!(&f[6..12], &MMDS_MAC);
    let ip = &f[14..];
    assert_eq!(csum_fold(csum_add(0, &ip[..20])), 0xffff, "IP checksum");
    let tcp = &ip[20..];
    let sum = csum_add(pseudo_sum(MMDS_IP, GUEST_IP, tcp.len()), tcp);
    assert_eq!(csum_fold(sum), 0xffff, "TCP checksum");
    let doff = usize::from(tcp[12] >> 4) * 4;
    let be32 = |at: usize| u32::from_be_bytes(tcp[at..at + 4].try_into().unwrap());
    (tcp[13], be32(4), be32(8), tcp[doff..].to_vec())
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;

#[test]
fn mmds_answers_arp_byte_exact_and_other_frames_still_reach_the_tap() {
    let (mut e, m) = env_mmds(netf::MRG_RXBUF);
    e.post_rx(8, 2048);
    e.transmit([0; HDR_LEN], &arp_request(MMDS_IP), 1);
    let (hdr, reply) = e.recv_frame(T).expect("an ARP reply");
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    let want: Vec<u8> = [
        &GUEST_MAC[..],
        &MMDS_MAC,
        &[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2],
        &MMDS_MAC,
        &MMDS_IP,
        &GUEST_MAC,
        &GUEST_IP,
    ]
    .concat();
    assert_eq!(reply, want);
    assert_eq!(e.counters().tx_frames, 0, "nothing went to the tap");
    // ARP for another address, TCP to another host: to the tap, unchanged.
    let other_arp = arp_request([10, 0, 0, 1]);
    e.transmit([0; HDR_LEN], &other_arp, 1);
    assert_eq!(e.host_recv().as_deref(), Some(&other_arp[..]));
    let other_tcp = guest_tcp([10, 0, 0, 1], 1, 0, SYN, b"", false);
    e.transmit([0; HDR_LEN], &other_tcp, 2);
    assert_eq!(e.host_recv().as_deref(), Some(&other_tcp[..]));
    assert_eq!(e.counters().tx_frames, 2);
    let c = m.lock().unwrap().counters();
    assert_eq!(c.rx_accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// SYN, SYN-ACK, ACK, GET, the answer and FIN, the guest's FIN and the last ACK, all
/// through the rings; returns the answer's bytes.
fn mmds_get(e: &mut Env, request: &str, partial: bool) -> String {
    let hdr = if partial {
        vnet_hdr(hdr_flags::NEEDS_CSUM, gso::NONE, 0, 0, 34, 16)
    } else {
        [0; HDR_LEN]
    };
    let tx_before = e.counters().tx_frames;
    e.transmit(hdr, &guest_tcp(MMDS_IP, 100, 0, SYN, b"", partial), 1);
    let (_, f) = e.recv_frame(T).expect("SYN-ACK");
    let (flags, iss, ack, _) = mmds_segment(&f);
    assert_eq!((flags, ack), (SYN | ACK, 101));
    let seg = guest_tcp(MMDS_IP, 101, iss + 1, ACK, request.as_bytes(), partial);
    e.transmit(hdr, &seg, 3);
    let mut answer = Vec::new();
    let mut next = iss + 1;
    loop {
        let (_, f) = e.recv_frame(T).expect("the answer");
        let (flags, seq, _, payload) = mmds_segment(&f);
        assert_eq!(seq, next);
        next += payload.len() as u32;
        answer.extend(payload);
        if flags & FIN != 0 {
            next += 1;
            break;
        }
    }
    let end = 101 + request.len() as u32;
    e.transmit(
        hdr,
        &guest_tcp(MMDS_IP, end, next, ACK | FIN, b"", partial),
        1,
    );
    let (_, f) = e.recv_frame(T).expect("the last ACK");
    assert_eq!(mmds_segment(&f).0, ACK);
    assert_eq!(
        e.counters().tx_frames,
        tx_before,
        "no MMDS frame reached the tap"
    );
    String::from_utf8(answer).unwrap()
}

#[test]
fn mmds_get_through_the_rings_returns_the_data_with_and_without_checksum_offload() {
    let (mut e, _) = env_mmds(netf::MRG_RXBUF | netf::CSUM);
    e.post_rx(32, 2048);
    let a = mmds_get(
        &mut e,
        "GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n",
        false,
    );
    assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
    assert!(a.ends_with("\r\n\r\ni-42"), "{a}");
    let a = mmds_get(
        &mut e,
        "GET /latest/ HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        true,
    );
    assert!(
        a.ends_with(r#"{"meta-data":{"instance-id":"i-42"}}"#),
        "{a}"
    );
}

#[test]
fn mmds_v2_refuses_a_get_without_token_through_the_rings() {
    let (mut e, m) = env_mmds(netf::MRG_RXBUF);
    m.lock().unwrap().set_version(MmdsVersion::V2);
    e.post_rx(32, 2048);
    let a = mmds_get(
        &mut e,
        "GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n",
        false,
    );
    assert!(a.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{a}");
}

#[test]
fn mmds_answers_and_tap_frames_take_turns_for_rx_buffers() {
    let (mut e, _) = env_mmds(netf::MRG_RXBUF);
    // Frames for the guest wait in the tap and answers in the responder: no buffer yet.
    for i in 0..4 {
        e.host.send(&test_frame(GUEST_MAC, HOST_MAC, 100, i));
    }
    for port in 0..8 {
        let syn = guest_tcp_from(41000 + port, MMDS_IP, 1, 0, SYN, b"", false);
        e.transmit([0; HDR_LEN], &syn, 1);
    }
    e.settle();
    e.post_rx(4, 2048);
    let from_mmds: Vec<bool> = (0..4)
        .map(|_| e.recv_frame(T).expect("a frame").1[6..12] == MMDS_MAC)
        .collect();
    // Neither source starves the other.
    assert_eq!(from_mmds, [true, false, true, false]);
}
