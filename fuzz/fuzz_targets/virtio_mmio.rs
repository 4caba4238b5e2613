//! virtio-mmio register sequences (devices/src/virtio/mmio.rs) as a hostile guest writes
//! them: reads and writes of any width at any offset of the register window, in any order,
//! with any value, mixed with queue notifications, requests and garbage in guest memory. The
//! device behind the transport is virtio-blk over a real raw file on tmpfs.
//!
//! Checked: no panic; the event loop is never kept busy forever; whatever state the
//! sequence left, a reset and a proper driver start bring the device back, and a read
//! request then returns the file's data with status OK.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use wisp_devices::bus::BusDevice;
use wisp_devices::disk::raw::RawFile;
use wisp_devices::virtio::block::Block;
use wisp_devices::virtio::testing::{regs, Buf, DATA_START};
use wisp_devices::virtio::MMIO_WINDOW_SIZE;
use wisp_fuzz::virtio::{self, MEM_SIZE};
use wisp_fuzz::Input;

const DISK_LEN: usize = 16 << 10;

fn disk_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("wisp-fuzz-mmio-{}.img", std::process::id()))
    })
}

/// A register offset: mostly a register, sometimes config space or anywhere in the window.
fn offset(input: &mut Input, width: u64) -> u64 {
    let off = match input.u8() % 8 {
        0 => u64::from(input.u16()),
        1 => regs::CONFIG + u64::from(input.u8()),
        _ => u64::from(input.u8() % 0x40) * 4,
    };
    off.min(MMIO_WINDOW_SIZE - width)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let path = disk_path();
    let image: Vec<u8> = (0..DISK_LEN).map(|i| (i % 251) as u8).collect();
    std::fs::write(path, &image).expect("write the disk file");
    let raw = RawFile::open(path, false).expect("open the disk file");
    let dev = if input.bool() {
        Block::new_raw(raw, None, false)
    } else {
        Block::new(Box::new(raw), None, false)
    }
    .expect("block device");
    let mut d = virtio::driver(dev);

    while !input.is_empty() {
        let op = input.u8();
        let width = [1u64, 2, 4, 8, 3][usize::from(op >> 4) % 5];
        match op % 8 {
            0..=2 => {
                let off = offset(&mut input, width);
                let v = input.u64().to_le_bytes();
                d.transport.write(off, &v[..width as usize]);
            }
            3 => {
                let off = offset(&mut input, width);
                let mut b = [0u8; 8];
                d.transport.read(off, &mut b[..width as usize]);
            }
            4 => {
                let q = u32::from(input.u8() % 2);
                virtio::service(&mut d, q);
            }
            5 => {
                let a = virtio::addr(&mut input) % MEM_SIZE;
                virtio::poke(&d, &mut input, a);
            }
            6 => {
                let (head, _) = virtio::chain(&mut d, &mut input, 0);
                d.publish_to(0, head);
                virtio::kick(&mut d, 0);
            }
            _ => virtio::scribble_avail(&mut d, &mut input, 0),
        }
    }

    // Whatever state that left: reset, start as Linux does, read sector 3.
    d.write32(regs::STATUS, 0);
    d.queue_size = 16;
    d.start();
    let header = DATA_START;
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&3u64.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(header)).unwrap();
    let (buf, status) = (DATA_START + 0x100, DATA_START + 0x400);
    d.mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
    let before = d.used_idx();
    let head = d.add_chain(&[
        Buf::readable(header, 16),
        Buf::writable(buf, 512),
        Buf::writable(status, 1),
    ]);
    d.publish(head);
    d.kick(0);
    assert_eq!(
        d.used_idx(),
        before.wrapping_add(1),
        "the read was not answered"
    );
    assert_eq!(d.read_bytes(status, 1), [0], "the read failed");
    let now = std::fs::read(path).expect("read the disk file");
    assert!(
        d.read_bytes(buf, 512) == now[3 * 512..4 * 512],
        "the read returned other data"
    );
});
