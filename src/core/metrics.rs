//! Counters for `/metrics` (Prometheus text exposition format 0.0.4). Plain atomics, so a host
//! may share them across threads; the core only increments. Hosts add what only they see
//! through [`Metrics::observe`]: each request's method, route family, upstream, status and
//! duration, kept as `pullgate_requests_total{method,route,status,upstream}` and the
//! `pullgate_request_duration_seconds{route}` histogram.
//!
//! `prometheus-client` was considered: the core only needs a handful of families rendered as
//! text, the native host sums the threads' texts (`native::metrics`), and keeping the format
//! here keeps the core's dependencies small on both wasm targets.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the request-duration histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0,
];

/// Outcomes of gateway delivery attempts, in `gateway_deliveries` order.
pub const DELIVERY_OUTCOMES: [&str; 3] = ["delivered", "retry", "dead"];

/// One route's request durations.
#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is `+Inf`.
    counts: [u64; LATENCY_BUCKETS.len() + 1],
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
    }
}

/// (method, route, status) → requests.
type ByRequest = HashMap<(&'static str, &'static str, u16), u64>;

/// What hosts observe per request: counts by upstream (`-` for none) and (method, route,
/// status), and durations by route.
#[derive(Debug, Default)]
struct Observed {
    requests: HashMap<String, ByRequest>,
    latency: HashMap<&'static str, Histogram>,
}

/// The method as a label value: the standard ones by name, anything else `other` (a client
/// cannot grow the label set).
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// A label value escaped for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

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
    /// Blob fills whose upstream transfer this instance runs now (a gauge).
    pub fills_in_flight: AtomicU64,
    /// Blob bytes the host copied into the core's memory (wasm on Workers: fills written
    /// through a `BlobWriter`, stored blobs read back as a stream). Only hosts whose platform
    /// can move blob bytes without the core count it.
    pub wasm_blob_bytes: AtomicU64,
    /// (hits, misses) by upstream host.
    pub by_upstream: Mutex<BTreeMap<String, [u64; 2]>>,
    /// Gateway delivery attempts by outcome ([`DELIVERY_OUTCOMES`]). Never counted as
    /// upstream errors: a failing CI hook is not a failing registry.
    pub gateway_deliveries: [AtomicU64; 3],
    /// Requests sent to gateway targets (dispatches and events).
    pub gateway_requests: AtomicU64,
    /// What hosts observed per request.
    observed: Mutex<Observed>,
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
    /// Counts a hit (`i = 0`) or miss (1) for `host`; allocates only for a host not seen yet.
    fn count(&self, host: &str, i: usize) {
        let Ok(mut m) = self.by_upstream.lock() else {
            return;
        };
        match m.get_mut(host) {
            Some(n) => n[i] += 1,
            None => {
                let mut n = [0, 0];
                n[i] = 1;
                m.insert(host.to_string(), n);
            }
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

    /// Counts a gateway delivery attempt's outcome (`delivered`, `retry`, `dead`).
    pub fn delivery(&self, outcome: &str) {
        if let Some(i) = DELIVERY_OUTCOMES.iter().position(|o| *o == outcome) {
            inc(&self.gateway_deliveries[i]);
        }
    }

    /// A host's record of one finished request: its method, route family (the
    /// `RequestInfo` route, `-` when the core made no answer), upstream, status and how long
    /// it took. One uncontended lock and no allocation once the label set has been seen.
    pub fn observe(
        &self,
        method: &str,
        route: &'static str,
        upstream: Option<&str>,
        status: u16,
        seconds: f64,
    ) {
        let Ok(mut o) = self.observed.lock() else {
            return;
        };
        let key = (method_label(method), route, status);
        let upstream = upstream.unwrap_or("-");
        match o.requests.get_mut(upstream) {
            Some(by) => *by.entry(key).or_insert(0) += 1,
            None => {
                o.requests
                    .insert(upstream.to_string(), HashMap::from([(key, 1)]));
            }
        }
        o.latency.entry(route).or_default().observe(seconds);
    }

    /// `pullgate_requests_total` and the latency histogram, sorted so that every instance
    /// renders the same series in the same order (the native host sums them by line).
    fn render_observed(&self, out: &mut String) {
        let Ok(o) = self.observed.lock() else {
            return;
        };
        let mut rows: Vec<(&str, &str, u16, &str, u64)> = o
            .requests
            .iter()
            .flat_map(|(up, by)| {
                by.iter()
                    .map(move |((m, r, s), n)| (*r, *m, *s, up.as_str(), *n))
            })
            .collect();
        rows.sort();
        let name = "pullgate_requests_total";
        let _ = write!(
            out,
            "# HELP {name} Requests answered, by method, route family, status and upstream.\n\
             # TYPE {name} counter\n"
        );
        for (route, method, status, upstream, n) in rows {
            let _ = writeln!(
                out,
                "{name}{{method=\"{method}\",route=\"{route}\",status=\"{status}\",upstream=\"{}\"}} {n}",
                escape(upstream)
            );
        }
        let name = "pullgate_request_duration_seconds";
        let _ = write!(
            out,
            "# HELP {name} Time from a request to the end of its answer (native: its body), by route family.\n\
             # TYPE {name} histogram\n"
        );
        let mut routes: Vec<_> = o.latency.iter().collect();
        routes.sort_by_key(|(r, _)| **r);
        for (route, h) in routes {
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += h.counts[i];
                let _ = writeln!(
                    out,
                    "{name}_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += h.counts[LATENCY_BUCKETS.len()];
            let _ = writeln!(
                out,
                "{name}_bucket{{route=\"{route}\",le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(out, "{name}_sum{{route=\"{route}\"}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{route=\"{route}\"}} {cumulative}");
        }
    }

    /// (hits, misses) by upstream.
    pub fn per_upstream(&self) -> BTreeMap<String, [u64; 2]> {
        self.by_upstream
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// The plain counters: (name, help, value), in the order they are rendered.
    fn counters(&self) -> [(&'static str, &'static str, &AtomicU64); 15] {
        [
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
            (
                "pullgate_gateway_requests_total",
                "Requests sent to gateway targets.",
                &self.gateway_requests,
            ),
            (
                "pullgate_password_checks_total",
                "Password verifications run.",
                &self.password_checks,
            ),
            (
                "pullgate_worker_wasm_blob_bytes_total",
                "Blob bytes copied into the worker's wasm memory.",
                &self.wasm_blob_bytes,
            ),
        ]
    }

    /// Hits and misses by upstream.
    fn render_per_upstream(&self, out: &mut String) {
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
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let name = "pullgate_build_info";
        let _ = write!(
            out,
            "# HELP {name} The running build (always 1).\n# TYPE {name} gauge\n\
             {name}{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        self.render_observed(&mut out);
        let name = "pullgate_fills_in_flight";
        let _ = write!(
            out,
            "# HELP {name} Blob fills whose upstream transfer is running.\n# TYPE {name} gauge\n\
             {name} {}\n",
            self.fills_in_flight.load(Ordering::Relaxed)
        );
        let name = "pullgate_gateway_deliveries_total";
        let _ = write!(
            out,
            "# HELP {name} Gateway delivery attempts, by outcome.\n# TYPE {name} counter\n"
        );
        for (outcome, c) in DELIVERY_OUTCOMES.iter().zip(&self.gateway_deliveries) {
            let _ = writeln!(
                out,
                "{name}{{outcome=\"{outcome}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        self.render_per_upstream(&mut out);
        for (name, help, v) in self.counters() {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
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

    #[test]
    fn observed_requests_render_labels_and_monotonic_histograms() {
        let m = Metrics::default();
        m.observe("GET", "manifest", Some("docker.io"), 200, 0.0007);
        m.observe("GET", "manifest", Some("docker.io"), 200, 0.3);
        m.observe("BREW", "error", None, 404, 500.0);
        m.delivery("retry");
        let t = m.render();
        assert!(t.contains(
            "\npullgate_requests_total{method=\"GET\",route=\"manifest\",status=\"200\",upstream=\"docker.io\"} 2\n"
        ), "{t}");
        assert!(t.contains(
            "\npullgate_requests_total{method=\"other\",route=\"error\",status=\"404\",upstream=\"-\"} 1\n"
        ), "{t}");
        assert!(t.contains(
            "pullgate_request_duration_seconds_bucket{route=\"manifest\",le=\"0.001\"} 1\n"
        ));
        assert!(t.contains(
            "pullgate_request_duration_seconds_bucket{route=\"manifest\",le=\"0.5\"} 2\n"
        ));
        assert!(
            t.contains("pullgate_request_duration_seconds_bucket{route=\"error\",le=\"120\"} 0\n")
        );
        assert!(
            t.contains("pullgate_request_duration_seconds_bucket{route=\"error\",le=\"+Inf\"} 1\n")
        );
        assert!(t.contains("pullgate_request_duration_seconds_count{route=\"manifest\"} 2\n"));
        assert!(t.contains("\npullgate_gateway_deliveries_total{outcome=\"retry\"} 1\n"));
        assert!(t.contains(&format!(
            "\npullgate_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(t.contains("\npullgate_fills_in_flight 0\n"));
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
}
