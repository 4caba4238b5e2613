//! The memory balloon, in Firecracker's JSON shape (`PUT /balloon`, the config file's
//! `balloon`, wisp's own JSON).

use serde::{Deserialize, Serialize};

/// Firecracker's `Balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The memory the guest is asked to give back, in MiB.
    pub amount_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back when it runs out.
    pub deflate_on_oom: bool,
    /// How often the device asks for the guest's memory statistics; 0: no statistics.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Not supported: refused when true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_hinting: Option<bool>,
    /// Not supported: refused when true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
}

/// Pages of the balloon's 4 KiB.
pub fn mib_to_pages(mib: u32) -> u32 {
    mib.saturating_mul(256)
}

impl BalloonConfig {
    /// Checks what can be checked without the VM: the features wisp does not have.
    pub fn validate(&self) -> Result<(), String> {
        for (field, on) in [
            ("free_page_hinting", self.free_page_hinting),
            ("free_page_reporting", self.free_page_reporting),
        ] {
            if on == Some(true) {
                return Err(format!(
                    "balloon.{field}: not supported by wisp; leave it out or set it to false"
                ));
            }
        }
        Ok(())
    }

    /// Checks the balloon against the VM's memory: it cannot ask for more than there is,
    /// and pages of 2 MiB cannot be given back 4 KiB at a time.
    pub fn validate_for(&self, memory_mib: u64, huge_pages: bool) -> Result<(), String> {
        self.validate()?;
        if u64::from(self.amount_mib) > memory_mib {
            return Err(format!(
                "balloon.amount_mib: {} MiB is more than the guest's {memory_mib} MiB of memory",
                self.amount_mib
            ));
        }
        if huge_pages {
            return Err(
                "balloon: not with huge_pages (a 2 MiB page cannot be given back 4 KiB at a time)"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(amount_mib: u32) -> BalloonConfig {
        BalloonConfig {
            amount_mib,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_hinting: None,
            free_page_reporting: None,
        }
    }

    #[test]
    fn a_balloon_larger_than_memory_or_on_huge_pages_is_refused() {
        assert!(b(128).validate_for(128, false).is_ok());
        let e = b(129).validate_for(128, false).unwrap_err();
        assert!(
            e.contains("129 MiB is more than the guest's 128 MiB"),
            "{e}"
        );
        assert!(b(0)
            .validate_for(128, true)
            .unwrap_err()
            .contains("huge_pages"));
        let hinting = BalloonConfig {
            free_page_hinting: Some(true),
            ..b(0)
        };
        assert!(hinting
            .validate()
            .unwrap_err()
            .contains("free_page_hinting"));
        assert_eq!(mib_to_pages(3), 768);
        assert_eq!(mib_to_pages(u32::MAX), u32::MAX);
    }
}
