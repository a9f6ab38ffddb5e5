//! Links: which repository may be served which cached content, as registries do it
//! (distribution keeps a `_layers/<digest>/link` per repository for the same reason).
//!
//! Blobs and manifests are stored once, by digest, and shared by every repository that holds
//! them. Access rules are checked on the repository named in the path, so without links a
//! caller allowed only `library/*` could read bytes cached for `team/private` by asking for
//! `/v2/library/public/blobs/<private digest>`. A link record
//! (`link/<upstream host>/<repository>/<digest>`, see [`keys::link`]) says the upstream
//! served or confirmed that digest *for that repository*; cached content is served for a
//! repository only when it holds a link.
//!
//! A link is written when the upstream vouched for the repository:
//! - a manifest fetched (by tag or by digest) and verified for R links its digest to R;
//! - a tag record of R, whenever it is used, makes sure the manifest it points at (and what
//!   that references) is linked to R: the record exists because the upstream served or
//!   confirmed the tag for R. This also links content cached before links existed, on its
//!   first tag pull, even while the upstream is down;
//! - the same fetch links what the manifest references — its config, its layers, and an
//!   index's child manifests — because a registry refuses a manifest whose blobs and children
//!   are not in the repository. A repository that shares layers with a cached one then costs
//!   no request at all. The `subject` is deliberately *not* linked: the OCI distribution spec
//!   asks registries to accept a manifest whose subject does not exist, so a subject is no
//!   proof that the repository holds it (an attacker able to push anywhere on the upstream
//!   could otherwise link someone else's manifest to their own repository);
//! - a blob fill that completed and verified links the blob to the repository it was fetched
//!   for;
//! - an upstream `HEAD` answering 200 under the repository's name links the digest.
//!
//! Without a link, [`entitle`] asks the upstream under the requesting repository's name
//! (`HEAD /v2/<R>/blobs/<d>` or `/manifests/<d>`, with R's token scope): 200 writes the link
//! and the caller serves the cached bytes (no second transfer); 404 is BLOB_UNKNOWN /
//! MANIFEST_UNKNOWN; an upstream that cannot answer is 503 UNAVAILABLE — unlinked content is
//! never served on faith. Chained caches that 404 a `HEAD` until someone GETs the blob will
//! therefore refuse a digest cached for another repository; a pull of the repository's own
//! manifest links its layers first, so image pulls are unaffected.
//!
//! Link writes are best-effort: a failed write only costs one `HEAD` on the next request
//! (Workers KV allows one write per second per key), never the response. Links left behind by
//! an admin purge are harmless: they only say the upstream once vouched for (repository,
//! digest), and content addressing means any later re-fill of that digest, made upstream under
//! whichever repository misses it, yields the same bytes.
//!
//! Must not: serve anything itself, or trust a link for another upstream or repository (the
//! key names both).

use crate::core::body::Body;
use crate::core::context::{Ctx, Inner, ResponseNote};
use crate::core::error::RegistryError;
use crate::core::http::status_failure;
use crate::core::registry::keys;
use crate::core::registry::reference::{parse_digest, Digest, Name};
use futures_util::future::join_all;
use http::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// Version of the link record format.
pub const LINK_VERSION: u32 = 1;
/// Most references of one manifest that are linked (a manifest is at most a few MiB; this
/// bounds the writes one fetch can cause).
pub const MAX_REFERENCED: usize = 1024;

/// How the upstream vouched for a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The content itself was fetched and verified for the repository.
    Fetched,
    /// The upstream answered 200 to a `HEAD` under the repository's name.
    Confirmed,
    /// A manifest fetched for the repository references it.
    Referenced,
    /// A tag of the repository points at it (upstream `HEAD` or `GET` of the tag).
    Tag,
}

/// One stored link record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// Format version.
    pub v: u32,
    /// How the upstream vouched for it.
    pub via: Via,
    /// When it was written (ms since the epoch).
    pub linked_ms: u64,
}

impl LinkRecord {
    /// The stored form (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Inverse of `encode`; None for garbage or an unknown version.
    pub fn decode(raw: &[u8]) -> Option<LinkRecord> {
        serde_json::from_slice::<LinkRecord>(raw)
            .ok()
            .filter(|r| r.v == LINK_VERSION)
    }
}

/// What a cached digest is, for the confirming `HEAD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/blobs/<digest>`.
    Blob,
    /// `/manifests/<digest>`.
    Manifest,
}

/// Why a repository may be served a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entitlement {
    /// It holds a link.
    Linked,
    /// The upstream just confirmed it (and a link was written).
    Confirmed,
}

/// The digests a manifest references that its repository must hold upstream: `config`, every
/// `layers[]` entry and an index's `manifests[]` children; not `subject` (see the module doc).
/// Invalid digests are skipped; duplicates are dropped; at most [`MAX_REFERENCED`].
pub fn referenced_digests(manifest: &serde_json::Value) -> Vec<Digest> {
    let config = manifest.pointer("/config/digest").into_iter();
    let listed = ["layers", "manifests"].into_iter().flat_map(|k| {
        manifest
            .get(k)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("digest"))
    });
    let mut out: Vec<Digest> = Vec::new();
    for d in config
        .chain(listed)
        .filter_map(|v| v.as_str())
        .filter_map(|s| parse_digest(s).ok())
    {
        if out.len() >= MAX_REFERENCED {
            break;
        }
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// Maps the upstream's answer to the confirming `HEAD`: 200 entitles, and so does a blob
/// redirect (a registry redirects to its storage only for a blob the repository holds; the
/// redirect is not followed, since signed storage URLs often refuse `HEAD`); 404 is unknown;
/// any other status is the usual upstream failure (503 for 5xx, 429, 403 for 401/403).
pub fn verify_confirmation(
    status: StatusCode,
    kind: Kind,
    name: &str,
    digest: &str,
) -> Result<(), RegistryError> {
    let redirect = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
    match status {
        StatusCode::OK => Ok(()),
        _ if redirect && kind == Kind::Blob => Ok(()),
        StatusCode::NOT_FOUND => Err(unknown(kind, name, digest)),
        s => Err(status_failure(
            s,
            &format!("{} {name}@{digest}", noun(kind)),
        )),
    }
}

fn noun(kind: Kind) -> &'static str {
    match kind {
        Kind::Blob => "blob",
        Kind::Manifest => "manifest",
    }
}

fn unknown(kind: Kind, name: &str, digest: &str) -> RegistryError {
    let msg = format!("{} {digest} is not known in {name}", noun(kind));
    match kind {
        Kind::Blob => RegistryError::BlobUnknown(msg),
        Kind::Manifest => RegistryError::ManifestUnknown(msg),
    }
}

/// Problems worth a line in the request log that do not change the answer (a best-effort
/// write that failed). Attached to the response as a [`ResponseNote`].
#[derive(Default)]
pub(crate) struct Notes(RefCell<Vec<String>>);

impl Notes {
    /// Records one problem.
    pub fn push(&self, note: impl Into<String>) {
        self.0.borrow_mut().push(note.into());
    }

    /// Puts the notes on the response, if there are any.
    pub fn attach(&self, resp: &mut Response<Body>) {
        let notes = self.0.borrow();
        if !notes.is_empty() {
            resp.extensions_mut().insert(ResponseNote(notes.join("; ")));
        }
    }
}

/// Does (upstream, repository) hold a link to `digest`? A store error counts as no (the
/// caller then asks the upstream, which is always safe).
pub(crate) async fn is_linked(ctx: &Ctx<'_>, digest: &Digest) -> bool {
    let key = keys::link(&ctx.up.host, ctx.name.as_str(), digest.as_str());
    matches!(
        ctx.inner.ports.kv.get(&key).await,
        Ok(Some(raw)) if LinkRecord::decode(&raw).is_some()
    )
}

/// Writes links from (host, name) to each digest, concurrently and best-effort; the error of
/// the first failed write, if any, for the request log.
pub(crate) async fn record(
    inner: &Inner,
    host: &str,
    name: &Name,
    digests: &[&Digest],
    via: Via,
) -> Result<(), String> {
    let raw = LinkRecord {
        v: LINK_VERSION,
        via,
        linked_ms: inner.ports.clock.now_ms(),
    }
    .encode();
    let writes = digests.iter().map(|d| {
        let key = keys::link(host, name.as_str(), d.as_str());
        let raw = &raw;
        async move { inner.ports.kv.put(&key, raw).await }
    });
    match join_all(writes).await.into_iter().find_map(Result::err) {
        Some(e) => Err(format!("link not recorded for {name}: {e}")),
        None => Ok(()),
    }
}

/// May the request's repository be served the cached `digest`? Yes with a link; otherwise
/// only when the upstream confirms under the repository's name (which records the link).
/// `accept` is sent with a manifest `HEAD`.
pub(crate) async fn entitle(
    ctx: &Ctx<'_>,
    digest: &Digest,
    kind: Kind,
    accept: Option<&str>,
    notes: &Notes,
) -> Result<Entitlement, RegistryError> {
    if is_linked(ctx, digest).await {
        return Ok(Entitlement::Linked);
    }
    let segment = match kind {
        Kind::Blob => "blobs",
        Kind::Manifest => "manifests",
    };
    let path = format!("/v2/{}/{segment}/{digest}", ctx.name);
    let resp = ctx
        .inner
        .client
        .request(
            ctx.up,
            Method::HEAD,
            &path,
            accept,
            ctx.name.as_str(),
            false,
        )
        .await
        .map_err(|e| {
            RegistryError::Unavailable(format!(
                "cannot confirm that {} holds {digest}: {e}",
                ctx.name
            ))
        })?;
    verify_confirmation(resp.status(), kind, ctx.name.as_str(), digest.as_str())?;
    if let Err(e) = record(ctx.inner, &ctx.up.host, ctx.name, &[digest], Via::Confirmed).await {
        notes.push(e);
    }
    Ok(Entitlement::Confirmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn record_round_trips_and_refuses_other_versions() {
        let r = LinkRecord {
            v: LINK_VERSION,
            via: Via::Referenced,
            linked_ms: 7,
        };
        assert_eq!(LinkRecord::decode(&r.encode()), Some(r));
        assert_eq!(
            LinkRecord::decode(br#"{"v":2,"via":"fetched","linked_ms":1}"#),
            None
        );
        assert_eq!(LinkRecord::decode(b"garbage"), None);
    }

    #[test]
    fn references_are_config_layers_and_children_but_not_subject() {
        let m = serde_json::json!({
            "config": {"digest": d('c')},
            "layers": [{"digest": d('1')}, {"digest": d('2')}, {"digest": d('1')}, {"digest": "md5:x"}],
            "subject": {"digest": d('5')},
        });
        let got: Vec<String> = referenced_digests(&m)
            .iter()
            .map(|x| x.to_string())
            .collect();
        assert_eq!(got, vec![d('c'), d('1'), d('2')]);
        let index = serde_json::json!({"manifests": [{"digest": d('a')}, {"digest": d('b')}]});
        assert_eq!(referenced_digests(&index).len(), 2);
        assert!(referenced_digests(&serde_json::json!({"schemaVersion": 2})).is_empty());
    }

    #[test]
    fn references_are_bounded() {
        let layers: Vec<_> = (0..MAX_REFERENCED + 10)
            .map(|i| serde_json::json!({"digest": format!("sha256:{i:064x}")}))
            .collect();
        let m = serde_json::json!({ "layers": layers });
        assert_eq!(referenced_digests(&m).len(), MAX_REFERENCED);
    }

    #[test]
    fn confirmation_statuses_map_to_answers() {
        let dg = d('e');
        let code = |s: u16, k| {
            verify_confirmation(StatusCode::from_u16(s).unwrap(), k, "library/public", &dg)
                .err()
                .map(|e| (e.code(), e.status().as_u16()))
        };
        assert_eq!(code(200, Kind::Blob), None);
        assert_eq!(code(307, Kind::Blob), None);
        assert_eq!(code(307, Kind::Manifest), Some(("UNAVAILABLE", 502)));
        assert_eq!(code(404, Kind::Blob), Some(("BLOB_UNKNOWN", 404)));
        assert_eq!(code(404, Kind::Manifest), Some(("MANIFEST_UNKNOWN", 404)));
        assert_eq!(code(503, Kind::Blob), Some(("UNAVAILABLE", 503)));
        assert_eq!(code(429, Kind::Manifest), Some(("TOOMANYREQUESTS", 429)));
        assert_eq!(code(401, Kind::Blob), Some(("DENIED", 403)));
    }
}
