//! `PUT /serial`: where the guest's serial output goes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::rate_limiter::bucket_is_unlimited;
use super::{non_empty_path, ApiFault, VMM_VERSION};

/// `PUT /serial`: where the guest's serial output goes (Firecracker 1.10+).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file (appended to, created if missing) or a named pipe; left out, the serial output
    /// stays on wisp's stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
    /// Not supported: refused unless it limits nothing (null, or a zero size or refill time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

impl SerialConfig {
    pub fn validate(&self) -> Result<(), ApiFault> {
        if let Some(p) = &self.serial_out_path {
            non_empty_path("serial_out_path", p)?;
        }
        // Firecracker's serial limiter is a bare token bucket.
        if !self.rate_limiter.as_ref().is_none_or(bucket_is_unlimited) {
            return Err(ApiFault::bad_request(format!(
                "rate_limiter: rate limiting the serial output is not supported by wisp \
                 {VMM_VERSION} yet; leave it out"
            )));
        }
        Ok(())
    }
}
