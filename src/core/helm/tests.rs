//! The chart repository proxy through in-memory ports, a manual clock and a scripted upstream
//! that counts every request: freshness and revalidation without sleeping, stale-if-error
//! bounds, verification, recovery from evicted chunks, per-repository authorization of cached
//! charts, coalescing of concurrent misses (the upstream holds answers behind a gate the test
//! opens), the chart host rule, and error text free of digests and upstream bodies.

use crate::core::app::App;
use crate::core::body::Body;
use crate::core::config::{parse_config, ConfigError, Secret, SecretResolver};
use crate::core::ports::{
    BlobStore, BodyError, ByteStream, Deferred, Ports, Upstream, UpstreamError,
};
use crate::core::registry::reference::Digest;
use crate::testing::{ManualClock, MemBlobStore, MemKv};
use bytes::Bytes;
use futures_util::future::{join, join_all, LocalBoxFuture, Shared};
use futures_util::{FutureExt, StreamExt};
use http::{Request, Response};
use sha2::Digest as _;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

const REPO: &str = "http://charts.test/stable/";
/// A second `[[helm]]` entry, "other", whose index the tests write as an attacker would.
const OTHER: &str = "http://other.test/charts/";
const MIN: u64 = 60_000;

#[derive(Default)]
struct FakeRepo {
    files: RefCell<HashMap<String, Bytes>>,
    /// Every request: (URL, If-None-Match).
    log: RefCell<Vec<(String, Option<String>)>>,
    down: Cell<bool>,
    status: Cell<Option<u16>>,
    /// While set, every answer waits for it (after the request is logged).
    gate: RefCell<Option<Shared<LocalBoxFuture<'static, ()>>>>,
}

impl FakeRepo {
    fn put(&self, path: &str, bytes: impl Into<Bytes>) {
        self.put_url(&format!("{REPO}{path}"), bytes);
    }
    fn put_url(&self, url: &str, bytes: impl Into<Bytes>) {
        self.files
            .borrow_mut()
            .insert(url.to_string(), bytes.into());
    }
    fn count(&self, path: &str) -> usize {
        self.count_url(&format!("{REPO}{path}"))
    }
    fn count_url(&self, url: &str) -> usize {
        self.log.borrow().iter().filter(|(u, _)| *u == url).count()
    }
    /// Holds every answer until the returned sender is used (or dropped).
    fn close_gate(&self) -> tokio::sync::oneshot::Sender<()> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        *self.gate.borrow_mut() = Some(rx.map(|_| ()).boxed_local().shared());
        tx
    }
}

struct FakeUpstream(Rc<FakeRepo>);

#[async_trait::async_trait(?Send)]
impl Upstream for FakeUpstream {
    async fn send(&self, req: Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> {
        let repo = &self.0;
        let url = req.uri().to_string();
        let inm = req
            .headers()
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        repo.log.borrow_mut().push((url.clone(), inm.clone()));
        let gate = repo.gate.borrow().clone();
        if let Some(gate) = gate {
            gate.await;
        }
        if repo.down.get() {
            return Err(UpstreamError::Connect("connection refused".into()));
        }
        let reply = |status: u16, etag: Option<String>, body: Bytes| {
            let mut b = Response::builder().status(status);
            if let Some(e) = etag {
                b = b.header("etag", e);
            }
            b = b.header("content-length", body.len());
            let stream: ByteStream = futures_util::stream::iter(
                body.chunks(1000)
                    .map(|c| Ok::<_, BodyError>(Bytes::copy_from_slice(c)))
                    .collect::<Vec<_>>(),
            )
            .boxed_local();
            Ok(b.body(stream).expect("response"))
        };
        if let Some(s) = repo.status.get() {
            return reply(s, None, Bytes::from_static(b"<html>oops</html>"));
        }
        match repo.files.borrow().get(&url) {
            Some(body) => {
                let etag = format!("\"{}\"", &Digest::of(body).hex()[..16]);
                if inm.as_deref() == Some(etag.as_str()) {
                    reply(304, Some(etag), Bytes::new())
                } else {
                    reply(200, Some(etag), body.clone())
                }
            }
            None => reply(404, None, Bytes::new()),
        }
    }
}

/// Fills run inline: the request awaiting a fill drives it.
struct DropDeferred;
impl Deferred for DropDeferred {
    fn spawn(&self, _work: LocalBoxFuture<'static, ()>) {}
}

struct NoSecrets;
impl SecretResolver for NoSecrets {
    fn resolve(&self, r: &str) -> Result<Secret, ConfigError> {
        Err(ConfigError(format!("{r} unset")))
    }
}

struct Harness {
    app: App,
    repo: Rc<FakeRepo>,
    clock: Rc<ManualClock>,
    blobs: Rc<MemBlobStore>,
}

fn harness() -> Harness {
    harness_with("")
}

/// The harness with `stable` (carrying `stable_extra` lines) and `other` configured.
fn harness_with(stable_extra: &str) -> Harness {
    let repo = Rc::new(FakeRepo::default());
    let clock = Rc::new(ManualClock::at(1_700_000_000_000));
    let blobs = Rc::new(MemBlobStore::default());
    let config = parse_config(&format!(
        "builtin_upstreams = false\n[[upstream]]\nhost = \"up.test\"\nurl = \"http://up.test\"\ndefault = true\n[cache]\ntag_ttl = \"5m\"\nmax_stale = \"1h\"\n[[helm]]\nname = \"stable\"\nurl = \"{REPO}\"\n{stable_extra}\n[[helm]]\nname = \"other\"\nurl = \"{OTHER}\"\n"
    ))
    .expect("config");
    let ports = Ports {
        upstream: Rc::new(FakeUpstream(repo.clone())),
        kv: Rc::new(MemKv::default()),
        blobs: blobs.clone(),
        clock: clock.clone(),
        deferred: Rc::new(DropDeferred),
        offload: Rc::new(crate::core::ports::InlineOffload),
    };
    Harness {
        app: App::new(config.resolve(&NoSecrets).expect("settings"), ports),
        repo,
        clock,
        blobs,
    }
}

fn chart(n: u8) -> Bytes {
    Bytes::from(vec![n; 3000 + usize::from(n)])
}

fn index(charts: &[(&str, &Bytes)]) -> String {
    let urls: Vec<(String, String)> = charts
        .iter()
        .map(|(file, bytes)| (format!("{REPO}{file}"), Digest::of(bytes).hex().to_string()))
        .collect();
    index_of(&urls)
}

/// An index listing (absolute URL, sha256 hex) pairs.
fn index_of(charts: &[(String, String)]) -> String {
    let mut s = String::from("apiVersion: v1\nentries:\n  app:\n");
    for (url, hex) in charts {
        s.push_str(&format!(
            "  - digest: {hex}\n    name: app\n    urls:\n    - {url}\n"
        ));
    }
    s.push_str("generated: \"2024-01-01T00:00:00Z\"\n");
    s
}

/// Polls (yielding to the other futures of the test) until `cond` holds; bounded.
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

impl Harness {
    async fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let req = Request::get(path).body(()).expect("request");
        let resp = self.app.handle(&req).await;
        let status = resp.status().as_u16();
        let body = match resp.into_body() {
            Body::Empty => Vec::new(),
            Body::Bytes(b) => b.to_vec(),
            Body::Stream(mut s) => {
                let mut out = Vec::new();
                while let Some(c) = s.next().await {
                    out.extend_from_slice(&c.expect("body chunk"));
                }
                out
            }
            Body::Host(_) => panic!("host body from the in-memory store"),
        };
        (status, body)
    }
}

fn error_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON error");
    v["error"].as_str().expect("error").to_string()
}

#[tokio::test(flavor = "current_thread")]
async fn index_is_fresh_for_the_ttl_then_revalidated_with_its_etag() {
    let h = harness();
    let a = chart(1);
    h.repo.put("index.yaml", index(&[("app-1.tgz", &a)]));
    let (status, first) = h.get("/charts/stable/index.yaml").await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&first).contains("    - app-1.tgz\n"));
    h.clock.advance(4 * MIN);
    assert_eq!(
        h.get("/charts/stable/index.yaml").await,
        (200, first.clone())
    );
    assert_eq!(h.repo.count("index.yaml"), 1);
    h.clock.advance(2 * MIN);
    assert_eq!(
        h.get("/charts/stable/index.yaml").await,
        (200, first.clone())
    );
    assert_eq!(h.repo.count("index.yaml"), 2);
    assert!(
        h.repo.log.borrow()[1].1.is_some(),
        "revalidation is conditional"
    );
    // The 304 renewed the record: fresh again for the TTL.
    h.clock.advance(4 * MIN);
    h.get("/charts/stable/index.yaml").await;
    assert_eq!(h.repo.count("index.yaml"), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn stale_index_is_served_within_max_stale_on_any_upstream_failure() {
    let h = harness();
    let a = chart(1);
    h.repo.put("index.yaml", index(&[("app-1.tgz", &a)]));
    h.repo.put("app-1.tgz", a.clone());
    let (_, first) = h.get("/charts/stable/index.yaml").await;
    assert_eq!(h.get("/charts/stable/app-1.tgz").await, (200, a.to_vec()));

    h.clock.advance(10 * MIN);
    h.repo.status.set(Some(500));
    assert_eq!(
        h.get("/charts/stable/index.yaml").await,
        (200, first.clone())
    );
    h.repo.status.set(Some(200)); // an HTML page with 200: not an index
    assert_eq!(
        h.get("/charts/stable/index.yaml").await,
        (200, first.clone())
    );
    h.repo.status.set(None);
    h.repo.down.set(true);
    assert_eq!(
        h.get("/charts/stable/index.yaml").await,
        (200, first.clone())
    );
    assert_eq!(h.get("/charts/stable/app-1.tgz").await, (200, a.to_vec()));

    h.clock.advance(60 * MIN);
    let (status, body) = h.get("/charts/stable/index.yaml").await;
    assert_eq!(status, 503);
    assert!(error_of(&body).contains("index"));
    // A cached chart does not depend on the index's freshness.
    assert_eq!(h.get("/charts/stable/app-1.tgz").await, (200, a.to_vec()));
}

#[tokio::test(flavor = "current_thread")]
async fn upstream_404_answers_404_and_keeps_the_cached_index() {
    let h = harness();
    let a = chart(1);
    h.repo.put("index.yaml", index(&[("app-1.tgz", &a)]));
    let (_, first) = h.get("/charts/stable/index.yaml").await;
    h.repo.files.borrow_mut().clear();
    h.clock.advance(10 * MIN);
    assert_eq!(h.get("/charts/stable/index.yaml").await.0, 404);
    h.repo.down.set(true);
    assert_eq!(h.get("/charts/stable/index.yaml").await, (200, first));
}

#[tokio::test(flavor = "current_thread")]
async fn chart_with_wrong_bytes_is_refused_and_nothing_is_stored() {
    let h = harness();
    let a = chart(1);
    h.repo.put("index.yaml", index(&[("app-1.tgz", &a)]));
    h.repo.put("app-1.tgz", chart(2));
    h.get("/charts/stable/index.yaml").await;
    let stored = h.blobs.count();
    let (status, body) = h.get("/charts/stable/app-1.tgz").await;
    assert_eq!(status, 502);
    let e = error_of(&body);
    assert!(
        e.contains("did not match the digest its index lists"),
        "{e}"
    );
    assert_eq!(h.blobs.count(), stored);
    h.repo.put("app-1.tgz", a.clone());
    assert_eq!(h.get("/charts/stable/app-1.tgz").await, (200, a.to_vec()));
    assert_eq!(h.blobs.count(), stored + 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_chart_missing_from_a_stale_index_revalidates_it_once() {
    let h = harness();
    let (a, b) = (chart(1), chart(2));
    h.repo.put("index.yaml", index(&[("app-1.tgz", &a)]));
    h.repo.put("app-2.tgz", b.clone());
    h.get("/charts/stable/index.yaml").await;
    h.repo
        .put("index.yaml", index(&[("app-1.tgz", &a), ("app-2.tgz", &b)]));
    // Fresh index: not listed, no upstream request.
    assert_eq!(h.get("/charts/stable/app-2.tgz").await.0, 404);
    assert_eq!(h.repo.count("index.yaml"), 1);
    h.clock.advance(6 * MIN);
    assert_eq!(h.get("/charts/stable/app-2.tgz").await, (200, b.to_vec()));
    assert_eq!(h.repo.count("index.yaml"), 2);
    assert_eq!(h.get("/charts/stable/app-3.tgz").await.0, 404);
    assert_eq!(h.repo.count("index.yaml"), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn evicted_chunks_are_rebuilt_from_the_upstream() {
    let h = harness();
    let a = chart(1);
    h.repo.put("index.yaml", index(&[("app-1.tgz", &a)]));
    h.repo.put("app-1.tgz", a.clone());
    let (_, first) = h.get("/charts/stable/index.yaml").await;
    // Evict everything the index stored (chunks and map), as the native LRU or a purge may.
    for d in [Digest::of(&first)] {
        h.blobs.delete(&d).await.expect("delete");
    }
    assert_eq!(
        h.get("/charts/stable/index.yaml").await,
        (200, first.clone())
    );
    assert_eq!(h.repo.count("index.yaml"), 2);
    let map: Vec<_> = crate::core::helm::store::map_chunks(&[crate::core::helm::entry::ChartRef {
        key: "app-1.tgz".into(),
        digest: sha2::Sha256::digest(&a).into(),
        url: format!("{REPO}app-1.tgz"),
    }])
    .collect();
    h.blobs
        .delete(&Digest::of(&map[0].1))
        .await
        .expect("delete");
    assert_eq!(h.get("/charts/stable/app-1.tgz").await, (200, a.to_vec()));
    assert_eq!(h.repo.count("index.yaml"), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn unknown_names_and_methods_are_json_errors() {
    let h = harness();
    let (status, body) = h.get("/charts/nope/index.yaml").await;
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("nope"));
    let req = Request::post("/charts/stable/index.yaml")
        .body(())
        .expect("request");
    assert_eq!(h.app.handle(&req).await.status().as_u16(), 405);
    assert!(h.repo.log.borrow().is_empty());
}

fn hex_of(bytes: &[u8]) -> String {
    Digest::of(bytes).hex().to_string()
}

fn coalesced(h: &Harness) -> u64 {
    h.app
        .metrics()
        .coalesced_waits
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// `stable` lists `a` as app-1.tgz and has pulled it.
async fn cache_for_stable(h: &Harness, a: &Bytes) {
    h.repo.put("index.yaml", index(&[("app-1.tgz", a)]));
    h.repo.put("app-1.tgz", a.clone());
    assert_eq!(h.get("/charts/stable/app-1.tgz").await, (200, a.to_vec()));
}

#[tokio::test(flavor = "current_thread")]
async fn a_chart_cached_for_one_repository_is_not_served_through_another_index() {
    let h = harness();
    let private = chart(7);
    cache_for_stable(&h, &private).await;
    // An index the attacker writes lists the private digest under URLs of its own: one its
    // upstream 404s, one that answers other bytes.
    let (gone, wrong) = (format!("{OTHER}gone.tgz"), format!("{OTHER}wrong.tgz"));
    let decoy = chart(8);
    h.repo.put_url(&wrong, decoy.clone());
    h.repo.put_url(
        &format!("{OTHER}index.yaml"),
        index_of(&[
            (gone.clone(), hex_of(&private)),
            (wrong.clone(), hex_of(&private)),
        ]),
    );
    let (status, body) = h.get("/charts/other/gone.tgz").await;
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("gone.tgz"));
    assert_eq!(h.repo.count_url(&gone), 1, "other's own upstream was asked");
    let (status, body) = h.get("/charts/other/wrong.tgz").await;
    assert_eq!(status, 502);
    let e = error_of(&body);
    assert!(
        e.contains("did not match the digest its index lists"),
        "{e}"
    );
    for d in [hex_of(&private), hex_of(&decoy)] {
        assert!(!e.contains(&d), "{e}");
    }
    // Refused again: nothing was recorded for `other`, so it asks again.
    assert_eq!(h.get("/charts/other/gone.tgz").await.0, 404);
    assert_eq!(h.repo.count_url(&gone), 2);
    // HEAD is refused the same way.
    let req = Request::head("/charts/other/gone.tgz")
        .body(())
        .expect("request");
    assert_eq!(h.app.handle(&req).await.status().as_u16(), 404);
    // `stable` still holds it: a hit, no upstream request.
    let before = h.repo.log.borrow().len();
    assert_eq!(
        h.get("/charts/stable/app-1.tgz").await,
        (200, private.to_vec())
    );
    assert_eq!(h.repo.log.borrow().len(), before);
}

#[tokio::test(flavor = "current_thread")]
async fn a_registry_blob_is_not_served_through_a_chart_index() {
    let h = harness();
    let layer = Bytes::from_static(b"the bytes of a private image layer");
    h.blobs.insert(Digest::of(&layer).as_str(), layer.clone());
    let url = format!("{OTHER}layer.tgz");
    h.repo.put_url(
        &format!("{OTHER}index.yaml"),
        index_of(&[(url.clone(), hex_of(&layer))]),
    );
    let (status, body) = h.get("/charts/other/layer.tgz").await;
    assert_eq!(status, 404);
    assert!(!body.windows(layer.len()).any(|w| w == &layer[..]));
    assert_eq!(h.repo.count_url(&url), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_repository_whose_upstream_has_the_bytes_proves_it_once_then_hits() {
    let h = harness();
    let shared = chart(5);
    cache_for_stable(&h, &shared).await;
    let url = format!("{OTHER}app-1.tgz");
    h.repo.put_url(&url, shared.clone());
    h.repo.put_url(
        &format!("{OTHER}index.yaml"),
        index_of(&[(url.clone(), hex_of(&shared))]),
    );
    assert_eq!(
        h.get("/charts/other/app-1.tgz").await,
        (200, shared.to_vec())
    );
    assert_eq!(h.repo.count_url(&url), 1);
    assert_eq!(
        h.get("/charts/other/app-1.tgz").await,
        (200, shared.to_vec())
    );
    assert_eq!(h.repo.count_url(&url), 1, "the proof was recorded");
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_chart_misses_share_one_upstream_fetch() {
    let h = harness();
    let a = chart(1);
    h.repo.put("index.yaml", index(&[("app-1.tgz", &a)]));
    h.repo.put("app-1.tgz", a.clone());
    assert_eq!(h.get("/charts/stable/index.yaml").await.0, 200);

    // A failing fill is shared too, and not remembered.
    h.repo.status.set(Some(503));
    let gate = h.repo.close_gate();
    let (results, ()) = join(
        join_all((0..8).map(|_| h.get("/charts/stable/app-1.tgz"))),
        async {
            until("seven requests joined the first", || coalesced(&h) == 7).await;
            let _ = gate.send(());
        },
    )
    .await;
    assert!(results.iter().all(|(s, _)| *s == 503), "{results:?}");
    assert_eq!(h.repo.count("app-1.tgz"), 1);

    h.repo.status.set(None);
    let gate = h.repo.close_gate();
    let (results, ()) = join(
        join_all((0..8).map(|_| h.get("/charts/stable/app-1.tgz"))),
        async {
            until("seven more requests joined", || coalesced(&h) == 14).await;
            let _ = gate.send(());
        },
    )
    .await;
    assert!(results.iter().all(|r| *r == (200, a.to_vec())));
    assert_eq!(h.repo.count("app-1.tgz"), 2);
    *h.repo.gate.borrow_mut() = None;
    assert_eq!(h.get("/charts/stable/app-1.tgz").await, (200, a.to_vec()));
    assert_eq!(h.repo.count("app-1.tgz"), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_index_misses_share_one_upstream_fetch() {
    let h = harness();
    let a = chart(1);
    h.repo.put("index.yaml", index(&[("app-1.tgz", &a)]));
    h.repo.put("app-1.tgz", a.clone());
    let gate = h.repo.close_gate();
    // Cold: index requests and chart requests (which need the index first) all wait on one
    // GET of the index.
    let (results, ()) = join(
        join_all((0..8).map(|i| {
            h.get(if i % 2 == 0 {
                "/charts/stable/index.yaml"
            } else {
                "/charts/stable/app-1.tgz"
            })
        })),
        async {
            until("seven requests joined the index fetch", || {
                coalesced(&h) == 7
            })
            .await;
            let _ = gate.send(());
        },
    )
    .await;
    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    assert_eq!(h.repo.count("index.yaml"), 1);

    // Stale: the revalidations are shared as well (one conditional GET).
    h.clock.advance(6 * MIN);
    let before = coalesced(&h);
    let gate = h.repo.close_gate();
    let (results, ()) = join(
        join_all((0..8).map(|_| h.get("/charts/stable/index.yaml"))),
        async {
            until("seven revalidations joined", || coalesced(&h) == before + 7).await;
            let _ = gate.send(());
        },
    )
    .await;
    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    assert_eq!(h.repo.count("index.yaml"), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_fills_of_one_digest_for_two_repositories_are_not_shared() {
    let h = harness();
    let a = chart(3);
    let url = format!("{OTHER}app-1.tgz");
    h.repo.put("index.yaml", index(&[("app-1.tgz", &a)]));
    h.repo.put("app-1.tgz", a.clone());
    h.repo.put_url(
        &format!("{OTHER}index.yaml"),
        index_of(&[(url.clone(), hex_of(&a))]),
    );
    assert_eq!(h.get("/charts/stable/index.yaml").await.0, 200);
    assert_eq!(h.get("/charts/other/index.yaml").await.0, 200);
    // `other`'s upstream does not have the chart: it must not ride on `stable`'s fill.
    let gate = h.repo.close_gate();
    let (results, ()) = join(
        join_all([
            h.get("/charts/stable/app-1.tgz"),
            h.get("/charts/other/app-1.tgz"),
        ]),
        async {
            until("both fills reached their upstreams", || {
                h.repo.count("app-1.tgz") == 1 && h.repo.count_url(&url) == 1
            })
            .await;
            let _ = gate.send(());
        },
    )
    .await;
    assert_eq!(results[0], (200, a.to_vec()));
    assert_eq!(results[1].0, 404);
    assert_eq!(coalesced(&h), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn chart_urls_off_the_index_host_are_refused_and_not_fetched() {
    let a = chart(1);
    let elsewhere = "http://cdn.test/app-1.tgz";
    let off_port = "http://charts.test:8080/app-2.tgz";
    let b = chart(2);
    let setup = |h: &Harness| {
        h.repo.put(
            "index.yaml",
            index_of(&[
                (elsewhere.to_string(), hex_of(&a)),
                (off_port.to_string(), hex_of(&b)),
            ]),
        );
        h.repo.put_url(elsewhere, a.clone());
        h.repo.put_url(off_port, b.clone());
    };
    let h = harness();
    setup(&h);
    for (path, url) in [("app-1.tgz", elsewhere), ("app-2.tgz", off_port)] {
        let (status, body) = h.get(&format!("/charts/stable/{path}")).await;
        assert_eq!(status, 502);
        let e = error_of(&body);
        assert!(
            e.contains("chart_hosts") && e.contains("not fetched"),
            "{e}"
        );
        assert_eq!(h.repo.count_url(url), 0, "{url} was fetched");
    }
    // Listed hosts (with the port where it is not the default) are fetched.
    let h = harness_with("chart_hosts = [\"cdn.test\", \"charts.test:8080\"]");
    setup(&h);
    assert_eq!(h.get("/charts/stable/app-1.tgz").await, (200, a.to_vec()));
    assert_eq!(h.get("/charts/stable/app-2.tgz").await, (200, b.to_vec()));
    // A listed host without a port allows only the default one.
    let h = harness_with("chart_hosts = [\"charts.test\"]");
    setup(&h);
    assert_eq!(h.get("/charts/stable/app-2.tgz").await.0, 502);
    assert_eq!(h.repo.count_url(off_port), 0);
}

#[test]
fn bad_chart_hosts_are_configuration_errors() {
    for bad in ["https://cdn.test", "cdn.test/x", "cdn.test:http"] {
        let config = parse_config(&format!(
            "[[helm]]\nname = \"s\"\nurl = \"{REPO}\"\nchart_hosts = [\"{bad}\"]\n"
        ))
        .expect("parses");
        let Err(e) = config.resolve(&NoSecrets) else {
            panic!("{bad:?} was accepted");
        };
        assert!(e.0.contains("chart_hosts"), "{}", e.0);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn errors_carry_no_digest_and_no_upstream_body_text() {
    let h = harness();
    let a = chart(1);
    let served = chart(2);
    h.repo.put("index.yaml", index(&[("app-1.tgz", &a)]));
    h.repo.put("app-1.tgz", served.clone());
    let (status, body) = h.get("/charts/stable/app-1.tgz").await;
    assert_eq!(status, 502);
    let e = error_of(&body);
    assert!(
        !e.contains(&hex_of(&served)) && !e.contains(&hex_of(&a)),
        "{e}"
    );
    assert!(!e.contains("sha256"), "{e}");
    // An upstream error page: the status, not the page.
    h.repo.status.set(Some(500));
    let (status, body) = h.get("/charts/other/index.yaml").await;
    assert_eq!(status, 503);
    assert!(!error_of(&body).contains("oops"));
    // An answer that is not an index (say, an internal service's): the line, not its text.
    h.repo.status.set(None);
    h.repo.put_url(
        &format!("{OTHER}index.yaml"),
        "apiVersion: v1\nAccessKeyId=AKIASECRET\n",
    );
    let (status, body) = h.get("/charts/other/index.yaml").await;
    assert_eq!(status, 502);
    let e = error_of(&body);
    assert!(e.contains("line 2") && !e.contains("AKIA"), "{e}");
}
