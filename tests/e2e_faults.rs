//! The fault matrix, end to end: the native `pullgate` binary in front of a scripted upstream
//! (`support::faulty`) that refuses connections, resets mid-blob, answers 5xx or 429, is slow
//! (within and beyond `upstream_timeout`), sends wrong bytes, loops redirects or redirects to
//! loopback; and pullgate itself losing its disk space mid-fill or being killed with SIGKILL
//! mid-fill. All on loopback, with `skopeo` as the client (and the harness's HTTP client where
//! skopeo cannot say what it saw).
//!
//! For each fault the test asserts what the client sees, that nothing unverified stays in the
//! cache (every blob file in the data dir hashes to its name, and once the upstream is healthy
//! the blob is fetched from it again), that a tag pulled before is served stale while the
//! upstream fails (`max_stale`), and that the next pull after recovery works. No assertion is
//! about time: timeouts are configured small, and tests wait by bounded polling of a real
//! condition.
//!
//! Run `scripts/setup.sh` first (skopeo). The disk-full case mounts a tmpfs and needs root
//! (CI runs as root); without root it prints why it skipped.

// The harness is a host, not the core: it reads the real clock (bounded polling).
#![allow(clippy::disallowed_methods)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;

use support::faulty::{Fault, FaultyUpstream, Scope};
use support::fixtures::{sha256_digest, Image};
use support::http::Fetched;
use support::process::poll_until;
use support::pullgate::{metric, Pullgate};
use support::skopeo::{skopeo_copy, skopeo_pull, Platforms};

/// The upstream as clients name it.
const HOST: &str = "faulty.test";
const REPO: &str = "team/app";
/// A small layer and one large enough that a fill is well under way when a fault strikes
/// (pullgate withholds the last 64 KiB until the digest is verified).
const LAYERS: &[usize] = &[8 << 10, 3 << 20];
/// How long cleanup after a failed fill may take (a fill's temp file is removed when the
/// failure reaches the writer).
const SETTLE: Duration = Duration::from_secs(15);

fn config(upstream_url: &str) -> String {
    format!(
        "[cache]\ntag_ttl = \"0s\"\nmax_stale = \"7d\"\nupstream_timeout = \"2s\"\n\n\
         [[upstream]]\nhost = \"{HOST}\"\nurl = \"{upstream_url}\"\n"
    )
}

/// An upstream serving `warm` as tag 1 and `cold` as tag 2, a pullgate in front of it, and
/// tag 1 pulled once through pullgate (so it can later be served stale).
struct Scenario {
    up: FaultyUpstream,
    pg: Pullgate,
    warm: Image,
    cold: Image,
}

impl Scenario {
    fn start(seed: u64) -> Scenario {
        let up = FaultyUpstream::start();
        Scenario::start_with(seed, up.url(), up)
    }

    fn start_with(seed: u64, upstream_url: String, up: FaultyUpstream) -> Scenario {
        let warm = Image::oci(seed, LAYERS);
        let cold = Image::oci(seed + 1, LAYERS);
        up.add_image(REPO, "1", &warm);
        up.add_image(REPO, "2", &cold);
        let pg = Pullgate::builder().config(&config(&upstream_url)).start();
        let s = Scenario { up, pg, warm, cold };
        skopeo_pull(&s.reference("1"), Platforms::Host, None).verify_image(&s.warm);
        s
    }

    fn reference(&self, tag: &str) -> String {
        format!("{}/{HOST}/{REPO}:{tag}", self.pg.host())
    }

    fn repo(&self) -> String {
        format!("{HOST}/{REPO}")
    }

    fn big_layer(&self) -> &support::fixtures::Blob {
        self.cold.largest_layer()
    }

    fn get_cold_manifest(&self) -> Fetched {
        self.pg.client().get_manifest(&self.repo(), "2")
    }

    fn get_cold_blob(&self) -> Fetched {
        self.pg
            .client()
            .get_blob(&self.repo(), &self.big_layer().digest)
    }

    /// The warm tag is pulled while the upstream fails: served stale, and counted as such.
    fn assert_warm_tag_served_stale(&self) {
        let before = self.pg.metrics().total(metric::STALE_SERVED);
        skopeo_pull(&self.reference("1"), Platforms::Host, None).verify_image(&self.warm);
        let after = self.pg.metrics().total(metric::STALE_SERVED);
        assert!(
            after > before,
            "the warm tag was pulled but not counted as served stale ({before} → {after})"
        );
    }

    /// With the upstream healthy again, the cold image pulls intact, and its large layer is
    /// fetched from the upstream (again), not served from anything kept during the fault.
    fn assert_recovers(&self) {
        self.up.heal();
        let digest = self.big_layer().digest.clone();
        let fetched_before = self.up.count("GET", &digest);
        skopeo_pull(&self.reference("2"), Platforms::Host, None).verify_image(&self.cold);
        assert!(
            self.up.count("GET", &digest) > fetched_before,
            "after recovery the layer was not fetched from the upstream: something kept it"
        );
        assert_store_verified(&self.pg);
        // And once more, now from the cache.
        skopeo_pull(&self.reference("2"), Platforms::Host, None).verify_image(&self.cold);
        skopeo_pull(&self.reference("1"), Platforms::Host, None).verify_image(&self.warm);
    }
}

/// Files in the data dir whose name starts with a sha256 hex (committed blobs are named
/// `<hex>`, staged ones `<hex>.<pid>.<n>`) but whose bytes do not hash to it: partial or
/// unverified content.
fn unverified_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![data_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name.split('.').next().unwrap_or("");
            let is_hex = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
            if !is_hex {
                continue;
            }
            let ok = std::fs::read(&path)
                .map(|bytes| sha256_digest(&bytes) == format!("sha256:{hex}"))
                .unwrap_or(true); // removed while we looked: fine
            if !ok {
                out.push(path);
            }
        }
    }
    out
}

/// Every blob-named file in the data dir holds exactly the bytes of its digest (after a
/// bounded wait for a failing fill to clean up).
fn assert_store_verified(pg: &Pullgate) {
    poll_until(SETTLE, || unverified_files(pg.data_dir()).is_empty());
    let bad = unverified_files(pg.data_dir());
    assert!(
        bad.is_empty(),
        "the data dir holds partial or unverified blob files: {bad:?}"
    );
}

/// A blob GET that must not have delivered the blob.
fn assert_blob_not_delivered(fetched: &Fetched, blob: &support::fixtures::Blob, what: &str) {
    assert!(
        !(fetched.is_complete_success() && fetched.body == blob.bytes),
        "{what}: the client received the whole blob"
    );
    if fetched.status.is_success() {
        assert!(
            fetched.body_error.is_some(),
            "{what}: 2xx and a clean end of body, but the body was not the blob"
        );
        assert!(
            fetched.body.len() < blob.bytes.len(),
            "{what}: the client got {} of {} bytes before the abort (the tail must be held back)",
            fetched.body.len(),
            blob.bytes.len()
        );
    }
}

fn assert_error(fetched: &Fetched, status: StatusCode, code: &str, what: &str) {
    assert_eq!(
        fetched.status,
        status,
        "{what}: {}",
        String::from_utf8_lossy(&fetched.body)
    );
    assert_eq!(
        fetched.error_code().as_deref(),
        Some(code),
        "{what}: not the OCI error envelope with {code}: {}",
        String::from_utf8_lossy(&fetched.body)
    );
}

fn error_message(fetched: &Fetched) -> String {
    let v: serde_json::Value = serde_json::from_slice(&fetched.body).unwrap_or_default();
    v["errors"][0]["message"].as_str().unwrap_or("").to_string()
}

#[test]
fn upstream_refusing_connections_answers_503_serves_stale_tags_and_recovers() {
    let mut s = Scenario::start(100);
    s.up.stop();

    assert_error(
        &s.get_cold_manifest(),
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
        "cold tag, upstream refusing",
    );
    let blob = s.get_cold_blob();
    assert_error(
        &blob,
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
        "cold blob, upstream refusing",
    );
    assert!(
        skopeo_copy(&s.reference("2"), Platforms::Host, None).is_err(),
        "skopeo pulled a never-cached image from a refusing upstream"
    );
    s.assert_warm_tag_served_stale();
    assert_store_verified(&s.pg);

    s.up.restart();
    s.assert_recovers();
}

#[test]
fn upstream_resetting_mid_blob_aborts_the_client_and_caches_nothing() {
    let s = Scenario::start(110);
    s.up.set_fault(Fault::ResetMidBlob { denominator: 2 });

    let fetched = s.get_cold_blob();
    assert_blob_not_delivered(&fetched, s.big_layer(), "blob reset mid-body upstream");
    assert!(
        skopeo_copy(&s.reference("2"), Platforms::Host, None).is_err(),
        "skopeo pulled an image whose layer was cut off upstream"
    );
    assert_store_verified(&s.pg);
    assert!(
        s.pg.files_holding(&s.big_layer().digest, &s.big_layer().digest)
            .is_empty(),
        "the layer is in the cache although no complete copy ever arrived"
    );

    s.assert_recovers();
}

#[test]
fn upstream_5xx_answers_503_serves_stale_tags_and_recovers() {
    let s = Scenario::start(120);
    for code in [500, 502, 503] {
        s.up.set_fault(Fault::Status(code, vec![], Scope::All));
        assert_error(
            &s.get_cold_manifest(),
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            &format!("cold tag, upstream {code}"),
        );
        assert_error(
            &s.get_cold_blob(),
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            &format!("cold blob, upstream {code}"),
        );
        s.assert_warm_tag_served_stale();
    }
    assert!(skopeo_copy(&s.reference("2"), Platforms::Host, None).is_err());
    assert_store_verified(&s.pg);
    s.assert_recovers();
}

#[test]
fn upstream_429_with_retry_after_answers_429_serves_stale_tags_and_recovers() {
    let s = Scenario::start(130);
    s.up.set_fault(Fault::Status(
        429,
        vec![("Retry-After".into(), "7".into())],
        Scope::All,
    ));
    assert_error(
        &s.get_cold_manifest(),
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
        "cold tag, upstream 429",
    );
    assert_error(
        &s.get_cold_blob(),
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
        "cold blob, upstream 429",
    );
    // Docker Hub's anonymous limit: a tag pulled before keeps working.
    s.assert_warm_tag_served_stale();
    assert_store_verified(&s.pg);
    s.assert_recovers();
}

#[test]
fn slow_upstream_within_the_timeout_is_served_and_beyond_it_fails_cleanly() {
    let s = Scenario::start(140);
    let third = Image::oci(142, LAYERS);
    s.up.add_image(REPO, "3", &third);

    // Every answer late and every body trickling, each pause well inside the 2 s timeout.
    s.up.set_fault(Fault::Slow {
        delay: Duration::from_millis(100),
        pieces: 4,
        scope: Scope::All,
    });
    skopeo_pull(&s.reference("2"), Platforms::Host, None).verify_image(&s.cold);

    // No response headers at all: the request times out.
    s.up.set_fault(Fault::StallBeforeHeaders(Scope::All));
    let client = s.pg.client();
    assert_error(
        &client.get_manifest(&s.repo(), "3"),
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
        "cold tag, upstream silent before headers",
    );
    s.assert_warm_tag_served_stale();

    // Headers and half the body, then silence longer than the timeout.
    s.up.set_fault(Fault::StallMidBlob);
    let layer = third.largest_layer();
    let fetched = client.get_blob(&s.repo(), &layer.digest);
    assert_blob_not_delivered(&fetched, layer, "blob silent mid-body upstream");
    assert_store_verified(&s.pg);

    s.up.heal();
    let before = s.up.count("GET", &layer.digest);
    skopeo_pull(&s.reference("3"), Platforms::Host, None).verify_image(&third);
    assert!(
        s.up.count("GET", &layer.digest) > before,
        "the timed-out layer was not fetched again"
    );
    assert_store_verified(&s.pg);
}

#[test]
fn wrong_bytes_from_upstream_abort_the_transfer_and_are_never_cached() {
    let s = Scenario::start(150);
    s.up.set_fault(Fault::WrongBytes);
    let layer = s.big_layer().clone();
    let mut wrong = layer.bytes.clone();
    let mid = wrong.len() / 2;
    wrong[mid] ^= 0xff;
    let wrong_digest = sha256_digest(&wrong);

    let fetched = s.get_cold_blob();
    assert_blob_not_delivered(&fetched, &layer, "blob with wrong bytes");
    assert!(
        !(fetched.status.is_success() && fetched.body_error.is_none()),
        "the client saw a clean end of a blob whose digest did not match"
    );
    assert!(
        skopeo_copy(&s.reference("2"), Platforms::Host, None).is_err(),
        "skopeo pulled an image whose layer had the wrong bytes"
    );
    assert_store_verified(&s.pg);
    assert!(
        s.pg.files_holding(&layer.digest, &wrong_digest).is_empty(),
        "the wrong bytes stayed in the data dir"
    );
    // Asked again while the upstream still lies: fetched again, never a hit.
    let hits = s.pg.metrics().total(metric::CACHE_HITS);
    assert_blob_not_delivered(&s.get_cold_blob(), &layer, "second GET of the wrong bytes");
    assert_eq!(s.pg.metrics().total(metric::CACHE_HITS), hits);

    s.assert_recovers();
}

#[test]
fn redirect_loop_is_bounded_and_answers_a_clear_error() {
    let s = Scenario::start(160);
    s.up.set_fault(Fault::RedirectLoop);
    let fetched = s.get_cold_blob();
    assert_error(
        &fetched,
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
        "blob behind a redirect loop",
    );
    assert!(
        error_message(&fetched).to_lowercase().contains("redirect"),
        "the error does not say what went wrong: {:?}",
        error_message(&fetched)
    );
    let hops = s.up.count("GET", "/redirect/");
    assert!(
        (1..=10).contains(&hops),
        "{hops} redirect hops followed for one request"
    );
    assert_store_verified(&s.pg);
    s.assert_recovers();
}

#[test]
fn redirect_to_loopback_is_refused_and_nothing_of_it_reaches_the_client() {
    // Something internal on another loopback address, holding bytes the client must not get.
    let internal = FaultyUpstream::start_on("127.0.0.2");
    let up = FaultyUpstream::start();
    let url = format!("http://localhost:{}", up.port());
    let s = Scenario::start_with(170, url, up);
    internal.add_image(REPO, "2", &s.cold);
    s.up.set_fault(Fault::RedirectTo(internal.url()));

    let fetched = s.get_cold_blob();
    assert!(
        !fetched.status.is_success(),
        "a redirect to {} was followed: {} with {} bytes",
        internal.url(),
        fetched.status,
        fetched.body.len()
    );
    assert!(
        fetched.error_code().is_some(),
        "not the OCI error envelope: {}",
        String::from_utf8_lossy(&fetched.body)
    );
    let message = error_message(&fetched).to_lowercase();
    assert!(
        ["redirect", "address", "refus", "not allowed"]
            .iter()
            .any(|w| message.contains(w)),
        "the error does not say the redirect was refused: {message:?}"
    );
    assert!(
        internal.seen().is_empty(),
        "pullgate connected to the internal address: {:?}",
        internal.seen()
    );
    assert_store_verified(&s.pg);
    s.assert_recovers();
}

/// A tmpfs mounted over a directory, lazily unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount tmpfs on {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn disk_full_while_filling_fails_the_pull_caches_nothing_and_recovers_once_space_is_back() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs as the data dir needs root (CI runs as root)");
        return;
    }
    let up = FaultyUpstream::start();
    let app = Image::oci(180, &[8 << 10, 6 << 20]);
    up.add_image(REPO, "1", &app);
    let mut pg = Pullgate::builder().config(&config(&up.url())).start();
    // Restart pullgate on a data dir smaller than the large layer.
    pg.stop();
    let disk = Tmpfs::mount(pg.data_dir(), "4m");
    pg.start();
    let reference = format!("{}/{HOST}/{REPO}:1", pg.host());
    let repo = format!("{HOST}/{REPO}");
    let layer = app.largest_layer();

    let fetched = pg.client().get_blob(&repo, &layer.digest);
    assert_blob_not_delivered(&fetched, layer, "blob larger than the free space");
    assert!(
        skopeo_copy(&reference, Platforms::Host, None).is_err(),
        "skopeo pulled an image that could not be stored"
    );
    assert_store_verified(&pg);
    // Still serving: health, and small content that fits.
    let health = pg
        .client()
        .raw(reqwest::Method::GET, "/healthz", &[], vec![]);
    assert_eq!(
        health.status,
        StatusCode::OK,
        "pullgate unhealthy after a full disk"
    );
    let small = pg.client().get_blob(&repo, &app.config.digest);
    assert!(small.is_complete_success() && small.body == app.config.bytes);

    disk.resize("64m");
    let before = up.count("GET", &layer.digest);
    skopeo_pull(&reference, Platforms::Host, None).verify_image(&app);
    assert!(up.count("GET", &layer.digest) > before);
    assert_store_verified(&pg);
    skopeo_pull(&reference, Platforms::Host, None).verify_image(&app);
    pg.stop();
}

#[test]
fn kill_9_mid_fill_then_restart_serves_only_complete_blobs() {
    let mut s = Scenario::start(190);
    s.up.set_fault(Fault::StallMidBlob);
    let url = format!(
        "{}/v2/{}/blobs/{}",
        s.pg.url(),
        s.repo(),
        s.big_layer().digest
    );
    let client = std::thread::spawn(move || {
        use std::io::Read as _;
        let response = support::http::loopback_client().get(url).send();
        response.map(|mut r| {
            let mut body = Vec::new();
            let end = r.read_to_end(&mut body);
            (r.status(), body, end.is_ok())
        })
    });
    assert!(
        s.up.wait_for_stalls(1, Duration::from_secs(60)),
        "the fill never reached the upstream's stall"
    );
    s.pg.kill();
    let seen_by_client = client.join().expect("client thread");
    if let Ok((status, body, clean_end)) = &seen_by_client {
        assert!(
            !(status.is_success() && *clean_end && body == &s.big_layer().bytes),
            "the client got the whole blob from a pullgate killed mid-fill"
        );
    }

    s.up.heal();
    s.pg.start();
    assert_store_verified(&s.pg);
    let digest = s.big_layer().digest.clone();
    let before = s.up.count("GET", &digest);
    let again = s.get_cold_blob();
    assert!(
        again.is_complete_success() && again.body == s.big_layer().bytes,
        "after the restart the blob GET answered {} with {} bytes ({:?})",
        again.status,
        again.body.len(),
        again.body_error
    );
    assert!(
        s.up.count("GET", &digest) > before,
        "after the restart the blob was not fetched again: something partial was kept"
    );
    skopeo_pull(&s.reference("2"), Platforms::Host, None).verify_image(&s.cold);
    skopeo_pull(&s.reference("1"), Platforms::Host, None).verify_image(&s.warm);
    assert_store_verified(&s.pg);
}
