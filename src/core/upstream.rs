//! The upstream client: one registry request, with the token dance, a token cache per
//! (upstream, scope), Basic upstreams, and server-side redirect following.
//!
//! It drives the [`Upstream`] port; the decisions (challenge parsing, trust boundary, token
//! lifetime) are pure functions in `auth`. Redirects (307/302 to a CDN or bucket) are followed
//! here, never by the port, so that `Authorization` is never sent to the redirect host and the
//! redirect URL is never cached. Tokens are cached in memory per core instance.

use crate::core::auth::{
    is_trusted_realm, parse_challenge, parse_token_response, pull_scope, token_lifetime_ms,
    Challenge,
};
use crate::core::config::UpstreamSpec;
use crate::core::metrics::{inc, Metrics};
use crate::core::ports::{ByteStream, Clock, Upstream, UpstreamError};
use futures_util::StreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use url::Url;

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;
/// Largest token-endpoint answer read.
const MAX_TOKEN_BODY: usize = 64 * 1024;
/// The `User-Agent` sent upstream.
pub const USER_AGENT: &str = concat!("pullgate/", env!("CARGO_PKG_VERSION"));

/// A cached bearer token.
#[derive(Clone)]
struct CachedToken {
    token: String,
    valid_until_ms: u64,
}

/// Sends registry requests to upstreams, authenticating as needed.
pub struct UpstreamClient {
    http: Rc<dyn Upstream>,
    clock: Rc<dyn Clock>,
    metrics: Rc<Metrics>,
    tokens: RefCell<HashMap<(String, String), CachedToken>>,
    basic_hosts: RefCell<Vec<String>>,
}

/// Where a redirect response points, resolved against the URL that answered it; None when
/// the response is not a redirect (301, 302, 303, 307, 308 — a 304 answers a conditional
/// request and is final). A redirect without `Location`, to a malformed URL or to anything
/// but http(s) is an error. Shared by every place that follows redirects itself.
pub(crate) fn redirect_target(
    current: &Url,
    resp: &Response<ByteStream>,
) -> Result<Option<Url>, UpstreamError> {
    if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return Ok(None);
    }
    let location = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .ok_or_else(|| UpstreamError::Other("redirect without Location".into()))?;
    let next = current
        .join(location)
        .map_err(|_| UpstreamError::Other("redirect to a malformed URL".into()))?;
    if !matches!(next.scheme(), "http" | "https") {
        return Err(UpstreamError::Other("redirect to a non-HTTP URL".into()));
    }
    Ok(Some(next))
}

/// Reads a whole (small) body, refusing more than `limit` bytes.
pub async fn read_body_limited(mut body: ByteStream, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if out.len() + chunk.len() > limit {
            return Err(format!("body larger than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
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
    /// A client over the HTTP port.
    pub fn new(http: Rc<dyn Upstream>, clock: Rc<dyn Clock>, metrics: Rc<Metrics>) -> Self {
        UpstreamClient {
            http,
            clock,
            metrics,
            tokens: RefCell::new(HashMap::new()),
            basic_hosts: RefCell::new(Vec::new()),
        }
    }

    async fn send_raw(
        &self,
        method: &Method,
        url: &Url,
        accept: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<Response<ByteStream>, UpstreamError> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(url.as_str())
            .header(header::USER_AGENT, USER_AGENT);
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
        let mut tokens = self.tokens.borrow_mut();
        match tokens.get(&key) {
            Some(t) if t.valid_until_ms > now => return Some(format!("Bearer {}", t.token)),
            Some(_) => {
                tokens.remove(&key);
            }
            None => {}
        }
        drop(tokens);
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
            .send_raw(&Method::GET, &url, None, auth.as_deref())
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(UpstreamError::Other(format!(
                "token endpoint answered {status}"
            )));
        }
        let body = read_body_limited(resp.into_body(), MAX_TOKEN_BODY)
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
        let auth = self.cached_authorization(spec, &scope);
        let mut resp = self
            .send_raw(&method, &url, accept, auth.as_deref())
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
                    self.tokens
                        .borrow_mut()
                        .insert((spec.host.clone(), scope.clone()), token);
                    resp = self.send_raw(&method, &url, accept, Some(&value)).await?;
                }
                Some(Challenge::Basic) if spec.credentials.is_some() && auth.is_none() => {
                    self.basic_hosts.borrow_mut().push(spec.host.clone());
                    let value = basic_value(spec);
                    resp = self
                        .send_raw(&method, &url, accept, value.as_deref())
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
                resp = self.send_raw(&method, &next, None, None).await?;
                current = next;
            }
            if redirect_target(&current, &resp)?.is_some() {
                return Err(UpstreamError::Other("too many redirects".into()));
            }
        }
        Ok(resp)
    }
}
