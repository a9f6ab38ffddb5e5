//! The core's seam for fills a host runs in its own runtime (`BlobStore::fill_from`, used by
//! the Workers host to keep blob bytes out of wasm): the core still decides the route, the
//! upstream request and the links, hands the host the upstream's response, gives one client
//! the host's live body, answers every other reader from the store once the host reports the
//! blob committed, and stores and links nothing when the host reports a mismatch.

use bytes::Bytes;
use futures_util::future::{join_all, LocalBoxFuture};
use futures_util::StreamExt;
use http::{Response, StatusCode};
use pullgate::core::app::App;
use pullgate::core::body::{Body, CacheStatus, HostBody, RequestInfo};
use pullgate::core::config::parse_config;
use pullgate::core::ports::{
    BlobStore, BlobWriter, ByteStream, HostFill, HostFillError, NativeFill, Ports, StoreError,
};
use pullgate::core::registry::reference::Digest;
use pullgate::testing::{
    chunked_response, request, run_local, FakeSecrets, FakeUpstream, ManualClock, MemBlobStore,
    MemKv, SpawnLocal,
};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// The live body a [`FakeHostFill`] hands out (the test looks for it).
struct LiveBody;

/// A host fill that reads the upstream body itself, verifies it and stores it in `store`.
struct FakeHostFill {
    body: RefCell<Option<ByteStream>>,
    taken: Cell<bool>,
    digest: Digest,
    store: Rc<MemBlobStore>,
}

impl HostFill for FakeHostFill {
    fn take_body(&self) -> Option<Body> {
        (!self.taken.replace(true)).then(|| Body::Host(HostBody(Box::new(LiveBody))))
    }

    fn outcome(&self) -> LocalBoxFuture<'static, Result<(), HostFillError>> {
        let body = self.body.borrow_mut().take();
        let (digest, store) = (self.digest.clone(), self.store.clone());
        Box::pin(async move {
            let mut body = body.ok_or(HostFillError::Failed("outcome asked twice".into()))?;
            let mut all = Vec::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| HostFillError::Failed(e.0))?;
                all.extend_from_slice(&chunk);
            }
            if Digest::of(&all) != digest {
                return Err(HostFillError::DigestMismatch);
            }
            store.insert(digest.as_str(), Bytes::from(all));
            Ok(())
        })
    }
}

/// An in-memory store that fills blobs "natively" when the length is known.
struct NativeStore {
    mem: Rc<MemBlobStore>,
    native_fills: Cell<usize>,
}

#[async_trait::async_trait(?Send)]
impl BlobStore for NativeStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.mem.stat(digest).await
    }
    async fn read(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Option<ByteStream>, StoreError> {
        self.mem.read(digest, start, end).await
    }
    async fn create(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Box<dyn BlobWriter>, StoreError> {
        self.mem.create(digest, size).await
    }
    async fn fill_from(
        &self,
        digest: &Digest,
        size: Option<u64>,
        upstream: Response<ByteStream>,
    ) -> NativeFill {
        if size.is_none() {
            return NativeFill::Declined(upstream);
        }
        self.native_fills.set(self.native_fills.get() + 1);
        NativeFill::Started(Rc::new(FakeHostFill {
            body: RefCell::new(Some(upstream.into_body())),
            taken: Cell::new(false),
            digest: digest.clone(),
            store: self.mem.clone(),
        }))
    }
}

struct Harness {
    app: App,
    store: Rc<NativeStore>,
    gets: Rc<Cell<usize>>,
    corrupt: Rc<Cell<bool>>,
}

fn harness(blob: Bytes) -> Harness {
    let settings = parse_config(
        r#"
        builtin_upstreams = false
        [[upstream]]
        host = "up.test"
        url = "http://up.test"
        default = true
        "#,
    )
    .unwrap()
    .resolve(&FakeSecrets::with(&[]))
    .unwrap();
    let gets = Rc::new(Cell::new(0));
    let corrupt = Rc::new(Cell::new(false));
    let store = Rc::new(NativeStore {
        mem: Rc::new(MemBlobStore::default()),
        native_fills: Cell::new(0),
    });
    let upstream = {
        let (gets, corrupt) = (gets.clone(), corrupt.clone());
        FakeUpstream::new(move |req| {
            if req.uri().path().contains("/blobs/") && req.method() == http::Method::GET {
                gets.set(gets.get() + 1);
                let mut bytes = blob.to_vec();
                if corrupt.get() {
                    bytes[10] ^= 0xff;
                }
                let len = bytes.len().to_string();
                return Ok(chunked_response(
                    200,
                    &[("content-length", &len)],
                    Bytes::from(bytes),
                    None,
                ));
            }
            Ok(chunked_response(404, &[], Bytes::new(), None))
        })
    };
    let ports = Ports {
        upstream: Rc::new(upstream),
        kv: Rc::new(MemKv::default()),
        blobs: store.clone(),
        clock: Rc::new(ManualClock::at(1_700_000_000_000)),
        deferred: Rc::new(SpawnLocal),
        offload: Rc::new(pullgate::core::ports::InlineOffload),
    };
    Harness {
        app: App::new(settings, ports),
        store,
        gets,
        corrupt,
    }
}

/// What a client got: the live host body, or the bytes of a streamed body (or its error).
enum Got {
    Live,
    Bytes(Bytes),
    Failed,
    Empty,
}

async fn pull(app: &App, path: &str) -> (StatusCode, CacheStatus, Got) {
    let resp = app.handle(&request("GET", path, &[])).await;
    let cache = resp
        .extensions()
        .get::<RequestInfo>()
        .map(|i| i.cache)
        .unwrap_or(CacheStatus::None);
    let status = resp.status();
    let got = match resp.into_body() {
        Body::Host(h) => {
            assert!(h.0.downcast::<LiveBody>().is_ok(), "an unknown host body");
            Got::Live
        }
        Body::Stream(mut s) => {
            let mut out = Vec::new();
            let mut failed = false;
            while let Some(c) = s.next().await {
                match c {
                    Ok(c) => out.extend_from_slice(&c),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                Got::Failed
            } else {
                Got::Bytes(Bytes::from(out))
            }
        }
        Body::Bytes(b) => Got::Bytes(b),
        Body::Empty => Got::Empty,
    };
    (status, cache, got)
}

fn blob() -> Bytes {
    Bytes::from(
        (0..300_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[test]
fn concurrent_misses_share_one_host_fill_one_live_body_and_the_rest_from_the_store() {
    run_local(async {
        let bytes = blob();
        let h = harness(bytes.clone());
        let digest = Digest::of(&bytes);
        let path = format!("/v2/app/blobs/{digest}");
        let gots = join_all((0..6).map(|_| pull(&h.app, &path))).await;
        assert_eq!(h.gets.get(), 1, "one upstream transfer");
        assert_eq!(h.store.native_fills.get(), 1, "filled by the host");
        let live = gots.iter().filter(|g| matches!(g.2, Got::Live)).count();
        assert_eq!(live, 1, "exactly one client takes the live body");
        for (status, cache, got) in &gots {
            assert_eq!(*status, StatusCode::OK);
            match got {
                Got::Live => assert_eq!(*cache, CacheStatus::Miss),
                Got::Bytes(b) => {
                    assert_eq!(b, &bytes, "the others read the committed blob");
                    assert_eq!(*cache, CacheStatus::Coalesced);
                }
                Got::Failed | Got::Empty => panic!("a reader failed"),
            }
        }
        assert_eq!(h.store.mem.get(digest.as_str()).unwrap(), bytes);
        // Linked to the repository it was fetched for: a hit with no upstream request.
        let (status, cache, got) = pull(&h.app, &path).await;
        assert_eq!((status, cache), (StatusCode::OK, CacheStatus::Hit));
        assert!(matches!(got, Got::Bytes(b) if b == bytes));
        assert_eq!(h.gets.get(), 1);
        let metrics = h.app.metrics().render();
        assert!(metrics.contains("\npullgate_bytes_fetched_total 300000\n"));
    });
}

#[test]
fn a_mismatch_reported_by_the_host_stores_and_links_nothing() {
    run_local(async {
        let bytes = blob();
        let h = harness(bytes.clone());
        h.corrupt.set(true);
        let digest = Digest::of(&bytes);
        let path = format!("/v2/app/blobs/{digest}");
        let gots = join_all((0..3).map(|_| pull(&h.app, &path))).await;
        assert_eq!(h.gets.get(), 1);
        for (status, _, got) in &gots {
            // The live body's verdict is the host's to deliver; the others get the failure.
            if !matches!(got, Got::Live) {
                assert!(status.is_server_error(), "a joiner got {status}");
            }
        }
        assert_eq!(h.store.mem.count(), 0, "nothing stored");
        let metrics = h.app.metrics().render();
        assert!(metrics.contains("\npullgate_digest_mismatches_total 1\n"));
        // Nothing cached or linked: the next pull goes upstream again and fills.
        h.corrupt.set(false);
        let (status, cache, got) = pull(&h.app, &path).await;
        assert_eq!((status, cache), (StatusCode::OK, CacheStatus::Miss));
        assert!(matches!(got, Got::Live));
        assert_eq!(h.gets.get(), 2);
    });
}
