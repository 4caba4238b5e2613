//! `PUT /boot-source`: the kernel, initrd and command line.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{non_empty_path, ApiFault};

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// Left out: wisp's default command line (`config::DEFAULT_CMDLINE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSource {
    pub fn validate(&self) -> Result<(), ApiFault> {
        non_empty_path("kernel_image_path", &self.kernel_image_path)?;
        if let Some(p) = &self.initrd_path {
            non_empty_path("initrd_path", p)?;
        }
        if let Some(args) = &self.boot_args {
            if args.contains('\0') {
                return Err(ApiFault::bad_request("boot_args: contains a NUL character"));
            }
        }
        Ok(())
    }
}
