//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_handler::{lock_slot, DeviceSlot, Slot};
use super::{
    features, status, Activation, DeviceHandle, SharedState, VirtioDevice, VirtioEventHandler,
    VirtioInterrupt,
};
use crate::bus::BusDevice;
use crate::cast::u64_to_usize;
use crate::interrupt::InterruptLine;

/// Size of a virtio-mmio register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify in the window: the VMM's ioeventfds go here.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5053_4957; // "WISP"
const CONFIG_SPACE_OFFSET: u64 = 0x100;
/// virtio 1.2 §2.7: split queues hold at most 32768 entries.
const MAX_QUEUE_SIZE: u16 = 32768;

mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create the eventfd for queue {index}: {source}")]
    QueueEventFd {
        index: usize,
        source: std::io::Error,
    },
    #[error("cannot create the activation eventfd: {0}")]
    ActivateEventFd(#[source] std::io::Error),
    #[error("device declares {count} queues; virtio-mmio supports at most {max}")]
    TooManyQueues { count: usize, max: usize },
    #[error("device declares queue {index} with max size {size}, not a power of two in 1..=32768")]
    BadQueueMaxSize { index: usize, size: u16 },
    #[error("snapshot: {0}")]
    BadState(String),
}

/// One queue's registers in a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// The transport's registers in a snapshot. The device's own progress (the queues' next
/// indices) is read back from the rings in guest memory on restore: at a pause every chain a
/// device took is answered (see [`MmioTransport::restore`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmioState {
    pub device_type: u32,
    pub device_features: u64,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub driver_features_invalid: bool,
    pub queue_sel: u32,
    pub queues: Vec<QueueState>,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub needs_reset: bool,
}

/// The low and high 32-bit halves of a 64-bit value (register pairs such as QueueDescLow/High).
fn halves(v: u64) -> (u32, u32) {
    let b = v.to_le_bytes();
    (
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    )
}

/// Queue registers as the driver wrote them; validated when it writes QueueReady = 1.
#[derive(Clone, Copy, Default)]
struct QueueRegs {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// A virtio device's register window. Put it on the MMIO bus at a 0x1000-byte window.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    shared: Arc<SharedState>,
    handler: VirtioEventHandler,
    device_type: u32,
    device_features: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver wrote feature bits outside the two defined words.
    driver_features_invalid: bool,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptLine>,
    ) -> Result<MmioTransport, MmioError> {
        Ok(Self::with_handle(device, mem, interrupt)?.0)
    }

    /// Like [`MmioTransport::new`], and a typed handle on the device for the VMM.
    pub fn with_handle<D: VirtioDevice>(
        device: D,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptLine>,
    ) -> Result<(MmioTransport, DeviceHandle<D>), MmioError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        // The ioeventfd datamatch and QueueSel are 32 bits, but keep the count sane.
        const MAX_QUEUES: usize = 1024;
        if max_sizes.len() > MAX_QUEUES {
            return Err(MmioError::TooManyQueues {
                count: max_sizes.len(),
                max: MAX_QUEUES,
            });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
                return Err(MmioError::BadQueueMaxSize { index, size });
            }
            queues.push(QueueRegs {
                max_size: size,
                ..Default::default()
            });
            queue_evts.push(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| MmioError::QueueEventFd { index, source })?,
            );
        }
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(MmioError::ActivateEventFd)?;
        let device_type = device.device_type();
        let device_features = device.features();
        let typed = Arc::new(Mutex::new(DeviceSlot {
            active: false,
            device,
        }));
        let slot: Arc<Slot> = typed.clone();
        let shared = Arc::new(SharedState {
            interrupt_status: Default::default(),
            config_generation: Default::default(),
            needs_reset: Default::default(),
            line: interrupt,
        });
        let handle = DeviceHandle {
            slot: typed,
            shared: shared.clone(),
        };
        let transport = MmioTransport {
            mem,
            shared: shared.clone(),
            handler: VirtioEventHandler {
                slot,
                queue_evts: Arc::new(queue_evts),
                activate_evt: Arc::new(activate_evt),
                watched: Vec::new(),
            },
            device_type,
            device_features,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_invalid: false,
            queue_sel: 0,
            queues,
        };
        Ok((transport, handle))
    }

    /// One eventfd per queue; register each as a KVM ioeventfd at window base +
    /// [`NOTIFY_REG_OFFSET`], 4 bytes, datamatch = its index.
    pub fn queue_evts(&self) -> &[EventFd] {
        self.handler.queue_evts()
    }

    /// The handle the event loop uses to run the device.
    pub fn event_handler(&self) -> VirtioEventHandler {
        self.handler.clone()
    }

    /// The current Status register value, as the driver would read it.
    pub fn status(&self) -> u32 {
        self.read_status()
    }

    fn read_status(&self) -> u32 {
        if self.shared.needs_reset.load(Ordering::SeqCst) {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Spec behaviour for an unrecoverable driver error: DEVICE_NEEDS_RESET, and a config
    /// change interrupt once DRIVER_OK is set (virtio 1.2 §2.1.2).
    fn needs_reset(&mut self) {
        self.shared.needs_reset.store(true, Ordering::SeqCst);
        if self.status & status::DRIVER_OK != 0 {
            self.shared.raise(super::INT_CONFIG_CHANGE);
        }
    }

    fn reset(&mut self) {
        {
            let mut slot = lock_slot(&self.handler.slot);
            if slot.active {
                slot.device.reset();
                slot.active = false;
                let _ = self.handler.activate_evt.write(1);
            }
        }
        for evt in self.handler.queue_evts.iter() {
            let _ = evt.read();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_invalid = false;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs {
                max_size: q.max_size,
                ..Default::default()
            };
        }
        self.shared.interrupt_status.store(0, Ordering::SeqCst);
        self.shared.needs_reset.store(false, Ordering::SeqCst);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's bit; the driver cannot set or clear it.
        let value = value & !status::DEVICE_NEEDS_RESET;
        if value & self.status != self.status {
            rate_limited_warn!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {:#x}) without a reset; ignored",
                self.status,
                value
            );
            return;
        }
        let new = value & !self.status;
        let has = |bits: u32| value & bits == bits;
        let order_ok = (new & status::DRIVER == 0 || has(status::ACKNOWLEDGE))
            && (new & status::FEATURES_OK == 0 || has(status::ACKNOWLEDGE | status::DRIVER))
            && (new & status::DRIVER_OK == 0
                || has(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK));
        if !order_ok || value & !0xcf != 0 {
            rate_limited_warn!(
                "virtio-mmio: invalid status transition {:#x} -> {:#x}; ignored",
                self.status,
                value
            );
            return;
        }
        if new & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // virtio 1.2 §3.1.1: the device refuses by not setting FEATURES_OK; the driver
            // reads Status back and sees it missing.
            let keep = value & !(status::FEATURES_OK | status::DRIVER_OK);
            self.status = keep;
            return;
        }
        self.status = value;
        if new & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let extra = self.driver_features & !self.device_features;
        if self.driver_features_invalid || extra != 0 {
            rate_limited_warn!(
                "virtio-mmio: driver accepted features {:#x} that were not offered; FEATURES_OK refused",
                extra
            );
            return false;
        }
        if self.driver_features & features::VERSION_1 == 0 {
            rate_limited_warn!(
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported); FEATURES_OK refused"
            );
            return false;
        }
        true
    }

    fn activate(&mut self) {
        self.activate_at(false);
    }

    /// Activates the device; `resume` for a restored driver whose queues are under way: each
    /// queue goes on from its used ring's index (at a pause every chain taken was answered,
    /// so the next one to take is the next one to answer).
    fn activate_at(&mut self, resume: bool) {
        if self.shared.needs_reset.load(Ordering::SeqCst) {
            // An earlier error (e.g. a bad queue) already asked for a reset; tell the driver
            // now that DRIVER_OK is set.
            self.shared.raise(super::INT_CONFIG_CHANGE);
            return;
        }
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for regs in &self.queues {
            let mut q = Queue::new(regs.max_size).expect("max size checked in MmioTransport::new");
            if regs.ready {
                // The values were validated when QueueReady was written.
                q.set_size(u16::try_from(regs.size).expect("checked against max_size"));
                let (desc, driver, device) =
                    (halves(regs.desc), halves(regs.driver), halves(regs.device));
                q.set_desc_table_address(Some(desc.0), Some(desc.1));
                q.set_avail_ring_address(Some(driver.0), Some(driver.1));
                q.set_used_ring_address(Some(device.0), Some(device.1));
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if resume {
                    // The layout was validated: the used ring's idx is in guest memory.
                    let idx: u16 = self
                        .mem
                        .read_obj(GuestAddress(regs.device.wrapping_add(2)))
                        .unwrap_or(0);
                    q.set_next_avail(idx);
                    q.set_next_used(idx);
                }
            }
            queues.push(q);
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: VirtioInterrupt {
                shared: self.shared.clone(),
            },
            acked_features: self.driver_features,
            queue_evts: self.handler.queue_evts.clone(),
        };
        let mut slot = lock_slot(&self.handler.slot);
        match slot.device.activate(activation) {
            Ok(()) => {
                slot.active = true;
                drop(slot);
                let _ = self.handler.activate_evt.write(1);
            }
            Err(e) => {
                drop(slot);
                rate_limited_warn!("virtio-mmio: device activation failed: {}", e);
                self.needs_reset();
            }
        }
    }

    /// The registers, for a snapshot of a paused VM.
    pub fn state(&self) -> MmioState {
        MmioState {
            device_type: self.device_type,
            device_features: self.device_features,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            driver_features_invalid: self.driver_features_invalid,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
                .collect(),
            interrupt_status: self.shared.interrupt_status.load(Ordering::SeqCst),
            config_generation: self.shared.config_generation.load(Ordering::SeqCst),
            needs_reset: self.shared.needs_reset.load(Ordering::SeqCst),
        }
    }

    /// Puts a fresh transport (its device built as the snapshotted one was) into the state a
    /// snapshot recorded, and activates the device if the driver had. The state comes from a
    /// file: it is checked as the driver's register writes would be, and refused whole.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), MmioError> {
        let bad = |what: String| Err(MmioError::BadState(what));
        if state.device_type != self.device_type {
            return bad(format!(
                "device type {} where this VM has device type {}",
                state.device_type, self.device_type
            ));
        }
        if state.device_features != self.device_features {
            return bad(format!(
                "device type {} offered features {:#x}, it now offers {:#x}",
                self.device_type, state.device_features, self.device_features
            ));
        }
        if state.queues.len() != self.queues.len() {
            return bad(format!(
                "device type {} has {} queues, the snapshot {}",
                self.device_type,
                self.queues.len(),
                state.queues.len()
            ));
        }
        if state.status & !(0xcf | status::DEVICE_NEEDS_RESET) != 0 {
            return bad(format!("status {:#x}", state.status));
        }
        let mut queues = self.queues.clone();
        for (i, (q, s)) in queues.iter_mut().zip(&state.queues).enumerate() {
            *q = QueueRegs {
                max_size: q.max_size,
                size: s.size,
                ready: s.ready,
                desc: s.desc,
                driver: s.driver,
                device: s.device,
            };
            if q.ready && !self.queue_layout_valid(q) {
                return bad(format!("queue {i}'s layout is not valid in guest memory"));
            }
        }
        self.queues = queues;
        self.status = state.status & !status::DEVICE_NEEDS_RESET;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.driver_features_invalid = state.driver_features_invalid;
        self.queue_sel = state.queue_sel;
        self.shared
            .interrupt_status
            .store(state.interrupt_status & 0x3, Ordering::SeqCst);
        self.shared
            .config_generation
            .store(state.config_generation, Ordering::SeqCst);
        self.shared
            .needs_reset
            .store(state.needs_reset, Ordering::SeqCst);
        if self.status & status::DRIVER_OK != 0 && !state.needs_reset {
            self.activate_at(true);
            // Notifications the guest sent before the pause were for the old process's
            // eventfds: look at every queue once.
            for evt in self.handler.queue_evts.iter() {
                let _ = evt.write(1);
            }
        }
        Ok(())
    }

    /// Checks the selected queue's registers when the driver enables it.
    fn queue_layout_valid(&self, q: &QueueRegs) -> bool {
        let size = q.size;
        if size == 0 || size > u32::from(q.max_size) || !size.is_power_of_two() {
            rate_limited_warn!(
                "virtio-mmio: queue {} enabled with size {} (max {}, must be a power of two)",
                self.queue_sel,
                size,
                q.max_size
            );
            return false;
        }
        let size = u64::from(size);
        // virtio 1.2 §2.7: alignment and size of the three split-ring areas.
        let areas = [
            ("descriptor table", q.desc, 16, 16 * size),
            ("driver area", q.driver, 2, 6 + 2 * size),
            ("device area", q.device, 4, 6 + 8 * size),
        ];
        for (name, addr, align, len) in areas {
            if !addr.is_multiple_of(align)
                || !self.mem.check_range(
                    GuestAddress(addr),
                    u64_to_usize(len),
                    Permissions::ReadWrite,
                )
            {
                rate_limited_warn!(
                    "virtio-mmio: queue {} {} at {:#x}+{:#x} is misaligned or outside guest memory",
                    self.queue_sel,
                    name,
                    addr,
                    len
                );
                return false;
            }
        }
        true
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        let sel = self.queue_sel;
        if self.status & status::DRIVER_OK != 0 {
            rate_limited_warn!(
                "virtio-mmio: queue register {:#x} written after DRIVER_OK; ignored",
                offset
            );
            return;
        }
        let Some(q) = self.selected_queue() else {
            rate_limited_warn!(
                "virtio-mmio: queue register {:#x} written for queue {} that does not exist",
                offset,
                sel
            );
            return;
        };
        if offset == reg::QUEUE_READY {
            match value {
                0 => q.ready = false,
                1 => {
                    let regs = *q;
                    if self.queue_layout_valid(&regs) {
                        self.queues[sel as usize].ready = true;
                    } else {
                        self.needs_reset();
                    }
                }
                _ => rate_limited_warn!("virtio-mmio: QueueReady written with {}; ignored", value),
            }
            return;
        }
        if q.ready {
            rate_limited_warn!(
                "virtio-mmio: queue {} register {:#x} written while the queue is ready; ignored",
                sel,
                offset
            );
            return;
        }
        let set_low = |r: &mut u64| *r = (*r & !0xffff_ffff) | u64::from(value);
        let set_high = |r: &mut u64| *r = (*r & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            reg::QUEUE_NUM => q.size = value,
            reg::QUEUE_DESC_LOW => set_low(&mut q.desc),
            reg::QUEUE_DESC_HIGH => set_high(&mut q.desc),
            reg::QUEUE_DRIVER_LOW => set_low(&mut q.driver),
            reg::QUEUE_DRIVER_HIGH => set_high(&mut q.driver),
            reg::QUEUE_DEVICE_LOW => set_low(&mut q.device),
            reg::QUEUE_DEVICE_HIGH => set_high(&mut q.device),
            _ => unreachable!("write_queue_reg called for {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
            rate_limited_warn!(
                "virtio-mmio: DriverFeatures written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ if value != 0 => self.driver_features_invalid = true,
            _ => {}
        }
    }

    fn queue_notify(&mut self, value: u32) {
        // Normally caught by the ioeventfd; this is the fallback when it is not registered.
        if self.status & status::DRIVER_OK == 0 {
            rate_limited_warn!(
                "virtio-mmio: QueueNotify({}) before DRIVER_OK; ignored",
                value
            );
            return;
        }
        match self.handler.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    rate_limited_warn!("virtio-mmio: cannot signal queue {}: {}", value, e);
                }
            }
            None => rate_limited_warn!(
                "virtio-mmio: QueueNotify for queue {} that does not exist",
                value
            ),
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => halves(self.device_features).0,
                1 => halves(self.device_features).1,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.shared.interrupt_status.load(Ordering::SeqCst),
            reg::STATUS => self.read_status(),
            // No shared memory regions: a length of -1 says so (virtio 1.2 §4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::QUEUE_RESET => 0,
            reg::CONFIG_GENERATION => self.shared.config_generation.load(Ordering::SeqCst),
            _ => {
                rate_limited_warn!(
                    "virtio-mmio: read of write-only or unknown register {:#x}",
                    offset
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            reg::QUEUE_NOTIFY => self.queue_notify(value),
            reg::INTERRUPT_ACK => {
                self.shared
                    .interrupt_status
                    .fetch_and(!value, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            _ => rate_limited_warn!(
                "virtio-mmio: write of {:#x} to read-only or unknown register {:#x}; ignored",
                value,
                offset
            ),
        }
    }
}

/// Config space accesses must be 1, 2, 4 or 8 bytes, naturally aligned (virtio 1.2 §4.2.2.2).
fn config_access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8) && offset.is_multiple_of(len as u64)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if !config_access_ok(offset, data.len()) {
                rate_limited_warn!(
                    "virtio-mmio: {}-byte config read at {:#x} is not naturally aligned",
                    data.len(),
                    offset
                );
                data.fill(0);
                return;
            }
            let slot = lock_slot(&self.handler.slot);
            slot.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            rate_limited_warn!(
                "virtio-mmio: {}-byte register read at {:#x}; registers are 32-bit aligned",
                data.len(),
                offset
            );
            data.fill(0);
            return;
        }
        let value = self.read_reg(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if !config_access_ok(offset, data.len()) {
                rate_limited_warn!(
                    "virtio-mmio: {}-byte config write at {:#x} is not naturally aligned; ignored",
                    data.len(),
                    offset
                );
                return;
            }
            let mut slot = lock_slot(&self.handler.slot);
            slot.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            rate_limited_warn!(
                "virtio-mmio: {}-byte register write at {:#x}; ignored",
                data.len(),
                offset
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            rate_limited_warn!(
                "virtio-mmio: unaligned register write at {:#x}; ignored",
                offset
            );
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
