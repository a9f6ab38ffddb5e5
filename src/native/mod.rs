//! The native host: `pullgate serve`. Thread per core ([`workers`]): each worker thread is a
//! tokio current-thread runtime with a `LocalSet` (core futures are `!Send`) and its own core
//! instance, over shared stores and a shared fill registry ([`fills`]); tokio's blocking pool
//! does file and redb I/O; hyper HTTP/1.1 on the listener; reqwest to upstreams; redb + files
//! for storage.
//!
//! This module is the only place that names tokio, hyper, reqwest and redb. It builds the
//! ports, calls [`App::handle`], writes one log line per request, and shuts down gracefully on
//! SIGTERM/SIGINT (`/readyz` turns unready, then stop accepting and let in-flight requests and
//! fills finish, up to `[server] drain`; see [`probes`]).
//! [`listener`] bounds the connections themselves: header and idle timeouts, a connection
//! cap, back-off on failed `accept`s, and a lingering read after an answer that left the
//! request body unread.

// The native host is where time comes from: it may read the system clocks (the core may not).
#![allow(clippy::disallowed_methods)]

mod access_line;
pub mod audit;
pub mod check;
pub mod client;
pub mod connection;
pub mod fills;
mod line_batch;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod offload;
pub mod probes;
pub mod proxy_protocol;
pub mod redb_kv;
pub mod secrets;
pub mod shared;
pub mod store;
pub mod tls;
pub mod warm;
pub mod workers;
pub mod zerocopy;

use crate::core::app::App;
use crate::core::body::{AccessLog, Body, RequestInfo};
use crate::core::config::{self, Settings};
use crate::core::metrics::{add, Metrics};
use crate::core::ports::{BodyError, Clock, Deferred};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::{Stream, StreamExt};
use hyper::body::{Frame, Incoming};
use listener::{ConnState, InFlight, ServerLimits, SharedBody, Tracked};
use std::cell::Cell;
use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./pullgate-data";
/// How often the gateway's outbox is checked for due deliveries.
pub(crate) const PUMP_EVERY: Duration = Duration::from_millis(500);

/// `pullgate serve` options (flags override the config file).
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--upstream HOST=URL`, repeatable.
    pub upstreams: Vec<String>,
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--drain DURATION`: overrides `[server] drain`.
    pub drain: Option<String>,
    /// `--workers N`: serving threads (default: `[server] workers`, else the cores).
    pub workers: Option<usize>,
    /// `--tls-cert FILE`: overrides `[tls] cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key FILE`: overrides `[tls] key`.
    pub tls_key: Option<PathBuf>,
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the host is where wall-clock time comes from
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Deferred work as local tasks; counted so shutdown can wait for them.
pub struct LocalDeferred {
    pub(crate) active: Rc<Cell<usize>>,
}

impl Deferred for LocalDeferred {
    fn spawn(&self, work: LocalBoxFuture<'static, ()>) {
        let active = self.active.clone();
        active.set(active.get() + 1);
        tokio::task::spawn_local(async move {
            work.await;
            active.set(active.get() - 1);
        });
    }
}

/// The ports of one native core instance over the shared stores: its own upstream client
/// (loaded with the configured CA files), the system clock, deferred work on the current
/// `LocalSet` counted in the returned cell (what is still running at shutdown), and `offload`.
pub(crate) fn instance_ports(
    settings: &Settings,
    kv: store::RedbKv,
    blobs: store::FsBlobStore,
    offload: offload::BlockingOffload,
) -> Result<(crate::core::ports::Ports, Rc<Cell<usize>>), String> {
    let upstream =
        client::ReqwestUpstream::new(Duration::from_millis(settings.upstream_timeout_ms))?;
    upstream.load_cas(&client::ca_files(settings))?;
    let active = Rc::new(Cell::new(0usize));
    let ports = crate::core::ports::Ports {
        upstream: Rc::new(upstream),
        kv: Rc::new(kv),
        blobs: Rc::new(blobs),
        clock: Rc::new(SystemClock),
        deferred: Rc::new(LocalDeferred {
            active: active.clone(),
        }),
        offload: Rc::new(offload),
    };
    Ok((ports, active))
}

/// An argon2id PHC hash of `password` with a random salt (`pullgate hash-password`), for an
/// `[[identity]] password_hash`.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use std::io::Read;
    let mut salt = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Everything `serve` resolved before it binds.
pub struct Prepared {
    /// Listen address.
    pub listen: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Core settings.
    pub settings: Settings,
    /// Audit log destination.
    pub audit_log: PathBuf,
    /// `[server]`: listener timeouts and connection cap.
    pub limits: ServerLimits,
    /// `[server] drain`, `unready_delay`, `--drain`: the shutdown timings.
    pub drain: probes::DrainPlan,
    /// Serving threads (`--workers`, `[server] workers`, else the cores).
    pub workers: usize,
    /// `[tls]`, `--tls-cert`, `--tls-key`: TLS on the listener.
    pub tls: Option<tls::TlsFiles>,
    /// `[server] proxy_protocol`.
    pub proxy_protocol: bool,
}

/// `[server] proxy_protocol` with nobody to believe it from: every header would be refused.
pub(crate) const PROXY_PROTOCOL_ALONE: &str =
    "configuration: server.proxy_protocol needs trusted_proxies (the load balancers' addresses)";

/// Reads the config file and flags into settings.
pub fn prepare(opts: &ServeOptions) -> Result<Prepared, String> {
    let text = match &opts.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let source = opts
        .config
        .as_ref()
        .map_or_else(|| "defaults".to_string(), |p| p.display().to_string());
    let (config, settings) = config::load(
        &source,
        text.as_deref(),
        &opts.upstreams,
        &secrets::HostSecrets,
    )
    .map_err(|e| e.to_string())?;
    let limits = ServerLimits::parse(&config.server)?;
    let drain = probes::DrainPlan::parse(&config.server, opts.drain.as_deref())?;
    let listen = opts
        .listen
        .clone()
        .or(config.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let data_dir = opts
        .data_dir
        .clone()
        .or(config.data_dir.as_ref().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let audit_log = config
        .audit_log
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| data_dir.join("audit.log"));
    let workers = match opts.workers.or(config.server.workers) {
        Some(0) => return Err("configuration: server.workers must be at least 1".into()),
        Some(n) => n,
        None => workers::default_workers(),
    };
    let tls = tls::TlsFiles::resolve(
        opts.tls_cert.as_deref(),
        opts.tls_key.as_deref(),
        &config.tls,
    )?;
    let proxy_protocol = config.server.proxy_protocol.unwrap_or(false);
    if proxy_protocol && settings.trusted_proxies.nets.is_empty() {
        return Err(PROXY_PROTOCOL_ALONE.into());
    }
    Ok(Prepared {
        tls,
        proxy_protocol,
        workers,
        listen,
        data_dir,
        settings,
        audit_log,
        limits,
        drain,
    })
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, BodyError>>>>;

/// A hyper body that need not be `Send` (core streams are `!Send`).
pub(crate) enum HyperBody {
    Empty,
    Full(Option<Bytes>),
    Stream(FrameStream),
}

impl hyper::body::Body for HyperBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            HyperBody::Empty => Poll::Ready(None),
            HyperBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            HyperBody::Stream(s) => s.as_mut().poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            HyperBody::Empty => true,
            HyperBody::Full(b) => b.is_none(),
            HyperBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            HyperBody::Empty => hyper::body::SizeHint::with_exact(0),
            HyperBody::Full(b) => {
                hyper::body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            HyperBody::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// Logs one line when dropped: at the end of the body, or when the client went away.
struct LogLine {
    method: ::http::Method,
    /// The request's URI (a reference-counted copy; only its path is logged).
    uri: ::http::Uri,
    status: u16,
    info: Option<RequestInfo>,
    bytes: u64,
    started: Instant,
    metrics: Rc<Metrics>,
    failed: bool,
    ip: Option<std::net::IpAddr>,
    digest: Option<::http::HeaderValue>,
    audit: Rc<audit::AuditSink>,
    /// `[log] access`: emit the access event.
    access: bool,
}

impl LogLine {
    fn sent(&mut self, n: usize) {
        self.bytes += n as u64;
    }
    fn abort(&mut self) {
        self.failed = true;
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        add(&self.metrics.bytes_served, self.bytes);
        let elapsed = self.started.elapsed();
        let route = self.info.as_ref().map_or("-", |i| i.route);
        let upstream = self.info.as_ref().and_then(|i| i.upstream.as_deref());
        let (method, path) = (self.method.as_str(), self.uri.path());
        self.metrics
            .observe(method, route, upstream, self.status, elapsed.as_secs_f64());
        if self.access {
            let line = AccessLog {
                method,
                path,
                status: self.status,
                client: self.ip,
                info: self.info.as_ref(),
                bytes: Some(self.bytes),
                ms: Some(elapsed.as_millis()),
                aborted: self.failed,
            };
            if !access_line::write(&line) {
                line.emit();
            }
        }
        let cache = self.info.as_ref().map_or("-", |i| i.cache.as_str());
        if audit::is_audited(route) {
            self.audit.record_entry(&audit::Entry {
                now_ms: SystemClock.now_ms(),
                identity: self.info.as_ref().and_then(|i| i.identity.as_deref()),
                ip: self.ip,
                method,
                path,
                route,
                upstream,
                status: self.status,
                bytes: self.bytes,
                cache,
                digest: self.digest.as_ref().and_then(|d| d.to_str().ok()),
                aborted: self.failed,
            });
        }
    }
}

/// The digest an audit record names (the registry's `Docker-Content-Digest`).
const DIGEST_HEADER: ::http::HeaderName = ::http::HeaderName::from_static("docker-content-digest");

fn to_hyper(resp: ::http::Response<Body>, mut log: LogLine) -> ::http::Response<HyperBody> {
    let (mut parts, body) = resp.into_parts();
    log.status = parts.status.as_u16();
    // Nothing reads the response's extensions after this: take the facts rather than copy.
    log.info = parts.extensions.remove::<RequestInfo>();
    log.digest = parts.headers.get(DIGEST_HEADER).cloned();
    let body: HyperBody = match body {
        Body::Empty => {
            drop(log);
            HyperBody::Empty
        }
        Body::Bytes(b) => {
            log.bytes = b.len() as u64;
            drop(log);
            HyperBody::Full(Some(b))
        }
        Body::Host(_) => {
            // Only a host's own BlobStore makes these; the native stores never do.
            log.abort();
            drop(log);
            HyperBody::Empty
        }
        Body::Stream(s) => {
            let frames = s.map(move |chunk| match chunk {
                Ok(b) => {
                    log.sent(b.len());
                    Ok(Frame::data(b))
                }
                Err(e) => {
                    // An error mid-body: hyper aborts the connection, so the client never
                    // takes a short or unverified body for a whole one.
                    log.abort();
                    Err(e)
                }
            });
            HyperBody::Stream(Box::pin(frames))
        }
    };
    ::http::Response::from_parts(parts, body)
}

/// What every request on one connection shares.
#[derive(Clone)]
pub(crate) struct ConnContext {
    pub app: App,
    pub peer: std::net::IpAddr,
    pub audit: Rc<audit::AuditSink>,
    pub state: Rc<ConnState>,
    pub storage: Rc<store::StorageReport>,
    pub hub: std::sync::Arc<metrics::MetricsHub>,
    pub body_timeout: std::time::Duration,
    pub probes: std::sync::Arc<probes::Probes>,
    /// `trusted_proxies`: whose forwarding header names the client.
    pub trusted: Rc<crate::core::forwarded::TrustedProxies>,
}

/// Serves one request on a worker: the core answers; the host logs, and sums `/metrics` over
/// every worker.
pub(crate) async fn handle(
    cx: Rc<ConnContext>,
    req: ::http::Request<Incoming>,
) -> Result<::http::Response<Tracked<HyperBody>>, Infallible> {
    let ConnContext {
        app,
        peer,
        audit,
        state,
        storage,
        hub,
        body_timeout,
        probes,
        trusted,
    } = &*cx;
    let (peer, body_timeout) = (*peer, *body_timeout);
    let in_flight = InFlight::start(state);
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    // The socket's address (or a trusted PROXY header's), unless a trusted proxy forwarded
    // the request for someone else.
    let client = trusted.client_addr(peer, &parts.headers);
    let mut req = ::http::Request::from_parts(parts, ());
    req.extensions_mut()
        .insert(crate::core::access::ClientAddr(client));
    if req.uri().path() == "/readyz" {
        req.extensions_mut().insert(probes.check().await);
    }
    let log = LogLine {
        ip: Some(client),
        digest: None,
        audit: audit.clone(),
        method: req.method().clone(),
        uri: req.uri().clone(),
        status: 0,
        info: None,
        bytes: 0,
        started,
        metrics: app.metrics(),
        failed: false,
        access: app.settings().log.access,
    };
    let body = SharedBody::new(body);
    let mut resp = app.handle_with_body(&req, body.stream(body_timeout)).await;
    if body.is_unread() {
        // Answered without reading the whole body (413, 401…): say the connection closes,
        // and keep reading what the sender is still writing, so it gets to read this answer.
        resp.headers_mut().insert(
            ::http::header::CONNECTION,
            ::http::HeaderValue::from_static("close"),
        );
        tokio::task::spawn_local(body.linger(InFlight::start(state)));
    }
    if req.uri().path() == "/metrics" && resp.status() == ::http::StatusCode::OK {
        if let Body::Bytes(_) = resp.body() {
            let mut text = metrics::render(&hub.gather().await);
            text.push_str(&metrics::render_process(audit));
            *resp.body_mut() = Body::Bytes(Bytes::from(text));
        }
        storage.append_metrics(&mut resp);
    }
    let (parts, body) = to_hyper(resp, log).into_parts();
    Ok(::http::Response::from_parts(
        parts,
        Tracked::new(body, in_flight),
    ))
}

pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs `pullgate serve` until SIGTERM/SIGINT.
pub fn serve(opts: ServeOptions) -> Result<(), String> {
    let prepared = prepare(&opts)?;
    // Kept to the end: dropping it flushes the lines still queued.
    let _log = logging::init(&prepared.settings.log)?;
    workers::serve(prepared)
}
