//! The ACPI hardware-reduced sleep control/status and reset registers (ACPI 6.5 §4.8.3.7,
//! §4.8.3.6), three consecutive byte-wide I/O ports.

use super::{PlatformEvent, PlatformEventSink};
use crate::bus::BusDevice;

/// Ports: sleep control at +0, sleep status at +1, reset at +2.
pub const ACPI_PM_PORT_LEN: u64 = 3;
/// The SLP_TYP value the DSDT's \_S5 package announces.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// The value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = 1;
const RESET: u64 = 2;
// ACPI 6.5 §4.8.3.7: SLP_TYP in bits 2..4, SLP_EN in bit 5.
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

pub struct AcpiPm {
    sink: PlatformEventSink,
}

impl AcpiPm {
    pub fn new(sink: PlatformEventSink) -> Self {
        Self { sink }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS never set, we never resume from a sleep state.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            rate_limited_warn!(
                "acpi: ignored {}-byte write at offset {}",
                data.len(),
                offset
            );
            return;
        };
        match offset {
            SLEEP_CONTROL
                if value & SLP_EN != 0
                    && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == ACPI_S5_SLP_TYP =>
            {
                (self.sink)(PlatformEvent::PowerOff)
            }
            SLEEP_CONTROL => rate_limited_warn!("acpi: unsupported sleep request {:#x}", value),
            SLEEP_STATUS => {}
            RESET if *value == ACPI_RESET_VALUE => (self.sink)(PlatformEvent::Reset),
            _ => rate_limited_warn!("acpi: ignored write {:#x} at offset {}", value, offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn pm() -> (AcpiPm, Arc<Mutex<Vec<PlatformEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (
            AcpiPm::new(Arc::new(move |e| s.lock().unwrap().push(e))),
            seen,
        )
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut dev, seen) = pm();
        dev.write(SLEEP_CONTROL, &[(5 << 2) | (1 << 5)]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformEvent::PowerOff]);
    }

    #[test]
    fn other_sleep_states_and_wrong_widths_are_ignored() {
        let (mut dev, seen) = pm();
        dev.write(SLEEP_CONTROL, &[5 << 2]); // no SLP_EN
        dev.write(SLEEP_CONTROL, &[(3 << 2) | (1 << 5)]); // S3
        dev.write(SLEEP_CONTROL, &[0x34, 0]);
        dev.write(RESET, &[2]);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn reset_value_resets() {
        let (mut dev, seen) = pm();
        dev.write(RESET, &[ACPI_RESET_VALUE]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformEvent::Reset]);
    }
}
