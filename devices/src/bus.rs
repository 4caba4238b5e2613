//! The port I/O and MMIO buses: vCPU exits are dispatched here by address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers register accesses on a bus. `offset` is relative to the start of
/// the range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("bus range at {base:#x} has zero length or wraps around")]
    BadRange { base: u64 },
}

/// Address ranges mapped to devices. Lookups are lock-free reads of an immutable map; each
/// device has its own lock, so two vCPUs touching two devices never contend.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, Arc<Mutex<dyn BusDevice>>)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base })?;
        // The range before `end` that starts last must end at or before `base`.
        if let Some((&b, &(l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device whose range holds `addr..addr+size`, and the offset of `addr` in it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= *len).then_some((offset, dev))
    }

    /// Returns false when no device is mapped at `addr` (the caller decides what an
    /// unclaimed access means: reads of nothing return all ones on x86).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned panicked while handling an access; its state is still
/// the best we have, and refusing every later access would wedge the guest.
fn lock(dev: &Arc<Mutex<dyn BusDevice>>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn reg(len: usize) -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(Reg(vec![0; len])))
    }

    #[test]
    fn dispatches_by_address_with_relative_offset() {
        let mut bus = Bus::new();
        bus.insert(reg(8), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        let mut b = [0u8];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 7);
    }

    #[test]
    fn refuses_overlapping_ranges() {
        let mut bus = Bus::new();
        bus.insert(reg(8), 0x100, 8).unwrap();
        assert!(bus.insert(reg(8), 0x104, 8).is_err());
        assert!(bus.insert(reg(8), 0xfc, 8).is_err());
        assert!(bus.insert(reg(8), 0x108, 8).is_ok());
        assert!(bus.insert(reg(8), 0xf8, 8).is_ok());
        assert!(bus.insert(reg(1), u64::MAX, 2).is_err());
        assert!(bus.insert(reg(1), 0x200, 0).is_err());
    }

    #[test]
    fn access_straddling_the_end_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(reg(4), 0x100, 4).unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x102, &mut b));
        assert!(!bus.read(0xff, &mut b[..1]));
        assert!(bus.read(0x100, &mut b));
    }
}
