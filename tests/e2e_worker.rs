//! End-to-end tests of the Cloudflare Workers host: the worker bundle built by `worker-build`
//! runs in workerd under `wrangler dev --local` (local KV and R2), all on loopback. Debian's
//! `docker-registry` is the upstream (plain and token-auth); `skopeo` pulls through the
//! worker and every blob it stores is checked against its digest.
//!
//! Tools: `bash scripts/worker-tools.sh` (pinned worker-build, wasm-bindgen, wrangler, esbuild,
//! wasm-opt, into a cache outside the work tree) and `scripts/setup.sh` (docker-registry,
//! skopeo). Then `cargo test --test e2e_worker`.
//!
//! The scenarios every host runs are written once in `support/scenarios.rs`; this file runs
//! them on the worker and keeps what only the Workers host has (the bundle size budget).

// The harness is a host, not the core: it reads the real clock (timeouts).
#![allow(clippy::disallowed_methods)]

mod support;

use support::host::Host;
use support::scenarios;
use support::worker::Worker;

#[test]
fn verified_pulls_on_worker() {
    scenarios::verified_pulls::<Worker>();
}

#[test]
fn corrupt_upstream_on_worker() {
    scenarios::corrupt_upstream::<Worker>();
}

#[test]
fn token_upstream_on_worker() {
    scenarios::token_upstream::<Worker>();
}

#[test]
fn stale_after_upstream_stops_on_worker() {
    scenarios::stale_after_upstream_stops::<Worker>();
}

#[test]
fn coalescing_on_worker() {
    scenarios::coalescing::<Worker>();
}

#[test]
fn links_across_repositories_on_worker() {
    scenarios::links_across_repositories::<Worker>();
}

// The corrupt-upstream scenario damages the largest layer: on this host it must be stored by a
// multipart upload (the R2 writer's part is 8 MiB).
const _: () = assert!(<Worker as Host>::LAYER_SIZES[2] > 8 << 20);

/// The deployable bundle (wasm + JavaScript) stays within the size budget: at most 1 MiB
/// gzipped (Cloudflare's own limits are 3 MiB on Free and 10 MiB on Paid).
#[test]
fn worker_bundle_stays_within_one_mib_gzipped() {
    let (raw, gzipped) = support::worker::bundle_gzip_size();
    eprintln!("worker bundle: {raw} bytes, {gzipped} bytes gzipped");
    assert!(
        gzipped <= 1 << 20,
        "the worker bundle is {gzipped} bytes gzipped ({raw} raw), over the 1 MiB budget"
    );
}
