//! End-to-end tests of the native `pullgate` binary with real software on loopback:
//! Debian's `docker-registry` as upstream (plain and token-auth), `skopeo` and containerd's
//! `ctr` as clients. Fixtures are generated and pushed by the tests; every blob a client
//! stores is checked against its digest.
//!
//! The scenarios every host runs (verified pulls, corrupt and token upstreams, stale serving,
//! coalescing, links) are written once in `support/scenarios.rs`; this file runs them on the
//! native binary and keeps what only the native host does (containerd, the harness itself).
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
use support::pullgate::{metric, Pullgate};
use support::registry::Registry;
use support::scenarios::{self, TOKEN_PASSWORD, TOKEN_USER};
use support::skopeo::{skopeo_copy, skopeo_pull, Platforms};

/// Layer sizes (bytes before tar+gzip) of the multi-layer fixture: a few KiB to a few MiB.
const MULTI_LAYER_SIZES: &[usize] = &[4 << 10, 300 << 10, 3 << 20];
/// Layer sizes of the smaller fixtures.
const SMALL_LAYER_SIZES: &[usize] = &[8 << 10, 64 << 10];

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
// Acceptance: pullgate between the real clients and the real registry. The scenarios every
// host runs are in tests/support/scenarios.rs.
// ---------------------------------------------------------------------------------------

#[test]
fn verified_pulls_on_native() {
    scenarios::verified_pulls::<Pullgate>();
}

#[test]
fn corrupt_upstream_on_native() {
    scenarios::corrupt_upstream::<Pullgate>();
}

#[test]
fn token_upstream_on_native() {
    scenarios::token_upstream::<Pullgate>();
}

#[test]
fn stale_after_upstream_stops_on_native() {
    scenarios::stale_after_upstream_stops::<Pullgate>();
}

#[test]
fn coalescing_on_native() {
    scenarios::coalescing::<Pullgate>();
}

#[test]
fn links_across_repositories_on_native() {
    scenarios::links_across_repositories::<Pullgate>();
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
/// A warm blob goes out with `sendfile` on a plain connection (whole, and a range across a
/// chunk boundary), byte for byte what was pushed; the cold fill's stream does not.
#[test]
fn warm_blobs_are_sent_from_the_file_without_a_copy() {
    let hub = Registry::start_plain();
    let image = Image::oci(16, &[3 << 20]);
    hub.push_image("team/zero", "1", &image);
    let pullgate = Pullgate::builder()
        .upstream("docker.io", &hub.url())
        .start();
    let client = pullgate.client();
    let layer = &image.layers[0];
    let sent = || pullgate.metrics().total("pullgate_sendfile_bytes_total");
    let cold = client.get_blob("team/zero", &layer.digest);
    assert_eq!(cold.body, layer.bytes, "cold blob bytes");
    let before = sent();
    let warm = client.get_blob("team/zero", &layer.digest);
    assert_eq!(warm.body, layer.bytes, "warm blob bytes");
    assert_eq!(sha256_digest(&warm.body), layer.digest);
    let path = format!("/v2/team/zero/blobs/{}", layer.digest);
    let (from, to) = (400_000, 1_700_000);
    let range = client.raw(
        Method::GET,
        &path,
        &[("range", &format!("bytes={from}-{to}"))],
        Vec::new(),
    );
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(range.body, layer.bytes[from..=to]);
    let zero_copy = sent() - before;
    // Everything but the pieces under the lookup threshold (a chunk's tail hyper split off
    // after a partial send) went from the file.
    let served = (layer.bytes.len() + (to + 1 - from)) as f64;
    assert!(
        zero_copy >= served * 0.9 && zero_copy <= served,
        "sendfile sent {zero_copy} of {served} warm bytes\n{}",
        pullgate.log_tail()
    );
}

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
