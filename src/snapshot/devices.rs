//! The devices' part of a snapshot, as plain serde types: each device's own state type, in
//! the order the builder attaches them, and what each disk was when the snapshot was taken.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use wisp_devices::legacy::{I8042State, SerialRegs};
use wisp_devices::virtio::MmioState;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesState {
    pub serial: SerialRegs,
    pub i8042: I8042State,
    /// Every virtio device's transport, in window order (disks, interfaces, entropy).
    pub virtio: Vec<MmioState>,
    /// The disks' images, in the config's order.
    pub disks: Vec<DiskImage>,
}

/// A disk's image at snapshot time: a restore refuses an image whose format or size changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskImage {
    pub path: PathBuf,
    /// "raw" or "qcow2", as found in the file.
    pub format: String,
    /// The guest-visible size in bytes.
    pub size: u64,
}
