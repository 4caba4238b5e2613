//! wisp's cgroup bodies: `machine-config.cgroup` before boot and `PATCH /vm/cgroup` after,
//! with the CLI's string forms of the limits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ApiFault;
use crate::cgroup::{Affinity, CgroupSpec, CpuList, CpuMax};

/// wisp's `machine-config.cgroup`: the vCPU threads' cgroup, in the CLI's string forms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupConfig {
    /// Parent group: a path under a cgroup mount or a name relative to the hierarchies;
    /// empty is the hierarchy root.
    #[serde(default)]
    pub parent: String,
    /// `"QUOTA/PERIOD"` in µs (`"20000/100000"`), `"QUOTA"` or `"max"`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_opt_display"
    )]
    pub cpu_max: Option<CpuMax>,
    /// Host CPUs in the kernel's list format (`"0-1,3"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuset: Option<CpuList>,
    /// Per-vCPU pinning `"VCPU:HOSTCPU,..."` (`"0:2,1:3"`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_from_str",
        serialize_with = "ser_opt_affinity"
    )]
    pub affinity: Option<Affinity>,
}

impl CgroupConfig {
    pub fn to_spec(&self) -> CgroupSpec {
        CgroupSpec {
            parent: self.parent.clone(),
            cpu_max: self.cpu_max,
            cpuset: self.cpuset.clone(),
            affinity: self.affinity.clone(),
        }
    }

    pub(super) fn validate_vcpu_count(&self, vcpu_count: u64) -> Result<(), ApiFault> {
        let n = usize::try_from(vcpu_count).unwrap_or(usize::MAX);
        self.to_spec()
            .validate_vcpu_count(n)
            .map_err(|e| ApiFault::bad_request(format!("cgroup.affinity: {e}")))
    }
}

/// wisp: `PATCH /vm/cgroup`, new limits for the running VM's vCPU cgroup. A field left out
/// stays as it is; `null` removes the limit (`cpu_max` becomes `max`, `cpuset` the parent's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupUpdate {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_nullable_from_str",
        serialize_with = "ser_nullable_display"
    )]
    pub cpu_max: Option<Option<CpuMax>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_nullable_from_str",
        serialize_with = "ser_nullable_display"
    )]
    pub cpuset: Option<Option<CpuList>>,
}

impl CgroupUpdate {
    pub fn validate(&self) -> Result<(), ApiFault> {
        if self.cpu_max.is_none() && self.cpuset.is_none() {
            return Err(ApiFault::bad_request(
                "nothing to change: give cpu_max and/or cpuset (null removes a limit)",
            ));
        }
        if let Some(Some(m)) = &self.cpu_max {
            m.validate()
                .map_err(|e| ApiFault::bad_request(format!("cpu_max: {e}")))?;
        }
        if let Some(Some(c)) = &self.cpuset {
            if c.is_empty() {
                return Err(ApiFault::bad_request("cpuset: empty CPU list"));
            }
        }
        Ok(())
    }
}

// serde helpers for the string forms of the cgroup types.

fn de_opt_from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn de_nullable_from_str<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(Some(None)),
        Some(s) => s
            .parse()
            .map(|v| Some(Some(v)))
            .map_err(serde::de::Error::custom),
    }
}

fn ser_opt_display<S: Serializer, T: fmt::Display>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn ser_nullable_display<S: Serializer, T: fmt::Display>(
    v: &Option<Option<T>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(Some(v)) => s.collect_str(v),
        _ => s.serialize_none(),
    }
}

fn ser_opt_affinity<S: Serializer>(v: &Option<Affinity>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(a) => {
            let text: Vec<String> =
                a.0.iter()
                    .map(|p| format!("{}:{}", p.vcpu, p.host_cpu))
                    .collect();
            s.serialize_str(&text.join(","))
        }
        None => s.serialize_none(),
    }
}
