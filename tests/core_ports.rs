//! The core through its ports: in-memory stores, a manual clock, and a fake upstream registry
//! that counts every call, so each cache behaviour is asserted by what reached the upstream.

use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use pullgate::core::app::App;
use pullgate::core::body::{Body, CacheStatus};
use pullgate::core::config::parse_config;
use pullgate::core::ports::{ByteStream, Ports, UpstreamError};
use pullgate::core::registry::reference::Digest;
use pullgate::testing::{
    chunked_response, collect, request, run_local, Collected, FakeSecrets, FakeUpstream,
    ManualClock, MemBlobStore, MemKv, SpawnLocal,
};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A scripted upstream registry at `http://up.test`, with a token realm at `http://up.test/token`
/// and a CDN at `http://cdn.test` for redirected blobs.
#[derive(Default)]
struct FakeRegistry {
    manifests: RefCell<HashMap<String, (String, Bytes)>>, // reference (tag or digest) → (type, bytes)
    blobs: RefCell<HashMap<String, Bytes>>,
    calls: RefCell<Vec<(String, String, Option<String>)>>, // method, url, authorization
    down: Cell<Option<u16>>,                               // Some(0) = refused, Some(status)
    require_token: Cell<bool>,
    token_ttl: Cell<u64>,
    tokens_issued: Cell<u32>,
    redirect_blobs: Cell<bool>,
    corrupt_blobs: Cell<bool>,
    realm: RefCell<String>,
    /// When set, redirected blobs go to `{cdn}/{digest}` instead of `http://cdn.test/`.
    cdn: RefCell<Option<String>>,
    /// Blob GETs redirect to themselves, forever.
    redirect_loop: Cell<bool>,
}

impl FakeRegistry {
    fn count(&self, method: &str, contains: &str) -> usize {
        self.calls
            .borrow()
            .iter()
            .filter(|(m, u, _)| m == method && u.contains(contains))
            .count()
    }

    fn put_manifest(&self, tag: &str, media_type: &str, body: &str) -> Digest {
        let bytes = Bytes::from(body.to_string());
        let d = Digest::of(&bytes);
        let mut m = self.manifests.borrow_mut();
        m.insert(tag.to_string(), (media_type.to_string(), bytes.clone()));
        m.insert(d.as_str().to_string(), (media_type.to_string(), bytes));
        d
    }

    fn put_blob(&self, bytes: Vec<u8>) -> (Digest, Bytes) {
        let b = Bytes::from(bytes);
        let d = Digest::of(&b);
        self.blobs
            .borrow_mut()
            .insert(d.as_str().to_string(), b.clone());
        (d, b)
    }

    fn respond(&self, req: &Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> {
        let url = req.uri().to_string();
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        self.calls
            .borrow_mut()
            .push((req.method().to_string(), url.clone(), auth.clone()));
        match self.down.get() {
            Some(0) => return Err(UpstreamError::Connect("connection refused".into())),
            Some(s) => return Ok(resp(s, &[], Bytes::new())),
            None => {}
        }
        let path = req.uri().path().to_string();
        let cdn = self.cdn.borrow().clone();
        if url.starts_with("http://cdn.test/") || cdn.as_ref().is_some_and(|c| url.starts_with(c)) {
            let d = path.trim_start_matches('/');
            let b = self.blobs.borrow().get(d).cloned();
            return Ok(match b {
                Some(b) => resp(200, &[("content-length", &b.len().to_string())], b),
                None => resp(404, &[], Bytes::new()),
            });
        }
        if path == "/token" {
            self.tokens_issued.set(self.tokens_issued.get() + 1);
            let body = format!(
                r#"{{"token":"tok{}","expires_in":{}}}"#,
                self.tokens_issued.get(),
                self.token_ttl.get()
            );
            return Ok(resp(200, &[], Bytes::from(body)));
        }
        if self.require_token.get() && !auth.as_deref().is_some_and(|a| a.starts_with("Bearer tok"))
        {
            let realm = self.realm.borrow().clone();
            let challenge = format!(r#"Bearer realm="{realm}",service="up.test""#);
            return Ok(resp(401, &[("www-authenticate", &challenge)], Bytes::new()));
        }
        if path.ends_with("/tags/list") {
            let q = req.uri().query().unwrap_or("");
            let body = format!(r#"{{"name":"app","tags":["a","b"],"query":"{q}"}}"#);
            let link = r#"</v2/app/tags/list?last=b&n=2>; rel="next""#;
            return Ok(resp(
                200,
                &[("link", link), ("content-type", "application/json")],
                Bytes::from(body),
            ));
        }
        if let Some(i) = path.find("/manifests/") {
            let reference = &path[i + "/manifests/".len()..];
            let accept = req
                .headers()
                .get("accept")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let m = self.manifests.borrow().get(reference).cloned();
            return Ok(match m {
                Some((mt, b))
                    if accept.contains(&mt)
                        || !reference.starts_with("sha256:") && accept.is_empty()
                        || reference.starts_with("sha256:") =>
                {
                    let d = Digest::of(&b);
                    let headers = [
                        ("content-type", mt.as_str()),
                        ("docker-content-digest", d.as_str()),
                        ("content-length", &b.len().to_string()),
                    ];
                    let body = if req.method() == http::Method::HEAD {
                        Bytes::new()
                    } else {
                        b
                    };
                    resp(200, &headers, body)
                }
                _ => resp(
                    404,
                    &[],
                    Bytes::from_static(br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#),
                ),
            });
        }
        if let Some(i) = path.find("/blobs/") {
            let d = &path[i + "/blobs/".len()..];
            if self.redirect_loop.get() {
                return Ok(resp(307, &[("location", &url)], Bytes::new()));
            }
            if self.redirect_blobs.get() {
                let base = cdn.unwrap_or_else(|| "http://cdn.test".into());
                return Ok(resp(
                    307,
                    &[("location", &format!("{base}/{d}"))],
                    Bytes::new(),
                ));
            }
            let b = self.blobs.borrow().get(d).cloned();
            return Ok(match b {
                Some(b) => {
                    let mut v = b.to_vec();
                    if self.corrupt_blobs.get() {
                        v[0] ^= 0xff;
                    }
                    resp(
                        200,
                        &[("content-length", &b.len().to_string())],
                        Bytes::from(v),
                    )
                }
                None => resp(404, &[], Bytes::new()),
            });
        }
        Ok(resp(404, &[], Bytes::new()))
    }
}

/// A response whose body arrives in 4 KiB chunks with a yield between them.
fn resp(status: u16, headers: &[(&str, &str)], body: Bytes) -> Response<ByteStream> {
    chunked_response(status, headers, body, None)
}

struct Harness {
    app: App,
    up: Rc<FakeRegistry>,
    clock: Rc<ManualClock>,
    blobs: Rc<MemBlobStore>,
}

fn harness(extra: &str) -> Harness {
    harness_with(extra, MemBlobStore::default())
}

fn harness_with(extra: &str, blobs: MemBlobStore) -> Harness {
    let up = Rc::new(FakeRegistry::default());
    *up.realm.borrow_mut() = "http://up.test/token".into();
    up.token_ttl.set(300);
    let clock = Rc::new(ManualClock::at(1_700_000_000_000));
    let blobs = Rc::new(blobs);
    let config = parse_config(&format!(
        r#"
        builtin_upstreams = false
        [cache]
        tag_ttl = "5m"
        max_stale = "1h"
        [[upstream]]
        host = "up.test"
        url = "http://up.test"
        default = true
        {extra}
        "#
    ))
    .unwrap();
    let settings = config
        .resolve(&FakeSecrets::with(&[
            ("env:U", "user"),
            ("env:P", "s3cret"),
        ]))
        .unwrap();
    let ports = Ports {
        upstream: Rc::new(FakeUpstream::new({
            let up = up.clone();
            move |request| up.respond(request)
        })),
        kv: Rc::new(MemKv::default()),
        blobs: blobs.clone(),
        clock: clock.clone(),
        deferred: Rc::new(SpawnLocal),
        offload: Rc::new(pullgate::core::ports::InlineOffload),
    };
    Harness {
        app: App::new(settings, ports),
        up,
        clock,
        blobs,
    }
}

fn get(path: &str, headers: &[(&str, &str)]) -> Request<()> {
    request("GET", path, headers)
}

async fn fetch(h: &Harness, path: &str, headers: &[(&str, &str)]) -> Collected {
    collect(h.app.handle(&get(path, headers)).await).await
}

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
const ACCEPT_OCI: (&str, &str) = ("accept", OCI_MANIFEST);

#[test]
fn eight_concurrent_misses_make_one_upstream_fetch() {
    run_local(async {
        let h = harness("");
        let (d, bytes) =
            h.up.put_blob((0..300_000u32).map(|i| (i % 251) as u8).collect());
        let path = format!("/v2/app/blobs/{d}");
        let reqs: Vec<_> = (0..8).map(|_| get(&path, &[])).collect();
        let resps = join_all(reqs.iter().map(|r| h.app.handle(r))).await;
        let gots = join_all(resps.into_iter().map(collect)).await;
        for g in &gots {
            assert_eq!(g.status, StatusCode::OK);
            assert_eq!(g.body.as_ref().unwrap(), &bytes);
            assert_eq!(g.headers["content-length"], "300000");
        }
        assert_eq!(h.up.count("GET", "/blobs/"), 1);
        assert_eq!(
            gots.iter()
                .filter(|g| g.cache() == CacheStatus::Coalesced)
                .count(),
            7
        );
        assert_eq!(h.blobs.get(d.as_str()).unwrap(), bytes);
        // And now it is a hit.
        let again = fetch(&h, &path, &[]).await;
        assert_eq!(again.cache(), CacheStatus::Hit);
        assert_eq!(h.up.count("GET", "/blobs/"), 1);
    });
}

#[test]
fn digest_mismatch_is_never_stored_and_the_client_stream_fails() {
    run_local(async {
        let h = harness("");
        let (d, _) = h.up.put_blob(vec![7u8; 200_000]);
        h.up.corrupt_blobs.set(true);
        let path = format!("/v2/app/blobs/{d}");
        let g = fetch(&h, &path, &[]).await;
        assert_eq!(g.status, StatusCode::OK, "status is sent before the end");
        assert!(
            g.body.is_err(),
            "the body must end in an error, not complete"
        );
        assert_eq!(h.blobs.count(), 0);
        // Not cached: the next request goes upstream again.
        h.up.corrupt_blobs.set(false);
        let g = fetch(&h, &path, &[]).await;
        assert!(g.body.is_ok());
        assert_eq!(h.up.count("GET", "/blobs/"), 2);
        assert_eq!(h.blobs.count(), 1);
    });
}

#[test]
fn small_corrupt_blob_delivers_no_bytes_before_failing() {
    run_local(async {
        let h = harness("");
        let (d, _) = h.up.put_blob(vec![1u8; 1000]);
        h.up.corrupt_blobs.set(true);
        let resp = h.app.handle(&get(&format!("/v2/app/blobs/{d}"), &[])).await;
        let Body::Stream(mut s) = resp.into_body() else {
            panic!("expected a stream")
        };
        assert!(
            s.next().await.unwrap().is_err(),
            "first item must be the error"
        );
    });
}

#[test]
fn tag_is_revalidated_after_ttl_and_not_before() {
    run_local(async {
        let h = harness("");
        h.up.put_manifest("v1", OCI_MANIFEST, MANIFEST);
        let p = "/v2/app/manifests/v1";
        assert_eq!(fetch(&h, p, &[ACCEPT_OCI]).await.cache(), CacheStatus::Miss);
        h.clock.advance(299_000);
        assert_eq!(fetch(&h, p, &[ACCEPT_OCI]).await.cache(), CacheStatus::Hit);
        assert_eq!(h.up.count("HEAD", "/manifests/"), 0);
        assert_eq!(h.up.count("GET", "/manifests/"), 1);
        h.clock.advance(2_000);
        let g = fetch(&h, p, &[ACCEPT_OCI]).await;
        assert_eq!(g.cache(), CacheStatus::Hit);
        assert_eq!(g.body.unwrap(), MANIFEST.as_bytes());
        assert_eq!(
            h.up.count("HEAD", "/manifests/v1"),
            1,
            "revalidated with HEAD"
        );
        assert_eq!(
            h.up.count("GET", "/manifests/"),
            1,
            "no manifest GET for an unchanged tag"
        );
        // The revalidation renewed the record.
        h.clock.advance(60_000);
        fetch(&h, p, &[ACCEPT_OCI]).await;
        assert_eq!(h.up.count("HEAD", "/manifests/v1"), 1);
    });
}

#[test]
fn moved_tag_is_fetched_by_digest() {
    run_local(async {
        let h = harness("");
        h.up.put_manifest("v1", OCI_MANIFEST, MANIFEST);
        let p = "/v2/app/manifests/v1";
        fetch(&h, p, &[ACCEPT_OCI]).await;
        let moved = MANIFEST.replace("\"layers\":[]", "\"layers\":[],\"annotations\":{}");
        let d2 = h.up.put_manifest("v1", OCI_MANIFEST, &moved);
        h.clock.advance(301_000);
        let g = fetch(&h, p, &[ACCEPT_OCI]).await;
        assert_eq!(g.body.unwrap(), moved.as_bytes());
        assert_eq!(g.headers["docker-content-digest"], d2.as_str());
        assert_eq!(h.up.count("GET", &format!("/manifests/{d2}")), 1);
    });
}

#[test]
fn stale_tag_is_served_when_upstream_fails() {
    for failure in [Some(503u16), Some(500), Some(429), Some(401), Some(0)] {
        run_local(async {
            let h = harness("");
            h.up.put_manifest("v1", OCI_MANIFEST, MANIFEST);
            let p = "/v2/app/manifests/v1";
            fetch(&h, p, &[ACCEPT_OCI]).await;
            h.up.down.set(failure);
            h.clock.advance(301_000);
            let g = fetch(&h, p, &[ACCEPT_OCI]).await;
            assert_eq!(g.status, StatusCode::OK, "{failure:?}");
            assert_eq!(g.cache(), CacheStatus::Stale);
            assert_eq!(g.body.unwrap(), MANIFEST.as_bytes());
            // Beyond max_stale (1h): a clear error, not MANIFEST_UNKNOWN.
            h.clock.advance(3_600_000);
            let g = fetch(&h, p, &[ACCEPT_OCI]).await;
            assert!(
                g.status.as_u16() >= 400 && g.status != StatusCode::NOT_FOUND,
                "{failure:?}"
            );
            let body = String::from_utf8(g.body.unwrap().to_vec()).unwrap();
            assert!(!body.contains("MANIFEST_UNKNOWN"), "{body}");
        });
    }
}

#[test]
fn miss_while_upstream_is_down_is_503_unavailable() {
    run_local(async {
        let h = harness("");
        h.up.down.set(Some(0));
        let g = fetch(&h, "/v2/app/manifests/v1", &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(String::from_utf8_lossy(&g.body.unwrap()).contains("UNAVAILABLE"));
        let d = Digest::of(b"x");
        let g = fetch(&h, &format!("/v2/app/blobs/{d}"), &[]).await;
        assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    });
}

#[test]
fn unknown_manifest_is_404_manifest_unknown() {
    run_local(async {
        let h = harness("");
        let g = fetch(&h, "/v2/app/manifests/nope", &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::NOT_FOUND);
        assert!(String::from_utf8_lossy(&g.body.unwrap()).contains("MANIFEST_UNKNOWN"));
    });
}

#[test]
fn token_is_fetched_on_401_and_reused_until_expiry() {
    run_local(async {
        let h = harness("");
        h.up.require_token.set(true);
        h.up.token_ttl.set(60);
        let (d, _) = h.up.put_blob(vec![3u8; 10]);
        h.up.put_manifest("v1", OCI_MANIFEST, MANIFEST);
        let g = fetch(&h, "/v2/app/manifests/v1", &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(h.up.tokens_issued.get(), 1);
        let g = fetch(&h, &format!("/v2/app/blobs/{d}"), &[]).await;
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(
            h.up.tokens_issued.get(),
            1,
            "token reused for the same scope"
        );
        // The token request carried no credentials (none configured) and the scope.
        assert_eq!(h.up.count("GET", "scope=repository%3Aapp%3Apull"), 1);
        // After expiry, a new token.
        h.clock.advance(61_000);
        h.up.put_manifest("v2", OCI_MANIFEST, MANIFEST);
        fetch(&h, "/v2/app/manifests/v2", &[ACCEPT_OCI]).await;
        assert_eq!(h.up.tokens_issued.get(), 2);
    });
}

#[test]
fn credentials_go_only_to_a_trusted_realm() {
    run_local(async {
        let h = harness("username = \"env:U\"\npassword = \"env:P\"");
        h.up.require_token.set(true);
        h.up.put_manifest("v1", OCI_MANIFEST, MANIFEST);
        fetch(&h, "/v2/app/manifests/v1", &[ACCEPT_OCI]).await;
        let calls = h.up.calls.borrow().clone();
        let token_call = calls.iter().find(|(_, u, _)| u.contains("/token")).unwrap();
        assert!(
            token_call.2.as_deref().unwrap().starts_with("Basic "),
            "same host: creds sent"
        );

        let h = harness("username = \"env:U\"\npassword = \"env:P\"");
        h.up.require_token.set(true);
        *h.up.realm.borrow_mut() = "http://evil.example/token".into();
        h.up.put_manifest("v1", OCI_MANIFEST, MANIFEST);
        fetch(&h, "/v2/app/manifests/v1", &[ACCEPT_OCI]).await;
        let calls = h.up.calls.borrow().clone();
        let token_call = calls
            .iter()
            .find(|(_, u, _)| u.contains("evil.example"))
            .unwrap();
        assert_eq!(token_call.2, None, "untrusted realm: no credentials");
    });
}

#[test]
fn redirects_are_followed_without_authorization_and_not_cached() {
    run_local(async {
        let h = harness("");
        h.up.require_token.set(true);
        h.up.redirect_blobs.set(true);
        let (d, bytes) = h.up.put_blob(vec![9u8; 50_000]);
        let g = fetch(&h, &format!("/v2/app/blobs/{d}"), &[]).await;
        assert_eq!(g.body.unwrap(), bytes);
        let calls = h.up.calls.borrow().clone();
        let cdn: Vec<_> = calls
            .iter()
            .filter(|(_, u, _)| u.starts_with("http://cdn.test/"))
            .collect();
        assert_eq!(cdn.len(), 1);
        assert_eq!(cdn[0].2, None, "no Authorization to the redirect host");
        // Served from the cache afterwards, not from the redirect URL.
        fetch(&h, &format!("/v2/app/blobs/{d}"), &[]).await;
        assert_eq!(
            h.up.calls
                .borrow()
                .iter()
                .filter(|(_, u, _)| u.starts_with("http://cdn.test/"))
                .count(),
            1
        );
    });
}

#[test]
fn index_only_goes_to_clients_that_accept_one() {
    run_local(async {
        let h = harness("");
        let index = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        h.up.put_manifest("multi", OCI_INDEX, index);
        let g = fetch(
            &h,
            "/v2/app/manifests/multi",
            &[("accept", OCI_INDEX), ACCEPT_OCI],
        )
        .await;
        assert_eq!(g.headers["content-type"], OCI_INDEX);
        // A client that takes only single manifests does not get the cached index.
        let g = fetch(&h, "/v2/app/manifests/multi", &[ACCEPT_OCI]).await;
        assert_ne!(
            g.headers.get("content-type").map(|v| v.to_str().unwrap()),
            Some(OCI_INDEX)
        );
    });
}

#[test]
fn manifest_by_digest_is_verified_and_cached_forever() {
    run_local(async {
        let h = harness("");
        let d = h.up.put_manifest("v1", OCI_MANIFEST, MANIFEST);
        let p = format!("/v2/app/manifests/{d}");
        assert_eq!(
            fetch(&h, &p, &[ACCEPT_OCI]).await.cache(),
            CacheStatus::Miss
        );
        h.up.down.set(Some(503));
        h.clock.advance(30 * 86_400_000);
        let g = fetch(&h, &p, &[ACCEPT_OCI]).await;
        assert_eq!((g.status, g.cache()), (StatusCode::OK, CacheStatus::Hit));
        // HEAD: headers, no body.
        let resp = h.app.handle(&Request::head(&p).body(()).unwrap()).await;
        assert_eq!(
            resp.headers()["content-length"],
            MANIFEST.len().to_string().as_str()
        );
        assert!(matches!(resp.body(), Body::Empty));
    });
}

#[test]
fn ranges_on_cold_and_warm_blobs() {
    run_local(async {
        let h = harness("");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let (d, bytes) = h.up.put_blob(data);
        let p = format!("/v2/app/blobs/{d}");
        for _ in 0..2 {
            let g = fetch(&h, &p, &[("range", "bytes=100-199")]).await;
            assert_eq!(g.status, StatusCode::PARTIAL_CONTENT);
            assert_eq!(g.headers["content-range"], "bytes 100-199/200000");
            assert_eq!(g.body.unwrap(), bytes.slice(100..200));
        }
        let g = fetch(&h, &p, &[("range", "bytes=200000-")]).await;
        assert_eq!(g.status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(g.headers["content-range"], "bytes */200000");
        let g = fetch(&h, &p, &[("range", "bytes=-10")]).await;
        assert_eq!(g.body.unwrap(), bytes.slice(199_990..));
    });
}

#[test]
fn unconfigured_ns_is_refused_and_never_dialled() {
    run_local(async {
        let h = harness("");
        let g = fetch(&h, "/v2/app/manifests/v1?ns=evil.example", &[]).await;
        assert_eq!(g.status, StatusCode::NOT_FOUND);
        assert!(String::from_utf8_lossy(&g.body.unwrap()).contains("NAME_UNKNOWN"));
        assert!(h.up.calls.borrow().is_empty());
    });
}

#[test]
fn tags_list_caches_only_the_first_page_and_passes_pagination_through() {
    run_local(async {
        let h = harness("");
        let g = fetch(&h, "/v2/app/tags/list?n=2&last=a", &[]).await;
        assert_eq!(g.status, StatusCode::OK);
        let body = String::from_utf8(g.body.unwrap().to_vec()).unwrap();
        assert!(body.contains(r#""query":"n=2&last=a""#), "{body}");
        assert_eq!(
            g.headers["link"],
            r#"</v2/app/tags/list?last=b&n=2>; rel="next""#
        );
        // A page chosen by `n`/`last` is proxied, never stored.
        assert_eq!(
            fetch(&h, "/v2/app/tags/list?n=2&last=a", &[]).await.cache(),
            CacheStatus::Miss
        );
        assert_eq!(h.up.count("GET", "/tags/list"), 2);
        // The canonical first page is cached.
        fetch(&h, "/v2/app/tags/list", &[]).await;
        let g = fetch(&h, "/v2/app/tags/list", &[]).await;
        assert_eq!(g.cache(), CacheStatus::Hit);
        assert_eq!(h.up.count("GET", "/tags/list"), 3);
        // After the TTL with the upstream down: stale for the first page, 503 for others.
        h.clock.advance(301_000);
        h.up.down.set(Some(502));
        let g = fetch(&h, "/v2/app/tags/list", &[]).await;
        assert_eq!((g.status, g.cache()), (StatusCode::OK, CacheStatus::Stale));
        let g = fetch(&h, "/v2/app/tags/list?n=2&last=a", &[]).await;
        assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
        // With ns, the Link keeps the client's ns.
        h.up.down.set(None);
        let g = fetch(&h, "/v2/app/tags/list?ns=up.test", &[]).await;
        assert_eq!(
            g.headers["link"],
            r#"</v2/app/tags/list?last=b&n=2&ns=up.test>; rel="next""#
        );
    });
}

#[test]
fn store_without_tail_serves_fast_readers_from_memory_and_slow_ones_after_commit() {
    run_local(async {
        let h = harness_with("", MemBlobStore::without_tail());
        // Larger than the in-memory window, so a reader that waits falls behind it.
        let data: Vec<u8> = (0..6_000_000u32).map(|i| (i % 253) as u8).collect();
        let (d, bytes) = h.up.put_blob(data);
        let path = format!("/v2/app/blobs/{d}");
        let fast = h.app.handle(&get(&path, &[])).await;
        let slow = h.app.handle(&get(&path, &[])).await;
        // The fast reader drains while the fill runs; the slow one starts after it is done.
        let fast = collect(fast).await;
        assert_eq!(fast.body.unwrap(), bytes);
        let slow = collect(slow).await;
        assert_eq!(slow.body.unwrap(), bytes);
        assert_eq!(h.up.count("GET", "/blobs/"), 1);
    });
}

#[test]
fn head_on_a_cold_blob_asks_the_upstream_head_and_transfers_nothing() {
    run_local(async {
        let h = harness("");
        let (d, bytes) = h.up.put_blob(vec![5u8; 70_000]);
        let req = Request::head(format!("/v2/app/blobs/{d}"))
            .body(())
            .unwrap();
        let resp = h.app.handle(&req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()["content-length"],
            bytes.len().to_string().as_str()
        );
        assert_eq!(resp.headers()["docker-content-digest"], d.as_str());
        assert!(matches!(resp.body(), Body::Empty));
        assert_eq!(h.up.count("HEAD", "/blobs/"), 1);
        assert_eq!(h.up.count("GET", "/blobs/"), 0, "no transfer for a HEAD");
        assert_eq!(h.blobs.count(), 0);
        // An unknown blob: the upstream HEAD says 404, the fill confirms it.
        let missing = Digest::of(b"missing");
        let req = Request::head(format!("/v2/app/blobs/{missing}"))
            .body(())
            .unwrap();
        assert_eq!(h.app.handle(&req).await.status(), StatusCode::NOT_FOUND);
    });
}

/// The OCI envelope's first message.
fn envelope_message(g: &Collected) -> String {
    let body = g.body.as_ref().expect("error body");
    let v: serde_json::Value = serde_json::from_slice(body).expect("OCI envelope");
    v["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn redirects_to_loopback_or_metadata_are_refused_with_502_and_never_dialled() {
    run_local(async {
        for (target, class) in [
            ("http://127.0.0.2", "loopback"),
            ("http://169.254.169.254", "cloud metadata"),
            ("http://[::ffff:10.0.0.1]", "private"),
        ] {
            let h = harness("");
            h.up.redirect_blobs.set(true);
            *h.up.cdn.borrow_mut() = Some(target.into());
            let (d, _) = h.up.put_blob(vec![7u8; 20_000]);
            let g = fetch(&h, &format!("/v2/app/blobs/{d}"), &[]).await;
            assert_eq!(g.status, StatusCode::BAD_GATEWAY, "{target}");
            let msg = envelope_message(&g);
            assert_eq!(
                msg,
                format!(
                    "upstream redirected to a refused address ({class}); allow it with [outbound] allow"
                )
            );
            assert_eq!(h.up.count("GET", target), 0, "{target} was dialled");
            assert!(h.blobs.get(d.as_str()).is_none(), "nothing is cached");
        }
    });
}

#[test]
fn redirect_to_an_allowed_internal_network_is_followed() {
    run_local(async {
        let h = harness("[outbound]\nallow = [\"127.0.0.0/8\"]");
        h.up.redirect_blobs.set(true);
        *h.up.cdn.borrow_mut() = Some("http://127.0.0.2".into());
        let (d, bytes) = h.up.put_blob(vec![5u8; 20_000]);
        let g = fetch(&h, &format!("/v2/app/blobs/{d}"), &[]).await;
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(g.body.unwrap(), bytes);
        assert_eq!(h.up.count("GET", "http://127.0.0.2/"), 1);
    });
}

#[test]
fn token_realm_at_a_private_address_is_refused_and_credentials_never_leave() {
    run_local(async {
        let h = harness("username = \"env:U\"\npassword = \"env:P\"");
        h.up.require_token.set(true);
        *h.up.realm.borrow_mut() = "http://10.0.0.1/token".into();
        h.up.put_manifest("v1", OCI_MANIFEST, MANIFEST);
        let g = fetch(&h, "/v2/app/manifests/v1", &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            envelope_message(&g),
            "upstream's token realm is a refused address (private); allow it with [outbound] allow"
        );
        assert_eq!(h.up.count("GET", "10.0.0.1"), 0, "the realm was dialled");
        assert_eq!(h.up.tokens_issued.get(), 0);
    });
}

#[test]
fn another_upstreams_internal_host_is_no_exemption_for_redirects_or_realms() {
    run_local(async {
        // A second upstream lives on an internal address. Being configured for itself does
        // not let the first upstream send pullgate there.
        let second = "[[upstream]]\nhost = \"intern.test\"\nurl = \"http://10.0.0.7\"";
        let h = harness(second);
        h.up.redirect_blobs.set(true);
        *h.up.cdn.borrow_mut() = Some("http://10.0.0.7".into());
        let (d, _) = h.up.put_blob(vec![3u8; 20_000]);
        let g = fetch(&h, &format!("/v2/app/blobs/{d}"), &[]).await;
        assert_eq!(g.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            h.up.count("GET", "10.0.0.7"),
            0,
            "the other upstream's host was dialled"
        );

        let h = harness(&format!(
            "username = \"env:U\"\npassword = \"env:P\"\n{second}"
        ));
        h.up.require_token.set(true);
        *h.up.realm.borrow_mut() = "http://10.0.0.7/token".into();
        h.up.put_manifest("v1", OCI_MANIFEST, MANIFEST);
        let g = fetch(&h, "/v2/app/manifests/v1", &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::BAD_GATEWAY);
        assert_eq!(h.up.count("GET", "10.0.0.7"), 0, "the realm was dialled");
        assert_eq!(h.up.tokens_issued.get(), 0);
    });
}

#[test]
fn redirect_loops_end_after_a_bounded_number_of_hops() {
    run_local(async {
        let h = harness("");
        h.up.redirect_loop.set(true);
        let (d, _) = h.up.put_blob(vec![1u8; 1_000]);
        let g = fetch(&h, &format!("/v2/app/blobs/{d}"), &[]).await;
        assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            envelope_message(&g).contains("redirected more than 5 times"),
            "{}",
            envelope_message(&g)
        );
        // The first request and five redirects; the sixth Location is not followed.
        assert_eq!(h.up.count("GET", "/blobs/"), 6);
    });
}

#[test]
fn admin_lists_and_purges_tags_whose_keys_were_hashed() {
    run_local(async {
        let h = harness("[gateway]\nadmin_token = \"env:P\"");
        // A tag long enough that its record key is hashed (keys hold at most 250 bytes).
        let long = format!("v{}", "1".repeat(120));
        h.up.put_manifest(&long, OCI_MANIFEST, MANIFEST);
        h.up.put_manifest("short", OCI_MANIFEST, MANIFEST);
        let repo = format!("team/{}", "a".repeat(150));
        for tag in [long.as_str(), "short"] {
            let p = format!("/v2/{repo}/manifests/{tag}");
            assert_eq!(
                fetch(&h, &p, &[ACCEPT_OCI]).await.cache(),
                CacheStatus::Miss
            );
        }
        let admin = [("authorization", "Bearer s3cret")];
        let listed = fetch(
            &h,
            &format!("/admin/tags?repository=up.test/{repo}"),
            &admin,
        )
        .await;
        let body = listed.text();
        assert!(body.contains(&long), "the hashed tag is listed: {body}");
        assert!(body.contains("\"short\""), "{body}");
        let purge = request(
            "POST",
            &format!("/admin/purge?repository=up.test/{repo}"),
            &admin,
        );
        let purged = collect(h.app.handle(&purge).await).await.text();
        assert!(purged.contains("\"tag_records\":2"), "{purged}");
        // Both come from the upstream again.
        let before = h.up.count("GET", "/manifests/");
        fetch(&h, &format!("/v2/{repo}/manifests/{long}"), &[ACCEPT_OCI]).await;
        assert_eq!(h.up.count("GET", "/manifests/"), before + 1);
    });
}

#[test]
fn a_warm_tag_answer_never_outlives_a_write_to_the_store() {
    run_local(async {
        let h = harness("[gateway]\nadmin_token = \"env:P\"");
        h.up.put_manifest("v1", OCI_MANIFEST, MANIFEST);
        let p = "/v2/app/manifests/v1";
        assert_eq!(fetch(&h, p, &[ACCEPT_OCI]).await.cache(), CacheStatus::Miss);
        // Warm twice: the second answer is the one kept decoded; HEAD is answered from it too.
        for _ in 0..2 {
            let g = fetch(&h, p, &[ACCEPT_OCI]).await;
            assert_eq!(g.cache(), CacheStatus::Hit);
            assert_eq!(g.body.unwrap(), MANIFEST.as_bytes());
        }
        let head = collect(h.app.handle(&request("HEAD", p, &[ACCEPT_OCI])).await).await;
        assert_eq!(head.cache(), CacheStatus::Hit);
        assert_eq!(head.headers["content-length"], MANIFEST.len().to_string());
        assert!(head.body.unwrap_or_default().is_empty());
        // A client that cannot take the media type is not served the kept answer.
        let docker = (
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        );
        assert_ne!(fetch(&h, p, &[docker]).await.status, 200);
        // The tag is purged and moved upstream: the next answer is the upstream's, at once.
        let admin = [("authorization", "Bearer s3cret")];
        let purge = request("POST", "/admin/purge?repository=up.test/app", &admin);
        let purged = collect(h.app.handle(&purge).await).await.text();
        assert!(purged.contains("\"tag_records\":1"), "{purged}");
        let moved = MANIFEST.replace("\"layers\":[]", "\"layers\":[],\"annotations\":{}");
        let d2 = h.up.put_manifest("v1", OCI_MANIFEST, &moved);
        let g = fetch(&h, p, &[ACCEPT_OCI]).await;
        assert_eq!(g.cache(), CacheStatus::Miss);
        assert_eq!(g.headers["docker-content-digest"], d2.as_str());
        assert_eq!(g.body.unwrap(), moved.as_bytes());
    });
}
