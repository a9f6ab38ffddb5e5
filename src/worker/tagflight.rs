//! Tag revalidations coordinated across isolates and locations: [`TagFlights`] is a Durable
//! Object class, one object per tag record key (upstream, repository, accept class, tag;
//! `get_by_name`), and [`DoTagFlights`] is the core's [`ports::TagFlights`] port over the
//! namespace binding `PULLGATE_TAGS`. With the binding, a burst of requests for a stale or
//! missing tag, wherever they land, makes one upstream `HEAD` (or `GET`): one request leads,
//! the others wait in the object for its outcome — the digest it resolved, handed back through
//! the object rather than through KV, which takes up to 60 s to show the lead's tag record
//! elsewhere — and serve the manifest by digest from R2 (content addressed, strongly
//! consistent).
//!
//! The object keeps the core's [`TagFlightBook`] in memory: who leads, until when (the lease,
//! twice `[cache] upstream_timeout`), and the last few outcomes. A lead that errors publishes
//! "failed" (followers serve their own stale record within `max_stale`, or ask the upstream
//! themselves); one whose request is cancelled publishes "unknown" from its guard; one whose
//! isolate dies publishes nothing, and its followers are released when the lease expires and
//! ask the upstream themselves. Nothing is written to the object's storage: an object that is
//! evicted or restarted forgets only flights in progress (the next request leads).
//!
//! The port speaks a small text protocol over the object's `fetch` (see [`Op`]), internal to
//! this worker: `enter` (lead or follow, answered at once), `wait` (held until the lead
//! publishes or its lease expires) and `publish`. Two subrequests for a follower, two for the
//! lead.
//!
//! # Limitations
//! - Only requests that need the upstream pay for the object (a round trip to wherever it
//!   lives, usually near the first request for that tag); fresh tags are served from KV as
//!   before.
//! - A coordinator that cannot be reached (the binding's object fails) is skipped: the request
//!   asks the upstream itself, as without the binding, and the failure is logged.

use crate::core::app::App;
use crate::core::ports::{
    self, NoTagLease, TagEntry, TagFlight, TagFlightBook, TagLease, TagOutcome, TagPoll,
};
use futures_util::future::LocalBoxFuture;
use std::cell::{Cell, RefCell};
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
pub const TAGS_BINDING: &str = "PULLGATE_TAGS";
/// The origin of the port's requests to an object (never leaves the runtime); the path names
/// the operation.
const OBJECT_ORIGIN: &str = "https://tag-flights.pullgate.internal";

/// One operation on a tag's flights. The protocol is text: the operation and its number in the
/// URL (`/enter?n=<lease ms>`, `/wait?n=<lease>`, `/publish?n=<lease>` with the outcome as the
/// body); the answer `lead <lease>`, `follow <lease>`, an outcome ([`TagOutcome::encode`]) or
/// `ok`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// Lead for `lease_ms`, or follow the lead in flight.
    Enter { lease_ms: u64 },
    /// The outcome of `lease`, once there is one.
    Wait { lease: u64 },
    /// The lead of `lease` is done.
    Publish { lease: u64, outcome: TagOutcome },
}

impl Op {
    /// The request path and body.
    fn encode(&self) -> (String, Option<String>) {
        match self {
            Op::Enter { lease_ms } => (format!("/enter?n={lease_ms}"), None),
            Op::Wait { lease } => (format!("/wait?n={lease}"), None),
            Op::Publish { lease, outcome } => {
                (format!("/publish?n={lease}"), Some(outcome.encode()))
            }
        }
    }

    /// Reads a request's path, number and body.
    fn decode(path: &str, n: Option<u64>, body: &str) -> Option<Op> {
        let n = n?;
        match path {
            "/enter" => Some(Op::Enter { lease_ms: n }),
            "/wait" => Some(Op::Wait { lease: n }),
            "/publish" => Some(Op::Publish {
                lease: n,
                outcome: TagOutcome::decode(body),
            }),
            _ => None,
        }
    }
}

/// Wakes the object's waiting `wait` operations when a lead publishes.
#[derive(Default)]
struct Signal {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Signal {
    fn notify(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        for w in self.wakers.take() {
            w.wake();
        }
    }

    /// Resolves at the next [`notify`](Self::notify) after this call.
    fn changed(&self) -> impl std::future::Future<Output = ()> + '_ {
        let seen = self.generation.get();
        std::future::poll_fn(move |cx| {
            if self.generation.get() != seen {
                return Poll::Ready(());
            }
            self.wakers.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
    }
}

/// One tag's revalidation flights (a Durable Object class; `wrangler.toml` binds it as
/// `PULLGATE_TAGS`). State in memory only.
#[durable_object]
pub struct TagFlights {
    book: RefCell<TagFlightBook>,
    signal: Signal,
}

fn now_ms() -> u64 {
    worker::js_sys::Date::now() as u64
}

impl TagFlights {
    /// Carries out `op`; the answer's text.
    async fn apply(&self, op: Op) -> String {
        match op {
            Op::Enter { lease_ms } => match self.book.borrow_mut().enter(now_ms(), lease_ms) {
                TagEntry::Lead(lease) => format!("lead {lease}"),
                TagEntry::Follow(lease) => format!("follow {lease}"),
            },
            Op::Wait { lease } => loop {
                let changed = self.signal.changed();
                let poll = self.book.borrow_mut().poll(lease, now_ms());
                match poll {
                    TagPoll::Done(outcome) => return outcome.encode(),
                    TagPoll::WaitUntil(until) => {
                        let left = until.saturating_sub(now_ms()).max(1);
                        let expiry = Delay::from(Duration::from_millis(left));
                        futures_util::pin_mut!(changed);
                        let _ = futures_util::future::select(changed, expiry).await;
                    }
                }
            },
            Op::Publish { lease, outcome } => {
                self.book.borrow_mut().publish(lease, outcome);
                self.signal.notify();
                "ok".into()
            }
        }
    }
}

impl DurableObject for TagFlights {
    fn new(_state: State, _env: Env) -> Self {
        TagFlights {
            book: RefCell::new(TagFlightBook::default()),
            signal: Signal::default(),
        }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        let url = req.url()?;
        let n = url
            .query_pairs()
            .find(|(k, _)| k == "n")
            .and_then(|(_, v)| v.parse().ok());
        let body = req.text().await.unwrap_or_default();
        match Op::decode(url.path(), n, &body) {
            Some(op) => Response::ok(self.apply(op).await),
            None => Response::error("not a tag-flight operation", 400),
        }
    }
}

/// Sends `op` to the object of tag record `key`; the answer's text.
async fn call(namespace: &ObjectNamespace, key: &str, op: &Op) -> Result<String, String> {
    let (path, body) = op.encode();
    let stub = namespace.get_by_name(key).map_err(|e| e.to_string())?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post);
    if let Some(body) = body {
        init.with_body(Some(worker::wasm_bindgen::JsValue::from_str(&body)));
    }
    let req = Request::new_with_init(&format!("{OBJECT_ORIGIN}{path}"), &init)
        .map_err(|e| e.to_string())?;
    let mut resp = stub
        .fetch_with_request(req)
        .await
        .map_err(|e| e.to_string())?;
    let text = resp.text().await.unwrap_or_default();
    if resp.status_code() != 200 {
        return Err(format!("{}: {text}", resp.status_code()));
    }
    Ok(text)
}

/// Reads `enter`'s answer: (leads, lease).
fn parse_entry(text: &str) -> Option<(bool, u64)> {
    let (role, lease) = text.split_once(' ')?;
    let lease = lease.trim().parse().ok()?;
    match role {
        "lead" => Some((true, lease)),
        "follow" => Some((false, lease)),
        _ => None,
    }
}

fn warn(what: &str, e: &str) {
    tracing::warn!(
        binding = TAGS_BINDING,
        error = %e,
        "tag flight {what} failed; this request asks the upstream itself"
    );
}

/// The core's tag flights over the `PULLGATE_TAGS` objects.
pub struct DoTagFlights {
    namespace: ObjectNamespace,
    lease_ms: u64,
}

/// A lead's lease in its tag's object.
struct DoLease {
    namespace: ObjectNamespace,
    key: String,
    lease: u64,
}

impl TagLease for DoLease {
    fn publish(self: Box<Self>, outcome: TagOutcome) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            let op = Op::Publish {
                lease: self.lease,
                outcome,
            };
            if let Err(e) = call(&self.namespace, &self.key, &op).await {
                // The followers are released when the lease expires.
                warn("publish", &e);
            }
        })
    }
}

impl ports::TagFlights for DoTagFlights {
    fn enter(&self, key: &str) -> LocalBoxFuture<'static, TagFlight> {
        let namespace = self.namespace.clone();
        let key = key.to_string();
        let op = Op::Enter {
            lease_ms: self.lease_ms,
        };
        Box::pin(async move {
            let entry = call(&namespace, &key, &op).await.and_then(|text| {
                parse_entry(&text).ok_or_else(|| format!("unexpected answer {text:?}"))
            });
            let (lead, lease) = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    warn("enter", &e);
                    return TagFlight::Lead(Box::new(NoTagLease));
                }
            };
            if lead {
                return TagFlight::Lead(Box::new(DoLease {
                    namespace,
                    key,
                    lease,
                }));
            }
            let wait = async move {
                match call(&namespace, &key, &Op::Wait { lease }).await {
                    Ok(text) => TagOutcome::decode(&text),
                    Err(e) => {
                        warn("wait", &e);
                        TagOutcome::Unknown
                    }
                }
            };
            TagFlight::Follow(Box::pin(wait))
        })
    }
}

/// `app` coordinating its tag revalidations through the `PULLGATE_TAGS` objects when the
/// worker has the binding (leases of `lease_ms`); `app` as it was otherwise.
pub(crate) fn attach(app: App, env: &Env, lease_ms: u64) -> App {
    match env.durable_object(TAGS_BINDING) {
        Ok(namespace) => app.with_tag_flights(Rc::new(DoTagFlights {
            namespace,
            lease_ms,
        })),
        Err(_) => app,
    }
}
