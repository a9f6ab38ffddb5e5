//! Upstream authentication decisions: parsing `WWW-Authenticate` challenges, token responses,
//! and the trust boundary that decides whether configured credentials may go to a realm.
//! Pure; the token dance that uses these lives in `upstream`.
//!
//! Docker Registry token authentication ("Token Authentication Specification"): a 401 carries
//! `Bearer realm="…",service="…",scope="…"`; the client GETs `realm?service=…&scope=…` and
//! retries with the token. Credentials are only sent to a realm inside the upstream's trust
//! boundary (distribution binds realms to the upstream's domain for the same reason).

use url::Url;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// Bearer token auth.
    Bearer {
        /// Token endpoint.
        realm: String,
        /// `service` parameter.
        service: Option<String>,
        /// `scope` parameter.
        scope: Option<String>,
    },
    /// HTTP Basic.
    Basic,
}

/// Parses `key="value"` pairs, honouring quotes and backslash escapes.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n)
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    out
}

/// Parses one `WWW-Authenticate` header value.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            let params = parse_params(rest);
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
            };
            Some(Challenge::Bearer {
                realm: get("realm").filter(|r| !r.is_empty())?,
                service: get("service"),
                scope: get("scope"),
            })
        }
        _ => None,
    }
}

/// A token endpoint's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// The bearer token.
    pub token: String,
    /// Lifetime in seconds (60 when absent, as the spec says).
    pub expires_in: u64,
}

/// Parses a token endpoint's JSON (`token` or `access_token`, `expires_in`).
pub fn parse_token_response(body: &[u8]) -> Option<TokenGrant> {
    #[derive(serde::Deserialize)]
    struct Raw {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let raw: Raw = serde_json::from_slice(body).ok()?;
    let token = raw.token.or(raw.access_token).filter(|t| !t.is_empty())?;
    Some(TokenGrant {
        token,
        expires_in: raw.expires_in.filter(|&e| e > 0).unwrap_or(60),
    })
}

/// How long before a token's expiry we stop using it, in ms (clock skew, request latency).
pub fn token_lifetime_ms(expires_in: u64) -> u64 {
    let ms = expires_in.saturating_mul(1000);
    ms.saturating_sub((ms / 10).min(10_000))
}

/// The domain a host belongs to for trust: its last two labels (`registry-1.docker.io` →
/// `docker.io`); an IP address or a single label is its own boundary.
fn trust_domain(host: &str) -> &str {
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return host;
    }
    let mut dots = host.rmatch_indices('.');
    match (dots.next(), dots.next()) {
        (Some(_), Some((i, _))) => &host[i + 1..],
        _ => host,
    }
}

/// True when configured credentials may be sent to `realm` for an upstream at `upstream_url`:
/// same host, same registrable domain, or listed in `auth_hosts`; and never downgraded to plain
/// HTTP unless the upstream itself is plain HTTP.
pub fn is_trusted_realm(upstream_url: &Url, realm: &Url, auth_hosts: &[String]) -> bool {
    let (Some(up), Some(rh)) = (upstream_url.host_str(), realm.host_str()) else {
        return false;
    };
    let (up, rh) = (up.to_ascii_lowercase(), rh.to_ascii_lowercase());
    if realm.scheme() != "https" && !(realm.scheme() == "http" && upstream_url.scheme() == "http") {
        return false;
    }
    up == rh || trust_domain(&up) == trust_domain(&rh) || auth_hosts.contains(&rh)
}

/// The scope to request for pulling `name`.
pub fn pull_scope(name: &str) -> String {
    format!("repository:{name}:pull")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_parsing_table() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm="https://ghcr.io/token", service="ghcr.io""#),
            Some(Challenge::Bearer {
                realm: "https://ghcr.io/token".into(),
                service: Some("ghcr.io".into()),
                scope: None
            })
        );
        // Scopes may hold commas inside quotes.
        assert!(matches!(
            parse_challenge(r#"Bearer realm="r",scope="repository:a:pull,push""#),
            Some(Challenge::Bearer { scope: Some(s), .. }) if s == "repository:a:pull,push"
        ));
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn token_response_forms() {
        let g = parse_token_response(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!((g.token.as_str(), g.expires_in), ("abc", 300));
        let g = parse_token_response(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!((g.token.as_str(), g.expires_in), ("xyz", 60));
        assert!(parse_token_response(b"{}").is_none());
        assert!(parse_token_response(b"not json").is_none());
        assert_eq!(token_lifetime_ms(60), 54_000);
        assert_eq!(token_lifetime_ms(3600), 3_590_000);
    }

    #[test]
    fn credentials_stay_inside_the_trust_boundary() {
        let u = |s: &str| Url::parse(s).unwrap();
        let hub = u("https://registry-1.docker.io");
        assert!(is_trusted_realm(
            &hub,
            &u("https://auth.docker.io/token"),
            &[]
        ));
        assert!(!is_trusted_realm(
            &hub,
            &u("https://evil.example/token"),
            &[]
        ));
        assert!(!is_trusted_realm(
            &hub,
            &u("http://auth.docker.io/token"),
            &[]
        ));
        assert!(is_trusted_realm(
            &hub,
            &u("https://login.example/t"),
            &["login.example".into()]
        ));
        let ghcr = u("https://ghcr.io");
        assert!(is_trusted_realm(&ghcr, &u("https://ghcr.io/token"), &[]));
        assert!(!is_trusted_realm(&ghcr, &u("https://x.io/token"), &[]));
        let local = u("http://127.0.0.1:5000");
        assert!(is_trusted_realm(
            &local,
            &u("http://127.0.0.1:5001/token"),
            &[]
        ));
        assert!(!is_trusted_realm(&local, &u("http://127.0.0.2/token"), &[]));
    }
}
