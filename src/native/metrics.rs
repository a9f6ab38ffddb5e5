//! `/metrics` across worker threads. Each worker's core instance keeps its own counters (its
//! `Metrics` lives in the instance, which is `!Send`); a `/metrics` request asks every worker
//! for its rendering over a channel and sums the samples, so the answer is the process's
//! total whichever thread serves it. It adds `pullgate_worker_requests_total{worker="i"}`,
//! the requests each thread handled, to show how the load spreads, and the process's own
//! counters ([`render_process`]: audit records and log lines dropped).
//!
//! Counters, gauges and histogram series are summed over the threads (each thread's in-flight
//! fills are its own, so their sum is the process's); `*_info` series are the same on every
//! thread and are kept once.

use crate::core::app::App;
use std::collections::{HashMap, HashSet};
use tokio::sync::{mpsc, oneshot};

/// One worker's counters as rendered by its core.
#[derive(Debug, Clone, Default)]
pub struct WorkerMetrics {
    /// The core's Prometheus text.
    pub text: String,
    /// Requests this worker handled.
    pub requests: u64,
}

type Ask = oneshot::Sender<WorkerMetrics>;

/// Reaches every worker's counters.
pub struct MetricsHub {
    workers: Vec<mpsc::UnboundedSender<Ask>>,
}

impl MetricsHub {
    /// A hub for `n` workers, and the receiver each worker answers on (in worker order).
    pub fn new(n: usize) -> (MetricsHub, Vec<mpsc::UnboundedReceiver<Ask>>) {
        let (workers, receivers) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        (MetricsHub { workers }, receivers)
    }

    /// Every worker's counters (a worker that has stopped is left out).
    pub async fn gather(&self) -> Vec<(usize, WorkerMetrics)> {
        let mut pending = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            if w.send(tx).is_ok() {
                pending.push((i, rx));
            }
        }
        let mut out = Vec::new();
        for (i, rx) in pending {
            if let Ok(m) = rx.await {
                out.push((i, m));
            }
        }
        out
    }
}

/// Answers the hub's requests for `app`'s counters until the hub goes away.
pub async fn answer(mut asks: mpsc::UnboundedReceiver<Ask>, app: App) {
    while let Some(reply) = asks.recv().await {
        let m = app.metrics();
        let _ = reply.send(WorkerMetrics {
            text: m.render(),
            requests: m.requests.load(std::sync::atomic::Ordering::Relaxed),
        });
    }
}

/// The process's `/metrics` text: the workers' samples summed, then the per-worker family.
pub fn render(all: &[(usize, WorkerMetrics)]) -> String {
    let texts: Vec<&str> = all.iter().map(|(_, m)| m.text.as_str()).collect();
    let mut out = sum_expositions(&texts);
    out.push_str(
        "# HELP pullgate_worker_requests_total Requests handled, by worker thread (native host).\n\
         # TYPE pullgate_worker_requests_total counter\n",
    );
    for (i, m) in all {
        out.push_str(&format!(
            "pullgate_worker_requests_total{{worker=\"{i}\"}} {}\n",
            m.requests
        ));
    }
    out
}

/// The process-wide counters only the native host has.
pub fn render_process(audit: &crate::native::audit::AuditSink) -> String {
    format!(
        "# HELP pullgate_audit_dropped_total Audit records dropped because the writer fell behind.\n\
         # TYPE pullgate_audit_dropped_total counter\n\
         pullgate_audit_dropped_total {}\n\
         # HELP pullgate_log_dropped_total Log lines dropped because the writer fell behind.\n\
         # TYPE pullgate_log_dropped_total counter\n\
         pullgate_log_dropped_total {}\n\
         # HELP pullgate_sendfile_bytes_total Blob bytes sent from the file with sendfile (no copy in user space).\n\
         # TYPE pullgate_sendfile_bytes_total counter\n\
         pullgate_sendfile_bytes_total {}\n",
        audit.dropped(),
        crate::native::logging::dropped_lines(),
        crate::native::zerocopy::sent_bytes()
    )
}

/// Is this sample (`name{labels}`) an info series, the same on every thread?
fn is_info(key: &str) -> bool {
    key.split('{')
        .next()
        .is_some_and(|name| name.ends_with("_info"))
}

/// The family a sample or comment line belongs to: the name in `# HELP name`/`# TYPE name`,
/// or the sample's name without its labels (and without `_bucket`/`_sum`/`_count` for a
/// family typed `histogram`).
fn family_of(line: &str, histograms: &HashSet<String>) -> String {
    if let Some(rest) = line.strip_prefix('#') {
        return rest.split_whitespace().nth(1).unwrap_or("").to_string();
    }
    let name = line.split(['{', ' ']).next().unwrap_or(line);
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if histograms.contains(base) {
                return base.to_string();
            }
        }
    }
    name.to_string()
}

/// Sums Prometheus text expositions of the same counters: comment lines are kept once, and
/// each sample (`name{labels} value`) is the sum of its values (an `*_info` sample keeps its
/// first value). Families keep their first-seen order, and a series only some threads have
/// joins its family's group (the format wants each family's lines together).
pub fn sum_expositions(texts: &[&str]) -> String {
    let mut families: Vec<Vec<(String, Option<f64>)>> = Vec::new();
    let mut family_index: HashMap<String, usize> = HashMap::new();
    let mut index: HashMap<String, (usize, usize)> = HashMap::new();
    let mut histograms: HashSet<String> = HashSet::new();
    for text in texts {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(name) = line
                .strip_prefix("# TYPE ")
                .and_then(|r| r.strip_suffix(" histogram"))
            {
                histograms.insert(name.to_string());
            }
            let (key, value) = match line.rsplit_once(' ') {
                _ if line.starts_with('#') => (line.to_string(), None),
                Some((k, v)) => (k.to_string(), v.parse::<f64>().ok()),
                None => (line.to_string(), None),
            };
            match index.get(&key) {
                Some(_) if line.starts_with('#') || is_info(&key) => {}
                Some(&(f, i)) => {
                    if let (Some(total), Some(v)) = (families[f][i].1.as_mut(), value) {
                        *total += v;
                    }
                }
                None => {
                    let family = family_of(line, &histograms);
                    let f = *family_index.entry(family).or_insert_with(|| {
                        families.push(Vec::new());
                        families.len() - 1
                    });
                    index.insert(key.clone(), (f, families[f].len()));
                    families[f].push((key, value));
                }
            }
        }
    }
    let mut out = String::new();
    for (key, value) in families.into_iter().flatten() {
        match value {
            // Counters are integers; print them without a fraction.
            Some(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => {
                out.push_str(&format!("{key} {}\n", v as i64))
            }
            Some(v) => out.push_str(&format!("{key} {v}\n")),
            None => {
                out.push_str(&key);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_and_comments_kept_once() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total 2\ny{host=\"a\"} 1\n";
        let b = "# HELP x_total X.\n# TYPE x_total counter\nx_total 3\ny{host=\"b\"} 4\n";
        assert_eq!(
            sum_expositions(&[a, b]),
            "# HELP x_total X.\n# TYPE x_total counter\nx_total 5\ny{host=\"a\"} 1\ny{host=\"b\"} 4\n"
        );
    }

    #[test]
    fn a_series_one_thread_lacks_joins_its_family() {
        let a = "# TYPE r counter\nr{w=\"a\"} 1\n# TYPE h histogram\nh_bucket{route=\"x\",le=\"+Inf\"} 1\nh_count{route=\"x\"} 1\n";
        let b = "# TYPE r counter\nr{w=\"b\"} 2\n# TYPE h histogram\nh_bucket{route=\"y\",le=\"+Inf\"} 3\nh_count{route=\"y\"} 3\n";
        assert_eq!(
            sum_expositions(&[a, b]),
            "# TYPE r counter\nr{w=\"a\"} 1\nr{w=\"b\"} 2\n# TYPE h histogram\n\
             h_bucket{route=\"x\",le=\"+Inf\"} 1\nh_count{route=\"x\"} 1\n\
             h_bucket{route=\"y\",le=\"+Inf\"} 3\nh_count{route=\"y\"} 3\n"
        );
    }

    #[test]
    fn info_series_are_kept_once_and_histograms_summed() {
        let a = "pullgate_build_info{version=\"1\"} 1\nh_bucket{le=\"0.5\"} 2\nh_sum 0.25\n";
        let b = "pullgate_build_info{version=\"1\"} 1\nh_bucket{le=\"0.5\"} 3\nh_sum 0.5\n";
        assert_eq!(
            sum_expositions(&[a, b]),
            "pullgate_build_info{version=\"1\"} 1\nh_bucket{le=\"0.5\"} 5\nh_sum 0.75\n"
        );
    }

    #[test]
    fn per_worker_requests_follow_the_summed_counters() {
        let w = |n| WorkerMetrics {
            text: format!("pullgate_requests_total {n}\n"),
            requests: n,
        };
        let text = render(&[(0, w(2)), (1, w(5))]);
        assert!(text.starts_with("pullgate_requests_total 7\n"), "{text}");
        assert!(text.contains("pullgate_worker_requests_total{worker=\"1\"} 5\n"));
    }
}
