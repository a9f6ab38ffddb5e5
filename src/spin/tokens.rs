//! [`SpinTokens`]: upstream bearer tokens ([`TokenStore`]) in the Spin key-value store, so
//! pulls reuse one token across requests (each Spin request is a fresh instance) until it
//! expires, instead of asking the token endpoint on every request.
//!
//! One record per (upstream, scope), `~token/<hash of both>`, holding the token and the time
//! the core stops using it (the token's `expires_in`, shortened for clock skew by the core).
//! An expired record is deleted when it is next read; a new token replaces it.
//!
//! Tokens are secrets: they are kept only in the component's own key-value store (the same
//! store as the cache, `default`; give it a backend only this application reads), under a key
//! that does not name the repository, and never reach an error or the log — errors name only
//! the record key. Whoever can read the store can read a token: a pull token for the scopes
//! the configured upstream credentials grant, valid for its remaining lifetime.
//!
//! # Accuracy
//! Two requests that both miss at the same moment both fetch a token, and the second `set`
//! wins; both tokens are valid, so nothing breaks (one extra token request). Instances on
//! different machines compare their wall clocks with the stored expiry.

use crate::core::config::Secret;
use crate::core::ports::{StoreError, StoredToken, TokenStore};
use crate::spin::kv::{kv_err, PRIVATE_PREFIX};
use sha2::{Digest as _, Sha256};
use spin_sdk::key_value::Store;
use std::rc::Rc;

/// A stored token.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    /// Format version.
    v: u32,
    /// The bearer token.
    token: String,
    /// Valid until (ms since the epoch).
    valid_until_ms: u64,
}

/// Upstream tokens in a Spin key-value store.
pub struct SpinTokens {
    store: Rc<Store>,
}

impl SpinTokens {
    /// Tokens in `store`.
    pub fn new(store: Rc<Store>) -> SpinTokens {
        SpinTokens { store }
    }
}

/// The record key of (`upstream`, `scope`).
fn record_key(upstream: &str, scope: &str) -> String {
    let mut h = Sha256::new();
    h.update(upstream.as_bytes());
    h.update([0]);
    h.update(scope.as_bytes());
    format!("{PRIVATE_PREFIX}token/{}", hex::encode(&h.finalize()[..16]))
}

#[async_trait::async_trait(?Send)]
impl TokenStore for SpinTokens {
    async fn get(
        &self,
        upstream: &str,
        scope: &str,
        now_ms: u64,
    ) -> Result<Option<StoredToken>, StoreError> {
        let key = record_key(upstream, scope);
        let Some(value) = self.store.get(&key).map_err(|e| kv_err("get", &key, e))? else {
            return Ok(None);
        };
        let record = serde_json::from_slice::<Record>(&value)
            .ok()
            .filter(|r| r.v == 1 && r.valid_until_ms > now_ms);
        match record {
            Some(r) => Ok(Some(StoredToken {
                token: Secret::new(r.token),
                valid_until_ms: r.valid_until_ms,
            })),
            None => {
                // Expired (or another format): best effort, a new token replaces it anyway.
                let _ = self.store.delete(&key);
                Ok(None)
            }
        }
    }

    async fn put(
        &self,
        upstream: &str,
        scope: &str,
        token: &StoredToken,
    ) -> Result<(), StoreError> {
        let key = record_key(upstream, scope);
        let record = Record {
            v: 1,
            token: token.token.expose().to_string(),
            valid_until_ms: token.valid_until_ms,
        };
        // serde_json's errors never quote the value they failed on.
        let value = serde_json::to_vec(&record).map_err(|e| kv_err("encode", &key, e))?;
        self.store
            .set(&key, &value)
            .map_err(|e| kv_err("set", &key, e))
    }
}
