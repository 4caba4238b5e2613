//! `PUT /logger` and `PUT /metrics`: where wisp's own log and metrics go.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::{non_empty_path, ApiFault};

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File (or named pipe) the log goes to; left out, wisp keeps logging to stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log lines from this module path (e.g. `wisp::vmm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl LoggerConfig {
    pub fn validate(&self) -> Result<(), ApiFault> {
        if let Some(p) = &self.log_path {
            non_empty_path("log_path", p)?;
        }
        Ok(())
    }

    /// The change to wisp's log; fields left out keep their current value.
    pub fn to_settings(&self) -> crate::logger::LogSettings {
        crate::logger::LogSettings {
            path: self.log_path.clone(),
            level: self.level.map(LogLevel::to_level_filter),
            show_level: self.show_level,
            show_origin: self.show_log_origin,
            module: self.module.clone(),
        }
    }
}

/// Log levels; parsed case-insensitively as Firecracker does (`Warn` also means Warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LogLevel, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            "off" => LogLevel::Off,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown level {s:?}, expected Error, Warning, Info, Debug, Trace or Off"
                )))
            }
        })
    }
}

impl LogLevel {
    pub fn to_level_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Off => log::LevelFilter::Off,
        }
    }
}

/// `PUT /metrics`: newline-delimited JSON metrics are written to this path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: PathBuf,
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), ApiFault> {
        non_empty_path("metrics_path", &self.metrics_path)
    }
}
