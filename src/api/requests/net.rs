//! `PUT`/`PATCH /network-interfaces/{iface_id}`: virtio-net devices over host taps.

use serde::{Deserialize, Serialize};

use super::rate_limiter::check_limiter;
use super::{check_id, ApiFault};
pub use crate::config::MacAddr;
use crate::config::RateLimiterConfig;

/// A Linux interface name holds at most IFNAMSIZ - 1 bytes.
pub const MAX_IFNAME_LEN: usize = 15;

/// `PUT /network-interfaces/{iface_id}`: a virtio-net device over an existing tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
    /// The MTU told to the guest (VIRTIO_NET_F_MTU) and set on the tap, 68 to 65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Limits on the frames the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on the frames the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// wisp: checksum and segmentation offloads offered to the guest (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<bool>,
}

impl NetworkInterface {
    pub fn validate(&self) -> Result<(), ApiFault> {
        check_id("iface_id", &self.iface_id)?;
        let n = &self.host_dev_name;
        if n.is_empty()
            || n.len() > MAX_IFNAME_LEN
            || n.contains(['/', '\0'])
            || n.contains(char::is_whitespace)
        {
            return Err(ApiFault::bad_request(format!(
                "host_dev_name: {n:?} is not an interface name (1 to {MAX_IFNAME_LEN} bytes, no '/' or whitespace)"
            )));
        }
        if let Some(mtu) = self.mtu {
            if !(crate::config::MIN_MTU as u32..=u16::MAX as u32).contains(&mtu) {
                return Err(ApiFault::bad_request(format!(
                    "mtu: {mtu} is out of range ({} to 65535)",
                    crate::config::MIN_MTU
                )));
            }
        }
        check_limiter("rx_rate_limiter", self.rx_rate_limiter.as_ref())?;
        check_limiter("tx_rate_limiter", self.tx_rate_limiter.as_ref())
    }
}

/// `PATCH /network-interfaces/{iface_id}` (after boot): Firecracker's new rate limiters; the
/// buckets given replace the interface's (size 0: no limit), those left out stay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetworkInterfaceUpdate {
    pub fn validate(&self) -> Result<(), ApiFault> {
        check_id("iface_id", &self.iface_id)?;
        for (field, limiter) in [
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ] {
            check_limiter(field, limiter.as_ref())?;
        }
        Ok(())
    }
}
