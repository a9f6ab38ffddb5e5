//! The native listener's connection discipline (issue #9, items 6 and 7): how long a client
//! may take to send a request head, how long an idle keep-alive connection stays open, how
//! many connections are served at once, how failed `accept` calls (fd exhaustion) are retried
//! and logged, and the lingering read that lets a sender receive an early error answer.
//!
//! It decides nothing about requests (the core answers them) and moves no response bytes;
//! it only bounds connections. The pure parts ([`ServerLimits`], [`AcceptBackoff`],
//! [`ConnState::deadline`]) take the time as an argument and are unit-tested without a clock.
//!
//! Why a watchdog of our own rather than hyper's `header_read_timeout`: hyper (1.12) restarts
//! that timer as soon as a keep-alive connection goes idle, so an idle connection would be
//! closed after the header timeout and a longer idle timeout could not exist. Here a
//! connection is in one of three states: a request in flight (no deadline: the core and the
//! upstream timeout bound it), receiving a request head (deadline: first byte, or the accept
//! for a new connection, plus `header_timeout`), or idle between requests (deadline: end of
//! the last response plus `idle_timeout`).

use crate::core::config::{parse_duration_ms, ServerConfig};
use crate::core::ports::{BodyError, ByteStream};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::body::{Frame, Incoming};
use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Default `[server] header_timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `[server] body_timeout`.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `[server] idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `[server] max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// First pause after a failed `accept`; each further failure doubles it.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between `accept` retries.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one `accept` log line per this interval; the line counts what it summarises.
pub const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(5);

/// Lingering read after an early answer: at most this many request bytes are discarded…
pub const LINGER_MAX_BYTES: u64 = 64 << 20;
/// …for at most this long in all…
pub const LINGER_MAX_TIME: Duration = Duration::from_secs(30);
/// …and the sender may pause at most this long between chunks.
pub const LINGER_GAP: Duration = Duration::from_secs(5);

/// The listener's limits (`[server]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Time allowed for a request line and headers.
    pub header_timeout: Duration,
    /// Time a connection may sit between requests.
    pub idle_timeout: Duration,
    /// Time allowed for reading a whole request body.
    pub body_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl ServerLimits {
    /// Resolves `[server]`, refusing zero values (a zero timeout would close every connection,
    /// a zero cap would serve none).
    pub fn parse(config: &ServerConfig) -> Result<ServerLimits, String> {
        let duration = |key: &str, value: &Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(v) => match parse_duration_ms(v) {
                Ok(0) => Err(format!("configuration: server.{key} must be more than 0")),
                Ok(ms) => Ok(Duration::from_millis(ms)),
                Err(e) => Err(format!("server.{key}: {e}")),
            },
        };
        let max_connections = match config.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(0) => {
                return Err("configuration: server.max_connections must be at least 1".into())
            }
            Some(n) => n,
        };
        Ok(ServerLimits {
            header_timeout: duration(
                "header_timeout",
                &config.header_timeout,
                DEFAULT_HEADER_TIMEOUT,
            )?,
            idle_timeout: duration("idle_timeout", &config.idle_timeout, DEFAULT_IDLE_TIMEOUT)?,
            body_timeout: duration("body_timeout", &config.body_timeout, DEFAULT_BODY_TIMEOUT)?,
            max_connections,
        })
    }
}

/// Back-off and rate-limited logging for failed `accept` calls. Under fd exhaustion every
/// `accept` fails at once until a descriptor is freed: retrying immediately spins a core and
/// logging each failure floods the log, so retries back off (10 ms doubling to 1 s) and at
/// most one line per [`ACCEPT_LOG_EVERY`] is written, counting the failures it stands for.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    /// The current pause; zero when the last accept succeeded.
    pause: Duration,
    /// Failures since the last success.
    failures: u64,
    /// Failures not yet reported in a log line.
    unlogged: u64,
    last_log: Option<std::time::Instant>,
}

impl AcceptBackoff {
    fn log_due(&self, now: std::time::Instant) -> bool {
        self.last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= ACCEPT_LOG_EVERY)
    }

    /// A failed accept at `now`: how long to pause before the next one, and the log line to
    /// write, if one is due.
    pub fn failed(&mut self, now: std::time::Instant, error: &str) -> (Duration, Option<String>) {
        self.failures += 1;
        self.unlogged += 1;
        self.pause = if self.pause.is_zero() {
            ACCEPT_BACKOFF_MIN
        } else {
            (self.pause * 2).min(ACCEPT_BACKOFF_MAX)
        };
        let line = self.log_due(now).then(|| {
            let line = format!(
                "accept failed ({} times since the last report): {error}; retrying in {} ms, backing off up to {} ms",
                self.unlogged,
                self.pause.as_millis(),
                ACCEPT_BACKOFF_MAX.as_millis()
            );
            self.unlogged = 0;
            self.last_log = Some(now);
            line
        });
        (self.pause, line)
    }

    /// A successful accept at `now`: resets the back-off, and reports the recovery if a log
    /// line is due (otherwise the next report counts the failures).
    pub fn succeeded(&mut self, now: std::time::Instant) -> Option<String> {
        self.pause = Duration::ZERO;
        if self.failures == 0 {
            return None;
        }
        let failures = std::mem::take(&mut self.failures);
        self.log_due(now).then(|| {
            self.unlogged = 0;
            self.last_log = Some(now);
            format!("accept recovered after {failures} failures")
        })
    }
}

/// What a connection's watchdog needs to know: requests in flight, when the current request
/// head started arriving, and since when the connection has been idle.
#[derive(Debug)]
pub struct ConnState {
    in_flight: Cell<usize>,
    head_started: Cell<Option<Instant>>,
    idle_since: Cell<Instant>,
    limits: ServerLimits,
    /// When the watchdog wakes up next; `None` while it waits for a notification only.
    armed: Cell<Option<Instant>>,
    changed: Notify,
}

impl ConnState {
    /// A connection accepted at `now` under `limits`: its first request head is due within
    /// the header timeout from now (a client that connects and sends nothing is not idle, it
    /// is slow).
    pub fn new(now: Instant, limits: ServerLimits) -> Rc<ConnState> {
        Rc::new(ConnState {
            in_flight: Cell::new(0),
            head_started: Cell::new(Some(now)),
            idle_since: Cell::new(now),
            limits,
            armed: Cell::new(None),
            changed: Notify::new(),
        })
    }

    /// Wakes the watchdog after a change, only when it must look again: the deadline is now
    /// earlier than the time it sleeps until, or it sleeps without a timer. A keep-alive
    /// connection's requests only move the deadline later (or remove it); the watchdog, woken
    /// at the old deadline, sleeps on to the new one. So a busy connection costs no wake-up
    /// and no timer per request, and a deadline is still never enforced late.
    fn changed(&self) {
        if let Some(due) = self.deadline(&self.limits) {
            if self.armed.get().is_none_or(|armed| due < armed) {
                self.changed.notify_one();
            }
        }
    }

    /// When the connection should be closed, if nothing changes; `None` while a request is in
    /// flight.
    pub fn deadline(&self, limits: &ServerLimits) -> Option<Instant> {
        if self.in_flight.get() > 0 {
            return None;
        }
        Some(match self.head_started.get() {
            Some(t) => t + limits.header_timeout,
            None => self.idle_since.get() + limits.idle_timeout,
        })
    }

    /// Bytes arrived at `now`: between requests they are the start of the next request head.
    fn saw_bytes(&self, now: impl FnOnce() -> Instant) {
        if self.in_flight.get() == 0 && self.head_started.get().is_none() {
            self.head_started.set(Some(now()));
            self.changed();
        }
    }
}

/// A request (or a lingering read) in progress on a connection; the connection is idle again
/// when the last guard is dropped.
#[derive(Debug)]
pub struct InFlight(Rc<ConnState>);

impl InFlight {
    /// Marks the start of a request: its head is complete.
    pub fn start(state: &Rc<ConnState>) -> InFlight {
        state.in_flight.set(state.in_flight.get() + 1);
        state.head_started.set(None);
        // No deadline while in flight: nothing the watchdog must see before its timer.
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let n = self.0.in_flight.get().saturating_sub(1);
        self.0.in_flight.set(n);
        if n == 0 {
            self.0.idle_since.set(Instant::now());
            self.0.changed();
        }
    }
}

/// Resolves when the connection has overstayed its header or idle timeout; the caller then
/// drops (closes) the connection.
pub async fn watchdog(state: Rc<ConnState>, limits: ServerLimits) {
    loop {
        match state.deadline(&limits) {
            None => {
                state.armed.set(None);
                state.changed.notified().await;
            }
            Some(at) => {
                if Instant::now() >= at {
                    return;
                }
                state.armed.set(Some(at));
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = state.changed.notified() => {}
                }
            }
        }
    }
}

/// The accepted socket, telling its [`ConnState`] when request bytes arrive.
pub struct WatchedIo {
    inner: TcpStream,
    state: Rc<ConnState>,
}

impl WatchedIo {
    /// Wraps an accepted stream.
    pub fn new(inner: TcpStream, state: Rc<ConnState>) -> WatchedIo {
        WatchedIo { inner, state }
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.saw_bytes(Instant::now);
        }
        polled
    }
}

impl WatchedIo {
    /// Sends `len` bytes of the file behind a blob chunk with `sendfile`
    /// ([`zerocopy`](crate::native::zerocopy)); None when the kernel refuses it for this
    /// pair (the caller then writes the bytes as usual).
    fn poll_send_file(
        &self,
        cx: &mut Context<'_>,
        (file, pos): (std::os::fd::RawFd, u64),
        len: usize,
    ) -> Option<Poll<std::io::Result<usize>>> {
        use std::os::fd::AsRawFd;
        let socket = self.inner.as_raw_fd();
        loop {
            match self.inner.poll_write_ready(cx) {
                Poll::Pending => return Some(Poll::Pending),
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Ready(Ok(())) => {}
            }
            let sent = self.inner.try_io(tokio::io::Interest::WRITABLE, || {
                crate::native::zerocopy::send(socket, file, pos, len)
            });
            match sent {
                Ok(n) => return Some(Poll::Ready(Ok(n))),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                // EINVAL/ENOSYS and the like: this pair cannot use sendfile.
                Err(e)
                    if e.raw_os_error()
                        .is_some_and(|c| c != libc::EPIPE && c != libc::ECONNRESET) =>
                {
                    return None
                }
                Err(e) => return Some(Poll::Ready(Err(e))),
            }
        }
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(src) = crate::native::zerocopy::source_of(buf) {
            if let Some(sent) = this.poll_send_file(cx, src, buf.len()) {
                return sent;
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    /// A blob chunk among `bufs` goes with `sendfile`: the buffers before it are written
    /// first (one `writev`), then the chunk on the next call; each call makes one system call
    /// and reports what it wrote, as a partial write would.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs.iter().position(|b| !b.is_empty());
        let zero_copy = (bufs.iter().enumerate())
            .find_map(|(i, b)| crate::native::zerocopy::source_of(b).map(|src| (i, src)));
        match zero_copy {
            Some((i, src)) if Some(i) == first => {
                if let Some(sent) = this.poll_send_file(cx, src, bufs[i].len()) {
                    return sent;
                }
                Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
            }
            Some((i, _)) => Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs[..i]),
            None => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that keeps its request counted as in flight until hyper drops it (the
/// body was sent, or the client went away).
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    /// Ties `inner` to `in_flight`.
    pub fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body shared by the core (which may read it) and the host (which drains what the
/// core left unread). `None` once it has ended or been given up.
#[derive(Clone)]
pub struct SharedBody(Rc<RefCell<Option<Incoming>>>);

impl SharedBody {
    /// Shares `body`.
    pub fn new(body: Incoming) -> SharedBody {
        SharedBody(Rc::new(RefCell::new(Some(body))))
    }

    async fn next_frame(&self) -> Option<Result<Frame<Bytes>, hyper::Error>> {
        use hyper::body::Body as _;
        let frame = std::future::poll_fn(|cx| match self.0.borrow_mut().as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        })
        .await;
        if !matches!(frame, Some(Ok(_))) {
            // Ended or failed: nothing more to read.
            self.0.borrow_mut().take();
        }
        frame
    }

    /// The body as a core stream, which must end within `timeout` of its creation: a body
    /// trickled slower fails (and is given up, so the connection closes after the answer).
    pub fn stream(&self, timeout: Duration) -> ByteStream {
        if !self.is_unread() {
            // No body (most requests): nothing to wait for, and nothing allocated.
            return futures_util::stream::empty().boxed_local();
        }
        let deadline = Instant::now() + timeout;
        futures_util::stream::unfold(self.clone(), move |body| async move {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(frame) = tokio::time::timeout(left, body.next_frame()).await else {
                    body.0.borrow_mut().take();
                    let msg = format!(
                        "the request body did not arrive within {} s",
                        timeout.as_secs()
                    );
                    return Some((Err(BodyError(msg)), body));
                };
                match frame {
                    None => return None,
                    Some(Err(e)) => return Some((Err(BodyError(e.to_string())), body)),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            return Some((Ok(data), body));
                        }
                    }
                }
            }
        })
        .boxed_local()
    }

    /// Whether the sender may still be sending: the body has not ended.
    pub fn is_unread(&self) -> bool {
        use hyper::body::Body as _;
        self.0.borrow().as_ref().is_some_and(|b| !b.is_end_stream())
    }

    /// Reads and discards what is left of the body, within [`LINGER_MAX_BYTES`],
    /// [`LINGER_MAX_TIME`] and [`LINGER_GAP`], then gives it up. Run after an answer that did
    /// not read the body (413, 401…): closing a socket with unread bytes makes the kernel send
    /// a reset, and a sender still writing then sees a broken pipe instead of the answer.
    /// `in_flight` keeps the connection's watchdog from taking the rest of the body for the
    /// start of a new request.
    pub async fn linger(self, in_flight: InFlight) {
        let deadline = Instant::now() + LINGER_MAX_TIME;
        let mut discarded = 0u64;
        while discarded <= LINGER_MAX_BYTES {
            let gap = deadline
                .saturating_duration_since(Instant::now())
                .min(LINGER_GAP);
            match tokio::time::timeout(gap, self.next_frame()).await {
                Ok(Some(Ok(frame))) => {
                    discarded += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                Ok(_) | Err(_) => break,
            }
        }
        // Dropping the body tells hyper to stop reading; with `Connection: close` sent, the
        // connection then closes.
        self.0.borrow_mut().take();
        drop(in_flight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(header: Option<&str>, idle: Option<&str>, max: Option<usize>) -> ServerConfig {
        ServerConfig {
            header_timeout: header.map(str::to_string),
            idle_timeout: idle.map(str::to_string),
            max_connections: max,
            body_timeout: None,
            ..ServerConfig::default()
        }
    }

    #[test]
    fn server_limits_have_defaults_and_refuse_zero() {
        assert_eq!(
            ServerLimits::parse(&ServerConfig::default()).unwrap(),
            ServerLimits::default()
        );
        let l = ServerLimits::parse(&server(Some("2s"), Some("500ms"), Some(3))).unwrap();
        assert_eq!(l.header_timeout, Duration::from_secs(2));
        assert_eq!(l.idle_timeout, Duration::from_millis(500));
        assert_eq!(l.max_connections, 3);
        for bad in [
            server(Some("0s"), None, None),
            server(None, Some("0ms"), None),
            server(None, None, Some(0)),
            server(Some("10"), None, None),
        ] {
            assert!(ServerLimits::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn accept_failures_back_off_and_log_once_per_interval() {
        let t0 = std::time::Instant::now();
        let mut b = AcceptBackoff::default();
        let mut pauses = Vec::new();
        let mut lines = Vec::new();
        let mut now = t0;
        // A thousand failures in a row, each after the pause asked for.
        for _ in 0..1000 {
            let (pause, line) = b.failed(now, "Too many open files (os error 24)");
            pauses.push(pause.as_millis());
            lines.extend(line);
            now += pause;
        }
        assert_eq!(&pauses[..9], &[10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert!(pauses.iter().all(|&p| p <= 1000));
        let elapsed = now - t0;
        let intervals = elapsed.as_secs() / ACCEPT_LOG_EVERY.as_secs() + 1;
        assert!(lines.len() as u64 <= intervals, "{} lines", lines.len());
        assert!(
            lines[0].starts_with("accept failed (1 times"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("times since the last report"),
            "{}",
            lines[1]
        );
        // A success resets the pause; its report is itself rate-limited.
        assert_eq!(b.succeeded(now), None);
        let (pause, _) = b.failed(now, "e");
        assert_eq!(pause, ACCEPT_BACKOFF_MIN);
        let later = now + ACCEPT_LOG_EVERY;
        assert_eq!(
            b.succeeded(later).as_deref(),
            Some("accept recovered after 1 failures")
        );
        assert_eq!(b.succeeded(later), None);
    }

    #[test]
    fn deadlines_follow_the_connection_state() {
        let limits = ServerLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            max_connections: 1,
        };
        let t0 = Instant::now();
        let state = ConnState::new(t0, limits);
        // New connection: the first head is due within the header timeout.
        assert_eq!(state.deadline(&limits), Some(t0 + limits.header_timeout));
        let request = InFlight::start(&state);
        assert_eq!(state.deadline(&limits), None);
        // Body bytes of the request in flight are not a new head.
        state.saw_bytes(|| t0 + Duration::from_secs(1));
        assert_eq!(state.deadline(&limits), None);
        let lingering = InFlight::start(&state);
        drop(request);
        assert_eq!(
            state.deadline(&limits),
            None,
            "a lingering read is in flight"
        );
        drop(lingering);
        let idle = state.deadline(&limits).unwrap();
        assert!(idle >= t0 + limits.idle_timeout);
        // The next request's first byte starts its header clock.
        let t1 = t0 + Duration::from_secs(2);
        state.saw_bytes(|| t1);
        assert_eq!(state.deadline(&limits), Some(t1 + limits.header_timeout));
        state.saw_bytes(|| t1 + Duration::from_secs(1));
        assert_eq!(state.deadline(&limits), Some(t1 + limits.header_timeout));
    }

    #[test]
    fn the_watchdog_is_woken_only_when_the_deadline_comes_earlier() {
        use futures_util::FutureExt;
        let limits = ServerLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            max_connections: 1,
        };
        let woken = |s: &ConnState| s.changed.notified().now_or_never().is_some();
        let t0 = Instant::now();
        let state = ConnState::new(t0, limits);
        // The watchdog sleeps until the first head's deadline; a request comes and goes, and
        // the idle deadline after it is later: nothing to wake it for.
        state.armed.set(state.deadline(&limits));
        drop(InFlight::start(&state));
        assert!(!woken(&state));
        // Nor does the next request's first byte: its header deadline is later still.
        state.saw_bytes(|| t0 + Duration::from_secs(1));
        assert!(!woken(&state));
        // Woken while a request was in flight, it waits without a timer: the end of the
        // request must wake it.
        let request = InFlight::start(&state);
        state.armed.set(None);
        assert!(!woken(&state));
        drop(request);
        assert!(woken(&state));
        // Asleep until the idle deadline, a new head's earlier deadline wakes it.
        state.armed.set(state.deadline(&limits));
        state.saw_bytes(|| t0 + Duration::from_secs(2));
        assert!(woken(&state));
    }
}
