//! The admin API (`/admin/…`): cache statistics, cached tags, purge, dead letters. Requires
//! the `admin` action (an identity allowed it by an `[[access]]` rule) or the gateway's admin
//! token. Answers JSON.

use crate::core::access::caller::{is_admin, Caller};
use crate::core::body::Body;
use crate::core::context::Inner;
use crate::core::gateway::keys::DEAD;
use crate::core::http::{json_error as err, json_response as reply, query_param};
use crate::core::registry::keys;
use crate::core::registry::records::TagRecord;
use crate::core::registry::route::resolve_upstream;
use http::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

/// `<class>/<tag>` of a tag record key below a repository, or None for a nested repository's.
fn own_tag(rest: &str) -> Option<(&str, &str)> {
    let (class, tag) = rest.split_once('/')?;
    (matches!(class, "i" | "m") && !tag.contains('/')).then_some((class, tag))
}

fn query(req: &Request<()>, key: &str) -> Option<String> {
    query_param(req.uri().query(), key)
}

/// Routes `/admin/…`; None for other paths.
pub(crate) async fn handle(
    inner: &Inner,
    req: &Request<()>,
    caller: &Caller,
) -> Option<Response<Body>> {
    let path = req.uri().path().strip_prefix("/admin/")?;
    if !(is_admin(inner, req.headers(), caller)) {
        inc_denied(inner);
        return Some(err(
            StatusCode::UNAUTHORIZED,
            "the admin action is required",
        ));
    }
    Some(match (req.method().clone(), path) {
        (Method::GET, "stats") => stats(inner).await,
        (Method::GET, "tags") => tags(inner, req).await,
        (Method::POST, "purge") => purge(inner, req).await,
        (Method::GET, "dead-letters") => dead_letters(inner).await,
        _ => err(StatusCode::NOT_FOUND, "no such admin route"),
    })
}

fn inc_denied(inner: &Inner) {
    crate::core::metrics::inc(&inner.metrics.denied);
}

async fn stats(inner: &Inner) -> Response<Body> {
    let m = &inner.metrics;
    let (hits, misses) = (
        m.hits.load(Ordering::Relaxed),
        m.misses.load(Ordering::Relaxed),
    );
    let ratio = |h: u64, mi: u64| {
        if h + mi == 0 {
            0.0
        } else {
            h as f64 / (h + mi) as f64
        }
    };
    let by_upstream: serde_json::Map<String, Value> = m
        .per_upstream()
        .into_iter()
        .map(|(host, [h, mi])| {
            (
                host,
                json!({ "hits": h, "misses": mi, "hit_ratio": ratio(h, mi) }),
            )
        })
        .collect();
    let blobs = match inner.ports.blobs.usage().await {
        Ok(Some((count, bytes))) => json!({ "count": count, "bytes": bytes }),
        _ => Value::Null,
    };
    let manifests = inner
        .ports
        .kv
        .list("manifest/", 100_000)
        .await
        .map(|k| k.len())
        .unwrap_or(0);
    let tags = inner
        .ports
        .kv
        .list("tag/", 100_000)
        .await
        .map(|k| k.len())
        .unwrap_or(0);
    reply(
        StatusCode::OK,
        json!({
            "requests": m.requests.load(Ordering::Relaxed),
            "hits": hits,
            "misses": misses,
            "hit_ratio": ratio(hits, misses),
            "stale_served": m.stale_served.load(Ordering::Relaxed),
            "bytes_served": m.bytes_served.load(Ordering::Relaxed),
            "bytes_fetched": m.bytes_fetched.load(Ordering::Relaxed),
            "denied": m.denied.load(Ordering::Relaxed),
            "by_upstream": by_upstream,
            "blobs": blobs,
            "manifests": manifests,
            "tag_records": tags,
        }),
    )
}

/// `repository=<upstream>/<name>` (or a name routed like a client path) → (host, name).
fn repository(inner: &Inner, req: &Request<()>) -> Result<(String, String), Box<Response<Body>>> {
    let r = query(req, "repository").ok_or_else(|| {
        Box::new(err(
            StatusCode::BAD_REQUEST,
            "repository=<upstream>/<name> is required",
        ))
    })?;
    let (i, name) = resolve_upstream(&inner.settings, &r, None)
        .map_err(|e| Box::new(err(StatusCode::BAD_REQUEST, e.to_string())))?;
    Ok((
        inner.settings.upstreams[i].host.clone(),
        name.as_str().to_string(),
    ))
}

async fn tags(inner: &Inner, req: &Request<()>) -> Response<Body> {
    let (host, name) = match repository(inner, req) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let prefix = format!("tag/{host}/{name}/");
    let found = inner
        .ports
        .kv
        .list(&prefix, 10_000)
        .await
        .unwrap_or_default();
    let mut out = Vec::new();
    for k in found {
        let Some((class, tag)) = own_tag(&k[prefix.len()..]) else {
            continue;
        };
        let rec = inner
            .ports
            .kv
            .get(&k)
            .await
            .ok()
            .flatten()
            .and_then(|r| serde_json::from_slice::<TagRecord>(&r).ok());
        if let Some(rec) = rec {
            out.push(json!({ "tag": tag, "accept_class": class, "digest": rec.digest, "checked_ms": rec.checked_ms }));
        }
    }
    reply(
        StatusCode::OK,
        json!({ "repository": format!("{host}/{name}"), "tags": out }),
    )
}

/// Purges cached content. Link records (`link/…`, see `links`) are left in place: a dangling
/// link only says the upstream once vouched that the repository holds the digest, and since
/// content is addressed by digest, a later re-fill (made upstream under the name of whichever
/// repository misses it) brings back the very bytes the link was written for.
async fn purge(inner: &Inner, req: &Request<()>) -> Response<Body> {
    let kv = &inner.ports.kv;
    let mut removed = json!({ "tag_records": 0, "tag_lists": 0, "manifests": 0, "blobs": 0 });
    let mut bump = |k: &str| {
        if let Some(n) = removed.get_mut(k) {
            *n = json!(n.as_u64().unwrap_or(0) + 1);
        }
    };
    if let Some(d) = query(req, "digest") {
        let Ok(digest) = crate::core::registry::reference::parse_digest(&d) else {
            return err(StatusCode::BAD_REQUEST, "digest must be sha256:<64 hex>");
        };
        if kv.get(&keys::manifest(&d)).await.ok().flatten().is_some()
            && kv.delete(&keys::manifest(&d)).await.is_ok()
        {
            bump("manifests");
        }
        match inner.ports.blobs.delete(&digest).await {
            Ok(true) => bump("blobs"),
            Ok(false) => {}
            Err(e) => return err(StatusCode::NOT_IMPLEMENTED, e.to_string()),
        }
    }
    if query(req, "repository").is_some() {
        let (host, name) = match repository(inner, req) {
            Ok(x) => x,
            Err(r) => return *r,
        };
        let tag = query(req, "tag");
        let base = format!("tag/{host}/{name}/");
        for k in kv.list(&base, 100_000).await.unwrap_or_default() {
            // Keys of nested repositories (`<name>/sub/…`) share the prefix; skip them.
            let Some((_, t)) = own_tag(&k[base.len()..]) else {
                continue;
            };
            if tag.as_deref().is_some_and(|x| x != t) {
                continue;
            }
            if tag.is_none() {
                // A whole repository: drop the manifests its tags point at, too.
                if let Some(rec) = kv
                    .get(&k)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|r| serde_json::from_slice::<TagRecord>(&r).ok())
                {
                    if kv.delete(&keys::manifest(&rec.digest)).await.is_ok() {
                        bump("manifests");
                    }
                }
            }
            if kv.delete(&k).await.is_ok() {
                bump("tag_records");
            }
        }
        for k in kv
            .list(&format!("tags/{host}/{name}?"), 100_000)
            .await
            .unwrap_or_default()
        {
            if kv.delete(&k).await.is_ok() {
                bump("tag_lists");
            }
        }
    } else if query(req, "digest").is_none() {
        return err(
            StatusCode::BAD_REQUEST,
            "purge needs repository=<upstream>/<name> [&tag=<tag>] or digest=<digest>",
        );
    }
    reply(StatusCode::OK, json!({ "purged": removed }))
}

async fn dead_letters(inner: &Inner) -> Response<Body> {
    let mut out = Vec::new();
    for k in inner.ports.kv.list(DEAD, 500).await.unwrap_or_default() {
        if let Some(v) = inner
            .ports
            .kv
            .get(&k)
            .await
            .ok()
            .flatten()
            .and_then(|r| serde_json::from_slice::<Value>(&r).ok())
        {
            out.push(v);
        }
    }
    reply(StatusCode::OK, json!({ "dead_letters": out }))
}
