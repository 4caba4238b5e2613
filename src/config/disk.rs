//! Disks: `--disk path=FILE[,readonly=on][,serial=ID][,format=raw|qcow2]`.

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Left out: wisp probes, and refuses a probed qcow2 image that names a backing file
    /// (a guest that wrote a qcow2 header into a raw disk must not reach host files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}

impl DiskConfig {
    /// Parses the `--disk` syntax: comma-separated key=value pairs, `path` required.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::DiskSpec {
            spec: s.to_string(),
            reason,
        };
        let mut disk = DiskConfig {
            id: None,
            path: PathBuf::new(),
            readonly: false,
            serial: None,
            format: None,
        };
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match key {
                "path" => disk.path = PathBuf::from(value),
                "readonly" | "ro" => {
                    disk.readonly = parse_bool(value)
                        .ok_or_else(|| bad(format!("readonly={value}: use on or off")))?
                }
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
                        "unknown key {key:?} (path, readonly, serial, format)"
                    )))
                }
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err(bad("path=FILE is required".into()));
        }
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
    fn rejects_bad_specs_with_the_reason() {
        for (spec, want) in [
            ("/d.img", "is not key=value"),
            ("readonly=on", "path=FILE is required"),
            ("path=/d,format=vmdk", "format=vmdk: use raw or qcow2"),
            ("path=/d,readonly=maybe", "readonly=maybe: use on or off"),
            ("path=/d,cache=none", "unknown key \"cache\""),
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
