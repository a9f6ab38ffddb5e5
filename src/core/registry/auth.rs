//! Upstream authentication decisions: parsing `WWW-Authenticate` challenges, token responses,
//! and the trust boundary that decides whether configured credentials may go to a realm.
//! Pure; the token dance that uses these lives in `upstream`.
//!
//! Docker Registry token authentication ("Token Authentication Specification"): a 401 carries
//! `Bearer realm="…",service="…",scope="…"`; the client GETs `realm?service=…&scope=…` and
//! retries with the token. Credentials are only sent to a realm inside the upstream's trust
//! boundary (distribution binds realms to the upstream's domain for the same reason): the
//! same host or registrable domain (Public Suffix List, via the `psl` crate, plus the
//! multi-tenant registry domains it lacks), on the same port, or a host listed in
//! `auth_hosts`.

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

/// Registry domains whose tenants are separate hosts under one name that the Public Suffix
/// List does not list as a suffix (so `psl` would give every tenant the same registrable
/// domain): Azure Container Registry (`<name>.azurecr.io`) and everything under
/// `amazonaws.com` (ECR's `<account>.dkr.ecr.<region>.amazonaws.com`, S3 and API Gateway
/// hosts, which the list covers only in part). A host under one of these is its own boundary.
const MULTI_TENANT_DOMAINS: &[&str] = &["azurecr.io", "amazonaws.com"];

/// The domain a host belongs to for trust: its registrable domain by the Public Suffix List
/// (`registry-1.docker.io` → `docker.io`, `a.example.co.uk` → `example.co.uk`); an IP
/// address, a single label, a bare public suffix, or a host under a
/// [`MULTI_TENANT_DOMAINS`] entry is its own boundary.
pub fn trust_domain(host: &str) -> String {
    let host = host
        .trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if host.parse::<std::net::IpAddr>().is_ok() {
        return host;
    }
    if MULTI_TENANT_DOMAINS
        .iter()
        .any(|d| host == *d || host.ends_with(&format!(".{d}")))
    {
        return host;
    }
    match psl::domain_str(&host) {
        Some(d) => d.to_string(),
        None => host,
    }
}

/// The port to compare: None for the default port of the URL's scheme (so `https://h` and
/// `https://h:443` agree, and an `http` upstream's realm may move to `https` on its default
/// port), else the explicit port.
fn port_key(u: &Url) -> Option<u16> {
    u.port()
}

/// True when configured credentials may be sent to `realm` for an upstream at `upstream_url`:
/// same host, or same registrable domain (Public Suffix List; see [`trust_domain`]), in both
/// cases on the same port (default ports normalised per scheme); or the realm's host (with its
/// port, when not the default) is listed in `auth_hosts`. Never downgraded to plain HTTP
/// unless the upstream itself is plain HTTP.
pub fn is_trusted_realm(upstream_url: &Url, realm: &Url, auth_hosts: &[String]) -> bool {
    let (Some(up), Some(rh)) = (upstream_url.host_str(), realm.host_str()) else {
        return false;
    };
    let (up, rh) = (up.to_ascii_lowercase(), rh.to_ascii_lowercase());
    if realm.scheme() != "https" && !(realm.scheme() == "http" && upstream_url.scheme() == "http") {
        return false;
    }
    let same_port = port_key(upstream_url) == port_key(realm);
    if same_port && (up == rh || trust_domain(&up) == trust_domain(&rh)) {
        return true;
    }
    is_auth_host(realm, auth_hosts)
}

/// Is `url` on one of an upstream's `auth_hosts`? Entries are `host` or `host:port`, read with
/// the URL's scheme so that a default port written out matches a URL without one, and a bare
/// host means the scheme's default port.
pub fn is_auth_host(url: &Url, auth_hosts: &[String]) -> bool {
    let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
        return false;
    };
    auth_hosts.iter().any(|entry| {
        Url::parse(&format!("{}://{entry}", url.scheme())).is_ok_and(|e| {
            e.host_str().map(str::to_ascii_lowercase).as_deref() == Some(host.as_str())
                && port_key(&e) == port_key(url)
        })
    })
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
    fn trust_domains_follow_the_public_suffix_list() {
        let table: &[(&str, &str)] = &[
            ("registry-1.docker.io", "docker.io"),
            ("auth.docker.io", "docker.io"),
            ("Auth.Docker.IO.", "docker.io"),
            ("ghcr.io", "ghcr.io"),
            ("registry.example.co.uk", "example.co.uk"),
            ("auth.example.co.uk", "example.co.uk"),
            ("evil.co.uk", "evil.co.uk"),
            ("co.uk", "co.uk"),
            ("foo.github.io", "foo.github.io"),
            ("us-docker.pkg.dev", "pkg.dev"),
            ("myreg.azurecr.io", "myreg.azurecr.io"),
            ("evil.azurecr.io", "evil.azurecr.io"),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
            ),
            ("evil.s3.amazonaws.com", "evil.s3.amazonaws.com"),
            ("registry.internal", "registry.internal"),
            ("localhost", "localhost"),
            ("127.0.0.1", "127.0.0.1"),
            ("[::1]", "::1"),
        ];
        for (host, want) in table {
            assert_eq!(trust_domain(host), *want, "{host}");
        }
    }

    #[test]
    fn credentials_stay_inside_the_trust_boundary_on_multi_label_suffixes() {
        let u = |s: &str| Url::parse(s).unwrap();
        let uk = u("https://registry.example.co.uk");
        assert!(is_trusted_realm(
            &uk,
            &u("https://auth.example.co.uk/t"),
            &[]
        ));
        assert!(!is_trusted_realm(&uk, &u("https://evil.co.uk/t"), &[]));
        let acr = u("https://myreg.azurecr.io");
        assert!(is_trusted_realm(
            &acr,
            &u("https://myreg.azurecr.io/oauth2/token"),
            &[]
        ));
        assert!(!is_trusted_realm(
            &acr,
            &u("https://evil.azurecr.io/oauth2/token"),
            &[]
        ));
        let ecr = u("https://123456789012.dkr.ecr.us-east-1.amazonaws.com");
        assert!(!is_trusted_realm(
            &ecr,
            &u("https://999999999999.dkr.ecr.us-east-1.amazonaws.com/t"),
            &[]
        ));
        assert!(!is_trusted_realm(
            &ecr,
            &u("https://evil.s3.amazonaws.com/t"),
            &[]
        ));
        // Ports: the default port written out is the default port; another port is not.
        let hub = u("https://registry-1.docker.io");
        assert!(is_trusted_realm(
            &hub,
            &u("https://auth.docker.io:443/token"),
            &[]
        ));
        assert!(!is_trusted_realm(
            &hub,
            &u("https://auth.docker.io:8443/token"),
            &[]
        ));
        assert!(is_trusted_realm(
            &hub,
            &u("https://login.example/t"),
            &["login.example:443".into()]
        ));
        assert!(!is_trusted_realm(
            &hub,
            &u("https://login.example:8443/t"),
            &["login.example".into()]
        ));
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
            &u("http://127.0.0.1:5000/token"),
            &[]
        ));
        assert!(!is_trusted_realm(&local, &u("http://127.0.0.2/token"), &[]));
        // Another port on the same host is another service: only when listed.
        assert!(!is_trusted_realm(
            &local,
            &u("http://127.0.0.1:5001/token"),
            &[]
        ));
        assert!(is_trusted_realm(
            &local,
            &u("http://127.0.0.1:5001/token"),
            &["127.0.0.1:5001".into()]
        ));
        assert!(!is_trusted_realm(
            &local,
            &u("http://127.0.0.1:5002/token"),
            &["127.0.0.1:5001".into()]
        ));
    }
}
