//! What the user asked for: cgroup parent, CPU cap, cpuset and per-vCPU pinning, as plain serde
//! types, parsed from the CLI forms and validated before any cgroup is touched.

use std::fmt;
use std::path::{Component, Path};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Error;

/// The CFS bandwidth period the kernel uses when none is given (µs).
pub const DEFAULT_PERIOD_US: u64 = 100_000;
/// The kernel's bounds on the CFS period (kernel/sched/core.c: min 1 ms, max 1 s).
pub const MIN_PERIOD_US: u64 = 1_000;
pub const MAX_PERIOD_US: u64 = 1_000_000;
/// The kernel rejects a quota under 1 ms (min_cfs_quota_period).
pub const MIN_QUOTA_US: u64 = 1_000;
/// Highest CPU number accepted in a list: `cpu_set_t` holds `CPU_SETSIZE` (1024) CPUs.
pub const MAX_CPU: u32 = 1023;
/// Longest VM name accepted in a cgroup name.
pub const MAX_VM_NAME: usize = 64;

/// The user's cgroup settings for one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupSpec {
    /// Where the VM's group is created: a path under a cgroup mount
    /// (`/sys/fs/cgroup/cpu/machines`) or a name relative to each controller's hierarchy
    /// (`machines`); empty or `/` is the hierarchy root. It must exist.
    pub parent: String,
    /// Cap on the CPU time of all vCPU threads together.
    #[serde(default)]
    pub cpu_max: Option<CpuMax>,
    /// Host CPUs the vCPU threads may run on.
    #[serde(default)]
    pub cpuset: Option<CpuList>,
    /// Per-vCPU pinning to one host CPU each.
    #[serde(default)]
    pub affinity: Option<Affinity>,
}

impl CgroupSpec {
    /// Checks the settings against this host's online CPUs, before any cgroup is touched.
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_with_online(&CpuList::online()?)
    }

    /// Checks that every pinned vCPU index exists in a VM of `vcpu_count` vCPUs.
    pub fn validate_vcpu_count(&self, vcpu_count: usize) -> Result<(), Error> {
        if let Some(affinity) = &self.affinity {
            if let Some(pin) = affinity.0.iter().find(|p| p.vcpu >= vcpu_count) {
                return Err(Error::VcpuOutOfRange {
                    vcpu: pin.vcpu,
                    vcpu_count,
                });
            }
        }
        Ok(())
    }

    pub(crate) fn validate_with_online(&self, online: &CpuList) -> Result<(), Error> {
        check_parent(&self.parent)?;
        if let Some(cpu_max) = &self.cpu_max {
            cpu_max.validate()?;
        }
        if let Some(cpuset) = &self.cpuset {
            cpuset.check_online("cpuset", online)?;
        }
        if let Some(affinity) = &self.affinity {
            affinity.validate(online, self.cpuset.as_ref())?;
        }
        Ok(())
    }
}

/// Rejects parents that could escape the hierarchy (`..`) or are not plain paths.
fn check_parent(parent: &str) -> Result<(), Error> {
    let bad = |reason: &str| Error::InvalidParent {
        parent: parent.to_string(),
        reason: reason.to_string(),
    };
    if parent.contains('\0') || parent.contains('\n') {
        return Err(bad("contains a NUL or newline character"));
    }
    for c in Path::new(parent).components() {
        match c {
            Component::ParentDir | Component::CurDir => {
                return Err(bad("must not contain `.` or `..` components"))
            }
            Component::Prefix(_) => return Err(bad("not a Linux path")),
            Component::RootDir | Component::Normal(_) => {}
        }
    }
    Ok(())
}

/// Checks a VM name used in the group name `wisp-<name>-<pid>-<start>`.
pub(crate) fn check_vm_name(name: &str) -> Result<(), Error> {
    let bad = |reason: &str| Error::InvalidVmName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.len() > MAX_VM_NAME {
        return Err(bad("is longer than 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(bad("may only contain letters, digits, `_`, `-` and `.`"));
    }
    Ok(())
}

/// CFS bandwidth: `quota_us` of CPU time per `period_us`, shared by all vCPU threads.
/// `quota_us: None` is no cap ("max").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuMax {
    pub quota_us: Option<u64>,
    #[serde(default = "default_period")]
    pub period_us: u64,
}

fn default_period() -> u64 {
    DEFAULT_PERIOD_US
}

impl CpuMax {
    /// No cap, default period.
    pub const UNLIMITED: CpuMax = CpuMax {
        quota_us: None,
        period_us: DEFAULT_PERIOD_US,
    };

    /// Parses a number of CPUs ("0.5" = half of one CPU, "2" = two CPUs) into a quota over
    /// the default period.
    pub fn parse_cpus(s: &str) -> Result<CpuMax, Error> {
        let bad = |reason: &str| Error::InvalidCpuMax {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let cpus: f64 = s
            .trim()
            .parse()
            .map_err(|_| bad("expected a number of CPUs such as 0.5"))?;
        if !cpus.is_finite() || cpus <= 0.0 {
            return Err(bad("the number of CPUs must be greater than 0"));
        }
        if cpus > f64::from(MAX_CPU + 1) {
            return Err(bad("more CPUs than any host has"));
        }
        // cpus is positive and at most MAX_CPU + 1, checked above.
        #[allow(clippy::cast_possible_truncation)]
        let quota = (cpus * DEFAULT_PERIOD_US as f64).round() as u64;
        let max = CpuMax {
            quota_us: Some(quota),
            period_us: DEFAULT_PERIOD_US,
        };
        max.validate()?;
        Ok(max)
    }

    /// Checks the kernel's limits: period within 1 ms..=1 s, quota at least 1 ms.
    pub fn validate(&self) -> Result<(), Error> {
        if !(MIN_PERIOD_US..=MAX_PERIOD_US).contains(&self.period_us) {
            return Err(Error::PeriodOutOfRange {
                period_us: self.period_us,
            });
        }
        if let Some(quota) = self.quota_us {
            if quota < MIN_QUOTA_US {
                return Err(Error::QuotaTooSmall { quota_us: quota });
            }
            // The kernel keeps the quota in ns in a u64, with headroom; stay far below.
            if quota > u64::from(u32::MAX) * 1000 {
                return Err(Error::InvalidCpuMax {
                    input: self.to_string(),
                    reason: "quota too large".to_string(),
                });
            }
        }
        Ok(())
    }
}

/// "QUOTA/PERIOD", "max/PERIOD", "QUOTA" (default period) or "max".
impl FromStr for CpuMax {
    type Err = Error;

    fn from_str(s: &str) -> Result<CpuMax, Error> {
        let bad = |reason: &str| Error::InvalidCpuMax {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (quota, period) = match s.trim().split_once('/') {
            Some((q, p)) => (q.trim(), Some(p.trim())),
            None => (s.trim(), None),
        };
        if quota.contains('.') {
            return Err(bad(
                "expected QUOTA/PERIOD in microseconds; for a fraction of a CPU use the cpus form (0.5)",
            ));
        }
        let quota_us = if quota == "max" {
            None
        } else {
            Some(
                quota
                    .parse::<u64>()
                    .map_err(|_| bad("QUOTA must be an integer number of microseconds or `max`"))?,
            )
        };
        let period_us = match period {
            Some(p) => p
                .parse::<u64>()
                .map_err(|_| bad("PERIOD must be an integer number of microseconds"))?,
            None => DEFAULT_PERIOD_US,
        };
        let max = CpuMax {
            quota_us,
            period_us,
        };
        max.validate()?;
        Ok(max)
    }
}

impl fmt::Display for CpuMax {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.quota_us {
            Some(q) => write!(f, "{}/{}", q, self.period_us),
            None => write!(f, "max/{}", self.period_us),
        }
    }
}

/// A set of host CPUs in the kernel's list format ("0-1,3"), kept sorted and deduplicated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuList(Vec<u32>);

impl CpuList {
    pub fn new(mut cpus: Vec<u32>) -> CpuList {
        cpus.sort_unstable();
        cpus.dedup();
        CpuList(cpus)
    }

    pub fn cpus(&self) -> &[u32] {
        &self.0
    }

    pub fn contains(&self, cpu: u32) -> bool {
        self.0.binary_search(&cpu).is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The host's online CPUs (/sys/devices/system/cpu/online).
    pub fn online() -> Result<CpuList, Error> {
        const ONLINE: &str = "/sys/devices/system/cpu/online";
        let text = std::fs::read_to_string(ONLINE).map_err(|source| Error::Io {
            op: "read",
            path: ONLINE.into(),
            source,
        })?;
        text.trim().parse().map_err(|_| Error::BadKernelFile {
            path: ONLINE.into(),
            content: text.trim().to_string(),
        })
    }

    pub(crate) fn check_online(&self, what: &'static str, online: &CpuList) -> Result<(), Error> {
        if self.is_empty() {
            return Err(Error::InvalidCpuList {
                input: String::new(),
                reason: format!("the {what} must name at least one CPU"),
            });
        }
        match self.0.iter().find(|c| !online.contains(**c)) {
            Some(cpu) => Err(Error::CpuNotOnline {
                what,
                cpu: *cpu,
                online: online.to_string(),
            }),
            None => Ok(()),
        }
    }
}

impl FromStr for CpuList {
    type Err = Error;

    fn from_str(s: &str) -> Result<CpuList, Error> {
        let bad = |reason: String| Error::InvalidCpuList {
            input: s.to_string(),
            reason,
        };
        let parse_cpu = |t: &str| -> Result<u32, Error> {
            let cpu: u32 = t
                .trim()
                .parse()
                .map_err(|_| bad(format!("`{}` is not a CPU number", t.trim())))?;
            if cpu > MAX_CPU {
                return Err(bad(format!("CPU {cpu} is above {MAX_CPU}")));
            }
            Ok(cpu)
        };
        let mut cpus = Vec::new();
        if s.trim().is_empty() {
            return Ok(CpuList(cpus));
        }
        for part in s.trim().split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (parse_cpu(a)?, parse_cpu(b)?);
                    if a > b {
                        return Err(bad(format!("range {a}-{b} is reversed")));
                    }
                    cpus.extend(a..=b);
                }
                None => cpus.push(parse_cpu(part)?),
            }
        }
        Ok(CpuList::new(cpus))
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

impl Serialize for CpuList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CpuList, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One vCPU pinned to one host CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuPin {
    pub vcpu: usize,
    pub host_cpu: u32,
}

/// Per-vCPU pinning, parsed from "VCPU:HOSTCPU,..." ("0:1,1:0").
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Affinity(pub Vec<VcpuPin>);

impl Affinity {
    pub fn host_cpu(&self, vcpu: usize) -> Option<u32> {
        self.0.iter().find(|p| p.vcpu == vcpu).map(|p| p.host_cpu)
    }

    fn validate(&self, online: &CpuList, cpuset: Option<&CpuList>) -> Result<(), Error> {
        for (i, pin) in self.0.iter().enumerate() {
            if self.0[..i].iter().any(|p| p.vcpu == pin.vcpu) {
                return Err(Error::DuplicateVcpu { vcpu: pin.vcpu });
            }
            if pin.host_cpu > MAX_CPU || !online.contains(pin.host_cpu) {
                return Err(Error::CpuNotOnline {
                    what: "affinity",
                    cpu: pin.host_cpu,
                    online: online.to_string(),
                });
            }
            if let Some(cpuset) = cpuset {
                check_pin_in_cpuset(pin, cpuset)?;
            }
        }
        Ok(())
    }
}

pub(crate) fn check_pin_in_cpuset(pin: &VcpuPin, cpuset: &CpuList) -> Result<(), Error> {
    if cpuset.contains(pin.host_cpu) {
        Ok(())
    } else {
        Err(Error::AffinityOutsideCpuset {
            vcpu: pin.vcpu,
            host_cpu: pin.host_cpu,
            cpuset: cpuset.to_string(),
        })
    }
}

impl FromStr for Affinity {
    type Err = Error;

    fn from_str(s: &str) -> Result<Affinity, Error> {
        let bad = |reason: String| Error::InvalidAffinity {
            input: s.to_string(),
            reason,
        };
        let mut pins = Vec::new();
        for part in s.trim().split(',') {
            let (v, c) = part
                .split_once(':')
                .ok_or_else(|| bad(format!("`{}` is not VCPU:HOSTCPU", part.trim())))?;
            let vcpu = v
                .trim()
                .parse()
                .map_err(|_| bad(format!("`{}` is not a vCPU index", v.trim())))?;
            let host_cpu = c
                .trim()
                .parse()
                .map_err(|_| bad(format!("`{}` is not a host CPU number", c.trim())))?;
            pins.push(VcpuPin { vcpu, host_cpu });
        }
        Ok(Affinity(pins))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online() -> CpuList {
        "0-3".parse().unwrap()
    }

    #[test]
    fn cpu_list_parses_ranges_and_prints_canonically() {
        let l: CpuList = "3,0-1, 1 ,7-9".parse().unwrap();
        assert_eq!(l.cpus(), &[0, 1, 3, 7, 8, 9]);
        assert_eq!(l.to_string(), "0-1,3,7-9");
        assert_eq!("5".parse::<CpuList>().unwrap().to_string(), "5");
        assert!("".parse::<CpuList>().unwrap().is_empty());
    }

    #[test]
    fn cpu_list_rejects_garbage() {
        for bad in ["a", "1-", "3-1", "0,,1", "-1", "99999", "0-5000"] {
            let err = bad.parse::<CpuList>().unwrap_err();
            assert!(matches!(err, Error::InvalidCpuList { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn cpu_max_parses_quota_period_forms() {
        let m: CpuMax = "20000/100000".parse().unwrap();
        assert_eq!(m.quota_us, Some(20000));
        assert_eq!(m.period_us, 100000);
        assert_eq!("max".parse::<CpuMax>().unwrap(), CpuMax::UNLIMITED);
        assert_eq!(
            "max/50000".parse::<CpuMax>().unwrap(),
            CpuMax {
                quota_us: None,
                period_us: 50000
            }
        );
        assert_eq!(
            "30000".parse::<CpuMax>().unwrap().period_us,
            DEFAULT_PERIOD_US
        );
        assert_eq!(m.to_string(), "20000/100000");
    }

    #[test]
    fn cpu_max_parses_fraction_of_cpus() {
        let m = CpuMax::parse_cpus("0.5").unwrap();
        assert_eq!(m.quota_us, Some(50_000));
        assert_eq!(m.period_us, 100_000);
        assert_eq!(CpuMax::parse_cpus("2").unwrap().quota_us, Some(200_000));
        assert_eq!(CpuMax::parse_cpus("0.2").unwrap().quota_us, Some(20_000));
        assert!(matches!(
            CpuMax::parse_cpus("0").unwrap_err(),
            Error::InvalidCpuMax { .. }
        ));
        assert!(matches!(
            CpuMax::parse_cpus("-1").unwrap_err(),
            Error::InvalidCpuMax { .. }
        ));
        assert!(matches!(
            CpuMax::parse_cpus("NaN").unwrap_err(),
            Error::InvalidCpuMax { .. }
        ));
        // 0.005 CPU is 500 µs per 100 ms, below the kernel's 1 ms minimum quota.
        assert!(matches!(
            CpuMax::parse_cpus("0.005").unwrap_err(),
            Error::QuotaTooSmall { quota_us: 500 }
        ));
    }

    #[test]
    fn cpu_max_rejects_quota_zero_and_period_out_of_range() {
        assert!(matches!(
            "0/100000".parse::<CpuMax>().unwrap_err(),
            Error::QuotaTooSmall { quota_us: 0 }
        ));
        assert!(matches!(
            "10000/999".parse::<CpuMax>().unwrap_err(),
            Error::PeriodOutOfRange { period_us: 999 }
        ));
        assert!(matches!(
            "10000/1000001".parse::<CpuMax>().unwrap_err(),
            Error::PeriodOutOfRange {
                period_us: 1_000_001
            }
        ));
        assert!("1000/1000".parse::<CpuMax>().is_ok());
        assert!("max/1000000".parse::<CpuMax>().is_ok());
        for bad in ["0.5/100000", "x/100", "10/y", ""] {
            assert!(bad.parse::<CpuMax>().is_err(), "{bad}");
        }
    }

    #[test]
    fn affinity_parses_pairs() {
        let a: Affinity = "0:1, 1:0".parse().unwrap();
        assert_eq!(
            a.0,
            vec![
                VcpuPin {
                    vcpu: 0,
                    host_cpu: 1
                },
                VcpuPin {
                    vcpu: 1,
                    host_cpu: 0
                }
            ]
        );
        assert_eq!(a.host_cpu(1), Some(0));
        assert_eq!(a.host_cpu(2), None);
        for bad in ["0", "0:", ":1", "a:1", "0:1,", "0-1"] {
            assert!(
                matches!(
                    bad.parse::<Affinity>().unwrap_err(),
                    Error::InvalidAffinity { .. }
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn validate_catches_bad_settings() {
        let spec = |cpuset: Option<&str>, affinity: Option<&str>| CgroupSpec {
            parent: "machines".into(),
            cpu_max: None,
            cpuset: cpuset.map(|s| s.parse().unwrap()),
            affinity: affinity.map(|s| s.parse().unwrap()),
        };
        assert!(spec(Some("0-3"), Some("0:1,1:0"))
            .validate_with_online(&online())
            .is_ok());
        assert!(matches!(
            spec(Some("2-4"), None).validate_with_online(&online()),
            Err(Error::CpuNotOnline {
                what: "cpuset",
                cpu: 4,
                ..
            })
        ));
        assert!(matches!(
            spec(None, Some("0:9")).validate_with_online(&online()),
            Err(Error::CpuNotOnline {
                what: "affinity",
                cpu: 9,
                ..
            })
        ));
        assert!(matches!(
            spec(None, Some("0:1,0:2")).validate_with_online(&online()),
            Err(Error::DuplicateVcpu { vcpu: 0 })
        ));
        assert!(matches!(
            spec(Some("1"), Some("0:1,1:2")).validate_with_online(&online()),
            Err(Error::AffinityOutsideCpuset {
                vcpu: 1,
                host_cpu: 2,
                ..
            })
        ));
        let mut s = spec(None, Some("0:1,3:0"));
        assert!(s.validate_vcpu_count(4).is_ok());
        assert!(matches!(
            s.validate_vcpu_count(2),
            Err(Error::VcpuOutOfRange {
                vcpu: 3,
                vcpu_count: 2
            })
        ));
        s.cpu_max = Some(CpuMax {
            quota_us: Some(0),
            period_us: 100_000,
        });
        assert!(matches!(
            s.validate_with_online(&online()),
            Err(Error::QuotaTooSmall { quota_us: 0 })
        ));
        s.cpu_max = Some(CpuMax {
            quota_us: Some(5000),
            period_us: 10,
        });
        assert!(matches!(
            s.validate_with_online(&online()),
            Err(Error::PeriodOutOfRange { period_us: 10 })
        ));
        s.cpu_max = None;
        s.parent = "/sys/fs/cgroup/cpu/../memory".into();
        assert!(matches!(
            s.validate_with_online(&online()),
            Err(Error::InvalidParent { .. })
        ));
    }

    #[test]
    fn vm_names_are_checked() {
        assert!(check_vm_name("vm-1.test_a").is_ok());
        for bad in ["", "a/b", "a b", "x\n", &"v".repeat(65)] {
            assert!(check_vm_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spec_round_trips_through_json() {
        let json = r#"{"parent":"machines","cpu_max":{"quota_us":20000,"period_us":100000},
            "cpuset":"0-1","affinity":[{"vcpu":0,"host_cpu":1}]}"#;
        let spec: CgroupSpec = serde_json::from_str(json).unwrap();
        assert_eq!(spec.cpuset.as_ref().unwrap().cpus(), &[0, 1]);
        assert_eq!(spec.cpu_max.unwrap().quota_us, Some(20000));
        let back: CgroupSpec =
            serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        assert!(serde_json::from_str::<CgroupSpec>(r#"{"parent":"x","cpuset":"9-1"}"#).is_err());
        let unlimited: CpuMax = serde_json::from_str(r#"{"quota_us":null}"#).unwrap();
        assert_eq!(unlimited, CpuMax::UNLIMITED);
    }
}
