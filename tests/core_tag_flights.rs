//! Tag revalidations coordinated across core instances (issue #11): two instances — two
//! Workers isolates — share a [`TagFlights`] double built on the same rule the Durable Object
//! applies ([`TagFlightBook`]), a blob store and the manifests by digest, but each has its own
//! tag records (KV that has not propagated). An upstream that holds manifest requests until
//! the test releases them makes every burst overlap, so each count below is exact.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use pullgate::core::app::App;
use pullgate::core::body::CacheStatus;
use pullgate::core::config::parse_config;
use pullgate::core::ports::{
    ByteStream, KvStore, Ports, StoreError, TagEntry, TagFlight, TagFlightBook, TagFlights,
    TagLease, TagOutcome, TagPoll, Upstream, UpstreamError,
};
use pullgate::core::registry::reference::Digest;
use pullgate::testing::{
    chunked_response, collect, request, run_local, Collected, FakeSecrets, ManualClock,
    MemBlobStore, MemKv, SpawnLocal,
};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
const TAG: &str = "/v2/app/manifests/v1";
/// The double's lease (the Durable Object's is twice the upstream timeout).
const LEASE_MS: u64 = 60_000;

/// An upstream registry serving one manifest as `app:v1` and by digest; manifest requests wait
/// while `held`, and the next `failures` of them answer 503.
#[derive(Default)]
struct HeldRegistry {
    calls: RefCell<Vec<(String, String)>>,
    held: Cell<bool>,
    released: Notify,
    failures: Cell<u32>,
}

impl HeldRegistry {
    fn count(&self, method: &str, needle: &str) -> usize {
        self.calls
            .borrow()
            .iter()
            .filter(|(m, p)| m == method && p.contains(needle))
            .count()
    }

    fn hold(&self) {
        self.held.set(true);
    }

    fn release(&self) {
        self.held.set(false);
        self.released.notify_waiters();
    }
}

struct HeldUpstream(Rc<HeldRegistry>);

#[async_trait::async_trait(?Send)]
impl Upstream for HeldUpstream {
    async fn send(&self, req: Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> {
        let up = &self.0;
        let path = req.uri().path().to_string();
        up.calls
            .borrow_mut()
            .push((req.method().to_string(), path.clone()));
        let d = Digest::of(MANIFEST.as_bytes());
        let known = path.ends_with("/manifests/v1") || path.ends_with(d.as_str());
        if !path.contains("/manifests/") {
            return Ok(chunked_response(404, &[], Bytes::new(), None));
        }
        loop {
            let released = up.released.notified();
            if !up.held.get() {
                break;
            }
            released.await;
        }
        if up.failures.get() > 0 {
            up.failures.set(up.failures.get() - 1);
            return Ok(chunked_response(503, &[], Bytes::new(), None));
        }
        if !known {
            let body = Bytes::from_static(br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#);
            return Ok(chunked_response(404, &[], body, None));
        }
        let body = if req.method() == http::Method::HEAD {
            Bytes::new()
        } else {
            Bytes::from_static(MANIFEST.as_bytes())
        };
        let len = MANIFEST.len().to_string();
        let headers = [
            ("content-type", OCI_MANIFEST),
            ("docker-content-digest", d.as_str()),
            ("content-length", len.as_str()),
        ];
        Ok(chunked_response(200, &headers, body, None))
    }
}

/// The Durable Object's rule in memory: one [`TagFlightBook`] per key, followers woken when a
/// lead publishes. Counts the followers it holds.
#[derive(Default)]
struct MemTagFlights {
    books: RefCell<HashMap<String, TagFlightBook>>,
    published: Notify,
    follows: Cell<usize>,
    publishes: Cell<usize>,
    clock: RefCell<Option<Rc<ManualClock>>>,
}

impl MemTagFlights {
    fn now(&self) -> u64 {
        use pullgate::core::ports::Clock;
        self.clock.borrow().as_ref().map_or(0, |c| c.now_ms())
    }
}

struct MemLease {
    flights: Rc<MemTagFlights>,
    key: String,
    lease: u64,
}

impl TagLease for MemLease {
    fn publish(
        self: Box<Self>,
        outcome: TagOutcome,
    ) -> futures_util::future::LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            if let Some(book) = self.flights.books.borrow_mut().get_mut(&self.key) {
                book.publish(self.lease, outcome);
            }
            self.flights.publishes.set(self.flights.publishes.get() + 1);
            self.flights.published.notify_waiters();
        })
    }
}

struct Shared(Rc<MemTagFlights>);

impl TagFlights for Shared {
    fn enter(&self, key: &str) -> futures_util::future::LocalBoxFuture<'static, TagFlight> {
        let flights = self.0.clone();
        let key = key.to_string();
        Box::pin(async move {
            let now = flights.now();
            let entry = flights
                .books
                .borrow_mut()
                .entry(key.clone())
                .or_default()
                .enter(now, LEASE_MS);
            match entry {
                TagEntry::Lead(lease) => TagFlight::Lead(Box::new(MemLease {
                    flights,
                    key,
                    lease,
                })),
                TagEntry::Follow(lease) => {
                    flights.follows.set(flights.follows.get() + 1);
                    TagFlight::Follow(Box::pin(async move {
                        loop {
                            let published = flights.published.notified();
                            let now = flights.now();
                            let poll = flights
                                .books
                                .borrow_mut()
                                .entry(key.clone())
                                .or_default()
                                .poll(lease, now);
                            match poll {
                                TagPoll::Done(outcome) => return outcome,
                                TagPoll::WaitUntil(_) => published.await,
                            }
                        }
                    }))
                }
            }
        })
    }
}

/// Manifests by digest (and blob links) in a store every instance shares; tag records in the
/// instance's own, as Workers KV looks before a write has propagated.
struct SplitKv {
    shared: Rc<MemKv>,
    own: MemKv,
}

impl SplitKv {
    fn pick(&self, key: &str) -> &MemKv {
        if key.starts_with("manifest/") {
            &self.shared
        } else {
            &self.own
        }
    }
}

#[async_trait::async_trait(?Send)]
impl KvStore for SplitKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.pick(key).get(key).await
    }
    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.pick(key).put(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.pick(key).delete(key).await
    }
    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.pick(prefix).list(prefix, limit).await
    }
}

struct World {
    up: Rc<HeldRegistry>,
    clock: Rc<ManualClock>,
    flights: Rc<MemTagFlights>,
    apps: [App; 2],
}

/// Two instances over one upstream and one manifest store; sharing tag flights or not.
fn world(shared_flights: bool) -> World {
    let up = Rc::new(HeldRegistry::default());
    let clock = Rc::new(ManualClock::at(1_700_000_000_000));
    let flights = Rc::new(MemTagFlights::default());
    *flights.clock.borrow_mut() = Some(clock.clone());
    let manifests = Rc::new(MemKv::default());
    let blobs = Rc::new(MemBlobStore::default());
    let instance = || {
        let config = parse_config(
            r#"
            builtin_upstreams = false
            [cache]
            tag_ttl = "5m"
            max_stale = "1h"
            [[upstream]]
            host = "up.test"
            url = "http://up.test"
            default = true
            "#,
        )
        .unwrap();
        let settings = config.resolve(&FakeSecrets::with(&[])).unwrap();
        let ports = Ports {
            upstream: Rc::new(HeldUpstream(up.clone())),
            kv: Rc::new(SplitKv {
                shared: manifests.clone(),
                own: MemKv::default(),
            }),
            blobs: blobs.clone(),
            clock: clock.clone(),
            deferred: Rc::new(SpawnLocal),
            offload: Rc::new(pullgate::core::ports::InlineOffload),
        };
        let app = App::new(settings, ports);
        if shared_flights {
            app.with_tag_flights(Rc::new(Shared(flights.clone())))
        } else {
            app
        }
    };
    World {
        apps: [instance(), instance()],
        up,
        clock,
        flights,
    }
}

/// Starts a GET of `path` on `app` as its own task.
fn start_get(app: &App, path: &str) -> JoinHandle<Collected> {
    let app = app.clone();
    let req = request("GET", path, &[("accept", OCI_MANIFEST)]);
    tokio::task::spawn_local(async move { collect(app.handle(&req).await).await })
}

/// Starts a GET of the tag on `app` as its own task.
fn start(app: &App) -> JoinHandle<Collected> {
    start_get(app, TAG)
}

/// Lets the other tasks run until `condition` holds (bounded: panics after 10,000 turns).
async fn settle(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if condition() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

/// `n` GETs of `path` spread over both instances, the first one alone until it reached the
/// upstream.
async fn burst_of(w: &World, path: &str, n: usize) -> Vec<JoinHandle<Collected>> {
    let before = w.up.calls.borrow().len();
    let mut tasks = vec![start_get(&w.apps[0], path)];
    settle("the first request reached the upstream", || {
        w.up.calls.borrow().len() == before + 1
    })
    .await;
    tasks.extend((1..n).map(|i| start_get(&w.apps[i % 2], path)));
    tasks
}

async fn burst(w: &World, n: usize) -> Vec<JoinHandle<Collected>> {
    burst_of(w, TAG, n).await
}

/// Each instance fetches the tag once (writing its own record), one after the other.
async fn warm_both(w: &World) {
    for (i, app) in w.apps.iter().enumerate() {
        assert_eq!(finish(vec![start(app)]).await[0].status, StatusCode::OK);
        settle("the lead published", || w.flights.publishes.get() == i + 1).await;
    }
}

async fn finish(tasks: Vec<JoinHandle<Collected>>) -> Vec<Collected> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

fn count(gots: &[Collected], status: CacheStatus) -> usize {
    gots.iter().filter(|g| g.cache() == status).count()
}

#[test]
fn a_burst_for_a_missing_tag_over_two_instances_makes_one_upstream_get() {
    run_local(async {
        let w = world(true);
        w.up.hold();
        let tasks = burst(&w, 8).await;
        settle("seven requests follow", || w.flights.follows.get() == 7).await;
        w.up.release();
        let gots = finish(tasks).await;
        for g in &gots {
            assert_eq!(g.status, StatusCode::OK);
            assert_eq!(g.body.as_ref().unwrap(), MANIFEST.as_bytes());
        }
        assert_eq!(w.up.count("GET", "/manifests/"), 1);
        assert_eq!(count(&gots, CacheStatus::Miss), 1);
        assert_eq!(count(&gots, CacheStatus::Coalesced), 7);
    });
}

#[test]
fn without_shared_flights_each_request_of_a_burst_asks_the_upstream() {
    run_local(async {
        let w = world(false);
        w.up.hold();
        let tasks = burst(&w, 8).await;
        settle("all eight reached the upstream", || {
            w.up.calls.borrow().len() == 8
        })
        .await;
        w.up.release();
        let gots = finish(tasks).await;
        assert!(gots.iter().all(|g| g.status == StatusCode::OK));
        assert_eq!(w.up.count("GET", "/manifests/v1"), 8);
    });
}

#[test]
fn a_burst_for_a_stale_tag_makes_one_head() {
    run_local(async {
        let w = world(true);
        // Both instances hold a record (each wrote its own), then both go stale.
        warm_both(&w).await;
        assert_eq!(w.up.count("GET", "/manifests/"), 2);
        w.clock.advance(301_000);
        w.up.hold();
        let tasks = burst(&w, 8).await;
        settle("seven requests follow", || w.flights.follows.get() == 7).await;
        w.up.release();
        let gots = finish(tasks).await;
        assert!(gots.iter().all(|g| g.status == StatusCode::OK));
        assert_eq!(w.up.count("HEAD", "/manifests/v1"), 1);
        assert_eq!(
            w.up.count("GET", "/manifests/"),
            2,
            "no GET for an unchanged tag"
        );
        assert_eq!(count(&gots, CacheStatus::Hit), 1);
        assert_eq!(count(&gots, CacheStatus::Coalesced), 7);
    });
}

#[test]
fn when_the_lead_finds_the_upstream_failing_followers_serve_their_stale_record() {
    run_local(async {
        let w = world(true);
        warm_both(&w).await;
        w.clock.advance(301_000);
        w.up.hold();
        w.up.failures.set(1);
        let tasks = burst(&w, 6).await;
        settle("five requests follow", || w.flights.follows.get() == 5).await;
        w.up.release();
        let gots = finish(tasks).await;
        assert!(gots.iter().all(|g| g.status == StatusCode::OK));
        assert_eq!(count(&gots, CacheStatus::Stale), 6);
        assert_eq!(w.up.count("HEAD", "/manifests/v1"), 1, "one try for all");
    });
}

#[test]
fn when_the_lead_fails_with_nothing_stale_followers_ask_the_upstream_themselves() {
    run_local(async {
        let w = world(true);
        w.up.hold();
        w.up.failures.set(1);
        let tasks = burst(&w, 4).await;
        settle("three requests follow", || w.flights.follows.get() == 3).await;
        w.up.release();
        let gots = finish(tasks).await;
        assert_eq!(gots[0].status, StatusCode::SERVICE_UNAVAILABLE);
        for g in &gots[1..] {
            assert_eq!(g.status, StatusCode::OK);
            assert_eq!(g.cache(), CacheStatus::Miss);
        }
        assert_eq!(w.up.count("GET", "/manifests/v1"), 4);
    });
}

#[test]
fn a_lead_that_is_dropped_releases_its_followers() {
    run_local(async {
        let w = world(true);
        w.up.hold();
        let mut tasks = burst(&w, 4).await;
        settle("three requests follow", || w.flights.follows.get() == 3).await;
        let lead = tasks.remove(0);
        lead.abort();
        assert!(lead.await.is_err_and(|e| e.is_cancelled()));
        // The lead's guard published "unknown": the followers go to the upstream themselves.
        settle("the followers asked the upstream", || {
            w.up.count("GET", "/manifests/v1") == 4
        })
        .await;
        w.up.release();
        let gots = finish(tasks).await;
        assert!(gots.iter().all(|g| g.status == StatusCode::OK));
    });
}

#[test]
fn a_tag_the_upstream_does_not_know_is_answered_404_to_every_follower_after_one_request() {
    run_local(async {
        let w = world(true);
        w.up.hold();
        let tasks = burst_of(&w, "/v2/app/manifests/nope", 4).await;
        settle("three requests follow", || w.flights.follows.get() == 3).await;
        w.up.release();
        let gots = finish(tasks).await;
        // The held upstream serves only v1: "nope" is 404 upstream.
        for g in &gots {
            assert_eq!(g.status, StatusCode::NOT_FOUND);
            assert!(g.text().contains("MANIFEST_UNKNOWN"), "{}", g.text());
        }
        assert_eq!(w.up.count("GET", "/manifests/nope"), 1);
    });
}
