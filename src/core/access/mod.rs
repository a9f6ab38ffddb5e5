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

pub mod caller;
pub mod config;
pub mod gate;
#[cfg(test)]
mod gate_tests;
pub mod limit;
pub mod token;

pub use caller::{is_allowed, token_grants, Caller, Principal};
pub use config::*;

use crate::core::cidr::Cidr;
use crate::core::config::value::Secret;
use crate::core::ct::tokens_match;
use crate::core::ports::{offload, Offload};
use argon2::password_hash::PasswordHash;
use argon2::{Argon2, PasswordVerifier};
use http::HeaderMap;
use std::net::IpAddr;

/// The client's address, as the host knows it, in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

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
    tokens_match(t.expose(), given)
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
    use crate::core::access::config::dummy_like;
    use crate::core::access::limit::LoginPolicy;
    use crate::core::cidr::parse_cidr;
    use crate::core::config::value::{ConfigError, SecretResolver};
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
