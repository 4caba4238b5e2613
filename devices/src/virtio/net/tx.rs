//! The transmit path (guest -> tap): each chain is checked (device-readable only, inside
//! guest memory, header and frame lengths), then the header (copied, so the kernel sees what
//! was checked) and the frame (straight from guest memory) go to the tap in one writev.

use std::io;
use std::time::Instant;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::device::{bump, notify_used, BUDGET};
use super::{
    features as net, gso, hdr_flags, Net, HDR_LEN, MAX_FRAME_LEN, MIN_FRAME_LEN, TX_QUEUE,
};
use crate::cast::u64_to_usize;
use crate::mmds::MmdsStack;
use crate::tap::Tap;
use crate::virtio::queue::{collect_chain, pop_chain, undo_pop, ChainEnd};

/// Most descriptors one transmitted frame may have (writev takes at most UIO_MAXIOV
/// iovecs, one of which is the header).
const MAX_TX_DESCS: usize = 1023;
/// Why a transmit chain was not sent.
enum TxDrop {
    Malformed(String),
    TapError(io::Error),
}

impl Net {
    pub(super) fn process_tx(&mut self) {
        let detoured = self.transmit_queue();
        // Answers the MMDS has for the guest go out now if it has buffers for them.
        if detoured && self.mmds.as_ref().is_some_and(|m| m.has_frame()) {
            self.process_rx();
        }
    }

    /// Works the transmit queue; true if a frame went to the MMDS.
    fn transmit_queue(&mut self) -> bool {
        let mut detoured = false;
        let Some(active) = self.active.as_mut() else {
            return detoured;
        };
        if active.failed {
            return detoured;
        }
        let mut sent = 0u32;
        let mut used = false;
        'work: loop {
            if let Err(e) = active.tx.disable_notification(&active.mem) {
                rate_limited_warn!("virtio-net: tx used ring unusable: {}", e);
                active.failed = true;
                active.interrupt.set_needs_reset();
                return detoured;
            }
            loop {
                if sent >= BUDGET {
                    if let Err(e) = active.queue_evts[TX_QUEUE].write(1) {
                        rate_limited_warn!("virtio-net: cannot reschedule tx: {}", e);
                    } else {
                        break 'work;
                    }
                }
                let chain = match pop_chain(&mut active.tx, &active.mem) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        rate_limited_warn!("virtio-net: tx {}; the device needs a reset", e);
                        active.failed = true;
                        active.interrupt.set_needs_reset();
                        return detoured;
                    }
                };
                let head = chain.head_index();
                let end = collect_chain(chain, &mut self.descs);
                let for_mmds = self.mmds.as_mut().is_some_and(|stack| {
                    detour(stack, &active.mem, &self.descs, end, &mut self.mmds_frame)
                });
                if for_mmds {
                    detoured = true;
                    sent += 1;
                    if let Err(e) = active.tx.add_used(&active.mem, head, 0) {
                        rate_limited_warn!("virtio-net: tx used ring unusable: {}", e);
                        active.failed = true;
                        active.interrupt.set_needs_reset();
                        return detoured;
                    }
                    used = true;
                    continue;
                }
                if let Some(limiter) = self.tx_limiter.as_mut() {
                    if !limiter.try_consume(1, frame_len(&self.descs)) {
                        // The frame stays in the ring, and notifications stay off, until the
                        // limiter's timer brings us back.
                        undo_pop(&mut active.tx);
                        bump(&self.counters.tx_rate_limiter_throttled, 1);
                        break 'work;
                    }
                }
                match transmit(&self.tap, &active.mem, active.acked, &self.descs, end) {
                    Ok(frame_len) => {
                        bump(&self.counters.tx_frames, 1);
                        bump(&self.counters.tx_bytes, frame_len as u64);
                    }
                    Err(TxDrop::Malformed(why)) => {
                        bump(&self.counters.tx_malformed, 1);
                        rate_limited_warn!("virtio-net: tx chain {} dropped: {}", head, why);
                    }
                    Err(TxDrop::TapError(e)) => {
                        bump(&self.counters.tx_errors, 1);
                        rate_limited_warn!(
                            "virtio-net: tap {} refused a frame: {}",
                            self.tap.name(),
                            e
                        );
                    }
                }
                sent += 1;
                if let Err(e) = active.tx.add_used(&active.mem, head, 0) {
                    rate_limited_warn!("virtio-net: tx used ring unusable: {}", e);
                    active.failed = true;
                    active.interrupt.set_needs_reset();
                    return detoured;
                }
                used = true;
            }
            match active.tx.enable_notification(&active.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    rate_limited_warn!("virtio-net: tx used ring unusable: {}", e);
                    active.failed = true;
                    active.interrupt.set_needs_reset();
                    return detoured;
                }
            }
        }
        if used {
            notify_used(&mut active.tx, &active.mem, &active.interrupt, TX_QUEUE);
        }
        detoured
    }
}

/// Copies up to `out.len()` bytes of a transmit chain (header first) out of guest memory;
/// None for a chain `transmit` will refuse anyway.
fn read_chain(mem: &GuestMemoryMmap, descs: &[Descriptor], out: &mut [u8]) -> Option<usize> {
    let mut got = 0usize;
    for d in descs {
        if got == out.len() {
            break;
        }
        if d.is_write_only() {
            return None;
        }
        let n = (d.len() as usize).min(out.len() - got);
        mem.read_slice(&mut out[got..got + n], d.addr()).ok()?;
        got += n;
    }
    Some(got)
}

/// Hands the frame to the MMDS if it is for it (ARP for its address, IPv4 to it); true if
/// it took it. The decision is made on a copy of the headers and the MMDS parses its own
/// copy of the frame, so later changes by the guest to its buffers change nothing here.
fn detour(
    stack: &mut MmdsStack,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    end: ChainEnd,
    frame: &mut Vec<u8>,
) -> bool {
    if end == ChainEnd::Broken || descs.len() > MAX_TX_DESCS {
        return false;
    }
    // The Ethernet header and the ARP target / IPv4 destination address.
    let mut head = [0u8; HDR_LEN + 42];
    match read_chain(mem, descs, &mut head) {
        Some(n) if n > HDR_LEN && stack.is_mmds_frame(&head[HDR_LEN..n]) => {}
        _ => return false,
    }
    let total = descs
        .iter()
        .fold(0usize, |n, d| n.saturating_add(d.len() as usize));
    if total > HDR_LEN + MAX_FRAME_LEN {
        rate_limited_warn!("mmds: {}-byte frame dropped (max {})", total, MAX_FRAME_LEN);
        return true;
    }
    frame.resize(total, 0);
    if read_chain(mem, descs, frame) != Some(total) {
        return false;
    }
    let partial = frame[0] & hdr_flags::NEEDS_CSUM != 0;
    stack.note_detoured();
    stack.receive(&frame[HDR_LEN..], partial, Instant::now());
    true
}

/// The frame bytes of a transmit chain as its descriptors say (without the virtio-net
/// header; not validated): what the tx bandwidth limit counts.
fn frame_len(descs: &[Descriptor]) -> u64 {
    descs
        .iter()
        .fold(0u64, |n, d| n.saturating_add(u64::from(d.len())))
        .saturating_sub(HDR_LEN as u64)
}

/// Checks one transmit chain and writes its frame to the tap; returns the frame length
/// (without the header).
fn transmit(
    tap: &Tap,
    mem: &GuestMemoryMmap,
    acked: u64,
    descs: &[Descriptor],
    end: ChainEnd,
) -> Result<usize, TxDrop> {
    let bad = |s: String| Err(TxDrop::Malformed(s));
    if end == ChainEnd::Broken {
        return bad("the chain is broken (loop, too long, or outside guest memory)".into());
    }
    if descs.len() > MAX_TX_DESCS {
        return bad(format!("{} descriptors (max {MAX_TX_DESCS})", descs.len()));
    }
    let mut total = 0u64;
    for d in descs {
        if d.is_write_only() {
            return bad("a device-writable descriptor".into());
        }
        if !mem.check_range(d.addr(), d.len() as usize, Permissions::Read) {
            return bad(format!(
                "buffer {:#x}+{:#x} is outside guest memory",
                d.addr().0,
                d.len()
            ));
        }
        total += u64::from(d.len());
    }
    if total < HDR_LEN as u64 {
        return bad(format!(
            "{total} bytes, shorter than the {HDR_LEN}-byte header"
        ));
    }
    let frame_len = u64_to_usize(total - HDR_LEN as u64);
    if frame_len > MAX_FRAME_LEN {
        return bad(format!("{frame_len}-byte frame (max {MAX_FRAME_LEN})"));
    }
    if frame_len < MIN_FRAME_LEN {
        return bad(format!(
            "{frame_len}-byte frame, shorter than an Ethernet header"
        ));
    }

    // The header, copied so that the tap sees the bytes checked here.
    let mut hdr = [0u8; HDR_LEN];
    let mut got = 0usize;
    for d in descs {
        if got == HDR_LEN {
            break;
        }
        let n = (d.len() as usize).min(HDR_LEN - got);
        if mem.read_slice(&mut hdr[got..got + n], d.addr()).is_err() {
            return bad("cannot read the header".into());
        }
        got += n;
    }
    check_tx_header(&hdr, acked).map_err(TxDrop::Malformed)?;

    let mut guards = Vec::with_capacity(descs.len());
    let mut iovs = Vec::with_capacity(descs.len() + 1);
    iovs.push(libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_LEN,
    });
    let mut skip = HDR_LEN as u64;
    for d in descs {
        let len = u64::from(d.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        // Checked above; skip < len so the address does not overflow.
        let addr = GuestAddress(d.addr().0 + skip);
        let n = u64_to_usize(len - skip);
        skip = 0;
        for s in vm_memory::GuestMemoryBackend::get_slices(mem, addr, n) {
            let s = s.map_err(|e| TxDrop::Malformed(format!("guest memory: {e}")))?;
            let g = s.ptr_guard();
            iovs.push(libc::iovec {
                iov_base: g.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            });
            guards.push(g);
        }
    }
    if iovs.len() > 1024 {
        return bad(format!("{} pieces of guest memory", iovs.len()));
    }
    // SAFETY: the header is a local array and every other iovec points into guest memory,
    // which stays mapped while `mem` is borrowed; the guards live past the call.
    let written = unsafe { tap.writev(&iovs) }.map_err(TxDrop::TapError)?;
    drop(guards);
    if written != HDR_LEN + frame_len {
        return Err(TxDrop::TapError(io::Error::other(format!(
            "short write: {written} of {} bytes",
            HDR_LEN + frame_len
        ))));
    }
    Ok(frame_len)
}

/// The header asks only for offloads the driver negotiated (virtio 1.2 §5.1.6.2.1).
fn check_tx_header(hdr: &[u8; HDR_LEN], acked: u64) -> Result<(), String> {
    let flags = hdr[0];
    let gso_type = hdr[1];
    if flags & hdr_flags::NEEDS_CSUM != 0 && acked & net::CSUM == 0 {
        return Err("NEEDS_CSUM without VIRTIO_NET_F_CSUM".into());
    }
    let needed = match gso_type & !gso::ECN {
        gso::NONE => 0,
        gso::TCPV4 => net::HOST_TSO4,
        gso::TCPV6 => net::HOST_TSO6,
        other => return Err(format!("gso_type {other} is not supported")),
    };
    if needed != 0 && acked & needed == 0 {
        return Err(format!("gso_type {gso_type} was not negotiated"));
    }
    if gso_type & gso::ECN != 0 && acked & net::HOST_ECN == 0 {
        return Err("GSO ECN without VIRTIO_NET_F_HOST_ECN".into());
    }
    if gso_type & !gso::ECN != gso::NONE {
        let gso_size = u16::from_le_bytes([hdr[4], hdr[5]]);
        if gso_size == 0 {
            return Err("GSO frame with gso_size 0".into());
        }
    }
    Ok(())
}
