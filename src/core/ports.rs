//! The ports: the small capabilities a host hands the core. Byte-level, object-safe, and not
//! `Send` (Workers and Spin futures are `!Send`). Hosts implement them over their bindings;
//! tests implement them in memory. Port errors are their own types; the core maps them to
//! registry errors.

use crate::core::body::Body;
pub use crate::core::body::{BodyError, ByteStream};
use crate::core::registry::reference::Digest;
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use http::{Request, Response};
use std::rc::Rc;

mod tag_flights;
pub use tag_flights::{
    NoTagFlights, NoTagLease, TagEntry, TagFlight, TagFlightBook, TagFlights, TagLease, TagOutcome,
    TagPoll,
};

/// Why an upstream exchange failed before a response arrived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// Connection refused, DNS, TLS.
    #[error("upstream unreachable: {0}")]
    Connect(String),
    /// No answer in time.
    #[error("upstream timed out: {0}")]
    Timeout(String),
    /// Anything else (malformed response, host capability missing).
    #[error("upstream request failed: {0}")]
    Other(String),
    /// The outbound address policy refused a URL the upstream chose (a redirect, a token
    /// realm, a chart URL) before anything was sent to it; see `core::outbound`.
    #[error("{0}")]
    Refused(String),
}

/// Outbound HTTP: registry requests (empty bodies) and the gateway's deliveries (small JSON or
/// form bodies). Must not follow redirects (the core follows them, without `Authorization`).
#[async_trait::async_trait(?Send)]
pub trait Upstream {
    /// Sends a request and returns the response with a streaming body.
    async fn send(&self, request: Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError>;
}

/// A request extension: trust this private CA (a PEM file, the `ca_file` of the `[[upstream]]`,
/// `[[helm]]` or `[[target]]` entry the request is for) in addition to the host's roots. Only the
/// native host honours it; the edge hosts refuse `ca_file` when the configuration loads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustedCa(pub std::sync::Arc<str>);

/// A request extension a host puts on `/readyz`: whether it can take traffic (native: not
/// draining, storage writable). Without one, `/readyz` answers ready: the configuration
/// loaded and the core is serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Ready.
    Ready,
    /// Not ready, and why (shown in the probe's answer; never a secret).
    NotReady(String),
}

/// A storage failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("storage: {0}")]
pub struct StoreError(pub String);

/// Small records: tag records, manifests, tag lists. Keys are ASCII, at most 256 bytes.
#[async_trait::async_trait(?Send)]
pub trait KvStore {
    /// Reads a value.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes a value.
    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Deletes a value (absent is fine).
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Keys starting with `prefix`, in key order, at most `limit` of them.
    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError>;
    /// The store's write generation, when it has one: a number that changes after every
    /// write (through any handle, on any thread) that could change what `get` returns. A
    /// reader that takes it *before* its reads may keep what it decoded from them for as
    /// long as the generation stays the same. None (the default): the store cannot say, and
    /// nothing decoded is kept.
    fn generation(&self) -> Option<u64> {
        None
    }
}

/// Blobs by digest, content-addressed. Only verified bytes become visible.
///
/// Every method takes a validated [`Digest`], so a store builds its keys from
/// [`Digest::hex`] and never parses digests itself.
#[async_trait::async_trait(?Send)]
pub trait BlobStore {
    /// Size of a stored blob, or None. A hit also counts as an access for eviction.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;
    /// Streams bytes `[start, end)` of a stored blob; None if it vanished (evicted).
    async fn read(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Option<ByteStream>, StoreError>;
    /// The body for serving bytes `[start, end)` of a stored blob to a client; None if it
    /// vanished. A host whose platform can hand its own stream to the response overrides this
    /// to return [`Body::Host`]; the default streams [`BlobStore::read`].
    async fn serve(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Option<Body>, StoreError> {
        Ok(self.read(digest, start, end).await?.map(Body::Stream))
    }
    /// Removes a stored blob (admin purge); Ok(false) when it was not stored. A store that
    /// cannot delete answers an error saying so.
    async fn delete(&self, digest: &Digest) -> Result<bool, StoreError> {
        let _ = digest;
        Err(StoreError("this blob store cannot delete blobs".into()))
    }
    /// (blob count, bytes) when the store keeps them; None when it cannot tell cheaply.
    async fn usage(&self) -> Result<Option<(u64, u64)>, StoreError> {
        Ok(None)
    }
    /// Starts writing the blob `digest` under a staging name.
    ///
    /// `size` is a hint: the length the caller expects (an upstream's `Content-Length`), None
    /// when unknown. A store may use it to choose how to write (one streamed put of known
    /// length instead of buffered multipart parts, a preallocated buffer), never to decide
    /// what is valid: the bytes written are what commits, checked against `digest` by
    /// [`DigestCheck`](crate::core::digest_check::DigestCheck). When the bytes written differ
    /// in length from the hint, `commit` may fail ([`CommitError::Store`]) but must not make
    /// anything other than exactly those bytes visible.
    async fn create(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Box<dyn BlobWriter>, StoreError>;
    /// Fills `digest` straight from the upstream's answer to the fill's GET, inside the host's
    /// runtime, when the host's platform can store, verify and serve the bytes without them
    /// passing through the core (Workers: the body split in the runtime, one branch into one R2
    /// put with R2's SHA-256 check, one to the client with its tail held back until the put
    /// succeeded). The core has already decided everything else (route, entitlement, which
    /// upstream and digest, redirects); it records links and reports the outcome once the
    /// [`HostFill`] says the blob is committed.
    ///
    /// `size` is the upstream's `Content-Length`. A store that cannot fill this blob natively
    /// (no such capability, unknown length, over a platform limit) answers
    /// [`NativeFill::Declined`] with the response untouched, and the core fills through
    /// [`create`](Self::create) as usual. The default declines.
    async fn fill_from(
        &self,
        digest: &Digest,
        size: Option<u64>,
        upstream: Response<ByteStream>,
    ) -> NativeFill {
        let _ = (digest, size);
        NativeFill::Declined(upstream)
    }
}

/// What [`BlobStore::fill_from`] did with an upstream response.
pub enum NativeFill {
    /// The host fills it natively.
    Started(Rc<dyn HostFill>),
    /// The host cannot: the response, untouched, for the core's own fill.
    Declined(Response<ByteStream>),
}

/// A blob fill the host runs in its runtime (see [`BlobStore::fill_from`]). The same rules as
/// a [`BlobWriter`]'s hold: nothing is visible under the digest until the platform verified
/// the bytes against it, and no client gets the last 64 KiB of the blob before that.
pub trait HostFill {
    /// The live body of the whole blob for one client, the last 64 KiB withheld until the
    /// blob is verified and stored (the body errors, so the host aborts the connection, when
    /// it is not). `Some` once; later callers wait for the outcome and read the store.
    fn take_body(&self) -> Option<Body>;
    /// Resolves when the fill ended: `Ok` once the blob is verified and committed.
    fn outcome(&self) -> LocalBoxFuture<'static, Result<(), HostFillError>>;
}

/// Why a [`HostFill`] stored nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostFillError {
    /// The bytes did not hash to the digest (the platform refused them).
    #[error("bytes do not hash to the expected digest; not stored")]
    DigestMismatch,
    /// The upstream body failed, or storage did.
    #[error("{0}")]
    Failed(String),
}

/// Why a commit refused to make a blob visible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The bytes written do not hash to the digest given to `create`; nothing was stored.
    #[error("bytes hash to {actual}, not the expected digest; not stored")]
    DigestMismatch {
        /// The digest of what was written.
        actual: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A blob being written. Nothing is visible under the digest until `commit`.
///
/// The contract every backend keeps (and `tests/` checks for each): the writer feeds every byte
/// it is given, in order, to a [`DigestCheck`](crate::core::digest_check::DigestCheck) bound to
/// the digest given to [`BlobStore::create`] (on whatever thread suits the host: a blocking
/// thread natively), or lets its platform hash them and compares through
/// [`verify_sha256`](crate::core::digest_check::verify_sha256) (R2's runtime hashing on
/// Workers); `commit` makes the blob visible only when that check passes. A mismatch stores
/// nothing and is [`CommitError::DigestMismatch`].
#[async_trait::async_trait(?Send)]
pub trait BlobWriter {
    /// Appends the chunks in order; when it returns, a [`TailReader`] sees them.
    async fn write(&mut self, chunks: Vec<Bytes>) -> Result<(), StoreError>;
    /// Verifies the digest and makes the blob visible under it (atomically).
    async fn commit(self: Box<Self>) -> Result<(), CommitError>;
    /// Drops the staged bytes.
    async fn abort(self: Box<Self>);
    /// A reader of the bytes written so far, valid after commit or abort too; None when the
    /// store cannot read a blob while it is written.
    fn tail(&self) -> Option<Rc<dyn TailReader>>;
}

/// Reads the bytes of an in-progress write.
#[async_trait::async_trait(?Send)]
pub trait TailReader {
    /// Reads up to `max` bytes at `offset` (only bytes already written are asked for).
    async fn read_at(&self, offset: u64, max: usize) -> Result<Bytes, StoreError>;
}

/// Wall-clock time. The core never reads the system clock itself.
pub trait Clock {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// Work that outlives the request that started it (a cache fill): a spawned local task
/// natively, `waitUntil` on Workers.
pub trait Deferred {
    /// Runs `work` to completion in the background.
    fn spawn(&self, work: LocalBoxFuture<'static, ()>);
}

/// CPU-heavy work kept off the request loop (password verification): natively a blocking
/// thread behind a bound on concurrent jobs, so a burst of logins cannot stall other requests;
/// inline where the host has no threads (Workers, Spin). The job is `Send` because it may run
/// on another thread; its result travels back through [`offload`].
pub trait Offload {
    /// Runs `job` to completion; resolves when it has finished (or could not run: a job
    /// that panicked or was refused simply leaves no result).
    fn run(&self, job: Box<dyn FnOnce() + Send>) -> LocalBoxFuture<'static, ()>;
}

/// Runs the job in the calling task. For hosts without threads, and for tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct InlineOffload;

impl Offload for InlineOffload {
    fn run(&self, job: Box<dyn FnOnce() + Send>) -> LocalBoxFuture<'static, ()> {
        job();
        Box::pin(std::future::ready(()))
    }
}

/// A job that produced no result (it panicked, or the host shut down).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("offloaded work did not finish")]
pub struct OffloadError;

/// Runs `f` through `o` and returns its result.
pub async fn offload<T: Send + 'static>(
    o: &dyn Offload,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OffloadError> {
    let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
    let out = slot.clone();
    o.run(Box::new(move || {
        let v = f();
        if let Ok(mut s) = out.lock() {
            *s = Some(v);
        }
    }))
    .await;
    let v = slot.lock().ok().and_then(|mut s| s.take());
    v.ok_or(OffloadError)
}

/// A token bucket's limit: `n` tokens per `per_ms` milliseconds, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketLimit {
    /// Tokens added per `per_ms`.
    pub n: u32,
    /// The refill period in ms.
    pub per_ms: u64,
    /// The most tokens the bucket holds (a new bucket starts full); 0 counts as 1.
    pub burst: u32,
}

/// A bucket's state: what a [`RateLimitStore`] keeps per key. The refill rule lives here so
/// that every store (in memory, a key-value record, a Durable Object) applies the same one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    /// Tokens left (fractional: refills are continuous).
    pub tokens: f64,
    /// When `tokens` was computed (ms since the epoch).
    pub at_ms: u64,
}

/// The answer of [`RateLimitStore::take`] (and of [`BucketState::take`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketTake {
    /// A token was taken: admit.
    Taken,
    /// The bucket is empty: refuse; a token is available again after this many ms.
    Empty {
        /// Milliseconds until the next token.
        retry_after_ms: u64,
    },
}

impl BucketState {
    /// A new bucket for `limit` at `now_ms`: full.
    pub fn full(limit: BucketLimit, now_ms: u64) -> BucketState {
        BucketState {
            tokens: f64::from(limit.burst.max(1)),
            at_ms: now_ms,
        }
    }

    /// Refills the bucket up to `now_ms` (never back in time: a clock behind `at_ms` refills
    /// nothing) and takes one token if there is one.
    pub fn take(&mut self, limit: BucketLimit, now_ms: u64) -> BucketTake {
        let per_ms = f64::from(limit.n) / limit.per_ms.max(1) as f64;
        let cap = f64::from(limit.burst.max(1));
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64;
        self.tokens = (self.tokens + elapsed * per_ms).min(cap);
        self.at_ms = self.at_ms.max(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            BucketTake::Taken
        } else {
            BucketTake::Empty {
                retry_after_ms: ((1.0 - self.tokens) / per_ms).ceil() as u64,
            }
        }
    }
}

/// Rate-limit buckets kept outside the core instance, so a limit holds across instances (Spin
/// runs one instance per request; Workers one per isolate). Without one the core keeps its
/// buckets in memory, per instance (the native host's default).
///
/// The contract: [`take`](Self::take) applies [`BucketState::take`] to the bucket stored
/// under `key` (a missing bucket is [`BucketState::full`]) and stores the result. How exact
/// that is under concurrent takes of one key is the store's to document (a read-modify-write
/// without compare-and-swap may admit a few extra requests; it must never refuse one a serial
/// bucket would admit). A store that fails answers `Err`; the core then admits the request (a
/// rate limit protects capacity, it is not an access rule).
#[async_trait::async_trait(?Send)]
pub trait RateLimitStore {
    /// Takes one token from the bucket `key` (`ip:…`, `id:…`; any length, any bytes a header
    /// may carry: a store hashes it into its own key) under `limit` at `now_ms`.
    async fn take(
        &self,
        key: &str,
        limit: BucketLimit,
        now_ms: u64,
    ) -> Result<BucketTake, StoreError>;
}

/// An upstream bearer token kept in a [`TokenStore`].
#[derive(Debug, Clone)]
pub struct StoredToken {
    /// The token (a secret: its `Debug` is redacted).
    pub token: crate::core::config::value::Secret,
    /// When the core stops using it (ms since the epoch; already shortened for clock skew).
    pub valid_until_ms: u64,
}

/// Upstream bearer tokens kept outside the core instance, so a token fetched by one instance
/// (one Spin request) is reused by the next until it expires. Without one the core caches
/// tokens in memory per instance. Tokens are secrets: a store keeps them only in the host's
/// own storage and never puts them in an error or a log line.
#[async_trait::async_trait(?Send)]
pub trait TokenStore {
    /// The token for (`upstream`, `scope`), if one is stored and valid at `now_ms`.
    async fn get(
        &self,
        upstream: &str,
        scope: &str,
        now_ms: u64,
    ) -> Result<Option<StoredToken>, StoreError>;
    /// Stores the token for (`upstream`, `scope`), replacing any other.
    async fn put(&self, upstream: &str, scope: &str, token: &StoredToken)
        -> Result<(), StoreError>;
}

/// All the ports a core instance runs on.
#[derive(Clone)]
pub struct Ports {
    /// Outbound HTTP.
    pub upstream: Rc<dyn Upstream>,
    /// Metadata store.
    pub kv: Rc<dyn KvStore>,
    /// Blob store.
    pub blobs: Rc<dyn BlobStore>,
    /// Clock.
    pub clock: Rc<dyn Clock>,
    /// Deferred work.
    pub deferred: Rc<dyn Deferred>,
    /// CPU-heavy work (password verification).
    pub offload: Rc<dyn Offload>,
}

/// Where a blob fill run by some instance stands, as its lead reports it to followers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FillProgress {
    /// The upstream answered and the staged write exists.
    pub started: bool,
    /// The blob's length, when the upstream announced it.
    pub size: Option<u64>,
    /// Bytes written to the staged write (readable through the follower's tail reader).
    pub persisted: u64,
    /// `Some(Ok)`: verified and committed (the blob is in the store); `Some(Err)`: failed,
    /// nothing stored. `None` while the fill runs.
    pub outcome: Option<Result<(), crate::core::error::RegistryError>>,
}

/// Coalesces blob fills *across* core instances (threads of one native process; later a
/// Durable Object or a Spin key-value lease), so concurrent misses of one digest make one
/// upstream transfer wherever they land. Within one instance the core coalesces by itself;
/// this port is consulted only before an instance would start a fill of its own.
///
/// The contract:
/// - [`claim`](Self::claim) is atomic per digest: of any set of concurrent claims on one
///   digest, exactly one gets [`FillClaim::Lead`] while no lead holds it; the others get
///   [`FillClaim::Follow`] on that lead. A lead that ended (reported an outcome, or was
///   dropped) no longer holds the digest: the next claim leads again.
/// - The lead reports every change through its [`FillLease`]; dropping the lease without an
///   outcome must look like a failure to followers (the lead's task died).
/// - Followers never see bytes the lead has not persisted; they read them with
///   [`FillWatch::tail`], and the core still withholds the last 64 KiB from its clients
///   until the outcome says verified. `Ok` is reported only after the store committed.
/// - `scope` names what the lead fetched for (upstream and repository): a follower whose
///   own scope differs must be entitled to the blob before it follows.
///
/// The claim is async: a coordinator may have to ask another process (a Durable Object, a
/// key-value store) who leads.
#[async_trait::async_trait(?Send)]
pub trait FillCoordinator {
    /// Leads or follows the fill of `digest` for `scope`.
    async fn claim(&self, digest: &Digest, scope: &str) -> FillClaim;
    /// Whether other instances share this coordinator (and so may commit a blob between this
    /// instance's store lookup and its claim: a lead then checks the store once more).
    fn is_shared(&self) -> bool {
        true
    }
}

/// The answer to [`FillCoordinator::claim`].
pub enum FillClaim {
    /// Run the fill and report through the lease.
    Lead(Box<dyn FillLease>),
    /// Another instance runs it: follow.
    Follow(Box<dyn FillWatch>),
}

/// The lead's side of a coordinated fill.
pub trait FillLease {
    /// Publishes the fill's progress; an outcome ends the lease's hold on the digest.
    fn report(&self, progress: &FillProgress);
}

/// A follower's view of another instance's fill.
pub trait FillWatch {
    /// The latest progress.
    fn progress(&self) -> FillProgress;
    /// Resolves once the progress differs from what [`progress`](Self::progress) returned
    /// last (at once if it already does).
    fn changed(&self) -> LocalBoxFuture<'_, ()>;
    /// What the lead fetched for (see [`FillCoordinator`]).
    fn scope(&self) -> &str;
    /// A reader of the lead's staged write, once it exists; None when this host cannot read
    /// it (the follower then serves the committed blob after the outcome).
    fn tail(&self) -> Option<Rc<dyn TailReader>>;
}

/// The coordinator of a host with one instance (or none to coordinate with): every claim
/// leads, and reports go nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalFills;

struct NoLease;

impl FillLease for NoLease {
    fn report(&self, _: &FillProgress) {}
}

#[async_trait::async_trait(?Send)]
impl FillCoordinator for LocalFills {
    async fn claim(&self, _: &Digest, _: &str) -> FillClaim {
        FillClaim::Lead(Box::new(NoLease))
    }

    fn is_shared(&self) -> bool {
        false
    }
}

/// Strongly consistent records with a create that is atomic across every core instance (a
/// Durable Object on Workers): where the gateway keeps its runs and dedup records when the
/// host has one (`App::with_record_store`). Without one they stay in the [`KvStore`] port,
/// serialised by each instance's own lock.
#[async_trait::async_trait(?Send)]
pub trait RecordStore: KvStore {
    /// Stores `value` under `key` only when nothing is stored there; true when it did. Of any
    /// number of concurrent creates of one key, from any instances, exactly one returns true.
    async fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError>;
}

/// A host's message queue for the gateway's outbound deliveries (Cloudflare Queues): the
/// gateway sends the id of each new pending delivery, and the host's consumer hands every
/// message back to the core ([`crate::core::app::App::deliver_queued`]), which attempts the
/// delivery and answers a [`QueueVerdict`] the consumer carries out (acknowledge, retry after
/// a delay, or move to the dead-letter queue, whose consumer calls
/// [`crate::core::app::App::dead_letter_queued`]). Optional: without one, the outbox pump
/// sends every delivery. The delivery records stay in the key-value port either way; a
/// message carries only the id, so a queue never holds a secret.
#[async_trait::async_trait(?Send)]
pub trait DeliveryQueue {
    /// Sends delivery `id`, to be handed back no sooner than `delay_ms` from now (a queue
    /// may cap the delay; the core then asks for the rest on the next attempt).
    async fn send(&self, id: &str, delay_ms: u64) -> Result<(), StoreError>;
}

/// What a queue consumer does with a delivery's message once the core has looked at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueVerdict {
    /// Delivered, or nothing is pending under that id any more: acknowledge the message.
    Ack,
    /// Not delivered (failed, or not yet due): hand it back after `delay_ms`.
    Retry {
        /// The delay before the next attempt, ms.
        delay_ms: u64,
    },
    /// Failed for the last allowed time (`[gateway] max_attempts`): move the message to the
    /// dead-letter queue, whose consumer records the dead letter.
    DeadLetter {
        /// Why the last attempt failed.
        error: String,
    },
}
