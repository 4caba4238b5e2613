//! virtio-blk (virtio 1.2 §5.2) over a [`DiskBackend`](crate::disk::DiskBackend).

mod device;
mod request;
#[cfg(test)]
mod tests;

pub use device::{Block, BlockCounters, BlockError};
pub use request::{Disk, SECTOR_SIZE, SERIAL_LEN};

/// Feature bits (virtio 1.2 §5.2.3).
pub mod features {
    use virtio_bindings::virtio_blk as b;
    pub const SEG_MAX: u64 = 1 << b::VIRTIO_BLK_F_SEG_MAX;
    pub const RO: u64 = 1 << b::VIRTIO_BLK_F_RO;
    pub const BLK_SIZE: u64 = 1 << b::VIRTIO_BLK_F_BLK_SIZE;
    pub const FLUSH: u64 = 1 << b::VIRTIO_BLK_F_FLUSH;
    pub const DISCARD: u64 = 1 << b::VIRTIO_BLK_F_DISCARD;
    pub const WRITE_ZEROES: u64 = 1 << b::VIRTIO_BLK_F_WRITE_ZEROES;
}

/// Request types (virtio 1.2 §5.2.6).
pub mod request_type {
    use virtio_bindings::virtio_blk as b;
    pub const IN: u32 = b::VIRTIO_BLK_T_IN;
    pub const OUT: u32 = b::VIRTIO_BLK_T_OUT;
    pub const FLUSH: u32 = b::VIRTIO_BLK_T_FLUSH;
    pub const GET_ID: u32 = b::VIRTIO_BLK_T_GET_ID;
    pub const DISCARD: u32 = b::VIRTIO_BLK_T_DISCARD;
    pub const WRITE_ZEROES: u32 = b::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// Status byte values (virtio 1.2 §5.2.6).
pub mod request_status {
    use crate::virtio::byte;
    use virtio_bindings::virtio_blk as b;
    pub const OK: u8 = byte(b::VIRTIO_BLK_S_OK);
    pub const IOERR: u8 = byte(b::VIRTIO_BLK_S_IOERR);
    pub const UNSUPP: u8 = byte(b::VIRTIO_BLK_S_UNSUPP);
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
