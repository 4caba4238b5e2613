//! The Firecracker-style process model: `wisp --api-sock PATH` starts with no VM and waits
//! for API calls; `wisp --config-file vm.json --no-api` boots from a file. Before
//! InstanceStart the main thread collects the configuration here; after it, the VM's event
//! loop (vmm.rs) serves the API.

use crate::api::{
    self, ActionType, Allowed, ApiFault, ApiRequest, FirecrackerConfig, InstanceInfo,
    InstanceState, PendingConfig,
};
use crate::vmm::{self, ApiContext, Vmm};
use crate::vstate::exit::VmExit;
use std::os::fd::AsRawFd;
use std::path::Path;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Firecracker's id when none is given.
pub const DEFAULT_ID: &str = "anonymous-instance";

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    Api(#[from] api::ApiError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

fn fault(f: ApiFault) -> ControlError {
    ControlError::Config(f.fault_message)
}

/// Builds the VM the pending configuration describes.
fn build(pending: &PendingConfig, id: &str) -> Result<(Vmm, ApiContextParts), ApiFault> {
    let mut config = pending.to_vm_config()?;
    config.id = Some(id.to_string());
    config.nets = pending
        .network_interfaces
        .iter()
        .map(|n| crate::config::NetConfig {
            tap: n.host_dev_name.clone(),
            mac: n.guest_mac.as_ref().map(|m| m.to_string()),
            // validate() kept it in u16 range.
            mtu: n.mtu.and_then(|m| u16::try_from(m).ok()),
            offload: n.offload.unwrap_or(true),
        })
        .collect();
    config
        .validate()
        .map_err(|e| ApiFault::bad_request(e.to_string()))?;
    let vmm = Vmm::build(&config).map_err(|e| ApiFault::bad_request(e.to_string()))?;
    Ok((
        vmm,
        ApiContextParts {
            vm_config: pending.to_json(),
            metrics_path: pending.metrics.as_ref().map(|m| m.metrics_path.clone()),
        },
    ))
}

struct ApiContextParts {
    vm_config: serde_json::Value,
    metrics_path: Option<std::path::PathBuf>,
}

/// `wisp --config-file F --no-api`.
pub fn run_config_file(path: &Path, id: Option<&str>) -> Result<VmExit, ControlError> {
    let file = FirecrackerConfig::from_file(path).map_err(fault)?;
    let pending = PendingConfig::from_firecracker_config(&file).map_err(fault)?;
    let (vmm, _) = build(&pending, id.unwrap_or(DEFAULT_ID)).map_err(fault)?;
    Ok(vmm.run(None)?)
}

/// `wisp --api-sock PATH [--config-file F]`: serves the API until the VM ends (or a signal
/// stops wisp before it started).
pub fn serve(
    socket: &Path,
    id: Option<&str>,
    config_file: Option<&Path>,
) -> Result<VmExit, ControlError> {
    let id = id.unwrap_or(DEFAULT_ID).to_string();
    let mut pending = match config_file {
        Some(path) => {
            let file = FirecrackerConfig::from_file(path).map_err(fault)?;
            PendingConfig::from_firecracker_config(&file).map_err(fault)?
        }
        None => PendingConfig::new(),
    };
    let channel = api::start(socket)?;
    // With a config file, the VM starts at once (as Firecracker does).
    if config_file.is_some() {
        let (vmm, parts) = build(&pending, &id).map_err(fault)?;
        return run(vmm, channel, id, parts);
    }

    let io = |what| move |source| ControlError::Io { what, source };
    let signals = crate::signals::block_stop_signals().map_err(io("signalfd"))?;
    let epoll = Epoll::new().map_err(io("epoll"))?;
    for (fd, token) in [(channel.event_fd(), 0u64), (signals.as_raw_fd(), 1)] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(io("epoll"))?;
    }
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ControlError::Io {
                    what: "epoll",
                    source: e,
                })
            }
        };
        for ev in &events[..n] {
            if ev.data() == 1 {
                if let Some(sig) = crate::signals::read_signal(&signals) {
                    if sig != libc::SIGUSR1 {
                        return Ok(VmExit::Signal(sig));
                    }
                }
                continue;
            }
            while let Some((req, responder)) = channel.try_recv() {
                match req {
                    ApiRequest::GetInstanceInfo => {
                        let info = InstanceInfo::new(&id, InstanceState::NotStarted);
                        responder.respond(Ok(serde_json::to_value(info).ok()));
                    }
                    ApiRequest::GetVmConfig => responder.respond(Ok(Some(pending.to_json()))),
                    ApiRequest::GetMachineConfig => {
                        responder.respond(Ok(serde_json::to_value(&pending.machine_config).ok()))
                    }
                    ApiRequest::Action(ActionType::InstanceStart) => match build(&pending, &id) {
                        Ok((vmm, parts)) => {
                            responder.respond(Ok(None));
                            // Requests queued behind InstanceStart are served by the VM's loop.
                            return run(vmm, channel, id, parts);
                        }
                        Err(f) => responder.respond(Err(f)),
                    },
                    ApiRequest::Action(ActionType::FlushMetrics) => {
                        responder.respond(Err(ApiFault::bad_request(
                            "the VM has not started: there are no metrics to flush yet",
                        )))
                    }
                    req if req.allowed() == Allowed::PostBoot => {
                        responder.respond(Err(ApiFault::wrong_state(&req, false)))
                    }
                    req => responder.respond(pending.apply(&req).map(|()| None)),
                }
            }
        }
    }
}

fn run(
    vmm: Vmm,
    channel: api::ApiChannel,
    id: String,
    parts: ApiContextParts,
) -> Result<VmExit, ControlError> {
    let ctx = ApiContext {
        channel,
        id,
        vm_config: parts.vm_config,
        metrics_path: parts.metrics_path,
    };
    Ok(vmm.run(Some(ctx))?)
}
