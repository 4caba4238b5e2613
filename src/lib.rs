//! wisp: a lightweight virtual machine monitor for x86_64 KVM.

pub mod cgroup;
