//! The configuration collected before boot (API calls or a Firecracker config file), and its
//! conversion into wisp's [`VmConfig`].

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::requests::{
    ApiRequest, BootSource, Drive, EntropyDevice, LoggerConfig, MachineConfig, MetricsConfig,
    MmdsConfig, NetworkInterface, SerialConfig, VsockDevice,
};
use super::ApiFault;
use crate::cgroup::CgroupSpec;
use crate::config::cmdline::with_kernel_args;
use crate::config::{io_reason, BalloonConfig, MemSize, VmConfig, DEFAULT_CMDLINE};

/// Firecracker's `--config-file` format: the bodies of the pre-boot PUT requests under one
/// object. Sections wisp does not implement are accepted only when absent or `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerConfig {
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<Drive>,
    #[serde(
        rename = "network-interfaces",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockDevice>,
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<MmdsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<Value>,
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<Value>,
    /// Accepted when absent, null or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmem: Option<Value>,
}

impl FirecrackerConfig {
    /// Parses the file's JSON; the fault names the field that is wrong.
    pub fn from_json(text: &str) -> Result<Self, ApiFault> {
        super::parse_body(text.as_bytes())
    }

    pub fn from_file(path: &Path) -> Result<Self, ApiFault> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ApiFault::bad_request(format!("config file {}: {}", path.display(), io_reason(&e)))
        })?;
        Self::from_json(&text).map_err(|f| {
            ApiFault::bad_request(format!(
                "config file {}: {}",
                path.display(),
                f.fault_message
            ))
        })
    }
}

/// What the pre-boot requests have configured so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PendingConfig {
    pub boot_source: Option<BootSource>,
    pub machine_config: MachineConfig,
    /// In the order they were first PUT; the root device becomes vda.
    pub drives: Vec<Drive>,
    pub network_interfaces: Vec<NetworkInterface>,
    pub logger: Option<LoggerConfig>,
    pub metrics: Option<MetricsConfig>,
    /// `PUT /serial`.
    pub serial: Option<SerialConfig>,
    /// `PUT /entropy`: the VM gets a virtio-rng device.
    pub entropy: Option<EntropyDevice>,
    /// `PUT /vsock`.
    pub vsock: Option<VsockDevice>,
    /// `PUT /balloon`: the VM gets a virtio-balloon device.
    pub balloon: Option<BalloonConfig>,
    /// `PUT /mmds/config`: the interfaces that serve the metadata service.
    pub mmds: Option<MmdsConfig>,
    /// `PUT /mmds` and `PATCH /mmds` before boot (or `--metadata`).
    pub mmds_data: Option<Value>,
    /// `--mmds-size-limit` (Firecracker's default when not given).
    pub mmds_size_limit: Option<usize>,
}

impl PendingConfig {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies the sections of a config file, with the same checks as the API requests.
    pub fn from_firecracker_config(file: &FirecrackerConfig) -> Result<Self, ApiFault> {
        for (name, v) in [
            ("cpu-config", &file.cpu_config),
            ("memory-hotplug", &file.memory_hotplug),
        ] {
            if v.is_some() {
                return Err(ApiFault::bad_request(format!(
                    "{name}: not supported by wisp; leave it out or set it to null"
                )));
            }
        }
        if file
            .pmem
            .as_ref()
            .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiFault::bad_request(
                "pmem: not supported by wisp; leave it out or make it empty",
            ));
        }
        let mut p = Self::new();
        p.apply(&ApiRequest::PutBootSource(file.boot_source.clone()))?;
        if let Some(m) = &file.machine_config {
            p.apply(&ApiRequest::PutMachineConfig(m.clone()))?;
        }
        for d in &file.drives {
            p.apply(&ApiRequest::PutDrive(d.clone()))?;
        }
        for n in &file.network_interfaces {
            p.apply(&ApiRequest::PutNetworkInterface(n.clone()))?;
        }
        if let Some(m) = &file.mmds_config {
            super::requests::check_mmds_config(m)
                .map_err(|f| ApiFault::bad_request(format!("mmds-config: {}", f.fault_message)))?;
            p.apply(&ApiRequest::PutMmdsConfig(m.clone()))
                .map_err(|f| ApiFault::bad_request(format!("mmds-config: {}", f.fault_message)))?;
        }
        if let Some(l) = &file.logger {
            p.apply(&ApiRequest::PutLogger(l.clone()))?;
        }
        if let Some(m) = &file.metrics {
            p.apply(&ApiRequest::PutMetrics(m.clone()))?;
        }
        if let Some(v) = &file.vsock {
            p.apply(&ApiRequest::PutVsock(v.clone()))?;
        }
        if let Some(e) = &file.entropy {
            p.apply(&ApiRequest::PutEntropy(e.clone()))?;
        }
        if let Some(b) = &file.balloon {
            p.apply(&ApiRequest::PutBalloon(*b))?;
        }
        Ok(p)
    }

    /// Records one pre-boot configuration request. Files named in it must exist and be
    /// readable now (Firecracker opens them at PUT time too). Any other request is refused:
    /// lifecycle requests are the caller's (InstanceStart, GETs, ...).
    pub fn apply(&mut self, req: &ApiRequest) -> Result<(), ApiFault> {
        match req {
            ApiRequest::PutBootSource(b) => {
                b.validate()?;
                check_readable("kernel_image_path", &b.kernel_image_path, false)?;
                if let Some(i) = &b.initrd_path {
                    check_readable("initrd_path", i, false)?;
                }
                self.boot_source = Some(b.clone());
            }
            ApiRequest::PutMachineConfig(m) => {
                m.validate()?;
                check_cgroup(m)?;
                self.machine_config = m.clone();
            }
            ApiRequest::PatchMachineConfig(u) => {
                u.validate()?;
                let m = self.machine_config.patched(u)?;
                check_cgroup(&m)?;
                self.machine_config = m;
            }
            ApiRequest::PutDrive(d) => {
                d.validate()?;
                check_readable("path_on_host", &d.path_on_host, true)?;
                if d.is_root_device {
                    if let Some(other) = self
                        .drives
                        .iter()
                        .find(|o| o.is_root_device && o.drive_id != d.drive_id)
                    {
                        return Err(ApiFault::bad_request(format!(
                            "is_root_device: drive {:?} is already the root device",
                            other.drive_id
                        )));
                    }
                }
                if let Some(other) = self
                    .drives
                    .iter()
                    .find(|o| o.path_on_host == d.path_on_host && o.drive_id != d.drive_id)
                {
                    return Err(ApiFault::bad_request(format!(
                        "path_on_host: {} is already drive {:?}",
                        d.path_on_host.display(),
                        other.drive_id
                    )));
                }
                match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                    Some(slot) => *slot = d.clone(),
                    None => {
                        if self.device_count() >= crate::config::MAX_VIRTIO_DEVICES {
                            return Err(too_many_devices());
                        }
                        self.drives.push(d.clone())
                    }
                }
            }
            ApiRequest::PatchDrive(u) => {
                u.validate()?;
                if let Some(p) = &u.path_on_host {
                    check_readable("path_on_host", p, true)?;
                }
                let slot = self
                    .drives
                    .iter_mut()
                    .find(|o| o.drive_id == u.drive_id)
                    .ok_or_else(|| {
                        ApiFault::bad_request(format!(
                            "drive_id: no drive {:?}; PUT /drives/{} first",
                            u.drive_id, u.drive_id
                        ))
                    })?;
                if let Some(p) = &u.path_on_host {
                    slot.path_on_host = p.clone();
                }
            }
            ApiRequest::PutNetworkInterface(n) => {
                n.validate()?;
                if let Some(other) = self
                    .network_interfaces
                    .iter()
                    .find(|o| o.iface_id != n.iface_id && o.host_dev_name == n.host_dev_name)
                {
                    return Err(ApiFault::bad_request(format!(
                        "host_dev_name: {:?} is already used by interface {:?}",
                        n.host_dev_name, other.iface_id
                    )));
                }
                if let Some(mac) = n.guest_mac {
                    if let Some(other) = self
                        .network_interfaces
                        .iter()
                        .find(|o| o.iface_id != n.iface_id && o.guest_mac == Some(mac))
                    {
                        return Err(ApiFault::bad_request(format!(
                            "guest_mac: {mac} is already used by interface {:?}",
                            other.iface_id
                        )));
                    }
                }
                match self
                    .network_interfaces
                    .iter_mut()
                    .find(|o| o.iface_id == n.iface_id)
                {
                    Some(slot) => *slot = n.clone(),
                    None => {
                        if self.device_count() >= crate::config::MAX_VIRTIO_DEVICES {
                            return Err(too_many_devices());
                        }
                        self.network_interfaces.push(n.clone())
                    }
                }
            }
            ApiRequest::PutLogger(l) => {
                l.validate()?;
                // Applied at once (as Firecracker does): the lines about building and
                // starting the VM go where the agent asked.
                crate::logger::configure(&l.to_settings())
                    .map_err(|e| ApiFault::bad_request(e.to_string()))?;
                self.logger = Some(l.clone());
            }
            ApiRequest::PutMetrics(m) => {
                m.validate()?;
                // Opened at once, as Firecracker does: a bad path is this request's error.
                crate::metrics::configure(&m.metrics_path)
                    .map_err(|e| ApiFault::bad_request(e.to_string()))?;
                self.metrics = Some(m.clone());
            }
            ApiRequest::PutSerial(c) => {
                c.validate()?;
                self.serial = Some(c.clone());
            }
            ApiRequest::PutVsock(v) => {
                v.validate()?;
                if self.vsock.is_none() && self.device_count() >= crate::config::MAX_VIRTIO_DEVICES
                {
                    return Err(too_many_devices());
                }
                self.vsock = Some(v.clone());
            }
            ApiRequest::PutEntropy(e) => {
                e.validate()?;
                if self.entropy.is_none()
                    && self.device_count() >= crate::config::MAX_VIRTIO_DEVICES
                {
                    return Err(too_many_devices());
                }
                self.entropy = Some(e.clone());
            }
            ApiRequest::PutBalloon(b) => {
                b.validate().map_err(ApiFault::bad_request)?;
                if self.balloon.is_none()
                    && self.device_count() >= crate::config::MAX_VIRTIO_DEVICES
                {
                    return Err(too_many_devices());
                }
                // Against the memory configured so far; InstanceStart checks again.
                let m = &self.machine_config;
                b.validate_for(m.mem_size_mib, m.huge_pages_2m())
                    .map_err(ApiFault::bad_request)?;
                self.balloon = Some(*b);
            }
            ApiRequest::PutMmdsConfig(m) => {
                super::requests::check_mmds_config(m)?;
                m.check_interfaces(self.network_interfaces.iter().map(|n| n.iface_id.as_str()))
                    .map_err(ApiFault::bad_request)?;
                self.mmds = Some(m.clone());
            }
            ApiRequest::PutMmds(data) => {
                self.check_mmds_size(data)?;
                self.mmds_data = Some(data.clone());
            }
            ApiRequest::PatchMmds(patch) => {
                let mut data = self.mmds_data.clone().ok_or_else(|| {
                    ApiFault::bad_request(
                        wisp_devices::mmds::StoreError::NotInitialized.to_string(),
                    )
                })?;
                wisp_devices::mmds::merge_patch(&mut data, patch);
                self.check_mmds_size(&data)?;
                self.mmds_data = Some(data);
            }
            other => {
                return Err(ApiFault::bad_request(format!(
                    "{} is not a configuration request",
                    other.describe()
                )))
            }
        }
        Ok(())
    }

    /// The MMDS document's size limit.
    pub fn mmds_size_limit(&self) -> usize {
        self.mmds_size_limit
            .unwrap_or(crate::config::DEFAULT_MMDS_SIZE_LIMIT)
    }

    fn check_mmds_size(&self, data: &Value) -> Result<(), ApiFault> {
        let size = serde_json::to_vec(data).map_or(usize::MAX, |v| v.len());
        let limit = self.mmds_size_limit();
        if size > limit {
            return Err(ApiFault::bad_request(
                wisp_devices::mmds::StoreError::TooLarge { size, limit }.to_string(),
            ));
        }
        Ok(())
    }

    fn device_count(&self) -> usize {
        self.drives.len()
            + self.network_interfaces.len()
            + usize::from(self.entropy.is_some())
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
    }

    /// The vCPU cgroup settings, if any.
    pub fn cgroup(&self) -> Option<CgroupSpec> {
        self.machine_config.cgroup.as_ref().map(|c| c.to_spec())
    }

    /// The drives in device order: the root device first (vda), then the others as PUT.
    pub fn drives_in_order(&self) -> Vec<&Drive> {
        let mut v: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        v.extend(self.drives.iter().filter(|d| !d.is_root_device));
        v
    }

    /// The kernel command line: `boot_args` (or wisp's default) plus, with a root device,
    /// Firecracker's `root=/dev/vda` or `root=PARTUUID=...` and `ro`/`rw` (before any `--`).
    pub fn cmdline(&self) -> String {
        let cmdline = self
            .boot_source
            .as_ref()
            .and_then(|b| b.boot_args.as_deref())
            .unwrap_or(DEFAULT_CMDLINE);
        let Some(root) = self.drives.iter().find(|d| d.is_root_device) else {
            return cmdline.to_string();
        };
        let dev = match &root.partuuid {
            Some(u) => format!("PARTUUID={u}"),
            None => "/dev/vda".to_string(),
        };
        let mode = if root.is_read_only { "ro" } else { "rw" };
        with_kernel_args(cmdline, &[&format!("root={dev} {mode}")])
    }

    /// The one `VmConfig` this configuration describes, validated (its `id` is left for the
    /// caller, from `--id`). Logger and metrics are not VM state: take them from `logger`
    /// and `metrics`.
    pub fn to_vm_config(&self) -> Result<VmConfig, ApiFault> {
        let boot = self.boot_source.as_ref().ok_or_else(|| {
            ApiFault::bad_request(
                "no boot source configured: PUT /boot-source with kernel_image_path first",
            )
        })?;
        let m = &self.machine_config;
        let mut config = VmConfig::new(boot.kernel_image_path.clone());
        config.initrd = boot.initrd_path.clone();
        config.cmdline = self.cmdline();
        config.cpus = u8::try_from(m.vcpu_count).map_err(|_| {
            ApiFault::bad_request(format!("vcpu_count: {} is too large", m.vcpu_count))
        })?;
        config.memory = MemSize(m.mem_size_mib << 20);
        config.disks = self
            .drives_in_order()
            .into_iter()
            .map(Drive::disk_config)
            .collect();
        config.nets = self
            .network_interfaces
            .iter()
            .map(|n| crate::config::NetConfig {
                id: Some(n.iface_id.clone()),
                tap: n.host_dev_name.clone(),
                mac: n.guest_mac,
                // NetworkInterface::validate kept it in u16 range.
                mtu: n.mtu.and_then(|m| u16::try_from(m).ok()),
                offload: n.offload.unwrap_or(true),
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
            })
            .collect();
        config.cgroup = self.cgroup();
        // Only when asked for, as Firecracker (`wisp run` has it on by default).
        config.entropy = self.entropy.is_some();
        config.entropy_rate_limiter = self.entropy.as_ref().and_then(|e| e.rate_limiter);
        config.vsock = self.vsock.as_ref().map(VsockDevice::to_config);
        config.balloon = self.balloon;
        config.mmds = self.mmds.clone();
        config.mmds_data = self.mmds_data.clone();
        config.mmds_size_limit = self.mmds_size_limit();
        config.huge_pages = m.huge_pages_2m();
        config.smt = m.smt;
        if let Some(path) = self.serial.as_ref().and_then(|s| s.serial_out_path.clone()) {
            config.console = crate::config::ConsoleConfig::File(path);
        }
        config
            .validate()
            .map_err(|e| ApiFault::bad_request(e.to_string()))?;
        Ok(config)
    }

    /// The API's view of a VM built from `config` (a restored snapshot's): what
    /// `GET /vm/config` shows and what `PATCH /drives` and `PATCH /network-interfaces` find.
    pub fn from_vm_config(config: &VmConfig) -> Self {
        let drives = config
            .disks
            .iter()
            .map(|d| {
                let id = d.id.clone().unwrap_or_else(|| d.path.display().to_string());
                serde_json::from_value(serde_json::json!({
                    "drive_id": id,
                    "path_on_host": d.path,
                    "is_root_device": false,
                    "is_read_only": d.readonly,
                    "format": d.format,
                    "rate_limiter": d.rate_limiter,
                    "serial": d.serial,
                    "backing_files": d.backing_files,
                    "backing_dir": d.backing_dir,
                    "backing_devices": d.backing_devices,
                }))
                .expect("a DiskConfig is a valid Drive")
            })
            .collect();
        let network_interfaces = config
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| NetworkInterface {
                iface_id: n.id.clone().unwrap_or_else(|| format!("eth{i}")),
                host_dev_name: n.tap.clone(),
                guest_mac: n.mac,
                mtu: n.mtu.map(u32::from),
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
                offload: Some(n.offload),
            })
            .collect();
        Self {
            boot_source: Some(BootSource {
                kernel_image_path: config.kernel.clone(),
                initrd_path: config.initrd.clone(),
                boot_args: Some(config.cmdline.clone()),
            }),
            machine_config: MachineConfig {
                vcpu_count: config.cpus.into(),
                mem_size_mib: config.memory.0 >> 20,
                smt: config.smt,
                ..MachineConfig::default()
            },
            drives,
            network_interfaces,
            entropy: config.entropy.then_some(EntropyDevice {
                rate_limiter: config.entropy_rate_limiter,
            }),
            ..Self::default()
        }
    }

    /// The drive whose id is `drive_id`.
    pub fn drive_mut(&mut self, drive_id: &str) -> Result<&mut Drive, ApiFault> {
        self.drives
            .iter_mut()
            .find(|d| d.drive_id == drive_id)
            .ok_or_else(|| {
                ApiFault::bad_request(format!(
                    "drive_id: the VM has no drive {drive_id:?} (drives are added with PUT /drives before boot)"
                ))
            })
    }

    /// `GET /vm/config`: Firecracker's full configuration object.
    pub fn to_json(&self) -> Value {
        json!({
            "boot-source": self.boot_source,
            "machine-config": self.machine_config,
            "drives": self.drives,
            "network-interfaces": self.network_interfaces,
            "logger": self.logger,
            "metrics": self.metrics,
            "balloon": self.balloon,
            "vsock": self.vsock,
            "mmds-config": self.mmds,
            "entropy": self.entropy,
            "cpu-config": null,
            "memory-hotplug": null,
            "pmem": [],
        })
    }
}

fn too_many_devices() -> ApiFault {
    ApiFault::bad_request(format!(
        "at most {} virtio devices (drives, network interfaces, the vsock, the entropy device and the balloon together) fit the platform",
        crate::config::MAX_VIRTIO_DEVICES
    ))
}

/// Opens the file once to check it (never blocking on a named pipe, which would hold up
/// every other request): a regular file, or for a drive also a block device.
fn check_readable(field: &str, path: &Path, block_devices: bool) -> Result<(), ApiFault> {
    crate::config::open_host_file(path, block_devices).map_err(|reason| {
        ApiFault::bad_request(format!("{field}: {}: {reason}", path.display()))
    })?;
    Ok(())
}

fn check_cgroup(m: &MachineConfig) -> Result<(), ApiFault> {
    if let Some(c) = &m.cgroup {
        if crate::jail::inside() {
            return Err(ApiFault::bad_request(format!(
                "cgroup: {}",
                crate::jail::VCPU_CGROUP_REFUSED
            )));
        }
        c.to_spec()
            .validate()
            .map_err(|e| ApiFault::bad_request(format!("cgroup: {e}")))?;
    }
    Ok(())
}
