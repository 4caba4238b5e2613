//! The metadata service (Firecracker's `PUT /mmds/config` and the config file's
//! `mmds-config`): which interfaces serve it, at which address, and how the guest must ask.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Firecracker's default limit on the MMDS document (`--mmds-size-limit`).
pub const DEFAULT_MMDS_SIZE_LIMIT: usize = wisp_devices::mmds::DEFAULT_SIZE_LIMIT;

/// `V1`: GETs need no token; `V2`: every GET needs a session token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

impl MmdsVersion {
    pub fn to_device(self) -> wisp_devices::mmds::MmdsVersion {
        match self {
            MmdsVersion::V1 => wisp_devices::mmds::MmdsVersion::V1,
            MmdsVersion::V2 => wisp_devices::mmds::MmdsVersion::V2,
        }
    }
}

fn default_ipv4() -> Ipv4Addr {
    wisp_devices::mmds::DEFAULT_IPV4
}

/// Firecracker's `MmdsConfig`, field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    /// The interfaces (`iface_id`s) whose frames to the address are answered by the MMDS
    /// instead of going to their taps.
    pub network_interfaces: Vec<String>,
    /// A link-local (169.254.0.0/16) address.
    #[serde(default = "default_ipv4")]
    pub ipv4_address: Ipv4Addr,
    /// Answer in IMDS format (text/plain) whatever the guest's `Accept` asks, as EC2's IMDS.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// What can be checked without the VM's interfaces.
    pub fn validate(&self) -> Result<(), String> {
        if self.network_interfaces.is_empty() {
            return Err(
                "network_interfaces: the list is empty; name the interfaces (iface_id) that \
                 serve the MMDS"
                    .into(),
            );
        }
        if !self.ipv4_address.is_link_local() {
            return Err(format!(
                "ipv4_address: {} is not a link-local address (169.254.0.0/16)",
                self.ipv4_address
            ));
        }
        Ok(())
    }

    /// Every interface named must be one of `ids`.
    pub fn check_interfaces<'a>(
        &self,
        mut ids: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<(), String> {
        if let Some(unknown) = self
            .network_interfaces
            .iter()
            .find(|n| !ids.clone().any(|id| id == n.as_str()))
        {
            let known: Vec<&str> = ids.by_ref().collect();
            return Err(format!(
                "network_interfaces: {unknown:?} is not a network interface of this VM \
                 (known: {known:?}); PUT /network-interfaces/{unknown} first"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_checks_follow_firecracker() {
        let c: MmdsConfig = serde_json::from_str(r#"{"network_interfaces": ["eth0"]}"#).unwrap();
        assert_eq!(c.version, MmdsVersion::V1);
        assert_eq!(c.ipv4_address, Ipv4Addr::new(169, 254, 169, 254));
        assert!(!c.imds_compat);
        c.validate().unwrap();
        c.check_interfaces(["eth0", "eth1"].into_iter()).unwrap();
        let e = c.check_interfaces(["eth1"].into_iter()).unwrap_err();
        assert!(e.contains("\"eth0\" is not a network interface"), "{e}");
        let mut bad = c.clone();
        bad.ipv4_address = Ipv4Addr::new(10, 0, 0, 1);
        assert!(bad.validate().unwrap_err().contains("not a link-local"));
        bad = c;
        bad.network_interfaces.clear();
        assert!(bad.validate().unwrap_err().contains("empty"));
        assert!(serde_json::from_str::<MmdsConfig>(
            r#"{"network_interfaces": [], "version": "V3"}"#
        )
        .is_err());
    }
}
