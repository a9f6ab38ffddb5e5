//! End-to-end tests of the Workers host's global single-flight of blob fills
//! (`src/worker/flight.rs`: one Durable Object per digest holds the fill's lease), under
//! `wrangler dev --local`, all on loopback.
//!
//! `wrangler dev` runs one isolate, whose core coalesces concurrent misses by itself; so both
//! tests set the test knob `PULLGATE_TEST_ISOLATE_COALESCING = "off"`, which gives every
//! request its own core instance, as if each landed in an isolate of its own. Then only the
//! Durable Object can make them share a transfer: with its binding, N concurrent cold pulls
//! make one upstream GET; without it (the control), N. The upstream holds every blob transfer
//! half-way until the test lets it finish, so the pulls overlap by construction, not by timing.
//!
//! The lease's rules are unit-tested here too, natively: the pure state machine
//! `src/worker/flight/lease.rs` is included by path (the `worker` feature builds only for
//! wasm32).
//!
//! Tools: `bash scripts/worker-tools.sh` and `scripts/setup.sh`, as for `tests/e2e_worker.rs`.
//! Then `cargo test --test e2e_worker_flight`.

// The harness is a host, not the core: it reads the real clock (timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

#[path = "../src/worker/flight/lease.rs"]
#[allow(dead_code)]
mod lease;

use std::sync::mpsc;
use std::time::Duration;

use reqwest::StatusCode;

use support::faulty::{Fault, FaultyUpstream};
use support::fixtures::{sha256_digest, Image};
use support::http::loopback_client;
use support::process::free_port;
use support::worker::Worker;
use support::worker_edge::access_lines_for;

/// Concurrent cold pulls of the one layer.
const N: usize = 6;
/// The longest any bounded wait here takes.
const WAIT: Duration = Duration::from_secs(90);
/// The test knob that gives every request its own core instance.
const ISOLATE_COALESCING: &str = "PULLGATE_TEST_ISOLATE_COALESCING";
/// The Durable Object binding of the blob flights.
const FLIGHTS: &str = "PULLGATE_FLIGHTS";

/// A worker in front of `faulty` (as `reg.test`), isolate coalescing off, with or without the
/// flights binding.
fn start(faulty: &FaultyUpstream, flights: bool) -> Worker {
    let config = format!(
        "[[upstream]]\nhost = \"docker.io\"\nurl = \"http://127.0.0.1:{}\"\n\n\
         [[upstream]]\nhost = \"reg.test\"\nurl = \"{}\"\n",
        free_port(),
        faulty.url()
    );
    let builder = Worker::builder()
        .config(&config)
        .secret(ISOLATE_COALESCING, "off");
    match flights {
        true => builder.start(),
        false => builder.without_binding(FLIGHTS).start(),
    }
}

/// Runs `N` pulls of `layer` while the upstream holds its transfers half-way: the first alone
/// until its transfer is held, then the other `N - 1` at once. `while_held` runs once every
/// pull answered its headers (and before the upstream is let go) and gets the count of
/// upstream GETs of the blob then. Returns every pull's body.
fn pull_while_held(
    worker: &Worker,
    faulty: &FaultyUpstream,
    image: &Image,
    while_held: impl FnOnce(usize),
) -> Vec<Vec<u8>> {
    let layer = &image.layers[0];
    let url = format!(
        "{}/v2/reg.test/team/app/blobs/{}",
        worker.url(),
        layer.digest
    );
    faulty.set_fault(Fault::PauseMidBlob);
    let get = |headers: mpsc::Sender<StatusCode>| {
        let response = loopback_client()
            .get(&url)
            .timeout(WAIT)
            .send()
            .expect("GET blob");
        let _ = headers.send(response.status());
        response.bytes().expect("read blob").to_vec()
    };
    let get = &get;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        let first = {
            let tx = tx.clone();
            scope.spawn(move || get(tx))
        };
        assert!(
            faulty.wait_for_stalls(1, WAIT),
            "the first pull never reached the upstream\n{}",
            worker.log()
        );
        let rest: Vec<_> = (1..N)
            .map(|_| {
                let tx = tx.clone();
                scope.spawn(move || get(tx))
            })
            .collect();
        for i in 0..N {
            let status = rx.recv_timeout(WAIT).unwrap_or_else(|e| {
                panic!(
                    "pull {i}: no headers while the transfer was held: {e}\n{}",
                    worker.log()
                )
            });
            assert_eq!(status, StatusCode::OK, "{}", worker.log());
        }
        while_held(faulty.count("GET", &layer.digest));
        faulty.heal();
        std::iter::once(first)
            .chain(rest)
            .map(|pull| pull.join().expect("pull"))
            .collect()
    })
}

/// N concurrent cold pulls of one 8 MiB layer, each in its own core instance (isolate
/// coalescing off), make one upstream transfer through the blob's Durable Object: the first
/// claims the lease and its transfer is held half-way; the others follow the lease, answer
/// their headers with no GET of their own, and serve the blob from R2 once the first
/// committed it. Every client gets the verified bytes.
#[test]
fn concurrent_cold_pulls_in_separate_instances_make_one_upstream_transfer_through_the_durable_object(
) {
    let faulty = FaultyUpstream::start();
    let image = Image::oci(731, &[8 << 20]);
    faulty.add_image("team/app", "1", &image);
    let layer = &image.layers[0];
    let worker = start(&faulty, true);

    let bodies = pull_while_held(&worker, &faulty, &image, |gets| {
        assert_eq!(
            gets,
            1,
            "a follower fetched the blob itself\n{}",
            worker.log()
        );
    });
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(
            sha256_digest(body),
            layer.digest,
            "pull {i} ({} bytes)\n{}",
            body.len(),
            worker.log()
        );
    }
    assert_eq!(faulty.count("GET", &layer.digest), 1, "upstream transfers");
    // One request led (a miss); the others followed the object's lease (coalesced).
    let path = format!("/v2/reg.test/team/app/blobs/{}", layer.digest);
    let mut caches: Vec<String> = access_lines_for(&worker, &path)
        .iter()
        .filter_map(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("cache="))
                .map(str::to_string)
        })
        .collect();
    caches.sort();
    let mut expected = vec!["coalesced".to_string(); N - 1];
    expected.push("miss".into());
    assert_eq!(caches, expected, "{}", worker.log());
    let log = worker.log();
    assert!(
        !log.contains("event=flight-"),
        "the flights object failed somewhere:\n{log}"
    );
}

/// The control: the same pulls without the flights binding (isolate coalescing still off)
/// each fetch the blob themselves, N upstream transfers, so the test above cannot pass
/// without the Durable Object.
#[test]
fn without_the_flights_binding_separate_instances_each_fetch_the_blob() {
    let faulty = FaultyUpstream::start();
    let image = Image::oci(732, &[8 << 20]);
    faulty.add_image("team/app", "1", &image);
    let layer = &image.layers[0];
    let worker = start(&faulty, false);

    let bodies = pull_while_held(&worker, &faulty, &image, |_| {
        assert!(
            faulty.wait_for_stalls(N, WAIT),
            "fewer than {N} transfers were held: {} GETs\n{}",
            faulty.count("GET", &layer.digest),
            worker.log()
        );
    });
    for body in &bodies {
        assert_eq!(sha256_digest(body), layer.digest, "{}", worker.log());
    }
    assert_eq!(faulty.count("GET", &layer.digest), N, "upstream transfers");
}
