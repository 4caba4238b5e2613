//! The receive path (tap -> guest): a frame is read from the tap into one reused buffer only
//! when the tap is readable and the driver has posted at least one receive buffer, then
//! copied into as many buffers as it needs (one without MRG_RXBUF).

use std::collections::VecDeque;
use std::io;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::device::{bump, notify_used, Active, NetCounters, BUDGET};
use super::{
    features as net, Net, HDR_LEN, HDR_NUM_BUFFERS, MAX_FRAME_LEN, MIN_FRAME_LEN, RX_QUEUE,
};
use crate::virtio::queue::{collect_chain, pop_chain, ChainEnd};

/// A device-writable receive chain the device took from the avail ring.
struct RxChain {
    head: u16,
    segs: Vec<(GuestAddress, u32)>,
    capacity: u32,
}

/// Receive state kept across calls.
pub(super) struct Rx {
    /// One frame with its header; `pending` bytes of it wait for buffers.
    frame: Vec<u8>,
    pending: usize,
    /// The tap may have frames (edge-triggered: true until a read says EAGAIN).
    pub(super) tap_readable: bool,
    /// Chains taken from the avail ring, not yet used.
    chains: VecDeque<RxChain>,
    capacity: u64,
    /// Segment vectors of used chains, reused.
    spare: Vec<Vec<(GuestAddress, u32)>>,
    /// The driver is asked to notify the rx queue (we ran out of buffers).
    pub(super) notify: bool,
    /// The MMDS's turn for the next frame, when both it and the tap have one.
    mmds_turn: bool,
}

impl Rx {
    pub(super) fn new() -> Rx {
        Rx {
            frame: vec![0u8; HDR_LEN + MAX_FRAME_LEN],
            pending: 0,
            tap_readable: false,
            chains: VecDeque::new(),
            capacity: 0,
            spare: Vec::new(),
            notify: true,
            mmds_turn: true,
        }
    }

    /// The driver reset the device: a frame waiting for buffers is dropped, the chains
    /// taken are forgotten (the driver owns its rings again).
    pub(super) fn reset(&mut self, counters: &NetCounters) {
        if self.pending != 0 {
            bump(&counters.rx_dropped, 1);
        }
        self.pending = 0;
        self.tap_readable = false;
        self.chains.clear();
        self.capacity = 0;
        self.notify = true;
    }
}

impl Net {
    pub(super) fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.failed {
            return;
        }
        let rx = &mut self.rx;
        let mrg = active.acked & net::MRG_RXBUF != 0;
        let queue_size = active.rx.size();
        // Frames read from the tap in this call, delivered or dropped.
        let mut frames = 0u32;
        let mut used = false;
        let mut waiting = false;
        loop {
            if frames >= BUDGET {
                // Come back through the event loop.
                if let Err(e) = active.queue_evts[RX_QUEUE].write(1) {
                    rate_limited_warn!("virtio-net: cannot reschedule rx: {}", e);
                } else {
                    break;
                }
            }
            if rx.pending == 0 {
                let mmds_ready = self.mmds.as_ref().is_some_and(|m| m.has_frame());
                if !rx.tap_readable && !mmds_ready {
                    break;
                }
                // Read only with a buffer to put the frame in.
                if rx.chains.is_empty() {
                    match take_rx_chain(active, rx, &self.counters, &mut self.descs, &mut used) {
                        Ok(Taken::Chain) => continue,
                        Ok(Taken::Bad) => {
                            // Returned unused: it counts against the budget all the same.
                            frames += 1;
                            continue;
                        }
                        Ok(Taken::Empty) => {}
                        Err(()) => return,
                    }
                    match wait_for_buffers(active, rx) {
                        Ok(true) => continue,
                        Ok(false) => {
                            waiting = true;
                            break;
                        }
                        Err(()) => return,
                    }
                }
                if let Some(stack) = self.mmds.as_mut().filter(|_| mmds_ready) {
                    if rx.mmds_turn || !rx.tap_readable {
                        // Not rate limited: the MMDS answers only what the guest asked.
                        rx.mmds_turn = false;
                        rx.frame[..HDR_LEN].fill(0);
                        match stack.write_frame(&mut rx.frame[HDR_LEN..]) {
                            Some(n) => rx.pending = HDR_LEN + n,
                            None => break,
                        }
                        continue;
                    }
                }
                rx.mmds_turn = true;
                if let Some(limiter) = self.rx_limiter.as_mut() {
                    // A frame's size is known once read: admit on the tokens there are, charge
                    // its bytes after (a debt that the next frames wait out).
                    if !limiter.admit(1, 0) {
                        // The frames stay in the tap until the limiter's timer.
                        bump(&self.counters.rx_rate_limiter_throttled, 1);
                        break;
                    }
                }
                match self.tap.read(&mut rx.frame) {
                    Ok(n) if n > rx.frame.len() || n < HDR_LEN + MIN_FRAME_LEN => {
                        // Dropped frames count against the budget too.
                        frames += 1;
                        bump(&self.counters.rx_dropped, 1);
                        rate_limited_warn!(
                            "virtio-net: tap {} gave a {}-byte frame; dropped",
                            self.tap.name(),
                            n
                        );
                        continue;
                    }
                    Ok(n) => {
                        rx.pending = n;
                        if let Some(limiter) = self.rx_limiter.as_mut() {
                            limiter.charge(1, (n - HDR_LEN) as u64);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        rx.tap_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        rate_limited_warn!("virtio-net: reading tap {}: {}", self.tap.name(), e);
                        rx.tap_readable = false;
                        break;
                    }
                }
            }
            // Enough buffers for the pending frame?
            let need = rx.pending as u64;
            let enough = |rx: &Rx| match rx.chains.front() {
                None => false,
                Some(first) => {
                    if mrg {
                        rx.capacity >= need
                    } else {
                        u64::from(first.capacity) >= need
                    }
                }
            };
            if !enough(rx) {
                if !mrg && !rx.chains.is_empty() {
                    // virtio 1.2 §5.1.6.3.1: without MRG_RXBUF the driver posts buffers that
                    // hold any frame; this one does not.
                    bump(&self.counters.rx_dropped, 1);
                    rate_limited_warn!(
                        "virtio-net: {}-byte frame does not fit the {}-byte rx buffer; dropped",
                        need,
                        rx.chains.front().map_or(0, |c| c.capacity)
                    );
                    rx.pending = 0;
                    frames += 1;
                    continue;
                }
                match take_rx_chain(active, rx, &self.counters, &mut self.descs, &mut used) {
                    Ok(Taken::Chain) => continue,
                    Ok(Taken::Bad) => {
                        frames += 1;
                        continue;
                    }
                    Ok(Taken::Empty) => {}
                    Err(()) => return,
                }
                if rx.chains.len() >= usize::from(queue_size) {
                    // Every buffer the ring can hold is here and the frame still does not fit.
                    bump(&self.counters.rx_dropped, 1);
                    rate_limited_warn!(
                        "virtio-net: {}-byte frame exceeds all {} posted rx bytes; dropped",
                        need,
                        rx.capacity
                    );
                    rx.pending = 0;
                    frames += 1;
                    continue;
                }
                match wait_for_buffers(active, rx) {
                    Ok(true) => continue,
                    Ok(false) => {
                        waiting = true;
                        break;
                    }
                    Err(()) => return,
                }
            }
            if deliver(active, rx, mrg, &self.counters).is_err() {
                return;
            }
            used = true;
            frames += 1;
        }
        // While buffers last the driver need not tell us about new ones.
        if rx.notify && !waiting {
            if let Err(e) = active.rx.disable_notification(&active.mem) {
                rate_limited_warn!("virtio-net: rx used ring unusable: {}", e);
                active.failed = true;
                active.interrupt.set_needs_reset();
                return;
            }
            rx.notify = false;
        }
        if used {
            notify_used(&mut active.rx, &active.mem, &active.interrupt, RX_QUEUE);
        }
    }
}

/// What [`take_rx_chain`] found on the avail ring.
enum Taken {
    Empty,
    /// A usable chain, now in `rx.chains`.
    Chain,
    /// A malformed chain, returned to the driver with length 0.
    Bad,
}

/// Takes the next receive chain from the avail ring into `rx.chains`. Err: the ring is
/// unusable (the device now needs a reset).
fn take_rx_chain(
    active: &mut Active,
    rx: &mut Rx,
    counters: &NetCounters,
    descs: &mut Vec<Descriptor>,
    used: &mut bool,
) -> Result<Taken, ()> {
    let chain = match pop_chain(&mut active.rx, &active.mem) {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(Taken::Empty),
        Err(e) => {
            rate_limited_warn!("virtio-net: rx {}; the device needs a reset", e);
            active.failed = true;
            active.interrupt.set_needs_reset();
            return Err(());
        }
    };
    let head = chain.head_index();
    let end = collect_chain(chain, descs);
    let mut segs = rx.spare.pop().unwrap_or_default();
    segs.clear();
    let mut capacity = 0u64;
    let mut bad = None;
    if end == ChainEnd::Broken {
        bad = Some("the chain is broken (loop, too long, or outside guest memory)".to_owned());
    }
    for d in descs.iter() {
        if bad.is_some() {
            break;
        }
        if !d.is_write_only() {
            bad = Some("a device-readable descriptor".to_owned());
        } else if !active
            .mem
            .check_range(d.addr(), d.len() as usize, Permissions::Write)
        {
            bad = Some(format!(
                "buffer {:#x}+{:#x} is outside guest memory",
                d.addr().0,
                d.len()
            ));
        } else if d.len() > 0 {
            segs.push((d.addr(), d.len()));
            capacity += u64::from(d.len());
        }
    }
    if bad.is_none() && capacity < HDR_LEN as u64 {
        bad = Some(format!("{capacity} bytes cannot hold a header"));
    }
    if let Some(why) = bad {
        bump(&counters.rx_bad_chains, 1);
        rate_limited_warn!("virtio-net: rx chain {} returned unused: {}", head, why);
        recycle(&mut rx.spare, segs);
        if let Err(e) = active.rx.add_used(&active.mem, head, 0) {
            rate_limited_warn!("virtio-net: rx used ring unusable: {}", e);
            active.failed = true;
            active.interrupt.set_needs_reset();
            return Err(());
        }
        *used = true;
        return Ok(Taken::Bad);
    }
    // At most 4 GiB per chain (collect_chain stops beyond); a used length is 32 bits.
    let capacity = u32::try_from(capacity).unwrap_or(u32::MAX);
    rx.capacity += u64::from(capacity);
    rx.chains.push_back(RxChain {
        head,
        segs,
        capacity,
    });
    Ok(Taken::Chain)
}

/// Segments kept per spare vector: a chain of thousands of descriptors (an indirect table)
/// must not leave its vector's memory behind for good.
const SPARE_SEGS: usize = 64;

fn recycle(spare: &mut Vec<Vec<(GuestAddress, u32)>>, mut segs: Vec<(GuestAddress, u32)>) {
    segs.clear();
    segs.shrink_to(SPARE_SEGS);
    spare.push(segs);
}

/// No more buffers: asks the driver to notify the rx queue. Ok(true) if buffers arrived
/// meanwhile.
fn wait_for_buffers(active: &mut Active, rx: &mut Rx) -> Result<bool, ()> {
    rx.notify = true;
    match active.rx.enable_notification(&active.mem) {
        Ok(more) => Ok(more),
        Err(e) => {
            rate_limited_warn!("virtio-net: rx used ring unusable: {}", e);
            active.failed = true;
            active.interrupt.set_needs_reset();
            Err(())
        }
    }
}

/// Copies the pending frame into the first chain(s) (the caller checked they hold it) and
/// returns them to the driver.
fn deliver(active: &mut Active, rx: &mut Rx, mrg: bool, counters: &NetCounters) -> Result<(), ()> {
    let len = rx.pending;
    // How many chains the frame spans.
    let mut count = 0u16;
    let mut room = 0u64;
    for c in &rx.chains {
        count += 1;
        room += u64::from(c.capacity);
        if room >= len as u64 || !mrg {
            break;
        }
    }
    // virtio 1.2 §5.1.6.4: num_buffers is 1 without MRG_RXBUF.
    rx.frame[HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
    let mut off = 0usize;
    for _ in 0..count {
        let chain = rx.chains.pop_front().expect("counted above");
        rx.capacity -= u64::from(chain.capacity);
        let mut written = 0u32;
        for &(addr, seg_len) in &chain.segs {
            if off == len {
                break;
            }
            let n = (seg_len as usize).min(len - off);
            // The range was checked when the chain was taken; guest memory does not shrink.
            if active
                .mem
                .write_slice(&rx.frame[off..off + n], addr)
                .is_err()
            {
                rate_limited_warn!("virtio-net: cannot write rx buffer at {:#x}", addr.0);
            }
            off += n;
            // At most seg_len, a u32.
            #[allow(clippy::cast_possible_truncation)]
            let n = n as u32;
            written += n;
        }
        recycle(&mut rx.spare, chain.segs);
        if let Err(e) = active.rx.add_used(&active.mem, chain.head, written) {
            rate_limited_warn!("virtio-net: rx used ring unusable: {}", e);
            active.failed = true;
            active.interrupt.set_needs_reset();
            return Err(());
        }
    }
    bump(&counters.rx_frames, 1);
    bump(&counters.rx_bytes, (len - HDR_LEN) as u64);
    rx.pending = 0;
    Ok(())
}
