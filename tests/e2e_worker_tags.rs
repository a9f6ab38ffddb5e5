//! End to end on the Workers host under `wrangler dev --local`, all on loopback: tag
//! revalidations coordinated by the `PULLGATE_TAGS` Durable Objects (`src/worker/tagflight.rs`)
//! and rate limits kept in the `PULLGATE_LIMITS` Durable Objects (`src/worker/limits.rs`).
//!
//! The upstream holds manifest requests until the test releases them, so every burst overlaps
//! and each count is exact. The core has no in-isolate coalescing of tag revalidations: in the
//! control (the same worker without the `PULLGATE_TAGS` binding) every request of a burst goes
//! upstream, so the one request with the binding is the Durable Object's doing. Under
//! `wrangler dev` one isolate serves every request; a restart (same persisted state, fresh
//! isolate) shows what lives in the objects rather than in an isolate's memory. The cross-
//! instance proofs with two core instances are `tests/core_tag_flights.rs` and
//! `tests/core_shared_state.rs`.
//!
//! Tools: `bash scripts/worker-tools.sh`, as for `tests/e2e_worker.rs`. Then
//! `cargo test --test e2e_worker_tags`.

// The harness is a host, not the core: it reads the real clock (timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use support::faulty::{Fault, FaultyUpstream, Scope};
use support::fixtures::Image;
use support::http::loopback_client;
use support::process::poll_until;
use support::worker::Worker;

const WAIT: Duration = Duration::from_secs(60);
const TAGS: &str = "PULLGATE_TAGS";
const LIMITS: &str = "PULLGATE_LIMITS";
const WAITS: &str = "pullgate_coalesced_waits_total";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";
/// Requests per burst.
const M: usize = 8;

/// Every request for a tag revalidates (`tag_ttl = "0s"`).
fn config(up: &FaultyUpstream) -> String {
    format!(
        "builtin_upstreams = false\n[cache]\ntag_ttl = \"0s\"\nmax_stale = \"1h\"\n\n\
         [[upstream]]\nhost = \"reg.test\"\nurl = \"{}\"\n",
        up.url()
    )
}

/// One client's answer: status and `Docker-Content-Digest`.
type Answer = (u16, String);

/// `M` concurrent GETs of `reg.test/team/app:1` while the upstream holds manifest requests;
/// released once `ready` says every request has arrived where it waits.
fn burst(worker: &Worker, up: &FaultyUpstream, ready: impl Fn() -> bool) -> Vec<Answer> {
    up.set_fault(Fault::HoldBeforeHeaders(Scope::Manifests));
    let url = format!("{}/v2/reg.test/team/app/manifests/1", worker.url());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..M)
            .map(|_| {
                scope.spawn(|| {
                    let response = loopback_client()
                        .get(&url)
                        .header("accept", ACCEPT)
                        .send()
                        .expect("GET manifest");
                    let digest = response
                        .headers()
                        .get("docker-content-digest")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    (response.status().as_u16(), digest)
                })
            })
            .collect();
        let arrived = poll_until(WAIT, &ready);
        up.heal();
        let answers: Vec<Answer> = handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect();
        assert!(arrived, "the burst never lined up:\n{}", worker.log());
        answers
    })
}

fn manifest_requests(up: &FaultyUpstream, method: &str) -> usize {
    up.count(method, "/v2/team/app/manifests/1")
}

/// A burst for a missing tag, then one for the stale tag: one upstream request each, the
/// followers served the digest the lead resolved.
#[test]
fn m_concurrent_tag_revalidations_make_one_upstream_request_through_the_durable_object() {
    let up = FaultyUpstream::start();
    let image = Image::oci(811, &[1024]);
    up.add_image("team/app", "1", &image);
    let worker = Worker::builder().config(&config(&up)).start();
    let digest = image.manifest.digest.clone();

    let waits = worker.metrics().total(WAITS);
    let first = burst(&worker, &up, || {
        up.wait_for_stalls(1, Duration::ZERO)
            && worker.metrics().total(WAITS) >= waits + (M - 1) as f64
    });
    for (status, d) in &first {
        assert_eq!((*status, d.as_str()), (200, digest.as_str()), "{first:?}");
    }
    assert_eq!(
        (
            manifest_requests(&up, "GET"),
            manifest_requests(&up, "HEAD")
        ),
        (1, 0),
        "a missing tag: one GET for {M} requests\n{:?}",
        up.seen()
    );

    // The record is stale at once (`tag_ttl = "0s"`): the next burst revalidates with one HEAD.
    let waits = worker.metrics().total(WAITS);
    let second = burst(&worker, &up, || {
        up.wait_for_stalls(1, Duration::ZERO)
            && worker.metrics().total(WAITS) >= waits + (M - 1) as f64
    });
    for (status, d) in &second {
        assert_eq!((*status, d.as_str()), (200, digest.as_str()), "{second:?}");
    }
    assert_eq!(
        (
            manifest_requests(&up, "GET"),
            manifest_requests(&up, "HEAD")
        ),
        (1, 1),
        "a stale tag: one HEAD for {M} requests\n{:?}",
        up.seen()
    );
}

/// The control: without the binding, the same bursts send every request upstream (the burst
/// is released only once all of them are held there).
#[test]
fn without_the_tags_binding_each_request_of_a_burst_goes_upstream() {
    let up = FaultyUpstream::start();
    let image = Image::oci(812, &[1024]);
    up.add_image("team/app", "1", &image);
    let worker = Worker::builder()
        .config(&config(&up))
        .without_binding(TAGS)
        .start();
    let first = burst(&worker, &up, || up.wait_for_stalls(M, Duration::ZERO));
    assert!(first.iter().all(|(s, _)| *s == 200), "{first:?}");
    assert_eq!(manifest_requests(&up, "GET"), M);
    let second = burst(&worker, &up, || up.wait_for_stalls(M, Duration::ZERO));
    assert!(second.iter().all(|(s, _)| *s == 200), "{second:?}");
    assert_eq!(manifest_requests(&up, "HEAD"), M);
}

fn status_of(worker: &Worker) -> u16 {
    loopback_client()
        .get(format!("{}/v2/", worker.url()))
        .header("cf-connecting-ip", "192.0.2.7")
        .send()
        .expect("GET /v2/")
        .status()
        .as_u16()
}

const LIMITED: &str = "builtin_upstreams = false\n[rate_limit]\nper_ip = \"3/h\"\nburst = 3\n";

/// A per-address limit answers 429 once the bucket is empty, and still does after a restart:
/// the bucket lives in its Durable Object, not in the isolate (which a restart replaces).
#[test]
fn a_rate_limit_in_the_durable_object_answers_429_and_outlives_the_isolate() {
    let mut worker = Worker::builder().config(LIMITED).start();
    let answers: Vec<u16> = (0..4).map(|_| status_of(&worker)).collect();
    assert_eq!(answers, [200, 200, 200, 429], "{}", worker.log());
    worker.restart();
    assert_eq!(status_of(&worker), 429, "{}", worker.log());
}

/// The control: without the binding the buckets are the isolate's, and a fresh isolate starts
/// with a full one.
#[test]
fn without_the_limits_binding_a_fresh_isolate_starts_with_a_full_bucket() {
    let mut worker = Worker::builder()
        .config(LIMITED)
        .without_binding(LIMITS)
        .start();
    let answers: Vec<u16> = (0..4).map(|_| status_of(&worker)).collect();
    assert_eq!(answers, [200, 200, 200, 429], "{}", worker.log());
    worker.restart();
    assert_eq!(status_of(&worker), 200, "{}", worker.log());
}
