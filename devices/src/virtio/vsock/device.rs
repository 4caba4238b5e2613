//! The virtio-vsock device: config space, activation and the rx/tx queues around the muxer.

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Muxer, MuxerError, MAX_PAYLOAD};
use super::packet::{Header, HDR_LEN};
use super::{EVT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::virtio::queue::{collect_chain, pop_chain, undo_pop, ChainEnd};
use crate::virtio::{
    device_type, features, read_config_bytes, ActivateError, Activation, VirtioDevice,
    VirtioInterrupt,
};

/// Chains taken from each queue in one event-loop turn before the device yields.
const CHAINS_PER_TURN: u32 = 2 * QUEUE_SIZE as u32;
/// Socket events handled in one turn.
const EVENTS_PER_TURN: usize = 256;

/// Packet counters (Firecracker's `vsock` metrics). Relaxed adds on the event loop.
#[derive(Debug, Default)]
pub struct VsockCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Chains the driver malformed (returned unread or unwritten).
    pub malformed: AtomicU64,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: VirtioInterrupt,
    queue_evts: Arc<Vec<EventFd>>,
    failed: bool,
}

/// A virtio-vsock device (stream sockets) whose host side is Unix sockets.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    counters: Arc<VsockCounters>,
    /// A packet's header and payload on their way between guest memory and a socket.
    scratch: Vec<u8>,
    descs: Vec<Descriptor>,
    active: Option<Active>,
}

/// How a queue pass ended.
#[derive(PartialEq, Eq)]
enum Pass {
    Done,
    /// The turn's budget ran out with work left.
    More,
    /// The ring is unusable.
    Failed,
}

impl Vsock {
    /// A device for the guest `guest_cid` (3 or more), listening on `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, MuxerError> {
        Ok(Vsock {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            counters: Arc::default(),
            scratch: Vec::new(),
            descs: Vec::new(),
            active: None,
        })
    }

    pub fn counters(&self) -> Arc<VsockCounters> {
        self.counters.clone()
    }

    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// The VM ends: host connections are closed and the socket file removed now.
    pub fn close_host_side(&mut self) {
        self.active = None;
        self.muxer.close();
    }

    /// Guest packets to the host: each read from guest memory and handed to the muxer.
    fn process_tx(&mut self) -> Pass {
        let Some(active) = self.active.as_mut() else {
            return Pass::Done;
        };
        let counters = &*self.counters;
        let mut chains = 0;
        let mut completed = false;
        let pass = loop {
            if chains >= CHAINS_PER_TURN {
                break Pass::More;
            }
            let chain = match pop_chain(&mut active.tx, &active.mem) {
                Ok(Some(c)) => c,
                // With EVENT_IDX the driver kicks only when it passes avail_event: ask for the
                // next chain, and take one that came meanwhile.
                Ok(None) => match active.tx.enable_notification(&active.mem) {
                    Ok(true) => continue,
                    Ok(false) => break Pass::Done,
                    Err(e) => {
                        rate_limited_warn!("vsock: tx ring: {}; the device needs a reset", e);
                        break Pass::Failed;
                    }
                },
                Err(e) => {
                    rate_limited_warn!("vsock: tx ring: {}; the device needs a reset", e);
                    break Pass::Failed;
                }
            };
            chains += 1;
            let head = chain.head_index();
            let end = collect_chain(chain, &mut self.descs);
            match read_packet(&active.mem, &self.descs, end, &mut self.scratch) {
                Some(hdr) => {
                    let len = hdr.len as usize;
                    counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                    counters.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    self.muxer
                        .on_guest_packet(&hdr, &self.scratch[HDR_LEN..HDR_LEN + len]);
                }
                None => {
                    counters.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            if active.tx.add_used(&active.mem, head, 0).is_err() {
                break Pass::Failed;
            }
            completed = true;
        };
        if completed {
            notify(&mut active.tx, &active.mem, &active.interrupt, TX_QUEUE);
        }
        pass
    }

    /// Packets for the guest, into its rx buffers, while it has buffers and we have packets.
    fn process_rx(&mut self) -> Pass {
        let Some(active) = self.active.as_mut() else {
            return Pass::Done;
        };
        let counters = &*self.counters;
        let mut chains = 0;
        let mut completed = false;
        let pass = loop {
            if !self.muxer.has_rx() {
                break Pass::Done;
            }
            if chains >= CHAINS_PER_TURN {
                break Pass::More;
            }
            let chain = match pop_chain(&mut active.rx, &active.mem) {
                Ok(Some(c)) => c,
                // The driver adds buffers and notifies the rx queue (past avail_event, set
                // here): we come back then.
                Ok(None) => match active.rx.enable_notification(&active.mem) {
                    Ok(true) => continue,
                    Ok(false) => break Pass::Done,
                    Err(e) => {
                        rate_limited_warn!("vsock: rx ring: {}; the device needs a reset", e);
                        break Pass::Failed;
                    }
                },
                Err(e) => {
                    rate_limited_warn!("vsock: rx ring: {}; the device needs a reset", e);
                    break Pass::Failed;
                }
            };
            chains += 1;
            let head = chain.head_index();
            let end = collect_chain(chain, &mut self.descs);
            let Some(capacity) = rx_capacity(&active.mem, &self.descs, end) else {
                counters.malformed.fetch_add(1, Ordering::Relaxed);
                if active.rx.add_used(&active.mem, head, 0).is_err() {
                    break Pass::Failed;
                }
                completed = true;
                continue;
            };
            let payload_cap = (capacity - HDR_LEN).min(MAX_PAYLOAD);
            self.scratch.resize(HDR_LEN + MAX_PAYLOAD, 0);
            let Some((hdr, n)) = self
                .muxer
                .next_rx(&mut self.scratch[HDR_LEN..HDR_LEN + payload_cap])
            else {
                undo_pop(&mut active.rx);
                break Pass::Done;
            };
            self.scratch[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
            let total = HDR_LEN + n;
            scatter(&active.mem, &self.descs, &self.scratch[..total]);
            counters.rx_packets.fetch_add(1, Ordering::Relaxed);
            counters.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            // At most HDR_LEN + 64 KiB.
            #[allow(clippy::cast_possible_truncation)]
            let total = total as u32;
            if active.rx.add_used(&active.mem, head, total).is_err() {
                break Pass::Failed;
            }
            completed = true;
        };
        if completed {
            notify(&mut active.rx, &active.mem, &active.interrupt, RX_QUEUE);
        }
        pass
    }

    /// One turn: guest packets out, socket news in, packets for the guest.
    fn run(&mut self) {
        match self.active.as_ref() {
            Some(a) if !a.failed => {}
            _ => return,
        }
        let tx = self.process_tx();
        let events_left = self.muxer.process_events(EVENTS_PER_TURN);
        let rx = self.process_rx();
        let active = self.active.as_mut().expect("checked above");
        if tx == Pass::Failed || rx == Pass::Failed {
            active.failed = true;
            active.interrupt.set_needs_reset();
            return;
        }
        if tx == Pass::More || rx == Pass::More || events_left {
            // Come back through the event loop for the rest.
            if let Err(e) = active.queue_evts[TX_QUEUE].write(1) {
                rate_limited_warn!("vsock: cannot reschedule: {}", e);
            }
        }
    }
}

fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &VirtioInterrupt, index: usize) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) => interrupt.signal_used_queue(index),
        Err(e) => {
            rate_limited_warn!("vsock: cannot read used_event: {}", e);
            interrupt.signal_used_queue(index);
        }
    }
}

/// A tx packet: every descriptor driver-readable and in guest memory, a whole header, and
/// for RW a payload of `len` bytes that the chain holds (at most MAX_PAYLOAD). The header is
/// returned; the header and payload are in `scratch`. For other ops `len` is set to 0.
fn read_packet(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    end: ChainEnd,
    scratch: &mut Vec<u8>,
) -> Option<Header> {
    if end == ChainEnd::Broken || descs.iter().any(|d| d.is_write_only()) {
        return None;
    }
    let want = HDR_LEN + MAX_PAYLOAD;
    scratch.resize(want, 0);
    let mut got = 0;
    for d in descs {
        if got == want {
            break;
        }
        let n = (d.len() as usize).min(want - got);
        mem.read_slice(&mut scratch[got..got + n], d.addr()).ok()?;
        got += n;
    }
    if got < HDR_LEN {
        return None;
    }
    let mut hdr = Header::from_bytes(scratch[..HDR_LEN].try_into().expect("HDR_LEN bytes"));
    if hdr.op == super::packet::op::RW {
        if hdr.len as usize > got - HDR_LEN {
            return None;
        }
    } else {
        hdr.len = 0;
    }
    Some(hdr)
}

/// The bytes an rx chain can take (every descriptor device-writable and in guest memory,
/// room for a header and data), or None.
fn rx_capacity(mem: &GuestMemoryMmap, descs: &[Descriptor], end: ChainEnd) -> Option<usize> {
    if end == ChainEnd::Broken {
        return None;
    }
    let mut total = 0usize;
    for d in descs {
        if !d.is_write_only() || !mem.check_range(d.addr(), d.len() as usize, Permissions::Write) {
            return None;
        }
        total = total.checked_add(d.len() as usize)?;
    }
    // Room for a header and some data: a header-only buffer could carry control packets
    // but would stall data behind it, so it is refused like a malformed one.
    (total > HDR_LEN).then_some(total)
}

/// Writes `data` across the chain's buffers, in order (rx_capacity checked they fit).
fn scatter(mem: &GuestMemoryMmap, descs: &[Descriptor], mut data: &[u8]) {
    for d in descs {
        if data.is_empty() {
            break;
        }
        let n = (d.len() as usize).min(data.len());
        if let Err(e) = mem.write_slice(&data[..n], d.addr()) {
            rate_limited_warn!("vsock: rx buffer write: {}", e);
            return;
        }
        data = &data[n..];
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    /// virtio 1.2 §5.10.4: `le64 guest_cid`.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, mut activation: Activation) -> Result<(), ActivateError> {
        const _: () = assert!(RX_QUEUE == 0 && TX_QUEUE == 1 && EVT_QUEUE == 2);
        // The event queue only carries TRANSPORT_RESET (after a snapshot restore): unused.
        let [rx, tx, _event] = activation.take_ready_queues()?;
        self.active = Some(Active {
            mem: activation.mem,
            rx,
            tx,
            interrupt: activation.interrupt,
            queue_evts: activation.queue_evts,
            failed: false,
        });
        self.muxer.activate();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }

    fn process_queue(&mut self, _index: usize) {
        self.run();
    }

    fn device_fds(&self) -> Vec<RawFd> {
        vec![self.muxer.epoll_fd()]
    }

    fn process_device_fd(&mut self, _index: usize) {
        self.run();
    }
}
