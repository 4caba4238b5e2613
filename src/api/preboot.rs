//! The pre-boot API controller (Firecracker's `PrebootApiController`): before InstanceStart,
//! requests build up a [`PendingConfig`]; InstanceStart turns it into a VM.

use crate::api::requests::SnapshotLoad;
use crate::api::{
    ActionType, Allowed, ApiFault, ApiRequest, ApiResponse, FirecrackerConfig, InstanceInfo,
    InstanceState, PendingConfig, RuntimeApiController,
};
use crate::vmm::Vmm;
use std::path::Path;

/// Firecracker's id when none is given.
pub const DEFAULT_ID: &str = "anonymous-instance";

/// The configuration of a VM that has not started, and the requests that change it.
pub struct PrebootApiController {
    id: String,
    pending: PendingConfig,
}

/// What became of a pre-boot request.
pub enum Preboot {
    /// Answer the client; the VM has not started.
    Answer(ApiResponse),
    /// InstanceStart built the VM: answer 204 and run it.
    Start(Box<(Vmm, RuntimeApiController)>),
}

impl PrebootApiController {
    /// An empty configuration, or the one of a Firecracker config file (`--config-file`).
    pub fn new(id: Option<&str>, config_file: Option<&Path>) -> Result<Self, ApiFault> {
        let pending = match config_file {
            Some(path) => {
                PendingConfig::from_firecracker_config(&FirecrackerConfig::from_file(path)?)?
            }
            None => PendingConfig::new(),
        };
        Ok(Self {
            id: id.unwrap_or(DEFAULT_ID).to_string(),
            pending,
        })
    }

    /// `--mmds-size-limit` and `--metadata`: the MMDS document's limit and its first
    /// contents (after the config file, as Firecracker).
    pub fn seed_mmds(
        &mut self,
        size_limit: Option<usize>,
        data: Option<serde_json::Value>,
    ) -> Result<(), ApiFault> {
        if size_limit.is_some() {
            self.pending.mmds_size_limit = size_limit;
        }
        if let Some(data) = data {
            self.pending.apply(&ApiRequest::PutMmds(data))?;
        }
        Ok(())
    }

    /// Builds the VM the configuration describes, and the controller that serves it.
    pub fn build(&self) -> Result<(Vmm, RuntimeApiController), ApiFault> {
        let mut config = self.pending.to_vm_config()?;
        config.id = Some(self.id.clone());
        let vmm =
            crate::builder::build(&config).map_err(|e| ApiFault::bad_request(e.to_string()))?;
        let runtime = RuntimeApiController::new(self.id.clone(), self.pending.clone());
        Ok((vmm, runtime))
    }

    /// `PUT /snapshot/load`: the VM a snapshot describes, restored (and running if
    /// `resume_vm`), and the controller that serves it. Only into a VM not configured yet
    /// (as Firecracker: logger, metrics and serial may be set before).
    pub fn load(&self, load: &SnapshotLoad) -> Result<(Vmm, RuntimeApiController), ApiFault> {
        let p = &self.pending;
        if p.boot_source.is_some()
            || !p.drives.is_empty()
            || !p.network_interfaces.is_empty()
            || p.vsock.is_some()
            || p.balloon.is_some()
            || p.entropy.is_some()
        {
            return Err(ApiFault::bad_request(
                "PUT /snapshot/load: a snapshot is loaded into an unconfigured VM; this one \
                 already has a boot source or devices",
            ));
        }
        let mem = load.mem_path()?;
        let mut snapshot = crate::snapshot::Snapshot::read_file(&load.snapshot_path)
            .map_err(|e| ApiFault::bad_request(e.to_string()))?;
        let config = &mut snapshot.config;
        for o in &load.network_overrides {
            let net = config
                .nets
                .iter_mut()
                .find(|n| n.id.as_deref() == Some(o.iface_id.as_str()))
                .ok_or_else(|| {
                    ApiFault::bad_request(format!(
                        "network_overrides: the snapshot has no interface {:?}",
                        o.iface_id
                    ))
                })?;
            net.tap = o.host_dev_name.clone();
        }
        for net in &config.nets {
            net.validate()
                .map_err(|e| ApiFault::bad_request(e.to_string()))?;
        }
        config.id = Some(self.id.clone());
        config.console = match p.serial.as_ref().and_then(|s| s.serial_out_path.clone()) {
            Some(path) => crate::config::ConsoleConfig::File(path),
            None => crate::config::ConsoleConfig::Stdio,
        };
        let vmm = crate::builder::restore(&snapshot, mem, load.resume_vm)
            .map_err(|e| ApiFault::bad_request(format!("cannot load the snapshot: {e}")))?;
        let runtime = RuntimeApiController::new(
            self.id.clone(),
            PendingConfig::from_vm_config(&snapshot.config),
        );
        Ok((vmm, runtime))
    }

    pub fn handle(&mut self, req: ApiRequest) -> Preboot {
        Preboot::Answer(match req {
            ApiRequest::GetInstanceInfo => {
                let info = InstanceInfo::new(&self.id, InstanceState::NotStarted);
                Ok(serde_json::to_value(info).ok())
            }
            ApiRequest::GetVmConfig => Ok(Some(self.pending.to_json())),
            ApiRequest::GetBalloon => match &self.pending.balloon {
                Some(b) => Ok(serde_json::to_value(b).ok()),
                None => Err(crate::api::runtime::no_balloon()),
            },
            ApiRequest::GetMmds => Ok(Some(
                self.pending
                    .mmds_data
                    .clone()
                    .unwrap_or_else(|| serde_json::json!({})),
            )),
            ApiRequest::GetMachineConfig => {
                Ok(serde_json::to_value(&self.pending.machine_config).ok())
            }
            ApiRequest::Action(ActionType::InstanceStart) => match self.build() {
                Ok(started) => return Preboot::Start(Box::new(started)),
                Err(f) => Err(f),
            },
            ApiRequest::LoadSnapshot(load) => match self.load(&load) {
                Ok(started) => return Preboot::Start(Box::new(started)),
                Err(f) => Err(f),
            },
            // As Firecracker: a line before boot too (API counts, start-up times); without a
            // destination there is nothing to do.
            ApiRequest::Action(ActionType::FlushMetrics) => crate::metrics::write()
                .map(|_| None)
                .map_err(|e| ApiFault::bad_request(e.to_string())),
            req if req.allowed() == Allowed::PostBoot => Err(ApiFault::wrong_state(&req, false)),
            req => self.pending.apply(&req).map(|()| None),
        })
    }
}
