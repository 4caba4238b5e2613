//! qcow2 read/write/discard/write-zeroes/flush sequences chosen by the input, on a fresh
//! image made by wisp (cluster size and virtual size chosen by the input), with an I/O fault
//! injected into the file layer (`disk::fault::Faults`: the Nth pwrite, fdatasync or
//! fallocate fails with EIO or ENOSPC, once or from then on), then a reopen.
//!
//! A model of the disk says what every byte must read: a failed write or discard makes its
//! range unknown, nothing else. Checked: no panic; every successful read returns what the
//! model says, also after a failed write next to it (a write that failed must not leave
//! other data in its clusters); after the image is closed and reopened, every byte that was
//! known at the last successful flush and not touched since reads back, and with no fault
//! fired, every known byte does.
#![no_main]
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use wisp_devices::disk::fault::{Faults, FileOp};
use wisp_devices::disk::qcow2::{self, Qcow2};
use wisp_devices::disk::DiskBackend;
use wisp_fuzz::Input;

/// On the file system in $WISP_FUZZ_DIR, else tmpfs (where fdatasync costs nothing).
fn image_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = match std::env::var_os("WISP_FUZZ_DIR") {
            Some(d) => PathBuf::from(d),
            None if std::path::Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            None => std::env::temp_dir(),
        };
        dir.join(format!("wisp-fuzz-qcow2-ops-{}.qcow2", std::process::id()))
    })
}

/// A fresh image as `qcow2::create` makes it (made once per cluster size and disk size; each
/// input starts from a copy).
fn new_image(cluster: u64, size: u64) -> Vec<u8> {
    static MADE: Mutex<BTreeMap<(u64, u64), Vec<u8>>> = Mutex::new(BTreeMap::new());
    let mut made = MADE.lock().unwrap();
    made.entry((cluster, size))
        .or_insert_with(|| {
            let p = image_path().with_extension("new");
            qcow2::create(&p, Some(size), Some(cluster), None).expect("create an image");
            let bytes = std::fs::read(&p).expect("read the new image");
            let _ = std::fs::remove_file(&p);
            bytes
        })
        .clone()
}

/// What the disk must hold, per 512-byte sector (every operation is in whole sectors): its
/// bytes where they are known.
#[derive(Clone)]
struct Model {
    data: Vec<u8>,
    known: Vec<bool>,
}

const SECTOR: usize = 512;

impl Model {
    fn set(&mut self, off: usize, bytes: &[u8]) {
        self.data[off..off + bytes.len()].copy_from_slice(bytes);
        self.known[off / SECTOR..(off + bytes.len()) / SECTOR].fill(true);
    }

    fn forget(&mut self, off: usize, len: usize) {
        self.known[off / SECTOR..(off + len) / SECTOR].fill(false);
    }

    /// The first known sector of `got` (read at `off`) that differs from the model.
    fn mismatch(&self, off: usize, got: &[u8]) -> Option<usize> {
        (0..got.len() / SECTOR)
            .map(|i| off + i * SECTOR)
            .find(|&o| {
                self.known[o / SECTOR] && self.data[o..o + SECTOR] != got[o - off..o - off + SECTOR]
            })
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let path = image_path();
    let cluster = 1u64 << (9 + input.u8() % 8);
    let size = u64::from(1 + input.u8() % 16) * (16 << 10);
    std::fs::write(path, new_image(cluster, size)).expect("write the image");
    let mut img = Qcow2::open(path, false).expect("open the new image");

    // The fault: which call of which kinds fails, how, and whether it stays failed.
    let plan = input.u8();
    let n = u64::from(input.u8() % 64);
    let errno = if plan & 1 != 0 {
        libc::ENOSPC
    } else {
        libc::EIO
    };
    let mut faults = if plan & 2 != 0 {
        Faults::fail_from(n, errno)
    } else {
        Faults::fail_nth(n, errno)
    };
    let kinds = [FileOp::Write, FileOp::Sync, FileOp::Fallocate];
    let only: Vec<FileOp> = (0..3)
        .filter(|i| plan & (4 << i) != 0)
        .map(|i| kinds[i])
        .collect();
    if !only.is_empty() {
        faults = faults.only(&only);
    }
    if plan & 0x20 == 0 {
        img.set_faults(Some(faults.clone()));
    }

    let len = size as usize;
    let sectors = len / SECTOR;
    let mut live = Model {
        data: vec![0; len],
        known: vec![true; sectors],
    };
    let mut durable = live.clone();
    // Sectors touched since the last successful flush.
    let mut dirty = vec![false; sectors];
    let mut buf = Vec::new();
    let mut ops = 0;
    while !input.is_empty() && ops < 64 {
        ops += 1;
        let op = input.u8();
        let s = usize::from(input.u16()) % sectors;
        let n = (1 + usize::from(input.u8() % 128)).min(sectors - s);
        let (o, l) = (s * SECTOR, n * SECTOR);
        let (off, bytes) = (o as u64, l as u64);
        match op % 6 {
            0 | 1 => {
                let seed = input.u8();
                buf.clear();
                buf.extend((0..n).flat_map(|i| [seed.wrapping_add(i as u8) | 1; SECTOR]));
                match img.write_at(off, &buf) {
                    Ok(()) => live.set(o, &buf),
                    Err(_) => live.forget(o, l),
                }
                dirty[s..s + n].fill(true);
            }
            2 => {
                buf.clear();
                buf.resize(l, 0);
                if img.read_at(off, &mut buf).is_ok() {
                    if let Some(at) = live.mismatch(o, &buf) {
                        panic!("sector {} does not read what was written", at / SECTOR);
                    }
                }
            }
            3 => {
                // Discarded data reads as anything (zeros here, but that is not promised).
                let _ = img.discard(off, bytes);
                live.forget(o, l);
                dirty[s..s + n].fill(true);
            }
            4 => {
                match img.write_zeroes(off, bytes, input.bool()) {
                    Ok(()) => live.set(o, &vec![0; l]),
                    Err(_) => live.forget(o, l),
                }
                dirty[s..s + n].fill(true);
            }
            _ => {
                if img.flush().is_ok() {
                    durable = live.clone();
                    dirty.fill(false);
                }
            }
        }
    }
    // Closing flushes too, and may meet the fault.
    drop(img);
    let fired = !faults.failed().is_empty();

    let mut img = match Qcow2::open(path, true) {
        Ok(i) => i,
        Err(e) => panic!("the image does not open after the run: {e}"),
    };
    let mut got = vec![0u8; len];
    img.read_at(0, &mut got).expect("read the reopened image");
    for s in 0..sectors {
        let r = s * SECTOR..(s + 1) * SECTOR;
        let want = if !fired && live.known[s] {
            Some(&live.data[r.clone()])
        } else if durable.known[s] && !dirty[s] {
            Some(&durable.data[r.clone()])
        } else {
            None
        };
        if let Some(w) = want {
            assert!(
                w == &got[r],
                "after reopening, sector {s} does not read what was written"
            );
        }
    }
});
