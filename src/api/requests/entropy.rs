//! `PUT /entropy`: a virtio-rng device fed from the host's getrandom(2).

use serde::{Deserialize, Serialize};

use super::rate_limiter::check_no_limit;
use super::ApiFault;

/// `PUT /entropy` (and the config file's `entropy` section).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Refused unless it limits nothing (wisp has no rate limiters yet); the device bounds
    /// each request (64 KiB) and each event-loop turn (1 MiB) itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

impl EntropyDevice {
    pub fn validate(&self) -> Result<(), ApiFault> {
        check_no_limit("rate_limiter", self.rate_limiter.as_ref())
    }
}
