//! `PUT`/`PATCH /drives/{drive_id}`: virtio-blk devices.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::rate_limiter::check_limiter;
use super::{check_id, non_empty_path, ApiFault};
use crate::config::{DiskFormat, RateLimiterConfig};

/// virtio 1.2 §5.2.6: GET_ID answers with at most 20 bytes.
pub const MAX_SERIAL_LEN: usize = 20;

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    /// With `is_root_device`: the kernel gets `root=PARTUUID=<partuuid>` instead of
    /// `root=/dev/vda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Accepted for compatibility; wisp always passes guest flushes to the host (Writeback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Only `"Sync"` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Limits on the requests' bytes and count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// vhost-user: not supported, refused when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// wisp: image format; left out, raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// wisp: follow the qcow2 image's backing files (default off: such an image is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_files: Option<bool>,
    /// wisp: backing files only inside this directory, without symbolic links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_dir: Option<PathBuf>,
    /// wisp: block devices may be backing files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_devices: Option<bool>,
    /// wisp: the virtio-blk serial the guest reads (at most 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

impl Drive {
    /// The disk the VM builder opens for this drive.
    pub fn disk_config(&self) -> crate::config::DiskConfig {
        crate::config::DiskConfig {
            id: Some(self.drive_id.clone()),
            path: self.path_on_host.clone(),
            readonly: self.is_read_only,
            serial: self.serial.clone(),
            format: self.format,
            backing_files: self.backing_files.unwrap_or(false),
            backing_dir: self.backing_dir.clone(),
            backing_devices: self.backing_devices.unwrap_or(false),
            rate_limiter: self.rate_limiter,
        }
    }

    pub fn validate(&self) -> Result<(), ApiFault> {
        check_id("drive_id", &self.drive_id)?;
        non_empty_path("path_on_host", &self.path_on_host)?;
        self.disk_config()
            .validate_backing()
            .map_err(|e| ApiFault::bad_request(e.to_string()))?;
        if let Some(p) = &self.partuuid {
            if !self.is_root_device {
                return Err(ApiFault::bad_request(
                    "partuuid: only meaningful with is_root_device: true",
                ));
            }
            if p.is_empty() || !p.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                return Err(ApiFault::bad_request(format!(
                    "partuuid: {p:?} is not a partition UUID (hex digits and '-')"
                )));
            }
        }
        match self.io_engine.as_deref() {
            None | Some("Sync") => {}
            Some(other) => {
                return Err(ApiFault::bad_request(format!(
                    "io_engine: {other:?} is not supported by wisp; use \"Sync\" or leave it out"
                )))
            }
        }
        check_limiter("rate_limiter", self.rate_limiter.as_ref())?;
        if self.socket.is_some() {
            return Err(ApiFault::bad_request(
                "socket: vhost-user drives are not supported by wisp; give path_on_host",
            ));
        }
        if let Some(s) = &self.serial {
            if s.len() > MAX_SERIAL_LEN {
                return Err(ApiFault::bad_request(format!(
                    "serial: {} bytes, at most {MAX_SERIAL_LEN}",
                    s.len()
                )));
            }
        }
        Ok(())
    }
}

/// `PATCH /drives/{drive_id}` (after boot): a new backing file for the drive, new rate
/// limits, or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    /// The new medium; left out, the drive keeps its file (Firecracker's PATCH may only
    /// change the rate limiter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// The buckets given replace the drive's (size 0: no limit); those left out stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl DriveUpdate {
    pub fn validate(&self) -> Result<(), ApiFault> {
        check_id("drive_id", &self.drive_id)?;
        if let Some(p) = &self.path_on_host {
            non_empty_path("path_on_host", p)?;
        }
        check_limiter("rate_limiter", self.rate_limiter.as_ref())
    }
}
