//! Interrupt lines from devices into the guest.

use std::io;
use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line into the guest. In the VMM it is a KVM irqfd: writing the
/// eventfd raises the GSI in the in-kernel irqchip without leaving the calling thread.
pub trait InterruptLine: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// An interrupt line backed by an eventfd that the VMM has registered as a KVM irqfd.
pub struct IrqFd(pub EventFd);

impl InterruptLine for IrqFd {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
