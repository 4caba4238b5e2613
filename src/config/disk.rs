//! Disks: `--disk path=FILE[,readonly=on][,serial=ID][,format=raw|qcow2][,backing_files=on]
//! [,backing_dir=DIR][,backing_devices=on][,bps=RATE][,iops=N][,bps_burst=N][,iops_burst=N]`.

use super::rate_limiter::{check_cli_limiter, parse_cli_key, RateLimiterConfig};
use super::{io_reason, ConfigError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// GET_ID answers with at most 20 bytes (virtio 1.2 §5.2.6).
pub const MAX_SERIAL_LEN: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The drive's id (`drive_id` of the API), by which runtime requests find it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Left out: raw, whatever the file holds (a guest that wrote a qcow2 header into its
    /// raw disk must not get the qcow2 parser, nor a virtual size of its choosing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Follow the backing files a qcow2 image names; off, an image that names one is
    /// refused (its name could point at any host file).
    #[serde(default, skip_serializing_if = "is_false")]
    pub backing_files: bool,
    /// Backing files only inside this directory, reached without symbolic links (implies
    /// `backing_files`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_dir: Option<PathBuf>,
    /// Block devices may be backing files (needs `backing_files` or `backing_dir`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub backing_devices: bool,
    /// Limits on the requests' bytes and count (Firecracker's `rate_limiter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl DiskConfig {
    /// Parses the `--disk` syntax: comma-separated key=value pairs, `path` required.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::DiskSpec {
            spec: s.to_string(),
            reason,
        };
        let mut disk = DiskConfig::default();
        let on_off = |key: &str, value: &str| {
            parse_bool(value).ok_or_else(|| bad(format!("{key}={value}: use on or off")))
        };
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            if parse_cli_key(&mut disk.rate_limiter, "", "iops", key, value).map_err(bad)? {
                continue;
            }
            match key {
                "path" => disk.path = PathBuf::from(value),
                "readonly" | "ro" => disk.readonly = on_off("readonly", value)?,
                "backing_files" => disk.backing_files = on_off(key, value)?,
                "backing_dir" => disk.backing_dir = Some(PathBuf::from(value)),
                "backing_devices" => disk.backing_devices = on_off(key, value)?,
                "serial" => disk.serial = Some(value.to_string()),
                "format" => {
                    disk.format = Some(match value {
                        "raw" => DiskFormat::Raw,
                        "qcow2" => DiskFormat::Qcow2,
                        _ => return Err(bad(format!("format={value}: use raw or qcow2"))),
                    })
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key {key:?} (path, readonly, serial, format, backing_files, \
                         backing_dir, backing_devices, bps, iops, bps_burst, iops_burst)"
                    )))
                }
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err(bad("path=FILE is required".into()));
        }
        check_cli_limiter(&disk.rate_limiter, "", "iops").map_err(bad)?;
        Ok(disk)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::BadFile {
            what: "disk",
            path: self.path.clone(),
            reason,
        };
        let meta = std::fs::metadata(&self.path).map_err(|e| bad(io_reason(&e)))?;
        if meta.is_dir() {
            return Err(bad("is a directory".into()));
        }
        self.validate_backing()?;
        self.validate_rate_limiter()?;
        if let Some(serial) = &self.serial {
            if serial.len() > MAX_SERIAL_LEN {
                return Err(ConfigError::DiskSpec {
                    spec: format!("serial={serial}"),
                    reason: format!("{} bytes, at most {MAX_SERIAL_LEN}", serial.len()),
                });
            }
        }
        Ok(())
    }

    pub fn validate_rate_limiter(&self) -> Result<(), ConfigError> {
        match &self.rate_limiter {
            Some(l) => l
                .validate("rate_limiter")
                .map_err(|e| ConfigError::DiskSpec {
                    spec: format!("path={}", self.path.display()),
                    reason: e.to_string(),
                }),
            None => Ok(()),
        }
    }

    /// The backing-file options make sense together (`backing_dir` is a directory).
    pub fn validate_backing(&self) -> Result<(), ConfigError> {
        if self.backing_devices && !self.backing_files && self.backing_dir.is_none() {
            return Err(ConfigError::DiskSpec {
                spec: "backing_devices=on".into(),
                reason: "needs backing_files=on or backing_dir=DIR".into(),
            });
        }
        if let Some(dir) = &self.backing_dir {
            let meta = std::fs::metadata(dir).map_err(|e| ConfigError::BadFile {
                what: "backing_dir",
                path: dir.clone(),
                reason: io_reason(&e),
            })?;
            if !meta.is_dir() {
                return Err(ConfigError::BadFile {
                    what: "backing_dir",
                    path: dir.clone(),
                    reason: "is not a directory".into(),
                });
            }
        }
        Ok(())
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Two disks on one file would corrupt it (the second open is refused by the image lock
/// anyway, but this names both).
pub fn check_distinct(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    for (i, a) in disks.iter().enumerate() {
        for b in &disks[i + 1..] {
            if same_file(&a.path, &b.path) {
                return Err(ConfigError::BadFile {
                    what: "disk",
                    path: b.path.clone(),
                    reason: format!("is the same file as disk {}", a.path.display()),
                });
            }
        }
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let d = DiskConfig::parse("path=/d.img,readonly=on,serial=abc,format=qcow2").unwrap();
        assert_eq!(d.path, PathBuf::from("/d.img"));
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(d.format, Some(DiskFormat::Qcow2));
        let d = DiskConfig::parse("path=/d.img").unwrap();
        assert!(!d.readonly && d.serial.is_none() && d.format.is_none());
    }

    #[test]
    fn rate_limits_on_the_command_line() {
        let d = DiskConfig::parse("path=/d.img,bps=1M,iops=100").unwrap();
        let l = d.rate_limiter.unwrap();
        assert_eq!(
            (l.bandwidth.unwrap().size, l.ops.unwrap().size),
            (1 << 20, 100)
        );
        assert_eq!(l.ops.unwrap().refill_time, 1000);
        assert!(DiskConfig::parse("path=/d.img")
            .unwrap()
            .rate_limiter
            .is_none());
    }

    #[test]
    fn rejects_bad_specs_with_the_reason() {
        for (spec, want) in [
            ("/d.img", "is not key=value"),
            ("readonly=on", "path=FILE is required"),
            ("path=/d,format=vmdk", "format=vmdk: use raw or qcow2"),
            ("path=/d,readonly=maybe", "readonly=maybe: use on or off"),
            ("path=/d,cache=none", "unknown key \"cache\""),
            ("path=/d,bps=-5", "bps=-5: not a number"),
            ("path=/d,iops=lots", "iops=lots: not a number"),
            ("path=/d,iops_burst=9", "iops_burst needs a rate (iops=...)"),
        ] {
            let e = DiskConfig::parse(spec).unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }

    #[test]
    fn validate_names_missing_files_directories_and_long_serials() {
        let mut d = DiskConfig::parse("path=/nonexistent.img").unwrap();
        assert_eq!(
            d.validate().unwrap_err().to_string(),
            "disk /nonexistent.img: No such file or directory"
        );
        d.path = "/tmp".into();
        assert_eq!(
            d.validate().unwrap_err().to_string(),
            "disk /tmp: is a directory"
        );
        d.path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        d.serial = Some("x".repeat(21));
        assert!(d.validate().unwrap_err().to_string().contains("at most 20"));
    }

    #[test]
    fn the_same_file_twice_is_refused() {
        let f = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let a = DiskConfig::parse(&format!("path={}", f.display())).unwrap();
        let b = DiskConfig::parse(&format!(
            "path={}/../{}/Cargo.toml",
            f.parent().unwrap().display(),
            f.parent().unwrap().file_name().unwrap().to_str().unwrap()
        ))
        .unwrap();
        assert!(check_distinct(&[a, b])
            .unwrap_err()
            .to_string()
            .contains("is the same file"));
    }
}
