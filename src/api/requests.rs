//! The request bodies of the API, with Firecracker's JSON field names, and the router that turns
//! a method, a path and a body into a validated [`ApiRequest`].
//!
//! Everything that can be checked without VM state is checked here, on the API thread: types,
//! required and unknown fields (`deny_unknown_fields`), ranges, identifiers, MAC syntax, and the
//! Firecracker fields wisp does not implement (a clear 400 rather than silently ignoring them).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ApiFault;
use crate::cgroup::{Affinity, CgroupSpec, CpuList, CpuMax};
pub use crate::config::MacAddr;
use crate::config::{DiskFormat, MAX_MEMORY, MAX_VCPUS, MIN_MEMORY};

/// Drive and interface ids: Firecracker's rule (alphanumeric and `_`, at most 64 characters).
pub const MAX_ID_LEN: usize = 64;
/// A Linux interface name holds at most IFNAMSIZ - 1 bytes.
pub const MAX_IFNAME_LEN: usize = 15;
/// virtio 1.2 §5.2.6: GET_ID answers with at most 20 bytes.
pub const MAX_SERIAL_LEN: usize = 20;

/// One validated API request, ready for the main thread.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET /`
    GetInstanceInfo,
    /// `PUT /boot-source`
    PutBootSource(BootSource),
    /// `GET /machine-config`
    GetMachineConfig,
    /// `PUT /machine-config`
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`
    PatchMachineConfig(MachineConfigUpdate),
    /// `GET /vm/config`
    GetVmConfig,
    /// `PUT /drives/{drive_id}`
    PutDrive(Drive),
    /// `PATCH /drives/{drive_id}`
    PatchDrive(DriveUpdate),
    /// `PUT /network-interfaces/{iface_id}`
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{iface_id}` (after boot)
    PatchNetworkInterface(NetworkInterfaceUpdate),
    /// `PUT /serial`
    PutSerial(SerialConfig),
    /// `PUT /actions`
    Action(ActionType),
    /// `PATCH /vm`
    PatchVm(VmState),
    /// `PUT /logger`
    PutLogger(LoggerConfig),
    /// `PUT /metrics`
    PutMetrics(MetricsConfig),
    /// `GET /vm/metrics` (wisp)
    GetVmMetrics,
    /// `PATCH /vm/cgroup` (wisp)
    PatchCgroup(CgroupUpdate),
}

/// When a request may be served (Firecracker's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Only before InstanceStart.
    PreBoot,
    /// Only once the VM has started.
    PostBoot,
    Always,
}

impl ApiRequest {
    /// In which VM state this request is valid; the main thread answers 400 otherwise
    /// (see [`ApiFault::wrong_state`]).
    pub fn allowed(&self) -> Allowed {
        use ApiRequest::*;
        match self {
            GetInstanceInfo | GetMachineConfig | GetVmConfig | GetVmMetrics => Allowed::Always,
            PutBootSource(_)
            | PutMachineConfig(_)
            | PatchMachineConfig(_)
            | PutDrive(_)
            | PutNetworkInterface(_)
            | PutLogger(_)
            | PutMetrics(_)
            | PutSerial(_) => Allowed::PreBoot,
            Action(ActionType::InstanceStart) => Allowed::PreBoot,
            Action(ActionType::SendCtrlAltDel) => Allowed::PostBoot,
            Action(ActionType::FlushMetrics) => Allowed::Always,
            PatchDrive(_) | PatchNetworkInterface(_) | PatchVm(_) | PatchCgroup(_) => {
                Allowed::PostBoot
            }
        }
    }

    /// `PUT /drives/{id}` style description for messages and logs.
    pub fn describe(&self) -> String {
        use ApiRequest::*;
        match self {
            GetInstanceInfo => "GET /".into(),
            PutBootSource(_) => "PUT /boot-source".into(),
            GetMachineConfig => "GET /machine-config".into(),
            PutMachineConfig(_) => "PUT /machine-config".into(),
            PatchMachineConfig(_) => "PATCH /machine-config".into(),
            GetVmConfig => "GET /vm/config".into(),
            PutDrive(d) => format!("PUT /drives/{}", d.drive_id),
            PatchDrive(d) => format!("PATCH /drives/{}", d.drive_id),
            PutNetworkInterface(n) => format!("PUT /network-interfaces/{}", n.iface_id),
            PatchNetworkInterface(n) => format!("PATCH /network-interfaces/{}", n.iface_id),
            PutSerial(_) => "PUT /serial".into(),
            Action(a) => format!("PUT /actions {a:?}"),
            PatchVm(s) => format!("PATCH /vm {s:?}"),
            PutLogger(_) => "PUT /logger".into(),
            PutMetrics(_) => "PUT /metrics".into(),
            GetVmMetrics => "GET /vm/metrics".into(),
            PatchCgroup(_) => "PATCH /vm/cgroup".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// Left out: wisp's default command line (`config::DEFAULT_CMDLINE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSource {
    pub fn validate(&self) -> Result<(), ApiFault> {
        non_empty_path("kernel_image_path", &self.kernel_image_path)?;
        if let Some(p) = &self.initrd_path {
            non_empty_path("initrd_path", p)?;
        }
        if let Some(args) = &self.boot_args {
            if args.contains('\0') {
                return Err(ApiFault::bad_request("boot_args: contains a NUL character"));
            }
        }
        Ok(())
    }
}

/// `PUT /machine-config` (and the `machine-config` of a config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// 1 to 32.
    pub vcpu_count: u64,
    /// At least 64, at most 1 TiB in MiB.
    pub mem_size_mib: u64,
    /// Two threads per core in the guest's CPUID topology (vcpu_count 1 or even).
    #[serde(default)]
    pub smt: bool,
    /// Accepted and recorded; wisp has no snapshots, so it has no effect.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Only `"None"` is accepted (wisp has no CPU templates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// `"None"` or `"2M"`: guest memory on the host's 2 MiB huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
    /// wisp: confine the vCPU threads in a cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupConfig>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: crate::config::DEFAULT_MEMORY >> 20,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
            cgroup: None,
        }
    }
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ApiFault> {
        check_vcpu_count(self.vcpu_count)?;
        check_mem_size(self.mem_size_mib)?;
        check_smt(self.smt, self.vcpu_count)?;
        check_none_only(
            "cpu_template",
            self.cpu_template.as_deref(),
            "CPU templates",
        )?;
        check_huge_pages(self.huge_pages.as_deref(), self.mem_size_mib)?;
        if let Some(cg) = &self.cgroup {
            cg.validate_vcpu_count(self.vcpu_count)?;
        }
        Ok(())
    }

    /// The result of a PATCH: the fields given replace the current ones.
    pub fn patched(&self, update: &MachineConfigUpdate) -> Result<MachineConfig, ApiFault> {
        let mut m = self.clone();
        if let Some(v) = update.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = update.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = update.smt {
            m.smt = v;
        }
        if let Some(v) = update.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = &update.cpu_template {
            m.cpu_template = Some(v.clone());
        }
        if let Some(v) = &update.huge_pages {
            m.huge_pages = Some(v.clone());
        }
        if let Some(v) = &update.cgroup {
            m.cgroup = Some(v.clone());
        }
        m.validate()?;
        Ok(m)
    }
}

/// `PATCH /machine-config`: every field optional, the ones given replace the current values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupConfig>,
}

impl MachineConfigUpdate {
    pub fn validate(&self) -> Result<(), ApiFault> {
        if let Some(v) = self.vcpu_count {
            check_vcpu_count(v)?;
        }
        if let Some(v) = self.mem_size_mib {
            check_mem_size(v)?;
        }
        if let (Some(smt), Some(n)) = (self.smt, self.vcpu_count) {
            check_smt(smt, n)?;
        }
        check_none_only(
            "cpu_template",
            self.cpu_template.as_deref(),
            "CPU templates",
        )?;
        check_huge_pages(self.huge_pages.as_deref(), self.mem_size_mib.unwrap_or(2))?;
        Ok(())
    }
}

/// wisp's `machine-config.cgroup`: the vCPU threads' cgroup, in the CLI's string forms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupConfig {
    /// Parent group: a path under a cgroup mount or a name relative to the hierarchies;
    /// empty is the hierarchy root.
    #[serde(default)]
    pub parent: String,
    /// `"QUOTA/PERIOD"` in µs (`"20000/100000"`), `"QUOTA"` or `"max"`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_opt_display"
    )]
    pub cpu_max: Option<CpuMax>,
    /// Host CPUs in the kernel's list format (`"0-1,3"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuset: Option<CpuList>,
    /// Per-vCPU pinning `"VCPU:HOSTCPU,..."` (`"0:2,1:3"`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_opt_affinity"
    )]
    pub affinity: Option<Affinity>,
}

impl CgroupConfig {
    pub fn to_spec(&self) -> CgroupSpec {
        CgroupSpec {
            parent: self.parent.clone(),
            cpu_max: self.cpu_max,
            cpuset: self.cpuset.clone(),
            affinity: self.affinity.clone(),
        }
    }

    fn validate_vcpu_count(&self, vcpu_count: u64) -> Result<(), ApiFault> {
        let n = usize::try_from(vcpu_count).unwrap_or(usize::MAX);
        self.to_spec()
            .validate_vcpu_count(n)
            .map_err(|e| ApiFault::bad_request(format!("cgroup.affinity: {e}")))
    }
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    /// With `is_root_device`: the kernel gets `root=PARTUUID=<partuuid>` instead of
    /// `root=/dev/vda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Accepted for compatibility; wisp always passes guest flushes to the host (Writeback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Only `"Sync"` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Refused unless it limits nothing (wisp has no rate limiters yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
    /// vhost-user: not supported, refused when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// wisp: image format; left out, raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// wisp: follow the qcow2 image's backing files (default off: such an image is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_files: Option<bool>,
    /// wisp: backing files only inside this directory, without symbolic links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_dir: Option<PathBuf>,
    /// wisp: block devices may be backing files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_devices: Option<bool>,
    /// wisp: the virtio-blk serial the guest reads (at most 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

impl Drive {
    /// The disk the VM builder opens for this drive.
    pub fn disk_config(&self) -> crate::config::DiskConfig {
        crate::config::DiskConfig {
            id: Some(self.drive_id.clone()),
            path: self.path_on_host.clone(),
            readonly: self.is_read_only,
            serial: self.serial.clone(),
            format: self.format,
            backing_files: self.backing_files.unwrap_or(false),
            backing_dir: self.backing_dir.clone(),
            backing_devices: self.backing_devices.unwrap_or(false),
        }
    }

    pub fn validate(&self) -> Result<(), ApiFault> {
        check_id("drive_id", &self.drive_id)?;
        non_empty_path("path_on_host", &self.path_on_host)?;
        self.disk_config()
            .validate_backing()
            .map_err(|e| ApiFault::bad_request(e.to_string()))?;
        if let Some(p) = &self.partuuid {
            if !self.is_root_device {
                return Err(ApiFault::bad_request(
                    "partuuid: only meaningful with is_root_device: true",
                ));
            }
            if p.is_empty() || !p.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                return Err(ApiFault::bad_request(format!(
                    "partuuid: {p:?} is not a partition UUID (hex digits and '-')"
                )));
            }
        }
        match self.io_engine.as_deref() {
            None | Some("Sync") => {}
            Some(other) => {
                return Err(ApiFault::bad_request(format!(
                    "io_engine: {other:?} is not supported by wisp; use \"Sync\" or leave it out"
                )))
            }
        }
        check_no_limit("rate_limiter", self.rate_limiter.as_ref())?;
        if self.socket.is_some() {
            return Err(ApiFault::bad_request(
                "socket: vhost-user drives are not supported by wisp; give path_on_host",
            ));
        }
        if let Some(s) = &self.serial {
            if s.len() > MAX_SERIAL_LEN {
                return Err(ApiFault::bad_request(format!(
                    "serial: {} bytes, at most {MAX_SERIAL_LEN}",
                    s.len()
                )));
            }
        }
        Ok(())
    }
}

/// `PATCH /drives/{drive_id}` (after boot): a new backing file for the drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    /// The new medium; left out, the drive keeps its file (Firecracker's PATCH may only
    /// change the rate limiter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// Refused unless it limits nothing (wisp has no rate limiters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

impl DriveUpdate {
    pub fn validate(&self) -> Result<(), ApiFault> {
        check_id("drive_id", &self.drive_id)?;
        if let Some(p) = &self.path_on_host {
            non_empty_path("path_on_host", p)?;
        }
        check_no_limit("rate_limiter", self.rate_limiter.as_ref())
    }
}

/// `PUT /network-interfaces/{iface_id}`: a virtio-net device over an existing tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
    /// The MTU told to the guest (VIRTIO_NET_F_MTU) and set on the tap, 68 to 65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Refused unless it limits nothing (wisp has no rate limiters yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Refused unless it limits nothing (wisp has no rate limiters yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
    /// wisp: checksum and segmentation offloads offered to the guest (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<bool>,
}

impl NetworkInterface {
    pub fn validate(&self) -> Result<(), ApiFault> {
        check_id("iface_id", &self.iface_id)?;
        let n = &self.host_dev_name;
        if n.is_empty()
            || n.len() > MAX_IFNAME_LEN
            || n.contains(['/', '\0'])
            || n.contains(char::is_whitespace)
        {
            return Err(ApiFault::bad_request(format!(
                "host_dev_name: {n:?} is not an interface name (1 to {MAX_IFNAME_LEN} bytes, no '/' or whitespace)"
            )));
        }
        if let Some(mtu) = self.mtu {
            if !(crate::config::MIN_MTU as u32..=u16::MAX as u32).contains(&mtu) {
                return Err(ApiFault::bad_request(format!(
                    "mtu: {mtu} is out of range ({} to 65535)",
                    crate::config::MIN_MTU
                )));
            }
        }
        check_no_limit("rx_rate_limiter", self.rx_rate_limiter.as_ref())?;
        check_no_limit("tx_rate_limiter", self.tx_rate_limiter.as_ref())
    }
}

/// `PATCH /network-interfaces/{iface_id}` (after boot): Firecracker's new rate limiters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

impl NetworkInterfaceUpdate {
    pub fn validate(&self) -> Result<(), ApiFault> {
        check_id("iface_id", &self.iface_id)?;
        for (field, limiter) in [
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ] {
            check_no_limit(field, limiter.as_ref())?;
        }
        Ok(())
    }
}

/// Accepts a rate limiter that limits nothing (null, `{}`, or buckets that are null or have a
/// zero size or refill time, which Firecracker takes as "no limit"); refuses one that limits,
/// which wisp cannot honour yet.
fn check_no_limit(field: &str, limiter: Option<&serde_json::Value>) -> Result<(), ApiFault> {
    let unlimited = match limiter {
        None | Some(serde_json::Value::Null) => true,
        Some(v) => v.as_object().is_some_and(|o| {
            o.iter()
                .all(|(k, b)| matches!(k.as_str(), "bandwidth" | "ops") && bucket_is_unlimited(b))
        }),
    };
    if unlimited {
        return Ok(());
    }
    Err(ApiFault::bad_request(format!(
        "{field}: rate limiters are not supported by wisp {VMM_VERSION} yet; send null or \
         {{}} (no limit), or leave it out"
    )))
}

/// A token bucket that limits nothing: null, or a zero size or refill time.
fn bucket_is_unlimited(bucket: &serde_json::Value) -> bool {
    let zero = |k: &str| bucket.get(k).and_then(serde_json::Value::as_u64) == Some(0);
    bucket.is_null() || (bucket.is_object() && (zero("size") || zero("refill_time")))
}

/// `PUT /serial`: where the guest's serial output goes (Firecracker 1.10+).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file (appended to, created if missing) or a named pipe; left out, the serial output
    /// stays on wisp's stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
    /// Not supported: refused unless it limits nothing (null, or a zero size or refill time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

impl SerialConfig {
    pub fn validate(&self) -> Result<(), ApiFault> {
        if let Some(p) = &self.serial_out_path {
            non_empty_path("serial_out_path", p)?;
        }
        // Firecracker's serial limiter is a bare token bucket.
        if !self.rate_limiter.as_ref().is_none_or(bucket_is_unlimited) {
            return Err(ApiFault::bad_request(format!(
                "rate_limiter: rate limiting the serial output is not supported by wisp \
                 {VMM_VERSION} yet; leave it out"
            )));
        }
        Ok(())
    }
}

/// `PUT /actions` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateChange {
    pub state: VmState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File (or named pipe) the log goes to; left out, wisp keeps logging to stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log lines from this module path (e.g. `wisp::vmm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl LoggerConfig {
    pub fn validate(&self) -> Result<(), ApiFault> {
        if let Some(p) = &self.log_path {
            non_empty_path("log_path", p)?;
        }
        Ok(())
    }

    /// The change to wisp's log; fields left out keep their current value.
    pub fn to_settings(&self) -> crate::logger::LogSettings {
        crate::logger::LogSettings {
            path: self.log_path.clone(),
            level: self.level.map(LogLevel::to_level_filter),
            show_level: self.show_level,
            show_origin: self.show_log_origin,
            module: self.module.clone(),
        }
    }
}

/// Log levels; parsed case-insensitively as Firecracker does (`Warn` also means Warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LogLevel, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            "off" => LogLevel::Off,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown level {s:?}, expected Error, Warning, Info, Debug, Trace or Off"
                )))
            }
        })
    }
}

impl LogLevel {
    pub fn to_level_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Off => log::LevelFilter::Off,
        }
    }
}

/// `PUT /metrics`: newline-delimited JSON metrics are written to this path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: PathBuf,
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), ApiFault> {
        non_empty_path("metrics_path", &self.metrics_path)
    }
}

/// wisp: `PATCH /vm/cgroup`, new limits for the running VM's vCPU cgroup. A field left out
/// stays as it is; `null` removes the limit (`cpu_max` becomes `max`, `cpuset` the parent's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupUpdate {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_nullable_from_str",
        serialize_with = "ser_nullable_display"
    )]
    pub cpu_max: Option<Option<CpuMax>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_nullable_from_str",
        serialize_with = "ser_nullable_display"
    )]
    pub cpuset: Option<Option<CpuList>>,
}

impl CgroupUpdate {
    pub fn validate(&self) -> Result<(), ApiFault> {
        if self.cpu_max.is_none() && self.cpuset.is_none() {
            return Err(ApiFault::bad_request(
                "nothing to change: give cpu_max and/or cpuset (null removes a limit)",
            ));
        }
        if let Some(Some(m)) = &self.cpu_max {
            m.validate()
                .map_err(|e| ApiFault::bad_request(format!("cpu_max: {e}")))?;
        }
        if let Some(Some(c)) = &self.cpuset {
            if c.is_empty() {
                return Err(ApiFault::bad_request("cpuset: empty CPU list"));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// `GET /` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    /// The Firecracker API version wisp implements, as Firecracker reports its own here.
    pub vmm_version: String,
    /// wisp's own version.
    pub wisp_version: String,
    pub app_name: String,
}

impl InstanceInfo {
    pub fn new(id: &str, state: InstanceState) -> Self {
        Self {
            id: id.to_string(),
            state,
            vmm_version: FIRECRACKER_API_VERSION.to_string(),
            wisp_version: VMM_VERSION.to_string(),
            app_name: "wisp".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Firecracker release whose API wisp follows (`tests/data/firecracker.yaml`): what
/// `GET /version` tells clients that check Firecracker's version.
pub const FIRECRACKER_API_VERSION: &str = "1.16.1";

/// `GET /version` answer (served by the API thread: it needs no VM state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The Firecracker API version wisp implements (client libraries compare it).
    pub firecracker_version: String,
    /// wisp's own version.
    pub wisp_version: String,
    pub app_name: String,
}

impl VersionInfo {
    pub fn current() -> Self {
        Self {
            firecracker_version: FIRECRACKER_API_VERSION.to_string(),
            wisp_version: VMM_VERSION.to_string(),
            app_name: "wisp".to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------------------------

/// HTTP methods the API knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "GET" => Some(Method::Get),
            "PUT" => Some(Method::Put),
            "PATCH" => Some(Method::Patch),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

/// Every route served, as (method, path template). The OpenAPI test checks the document
/// against this table and the table against the router.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("PUT", "/boot-source"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("GET", "/vm/config"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/serial"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("GET", "/vm/metrics"),
    ("PATCH", "/vm/cgroup"),
];

/// Firecracker's endpoints (v1.16) that wisp does not implement yet, with what they are
/// about: any method on them answers 400 saying so, where an unknown path gets 404.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    ("/balloon", "balloon devices"),
    ("/balloon/statistics", "balloon devices"),
    ("/balloon/hinting/start", "balloon devices"),
    ("/balloon/hinting/status", "balloon devices"),
    ("/balloon/hinting/stop", "balloon devices"),
    ("/cpu-config", "custom CPU templates (cpu-config)"),
    ("/entropy", "entropy (virtio-rng) devices"),
    ("/hotplug/memory", "memory hotplug (virtio-mem) devices"),
    ("/mmds", "the metadata service (MMDS) and its requests"),
    (
        "/mmds/config",
        "the metadata service (MMDS) and its requests",
    ),
    ("/pmem/{id}", "virtio-pmem devices"),
    ("/snapshot/create", "snapshots"),
    ("/snapshot/load", "snapshots"),
    ("/vsock", "vsock devices"),
];

/// What the router made of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    /// For the main thread.
    Request(ApiRequest),
    /// Answered by the API thread itself (`GET /version`): the JSON body.
    Local(serde_json::Value),
}

/// Matches `path` against a template; returns the value of its `{param}` segment if any.
fn match_template<'a>(template: &str, path: &'a str) -> Option<Option<&'a str>> {
    let mut param = None;
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(param),
            (Some(ts), Some(ps)) => {
                if ts.starts_with('{') {
                    if ps.is_empty() {
                        return None;
                    }
                    param = Some(ps);
                } else if ts != ps {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

/// The templates that match `path`, and the param value.
fn find_route(path: &str) -> (Vec<(&'static str, &'static str)>, Option<&str>) {
    let mut found = Vec::new();
    let mut param = None;
    for &(m, t) in ROUTES {
        if let Some(p) = match_template(t, path) {
            found.push((m, t));
            param = p;
        }
    }
    (found, param)
}

/// The methods served on `path` (for a 405's Allow header); empty for an unknown path.
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let path = path.split('?').next().unwrap_or(path);
    let (found, _) = find_route(path);
    found.into_iter().map(|(m, _)| m).collect()
}

/// Turns one HTTP request into a validated request. Unknown path: 404; known path, other
/// method: 405; bad body: 400. A query string is ignored.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Routed, ApiFault> {
    let path = path.split('?').next().unwrap_or(path);
    let (found, param) = find_route(path);
    let Some(&(_, template)) = found.iter().find(|(m, _)| *m == method) else {
        if let Some((_, what)) = UNSUPPORTED
            .iter()
            .find(|(t, _)| match_template(t, path).is_some())
        {
            return Err(ApiFault::bad_request(format!(
                "{method} {path}: {what} are not supported by wisp {VMM_VERSION} (it implements \
                 Firecracker's API v{FIRECRACKER_API_VERSION} without them)"
            )));
        }
        let invalid = format!("Invalid request method and/or path: {method} {path}");
        return Err(if found.is_empty() {
            ApiFault::new(404, invalid)
        } else {
            ApiFault::new(405, invalid)
        });
    };
    let param = param.unwrap_or("");
    let req = match (method, template) {
        ("GET", "/") => ApiRequest::GetInstanceInfo,
        ("GET", "/version") => {
            let v = serde_json::to_value(VersionInfo::current())
                .expect("VersionInfo serializes to JSON");
            return Ok(Routed::Local(v));
        }
        ("PUT", "/boot-source") => {
            let b: BootSource = parse_body(body)?;
            b.validate()?;
            ApiRequest::PutBootSource(b)
        }
        ("GET", "/machine-config") => ApiRequest::GetMachineConfig,
        ("PUT", "/machine-config") => {
            let m: MachineConfig = parse_body(body)?;
            m.validate()?;
            ApiRequest::PutMachineConfig(m)
        }
        ("PATCH", "/machine-config") => {
            let m: MachineConfigUpdate = parse_body(body)?;
            m.validate()?;
            ApiRequest::PatchMachineConfig(m)
        }
        ("GET", "/vm/config") => ApiRequest::GetVmConfig,
        ("PUT", "/drives/{drive_id}") => {
            let d: Drive = parse_body(body)?;
            check_path_id("drive_id", param, &d.drive_id)?;
            d.validate()?;
            ApiRequest::PutDrive(d)
        }
        ("PATCH", "/drives/{drive_id}") => {
            let d: DriveUpdate = parse_body(body)?;
            check_path_id("drive_id", param, &d.drive_id)?;
            d.validate()?;
            ApiRequest::PatchDrive(d)
        }
        ("PUT", "/network-interfaces/{iface_id}") => {
            let n: NetworkInterface = parse_body(body)?;
            check_path_id("iface_id", param, &n.iface_id)?;
            n.validate()?;
            ApiRequest::PutNetworkInterface(n)
        }
        ("PATCH", "/network-interfaces/{iface_id}") => {
            let n: NetworkInterfaceUpdate = parse_body(body)?;
            check_path_id("iface_id", param, &n.iface_id)?;
            n.validate()?;
            ApiRequest::PatchNetworkInterface(n)
        }
        ("PUT", "/serial") => {
            let c: SerialConfig = parse_body(body)?;
            c.validate()?;
            ApiRequest::PutSerial(c)
        }
        ("PUT", "/actions") => {
            let a: InstanceAction = parse_body(body)?;
            ApiRequest::Action(a.action_type)
        }
        ("PATCH", "/vm") => {
            let s: VmStateChange = parse_body(body)?;
            ApiRequest::PatchVm(s.state)
        }
        ("PUT", "/logger") => {
            let l: LoggerConfig = parse_body(body)?;
            l.validate()?;
            ApiRequest::PutLogger(l)
        }
        ("PUT", "/metrics") => {
            let m: MetricsConfig = parse_body(body)?;
            m.validate()?;
            ApiRequest::PutMetrics(m)
        }
        ("GET", "/vm/metrics") => ApiRequest::GetVmMetrics,
        ("PATCH", "/vm/cgroup") => {
            let c: CgroupUpdate = parse_body(body)?;
            c.validate()?;
            ApiRequest::PatchCgroup(c)
        }
        _ => unreachable!("ROUTES entry {method} {template} has no handler"),
    };
    Ok(Routed::Request(req))
}

/// Parses a JSON body; the fault names the field that is wrong (`vcpu_count: invalid type ...`).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiFault> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiFault::bad_request(
            "the request body is empty; this request needs a JSON object",
        ));
    }
    // serde's derived structs also accept a JSON array of the fields in order: refuse it.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiFault::bad_request(
            "invalid JSON body: expected a JSON object ({...})",
        ));
    }
    // Request bodies nest three levels at most; refusing deep nesting before serde recurses
    // keeps a hostile body from exhausting the connection thread's stack.
    if nesting_exceeds(body, MAX_JSON_DEPTH) {
        return Err(ApiFault::bad_request(format!(
            "invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = strip_position(&inner);
        if path == "." || path.is_empty() || inner.is_syntax() || inner.is_eof() {
            ApiFault::bad_request(format!("invalid JSON body: {msg}"))
        } else {
            ApiFault::bad_request(format!("{path}: {msg}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiFault::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// Deepest nesting of JSON arrays and objects accepted in a body.
pub const MAX_JSON_DEPTH: usize = 16;

/// True if arrays/objects nest deeper than `max` (brackets inside strings do not count).
fn nesting_exceeds(body: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// serde_json's message, with " at line L column C" kept only for syntax errors.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    if e.is_syntax() || e.is_eof() {
        return s;
    }
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn check_path_id(field: &str, in_path: &str, in_body: &str) -> Result<(), ApiFault> {
    check_id(field, in_path)?;
    if in_path != in_body {
        return Err(ApiFault::bad_request(format!(
            "{field}: the path names {in_path:?} but the body names {in_body:?}"
        )));
    }
    Ok(())
}

fn check_id(field: &str, id: &str) -> Result<(), ApiFault> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(ApiFault::bad_request(format!(
            "{field}: {id:?} is not a valid id (1 to {MAX_ID_LEN} letters, digits or '_')"
        )));
    }
    Ok(())
}

fn non_empty_path(field: &str, p: &std::path::Path) -> Result<(), ApiFault> {
    let s = p.as_os_str();
    if s.is_empty() {
        return Err(ApiFault::bad_request(format!("{field}: empty path")));
    }
    if s.as_encoded_bytes().contains(&0) {
        return Err(ApiFault::bad_request(format!(
            "{field}: contains a NUL character"
        )));
    }
    Ok(())
}

fn check_vcpu_count(n: u64) -> Result<(), ApiFault> {
    if n == 0 || n > u64::from(MAX_VCPUS) {
        return Err(ApiFault::bad_request(format!(
            "vcpu_count: must be between 1 and {MAX_VCPUS}, got {n}"
        )));
    }
    Ok(())
}

fn check_mem_size(mib: u64) -> Result<(), ApiFault> {
    let (min, max) = (MIN_MEMORY >> 20, MAX_MEMORY >> 20);
    if !(min..=max).contains(&mib) {
        return Err(ApiFault::bad_request(format!(
            "mem_size_mib: must be between {min} and {max}, got {mib}"
        )));
    }
    Ok(())
}

/// Firecracker's rule: with SMT (two threads per core) the vCPU count is 1 or even.
fn check_smt(smt: bool, vcpu_count: u64) -> Result<(), ApiFault> {
    if smt && vcpu_count > 1 && !vcpu_count.is_multiple_of(2) {
        return Err(ApiFault::bad_request(format!(
            "smt: true puts two threads on each core, so vcpu_count must be 1 or even, got \
             {vcpu_count}"
        )));
    }
    Ok(())
}

/// Firecracker's `huge_pages`: `"None"` or `"2M"` (2 MiB hugetlbfs pages, which need the
/// memory size to be a multiple of 2 MiB).
fn check_huge_pages(v: Option<&str>, mem_size_mib: u64) -> Result<(), ApiFault> {
    match v {
        None | Some("None") => Ok(()),
        Some("2M") if mem_size_mib.is_multiple_of(2) => Ok(()),
        Some("2M") => Err(ApiFault::bad_request(format!(
            "huge_pages: \"2M\" needs mem_size_mib to be a multiple of 2, got {mem_size_mib}"
        ))),
        Some(other) => Err(ApiFault::bad_request(format!(
            "huge_pages: {other:?} is not a huge page size wisp knows; send \"None\" or \"2M\""
        ))),
    }
}

impl MachineConfig {
    /// Whether guest memory is to be on 2 MiB huge pages.
    pub fn huge_pages_2m(&self) -> bool {
        self.huge_pages.as_deref() == Some("2M")
    }
}

fn check_none_only(field: &str, v: Option<&str>, what: &str) -> Result<(), ApiFault> {
    match v {
        None | Some("None") => Ok(()),
        Some(other) => Err(ApiFault::bad_request(format!(
            "{field}: {other:?} is not supported (wisp has no {what}); send \"None\" or leave it out"
        ))),
    }
}

// serde helpers for the string forms of the cgroup types.

fn de_opt_from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn de_nullable_from_str<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(Some(None)),
        Some(s) => s
            .parse()
            .map(|v| Some(Some(v)))
            .map_err(serde::de::Error::custom),
    }
}

fn ser_opt_display<S: Serializer, T: fmt::Display>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn ser_nullable_display<S: Serializer, T: fmt::Display>(
    v: &Option<Option<T>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(Some(v)) => s.collect_str(v),
        _ => s.serialize_none(),
    }
}

fn ser_opt_affinity<S: Serializer>(v: &Option<Affinity>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(a) => {
            let text: Vec<String> =
                a.0.iter()
                    .map(|p| format!("{}:{}", p.vcpu, p.host_cpu))
                    .collect();
            s.serialize_str(&text.join(","))
        }
        None => s.serialize_none(),
    }
}
