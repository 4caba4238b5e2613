//! virtio-vsock as a hostile guest driver and busy host processes drive it: through the
//! virtio-mmio registers of a real transport (the devices crate's `virtio::testing`
//! harness) over real guest memory, with real Unix sockets on the host side. The input
//! chooses the features, the queue size, every rx and tx descriptor, packet headers (CIDs,
//! ports from a small set so that connections meet, any op, type, flags, credit fields,
//! length) and payloads, garbage in the avail rings, and host actions: connecting to
//! `uds_path` with any first line, writing to, half-closing or closing those connections.
//! A listener at `<uds_path>_1234` accepts the guest's connections and writes to them.
//!
//! Checked: no panic; the event loop is never kept busy forever; at most MAX_CONNECTIONS
//! connections; wisp never holds more than BUF_ALLOC bytes of guest data per connection.
#![no_main]
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use wisp_devices::virtio::vsock::packet::{Header, HOST_CID};
use wisp_devices::virtio::vsock::{Vsock, BUF_ALLOC, MAX_CONNECTIONS};
use wisp_fuzz::virtio;
use wisp_fuzz::Input;

const CID: u64 = 3;

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("wisp-fuzz-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("fuzz temp dir");
    d
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let uds = dir().join("v.sock");
    let Ok(dev) = Vsock::new(CID, &uds) else {
        return;
    };
    let mut guest_side = uds.clone().into_os_string();
    guest_side.push("_1234");
    let _ = std::fs::remove_file(&guest_side);
    let listener = UnixListener::bind(&guest_side).expect("listener");
    listener.set_nonblocking(true).unwrap();
    let mut d = virtio::driver(dev);
    virtio::start(&mut d, &mut input, 3);
    let mut hosts: Vec<UnixStream> = Vec::new();
    let mut accepted: Vec<UnixStream> = Vec::new();
    let ports = [52u32, 1234, 1 << 30, (1 << 30) + 1, 7];
    while !input.is_empty() {
        match input.u8() % 10 {
            // A packet from the guest.
            0..=3 => {
                let (head, descs) = virtio::chain(&mut d, &mut input, 1);
                let h = Header {
                    src_cid: if input.u8() % 8 == 0 {
                        input.u64()
                    } else {
                        CID
                    },
                    dst_cid: if input.u8() % 8 == 0 {
                        input.u64()
                    } else {
                        HOST_CID
                    },
                    src_port: ports[usize::from(input.u8()) % ports.len()],
                    dst_port: ports[usize::from(input.u8()) % ports.len()],
                    len: if input.u8() % 4 == 0 {
                        input.u32()
                    } else {
                        u32::from(input.u16())
                    },
                    type_: if input.u8() % 8 == 0 { input.u16() } else { 1 },
                    op: u16::from(input.u8() % 9),
                    flags: u32::from(input.u8() % 4),
                    buf_alloc: input.u32(),
                    fwd_cnt: input.u32(),
                };
                let _ = d.mem.write_slice(&h.to_bytes(), GuestAddress(descs[0].0));
                if descs.len() > 1 {
                    let n = usize::from(input.u8());
                    let payload = input.bytes(n);
                    let _ = d.mem.write_slice(payload, GuestAddress(descs[1].0));
                }
                d.publish_to(1, head);
                virtio::kick(&mut d, 1);
            }
            // Buffers for the guest's rx queue.
            4 | 5 => {
                let (head, _) = virtio::chain(&mut d, &mut input, 0);
                d.publish_to(0, head);
                virtio::kick(&mut d, 0);
            }
            // A host process connects, with a first line chosen by the input.
            6 => {
                if let Ok(mut s) = UnixStream::connect(&uds) {
                    s.set_nonblocking(true).unwrap();
                    let line = match input.u8() % 4 {
                        0 => {
                            let n = usize::from(input.u8() % 40);
                            input.bytes(n).to_vec()
                        }
                        _ => format!("CONNECT {}\n", ports[usize::from(input.u8()) % ports.len()])
                            .into_bytes(),
                    };
                    let _ = s.write(&line);
                    hosts.push(s);
                }
            }
            // Host bytes on a connection (either side), or an end of one.
            7 | 8 => {
                if let Ok((s, _)) = listener.accept() {
                    s.set_nonblocking(true).unwrap();
                    accepted.push(s);
                }
                let all = hosts.len() + accepted.len();
                if all > 0 {
                    let i = usize::from(input.u8()) % all;
                    let s = if i < hosts.len() {
                        &mut hosts[i]
                    } else {
                        &mut accepted[i - hosts.len()]
                    };
                    match input.u8() % 8 {
                        0 => {
                            let _ = s.shutdown(Shutdown::Write);
                        }
                        1 => {
                            if i < hosts.len() {
                                hosts.remove(i);
                            } else {
                                accepted.remove(i - hosts.len());
                            }
                        }
                        _ => {
                            let n = usize::from(input.u16() % 8192);
                            let _ = s.write(&vec![0x5a; n]);
                        }
                    }
                }
            }
            _ => {
                let q = u32::from(input.u8() % 3);
                virtio::scribble_avail(&mut d, &mut input, q);
                virtio::kick(&mut d, q);
            }
        }
        // The event loop sees the sockets.
        d.handler.process_device_fd(0);
        virtio::service(&mut d, 1);
        let (conns, held) = d
            .device::<Vsock>()
            .with(|v| (v.muxer().connection_count(), v.muxer().held_bytes()));
        assert!(conns <= MAX_CONNECTIONS, "{conns} connections");
        assert!(
            held <= conns * BUF_ALLOC as usize,
            "{held} bytes held for {conns}"
        );
    }
    drop(d);
    let _ = std::fs::remove_file(&guest_side);
});
