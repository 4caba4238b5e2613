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

/// Bytes the output buffer holds. A real i8042 holds one; a little more lets the
/// Ctrl-Alt-Del sequence wait whole. Replies to commands that find it full are dropped, so
/// a guest that never reads cannot make it grow.
const OUT_CAPACITY: usize = 16;

pub struct I8042 {
    sink: PlatformEventSink,
    irq: Option<Arc<dyn InterruptLine>>,
    status: u8,
    control: u8,
    outp: u8,
    pending_cmd: Option<u8>,
    out: VecDeque<u8>,
}

/// The controller's registers and output queue in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    pub status: u8,
    pub control: u8,
    pub outp: u8,
    pub pending_cmd: Option<u8>,
    pub out: Vec<u8>,
}

impl I8042 {
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            outp: self.outp,
            pending_cmd: self.pending_cmd,
            out: self.out.iter().copied().collect(),
        }
    }

    /// Takes a snapshot's state; an output queue longer than the controller's is refused.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), String> {
        if state.out.len() > OUT_CAPACITY {
            return Err(format!(
                "i8042: {} bytes queued, the controller holds {OUT_CAPACITY}",
                state.out.len()
            ));
        }
        self.status = state.status;
        self.control = state.control;
        self.outp = state.outp;
        self.pending_cmd = state.pending_cmd;
        self.out = state.out.iter().copied().collect();
        Ok(())
    }

    pub fn new(sink: PlatformEventSink, irq: Option<Arc<dyn InterruptLine>>) -> Self {
        Self {
            sink,
            irq,
            status: SB_KBD_ENABLED,
            control: CTR_KBD_INT,
            outp: 0,
            pending_cmd: None,
            out: VecDeque::with_capacity(OUT_CAPACITY),
        }
    }

    /// Queue the Ctrl-Alt-Del key sequence for the guest.
    /// All or nothing: a partial sequence would leave keys pressed.
    pub fn send_ctrl_alt_del(&mut self) {
        if OUT_CAPACITY - self.out.len() < CTRL_ALT_DEL_LEN {
            log::warn!(
                "i8042: Ctrl-Alt-Del dropped: the guest left {} bytes unread in the output buffer",
                self.out.len()
            );
            return;
        }
        self.out.extend(&CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN]);
        self.update_output();
    }

    fn push(&mut self, byte: u8) {
        if self.out.len() >= OUT_CAPACITY {
            rate_limited_warn!(
                "i8042: output buffer full (the guest does not read port 0x60); reply {:#x} dropped",
                byte
            );
            return;
        }
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
                    rate_limited_warn!("i8042: cannot raise keyboard interrupt: {}", e);
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

    /// Every byte the guest can read from the data port.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            dev.read(COMMAND, &mut b);
            if b[0] & SB_OUT_DATA_AVAIL == 0 {
                return got;
            }
            dev.read(DATA, &mut b);
            got.push(b[0]);
        }
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_output_buffer() {
        let mut dev = I8042::new(Arc::new(|_| {}), None);
        // Commands and keyboard bytes that each queue a reply, five million times.
        for i in 0..5_000_000u32 {
            match i % 3 {
                0 => dev.write(COMMAND, &[CMD_SELF_TEST]),
                1 => dev.write(COMMAND, &[CMD_READ_CTR]),
                _ => dev.write(DATA, &[0xff]),
            }
        }
        assert!(
            dev.out.capacity() <= 2 * OUT_CAPACITY,
            "{}",
            dev.out.capacity()
        );
        let got = drain(&mut dev);
        assert_eq!(got.len(), OUT_CAPACITY);
        // The first replies are kept in order, the rest were dropped.
        assert_eq!(got[..3], [0x55, CTR_KBD_INT, 0xfa]);
        // Once read, the controller answers again.
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(drain(&mut dev), [0x55]);
    }

    #[test]
    fn ctrl_alt_del_is_sent_whole_or_not_at_all() {
        let mut dev = I8042::new(Arc::new(|_| {}), None);
        for _ in 0..OUT_CAPACITY - CTRL_ALT_DEL_LEN + 1 {
            dev.write(COMMAND, &[CMD_SELF_TEST]);
        }
        dev.send_ctrl_alt_del();
        assert!(drain(&mut dev).iter().all(|&b| b == 0x55));
        dev.send_ctrl_alt_del();
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN]);
    }

    /// Found by fuzzing (fuzz/ legacy_ports, before the output buffer had a bound): nine
    /// Ctrl-Alt-Del requests in a row, never read, queued 99 bytes.
    #[test]
    fn repeated_ctrl_alt_del_never_read_queues_one_sequence() {
        let mut dev = I8042::new(Arc::new(|_| {}), None);
        for _ in 0..9 {
            dev.send_ctrl_alt_del();
        }
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN]);
    }
}
