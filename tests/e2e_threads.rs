//! Thread-per-core serving, end to end: the native binary with `[server] workers = 2` in front
//! of Debian's `docker-registry`. Concurrent cold pulls of one blob land on different worker
//! threads (round-robin hand-out of connections, seen in
//! `pullgate_worker_requests_total{worker=…}`) and still make exactly one upstream blob GET
//! (the registry's access log is the ground truth); every client gets the verified bytes.

// The harness is a host, not the core: it reads the real clock (bounded polling).
#![allow(clippy::disallowed_methods)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

use reqwest::StatusCode;

use support::fixtures::{sha256_digest, Image};
use support::http::RegistryClient;
use support::pullgate::Pullgate;
use support::registry::Registry;

/// Requests each worker thread handled, by worker index.
fn per_worker(pullgate: &Pullgate) -> BTreeMap<String, f64> {
    let metrics = pullgate.metrics();
    metrics
        .text()
        .lines()
        .filter_map(|line| line.strip_prefix("pullgate_worker_requests_total{worker=\""))
        .filter_map(|rest| {
            let (worker, value) = rest.split_once("\"} ")?;
            Some((worker.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn eight_concurrent_cold_pulls_on_two_workers_make_one_upstream_transfer() {
    let upstream = Registry::start_plain();
    let image = Image::oci(71, &[16 << 20]);
    upstream.push_image("team/app", "1", &image);
    let pullgate = Pullgate::builder()
        .upstream("reg.test", &upstream.url())
        .config("[server]\nworkers = 2\n")
        .start();
    let layer = image.largest_layer().clone();
    let before = per_worker(&pullgate);
    assert_eq!(before.len(), 2, "two workers report: {before:?}");

    let clients = 8;
    let barrier = Arc::new(Barrier::new(clients));
    let pulls: Vec<_> = (0..clients)
        .map(|_| {
            // One client each: its own connection, handed to the next worker in turn.
            let client = RegistryClient::new(&pullgate.url(), None);
            let (barrier, digest) = (barrier.clone(), layer.digest.clone());
            std::thread::spawn(move || {
                barrier.wait();
                client.get_blob("reg.test/team/app", &digest)
            })
        })
        .collect();
    for pull in pulls {
        let fetched = pull.join().expect("pull thread");
        assert_eq!(fetched.status, StatusCode::OK);
        assert!(fetched.is_complete_success(), "{:?}", fetched.body_error);
        assert_eq!(sha256_digest(&fetched.body), layer.digest);
    }

    let gets = upstream.count_requests("GET", &layer.digest);
    assert_eq!(
        gets,
        1,
        "one upstream blob GET for {clients} concurrent pulls:\n{}",
        upstream.access_log_summary()
    );
    let after = per_worker(&pullgate);
    for (worker, n) in &after {
        let served = n - before.get(worker).copied().unwrap_or(0.0);
        assert!(
            served >= 2.0,
            "worker {worker} served {served} of the pulls: {before:?} -> {after:?}"
        );
    }
    let metrics = pullgate.metrics();
    assert_eq!(
        metrics.total("pullgate_cache_misses_total")
            + metrics.total("pullgate_coalesced_waits_total")
            + metrics.total("pullgate_cache_hits_total"),
        clients as f64,
        "{}",
        metrics.text()
    );
}

#[test]
fn workers_flag_and_config_key_set_the_thread_count() {
    let upstream = Registry::start_plain();
    let pullgate = Pullgate::builder()
        .upstream("reg.test", &upstream.url())
        .config("[server]\nworkers = 3\n")
        .start();
    assert_eq!(per_worker(&pullgate).len(), 3);
    let started = support::process::poll_until(std::time::Duration::from_secs(30), || {
        pullgate.stderr().contains("workers=3")
    });
    assert!(started, "{}", pullgate.log_tail());
}
