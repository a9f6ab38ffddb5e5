//! Who may pull, how much, and from where: authentication on the mirror (Docker's token flow:
//! `GET /v2/` → 401 with a Bearer challenge → `GET /token` with Basic credentials → a short-
//! lived signed token), authorization rules over upstream and repository globs, network
//! allowlists per route family, and token-bucket rate limits. Off by default for a local run;
//! required for any public deployment (README: "Running it in public").
//!
//! The decisions are pure; the only inputs from the host are the request headers and the
//! client address it puts in the request's extensions ([`ClientAddr`]), which each host fills
//! only from what its platform guarantees (the socket natively).
//!
//! Logins: every password check runs exactly one argon2 verification, through the
//! [`Offload`] port (off the event loop natively): against the identity's hash, or, for an
//! unknown name or an identity with only a static token, against a dummy hash with the same
//! parameters ([`AccessSettings::dummy_hash`]), so the answer time does not tell which names
//! exist. The gate throttles before any check (see [`gate`] and [`limit`]).

pub mod gate;
#[cfg(test)]
mod gate_tests;
pub mod limit;
pub mod token;

use crate::core::cidr::{parse_cidr, Cidr};
use crate::core::config::{parse_duration_ms, ConfigError, Secret, SecretResolver};
use crate::core::gateway::rules::glob_match;
use crate::core::ports::{offload, Offload};
use argon2::password_hash::{Output, PasswordHash};
use argon2::{Argon2, PasswordVerifier};
use http::HeaderMap;
use limit::{parse_rate, LoginPolicy, Rate};
use serde::Deserialize;
use std::net::IpAddr;
use subtle::ConstantTimeEq;

/// The client's address, as the host knows it, in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

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
    /// `/metrics`, `/healthz`.
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
    } else if path == "/metrics" || path == "/healthz" {
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
fn dummy_like(phc: &str) -> Option<String> {
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
    let mut identities = Vec::new();
    for id in i.identities {
        if identities.iter().any(|x: &Identity| x.name == id.name)
            || id.name == "anonymous"
            || id.name.is_empty()
        {
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
        identities.push(Identity {
            name: id.name.clone(),
            password_hash: id.password_hash.clone(),
            token,
            groups: id.groups.clone(),
        });
    }
    let mut rules = Vec::new();
    for rule in i.rules {
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
        rules.push(AccessRule {
            who: rule.who.clone(),
            upstreams: or_all(&rule.upstreams),
            repositories: or_all(&rule.repositories),
            actions: rule.actions.clone(),
        });
    }
    let mut networks = Vec::new();
    for n in i.networks {
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
        networks.push((fams, cidrs));
    }
    let rate = |v: &Option<String>| {
        v.as_deref()
            .map(|s| {
                parse_rate(s)
                    .ok_or_else(|| ConfigError(format!("rate {s:?}: use <n>/s, <n>/m or <n>/h")))
            })
            .transpose()
    };
    let login = LoginPolicy {
        failures: i
            .rate_limit
            .login_failures
            .unwrap_or(LoginPolicy::default().failures),
        lockout_ms: parse_duration_ms(i.rate_limit.lockout.as_deref().unwrap_or("1s"))?,
        max_lockout_ms: parse_duration_ms(i.rate_limit.max_lockout.as_deref().unwrap_or("5m"))?,
    };
    if login.lockout_ms == 0 || login.max_lockout_ms < login.lockout_ms {
        return Err(ConfigError(
            "[rate_limit] lockout must be more than 0 and at most max_lockout".into(),
        ));
    }
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
        login,
        dummy_hash,
    })
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Identity name, or `anonymous`.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Scopes carried by a pullgate token (canonical names and actions).
    pub grants: Option<Vec<token::Grant>>,
}

impl Principal {
    /// The anonymous principal.
    pub fn anonymous() -> Principal {
        Principal {
            name: "anonymous".into(),
            groups: vec![],
            grants: None,
        }
    }
    /// True for the anonymous principal.
    pub fn is_anonymous(&self) -> bool {
        self.name == "anonymous"
    }
}

/// Why credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Unknown user, wrong password, bad or expired token.
    #[error("invalid credentials")]
    Invalid,
    /// An `Authorization` header pullgate does not understand.
    #[error("unsupported authorization scheme")]
    Scheme,
}

fn identity_by_token<'a>(s: &'a AccessSettings, given: &str) -> Option<&'a Identity> {
    s.identities
        .iter()
        .find(|i| i.token.as_ref().is_some_and(|t| is_token(t, given)))
}

fn is_token(t: &Secret, given: &str) -> bool {
    t.expose().len() == given.len() && bool::from(t.expose().as_bytes().ct_eq(given.as_bytes()))
}

fn verify_hash(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|ph| {
        Argon2::default()
            .verify_password(password.as_bytes(), &ph)
            .is_ok()
    })
}

/// Checks `user:password` against the identities (argon2 hashes or static tokens). Exactly
/// one argon2 verification runs through `o` whatever the name: the identity's hash, or the
/// dummy for unknown names and token-only identities. With no identities at all there is
/// nothing to protect or enumerate, and nothing runs.
pub async fn check_password(
    s: &AccessSettings,
    o: &dyn Offload,
    user: &str,
    password: &str,
) -> Result<Principal, AuthError> {
    if s.identities.is_empty() {
        return Err(AuthError::Invalid);
    }
    let id = s.identities.iter().find(|i| i.name == user);
    let own_hash = id.and_then(|i| i.password_hash.clone());
    let phc = own_hash
        .clone()
        .unwrap_or_else(|| s.dummy_hash().to_string());
    let given = password.to_string();
    let hash_ok = offload(o, move || verify_hash(&phc, &given))
        .await
        .unwrap_or(false);
    let Some(id) = id else {
        return Err(AuthError::Invalid);
    };
    let ok =
        (own_hash.is_some() && hash_ok) || id.token.as_ref().is_some_and(|t| is_token(t, password));
    if ok {
        Ok(Principal {
            name: id.name.clone(),
            groups: id.groups.clone(),
            grants: None,
        })
    } else {
        Err(AuthError::Invalid)
    }
}

/// The credentials a request presents, before any check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    /// No `Authorization`.
    Nothing,
    /// Basic, with the user name when it decodes.
    Basic(Option<String>),
    /// A Bearer token.
    Bearer,
    /// Anything else.
    Other,
}

/// What `Authorization` holds, without checking it.
pub fn presented(h: &HeaderMap) -> Presented {
    let Some(v) = h.get(http::header::AUTHORIZATION) else {
        return Presented::Nothing;
    };
    match v.to_str() {
        Ok(t) if t.starts_with("Bearer ") => Presented::Bearer,
        Ok(t) if t.starts_with("Basic ") || t.starts_with("basic ") => {
            Presented::Basic(basic_credentials(h).and_then(|r| r.ok()).map(|(u, _)| u))
        }
        _ => Presented::Other,
    }
}

/// Decodes `Authorization: Basic …` into (user, password).
pub fn basic_credentials(h: &HeaderMap) -> Option<Result<(String, String), AuthError>> {
    use base64::Engine as _;
    let v = h.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let raw = match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
        Ok(r) => r,
        Err(_) => return Some(Err(AuthError::Invalid)),
    };
    let text = String::from_utf8(raw).ok()?;
    Some(
        text.split_once(':')
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .ok_or(AuthError::Invalid),
    )
}

/// Who sent this request: anonymous without `Authorization`; an error for bad credentials.
/// Basic passwords are checked with [`check_password`] (argon2 through `o`).
pub async fn authenticate(
    s: &AccessSettings,
    o: &dyn Offload,
    h: &HeaderMap,
    now_ms: u64,
) -> Result<Principal, AuthError> {
    let Some(v) = h.get(http::header::AUTHORIZATION) else {
        return Ok(Principal::anonymous());
    };
    let v = v.to_str().map_err(|_| AuthError::Scheme)?;
    if let Some(bearer) = v.strip_prefix("Bearer ") {
        let bearer = bearer.trim();
        if let Some(key) = &s.token_key {
            if let Some(c) = token::verify(key.expose().as_bytes(), bearer, now_ms) {
                let groups = s
                    .identities
                    .iter()
                    .find(|i| i.name == c.sub)
                    .map(|i| i.groups.clone())
                    .unwrap_or_default();
                return Ok(Principal {
                    name: c.sub,
                    groups,
                    grants: Some(c.access),
                });
            }
        }
        return identity_by_token(s, bearer)
            .map(|i| Principal {
                name: i.name.clone(),
                groups: i.groups.clone(),
                grants: None,
            })
            .ok_or(AuthError::Invalid);
    }
    match basic_credentials(h) {
        Some(Ok((u, p))) => check_password(s, o, &u, &p).await,
        Some(Err(e)) => Err(e),
        None => Err(AuthError::Scheme),
    }
}

fn who_matches(who: &str, p: &Principal) -> bool {
    match who {
        "anonymous" => p.is_anonymous(),
        "*" => !p.is_anonymous(),
        w => match w.strip_prefix("group:") {
            Some(g) => p.groups.iter().any(|x| x == g),
            None => !p.is_anonymous() && w == p.name,
        },
    }
}

/// May `p` do `action` on `upstream`/`repository` under the rules?
pub fn is_allowed(
    s: &AccessSettings,
    p: &Principal,
    action: &str,
    upstream: &str,
    repository: &str,
) -> bool {
    s.rules.iter().any(|r| {
        r.actions.iter().any(|a| a == action)
            && r.who.iter().any(|w| who_matches(w, p))
            && r.upstreams.iter().any(|g| glob_match(g, upstream))
            && r.repositories.iter().any(|g| glob_match(g, repository))
    })
}

/// Does `p`'s token grant `action` on the canonical `name`?
pub fn token_grants(p: &Principal, name: &str, action: &str) -> bool {
    p.grants.as_ref().is_some_and(|g| {
        g.iter()
            .any(|g| g.name == name && g.actions.iter().any(|a| a == action))
    })
}

/// May `addr` use `family`? Families no rule names are open; with rules, an unknown address
/// is refused.
pub fn is_network_allowed(s: &AccessSettings, fam: RouteFamily, addr: Option<IpAddr>) -> bool {
    let rules: Vec<&Vec<Cidr>> = s
        .networks
        .iter()
        .filter(|(f, _)| f.contains(&fam))
        .map(|(_, c)| c)
        .collect();
    if rules.is_empty() {
        return true;
    }
    let Some(ip) = addr else { return false };
    rules
        .iter()
        .any(|cidrs| cidrs.iter().any(|c| c.contains(ip)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::Secret;
    use crate::core::ports::InlineOffload;
    use crate::testing::FakeOffload;
    use futures_util::FutureExt as _;

    /// Runs [`authenticate`] with inline offload: it completes without a runtime.
    fn auth(s: &AccessSettings, h: &HeaderMap, now: u64) -> Result<Principal, AuthError> {
        authenticate(s, &InlineOffload, h, now)
            .now_or_never()
            .expect("inline offload completes at once")
    }

    // argon2id of "correct horse" with the salt "saltsaltsalt" (argon2-cffi, the reference
    // implementation's Python binding), m=19456 KiB, t=2, p=1.
    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$sDq4SJydHwxWnLTlXqq5ZzNDfmXrJUlaeTohxQaFrio";

    fn settings() -> AccessSettings {
        AccessSettings {
            enabled: true,
            token_key: Some(Secret::new("k".into())),
            identities: vec![
                Identity {
                    name: "alice".into(),
                    password_hash: Some(HASH.into()),
                    token: None,
                    groups: vec!["devs".into()],
                },
                Identity {
                    name: "robot".into(),
                    password_hash: None,
                    token: Some(Secret::new("robot-token".into())),
                    groups: vec!["ci".into()],
                },
            ],
            rules: vec![
                AccessRule {
                    who: vec!["anonymous".into()],
                    upstreams: vec!["docker.io".into()],
                    repositories: vec!["library/*".into()],
                    actions: vec!["pull".into()],
                },
                AccessRule {
                    who: vec!["group:devs".into()],
                    upstreams: vec!["*".into()],
                    repositories: vec!["*".into()],
                    actions: vec!["pull".into()],
                },
                AccessRule {
                    who: vec!["robot".into()],
                    upstreams: vec!["ghcr.io".into()],
                    repositories: vec!["acme/*".into()],
                    actions: vec!["pull".into(), "trigger".into()],
                },
            ],
            networks: vec![(
                vec![RouteFamily::Admin],
                vec![parse_cidr("10.0.0.0/8").unwrap()],
            )],
            ..Default::default()
        }
    }

    fn basic(u: &str, p: &str) -> HeaderMap {
        use base64::Engine as _;
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        h.insert("authorization", format!("Basic {v}").parse().unwrap());
        h
    }

    #[test]
    fn authentication_table() {
        let s = settings();
        assert_eq!(
            auth(&s, &HeaderMap::new(), 0).unwrap(),
            Principal::anonymous()
        );
        assert_eq!(
            auth(&s, &basic("alice", "correct horse"), 0).unwrap().name,
            "alice"
        );
        assert_eq!(
            auth(&s, &basic("alice", "wrong"), 0),
            Err(AuthError::Invalid)
        );
        assert_eq!(auth(&s, &basic("bob", "x"), 0), Err(AuthError::Invalid));
        assert_eq!(
            auth(&s, &basic("robot", "robot-token"), 0).unwrap().name,
            "robot"
        );
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer robot-token".parse().unwrap());
        assert_eq!(auth(&s, &h, 0).unwrap().name, "robot");
        let t = token::sign(
            b"k",
            &token::Claims {
                sub: "alice".into(),
                exp: 10,
                access: vec![],
            },
        );
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        assert_eq!(auth(&s, &h, 5).unwrap().groups, vec!["devs".to_string()]);
        assert_eq!(auth(&s, &h, 10), Err(AuthError::Invalid), "expired");
        h.insert("authorization", "Negotiate x".parse().unwrap());
        assert_eq!(auth(&s, &h, 0), Err(AuthError::Scheme));
    }

    #[test]
    fn every_password_check_runs_one_verification_known_or_not() {
        let mut s = settings();
        s.dummy_hash = dummy_like(HASH);
        let o = FakeOffload::default();
        let check = |u: &str, p: &str| check_password(&s, &o, u, p).now_or_never().expect("inline");
        assert!(check("alice", "correct horse").is_ok());
        assert_eq!(o.jobs(), 1);
        assert_eq!(check("alice", "wrong"), Err(AuthError::Invalid));
        assert_eq!(o.jobs(), 2);
        assert_eq!(check("nobody", "correct horse"), Err(AuthError::Invalid));
        assert_eq!(o.jobs(), 3, "an unknown name costs a verification too");
        assert_eq!(
            check("robot", "robot-token").map(|p| p.name),
            Ok("robot".into())
        );
        assert_eq!(check("robot", "nope"), Err(AuthError::Invalid));
        assert_eq!(o.jobs(), 5, "and so does a token-only identity");
        let none = AccessSettings::default();
        assert_eq!(
            check_password(&none, &o, "alice", "x").now_or_never(),
            Some(Err(AuthError::Invalid))
        );
        assert_eq!(o.jobs(), 5, "no identities: nothing to verify");
    }

    #[test]
    fn the_dummy_hash_has_the_identity_parameters_and_matches_nothing() {
        let d = dummy_like(HASH).unwrap();
        let (ph, dh) = (
            PasswordHash::new(HASH).unwrap(),
            PasswordHash::new(&d).unwrap(),
        );
        assert_eq!(ph.algorithm, dh.algorithm);
        assert_eq!(ph.params, dh.params);
        assert_eq!(ph.salt, dh.salt);
        assert_eq!(ph.hash.unwrap().len(), dh.hash.unwrap().len());
        assert!(!verify_hash(&d, "correct horse"));
        let def = PasswordHash::new(DEFAULT_DUMMY_HASH).unwrap();
        assert_eq!(
            def.params, ph.params,
            "the default dummy has hash-password's parameters"
        );
        assert_eq!(def.hash.unwrap().len(), 32);
    }

    fn resolved(auth: &str) -> Result<AccessSettings, ConfigError> {
        struct K;
        impl SecretResolver for K {
            fn resolve(&self, _: &str) -> Result<Secret, ConfigError> {
                Ok(Secret::new("k".into()))
            }
        }
        let auth: AuthConfig = toml::from_str(auth).unwrap();
        let identities = [IdentityConfig {
            name: "alice".into(),
            password_hash: Some(HASH.into()),
            token: None,
            groups: vec![],
        }];
        resolve(
            AccessInput {
                auth: &auth,
                identities: &identities,
                rules: &[],
                networks: &[],
                rate_limit: &RateLimitConfig::default(),
            },
            &K,
        )
    }

    #[test]
    fn auth_needs_a_configured_public_url_for_the_realm() {
        let e = resolved("enabled = true\ntoken_secret = \"env:K\"").unwrap_err();
        assert!(e.0.contains("public_url"), "{e}");
        let s = resolved(
            "enabled = true\ntoken_secret = \"env:K\"\npublic_url = \"https://pg.example/\"",
        )
        .unwrap();
        assert_eq!(s.public_url.as_deref(), Some("https://pg.example"));
        assert_eq!(s.login, LoginPolicy::default());
        assert_eq!(s.dummy_hash.as_deref(), dummy_like(HASH).as_deref());
        for bad in ["pg.example", "ftp://pg.example", "https://pg.example/?x=1"] {
            let e = resolved(&format!(
                "enabled = true\ntoken_secret = \"env:K\"\npublic_url = \"{bad}\""
            ))
            .unwrap_err();
            assert!(e.0.contains("public_url"), "{bad}: {e}");
        }
        assert!(
            resolved("").unwrap().public_url.is_none(),
            "off: not needed"
        );
    }

    #[test]
    fn authorization_table() {
        let s = settings();
        let anon = Principal::anonymous();
        let alice = Principal {
            name: "alice".into(),
            groups: vec!["devs".into()],
            grants: None,
        };
        let robot = Principal {
            name: "robot".into(),
            groups: vec!["ci".into()],
            grants: None,
        };
        assert!(is_allowed(&s, &anon, "pull", "docker.io", "library/alpine"));
        assert!(!is_allowed(&s, &anon, "pull", "docker.io", "bitnami/redis"));
        assert!(!is_allowed(&s, &anon, "pull", "ghcr.io", "library/x"));
        assert!(is_allowed(&s, &alice, "pull", "quay.io", "any/thing"));
        assert!(!is_allowed(&s, &alice, "admin", "*", "*"));
        assert!(is_allowed(&s, &robot, "trigger", "ghcr.io", "acme/app"));
        assert!(!is_allowed(&s, &robot, "pull", "ghcr.io", "other/app"));
    }

    #[test]
    fn network_rules_apply_per_family() {
        let s = settings();
        let ip = |x: &str| Some(x.parse::<IpAddr>().unwrap());
        assert!(is_network_allowed(&s, RouteFamily::Admin, ip("10.1.1.1")));
        assert!(!is_network_allowed(&s, RouteFamily::Admin, ip("192.0.2.1")));
        assert!(
            !is_network_allowed(&s, RouteFamily::Admin, None),
            "unknown address with rules: refused"
        );
        assert!(
            is_network_allowed(&s, RouteFamily::Registry, ip("192.0.2.1")),
            "no rule for registry"
        );
        assert_eq!(route_family("/v2/x/manifests/y"), RouteFamily::Registry);
        assert_eq!(route_family("/chain/abc"), RouteFamily::Admin);
        assert_eq!(route_family("/hooks/app"), RouteFamily::Hooks);
    }
}
