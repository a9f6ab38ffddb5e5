//! `[log]`: what every host logs and how (the same keys on every host). The core only reads
//! the fill-progress interval; the hosts read the rest when they install their subscriber
//! (native: `native::logging`; Workers and Spin: `crate::logline`).

use super::value::{parse_duration_ms, parse_size, ConfigError};
use serde::Deserialize;

/// `[log]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// The filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or, natively, any
    /// `RUST_LOG` directive list such as `info,pullgate::access=off` (default `info`).
    /// `RUST_LOG` overrides it on the native host.
    pub level: Option<String>,
    /// `text` (default) or `json`: one JSON object per line (`PULLGATE_LOG_FORMAT` overrides
    /// it on the native host).
    pub format: Option<String>,
    /// One access-log event per request on the `pullgate::access` target (default true).
    pub access: Option<bool>,
    /// A long fill logs its progress after every this many bytes (default `64MiB`)…
    pub progress_bytes: Option<String>,
    /// …or after this long, whichever comes first (default `10s`).
    pub progress_interval: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `timestamp LEVEL target: message key=value…`.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// `text` or `json`.
    pub fn parse(s: &str) -> Result<LogFormat, ConfigError> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(ConfigError(format!(
                "log.format: {other:?} is neither \"text\" nor \"json\""
            ))),
        }
    }
}

/// `[log]` resolved.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// The filter directives (default `info`).
    pub level: String,
    /// Line format.
    pub format: LogFormat,
    /// Whether hosts emit the per-request access event.
    pub access: bool,
    /// A fill logs progress after this many bytes…
    pub progress_bytes: u64,
    /// …or this many ms since its last report.
    pub progress_interval_ms: u64,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: LogFormat::Text,
            access: true,
            progress_bytes: 64 << 20,
            progress_interval_ms: 10_000,
        }
    }
}

impl LogConfig {
    /// Resolves `[log]`.
    pub fn resolve(&self) -> Result<LogSettings, ConfigError> {
        let d = LogSettings::default();
        let at = |key: &str, e: ConfigError| ConfigError(format!("log.{key}: {}", e.0));
        Ok(LogSettings {
            level: match self.level.as_deref().map(str::trim) {
                Some("") => return Err(ConfigError("log.level: empty".into())),
                Some(l) => l.to_string(),
                None => d.level,
            },
            format: match &self.format {
                Some(f) => LogFormat::parse(f)?,
                None => d.format,
            },
            access: self.access.unwrap_or(d.access),
            progress_bytes: match &self.progress_bytes {
                Some(s) => match parse_size(s).map_err(|e| at("progress_bytes", e))? {
                    0 => return Err(ConfigError("log.progress_bytes must be more than 0".into())),
                    n => n,
                },
                None => d.progress_bytes,
            },
            progress_interval_ms: match &self.progress_interval {
                Some(s) => parse_duration_ms(s).map_err(|e| at("progress_interval", e))?,
                None => d.progress_interval_ms,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_settings_default_and_parse() {
        let d = LogConfig::default().resolve().unwrap();
        assert_eq!(
            (d.level.as_str(), d.format, d.access),
            ("info", LogFormat::Text, true)
        );
        assert_eq!(
            (d.progress_bytes, d.progress_interval_ms),
            (64 << 20, 10_000)
        );
        let c: LogConfig = toml::from_str(
            "level = \"debug\"\nformat = \"json\"\naccess = false\nprogress_bytes = \"1MiB\"\nprogress_interval = \"2s\"\n",
        )
        .unwrap();
        let s = c.resolve().unwrap();
        assert_eq!(
            (s.level.as_str(), s.format, s.access),
            ("debug", LogFormat::Json, false)
        );
        assert_eq!((s.progress_bytes, s.progress_interval_ms), (1 << 20, 2000));
        let bad: LogConfig = toml::from_str("format = \"xml\"").unwrap();
        assert!(bad.resolve().unwrap_err().0.contains("log.format"));
    }
}
