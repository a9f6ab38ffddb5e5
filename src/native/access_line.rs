//! The access line, written by the native host itself: the same bytes `tracing-subscriber`'s
//! formatter would write for [`AccessLog::emit`]'s event (text or JSON), into the same
//! non-blocking writer as every other line, so lines keep their order.
//!
//! The access event is the one line every request writes; through the formatter it cost a
//! request more than its manifest lookup (field visitors and `fmt` calls for a dozen fields).
//! Here the fields are written from their typed values. The filter still decides: the line
//! is written only when `pullgate::access` is enabled at INFO. A process whose subscriber is
//! not the native one (tests that run the host in-process) gets the `tracing` event instead.

use crate::core::body::{AccessLog, ACCESS_TARGET};
use crate::core::config::LogFormat;
use std::io::Write;
use std::sync::OnceLock;
use tracing_appender::non_blocking::NonBlocking;

static SINK: OnceLock<(NonBlocking, LogFormat)> = OnceLock::new();

/// Sends access lines to `writer` in `format` from now on (the native subscriber's writer).
pub(crate) fn install(writer: NonBlocking, format: LogFormat) {
    let _ = SINK.set((writer, format));
}

/// Writes `a`'s line; false when the native subscriber is not the one installed (the caller
/// then emits the `tracing` event).
pub(crate) fn write(a: &AccessLog<'_>) -> bool {
    let Some((_, format)) = SINK.get() else {
        return false;
    };
    if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
        return true;
    }
    let ts = super::logging::stamp_now();
    let batched = super::line_batch::append(super::line_batch::Line::Access, |out| {
        format_line(out, *format, &ts, a)
    });
    if !batched {
        let mut line = Vec::with_capacity(320);
        format_line(&mut line, *format, &ts, a);
        send(&line);
    }
    true
}

/// Hands whole lines (a worker's batch) to the log writer.
pub(crate) fn send(lines: &[u8]) {
    if let Some((writer, _)) = SINK.get() {
        // A full queue drops (and counts) the lines, as it does every other.
        let _ = writer.clone().write_all(lines);
    }
}

/// The line as the formatter writes it (timestamp `ts`), newline included.
pub(crate) fn format_line(out: &mut Vec<u8>, format: LogFormat, ts: &[u8], a: &AccessLog<'_>) {
    let i = a.info;
    let route = i.map_or("-", |i| i.route);
    let upstream = i.and_then(|i| i.upstream.as_deref()).unwrap_or("-");
    let cache = i.map_or("-", |i| i.cache.as_str());
    let identity = i.and_then(|i| i.identity.as_deref()).unwrap_or("-");
    let error = i.and_then(|i| i.error.as_deref());
    let ms = a.ms.map(|ms| u64::try_from(ms).unwrap_or(u64::MAX));
    // The string fields, in the event's order.
    let fields: [(&str, &str); 6] = [
        ("method", a.method),
        ("path", a.path),
        ("route", route),
        ("upstream", upstream),
        ("cache", cache),
        ("identity", identity),
    ];
    match format {
        LogFormat::Text => {
            out.extend_from_slice(ts);
            out.extend_from_slice(b"  INFO ");
            out.extend_from_slice(ACCESS_TARGET.as_bytes());
            out.extend_from_slice(b":");
            for (k, v) in fields {
                text_field(out, k, v.as_bytes());
            }
            text_field(out, "status", itoa(a.status.into()).as_ref());
            if let Some(c) = a.client {
                out.extend_from_slice(b" client=");
                ip(out, c);
            }
            if let Some(b) = a.bytes {
                text_field(out, "bytes", itoa(b).as_ref());
            }
            if let Some(ms) = ms {
                text_field(out, "ms", itoa(ms).as_ref());
            }
            if a.aborted {
                out.extend_from_slice(b" aborted=true");
            }
            if let Some(e) = error {
                let _ = write!(out, " error={e:?}");
            }
        }
        LogFormat::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            out.extend_from_slice(ts);
            out.extend_from_slice(b"\",\"level\":\"INFO\"");
            for (k, v) in fields {
                json_str(out, k, v);
            }
            json_raw(out, "status", itoa(a.status.into()).as_ref());
            if let Some(c) = a.client {
                out.extend_from_slice(b",\"client\":\"");
                ip(out, c);
                out.push(b'"');
            }
            if let Some(b) = a.bytes {
                json_raw(out, "bytes", itoa(b).as_ref());
            }
            if let Some(ms) = ms {
                json_raw(out, "ms", itoa(ms).as_ref());
            }
            if a.aborted {
                json_raw(out, "aborted", b"true");
            }
            if let Some(e) = error {
                json_str(out, "error", e);
            }
            json_str(out, "target", ACCESS_TARGET);
            out.push(b'}');
        }
    }
    out.push(b'\n');
}

/// An address as it displays (`203.0.113.7`, `2001:db8::7`); IPv4 without `fmt`.
pub(crate) fn ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(itoa(octet.into()).as_ref());
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn text_field(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
}

fn json_str(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(b',');
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
    let _ = serde_json::to_writer(&mut *out, value);
}

fn json_raw(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.push(b',');
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
    out.extend_from_slice(value);
}

/// `n` in decimal.
pub(crate) fn itoa(mut n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

pub(crate) struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl AsRef<[u8]> for Digits {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::body::{CacheStatus, RequestInfo};
    use std::sync::{Arc, Mutex};

    const TS: &str = "2026-11-28T01:08:20.773893Z";

    struct FixedTime;
    impl tracing_subscriber::fmt::time::FormatTime for FixedTime {
        fn format_time(
            &self,
            w: &mut tracing_subscriber::fmt::format::Writer<'_>,
        ) -> std::fmt::Result {
            w.write_str(TS)
        }
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the native subscriber (configured as `logging::init` does) writes for the event.
    fn through_tracing(format: LogFormat, a: &AccessLog<'_>) -> String {
        let cap = Capture::default();
        let writer = {
            let cap = cap.clone();
            move || cap.clone()
        };
        let builder = tracing_subscriber::fmt()
            .with_timer(FixedTime)
            .with_writer(writer)
            .with_ansi(false);
        match format {
            LogFormat::Text => tracing::subscriber::with_default(builder.finish(), || a.emit()),
            LogFormat::Json => tracing::subscriber::with_default(
                builder
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .finish(),
                || a.emit(),
            ),
        }
        let out = cap.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    fn direct(format: LogFormat, a: &AccessLog<'_>) -> String {
        let mut out = Vec::new();
        format_line(&mut out, format, TS.as_bytes(), a);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_are_byte_for_byte_what_the_formatter_writes() {
        let full = RequestInfo {
            route: "manifest",
            upstream: Some("docker.io".into()),
            cache: CacheStatus::Hit,
            error: Some("tag record not saved: \"quota\"\n\u{1}é".into()),
            identity: Some("ci bot".into()),
        };
        let none = RequestInfo {
            route: "error",
            upstream: None,
            cache: CacheStatus::None,
            error: None,
            identity: None,
        };
        let cases = [
            AccessLog {
                method: "GET",
                path: "/v2/library/alpine/manifests/3.20",
                status: 200,
                client: Some("2001:db8::7".parse().unwrap()),
                info: Some(&full),
                bytes: Some(527),
                ms: Some(12_345),
                aborted: true,
            },
            AccessLog {
                method: "HEAD",
                path: "/v2/",
                status: 401,
                client: Some("127.0.0.1".parse().unwrap()),
                info: Some(&none),
                bytes: Some(0),
                ms: Some(0),
                aborted: false,
            },
            AccessLog {
                method: "BREW",
                path: "/x",
                status: 0,
                ..Default::default()
            },
        ];
        for format in [LogFormat::Text, LogFormat::Json] {
            for a in &cases {
                let want = through_tracing(format, a);
                assert!(!want.is_empty());
                assert_eq!(direct(format, a), want, "{format:?}");
            }
        }
    }

    #[test]
    fn addresses_are_written_as_they_display() {
        for a in [
            "0.0.0.0",
            "127.0.0.1",
            "203.0.113.255",
            "::1",
            "2001:db8::7",
            "::ffff:1.2.3.4",
        ] {
            let addr: std::net::IpAddr = a.parse().unwrap();
            let mut out = Vec::new();
            ip(&mut out, addr);
            assert_eq!(out, addr.to_string().into_bytes());
        }
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 527, 99_999, u64::MAX] {
            assert_eq!(itoa(n).as_ref(), n.to_string().as_bytes());
        }
    }
}
