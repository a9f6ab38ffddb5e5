//! End-to-end tests of the gateway's outbox on Cloudflare Queues, under `wrangler dev --local`
//! (workerd with local KV, R2 and Queues), on loopback: deliveries are attempted by the
//! worker's `queue` handler, retried with the queue's delays, and dead-lettered through the
//! dead-letter queue, whose consumer writes the record the admin API lists and replays.
//! `wrangler.toml`'s queue settings apply as they are (`max_retries = 10`).
//!
//! Tools: `bash scripts/worker-tools.sh` and `scripts/setup.sh`, as for `tests/e2e_worker.rs`.
//! Then `cargo test --test e2e_worker_queue`.

// The harness is a host, not the core: it reads the real clock (timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use support::http::loopback_client;
use support::process::{free_port, poll_until};
use support::receiver::Receiver;
use support::worker::Worker;
use support::worker_edge::{access_lines, stdout};

const SECRET: &str = "webhook-secret-for-queue-tests";
const ADMIN: &str = "admin-token-for-queue-tests";
const WAIT: Duration = Duration::from_secs(90);
/// `max_retries` of the outbox queue's consumer in `wrangler.toml`.
const QUEUE_MAX_RETRIES: u64 = 10;

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A gateway whose one rule dispatches pushes to `main` to the receiver, retrying every
/// second, `max_attempts` times at most.
fn start(receiver: &Receiver, max_attempts: u32) -> Worker {
    let config = format!(
        r#"[[upstream]]
host = "docker.io"
url = "http://127.0.0.1:{closed}"

[gateway]
admin_token = "env:PG_ADMIN"
retry_base = "1s"
retry_max = "1s"
max_attempts = {max_attempts}

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
        closed = free_port(),
        r = receiver.url()
    );
    Worker::builder()
        .config(&config)
        .secret("PG_HOOK_SECRET", SECRET)
        .secret("PG_ADMIN", ADMIN)
        .start()
}

/// Posts a signed GitHub push and returns the run it started.
fn push(worker: &Worker, delivery: &str) -> String {
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
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", sign(&body))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .expect("POST /hooks/app");
    assert_eq!(resp.status().as_u16(), 202, "{}", worker.log());
    let v: Value = serde_json::from_slice(&resp.bytes().expect("webhook answer"))
        .expect("webhook answer as JSON");
    v["runs"][0].as_str().expect("a run").to_string()
}

/// An admin call to the worker.
fn admin(worker: &Worker, method: reqwest::Method, path: &str) -> (u16, Value) {
    let resp = loopback_client()
        .request(method, format!("{}{path}", worker.url()))
        .bearer_auth(ADMIN)
        .send()
        .expect("admin request");
    let status = resp.status().as_u16();
    let body = resp.bytes().map(|b| b.to_vec()).unwrap_or_default();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// The `queue` handler's log lines.
fn queue_lines(worker: &Worker) -> Vec<String> {
    stdout(worker)
        .lines()
        .filter(|line| line.contains("event=queue"))
        .map(str::to_string)
        .collect()
}

/// The statuses the receiver answered, in order.
fn statuses(receiver: &Receiver) -> Vec<u16> {
    receiver
        .requests_to("/build")
        .iter()
        .map(|r| r.status)
        .collect()
}

/// A webhook accepted while the target is down is delivered by the queue's retries once the
/// target is back, with no request reaching the worker after the webhook: no Cron Trigger
/// fires under `wrangler dev`, and nothing else starts an outbox pass.
#[test]
fn a_delivery_to_a_target_that_was_down_is_delivered_by_the_queue_retry_with_no_request() {
    let receiver = Receiver::start();
    receiver.fail_next(2);
    let worker = start(&receiver, 8);
    push(&worker, "queue-retry-1");
    let requests_answered = access_lines(&worker);

    assert!(
        poll_until(WAIT, || statuses(&receiver).contains(&200)),
        "not delivered: {:?}\n{}",
        statuses(&receiver),
        worker.log()
    );
    assert_eq!(statuses(&receiver), vec![503, 503, 200]);
    let got = receiver.requests_to("/build");
    assert!(got.iter().all(|r| r.body == got[0].body), "one delivery");
    let lines = queue_lines(&worker);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("outcome=retry delay_s=1"))
            .count(),
        2,
        "{lines:?}"
    );
    assert!(
        poll_until(WAIT, || queue_lines(&worker)
            .iter()
            .any(|l| l.contains("outcome=ack"))),
        "{:?}",
        queue_lines(&worker)
    );
    assert_eq!(
        access_lines(&worker),
        requests_answered,
        "a request reached the worker's fetch handler"
    );
}

/// Waits for `id`'s dead letter in the admin API and returns it.
fn dead_letter(worker: &Worker, run: &str) -> Value {
    let mut found = Value::Null;
    let listed = poll_until(WAIT, || {
        let (status, v) = admin(worker, reqwest::Method::GET, "/chain/dead-letters");
        assert_eq!(status, 200, "{v}");
        match v["dead_letters"]
            .as_array()
            .and_then(|l| l.iter().find(|d| d["run"] == run))
        {
            Some(d) => {
                found = d.clone();
                true
            }
            None => false,
        }
    });
    assert!(listed, "no dead letter: {}", worker.log());
    found
}

/// Replays the dead letter `letter` with the target up: delivered exactly once more.
fn replay_delivers_once(worker: &Worker, receiver: &Receiver, letter: &Value, run: &str) {
    let failures = statuses(receiver).len();
    receiver.fail_next(0);
    let id = letter["id"].as_str().expect("delivery id");
    let (status, v) = admin(
        worker,
        reqwest::Method::POST,
        &format!("/chain/dead-letters/{id}/replay"),
    );
    assert_eq!(status, 202, "{v}");
    assert!(
        poll_until(WAIT, || statuses(receiver).contains(&200)),
        "the replay was not delivered: {}",
        worker.log()
    );
    // Settled: acknowledged, gone from the dead letters, its stage running again.
    assert!(
        poll_until(WAIT, || {
            let (_, v) = admin(worker, reqwest::Method::GET, "/chain/dead-letters");
            v["dead_letters"].as_array().is_some_and(|l| l.is_empty())
        }),
        "still listed"
    );
    let (_, v) = admin(worker, reqwest::Method::GET, &format!("/chain/{run}"));
    assert_eq!(v["stages"][0]["status"], "running", "{v}");
    assert_eq!(
        statuses(receiver).len(),
        failures + 1,
        "{:?}",
        statuses(receiver)
    );
}

/// A delivery that fails `[gateway] max_attempts` times is moved to the dead-letter queue by
/// the consumer; the dead-letter queue's consumer records it, the admin API lists it with its
/// attempts and error, and an admin replay delivers it once the target is up.
#[test]
fn a_delivery_failing_max_attempts_lands_in_the_dlq_and_an_admin_replay_delivers_it() {
    let receiver = Receiver::start();
    receiver.fail_next(u32::MAX);
    let worker = start(&receiver, 3);
    let run = push(&worker, "queue-dead-1");

    let letter = dead_letter(&worker, &run);
    assert_eq!(letter["attempts"], 3, "{letter}");
    assert_eq!(
        letter["last_error"], "target answered 503 Service Unavailable",
        "{letter}"
    );
    assert_eq!(statuses(&receiver), vec![503; 3]);
    let lines = queue_lines(&worker);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("queue=pullgate-outbox ") && l.contains("outcome=dead-letter ")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("queue=pullgate-outbox-dead ")
                && l.contains("outcome=dead-lettered new=true")),
        "{lines:?}"
    );
    let (_, v) = admin(&worker, reqwest::Method::GET, &format!("/chain/{run}"));
    assert_eq!(v["status"], "failed", "{v}");

    replay_delivers_once(&worker, &receiver, &letter, &run);
}

/// When the queue's own `max_retries` runs out before `[gateway] max_attempts`, the platform
/// moves the message to the dead-letter queue (`dead_letter_queue` in `wrangler.toml`), and
/// it is recorded and replayable the same way.
#[test]
fn a_message_the_queue_gives_up_on_is_recorded_from_the_dlq_and_replayable() {
    let receiver = Receiver::start();
    receiver.fail_next(u32::MAX);
    let worker = start(&receiver, 50);
    let run = push(&worker, "queue-dead-2");

    let letter = dead_letter(&worker, &run);
    assert_eq!(letter["attempts"], 1 + QUEUE_MAX_RETRIES, "{letter}");
    assert_eq!(statuses(&receiver).len() as u64, 1 + QUEUE_MAX_RETRIES);
    let lines = queue_lines(&worker);
    assert!(
        !lines.iter().any(|l| l.contains("outcome=dead-letter ")),
        "the consumer forwarded it itself: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("queue=pullgate-outbox-dead ")
                && l.contains("outcome=dead-lettered new=true")),
        "{lines:?}"
    );

    replay_delivers_once(&worker, &receiver, &letter, &run);
}

/// The files of the worker's local state holding `needle` (what the local KV, R2 and Durable
/// Object storage wrote), as paths relative to the state directory.
fn state_files_with(worker: &Worker, needle: &[u8]) -> Vec<String> {
    let root = worker.state_dir();
    let mut found = Vec::new();
    let mut pending = vec![root.clone()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                let rel = path.strip_prefix(&root).unwrap_or(&path);
                found.push(rel.display().to_string());
            }
        }
    }
    found
}

/// Two copies of one push (a sender's redelivery with a new delivery id) sent at the same
/// moment start one run: the source guard is claimed in the gateway's Durable Object, where
/// the run record lives too (the local KV holds none of it), and the target gets one dispatch.
#[test]
fn two_concurrent_copies_of_a_webhook_start_one_run_kept_in_the_durable_object() {
    let receiver = Receiver::start();
    let worker = start(&receiver, 8);
    let body = json!({
        "ref": "refs/heads/main",
        "before": "0000000000000000000000000000000000000001",
        "after": "89abcdef0123456789abcdef0123456789abcdef",
        "repository": { "clone_url": "https://github.com/acme/app.git", "full_name": "acme/app" },
        "pusher": { "name": "ana" },
    })
    .to_string()
    .into_bytes();
    let url = format!("{}/hooks/app", worker.url());
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let senders: Vec<_> = ["copy-1", "copy-2"]
        .into_iter()
        .map(|delivery| {
            let (body, url, barrier) = (body.clone(), url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let client = loopback_client();
                barrier.wait();
                let resp = client
                    .post(url)
                    .header("x-github-event", "push")
                    .header("x-github-delivery", delivery)
                    .header("x-hub-signature-256", sign(&body))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .expect("POST /hooks/app");
                let status = resp.status().as_u16();
                let v: Value = serde_json::from_slice(&resp.bytes().unwrap_or_default())
                    .unwrap_or(Value::Null);
                (status, v)
            })
        })
        .collect();
    let answers: Vec<(u16, Value)> = senders
        .into_iter()
        .map(|t| t.join().expect("sender"))
        .collect();
    let mut answered: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    answered.sort();
    assert_eq!(answered, vec![200, 202], "{answers:?}");
    let run = answers
        .iter()
        .find(|(s, _)| *s == 202)
        .and_then(|(_, v)| v["runs"][0].as_str())
        .expect("the accepted copy names its run")
        .to_string();

    let (status, listed) = admin(
        &worker,
        reqwest::Method::GET,
        "/chain?repository=https://github.com/acme/app.git",
    );
    assert_eq!(status, 200, "{listed}");
    let ids: Vec<&str> = listed["runs"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, vec![run.as_str()], "{listed}");
    assert!(
        poll_until(WAIT, || queue_lines(&worker)
            .iter()
            .any(|l| l.contains("outcome=ack"))),
        "not delivered: {}",
        worker.log()
    );
    assert_eq!(statuses(&receiver), vec![200], "one dispatch");

    let key = format!("run/{run}");
    let holders = state_files_with(&worker, key.as_bytes());
    assert!(
        !holders.is_empty(),
        "the run record is nowhere in the local state"
    );
    assert!(
        holders
            .iter()
            .all(|p| p.split('/').any(|c| c == "do") && !p.contains("/kv/")),
        "the run record is outside the Durable Object's storage: {holders:?}"
    );
}
