//! Classic Helm chart repositories (`index.yaml` + `.tgz`) through the cache. `[[helm]]`
//! entries map a name to an upstream chart repository, served at `/charts/<name>/`:
//!
//! - `GET|HEAD /charts/<name>/index.yaml`: the upstream index, rewritten so that every chart
//!   with a sha256 digest points at pullgate (a path relative to the repository URL; see
//!   [`rewrite`]), cached, and revalidated like a tag: served from the cache for
//!   `[cache] tag_ttl`, then revalidated with a conditional GET (`If-None-Match` with the
//!   upstream's `ETag`, else `If-Modified-Since`); when the upstream fails (unreachable,
//!   timeout, 5xx, 429, auth, an index that does not parse) the last index is served for up
//!   to `max_stale` past its last confirmation. An upstream 404 is answered 404, and the
//!   cached index is kept for a later outage.
//! - `GET|HEAD /charts/<name>/<path>`: a chart file the index lists. Served from the blob
//!   store when this repository holds it ([`holdings`]: fetched or proven for *this*
//!   repository, not merely stored for another one or for a registry route). Otherwise it is
//!   fetched from the URL the index lists (absolute, or relative to the repository URL;
//!   redirects followed without credentials), written under the sha256 the index lists, and
//!   committed only if the bytes hash to it — then served; when the bytes are stored already,
//!   the URL's answer is hashed instead (proof of possession) and nothing is written. A
//!   mismatch answers 502 and stores nothing: a client never receives bad bytes as a success,
//!   nor bytes its repository's upstream did not produce. Chart URLs must be on the index's
//!   host or on one of the entry's `chart_hosts` ([`hosts`]); others are refused with 502
//!   before any request. Concurrent misses share one upstream exchange ([`flight`]), which
//!   runs on the deferred port, so it completes if the client leaves.
//! - Unknown repository, or a path the index does not list: 404. Other methods: 405. Errors
//!   are JSON, `{"error": "…"}` (these are not registry routes).
//!
//! Memory: an index is streamed through the line-oriented [`rewrite::Rewriter`] and stored as
//! content-addressed chunks plus a chunked, sorted chart map ([`store`]); a request never
//! holds a whole index. Peak memory for a refresh is about one output chunk (≤ 8 MiB) plus
//! the chart references (about 150 bytes per chart version): measured natively, a 50 MB
//! index of 49,000 chart versions raises peak RSS by 13 MiB, well within a Workers isolate's
//! 128 MB. The key-value record stays a few KiB (Spin's values stop at 1 MB).
//!
//! Limits: no credentials for chart repositories; index formats other than Helm's block YAML
//! (JSON, flow style, anchors on `urls`) are refused with 502; chart entries without a
//! sha256 digest keep their upstream URLs (never proxied unverified); provenance files
//! (`.prov`) are not served; a chart stored for another repository costs one upstream
//! transfer to prove before it is served for this one (a `HEAD` proves nothing when the same
//! party writes the index and answers for its URLs).
//!
//! Spec sources: the Helm chart repository guide
//! (<https://helm.sh/docs/topics/chart_repository/>: the index file, relative chart URLs)
//! and Helm's `pkg/repo` index format as `helm repo index` writes it.

pub(crate) mod chart_fill;
pub mod chart_path;
pub mod config;
pub mod entry;
pub(crate) mod flight;
pub mod holdings;
pub mod hosts;
pub mod rewrite;
pub mod store;
#[cfg(test)]
mod tests;
mod yaml;

use crate::core::body::{Body, CacheStatus};
use crate::core::context::Inner;
use crate::core::metrics::inc;
pub use config::{resolve, HelmConfig, HelmRepo};
use http::{header, Method, Request, Response, StatusCode};
use std::rc::Rc;
use store::{Fetch, IndexRecord};

/// An error on a `/charts/` route; each variant has one status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelmError {
    /// 404: unknown repository, or a path the index does not list.
    #[error("{0}")]
    NotFound(String),
    /// 405: only GET and HEAD.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 429: the upstream rate-limited us and nothing is cached.
    #[error("{0}")]
    TooManyRequests(String),
    /// 502: the upstream answered wrongly (bad bytes, a malformed index, a refusal).
    #[error("{0}")]
    BadUpstream(String),
    /// 503: the upstream is unreachable or failing, and nothing is cached.
    #[error("{0}")]
    Unavailable(String),
    /// 500: storage failed.
    #[error("{0}")]
    Internal(String),
}

impl HelmError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            HelmError::NotFound(_) => StatusCode::NOT_FOUND,
            HelmError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            HelmError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            HelmError::BadUpstream(_) => StatusCode::BAD_GATEWAY,
            HelmError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            HelmError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether an upstream failure caused it.
    fn is_upstream(&self) -> bool {
        matches!(
            self,
            HelmError::TooManyRequests(_) | HelmError::BadUpstream(_) | HelmError::Unavailable(_)
        )
    }

    /// `{"error": "…"}` (headers only for HEAD).
    pub fn response(&self, head: bool) -> Response<Body> {
        let body = serde_json::json!({ "error": self.to_string() }).to_string();
        let mut b = Response::builder()
            .status(self.status())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body.len());
        if matches!(self, HelmError::MethodNotAllowed(_)) {
            b = b.header(header::ALLOW, "GET, HEAD");
        }
        b.body(if head {
            Body::Empty
        } else {
            Body::Bytes(body.into())
        })
        .unwrap_or_else(|_| Response::new(Body::Empty))
    }
}

/// How a `/charts/` request was answered, in the response's extensions (for the host's log
/// line).
#[derive(Debug, Clone)]
pub struct HelmOutcome {
    /// Cache outcome.
    pub cache: CacheStatus,
    /// Error text, if the request failed.
    pub error: Option<String>,
}

/// Content type of a served index.
pub const INDEX_CONTENT_TYPE: &str = "application/x-yaml";
/// Content type of a served chart.
pub const CHART_CONTENT_TYPE: &str = "application/gzip";

/// Routes `/charts/…`; None for every other path.
pub(crate) async fn handle(inner: &Rc<Inner>, req: &Request<()>) -> Option<Response<Body>> {
    let rest = req.uri().path().strip_prefix("/charts/")?;
    let head = req.method() == Method::HEAD;
    let (mut resp, outcome) = match route(inner, req, rest, head).await {
        Ok((resp, cache)) => (resp, HelmOutcome { cache, error: None }),
        Err(e) => {
            if e.is_upstream() {
                inc(&inner.metrics.upstream_errors);
                tracing::warn!(path = req.uri().path(), error = %e, "chart upstream failed");
            }
            (
                e.response(head),
                HelmOutcome {
                    cache: CacheStatus::None,
                    error: Some(e.to_string()),
                },
            )
        }
    };
    resp.extensions_mut().insert(outcome);
    Some(resp)
}

async fn route(
    inner: &Rc<Inner>,
    req: &Request<()>,
    rest: &str,
    head: bool,
) -> Result<(Response<Body>, CacheStatus), HelmError> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Err(HelmError::MethodNotAllowed(format!(
            "{} is not allowed on chart repositories; use GET or HEAD",
            req.method()
        )));
    }
    let (name, path) = rest.split_once('/').unwrap_or((rest, ""));
    let repo = inner
        .settings
        .helm
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| {
            HelmError::NotFound(format!("no chart repository named {name:?} is configured"))
        })?;
    if path == "index.yaml" {
        return index(inner, repo, req, head).await;
    }
    let key = chart_path::percent_decode(path)
        .filter(|k| chart_path::is_chart_path(k))
        .ok_or_else(|| {
            HelmError::NotFound(format!(
                "no such file in chart repository {name}; the index is /charts/{name}/index.yaml"
            ))
        })?;
    chart(inner, repo, &key, head).await
}

fn is_fresh(inner: &Inner, rec: &IndexRecord, now: u64) -> bool {
    inner.settings.freshness().is_fresh(rec.checked_ms, now)
}

fn is_servable_stale(inner: &Inner, rec: &IndexRecord, now: u64) -> bool {
    inner
        .settings
        .freshness()
        .may_serve_stale(rec.checked_ms, now)
}

/// `GET|HEAD /charts/<name>/index.yaml`.
async fn index(
    inner: &Rc<Inner>,
    repo: &HelmRepo,
    req: &Request<()>,
    head: bool,
) -> Result<(Response<Body>, CacheStatus), HelmError> {
    let m = &inner.metrics;
    let now = inner.ports.clock.now_ms();
    let cached = match store::load(inner, repo).await? {
        Some(r) if store::chunks_present(inner, &r).await? => Some(r),
        _ => None,
    };
    if let Some(rec) = &cached {
        if is_fresh(inner, rec, now) {
            inc(&m.hits);
            return Ok((serve_index(inner, rec, req, head)?, CacheStatus::Hit));
        }
    }
    let (result, joined) = flight::revalidate(inner, repo, cached.clone()).await;
    match (result, cached) {
        (Ok(r), _) => {
            let status = if joined {
                CacheStatus::Coalesced
            } else if r.changed {
                inc(&m.misses);
                CacheStatus::Miss
            } else {
                inc(&m.hits);
                CacheStatus::Hit
            };
            Ok((serve_index(inner, &r.rec, req, head)?, status))
        }
        (Err(Fetch::NotFound(msg)), _) => Err(HelmError::NotFound(msg)),
        (Err(Fetch::Failed(_)), Some(rec)) if is_servable_stale(inner, &rec, now) => {
            inc(&m.upstream_errors);
            inc(&m.stale_served);
            Ok((serve_index(inner, &rec, req, head)?, CacheStatus::Stale))
        }
        (Err(Fetch::Failed(e)), _) => Err(e),
    }
}

fn serve_index(
    inner: &Inner,
    rec: &IndexRecord,
    req: &Request<()>,
    head: bool,
) -> Result<Response<Body>, HelmError> {
    let etag = format!("\"{}\"", rec.digest);
    let matches = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");
    let b = Response::builder().header(header::ETAG, etag.as_str());
    let resp = if matches {
        b.status(StatusCode::NOT_MODIFIED).body(Body::Empty)
    } else {
        b.status(StatusCode::OK)
            .header(header::CONTENT_TYPE, INDEX_CONTENT_TYPE)
            .header(header::CONTENT_LENGTH, rec.size)
            .body(if head {
                Body::Empty
            } else {
                Body::Stream(store::index_stream(
                    inner.ports.blobs.clone(),
                    rec.chunks.clone(),
                ))
            })
    };
    resp.map_err(|e| HelmError::Internal(e.to_string()))
}

/// Finds a chart path in the repository's index, fetching the index when there is none (or
/// its stored map is gone), and revalidating a stale index that does not list the path.
async fn find(
    inner: &Rc<Inner>,
    repo: &HelmRepo,
    key: &str,
) -> Result<Option<entry::ChartRef>, HelmError> {
    let mut rec = store::load(inner, repo).await?;
    let mut refreshed = false;
    for _ in 0..3 {
        let r = match rec.take() {
            Some(r) => r,
            None => {
                refreshed = true;
                match flight::revalidate(inner, repo, None).await.0 {
                    Ok(r) => r.rec,
                    Err(Fetch::NotFound(msg)) => return Err(HelmError::NotFound(msg)),
                    Err(Fetch::Failed(e)) => return Err(e),
                }
            }
        };
        match store::lookup(inner, &r, key).await {
            Ok(Some(c)) => return Ok(Some(c)),
            Ok(None) if refreshed || is_fresh(inner, &r, inner.ports.clock.now_ms()) => {
                return Ok(None)
            }
            // A stale index that does not list the path: the chart may be new upstream.
            Ok(None) => match flight::revalidate(inner, repo, Some(r)).await.0 {
                Ok(n) if n.changed => {
                    refreshed = true;
                    rec = Some(n.rec);
                }
                Ok(_) | Err(_) => return Ok(None),
            },
            Err(Some(e)) => return Err(e),
            // A map chunk is gone (evicted or purged): rebuild from the upstream.
            Err(None) => rec = None,
        }
    }
    Ok(None)
}

/// `GET|HEAD /charts/<name>/<path>`: served only when `repo` holds the chart (see
/// [`holdings`]); otherwise obtained for `repo` first.
async fn chart(
    inner: &Rc<Inner>,
    repo: &HelmRepo,
    key: &str,
    head: bool,
) -> Result<(Response<Body>, CacheStatus), HelmError> {
    let m = &inner.metrics;
    let Some(c) = find(inner, repo, key).await? else {
        return Err(HelmError::NotFound(format!(
            "chart repository {} does not list {key}",
            repo.name
        )));
    };
    let digest = c.digest_string();
    if holdings::is_held(inner, repo, &digest).await? {
        if let Some(resp) = serve_chart(inner, &digest, head).await? {
            inc(&m.hits);
            return Ok((resp, CacheStatus::Hit));
        }
    }
    // Twice at most: bytes proven present may be evicted before they are served, and the
    // second obtain then fills them.
    for _ in 0..2 {
        let (result, joined) = flight::obtain(inner, repo, &c).await;
        let status = if joined {
            CacheStatus::Coalesced
        } else {
            inc(&m.misses);
            CacheStatus::Miss
        };
        result?;
        if let Some(resp) = serve_chart(inner, &digest, head).await? {
            return Ok((resp, status));
        }
    }
    Err(HelmError::Internal(format!(
        "chart {key} vanished from storage after its fill"
    )))
}

/// A stored chart; None when it is not stored.
async fn serve_chart(
    inner: &Inner,
    digest: &str,
    head: bool,
) -> Result<Option<Response<Body>>, HelmError> {
    let blobs = &inner.ports.blobs;
    let internal = |e: crate::core::ports::StoreError| HelmError::Internal(e.to_string());
    let d = crate::core::registry::reference::parse_digest(digest)
        .map_err(|e| HelmError::Internal(e.to_string()))?;
    let Some(size) = blobs.stat(&d).await.map_err(internal)? else {
        return Ok(None);
    };
    let body = if head {
        Body::Empty
    } else {
        match blobs.serve(&d, 0, size).await.map_err(internal)? {
            Some(b) => b,
            None => return Ok(None),
        }
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, CHART_CONTENT_TYPE)
        .header(header::CONTENT_LENGTH, size)
        .header(header::ETAG, format!("\"{digest}\""))
        .body(body)
        .map(Some)
        .map_err(|e| HelmError::Internal(e.to_string()))
}
