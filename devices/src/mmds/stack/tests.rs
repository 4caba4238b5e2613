//! The responder driven with crafted frames and a clock the test moves.

use super::*;
use crate::mmds::MmdsVersion;
use serde_json::json;

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const MMDS_IP: [u8; 4] = [169, 254, 169, 254];
const GPORT: u16 = 40000;
const GISS: u32 = 1000;

fn stack_with(data: serde_json::Value, limit: usize) -> (MmdsStack, Arc<Mutex<Mmds>>) {
    let mut m = Mmds::new(limit);
    m.put(data).unwrap();
    let m = Arc::new(Mutex::new(m));
    (MmdsStack::new(m.clone(), DEFAULT_IPV4), m)
}

fn stack() -> (MmdsStack, Arc<Mutex<Mmds>>) {
    stack_with(
        json!({"latest": {"meta-data": {"instance-id": "i-1234"}, "user-data": "hello"}}),
        51200,
    )
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&GUEST_MAC);
    a.extend_from_slice(&GUEST_IP);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    eth(ETHERTYPE_ARP, &a)
}

/// A guest segment; `port` is its source port.
struct G {
    port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    payload: Vec<u8>,
}

impl G {
    fn new(seq: u32, ack: u32, flags: u8) -> G {
        G {
            port: GPORT,
            dst_port: 80,
            seq,
            ack,
            flags,
            window: 65535,
            payload: Vec::new(),
        }
    }

    fn data(mut self, p: &[u8]) -> G {
        self.payload = p.to_vec();
        self
    }

    fn frame(&self) -> Vec<u8> {
        let opts: &[u8] = if self.flags & SYN != 0 {
            &[2, 4, 0x05, 0xb4]
        } else {
            &[]
        };
        let tcp_len = TCP_LEN + opts.len() + self.payload.len();
        let mut ip = vec![0u8; IP_LEN];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((IP_LEN + tcp_len) as u16).to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(&GUEST_IP);
        ip[16..20].copy_from_slice(&MMDS_IP);
        let c = !csum_fold(csum_add(0, &ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut tcp = vec![0u8; TCP_LEN];
        tcp[0..2].copy_from_slice(&self.port.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&self.ack.to_be_bytes());
        tcp[12] = (((TCP_LEN + opts.len()) / 4) as u8) << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&self.window.to_be_bytes());
        tcp.extend_from_slice(opts);
        tcp.extend_from_slice(&self.payload);
        let c = !csum_fold(csum_add(tcp_pseudo_sum(GUEST_IP, MMDS_IP, tcp_len), &tcp));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&tcp);
        let mut f = eth(ETHERTYPE_IPV4, &ip);
        f[0..6].copy_from_slice(&MMDS_MAC);
        f
    }
}

/// A segment the responder sent, its checksums checked.
#[derive(Debug)]
struct Seg {
    port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    payload: Vec<u8>,
}

fn parse_out(f: &[u8]) -> Seg {
    assert_eq!(&f[0..6], &GUEST_MAC, "to the guest");
    assert_eq!(&f[6..12], &MMDS_MAC, "from the MMDS");
    assert_eq!(be16(f, 12), ETHERTYPE_IPV4);
    let ip = &f[ETH_LEN..];
    assert_eq!(csum_fold(csum_add(0, &ip[..IP_LEN])), 0xffff, "IP checksum");
    assert_eq!(usize::from(be16(ip, 2)), ip.len(), "IP total length");
    assert_eq!(&ip[12..16], &MMDS_IP);
    assert_eq!(&ip[16..20], &GUEST_IP);
    let tcp = &ip[IP_LEN..];
    let sum = csum_add(tcp_pseudo_sum(MMDS_IP, GUEST_IP, tcp.len()), tcp);
    assert_eq!(csum_fold(sum), 0xffff, "TCP checksum");
    assert_eq!(be16(tcp, 0), 80);
    let doff = usize::from(tcp[12] >> 4) * 4;
    Seg {
        port: be16(tcp, 2),
        seq: be32(tcp, 4),
        ack: be32(tcp, 8),
        flags: tcp[13],
        window: be16(tcp, 14),
        payload: tcp[doff..].to_vec(),
    }
}

fn out(s: &mut MmdsStack) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    let mut buf = vec![0u8; MAX_OUT_FRAME];
    while s.has_frame() {
        let n = s.write_frame(&mut buf).expect("has_frame said so");
        v.push(buf[..n].to_vec());
        assert!(v.len() < 10_000, "the responder does not stop sending");
    }
    assert_eq!(s.write_frame(&mut buf), None);
    v
}

fn segs(s: &mut MmdsStack) -> Vec<Seg> {
    out(s).iter().map(|f| parse_out(f)).collect()
}

/// SYN, SYN-ACK, ACK; returns the responder's next sequence number.
fn connect(s: &mut MmdsStack, t: Instant) -> u32 {
    s.receive(&G::new(GISS, 0, SYN).frame(), false, t);
    let sa = segs(s);
    assert_eq!(sa.len(), 1);
    assert_eq!(sa[0].flags, SYN | ACK);
    let next = sa[0].seq.wrapping_add(1);
    s.receive(&G::new(GISS + 1, next, ACK).frame(), false, t);
    assert!(segs(s).is_empty(), "nothing to say after the handshake");
    next
}

/// Sends `request` on a new connection; returns the answer's bytes (FIN seen) and the
/// responder's sequence number after its FIN.
fn ask(s: &mut MmdsStack, request: &str, t: Instant) -> String {
    let iss1 = connect(s, t);
    let req = G::new(GISS + 1, iss1, ACK | PSH).data(request.as_bytes());
    s.receive(&req.frame(), false, t);
    let got = segs(s);
    let mut body = Vec::new();
    let mut fin = false;
    let mut end = iss1;
    for g in &got {
        assert_eq!(
            g.ack,
            GISS + 1 + request.len() as u32,
            "the request is acknowledged"
        );
        assert_eq!(g.seq, end, "in order");
        body.extend_from_slice(&g.payload);
        end = end.wrapping_add(g.payload.len() as u32);
        if g.flags & FIN != 0 {
            fin = true;
            end = end.wrapping_add(1);
        }
    }
    assert!(fin, "the answer ends with FIN: {got:?}");
    // The guest acknowledges everything and closes its side: the connection is gone.
    let seq = GISS + 1 + request.len() as u32;
    s.receive(&G::new(seq, end, ACK | FIN).frame(), false, t);
    let last = segs(s);
    assert_eq!(last.len(), 1);
    assert_eq!((last[0].flags, last[0].ack), (ACK, seq + 1));
    assert_eq!(s.connections(), 0);
    String::from_utf8(body).unwrap()
}

fn body_of(answer: &str) -> (&str, &str) {
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    (head.lines().next().unwrap(), body)
}

#[test]
fn arp_request_for_the_mmds_address_is_answered_byte_exact() {
    let (mut s, _) = stack();
    let req = arp_request(MMDS_IP);
    assert!(s.is_mmds_frame(&req));
    assert!(!s.is_mmds_frame(&arp_request([10, 0, 0, 1])));
    s.receive(&req, false, Instant::now());
    let frames = out(&mut s);
    let want: Vec<u8> = [
        &GUEST_MAC[..],
        &MMDS_MAC,
        &[0x08, 0x06],
        &[0, 1, 8, 0, 6, 4, 0, 2],
        &MMDS_MAC,
        &MMDS_IP,
        &GUEST_MAC,
        &GUEST_IP,
    ]
    .concat();
    assert_eq!(frames, vec![want]);
}

#[test]
fn syn_gets_syn_ack_with_mss_and_valid_checksums() {
    let (mut s, _) = stack();
    let t = Instant::now();
    let syn = G::new(GISS, 0, SYN).frame();
    assert!(s.is_mmds_frame(&syn));
    s.receive(&syn, false, t);
    let f = out(&mut s);
    assert_eq!(f.len(), 1);
    let sa = parse_out(&f[0]);
    assert_eq!((sa.port, sa.flags, sa.ack), (GPORT, SYN | ACK, GISS + 1));
    assert_eq!(sa.window as usize, MAX_REQUEST);
    // The MSS option, 1460.
    let tcp = &f[0][ETH_LEN + IP_LEN..];
    assert_eq!(tcp[12] >> 4, 6);
    assert_eq!(&tcp[20..24], &[2, 4, 0x05, 0xb4]);
    // A repeated SYN gets the same SYN-ACK again.
    s.receive(&syn, false, t);
    let again = segs(&mut s);
    assert_eq!((again[0].seq, again[0].flags), (sa.seq, SYN | ACK));
}

#[test]
fn get_is_answered_with_the_listing_or_the_json_then_fin() {
    let (mut s, _) = stack();
    let t = Instant::now();
    let a = ask(&mut s, "GET /latest/ HTTP/1.1\r\nHost: x\r\n\r\n", t);
    assert_eq!(body_of(&a), ("HTTP/1.1 200 OK", "meta-data/\nuser-data"));
    assert!(a.contains("Content-Type: text/plain\r\n"));
    let a = ask(
        &mut s,
        "GET /latest/meta-data HTTP/1.0\r\nAccept: application/json\r\n\r\n",
        t,
    );
    assert_eq!(
        body_of(&a),
        ("HTTP/1.0 200 OK", r#"{"instance-id":"i-1234"}"#)
    );
    assert!(a.contains("Content-Type: application/json\r\n"));
    let a = ask(&mut s, "GET /latest/nothing HTTP/1.1\r\n\r\n", t);
    assert_eq!(
        body_of(&a),
        (
            "HTTP/1.1 404 Not Found",
            "Resource not found: /latest/nothing."
        )
    );
}

#[test]
fn a_request_in_pieces_is_answered_once_whole() {
    let (mut s, _) = stack();
    let t = Instant::now();
    let iss1 = connect(&mut s, t);
    let (a, b) = ("GET /latest/user-data HT", "TP/1.1\r\n\r\n");
    s.receive(
        &G::new(GISS + 1, iss1, ACK).data(a.as_bytes()).frame(),
        false,
        t,
    );
    let acks = segs(&mut s);
    assert_eq!(acks.len(), 1);
    assert_eq!(
        (acks[0].flags, acks[0].ack),
        (ACK, GISS + 1 + a.len() as u32)
    );
    assert_eq!(acks[0].window as usize, MAX_REQUEST - a.len());
    // Out of order (the second piece twice as far): acknowledged where we are, ignored.
    let far = GISS + 1 + 2 * a.len() as u32;
    s.receive(&G::new(far, iss1, ACK).data(b.as_bytes()).frame(), false, t);
    assert_eq!(segs(&mut s)[0].ack, GISS + 1 + a.len() as u32);
    let seq = GISS + 1 + a.len() as u32;
    s.receive(&G::new(seq, iss1, ACK).data(b.as_bytes()).frame(), false, t);
    let body: Vec<u8> = segs(&mut s).into_iter().flat_map(|g| g.payload).collect();
    assert!(String::from_utf8(body).unwrap().ends_with("\r\n\r\nhello"));
}

#[test]
fn bad_checksums_and_fragments_are_dropped_and_counted() {
    let (mut s, m) = stack();
    let counters = m.lock().unwrap().counters();
    let t = Instant::now();
    let syn = G::new(GISS, 0, SYN).frame();
    let mut bad_ip = syn.clone();
    bad_ip[ETH_LEN + 10] ^= 0xff;
    let mut bad_tcp = syn.clone();
    bad_tcp[ETH_LEN + IP_LEN + 16] ^= 0xff;
    let refresh_ip_csum = |f: &mut Vec<u8>| {
        f[ETH_LEN + 10..ETH_LEN + 12].fill(0);
        let c = !csum_fold(csum_add(0, &f[ETH_LEN..ETH_LEN + IP_LEN]));
        f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
    };
    let mut fragment = syn.clone();
    fragment[ETH_LEN + 6] = 0x20; // MF
    refresh_ip_csum(&mut fragment);
    let mut offset = syn.clone();
    offset[ETH_LEN + 7] = 0x10; // fragment offset
    refresh_ip_csum(&mut offset);
    let mut short = syn.clone();
    short.truncate(ETH_LEN + IP_LEN + 10);
    for f in [&bad_ip, &bad_tcp, &fragment, &offset, &short] {
        s.receive(f, false, t);
        assert!(!s.has_frame());
    }
    assert_eq!(s.connections(), 0);
    assert_eq!(counters.rx_accepted_err.load(Ordering::Relaxed), 3);
    assert_eq!(counters.rx_accepted_unusual.load(Ordering::Relaxed), 2);
    // With NEEDS_CSUM the driver left the TCP checksum to the device: it is not checked.
    s.receive(&bad_tcp, true, t);
    assert_eq!(segs(&mut s)[0].flags, SYN | ACK);
}

#[test]
fn an_oversized_request_gets_413_and_the_window_closes() {
    let (mut s, _) = stack();
    let t = Instant::now();
    let iss1 = connect(&mut s, t);
    let junk = vec![b'a'; 3000];
    s.receive(&G::new(GISS + 1, iss1, ACK).data(&junk).frame(), false, t);
    let ack = segs(&mut s);
    assert_eq!(ack[0].window as usize, MAX_REQUEST - 3000);
    // The guest ignores the window: only what fits is taken.
    s.receive(
        &G::new(GISS + 3001, iss1, ACK).data(&junk).frame(),
        false,
        t,
    );
    let answer = segs(&mut s);
    assert_eq!(answer[0].ack, GISS + 1 + MAX_REQUEST as u32);
    let body: Vec<u8> = answer.iter().flat_map(|g| g.payload.clone()).collect();
    let body = String::from_utf8(body).unwrap();
    assert!(body.starts_with("HTTP/1.1 413 "), "{body}");
    assert!(answer.last().unwrap().flags & FIN != 0);
}

#[test]
fn too_many_connections_are_refused_until_one_is_idle_long_enough() {
    let (mut s, _) = stack();
    let t = Instant::now();
    for i in 0..MAX_CONNECTIONS as u16 {
        let mut syn = G::new(GISS, 0, SYN);
        syn.port = 1000 + i;
        s.receive(&syn.frame(), false, t);
    }
    assert_eq!(segs(&mut s).len(), MAX_CONNECTIONS);
    let mut syn = G::new(GISS, 0, SYN);
    syn.port = 2000;
    let late = t + Duration::from_secs(1);
    s.receive(&syn.frame(), false, late);
    let refused = segs(&mut s);
    assert_eq!(refused.len(), 1);
    assert_eq!((refused[0].port, refused[0].flags), (2000, RST | ACK));
    assert_eq!(s.connections(), MAX_CONNECTIONS);
    // The first has been idle long enough: it makes room, with a RST to its guest.
    let later = t + EVICT_IDLE;
    s.receive(&syn.frame(), false, later);
    let got = segs(&mut s);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].port, got[0].flags & RST), (1000, RST));
    assert_eq!((got[1].port, got[1].flags), (2000, SYN | ACK));
    assert_eq!(s.connections(), MAX_CONNECTIONS);
}

#[test]
fn segments_for_no_connection_or_another_port_get_rst() {
    let (mut s, _) = stack();
    let t = Instant::now();
    let mut other_port = G::new(GISS, 0, SYN);
    other_port.dst_port = 8080;
    s.receive(&other_port.frame(), false, t);
    let r = segs(&mut s);
    assert_eq!((r[0].flags, r[0].seq, r[0].ack), (RST | ACK, 0, GISS + 1));
    s.receive(&G::new(5, 777, ACK).data(b"x").frame(), false, t);
    let r = segs(&mut s);
    assert_eq!((r[0].flags, r[0].seq), (RST, 777));
    // A RST for no connection is not answered.
    s.receive(&G::new(5, 0, RST).frame(), false, t);
    assert!(!s.has_frame());
    assert_eq!(s.connections(), 0);
}

#[test]
fn v2_needs_a_token_over_tcp_and_refuses_missing_expired_and_wrong_ones() {
    let (mut s, m) = stack();
    m.lock().unwrap().set_version(MmdsVersion::V2);
    let t = Instant::now();
    let get =
        |tok: &str| format!("GET /latest/user-data HTTP/1.1\r\nX-metadata-token: {tok}\r\n\r\n");
    let a = ask(&mut s, "GET /latest/user-data HTTP/1.1\r\n\r\n", t);
    assert_eq!(body_of(&a).0, "HTTP/1.1 401 Unauthorized");
    assert!(body_of(&a).1.starts_with("No MMDS token provided."));
    let a = ask(
        &mut s,
        "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 30\r\n\r\n",
        t,
    );
    assert!(a.contains("\r\nx-metadata-token-ttl-seconds: 30\r\n"));
    let token = body_of(&a).1.to_string();
    assert_eq!(token.len(), 64);
    assert_eq!(body_of(&ask(&mut s, &get(&token), t)).1, "hello");
    let a = ask(&mut s, &get(&"0".repeat(64)), t);
    assert_eq!(
        body_of(&a),
        ("HTTP/1.1 401 Unauthorized", "MMDS token not valid.")
    );
    let expired = t + Duration::from_secs(30);
    let a = ask(&mut s, &get(&token), expired);
    assert_eq!(
        body_of(&a),
        ("HTTP/1.1 401 Unauthorized", "MMDS token not valid.")
    );
    let counters = m.lock().unwrap().counters();
    assert_eq!(counters.rx_no_token.load(Ordering::Relaxed), 1);
    assert_eq!(counters.rx_invalid_token.load(Ordering::Relaxed), 2);
}

#[test]
fn a_long_answer_follows_the_guests_mss_and_window_and_is_resent_on_duplicate_ack() {
    let big = "x".repeat(5000);
    let (mut s, _) = stack_with(json!({ "big": big }), 51200);
    let t = Instant::now();
    // SYN with MSS 1460; then a 2000-byte window.
    let iss1 = connect(&mut s, t);
    let req = b"GET /big HTTP/1.1\r\n\r\n";
    let mut g = G::new(GISS + 1, iss1, ACK).data(req);
    g.window = 2000;
    s.receive(&g.frame(), false, t);
    let first = segs(&mut s);
    let sizes: Vec<usize> = first.iter().map(|g| g.payload.len()).collect();
    assert_eq!(
        sizes,
        vec![1460, 540],
        "one MSS, then what the window has left"
    );
    // A duplicate ACK (nothing acknowledged): the same bytes again.
    let ack_seq = GISS + 1 + req.len() as u32;
    let mut dup = G::new(ack_seq, iss1, ACK);
    dup.window = 2000;
    s.receive(&dup.frame(), false, t);
    let again = segs(&mut s);
    assert_eq!(again[0].seq, first[0].seq);
    assert_eq!(again[0].payload, first[0].payload);
    // Acknowledged with a big window: the rest, then FIN.
    let mut ack = G::new(ack_seq, iss1.wrapping_add(2000), ACK);
    ack.window = 65535;
    s.receive(&ack.frame(), false, t);
    let rest = segs(&mut s);
    assert_eq!(rest[0].seq, iss1.wrapping_add(2000));
    assert!(rest.last().unwrap().flags & FIN != 0);
}

#[test]
fn answers_beyond_the_budget_become_503() {
    // A 300 KB value with a 400 KB limit: four answers at once pass the 1 MiB budget.
    let (mut s, m) = stack_with(json!({ "v": "y".repeat(300_000) }), 400_000);
    let t = Instant::now();
    let mut statuses = Vec::new();
    for i in 0..4u16 {
        let mut syn = G::new(GISS, 0, SYN);
        syn.port = 3000 + i;
        s.receive(&syn.frame(), false, t);
        let sa = segs(&mut s);
        let mut ack = G::new(GISS + 1, sa[0].seq + 1, ACK | PSH).data(b"GET /v HTTP/1.1\r\n\r\n");
        ack.port = 3000 + i;
        // A closed window: the answers stay queued.
        ack.window = 0;
        s.receive(&ack.frame(), false, t);
        let a = segs(&mut s);
        assert_eq!(
            a.len(),
            1,
            "only the ACK goes out while the window is closed"
        );
        statuses.push(
            s.conns
                .iter()
                .find(|c| c.port == 3000 + i)
                .unwrap()
                .answer
                .as_ref()
                .unwrap()[..12]
                .to_vec(),
        );
    }
    let statuses: Vec<String> = statuses
        .into_iter()
        .map(|b| String::from_utf8(b).unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 200",
            "HTTP/1.1 200",
            "HTTP/1.1 200",
            "HTTP/1.1 503"
        ]
    );
    assert!(s.queued <= 1 << 20);
    assert_eq!(
        m.lock()
            .unwrap()
            .counters()
            .tx_errors
            .load(Ordering::Relaxed),
        1
    );
}

/// The responder against a real Linux TCP stack: the test's network namespace routes the
/// MMDS address to a tap whose other end is the responder, and curl in the namespace asks
/// (ARP, handshake, request, answer, close, all as Linux does them).
#[test]
fn linux_tcp_clients_get_answers_through_a_tap() {
    use crate::tap::Tap;
    use crate::test_utils::TestNetns;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicBool;

    let ns = TestNetns::new();
    let tap = ns.enter(|| Tap::open("wmmds0").expect("open tap"));
    tap.set_vnet_hdr_size(12).unwrap();
    // No offloads: the kernel hands the tap complete, checksummed frames.
    tap.set_offload(0).unwrap();
    ns.ip(&["link", "set", "wmmds0", "up"]);
    ns.ip(&["addr", "add", "10.0.0.2/24", "dev", "wmmds0"]);
    ns.ip(&["route", "add", "169.254.169.254/32", "dev", "wmmds0"]);
    let (mut s, m) = stack();
    let stop = AtomicBool::new(false);
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "curl", "-s", "-m", "20"])
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.to_string(), body.to_string())
    };
    let url = |p: &str| format!("http://169.254.169.254{p}");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut buf = vec![0u8; 70000];
            let mut out = vec![0u8; 12 + MAX_OUT_FRAME];
            while !stop.load(Ordering::Relaxed) {
                let mut p = libc::pollfd {
                    fd: tap.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 20) };
                while let Ok(n) = tap.read(&mut buf) {
                    let frame = &buf[12..n.min(buf.len())];
                    if s.is_mmds_frame(frame) {
                        s.receive(frame, buf[0] & 1 != 0, Instant::now());
                    }
                }
                while let Some(n) = s.write_frame(&mut out[12..]) {
                    out[..12].fill(0);
                    tap.write(&out[..12 + n]).expect("write to the tap");
                }
            }
        });
        let (code, body) = curl(&[&url("/latest/meta-data/instance-id")]);
        assert_eq!((code.as_str(), body.as_str()), ("200", "i-1234"));
        let (code, body) = curl(&["-H", "Accept: application/json", &url("/latest")]);
        assert_eq!(code, "200");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            json!({"meta-data": {"instance-id": "i-1234"}, "user-data": "hello"})
        );
        m.lock().unwrap().set_version(MmdsVersion::V2);
        let (code, _) = curl(&[&url("/latest/user-data")]);
        assert_eq!(code, "401");
        let ttl = "X-metadata-token-ttl-seconds: 60";
        let (code, token) = curl(&["-X", "PUT", "-H", ttl, &url("/latest/api/token")]);
        assert_eq!((code.as_str(), token.len()), ("200", 64));
        let header = format!("X-metadata-token: {token}");
        let (code, body) = curl(&["-H", &header, &url("/latest/user-data")]);
        assert_eq!((code.as_str(), body.as_str()), ("200", "hello"));
        stop.store(true, Ordering::Relaxed);
    });
}

#[test]
fn a_flood_of_syns_with_no_receive_buffers_queues_no_more_than_the_bounds() {
    let (mut s, _) = stack();
    let t = Instant::now();
    // 10,000 connection attempts while the guest takes none of the answers.
    for port in 1..=10_000u16 {
        let mut syn = G::new(GISS, 0, SYN);
        syn.port = port;
        s.receive(&syn.frame(), false, t);
    }
    assert_eq!(s.connections(), MAX_CONNECTIONS);
    assert_eq!(
        s.resets.len(),
        MAX_PENDING_RESETS,
        "the other RSTs were dropped"
    );
    let f = segs(&mut s);
    let syn_acks = f.iter().filter(|g| g.flags == SYN | ACK).count();
    let rsts = f.iter().filter(|g| g.flags & RST != 0).count();
    assert_eq!((syn_acks, rsts), (MAX_CONNECTIONS, MAX_PENDING_RESETS));
}
