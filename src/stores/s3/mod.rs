//! `S3BlobStore`: the core's blob port in an S3-compatible object store (AWS S3, R2, MinIO,
//! GCS interoperability), usable by any host that has an outbound HTTP [`Upstream`] (the Spin
//! host uses it when `pullgate_s3_endpoint` is set). A blob is the object `blobs/sha256/<hex>`
//! of the configured bucket.
//!
//! Two layers. [`S3Requests`] (in `requests.rs`) is sans-IO: it builds each S3 request (an
//! `http::Request` whose URL is presigned with SigV4 by `rusty-s3`, at a time the caller gives)
//! and parses the responses that matter ([`parse_upload_id`], [`verify_completed`],
//! [`parse_etag`]); it is unit-tested with fixed times. [`S3BlobStore`] drives those requests
//! through the [`Upstream`] port (on Spin, `SpinUpstream` over `wasi:http`) and the [`Clock`]
//! port, so it names no host type: it is built with the `s3` feature, which the `spin` feature
//! turns on. Payloads are `UNSIGNED-PAYLOAD` (query-string signing): TLS protects them, and
//! the digest check below is what guarantees their content.
//!
//! The `BlobWriter` contract: the writer feeds every byte it is given to the core's
//! [`DigestCheck`]. Bytes go to S3 in parts of [`PART_SIZE`] held in memory one at a time
//! (sized up front from `create`'s size hint); a blob that ends within its first part is
//! sent with one `PutObject` *after* its digest is verified, a larger one goes through a
//! multipart upload whose parts S3 keeps invisible until `CompleteMultipartUpload`, which is
//! sent only after the digest matched. A mismatch (or an abort) sends
//! `AbortMultipartUpload`, so nothing — neither the object nor an upload's parts — stays.
//! Downloads stream the `GET` body (with a `Range` for partial reads).
//!
//! Credentials are never logged: `rusty-s3`'s `Credentials` has a redacting `Debug`, and error
//! messages name the operation and the object key, never the presigned URL.
//!
//! # Limitations
//! - No tail reader: bytes being uploaded cannot be read back before the upload completes, so a
//!   reader that falls more than the core's in-memory window behind a fill waits for the commit.
//! - At most [`MAX_PARTS`] parts, so blobs up to 80 GiB; larger ones fail to store.
//! - No eviction (use a bucket lifecycle rule) and no usage figures.
//! - An instance killed mid-upload leaves an incomplete multipart upload (invisible, but billed
//!   by AWS until a lifecycle rule `AbortIncompleteMultipartUpload` removes it).

use crate::core::digest_check::DigestCheck;
use crate::core::ports::{
    BlobStore, BlobWriter, ByteStream, Clock, CommitError, StoreError, TailReader, Upstream,
};
use crate::core::registry::reference::Digest;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use std::rc::Rc;

mod requests;

use requests::{err, snippet};
pub use requests::{
    object_key, parse_etag, parse_size, parse_upload_id, verify_completed, S3Requests, S3Settings,
    OBJECT_PREFIX,
};

/// Bytes per multipart part (S3 wants at least 5 MiB for every part but the last).
pub const PART_SIZE: usize = 8 << 20;
/// S3's limit on parts per upload.
pub const MAX_PARTS: u64 = 10_000;
/// Largest error body read for a message.
const MAX_ERROR_BODY: usize = 4096;

/// The S3 exchanges, over the [`Upstream`] port.
struct S3Client {
    requests: S3Requests,
    http: Rc<dyn Upstream>,
    clock: Rc<dyn Clock>,
}

async fn read_text(mut body: ByteStream, max: usize) -> Result<String, StoreError> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| err(format!("response body: {e}")))?;
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

impl S3Client {
    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Sends `req`; statuses in `ok` return the response, others an error naming `what`.
    async fn send(
        &self,
        what: &str,
        key: &str,
        req: Request<Bytes>,
        ok: &[StatusCode],
    ) -> Result<Response<ByteStream>, StoreError> {
        let resp = self
            .http
            .send(req)
            .await
            .map_err(|e| err(format!("{what} {key}: {e}")))?;
        if ok.contains(&resp.status()) {
            return Ok(resp);
        }
        let status = resp.status();
        let text = read_text(resp.into_body(), MAX_ERROR_BODY)
            .await
            .unwrap_or_default();
        Err(err(format!("{what} {key}: {status}: {}", snippet(&text))))
    }

    async fn abort(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let req = self.requests.abort(key, upload_id, self.now())?;
        self.send(
            "AbortMultipartUpload",
            key,
            req,
            &[
                StatusCode::NO_CONTENT,
                StatusCode::OK,
                StatusCode::NOT_FOUND,
            ],
        )
        .await?;
        Ok(())
    }
}

/// The blob port over an S3-compatible bucket.
pub struct S3BlobStore {
    client: Rc<S3Client>,
    part_size: usize,
}

impl S3BlobStore {
    /// A store over `settings`, sending requests through `http` (which must not follow
    /// redirects) and signing them at `clock`'s time.
    pub fn new(
        settings: &S3Settings,
        http: Rc<dyn Upstream>,
        clock: Rc<dyn Clock>,
    ) -> Result<S3BlobStore, StoreError> {
        Ok(S3BlobStore {
            client: Rc::new(S3Client {
                requests: S3Requests::new(settings)?,
                http,
                clock,
            }),
            part_size: PART_SIZE,
        })
    }

    /// The same store with another part size (tests; at least 5 MiB against real S3).
    pub fn with_part_size(mut self, part_size: usize) -> S3BlobStore {
        self.part_size = part_size.max(1);
        self
    }
}

#[async_trait::async_trait(?Send)]
impl BlobStore for S3BlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let key = object_key(digest);
        let c = &self.client;
        let req = c.requests.head(&key, c.now())?;
        let resp = c
            .send(
                "HeadObject",
                &key,
                req,
                &[StatusCode::OK, StatusCode::NOT_FOUND],
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        parse_size(resp.headers()).map(Some)
    }

    async fn read(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Option<ByteStream>, StoreError> {
        let key = object_key(digest);
        if end <= start {
            // An empty range cannot be asked for; say whether the object is there.
            return Ok(self
                .stat(digest)
                .await?
                .map(|_| futures_util::stream::empty().boxed_local()));
        }
        let c = &self.client;
        let req = c.requests.get(&key, start, end, c.now())?;
        let resp = c
            .send(
                "GetObject",
                &key,
                req,
                &[
                    StatusCode::OK,
                    StatusCode::PARTIAL_CONTENT,
                    StatusCode::NOT_FOUND,
                ],
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            // A server that ignored the range answers 200 with the whole object; only a request
            // for the whole object may take that.
            StatusCode::OK if start != 0 => Err(err(format!(
                "GetObject {key}: the server ignored the range {start}-{end}"
            ))),
            _ => Ok(Some(resp.into_body())),
        }
    }

    async fn delete(&self, digest: &Digest) -> Result<bool, StoreError> {
        if self.stat(digest).await?.is_none() {
            return Ok(false);
        }
        let key = object_key(digest);
        let c = &self.client;
        let req = c.requests.delete(&key, c.now())?;
        c.send(
            "DeleteObject",
            &key,
            req,
            &[StatusCode::NO_CONTENT, StatusCode::OK],
        )
        .await?;
        Ok(true)
    }

    /// The size hint sizes the part buffer up front (at most one part), so it is not grown
    /// by doubling; the bytes written still decide what is stored.
    async fn create(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Box<dyn BlobWriter>, StoreError> {
        let part_size = self.part_size;
        let buf_capacity = size.map_or(0, |n| {
            usize::try_from(n).unwrap_or(part_size).min(part_size)
        });
        Ok(Box::new(S3BlobWriter {
            client: self.client.clone(),
            key: object_key(digest),
            check: DigestCheck::new(digest),
            part_size,
            buf_capacity,
            buf: Vec::new(),
            upload: None,
            failed: false,
        }))
    }
}

/// A multipart upload in progress.
struct Upload {
    id: String,
    etags: Vec<String>,
}

/// A blob being written to S3: one part in memory at a time.
pub struct S3BlobWriter {
    client: Rc<S3Client>,
    key: String,
    check: DigestCheck,
    part_size: usize,
    /// What a part buffer reserves when it starts filling (from the size hint; 0: unknown).
    buf_capacity: usize,
    /// Bytes after the last uploaded part (less than one part).
    buf: Vec<u8>,
    upload: Option<Upload>,
    /// A part failed to upload: the bytes hashed are not all in S3, so nothing may commit.
    failed: bool,
}

impl S3BlobWriter {
    /// Uploads `part` as the next part, starting the multipart upload first if needed.
    async fn upload_part(&mut self, part: Bytes) -> Result<(), StoreError> {
        let c = self.client.clone();
        if self.upload.is_none() {
            let req = c.requests.create_multipart(&self.key, c.now())?;
            let resp = c
                .send("CreateMultipartUpload", &self.key, req, &[StatusCode::OK])
                .await?;
            let text = read_text(resp.into_body(), 64 << 10).await?;
            self.upload = Some(Upload {
                id: parse_upload_id(&text)?,
                etags: Vec::new(),
            });
        }
        let Some(upload) = self.upload.as_mut() else {
            return Err(err("no multipart upload"));
        };
        let n = upload.etags.len() as u64 + 1;
        if n > MAX_PARTS {
            return Err(err(format!(
                "{}: more than {MAX_PARTS} parts of {} bytes",
                self.key, self.part_size
            )));
        }
        let number = u16::try_from(n).map_err(err)?;
        let req = c
            .requests
            .upload_part(&self.key, &upload.id, number, part, c.now())?;
        let resp = c
            .send("UploadPart", &self.key, req, &[StatusCode::OK])
            .await?;
        upload.etags.push(parse_etag(resp.headers())?);
        // Drain the (empty) body so the connection is done with.
        let _ = read_text(resp.into_body(), 0).await;
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StoreError> {
        let c = self.client.clone();
        let rest = Bytes::from(std::mem::take(&mut self.buf));
        if self.upload.is_none() {
            let req = c.requests.put(&self.key, rest, c.now())?;
            c.send("PutObject", &self.key, req, &[StatusCode::OK])
                .await?;
            return Ok(());
        }
        if !rest.is_empty() {
            self.upload_part(rest).await?;
        }
        let Some(upload) = self.upload.as_ref() else {
            return Err(err("no multipart upload"));
        };
        let req = c
            .requests
            .complete(&self.key, &upload.id, &upload.etags, c.now())?;
        let resp = c
            .send("CompleteMultipartUpload", &self.key, req, &[StatusCode::OK])
            .await?;
        let text = read_text(resp.into_body(), 64 << 10).await?;
        verify_completed(&text)
    }

    async fn discard(&mut self) {
        if let Some(upload) = self.upload.take() {
            if let Err(e) = self.client.abort(&self.key, &upload.id).await {
                tracing::warn!(key = %self.key, "s3 abort of a multipart upload failed: {e}");
            }
        }
        self.buf = Vec::new();
    }
}

#[async_trait::async_trait(?Send)]
impl BlobWriter for S3BlobWriter {
    async fn write(&mut self, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        for data in chunks {
            self.check.update(&data);
            let mut rest: &[u8] = &data;
            while !rest.is_empty() {
                if self.buf.capacity() == 0 {
                    self.buf.reserve_exact(self.buf_capacity);
                }
                let take = (self.part_size - self.buf.len()).min(rest.len());
                self.buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if self.buf.len() == self.part_size {
                    let part = Bytes::from(std::mem::take(&mut self.buf));
                    if let Err(e) = self.upload_part(part).await {
                        self.failed = true;
                        self.discard().await;
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), CommitError> {
        if self.failed {
            return Err(CommitError::Store(err(format!(
                "{}: a part failed to upload; not stored",
                self.key
            ))));
        }
        if let Err(e) = self.check.clone().finish() {
            self.discard().await;
            return Err(e);
        }
        if let Err(e) = self.finish().await {
            self.discard().await;
            return Err(CommitError::Store(e));
        }
        Ok(())
    }

    async fn abort(mut self: Box<Self>) {
        self.discard().await;
    }

    fn tail(&self) -> Option<Rc<dyn TailReader>> {
        None
    }
}

#[cfg(test)]
mod tests;
