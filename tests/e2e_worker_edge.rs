//! End-to-end tests of the Workers host on the platform's own engines, under
//! `wrangler dev --local` (workerd with local KV, R2 and Cache API), all on loopback: the
//! `scheduled` handler (Cron Triggers) driving the gateway's outbox, the colo tier (Cache API)
//! in front of R2, and blob fills stored by one streamed R2 put of known length.
//!
//! Tools: `bash scripts/worker-tools.sh` and `scripts/setup.sh`, as for `tests/e2e_worker.rs`.
//! Then `cargo test --test e2e_worker_edge`.

// The harness is a host, not the core: it reads the real clock (timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use reqwest::{Method, StatusCode};

use support::fixtures::{sha256_digest, Image};
use support::http::loopback_client;
use support::process::{free_port, poll_until};
use support::receiver::Receiver;
use support::registry::Registry;
use support::worker::Worker;
use support::worker_edge::{
    access_lines, access_lines_for, scheduled_lines, stdout, trigger_scheduled,
};

const SECRET: &str = "webhook-secret-for-edge-tests";
const WAIT: Duration = Duration::from_secs(60);
/// The expression of `wrangler.toml`'s Cron Trigger.
const CRON: &str = "* * * * *";

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `docker.io` on a closed loopback port, so nothing reaches the internet.
fn closed_docker_io() -> String {
    format!(
        "[[upstream]]\nhost = \"docker.io\"\nurl = \"http://127.0.0.1:{}\"\n\n",
        free_port()
    )
}

/// A delivery that failed while a request was being answered is retried by the `scheduled`
/// handler (what a Cron Trigger runs), with no request reaching the worker: the receiver's
/// first answer is 503, the retry (due a second later) is sent by a scheduled pass, and the
/// worker's access log shows no request after the webhook.
#[test]
fn cron_trigger_retries_a_failed_delivery_with_no_request_arriving() {
    let receiver = Receiver::start();
    receiver.fail_next(1);
    let config = format!(
        r#"{docker}
[gateway]
admin_token = "env:PG_ADMIN"
retry_base = "1s"
retry_max = "1s"
max_attempts = 5

[[webhook]]
name = "app"
provider = "github"
secret = "env:PG_HOOK_SECRET"

[[target]]
name = "ci"
kind = "http"
url = "{r}/build"
secret = "env:PG_HOOK_SECRET"

[chain]
stages = ["build"]

[[rule]]
webhook = "app"
on = ["push"]
branches = ["main"]
stage = "build"
target = "ci"
"#,
        docker = closed_docker_io(),
        r = receiver.url()
    );
    // Without the outbox queue, whose consumer would otherwise make the retry (see
    // e2e_worker_queue): the pump is what a deployment without the bindings runs.
    let worker = Worker::builder()
        .config(&config)
        .secret("PG_HOOK_SECRET", SECRET)
        .secret("PG_ADMIN", "admin-token-for-edge-tests")
        .without_queues()
        .start();

    let body = json!({
        "ref": "refs/heads/main",
        "before": "0000000000000000000000000000000000000001",
        "after": "0123456789abcdef0123456789abcdef01234567",
        "repository": { "clone_url": "https://github.com/acme/app.git", "full_name": "acme/app" },
        "pusher": { "name": "ana" },
    })
    .to_string()
    .into_bytes();
    let resp = loopback_client()
        .post(format!("{}/hooks/app", worker.url()))
        .header("x-github-event", "push")
        .header("x-github-delivery", "edge-cron-1")
        .header("x-hub-signature-256", sign(&body))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .expect("POST /hooks/app");
    assert_eq!(resp.status().as_u16(), 202, "{}", worker.log());

    // The first attempt runs after the webhook's response and fails.
    assert!(
        poll_until(WAIT, || !receiver.requests_to("/build").is_empty()),
        "no first attempt: {}",
        worker.log()
    );
    let requests_answered = access_lines(&worker);

    // Only scheduled passes from here on; the retry is due a second after the failure.
    assert!(
        poll_until(WAIT, || {
            trigger_scheduled(&worker, CRON);
            receiver.requests_to("/build").len() >= 2
        }),
        "no retry: {}",
        worker.log()
    );
    let got = receiver.requests_to("/build");
    assert_eq!(
        got.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![503, 200],
        "{got:?}"
    );
    assert_eq!(got[0].body, got[1].body, "the same delivery each time");
    assert!(
        poll_until(WAIT, || scheduled_lines(&worker)
            .iter()
            .any(|l| l.contains("delivered=1"))),
        "no scheduled pass delivered it: {:?}",
        scheduled_lines(&worker)
    );
    assert_eq!(
        access_lines(&worker),
        requests_answered,
        "a request reached the worker's fetch handler"
    );
}

fn upstream_config(registry: &Registry) -> String {
    format!(
        "{}[[upstream]]\nhost = \"reg.test\"\nurl = \"{}\"\n",
        closed_docker_io(),
        registry.url()
    )
}

/// The cache word of the last access-log line for `path`.
fn last_cache_word(worker: &Worker, path: &str) -> String {
    access_lines_for(worker, path)
        .last()
        .and_then(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("cache="))
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Warm pulls in one location are answered by the colo tier (the Cache API) after the first
/// one: a blob and a manifest by digest pulled again are `cache=edge-hit`, with no R2 read,
/// whole or as a range; a blob over the colo's size limit stays in R2; and the colo never
/// answers a repository the core does not entitle (a layer cached for one repository is
/// still `BLOB_UNKNOWN` under another that does not hold it).
#[test]
fn warm_pulls_are_served_from_the_colo_cache_after_the_link_check() {
    let registry = Registry::start_plain();
    let image = Image::oci(401, &[64 << 10, 2 << 20]);
    let other = Image::oci(402, &[8 << 10]);
    registry.push_image("team/app", "1", &image);
    registry.push_image("team/other", "1", &other);
    let worker = Worker::builder()
        .config(&upstream_config(&registry))
        // Under the 2 MiB layer, over everything else.
        .secret("PULLGATE_COLO_MAX_BYTES", "1048576")
        .start();
    let client = worker.client();
    let small = &image.layers[0];
    let large = &image.layers[1];
    let small_path = format!("/v2/reg.test/team/app/blobs/{}", small.digest);
    let large_path = format!("/v2/reg.test/team/app/blobs/{}", large.digest);

    // The image's manifest (by tag) links its layers to team/app; the cold pulls fill R2.
    let manifest = client.get_manifest("reg.test/team/app", "1");
    assert!(manifest.is_complete_success(), "{manifest:?}");
    for (blob, path) in [(small, &small_path), (large, &large_path)] {
        let got = client.get_blob("reg.test/team/app", &blob.digest);
        assert!(got.is_complete_success(), "cold {path}: {got:?}");
        assert_eq!(got.body, blob.bytes);
        assert_eq!(last_cache_word(&worker, path), "miss");
    }

    // The copy into the colo runs in the background: pull until a pull is an edge hit.
    assert!(
        poll_until(WAIT, || {
            let got = client.get_blob("reg.test/team/app", &small.digest);
            assert!(got.is_complete_success(), "{got:?}");
            assert_eq!(got.body, small.bytes);
            last_cache_word(&worker, &small_path) == "edge-hit"
        }),
        "no edge hit: {:?}",
        access_lines_for(&worker, &small_path)
    );

    // From now on the colo answers: no R2 read, whole or a range, with the core's headers.
    let before = worker.metrics();
    let got = client.get_blob("reg.test/team/app", &small.digest);
    assert!(got.is_complete_success(), "{got:?}");
    assert_eq!(got.body, small.bytes);
    assert_eq!(got.header("content-length"), small.bytes.len().to_string());
    assert_eq!(got.header("docker-content-digest"), small.digest);
    assert_eq!(last_cache_word(&worker, &small_path), "edge-hit");
    let range = client.raw(
        Method::GET,
        &small_path,
        &[("range", "bytes=100-1123")],
        Vec::new(),
    );
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(range.body, small.bytes[100..1124]);
    assert_eq!(last_cache_word(&worker, &small_path), "edge-hit");
    let after = worker.metrics();
    assert_eq!(
        after.total("pullgate_store_reads_total"),
        before.total("pullgate_store_reads_total"),
        "an edge hit read R2:\n{}",
        after.text()
    );
    assert_eq!(
        after.total("pullgate_edge_hits_total") - before.total("pullgate_edge_hits_total"),
        2.0
    );

    // The manifest by digest takes the same path.
    let manifest_path = format!("/v2/reg.test/team/app/manifests/{}", image.digest());
    assert!(
        poll_until(WAIT, || {
            let got = client.get_manifest("reg.test/team/app", image.digest());
            assert!(got.is_complete_success(), "{got:?}");
            last_cache_word(&worker, &manifest_path) == "edge-hit"
        }),
        "no manifest edge hit: {:?}",
        access_lines_for(&worker, &manifest_path)
    );

    // Over the size limit: R2 serves it every time.
    for _ in 0..3 {
        let got = client.get_blob("reg.test/team/app", &large.digest);
        assert!(got.is_complete_success(), "{got:?}");
        assert_eq!(got.body, large.bytes);
        assert_eq!(last_cache_word(&worker, &large_path), "hit");
    }

    // Another repository that does not hold the layer: refused before any store read, though
    // this location's colo has the bytes.
    let foreign = client.get_blob("reg.test/team/other", &small.digest);
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{foreign:?}");
    assert_eq!(foreign.error_code().as_deref(), Some("BLOB_UNKNOWN"));
    assert!(foreign.body.len() < 1024, "{} bytes", foreign.body.len());
    let foreign = client.get_manifest("reg.test/team/other", image.digest());
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{foreign:?}");
    assert_eq!(foreign.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));
}

/// The `event=stored` log lines of the blob `digest`.
fn stored_lines(worker: &Worker, digest: &str) -> Vec<String> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let needle = format!("event=stored key=blobs/sha256/{hex} ");
    stdout(worker)
        .lines()
        .filter(|line| line.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// A cold fill whose upstream announced its length is stored by one streamed R2 put (with
/// R2's own SHA-256 check), above the 8 MiB that used to take a multipart upload too; the
/// client and later pulls get the intact bytes. A corrupted upstream blob of either size fails
/// the pull, is stored nowhere (R2, colo cache) and is fetched again on the next pull.
#[test]
fn cold_fills_of_known_length_are_one_streamed_put_and_corrupt_blobs_are_never_stored() {
    let registry = Registry::start_plain();
    let good = Image::oci(501, &[12 << 20, 300 << 10]);
    let bad = Image::oci(502, &[12 << 20, 64 << 10]);
    registry.push_image("team/good", "1", &good);
    registry.push_image("team/bad", "1", &bad);
    let worker = Worker::builder()
        .config(&upstream_config(&registry))
        .start();
    let client = worker.client();

    for layer in &good.layers {
        let got = client.get_blob("reg.test/team/good", &layer.digest);
        assert!(got.is_complete_success(), "cold {}: {got:?}", layer.digest);
        assert_eq!(sha256_digest(&got.body), layer.digest);
        assert_eq!(got.header("content-length"), layer.bytes.len().to_string());
        // Filled in the runtime (`src/worker/fill.rs`): one R2 put of the teed upstream body.
        let stored = format!("bytes={} put=tee", layer.bytes.len());
        assert!(
            poll_until(WAIT, || stored_lines(&worker, &layer.digest)
                .iter()
                .any(|l| l.ends_with(&stored))),
            "not one streamed put: {:?}",
            stored_lines(&worker, &layer.digest)
        );
        let warm = client.get_blob("reg.test/team/good", &layer.digest);
        assert!(
            warm.is_complete_success(),
            "warm {}: {warm:?}",
            layer.digest
        );
        assert_eq!(sha256_digest(&warm.body), layer.digest);
    }

    for layer in &bad.layers {
        let corrupted = registry.corrupt_blob(&layer.digest);
        let path = format!("/v2/reg.test/team/bad/blobs/{}", layer.digest);
        let fetches_before = registry.count_requests("GET", &layer.digest);
        let pull = || {
            let got = client.get_blob("reg.test/team/bad", &layer.digest);
            assert!(
                !(got.is_complete_success()
                    && sha256_digest(&got.body) == corrupted.corrupted_digest),
                "the corrupted bytes of {} were served in full",
                layer.digest
            );
            let word = last_cache_word(&worker, &path);
            assert!(
                word == "miss" || word == "coalesced",
                "answered from a store ({word})"
            );
            word
        };
        assert_eq!(pull(), "miss");
        // A pull may still join the failing fill; once that is gone, the next goes upstream.
        assert!(poll_until(WAIT, || pull() == "miss"), "no second miss");
        assert!(
            registry.count_requests("GET", &layer.digest) - fetches_before >= 2,
            "the second miss did not go upstream"
        );
        assert!(stored_lines(&worker, &layer.digest).is_empty());
        // A put still failing may hold its bytes for a moment, hence the bounded wait.
        let leftovers = || worker.stored_files_holding(&corrupted.corrupted_digest);
        poll_until(Duration::from_secs(10), || leftovers().is_empty());
        assert!(
            leftovers().is_empty(),
            "the local R2 or cache kept the corrupted bytes: {:?}",
            leftovers()
        );
    }
}
