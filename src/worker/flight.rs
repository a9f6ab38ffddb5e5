//! Global single-flight of blob fills: [`BlobFlights`] is a Durable Object class, one object
//! per digest (`get_by_name(<digest>)`), holding that digest's fill *lease*; [`DoFills`] is the
//! core's [`FillCoordinator`] over the namespace binding `PULLGATE_FLIGHTS`. With the binding,
//! concurrent cold misses of one blob make one upstream transfer whichever isolates and
//! locations they land in; without it, coalescing stays per isolate (the core's own).
//!
//! The object keeps the lease in memory ([`lease::Flight`], a pure state machine): who leads
//! (a lease id), what it fetches for (upstream and repository), whether the upstream answered
//! and the blob's size, and when the lease runs out. It answers four operations ([`lease::Op`]),
//! form-encoded over its `fetch` (internal to this worker, never reachable from outside it):
//! - `claim`: the caller leads (a new lease) or follows the live one. Claims are atomic: the
//!   object runs the decision with no await in it.
//! - `report`: the lead's progress (the upstream answered, the size); renews the lease.
//! - `release`: the lead's fill ended — the blob is committed to R2, or the fill failed.
//! - `wait`: a follower's long poll. The object holds it until the lease changed since the
//!   version the follower saw, or ended, or ran out, at most [`WAIT_MS`]; the follower then
//!   asks again. An object serves many pending requests at once (they wait on a timer or on a
//!   change, not on storage), so followers cost no polling rounds while the lead works.
//!
//! The lead renews the lease every quarter of its term (a timer under the lead request's
//! `waitUntil`), independently of byte progress, so a fill the runtime streams itself (the
//! tee fill, which reports nothing between start and commit) keeps its lease. A lease lasts
//! twice the upstream timeout (at least [`MIN_LEASE_MS`]): when the lead's isolate dies, the
//! lease runs out, its followers answer 503 "retry", and the next claim takes over.
//!
//! Followers read none of the lead's bytes ([`FillWatch::tail`] is None): they answer their
//! clients' headers once the lead's upstream answered (with the size the lead saw), and when
//! the lease ends they serve the blob from R2 if it is there — the lead releases its lease
//! with success only after R2 committed the verified blob. This is the Spin host's design
//! (`src/spin/leases.rs`) with a strongly consistent, atomic coordinator instead of key-value.
//!
//! [`ISOLATE_COALESCING_VAR`] is a test and diagnostic knob: set to `off`, every request
//! builds its own core instance (see [`isolate_coalescing_off`]), so nothing is coalesced in
//! the isolate and only this object can make concurrent requests share a transfer.
//!
//! # Limitations
//! - The lease lives in the object's memory: if the runtime evicts or restarts the object
//!   while a fill runs (rare: a lead reports at least every quarter lease and followers hold
//!   requests open), the next claim leads again and a second transfer runs. Both are verified;
//!   coalescing is an optimisation, never a correctness matter.
//! - Every claim, report and wait is a subrequest to the object (counted against the
//!   request's subrequest limit; a follower makes one per [`WAIT_MS`] of waiting), and the
//!   object lives in one location: a pull far from it pays the round trips on a miss (never
//!   on a hit, which does not claim).
//! - A follower's body starts only once the lead committed the blob (it reads R2, not the
//!   lead's stream): for a large layer a follower waits for the whole transfer.
//! - A follower of a blob R2 did not keep (a failed fill) answers 503 "retry"; its retry
//!   leads a fill of its own.
//! - When the object cannot be reached, the claim leads alone (the fill is this isolate's).

pub mod lease;

use crate::core::app::App;
use crate::core::error::RegistryError;
use crate::core::ports::{
    BlobStore, Deferred, FillClaim, FillCoordinator, FillLease, FillProgress, FillWatch, TailReader,
};
use crate::core::registry::reference::Digest;
use futures_util::future::{poll_fn, select, Either, LocalBoxFuture};
use lease::{Flight, Op, View};
use std::cell::{Cell, RefCell};
use std::pin::pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;
// The `#[durable_object]` expansion names `wasm_bindgen` unqualified.
use worker::wasm_bindgen;
use worker::{
    durable_object, Delay, DurableObject, Env, Method, ObjectNamespace, Request, RequestInit,
    Response, State,
};

/// The Durable Object namespace binding.
pub const FLIGHTS_BINDING: &str = "PULLGATE_FLIGHTS";
/// The test and diagnostic knob: `off` gives every request its own core instance.
pub const ISOLATE_COALESCING_VAR: &str = "PULLGATE_TEST_ISOLATE_COALESCING";
/// The shortest lease (ms).
pub const MIN_LEASE_MS: u64 = 20_000;
/// The longest the object holds a follower's wait (ms).
pub const WAIT_MS: u64 = 10_000;
/// The URL the port's requests to the object carry (never leaves the runtime).
const OBJECT_URL: &str = "https://blob-flights.pullgate.internal/op";

fn now_ms() -> u64 {
    worker::js_sys::Date::now() as u64
}

/// One digest's fill lease (a Durable Object class; `wrangler.toml` binds it as
/// `PULLGATE_FLIGHTS`). Its state is memory only: see the module's limitations.
#[durable_object(fetch)]
pub struct BlobFlights {
    flight: RefCell<Flight>,
    /// Followers' waits parked until the next change.
    waiters: RefCell<Vec<Waker>>,
}

impl BlobFlights {
    /// Applies `op`, waking the parked waits when the lease changed.
    fn apply(&self, op: Op) -> View {
        let now = now_ms();
        let before = self.flight.borrow().version();
        let view = {
            let mut f = self.flight.borrow_mut();
            match op {
                Op::Claim { scope, lease_ms } => f.claim(&scope, lease_ms, now),
                Op::Report { id, started, size } => f.report(id, started, size, now),
                Op::Release { id } => f.release(id, now),
                Op::Wait { id, .. } => f.view(id, now),
            }
        };
        if self.flight.borrow().version() != before {
            for w in self.waiters.borrow_mut().drain(..) {
                w.wake();
            }
        }
        view
    }

    /// Answers once lease `id` changed since `seen`, ended or ran out; at most [`WAIT_MS`].
    async fn wait(&self, id: u64, seen: u64) -> View {
        let deadline = now_ms().saturating_add(WAIT_MS);
        loop {
            let now = now_ms();
            let view = self.flight.borrow().view(id, now);
            if self.flight.borrow().settled(id, seen, now) || now >= deadline {
                return view;
            }
            let until = deadline.min(view.expires_ms);
            let changed = poll_fn(|cx| {
                if self.flight.borrow().version() != seen {
                    return Poll::Ready(());
                }
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            });
            let timer = Delay::from(Duration::from_millis(until.saturating_sub(now).max(1)));
            select(pin!(changed), pin!(timer)).await;
        }
    }
}

impl DurableObject for BlobFlights {
    fn new(_state: State, _env: Env) -> Self {
        BlobFlights {
            flight: RefCell::new(Flight::default()),
            waiters: RefCell::new(Vec::new()),
        }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        let Some(op) = Op::decode(&req.text().await?) else {
            return Response::error("not a flights operation", 400);
        };
        let view = match op {
            Op::Wait { id, seen } => self.wait(id, seen).await,
            op => self.apply(op),
        };
        Response::ok(view.encode())
    }
}

/// Sends `op` to the object of `digest`.
async fn call(namespace: &ObjectNamespace, digest: &str, op: &Op) -> Result<View, String> {
    let body = op.encode();
    let stub = namespace.get_by_name(digest).map_err(|e| e.to_string())?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_body(Some(worker::wasm_bindgen::JsValue::from_str(&body)));
    let req = Request::new_with_init(OBJECT_URL, &init).map_err(|e| e.to_string())?;
    let mut resp = stub
        .fetch_with_request(req)
        .await
        .map_err(|e| e.to_string())?;
    if resp.status_code() != 200 {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("{}: {text}", resp.status_code()));
    }
    let text = resp.text().await.map_err(|e| e.to_string())?;
    View::decode(&text).ok_or_else(|| format!("not a flights answer: {text:?}"))
}

/// The core's fill coordinator over the `PULLGATE_FLIGHTS` objects.
pub struct DoFills {
    namespace: ObjectNamespace,
    blobs: Rc<dyn BlobStore>,
    deferred: Rc<dyn Deferred>,
    lease_ms: u64,
}

#[async_trait::async_trait(?Send)]
impl FillCoordinator for DoFills {
    async fn claim(&self, digest: &Digest, scope: &str) -> FillClaim {
        let op = Op::Claim {
            scope: scope.to_string(),
            lease_ms: self.lease_ms,
        };
        let view = match call(&self.namespace, digest.as_str(), &op).await {
            Ok(view) => view,
            Err(e) => {
                // Nothing can be coordinated: this fill is this isolate's own.
                worker::console_error!("event=flight-unreachable digest={digest} error={e:?}");
                return FillClaim::Lead(Box::new(Unshared));
            }
        };
        if view.lead {
            let lease = Rc::new(Sender {
                namespace: self.namespace.clone(),
                digest: digest.as_str().to_string(),
                id: view.id,
                renew_ms: (self.lease_ms / 4).max(1),
                next: RefCell::new(None),
                sent: Cell::new((false, None)),
                ended: Cell::new(false),
                waker: RefCell::new(None),
            });
            self.deferred.spawn(Box::pin(lease.clone().run()));
            return FillClaim::Lead(Box::new(Lease(lease)));
        }
        FillClaim::Follow(Box::new(Watch {
            namespace: self.namespace.clone(),
            blobs: self.blobs.clone(),
            digest: digest.clone(),
            id: view.id,
            scope: view.scope.clone(),
            seen: Cell::new(view.version),
            last: RefCell::new(progress_of(&view)),
        }))
    }
}

/// A lead nothing else can see (the object was unreachable at the claim).
struct Unshared;

impl FillLease for Unshared {
    fn report(&self, _: &FillProgress) {}
}

/// The lead's side: queues what the object must hear; [`Sender::run`] sends it, one request
/// at a time and in order, and renews the lease between reports.
struct Sender {
    namespace: ObjectNamespace,
    digest: String,
    id: u64,
    renew_ms: u64,
    /// The next operation to send (a newer report replaces an unsent one).
    next: RefCell<Option<Op>>,
    /// The (started, size) last queued.
    sent: Cell<(bool, Option<u64>)>,
    ended: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Sender {
    fn queue(&self, op: Op) {
        *self.next.borrow_mut() = Some(op);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn end(&self) {
        if !self.ended.replace(true) {
            self.queue(Op::Release { id: self.id });
        }
    }

    /// Sends the queued operations until the release; a renewal when nothing was queued for a
    /// quarter lease.
    async fn run(self: Rc<Self>) {
        loop {
            let queued = poll_fn(|cx| match self.next.borrow_mut().take() {
                Some(op) => Poll::Ready(op),
                None => {
                    *self.waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            });
            let timer = Delay::from(Duration::from_millis(self.renew_ms));
            let op = match select(pin!(queued), pin!(timer)).await {
                Either::Left((op, _)) => op,
                Either::Right(_) => {
                    let (started, size) = self.sent.get();
                    Op::Report {
                        id: self.id,
                        started,
                        size,
                    }
                }
            };
            let last = matches!(op, Op::Release { .. });
            match call(&self.namespace, &self.digest, &op).await {
                Ok(v) if !v.live && !last => worker::console_warn!(
                    "event=flight-lease-lost digest={} (the fill goes on alone)",
                    self.digest
                ),
                Ok(_) => {}
                Err(e) => worker::console_error!(
                    "event=flight-report-failed digest={} error={e:?}",
                    self.digest
                ),
            }
            if last {
                return;
            }
        }
    }
}

/// The lead's lease: an outcome, or being dropped, releases it.
struct Lease(Rc<Sender>);

impl FillLease for Lease {
    fn report(&self, progress: &FillProgress) {
        let s = &self.0;
        if s.ended.get() {
            return;
        }
        if progress.outcome.is_some() {
            // Ok comes only after R2 committed: followers then read it there.
            s.end();
            return;
        }
        let now = (progress.started, progress.size);
        if s.sent.replace(now) != now {
            s.queue(Op::Report {
                id: s.id,
                started: now.0,
                size: now.1,
            });
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Dropped without an outcome: the fill was given up (the fill cap) or its task died.
        self.0.end();
    }
}

/// What a follower reports while the lease is live.
fn progress_of(view: &View) -> FillProgress {
    FillProgress {
        started: view.started,
        size: view.size,
        persisted: 0,
        outcome: None,
    }
}

/// A follower's view of another isolate's fill: the object's lease, long-polled.
struct Watch {
    namespace: ObjectNamespace,
    blobs: Rc<dyn BlobStore>,
    digest: Digest,
    id: u64,
    scope: String,
    /// The object's version this follower saw last.
    seen: Cell<u64>,
    /// What [`FillWatch::progress`] returns.
    last: RefCell<FillProgress>,
}

impl Watch {
    fn stopped(&self) -> FillProgress {
        FillProgress {
            started: true,
            outcome: Some(Err(RegistryError::Unavailable(
                "the transfer this request joined stopped; retry".into(),
            ))),
            ..self.last.borrow().clone()
        }
    }

    /// The fill's progress once the object answered the wait.
    async fn poll(&self) -> FillProgress {
        let op = Op::Wait {
            id: self.id,
            seen: self.seen.get(),
        };
        match call(&self.namespace, self.digest.as_str(), &op).await {
            Ok(v) if v.live => {
                self.seen.set(v.version);
                return progress_of(&v);
            }
            // Released (committed or failed) or run out (its lead died): R2 has the answer.
            Ok(_) => {}
            Err(e) => {
                worker::console_error!(
                    "event=flight-wait-failed digest={} error={e:?}",
                    self.digest
                );
                return self.stopped();
            }
        }
        match self.blobs.stat(&self.digest).await {
            Ok(Some(size)) => FillProgress {
                started: true,
                size: Some(size),
                persisted: size,
                outcome: Some(Ok(())),
            },
            _ => self.stopped(),
        }
    }
}

impl FillWatch for Watch {
    fn progress(&self) -> FillProgress {
        self.last.borrow().clone()
    }

    fn changed(&self) -> LocalBoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                let now = self.poll().await;
                if now != *self.last.borrow() {
                    *self.last.borrow_mut() = now;
                    return;
                }
            }
        })
    }

    fn scope(&self) -> &str {
        &self.scope
    }

    fn tail(&self) -> Option<Rc<dyn TailReader>> {
        None
    }
}

/// Whether the test and diagnostic knob [`ISOLATE_COALESCING_VAR`] is `off`: the host then
/// builds a core instance per request (no fills, tokens or metrics shared in the isolate), as
/// if each request landed in an isolate of its own. Never for production.
pub fn isolate_coalescing_off(env: &Env) -> bool {
    env.var(ISOLATE_COALESCING_VAR)
        .map(|v| v.to_string())
        .or_else(|_| env.secret(ISOLATE_COALESCING_VAR).map(|v| v.to_string()))
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("off"))
}

/// `app` coordinating its blob fills through the `PULLGATE_FLIGHTS` objects when the worker
/// has the binding; `app` as it was otherwise (coalescing per isolate).
pub(crate) fn attach(app: App, env: &Env, blobs: Rc<dyn BlobStore>) -> App {
    let Ok(namespace) = env.durable_object(FLIGHTS_BINDING) else {
        return app;
    };
    let lease_ms = app
        .settings()
        .upstream_timeout_ms
        .saturating_mul(2)
        .max(MIN_LEASE_MS);
    app.with_fill_coordinator(Rc::new(DoFills {
        namespace,
        blobs,
        deferred: Rc::new(crate::worker::WaitUntil),
        lease_ms,
    }))
}
