//! `PUT /entropy`: a virtio-rng device fed from the host's getrandom(2).

use serde::{Deserialize, Serialize};

use super::rate_limiter::check_limiter;
use super::ApiFault;
use crate::config::RateLimiterConfig;

/// `PUT /entropy` (and the config file's `entropy` section).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Limits on the requests (ops) and their random bytes (bandwidth). Without one the
    /// device still bounds each request (64 KiB) and each event-loop turn (1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl EntropyDevice {
    pub fn validate(&self) -> Result<(), ApiFault> {
        check_limiter("rate_limiter", self.rate_limiter.as_ref())
    }
}
