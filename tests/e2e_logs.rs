//! End-to-end tests of the native host's logs (issue #12): a cold fill logs its start,
//! progress and end under `RUST_LOG=debug`; with `PULLGATE_LOG_FORMAT=json` every stderr line
//! is a JSON object; the audit log is reopened after a move and SIGHUP.
//!
//! Logs are written by a writer thread, so every check polls the log with a bound.

// The harness is a host, not the core: it reads the real clock (bounds on waits).
#![allow(clippy::disallowed_methods)]

mod support;

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
    assert!(
        pullgate.stderr().contains("audit log reopened"),
        "{}",
        pullgate.stderr()
    );
    for line in std::fs::read_to_string(&audit).expect("audit").lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("an audit record is JSON");
    }
}
