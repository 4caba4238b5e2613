//! virtio-blk request handling as a hostile guest driver drives it: through the virtio-mmio
//! registers of a real transport (the devices crate's `virtio::testing` harness), over a
//! real raw file on tmpfs, zero-copy or through the bounce buffer, read-write or read-only.
//! The input chooses the features, the queue size, every descriptor (address, length, flags,
//! next), the request headers (type, sector), the data and garbage in the avail ring.
//!
//! Checked: no panic; the event loop is never kept busy forever; the device never answers
//! more chains than were published; the file never changes size, and a read-only device
//! never changes it.
#![no_main]
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use wisp_devices::disk::raw::RawFile;
use wisp_devices::virtio::block::Block;
use wisp_devices::virtio::testing::DATA_START;
use wisp_fuzz::virtio::{self, MEM_SIZE};
use wisp_fuzz::Input;

const DISK_LEN: usize = 64 << 10;

fn disk_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // tmpfs when there is one: every input rewrites the file.
        let dir = ["/dev/shm"]
            .iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        dir.join(format!("wisp-fuzz-blk-{}.img", std::process::id()))
    })
}

fn disk_image() -> Vec<u8> {
    (0..DISK_LEN).map(|i| (i / 512) as u8 ^ 0x5a).collect()
}

/// Request types the device knows, and two it does not.
const TYPES: [u32; 8] = [0, 1, 4, 8, 11, 13, 5, 0xffff_ffff];

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let path = disk_path();
    let image = disk_image();
    std::fs::write(path, &image).expect("write the disk file");
    let mode = input.u8();
    let read_only = mode & 1 != 0;
    let Ok(raw) = RawFile::open(path, read_only) else {
        return;
    };
    let dev = if mode & 2 != 0 {
        Block::new_raw(raw, Some("fuzz".into()), read_only)
    } else {
        Block::new(Box::new(raw), None, read_only)
    }
    .expect("block device");
    let mut d = virtio::driver(dev);
    virtio::start(&mut d, &mut input, 1);

    let start_used = d.used_idx();
    let mut published: u16 = 0;
    let mut avail_scribbled = false;
    while !input.is_empty() {
        match input.u8() % 8 {
            // The common case: a chain whose first descriptor holds a request header.
            0..=4 => {
                let (head, descs) = virtio::chain(&mut d, &mut input, 0);
                let t = match input.u8() % 16 {
                    15 => input.u32(),
                    i => TYPES[usize::from(i) % TYPES.len()],
                };
                let sector = match input.u8() % 4 {
                    0 => input.u64(),
                    _ => u64::from(input.u8() % 140),
                };
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&t.to_le_bytes());
                h[8..16].copy_from_slice(&sector.to_le_bytes());
                let _ = d.mem.write_slice(&h, GuestAddress(descs[0].0));
                avail_scribbled |= descs[0].0 < DATA_START || virtio::touches_rings(&descs);
                // Data for a write, or a discard/write-zeroes segment list.
                if let Some(&(a, _, _)) = descs.get(1) {
                    avail_scribbled |= virtio::poke(&d, &mut input, a);
                }
                d.publish_to(0, head);
                published = published.wrapping_add(1);
                virtio::kick(&mut d, 0);
            }
            5 => {
                let a = virtio::addr(&mut input) % MEM_SIZE;
                avail_scribbled |= virtio::poke(&d, &mut input, a);
            }
            6 => {
                virtio::scribble_avail(&mut d, &mut input, 0);
                avail_scribbled = true;
                virtio::kick(&mut d, 0);
            }
            _ => virtio::service(&mut d, 0),
        }
    }

    if !avail_scribbled {
        let answered = d.used_idx().wrapping_sub(start_used);
        assert!(
            answered <= published,
            "{answered} chains answered, {published} published"
        );
    }
    let file = std::fs::File::open(path).expect("reopen the disk file");
    let len = file.metadata().expect("stat the disk file").len();
    assert_eq!(len, DISK_LEN as u64, "the disk file changed size");
    if read_only {
        let mut now = vec![0u8; DISK_LEN];
        file.read_exact_at(&mut now, 0).expect("read the disk file");
        assert!(now == image, "a read-only device changed the file");
    }
});
