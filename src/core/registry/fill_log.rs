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
