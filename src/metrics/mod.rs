//! Firecracker's metrics file: one JSON object per line, written on `FlushMetrics`, every
//! 60 seconds once the VM runs, and when wisp exits, to the file or named pipe given by
//! `--metrics-path` or `PUT /metrics`.
//!
//! The object has Firecracker's groups and field names (v1.16: `utc_timestamp_ms`,
//! `api_server`, `block`, `net`, `vcpu`, `vmm`, `uart`, `latencies_us`, `signals`, ..., and
//! `block_<drive_id>` / `net_<iface_id>` per device). As in Firecracker, a counter shows what
//! happened since the previous line and a gauge its current value. What wisp does not count
//! (or has no device for) is 0, so a parser written for Firecracker finds every key; a
//! block device fills its request counts, bytes, flushes, malformed requests, failed
//! requests, queue events and rate limiter counts (not its latencies or update fields), a
//! network device its traffic and rate limiter counts, the balloon its inflate, deflate and
//! statistics counts.

mod fields;

use crate::vstate::control::{ExitKind, VcpuControl};
use fields::{is_gauge, BLOCK_FIELDS, GROUPS, NET_FIELDS};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use wisp_devices::mmds::MmdsCounters;
use wisp_devices::virtio::balloon::BalloonCounters;
use wisp_devices::virtio::block::BlockCounters;
use wisp_devices::virtio::net::NetCounters;
use wisp_devices::virtio::rng::RngCounters;
use wisp_devices::virtio::vsock::VsockCounters;

/// Firecracker's period for writing metrics while the VM runs.
pub const WRITE_PERIOD: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics_path: {}: {reason}", path.display())]
    Open { path: PathBuf, reason: String },
    #[error("cannot write metrics: {0}")]
    Write(#[source] std::io::Error),
}

/// What the running VM exposes to the metrics.
#[derive(Default)]
pub struct VmSources {
    /// Block devices by drive id.
    pub drives: Vec<(String, Arc<BlockCounters>)>,
    /// Network devices by interface id.
    pub nets: Vec<(String, Arc<NetCounters>)>,
    /// The vCPUs' exit counters.
    pub vcpus: Option<Arc<VcpuControl>>,
    /// The entropy device's and the vsock device's counters (Firecracker's `entropy` and
    /// `vsock` groups).
    pub entropy: Option<Arc<RngCounters>>,
    pub vsock: Option<Arc<VsockCounters>>,
    /// The balloon's counters (Firecracker's `balloon` group).
    pub balloon: Option<Arc<BalloonCounters>>,
    /// The metadata service's counters, all interfaces together (Firecracker's `mmds`).
    pub mmds: Option<Arc<MmdsCounters>>,
}

impl VmSources {
    /// The devices of a VM: ids from Firecracker's `GET /vm/config` shape when the VM was
    /// configured through the API (taps are matched to `host_dev_name`), else the tap names.
    /// Disks are listed only when configured through the API, matched by drive id.
    pub fn new(
        vm_config: Option<&Value>,
        blocks: &[(Option<String>, Arc<BlockCounters>)],
        nets: &[(String, Arc<NetCounters>)],
    ) -> Self {
        let list = |key: &str| {
            vm_config
                .and_then(|c| c.get(key))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let drives = list("drives")
            .iter()
            .filter_map(|d| d.get("drive_id").and_then(Value::as_str))
            .filter_map(|id| {
                let (_, counters) = blocks.iter().find(|(b, _)| b.as_deref() == Some(id))?;
                Some((id.to_string(), counters.clone()))
            })
            .collect();
        let ifaces = list("network-interfaces");
        let nets = nets
            .iter()
            .map(|(tap, counters)| {
                let id = ifaces
                    .iter()
                    .find(|n| n.get("host_dev_name").and_then(Value::as_str) == Some(tap))
                    .and_then(|n| n.get("iface_id").and_then(Value::as_str))
                    .unwrap_or(tap);
                (id.to_string(), counters.clone())
            })
            .collect();
        Self {
            drives,
            nets,
            vcpus: None,
            entropy: None,
            vsock: None,
            balloon: None,
            mmds: None,
        }
    }
}

struct State {
    dest: Option<File>,
    /// Counters: running totals by `group.field`.
    totals: BTreeMap<String, u64>,
    /// The totals as of the last line written.
    written: BTreeMap<String, u64>,
    /// Gauges by `group.field`.
    gauges: BTreeMap<String, u64>,
    vm: Option<VmSources>,
    periodic: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    dest: None,
    totals: BTreeMap::new(),
    written: BTreeMap::new(),
    gauges: BTreeMap::new(),
    vm: None,
    periodic: false,
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends the metrics to `path` (a file, appended to and created if missing, or a named pipe,
/// opened so that a missing or slow reader never blocks wisp). Later calls move them.
pub fn configure(path: &Path) -> Result<(), MetricsError> {
    let file = crate::logger::open_file_or_pipe(path).map_err(|e| MetricsError::Open {
        path: path.to_path_buf(),
        reason: crate::config::io_reason(&e),
    })?;
    state().dest = Some(file);
    start_periodic();
    Ok(())
}

/// Whether a metrics destination is set.
pub fn configured() -> bool {
    state().dest.is_some()
}

/// Adds `n` to the counter `group.field`.
pub fn add(group: &str, field: &str, n: u64) {
    let mut s = state();
    let v = s.totals.entry(format!("{group}.{field}")).or_insert(0);
    *v = v.saturating_add(n);
}

/// Sets the gauge `group.field`.
pub fn set(group: &str, field: &str, value: u64) {
    state().gauges.insert(format!("{group}.{field}"), value);
}

/// The VM's devices; from now on, if metrics have a destination, a line is also written every
/// [`WRITE_PERIOD`] (as Firecracker does once the VM runs).
pub fn register_vm(sources: VmSources) {
    state().vm = Some(sources);
    start_periodic();
}

/// Starts the thread that writes a line every [`WRITE_PERIOD`], once there is a VM and a
/// destination (a VM without metrics gets no thread: nothing to start, nothing to stop).
fn start_periodic() {
    {
        let mut s = state();
        if s.vm.is_none() || s.dest.is_none() || std::mem::replace(&mut s.periodic, true) {
            return;
        }
    }
    // Not under the lock: the logger counts its failed writes here.
    let spawned = std::thread::Builder::new()
        .name("wisp-metrics".into())
        .spawn(|| {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Metrics);
            loop {
                std::thread::sleep(WRITE_PERIOD);
                if let Err(e) = write() {
                    log::warn!("{e}");
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("no periodic metrics: cannot start their thread: {e}");
    }
}

/// Writes one line to the destination. `Ok(false)` when none is set (as Firecracker, that is
/// not an error).
pub fn write() -> Result<bool, MetricsError> {
    let mut s = state();
    if s.dest.is_none() {
        return Ok(false);
    }
    let mut line = serde_json::to_vec(&s.next_line()).expect("metrics serialize to JSON");
    line.push(b'\n');
    let written = match s.dest.as_mut() {
        Some(f) => f.write_all(&line),
        None => Ok(()),
    };
    if let Err(e) = written {
        let v = s.totals.entry("logger.metrics_fails".into()).or_insert(0);
        *v = v.saturating_add(1);
        return Err(MetricsError::Write(e));
    }
    Ok(true)
}

impl State {
    /// The object of the next line; counters restart from here.
    fn next_line(&mut self) -> Value {
        let mut totals = self.totals.clone();
        let mut devices: Vec<(String, &'static [&'static str])> = Vec::new();
        if let Some(vm) = &self.vm {
            if let Some(vcpus) = &vm.vcpus {
                let exits = vcpus.exits_by_kind();
                for (kind, field) in [
                    (ExitKind::IoIn, "exit_io_in"),
                    (ExitKind::IoOut, "exit_io_out"),
                    (ExitKind::MmioRead, "exit_mmio_read"),
                    (ExitKind::MmioWrite, "exit_mmio_write"),
                ] {
                    totals.insert(format!("vcpu.{field}"), exits[kind as usize]);
                }
            }
            let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            if let Some(c) = &vm.entropy {
                for (field, v) in [
                    ("entropy_event_count", l(&c.queue_events)),
                    ("entropy_bytes", l(&c.bytes)),
                    (
                        "entropy_event_fails",
                        l(&c.invalid_requests) + l(&c.host_rng_fails),
                    ),
                    ("host_rng_fails", l(&c.host_rng_fails)),
                    (
                        "entropy_rate_limiter_throttled",
                        l(&c.rate_limiter_throttled),
                    ),
                    ("rate_limiter_event_count", l(&c.rate_limiter_events)),
                ] {
                    totals.insert(format!("entropy.{field}"), v);
                }
            }
            if let Some(c) = &vm.mmds {
                for (field, v) in c.snapshot() {
                    totals.insert(format!("mmds.{field}"), v);
                }
            }
            if let Some(c) = &vm.vsock {
                for (field, v) in [
                    ("rx_packets_count", l(&c.rx_packets)),
                    ("rx_bytes_count", l(&c.rx_bytes)),
                    ("tx_packets_count", l(&c.tx_packets)),
                    ("tx_bytes_count", l(&c.tx_bytes)),
                    ("tx_queue_event_fails", l(&c.malformed)),
                ] {
                    totals.insert(format!("vsock.{field}"), v);
                }
            }
            for (id, counters) in &vm.drives {
                let group = format!("block_{id}");
                for (field, v) in block_fields(counters) {
                    totals.insert(format!("{group}.{field}"), v);
                }
                devices.push((group, BLOCK_FIELDS));
            }
            if let Some(b) = &vm.balloon {
                let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                for (field, v) in [
                    ("inflate_count", l(&b.inflate_count)),
                    ("deflate_count", l(&b.deflate_count)),
                    ("stats_updates_count", l(&b.stats_updates_count)),
                    ("stats_update_fails", l(&b.stats_update_fails)),
                ] {
                    totals.insert(format!("balloon.{field}"), v);
                }
            }
            for (id, counters) in &vm.nets {
                let group = format!("net_{id}");
                for (field, v) in net_fields(counters) {
                    totals.insert(format!("{group}.{field}"), v);
                }
                devices.push((group, NET_FIELDS));
            }
        }
        let mut groups: Vec<(String, &[&str])> = GROUPS
            .iter()
            .map(|(g, f)| (g.to_string(), *f))
            .chain([
                ("block".to_string(), BLOCK_FIELDS),
                ("net".to_string(), NET_FIELDS),
            ])
            .collect();
        groups.extend(devices.iter().map(|(g, f)| (g.clone(), *f)));

        let mut out = Map::new();
        out.insert("utc_timestamp_ms".into(), json!(utc_now_ms()));
        for (group, fields) in &groups {
            let mut obj = Map::new();
            for field in *fields {
                let value = if field.ends_with("_agg") {
                    json!({
                        "min_us": self.value(&totals, group, &format!("{field}.min_us")),
                        "max_us": self.value(&totals, group, &format!("{field}.max_us")),
                        "sum_us": self.value(&totals, group, &format!("{field}.sum_us")),
                    })
                } else {
                    json!(self.value(&totals, group, field))
                };
                obj.insert(field.to_string(), value);
            }
            out.insert(group.clone(), Value::Object(obj));
        }
        // The aggregates are the sums of the devices' lines.
        for (agg, prefix) in [("block", "block_"), ("net", "net_")] {
            let mut sum: BTreeMap<String, u64> = BTreeMap::new();
            for (name, v) in &out {
                if let (Some(_), Some(obj)) = (name.strip_prefix(prefix), v.as_object()) {
                    for (field, n) in obj {
                        if let Some(n) = n.as_u64() {
                            let e = sum.entry(field.clone()).or_insert(0);
                            *e = e.saturating_add(n);
                        }
                    }
                }
            }
            if let Some(Value::Object(obj)) = out.get_mut(agg) {
                for (field, n) in sum {
                    obj.insert(field, json!(n));
                }
            }
        }
        self.written = totals;
        Value::Object(out)
    }

    /// A field's value: a gauge as it is, a counter as its change since the last line.
    fn value(&self, totals: &BTreeMap<String, u64>, group: &str, field: &str) -> u64 {
        let key = format!("{group}.{field}");
        if is_gauge(group, field) {
            return self.gauges.get(&key).copied().unwrap_or(0);
        }
        let now = totals.get(&key).copied().unwrap_or(0);
        now.saturating_sub(self.written.get(&key).copied().unwrap_or(0))
    }
}

/// wisp's block counters under Firecracker's names.
fn block_fields(c: &BlockCounters) -> [(&'static str, u64); 10] {
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    [
        ("read_count", l(&c.read_count)),
        ("read_bytes", l(&c.read_bytes)),
        ("write_count", l(&c.write_count)),
        ("write_bytes", l(&c.write_bytes)),
        ("flush_count", l(&c.flush_count)),
        ("invalid_reqs_count", l(&c.invalid_reqs_count)),
        ("execute_fails", l(&c.execute_fails)),
        ("queue_event_count", l(&c.queue_event_count)),
        (
            "rate_limiter_throttled_events",
            l(&c.rate_limiter_throttled_events),
        ),
        ("rate_limiter_event_count", l(&c.rate_limiter_event_count)),
    ]
}

/// wisp's network counters under Firecracker's names.
fn net_fields(c: &NetCounters) -> [(&'static str, u64); 11] {
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let (tx_malformed, tx_errors) = (l(&c.tx_malformed), l(&c.tx_errors));
    [
        ("rx_bytes_count", l(&c.rx_bytes)),
        ("rx_packets_count", l(&c.rx_frames)),
        // Frames the tap gave that the guest could not take, and chains it malformed.
        (
            "rx_fails",
            l(&c.rx_dropped).saturating_add(l(&c.rx_bad_chains)),
        ),
        ("tx_bytes_count", l(&c.tx_bytes)),
        ("tx_packets_count", l(&c.tx_frames)),
        ("tx_malformed_frames", tx_malformed),
        ("tap_write_fails", tx_errors),
        ("rx_rate_limiter_throttled", l(&c.rx_rate_limiter_throttled)),
        ("rx_event_rate_limiter_count", l(&c.rx_rate_limiter_events)),
        ("tx_rate_limiter_throttled", l(&c.tx_rate_limiter_throttled)),
        ("tx_rate_limiter_event_count", l(&c.tx_rate_limiter_events)),
    ]
}

fn utc_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The API request counters Firecracker keeps for `method path`: (group, field prefix).
pub fn api_counter(method: &str, path: &str) -> Option<(&'static str, &'static str)> {
    let path = path.split('?').next().unwrap_or(path);
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let name = match first {
        "" if method == "GET" => "instance_info",
        "version" => "vmm_version",
        "actions" => "actions",
        "boot-source" => "boot_source",
        "drives" => "drive",
        "logger" => "logger",
        "machine-config" => "machine_cfg",
        "cpu-config" => "cpu_cfg",
        "metrics" => "metrics",
        "network-interfaces" => "network",
        "mmds" => "mmds",
        "vsock" => "vsock",
        "pmem" => "pmem",
        "serial" => "serial",
        "hotplug" => "hotplug_memory",
        _ => return None,
    };
    let group = match method {
        "GET" => "get_api_requests",
        "PUT" => "put_api_requests",
        "PATCH" => "patch_api_requests",
        _ => return None,
    };
    Some((group, name))
}

/// Counts one answered API request as Firecracker does: `<name>_count` for every request,
/// `<name>_fails` for the ones that failed (GETs have no failure counter).
pub fn count_api_request(method: &str, path: &str, status: u16) {
    let Some((group, name)) = api_counter(method, path) else {
        return;
    };
    let fields = GROUPS
        .iter()
        .find(|(g, _)| *g == group)
        .map_or(&[][..], |(_, f)| *f);
    let count = format!("{name}_count");
    if fields.contains(&count.as_str()) {
        add(group, &count, 1);
    }
    let fails = format!("{name}_fails");
    if status >= 400 && fields.contains(&fails.as_str()) {
        add(group, &fails, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> State {
        State {
            dest: None,
            totals: BTreeMap::new(),
            written: BTreeMap::new(),
            gauges: BTreeMap::new(),
            vm: None,
            periodic: false,
        }
    }

    #[test]
    fn a_line_has_every_firecracker_group_and_counters_restart_after_it() {
        let mut s = fresh();
        let counters = Arc::new(NetCounters::default());
        counters.rx_bytes.store(1500, Ordering::Relaxed);
        counters.rx_frames.store(1, Ordering::Relaxed);
        let disk = Arc::new(BlockCounters::default());
        disk.read_count.store(3, Ordering::Relaxed);
        disk.read_bytes.store(12288, Ordering::Relaxed);
        disk.write_count.store(1, Ordering::Relaxed);
        disk.write_bytes.store(512, Ordering::Relaxed);
        disk.flush_count.store(1, Ordering::Relaxed);
        disk.invalid_reqs_count.store(2, Ordering::Relaxed);
        disk.execute_fails.store(1, Ordering::Relaxed);
        disk.queue_event_count.store(5, Ordering::Relaxed);
        let vcpus = Arc::new(VcpuControl::default());
        vcpus.count_exit(ExitKind::IoOut);
        let mmds = Arc::new(wisp_devices::mmds::MmdsCounters::default());
        mmds.rx_accepted.store(9, Ordering::Relaxed);
        mmds.rx_no_token.store(3, Ordering::Relaxed);
        let balloon = Arc::new(BalloonCounters::default());
        balloon.inflate_count.store(4, Ordering::Relaxed);
        balloon.stats_updates_count.store(2, Ordering::Relaxed);
        disk.rate_limiter_throttled_events
            .store(6, Ordering::Relaxed);
        counters
            .tx_rate_limiter_throttled
            .store(7, Ordering::Relaxed);
        s.vm = Some(VmSources {
            drives: vec![("rootfs".into(), disk.clone())],
            nets: vec![("eth0".into(), counters.clone())],
            vcpus: Some(vcpus.clone()),
            entropy: None,
            vsock: None,
            balloon: Some(balloon),
            mmds: Some(mmds),
        });
        s.totals.insert("put_api_requests.actions_count".into(), 2);
        s.gauges
            .insert("api_server.process_startup_time_us".into(), 1234);
        let line = s.next_line();
        for key in [
            "utc_timestamp_ms",
            "api_server",
            "block",
            "net",
            "vcpu",
            "vmm",
            "uart",
            "latencies_us",
            "signals",
            "block_rootfs",
            "net_eth0",
            "get_api_requests",
            "put_api_requests",
            "patch_api_requests",
            "logger",
            "mmds",
            "balloon",
            "vsock",
            "entropy",
            "i8042",
            "rtc",
            "seccomp",
        ] {
            assert!(line.get(key).is_some(), "{key} missing from {line}");
        }
        assert!(line["utc_timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
        assert_eq!(line["net_eth0"]["rx_bytes_count"], 1500);
        assert_eq!(line["net"]["rx_bytes_count"], 1500, "the aggregate");
        assert_eq!(line["net_eth0"]["tx_spoofed_mac_count"], 0);
        assert_eq!(line["net_eth0"]["tx_rate_limiter_throttled"], 7);
        assert_eq!(line["block_rootfs"]["rate_limiter_throttled_events"], 6);
        assert_eq!(line["balloon"]["inflate_count"], 4);
        assert_eq!(line["balloon"]["stats_updates_count"], 2);
        assert_eq!(line["mmds"]["rx_accepted"], 9);
        assert_eq!(line["mmds"]["rx_no_token"], 3);
        assert_eq!(line["mmds"]["rx_invalid_token"], 0);
        assert_eq!(line["block_rootfs"]["read_agg"]["max_us"], 0);
        for (field, v) in [
            ("read_count", 3),
            ("read_bytes", 12288),
            ("write_count", 1),
            ("write_bytes", 512),
            ("flush_count", 1),
            ("invalid_reqs_count", 2),
            ("execute_fails", 1),
            ("queue_event_count", 5),
            ("update_count", 0),
        ] {
            assert_eq!(line["block_rootfs"][field], v, "block_rootfs.{field}");
            assert_eq!(line["block"][field], v, "block.{field}, the aggregate");
        }
        assert_eq!(line["put_api_requests"]["actions_count"], 2);
        assert_eq!(line["api_server"]["process_startup_time_us"], 1234);
        assert_eq!(line["vcpu"]["exit_io_out"], 1);
        assert_eq!(line["vcpu"]["exit_mmio_write"], 0);

        // Counters show the change since the last line, gauges their value.
        counters.rx_bytes.store(1600, Ordering::Relaxed);
        disk.read_count.store(4, Ordering::Relaxed);
        disk.read_bytes.store(16384, Ordering::Relaxed);
        let line = s.next_line();
        assert_eq!(line["block_rootfs"]["read_count"], 1);
        assert_eq!(line["block_rootfs"]["read_bytes"], 4096);
        assert_eq!(line["block_rootfs"]["write_count"], 0);
        assert_eq!(line["block"]["read_bytes"], 4096);
        assert_eq!(line["net_eth0"]["rx_bytes_count"], 100);
        assert_eq!(line["net_eth0"]["rx_packets_count"], 0);
        assert_eq!(line["put_api_requests"]["actions_count"], 0);
        assert_eq!(line["api_server"]["process_startup_time_us"], 1234);
        assert_eq!(line["vcpu"]["exit_io_out"], 0);
    }

    #[test]
    fn api_requests_map_to_firecracker_counters() {
        assert_eq!(
            api_counter("PUT", "/drives/rootfs"),
            Some(("put_api_requests", "drive"))
        );
        assert_eq!(
            api_counter("PATCH", "/network-interfaces/eth0"),
            Some(("patch_api_requests", "network"))
        );
        assert_eq!(
            api_counter("GET", "/"),
            Some(("get_api_requests", "instance_info"))
        );
        assert_eq!(
            api_counter("GET", "/version?x"),
            Some(("get_api_requests", "vmm_version"))
        );
        assert_eq!(api_counter("GET", "/vm/metrics"), None);
    }

    #[test]
    fn device_ids_come_from_the_vm_config() {
        let counters = Arc::new(NetCounters::default());
        let config = json!({
            "drives": [{"drive_id": "rootfs"}, {"drive_id": "data"}],
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
        });
        let (root, data) = (
            Arc::new(BlockCounters::default()),
            Arc::new(BlockCounters::default()),
        );
        let s = VmSources::new(
            Some(&config),
            &[
                (Some("data".into()), data.clone()),
                (Some("rootfs".into()), root.clone()),
            ],
            &[("tap7".into(), counters.clone()), ("tap8".into(), counters)],
        );
        let drives: Vec<&str> = s.drives.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(drives, ["rootfs", "data"]);
        assert!(Arc::ptr_eq(&s.drives[0].1, &root) && Arc::ptr_eq(&s.drives[1].1, &data));
        let ids: Vec<&str> = s.nets.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["eth0", "tap8"]);
    }
}
