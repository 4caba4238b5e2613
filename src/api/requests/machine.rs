//! `PUT`/`PATCH /machine-config`: vCPUs, memory, SMT, huge pages and the vCPU cgroup.

use serde::{Deserialize, Serialize};

use super::{ApiFault, CgroupConfig};
use crate::config::{MAX_MEMORY, MAX_VCPUS, MIN_MEMORY};

/// `PUT /machine-config` (and the `machine-config` of a config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// 1 to 32.
    pub vcpu_count: u64,
    /// At least 64, at most 1 TiB in MiB.
    pub mem_size_mib: u64,
    /// Two threads per core in the guest's CPUID topology (vcpu_count 1 or even).
    #[serde(default)]
    pub smt: bool,
    /// Accepted and recorded; wisp has no snapshots, so it has no effect.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Only `"None"` is accepted (wisp has no CPU templates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// `"None"` or `"2M"`: guest memory on the host's 2 MiB huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
    /// wisp: confine the vCPU threads in a cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupConfig>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: crate::config::DEFAULT_MEMORY >> 20,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
            cgroup: None,
        }
    }
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ApiFault> {
        check_vcpu_count(self.vcpu_count)?;
        check_mem_size(self.mem_size_mib)?;
        check_smt(self.smt, self.vcpu_count)?;
        check_none_only(
            "cpu_template",
            self.cpu_template.as_deref(),
            "CPU templates",
        )?;
        check_huge_pages(self.huge_pages.as_deref(), self.mem_size_mib)?;
        if let Some(cg) = &self.cgroup {
            cg.validate_vcpu_count(self.vcpu_count)?;
        }
        Ok(())
    }

    /// The result of a PATCH: the fields given replace the current ones.
    pub fn patched(&self, update: &MachineConfigUpdate) -> Result<MachineConfig, ApiFault> {
        let mut m = self.clone();
        if let Some(v) = update.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = update.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = update.smt {
            m.smt = v;
        }
        if let Some(v) = update.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = &update.cpu_template {
            m.cpu_template = Some(v.clone());
        }
        if let Some(v) = &update.huge_pages {
            m.huge_pages = Some(v.clone());
        }
        if let Some(v) = &update.cgroup {
            m.cgroup = Some(v.clone());
        }
        m.validate()?;
        Ok(m)
    }
}

/// `PATCH /machine-config`: every field optional, the ones given replace the current values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupConfig>,
}

impl MachineConfigUpdate {
    pub fn validate(&self) -> Result<(), ApiFault> {
        if let Some(v) = self.vcpu_count {
            check_vcpu_count(v)?;
        }
        if let Some(v) = self.mem_size_mib {
            check_mem_size(v)?;
        }
        if let (Some(smt), Some(n)) = (self.smt, self.vcpu_count) {
            check_smt(smt, n)?;
        }
        check_none_only(
            "cpu_template",
            self.cpu_template.as_deref(),
            "CPU templates",
        )?;
        check_huge_pages(self.huge_pages.as_deref(), self.mem_size_mib.unwrap_or(2))?;
        Ok(())
    }
}

impl MachineConfig {
    /// Whether guest memory is to be on 2 MiB huge pages.
    pub fn huge_pages_2m(&self) -> bool {
        self.huge_pages.as_deref() == Some("2M")
    }
}

fn check_vcpu_count(n: u64) -> Result<(), ApiFault> {
    if n == 0 || n > u64::from(MAX_VCPUS) {
        return Err(ApiFault::bad_request(format!(
            "vcpu_count: must be between 1 and {MAX_VCPUS}, got {n}"
        )));
    }
    Ok(())
}

fn check_mem_size(mib: u64) -> Result<(), ApiFault> {
    let (min, max) = (MIN_MEMORY >> 20, MAX_MEMORY >> 20);
    if !(min..=max).contains(&mib) {
        return Err(ApiFault::bad_request(format!(
            "mem_size_mib: must be between {min} and {max}, got {mib}"
        )));
    }
    Ok(())
}

/// Firecracker's rule: with SMT (two threads per core) the vCPU count is 1 or even.
fn check_smt(smt: bool, vcpu_count: u64) -> Result<(), ApiFault> {
    if smt && vcpu_count > 1 && !vcpu_count.is_multiple_of(2) {
        return Err(ApiFault::bad_request(format!(
            "smt: true puts two threads on each core, so vcpu_count must be 1 or even, got \
             {vcpu_count}"
        )));
    }
    Ok(())
}

/// Firecracker's `huge_pages`: `"None"` or `"2M"` (2 MiB hugetlbfs pages, which need the
/// memory size to be a multiple of 2 MiB).
fn check_huge_pages(v: Option<&str>, mem_size_mib: u64) -> Result<(), ApiFault> {
    match v {
        None | Some("None") => Ok(()),
        Some("2M") if mem_size_mib.is_multiple_of(2) => Ok(()),
        Some("2M") => Err(ApiFault::bad_request(format!(
            "huge_pages: \"2M\" needs mem_size_mib to be a multiple of 2, got {mem_size_mib}"
        ))),
        Some(other) => Err(ApiFault::bad_request(format!(
            "huge_pages: {other:?} is not a huge page size wisp knows; send \"None\" or \"2M\""
        ))),
    }
}

fn check_none_only(field: &str, v: Option<&str>, what: &str) -> Result<(), ApiFault> {
    match v {
        None | Some("None") => Ok(()),
        Some(other) => Err(ApiFault::bad_request(format!(
            "{field}: {other:?} is not supported (wisp has no {what}); send \"None\" or leave it out"
        ))),
    }
}
