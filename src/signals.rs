//! Signals. SIGINT, SIGTERM and SIGHUP stop the VM cleanly and SIGUSR1 logs the vCPUs'
//! registers: `main` blocks them before any thread exists (so every thread inherits the
//! mask and none gets them delivered with their default action), and the event loop reads
//! them from a signalfd. API threads block every asynchronous signal (see [`block_async`]);
//! vCPU threads take only the kick signal (vstate::control).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The signals the event loop reads.
const LOOP_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];

fn loop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise and fill it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in LOOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks the event loop's signals in this thread (and so in threads it spawns after).
pub fn block_stop_signals() -> io::Result<()> {
    let set = loop_set();
    // SAFETY: pthread_sigmask reads a valid, initialised set and changes only this thread.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks the event loop's signals here and returns a signalfd that receives them.
pub fn signal_fd() -> io::Result<OwnedFd> {
    block_stop_signals()?;
    let set = loop_set();
    // SAFETY: signalfd reads a valid set; the fd it returns is owned by nobody else.
    unsafe {
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The next signal queued on a signalfd from [`signal_fd`], if any.
pub fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: reads one signalfd_siginfo into a properly sized, zeroed buffer.
    unsafe {
        let mut info: libc::signalfd_siginfo = std::mem::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let n = libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        );
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

/// Blocks every asynchronous signal in this thread (API threads: signals are the event
/// loop's). Faults this thread causes are still delivered to it.
pub fn block_async() {
    // SAFETY: sigset_t is plain data initialised by sigfillset; pthread_sigmask only changes
    // this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGABRT,
            // A seccomp denial: blocked, the kernel would kill without the handler's line.
            libc::SIGSYS,
        ] {
            libc::sigdelset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
