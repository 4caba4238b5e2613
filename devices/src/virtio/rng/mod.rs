//! virtio-rng, the entropy device (virtio 1.2 §5.4): one request queue whose device-writable
//! buffers the device fills with random bytes from the host's `getrandom(2)`.
//!
//! # How the VMM wires it
//!
//! ```text
//! let rng = Rng::new();
//! let counters = rng.counters();                // Arc<RngCounters>: requests, bytes, failures
//! let (transport, handle) = MmioTransport::with_handle(rng, mem.clone(), irq)?;
//! // then as every virtio device (crate::virtio docs): one queue ioeventfd (datamatch 0)
//! // and the handler on the event loop.
//! ```
//!
//! What a guest can make it do: each request gets at most [`MAX_BYTES_PER_CHAIN`] bytes
//! (the used length says how many), one event-loop turn serves at most [`BYTES_PER_TURN`]
//! bytes and [`CHAINS_PER_TURN`] chains before the device yields and comes back, and a
//! request the driver malformed (a driver-readable descriptor, a broken chain, a buffer
//! outside guest memory) is returned unwritten with a used length of 0.

mod device;
#[cfg(test)]
mod tests;

pub use device::{Rng, RngCounters};

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes given to one request at most; Linux's hw_random core asks for 32 to a few KiB.
pub const MAX_BYTES_PER_CHAIN: usize = 64 << 10;
/// Random bytes produced in one event-loop turn before the device yields.
pub const BYTES_PER_TURN: usize = 1 << 20;
/// Chains taken in one turn (malformed ones too) before the device yields.
pub const CHAINS_PER_TURN: u32 = 4 * QUEUE_SIZE as u32;
