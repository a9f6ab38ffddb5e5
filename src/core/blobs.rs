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

use crate::core::app::{response, set_header, Ctx, Inner};
use crate::core::body::{Body, CacheStatus};
use crate::core::error::RegistryError;
use crate::core::links::{self, Kind, Notes, Via};
use crate::core::manifests::status_failure;
use crate::core::media::header as h;
use crate::core::metrics::{add, inc};
use crate::core::ports::{BlobStore, BodyError, ByteStream, CommitError, TailReader};
use crate::core::range::{ByteRange, RangeOutcome};
use crate::core::reference::{Digest, Name};
use bytes::Bytes;
use futures_util::future::{join, poll_fn, FutureExt};
use futures_util::StreamExt;
use http::{header, Method, Response, StatusCode};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Bytes withheld from readers until the digest is verified.
pub const HOLDBACK: u64 = 64 * 1024;
/// Largest read from the staged write.
pub const CHUNK: usize = 512 * 1024;
/// Written bytes kept in memory for readers that keep up.
pub const WINDOW: u64 = 4 << 20;
/// Most bytes received but not yet written before the receiver waits.
pub const MAX_UNPERSISTED: u64 = 16 << 20;
/// `Retry-After` (seconds) when the fill cap refuses a miss.
pub const FILL_RETRY_AFTER_SECS: u64 = 5;

#[derive(Debug, Clone)]
enum Phase {
    Connecting,
    Streaming,
    Done,
    Failed(RegistryError),
}

struct FillState {
    phase: Phase,
    size: Option<u64>,
    /// Bytes taken from the upstream.
    received: u64,
    /// Bytes the writer has written (readable through `tail`).
    persisted: u64,
    /// The newest chunks, in order; `recent_start` is the offset of the first.
    recent: VecDeque<Bytes>,
    recent_start: u64,
    tail: Option<Rc<dyn TailReader>>,
}

impl FillState {
    /// The chunks not yet written, and the offset they reach.
    fn unpersisted(&self) -> (Vec<Bytes>, u64) {
        let mut off = self.recent_start;
        let mut out = Vec::new();
        for c in &self.recent {
            if off >= self.persisted {
                out.push(c.clone());
            }
            off += c.len() as u64;
        }
        (out, off)
    }

    /// Drops written chunks beyond the window.
    fn trim(&mut self) {
        while let Some(front) = self.recent.front() {
            let len = front.len() as u64;
            let in_memory = self.received - self.recent_start;
            if self.recent_start + len > self.persisted || in_memory - len < WINDOW {
                break;
            }
            self.recent.pop_front();
            self.recent_start += len;
        }
    }

    /// Bytes at `pos` (up to `limit`) from memory, if they are there.
    fn in_memory(&self, pos: u64, limit: u64) -> Option<Bytes> {
        if pos < self.recent_start {
            return None;
        }
        let mut off = self.recent_start;
        for c in &self.recent {
            let end = off + c.len() as u64;
            if pos < end {
                let from = (pos - off) as usize;
                let to = (limit.min(end) - off) as usize;
                return Some(c.slice(from..to));
            }
            off = end;
        }
        None
    }
}

/// One upstream transfer of one digest, shared by every reader entitled to it.
pub(crate) struct Fill {
    /// The upstream (index) and repository the transfer is made for.
    up: usize,
    name: Name,
    state: RefCell<FillState>,
    version: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Fill {
    fn new(up: usize, name: Name) -> Rc<Fill> {
        Rc::new(Fill {
            up,
            name,
            state: RefCell::new(FillState {
                phase: Phase::Connecting,
                size: None,
                received: 0,
                persisted: 0,
                recent: VecDeque::new(),
                recent_start: 0,
                tail: None,
            }),
            version: Cell::new(0),
            wakers: RefCell::new(Vec::new()),
        })
    }

    /// Was this fill started for the request's own repository? Then the upstream's answer to
    /// the fill's GET is the entitlement.
    fn is_for(&self, ctx: &Ctx<'_>) -> bool {
        self.up == ctx.up_index && self.name == *ctx.name
    }

    fn update(&self, f: impl FnOnce(&mut FillState)) {
        f(&mut self.state.borrow_mut());
        self.version.set(self.version.get() + 1);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves once the state changed after `seen`.
    async fn changed(&self, seen: u64) {
        poll_fn(|cx| {
            if self.version.get() != seen {
                Poll::Ready(())
            } else {
                self.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Waits until the upstream answered (or the fill failed).
    async fn wait_started(&self) -> Result<(), RegistryError> {
        loop {
            let seen = self.version.get();
            match &self.state.borrow().phase {
                Phase::Connecting => {}
                Phase::Failed(e) => return Err(e.clone()),
                _ => return Ok(()),
            }
            self.changed(seen).await;
        }
    }
}

/// What a reader does next.
enum Step {
    Chunk(Bytes),
    ReadStaged(Rc<dyn TailReader>, u64, usize),
    ReadCommitted(u64),
    Fail(String),
    End,
    Wait(u64),
}

/// Where a fill reader gets its next bytes.
enum ReadState {
    /// From the fill, at this offset.
    Fill(u64),
    /// From the committed blob (a store without a tail reader, reader behind the window).
    Store(ByteStream),
}

/// A stream of bytes `[start, end)` of a fill as it grows (`end` None: to the end). Bytes come
/// from memory when the reader keeps up, from the staged write when it falls behind, or, for
/// a store that cannot read a write in progress, from the committed blob once it is verified.
fn fill_stream(
    fill: Rc<Fill>,
    blobs: Rc<dyn BlobStore>,
    digest: Digest,
    start: u64,
    end: Option<u64>,
) -> ByteStream {
    futures_util::stream::unfold(Some(ReadState::Fill(start)), move |state| {
        let fill = fill.clone();
        let blobs = blobs.clone();
        let digest = digest.clone();
        async move {
            let pos = match state? {
                ReadState::Store(mut s) => {
                    return s.next().await.map(|item| {
                        let next = item.is_ok().then_some(ReadState::Store(s));
                        (item, next)
                    });
                }
                ReadState::Fill(pos) => pos,
            };
            loop {
                let step = {
                    let s = fill.state.borrow();
                    let (limit, finished) = match &s.phase {
                        Phase::Failed(e) => (0, Err(e.to_string())),
                        Phase::Done => (s.received, Ok(true)),
                        // Unverified: hold back the fill's newest bytes, and the last bytes
                        // of this response, so it cannot complete before the digest checks.
                        _ => {
                            let own = end.map_or(u64::MAX, |e| e.saturating_sub(HOLDBACK));
                            (s.received.saturating_sub(HOLDBACK).min(own), Ok(false))
                        }
                    };
                    let limit = end.map_or(limit, |e| e.min(limit));
                    match finished {
                        Err(e) => Step::Fail(e),
                        Ok(done) if pos < limit => match (s.in_memory(pos, limit), &s.tail) {
                            (Some(b), _) => Step::Chunk(b),
                            (None, Some(tail)) => {
                                let upto = limit.min(s.recent_start).min(s.persisted);
                                Step::ReadStaged(
                                    tail.clone(),
                                    pos,
                                    (upto - pos).min(CHUNK as u64) as usize,
                                )
                            }
                            (None, None) if done => Step::ReadCommitted(limit),
                            (None, None) => Step::Wait(fill.version.get()),
                        },
                        Ok(true) => Step::End,
                        Ok(false) => Step::Wait(fill.version.get()),
                    }
                };
                return match step {
                    Step::Chunk(b) => {
                        let next = pos + b.len() as u64;
                        Some((Ok(b), Some(ReadState::Fill(next))))
                    }
                    Step::ReadStaged(tail, at, want) => match tail.read_at(at, want).await {
                        Ok(b) if !b.is_empty() => {
                            let next = at + b.len() as u64;
                            Some((Ok(b), Some(ReadState::Fill(next))))
                        }
                        Ok(_) => Some((
                            Err(BodyError("staged blob shorter than written".into())),
                            None,
                        )),
                        Err(e) => Some((Err(BodyError(e.to_string())), None)),
                    },
                    Step::ReadCommitted(limit) => match blobs.read(&digest, pos, limit).await {
                        Ok(Some(mut s)) => s.next().await.map(|item| {
                            let next = item.is_ok().then_some(ReadState::Store(s));
                            (item, next)
                        }),
                        Ok(None) => Some((
                            Err(BodyError(format!("blob {digest} vanished after its fill"))),
                            None,
                        )),
                        Err(e) => Some((Err(BodyError(e.to_string())), None)),
                    },
                    Step::Fail(e) => Some((Err(BodyError(e)), None)),
                    Step::End => None,
                    Step::Wait(seen) => {
                        fill.changed(seen).await;
                        continue;
                    }
                };
            }
        }
    })
    .boxed_local()
}

/// Fetches the blob upstream into the store; the result is recorded in the fill. A verified
/// blob is linked to the repository it was fetched for before readers see the end (a failed
/// link write only costs that repository one `HEAD` later, so it is not an error).
async fn drive(inner: Rc<Inner>, fill: Rc<Fill>, up: usize, name: Name, digest: Digest) {
    let result = transfer(&inner, &fill, up, &name, &digest).await;
    if result.is_ok() {
        let host = &inner.settings.upstreams[up].host;
        let _ = links::record(&inner, host, &name, &[&digest], Via::Fetched).await;
    }
    fill.update(|s| {
        s.phase = match result {
            Ok(()) => Phase::Done,
            Err(e) => Phase::Failed(e),
        }
    });
    inner.fills.borrow_mut().remove(digest.as_str());
}

async fn transfer(
    inner: &Rc<Inner>,
    fill: &Fill,
    up: usize,
    name: &Name,
    digest: &Digest,
) -> Result<(), RegistryError> {
    let spec = &inner.settings.upstreams[up];
    let what = format!("blob {digest}");
    let path = format!("/v2/{name}/blobs/{digest}");
    let resp = inner
        .client
        .request(spec, Method::GET, &path, None, name.as_str(), true)
        .await
        .map_err(crate::core::upstream::registry_error)?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => {
            return Err(RegistryError::BlobUnknown(format!(
                "{what} is not known upstream"
            )))
        }
        s => return Err(status_failure(s, &what)),
    }
    let size = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let internal = |e: crate::core::ports::StoreError| RegistryError::Internal(e.to_string());
    let mut writer = inner
        .ports
        .blobs
        .create(digest, size)
        .await
        .map_err(internal)?;
    let tail = writer.tail();
    fill.update(|s| {
        s.phase = Phase::Streaming;
        s.size = size;
        s.tail = tail;
    });

    // The receiver and the writer run concurrently and meet in the fill's state.
    let received_all: RefCell<Option<Result<(), RegistryError>>> = RefCell::new(None);
    let write_failed: Cell<Option<RegistryError>> = Cell::new(None);
    let mut body = resp.into_body();
    let receiver = async {
        let result = async {
            loop {
                loop {
                    let seen = fill.version.get();
                    let backlog = {
                        let s = fill.state.borrow();
                        s.received - s.persisted
                    };
                    if backlog <= MAX_UNPERSISTED {
                        break;
                    }
                    if let Some(e) = write_failed.take() {
                        return Err(e);
                    }
                    fill.changed(seen).await;
                }
                if let Some(e) = write_failed.take() {
                    return Err(e);
                }
                let chunk = match body.next().await {
                    None => break,
                    Some(c) => c.map_err(|e| {
                        RegistryError::Unavailable(format!("{what}: upstream body: {e}"))
                    })?,
                };
                let len = chunk.len() as u64;
                let total = fill.state.borrow().received + len;
                if size.is_some_and(|s| total > s) {
                    return Err(RegistryError::BadUpstream(format!(
                        "{what}: longer than its Content-Length"
                    )));
                }
                add(&inner.metrics.bytes_fetched, len);
                fill.update(|s| {
                    s.recent.push_back(chunk);
                    s.received = total;
                });
            }
            let got = fill.state.borrow().received;
            if size.is_some_and(|s| got != s) {
                return Err(RegistryError::Unavailable(format!(
                    "{what}: upstream body ended early"
                )));
            }
            Ok(())
        }
        .await;
        *received_all.borrow_mut() = Some(result);
        fill.update(|_| {});
    };
    let persister = async {
        loop {
            let seen = fill.version.get();
            let (chunks, upto) = fill.state.borrow().unpersisted();
            if chunks.is_empty() {
                if received_all.borrow().is_some() {
                    return;
                }
                fill.changed(seen).await;
                continue;
            }
            if let Err(e) = writer.write(chunks).await {
                write_failed.set(Some(internal(e)));
                fill.update(|_| {});
                return;
            }
            fill.update(|s| {
                s.persisted = upto;
                s.trim();
            });
            if received_all.borrow().as_ref().is_some_and(|r| r.is_err()) {
                return;
            }
        }
    };
    join(receiver, persister).await;
    let outcome = match (write_failed.take(), received_all.into_inner()) {
        (Some(e), _) => Err(e),
        (None, Some(r)) => r,
        (None, None) => Err(RegistryError::Internal(format!(
            "{what}: fill ended without a result"
        ))),
    };
    if let Err(e) = outcome {
        writer.abort().await;
        return Err(e);
    }
    match writer.commit().await {
        Ok(()) => Ok(()),
        Err(CommitError::DigestMismatch { actual }) => {
            inc(&inner.metrics.digest_mismatches);
            Err(RegistryError::BadUpstream(format!(
                "{what}: upstream bytes hash to {actual}; not cached"
            )))
        }
        Err(CommitError::Store(e)) => Err(internal(e)),
    }
}

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
    let mut resp = crate::core::app::error_response(&e, false);
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
    let mut resp = crate::core::app::error_response(&e, ctx.head);
    set_header(&mut resp, "retry-after", &FILL_RETRY_AFTER_SECS.to_string());
    resp
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
    if existing.as_ref().is_some_and(|f| !f.is_for(ctx)) {
        // A fill for another repository is joined only once this one is entitled.
        links::entitle(ctx, digest, Kind::Blob, None, notes).await?;
    }
    let (fill, status) = match existing {
        Some(f) => {
            inc(&m.coalesced_waits);
            (f, CacheStatus::Coalesced)
        }
        None => {
            if ctx.inner.fills.borrow().len() >= ctx.inner.settings.max_fills {
                notes.push(format!(
                    "fill cap of {} reached",
                    ctx.inner.settings.max_fills
                ));
                return Ok((fill_cap_reached(ctx), CacheStatus::None));
            }
            m.miss(&ctx.up.host);
            let f = Fill::new(ctx.up_index, ctx.name.clone());
            ctx.inner
                .fills
                .borrow_mut()
                .insert(digest.as_str().to_string(), f.clone());
            ctx.inner.ports.deferred.spawn(
                drive(
                    ctx.inner.clone(),
                    f.clone(),
                    ctx.up_index,
                    ctx.name.clone(),
                    digest.clone(),
                )
                .boxed_local(),
            );
            (f, CacheStatus::Miss)
        }
    };
    fill.wait_started().await?;
    let size = fill.state.borrow().size;
    let Some((code, start, end)) = plan(range, size) else {
        return Ok((unsatisfiable(size.unwrap_or(0))?, status));
    };
    let blobs = ctx.inner.ports.blobs.clone();
    let resp = finish(ctx, digest, code, start, end, size, || {
        Body::Stream(fill_stream(fill, blobs, digest.clone(), start, end))
    })?;
    Ok((resp, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        let r = |s| crate::core::range::parse_range(s);
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
