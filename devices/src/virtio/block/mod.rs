//! virtio-blk (virtio 1.2 §5.2) over a [`DiskBackend`](crate::disk::DiskBackend).

mod device;
mod request;
#[cfg(test)]
mod tests;

pub use device::{Block, BlockCounters, BlockError};
pub use request::{Disk, SECTOR_SIZE, SERIAL_LEN};

/// Feature bits (virtio 1.2 §5.2.3).
pub mod features {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types (virtio 1.2 §5.2.6).
pub mod request_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values (virtio 1.2 §5.2.6).
pub mod request_status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (the header and status descriptors come on top).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Limits for DISCARD and WRITE_ZEROES, in 512-byte sectors and segments per request.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;
pub const MAX_DISCARD_SEG: u32 = 16;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = u32::MAX >> 9;
pub const MAX_WRITE_ZEROES_SEG: u32 = 16;
