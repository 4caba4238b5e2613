//! virtio-blk driven through the virtio-mmio registers by the host-side driver harness,
//! over real raw files.

use std::io;

use crate::bus::BusDevice;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    features as blk, request_status as st, request_type as rt, Block, BlockCounters, BlockError,
};
use crate::disk::raw::RawFile;
use crate::disk::DiskBackend;
use crate::rate_limiter::{BucketParams, BucketUpdate, RateLimiter};
use crate::test_utils::{Rng, TempDir};
use crate::virtio::testing::{
    guest_memory, regs, Buf, Driver, EpollLoop, CANARY, DESC_TABLE, MEM_SIZE, USED_RING,
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use crate::virtio::{features, status};

const DISK_LEN: usize = 1 << 20;
const STATUS_UNTOUCHED: u8 = 0xee;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A disk file filled with a known pattern.
fn disk(dir: &TempDir) -> PathBuf {
    let p = dir.path().join("disk.img");
    std::fs::write(&p, pattern(DISK_LEN, 7)).unwrap();
    p
}

/// Opens the test image, riding out a lock that a just-dropped device still holds: a child
/// process that another test thread forks at that moment shares the open file description
/// (and so its OFD lock) until it execs.
fn open_raw(path: &PathBuf, read_only: bool) -> RawFile {
    for _ in 0..100 {
        match RawFile::open(path, read_only) {
            Err(crate::disk::raw::RawError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => return other.unwrap(),
        }
    }
    RawFile::open(path, read_only).unwrap()
}

/// The device as the VMM builds it for a raw image: zero-copy data path.
fn block_driver(path: &PathBuf, read_only: bool, serial: Option<&str>) -> Driver {
    let raw = open_raw(path, read_only);
    let dev = Block::new_raw(raw, serial.map(str::to_owned), read_only).unwrap();
    let mut d = Driver::new(Box::new(dev));
    d.start();
    d
}

/// The same over the generic backend path (bounce buffer).
fn bounce_driver(path: &PathBuf) -> Driver {
    let raw = RawFile::open(path, false).unwrap();
    let dev = Block::new(Box::new(raw), None, false).unwrap();
    let mut d = Driver::new(Box::new(dev));
    d.start();
    d
}

/// A request as Linux lays it out: header, data, status in three descriptors.
struct Req {
    header: u64,
    data: Option<Buf>,
    status: u64,
}

fn header(d: &mut Driver, req_type: u32, sector: u64) -> u64 {
    let h = d.alloc(16);
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&req_type.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&b, GuestAddress(h)).unwrap();
    h
}

fn status_buf(d: &mut Driver) -> u64 {
    let s = d.alloc(1);
    d.mem.write_obj(STATUS_UNTOUCHED, GuestAddress(s)).unwrap();
    s
}

fn build(d: &mut Driver, req_type: u32, sector: u64, out: Option<&[u8]>, in_len: u32) -> Req {
    let h = header(d, req_type, sector);
    let data = if let Some(bytes) = out {
        let a = d.alloc(bytes.len() as u64);
        d.mem.write_slice(bytes, GuestAddress(a)).unwrap();
        Some(Buf::readable(a, bytes.len() as u32))
    } else if in_len > 0 {
        Some(Buf::writable(d.alloc(u64::from(in_len)), in_len))
    } else {
        None
    };
    let s = status_buf(d);
    Req {
        header: h,
        data,
        status: s,
    }
}

/// Submits `req` as header/data/status descriptors, kicks, returns (status byte, used len).
fn submit(d: &mut Driver, req: &Req) -> (u8, u32) {
    let mut bufs = vec![Buf::readable(req.header, 16)];
    bufs.extend(req.data);
    bufs.push(Buf::writable(req.status, 1));
    submit_bufs(d, &bufs, req.status)
}

fn submit_bufs(d: &mut Driver, bufs: &[Buf], status_addr: u64) -> (u8, u32) {
    let head = d.add_chain(bufs);
    complete(d, head, status_addr)
}

fn complete(d: &mut Driver, head: u16, status_addr: u64) -> (u8, u32) {
    let (s, l, _) = complete_snapshot(d, head, status_addr);
    (s, l)
}

/// Like `complete`, also returning guest memory as it was just before the kick (after the
/// driver published the chain).
fn complete_snapshot(d: &mut Driver, head: u16, status_addr: u64) -> (u8, u32, Vec<u8>) {
    let before = d.used_idx();
    d.publish(head);
    let snap = d.snapshot();
    d.kick(0);
    assert_eq!(
        d.used_idx(),
        before.wrapping_add(1),
        "request not completed"
    );
    let (id, len) = d.used_elem(before);
    assert_eq!(id, u32::from(head));
    (
        d.mem.read_obj(GuestAddress(status_addr)).unwrap(),
        len,
        snap,
    )
}

fn write(d: &mut Driver, sector: u64, data: &[u8]) -> (u8, u32) {
    let r = build(d, rt::OUT, sector, Some(data), 0);
    submit(d, &r)
}

fn read(d: &mut Driver, sector: u64, len: u32) -> (u8, u32, Vec<u8>) {
    let r = build(d, rt::IN, sector, None, len);
    let (s, l) = submit(d, &r);
    let data = d.read_bytes(r.data.unwrap().addr, len as usize);
    (s, l, data)
}

/// A good request after a bad one: the device keeps serving.
fn assert_still_works(d: &mut Driver, file: &PathBuf) {
    let data = pattern(512, 99);
    assert_eq!(write(d, 3, &data), (st::OK, 1));
    let (s, l, back) = read(d, 3, 512);
    assert_eq!((s, l), (st::OK, 513));
    assert_eq!(back, data);
    assert_eq!(&std::fs::read(file).unwrap()[3 * 512..4 * 512], &data[..]);
}

#[test]
fn offers_modern_block_features_and_capacity() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let raw = RawFile::open(&p, false).unwrap();
    let mut d = Driver::new(Box::new(Block::new(Box::new(raw), None, false).unwrap()));
    assert_eq!(d.read32(regs::MAGIC), 0x7472_6976);
    assert_eq!(d.read32(regs::VERSION), 2);
    assert_eq!(d.read32(regs::DEVICE_ID), 2);
    let f = d.device_features();
    for bit in [
        features::VERSION_1,
        blk::FLUSH,
        blk::SEG_MAX,
        blk::BLK_SIZE,
        blk::DISCARD,
        blk::WRITE_ZEROES,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x} not offered");
    }
    assert_eq!(f & blk::RO, 0);
    let lo = d.read32(regs::CONFIG);
    let hi = d.read32(regs::CONFIG + 4);
    assert_eq!(
        u64::from(lo) | (u64::from(hi) << 32),
        (DISK_LEN / 512) as u64
    );
    assert_eq!(d.read32(regs::CONFIG + 0x14), 512, "blk_size");
    assert_eq!(d.read32(regs::CONFIG + 0x0c), super::SEG_MAX);
    let mut b = [0u8; 1];
    d.transport.read(regs::CONFIG + 0x38, &mut b);
    assert_eq!(b[0], 1, "write_zeroes_may_unmap");
}

#[test]
fn reads_and_writes_land_in_the_file_at_the_right_offsets() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    let data = pattern(4096, 42);
    assert_eq!(write(&mut d, 17, &data), (st::OK, 1));
    let file = std::fs::read(&p).unwrap();
    assert_eq!(&file[17 * 512..17 * 512 + 4096], &data[..]);
    // Neighbours untouched.
    let orig = pattern(DISK_LEN, 7);
    assert_eq!(&file[..17 * 512], &orig[..17 * 512]);
    assert_eq!(&file[17 * 512 + 4096..], &orig[17 * 512 + 4096..]);

    // The last sector of the disk is reachable.
    let last = (DISK_LEN / 512 - 1) as u64;
    assert_eq!(write(&mut d, last, &data[..512]), (st::OK, 1));

    let (s, len, back) = read(&mut d, 17, 4096);
    assert_eq!((s, len), (st::OK, 4097), "used len = data + status");
    assert_eq!(back, data);
    let (s, _, back) = read(&mut d, 0, 1024);
    assert_eq!(s, st::OK);
    assert_eq!(back, &orig[..1024]);
}

fn driver_for(p: &PathBuf, zero_copy: bool) -> Driver {
    if zero_copy {
        block_driver(p, false, None)
    } else {
        bounce_driver(p)
    }
}

#[test]
fn data_split_over_many_descriptors_and_split_header_is_one_stream() {
    split_descriptors_form_one_stream(true);
}

#[test]
fn data_split_over_many_descriptors_is_one_stream_on_the_bounce_path() {
    split_descriptors_form_one_stream(false);
}

fn split_descriptors_form_one_stream(zero_copy: bool) {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = driver_for(&p, zero_copy);
    let data = pattern(3 * 512, 5);
    // Header in two pieces (10 + 6 bytes), data in three odd pieces.
    let h = header(&mut d, rt::OUT, 9);
    let a = d.alloc(data.len() as u64);
    d.mem.write_slice(&data, GuestAddress(a)).unwrap();
    let s = status_buf(&mut d);
    let bufs = [
        Buf::readable(h, 10),
        Buf::readable(h + 10, 6),
        Buf::readable(a, 700),
        Buf::readable(a + 700, 300),
        Buf::readable(a + 1000, 536),
        Buf::writable(s, 1),
    ];
    assert_eq!(submit_bufs(&mut d, &bufs, s), (st::OK, 1));
    assert_eq!(&std::fs::read(&p).unwrap()[9 * 512..12 * 512], &data[..]);

    // Read back into two writable pieces with the status byte sharing the last descriptor.
    let h = header(&mut d, rt::IN, 9);
    let a = d.alloc(3 * 512 + 1);
    let bufs = [
        Buf::readable(h, 16),
        Buf::writable(a, 1000),
        Buf::writable(a + 1000, 537),
    ];
    let (st_byte, len) = submit_bufs(&mut d, &bufs, a + 1536);
    assert_eq!((st_byte, len), (st::OK, 1537));
    assert_eq!(d.read_bytes(a, 1536), data);
}

#[test]
fn large_request_goes_through_the_bounce_buffer_in_pieces() {
    large_request(false);
}

#[test]
fn large_request_goes_straight_between_file_and_guest_memory() {
    large_request(true);
}

fn large_request(zero_copy: bool) {
    let dir = TempDir::new();
    let p = dir.path().join("big.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(4 << 20).unwrap();
    drop(f);
    let mut d = driver_for(&p, zero_copy);
    let data = pattern(1536 * 1024, 3); // larger than the 1 MiB bounce buffer
    assert_eq!(write(&mut d, 2048, &data), (st::OK, 1));
    assert_eq!(
        &std::fs::read(&p).unwrap()[2048 * 512..2048 * 512 + data.len()],
        &data[..]
    );
    let (s, len, back) = read(&mut d, 2048, data.len() as u32);
    assert_eq!((s, len), (st::OK, data.len() as u32 + 1));
    assert!(back == data);
}

/// Wraps the real raw file and records, at each flush, whether the request's status byte
/// had already been written in guest memory.
struct FlushWitness {
    inner: RawFile,
    mem: GuestMemoryMmap,
    status_addr: Arc<Mutex<Option<u64>>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl DiskBackend for FlushWitness {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.log.lock().unwrap().push("write".into());
        self.inner.write_at(offset, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        let status = self
            .status_addr
            .lock()
            .unwrap()
            .map(|a| self.mem.read_obj::<u8>(GuestAddress(a)).unwrap());
        self.inner.flush()?;
        self.log
            .lock()
            .unwrap()
            .push(format!("flush done, status byte then {status:?}"));
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
}

type WatchedStatus = Arc<Mutex<Option<u64>>>;
type FlushLog = Arc<Mutex<Vec<String>>>;

fn witness_driver(p: &PathBuf, accept_flush: bool) -> (Driver, WatchedStatus, FlushLog) {
    let status_addr = Arc::new(Mutex::new(None));
    let log = Arc::new(Mutex::new(Vec::new()));
    let mem = guest_memory();
    let backend = FlushWitness {
        inner: RawFile::open(p, false).unwrap(),
        mem: mem.clone(),
        status_addr: status_addr.clone(),
        log: log.clone(),
    };
    let mut d = Driver::with_memory(
        Box::new(Block::new(Box::new(backend), None, false).unwrap()),
        mem,
    );
    let mut f = d.device_features();
    if !accept_flush {
        f &= !blk::FLUSH;
    }
    d.start_with(f);
    (d, status_addr, log)
}

#[test]
fn flush_reaches_disk_before_status() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let (mut d, status_addr, log) = witness_driver(&p, true);
    assert_eq!(write(&mut d, 1, &pattern(512, 1)), (st::OK, 1));
    let r = build(&mut d, rt::FLUSH, 0, None, 0);
    *status_addr.lock().unwrap() = Some(r.status);
    assert_eq!(submit(&mut d, &r), (st::OK, 1));
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            "write".to_string(),
            format!("flush done, status byte then {:?}", Some(STATUS_UNTOUCHED))
        ]
    );
}

#[test]
fn without_negotiated_flush_every_write_is_flushed_before_its_status() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let (mut d, status_addr, log) = witness_driver(&p, false);
    let r = build(&mut d, rt::OUT, 2, Some(&pattern(512, 2)), 0);
    *status_addr.lock().unwrap() = Some(r.status);
    assert_eq!(submit(&mut d, &r), (st::OK, 1));
    assert_eq!(
        log.lock().unwrap().clone(),
        vec![
            "write".to_string(),
            format!("flush done, status byte then {:?}", Some(STATUS_UNTOUCHED))
        ]
    );
}

#[test]
fn get_id_returns_the_serial() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, Some("wisp-disk-0"));
    let r = build(&mut d, rt::GET_ID, 0, None, 20);
    assert_eq!(submit(&mut d, &r), (st::OK, 21));
    let mut want = b"wisp-disk-0".to_vec();
    want.resize(20, 0);
    assert_eq!(d.read_bytes(r.data.unwrap().addr, 20), want);
}

#[test]
fn serial_longer_than_20_bytes_is_refused() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let raw = RawFile::open(&p, false).unwrap();
    let err = Block::new(Box::new(raw), Some("x".repeat(21)), false)
        .err()
        .unwrap();
    assert_eq!(
        err,
        BlockError::SerialTooLong {
            serial: "x".repeat(21),
            len: 21
        }
    );
}

fn discard_segment(d: &mut Driver, req_type: u32, sector: u64, n: u32, flags: u32) -> (u8, u32) {
    let h = header(d, req_type, 0);
    let seg = d.alloc(16);
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&n.to_le_bytes());
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    d.mem.write_slice(&b, GuestAddress(seg)).unwrap();
    let s = status_buf(d);
    submit_bufs(
        d,
        &[
            Buf::readable(h, 16),
            Buf::readable(seg, 16),
            Buf::writable(s, 1),
        ],
        s,
    )
}

#[test]
fn discard_punches_and_write_zeroes_zeroes() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    let blocks_before = std::fs::metadata(&p).unwrap().blocks();
    // 256 KiB discard at sector 256 (128 KiB).
    assert_eq!(
        discard_segment(&mut d, rt::DISCARD, 256, 512, 0),
        (st::OK, 1)
    );
    let file = std::fs::read(&p).unwrap();
    let orig = pattern(DISK_LEN, 7);
    assert_eq!(file.len(), DISK_LEN, "discard keeps the size");
    if std::fs::metadata(&p).unwrap().blocks() < blocks_before {
        assert!(file[128 << 10..384 << 10].iter().all(|&b| b == 0));
    }
    assert_eq!(&file[..128 << 10], &orig[..128 << 10]);
    assert_eq!(&file[384 << 10..], &orig[384 << 10..]);

    // WRITE_ZEROES must zero, with and without unmap.
    assert_eq!(
        discard_segment(&mut d, rt::WRITE_ZEROES, 1000, 8, 0),
        (st::OK, 1)
    );
    assert_eq!(
        discard_segment(&mut d, rt::WRITE_ZEROES, 1100, 3, 1),
        (st::OK, 1)
    );
    let file = std::fs::read(&p).unwrap();
    assert!(file[1000 * 512..1008 * 512].iter().all(|&b| b == 0));
    assert!(file[1100 * 512..1103 * 512].iter().all(|&b| b == 0));
    assert_eq!(file[1000 * 512 - 1], orig[1000 * 512 - 1]);
    assert_eq!(file[1008 * 512], orig[1008 * 512]);
    assert_eq!(file[1103 * 512], orig[1103 * 512]);

    // Spec-mandated refusals: unmap on discard and unknown flags are UNSUPP; ranges
    // beyond the disk are IOERR.
    assert_eq!(discard_segment(&mut d, rt::DISCARD, 0, 8, 1).0, st::UNSUPP);
    assert_eq!(
        discard_segment(&mut d, rt::WRITE_ZEROES, 0, 8, 2).0,
        st::UNSUPP
    );
    assert_eq!(
        discard_segment(&mut d, rt::DISCARD, 2047, 2, 0).0,
        st::IOERR
    );
    assert_eq!(
        discard_segment(&mut d, rt::WRITE_ZEROES, u64::MAX / 2, 1, 0).0,
        st::IOERR
    );
    assert_eq!(std::fs::read(&p).unwrap()[..512], orig[..512]);
    assert_still_works(&mut d, &p);
}

#[test]
fn discard_is_unsupported_when_not_negotiated() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let raw = RawFile::open(&p, false).unwrap();
    let mut d = Driver::new(Box::new(Block::new(Box::new(raw), None, false).unwrap()));
    let f = d.device_features() & !(blk::DISCARD | blk::WRITE_ZEROES);
    d.start_with(f);
    assert_eq!(discard_segment(&mut d, rt::DISCARD, 0, 8, 0).0, st::UNSUPP);
    assert_eq!(
        discard_segment(&mut d, rt::WRITE_ZEROES, 0, 8, 0).0,
        st::UNSUPP
    );
    assert_eq!(std::fs::read(&p).unwrap(), pattern(DISK_LEN, 7));
}

#[test]
fn read_only_device_refuses_writes_and_the_file_is_unchanged() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let before = std::fs::read(&p).unwrap();
    let mut d = block_driver(&p, true, None);
    let f = d.device_features();
    assert_ne!(f & blk::RO, 0, "F_RO offered");
    assert_eq!(f & (blk::DISCARD | blk::WRITE_ZEROES), 0);
    assert_eq!(write(&mut d, 0, &pattern(512, 1)), (st::IOERR, 1));
    assert_eq!(
        discard_segment(&mut d, rt::WRITE_ZEROES, 0, 8, 0).0,
        st::UNSUPP
    );
    let (s, _, back) = read(&mut d, 0, 512);
    assert_eq!(s, st::OK);
    assert_eq!(back, &before[..512]);
    let r = build(&mut d, rt::FLUSH, 0, None, 0);
    assert_eq!(submit(&mut d, &r).0, st::OK);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn read_write_device_over_a_read_only_backend_is_read_only() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let raw = RawFile::open(&p, true).unwrap();
    let b = Block::new(Box::new(raw), None, false).unwrap();
    assert!(b.read_only());
    let mut d = Driver::new(Box::new(b));
    assert_ne!(d.device_features() & blk::RO, 0);
}

#[test]
fn rejects_descriptor_beyond_guest_memory() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    let h = header(&mut d, rt::IN, 0);
    let s = status_buf(&mut d);
    let bufs = [
        Buf::readable(h, 16),
        Buf::writable(MEM_SIZE as u64 - 256, 512),
        Buf::writable(s, 1),
    ];
    let head = d.add_chain(&bufs);
    let (status, len, snap) = complete_snapshot(&mut d, head, s);
    assert_eq!((status, len), (st::IOERR, 1));
    // Nothing but the status byte and the used ring changed: the part of the buffer that
    // was inside memory was not written.
    assert_only_changed(&snap, &d.snapshot(), &[(s, 1), used_ring_range(&d)]);
    // OUT with data far outside memory (address overflow region too).
    let h = header(&mut d, rt::OUT, 0);
    let s = status_buf(&mut d);
    let bufs = [
        Buf::readable(h, 16),
        Buf::readable(u64::MAX - 100, 512),
        Buf::writable(s, 1),
    ];
    assert_eq!(submit_bufs(&mut d, &bufs, s), (st::IOERR, 1));
    assert_eq!(std::fs::read(&p).unwrap(), pattern(DISK_LEN, 7));
    assert_still_works(&mut d, &p);
}

#[test]
fn rejects_sectors_beyond_the_disk_or_overflowing() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    let sectors = (DISK_LEN / 512) as u64;
    assert_eq!(write(&mut d, sectors, &pattern(512, 1)).0, st::IOERR);
    assert_eq!(write(&mut d, sectors - 1, &pattern(1024, 1)).0, st::IOERR);
    assert_eq!(write(&mut d, u64::MAX, &pattern(512, 1)).0, st::IOERR);
    assert_eq!(write(&mut d, u64::MAX / 512, &pattern(512, 1)).0, st::IOERR);
    let (s, len, _) = read(&mut d, sectors, 512);
    assert_eq!((s, len), (st::IOERR, 1));
    assert_eq!(std::fs::read(&p).unwrap(), pattern(DISK_LEN, 7));
    assert_still_works(&mut d, &p);
}

#[test]
fn rejects_lengths_not_a_multiple_of_512() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    assert_eq!(write(&mut d, 0, &pattern(513, 1)).0, st::IOERR);
    assert_eq!(read(&mut d, 0, 100).0, st::IOERR);
    assert_eq!(std::fs::read(&p).unwrap(), pattern(DISK_LEN, 7));
    assert_still_works(&mut d, &p);
}

#[test]
fn rejects_data_in_the_wrong_direction() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    // IN with a device-readable data buffer.
    let r = build(&mut d, rt::IN, 0, Some(&pattern(512, 1)), 0);
    assert_eq!(submit(&mut d, &r).0, st::IOERR);
    // OUT with a device-writable data buffer: the buffer must stay untouched.
    let mut r = build(&mut d, rt::OUT, 0, None, 512);
    let before = d.read_bytes(r.data.unwrap().addr, 512);
    assert_eq!(submit(&mut d, &r).0, st::IOERR);
    assert_eq!(d.read_bytes(r.data.unwrap().addr, 512), before);
    // FLUSH with data.
    r = build(&mut d, rt::FLUSH, 0, Some(&pattern(512, 1)), 0);
    assert_eq!(submit(&mut d, &r).0, st::IOERR);
    // A device-readable descriptor after a device-writable one.
    let h = header(&mut d, rt::OUT, 0);
    let w = d.alloc(512);
    let rd = d.alloc(512);
    let s = status_buf(&mut d);
    let bufs = [
        Buf::readable(h, 16),
        Buf::writable(w, 512),
        Buf::readable(rd, 512),
        Buf::writable(s, 1),
    ];
    assert_eq!(submit_bufs(&mut d, &bufs, s).0, st::IOERR);
    assert_eq!(std::fs::read(&p).unwrap(), pattern(DISK_LEN, 7));
    assert_still_works(&mut d, &p);
}

#[test]
fn rejects_a_short_header() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    let h = header(&mut d, rt::IN, 0);
    let s = status_buf(&mut d);
    let bufs = [Buf::readable(h, 8), Buf::writable(s, 1)];
    assert_eq!(submit_bufs(&mut d, &bufs, s), (st::IOERR, 1));
    // Only a status byte.
    let s = status_buf(&mut d);
    assert_eq!(
        submit_bufs(&mut d, &[Buf::writable(s, 1)], s),
        (st::IOERR, 1)
    );
    assert_still_works(&mut d, &p);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    for t in [2, 3, 7, 14, 0xffff_ffff] {
        let r = build(&mut d, t, 0, None, 0);
        assert_eq!(submit(&mut d, &r), (st::UNSUPP, 1), "type {t}");
    }
    assert_still_works(&mut d, &p);
}

#[test]
fn chain_without_usable_status_byte_is_returned_with_len_0_and_no_write() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    // Last descriptor device-readable.
    let h = header(&mut d, rt::IN, 0);
    let buf = d.alloc(512);
    let s = status_buf(&mut d);
    let bufs = [
        Buf::readable(h, 16),
        Buf::writable(buf, 512),
        Buf::readable(s, 1),
    ];
    let head = d.add_chain(&bufs);
    let (status, len, snap) = complete_snapshot(&mut d, head, s);
    assert_eq!((status, len), (STATUS_UNTOUCHED, 0));
    assert_only_changed(&snap, &d.snapshot(), &[used_ring_range(&d)]);
    // Zero-length status descriptor.
    let bufs = [
        Buf::readable(h, 16),
        Buf::writable(buf, 512),
        Buf::writable(s, 0),
    ];
    let head = d.add_chain(&bufs);
    let (status, len, snap) = complete_snapshot(&mut d, head, s);
    assert_eq!((status, len), (STATUS_UNTOUCHED, 0));
    assert_only_changed(&snap, &d.snapshot(), &[used_ring_range(&d)]);
    // Status byte outside guest memory.
    let bufs = [Buf::readable(h, 16), Buf::writable(MEM_SIZE as u64, 1)];
    let head = d.add_chain(&bufs);
    d.publish(head);
    d.kick(0);
    assert_eq!(
        d.used_elem(d.used_idx().wrapping_sub(1)),
        (u32::from(head), 0)
    );
    assert_still_works(&mut d, &p);
}

#[test]
fn looping_chain_is_returned_unanswered_and_the_device_keeps_working() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    let h = header(&mut d, rt::IN, 0);
    let buf = d.alloc(512);
    let head = d.reserve_descs(2);
    // head -> head+1 -> head: a loop.
    d.write_desc(DESC_TABLE, head, h, 16, VIRTQ_DESC_F_NEXT, head + 1);
    d.write_desc(
        DESC_TABLE,
        head + 1,
        buf,
        512,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        head,
    );
    let (_, len, snap) = complete_snapshot(&mut d, head, buf);
    assert_eq!(len, 0);
    assert_only_changed(&snap, &d.snapshot(), &[used_ring_range(&d)]);
    assert_still_works(&mut d, &p);
}

#[test]
fn next_index_outside_the_queue_is_returned_unanswered() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    let h = header(&mut d, rt::IN, 0);
    let head = d.reserve_descs(1);
    d.write_desc(DESC_TABLE, head, h, 16, VIRTQ_DESC_F_NEXT, 500);
    let s = d.alloc(1);
    let (_, len) = complete(&mut d, head, s);
    assert_eq!(len, 0);
    assert_still_works(&mut d, &p);
}

#[test]
fn head_index_outside_the_queue_needs_a_reset() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    d.publish(500);
    let snap_published = d.snapshot();
    d.kick(0);
    // Nothing can be returned for it: the used ring stays as it was, and the device says
    // it needs a reset (virtio 1.2 §2.1.2) instead of taking the guest's next entries.
    assert_eq!(d.used_idx(), 0);
    assert_only_changed(&snap_published, &d.snapshot(), &[used_ring_range(&d)]);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    let req = build(&mut d, rt::IN, 0, None, 512);
    let bufs = [
        Buf::readable(req.header, 16),
        req.data.unwrap(),
        Buf::writable(req.status, 1),
    ];
    let head = d.add_chain(&bufs);
    d.publish(head);
    d.kick(0);
    assert_eq!(d.used_idx(), 0, "a failed device took another request");
    // A reset brings it back.
    d.write32(regs::STATUS, 0);
    d.start();
    assert_still_works(&mut d, &p);
}

#[test]
fn chain_longer_than_seg_max_is_an_io_error() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    // An indirect table: header, SEG_MAX + 1 data descriptors of 512 bytes, status.
    let n = super::SEG_MAX as u16 + 3;
    let table = d.alloc(16 * u64::from(n));
    let h = header(&mut d, rt::IN, 0);
    let data = d.alloc(512 * u64::from(n));
    let s = status_buf(&mut d);
    d.write_desc(table, 0, h, 16, VIRTQ_DESC_F_NEXT, 1);
    for i in 1..n - 1 {
        d.write_desc(
            table,
            i,
            data + 512 * u64::from(i),
            512,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            i + 1,
        );
    }
    d.write_desc(table, n - 1, s, 1, VIRTQ_DESC_F_WRITE, 0);
    let head = d.reserve_descs(1);
    d.write_desc(
        DESC_TABLE,
        head,
        table,
        16 * u32::from(n),
        VIRTQ_DESC_F_INDIRECT,
        0,
    );
    let (status, len, snap) = complete_snapshot(&mut d, head, s);
    assert_eq!((status, len), (st::IOERR, 1));
    assert_only_changed(&snap, &d.snapshot(), &[(s, 1), used_ring_range(&d)]);

    // The same through an indirect table of allowed length works.
    let n = 4u16;
    let table = d.alloc(16 * u64::from(n));
    let h = header(&mut d, rt::IN, 0);
    let data = d.alloc(1024);
    let s = status_buf(&mut d);
    d.write_desc(table, 0, h, 16, VIRTQ_DESC_F_NEXT, 1);
    d.write_desc(
        table,
        1,
        data,
        512,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        2,
    );
    d.write_desc(
        table,
        2,
        data + 512,
        512,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        3,
    );
    d.write_desc(table, 3, s, 1, VIRTQ_DESC_F_WRITE, 0);
    let head = d.reserve_descs(1);
    d.write_desc(
        DESC_TABLE,
        head,
        table,
        16 * u32::from(n),
        VIRTQ_DESC_F_INDIRECT,
        0,
    );
    assert_eq!(complete(&mut d, head, s), (st::OK, 1025));
    assert_eq!(d.read_bytes(data, 1024), &pattern(DISK_LEN, 7)[..1024]);
}

fn used_ring_range(d: &Driver) -> (u64, usize) {
    (USED_RING, 6 + 8 * usize::from(d.queue_size))
}

/// Every byte of guest memory outside `allowed` (address, len) is as in `before`.
fn assert_only_changed(before: &[u8], after: &[u8], allowed: &[(u64, usize)]) {
    assert_eq!(before.len(), after.len());
    // Compare in blocks (memcmp) and look into the blocks that differ.
    for (block, (x, y)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
        if x != y {
            only_changed_in(x, y, block as u64 * 4096, allowed);
        }
    }
}

fn only_changed_in(before: &[u8], after: &[u8], base: u64, allowed: &[(u64, usize)]) {
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        let i = base as usize + i;
        if a != b {
            let i = i as u64;
            assert!(
                allowed
                    .iter()
                    .any(|&(start, len)| i >= start && i < start + len as u64),
                "guest memory at {i:#x} changed from {a:#x} to {b:#x} outside the request's buffers"
            );
        }
    }
}

#[test]
fn nothing_outside_the_request_buffers_is_touched() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, Some("serial"));
    // Guest memory is canary-filled by the harness; the device may only write the IN
    // buffers, the status bytes and the used ring.
    let r_in = build(&mut d, rt::IN, 4, None, 2048);
    let r_out = build(&mut d, rt::OUT, 40, Some(&pattern(1024, 3)), 0);
    let r_id = build(&mut d, rt::GET_ID, 0, None, 8);
    let r_flush = build(&mut d, rt::FLUSH, 0, None, 0);
    let snap = d.snapshot();
    assert!(snap[MEM_SIZE - 4096..].iter().all(|&b| b == CANARY));
    let mut heads = Vec::new();
    for r in [&r_in, &r_out, &r_id, &r_flush] {
        let mut bufs = vec![Buf::readable(r.header, 16)];
        bufs.extend(r.data);
        bufs.push(Buf::writable(r.status, 1));
        let head = d.add_chain(&bufs);
        d.publish(head);
        heads.push(head);
    }
    let snap_avail = d.snapshot();
    d.kick(0);
    assert_eq!(d.used_idx(), 4);
    let used: Vec<(u32, u32)> = (0..4).map(|i| d.used_elem(i)).collect();
    let want: Vec<(u32, u32)> = heads
        .iter()
        .map(|&h| u32::from(h))
        .zip([2049, 1, 9, 1])
        .collect();
    assert_eq!(used, want);
    assert_only_changed(
        &snap_avail,
        &d.snapshot(),
        &[
            (r_in.data.unwrap().addr, 2048),
            (r_id.data.unwrap().addr, 8),
            (r_in.status, 1),
            (r_out.status, 1),
            (r_id.status, 1),
            (r_flush.status, 1),
            used_ring_range(&d),
        ],
    );
    assert_eq!(d.read_bytes(r_id.data.unwrap().addr, 8), b"serial\0\0");
}

#[test]
fn completion_raises_the_used_ring_interrupt_and_ack_clears_it() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    d.take_interrupts();
    assert_eq!(write(&mut d, 0, &pattern(512, 1)).0, st::OK);
    assert_eq!(d.take_interrupts(), 1);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), 1);
    d.write32(regs::INTERRUPT_ACK, 1);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), 0);
}

#[test]
fn used_event_suppresses_interrupts_with_event_idx() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    assert_ne!(d.device_features() & features::RING_EVENT_IDX, 0);
    d.take_interrupts();
    // used_event (after the avail ring's 16 entries) = 5: interrupt only when used idx
    // passes 5.
    let used_event_addr = crate::virtio::testing::AVAIL_RING + 4 + 2 * 16;
    d.mem
        .write_obj(5u16, GuestAddress(used_event_addr))
        .unwrap();
    for i in 0..5 {
        assert_eq!(write(&mut d, i, &pattern(512, 1)).0, st::OK);
        assert_eq!(d.take_interrupts(), 0, "request {i} interrupted");
    }
    assert_eq!(write(&mut d, 5, &pattern(512, 1)).0, st::OK);
    assert_eq!(d.take_interrupts(), 1);
}

#[test]
fn ioeventfd_notification_is_processed_by_the_event_handler() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    let r = build(&mut d, rt::OUT, 6, Some(&pattern(512, 4)), 0);
    let mut bufs = vec![Buf::readable(r.header, 16)];
    bufs.extend(r.data);
    bufs.push(Buf::writable(r.status, 1));
    let head = d.add_chain(&bufs);
    d.publish(head);
    // What KVM does on the guest's QueueNotify write when the ioeventfd is registered.
    d.transport.queue_evts()[0].write(1).unwrap();
    d.handler.process_queue(0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(r.status)).unwrap(),
        st::OK
    );
    assert_eq!(
        &std::fs::read(&p).unwrap()[6 * 512..7 * 512],
        &pattern(512, 4)[..]
    );
    // The eventfd was consumed.
    assert!(d.transport.queue_evts()[0].read().is_err());
}

#[test]
fn reset_stops_the_device_and_it_can_be_started_again() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    assert_eq!(write(&mut d, 0, &pattern(512, 1)).0, st::OK);
    d.write32(regs::STATUS, 0);
    assert_eq!(d.status(), 0);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), 0);
    d.write32(regs::QUEUE_SEL, 0);
    assert_eq!(d.read32(regs::QUEUE_READY), 0);
    assert!(d.handler.device_fds().is_empty());
    // A request published after the reset is not processed.
    let r = build(&mut d, rt::OUT, 1, Some(&pattern(512, 2)), 0);
    let mut bufs = vec![Buf::readable(r.header, 16)];
    bufs.extend(r.data);
    bufs.push(Buf::writable(r.status, 1));
    let head = d.add_chain(&bufs);
    d.publish(head);
    d.handler.queue_evts()[0].write(1).unwrap();
    d.handler.process_queue(0);
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(r.status)).unwrap(),
        STATUS_UNTOUCHED
    );
    // Start again from scratch, as a driver does after reset.
    d.start();
    assert_still_works(&mut d, &p);
}

#[test]
fn bad_queue_setup_sets_device_needs_reset() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let raw = RawFile::open(&p, false).unwrap();
    let mut d = Driver::new(Box::new(Block::new(Box::new(raw), None, false).unwrap()));
    let f = d.device_features();
    d.negotiate(f);
    // Size not a power of two.
    d.write32(regs::QUEUE_SEL, 0);
    d.write32(regs::QUEUE_NUM, 3);
    d.write32(regs::QUEUE_DESC_LOW, DESC_TABLE as u32);
    d.write32(regs::QUEUE_DRIVER_LOW, 0x2000);
    d.write32(regs::QUEUE_DEVICE_LOW, 0x3000);
    d.write32(regs::QUEUE_READY, 1);
    assert_eq!(d.read32(regs::QUEUE_READY), 0);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    d.take_interrupts();
    // DRIVER_OK now: the device stays inactive and tells the driver.
    d.driver_ok();
    assert_ne!(d.read32(regs::INTERRUPT_STATUS) & 2, 0);
    assert_eq!(d.take_interrupts(), 1);
    // Reset clears it; a valid setup then works.
    d.write32(regs::STATUS, 0);
    assert_eq!(d.status(), 0);
    d.start();
    assert_still_works(&mut d, &p);
}

#[test]
fn queue_outside_guest_memory_or_misaligned_is_refused() {
    let dir = TempDir::new();
    let p = disk(&dir);
    for (desc, avail, used, size) in [
        (MEM_SIZE as u64 - 64, 0x2000, 0x3000, 16u32), // table runs past the end
        (0x1008, 0x2000, 0x3000, 16),                  // table misaligned
        (0x1000, 0x2001, 0x3000, 16),                  // avail misaligned
        (0x1000, 0x2000, 0x3002, 16),                  // used misaligned
        (0x1000, 0x2000, u64::MAX - 7, 16),            // used wraps around
        (0x1000, 0x2000, 0x3000, 512),                 // larger than QueueNumMax
        (0x1000, 0x2000, 0x3000, 0),                   // zero
    ] {
        let raw = RawFile::open(&p, false).unwrap();
        let mut d = Driver::new(Box::new(Block::new(Box::new(raw), None, false).unwrap()));
        let f = d.device_features();
        d.negotiate(f);
        d.write32(regs::QUEUE_SEL, 0);
        assert_eq!(d.read32(regs::QUEUE_NUM_MAX), 256);
        d.write32(regs::QUEUE_NUM, size);
        d.write32(regs::QUEUE_DESC_LOW, desc as u32);
        d.write32(regs::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        d.write32(regs::QUEUE_DRIVER_LOW, avail as u32);
        d.write32(regs::QUEUE_DEVICE_LOW, used as u32);
        d.write32(regs::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        d.write32(regs::QUEUE_READY, 1);
        assert_eq!(
            d.read32(regs::QUEUE_READY),
            0,
            "{desc:#x} {avail:#x} {used:#x} {size}"
        );
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        drop(d);
    }
}

#[test]
fn features_without_version_1_fail_features_ok() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let raw = RawFile::open(&p, false).unwrap();
    let mut d = Driver::new(Box::new(Block::new(Box::new(raw), None, false).unwrap()));
    let f = d.device_features() & !features::VERSION_1;
    let s = d.negotiate(f);
    assert_eq!(s & status::FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK is refused too.
    d.write32(regs::STATUS, s | status::FEATURES_OK | status::DRIVER_OK);
    assert_eq!(d.status() & status::DRIVER_OK, 0);
}

#[test]
fn features_that_were_not_offered_fail_features_ok() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let raw = RawFile::open(&p, true).unwrap();
    let mut d = Driver::new(Box::new(Block::new(Box::new(raw), None, true).unwrap()));
    let f = d.device_features() | blk::DISCARD; // not offered on a read-only disk
    assert_eq!(d.negotiate(f) & status::FEATURES_OK, 0);
    d.write32(regs::STATUS, 0);
    // A bit in a feature word beyond the 64 defined ones.
    d.write32(regs::STATUS, status::ACKNOWLEDGE);
    d.write32(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.write32(regs::DRIVER_FEATURES_SEL, 2);
    d.write32(regs::DRIVER_FEATURES, 1);
    let f = d.device_features();
    d.write32(regs::DRIVER_FEATURES_SEL, 0);
    d.write32(regs::DRIVER_FEATURES, f as u32);
    d.write32(regs::DRIVER_FEATURES_SEL, 1);
    d.write32(regs::DRIVER_FEATURES, (f >> 32) as u32);
    d.write32(
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(d.status() & status::FEATURES_OK, 0);
}

#[test]
fn notify_before_driver_ok_is_ignored() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let raw = RawFile::open(&p, false).unwrap();
    let mut d = Driver::new(Box::new(Block::new(Box::new(raw), None, false).unwrap()));
    let f = d.device_features();
    d.negotiate(f);
    d.setup_queue(0);
    let r = build(&mut d, rt::OUT, 0, Some(&pattern(512, 1)), 0);
    let mut bufs = vec![Buf::readable(r.header, 16)];
    bufs.extend(r.data);
    bufs.push(Buf::writable(r.status, 1));
    let head = d.add_chain(&bufs);
    d.publish(head);
    d.write32(regs::QUEUE_NOTIFY, 0);
    assert!(
        d.handler.queue_evts()[0].read().is_err(),
        "register path must not signal"
    );
    d.handler.queue_evts()[0].write(1).unwrap(); // as an ioeventfd would
    d.handler.process_queue(0);
    assert_eq!(d.used_idx(), 0);
    assert_eq!(std::fs::read(&p).unwrap(), pattern(DISK_LEN, 7));
}

#[test]
fn misbehaving_register_accesses_do_not_panic_and_change_nothing() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);

    // Odd sizes and alignments on registers and config.
    for off in [
        0u64, 1, 2, 3, 0x4e, 0x50, 0x70, 0x71, 0xfe, 0xff, 0x100, 0x101, 0x13f, 0xfff,
    ] {
        for len in [1usize, 2, 3, 4, 8] {
            let mut buf = vec![0xffu8; len];
            d.transport.read(off, &mut buf);
            d.transport.write(off, &buf);
        }
    }
    // Writes to read-only registers.
    for off in [0x00u64, 0x04, 0x08, 0x0c, 0x10, 0x34, 0x60, 0xfc, 0x100] {
        d.write32(off, 0xdead_beef);
    }
    // Queue config after DRIVER_OK, QueueSel beyond the queues, bogus notify values.
    d.write32(regs::QUEUE_NUM, 4);
    d.write32(regs::QUEUE_DESC_LOW, 0x8000);
    d.write32(regs::QUEUE_SEL, 7);
    d.write32(regs::QUEUE_READY, 1);
    assert_eq!(d.read32(regs::QUEUE_NUM_MAX), 0);
    d.write32(regs::QUEUE_SEL, 0);
    d.write32(regs::QUEUE_NOTIFY, 9);
    d.write32(regs::QUEUE_NOTIFY, u32::MAX);
    d.handler.process_queue(5);
    // Status: clearing bits without a reset, invalid bits.
    d.write32(regs::STATUS, status::ACKNOWLEDGE);
    d.write32(regs::STATUS, 0x7f);
    // Features after FEATURES_OK.
    d.write32(regs::DRIVER_FEATURES, 0);
    assert_eq!(
        d.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    assert_eq!(d.read32(regs::MAGIC), 0x7472_6976);
    assert_eq!(d.read32(regs::CONFIG_GENERATION), 0);
    assert_still_works(&mut d, &p);
}

#[test]
fn broken_avail_index_sets_device_needs_reset() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, None);
    d.take_interrupts();
    // avail idx jumps by more than the queue size.
    d.mem
        .write_obj(100u16, GuestAddress(crate::virtio::testing::AVAIL_RING + 2))
        .unwrap();
    d.handler.queue_evts()[0].write(1).unwrap();
    d.handler.process_queue(0);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(d.read32(regs::INTERRUPT_STATUS) & 2, 0);
    assert_eq!(d.take_interrupts(), 1);
}

#[test]
fn random_hostile_chains_never_escape_their_buffers_or_stop_the_device() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut d = block_driver(&p, false, Some("fuzz"));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // A scratch area the random descriptors point into, plus wild addresses.
    let scratch = d.alloc(64 << 10);
    let types = [
        rt::IN,
        rt::OUT,
        rt::FLUSH,
        rt::GET_ID,
        rt::DISCARD,
        rt::WRITE_ZEROES,
        5,
    ];
    let mut answered = 0u32;
    for round in 0..1000u32 {
        let n = 1 + rng.below(6) as u16;
        let head = d.reserve_descs(n);
        for i in 0..n {
            let idx = (head + i) % d.queue_size;
            let addr = match rng.below(8) {
                0 => rng.next(),
                1 => MEM_SIZE as u64 - rng.below(64),
                _ => scratch + rng.below(60 << 10),
            };
            let len = match rng.below(4) {
                0 => rng.below(4) as u32,
                1 => 16,
                2 => 512 * (1 + rng.below(4) as u32),
                _ => rng.next() as u32,
            };
            let mut flags = if rng.below(2) == 0 {
                VIRTQ_DESC_F_WRITE
            } else {
                0
            };
            if i + 1 < n || rng.below(10) == 0 {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            if rng.below(40) == 0 {
                flags |= VIRTQ_DESC_F_INDIRECT;
            }
            let next = if rng.below(10) == 0 {
                rng.below(40) as u16
            } else {
                (idx + 1) % d.queue_size
            };
            d.write_desc(DESC_TABLE, idx, addr, len, flags, next);
            // A plausible header at the first descriptor's address now and then.
            if i == 0 && addr >= scratch && addr + 16 < scratch + (64 << 10) && rng.below(2) == 0 {
                let t = types[rng.below(types.len() as u64) as usize];
                let sector = rng.below(4096);
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&t.to_le_bytes());
                h[8..16].copy_from_slice(&sector.to_le_bytes());
                d.mem.write_slice(&h, GuestAddress(addr)).unwrap();
            }
        }
        let before = d.used_idx();
        d.publish(head);
        let snap = d.snapshot();
        d.kick(0);
        assert_eq!(d.used_idx(), before.wrapping_add(1), "round {round}");
        let (_, len) = d.used_elem(before);
        // The device wrote only into device-writable buffers (and the used ring). With
        // indirect tables and loops (which may reach stale descriptors of earlier rounds)
        // the buffers it saw may differ from this round's, so allow every place a
        // descriptor here can point into, and nothing else.
        assert_only_changed(
            &snap,
            &d.snapshot(),
            &[
                (scratch, 64 << 10),
                (MEM_SIZE as u64 - 64, 64),
                used_ring_range(&d),
            ],
        );
        answered += u32::from(len > 0);
        match walk_chain(&d, head) {
            Walk::Complete { writable } => assert!(
                u64::from(len) <= writable,
                "round {round}: used len {len} > writable bytes {writable}"
            ),
            Walk::Broken => assert_eq!(len, 0, "round {round}: broken chain answered"),
            Walk::Indirect => {}
        }
    }
    // The mix is not all garbage: a good share of the chains had a status byte.
    assert!(
        answered > 100,
        "only {answered} of 1000 chains were answered"
    );
    assert_still_works(&mut d, &p);
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

enum Walk {
    Complete { writable: u64 },
    Broken,
    Indirect,
}

/// Walks a direct chain in the descriptor table as the device must see it.
fn walk_chain(d: &Driver, head: u16) -> Walk {
    let mut idx = head;
    let mut writable = 0u64;
    for _ in 0..d.queue_size {
        if idx >= d.queue_size {
            return Walk::Broken;
        }
        let base = DESC_TABLE + 16 * u64::from(idx);
        let len: u32 = d.mem.read_obj(GuestAddress(base + 8)).unwrap();
        let flags: u16 = d.mem.read_obj(GuestAddress(base + 12)).unwrap();
        let next: u16 = d.mem.read_obj(GuestAddress(base + 14)).unwrap();
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Walk::Indirect;
        }
        if flags & VIRTQ_DESC_F_WRITE != 0 {
            writable += u64::from(len);
        }
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Walk::Complete { writable };
        }
        idx = next;
    }
    Walk::Broken
}

#[test]
fn random_register_accesses_never_panic() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let mut rng = Rng(12345);
    for _ in 0..20 {
        let mut d = block_driver(&p, false, None);
        for _ in 0..2000 {
            let offset = match rng.below(3) {
                0 => rng.below(0x1000),
                1 => rng.below(0x40) * 4,
                _ => 0x70,
            };
            let len = [1usize, 2, 4, 8][rng.below(4) as usize];
            let offset = offset.min(0x1000 - len as u64);
            if rng.below(2) == 0 {
                let mut b = vec![0u8; len];
                d.transport.read(offset, &mut b);
            } else {
                let v = rng.next().to_le_bytes();
                d.transport.write(offset, &v[..len]);
            }
            if rng.below(50) == 0 {
                d.handler.queue_evts()[0].write(1).unwrap();
                d.handler.process_queue(0);
            }
        }
        // Whatever state it ended in, a reset and a proper start bring it back.
        d.write32(regs::STATUS, 0);
        d.start();
        assert_still_works(&mut d, &p);
    }
}

// ---- media change ----

fn capacity(d: &mut Driver) -> u64 {
    u64::from(d.read32(regs::CONFIG)) | (u64::from(d.read32(regs::CONFIG + 4)) << 32)
}

/// What the VMM does for `PATCH /drives`: the new medium through `change_config`.
fn change_medium(d: &Driver, disk: super::Disk) -> Result<(), BlockError> {
    d.device::<Block>()
        .change_config(|block| block.change_medium(disk))
}

fn second_disk(dir: &TempDir, len: usize, seed: u8) -> PathBuf {
    let p = dir.path().join(format!("disk-{len}-{seed}.img"));
    std::fs::write(&p, pattern(len, seed)).unwrap();
    p
}

#[test]
fn media_change_updates_capacity_generation_interrupt_and_data() {
    let dir = TempDir::new();
    let a = disk(&dir);
    let mut d = block_driver(&a, false, Some("keep-me"));
    let (s, _, back) = read(&mut d, 0, 512);
    assert_eq!((s, back), (st::OK, pattern(DISK_LEN, 7)[..512].to_vec()));
    // A write just before the change must be in the old file once it is closed.
    let data = pattern(512, 200);
    assert_eq!(write(&mut d, 5, &data), (st::OK, 1));
    let gen = d.read32(regs::CONFIG_GENERATION);
    let isr = d.read32(regs::INTERRUPT_STATUS);
    d.write32(regs::INTERRUPT_ACK, isr);
    d.take_interrupts();

    let b_len = 3 * DISK_LEN;
    let b = second_disk(&dir, b_len, 42);
    change_medium(&d, Box::new(open_raw(&b, false))).unwrap();

    assert_eq!(capacity(&mut d), (b_len / 512) as u64);
    assert_eq!(d.read32(regs::CONFIG_GENERATION), gen.wrapping_add(1));
    assert_ne!(
        d.read32(regs::INTERRUPT_STATUS) & crate::virtio::INT_CONFIG_CHANGE,
        0,
        "configuration change bit"
    );
    assert!(d.take_interrupts() >= 1, "the interrupt line fired");
    // Reads come from the new file, including beyond the old capacity.
    let whole = pattern(b_len, 42);
    let (s, l, back) = read(&mut d, 0, 4096);
    assert_eq!((s, l), (st::OK, 4097));
    assert_eq!(back, whole[..4096]);
    let far = (b_len - 4096) as u64 / 512;
    let (s, _, back) = read(&mut d, far, 4096);
    assert_eq!(s, st::OK);
    assert_eq!(back, whole[b_len - 4096..]);
    // Writes go to the new file; the old one kept the write before the change and its
    // lock is gone.
    assert_eq!(write(&mut d, 9, &data), (st::OK, 1));
    assert_eq!(&std::fs::read(&b).unwrap()[9 * 512..10 * 512], &data[..]);
    assert_eq!(&std::fs::read(&a).unwrap()[5 * 512..6 * 512], &data[..]);
    drop(open_raw(&a, false));
    // GET_ID still answers the drive's serial.
    let r = build(&mut d, rt::GET_ID, 0, None, 20);
    assert_eq!(submit(&mut d, &r).0, st::OK);
    assert_eq!(&d.read_bytes(r.data.unwrap().addr, 7), b"keep-me");
}

#[test]
fn media_change_to_a_smaller_image_through_the_bounce_path() {
    let dir = TempDir::new();
    let a = disk(&dir);
    let mut d = block_driver(&a, false, None);
    let small = 64 * 1024;
    let b = second_disk(&dir, small, 3);
    let raw = open_raw(&b, false);
    change_medium(&d, Box::new(raw)).unwrap();
    assert_eq!(capacity(&mut d), (small / 512) as u64);
    let (s, _, back) = read(&mut d, 8, 512);
    assert_eq!(s, st::OK);
    assert_eq!(back, pattern(small, 3)[8 * 512..9 * 512]);
    // What was inside the old capacity is now beyond the new one.
    let (s, l, _) = read(&mut d, (small / 512) as u64, 512);
    assert_eq!((s, l), (st::IOERR, 1));
}

#[test]
fn read_only_medium_does_not_replace_a_writable_one() {
    let dir = TempDir::new();
    let a = disk(&dir);
    let mut d = block_driver(&a, false, None);
    let gen = d.read32(regs::CONFIG_GENERATION);
    d.take_interrupts();
    let b = second_disk(&dir, 2 * DISK_LEN, 9);
    let e = change_medium(&d, Box::new(open_raw(&b, true))).unwrap_err();
    assert_eq!(e, BlockError::MediumReadOnly);
    assert_eq!(capacity(&mut d), (DISK_LEN / 512) as u64);
    assert_eq!(d.read32(regs::CONFIG_GENERATION), gen);
    assert_eq!(d.take_interrupts(), 0);
    assert_eq!(
        d.read32(regs::INTERRUPT_STATUS) & crate::virtio::INT_CONFIG_CHANGE,
        0
    );
    assert_still_works(&mut d, &a);
    // The refused medium was closed: its lock is free.
    drop(open_raw(&b, false));
}

#[test]
fn media_change_before_driver_ok_bumps_the_generation_without_an_interrupt() {
    let dir = TempDir::new();
    let a = disk(&dir);
    let dev = Block::new_raw(open_raw(&a, false), None, false).unwrap();
    let mut d = Driver::new(Box::new(dev));
    let gen = d.read32(regs::CONFIG_GENERATION);
    let b = second_disk(&dir, 2 * DISK_LEN, 5);
    change_medium(&d, Box::new(open_raw(&b, false))).unwrap();
    assert_eq!(d.read32(regs::CONFIG_GENERATION), gen.wrapping_add(1));
    assert_eq!(d.take_interrupts(), 0);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), 0);
    d.start();
    assert_eq!(capacity(&mut d), (2 * DISK_LEN / 512) as u64);
    let (s, _, back) = read(&mut d, 0, 512);
    assert_eq!(
        (s, back),
        (st::OK, pattern(2 * DISK_LEN, 5)[..512].to_vec())
    );
}

/// A disk of `len` bytes that keeps no data and records every call that moves or zeroes
/// bytes, with the event-loop turn it came in (`turn` is set by the test).
struct RecordingDisk {
    len: u64,
    calls: Calls,
    turn: Arc<Mutex<usize>>,
}

impl RecordingDisk {
    fn record(&self, what: &'static str, offset: u64, len: u64) {
        let turn = *self.turn.lock().unwrap();
        self.calls.lock().unwrap().push((what, offset, len, turn));
    }
}

impl DiskBackend for RecordingDisk {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.record("read", offset, buf.len() as u64);
        buf.fill(0);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.record("write", offset, buf.len() as u64);
        Ok(())
    }
    fn read_vectored(
        &mut self,
        offset: u64,
        bufs: &[vm_memory::VolatileSlice<'_>],
    ) -> io::Result<()> {
        self.record("read", offset, bufs.iter().map(|b| b.len() as u64).sum());
        Ok(())
    }
    fn write_vectored(
        &mut self,
        offset: u64,
        bufs: &[vm_memory::VolatileSlice<'_>],
    ) -> io::Result<()> {
        self.record("write", offset, bufs.iter().map(|b| b.len() as u64).sum());
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.record("discard", offset, len);
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.record("zero", offset, len);
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
}

type Calls = Arc<Mutex<Vec<(&'static str, u64, u64, usize)>>>;

fn recording_driver(len: u64) -> (Driver, Calls, Arc<Mutex<usize>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let turn = Arc::new(Mutex::new(0));
    let disk = RecordingDisk {
        len,
        calls: calls.clone(),
        turn: turn.clone(),
    };
    let mut d = Driver::new(Box::new(Block::new(Box::new(disk), None, false).unwrap()));
    d.start();
    (d, calls, turn)
}

/// Runs event-loop turns until the device stops asking for more; returns their number.
fn run_to_completion(d: &mut Driver, turn: &Arc<Mutex<usize>>) -> usize {
    let mut turns = 0;
    loop {
        *turn.lock().unwrap() += 1;
        if d.run_turns(0, 1) == 0 {
            return turns;
        }
        turns += 1;
    }
}

/// Bytes each turn moved, from the recorded calls.
fn bytes_per_turn(calls: &Calls) -> std::collections::BTreeMap<usize, u64> {
    let mut per = std::collections::BTreeMap::new();
    for &(_, _, len, turn) in calls.lock().unwrap().iter() {
        *per.entry(turn).or_insert(0) += len;
    }
    per
}

#[test]
fn write_zeroes_of_64_gib_is_split_over_event_loop_turns() {
    const GIB4: u64 = 4 << 30;
    let (mut d, calls, turn) = recording_driver(GIB4);
    // 16 segments of the most sectors allowed each, as a hostile driver sends them.
    let n = super::MAX_WRITE_ZEROES_SECTORS;
    let h = header(&mut d, rt::WRITE_ZEROES, 0);
    let segs = d.alloc(16 * 16);
    for i in 0..16u64 {
        let mut b = [0u8; 16];
        b[8..12].copy_from_slice(&n.to_le_bytes());
        d.mem.write_slice(&b, GuestAddress(segs + 16 * i)).unwrap();
    }
    let s = status_buf(&mut d);
    let head = d.add_chain(&[
        Buf::readable(h, 16),
        Buf::readable(segs, 16 * 16),
        Buf::writable(s, 1),
    ]);
    d.publish(head);
    d.kick(0);
    // The first turn did a bounded part and asked to be called again.
    assert_eq!(d.used_idx(), 0, "64 GiB of zeroing done in one turn");
    let first: u64 = bytes_per_turn(&calls).values().sum();
    assert!(
        first > 0 && first <= super::device::BYTES_PER_TURN,
        "{first}"
    );
    let turns = run_to_completion(&mut d, &turn);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used_elem(0), (u32::from(head), 1));
    assert_eq!(d.mem.read_obj::<u8>(GuestAddress(s)).unwrap(), st::OK);
    let range = u64::from(n) * 512;
    assert!(
        turns as u64 >= 16 * range / super::device::BYTES_PER_TURN,
        "{turns}"
    );
    for (t, bytes) in bytes_per_turn(&calls) {
        assert!(
            bytes <= super::device::BYTES_PER_TURN,
            "turn {t}: {bytes} bytes"
        );
    }
    // Every byte of every segment was zeroed once, in order, in 2 MiB-aligned pieces.
    let calls = calls.lock().unwrap();
    let mut expect = 0u64;
    let mut total = 0u64;
    for &(what, offset, len, _) in calls.iter() {
        assert_eq!(what, "zero");
        assert_eq!(offset, expect);
        assert!(offset + len == range || (offset + len) % (2 << 20) == 0);
        total += len;
        expect = if offset + len == range {
            0
        } else {
            offset + len
        };
    }
    assert_eq!(total, 16 * range);
}

#[test]
fn a_read_larger_than_a_turn_goes_on_over_turns_before_the_next_request() {
    let (mut d, calls, turn) = recording_driver(1 << 30);
    // 64 MiB into 32 descriptors (an indirect table) that all point at one 2 MiB buffer.
    let n = 34u16;
    let table = d.alloc(16 * u64::from(n));
    let h = header(&mut d, rt::IN, 8);
    let buf = d.alloc(2 << 20);
    let s = status_buf(&mut d);
    d.write_desc(table, 0, h, 16, VIRTQ_DESC_F_NEXT, 1);
    for i in 1..n - 1 {
        let flags = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE;
        d.write_desc(table, i, buf, 2 << 20, flags, i + 1);
    }
    d.write_desc(table, n - 1, s, 1, VIRTQ_DESC_F_WRITE, 0);
    let big = d.reserve_descs(1);
    let indirect = 16 * u32::from(n);
    d.write_desc(DESC_TABLE, big, table, indirect, VIRTQ_DESC_F_INDIRECT, 0);
    d.publish(big);
    // A small request behind it waits for it.
    let small = build(&mut d, rt::OUT, 0, Some(&[1u8; 512]), 0);
    let small_head = d.add_chain(&[
        Buf::readable(small.header, 16),
        small.data.unwrap(),
        Buf::writable(small.status, 1),
    ]);
    d.publish(small_head);
    d.kick(0);
    assert_eq!(d.used_idx(), 0);
    run_to_completion(&mut d, &turn);
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.used_elem(0), (u32::from(big), (64 << 20) + 1));
    assert_eq!(d.used_elem(1), (u32::from(small_head), 1));
    let per = bytes_per_turn(&calls);
    assert!(per.len() >= 4, "{per:?}");
    assert!(
        per.values().all(|&b| b <= super::device::BYTES_PER_TURN),
        "{per:?}"
    );
    let calls = calls.lock().unwrap();
    let reads: u64 = calls.iter().filter(|c| c.0 == "read").map(|c| c.2).sum();
    assert_eq!(reads, 64 << 20);
    assert_eq!(calls.last().unwrap().0, "write");
}

#[test]
fn a_media_change_ends_a_split_request_with_an_io_error() {
    let (mut d, _calls, _turn) = recording_driver(4 << 30);
    let (st_, _) = {
        let h = header(&mut d, rt::WRITE_ZEROES, 0);
        let seg = d.alloc(16);
        let mut b = [0u8; 16];
        b[8..12].copy_from_slice(&super::MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        d.mem.write_slice(&b, GuestAddress(seg)).unwrap();
        let s = status_buf(&mut d);
        let head = d.add_chain(&[
            Buf::readable(h, 16),
            Buf::readable(seg, 16),
            Buf::writable(s, 1),
        ]);
        d.publish(head);
        d.kick(0);
        assert_eq!(d.used_idx(), 0);
        let dir = TempDir::new();
        let other = second_disk(&dir, 1 << 20, 5);
        change_medium(&d, Box::new(open_raw(&other, false))).unwrap();
        (d.mem.read_obj::<u8>(GuestAddress(s)).unwrap(), head)
    };
    assert_eq!(d.used_idx(), 1);
    assert_eq!(st_, st::IOERR);
    // Nothing of it goes on with the new medium.
    assert_eq!(d.run_turns(0, 10), 1);
    assert_eq!(d.used_idx(), 1);
}

/// Issue 11 item 6 as the guest sees it: an injected I/O error fails exactly the request it
/// hit (IOERR) and the requests around it succeed; after a failed flush every flush fails.
#[test]
fn an_injected_io_error_fails_exactly_its_request() {
    use crate::disk::fault::{Faults, FileOp};
    use crate::disk::qcow2::{create, Qcow2};
    let dir = TempDir::new();
    let p = dir.path().join("f.qcow2");
    create(&p, Some(DISK_LEN as u64), None, None).unwrap();
    let mut q = Qcow2::open(&p, false).unwrap();
    // The second pwrite: the data of the second (allocating) guest write.
    q.set_faults(Some(
        Faults::fail_nth(1, libc::ENOSPC).only(&[FileOp::Write]),
    ));
    let mut d = Driver::new(Box::new(Block::new(Box::new(q), None, false).unwrap()));
    d.start();
    assert_eq!(write(&mut d, 0, &pattern(4096, 1)), (st::OK, 1));
    assert_eq!(write(&mut d, 128, &pattern(4096, 2)), (st::IOERR, 1));
    assert_eq!(write(&mut d, 256, &pattern(4096, 3)), (st::OK, 1));
    let r = build(&mut d, rt::FLUSH, 0, None, 0);
    assert_eq!(submit(&mut d, &r), (st::OK, 1));
    assert_eq!(read(&mut d, 0, 4096).2, pattern(4096, 1));
    assert_eq!(read(&mut d, 128, 4096).2, vec![0u8; 4096], "old data");
    assert_eq!(read(&mut d, 256, 4096).2, pattern(4096, 3));

    let p = disk(&dir);
    let mut raw = open_raw(&p, false);
    raw.set_faults(Some(Faults::fail_nth(0, libc::EIO).only(&[FileOp::Sync])));
    let mut d = Driver::new(Box::new(Block::new_raw(raw, None, false).unwrap()));
    d.start();
    for i in 0..2 {
        assert_eq!(write(&mut d, i, &pattern(512, 4)), (st::OK, 1));
        let r = build(&mut d, rt::FLUSH, 0, None, 0);
        assert_eq!(submit(&mut d, &r), (st::IOERR, 1), "flush {i}");
    }
}

#[test]
fn counters_count_completed_requests_flushes_and_malformed_ones() {
    let dir = TempDir::new();
    let p = disk(&dir);
    let raw = open_raw(&p, false);
    let dev = Block::new_raw(raw, None, false).unwrap();
    let counters: Arc<BlockCounters> = dev.counters();
    let mut d = Driver::new(Box::new(dev));
    d.start();

    assert_eq!(write(&mut d, 0, &pattern(1024, 1)), (st::OK, 1));
    assert_eq!(write(&mut d, 8, &pattern(512, 2)), (st::OK, 1));
    assert_eq!(read(&mut d, 0, 1536).0, st::OK);
    let r = build(&mut d, rt::FLUSH, 0, None, 0);
    assert_eq!(submit(&mut d, &r), (st::OK, 1));
    // Malformed: IN with device-readable data, and a read beyond the disk.
    let r = build(&mut d, rt::IN, 0, Some(&pattern(512, 3)), 0);
    assert_eq!(submit(&mut d, &r).0, st::IOERR);
    let r = build(&mut d, rt::IN, (DISK_LEN / 512) as u64, None, 512);
    assert_eq!(submit(&mut d, &r).0, st::IOERR);

    let l = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (l(&counters.write_count), l(&counters.write_bytes)),
        (2, 1536)
    );
    assert_eq!(
        (l(&counters.read_count), l(&counters.read_bytes)),
        (1, 1536)
    );
    assert_eq!(l(&counters.flush_count), 1);
    assert_eq!(l(&counters.invalid_reqs_count), 2);
    assert_eq!(l(&counters.execute_fails), 0);
    // One notification per request submitted.
    assert_eq!(l(&counters.queue_event_count), 6);
}

/// A disk whose writes fail, as a full or failing host disk would.
struct FailingWrites;

impl DiskBackend for FailingWrites {
    fn len(&self) -> u64 {
        DISK_LEN as u64
    }
    fn read_at(&mut self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSPC))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64, _may_unmap: bool) -> io::Result<()> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
}

#[test]
fn a_write_the_disk_fails_counts_as_an_execute_fail_not_a_write() {
    let dev = Block::new(Box::new(FailingWrites), None, false).unwrap();
    let counters = dev.counters();
    let mut d = Driver::new(Box::new(dev));
    d.start();
    assert_eq!(write(&mut d, 0, &pattern(512, 1)).0, st::IOERR);
    assert_eq!(read(&mut d, 0, 512).0, st::OK);
    let l = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(l(&counters.execute_fails), 1);
    assert_eq!((l(&counters.write_count), l(&counters.write_bytes)), (0, 0));
    assert_eq!((l(&counters.read_count), l(&counters.read_bytes)), (1, 512));
    assert_eq!(l(&counters.invalid_reqs_count), 0);
}

/// The descriptors of `req` (header, data, status).
fn bufs_of(req: &Req) -> Vec<Buf> {
    let mut bufs = vec![Buf::readable(req.header, 16)];
    bufs.extend(req.data);
    bufs.push(Buf::writable(req.status, 1));
    bufs
}

fn limited_block(p: &PathBuf, bandwidth: Option<BucketParams>, ops: Option<BucketParams>) -> Block {
    let limiter = RateLimiter::new(bandwidth, ops).unwrap();
    Block::new_raw(open_raw(p, false), None, false)
        .unwrap()
        .with_rate_limiter(limiter)
}

fn bucket(size: u64, refill_time_ms: u64) -> Option<BucketParams> {
    Some(BucketParams {
        size,
        one_time_burst: 0,
        refill_time_ms,
    })
}

/// Publishes `n` 4 KiB writes (sectors 0, 8, 16, ...) at once; returns them.
fn publish_writes(d: &mut Driver, n: u64) -> Vec<Req> {
    let reqs: Vec<Req> = (0..n)
        .map(|i| build(d, rt::OUT, i * 8, Some(&pattern(4096, i as u8)), 0))
        .collect();
    for r in &reqs {
        let head = d.add_chain(&bufs_of(r));
        d.publish(head);
    }
    reqs
}

fn status_of(d: &Driver, r: &Req) -> u8 {
    d.mem.read_obj(GuestAddress(r.status)).unwrap()
}

#[test]
fn a_throttled_queue_waits_in_the_ring_and_resumes_from_the_limiters_timer() {
    let dir = TempDir::new();
    let p = disk(&dir);
    // Two requests at once, then one every 50 ms.
    let dev = limited_block(&p, None, bucket(2, 100));
    let counters = dev.counters();
    let mut d = Driver::new(Box::new(dev));
    let mut h = d.handler.clone();
    let mut ev = EpollLoop::new(&mut h);
    d.queue_size = 64;
    d.start();
    let reqs = publish_writes(&mut d, 6);
    // One notification for all six, as the guest's QueueNotify through the ioeventfd.
    d.handler.queue_evts()[0].write(1).unwrap();
    let t = std::time::Duration::from_secs(10);
    assert!(ev.run_until(&mut h, t, || d.used_idx() >= 2));
    // The bucket's two went through; the rest wait in the ring, untouched.
    assert_eq!(d.used_idx(), 2);
    assert!(reqs[2..]
        .iter()
        .all(|r| status_of(&d, r) == STATUS_UNTOUCHED));
    assert!(counters.rate_limiter_throttled_events.load(Relaxed) >= 1);
    // Nothing else wakes the loop up: the timer brings the queue back, one token at a time.
    assert!(
        ev.run_until(&mut h, t, || d.used_idx() == 6),
        "requests were lost"
    );
    assert!(reqs.iter().all(|r| status_of(&d, r) == st::OK));
    let timer_events = counters.rate_limiter_event_count.load(Relaxed);
    assert!(
        (1..=4).contains(&timer_events),
        "{timer_events} timer events"
    );
    // Activation, the notification and the timer: no busy loop.
    assert!(ev.wakeups <= 2 + timer_events, "{} wake-ups", ev.wakeups);
    let file = std::fs::read(&p).unwrap();
    for i in 0..6 {
        let at = i * 4096;
        assert_eq!(file[at..at + 4096], pattern(4096, i as u8)[..], "write {i}");
    }
}

#[test]
fn bandwidth_counts_each_requests_data_bytes() {
    let dir = TempDir::new();
    let p = disk(&dir);
    // 8 KiB at once, then a minute for more.
    let dev = limited_block(&p, bucket(8192, 60_000), None);
    let counters = dev.counters();
    let mut d = Driver::new(Box::new(dev));
    d.start();
    let reqs = publish_writes(&mut d, 3);
    d.kick(0);
    assert_eq!(d.used_idx(), 2);
    assert_eq!(status_of(&d, &reqs[2]), STATUS_UNTOUCHED);
    // Another notification while throttled: still held, nothing dropped.
    d.kick(0);
    assert_eq!(d.used_idx(), 2);
    assert_eq!(counters.write_count.load(Relaxed), 2);
    assert!(counters.rate_limiter_throttled_events.load(Relaxed) >= 2);
}

#[test]
fn a_limit_changed_at_run_time_releases_the_requests_it_held() {
    let dir = TempDir::new();
    let p = disk(&dir);
    // One request a minute.
    let dev = limited_block(&p, None, bucket(1, 60_000));
    let mut d = Driver::new(Box::new(dev));
    let mut h = d.handler.clone();
    let mut ev = EpollLoop::new(&mut h);
    d.start();
    let reqs = publish_writes(&mut d, 4);
    d.handler.queue_evts()[0].write(1).unwrap();
    let t = std::time::Duration::from_secs(10);
    assert!(ev.run_until(&mut h, t, || d.used_idx() >= 1));
    assert_eq!(d.used_idx(), 1);
    // Raised to 1000 a second: the three waiting go now, not in three minutes.
    let changed = d.device::<Block>().with(|b| {
        b.update_rate_limiter(
            BucketUpdate::Keep,
            BucketUpdate::Set(bucket(1000, 1000).unwrap()),
        )
    });
    assert!(changed);
    assert!(ev.run_until(&mut h, t, || d.used_idx() == 4));
    assert!(reqs.iter().all(|r| status_of(&d, r) == st::OK));
    // A device made without a limiter has nothing to change.
    let plain = Block::new_raw(open_raw(&disk(&TempDir::new()), false), None, false).unwrap();
    let mut plain = plain;
    assert!(!plain.update_rate_limiter(BucketUpdate::Keep, BucketUpdate::Keep));
}
