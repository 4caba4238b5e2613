//! How a device tells the VMM's event loop what to watch. The loop owns one epoll; each
//! device is an [`EventSubscriber`] that adds and removes its own fds through [`EventOps`]
//! (at start, and whenever its needs change, e.g. a virtio device that the driver activated
//! or reset), and is called back with the fd that became ready. The loop knows no device's
//! fds, queues or life cycle.

use std::io;
use std::os::fd::RawFd;

/// The loop's side, handed to a subscriber for the duration of a call.
pub trait EventOps {
    /// Watches `fd` for input: level-triggered, or edge-triggered (then drain it until
    /// EAGAIN, or remember that it is readable).
    fn add(&mut self, fd: RawFd, edge_triggered: bool) -> io::Result<()>;
    /// Stops watching `fd` (one this subscriber added).
    fn remove(&mut self, fd: RawFd);
}

/// A device whose work runs on the event loop.
pub trait EventSubscriber: Send {
    /// Adds every fd the device needs watched now. Called when the device joins the loop
    /// and again when the loop resumes it after a pause (which removed all its fds).
    fn init(&mut self, ops: &mut dyn EventOps);
    /// `fd`, one this subscriber added, is ready.
    fn process(&mut self, fd: RawFd, ops: &mut dyn EventOps);
}
