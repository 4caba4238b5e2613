//! virtio-net tx and rx chains as a hostile guest driver builds them, through the virtio-mmio
//! registers of a real transport (the devices crate's `virtio::testing` harness) over a real
//! tap. The fuzz process moves itself into a network namespace of its own (it goes away with
//! the process), opens one tap there, brings it up and hands each input's device a
//! duplicate of its fd (`Tap::from_fd`), so every input starts with a fresh device on the
//! same tap. Frames for the guest come from an AF_PACKET socket on the tap, as a host
//! would send them; frames the guest sends go into the namespace's stack.
//!
//! The input chooses the features (offloads, MRG_RXBUF, EVENT_IDX, ...), the queue size,
//! every tx and rx descriptor, the virtio-net headers (flags, GSO type and sizes, checksum
//! offsets), the frames in both directions and garbage in the avail rings.
//!
//! Checked: no panic; the event loop is never kept busy forever; the device never answers
//! more chains than were published on a queue.
#![no_main]
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use wisp_devices::tap::Tap;
use wisp_devices::virtio::net::{Net, RX_QUEUE, TX_QUEUE};
use wisp_devices::virtio::testing::{Driver, DATA_START};
use wisp_fuzz::virtio::{self, MEM_SIZE};
use wisp_fuzz::Input;

const TAP: &str = "wfuzz0";

struct Host {
    tap: Tap,
    /// AF_PACKET, bound to the tap with protocol 0 (it sends, never receives).
    packet: OwnedFd,
}

fn check(r: libc::c_int, what: &str) {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        // SAFETY: unshare only changes this process's network namespace.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            "unshare(CLONE_NEWNET)",
        );
        let tap = Tap::open(TAP).expect("open the tap");
        for args in [
            &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"][..],
            &["ip", "link", "set", TAP, "up"][..],
        ] {
            let ok = Command::new(args[0])
                .args(&args[1..])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "{args:?} failed");
        }
        // SAFETY: plain socket calls on a fresh fd, results checked.
        let packet = unsafe {
            let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            check(raw, "socket(AF_PACKET)");
            let fd = OwnedFd::from_raw_fd(raw);
            let one: libc::c_int = 1;
            // Straight to the tap: when send returns, the frame is queued for the device.
            check(
                libc::setsockopt(
                    raw,
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    (&one as *const libc::c_int).cast(),
                    4,
                ),
                "PACKET_QDISC_BYPASS",
            );
            let name = std::ffi::CString::new(TAP).expect("no NUL");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            check(
                libc::bind(
                    raw,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ),
                "bind(AF_PACKET)",
            );
            fd
        };
        Host { tap, packet }
    })
}

/// A frame from the host: an Ethernet header and up to 1500 bytes, from the input.
fn inject(h: &Host, d: &Driver, input: &mut Input) {
    let len = 14 + usize::from(input.u16() % 1501);
    let mut frame = input.bytes(len).to_vec();
    frame.resize(len, 0);
    // SAFETY: `frame` is valid for reads of its length.
    unsafe {
        libc::send(
            h.packet.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if !d.handler.device_fds().is_empty() {
        d.handler.process_device_fd(0);
    }
}

/// GSO types the device knows, with and without ECN, and one it does not.
const GSO: [u8; 7] = [0, 1, 3, 4, 0x81, 0x84, 5];

fuzz_target!(|data: &[u8]| {
    let h = host();
    // Frames a previous input left on the tap.
    let mut scratch = vec![0u8; 70_000];
    while h.tap.read(&mut scratch).is_ok() {}

    let mut input = Input::new(data);
    // SAFETY: dup of an fd we own; the result is checked.
    let fd = unsafe { libc::dup(h.tap.as_raw_fd()) };
    check(fd, "dup");
    // SAFETY: `fd` is fresh and owned by nobody else.
    let tap = Tap::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }).expect("tap from fd");
    let mode = input.u8();
    let mtu = (mode & 1 != 0).then(|| 68 + input.u16() % 9000);
    let Ok(mut net) = Net::new(tap, None, mtu) else {
        return;
    };
    if mode & 2 != 0 {
        net = net.without_offloads();
    }
    let mut d = virtio::driver(net);
    virtio::start(&mut d, &mut input, 2);

    let queues = [RX_QUEUE as u32, TX_QUEUE as u32];
    let start_used = queues.map(|q| d.used_idx_of(q));
    let mut published = [0u16; 2];
    let mut scribbled = false;
    while !input.is_empty() {
        match input.u8() % 8 {
            // A frame to send: a virtio-net header in the first descriptor, the frame after it.
            0..=2 => {
                let (head, descs) = virtio::chain(&mut d, &mut input, TX_QUEUE as u32);
                let mut hdr = [0u8; 12];
                hdr[0] = input.u8() & 3;
                hdr[1] = GSO[usize::from(input.u8()) % GSO.len()];
                for field in hdr[2..10].chunks_mut(2) {
                    let v = match input.u8() % 4 {
                        0 => input.u16(),
                        _ => u16::from(input.u8()),
                    };
                    field.copy_from_slice(&v.to_le_bytes());
                }
                let at = descs[0].0;
                let _ = d.mem.write_slice(&hdr, GuestAddress(at));
                let frame_at = descs.get(1).map_or(at.wrapping_add(12), |x| x.0);
                scribbled |= at < DATA_START || virtio::touches_rings(&descs);
                scribbled |= virtio::poke(&d, &mut input, frame_at);
                d.publish_to(TX_QUEUE as u32, head);
                published[TX_QUEUE] = published[TX_QUEUE].wrapping_add(1);
                virtio::kick(&mut d, TX_QUEUE as u32);
            }
            // Receive buffers.
            3 | 4 => {
                let (head, descs) = virtio::chain(&mut d, &mut input, RX_QUEUE as u32);
                scribbled |= virtio::touches_rings(&descs);
                d.publish_to(RX_QUEUE as u32, head);
                published[RX_QUEUE] = published[RX_QUEUE].wrapping_add(1);
                virtio::kick(&mut d, RX_QUEUE as u32);
            }
            5 => inject(h, &d, &mut input),
            6 => {
                let q = queues[usize::from(input.u8() & 1)];
                virtio::scribble_avail(&mut d, &mut input, q);
                scribbled = true;
                virtio::kick(&mut d, q);
            }
            _ => {
                let a = virtio::addr(&mut input) % MEM_SIZE;
                scribbled |= virtio::poke(&d, &mut input, a);
            }
        }
    }

    if !scribbled {
        for (i, q) in queues.into_iter().enumerate() {
            let answered = d.used_idx_of(q).wrapping_sub(start_used[i]);
            assert!(
                answered <= published[i],
                "queue {q}: {answered} chains answered, {} published",
                published[i]
            );
        }
    }
});
