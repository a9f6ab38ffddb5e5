//! HTTP on Spin: [`SpinUpstream`] (the upstream port over `wasi:http/outgoing-handler`), the
//! request body as a core stream, and writing a core body into the response.
//!
//! The upstream port never follows redirects (`wasi:http` does not; the core follows them
//! itself, without `Authorization`). Timeouts are the upstream timeout, handed to the runtime
//! as the request's connect, first-byte and between-bytes timeouts. Every outbound host —
//! upstreams, token realms, redirect CDNs and buckets, S3 endpoints, gateway targets — must be
//! listed in `allowed_outbound_hosts` in `spin.toml`; Spin refuses the others
//! (`HTTP-request-denied`), which the port reports as a connection error.
//!
//! # Limitations
//! - The outbound address policy (`core::outbound`) is checked by the core on what it can
//!   see: a URL the upstream chose (redirect, token realm, chart URL) whose host is a refused
//!   literal address (loopback, link-local, private, unique-local, metadata, …) or an
//!   internal-by-definition name (`localhost`, `metadata.google.internal`) is refused before
//!   it is sent. Names are resolved by the Spin runtime, which this component cannot
//!   observe, so the `ChosenByUpstream` marker on such requests is ignored here: a public
//!   name that resolves to an internal address is not caught. `allowed_outbound_hosts` is
//!   the backstop — list exact hosts there, not wildcards.

use crate::core::ports::{BodyError, ByteStream, Upstream, UpstreamError};
use crate::spin::reactor::ready;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use spin_sdk::wit::wasi::http0_2_0::outgoing_handler;
use spin_sdk::wit::wasi::http0_2_0::types::{
    ErrorCode, Fields, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    RequestOptions, Scheme,
};
use std::time::Duration;
use wasi::io::streams::{InputStream, OutputStream, StreamError};

/// Largest read from an input stream.
const READ_SIZE: u64 = 64 * 1024;

/// The upstream port over Spin's outbound HTTP.
pub struct SpinUpstream {
    timeout: Duration,
}

impl SpinUpstream {
    /// A client with the given timeout (connect, first byte, between bytes).
    pub fn new(timeout: Duration) -> SpinUpstream {
        SpinUpstream { timeout }
    }
}

fn other(e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Other(e.to_string())
}

fn method(m: &http::Method) -> Method {
    match *m {
        http::Method::GET => Method::Get,
        http::Method::HEAD => Method::Head,
        http::Method::POST => Method::Post,
        http::Method::PUT => Method::Put,
        http::Method::DELETE => Method::Delete,
        http::Method::PATCH => Method::Patch,
        http::Method::OPTIONS => Method::Options,
        _ => Method::Other(m.as_str().to_string()),
    }
}

/// Maps a runtime error to the port's error kinds.
fn upstream_error(e: ErrorCode) -> UpstreamError {
    let text = format!("{e:?}");
    match e {
        ErrorCode::ConnectionTimeout | ErrorCode::ConnectionReadTimeout => {
            UpstreamError::Timeout(text)
        }
        ErrorCode::DnsTimeout
        | ErrorCode::DnsError(_)
        | ErrorCode::DestinationNotFound
        | ErrorCode::DestinationUnavailable
        | ErrorCode::DestinationIpProhibited
        | ErrorCode::DestinationIpUnroutable
        | ErrorCode::ConnectionRefused
        | ErrorCode::ConnectionTerminated
        | ErrorCode::TlsProtocolError
        | ErrorCode::TlsCertificateError
        | ErrorCode::TlsAlertReceived(_)
        | ErrorCode::HttpRequestDenied => UpstreamError::Connect(text),
        _ => UpstreamError::Other(text),
    }
}

/// Writes all of `data` to `stream`, waiting while the runtime's buffer is full.
pub(crate) async fn write_all(stream: &OutputStream, mut data: &[u8]) -> Result<(), StreamError> {
    while !data.is_empty() {
        let permit = stream.check_write()?;
        if permit == 0 {
            ready(stream.subscribe()).await;
            continue;
        }
        let n = usize::try_from(permit)
            .unwrap_or(usize::MAX)
            .min(data.len());
        stream.write(&data[..n])?;
        data = &data[n..];
    }
    // Wait for the flush, so a body finished next has really been handed over. A stream the
    // runtime closed after taking every byte (a response whose Content-Length is now
    // complete) is not an error: the bytes were accepted.
    match stream.flush() {
        Ok(()) => {}
        Err(StreamError::Closed) => return Ok(()),
        Err(e) => return Err(e),
    }
    loop {
        match stream.check_write() {
            Ok(0) => ready(stream.subscribe()).await,
            Ok(_) | Err(StreamError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Reads an input stream to its end as a core stream. `owner` holds the resource the stream
/// belongs to (an incoming body, and the response it came from) and is dropped after it.
pub(crate) fn input_stream<O: 'static>(stream: InputStream, owner: O) -> ByteStream {
    struct Reading<O> {
        // Declared first: dropped before its parent resource.
        stream: InputStream,
        _owner: O,
    }
    futures_util::stream::unfold(
        Some(Reading {
            stream,
            _owner: owner,
        }),
        |state| async move {
            let reading = state?;
            loop {
                match reading.stream.read(READ_SIZE) {
                    Ok(chunk) if chunk.is_empty() => ready(reading.stream.subscribe()).await,
                    Ok(chunk) => return Some((Ok(Bytes::from(chunk)), Some(reading))),
                    Err(StreamError::Closed) => return None,
                    Err(StreamError::LastOperationFailed(e)) => {
                        return Some((Err(BodyError(e.to_debug_string())), None))
                    }
                }
            }
        },
    )
    .boxed_local()
}

/// An incoming body and the response it belongs to, dropped in that order.
struct BodyOwner {
    _body: IncomingBody,
    _response: IncomingResponse,
}

#[async_trait::async_trait(?Send)]
impl Upstream for SpinUpstream {
    async fn send(&self, request: Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> {
        let (parts, body) = request.into_parts();
        let headers = Fields::new();
        for (name, value) in &parts.headers {
            headers
                .append(name.as_str(), value.as_bytes())
                .map_err(|e| other(format!("header {name}: {e:?}")))?;
        }
        let out = OutgoingRequest::new(headers);
        out.set_method(&method(&parts.method))
            .map_err(|()| other("method refused"))?;
        let scheme = match parts.uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            s => return Err(other(format!("unsupported scheme {s:?}"))),
        };
        out.set_scheme(Some(&scheme))
            .map_err(|()| other("scheme refused"))?;
        let authority = parts
            .uri
            .authority()
            .ok_or_else(|| other("request URL has no host"))?;
        out.set_authority(Some(authority.as_str()))
            .map_err(|()| other("authority refused"))?;
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        out.set_path_with_query(Some(path))
            .map_err(|()| other("path refused"))?;

        let options = RequestOptions::new();
        let nanos = u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX);
        // A runtime that does not support a timeout refuses to set it; the request still goes.
        let _ = options.set_connect_timeout(Some(nanos));
        let _ = options.set_first_byte_timeout(Some(nanos));
        let _ = options.set_between_bytes_timeout(Some(nanos));

        let outgoing_body = out.body().map_err(|()| other("request body taken"))?;
        let future = outgoing_handler::handle(out, Some(options)).map_err(upstream_error)?;
        {
            let stream = outgoing_body
                .write()
                .map_err(|()| other("request body stream taken"))?;
            if !body.is_empty() {
                write_all(&stream, &body)
                    .await
                    .map_err(|e| other(format!("request body: {e:?}")))?;
            }
        }
        OutgoingBody::finish(outgoing_body, None).map_err(upstream_error)?;

        let incoming = loop {
            match future.get() {
                Some(Ok(Ok(resp))) => break resp,
                Some(Ok(Err(e))) => return Err(upstream_error(e)),
                Some(Err(())) => return Err(other("response already taken")),
                None => ready(future.subscribe()).await,
            }
        };
        drop(future);

        let mut builder = Response::builder().status(incoming.status());
        for (name, value) in incoming.headers().entries() {
            builder = builder.header(name, value);
        }
        let body = incoming
            .consume()
            .map_err(|()| other("response body taken"))?;
        let stream = body.stream().map_err(|()| other("response body stream"))?;
        let body = input_stream(
            stream,
            BodyOwner {
                _body: body,
                _response: incoming,
            },
        );
        builder.body(body).map_err(other)
    }
}
