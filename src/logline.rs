//! A small `tracing` subscriber for the hosts that cannot run `tracing-subscriber`'s
//! formatter (Workers: `SystemTime::now` panics on `wasm32-unknown-unknown`; Spin: one short
//! request per instance). It formats each event as one line — text
//! (`2026-11-27T15:00:00.000Z INFO target: message key=value…`) or one JSON object — and hands
//! it to the host's sink (`console.log` on Workers, stderr on Spin), with the time from the
//! host's clock. Spans are accepted and ignored: the core logs events only.
//!
//! The filter is `[log] level`: a default level plus `target=level` pairs matched by the
//! longest target prefix (`info,pullgate::access=off`), the subset of `RUST_LOG`'s syntax the
//! core's events need.

use crate::core::config::{LogFormat, LogSettings};
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

/// Where finished lines go, with the event's level (to pick `console.error` and friends).
pub type Sink = Box<dyn Fn(Level, &str) + Send + Sync>;

/// `[log] level` parsed: the default and per-target levels.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    default: LevelFilter,
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// Parses `level[,target=level…]`; an unknown level is an error naming it.
    pub fn parse(spec: &str) -> Result<Filter, String> {
        let level = |s: &str| -> Result<LevelFilter, String> {
            s.trim().parse::<LevelFilter>().map_err(|_| {
                format!("log.level: {s:?} is not a level (error, warn, info, debug, trace, off)")
            })
        };
        let mut f = Filter {
            default: LevelFilter::INFO,
            targets: Vec::new(),
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((target, l)) => f.targets.push((target.trim().to_string(), level(l)?)),
                None => f.default = level(part)?,
            }
        }
        // Longest prefix first, so the first match is the most specific.
        f.targets.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        Ok(f)
    }

    /// The level allowed for `target`.
    fn level_for(&self, target: &str) -> LevelFilter {
        self.targets
            .iter()
            .find(|(t, _)| {
                target.starts_with(t.as_str())
                    && (target.len() == t.len() || target[t.len()..].starts_with("::"))
            })
            .map_or(self.default, |(_, l)| *l)
    }

    /// The most verbose level any target allows.
    fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, std::cmp::max)
    }
}

/// The subscriber.
pub struct LineSubscriber {
    filter: Filter,
    format: LogFormat,
    now_ms: fn() -> u64,
    sink: Sink,
    next_span: AtomicU64,
}

impl LineSubscriber {
    /// A subscriber for `[log]`, the host's clock and sink.
    pub fn new(log: &LogSettings, now_ms: fn() -> u64, sink: Sink) -> Result<Self, String> {
        Ok(LineSubscriber {
            filter: Filter::parse(&log.level)?,
            format: log.format,
            now_ms,
            sink,
            next_span: AtomicU64::new(1),
        })
    }

    /// Installs it as the process's (isolate's) subscriber; false when one is installed
    /// already (the first one stays).
    pub fn install(self) -> bool {
        tracing::subscriber::set_global_default(self).is_ok()
    }

    /// The line for an event.
    pub fn format(&self, event: &Event<'_>) -> String {
        let meta = event.metadata();
        let ts = crate::core::time::rfc3339((self.now_ms)());
        match self.format {
            LogFormat::Json => {
                let mut v = JsonFields(Map::new());
                event.record(&mut v);
                let mut obj = Map::new();
                obj.insert("timestamp".into(), Value::String(ts));
                obj.insert("level".into(), Value::String(meta.level().to_string()));
                obj.insert("target".into(), Value::String(meta.target().to_string()));
                obj.extend(v.0);
                Value::Object(obj).to_string()
            }
            LogFormat::Text => {
                let mut v = TextFields {
                    message: String::new(),
                    fields: String::new(),
                };
                event.record(&mut v);
                let mut line = format!("{ts} {} {}:", meta.level(), meta.target());
                if !v.message.is_empty() {
                    line.push(' ');
                    line.push_str(&v.message);
                }
                line.push_str(&v.fields);
                line
            }
        }
    }
}

impl Subscriber for LineSubscriber {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.enabled(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        *meta.level() <= self.filter.level_for(meta.target())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.filter.max())
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let line = self.format(event);
        (self.sink)(*event.metadata().level(), &line);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Text: the message first, then ` key=value` pairs (strings and `?` values quoted, `%`
/// values as they display), as `tracing-subscriber`'s text format writes them.
struct TextFields {
    message: String,
    fields: String,
}

impl Visit for TextFields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

/// JSON: each field a member, numbers and booleans as themselves.
struct JsonFields(Map<String, Value>);

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::Bool(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::body::{AccessLog, CacheStatus, RequestInfo};
    use std::sync::{Arc, Mutex};

    fn capture(log: &LogSettings) -> (LineSubscriber, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let sub = LineSubscriber::new(
            log,
            || 1_795_305_600_000,
            Box::new(move |_, l| sink.lock().unwrap().push(l.to_string())),
        )
        .unwrap();
        (sub, lines)
    }

    fn access() {
        let info = RequestInfo {
            route: "blob",
            upstream: Some("docker.io".into()),
            cache: CacheStatus::Miss,
            error: Some("upstream \"x\" failed".into()),
            identity: Some("ci".into()),
        };
        AccessLog {
            method: "GET",
            path: "/v2/a/blobs/sha256:00",
            status: 200,
            client: None,
            info: Some(&info),
            bytes: Some(12),
            ms: Some(3),
            aborted: true,
        }
        .emit();
    }

    #[test]
    fn access_events_print_the_access_line_fields_in_text() {
        let (sub, lines) = capture(&LogSettings::default());
        tracing::subscriber::with_default(sub, access);
        assert_eq!(
            lines.lock().unwrap().as_slice(),
            [
                "2026-11-22T00:00:00.000Z INFO pullgate::access: method=GET \
              path=/v2/a/blobs/sha256:00 route=blob upstream=docker.io cache=miss identity=ci \
              status=200 bytes=12 ms=3 aborted=true error=\"upstream \\\"x\\\" failed\""
            ]
        );
    }

    #[test]
    fn json_lines_parse_and_carry_typed_fields() {
        let log = LogSettings {
            format: LogFormat::Json,
            ..LogSettings::default()
        };
        let (sub, lines) = capture(&log);
        tracing::subscriber::with_default(sub, || {
            access();
            tracing::warn!(target: "pullgate::core::x", n = 3u64, "a \"quoted\" message");
        });
        let lines = lines.lock().unwrap();
        let a: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(a["target"], "pullgate::access");
        assert_eq!(a["status"], 200);
        assert_eq!(a["cache"], "miss");
        assert_eq!(a["aborted"], true);
        let w: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(w["level"], "WARN");
        assert_eq!(w["message"], "a \"quoted\" message");
        assert_eq!(w["n"], 3);
    }

    #[test]
    fn the_filter_takes_the_longest_matching_target() {
        let log = LogSettings {
            level: "debug,pullgate::access=off,pullgate::core=warn".into(),
            ..LogSettings::default()
        };
        let (sub, lines) = capture(&log);
        tracing::subscriber::with_default(sub, || {
            access();
            tracing::info!(target: "pullgate::core::registry", "hidden");
            tracing::warn!(target: "pullgate::core::registry", "shown");
            tracing::debug!(target: "pullgate::accessory", "shown too");
        });
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].ends_with("shown") && lines[1].ends_with("shown too"));
        assert!(Filter::parse("loud").is_err());
    }
}
