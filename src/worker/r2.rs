//! `R2BlobStore`: the core's blob port over an R2 bucket. Blobs live under
//! `blobs/sha256/<hex>`, each object exactly the verified bytes of its digest.
//!
//! A warm hit hands R2's own `ReadableStream` (a range read when the client asked for one) to
//! the response as a [`Body::Host`], so large layers never pass through wasm. Reads (`stat`,
//! `serve`, `read`) ask this location's colo tier ([`ColoCache`]) first: the core calls them
//! only after it decided the request is entitled to the blob, so the colo answers exactly
//! what R2 would. A blob committed here, or found in R2 but not in the colo, is copied into
//! the colo in the background.
//!
//! A fill is written chunk by chunk through the `BlobWriter` port. When `create`'s size hint
//! (the upstream's `Content-Length`) is known and within R2's single-put limit
//! ([`SINGLE_PUT_MAX`]), the writer streams the chunks into a `FixedLengthStream` that one R2
//! `put` of that length consumes as they arrive, with the expected SHA-256 handed to R2: R2
//! refuses the object (and stores nothing) if the bytes it received hash otherwise, and a
//! stream that ends short or long fails the put. Without a hint, or above the limit, it
//! buffers up to [`PART`] bytes: a blob that fits is stored by one `put` of that buffer
//! (also with R2's SHA-256 check); a larger one becomes a multipart upload of equal
//! [`PART`]-sized parts. Either way the bytes are hashed on the way by the runtime's native
//! `crypto.DigestStream` (no SHA-256 in wasm), and `commit` hands that hash to the core's
//! [`verify_sha256`](crate::core::digest_check::verify_sha256) *before* anything becomes
//! visible: the streamed put's last chunk is held back until then, and a mismatch errors its
//! stream instead (R2 never receives the whole of a bad blob, and stores nothing), aborts the
//! multipart upload (its parts are never readable) or skips the buffered `put`. An object
//! appears under its key only on the successful `put` or `completeMultipartUpload`, both
//! atomic. Each commit logs one line: `event=stored key=… bytes=… put=stream|single|multipart`.
//!
//! # Limitations
//! - No tail reader: R2 cannot read an object while it is written. The core serves readers
//!   that keep up from its in-memory window and slower ones from the committed object.
//! - Reads are not recorded as accesses: eviction is by R2 object lifecycle rules (age since
//!   upload), not least-recently-used. `usage` is not reported (counting would list the whole
//!   bucket); the R2 dashboard shows it.
//! - A fill of unknown length holds up to [`PART`] bytes in memory until its part is
//!   uploaded; a streamed put holds none.
//! - Through this writer the bytes pass through wasm on their way from the upstream to R2
//!   (the core's fill reads the upstream body and writes it here), and are counted in
//!   `pullgate_worker_wasm_blob_bytes_total`. A blob of known length whose upstream body is
//!   still the runtime's stream is instead filled in the runtime by [`BlobStore::fill_from`]
//!   ([`TeeFill`]), which copies nothing into wasm.

use crate::core::body::{Body, HostBody};
use crate::core::digest_check::verify_sha256;
use crate::core::ports::{
    BlobStore, BlobWriter, BodyError, ByteStream, CommitError, NativeFill, StoreError, TailReader,
};
use crate::core::registry::reference::Digest;
use crate::worker::colo::ColoCache;
use crate::worker::fill::{take_raw_body, RawBodyId, TeeFill};
use bytes::Bytes;
use futures_util::future::{select, Either, LocalBoxFuture};
use futures_util::{FutureExt, StreamExt};
use std::rc::Rc;
use worker::js_sys::{ArrayBuffer, BigInt, Uint8Array};
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::wasm_bindgen_futures::JsFuture;
use worker::web_sys::{ReadableStream, WritableStreamDefaultWriter};
use worker::{Bucket, Data, MultipartUpload, Range, UploadedPart};

/// Size of a multipart part, and the largest blob of unknown length stored by a single `put`.
/// R2 needs parts of at least 5 MiB, all the same size except the last.
pub const PART: usize = 8 << 20;

/// The largest blob stored by one streamed `put` of known length: R2's single-upload limit
/// (5 GiB less 5 MiB). Larger blobs, and blobs of unknown length, use multipart.
pub const SINGLE_PUT_MAX: u64 = (5 << 30) - (5 << 20);

/// Key prefix of blobs in the bucket.
const BLOB_PREFIX: &str = "blobs/sha256/";

/// A stored blob's body for the host to hand to the response, without touching its bytes:
/// R2's own stream, or the colo cache's.
pub struct R2Body {
    /// The runtime's stream of the requested bytes.
    pub stream: ReadableStream,
}

/// The blob port over an R2 bucket, with the colo tier in front of its reads.
pub struct R2BlobStore {
    bucket: Bucket,
    colo: Rc<ColoCache>,
}

impl R2BlobStore {
    /// Wraps the bucket binding; reads consult `colo` first.
    pub fn new(bucket: Bucket, colo: Rc<ColoCache>) -> R2BlobStore {
        R2BlobStore { bucket, colo }
    }
}

fn r2_err(what: &str, key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("R2 {what} {key}: {e}"))
}

/// The object key of a blob.
fn blob_key(digest: &Digest) -> String {
    format!("{BLOB_PREFIX}{}", digest.hex())
}

impl R2BlobStore {
    /// R2's stream of bytes `[start, end)` of a stored blob, or None.
    async fn range_stream(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Option<ReadableStream>, StoreError> {
        let key = blob_key(digest);
        let length = end.saturating_sub(start);
        self.colo.tally().r2_read();
        let obj = self
            .bucket
            .get(&key)
            .range(Range::OffsetWithLength {
                offset: start,
                length: length.max(1),
            })
            .execute()
            .await
            .map_err(|e| r2_err("get", &key, e))?;
        let Some(obj) = obj else { return Ok(None) };
        let Some(body) = obj.body() else {
            return Ok(None);
        };
        match body.response_body() {
            Ok(worker::ResponseBody::Stream(s)) => Ok(Some(s)),
            Ok(_) => Err(r2_err("get", &key, "object body is not a stream")),
            Err(e) => Err(r2_err("get", &key, e)),
        }
    }
}

#[async_trait::async_trait(?Send)]
impl BlobStore for R2BlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let key = blob_key(digest);
        if let Some(size) = self.colo.stat(&key).await {
            return Ok(Some(size));
        }
        self.colo.tally().r2_read();
        let obj = self
            .bucket
            .head(&key)
            .await
            .map_err(|e| r2_err("head", &key, e))?;
        let size = obj.map(|o| o.size());
        if let Some(size) = size {
            // Stored in R2 but not in this location's colo: copy it in for the next read.
            self.colo.note_r2();
            self.colo.copy_from_r2(&self.bucket, &key, &key, size);
        }
        Ok(size)
    }

    async fn read(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Option<ByteStream>, StoreError> {
        if start >= end {
            return Ok(Some(futures_util::stream::empty().boxed_local()));
        }
        let stream = match self.colo.range(&blob_key(digest), start, end).await {
            Some(stream) => stream,
            None => match self.range_stream(digest, start, end).await? {
                Some(stream) => stream,
                None => return Ok(None),
            },
        };
        let tally = self.colo.tally().clone();
        let bytes = worker::ByteStream::from(stream).map(move |chunk| {
            chunk
                .map(|c| {
                    tally.wasm_blob_bytes(c.len());
                    Bytes::from(c)
                })
                .map_err(|e| BodyError(format!("R2 read: {e}")))
        });
        Ok(Some(bytes.boxed_local()))
    }

    async fn serve(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Option<Body>, StoreError> {
        if start >= end {
            return Ok(Some(Body::Empty));
        }
        let stream = match self.colo.range(&blob_key(digest), start, end).await {
            Some(stream) => Some(stream),
            None => {
                self.colo.note_r2();
                self.range_stream(digest, start, end).await?
            }
        };
        Ok(stream.map(|stream| Body::Host(HostBody(Box::new(R2Body { stream })))))
    }

    async fn delete(&self, digest: &Digest) -> Result<bool, StoreError> {
        let key = blob_key(digest);
        let existed = self
            .bucket
            .head(&key)
            .await
            .map_err(|e| r2_err("head", &key, e))?
            .is_some();
        self.bucket
            .delete(&key)
            .await
            .map_err(|e| r2_err("delete", &key, e))?;
        self.colo.delete(&key).await;
        Ok(existed)
    }

    /// A blob of known length within [`SINGLE_PUT_MAX`] whose upstream body is still the
    /// runtime's own stream is filled in the runtime ([`TeeFill`]): no byte enters wasm.
    async fn fill_from(
        &self,
        digest: &Digest,
        size: Option<u64>,
        upstream: http::Response<ByteStream>,
    ) -> NativeFill {
        let Some(size) = size.filter(|n| *n <= SINGLE_PUT_MAX) else {
            return NativeFill::Declined(upstream);
        };
        let Some(id) = upstream.extensions().get::<RawBodyId>().copied() else {
            return NativeFill::Declined(upstream);
        };
        let Some(body) = take_raw_body(id) else {
            return NativeFill::Declined(upstream);
        };
        let key = blob_key(digest);
        match TeeFill::start(
            &self.bucket,
            self.colo.clone(),
            key,
            digest.hex(),
            size,
            &body,
        ) {
            Ok(fill) => NativeFill::Started(Rc::new(fill)),
            Err(e) => {
                // The body was taken: hand the core a response whose body is that stream.
                worker::console_error!(
                    "event=tee-fill-refused key={} error={e:?}",
                    blob_key(digest)
                );
                let (parts, _) = upstream.into_parts();
                let tally = self.colo.tally().clone();
                let stream = worker::ByteStream::from(body)
                    .map(move |chunk| {
                        chunk
                            .map(|c| {
                                tally.wasm_blob_bytes(c.len());
                                Bytes::from(c)
                            })
                            .map_err(|e| BodyError(format!("upstream body: {e}")))
                    })
                    .boxed_local();
                NativeFill::Declined(http::Response::from_parts(parts, stream))
            }
        }
    }

    async fn create(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Box<dyn BlobWriter>, StoreError> {
        let key = blob_key(digest);
        let hasher = NativeSha256::new().map_err(|e| r2_err("hash", &key, e))?;
        let mode = match size.filter(|n| *n <= SINGLE_PUT_MAX) {
            Some(length) => Mode::Streamed(
                StreamedPut::start(&self.bucket, &key, digest, length)
                    .map_err(|e| r2_err("put", &key, e))?,
            ),
            None => Mode::Parts {
                buf: Vec::new(),
                upload: None,
            },
        };
        Ok(Box::new(R2BlobWriter {
            bucket: self.bucket.clone(),
            colo: self.colo.clone(),
            key,
            expected: digest.clone(),
            hasher,
            written: 0,
            mode,
        }))
    }
}

/// SHA-256 by the runtime (`crypto.DigestStream`), fed chunk by chunk.
struct NativeSha256 {
    stream: worker::worker_sys::DigestStream,
    writer: WritableStreamDefaultWriter,
}

fn js_text(e: JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<worker::js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{e:?}"))
}

impl NativeSha256 {
    fn new() -> Result<NativeSha256, String> {
        let stream = worker::worker_sys::DigestStream::new("SHA-256");
        let writer = stream.get_writer().map_err(js_text)?;
        Ok(NativeSha256 { stream, writer })
    }

    async fn update(&self, chunk: &[u8]) -> Result<(), String> {
        let array = Uint8Array::from(chunk);
        JsFuture::from(self.writer.write_with_chunk(&array))
            .await
            .map(|_| ())
            .map_err(js_text)
    }

    async fn finish(self) -> Result<Vec<u8>, String> {
        JsFuture::from(self.writer.close()).await.map_err(js_text)?;
        let buf: ArrayBuffer = JsFuture::from(self.stream.digest())
            .await
            .map_err(js_text)?
            .unchecked_into();
        Ok(Uint8Array::new(&buf).to_vec())
    }

    fn abort(self) {
        let _ = self.writer.abort();
    }
}

struct Multipart {
    upload: MultipartUpload,
    parts: Vec<UploadedPart>,
}

/// An R2 put of known length in progress: the writer's chunks go into a `FixedLengthStream`
/// whose readable side R2 is consuming, with the expected SHA-256 handed to R2.
struct StreamedPut {
    /// The writable side of the `FixedLengthStream`.
    writer: WritableStreamDefaultWriter,
    /// The put; polled alongside every write (it starts on its first poll).
    put: LocalBoxFuture<'static, Result<(), String>>,
    /// Its result, once it finished before the writer expected it to.
    done: Option<Result<(), String>>,
    length: u64,
    /// The latest chunk, held back until the next one arrives or the digest is verified, so
    /// R2 never receives the whole of a blob whose hash failed.
    held: Option<Bytes>,
}

impl StreamedPut {
    fn start(
        bucket: &Bucket,
        key: &str,
        digest: &Digest,
        length: u64,
    ) -> Result<StreamedPut, String> {
        let expected = hex::decode(digest.hex()).map_err(|e| e.to_string())?;
        let fixed = worker::worker_sys::FixedLengthStream::new_big_int(BigInt::from(length))
            .map_err(js_text)?;
        let readable = fixed.readable();
        let writer = fixed.writable().get_writer().map_err(js_text)?;
        let (bucket, key) = (bucket.clone(), key.to_string());
        let put = async move {
            bucket
                .put(&key, Data::ReadableStream(readable))
                // R2 refuses (and stores nothing) when the bytes it received hash otherwise.
                .sha256(expected)
                .execute()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        .boxed_local();
        Ok(StreamedPut {
            writer,
            put,
            done: None,
            length,
            held: None,
        })
    }

    /// Awaits `step` (a promise of the stream) while driving the put.
    async fn drive(&mut self, step: worker::js_sys::Promise) -> Result<(), String> {
        if let Some(done) = &self.done {
            return Err(match done {
                Ok(()) => "the put ended before the last byte".into(),
                Err(e) => e.clone(),
            });
        }
        match select(JsFuture::from(step), self.put.as_mut()).await {
            Either::Left((Ok(_), _)) => Ok(()),
            Either::Left((Err(e), _)) => Err(js_text(e)),
            Either::Right((result, _)) => {
                let e = match &result {
                    Ok(()) => "the put ended before the last byte".to_string(),
                    Err(e) => e.clone(),
                };
                self.done = Some(result);
                Err(e)
            }
        }
    }

    /// Sends the held chunk on and holds `chunk` back instead.
    async fn write(&mut self, chunk: Bytes) -> Result<(), String> {
        match self.held.replace(chunk) {
            Some(previous) => self.send(&previous).await,
            None => Ok(()),
        }
    }

    async fn send(&mut self, chunk: &[u8]) -> Result<(), String> {
        let array = Uint8Array::from(chunk);
        let step = self.writer.write_with_chunk(&array);
        self.drive(step).await
    }

    /// Sends the held chunk, ends the stream and waits for R2 to store (and check) the object.
    /// Called only once the digest is verified.
    async fn finish(mut self) -> Result<(), String> {
        if let Some(last) = self.held.take() {
            self.send(&last).await?;
        }
        let step = self.writer.close();
        self.drive(step).await?;
        match self.done.take() {
            Some(result) => result,
            None => self.put.await,
        }
    }

    /// Errors the stream, so the put fails and stores nothing, and waits for it to end.
    async fn abort(self) {
        let _ = JsFuture::from(self.writer.abort()).await;
        if self.done.is_none() {
            let _ = self.put.await;
        }
    }
}

/// How a blob is being written.
enum Mode {
    /// Known length within [`SINGLE_PUT_MAX`]: one put, streamed as the bytes arrive.
    Streamed(StreamedPut),
    /// Unknown length or over the single-put limit: buffered into [`PART`]-sized parts.
    Parts {
        /// Bytes not yet uploaded (less than [`PART`] between writes).
        buf: Vec<u8>,
        upload: Option<Multipart>,
    },
}

/// A blob being written: hashed natively, streamed into one put of known length or buffered
/// into parts, visible only after `commit` found the hash equal to the digest.
pub struct R2BlobWriter {
    bucket: Bucket,
    colo: Rc<ColoCache>,
    key: String,
    expected: Digest,
    hasher: NativeSha256,
    /// Bytes written so far.
    written: u64,
    mode: Mode,
}

async fn upload_part(
    bucket: &Bucket,
    key: &str,
    upload: &mut Option<Multipart>,
    data: Vec<u8>,
) -> Result<(), StoreError> {
    if upload.is_none() {
        let created = bucket
            .create_multipart_upload(key)
            .execute()
            .await
            .map_err(|e| r2_err("create multipart upload", key, e))?;
        *upload = Some(Multipart {
            upload: created,
            parts: Vec::new(),
        });
    }
    let Some(m) = upload.as_mut() else {
        return Err(r2_err("upload part", key, "no multipart upload"));
    };
    let number = u16::try_from(m.parts.len() + 1)
        .map_err(|_| r2_err("upload part", key, "blob has too many parts"))?;
    let part = m
        .upload
        .upload_part(number, Data::Bytes(data))
        .await
        .map_err(|e| r2_err("upload part", key, e))?;
    m.parts.push(part);
    Ok(())
}

#[async_trait::async_trait(?Send)]
impl BlobWriter for R2BlobWriter {
    async fn write(&mut self, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        for chunk in chunks {
            self.written += chunk.len() as u64;
            self.colo.tally().wasm_blob_bytes(chunk.len());
            self.hasher
                .update(&chunk)
                .await
                .map_err(|e| r2_err("hash", &self.key, e))?;
            match &mut self.mode {
                Mode::Streamed(put) => {
                    if self.written > put.length {
                        return Err(r2_err(
                            "put",
                            &self.key,
                            "more bytes than the announced length",
                        ));
                    }
                    put.write(chunk)
                        .await
                        .map_err(|e| r2_err("put", &self.key, e))?;
                }
                Mode::Parts { buf, upload } => {
                    let mut rest: &[u8] = &chunk;
                    while !rest.is_empty() {
                        // A full buffer is uploaded only once more bytes follow, so a blob of
                        // exactly PART bytes is still stored by a single verified put.
                        if buf.len() == PART {
                            let part = std::mem::replace(buf, Vec::with_capacity(PART));
                            upload_part(&self.bucket, &self.key, upload, part).await?;
                        }
                        let take = (PART - buf.len()).min(rest.len());
                        buf.extend_from_slice(&rest[..take]);
                        rest = &rest[take..];
                    }
                }
            }
        }
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), CommitError> {
        let R2BlobWriter {
            bucket,
            colo,
            key,
            expected,
            hasher,
            written,
            mode,
        } = *self;
        let actual = hasher.finish().await.map_err(|e| r2_err("hash", &key, e))?;
        if let Err(e) = verify_sha256(&expected, &actual) {
            match mode {
                Mode::Streamed(put) => put.abort().await,
                Mode::Parts { upload, .. } => {
                    if let Some(m) = upload {
                        let _ = m.upload.abort().await;
                    }
                }
            }
            return Err(e);
        }
        let how = match mode {
            Mode::Streamed(put) => {
                if written != put.length {
                    put.abort().await;
                    return Err(r2_err(
                        "put",
                        &key,
                        format!("{written} bytes, not the announced length"),
                    )
                    .into());
                }
                put.finish().await.map_err(|e| r2_err("put", &key, e))?;
                "stream"
            }
            Mode::Parts { buf, upload: None } => {
                bucket
                    .put(&key, Data::Bytes(buf))
                    // Equal to the expected digest's bytes now; R2 checks them once more.
                    .sha256(actual)
                    .execute()
                    .await
                    .map_err(|e| r2_err("put", &key, e))?;
                "single"
            }
            Mode::Parts {
                buf,
                upload: Some(mut m),
            } => {
                if !buf.is_empty() {
                    let number = u16::try_from(m.parts.len() + 1)
                        .map_err(|_| r2_err("upload part", &key, "blob has too many parts"))?;
                    let part = m
                        .upload
                        .upload_part(number, Data::Bytes(buf))
                        .await
                        .map_err(|e| r2_err("upload part", &key, e))?;
                    m.parts.push(part);
                }
                m.upload
                    .complete(m.parts)
                    .await
                    .map_err(|e| r2_err("complete multipart upload", &key, e))?;
                "multipart"
            }
        };
        worker::console_log!("event=stored key={key} bytes={written} put={how}");
        // Verified and visible in R2: this location's colo gets a copy, straight from R2.
        colo.copy_from_r2(&bucket, &key, &key, written);
        Ok(())
    }

    async fn abort(self: Box<Self>) {
        let R2BlobWriter { hasher, mode, .. } = *self;
        match mode {
            Mode::Streamed(put) => put.abort().await,
            Mode::Parts { upload, .. } => {
                if let Some(m) = upload {
                    let _ = m.upload.abort().await;
                }
            }
        }
        hasher.abort();
    }

    fn tail(&self) -> Option<Rc<dyn TailReader>> {
        None
    }
}
