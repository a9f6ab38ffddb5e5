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

use support::http::loopback_client;
use support::process::{free_port, poll_until};
use support::receiver::Receiver;
use support::worker::Worker;
use support::worker_edge::{access_lines, scheduled_lines, trigger_scheduled};

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
    let worker = Worker::builder()
        .config(&config)
        .secret("PG_HOOK_SECRET", SECRET)
        .secret("PG_ADMIN", "admin-token-for-edge-tests")
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
