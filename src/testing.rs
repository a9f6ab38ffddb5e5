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

use crate::core::digest_check::DigestCheck;
use crate::core::ports::{
    BlobStore, BlobWriter, BodyError, ByteStream, Clock, CommitError, Deferred, KvStore, Offload,
    StoreError, TailReader, Upstream, UpstreamError,
};
use crate::core::registry::reference::Digest;
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use http::{Request, Response};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// A key-value store in a `HashMap`.
#[derive(Default)]
pub struct MemKv {
    map: RefCell<HashMap<String, Vec<u8>>>,
    writes: std::cell::Cell<u64>,
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
        self.writes.set(self.writes.get() + 1);
        Ok(())
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.map.borrow_mut().remove(key);
        self.writes.set(self.writes.get() + 1);
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
    fn generation(&self) -> Option<u64> {
        Some(self.writes.get())
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
    check: DigestCheck,
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
        for c in &chunks {
            self.check.update(c);
            staged.extend_from_slice(c);
        }
        Ok(())
    }
    async fn commit(self: Box<Self>) -> Result<(), CommitError> {
        let bytes = Bytes::from(self.staged.borrow().clone());
        let key = self.check.expected().to_string();
        self.check.finish()?;
        self.blobs.borrow_mut().insert(key, bytes);
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
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(self
            .blobs
            .borrow()
            .get(digest.as_str())
            .map(|b| b.len() as u64))
    }
    async fn read(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Option<ByteStream>, StoreError> {
        let Some(b) = self.blobs.borrow().get(digest.as_str()).cloned() else {
            return Ok(None);
        };
        let end = (end as usize).min(b.len());
        let start = (start as usize).min(end);
        let part = b.slice(start..end);
        Ok(Some(futures_util::stream::iter([Ok(part)]).boxed_local()))
    }
    async fn delete(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.blobs.borrow_mut().remove(digest.as_str()).is_some())
    }
    async fn usage(&self) -> Result<Option<(u64, u64)>, StoreError> {
        let b = self.blobs.borrow();
        Ok(Some((
            b.len() as u64,
            b.values().map(|v| v.len() as u64).sum(),
        )))
    }
    async fn create(
        &self,
        digest: &Digest,
        _size: Option<u64>,
    ) -> Result<Box<dyn BlobWriter>, StoreError> {
        Ok(Box::new(MemWriter {
            no_tail: self.no_tail,
            check: DigestCheck::new(digest),
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

/// A [`Deferred`] that drops its work: a test starts every background pass (the gateway's
/// outbox pump) itself, so nothing happens behind its back.
#[derive(Default)]
pub struct DroppedDeferred;

impl Deferred for DroppedDeferred {
    fn spawn(&self, _work: LocalBoxFuture<'static, ()>) {}
}

/// One request a [`FakeTarget`] received.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Host of the request URL.
    pub host: String,
    /// Method.
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    /// Headers as sent.
    pub headers: http::HeaderMap,
    /// Body as sent.
    pub body: Bytes,
}

impl Delivered {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Outbound targets behind one [`Upstream`]: records every request it is sent and answers
/// each host with a scripted status (200 unless [`FakeTarget::answer`] said otherwise), with
/// a small JSON body.
#[derive(Default)]
pub struct FakeTarget {
    delivered: RefCell<Vec<Delivered>>,
    statuses: RefCell<HashMap<String, u16>>,
}

impl FakeTarget {
    /// From now on, `host` answers `status`.
    pub fn answer(&self, host: &str, status: u16) {
        self.statuses.borrow_mut().insert(host.to_string(), status);
    }
    /// Every host answers 200 again.
    pub fn heal(&self) {
        self.statuses.borrow_mut().clear();
    }
    /// Every request received, in order.
    pub fn delivered(&self) -> Vec<Delivered> {
        self.delivered.borrow().clone()
    }
    /// The JSON bodies sent to `host`, in order.
    pub fn to(&self, host: &str) -> Vec<serde_json::Value> {
        self.delivered
            .borrow()
            .iter()
            .filter(|d| d.host == host)
            .map(Delivered::json)
            .collect()
    }
    /// How many requests `host` received.
    pub fn count(&self, host: &str) -> usize {
        self.delivered
            .borrow()
            .iter()
            .filter(|d| d.host == host)
            .count()
    }
}

#[async_trait::async_trait(?Send)]
impl Upstream for FakeTarget {
    async fn send(&self, req: Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> {
        let host = req.uri().host().unwrap_or("").to_string();
        let status = self.statuses.borrow().get(&host).copied().unwrap_or(200);
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let (parts, body) = req.into_parts();
        self.delivered.borrow_mut().push(Delivered {
            host,
            method: parts.method,
            path,
            headers: parts.headers,
            body,
        });
        let stream = futures_util::stream::iter([Ok::<_, BodyError>(Bytes::from_static(b"{}"))]);
        Response::builder()
            .status(status)
            .body(stream.boxed_local())
            .map_err(|e| UpstreamError::Connect(e.to_string()))
    }
}
