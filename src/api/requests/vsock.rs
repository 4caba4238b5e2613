//! `PUT /vsock`: a virtio-vsock device with Firecracker's Unix-socket host side.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{non_empty_path, ApiFault};

/// `PUT /vsock` (and the config file's `vsock` section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockDevice {
    /// The guest's context id, 3 or more.
    pub guest_cid: u32,
    /// Where wisp listens for host connections (`CONNECT <port>\n`); guest connections to
    /// port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// Deprecated in Firecracker and ignored there too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

impl VsockDevice {
    pub fn validate(&self) -> Result<(), ApiFault> {
        non_empty_path("uds_path", &self.uds_path)?;
        self.to_config()
            .validate()
            .map_err(|e| ApiFault::bad_request(e.to_string()))
    }

    pub fn to_config(&self) -> crate::config::VsockConfig {
        crate::config::VsockConfig {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.clone(),
        }
    }
}
