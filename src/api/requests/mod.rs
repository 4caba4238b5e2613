//! The request bodies of the API, with Firecracker's JSON field names, and the router that turns
//! a method, a path and a body into a validated [`ApiRequest`]; one file per resource.
//!
//! Everything that can be checked without VM state is checked here, on the API thread: types,
//! required and unknown fields (`deny_unknown_fields`), ranges, identifiers, MAC syntax, and the
//! Firecracker fields wisp does not implement (a clear 400 rather than silently ignoring them).

mod actions;
mod balloon;
mod boot;
mod cgroup;
mod drives;
mod entropy;
mod info;
mod logging;
mod machine;
mod mmds;
mod net;
mod rate_limiter;
mod router;
mod serial;
mod snapshot;
mod vsock;

pub use actions::{ActionType, InstanceAction, VmState, VmStateChange};
pub use balloon::{BalloonConfig, BalloonStatsUpdate, BalloonUpdate};
pub use boot::BootSource;
pub use cgroup::{CgroupConfig, CgroupUpdate};
pub use drives::{CacheType, Drive, DriveUpdate};
pub use entropy::EntropyDevice;
pub use info::{InstanceInfo, InstanceState, VersionInfo, FIRECRACKER_API_VERSION, VMM_VERSION};
pub use logging::{LogLevel, LoggerConfig, MetricsConfig};
pub use machine::{MachineConfig, MachineConfigUpdate};
pub use mmds::{check_mmds_config, MmdsConfig};
pub use net::{MacAddr, NetworkInterface, NetworkInterfaceUpdate};
pub use router::{allowed_methods, parse_body, route, Method, Routed, ROUTES, UNSUPPORTED};
pub use serial::SerialConfig;
pub use snapshot::{SnapshotCreate, SnapshotLoad};
pub use vsock::VsockDevice;

use super::ApiFault;

/// Drive and interface ids: Firecracker's rule (alphanumeric and `_`, at most 64 characters).
pub const MAX_ID_LEN: usize = 64;

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
    /// `PUT /entropy`
    PutEntropy(EntropyDevice),
    /// `PUT /vsock`
    PutVsock(VsockDevice),
    /// `PUT /balloon`
    PutBalloon(BalloonConfig),
    /// `PATCH /balloon` (after boot)
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon`
    GetBalloon,
    /// `GET /balloon/statistics` (after boot)
    GetBalloonStats,
    /// `PATCH /balloon/statistics` (after boot)
    PatchBalloonStats(BalloonStatsUpdate),
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
    /// `GET /mmds`
    GetMmds,
    /// `PUT /mmds`: the whole document.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: a JSON merge patch (RFC 7396) of the document.
    PatchMmds(serde_json::Value),
    /// `PUT /mmds/config`
    PutMmdsConfig(MmdsConfig),
    /// `PUT /snapshot/create` (a paused VM)
    CreateSnapshot(SnapshotCreate),
    /// `PUT /snapshot/load` (before boot)
    LoadSnapshot(SnapshotLoad),
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
            GetInstanceInfo | GetMachineConfig | GetVmConfig | GetVmMetrics | GetBalloon
            | GetMmds | PutMmds(_) | PatchMmds(_) => Allowed::Always,
            PutBootSource(_)
            | PutMachineConfig(_)
            | PatchMachineConfig(_)
            | PutDrive(_)
            | PutNetworkInterface(_)
            | PutLogger(_)
            | PutMetrics(_)
            | PutSerial(_)
            | PutEntropy(_)
            | PutVsock(_)
            | PutBalloon(_)
            | PutMmdsConfig(_) => Allowed::PreBoot,
            Action(ActionType::InstanceStart) | LoadSnapshot(_) => Allowed::PreBoot,
            CreateSnapshot(_) => Allowed::PostBoot,
            Action(ActionType::SendCtrlAltDel) => Allowed::PostBoot,
            Action(ActionType::FlushMetrics) => Allowed::Always,
            PatchDrive(_)
            | PatchNetworkInterface(_)
            | PatchVm(_)
            | PatchCgroup(_)
            | PatchBalloon(_)
            | GetBalloonStats
            | PatchBalloonStats(_) => Allowed::PostBoot,
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
            PutEntropy(_) => "PUT /entropy".into(),
            PutVsock(_) => "PUT /vsock".into(),
            PutBalloon(_) => "PUT /balloon".into(),
            PatchBalloon(_) => "PATCH /balloon".into(),
            GetBalloon => "GET /balloon".into(),
            GetBalloonStats => "GET /balloon/statistics".into(),
            PatchBalloonStats(_) => "PATCH /balloon/statistics".into(),
            Action(a) => format!("PUT /actions {a:?}"),
            PatchVm(s) => format!("PATCH /vm {s:?}"),
            PutLogger(_) => "PUT /logger".into(),
            PutMetrics(_) => "PUT /metrics".into(),
            GetVmMetrics => "GET /vm/metrics".into(),
            PatchCgroup(_) => "PATCH /vm/cgroup".into(),
            GetMmds => "GET /mmds".into(),
            PutMmds(_) => "PUT /mmds".into(),
            PatchMmds(_) => "PATCH /mmds".into(),
            PutMmdsConfig(_) => "PUT /mmds/config".into(),
            CreateSnapshot(_) => "PUT /snapshot/create".into(),
            LoadSnapshot(_) => "PUT /snapshot/load".into(),
        }
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
