//! `[[helm]]`: classic chart repositories, their names, URLs, chart hosts and CAs.

use super::hosts;
use crate::core::config::value::{refuse_credentials, ConfigError};
use serde::Deserialize;
use url::Url;

/// `[[helm]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelmConfig {
    /// The name clients use: `/charts/<name>/index.yaml`.
    pub name: String,
    /// The upstream chart repository (the directory holding `index.yaml`).
    pub url: String,
    /// Hosts (`host` or `host:port`; no port means the scheme's default) besides the index's
    /// own that its chart URLs may point at. Empty by default: only the index's host.
    #[serde(default)]
    pub chart_hosts: Vec<String>,
    /// A PEM file of private CA certificates trusted for this repository (its index, charts
    /// and redirects), in addition to the system store and the bundled roots. Native only.
    pub ca_file: Option<String>,
}

/// A resolved chart repository.
#[derive(Debug, Clone)]
pub struct HelmRepo {
    /// Name.
    pub name: String,
    /// Upstream base URL, ending in `/`.
    pub url: Url,
    /// Hosts besides the index's own that chart URLs may point at.
    pub chart_hosts: Vec<hosts::ChartHost>,
    /// `ca_file`: the private CA every request for this repository carries.
    pub ca: Option<crate::core::ports::TrustedCa>,
}

/// Resolves and checks the `[[helm]]` entries.
pub fn resolve(entries: &[HelmConfig]) -> Result<Vec<HelmRepo>, ConfigError> {
    let mut out: Vec<HelmRepo> = Vec::new();
    for e in entries {
        if e.name.is_empty()
            || !e
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(ConfigError(format!(
                "helm repository name {:?} must be [A-Za-z0-9._-]+",
                e.name
            )));
        }
        if out.iter().any(|r| r.name == e.name) {
            return Err(ConfigError(format!(
                "helm repository {:?} is configured twice",
                e.name
            )));
        }
        let base = format!("{}/", e.url.trim_end_matches('/'));
        let url = Url::parse(&base)
            .map_err(|err| ConfigError(format!("helm repository {}: url: {err}", e.name)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError(format!(
                "helm repository {}: url must be http(s)",
                e.name
            )));
        }
        refuse_credentials(&format!("helm repository {}", e.name), &url)?;
        let chart_hosts = e
            .chart_hosts
            .iter()
            .map(|h| hosts::parse_chart_host(h))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| ConfigError(format!("helm repository {}: {err}", e.name)))?;
        out.push(HelmRepo {
            name: e.name.clone(),
            url,
            chart_hosts,
            ca: crate::core::registry::config::parse_ca_file(
                &format!("helm repository {}", e.name),
                e.ca_file.as_deref(),
            )?,
        });
    }
    Ok(out)
}
