//! Helpers over `virtio-queue` shared by the device models.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

/// How the walk of a descriptor chain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainEnd {
    /// The last descriptor had no NEXT flag.
    Complete,
    /// The walk stopped early: a loop or a chain longer than the queue (virtio-queue's
    /// per-chain budget ran out), a NEXT index outside the table, an unreadable descriptor
    /// or indirect table, or more than 4 GiB in total. Such a chain has no last descriptor.
    Broken,
}

/// Collects the descriptors of `chain` into `out` (cleared first). virtio-queue follows
/// indirect tables and stops silently on any error, so a chain whose last yielded
/// descriptor still says NEXT (or that yielded nothing) did not end properly.
pub fn collect_chain<M>(chain: DescriptorChain<M>, out: &mut Vec<Descriptor>) -> ChainEnd
where
    M: Deref,
    M::Target: GuestMemory,
{
    out.clear();
    out.extend(chain);
    match out.last() {
        Some(last) if !last.has_next() => ChainEnd::Complete,
        _ => ChainEnd::Broken,
    }
}

/// Why no chain could be taken: either way the ring cannot be used any more and the device
/// needs a reset (virtio 1.2 §2.1.2).
#[derive(Debug, thiserror::Error)]
pub enum PopError {
    /// The avail ring's index moved by more than the queue size, or the ring is outside
    /// guest memory.
    #[error("avail ring unusable: {0}")]
    Ring(#[source] virtio_queue::Error),
    /// An avail ring entry names a descriptor outside the table: such a chain can never be
    /// returned (the used ring takes only indexes inside it), so the driver is broken.
    #[error("avail ring entry names descriptor {head}, outside the queue of {size}")]
    HeadOutOfRange { head: u16, size: u16 },
}

/// Takes the next available chain, after checking its head index (virtio-queue would log
/// an error line for each bad one handed back to it, at the guest's pace).
pub fn pop_chain<M>(queue: &mut Queue, mem: M) -> Result<Option<DescriptorChain<M>>, PopError>
where
    M: Clone + Deref,
    M::Target: GuestMemory,
{
    let size = queue.size();
    let chain = queue.iter(mem).map_err(PopError::Ring)?.next();
    match chain {
        Some(c) if c.head_index() >= size => Err(PopError::HeadOutOfRange {
            head: c.head_index(),
            size,
        }),
        c => Ok(c),
    }
}

/// Gives the chain last taken with [`pop_chain`] back to the avail ring: the next pop takes
/// it again (a request the device must not start yet, e.g. held back by a rate limiter).
pub fn undo_pop(queue: &mut Queue) {
    queue.go_to_previous_position();
}
