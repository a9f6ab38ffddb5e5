//! End-to-end tests of the Cloudflare Workers host: the worker bundle built by `worker-build`
//! runs in workerd under `wrangler dev --local` (local KV and R2), all on loopback. Debian's
//! `docker-registry` is the upstream (plain and token-auth); `skopeo` pulls through the
//! worker and every blob it stores is checked against its digest.
//!
//! Tools: `bash scripts/worker-tools.sh` (pinned worker-build, wasm-bindgen, wrangler, esbuild,
//! wasm-opt, into a cache outside the work tree) and `scripts/setup.sh` (docker-registry,
//! skopeo). Then `cargo test --test e2e_worker`.

// The harness is a host, not the core: it reads the real clock (timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use reqwest::{Method, StatusCode};

use support::fixtures::{sha256_digest, Image, Index, Platform};
use support::process::poll_until;
use support::pullgate::metric;
use support::registry::Registry;
use support::skopeo::{skopeo_copy, skopeo_pull, Platforms};
use support::worker::Worker;

/// Layer sizes (bytes before tar+gzip, incompressible): a few KiB to 12 MiB. The largest is
/// bigger than the R2 writer's 8 MiB part, so it is stored as a multipart upload; the others
/// by a single verified put.
const MULTI_LAYER_SIZES: &[usize] = &[4 << 10, 300 << 10, 12 << 20];
/// Layer sizes of the smaller fixtures.
const SMALL_LAYER_SIZES: &[usize] = &[8 << 10, 64 << 10];

const TOKEN_USER: &str = "puller";
const TOKEN_PASSWORD: &str = "s3cret-pull-password";

fn upstream_config(upstreams: &[(&str, &Registry)]) -> String {
    // docker.io points at a closed loopback port unless a test names it: nothing reaches the
    // internet.
    let mut config = String::new();
    if !upstreams.iter().any(|(host, _)| *host == "docker.io") {
        config.push_str(&format!(
            "[[upstream]]\nhost = \"docker.io\"\nurl = \"http://127.0.0.1:{}\"\n\n",
            support::process::free_port()
        ));
    }
    for (host, registry) in upstreams {
        config.push_str(&format!(
            "[[upstream]]\nhost = \"{host}\"\nurl = \"{}\"\n\n",
            registry.url()
        ));
    }
    config
}

/// Every image kind pulls through the worker with every blob intact — a multi-layer OCI image
/// (one layer stored in R2 by multipart upload), a Docker schema 2 image, a multi-arch index
/// (all platforms, and the host's), a nested name, one-segment names on docker.io with
/// `library/`, a `reg.test/` prefix. Blob responses carry `Content-Length` and
/// `Docker-Content-Digest`, cold and warm, and ranges work. Warm pulls make no upstream blob
/// request.
#[test]
fn skopeo_pulls_every_image_kind_through_the_worker_and_warm_pulls_stay_in_r2() {
    let hub = Registry::start_plain();
    let other = Registry::start_plain();
    let alpine = Image::oci(110, MULTI_LAYER_SIZES);
    let nested = Image::oci(111, SMALL_LAYER_SIZES);
    let legacy = Image::docker_schema2(112, SMALL_LAYER_SIZES);
    let multi = Index::multi_arch(113, SMALL_LAYER_SIZES);
    let tools = Image::oci(114, SMALL_LAYER_SIZES);
    let probe = Image::oci(115, &[2 << 20]);
    hub.push_image("library/alpine", "1", &alpine);
    hub.push_image("team/sub/app", "v1", &nested);
    hub.push_image("acme/legacy", "1", &legacy);
    hub.push_index("library/multi", "1", &multi);
    hub.push_image("team/probe", "1", &probe);
    other.push_image("tools/app", "2", &tools);

    let worker = Worker::builder()
        .config(&upstream_config(&[
            ("docker.io", &hub),
            ("reg.test", &other),
        ]))
        .start();
    let w = worker.host();

    // Blob responses: Content-Length (not chunked) and the digest, on a cold miss streamed
    // through the fill, on a warm hit streamed by R2, on HEAD, and for a range.
    let client = worker.client();
    let layer = &probe.layers[0];
    for pass in ["cold", "warm"] {
        let got = client.get_blob("team/probe", &layer.digest);
        assert!(got.is_complete_success(), "{pass} blob GET: {got:?}");
        assert_eq!(got.body, layer.bytes, "{pass} blob bytes");
        assert_eq!(
            got.header("content-length"),
            layer.bytes.len().to_string(),
            "{pass} blob GET without Content-Length: {:?}",
            got.headers
        );
        assert_eq!(got.header("docker-content-digest"), layer.digest);
        assert!(
            got.header("transfer-encoding").is_empty(),
            "{pass}: chunked"
        );
    }
    let path = format!("/v2/team/probe/blobs/{}", layer.digest);
    let head = client.raw(Method::HEAD, &path, &[], Vec::new());
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-length"), layer.bytes.len().to_string());
    let range = client.raw(
        Method::GET,
        &path,
        &[("range", "bytes=100-1123")],
        Vec::new(),
    );
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(range.header("content-length"), "1024");
    assert_eq!(
        range.header("content-range"),
        format!("bytes 100-1123/{}", layer.bytes.len())
    );
    assert_eq!(range.body, layer.bytes[100..1124]);

    let host_child = multi.child(&Platform::host());
    let pulls: Vec<(String, Platforms, Option<&Image>, Option<&Index>)> = vec![
        (
            format!("{w}/alpine:1"),
            Platforms::Host,
            Some(&alpine),
            None,
        ),
        (
            format!("{w}/library/alpine:1"),
            Platforms::Host,
            Some(&alpine),
            None,
        ),
        (
            format!("{w}/alpine@{}", alpine.digest()),
            Platforms::Host,
            Some(&alpine),
            None,
        ),
        (
            format!("{w}/team/sub/app:v1"),
            Platforms::Host,
            Some(&nested),
            None,
        ),
        (
            format!("{w}/acme/legacy:1"),
            Platforms::Host,
            Some(&legacy),
            None,
        ),
        (format!("{w}/multi:1"), Platforms::All, None, Some(&multi)),
        (
            format!("{w}/multi:1"),
            Platforms::Host,
            Some(host_child),
            None,
        ),
        (
            format!("{w}/reg.test/tools/app:2"),
            Platforms::Host,
            Some(&tools),
            None,
        ),
    ];
    let pull_all = || {
        for (reference, platforms, image, index) in &pulls {
            let copy = skopeo_copy(reference, platforms.clone(), None)
                .unwrap_or_else(|e| panic!("{e}\n{}", worker.log()));
            match (image, index) {
                (Some(image), _) => copy.verify_image(image),
                (_, Some(index)) => copy.verify_index(index),
                _ => unreachable!(),
            }
        }
    };

    // Cold: everything comes from the upstreams.
    pull_all();
    assert!(
        hub.count_requests("GET", "/v2/library/alpine/") > 0,
        "alpine was not fetched as library/alpine:\n{}",
        hub.access_log_summary()
    );
    assert!(
        other.count_requests("GET", "/v2/tools/app/") > 0,
        "reg.test/ prefix did not reach the reg.test upstream"
    );
    let cold = worker.metrics();
    assert!(cold.total(metric::CACHE_MISSES) > 0.0, "{}", cold.text());

    // Warm: no blob is fetched upstream again; at most one tag revalidation per tag pull.
    let upstream_blobs = hub.blob_requests() + other.blob_requests();
    pull_all();
    assert_eq!(
        hub.blob_requests() + other.blob_requests(),
        upstream_blobs,
        "warm pulls fetched blobs upstream again:\n{}",
        hub.access_log_summary()
    );
    let warm = worker.metrics();
    assert!(
        warm.total(metric::CACHE_HITS) > cold.total(metric::CACHE_HITS),
        "{}",
        warm.text()
    );
}

/// An upstream that wants bearer tokens, with credentials from Worker secrets referenced as
/// `env:NAME` in `PULLGATE_CONFIG`: pulls work, and tokens are reused rather than fetched per
/// request.
#[test]
fn token_auth_upstream_pulls_with_credentials_from_worker_secrets() {
    let secured = Registry::start_with_token_auth(TOKEN_USER, TOKEN_PASSWORD);
    let private = Image::oci(120, SMALL_LAYER_SIZES);
    secured.push_image("team/private", "1", &private);
    let tokens = secured.token_server();
    let before = tokens.requests();

    let config = format!(
        "{}[[upstream]]\nhost = \"private.test\"\nurl = \"{}\"\nusername = \"env:PULLGATE_E2E_USER\"\npassword = \"env:PULLGATE_E2E_PASSWORD\"\nauth_hosts = [\"{}\"]\n",
        upstream_config(&[]),
        secured.url(),
        tokens.authority()
    );
    let worker = Worker::builder()
        .config(&config)
        .secret("PULLGATE_E2E_USER", TOKEN_USER)
        .secret("PULLGATE_E2E_PASSWORD", TOKEN_PASSWORD)
        .start();
    let reference = format!("{}/private.test/team/private:1", worker.host());
    skopeo_copy(&reference, Platforms::Host, None)
        .unwrap_or_else(|e| panic!("{e}\n{}", worker.log()))
        .verify_image(&private);
    let asked = tokens.requests() - before;
    assert!(
        (1..=3).contains(&asked),
        "token server asked {asked} times for one image pull (expected reuse)"
    );
    assert!(tokens
        .scopes_requested()
        .iter()
        .any(|scope| scope == "repository:team/private:pull"));

    let asked_cold = tokens.requests();
    skopeo_pull(&reference, Platforms::Host, None).verify_image(&private);
    assert_eq!(
        tokens.requests(),
        asked_cold,
        "a warm pull asked for a new token"
    );
}

/// With the upstream stopped, cached tags are served stale from KV (tag_ttl 0s forces a
/// revalidation attempt on every pull) and blobs from R2, also after the worker restarts (a
/// fresh isolate on the same persisted KV and R2); a tag never pulled answers 503.
#[test]
fn warm_pulls_are_served_from_r2_and_kv_after_the_upstream_stops_and_the_worker_restarts() {
    let mut upstream = Registry::start_plain();
    let app = Image::oci(130, MULTI_LAYER_SIZES);
    let never_pulled = Image::oci(131, SMALL_LAYER_SIZES);
    upstream.push_image("team/app", "1", &app);
    upstream.push_image("team/app", "2", &never_pulled);
    let config = format!(
        "[cache]\ntag_ttl = \"0s\"\nmax_stale = \"7d\"\n\n{}",
        upstream_config(&[("reg.test", &upstream)])
    );
    let mut worker = Worker::builder().config(&config).start();
    let by_tag = format!("{}/reg.test/team/app:1", worker.host());
    let by_digest = format!("{}/reg.test/team/app@{}", worker.host(), app.digest());

    skopeo_pull(&by_tag, Platforms::Host, None).verify_image(&app);
    upstream.stop();

    skopeo_copy(&by_tag, Platforms::Host, None)
        .unwrap_or_else(|e| panic!("stale tag with the upstream down: {e}\n{}", worker.log()))
        .verify_image(&app);
    skopeo_pull(&by_digest, Platforms::Host, None).verify_image(&app);
    assert!(
        worker.metrics().total(metric::STALE_SERVED) >= 1.0,
        "the tag was not served stale:\n{}",
        worker.metrics().text()
    );

    worker.restart();
    skopeo_copy(&by_tag, Platforms::Host, None)
        .unwrap_or_else(|e| panic!("after restart: {e}\n{}", worker.log()))
        .verify_image(&app);
    skopeo_pull(&by_digest, Platforms::Host, None).verify_image(&app);
    let hits = worker.metrics().total(metric::CACHE_HITS);
    assert!(
        hits >= app.layers.len() as f64,
        "blobs not served from R2: {hits} hits"
    );

    let cold = worker.client().get_manifest("reg.test/team/app", "2");
    assert_eq!(
        cold.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a never-pulled tag with the upstream down: {}",
        String::from_utf8_lossy(&cold.body)
    );
}

/// An upstream serving damaged blobs (right length, wrong bytes) — one small enough for a
/// single verified put, one large enough for a multipart upload: the pull fails, the client
/// never gets a complete body, R2 keeps nothing under the digest (the next GET is a miss that
/// goes upstream again), and once the upstream is fixed the blob is served intact.
#[test]
fn corrupted_upstream_blobs_fail_the_pull_and_are_never_stored_in_r2() {
    let upstream = Registry::start_plain();
    let app = Image::oci(140, MULTI_LAYER_SIZES);
    upstream.push_image("team/app", "1", &app);
    let worker = Worker::builder()
        .config(&upstream_config(&[("reg.test", &upstream)]))
        .start();
    let reference = format!("{}/reg.test/team/app:1", worker.host());
    let small = app.layers[1].clone();
    let large = app.largest_layer().clone();
    assert!(
        large.bytes.len() > 8 << 20,
        "the large layer must need a multipart upload"
    );
    let damaged = [
        (small.clone(), upstream.corrupt_blob(&small.digest)),
        (large.clone(), upstream.corrupt_blob(&large.digest)),
    ];

    assert!(
        skopeo_copy(&reference, Platforms::Host, None).is_err(),
        "skopeo accepted an image whose layers were corrupted upstream"
    );
    let client = worker.client();
    for (layer, corrupted) in &damaged {
        let again = client.get_blob("reg.test/team/app", &layer.digest);
        assert!(
            !(again.is_complete_success()
                && sha256_digest(&again.body) == corrupted.corrupted_digest),
            "the worker served the corrupted bytes of {} in full",
            layer.digest
        );
        // A fill still finishing may hold parts for a moment, hence the bounded wait.
        let leftovers = || worker.state_files_holding(&corrupted.corrupted_digest);
        poll_until(Duration::from_secs(10), || leftovers().is_empty());
        assert!(
            leftovers().is_empty(),
            "the local R2 kept the corrupted bytes: {:?}",
            leftovers()
        );
    }

    for (layer, corrupted) in &damaged {
        corrupted.restore();
        let hits_before = worker.metrics().total(metric::CACHE_HITS);
        let fetches_before = upstream.count_requests("GET", &layer.digest);
        let fixed = client.get_blob("reg.test/team/app", &layer.digest);
        assert!(fixed.is_complete_success(), "after the fix: {fixed:?}");
        assert_eq!(sha256_digest(&fixed.body), layer.digest);
        assert_eq!(
            worker.metrics().total(metric::CACHE_HITS),
            hits_before,
            "the first GET after the failure was a cache hit"
        );
        assert!(upstream.count_requests("GET", &layer.digest) > fetches_before);
    }
    skopeo_pull(&reference, Platforms::Host, None).verify_image(&app);
}

/// Concurrent cold misses for one blob in the worker's isolate share one upstream transfer,
/// and every client gets the whole verified blob (readers in other requests follow the fill
/// of the first).
#[test]
fn concurrent_cold_misses_in_one_isolate_share_one_upstream_transfer() {
    let upstream = Registry::start_plain();
    let app = Image::oci(150, &[12 << 20]);
    upstream.push_image("team/app", "1", &app);
    let worker = Worker::builder()
        .config(&upstream_config(&[("reg.test", &upstream)]))
        .start();
    let layer = app.largest_layer();
    let url = format!(
        "{}/v2/reg.test/team/app/blobs/{}",
        worker.url(),
        layer.digest
    );
    let bodies: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let response = support::http::loopback_client()
                        .get(&url)
                        .send()
                        .expect("GET blob");
                    assert_eq!(response.status(), StatusCode::OK);
                    response.bytes().expect("read blob").to_vec()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    for body in &bodies {
        assert_eq!(sha256_digest(body), layer.digest, "{}", worker.log());
    }
    assert_eq!(
        upstream.count_requests("GET", &layer.digest),
        1,
        "concurrent misses were not coalesced:\n{}",
        upstream.access_log_summary()
    );
}

/// The deployable bundle (wasm + JavaScript) stays within the size budget: at most 1 MiB
/// gzipped (Cloudflare's own limits are 3 MiB on Free and 10 MiB on Paid).
#[test]
fn worker_bundle_stays_within_one_mib_gzipped() {
    let (raw, gzipped) = support::worker::bundle_gzip_size();
    eprintln!("worker bundle: {raw} bytes, {gzipped} bytes gzipped");
    assert!(
        gzipped <= 1 << 20,
        "the worker bundle is {gzipped} bytes gzipped ({raw} raw), over the 1 MiB budget"
    );
}

/// The signing key of the worker's own tokens (a Worker secret).
const TOKEN_SECRET: &str = "worker-token-signing-key-for-link-tests";
/// The robot identity's static token (a Worker secret), its password at `/token`.
const ROBOT_TOKEN: &str = "robot-static-token-for-link-tests";

/// Issue 9, item 1, on the Workers host: a caller may pull repository B only (an anonymous
/// rule limited to `reg.test/team/b`); a robot that may pull everything pulls A through the
/// worker, so A's blobs sit in R2 and its manifest in the cache. Asking for A's layers, config
/// and manifest under B's name then answers 404 BLOB_UNKNOWN / MANIFEST_UNKNOWN with none of
/// the bytes — the worker asked the upstream under B's name (`HEAD`) and transferred nothing.
/// A layer B really holds upstream (uploaded there too) is served to the anonymous caller
/// from R2 after one confirming `HEAD`, without a second transfer; B's own image pulls.
#[test]
fn content_cached_for_one_repository_is_refused_under_another_unless_it_holds_it_upstream() {
    let upstream = Registry::start_plain();
    let a = Image::oci(160, SMALL_LAYER_SIZES);
    let b = Image::oci(161, SMALL_LAYER_SIZES);
    upstream.push_image("team/a", "1", &a);
    upstream.push_image("team/b", "1", &b);
    let shared = a.layers[0].clone();
    upstream.client().push_blob("team/b", &shared);

    let port = support::process::free_port();
    let config = format!(
        "[auth]\nenabled = true\ntoken_secret = \"env:PULLGATE_E2E_TOKEN_SECRET\"\n\
         public_url = \"http://127.0.0.1:{port}\"\n\n\
         [[identity]]\nname = \"robot\"\ntoken = \"env:PULLGATE_E2E_ROBOT_TOKEN\"\n\n\
         [[access]]\nwho = [\"anonymous\"]\nupstreams = [\"reg.test\"]\n\
         repositories = [\"team/b\"]\nactions = [\"pull\"]\n\n\
         [[access]]\nwho = [\"robot\"]\nactions = [\"pull\"]\n\n{}",
        upstream_config(&[("reg.test", &upstream)])
    );
    let worker = Worker::builder()
        .port(port)
        .config(&config)
        .secret("PULLGATE_E2E_TOKEN_SECRET", TOKEN_SECRET)
        .secret("PULLGATE_E2E_ROBOT_TOKEN", ROBOT_TOKEN)
        .start();
    let host = worker.host();
    let anonymous = worker.client();

    // The rules themselves: anonymous may not pull A.
    let direct = anonymous.get_manifest("reg.test/team/a", "1");
    assert!(
        matches!(direct.status.as_u16(), 401 | 403),
        "anonymous read A's manifest: {}\n{}",
        direct.status,
        worker.log()
    );

    skopeo_copy(
        &format!("{host}/reg.test/team/a:1"),
        Platforms::Host,
        Some(("robot", ROBOT_TOKEN)),
    )
    .unwrap_or_else(|e| panic!("robot pull of A: {e}\n{}", worker.log()))
    .verify_image(&a);
    let blob_gets = upstream.count_requests("GET", "/blobs/sha256:");
    let manifest_gets = upstream.count_requests("GET", "/manifests/");

    for blob in [&a.config, &a.layers[1]] {
        let got = anonymous.get_blob("reg.test/team/b", &blob.digest);
        assert_eq!(
            (got.status.as_u16(), got.error_code().as_deref()),
            (404, Some("BLOB_UNKNOWN")),
            "A's blob {} under B: {}\n{}",
            blob.digest,
            String::from_utf8_lossy(&got.body),
            worker.log()
        );
        assert!(
            got.body.len() < 1024 && sha256_digest(&got.body) != blob.digest,
            "A's blob bytes reached B's caller"
        );
    }
    let got = anonymous.get_manifest("reg.test/team/b", &a.manifest.digest);
    assert_eq!(
        (got.status.as_u16(), got.error_code().as_deref()),
        (404, Some("MANIFEST_UNKNOWN")),
        "A's manifest under B: {}",
        String::from_utf8_lossy(&got.body)
    );
    assert!(
        !String::from_utf8_lossy(&got.body).contains("schemaVersion"),
        "A's manifest bytes reached B's caller"
    );
    let log = upstream.access_log_summary();
    assert_eq!(
        upstream.count_requests("GET", "/blobs/sha256:"),
        blob_gets,
        "the refusals transferred blobs:\n{log}"
    );
    assert_eq!(
        upstream.count_requests("GET", "/manifests/"),
        manifest_gets,
        "the refusal fetched a manifest:\n{log}"
    );
    assert!(
        upstream.count_requests("HEAD", &format!("/v2/team/b/blobs/{}", a.layers[1].digest)) >= 1,
        "the worker refused without asking the upstream under B's name:\n{log}"
    );

    // B really holds the shared layer: served from R2 after a confirming HEAD, no second GET.
    let got = anonymous.get_blob("reg.test/team/b", &shared.digest);
    assert!(
        got.is_complete_success(),
        "the shared layer under B: {:?}\n{}",
        got.status,
        worker.log()
    );
    assert_eq!(sha256_digest(&got.body), shared.digest);
    let log = upstream.access_log_summary();
    assert_eq!(
        upstream.count_requests("GET", &format!("/blobs/{}", shared.digest)),
        1,
        "the shared layer was transferred twice:\n{log}"
    );
    assert_eq!(
        upstream.count_requests("HEAD", &format!("/v2/team/b/blobs/{}", shared.digest)),
        1,
        "{log}"
    );
    skopeo_copy(&format!("{host}/reg.test/team/b:1"), Platforms::Host, None)
        .unwrap_or_else(|e| panic!("anonymous pull of B: {e}\n{}", worker.log()))
        .verify_image(&b);
}
