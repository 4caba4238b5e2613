//! The virtio-net device: features, config space, activation, the transmit path (guest ->
//! tap) and the receive path (tap -> guest).
//!
//! Receive: a frame is read from the tap into one reused buffer only when the tap is
//! readable and the driver has posted at least one receive buffer, then copied into as many
//! buffers as it needs (one without MRG_RXBUF). If the posted buffers are too few, the frame
//! waits in that buffer until the driver posts more (notifications are enabled just then);
//! everything else waits in the tap's own queue, so wisp's memory stays flat whatever the
//! guest does.
//!
//! Transmit: each chain is checked (device-readable only, inside guest memory, header and
//! frame lengths), then the header (copied, so the kernel sees what was checked) and the
//! frame (straight from guest memory) are written to the tap in one writev. The tap does
//! checksumming and segmentation as the header asks.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::{
    features as net, gso, hdr_flags, HDR_LEN, HDR_NUM_BUFFERS, MAX_FRAME_LEN, MIN_FRAME_LEN,
    QUEUE_SIZE, RX_QUEUE, STATUS_LINK_UP, TX_QUEUE,
};
use crate::tap::{offload, Tap, TapError};
use crate::virtio::queue::{collect_chain, pop_chain, ChainEnd};
use crate::virtio::{
    device_type, features, ActivateError, Activation, VirtioDevice, VirtioInterrupt,
};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("MAC address {mac} is multicast; a NIC needs a unicast address")]
    MulticastMac { mac: String },
    #[error("MTU {mtu} is out of range 68..=65535")]
    BadMtu { mtu: u16 },
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// Frames handled per queue per call before yielding to the event loop.
const BUDGET: u32 = 256;
/// Most descriptors one transmitted frame may have (writev takes at most UIO_MAXIOV
/// iovecs, one of which is the header).
const MAX_TX_DESCS: usize = 1023;
/// struct virtio_net_config up to mtu (virtio 1.2 §5.1.4).
const CONFIG_LEN: usize = 12;

/// Traffic counters, shared with whoever exposes them (e.g. as metrics).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames (and their bytes, without the virtio-net header) delivered to the guest.
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap that could not be delivered (larger than every buffer the
    /// driver can post, shorter than a header, or pending when the driver reset the device).
    pub rx_dropped: AtomicU64,
    /// Receive chains the driver malformed (device-readable descriptors, outside guest
    /// memory, broken chain); returned with length 0.
    pub rx_bad_chains: AtomicU64,
    /// Frames (and their bytes, without the virtio-net header) written to the tap.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Transmit chains the driver malformed, dropped without reaching the tap.
    pub tx_malformed: AtomicU64,
    /// Well-formed frames the tap refused (e.g. link down, a header the kernel rejects).
    pub tx_errors: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCountersSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_bad_chains: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_malformed: u64,
    pub tx_errors: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetCountersSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCountersSnapshot {
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
            rx_bad_chains: l(&self.rx_bad_chains),
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_malformed: l(&self.tx_malformed),
            tx_errors: l(&self.tx_errors),
        }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A stable locally-administered unicast MAC for a tap name (FNV-1a of the name).
pub(super) fn mac_from_name(name: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A device-writable receive chain the device took from the avail ring.
struct RxChain {
    head: u16,
    segs: Vec<(GuestAddress, u32)>,
    capacity: u32,
}

/// Why a transmit chain was not sent.
enum TxDrop {
    Malformed(String),
    TapError(io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: VirtioInterrupt,
    queue_evts: Arc<Vec<EventFd>>,
    acked: u64,
    /// A ring became unusable; nothing more is done until reset.
    failed: bool,
}

/// Receive state kept across calls.
struct Rx {
    /// One frame with its header; `pending` bytes of it wait for buffers.
    frame: Vec<u8>,
    pending: usize,
    /// The tap may have frames (edge-triggered: true until a read says EAGAIN).
    tap_readable: bool,
    /// Chains taken from the avail ring, not yet used.
    chains: VecDeque<RxChain>,
    capacity: u64,
    /// Segment vectors of used chains, reused.
    spare: Vec<Vec<(GuestAddress, u32)>>,
    /// The driver is asked to notify the rx queue (we ran out of buffers).
    notify: bool,
}

/// Every checksum and segmentation offload the device offers.
pub const OFFLOAD_FEATURES: u64 = net::CSUM
    | net::GUEST_CSUM
    | net::GUEST_TSO4
    | net::GUEST_TSO6
    | net::GUEST_ECN
    | net::HOST_TSO4
    | net::HOST_TSO6
    | net::HOST_ECN;

/// A virtio-net device over a tap.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    features: u64,
    config: [u8; CONFIG_LEN],
    counters: Arc<NetCounters>,
    active: Option<Active>,
    rx: Rx,
    descs: Vec<Descriptor>,
}

impl Net {
    /// A NIC on `tap`. Without `mac`, a stable locally-administered address derived from
    /// the tap's name. `mtu` is advertised to the driver (VIRTIO_NET_F_MTU); the tap's own
    /// MTU is the host's business.
    pub fn new(tap: Tap, mac: Option<[u8; 6]>, mtu: Option<u16>) -> Result<Net, NetError> {
        let mac = mac.unwrap_or_else(|| mac_from_name(tap.name()));
        if mac[0] & 1 != 0 {
            return Err(NetError::MulticastMac {
                mac: format_mac(&mac),
            });
        }
        if let Some(m) = mtu {
            if m < 68 {
                return Err(NetError::BadMtu { mtu: m });
            }
        }
        let mut features = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | net::MAC
            | net::STATUS
            | OFFLOAD_FEATURES
            | net::MRG_RXBUF;
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        if let Some(m) = mtu {
            features |= net::MTU;
            config[10..12].copy_from_slice(&m.to_le_bytes());
        }
        Ok(Net {
            tap,
            mac,
            features,
            config,
            counters: Arc::new(NetCounters::default()),
            active: None,
            rx: Rx {
                frame: vec![0u8; HDR_LEN + MAX_FRAME_LEN],
                pending: 0,
                tap_readable: false,
                chains: VecDeque::new(),
                capacity: 0,
                spare: Vec::new(),
                notify: true,
            },
            descs: Vec::new(),
        })
    }

    /// Offers no checksum or segmentation offload: the guest then sends and receives only
    /// complete, checksummed frames no larger than the MTU, and the tap's offloads stay off.
    /// For guests whose offload paths are suspect, and to measure what offloads buy.
    pub fn without_offloads(mut self) -> Net {
        self.features &= !OFFLOAD_FEATURES;
        self
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The device's counters; they live as long as any holder.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }
}

/// virtio 1.2 §5.1.3.1: offloads depend on others.
fn check_feature_dependencies(f: u64) -> Result<(), String> {
    let has = |b: u64| f & b != 0;
    let rules = [
        (
            net::GUEST_TSO4 | net::GUEST_TSO6,
            net::GUEST_CSUM,
            "GUEST_TSO4/6 need GUEST_CSUM",
        ),
        (
            net::GUEST_ECN,
            net::GUEST_TSO4 | net::GUEST_TSO6,
            "GUEST_ECN needs GUEST_TSO4 or GUEST_TSO6",
        ),
        (
            net::HOST_TSO4 | net::HOST_TSO6,
            net::CSUM,
            "HOST_TSO4/6 need CSUM",
        ),
        (
            net::HOST_ECN,
            net::HOST_TSO4 | net::HOST_TSO6,
            "HOST_ECN needs HOST_TSO4 or HOST_TSO6",
        ),
    ];
    for (feature, needs, what) in rules {
        if has(feature) && !has(needs) {
            return Err(format!(
                "driver accepted inconsistent features {f:#x}: {what}"
            ));
        }
    }
    Ok(())
}

/// The tap offloads that mirror the receive offloads the driver accepted.
fn tap_offloads(acked: u64) -> u32 {
    let mut o = 0;
    for (feature, bit) in [
        (net::GUEST_CSUM, offload::CSUM),
        (net::GUEST_TSO4, offload::TSO4),
        (net::GUEST_TSO6, offload::TSO6),
        (net::GUEST_ECN, offload::TSO_ECN),
    ] {
        if acked & feature != 0 {
            o |= bit;
        }
    }
    o
}

/// Signals the driver for `queue` if any chain was used and suppression allows it.
fn notify_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    index: usize,
) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) => interrupt.signal_used_queue(index),
        Err(e) => {
            rate_limited_warn!(
                "virtio-net: cannot read used_event of queue {}: {}",
                index,
                e
            );
            interrupt.signal_used_queue(index);
        }
    }
}

impl Net {
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.failed {
            return;
        }
        let mut sent = 0u32;
        let mut used = false;
        'work: loop {
            if let Err(e) = active.tx.disable_notification(&active.mem) {
                rate_limited_warn!("virtio-net: tx used ring unusable: {}", e);
                active.failed = true;
                active.interrupt.set_needs_reset();
                return;
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
                        return;
                    }
                };
                let head = chain.head_index();
                let end = collect_chain(chain, &mut self.descs);
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
                    return;
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
                    return;
                }
            }
        }
        if used {
            notify_used(&mut active.tx, &active.mem, &active.interrupt, TX_QUEUE);
        }
    }

    fn process_rx(&mut self) {
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
                if !rx.tap_readable {
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
                    Ok(n) => rx.pending = n,
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
            written += n as u32;
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
    let frame_len = (total - HDR_LEN as u64) as usize;
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
        let n = (len - skip) as usize;
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

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start < CONFIG_LEN {
            let n = data.len().min(CONFIG_LEN - start);
            data[..n].copy_from_slice(&self.config[start..start + n]);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            interrupt,
            acked_features,
            queue_evts,
        } = activation;
        check_feature_dependencies(acked_features).map_err(ActivateError::Other)?;
        let mut queues = queues.into_iter();
        let rx = queues
            .next()
            .filter(|q| q.ready())
            .ok_or(ActivateError::QueueNotReady { index: RX_QUEUE })?;
        let tx = queues
            .next()
            .filter(|q| q.ready())
            .ok_or(ActivateError::QueueNotReady { index: TX_QUEUE })?;
        self.tap
            .set_vnet_hdr_size(HDR_LEN as i32)
            .map_err(|e| ActivateError::Other(e.to_string()))?;
        self.tap
            .set_offload(tap_offloads(acked_features))
            .map_err(|e| ActivateError::Other(e.to_string()))?;
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
            queue_evts,
            acked: acked_features,
            failed: false,
        });
        // The tap may already hold frames; the first read tells.
        self.rx.tap_readable = true;
        self.rx.notify = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        if self.rx.pending != 0 {
            bump(&self.counters.rx_dropped, 1);
        }
        self.rx.pending = 0;
        self.rx.tap_readable = false;
        self.rx.chains.clear();
        self.rx.capacity = 0;
        self.rx.notify = true;
        // Frames queued from now on must not carry offloads the next driver may refuse.
        if let Err(e) = self.tap.set_offload(0) {
            rate_limited_warn!("virtio-net: {}", e);
        }
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => rate_limited_warn!("virtio-net: notification for queue {} ignored", index),
        }
    }

    fn device_fds(&self) -> Vec<RawFd> {
        vec![self.tap.as_raw_fd()]
    }

    fn process_device_fd(&mut self, index: usize) {
        if index == 0 {
            self.rx.tap_readable = true;
            self.process_rx();
        }
    }
}
