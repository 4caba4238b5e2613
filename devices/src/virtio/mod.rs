//! virtio 1.2 devices (modern only) and the virtio-mmio transport.
//!
//! # How the VMM wires a device
//!
//! ```text
//! // Raw images take the zero-copy path; any other backend goes through Block::new.
//! let raw = RawFile::open(&path, read_only)?;                  // locks the file (OFD lock)
//! let block = Block::new_raw(raw, serial, read_only)?;         // or Block::new(Box<dyn DiskBackend>, ..)
//! let (transport, handle) = MmioTransport::with_handle(block, mem.clone(), Arc::new(IrqFd(irq_evt)))?;
//! for (i, evt) in transport.queue_evts().iter().enumerate() {
//!     // KVM_IOEVENTFD: addr = window_base + NOTIFY_REG_OFFSET (0x50), len 4, datamatch = i
//! }
//! let handler = transport.event_handler();                     // the device's EventSubscriber
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), window_base, MMIO_WINDOW_SIZE)?;
//!
//! // Event loop (main thread): handler.init(ops) adds the queue eventfds and its activation
//! // eventfd; from DRIVER_OK until reset it also adds the device's own fds (device_fds(),
//! // edge-triggered) and removes them again, by itself. handler.process(fd, ops) runs the
//! // queue or the device fd. The loop knows none of these fds (crate::events).
//! // A config change the VMM makes (e.g. virtio-blk media change), between requests:
//! //     handle.change_config(|block: &mut Block| block.change_medium(disk))
//! //     -> ConfigGeneration bumped, configuration change interrupt once DRIVER_OK
//! ```
//!
//! The vCPU threads touch only the transport (register accesses, under its mutex on the
//! bus). Device work (queue processing, backend I/O) runs on the event-loop thread under the
//! handler's own lock, so a vCPU reading InterruptStatus never waits for a disk. The
//! transport takes the handler's lock only to activate, reset and access device config
//! space; lock order is transport, then device, and the event loop never takes the transport
//! lock. Interrupts: the device raises InterruptStatus bits and writes the irqfd from the
//! event-loop thread; the guest clears them with InterruptACK.
//!
//! A device model implements [`VirtioDevice`]. It receives its queues, guest memory and a
//! [`VirtioInterrupt`] at activation and gives them up at reset.
//!
//! # Writing a device (e.g. virtio-net over a tap)
//!
//! - `queue_max_sizes()` declares the queues (net: `&[256, 256]`, rx = 0, tx = 1);
//!   `features()` includes [`features::VERSION_1`]; `read_config` serves the config space
//!   (from its bytes: [`read_config_bytes`]).
//! - `activate(Activation)` keeps `mem`, the queues it needs
//!   ([`Activation::take_ready_queues`]: `let [rx, tx] = ...?`, an error if the driver did
//!   not enable one), `interrupt` and `queue_evts`, and applies `acked_features` (net:
//!   TUNSETOFFLOAD for the negotiated offloads).
//! - `device_fds()` returns the fds to watch while active (net: the tap). They are watched
//!   edge-triggered: drain until EAGAIN, or remember "readable but no rx buffers" and retry
//!   when `process_queue(rx)` sees new buffers.
//! - `process_queue(i)`: the driver notified queue i. Use [`queue::pop_chain`] and
//!   [`queue::collect_chain`] to walk chains (the latter tells a complete chain from a broken
//!   one), `Queue::add_used`, then `needs_notification` and
//!   [`VirtioInterrupt::signal_used_queue`]. A ring that cannot be used any more:
//!   [`VirtioInterrupt::set_needs_reset`]. Bound the work per call and write 1 to
//!   `queue_evts[i]` to come back later (virtio-blk does this).
//! - `reset()` drops everything `activate` got.
//! - Tests: `virtio::testing::Driver` plays the guest driver through the MMIO registers
//!   (`start_queues(features, 2)`, `add_chain_to(q, ..)`, `publish_to`, `kick`,
//!   `used_elem_of`).

pub mod balloon;
pub mod block;
mod event_handler;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::InterruptLine;

pub use event_handler::{DeviceHandle, VirtioEventHandler};
pub use mmio::{
    MmioError, MmioState, MmioTransport, QueueState, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET,
};

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Reserved feature bits (virtio 1.2 §6).
pub mod features {
    use virtio_bindings::{virtio_config as c, virtio_ring as r};
    pub const RING_INDIRECT_DESC: u64 = 1 << r::VIRTIO_RING_F_INDIRECT_DESC;
    pub const RING_EVENT_IDX: u64 = 1 << r::VIRTIO_RING_F_EVENT_IDX;
    pub const VERSION_1: u64 = 1 << c::VIRTIO_F_VERSION_1;
}

/// Device ids (virtio 1.2 §5).
pub mod device_type {
    use virtio_bindings::virtio_ids as ids;
    pub const NET: u32 = ids::VIRTIO_ID_NET;
    pub const BLOCK: u32 = ids::VIRTIO_ID_BLOCK;
    pub const RNG: u32 = ids::VIRTIO_ID_RNG;
    pub const VSOCK: u32 = ids::VIRTIO_ID_VSOCK;
    pub const BALLOON: u32 = ids::VIRTIO_ID_BALLOON;
}

/// InterruptStatus bits (virtio 1.2 §4.2.2).
pub const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A bindings constant that fits a byte (header and status fields), checked at compile time.
pub(crate) const fn byte(v: u32) -> u8 {
    assert!(v <= 0xff);
    v.to_le_bytes()[0]
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    /// One entry per queue the device declared (index = queue index). A queue the driver did
    /// not enable has `ready() == false`. Ready queues were checked against guest memory and
    /// have EVENT_IDX set as negotiated.
    pub queues: Vec<Queue>,
    pub interrupt: VirtioInterrupt,
    /// The features the driver accepted (a subset of `VirtioDevice::features`).
    pub acked_features: u64,
    /// The queue notification eventfds. A device that stops work on a queue before it is
    /// empty (to bound the time spent in one call) writes 1 to that queue's eventfd so the
    /// event loop calls it again.
    pub queue_evts: Arc<Vec<EventFd>>,
}

impl Activation {
    /// Errors unless the driver enabled each of the first `count` queues.
    pub fn require_ready(&self, count: usize) -> Result<(), ActivateError> {
        match (0..count).find(|&index| !self.queues.get(index).is_some_and(|q| q.ready())) {
            Some(index) => Err(ActivateError::QueueNotReady { index }),
            None => Ok(()),
        }
    }

    /// Takes the first `N` queues, each of which the driver must have enabled; the other
    /// fields stay for the device to keep.
    pub fn take_ready_queues<const N: usize>(&mut self) -> Result<[Queue; N], ActivateError> {
        let mut queues = std::mem::take(&mut self.queues);
        queues.truncate(N);
        let queues: [Queue; N] = queues
            .try_into()
            .map_err(|q: Vec<Queue>| ActivateError::QueueNotReady { index: q.len() })?;
        match queues.iter().position(|q| !q.ready()) {
            Some(index) => Err(ActivateError::QueueNotReady { index }),
            None => Ok(queues),
        }
    }
}

/// Serves a config-space read from the device's config bytes: bytes past the end read as
/// zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(rest) = usize::try_from(offset)
        .ok()
        .and_then(|start| config.get(start..))
    else {
        return;
    };
    let n = data.len().min(rest.len());
    data[..n].copy_from_slice(&rest[..n]);
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index} is required but the driver did not enable it")]
    QueueNotReady { index: usize },
    #[error("device cannot start: {0}")]
    Other(String),
}

/// A virtio device model behind a transport. All methods run with the device's lock held;
/// `process_*` run on the event-loop thread. The VMM reaches a device's own methods (e.g. a
/// virtio-blk media change) through the typed [`DeviceHandle`] of
/// [`MmioTransport::with_handle`].
pub trait VirtioDevice: Send + 'static {
    /// Device id (virtio 1.2 §5), e.g. [`device_type::BLOCK`].
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (powers of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver, including [`features::VERSION_1`].
    fn features(&self) -> u64;
    /// Read device config space at `offset` (relative to its start). Bytes past the end of
    /// the config space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device config space. Most devices have no writable field.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        rate_limited_warn!(
            "virtio: driver wrote {} bytes to read-only config space at {:#x}; ignored",
            data.len(),
            offset
        );
    }
    /// The driver set DRIVER_OK. An error puts the device in DEVICE_NEEDS_RESET.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver reset the device: drop the queues, memory and interrupt from `activate`
    /// and return to the state after construction.
    fn reset(&mut self);
    /// Queue `index` was notified. Only called while active.
    fn process_queue(&mut self, index: usize);
    /// Extra fds the event loop must watch (EPOLLIN, edge-triggered) while the device is
    /// active, e.g. a tap. Indexes into this list are passed to `process_device_fd`.
    fn device_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// `device_fds()[index]` became readable. Only called while active.
    fn process_device_fd(&mut self, index: usize) {
        let _ = index;
    }
}

/// A boxed device is a device (transports made from `Box<dyn VirtioDevice>`).
impl<D: VirtioDevice + ?Sized> VirtioDevice for Box<D> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        (**self).activate(activation)
    }
    fn reset(&mut self) {
        (**self).reset()
    }
    fn process_queue(&mut self, index: usize) {
        (**self).process_queue(index)
    }
    fn device_fds(&self) -> Vec<RawFd> {
        (**self).device_fds()
    }
    fn process_device_fd(&mut self, index: usize) {
        (**self).process_device_fd(index)
    }
}

/// State shared by the transport (vCPU side) and the device (event-loop side).
pub(crate) struct SharedState {
    pub(crate) interrupt_status: AtomicU32,
    pub(crate) config_generation: AtomicU32,
    pub(crate) needs_reset: AtomicBool,
    pub(crate) line: Arc<dyn InterruptLine>,
}

impl SharedState {
    pub(crate) fn raise(&self, bits: u32) {
        self.interrupt_status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            rate_limited_warn!("virtio: cannot trigger interrupt line: {}", e);
        }
    }
}

/// A device's handle to signal the driver. Cheap to clone.
#[derive(Clone)]
pub struct VirtioInterrupt {
    pub(crate) shared: Arc<SharedState>,
}

impl VirtioInterrupt {
    /// Buffers were added to the used ring of a queue (the queue index does not matter on
    /// virtio-mmio, which has one interrupt per device).
    pub fn signal_used_queue(&self, _queue_index: usize) {
        self.shared.raise(INT_USED_RING);
    }

    /// Config space changed: bumps ConfigGeneration and interrupts the driver.
    pub fn signal_config_change(&self) {
        self.shared.config_generation.fetch_add(1, Ordering::SeqCst);
        self.shared.raise(INT_CONFIG_CHANGE);
    }

    /// The device hit an error it cannot recover from without a reset (e.g. a queue whose
    /// rings became unusable): sets DEVICE_NEEDS_RESET and notifies the driver
    /// (virtio 1.2 §2.1.2).
    pub fn set_needs_reset(&self) {
        if !self.shared.needs_reset.swap(true, Ordering::SeqCst) {
            self.shared.raise(INT_CONFIG_CHANGE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::balloon::{features as fb, Balloon};
    use super::rng::Rng;
    use super::testing::Driver;
    use super::*;

    /// Negotiates `accepted`, enables queues 0..`queues`, sets DRIVER_OK; the status after.
    fn driver_ok_with(d: &mut Driver, accepted: u64, queues: u32) -> u32 {
        d.negotiate(accepted);
        for q in 0..queues {
            d.setup_queue(q);
        }
        d.driver_ok()
    }

    #[test]
    fn driver_ok_without_a_required_queue_needs_reset() {
        let mut d = Driver::new(Box::new(Rng::new()));
        assert_ne!(
            driver_ok_with(&mut d, features::VERSION_1, 0) & status::DEVICE_NEEDS_RESET,
            0
        );
        // The statistics queue is required only once the driver accepts STATS_VQ.
        let with_stats = features::VERSION_1 | fb::STATS_VQ;
        let mut d = Driver::new(Box::new(Balloon::new(0, true, 1).unwrap()));
        assert_ne!(
            driver_ok_with(&mut d, with_stats, 2) & status::DEVICE_NEEDS_RESET,
            0
        );
        let mut d = Driver::new(Box::new(Balloon::new(0, true, 1).unwrap()));
        assert_eq!(
            driver_ok_with(&mut d, features::VERSION_1, 2) & status::DEVICE_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn config_reads_past_the_end_read_zero() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        for offset in [4, 5, u64::MAX] {
            let mut data = [0xffu8; 2];
            read_config_bytes(&config, offset, &mut data);
            assert_eq!(data, [0, 0], "offset {offset}");
        }
    }
}
