//! End-to-end tests of `pullgate warm` (issue #12): pre-warming a running pullgate over HTTP
//! and a local cache in-process, with the same walk as the gateway's `distribute` stage. The
//! proof of a warm is that the image is then served with the upstream stopped.

// The harness reads the real clock (bounds on waits).
#![allow(clippy::disallowed_methods)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::fixtures::{Image, Index, Platform};
use support::process::run_bounded;
use support::pullgate::Pullgate;
use support::registry::Registry;
use support::skopeo::{skopeo_copy, skopeo_pull, Platforms};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

/// `pullgate warm ARGS…`: (success, stdout, stderr).
fn warm(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(BIN);
    command.arg("warm").args(args);
    for var in [
        "PULLGATE_SERVER",
        "PULLGATE_CONFIG",
        "PULLGATE_UPSTREAM",
        "PULLGATE_DATA_DIR",
    ] {
        command.env_remove(var);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let out = run_bounded(command, Duration::from_secs(120)).expect("pullgate warm ran");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn warm_through_a_running_pullgate_fetches_only_the_chosen_platform_and_serves_offline() {
    let mut registry = Registry::start_plain();
    let index = Index::multi_arch(61, &[200_000, 3000]);
    registry.push_index("library/multi", "1", &index);
    let mut pullgate = Pullgate::builder()
        .upstream("docker.io", &registry.url())
        .start();
    let host = Platform::host();
    let platform = format!("{}/{}", host.os, host.architecture);

    let (ok, stdout, stderr) = warm(
        &[
            "--server",
            &pullgate.url(),
            "--platform",
            &platform,
            "library/multi:1",
        ],
        &[],
    );
    assert!(ok, "warm failed:\n{stderr}\n{}", pullgate.log_tail());
    let child = index.child(&host);
    // Progress: the index, the platform's manifest, then each blob with its count.
    assert!(
        stderr.contains("manifest /v2/library/multi/manifests/1"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("manifests/{}", child.digest())),
        "{stderr}"
    );
    let total = child.blobs().len();
    assert!(
        stderr.contains(&format!("blob {total}/{total} ")),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!(
            "library/multi:1: pre-warmed 1 manifest(s) and {total} blob(s)"
        )),
        "{stdout}"
    );
    // Only the chosen platform went upstream: no blob of the other child was asked for.
    let other = index.child(&Platform::other_than_host());
    for blob in other.blobs() {
        assert_eq!(
            registry.count_requests("GET", &blob.digest),
            0,
            "{} of the other platform was fetched:\n{}",
            blob.digest,
            registry.access_log_summary()
        );
    }

    // With the upstream gone, the warmed platform is still served, verified.
    registry.stop();
    pullgate.restart();
    skopeo_pull(
        &format!("{}/library/multi:1", pullgate.host()),
        Platforms::Only(host),
        None,
    )
    .verify_image(child);
    // The other platform was never warmed.
    assert!(skopeo_copy(
        &format!("{}/library/multi@{}", pullgate.host(), other.digest()),
        Platforms::Only(Platform::other_than_host()),
        None,
    )
    .is_err());
}

#[test]
fn warm_into_a_local_cache_then_serve_it_with_the_upstream_down() {
    let mut registry = Registry::start_plain();
    let image = Image::oci(62, &[150_000, 2048]);
    registry.push_image("team/app", "2", &image);
    let mut pullgate = Pullgate::builder()
        .upstream("docker.io", &registry.url())
        .start();
    pullgate.stop();
    let data_dir = pullgate.data_dir().to_string_lossy().into_owned();
    let upstream = format!("docker.io={}", registry.url());
    let (ok, stdout, stderr) = warm(
        &[
            "--data-dir",
            &data_dir,
            "--upstream",
            &upstream,
            "team/app:2",
        ],
        &[],
    );
    assert!(ok, "warm failed:\n{stderr}");
    assert!(
        stdout.contains("team/app:2: pre-warmed 1 manifest(s) and 3 blob(s)"),
        "{stdout}"
    );

    registry.stop();
    pullgate.start();
    skopeo_pull(
        &format!("{}/team/app:2", pullgate.host()),
        Platforms::Host,
        None,
    )
    .verify_image(&image);
}

#[test]
fn warm_reports_each_failure_and_exits_1() {
    let registry = Registry::start_plain();
    let image = Image::oci(63, &[1000]);
    registry.push_image("team/ok", "1", &image);
    let pullgate = Pullgate::builder()
        .upstream("docker.io", &registry.url())
        .start();

    // One good, one missing, one malformed: the good one is warmed, the others named.
    let (ok, stdout, stderr) = warm(
        &[
            "--server",
            &pullgate.url(),
            "team/ok:1",
            "team/missing:1",
            "Bad//Name",
        ],
        &[],
    );
    assert!(!ok);
    assert!(stdout.contains("team/ok:1: pre-warmed"), "{stdout}");
    assert!(
        stderr.contains("team/missing:1: GET /v2/team/missing/manifests/1: 404"),
        "{stderr}"
    );
    assert!(
        stderr.contains("could not warm team/missing:1, Bad//Name"),
        "{stderr}"
    );

    // A malformed platform is a usage problem, reported before anything is fetched.
    let (ok, _, stderr) = warm(
        &[
            "--server",
            &pullgate.url(),
            "--platform",
            "linux",
            "team/ok:1",
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        stderr.contains("--platform \"linux\": expected os/arch"),
        "{stderr}"
    );

    // A platform no index entry has is an error, not a silent no-op.
    let index = Index::multi_arch(64, &[1000]);
    registry.push_index("team/multi", "1", &index);
    let (ok, _, stderr) = warm(
        &[
            "--server",
            &pullgate.url(),
            "--platform",
            "plan9/mips",
            "team/multi:1",
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        stderr.contains("no manifest in the index matches"),
        "{stderr}"
    );
}
