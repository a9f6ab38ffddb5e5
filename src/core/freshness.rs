//! The one freshness rule for everything pullgate revalidates (tag records, cached tag-list
//! pages, chart indexes): fresh until `ttl` after the last upstream confirmation, then
//! revalidated; while the upstream fails, served stale until `max_stale` after it. A leaf.

/// `[cache] tag_ttl` and `max_stale`, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// How long a confirmation stays fresh.
    pub ttl_ms: u64,
    /// How long past a confirmation a record may still be served when the upstream fails.
    pub max_stale_ms: u64,
}

/// What a record confirmed at some time is worth now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Age {
    /// Serve it without asking the upstream.
    Fresh,
    /// Revalidate; if the upstream fails, it may still be served.
    Stale,
    /// Revalidate; if the upstream fails, it is too old to serve.
    Expired,
}

impl Freshness {
    /// Classifies a record last confirmed at `checked_ms`.
    pub fn classify(&self, checked_ms: u64, now_ms: u64) -> Age {
        if now_ms < checked_ms.saturating_add(self.ttl_ms) {
            Age::Fresh
        } else if now_ms <= checked_ms.saturating_add(self.max_stale_ms) {
            Age::Stale
        } else {
            Age::Expired
        }
    }

    /// Fresh at `now`?
    pub fn is_fresh(&self, checked_ms: u64, now_ms: u64) -> bool {
        self.classify(checked_ms, now_ms) == Age::Fresh
    }

    /// May it be served while the upstream fails (fresh or within `max_stale`)?
    pub fn may_serve_stale(&self, checked_ms: u64, now_ms: u64) -> bool {
        now_ms <= checked_ms.saturating_add(self.max_stale_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_then_stale_then_expired() {
        let f = Freshness {
            ttl_ms: 300_000,
            max_stale_ms: 7 * 86_400_000,
        };
        assert_eq!(f.classify(1_000, 1_000), Age::Fresh);
        assert_eq!(f.classify(1_000, 300_999), Age::Fresh);
        assert_eq!(f.classify(1_000, 301_000), Age::Stale);
        assert_eq!(f.classify(1_000, 1_000 + 7 * 86_400_000), Age::Stale);
        assert_eq!(f.classify(1_000, 1_001 + 7 * 86_400_000), Age::Expired);
        assert!(f.may_serve_stale(1_000, 301_000));
        assert!(!f.may_serve_stale(1_000, 1_001 + 7 * 86_400_000));
        let never = Freshness { ttl_ms: 0, ..f };
        assert!(!never.is_fresh(1_000, 1_000));
        // A confirmation in the far future (clock skew) never overflows.
        assert!(f.is_fresh(u64::MAX, 5));
    }
}
