//! End-to-end tests of the Spin host: the component built by `spin.toml`'s build command runs
//! under `wasmtime serve`, composed with a test-only stand-in for Spin's key-value and
//! variables interfaces (`tests/spin-shim`), all on loopback. Debian's `docker-registry` is the
//! upstream; `skopeo` pulls through the component and every blob it stores is checked against
//! its digest. The first test checks the component's imports and exports against `wit/`. The
//! `s3_store_*` tests point the S3 blob store at `moto_server` (PyPI `moto[server]`) on
//! loopback and read its bucket directly.
//!
//! The scenarios every host runs are written once in `support/scenarios.rs`; this file runs
//! them on the component and keeps what only the Spin host has (the WIT check, key-value
//! chunking and its cap, fills outliving their client, the S3 store).
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

use support::fixtures::Image;
use support::host::Host;
use support::registry::Registry;
use support::scenarios;
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
const LAYER_SIZES: &[usize] = <SpinApp as Host>::LAYER_SIZES;

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

#[test]
fn verified_pulls_on_spin() {
    scenarios::verified_pulls::<SpinApp>();
}

#[test]
fn corrupt_upstream_on_spin() {
    scenarios::corrupt_upstream::<SpinApp>();
}

#[test]
fn token_upstream_on_spin() {
    scenarios::token_upstream::<SpinApp>();
}

#[test]
fn stale_after_upstream_stops_on_spin() {
    scenarios::stale_after_upstream_stops::<SpinApp>();
}

#[test]
fn coalescing_on_spin() {
    scenarios::coalescing::<SpinApp>();
}

#[test]
fn links_across_repositories_on_spin() {
    scenarios::links_across_repositories::<SpinApp>();
}

/// Every blob of a pulled image has a head record in the key-value store (a multi-layer OCI
/// image, one layer spanning several chunks, and a Docker schema 2 image); a blob above the
/// cap is verified and served but leaves nothing in the store, not even staged chunks.
#[test]
fn pulled_blobs_are_kept_in_the_key_value_store_and_one_above_the_cap_is_not() {
    let hub = Registry::start_plain();
    let app_image = Image::oci(210, LAYER_SIZES);
    let legacy = Image::docker_schema2(211, &[8 << 10, 32 << 10]);
    let big = Image::oci(212, &[12 << 20]);
    hub.push_image("library/alpine", "1", &app_image);
    hub.push_image("acme/legacy", "1", &legacy);
    hub.push_image("team/big", "1", &big);
    let app = SpinApp::builder()
        .config(&upstream_config(&[("docker.io", &hub)], ""))
        .variable("pullgate_kv_blob_max_size", &KV_BLOB_MAX.to_string())
        .start();
    let host = app.host();
    let pulls = [
        (format!("{host}/alpine:1"), &app_image),
        (format!("{host}/acme/legacy:1"), &legacy),
    ];
    pull_and_verify(&app, &pulls, "cold");

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
        app.blob_keys(&big.layers[0].digest).is_empty(),
        "a blob above the cap left keys behind: {:?}",
        app.blob_keys(&big.layers[0].digest)
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
            app.blob_keys(&blob.digest).is_empty(),
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
