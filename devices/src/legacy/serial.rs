//! The 8250 UART (rust-vmm vm-superio) on the I/O port bus, its interrupt on an irqfd. Its
//! output goes through a [`ConsoleOutput`], so a vCPU never waits for the console's reader.

use super::console::ConsoleOutput;
use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;
use std::io::{self, Write};
use std::sync::Arc;
use vm_superio::serial::SerialEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

pub struct IrqTrigger(Arc<dyn InterruptLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Tells the VMM's event loop that the guest drained the receive FIFO, so reading the
/// console input may resume (no input is read while the FIFO is full).
pub struct SerialInput {
    pub drained: EventFd,
}

impl SerialEvents for SerialInput {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.drained.write(1);
    }
}

pub struct Serial {
    inner: vm_superio::Serial<IrqTrigger, SerialInput, ConsoleOutput>,
}

/// The UART's registers and receive FIFO in a snapshot (vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Serial {
    /// `out` is written by a thread of its own (see [`ConsoleOutput`]).
    pub fn new(
        irq: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
    ) -> io::Result<(Self, EventFd)> {
        Self::with_state(irq, out, None)
    }

    /// Like [`Serial::new`], with the registers a snapshot recorded (checked: a receive FIFO
    /// beyond the UART's is refused).
    pub fn with_state(
        irq: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
        state: Option<&SerialRegs>,
    ) -> io::Result<(Self, EventFd)> {
        let drained = EventFd::new(libc::EFD_NONBLOCK)?;
        let events = SerialInput {
            drained: drained.try_clone()?,
        };
        let out = ConsoleOutput::new(out)?;
        let trigger = IrqTrigger(irq);
        let inner = match state {
            None => vm_superio::Serial::with_events(trigger, events, out),
            Some(s) => {
                let state = vm_superio::serial::SerialState {
                    baud_divisor_low: s.baud_divisor_low,
                    baud_divisor_high: s.baud_divisor_high,
                    interrupt_enable: s.interrupt_enable,
                    interrupt_identification: s.interrupt_identification,
                    line_control: s.line_control,
                    line_status: s.line_status,
                    modem_control: s.modem_control,
                    modem_status: s.modem_status,
                    scratch: s.scratch,
                    in_buffer: s.in_buffer.clone(),
                };
                vm_superio::Serial::from_state(&state, trigger, events, out)
                    .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?
            }
        };
        Ok((Self { inner }, drained))
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialRegs {
        let s = self.inner.state();
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// The output side, for the VMM to finish it on the way out
    /// ([`ConsoleOutput::finish`]).
    pub fn output(&self) -> ConsoleOutput {
        self.inner.writer().clone()
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Queue console input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = self.inner.fifo_capacity().min(bytes.len());
        if room == 0 {
            return Ok(0);
        }
        self.inner
            .enqueue_raw_bytes(&bytes[..room])
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), [first, ..]) = (u8::try_from(offset), data) {
            *first = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), [value, ..]) = (u8::try_from(offset), data) else {
            return;
        };
        // Output never fails (ConsoleOutput); only raising the interrupt can.
        if let Err(e) = self.inner.write(off, *value) {
            rate_limited_warn!("serial: {:?}", e);
        }
    }
}
