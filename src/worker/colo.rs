//! `ColoCache`: the colo tier of the Workers host, over the Cache API. Blobs and manifests by
//! digest that R2 holds (so verified) are copied into the cache of the location (colo) that
//! served them, and later reads in that location are answered from it before R2: a warm pull
//! there makes no R2 request at all.
//!
//! It is used only *inside* the storage adapters ([`R2BlobStore`](super::R2BlobStore) and
//! [`WorkerKv`](super::WorkerKv)), so it answers exactly the reads the core asks those
//! adapters for, after the core decided the request is entitled to them (the per-repository
//! link check runs before any `serve`): it is a faster copy of R2, never a front cache that
//! could answer a request the core would refuse. Keys are content addressed (the digest), so
//! an entry never needs invalidating: the bytes under a digest cannot change.
//!
//! Entries live in a cache of their own (`caches.open("pullgate")`), not `caches.default`:
//! a named cache is never consulted by the zone's CDN for an incoming request, so no URL a
//! client can send reaches an entry without the worker. Keys are URLs on the host of the
//! request that made them (as Cloudflare advises) under [`KEY_PATH`].
//!
//! What goes in: a blob after its R2 commit (copied from R2 by the runtime: R2's stream goes
//! into `cache.put` without entering wasm), a blob R2 served that the colo did not have, and a
//! manifest read from or written to R2. Copies run as deferred work (`waitUntil`) and are
//! best-effort: a failed copy only means the next read goes to R2. Objects over the size limit
//! ([`DEFAULT_MAX_BYTES`], or the `PULLGATE_COLO_MAX_BYTES` variable; `0` turns the tier off)
//! are never copied.
//!
//! Reads served from the colo are reported per invocation ([`take_edge_served`]) so the host
//! logs them as `cache=edge-hit` and counts them in `pullgate_edge_hits_total`; R2 reads are
//! counted in `pullgate_store_reads_total` ([`Tally`]).
//!
//! # Limitations
//! - The Cache API is per location and evictable; a miss falls back to R2.
//! - Cloudflare runs Cache API operations only for Workers on a custom domain: on
//!   `*.workers.dev` they do nothing, and every read goes to R2.
//! - An admin purge removes the entry in the purging location only; other locations keep
//!   serving their copy to entitled requests until it expires ([`TTL_SECS`]) or is evicted.

use crate::core::metrics::{inc, Metrics};
use crate::core::ports::Deferred;
use futures_util::FutureExt;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use worker::js_sys::{self, ArrayBuffer, Uint8Array};
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::wasm_bindgen_futures::JsFuture;
use worker::web_sys::{self, ReadableStream};
use worker::Bucket;

/// The name of the cache (a namespace of its own, see the module doc).
pub const CACHE_NAME: &str = "pullgate";
/// Path prefix of every key URL (versioned, so a format change starts afresh).
pub const KEY_PATH: &str = "/.pullgate/colo/v1/";
/// Largest object copied by default: the Cache API's object limit (512 MB) on the Free, Pro
/// and Business plans.
pub const DEFAULT_MAX_BYTES: u64 = 512 * 1000 * 1000;
/// The Worker variable that overrides [`DEFAULT_MAX_BYTES`] (bytes; `0` turns the tier off).
pub const MAX_BYTES_VAR: &str = "PULLGATE_COLO_MAX_BYTES";
/// How long an entry may live, in seconds (see *Limitations*).
pub const TTL_SECS: u64 = 86_400;
/// Invocations remembered by [`take_edge_served`] at most (entries left by work that outlived
/// its response are dropped beyond this).
const MAX_NOTED: usize = 1024;

thread_local! {
    /// Per invocation: whether its last store read was answered by the colo (true) or R2.
    static SERVED: RefCell<HashMap<u64, bool>> = RefCell::new(HashMap::new());
}

/// Notes how the current invocation's store read was answered.
fn note(from_colo: bool) {
    if let Some(id) = super::current_invocation() {
        SERVED.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() >= MAX_NOTED && !s.contains_key(&id) {
                s.clear();
            }
            s.insert(id, from_colo);
        });
    }
}

/// Whether invocation `id`'s content came from the colo tier (and forgets it).
pub fn take_edge_served(id: u64) -> bool {
    SERVED.with(|s| s.borrow_mut().remove(&id).unwrap_or(false))
}

/// The host's counters, in the core's metrics once the core exists.
#[derive(Default)]
pub struct Tally {
    metrics: RefCell<Option<Rc<Metrics>>>,
}

impl Tally {
    /// Counts into `metrics` from now on.
    pub fn attach(&self, metrics: Rc<Metrics>) {
        *self.metrics.borrow_mut() = Some(metrics);
    }

    /// `n` blob bytes copied into wasm memory.
    pub fn wasm_blob_bytes(&self, n: usize) {
        if let Some(m) = self.metrics.borrow().as_ref() {
            crate::core::metrics::add(&m.wasm_blob_bytes, n as u64);
        }
    }

    /// One read (HEAD or GET) of R2.
    pub fn r2_read(&self) {
        if let Some(m) = self.metrics.borrow().as_ref() {
            inc(&m.store_reads);
        }
    }
}

fn js_text(e: JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{e:?}"))
}

/// The colo tier.
pub struct ColoCache {
    max_bytes: u64,
    deferred: Rc<dyn Deferred>,
    tally: Rc<Tally>,
    /// Keys being copied in by this isolate (one copy at a time per key).
    filling: RefCell<HashSet<String>>,
}

impl ColoCache {
    /// A colo tier taking objects up to `max_bytes` (0: off), copying through `deferred`.
    pub fn new(max_bytes: u64, deferred: Rc<dyn Deferred>, tally: Rc<Tally>) -> ColoCache {
        ColoCache {
            max_bytes,
            deferred,
            tally,
            filling: RefCell::new(HashSet::new()),
        }
    }

    /// The counters this tier and its stores report to.
    pub fn tally(&self) -> &Rc<Tally> {
        &self.tally
    }

    /// The key URL of a store key (`blobs/sha256/<hex>`, `manifest/sha256:<hex>`), on the host
    /// of the current request; None when the tier is off, outside a request, or for a key
    /// that is not plain.
    fn url(&self, key: &str) -> Option<String> {
        if self.max_bytes == 0
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/:._-".contains(&b))
        {
            return None;
        }
        let origin = super::current_origin()?;
        Some(format!("{origin}{KEY_PATH}{key}"))
    }

    async fn open() -> Result<web_sys::Cache, String> {
        let global: web_sys::WorkerGlobalScope = js_sys::global().unchecked_into();
        let storage = global.caches().map_err(js_text)?;
        let cache = JsFuture::from(storage.open(CACHE_NAME))
            .await
            .map_err(js_text)?;
        Ok(cache.unchecked_into())
    }

    /// `cache.match` of `url`, with a `Range` header when given.
    async fn lookup(url: &str, range: Option<String>) -> Result<Option<web_sys::Response>, String> {
        let cache = Self::open().await?;
        let headers = web_sys::Headers::new().map_err(js_text)?;
        if let Some(r) = range {
            headers.set("range", &r).map_err(js_text)?;
        }
        let init = web_sys::RequestInit::new();
        init.set_headers(&headers);
        let req = web_sys::Request::new_with_str_and_init(url, &init).map_err(js_text)?;
        let found = JsFuture::from(cache.match_with_request(&req))
            .await
            .map_err(js_text)?;
        if found.is_undefined() || found.is_null() {
            return Ok(None);
        }
        Ok(Some(found.unchecked_into()))
    }

    /// The size of a stored object, when the colo has it.
    pub async fn stat(&self, key: &str) -> Option<u64> {
        let url = self.url(key)?;
        let resp = Self::lookup(&url, Some("bytes=0-0".into())).await.ok()??;
        let size = match resp.status() {
            206 => resp
                .headers()
                .get("content-range")
                .ok()
                .flatten()
                .and_then(|r| r.rsplit_once('/').and_then(|(_, t)| t.parse().ok())),
            200 => resp
                .headers()
                .get("content-length")
                .ok()
                .flatten()
                .and_then(|l| l.parse().ok()),
            _ => None,
        };
        if let Some(body) = resp.body() {
            let _ = body.cancel();
        }
        if size.is_some() {
            note(true);
        }
        size
    }

    /// The colo's stream of bytes `[start, end)` of a stored object, when it has it and
    /// answers exactly that range.
    pub async fn range(&self, key: &str, start: u64, end: u64) -> Option<ReadableStream> {
        let url = self.url(key)?;
        let last = end.checked_sub(1)?;
        let resp = Self::lookup(&url, Some(format!("bytes={start}-{last}")))
            .await
            .ok()??;
        let header = |name: &str| resp.headers().get(name).ok().flatten();
        let exact = match resp.status() {
            206 => header("content-range")
                .is_some_and(|r| r.starts_with(&format!("bytes {start}-{last}/"))),
            200 => start == 0 && header("content-length") == Some(end.to_string()),
            _ => false,
        };
        let body = resp.body()?;
        if !exact {
            let _ = body.cancel();
            return None;
        }
        note(true);
        Some(body)
    }

    /// A whole stored object, when the colo has it (small objects: manifests).
    pub async fn bytes(&self, key: &str) -> Option<Vec<u8>> {
        let url = self.url(key)?;
        let resp = Self::lookup(&url, None).await.ok()??;
        if resp.status() != 200 {
            return None;
        }
        let buf = JsFuture::from(resp.array_buffer().ok()?).await.ok()?;
        let buf: ArrayBuffer = buf.unchecked_into();
        note(true);
        Some(Uint8Array::new(&buf).to_vec())
    }

    /// Notes that the current invocation read `key` from R2, not from the colo.
    pub fn note_r2(&self) {
        note(false);
    }

    /// Copies `r2_key` from R2 into the colo under `key`, in the background, when its `size`
    /// is within the limit: R2's stream goes straight into `cache.put`.
    pub fn copy_from_r2(self: &Rc<Self>, bucket: &Bucket, r2_key: &str, key: &str, size: u64) {
        if size > self.max_bytes {
            return;
        }
        let Some(url) = self.url(key) else { return };
        if !self.filling.borrow_mut().insert(key.to_string()) {
            return;
        }
        let this = self.clone();
        let bucket = bucket.clone();
        let (r2_key, key) = (r2_key.to_string(), key.to_string());
        self.deferred.spawn(
            async move {
                this.tally.r2_read();
                let copied = async {
                    let obj = bucket
                        .get(&r2_key)
                        .execute()
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or("gone from R2")?;
                    let size = obj.size();
                    let body = obj.body().ok_or("no body")?;
                    let stream = match body.response_body().map_err(|e| e.to_string())? {
                        worker::ResponseBody::Stream(s) => s,
                        _ => return Err("R2 body is not a stream".to_string()),
                    };
                    Self::put(&url, Some(&stream), size).await
                }
                .await;
                if let Err(e) = copied {
                    worker::console_warn!("colo cache: copy of {r2_key} failed: {e}");
                }
                this.filling.borrow_mut().remove(&key);
            }
            .boxed_local(),
        );
    }

    /// Puts small bytes (a manifest) under `key`, in the background.
    pub fn put_bytes(self: &Rc<Self>, key: &str, bytes: &[u8]) {
        if bytes.len() as u64 > self.max_bytes {
            return;
        }
        let Some(url) = self.url(key) else { return };
        let array = Uint8Array::from(bytes);
        let size = bytes.len() as u64;
        let key = key.to_string();
        self.deferred.spawn(
            async move {
                let stream = web_sys::Response::new_with_opt_buffer_source(Some(&array))
                    .ok()
                    .and_then(|r| r.body());
                let Some(stream) = stream else { return };
                if let Err(e) = Self::put(&url, Some(&stream), size).await {
                    worker::console_warn!("colo cache: put of {key} failed: {e}");
                }
            }
            .boxed_local(),
        );
    }

    async fn put(url: &str, body: Option<&ReadableStream>, size: u64) -> Result<(), String> {
        let headers = web_sys::Headers::new().map_err(js_text)?;
        headers
            .set(
                "cache-control",
                &format!("public, max-age={TTL_SECS}, immutable"),
            )
            .map_err(js_text)?;
        headers
            .set("content-type", "application/octet-stream")
            .map_err(js_text)?;
        headers
            .set("content-length", &size.to_string())
            .map_err(js_text)?;
        let init = web_sys::ResponseInit::new();
        init.set_status(200);
        init.set_headers(&headers);
        let resp = web_sys::Response::new_with_opt_readable_stream_and_init(body, &init)
            .map_err(js_text)?;
        let cache = Self::open().await?;
        JsFuture::from(cache.put_with_str(url, &resp))
            .await
            .map(|_| ())
            .map_err(js_text)
    }

    /// Removes `key` from this location's colo (admin purge).
    pub async fn delete(&self, key: &str) {
        let Some(url) = self.url(key) else { return };
        if let Ok(cache) = Self::open().await {
            let _ = JsFuture::from(cache.delete_with_str(&url)).await;
        }
    }
}
