//! `GET /v2/<name>/tags/list`: proxied; the canonical first page (no `n`, no `last`) is cached
//! for the tag TTL and served stale within `max_stale` when the upstream fails. Any other page
//! is proxied uncached: `n` and `last` are chosen by the client, and caching each combination
//! would let anyone grow the store without bound. A `Link` to the next page is rewritten to
//! the client's own path (its host prefix and `ns`), keeping the upstream's `n` and `last`.
//! Writing the cached page is best-effort: a failed write is noted in the request log, and the
//! page is still served.

use crate::core::body::{Body, CacheStatus};
use crate::core::context::{Ctx, ResponseNote};
use crate::core::error::RegistryError;
use crate::core::http::read_capped;
use crate::core::http::response;
use crate::core::http::status_failure;
use crate::core::metrics::inc;
use crate::core::registry::keys;
use http::{header, Method, Response, StatusCode};
use serde::{Deserialize, Serialize};

/// Largest tag list page read from an upstream.
const MAX_TAG_LIST: usize = 4 << 20;
/// Version of the cached page format.
const PAGE_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedPage {
    v: u32,
    fetched_ms: u64,
    body: String,
    link: Option<String>,
}

/// Rewrites an upstream `Link: </v2/<upstream name>/tags/list?…>; rel="next"` to the client's
/// path. None when the header has no usable target.
pub fn rewrite_link(link: &str, client_name: &str, ns: Option<&str>) -> Option<String> {
    let start = link.find('<')? + 1;
    let end = start + link[start..].find('>')?;
    let target = &link[start..end];
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let query: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("ns="))
        .collect();
    let mut q = query.join("&");
    if let Some(ns) = ns {
        if !q.is_empty() {
            q.push('&');
        }
        q.push_str("ns=");
        q.push_str(ns);
    }
    let sep = if q.is_empty() { "" } else { "?" };
    Some(format!(
        "</v2/{client_name}/tags/list{sep}{q}>{}",
        &link[end + 1..]
    ))
}

fn serve(
    page: &CachedPage,
    client_name: &str,
    ns: Option<&str>,
) -> Result<Response<Body>, RegistryError> {
    let mut b = response(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, page.body.len());
    if let Some(l) = page
        .link
        .as_deref()
        .and_then(|l| rewrite_link(l, client_name, ns))
    {
        b = b.header(header::LINK, l);
    }
    b.body(Body::Bytes(page.body.clone().into()))
        .map_err(|e| RegistryError::Internal(e.to_string()))
}

/// `GET /v2/<name>/tags/list`.
pub(crate) async fn list(
    ctx: &Ctx<'_>,
    n: Option<u32>,
    last: Option<&str>,
    client_name: &str,
    ns: Option<&str>,
) -> Result<(Response<Body>, CacheStatus), RegistryError> {
    let inner = ctx.inner;
    let m = &inner.metrics;
    let key =
        (n.is_none() && last.is_none()).then(|| keys::tag_list(&ctx.up.host, ctx.name.as_str()));
    let now = inner.ports.clock.now_ms();
    let cached: Option<CachedPage> = match &key {
        Some(key) => inner
            .ports
            .kv
            .get(key)
            .await
            .map_err(|e| RegistryError::Internal(e.to_string()))?
            .and_then(|raw| serde_json::from_slice::<CachedPage>(&raw).ok())
            .filter(|p| p.v == PAGE_VERSION),
        None => None,
    };
    let freshness = inner.settings.freshness();
    if let Some(p) = cached
        .as_ref()
        .filter(|p| freshness.is_fresh(p.fetched_ms, now))
    {
        m.hit(&ctx.up.host);
        return Ok((serve(p, client_name, ns)?, CacheStatus::Hit));
    }
    m.miss(&ctx.up.host);
    let page = match fetch_page(ctx, n, last, now).await {
        Ok(page) => page,
        Err(PageError::Unknown(e)) => return Err(e),
        Err(PageError::Failed(e)) => {
            return match &cached {
                Some(p) if freshness.may_serve_stale(p.fetched_ms, now) => {
                    inc(&m.upstream_errors);
                    inc(&m.stale_served);
                    Ok((serve(p, client_name, ns)?, CacheStatus::Stale))
                }
                _ => Err(e),
            }
        }
    };
    let mut note = None;
    if let (Some(key), Ok(raw)) = (&key, serde_json::to_vec(&page)) {
        if let Err(e) = inner.ports.kv.put(key, &raw).await {
            note = Some(ResponseNote(format!("tag list not cached: {e}")));
        }
    }
    let mut resp = serve(&page, client_name, ns)?;
    if let Some(n) = note {
        resp.extensions_mut().insert(n);
    }
    Ok((resp, CacheStatus::Miss))
}

/// Why no page came from the upstream.
enum PageError {
    /// The repository is not known upstream (never answered stale).
    Unknown(RegistryError),
    /// Anything else: a stale page may answer instead.
    Failed(RegistryError),
}

/// One page of the upstream's tag list, checked to be JSON within [`MAX_TAG_LIST`].
async fn fetch_page(
    ctx: &Ctx<'_>,
    n: Option<u32>,
    last: Option<&str>,
    now: u64,
) -> Result<CachedPage, PageError> {
    let mut path = format!("/v2/{}/tags/list", ctx.name);
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(n) = n {
        q.append_pair("n", &n.to_string());
    }
    if let Some(l) = last {
        q.append_pair("last", l);
    }
    let q = q.finish();
    if !q.is_empty() {
        path = format!("{path}?{q}");
    }
    let what = format!("tags of {}", ctx.name);
    let failed = |e| PageError::Failed(e);
    let resp = ctx
        .inner
        .client
        .request(
            ctx.up,
            Method::GET,
            &path,
            Some("application/json"),
            ctx.name.as_str(),
            false,
        )
        .await
        .map_err(|e| failed(crate::core::registry::upstream::registry_error(e)))?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => {
            return Err(PageError::Unknown(RegistryError::NameUnknown(format!(
                "repository {} is not known upstream",
                ctx.name
            ))))
        }
        s => return Err(failed(status_failure(s, &what))),
    }
    let link = resp
        .headers()
        .get(header::LINK)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = read_capped(resp.into_body(), MAX_TAG_LIST)
        .await
        .map_err(|e| failed(RegistryError::BadUpstream(format!("{what}: {e}"))))?;
    let body = match String::from_utf8(body) {
        Ok(b) if serde_json::from_str::<serde_json::Value>(&b).is_ok() => b,
        _ => {
            return Err(failed(RegistryError::BadUpstream(format!(
                "{what}: upstream sent invalid JSON"
            ))))
        }
    };
    Ok(CachedPage {
        v: PAGE_VERSION,
        fetched_ms: now,
        body,
        link,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_is_rewritten_to_the_client_path() {
        let l = r#"</v2/library/alpine/tags/list?last=3.19&n=2>; rel="next""#;
        assert_eq!(
            rewrite_link(l, "alpine", None).unwrap(),
            r#"</v2/alpine/tags/list?last=3.19&n=2>; rel="next""#
        );
        assert_eq!(
            rewrite_link(l, "ghcr.io/o/a", Some("ghcr.io")).unwrap(),
            r#"</v2/ghcr.io/o/a/tags/list?last=3.19&n=2&ns=ghcr.io>; rel="next""#
        );
        assert_eq!(rewrite_link("garbage", "a", None), None);
    }
}
