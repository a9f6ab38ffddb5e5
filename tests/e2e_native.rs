//! End-to-end tests of the native `pullgate` binary with real software on loopback:
//! Debian's `docker-registry` as upstream (plain and token-auth), `skopeo` and containerd's
//! `ctr` as clients. Fixtures are generated and pushed by the tests; every blob a client
//! stores is checked against its digest.
//!
//! Run `scripts/setup.sh` first (installs the tools), then `cargo test --test e2e_native`.
//! containerd needs root (CI runs as root). `harness_self_check` validates the harness
//! itself against docker-registry directly, without pullgate.

// The harness is a host, not the core: it reads the real clock (token expiry, timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};

use support::containerd::Containerd;
use support::fixtures::{
    sha256_digest, Image, Index, Platform, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
use support::process::poll_until;
use support::pullgate::{metric, Pullgate};
use support::registry::Registry;
use support::skopeo::{skopeo_copy, skopeo_pull, Platforms};

/// Layer sizes (bytes before tar+gzip) of the multi-layer fixture: a few KiB to a few MiB.
const MULTI_LAYER_SIZES: &[usize] = &[4 << 10, 300 << 10, 3 << 20];
/// Layer sizes of the smaller fixtures.
const SMALL_LAYER_SIZES: &[usize] = &[8 << 10, 64 << 10];

const TOKEN_USER: &str = "puller";
const TOKEN_PASSWORD: &str = "s3cret-pull-password";

// ---------------------------------------------------------------------------------------
// The harness itself, against docker-registry directly.
// ---------------------------------------------------------------------------------------

/// Every helper the acceptance tests rely on works against the real registry: pushing each
/// fixture kind, skopeo pulls with digest checks, corruption and restore, stop/start with
/// persistent storage, the token dance, and containerd pulling through a hosts.toml mirror
/// (which adds `?ns=`).
#[test]
fn harness_self_check() {
    let mut registry = Registry::start_plain();
    let oci = Image::oci(1, MULTI_LAYER_SIZES);
    let schema2 = Image::docker_schema2(2, SMALL_LAYER_SIZES);
    let index = Index::multi_arch(3, SMALL_LAYER_SIZES);
    registry.push_image("team/sub/app", "v1", &oci);
    registry.push_image("library/schema2", "1", &schema2);
    registry.push_index("library/multi", "1", &index);

    // The registry serves what was pushed, with the media types the tests expect.
    let client = registry.client();
    for (repo, tag, digest, media_type) in [
        ("team/sub/app", "v1", oci.digest(), OCI_MANIFEST),
        ("library/schema2", "1", schema2.digest(), DOCKER_MANIFEST),
        ("library/multi", "1", index.digest(), OCI_INDEX),
    ] {
        let manifest = client.get_manifest(repo, tag);
        assert_eq!(manifest.status, StatusCode::OK, "{repo}:{tag}");
        assert_eq!(manifest.header("docker-content-digest"), digest);
        assert_eq!(manifest.header("content-type"), media_type);
        assert_eq!(sha256_digest(&manifest.body), digest);
    }

    // skopeo pulls every fixture kind, blob digests verified.
    let host = registry.host();
    skopeo_pull(&format!("{host}/team/sub/app:v1"), Platforms::Host, None).verify_image(&oci);
    skopeo_pull(&format!("{host}/library/schema2:1"), Platforms::Host, None).verify_image(&schema2);
    skopeo_pull(&format!("{host}/library/multi:1"), Platforms::All, None).verify_index(&index);
    let arm = Platform::other_than_host();
    skopeo_pull(
        &format!("{host}/library/multi:1"),
        Platforms::Only(arm.clone()),
        None,
    )
    .verify_image(index.child(&arm));
    skopeo_pull(
        &format!("{host}/library/multi@{}", oci_child_digest(&index)),
        Platforms::Host,
        None,
    )
    .verify_image(index.child(&Platform::host()));

    // Corruption keeps the length, changes the bytes, and is undone by restore.
    let layer = oci.largest_layer();
    let corrupted = registry.corrupt_blob(&layer.digest);
    let served = client.get_blob("team/sub/app", &layer.digest);
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(served.body.len(), layer.bytes.len());
    assert_eq!(sha256_digest(&served.body), corrupted.corrupted_digest);
    assert!(
        skopeo_copy(&format!("{host}/team/sub/app:v1"), Platforms::Host, None).is_err(),
        "skopeo must reject a corrupted blob"
    );
    corrupted.restore();
    assert_eq!(
        client.get_blob("team/sub/app", &layer.digest).body,
        layer.bytes
    );

    // Stop/start keeps port and storage; while stopped, connections are refused.
    registry.stop();
    assert!(
        reqwest::blocking::get(format!("{}/v2/", registry.url())).is_err(),
        "registry still answering after stop"
    );
    registry.start();
    assert_eq!(
        registry.client().get_manifest("team/sub/app", "v1").status,
        StatusCode::OK
    );

    // The access log shows what the clients asked.
    assert!(
        registry.count_requests("GET", "/v2/team/sub/app/manifests/v1") >= 2,
        "{}",
        registry.access_log_summary()
    );
    assert!(registry.blob_requests() > 0);

    // Token auth: anonymous is refused with a Bearer challenge; the token server wants the
    // password; with it, push and pull work through the token dance, and skopeo pulls too.
    let secured = Registry::start_with_token_auth(TOKEN_USER, TOKEN_PASSWORD);
    let anonymous = support::http::RegistryClient::new(&secured.url(), None);
    let challenge = anonymous.raw(Method::GET, "/v2/", &[], Vec::new());
    assert_eq!(challenge.status, StatusCode::UNAUTHORIZED);
    let params = support::http::parse_bearer_challenge(challenge.header("www-authenticate"))
        .unwrap_or_else(|| panic!("not a Bearer challenge: {:?}", challenge.headers));
    assert_eq!(params["realm"], secured.token_server().realm());
    let no_password = reqwest::blocking::get(format!(
        "{}?service=x&scope=repository:private/app:pull",
        params["realm"]
    ))
    .expect("token request");
    assert_eq!(no_password.status(), StatusCode::UNAUTHORIZED);
    let private = Image::oci(4, SMALL_LAYER_SIZES);
    secured.push_image("private/app", "1", &private);
    let authed = secured.client();
    let manifest = authed.get_manifest("private/app", "1");
    assert_eq!(
        manifest.status,
        StatusCode::OK,
        "token-auth pull: {}",
        String::from_utf8_lossy(&manifest.body)
    );
    assert_eq!(sha256_digest(&manifest.body), private.digest());
    assert_eq!(
        authed
            .get_blob("private/app", &private.layers[0].digest)
            .body,
        private.layers[0].bytes
    );
    assert_eq!(
        authed.tokens_fetched(),
        1,
        "one token per repository, then reused"
    );
    assert!(
        skopeo_copy(
            &format!("{}/private/app:1", secured.host()),
            Platforms::Host,
            None
        )
        .is_err(),
        "anonymous skopeo must be refused"
    );
    skopeo_pull(
        &format!("{}/private/app:1", secured.host()),
        Platforms::Host,
        secured.credentials(),
    )
    .verify_image(&private);
    assert!(secured.token_server().tokens_issued() >= 3);
    assert!(secured
        .token_server()
        .scopes_requested()
        .iter()
        .any(|scope| scope == "repository:private/app:pull"));

    // containerd pulls through a hosts.toml mirror and sends ?ns=<registry host>.
    let containerd = Containerd::start();
    let hosts_dir = containerd.configure_mirror("reg.test", &registry.host());
    containerd
        .pull("reg.test/team/sub/app:v1", &hosts_dir)
        .unwrap_or_else(|err| panic!("{err}\n{}", containerd.log_tail()));
    containerd.assert_pulled("reg.test/team/sub/app:v1", oci.digest(), &oci);
    assert!(
        registry.count_requests("HEAD", "/v2/team/sub/app/manifests/v1?ns=reg.test")
            + registry.count_requests("GET", "/v2/team/sub/app/manifests/v1?ns=reg.test")
            >= 1,
        "containerd did not send ?ns=reg.test:\n{}",
        registry.access_log_summary()
    );
    containerd
        .pull("reg.test/library/multi:1", &hosts_dir)
        .unwrap_or_else(|err| panic!("{err}"));
    containerd.assert_pulled(
        "reg.test/library/multi:1",
        index.digest(),
        index.child(&Platform::host()),
    );
}

// ---------------------------------------------------------------------------------------
// Acceptance: pullgate between the real clients and the real registry.
// ---------------------------------------------------------------------------------------

/// One reference to pull and what the copy must hold.
enum Expect<'a> {
    Image(&'a Image),
    Index(&'a Index),
}

fn pull_and_verify(reference: &str, platforms: Platforms, expect: &Expect) {
    let copy = skopeo_pull(reference, platforms, None);
    match expect {
        Expect::Image(image) => copy.verify_image(image),
        Expect::Index(index) => copy.verify_index(index),
    }
}

/// Every image kind pulls through pullgate with every blob intact: a multi-layer OCI image, a
/// Docker schema 2 image, a multi-arch index (all platforms and the host's), a nested name, by
/// tag and by digest; one-segment names on the default (docker.io) upstream get `library/`;
/// `/v2/reg.test/...` reaches the `reg.test` upstream. A second pull is served from the cache:
/// hits grow and the upstreams see no new blob request.
#[test]
fn skopeo_pulls_every_image_kind_through_pullgate_and_warm_pulls_stay_local() {
    let hub = Registry::start_plain();
    let other = Registry::start_plain();
    let alpine = Image::oci(10, MULTI_LAYER_SIZES);
    let nested = Image::oci(11, SMALL_LAYER_SIZES);
    let legacy = Image::docker_schema2(12, SMALL_LAYER_SIZES);
    let multi = Index::multi_arch(13, SMALL_LAYER_SIZES);
    let tools = Image::oci(14, SMALL_LAYER_SIZES);
    hub.push_image("library/alpine", "1", &alpine);
    hub.push_image("team/sub/app", "v1", &nested);
    hub.push_image("acme/legacy", "1", &legacy);
    hub.push_index("library/multi", "1", &multi);
    other.push_image("tools/app", "2", &tools);

    let pullgate = Pullgate::builder()
        .upstream("docker.io", &hub.url())
        .upstream("reg.test", &other.url())
        .start();
    let pg = pullgate.host();
    let host_child = multi.child(&Platform::host());
    let pulls: Vec<(String, Platforms, Expect)> = vec![
        (
            format!("{pg}/alpine:1"),
            Platforms::Host,
            Expect::Image(&alpine),
        ),
        (
            format!("{pg}/library/alpine:1"),
            Platforms::Host,
            Expect::Image(&alpine),
        ),
        (
            format!("{pg}/alpine@{}", alpine.digest()),
            Platforms::Host,
            Expect::Image(&alpine),
        ),
        (
            format!("{pg}/team/sub/app:v1"),
            Platforms::Host,
            Expect::Image(&nested),
        ),
        (
            format!("{pg}/acme/legacy:1"),
            Platforms::Host,
            Expect::Image(&legacy),
        ),
        (
            format!("{pg}/multi:1"),
            Platforms::All,
            Expect::Index(&multi),
        ),
        (
            format!("{pg}/multi:1"),
            Platforms::Host,
            Expect::Image(host_child),
        ),
        (
            format!("{pg}/reg.test/tools/app:2"),
            Platforms::Host,
            Expect::Image(&tools),
        ),
    ];

    // Cold: everything comes from the upstreams.
    for (reference, platforms, expect) in &pulls {
        pull_and_verify(reference, platforms.clone(), expect);
    }
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
    let cold = pullgate.metrics();
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

    // Warm: the same pulls again.
    let upstream_blobs = hub.blob_requests() + other.blob_requests();
    let upstream_content = hub.content_requests() + other.content_requests();
    for (reference, platforms, expect) in &pulls {
        pull_and_verify(reference, platforms.clone(), expect);
    }
    let warm = pullgate.metrics();
    let blobs_pulled: usize = pulls
        .iter()
        .map(|(_, _, expect)| match expect {
            Expect::Image(image) => image.blobs().len(),
            Expect::Index(index) => index.children.iter().map(|child| child.blobs().len()).sum(),
        })
        .sum();
    assert_eq!(
        hub.blob_requests() + other.blob_requests(),
        upstream_blobs,
        "warm pulls fetched blobs upstream again"
    );
    let tag_pulls = pulls
        .iter()
        .filter(|(reference, _, _)| !reference.contains('@'))
        .count();
    assert!(
        hub.content_requests() + other.content_requests() <= upstream_content + tag_pulls,
        "warm pulls went upstream for more than one tag revalidation each"
    );
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
    assert!(warm.total(metric::BYTES_SERVED) > cold.total(metric::BYTES_SERVED));
}

/// An upstream that wants bearer tokens, with credentials from the config file's `env:`
/// references: pulls work, and tokens are reused rather than fetched per request.
#[test]
fn token_auth_upstream_pulls_with_configured_credentials_and_reuses_tokens() {
    let secured = Registry::start_with_token_auth(TOKEN_USER, TOKEN_PASSWORD);
    let private = Image::oci(20, MULTI_LAYER_SIZES);
    secured.push_image("team/private", "1", &private);
    let tokens = secured.token_server();
    let (requests_before, scopes_before) = (tokens.requests(), tokens.scopes_requested().len());

    let config = format!(
        "[[upstream]]\nhost = \"private.test\"\nurl = \"{}\"\nusername = \"env:PULLGATE_E2E_USER\"\npassword = \"env:PULLGATE_E2E_PASSWORD\"\nauth_hosts = [\"{}\"]\n",
        secured.url(),
        tokens.authority()
    );
    let pullgate = Pullgate::builder()
        .config(&config)
        .env("PULLGATE_E2E_USER", TOKEN_USER)
        .env("PULLGATE_E2E_PASSWORD", TOKEN_PASSWORD)
        .start();
    let reference = format!("{}/private.test/team/private:1", pullgate.host());
    skopeo_pull(&reference, Platforms::Host, None).verify_image(&private);

    // Manifest + config + 3 layers = 5 upstream fetches; allow one scope-less token for a
    // `GET /v2/` probe, one for the repository, and one spare.
    let asked = tokens.requests() - requests_before;
    assert!(
        (1..=3).contains(&asked),
        "token server asked {asked} times for one image pull (expected reuse)"
    );
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

    // Warm pull: served locally, no new token.
    let asked_cold = tokens.requests();
    skopeo_pull(&reference, Platforms::Host, None).verify_image(&private);
    assert_eq!(
        tokens.requests(),
        asked_cold,
        "a warm pull asked for a new token"
    );
}

/// containerd pulling through a `hosts.toml` mirror sends `?ns=<registry>`; pullgate routes
/// `ns=reg.test` to that upstream and `ns=docker.io` to the default one, and containerd ends up
/// with every blob (and unpacks the layers).
#[test]
fn containerd_pulls_through_pullgate_as_hosts_toml_mirror() {
    let hub = Registry::start_plain();
    let other = Registry::start_plain();
    let alpine = Image::oci(30, MULTI_LAYER_SIZES);
    let multi = Index::multi_arch(31, SMALL_LAYER_SIZES);
    hub.push_image("library/alpine", "1", &alpine);
    other.push_index("team/app", "2", &multi);
    let pullgate = Pullgate::builder()
        .upstream("docker.io", &hub.url())
        .upstream("reg.test", &other.url())
        .start();

    let containerd = Containerd::start();
    let hosts_dir = containerd.configure_mirror("reg.test", &pullgate.host());
    containerd.configure_mirror("docker.io", &pullgate.host());

    containerd
        .pull("reg.test/team/app:2", &hosts_dir)
        .unwrap_or_else(|err| panic!("{err}\n{}", containerd.log_tail()));
    containerd.assert_pulled(
        "reg.test/team/app:2",
        multi.digest(),
        multi.child(&Platform::host()),
    );
    assert!(
        other.count_requests("GET", "/v2/team/app/") > 0,
        "ns=reg.test did not reach the reg.test upstream"
    );

    containerd
        .pull("docker.io/library/alpine:1", &hosts_dir)
        .unwrap_or_else(|err| panic!("{err}\n{}", containerd.log_tail()));
    containerd.assert_pulled("docker.io/library/alpine:1", alpine.digest(), &alpine);
    assert!(
        hub.count_requests("GET", "/v2/library/alpine/") > 0,
        "ns=docker.io did not reach the default upstream"
    );
}

/// With the upstream down, cached tags are served stale (tag_ttl 0s forces a revalidation
/// attempt on every pull) and digests are served from the cache, also after pullgate restarts
/// on the same data dir; a tag never pulled answers 503. When the upstream returns, a moved
/// tag is picked up.
#[test]
fn cached_images_are_served_while_upstream_is_down_and_cold_tags_answer_503() {
    let mut upstream = Registry::start_plain();
    let app = Image::oci(40, SMALL_LAYER_SIZES);
    let never_pulled = Image::oci(41, SMALL_LAYER_SIZES);
    upstream.push_image("team/app", "1", &app);
    upstream.push_image("team/app", "2", &never_pulled);
    let config = format!(
        "[cache]\ntag_ttl = \"0s\"\nmax_stale = \"7d\"\n\n[[upstream]]\nhost = \"reg.test\"\nurl = \"{}\"\n",
        upstream.url()
    );
    let mut pullgate = Pullgate::builder().config(&config).start();
    let by_tag = |pg: &Pullgate| format!("{}/reg.test/team/app:1", pg.host());
    let by_digest = |pg: &Pullgate| format!("{}/reg.test/team/app@{}", pg.host(), app.digest());

    skopeo_pull(&by_tag(&pullgate), Platforms::Host, None).verify_image(&app);
    upstream.stop();

    skopeo_pull(&by_tag(&pullgate), Platforms::Host, None).verify_image(&app);
    skopeo_pull(&by_digest(&pullgate), Platforms::Host, None).verify_image(&app);
    let metrics = pullgate.metrics();
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

    pullgate.restart();
    skopeo_pull(&by_tag(&pullgate), Platforms::Host, None).verify_image(&app);
    skopeo_pull(&by_digest(&pullgate), Platforms::Host, None).verify_image(&app);

    let cold = pullgate.client().get_manifest("reg.test/team/app", "2");
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
    skopeo_pull(&by_tag(&pullgate), Platforms::Host, None).verify_image(&moved);
    skopeo_pull(
        &format!("{}/reg.test/team/app:2", pullgate.host()),
        Platforms::Host,
        None,
    )
    .verify_image(&never_pulled);
}

/// An upstream serving a damaged blob (right length, wrong bytes): the pull fails, nothing is
/// cached under that digest, and once the upstream is fixed the blob is fetched again (a miss,
/// not a hit) and served intact.
#[test]
fn corrupted_upstream_blob_fails_the_pull_and_is_never_cached() {
    let upstream = Registry::start_plain();
    let app = Image::oci(50, MULTI_LAYER_SIZES);
    upstream.push_image("team/app", "1", &app);
    let pullgate = Pullgate::builder()
        .upstream("reg.test", &upstream.url())
        .start();
    let reference = format!("{}/reg.test/team/app:1", pullgate.host());
    let layer = app.largest_layer().clone();
    let corrupted = upstream.corrupt_blob(&layer.digest);

    let failed = skopeo_copy(&reference, Platforms::Host, None);
    assert!(
        failed.is_err(),
        "skopeo accepted an image whose layer was corrupted upstream"
    );

    // Nothing may stay under that digest (a download still finishing may hold a temp file for
    // a moment, hence the bounded wait).
    let leftovers = || pullgate.files_holding(&layer.digest, &corrupted.corrupted_digest);
    poll_until(Duration::from_secs(10), || leftovers().is_empty());
    assert!(
        leftovers().is_empty(),
        "the data dir kept the corrupted blob: {:?}",
        leftovers()
    );
    let client = pullgate.client();
    let again = client.get_blob("reg.test/team/app", &layer.digest);
    assert!(
        !(again.is_complete_success() && sha256_digest(&again.body) == corrupted.corrupted_digest),
        "pullgate served the corrupted bytes in full"
    );

    corrupted.restore();
    let hits_before = pullgate.metrics().total(metric::CACHE_HITS);
    let upstream_fetches_before = upstream.count_requests("GET", &layer.digest);
    let fixed = client.get_blob("reg.test/team/app", &layer.digest);
    assert!(
        fixed.is_complete_success(),
        "blob GET after fixing the upstream: {} {:?}",
        fixed.status,
        fixed.body_error
    );
    assert_eq!(
        sha256_digest(&fixed.body),
        layer.digest,
        "wrong bytes after the upstream was fixed"
    );
    assert_eq!(
        pullgate.metrics().total(metric::CACHE_HITS),
        hits_before,
        "the first GET after the failure was a cache hit"
    );
    assert!(
        upstream.count_requests("GET", &layer.digest) > upstream_fetches_before,
        "the blob was not fetched upstream again"
    );

    skopeo_pull(&reference, Platforms::Host, None).verify_image(&app);
}

/// `ns` is a key into the configured upstreams, never a host to dial: an unknown one is
/// refused at once with a 4xx, and nothing is contacted (not even a listener on loopback).
#[test]
fn unconfigured_ns_is_refused_without_contacting_anything() {
    let upstream = Registry::start_plain();
    let pullgate = Pullgate::builder()
        .upstream("reg.test", &upstream.url())
        .start();
    let trap = std::net::TcpListener::bind("127.0.0.1:0").expect("bind trap listener");
    trap.set_nonblocking(true).expect("nonblocking");
    let trap_host = trap.local_addr().expect("addr").to_string();
    let before = pullgate.metrics().total(metric::UPSTREAM_REQUESTS);
    let client = pullgate.client();

    for ns in ["evil.example", trap_host.as_str()] {
        let started = Instant::now();
        let response = client.raw(
            Method::GET,
            &format!("/v2/x/manifests/latest?ns={ns}"),
            &[("Accept", OCI_MANIFEST)],
            Vec::new(),
        );
        assert!(
            response.status.is_client_error(),
            "ns={ns} answered {} (expected 4xx)",
            response.status
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "ns={ns} took {:?}",
            started.elapsed()
        );
    }
    assert!(
        matches!(trap.accept(), Err(ref err) if err.kind() == std::io::ErrorKind::WouldBlock),
        "pullgate dialled the ns host"
    );
    assert_eq!(
        pullgate.metrics().total(metric::UPSTREAM_REQUESTS),
        before,
        "an unknown ns caused upstream requests"
    );
    assert_eq!(
        upstream.content_requests(),
        0,
        "an unknown ns reached a configured upstream"
    );
}

/// pullgate is read-only: uploads and manifest pushes answer 405 with the OCI error envelope
/// code UNSUPPORTED.
#[test]
fn pushes_are_refused_with_405_unsupported() {
    let upstream = Registry::start_plain();
    let pullgate = Pullgate::builder()
        .upstream("reg.test", &upstream.url())
        .start();
    let client = pullgate.client();
    let manifest = Image::oci(70, &[1024]).manifest;
    let attempts = [
        (Method::POST, "/v2/x/blobs/uploads/", None),
        (Method::POST, "/v2/reg.test/team/app/blobs/uploads/", None),
        (Method::PUT, "/v2/x/manifests/latest", Some(&manifest)),
    ];
    for (method, path, manifest) in attempts {
        let response = match manifest {
            Some(manifest) => client.raw(
                method.clone(),
                path,
                &[("Content-Type", OCI_MANIFEST)],
                manifest.bytes.clone(),
            ),
            None => client.raw(method.clone(), path, &[], Vec::new()),
        };
        assert_eq!(
            response.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(
            response.error_code().as_deref(),
            Some("UNSUPPORTED"),
            "{method} {path}: {}",
            String::from_utf8_lossy(&response.body)
        );
    }
    assert_eq!(
        upstream.count_requests("POST", "/v2/") + upstream.count_requests("PUT", "/v2/"),
        0,
        "a push reached the upstream"
    );
}

/// `GET /v2/` is the first thing every client asks: 200 with the API version header; and
/// `/healthz` and `/metrics` answer.
#[test]
fn api_root_health_and_metrics_answer() {
    let pullgate = Pullgate::builder().start();
    let root = pullgate.client().raw(Method::GET, "/v2/", &[], Vec::new());
    assert_eq!(root.status, StatusCode::OK);
    assert_eq!(
        root.header("docker-distribution-api-version"),
        "registry/2.0"
    );
    let metrics = pullgate.metrics();
    assert!(
        metrics.text().contains("pullgate_"),
        "no pullgate metrics exported:\n{}",
        metrics.text()
    );
}

fn oci_child_digest(index: &Index) -> String {
    index.child(&Platform::host()).digest().to_string()
}
