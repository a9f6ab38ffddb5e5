//! The end-to-end scenarios every host runs, written once over [`Host`]: Debian's
//! `docker-registry` as the upstream, `skopeo` as the client, every blob it stores checked
//! against its digest. `e2e_native.rs`, `e2e_worker.rs` and `e2e_spin.rs` each run every
//! scenario in its own `#[test]` named `<scenario>_on_<host>`, so a failure names both.
//!
//! Where a host differs by design the scenario asks the host ([`Host::SHARES_MEMORY`],
//! [`Host::metrics`], [`Host::has_blob`]) instead of skipping silently: Spin runs every
//! request in a fresh instance, so it neither coalesces misses nor reuses tokens, and its
//! counters do not span requests.

use std::time::Duration;

use reqwest::{Method, StatusCode};

use super::fixtures::{sha256_digest, Blob, Image, Index, Platform};
use super::host::{Host, HostConfig};
use super::http::loopback_client;
use super::process::{free_port, poll_until};
use super::pullgate::{metric, Metrics};
use super::registry::Registry;
use super::skopeo::{skopeo_copy, CopiedImage, Platforms};

/// Layer sizes of the smaller fixtures.
pub const SMALL_LAYER_SIZES: &[usize] = &[8 << 10, 64 << 10];
/// The token-auth upstream's user and password.
pub const TOKEN_USER: &str = "puller";
pub const TOKEN_PASSWORD: &str = "s3cret-pull-password";

/// skopeo copies `reference` through `host`; a failure panics with the host's log.
fn pull<H: Host>(host: &H, reference: &str, platforms: Platforms, when: &str) -> CopiedImage {
    skopeo_copy(reference, platforms, None).unwrap_or_else(|e| {
        panic!(
            "[{}] pull {reference} ({when}): {e}\n{}",
            H::NAME,
            host.log()
        )
    })
}

/// What one pull must hold.
enum Expect<'a> {
    Image(&'a Image),
    Index(&'a Index),
}

impl Expect<'_> {
    fn verify(&self, copy: &CopiedImage) {
        match self {
            Expect::Image(image) => copy.verify_image(image),
            Expect::Index(index) => copy.verify_index(index),
        }
    }

    fn blob_count(&self) -> usize {
        match self {
            Expect::Image(image) => image.blobs().len(),
            Expect::Index(index) => index.children.iter().map(|child| child.blobs().len()).sum(),
        }
    }
}

/// Blob responses carry `Content-Length` (not chunked) and the digest, on a cold miss
/// streamed through the fill and on a warm hit from the store, on HEAD, and for ranges.
fn check_blob_responses<H: Host>(host: &H, repository: &str, layer: &Blob) {
    let client = host.client();
    for pass in ["cold", "warm"] {
        let got = client.get_blob(repository, &layer.digest);
        assert!(
            got.is_complete_success(),
            "[{}] {pass} blob GET: {got:?}\n{}",
            H::NAME,
            host.log()
        );
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
    let path = format!("/v2/{repository}/blobs/{}", layer.digest);
    let head = client.raw(Method::HEAD, &path, &[], Vec::new());
    assert_eq!(head.status, StatusCode::OK, "{}", host.log());
    assert_eq!(head.header("content-length"), layer.bytes.len().to_string());
    // Small ranges, and one across a 512 KiB chunk boundary of the native store (long
    // enough to go out with sendfile there).
    for (from, to) in [(100, 1123), (1_000_000, 1_001_023), (500_000, 699_999)] {
        let range = client.raw(
            Method::GET,
            &path,
            &[("range", &format!("bytes={from}-{to}"))],
            Vec::new(),
        );
        assert_eq!(range.status, StatusCode::PARTIAL_CONTENT, "{}", host.log());
        assert_eq!(range.header("content-length"), (to + 1 - from).to_string());
        assert_eq!(
            range.header("content-range"),
            format!("bytes {from}-{to}/{}", layer.bytes.len())
        );
        assert_eq!(range.body, layer.bytes[from..=to]);
    }
}

/// Every image kind pulls through the host with every blob intact: a multi-layer OCI image
/// (crossing the host's storage boundaries), a Docker schema 2 image, a multi-arch index (all
/// platforms and the host's), a nested name, by tag and by digest; one-segment names on the
/// default (docker.io) upstream get `library/`; `reg.test/...` reaches the `reg.test` upstream.
/// Blob responses carry `Content-Length` and `Docker-Content-Digest`, cold and warm, and ranges
/// work. A second round of pulls is served from the cache: the upstreams see no new blob
/// request and at most one tag revalidation per tag pull, and (where counters span requests)
/// hits grow by every blob pulled.
pub fn verified_pulls<H: Host>() {
    let hub = Registry::start_plain();
    let other = Registry::start_plain();
    let alpine = Image::oci(10, H::LAYER_SIZES);
    let nested = Image::oci(11, SMALL_LAYER_SIZES);
    let legacy = Image::docker_schema2(12, SMALL_LAYER_SIZES);
    let multi = Index::multi_arch(13, SMALL_LAYER_SIZES);
    let tools = Image::oci(14, SMALL_LAYER_SIZES);
    let probe = Image::oci(15, &[2 << 20]);
    hub.push_image("library/alpine", "1", &alpine);
    hub.push_image("team/sub/app", "v1", &nested);
    hub.push_image("acme/legacy", "1", &legacy);
    hub.push_index("library/multi", "1", &multi);
    hub.push_image("team/probe", "1", &probe);
    other.push_image("tools/app", "2", &tools);

    let host = H::start(
        HostConfig::default()
            .upstream("docker.io", &hub.url())
            .upstream("reg.test", &other.url()),
    );
    check_blob_responses(&host, "team/probe", &probe.layers[0]);

    let h = host.host();
    let host_child = multi.child(&Platform::host());
    let pulls: Vec<(String, Platforms, Expect)> = vec![
        (
            format!("{h}/alpine:1"),
            Platforms::Host,
            Expect::Image(&alpine),
        ),
        (
            format!("{h}/library/alpine:1"),
            Platforms::Host,
            Expect::Image(&alpine),
        ),
        (
            format!("{h}/alpine@{}", alpine.digest()),
            Platforms::Host,
            Expect::Image(&alpine),
        ),
        (
            format!("{h}/library/alpine@{}", alpine.digest()),
            Platforms::Host,
            Expect::Image(&alpine),
        ),
        (
            format!("{h}/team/sub/app:v1"),
            Platforms::Host,
            Expect::Image(&nested),
        ),
        (
            format!("{h}/acme/legacy:1"),
            Platforms::Host,
            Expect::Image(&legacy),
        ),
        (
            format!("{h}/multi:1"),
            Platforms::All,
            Expect::Index(&multi),
        ),
        (
            format!("{h}/multi:1"),
            Platforms::Host,
            Expect::Image(host_child),
        ),
        (
            format!("{h}/reg.test/tools/app:2"),
            Platforms::Host,
            Expect::Image(&tools),
        ),
    ];
    let pull_all = |when: &str| {
        for (reference, platforms, expect) in &pulls {
            expect.verify(&pull(&host, reference, platforms.clone(), when));
        }
    };

    // Cold: everything comes from the upstreams.
    pull_all("cold");
    assert!(
        hub.count_requests("GET", "/v2/library/alpine/") > 0,
        "alpine was not fetched as library/alpine:\n{}",
        hub.access_log_summary()
    );
    assert_eq!(
        hub.count_requests("GET", "/v2/alpine/") + hub.count_requests("HEAD", "/v2/alpine/"),
        0,
        "library/ was not added"
    );
    assert!(
        other.count_requests("GET", "/v2/tools/app/") > 0,
        "reg.test/ prefix did not reach the reg.test upstream"
    );
    assert_eq!(
        hub.count_requests("GET", "/v2/reg.test/") + hub.count_requests("HEAD", "/v2/reg.test/"),
        0,
        "reg.test/ prefix leaked to docker.io"
    );
    let cold = host.metrics();
    if let Some(cold) = &cold {
        assert!(
            cold.total(metric::CACHE_MISSES) > 0.0,
            "cold pulls must count misses:\n{}",
            cold.text()
        );
        assert!(
            cold.total(metric::UPSTREAM_REQUESTS) > 0.0,
            "cold pulls must count upstream requests:\n{}",
            cold.text()
        );
        assert!(cold.total(metric::BYTES_FETCHED) >= alpine.largest_layer().bytes.len() as f64);
    }

    // Warm: the same pulls again.
    let upstream_blobs = hub.blob_requests() + other.blob_requests();
    let upstream_content = hub.content_requests() + other.content_requests();
    pull_all("warm");
    assert_eq!(
        hub.blob_requests() + other.blob_requests(),
        upstream_blobs,
        "warm pulls fetched blobs upstream again:\n{}",
        hub.access_log_summary()
    );
    let tag_pulls = pulls
        .iter()
        .filter(|(reference, _, _)| !reference.contains('@'))
        .count();
    assert!(
        hub.content_requests() + other.content_requests() <= upstream_content + tag_pulls,
        "warm pulls went upstream for more than one tag revalidation each"
    );
    if let (Some(cold), Some(warm)) = (cold, host.metrics()) {
        let blobs_pulled: usize = pulls.iter().map(|(_, _, e)| e.blob_count()).sum();
        assert!(
            warm.total(metric::UPSTREAM_REQUESTS) - cold.total(metric::UPSTREAM_REQUESTS)
                <= tag_pulls as f64,
            "upstream requests grew during warm pulls:\ncold:\n{}\nwarm:\n{}",
            cold.text(),
            warm.text()
        );
        assert!(
            warm.total(metric::CACHE_HITS) - cold.total(metric::CACHE_HITS) >= blobs_pulled as f64,
            "expected at least {blobs_pulled} cache hits for the warm blobs:\n{}",
            warm.text()
        );
        if H::COUNTS_BYTES_SERVED {
            assert!(warm.total(metric::BYTES_SERVED) > cold.total(metric::BYTES_SERVED));
        }
    }
}

/// The sum of `name` in `metrics` (0 where counters do not span requests: the assertions
/// that use it are skipped there).
fn total(metrics: &Option<Metrics>, name: &str) -> Option<f64> {
    metrics.as_ref().map(|m| m.total(name))
}

/// An upstream serving damaged blobs (right length, wrong bytes) — on every host a layer of
/// the multi-layer fixture, and its largest (a multipart upload on R2, several key-value
/// chunks on Spin): the pull fails, the client never gets a complete body, the host's storage
/// keeps nothing of it (the next GET is a miss that goes upstream again), and once the
/// upstream is fixed the blob is served intact and stored.
pub fn corrupt_upstream<H: Host>() {
    let upstream = Registry::start_plain();
    let app = Image::oci(50, H::LAYER_SIZES);
    upstream.push_image("team/app", "1", &app);
    let host = H::start(HostConfig::default().upstream("reg.test", &upstream.url()));
    let reference = format!("{}/reg.test/team/app:1", host.host());
    let mut layers = vec![app.layers[1].clone(), app.largest_layer().clone()];
    layers.dedup_by(|a, b| a.digest == b.digest);
    let damaged: Vec<_> = layers
        .into_iter()
        .map(|layer| {
            let corrupted = upstream.corrupt_blob(&layer.digest);
            (layer, corrupted)
        })
        .collect();

    assert!(
        skopeo_copy(&reference, Platforms::Host, None).is_err(),
        "skopeo accepted an image whose layers were corrupted upstream"
    );
    let client = host.client();
    for (layer, corrupted) in &damaged {
        let again = client.get_blob("reg.test/team/app", &layer.digest);
        assert!(
            !(again.is_complete_success()
                && sha256_digest(&again.body) == corrupted.corrupted_digest),
            "[{}] served the corrupted bytes of {} in full",
            H::NAME,
            layer.digest
        );
        assert!(
            !again.is_complete_success(),
            "[{}] a corrupted blob was served as complete: {again:?}",
            H::NAME
        );
        // A fill still finishing may hold a staged copy for a moment, hence the bounded wait.
        let leftovers = || host.traces_of(&layer.digest, &corrupted.corrupted_digest);
        poll_until(Duration::from_secs(10), || leftovers().is_empty());
        assert!(
            leftovers().is_empty(),
            "[{}] the store kept the corrupted blob: {:?}",
            H::NAME,
            leftovers()
        );
    }

    for (layer, corrupted) in &damaged {
        corrupted.restore();
        let hits_before = total(&host.metrics(), metric::CACHE_HITS);
        let fetches_before = upstream.count_requests("GET", &layer.digest);
        let fixed = client.get_blob("reg.test/team/app", &layer.digest);
        assert!(
            fixed.is_complete_success(),
            "blob GET after fixing the upstream: {} {:?}\n{}",
            fixed.status,
            fixed.body_error,
            host.log()
        );
        assert_eq!(
            sha256_digest(&fixed.body),
            layer.digest,
            "wrong bytes after the upstream was fixed"
        );
        assert_eq!(
            total(&host.metrics(), metric::CACHE_HITS),
            hits_before,
            "the first GET after the failure was a cache hit"
        );
        assert!(
            upstream.count_requests("GET", &layer.digest) > fetches_before,
            "the blob was not fetched upstream again"
        );
    }
    pull(&host, &reference, Platforms::Host, "fixed").verify_image(&app);
    for (layer, _) in &damaged {
        if let Some(stored) = host.has_blob(&layer.digest) {
            assert!(stored, "[{}] {} was not stored", H::NAME, layer.digest);
        }
    }
}

/// An upstream that wants bearer tokens, with credentials from the host's secrets (referenced
/// as `env:NAME`, and on Spin also as `variable:name`): pulls work, only pull scopes are asked
/// for, the password never reaches the log, a warm pull asks for no new token and, where
/// memory spans requests, tokens are reused rather than fetched per request.
pub fn token_upstream<H: Host>() {
    let secured = Registry::start_with_token_auth(TOKEN_USER, TOKEN_PASSWORD);
    let private = Image::oci(20, H::LAYER_SIZES);
    secured.push_image("team/private", "1", &private);
    let tokens = secured.token_server();
    let (requests_before, scopes_before) = (tokens.requests(), tokens.scopes_requested().len());

    let credentials = format!(
        "username = \"{}\"\npassword = \"env:DOCKERHUB_TOKEN\"\nauth_hosts = [\"{}\"]\n",
        H::secret_reference("dockerhub_user"),
        tokens.authority()
    );
    let host = H::start(
        HostConfig::default()
            .upstream_with("private.test", &secured.url(), &credentials)
            .secret("dockerhub_user", TOKEN_USER)
            .secret("dockerhub_token", TOKEN_PASSWORD),
    );
    let reference = format!("{}/private.test/team/private:1", host.host());
    pull(&host, &reference, Platforms::Host, "cold").verify_image(&private);

    // Manifest + config + layers; allow one scope-less token for a `GET /v2/` probe, one for
    // the repository, and one spare.
    let asked = tokens.requests() - requests_before;
    assert!(asked > 0, "no token was fetched");
    if H::SHARES_MEMORY {
        assert!(
            (1..=3).contains(&asked),
            "token server asked {asked} times for one image pull (expected reuse)"
        );
    }
    let scopes = tokens.scopes_requested()[scopes_before..].to_vec();
    assert!(
        scopes
            .iter()
            .any(|scope| scope == "repository:team/private:pull"),
        "scopes requested: {scopes:?}"
    );
    assert!(
        scopes.iter().all(|scope| !scope.contains("push")),
        "a cache must ask for pull only: {scopes:?}"
    );
    assert!(
        !host.log().contains(TOKEN_PASSWORD),
        "a secret reached the log"
    );

    // Warm pull: served locally, no new token.
    let asked_cold = tokens.requests();
    pull(&host, &reference, Platforms::Host, "warm").verify_image(&private);
    assert_eq!(
        tokens.requests(),
        asked_cold,
        "a warm pull asked for a new token"
    );
}

/// With the upstream stopped, cached tags are served stale (tag_ttl 0s forces a revalidation
/// attempt on every pull) and digests from the cache, also after the host restarts on the same
/// storage, with no blob request reaching the upstream; a tag never pulled answers 503. When
/// the upstream returns, a moved tag is picked up.
pub fn stale_after_upstream_stops<H: Host>() {
    let mut upstream = Registry::start_plain();
    let app = Image::oci(40, H::LAYER_SIZES);
    let never_pulled = Image::oci(41, SMALL_LAYER_SIZES);
    upstream.push_image("team/app", "1", &app);
    upstream.push_image("team/app", "2", &never_pulled);
    let mut host = H::start(
        HostConfig::default()
            .toml("[cache]\ntag_ttl = \"0s\"\nmax_stale = \"7d\"\n")
            .upstream("reg.test", &upstream.url()),
    );
    let by_tag = format!("{}/reg.test/team/app:1", host.host());
    let by_digest = format!("{}/reg.test/team/app@{}", host.host(), app.digest());

    pull(&host, &by_tag, Platforms::Host, "cold").verify_image(&app);
    pull(&host, &by_digest, Platforms::Host, "cold").verify_image(&app);
    let blob_requests = upstream.blob_requests();
    upstream.stop();

    pull(&host, &by_tag, Platforms::Host, "stale tag, upstream down").verify_image(&app);
    pull(&host, &by_digest, Platforms::Host, "upstream down").verify_image(&app);
    if let Some(metrics) = host.metrics() {
        assert!(
            metrics.total(metric::STALE_SERVED) >= 1.0,
            "the tag was not counted as served stale:\n{}",
            metrics.text()
        );
        assert!(
            metrics.total(metric::UPSTREAM_ERRORS) >= 1.0,
            "the failed revalidation was not counted:\n{}",
            metrics.text()
        );
    }

    host.restart();
    pull(&host, &by_tag, Platforms::Host, "after restart").verify_image(&app);
    pull(&host, &by_digest, Platforms::Host, "after restart").verify_image(&app);
    if let Some(metrics) = host.metrics() {
        let hits = metrics.total(metric::CACHE_HITS);
        assert!(
            hits >= app.layers.len() as f64,
            "blobs not served from the store: {hits} hits"
        );
    }
    assert_eq!(
        upstream.blob_requests(),
        blob_requests,
        "a warm pull went upstream"
    );

    let cold = host.client().get_manifest("reg.test/team/app", "2");
    assert_eq!(
        cold.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a never-pulled tag with the upstream down: {}",
        String::from_utf8_lossy(&cold.body)
    );

    // Upstream back, tag moved: with tag_ttl 0s the next pull sees the new manifest.
    upstream.start();
    let moved = Image::oci(42, SMALL_LAYER_SIZES);
    upstream.push_image("team/app", "1", &moved);
    pull(&host, &by_tag, Platforms::Host, "moved").verify_image(&moved);
    pull(
        &host,
        &format!("{}/reg.test/team/app:2", host.host()),
        Platforms::Host,
        "upstream back",
    )
    .verify_image(&never_pulled);
}

/// Concurrent cold misses for one blob share one upstream transfer where memory spans
/// requests (readers in other requests follow the fill of the first); on Spin each request
/// fetches for itself. Every client gets the whole verified blob.
pub fn coalescing<H: Host>() {
    let upstream = Registry::start_plain();
    let app = Image::oci(150, &[12 << 20]);
    upstream.push_image("team/app", "1", &app);
    let host = H::start(HostConfig::default().upstream("reg.test", &upstream.url()));
    let layer = app.largest_layer();
    let url = format!("{}/v2/reg.test/team/app/blobs/{}", host.url(), layer.digest);
    let bodies: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let response = loopback_client().get(&url).send().expect("GET blob");
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
        assert_eq!(sha256_digest(body), layer.digest, "{}", host.log());
    }
    let fetches = upstream.count_requests("GET", &layer.digest);
    if H::SHARES_MEMORY {
        assert_eq!(
            fetches,
            1,
            "concurrent misses were not coalesced:\n{}",
            upstream.access_log_summary()
        );
    } else {
        assert!(
            (1..=4).contains(&fetches),
            "{fetches} upstream transfers for 4 requests:\n{}",
            upstream.access_log_summary()
        );
    }
}

/// The signing key of the host's own tokens (a secret).
const TOKEN_SECRET: &str = "token-signing-key-for-link-tests";
/// The robot identity's static token (a secret), its password at `/token`.
const ROBOT_TOKEN: &str = "robot-static-token-for-link-tests";

/// Issue 9, item 1: a caller may pull repository B only (an anonymous rule limited to
/// `reg.test/team/b`); a robot that may pull everything pulls A through the host, so A's
/// blobs and manifest sit in the cache. Asking for A's layers, config and manifest under B's
/// name then answers 404 BLOB_UNKNOWN / MANIFEST_UNKNOWN with none of the bytes — the host
/// asked the upstream under B's name (`HEAD`) and transferred nothing. A layer B really holds
/// upstream (uploaded there too) is served to the anonymous caller from the cache after one
/// confirming `HEAD`, without a second transfer; B's own image pulls.
pub fn links_across_repositories<H: Host>() {
    let upstream = Registry::start_plain();
    let a = Image::oci(160, SMALL_LAYER_SIZES);
    let b = Image::oci(161, SMALL_LAYER_SIZES);
    upstream.push_image("team/a", "1", &a);
    upstream.push_image("team/b", "1", &b);
    let shared = a.layers[0].clone();
    upstream.client().push_blob("team/b", &shared);

    let port = free_port();
    let access = format!(
        "[auth]\nenabled = true\ntoken_secret = \"{}\"\n\
         public_url = \"http://127.0.0.1:{port}\"\n\n\
         [[identity]]\nname = \"robot\"\ntoken = \"{}\"\n\n\
         [[access]]\nwho = [\"anonymous\"]\nupstreams = [\"reg.test\"]\n\
         repositories = [\"team/b\"]\nactions = [\"pull\"]\n\n\
         [[access]]\nwho = [\"robot\"]\nactions = [\"pull\"]\n",
        H::secret_reference("pullgate_token_secret"),
        H::secret_reference("pullgate_robot_token"),
    );
    let host = H::start(
        HostConfig::default()
            .port(port)
            .toml(&access)
            .upstream("reg.test", &upstream.url())
            .secret("pullgate_token_secret", TOKEN_SECRET)
            .secret("pullgate_robot_token", ROBOT_TOKEN),
    );
    let h = host.host();
    let anonymous = host.client();

    // The rules themselves: anonymous may not pull A.
    let direct = anonymous.get_manifest("reg.test/team/a", "1");
    assert!(
        matches!(direct.status.as_u16(), 401 | 403),
        "anonymous read A's manifest: {}\n{}",
        direct.status,
        host.log()
    );

    skopeo_copy(
        &format!("{h}/reg.test/team/a:1"),
        Platforms::Host,
        Some(("robot", ROBOT_TOKEN)),
    )
    .unwrap_or_else(|e| panic!("robot pull of A: {e}\n{}", host.log()))
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
            host.log()
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
        "[{}] refused without asking the upstream under B's name:\n{log}",
        H::NAME
    );

    // B really holds the shared layer: served from the cache after a confirming HEAD, no
    // second GET.
    let got = anonymous.get_blob("reg.test/team/b", &shared.digest);
    assert!(
        got.is_complete_success(),
        "the shared layer under B: {:?}\n{}",
        got.status,
        host.log()
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
    skopeo_copy(&format!("{h}/reg.test/team/b:1"), Platforms::Host, None)
        .unwrap_or_else(|e| panic!("anonymous pull of B: {e}\n{}", host.log()))
        .verify_image(&b);
}
