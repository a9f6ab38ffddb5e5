//! `FetchUpstream`: the core's upstream port over the Workers `fetch` API, with
//! `redirect: "manual"` (the core follows redirects itself, without `Authorization`, and never
//! caches the redirect URL). Like the native client, a request times out when the response
//! headers take longer than the upstream timeout, and a body fails when it goes silent for
//! that long.
//!
//! # Limitations
//! - The outbound address policy (`core::outbound`) is checked by the core on what it can
//!   see: a URL the upstream chose (redirect, token realm, chart URL) whose host is a refused
//!   literal address (loopback, link-local, private, unique-local, metadata, …) or an
//!   internal-by-definition name (`localhost`, `metadata.google.internal`) is refused before
//!   it is sent. Names are resolved by the Workers runtime, which a Worker cannot observe, so
//!   the `ChosenByUpstream` marker on such requests is ignored here: a public name that
//!   resolves to an internal address is not caught by pullgate.

use super::fill::{keep_raw_body, RawBody};
use crate::core::ports::{BodyError, ByteStream, Upstream, UpstreamError};
use bytes::Bytes;
use futures_util::future::{select, Either};
use futures_util::StreamExt;
use http::{Request, Response};
use std::time::Duration;
use worker::wasm_bindgen::JsValue;
use worker::{AbortController, Delay, Fetch, Headers, Method, RequestInit, RequestRedirect};

/// Where an upstream body's bytes come from: the runtime's stream not yet opened (a blob
/// store may still take it whole), or opened by the core.
enum Source {
    Unopened(RawBody),
    Open(worker::ByteStream),
}

/// The upstream port over `fetch`.
pub struct FetchUpstream {
    timeout: Duration,
}

impl FetchUpstream {
    /// A client with the given timeout.
    pub fn new(timeout: Duration) -> FetchUpstream {
        FetchUpstream { timeout }
    }
}

fn other(e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Other(e.to_string())
}

#[async_trait::async_trait(?Send)]
impl Upstream for FetchUpstream {
    async fn send(&self, request: Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> {
        let (parts, body) = request.into_parts();
        let headers = Headers::new();
        for (name, value) in &parts.headers {
            let value = value.to_str().map_err(other)?;
            headers.append(name.as_str(), value).map_err(other)?;
        }
        let mut init = RequestInit::new();
        init.with_method(Method::from(parts.method.as_str().to_string()))
            .with_headers(headers)
            .with_redirect(RequestRedirect::Manual);
        if !body.is_empty() {
            let array = worker::js_sys::Uint8Array::from(&body[..]);
            init.with_body(Some(JsValue::from(array)));
        }
        let url = parts.uri.to_string();
        let req = worker::Request::new_with_init(&url, &init).map_err(other)?;
        let controller = AbortController::default();
        let signal = controller.signal();
        let fetch = Fetch::Request(req);
        let sending = Box::pin(fetch.send_with_signal(&signal));
        let resp = match select(sending, Delay::from(self.timeout)).await {
            Either::Left((Ok(resp), _)) => resp,
            // The runtime reports refused connections, DNS and TLS failures alike.
            Either::Left((Err(e), _)) => return Err(UpstreamError::Connect(e.to_string())),
            Either::Right(_) => {
                controller.abort();
                return Err(UpstreamError::Timeout("no response headers in time".into()));
            }
        };
        let mut out = Response::builder().status(resp.status_code());
        for (name, value) in resp.headers().entries() {
            out = out.header(name, value);
        }
        let timeout = self.timeout;
        let body: ByteStream = match resp.body() {
            worker::ResponseBody::Stream(stream) => {
                // The body stays the runtime's stream until something reads it: a blob store
                // may take it whole through the response's `RawBodyId` (see `fill.rs`), so
                // its bytes never enter wasm. Otherwise it is opened on the first poll, and
                // each chunk must arrive within the timeout; a silent body ends in an error.
                let (id, slot) = keep_raw_body(stream.clone());
                out = out.extension(id);
                futures_util::stream::unfold(
                    Some(Source::Unopened(slot)),
                    move |source| async move {
                        let mut stream = match source? {
                            Source::Open(stream) => stream,
                            Source::Unopened(slot) => match slot.borrow_mut().take() {
                                Some(raw) => worker::ByteStream::from(raw),
                                None => {
                                    let e = BodyError("upstream body was taken".into());
                                    return Some((Err(e), None));
                                }
                            },
                        };
                        match select(stream.next(), Delay::from(timeout)).await {
                            Either::Left((Some(Ok(chunk)), _)) => {
                                Some((Ok(Bytes::from(chunk)), Some(Source::Open(stream))))
                            }
                            Either::Left((Some(Err(e)), _)) => {
                                Some((Err(BodyError(format!("upstream body: {e}"))), None))
                            }
                            Either::Left((None, _)) => None,
                            Either::Right(_) => {
                                Some((Err(BodyError("upstream body went silent".into())), None))
                            }
                        }
                    },
                )
                .boxed_local()
            }
            // No body (e.g. a 304 or a HEAD).
            _ => futures_util::stream::empty().boxed_local(),
        };
        out.body(body).map_err(other)
    }
}
