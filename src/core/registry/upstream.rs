//! The upstream client: one registry request, with the token dance, a token cache per
//! (upstream, scope), Basic upstreams, and server-side redirect following.
//!
//! It drives the [`Upstream`] port; the decisions (challenge parsing, trust boundary, token
//! lifetime) are pure functions in `auth`. Redirects (307/302 to a CDN or bucket) are followed
//! here, never by the port, so that `Authorization` is never sent to the redirect host and the
//! redirect URL is never cached. Tokens are cached in memory per core instance, at most
//! [`MAX_TOKENS`] of them (expired ones are dropped first, then the least recently used), and,
//! when the host set a [`TokenStore`] (Spin: its key-value store), shared through it: a token
//! missing here is looked up there before a token request, and a fetched one is stored there
//! too. A store that fails costs a token request, never the request itself.
//!
//! Every URL the upstream chose — each redirect `Location` and each Bearer `realm` — passes
//! the outbound address policy (`core::outbound`) before anything is sent to it, and carries
//! the policy to the host, which checks resolved addresses where it can. A refusal is
//! [`UpstreamError::Refused`], which registry routes answer 502 ([`registry_error`]).

use crate::core::config::Secret;
use crate::core::config::UpstreamSpec;
use crate::core::error::RegistryError;
use crate::core::http::{read_capped, redirect_target, USER_AGENT};
use crate::core::metrics::{inc, Metrics};
use crate::core::outbound::{guard, same_origin, OutboundPolicy, Purpose};
use crate::core::ports::{
    ByteStream, Clock, StoredToken, TokenStore, TrustedCa, Upstream, UpstreamError,
};
use crate::core::registry::auth::{
    is_auth_host, is_trusted_realm, parse_challenge, parse_token_response, pull_scope,
    token_lifetime_ms, Challenge,
};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use url::Url;

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;
/// Most bearer tokens cached per core instance.
pub const MAX_TOKENS: usize = 1024;
/// Largest token-endpoint answer read.
const MAX_TOKEN_BODY: usize = 64 * 1024;

/// A cached bearer token.
#[derive(Clone)]
struct CachedToken {
    token: String,
    valid_until_ms: u64,
}

/// Bearer tokens by (upstream, scope), bounded: when full, an insert first drops every
/// expired token, then the least recently used one. Scopes come from client-chosen repository
/// names, so without a bound the cache would grow with every name asked for.
struct TokenCache {
    capacity: usize,
    /// Value → (token, last use tick).
    entries: HashMap<(String, String), (CachedToken, u64)>,
    tick: u64,
}

impl TokenCache {
    fn new(capacity: usize) -> TokenCache {
        TokenCache {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            tick: 0,
        }
    }

    /// The token for `key` when it is still valid at `now`; an expired one is dropped.
    fn get(&mut self, key: &(String, String), now: u64) -> Option<String> {
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(key) {
            Some((t, used)) if t.valid_until_ms > now => {
                *used = tick;
                Some(t.token.clone())
            }
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: (String, String), token: CachedToken, now: u64) {
        self.tick += 1;
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.entries.retain(|_, (t, _)| t.valid_until_ms > now);
            if self.entries.len() >= self.capacity {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.entries.remove(&k);
                }
            }
        }
        self.entries.insert(key, (token, self.tick));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Sends registry requests to upstreams, authenticating as needed.
pub struct UpstreamClient {
    http: Rc<dyn Upstream>,
    clock: Rc<dyn Clock>,
    metrics: Rc<Metrics>,
    tokens: RefCell<TokenCache>,
    /// Tokens shared with other instances, when the host keeps them.
    shared_tokens: RefCell<Option<Rc<dyn TokenStore>>>,
    basic_hosts: RefCell<Vec<String>>,
    outbound: Arc<OutboundPolicy>,
}

/// The registry error for an upstream exchange that failed: a refused address is a bad
/// upstream answer (502), anything else an unavailable upstream (503).
pub(crate) fn registry_error(e: UpstreamError) -> RegistryError {
    match e {
        UpstreamError::Refused(msg) => RegistryError::BadUpstream(msg),
        e => RegistryError::Unavailable(e.to_string()),
    }
}

fn basic_value(spec: &UpstreamSpec) -> Option<String> {
    use base64::Engine as _;
    spec.credentials.as_ref().map(|c| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                c.username.expose(),
                c.password.expose()
            ))
        )
    })
}

impl UpstreamClient {
    /// A client over the HTTP port. Until [`UpstreamClient::with_outbound`], no host is
    /// configured and every internal address an upstream chooses is refused.
    pub fn new(http: Rc<dyn Upstream>, clock: Rc<dyn Clock>, metrics: Rc<Metrics>) -> Self {
        UpstreamClient {
            http,
            clock,
            metrics,
            tokens: RefCell::new(TokenCache::new(MAX_TOKENS)),
            shared_tokens: RefCell::new(None),
            basic_hosts: RefCell::new(Vec::new()),
            outbound: Arc::new(OutboundPolicy::default()),
        }
    }

    /// Shares bearer tokens through `store` as well as this instance's memory.
    pub fn set_token_store(&self, store: Rc<dyn TokenStore>) {
        *self.shared_tokens.borrow_mut() = Some(store);
    }

    /// The shared store's token for (`spec`, `scope`), copied into the instance's cache; None
    /// when there is none, it expired, or the store failed (then a token is fetched).
    async fn shared_token(&self, spec: &UpstreamSpec, scope: &str) -> Option<String> {
        let store = self.shared_tokens.borrow().clone()?;
        let now = self.clock.now_ms();
        let stored = store.get(&spec.host, scope, now).await.ok().flatten()?;
        if stored.valid_until_ms <= now {
            return None;
        }
        let token = stored.token.expose().to_string();
        self.tokens.borrow_mut().insert(
            (spec.host.clone(), scope.to_string()),
            CachedToken {
                token: token.clone(),
                valid_until_ms: stored.valid_until_ms,
            },
            now,
        );
        Some(token)
    }

    /// Stores a fetched token in the shared store, if there is one (best effort).
    async fn share_token(&self, spec: &UpstreamSpec, scope: &str, token: &CachedToken) {
        let Some(store) = self.shared_tokens.borrow().clone() else {
            return;
        };
        let stored = StoredToken {
            token: Secret::new(token.token.clone()),
            valid_until_ms: token.valid_until_ms,
        };
        let _ = store.put(&spec.host, scope, &stored).await;
    }

    /// The outbound address policy applied to redirects and token realms.
    pub fn with_outbound(mut self, policy: Arc<OutboundPolicy>) -> Self {
        self.outbound = policy;
        self
    }

    /// Sends one request; `chosen` says the upstream chose `url` (a redirect or a realm), and
    /// whether it is on an origin configured for this upstream (trusted as written); otherwise
    /// the outbound policy applies to it.
    async fn send_raw(
        &self,
        ca: Option<&TrustedCa>,
        method: &Method,
        url: &Url,
        accept: Option<&str>,
        authorization: Option<&str>,
        chosen: Option<(Purpose, bool)>,
    ) -> Result<Response<ByteStream>, UpstreamError> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(url.as_str())
            .header(header::USER_AGENT, USER_AGENT);
        if let Some(ca) = ca {
            b = b.extension(ca.clone());
        }
        if let Some((purpose, trusted)) = chosen {
            b = guard(&self.outbound, purpose, url, trusted, b)?;
        }
        if let Some(a) = accept {
            b = b.header(header::ACCEPT, a);
        }
        if let Some(a) = authorization {
            let mut v = HeaderValue::from_str(a)
                .map_err(|_| UpstreamError::Other("credentials are not a valid header".into()))?;
            v.set_sensitive(true);
            b = b.header(header::AUTHORIZATION, v);
        }
        let req = b
            .body(bytes::Bytes::new())
            .map_err(|e| UpstreamError::Other(format!("bad upstream request: {e}")))?;
        inc(&self.metrics.upstream_requests);
        self.http.send(req).await
    }

    fn cached_authorization(&self, spec: &UpstreamSpec, scope: &str) -> Option<String> {
        let key = (spec.host.clone(), scope.to_string());
        let now = self.clock.now_ms();
        let cached = self.tokens.borrow_mut().get(&key, now);
        if let Some(t) = cached {
            return Some(format!("Bearer {t}"));
        }
        if self.basic_hosts.borrow().contains(&spec.host) {
            return basic_value(spec);
        }
        None
    }

    async fn fetch_token(
        &self,
        spec: &UpstreamSpec,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<CachedToken, UpstreamError> {
        let mut url = Url::parse(realm)
            .map_err(|_| UpstreamError::Other("upstream sent a malformed token realm".into()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(UpstreamError::Other("token realm is not http(s)".into()));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let auth = if is_trusted_realm(&spec.url, &url, &spec.auth_hosts) {
            basic_value(spec)
        } else {
            None
        };
        let resp = self
            .send_raw(
                spec.ca.as_ref(),
                &Method::GET,
                &url,
                None,
                auth.as_deref(),
                Some((
                    Purpose::TokenRealm,
                    same_origin(&spec.url, &url) || is_auth_host(&url, &spec.auth_hosts),
                )),
            )
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(UpstreamError::Other(format!(
                "token endpoint answered {status}"
            )));
        }
        let body = read_capped(resp.into_body(), MAX_TOKEN_BODY)
            .await
            .map_err(|e| UpstreamError::Other(format!("token endpoint: {e}")))?;
        let grant = parse_token_response(&body)
            .ok_or_else(|| UpstreamError::Other("token endpoint sent no token".into()))?;
        Ok(CachedToken {
            token: grant.token,
            valid_until_ms: self.clock.now_ms() + token_lifetime_ms(grant.expires_in),
        })
    }

    /// Sends `method` to `path` (starting with `/v2/`) on `spec` for repository `name`,
    /// answering the upstream's auth challenge once, and, when `follow` is set, following
    /// redirects without `Authorization`. Any final status is returned to the caller.
    pub async fn request(
        &self,
        spec: &UpstreamSpec,
        method: Method,
        path: &str,
        accept: Option<&str>,
        name: &str,
        follow: bool,
    ) -> Result<Response<ByteStream>, UpstreamError> {
        let base = spec.url.as_str().trim_end_matches('/');
        let url = Url::parse(&format!("{base}{path}"))
            .map_err(|e| UpstreamError::Other(format!("bad upstream url: {e}")))?;
        let scope = pull_scope(name);
        let mut auth = self.cached_authorization(spec, &scope);
        if auth.is_none() {
            auth = self
                .shared_token(spec, &scope)
                .await
                .map(|t| format!("Bearer {t}"));
        }
        let mut resp = self
            .send_raw(
                spec.ca.as_ref(),
                &method,
                &url,
                accept,
                auth.as_deref(),
                None,
            )
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = resp
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(parse_challenge);
            match challenge {
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: challenged,
                }) => {
                    let want = challenged.unwrap_or_else(|| scope.clone());
                    let token = self
                        .fetch_token(spec, &realm, service.as_deref(), &want)
                        .await?;
                    let value = format!("Bearer {}", token.token);
                    self.share_token(spec, &scope, &token).await;
                    let now = self.clock.now_ms();
                    self.tokens
                        .borrow_mut()
                        .insert((spec.host.clone(), scope.clone()), token, now);
                    resp = self
                        .send_raw(spec.ca.as_ref(), &method, &url, accept, Some(&value), None)
                        .await?;
                }
                Some(Challenge::Basic) if spec.credentials.is_some() && auth.is_none() => {
                    self.basic_hosts.borrow_mut().push(spec.host.clone());
                    let value = basic_value(spec);
                    resp = self
                        .send_raw(
                            spec.ca.as_ref(),
                            &method,
                            &url,
                            accept,
                            value.as_deref(),
                            None,
                        )
                        .await?;
                }
                _ => {}
            }
        }
        if follow {
            let mut current = url;
            for _ in 0..MAX_REDIRECTS {
                let Some(next) = redirect_target(&current, &resp)? else {
                    break;
                };
                resp = self
                    .send_raw(
                        spec.ca.as_ref(),
                        &method,
                        &next,
                        None,
                        None,
                        Some((Purpose::Redirect, same_origin(&spec.url, &next))),
                    )
                    .await?;
                current = next;
            }
            if redirect_target(&current, &resp)?.is_some() {
                return Err(UpstreamError::Other(format!(
                    "upstream redirected more than {MAX_REDIRECTS} times"
                )));
            }
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> (String, String) {
        ("up.test".into(), format!("repository:r{i}:pull"))
    }

    fn token(valid_until_ms: u64) -> CachedToken {
        CachedToken {
            token: format!("t{valid_until_ms}"),
            valid_until_ms,
        }
    }

    #[test]
    fn token_cache_is_bounded_and_drops_expired_entries_first() {
        let mut c = TokenCache::new(3);
        c.insert(key(0), token(100), 0);
        c.insert(key(1), token(1_000), 0);
        c.insert(key(2), token(1_000), 0);
        // Full at now=500: the expired key(0) goes, although key(1) is used less recently.
        c.insert(key(3), token(1_000), 500);
        assert_eq!(c.len(), 3);
        assert!(c.get(&key(0), 500).is_none());
        assert!(c.get(&key(1), 500).is_some());
        assert!(c.get(&key(3), 500).is_some());
    }

    #[test]
    fn token_cache_evicts_the_least_recently_used_valid_token() {
        let mut c = TokenCache::new(2);
        c.insert(key(0), token(1_000), 0);
        c.insert(key(1), token(1_000), 0);
        assert!(c.get(&key(0), 10).is_some()); // key(1) is now the least recently used
        c.insert(key(2), token(1_000), 10);
        assert_eq!(c.len(), 2);
        assert!(c.get(&key(1), 10).is_none());
        assert!(c.get(&key(0), 10).is_some());
        assert!(c.get(&key(2), 10).is_some());
        // Replacing a present key never evicts another.
        c.insert(key(2), token(2_000), 10);
        assert_eq!(c.len(), 2);
        assert!(c.get(&key(0), 10).is_some());
        // An expired token is not served, and is dropped when asked for.
        assert!(c.get(&key(0), 1_000).is_none());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn token_cache_holds_at_most_max_tokens() {
        let mut c = TokenCache::new(MAX_TOKENS);
        for i in 0..(MAX_TOKENS * 3) {
            c.insert(key(i), token(u64::MAX), 0);
        }
        assert_eq!(c.len(), MAX_TOKENS);
        assert!(c.get(&key(MAX_TOKENS * 3 - 1), 0).is_some());
        assert!(c.get(&key(0), 0).is_none());
    }

    /// Answers a Bearer challenge, the token, a redirect and the content, recording whether
    /// each request carried the upstream's `ca_file`.
    struct CaRecorder {
        seen: RefCell<Vec<(String, Option<TrustedCa>)>>,
    }

    #[async_trait::async_trait(?Send)]
    impl Upstream for CaRecorder {
        async fn send(
            &self,
            request: Request<bytes::Bytes>,
        ) -> Result<Response<ByteStream>, UpstreamError> {
            use futures_util::StreamExt;
            let url = request.uri().to_string();
            let ca = request.extensions().get::<TrustedCa>().cloned();
            self.seen.borrow_mut().push((url.clone(), ca));
            let authorized = request.headers().contains_key(header::AUTHORIZATION);
            let b = Response::builder();
            let (b, body) = if url.starts_with("https://auth.corp.test/") {
                (b.status(200), r#"{"token":"t"}"#)
            } else if url.starts_with("https://blobs.corp.test/") {
                (b.status(200), "content")
            } else if !authorized {
                (
                    b.status(401).header(
                        header::WWW_AUTHENTICATE,
                        r#"Bearer realm="https://auth.corp.test/token",service="reg""#,
                    ),
                    "",
                )
            } else {
                (
                    b.status(307)
                        .header(header::LOCATION, "https://blobs.corp.test/b/1"),
                    "",
                )
            };
            let stream = futures_util::stream::iter([Ok(bytes::Bytes::from(body))]).boxed_local();
            Ok(b.body(stream).unwrap())
        }
    }

    struct Zero;
    impl Clock for Zero {
        fn now_ms(&self) -> u64 {
            0
        }
    }

    #[test]
    fn every_request_for_an_upstream_carries_its_ca_file() {
        let recorder = Rc::new(CaRecorder {
            seen: RefCell::new(Vec::new()),
        });
        let client =
            UpstreamClient::new(recorder.clone(), Rc::new(Zero), Rc::new(Metrics::default()));
        let ca = TrustedCa("/etc/pullgate/corp-ca.pem".into());
        let spec = UpstreamSpec {
            host: "reg.corp.test".into(),
            aliases: vec![],
            url: Url::parse("https://reg.corp.test").unwrap(),
            default: false,
            library_prefix: false,
            credentials: None,
            auth_hosts: vec!["auth.corp.test".into()],
            ca: Some(ca.clone()),
        };
        let resp = futures_util::FutureExt::now_or_never(client.request(
            &spec,
            Method::GET,
            "/v2/app/blobs/sha256:00",
            None,
            "app",
            true,
        ))
        .expect("no real IO")
        .unwrap();
        assert_eq!(resp.status(), 200);
        let seen = recorder.seen.borrow();
        let hosts: Vec<&str> = seen
            .iter()
            .map(|(u, _)| u.split('/').nth(2).unwrap_or(""))
            .collect();
        assert_eq!(
            hosts,
            [
                "reg.corp.test",
                "auth.corp.test",
                "reg.corp.test",
                "blobs.corp.test"
            ]
        );
        assert!(
            seen.iter().all(|(_, c)| c.as_ref() == Some(&ca)),
            "{seen:?}"
        );
    }

    #[test]
    fn refused_addresses_are_bad_upstream_and_the_rest_unavailable() {
        let e = registry_error(UpstreamError::Refused("refused".into()));
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        let e = registry_error(UpstreamError::Connect("down".into()));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
