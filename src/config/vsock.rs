//! The vsock device: `--vsock cid=N,uds=PATH` (Firecracker's `guest_cid` and `uds_path`).

use super::ConfigError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id, 3 or more (0-2 are reserved; 2 is the host).
    pub guest_cid: u32,
    /// Host processes connect here (`CONNECT <port>\n`); guest connections to port P go to
    /// `<uds_path>_P`. Created by wisp: absent, or a stale socket nobody listens on.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::VsockSpec {
            spec: s.to_string(),
            reason,
        };
        let (mut cid, mut uds) = (None, None);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match k {
                "cid" => {
                    cid = Some(
                        v.parse::<u32>()
                            .map_err(|_| bad(format!("cid {v:?} is not a number")))?,
                    )
                }
                "uds" => uds = Some(PathBuf::from(v)),
                _ => return Err(bad(format!("unknown key {k:?} (cid, uds)"))),
            }
        }
        let config = VsockConfig {
            guest_cid: cid.ok_or_else(|| bad("cid=N is required".into()))?,
            uds_path: uds.ok_or_else(|| bad("uds=PATH is required".into()))?,
        };
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::Vsock { reason };
        if u64::from(self.guest_cid) < wisp_devices::virtio::vsock::MIN_GUEST_CID {
            return Err(bad(format!(
                "guest_cid {} is reserved; use 3 or more",
                self.guest_cid
            )));
        }
        wisp_devices::virtio::vsock::check_uds_path(&self.uds_path).map_err(|e| bad(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate() {
        let v = VsockConfig::parse("cid=3,uds=/tmp/wisp-vsock-test.sock").unwrap();
        assert_eq!(v.guest_cid, 3);
        v.validate().unwrap();
        for (spec, why) in [
            ("cid=3", "uds=PATH is required"),
            ("uds=/x", "cid=N is required"),
            ("cid=x,uds=/x", "cid \"x\" is not a number"),
            ("cid=3,uds=/x,port=1", "unknown key \"port\""),
        ] {
            let e = VsockConfig::parse(spec).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("--vsock {spec}: ")) && e.contains(why),
                "{e}"
            );
        }
        let e = VsockConfig::parse("cid=2,uds=/tmp/x.sock")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(e, "vsock: guest_cid 2 is reserved; use 3 or more");
        let e = VsockConfig::parse("cid=3,uds=/etc/passwd")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("exists and is not a Unix socket"), "{e}");
    }
}
