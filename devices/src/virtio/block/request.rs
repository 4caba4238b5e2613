//! virtio-blk request parsing and execution (virtio 1.2 §5.2.6).
//!
//! A chain is seen as two byte streams, as the spec asks (no assumption on how the driver
//! splits it into descriptors): the device-readable part (16-byte header, then OUT data or
//! discard segments) and the device-writable part (IN data or the id string, then the status
//! byte, which is the last byte of the last descriptor).

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice,
};

use super::device::BlockCounters;
use super::{
    features, request_status as status, request_type as rtype, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, SEG_MAX,
};
use crate::cast::u64_to_usize;
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
    /// The disk failed (or went away) while running a well-formed request.
    IoErr(String),
    /// The driver broke the request's rules (layout, range, lengths); IOERR too.
    Malformed(String),
    Unsupp(u32),
}

type Outcome = Result<u32, (Failure, u32)>;

/// Pieces of a split request end on multiples of this many disk bytes (the largest qcow2
/// cluster), so that a split never cuts a cluster in two.
const PIECE_ALIGN: u64 = 2 << 20;

/// A request's data transfer, done in pieces within each turn's byte budget.
#[derive(Clone, Copy)]
enum Work {
    /// IN: `len` bytes from `offset` into the device-writable segments.
    Read { offset: u64, len: u64 },
    /// OUT: `len` bytes at `offset` from the device-readable segments after the header.
    Write { offset: u64, len: u64 },
    /// DISCARD (`zero` false) or WRITE_ZEROES of the handler's first `count` `ranges`.
    Ranges {
        zero: bool,
        count: usize,
        /// The range being worked on.
        index: usize,
    },
}

/// What parsing a request came to.
enum Parsed {
    /// Done already (FLUSH, GET_ID): the data bytes written to the driver's buffers.
    Done(u32),
    Work(Work),
}

/// A request whose transfer goes on over several turns. Its segments stay in the
/// handler's `readable` / `writable` until it is done.
struct InFlight {
    head: u16,
    status_addr: GuestAddress,
    work: Work,
    /// Bytes of the transfer done (of the current range for `Ranges`).
    done: u64,
}

/// The bytes a FLUSH counts for against a turn's budget: an fdatasync can take as long as
/// writing that much.
const FLUSH_COST: u64 = 1 << 20;

fn ioerr(msg: impl Into<String>) -> (Failure, u32) {
    (Failure::IoErr(msg.into()), 0)
}

/// The used length of a read: `execute` refuses reads whose length does not fit.
fn used_len(len: u64) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn malformed(msg: impl Into<String>) -> (Failure, u32) {
    (Failure::Malformed(msg.into()), 0)
}

/// The disk behind the device (its medium), whatever its format. Data moves through the
/// backend's `read_vectored` / `write_vectored` on guest memory: raw files and qcow2 data
/// clusters go straight between the file and guest memory (preadv/pwritev).
pub type Disk = Box<dyn DiskBackend>;

/// A chain whose descriptors the handler holds, not yet handled.
pub(super) struct Collected {
    pub(super) head: u16,
    end: ChainEnd,
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
    /// DISCARD / WRITE_ZEROES segments: (offset, len, unmap).
    ranges: [(u64, u64, bool); MAX_DISCARD_SEG as usize],
    in_flight: Option<InFlight>,
    pub(super) counters: Arc<BlockCounters>,
}

impl RequestHandler {
    pub(super) fn new(disk: Disk, read_only: bool, serial: [u8; SERIAL_LEN]) -> Self {
        let capacity = disk.as_ref().len() / SECTOR_SIZE * SECTOR_SIZE;
        RequestHandler {
            disk,
            read_only,
            serial,
            capacity,
            acked_features: 0,
            descs: Vec::new(),
            readable: Vec::new(),
            writable: Vec::new(),
            ranges: [(0, 0, false); MAX_DISCARD_SEG as usize],
            in_flight: None,
            counters: Arc::default(),
        }
    }

    /// Takes the descriptors of `chain`, to be handled by
    /// [`RequestHandler::handle_collected`] (or given back to the ring when the rate limiter
    /// refuses its [`RequestHandler::data_len`]).
    pub(super) fn collect(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Collected {
        let head = chain.head_index();
        Collected {
            head,
            end: collect_chain(chain, &mut self.descs),
        }
    }

    /// The data bytes of the collected chain, as its descriptors say (everything but the
    /// 16-byte header and the status byte; not validated): what the bandwidth limit counts.
    pub(super) fn data_len(&self) -> u64 {
        let (mut readable, mut writable) = (0u64, 0u64);
        for d in &self.descs {
            let n = if d.is_write_only() {
                &mut writable
            } else {
                &mut readable
            };
            *n = n.saturating_add(u64::from(d.len()));
        }
        readable
            .saturating_sub(HEADER_LEN)
            .saturating_add(writable.saturating_sub(1))
    }

    /// Handles the chain [`RequestHandler::collect`] took, moving at most `budget` bytes of data (taken off it). Returns the
    /// used length (bytes written to the driver's buffers, status byte included; 0 when the
    /// chain has no usable status byte and nothing was written), or None when the request
    /// is larger than the budget left: it goes on with [`RequestHandler::resume`], and no
    /// other chain may be taken meanwhile.
    pub(super) fn handle_collected(
        &mut self,
        mem: &GuestMemoryMmap,
        collected: Collected,
        budget: &mut u64,
    ) -> Option<u32> {
        let descs = std::mem::take(&mut self.descs);
        let used = self.handle_descs(mem, collected.head, &descs, collected.end, budget);
        self.descs = descs;
        used
    }

    /// Whether a request is split over turns.
    pub(super) fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Goes on with the request in flight within `budget` bytes; once it is done, its head
    /// index and used length.
    pub(super) fn resume(&mut self, mem: &GuestMemoryMmap, budget: &mut u64) -> Option<(u16, u32)> {
        let mut f = self.in_flight.take()?;
        match self.run(mem, &mut f.work, &mut f.done, budget) {
            Some(outcome) => Some((f.head, self.complete(mem, f.head, f.status_addr, outcome))),
            None => {
                self.in_flight = Some(f);
                None
            }
        }
    }

    /// Ends the request in flight with IOERR (its medium is going away); its head index and
    /// used length.
    pub(super) fn fail_in_flight(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let f = self.in_flight.take()?;
        let written = match f.work {
            // Any part of the buffers may have been written.
            Work::Read { len, .. } => used_len(len),
            _ => 0,
        };
        let outcome = Err((
            Failure::IoErr("the medium changed while the request was in progress".into()),
            written,
        ));
        Some((f.head, self.complete(mem, f.head, f.status_addr, outcome)))
    }

    /// Forgets the request in flight (the driver reset the device).
    pub(super) fn abandon(&mut self) {
        self.in_flight = None;
    }

    fn handle_descs(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        descs: &[Descriptor],
        end: ChainEnd,
        budget: &mut u64,
    ) -> Option<u32> {
        if end == ChainEnd::Broken {
            rate_limited_warn!(
                "virtio-blk: chain at descriptor {} loops, is longer than the queue or points outside guest memory; returned unanswered",
                head
            );
            self.counters.invalid_reqs_count.fetch_add(1, Relaxed);
            return Some(0);
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
            self.counters.invalid_reqs_count.fetch_add(1, Relaxed);
            return Some(0);
        };
        let outcome = match self.execute(mem, descs, budget) {
            Ok(Parsed::Done(n)) => Ok(n),
            Err(e) => Err(e),
            Ok(Parsed::Work(mut work)) => {
                let mut done = 0;
                match self.run(mem, &mut work, &mut done, budget) {
                    Some(outcome) => outcome,
                    None => {
                        self.in_flight = Some(InFlight {
                            head,
                            status_addr,
                            work,
                            done,
                        });
                        return None;
                    }
                }
            }
        };
        Some(self.complete(mem, head, status_addr, outcome))
    }

    /// Writes the status byte for `outcome`; returns the used length.
    fn complete(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        status_addr: GuestAddress,
        outcome: Outcome,
    ) -> u32 {
        let (status, written) = match outcome {
            Ok(written) => (status::OK, written),
            Err((failure, written)) => {
                let status = match failure {
                    Failure::IoErr(msg) => {
                        rate_limited_warn!("virtio-blk: request {} failed: {}", head, msg);
                        self.counters.execute_fails.fetch_add(1, Relaxed);
                        status::IOERR
                    }
                    Failure::Malformed(msg) => {
                        rate_limited_warn!("virtio-blk: request {} is malformed: {}", head, msg);
                        self.counters.invalid_reqs_count.fetch_add(1, Relaxed);
                        status::IOERR
                    }
                    Failure::Unsupp(t) => {
                        rate_limited_warn!("virtio-blk: request type {} not supported", t);
                        self.counters.invalid_reqs_count.fetch_add(1, Relaxed);
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

    /// Moves `work` on from `*done` within `budget` bytes. Some(outcome) once it is done
    /// (or failed), None when the budget ran out first.
    fn run(
        &mut self,
        mem: &GuestMemoryMmap,
        work: &mut Work,
        done: &mut u64,
        budget: &mut u64,
    ) -> Option<Outcome> {
        loop {
            let (pos, left) = match *work {
                Work::Read { offset, len } | Work::Write { offset, len } => {
                    (offset + *done, len - *done)
                }
                Work::Ranges { count, index, .. } => {
                    if index == count {
                        (0, 0)
                    } else {
                        let (offset, len, _) = self.ranges[index];
                        (offset + *done, len - *done)
                    }
                }
            };
            if left == 0 {
                match work {
                    // An empty segment: on to the next one.
                    Work::Ranges { count, index, .. } if *index < *count => {
                        *index += 1;
                        *done = 0;
                        continue;
                    }
                    _ => return Some(self.finish(work)),
                }
            }
            let n = piece(pos, left, *budget)?;
            *budget -= n;
            let r = match *work {
                Work::Read { len, .. } => {
                    let r = guest_slices(mem, &self.writable, *done, n)
                        .map_err(|_| io::Error::other("cannot map guest memory"))
                        .and_then(|slices| self.disk.as_mut().read_vectored(pos, &slices));
                    // On failure any part may have been written: report it all.
                    r.map_err(|e| (Failure::IoErr(format!("read at {pos}: {e}")), used_len(len)))
                }
                Work::Write { .. } => guest_slices(mem, &self.readable, HEADER_LEN + *done, n)
                    .map_err(|_| io::Error::other("cannot map guest memory"))
                    .and_then(|slices| self.disk.as_mut().write_vectored(pos, &slices))
                    .map_err(|e| ioerr(format!("write at {pos}: {e}"))),
                Work::Ranges { zero, index, .. } => {
                    let r = if zero {
                        self.disk
                            .as_mut()
                            .write_zeroes(pos, n, self.ranges[index].2)
                    } else {
                        self.disk.as_mut().discard(pos, n)
                    };
                    r.map_err(|e| ioerr(format!("discard/write-zeroes at {pos}+{n}: {e}")))
                }
            };
            if let Err(e) = r {
                return Some(Err(e));
            }
            *done += n;
            if let Work::Ranges { ref mut index, .. } = work {
                if *done == self.ranges[*index].1 {
                    *index += 1;
                    *done = 0;
                }
            }
        }
    }

    /// The end of a transfer that went through.
    fn finish(&mut self, work: &Work) -> Outcome {
        match *work {
            Work::Read { len, .. } => {
                let c = &self.counters;
                c.read_count.fetch_add(1, Relaxed);
                c.read_bytes.fetch_add(len, Relaxed);
                Ok(used_len(len))
            }
            Work::Write { len, .. } => {
                self.write_through()?;
                let c = &self.counters;
                c.write_count.fetch_add(1, Relaxed);
                c.write_bytes.fetch_add(len, Relaxed);
                Ok(0)
            }
            Work::Ranges { .. } => {
                self.write_through()?;
                Ok(0)
            }
        }
    }

    /// Validates the layout of the chain and parses the request; FLUSH and GET_ID are run
    /// here (a flush takes `FLUSH_COST` off `budget`). Err((_, n)): n bytes of data were
    /// written to the driver's buffers.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
        budget: &mut u64,
    ) -> Result<Parsed, (Failure, u32)> {
        if descs.len() as u64 > u64::from(SEG_MAX) + 2 {
            return Err(malformed(format!(
                "chain of {} descriptors exceeds seg_max {} + 2",
                descs.len(),
                SEG_MAX
            )));
        }
        self.readable.clear();
        self.writable.clear();
        for d in descs {
            let len = u64::from(d.len());
            if !mem.check_range(d.addr(), u64_to_usize(len), Permissions::ReadWrite) {
                return Err(malformed(format!(
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
                return Err(malformed(
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

        let mut header = [0u8; u64_to_usize(HEADER_LEN)];
        if readable_len < HEADER_LEN {
            return Err(malformed(format!(
                "device-readable part is {readable_len} bytes, shorter than the 16-byte header"
            )));
        }
        gather(mem, &self.readable, 0, &mut header)
            .map_err(|_| malformed("cannot read the request header"))?;
        let req_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let out_len = readable_len - HEADER_LEN;

        match req_type {
            rtype::IN => {
                if out_len != 0 {
                    return Err(malformed("IN request with device-readable data"));
                }
                // The used length is 32 bits (virtio 1.2 §2.7.8) and counts the status byte:
                // a read it cannot report is refused (descriptors may repeat one buffer, so
                // the sum is not bounded by guest memory).
                if writable_len >= u64::from(u32::MAX) {
                    return Err(malformed(format!(
                        "IN request of {writable_len} bytes; at most {} fit a used length",
                        u32::MAX - 1
                    )));
                }
                let offset = self.check_range(sector, writable_len)?;
                Ok(Parsed::Work(Work::Read {
                    offset,
                    len: writable_len,
                }))
            }
            rtype::OUT => {
                if writable_len != 0 {
                    return Err(malformed("OUT request with device-writable data"));
                }
                if self.read_only {
                    return Err(malformed("write to a read-only disk"));
                }
                let offset = self.check_range(sector, out_len)?;
                Ok(Parsed::Work(Work::Write {
                    offset,
                    len: out_len,
                }))
            }
            rtype::FLUSH => {
                if out_len != 0 || writable_len != 0 {
                    return Err(malformed("FLUSH request with data"));
                }
                // The status is written by our caller only after this returns: a flush is on
                // stable storage before the driver can see it complete.
                *budget = budget.saturating_sub(FLUSH_COST);
                self.disk
                    .as_mut()
                    .flush()
                    .map_err(|e| ioerr(format!("flush: {e}")))?;
                self.counters.flush_count.fetch_add(1, Relaxed);
                Ok(Parsed::Done(0))
            }
            rtype::GET_ID => {
                if out_len != 0 {
                    return Err(malformed("GET_ID request with device-readable data"));
                }
                let n = SERIAL_LEN.min(usize::try_from(writable_len).unwrap_or(usize::MAX));
                scatter(mem, &self.writable, 0, &self.serial[..n])
                    .map_err(|_| malformed("cannot write the id"))?;
                Ok(Parsed::Done(used_len(n as u64)))
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
                    return Err(malformed(
                        "DISCARD/WRITE_ZEROES request with device-writable data",
                    ));
                }
                if self.read_only {
                    return Err(malformed("discard or write-zeroes on a read-only disk"));
                }
                let work = self.discard_or_zero(mem, req_type, out_len, max_sectors, max_seg)?;
                Ok(Parsed::Work(work))
            }
            other => Err((Failure::Unsupp(other), 0)),
        }
    }

    /// Byte offset of `sector`, after checking that `len` bytes from there are whole
    /// sectors inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, (Failure, u32)> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(malformed(format!(
                "data length {len} is not a multiple of 512"
            )));
        }
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|off| off.checked_add(len).is_some_and(|end| end <= self.capacity))
            .ok_or_else(|| {
                malformed(format!(
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
                .as_mut()
                .flush()
                .map_err(|e| ioerr(format!("write-through flush: {e}")))?;
        }
        Ok(())
    }

    /// Reads and checks the segments of a DISCARD or WRITE_ZEROES request.
    fn discard_or_zero(
        &mut self,
        mem: &GuestMemoryMmap,
        req_type: u32,
        segs_len: u64,
        max_sectors: u32,
        max_seg: u32,
    ) -> Result<Work, (Failure, u32)> {
        let count = segs_len / DISCARD_SEGMENT_LEN;
        if segs_len == 0
            || !segs_len.is_multiple_of(DISCARD_SEGMENT_LEN)
            || count > u64::from(max_seg)
        {
            return Err(malformed(format!(
                "{segs_len} bytes of discard segments (max {max_seg} of 16 bytes)"
            )));
        }
        for i in 0..count as usize {
            let mut raw = [0u8; u64_to_usize(DISCARD_SEGMENT_LEN)];
            gather(
                mem,
                &self.readable,
                HEADER_LEN + i as u64 * DISCARD_SEGMENT_LEN,
                &mut raw,
            )
            .map_err(|_| malformed("cannot read discard segment"))?;
            let sector = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
            let num_sectors = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
            // virtio 1.2 §5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP.
            if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 || (req_type == rtype::DISCARD && flags != 0) {
                return Err((Failure::Unsupp(req_type), 0));
            }
            if num_sectors > max_sectors {
                return Err(malformed(format!(
                    "{num_sectors} sectors exceed the limit of {max_sectors}"
                )));
            }
            let len = u64::from(num_sectors) * SECTOR_SIZE;
            let offset = self.check_range(sector, len)?;
            self.ranges[i] = (offset, len, flags & WRITE_ZEROES_FLAG_UNMAP != 0);
        }
        Ok(Work::Ranges {
            zero: req_type == rtype::WRITE_ZEROES,
            count: count as usize,
            index: 0,
        })
    }
}

/// How many of the `left` bytes from disk offset `pos` to move now, with `budget` bytes
/// left in this turn: all of them if they fit, else up to the last `PIECE_ALIGN` boundary
/// the budget reaches; None if it reaches none (a fresh turn's budget always does).
fn piece(pos: u64, left: u64, budget: u64) -> Option<u64> {
    if left <= budget {
        return Some(left);
    }
    let end = pos.checked_add(budget)? / PIECE_ALIGN * PIECE_ALIGN;
    (end > pos).then(|| end - pos)
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
        let n = u64_to_usize(avail.min((len - done) as u64));
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
