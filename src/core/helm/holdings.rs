//! Which chart files each chart repository holds: the per-repository authorization of cached
//! chart bytes (issue 9, item 1).
//!
//! The blob store is shared and content-addressed: one digest, one copy, whoever fetched it
//! (a chart for another `[[helm]]` entry, a registry layer, an index chunk). An index is
//! upstream content and may list any digest, so "the index lists it and the store has it" is
//! no proof that this repository holds it. A chart file is served for repository X only when
//! X holds it: X's index lists it *and* X's own upstream produced bytes with that digest —
//! a fill from X's chart URL, or, when the bytes are already stored for someone else, a GET of
//! X's chart URL hashed to the same digest (proof of possession: only a party that has the
//! bytes can answer with them). A `HEAD` would prove nothing here: the party that wrote the
//! index also answers for its URLs.
//!
//! A holding is one small key-value record per (repository, digest), bound to the upstream URL
//! the repository had when it was proven (a changed `url` proves again). Holdings never expire:
//! content by digest is immutable, and the repository's index must still list the path for it
//! to be served. After a purge or eviction a holding may outlive its bytes; that is harmless,
//! because missing bytes are fetched again from the repository's own chart URL.
//!
//! The rewritten index and the chart map need no holdings: they are reached only through the
//! repository's own [`IndexRecord`](super::store::IndexRecord), which names its chunks and is
//! built from that repository's upstream alone.

use super::{HelmError, HelmRepo};
use crate::core::context::Inner;
use serde::{Deserialize, Serialize};

/// Version of the stored holding record.
const HOLDING_VERSION: u32 = 1;

/// That a repository holds a chart file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// Format version.
    pub v: u32,
    /// The repository's upstream URL when the holding was proven.
    pub upstream: String,
    /// When it was proven (ms since the epoch).
    pub ms: u64,
}

/// The key-value key of a holding: `helm/<repo>/has/<digest>`.
pub fn holding_key(repo: &str, digest: &str) -> String {
    crate::core::registry::keys::bounded("helm/", format!("{repo}/has/{digest}"))
}

/// Whether `repo` holds the chart file `digest`.
pub(crate) async fn is_held(
    inner: &Inner,
    repo: &HelmRepo,
    digest: &str,
) -> Result<bool, HelmError> {
    let raw = inner
        .ports
        .kv
        .get(&holding_key(&repo.name, digest))
        .await
        .map_err(|e| HelmError::Internal(e.to_string()))?;
    Ok(raw
        .and_then(|r| serde_json::from_slice::<Holding>(&r).ok())
        .is_some_and(|h| h.v == HOLDING_VERSION && h.upstream == repo.url.as_str()))
}

/// Records that `repo`'s upstream produced the bytes of `digest`.
pub(crate) async fn record(inner: &Inner, repo: &HelmRepo, digest: &str) -> Result<(), HelmError> {
    let h = Holding {
        v: HOLDING_VERSION,
        upstream: repo.url.to_string(),
        ms: inner.ports.clock.now_ms(),
    };
    let raw = serde_json::to_vec(&h).map_err(|e| HelmError::Internal(e.to_string()))?;
    inner
        .ports
        .kv
        .put(&holding_key(&repo.name, digest), &raw)
        .await
        .map_err(|e| HelmError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holding_keys_are_per_repository_and_bounded() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(holding_key("stable", &d), format!("helm/stable/has/{d}"));
        assert_ne!(holding_key("stable", &d), holding_key("other", &d));
        let long = holding_key(&"x".repeat(300), &d);
        assert!(long.len() <= 250 && long.starts_with("helm/#"));
    }
}
