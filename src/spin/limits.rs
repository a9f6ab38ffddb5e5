//! [`SpinRateLimits`]: the core's rate-limit buckets ([`RateLimitStore`]) in the Spin
//! key-value store, so a configured `[rate_limit]` holds across requests (each Spin request is
//! a fresh instance, whose in-memory buckets would start full every time).
//!
//! One record per bucket key, `~rate/<hash of the key>` (the key names a client address or an
//! identity; hashing keeps it within Spin's key length and out of the key names), holding the
//! bucket's tokens and the time they were computed. A take reads the record, applies the
//! core's refill rule ([`BucketState::take`]) and writes it back.
//!
//! # Accuracy
//! Spin's key-value interface has `get` and `set` but no compare-and-swap, so a take is a
//! read-modify-write that is not atomic:
//! - Requests to one key that do not overlap are counted exactly.
//! - Requests to one key that overlap (a second read lands between the first's read and its
//!   write) may take the same token: each of them is admitted, and the bucket loses one token
//!   instead of several. So a burst of `c` concurrent requests may admit up to `c − 1` more
//!   than the limit. A lost update only ever leaves *more* tokens than a serial count, so a
//!   request a serial bucket would admit is never refused.
//! - Instances on different machines (SpinKube replicas over one Redis) compare wall clocks: a
//!   clock behind the bucket's refills nothing until it catches up; a clock ahead refills
//!   early, by its skew.
//! - A store error admits the request (the core fails open) and logs the error here, without
//!   the key.
//!
//! # Limitations
//! - Spin's store has no TTL: one small record stays per client address or identity ever
//!   limited (a full bucket is the same as none, but nothing deletes it). Purge `~rate/`
//!   keys with the store's own tools if a scan of many addresses fills it.
//! - Login lockouts are not shared: they stay per instance, so per request on Spin.

use crate::core::ports::{BucketLimit, BucketState, BucketTake, RateLimitStore, StoreError};
use crate::spin::kv::{kv_err, PRIVATE_PREFIX};
use sha2::{Digest as _, Sha256};
use spin_sdk::key_value::Store;
use std::rc::Rc;

/// A stored bucket.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    /// Format version.
    v: u32,
    /// Tokens left.
    tokens: f64,
    /// When `tokens` was computed (ms since the epoch).
    at_ms: u64,
}

/// The rate-limit buckets in a Spin key-value store.
pub struct SpinRateLimits {
    store: Rc<Store>,
}

impl SpinRateLimits {
    /// Buckets in `store`.
    pub fn new(store: Rc<Store>) -> SpinRateLimits {
        SpinRateLimits { store }
    }
}

/// The record key of bucket `key`.
fn record_key(key: &str) -> String {
    format!(
        "{PRIVATE_PREFIX}rate/{}",
        hex::encode(&Sha256::digest(key.as_bytes())[..16])
    )
}

impl SpinRateLimits {
    fn take_now(
        &self,
        key: &str,
        limit: BucketLimit,
        now_ms: u64,
    ) -> Result<BucketTake, StoreError> {
        let rk = record_key(key);
        let stored = self.store.get(&rk).map_err(|e| kv_err("get", &rk, e))?;
        // An unreadable record (another format) is a full bucket, not an error forever.
        let mut bucket = stored
            .and_then(|v| serde_json::from_slice::<Record>(&v).ok())
            .filter(|r| r.v == 1 && r.tokens.is_finite())
            .map(|r| BucketState {
                tokens: r.tokens,
                at_ms: r.at_ms,
            })
            .unwrap_or_else(|| BucketState::full(limit, now_ms));
        let taken = bucket.take(limit, now_ms);
        let record = Record {
            v: 1,
            tokens: bucket.tokens,
            at_ms: bucket.at_ms,
        };
        let value = serde_json::to_vec(&record).map_err(|e| kv_err("encode", &rk, e))?;
        self.store
            .set(&rk, &value)
            .map_err(|e| kv_err("set", &rk, e))?;
        Ok(taken)
    }
}

#[async_trait::async_trait(?Send)]
impl RateLimitStore for SpinRateLimits {
    async fn take(
        &self,
        key: &str,
        limit: BucketLimit,
        now_ms: u64,
    ) -> Result<BucketTake, StoreError> {
        self.take_now(key, limit, now_ms).inspect_err(|e| {
            eprintln!("pullgate: rate limit not applied (admitted): {e}");
        })
    }
}
