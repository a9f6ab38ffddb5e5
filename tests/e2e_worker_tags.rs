//! End to end on the Workers host under `wrangler dev --local`, all on loopback: tag
//! revalidations coordinated by the `PULLGATE_TAGS` Durable Objects (`src/worker/tagflight.rs`)
//! and rate limits kept in the `PULLGATE_LIMITS` Durable Objects (`src/worker/limits.rs`).
//!
//! Every test sets the test knob `PULLGATE_TEST_ISOLATE_COALESCING = "off"`, which gives every
//! request its own core instance, as if each landed in an isolate of its own (`wrangler dev`
//! runs one isolate): only a Durable Object can then make requests share anything. (The core
//! has no in-instance coalescing of tag revalidations anyway; the knob makes the point without
//! relying on that.) The upstream holds manifest requests until the test releases them, and a
//! burst is released only once every follower is waiting in the object (its debug log line) —
//! or, in the controls without the binding, once every request is held upstream — so each count
//! is exact, by construction rather than timing. The cross-instance proofs with two core
//! instances and in-memory doubles are `tests/core_tag_flights.rs` and
//! `tests/core_shared_state.rs`.
//!
//! Tools: `bash scripts/worker-tools.sh`, as for `tests/e2e_worker.rs`. Then
//! `cargo test --test e2e_worker_tags`.

// The harness is a host, not the core: it reads the real clock (timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use support::faulty::{held_manifest_burst, FaultyUpstream};
use support::fixtures::Image;
use support::http::loopback_client;
use support::worker::{Worker, WorkerBuilder};
use support::worker_edge::stdout;

const WAIT: Duration = Duration::from_secs(60);
const TAGS: &str = "PULLGATE_TAGS";
const LIMITS: &str = "PULLGATE_LIMITS";
/// The test knob that gives every request its own core instance.
const ISOLATE_COALESCING: &str = "PULLGATE_TEST_ISOLATE_COALESCING";
/// The core's debug line for a request that waits for another's revalidation.
const JOINS: &str = "tag revalidation joins another request's";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";
/// Requests per burst.
const M: usize = 8;

/// Every request for a tag revalidates (`tag_ttl = "0s"`); debug lines on.
fn config(up: &FaultyUpstream) -> String {
    format!(
        "builtin_upstreams = false\n[log]\nlevel = \"debug\"\n\
         [cache]\ntag_ttl = \"0s\"\nmax_stale = \"1h\"\n\n\
         [[upstream]]\nhost = \"reg.test\"\nurl = \"{}\"\n",
        up.url()
    )
}

/// A worker with every request in its own core instance.
fn separate_instances() -> WorkerBuilder {
    Worker::builder().secret(ISOLATE_COALESCING, "off")
}

/// How many requests so far waited for another's revalidation.
fn joined(worker: &Worker) -> usize {
    stdout(worker).matches(JOINS).count()
}

/// One client's answer: status and `Docker-Content-Digest`.
type Answer = (u16, String);

/// `M` concurrent GETs of `reg.test/team/app:1` while the upstream holds manifest requests;
/// released once `ready` says every request has arrived where it waits.
fn burst(worker: &Worker, up: &FaultyUpstream, ready: impl Fn() -> bool) -> Vec<Answer> {
    let url = format!("{}/v2/reg.test/team/app/manifests/1", worker.url());
    held_manifest_burst(up, &url, (M, ACCEPT, WAIT), ready, || worker.log())
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
    let worker = separate_instances().config(&config(&up)).start();
    let digest = image.manifest.digest.clone();

    let first = burst(&worker, &up, || {
        up.wait_for_stalls(1, Duration::ZERO) && joined(&worker) >= M - 1
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
    let second = burst(&worker, &up, || {
        up.wait_for_stalls(1, Duration::ZERO) && joined(&worker) >= 2 * (M - 1)
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
    let worker = separate_instances()
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

/// A per-address limit answers 429 once the bucket is empty although every request has a core
/// instance of its own, and still does after a restart (a fresh isolate): the bucket lives in
/// its Durable Object.
#[test]
fn a_rate_limit_in_the_durable_object_holds_across_instances_and_restarts() {
    let mut worker = separate_instances().config(LIMITED).start();
    let answers: Vec<u16> = (0..4).map(|_| status_of(&worker)).collect();
    assert_eq!(answers, [200, 200, 200, 429], "{}", worker.log());
    worker.restart();
    assert_eq!(status_of(&worker), 429, "{}", worker.log());
}

/// The control: without the binding the buckets are each instance's, and every request's
/// instance starts with a full one.
#[test]
fn without_the_limits_binding_separate_instances_do_not_limit() {
    let worker = separate_instances()
        .config(LIMITED)
        .without_binding(LIMITS)
        .start();
    let answers: Vec<u16> = (0..4).map(|_| status_of(&worker)).collect();
    assert_eq!(answers, [200, 200, 200, 200], "{}", worker.log());
}
