//! The command line. Flags become a `VmConfig`; nothing below this module sees them.

use crate::config::{self, ConfigError, ConsoleConfig, DiskConfig, MemSize, NetConfig, VmConfig};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "wisp",
    version,
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
    /// Serve the control API (Firecracker-compatible REST) on this Unix socket and wait for
    /// the VM to be configured and started through it.
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    pub api_sock: Option<std::path::PathBuf>,
    /// The VM's id (GET /, cgroup names) [default: anonymous-instance].
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Boot from a Firecracker-style config file (boot-source, machine-config, drives,
    /// network-interfaces, plus wisp's fields); with --api-sock the API keeps serving.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<std::path::PathBuf>,
    /// With --config-file: serve no API.
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a VM and run it until the guest powers off, reboots or crashes.
    Run(Box<RunArgs>),
    /// Create and inspect disk images (qcow2, raw).
    #[command(subcommand)]
    Image(crate::image::ImageCommand),
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
    /// path=FILE[,readonly=on][,serial=ID][,format=raw|qcow2]. Without format, wisp probes
    /// and refuses a probed qcow2 image that names a backing file. Given here, the disks
    /// replace those of the config file.
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
}

impl RunArgs {
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
