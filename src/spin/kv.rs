//! `SpinKv`: the core's key-value port over a Spin key-value store, within Spin's documented
//! limits: keys of at most 256 bytes (the core's keys are at most 250) and values of at most
//! 1 MB.
//!
//! Every stored value starts with one format byte ([`INLINE`] or [`CHUNKED`]). A value that
//! fits in [`MAX_INLINE`] bytes is stored inline under its own key. A larger one (a big
//! manifest, a gateway record) is split into chunks of at most [`MAX_INLINE`] bytes under
//! `~chunk/<hash of the key>/<hash of the value>/<n>`, written first, and its key then gets a
//! small record naming them; the chunks of the value it replaced are deleted after that. A
//! reader therefore sees the old value or the new one, never a mix (a reader racing the delete
//! of the old chunks gets an error, not wrong bytes). Keys starting with `~` belong to the
//! adapters and never appear in [`KvStore::list`].

use crate::core::ports::{KvStore, StoreError};
use sha2::{Digest as _, Sha256};
use spin_sdk::key_value::Store;

/// Format byte: the rest is the value.
const INLINE: u8 = 0;
/// Format byte: the rest is a [`ChunkRecord`] (JSON).
const CHUNKED: u8 = 1;
/// Largest value (or chunk) payload written under one key: under Spin's 1 MB with room for
/// the format byte.
pub const MAX_INLINE: usize = 960 * 1024;
/// Keys of the adapters' own records start with this; the core's never do.
pub const PRIVATE_PREFIX: &str = "~";

/// Where a chunked value's bytes are.
#[derive(serde::Serialize, serde::Deserialize)]
struct ChunkRecord {
    /// Format version.
    v: u32,
    /// Total length.
    len: u64,
    /// Number of chunks.
    chunks: u32,
    /// The chunk key prefix (`…/<n>` follows).
    prefix: String,
}

/// The key-value port over a Spin key-value store.
pub struct SpinKv {
    store: std::rc::Rc<Store>,
}

impl SpinKv {
    /// Wraps an open store.
    pub fn new(store: std::rc::Rc<Store>) -> SpinKv {
        SpinKv { store }
    }
}

pub(crate) fn kv_err(what: &str, key: &str, e: impl std::fmt::Debug) -> StoreError {
    StoreError(format!("Spin key-value {what} {key}: {e:?}"))
}

fn short_hash(data: &[u8]) -> String {
    hex::encode(&Sha256::digest(data)[..12])
}

impl SpinKv {
    fn raw_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(key).map_err(|e| kv_err("get", key, e))
    }

    fn raw_set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.store
            .set(key, value)
            .map_err(|e| kv_err("set", key, e))
    }

    fn raw_delete(&self, key: &str) -> Result<(), StoreError> {
        self.store.delete(key).map_err(|e| kv_err("delete", key, e))
    }

    /// The chunk record stored under `key`, if its value is chunked.
    fn record(&self, key: &str) -> Result<Option<ChunkRecord>, StoreError> {
        match self.raw_get(key)? {
            Some(v) if v.first() == Some(&CHUNKED) => serde_json::from_slice(&v[1..])
                .map(Some)
                .map_err(|e| kv_err("decode chunk record", key, e)),
            _ => Ok(None),
        }
    }

    fn delete_chunks(&self, record: &ChunkRecord) -> Result<(), StoreError> {
        for n in 0..record.chunks {
            self.raw_delete(&format!("{}/{n}", record.prefix))?;
        }
        Ok(())
    }
}

#[async_trait::async_trait(?Send)]
impl KvStore for SpinKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(v) = self.raw_get(key)? else {
            return Ok(None);
        };
        match v.first() {
            Some(&INLINE) => Ok(Some(v[1..].to_vec())),
            Some(&CHUNKED) => {
                let record: ChunkRecord = serde_json::from_slice(&v[1..])
                    .map_err(|e| kv_err("decode chunk record", key, e))?;
                let mut out = Vec::with_capacity(usize::try_from(record.len).unwrap_or(0));
                for n in 0..record.chunks {
                    let chunk_key = format!("{}/{n}", record.prefix);
                    let chunk = self.raw_get(&chunk_key)?.ok_or_else(|| {
                        kv_err(
                            "get",
                            &chunk_key,
                            "chunk missing (value replaced meanwhile?)",
                        )
                    })?;
                    out.extend_from_slice(&chunk);
                }
                if out.len() as u64 != record.len {
                    return Err(kv_err("get", key, "chunked value has the wrong length"));
                }
                Ok(Some(out))
            }
            _ => Err(kv_err("get", key, "unknown value format")),
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let old = self.record(key)?;
        let new_prefix = if value.len() <= MAX_INLINE {
            let mut stored = Vec::with_capacity(value.len() + 1);
            stored.push(INLINE);
            stored.extend_from_slice(value);
            self.raw_set(key, &stored)?;
            None
        } else {
            let prefix = format!(
                "{PRIVATE_PREFIX}chunk/{}/{}",
                short_hash(key.as_bytes()),
                short_hash(value)
            );
            let mut chunks = 0u32;
            for chunk in value.chunks(MAX_INLINE) {
                self.raw_set(&format!("{prefix}/{chunks}"), chunk)?;
                chunks += 1;
            }
            let record = ChunkRecord {
                v: 1,
                len: value.len() as u64,
                chunks,
                prefix: prefix.clone(),
            };
            let mut stored = vec![CHUNKED];
            stored.extend(serde_json::to_vec(&record).map_err(|e| kv_err("encode", key, e))?);
            self.raw_set(key, &stored)?;
            Some(prefix)
        };
        if let Some(old) = old {
            // Same bytes again reuse the same chunk keys: keep them.
            if new_prefix.as_deref() != Some(old.prefix.as_str()) {
                self.delete_chunks(&old)?;
            }
        }
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let old = self.record(key)?;
        self.raw_delete(key)?;
        if let Some(old) = old {
            self.delete_chunks(&old)?;
        }
        Ok(())
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        // Spin lists every key of a store at once; there is no prefix scan.
        let mut keys: Vec<String> = self
            .store
            .get_keys()
            .map_err(|e| kv_err("list", prefix, e))?
            .into_iter()
            .filter(|k| k.starts_with(prefix) && !k.starts_with(PRIVATE_PREFIX))
            .collect();
        keys.sort();
        keys.truncate(limit);
        Ok(keys)
    }
}
