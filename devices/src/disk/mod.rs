//! Disk image formats behind one trait. Nothing here knows virtio: a backend is a
//! byte-addressed virtual disk.

pub mod qcow2;
pub mod raw;

use std::io;

/// A virtual disk. All offsets and lengths are in bytes of the virtual disk; callers
/// (virtio-blk) have already checked that requests lie inside `len()`.
pub trait DiskBackend: Send {
    /// Size of the virtual disk in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill all of `buf` from `offset`; bytes past the end of the data read as zero.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write all of `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Make every completed write (data and any metadata) stable before returning.
    fn flush(&mut self) -> io::Result<()>;
    /// The range's contents may be dropped to free space; afterwards it reads as zeros or
    /// as its old contents (virtio 1.2 §5.2.6.2 leaves that open).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// The range reads as zeros afterwards; `may_unmap` allows freeing its space.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
    /// Whether the backend refuses writes.
    fn read_only(&self) -> bool;
}
