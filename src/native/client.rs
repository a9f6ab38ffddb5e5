//! `ReqwestUpstream`: the upstream HTTP port over reqwest (rustls). Redirects are *not*
//! followed here (the core follows them without `Authorization`). A request times out if the
//! connection or the response headers take longer than the configured upstream timeout, or if
//! a body goes silent for that long.

use crate::core::ports::{BodyError, ByteStream, Upstream, UpstreamError};
use futures_util::{StreamExt, TryStreamExt};
use http::{Request, Response};
use std::time::Duration;

/// The upstream port over reqwest.
pub struct ReqwestUpstream {
    client: reqwest::Client,
    timeout: Duration,
}

impl ReqwestUpstream {
    /// A client with the given timeout.
    pub fn new(timeout: Duration) -> Result<ReqwestUpstream, String> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(ReqwestUpstream { client, timeout })
    }
}

fn classify(e: reqwest::Error) -> UpstreamError {
    // reqwest's messages carry the URL, which holds no secret (tokens travel in headers).
    let (timeout, connect) = (e.is_timeout(), e.is_connect());
    let msg = e.without_url().to_string();
    if timeout {
        UpstreamError::Timeout(msg)
    } else if connect {
        UpstreamError::Connect(msg)
    } else {
        UpstreamError::Other(msg)
    }
}

#[async_trait::async_trait(?Send)]
impl Upstream for ReqwestUpstream {
    async fn send(
        &self,
        request: Request<bytes::Bytes>,
    ) -> Result<Response<ByteStream>, UpstreamError> {
        let (parts, body) = request.into_parts();
        let url = parts.uri.to_string();
        let mut req = self
            .client
            .request(parts.method, url)
            .headers(parts.headers);
        if !body.is_empty() {
            req = req.body(body);
        }
        let resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| UpstreamError::Timeout("no response headers in time".into()))?
            .map_err(classify)?;
        let mut out = Response::builder().status(resp.status());
        if let Some(h) = out.headers_mut() {
            *h = resp.headers().clone();
        }
        let body: ByteStream = resp
            .bytes_stream()
            .map_err(|e| BodyError(e.without_url().to_string()))
            .boxed_local();
        out.body(body)
            .map_err(|e| UpstreamError::Other(e.to_string()))
    }
}
