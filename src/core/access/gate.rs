//! Applying the access settings to a request: the network allowlist, authentication, rate
//! limits, the `/token` endpoint, and the per-route authorization checks. Errors on registry
//! routes use the OCI envelope (with a Bearer challenge on 401); other routes answer JSON.

use crate::core::access::limit::Rate;
use crate::core::access::token::{self, Claims, Grant};
use crate::core::access::{
    authenticate, basic_credentials, check_password, is_allowed, is_network_allowed, route_family,
    token_grants, ClientAddr, Principal, RouteFamily,
};
use crate::core::app::{error_response, json_error, json_response, Inner};
use crate::core::body::Body;
use crate::core::error::RegistryError;
use crate::core::gateway::outbox::rfc3339;
use crate::core::metrics::inc;
use crate::core::ports::ByteStream;
use crate::core::route::resolve_upstream;
use futures_util::StreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::json;
use std::net::IpAddr;

/// Who is calling, after the gate.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The principal.
    pub principal: Principal,
    /// The client address, when the host knows it.
    pub ip: Option<IpAddr>,
    /// pullgate itself (the gateway's pre-warm), not a client.
    pub internal: bool,
}

/// Marks a request pullgate makes to itself (pre-warming through the cache). Only in-process
/// code can put a Rust type in a request's extensions, so no client can claim it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InternalCall;

fn refuse(fam: RouteFamily, status: StatusCode, e: RegistryError, head: bool) -> Response<Body> {
    if fam == RouteFamily::Registry {
        error_response(&e, head)
    } else {
        json_error(status, e.to_string())
    }
}

/// The realm clients fetch tokens from.
fn realm(inner: &Inner, req: &Request<()>) -> String {
    match &inner.settings.access.public_url {
        Some(u) => format!("{u}/token"),
        None => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost");
            format!("http://{host}/token")
        }
    }
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
        realm(inner, req),
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

/// Network allowlist, authentication and rate limits, before any routing. Err: the response.
pub(crate) fn admit(inner: &Inner, req: &Request<()>) -> Result<Caller, Box<Response<Body>>> {
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
        return Err(Box::new(refuse(
            fam,
            StatusCode::FORBIDDEN,
            RegistryError::Denied("your network may not use this route".into()),
            head,
        )));
    }
    let now = inner.ports.clock.now_ms();
    // Webhooks authenticate by signature (Harbor's Authorization header is not ours), and
    // /token checks its own credentials. Elsewhere, credentials that are not an identity's may
    // still be a route's own (the gateway admin token, a run token): those routes decide. On
    // registry and chart routes with authentication on, bad credentials are a 401.
    let principal = if fam == RouteFamily::Hooks || path == "/token" {
        Principal::anonymous()
    } else {
        match authenticate(s, req.headers(), now) {
            Ok(p) => p,
            Err(e) if s.enabled && matches!(fam, RouteFamily::Registry | RouteFamily::Charts) => {
                inc(&inner.metrics.denied);
                return Err(Box::new(if fam == RouteFamily::Registry {
                    challenge(inner, req, None, &e.to_string())
                } else {
                    json_error(StatusCode::UNAUTHORIZED, e.to_string())
                }));
            }
            Err(_) => Principal::anonymous(),
        }
    };
    let mut limiter = inner.limiter.borrow_mut();
    let keys = [
        (
            s.per_identity.filter(|_| !principal.is_anonymous()),
            format!("id:{}", principal.name),
        ),
        (
            s.per_ip.filter(|_| ip.is_some()),
            format!("ip:{}", ip.map(|i| i.to_string()).unwrap_or_default()),
        ),
    ];
    for (rate, key) in keys {
        let Some(rate) = rate else { continue };
        if let Err(wait_ms) = limiter.take(&key, rate, burst(rate, s.burst), now) {
            inc(&inner.metrics.denied);
            let mut resp = refuse(
                fam,
                StatusCode::TOO_MANY_REQUESTS,
                RegistryError::TooManyRequests("rate limit exceeded; retry later".into()),
                head,
            );
            let secs = wait_ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return Err(Box::new(resp));
        }
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

/// May the caller do `action` (`admin`, or `trigger`) on the admin routes?
pub(crate) fn may_administer(inner: &Inner, caller: &Caller, action: &str) -> bool {
    let s = &inner.settings.access;
    let p = &caller.principal;
    !p.is_anonymous() && (is_allowed(s, p, "admin", "*", "*") || is_allowed(s, p, action, "*", "*"))
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
    let mut params: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let mut creds = match basic_credentials(req.headers()) {
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return json_error(StatusCode::UNAUTHORIZED, "invalid credentials"),
        None => None,
    };
    if req.method() == Method::POST {
        let mut raw = Vec::new();
        let mut body = body;
        while let Some(c) = body.next().await {
            let Ok(c) = c else {
                return json_error(StatusCode::BAD_REQUEST, "unreadable body");
            };
            if raw.len() + c.len() > 64 * 1024 {
                return json_error(StatusCode::PAYLOAD_TOO_LARGE, "token request too large");
            }
            raw.extend_from_slice(&c);
        }
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&raw).into_owned().collect();
        let get = |k: &str| form.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
        match get("grant_type").as_deref() {
            Some("password") => {
                if let (Some(u), Some(p)) = (get("username"), get("password")) {
                    creds = Some((u, p));
                }
            }
            Some(other) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    format!("grant_type {other:?} is not supported"),
                )
            }
            None => {}
        }
        if let Some(scope) = get("scope") {
            params.extend(
                scope
                    .split(' ')
                    .map(|s| ("scope".to_string(), s.to_string())),
            );
        }
    } else if req.method() != Method::GET {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
    }
    let principal = match creds {
        Some((u, p)) => match check_password(s, &u, &p) {
            Ok(p) => p,
            Err(_) => {
                inc(&inner.metrics.denied);
                return json_error(StatusCode::UNAUTHORIZED, "invalid credentials");
            }
        },
        None => Principal::anonymous(),
    };
    let mut access: Vec<Grant> = Vec::new();
    for (k, v) in &params {
        if k != "scope" {
            continue;
        }
        for scope in v.split(' ') {
            let Some((name, actions)) = token::parse_scope(scope) else {
                continue;
            };
            let Ok((i, repo)) = resolve_upstream(&inner.settings, &name, None) else {
                continue;
            };
            let host = &inner.settings.upstreams[i].host;
            let granted: Vec<String> = actions
                .into_iter()
                .filter(|a| a == "pull" && is_allowed(s, &principal, "pull", host, repo.as_str()))
                .collect();
            access.push(Grant {
                kind: "repository".into(),
                name: format!("{host}/{repo}"),
                actions: granted,
            });
        }
    }
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
