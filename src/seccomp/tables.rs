//! What each thread kind may call, and why. One entry per allowed system call (several for a
//! call allowed with different argument checks); an entry's comment says who makes it.
//!
//! A new feature that makes a new system call on one of these threads adds it here, in that
//! thread's table, with its reason; otherwise wisp dies with SIGSYS naming the thread and the
//! call. `strace -f` on the feature's test shows what it calls.

use super::ThreadKind;
use kvm_bindings::KVMIO;
use libc::{c_ulong, SYS_ioctl};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// The argument check of one entry (at `--seccomp-level 2`; level 1 checks numbers only).
#[derive(Debug, Clone)]
pub enum Arg {
    /// Any arguments.
    Any,
    /// Argument `.0` (its low 32 bits) is one of `.1`.
    OneOf(u8, Vec<u64>),
    /// Argument `.0` has none of the bits of `.1`.
    NoneOf(u8, u64),
    /// Argument `.0` has all the bits of `.1`.
    AllOf(u8, u64),
}

use Arg::{AllOf, Any, NoneOf, OneOf};

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_bindings::kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_bindings::kvm_translation);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
ioctl_iow_nr!(
    KVM_SET_VCPU_EVENTS,
    KVMIO,
    0xa0,
    kvm_bindings::kvm_vcpu_events
);

// A snapshot's reads of KVM state (PUT /snapshot/create).
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_bindings::kvm_cpuid2);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_bindings::kvm_pit_state2);

/// The flags of glibc's fork(): clone(CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD).
const FORK_FLAGS: u64 =
    (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;

fn n(v: c_ulong) -> u64 {
    v
}

/// One thread kind's table: (system call, argument check).
pub(super) fn table(kind: ThreadKind) -> Vec<(i64, Arg)> {
    let mut t = common();
    t.extend(match kind {
        ThreadKind::Main => main(),
        ThreadKind::Vcpu => vcpu(),
        // The connection threads inherit the acceptor's filter and narrow it with their own:
        // what they call must pass both.
        ThreadKind::Api => api().into_iter().chain(api_conn()).collect(),
        ThreadKind::ApiConn => api_conn(),
        ThreadKind::Console => console(),
        ThreadKind::Metrics => metrics(),
    });
    t
}

/// No mapping may be executable: a thread that maps guest-controlled bytes as code is the
/// first step of an exploit, and wisp never needs it after start-up.
fn no_exec(prot_arg: u8) -> Arg {
    NoneOf(prot_arg, libc::PROT_EXEC as u64)
}

/// Every thread: memory, locks, logging, its own end, and the SIGSYS handler.
fn common() -> Vec<(i64, Arg)> {
    use libc::*;
    vec![
        // Log lines (stderr or the log file), eventfd signals, and the SIGSYS handler's line.
        (SYS_write, Any),
        // The SIGSYS handler's fallback when its re-raise fails; a fatal error's exit.
        (SYS_exit_group, Any),
        // A thread's normal end.
        (SYS_exit, Any),
        // The SIGSYS handler re-raises SIGSYS; abort() (a panic) raises SIGABRT.
        (SYS_tgkill, OneOf(2, vec![SIGSYS as u64, SIGABRT as u64])),
        // The SIGSYS handler's and glibc's abort() (a panic) re-raise: their own ids.
        (SYS_getpid, Any),
        (SYS_gettid, Any),
        // std's locks, condition variables and channels.
        (SYS_futex, Any),
        // The allocator (one arena: brk, mmap for large blocks), never executable.
        (SYS_brk, Any),
        (SYS_mmap, no_exec(2)),
        (SYS_munmap, Any),
        (SYS_mremap, Any),
        // glibc returns a finished thread's stack and the allocator trims with MADV_DONTNEED.
        (SYS_madvise, Any),
        // A thread's end: glibc blocks signals, std removes its alternate signal stack.
        (SYS_rt_sigprocmask, Any),
        (SYS_sigaltstack, Any),
        // The return from a signal handler (the vCPU kick).
        (SYS_rt_sigreturn, Any),
        // Dropping file descriptors (the debug build's OwnedFd checks the fd with F_GETFD).
        (SYS_close, Any),
        (SYS_fcntl, OneOf(1, vec![F_GETFD as u64])),
        // Time stamps (a syscall when the clock source has no vDSO path).
        (SYS_clock_gettime, Any),
        // std's HashMap seeds, per thread.
        (SYS_getrandom, Any),
        // std's yield_now in waits.
        (SYS_sched_yield, Any),
    ]
}

/// The main thread once the VM is built: the event loop (device queues and their backends,
/// console input, signals, the runtime API) and the VM's end.
fn main() -> Vec<(i64, Arg)> {
    use libc::*;
    vec![
        // The event loop; devices add and remove their fds when the driver activates them.
        (SYS_epoll_wait, Any),
        (SYS_epoll_ctl, Any),
        // eventfds, the signalfd, stdin, tap frames in; disk I/O (raw and qcow2).
        (SYS_read, Any),
        (SYS_readv, Any),
        (SYS_writev, Any),
        (SYS_pread64, Any),
        (SYS_pwrite64, Any),
        (SYS_preadv, Any),
        (SYS_pwritev, Any),
        (SYS_lseek, Any),
        // FLUSH, and the write-back on the way out.
        (SYS_fdatasync, Any),
        (SYS_fsync, Any),
        // qcow2 growth, discard and write-zeroes.
        (SYS_ftruncate, Any),
        (SYS_fallocate, Any),
        // The I/O rate limiters' timers (armed when a bucket runs dry, disarmed on PATCH).
        (SYS_timerfd_settime, Any),
        // PATCH /drives opens the new medium (and its backing files beneath their directory);
        // cgroup usage for metrics. Without O_CREAT (files are made only for a snapshot, below).
        (SYS_openat, NoneOf(2, O_CREAT as u64)),
        (SYS_openat2, Any),
        (SYS_newfstatat, Any),
        (SYS_statx, Any),
        (SYS_fstat, Any),
        (SYS_readlink, Any),
        (SYS_getdents64, Any),
        // Disk files: clear O_NONBLOCK, QEMU's lock bytes (OFD locks), std's try_clone.
        (
            SYS_fcntl,
            OneOf(
                1,
                vec![
                    F_GETFL as u64,
                    F_SETFL as u64,
                    F_OFD_SETLK as u64,
                    F_OFD_GETLK as u64,
                    F_DUPFD_CLOEXEC as u64,
                ],
            ),
        ),
        // PUT /snapshot/create writes the snapshot and memory files it names.
        (SYS_openat, AllOf(2, O_CREAT as u64)),
        // Restoring the terminal on the way out; vsock's host sockets made non-blocking;
        // PUT /snapshot/create reads the VM's irqchips, PIT and clock.
        (
            SYS_ioctl,
            OneOf(
                1,
                vec![
                    TCGETS,
                    TCSETS,
                    FIONBIO,
                    n(KVM_GET_IRQCHIP()),
                    n(KVM_GET_PIT2()),
                    n(KVM_GET_CLOCK()),
                ],
            ),
        ),
        // vsock's host side: connections from host processes on its listening socket, and
        // connections to <uds_path>_<port> for the guest's. Unix sockets only.
        (SYS_socket, OneOf(0, vec![AF_UNIX as u64])),
        (SYS_connect, Any),
        (SYS_accept4, Any),
        (SYS_recvfrom, Any),
        (SYS_sendto, Any),
        (SYS_shutdown, Any),
        // The end: KVM's teardown goes to a forked child (vstate/teardown.rs), which closes
        // every other fd and signals through pipes. A plain fork only (glibc's flags): no
        // thread, no shared memory, no new namespace.
        (SYS_pipe2, Any),
        (SYS_clone, OneOf(0, vec![FORK_FLAGS])),
        (SYS_close_range, Any),
        // glibc's fork registers the child's robust futex list.
        (SYS_set_robust_list, Any),
        // Kicking vCPUs out of the guest (pause, stop) with SIGRTMIN.
        (
            SYS_tgkill,
            OneOf(2, vec![crate::vstate::control::kick_signal() as u64]),
        ),
        // Waits with a timeout (pausing vCPUs, removing cgroups, the console's last words).
        (SYS_clock_nanosleep, Any),
        (SYS_nanosleep, Any),
        // The VM's end: its cgroups and the API socket file go.
        (SYS_rmdir, Any),
        (SYS_unlink, Any),
    ]
}

/// vCPU threads: KVM_RUN, the exits' register accesses (a device's activation on the
/// driver's DRIVER_OK included), and the instructions wisp completes for PVM.
fn vcpu() -> Vec<(i64, Arg)> {
    vec![
        (
            SYS_ioctl,
            OneOf(
                1,
                vec![
                    // The guest.
                    n(KVM_RUN()),
                    // PVM instruction completions (arch/x86_64/pvm.rs), the SIGUSR1 register
                    // dump and the report of an unsupported instruction.
                    n(KVM_GET_REGS()),
                    n(KVM_SET_REGS()),
                    n(KVM_GET_SREGS()),
                    n(KVM_TRANSLATE()),
                    n(KVM_GET_VCPU_EVENTS()),
                    n(KVM_SET_VCPU_EVENTS()),
                    n(KVM_GET_MP_STATE()),
                    // A snapshot: a paused vCPU reads its own state (vstate/state.rs).
                    n(KVM_GET_CPUID2()),
                    n(KVM_GET_MSRS()),
                    n(KVM_GET_LAPIC()),
                    n(KVM_GET_DEBUGREGS()),
                    n(KVM_GET_TSC_KHZ()),
                    n(KVM_GET_XSAVE()),
                    n(KVM_GET_XCRS()),
                    // virtio-net's activation and reset set the tap's offloads and header size.
                    libc::TUNSETOFFLOAD,
                    libc::TUNSETVNETHDRSZ,
                ],
            ),
        ),
        // Draining an eventfd when a device resets.
        (libc::SYS_read, Any),
        // vsock's activation and reset add and remove its listener in its own epoll and
        // close the host connections.
        (libc::SYS_epoll_ctl, Any),
        (libc::SYS_shutdown, Any),
        // virtio-balloon's activation arms its statistics timer.
        (libc::SYS_timerfd_settime, Any),
        // The UART's output straight to the console when its reader is ready, never waiting
        // (devices legacy/console.rs).
        (libc::SYS_pwritev2, OneOf(5, vec![libc::RWF_NOWAIT as u64])),
    ]
}

/// `wisp-api`: waits for connections, accepts them and starts a thread per connection.
fn api() -> Vec<(i64, Arg)> {
    use libc::*;
    vec![
        // Waiting for a connection or the stop eventfd.
        (SYS_poll, Any),
        (SYS_accept4, Any),
        // The stop eventfd.
        (SYS_read, Any),
        // A connection thread: clone3 (glibc's pthread_create; its flags sit in a struct the
        // filter cannot read) or clone for threads only.
        (SYS_clone3, Any),
        (SYS_clone, AllOf(0, CLONE_THREAD as u64)),
        // The new thread's start, under this filter until it installs its own: its stack
        // and guard page, glibc's rseq and robust futex list, std's name, stack guard check
        // and alternate signal stack.
        (SYS_mprotect, no_exec(2)),
        (SYS_rseq, Any),
        (SYS_set_robust_list, Any),
        (SYS_prctl, OneOf(0, vec![PR_SET_NAME as u64])),
        // The connection thread adds its own, narrower filter (a filter only ever narrows).
        (SYS_prctl, OneOf(0, vec![PR_SET_NO_NEW_PRIVS as u64])),
        (SYS_seccomp, OneOf(0, vec![SECCOMP_SET_MODE_FILTER as u64])),
        // 503 without blocking: the refused stream is made non-blocking.
        (SYS_ioctl, OneOf(1, vec![FIONBIO])),
        (SYS_fcntl, OneOf(1, vec![F_GETFL as u64, F_SETFL as u64])),
        // Backing off after a failed accept (EMFILE).
        (SYS_clock_nanosleep, Any),
        (SYS_nanosleep, Any),
        (SYS_sched_getaffinity, Any),
    ]
}

/// `wisp-api-conn`: one HTTP connection, its requests handed to the main thread.
fn api_conn() -> Vec<(i64, Arg)> {
    use libc::*;
    vec![
        // The request and the answer.
        (SYS_read, Any),
        (SYS_recvfrom, Any),
        (SYS_sendto, Any),
        (SYS_writev, Any),
        (SYS_poll, Any),
        // Read and write deadlines, and the close after a refused request.
        (SYS_setsockopt, Any),
        (SYS_shutdown, Any),
        // PUT /drives checks that the file exists while its body is validated.
        (SYS_statx, Any),
        (SYS_newfstatat, Any),
    ]
}

/// `wisp-console`: writes the guest's console output (stdout or a file).
fn console() -> Vec<(i64, Arg)> {
    // write(2) and the locks of the common entries are all it needs.
    Vec::new()
}

/// `wisp-metrics`: one metrics line every minute.
fn metrics() -> Vec<(i64, Arg)> {
    use libc::*;
    vec![
        (SYS_clock_nanosleep, Any),
        (SYS_nanosleep, Any),
        // The metrics line reads the vCPU cgroup's CPU usage.
        (SYS_openat, NoneOf(2, O_CREAT as u64)),
        (SYS_read, Any),
        (SYS_newfstatat, Any),
        (SYS_statx, Any),
        (SYS_lseek, Any),
    ]
}
