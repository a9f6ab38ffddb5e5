//! The chart repository proxy through in-memory ports, a manual clock and a scripted upstream
//! that counts every request: freshness and revalidation without sleeping, stale-if-error
//! bounds, verification, and recovery from evicted chunks.

use crate::core::app::App;
use crate::core::body::Body;
use crate::core::config::{parse_config, ConfigError, Secret, SecretResolver};
use crate::core::ports::{
    BlobStore, BodyError, ByteStream, Deferred, Ports, Upstream, UpstreamError,
};
use crate::core::reference::Digest;
use crate::testing::{ManualClock, MemBlobStore, MemKv};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use http::{Request, Response};
use sha2::Digest as _;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

const REPO: &str = "http://charts.test/stable/";
const MIN: u64 = 60_000;

#[derive(Default)]
struct FakeRepo {
    files: RefCell<HashMap<String, Bytes>>,
    /// Every request: (URL, If-None-Match).
    log: RefCell<Vec<(String, Option<String>)>>,
    down: Cell<bool>,
    status: Cell<Option<u16>>,
}

impl FakeRepo {
    fn put(&self, path: &str, bytes: impl Into<Bytes>) {
        self.files
            .borrow_mut()
            .insert(format!("{REPO}{path}"), bytes.into());
    }
    fn count(&self, path: &str) -> usize {
        let url = format!("{REPO}{path}");
        self.log.borrow().iter().filter(|(u, _)| *u == url).count()
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
    let repo = Rc::new(FakeRepo::default());
    let clock = Rc::new(ManualClock::at(1_700_000_000_000));
    let blobs = Rc::new(MemBlobStore::default());
    let config = parse_config(&format!(
        "builtin_upstreams = false\n[[upstream]]\nhost = \"up.test\"\nurl = \"http://up.test\"\ndefault = true\n[cache]\ntag_ttl = \"5m\"\nmax_stale = \"1h\"\n[[helm]]\nname = \"stable\"\nurl = \"{REPO}\"\n"
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
    let mut s = String::from("apiVersion: v1\nentries:\n  app:\n");
    for (file, bytes) in charts {
        s.push_str(&format!(
            "  - digest: {}\n    name: app\n    urls:\n    - {REPO}{file}\n",
            Digest::of(bytes).hex()
        ));
    }
    s.push_str("generated: \"2024-01-01T00:00:00Z\"\n");
    s
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
    assert!(error_of(&body).contains(Digest::of(&a).as_str()));
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
        h.blobs.delete(d.as_str()).await.expect("delete");
    }
    assert_eq!(
        h.get("/charts/stable/index.yaml").await,
        (200, first.clone())
    );
    assert_eq!(h.repo.count("index.yaml"), 2);
    let map: Vec<_> =
        crate::core::helm::store::map_chunks(&[crate::core::helm::rewrite::ChartRef {
            key: "app-1.tgz".into(),
            digest: sha2::Sha256::digest(&a).into(),
            url: format!("{REPO}app-1.tgz"),
        }])
        .collect();
    h.blobs
        .delete(Digest::of(&map[0].1).as_str())
        .await
        .expect("delete");
    assert_eq!(h.get("/charts/stable/app-1.tgz").await, (200, a.to_vec()));
    assert_eq!(h.repo.count("index.yaml"), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn unknown_names_and_methods_are_json_errors() {
    let h = harness();
    let (status, body) = h.get("/charts/other/index.yaml").await;
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("other"));
    let req = Request::post("/charts/stable/index.yaml")
        .body(())
        .expect("request");
    assert_eq!(h.app.handle(&req).await.status().as_u16(), 405);
    assert!(h.repo.log.borrow().is_empty());
}
