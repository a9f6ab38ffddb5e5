//! Native storage: blobs as files (`blobs/sha256/<2>/<hex>`, written under `tmp/` and renamed
//! into place only after their digest is verified) and metadata in an embedded redb database
//! (`meta.redb`). Blob eviction keeps the blob directory under `max_size` by *global* last
//! access: a hit stamps the file's mtime (at most once a minute), and eviction removes the
//! least recently stamped files first, whatever repository or upstream they came from.
//!
//! Usage accounting (issue #9, item 8): a blob's bytes are counted when its file is first
//! linked into place, never when a commit finds the file already there (two fills of the same
//! digest, or a fill racing a reopen). Staged bytes count towards the cap while they are
//! written, so the disk holds at most `max_size` plus what is being written. At startup the
//! blob directory is re-scanned and staging leftovers (a kill -9 mid-fill) are removed.
//!
//! Metadata (redb) is not evicted here: which records may be dropped is the core's policy.
//! Its file size is reported ([`StorageReport`]: `/metrics` and the startup log line) so its
//! growth can be watched and alerted on.

pub use crate::native::redb_kv::RedbKv;

use crate::core::digest_check::DigestCheck;
use crate::core::ports::{
    BlobStore, BlobWriter, BodyError, ByteStream, CommitError, StoreError, TailReader,
};
use crate::core::registry::reference::Digest;
use crate::native::zerocopy::Mapped;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A hit re-stamps a blob's access time only when the stamp is older than this.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Size of one chunk of a blob stream. A chunk is a mapping of the file; on a plain
/// connection its bytes go out with `sendfile` and the mapping is never touched, so the
/// chunk's size costs no memory there (16 warm clients: peak RSS 21 MiB). Over TLS the bytes
/// are copied from the mapping and its pages count in the RSS while a client holds them
/// (read ahead, and in the write queue). 1 MiB chunks halved the blocking-pool hops of 512 KiB
/// ones (16 clients: server CPU -25 %, same throughput as 2 MiB).
const READ_CHUNK: usize = 1024 * 1024;
/// Chunks read ahead of the socket.
const READ_AHEAD: usize = 2;
/// Eviction brings the total down to this fraction of the cap, so it does not run per commit.
const EVICT_TO_PERCENT: u64 = 90;

pub(crate) fn store_err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(store_err)?
}

/// Blob usage shared by the store and its writers: the byte total and the eviction guard.
struct Usage {
    blobs: PathBuf,
    max_size: u64,
    /// Bytes of committed blobs.
    total: AtomicU64,
    /// Committed blobs.
    count: AtomicU64,
    /// Bytes written to staging files not yet committed or removed.
    staging: AtomicU64,
    evicting: AtomicBool,
    /// Open staging files by digest hex, so another thread can follow a fill in progress
    /// ([`FsBlobStore::staged`]).
    staged: Mutex<HashMap<String, Arc<File>>>,
}

impl Usage {
    /// Counts a newly committed blob and checks the cap.
    fn add(self: &Arc<Self>, bytes: u64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(bytes, Ordering::Relaxed);
        self.check_cap();
    }

    /// Starts an eviction pass if committed plus staged bytes exceed the cap. Staged bytes
    /// cannot be evicted, so committed blobs make room for them.
    fn check_cap(self: &Arc<Self>) {
        let staging = self.staging.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let target = (self.max_size / 100 * EVICT_TO_PERCENT).saturating_sub(staging);
        // Nothing committed left to evict (a fill larger than the cap): no pass, which would
        // only walk the directory again on every write.
        if total + staging <= self.max_size || total <= target {
            return;
        }
        if self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        let usage = self.clone();
        tokio::task::spawn_blocking(move || {
            let (bytes, files) = evict(&usage.blobs, &usage.total, target);
            usage.count.fetch_sub(files, Ordering::Relaxed);
            tracing::info!(
                evicted_blobs = files,
                evicted_bytes = bytes,
                total = usage.total.load(Ordering::Relaxed),
                max_size = usage.max_size,
                "evicted least recently used blobs"
            );
            usage.evicting.store(false, Ordering::Release);
        });
    }
}

/// Blobs as files under a data directory. Clones share everything (usage, staging names,
/// the staged-file registry): one per worker thread.
#[derive(Clone)]
pub struct FsBlobStore {
    tmp: PathBuf,
    usage: Arc<Usage>,
    seq: Arc<AtomicU64>,
}

fn walk_blobs(dir: &Path, out: &mut Vec<(PathBuf, u64, SystemTime)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            walk_blobs(&e.path(), out);
        } else {
            out.push((
                e.path(),
                md.len(),
                md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ));
        }
    }
}

/// Removes least recently used blobs until `total` ≤ `target`. Returns (bytes, files) removed.
pub fn evict(blobs: &Path, total: &AtomicU64, target: u64) -> (u64, u64) {
    let mut files = Vec::new();
    walk_blobs(blobs, &mut files);
    files.sort_by_key(|(_, _, t)| *t);
    let (mut removed, mut n) = (0, 0);
    for (path, len, _) in files {
        if total.load(Ordering::Relaxed) <= target {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total.fetch_sub(len, Ordering::Relaxed);
            removed += len;
            n += 1;
        }
    }
    (removed, n)
}

impl FsBlobStore {
    /// Opens the blob directory under `root`, clearing staged leftovers of a previous run.
    pub fn open(root: &Path, max_size: u64) -> Result<FsBlobStore, StoreError> {
        let blobs = root.join("blobs").join("sha256");
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&blobs)
            .map_err(|e| StoreError(format!("{}: {e}", blobs.display())))?;
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| StoreError(format!("{}: {e}", tmp.display())))?;
        let mut files = Vec::new();
        walk_blobs(&blobs, &mut files);
        let total = files.iter().map(|(_, l, _)| l).sum();
        let count = files.len() as u64;
        Ok(FsBlobStore {
            tmp,
            usage: Arc::new(Usage {
                blobs,
                max_size,
                total: AtomicU64::new(total),
                count: AtomicU64::new(count),
                staging: AtomicU64::new(0),
                evicting: AtomicBool::new(false),
                staged: Mutex::new(HashMap::new()),
            }),
            seq: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Bytes of blobs stored.
    pub fn total_bytes(&self) -> u64 {
        self.usage.total.load(Ordering::Relaxed)
    }

    /// Blobs stored.
    pub fn blob_count(&self) -> u64 {
        self.usage.count.load(Ordering::Relaxed)
    }

    /// Bytes in staging files (fills in progress).
    pub fn staging_bytes(&self) -> u64 {
        self.usage.staging.load(Ordering::Relaxed)
    }

    /// A reader of the staged write of `digest` in progress (on any thread), if there is one.
    pub fn staged(&self, digest: &Digest) -> Option<Rc<dyn TailReader>> {
        let staged = self.usage.staged.lock().ok()?;
        let file = staged.get(digest.hex())?.clone();
        Some(Rc::new(FsTail(file)))
    }

    /// Where a blob lives: `Digest` is validated (64 lowercase hex), so the path is safe.
    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.usage.blobs.join(&hex[..2]).join(hex)
    }
}

/// Serves `[start, end)` in chunks prepared on the blocking pool, [`READ_AHEAD`] chunks ahead
/// of the socket. A chunk is a read-only mapping of the file ([`Mapped`]): a plain
/// connection sends it with `sendfile`, TLS copies from it; a chunk that cannot be mapped is
/// read into memory instead.
fn file_stream(file: Arc<File>, start: u64, end: u64) -> ByteStream {
    let offsets = (start..end).step_by(READ_CHUNK);
    futures_util::stream::iter(offsets)
        .map(move |pos| {
            let f = file.clone();
            let want = ((end - pos) as usize).min(READ_CHUNK);
            async move {
                let read =
                    tokio::task::spawn_blocking(move || match Mapped::new(f.clone(), pos, want) {
                        Some(m) => Ok(Bytes::from_owner(m)),
                        None => {
                            let mut buf = vec![0u8; want];
                            f.read_exact_at(&mut buf, pos)?;
                            Ok::<_, std::io::Error>(Bytes::from(buf))
                        }
                    })
                    .await;
                match read {
                    Ok(Ok(b)) => Ok(b),
                    Ok(Err(e)) => Err(BodyError(format!("reading the blob file: {e}"))),
                    Err(e) => Err(BodyError(e.to_string())),
                }
            }
        })
        .buffered(READ_AHEAD)
        .boxed_local()
}

#[async_trait::async_trait(?Send)]
impl BlobStore for FsBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let path = self.path(digest);
        match std::fs::metadata(&path) {
            Ok(md) => {
                let stale = md
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_none_or(|age| age > TOUCH_EVERY);
                if stale {
                    let _ = filetime::set_file_mtime(&path, filetime::FileTime::now());
                }
                Ok(Some(md.len()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    async fn read(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Option<ByteStream>, StoreError> {
        let path = self.path(digest);
        match File::open(&path) {
            Ok(f) => Ok(Some(file_stream(Arc::new(f), start, end))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    async fn delete(&self, digest: &Digest) -> Result<bool, StoreError> {
        let path = self.path(digest);
        let len = match std::fs::metadata(&path) {
            Ok(md) => md.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(store_err(e)),
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {
                self.usage.total.fetch_sub(len, Ordering::Relaxed);
                self.usage.count.fetch_sub(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(store_err(e)),
        }
    }

    async fn usage(&self) -> Result<Option<(u64, u64)>, StoreError> {
        Ok(Some((
            self.usage.count.load(Ordering::Relaxed),
            self.usage.total.load(Ordering::Relaxed),
        )))
    }

    /// The size hint reserves the file's blocks up front (`fallocate`, keeping its length).
    async fn create(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Box<dyn BlobWriter>, StoreError> {
        let hasher = Hasher::start(DigestCheck::new(digest))?;
        let dest = self.path(digest);
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp
            .join(format!("{}.{}.{n}", digest.hex(), std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| StoreError(format!("{}: {e}", tmp.display())))?;
        if let Some(size) = size.and_then(|s| libc::off_t::try_from(s).ok()) {
            use std::os::fd::AsRawFd;
            // Reserve the blocks up front (the file's length stays what is written, so a
            // shorter or longer body than announced changes nothing about what commits).
            // SAFETY: fallocate on a file descriptor this function owns; failure is ignored
            // (a file system without it just allocates as the writes come).
            unsafe {
                libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, size);
            }
        }
        let file = Arc::new(file);
        if let Ok(mut staged) = self.usage.staged.lock() {
            staged.insert(digest.hex().to_string(), file.clone());
        }
        Ok(Box::new(FsWriter {
            hex: digest.hex().to_string(),
            hasher: Some(hasher),
            file,
            tmp,
            dest,
            written: 0,
            committed: false,
            usage: self.usage.clone(),
        }))
    }
}

/// Most bytes handed to a writer's hasher and not yet hashed; `write` waits beyond this.
const HASH_BACKLOG: usize = 8 << 20;

/// A staged write's sha256, computed on a thread of its own as batches are written:
/// hashing one batch overlaps with writing the next instead of the two meeting after every
/// batch, and at most [`HASH_BACKLOG`] bytes wait for it. `finish` hands back the check.
struct Hasher {
    batches: tokio::sync::mpsc::UnboundedSender<Vec<Bytes>>,
    room: Arc<tokio::sync::Semaphore>,
    done: tokio::sync::oneshot::Receiver<DigestCheck>,
}

impl Hasher {
    /// Starts the hashing thread: a thread of its own rather than one of the blocking pool,
    /// so a writer leaked without being dropped never holds up the runtime's shutdown.
    fn start(mut check: DigestCheck) -> Result<Hasher, StoreError> {
        let (batches, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Bytes>>();
        let (tx_done, done) = tokio::sync::oneshot::channel();
        let room = Arc::new(tokio::sync::Semaphore::new(HASH_BACKLOG));
        let freed = room.clone();
        std::thread::Builder::new()
            .name("pullgate-hash".into())
            .spawn(move || {
                while let Some(batch) = rx.blocking_recv() {
                    let mut n = 0;
                    for c in &batch {
                        check.update(c);
                        n += c.len();
                    }
                    drop(batch);
                    freed.add_permits(n.min(HASH_BACKLOG));
                }
                let _ = tx_done.send(check);
            })
            .map_err(store_err)?;
        Ok(Hasher {
            batches,
            room,
            done,
        })
    }

    /// Queues a batch, waiting while the backlog is full.
    async fn push(&self, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        let n: usize = chunks.iter().map(Bytes::len).sum();
        let permits = u32::try_from(n.min(HASH_BACKLOG)).unwrap_or(u32::MAX);
        self.room
            .acquire_many(permits)
            .await
            .map_err(store_err)?
            .forget();
        self.batches
            .send(chunks)
            .map_err(|_| StoreError("the blob's hasher stopped".into()))
    }

    /// The check over every batch pushed.
    async fn finish(self) -> Result<DigestCheck, StoreError> {
        drop(self.batches);
        self.done
            .await
            .map_err(|_| StoreError("the blob's hasher stopped".into()))
    }
}

struct FsWriter {
    hex: String,
    /// Hashing happens off the event loop, beside the writes; None after a failed write.
    hasher: Option<Hasher>,
    file: Arc<File>,
    tmp: PathBuf,
    dest: PathBuf,
    written: u64,
    /// The staging file became the blob (or the blob was already there and it was removed).
    committed: bool,
    usage: Arc<Usage>,
}

impl Drop for FsWriter {
    /// Committed, aborted or abandoned (the fill's task was dropped): the staged bytes stop
    /// counting, and an uncommitted staging file is removed.
    fn drop(&mut self) {
        self.usage
            .staging
            .fetch_sub(self.written, Ordering::Relaxed);
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
        if let Ok(mut staged) = self.usage.staged.lock() {
            if staged
                .get(&self.hex)
                .is_some_and(|f| Arc::ptr_eq(f, &self.file))
            {
                staged.remove(&self.hex);
            }
        }
        // A fill's window, backlog and hash queue (tens of MiB) are freed by now; glibc keeps
        // freed heap mapped, and the process's RSS would stay at the fill's peak.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

struct FsTail(Arc<File>);

#[async_trait::async_trait(?Send)]
impl TailReader for FsTail {
    async fn read_at(&self, offset: u64, max: usize) -> Result<Bytes, StoreError> {
        let f = self.0.clone();
        // Persisted bytes of the staged file, mapped like a committed blob's chunk (so a
        // reader behind the fill's window goes out with `sendfile` too); read into memory
        // when the range cannot be mapped.
        blocking(move || match Mapped::new(f.clone(), offset, max) {
            Some(m) => Ok(Bytes::from_owner(m)),
            None => {
                let mut buf = vec![0u8; max];
                let n = f.read_at(&mut buf, offset).map_err(store_err)?;
                buf.truncate(n);
                Ok(Bytes::from(buf))
            }
        })
        .await
    }
}

#[async_trait::async_trait(?Send)]
impl BlobWriter for FsWriter {
    async fn write(&mut self, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        let (f, at) = (self.file.clone(), self.written);
        let hasher = self
            .hasher
            .take()
            .ok_or_else(|| StoreError("a previous write failed".into()))?;
        let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        hasher.push(chunks.clone()).await?;
        blocking(move || {
            let mut at = at;
            for c in &chunks {
                f.write_all_at(c, at).map_err(store_err)?;
                at += c.len() as u64;
            }
            Ok(())
        })
        .await?;
        self.hasher = Some(hasher);
        self.written += len;
        self.usage.staging.fetch_add(len, Ordering::Relaxed);
        self.usage.check_cap();
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), CommitError> {
        // A mismatch returns here; dropping the writer removes the staging file.
        self.hasher
            .take()
            .ok_or_else(|| StoreError("a previous write failed".into()))?
            .finish()
            .await?
            .finish()?;
        let (tmp, dest) = (self.tmp.clone(), self.dest.clone());
        // A hard link either creates the blob or finds it already there, atomically; a rename
        // would silently replace an existing blob, and its bytes would be counted again.
        let created = blocking(move || {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(store_err)?;
            }
            let created = match std::fs::hard_link(&tmp, &dest) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(store_err(e)),
            };
            std::fs::remove_file(&tmp).map_err(store_err)?;
            Ok(created)
        })
        .await?;
        self.committed = true;
        // The staged bytes stop counting before the blob does, so they are never counted
        // twice (which would start an eviction pass that removes unrelated blobs).
        let n = std::mem::take(&mut self.written);
        self.usage.staging.fetch_sub(n, Ordering::Relaxed);
        if created {
            self.usage.add(n);
        }
        Ok(())
    }

    async fn abort(self: Box<Self>) {
        // Dropping the writer removes the staging file.
    }

    fn tail(&self) -> Option<Rc<dyn TailReader>> {
        Some(Rc::new(FsTail(self.file.clone())))
    }
}

/// What the native store holds on disk, for `/metrics` and the startup log.
pub struct StorageReport {
    blobs: Rc<FsBlobStore>,
    kv: Rc<RedbKv>,
}

impl StorageReport {
    /// Reports on `blobs` and `kv`.
    pub fn new(blobs: Rc<FsBlobStore>, kv: Rc<RedbKv>) -> StorageReport {
        StorageReport { blobs, kv }
    }

    /// Prometheus gauges, appended to the core's counters on `/metrics`: what is on disk,
    /// and the cache's content by kind (`pullgate_cache_bytes`, `pullgate_cache_objects`;
    /// manifests are counted once, then kept by every write).
    pub fn render(&self) -> String {
        let (manifests, manifest_bytes) = self
            .kv
            .prefix_usage(crate::core::registry::keys::MANIFEST_PREFIX)
            .unwrap_or((0, 0));
        let cache = format!(
            "# HELP pullgate_cache_bytes Bytes cached, by kind.\n\
             # TYPE pullgate_cache_bytes gauge\n\
             pullgate_cache_bytes{{kind=\"blob\"}} {}\n\
             pullgate_cache_bytes{{kind=\"manifest\"}} {manifest_bytes}\n\
             # HELP pullgate_cache_objects Objects cached, by kind.\n\
             # TYPE pullgate_cache_objects gauge\n\
             pullgate_cache_objects{{kind=\"blob\"}} {}\n\
             pullgate_cache_objects{{kind=\"manifest\"}} {manifests}\n",
            self.blobs.total_bytes(),
            self.blobs.blob_count(),
        );
        cache
            + &format!(
                "# HELP pullgate_store_bytes Bytes on disk by kind (native host).\n\
             # TYPE pullgate_store_bytes gauge\n\
             pullgate_store_bytes{{kind=\"blobs\"}} {}\n\
             pullgate_store_bytes{{kind=\"staging\"}} {}\n\
             pullgate_store_bytes{{kind=\"metadata\"}} {}\n\
             # HELP pullgate_store_blobs Blobs stored (native host).\n\
             # TYPE pullgate_store_blobs gauge\n\
             pullgate_store_blobs {}\n",
                self.blobs.total_bytes(),
                self.blobs.staging_bytes(),
                self.kv.file_bytes(),
                self.blobs.blob_count(),
            )
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        format!(
            "storage blobs={} blob_bytes={} max_size={} metadata_bytes={}",
            self.blobs.blob_count(),
            self.blobs.total_bytes(),
            self.blobs.usage.max_size,
            self.kv.file_bytes()
        )
    }

    /// Appends [`render`](Self::render) to a `/metrics` answer (a whole text body).
    pub fn append_metrics(&self, resp: &mut http::Response<crate::core::body::Body>) {
        if let crate::core::body::Body::Bytes(b) = resp.body() {
            let mut text = b.to_vec();
            text.extend_from_slice(self.render().as_bytes());
            resp.headers_mut().remove(http::header::CONTENT_LENGTH);
            *resp.body_mut() = crate::core::body::Body::Bytes(Bytes::from(text));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ports::KvStore;
    use filetime::{set_file_mtime, FileTime};

    #[tokio::test]
    async fn a_clone_never_serves_a_cached_record_after_another_clone_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = RedbKv::open(&dir.path().join("m.redb")).unwrap();
        let b = a.clone();
        // Cached absent, then written elsewhere.
        assert_eq!(a.get("k").await.unwrap(), None);
        b.put("k", b"v1").await.unwrap();
        assert_eq!(a.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
        // Cached present (read twice: the second from the cache), then replaced and deleted.
        assert_eq!(a.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
        b.put("k", b"v2").await.unwrap();
        assert_eq!(a.get("k").await.unwrap().as_deref(), Some(&b"v2"[..]));
        b.delete("k").await.unwrap();
        assert_eq!(a.get("k").await.unwrap(), None);
        // A clone's own writes, and values too large to cache.
        let big = vec![7u8; crate::native::redb_kv::READ_CACHE_VALUE_MAX + 1];
        a.put("big", &big).await.unwrap();
        assert_eq!(a.get("big").await.unwrap(), Some(big.clone()));
        assert_eq!(b.get("big").await.unwrap(), Some(big));
    }

    #[tokio::test]
    async fn mapped_reads_return_the_exact_bytes_of_any_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..(3 * READ_CHUNK + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        for (start, end) in [
            (0, data.len()),
            (1, 4097),
            (4095, 2 * READ_CHUNK + 3),
            (data.len() - 1, data.len()),
        ] {
            let got: Vec<u8> = file_stream(file.clone(), start as u64, end as u64)
                .map(|c| c.unwrap().to_vec())
                .concat()
                .await;
            assert_eq!(got, &data[start..end], "{start}..{end}");
        }
        // A range the file does not hold is not mapped (it would fault): the read fails.
        let past = file_stream(file, data.len() as u64, data.len() as u64 + 10)
            .collect::<Vec<_>>()
            .await;
        assert!(past[0].is_err());
    }

    #[test]
    fn eviction_removes_least_recently_accessed_first_across_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("b");
        std::fs::create_dir_all(blobs.join("aa")).unwrap();
        std::fs::create_dir_all(blobs.join("bb")).unwrap();
        let mk = |p: &str, age: i64| {
            let path = blobs.join(p);
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            set_file_mtime(&path, FileTime::from_unix_time(1_700_000_000 - age, 0)).unwrap();
            path
        };
        let old = mk("aa/old", 300);
        let mid = mk("bb/mid", 200);
        let new = mk("aa/new", 100);
        let total = AtomicU64::new(300);
        assert_eq!(evict(&blobs, &total, 150), (200, 2));
        assert!(!old.exists() && !mid.exists() && new.exists());
        assert_eq!(total.load(Ordering::Relaxed), 100);
    }
}
