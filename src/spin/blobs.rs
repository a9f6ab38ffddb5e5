//! `KvBlobStore`: the core's blob port inside the Spin key-value store, for deployments without
//! an object store. A blob is a head record `~blob/<hex>` (size, chunk count, where the chunks
//! are) and its bytes in chunks of [`MAX_INLINE`] bytes under
//! `~blobdata/<hex>/<writer id>/<n>`, each within Spin's 1 MB value limit.
//!
//! The `BlobWriter` contract: a writer feeds what it writes to the core's [`DigestCheck`]
//! (SHA-256 in wasm) and writes its chunks under its own writer id, where nothing reads them
//! but its own [`TailReader`]. Only `commit` with a matching digest writes the head record,
//! which is what makes the blob visible; one `set` of one key, so it appears whole or not at
//! all. A mismatch deletes the chunks and stores nothing. Two instances filling the same digest
//! each write their own chunks; the second to commit finds the head already there and drops
//! its own copy.
//!
//! Blobs larger than the configured cap (`pullgate_kv_blob_max_size`) are still staged chunk by
//! chunk while they stream, so a client that falls behind the core's in-memory window reads
//! them back instead of losing bytes, and they are still verified; but they never get a head
//! record, and their chunks are deleted when the request ends ([`KvBlobStore::end_request`]):
//! above the cap, Spin streams blobs through without caching them.
//!
//! # Limitations
//! - No eviction: blobs stay until purged (`DELETE` through the admin API) or removed from the
//!   store by other means. `max_size` is not enforced; the cap bounds each blob, not the total.
//! - Staged chunks of an instance that dies mid-fill (the runtime's request timeout) stay in
//!   the store with no head record pointing at them.
//! - Every read of a chunk reads the whole chunk value (up to 960 KiB), as Spin's key-value
//!   interface has no ranged reads.

use crate::core::digest_check::DigestCheck;
use crate::core::ports::{
    BlobStore, BlobWriter, BodyError, ByteStream, CommitError, StoreError, TailReader,
};
use crate::core::registry::reference::Digest;
use crate::spin::kv::{kv_err, MAX_INLINE, PRIVATE_PREFIX};
use bytes::Bytes;
use futures_util::StreamExt;
use spin_sdk::key_value::Store;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// A stored blob's head record.
#[derive(serde::Serialize, serde::Deserialize)]
struct Head {
    /// Format version.
    v: u32,
    /// Size in bytes.
    size: u64,
    /// Bytes per chunk (the last may be shorter).
    chunk: u64,
    /// Number of chunks.
    chunks: u64,
    /// Chunk key prefix (`…/<n>` follows).
    prefix: String,
}

/// The blob port over a Spin key-value store.
pub struct KvBlobStore {
    store: Rc<Store>,
    /// Largest blob kept; larger ones are streamed through.
    max_blob: u64,
    /// Staged chunks to delete when the request ends: (prefix, chunk count).
    cleanup: Rc<RefCell<Vec<(String, u64)>>>,
    /// Writers started by this instance (part of each writer id).
    writers: Cell<u64>,
}

impl KvBlobStore {
    /// Blobs in `store`, each kept only when at most `max_blob` bytes.
    pub fn new(store: Rc<Store>, max_blob: u64) -> KvBlobStore {
        KvBlobStore {
            store,
            max_blob,
            cleanup: Rc::new(RefCell::new(Vec::new())),
            writers: Cell::new(0),
        }
    }

    /// Deletes the staged chunks of blobs that were streamed through or committed twice.
    /// The host calls it once a request and all its deferred work are done.
    pub fn end_request(&self) {
        let pending = std::mem::take(&mut *self.cleanup.borrow_mut());
        for (prefix, chunks) in pending {
            delete_chunks(&self.store, &prefix, chunks);
        }
    }

    fn head(&self, digest: &Digest) -> Result<Option<Head>, StoreError> {
        let key = head_key(digest.hex());
        match self.store.get(&key).map_err(|e| kv_err("get", &key, e))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| kv_err("decode blob head", &key, e)),
        }
    }
}

fn head_key(hex: &str) -> String {
    format!("{PRIVATE_PREFIX}blob/{hex}")
}

fn delete_chunks(store: &Store, prefix: &str, chunks: u64) {
    for n in 0..chunks {
        // Best effort: a chunk left behind is garbage, not wrong data.
        let _ = store.delete(&format!("{prefix}/{n}"));
    }
}

fn read_chunk(store: &Store, prefix: &str, n: u64) -> Result<Vec<u8>, StoreError> {
    let key = format!("{prefix}/{n}");
    store
        .get(&key)
        .map_err(|e| kv_err("get", &key, e))?
        .ok_or_else(|| kv_err("get", &key, "blob chunk missing"))
}

#[async_trait::async_trait(?Send)]
impl BlobStore for KvBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(self.head(digest)?.map(|h| h.size))
    }

    async fn read(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Option<ByteStream>, StoreError> {
        let Some(head) = self.head(digest)? else {
            return Ok(None);
        };
        let end = end.min(head.size);
        if start >= end {
            return Ok(Some(futures_util::stream::empty().boxed_local()));
        }
        let store = self.store.clone();
        let stream = futures_util::stream::unfold(Some(start), move |pos| {
            let store = store.clone();
            let prefix = head.prefix.clone();
            let chunk = head.chunk;
            async move {
                let pos = pos?;
                if pos >= end {
                    return None;
                }
                let n = pos / chunk;
                match read_chunk(&store, &prefix, n) {
                    Ok(data) => {
                        let from = usize::try_from(pos - n * chunk).unwrap_or(usize::MAX);
                        let to = usize::try_from((end - n * chunk).min(chunk))
                            .unwrap_or(usize::MAX)
                            .min(data.len());
                        if from >= to {
                            return Some((Err(BodyError("blob chunk too short".into())), None));
                        }
                        let next = pos + (to - from) as u64;
                        Some((Ok(Bytes::from(data).slice(from..to)), Some(next)))
                    }
                    Err(e) => Some((Err(BodyError(e.to_string())), None)),
                }
            }
        });
        Ok(Some(stream.boxed_local()))
    }

    async fn delete(&self, digest: &Digest) -> Result<bool, StoreError> {
        let Some(head) = self.head(digest)? else {
            return Ok(false);
        };
        let key = head_key(digest.hex());
        self.store
            .delete(&key)
            .map_err(|e| kv_err("delete", &key, e))?;
        delete_chunks(&self.store, &head.prefix, head.chunks);
        Ok(true)
    }

    /// The size hint is not needed: chunks are written as they fill.
    async fn create(
        &self,
        digest: &Digest,
        _size: Option<u64>,
    ) -> Result<Box<dyn BlobWriter>, StoreError> {
        let hex = digest.hex();
        let n = self.writers.get() + 1;
        self.writers.set(n);
        // Unique per writer: random per instance (std seeds it from wasi:random), plus a count.
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            (hex, n),
        );
        let prefix = format!("{PRIVATE_PREFIX}blobdata/{hex}/{seed:016x}");
        let staged = Rc::new(Staged {
            store: self.store.clone(),
            prefix,
            chunks: Cell::new(0),
            buf: RefCell::new(Vec::new()),
            last: RefCell::new(None),
        });
        Ok(Box::new(KvBlobWriter {
            check: DigestCheck::new(digest),
            max_blob: self.max_blob,
            staged,
            cleanup: self.cleanup.clone(),
        }))
    }
}

/// The chunks a writer staged, and the bytes of its unfinished last chunk.
struct Staged {
    store: Rc<Store>,
    prefix: String,
    /// Full chunks written to the store.
    chunks: Cell<u64>,
    /// Bytes after the last full chunk.
    buf: RefCell<Vec<u8>>,
    /// The chunk the tail reader read last (chunk number, bytes).
    last: RefCell<Option<(u64, Bytes)>>,
}

impl Staged {
    fn write_chunk(&self, data: &[u8]) -> Result<(), StoreError> {
        let n = self.chunks.get();
        let key = format!("{}/{n}", self.prefix);
        self.store
            .set(&key, data)
            .map_err(|e| kv_err("set", &key, e))?;
        self.chunks.set(n + 1);
        Ok(())
    }
}

#[async_trait::async_trait(?Send)]
impl TailReader for Staged {
    async fn read_at(&self, offset: u64, max: usize) -> Result<Bytes, StoreError> {
        let chunk = MAX_INLINE as u64;
        let n = offset / chunk;
        let within = usize::try_from(offset - n * chunk).unwrap_or(usize::MAX);
        let data = if n < self.chunks.get() {
            let cached = self
                .last
                .borrow()
                .as_ref()
                .filter(|(c, _)| *c == n)
                .cloned();
            match cached {
                Some((_, b)) => b,
                None => {
                    let b = Bytes::from(read_chunk(&self.store, &self.prefix, n)?);
                    *self.last.borrow_mut() = Some((n, b.clone()));
                    b
                }
            }
        } else {
            Bytes::copy_from_slice(&self.buf.borrow())
        };
        if within >= data.len() {
            return Ok(Bytes::new());
        }
        let to = data.len().min(within.saturating_add(max));
        Ok(data.slice(within..to))
    }
}

/// A blob being written into the key-value store.
pub struct KvBlobWriter {
    /// The digest check; also counts the bytes written.
    check: DigestCheck,
    max_blob: u64,
    staged: Rc<Staged>,
    cleanup: Rc<RefCell<Vec<(String, u64)>>>,
}

impl KvBlobWriter {
    fn discard_later(&self) {
        self.cleanup
            .borrow_mut()
            .push((self.staged.prefix.clone(), self.staged.chunks.get()));
    }
}

#[async_trait::async_trait(?Send)]
impl BlobWriter for KvBlobWriter {
    async fn write(&mut self, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        for data in chunks {
            self.check.update(&data);
            let mut rest: &[u8] = &data;
            while !rest.is_empty() {
                let full = {
                    let mut buf = self.staged.buf.borrow_mut();
                    let take = (MAX_INLINE - buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    (buf.len() == MAX_INLINE).then(|| std::mem::take(&mut *buf))
                };
                if let Some(full) = full {
                    self.staged.write_chunk(&full)?;
                }
            }
        }
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), CommitError> {
        let size = self.check.len();
        let key = head_key(self.check.expected().hex());
        if let Err(e) = self.check.clone().finish() {
            delete_chunks(
                &self.staged.store,
                &self.staged.prefix,
                self.staged.chunks.get(),
            );
            return Err(e);
        }
        let last = self.staged.buf.borrow().clone();
        if !last.is_empty() {
            self.staged.write_chunk(&last)?;
            self.staged.buf.borrow_mut().clear();
            // The tail reader may still read these bytes: from the store now.
        }
        if size > self.max_blob {
            // Verified and served, not kept.
            self.discard_later();
            return Ok(());
        }
        let store = &self.staged.store;
        if store.exists(&key).map_err(|e| kv_err("exists", &key, e))? {
            // Another instance committed the same blob first.
            self.discard_later();
            return Ok(());
        }
        let head = Head {
            v: 1,
            size,
            chunk: MAX_INLINE as u64,
            chunks: self.staged.chunks.get(),
            prefix: self.staged.prefix.clone(),
        };
        let value = serde_json::to_vec(&head).map_err(|e| kv_err("encode", &key, e))?;
        store
            .set(&key, &value)
            .map_err(|e| kv_err("set", &key, e))?;
        Ok(())
    }

    async fn abort(self: Box<Self>) {
        self.discard_later();
    }

    fn tail(&self) -> Option<Rc<dyn TailReader>> {
        Some(self.staged.clone())
    }
}
