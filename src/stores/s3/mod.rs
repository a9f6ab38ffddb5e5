//! `S3BlobStore`: the core's blob port in an S3-compatible object store (AWS S3, R2, MinIO,
//! GCS interoperability), for Spin deployments that have one. A blob is the object
//! `blobs/sha256/<hex>` of the configured bucket.
//!
//! Two layers. [`S3Requests`] is sans-IO: it builds each S3 request (an `http::Request` whose
//! URL is presigned with SigV4 by `rusty-s3`, at a time the caller gives) and parses the
//! responses that matter ([`parse_upload_id`], [`verify_completed`], [`parse_etag`]); it is
//! unit-tested with fixed times. [`S3BlobStore`] drives those requests through the
//! [`Upstream`] port — on Spin, [`crate::spin::SpinUpstream`] over `wasi:http` — so it names no
//! Spin type either. Payloads are `UNSIGNED-PAYLOAD` (query-string signing): TLS protects them,
//! and the digest check below is what guarantees their content.
//!
//! The `BlobWriter` contract: the writer hashes every byte it is given. Bytes go to S3 in parts
//! of [`PART_SIZE`] held in memory one at a time; a blob that ends within its first part is
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

use crate::core::ports::{
    BlobStore, BlobWriter, ByteStream, Clock, CommitError, StoreError, TailReader, Upstream,
};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Method, Request, Response, StatusCode};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

/// Bytes per multipart part (S3 wants at least 5 MiB for every part but the last).
pub const PART_SIZE: usize = 8 << 20;
/// S3's limit on parts per upload.
pub const MAX_PARTS: u64 = 10_000;
/// Key prefix of blob objects; the object key is this plus the digest's hex.
pub const OBJECT_PREFIX: &str = "blobs/sha256/";
/// How long a presigned request stays valid (it is sent at once; this absorbs clock skew).
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);
/// Largest error body read for a message.
const MAX_ERROR_BODY: usize = 4096;

/// Where the bucket is and how to sign for it.
#[derive(Clone)]
pub struct S3Settings {
    /// Endpoint URL, `https://s3.us-east-1.amazonaws.com`, `https://<account>.r2.cloudflarestorage.com`.
    pub endpoint: String,
    /// Bucket name.
    pub bucket: String,
    /// Region (`auto` on R2).
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// `https://endpoint/bucket/key` (true) or `https://bucket.endpoint/key` (false).
    pub path_style: bool,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("path_style", &self.path_style)
            .finish()
    }
}

fn err(what: impl fmt::Display) -> StoreError {
    StoreError(format!("s3: {what}"))
}

/// The object key of a blob.
pub fn object_key(digest: &str) -> Result<String, StoreError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| err(format!("not a sha256 digest: {digest:?}")))?;
    Ok(format!("{OBJECT_PREFIX}{hex}"))
}

/// Builds signed S3 requests (sans-IO).
pub struct S3Requests {
    bucket: Bucket,
    credentials: Credentials,
}

impl fmt::Debug for S3Requests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Requests")
            .field("bucket", &self.bucket.name())
            .finish_non_exhaustive()
    }
}

fn timestamp(now_ms: u64) -> jiff::Timestamp {
    jiff::Timestamp::from_millisecond(i64::try_from(now_ms).unwrap_or(i64::MAX))
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn request(method: Method, url: url::Url, body: Bytes) -> Result<Request<Bytes>, StoreError> {
    let mut builder = Request::builder().method(method.clone()).uri(url.as_str());
    if method == Method::PUT || method == Method::POST {
        builder = builder.header(header::CONTENT_LENGTH, body.len());
    }
    builder.body(body).map_err(err)
}

impl S3Requests {
    /// Checks the settings.
    pub fn new(settings: &S3Settings) -> Result<S3Requests, StoreError> {
        let endpoint: url::Url = settings
            .endpoint
            .parse()
            .map_err(|e| err(format!("endpoint {:?}: {e}", settings.endpoint)))?;
        let style = if settings.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            endpoint,
            style,
            settings.bucket.clone(),
            settings.region.clone(),
        )
        .map_err(|e| err(format!("bucket {:?}: {e}", settings.bucket)))?;
        Ok(S3Requests {
            bucket,
            credentials: Credentials::new(
                settings.access_key_id.clone(),
                settings.secret_access_key.clone(),
            ),
        })
    }

    fn creds(&self) -> Option<&Credentials> {
        Some(&self.credentials)
    }

    /// `HeadObject`.
    pub fn head(&self, key: &str, now_ms: u64) -> Result<Request<Bytes>, StoreError> {
        let url = self
            .bucket
            .head_object(self.creds(), key)
            .sign_with_time(SIGNED_FOR, &timestamp(now_ms));
        request(Method::HEAD, url, Bytes::new())
    }

    /// `GetObject` of bytes `[start, end)` (`end > start`).
    pub fn get(
        &self,
        key: &str,
        start: u64,
        end: u64,
        now_ms: u64,
    ) -> Result<Request<Bytes>, StoreError> {
        let url = self
            .bucket
            .get_object(self.creds(), key)
            .sign_with_time(SIGNED_FOR, &timestamp(now_ms));
        let mut req = request(Method::GET, url, Bytes::new())?;
        let range = format!("bytes={start}-{}", end.saturating_sub(1));
        req.headers_mut()
            .insert(header::RANGE, range.parse().map_err(err)?);
        Ok(req)
    }

    /// `PutObject` with the whole body.
    pub fn put(&self, key: &str, body: Bytes, now_ms: u64) -> Result<Request<Bytes>, StoreError> {
        let url = self
            .bucket
            .put_object(self.creds(), key)
            .sign_with_time(SIGNED_FOR, &timestamp(now_ms));
        request(Method::PUT, url, body)
    }

    /// `DeleteObject`.
    pub fn delete(&self, key: &str, now_ms: u64) -> Result<Request<Bytes>, StoreError> {
        let url = self
            .bucket
            .delete_object(self.creds(), key)
            .sign_with_time(SIGNED_FOR, &timestamp(now_ms));
        request(Method::DELETE, url, Bytes::new())
    }

    /// `CreateMultipartUpload`; the response carries the upload id ([`parse_upload_id`]).
    pub fn create_multipart(&self, key: &str, now_ms: u64) -> Result<Request<Bytes>, StoreError> {
        let url = self
            .bucket
            .create_multipart_upload(self.creds(), key)
            .sign_with_time(SIGNED_FOR, &timestamp(now_ms));
        request(Method::POST, url, Bytes::new())
    }

    /// `UploadPart` number `part` (from 1); the response's `ETag` names it ([`parse_etag`]).
    pub fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part: u16,
        body: Bytes,
        now_ms: u64,
    ) -> Result<Request<Bytes>, StoreError> {
        let url = self
            .bucket
            .upload_part(self.creds(), key, part, upload_id)
            .sign_with_time(SIGNED_FOR, &timestamp(now_ms));
        request(Method::PUT, url, body)
    }

    /// `CompleteMultipartUpload` of the parts whose ETags are `etags`, in part order.
    pub fn complete(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
        now_ms: u64,
    ) -> Result<Request<Bytes>, StoreError> {
        let action = self.bucket.complete_multipart_upload(
            self.creds(),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign_with_time(SIGNED_FOR, &timestamp(now_ms));
        request(Method::POST, url, Bytes::from(action.body()))
    }

    /// `AbortMultipartUpload`: drops the parts uploaded so far.
    pub fn abort(
        &self,
        key: &str,
        upload_id: &str,
        now_ms: u64,
    ) -> Result<Request<Bytes>, StoreError> {
        let url = self
            .bucket
            .abort_multipart_upload(self.creds(), key, upload_id)
            .sign_with_time(SIGNED_FOR, &timestamp(now_ms));
        request(Method::DELETE, url, Bytes::new())
    }
}

/// The upload id in a `CreateMultipartUpload` response body.
pub fn parse_upload_id(xml: &str) -> Result<String, StoreError> {
    let parsed = rusty_s3::actions::CreateMultipartUpload::parse_response(xml)
        .map_err(|e| err(format!("CreateMultipartUpload response: {e}")))?;
    Ok(parsed.upload_id().to_string())
}

/// Checks a `CompleteMultipartUpload` response body: S3 can answer 200 with an `<Error>`.
pub fn verify_completed(xml: &str) -> Result<(), StoreError> {
    rusty_s3::actions::CompleteMultipartUploadResponse::parse(xml)
        .map(|_| ())
        .map_err(|e| {
            err(format!(
                "CompleteMultipartUpload failed: {e}: {}",
                snippet(xml)
            ))
        })
}

/// The `ETag` of an `UploadPart` response.
pub fn parse_etag(headers: &http::HeaderMap) -> Result<String, StoreError> {
    headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| err("UploadPart response has no ETag"))
}

/// The `Content-Length` of a `HeadObject` response.
pub fn parse_size(headers: &http::HeaderMap) -> Result<u64, StoreError> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| err("HeadObject response has no Content-Length"))
}

fn snippet(text: &str) -> String {
    text.chars().take(300).collect()
}

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
    async fn stat(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        let key = object_key(digest)?;
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
        digest: &str,
        start: u64,
        end: u64,
    ) -> Result<Option<ByteStream>, StoreError> {
        let key = object_key(digest)?;
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

    async fn delete(&self, digest: &str) -> Result<bool, StoreError> {
        if self.stat(digest).await?.is_none() {
            return Ok(false);
        }
        let key = object_key(digest)?;
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

    async fn create(&self, digest: &str) -> Result<Box<dyn BlobWriter>, StoreError> {
        let key = object_key(digest)?;
        let expected = key[OBJECT_PREFIX.len()..].to_ascii_lowercase();
        Ok(Box::new(S3BlobWriter {
            client: self.client.clone(),
            key,
            expected,
            hasher: Sha256::new(),
            part_size: self.part_size,
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
    expected: String,
    hasher: Sha256,
    part_size: usize,
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
                eprintln!("pullgate: s3 abort of {} failed: {e}", self.key);
            }
        }
        self.buf = Vec::new();
    }
}

#[async_trait::async_trait(?Send)]
impl BlobWriter for S3BlobWriter {
    async fn write(&mut self, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        for data in chunks {
            self.hasher.update(&data);
            let mut rest: &[u8] = &data;
            while !rest.is_empty() {
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
        let actual = hex::encode(self.hasher.clone().finalize());
        if actual != self.expected {
            self.discard().await;
            return Err(CommitError::DigestMismatch {
                actual: format!("sha256:{actual}"),
            });
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
