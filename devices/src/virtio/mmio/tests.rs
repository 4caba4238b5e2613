//! The virtio-mmio transport driven through its registers.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex as StdMutex;

use super::*;
use crate::events::{EventOps, EventSubscriber};
use crate::virtio::testing::{regs, Driver};
use crate::virtio::{ActivateError, INT_CONFIG_CHANGE};

/// A device with two queues and one extra fd (a real eventfd standing in for a tap),
/// recording what the transport asks of it.
struct TwoQueueDevice {
    extra: EventFd,
    log: Arc<StdMutex<Vec<String>>>,
    interrupt: Option<VirtioInterrupt>,
    config: [u8; 8],
}

impl VirtioDevice for TwoQueueDevice {
    fn device_type(&self) -> u32 {
        super::super::device_type::NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let o = offset as usize;
        data.fill(0);
        if o + data.len() <= self.config.len() {
            data.copy_from_slice(&self.config[o..o + data.len()]);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        if o + data.len() <= self.config.len() {
            self.config[o..o + data.len()].copy_from_slice(data);
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        assert_eq!(a.queue_evts.len(), 2);
        let ready: Vec<bool> = a.queues.iter().map(|q| q.ready()).collect();
        self.log
            .lock()
            .unwrap()
            .push(format!("activate {:#x} {:?}", a.acked_features, ready));
        self.interrupt = Some(a.interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.log.lock().unwrap().push("reset".into());
        self.interrupt = None;
    }
    fn process_queue(&mut self, index: usize) {
        self.log.lock().unwrap().push(format!("queue {index}"));
    }
    fn device_fds(&self) -> Vec<RawFd> {
        vec![self.extra.as_raw_fd()]
    }
    fn process_device_fd(&mut self, index: usize) {
        let _ = self.extra.read();
        self.log.lock().unwrap().push(format!("fd {index}"));
        if let Some(i) = &self.interrupt {
            i.signal_config_change();
        }
    }
}

fn two_queue_driver() -> (Driver, Arc<StdMutex<Vec<String>>>, RawFd) {
    let log = Arc::new(StdMutex::new(Vec::new()));
    let extra = EventFd::new(EFD_NONBLOCK).unwrap();
    let fd = extra.as_raw_fd();
    let dev = TwoQueueDevice {
        extra,
        log: log.clone(),
        interrupt: None,
        config: *b"abcdefgh",
    };
    (Driver::new(Box::new(dev)), log, fd)
}

/// The loop's side for a subscriber: which fds it watches, and how.
#[derive(Default)]
struct Watched(std::collections::BTreeMap<RawFd, bool>);

impl EventOps for Watched {
    fn add(&mut self, fd: RawFd, edge_triggered: bool) -> std::io::Result<()> {
        assert!(
            self.0.insert(fd, edge_triggered).is_none(),
            "fd {fd} added twice"
        );
        Ok(())
    }
    fn remove(&mut self, fd: RawFd) {
        assert!(
            self.0.remove(&fd).is_some(),
            "fd {fd} removed but not watched"
        );
    }
}

#[test]
fn device_fds_are_watched_from_activation_until_reset() {
    let (mut d, log, fd) = two_queue_driver();
    assert_eq!(d.transport.queue_evts().len(), 2);
    let queues: Vec<RawFd> = d
        .transport
        .queue_evts()
        .iter()
        .map(|e| e.as_raw_fd())
        .collect();
    let mut h = d.transport.event_handler();
    let mut ops = Watched::default();
    h.init(&mut ops);
    // The queues and the activation eventfd, level-triggered; no device fd yet.
    assert_eq!(ops.0.len(), 3);
    assert!(ops.0.values().all(|edge| !edge));
    let activate = *ops.0.keys().find(|f| !queues.contains(f)).unwrap();
    d.start_queues(features::VERSION_1, 2);
    h.process(activate, &mut ops);
    assert_eq!(ops.0.get(&fd), Some(&true), "the device fd, edge-triggered");
    assert_eq!(log.lock().unwrap()[0], "activate 0x100000000 [true, true]");

    d.transport.queue_evts()[1].write(1).unwrap();
    h.process(queues[1], &mut ops);
    h.process(fd, &mut ops);
    assert_eq!(&log.lock().unwrap()[1..], ["queue 1", "fd 0"]);
    // The device's config-change signal: generation bumped, bit 2, interrupt.
    assert_eq!(d.read32(regs::CONFIG_GENERATION), 1);
    assert_eq!(d.read32(regs::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    assert_eq!(d.take_interrupts(), 1);

    d.write32(regs::STATUS, 0);
    h.process(activate, &mut ops);
    assert!(
        !ops.0.contains_key(&fd),
        "the device fd is no longer watched"
    );
    assert_eq!(ops.0.len(), 3);
    assert_eq!(log.lock().unwrap().last().unwrap(), "reset");
    // Inactive: no more calls into the device.
    h.process_device_fd(0);
    d.transport.queue_evts()[0].write(1).unwrap();
    h.process(queues[0], &mut ops);
    assert_eq!(log.lock().unwrap().last().unwrap(), "reset");
}

#[test]
fn a_resumed_device_watches_its_fds_again_and_looks_at_every_queue() {
    let (mut d, log, fd) = two_queue_driver();
    let mut h = d.transport.event_handler();
    let mut ops = Watched::default();
    h.init(&mut ops);
    d.start_queues(features::VERSION_1, 2);
    let queues: Vec<RawFd> = d
        .transport
        .queue_evts()
        .iter()
        .map(|e| e.as_raw_fd())
        .collect();
    let activate = *ops.0.keys().find(|f| !queues.contains(f)).unwrap();
    h.process(activate, &mut ops);
    // A pause: the loop removed every fd of the device.
    let mut ops = Watched::default();
    h.init(&mut ops);
    assert_eq!(ops.0.get(&fd), Some(&true));
    assert_eq!(ops.0.len(), 4);
    for (q, evt) in d.transport.queue_evts().iter().enumerate() {
        assert_eq!(evt.read().unwrap(), 1, "queue {q} is looked at once");
    }
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[test]
fn config_space_accesses_reach_the_device_with_natural_alignment_only() {
    let (mut d, _, _) = two_queue_driver();
    let mut b = [0u8; 2];
    d.transport.read(0x102, &mut b);
    assert_eq!(&b, b"cd");
    d.transport.write(0x104, b"XY");
    let mut b = [0u8; 8];
    d.transport.read(0x100, &mut b);
    assert_eq!(&b, b"abcdXYgh");
    // Misaligned: a 2-byte access at an odd offset, a 3-byte access.
    d.transport.write(0x101, b"zz");
    d.transport.write(0x100, b"zzz");
    let mut b = [0xffu8; 2];
    d.transport.read(0x101, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0u8; 8];
    d.transport.read(0x100, &mut b);
    assert_eq!(&b, b"abcdXYgh");
}

#[test]
fn status_bits_must_be_set_in_order() {
    let (mut d, log, _) = two_queue_driver();
    // DRIVER without ACKNOWLEDGE, FEATURES_OK without DRIVER.
    d.write32(regs::STATUS, status::DRIVER);
    assert_eq!(d.status(), 0);
    d.write32(regs::STATUS, status::ACKNOWLEDGE);
    d.write32(regs::STATUS, status::ACKNOWLEDGE | status::FEATURES_OK);
    assert_eq!(d.status(), status::ACKNOWLEDGE);
    // DRIVER_OK straight after DRIVER.
    d.write32(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.write32(
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(d.status(), status::ACKNOWLEDGE | status::DRIVER);
    assert!(log.lock().unwrap().is_empty(), "device activated early");
    // FAILED may be set at any time and is kept.
    d.write32(
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
    );
    assert_eq!(
        d.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED
    );
}

#[test]
fn queue_registers_are_per_queue_and_frozen_once_ready() {
    let (mut d, _, _) = two_queue_driver();
    d.negotiate(features::VERSION_1);
    d.setup_queue(0);
    d.write32(regs::QUEUE_SEL, 1);
    assert_eq!(d.read32(regs::QUEUE_READY), 0);
    assert_eq!(d.read32(regs::QUEUE_NUM_MAX), 16);
    d.write32(regs::QUEUE_SEL, 0);
    assert_eq!(d.read32(regs::QUEUE_READY), 1);
    // Changing a ready queue's size is ignored; disabling it before DRIVER_OK works.
    d.write32(regs::QUEUE_NUM, 4);
    d.write32(regs::QUEUE_READY, 0);
    assert_eq!(d.read32(regs::QUEUE_READY), 0);
    d.write32(regs::QUEUE_READY, 1);
    assert_eq!(d.read32(regs::QUEUE_READY), 1);
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}
