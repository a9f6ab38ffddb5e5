//! The native host's log subscriber: `tracing-subscriber`'s formatter over a non-blocking
//! writer. The filter is `RUST_LOG` when set, else `[log] level` (both take `RUST_LOG`'s
//! directive syntax, e.g. `info,pullgate::access=off`); the format is `PULLGATE_LOG_FORMAT`
//! when set, else `[log] format` (`text`, the default, or `json`: one object per line, the
//! event's fields at the top level).
//!
//! Lines go to stderr through `tracing-appender`'s writer thread: a request formats its line
//! into a buffer and queues it, and never waits on stderr. When the queue is full
//! ([`QUEUED_LINES`]), lines are dropped and counted (`pullgate_log_dropped_total`) rather than
//! slowing the event loops down. The writer thread paces itself ([`Paced`]): after writing
//! what was queued it waits [`BATCH_PAUSE`] before it takes more, so under load a request's
//! line joins a queue nobody is blocked on (no wake-up, no syscall on the request's thread)
//! and the thread writes a batch at most every pause, instead of waking for every line.

use crate::core::config::{LogFormat, LogSettings};
use std::sync::OnceLock;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines queued for the writer thread before new ones are dropped.
pub const QUEUED_LINES: usize = 64 * 1024;
/// The environment variable that overrides `[log] format`.
pub const FORMAT_VAR: &str = "PULLGATE_LOG_FORMAT";

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the writer thread; dropping it flushes the queued lines.
pub struct LogGuard(Option<WorkerGuard>);

/// The filter directives in force: `RUST_LOG` if set (and not empty), else `[log] level`.
pub fn directives(log: &LogSettings, rust_log: Option<String>) -> String {
    rust_log
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| log.level.clone())
}

/// The format in force: `PULLGATE_LOG_FORMAT` if set (and not empty), else `[log] format`.
pub fn format(log: &LogSettings, var: Option<String>) -> Result<LogFormat, String> {
    match var.filter(|v| !v.trim().is_empty()) {
        Some(v) => LogFormat::parse(&v).map_err(|e| format!("{FORMAT_VAR}: {e}")),
        None => Ok(log.format),
    }
}

/// Bytes of log lines the writer thread gathers before a write to stderr.
const STDERR_BUFFER: usize = 64 << 10;

/// How long a log or audit writer thread waits after writing a batch before it takes the
/// next: the most a line waits in the queue beyond its batch, and the least time between two
/// wake-ups of the thread (at most `1 / BATCH_PAUSE` a second, however busy the server).
pub const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// A writer thread's output that pauses [`BATCH_PAUSE`] after each flush. The writer thread
/// flushes when it has drained its queue; while it pauses, senders only enqueue (nobody waits
/// on the channel, so there is nobody to wake), and the next batch is everything that arrived
/// meanwhile.
pub struct Paced<W: std::io::Write> {
    inner: W,
    pause: std::time::Duration,
}

impl<W: std::io::Write> Paced<W> {
    /// `inner`, pausing `pause` after each flush.
    pub fn new(inner: W, pause: std::time::Duration) -> Paced<W> {
        Paced { inner, pause }
    }
}

impl<W: std::io::Write> std::io::Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let flushed = self.inner.flush();
        std::thread::sleep(self.pause);
        flushed
    }
}

/// The lines' timestamps: RFC 3339 UTC with microseconds, as `tracing-subscriber`'s default
/// timer writes them, formatted digit by digit (the default's `fmt` machinery was a fifth of
/// the cost of a request's access line).
struct LogTime;

impl tracing_subscriber::fmt::time::FormatTime for LogTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let stamp = stamp_now();
        w.write_str(std::str::from_utf8(&stamp).map_err(|_| std::fmt::Error)?)
    }
}

/// Now, as the lines' timestamp (RFC 3339 UTC with microseconds).
pub(crate) fn stamp_now() -> [u8; 27] {
    // The host reads the wall clock here, as the default timer does.
    #[allow(clippy::disallowed_methods)]
    let now = std::time::SystemTime::now();
    let us = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    crate::core::time::rfc3339_micros(us)
}

/// The log writer, as the formatter takes it: a worker's batched access lines go out before
/// any other line of the worker, so its lines keep their order (see `line_batch`).
struct Ordered(tracing_appender::non_blocking::NonBlocking);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Ordered {
    type Writer = tracing_appender::non_blocking::NonBlocking;

    fn make_writer(&'a self) -> Self::Writer {
        super::line_batch::flush_access();
        self.0.clone()
    }
}

/// Installs the process's subscriber. A subscriber installed already (tests that run the
/// host in-process) is left in place.
pub fn init(log: &LogSettings) -> Result<LogGuard, String> {
    let directives = directives(log, std::env::var("RUST_LOG").ok());
    let filter = EnvFilter::try_new(&directives)
        .map_err(|e| format!("log filter {directives:?} (RUST_LOG or [log] level): {e}"))?;
    let format = format(log, std::env::var(FORMAT_VAR).ok())?;
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("pullgate-log")
        // The writer thread drains every queued line, then flushes (and pauses): buffered, a
        // busy second costs a few large writes instead of a syscall per request.
        .finish(Paced::new(
            std::io::BufWriter::with_capacity(STDERR_BUFFER, std::io::stderr()),
            BATCH_PAUSE,
        ));
    let counter = writer.error_counter();
    let access_writer = writer.clone();
    let builder = tracing_subscriber::fmt()
        .with_timer(LogTime)
        .with_env_filter(filter)
        .with_writer(Ordered(writer))
        .with_ansi(false);
    // `try_init` installs the subscriber, then the bridge for the `log` crate (reqwest's
    // records); the second fails only if a `log` logger was set already, which nothing in
    // this binary does.
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    if installed.is_err() {
        return Ok(LogGuard(None));
    }
    super::access_line::install(access_writer, format);
    let _ = DROPPED.set(counter);
    Ok(LogGuard(Some(guard)))
}

/// Log lines dropped because the writer thread fell behind.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // The WorkerGuard flushes on drop; this only names the order (it goes last).
        self.0.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_overrides_the_file() {
        let log = LogSettings::default();
        assert_eq!(directives(&log, None), "info");
        assert_eq!(directives(&log, Some(" ".into())), "info");
        assert_eq!(directives(&log, Some("debug".into())), "debug");
        assert_eq!(format(&log, None).unwrap(), LogFormat::Text);
        assert_eq!(format(&log, Some("json".into())).unwrap(), LogFormat::Json);
        assert!(format(&log, Some("xml".into()))
            .unwrap_err()
            .contains(FORMAT_VAR));
    }
}
