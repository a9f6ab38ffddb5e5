//! The configuration schema every host reads (native: `--config FILE`; Workers and Spin: one
//! variable holding the same TOML), and its resolution into [`Settings`].
//!
//! Parsing is pure. Secrets are never literals: `username`/`password` hold references
//! (`env:NAME` on the native host) that the host's [`SecretResolver`] turns into values; a
//! resolved secret is a [`Secret`], whose `Debug` prints nothing of it.

use serde::Deserialize;
use std::fmt;
use url::Url;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Native only: the address to listen on.
    pub listen: Option<String>,
    /// Native only: where the cache lives.
    pub data_dir: Option<String>,
    /// Keep the built-in upstream list (Docker Hub, ghcr.io, quay.io, registry.k8s.io, gcr.io,
    /// mcr.microsoft.com). Default true.
    pub builtin_upstreams: Option<bool>,
    /// Cache policy.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Upstream registries.
    #[serde(default)]
    pub upstream: Vec<UpstreamConfig>,
    /// Webhook receivers (the gateway).
    #[serde(default)]
    pub webhook: Vec<crate::core::gateway::config::WebhookConfig>,
    /// Build systems and event sinks.
    #[serde(default)]
    pub target: Vec<crate::core::gateway::config::TargetConfig>,
    /// Trigger rules.
    #[serde(default)]
    pub rule: Vec<crate::core::gateway::config::RuleConfig>,
    /// Which target runs each chain stage.
    #[serde(default)]
    pub stage: Vec<crate::core::gateway::config::StageConfig>,
    /// The delivery chain.
    #[serde(default)]
    pub chain: crate::core::gateway::config::ChainConfig,
    /// Gateway limits and admin token.
    #[serde(default)]
    pub gateway: crate::core::gateway::config::GatewayConfig,
    /// Classic Helm chart repositories.
    #[serde(default)]
    pub helm: Vec<crate::core::helm::HelmConfig>,
    /// Native only: where the audit log goes (default `<data_dir>/audit.log`; `-` for stderr).
    pub audit_log: Option<String>,
    /// Authentication on the mirror.
    #[serde(default)]
    pub auth: crate::core::access::AuthConfig,
    /// Users and robot accounts.
    #[serde(default)]
    pub identity: Vec<crate::core::access::IdentityConfig>,
    /// Authorization rules.
    #[serde(default)]
    pub access: Vec<crate::core::access::AccessRuleConfig>,
    /// Network allowlists.
    #[serde(default)]
    pub network: Vec<crate::core::access::NetworkRuleConfig>,
    /// Rate limits.
    #[serde(default)]
    pub rate_limit: crate::core::access::RateLimitConfig,
    /// Native only: the listener's timeouts and connection cap.
    #[serde(default)]
    pub server: ServerConfig,
    /// Internal addresses that upstream-chosen URLs (redirects, token realms, chart URLs)
    /// may reach.
    #[serde(default)]
    pub outbound: crate::core::outbound::OutboundConfig,
}

/// `[server]`: native only (the edge platforms run their own listeners).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// A request's line and headers must arrive within this long of the connection opening
    /// or of its first byte (default `10s`).
    pub header_timeout: Option<String>,
    /// A keep-alive connection with no request in flight is closed after this long
    /// (default `60s`).
    pub idle_timeout: Option<String>,
    /// Connections served at once; at the cap, accepting pauses until one closes
    /// (default `1024`).
    pub max_connections: Option<usize>,
    /// A request body pullgate reads (webhooks, stage results, token forms) must arrive
    /// within this long (default `60s`), so a body trickled a byte at a time cannot hold a
    /// connection.
    pub body_timeout: Option<String>,
}

/// `[cache]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Revalidate a tag with HEAD after this long (default `5m`).
    pub tag_ttl: Option<String>,
    /// Serve a known tag this long past its last successful check while the upstream fails
    /// (default `7d`).
    pub max_stale: Option<String>,
    /// Native eviction cap for blobs (default `50GiB`).
    pub max_size: Option<String>,
    /// Largest manifest accepted from an upstream (default `4MiB`).
    pub max_manifest_size: Option<String>,
    /// Upstream request timeout: connect and time to response headers, and longest silence
    /// while a body streams (default `30s`).
    pub upstream_timeout: Option<String>,
    /// Most blob fills in flight per instance (default 64); a further miss answers 503
    /// UNAVAILABLE with `Retry-After`.
    pub max_fills: Option<usize>,
}

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
}

/// A configuration error, with the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// A secret value. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a resolved value.
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    /// The value, for building an `Authorization` header and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Turns a secret reference (`env:NAME`, a binding name, a variable) into its value.
pub trait SecretResolver {
    /// Resolves `reference`; the error names the reference, never a value.
    fn resolve(&self, reference: &str) -> Result<Secret, ConfigError>;
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
}

/// Resolved settings the core runs on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Tag TTL in ms.
    pub tag_ttl_ms: u64,
    /// Maximum staleness in ms.
    pub max_stale_ms: u64,
    /// Blob cache cap in bytes.
    pub max_size: u64,
    /// Manifest size cap in bytes.
    pub max_manifest_size: u64,
    /// Upstream timeout in ms.
    pub upstream_timeout_ms: u64,
    /// Most blob fills in flight per instance.
    pub max_fills: usize,
    /// Upstreams; exactly one is `default`.
    pub upstreams: Vec<UpstreamSpec>,
    /// The build-trigger gateway.
    pub gateway: crate::core::gateway::config::GatewaySettings,
    /// Classic Helm chart repositories.
    pub helm: Vec<crate::core::helm::HelmRepo>,
    /// Access control, network rules and rate limits.
    pub access: crate::core::access::AccessSettings,
    /// The outbound address policy for upstream-chosen URLs (shared with the requests that
    /// carry it to the host, see `outbound::ChosenByUpstream`).
    pub outbound: std::sync::Arc<crate::core::outbound::OutboundPolicy>,
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

/// Parses a duration such as `90s`, `5m`, `2h`, `7d`, `250ms` or `0s` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, ConfigError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| ConfigError(format!("duration {s:?} needs a unit (ms, s, m, h, d)")))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| ConfigError(format!("duration {s:?} is not a number with a unit")))?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(ConfigError(format!(
                "duration {s:?}: unknown unit {unit:?}"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError(format!("duration {s:?} is too large")))
}

/// Parses a size such as `50GiB`, `512MiB`, `10GB` or `1024` (bytes).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| ConfigError(format!("size {s:?} is not a number with a unit")))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u => return Err(ConfigError(format!("size {s:?}: unknown unit {u:?}"))),
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError(format!("size {s:?} is too large")))
}

/// Parses the TOML configuration text.
pub fn parse_config(text: &str) -> Result<Config, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError(e.to_string()))
}

/// Lowercases a registry host and drops a default port, so `Docker.IO:443` is `docker.io`.
pub fn normalize_host(host: &str) -> String {
    let h = host.trim().trim_end_matches('/').to_ascii_lowercase();
    h.strip_suffix(":443").map(str::to_string).unwrap_or(h)
}

fn parse_upstream_url(host: &str, url: &str) -> Result<Url, ConfigError> {
    let u = Url::parse(url.trim_end_matches('/'))
        .map_err(|e| ConfigError(format!("upstream {host}: url {url:?}: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(ConfigError(format!(
            "upstream {host}: url {url:?} must be http:// or https:// with a host"
        )));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(ConfigError(format!(
            "upstream {host}: url {url:?} must not carry a query or fragment"
        )));
    }
    Ok(u)
}

fn resolve_secret(
    resolver: &dyn SecretResolver,
    host: &str,
    key: &str,
    reference: &str,
) -> Result<Secret, ConfigError> {
    if !reference.contains(':') {
        return Err(ConfigError(format!(
            "upstream {host}: {key} must be a secret reference such as \"env:NAME\", not a literal"
        )));
    }
    resolver.resolve(reference)
}

impl Config {
    /// Adds or replaces an upstream URL from `--upstream HOST=URL`.
    pub fn apply_upstream_flag(&mut self, flag: &str) -> Result<(), ConfigError> {
        let (host, url) = flag
            .split_once('=')
            .ok_or_else(|| ConfigError(format!("--upstream {flag:?} must be HOST=URL")))?;
        let host = normalize_host(host);
        if let Some(u) = self
            .upstream
            .iter_mut()
            .find(|u| normalize_host(&u.host) == host)
        {
            u.url = url.to_string();
        } else {
            self.upstream.push(UpstreamConfig {
                host,
                url: url.to_string(),
                aliases: vec![],
                default: false,
                username: None,
                password: None,
                library_prefix: None,
                auth_hosts: vec![],
            });
        }
        Ok(())
    }

    /// Resolves durations, sizes, the upstream list and secrets into [`Settings`].
    pub fn resolve(&self, secrets: &dyn SecretResolver) -> Result<Settings, ConfigError> {
        let c = &self.cache;
        let dur = |v: &Option<String>, d: &str| parse_duration_ms(v.as_deref().unwrap_or(d));
        let size = |v: &Option<String>, d: &str| parse_size(v.as_deref().unwrap_or(d));

        let mut list: Vec<UpstreamConfig> = Vec::new();
        if self.builtin_upstreams.unwrap_or(true) {
            for (host, url, aliases) in BUILTIN {
                list.push(UpstreamConfig {
                    host: host.to_string(),
                    url: url.to_string(),
                    aliases: aliases.iter().map(|a| a.to_string()).collect(),
                    default: *host == DOCKER_HUB,
                    username: None,
                    password: None,
                    library_prefix: None,
                    auth_hosts: vec![],
                });
            }
        }
        let any_default = self.upstream.iter().any(|u| u.default);
        if any_default {
            list.iter_mut().for_each(|u| u.default = false);
        }
        for u in &self.upstream {
            let host = normalize_host(&u.host);
            match list.iter_mut().find(|b| b.host == host) {
                // A configured entry for a built-in host keeps the built-in aliases and
                // default-ness unless it says otherwise.
                Some(b) => {
                    let mut merged = u.clone();
                    merged.host = host;
                    if merged.aliases.is_empty() {
                        merged.aliases = b.aliases.clone();
                    }
                    merged.default = u.default || (!any_default && b.default);
                    *b = merged;
                }
                None => {
                    let mut n = u.clone();
                    n.host = host;
                    list.push(n);
                }
            }
        }

        let mut upstreams = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        for u in list {
            let url = parse_upstream_url(&u.host, &u.url)?;
            let aliases: Vec<String> = u.aliases.iter().map(|a| normalize_host(a)).collect();
            for n in std::iter::once(&u.host).chain(aliases.iter()) {
                if seen.contains(n) {
                    return Err(ConfigError(format!(
                        "upstream name {n:?} is configured twice"
                    )));
                }
                seen.push(n.clone());
            }
            let credentials = match (&u.username, &u.password) {
                (Some(user), Some(pass)) => Some(Credentials {
                    username: resolve_secret(secrets, &u.host, "username", user)?,
                    password: resolve_secret(secrets, &u.host, "password", pass)?,
                }),
                (None, None) => None,
                _ => {
                    return Err(ConfigError(format!(
                        "upstream {}: username and password go together",
                        u.host
                    )))
                }
            };
            upstreams.push(UpstreamSpec {
                library_prefix: u.library_prefix.unwrap_or(u.host == DOCKER_HUB),
                host: u.host,
                aliases,
                url,
                default: u.default,
                credentials,
                auth_hosts: u.auth_hosts.iter().map(|h| normalize_host(h)).collect(),
            });
        }
        if upstreams.iter().filter(|u| u.default).count() > 1 {
            return Err(ConfigError(
                "more than one upstream has default = true".into(),
            ));
        }
        let mut settings = Settings {
            tag_ttl_ms: dur(&c.tag_ttl, "5m")?,
            max_stale_ms: dur(&c.max_stale, "7d")?,
            max_size: size(&c.max_size, "50GiB")?,
            max_manifest_size: size(&c.max_manifest_size, "4MiB")?,
            upstream_timeout_ms: dur(&c.upstream_timeout, "30s")?,
            max_fills: match c.max_fills {
                Some(0) => return Err(ConfigError("[cache] max_fills must be at least 1".into())),
                n => n.unwrap_or(64),
            },
            upstreams,
            gateway: crate::core::gateway::config::resolve(
                crate::core::gateway::config::GatewayInput {
                    webhooks: &self.webhook,
                    targets: &self.target,
                    rules: &self.rule,
                    stages: &self.stage,
                    chain: &self.chain,
                    gateway: &self.gateway,
                },
                secrets,
            )?,
            helm: crate::core::helm::resolve(&self.helm)?,
            access: crate::core::access::resolve(
                crate::core::access::AccessInput {
                    auth: &self.auth,
                    identities: &self.identity,
                    rules: &self.access,
                    networks: &self.network,
                    rate_limit: &self.rate_limit,
                },
                secrets,
            )?,
            outbound: Default::default(),
        };
        settings.outbound = crate::core::outbound::resolve(&self.outbound)?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct MapSecrets;
    impl SecretResolver for MapSecrets {
        fn resolve(&self, r: &str) -> Result<Secret, ConfigError> {
            match r {
                "env:USER" => Ok(Secret::new("alice".into())),
                "env:PASS" => Ok(Secret::new("hunter2".into())),
                _ => Err(ConfigError(format!("secret {r} is not set"))),
            }
        }
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration_ms("5m").unwrap(), 300_000);
        assert_eq!(parse_duration_ms("7d").unwrap(), 604_800_000);
        assert_eq!(parse_duration_ms("0s").unwrap(), 0);
        assert_eq!(parse_duration_ms("250ms").unwrap(), 250);
        assert!(parse_duration_ms("5").is_err());
        assert!(parse_duration_ms("5y").is_err());
        assert_eq!(parse_size("50GiB").unwrap(), 50 << 30);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn defaults_include_docker_hub_as_default() {
        let s = Config::default().resolve(&MapSecrets).unwrap();
        let hub = s.upstreams.iter().find(|u| u.default).unwrap();
        assert_eq!(hub.host, "docker.io");
        assert!(hub.library_prefix);
        assert_eq!(s.tag_ttl_ms, 300_000);
        assert!(s
            .upstreams
            .iter()
            .any(|u| u.host == "ghcr.io" && !u.library_prefix));
    }

    #[test]
    fn upstream_flag_replaces_docker_hub_url_and_adds_hosts() {
        let mut c = Config::default();
        c.apply_upstream_flag("docker.io=http://127.0.0.1:5001")
            .unwrap();
        c.apply_upstream_flag("Reg.Test=http://127.0.0.1:5002/")
            .unwrap();
        let s = c.resolve(&MapSecrets).unwrap();
        let hub = s.upstreams.iter().find(|u| u.host == "docker.io").unwrap();
        assert!(hub.default && hub.library_prefix);
        assert_eq!(hub.url.as_str(), "http://127.0.0.1:5001/");
        assert!(hub.aliases.contains(&"index.docker.io".to_string()));
        assert!(s.upstreams.iter().any(|u| u.host == "reg.test"));
        assert!(c.apply_upstream_flag("nohost").is_err());
    }

    #[test]
    fn secrets_are_references_and_never_printed() {
        let c = parse_config(
            r#"
            [cache]
            tag_ttl = "1m"
            [[upstream]]
            host = "private.example"
            url = "https://private.example"
            username = "env:USER"
            password = "env:PASS"
            "#,
        )
        .unwrap();
        let s = c.resolve(&MapSecrets).unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("hunter2") && !printed.contains("alice"));
        let literal = parse_config(
            "[[upstream]]\nhost = \"p.example\"\nurl = \"https://p.example\"\nusername = \"u\"\npassword = \"hunter2\"\n",
        )
        .unwrap();
        let err = literal.resolve(&MapSecrets).unwrap_err().to_string();
        assert!(
            err.contains("reference") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        assert!(parse_config("[cache]\nttl = 3").is_err());
        let c = parse_config("[[upstream]]\nhost = \"x.io\"\nurl = \"ftp://x.io\"").unwrap();
        assert!(c.resolve(&MapSecrets).is_err());
        let twice = parse_config(
            "[[upstream]]\nhost=\"a.io\"\nurl=\"https://a.io\"\ndefault=true\n[[upstream]]\nhost=\"b.io\"\nurl=\"https://b.io\"\ndefault=true",
        )
        .unwrap();
        assert!(twice.resolve(&MapSecrets).is_err());
    }

    #[test]
    fn max_fills_defaults_to_64_and_refuses_zero() {
        let s = Config::default().resolve(&MapSecrets).unwrap();
        assert_eq!(s.max_fills, 64);
        let c = parse_config("[cache]\nmax_fills = 2").unwrap();
        assert_eq!(c.resolve(&MapSecrets).unwrap().max_fills, 2);
        let zero = parse_config("[cache]\nmax_fills = 0").unwrap();
        assert!(zero.resolve(&MapSecrets).is_err());
    }
}
