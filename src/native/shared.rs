//! State the serving threads share, so that what a user configures for *the process* holds
//! for the process and not once per thread:
//! - [`ProcessBuckets`]: the `[rate_limit]` buckets (the core's [`RateLimitStore`] port). With
//!   one bucket set per thread, a limit of 10/m admitted up to 10/m *per thread*, depending
//!   on which thread a connection landed on.
//! - [`ProcessTagFlights`]: the upstream revalidation (or first fetch) of a tag (the core's
//!   [`TagFlights`] port). A burst of nodes pulling a tag that just went stale makes one
//!   upstream request; the others, on any thread, serve the digest it resolved.
//! - Login lockouts: one [`LoginLockouts`](crate::core::app::LoginLockouts) table
//!   (the core's own type, shared by its clones). With one per thread, `login_failures = 5`
//!   allowed five failed logins per thread before a lockout.
//! - [`ProcessTokens`]: upstream bearer tokens (the core's [`TokenStore`] port), so a token one
//!   thread fetched is used by the others until it expires, instead of one token request per
//!   thread (Docker Hub rate-limits token requests too).
//!
//! All are exact: one mutex each, held for a few map operations and never across an await.
//! Followers of a tag wait on a `tokio::sync::watch` bumped by every publish (it wakes tasks on
//! any thread's runtime), and give up at the lead's expiry, so a lead whose task died releases
//! them. Time is the wall clock, as the core's own clock on this host.

use crate::core::ports::{
    BucketLimit, BucketState, BucketTake, RateLimitStore, StoreError, StoredToken, TagEntry,
    TagFlight, TagFlightBook, TagFlights, TagLease, TagOutcome, TagPoll, TokenStore,
};
use futures_util::future::LocalBoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Most rate-limit keys kept; the stalest bucket is dropped beyond it (as the core's own).
pub const MAX_BUCKETS: usize = 10_000;
/// Tags whose flights are remembered; beyond it, books with no lead in flight are dropped.
pub const MAX_TAG_BOOKS: usize = 4_096;

/// Most upstream tokens kept; beyond it expired ones are dropped, then the soonest to expire.
pub const MAX_TOKENS: usize = 1_024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A lock that a panicking holder did not leave unusable (the maps stay consistent: every
/// update is one map operation). Also the metadata store's (`redb_kv`) for its tallies.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The process's rate-limit buckets (clone per core instance: the clones share them).
#[derive(Clone, Default)]
pub struct ProcessBuckets {
    buckets: Arc<Mutex<HashMap<String, BucketState>>>,
}

impl ProcessBuckets {
    /// [`RateLimitStore::take`] without the async wrapper.
    pub fn take_now(&self, key: &str, limit: BucketLimit, now_ms: u64) -> BucketTake {
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            let oldest = buckets
                .iter()
                .min_by_key(|(_, b)| b.at_ms)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                buckets.remove(&oldest);
            }
        }
        buckets
            .entry(key.to_string())
            .or_insert_with(|| BucketState::full(limit, now_ms))
            .take(limit, now_ms)
    }

    /// How many keys are tracked.
    pub fn len(&self) -> usize {
        lock(&self.buckets).len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait::async_trait(?Send)]
impl RateLimitStore for ProcessBuckets {
    async fn take(
        &self,
        key: &str,
        limit: BucketLimit,
        now_ms: u64,
    ) -> Result<BucketTake, StoreError> {
        Ok(self.take_now(key, limit, now_ms))
    }
}

/// The process's upstream tokens by (upstream, scope) (clone per core instance: the clones
/// share them). Tokens stay in memory only.
#[derive(Clone, Default)]
pub struct ProcessTokens {
    tokens: Arc<Mutex<HashMap<(String, String), StoredToken>>>,
}

#[async_trait::async_trait(?Send)]
impl TokenStore for ProcessTokens {
    async fn get(
        &self,
        upstream: &str,
        scope: &str,
        now_ms: u64,
    ) -> Result<Option<StoredToken>, StoreError> {
        let tokens = lock(&self.tokens);
        Ok(tokens
            .get(&(upstream.to_string(), scope.to_string()))
            .filter(|t| t.valid_until_ms > now_ms)
            .cloned())
    }

    async fn put(
        &self,
        upstream: &str,
        scope: &str,
        token: &StoredToken,
    ) -> Result<(), StoreError> {
        let mut tokens = lock(&self.tokens);
        let key = (upstream.to_string(), scope.to_string());
        if tokens.len() >= MAX_TOKENS && !tokens.contains_key(&key) {
            let now = now_ms();
            tokens.retain(|_, t| t.valid_until_ms > now);
            if tokens.len() >= MAX_TOKENS {
                let soonest = tokens
                    .iter()
                    .min_by_key(|(_, t)| t.valid_until_ms)
                    .map(|(k, _)| k.clone());
                if let Some(soonest) = soonest {
                    tokens.remove(&soonest);
                }
            }
        }
        tokens.insert(key, token.clone());
        Ok(())
    }
}

struct TagState {
    books: Mutex<HashMap<String, TagFlightBook>>,
    /// Bumped after every publish: followers re-poll their book.
    published: tokio::sync::watch::Sender<u64>,
}

/// The process's tag flights (clone per core instance: the clones share them).
#[derive(Clone)]
pub struct ProcessTagFlights {
    state: Arc<TagState>,
    lease_ms: u64,
}

impl ProcessTagFlights {
    /// Flights whose leads hold a tag for at most `lease_ms` (a lead that never publishes
    /// releases its followers then).
    pub fn new(lease_ms: u64) -> ProcessTagFlights {
        ProcessTagFlights {
            state: Arc::new(TagState {
                books: Mutex::new(HashMap::new()),
                published: tokio::sync::watch::Sender::new(0),
            }),
            lease_ms: lease_ms.max(1),
        }
    }

    fn enter_at(&self, key: &str, now_ms: u64) -> TagEntry {
        let mut books = lock(&self.state.books);
        if books.len() >= MAX_TAG_BOOKS && !books.contains_key(key) {
            books.retain(|_, b| b.in_flight(now_ms));
        }
        books
            .entry(key.to_string())
            .or_default()
            .enter(now_ms, self.lease_ms)
    }

    fn poll(&self, key: &str, lease: u64) -> TagPoll {
        match lock(&self.state.books).get_mut(key) {
            Some(book) => book.poll(lease, now_ms()),
            None => TagPoll::Done(TagOutcome::Unknown),
        }
    }

    async fn follow(self, key: String, lease: u64) -> TagOutcome {
        // Subscribed before the first poll: a publish after it is never missed.
        let mut published = self.state.published.subscribe();
        loop {
            let until = match self.poll(&key, lease) {
                TagPoll::Done(outcome) => return outcome,
                TagPoll::WaitUntil(ms) => ms,
            };
            let wait = Duration::from_millis(until.saturating_sub(now_ms()).max(1));
            tokio::select! {
                changed = published.changed() => {
                    if changed.is_err() {
                        return TagOutcome::Unknown;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

impl TagFlights for ProcessTagFlights {
    fn enter(&self, key: &str) -> LocalBoxFuture<'static, TagFlight> {
        let flight = match self.enter_at(key, now_ms()) {
            TagEntry::Lead(lease) => TagFlight::Lead(Box::new(ProcessTagLease {
                state: self.state.clone(),
                key: key.to_string(),
                lease,
                published: false,
            })),
            TagEntry::Follow(lease) => {
                TagFlight::Follow(Box::pin(self.clone().follow(key.to_string(), lease)))
            }
        };
        Box::pin(std::future::ready(flight))
    }
}

/// A lead's hold on a tag; dropped without publishing, it publishes [`TagOutcome::Unknown`].
struct ProcessTagLease {
    state: Arc<TagState>,
    key: String,
    lease: u64,
    published: bool,
}

impl ProcessTagLease {
    fn publish_now(&mut self, outcome: TagOutcome) {
        self.published = true;
        if let Some(book) = lock(&self.state.books).get_mut(&self.key) {
            book.publish(self.lease, outcome);
        }
        self.state.published.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl TagLease for ProcessTagLease {
    fn publish(mut self: Box<Self>, outcome: TagOutcome) -> LocalBoxFuture<'static, ()> {
        self.publish_now(outcome);
        Box::pin(std::future::ready(()))
    }
}

impl Drop for ProcessTagLease {
    fn drop(&mut self) {
        if !self.published {
            self.publish_now(TagOutcome::Unknown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn limit() -> BucketLimit {
        BucketLimit {
            n: 2,
            per_ms: 60_000,
            burst: 2,
        }
    }

    #[test]
    fn clones_share_one_bucket_per_key() {
        let a = ProcessBuckets::default();
        let b = a.clone();
        assert_eq!(a.take_now("ip:1", limit(), 1_000), BucketTake::Taken);
        assert_eq!(b.take_now("ip:1", limit(), 1_000), BucketTake::Taken);
        assert!(matches!(
            a.take_now("ip:1", limit(), 1_000),
            BucketTake::Empty { .. }
        ));
        assert_eq!(b.take_now("ip:2", limit(), 1_000), BucketTake::Taken);
        // Refilled after half the period: one token.
        assert_eq!(b.take_now("ip:1", limit(), 31_000), BucketTake::Taken);
    }

    #[test]
    fn buckets_stay_bounded() {
        let a = ProcessBuckets::default();
        for i in 0..MAX_BUCKETS + 10 {
            a.take_now(&format!("ip:{i}"), limit(), i as u64);
        }
        assert_eq!(a.len(), MAX_BUCKETS);
    }

    #[test]
    fn tokens_are_shared_until_they_expire_and_stay_bounded() {
        let a = ProcessTokens::default();
        let b = a.clone();
        let token = |t: &str, until: u64| StoredToken {
            token: crate::core::config::value::Secret::new(t.to_string()),
            valid_until_ms: until,
        };
        a.put("hub", "repo:x:pull", &token("t1", 5_000))
            .now_or_never()
            .expect("ready")
            .expect("put");
        let got = b
            .get("hub", "repo:x:pull", 1_000)
            .now_or_never()
            .expect("ready");
        assert_eq!(
            got.expect("get").map(|t| t.token.expose().to_string()),
            Some("t1".to_string())
        );
        let expired = b
            .get("hub", "repo:x:pull", 5_000)
            .now_or_never()
            .expect("ready");
        assert!(expired.expect("get").is_none());
        let other = b
            .get("hub", "repo:y:pull", 1_000)
            .now_or_never()
            .expect("ready");
        assert!(other.expect("get").is_none());
        let far = now_ms() + 3_600_000;
        for i in 0..MAX_TOKENS + 5 {
            a.put("hub", &format!("s{i}"), &token("t", far + i as u64))
                .now_or_never()
                .expect("ready")
                .expect("put");
        }
        assert_eq!(lock(&a.tokens).len(), MAX_TOKENS);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn followers_on_other_threads_get_the_leads_outcome() {
        let flights = ProcessTagFlights::new(60_000);
        let TagFlight::Lead(lease) = flights.enter("k").now_or_never().expect("ready") else {
            panic!("the first enter leads");
        };
        let (entered, all_entered) = std::sync::mpsc::channel();
        let followers: Vec<_> = (0..3)
            .map(|_| {
                let f = flights.clone();
                let entered = entered.clone();
                std::thread::spawn(move || {
                    let flight = f.enter("k").now_or_never().expect("ready");
                    entered.send(()).expect("send");
                    match flight {
                        TagFlight::Follow(outcome) => rt().block_on(outcome),
                        TagFlight::Lead(_) => panic!("a second enter follows"),
                    }
                })
            })
            .collect();
        for _ in 0..3 {
            all_entered.recv().expect("entered");
        }
        // Another key is independent.
        assert!(matches!(
            flights.enter("other").now_or_never(),
            Some(TagFlight::Lead(_))
        ));
        let resolved = TagOutcome::Resolved {
            digest: "sha256:ab".into(),
        };
        lease.publish(resolved.clone()).now_or_never();
        for f in followers {
            assert_eq!(f.join().expect("thread"), resolved);
        }
        // The flight ended: the next enter leads again.
        assert!(matches!(
            flights.enter("k").now_or_never(),
            Some(TagFlight::Lead(_))
        ));
    }

    #[test]
    fn a_dropped_lead_releases_its_followers_with_unknown() {
        let flights = ProcessTagFlights::new(60_000);
        let lead = flights.enter("k").now_or_never().expect("ready");
        let TagFlight::Follow(outcome) = flights.enter("k").now_or_never().expect("ready") else {
            panic!("follows");
        };
        drop(lead);
        assert_eq!(rt().block_on(outcome), TagOutcome::Unknown);
    }

    #[test]
    fn an_expired_lead_releases_its_followers() {
        let flights = ProcessTagFlights::new(30);
        let _lead = flights.enter("k").now_or_never().expect("ready");
        let TagFlight::Follow(outcome) = flights.enter("k").now_or_never().expect("ready") else {
            panic!("follows");
        };
        // Bounded by the 30 ms lease, not by the lead (still held).
        assert_eq!(rt().block_on(outcome), TagOutcome::Unknown);
    }
}
