//! Native metadata: redb (`meta.redb`) behind the `KvStore` port, one clone per worker thread,
//! each with a small read cache kept coherent across clones (see [`RedbKv`]).

use super::shared::lock;
use super::store::{blocking, store_err};
use crate::core::ports::{KvStore, StoreError};
use redb::{Database, TableDefinition};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// redb's page cache: metadata is small, and the memory target is tight.
const REDB_CACHE: usize = 16 << 20;
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// Values larger than this are never kept in a [`RedbKv`]'s read cache.
pub(crate) const READ_CACHE_VALUE_MAX: usize = 64 << 10;
/// Bytes (keys and values) one [`RedbKv`] clone keeps cached before it starts over.
const READ_CACHE_BYTES: usize = 2 << 20;

/// Metadata in redb. Clones share the database: one per worker thread.
///
/// Each clone keeps a small read cache (a warm manifest by tag is three reads; a redb read
/// transaction and table open cost more than the rest of the request). It is coherent across
/// clones: every write through any clone bumps a shared generation *after* its commit, and a
/// clone drops its whole cache when it sees a new generation. An entry is tagged with the
/// generation seen *before* its read, so a read racing a commit is dropped at the next
/// lookup, and a `get` that starts after a `put` returned never sees the old value. Only this
/// process writes the database (redb locks the file), so no write bypasses the generation.
pub struct RedbKv {
    db: Arc<Database>,
    path: PathBuf,
    writes: Arc<AtomicU64>,
    cache: RefCell<ReadCache>,
    tallies: Arc<Mutex<Vec<Tally>>>,
}

/// Records and value bytes under one key prefix, counted once by [`RedbKv::track`] and then
/// kept by every write (so `/metrics` does not scan every manifest on every scrape).
struct Tally {
    prefix: String,
    records: u64,
    bytes: u64,
}

/// What one write does to one key: its value's length before and after (None: absent).
struct Change {
    key: String,
    before: Option<u64>,
    after: Option<u64>,
}

impl Change {
    /// The same change undone.
    fn reverse(self) -> Change {
        Change {
            before: self.after,
            after: self.before,
            ..self
        }
    }
}

impl Tally {
    fn apply(&mut self, c: &Change) {
        if !c.key.starts_with(&self.prefix) {
            return;
        }
        let count = |v: Option<u64>| u64::from(v.is_some());
        self.records = (self.records + count(c.after)).saturating_sub(count(c.before));
        self.bytes = (self.bytes + c.after.unwrap_or(0)).saturating_sub(c.before.unwrap_or(0));
    }
}

impl Clone for RedbKv {
    /// A clone shares the database and the write generation, with a cache of its own.
    fn clone(&self) -> Self {
        RedbKv {
            db: self.db.clone(),
            path: self.path.clone(),
            writes: self.writes.clone(),
            cache: RefCell::new(ReadCache::default()),
            tallies: self.tallies.clone(),
        }
    }
}

/// Recently read records (present or absent) as of one write generation.
#[derive(Default)]
struct ReadCache {
    generation: u64,
    bytes: usize,
    entries: HashMap<String, Option<Vec<u8>>>,
}

impl ReadCache {
    /// Forgets everything unless it is as of `generation`.
    fn at(&mut self, generation: u64) -> &mut ReadCache {
        if self.generation != generation {
            self.entries.clear();
            self.bytes = 0;
            self.generation = generation;
        }
        self
    }

    fn keep(&mut self, key: &str, value: &Option<Vec<u8>>) {
        let size = key.len() + value.as_ref().map_or(0, Vec::len);
        if value
            .as_ref()
            .is_some_and(|v| v.len() > READ_CACHE_VALUE_MAX)
        {
            return;
        }
        if self.bytes + size > READ_CACHE_BYTES {
            self.entries.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        self.entries.insert(key.to_string(), value.clone());
    }
}

impl RedbKv {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<RedbKv, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(REDB_CACHE)
            .create(path)
            .map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(KV).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        Ok(RedbKv {
            db: Arc::new(db),
            path: path.to_path_buf(),
            writes: Arc::new(AtomicU64::new(0)),
            cache: RefCell::new(ReadCache::default()),
            tallies: Arc::default(),
        })
    }

    /// Counts `prefix` now and keeps the count with every write from then on, for
    /// [`prefix_usage`](Self::prefix_usage). Called at startup, before anything writes: a
    /// write committed while the count runs could be counted twice or not at all.
    pub fn track(&self, prefix: &str) -> Result<(), StoreError> {
        let (records, bytes) = self.scan(prefix)?;
        let mut kept = lock(&self.tallies);
        kept.retain(|t| t.prefix != prefix);
        kept.push(Tally {
            prefix: prefix.to_string(),
            records,
            bytes,
        });
        Ok(())
    }

    /// (records, value bytes) under `prefix` (`/metrics`: manifests by digest): the kept
    /// count of a [`track`](Self::track)ed prefix (a lock, no read), else a scan of its range.
    pub fn prefix_usage(&self, prefix: &str) -> Result<(u64, u64), StoreError> {
        if let Some(t) = lock(&self.tallies).iter().find(|t| t.prefix == prefix) {
            return Ok((t.records, t.bytes));
        }
        self.scan(prefix)
    }

    /// (records, value bytes) under `prefix`, counted: one read transaction over that range.
    fn scan(&self, prefix: &str) -> Result<(u64, u64), StoreError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(KV).map_err(store_err)?;
        let (mut n, mut bytes) = (0u64, 0u64);
        for entry in table.range(prefix..).map_err(store_err)? {
            let (k, v) = entry.map_err(store_err)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            n += 1;
            bytes += v.value().len() as u64;
        }
        Ok((n, bytes))
    }

    /// Commits one write to one key, then tells every clone's cache that it is out of date
    /// and the tallies what changed.
    async fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<Change, StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        let (db, writes, kept) = (self.db.clone(), self.writes.clone(), self.tallies.clone());
        blocking(move || {
            let tx = db.begin_write().map_err(store_err)?;
            let change = f(&tx)?;
            // Counted before the commit and taken back if it fails: the tallies never miss a
            // committed write, and the lock is not held while the commit reaches the disk (a
            // `/metrics` request reads them on a serving thread).
            lock(&kept).iter_mut().for_each(|t| t.apply(&change));
            let committed = tx.commit().map_err(store_err);
            // Even a failed commit may have changed what a read sees: bump either way.
            writes.fetch_add(1, Ordering::AcqRel);
            if committed.is_err() {
                let undo = change.reverse();
                lock(&kept).iter_mut().for_each(|t| t.apply(&undo));
            }
            committed
        })
        .await
    }

    /// Size of the database file (live records, free pages and redb's own overhead).
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}

#[async_trait::async_trait(?Send)]
impl KvStore for RedbKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        // The generation is read before the database, so a write committed meanwhile makes
        // the next lookup drop what this read keeps.
        let generation = self.writes.load(Ordering::Acquire);
        if let Some(v) = self.cache.borrow_mut().at(generation).entries.get(key) {
            return Ok(v.clone());
        }
        // Reads are served from redb's page cache; cheaper inline than a thread hop.
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(KV).map_err(store_err)?;
        let v = table
            .get(key)
            .map_err(store_err)?
            .map(|v| v.value().to_vec());
        self.cache.borrow_mut().at(generation).keep(key, &v);
        Ok(v)
    }

    /// The generation the read cache keeps to (bumped after every commit through any clone).
    fn generation(&self) -> Option<u64> {
        Some(self.writes.load(Ordering::Acquire))
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.write(move |tx| {
            let mut t = tx.open_table(KV).map_err(store_err)?;
            let before = t
                .insert(key.as_str(), value.as_slice())
                .map_err(store_err)?
                .map(|old| old.value().len() as u64);
            Ok(Change {
                before,
                after: Some(value.len() as u64),
                key,
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        self.write(move |tx| {
            let mut t = tx.open_table(KV).map_err(store_err)?;
            let before = t
                .remove(key.as_str())
                .map_err(store_err)?
                .map(|old| old.value().len() as u64);
            Ok(Change {
                before,
                after: None,
                key,
            })
        })
        .await
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(KV).map_err(store_err)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..).map_err(store_err)? {
            let (k, _) = entry.map_err(store_err)?;
            let k = k.value();
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push(k.to_string());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_tally_kept_by_writes_matches_a_fresh_count() {
        let dir = tempfile::tempdir().expect("temp dir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let kv = RedbKv::open(&dir.path().join("meta.redb")).expect("open");
            let other = kv.clone();
            kv.put("m/a", b"12345").await.expect("put");
            kv.put("n/x", b"elsewhere").await.expect("put");
            kv.track("m/").expect("track");
            assert_eq!(kv.prefix_usage("m/").expect("usage"), (1, 5), "counted");
            // Writes through any clone keep it: a new key, a longer and a shorter value over
            // old ones, a deletion, a deletion of nothing, and keys outside the prefix.
            other.put("m/b", b"123").await.expect("put");
            kv.put("m/a", b"1234567890").await.expect("put");
            other.put("m/b", b"1").await.expect("put");
            kv.put("m/c", b"xy").await.expect("put");
            other.delete("m/c").await.expect("delete");
            kv.delete("m/never").await.expect("delete");
            kv.put("n/y", b"not counted").await.expect("put");
            kv.delete("n/x").await.expect("delete");
            let kept = other.prefix_usage("m/").expect("usage");
            assert_eq!(kept, (2, 11));
            assert_eq!(
                kept,
                kv.scan("m/").expect("scan"),
                "the same as counting again"
            );
        });
    }
}
