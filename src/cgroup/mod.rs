//! vCPU thread confinement in cgroups (v1 and v2).
//!
//! wisp creates one group per VM, `<parent>/wisp-<vm>-<pid>-<start>`, and in it a group
//! `vcpus` that receives the vCPU threads (by TID) and carries the CPU cap and cpuset; the
//! VMM's other threads stay outside it. The pid and its start time (clock ticks since boot)
//! in the name let a later start recognise groups of a dead wisp ([`VmCgroup::cleanup_stale`]).
//!
//! - cgroup v1 (cpu, cpuacct, cpuset hierarchies, possibly co-mounted): the groups are made in
//!   each hierarchy, cpuset groups get `cpuset.cpus`/`cpuset.mems` from their parent before any
//!   task joins, TIDs go into `tasks`.
//! - cgroup v2: the VM group becomes a threaded domain holding the whole process (threads can
//!   only move within one threaded domain), `vcpus` is `threaded`, TIDs go into
//!   `cgroup.threads`, and `cpu`/`cpuset` are enabled in `cgroup.subtree_control` from the
//!   mount root down.
//!
//! Writes go straight to the cgroup filesystem: no cgroups-rs (it pulls a D-Bus stack).

mod fs;
mod group;
mod mounts;
mod spec;

#[cfg(test)]
mod host_tests;

use std::path::PathBuf;

pub use group::VmCgroup;
pub use mounts::{CgroupMount, CgroupVersion, Host, MountTable};
pub use spec::{
    Affinity, CgroupSpec, CpuList, CpuMax, VcpuPin, DEFAULT_PERIOD_US, MAX_PERIOD_US,
    MIN_PERIOD_US, MIN_QUOTA_US,
};

/// Errors of cgroup set-up and control; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid CPU list `{input}`: {reason} (expected a list such as 0-1,3)")]
    InvalidCpuList { input: String, reason: String },
    #[error("invalid CPU cap `{input}`: {reason}")]
    InvalidCpuMax { input: String, reason: String },
    #[error(
        "invalid vCPU affinity `{input}`: {reason} (expected VCPU:HOSTCPU pairs such as 0:1,1:0)"
    )]
    InvalidAffinity { input: String, reason: String },
    #[error("CPU quota {quota_us} µs is too small: the kernel needs at least 1000 µs per period")]
    QuotaTooSmall { quota_us: u64 },
    #[error("CPU period {period_us} µs is out of range: the kernel accepts 1000 to 1000000 µs")]
    PeriodOutOfRange { period_us: u64 },
    #[error("host CPU {cpu} in the {what} is not online on this host (online CPUs: {online})")]
    CpuNotOnline {
        what: &'static str,
        cpu: u32,
        online: String,
    },
    #[error("vCPU {vcpu} is pinned more than once in the vCPU affinity")]
    DuplicateVcpu { vcpu: usize },
    #[error("vCPU {vcpu} is pinned, but the VM has only {vcpu_count} vCPUs")]
    VcpuOutOfRange { vcpu: usize, vcpu_count: usize },
    #[error(
        "vCPU {vcpu} is pinned to host CPU {host_cpu}, which is outside the vCPU cpuset {cpuset}"
    )]
    AffinityOutsideCpuset {
        vcpu: usize,
        host_cpu: u32,
        cpuset: String,
    },
    #[error("invalid cgroup parent `{parent}`: {reason}")]
    InvalidParent { parent: String, reason: String },
    #[error("invalid VM name `{name}` for a cgroup: {reason}")]
    InvalidVmName { name: String, reason: String },
    #[error("cgroup parent `{parent}` is not under any cgroup mount (cgroup mounts: {mounts}); give a path under one of them or a name relative to the hierarchies")]
    ParentOutsideMount { parent: String, mounts: String },
    #[error("cgroup parent {} does not exist; create it or choose an existing group", path.display())]
    ParentMissing { path: PathBuf },
    #[error("cgroup controller `{controller}` is not available: {looked_at}; mount a cgroup v1 hierarchy with it or enable it in the cgroup v2 root")]
    ControllerUnavailable {
        controller: String,
        looked_at: String,
    },
    #[error("cgroup {} already exists; is another wisp with this VM name and pid running?", path.display())]
    GroupExists { path: PathBuf },
    #[error("cgroup {} still holds tasks and cannot be removed", path.display())]
    GroupBusy { path: PathBuf },
    #[error("permission denied: cannot {op} {}: {source} (run wisp as a user that may write this cgroup, or pick a delegated parent)", path.display())]
    PermissionDenied {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup file {} does not exist; is its controller enabled for this group?", path.display())]
    MissingFile { path: PathBuf },
    #[error("the kernel rejected `{value}` written to {}: {source}{hint}", file.display())]
    KernelRejected {
        file: PathBuf,
        value: String,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error("unexpected content `{content}` in {}", path.display())]
    BadKernelFile { path: PathBuf, content: String },
    #[error("cannot pin thread {tid} to host CPU {cpu}: {source}")]
    ThreadAffinity {
        tid: libc::pid_t,
        cpu: u32,
        source: std::io::Error,
    },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}
