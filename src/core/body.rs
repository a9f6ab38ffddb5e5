//! The response body the core hands a host, and the per-request facts a host logs: the access
//! event ([`AccessLog::emit`], a `tracing` event on the [`ACCESS_TARGET`] target, whichever
//! subscriber the host installed).

use bytes::Bytes;
use futures_util::stream::LocalBoxStream;

/// An error while a body streams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

/// A streaming body: chunks of bytes, never the whole thing at once.
pub type ByteStream = LocalBoxStream<'static, Result<Bytes, BodyError>>;

/// A response body.
pub enum Body {
    /// No body (HEAD, 204).
    Empty,
    /// A small body held in memory (manifests, JSON).
    Bytes(Bytes),
    /// A streamed body (blobs). A stream error means: abort the connection.
    Stream(ByteStream),
    /// A body only the host understands (e.g. an R2 object's own stream on Workers, handed to
    /// the response without pumping its bytes through the core). Produced by a host's own
    /// [`BlobStore::serve`](crate::core::ports::BlobStore::serve); other hosts never see one.
    Host(HostBody),
}

/// An opaque host body; the host that made it downcasts it.
pub struct HostBody(pub Box<dyn std::any::Any>);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Empty => f.write_str("Body::Empty"),
            Body::Bytes(b) => write!(f, "Body::Bytes({} bytes)", b.len()),
            Body::Stream(_) => f.write_str("Body::Stream"),
            Body::Host(_) => f.write_str("Body::Host"),
        }
    }
}

/// How the cache answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// From the cache, fresh.
    Hit,
    /// From the upstream (and cached when verified).
    Miss,
    /// Joined a fill already in flight.
    Coalesced,
    /// From the cache, stale, because the upstream failed.
    Stale,
    /// Not a cacheable route.
    None,
    /// From the cache, fresh, and its content from the host's colo tier (the Cache API on
    /// Workers) rather than its shared store. Only hosts set it (the core reports `Hit`).
    EdgeHit,
}

impl CacheStatus {
    /// Log word.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Stale => "stale",
            CacheStatus::None => "-",
            CacheStatus::EdgeHit => "edge-hit",
        }
    }
}

/// Facts about a request for the host's one log line, carried in the response's extensions.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// Route kind (`manifest`, `blob`, …, or `error`).
    pub route: &'static str,
    /// Upstream host, if any.
    pub upstream: Option<String>,
    /// Cache outcome.
    pub cache: CacheStatus,
    /// Error text for the log (never contains secrets).
    pub error: Option<String>,
    /// Who asked (`anonymous` when unauthenticated); None when refused before authentication.
    pub identity: Option<String>,
}

/// The `tracing` target of the per-request access events (`RUST_LOG=pullgate::access=off`
/// silences them; so does `[log] access = false`).
pub const ACCESS_TARGET: &str = "pullgate::access";

impl RequestInfo {
    /// Facts for a response the core did not make (a host's own error): route `-`.
    pub fn none() -> RequestInfo {
        RequestInfo {
            route: "-",
            upstream: None,
            cache: CacheStatus::None,
            error: None,
            identity: None,
        }
    }
}

/// The one access-log line every host writes, `key=value` pairs in a fixed order:
/// `method path route upstream cache identity status [client] [bytes] [ms] [aborted] [error]`. Hosts
/// add what they measure (bytes sent, duration, an aborted body); the rest comes from the
/// core's [`RequestInfo`]. The error text never carries secrets (see [`RequestInfo::error`]).
#[derive(Debug, Clone, Default)]
pub struct AccessLog<'a> {
    /// Request method.
    pub method: &'a str,
    /// Request path (never the query: it can carry tokens).
    pub path: &'a str,
    /// Response status.
    pub status: u16,
    /// The client's address as the host resolved it (the socket's, or what a trusted proxy
    /// said), when the host knows one.
    pub client: Option<std::net::IpAddr>,
    /// What the core said about the request.
    pub info: Option<&'a RequestInfo>,
    /// Body bytes sent, when the host counts them.
    pub bytes: Option<u64>,
    /// Milliseconds from request to the end of the body, when the host measures it.
    pub ms: Option<u128>,
    /// The body ended early (a failed stream or a client that left).
    pub aborted: bool,
}

impl AccessLog<'_> {
    /// Emits the access event: the fields of [`line`](Self::line), in the same order and
    /// with the same words (`-` for an absent route, upstream, cache or identity), as a
    /// `tracing` event at INFO on [`ACCESS_TARGET`]. Text subscribers print
    /// `method=GET path=/v2/… route=… status=200 …`, JSON ones an object. Nothing is
    /// formatted when the subscriber filters the event out.
    pub fn emit(&self) {
        let i = self.info;
        tracing::info!(
            target: ACCESS_TARGET,
            method = %self.method,
            path = %self.path,
            route = %i.map_or("-", |i| i.route),
            upstream = %i.and_then(|i| i.upstream.as_deref()).unwrap_or("-"),
            cache = %i.map_or("-", |i| i.cache.as_str()),
            identity = %i.and_then(|i| i.identity.as_deref()).unwrap_or("-"),
            status = self.status,
            client = self.client.map(tracing::field::display),
            bytes = self.bytes,
            ms = self.ms.map(|ms| u64::try_from(ms).unwrap_or(u64::MAX)),
            aborted = self.aborted.then_some(true),
            error = i.and_then(|i| i.error.as_deref()),
        );
    }

    /// The line.
    pub fn line(&self) -> String {
        let i = self.info;
        let route = i.map_or("-", |i| i.route);
        let upstream = i.and_then(|i| i.upstream.as_deref()).unwrap_or("-");
        let cache = i.map_or("-", |i| i.cache.as_str());
        let identity = i.and_then(|i| i.identity.as_deref()).unwrap_or("-");
        let mut line = format!(
            "method={} path={} route={route} upstream={upstream} cache={cache} identity={identity} status={}",
            self.method, self.path, self.status
        );
        if let Some(c) = self.client {
            line.push_str(&format!(" client={c}"));
        }
        if let Some(b) = self.bytes {
            line.push_str(&format!(" bytes={b}"));
        }
        if let Some(ms) = self.ms {
            line.push_str(&format!(" ms={ms}"));
        }
        if self.aborted {
            line.push_str(" aborted=true");
        }
        if let Some(e) = i.and_then(|i| i.error.as_deref()) {
            line.push_str(&format!(" error={e:?}"));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_lines_have_a_fixed_order_and_quote_errors() {
        let info = RequestInfo {
            route: "blob",
            upstream: Some("docker.io".into()),
            cache: CacheStatus::Miss,
            error: Some("upstream \"x\" failed".into()),
            identity: Some("ci".into()),
        };
        let line = AccessLog {
            method: "GET",
            path: "/v2/a/blobs/sha256:00",
            status: 200,
            info: Some(&info),
            client: Some("203.0.113.7".parse().unwrap()),
            bytes: Some(12),
            ms: Some(3),
            aborted: true,
        }
        .line();
        assert_eq!(
            line,
            "method=GET path=/v2/a/blobs/sha256:00 route=blob upstream=docker.io cache=miss \
             identity=ci status=200 client=203.0.113.7 bytes=12 ms=3 aborted=true error=\"upstream \\\"x\\\" failed\""
        );
        let bare = AccessLog {
            method: "GET",
            path: "/",
            status: 404,
            ..Default::default()
        };
        assert_eq!(
            bare.line(),
            "method=GET path=/ route=- upstream=- cache=- identity=- status=404"
        );
    }
}
