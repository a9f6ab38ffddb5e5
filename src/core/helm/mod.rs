//! Classic Helm chart repositories (`index.yaml` + `.tgz`) through the cache: `[[helm]]`
//! entries map a name to an upstream chart repository, served at `/charts/<name>/…`.
//!
//! TODO(#6): the proxy itself (index revalidation, URL rewriting, verified chart caching).

use crate::core::app::Inner;
use crate::core::body::Body;
use crate::core::config::ConfigError;
use http::{Request, Response};
use serde::Deserialize;
use std::rc::Rc;
use url::Url;

/// `[[helm]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelmConfig {
    /// The name clients use: `/charts/<name>/index.yaml`.
    pub name: String,
    /// The upstream chart repository (the directory holding `index.yaml`).
    pub url: String,
}

/// A resolved chart repository.
#[derive(Debug, Clone)]
pub struct HelmRepo {
    /// Name.
    pub name: String,
    /// Upstream base URL, ending in `/`.
    pub url: Url,
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
        out.push(HelmRepo {
            name: e.name.clone(),
            url,
        });
    }
    Ok(out)
}

/// Routes `/charts/…`; None for every other path.
pub(crate) async fn handle(_inner: &Rc<Inner>, req: &Request<()>) -> Option<Response<Body>> {
    if !req.uri().path().starts_with("/charts/") {
        return None;
    }
    None
}
