//! `PUT /snapshot/create` and `PUT /snapshot/load` (Firecracker's `SnapshotCreateParams` and
//! `SnapshotLoadParams`). wisp takes Full snapshots only: it tracks no dirty pages, so Diff
//! snapshots and dirty-page tracking are refused by name.

use super::check_id;
use crate::api::ApiFault;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/create` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: PathBuf,
}

/// A tap for the restored VM's interface `iface_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `PUT /snapshot/load` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    /// Firecracker's older way of naming the memory file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
}

fn non_empty(field: &str, p: &Path) -> Result<(), ApiFault> {
    if p.as_os_str().is_empty() {
        return Err(ApiFault::bad_request(format!("{field}: empty path")));
    }
    Ok(())
}

impl SnapshotCreate {
    pub fn validate(&self) -> Result<(), ApiFault> {
        if self.snapshot_type == SnapshotType::Diff {
            return Err(ApiFault::bad_request(
                "snapshot_type: Diff snapshots are not supported (wisp tracks no dirty pages); \
                 take a Full snapshot",
            ));
        }
        non_empty("snapshot_path", &self.snapshot_path)?;
        non_empty("mem_file_path", &self.mem_file_path)
    }
}

impl SnapshotLoad {
    pub fn validate(&self) -> Result<(), ApiFault> {
        non_empty("snapshot_path", &self.snapshot_path)?;
        if self.enable_diff_snapshots || self.track_dirty_pages {
            return Err(ApiFault::bad_request(
                "enable_diff_snapshots/track_dirty_pages: not supported (wisp tracks no dirty \
                 pages)",
            ));
        }
        self.mem_path()?;
        for o in &self.network_overrides {
            check_id("iface_id", &o.iface_id)?;
            // The tap name is checked with the rest of the restored config.
            if o.host_dev_name.is_empty() {
                return Err(ApiFault::bad_request(
                    "network_overrides: host_dev_name is empty",
                ));
            }
        }
        Ok(())
    }

    /// The memory file: `mem_backend` (File) or `mem_file_path`, exactly one of them.
    pub fn mem_path(&self) -> Result<&Path, ApiFault> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(b), None) => {
                if b.backend_type == MemBackendType::Uffd {
                    return Err(ApiFault::bad_request(
                        "mem_backend: backend_type Uffd is not supported; use File",
                    ));
                }
                non_empty("mem_backend.backend_path", &b.backend_path)?;
                Ok(&b.backend_path)
            }
            (None, Some(p)) => {
                non_empty("mem_file_path", p)?;
                Ok(p)
            }
            _ => Err(ApiFault::bad_request(
                "give exactly one of mem_backend and mem_file_path",
            )),
        }
    }
}
