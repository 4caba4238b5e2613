//! virtio-vsock (virtio 1.2 §5.10), stream sockets only, with Firecracker's host side over
//! Unix sockets (see [`muxer`]).
//!
//! # How the VMM wires it
//!
//! ```text
//! let vsock = Vsock::new(guest_cid, &uds_path)?;  // binds uds_path (a stale socket is replaced)
//! let (transport, handle) = MmioTransport::with_handle(vsock, mem.clone(), irq)?;
//! // then as every virtio device (crate::virtio docs): three queue ioeventfds (rx 0, tx 1,
//! // event 2) and the handler on the event loop, which watches the muxer's epoll fd from
//! // DRIVER_OK until reset.
//! ```
//!
//! Queues: rx (0) carries packets to the guest, tx (1) packets from it, event (2) is kept
//! but unused (its one event, TRANSPORT_RESET, follows a snapshot restore). Each turn takes
//! a bounded number of chains from each queue and events from the sockets, then yields.

mod conn;
mod device;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;
mod uds;

pub use device::{Vsock, VsockCounters};
pub use muxer::{MuxerError, BUF_ALLOC, MAX_CONNECTIONS, MAX_PAYLOAD};
pub use uds::check_uds_path;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVT_QUEUE: usize = 2;
/// Guest CIDs 0-2 are reserved (hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;
