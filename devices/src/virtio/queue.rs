//! Helpers over `virtio-queue` shared by the device models.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
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

/// Takes the next available chain. An error means the avail ring is unusable (its index
/// moved by more than the queue size, or it is outside guest memory): the device needs a
/// reset.
pub fn pop_chain<M>(
    queue: &mut Queue,
    mem: M,
) -> Result<Option<DescriptorChain<M>>, virtio_queue::Error>
where
    M: Clone + Deref,
    M::Target: GuestMemory,
{
    Ok(queue.iter(mem)?.next())
}
