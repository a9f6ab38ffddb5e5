//! The response body the core hands a host, and the per-request facts a host logs.

use crate::core::ports::ByteStream;
use bytes::Bytes;

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
