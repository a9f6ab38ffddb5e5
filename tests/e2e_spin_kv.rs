//! End-to-end tests of what the Spin host keeps in its key-value store so that it outlives a
//! request (issue #11, Spin part): rate-limit buckets, upstream bearer tokens, fill leases,
//! and the outbox driven by an external cron call. Each request to the component is a fresh
//! instance (`wasmtime serve`, like Spin), so every behaviour here is one that in-memory state
//! could not give; see `tests/support/spin.rs` for how the component runs, and
//! `src/spin/{limits,tokens,leases}.rs` for what each record holds and how exact it is.
//!
//! Tools: `bash scripts/spin-tools.sh` and `scripts/setup.sh`, then
//! `cargo test --test e2e_spin_kv`.

// The harness is a host, not the core: it reads the real clock (timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

use std::sync::mpsc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sha2::Sha256;

use support::faulty::{Fault, FaultyUpstream};
use support::fixtures::{sha256_digest, Image};
use support::http::loopback_client;
use support::process::{free_port, poll_until};
use support::receiver::Receiver;
use support::registry::Registry;
use support::skopeo::{skopeo_copy, Platforms};
use support::spin::SpinApp;

/// The longest any bounded wait here takes.
const WAIT: Duration = Duration::from_secs(60);
/// The header Spin puts the client's address in (the tests set it: `wasmtime serve` does not).
const CLIENT_ADDR: &str = "spin-client-addr";
/// The webhook secret of the outbox test (the Spin variable `pullgate_token_secret`: any
/// declared secret variable holds it).
const HOOK_SECRET: &str = "webhook-secret-for-spin-kv-tests";
/// The gateway admin token of the outbox test (the Spin variable `pullgate_robot_token`).
const ADMIN_TOKEN: &str = "admin-token-for-spin-kv-tests";

/// `docker.io` on a closed loopback port, so nothing reaches the internet.
fn closed_docker_io() -> String {
    format!(
        "[[upstream]]\nhost = \"docker.io\"\nurl = \"http://127.0.0.1:{}\"\n\n",
        free_port()
    )
}

fn keys_with_prefix(app: &SpinApp, prefix: &str) -> Vec<String> {
    app.kv_keys("default")
        .into_iter()
        .filter(|k| k.starts_with(prefix))
        .collect()
}

/// A per-address limit of 2 an hour (burst 2) holds across requests, each a fresh instance:
/// the third request from one address answers 429 with the OCI envelope `TOOMANYREQUESTS` and
/// `Retry-After`, while another address still passes. One bucket record per address.
#[test]
fn rate_limit_answers_429_across_requests_on_spin() {
    let app = SpinApp::builder()
        .config(&format!(
            "[rate_limit]\nper_ip = \"2/h\"\nburst = 2\n\n{}",
            closed_docker_io()
        ))
        .start();
    let client = app.client();
    let from = |addr: &str| client.raw(Method::GET, "/v2/", &[(CLIENT_ADDR, addr)], Vec::new());
    for n in 1..=2 {
        let got = from("192.0.2.7:40000");
        assert_eq!(
            got.status,
            StatusCode::OK,
            "request {n}: {got:?}\n{}",
            app.log()
        );
    }
    let refused = from("192.0.2.7:40001");
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{refused:?}\n{}",
        app.log()
    );
    assert_eq!(refused.error_code().as_deref(), Some("TOOMANYREQUESTS"));
    let retry_after: u64 = refused.header("retry-after").parse().expect("Retry-After");
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    let other = from("192.0.2.8:40000");
    assert_eq!(
        other.status,
        StatusCode::OK,
        "another address is not limited"
    );
    assert_eq!(
        keys_with_prefix(&app, "~rate/").len(),
        2,
        "one bucket per address: {:?}",
        app.kv_keys("default")
    );
}

/// A cold pull and a warm pull (`tag_ttl` 0s, so the warm pull revalidates its tag upstream
/// with the token) from a token-auth upstream ask the token endpoint once: every later request
/// — each a fresh instance — reuses the token from the key-value store. Neither the password
/// nor the token (a JWT) reaches the log.
#[test]
fn repeated_pulls_reuse_the_cached_upstream_token_on_spin() {
    const USER: &str = "puller";
    const PASSWORD: &str = "token-upstream-password-for-spin-kv";
    let secured = Registry::start_with_token_auth(USER, PASSWORD);
    let image = Image::oci(312, &[64 << 10, 3 << 20]);
    secured.push_image("team/private", "1", &image);
    let tokens = secured.token_server();
    let config = format!(
        "[cache]\ntag_ttl = \"0s\"\n\n{}[[upstream]]\nhost = \"private.test\"\nurl = \"{}\"\n\
         username = \"variable:dockerhub_user\"\npassword = \"variable:dockerhub_token\"\n\
         auth_hosts = [\"{}\"]\n",
        closed_docker_io(),
        secured.url(),
        tokens.authority()
    );
    let app = SpinApp::builder()
        .config(&config)
        .variable("dockerhub_user", USER)
        .variable("dockerhub_token", PASSWORD)
        .start();
    let reference = format!("{}/private.test/team/private:1", app.host());
    let before = tokens.requests();
    for pass in ["cold", "warm"] {
        skopeo_copy(&reference, Platforms::Host, None)
            .unwrap_or_else(|e| panic!("{pass} pull: {e}\n{}", app.log()))
            .verify_image(&image);
    }
    assert!(
        secured.count_requests("HEAD", "/manifests/1") >= 1,
        "the warm pull did not revalidate upstream:\n{}",
        secured.access_log_summary()
    );
    assert_eq!(
        tokens.requests() - before,
        1,
        "token requests for two pulls (scopes {:?})",
        tokens.scopes_requested()
    );
    assert_eq!(keys_with_prefix(&app, "~token/").len(), 1);
    let log = app.log();
    assert!(!log.contains(PASSWORD), "the password reached the log");
    assert!(!log.contains("eyJ"), "a token reached the log:\n{log}");
}

/// Two concurrent cold pulls of one layer through the Spin host make one upstream transfer:
/// the first request claims the lease and its transfer is held half-way by the upstream; the
/// second request, a separate instance, finds the live lease and answers its headers while the
/// first transfer is still held, without a GET of its own; once the upstream finishes, both
/// get the verified blob, and the lease is released.
#[test]
fn a_second_cold_pull_waits_on_the_lease_instead_of_fetching_again_on_spin() {
    let faulty = FaultyUpstream::start();
    let image = Image::oci(310, &[3 << 20]);
    faulty.add_image("team/app", "1", &image);
    let layer = &image.layers[0];
    let app = SpinApp::builder()
        .config(&format!(
            "{}[[upstream]]\nhost = \"reg.test\"\nurl = \"{}\"\n",
            closed_docker_io(),
            faulty.url()
        ))
        .start();
    let url = format!("{}/v2/reg.test/team/app/blobs/{}", app.url(), layer.digest);
    let lease = format!("~lease/{}", layer.digest.trim_start_matches("sha256:"));
    faulty.set_fault(Fault::PauseMidBlob);

    let get = |headers: Option<mpsc::Sender<StatusCode>>| {
        let response = loopback_client().get(&url).send().expect("GET blob");
        if let Some(tx) = headers {
            let _ = tx.send(response.status());
        }
        assert_eq!(response.status(), StatusCode::OK);
        response.bytes().expect("read blob").to_vec()
    };
    let get = &get;
    let bodies: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let lead = scope.spawn(move || get(None));
        assert!(
            faulty.wait_for_stalls(1, WAIT),
            "the first pull never reached the upstream\n{}",
            app.log()
        );
        assert!(
            app.kv_keys("default").contains(&lease),
            "no lease while the fill runs: {:?}",
            app.kv_keys("default")
        );
        let (tx, rx) = mpsc::channel();
        let follower = scope.spawn(move || get(Some(tx)));
        let status = rx.recv_timeout(WAIT).unwrap_or_else(|e| {
            panic!(
                "the second pull did not answer while the first was held: {e}\n{}",
                app.log()
            )
        });
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            faulty.count("GET", &layer.digest),
            1,
            "the second pull fetched the blob itself"
        );
        faulty.heal();
        vec![
            lead.join().expect("first pull"),
            follower.join().expect("second pull"),
        ]
    });
    for body in &bodies {
        assert_eq!(sha256_digest(body), layer.digest, "{}", app.log());
    }
    assert_eq!(faulty.count("GET", &layer.digest), 1, "upstream transfers");
    assert!(
        poll_until(WAIT, || !app.kv_keys("default").contains(&lease)),
        "the lease was not released"
    );
}

/// A lease left by an instance that died mid-fill (expired) does not block the blob: the next
/// pull takes it over, fetches once, serves the verified blob, and releases the lease.
#[test]
fn an_expired_lease_is_taken_over_on_spin() {
    let registry = Registry::start_plain();
    let image = Image::oci(311, &[256 << 10]);
    registry.push_image("team/app", "1", &image);
    let app = SpinApp::builder()
        .config(&format!(
            "{}[[upstream]]\nhost = \"reg.test\"\nurl = \"{}\"\n",
            closed_docker_io(),
            registry.url()
        ))
        .start();
    let layer = &image.layers[0];
    let lease = format!("~lease/{}", layer.digest.trim_start_matches("sha256:"));
    let dead = json!({
        "v": 1, "owner": "an-instance-that-died", "scope": "reg.test/team/app",
        "expires_ms": 1_000, "started": true, "size": null,
    });
    app.kv_put("default", &lease, dead.to_string().as_bytes());

    let got = app.client().get_blob("reg.test/team/app", &layer.digest);
    assert!(got.is_complete_success(), "{got:?}\n{}", app.log());
    assert_eq!(sha256_digest(&got.body), layer.digest);
    assert_eq!(registry.count_requests("GET", &layer.digest), 1);
    assert!(
        app.kv_get("default", &lease).is_none(),
        "the taken-over lease was not released"
    );
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).expect("hmac key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Spin has no timers: a delivery that failed is retried by the cron call an external
/// scheduler makes, `POST /chain/outbox/pump` with the gateway's admin token, with no other
/// request arriving. The receiver answers the first attempt 503; the pump calls (repeated,
/// bounded, until the retry is due) deliver it, the same body again. Without the token the
/// call is refused.
#[test]
fn a_cron_call_to_the_pump_retries_a_failed_delivery_on_spin() {
    let receiver = Receiver::start();
    receiver.fail_next(1);
    let config = format!(
        r#"{docker}
[gateway]
admin_token = "variable:pullgate_robot_token"
retry_base = "1s"
retry_max = "1s"
max_attempts = 5

[[webhook]]
name = "app"
provider = "github"
secret = "variable:pullgate_token_secret"

[[target]]
name = "ci"
kind = "http"
url = "{r}/build"
secret = "variable:pullgate_token_secret"

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
    let app = SpinApp::builder()
        .config(&config)
        .variable("pullgate_token_secret", HOOK_SECRET)
        .variable("pullgate_robot_token", ADMIN_TOKEN)
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
        .post(format!("{}/hooks/app", app.url()))
        .header("x-github-event", "push")
        .header("x-github-delivery", "spin-cron-1")
        .header("x-hub-signature-256", sign(&body))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .expect("POST /hooks/app");
    assert_eq!(resp.status().as_u16(), 202, "{}", app.log());
    // The first attempt runs in the webhook's handler call, after its response, and fails.
    assert!(
        poll_until(WAIT, || !receiver.requests_to("/build").is_empty()),
        "no first attempt: {}",
        app.log()
    );

    let pump = |token: Option<&str>| {
        let mut request = loopback_client().post(format!("{}/chain/outbox/pump", app.url()));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send().expect("POST /chain/outbox/pump")
    };
    // The scheduler's calls, until the retry (due a second after the failure) went out.
    assert!(
        poll_until(WAIT, || {
            let answer = pump(Some(ADMIN_TOKEN));
            assert_eq!(answer.status(), StatusCode::OK, "{}", app.log());
            receiver.requests_to("/build").len() >= 2
        }),
        "no retry: {}",
        app.log()
    );
    let got = receiver.requests_to("/build");
    assert_eq!(
        got.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![503, 200],
        "{got:?}"
    );
    assert_eq!(got[0].body, got[1].body, "the same delivery each time");
    let refused = pump(None).status();
    assert!(
        refused == StatusCode::UNAUTHORIZED || refused == StatusCode::FORBIDDEN,
        "an anonymous pump call answered {refused}"
    );
    assert!(
        !app.log().contains(ADMIN_TOKEN),
        "the admin token reached the log"
    );
}
