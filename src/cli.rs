//! The command line. Flags become a `VmConfig`; nothing below this module sees them.

use crate::config::{self, ConfigError, ConsoleConfig, DiskConfig, MemSize, NetConfig, VmConfig};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "wisp",
    disable_version_flag = true,
    about = "wisp: a lightweight virtual machine monitor for x86_64 KVM",
    long_about = "wisp boots a Linux kernel (or any ELF with a PVH note) directly on KVM, \
                  one VM per process. Exit status: 0 when the guest powers off or reboots, \
                  1 for a configuration or setup error, 2 when the guest crashes (panic, \
                  triple fault, KVM error), 128+N when stopped by signal N."
)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace (also WISP_LOG).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Firecracker's command line, spoken when no subcommand is given.
    #[command(flatten)]
    pub firecracker: FirecrackerArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Firecracker's socket path when `--api-sock` is not given.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// Every flag of `firecracker --help` (v1.16). Values are taken as text and checked here, so
/// that a bad one is refused with a message naming the flag rather than the parser's.
#[derive(Args, Debug, Default)]
pub struct FirecrackerArgs {
    /// Serve the control API (Firecracker-compatible REST) on this Unix socket and wait for
    /// the VM to be configured and started through it [default: /run/firecracker.socket].
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The VM's id (GET /, log lines, cgroup names): 1 to 64 letters, digits or '-'
    /// [default: anonymous-instance].
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Boot from a Firecracker-style config file (boot-source, machine-config, drives,
    /// network-interfaces, vsock, entropy, logger, metrics, plus wisp's fields); the API
    /// keeps serving unless --no-api.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// With --config-file: serve no API.
    #[arg(long)]
    pub no_api: bool,
    /// Log to this file (appended to) or named pipe instead of stderr, in Firecracker's line
    /// format.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<String>,
    /// Log only lines from this module path and below (e.g. wisp::vmm).
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,
    /// Show the level in log lines.
    #[arg(long)]
    pub show_level: bool,
    /// Show the source file and line in log lines.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Write Firecracker's metrics (JSON lines) to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Accepted; wisp has no boot-timer device yet (a warning says so).
    #[arg(long)]
    pub boot_timer: bool,
    /// Largest API request body, in bytes [default: 65536].
    #[arg(long, value_name = "BYTES", allow_negative_numbers = true)]
    pub http_api_max_payload_size: Option<String>,
    /// The largest MMDS document (metadata service), in bytes of JSON [default: 51200].
    #[arg(long, value_name = "BYTES", allow_negative_numbers = true)]
    pub mmds_size_limit: Option<String>,
    /// A JSON file whose document the MMDS starts with (as a PUT /mmds before boot).
    #[arg(long, value_name = "PATH")]
    pub metadata: Option<PathBuf>,
    /// Refused: wisp builds its seccomp filters from its own per-thread tables; use
    /// --seccomp-level.
    #[arg(long, value_name = "PATH")]
    pub seccomp_filter: Option<PathBuf>,
    /// Install no seccomp filters (the same as --seccomp-level 0).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Seccomp filters: 0 none, 1 system call numbers per thread, 2 numbers and arguments
    /// [default: 2].
    #[arg(long, value_name = "LEVEL", allow_negative_numbers = true)]
    pub seccomp_level: Option<String>,
    /// When the process was started (CLOCK_MONOTONIC, µs), as the jailer passes it; gives
    /// the api_server.process_startup_time_us metric.
    #[arg(long, value_name = "US", allow_negative_numbers = true)]
    pub start_time_us: Option<String>,
    /// The process's CPU time at its start (µs); gives api_server.process_startup_time_cpu_us.
    #[arg(long, value_name = "US", allow_negative_numbers = true)]
    pub start_time_cpu_us: Option<String>,
    /// The parent's (jailer's) CPU time (µs), added to the CPU start-up time.
    #[arg(long, value_name = "US", allow_negative_numbers = true)]
    pub parent_cpu_time_us: Option<String>,
    /// Print the format version of the snapshot file PATH (checked whole first).
    #[arg(long, value_name = "PATH")]
    pub describe_snapshot: Option<PathBuf>,
    /// Print the snapshot format version this wisp writes and reads.
    #[arg(long)]
    pub snapshot_version: bool,
    /// Refused: wisp's devices are virtio-mmio, it has no PCI.
    #[arg(long)]
    pub enable_pci: bool,
    /// Print wisp's version and the Firecracker API version it speaks.
    #[arg(long)]
    pub version: bool,
    /// Set by `wisp jail` on the wisp it starts: no /sys/fs/cgroup inside, so the per-vCPU
    /// cgroup is refused with a message saying why.
    #[arg(long, hide = true)]
    pub jailed: bool,
}

/// What `wisp` without a subcommand was asked to do.
#[derive(Debug)]
pub enum FirecrackerMode {
    /// `--version`.
    PrintVersion,
    /// `--snapshot-version`.
    PrintSnapshotVersion,
    /// `--describe-snapshot PATH`.
    DescribeSnapshot(PathBuf),
    Launch(Box<FirecrackerLaunch>),
}

/// A VM to serve (or boot from a file), from Firecracker's flags, checked.
#[derive(Debug)]
pub struct FirecrackerLaunch {
    /// None with --no-api.
    pub api_sock: Option<PathBuf>,
    pub id: String,
    pub config_file: Option<PathBuf>,
    pub log: crate::logger::LogSettings,
    pub metrics_path: Option<PathBuf>,
    pub max_payload_size: Option<usize>,
    /// `--mmds-size-limit` and `--metadata`.
    pub mmds_size_limit: Option<usize>,
    pub metadata: Option<PathBuf>,
    pub start_time_us: Option<u64>,
    pub start_time_cpu_us: Option<u64>,
    pub parent_cpu_time_us: Option<u64>,
    pub seccomp_level: crate::seccomp::Level,
    /// One line each, for flags accepted without effect.
    pub warnings: Vec<String>,
    /// Started by `wisp jail`.
    pub jailed: bool,
}

impl FirecrackerArgs {
    /// The first Firecracker flag given, for a subcommand that does not take them.
    pub fn first_given(&self) -> Option<&'static str> {
        [
            ("--api-sock", self.api_sock.is_some()),
            ("--id", self.id.is_some()),
            ("--config-file", self.config_file.is_some()),
            ("--no-api", self.no_api),
            ("--log-path", self.log_path.is_some()),
            ("--level", self.level.is_some()),
            ("--module", self.module.is_some()),
            ("--show-level", self.show_level),
            ("--show-log-origin", self.show_log_origin),
            ("--metrics-path", self.metrics_path.is_some()),
            ("--boot-timer", self.boot_timer),
            (
                "--http-api-max-payload-size",
                self.http_api_max_payload_size.is_some(),
            ),
            ("--mmds-size-limit", self.mmds_size_limit.is_some()),
            ("--metadata", self.metadata.is_some()),
            ("--seccomp-filter", self.seccomp_filter.is_some()),
            ("--no-seccomp", self.no_seccomp),
            ("--seccomp-level", self.seccomp_level.is_some()),
            ("--start-time-us", self.start_time_us.is_some()),
            ("--start-time-cpu-us", self.start_time_cpu_us.is_some()),
            ("--parent-cpu-time-us", self.parent_cpu_time_us.is_some()),
            ("--describe-snapshot", self.describe_snapshot.is_some()),
            ("--snapshot-version", self.snapshot_version),
            ("--enable-pci", self.enable_pci),
            ("--version", self.version),
            ("--jailed", self.jailed),
        ]
        .into_iter()
        .find(|(_, given)| *given)
        .map(|(flag, _)| flag)
    }

    /// Checks the flags: what to do, or the flag that cannot be honoured and why.
    pub fn resolve(&self) -> Result<FirecrackerMode, CliError> {
        let refuse = |flag: &'static str, reason: &str| {
            Err(CliError::Flag {
                flag,
                reason: reason.to_string(),
            })
        };
        if let Some(path) = &self.describe_snapshot {
            return Ok(FirecrackerMode::DescribeSnapshot(path.clone()));
        }
        if self.snapshot_version {
            return Ok(FirecrackerMode::PrintSnapshotVersion);
        }
        if self.version {
            return Ok(FirecrackerMode::PrintVersion);
        }
        if self.enable_pci {
            return refuse(
                "--enable-pci",
                "wisp has no PCI; its virtio devices are virtio-mmio (leave the flag out)",
            );
        }
        if self.seccomp_filter.is_some() && self.no_seccomp {
            return refuse(
                "--seccomp-filter",
                "--seccomp-filter and --no-seccomp exclude each other",
            );
        }
        if self.seccomp_filter.is_some() {
            return refuse(
                "--seccomp-filter",
                "wisp does not load compiled BPF files (Firecracker's are made for Firecracker's \
                 threads); it builds a filter per thread from its own tables: use \
                 --seccomp-level 0, 1 or 2",
            );
        }
        if self.no_seccomp && self.seccomp_level.is_some() {
            return refuse(
                "--no-seccomp",
                "--no-seccomp and --seccomp-level exclude each other",
            );
        }
        let seccomp_level = if self.no_seccomp {
            crate::seccomp::Level::Off
        } else {
            seccomp_level(self.seccomp_level.as_deref())?
        };
        if self.no_api && self.config_file.is_none() {
            return refuse(
                "--no-api",
                "without the API the VM can only come from a file: add --config-file FILE",
            );
        }
        let id = match &self.id {
            Some(id) => {
                if id.is_empty()
                    || id.len() > 64
                    || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                {
                    return refuse(
                        "--id",
                        &format!("{id:?} is not a valid id (1 to 64 letters, digits or '-')"),
                    );
                }
                id.clone()
            }
            None => crate::api::DEFAULT_ID.to_string(),
        };
        let level = match &self.level {
            Some(l) => Some(
                serde_json::from_value::<crate::api::LogLevel>(serde_json::Value::String(
                    l.clone(),
                ))
                .map_err(|e| CliError::Flag {
                    flag: "--level",
                    reason: e.to_string(),
                })?
                .to_level_filter(),
            ),
            None => None,
        };
        let max_payload_size = match &self.http_api_max_payload_size {
            Some(v) => Some(
                number("--http-api-max-payload-size", v)
                    .and_then(|n| {
                        usize::try_from(n).map_err(|_| bad_number("--http-api-max-payload-size", v))
                    })
                    .and_then(|n| match n {
                        0 => Err(CliError::Flag {
                            flag: "--http-api-max-payload-size",
                            reason: "must be at least 1 byte".into(),
                        }),
                        n => Ok(n),
                    })?,
            ),
            None => None,
        };
        let mut warnings = Vec::new();
        let mmds_size_limit = match &self.mmds_size_limit {
            Some(v) => Some(number("--mmds-size-limit", v).and_then(|n| {
                usize::try_from(n).map_err(|_| bad_number("--mmds-size-limit", v))
            })?),
            None => None,
        };
        if self.boot_timer {
            warnings.push(
                "--boot-timer: accepted without effect: wisp has no boot-timer device".into(),
            );
        }
        if self.no_api && self.api_sock.is_some() {
            warnings.push("--api-sock: not served, --no-api was given".into());
        }
        let time = |flag, v: &Option<String>| v.as_deref().map(|v| number(flag, v)).transpose();
        Ok(FirecrackerMode::Launch(Box::new(FirecrackerLaunch {
            api_sock: (!self.no_api).then(|| {
                self.api_sock
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCK))
            }),
            id,
            config_file: self.config_file.clone(),
            log: crate::logger::LogSettings {
                path: self.log_path.clone(),
                level,
                show_level: self.show_level.then_some(true),
                show_origin: self.show_log_origin.then_some(true),
                module: self.module.clone(),
            },
            metrics_path: self.metrics_path.clone(),
            max_payload_size,
            mmds_size_limit,
            metadata: self.metadata.clone(),
            start_time_us: time("--start-time-us", &self.start_time_us)?,
            start_time_cpu_us: time("--start-time-cpu-us", &self.start_time_cpu_us)?,
            parent_cpu_time_us: time("--parent-cpu-time-us", &self.parent_cpu_time_us)?,
            seccomp_level,
            warnings,
            jailed: self.jailed,
        })))
    }
}

fn bad_number(flag: &'static str, v: &str) -> CliError {
    CliError::Flag {
        flag,
        reason: format!("{v:?} is not a whole number"),
    }
}

/// `--seccomp-level`, 2 when not given.
fn seccomp_level(v: Option<&str>) -> Result<crate::seccomp::Level, CliError> {
    match v {
        None => Ok(crate::seccomp::Level::Arguments),
        Some(v) => v.parse().map_err(|reason| CliError::Flag {
            flag: "--seccomp-level",
            reason,
        }),
    }
}

fn number(flag: &'static str, v: &str) -> Result<u64, CliError> {
    v.parse::<u64>().map_err(|_| bad_number(flag, v))
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a VM and run it until the guest powers off, reboots or crashes.
    Run(Box<RunArgs>),
    /// Create and inspect disk images (qcow2, raw).
    #[command(subcommand)]
    Image(crate::image::ImageCommand),
    /// Start a VMM confined as Firecracker's jailer does (also: wisp started as `jailer`):
    /// a chroot, namespaces and cgroups, an unprivileged user. See the README's "Jailed".
    Jail(Box<crate::jail::JailArgs>),
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// JSON file with the VM's settings (the same names as these flags); flags given as
    /// well override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Kernel to boot: an ELF vmlinux (PVH entry when it has the PVH note), or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to load for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 panic=-1"].
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs, 1 to 32 [default: 1].
    #[arg(long, value_name = "N")]
    pub cpus: Option<String>,
    /// Guest memory, e.g. 512M or 2G (a bare number is MiB), 64M to 1T [default: 512M].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Serial console: stdio (stdout, stdin as input), file:PATH (appended), or none
    /// [default: stdio].
    #[arg(long, value_name = "WHERE")]
    pub console: Option<String>,
    /// A virtio-blk disk, repeatable (vda, vdb, ... in order):
    /// path=FILE[,readonly=on][,serial=ID][,format=raw|qcow2][,backing_files=on]
    /// [,backing_dir=DIR][,backing_devices=on]. Without format the disk is raw. A qcow2 image
    /// that names a backing file is refused unless backing_files=on (anywhere) or
    /// backing_dir=DIR (only inside DIR, no symbolic links). Given here, the disks replace
    /// those of the config file.
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// A virtio-net interface over a tap, repeatable (eth0, eth1, ...):
    /// tap=NAME[,mac=52:54:00:12:34:56]. A missing tap is created (and gone when wisp
    /// exits); without mac, a stable one is derived from the tap name. Given here, the
    /// interfaces replace those of the config file.
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,
    /// Describe virtio-mmio devices on the kernel command line (virtio_mmio.device=)
    /// instead of in ACPI, for kernels built without ACPI.
    #[arg(long)]
    pub virtio_mmio_cmdline: bool,
    /// A virtio-vsock device: cid=N,uds=PATH (Firecracker's host side: host processes
    /// connect to PATH and write `CONNECT <port>\n`; guest connections to port P go to
    /// PATH_P). Given here, it replaces the config file's.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,
    /// A virtio-rng entropy device fed from the host's getrandom, so the guest never waits
    /// for entropy: on or off [default: on].
    #[arg(long, value_name = "on|off")]
    pub entropy: Option<String>,
    /// The VM's name, used for its cgroups [default: the process id].
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Put the vCPU threads in a cgroup of their own, created under PARENT (a path under a
    /// cgroup mount, or a name relative to each controller's hierarchy); removed on exit.
    #[arg(long, value_name = "PARENT")]
    pub cgroup: Option<String>,
    /// CPU cap for all vCPUs together, QUOTA/PERIOD in microseconds (e.g. 50000/100000).
    #[arg(long, value_name = "QUOTA/PERIOD", conflicts_with = "vcpu_cpus")]
    pub vcpu_cpu_max: Option<String>,
    /// CPU cap for all vCPUs together as a number of host CPUs (e.g. 0.5).
    #[arg(long, value_name = "CPUS")]
    pub vcpu_cpus: Option<String>,
    /// Host CPUs the vCPU threads may run on (e.g. 0-1,3).
    #[arg(long, value_name = "LIST")]
    pub vcpu_cpuset: Option<String>,
    /// Pin vCPUs to host CPUs: VCPU:CPU pairs (e.g. 0:1,1:0).
    #[arg(long, value_name = "PAIRS")]
    pub vcpu_affinity: Option<String>,
    /// Seccomp filters: 0 none, 1 system call numbers per thread, 2 numbers and arguments
    /// [default: 2].
    #[arg(long, value_name = "LEVEL", allow_negative_numbers = true)]
    pub seccomp_level: Option<String>,
}

impl RunArgs {
    fn apply_cgroup(&self, config: &mut VmConfig) -> Result<(), ConfigError> {
        use crate::cgroup::{Affinity, CgroupSpec, CpuList, CpuMax};
        if let Some(parent) = &self.cgroup {
            config.cgroup.get_or_insert_with(CgroupSpec::default).parent = parent.clone();
        }
        let limits = [
            ("vcpu-cpu-max", self.vcpu_cpu_max.is_some()),
            ("vcpu-cpus", self.vcpu_cpus.is_some()),
            ("vcpu-cpuset", self.vcpu_cpuset.is_some()),
            ("vcpu-affinity", self.vcpu_affinity.is_some()),
        ];
        let Some(spec) = config.cgroup.as_mut() else {
            return match limits.iter().find(|(_, given)| *given) {
                Some((flag, _)) => Err(ConfigError::CgroupNeedsParent { flag }),
                None => Ok(()),
            };
        };
        if let Some(v) = &self.vcpu_cpu_max {
            spec.cpu_max = Some(v.parse::<CpuMax>()?);
        }
        if let Some(v) = &self.vcpu_cpus {
            spec.cpu_max = Some(CpuMax::parse_cpus(v)?);
        }
        if let Some(v) = &self.vcpu_cpuset {
            spec.cpuset = Some(v.parse::<CpuList>()?);
        }
        if let Some(v) = &self.vcpu_affinity {
            spec.affinity = Some(v.parse::<Affinity>()?);
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--memory: {0}")]
    Memory(#[from] config::size::MemSizeError),
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
}

impl RunArgs {
    /// `--seccomp-level`, checked.
    pub fn seccomp_level(&self) -> Result<crate::seccomp::Level, CliError> {
        seccomp_level(self.seccomp_level.as_deref())
    }

    /// The `VmConfig` these flags (and the config file, if any) describe, validated.
    pub fn to_config(&self) -> Result<VmConfig, CliError> {
        let mut config = match &self.config {
            Some(path) => VmConfig::from_json_file(path)?,
            None => VmConfig::new(self.kernel.clone().ok_or(ConfigError::NoKernel)?),
        };
        if let Some(k) = &self.kernel {
            config.kernel = k.clone();
        }
        if let Some(i) = &self.initrd {
            config.initrd = Some(i.clone());
        }
        if let Some(c) = &self.cmdline {
            config.cmdline = c.clone();
        }
        if let Some(c) = &self.cpus {
            config.cpus = config::parse_cpus(c)?;
        }
        if let Some(m) = &self.memory {
            config.memory = m.parse::<MemSize>()?;
        }
        if let Some(c) = &self.console {
            config.console = c.parse::<ConsoleConfig>()?;
        }
        if !self.disks.is_empty() {
            config.disks = self
                .disks
                .iter()
                .map(|d| DiskConfig::parse(d))
                .collect::<Result<_, _>>()?;
        }
        if !self.nets.is_empty() {
            config.nets = self
                .nets
                .iter()
                .map(|n| NetConfig::parse(n))
                .collect::<Result<_, _>>()?;
        }
        if self.virtio_mmio_cmdline {
            config.virtio_mmio_cmdline = true;
        }
        if let Some(v) = &self.vsock {
            config.vsock = Some(crate::config::VsockConfig::parse(v)?);
        }
        if let Some(v) = &self.entropy {
            config.entropy = match v.as_str() {
                "on" => true,
                "off" => false,
                _ => {
                    return Err(CliError::Flag {
                        flag: "--entropy",
                        reason: format!("{v:?}: use on or off"),
                    })
                }
            };
        }
        if let Some(id) = &self.id {
            config.id = Some(id.clone());
        }
        self.apply_cgroup(&mut config)?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmConfig, String> {
        let mut full = vec!["wisp", "run"];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        let Some(Command::Run(run)) = cli.command else {
            panic!("not a run command");
        };
        run.to_config().map_err(|e| e.to_string())
    }

    fn firecracker(args: &[&str]) -> Result<FirecrackerMode, String> {
        let mut full = vec!["wisp"];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        assert!(cli.command.is_none());
        cli.firecracker.resolve().map_err(|e| e.to_string())
    }

    fn launch(args: &[&str]) -> FirecrackerLaunch {
        match firecracker(args) {
            Ok(FirecrackerMode::Launch(l)) => *l,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn the_jailers_command_line_is_honoured() {
        let l = launch(&[
            "--id",
            "vm-7",
            "--start-time-us",
            "123",
            "--start-time-cpu-us",
            "45",
            "--parent-cpu-time-us",
            "6",
            "--api-sock",
            "/run/fc.sock",
            "--log-path",
            "/tmp/fc.log",
            "--level",
            "Info",
            "--show-level",
            "--show-log-origin",
            "--metrics-path",
            "/tmp/fc.metrics",
            "--http-api-max-payload-size",
            "1048576",
        ]);
        assert_eq!(l.id, "vm-7");
        assert_eq!(
            l.api_sock.as_deref(),
            Some(std::path::Path::new("/run/fc.sock"))
        );
        assert_eq!(
            (l.start_time_us, l.start_time_cpu_us, l.parent_cpu_time_us),
            (Some(123), Some(45), Some(6))
        );
        assert_eq!(l.log.level, Some(log::LevelFilter::Info));
        assert_eq!(
            (l.log.show_level, l.log.show_origin),
            (Some(true), Some(true))
        );
        assert_eq!(
            l.metrics_path.as_deref(),
            Some(std::path::Path::new("/tmp/fc.metrics"))
        );
        assert_eq!(l.max_payload_size, Some(1 << 20));
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    }

    #[test]
    fn seccomp_flags_set_the_level() {
        use crate::seccomp::Level;
        assert_eq!(launch(&[]).seccomp_level, Level::Arguments);
        assert_eq!(launch(&["--no-seccomp"]).seccomp_level, Level::Off);
        assert!(launch(&["--no-seccomp"]).warnings.is_empty());
        for (v, level) in [
            ("0", Level::Off),
            ("1", Level::Numbers),
            ("2", Level::Arguments),
        ] {
            assert_eq!(launch(&["--seccomp-level", v]).seccomp_level, level);
        }
    }

    #[test]
    fn firecracker_defaults_socket_and_id() {
        let l = launch(&[]);
        assert_eq!(
            l.api_sock.as_deref(),
            Some(std::path::Path::new(DEFAULT_API_SOCK))
        );
        assert_eq!(l.id, "anonymous-instance");
        let l = launch(&["--config-file", "/vm.json", "--no-api"]);
        assert_eq!(l.api_sock, None);
    }

    #[test]
    fn flags_without_effect_warn_and_snapshot_flags_are_refused() {
        let l = launch(&["--boot-timer", "--mmds-size-limit", "4096"]);
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        assert!(l.warnings.iter().all(|w| !w.contains('\n')));
        assert!(l.warnings[0].starts_with("--boot-timer: "));
        // The MMDS flags are taken.
        assert_eq!(l.mmds_size_limit, Some(4096));
        let l = launch(&["--metadata", "/m.json"]);
        assert_eq!(l.metadata.as_deref(), Some(std::path::Path::new("/m.json")));
        assert!(matches!(
            firecracker(&["--version"]),
            Ok(FirecrackerMode::PrintVersion)
        ));
        assert!(matches!(
            firecracker(&["--snapshot-version"]),
            Ok(FirecrackerMode::PrintSnapshotVersion)
        ));
        assert!(matches!(
            firecracker(&["--describe-snapshot", "/s"]),
            Ok(FirecrackerMode::DescribeSnapshot(p)) if p == std::path::Path::new("/s")
        ));
        for (args, expected) in [
            (&["--enable-pci"][..], "--enable-pci: wisp has no PCI"),
            (&["--no-api"], "--no-api: without the API"),
            (
                &["--no-seccomp", "--seccomp-filter", "/f"],
                "--seccomp-filter: --seccomp-filter and --no-seccomp exclude each other",
            ),
            (
                &["--seccomp-filter", "/f.bpf"],
                "--seccomp-filter: wisp does not load compiled BPF files",
            ),
            (
                &["--no-seccomp", "--seccomp-level", "1"],
                "--no-seccomp: --no-seccomp and --seccomp-level exclude each other",
            ),
            (
                &["--seccomp-level", "7"],
                "--seccomp-level: invalid seccomp level '7'",
            ),
            (&["--id", "a_b"], "--id: \"a_b\" is not a valid id"),
            (&["--level", "loud"], "--level: unknown level \"loud\""),
            (
                &["--start-time-us", "-1"],
                "--start-time-us: \"-1\" is not a whole number",
            ),
            (
                &["--http-api-max-payload-size", "0"],
                "--http-api-max-payload-size: must be at least",
            ),
            (
                &["--mmds-size-limit", "x"],
                "--mmds-size-limit: \"x\" is not a whole number",
            ),
        ] {
            let e = firecracker(args).unwrap_err();
            assert!(e.starts_with(expected.split(':').next().unwrap()), "{e}");
            assert!(
                e.contains(expected.rsplit(": ").next().unwrap()),
                "{args:?}: {e}"
            );
        }
    }

    fn kernel() -> String {
        format!("{}/Cargo.toml", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn flags_become_a_config() {
        let k = kernel();
        let c = parse(&[
            "--kernel",
            &k,
            "--cpus",
            "4",
            "--memory",
            "1G",
            "--console",
            "none",
        ])
        .unwrap();
        assert_eq!(c.cpus, 4);
        assert_eq!(c.memory, MemSize(1 << 30));
        assert_eq!(c.console, ConsoleConfig::None);
        assert_eq!(c.cmdline, config::DEFAULT_CMDLINE);
    }

    #[test]
    fn vsock_flag_becomes_the_vsock_device_and_bad_values_are_named() {
        let k = kernel();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let uds = dir.as_path().join("v.sock");
        let spec = format!("cid=7,uds={}", uds.display());
        let c = parse(&["--kernel", &k, "--vsock", &spec]).unwrap();
        let v = c.vsock.unwrap();
        assert_eq!((v.guest_cid, v.uds_path), (7, uds));
        let e = parse(&["--kernel", &k, "--vsock", "cid=1,uds=/tmp/x.sock"]).unwrap_err();
        assert_eq!(e, "vsock: guest_cid 1 is reserved; use 3 or more");
        let file = dir.as_path().join("file");
        std::fs::write(&file, "x").unwrap();
        let e = parse(&[
            "--kernel",
            &k,
            "--vsock",
            &format!("cid=3,uds={}", file.display()),
        ])
        .unwrap_err();
        assert!(e.contains("exists and is not a Unix socket"), "{e}");
    }

    #[test]
    fn entropy_is_on_unless_turned_off() {
        let k = kernel();
        assert!(parse(&["--kernel", &k]).unwrap().entropy);
        assert!(parse(&["--kernel", &k, "--entropy", "on"]).unwrap().entropy);
        assert!(
            !parse(&["--kernel", &k, "--entropy", "off"])
                .unwrap()
                .entropy
        );
        assert_eq!(
            parse(&["--kernel", &k, "--entropy", "maybe"]).unwrap_err(),
            "--entropy: \"maybe\": use on or off"
        );
        // It is one of the 19 virtio devices the platform has room for.
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let disks: Vec<String> = (0..19)
            .map(|i| {
                let p = dir.as_path().join(format!("d{i}"));
                std::fs::write(&p, [0u8; 512]).unwrap();
                format!("path={}", p.display())
            })
            .collect();
        let mut args = vec!["--kernel", &k];
        for d in &disks {
            args.extend(["--disk", d]);
        }
        let e = parse(&args).unwrap_err();
        assert!(e.contains("20 were asked for"), "{e}");
        args.extend(["--entropy", "off"]);
        assert_eq!(parse(&args).unwrap().disks.len(), 19);
    }

    #[test]
    fn bad_values_name_the_problem() {
        let k = kernel();
        assert_eq!(
            parse(&["--kernel", &k, "--cpus", "0"]).unwrap_err(),
            "cpus must be between 1 and 32, got 0"
        );
        assert_eq!(
            parse(&["--kernel", &k, "--cpus", "1000"]).unwrap_err(),
            "cpus must be between 1 and 32, got 1000"
        );
        assert_eq!(
            parse(&["--kernel", &k, "--memory", "1K"]).unwrap_err(),
            "memory must be between 64 MiB and 1 TiB, got 1K"
        );
        assert!(parse(&["--kernel", &k, "--memory", "lots"])
            .unwrap_err()
            .starts_with("--memory: invalid memory size"));
        assert!(parse(&[]).unwrap_err().starts_with("no kernel given"));
    }

    #[test]
    fn config_file_with_flag_override() {
        let dir = std::env::temp_dir().join(format!("wisp-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vm.json");
        std::fs::write(
            &file,
            format!(
                r#"{{"kernel": "{}", "cpus": 2, "memory": "256M"}}"#,
                kernel()
            ),
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = parse(&["--config", f]).unwrap();
        assert_eq!((c.cpus, c.memory), (2, MemSize(256 << 20)));
        let c = parse(&["--config", f, "--cpus", "3"]).unwrap();
        assert_eq!(c.cpus, 3);
        std::fs::write(&file, r#"{"kernel": "/k", "bogus": 1}"#).unwrap();
        assert!(parse(&["--config", f])
            .unwrap_err()
            .contains("unknown field `bogus`"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
