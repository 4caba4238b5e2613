//! A host-side virtio driver for tests: it plays the guest through the MMIO registers of a
//! real `MmioTransport`, builds split-ring descriptor chains in a real `GuestMemoryMmap`,
//! kicks the queue and reads the used ring and InterruptStatus.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{status, DeviceHandle, MmioTransport, VirtioDevice, VirtioEventHandler};
use crate::bus::BusDevice;
use crate::interrupt::IrqFd;

pub const MEM_SIZE: usize = 4 << 20;
pub const CANARY: u8 = 0xa5;
/// Queue q's rings: descriptor table at 0x1000 + q * 0x3000, avail ring 0x1000 above it,
/// used ring 0x2000 above it (room for 256 entries each; queues 0..4).
pub const fn desc_table(q: u32) -> u64 {
    0x1000 + 0x3000 * q as u64
}
pub const fn avail_ring(q: u32) -> u64 {
    desc_table(q) + 0x1000
}
pub const fn used_ring(q: u32) -> u64 {
    desc_table(q) + 0x2000
}
/// Queue 0's rings.
pub const DESC_TABLE: u64 = desc_table(0);
pub const AVAIL_RING: u64 = avail_ring(0);
pub const USED_RING: u64 = used_ring(0);
pub const DATA_START: u64 = 0x10000;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

pub mod regs {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = 0x50;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_DRIVER_LOW: u64 = 0x90;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x94;
    pub const QUEUE_DEVICE_LOW: u64 = 0xa0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0xa4;
    pub const CONFIG_GENERATION: u64 = 0xfc;
    pub const CONFIG: u64 = 0x100;
}

/// One descriptor of a chain the test builds: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    /// A buffer the device reads (driver -> device).
    pub fn readable(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes (device -> driver).
    pub fn writable(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// MEM_SIZE bytes of guest memory at 0, filled with [`CANARY`].
pub fn guest_memory() -> GuestMemoryMmap {
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    mem.write_slice(&vec![CANARY; MEM_SIZE], GuestAddress(0))
        .expect("fill guest memory");
    mem
}

/// The driver's view of one queue.
#[derive(Clone, Copy, Default)]
struct DriverQueue {
    next_desc: u16,
    avail_idx: u16,
}

pub struct Driver {
    pub transport: MmioTransport,
    pub handler: VirtioEventHandler,
    /// A `DeviceHandle<D>` for the device type `D` the driver was made with.
    device: Box<dyn std::any::Any>,
    pub mem: GuestMemoryMmap,
    irq_evt: EventFd,
    /// Size the driver programs into every queue it sets up (at most 256).
    pub queue_size: u16,
    queues: [DriverQueue; 4],
    next_data: u64,
}

impl Driver {
    /// Guest memory filled with [`CANARY`], the device behind a transport whose interrupt
    /// line is a real eventfd.
    pub fn new<D: VirtioDevice>(device: Box<D>) -> Driver {
        Driver::with_memory(device, guest_memory())
    }

    /// Like `new`, with memory from [`guest_memory`] that the test also gave a backend.
    // Boxed for the callers' `Driver::new(Box::new(device))`, kept from when devices were
    // passed as `Box<dyn VirtioDevice>`.
    #[allow(clippy::boxed_local)]
    pub fn with_memory<D: VirtioDevice>(device: Box<D>, mem: GuestMemoryMmap) -> Driver {
        let irq_evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let line = Arc::new(IrqFd(irq_evt.try_clone().expect("clone eventfd")));
        let (transport, handle) =
            MmioTransport::with_handle(*device, mem.clone(), line).expect("transport");
        let handler = transport.event_handler();
        Driver {
            transport,
            handler,
            device: Box::new(handle),
            mem,
            irq_evt,
            queue_size: 16,
            queues: Default::default(),
            next_data: DATA_START,
        }
    }

    /// A new transport for `device` over this driver's memory, put into this transport's
    /// state as a snapshot restore does, with the driver's own bookkeeping carried over (the
    /// guest's memory and driver go on; the VMM side is new).
    pub fn restored<D: VirtioDevice>(
        &self,
        device: Box<D>,
    ) -> Result<Driver, crate::virtio::mmio::MmioError> {
        let mut d = Driver::with_memory(device, self.mem.clone());
        d.transport.restore(&self.transport.state())?;
        d.queue_size = self.queue_size;
        d.queues = self.queues;
        d.next_data = self.next_data;
        Ok(d)
    }

    /// The VMM's typed handle on the device (`D` is the type the driver was made with).
    pub fn device<D: VirtioDevice>(&self) -> &DeviceHandle<D> {
        self.device
            .downcast_ref()
            .expect("the device has the type the driver was made with")
    }

    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write32(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    pub fn status(&mut self) -> u32 {
        self.read32(regs::STATUS)
    }

    pub fn device_features(&mut self) -> u64 {
        self.write32(regs::DEVICE_FEATURES_SEL, 0);
        let lo = self.read32(regs::DEVICE_FEATURES);
        self.write32(regs::DEVICE_FEATURES_SEL, 1);
        let hi = self.read32(regs::DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// ACKNOWLEDGE, DRIVER, write `accepted` features, FEATURES_OK; returns Status read back.
    pub fn negotiate(&mut self, accepted: u64) -> u32 {
        self.write32(regs::STATUS, status::ACKNOWLEDGE);
        self.write32(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write32(regs::DRIVER_FEATURES_SEL, 0);
        self.write32(regs::DRIVER_FEATURES, accepted as u32);
        self.write32(regs::DRIVER_FEATURES_SEL, 1);
        self.write32(regs::DRIVER_FEATURES, (accepted >> 32) as u32);
        self.write32(
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.status()
    }

    /// Programs queue `index` (0..4) with its rings (zeroed first) and enables it.
    pub fn setup_queue(&mut self, index: u32) {
        assert!(
            index < 4 && self.queue_size <= 256,
            "harness supports 4 queues of <= 256"
        );
        let n = usize::from(self.queue_size);
        self.write32(regs::QUEUE_SEL, index);
        self.write32(regs::QUEUE_NUM, u32::from(self.queue_size));
        for (lo, hi, addr) in [
            (
                regs::QUEUE_DESC_LOW,
                regs::QUEUE_DESC_HIGH,
                desc_table(index),
            ),
            (
                regs::QUEUE_DRIVER_LOW,
                regs::QUEUE_DRIVER_HIGH,
                avail_ring(index),
            ),
            (
                regs::QUEUE_DEVICE_LOW,
                regs::QUEUE_DEVICE_HIGH,
                used_ring(index),
            ),
        ] {
            self.write32(lo, addr as u32);
            self.write32(hi, (addr >> 32) as u32);
        }
        self.mem
            .write_slice(&vec![0u8; 16 * n], GuestAddress(desc_table(index)))
            .unwrap();
        self.mem
            .write_slice(&vec![0u8; 6 + 2 * n], GuestAddress(avail_ring(index)))
            .unwrap();
        self.mem
            .write_slice(&vec![0u8; 6 + 8 * n], GuestAddress(used_ring(index)))
            .unwrap();
        self.queues[index as usize] = DriverQueue::default();
        self.write32(regs::QUEUE_READY, 1);
    }

    pub fn driver_ok(&mut self) -> u32 {
        let s = self.status();
        self.write32(regs::STATUS, s | status::DRIVER_OK);
        self.status()
    }

    /// The whole init sequence accepting `accepted` and setting up queues 0..`queues`;
    /// asserts the device took it.
    pub fn start_queues(&mut self, accepted: u64, queues: u32) {
        let s = self.negotiate(accepted);
        assert_ne!(
            s & status::FEATURES_OK,
            0,
            "device refused features {accepted:#x}"
        );
        for q in 0..queues {
            self.setup_queue(q);
        }
        let s = self.driver_ok();
        assert_eq!(
            s,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
        );
    }

    /// Init accepting `accepted`, with queue 0 only.
    pub fn start_with(&mut self, accepted: u64) {
        self.start_queues(accepted, 1);
    }

    /// Init accepting every offered feature, with queue 0 only.
    pub fn start(&mut self) {
        let f = self.device_features();
        self.start_with(f);
    }

    /// A fresh 16-byte-aligned buffer of `len` bytes in guest memory.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_data;
        self.next_data = (a + len + 15) & !15;
        assert!(
            self.next_data <= MEM_SIZE as u64,
            "test guest memory exhausted"
        );
        a
    }

    pub fn write_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(table + 16 * u64::from(index)))
            .unwrap();
    }

    /// Writes `bufs` as a chain in consecutive free descriptors of queue `q`; returns the
    /// head index.
    pub fn add_chain_to(&mut self, q: u32, bufs: &[Buf]) -> u16 {
        let head = self.reserve_descs_in(q, bufs.len() as u16);
        for (i, b) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.queue_size;
            let last = i + 1 == bufs.len();
            let mut flags = if b.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let next = (idx + 1) % self.queue_size;
            self.write_desc(desc_table(q), idx, b.addr, b.len, flags, next);
        }
        head
    }

    /// Queue 0's `add_chain_to`.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        self.add_chain_to(0, bufs)
    }

    /// Reserves `n` descriptor slots of queue `q` for a chain the test writes itself.
    pub fn reserve_descs_in(&mut self, q: u32, n: u16) -> u16 {
        let dq = &mut self.queues[q as usize];
        let head = dq.next_desc;
        dq.next_desc = (head + n) % self.queue_size;
        head
    }

    /// Queue 0's `reserve_descs_in`.
    pub fn reserve_descs(&mut self, n: u16) -> u16 {
        self.reserve_descs_in(0, n)
    }

    /// Puts `head` in queue `q`'s avail ring and publishes it.
    pub fn publish_to(&mut self, q: u32, head: u16) {
        let size = self.queue_size;
        let dq = &mut self.queues[q as usize];
        let slot = u64::from(dq.avail_idx % size);
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        let idx = dq.avail_idx;
        self.mem
            .write_obj(head, GuestAddress(avail_ring(q) + 4 + 2 * slot))
            .unwrap();
        self.mem
            .write_obj(idx, GuestAddress(avail_ring(q) + 2))
            .unwrap();
    }

    /// Queue 0's `publish_to`.
    pub fn publish(&mut self, head: u16) {
        self.publish_to(0, head)
    }

    /// Writes QueueNotify through the register path (as when no ioeventfd is registered),
    /// then runs the event loop's handler for the queue.
    pub fn kick(&mut self, queue: u32) {
        self.write32(regs::QUEUE_NOTIFY, queue);
        assert!(
            self.handler.queue_evts()[queue as usize].read().is_ok(),
            "QueueNotify did not signal the queue eventfd"
        );
        // Re-arm it as the ioeventfd would have, and let the handler consume it.
        self.handler.queue_evts()[queue as usize].write(1).unwrap();
        self.handler.process_queue(queue as usize);
    }

    /// Plays the event loop for queue `queue`: while the device has asked to be called
    /// again (it re-armed the queue's eventfd to finish its work on a later turn), calls it.
    /// Returns the turns run; stops after `max`.
    pub fn run_turns(&mut self, queue: u32, max: usize) -> usize {
        let evt = &self.handler.queue_evts()[queue as usize];
        let mut turns = 0;
        while turns < max && evt.read().is_ok() {
            evt.write(1).unwrap();
            self.handler.process_queue(queue as usize);
            turns += 1;
        }
        turns
    }

    /// The used ring's idx of queue `q`.
    pub fn used_idx_of(&self, q: u32) -> u16 {
        self.mem.read_obj(GuestAddress(used_ring(q) + 2)).unwrap()
    }

    pub fn used_idx(&self) -> u16 {
        self.used_idx_of(0)
    }

    /// (id, len) of used ring entry `i` of queue `q`.
    pub fn used_elem_of(&self, q: u32, i: u16) -> (u32, u32) {
        let base = used_ring(q) + 4 + 8 * u64::from(i % self.queue_size);
        (
            self.mem.read_obj(GuestAddress(base)).unwrap(),
            self.mem.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }

    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        self.used_elem_of(0, i)
    }

    /// How many times the interrupt line fired since the last call.
    pub fn take_interrupts(&self) -> u64 {
        self.irq_evt.read().unwrap_or(0)
    }

    pub fn read_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.read_bytes(0, MEM_SIZE)
    }
}

/// A real epoll loop for one device's event handler, as the VMM's event loop runs it: the
/// handler adds and removes its own fds, and is called with each one that becomes ready.
pub struct EpollLoop {
    epoll: vmm_sys_util::epoll::Epoll,
    /// Wake-ups so far (each epoll_wait that returned events).
    pub wakeups: u64,
}

impl crate::events::EventOps for vmm_sys_util::epoll::Epoll {
    fn add(&mut self, fd: std::os::fd::RawFd, edge_triggered: bool) -> std::io::Result<()> {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let mut set = EventSet::IN;
        if edge_triggered {
            set |= EventSet::EDGE_TRIGGERED;
        }
        self.ctl(ControlOperation::Add, fd, EpollEvent::new(set, fd as u64))
    }

    fn remove(&mut self, fd: std::os::fd::RawFd) {
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent};
        let _ = self.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

impl EpollLoop {
    /// The loop with `handler`'s fds added.
    pub fn new(handler: &mut VirtioEventHandler) -> EpollLoop {
        use crate::events::EventSubscriber;
        let mut epoll = vmm_sys_util::epoll::Epoll::new().expect("epoll");
        handler.init(&mut epoll);
        EpollLoop { epoll, wakeups: 0 }
    }

    /// Serves `handler` until `done()` holds (checked after each wake-up); false if
    /// `timeout` passed first.
    pub fn run_until(
        &mut self,
        handler: &mut VirtioEventHandler,
        timeout: std::time::Duration,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        use crate::events::EventSubscriber;
        let deadline = std::time::Instant::now() + timeout;
        let mut events = vec![vmm_sys_util::epoll::EpollEvent::default(); 16];
        while !done() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let n = match self.epoll.wait(left.as_millis() as i32 + 1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("epoll_wait: {e}"),
            };
            if n > 0 {
                self.wakeups += 1;
            }
            for ev in &events[..n] {
                handler.process(ev.data() as std::os::fd::RawFd, &mut self.epoll);
            }
        }
        true
    }
}
