//! `/balloon` and `/balloon/statistics`: the virtio-balloon device (Firecracker's API).

use serde::{Deserialize, Serialize};

use super::ApiFault;
pub use crate::config::BalloonConfig;

/// `PATCH /balloon` (after boot): a new target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics` (after boot): a new statistics interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

pub(super) fn check_balloon(b: &BalloonConfig) -> Result<(), ApiFault> {
    b.validate().map_err(ApiFault::bad_request)
}
