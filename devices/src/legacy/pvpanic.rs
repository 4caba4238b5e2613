//! pvpanic, QEMU's ISA variant (docs/specs/pvpanic.txt): one I/O port; reading it returns the
//! events supported, writing bit 0 says the guest panicked.

use super::{PlatformEvent, PlatformEventSink};
use crate::bus::BusDevice;

const PVPANIC_PANICKED: u8 = 1 << 0;
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    sink: PlatformEventSink,
}

impl PvPanic {
    pub fn new(sink: PlatformEventSink) -> Self {
        Self { sink }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = PVPANIC_PANICKED;
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            (self.sink)(PlatformEvent::Panicked);
        } else if data.first().is_some_and(|v| v & PVPANIC_CRASH_LOADED != 0) {
            rate_limited_warn!("guest kernel panicked; a crash kernel is loaded, letting it run");
        }
    }
}
