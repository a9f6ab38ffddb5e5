//! Counters for `/metrics` (Prometheus text exposition format 0.0.4). Plain atomics, so a host
//! may share them across threads; the core only increments.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered from the cache.
    pub hits: AtomicU64,
    /// Requests that needed the upstream.
    pub misses: AtomicU64,
    /// Stale tags served because the upstream failed.
    pub stale_served: AtomicU64,
    /// Requests sent upstream (including token and redirect hops).
    pub upstream_requests: AtomicU64,
    /// Upstream failures (unreachable, timeout, 5xx, 429, auth).
    pub upstream_errors: AtomicU64,
    /// Requests that joined a fill already in flight instead of fetching again.
    pub coalesced_waits: AtomicU64,
    /// Body bytes sent to clients.
    pub bytes_served: AtomicU64,
    /// Blob bytes fetched from upstreams.
    pub bytes_fetched: AtomicU64,
    /// Blobs whose upstream bytes did not match their digest (never stored).
    pub digest_mismatches: AtomicU64,
    /// Requests handled.
    pub requests: AtomicU64,
    /// Requests refused by access control, network rules or rate limits.
    pub denied: AtomicU64,
    /// Password verifications run (argon2): known and unknown names alike.
    pub password_checks: AtomicU64,
    /// Hits whose content the host's colo tier served (the Cache API on Workers); each is
    /// counted in `hits` too. Only hosts with such a tier count it.
    pub edge_hits: AtomicU64,
    /// Reads the host made of its shared blob store's objects (R2 HEAD and GET on Workers).
    /// Only hosts that report them count it.
    pub store_reads: AtomicU64,
    /// Blob bytes the host copied into the core's memory (wasm on Workers: fills written
    /// through a `BlobWriter`, stored blobs read back as a stream). Only hosts whose platform
    /// can move blob bytes without the core count it.
    pub wasm_blob_bytes: AtomicU64,
    /// (hits, misses) by upstream host.
    pub by_upstream: Mutex<BTreeMap<String, [u64; 2]>>,
}

/// Adds one.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n`.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    fn count(&self, host: &str, i: usize) {
        if let Ok(mut m) = self.by_upstream.lock() {
            m.entry(host.to_string()).or_insert([0, 0])[i] += 1;
        }
    }

    /// Counts a cache hit for `host`.
    pub fn hit(&self, host: &str) {
        inc(&self.hits);
        self.count(host, 0);
    }

    /// Counts a cache miss for `host`.
    pub fn miss(&self, host: &str) {
        inc(&self.misses);
        self.count(host, 1);
    }

    /// (hits, misses) by upstream.
    pub fn per_upstream(&self) -> BTreeMap<String, [u64; 2]> {
        self.by_upstream
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &AtomicU64); 13] = [
            (
                "pullgate_requests_total",
                "Requests handled.",
                &self.requests,
            ),
            (
                "pullgate_denied_total",
                "Requests refused by access control, network rules or rate limits.",
                &self.denied,
            ),
            (
                "pullgate_cache_hits_total",
                "Requests answered from the cache.",
                &self.hits,
            ),
            (
                "pullgate_cache_misses_total",
                "Requests that needed the upstream.",
                &self.misses,
            ),
            (
                "pullgate_edge_hits_total",
                "Hits served from the host's colo tier (also counted as hits).",
                &self.edge_hits,
            ),
            (
                "pullgate_store_reads_total",
                "Reads of the shared blob store's objects reported by the host.",
                &self.store_reads,
            ),
            (
                "pullgate_stale_served_total",
                "Stale tags served while the upstream failed.",
                &self.stale_served,
            ),
            (
                "pullgate_upstream_requests_total",
                "Requests sent to upstreams.",
                &self.upstream_requests,
            ),
            (
                "pullgate_upstream_errors_total",
                "Upstream failures.",
                &self.upstream_errors,
            ),
            (
                "pullgate_coalesced_waits_total",
                "Requests that joined an in-flight fill.",
                &self.coalesced_waits,
            ),
            (
                "pullgate_bytes_served_total",
                "Body bytes sent to clients.",
                &self.bytes_served,
            ),
            (
                "pullgate_bytes_fetched_total",
                "Blob bytes fetched from upstreams.",
                &self.bytes_fetched,
            ),
            (
                "pullgate_digest_mismatches_total",
                "Upstream blobs that failed verification.",
                &self.digest_mismatches,
            ),
        ];
        let mut out = String::new();
        let per = self.per_upstream();
        for (name, help, i) in [
            (
                "pullgate_upstream_cache_hits_total",
                "Cache hits by upstream.",
                0,
            ),
            (
                "pullgate_upstream_cache_misses_total",
                "Cache misses by upstream.",
                1,
            ),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for (host, c) in &per {
                out.push_str(&format!("{name}{{upstream=\"{host}\"}} {}\n", c[i]));
            }
        }
        for (name, help, v) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        let name = "pullgate_password_checks_total";
        out.push_str(&format!(
            "# HELP {name} Password verifications run.\n# TYPE {name} counter\n{name} {}\n",
            self.password_checks.load(Ordering::Relaxed)
        ));
        let name = "pullgate_worker_wasm_blob_bytes_total";
        out.push_str(&format!(
            "# HELP {name} Blob bytes copied into the worker's wasm memory.\n# TYPE {name} counter\n{name} {}\n",
            self.wasm_blob_bytes.load(Ordering::Relaxed)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        inc(&m.hits);
        add(&m.bytes_served, 42);
        let t = m.render();
        assert!(t.contains("\npullgate_cache_hits_total 1\n"));
        assert!(t.contains("\npullgate_bytes_served_total 42\n"));
        assert!(t.contains("# TYPE pullgate_cache_misses_total counter"));
    }
}
