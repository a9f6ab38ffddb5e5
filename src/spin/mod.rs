//! The Spin host: pullgate as a Spin HTTP component (`spin up`, SpinKube, Fermyon Cloud). It
//! reads the configuration from the Spin variable `pullgate_config` (the same TOML as the
//! native host's file), builds the ports — [`SpinKv`] over the key-value store `default`,
//! [`S3BlobStore`] over an S3-compatible bucket when `pullgate_s3_endpoint` is set, otherwise
//! [`KvBlobStore`] in the key-value store, [`SpinUpstream`] over outbound HTTP, [`WasiClock`] and
//! [`SpinDeferred`] — and hands every request to [`App::handle_with_body`]. This module is the
//! only place that names `spin_sdk`; it decides nothing about registries or caching.
//!
//! The component targets the world in `wit/world.wit`: it exports
//! `wasi:http/incoming-handler@0.2.0` and imports WASI 0.2, `wasi:http/outgoing-handler`,
//! `fermyon:spin/key-value@2.0.0` and `fermyon:spin/variables@2.0.0` — all provided by Spin 3.0
//! and later (spin-sdk 5; spin-sdk 7 would need a Spin that runs WASIp3 handlers).
//!
//! Variables (declared in `spin.toml`): `pullgate_config` (TOML; empty for the defaults),
//! `pullgate_kv_blob_max_size` (largest blob kept in the key-value store, default `64MiB`),
//! the S3 blob store's `pullgate_s3_endpoint`, `pullgate_s3_bucket`, `pullgate_s3_region`,
//! `pullgate_s3_url_style`, `pullgate_s3_access_key_id` and `pullgate_s3_secret_access_key`
//! (the last two secret), and one variable per secret. A secret reference in the configuration is `variable:name`
//! (the Spin variable `name`) or `env:NAME` (the Spin variable `name`, lowercased, so one
//! configuration works on every host); mark those variables `secret = true`.
//!
//! Each request runs on [`reactor::block_on`]; work the core defers (a blob fill whose client
//! left, an outbox pass) runs in the same handler call after the response is complete, and the
//! handler returns when it is done.
//!
//! Spin runs one request per component instance and drops the instance afterwards, so what
//! must outlive a request is kept in the key-value store: rate-limit buckets
//! ([`SpinRateLimits`]), upstream bearer tokens ([`SpinTokens`]) and fill leases
//! ([`SpinFills`]: a second cold pull of a blob waits for the first one's commit instead of
//! fetching again). Each module documents how exact it is under concurrency.
//!
//! # Limitations
//! - The core's in-memory state lives for one request: login-failure counters start empty on
//!   every request (lockouts do not hold across requests), and `/metrics` shows only the
//!   request that reads it. Rate limits, tokens and fill coalescing go through the key-value
//!   store (above), best effort under concurrency: no compare-and-swap.
//! - Password verification (argon2) runs inline ([`InlineOffload`]): a component instance has
//!   no threads, and it serves one request anyway.
//! - No timers and no background tasks: deferred work finishes before the handler returns
//!   (within Spin's request timeout, if one is set); gateway retries happen when a later
//!   request finds the outbox idle (`pump_if_idle`) or on `POST /chain/outbox/pump` with the
//!   gateway's admin token, from an external scheduler (a Kubernetes CronJob, a `spin-cron`
//!   component, any cron with `curl`): Spin has no timers of its own.
//! - Without an S3 endpoint, blobs live in the key-value store, chunked, up to
//!   `pullgate_kv_blob_max_size` each; larger ones are verified and streamed through, not
//!   cached (see [`blobs`]). With one, every blob goes to the bucket (see
//!   [`crate::stores::s3`]). Either way there is no eviction and `max_size` is ignored.
//! - `list` reads every key of the store (Spin has no prefix scan), so admin listings cost
//!   O(keys).
//! - `ca_file` (`[[upstream]]`, `[[helm]]`, `[[target]]`) is refused when the configuration
//!   loads: outbound HTTP goes through the Spin runtime, which trusts only its own roots.
//! - `listen`, `data_dir` and `audit_log` are ignored. The client address for network rules is
//!   Spin's `spin-client-addr` header.

pub mod blobs;
pub mod kv;
pub mod leases;
pub mod limits;
pub mod outbound;
pub mod reactor;
pub mod tokens;

pub use crate::stores::s3::{S3BlobStore, S3Settings};
pub use blobs::KvBlobStore;
pub use kv::SpinKv;
pub use leases::SpinFills;
pub use limits::SpinRateLimits;
pub use outbound::SpinUpstream;
pub use reactor::SpinDeferred;
pub use tokens::SpinTokens;

use crate::core::access::ClientAddr;
use crate::core::app::App;
use crate::core::body::{AccessLog, Body, RequestInfo};
use crate::core::config::{self, parse_size, ConfigError, Secret, SecretResolver};
use crate::core::error::RegistryError;
use crate::core::http::error_response;
use crate::core::ports::{BlobStore, ByteStream, Clock, InlineOffload, Ports};
use futures_util::StreamExt;
use spin_sdk::http::{IncomingRequest, ResponseOutparam};
use spin_sdk::key_value::Store;
use spin_sdk::wit::wasi::http0_2_0::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingResponse,
};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// The variable holding the configuration TOML.
pub const CONFIG_VAR: &str = "pullgate_config";
/// The variable holding the largest blob size kept in the key-value store.
pub const KV_BLOB_MAX_VAR: &str = "pullgate_kv_blob_max_size";
/// Default of [`KV_BLOB_MAX_VAR`].
pub const DEFAULT_KV_BLOB_MAX: &str = "64MiB";
/// The S3 endpoint URL; set, it makes [`S3BlobStore`] the blob store (unset: [`KvBlobStore`]).
pub const S3_ENDPOINT_VAR: &str = "pullgate_s3_endpoint";
/// The S3 bucket.
pub const S3_BUCKET_VAR: &str = "pullgate_s3_bucket";
/// The S3 region (default `us-east-1`; `auto` on R2).
pub const S3_REGION_VAR: &str = "pullgate_s3_region";
/// `path` (default) or `virtual-host`.
pub const S3_URL_STYLE_VAR: &str = "pullgate_s3_url_style";
/// The S3 access key id (a secret variable).
pub const S3_ACCESS_KEY_ID_VAR: &str = "pullgate_s3_access_key_id";
/// The S3 secret access key (a secret variable).
pub const S3_SECRET_ACCESS_KEY_VAR: &str = "pullgate_s3_secret_access_key";
/// The key-value store (`key_value_stores` in `spin.toml`).
pub const KV_STORE: &str = "default";
/// The header Spin puts the client's address in.
pub const CLIENT_ADDR_HEADER: &str = "spin-client-addr";

thread_local! {
    /// The core of this instance, and its blob store (for the end-of-request cleanup).
    static APP: RefCell<Option<(App, Option<Rc<KvBlobStore>>)>> = const { RefCell::new(None) };
}

/// Reads a Spin variable; `Ok(None)` when it is not defined or empty.
fn variable(name: &str) -> Result<Option<String>, ConfigError> {
    match spin_sdk::variables::get(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(spin_sdk::variables::Error::Undefined(_)) => Ok(None),
        Err(e) => Err(ConfigError(format!("Spin variable {name}: {e}"))),
    }
}

/// Resolves `variable:name` and `env:NAME` to the Spin variable `name`.
pub struct SpinSecrets;

impl SecretResolver for SpinSecrets {
    fn resolve(&self, reference: &str) -> Result<Secret, ConfigError> {
        let name = if let Some(n) = reference.strip_prefix("variable:") {
            n.to_string()
        } else if let Some(n) = reference.strip_prefix("env:") {
            n.to_ascii_lowercase()
        } else {
            return Err(ConfigError(format!(
                "secret reference {reference:?}: the Spin host reads variable:name (or env:NAME)"
            )));
        };
        variable(&name)?.map(Secret::new).ok_or_else(|| {
            ConfigError(format!(
                "secret {name} (a secret reference) is not set: declare it in spin.toml's \
                 [variables] and [component.pullgate.variables] and give it a value"
            ))
        })
    }
}

/// Wall-clock time from `wasi:clocks/wall-clock`.
pub struct WasiClock;

impl Clock for WasiClock {
    fn now_ms(&self) -> u64 {
        let now = wasi::clocks::wall_clock::now();
        now.seconds * 1000 + u64::from(now.nanoseconds / 1_000_000)
    }
}

/// Reads a variable, or `default` when it is unset or empty.
fn variable_or(name: &str, default: &str) -> Result<String, String> {
    Ok(variable(name)
        .map_err(|e| e.to_string())?
        .unwrap_or_else(|| default.into()))
}

/// The S3 settings from the `pullgate_s3_*` variables; None when no endpoint is set.
fn s3_settings() -> Result<Option<S3Settings>, String> {
    let Some(endpoint) = variable(S3_ENDPOINT_VAR).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let required = |name: &str| -> Result<String, String> {
        variable(name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{name} must be set when {S3_ENDPOINT_VAR} is"))
    };
    let path_style = match variable_or(S3_URL_STYLE_VAR, "path")?.as_str() {
        "path" => true,
        "virtual-host" => false,
        other => {
            return Err(format!(
                "{S3_URL_STYLE_VAR}: {other:?} is neither \"path\" nor \"virtual-host\""
            ))
        }
    };
    Ok(Some(S3Settings {
        endpoint: endpoint.trim().to_string(),
        bucket: required(S3_BUCKET_VAR)?,
        region: variable_or(S3_REGION_VAR, "us-east-1")?,
        access_key_id: required(S3_ACCESS_KEY_ID_VAR)?,
        secret_access_key: required(S3_SECRET_ACCESS_KEY_VAR)?,
        path_style,
    }))
}

/// Builds the core from the variables and the key-value store.
fn build_app() -> Result<(App, Option<Rc<KvBlobStore>>), String> {
    let text = variable(CONFIG_VAR).map_err(|e| e.to_string())?;
    let (_, settings) =
        config::load(CONFIG_VAR, text.as_deref(), &[], &SpinSecrets).map_err(|e| e.to_string())?;
    settings
        .refuse_ca_files()
        .map_err(|e| format!("{CONFIG_VAR}: {e}"))?;
    let store = Rc::new(
        Store::open(KV_STORE)
            .map_err(|e| format!("key-value store {KV_STORE:?} (key_value_stores): {e}"))?,
    );
    let timeout = Duration::from_millis(settings.upstream_timeout_ms);
    let clock: Rc<dyn Clock> = Rc::new(WasiClock);
    let (blobs, kv_blobs): (Rc<dyn BlobStore>, _) = match s3_settings()? {
        Some(s3) => {
            let blobs = S3BlobStore::new(&s3, Rc::new(SpinUpstream::new(timeout)), clock.clone())
                .map_err(|e| format!("{S3_ENDPOINT_VAR}: {e}"))?;
            (Rc::new(blobs), None)
        }
        None => {
            let max_blob = variable_or(KV_BLOB_MAX_VAR, DEFAULT_KV_BLOB_MAX)?;
            let max_blob = parse_size(&max_blob).map_err(|e| format!("{KV_BLOB_MAX_VAR}: {e}"))?;
            let blobs = Rc::new(KvBlobStore::new(store.clone(), max_blob));
            (blobs.clone(), Some(blobs))
        }
    };
    let fills = SpinFills::new(
        store.clone(),
        blobs.clone(),
        clock.clone(),
        settings.upstream_timeout_ms,
    );
    let ports = Ports {
        upstream: Rc::new(SpinUpstream::new(timeout)),
        kv: Rc::new(SpinKv::new(store.clone())),
        blobs,
        clock,
        deferred: Rc::new(SpinDeferred),
        offload: Rc::new(InlineOffload),
    };
    // Shared through the key-value store, as each request is a fresh instance: rate-limit
    // buckets, upstream tokens and fill leases.
    let app = App::new(settings, ports)
        .with_rate_limits(Rc::new(SpinRateLimits::new(store.clone())))
        .with_token_store(Rc::new(SpinTokens::new(store.clone())))
        .with_fill_coordinator(Rc::new(fills));
    Ok((app, kv_blobs))
}

/// The instance's core, built on first use.
fn app() -> Result<(App, Option<Rc<KvBlobStore>>), String> {
    if let Some(app) = APP.with(|a| a.borrow().clone()) {
        return Ok(app);
    }
    let app = build_app()?;
    APP.with(|a| *a.borrow_mut() = Some(app.clone()));
    Ok(app)
}

fn method(m: &Method) -> ::http::Method {
    match m {
        Method::Get => ::http::Method::GET,
        Method::Head => ::http::Method::HEAD,
        Method::Post => ::http::Method::POST,
        Method::Put => ::http::Method::PUT,
        Method::Delete => ::http::Method::DELETE,
        Method::Patch => ::http::Method::PATCH,
        Method::Options => ::http::Method::OPTIONS,
        Method::Connect => ::http::Method::CONNECT,
        Method::Trace => ::http::Method::TRACE,
        Method::Other(o) => ::http::Method::from_bytes(o.as_bytes()).unwrap_or_default(),
    }
}

/// The request as the core sees it (method, path and query, headers, client address) and its
/// body as a stream.
fn to_http(req: IncomingRequest) -> Result<(::http::Request<()>, ByteStream), String> {
    let path = req.path_with_query().unwrap_or_else(|| "/".into());
    let mut builder = ::http::Request::builder()
        .method(method(&req.method()))
        .uri(path);
    let mut client = None;
    let mut has_host = false;
    for (name, value) in req.headers().entries() {
        has_host |= name.eq_ignore_ascii_case("host");
        if name.eq_ignore_ascii_case(CLIENT_ADDR_HEADER) {
            client = std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse::<std::net::SocketAddr>().ok())
                .map(|a| a.ip());
        }
        builder = builder.header(name, value);
    }
    // wasi:http hands the `Host` header over as the request's authority (wasmtime treats
    // `host` as a forbidden header), and the core derives the token realm from `Host`.
    if !has_host {
        if let Some(authority) = req.authority() {
            builder = builder.header(::http::header::HOST, authority);
        }
    }
    let mut request = builder.body(()).map_err(|e| e.to_string())?;
    if let Some(ip) = client {
        request.extensions_mut().insert(ClientAddr(ip));
    }
    let body = match req.consume() {
        Ok(body) => match body.stream() {
            Ok(stream) => outbound::input_stream(
                stream,
                RequestBody {
                    _body: body,
                    _request: req,
                },
            ),
            Err(()) => futures_util::stream::empty().boxed_local(),
        },
        Err(()) => futures_util::stream::empty().boxed_local(),
    };
    Ok((request, body))
}

/// An incoming request's body and the request, dropped in that order (held, never read).
struct RequestBody {
    _body: IncomingBody,
    _request: IncomingRequest,
}

fn log_line(method: &str, path: &str, status: u16, info: Option<&RequestInfo>) -> String {
    AccessLog {
        method,
        path,
        status,
        info,
        ..Default::default()
    }
    .line()
}

/// Sends the core's response: headers, then the body streamed into the runtime. A body stream
/// that fails (a digest mismatch) drops the outgoing body unfinished, which the runtime turns
/// into an aborted response, so a client never takes a short body for a whole one.
async fn respond(out: ResponseOutparam, resp: ::http::Response<Body>, head: bool, line: String) {
    let (parts, body) = resp.into_parts();
    let headers = Fields::new();
    for (name, value) in &parts.headers {
        if let Err(e) = headers.append(name.as_str(), value.as_bytes()) {
            eprintln!("{line} dropped_header={name} reason={e:?}");
        }
    }
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(parts.status.as_u16());
    let Ok(outgoing) = response.body() else {
        eprintln!("{line} error=\"response body taken\"");
        return;
    };
    spin_sdk::wit::wasi::http0_2_0::types::ResponseOutparam::set(out.into_inner(), Ok(response));
    let result = match body {
        Body::Empty => Ok(()),
        Body::Bytes(b) => write_body(&outgoing, futures_util::stream::iter([Ok(b)]).boxed_local())
            .await
            .map_err(|e| format!("{e:?}")),
        Body::Stream(s) => write_body(&outgoing, s).await,
        Body::Host(_) => Err("unknown host body".to_string()),
    };
    match result {
        Ok(()) => match OutgoingBody::finish(outgoing, None) {
            // A HEAD response announces a Content-Length its empty body cannot match; the
            // runtime says so, but the client got what it asked for.
            Ok(()) | Err(ErrorCode::HttpResponseBodySize(_)) if head => eprintln!("{line}"),
            Ok(()) => eprintln!("{line}"),
            Err(e) => eprintln!("{line} aborted=true error={:?}", format!("{e:?}")),
        },
        Err(e) => {
            drop(outgoing);
            eprintln!("{line} aborted=true error={e:?}");
        }
    }
}

async fn write_body(outgoing: &OutgoingBody, mut body: ByteStream) -> Result<(), String> {
    let stream = outgoing
        .write()
        .map_err(|()| "response body stream taken".to_string())?;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.0)?;
        outbound::write_all(&stream, &chunk)
            .await
            .map_err(|e| format!("client went away: {e:?}"))?;
    }
    Ok(())
}

async fn serve(req: IncomingRequest, out: ResponseOutparam) {
    let (request, body) = match to_http(req) {
        Ok(r) => r,
        Err(e) => {
            let resp = error_response(&RegistryError::Internal(e.clone()), false);
            respond(out, resp, false, format!("error={e:?}")).await;
            return;
        }
    };
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let head = request.method() == ::http::Method::HEAD;
    let (app, blobs) = match app() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pullgate cannot start: {e}");
            let resp = error_response(
                &RegistryError::Internal("pullgate is misconfigured; see the component log".into()),
                head,
            );
            let line = log_line(&method, &path, resp.status().as_u16(), None);
            respond(out, resp, head, line).await;
            return;
        }
    };
    reactor::run_with_deferred(async {
        let resp = app.handle_with_body(&request, body).await;
        let info = resp.extensions().get::<RequestInfo>().cloned();
        let line = log_line(&method, &path, resp.status().as_u16(), info.as_ref());
        respond(out, resp, head, line).await;
    })
    .await;
    if let Some(blobs) = blobs {
        blobs.end_request();
    }
}

/// The component's `wasi:http/incoming-handler` export.
#[spin_sdk::http_component]
fn handle(req: IncomingRequest, out: ResponseOutparam) {
    if reactor::block_on(serve(req, out)).is_err() {
        eprintln!("pullgate: request stalled (a future waited on nothing)");
    }
}
