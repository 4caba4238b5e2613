//! wisp: a lightweight virtual machine monitor for x86_64 KVM.

// Product code only: tests may cast freely.
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]

pub mod api;
pub mod arch;
pub mod builder;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod event_loop;
pub mod image;
pub mod jail;
pub mod logger;
pub mod metrics;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod startup_trace;
pub mod terminal;
pub mod vmm;
pub mod vstate;
