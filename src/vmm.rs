//! The VMM: a built VM (KVM state, devices, vCPUs) and the errors of building and running it.

use crate::api::ApiChannel;
use crate::arch::x86_64::{acpi, boot, regs};
use crate::cgroup::VmCgroup;
use crate::device_manager::{DeviceError, VirtioDevices};
use crate::vstate::control::VcpuControl;
use crate::vstate::exit::ExitSignal;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{Vm, VmError};
use std::io;
use std::sync::{Arc, Mutex};
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
    #[error("vcpu{vcpu}: {source}")]
    VcpuSetup { vcpu: u8, source: regs::RegsError },
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("console file {path}: {reason}")]
    ConsoleFile {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("placing a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{0}")]
    Cgroup(#[from] crate::cgroup::Error),
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

/// Runs on each vCPU thread with its index and thread id, before the thread enters the guest.
pub(crate) type VcpuStartHook = Arc<dyn Fn(u8, libc::pid_t) -> Result<(), String> + Send + Sync>;

/// A VM built and ready to start.
pub struct Vmm {
    /// The VM fd and guest memory: never read here, owned so they outlive the vCPUs.
    pub(crate) _vm: Vm,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) exit: ExitSignal,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) serial_drained: EventFd,
    pub(crate) console_input: bool,
    pub(crate) virtio: VirtioDevices,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) cgroup: Option<Arc<VmCgroup>>,
    pub(crate) vcpu_start: Option<VcpuStartHook>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) vcpu_count: u8,
    pub(crate) mem_size_mib: u64,
    pub(crate) started: std::time::Instant,
    pub(crate) net_counters: Vec<(String, Arc<wisp_devices::virtio::net::NetCounters>)>,
}

/// What the control API needs once the VM runs.
pub struct ApiContext {
    pub channel: ApiChannel,
    pub id: String,
    /// `GET /vm/config`.
    pub vm_config: serde_json::Value,
    /// Where `FlushMetrics` appends a line of JSON (`PUT /metrics`).
    pub metrics_path: Option<std::path::PathBuf>,
}
