//! Manifests: stored by digest, verbatim, with their media type; tags map to digests through
//! tag records that are revalidated with `HEAD` after the tag TTL, and served stale (within
//! `max_stale`) when the upstream fails. Docker Hub counts manifest GETs as pulls, so a warm
//! tag costs at most one HEAD and a moved tag one GET by digest.
//!
//! Nothing is stored before its digest is computed over the exact bytes received; a manifest
//! fetched by digest must hash to that digest.
//!
//! Manifests are served per repository (see [`links`]): a manifest fetched for R is linked to
//! R together with what it references, a tag record written for R links the digest it points
//! at, and a manifest found in the store by digest is served for R only with R's link or after
//! the upstream confirms it with `HEAD /v2/<R>/manifests/<digest>`. Tag records and links are
//! written best-effort: a failed write (Workers KV allows one write per second per key) is
//! noted in the request log and never turns an answer into a 500.
//!
//! When the host shares tag flights across instances (`tag_flight`; a Durable Object per tag
//! on Workers), the requests for a tag that needs the upstream make one revalidation: one
//! leads, the others wait for its outcome and serve the digest it resolved (counted in
//! `coalesced_waits`, logged `cache=coalesced`).

use crate::core::body::{Body, CacheStatus};
use crate::core::context::Ctx;
use crate::core::error::RegistryError;
use crate::core::http::read_capped;
use crate::core::http::status_failure;
use crate::core::metrics::inc;
use crate::core::ports::TagOutcome;
use crate::core::registry::keys;
use crate::core::registry::links::{self, Kind, Notes, Via};
use crate::core::registry::media::{header as h, manifest_media_type, AcceptSet};
use crate::core::registry::records::{StoredManifest, TagRecord, TAG_RECORD_VERSION};
use crate::core::registry::reference::{parse_digest, Digest, Reference, Tag};
use crate::core::registry::tag_flight::{self, Entered};
use crate::core::registry::warm_tags::{Ready, Warm};
use bytes::Bytes;
use http::{header, Method, Response, StatusCode};

/// An upstream failure, classified for the stale-if-error decision.
#[derive(Debug)]
pub(crate) enum Fetch {
    /// The upstream says it does not exist.
    NotFound,
    /// Any other failure: unreachable, timeout, 5xx, 429, auth, garbage.
    Failed(RegistryError),
}

async fn load(ctx: &Ctx<'_>, digest: &str) -> Result<Option<StoredManifest>, RegistryError> {
    let raw = ctx
        .inner
        .ports
        .kv
        .get(&keys::manifest(digest))
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))?;
    Ok(raw.as_deref().and_then(StoredManifest::decode))
}

async fn load_record(ctx: &Ctx<'_>, key: &str) -> Result<Option<TagRecord>, RegistryError> {
    let raw = ctx
        .inner
        .ports
        .kv
        .get(key)
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))?;
    Ok(raw
        .and_then(|r| serde_json::from_slice::<TagRecord>(&r).ok())
        .filter(|r| r.v == TAG_RECORD_VERSION))
}

/// Writes a tag record, best-effort: on failure the answer stands and the next request
/// revalidates (or refetches) a little early.
async fn save_record(ctx: &Ctx<'_>, key: &TagKey, digest: &str, notes: &Notes) {
    let rec = TagRecord {
        v: TAG_RECORD_VERSION,
        digest: digest.to_string(),
        checked_ms: ctx.inner.ports.clock.now_ms(),
        path: key
            .key
            .starts_with(keys::HASHED_TAG)
            .then(|| key.path.clone()),
    };
    let key = key.key.as_str();
    let written = match serde_json::to_vec(&rec) {
        Ok(raw) => ctx
            .inner
            .ports
            .kv
            .put(key, &raw)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = written {
        notes.push(format!("tag record not saved: {e}"));
    }
}

/// Makes sure the manifest a tag record of this repository points at is linked to it, with
/// what it references: the record exists because the upstream served (or confirmed) the tag
/// for this repository, which vouches for the manifest as a fetch does. Costs one read when
/// the link is there (the usual case); writes only for records older than links, or after a
/// failed write. Best-effort; true when the link was there already.
async fn ensure_linked(
    ctx: &Ctx<'_>,
    digest: &str,
    stored: &StoredManifest,
    notes: &Notes,
) -> bool {
    let Ok(digest) = parse_digest(digest) else {
        return false;
    };
    if links::is_linked(ctx, &digest).await {
        return true;
    }
    let referenced = serde_json::from_slice::<serde_json::Value>(&stored.bytes)
        .map(|json| links::referenced_digests(&json))
        .unwrap_or_default();
    let refs: Vec<&Digest> = referenced.iter().collect();
    let (own, refs) = futures_util::future::join(
        links::record(ctx.inner, &ctx.up.host, ctx.name, &[&digest], Via::Tag),
        links::record(ctx.inner, &ctx.up.host, ctx.name, &refs, Via::Referenced),
    )
    .await;
    for e in [own.err(), refs.err()].into_iter().flatten() {
        notes.push(e);
    }
    false
}

/// GETs a manifest upstream, verifies it, stores it by digest, and links it and what it
/// references to the request's repository.
async fn fetch(
    ctx: &Ctx<'_>,
    reference: &str,
    expect: Option<&Digest>,
    accept: &AcceptSet<'_>,
    notes: &Notes,
) -> Result<(Digest, StoredManifest), Fetch> {
    let what = format!("manifest {}:{reference}", ctx.name);
    let path = format!("/v2/{}/manifests/{reference}", ctx.name);
    let resp = ctx
        .inner
        .client
        .request(
            ctx.up,
            Method::GET,
            &path,
            Some(&accept.upstream_value()),
            ctx.name.as_str(),
            false,
        )
        .await
        .map_err(|e| Fetch::Failed(crate::core::registry::upstream::registry_error(e)))?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Err(Fetch::NotFound),
        s => return Err(Fetch::Failed(status_failure(s, &what))),
    }
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let claimed = resp
        .headers()
        .get(h::CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let limit = ctx.inner.settings.max_manifest_size as usize;
    let bytes = read_capped(resp.into_body(), limit)
        .await
        .map_err(|e| Fetch::Failed(RegistryError::BadUpstream(format!("{what}: {e}"))))?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| {
        Fetch::Failed(RegistryError::BadUpstream(format!(
            "{what}: upstream sent invalid JSON"
        )))
    })?;
    let digest = Digest::of(&bytes);
    let mismatch = |d: &str| {
        inc(&ctx.inner.metrics.digest_mismatches);
        Fetch::Failed(RegistryError::BadUpstream(format!(
            "{what}: upstream bytes hash to {digest}, not {d}; not cached"
        )))
    };
    if let Some(e) = expect {
        if *e != digest {
            return Err(mismatch(e.as_str()));
        }
    }
    if let Some(c) = claimed.as_deref().filter(|c| parse_digest(c).is_ok()) {
        if c != digest.as_str() {
            return Err(mismatch(c));
        }
    }
    let m = StoredManifest {
        media_type: manifest_media_type(content_type.as_deref(), &json),
        bytes: Bytes::from(bytes),
    };
    ctx.inner
        .ports
        .kv
        .put(&keys::manifest(digest.as_str()), &m.encode())
        .await
        .map_err(|e| Fetch::Failed(RegistryError::Internal(e.to_string())))?;
    // The upstream served this manifest for this repository, and a registry accepts a
    // manifest only when the repository holds its config, layers and children.
    let referenced = links::referenced_digests(&json);
    let refs: Vec<&Digest> = referenced.iter().collect();
    let (own, refs) = futures_util::future::join(
        links::record(ctx.inner, &ctx.up.host, ctx.name, &[&digest], Via::Fetched),
        links::record(ctx.inner, &ctx.up.host, ctx.name, &refs, Via::Referenced),
    )
    .await;
    for e in [own.err(), refs.err()].into_iter().flatten() {
        notes.push(e);
    }
    Ok((digest, m))
}

/// The manifest response (headers only for HEAD). Built on the hot path of every warm pull:
/// parsed header names, one header map sized for the five headers, no builder.
fn serve(ctx: &Ctx<'_>, digest: &str, m: StoredManifest) -> Result<Response<Body>, RegistryError> {
    Ok(ready(digest, m)?.respond(ctx.head))
}

fn ready(digest: &str, m: StoredManifest) -> Result<Ready, RegistryError> {
    Ready::new(digest, m).map_err(|e| RegistryError::Internal(format!("stored media type: {e}")))
}

fn unknown(ctx: &Ctx<'_>, reference: &str) -> RegistryError {
    RegistryError::ManifestUnknown(format!(
        "manifest {}:{reference} is not known upstream",
        ctx.name
    ))
}

/// `GET|HEAD /v2/<name>/manifests/<reference>`.
pub(crate) async fn get(
    ctx: &Ctx<'_>,
    reference: &Reference,
    accept: &AcceptSet<'_>,
) -> Result<(Response<Body>, CacheStatus), RegistryError> {
    let notes = Notes::default();
    let mut out = match reference {
        Reference::Digest(d) => get_digest(ctx, d, accept, &notes).await,
        Reference::Tag(tag) => get_tag(ctx, tag, accept, &notes).await,
    };
    if let Ok((resp, _)) = &mut out {
        notes.attach(resp);
    }
    out
}

async fn get_digest(
    ctx: &Ctx<'_>,
    d: &Digest,
    accept: &AcceptSet<'_>,
    notes: &Notes,
) -> Result<(Response<Body>, CacheStatus), RegistryError> {
    let m = &ctx.inner.metrics;
    if let Some(stored) = load(ctx, d.as_str()).await? {
        // Stored for some repository; served for this one only if it holds it.
        let head_accept = format!("{}, {}", stored.media_type, accept.upstream_value());
        links::entitle(ctx, d, Kind::Manifest, Some(&head_accept), notes).await?;
        m.hit(&ctx.up.host);
        return Ok((serve(ctx, d.as_str(), stored)?, CacheStatus::Hit));
    }
    m.miss(&ctx.up.host);
    match fetch(ctx, d.as_str(), Some(d), accept, notes).await {
        Ok((digest, stored)) => Ok((serve(ctx, digest.as_str(), stored)?, CacheStatus::Miss)),
        Err(Fetch::NotFound) => Err(unknown(ctx, d.as_str())),
        Err(Fetch::Failed(e)) => Err(e),
    }
}

type Served = Result<(Response<Body>, CacheStatus), RegistryError>;

/// A tag record's key, and the path it holds before it is bounded.
struct TagKey {
    key: String,
    path: String,
}

/// A tag's cached record and manifest, when both exist and this client can take the media
/// type.
type Cached = Option<(TagRecord, StoredManifest)>;

async fn get_tag(ctx: &Ctx<'_>, tag: &Tag, accept: &AcceptSet<'_>, notes: &Notes) -> Served {
    let inner = ctx.inner;
    let path = keys::tag_path(
        &ctx.up.host,
        ctx.name.as_str(),
        accept.class().key(),
        tag.as_str(),
    );
    let now = inner.ports.clock.now_ms();
    let fresh = |rec: &TagRecord| inner.settings.freshness().is_fresh(rec.checked_ms, now);
    // Taken before any read below, so what they find may be kept as of it.
    let generation = inner.ports.kv.generation();
    let tags = &inner.warm_tags;
    if let Some(g) = generation {
        if let Some(w) = tags.get(g, &path) {
            if fresh(&w.rec) && accept.accepts(&w.media_type) {
                inner.metrics.hit(&ctx.up.host);
                return Ok((w.ready.respond(ctx.head), CacheStatus::Hit));
            }
        }
    }
    let key = TagKey {
        key: keys::bounded(keys::TAG, path.clone()),
        path,
    };
    let cached = load_cached(ctx, &key.key, accept).await?;
    if let Some((rec, stored)) = &cached {
        let linked = ensure_linked(ctx, &rec.digest, stored, notes).await;
        if fresh(rec) {
            inner.metrics.hit(&ctx.up.host);
            let ready = ready(&rec.digest, stored.clone())?;
            let resp = ready.respond(ctx.head);
            if let (true, Some(g)) = (linked, generation) {
                let warm = Warm {
                    rec: rec.clone(),
                    media_type: stored.media_type.clone(),
                    ready,
                };
                tags.keep(g, &key.path, warm);
            }
            return Ok((resp, CacheStatus::Hit));
        }
    }
    // The upstream is needed: lead or follow other instances asking it the same (see
    // `tag_flight`; without a shared port every instance asks for itself).
    match tag_flight::enter(inner, &key.key).await {
        Entered::Lead(guard) => {
            let answer = from_upstream(ctx, tag, accept, notes, &key, &cached, now).await;
            guard.finish(&answer);
            answer
        }
        Entered::Follow(wait) => {
            inc(&inner.metrics.coalesced_waits);
            tracing::debug!(
                upstream = %ctx.up.host,
                repository = %ctx.name,
                tag = tag.as_str(),
                "tag revalidation joins another request's"
            );
            let outcome = wait.await;
            match followed(ctx, tag, outcome, accept, notes, &cached, now).await {
                Some(answer) => answer,
                None => from_upstream(ctx, tag, accept, notes, &key, &cached, now).await,
            }
        }
        Entered::Alone => from_upstream(ctx, tag, accept, notes, &key, &cached, now).await,
    }
}

/// A follower's answer from the outcome of the revalidation it waited for; None when it must
/// ask the upstream itself (the lead ended without an answer, failed while this request has
/// no record it may serve stale, or resolved to a manifest this client cannot take). The
/// digest comes from the lead, not from the tag record (which may not have reached this
/// instance's store yet); the manifest by digest is content addressed.
async fn followed(
    ctx: &Ctx<'_>,
    tag: &Tag,
    outcome: TagOutcome,
    accept: &AcceptSet<'_>,
    notes: &Notes,
    cached: &Cached,
    now: u64,
) -> Option<Served> {
    match outcome {
        TagOutcome::Resolved { digest } => {
            let digest = parse_digest(&digest).ok()?;
            let stored = load(ctx, digest.as_str())
                .await
                .ok()
                .flatten()
                .filter(|s| accept.accepts(&s.media_type))?;
            ensure_linked(ctx, digest.as_str(), &stored, notes).await;
            ctx.inner.metrics.hit(&ctx.up.host);
            Some(serve(ctx, digest.as_str(), stored).map(|r| (r, CacheStatus::Coalesced)))
        }
        TagOutcome::NotFound => Some(Err(unknown(ctx, tag.as_str()))),
        TagOutcome::Failed => {
            let (rec, _) = cached.as_ref()?;
            let freshness = ctx.inner.settings.freshness();
            freshness.may_serve_stale(rec.checked_ms, now).then(|| {
                let e = RegistryError::Unavailable(format!(
                    "manifest {}:{}: the upstream failed for the revalidation this request joined",
                    ctx.name,
                    tag.as_str()
                ));
                stale_or(ctx, cached, now, e)
            })
        }
        TagOutcome::Unknown => None,
    }
}

/// Asks the upstream for a tag: revalidates a cached record with `HEAD`, or fetches the tag.
async fn from_upstream(
    ctx: &Ctx<'_>,
    tag: &Tag,
    accept: &AcceptSet<'_>,
    notes: &Notes,
    key: &TagKey,
    cached: &Cached,
    now: u64,
) -> Served {
    let inner = ctx.inner;
    if let Some(answer) = revalidate(ctx, tag, accept, notes, key, cached, now).await? {
        return answer;
    }
    inner.metrics.miss(&ctx.up.host);
    match fetch(ctx, tag.as_str(), None, accept, notes).await {
        Ok((digest, stored)) => {
            save_record(ctx, key, digest.as_str(), notes).await;
            Ok((serve(ctx, digest.as_str(), stored)?, CacheStatus::Miss))
        }
        Err(Fetch::NotFound) => Err(unknown(ctx, tag.as_str())),
        Err(Fetch::Failed(e)) => stale_or(ctx, cached, now, e),
    }
}

async fn load_cached(
    ctx: &Ctx<'_>,
    key: &str,
    accept: &AcceptSet<'_>,
) -> Result<Cached, RegistryError> {
    let Some(rec) = load_record(ctx, key).await? else {
        return Ok(None);
    };
    Ok(load(ctx, &rec.digest)
        .await?
        .filter(|stored| accept.accepts(&stored.media_type))
        .map(|stored| (rec, stored)))
}

/// The cached answer while the upstream fails, if it is not too old; otherwise `e`.
fn stale_or(ctx: &Ctx<'_>, cached: &Cached, now: u64, e: RegistryError) -> Served {
    match cached {
        Some((rec, stored))
            if ctx
                .inner
                .settings
                .freshness()
                .may_serve_stale(rec.checked_ms, now) =>
        {
            inc(&ctx.inner.metrics.upstream_errors);
            inc(&ctx.inner.metrics.stale_served);
            tracing::warn!(
                upstream = %ctx.up.host,
                repository = %ctx.name,
                digest = %rec.digest,
                error = %e,
                "upstream failed; serving the stale tag"
            );
            Ok((serve(ctx, &rec.digest, stored.clone())?, CacheStatus::Stale))
        }
        _ => Err(e),
    }
}

/// Revalidates a cached tag with `HEAD` (free against Docker Hub's pull limit). The answer to
/// send, or None when the tag must be fetched (it moved without saying where).
async fn revalidate(
    ctx: &Ctx<'_>,
    tag: &Tag,
    accept: &AcceptSet<'_>,
    notes: &Notes,
    key: &TagKey,
    cached: &Cached,
    now: u64,
) -> Result<Option<Served>, RegistryError> {
    let Some((rec, stored)) = cached else {
        return Ok(None);
    };
    let m = &ctx.inner.metrics;
    let path = format!("/v2/{}/manifests/{}", ctx.name, tag.as_str());
    let what = format!("manifest {}:{}", ctx.name, tag.as_str());
    let head = ctx
        .inner
        .client
        .request(
            ctx.up,
            Method::HEAD,
            &path,
            Some(&accept.upstream_value()),
            ctx.name.as_str(),
            false,
        )
        .await;
    let resp = match head {
        Ok(resp) if resp.status() == StatusCode::OK => resp,
        Ok(resp) if resp.status() == StatusCode::NOT_FOUND => {
            let _ = ctx.inner.ports.kv.delete(&key.key).await;
            return Ok(Some(Err(unknown(ctx, tag.as_str()))));
        }
        Ok(resp) => {
            let e = status_failure(resp.status(), &what);
            return Ok(Some(stale_or(ctx, cached, now, e)));
        }
        Err(e) => {
            let e = crate::core::registry::upstream::registry_error(e);
            return Ok(Some(stale_or(ctx, cached, now, e)));
        }
    };
    let upstream_digest = resp
        .headers()
        .get(h::CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_digest(v).ok());
    if upstream_digest.as_ref().map(Digest::as_str) == Some(rec.digest.as_str()) {
        save_record(ctx, key, &rec.digest, notes).await;
        m.hit(&ctx.up.host);
        return Ok(Some(Ok((
            serve(ctx, &rec.digest, stored.clone())?,
            CacheStatus::Hit,
        ))));
    }
    // Moved: serve the new digest from the cache if it is there, else fetch it by digest.
    // No digest header: fetch by tag (the caller does).
    let Some(d) = upstream_digest else {
        return Ok(None);
    };
    if let Some(s) = load(ctx, d.as_str()).await? {
        if accept.accepts(&s.media_type) {
            save_record(ctx, key, d.as_str(), notes).await;
            ensure_linked(ctx, d.as_str(), &s, notes).await;
            m.hit(&ctx.up.host);
            return Ok(Some(Ok((serve(ctx, d.as_str(), s)?, CacheStatus::Hit))));
        }
    }
    m.miss(&ctx.up.host);
    Ok(Some(
        match fetch(ctx, d.as_str(), Some(&d), accept, notes).await {
            Ok((digest, s)) => {
                save_record(ctx, key, digest.as_str(), notes).await;
                Ok((serve(ctx, digest.as_str(), s)?, CacheStatus::Miss))
            }
            Err(Fetch::NotFound) => Err(unknown(ctx, tag.as_str())),
            Err(Fetch::Failed(e)) => stale_or(ctx, cached, now, e),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_manifest_round_trips() {
        let m = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: Bytes::from_static(b"{\"schemaVersion\":2}"),
        };
        assert_eq!(StoredManifest::decode(&m.encode()), Some(m));
        assert_eq!(StoredManifest::decode(&[9, 0, 0]), None);
        assert_eq!(StoredManifest::decode(&[1, 0, 50, b'x']), None);
    }

    #[test]
    fn upstream_statuses_map_to_errors() {
        assert_eq!(
            status_failure(StatusCode::TOO_MANY_REQUESTS, "x")
                .status()
                .as_u16(),
            429
        );
        assert_eq!(
            status_failure(StatusCode::BAD_GATEWAY, "x")
                .status()
                .as_u16(),
            503
        );
        assert_eq!(
            status_failure(StatusCode::UNAUTHORIZED, "x").code(),
            "DENIED"
        );
        assert_eq!(
            status_failure(StatusCode::IM_A_TEAPOT, "x")
                .status()
                .as_u16(),
            502
        );
    }
}
