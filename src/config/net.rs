//! Network interfaces: `--net tap=NAME[,mac=52:54:00:12:34:56][,mtu=N][,offload=off]
//! [,rx_bps=RATE][,rx_pps=N][,tx_bps=RATE][,tx_pps=N][,rx_bps_burst=N]...`.

use super::rate_limiter::{check_cli_limiter, parse_cli_key, RateLimiterConfig};
use super::ConfigError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// The smallest MTU an IPv4 host must take (RFC 791).
pub const MIN_MTU: u16 = 68;

/// A Linux interface name holds at most IFNAMSIZ - 1 bytes.
pub const MAX_TAP_NAME_LEN: usize = 15;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The interface's id (`iface_id` of the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The host tap device; opened, or created (non-persistent) if it does not exist.
    pub tap: String,
    /// The guest's MAC address; a stable locally administered one derived from the tap
    /// name when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The MTU told to the guest (VIRTIO_NET_F_MTU) and set on the tap; the tap's own when
    /// not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Checksum and segmentation offloads offered to the guest (and mirrored to the tap);
    /// on unless turned off.
    #[serde(default = "offload_default", skip_serializing_if = "is_true")]
    pub offload: bool,
    /// Limits on the frames the guest receives and sends (Firecracker's
    /// `rx_rate_limiter`, `tx_rate_limiter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

fn offload_default() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl NetConfig {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::NetSpec {
            spec: s.to_string(),
            reason,
        };
        let mut net = NetConfig {
            id: None,
            tap: String::new(),
            mac: None,
            mtu: None,
            offload: true,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            if parse_cli_key(&mut net.rx_rate_limiter, "rx_", "pps", key, value).map_err(bad)?
                || parse_cli_key(&mut net.tx_rate_limiter, "tx_", "pps", key, value).map_err(bad)?
            {
                continue;
            }
            match key {
                "tap" => net.tap = value.to_string(),
                "mac" => {
                    net.mac = Some(value.parse().map_err(|e| {
                        bad(format!(
                            "mac={value}: {e}; use six hex bytes of a unicast address, 52:54:00:12:34:56"
                        ))
                    })?)
                }
                "mtu" => {
                    net.mtu = Some(
                        value
                            .parse()
                            .map_err(|_| bad(format!("mtu={value}: not a number up to 65535")))?,
                    )
                }
                "offload" => {
                    net.offload = match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad(format!("offload={value}: use on or off"))),
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key {key:?} (tap, mac, mtu, offload, rx_bps, rx_pps, tx_bps, \
                         tx_pps, and each with _burst)"
                    )))
                }
            }
        }
        check_cli_limiter(&net.rx_rate_limiter, "rx_", "pps").map_err(bad)?;
        check_cli_limiter(&net.tx_rate_limiter, "tx_", "pps").map_err(bad)?;
        net.validate().map_err(|e| match e {
            ConfigError::NetSpec { reason, .. } => bad(reason),
            e => e,
        })?;
        Ok(net)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::NetSpec {
            spec: format!("tap={}", self.tap),
            reason,
        };
        if self.tap.is_empty() {
            return Err(bad("tap=NAME is required".into()));
        }
        if self.tap.len() > MAX_TAP_NAME_LEN || self.tap.contains(['/', ' ', '\0']) {
            return Err(bad(format!(
                "{:?} is not a valid interface name (at most {MAX_TAP_NAME_LEN} bytes, no '/' or spaces)",
                self.tap
            )));
        }
        if let Some(mtu) = self.mtu {
            if mtu < MIN_MTU {
                return Err(bad(format!("mtu={mtu}: at least {MIN_MTU}")));
            }
        }
        for (field, l) in [
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ] {
            if let Some(l) = l {
                l.validate(field).map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(())
    }

    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        self.mac.map(|m| m.0)
    }
}

/// A NIC's Ethernet address (unicast), `"06:00:ac:10:00:02"` in JSON and on the command line:
/// the one type for MACs from the CLI, config files and the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<MacAddr, String> {
        let bad = || format!("{s:?} is not a MAC address such as 06:00:ac:10:00:02");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in mac.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(format!(
                "{s:?} is a multicast address; a NIC needs a unicast one"
            ));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tap_and_mac() {
        let n = NetConfig::parse("tap=wisp0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(n.tap, "wisp0");
        assert_eq!(n.mac_bytes(), Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(NetConfig::parse("tap=t").unwrap().mac, None);
        assert!(NetConfig::parse("tap=t").unwrap().offload);
        assert!(!NetConfig::parse("tap=t,offload=off").unwrap().offload);
        assert_eq!(NetConfig::parse("tap=t,mtu=9000").unwrap().mtu, Some(9000));
        let n = NetConfig::parse("tap=t,tx_bps=100K,rx_pps=10,rx_pps_burst=5").unwrap();
        assert_eq!(
            n.tx_rate_limiter.unwrap().bandwidth.unwrap().size,
            100 << 10
        );
        assert_eq!(
            n.rx_rate_limiter.unwrap().ops.unwrap().one_time_burst,
            Some(5)
        );
    }

    #[test]
    fn rejects_bad_names_and_macs() {
        for (spec, want) in [
            ("mac=52:54:00:12:34:56", "tap=NAME is required"),
            ("tap=averyveryverylongname", "not a valid interface name"),
            ("tap=a/b", "not a valid interface name"),
            ("tap=t,mac=52:54:00:12:34", "mac=52:54:00:12:34"),
            ("tap=t,mac=01:00:5e:00:00:01", "use six hex bytes"),
            ("tap=t,queues=2", "unknown key"),
            ("tap=t,offload=no", "use on or off"),
            ("tap=t,mtu=67", "at least 68"),
            ("tap=t,mtu=big", "not a number"),
            ("tap=t,tx_bps=1.5M", "tx_bps=1.5M: not a number"),
            ("tap=t,bps=1", "unknown key \"bps\""),
        ] {
            let e = NetConfig::parse(spec).unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }
}
