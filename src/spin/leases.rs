//! [`SpinFills`]: the core's [`FillCoordinator`] over the Spin key-value store, so concurrent
//! cold pulls of one blob make one upstream transfer although every Spin request is its own
//! instance.
//!
//! A fill is claimed with a *lease*: the record `~lease/<hex of the digest>` naming its owner
//! (a random id per claim), what it fetches for (upstream and repository), whether the
//! upstream answered and the blob's size, and when it expires. A claim that finds a live lease
//! follows it; one that finds none (or an expired one: its owner died with its instance)
//! writes its own and leads. The lead renews the expiry while bytes flow (at most every
//! quarter of the lease), and deletes the lease when the fill ends — after the blob was
//! committed, or when it failed or was dropped.
//!
//! A follower polls the lease with a bounded backoff ([`POLL_MIN_MS`] doubling to
//! [`POLL_MAX_MS`]): it answers its client's headers once the lead's upstream answered (with
//! the size the lead saw), and when the lease is gone it serves the blob from the store if the
//! lead committed it. Followers read no bytes of the lead's staged write ([`FillWatch::tail`]
//! is None): the body comes from the committed, verified blob, so a follower starts sending
//! bytes only after the lead's commit.
//!
//! The lease lasts twice the upstream timeout (at least [`MIN_LEASE_MS`]): a lead that receives
//! bytes renews it long before it runs out, and a follower of a lead that died gives up (503
//! with "retry") within that time; the next claim takes the expired lease over.
//!
//! # Accuracy
//! Spin's key-value interface has no compare-and-swap, so a claim is a read, a write and a
//! read back: of two claims that both found no lease, the one whose write landed last leads,
//! and the other, seeing a foreign owner when it reads back, follows. Two claims still both
//! lead when the second one's read comes before the first's write *and* its write comes after
//! the first's read back (a window of one key-value round trip): then two transfers run, both
//! verified, and the second commit keeps the first copy. Coalescing is therefore best effort,
//! never a correctness matter: every blob is still verified before it is stored or finished.
//!
//! # Limitations
//! - A follower of a blob above `pullgate_kv_blob_max_size` (verified and streamed through,
//!   not stored) finds nothing in the store when the lead ends, and answers 503 "retry"; its
//!   retry fetches the blob itself.
//! - A lead that stalls before its upstream answers (token dance, redirects) for longer than
//!   the lease can be taken over: then two transfers run.
//! - Leases of instances killed mid-fill stay in the store as expired records until the next
//!   claim of that digest replaces them.

use crate::core::error::RegistryError;
use crate::core::ports::{
    BlobStore, Clock, FillClaim, FillCoordinator, FillLease, FillProgress, FillWatch, StoreError,
    TailReader,
};
use crate::core::registry::reference::Digest;
use crate::spin::kv::{kv_err, PRIVATE_PREFIX};
use crate::spin::reactor;
use futures_util::future::LocalBoxFuture;
use spin_sdk::key_value::Store;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// The shortest lease (ms).
pub const MIN_LEASE_MS: u64 = 20_000;
/// A follower's first wait between polls of the lease (ms).
pub const POLL_MIN_MS: u64 = 25;
/// A follower's longest wait between polls of the lease (ms).
pub const POLL_MAX_MS: u64 = 500;

/// A lease record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Record {
    /// Format version.
    v: u32,
    /// The claim that holds it.
    owner: String,
    /// What the lead fetches for (`<upstream>/<repository>`).
    scope: String,
    /// When it runs out (ms since the epoch), unless renewed.
    expires_ms: u64,
    /// The upstream answered.
    started: bool,
    /// The blob's size, when the upstream announced it.
    size: Option<u64>,
}

fn lease_key(digest: &Digest) -> String {
    format!("{PRIVATE_PREFIX}lease/{}", digest.hex())
}

fn read(store: &Store, key: &str) -> Result<Option<Record>, StoreError> {
    let Some(v) = store.get(key).map_err(|e| kv_err("get", key, e))? else {
        return Ok(None);
    };
    // A record in another format is no lease.
    Ok(serde_json::from_slice::<Record>(&v)
        .ok()
        .filter(|r| r.v == 1))
}

fn write(store: &Store, key: &str, record: &Record) -> Result<(), StoreError> {
    let value = serde_json::to_vec(record).map_err(|e| kv_err("encode", key, e))?;
    store.set(key, &value).map_err(|e| kv_err("set", key, e))
}

/// A random owner id (std seeds `RandomState` from `wasi:random`) with a per-instance count.
fn new_owner(digest: &Digest, n: u64) -> String {
    let seed = std::hash::BuildHasher::hash_one(
        &std::collections::hash_map::RandomState::new(),
        (digest.hex(), n),
    );
    format!("{seed:016x}{n:x}")
}

/// The fill coordinator over the Spin key-value store.
pub struct SpinFills {
    store: Rc<Store>,
    blobs: Rc<dyn BlobStore>,
    clock: Rc<dyn Clock>,
    lease_ms: u64,
    claims: Cell<u64>,
}

impl SpinFills {
    /// Leases in `store`, lasting twice `upstream_timeout_ms` (at least [`MIN_LEASE_MS`]);
    /// followers serve the committed blob from `blobs`.
    pub fn new(
        store: Rc<Store>,
        blobs: Rc<dyn BlobStore>,
        clock: Rc<dyn Clock>,
        upstream_timeout_ms: u64,
    ) -> SpinFills {
        SpinFills {
            store,
            blobs,
            clock,
            lease_ms: upstream_timeout_ms.saturating_mul(2).max(MIN_LEASE_MS),
            claims: Cell::new(0),
        }
    }

    fn follow(&self, key: String, digest: &Digest, record: &Record) -> FillClaim {
        FillClaim::Follow(Box::new(Watch {
            store: self.store.clone(),
            blobs: self.blobs.clone(),
            clock: self.clock.clone(),
            key,
            digest: digest.clone(),
            scope: record.scope.clone(),
            last: RefCell::new(progress_of(record)),
            wait_ms: Cell::new(POLL_MIN_MS),
        }))
    }

    fn try_claim(&self, digest: &Digest, scope: &str) -> Result<FillClaim, StoreError> {
        let key = lease_key(digest);
        let now = self.clock.now_ms();
        if let Some(r) = read(&self.store, &key)? {
            if r.expires_ms > now {
                return Ok(self.follow(key, digest, &r));
            }
        }
        let n = self.claims.get() + 1;
        self.claims.set(n);
        let mine = Record {
            v: 1,
            owner: new_owner(digest, n),
            scope: scope.to_string(),
            expires_ms: now.saturating_add(self.lease_ms),
            started: false,
            size: None,
        };
        write(&self.store, &key, &mine)?;
        // Read back: of two claims that both found the key free, the last write leads.
        if let Some(r) = read(&self.store, &key)? {
            if r.owner != mine.owner && r.expires_ms > now {
                return Ok(self.follow(key, digest, &r));
            }
        }
        Ok(FillClaim::Lead(Box::new(Lease {
            store: self.store.clone(),
            clock: self.clock.clone(),
            key,
            lease_ms: self.lease_ms,
            record: RefCell::new(mine),
            written_ms: Cell::new(now),
            ended: Cell::new(false),
        })))
    }
}

#[async_trait::async_trait(?Send)]
impl FillCoordinator for SpinFills {
    async fn claim(&self, digest: &Digest, scope: &str) -> FillClaim {
        self.try_claim(digest, scope).unwrap_or_else(|e| {
            // Without the store nothing can be coordinated: this fill is this instance's own.
            eprintln!("pullgate: fill lease for {digest} not taken ({e}); fetching alone");
            FillClaim::Lead(Box::new(Unshared))
        })
    }
}

/// A lead nothing else can see (the store failed at the claim).
struct Unshared;

impl FillLease for Unshared {
    fn report(&self, _: &FillProgress) {}
}

/// The lead's lease: renewed while the fill runs, deleted when it ends.
struct Lease {
    store: Rc<Store>,
    clock: Rc<dyn Clock>,
    key: String,
    lease_ms: u64,
    record: RefCell<Record>,
    /// When the record was last written (ms).
    written_ms: Cell<u64>,
    ended: Cell<bool>,
}

impl Lease {
    /// Deletes the lease, if it is still this lead's (an expired one may have been taken over).
    fn end(&self) {
        self.ended.set(true);
        let owner = self.record.borrow().owner.clone();
        match read(&self.store, &self.key) {
            Ok(Some(r)) if r.owner == owner => {
                if let Err(e) = self.store.delete(&self.key) {
                    eprintln!("pullgate: fill lease {} not released: {e:?}", self.key);
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("pullgate: fill lease {} not released: {e}", self.key),
        }
    }
}

impl FillLease for Lease {
    fn report(&self, progress: &FillProgress) {
        if self.ended.get() {
            return;
        }
        if progress.outcome.is_some() {
            // Committed (followers read the store) or failed (followers find no blob).
            self.end();
            return;
        }
        let now = self.clock.now_ms();
        let mut record = self.record.borrow_mut();
        let changed = record.started != progress.started || record.size != progress.size;
        let renew = now >= self.written_ms.get().saturating_add(self.lease_ms / 4);
        if !(changed || renew) {
            return;
        }
        record.started = progress.started;
        record.size = progress.size;
        record.expires_ms = now.saturating_add(self.lease_ms);
        match write(&self.store, &self.key, &record) {
            Ok(()) => self.written_ms.set(now),
            Err(e) => eprintln!("pullgate: fill lease {} not renewed: {e}", self.key),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Dropped without an outcome: the fill was given up (the fill cap) or its task died.
        if !self.ended.get() {
            self.end();
        }
    }
}

/// What a follower reports while the lease is live.
fn progress_of(record: &Record) -> FillProgress {
    FillProgress {
        started: record.started,
        size: record.size,
        persisted: 0,
        outcome: None,
    }
}

/// A follower's view of another instance's fill: the lease, polled.
struct Watch {
    store: Rc<Store>,
    blobs: Rc<dyn BlobStore>,
    clock: Rc<dyn Clock>,
    key: String,
    digest: Digest,
    scope: String,
    /// What [`FillWatch::progress`] returns.
    last: RefCell<FillProgress>,
    /// The next wait between polls (ms).
    wait_ms: Cell<u64>,
}

impl Watch {
    fn stopped(&self) -> FillProgress {
        FillProgress {
            started: true,
            outcome: Some(Err(RegistryError::Unavailable(
                "the transfer this request joined stopped; retry".into(),
            ))),
            ..self.last.borrow().clone()
        }
    }

    /// The fill's progress as the store shows it now.
    async fn poll(&self) -> FillProgress {
        let now = self.clock.now_ms();
        match read(&self.store, &self.key) {
            Ok(Some(r)) if r.expires_ms > now => return progress_of(&r),
            // Gone (ended) or expired (its lead died): the store has the answer.
            Ok(_) => {}
            Err(e) => {
                eprintln!("pullgate: fill lease {} unreadable: {e}", self.key);
                return self.stopped();
            }
        }
        match self.blobs.stat(&self.digest).await {
            Ok(Some(size)) => FillProgress {
                started: true,
                size: Some(size),
                persisted: size,
                outcome: Some(Ok(())),
            },
            _ => self.stopped(),
        }
    }
}

impl FillWatch for Watch {
    fn progress(&self) -> FillProgress {
        self.last.borrow().clone()
    }

    fn changed(&self) -> LocalBoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                let now = self.poll().await;
                if now != *self.last.borrow() {
                    *self.last.borrow_mut() = now;
                    self.wait_ms.set(POLL_MIN_MS);
                    return;
                }
                let wait = self.wait_ms.get();
                self.wait_ms.set(wait.saturating_mul(2).min(POLL_MAX_MS));
                reactor::sleep_ms(wait).await;
            }
        })
    }

    fn scope(&self) -> &str {
        &self.scope
    }

    fn tail(&self) -> Option<Rc<dyn TailReader>> {
        None
    }
}
