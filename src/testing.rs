//! Test doubles and store contracts, in one place for the unit tests (`cfg(test)`) and the
//! integration tests (the `test-utils` feature, which `cargo test` turns on through the
//! crate's dev-dependency on itself). Not for production: nothing is bounded.
//!
//! - here: in-memory ports, the store contract's reference implementation. `Mem*` keep
//!   everything in memory; `ManualClock` moves only when told; `FakeOffload` counts jobs.
//! - [`fakes`]: a closure-driven upstream, a key-value store that fails on request, secrets
//!   from a table, request/response helpers, a `LocalSet` runner.
//! - [`contract`]: the blob-store and key-value contracts, as functions any store test calls.

pub mod contract;
pub mod fakes;

pub use contract::{blob_store_contract, kv_store_contract, Tail};
#[cfg(feature = "test-utils")]
pub use fakes::{chunked_response, run_local, SpawnLocal};
pub use fakes::{collect, request, Collected, FakeSecrets, FakeUpstream, FlakyKv};

use crate::core::ports::{
    BlobStore, BlobWriter, ByteStream, Clock, CommitError, KvStore, Offload, StoreError, TailReader,
};
use crate::core::reference::Digest;
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// A key-value store in a `HashMap`.
#[derive(Default)]
pub struct MemKv {
    map: RefCell<HashMap<String, Vec<u8>>>,
}

impl MemKv {
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
}

#[async_trait::async_trait(?Send)]
impl KvStore for MemKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.borrow().get(key).cloned())
    }
    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.map
            .borrow_mut()
            .insert(key.to_string(), value.to_vec());
        Ok(())
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.map.borrow_mut().remove(key);
        Ok(())
    }
    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut keys: Vec<String> = self
            .map
            .borrow()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        keys.truncate(limit);
        Ok(keys)
    }
}

/// A blob store in memory; staged writes are readable while they grow.
#[derive(Default)]
pub struct MemBlobStore {
    blobs: Rc<RefCell<HashMap<String, Bytes>>>,
    no_tail: bool,
}

impl MemBlobStore {
    /// A store that, like R2, cannot read a blob while it is written.
    pub fn without_tail() -> Self {
        MemBlobStore {
            no_tail: true,
            ..Default::default()
        }
    }
    /// The committed bytes of a blob.
    pub fn get(&self, digest: &str) -> Option<Bytes> {
        self.blobs.borrow().get(digest).cloned()
    }
    /// Number of committed blobs.
    pub fn count(&self) -> usize {
        self.blobs.borrow().len()
    }
    /// Puts a blob directly (test set-up).
    pub fn insert(&self, digest: &str, bytes: Bytes) {
        self.blobs.borrow_mut().insert(digest.to_string(), bytes);
    }
}

struct MemWriter {
    no_tail: bool,
    digest: String,
    staged: Rc<RefCell<Vec<u8>>>,
    blobs: Rc<RefCell<HashMap<String, Bytes>>>,
}

struct MemTail(Rc<RefCell<Vec<u8>>>);

#[async_trait::async_trait(?Send)]
impl TailReader for MemTail {
    async fn read_at(&self, offset: u64, max: usize) -> Result<Bytes, StoreError> {
        let v = self.0.borrow();
        let start = (offset as usize).min(v.len());
        let end = (start + max).min(v.len());
        Ok(Bytes::copy_from_slice(&v[start..end]))
    }
}

#[async_trait::async_trait(?Send)]
impl BlobWriter for MemWriter {
    async fn write(&mut self, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        let mut staged = self.staged.borrow_mut();
        chunks.iter().for_each(|c| staged.extend_from_slice(c));
        Ok(())
    }
    async fn commit(self: Box<Self>) -> Result<(), CommitError> {
        let bytes = Bytes::from(self.staged.borrow().clone());
        let actual = Digest::of(&bytes);
        if actual.as_str() != self.digest {
            return Err(CommitError::DigestMismatch {
                actual: actual.to_string(),
            });
        }
        self.blobs.borrow_mut().insert(self.digest.clone(), bytes);
        Ok(())
    }
    async fn abort(self: Box<Self>) {}
    fn tail(&self) -> Option<Rc<dyn TailReader>> {
        if self.no_tail {
            return None;
        }
        Some(Rc::new(MemTail(self.staged.clone())))
    }
}

#[async_trait::async_trait(?Send)]
impl BlobStore for MemBlobStore {
    async fn stat(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.blobs.borrow().get(digest).map(|b| b.len() as u64))
    }
    async fn read(
        &self,
        digest: &str,
        start: u64,
        end: u64,
    ) -> Result<Option<ByteStream>, StoreError> {
        let Some(b) = self.blobs.borrow().get(digest).cloned() else {
            return Ok(None);
        };
        let end = (end as usize).min(b.len());
        let start = (start as usize).min(end);
        let part = b.slice(start..end);
        Ok(Some(futures_util::stream::iter([Ok(part)]).boxed_local()))
    }
    async fn delete(&self, digest: &str) -> Result<bool, StoreError> {
        Ok(self.blobs.borrow_mut().remove(digest).is_some())
    }
    async fn usage(&self) -> Result<Option<(u64, u64)>, StoreError> {
        let b = self.blobs.borrow();
        Ok(Some((
            b.len() as u64,
            b.values().map(|v| v.len() as u64).sum(),
        )))
    }
    async fn create(&self, digest: &str) -> Result<Box<dyn BlobWriter>, StoreError> {
        Ok(Box::new(MemWriter {
            no_tail: self.no_tail,
            digest: digest.to_string(),
            staged: Rc::new(RefCell::new(Vec::new())),
            blobs: self.blobs.clone(),
        }))
    }
}

/// A clock that moves only when told.
#[derive(Default)]
pub struct ManualClock {
    now: Cell<u64>,
}

impl ManualClock {
    /// A clock at `ms`.
    pub fn at(ms: u64) -> Self {
        ManualClock { now: Cell::new(ms) }
    }
    /// Moves the clock forward.
    pub fn advance(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now.get()
    }
}

/// An [`Offload`] that runs each job inline and counts them, so a test can assert how many
/// password verifications a request cost (none, for a refused one).
#[derive(Default)]
pub struct FakeOffload {
    jobs: Cell<usize>,
}

impl FakeOffload {
    /// Jobs run so far.
    pub fn jobs(&self) -> usize {
        self.jobs.get()
    }
}

impl Offload for FakeOffload {
    fn run(&self, job: Box<dyn FnOnce() + Send>) -> LocalBoxFuture<'static, ()> {
        self.jobs.set(self.jobs.get() + 1);
        job();
        Box::pin(std::future::ready(()))
    }
}
