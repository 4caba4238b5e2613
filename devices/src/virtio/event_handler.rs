//! How a virtio device behind its transport is reached from outside the vCPU threads: the
//! event loop's [`VirtioEventHandler`] (queue notifications, then the device's own fds from
//! activation until reset) and the VMM's typed [`DeviceHandle`]. Both share the device's
//! lock with the [`MmioTransport`](super::MmioTransport).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use super::{SharedState, VirtioDevice};
use crate::events::{EventOps, EventSubscriber};

/// The device behind its own lock, shared between the transport, the event loop and the
/// VMM's typed [`DeviceHandle`]. The device is the last field so that a slot of a concrete
/// device coerces to a slot of `dyn VirtioDevice`.
pub(super) struct DeviceSlot<D: ?Sized> {
    pub(super) active: bool,
    pub(super) device: D,
}

pub(super) type Slot = Mutex<DeviceSlot<dyn VirtioDevice>>;

/// The event loop's handle on a device: an [`EventSubscriber`] that watches the queue
/// notifications, and the device's own fds (e.g. a tap) from activation until reset.
#[derive(Clone)]
pub struct VirtioEventHandler {
    pub(super) slot: Arc<Slot>,
    pub(super) queue_evts: Arc<Vec<EventFd>>,
    /// Written by the transport (on a vCPU thread) when the driver activated or reset the
    /// device: the set of device fds to watch changed.
    pub(super) activate_evt: Arc<EventFd>,
    /// The device fds this handler has added to the loop, with their index in
    /// `VirtioDevice::device_fds`.
    pub(super) watched: Vec<(RawFd, usize)>,
}

pub(super) fn lock_slot<D: ?Sized>(slot: &Mutex<DeviceSlot<D>>) -> MutexGuard<'_, DeviceSlot<D>> {
    // A device that panicked keeps its last state; refusing every later access would wedge
    // the VMM's event loop.
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VirtioEventHandler {
    /// The queue notification eventfds (same fds as [`MmioTransport::queue_evts`]).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Queue `index`'s eventfd is readable: consume it and let the device process the queue.
    /// A notification before DRIVER_OK (or after a reset) is consumed and ignored.
    pub fn process_queue(&self, index: usize) {
        let Some(evt) = self.queue_evts.get(index) else {
            rate_limited_warn!(
                "virtio: process_queue({}) for a queue that does not exist",
                index
            );
            return;
        };
        // EAGAIN: a spurious wake-up or a notification already consumed; process anyway.
        let _ = evt.read();
        let mut slot = lock_slot(&self.slot);
        if slot.active {
            slot.device.process_queue(index);
        } else {
            rate_limited_warn!(
                "virtio: queue {} notified while the device is not active; ignored",
                index
            );
        }
    }

    /// The device's extra fds to watch now (EPOLLIN | EPOLLET); empty while inactive.
    pub fn device_fds(&self) -> Vec<RawFd> {
        let slot = lock_slot(&self.slot);
        if slot.active {
            slot.device.device_fds()
        } else {
            Vec::new()
        }
    }

    /// `device_fds()[index]` is readable.
    pub fn process_device_fd(&self, index: usize) {
        let mut slot = lock_slot(&self.slot);
        if slot.active {
            slot.device.process_device_fd(index);
        }
    }
}

impl VirtioEventHandler {
    /// Watches the device's fds as they are now (none while inactive), instead of those
    /// watched before.
    fn sync_device_fds(&mut self, ops: &mut dyn EventOps) {
        for (fd, _) in self.watched.drain(..) {
            ops.remove(fd);
        }
        for (index, fd) in self.device_fds().into_iter().enumerate() {
            match ops.add(fd, true) {
                Ok(()) => self.watched.push((fd, index)),
                Err(e) => log::error!("virtio: cannot watch device fd {fd}: {e}"),
            }
        }
    }
}

impl EventSubscriber for VirtioEventHandler {
    fn init(&mut self, ops: &mut dyn EventOps) {
        for evt in self.queue_evts.iter().chain([&*self.activate_evt]) {
            if let Err(e) = ops.add(evt.as_raw_fd(), false) {
                log::error!("virtio: cannot watch a queue eventfd: {e}");
            }
        }
        // After a pause the fds were removed by the loop, not by us.
        self.watched.clear();
        self.sync_device_fds(ops);
        if lock_slot(&self.slot).active {
            // Look at every queue once: buffers may have been added while the loop did not
            // watch (after a pause), and a tap's data is only seen with the rx queue.
            for evt in self.queue_evts.iter() {
                let _ = evt.write(1);
            }
        }
    }

    fn process(&mut self, fd: RawFd, ops: &mut dyn EventOps) {
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            self.sync_device_fds(ops);
        } else if let Some(q) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            self.process_queue(q);
        } else if let Some(&(_, index)) = self.watched.iter().find(|(w, _)| *w == fd) {
            self.process_device_fd(index);
        }
    }
}

/// The VMM's typed handle on a device behind its transport (e.g. a `Block` for a media
/// change, a flush or metrics), from [`MmioTransport::with_handle`]. No downcast: the type is
/// the one the transport was made with.
pub struct DeviceHandle<D> {
    pub(super) slot: Arc<Mutex<DeviceSlot<D>>>,
    pub(super) shared: Arc<SharedState>,
}

impl<D> Clone for DeviceHandle<D> {
    fn clone(&self) -> Self {
        Self {
            slot: self.slot.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<D: VirtioDevice> DeviceHandle<D> {
    /// Runs `f` on the device, under its lock, with no signal to the driver.
    pub fn with<T>(&self, f: impl FnOnce(&mut D) -> T) -> T {
        f(&mut lock_slot(&self.slot).device)
    }

    /// Changes the device's configuration from the event loop, between two requests: `f`
    /// runs under the device's lock. When it returns `Ok`, ConfigGeneration is bumped after
    /// the change, so that a driver whose read of the config space straddled it reads again
    /// (virtio 1.2 §2.5), and, once the driver has the device running (DRIVER_OK), the
    /// configuration change interrupt is raised. On `Err` nothing is signalled.
    pub fn change_config<T, E>(&self, f: impl FnOnce(&mut D) -> Result<T, E>) -> Result<T, E> {
        let mut slot = lock_slot(&self.slot);
        let out = f(&mut slot.device)?;
        self.shared.config_generation.fetch_add(1, Ordering::SeqCst);
        if slot.active {
            self.shared.raise(super::INT_CONFIG_CHANGE);
        }
        Ok(out)
    }
}
