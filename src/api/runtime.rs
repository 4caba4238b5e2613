//! The runtime API controller: requests served once the VM has started.

use crate::api::{
    ActionType, ApiFault, ApiRequest, ApiResponse, DriveUpdate, InstanceInfo, InstanceState,
    StartedDrive, VmState,
};
use crate::vmm::*;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::RawFd;
use vmm_sys_util::epoll::Epoll;

impl Vmm {
    pub(crate) fn state(&self) -> InstanceState {
        if self.control.is_paused() {
            InstanceState::Paused
        } else {
            InstanceState::Running
        }
    }

    pub(crate) fn metrics(&self) -> serde_json::Value {
        serde_json::json!({
            "utc_timestamp_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "state": self.state(),
            "vcpu_count": self.vcpu_count,
            "mem_size_mib": self.mem_size_mib,
            "vcpu_exits": self.control.exits(),
            "cgroup_usage_usec": self.cgroup.as_ref().and_then(|c| c.usage_usec().ok()),
            "net": self
                .net_counters
                .iter()
                .map(|(tap, c)| {
                    let n = c.snapshot();
                    let v = serde_json::json!({
                        "rx_frames": n.rx_frames, "rx_bytes": n.rx_bytes,
                        "rx_dropped": n.rx_dropped, "rx_bad_chains": n.rx_bad_chains,
                        "tx_frames": n.tx_frames, "tx_bytes": n.tx_bytes,
                        "tx_malformed": n.tx_malformed, "tx_errors": n.tx_errors,
                    });
                    (tap.clone(), v)
                })
                .collect::<serde_json::Map<_, _>>(),
        })
    }

    /// `PATCH /drives/{id}`: the drive gets the new file as its medium (the guest sees the
    /// new size and contents). Opened here, on the event loop, between two requests.
    fn change_drive_medium(
        &self,
        update: &DriveUpdate,
        api: &mut ApiContext,
    ) -> Result<(), ApiFault> {
        let started = StartedDrive::find(&api.vm_config, &update.drive_id)?;
        let path = &update.path_on_host;
        if let Some((other, _)) = started
            .others
            .iter()
            .find(|(_, p)| p == path || same_file(p, path))
        {
            return Err(ApiFault::bad_request(format!(
                "path_on_host: {} is drive {other:?}'s file",
                path.display()
            )));
        }
        // A read-write image is locked exclusively: its own drive cannot open it a second
        // time (a read-only drive can, which re-reads its size).
        if !started.drive.is_read_only && same_file(&started.drive.path_on_host, path) {
            return Err(ApiFault::bad_request(format!(
                "path_on_host: {} is already drive {:?}'s file; a read-write drive cannot \
                 reopen it (give another file)",
                path.display(),
                update.drive_id
            )));
        }
        let handler = self
            .virtio
            .handlers
            .get(started.device_index)
            .ok_or_else(|| {
                ApiFault::internal(format!("drive {:?} has no device", update.drive_id))
            })?;
        let mut disk = started.drive.disk_config();
        disk.path = path.clone();
        let sectors = crate::device_manager::change_medium(handler, &disk).map_err(|e| {
            ApiFault::bad_request(format!("drive {:?} keeps its medium: {e}", update.drive_id))
        })?;
        StartedDrive::set_path(&mut api.vm_config, &update.drive_id, path);
        log::info!(
            "drive {}: new medium {} ({sectors} sectors)",
            update.drive_id,
            path.display()
        );
        Ok(())
    }

    /// Answers an API request once the VM has started.
    pub(crate) fn handle_api(
        &mut self,
        req: ApiRequest,
        api: &mut ApiContext,
        epoll: &Epoll,
        device_fds: &mut [Vec<RawFd>],
    ) -> ApiResponse {
        let internal = |e: io::Error| ApiFault::internal(e.to_string());
        match req {
            ApiRequest::GetInstanceInfo => Ok(Some(
                serde_json::to_value(InstanceInfo::new(&api.id, self.state()))
                    .map_err(|e| ApiFault::internal(e.to_string()))?,
            )),
            ApiRequest::GetVmConfig => Ok(Some(api.vm_config.clone())),
            ApiRequest::GetMachineConfig => Ok(Some(
                api.vm_config
                    .get("machine-config")
                    .cloned()
                    .unwrap_or(serde_json::Value::Null),
            )),
            ApiRequest::GetVmMetrics => Ok(Some(self.metrics())),
            ApiRequest::PatchVm(VmState::Paused) => {
                self.set_paused(true, epoll, device_fds).map_err(internal)?;
                Ok(None)
            }
            ApiRequest::PatchVm(VmState::Resumed) => {
                self.set_paused(false, epoll, device_fds)
                    .map_err(internal)?;
                Ok(None)
            }
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                self.i8042
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .send_ctrl_alt_del();
                Ok(None)
            }
            ApiRequest::Action(ActionType::FlushMetrics) => {
                let path = api.metrics_path.as_ref().ok_or_else(|| {
                    ApiFault::bad_request(
                        "metrics are not configured: PUT /metrics before InstanceStart",
                    )
                })?;
                let mut f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(internal)?;
                writeln!(f, "{}", self.metrics()).map_err(internal)?;
                Ok(None)
            }
            ApiRequest::PatchCgroup(update) => {
                let cg = self.cgroup.as_ref().ok_or_else(|| {
                    ApiFault::bad_request("the VM has no cgroup: start it with a cgroup parent")
                })?;
                let cpu_max = update
                    .cpu_max
                    .map(|m| m.unwrap_or(crate::cgroup::CpuMax::UNLIMITED));
                let cpuset = match update.cpuset {
                    Some(Some(list)) => Some(list),
                    Some(None) => Some(
                        crate::cgroup::CpuList::online()
                            .map_err(|e| ApiFault::bad_request(e.to_string()))?,
                    ),
                    None => None,
                };
                cg.set_limits(cpu_max, cpuset)
                    .map_err(|e| ApiFault::bad_request(e.to_string()))?;
                Ok(None)
            }
            ApiRequest::PatchDrive(update) => {
                self.change_drive_medium(&update, api)?;
                Ok(None)
            }
            other => Err(ApiFault::wrong_state(&other, true)),
        }
    }
}

/// Whether two paths name the same file (both exist and have the same device and inode).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
