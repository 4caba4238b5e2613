//! wisp's device models. Devices know guest memory, interrupt lines and their backends;
//! they know nothing of the VMM's configuration, CLI or API.

// Product code only: tests may cast freely.
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]

#[macro_use]
pub mod ratelimit;

pub mod bus;
pub mod cast;
pub mod disk;
pub mod events;
pub mod interrupt;
pub mod legacy;
pub mod mmds;
pub mod rate_limiter;
pub mod tap;
#[cfg(test)]
mod test_utils;
pub mod virtio;

/// The threads this crate starts, for the VMM's per-thread set-up (its seccomp filters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceThread {
    /// `wisp-console` ([`legacy::ConsoleOutput`]).
    Console,
}

static THREAD_START: std::sync::OnceLock<fn(DeviceThread)> = std::sync::OnceLock::new();

/// Sets what every thread this crate starts runs first (once per process; later calls are
/// ignored). The VMM installs the thread's seccomp filter there.
pub fn set_thread_start(hook: fn(DeviceThread)) {
    let _ = THREAD_START.set(hook);
}

/// Called first thing on a thread this crate started.
pub(crate) fn thread_started(thread: DeviceThread) {
    if let Some(hook) = THREAD_START.get() {
        hook(thread);
    }
}
