//! A minimal i8042 keyboard controller: enough for a guest to reset the machine (command 0xFE,
//! pulse the reset line) and to receive Ctrl-Alt-Del as scan codes, as on a PC.

use super::{PlatformEvent, PlatformEventSink};
use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;
use std::collections::VecDeque;
use std::sync::Arc;

/// Offsets from port 0x60: data port at +0, status/command port at +4.
const DATA: u64 = 0;
const COMMAND: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_PULSE_RESET: u8 = 0xfe;

const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;
const CTR_KBD_INT: u8 = 0x01;

/// Scan code set 2, as the guest's atkbd driver expects after translation is off:
/// press Ctrl, Alt, Delete; release them.
const CTRL_ALT_DEL: [u8; 14] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, 0, 0, 0,
];
const CTRL_ALT_DEL_LEN: usize = 11;

pub struct I8042 {
    sink: PlatformEventSink,
    irq: Option<Arc<dyn InterruptLine>>,
    status: u8,
    control: u8,
    outp: u8,
    pending_cmd: Option<u8>,
    out: VecDeque<u8>,
}

impl I8042 {
    pub fn new(sink: PlatformEventSink, irq: Option<Arc<dyn InterruptLine>>) -> Self {
        Self {
            sink,
            irq,
            status: SB_KBD_ENABLED,
            control: CTR_KBD_INT,
            outp: 0,
            pending_cmd: None,
            out: VecDeque::new(),
        }
    }

    /// Queue the Ctrl-Alt-Del key sequence for the guest.
    pub fn send_ctrl_alt_del(&mut self) {
        self.out.extend(&CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN]);
        self.update_output();
    }

    fn push(&mut self, byte: u8) {
        self.out.push_back(byte);
        self.update_output();
    }

    fn update_output(&mut self) {
        if self.out.is_empty() {
            self.status &= !SB_OUT_DATA_AVAIL;
            return;
        }
        self.status |= SB_OUT_DATA_AVAIL;
        if self.control & CTR_KBD_INT != 0 {
            if let Some(irq) = &self.irq {
                if let Err(e) = irq.trigger() {
                    log::warn!("i8042: cannot raise keyboard interrupt: {e}");
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = match offset {
            DATA => {
                let v = self.out.pop_front().unwrap_or(0);
                self.update_output();
                v
            }
            COMMAND => self.status,
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            COMMAND => {
                self.status |= SB_I8042_CMD_DATA;
                match value {
                    CMD_PULSE_RESET => (self.sink)(PlatformEvent::Reset),
                    CMD_READ_CTR => self.push(self.control),
                    CMD_READ_OUTP => self.push(self.outp),
                    CMD_SELF_TEST => self.push(0x55),
                    CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending_cmd = Some(value),
                    _ => {}
                }
            }
            DATA => {
                self.status &= !SB_I8042_CMD_DATA;
                match self.pending_cmd.take() {
                    Some(CMD_WRITE_CTR) => self.control = value,
                    Some(CMD_WRITE_OUTP) => self.outp = value,
                    // A keyboard command: acknowledge it (0xFA) as a keyboard would.
                    _ => self.push(0xfa),
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn pulse_reset_command_resets() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = I8042::new(Arc::new(move |e| s.lock().unwrap().push(e)), None);
        dev.write(COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformEvent::Reset]);
    }

    #[test]
    fn ctrl_alt_del_is_readable_from_the_data_port() {
        let mut dev = I8042::new(Arc::new(|_| {}), None);
        dev.send_ctrl_alt_del();
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            dev.read(COMMAND, &mut b);
            if b[0] & SB_OUT_DATA_AVAIL == 0 {
                break;
            }
            dev.read(DATA, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN]);
    }
}
