//! Thread-per-core serving: `workers` threads (default: the available cores), each a tokio
//! current-thread runtime with its own `LocalSet` and its own core instance ([`App`], which is
//! `!Send` and stays so). One acceptor (on worker 0) hands accepted connections out round-robin
//! over channels, so the spread is even and deterministic; a connection stays on the thread
//! that got it. The stores are shared (redb and the blob directory are `Send`), and so is the
//! fill registry ([`SharedFills`]): concurrent misses of one blob make one upstream transfer
//! whichever threads serve them.
//!
//! # What is per process and what is per thread
//! - Process-wide: the blob store and its usage/eviction accounting, metadata, the fill
//!   registry, the connection cap (`max_connections`, one semaphore), `/metrics` (summed over
//!   the workers at render, see [`metrics`](super::metrics)), the audit log (one `O_APPEND`
//!   write per record), shutdown.
//! - Also process-wide, through the core's ports ([`shared`](super::shared)): rate-limit
//!   buckets, login lockouts, upstream tokens and tag revalidations, so a limit or a lockout
//!   is exact whichever thread a connection lands on.
//! - Per thread: reqwest's connection pool and the gateway's in-memory state. The outbox
//!   pump's timer runs on worker 0 only. `[cache] max_fills` bounds the fills each
//!   thread *leads* (following another thread's fill takes no slot), so a process leads at
//!   most `workers` × `max_fills`.

use crate::core::app::{App, GatewayShare, LoginLockouts};
use crate::core::config::value::redact_url;
use crate::core::config::Settings;
use crate::native::fills::SharedFills;
use crate::native::listener::{AcceptBackoff, ConnState, ServerLimits};
use crate::native::metrics::{self, MetricsHub};
use crate::native::shared;
use crate::native::{
    audit, client, connection, offload, probes, shutdown_signal, store, tls, ConnContext, Prepared,
    PUMP_EVERY,
};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// A connection the acceptor handed to a worker (the permit counts it against the cap).
struct Accepted {
    stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
    permit: OwnedSemaphorePermit,
}

/// What every worker shares.
#[derive(Clone)]
struct Shared {
    settings: Settings,
    kv: store::RedbKv,
    blobs: store::FsBlobStore,
    fills: SharedFills,
    /// `[rate_limit]` buckets, login lockouts, upstream tokens and tag revalidations, per
    /// process (not per thread).
    buckets: shared::ProcessBuckets,
    logins: LoginLockouts,
    tokens: shared::ProcessTokens,
    tags: shared::ProcessTagFlights,
    /// The audit log's queue (one writer thread per process).
    audit: audit::AuditSink,
    limits: ServerLimits,
    hub: Arc<MetricsHub>,
    offload: offload::BlockingOffload,
    /// One outbox pass at a time and one run-record lock across the threads.
    gateway: GatewayShare,
    probes: Arc<probes::Probes>,
    drain: probes::DrainPlan,
    /// `[tls]`: the acceptor every worker shares and the certificate worker 0 reloads.
    tls: Option<tls::ListenerTls>,
    /// `[server] proxy_protocol`.
    proxy_protocol: bool,
}

/// The default `workers`: the cores this process may use.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// glibc gives every thread that allocates its own malloc arena (up to 8 per core), and each
/// keeps the memory freed into it; the blocking threads that read blob chunks (512 KiB each)
/// would each grow one. A few shared arenas keep the peak RSS under load near what one thread
/// needed, at the price of some lock contention between allocating threads.
fn bound_malloc_arenas(workers: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let arenas = i32::try_from(workers.clamp(1, 4)).unwrap_or(4);
        // SAFETY: mallopt only sets an allocator parameter; it is called before any worker
        // thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = workers;
}

/// Runs `pullgate serve` on `p.workers` threads until SIGTERM/SIGINT.
pub fn serve(p: Prepared) -> Result<(), String> {
    bound_malloc_arenas(p.workers);
    std::fs::create_dir_all(&p.data_dir)
        .map_err(|e| format!("creating {}: {e}", p.data_dir.display()))?;
    // A certificate that does not load stops the start, before anything listens.
    let tls = p.tls.map(tls::ListenerTls::start).transpose()?;
    let kv = store::RedbKv::open(&p.data_dir.join("meta.redb")).map_err(|e| e.to_string())?;
    // `/metrics` reports the cached manifests: counted once here, before anything writes,
    // then kept by every write.
    kv.track(crate::core::registry::keys::MANIFEST_PREFIX)
        .map_err(|e| e.to_string())?;
    let blobs =
        store::FsBlobStore::open(&p.data_dir, p.settings.max_size).map_err(|e| e.to_string())?;
    let listener = std::net::TcpListener::bind(&p.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("listening on {}: {e}", p.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let n = p.workers.max(1);
    let upstreams: Vec<String> = (p.settings.upstreams.iter())
        .map(|u| format!("{}={}", u.host, redact_url(u.url.as_str())))
        .collect();
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        "pullgate listening on {scheme}://{addr} data_dir={} upstreams={} workers={n}",
        p.data_dir.display(),
        upstreams.join(",")
    );
    let report = store::StorageReport::new(Rc::new(blobs.clone()), Rc::new(kv.clone()));
    tracing::info!("{}", report.summary());
    drop(report);
    let (hub, asks) = MetricsHub::new(n);
    let tag_lease_ms = p.settings.upstream_timeout_ms.saturating_mul(2);
    let shared = Shared {
        settings: p.settings,
        fills: SharedFills::new(blobs.clone()),
        buckets: shared::ProcessBuckets::default(),
        logins: LoginLockouts::default(),
        tokens: shared::ProcessTokens::default(),
        // A lead holds a tag for its HEAD and GET, each bounded by the upstream timeout.
        tags: shared::ProcessTagFlights::new(tag_lease_ms),
        kv,
        blobs,
        audit: audit::AuditSink::open(&p.audit_log)?,
        limits: p.limits,
        hub: Arc::new(hub),
        offload: offload::BlockingOffload::for_this_machine(),
        gateway: GatewayShare::default(),
        probes: probes::Probes::new(&p.data_dir),
        drain: p.drain,
        tls,
        proxy_protocol: p.proxy_protocol,
    };
    // Every CA file is read now, so a bad one stops the start rather than a worker.
    client::ReqwestUpstream::new(Duration::from_secs(1))?
        .load_cas(&client::ca_files(&shared.settings))?;
    let (senders, mut receivers): (Vec<_>, Vec<_>) =
        (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    let mut asks = asks.into_iter();
    let mut threads = Vec::new();
    for (i, conns) in receivers.drain(1..).enumerate() {
        let (i, shared, ask) = (i + 1, shared.clone(), asks.next());
        let thread = std::thread::Builder::new()
            .name(format!("pullgate-worker-{i}"))
            .spawn(move || on_own_runtime(i, shared, conns, ask, None))
            .map_err(|e| format!("starting worker {i}: {e}"))?;
        threads.push(thread);
    }
    let conns = receivers.pop().ok_or("no worker 0")?;
    let acceptor = (
        listener,
        senders,
        shared.limits.max_connections,
        (shared.probes.clone(), shared.drain),
    );
    let result = on_own_runtime(0, shared.clone(), conns, asks.next(), Some(acceptor));
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            tracing::error!("pullgate: {e}");
        }
    }
    if shared.fills.in_flight() > 0 {
        tracing::warn!(
            "pullgate: {} fills left unfinished",
            shared.fills.in_flight()
        );
    }
    shared.audit.close();
    tracing::info!("pullgate stopped");
    result
}

type Acceptor = (
    std::net::TcpListener,
    Vec<mpsc::UnboundedSender<Accepted>>,
    usize,
    (Arc<probes::Probes>, probes::DrainPlan),
);

/// Builds worker `i`'s runtime and runs it; worker 0 also runs the acceptor.
fn on_own_runtime(
    i: usize,
    shared: Shared,
    conns: mpsc::UnboundedReceiver<Accepted>,
    ask: Option<mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<metrics::WorkerMetrics>>>,
    acceptor: Option<Acceptor>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime of worker {i}: {e}"))?;
    let local = tokio::task::LocalSet::new();
    // The worker's access lines and audit records go out in batches (see `line_batch`); what
    // is left goes when the runtime is gone (its tasks' last lines included).
    let batching = super::line_batch::install(shared.audit.clone());
    let result = local.block_on(&rt, async move {
        tokio::task::spawn_local(super::line_batch::flusher());
        if let Some((listener, senders, cap, (probes, drain))) = acceptor {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| format!("listening: {e}"))?;
            let stop = probes::drain_signal(shutdown_signal, probes, drain);
            tokio::task::spawn_local(accept_loop(listener, senders, cap, stop));
            if let Some(tls) = shared.tls.clone() {
                tokio::task::spawn_local(tls::watch(tls));
            }
        }
        worker(i, shared, conns, ask).await
    });
    drop(local);
    drop(rt);
    drop(batching);
    result
}

/// Accepts until SIGTERM/SIGINT, handing connections out round-robin; at the cap it waits for
/// a permit instead of accepting (new connections queue in the kernel's backlog). Dropping
/// the senders at the end tells every worker to shut down.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    workers: Vec<mpsc::UnboundedSender<Accepted>>,
    cap: usize,
    stop: impl std::future::Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(cap));
    let mut backoff = AcceptBackoff::default();
    tokio::pin!(stop);
    let mut next = 0usize;
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
                    tracing::warn!("{line}");
                }
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = &mut stop => break,
                }
            }
        };
        if let Some(line) = backoff.succeeded(Instant::now()) {
            tracing::info!("{line}");
        }
        let _ = stream.set_nodelay(true);
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let conn = Accepted {
            stream,
            peer,
            permit,
        };
        // A worker that is gone (it failed to start) passes its turn to the next.
        let mut conn = conn;
        for _ in 0..workers.len() {
            let w = next % workers.len();
            next = next.wrapping_add(1);
            match workers[w].send(conn) {
                Ok(()) => break,
                Err(mpsc::error::SendError(c)) => conn = c,
            }
        }
    }
}

/// One worker: its own core instance over the shared stores, serving the connections it is
/// handed until the acceptor stops, then waiting (up to the grace period) for its requests
/// and fills.
async fn worker(
    i: usize,
    shared: Shared,
    mut conns: mpsc::UnboundedReceiver<Accepted>,
    ask: Option<mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<metrics::WorkerMetrics>>>,
) -> Result<(), String> {
    let (app, fills) = instance(&shared)?;
    let storage = Rc::new(store::StorageReport::new(
        Rc::new(shared.blobs.clone()),
        Rc::new(shared.kv.clone()),
    ));
    let audit = Rc::new(shared.audit.clone());
    if let Some(ask) = ask {
        tokio::task::spawn_local(metrics::answer(ask, app.clone()));
    }
    if i == 0 {
        // Registered before the first connection is served: SIGHUP reopens the audit log.
        tokio::task::spawn_local(shared.audit.watch_hangup()?);
        // The gateway's outbox: deliveries persisted before a restart go out now, retries
        // when due. One thread's timer is enough: the outbox is in the shared metadata.
        let pump_app = app.clone();
        tokio::task::spawn_local(async move {
            loop {
                pump_app.pump_outbox().await;
                tokio::time::sleep(PUMP_EVERY).await;
            }
        });
    }
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Rc::new(Cell::new(0usize));
    let limits = shared.limits;
    let trusted = Rc::new(shared.settings.trusted_proxies.clone());
    let front = Rc::new(connection::Front {
        tls: shared.tls.as_ref().map(|t| t.acceptor.clone()),
        proxy_protocol: shared.proxy_protocol,
        trusted: shared.settings.trusted_proxies.clone(),
    });
    while let Some(conn) = conns.recv().await {
        let Ok(stream) = tokio::net::TcpStream::from_std(conn.stream) else {
            continue;
        };
        let state = ConnState::new(tokio::time::Instant::now(), limits);
        let (app, audit, storage, trusted) =
            (app.clone(), audit.clone(), storage.clone(), trusted.clone());
        let (hub, probes, conn_state) = (shared.hub.clone(), shared.probes.clone(), state.clone());
        let cx = move |peer| ConnContext {
            app,
            peer,
            audit,
            state: conn_state,
            storage,
            hub,
            body_timeout: limits.body_timeout,
            probes,
            trusted,
        };
        let serving = connection::serve(
            front.clone(),
            stream,
            conn.peer.ip(),
            state,
            limits,
            graceful.watcher(),
            cx,
        );
        let (connections, permit) = (connections.clone(), conn.permit);
        connections.set(connections.get() + 1);
        tokio::task::spawn_local(async move {
            serving.await;
            connections.set(connections.get() - 1);
            drop(permit);
        });
    }
    tracing::info!(
        "pullgate worker {i} shutting down: {} connections, {} fills in flight",
        connections.get(),
        fills.get()
    );
    let grace = shared.drain.drain;
    let deadline = Instant::now() + grace;
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
    while fills.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A worker's core instance: its own ports over the shared stores, and the count of its
/// deferred work (fills) for shutdown.
fn instance(shared: &Shared) -> Result<(App, Rc<Cell<usize>>), String> {
    let (ports, fills) = crate::native::instance_ports(
        &shared.settings,
        shared.kv.clone(),
        shared.blobs.clone(),
        shared.offload.clone(),
    )?;
    let app = App::sharing(shared.settings.clone(), ports, &shared.gateway)
        .with_fill_coordinator(Rc::new(shared.fills.clone()))
        .with_rate_limits(Rc::new(shared.buckets.clone()))
        .with_login_lockouts(shared.logins.clone())
        .with_token_store(Rc::new(shared.tokens.clone()))
        .with_tag_flights(Rc::new(shared.tags.clone()));
    Ok((app, fills))
}
