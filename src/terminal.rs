//! Console terminal handling: raw mode while the guest owns the terminal, restored on every
//! exit path (normal return, error, signal, panic).

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin in raw mode if it is a terminal. Keeps output processing (the guest sends
/// CRLF anyway) so wisp's own messages stay readable.
pub fn enter_raw_mode() {
    // SAFETY: isatty and tcgetattr only read the descriptor's state into `t`.
    unsafe {
        if libc::isatty(0) != 1 {
            return;
        }
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) != 0 {
            return;
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        t.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::IGNCR);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        if libc::tcsetattr(0, libc::TCSANOW, &t) == 0 {
            *SAVED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(saved);
        }
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}

/// Restores the terminal if wisp changed it; safe to call more than once.
pub fn restore() {
    let saved = SAVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(t) = saved {
        // SAFETY: restores attributes read earlier from the same descriptor.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
    }
}
