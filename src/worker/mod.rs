//! The Cloudflare Workers host: the `fetch` handler of the worker. It reads the configuration
//! from the `PULLGATE_CONFIG` variable (the same TOML as the native host's file), builds the
//! ports from the worker's bindings — [`WorkerKv`] over the KV namespace `PULLGATE_KV`,
//! [`R2BlobStore`] over the R2 bucket `PULLGATE_R2`, [`FetchUpstream`], [`DateClock`] and
//! [`WaitUntil`] — and hands every request to [`App::handle_with_body`]. This module and its
//! adapters are the only place that names the `worker` crate; they decide nothing about
//! registries or caching.
//!
//! One [`App`] lives per isolate, built on the first request, so requests that an isolate
//! serves at the same time share its blob fills and its token cache. A secret reference
//! `env:NAME` in the configuration names a Worker secret (`wrangler secret put NAME`) or a
//! plain variable.
//!
//! Responses: a warm blob is R2's own stream ([`r2::R2Body`]), handed to the runtime
//! untouched; a streamed body of known length goes through a `FixedLengthStream`, so every blob
//! response carries `Content-Length` (responses built from a plain stream would be chunked).
//! A stream that fails mid-body (a digest mismatch) errors the response stream, and the
//! runtime resets the client connection.
//!
//! Every request's futures and streams run [`Gated`]: only in that request's own I/O context,
//! as workerd requires (see `gate.rs`).
//!
//! The worker also has a `scheduled` handler ([`cron`]): the Cron Trigger in `wrangler.toml`
//! runs the gateway's outbox pump with no request needed; and a `queue` handler ([`queue`]):
//! with the `PULLGATE_OUTBOX` producer binding, deliveries go through Cloudflare Queues
//! (retry delays, a dead-letter queue) and the pump is their fallback. With the
//! `PULLGATE_RECORDS` Durable Object binding, the gateway's runs and dedup records live in
//! one Durable Object ([`runs`]) instead of KV. With `PULLGATE_FLIGHTS`, concurrent cold
//! misses of one blob share one upstream transfer across isolates ([`flight`], one Durable
//! Object per digest). With `PULLGATE_TAGS`, a burst of requests for a stale or missing tag
//! makes one upstream request across isolates ([`tagflight`]); with `PULLGATE_LIMITS`,
//! `[rate_limit]` buckets are exact across isolates ([`limits`]). Reads of R2 go through this
//! location's colo tier ([`colo`], the Cache API) inside the storage adapters; a hit whose
//! content it served is logged `cache=edge-hit` and counted in `pullgate_edge_hits_total`.
//!
//! # Limitations
//! - Without the `PULLGATE_FLIGHTS` binding, coalescing is per isolate: concurrent cold misses
//!   for one blob in the same isolate share one upstream transfer; isolates (and locations)
//!   each fetch their own copy until one of them has committed the blob to R2.
//! - Deferred work (a fill whose first client left) runs under `waitUntil`, which the runtime
//!   cuts 30 s after the response ended; such a fill is then lost and the next miss restarts it.
//! - Tag records are in KV, which is eventually consistent (a new record can take up to 60 s to
//!   reach other locations), so locations may revalidate a tag independently — unless the
//!   `PULLGATE_TAGS` binding coordinates them ([`tagflight`]).
//! - `max_size` is not enforced: size R2 with an object lifecycle rule. `listen` and `data_dir`
//!   are ignored. Metrics are per isolate.
//! - The client address the core sees (network allowlists, rate limits) is `CF-Connecting-IP`;
//!   login-failure lockouts are per isolate, and so are rate-limit counters without the
//!   `PULLGATE_LIMITS` binding (an attacker spread over isolates and locations gets more
//!   attempts); with it they are exact ([`limits`]).
//! - `ca_file` (`[[upstream]]`, `[[helm]]`, `[[target]]`) is refused when the configuration
//!   loads: `fetch` trusts only Cloudflare's public roots, so a private CA cannot be added.
//! - Password verification (argon2) runs inline ([`InlineOffload`]): an isolate has no threads,
//!   so a check holds the isolate's CPU for its duration and counts against the request's CPU
//!   limit. Robots should use static tokens or pullgate's Bearer tokens on hot paths.

pub mod colo;
pub mod cron;
pub mod fetch;
pub mod fill;
pub mod flight;
pub mod gate;
pub mod kv;
pub mod limits;
pub mod queue;
pub mod r2;
pub mod runs;
pub mod tagflight;

pub use colo::ColoCache;
pub use fetch::FetchUpstream;
pub use gate::Gated;
pub use kv::WorkerKv;
pub use r2::R2BlobStore;

use crate::core::access::ClientAddr;
use crate::core::app::App;
use crate::core::body::{AccessLog, Body, CacheStatus, RequestInfo};
use crate::core::config::{self, ConfigError, Secret, SecretResolver};
use crate::core::error::RegistryError;
use crate::core::http::error_response;
use crate::core::metrics::{inc, Metrics};
use crate::core::ports::{BodyError, ByteStream, Clock, Deferred, InlineOffload, Ports};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use worker::{event, Context, Env, FixedLengthStream, Headers, ResponseBuilder};

/// The variable holding the configuration TOML.
pub const CONFIG_VAR: &str = "PULLGATE_CONFIG";
/// The KV namespace binding (tag records, tag lists).
pub const KV_BINDING: &str = "PULLGATE_KV";
/// The R2 bucket binding (blobs and manifests by digest).
pub const R2_BINDING: &str = "PULLGATE_R2";
/// The header in which Cloudflare's edge passes the client's address.
pub const CLIENT_IP_HEADER: &str = "cf-connecting-ip";

thread_local! {
    /// The core of this isolate.
    static APP: RefCell<Option<App>> = const { RefCell::new(None) };
    /// The request (or event) whose future is being polled right now (see [`WithRequest`]).
    static CURRENT: RefCell<Option<(u64, Keeper)>> = const { RefCell::new(None) };
    /// Request numbers, the owners of [`Gated`] work.
    static NEXT_REQUEST: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Resolves `env:NAME` to the Worker secret or variable `NAME`.
pub struct WorkerSecrets<'a> {
    env: &'a Env,
}

impl SecretResolver for WorkerSecrets<'_> {
    fn resolve(&self, reference: &str) -> Result<Secret, ConfigError> {
        let name = reference.strip_prefix("env:").ok_or_else(|| {
            ConfigError(format!(
                "secret reference {reference:?}: the Workers host reads env:NAME (a secret or variable)"
            ))
        })?;
        if let Ok(s) = self.env.secret(name) {
            return Ok(Secret::new(s.to_string()));
        }
        self.env
            .var(name)
            .map(|v| Secret::new(v.to_string()))
            .map_err(|_| {
                ConfigError(format!(
                    "secret {name} (a secret reference) is not set: wrangler secret put {name}"
                ))
            })
    }
}

/// Wall-clock time from `Date.now()` (the runtime advances it at I/O).
pub struct DateClock;

impl Clock for DateClock {
    fn now_ms(&self) -> u64 {
        worker::js_sys::Date::now() as u64
    }
}

/// What keeps an invocation's deferred work alive: the `waitUntil` of a `fetch` request or of
/// a `scheduled` event.
#[derive(Clone)]
pub(crate) enum Keeper {
    /// A `fetch` request's context, and the origin (`scheme://host`) it was sent to.
    Fetch(Rc<Context>, Rc<str>),
    /// A Cron Trigger's context.
    Scheduled(Rc<worker::ScheduleContext>),
    /// A queue consumer's context (the gateway's outbox, see [`queue`]).
    Queue(Rc<Context>),
}

impl Keeper {
    fn wait_until(&self, work: impl Future<Output = ()> + 'static) {
        match self {
            Keeper::Fetch(ctx, _) => ctx.wait_until(work),
            Keeper::Scheduled(ctx) => ctx.wait_until(work),
            Keeper::Queue(ctx) => ctx.wait_until(work),
        }
    }
}

/// A fresh invocation number (the owner of [`Gated`] work).
pub(crate) fn next_invocation() -> u64 {
    NEXT_REQUEST.with(|n| {
        let id = n.get();
        n.set(id.wrapping_add(1));
        id
    })
}

/// The number of the invocation whose code runs right now, if any.
pub(crate) fn current_invocation() -> Option<u64> {
    CURRENT.with(|c| c.borrow().as_ref().map(|(id, _)| *id))
}

/// The origin the current `fetch` request was sent to; None outside one (Cron Triggers).
pub(crate) fn current_origin() -> Option<Rc<str>> {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some((_, Keeper::Fetch(_, origin))) => Some(origin.clone()),
        _ => None,
    })
}

/// Deferred work through `waitUntil` of the invocation that started it, so the runtime keeps
/// the isolate alive for it after the response (within the platform's 30 s budget). Work
/// spawned from deferred work (a blob fill that, once committed, copies the blob into the
/// colo cache) joins the same invocation's `waitUntil`.
pub struct WaitUntil;

impl Deferred for WaitUntil {
    fn spawn(&self, work: LocalBoxFuture<'static, ()>) {
        match CURRENT.with(|c| c.borrow().clone()) {
            Some((id, keeper)) => keeper.clone().wait_until(WithRequest {
                id,
                ctx: keeper,
                inner: Box::pin(Gated::new(id, work)),
            }),
            // Not inside an invocation (never expected): still run it.
            None => worker::wasm_bindgen_futures::spawn_local(work),
        }
    }
}

/// An invocation's future, with [`CURRENT`] naming that invocation while it is polled: the
/// core spawns deferred work synchronously inside `handle`, so [`WaitUntil`] finds the request
/// that started the work even when several requests interleave in one isolate.
/// The inner future is [`Gated`], so it is only ever polled in its own invocation's context.
pub(crate) struct WithRequest<F> {
    pub(crate) id: u64,
    pub(crate) ctx: Keeper,
    pub(crate) inner: Pin<Box<Gated<F>>>,
}

impl<F: Future> Future for WithRequest<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let current = (self.id, self.ctx.clone());
        let previous = CURRENT.with(|c| c.replace(Some(current)));
        let out = self.inner.as_mut().poll(cx);
        CURRENT.with(|c| *c.borrow_mut() = previous);
        out
    }
}

/// Builds the core from the configuration and bindings.
fn build_app(env: &Env) -> Result<App, String> {
    let text = env.var(CONFIG_VAR).ok().map(|t| t.to_string());
    let (_, settings) = config::load(CONFIG_VAR, text.as_deref(), &[], &WorkerSecrets { env })
        .map_err(|e| e.to_string())?;
    settings
        .refuse_ca_files()
        .map_err(|e| format!("{CONFIG_VAR}: {e}"))?;
    install_logging(&settings.log)?;
    let kv = env
        .kv(KV_BINDING)
        .map_err(|e| format!("KV namespace binding {KV_BINDING}: {e}"))?;
    let bucket = env
        .bucket(R2_BINDING)
        .map_err(|e| format!("R2 bucket binding {R2_BINDING}: {e}"))?;
    let colo_max = match env
        .var(colo::MAX_BYTES_VAR)
        .or_else(|_| env.secret(colo::MAX_BYTES_VAR))
    {
        Ok(v) => v.to_string().trim().parse::<u64>().map_err(|_| {
            format!(
                "{}: a number of bytes (0 turns the colo tier off)",
                colo::MAX_BYTES_VAR
            )
        })?,
        Err(_) => colo::DEFAULT_MAX_BYTES,
    };
    let tally = Rc::new(colo::Tally::default());
    let colo = Rc::new(ColoCache::new(colo_max, Rc::new(WaitUntil), tally.clone()));
    let ports = Ports {
        upstream: Rc::new(FetchUpstream::new(Duration::from_millis(
            settings.upstream_timeout_ms,
        ))),
        kv: Rc::new(WorkerKv::new(kv, bucket.clone(), colo.clone())),
        blobs: Rc::new(R2BlobStore::new(bucket, colo)),
        clock: Rc::new(DateClock),
        deferred: Rc::new(WaitUntil),
        offload: Rc::new(InlineOffload),
    };
    let blobs = ports.blobs.clone();
    // A tag flight's lease outlives a lead's HEAD and GET (each bounded by the timeout).
    let lease_ms = settings.upstream_timeout_ms.saturating_mul(2);
    let app = runs::attach(queue::attach(App::new(settings, ports), env), env);
    let app = limits::attach(tagflight::attach(app, env, lease_ms), env);
    let app = flight::attach(app, env, blobs);
    tally.attach(app.metrics());
    Ok(app)
}

/// Sends the core's `tracing` events (and the access events) to the console, one line each
/// (`[log] format`: text or JSON, which Workers Logs indexes), filtered by `[log] level`.
fn install_logging(log: &config::LogSettings) -> Result<(), String> {
    let sink: crate::logline::Sink = Box::new(|level, line| match level {
        tracing::Level::ERROR => worker::console_error!("{line}"),
        tracing::Level::WARN => worker::console_warn!("{line}"),
        _ => worker::console_log!("{line}"),
    });
    let now: fn() -> u64 = || worker::js_sys::Date::now() as u64;
    crate::logline::LineSubscriber::new(log, now, sink)
        .map_err(|e| format!("{CONFIG_VAR}: {e}"))?
        .install();
    Ok(())
}

/// The isolate's core, built on first use.
pub(crate) fn app(env: &Env) -> Result<App, String> {
    if flight::isolate_coalescing_off(env) {
        return build_app(env);
    }
    if let Some(app) = APP.with(|a| a.borrow().clone()) {
        return Ok(app);
    }
    let app = build_app(env)?;
    APP.with(|a| *a.borrow_mut() = Some(app.clone()));
    Ok(app)
}

/// The request as the core sees it: method, path and query, headers, and the client address
/// from `CF-Connecting-IP` (set by Cloudflare's edge, which overwrites any value a client
/// sends); the body separately.
fn to_http(req: &worker::Request) -> worker::Result<http::Request<()>> {
    let url = req.url()?;
    let path_and_query = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let mut builder = http::Request::builder()
        .method(req.method().as_ref())
        .uri(path_and_query);
    for (name, value) in req.headers().entries() {
        builder = builder.header(name, value);
    }
    let mut request = builder
        .body(())
        .map_err(|e| worker::Error::RustError(e.to_string()))?;
    let client = req
        .headers()
        .get(CLIENT_IP_HEADER)?
        .and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok());
    if let Some(ip) = client {
        request.extensions_mut().insert(ClientAddr(ip));
    }
    Ok(request)
}

/// The request body as a core stream (read only by routes that take one: webhooks, tokens).
fn body_stream(req: &mut worker::Request) -> ByteStream {
    match req.method() {
        worker::Method::Get | worker::Method::Head => futures_util::stream::empty().boxed_local(),
        _ => match req.stream() {
            Ok(stream) => stream
                .map(|chunk| {
                    chunk
                        .map(bytes::Bytes::from)
                        .map_err(|e| BodyError(format!("request body: {e}")))
                })
                .boxed_local(),
            Err(_) => futures_util::stream::empty().boxed_local(),
        },
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Converts the core's response; logs one line for it. A hit whose content the colo tier
/// served (see [`colo`]) is logged as `cache=edge-hit` and counted in `metrics`.
fn to_worker(
    resp: http::Response<Body>,
    (id, started_ms): (u64, f64),
    method: &str,
    path: &str,
    metrics: Option<&Metrics>,
) -> worker::Result<worker::Response> {
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let mut info = parts.extensions.get::<RequestInfo>().cloned();
    let edge = colo::take_edge_served(id);
    if let Some(i) = info
        .as_mut()
        .filter(|i| edge && i.cache == CacheStatus::Hit)
    {
        i.cache = CacheStatus::EdgeHit;
        if let Some(m) = metrics {
            inc(&m.edge_hits);
        }
    }
    let headers = Headers::new();
    for (name, value) in &parts.headers {
        if let Ok(v) = value.to_str() {
            headers.append(name.as_str(), v)?;
        }
    }
    if let Some(m) = metrics {
        // To the response head: the body streams after this handler returned.
        let seconds = (worker::js_sys::Date::now() - started_ms).max(0.0) / 1000.0;
        let route = info.as_ref().map_or("-", |i| i.route);
        let upstream = info.as_ref().and_then(|i| i.upstream.as_deref());
        m.observe(method, route, upstream, status, seconds);
    }
    let length = content_length(&parts.headers);
    let access = logs_access();
    let builder = ResponseBuilder::new()
        .with_status(status)
        .with_headers(headers);
    let resp = match body {
        Body::Empty => builder.empty(),
        Body::Bytes(b) => builder.fixed(b.to_vec()),
        Body::Host(host) => match host.0.downcast::<r2::R2Body>() {
            Ok(r2) => builder.stream(r2.stream),
            Err(_) => {
                let mut info = info.unwrap_or_else(RequestInfo::none);
                info.error = Some("unknown host body".into());
                log_access(method, path, 500, Some(&info), true);
                return worker::Response::error("unknown host body", 500);
            }
        },
        Body::Stream(stream) => {
            let (m, p, mut i) = (method.to_string(), path.to_string(), info.clone());
            // Gated: a coalesced reader is woken by the fill of another request.
            let chunks = Gated::new(id, stream).map(move |chunk| match chunk {
                Ok(b) => Ok(Vec::from(b)),
                Err(e) => {
                    // Erroring the stream makes the runtime reset the client connection, so
                    // a client never takes a short or unverified body for a whole one.
                    let mut info = i.take().unwrap_or_else(RequestInfo::none);
                    info.error = Some(e.0.clone());
                    log_access(&m, &p, status, Some(&info), true);
                    Err(worker::Error::RustError(e.0))
                }
            });
            match length {
                Some(len) => {
                    let fixed: worker::worker_sys::FixedLengthStream =
                        FixedLengthStream::wrap(chunks, len).into();
                    builder.stream(fixed.readable())
                }
                None => builder.from_stream(chunks)?,
            }
        }
    };
    if access {
        log_access(method, path, status, info.as_ref(), false);
    }
    Ok(resp)
}

/// `[log] access` of the isolate's core (true until it is built).
fn logs_access() -> bool {
    APP.with(|a| {
        a.borrow()
            .as_ref()
            .is_none_or(|app| app.settings().log.access)
    })
}

/// The access event for a response (an aborted body logs a second one, with the error).
fn log_access(method: &str, path: &str, status: u16, info: Option<&RequestInfo>, aborted: bool) {
    AccessLog {
        method,
        path,
        status,
        info,
        aborted,
        ..Default::default()
    }
    .emit();
}

async fn serve(mut req: worker::Request, env: Env, id: u64) -> worker::Result<worker::Response> {
    let started = worker::js_sys::Date::now();
    let request = to_http(&req)?;
    let body = body_stream(&mut req);
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let app = match app(&env) {
        Ok(app) => app,
        Err(e) => {
            worker::console_error!("pullgate cannot start: {e}");
            let resp = error_response(
                &RegistryError::Internal("pullgate is misconfigured; see the worker log".into()),
                request.method() == http::Method::HEAD,
            );
            return to_worker(resp, (id, started), &method, &path, None);
        }
    };
    let resp = app.handle_with_body(&request, body).await;
    to_worker(resp, (id, started), &method, &path, Some(&app.metrics()))
}

/// The worker's `fetch` handler.
#[event(fetch)]
pub async fn main(
    req: worker::Request,
    env: Env,
    ctx: Context,
) -> worker::Result<worker::Response> {
    let id = next_invocation();
    let origin: Rc<str> = req.url()?.origin().ascii_serialization().into();
    WithRequest {
        id,
        ctx: Keeper::Fetch(Rc::new(ctx), origin),
        inner: Box::pin(Gated::new(id, serve(req, env, id))),
    }
    .await
}
