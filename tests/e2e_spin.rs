//! End-to-end tests of the Spin host: the component built by `spin.toml`'s build command runs
//! under `wasmtime serve`, composed with a test-only stand-in for Spin's key-value and
//! variables interfaces (`tests/spin-shim`), all on loopback. Debian's `docker-registry` is the
//! upstream; `skopeo` pulls through the component and every blob it stores is checked against
//! its digest. The first test checks the component's imports and exports against `wit/`. The
//! `s3_store_*` tests point the S3 blob store at `moto_server` (PyPI `moto[server]`) on
//! loopback and read its bucket directly.
//!
//! What this proves and what only `spin up` would is written down in docs/spin.md.
//!
//! Tools: `bash scripts/spin-tools.sh` (pinned wasmtime, wasm-tools and moto, into a cache outside
//! the work tree) and `scripts/setup.sh` (docker-registry, skopeo). Then
//! `cargo test --test e2e_spin`.

// The harness is a host, not the core: it reads the real clock (timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};

use support::fixtures::{sha256_digest, Image};
use support::registry::Registry;
use support::skopeo::{skopeo_copy, skopeo_pull, Platforms};
use support::spin::{built_component, component_wit, Moto, SpinApp, MOTO_SECRET_ACCESS_KEY};

/// The component must stay small enough to start fast on every request. About 1 MB of it is
/// the Public Suffix List compiled into code (the `psl` crate, for the credential trust
/// domain); without it the component was about 1.5 MiB.
const MAX_COMPONENT_BYTES: u64 = 3 << 20;
/// Blobs above this are streamed through, not kept (the `pullgate_kv_blob_max_size` the tests
/// set).
const KV_BLOB_MAX: usize = 8 << 20;
/// The S3 bucket the S3 tests use.
const BUCKET: &str = "pullgate-blobs";
/// The S3 store's multipart part size (src/spin/s3.rs `PART_SIZE`).
const S3_PART: usize = 8 << 20;
/// Layer sizes: one within a key-value chunk, one spanning four chunks.
const LAYER_SIZES: &[usize] = &[64 << 10, 3 << 20];

/// `import`/`export` lines of the world `world` in a WIT text (`wasm-tools component wit`):
/// (imports, exports).
fn world_items(wit: &str, world: Option<&str>) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut imports = BTreeSet::new();
    let mut exports = BTreeSet::new();
    let mut inside = false;
    for line in wit.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("world ") {
            let name = rest.trim_end_matches('{').trim();
            inside = world.is_none_or(|w| w == name);
            continue;
        }
        if !inside {
            continue;
        }
        if trimmed == "}" && !line.starts_with(' ') {
            inside = false;
            continue;
        }
        let item = |prefix: &str| {
            trimmed
                .strip_prefix(prefix)
                .map(|s| s.trim_end_matches(';').trim().to_string())
        };
        if let Some(i) = item("import ") {
            imports.insert(i);
        } else if let Some(e) = item("export ") {
            exports.insert(e);
        }
    }
    (imports, exports)
}

/// What a component may import and must export: the world `pullgate` in `wit/`.
fn allowed_by_wit() -> (BTreeSet<String>, BTreeSet<String>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wit");
    let (imports, exports) = world_items(&component_wit(&dir), Some("pullgate"));
    assert!(
        !imports.is_empty(),
        "wit/ has no world pullgate with imports"
    );
    (imports, exports)
}

/// Interfaces a component's WIT imports that `allowed` does not, and whether its exports are
/// exactly `expected`.
fn violations(
    component: &str,
    allowed: &BTreeSet<String>,
    expected: &BTreeSet<String>,
) -> Vec<String> {
    let (imports, exports) = world_items(component, None);
    let mut out: Vec<String> = imports
        .difference(allowed)
        .map(|i| format!("imports {i}, which Spin does not provide (not in wit/)"))
        .collect();
    if &exports != expected {
        out.push(format!("exports {exports:?}, not {expected:?}"));
    }
    out
}

/// The component builds with `spin.toml`'s command, stays under 3 MiB, imports nothing beyond
/// what Spin provides (the world in `wit/`) and exports the HTTP handler. The checker itself
/// refuses a component that imports an interface outside `wit/`.
#[test]
fn component_imports_only_what_spin_provides_and_exports_the_http_handler() {
    let component = built_component();
    let size = std::fs::metadata(&component).expect("component").len();
    eprintln!(
        "component {}: {size} bytes ({:.2} MiB)",
        component.display(),
        size as f64 / (1u64 << 20) as f64
    );
    assert!(
        size < MAX_COMPONENT_BYTES,
        "the component is {size} bytes, over {MAX_COMPONENT_BYTES}"
    );
    let (allowed, expected_exports) = allowed_by_wit();
    let wit = component_wit(&component);
    let found = violations(&wit, &allowed, &expected_exports);
    assert!(found.is_empty(), "{}\n{wit}", found.join("\n"));
    let (imports, _) = world_items(&wit, None);
    for needed in [
        "fermyon:spin/key-value@2.0.0",
        "fermyon:spin/variables@2.0.0",
        "wasi:http/outgoing-handler@0.2.6",
    ] {
        assert!(
            imports.contains(needed),
            "component does not import {needed}:\n{wit}"
        );
    }

    // The checker catches an import Spin does not provide, and a wrong export.
    let foreign = wit.replace(
        "  import fermyon:spin/variables@2.0.0;",
        "  import fermyon:spin/variables@2.0.0;\n  import wasi:keyvalue/store@0.2.0-draft2;",
    );
    let found = violations(&foreign, &allowed, &expected_exports);
    assert!(
        found.iter().any(|v| v.contains("wasi:keyvalue/store")),
        "checker missed a foreign import: {found:?}"
    );
    let p3 = wit.replace(
        "export wasi:http/incoming-handler@0.2.0;",
        "export wasi:http/handler@0.3.0;",
    );
    assert!(!violations(&p3, &allowed, &expected_exports).is_empty());
}

fn upstream_config(upstreams: &[(&str, &Registry)], extra: &str) -> String {
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
    format!("{extra}\n{config}")
}

fn pull_and_verify(app: &SpinApp, pulls: &[(String, &Image)], when: &str) {
    for (reference, image) in pulls {
        let copy = skopeo_copy(reference, Platforms::Host, None)
            .unwrap_or_else(|e| panic!("pull {reference} ({when}): {e}\n{}", app.log()));
        copy.verify_image(image);
    }
}

/// Keys of the key-value store that hold (or stage) bytes of `digest`. Link records
/// (`link/<host>/<repository>/<digest>`) name the digest but hold none of its bytes: a
/// manifest fetch links every layer it references before any of them is fetched, so a blob
/// that was refused or never stored may still have one.
fn blob_keys(app: &SpinApp, digest: &str) -> Vec<String> {
    let hex = digest.trim_start_matches("sha256:");
    app.kv_keys("default")
        .into_iter()
        .filter(|k| k.contains(hex) && !k.starts_with("link/"))
        .collect()
}

/// skopeo pulls a multi-layer OCI image (one layer spanning several key-value chunks) and a
/// Docker schema 2 image through the component with every blob intact; blob responses carry
/// Content-Length and the digest, cold and warm, on HEAD and for a range; a blob above the cap
/// is verified and served but leaves nothing in the store. Then the upstream stops: warm pulls
/// (tags revalidated on every pull, so served stale) still succeed from the key-value store.
#[test]
fn skopeo_pulls_through_the_spin_component_and_warm_pulls_survive_the_upstream_stopping() {
    let mut hub = Registry::start_plain();
    let app_image = Image::oci(210, LAYER_SIZES);
    let legacy = Image::docker_schema2(211, &[8 << 10, 32 << 10]);
    let big = Image::oci(212, &[12 << 20]);
    hub.push_image("library/alpine", "1", &app_image);
    hub.push_image("acme/legacy", "1", &legacy);
    hub.push_image("team/big", "1", &big);

    let mut app = SpinApp::builder()
        .config(&upstream_config(
            &[("docker.io", &hub)],
            "[cache]\ntag_ttl = \"0s\"\n",
        ))
        .variable("pullgate_kv_blob_max_size", &KV_BLOB_MAX.to_string())
        .start();
    let host = app.host();

    // Blob responses, cold (through the fill) and warm (from the store).
    let client = app.client();
    let layer = &app_image.layers[1];
    for pass in ["cold", "warm"] {
        let got = client.get_blob("library/alpine", &layer.digest);
        assert!(
            got.is_complete_success(),
            "{pass} blob GET: {got:?}\n{}",
            app.log()
        );
        assert_eq!(got.body, layer.bytes, "{pass} blob bytes");
        assert_eq!(
            got.header("content-length"),
            layer.bytes.len().to_string(),
            "{pass}: {:?}",
            got.headers
        );
        assert_eq!(got.header("docker-content-digest"), layer.digest);
    }
    let path = format!("/v2/library/alpine/blobs/{}", layer.digest);
    let head = client.raw(Method::HEAD, &path, &[], Vec::new());
    assert_eq!(head.status, StatusCode::OK, "{}", app.log());
    assert_eq!(head.header("content-length"), layer.bytes.len().to_string());
    let range = client.raw(
        Method::GET,
        &path,
        &[("range", "bytes=1000000-1001023")],
        Vec::new(),
    );
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(range.header("content-length"), "1024");
    assert_eq!(range.body, layer.bytes[1_000_000..1_001_024]);

    let pulls = [
        (format!("{host}/alpine:1"), &app_image),
        (
            format!("{host}/library/alpine@{}", app_image.digest()),
            &app_image,
        ),
        (format!("{host}/acme/legacy:1"), &legacy),
    ];
    pull_and_verify(&app, &pulls, "cold");

    // Every blob of the cached images has a head record in the store.
    for image in [&app_image, &legacy] {
        for blob in image.blobs() {
            let hex = blob.digest.trim_start_matches("sha256:");
            assert!(
                app.kv_keys("default").contains(&format!("~blob/{hex}")),
                "blob {} is not in the key-value store",
                blob.digest
            );
        }
    }

    // Above the cap: served and verified, never stored (not even staged chunks remain).
    let copy = skopeo_pull(&format!("{host}/team/big:1"), Platforms::Host, None);
    copy.verify_image(&big);
    assert!(
        blob_keys(&app, &big.layers[0].digest).is_empty(),
        "a blob above the cap left keys behind: {:?}",
        blob_keys(&app, &big.layers[0].digest)
    );

    // Upstream gone, fresh instances (a restart changes nothing on Spin: every request gets
    // a new instance anyway): everything cached is still served.
    let before = hub.blob_requests();
    hub.stop();
    app.restart();
    pull_and_verify(&app, &pulls, "upstream stopped");
    assert_eq!(hub.blob_requests(), before);
    hub.start();
}

/// A blob whose upstream bytes do not match its digest is refused (the pull fails) and nothing
/// of it stays in the key-value store; once the upstream is fixed, the pull succeeds and the
/// blob is stored.
#[test]
fn corrupted_upstream_blob_is_refused_and_never_stored() {
    let hub = Registry::start_plain();
    let image = Image::oci(220, &[2 << 20]);
    hub.push_image("library/victim", "1", &image);
    let layer = &image.layers[0];
    let corrupted = hub.corrupt_blob(&layer.digest);
    let app = SpinApp::builder()
        .config(&upstream_config(&[("docker.io", &hub)], ""))
        .start();

    let got = app.client().get_blob("library/victim", &layer.digest);
    assert!(
        !got.is_complete_success(),
        "a corrupted blob was served as complete: {got:?}"
    );
    assert!(
        skopeo_copy(&format!("{}/victim:1", app.host()), Platforms::Host, None).is_err(),
        "skopeo pulled an image with a corrupted layer"
    );
    assert!(
        blob_keys(&app, &layer.digest).is_empty(),
        "corrupted blob left keys: {:?}",
        blob_keys(&app, &layer.digest)
    );
    assert!(
        !app.kv_keys("default")
            .iter()
            .any(|k| k.contains(corrupted.corrupted_digest.trim_start_matches("sha256:"))),
        "the corrupted bytes were stored"
    );

    corrupted.restore();
    let copy = skopeo_pull(&format!("{}/victim:1", app.host()), Platforms::Host, None);
    copy.verify_image(&image);
    let hex = layer.digest.trim_start_matches("sha256:");
    assert!(app.kv_keys("default").contains(&format!("~blob/{hex}")));
}

/// An upstream that wants bearer tokens, with credentials from Spin variables referenced as
/// `variable:name` and `env:NAME` (the variable `name`) in `pullgate_config`: pulls work and
/// the credentials reach the token realm.
#[test]
fn token_auth_upstream_pulls_with_credentials_from_spin_variables() {
    let secured = Registry::start_with_token_auth("puller", "s3cret-pull-password");
    let private = Image::oci(230, &[16 << 10]);
    secured.push_image("team/private", "1", &private);
    let tokens = secured.token_server();
    let before = tokens.requests();
    let config = format!(
        "{}[[upstream]]\nhost = \"private.test\"\nurl = \"{}\"\n\
         username = \"variable:dockerhub_user\"\npassword = \"env:DOCKERHUB_TOKEN\"\n\
         auth_hosts = [\"{}\"]\n",
        upstream_config(&[], ""),
        secured.url(),
        tokens.authority()
    );
    let app = SpinApp::builder()
        .config(&config)
        .variable("dockerhub_user", "puller")
        .variable("dockerhub_token", "s3cret-pull-password")
        .start();
    let reference = format!("{}/private.test/team/private:1", app.host());
    skopeo_copy(&reference, Platforms::Host, None)
        .unwrap_or_else(|e| panic!("{e}\n{}", app.log()))
        .verify_image(&private);
    assert!(tokens.requests() > before, "no token was fetched");
    assert!(tokens
        .scopes_requested()
        .iter()
        .any(|scope| scope == "repository:team/private:pull"));
    assert!(
        !app.log().contains("s3cret-pull-password"),
        "a secret reached the log"
    );
}

/// A manifest over Spin's 1 MB value limit (padded with a 1.5 MB annotation) is stored as
/// chunks (the shim refuses any value over 1 MB, as Spin documents) and served whole, also
/// after the upstream stopped.
#[test]
fn manifest_over_one_megabyte_is_chunked_in_the_key_value_store() {
    let mut hub = Registry::start_plain();
    let mut image = Image::oci(240, &[8 << 10]);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&image.manifest.bytes).expect("manifest json");
    manifest["annotations"] = serde_json::json!({ "pullgate.test.padding": "p".repeat(1_500_000) });
    image.manifest = support::fixtures::Blob::new(
        &image.manifest.media_type,
        serde_json::to_vec(&manifest).expect("manifest json"),
    );
    hub.push_image("library/padded", "1", &image);
    let mut app = SpinApp::builder()
        .config(&upstream_config(
            &[("docker.io", &hub)],
            "[cache]\ntag_ttl = \"0s\"\n",
        ))
        .start();
    let reference = format!("{}/padded:1", app.host());
    skopeo_copy(&reference, Platforms::Host, None)
        .unwrap_or_else(|e| panic!("{e}\n{}", app.log()))
        .verify_image(&image);
    let keys = app.kv_keys("default");
    assert!(
        keys.iter().any(|k| k.starts_with("~chunk/")),
        "the 1.5 MB manifest was not chunked: {keys:?}"
    );
    hub.stop();
    app.restart();
    skopeo_copy(&reference, Platforms::Host, None)
        .unwrap_or_else(|e| panic!("{e}\n{}", app.log()))
        .verify_image(&image);
    let got = app.client().get_manifest("library/padded", image.digest());
    assert_eq!(got.body, image.manifest.bytes);
    hub.start();
}

/// A client that leaves after the first bytes of a cold blob does not stop the fill: the
/// handler keeps the instance alive until the deferred fill has verified and stored the blob.
#[test]
fn a_fill_whose_client_left_still_finishes_and_is_stored() {
    use std::io::Read;

    let hub = Registry::start_plain();
    let image = Image::oci(250, &[6 << 20]);
    hub.push_image("library/leaver", "1", &image);
    let app = SpinApp::builder()
        .config(&upstream_config(&[("docker.io", &hub)], ""))
        .start();
    let layer = &image.layers[0];
    let hex = layer.digest.trim_start_matches("sha256:").to_string();
    {
        let mut response = support::http::loopback_client()
            .get(format!(
                "{}/v2/library/leaver/blobs/{}",
                app.url(),
                layer.digest
            ))
            .send()
            .expect("GET blob");
        assert_eq!(response.status(), StatusCode::OK);
        let mut first = [0u8; 1024];
        response.read_exact(&mut first).expect("first bytes");
        assert_eq!(first[..], layer.bytes[..1024]);
        // Dropped here: the client hangs up with most of the blob unread.
    }
    let stored = support::process::poll_until(std::time::Duration::from_secs(60), || {
        app.kv_keys("default").contains(&format!("~blob/{hex}"))
    });
    assert!(stored, "the fill stopped with its client\n{}", app.log());
    let got = app.client().get_blob("library/leaver", &layer.digest);
    assert_eq!(got.body, layer.bytes);
}

/// The object key of a blob in the S3 store.
fn s3_key(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// With the S3 blob store configured, skopeo pulls through the component and every blob lands
/// in moto's bucket as an object under its digest key, byte for byte — none in the key-value
/// store. After the upstream stops, warm pulls are served from the bucket; the secret access key
/// never reaches the log.
#[test]
fn s3_store_keeps_pulled_blobs_in_the_bucket_and_serves_warm_pulls_from_it() {
    let mut hub = Registry::start_plain();
    let moto = Moto::start(BUCKET);
    let image = Image::oci(260, &[64 << 10, 3 << 20]);
    let legacy = Image::docker_schema2(261, &[8 << 10]);
    hub.push_image("library/s3app", "1", &image);
    hub.push_image("acme/s3legacy", "1", &legacy);
    let mut app = SpinApp::builder()
        .config(&upstream_config(
            &[("docker.io", &hub)],
            "[cache]\ntag_ttl = \"0s\"\n",
        ))
        .s3(&moto, BUCKET)
        .start();
    let host = app.host();
    let pulls = [
        (format!("{host}/s3app:1"), &image),
        (format!("{host}/acme/s3legacy:1"), &legacy),
    ];
    pull_and_verify(&app, &pulls, "cold");

    let keys = moto.object_keys(BUCKET);
    for blob in image.blobs().into_iter().chain(legacy.blobs()) {
        let key = s3_key(&blob.digest);
        assert!(
            keys.contains(&key),
            "{key} not in the bucket: {keys:?}\n{}",
            app.log()
        );
        assert_eq!(
            moto.object(BUCKET, &key).as_deref(),
            Some(&blob.bytes[..]),
            "object {key}"
        );
        assert!(
            blob_keys(&app, &blob.digest).is_empty(),
            "blob {} also went to the key-value store",
            blob.digest
        );
    }
    assert!(moto.pending_uploads(BUCKET).is_empty());

    // Warm: Content-Length and a range, served from the bucket.
    let layer = &image.layers[1];
    let path = format!("/v2/library/s3app/blobs/{}", layer.digest);
    let client = app.client();
    let head = client.raw(Method::HEAD, &path, &[], Vec::new());
    assert_eq!(head.status, StatusCode::OK, "{}", app.log());
    assert_eq!(head.header("content-length"), layer.bytes.len().to_string());
    let range = client.raw(
        Method::GET,
        &path,
        &[("range", "bytes=1000000-1001023")],
        Vec::new(),
    );
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT, "{}", app.log());
    assert_eq!(range.body, layer.bytes[1_000_000..1_001_024]);

    let before = hub.blob_requests();
    hub.stop();
    app.restart();
    pull_and_verify(&app, &pulls, "upstream stopped");
    assert_eq!(hub.blob_requests(), before, "a warm pull went upstream");
    assert!(
        !app.log().contains(MOTO_SECRET_ACCESS_KEY),
        "the S3 secret reached the log"
    );
    hub.start();
}

/// Corrupted upstream blobs, one within a part (sent with one PUT only after verification) and
/// one of several parts (a multipart upload, aborted on the mismatch), are refused and leave
/// nothing in the bucket: no object under any key, no incomplete upload. Fixed upstream, both
/// are stored.
#[test]
fn s3_store_refuses_corrupted_blobs_and_leaves_no_object_or_upload() {
    let hub = Registry::start_plain();
    let moto = Moto::start(BUCKET);
    let image = Image::oci(270, &[2 << 20, S3_PART + (3 << 20)]);
    hub.push_image("library/s3victim", "1", &image);
    let corrupted: Vec<_> = image
        .layers
        .iter()
        .map(|layer| hub.corrupt_blob(&layer.digest))
        .collect();
    let app = SpinApp::builder()
        .config(&upstream_config(&[("docker.io", &hub)], ""))
        .s3(&moto, BUCKET)
        .start();

    for layer in &image.layers {
        let got = app.client().get_blob("library/s3victim", &layer.digest);
        assert!(
            !got.is_complete_success(),
            "a corrupted blob was served as complete: {got:?}"
        );
    }
    assert!(
        skopeo_copy(&format!("{}/s3victim:1", app.host()), Platforms::Host, None).is_err(),
        "skopeo pulled an image with corrupted layers"
    );
    let keys = moto.object_keys(BUCKET);
    for (layer, bad) in image.layers.iter().zip(&corrupted) {
        for hex in [&layer.digest, &bad.corrupted_digest] {
            let hex = hex.trim_start_matches("sha256:");
            assert!(
                !keys.iter().any(|k| k.contains(hex)),
                "corrupted blob left an object: {keys:?}"
            );
        }
    }
    assert!(
        !keys.iter().any(|k| k.starts_with("blobs/")),
        "a blob object was stored: {keys:?}"
    );
    let pending = moto.pending_uploads(BUCKET);
    assert!(
        pending.is_empty(),
        "incomplete uploads left: {pending:?}\n{}",
        app.log()
    );

    for bad in &corrupted {
        bad.restore();
    }
    skopeo_pull(&format!("{}/s3victim:1", app.host()), Platforms::Host, None).verify_image(&image);
    for layer in &image.layers {
        assert_eq!(
            moto.object(BUCKET, &s3_key(&layer.digest)).as_deref(),
            Some(&layer.bytes[..])
        );
    }
}

/// A blob of several multipart parts (20 MiB, parts of 8 MiB) streams up through a multipart
/// upload and back: cold and warm GETs return it whole, a range across a part boundary is
/// exact, and the object in the bucket is byte for byte the blob.
#[test]
fn s3_store_streams_a_blob_larger_than_one_part_both_ways() {
    let hub = Registry::start_plain();
    let moto = Moto::start(BUCKET);
    let image = Image::oci(280, &[20 << 20]);
    hub.push_image("library/s3big", "1", &image);
    let app = SpinApp::builder()
        .config(&upstream_config(&[("docker.io", &hub)], ""))
        .s3(&moto, BUCKET)
        .start();
    let layer = &image.layers[0];
    assert!(layer.bytes.len() > 2 * S3_PART);
    let client = app.client();
    for pass in ["cold", "warm"] {
        let got = client.get_blob("library/s3big", &layer.digest);
        assert!(got.is_complete_success(), "{pass}: {got:?}\n{}", app.log());
        assert!(got.body == layer.bytes, "{pass}: bytes differ");
        assert_eq!(got.header("content-length"), layer.bytes.len().to_string());
    }
    let object = moto
        .object(BUCKET, &s3_key(&layer.digest))
        .expect("the blob is in the bucket");
    assert!(object == layer.bytes, "the object differs from the blob");
    let (from, to) = (S3_PART - 512, S3_PART + 511);
    let range = client.raw(
        Method::GET,
        &format!("/v2/library/s3big/blobs/{}", layer.digest),
        &[("range", &format!("bytes={from}-{to}"))],
        Vec::new(),
    );
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT, "{}", app.log());
    assert!(range.body == layer.bytes[from..=to]);
    skopeo_pull(&format!("{}/s3big:1", app.host()), Platforms::Host, None).verify_image(&image);
    assert!(moto.pending_uploads(BUCKET).is_empty());
}

/// The signing key of the component's own tokens.
const TOKEN_SECRET: &str = "spin-token-signing-key-for-link-tests";
/// The robot identity's static token, its password at `/token`.
const ROBOT_TOKEN: &str = "robot-static-token-for-link-tests";

/// Issue 9, item 1, on the Spin host: a caller may pull repository B only (an anonymous rule
/// limited to `reg.test/team/b`); a robot that may pull everything pulls A through the
/// component, so A's blobs and manifest sit in the key-value store. Asking for A's layers,
/// config and manifest under B's name then answers 404 BLOB_UNKNOWN / MANIFEST_UNKNOWN with
/// none of the bytes — the component asked the upstream under B's name (`HEAD`) and
/// transferred nothing. A layer B really holds upstream (uploaded there too) is served to the
/// anonymous caller from the store after one confirming `HEAD`, without a second transfer; B's
/// own image pulls.
///
/// The two secrets are the secret variables `spin.toml` declares for `[auth]`.
#[test]
fn content_cached_for_one_repository_is_refused_under_another_unless_it_holds_it_upstream() {
    let upstream = Registry::start_plain();
    let a = Image::oci(260, &[8 << 10, 64 << 10]);
    let b = Image::oci(261, &[8 << 10, 64 << 10]);
    upstream.push_image("team/a", "1", &a);
    upstream.push_image("team/b", "1", &b);
    let shared = a.layers[0].clone();
    upstream.client().push_blob("team/b", &shared);

    let port = support::process::free_port();
    let access = format!(
        "[auth]\nenabled = true\ntoken_secret = \"variable:pullgate_token_secret\"\n\
                  public_url = \"http://127.0.0.1:{port}\"\n\n\
                  [[identity]]\nname = \"robot\"\ntoken = \"variable:pullgate_robot_token\"\n\n\
                  [[access]]\nwho = [\"anonymous\"]\nupstreams = [\"reg.test\"]\n\
                  repositories = [\"team/b\"]\nactions = [\"pull\"]\n\n\
                  [[access]]\nwho = [\"robot\"]\nactions = [\"pull\"]\n"
    );
    let app = SpinApp::builder()
        .port(port)
        .config(&upstream_config(&[("reg.test", &upstream)], &access))
        .variable("pullgate_token_secret", TOKEN_SECRET)
        .variable("pullgate_robot_token", ROBOT_TOKEN)
        .start();
    let host = app.host();
    let anonymous = app.client();

    // The rules themselves: anonymous may not pull A.
    let direct = anonymous.get_manifest("reg.test/team/a", "1");
    assert!(
        matches!(direct.status.as_u16(), 401 | 403),
        "anonymous read A's manifest: {}\n{}",
        direct.status,
        app.log()
    );

    skopeo_copy(
        &format!("{host}/reg.test/team/a:1"),
        Platforms::Host,
        Some(("robot", ROBOT_TOKEN)),
    )
    .unwrap_or_else(|e| panic!("robot pull of A: {e}\n{}", app.log()))
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
            app.log()
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
        "the component refused without asking the upstream under B's name:\n{log}"
    );

    // B really holds the shared layer: served from the store after a confirming HEAD, no
    // second GET.
    let got = anonymous.get_blob("reg.test/team/b", &shared.digest);
    assert!(
        got.is_complete_success(),
        "the shared layer under B: {:?}\n{}",
        got.status,
        app.log()
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
        .unwrap_or_else(|e| panic!("anonymous pull of B: {e}\n{}", app.log()))
        .verify_image(&b);
}
