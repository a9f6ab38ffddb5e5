//! Blobs: served from the blob store when present; on a miss, one *fill* per digest streams
//! the upstream body into a staged write, and every requester (the first and any that arrive
//! while it runs) reads the growing blob: the newest bytes straight from the chunks in memory
//! (a bounded window), older ones back from the staged write. The store's writer hashes what
//! it writes and commits only when the sha256 matches (the `BlobWriter` contract); on a
//! mismatch nothing is stored and every reader's stream ends in an error, which makes the host
//! abort the client connection.
//!
//! Receiving from the upstream and writing to the store run concurrently: the writer gets
//! everything received since its last write in one call (adaptive batching), so hashing and
//! disk writes overlap with the network instead of stalling it. The receiver waits when more
//! than [`MAX_UNPERSISTED`] bytes are not yet written, which bounds memory.
//!
//! Readers never get the last [`HOLDBACK`] bytes before the digest is verified, so a client
//! can never complete a transfer of bad bytes (Harbor withholds its tail for the same reason).
//! That holds for a `Range` too: a partial response served from a fill in progress withholds
//! the last [`HOLDBACK`] bytes *of the range* (all of a shorter range) until the fill is
//! verified, even when the range lies wholly inside what was already received. Holding is
//! chosen over proxying ranges uncached from the upstream because the fill is running anyway:
//! the range costs no second transfer, and containerd's resumed ranges after a reset complete
//! as soon as the one transfer is verified. The fill runs through the deferred-work port, so it
//! finishes (and warms the cache) even if the client that started it leaves.
//!
//! Blobs are served per repository (see [`links`]): a stored blob, or a fill in progress
//! started for another repository, is served for the request's repository only when that
//! repository holds a link or the upstream confirms it under the repository's name. A fill
//! that completes links the blob to the repository it was fetched for. At most
//! `[cache] max_fills` fills run at once per instance; a further miss answers 503 UNAVAILABLE
//! with `Retry-After` instead of opening another upstream transfer and staged write.
//!
//! A host whose platform can fill a blob without the bytes passing through the core
//! ([`BlobStore::fill_from`], Workers) gets the upstream's response instead of a writer: one
//! client of the whole blob takes the host's live body (its tail still withheld until the
//! platform verified the bytes), and every other reader waits for the commit and is served
//! from the store.
//!
//! Across instances (the native host's worker threads), the [`FillCoordinator`] port is asked
//! before a miss starts a fill of its own: when another instance already runs one for the
//! digest, this instance *follows* it (a local fill mirroring the other's progress, read from
//! its staged write, the last [`HOLDBACK`] bytes still withheld until the other reports the
//! blob verified and committed). Following needs no fill slot; leading does.
//!
//! [`FillCoordinator`]: crate::core::ports::FillCoordinator
//! [`BlobStore::fill_from`]: crate::core::ports::BlobStore::fill_from
//! [`HOLDBACK`]: crate::core::registry::fill::HOLDBACK

use crate::core::body::{Body, CacheStatus};
use crate::core::context::Ctx;
use crate::core::error::RegistryError;
use crate::core::http::{response, set_header};
use crate::core::metrics::inc;
use crate::core::ports::{FillClaim, FillProgress};
use crate::core::registry::fill::{fill_stream, Fill, FillPort};
use crate::core::registry::links::{self, Kind, Notes, Via};
use crate::core::registry::media::header as h;
use crate::core::registry::range::{ByteRange, RangeOutcome};
use crate::core::registry::reference::Digest;
use crate::core::registry::transfer::{drive, drive_follower};
use futures_util::future::FutureExt;
use http::{header, Method, Response, StatusCode};

/// `Retry-After` (seconds) when the fill cap refuses a miss.
pub const FILL_RETRY_AFTER_SECS: u64 = 5;

fn blob_response(
    status: StatusCode,
    digest: &Digest,
    length: Option<u64>,
    body: Body,
) -> Result<Response<Body>, RegistryError> {
    let mut b = response(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some(l) = length {
        b = b.header(header::CONTENT_LENGTH, l);
    }
    let mut resp = b
        .body(body)
        .map_err(|e| RegistryError::Internal(e.to_string()))?;
    set_header(&mut resp, h::CONTENT_DIGEST, digest.as_str());
    set_header(&mut resp, "etag", &format!("\"{digest}\""));
    Ok(resp)
}

fn unsatisfiable(size: u64) -> Result<Response<Body>, RegistryError> {
    let e =
        RegistryError::RangeInvalid(format!("range not satisfiable for a blob of {size} bytes"));
    let mut resp = crate::core::http::error_response(&e, false);
    set_header(&mut resp, "content-range", &format!("bytes */{size}"));
    Ok(resp)
}

/// Plans a response for a blob of `size` (if known): (status, start, end exclusive).
fn plan(range: Option<ByteRange>, size: Option<u64>) -> Option<(StatusCode, u64, Option<u64>)> {
    match (range, size) {
        (Some(r), Some(size)) => match r.resolve(size) {
            RangeOutcome::Partial { start, end } => {
                Some((StatusCode::PARTIAL_CONTENT, start, Some(end + 1)))
            }
            RangeOutcome::Unsatisfiable => None,
        },
        (_, size) => Some((StatusCode::OK, 0, size)),
    }
}

fn finish(
    ctx: &Ctx<'_>,
    digest: &Digest,
    status: StatusCode,
    start: u64,
    end: Option<u64>,
    size: Option<u64>,
    body: impl FnOnce() -> Body,
) -> Result<Response<Body>, RegistryError> {
    let length = end.map(|e| e - start);
    let body = if ctx.head { Body::Empty } else { body() };
    let mut resp = blob_response(status, digest, length, body)?;
    if status == StatusCode::PARTIAL_CONTENT {
        if let (Some(e), Some(s)) = (end, size) {
            set_header(
                &mut resp,
                "content-range",
                &format!("bytes {start}-{}/{s}", e - 1),
            );
        }
    }
    Ok(resp)
}

/// Serves a stored blob to an entitled repository; None if it is not (or no longer) stored.
async fn from_store(
    ctx: &Ctx<'_>,
    digest: &Digest,
    range: Option<ByteRange>,
    notes: &Notes,
) -> Result<Option<Response<Body>>, RegistryError> {
    let blobs = &ctx.inner.ports.blobs;
    let internal = |e: crate::core::ports::StoreError| RegistryError::Internal(e.to_string());
    let Some(size) = blobs.stat(digest).await.map_err(internal)? else {
        return Ok(None);
    };
    links::entitle(ctx, digest, Kind::Blob, None, notes).await?;
    let Some((status, start, end)) = plan(range, Some(size)) else {
        return unsatisfiable(size).map(Some);
    };
    let end_v = end.unwrap_or(size);
    let body = if ctx.head {
        None
    } else {
        match blobs.serve(digest, start, end_v).await.map_err(internal)? {
            Some(b) => Some(b),
            None => return Ok(None),
        }
    };
    finish(
        ctx,
        digest,
        status,
        start,
        Some(end_v),
        Some(size),
        move || body.unwrap_or(Body::Empty),
    )
    .map(Some)
}

/// Answers a HEAD from the upstream's HEAD, when it gives a length.
async fn head_upstream(ctx: &Ctx<'_>, digest: &Digest) -> Option<Response<Body>> {
    let path = format!("/v2/{}/blobs/{digest}", ctx.name);
    let resp = ctx
        .inner
        .client
        .request(ctx.up, Method::HEAD, &path, None, ctx.name.as_str(), true)
        .await
        .ok()?;
    if resp.status() != StatusCode::OK {
        return None;
    }
    let size = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())?;
    blob_response(StatusCode::OK, digest, Some(size), Body::Empty).ok()
}

/// The 503 a miss gets while `max_fills` fills run.
fn fill_cap_reached(ctx: &Ctx<'_>) -> Response<Body> {
    let e = RegistryError::Unavailable("too many blob transfers in flight; retry later".into());
    let mut resp = crate::core::http::error_response(&e, ctx.head);
    set_header(&mut resp, "retry-after", &FILL_RETRY_AFTER_SECS.to_string());
    resp
}

/// A new local fill of `digest` for the request's repository, registered so later misses on
/// this instance join it.
fn start_fill(ctx: &Ctx<'_>, digest: &Digest) -> std::rc::Rc<Fill> {
    let f = Fill::new(ctx.up_index, ctx.name.clone());
    ctx.inner
        .fills
        .borrow_mut()
        .insert(digest.as_str().to_string(), f.clone());
    f
}

/// `GET|HEAD /v2/<name>/blobs/<digest>`.
pub(crate) async fn get(
    ctx: &Ctx<'_>,
    digest: &Digest,
    range: Option<ByteRange>,
) -> Result<(Response<Body>, CacheStatus), RegistryError> {
    let notes = Notes::default();
    let mut out = get_noted(ctx, digest, range, &notes).await;
    if let Ok((resp, _)) = &mut out {
        notes.attach(resp);
    }
    out
}

async fn get_noted(
    ctx: &Ctx<'_>,
    digest: &Digest,
    range: Option<ByteRange>,
    notes: &Notes,
) -> Result<(Response<Body>, CacheStatus), RegistryError> {
    let m = &ctx.inner.metrics;
    if let Some(resp) = from_store(ctx, digest, range, notes).await? {
        m.hit(&ctx.up.host);
        return Ok((resp, CacheStatus::Hit));
    }
    let lookup = || ctx.inner.fills.borrow().get(digest.as_str()).cloned();
    let mut existing = lookup();
    if ctx.head && existing.is_none() {
        // A HEAD carries no bytes, so the upstream's own HEAD answers it without starting a
        // transfer (on hosts whose deferred work is cut after the response, a fill started by
        // a HEAD would be wasted); its 200 also links the blob to this repository. Chained
        // caches may 404 a HEAD until someone GETs the blob: then, and on any other failure,
        // fall through to a fill (or join one that started meanwhile).
        if let Some(resp) = head_upstream(ctx, digest).await {
            if let Err(e) =
                links::record(ctx.inner, &ctx.up.host, ctx.name, &[digest], Via::Confirmed).await
            {
                notes.push(e);
            }
            m.miss(&ctx.up.host);
            return Ok((resp, CacheStatus::Miss));
        }
        existing = lookup();
    }
    if existing
        .as_ref()
        .is_some_and(|f| !f.is_for(ctx.up_index, ctx.name))
    {
        // A fill for another repository is joined only once this one is entitled.
        links::entitle(ctx, digest, Kind::Blob, None, notes).await?;
    }
    let (fill, status) = match existing {
        Some(f) => {
            inc(&m.coalesced_waits);
            (f, CacheStatus::Coalesced)
        }
        None => match claim_fill(ctx, digest, range, notes).await? {
            Claimed::Fill(f, status) => (f, status),
            Claimed::Answer(resp, status) => return Ok((resp, status)),
        },
    };
    fill.wait_started().await?;
    let size = fill.state.borrow().size;
    let Some((code, start, end)) = plan(range, size) else {
        return Ok((unsatisfiable(size.unwrap_or(0))?, status));
    };
    let host = fill.state.borrow().host.clone();
    if let Some(host) = host {
        // The host fills it in its runtime: one client of the whole blob takes the live body;
        // everyone else is answered from the store once the blob is committed.
        let whole = start == 0 && end == size;
        if let Some(body) = (whole && !ctx.head).then(|| host.take_body()).flatten() {
            return Ok((
                finish(ctx, digest, code, start, end, size, || body)?,
                status,
            ));
        }
        fill.wait_done().await?;
        return match from_store(ctx, digest, range, notes).await? {
            Some(resp) => Ok((resp, status)),
            None => Err(RegistryError::Unavailable(format!(
                "blob {digest} was evicted while it was served; retry"
            ))),
        };
    }
    let blobs = ctx.inner.ports.blobs.clone();
    let resp = finish(ctx, digest, code, start, end, size, || {
        Body::Stream(fill_stream(fill, blobs, digest.clone(), start, end))
    })?;
    Ok((resp, status))
}

/// What claiming a new fill gave: a fill to read (led here, or following another instance's),
/// or an answer already (the fill cap, or a blob another instance committed meanwhile).
enum Claimed {
    Fill(std::rc::Rc<Fill>, CacheStatus),
    Answer(Response<Body>, CacheStatus),
}

/// A miss with no local fill to join: lead a fill here, or follow another instance's through
/// the fill coordinator.
async fn claim_fill(
    ctx: &Ctx<'_>,
    digest: &Digest,
    range: Option<ByteRange>,
    notes: &Notes,
) -> Result<Claimed, RegistryError> {
    let m = &ctx.inner.metrics;
    let lookup = || ctx.inner.fills.borrow().get(digest.as_str()).cloned();
    let scope = format!("{}/{}", ctx.up.host, ctx.name);
    let coordinator = ctx.inner.slots.get::<FillPort>().0.borrow().clone();
    match coordinator.claim(digest, &scope).await {
        FillClaim::Lead(lease) => {
            if ctx.inner.fills.borrow().len() >= ctx.inner.settings.max_fills {
                // Dropping the lease frees the digest for another instance.
                drop(lease);
                notes.push(format!(
                    "fill cap of {} reached",
                    ctx.inner.settings.max_fills
                ));
                return Ok(Claimed::Answer(fill_cap_reached(ctx), CacheStatus::None));
            }
            // Another instance may have committed the blob since it was looked
            // up: then the lease ends at once (anyone following reads the store).
            let committed = match coordinator.is_shared() {
                true => ctx.inner.ports.blobs.stat(digest).await.ok().flatten(),
                false => None,
            };
            if let Some(size) = committed {
                lease.report(&FillProgress {
                    started: true,
                    size: Some(size),
                    persisted: size,
                    outcome: Some(Ok(())),
                });
                if let Some(resp) = from_store(ctx, digest, range, notes).await? {
                    m.hit(&ctx.up.host);
                    return Ok(Claimed::Answer(resp, CacheStatus::Hit));
                }
                return Err(RegistryError::Unavailable(format!(
                    "blob {digest} was evicted while it was served; retry"
                )));
            }
            m.miss(&ctx.up.host);
            let f = start_fill(ctx, digest);
            ctx.inner.ports.deferred.spawn(
                drive(
                    ctx.inner.clone(),
                    f.clone(),
                    lease,
                    (ctx.up_index, ctx.name.clone(), digest.clone()),
                )
                .boxed_local(),
            );
            Ok(Claimed::Fill(f, CacheStatus::Miss))
        }
        FillClaim::Follow(watch) => {
            if watch.scope() != scope {
                // Another thread's fill for another repository: entitled first.
                links::entitle(ctx, digest, Kind::Blob, None, notes).await?;
            }
            inc(&m.coalesced_waits);
            // A local fill may have started while this one was being entitled.
            let f = match lookup() {
                Some(f) => f,
                None => {
                    let f = start_fill(ctx, digest);
                    let follower =
                        drive_follower(ctx.inner.clone(), f.clone(), watch, digest.clone());
                    ctx.inner.ports.deferred.spawn(follower.boxed_local());
                    f
                }
            };
            Ok(Claimed::Fill(f, CacheStatus::Coalesced))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        let r = |s| crate::core::registry::range::parse_range(s);
        assert_eq!(plan(None, Some(10)), Some((StatusCode::OK, 0, Some(10))));
        assert_eq!(plan(None, None), Some((StatusCode::OK, 0, None)));
        assert_eq!(
            plan(r("bytes=2-4"), Some(10)),
            Some((StatusCode::PARTIAL_CONTENT, 2, Some(5)))
        );
        assert_eq!(plan(r("bytes=10-"), Some(10)), None);
        // Unknown size: the whole body, which a range request allows.
        assert_eq!(plan(r("bytes=2-4"), None), Some((StatusCode::OK, 0, None)));
    }
}
