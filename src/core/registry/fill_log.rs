//! What a blob fill tells the log and the in-flight gauge: a start line once the upstream
//! answered (digest, size, upstream, repository), progress after every
//! `[log] progress_bytes` written or `[log] progress_interval` (by the Clock port) for long
//! fills, and an end line with the bytes, the duration and the outcome. A fill whose future
//! is dropped before it ends (a host cutting deferred work) is logged as abandoned.

use crate::core::context::Inner;
use crate::core::error::RegistryError;
use crate::core::metrics::Metrics;
use crate::core::ports::Clock;
use crate::core::registry::reference::{Digest, Name};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;

/// One fill's log: made when its transfer starts, finished when it ends.
pub(crate) struct FillLog {
    digest: Digest,
    upstream: String,
    repository: Name,
    clock: Rc<dyn Clock>,
    metrics: Rc<Metrics>,
    every_bytes: u64,
    every_ms: u64,
    started_ms: u64,
    /// (bytes, ms) at the last line.
    last: Cell<(u64, u64)>,
    size: Cell<Option<u64>>,
    ended: Cell<bool>,
}

impl FillLog {
    /// Counts the fill in flight (until this is dropped).
    pub fn begin(inner: &Inner, up: usize, name: &Name, digest: &Digest) -> FillLog {
        inner
            .metrics
            .fills_in_flight
            .fetch_add(1, Ordering::Relaxed);
        let now = inner.ports.clock.now_ms();
        FillLog {
            digest: digest.clone(),
            upstream: inner.settings.upstreams[up].host.clone(),
            repository: name.clone(),
            clock: inner.ports.clock.clone(),
            metrics: inner.metrics.clone(),
            every_bytes: inner.settings.log.progress_bytes,
            every_ms: inner.settings.log.progress_interval_ms,
            started_ms: now,
            last: Cell::new((0, now)),
            size: Cell::new(None),
            ended: Cell::new(false),
        }
    }

    /// The upstream answered: the start line.
    pub fn started(&self, size: Option<u64>) {
        self.size.set(size);
        tracing::info!(
            digest = %self.digest,
            size,
            upstream = %self.upstream,
            repository = %self.repository,
            "fill started"
        );
    }

    /// `bytes` are written: a progress line when enough bytes or time passed since the last.
    pub fn progress(&self, bytes: u64) {
        let (last_bytes, last_ms) = self.last.get();
        let now = self.clock.now_ms();
        let by_bytes = bytes.saturating_sub(last_bytes) >= self.every_bytes;
        let by_time = bytes > last_bytes && now.saturating_sub(last_ms) >= self.every_ms;
        if !(by_bytes || by_time) {
            return;
        }
        self.last.set((bytes, now));
        tracing::info!(
            digest = %self.digest,
            bytes,
            size = self.size.get(),
            ms = now.saturating_sub(self.started_ms),
            upstream = %self.upstream,
            repository = %self.repository,
            "fill progress"
        );
    }

    /// The end line: bytes, duration, outcome (and the error, which carries no secret).
    pub fn end(&self, bytes: u64, result: &Result<(), RegistryError>) {
        self.ended.set(true);
        let ms = self.clock.now_ms().saturating_sub(self.started_ms);
        match result {
            Ok(()) => tracing::info!(
                digest = %self.digest,
                bytes,
                ms,
                outcome = "verified",
                upstream = %self.upstream,
                repository = %self.repository,
                "fill finished"
            ),
            Err(e) => tracing::warn!(
                digest = %self.digest,
                bytes,
                ms,
                outcome = "failed",
                error = %e,
                upstream = %self.upstream,
                repository = %self.repository,
                "fill finished"
            ),
        }
    }
}

impl Drop for FillLog {
    fn drop(&mut self) {
        self.metrics.fills_in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.ended.get() {
            let (bytes, _) = self.last.get();
            tracing::warn!(
                digest = %self.digest,
                bytes,
                outcome = "abandoned",
                upstream = %self.upstream,
                repository = %self.repository,
                "fill finished"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::Config;
    use crate::core::config::{ConfigError, Secret, SecretResolver};
    use crate::core::ports::{InlineOffload, Ports};
    use crate::logline::LineSubscriber;
    use crate::testing::{DroppedDeferred, FakeTarget, ManualClock, MemBlobStore, MemKv};
    use std::sync::{Arc, Mutex};

    struct NoSecrets;
    impl SecretResolver for NoSecrets {
        fn resolve(&self, r: &str) -> Result<Secret, ConfigError> {
            Err(ConfigError(format!("{r} unset")))
        }
    }

    fn no_dispatch(
        _: Rc<Inner>,
        _: http::Request<()>,
    ) -> futures_util::future::LocalBoxFuture<'static, http::Response<crate::core::body::Body>>
    {
        Box::pin(async { http::Response::new(crate::core::body::Body::Empty) })
    }

    #[test]
    fn progress_is_logged_by_bytes_or_by_clock_time_and_the_gauge_follows_the_fill() {
        let config: Config =
            toml::from_str("[log]\nprogress_bytes = \"1MiB\"\nprogress_interval = \"10s\"\n")
                .unwrap();
        let settings = config.resolve(&NoSecrets).unwrap();
        let clock = Rc::new(ManualClock::at(1_700_000_000_000));
        let ports = Ports {
            upstream: Rc::new(FakeTarget::default()),
            kv: Rc::new(MemKv::default()),
            blobs: Rc::new(MemBlobStore::default()),
            clock: clock.clone(),
            deferred: Rc::new(DroppedDeferred),
            offload: Rc::new(InlineOffload),
        };
        let inner = Inner::new(settings.clone(), ports, no_dispatch);
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = lines.clone();
        let sub = LineSubscriber::new(
            &settings.log,
            || 0,
            Box::new(move |_, l| sink.lock().unwrap().push(l.to_string())),
        )
        .unwrap();
        let digest =
            crate::core::registry::reference::parse_digest(&format!("sha256:{}", "ab".repeat(32)))
                .unwrap();
        let name = crate::core::registry::reference::parse_name("team/app").unwrap();
        tracing::subscriber::with_default(sub, || {
            let log = FillLog::begin(&inner, 0, &name, &digest);
            assert_eq!(inner.metrics.fills_in_flight.load(Ordering::Relaxed), 1);
            log.started(Some(10 << 20));
            log.progress(100 << 10); // neither 1 MiB nor 10 s yet
            clock.advance(10_000);
            log.progress(200 << 10); // 10 s passed
            log.progress(300 << 10); // neither
            log.progress(1_300 << 10); // 1.1 MiB since the last line
            clock.advance(30_000);
            log.end(10 << 20, &Ok(()));
            drop(log);
        });
        assert_eq!(inner.metrics.fills_in_flight.load(Ordering::Relaxed), 0);
        let lines = lines.lock().unwrap();
        let messages: Vec<&str> = lines
            .iter()
            .map(|l| {
                ["fill started", "fill progress", "fill finished"]
                    .into_iter()
                    .find(|m| l.contains(m))
                    .unwrap_or(l)
            })
            .collect();
        assert_eq!(
            messages,
            [
                "fill started",
                "fill progress",
                "fill progress",
                "fill finished"
            ],
            "{lines:?}"
        );
        assert!(lines[1].contains("bytes=204800") && lines[1].contains("ms=10000"));
        assert!(lines[2].contains("bytes=1331200"));
        assert!(
            lines[3].contains("bytes=10485760") && lines[3].contains("ms=40000"),
            "{}",
            lines[3]
        );
        assert!(lines[3].contains("outcome=\"verified\""));
    }
}
