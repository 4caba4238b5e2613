//! Signals: SIGINT, SIGTERM, SIGHUP and SIGUSR1 are blocked in every thread and read from a
//! signalfd by the event loop.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Blocks SIGINT, SIGTERM, SIGHUP (stop) and SIGUSR1 (log vCPU registers) in this thread (and so in the vCPU threads spawned
/// after) and returns a signalfd that receives them, for a clean stop from the event loop.
pub fn block_stop_signals() -> io::Result<OwnedFd> {
    // SAFETY: plain libc calls on a local, zero-initialised sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

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
