//! End-to-end tests of the Workers host's cold fills in the runtime (`src/worker/fill.rs`),
//! under `wrangler dev --local` (workerd with local KV and R2), all on loopback: the upstream
//! body is split in the runtime, one branch into one R2 put with R2's SHA-256 check, the other
//! to the client with its last 64 KiB held back until the put succeeded. No blob byte enters
//! wasm: the worker counts those that do in `pullgate_worker_wasm_blob_bytes_total`.
//!
//! Tools: `bash scripts/worker-tools.sh` and `scripts/setup.sh`, as for `tests/e2e_worker.rs`.
//! Then `cargo test --test e2e_worker_fill`.

// The harness is a host, not the core: it reads the real clock (timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use support::fixtures::{sha256_digest, Image};
use support::process::{free_port, poll_until};
use support::registry::Registry;
use support::worker::Worker;
use support::worker_edge::stdout;

const WAIT: Duration = Duration::from_secs(60);
/// What the client must never get before the digest is confirmed (the core's `HOLDBACK`).
const HOLDBACK: usize = 64 << 10;
const WASM_BYTES: &str = "pullgate_worker_wasm_blob_bytes_total";

fn upstream_config(registry: &Registry) -> String {
    format!(
        "[[upstream]]\nhost = \"docker.io\"\nurl = \"http://127.0.0.1:{}\"\n\n\
         [[upstream]]\nhost = \"reg.test\"\nurl = \"{}\"\n",
        free_port(),
        registry.url()
    )
}

/// The `event=stored` log lines of the blob `digest`.
fn stored_lines(worker: &Worker, digest: &str) -> Vec<String> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let needle = format!("event=stored key=blobs/sha256/{hex} ");
    stdout(worker)
        .lines()
        .filter(|line| line.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// A cold pull of a 32 MiB layer is filled in the runtime: the client gets the verified bytes
/// with `Content-Length`, R2 stores them by one put (`put=tee`), and not one blob byte is
/// copied into wasm, on the cold pull nor on the warm one after it.
#[test]
fn cold_fill_of_a_32_mib_layer_copies_no_blob_byte_into_wasm() {
    let registry = Registry::start_plain();
    let image = Image::oci(701, &[32 << 20]);
    registry.push_image("team/big", "1", &image);
    let worker = Worker::builder()
        .config(&upstream_config(&registry))
        .start();
    let client = worker.client();
    let layer = &image.layers[0];

    let manifest = client.get_manifest("reg.test/team/big", "1");
    assert!(manifest.is_complete_success(), "{manifest:?}");
    let before = worker.metrics();

    let cold = client.get_blob("reg.test/team/big", &layer.digest);
    assert!(cold.is_complete_success(), "cold: {:?}", cold.body_error);
    assert_eq!(sha256_digest(&cold.body), layer.digest);
    assert_eq!(cold.header("content-length"), layer.bytes.len().to_string());
    let stored = format!("bytes={} put=tee", layer.bytes.len());
    assert!(
        poll_until(WAIT, || stored_lines(&worker, &layer.digest)
            .iter()
            .any(|l| l.ends_with(&stored))),
        "not filled in the runtime: {:?}\n{}",
        stored_lines(&worker, &layer.digest),
        worker.log()
    );
    assert_eq!(registry.count_requests("GET", &layer.digest), 1);

    let warm = client.get_blob("reg.test/team/big", &layer.digest);
    assert!(warm.is_complete_success(), "warm: {:?}", warm.body_error);
    assert_eq!(sha256_digest(&warm.body), layer.digest);
    assert_eq!(registry.count_requests("GET", &layer.digest), 1);

    let after = worker.metrics();
    assert!(after.has(WASM_BYTES), "no {WASM_BYTES}:\n{}", after.text());
    assert_eq!(
        after.total(WASM_BYTES) - before.total(WASM_BYTES),
        0.0,
        "blob bytes crossed into wasm:\n{}",
        after.text()
    );
    assert_eq!(
        after.total("pullgate_bytes_fetched_total") - before.total("pullgate_bytes_fetched_total"),
        layer.bytes.len() as f64
    );
}

/// A corrupted upstream blob filled in the runtime is refused by R2's SHA-256 check: the
/// client's body errors before its last 64 KiB, nothing is stored (R2, colo cache: with the
/// upstream down, pullgate has nothing to serve), the mismatch is counted, and the next pull
/// goes upstream again.
#[test]
fn corrupted_blob_filled_in_the_runtime_is_never_stored_nor_served_whole() {
    let mut registry = Registry::start_plain();
    let image = Image::oci(702, &[32 << 20]);
    registry.push_image("team/bad", "1", &image);
    let worker = Worker::builder()
        .config(&upstream_config(&registry))
        .start();
    let client = worker.client();
    let layer = &image.layers[0];
    let corrupted = registry.corrupt_blob(&layer.digest);
    let before = worker.metrics();

    for attempt in 1..=2 {
        let got = client.get_blob("reg.test/team/bad", &layer.digest);
        assert!(
            !got.is_complete_success(),
            "attempt {attempt}: a corrupted blob was served whole"
        );
        assert!(
            got.body.len() <= layer.bytes.len() - HOLDBACK,
            "attempt {attempt}: the client got {} of {} bytes, inside the held-back tail",
            got.body.len(),
            layer.bytes.len()
        );
        assert!(
            poll_until(WAIT, || registry.count_requests("GET", &layer.digest)
                >= attempt),
            "attempt {attempt} did not go upstream"
        );
    }
    let mismatches = |m: &support::pullgate::Metrics| {
        m.total("pullgate_digest_mismatches_total")
            - before.total("pullgate_digest_mismatches_total")
    };
    assert!(
        poll_until(WAIT, || mismatches(&worker.metrics()) >= 1.0),
        "no digest mismatch counted:\n{}",
        worker.metrics().text()
    );
    assert!(stored_lines(&worker, &layer.digest).is_empty());
    // The local R2 simulation may keep the bytes of a put it refused as an orphan blob file
    // that no object names; no object, KV value or cache entry may hold them.
    let leftovers = || worker.stored_files_holding(&corrupted.corrupted_digest);
    poll_until(Duration::from_secs(10), || leftovers().is_empty());
    assert!(
        leftovers().is_empty(),
        "R2, the local KV or the cache kept the corrupted bytes: {:?}",
        leftovers()
    );

    // Upstream down: were the corrupted bytes an object in R2 (or the colo cache), pullgate
    // would serve them now.
    registry.stop();
    let offline = client.get_blob("reg.test/team/bad", &layer.digest);
    assert!(
        !offline.is_complete_success(),
        "served with the upstream down: the refused blob was stored"
    );
    assert_ne!(sha256_digest(&offline.body), corrupted.corrupted_digest);
    assert!(
        offline.body.len() <= layer.bytes.len() - HOLDBACK,
        "served {} bytes of the refused blob with the upstream down",
        offline.body.len()
    );
    let after = worker.metrics();
    assert_eq!(
        after.total(WASM_BYTES) - before.total(WASM_BYTES),
        0.0,
        "blob bytes crossed into wasm:\n{}",
        after.text()
    );

    // Repaired upstream: the next pull fills and verifies.
    corrupted.restore();
    registry.start();
    let good = client.get_blob("reg.test/team/bad", &layer.digest);
    assert!(good.is_complete_success(), "{:?}", good.body_error);
    assert_eq!(sha256_digest(&good.body), layer.digest);
    assert!(
        poll_until(WAIT, || !stored_lines(&worker, &layer.digest).is_empty()),
        "the repaired blob was not stored:\n{}",
        worker.log()
    );
    // The check above can see a stored object: the repaired blob is one.
    assert!(
        poll_until(WAIT, || !worker
            .stored_files_holding(&layer.digest)
            .is_empty()),
        "the stored blob is not seen as an R2 object"
    );
}
