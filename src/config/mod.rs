//! What the user asked for: one `VmConfig`, from CLI flags, a JSON file or (later) the API,
//! validated once, here. The builder never sees flags or JSON.

pub mod balloon;
pub mod cmdline;
mod disk;
pub mod mmds;
mod net;
pub mod rate_limiter;
pub mod size;
mod vsock;

pub use balloon::BalloonConfig;
pub use disk::{DiskConfig, DiskFormat};
pub use mmds::{MmdsConfig, MmdsVersion, DEFAULT_MMDS_SIZE_LIMIT};
pub use net::{MacAddr, NetConfig, MIN_MTU};
pub use rate_limiter::{RateLimiterConfig, TokenBucketConfig};
pub use vsock::VsockConfig;

pub use size::MemSize;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub const MAX_VCPUS: u8 = 32;
pub const MIN_MEMORY: u64 = 64 << 20;
pub const MAX_MEMORY: u64 = 1 << 40;
pub const DEFAULT_MEMORY: u64 = 512 << 20;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no kernel given: use --kernel PATH (or \"kernel\" in the config file)")]
    NoKernel,
    #[error("{what} {path}: {reason}")]
    BadFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Cpus(u64),
    #[error("memory must be between 64 MiB and 1 TiB, got {0}")]
    Memory(MemSize),
    #[error("memory must be a whole number of MiB, got {0} bytes")]
    MemoryAlignment(u64),
    #[error("memory on 2 MiB huge pages must be a multiple of 2 MiB, got {} MiB", .0 >> 20)]
    HugePageAlignment(u64),
    #[error("with SMT (two threads per core) cpus must be 1 or even, got {0}")]
    SmtOddCpus(u8),
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("{0}")]
    Cgroup(#[from] crate::cgroup::Error),
    #[error("--{flag} needs --cgroup PARENT")]
    CgroupNeedsParent { flag: &'static str },
    #[error("id {0:?}: use 1 to 64 letters, digits, '-' or '_'")]
    Id(String),
    #[error("--net {spec}: {reason}")]
    NetSpec { spec: String, reason: String },
    #[error("--vsock {spec}: {reason}")]
    VsockSpec { spec: String, reason: String },
    #[error("vsock: {reason}")]
    Vsock { reason: String },
    #[error("mmds: {reason}")]
    Mmds { reason: String },
    #[error("--disk {spec}: {reason}")]
    DiskSpec { spec: String, reason: String },
    #[error(
        "at most {max} virtio devices fit the platform, {count} were asked for (the entropy \
         device is one unless turned off)"
    )]
    TooManyDevices { count: usize, max: usize },
    #[error("{0}")]
    Balloon(String),
    #[error("console must be stdio, file:PATH or none, got {0:?}")]
    Console(String),
    #[error("config file {path}: {source}")]
    ConfigFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    ConfigJson {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleConfig {
    /// wisp's stdout, and stdin as console input (raw mode when a terminal).
    #[default]
    Stdio,
    /// Appended to a file; no input.
    File(PathBuf),
    /// Discarded.
    None,
}

impl FromStr for ConsoleConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(ConfigError::Console(s.to_string())),
            },
        }
    }
}

impl fmt::Display for ConsoleConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Stdio => f.write_str("stdio"),
            Self::None => f.write_str("none"),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl Serialize for ConsoleConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConsoleConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The whole description of one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    #[serde(default = "default_memory")]
    pub memory: MemSize,
    #[serde(default)]
    pub console: ConsoleConfig,
    /// virtio-blk disks, in order: vda, vdb, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces over taps, in order: eth0, eth1, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// Describe virtio-mmio devices on the kernel command line (`virtio_mmio.device=`)
    /// instead of in the ACPI DSDT, for kernels built without ACPI.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub virtio_mmio_cmdline: bool,
    /// Confine the vCPU threads in a cgroup of their own under this parent, with limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<crate::cgroup::CgroupSpec>,
    /// The VM's name (cgroup names, logs); the process id when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Back guest memory with the host's 2 MiB huge pages (hugetlbfs pool, reserved at start).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub huge_pages: bool,
    /// Two threads per core in the guest's CPU topology (`cpus` 1 or even).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub smt: bool,
    /// A virtio-vsock device (after the interfaces, before the entropy device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// A virtio-rng device fed from the host's getrandom(2), after the disks and interfaces,
    /// so that the guest never waits for entropy. On unless turned off.
    #[serde(default = "default_entropy")]
    pub entropy: bool,
    /// Limits on the entropy device's requests and bytes (Firecracker's entropy
    /// `rate_limiter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy_rate_limiter: Option<RateLimiterConfig>,
    /// A virtio-balloon device (after the entropy device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// The metadata service on some of the interfaces (by `id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds: Option<MmdsConfig>,
    /// The MMDS document at boot (the API can change it later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds_data: Option<serde_json::Value>,
    /// The largest MMDS document, in bytes of JSON.
    #[serde(default = "default_mmds_size_limit")]
    pub mmds_size_limit: usize,
}

/// The huge page size guest memory can be backed with (x86_64's 2 MiB).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// virtio-mmio devices get GSIs 5..=23 of the IOAPIC.
pub const MAX_VIRTIO_DEVICES: usize = 19;

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_cpus() -> u8 {
    1
}
fn default_memory() -> MemSize {
    MemSize(DEFAULT_MEMORY)
}
fn default_entropy() -> bool {
    true
}
fn default_mmds_size_limit() -> usize {
    DEFAULT_MMDS_SIZE_LIMIT
}

impl VmConfig {
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            kernel,
            initrd: None,
            cmdline: default_cmdline(),
            cpus: default_cpus(),
            memory: default_memory(),
            console: ConsoleConfig::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            virtio_mmio_cmdline: false,
            cgroup: None,
            id: None,
            huge_pages: false,
            smt: false,
            entropy: default_entropy(),
            entropy_rate_limiter: None,
            vsock: None,
            balloon: None,
            mmds: None,
            mmds_data: None,
            mmds_size_limit: DEFAULT_MMDS_SIZE_LIMIT,
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ConfigFile {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::ConfigJson {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Everything that can be checked before KVM is touched.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_readable_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_readable_file("initrd", initrd)?;
        }
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(self.cpus.into()));
        }
        let mem = self.memory.0;
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&mem) {
            return Err(ConfigError::Memory(self.memory));
        }
        if !mem.is_multiple_of(1 << 20) {
            return Err(ConfigError::MemoryAlignment(mem));
        }
        if self.smt && self.cpus > 1 && !self.cpus.is_multiple_of(2) {
            return Err(ConfigError::SmtOddCpus(self.cpus));
        }
        if self.huge_pages && !mem.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(ConfigError::HugePageAlignment(mem));
        }
        if let Some(b) = &self.balloon {
            b.validate_for(mem >> 20, self.huge_pages)
                .map_err(ConfigError::Balloon)?;
        }
        for disk in &self.disks {
            disk.validate()?;
        }
        disk::check_distinct(&self.disks)?;
        for (i, net) in self.nets.iter().enumerate() {
            net.validate()?;
            if self.nets[..i].iter().any(|n| n.tap == net.tap) {
                return Err(ConfigError::NetSpec {
                    spec: format!("tap={}", net.tap),
                    reason: "the same tap is given twice".into(),
                });
            }
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        let mmds_err = |reason: String| ConfigError::Mmds { reason };
        if let Some(m) = &self.mmds {
            m.validate().map_err(mmds_err)?;
            m.check_interfaces(self.nets.iter().filter_map(|n| n.id.as_deref()))
                .map_err(mmds_err)?;
        }
        if let Some(data) = &self.mmds_data {
            let size = serde_json::to_vec(data).map_or(usize::MAX, |v| v.len());
            if size > self.mmds_size_limit {
                return Err(mmds_err(
                    wisp_devices::mmds::StoreError::TooLarge {
                        size,
                        limit: self.mmds_size_limit,
                    }
                    .to_string(),
                ));
            }
        }
        let devices = self.disks.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.entropy)
            + usize::from(self.balloon.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices {
                count: devices,
                max: MAX_VIRTIO_DEVICES,
            });
        }
        if let Some(cg) = &self.cgroup {
            cg.validate()?;
            cg.validate_vcpu_count(self.cpus.into())?;
        }
        if let Some(id) = &self.id {
            let ok = (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(ConfigError::Id(id.clone()));
            }
        }
        // The PVH and boot_params command lines both need the terminating NUL.
        let max = crate::arch::x86_64::layout::CMDLINE_MAX_SIZE - 1;
        if self.cmdline.len() > max {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
                max,
            });
        }
        Ok(())
    }
}

/// A cpus value from the command line, which may be far out of range.
pub fn parse_cpus(s: &str) -> Result<u8, ConfigError> {
    let n: u64 = s.trim().parse().map_err(|_| ConfigError::Cpus(u64::MAX))?;
    u8::try_from(n)
        .ok()
        .filter(|&c| (1..=MAX_VCPUS).contains(&c))
        .ok_or(ConfigError::Cpus(n))
}

fn check_readable_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    open_host_file(path, false).map_err(|reason| ConfigError::BadFile {
        what,
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(())
}

/// Opens a file the operator named for wisp to read (a kernel, an initrd, or with
/// `block_devices` a disk): symbolic links are followed (`vmlinux -> vmlinux-6.1` is common),
/// a named pipe never blocks the open, and the type of the opened file decides. The error
/// is the reason, ready to follow the path.
pub fn open_host_file(path: &Path, block_devices: bool) -> Result<std::fs::File, String> {
    wisp_devices::disk::open::open_image_file(path, false, block_devices)
        .map(|(file, _)| file)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EISDIR) => "is a directory".to_string(),
            _ => io_reason(&e),
        })
}

/// The io::Error text without Rust's " (os error N)" suffix.
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_file() -> PathBuf {
        // Any readable regular file passes validation; the loader judges the format.
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
    }

    #[test]
    fn json_with_defaults() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(c.cpus, 1);
        assert_eq!(c.memory, MemSize(512 << 20));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.console, ConsoleConfig::Stdio);
    }

    #[test]
    fn json_with_every_field() {
        let c: VmConfig = serde_json::from_str(
            r#"{"kernel": "/k", "initrd": "/i", "cmdline": "quiet", "cpus": 4,
                "memory": "1G", "console": "file:/tmp/c.log"}"#,
        )
        .unwrap();
        assert_eq!(c.cpus, 4);
        assert_eq!(c.memory, MemSize(1 << 30));
        assert_eq!(c.console, ConsoleConfig::File("/tmp/c.log".into()));
        assert_eq!(c.initrd, Some(PathBuf::from("/i")));
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn json_memory_as_number_is_mib() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "/k", "memory": 256}"#).unwrap();
        assert_eq!(c.memory, MemSize(256 << 20));
    }

    #[test]
    fn json_unknown_field_is_an_error() {
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "cpu": 2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `cpu`"), "{e}");
    }

    #[test]
    fn validate_rejects_out_of_range_values() {
        let mut c = VmConfig::new(kernel_file());
        c.validate().unwrap();
        c.cpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Cpus(0))));
        c.cpus = 33;
        assert!(matches!(c.validate(), Err(ConfigError::Cpus(33))));
        c.cpus = 2;
        c.memory = MemSize(1024);
        assert!(matches!(c.validate(), Err(ConfigError::Memory(_))));
        c.memory = MemSize((64 << 20) + 4096);
        assert!(matches!(c.validate(), Err(ConfigError::MemoryAlignment(_))));
        c.memory = MemSize(8 << 30);
        c.validate().unwrap();
        c.cmdline = "x".repeat(5000);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::CmdlineTooLong { len: 5000, .. })
        ));
    }

    #[test]
    fn validate_names_a_missing_or_unusable_kernel() {
        let c = VmConfig::new("/nonexistent/vmlinux".into());
        let msg = c.validate().unwrap_err().to_string();
        assert_eq!(
            msg,
            "kernel /nonexistent/vmlinux: No such file or directory"
        );
        let c = VmConfig::new("/tmp".into());
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "kernel /tmp: is a directory"
        );
    }

    #[test]
    fn cpus_parse_reports_the_value() {
        assert_eq!(parse_cpus("8").unwrap(), 8);
        assert_eq!(
            parse_cpus("1000").unwrap_err().to_string(),
            "cpus must be between 1 and 32, got 1000"
        );
        assert!(parse_cpus("0").is_err());
    }

    #[test]
    fn console_forms() {
        assert_eq!(
            "stdio".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::Stdio
        );
        assert_eq!(
            "none".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::None
        );
        assert_eq!(
            "file:/x".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::File("/x".into())
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tty".parse::<ConsoleConfig>().is_err());
    }
}
