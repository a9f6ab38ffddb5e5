//! The configuration schema every host reads (native: `--config FILE`; Workers and Spin: one
//! variable holding the same TOML), and its resolution into [`Settings`].
//!
//! Parsing is pure. Secrets are never literals: `username`/`password` hold references
//! (`env:NAME` on the native host) that the host's [`SecretResolver`] turns into values; a
//! resolved secret is a [`Secret`], whose `Debug` prints nothing of it.

pub mod log;
pub mod value;

pub use crate::core::registry::config::{
    check_upstream, Credentials, UpstreamConfig, UpstreamSpec, DOCKER_HUB,
};
use crate::core::registry::config::{resolve_upstreams, upstream_flag};
pub use log::{LogConfig, LogFormat, LogSettings};
pub use value::{
    normalize_host, parse_duration_ms, parse_size, ConfigError, Secret, SecretResolver,
};

use serde::Deserialize;

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
    pub helm: Vec<crate::core::helm::config::HelmConfig>,
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
    /// Logging: filter, format, access events, fill progress.
    #[serde(default)]
    pub log: LogConfig,
    /// Peers (CIDRs) whose forwarding header and PROXY protocol header name the client
    /// (default: none; see `forwarded`).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The header trusted proxies write the client into: `x-forwarded-for` (default) or
    /// `forwarded` (RFC 7239). The other one is never read.
    pub forwarded_header: Option<String>,
    /// Native only: TLS on the listener.
    #[serde(default)]
    pub tls: TlsConfig,
}

/// `[tls]`: native only. Both or neither; reloaded on SIGHUP and when the files change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<String>,
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
    /// On SIGTERM/SIGINT, after the listener closes, how long in-flight requests and fills get
    /// to finish (default `25s`, below Kubernetes' 30 s grace period; `--drain` overrides).
    pub drain: Option<String>,
    /// On SIGTERM/SIGINT, how long the listener keeps accepting with `/readyz` answering 503
    /// before it closes (default `0s`; a second signal ends it), for load balancers that poll
    /// `/readyz`.
    pub unready_delay: Option<String>,
    /// Serving threads, each with its own event loop and core instance (default: the
    /// machine's available cores).
    pub workers: Option<usize>,
    /// Read a PROXY protocol (v1 or v2) header at the start of connections from
    /// `trusted_proxies` (default false); from any other peer such a header closes the
    /// connection.
    pub proxy_protocol: Option<bool>,
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
    pub helm: Vec<crate::core::helm::config::HelmRepo>,
    /// Access control, network rules and rate limits.
    pub access: crate::core::access::AccessSettings,
    /// The outbound address policy for upstream-chosen URLs (shared with the requests that
    /// carry it to the host, see `outbound::ChosenByUpstream`).
    pub outbound: std::sync::Arc<crate::core::outbound::OutboundPolicy>,
    /// `[log]`.
    pub log: LogSettings,
    /// `trusted_proxies` and `forwarded_header`: whose word about the client's address a
    /// host believes.
    pub trusted_proxies: crate::core::forwarded::TrustedProxies,
}

/// The one configuration bootstrap every host runs: the text (None: the defaults) from
/// `source` (a file path, a variable name), the `--upstream HOST=URL` overrides, then
/// resolution with the host's secrets. Every error is prefixed with `source`. Returns the
/// parsed file too, for the host's own sections (`[server]`, `listen`, `data_dir`).
pub fn load(
    source: &str,
    text: Option<&str>,
    upstream_flags: &[String],
    secrets: &dyn SecretResolver,
) -> Result<(Config, Settings), ConfigError> {
    let at = |e: ConfigError| ConfigError(format!("{source}: {}", e.0));
    let mut config = match text {
        Some(t) => parse_config(t).map_err(at)?,
        None => Config::default(),
    };
    for u in upstream_flags {
        config.apply_upstream_flag(u)?;
    }
    let settings = config.resolve(secrets).map_err(at)?;
    Ok((config, settings))
}

/// Parses the TOML configuration text.
pub fn parse_config(text: &str) -> Result<Config, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError(e.to_string()))
}

impl Settings {
    /// Refuses `ca_file` (on `[[upstream]]`, `[[helm]]`, `[[target]]`) for a host whose
    /// outbound HTTP cannot add trust roots (Workers, Spin): the entries that set one.
    pub fn refuse_ca_files(&self) -> Result<(), ConfigError> {
        let users: Vec<String> = self
            .upstreams
            .iter()
            .filter(|u| u.ca.is_some())
            .map(|u| format!("upstream {}", u.host))
            .chain(
                self.helm
                    .iter()
                    .filter(|h| h.ca.is_some())
                    .map(|h| format!("helm {}", h.name)),
            )
            .chain(
                self.gateway
                    .targets
                    .iter()
                    .filter(|t| t.ca.is_some())
                    .map(|t| format!("target {}", t.name)),
            )
            .collect();
        if users.is_empty() {
            return Ok(());
        }
        Err(ConfigError(format!(
            "ca_file is not supported on this host (its outbound HTTP trusts only the platform's roots): {}",
            users.join(", ")
        )))
    }

    /// The freshness rule of tag records, tag lists and chart indexes.
    pub fn freshness(&self) -> crate::core::freshness::Freshness {
        crate::core::freshness::Freshness {
            ttl_ms: self.tag_ttl_ms,
            max_stale_ms: self.max_stale_ms,
        }
    }
}

impl Config {
    /// Adds or replaces an upstream URL from `--upstream HOST=URL`.
    pub fn apply_upstream_flag(&mut self, flag: &str) -> Result<(), ConfigError> {
        upstream_flag(&mut self.upstream, flag)
    }

    /// Resolves durations, sizes, the upstream list and secrets into [`Settings`]; each
    /// feature resolves its own part.
    pub fn resolve(&self, secrets: &dyn SecretResolver) -> Result<Settings, ConfigError> {
        let c = &self.cache;
        let dur = |v: &Option<String>, d: &str| parse_duration_ms(v.as_deref().unwrap_or(d));
        let size = |v: &Option<String>, d: &str| parse_size(v.as_deref().unwrap_or(d));
        Ok(Settings {
            tag_ttl_ms: dur(&c.tag_ttl, "5m")?,
            max_stale_ms: dur(&c.max_stale, "7d")?,
            max_size: size(&c.max_size, "50GiB")?,
            max_manifest_size: size(&c.max_manifest_size, "4MiB")?,
            upstream_timeout_ms: dur(&c.upstream_timeout, "30s")?,
            max_fills: match c.max_fills {
                Some(0) => return Err(ConfigError("[cache] max_fills must be at least 1".into())),
                n => n.unwrap_or(64),
            },
            upstreams: resolve_upstreams(
                self.builtin_upstreams.unwrap_or(true),
                &self.upstream,
                secrets,
            )?,
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
            helm: crate::core::helm::config::resolve(&self.helm)?,
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
            outbound: crate::core::outbound::resolve(&self.outbound)?,
            log: self.log.resolve()?,
            trusted_proxies: crate::core::forwarded::parse_trusted_proxies(
                &self.trusted_proxies,
                self.forwarded_header.as_deref(),
            )
            .map_err(ConfigError)?,
        })
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
    fn a_url_with_credentials_is_refused_without_echoing_them() {
        let mut c = Config::default();
        c.apply_upstream_flag("docker.io=http://puller:hunter3@127.0.0.1:5001")
            .unwrap();
        let e = c.resolve(&MapSecrets).unwrap_err().to_string();
        assert!(
            e.contains("upstream docker.io") && e.contains("***@127.0.0.1:5001"),
            "{e}"
        );
        assert!(!e.contains("hunter3") && !e.contains("puller"), "{e}");
        // A URL that does not parse is shown redacted too.
        let mut c = Config::default();
        c.apply_upstream_flag("docker.io=http://puller:hunter3@127.0.0.1:99999")
            .unwrap();
        let e = c.resolve(&MapSecrets).unwrap_err().to_string();
        assert!(!e.contains("hunter3"), "{e}");
        for text in [
            "[[target]]\nname = \"ci\"\nkind = \"http\"\nurl = \"https://bot:hunter3@ci.test/hook\"\nsecret = \"env:PASS\"\n",
            "[[helm]]\nname = \"charts\"\nurl = \"https://bot:hunter3@charts.test/stable\"\n",
        ] {
            let e = parse_config(text)
                .and_then(|c| c.resolve(&MapSecrets))
                .unwrap_err()
                .to_string();
            assert!(e.contains("user name or password") && !e.contains("hunter3"), "{e}");
        }
        assert_eq!(
            value::redact_url("https://a:b@h.test:8/p"),
            "https://***@h.test:8/p"
        );
        for odd in [
            "http://u:pa/ss@h.test",
            "http://u:pa#ss@h.test",
            "u:pa?ss@h.test",
        ] {
            let shown = value::redact_url(odd);
            assert!(
                !shown.contains("pa") && shown.ends_with("***@h.test"),
                "{shown}"
            );
        }
        assert_eq!(value::redact_url("https://h.test/p"), "https://h.test/p");
        let mut c = Config::default();
        let e = c
            .apply_upstream_flag("http://puller:hunter3@127.0.0.1:5001")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter3"), "{e}");
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
    fn ca_files_are_named_when_a_host_refuses_them() {
        let none = Config::default().resolve(&MapSecrets).unwrap();
        assert!(none.refuse_ca_files().is_ok());
        let c = parse_config(
            "[[upstream]]\nhost = \"r.example\"\nurl = \"https://r.example\"\nca_file = \"/ca.pem\"\n[[helm]]\nname = \"h\"\nurl = \"https://h.example\"\nca_file = \"/ca.pem\"\n",
        )
        .unwrap();
        let e = c
            .resolve(&MapSecrets)
            .unwrap()
            .refuse_ca_files()
            .unwrap_err();
        let e = e.to_string();
        assert!(e.contains("not supported on this host"), "{e}");
        assert!(
            e.contains("upstream r.example") && e.contains("helm h"),
            "{e}"
        );
        let empty =
            parse_config("[[helm]]\nname = \"h\"\nurl = \"https://h.example\"\nca_file = \"\"\n")
                .unwrap();
        assert!(empty.resolve(&MapSecrets).is_err());
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
