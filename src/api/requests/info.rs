//! The answers to `GET /` and `GET /version`.

use serde::{Deserialize, Serialize};

/// `GET /` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    /// The Firecracker API version wisp implements, as Firecracker reports its own here.
    pub vmm_version: String,
    /// wisp's own version.
    pub wisp_version: String,
    pub app_name: String,
}

impl InstanceInfo {
    pub fn new(id: &str, state: InstanceState) -> Self {
        Self {
            id: id.to_string(),
            state,
            vmm_version: FIRECRACKER_API_VERSION.to_string(),
            wisp_version: VMM_VERSION.to_string(),
            app_name: "wisp".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Firecracker release whose API wisp follows (`tests/data/firecracker.yaml`): what
/// `GET /version` tells clients that check Firecracker's version.
pub const FIRECRACKER_API_VERSION: &str = "1.16.1";

/// `GET /version` answer (served by the API thread: it needs no VM state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The Firecracker API version wisp implements (client libraries compare it).
    pub firecracker_version: String,
    /// wisp's own version.
    pub wisp_version: String,
    pub app_name: String,
}

impl VersionInfo {
    pub fn current() -> Self {
        Self {
            firecracker_version: FIRECRACKER_API_VERSION.to_string(),
            wisp_version: VMM_VERSION.to_string(),
            app_name: "wisp".to_string(),
        }
    }
}
