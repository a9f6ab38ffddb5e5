//! Token-bucket rate limits per key (identity or client IP), and failed-login lockouts per
//! key (client IP, user name), decided from the clock port's time. Per core instance, unless
//! the host hands the core a [`RateLimitStore`] (Spin: its key-value store), which then keeps
//! the buckets (the refill rule is [`BucketState::take`] either way), or a [`LoginLockouts`]
//! table other instances also use (native: one per process, so the serving threads share it).
//! How exact a shared store is under concurrency is documented by each host.
//!
//! Lockouts: after [`LoginPolicy::failures`] failed logins for a key, the key is locked for
//! [`LoginPolicy::lockout_ms`], doubled by each further failure up to
//! [`LoginPolicy::max_lockout_ms`]; a success clears the key, and a key with no failure for
//! `max_lockout_ms` after its last lockout ended is forgotten. Checks still in flight count
//! against the budget, so a burst of concurrent logins cannot all be checked before the first
//! failure is recorded: at most `failures` checks (one, once locked before) run per key.

use crate::core::ports::{BucketLimit, BucketState, BucketTake, RateLimitStore};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};

/// Most keys tracked; the stalest are dropped beyond it.
const MAX_KEYS: usize = 10_000;

/// A rate: `n` per `per_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests.
    pub n: u32,
    /// Per this many ms.
    pub per_ms: u64,
}

impl Rate {
    /// This rate as a bucket limit holding at most `burst` tokens.
    pub fn limit(self, burst: u32) -> BucketLimit {
        BucketLimit {
            n: self.n,
            per_ms: self.per_ms,
            burst,
        }
    }
}

/// The instance's shared bucket store, kept in a typed slot: a host whose instances share
/// nothing in memory (Spin) sets one (`App::with_rate_limits`); without one the buckets are
/// the [`Limiter`]'s, in memory.
#[derive(Default)]
pub(crate) struct RateLimitPort(pub RefCell<Option<Rc<dyn RateLimitStore>>>);

/// Parses `20/s`, `600/m`, `10000/h`.
pub fn parse_rate(s: &str) -> Option<Rate> {
    let (n, unit) = s.trim().split_once('/')?;
    let n: u32 = n.trim().parse().ok().filter(|&n| n > 0)?;
    let per_ms = match unit.trim() {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(Rate { n, per_ms })
}

/// When failed logins lock a key (an address, a user name) out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginPolicy {
    /// Failures (checks in flight included) before the first lockout; 0 turns lockouts off.
    pub failures: u32,
    /// The first lockout; each further failure doubles it.
    pub lockout_ms: u64,
    /// The longest lockout, and how long after a lockout a key's failures are remembered.
    pub max_lockout_ms: u64,
}

impl Default for LoginPolicy {
    fn default() -> Self {
        LoginPolicy {
            failures: 5,
            lockout_ms: 1_000,
            max_lockout_ms: 300_000,
        }
    }
}

impl LoginPolicy {
    /// How long `count` failures lock a key (0 below the threshold).
    pub fn lockout_for(&self, count: u32) -> u64 {
        if self.failures == 0 || count < self.failures {
            return 0;
        }
        let doublings = (count - self.failures).min(40);
        self.lockout_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_lockout_ms)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Failures {
    count: u32,
    /// Checks begun and not yet ended.
    pending: u32,
    locked_until_ms: u64,
    last_ms: u64,
}

impl Failures {
    fn forgotten(&self, p: LoginPolicy, now_ms: u64) -> bool {
        self.pending == 0
            && now_ms
                >= self
                    .last_ms
                    .max(self.locked_until_ms)
                    .saturating_add(p.max_lockout_ms)
    }
}

/// Rate-limit buckets by key.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: HashMap<String, BucketState>,
}

/// Failed logins by key: the lockout rule over one table.
#[derive(Debug, Default)]
pub struct LoginTable {
    failures: HashMap<String, Failures>,
}

/// The login lockout table a core instance checks logins against, shareable: clones use the
/// same table. An instance has one of its own unless the host hands it one its other
/// instances also use ([`App::with_login_lockouts`](crate::core::app::App::with_login_lockouts)).
/// The lock is held for a few map operations, never across an await.
#[derive(Debug, Clone, Default)]
pub struct LoginLockouts(Arc<Mutex<LoginTable>>);

impl LoginLockouts {
    fn table(&self) -> MutexGuard<'_, LoginTable> {
        // Every update is a few map operations: a panicking holder leaves it consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`LoginTable::begin`] on the shared table.
    pub fn begin(&self, keys: &[String], p: LoginPolicy, now_ms: u64) -> Result<(), u64> {
        self.table().begin(keys, p, now_ms)
    }

    /// [`LoginTable::end`] on the shared table.
    pub fn end(&self, keys: &[String], ok: bool, p: LoginPolicy, now_ms: u64) {
        self.table().end(keys, ok, p, now_ms)
    }

    /// [`LoginTable::cancel`] on the shared table.
    pub fn cancel(&self, keys: &[String]) {
        self.table().cancel(keys)
    }
}

/// The instance's login lockout table, kept in a typed slot (see [`LoginLockouts`]).
#[derive(Default)]
pub(crate) struct LoginPort(pub RefCell<LoginLockouts>);

impl Limiter {
    /// Takes one token for `key`; Err(ms until one is available) when empty.
    pub fn take(&mut self, key: &str, rate: Rate, burst: u32, now_ms: u64) -> Result<(), u64> {
        let limit = rate.limit(burst);
        if self.buckets.len() >= MAX_KEYS && !self.buckets.contains_key(key) {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.at_ms)
                .map(|(k, _)| k.clone())
            {
                self.buckets.remove(&oldest);
            }
        }
        let b = self
            .buckets
            .entry(key.to_string())
            .or_insert(BucketState::full(limit, now_ms));
        match b.take(limit, now_ms) {
            BucketTake::Taken => Ok(()),
            BucketTake::Empty { retry_after_ms } => Err(retry_after_ms),
        }
    }
}

impl LoginTable {
    /// Before checking credentials for `keys`: Err(ms to wait) when any key is locked out, or
    /// when the checks already in flight for it use up its budget; otherwise reserves one check
    /// on every key, which [`LoginTable::end`] or [`LoginTable::cancel`] must release.
    pub fn begin(&mut self, keys: &[String], p: LoginPolicy, now_ms: u64) -> Result<(), u64> {
        if p.failures == 0 {
            return Ok(());
        }
        let mut wait = 0u64;
        for key in keys {
            let Some(f) = self.failures.get(key).copied() else {
                continue;
            };
            if f.forgotten(p, now_ms) {
                self.failures.remove(key);
                continue;
            }
            if f.locked_until_ms > now_ms {
                wait = wait.max(f.locked_until_ms - now_ms);
                continue;
            }
            // Below the threshold, the rest of the budget may run at once; a key that was
            // locked before gets one check at a time.
            let budget = p.failures.saturating_sub(f.count).max(1);
            if f.pending >= budget {
                wait = wait.max(p.lockout_ms.max(1));
            }
        }
        if wait > 0 {
            return Err(wait);
        }
        for key in keys {
            self.make_room(key, p, now_ms);
            let f = self.failures.entry(key.clone()).or_default();
            f.pending += 1;
        }
        Ok(())
    }

    /// Ends the checks [`LoginTable::begin`] reserved: a success clears the keys, a failure
    /// counts against them (and may lock them out).
    pub fn end(&mut self, keys: &[String], ok: bool, p: LoginPolicy, now_ms: u64) {
        if p.failures == 0 {
            return;
        }
        for key in keys {
            if ok {
                self.failures.remove(key);
                continue;
            }
            let f = self.failures.entry(key.clone()).or_default();
            f.pending = f.pending.saturating_sub(1);
            f.count = f.count.saturating_add(1);
            f.last_ms = now_ms;
            let lock = p.lockout_for(f.count);
            if lock > 0 {
                f.locked_until_ms = now_ms.saturating_add(lock);
            }
        }
    }

    /// Releases reserved checks that never finished (the client went away mid-check).
    pub fn cancel(&mut self, keys: &[String]) {
        for key in keys {
            if let Some(f) = self.failures.get_mut(key) {
                f.pending = f.pending.saturating_sub(1);
            }
        }
    }

    /// Keeps the failure table bounded: at the cap, drops the entry idle longest (never one
    /// with a check in flight).
    fn make_room(&mut self, key: &str, p: LoginPolicy, now_ms: u64) {
        if self.failures.len() < MAX_KEYS || self.failures.contains_key(key) {
            return;
        }
        self.failures.retain(|_, f| !f.forgotten(p, now_ms));
        if self.failures.len() < MAX_KEYS {
            return;
        }
        if let Some(stalest) = self
            .failures
            .iter()
            .filter(|(_, f)| f.pending == 0)
            .min_by_key(|(_, f)| f.last_ms.max(f.locked_until_ms))
            .map(|(k, _)| k.clone())
        {
            self.failures.remove(&stalest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_with_time() {
        let rate = parse_rate("2/s").unwrap();
        let mut l = Limiter::default();
        assert!(l.take("a", rate, 2, 0).is_ok());
        assert!(l.take("a", rate, 2, 0).is_ok());
        let wait = l.take("a", rate, 2, 0).unwrap_err();
        assert_eq!(wait, 500);
        assert!(l.take("b", rate, 2, 0).is_ok(), "keys are separate");
        assert!(l.take("a", rate, 2, 499).is_err());
        assert!(l.take("a", rate, 2, 1000).is_ok());
        assert_eq!(
            parse_rate("600/m"),
            Some(Rate {
                n: 600,
                per_ms: 60_000
            })
        );
        assert!(parse_rate("0/s").is_none() && parse_rate("5/d").is_none());
    }

    #[test]
    fn a_clock_behind_the_bucket_refills_nothing_and_does_not_move_it_back() {
        // Shared buckets (one record read by instances on several machines) see clocks that
        // disagree: a clock behind the record's time must not earn tokens later.
        let limit = parse_rate("1/s").unwrap().limit(1);
        let mut b = BucketState::full(limit, 10_000);
        assert_eq!(b.take(limit, 10_000), BucketTake::Taken);
        assert_eq!(
            b.take(limit, 9_000),
            BucketTake::Empty {
                retry_after_ms: 1_000
            }
        );
        assert_eq!(b.at_ms, 10_000, "not moved back");
        assert!(matches!(b.take(limit, 10_500), BucketTake::Empty { .. }));
        assert_eq!(b.take(limit, 11_000), BucketTake::Taken);
    }

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    fn fail(l: &mut LoginTable, k: &[String], p: LoginPolicy, now: u64) {
        l.begin(k, p, now).expect("not locked");
        l.end(k, false, p, now);
    }

    #[test]
    fn lockout_starts_after_the_free_failures_and_doubles_up_to_the_cap() {
        let p = LoginPolicy {
            failures: 3,
            lockout_ms: 1_000,
            max_lockout_ms: 5_000,
        };
        assert_eq!(
            (0..8).map(|c| p.lockout_for(c)).collect::<Vec<_>>(),
            vec![0, 0, 0, 1_000, 2_000, 4_000, 5_000, 5_000]
        );
        let mut l = LoginTable::default();
        let k = keys(&["ip:192.0.2.1", "name:alice"]);
        for _ in 0..3 {
            fail(&mut l, &k, p, 0);
        }
        assert_eq!(l.begin(&k, p, 0), Err(1_000), "locked after 3");
        assert_eq!(l.begin(&k, p, 999), Err(1));
        fail(&mut l, &k, p, 1_000);
        assert_eq!(l.begin(&k, p, 1_000), Err(2_000), "doubled");
        assert_eq!(
            l.begin(&keys(&["name:alice"]), p, 2_000),
            Err(1_000),
            "the name alone is locked too"
        );
        assert!(
            l.begin(&keys(&["ip:192.0.2.2", "name:bob"]), p, 2_000)
                .is_ok(),
            "other keys are free"
        );
        // A success clears the keys it was checked under.
        l.begin(&k, p, 3_000).expect("lock over");
        l.end(&k, true, p, 3_000);
        for _ in 0..3 {
            fail(&mut l, &k, p, 3_000);
        }
        assert_eq!(l.begin(&k, p, 3_000), Err(1_000), "counting from zero");
    }

    #[test]
    fn checks_in_flight_count_against_the_budget() {
        let p = LoginPolicy {
            failures: 2,
            lockout_ms: 1_000,
            max_lockout_ms: 4_000,
        };
        let mut l = LoginTable::default();
        let k = keys(&["ip:192.0.2.1"]);
        assert!(l.begin(&k, p, 0).is_ok());
        assert!(l.begin(&k, p, 0).is_ok());
        assert_eq!(l.begin(&k, p, 0), Err(1_000), "two in flight: no third");
        l.cancel(&k);
        assert!(
            l.begin(&k, p, 0).is_ok(),
            "a cancelled check frees its slot"
        );
        l.end(&k, false, p, 0);
        l.end(&k, false, p, 0);
        assert_eq!(l.begin(&k, p, 0), Err(1_000));
        // After the lockout, one check at a time.
        assert!(l.begin(&k, p, 1_000).is_ok());
        assert_eq!(l.begin(&k, p, 1_000), Err(1_000));
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_max_lockout() {
        let p = LoginPolicy {
            failures: 2,
            lockout_ms: 1_000,
            max_lockout_ms: 4_000,
        };
        let mut l = LoginTable::default();
        let k = keys(&["name:alice"]);
        fail(&mut l, &k, p, 0);
        fail(&mut l, &k, p, 0);
        // Locked until 1_000; remembered until 5_000.
        fail(&mut l, &k, p, 4_999);
        assert_eq!(l.begin(&k, p, 4_999), Err(2_000), "still remembered");
        let mut l = LoginTable::default();
        fail(&mut l, &k, p, 0);
        fail(&mut l, &k, p, 0);
        fail(&mut l, &k, p, 5_000);
        assert!(
            l.begin(&k, p, 5_000).is_ok(),
            "forgotten: the third failure is the first again"
        );
    }

    #[test]
    fn lockouts_off_and_the_table_stays_bounded() {
        let off = LoginPolicy {
            failures: 0,
            ..LoginPolicy::default()
        };
        let mut l = LoginTable::default();
        let k = keys(&["ip:192.0.2.1"]);
        for _ in 0..100 {
            fail(&mut l, &k, off, 0);
        }
        assert!(l.failures.is_empty());
        let p = LoginPolicy::default();
        for i in 0..(MAX_KEYS + 10) {
            fail(&mut l, &keys(&[&format!("name:u{i}")]), p, i as u64);
        }
        assert!(l.failures.len() <= MAX_KEYS);
    }
}
