//! `[[upstream]]`: the registries pullgate mirrors, the built-in list, and their resolution
//! into [`UpstreamSpec`]s (names normalised, one default, credentials resolved).

use crate::core::config::value::{
    normalize_host, redact_url, refuse_credentials, secret_ref, ConfigError, Secret, SecretResolver,
};
use crate::core::ports::TrustedCa;
use serde::Deserialize;
use url::Url;

/// One `[[upstream]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The name clients use: path prefix, `ns=`, default routing.
    pub host: String,
    /// Base URL (`https://…`, or `http://…` for a local registry).
    pub url: String,
    /// Other names for the same registry.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Unprefixed names go here (exactly one upstream is the default).
    #[serde(default)]
    pub default: bool,
    /// Reference to the username secret, e.g. `env:DOCKERHUB_USER`.
    pub username: Option<String>,
    /// Reference to the password/token secret, e.g. `env:DOCKERHUB_TOKEN`.
    pub password: Option<String>,
    /// Put `library/` before one-component names (default: true for `docker.io` only).
    pub library_prefix: Option<bool>,
    /// Extra token-realm hosts trusted with this upstream's credentials.
    #[serde(default)]
    pub auth_hosts: Vec<String>,
    /// A PEM file of private CA certificates trusted for this upstream (its registry, token
    /// realm and redirects), in addition to the system store and the bundled roots. Native only.
    pub ca_file: Option<String>,
}

/// Upstream credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Username.
    pub username: Secret,
    /// Password or token.
    pub password: Secret,
}

/// A resolved upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    /// Canonical client-facing host name (lowercase).
    pub host: String,
    /// Lowercase aliases.
    pub aliases: Vec<String>,
    /// Base URL, without trailing slash.
    pub url: Url,
    /// Is this the default upstream.
    pub default: bool,
    /// `library/` normalisation.
    pub library_prefix: bool,
    /// Credentials, if configured.
    pub credentials: Option<Credentials>,
    /// Extra trusted realm hosts.
    pub auth_hosts: Vec<String>,
    /// `ca_file`: the private CA every request for this upstream carries.
    pub ca: Option<TrustedCa>,
}

/// Docker Hub's client-facing name.
pub const DOCKER_HUB: &str = "docker.io";

/// The upstreams known without configuration: (host, url, aliases).
const BUILTIN: &[(&str, &str, &[&str])] = &[
    (
        DOCKER_HUB,
        "https://registry-1.docker.io",
        &["index.docker.io", "registry-1.docker.io"],
    ),
    ("ghcr.io", "https://ghcr.io", &[]),
    ("quay.io", "https://quay.io", &[]),
    ("registry.k8s.io", "https://registry.k8s.io", &[]),
    ("gcr.io", "https://gcr.io", &[]),
    ("mcr.microsoft.com", "https://mcr.microsoft.com", &[]),
];

fn parse_upstream_url(host: &str, url: &str) -> Result<Url, ConfigError> {
    let shown = redact_url(url);
    let u = Url::parse(url.trim_end_matches('/'))
        .map_err(|e| ConfigError(format!("upstream {host}: url {shown:?}: {e}")))?;
    refuse_credentials(&format!("upstream {host}"), &u)?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(ConfigError(format!(
            "upstream {host}: url {shown:?} must be http:// or https:// with a host"
        )));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(ConfigError(format!(
            "upstream {host}: url {shown:?} must not carry a query or fragment"
        )));
    }
    Ok(u)
}

/// Adds or replaces an upstream URL from `--upstream HOST=URL`.
pub(crate) fn upstream_flag(list: &mut Vec<UpstreamConfig>, flag: &str) -> Result<(), ConfigError> {
    let (host, url) = flag.split_once('=').ok_or_else(|| {
        ConfigError(format!(
            "--upstream {:?} must be HOST=URL",
            redact_url(flag)
        ))
    })?;
    let host = normalize_host(host);
    match list.iter_mut().find(|u| normalize_host(&u.host) == host) {
        Some(u) => u.url = url.to_string(),
        None => list.push(UpstreamConfig::named(host, url.to_string())),
    }
    Ok(())
}

impl UpstreamConfig {
    fn named(host: String, url: String) -> UpstreamConfig {
        UpstreamConfig {
            host,
            url,
            aliases: vec![],
            default: false,
            username: None,
            password: None,
            library_prefix: None,
            auth_hosts: vec![],
            ca_file: None,
        }
    }
}

/// The resolved upstream list: the built-ins (when kept) merged with the configured entries,
/// every name unique, at most one default.
pub(crate) fn resolve_upstreams(
    builtin: bool,
    configured: &[UpstreamConfig],
    secrets: &dyn SecretResolver,
) -> Result<Vec<UpstreamSpec>, ConfigError> {
    let mut upstreams = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for u in merged(builtin, configured) {
        let spec = resolve_one(u, secrets)?;
        for n in std::iter::once(&spec.host).chain(spec.aliases.iter()) {
            if seen.contains(n) {
                return Err(ConfigError(format!(
                    "upstream name {n:?} is configured twice"
                )));
            }
            seen.push(n.clone());
        }
        upstreams.push(spec);
    }
    if upstreams.iter().filter(|u| u.default).count() > 1 {
        return Err(ConfigError(
            "more than one upstream has default = true".into(),
        ));
    }
    Ok(upstreams)
}

/// The built-in list overlaid with the configured entries. A configured entry for a built-in
/// host keeps the built-in aliases and default-ness unless it says otherwise; a configured
/// default takes the role from Docker Hub.
fn merged(builtin: bool, configured: &[UpstreamConfig]) -> Vec<UpstreamConfig> {
    let mut list: Vec<UpstreamConfig> = Vec::new();
    if builtin {
        for (host, url, aliases) in BUILTIN {
            let mut u = UpstreamConfig::named(host.to_string(), url.to_string());
            u.aliases = aliases.iter().map(|a| a.to_string()).collect();
            u.default = *host == DOCKER_HUB;
            list.push(u);
        }
    }
    let any_default = configured.iter().any(|u| u.default);
    if any_default {
        list.iter_mut().for_each(|u| u.default = false);
    }
    for u in configured {
        let host = normalize_host(&u.host);
        let mut entry = u.clone();
        entry.host = host.clone();
        match list.iter_mut().find(|b| b.host == host) {
            Some(b) => {
                if entry.aliases.is_empty() {
                    entry.aliases = b.aliases.clone();
                }
                entry.default = u.default || (!any_default && b.default);
                *b = entry;
            }
            None => list.push(entry),
        }
    }
    list
}

fn resolve_one(
    u: UpstreamConfig,
    secrets: &dyn SecretResolver,
) -> Result<UpstreamSpec, ConfigError> {
    let url = parse_upstream_url(&u.host, &u.url)?;
    let secret =
        |key: &str, r: &str| secret_ref(secrets, &format!("upstream {}: {key}", u.host), r);
    let credentials = match (&u.username, &u.password) {
        (Some(user), Some(pass)) => Some(Credentials {
            username: secret("username", user)?,
            password: secret("password", pass)?,
        }),
        (None, None) => None,
        _ => {
            return Err(ConfigError(format!(
                "upstream {}: username and password go together",
                u.host
            )))
        }
    };
    Ok(UpstreamSpec {
        library_prefix: u.library_prefix.unwrap_or(u.host == DOCKER_HUB),
        aliases: u.aliases.iter().map(|a| normalize_host(a)).collect(),
        url,
        default: u.default,
        credentials,
        auth_hosts: u.auth_hosts.iter().map(|h| normalize_host(h)).collect(),
        ca: parse_ca_file(&format!("upstream {}", u.host), u.ca_file.as_deref())?,
        host: u.host,
    })
}

/// A `ca_file` value: a path, not empty. `what` names the entry. Whether the file holds
/// certificates is the host's check (only the native host reads it).
pub fn parse_ca_file(what: &str, ca_file: Option<&str>) -> Result<Option<TrustedCa>, ConfigError> {
    match ca_file {
        None => Ok(None),
        Some(p) if p.trim().is_empty() => Err(ConfigError(format!(
            "{what}: ca_file is empty (leave it out to trust only the usual roots)"
        ))),
        Some(p) => Ok(Some(TrustedCa(p.into()))),
    }
}

/// Every problem of one `[[upstream]]` entry, each with the key at fault (`check-config`
/// reports them all; [`resolve_upstreams`] stops at the first).
pub fn check_upstream(
    u: &UpstreamConfig,
    secrets: &dyn SecretResolver,
) -> Vec<(&'static str, ConfigError)> {
    let mut problems = Vec::new();
    if let Err(e) = parse_upstream_url(&u.host, &u.url) {
        problems.push(("url", e));
    }
    let what = |key: &str| format!("upstream {}: {key}", u.host);
    let together = ConfigError(format!(
        "upstream {}: username and password go together",
        u.host
    ));
    match (&u.username, &u.password) {
        (Some(user), Some(pass)) => {
            for (key, r) in [("username", user), ("password", pass)] {
                if let Err(e) = secret_ref(secrets, &what(key), r) {
                    problems.push((key, e));
                }
            }
        }
        (None, None) => {}
        (Some(_), None) => problems.push(("password", together)),
        (None, Some(_)) => problems.push(("username", together)),
    }
    if let Err(e) = parse_ca_file(&format!("upstream {}", u.host), u.ca_file.as_deref()) {
        problems.push(("ca_file", e));
    }
    problems
}
