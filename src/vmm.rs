//! The VMM: a built VM (KVM state, devices, vCPUs) and the errors of building and running it.

use crate::api::InstanceState;
use crate::arch::x86_64::{acpi, boot, regs};
use crate::cgroup::VmCgroup;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::vstate::control::{PauseError, VcpuControl};
use crate::vstate::exit::ExitSignal;
use crate::vstate::vcpu::{ThreadStart, Vcpu};
use crate::vstate::vm::{Vm, VmError};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;
use wisp_devices::bus::BusError;
use wisp_devices::legacy::{Serial, I8042};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Mptable(#[from] crate::arch::x86_64::mptable::MptableError),
    #[error("vcpu{vcpu}: {source}")]
    VcpuSetup { vcpu: u8, source: regs::RegsError },
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("console file {}: {}", path.display(), crate::config::io_reason(.source))]
    ConsoleFile {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("placing a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("restoring the snapshot: {0}")]
    Restore(#[from] crate::snapshot::persist::RestoreError),
    #[error("{0}")]
    Cgroup(#[from] crate::cgroup::Error),
    #[error("{}", crate::jail::VCPU_CGROUP_REFUSED)]
    CgroupInJail,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

pub(crate) fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}

pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

/// How long the way out waits for the console's reader to take the guest's last output.
const CONSOLE_FINISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs on each vCPU thread with its index and thread id, before the thread enters the guest.
pub(crate) type VcpuStartHook = Arc<dyn Fn(u8, libc::pid_t) -> Result<(), String> + Send + Sync>;

/// How long a pause waits for every vCPU to leave the guest.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the end of the VM waits for the vCPU threads.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A VM built and ready to start: KVM state, devices and vCPUs (not yet running).
pub struct Vmm {
    /// The VM fd and guest memory: never read here, owned so they outlive the vCPUs.
    pub(crate) _vm: Vm,
    /// Taken by [`Vmm::start_vcpus`].
    pub(crate) vcpus: Vec<Vcpu>,
    /// The vCPU threads, joined when the VM ends.
    pub(crate) vcpu_threads: Vec<JoinHandle<()>>,
    pub(crate) exit: ExitSignal,
    pub(crate) serial: Arc<Mutex<Serial>>,
    /// Readable when the guest drained the UART's input FIFO.
    pub(crate) serial_drained: EventFd,
    /// Console input comes from stdin.
    pub(crate) console_input: bool,
    pub(crate) devices: DeviceManager,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) cgroup: Option<Arc<VmCgroup>>,
    pub(crate) vcpu_start: Option<VcpuStartHook>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) vcpu_count: u8,
    pub(crate) mem_size_mib: u64,
    pub(crate) started: std::time::Instant,
    /// What the VM was built from (a snapshot records it).
    pub(crate) config: crate::config::VmConfig,
    /// Restored from a snapshot and not to be resumed yet: the vCPUs stay parked when
    /// the VM starts, until `PATCH /vm` Resumed.
    pub(crate) start_paused: bool,
}

impl Vmm {
    /// Starts one thread per vCPU. Each sets itself up (cgroup, seccomp filter) and waits
    /// for [`Vmm::release_vcpus`] before it enters the guest, so that the main thread's own
    /// filter is in place first.
    pub fn start_vcpus(&mut self) -> Result<(), VmmError> {
        self.control.hold();
        for vcpu in self.vcpus.drain(..) {
            let start: Option<ThreadStart> = self.vcpu_start.clone().map(|f| {
                let b: ThreadStart = Box::new(move |id, tid| f(id, tid));
                b
            });
            let thread = vcpu
                .spawn(start)
                .map_err(io_err("spawning a vCPU thread"))?;
            self.vcpu_threads.push(thread);
        }
        log::info!(
            "VM started: {} vCPU(s), {} MiB, {} virtio device(s)",
            self.vcpu_count,
            self.mem_size_mib,
            self.devices.handlers.len()
        );
        Ok(())
    }

    /// Lets the vCPUs started by [`Vmm::start_vcpus`] enter the guest, unless the VM was
    /// restored paused (they then wait for a resume). Returns whether they run.
    pub fn release_vcpus(&self) -> bool {
        if self.start_paused {
            return false;
        }
        self.control.resume();
        true
    }

    /// Parks every vCPU outside KVM_RUN, or lets them run again. The event loop stops and
    /// resumes device work to match (see [`Vmm::is_paused`]). A pause fails, and the VM runs
    /// on, if a vCPU has ended or does not stop within [`PAUSE_TIMEOUT`].
    pub fn set_paused(&mut self, paused: bool) -> Result<(), PauseError> {
        if paused == self.control.is_paused() {
            return Ok(());
        }
        if paused {
            self.control.pause(self.vcpu_count.into(), PAUSE_TIMEOUT)?;
        } else {
            self.control.resume();
        }
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// The end of the VM, on every way out but SIGKILL: stops the vCPUs, writes back every
    /// disk (data and image metadata; a guest need not have flushed before it powered off),
    /// and leaves no cgroup behind. The devices' backends are closed when the `Vmm` is
    /// dropped, which the stopped vCPU threads no longer prevent.
    pub fn shutdown(&mut self) {
        if !self.control.stop(STOP_TIMEOUT) {
            log::warn!(
                "a vCPU thread did not stop within {} s; its devices are flushed but stay open",
                STOP_TIMEOUT.as_secs()
            );
        }
        for thread in std::mem::take(&mut self.vcpu_threads) {
            // A thread still running is left behind (dropping its handle detaches it).
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        crate::startup_trace::mark("exit: vCPUs stopped");
        for block in self.devices.blocks() {
            if let Err(e) = block.handle.with(|b| b.flush()) {
                log::error!(
                    "disk {}: writing back on the way out failed: {e}",
                    block.config.path.display()
                );
            }
        }
        crate::startup_trace::mark("exit: disks written back");
        // Host processes on the vsock see the end now, and its socket file goes.
        if let Some(v) = self.devices.vsock() {
            v.handle.with(|v| v.close_host_side());
        }
        // The guest's last words reach the console; a reader that does not take them in
        // time loses them (wisp does not wait on it).
        let output = self
            .serial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .output();
        let dropped = output.finish(CONSOLE_FINISH_TIMEOUT);
        if dropped > 0 {
            log::warn!("console: {dropped} bytes of the guest's console output were dropped");
        }
        crate::startup_trace::mark("exit: console output written");
        // The vCPU start hooks hold the last other references to the cgroup.
        self.vcpu_start = None;
        if let Some(cg) = self.cgroup.take() {
            match Arc::try_unwrap(cg) {
                Ok(cg) => {
                    if let Err(e) = cg.remove() {
                        log::warn!("removing the VM's cgroups: {e}");
                    }
                }
                Err(_) => {
                    log::warn!("the VM's cgroups are still in use; the next start removes them")
                }
            }
        }
    }

    /// Last, after [`Vmm::shutdown`]: KVM's teardown of the VM goes to a child process
    /// (`vstate::teardown`), so that wisp's exit does not wait for it.
    pub fn hand_off_teardown(&self) {
        let handed = crate::vstate::teardown::hand_off(self._vm.fd.as_raw_fd(), &self._vm.mem);
        crate::startup_trace::mark(if handed {
            "exit: KVM's teardown handed to a child"
        } else {
            "exit: KVM's teardown stays here"
        });
    }

    pub fn state(&self) -> InstanceState {
        if self.control.is_paused() {
            InstanceState::Paused
        } else {
            InstanceState::Running
        }
    }

    /// `GET /vm/metrics` and `FlushMetrics`.
    pub fn metrics(&self) -> serde_json::Value {
        serde_json::json!({
            "utc_timestamp_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            "uptime_ms": u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "state": self.state(),
            "vcpu_count": self.vcpu_count,
            "mem_size_mib": self.mem_size_mib,
            "vcpu_exits": self.control.exits(),
            "cgroup_usage_usec": self.cgroup.as_ref().and_then(|c| c.usage_usec().ok()),
            "net": self
                .devices
                .nets()
                .iter()
                .map(|net| {
                    let n = net.counters.snapshot();
                    let v = serde_json::json!({
                        "rx_frames": n.rx_frames, "rx_bytes": n.rx_bytes,
                        "rx_dropped": n.rx_dropped, "rx_bad_chains": n.rx_bad_chains,
                        "tx_frames": n.tx_frames, "tx_bytes": n.tx_bytes,
                        "tx_malformed": n.tx_malformed, "tx_errors": n.tx_errors,
                        "rx_rate_limiter_throttled": n.rx_rate_limiter_throttled,
                        "tx_rate_limiter_throttled": n.tx_rate_limiter_throttled,
                    });
                    (net.config.tap.clone(), v)
                })
                .collect::<serde_json::Map<_, _>>(),
            // By drive id (the image's path for a disk given without one).
            "block": self
                .devices
                .blocks()
                .iter()
                .map(|b| {
                    let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                    let c = &b.counters;
                    let v = serde_json::json!({
                        "read_count": l(&c.read_count), "read_bytes": l(&c.read_bytes),
                        "write_count": l(&c.write_count), "write_bytes": l(&c.write_bytes),
                        "flush_count": l(&c.flush_count),
                        "rate_limiter_throttled_events": l(&c.rate_limiter_throttled_events),
                    });
                    let key = b.config.id.clone();
                    (key.unwrap_or_else(|| b.config.path.display().to_string()), v)
                })
                .collect::<serde_json::Map<_, _>>(),
        })
    }
}
