//! Where a chart repository's cached state lives, and the upstream exchanges that fill it.
//!
//! - The rewritten `index.yaml` is stored in the blob store as content-addressed chunks
//!   (cut by [`Rewriter`] at entry boundaries, at most a few MiB each), so no host keeps a
//!   whole index in memory or in one key-value entry (Spin's values stop at 1 MB, Workers KV's
//!   at 25 MiB), and an index that changed a little rewrites only the chunks that changed.
//! - The chart map (path → sha256 → upstream URL), sorted by path, is stored the same way in
//!   chunks of at most [`MAP_CHUNK_MAX`] bytes; a lookup reads one chunk.
//! - One small [`IndexRecord`] per repository in the key-value store points at both and
//!   carries the revalidation state (when the upstream last confirmed it, its `ETag` and
//!   `Last-Modified`).
//!
//! Chart files are stored in the blob store under the digest the index lists, through
//! [`BlobStore::create`] with that digest, so a chart whose bytes differ is never committed;
//! fetching them (and deciding whether a URL an index chose may be fetched at all) is
//! `super::chart_fill`'s. Every upstream request, index or chart, goes through `get`:
//! no credentials; redirects are followed there (the upstream port never follows them), at
//! most [`MAX_REDIRECTS`] hops, to http(s) URLs only.
//!
//! Error text never carries what a refused or mismatched answer contained: no digest of the
//! bytes that came back, no upstream body text (it could be an internal service's answer).

use super::entry::{fnv1a, ChartRef};
use super::hosts::is_allowed_chart_url;
use super::rewrite::{IndexError, Rewriter, Summary};
use super::{HelmError, HelmRepo};
use crate::core::context::Inner;
use crate::core::http::{redirect_target, USER_AGENT};
use crate::core::metrics::{add, inc};
use crate::core::ports::{BlobStore, ByteStream, UpstreamError};
use crate::core::registry::reference::{parse_digest, Digest};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::rc::Rc;
use url::Url;

/// Version of the stored index record.
const RECORD_VERSION: u32 = 1;
/// Largest index accepted from an upstream.
pub const MAX_INDEX_SIZE: u64 = 256 << 20;
/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;
/// Map chunks are cut at a path whose hash says so once they hold this much.
const MAP_CHUNK_MIN: usize = 16 << 10;
/// Map chunks are cut at the next path once they hold this much.
pub const MAP_CHUNK_MAX: usize = 64 << 10;

/// One stored chunk: its digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// `sha256:<hex>`.
    pub d: String,
    /// Bytes.
    pub n: u64,
}

/// One chunk of the chart map: the first path it holds, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapPart {
    /// The first (smallest) path in the chunk.
    pub first: String,
    /// `sha256:<hex>`.
    pub d: String,
    /// Bytes.
    pub n: u64,
}

/// The cached state of one chart repository (one small key-value entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRecord {
    /// Format version.
    pub v: u32,
    /// The upstream repository URL the record was built from (a changed URL invalidates it).
    pub upstream: String,
    /// When the upstream last confirmed this index (ms since the epoch).
    pub checked_ms: u64,
    /// The upstream's `ETag`, for `If-None-Match`.
    pub etag: Option<String>,
    /// The upstream's `Last-Modified`, for `If-Modified-Since` when there is no `ETag`.
    pub last_modified: Option<String>,
    /// Names the rewritten index: sha256 over its chunks' digests (the `ETag` served), so
    /// no pass over the whole index is spent on it.
    pub digest: String,
    /// Size of the rewritten index.
    pub size: u64,
    /// The rewritten index, in order.
    pub chunks: Vec<Part>,
    /// The chart map, sorted by path.
    pub map: Vec<MapPart>,
    /// Chart files the map holds.
    pub charts: u64,
    /// Chart version entries in the index.
    pub entries: u64,
}

/// The key-value key of a repository's record.
pub fn record_key(repo: &str) -> String {
    crate::core::registry::keys::bounded("helm/", format!("{repo}/index"))
}

/// Why a fetch did not produce a fresh answer.
#[derive(Debug, Clone)]
pub(crate) enum Fetch {
    /// The upstream says it does not exist.
    NotFound(String),
    /// Anything else: unreachable, timeout, 5xx, 429, auth, garbage.
    Failed(HelmError),
}

/// Maps an upstream status that is not success or 404.
pub(crate) fn status_failure(status: StatusCode, what: &str) -> HelmError {
    match status.as_u16() {
        429 => HelmError::TooManyRequests(format!("upstream rate limit hit fetching {what}")),
        401 | 403 => HelmError::BadUpstream(format!(
            "upstream denied access to {what} ({status}); chart repository credentials are not supported"
        )),
        500..=599 => HelmError::Unavailable(format!("upstream failed fetching {what} ({status})")),
        _ => HelmError::BadUpstream(format!("upstream answered {status} for {what}")),
    }
}

pub(super) fn internal(e: impl std::fmt::Display) -> HelmError {
    HelmError::Internal(e.to_string())
}

/// GETs `url` without credentials, following redirects (never with the request's
/// conditional headers rewritten, never to a non-HTTP URL).
pub(crate) async fn get(
    inner: &Inner,
    repo: &HelmRepo,
    url: &Url,
    conditional: &[(header::HeaderName, String)],
) -> Result<Response<ByteStream>, UpstreamError> {
    let mut current = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        let mut b = Request::builder()
            .method(Method::GET)
            .uri(current.as_str())
            .header(header::USER_AGENT, USER_AGENT);
        // The entry's index origin and `chart_hosts` are configured for this repository and
        // trusted as written; anything else (a redirect elsewhere) meets the address policy.
        let trusted = is_allowed_chart_url(&repo.url, &repo.chart_hosts, &current);
        b = crate::core::outbound::guard_hop(&inner.settings.outbound, url, &current, trusted, b)?;
        if let Some(ca) = &repo.ca {
            b = b.extension(ca.clone());
        }
        for (name, value) in conditional {
            if let Ok(v) = HeaderValue::from_str(value) {
                b = b.header(name, v);
            }
        }
        let req = b
            .body(Bytes::new())
            .map_err(|e| UpstreamError::Other(format!("bad upstream request: {e}")))?;
        inc(&inner.metrics.upstream_requests);
        let resp = inner.ports.upstream.send(req).await?;
        match redirect_target(&current, &resp)? {
            None => return Ok(resp),
            Some(next) => current = next,
        }
    }
    Err(UpstreamError::Other("too many redirects".into()))
}

/// Stores `bytes` in the blob store under their own digest (a no-op when already there).
async fn put_chunk(blobs: &dyn BlobStore, bytes: Vec<u8>) -> Result<Part, HelmError> {
    let digest = Digest::of(&bytes);
    let (d, n) = (digest.to_string(), bytes.len() as u64);
    if blobs.stat(&digest).await.map_err(internal)?.is_none() {
        let mut w = blobs.create(&digest, Some(n)).await.map_err(internal)?;
        if let Err(e) = w.write(vec![Bytes::from(bytes)]).await {
            w.abort().await;
            return Err(internal(e));
        }
        w.commit().await.map_err(internal)?;
    }
    Ok(Part { d, n })
}

/// A chunk digest from a stored index record (written by [`put_chunk`]; a bad one is an
/// internal error).
fn part_digest(d: &str) -> Result<Digest, HelmError> {
    parse_digest(d).map_err(internal)
}

async fn open_part(blobs: &dyn BlobStore, p: &Part) -> Result<Option<ByteStream>, HelmError> {
    blobs
        .read(&part_digest(&p.d)?, 0, p.n)
        .await
        .map_err(internal)
}

/// Reads a whole stored chunk; None when it is gone (evicted, purged).
async fn read_chunk(blobs: &dyn BlobStore, d: &str, n: u64) -> Result<Option<Vec<u8>>, HelmError> {
    let Some(mut s) = blobs.read(&part_digest(d)?, 0, n).await.map_err(internal)? else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(n as usize);
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.map_err(internal)?);
    }
    if out.len() as u64 != n {
        return Ok(None);
    }
    Ok(Some(out))
}

/// Serialises the sorted chart map as `path\tsha256hex\turl\n` lines, cut into chunks at
/// content-chosen paths: yields (first path, bytes) per chunk, one chunk in memory at a time.
pub fn map_chunks(charts: &[ChartRef]) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let first = charts.get(pos)?;
        let mut cur: Vec<u8> = Vec::new();
        while let Some(c) = charts.get(pos) {
            let cut = cur.len() >= MAP_CHUNK_MAX
                || (cur.len() >= MAP_CHUNK_MIN && fnv1a(c.key.as_bytes()) % 8 == 0);
            if cut {
                break;
            }
            cur.extend_from_slice(c.key.as_bytes());
            cur.push(b'\t');
            cur.extend_from_slice(hex::encode(c.digest).as_bytes());
            cur.push(b'\t');
            cur.extend_from_slice(c.url.as_bytes());
            cur.push(b'\n');
            pos += 1;
        }
        Some((first.key.clone(), cur))
    })
}

/// Finds `key` in one map chunk.
pub fn find_in_chunk(chunk: &[u8], key: &str) -> Option<ChartRef> {
    chunk.split(|b| *b == b'\n').find_map(|line| {
        let line = std::str::from_utf8(line).ok()?;
        let mut f = line.splitn(3, '\t');
        let (k, d, u) = (f.next()?, f.next()?, f.next()?);
        if k != key {
            return None;
        }
        let mut digest = [0u8; 32];
        hex::decode_to_slice(d, &mut digest).ok()?;
        Some(ChartRef {
            key: k.to_string(),
            digest,
            url: u.to_string(),
        })
    })
}

/// Loads a repository's record; None when absent, of another format, or built from another
/// upstream URL.
pub(crate) async fn load(inner: &Inner, repo: &HelmRepo) -> Result<Option<IndexRecord>, HelmError> {
    let raw = inner
        .ports
        .kv
        .get(&record_key(&repo.name))
        .await
        .map_err(internal)?;
    Ok(raw
        .and_then(|r| serde_json::from_slice::<IndexRecord>(&r).ok())
        .filter(|r| r.v == RECORD_VERSION && r.upstream == repo.url.as_str()))
}

/// Saves a repository's record.
pub(crate) async fn save(
    inner: &Inner,
    repo: &HelmRepo,
    rec: &IndexRecord,
) -> Result<(), HelmError> {
    let raw = serde_json::to_vec(rec).map_err(internal)?;
    inner
        .ports
        .kv
        .put(&record_key(&repo.name), &raw)
        .await
        .map_err(internal)
}

/// Are all of the record's index chunks still stored?
pub(crate) async fn chunks_present(inner: &Inner, rec: &IndexRecord) -> Result<bool, HelmError> {
    for p in &rec.chunks {
        let d = part_digest(&p.d)?;
        if inner.ports.blobs.stat(&d).await.map_err(internal)? != Some(p.n) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The stored index as one stream, chunk after chunk.
pub(crate) fn index_stream(blobs: Rc<dyn BlobStore>, parts: Vec<Part>) -> ByteStream {
    let state: (usize, Option<ByteStream>) = (0, None);
    futures_util::stream::unfold(Some(state), move |state| {
        let blobs = blobs.clone();
        let parts = parts.clone();
        async move {
            let (mut i, mut cur) = state?;
            loop {
                if let Some(s) = cur.as_mut() {
                    match s.next().await {
                        Some(Ok(b)) => return Some((Ok(b), Some((i, cur)))),
                        Some(Err(e)) => return Some((Err(e), None)),
                        None => {
                            cur = None;
                            i += 1;
                            continue;
                        }
                    }
                }
                let p = parts.get(i)?;
                match open_part(&*blobs, p).await {
                    Ok(Some(s)) => cur = Some(s),
                    Ok(None) => {
                        return Some((
                            Err(crate::core::ports::BodyError(format!(
                                "index chunk {} vanished",
                                p.d
                            ))),
                            None,
                        ))
                    }
                    Err(e) => {
                        return Some((Err(crate::core::ports::BodyError(e.to_string())), None))
                    }
                }
            }
        }
    })
    .boxed_local()
}

/// What a revalidation found.
#[derive(Clone)]
pub(crate) enum Refreshed {
    /// The upstream answered 304: the record holds.
    NotModified,
    /// A new record (already saved).
    New(Box<IndexRecord>),
}

pub(super) fn header_string(
    resp: &Response<ByteStream>,
    name: header::HeaderName,
) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Fetches the upstream index (conditionally when `prev` is given), rewrites and stores it,
/// and saves the new record.
pub(crate) async fn refresh(
    inner: &Inner,
    repo: &HelmRepo,
    prev: Option<&IndexRecord>,
) -> Result<Refreshed, Fetch> {
    let what = format!("the index of chart repository {}", repo.name);
    let failed = |e: HelmError| Fetch::Failed(e);
    let url = repo
        .url
        .join("index.yaml")
        .map_err(|e| failed(internal(e)))?;
    let resp = get(inner, repo, &url, &conditional(prev))
        .await
        .map_err(|e| failed(fetch_failure(&what, e)))?;
    let Some(head) = index_head(&resp, prev.is_some(), &what)? else {
        return Ok(Refreshed::NotModified);
    };
    let (chunks, summary) = rewrite_index(inner, repo, resp.into_body(), &head, &what).await?;
    let Summary {
        charts, entries, ..
    } = summary;
    let map = put_map(&*inner.ports.blobs, &charts)
        .await
        .map_err(failed)?;
    let rec = IndexRecord {
        v: RECORD_VERSION,
        upstream: repo.url.to_string(),
        checked_ms: inner.ports.clock.now_ms(),
        etag: head.etag,
        last_modified: head.last_modified,
        digest: {
            let mut h = Sha256::new();
            chunks.iter().for_each(|p| h.update(p.d.as_bytes()));
            format!("sha256:{}", hex::encode(h.finalize()))
        },
        size: chunks.iter().map(|p| p.n).sum(),
        chunks,
        map,
        charts: charts.len() as u64,
        entries,
    };
    save(inner, repo, &rec).await.map_err(failed)?;
    Ok(Refreshed::New(Box::new(rec)))
}

/// The conditional headers revalidating `prev`: `If-None-Match` with its `ETag`, else
/// `If-Modified-Since` with its `Last-Modified`.
fn conditional(prev: Option<&IndexRecord>) -> Vec<(header::HeaderName, String)> {
    let mut conditional = Vec::new();
    if let Some(p) = prev {
        if let Some(e) = &p.etag {
            conditional.push((header::IF_NONE_MATCH, e.clone()));
        } else if let Some(m) = &p.last_modified {
            conditional.push((header::IF_MODIFIED_SINCE, m.clone()));
        }
    }
    conditional
}

/// What an index response's head says, once it is accepted.
struct IndexHead {
    etag: Option<String>,
    last_modified: Option<String>,
    /// `Content-Length`, when given.
    declared: Option<u64>,
}

/// Reads the head of the upstream's answer for an index: None for a 304 to a conditional
/// request; refused unless it is a 200 with an unencoded body within [`MAX_INDEX_SIZE`].
fn index_head(
    resp: &Response<ByteStream>,
    conditional: bool,
    what: &str,
) -> Result<Option<IndexHead>, Fetch> {
    let failed = |e: HelmError| Fetch::Failed(e);
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_MODIFIED if conditional => return Ok(None),
        StatusCode::NOT_FOUND | StatusCode::GONE => {
            return Err(Fetch::NotFound(format!("{what} is not known upstream")))
        }
        s => return Err(failed(status_failure(s, what))),
    }
    if header_string(resp, header::CONTENT_ENCODING)
        .is_some_and(|e| !e.eq_ignore_ascii_case("identity"))
    {
        return Err(failed(HelmError::BadUpstream(format!(
            "{what}: the upstream sent a content-encoded body"
        ))));
    }
    let head = IndexHead {
        etag: header_string(resp, header::ETAG),
        last_modified: header_string(resp, header::LAST_MODIFIED),
        declared: header_string(resp, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok()),
    };
    if head.declared.is_some_and(|n| n > MAX_INDEX_SIZE) {
        return Err(failed(HelmError::BadUpstream(format!(
            "{what} is larger than {MAX_INDEX_SIZE} bytes"
        ))));
    }
    Ok(Some(head))
}

/// Streams an index body through the [`Rewriter`] into stored chunks, within
/// [`MAX_INDEX_SIZE`] and the length `head` declares: the chunks, in order, and what the
/// rewrite found.
async fn rewrite_index(
    inner: &Inner,
    repo: &HelmRepo,
    mut body: ByteStream,
    head: &IndexHead,
    what: &str,
) -> Result<(Vec<Part>, Summary), Fetch> {
    let failed = |e: HelmError| Fetch::Failed(e);
    let bad_index = |e: IndexError| failed(HelmError::BadUpstream(format!("{what}: {e}")));
    let blobs = inner.ports.blobs.clone();
    let mut rw = Rewriter::new(repo.url.clone());
    let mut received: u64 = 0;
    let mut chunks: Vec<Part> = Vec::new();
    while let Some(c) = body.next().await {
        let c = c.map_err(|e| {
            failed(HelmError::Unavailable(format!(
                "{what}: upstream body: {e}"
            )))
        })?;
        received += c.len() as u64;
        if received > MAX_INDEX_SIZE {
            return Err(failed(HelmError::BadUpstream(format!(
                "{what} is larger than {MAX_INDEX_SIZE} bytes"
            ))));
        }
        add(&inner.metrics.bytes_fetched, c.len() as u64);
        rw.push(&c).map_err(bad_index)?;
        while let Some(out) = rw.take_chunk() {
            chunks.push(put_chunk(&*blobs, out).await.map_err(failed)?);
        }
    }
    if head.declared.is_some_and(|n| n != received) {
        return Err(failed(HelmError::Unavailable(format!(
            "{what}: upstream body ended early"
        ))));
    }
    let (rest, summary) = rw.finish().map_err(bad_index)?;
    for out in rest {
        chunks.push(put_chunk(&*blobs, out).await.map_err(failed)?);
    }
    Ok((chunks, summary))
}

/// Stores the sorted chart map in chunks ([`map_chunks`]), one chunk in memory at a time.
async fn put_map(blobs: &dyn BlobStore, charts: &[ChartRef]) -> Result<Vec<MapPart>, HelmError> {
    let mut map = Vec::new();
    for (first, bytes) in map_chunks(charts) {
        let p = put_chunk(blobs, bytes).await?;
        map.push(MapPart {
            first,
            d: p.d,
            n: p.n,
        });
    }
    Ok(map)
}

/// A record the upstream just confirmed or replaced.
#[derive(Debug, Clone)]
pub(crate) struct Revalidated {
    /// The current record (already saved).
    pub rec: IndexRecord,
    /// The upstream sent a new index (false: it answered 304 to `prev`).
    pub changed: bool,
}

/// [`refresh`], with a 304 folded in: the previous record, confirmed now, saved.
pub(crate) async fn revalidate(
    inner: &Inner,
    repo: &HelmRepo,
    prev: Option<IndexRecord>,
) -> Result<Revalidated, Fetch> {
    match refresh(inner, repo, prev.as_ref()).await? {
        Refreshed::New(rec) => Ok(Revalidated {
            rec: *rec,
            changed: true,
        }),
        Refreshed::NotModified => {
            let Some(mut rec) = prev else {
                return Err(Fetch::Failed(HelmError::Internal(
                    "the upstream answered 304 to an unconditional request".into(),
                )));
            };
            rec.checked_ms = inner.ports.clock.now_ms();
            save(inner, repo, &rec).await.map_err(Fetch::Failed)?;
            Ok(Revalidated {
                rec,
                changed: false,
            })
        }
    }
}

/// Looks a chart path up in the record's map: Ok(None) when the index does not list it,
/// Err(None) when a map chunk is gone (the record must be rebuilt).
pub(crate) async fn lookup(
    inner: &Inner,
    rec: &IndexRecord,
    key: &str,
) -> Result<Option<ChartRef>, Option<HelmError>> {
    let i = rec.map.partition_point(|m| m.first.as_str() <= key);
    let Some(part) = i.checked_sub(1).and_then(|i| rec.map.get(i)) else {
        return Ok(None);
    };
    let chunk = read_chunk(&*inner.ports.blobs, &part.d, part.n)
        .await
        .map_err(Some)?
        .ok_or(None)?;
    Ok(find_in_chunk(&chunk, key))
}

/// A fetch that got no answer: a URL refused by the outbound address policy is the
/// upstream's fault (502, as on the registry routes); anything else is unavailability (503).
pub(super) fn fetch_failure(what: &str, e: UpstreamError) -> HelmError {
    match e {
        UpstreamError::Refused(_) => HelmError::BadUpstream(format!("{what}: {e}")),
        _ => HelmError::Unavailable(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(key: &str, b: u8) -> ChartRef {
        ChartRef {
            key: key.into(),
            digest: [b; 32],
            url: format!("https://c.example/{key}"),
        }
    }

    #[test]
    fn map_chunks_round_trip_and_find_by_first_key() {
        let mut charts: Vec<ChartRef> = (0..5000)
            .map(|i| chart(&format!("app-{i:05}.tgz"), (i % 251) as u8))
            .collect();
        charts.sort_by(|a, b| a.key.cmp(&b.key));
        let chunks: Vec<_> = map_chunks(&charts).collect();
        assert!(chunks.len() > 3);
        for (first, bytes) in &chunks {
            assert!(bytes.len() <= MAP_CHUNK_MAX + 200);
            assert!(bytes.starts_with(first.as_bytes()));
        }
        for c in [&charts[0], &charts[2500], &charts[4999]] {
            let i = chunks.partition_point(|(f, _)| f.as_str() <= c.key.as_str());
            assert_eq!(find_in_chunk(&chunks[i - 1].1, &c.key).as_ref(), Some(c));
        }
        assert_eq!(find_in_chunk(&chunks[0].1, "nope.tgz"), None);
        assert_eq!(map_chunks(&[]).count(), 0);
    }

    #[test]
    fn one_new_chart_changes_few_map_chunks() {
        let charts: Vec<ChartRef> = (0..20_000)
            .map(|i| chart(&format!("app-{i:05}.tgz"), 1))
            .collect();
        let before: Vec<_> = map_chunks(&charts).collect();
        let mut more = charts.clone();
        more.push(chart("app-10000a.tgz", 2));
        more.sort_by(|a, b| a.key.cmp(&b.key));
        let after: Vec<_> = map_chunks(&more).collect();
        let changed = after.iter().filter(|c| !before.contains(c)).count();
        assert!(changed <= 2, "{changed} of {} chunks changed", after.len());
    }

    #[test]
    fn record_keys_are_bounded() {
        assert_eq!(record_key("stable"), "helm/stable/index");
        assert!(record_key(&"x".repeat(300)).len() <= 250);
    }
}
