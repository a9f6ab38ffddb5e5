//! The native host: `pullgate serve`. One event-loop thread (tokio current-thread runtime with
//! a `LocalSet`, since core futures are `!Send`) plus tokio's blocking pool for file and redb
//! I/O; hyper HTTP/1.1 on the listener; reqwest to upstreams; redb + files for storage.
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

pub mod audit;
pub mod check;
pub mod client;
pub mod listener;
pub mod offload;
pub mod probes;
pub mod secrets;
pub mod store;

use crate::core::app::App;
use crate::core::body::{AccessLog, Body, RequestInfo};
use crate::core::config::{self, Settings};
use crate::core::metrics::{add, Metrics};
use crate::core::ports::{BodyError, Clock, Deferred, Ports};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::{Stream, StreamExt};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use listener::{AcceptBackoff, ConnState, InFlight, ServerLimits, SharedBody, Tracked};
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
const PUMP_EVERY: Duration = Duration::from_millis(500);

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
    active: Rc<Cell<usize>>,
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
}

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
    Ok(Prepared {
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
enum HyperBody {
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
    method: String,
    path: String,
    status: u16,
    info: Option<RequestInfo>,
    bytes: u64,
    started: Instant,
    metrics: Rc<Metrics>,
    failed: bool,
    ip: Option<std::net::IpAddr>,
    digest: Option<String>,
    audit: Rc<audit::AuditSink>,
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
        let line = AccessLog {
            method: &self.method,
            path: &self.path,
            status: self.status,
            info: self.info.as_ref(),
            bytes: Some(self.bytes),
            ms: Some(self.started.elapsed().as_millis()),
            aborted: self.failed,
        }
        .line();
        eprintln!("{line}");
        let route = self.info.as_ref().map_or("-", |i| i.route);
        let upstream = self.info.as_ref().and_then(|i| i.upstream.as_deref());
        let cache = self.info.as_ref().map_or("-", |i| i.cache.as_str());
        if audit::is_audited(route) {
            self.audit.record(&audit::to_json(&audit::Entry {
                now_ms: SystemClock.now_ms(),
                identity: self.info.as_ref().and_then(|i| i.identity.as_deref()),
                ip: self.ip.map(|i| i.to_string()),
                method: &self.method,
                path: &self.path,
                route,
                upstream,
                status: self.status,
                bytes: self.bytes,
                cache,
                digest: self.digest.as_deref(),
                aborted: self.failed,
            }));
        }
    }
}

fn to_hyper(resp: ::http::Response<Body>, mut log: LogLine) -> ::http::Response<HyperBody> {
    let (parts, body) = resp.into_parts();
    log.status = parts.status.as_u16();
    log.info = parts.extensions.get::<RequestInfo>().cloned();
    log.digest = parts
        .headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
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
struct ConnContext {
    app: App,
    peer: std::net::IpAddr,
    audit: Rc<audit::AuditSink>,
    state: Rc<ConnState>,
    storage: Rc<store::StorageReport>,
    body_timeout: std::time::Duration,
    probes: std::sync::Arc<probes::Probes>,
}

async fn handle(
    cx: ConnContext,
    req: ::http::Request<Incoming>,
) -> Result<::http::Response<Tracked<HyperBody>>, Infallible> {
    let ConnContext {
        app,
        peer,
        audit,
        state,
        storage,
        body_timeout,
        probes,
    } = cx;
    let in_flight = InFlight::start(&state);
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut req = ::http::Request::from_parts(parts, ());
    // The socket's address is the only one the native host can vouch for.
    req.extensions_mut()
        .insert(crate::core::access::ClientAddr(peer));
    if req.uri().path() == "/readyz" {
        req.extensions_mut().insert(probes.check().await);
    }
    let log = LogLine {
        ip: Some(peer),
        digest: None,
        audit,
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        status: 0,
        info: None,
        bytes: 0,
        started,
        metrics: app.metrics(),
        failed: false,
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
        tokio::task::spawn_local(body.linger(InFlight::start(&state)));
    }
    if req.uri().path() == "/metrics" && resp.status() == ::http::StatusCode::OK {
        storage.append_metrics(&mut resp);
    }
    let (parts, body) = to_hyper(resp, log).into_parts();
    Ok(::http::Response::from_parts(
        parts,
        Tracked::new(body, in_flight),
    ))
}

async fn shutdown_signal() {
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(prepared))
}

async fn run(p: Prepared) -> Result<(), String> {
    std::fs::create_dir_all(&p.data_dir)
        .map_err(|e| format!("creating {}: {e}", p.data_dir.display()))?;
    let kv =
        Rc::new(store::RedbKv::open(&p.data_dir.join("meta.redb")).map_err(|e| e.to_string())?);
    let blobs = Rc::new(
        store::FsBlobStore::open(&p.data_dir, p.settings.max_size).map_err(|e| e.to_string())?,
    );
    let storage = Rc::new(store::StorageReport::new(blobs.clone(), kv.clone()));
    let upstream =
        client::ReqwestUpstream::new(Duration::from_millis(p.settings.upstream_timeout_ms))?;
    upstream.load_cas(&client::ca_files(&p.settings))?;
    let probes = probes::Probes::new(&p.data_dir);
    let fills = Rc::new(Cell::new(0usize));
    let ports = Ports {
        upstream: Rc::new(upstream),
        kv,
        blobs,
        clock: Rc::new(SystemClock),
        deferred: Rc::new(LocalDeferred {
            active: fills.clone(),
        }),
        offload: Rc::new(offload::BlockingOffload::for_this_machine()),
    };
    let listener = tokio::net::TcpListener::bind(&p.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", p.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let upstream_names: Vec<String> = p
        .settings
        .upstreams
        .iter()
        .map(|u| format!("{}={}", u.host, u.url))
        .collect();
    eprintln!(
        "pullgate listening on http://{addr} data_dir={} upstreams={}",
        p.data_dir.display(),
        upstream_names.join(",")
    );
    eprintln!("{}", storage.summary());
    let audit = Rc::new(audit::AuditSink::open(&p.audit_log)?);
    let app = App::new(p.settings, ports);
    // The gateway's outbox: deliveries persisted before a restart go out now, retries when due.
    let pump_app = app.clone();
    tokio::task::spawn_local(async move {
        loop {
            pump_app.pump_outbox().await;
            tokio::time::sleep(PUMP_EVERY).await;
        }
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Rc::new(Cell::new(0usize));
    let limits = p.limits;
    // At the cap, the loop waits for a permit instead of accepting: new connections queue in
    // the kernel's backlog until one closes.
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut backoff = AcceptBackoff::default();
    let stop = probes::drain_signal(shutdown_signal, probes.clone(), p.drain);
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => break,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Typically fd exhaustion (EMFILE/ENFILE): every retry fails until a descriptor
                // is freed, so pause (doubling up to 1 s) and log at most once per interval.
                let (pause, line) = backoff.failed(Instant::now(), &e.to_string());
                if let Some(line) = line {
                    eprintln!("{line}");
                }
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = &mut stop => break,
                }
            }
        };
        if let Some(line) = backoff.succeeded(Instant::now()) {
            eprintln!("{line}");
        }
        let _ = stream.set_nodelay(true);
        let state = ConnState::new(tokio::time::Instant::now());
        let cx = ConnContext {
            app: app.clone(),
            peer: peer.ip(),
            audit: audit.clone(),
            state: state.clone(),
            storage: storage.clone(),
            body_timeout: limits.body_timeout,
            probes: probes.clone(),
        };
        let service = hyper::service::service_fn(move |req| handle(cx.clone(), req));
        let io = listener::WatchedIo::new(stream, state.clone());
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn);
        let connections = connections.clone();
        connections.set(connections.get() + 1);
        tokio::task::spawn_local(async move {
            // Dropping the connection closes it: when it has overstayed a timeout.
            tokio::select! {
                _ = conn => {}
                _ = listener::watchdog(state, limits) => {}
            }
            connections.set(connections.get() - 1);
            drop(permit);
        });
    }
    eprintln!(
        "pullgate shutting down: {} connections, {} fills in flight",
        connections.get(),
        fills.get()
    );
    drop(listener);
    let deadline = Instant::now() + p.drain.drain;
    let _ = tokio::time::timeout(p.drain.drain, graceful.shutdown()).await;
    while fills.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("pullgate stopped");
    Ok(())
}
