//! Per-process state on the native host with `[server] workers = 2`, end to end: what a user
//! configures for the process holds for the process, whichever thread a connection lands on
//! (connections are handed to the threads in turn, so a burst of separate connections covers
//! both).
//! - A burst of requests for a missing tag, then for the same tag gone stale, makes one
//!   upstream request each (`src/native/shared.rs`, the core's tag flights); the upstream holds
//!   manifest requests until every follower logged that it waits, so the count is exact.
//! - A per-address rate limit answers 429 after exactly `burst` requests over both threads.
//! - One upstream token serves requests on both threads.

// The harness is a host, not the core: it reads the real clock (bounded polling).
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use support::faulty::{held_manifest_burst, FaultyUpstream};
use support::fixtures::Image;
use support::http::loopback_client;
use support::pullgate::Pullgate;
use support::registry::Registry;

const WAIT: Duration = Duration::from_secs(60);
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";
/// Requests per burst.
const M: usize = 8;
/// The core's debug line for a request that waits for another's revalidation.
const JOINS: &str = "tag revalidation joins another request's";

fn joined(pullgate: &Pullgate) -> usize {
    pullgate.stderr().matches(JOINS).count()
}

/// `M` concurrent GETs of `reg.test/team/app:1`, each on its own connection, while the upstream
/// holds manifest requests; released once `ready` says all of them arrived where they wait.
fn burst(pullgate: &Pullgate, up: &FaultyUpstream, ready: impl Fn() -> bool) -> Vec<(u16, String)> {
    let url = format!("{}/v2/reg.test/team/app/manifests/1", pullgate.url());
    held_manifest_burst(up, &url, (M, ACCEPT, WAIT), ready, || pullgate.log_tail())
}

#[test]
fn a_burst_for_a_missing_then_stale_tag_on_two_workers_makes_one_upstream_request_each() {
    let up = FaultyUpstream::start();
    let image = Image::oci(821, &[1024]);
    up.add_image("team/app", "1", &image);
    let pullgate = Pullgate::builder()
        .upstream("reg.test", &up.url())
        .config("[server]\nworkers = 2\n[cache]\ntag_ttl = \"0s\"\nmax_stale = \"1h\"\n")
        .env("RUST_LOG", "info,pullgate=debug")
        .start();
    let digest = image.manifest.digest.clone();
    let count = |method: &str| up.count(method, "/v2/team/app/manifests/1");

    let first = burst(&pullgate, &up, || {
        up.wait_for_stalls(1, Duration::ZERO) && joined(&pullgate) >= M - 1
    });
    for (status, d) in &first {
        assert_eq!((*status, d.as_str()), (200, digest.as_str()), "{first:?}");
    }
    assert_eq!(
        (count("GET"), count("HEAD")),
        (1, 0),
        "a missing tag: one GET for {M} requests\n{:?}",
        up.seen()
    );

    // Stale at once (`tag_ttl = "0s"`): the next burst revalidates with one HEAD.
    let second = burst(&pullgate, &up, || {
        up.wait_for_stalls(1, Duration::ZERO) && joined(&pullgate) >= 2 * (M - 1)
    });
    for (status, d) in &second {
        assert_eq!((*status, d.as_str()), (200, digest.as_str()), "{second:?}");
    }
    assert_eq!(
        (count("GET"), count("HEAD")),
        (1, 1),
        "a stale tag: one HEAD for {M} requests\n{:?}",
        up.seen()
    );
}

#[test]
fn a_per_address_limit_holds_over_both_workers() {
    let pullgate = Pullgate::builder()
        .config(
            "builtin_upstreams = false\n[server]\nworkers = 2\n\
             [rate_limit]\nper_ip = \"4/h\"\nburst = 4\n",
        )
        .start();
    // Each request on a new connection: the connections alternate between the two threads,
    // so per-thread buckets would admit 8.
    let answers: Vec<u16> = (0..8)
        .map(|_| {
            loopback_client()
                .get(format!("{}/v2/", pullgate.url()))
                .header("connection", "close")
                .send()
                .expect("GET /v2/")
                .status()
                .as_u16()
        })
        .collect();
    assert_eq!(
        answers,
        [200, 200, 200, 200, 429, 429, 429, 429],
        "{}",
        pullgate.log_tail()
    );
}

#[test]
fn one_upstream_token_serves_both_workers() {
    const USER: &str = "puller";
    const PASSWORD: &str = "token-upstream-password-for-threads";
    let secured = Registry::start_with_token_auth(USER, PASSWORD);
    let image = Image::oci(822, &[64 << 10]);
    secured.push_image("team/private", "1", &image);
    let tokens = secured.token_server();
    let pullgate = Pullgate::builder()
        .config(&format!(
            "builtin_upstreams = false\n[server]\nworkers = 2\n[cache]\ntag_ttl = \"0s\"\n\n\
             [[upstream]]\nhost = \"private.test\"\nurl = \"{}\"\nusername = \"env:PG_TEST_UPSTREAM_USER\"\n\
             password = \"env:PG_TEST_UPSTREAM_PASSWORD\"\nauth_hosts = [\"{}\"]\n",
            secured.url(),
            tokens.authority()
        ))
        .env("PG_TEST_UPSTREAM_USER", USER)
        .env("PG_TEST_UPSTREAM_PASSWORD", PASSWORD)
        .start();
    let url = format!(
        "{}/v2/private.test/team/private/manifests/1",
        pullgate.url()
    );
    let before = tokens.requests();
    // One after another, each on a new connection: they alternate between the two threads,
    // and every one revalidates the tag upstream (`tag_ttl = "0s"`) with a token.
    for i in 0..6 {
        let response = loopback_client()
            .get(&url)
            .header("accept", ACCEPT)
            .header("connection", "close")
            .send()
            .expect("GET manifest");
        assert_eq!(response.status().as_u16(), 200, "request {i}");
    }
    assert!(
        secured.count_requests("HEAD", "/manifests/1") >= 5,
        "the requests did not revalidate upstream:\n{}",
        secured.access_log_summary()
    );
    assert_eq!(
        tokens.requests() - before,
        1,
        "token requests for 6 requests over 2 threads (scopes {:?})",
        tokens.scopes_requested()
    );
}
