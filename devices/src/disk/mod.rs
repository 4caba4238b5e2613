//! Disk image formats behind one trait. Nothing here knows virtio: a backend is a
//! byte-addressed virtual disk.

#[doc(hidden)]
pub mod fault;
mod lock;
pub mod open;
pub mod qcow2;
pub mod raw;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::cast::u64_to_usize;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

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
    /// Like `read_at` into the concatenation of `bufs` (guest memory). Raw and qcow2 read
    /// file data straight into the slices (preadv); the default bounces.
    fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut tmp = Vec::new();
        let mut pos = offset;
        for b in bufs {
            tmp.resize(b.len(), 0);
            self.read_at(pos, &mut tmp)?;
            b.copy_from(&tmp[..]);
            pos += b.len() as u64;
        }
        Ok(())
    }
    /// Like `write_at` from the concatenation of `bufs` (guest memory). Raw and qcow2 write
    /// from the slices straight to the file (pwritev); the default bounces.
    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut tmp = Vec::new();
        let mut pos = offset;
        for b in bufs {
            tmp.resize(b.len(), 0);
            b.copy_to(&mut tmp[..]);
            self.write_at(pos, &tmp)?;
            pos += b.len() as u64;
        }
        Ok(())
    }
    /// Make every completed write (data and any metadata) stable before returning.
    fn flush(&mut self) -> io::Result<()>;
    /// The range's contents may be dropped to free space; afterwards it reads as zeros or
    /// as its old contents (virtio 1.2 §5.2.6.2 leaves that open).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// The range reads as zeros afterwards; `may_unmap` allows freeing its space.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
    /// Whether the backend refuses writes.
    fn read_only(&self) -> bool;
    /// Tests and fuzzing: write-side file calls from now on ask `faults` first (see
    /// [`fault`]). Backends without the seam ignore it.
    #[doc(hidden)]
    fn set_faults(&mut self, _faults: Option<fault::Faults>) {}
}

/// Most iovecs one preadv/pwritev takes (Linux UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Calls `f(piece, position in the stream)` for the pieces of the slices that cover bytes
/// `skip..skip + len` of their concatenation. Fails if the slices end first.
pub(crate) fn for_each_piece<'s, B: BitmapSlice>(
    bufs: &[VolatileSlice<'s, B>],
    mut skip: u64,
    len: u64,
    mut f: impl FnMut(VolatileSlice<'s, B>, u64) -> io::Result<()>,
) -> io::Result<()> {
    let mut done = 0u64;
    for b in bufs {
        if done == len {
            break;
        }
        let blen = b.len() as u64;
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let n = (blen - skip).min(len - done);
        let piece = b
            .subslice(u64_to_usize(skip), u64_to_usize(n))
            .map_err(|e| io::Error::other(format!("guest buffer piece: {e}")))?;
        f(piece, done)?;
        done += n;
        skip = 0;
    }
    if done == len {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("guest buffers end after {done} of {len} bytes"),
        ))
    }
}

/// preadv (`read`) or pwritev of bytes `skip..skip + len` of the concatenated `bufs` at
/// file position `pos`, straight between the file and the slices. Reading past the end of
/// the file fills the rest with zeros.
pub(crate) fn file_vectored<B: BitmapSlice>(
    file: &File,
    pos: u64,
    bufs: &[VolatileSlice<B>],
    skip: u64,
    len: u64,
    read: bool,
) -> io::Result<()> {
    let mut done = 0u64;
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(IOV_MAX));
    let mut pieces = Vec::with_capacity(bufs.len().min(IOV_MAX));
    while done < len {
        iov.clear();
        pieces.clear();
        // The pieces for the bytes not done yet, at most IOV_MAX of them.
        let r = for_each_piece(bufs, skip + done, len - done, |piece, _| {
            if pieces.len() == IOV_MAX {
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
            pieces.push(piece);
            Ok(())
        });
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => r?,
        }
        let guards: Vec<_> = pieces.iter().map(|p| p.ptr_guard_mut()).collect();
        for (p, g) in pieces.iter().zip(&guards) {
            iov.push(libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: p.len(),
            });
        }
        let at = libc::off_t::try_from(pos + done)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // At most IOV_MAX (1024) pieces.
        #[allow(clippy::cast_possible_truncation)]
        let count = iov.len() as i32;
        // SAFETY: every iovec points into a VolatileSlice that stays mapped while `bufs`
        // is borrowed, its guard held in `guards` for the call; the kernel reads or writes
        // only those bytes.
        let n = unsafe {
            if read {
                libc::preadv(file.as_raw_fd(), iov.as_ptr(), count, at)
            } else {
                libc::pwritev(file.as_raw_fd(), iov.as_ptr(), count, at)
            }
        };
        drop(guards);
        if read {
            for p in &pieces {
                p.bitmap().mark_dirty(0, p.len());
            }
        }
        match n {
            // The file ends here: the rest reads as zeros.
            0 if read => return zero_vectored(bufs, skip + done, len - done),
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("pwritev at {} wrote nothing", pos + done),
                ))
            }
            n if n > 0 => done += n as u64,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Zeroes bytes `skip..skip + len` of the concatenated `bufs`.
pub(crate) fn zero_vectored<B: BitmapSlice>(
    bufs: &[VolatileSlice<B>],
    skip: u64,
    len: u64,
) -> io::Result<()> {
    const ZEROES: [u8; 4096] = [0; 4096];
    for_each_piece(bufs, skip, len, |piece, _| {
        let mut pos = 0;
        while pos < piece.len() {
            let n = (piece.len() - pos).min(ZEROES.len());
            piece
                .subslice(pos, n)
                .map_err(|e| io::Error::other(e.to_string()))?
                .copy_from(&ZEROES[..n]);
            pos += n;
        }
        Ok(())
    })
}

/// Copies `data` into the concatenated `bufs` from byte `skip` on.
pub(crate) fn copy_to_vectored<B: BitmapSlice>(
    bufs: &[VolatileSlice<B>],
    skip: u64,
    data: &[u8],
) -> io::Result<()> {
    for_each_piece(bufs, skip, data.len() as u64, |piece, at| {
        piece.copy_from(&data[u64_to_usize(at)..u64_to_usize(at) + piece.len()]);
        Ok(())
    })
}

/// Copies bytes `skip..skip + out.len()` of the concatenated `bufs` into `out`.
pub(crate) fn copy_from_vectored<B: BitmapSlice>(
    bufs: &[VolatileSlice<B>],
    skip: u64,
    out: &mut [u8],
) -> io::Result<()> {
    let len = out.len() as u64;
    for_each_piece(bufs, skip, len, |piece, at| {
        piece.copy_to(&mut out[u64_to_usize(at)..u64_to_usize(at) + piece.len()]);
        Ok(())
    })
}
