//! Legacy platform devices on the I/O port bus: the 8250 UART, the i8042 (for reset and
//! Ctrl-Alt-Del), pvpanic and the ACPI hardware-reduced power registers.

mod acpi_pm;
mod console;
mod i8042;
mod pvpanic;
mod serial;

pub use acpi_pm::{AcpiPm, ACPI_PM_PORT_LEN, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP};
pub use console::{ConsoleOutput, CONSOLE_BUFFER};
pub use i8042::{I8042State, I8042};
pub use pvpanic::PvPanic;
pub use serial::{Serial, SerialInput, SerialRegs};

use std::sync::Arc;

/// What a platform device asks of the VMM. Only the VMM decides what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformEvent {
    /// ACPI S5: the guest powered off.
    PowerOff,
    /// ACPI reset register or i8042 pulse-reset: the guest asked to reboot.
    Reset,
    /// pvpanic: the guest kernel panicked.
    Panicked,
}

/// The VMM's handler for platform events; called on the vCPU thread that caused the event.
pub type PlatformEventSink = Arc<dyn Fn(PlatformEvent) + Send + Sync>;
