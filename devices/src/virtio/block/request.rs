//! virtio-blk request parsing and execution (virtio 1.2 §5.2.6).
//!
//! A chain is seen as two byte streams, as the spec asks (no assumption on how the driver
//! splits it into descriptors): the device-readable part (16-byte header, then OUT data or
//! discard segments) and the device-writable part (IN data or the id string, then the status
//! byte, which is the last byte of the last descriptor).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice,
};

use super::{
    features, request_status as status, request_type as rtype, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, SEG_MAX,
};
use crate::disk::raw::RawFile;
use crate::disk::DiskBackend;
use crate::virtio::queue::{collect_chain, ChainEnd};

pub const SECTOR_SIZE: u64 = 512;
/// GET_ID answers with up to 20 bytes (virtio 1.2 §5.2.6).
pub const SERIAL_LEN: usize = 20;
const HEADER_LEN: u64 = 16;
/// struct virtio_blk_discard_write_zeroes
const DISCARD_SEGMENT_LEN: u64 = 16;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// Why a request failed; logged (rate-limited) and turned into a status byte.
#[derive(Debug)]
enum Failure {
    IoErr(String),
    Unsupp(u32),
}

type Outcome = Result<u32, (Failure, u32)>;

fn ioerr(msg: impl Into<String>) -> (Failure, u32) {
    (Failure::IoErr(msg.into()), 0)
}

/// The disk behind the device (its medium). Data moves through the backend's
/// `read_vectored` / `write_vectored` on guest memory: raw files and qcow2 data clusters
/// go straight between the file and guest memory (preadv/pwritev).
pub enum Disk {
    Generic(Box<dyn DiskBackend>),
    Raw(RawFile),
}

impl Disk {
    pub(super) fn get(&mut self) -> &mut dyn DiskBackend {
        match self {
            Disk::Generic(b) => b.as_mut(),
            Disk::Raw(r) => r,
        }
    }

    pub(super) fn get_ref(&self) -> &dyn DiskBackend {
        match self {
            Disk::Generic(b) => b.as_ref(),
            Disk::Raw(r) => r,
        }
    }
}

/// Executes requests against the backend. One per device; its buffers are reused.
pub(super) struct RequestHandler {
    pub(super) disk: Disk,
    pub(super) read_only: bool,
    pub(super) serial: [u8; SERIAL_LEN],
    /// Usable size in bytes: whole sectors only.
    pub(super) capacity: u64,
    /// Features the driver accepted.
    pub(super) acked_features: u64,
    descs: Vec<Descriptor>,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

impl RequestHandler {
    pub(super) fn new(disk: Disk, read_only: bool, serial: [u8; SERIAL_LEN]) -> Self {
        let capacity = disk.get_ref().len() / SECTOR_SIZE * SECTOR_SIZE;
        RequestHandler {
            disk,
            read_only,
            serial,
            capacity,
            acked_features: 0,
            descs: Vec::new(),
            readable: Vec::new(),
            writable: Vec::new(),
        }
    }

    /// Handles one chain; returns the used length (bytes written to the driver's buffers,
    /// status byte included), or 0 when the chain has no usable status byte and nothing
    /// was written.
    pub(super) fn handle_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let head = chain.head_index();
        let mut descs = std::mem::take(&mut self.descs);
        let end = collect_chain(chain, &mut descs);
        let used = self.handle_descs(mem, head, &descs, end);
        self.descs = descs;
        used
    }

    fn handle_descs(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        descs: &[Descriptor],
        end: ChainEnd,
    ) -> u32 {
        if end == ChainEnd::Broken {
            rate_limited_warn!(
                "virtio-blk: chain at descriptor {} loops, is longer than the queue or points outside guest memory; returned unanswered",
                head
            );
            return 0;
        }
        // virtio 1.2 §5.2.6: the status byte is the last byte of the last descriptor, which
        // must be device-writable.
        let status_addr = match descs.last() {
            Some(d) if d.is_write_only() && d.len() > 0 => {
                d.addr().checked_add(u64::from(d.len()) - 1)
            }
            _ => None,
        };
        let Some(status_addr) = status_addr.filter(|a| mem.check_range(*a, 1, Permissions::Write))
        else {
            rate_limited_warn!(
                "virtio-blk: chain at descriptor {} has no device-writable status byte in guest memory; returned unanswered",
                head
            );
            return 0;
        };
        let (status, written) = match self.execute(mem, descs) {
            Ok(written) => (status::OK, written),
            Err((failure, written)) => {
                let status = match failure {
                    Failure::IoErr(msg) => {
                        rate_limited_warn!("virtio-blk: request {} failed: {}", head, msg);
                        status::IOERR
                    }
                    Failure::Unsupp(t) => {
                        rate_limited_warn!("virtio-blk: request type {} not supported", t);
                        status::UNSUPP
                    }
                };
                (status, written)
            }
        };
        if mem.write_obj(status, status_addr).is_err() {
            // Checked above; guest memory does not shrink.
            return 0;
        }
        written.saturating_add(1)
    }

    /// Validates the layout of the chain and runs the request. Ok(n) / Err((_, n)): n bytes
    /// of data were written to the driver's buffers.
    fn execute(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Outcome {
        if descs.len() as u64 > u64::from(SEG_MAX) + 2 {
            return Err(ioerr(format!(
                "chain of {} descriptors exceeds seg_max {} + 2",
                descs.len(),
                SEG_MAX
            )));
        }
        self.readable.clear();
        self.writable.clear();
        for d in descs {
            let len = u64::from(d.len());
            if !mem.check_range(d.addr(), len as usize, Permissions::ReadWrite) {
                return Err(ioerr(format!(
                    "buffer {:#x}+{:#x} is outside guest memory",
                    d.addr().0,
                    len
                )));
            }
            let seg = Segment {
                addr: d.addr(),
                len,
            };
            if d.is_write_only() {
                self.writable.push(seg);
            } else if !self.writable.is_empty() {
                // virtio 1.2 §2.7.4.2: device-readable descriptors come first.
                return Err(ioerr(
                    "device-readable descriptor after a device-writable one",
                ));
            } else {
                self.readable.push(seg);
            }
        }
        // The status byte is not data.
        if let Some(last) = self.writable.last_mut() {
            last.len -= 1;
        }
        let readable_len: u64 = self.readable.iter().map(|s| s.len).sum();
        let writable_len: u64 = self.writable.iter().map(|s| s.len).sum();

        let mut header = [0u8; HEADER_LEN as usize];
        if readable_len < HEADER_LEN {
            return Err(ioerr(format!(
                "device-readable part is {readable_len} bytes, shorter than the 16-byte header"
            )));
        }
        gather(mem, &self.readable, 0, &mut header)
            .map_err(|_| ioerr("cannot read the request header"))?;
        let req_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let out_len = readable_len - HEADER_LEN;

        match req_type {
            rtype::IN => {
                if out_len != 0 {
                    return Err(ioerr("IN request with device-readable data"));
                }
                let offset = self.check_range(sector, writable_len)?;
                self.read_to_guest(mem, offset, writable_len)
            }
            rtype::OUT => {
                if writable_len != 0 {
                    return Err(ioerr("OUT request with device-writable data"));
                }
                if self.read_only {
                    return Err(ioerr("write to a read-only disk"));
                }
                let offset = self.check_range(sector, out_len)?;
                self.write_from_guest(mem, offset, out_len)?;
                self.write_through()?;
                Ok(0)
            }
            rtype::FLUSH => {
                if out_len != 0 || writable_len != 0 {
                    return Err(ioerr("FLUSH request with data"));
                }
                // The status is written by our caller only after this returns: a flush is on
                // stable storage before the driver can see it complete.
                self.disk
                    .get()
                    .flush()
                    .map_err(|e| ioerr(format!("flush: {e}")))?;
                Ok(0)
            }
            rtype::GET_ID => {
                if out_len != 0 {
                    return Err(ioerr("GET_ID request with device-readable data"));
                }
                let n = writable_len.min(SERIAL_LEN as u64) as usize;
                scatter(mem, &self.writable, 0, &self.serial[..n])
                    .map_err(|_| ioerr("cannot write the id"))?;
                Ok(n as u32)
            }
            rtype::DISCARD | rtype::WRITE_ZEROES => {
                let (feature, max_sectors, max_seg) = if req_type == rtype::DISCARD {
                    (features::DISCARD, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG)
                } else {
                    (
                        features::WRITE_ZEROES,
                        MAX_WRITE_ZEROES_SECTORS,
                        MAX_WRITE_ZEROES_SEG,
                    )
                };
                if self.acked_features & feature == 0 {
                    return Err((Failure::Unsupp(req_type), 0));
                }
                if writable_len != 0 {
                    return Err(ioerr(
                        "DISCARD/WRITE_ZEROES request with device-writable data",
                    ));
                }
                if self.read_only {
                    return Err(ioerr("discard or write-zeroes on a read-only disk"));
                }
                self.discard_or_zero(mem, req_type, out_len, max_sectors, max_seg)?;
                self.write_through()?;
                Ok(0)
            }
            other => Err((Failure::Unsupp(other), 0)),
        }
    }

    /// Byte offset of `sector`, after checking that `len` bytes from there are whole
    /// sectors inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, (Failure, u32)> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(ioerr(format!("data length {len} is not a multiple of 512")));
        }
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|off| off.checked_add(len).is_some_and(|end| end <= self.capacity))
            .ok_or_else(|| {
                ioerr(format!(
                    "sector {sector} + {len} bytes is beyond the disk ({} bytes)",
                    self.capacity
                ))
            })
    }

    /// Without VIRTIO_BLK_F_FLUSH the driver expects a write-through cache (virtio 1.2
    /// §5.2.6.3).
    fn write_through(&mut self) -> Result<(), (Failure, u32)> {
        if self.acked_features & features::FLUSH == 0 {
            self.disk
                .get()
                .flush()
                .map_err(|e| ioerr(format!("write-through flush: {e}")))?;
        }
        Ok(())
    }

    fn read_to_guest(&mut self, mem: &GuestMemoryMmap, offset: u64, len: u64) -> Outcome {
        let slices = guest_slices(mem, &self.writable, 0, len)
            .map_err(|_| ioerr("cannot map guest memory"))?;
        // Straight into guest memory (preadv for raw files and qcow2 data clusters). On
        // failure any part may have been written: report it all.
        self.disk
            .get()
            .read_vectored(offset, &slices)
            .map_err(|e| (Failure::IoErr(format!("read at {offset}: {e}")), len as u32))?;
        Ok(len as u32)
    }

    fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        len: u64,
    ) -> Result<(), (Failure, u32)> {
        let slices = guest_slices(mem, &self.readable, HEADER_LEN, len)
            .map_err(|_| ioerr("cannot map guest memory"))?;
        self.disk
            .get()
            .write_vectored(offset, &slices)
            .map_err(|e| ioerr(format!("write at {offset}: {e}")))
    }

    fn discard_or_zero(
        &mut self,
        mem: &GuestMemoryMmap,
        req_type: u32,
        segs_len: u64,
        max_sectors: u32,
        max_seg: u32,
    ) -> Result<(), (Failure, u32)> {
        let count = segs_len / DISCARD_SEGMENT_LEN;
        if segs_len == 0
            || !segs_len.is_multiple_of(DISCARD_SEGMENT_LEN)
            || count > u64::from(max_seg)
        {
            return Err(ioerr(format!(
                "{segs_len} bytes of discard segments (max {max_seg} of 16 bytes)"
            )));
        }
        let mut ranges = [(0u64, 0u64, false); MAX_DISCARD_SEG as usize];
        for (i, range) in ranges.iter_mut().enumerate().take(count as usize) {
            let mut raw = [0u8; DISCARD_SEGMENT_LEN as usize];
            gather(
                mem,
                &self.readable,
                HEADER_LEN + i as u64 * DISCARD_SEGMENT_LEN,
                &mut raw,
            )
            .map_err(|_| ioerr("cannot read discard segment"))?;
            let sector = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
            let num_sectors = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
            // virtio 1.2 §5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP.
            if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 || (req_type == rtype::DISCARD && flags != 0) {
                return Err((Failure::Unsupp(req_type), 0));
            }
            if num_sectors > max_sectors {
                return Err(ioerr(format!(
                    "{num_sectors} sectors exceed the limit of {max_sectors}"
                )));
            }
            let len = u64::from(num_sectors) * SECTOR_SIZE;
            let offset = self.check_range(sector, len)?;
            *range = (offset, len, flags & WRITE_ZEROES_FLAG_UNMAP != 0);
        }
        for &(offset, len, unmap) in &ranges[..count as usize] {
            let r = if req_type == rtype::DISCARD {
                self.disk.get().discard(offset, len)
            } else {
                self.disk.get().write_zeroes(offset, len, unmap)
            };
            r.map_err(|e| ioerr(format!("discard/write-zeroes at {offset}+{len}: {e}")))?;
        }
        Ok(())
    }
}

/// The guest memory of the stream `skip..skip + len` formed by `segs`, as slices.
fn guest_slices<'m>(
    mem: &'m GuestMemoryMmap,
    segs: &[Segment],
    skip: u64,
    len: u64,
) -> Result<Vec<VolatileSlice<'m, ()>>, ()> {
    let len = usize::try_from(len).map_err(|_| ())?;
    let mut out = Vec::with_capacity(segs.len());
    walk(segs, skip, len, |addr, range| {
        for s in vm_memory::GuestMemoryBackend::get_slices(mem, addr, range.len()) {
            out.push(s.map_err(|_| ())?);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Copies `out.len()` bytes from the stream formed by `segs`, starting at stream offset `skip`.
fn gather(mem: &GuestMemoryMmap, segs: &[Segment], skip: u64, out: &mut [u8]) -> Result<(), ()> {
    walk(segs, skip, out.len(), |addr, range| {
        mem.read_slice(&mut out[range], addr).map_err(|_| ())
    })
}

/// Copies `data` into the stream formed by `segs` at stream offset `skip`.
fn scatter(mem: &GuestMemoryMmap, segs: &[Segment], skip: u64, data: &[u8]) -> Result<(), ()> {
    walk(segs, skip, data.len(), |addr, range| {
        mem.write_slice(&data[range], addr).map_err(|_| ())
    })
}

/// Calls `f(guest address, range of the caller's buffer)` for each piece of the stream
/// `skip..skip + len`. Fails if the segments end first.
fn walk(
    segs: &[Segment],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ()>,
) -> Result<(), ()> {
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        if skip >= seg.len {
            skip -= seg.len;
            continue;
        }
        let avail = seg.len - skip;
        let n = avail.min((len - done) as u64) as usize;
        // Segments were checked to lie in guest memory, so the address cannot overflow.
        let addr = seg.addr.checked_add(skip).ok_or(())?;
        f(addr, done..done + n)?;
        done += n;
        skip = 0;
    }
    if done == len {
        Ok(())
    } else {
        Err(())
    }
}
