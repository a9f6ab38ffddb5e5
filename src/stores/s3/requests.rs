//! The sans-IO half of the S3 blob store: [`S3Requests`] builds each S3 request as an
//! `http::Request` whose URL is presigned with SigV4 by `rusty-s3` at a time the caller gives,
//! and the `parse_*`/`verify_*` functions read the responses that matter. No IO and no clock
//! here, so everything is unit-tested with fixed times; the secret key never appears in a
//! request's headers, a `Debug` or an error.

use crate::core::ports::StoreError;
use crate::core::registry::reference::Digest;
use bytes::Bytes;
use http::{header, Method, Request};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::fmt;
use std::time::Duration;

/// Key prefix of blob objects; the object key is this plus the digest's hex.
pub const OBJECT_PREFIX: &str = "blobs/sha256/";
/// How long a presigned request stays valid (it is sent at once; this absorbs clock skew).
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);

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

/// A store error in the S3 store's words.
pub(super) fn err(what: impl fmt::Display) -> StoreError {
    StoreError(format!("s3: {what}"))
}

/// The object key of a blob.
pub fn object_key(digest: &Digest) -> String {
    format!("{OBJECT_PREFIX}{}", digest.hex())
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

/// The start of a response text, for an error message.
pub(super) fn snippet(text: &str) -> String {
    text.chars().take(300).collect()
}
