//! The metadata service's responder (`wisp_devices::mmds::MmdsStack`) on what a guest sends
//! it: the input is a sequence of operations, each a raw frame (any bytes), a TCP segment
//! built with valid checksums from fields the input picks (a port from a small set so that
//! connections meet, sequence and acknowledgement numbers near the responder's own, any
//! flags, window and payload, HTTP requests included), an ARP request, a drain of the
//! frames the responder has for the guest, a step of its clock, or a change of the store
//! (V1/V2, a PATCH).
//!
//! Checked: no panic, no hang; every frame the responder writes fits MAX_OUT_FRAME and is
//! IPv4 or ARP from the MMDS; never more than MAX_CONNECTIONS connections.
#![no_main]
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use wisp_devices::mmds::{
    Mmds, MmdsStack, MmdsVersion, DEFAULT_IPV4, MAX_CONNECTIONS, MAX_OUT_FRAME, MMDS_MAC,
};

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn csum(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = MMDS_MAC.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn tcp_frame(port: u16, seq: u32, ack: u32, flags: u8, window: u16, payload: &[u8]) -> Vec<u8> {
    let dst = DEFAULT_IPV4.octets();
    let tcp_len = 20 + payload.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&dst);
    let c = !fold(csum(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = Vec::with_capacity(tcp_len);
    tcp.extend_from_slice(&port.to_be_bytes());
    tcp.extend_from_slice(&80u16.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags]);
    tcp.extend_from_slice(&window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let pseudo = csum(csum(0, &GUEST_IP), &dst) + 6 + tcp_len as u32;
    let c = !fold(csum(pseudo, &tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    eth(0x0800, &ip)
}

const REQUESTS: [&[u8]; 4] = [
    b"GET /latest/meta-data HTTP/1.1\r\nAccept: application/json\r\n\r\n",
    b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET /latest/user-data HTTP/1.1\r\nX-metadata-token: 00\r\n\r\n",
];

fuzz_target!(|data: &[u8]| {
    let mut store = Mmds::new(4096);
    store
        .put(serde_json::json!({"latest": {"meta-data": {"id": "i-1", "n": 1}, "user-data": "u"}}))
        .unwrap();
    let store = Arc::new(Mutex::new(store));
    let mut stack = MmdsStack::new(store.clone(), DEFAULT_IPV4);
    let mut now = Instant::now();
    // The responder's last sequence number seen per port, so that segments can hit it.
    let mut their_seq = [0u32; 4];
    let mut out = vec![0u8; MAX_OUT_FRAME];
    let mut input = Input(data);
    while let Some(op) = input.byte() {
        match op % 8 {
            0 => {
                let n = usize::from(input.byte().unwrap_or(0)) * 2;
                let frame = input.bytes(n).to_vec();
                let partial = op & 0x80 != 0;
                if stack.is_mmds_frame(&frame) || partial {
                    stack.receive(&frame, partial, now);
                }
            }
            1 | 2 | 3 => {
                let (Some(sel), Some(flags), Some(window)) =
                    (input.byte(), input.byte(), input.u16())
                else {
                    break;
                };
                let slot = usize::from(sel % 4);
                let port = 40000 + slot as u16;
                let seq = u32::from(input.byte().unwrap_or(0));
                let ack = their_seq[slot].wrapping_add(u32::from(input.byte().unwrap_or(0)) % 8);
                let payload: Vec<u8> = match sel >> 2 {
                    0..=3 => REQUESTS[usize::from(sel >> 2)].to_vec(),
                    _ => {
                        let n = usize::from(input.byte().unwrap_or(0)) * 8;
                        input.bytes(n).to_vec()
                    }
                };
                let frame = tcp_frame(port, 1000 + seq, ack, flags, window, &payload);
                stack.receive(&frame, false, now);
            }
            4 => {
                let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
                a.extend_from_slice(&GUEST_MAC);
                a.extend_from_slice(&GUEST_IP);
                a.extend_from_slice(&[0; 6]);
                a.extend_from_slice(&DEFAULT_IPV4.octets());
                stack.receive(&eth(0x0806, &a), false, now);
            }
            5 => {
                for _ in 0..input.byte().unwrap_or(1) {
                    let Some(n) = stack.write_frame(&mut out) else {
                        break;
                    };
                    assert!(n <= MAX_OUT_FRAME);
                    assert_eq!(out[6..12], MMDS_MAC);
                    let ethertype = u16::from_be_bytes([out[12], out[13]]);
                    assert!(ethertype == 0x0800 || ethertype == 0x0806);
                    if ethertype == 0x0800 && n >= 54 {
                        let port = u16::from_be_bytes([out[36], out[37]]);
                        let seq = u32::from_be_bytes([out[38], out[39], out[40], out[41]]);
                        if let Some(slot) = port.checked_sub(40000).filter(|s| *s < 4) {
                            their_seq[usize::from(slot)] = seq;
                        }
                    }
                }
            }
            6 => now += Duration::from_secs(u64::from(input.byte().unwrap_or(0))),
            _ => {
                let mut m = store.lock().unwrap();
                match input.byte().unwrap_or(0) % 3 {
                    0 => m.set_version(MmdsVersion::V1),
                    1 => m.set_version(MmdsVersion::V2),
                    _ => {
                        let n = usize::from(input.byte().unwrap_or(0));
                        let v = String::from_utf8_lossy(input.bytes(n)).into_owned();
                        let _ = m.patch(&serde_json::json!({ "latest": { "user-data": v } }));
                    }
                }
            }
        }
        assert!(stack.connections() <= MAX_CONNECTIONS);
    }
});
