//! KVM's teardown of a VM, off the way out.
//!
//! Closing the last reference to a VM with an in-kernel irqchip and PIT makes KVM remove six
//! devices from its I/O buses, each behind an SRCU grace period: 15-30 ms here (a few of the
//! host's 4 ms ticks each), and up to 100 ms on a loaded host, all spent waiting, none of it
//! work for wisp. A process's exit waits for the last close of its files, so whoever waits
//! for wisp (a node agent, a CI job, a shell) would wait for KVM too.
//!
//! So at the very end a forked child takes a reference to the VM and drops everything else
//! (before the parent goes on: no disk lock, tap or pipe outlives wisp in it); the parent
//! exits at once, and the child closes the VM once the parent is gone, paying for the
//! teardown itself. KVM supports that: a VM torn down from another process skips only the
//! unmapping of its own private memory slots, which the creator's exit frees.

use std::os::fd::RawFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wisp_devices::cast::u64_to_usize;

/// Hands the last reference to `vm_fd` to a child process that closes it after this process
/// has ended. Returns whether it did; on false the VM is torn down as usual when its fd closes.
/// Call it last, with no vCPU fd open: only the VM fd keeps the VM alive after it.
pub fn hand_off(vm_fd: RawFd, mem: &GuestMemoryMmap) -> bool {
    // The child must not get a copy of guest memory (page tables to copy, and pages it would
    // keep alive).
    for region in mem.iter() {
        let Ok(addr) = mem.get_host_address(region.start_addr()) else {
            return false;
        };
        // SAFETY: the range is a mapping guest memory owns; MADV_DONTFORK changes only what
        // a fork copies.
        let rc = unsafe {
            libc::madvise(
                addr.cast::<libc::c_void>(),
                u64_to_usize(region.len()),
                libc::MADV_DONTFORK,
            )
        };
        if rc != 0 {
            return false;
        }
    }
    // `ready`: the child closed its copies of our files (and says, with a byte, that it holds
    // the VM). `gone`: its write end is ours alone and closes when we exit.
    let Some((ready_r, ready_w)) = pipe() else {
        return false;
    };
    let Some((gone_r, gone_w)) = pipe() else {
        close_all(&[ready_r, ready_w]);
        return false;
    };
    // SAFETY: the child runs only async-signal-safe calls (close, read, write, _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        close_all(&[ready_r, ready_w, gone_r, gone_w]);
        return false;
    }
    if pid == 0 {
        // SAFETY: in the child, with its own copies of the fds.
        unsafe { child(vm_fd, ready_w, gone_r) }
    }
    close_all(&[ready_w, gone_r]);
    let mut byte = 0u8;
    let handed = loop {
        // SAFETY: reads one byte into a local.
        let n = unsafe { libc::read(ready_r, (&mut byte as *mut u8).cast(), 1) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break n == 1;
    };
    close_all(&[ready_r]);
    // `gone_w` stays open, on purpose, until the process exits.
    handed
}

/// The child: keeps only the VM fd, tells the parent, waits for it to be gone, closes the VM.
///
/// # Safety
/// Only in the child of a fork.
unsafe fn child(vm_fd: RawFd, ready_w: RawFd, gone_r: RawFd) -> ! {
    let mut keep = [vm_fd, ready_w, gone_r];
    keep.sort_unstable();
    let mut from: u32 = 0;
    let mut closed = true;
    for fd in keep {
        let fd = fd as u32;
        if fd > from {
            closed &= close_range(from, fd - 1);
        }
        from = fd + 1;
    }
    closed &= close_range(from, u32::MAX);
    if closed {
        let b = 1u8;
        libc::write(ready_w, (&b as *const u8).cast(), 1);
    }
    libc::close(ready_w);
    if closed {
        let mut byte = 0u8;
        // EOF when the parent has exited (its files are closed before its exit is reported).
        while libc::read(gone_r, (&mut byte as *mut u8).cast(), 1) < 0
            && *libc::__errno_location() == libc::EINTR
        {}
        libc::close(vm_fd);
    }
    libc::_exit(0)
}

fn close_range(first: u32, last: u32) -> bool {
    // SAFETY: close_range(2) closes fds of this process only.
    unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) == 0 }
}

fn pipe() -> Option<(RawFd, RawFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    Some((fds[0], fds[1]))
}

fn close_all(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: each fd was opened here and is closed once.
        unsafe { libc::close(fd) };
    }
}
