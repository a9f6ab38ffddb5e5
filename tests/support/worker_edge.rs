//! Helpers for the tests of the Workers host's platform engines (`tests/e2e_worker_edge.rs`):
//! running the `scheduled` handler the way Cloudflare's Cron Triggers would, and reading the
//! worker's one-line-per-request log. They drive a [`Worker`] from [`super::worker`].

use std::time::Duration;

use super::http::loopback_client;
use super::worker::Worker;

/// Runs the worker's `scheduled` handler once, as a Cron Trigger with expression `cron`
/// would. `wrangler dev` does not fire triggers by itself; its `/cdn-cgi/local/scheduled`
/// route invokes `scheduled` (never `fetch`).
pub fn trigger_scheduled(worker: &Worker, cron: &str) {
    let response = loopback_client()
        .get(format!("{}/cdn-cgi/local/scheduled", worker.url()))
        .query(&[("cron", cron)])
        .timeout(Duration::from_secs(60))
        .send()
        .expect("GET /cdn-cgi/local/scheduled");
    assert!(
        response.status().is_success(),
        "the scheduled handler failed ({}): {}",
        response.status(),
        worker.log()
    );
}

/// What `wrangler dev` and workerd wrote to stdout (the worker's `console.log` lines), once:
/// [`Worker::log`] appends the tails of both logs after it, for failure messages.
pub fn stdout(worker: &Worker) -> String {
    let log = worker.log();
    match log.find("--- wrangler stdout (") {
        Some(end) => log[..end].to_string(),
        None => log,
    }
}

/// The worker's access-log lines (one per `fetch` request the worker answered).
pub fn access_lines(worker: &Worker) -> Vec<String> {
    stdout(worker)
        .lines()
        .filter(|line| line.contains("method=") && line.contains(" status="))
        .map(str::to_string)
        .collect()
}

/// The access-log lines of requests for `path`.
pub fn access_lines_for(worker: &Worker, path: &str) -> Vec<String> {
    let needle = format!("path={path} ");
    access_lines(worker)
        .into_iter()
        .filter(|line| line.contains(&needle))
        .collect()
}

/// The log lines of `scheduled` invocations.
pub fn scheduled_lines(worker: &Worker) -> Vec<String> {
    stdout(worker)
        .lines()
        .filter(|line| line.contains("event=scheduled"))
        .map(str::to_string)
        .collect()
}
