//! End-to-end tests of the native host's logs and metrics (issue #12): a cold fill logs its
//! start, progress and end under `RUST_LOG=debug`; with `PULLGATE_LOG_FORMAT=json` every
//! stderr line is a JSON object; the audit log is reopened after a move and SIGHUP; `/metrics`
//! (summed over worker threads) parses, with labels and cumulative histograms; records of
//! crates that use the `log` crate (reqwest) reach the same output.
//!
//! Logs are written by a writer thread, so every check polls the log with a bound.

// The harness is a host, not the core: it reads the real clock (bounds on waits).
#![allow(clippy::disallowed_methods)]

mod support;

#[path = "support/exposition.rs"]
mod exposition;

use std::time::Duration;

use support::fixtures::Image;
use support::process::wait_for;
use support::pullgate::Pullgate;
use support::registry::Registry;

const BOUND: Duration = Duration::from_secs(60);

/// The first line of `log` holding every one of `needles`, and its index.
fn line_with(log: &str, needles: &[&str]) -> Option<(usize, String)> {
    log.lines()
        .enumerate()
        .find(|(_, l)| needles.iter().all(|n| l.contains(n)))
        .map(|(i, l)| (i, l.to_string()))
}

#[test]
fn a_cold_fill_logs_its_start_progress_and_end_at_debug() {
    let registry = Registry::start_plain();
    let image = Image::oci(71, &[1 << 20]);
    registry.push_image("team/app", "1", &image);
    let pullgate = Pullgate::builder()
        .upstream("reg.test", &registry.url())
        .config("[log]\nprogress_bytes = \"64KiB\"\n")
        .env("RUST_LOG", "debug")
        .start();
    let client = pullgate.client();
    let layer = &image.layers[0];
    let blob = client.get_blob("reg.test/team/app", &layer.digest);
    assert_eq!(blob.status, 200, "{}", pullgate.stderr());
    assert_eq!(blob.body, layer.bytes);

    let digest = format!("digest={}", layer.digest);
    let size = format!("size={}", layer.bytes.len());
    let bytes = format!("bytes={}", layer.bytes.len());
    let log = wait_for("the fill's end line", BOUND, || {
        let log = pullgate.stderr();
        line_with(&log, &["fill finished", &digest]).map(|_| log)
    });
    let (start, line) = line_with(&log, &["fill started", &digest]).expect("a start line");
    for field in ["INFO", &size, "upstream=reg.test", "repository=team/app"] {
        assert!(line.contains(field), "{field} in {line}");
    }
    let (progress, _) = line_with(&log, &["fill progress", &digest]).expect("a progress line");
    let (end, line) = line_with(&log, &["fill finished", &digest]).expect("an end line");
    for field in [bytes.as_str(), "outcome=\"verified\"", " ms="] {
        assert!(line.contains(field), "{field} in {line}");
    }
    assert!(start < progress && progress < end, "{log}");

    // The request's access event carries the old line's fields.
    let path = format!("path=/v2/reg.test/team/app/blobs/{} ", layer.digest);
    let access = wait_for("the blob's access line", BOUND, || {
        line_with(&pullgate.stderr(), &["pullgate::access", &path]).map(|(_, l)| l)
    });
    for field in [
        "method=GET",
        "route=blob",
        "upstream=reg.test",
        "cache=miss",
        "status=200",
        &bytes,
    ] {
        assert!(access.contains(field), "{field} in {access}");
    }
}

#[test]
fn records_of_crates_that_log_through_the_log_crate_reach_the_log() {
    // reqwest writes its connection events through the `log` crate, not `tracing`: they are
    // bridged, and filtered by the same RUST_LOG directives.
    let registry = Registry::start_plain();
    let image = Image::oci(72, &[4 << 10]);
    registry.push_image("team/app", "1", &image);
    let pullgate = Pullgate::builder()
        .upstream("reg.test", &registry.url())
        .env("RUST_LOG", "info,reqwest=debug")
        .start();
    let layer = &image.layers[0];
    let blob = pullgate
        .client()
        .get_blob("reg.test/team/app", &layer.digest);
    assert_eq!(blob.status, 200, "{}", pullgate.stderr());
    let line = wait_for("reqwest's connection line", BOUND, || {
        line_with(
            &pullgate.stderr(),
            &["reqwest::connect", "starting new connection"],
        )
    });
    assert!(line.1.contains("DEBUG"), "{}", line.1);
}

#[test]
fn json_logs_parse_line_by_line() {
    let registry = Registry::start_plain();
    let image = Image::oci(72, &[300_000]);
    registry.push_image("team/app", "1", &image);
    let mut pullgate = Pullgate::builder()
        .upstream("reg.test", &registry.url())
        .config("[log]\nprogress_bytes = \"64KiB\"\n")
        .env("RUST_LOG", "debug")
        .env("PULLGATE_LOG_FORMAT", "json")
        .start();
    let client = pullgate.client();
    assert_eq!(client.get_manifest("reg.test/team/app", "1").status, 200);
    let layer = &image.layers[0];
    assert_eq!(
        client.get_blob("reg.test/team/app", &layer.digest).status,
        200
    );
    assert_eq!(client.get_manifest("reg.test/team/nope", "1").status, 404);
    // A graceful stop flushes the writer thread's queue.
    assert!(pullgate.stop().success());

    let log = pullgate.stderr();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|v| v["level"].is_string() && v["timestamp"].is_string()));
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["target"] == "pullgate::access")
        .collect();
    let blob = access
        .iter()
        .find(|v| v["route"] == "blob")
        .unwrap_or_else(|| panic!("a blob access event in {log}"));
    assert_eq!(blob["status"], 200);
    assert_eq!(blob["cache"], "miss");
    assert_eq!(blob["bytes"], layer.bytes.len());
    assert!(access.iter().any(|v| v["status"] == 404), "{log}");
    let ended = lines
        .iter()
        .find(|v| v["message"] == "fill finished")
        .unwrap_or_else(|| panic!("a fill end event in {log}"));
    assert_eq!(ended["digest"], layer.digest.as_str());
    assert_eq!(ended["outcome"], "verified");
    assert!(
        lines.iter().any(|v| v["message"] == "fill progress"),
        "{log}"
    );
}

#[test]
fn the_audit_log_is_reopened_after_a_move_and_sighup() {
    let registry = Registry::start_plain();
    let image = Image::oci(73, &[1024]);
    registry.push_image("team/app", "1", &image);
    let pullgate = Pullgate::builder()
        .upstream("reg.test", &registry.url())
        .start();
    let client = pullgate.client();
    let audit = pullgate.data_dir().join("audit.log");
    let rotated = pullgate.data_dir().join("audit.log.1");
    assert_eq!(client.get_manifest("reg.test/team/app", "1").status, 200);
    wait_for("the first audit record", BOUND, || {
        let text = std::fs::read_to_string(&audit).ok()?;
        text.contains("\"route\":\"manifest\"").then_some(())
    });
    std::fs::rename(&audit, &rotated).expect("rotate the audit log");
    pullgate.signal(libc::SIGHUP);
    // Until the writer has seen the signal, records still go to the moved file: pull until
    // one lands in a new file by the old name.
    wait_for("an audit record in the reopened file", BOUND, || {
        assert_eq!(client.get_manifest("reg.test/team/app", "1").status, 200);
        let text = std::fs::read_to_string(&audit).ok()?;
        text.contains("\"route\":\"manifest\"").then_some(())
    });
    let old = std::fs::read_to_string(&rotated).expect("the rotated file");
    assert!(old.contains("\"route\":\"manifest\""), "{old}");
    wait_for("the reopen in the log", BOUND, || {
        pullgate
            .stderr()
            .contains("audit log reopened")
            .then_some(())
    });
    for line in std::fs::read_to_string(&audit).expect("audit").lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("an audit record is JSON");
    }
}

#[test]
fn metrics_summed_over_threads_parse_with_labels_histograms_and_cache_gauges() {
    let registry = Registry::start_plain();
    let image = Image::oci(74, &[2048, 4096]);
    registry.push_image("team/app", "1", &image);
    let pullgate = Pullgate::builder()
        .upstream("reg.test", &registry.url())
        .config("[server]\nworkers = 2\n")
        .start();
    let client = pullgate.client();
    // Several connections, so both threads answer some of them.
    for _ in 0..4 {
        assert_eq!(client.get_manifest("reg.test/team/app", "1").status, 200);
        for layer in &image.layers {
            assert_eq!(
                client.get_blob("reg.test/team/app", &layer.digest).status,
                200
            );
        }
        assert_eq!(client.get_manifest("reg.test/team/nope", "1").status, 404);
    }
    // A request is counted when its body ends: read until the last one is in.
    let text = wait_for("every request counted", BOUND, || {
        let text = reqwest::blocking::get(format!("{}/metrics", pullgate.url()))
            .ok()?
            .text()
            .ok()?;
        let e = exposition::parse(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
        let blobs: f64 = e
            .of("pullgate_requests_total")
            .iter()
            .filter(|s| s.label("route") == Some("blob") && s.label("status") == Some("200"))
            .map(|s| s.value)
            .sum();
        (blobs == 8.0).then_some(text)
    });
    let e = exposition::parse(&text).unwrap();
    let manifest = e
        .of("pullgate_requests_total")
        .into_iter()
        .find(|s| s.label("route") == Some("manifest") && s.label("status") == Some("200"))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(manifest.label("method"), Some("GET"));
    assert_eq!(manifest.label("upstream"), Some("reg.test"));
    assert_eq!(manifest.value, 4.0);
    let blob_count = e
        .of("pullgate_request_duration_seconds_count")
        .into_iter()
        .find(|s| s.label("route") == Some("blob"))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(blob_count.value, 8.0);
    // Summed over two threads, the build info is still one series worth 1.
    assert_eq!(e.of("pullgate_build_info").len(), 1);
    assert_eq!(e.total("pullgate_build_info"), 1.0);
    let cache = |name: &str, kind: &str| {
        e.of(name)
            .into_iter()
            .find(|s| s.label("kind") == Some(kind))
            .map_or(-1.0, |s| s.value)
    };
    // The layers were pulled; the config blob was not.
    assert_eq!(cache("pullgate_cache_objects", "blob"), 2.0, "{text}");
    assert_eq!(cache("pullgate_cache_objects", "manifest"), 1.0, "{text}");
    let blob_bytes: usize = image.layers.iter().map(|b| b.bytes.len()).sum();
    assert_eq!(
        cache("pullgate_cache_bytes", "blob"),
        blob_bytes as f64,
        "{text}"
    );
    assert_eq!(e.total("pullgate_fills_in_flight"), 0.0);
    assert_eq!(e.total("pullgate_audit_dropped_total"), 0.0);
    assert_eq!(e.total("pullgate_gateway_requests_total"), 0.0);
}
