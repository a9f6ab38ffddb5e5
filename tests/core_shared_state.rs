//! The core's state shared across instances through host ports (issue #11): rate-limit
//! buckets in a [`RateLimitStore`] and upstream tokens in a [`TokenStore`]. Each test builds a
//! fresh core instance per request, as Spin does, over one shared in-memory store — the
//! behaviour every host's store (Spin's key-value store, a Durable Object) must give.

use bytes::Bytes;
use http::{Response, StatusCode};
use pullgate::core::access::ClientAddr;
use pullgate::core::app::App;
use pullgate::core::config::parse_config;
use pullgate::core::ports::{
    BucketLimit, BucketState, BucketTake, ByteStream, Ports, RateLimitStore, StoreError,
    StoredToken, TokenStore,
};
use pullgate::testing::{
    chunked_response, collect, request, run_local, Collected, FakeSecrets, FakeUpstream,
    ManualClock, MemBlobStore, MemKv, SpawnLocal,
};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;

/// Buckets in memory, shared by every instance holding the `Rc`; `fail` makes every take fail.
#[derive(Default)]
struct SharedBuckets {
    buckets: RefCell<HashMap<String, BucketState>>,
    fail: Cell<bool>,
}

#[async_trait::async_trait(?Send)]
impl RateLimitStore for SharedBuckets {
    async fn take(
        &self,
        key: &str,
        limit: BucketLimit,
        now_ms: u64,
    ) -> Result<BucketTake, StoreError> {
        if self.fail.get() {
            return Err(StoreError("the bucket store is down".into()));
        }
        let mut buckets = self.buckets.borrow_mut();
        let b = buckets
            .entry(key.to_string())
            .or_insert(BucketState::full(limit, now_ms));
        Ok(b.take(limit, now_ms))
    }
}

/// Tokens in memory, shared by every instance holding the `Rc`.
#[derive(Default)]
struct SharedTokens(RefCell<HashMap<(String, String), StoredToken>>);

#[async_trait::async_trait(?Send)]
impl TokenStore for SharedTokens {
    async fn get(
        &self,
        upstream: &str,
        scope: &str,
        now_ms: u64,
    ) -> Result<Option<StoredToken>, StoreError> {
        let key = (upstream.to_string(), scope.to_string());
        Ok(self
            .0
            .borrow()
            .get(&key)
            .filter(|t| t.valid_until_ms > now_ms)
            .cloned())
    }

    async fn put(
        &self,
        upstream: &str,
        scope: &str,
        token: &StoredToken,
    ) -> Result<(), StoreError> {
        self.0
            .borrow_mut()
            .insert((upstream.to_string(), scope.to_string()), token.clone());
        Ok(())
    }
}

/// An upstream at `http://up.test` that wants a bearer token (from `http://up.test/token`,
/// valid 300 s) for its one manifest, counting the tokens it issued.
#[derive(Default)]
struct TokenUpstream {
    issued: Cell<u32>,
}

impl TokenUpstream {
    fn respond(&self, req: &http::Request<Bytes>) -> Response<ByteStream> {
        let path = req.uri().path();
        if path == "/token" {
            self.issued.set(self.issued.get() + 1);
            let body = format!(r#"{{"token":"tok{}","expires_in":300}}"#, self.issued.get());
            return chunked_response(200, &[], Bytes::from(body), None);
        }
        let authorized = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("Bearer tok"));
        if !authorized {
            let challenge = r#"Bearer realm="http://up.test/token",service="up.test""#;
            return chunked_response(401, &[("www-authenticate", challenge)], Bytes::new(), None);
        }
        let digest = pullgate::core::registry::reference::Digest::of(MANIFEST.as_bytes());
        let body = if req.method() == http::Method::HEAD {
            Bytes::new()
        } else {
            Bytes::from_static(MANIFEST.as_bytes())
        };
        chunked_response(
            200,
            &[
                ("content-type", OCI_MANIFEST),
                ("docker-content-digest", digest.as_str()),
                ("content-length", &MANIFEST.len().to_string()),
            ],
            body,
            None,
        )
    }
}

/// A fresh core instance (as Spin makes one per request) on its own key-value store and blob
/// store, with `extra` configuration.
fn instance(extra: &str, up: &Rc<TokenUpstream>, clock: &Rc<ManualClock>) -> App {
    let config = parse_config(&format!(
        r#"
        builtin_upstreams = false
        {extra}
        [[upstream]]
        host = "up.test"
        url = "http://up.test"
        default = true
        "#
    ))
    .unwrap();
    let settings = config.resolve(&FakeSecrets::with(&[])).unwrap();
    let ports = Ports {
        upstream: Rc::new(FakeUpstream::new({
            let up = up.clone();
            move |r| Ok(up.respond(r))
        })),
        kv: Rc::new(MemKv::default()),
        blobs: Rc::new(MemBlobStore::default()),
        clock: clock.clone(),
        deferred: Rc::new(SpawnLocal),
        offload: Rc::new(pullgate::core::ports::InlineOffload),
    };
    App::new(settings, ports)
}

async fn from(app: &App, path: &str, addr: &str) -> Collected {
    let mut req = request("GET", path, &[("accept", OCI_MANIFEST)]);
    req.extensions_mut()
        .insert(ClientAddr(addr.parse().unwrap()));
    collect(app.handle(&req).await).await
}

const LIMITED: &str = "[rate_limit]\nper_ip = \"2/h\"\nburst = 2\n";

#[test]
fn a_shared_bucket_store_limits_across_fresh_instances() {
    run_local(async {
        let up = Rc::new(TokenUpstream::default());
        let clock = Rc::new(ManualClock::at(1_700_000_000_000));
        let buckets = Rc::new(SharedBuckets::default());
        let fresh = || instance(LIMITED, &up, &clock).with_rate_limits(buckets.clone());
        for n in 1..=2 {
            let got = from(&fresh(), "/v2/", "192.0.2.7").await;
            assert_eq!(got.status, StatusCode::OK, "request {n}");
        }
        let refused = from(&fresh(), "/v2/", "192.0.2.7").await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            refused.text().contains("TOOMANYREQUESTS"),
            "{}",
            refused.text()
        );
        let retry_after: u64 = refused.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (1800..=1801).contains(&retry_after),
            "half an hour to one token: {retry_after}"
        );
        assert_eq!(
            from(&fresh(), "/v2/", "192.0.2.8").await.status,
            StatusCode::OK,
            "another address has its own bucket"
        );
        // After the Retry-After, one token is back.
        clock.advance(retry_after * 1000);
        assert_eq!(
            from(&fresh(), "/v2/", "192.0.2.7").await.status,
            StatusCode::OK
        );
        assert_eq!(
            from(&fresh(), "/v2/", "192.0.2.7").await.status,
            StatusCode::TOO_MANY_REQUESTS
        );

        // Without the shared store, each fresh instance starts with full buckets.
        for _ in 0..3 {
            let got = from(&instance(LIMITED, &up, &clock), "/v2/", "192.0.2.9").await;
            assert_eq!(got.status, StatusCode::OK);
        }
    });
}

#[test]
fn a_failing_bucket_store_admits_the_request() {
    run_local(async {
        let up = Rc::new(TokenUpstream::default());
        let clock = Rc::new(ManualClock::at(1_700_000_000_000));
        let buckets = Rc::new(SharedBuckets::default());
        buckets.fail.set(true);
        for _ in 0..3 {
            let app = instance(LIMITED, &up, &clock).with_rate_limits(buckets.clone());
            assert_eq!(from(&app, "/v2/", "192.0.2.7").await.status, StatusCode::OK);
        }
    });
}

#[test]
fn a_token_in_the_shared_store_is_reused_by_fresh_instances_until_it_expires() {
    run_local(async {
        let up = Rc::new(TokenUpstream::default());
        let clock = Rc::new(ManualClock::at(1_700_000_000_000));
        let tokens = Rc::new(SharedTokens::default());
        let fresh = || instance("", &up, &clock).with_token_store(tokens.clone());
        for n in 1..=3 {
            let got = from(&fresh(), "/v2/app/manifests/v1", "192.0.2.7").await;
            assert_eq!(got.status, StatusCode::OK, "request {n}: {}", got.text());
        }
        assert_eq!(up.issued.get(), 1, "one token for three instances");
        let stored = tokens.0.borrow().values().next().cloned().unwrap();
        assert_eq!(
            format!("{:?}", stored.token),
            "Secret(<redacted>)",
            "the token's Debug is redacted"
        );
        // Past its lifetime (300 s, used until 290 s), a new one.
        clock.advance(291_000);
        let got = from(&fresh(), "/v2/app/manifests/v1", "192.0.2.7").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(up.issued.get(), 2);

        // Without the shared store, every fresh instance asks for its own.
        for _ in 0..2 {
            from(
                &instance("", &up, &clock),
                "/v2/app/manifests/v1",
                "192.0.2.7",
            )
            .await;
        }
        assert_eq!(up.issued.get(), 4);
    });
}
