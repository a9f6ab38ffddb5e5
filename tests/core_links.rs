//! Cached content is served per repository (issue 9, item 1), through the core's ports: a fake
//! upstream registry that knows which repository holds which digest and counts every call,
//! in-memory stores and a manual clock. Also the cache-path bounds of item 8: ranges inside an
//! unverified fill, the fill cap, canonical tag-list pages, best-effort tag-record writes.

use bytes::Bytes;
use futures_util::future::join;
use futures_util::{FutureExt, StreamExt};
use http::{Request, Response, StatusCode};
use pullgate::core::app::App;
use pullgate::core::body::{Body, CacheStatus};
use pullgate::core::config::parse_config;
use pullgate::core::ports::{ByteStream, KvStore, Ports, UpstreamError};
use pullgate::core::registry::reference::Digest;
use pullgate::testing::{
    chunked_response, collect, request, run_local, Collected, FakeSecrets, FakeUpstream, FlakyKv,
    ManualClock, MemBlobStore, SpawnLocal,
};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use tokio::sync::Notify;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const ACCEPT_OCI: (&str, &str) = ("accept", OCI_MANIFEST);

/// A registry at `http://up.test` whose repositories each hold a set of digests.
#[derive(Default)]
struct Registry {
    blobs: RefCell<HashMap<String, Bytes>>,
    manifests: RefCell<HashMap<String, Bytes>>,
    tags: RefCell<HashMap<(String, String), String>>,
    holds: RefCell<HashSet<(String, String)>>,
    calls: RefCell<Vec<(String, String)>>,
    /// Refuse connections.
    down: Cell<bool>,
    /// Flip the first byte of every blob body.
    corrupt: Cell<bool>,
    /// When set, blob bodies stop after their first half until notified.
    gate: RefCell<Option<Rc<Notify>>>,
    /// A gated body is waiting at the gate.
    at_gate: Rc<Cell<bool>>,
}

impl Registry {
    fn count(&self, method: &str, contains: &str) -> usize {
        self.calls
            .borrow()
            .iter()
            .filter(|(m, u)| m == method && u.contains(contains))
            .count()
    }

    fn blob(&self, repos: &[&str], bytes: Vec<u8>) -> (Digest, Bytes) {
        let b = Bytes::from(bytes);
        let d = Digest::of(&b);
        self.blobs.borrow_mut().insert(d.to_string(), b.clone());
        for r in repos {
            self.holds
                .borrow_mut()
                .insert((r.to_string(), d.to_string()));
        }
        (d, b)
    }

    fn manifest(&self, repos: &[&str], tag: Option<&str>, body: String) -> (Digest, Bytes) {
        let b = Bytes::from(body);
        let d = Digest::of(&b);
        self.manifests.borrow_mut().insert(d.to_string(), b.clone());
        for r in repos {
            self.holds
                .borrow_mut()
                .insert((r.to_string(), d.to_string()));
            if let Some(t) = tag {
                self.tags
                    .borrow_mut()
                    .insert((r.to_string(), t.to_string()), d.to_string());
            }
        }
        (d, b)
    }

    fn respond(&self, req: &Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> {
        let method = req.method().to_string();
        self.calls
            .borrow_mut()
            .push((method.clone(), req.uri().to_string()));
        if self.down.get() {
            return Err(UpstreamError::Connect("connection refused".into()));
        }
        let head = method == "HEAD";
        let path = req.uri().path().trim_start_matches("/v2/").to_string();
        let (repo, kind, reference) = match ["/blobs/", "/manifests/"]
            .iter()
            .find_map(|k| path.rsplit_once(k).map(|(r, x)| (r, *k, x)))
        {
            Some(x) => x,
            None => return Ok(reply(404, &[], Bytes::new(), None)),
        };
        let digest = if kind == "/manifests/" && !reference.starts_with("sha256:") {
            match self
                .tags
                .borrow()
                .get(&(repo.to_string(), reference.to_string()))
            {
                Some(d) => d.clone(),
                None => return Ok(reply(404, &[], Bytes::new(), None)),
            }
        } else {
            reference.to_string()
        };
        if !self
            .holds
            .borrow()
            .contains(&(repo.to_string(), digest.clone()))
        {
            return Ok(reply(404, &[], Bytes::new(), None));
        }
        if kind == "/manifests/" {
            let b = self.manifests.borrow()[&digest].clone();
            let len = b.len().to_string();
            let headers = [
                ("content-type", OCI_MANIFEST),
                ("docker-content-digest", digest.as_str()),
                ("content-length", len.as_str()),
            ];
            let body = if head { Bytes::new() } else { b };
            return Ok(reply(200, &headers, body, None));
        }
        let b = self.blobs.borrow()[&digest].clone();
        let len = b.len().to_string();
        let headers = [("content-length", len.as_str())];
        if head {
            return Ok(reply(200, &headers, Bytes::new(), None));
        }
        let mut v = b.to_vec();
        if self.corrupt.get() {
            v[0] ^= 0xff;
        }
        let gate = self
            .gate
            .borrow()
            .clone()
            .map(|g| (g, self.at_gate.clone()));
        Ok(reply(200, &headers, Bytes::from(v), gate))
    }
}

/// A response whose body comes in 4 KiB chunks with a yield between them; with a gate, the
/// body stops after its first half until the gate is notified.
fn reply(
    status: u16,
    headers: &[(&str, &str)],
    body: Bytes,
    gate: Option<(Rc<Notify>, Rc<Cell<bool>>)>,
) -> Response<ByteStream> {
    chunked_response(status, headers, body, gate)
}

struct Harness {
    app: App,
    up: Rc<Registry>,
    clock: Rc<ManualClock>,
    kv: Rc<FlakyKv>,
}

fn harness(cache: &str) -> Harness {
    let up = Rc::new(Registry::default());
    let clock = Rc::new(ManualClock::at(1_700_000_000_000));
    let kv = Rc::new(FlakyKv::default());
    let config = parse_config(&format!(
        r#"
        builtin_upstreams = false
        [cache]
        tag_ttl = "5m"
        max_stale = "1h"
        {cache}
        [[upstream]]
        host = "up.test"
        url = "http://up.test"
        default = true
        "#
    ))
    .unwrap();
    let ports = Ports {
        upstream: Rc::new(FakeUpstream::new({
            let up = up.clone();
            move |request| up.respond(request)
        })),
        kv: kv.clone(),
        blobs: Rc::new(MemBlobStore::default()),
        clock: clock.clone(),
        deferred: Rc::new(SpawnLocal),
        offload: Rc::new(pullgate::core::ports::InlineOffload),
    };
    Harness {
        app: App::new(config.resolve(&FakeSecrets::default()).unwrap(), ports),
        up,
        clock,
        kv,
    }
}

async fn get(h: &Harness, path: &str, headers: &[(&str, &str)]) -> Collected {
    collect(h.app.handle(&request("GET", path, headers)).await).await
}

async fn head(h: &Harness, path: &str) -> Collected {
    collect(h.app.handle(&request("HEAD", path, &[])).await).await
}

/// Lets the spawned fill run until its body waits at the gate (bounded).
async fn until_at_gate(up: &Registry) {
    for _ in 0..100_000 {
        if up.at_gate.get() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the fill never reached the gate");
}

fn data(n: u32, salt: u32) -> Vec<u8> {
    (0..n).map(|i| ((i + salt) % 251) as u8).collect()
}

fn image_manifest(config: &Digest, layers: &[&Digest], subject: Option<&Digest>) -> String {
    let layers: Vec<String> = layers
        .iter()
        .map(|d| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":1}}"#))
        .collect();
    let subject = subject
        .map(|s| format!(r#","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{s}","size":1}}"#))
        .unwrap_or_default();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":1}},"layers":[{}]{subject}}}"#,
        layers.join(",")
    )
}

#[test]
fn blob_cached_for_one_repository_is_unknown_to_a_repository_the_upstream_does_not_vouch_for() {
    run_local(async {
        let h = harness("");
        let (d, bytes) = h.up.blob(&["team/private"], data(100_000, 1));
        let g = get(&h, &format!("/v2/team/private/blobs/{d}"), &[]).await;
        assert_eq!(g.body.unwrap(), bytes);

        let attack = format!("/v2/library/public/blobs/{d}");
        let g = get(&h, &attack, &[]).await;
        assert_eq!(g.status, StatusCode::NOT_FOUND);
        assert!(g.text().contains("BLOB_UNKNOWN"), "{}", g.text());
        assert!(g.body.unwrap().len() < 1000, "no blob bytes");
        let g = head(&h, &attack).await;
        assert_eq!(g.status, StatusCode::NOT_FOUND);
        assert!(g
            .headers
            .get("content-length")
            .map(|v| v != "100000")
            .unwrap_or(true));
        assert_eq!(h.up.count("HEAD", "/library/public/blobs/"), 2);
        assert_eq!(
            h.up.count("GET", "/blobs/"),
            1,
            "one transfer, for the owner"
        );
    });
}

#[test]
fn blob_confirmed_by_head_is_served_from_the_cache_with_one_head_and_no_second_get() {
    run_local(async {
        let h = harness("");
        let (d, bytes) = h.up.blob(&["team/a", "team/b"], data(100_000, 2));
        get(&h, &format!("/v2/team/a/blobs/{d}"), &[]).await;
        let p = format!("/v2/team/b/blobs/{d}");
        let g = get(&h, &p, &[]).await;
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(g.body.unwrap(), bytes);
        assert_eq!(g.info.unwrap().cache, CacheStatus::Hit);
        assert_eq!(h.up.count("HEAD", "/team/b/blobs/"), 1);
        assert_eq!(h.up.count("GET", "/blobs/"), 1);
        // Now linked: no further HEAD, even with the upstream down.
        h.up.down.set(true);
        let g = get(&h, &p, &[("range", "bytes=10-19")]).await;
        assert_eq!(g.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(g.body.unwrap(), bytes.slice(10..20));
        assert_eq!(h.up.count("HEAD", "/team/b/blobs/"), 1);
    });
}

#[test]
fn manifest_by_digest_is_unknown_to_a_repository_that_does_not_hold_it() {
    run_local(async {
        let h = harness("");
        let (c, _) = h.up.blob(&["team/private"], data(10, 3));
        let (d, _) =
            h.up.manifest(&["team/private"], Some("v1"), image_manifest(&c, &[], None));
        let g = get(&h, "/v2/team/private/manifests/v1", &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::OK);
        get(&h, &format!("/v2/team/private/blobs/{c}"), &[]).await;

        let attack = format!("/v2/library/public/manifests/{d}");
        let g = get(&h, &attack, &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::NOT_FOUND);
        assert!(g.text().contains("MANIFEST_UNKNOWN"), "{}", g.text());
        assert!(!g.text().contains("schemaVersion"), "no manifest bytes");
        assert_eq!(head(&h, &attack).await.status, StatusCode::NOT_FOUND);
        // And the config it references is not linked to the attacker's repository either.
        let g = get(&h, &format!("/v2/library/public/blobs/{c}"), &[]).await;
        assert_eq!(g.status, StatusCode::NOT_FOUND);
        assert_eq!(h.up.count("GET", "/library/public/"), 0);
    });
}

#[test]
fn manifest_confirmed_by_head_is_served_from_the_cache_with_one_head_and_no_second_get() {
    run_local(async {
        let h = harness("");
        let (c, _) = h.up.blob(&["team/a", "team/b"], data(10, 4));
        let body = image_manifest(&c, &[], None);
        let (d, bytes) = h.up.manifest(&["team/a", "team/b"], None, body);
        get(&h, &format!("/v2/team/a/manifests/{d}"), &[ACCEPT_OCI]).await;
        let p = format!("/v2/team/b/manifests/{d}");
        let g = get(&h, &p, &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(g.body.unwrap(), bytes);
        assert_eq!(h.up.count("HEAD", "/team/b/manifests/"), 1);
        assert_eq!(h.up.count("GET", "/manifests/"), 1);
        let g = get(&h, &p, &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(h.up.count("HEAD", "/team/b/manifests/"), 1, "linked now");
    });
}

#[test]
fn unlinked_cached_content_is_503_when_the_upstream_cannot_confirm() {
    run_local(async {
        let h = harness("");
        let (c, _) = h.up.blob(&["team/a"], data(70_000, 5));
        let (d, _) =
            h.up.manifest(&["team/a"], None, image_manifest(&c, &[], None));
        get(&h, &format!("/v2/team/a/manifests/{d}"), &[ACCEPT_OCI]).await;
        get(&h, &format!("/v2/team/a/blobs/{c}"), &[]).await;
        h.up.down.set(true);
        for p in [
            format!("/v2/team/b/manifests/{d}"),
            format!("/v2/team/b/blobs/{c}"),
        ] {
            let g = get(&h, &p, &[ACCEPT_OCI]).await;
            assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE, "{p}");
            assert!(g.text().contains("UNAVAILABLE"));
        }
        // The owner is still served from the cache.
        let g = get(&h, &format!("/v2/team/a/blobs/{c}"), &[]).await;
        assert_eq!(g.status, StatusCode::OK);
    });
}

#[test]
fn a_fill_in_progress_is_joined_only_by_repositories_entitled_to_it() {
    run_local(async {
        let h = harness("");
        let gate = Rc::new(Notify::new());
        *h.up.gate.borrow_mut() = Some(gate.clone());
        let (d, bytes) =
            h.up.blob(&["team/private", "team/shared"], data(400_000, 6));
        let owner = h
            .app
            .handle(&request("GET", &format!("/v2/team/private/blobs/{d}"), &[]))
            .await;
        assert_eq!(owner.status(), StatusCode::OK);
        until_at_gate(&h.up).await;

        // Not held upstream: unknown, for GET and HEAD, with no bytes.
        let g = get(&h, &format!("/v2/library/public/blobs/{d}"), &[]).await;
        assert_eq!(g.status, StatusCode::NOT_FOUND);
        assert!(g.text().contains("BLOB_UNKNOWN"));
        let g = head(&h, &format!("/v2/library/public/blobs/{d}")).await;
        assert_eq!(g.status, StatusCode::NOT_FOUND);
        // Upstream down: cannot confirm, 503.
        h.up.down.set(true);
        let g = get(&h, &format!("/v2/team/other/blobs/{d}"), &[]).await;
        assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
        h.up.down.set(false);
        // Held upstream: joins the running fill after one HEAD.
        let shared = h
            .app
            .handle(&request("GET", &format!("/v2/team/shared/blobs/{d}"), &[]))
            .await;
        assert_eq!(shared.status(), StatusCode::OK);
        gate.notify_one();
        let (owner, shared) = join(collect(owner), collect(shared)).await;
        assert_eq!(owner.body.unwrap(), bytes);
        assert_eq!(shared.body.unwrap(), bytes);
        assert_eq!(shared.info.unwrap().cache, CacheStatus::Coalesced);
        assert_eq!(h.up.count("GET", "/blobs/"), 1, "one transfer in all");
        assert_eq!(h.up.count("HEAD", "/team/shared/blobs/"), 1);
        // Both are linked now: hits without asking the upstream.
        h.up.down.set(true);
        for r in ["team/private", "team/shared"] {
            let g = get(&h, &format!("/v2/{r}/blobs/{d}"), &[]).await;
            assert_eq!(g.body.unwrap(), bytes, "{r}");
        }
    });
}

#[test]
fn a_manifest_links_its_layers_so_a_repository_sharing_them_needs_no_request_but_not_its_subject() {
    run_local(async {
        let h = harness("");
        let (c1, _) = h.up.blob(&["team/a"], data(100, 7));
        let (layer, bytes) = h.up.blob(&["team/a", "team/b"], data(90_000, 8));
        let (secret, _) = h.up.manifest(
            &["team/a"],
            Some("v1"),
            image_manifest(&c1, &[&layer], None),
        );
        get(&h, "/v2/team/a/manifests/v1", &[ACCEPT_OCI]).await;
        get(&h, &format!("/v2/team/a/blobs/{layer}"), &[]).await;
        // team/b's own image shares the layer and names team/a's manifest as its subject
        // (an upstream accepts a dangling subject, so it proves nothing).
        let (c2, _) = h.up.blob(&["team/b"], data(100, 9));
        h.up.manifest(
            &["team/b"],
            Some("v1"),
            image_manifest(&c2, &[&layer], Some(&secret)),
        );
        let g = get(&h, "/v2/team/b/manifests/v1", &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::OK);
        let before = h.up.calls.borrow().len();
        let g = get(&h, &format!("/v2/team/b/blobs/{layer}"), &[]).await;
        assert_eq!(g.body.unwrap(), bytes);
        assert_eq!(g.info.unwrap().cache, CacheStatus::Hit);
        assert_eq!(h.up.calls.borrow().len(), before, "linked by the manifest");
        // The subject is not linked: team/b must ask, and the upstream says no.
        let g = get(&h, &format!("/v2/team/b/manifests/{secret}"), &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::NOT_FOUND);
        assert_eq!(
            h.up.count("HEAD", &format!("/team/b/manifests/{secret}")),
            1
        );
    });
}

#[test]
fn a_range_inside_an_unverified_fill_completes_only_after_the_digest_checks() {
    run_local(async {
        let h = harness("");
        let gate = Rc::new(Notify::new());
        *h.up.gate.borrow_mut() = Some(gate.clone());
        let (d, bytes) = h.up.blob(&["app"], data(600_000, 10));
        let p = format!("/v2/app/blobs/{d}");
        let full = h.app.handle(&request("GET", &p, &[])).await;
        until_at_gate(&h.up).await;
        // 300 KB received, far past the range, but the digest is not checked yet.
        let ranged = h
            .app
            .handle(&request("GET", &p, &[("range", "bytes=0-99")]))
            .await;
        assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
        let Body::Stream(mut s) = ranged.into_body() else {
            panic!("a fill streams")
        };
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(s.next().now_or_never().is_none(), "held until verified");
        gate.notify_one();
        let mut got = Vec::new();
        while let Some(c) = s.next().await {
            got.extend_from_slice(&c.unwrap());
        }
        assert_eq!(got, bytes.slice(0..100));
        assert_eq!(collect(full).await.body.unwrap(), bytes);

        // Corrupt bytes: the range ends in an error and delivers nothing.
        let (d, _) = h.up.blob(&["app"], data(600_000, 11));
        h.up.corrupt.set(true);
        let p = format!("/v2/app/blobs/{d}");
        let full = h.app.handle(&request("GET", &p, &[])).await;
        until_at_gate(&h.up).await;
        let ranged = h
            .app
            .handle(&request("GET", &p, &[("range", "bytes=0-99")]))
            .await;
        let Body::Stream(mut s) = ranged.into_body() else {
            panic!("a fill streams")
        };
        gate.notify_one();
        assert!(s.next().await.unwrap().is_err(), "first item is the error");
        assert!(collect(full).await.body.is_err());
    });
}

#[test]
fn beyond_max_fills_a_miss_is_503_with_retry_after() {
    run_local(async {
        let h = harness("max_fills = 1");
        let gate = Rc::new(Notify::new());
        *h.up.gate.borrow_mut() = Some(gate.clone());
        let (a, abytes) = h.up.blob(&["app"], data(200_000, 12));
        let (b, bbytes) = h.up.blob(&["app"], data(200_000, 13));
        let first = h
            .app
            .handle(&request("GET", &format!("/v2/app/blobs/{a}"), &[]))
            .await;
        until_at_gate(&h.up).await;
        let g = get(&h, &format!("/v2/app/blobs/{b}"), &[]).await;
        assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(g.headers["retry-after"], "5");
        assert!(g.text().contains("UNAVAILABLE"));
        assert!(g.info.unwrap().error.unwrap().contains("fill cap"));
        assert_eq!(h.up.count("GET", &format!("/blobs/{b}")), 0);
        // Joining the running fill is not a new fill.
        let joined = h
            .app
            .handle(&request("GET", &format!("/v2/app/blobs/{a}"), &[]))
            .await;
        assert_eq!(joined.status(), StatusCode::OK);
        gate.notify_one();
        assert_eq!(collect(first).await.body.unwrap(), abytes);
        assert_eq!(collect(joined).await.body.unwrap(), abytes);
        *h.up.gate.borrow_mut() = None;
        let g = get(&h, &format!("/v2/app/blobs/{b}"), &[]).await;
        assert_eq!(g.body.unwrap(), bbytes);
    });
}

#[test]
fn a_failed_tag_record_write_is_noted_and_never_a_500() {
    run_local(async {
        let h = harness("");
        let (c, _) = h.up.blob(&["app"], data(10, 14));
        let (_, bytes) =
            h.up.manifest(&["app"], Some("v1"), image_manifest(&c, &[], None));
        let p = "/v2/app/manifests/v1";
        h.kv.fail_writes_under(Some("tag/"));
        // A miss whose record cannot be written is still served.
        let g = get(&h, p, &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::OK);
        assert!(g
            .info
            .unwrap()
            .error
            .unwrap()
            .contains("tag record not saved"));
        h.kv.fail_writes_under(None);
        get(&h, p, &[ACCEPT_OCI]).await;
        // A revalidation after the TTL, with the write failing: the hit stands.
        h.clock.advance(301_000);
        h.kv.fail_writes_under(Some("tag/"));
        let g = get(&h, p, &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(g.body.unwrap(), bytes);
        let info = g.info.unwrap();
        assert_eq!(info.cache, CacheStatus::Hit);
        assert!(info.error.unwrap().contains("tag record not saved"));
        assert_eq!(h.up.count("HEAD", "/manifests/v1"), 1);
        // Failing link writes cost a HEAD later, never the answer.
        h.kv.fail_writes_under(Some("link/"));
        let (d2, _) = h.up.blob(&["app"], data(70_000, 15));
        let g = get(&h, &format!("/v2/app/blobs/{d2}"), &[]).await;
        assert_eq!(g.status, StatusCode::OK);
    });
}

#[test]
fn a_tag_record_from_before_links_links_its_manifest_and_layers_on_the_next_pull() {
    run_local(async {
        let h = harness("");
        let (c, _) = h.up.blob(&["app"], data(100, 16));
        let (layer, bytes) = h.up.blob(&["app"], data(80_000, 17));
        let (d, _) =
            h.up.manifest(&["app"], Some("v1"), image_manifest(&c, &[&layer], None));
        get(&h, "/v2/app/manifests/v1", &[ACCEPT_OCI]).await;
        get(&h, &format!("/v2/app/blobs/{layer}"), &[]).await;
        // A cache written before links existed: drop every link record.
        for k in h.kv.list("link/", 1000).await.unwrap() {
            h.kv.delete(&k).await.unwrap();
        }
        h.up.down.set(true);
        let g = get(&h, "/v2/app/manifests/v1", &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::OK);
        let before = h.up.calls.borrow().len();
        let g = get(&h, &format!("/v2/app/manifests/{d}"), &[ACCEPT_OCI]).await;
        assert_eq!(g.status, StatusCode::OK);
        let g = get(&h, &format!("/v2/app/blobs/{layer}"), &[]).await;
        assert_eq!(g.body.unwrap(), bytes);
        assert_eq!(
            h.up.calls.borrow().len(),
            before,
            "linked by the tag record"
        );
    });
}
