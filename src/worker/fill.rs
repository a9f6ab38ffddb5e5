//! Cold blob fills that never copy a blob byte into wasm: the Workers side of the core's
//! [`BlobStore::fill_from`](crate::core::ports::BlobStore::fill_from) seam.
//!
//! The core decides everything before and after (route, entitlement, upstream, redirects,
//! which digest, links once the blob is committed); this module only moves bytes, and does so
//! entirely in the runtime. The upstream's body, a JavaScript `ReadableStream` that
//! [`FetchUpstream`](super::FetchUpstream) kept untouched ([`keep_raw_body`]), is split with
//! `tee()`:
//! - one branch goes through a `FixedLengthStream` of the announced length into one R2 `put`
//!   with the expected SHA-256, entirely in the runtime's internal streams (no JavaScript
//!   step): R2 hashes the bytes itself and stores nothing when they hash otherwise (or are
//!   shorter or longer than announced); the put fails with R2's checksum error, reported as
//!   [`HostFillError::DigestMismatch`];
//! - the other goes to the client: one JavaScript loop reads it with a BYOB reader in blocks
//!   of up to `BLOCK` bytes (`readAtLeast`, at least `BLOCK_LEAST` unless the body ends)
//!   and writes all but the last [`HOLDBACK`] bytes seen so far on into a `FixedLengthStream`
//!   (so the response carries `Content-Length`) — the core's rule for every fill. The tail is
//!   written only once the R2 put has resolved, i.e. R2 confirmed the digest; when the put
//!   fails the client's stream is aborted instead, and the runtime resets the connection.
//!
//! Every chunk of the client's branch crossing into JavaScript through a `TransformStream`
//! cost about three times the CPU of the plain tee (bench/worker_fill.md); one step per block
//! costs about the same as the tee. The JavaScript is a wasm-bindgen snippet (`inline_js`),
//! bundled by worker-build. Hashing is R2's; nothing here looks at the bytes.
//!
//! The host counts the blob bytes that do cross into wasm on the other paths (the core's own
//! fill through a `BlobWriter`, stored blobs read back as a Rust stream) in
//! `pullgate_worker_wasm_blob_bytes_total` ([`Tally::wasm_blob_bytes`](super::colo::Tally)).
//!
//! # Limitations
//! - Used only when the upstream announced the length and it is within R2's single-put limit
//!   ([`SINGLE_PUT_MAX`](super::r2::SINGLE_PUT_MAX)); otherwise the core's own fill runs
//!   (multipart upload, bytes through wasm).
//! - `tee()` reads the upstream as fast as the faster branch: a client much slower than R2
//!   makes the runtime buffer the difference in the isolate's memory (at most the blob).
//! - The upstream body has no per-chunk silence timeout on this path; a stalled upstream holds
//!   the fill until the runtime cuts the request (`waitUntil`'s 30 s after the response ends).
//! - The local R2 simulation (`wrangler dev`) may keep the bytes of a put it refused on disk
//!   as an orphan file: not a stored object (a GET or HEAD does not find it), and production
//!   R2 keeps nothing. Earlier versions hashed in the runtime too and held R2's last chunk
//!   back to avoid that; it tripled the CPU of a fill.
//! - The client's bytes arrive in blocks of at least `BLOCK_LEAST`: with a slow upstream,
//!   the client lags behind it by up to that much.
//! - Other readers of the same fill in the isolate wait for the commit and are served from R2
//!   (their response starts only then).

use super::colo::ColoCache;
use super::r2::R2Body;
use crate::core::body::{Body, HostBody};
use crate::core::ports::{HostFill, HostFillError};
use futures_util::future::LocalBoxFuture;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use worker::js_sys::{self, Promise};
use worker::wasm_bindgen::{prelude::wasm_bindgen, JsCast, JsValue};
use worker::wasm_bindgen_futures::JsFuture;
use worker::web_sys::ReadableStream;
use worker::Bucket;

/// Bytes withheld from the client until R2 confirmed the digest: the core's `HOLDBACK` (hosts
/// do not import the registry feature).
pub const HOLDBACK: u64 = 64 * 1024;

/// The most the client's branch reads in one JavaScript step: the whole cost of the hold-back
/// is per step, so few large ones (bench/worker_fill.md). Memory: one block per fill at a time.
const BLOCK: u64 = 4 << 20;

/// The least one step waits for before it passes bytes on (unless the body ended): bounds how
/// far the client lags behind the upstream while keeping the steps few.
const BLOCK_LEAST: u64 = 1 << 20;

/// The response extension naming an upstream body kept as the runtime's own stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawBodyId(u64);

/// An upstream body not yet read: whoever takes it first (a native fill, or the core's stream
/// on its first poll) owns it.
pub type RawBody = Rc<RefCell<Option<ReadableStream>>>;

thread_local! {
    /// Upstream bodies still unread, by id; entries die with the response that holds them.
    static RAW: RefCell<HashMap<u64, Weak<RefCell<Option<ReadableStream>>>>> =
        RefCell::new(HashMap::new());
    static NEXT_RAW: Cell<u64> = const { Cell::new(0) };
}

/// Keeps `stream` (an upstream response's body) reachable by id until it is read; the caller
/// holds the returned slot for as long as the response lives.
pub fn keep_raw_body(stream: ReadableStream) -> (RawBodyId, RawBody) {
    let slot: RawBody = Rc::new(RefCell::new(Some(stream)));
    let id = NEXT_RAW.with(|n| {
        let id = n.get();
        n.set(id.wrapping_add(1));
        id
    });
    RAW.with(|r| {
        let mut r = r.borrow_mut();
        r.retain(|_, w| w.strong_count() > 0);
        r.insert(id, Rc::downgrade(&slot));
    });
    (RawBodyId(id), slot)
}

/// Takes the runtime's stream of an upstream body that nothing has read yet.
pub fn take_raw_body(id: RawBodyId) -> Option<ReadableStream> {
    let slot = RAW.with(|r| r.borrow_mut().remove(&id.0))?.upgrade()?;
    let taken = slot.borrow_mut().take();
    taken
}

fn js_text(e: &JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{e:?}"))
}

/// Whether R2's refusal is its checksum check (error 10037, "… SHA-256 …").
fn is_digest_refusal(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("10037") || m.contains("sha-256") || m.contains("sha256") || m.contains("checksum")
}

/// A fill running in the runtime: the client's branch (until a client takes it) and R2's put.
pub struct TeeFill {
    client: RefCell<Option<ReadableStream>>,
    done: Promise,
    key: String,
    size: u64,
    bucket: Bucket,
    colo: Rc<ColoCache>,
}

impl TeeFill {
    /// Starts the fill of `key` (the blob of `sha256_hex`, `size` bytes announced) from the
    /// upstream body `body`.
    pub fn start(
        bucket: &Bucket,
        colo: Rc<ColoCache>,
        key: String,
        sha256_hex: &str,
        size: u64,
        body: &ReadableStream,
    ) -> Result<TeeFill, String> {
        let pair = pg_tee_fill(
            bucket.as_ref(),
            &key,
            body,
            size as f64,
            sha256_hex,
            HOLDBACK as f64,
            BLOCK as f64,
            BLOCK_LEAST as f64,
        )
        .map_err(|e| js_text(&e))?;
        let client: ReadableStream = pair.get(0).dyn_into().map_err(|e| js_text(&e))?;
        let done: Promise = pair.get(1).dyn_into().map_err(|e| js_text(&e))?;
        Ok(TeeFill {
            client: RefCell::new(Some(client)),
            done,
            key,
            size,
            bucket: bucket.clone(),
            colo,
        })
    }
}

impl HostFill for TeeFill {
    fn take_body(&self) -> Option<Body> {
        let stream = self.client.borrow_mut().take()?;
        Some(Body::Host(HostBody(Box::new(R2Body { stream }))))
    }

    fn outcome(&self) -> LocalBoxFuture<'static, Result<(), HostFillError>> {
        let done = JsFuture::from(self.done.clone());
        let (key, size, bucket, colo) = (
            self.key.clone(),
            self.size,
            self.bucket.clone(),
            self.colo.clone(),
        );
        Box::pin(async move {
            match done.await {
                Ok(_) => {
                    worker::console_log!("event=stored key={key} bytes={size} put=tee");
                    // Verified and visible in R2: this location's colo gets a copy from R2.
                    colo.copy_from_r2(&bucket, &key, &key, size);
                    Ok(())
                }
                Err(e) => {
                    let message = js_text(&e);
                    if is_digest_refusal(&message) {
                        Err(HostFillError::DigestMismatch)
                    } else {
                        Err(HostFillError::Failed(format!("R2 put {key}: {message}")))
                    }
                }
            }
        })
    }
}

#[wasm_bindgen(wasm_bindgen = worker::wasm_bindgen, inline_js = r#"
export function pg_tee_fill(bucket, key, body, size, sha256, holdback, block, least) {
  const [toStore, toClient] = body.tee();
  // R2's branch never enters JavaScript: R2 hashes the bytes and refuses the object on a
  // mismatch (or a length other than announced).
  const stored = new FixedLengthStream(size);
  toStore.pipeTo(stored.writable).catch(() => {});
  const done = bucket.put(key, stored.readable, { sha256 }).then(() => undefined);
  // Handled by whoever awaits it; never an unhandled rejection.
  done.catch(() => {});
  // The client's branch: read in large blocks (one JavaScript step per block, not per
  // chunk), all but the last `holdback` bytes written on at once, the tail after the put.
  const out = new FixedLengthStream(size);
  const writer = out.writable.getWriter();
  let reader;
  let read;
  try {
    reader = toClient.getReader({ mode: "byob" });
    read = () => reader.readAtLeast(least, new Uint8Array(block));
  } catch (_) {
    reader = toClient.getReader();
    read = () => reader.read();
  }
  (async () => {
    let tail = null;
    try {
      for (;;) {
        const { value, done: end } = await read();
        if (value && value.byteLength) {
          let chunk = value;
          if (tail) {
            if (chunk.byteLength >= holdback) {
              writer.write(tail).catch(() => {});
            } else {
              const joined = new Uint8Array(tail.byteLength + chunk.byteLength);
              joined.set(tail);
              joined.set(chunk, tail.byteLength);
              chunk = joined;
            }
          }
          const cut = Math.max(0, chunk.byteLength - holdback);
          if (cut > 0) await writer.write(chunk.subarray(0, cut));
          // A copy: the tail must not keep the whole block alive.
          tail = chunk.slice(cut);
        }
        if (end) break;
      }
      await done;
      if (tail && tail.byteLength) await writer.write(tail);
      await writer.close();
    } catch (e) {
      // The put failed (or the client left): the client's stream errors, so the runtime
      // resets its connection without the tail.
      reader.cancel(e).catch(() => {});
      writer.abort(e).catch(() => {});
    }
  })();
  return [out.readable, done];
}
"#)]
extern "C" {
    /// Splits `body`: one branch into `bucket.put(key)` with the SHA-256, one to the client
    /// read in blocks of up to `block` bytes (at least `least` unless at the end), its last
    /// `holdback` bytes released only after the put. Returns `[client, done]`.
    #[wasm_bindgen(catch)]
    fn pg_tee_fill(
        bucket: &JsValue,
        key: &str,
        body: &ReadableStream,
        size: f64,
        sha256: &str,
        holdback: f64,
        block: f64,
        least: f64,
    ) -> Result<js_sys::Array, JsValue>;
}
