//! The runtime API controller: requests served once the VM has started (Firecracker's
//! `RuntimeApiController`). It acts on the running [`Vmm`]; requests valid only before
//! InstanceStart are refused here.

use crate::api::{
    ActionType, ApiFault, ApiRequest, ApiResponse, DriveUpdate, InstanceInfo,
    NetworkInterfaceUpdate, PendingConfig, VmState,
};
use crate::config::balloon::mib_to_pages;
use crate::config::RateLimiterConfig;
use crate::device_manager::change_medium;
use crate::vmm::Vmm;
use crate::vstate::control::PauseError;
use wisp_devices::virtio::balloon::STAT_NAMES;

/// What the API needs of a started VM beyond the [`Vmm`] itself.
pub struct RuntimeApiController {
    id: String,
    /// The configuration the VM was built from, kept up to date (`GET /vm/config`).
    config: PendingConfig,
}

impl RuntimeApiController {
    pub fn new(id: String, config: PendingConfig) -> Self {
        Self { id, config }
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &PendingConfig {
        &self.config
    }

    /// `PATCH /drives/{id}`: the drive gets the new file as its medium (the guest sees the
    /// new size and contents). Opened here, on the event loop, between two requests.
    fn change_drive_medium(&mut self, vmm: &mut Vmm, update: &DriveUpdate) -> Result<(), ApiFault> {
        let id = &update.drive_id;
        let drive = self.config.drive_mut(id)?.clone();
        let Some(path) = &update.path_on_host else {
            return Ok(());
        };
        if let Some(other) = self
            .config
            .drives
            .iter()
            .filter(|d| d.drive_id != *id)
            .find(|d| d.path_on_host == *path || same_file(&d.path_on_host, path))
        {
            return Err(ApiFault::bad_request(format!(
                "path_on_host: {} is drive {:?}'s file",
                path.display(),
                other.drive_id
            )));
        }
        // A read-write image is locked exclusively: its own drive cannot open it a second
        // time (a read-only drive can, which re-reads its size).
        if !drive.is_read_only && same_file(&drive.path_on_host, path) {
            return Err(ApiFault::bad_request(format!(
                "path_on_host: {} is already drive {id:?}'s file; a read-write drive cannot \
                 reopen it (give another file)",
                path.display(),
            )));
        }
        let block = vmm
            .devices
            .block_mut(id)
            .ok_or_else(|| ApiFault::internal(format!("drive {id:?} has no device")))?;
        let mut disk = block.config.clone();
        disk.path = path.clone();
        let sectors = change_medium(block, &disk)
            .map_err(|e| ApiFault::bad_request(format!("drive {id:?} keeps its medium: {e}")))?;
        self.config.drive_mut(id)?.path_on_host = path.clone();
        log::info!(
            "drive {id}: new medium {} ({sectors} sectors)",
            path.display()
        );
        Ok(())
    }

    /// `PATCH /drives/{id}` with `rate_limiter`: the buckets given replace the drive's, from
    /// its next request on; requests held back by the old limits are looked at again.
    fn change_drive_limits(
        &mut self,
        vmm: &mut Vmm,
        id: &str,
        update: &RateLimiterConfig,
    ) -> Result<(), ApiFault> {
        let drive = self.config.drive_mut(id)?;
        let (limits, [bandwidth, ops]) = drive.rate_limiter.unwrap_or_default().patched(update);
        let block = vmm
            .devices
            .block_mut(id)
            .ok_or_else(|| ApiFault::internal(format!("drive {id:?} has no device")))?;
        if !block.handle.with(|b| b.update_rate_limiter(bandwidth, ops)) {
            return Err(ApiFault::internal(format!(
                "drive {id:?} was built without a rate limiter"
            )));
        }
        let limits = Some(limits).filter(|l| l.bandwidth.is_some() || l.ops.is_some());
        block.config.rate_limiter = limits;
        drive.rate_limiter = limits;
        log::info!("drive {id}: rate limits now {limits:?}");
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}`: new rx and tx limits, as for drives.
    fn change_net_limits(
        &mut self,
        vmm: &mut Vmm,
        update: &NetworkInterfaceUpdate,
    ) -> Result<(), ApiFault> {
        let id = &update.iface_id;
        let iface = self
            .config
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == *id)
            .ok_or_else(|| {
                ApiFault::bad_request(format!("iface_id: the VM has no network interface {id:?}"))
            })?;
        let net = vmm
            .devices
            .net_mut(id)
            .ok_or_else(|| ApiFault::internal(format!("interface {id:?} has no device")))?;
        for (rx, update) in [
            (true, &update.rx_rate_limiter),
            (false, &update.tx_rate_limiter),
        ] {
            let Some(update) = update else {
                continue;
            };
            let current = if rx {
                &mut iface.rx_rate_limiter
            } else {
                &mut iface.tx_rate_limiter
            };
            let (limits, [bandwidth, ops]) = current.unwrap_or_default().patched(update);
            let changed = net.handle.with(|n| {
                if rx {
                    n.update_rx_rate_limiter(bandwidth, ops)
                } else {
                    n.update_tx_rate_limiter(bandwidth, ops)
                }
            });
            if !changed {
                return Err(ApiFault::internal(format!(
                    "interface {id:?} was built without rate limiters"
                )));
            }
            let limits = Some(limits).filter(|l| l.bandwidth.is_some() || l.ops.is_some());
            *current = limits;
            if rx {
                net.config.rx_rate_limiter = limits;
            } else {
                net.config.tx_rate_limiter = limits;
            }
            let dir = if rx { "rx" } else { "tx" };
            log::info!("interface {id}: {dir} rate limits now {limits:?}");
        }
        Ok(())
    }

    /// `PATCH /balloon`: the new target is told to the guest (config change interrupt).
    fn change_balloon_target(&mut self, vmm: &mut Vmm, amount_mib: u32) -> Result<(), ApiFault> {
        let memory_mib = self.config.machine_config.mem_size_mib;
        let b = vmm.devices.balloon_mut().ok_or_else(no_balloon)?;
        if u64::from(amount_mib) > memory_mib {
            return Err(ApiFault::bad_request(format!(
                "amount_mib: {amount_mib} MiB is more than the guest's {memory_mib} MiB of memory"
            )));
        }
        b.handle.change_config(|d| {
            d.set_target(mib_to_pages(amount_mib));
            Ok::<_, ApiFault>(())
        })?;
        b.config.amount_mib = amount_mib;
        if let Some(c) = self.config.balloon.as_mut() {
            c.amount_mib = amount_mib;
        }
        log::info!("balloon: target now {amount_mib} MiB");
        Ok(())
    }

    /// `GET /balloon/statistics`: Firecracker's `BalloonStats`.
    fn balloon_stats(&self, vmm: &mut Vmm) -> Result<serde_json::Value, ApiFault> {
        let b = vmm.devices.balloon_mut().ok_or_else(no_balloon)?;
        if b.config.stats_polling_interval_s == 0 {
            return Err(ApiFault::bad_request(
                "the balloon's statistics are off: give stats_polling_interval_s (seconds) in PUT /balloon before boot",
            ));
        }
        let (target, actual) = b.handle.with(|d| (d.target_pages(), d.actual_pages()));
        let mut out = serde_json::json!({
            "target_pages": target,
            "actual_pages": actual,
            "target_mib": target / 256,
            "actual_mib": actual / 256,
        });
        let stats = b
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (tag, name) in STAT_NAMES {
            if let Some(v) = stats.values.get(&tag) {
                out[name] = (*v).into();
            }
        }
        Ok(out)
    }

    /// The VM's MMDS store, locked (the guest's answers wait for this request).
    fn mmds(vmm: &Vmm) -> Result<std::sync::MutexGuard<'_, wisp_devices::mmds::Mmds>, ApiFault> {
        let store = vmm
            .devices
            .mmds()
            .ok_or_else(|| ApiFault::internal("the VM has no MMDS store"))?;
        Ok(store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Answers an API request once the VM has started.
    pub fn handle(&mut self, vmm: &mut Vmm, req: ApiRequest) -> ApiResponse {
        match req {
            ApiRequest::GetInstanceInfo => Ok(Some(
                serde_json::to_value(InstanceInfo::new(&self.id, vmm.state()))
                    .map_err(|e| ApiFault::internal(e.to_string()))?,
            )),
            ApiRequest::GetVmConfig => Ok(Some(self.config.to_json())),
            ApiRequest::GetMachineConfig => Ok(Some(
                serde_json::to_value(&self.config.machine_config)
                    .map_err(|e| ApiFault::internal(e.to_string()))?,
            )),
            ApiRequest::GetVmMetrics => Ok(Some(vmm.metrics())),
            ApiRequest::CreateSnapshot(c) => {
                use crate::snapshot::persist::CreateError;
                let started = std::time::Instant::now();
                vmm.snapshot(&c.snapshot_path, &c.mem_file_path)
                    .map_err(|e| match e {
                        CreateError::Vcpus(_) => ApiFault::internal(e.to_string()),
                        _ => ApiFault::bad_request(e.to_string()),
                    })?;
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                crate::metrics::set("latencies_us", "full_create_snapshot", us);
                log::info!(
                    "snapshot written: {} and {} in {} ms",
                    c.snapshot_path.display(),
                    c.mem_file_path.display(),
                    us / 1000
                );
                Ok(None)
            }
            ApiRequest::PatchVm(state) => {
                let started = std::time::Instant::now();
                let paused = state == VmState::Paused;
                vmm.set_paused(paused).map_err(|e| match e {
                    PauseError::VcpuExited { .. } => {
                        ApiFault::bad_request(format!("cannot pause: {e}"))
                    }
                    _ => ApiFault::internal(format!("cannot pause: {e}")),
                })?;
                // Firecracker's pause/resume latencies (the whole request here is the VMM's).
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                let what = if paused { "pause_vm" } else { "resume_vm" };
                crate::metrics::set("latencies_us", what, us);
                crate::metrics::set("latencies_us", &format!("vmm_{what}"), us);
                Ok(None)
            }
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                vmm.i8042
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .send_ctrl_alt_del();
                Ok(None)
            }
            ApiRequest::Action(ActionType::FlushMetrics) => {
                crate::metrics::write().map_err(|e| ApiFault::bad_request(e.to_string()))?;
                Ok(None)
            }
            ApiRequest::PatchCgroup(update) => {
                let cg = vmm.cgroup.as_ref().ok_or_else(|| {
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
                // An unknown drive is refused before anything changes; the medium goes
                // first, as only it can fail.
                self.config.drive_mut(&update.drive_id)?;
                self.change_drive_medium(vmm, &update)?;
                if let Some(limits) = &update.rate_limiter {
                    self.change_drive_limits(vmm, &update.drive_id, limits)?;
                }
                Ok(None)
            }
            ApiRequest::PatchNetworkInterface(update) => {
                self.change_net_limits(vmm, &update)?;
                Ok(None)
            }
            ApiRequest::GetBalloon => {
                let b = vmm.devices.balloon_mut().ok_or_else(no_balloon)?;
                Ok(serde_json::to_value(b.config).ok())
            }
            ApiRequest::PatchBalloon(u) => {
                self.change_balloon_target(vmm, u.amount_mib)?;
                Ok(None)
            }
            ApiRequest::GetBalloonStats => Ok(Some(self.balloon_stats(vmm)?)),
            ApiRequest::PatchBalloonStats(u) => {
                let b = vmm.devices.balloon_mut().ok_or_else(no_balloon)?;
                let seconds = u.stats_polling_interval_s;
                b.handle
                    .with(|d| d.set_stats_interval(seconds))
                    .map_err(|e| ApiFault::bad_request(format!("stats_polling_interval_s: {e}")))?;
                b.config.stats_polling_interval_s = seconds;
                if let Some(c) = self.config.balloon.as_mut() {
                    c.stats_polling_interval_s = seconds;
                }
                Ok(None)
            }
            ApiRequest::GetMmds => Ok(Some(Self::mmds(vmm)?.data())),
            ApiRequest::PutMmds(data) => {
                Self::mmds(vmm)?
                    .put(data)
                    .map_err(|e| ApiFault::bad_request(e.to_string()))?;
                Ok(None)
            }
            ApiRequest::PatchMmds(patch) => {
                Self::mmds(vmm)?
                    .patch(&patch)
                    .map_err(|e| ApiFault::bad_request(e.to_string()))?;
                Ok(None)
            }
            other => Err(ApiFault::wrong_state(&other, true)),
        }
    }
}

/// The answer to a balloon request for a VM without one.
pub fn no_balloon() -> ApiFault {
    ApiFault::bad_request("the VM has no balloon device (PUT /balloon before boot)")
}

/// Whether two paths name the same file (both exist and have the same device and inode).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
