//! HTTP helpers every feature shares: response builders (the registry's OCI error envelope and
//! the JSON answers of the other routes), upstream status mapping, capped body reads,
//! redirects and the user agent. A leaf: it imports only other leaves.

use crate::core::body::Body;
use crate::core::error::RegistryError;
use crate::core::ports::{ByteStream, UpstreamError};
use crate::core::registry::media::header as h;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use url::Url;

/// The `User-Agent` of every outbound request.
pub const USER_AGENT: &str = concat!("pullgate/", env!("CARGO_PKG_VERSION"));

/// `Docker-Distribution-API-Version` as a parsed name (a `&str` name is parsed, and a custom
/// one copied, on every use).
pub(crate) const API_VERSION: HeaderName = HeaderName::from_static(h::API_VERSION);
/// `Docker-Content-Digest` as a parsed name.
pub(crate) const CONTENT_DIGEST: HeaderName = HeaderName::from_static(h::CONTENT_DIGEST);
/// The API version header's value.
const API_VERSION_VALUE: HeaderValue = HeaderValue::from_static(h::API_VERSION_VALUE);

/// Builds a response with the registry API version header.
pub(crate) fn response(status: StatusCode) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header(API_VERSION, API_VERSION_VALUE)
}

/// The OCI error envelope for `e` (headers only for HEAD).
pub(crate) fn error_response(e: &RegistryError, head: bool) -> Response<Body> {
    let body = e.envelope();
    let len = body.len();
    response(e.status())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, len)
        .body(if head {
            Body::Empty
        } else {
            Body::Bytes(body.into())
        })
        .unwrap_or_else(|_| Response::new(Body::Empty))
}

/// A JSON response (the non-registry routes: gateway, admin, token, charts).
pub(crate) fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    text(status, "application/json", v.to_string())
}

/// `{"error": msg}` with `status`.
pub(crate) fn json_error(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    json_response(status, serde_json::json!({ "error": msg.into() }))
}

/// A complete text body of `content_type`.
pub(crate) fn text(status: StatusCode, content_type: &str, text: String) -> Response<Body> {
    let len = text.len();
    response(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len)
        .body(Body::Bytes(text.into()))
        .unwrap_or_else(|_| Response::new(Body::Empty))
}

/// Sets a header from a string, skipping values that are not valid header text.
pub(crate) fn set_header(resp: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

/// Maps an upstream registry status that is not success or 404.
pub(crate) fn status_failure(status: StatusCode, what: &str) -> RegistryError {
    match status.as_u16() {
        429 => RegistryError::TooManyRequests(format!("upstream rate limit hit fetching {what}")),
        401 | 403 => RegistryError::Denied(format!("upstream denied access to {what} ({status})")),
        500..=599 => {
            RegistryError::Unavailable(format!("upstream failed fetching {what} ({status})"))
        }
        _ => RegistryError::BadUpstream(format!("upstream answered {status} for {what}")),
    }
}

/// Where a redirect response points, resolved against the URL that answered it; None when
/// the response is not a redirect (301, 302, 303, 307, 308 — a 304 answers a conditional
/// request and is final). A redirect without `Location`, to a malformed URL or to anything
/// but http(s) is an error. Shared by every place that follows redirects itself.
pub(crate) fn redirect_target(
    current: &Url,
    resp: &Response<ByteStream>,
) -> Result<Option<Url>, UpstreamError> {
    if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return Ok(None);
    }
    let location = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .ok_or_else(|| UpstreamError::Other("redirect without Location".into()))?;
    let next = current
        .join(location)
        .map_err(|_| UpstreamError::Other("redirect to a malformed URL".into()))?;
    if !matches!(next.scheme(), "http" | "https") {
        return Err(UpstreamError::Other("redirect to a non-HTTP URL".into()));
    }
    Ok(Some(next))
}

/// Why a capped body read stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The body is longer than the cap (given).
    TooLarge(usize),
    /// The stream failed.
    Failed(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::TooLarge(cap) => write!(f, "body larger than {cap} bytes"),
            ReadError::Failed(e) => f.write_str(e),
        }
    }
}

/// Reads a whole (small) body, refusing more than `cap` bytes; it stops reading as soon as
/// the cap is passed.
pub async fn read_capped(mut body: ByteStream, cap: usize) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ReadError::Failed(e.to_string()))?;
        if out.len() + chunk.len() > cap {
            return Err(ReadError::TooLarge(cap));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The first value of `key` in a query string, form-decoded (`+` is a space, malformed
/// escapes pass through): for the JSON routes.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// A query value that is not valid percent-encoded UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedQuery;

/// The first value of `key` in a query string, strictly decoded: a `%` not followed by two
/// hex digits, or bytes that are not UTF-8, are an error rather than passed through (the
/// registry routes answer those with an OCI error).
pub fn strict_query_param(
    query: Option<&str>,
    key: &str,
) -> Result<Option<String>, MalformedQuery> {
    let Some(raw) = query.and_then(|q| {
        q.split('&')
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }) else {
        return Ok(None);
    };
    // `+` is a space in a query; a `%2B` decodes to `+` after that.
    percent_decode_strict(&raw.replace('+', " "))
        .map(Some)
        .ok_or(MalformedQuery)
}

/// Percent-decodes `s` into UTF-8, refusing what the `percent-encoding` crate would pass
/// through: a `%` not followed by two hex digits. None also for bytes that are not UTF-8.
pub fn percent_decode_strict(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let well_formed = b.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || b.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_query_values() {
        let q = Some("n=10&last=a%2Fb&sp=a+b&bad=%zz&short=%4");
        assert_eq!(strict_query_param(q, "n"), Ok(Some("10".into())));
        assert_eq!(strict_query_param(q, "last"), Ok(Some("a/b".into())));
        assert_eq!(strict_query_param(q, "sp"), Ok(Some("a b".into())));
        assert_eq!(strict_query_param(q, "bad"), Err(MalformedQuery));
        assert_eq!(strict_query_param(q, "short"), Err(MalformedQuery));
        assert_eq!(strict_query_param(q, "none"), Ok(None));
        assert_eq!(strict_query_param(Some("x=%ff"), "x"), Err(MalformedQuery));
    }

    #[test]
    fn lenient_query_and_bearer() {
        assert_eq!(
            query_param(Some("a=1&b=x%2Fy"), "b").as_deref(),
            Some("x/y")
        );
        assert_eq!(query_param(None, "b"), None);
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tok"),
        );
        assert_eq!(bearer(&h), Some("tok"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic x"));
        assert_eq!(bearer(&h), None);
    }
}
