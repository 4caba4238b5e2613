//! virtio-balloon (virtio 1.2 §5.5): the VMM sets a target of pages the guest should give
//! back; the driver hands pages over on the inflate queue (their host memory is returned to
//! the host with `madvise(MADV_DONTNEED)`) and takes them back on the deflate queue; with
//! VIRTIO_BALLOON_F_STATS_VQ it reports its memory statistics when the device asks.

mod device;
#[cfg(test)]
mod tests;

pub use device::{Balloon, BalloonCounters, BalloonStats};

/// Feature bits (virtio 1.2 §5.5.3).
pub mod features {
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
}

/// Queue indexes (virtio 1.2 §5.5.2).
pub const INFLATE_QUEUE: usize = 0;
pub const DEFLATE_QUEUE: usize = 1;
pub const STATS_QUEUE: usize = 2;

pub const QUEUE_SIZE: u16 = 256;

/// The balloon's page size, whatever the host's (virtio 1.2 §5.5.6: page frame numbers are
/// of 4096-byte pages).
pub const PAGE_SIZE: u64 = 4096;

/// Memory statistics tags (virtio 1.2 §5.5.6.3), with Firecracker's names for them.
pub const STAT_NAMES: [(u16, &str); 10] = [
    (0, "swap_in"),
    (1, "swap_out"),
    (2, "major_faults"),
    (3, "minor_faults"),
    (4, "free_memory"),
    (5, "total_memory"),
    (6, "available_memory"),
    (7, "disk_caches"),
    (8, "hugetlb_allocations"),
    (9, "hugetlb_failures"),
];
