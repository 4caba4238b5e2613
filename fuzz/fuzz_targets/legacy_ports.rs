//! The legacy port devices on the I/O port bus, laid out as the VMM lays them out (8250 UART
//! at 0x3f8, i8042 at 0x60, pvpanic at 0x505, ACPI PM registers at 0x3c0): port reads and
//! writes of any width at any port in and around them, in any order, mixed with what the
//! VMM itself does (console input, Ctrl-Alt-Del).
//!
//! Checked: no panic, and no guest-fed queue grows without bound: after the sequence the
//! i8042's output and the UART's receive FIFO are drained through their own registers and
//! must hold at most `MAX_QUEUED` bytes (a real i8042 holds one byte, a 16550 FIFO 16; the
//! fuzzer runs with -rss_limit_mb as well).
#![no_main]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;
use wisp::arch::x86_64::layout::{
    ACPI_PM_PORT, COM1_PORT, COM1_PORT_LEN, I8042_PORT, I8042_PORT_LEN, PVPANIC_PORT,
};
use wisp_devices::bus::{Bus, BusDevice};
use wisp_devices::interrupt::IrqFd;
use wisp_devices::legacy::{AcpiPm, PlatformEventSink, PvPanic, Serial, ACPI_PM_PORT_LEN, I8042};
use wisp_fuzz::Input;

/// More than any of these devices may hold for the guest.
const MAX_QUEUED: usize = 64;

/// Ports the input picks from: each device's range and a little around it.
const RANGES: [(u64, u64); 4] = [
    (COM1_PORT, COM1_PORT_LEN),
    (I8042_PORT, I8042_PORT_LEN),
    (PVPANIC_PORT, 1),
    (ACPI_PM_PORT, ACPI_PM_PORT_LEN),
];

/// The UART, made once: each one starts a writer thread that lives until the VMM's way out,
/// which would make each input cost a thread. Every input starts from its reset state.
fn uart() -> Arc<Mutex<Serial>> {
    static UART: OnceLock<Arc<Mutex<Serial>>> = OnceLock::new();
    let uart = UART.get_or_init(|| {
        let irq = Arc::new(IrqFd(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
        let (serial, _drained) = Serial::new(irq, Box::new(std::io::sink())).expect("serial");
        Arc::new(Mutex::new(serial))
    });
    {
        let mut u = uart.lock().unwrap();
        // 8250 registers at their power-on values: divisor 12, 8N1, no interrupts, OUT2,
        // scratch 0; then the receive FIFO read empty.
        for (reg, v) in [
            (3, 0x80),
            (0, 12),
            (1, 0),
            (3, 0x03),
            (1, 0),
            (4, 0x08),
            (7, 0),
        ] {
            u.write(reg, &[v]);
        }
        let mut b = [0u8];
        for _ in 0..1024 {
            u.read(5, &mut b);
            if b[0] & 1 == 0 {
                break;
            }
            u.read(0, &mut b);
        }
        u.read(2, &mut b);
    }
    uart.clone()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    static EVENTS: AtomicU64 = AtomicU64::new(0);
    let sink: PlatformEventSink = Arc::new(|_| {
        EVENTS.fetch_add(1, Ordering::Relaxed);
    });
    let irq = || Arc::new(IrqFd(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    let serial = uart();
    let i8042 = Arc::new(Mutex::new(I8042::new(sink.clone(), Some(irq()))));
    let mut bus = Bus::new();
    bus.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)
        .unwrap();
    bus.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)
        .unwrap();
    bus.insert(
        Arc::new(Mutex::new(PvPanic::new(sink.clone()))),
        PVPANIC_PORT,
        1,
    )
    .unwrap();
    bus.insert(
        Arc::new(Mutex::new(AcpiPm::new(sink))),
        ACPI_PM_PORT,
        ACPI_PM_PORT_LEN,
    )
    .unwrap();

    while !input.is_empty() {
        let op = input.u8();
        let (base, len) = RANGES[usize::from(op >> 2) % RANGES.len()];
        let port = (base + u64::from(input.u8() % 16))
            .saturating_sub(2)
            .min(base + len + 2);
        let width = [1usize, 1, 2, 4][usize::from(op >> 5) % 4];
        match op & 3 {
            0 | 1 => {
                let v = input.u32().to_le_bytes();
                bus.write(port, &v[..width]);
            }
            2 => {
                let mut b = [0u8; 4];
                bus.read(port, &mut b[..width]);
            }
            // What the VMM does on its own: console input, or Ctrl-Alt-Del from the API.
            _ => {
                if input.bool() {
                    let n = usize::from(input.u8());
                    let _ = serial.lock().unwrap().enqueue_input(input.bytes(n));
                } else {
                    i8042.lock().unwrap().send_ctrl_alt_del();
                }
            }
        }
    }

    let mut b = [0u8];
    let mut queued = 0;
    loop {
        bus.read(I8042_PORT + 4, &mut b);
        if b[0] & 1 == 0 {
            break;
        }
        bus.read(I8042_PORT, &mut b);
        queued += 1;
        assert!(
            queued <= MAX_QUEUED,
            "the i8042 holds more than {MAX_QUEUED} bytes"
        );
    }
    // Clear DLAB so that port 0 is the receive buffer, then read while LSR.DR is set.
    bus.write(COM1_PORT + 3, &[0x03]);
    queued = 0;
    loop {
        bus.read(COM1_PORT + 5, &mut b);
        if b[0] & 1 == 0 {
            break;
        }
        bus.read(COM1_PORT, &mut b);
        queued += 1;
        assert!(
            queued <= MAX_QUEUED,
            "the UART holds more than {MAX_QUEUED} bytes"
        );
    }
});
