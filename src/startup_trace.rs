//! `WISP_TRACE_STARTUP=1`: a line on stderr at the end of each phase of the way in (execve to
//! the first KVM_RUN) and of the way out (the VM's end to the process exit), so that a slow
//! start shows where its time went:
//!
//! ```text
//! wisp: startup:    1234 us (+   321 us) kvm: /dev/kvm opened, VM created
//! ```
//!
//! The first number is the time since execve, the second the phase's own. Times count from
//! the value of `WISP_TRACE_STARTUP` when it is a CLOCK_MONOTONIC time in nanoseconds (what
//! `scripts/bench/spawn` passes: the instant before its execve); with `1` they count from an
//! estimate of the execve, `main`'s entry minus the CPU time the process had used by then
//! (loading and relocating the binary is CPU-bound).

use std::sync::atomic::{AtomicU64, Ordering};

/// CLOCK_MONOTONIC ns of the execve; 0 while tracing is off.
static BASE_NS: AtomicU64 = AtomicU64::new(0);
/// CLOCK_MONOTONIC ns of the last line.
static LAST_NS: AtomicU64 = AtomicU64::new(0);

/// Nanoseconds of `clock` (CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Microseconds of `clock`, as Firecracker's start-up times count them.
pub fn clock_us(clock: libc::clockid_t) -> u64 {
    clock_ns(clock) / 1000
}

/// Reads `WISP_TRACE_STARTUP`; first thing in `main`.
pub fn init() {
    let Some(value) = std::env::var_os("WISP_TRACE_STARTUP") else {
        return;
    };
    let now = clock_ns(libc::CLOCK_MONOTONIC);
    let base = match value.to_str().and_then(|v| v.parse::<u64>().ok()) {
        Some(0) | None => return,
        Some(exec_ns) if exec_ns > 1 && exec_ns <= now => exec_ns,
        Some(_) => now.saturating_sub(clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)),
    };
    BASE_NS.store(base.max(1), Ordering::Relaxed);
    LAST_NS.store(base, Ordering::Relaxed);
    mark("main: entered (process loaded)");
}

/// Whether `WISP_TRACE_STARTUP` is on.
pub fn enabled() -> bool {
    BASE_NS.load(Ordering::Relaxed) != 0
}

/// Ends a phase: prints the time since execve and since the last mark.
pub fn mark(phase: &str) {
    let base = BASE_NS.load(Ordering::Relaxed);
    if base == 0 {
        return;
    }
    let now = clock_ns(libc::CLOCK_MONOTONIC);
    let last = LAST_NS.swap(now, Ordering::Relaxed);
    eprintln!(
        "wisp: startup: {:>7} us (+{:>6} us) {phase}",
        now.saturating_sub(base) / 1000,
        now.saturating_sub(last) / 1000
    );
}
