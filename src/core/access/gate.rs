//! Applying the access settings to a request: the network allowlist, authentication, rate
//! limits, the `/token` endpoint, and the per-route authorization checks. Errors on registry
//! routes use the OCI envelope (with a Bearer challenge on 401); other routes answer JSON.
//!
//! The order is the defence: network allowlist → per-address rate limit (every route but
//! `/healthz` and `/metrics`) → login lockout → credentials → per-identity rate limit. A
//! request refused by a limit or a lockout never reaches a password check, so a burst of bad
//! logins costs no argon2. Password checks (Basic credentials on any route but `/hooks`, and
//! `/token`) count per address and per user name (see [`limit`]), with authentication on.
//! Bearer tokens do not: they are HMAC-signed or static secrets, cheap to check and not
//! guessable, and counting them would let one client behind a shared address lock out every
//! token holder there; the per-address rate limit bounds them. Lockouts answer 429 with
//! `Retry-After`, like the rate limit.
//!
//! [`limit`]: crate::core::access::limit

use crate::core::access::caller::{Caller, InternalCall};
use crate::core::access::limit::{LoginLockouts, LoginPort, Rate, RateLimitPort};
use crate::core::access::token::{self, Claims, Grant};
use crate::core::access::{
    authenticate, basic_credentials, check_password, is_allowed, is_network_allowed, presented,
    route_family, token_grants, AuthError, ClientAddr, Presented, Principal, RouteFamily,
};
use crate::core::body::Body;
use crate::core::context::Inner;
use crate::core::error::RegistryError;
use crate::core::http::{error_response, json_error, json_response, read_capped, ReadError};
use crate::core::metrics::inc;
use crate::core::ports::{BucketTake, ByteStream, Offload};
use crate::core::registry::reference::Digest;
use crate::core::registry::route::resolve_upstream;
use crate::core::time::rfc3339;
use futures_util::future::LocalBoxFuture;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::json;
use std::future::Future;
use std::net::IpAddr;

fn refuse(fam: RouteFamily, status: StatusCode, e: RegistryError, head: bool) -> Response<Body> {
    if fam == RouteFamily::Registry {
        error_response(&e, head)
    } else {
        json_error(status, e.to_string())
    }
}

/// The realm clients fetch tokens from: only from the configuration, never from the
/// request's `Host` (which the client chooses). Challenges are sent only with authentication
/// on, which requires `public_url`; without it the realm is the relative `/token`.
fn realm(inner: &Inner) -> String {
    match &inner.settings.access.public_url {
        Some(u) => format!("{u}/token"),
        None => "/token".into(),
    }
}

/// A 429 with `Retry-After` (whole seconds, at least 1).
/// The OCI envelope on registry routes (`fam`), JSON elsewhere.
fn too_many(fam: RouteFamily, head: bool, wait_ms: u64, msg: &str) -> Box<Response<Body>> {
    let mut resp = refuse(
        fam,
        StatusCode::TOO_MANY_REQUESTS,
        RegistryError::TooManyRequests(msg.into()),
        head,
    );
    let secs = wait_ms.div_ceil(1000).max(1);
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Box::new(resp)
}

/// The offload port, counting each password verification for `/metrics`.
struct CountedOffload<'a>(&'a Inner);

impl Offload for CountedOffload<'_> {
    fn run(&self, job: Box<dyn FnOnce() + Send>) -> LocalBoxFuture<'static, ()> {
        inc(&self.0.metrics.password_checks);
        self.0.ports.offload.run(job)
    }
}

/// Checks reserved on the lockout table; released if the request goes away before the check
/// ends.
struct Attempt {
    logins: LoginLockouts,
    keys: Vec<String>,
    open: bool,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.open {
            self.logins.cancel(&self.keys);
        }
    }
}

/// Runs a credential check under the login lockout for the client address and `user`:
/// Err(ms to wait) without running `check` when either is locked out; otherwise the check's
/// result, counted as a failure or a success.
async fn checked_login<F>(
    inner: &Inner,
    ip: Option<IpAddr>,
    user: Option<&str>,
    check: F,
) -> Result<Result<Principal, AuthError>, u64>
where
    F: Future<Output = Result<Principal, AuthError>>,
{
    let policy = inner.settings.access.login;
    let mut keys = Vec::with_capacity(2);
    if let Some(ip) = ip {
        keys.push(format!("ip:{ip}"));
    }
    if let Some(u) = user {
        // Names are the client's to choose, of any length: key them by a fixed-size digest so
        // the bounded table also stays bounded in bytes.
        keys.push(format!("name:{}", Digest::of(u.as_bytes()).hex()));
    }
    let now = inner.ports.clock.now_ms();
    let logins = inner.slots.get::<LoginPort>().0.borrow().clone();
    logins.begin(&keys, policy, now)?;
    let mut attempt = Attempt {
        logins,
        keys,
        open: true,
    };
    let result = check.await;
    attempt.open = false;
    let now = inner.ports.clock.now_ms();
    attempt
        .logins
        .end(&attempt.keys, result.is_ok(), policy, now);
    Ok(result)
}

/// A 401 with a Bearer challenge (and a scope, when the request named a repository).
pub(crate) fn challenge(
    inner: &Inner,
    req: &Request<()>,
    scope: Option<&str>,
    msg: &str,
) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let mut resp = error_response(&RegistryError::Unauthorized(msg.to_string()), head);
    let mut v = format!(
        "Bearer realm=\"{}\",service=\"{}\"",
        realm(inner),
        inner.settings.access.service
    );
    if let Some(s) = scope {
        v.push_str(&format!(",scope=\"{s}\""));
    }
    if let Ok(v) = HeaderValue::from_str(&v) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

fn burst(rate: Rate, configured: Option<u32>) -> u32 {
    configured.unwrap_or_else(|| ((u64::from(rate.n) * 1000 / rate.per_ms.max(1)) as u32).max(1))
}

/// Takes one token from the `key` bucket at `rate`; a 429 (counted as a refusal) when it is
/// empty. The per-address and per-identity limits both go through here: the buckets are the
/// instance's own, or the host's shared [`RateLimitStore`](crate::core::ports::RateLimitStore)
/// when it set one. A shared store that fails admits the request: a rate limit protects
/// capacity, it is not an access rule (the store's adapter logs the failure).
async fn take_rate(
    inner: &Inner,
    key: &str,
    rate: Rate,
    (fam, head): (RouteFamily, bool),
    now: u64,
) -> Result<(), Box<Response<Body>>> {
    let burst = burst(rate, inner.settings.access.burst);
    let shared = inner.slots.get::<RateLimitPort>().0.borrow().clone();
    let taken = match shared {
        None => inner.limiter.borrow_mut().take(key, rate, burst, now),
        Some(store) => match store.take(key, rate.limit(burst), now).await {
            Ok(BucketTake::Empty { retry_after_ms }) => Err(retry_after_ms),
            Ok(BucketTake::Taken) | Err(_) => Ok(()),
        },
    };
    taken.map_err(|wait_ms| {
        inc(&inner.metrics.denied);
        tracing::info!(reason = "rate_limit", key, wait_ms, "request refused");
        too_many(fam, head, wait_ms, "rate limit exceeded; retry later")
    })
}

/// Network allowlist, rate limits, login lockout and authentication, before any routing.
/// Err: the response.
pub(crate) async fn admit(inner: &Inner, req: &Request<()>) -> Result<Caller, Box<Response<Body>>> {
    let s = &inner.settings.access;
    if req.extensions().get::<InternalCall>().is_some() {
        return Ok(Caller {
            principal: Principal {
                name: "pullgate".into(),
                groups: vec![],
                grants: None,
            },
            ip: None,
            internal: true,
        });
    }
    let path = req.uri().path();
    let fam = route_family(path);
    let head = req.method() == Method::HEAD;
    let ip = req.extensions().get::<ClientAddr>().map(|c| c.0);
    if !is_network_allowed(s, fam, ip) {
        inc(&inner.metrics.denied);
        tracing::info!(reason = "network", ip = ?ip, path, "request refused");
        return Err(Box::new(refuse(
            fam,
            StatusCode::FORBIDDEN,
            RegistryError::Denied("your network may not use this route".into()),
            head,
        )));
    }
    // Probes and scrapes are cheap and need no credentials: they are limited by network rules
    // only, so a client that exhausts its address's budget cannot make the mirror look down.
    let limited = fam != RouteFamily::Metrics;
    let now = inner.ports.clock.now_ms();
    if let (Some(rate), Some(addr), true) = (s.per_ip, ip, limited) {
        take_rate(inner, &format!("ip:{addr}"), rate, (fam, head), now).await?;
    }
    // Webhooks authenticate by signature (Harbor's Authorization header is not ours), and
    // /token checks its own credentials. Elsewhere, credentials that are not an identity's may
    // still be a route's own (the gateway admin token, a run token): those routes decide. On
    // registry and chart routes with authentication on, bad credentials are a 401.
    let principal = if fam == RouteFamily::Hooks || path == "/token" {
        Principal::anonymous()
    } else {
        let ours = matches!(fam, RouteFamily::Registry | RouteFamily::Charts);
        let counted = CountedOffload(inner);
        let check = authenticate(s, &counted, req.headers(), now);
        let result = if let (Presented::Basic(user), true) = (presented(req.headers()), s.enabled) {
            match checked_login(inner, ip, user.as_deref(), check).await {
                Ok(r) => r,
                Err(wait_ms) => {
                    inc(&inner.metrics.denied);
                    tracing::info!(reason = "lockout", ip = ?ip, path, wait_ms, "request refused");
                    return Err(too_many(
                        fam,
                        head,
                        wait_ms,
                        "too many failed logins; retry later",
                    ));
                }
            }
        } else {
            check.await
        };
        match result {
            Ok(p) => p,
            Err(e) if s.enabled && ours => {
                inc(&inner.metrics.denied);
                tracing::info!(reason = "auth", ip = ?ip, path, error = %e, "request refused");
                return Err(Box::new(if fam == RouteFamily::Registry {
                    challenge(inner, req, None, &e.to_string())
                } else {
                    json_error(StatusCode::UNAUTHORIZED, e.to_string())
                }));
            }
            Err(_) => Principal::anonymous(),
        }
    };
    if let (Some(rate), false) = (s.per_identity, principal.is_anonymous()) {
        let now = inner.ports.clock.now_ms();
        take_rate(
            inner,
            &format!("id:{}", principal.name),
            rate,
            (fam, head),
            now,
        )
        .await?;
    }
    Ok(Caller {
        principal,
        ip,
        internal: false,
    })
}

/// May the caller pull `repository` from `upstream`? Err: the 401/403 to send.
pub(crate) fn authorize_pull(
    inner: &Inner,
    req: &Request<()>,
    caller: &Caller,
    upstream: &str,
    repository: &str,
) -> Result<(), Box<Response<Body>>> {
    let s = &inner.settings.access;
    if !s.enabled || caller.internal {
        return Ok(());
    }
    let p = &caller.principal;
    let canonical = format!("{upstream}/{repository}");
    let by_rules = is_allowed(s, p, "pull", upstream, repository);
    if token_grants(p, &canonical, "pull") || (p.grants.is_none() && by_rules) {
        return Ok(());
    }
    inc(&inner.metrics.denied);
    tracing::info!(
        reason = "forbidden",
        identity = %p.name,
        repository = %canonical,
        "request refused"
    );
    let scope = format!("repository:{canonical}:pull");
    if p.is_anonymous() || (p.grants.is_some() && by_rules) {
        return Err(Box::new(challenge(
            inner,
            req,
            Some(&scope),
            "authentication required",
        )));
    }
    let head = req.method() == Method::HEAD;
    let e = RegistryError::Denied(format!("{} may not pull {canonical}", p.name));
    Err(Box::new(
        if route_family(req.uri().path()) == RouteFamily::Registry {
            error_response(&e, head)
        } else {
            json_error(StatusCode::FORBIDDEN, e.to_string())
        },
    ))
}

/// `GET /v2/` under authentication: anonymous callers are challenged so clients log in.
pub(crate) fn authorize_base(
    inner: &Inner,
    req: &Request<()>,
    caller: &Caller,
) -> Result<(), Box<Response<Body>>> {
    if inner.settings.access.enabled && caller.principal.is_anonymous() {
        return Err(Box::new(challenge(
            inner,
            req,
            None,
            "authentication required",
        )));
    }
    Ok(())
}

/// `GET /token` (and the OAuth2 `POST /token` form containerd uses).
pub(crate) async fn token_endpoint(
    inner: &Inner,
    req: &Request<()>,
    body: ByteStream,
) -> Response<Body> {
    let s = &inner.settings.access;
    let Some(key) = s.token_key.as_ref().filter(|_| s.enabled) else {
        return json_error(
            StatusCode::NOT_FOUND,
            "authentication is not enabled on this mirror",
        );
    };
    let mut scopes: Vec<String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.into_owned())
            .collect();
    let mut creds = match basic_credentials(req.headers()) {
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return malformed_basic(inner, req).await,
        None => None,
    };
    if req.method() == Method::POST {
        match read_form(body).await {
            Ok(form) => {
                if let Some(c) = form.credentials {
                    creds = Some(c);
                }
                scopes.extend(form.scope);
            }
            Err(resp) => return *resp,
        }
    } else if req.method() != Method::GET {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
    }
    let principal = match creds {
        Some((u, p)) => match login(inner, req, &u, &p).await {
            Ok(p) => p,
            Err(resp) => return *resp,
        },
        None => Principal::anonymous(),
    };
    let access = grants(inner, &principal, &scopes);
    let now = inner.ports.clock.now_ms();
    let claims = Claims {
        sub: principal.name.clone(),
        exp: now + s.token_ttl_ms,
        access,
    };
    let t = token::sign(key.expose().as_bytes(), &claims);
    json_response(
        StatusCode::OK,
        json!({
            "token": t,
            "access_token": t,
            "expires_in": s.token_ttl_ms / 1000,
            "issued_at": rfc3339(now),
        }),
    )
}

/// A malformed Basic header costs nothing to refuse, but it still counts for the address.
async fn malformed_basic(inner: &Inner, req: &Request<()>) -> Response<Body> {
    let ip = req.extensions().get::<ClientAddr>().map(|c| c.0);
    let bad = std::future::ready(Err(AuthError::Invalid));
    match checked_login(inner, ip, None, bad).await {
        Err(wait_ms) => *too_many(
            RouteFamily::Admin,
            false,
            wait_ms,
            "too many failed logins; retry later",
        ),
        Ok(_) => json_error(StatusCode::UNAUTHORIZED, "invalid credentials"),
    }
}

/// What the OAuth2 `POST /token` form (containerd) carries.
struct TokenForm {
    credentials: Option<(String, String)>,
    scope: Vec<String>,
}

async fn read_form(body: ByteStream) -> Result<TokenForm, Box<Response<Body>>> {
    let raw = read_capped(body, 64 * 1024).await.map_err(|e| {
        Box::new(match e {
            ReadError::TooLarge(_) => {
                json_error(StatusCode::PAYLOAD_TOO_LARGE, "token request too large")
            }
            ReadError::Failed(_) => json_error(StatusCode::BAD_REQUEST, "unreadable body"),
        })
    })?;
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&raw).into_owned().collect();
    let get = |k: &str| form.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    let credentials = match get("grant_type").as_deref() {
        Some("password") => get("username").zip(get("password")),
        Some(other) => {
            return Err(Box::new(json_error(
                StatusCode::BAD_REQUEST,
                format!("grant_type {other:?} is not supported"),
            )))
        }
        None => None,
    };
    Ok(TokenForm {
        credentials,
        scope: get("scope").into_iter().collect(),
    })
}

/// Checks a password login through the lockout; the refusal is JSON, as `/token`'s other
/// errors are.
async fn login(
    inner: &Inner,
    req: &Request<()>,
    user: &str,
    password: &str,
) -> Result<Principal, Box<Response<Body>>> {
    let ip = req.extensions().get::<ClientAddr>().map(|c| c.0);
    let counted = CountedOffload(inner);
    let check = check_password(&inner.settings.access, &counted, user, password);
    match checked_login(inner, ip, Some(user), check).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(_)) => {
            inc(&inner.metrics.denied);
            tracing::info!(reason = "auth", ip = ?ip, path = "/token", "request refused");
            Err(Box::new(json_error(
                StatusCode::UNAUTHORIZED,
                "invalid credentials",
            )))
        }
        Err(wait_ms) => {
            inc(&inner.metrics.denied);
            tracing::info!(reason = "lockout", ip = ?ip, path = "/token", wait_ms, "request refused");
            Err(too_many(
                RouteFamily::Admin,
                false,
                wait_ms,
                "too many failed logins; retry later",
            ))
        }
    }
}

/// The repository grants for the requested scopes (space-separated lists): `pull` where the
/// rules allow it, nothing otherwise; scopes that name no known repository are skipped.
fn grants(inner: &Inner, principal: &Principal, scopes: &[String]) -> Vec<Grant> {
    let s = &inner.settings.access;
    let mut access = Vec::new();
    for scope in scopes.iter().flat_map(|v| v.split(' ')) {
        let Some((name, actions)) = token::parse_scope(scope) else {
            continue;
        };
        let Ok((i, repo)) = resolve_upstream(&inner.settings, &name, None) else {
            continue;
        };
        let host = &inner.settings.upstreams[i].host;
        let granted: Vec<String> = actions
            .into_iter()
            .filter(|a| a == "pull" && is_allowed(s, principal, "pull", host, repo.as_str()))
            .collect();
        access.push(Grant {
            kind: "repository".into(),
            name: format!("{host}/{repo}"),
            actions: granted,
        });
    }
    access
}
