//! Where guest data goes to and comes from: a byte buffer (`read_at` / `write_at`) or
//! guest memory slices (`read_vectored` / `write_vectored`). One read path and one write
//! path serve both, and data clusters move between the file and guest memory with no copy
//! in between (preadv / pwritev on the slices).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::VolatileSlice;

use crate::disk::raw::pread_zero_fill;
use crate::disk::{copy_from_vectored, copy_to_vectored, file_vectored, zero_vectored};

/// The destination of a read; positions are byte offsets into it.
pub(super) trait ReadDest {
    fn len(&self) -> usize;
    /// Bytes `start..start + n` as a plain slice, if the destination is one.
    fn bytes(&mut self, start: usize, n: usize) -> Option<&mut [u8]>;
    /// Reads file bytes from `pos` into `start..start + n`; past the end of the file, zeros.
    fn read_file(&mut self, file: &File, pos: u64, start: usize, n: usize) -> io::Result<()>;
    fn copy_in(&mut self, start: usize, data: &[u8]) -> io::Result<()>;
    fn zero(&mut self, start: usize, n: usize) -> io::Result<()>;
}

/// The source of a write; positions are byte offsets into it.
pub(super) trait WriteSrc {
    fn len(&self) -> usize;
    /// Writes bytes `start..start + n` to the file at `pos`.
    fn write_file(&self, file: &File, pos: u64, start: usize, n: usize) -> io::Result<()>;
    fn copy_out(&self, start: usize, out: &mut [u8]) -> io::Result<()>;
}

impl ReadDest for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn bytes(&mut self, start: usize, n: usize) -> Option<&mut [u8]> {
        Some(&mut self[start..start + n])
    }
    fn read_file(&mut self, file: &File, pos: u64, start: usize, n: usize) -> io::Result<()> {
        pread_zero_fill(file, &mut self[start..start + n], pos)
    }
    fn copy_in(&mut self, start: usize, data: &[u8]) -> io::Result<()> {
        self[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero(&mut self, start: usize, n: usize) -> io::Result<()> {
        self[start..start + n].fill(0);
        Ok(())
    }
}

impl WriteSrc for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn write_file(&self, file: &File, pos: u64, start: usize, n: usize) -> io::Result<()> {
        file.write_all_at(&self[start..start + n], pos)
    }
    fn copy_out(&self, start: usize, out: &mut [u8]) -> io::Result<()> {
        out.copy_from_slice(&self[start..start + out.len()]);
        Ok(())
    }
}

/// Guest memory: the concatenation of `slices`.
pub(super) struct Guest<'a, 'm> {
    slices: &'a [VolatileSlice<'m>],
    len: usize,
}

impl<'a, 'm> Guest<'a, 'm> {
    pub(super) fn new(slices: &'a [VolatileSlice<'m>]) -> io::Result<Self> {
        let len = slices
            .iter()
            .try_fold(0usize, |acc, s| acc.checked_add(s.len()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "guest buffers too long"))?;
        Ok(Guest { slices, len })
    }
}

impl ReadDest for Guest<'_, '_> {
    fn len(&self) -> usize {
        self.len
    }
    fn bytes(&mut self, _start: usize, _n: usize) -> Option<&mut [u8]> {
        None
    }
    fn read_file(&mut self, file: &File, pos: u64, start: usize, n: usize) -> io::Result<()> {
        file_vectored(file, pos, self.slices, start as u64, n as u64, true)
    }
    fn copy_in(&mut self, start: usize, data: &[u8]) -> io::Result<()> {
        copy_to_vectored(self.slices, start as u64, data)
    }
    fn zero(&mut self, start: usize, n: usize) -> io::Result<()> {
        zero_vectored(self.slices, start as u64, n as u64)
    }
}

impl WriteSrc for Guest<'_, '_> {
    fn len(&self) -> usize {
        self.len
    }
    fn write_file(&self, file: &File, pos: u64, start: usize, n: usize) -> io::Result<()> {
        file_vectored(file, pos, self.slices, start as u64, n as u64, false)
    }
    fn copy_out(&self, start: usize, out: &mut [u8]) -> io::Result<()> {
        copy_from_vectored(self.slices, start as u64, out)
    }
}
