//! The snapshot body's encoding: little-endian integers, length-prefixed byte strings, and
//! KVM structs as their bytes (length-prefixed, so a struct of another size is refused).
//! Reading is of untrusted input: every length is checked against what is left before
//! anything is allocated, and nothing panics.

use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Why a body could not be decoded; `at` is the byte offset in the body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what} at byte {at} of the body")]
pub struct DecodeError {
    pub what: String,
    pub at: usize,
}

#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A count or length; the types written never reach 4 GiB.
    pub fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("snapshot sections are far below 4 GiB"));
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.buf.extend_from_slice(b);
    }

    pub fn pod<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }

    pub fn option_u32(&mut self, v: Option<u32>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.u32(v);
            }
            None => self.u8(0),
        }
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn error(&self, what: impl Into<String>) -> DecodeError {
        DecodeError {
            what: what.into(),
            at: self.pos,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(self.error(format!("{what}: {n} bytes needed, {left} left")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }

    /// A count of at most `max`.
    pub fn count(&mut self, max: usize, what: &str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(DecodeError {
                what: format!("{what}: {n} is more than the {max} allowed"),
                at,
            });
        }
        Ok(n)
    }

    /// A byte string of at most `max` bytes.
    pub fn bytes(&mut self, max: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let n = self.count(max, what)?;
        self.take(n, what)
    }

    pub fn pod<T: FromBytes>(&mut self, what: &str) -> Result<T, DecodeError> {
        let size = std::mem::size_of::<T>();
        let at = self.pos;
        let b = self.bytes(size, what)?;
        T::read_from_bytes(b).map_err(|_| DecodeError {
            what: format!("{what}: {} bytes, {size} expected", b.len()),
            at,
        })
    }

    pub fn option_u32(&mut self, what: &str) -> Result<Option<u32>, DecodeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.u32(what)?)),
            other => Err(self.error(format!("{what}: tag {other} is neither 0 nor 1"))),
        }
    }

    /// The whole body was read: trailing bytes mean a writer of another format.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.pos != self.buf.len() {
            return Err(self.error(format!(
                "{} bytes left over after the last section",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_as_written() {
        let mut w = Writer::default();
        w.u8(7);
        w.u32(0xdead_beef);
        w.u64(u64::MAX - 1);
        w.bytes(b"wisp");
        w.pod(&kvm_bindings::kvm_regs {
            rax: 42,
            ..Default::default()
        });
        w.option_u32(Some(9));
        w.option_u32(None);
        let buf = w.into_bytes();
        let mut r = Reader::new(&buf);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u32("b").unwrap(), 0xdead_beef);
        assert_eq!(r.u64("c").unwrap(), u64::MAX - 1);
        assert_eq!(r.bytes(4, "d").unwrap(), b"wisp");
        assert_eq!(r.pod::<kvm_bindings::kvm_regs>("e").unwrap().rax, 42);
        assert_eq!(r.option_u32("f").unwrap(), Some(9));
        assert_eq!(r.option_u32("g").unwrap(), None);
        r.finish().unwrap();
    }

    #[test]
    fn refuses_lengths_beyond_the_buffer_or_the_bound_and_structs_of_another_size() {
        // A length of 4 GiB - 1 in a 6-byte buffer: refused before any allocation.
        let buf = [0xff, 0xff, 0xff, 0xff, 0, 0];
        assert!(Reader::new(&buf).bytes(usize::MAX, "x").is_err());
        let mut w = Writer::default();
        w.bytes(b"toolong");
        let buf = w.into_bytes();
        let e = Reader::new(&buf).bytes(3, "name").unwrap_err();
        assert_eq!(e.what, "name: 7 is more than the 3 allowed");
        let mut w = Writer::default();
        w.bytes(&[0; 8]);
        let buf = w.into_bytes();
        assert!(Reader::new(&buf)
            .pod::<kvm_bindings::kvm_regs>("regs")
            .is_err());
        let mut r = Reader::new(&[1, 2]);
        r.u8("a").unwrap();
        assert!(r.finish().is_err());
    }
}
