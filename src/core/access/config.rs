//! `[auth]`, `[[identity]]`, `[[access]]`, `[[network]]` and `[rate_limit]`: the access
//! layer's configuration and its resolution into [`AccessSettings`].

use crate::core::access::limit::{parse_rate, LoginPolicy, Rate};
use crate::core::cidr::{parse_cidr, Cidr};
use crate::core::config::value::{parse_duration_ms, ConfigError, Secret, SecretResolver};
use argon2::password_hash::{Output, PasswordHash};
use serde::Deserialize;

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Require authentication (default false: anyone may pull).
    pub enabled: Option<bool>,
    /// Reference to the key that signs pullgate's tokens.
    pub token_secret: Option<String>,
    /// Token lifetime (default `5m`).
    pub token_ttl: Option<String>,
    /// The URL clients reach pullgate at; the realm is `<public_url>/token`. Required when
    /// `enabled` (a realm taken from the request's `Host` would be the client's to choose).
    pub public_url: Option<String>,
    /// The `service` in challenges (default `pullgate`).
    pub service: Option<String>,
}

/// `[[identity]]`: a user or robot account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Account name.
    pub name: String,
    /// An argon2 PHC hash (`pullgate hash-password` prints one).
    pub password_hash: Option<String>,
    /// Or a reference to a static token (robots; usable as the Basic password or a Bearer).
    pub token: Option<String>,
    /// Groups for rules (`group:<name>`).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `[[access]]`: what identities may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRuleConfig {
    /// Names, `group:<g>`, `anonymous`, or `*` (any authenticated identity).
    pub who: Vec<String>,
    /// Upstream host globs (default `*`).
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Repository globs (default `*`).
    #[serde(default)]
    pub repositories: Vec<String>,
    /// `pull`, `trigger`, `admin`.
    pub actions: Vec<String>,
}

/// `[[network]]`: which addresses may use a route family.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRuleConfig {
    /// `registry` (`/v2`, `/token`), `charts`, `hooks`, `admin` (`/admin`, `/chain`), `metrics`.
    pub routes: Vec<String>,
    /// CIDRs allowed.
    pub allow: Vec<String>,
}

/// `[rate_limit]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Per authenticated identity, e.g. `50/s`.
    pub per_identity: Option<String>,
    /// Per client address, e.g. `20/s`.
    pub per_ip: Option<String>,
    /// Bucket size (default: one second's worth, at least 1).
    pub burst: Option<u32>,
    /// Failed logins per client address and per user name before a lockout (default 5; 0
    /// turns lockouts off). Only counted with `[auth] enabled = true`.
    pub login_failures: Option<u32>,
    /// The first lockout (default `1s`); each further failure doubles it.
    pub lockout: Option<String>,
    /// The longest lockout (default `5m`); failures are forgotten this long after the last
    /// lockout ended.
    pub max_lockout: Option<String>,
}

/// A resolved identity.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Name.
    pub name: String,
    /// PHC hash.
    pub password_hash: Option<String>,
    /// Static token.
    pub token: Option<Secret>,
    /// Groups.
    pub groups: Vec<String>,
}

/// A resolved access rule.
#[derive(Debug, Clone)]
pub struct AccessRule {
    /// Who.
    pub who: Vec<String>,
    /// Upstream globs.
    pub upstreams: Vec<String>,
    /// Repository globs.
    pub repositories: Vec<String>,
    /// Actions.
    pub actions: Vec<String>,
}

/// Route families for network rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteFamily {
    /// `/v2/…`, `/token`.
    Registry,
    /// `/charts/…`.
    Charts,
    /// `/hooks/…`.
    Hooks,
    /// `/admin/…`, `/chain…`.
    Admin,
    /// `/metrics` and the probes `/healthz`, `/livez`, `/readyz`.
    Metrics,
}

/// The family a path belongs to.
pub fn route_family(path: &str) -> RouteFamily {
    if path.starts_with("/hooks/") {
        RouteFamily::Hooks
    } else if path.starts_with("/admin") || path.starts_with("/chain") {
        RouteFamily::Admin
    } else if path.starts_with("/charts/") {
        RouteFamily::Charts
    } else if matches!(path, "/metrics" | "/healthz" | "/livez" | "/readyz") {
        RouteFamily::Metrics
    } else {
        RouteFamily::Registry
    }
}

/// Resolved access settings.
#[derive(Debug, Clone, Default)]
pub struct AccessSettings {
    /// Authentication required.
    pub enabled: bool,
    /// Token key.
    pub token_key: Option<Secret>,
    /// Token lifetime.
    pub token_ttl_ms: u64,
    /// Realm base.
    pub public_url: Option<String>,
    /// Service name.
    pub service: String,
    /// Identities.
    pub identities: Vec<Identity>,
    /// Rules.
    pub rules: Vec<AccessRule>,
    /// Network rules: families and the CIDRs allowed for them.
    pub networks: Vec<(Vec<RouteFamily>, Vec<Cidr>)>,
    /// Per-identity rate.
    pub per_identity: Option<Rate>,
    /// Per-IP rate.
    pub per_ip: Option<Rate>,
    /// Bucket size.
    pub burst: Option<u32>,
    /// Failed-login lockouts.
    pub login: LoginPolicy,
    /// The PHC string unknown names (and token-only identities) are verified against: the
    /// first identity's hash with its output zeroed, so the check costs the same. None: the
    /// default parameters ([`DEFAULT_DUMMY_HASH`]).
    pub dummy_hash: Option<String>,
}

/// An argon2id PHC string with the `hash-password` parameters (m=19456 KiB, t=2, p=1) and an
/// all-zero output no password produces: what a password check runs against when there is
/// no identity hash to imitate.
pub const DEFAULT_DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

impl AccessSettings {
    /// What password checks without an identity hash verify against.
    pub fn dummy_hash(&self) -> &str {
        self.dummy_hash.as_deref().unwrap_or(DEFAULT_DUMMY_HASH)
    }
}

/// `phc` with its output replaced by zeros of the same length: verifying against it costs
/// what verifying against `phc` costs, and no password matches.
pub(crate) fn dummy_like(phc: &str) -> Option<String> {
    let mut ph = PasswordHash::new(phc).ok()?;
    let len = ph.hash?.len();
    let zeros = vec![0u8; len];
    ph.hash = Some(Output::new(&zeros).ok()?);
    Some(ph.to_string())
}

/// Checks `[auth] public_url`: an absolute http(s) URL without query or fragment.
fn parse_public_url(u: &str) -> Result<String, ConfigError> {
    let bad = || {
        ConfigError(format!(
            "[auth] public_url {u:?} must be an absolute http(s) URL without query or fragment, \
             such as \"https://pullgate.example\""
        ))
    };
    let parsed = url::Url::parse(u).map_err(|_| bad())?;
    if !matches!(parsed.scheme(), "http" | "https")
        || parsed.host_str().is_none()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        return Err(bad());
    }
    Ok(u.trim_end_matches('/').to_string())
}

/// The parts of the configuration the access layer reads.
pub struct AccessInput<'a> {
    /// `[auth]`.
    pub auth: &'a AuthConfig,
    /// `[[identity]]`.
    pub identities: &'a [IdentityConfig],
    /// `[[access]]`.
    pub rules: &'a [AccessRuleConfig],
    /// `[[network]]`.
    pub networks: &'a [NetworkRuleConfig],
    /// `[rate_limit]`.
    pub rate_limit: &'a RateLimitConfig,
}

fn family(s: &str) -> Result<RouteFamily, ConfigError> {
    Ok(match s {
        "registry" => RouteFamily::Registry,
        "charts" => RouteFamily::Charts,
        "hooks" => RouteFamily::Hooks,
        "admin" => RouteFamily::Admin,
        "metrics" => RouteFamily::Metrics,
        o => {
            return Err(ConfigError(format!(
                "network: route family {o:?} is not known"
            )))
        }
    })
}

/// Resolves and checks the access configuration.
pub fn resolve(i: AccessInput<'_>, r: &dyn SecretResolver) -> Result<AccessSettings, ConfigError> {
    let enabled = i.auth.enabled.unwrap_or(false);
    let token_key = match &i.auth.token_secret {
        Some(x) if x.contains(':') => Some(r.resolve(x)?),
        Some(_) => {
            return Err(ConfigError(
                "[auth] token_secret must be a secret reference such as \"env:NAME\"".into(),
            ))
        }
        None => None,
    };
    if enabled && token_key.is_none() {
        return Err(ConfigError(
            "[auth] enabled = true needs token_secret".into(),
        ));
    }
    let public_url = match &i.auth.public_url {
        Some(u) => Some(parse_public_url(u)?),
        None if enabled => {
            return Err(ConfigError(
                "[auth] enabled = true needs public_url: the URL clients reach pullgate at, \
                 such as \"https://pullgate.example\" (the token realm is <public_url>/token)"
                    .into(),
            ))
        }
        None => None,
    };
    let mut identities: Vec<Identity> = Vec::new();
    for id in i.identities {
        if identities.iter().any(|x| x.name == id.name) {
            return Err(ConfigError(format!(
                "identity name {:?} is reserved, empty or repeated",
                id.name
            )));
        }
        identities.push(resolve_identity(id, r)?);
    }
    let rules = i.rules.iter().map(resolve_rule).collect::<Result<_, _>>()?;
    let networks = i
        .networks
        .iter()
        .map(resolve_network)
        .collect::<Result<_, _>>()?;
    let rate = |v: &Option<String>| {
        v.as_deref()
            .map(|s| {
                parse_rate(s)
                    .ok_or_else(|| ConfigError(format!("rate {s:?}: use <n>/s, <n>/m or <n>/h")))
            })
            .transpose()
    };
    let dummy_hash = identities
        .iter()
        .find_map(|id| id.password_hash.as_deref().and_then(dummy_like));
    Ok(AccessSettings {
        enabled,
        token_key,
        token_ttl_ms: parse_duration_ms(i.auth.token_ttl.as_deref().unwrap_or("5m"))?,
        public_url,
        service: i.auth.service.clone().unwrap_or_else(|| "pullgate".into()),
        identities,
        rules,
        networks,
        per_identity: rate(&i.rate_limit.per_identity)?,
        per_ip: rate(&i.rate_limit.per_ip)?,
        burst: i.rate_limit.burst,
        login: resolve_login(i.rate_limit)?,
        dummy_hash,
    })
}

/// One `[[identity]]`: a name that is not reserved, a PHC hash and/or a token reference.
fn resolve_identity(id: &IdentityConfig, r: &dyn SecretResolver) -> Result<Identity, ConfigError> {
    if id.name == "anonymous" || id.name.is_empty() {
        return Err(ConfigError(format!(
            "identity name {:?} is reserved, empty or repeated",
            id.name
        )));
    }
    if let Some(h) = &id.password_hash {
        PasswordHash::new(h).map_err(|_| {
            ConfigError(format!(
                "identity {}: password_hash is not a PHC string",
                id.name
            ))
        })?;
    }
    let token = match &id.token {
        Some(x) if x.contains(':') => Some(r.resolve(x)?),
        Some(_) => {
            return Err(ConfigError(format!(
                "identity {}: token must be a secret reference",
                id.name
            )))
        }
        None => None,
    };
    if id.password_hash.is_none() && token.is_none() {
        return Err(ConfigError(format!(
            "identity {}: needs password_hash or token",
            id.name
        )));
    }
    Ok(Identity {
        name: id.name.clone(),
        password_hash: id.password_hash.clone(),
        token,
        groups: id.groups.clone(),
    })
}

/// One `[[access]]` rule; empty upstream or repository lists mean all.
fn resolve_rule(rule: &AccessRuleConfig) -> Result<AccessRule, ConfigError> {
    for a in &rule.actions {
        if !matches!(a.as_str(), "pull" | "trigger" | "admin") {
            return Err(ConfigError(format!(
                "access: action {a:?} is not pull, trigger or admin"
            )));
        }
    }
    let or_all = |v: &Vec<String>| {
        if v.is_empty() {
            vec!["*".to_string()]
        } else {
            v.clone()
        }
    };
    Ok(AccessRule {
        who: rule.who.clone(),
        upstreams: or_all(&rule.upstreams),
        repositories: or_all(&rule.repositories),
        actions: rule.actions.clone(),
    })
}

/// One `[[network]]` rule: route families and the addresses allowed for them.
fn resolve_network(n: &NetworkRuleConfig) -> Result<(Vec<RouteFamily>, Vec<Cidr>), ConfigError> {
    let fams = n
        .routes
        .iter()
        .map(|f| family(f))
        .collect::<Result<Vec<_>, _>>()?;
    let cidrs = n
        .allow
        .iter()
        .map(|c| {
            parse_cidr(c)
                .ok_or_else(|| ConfigError(format!("network: {c:?} is not an address or CIDR")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((fams, cidrs))
}

/// The failed-login lockout policy of `[rate_limit]`.
fn resolve_login(r: &RateLimitConfig) -> Result<LoginPolicy, ConfigError> {
    let login = LoginPolicy {
        failures: r.login_failures.unwrap_or(LoginPolicy::default().failures),
        lockout_ms: parse_duration_ms(r.lockout.as_deref().unwrap_or("1s"))?,
        max_lockout_ms: parse_duration_ms(r.max_lockout.as_deref().unwrap_or("5m"))?,
    };
    if login.lockout_ms == 0 || login.max_lockout_ms < login.lockout_ms {
        return Err(ConfigError(
            "[rate_limit] lockout must be more than 0 and at most max_lockout".into(),
        ));
    }
    Ok(login)
}
