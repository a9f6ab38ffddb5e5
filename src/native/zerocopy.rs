//! Zero-copy sends of stored blobs (issue #13, warm path): `sendfile(2)` from the blob file
//! to the socket, for the bytes of a blob chunk that hyper hands to a plain connection.
//!
//! hyper owns the connection and writes `Bytes`; it has no notion of a file. A warm blob's
//! chunks are read-only mappings of its file ([`Mapped`]), and each mapping registers here the address range it covers with the file and offset behind
//! it. When the connection's writer ([`WatchedIo`](crate::native::listener::WatchedIo)) is
//! asked to write a buffer that lies inside a registered range, it asks the kernel to send
//! that range of the file instead of copying the mapped bytes: the same bytes (blob files
//! never change once committed), without the user-to-kernel copy. Anything else (response
//! heads, manifests, TLS records, which are encrypted copies) is written as before.
//!
//! Lookups cost nothing for small writes (a buffer under [`MIN_LEN`] is never looked up) and
//! nothing while no mapping is alive; a lookup is one lock of a small ordered map.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Buffers shorter than this are written normally without a lookup (a blob chunk is
/// hundreds of KiB; heads and manifests are a few KiB).
pub const MIN_LEN: usize = 16 * 1024;

/// A registered range: `len` bytes from its start address are bytes `[pos, pos + len)` of
/// the file open as `fd` (held open by the [`Mapped`] that registered the range, until it
/// unregisters it).
struct Region {
    len: usize,
    fd: RawFd,
    pos: u64,
}

static REGIONS: Mutex<BTreeMap<usize, Region>> = Mutex::new(BTreeMap::new());
static LIVE: AtomicUsize = AtomicUsize::new(0);
static SENT: AtomicU64 = AtomicU64::new(0);

/// Bytes sent with `sendfile` since the process started (`/metrics`).
pub fn sent_bytes() -> u64 {
    SENT.load(Ordering::Relaxed)
}

/// Records that `len` bytes at `start` are bytes `[pos, pos + len)` of the file open as `fd`,
/// until [`unregister`] with the same `start`. The caller keeps the memory mapped, the file
/// open and unchanged until then.
fn register(start: usize, len: usize, fd: RawFd, pos: u64) {
    if let Ok(mut regions) = REGIONS.lock() {
        regions.insert(start, Region { len, fd, pos });
        LIVE.fetch_add(1, Ordering::Release);
    }
}

/// Forgets the range registered at `start` (before its memory is unmapped).
fn unregister(start: usize) {
    if let Ok(mut regions) = REGIONS.lock() {
        if regions.remove(&start).is_some() {
            LIVE.fetch_sub(1, Ordering::Release);
        }
    }
}

/// The file (as a descriptor valid while the buffer is borrowed: the buffer's owner holds
/// the file) and offset behind `buf`, when all of `buf` lies in one registered range.
pub fn source_of(buf: &[u8]) -> Option<(RawFd, u64)> {
    if buf.len() < MIN_LEN || LIVE.load(Ordering::Acquire) == 0 {
        return None;
    }
    let at = buf.as_ptr() as usize;
    let regions = REGIONS.lock().ok()?;
    let (start, region) = regions.range(..=at).next_back()?;
    let into = at - start;
    (into.checked_add(buf.len())? <= region.len).then(|| (region.fd, region.pos + into as u64))
}

/// Sends up to `len` bytes of `file` from `pos` to `socket`; the bytes sent. `EAGAIN` comes
/// back as [`std::io::ErrorKind::WouldBlock`].
pub fn send(socket: RawFd, file: RawFd, pos: u64, len: usize) -> std::io::Result<usize> {
    let mut offset = libc::off_t::try_from(pos)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: both descriptors are open for the duration of the call (the socket is owned by
    // the caller's stream, the file by the registered region's owner, which the caller's
    // borrowed buffer keeps alive); `offset` is a valid out-pointer.
    let n = unsafe { libc::sendfile(socket, file, &mut offset, len) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    SENT.fetch_add(n as u64, Ordering::Relaxed);
    Ok(n)
}

/// `len` bytes of a blob file from `pos`, mapped read-only and unmapped when the last
/// [`Bytes`] over it is dropped. The range is read into the page cache when mapped, on the
/// blocking pool ([`read_in_here`]), so neither `sendfile` nor a copy from the mapping waits
/// for the disk on a worker.
///
/// A mapping reads the file as it is while mapped. Blob files never change once committed
/// (they are written under `tmp/` and linked into place; eviction unlinks them, which a
/// mapping outlives), and a staged file is only appended to (a reader maps bytes already
/// written); only a file truncated behind the store's back could fault.
///
/// While it lives, the mapping is registered here with the file it holds open, so a plain
/// connection sends its bytes with `sendfile` from the file rather than copying them from the
/// mapping.
pub(crate) struct Mapped {
    base: std::ptr::NonNull<libc::c_void>,
    map_len: usize,
    skip: usize,
    len: usize,
    /// Held open for `sendfile` while the mapping is registered (fields drop after `drop`,
    /// which unregisters).
    file: Arc<File>,
}

// SAFETY: the mapping is read-only and owned by this value alone; reading it from another
// thread is as safe as reading any immutable memory.
unsafe impl Send for Mapped {}

impl Mapped {
    /// None when the range cannot be mapped (the caller reads it instead).
    pub(crate) fn new(file: Arc<File>, pos: u64, len: usize) -> Option<Mapped> {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| *p > 0)?;
        let at = pos - pos % page;
        let skip = usize::try_from(pos - at).ok()?;
        let map_len = skip.checked_add(len)?;
        if len == 0 || file.metadata().ok()?.len() < pos + len as u64 {
            return None;
        }
        // SAFETY: a fresh private read-only mapping of a range inside the file; the pointer
        // is checked before use and unmapped exactly once, in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                libc::off_t::try_from(at).ok()?,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        read_in_here(base, map_len, page as usize);
        let mapped = Mapped {
            base: std::ptr::NonNull::new(base)?,
            map_len,
            skip,
            len,
            file,
        };
        register(mapped.start(), len, mapped.file.as_raw_fd(), pos);
        Some(mapped)
    }

    /// The address of the first byte served.
    fn start(&self) -> usize {
        self.base.as_ptr() as usize + self.skip
    }
}

/// Makes sure the mapped range is in the page cache, here (on the blocking pool): when every
/// page is resident already (a warm blob, the usual case) nothing is done, and the mapping
/// stays without page-table entries, so a `sendfile` from the file never touches it and
/// unmapping it costs no TLB shootdown; otherwise the pages are read in and mapped
/// (`MADV_POPULATE_READ`, or a read of each page where the kernel lacks it).
fn read_in_here(base: *mut libc::c_void, map_len: usize, page: usize) {
    let pages = map_len.div_ceil(page);
    let mut resident = vec![0u8; pages];
    // SAFETY: `base` is a live mapping of `map_len` bytes and `resident` has one byte per page.
    let known = unsafe { libc::mincore(base, map_len, resident.as_mut_ptr()) } == 0;
    if known && resident.iter().all(|r| r & 1 == 1) {
        return;
    }
    // SAFETY: advice on a live read-only mapping of the caller's.
    if unsafe { libc::madvise(base, map_len, libc::MADV_POPULATE_READ) } == 0 {
        return;
    }
    for i in 0..pages {
        // SAFETY: page `i` lies inside the live readable mapping.
        unsafe { std::ptr::read_volatile(base.cast::<u8>().add(i * page)) };
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: [skip, skip + len) lies inside the live mapping of map_len bytes.
        unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().cast::<u8>().add(self.skip), self.len)
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // Forgotten before the range is unmapped (and could be mapped again for another file).
        unregister(self.start());
        // SAFETY: base/map_len are exactly what mmap returned; nothing borrows it any more.
        unsafe {
            libc::munmap(self.base.as_ptr(), self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_registered_range_is_found_by_any_buffer_inside_it() {
        let file = tempfile_with(&[7u8; 100_000]);
        let backing = vec![0u8; 100_000];
        let start = backing.as_ptr() as usize;
        register(start, 80_000, std::os::fd::AsRawFd::as_raw_fd(&file), 1000);
        let (fd, pos) = source_of(&backing[..20_000]).unwrap();
        assert_eq!(pos, 1000);
        assert_eq!(fd, std::os::fd::AsRawFd::as_raw_fd(&file));
        assert_eq!(source_of(&backing[30_000..60_000]).unwrap().1, 31_000);
        // Past the end, too short, or unregistered: no source.
        assert!(source_of(&backing[70_000..]).is_none());
        assert!(source_of(&backing[..100]).is_none());
        unregister(start);
        assert!(source_of(&backing[..20_000]).is_none());
    }

    #[test]
    fn send_moves_the_file_range_to_a_socket() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let f = tempfile_with(&data);
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            a.read_to_end(&mut got).unwrap();
            got
        });
        let (mut pos, end) = (5_000u64, 150_000u64);
        while pos < end {
            use std::os::fd::AsRawFd;
            let n = send(b.as_raw_fd(), f.as_raw_fd(), pos, (end - pos) as usize).unwrap();
            assert!(n > 0);
            pos += n as u64;
        }
        drop(b);
        assert_eq!(reader.join().unwrap(), data[5_000..150_000]);
    }

    fn tempfile_with(data: &[u8]) -> std::fs::File {
        let dir = std::env::temp_dir().join(format!(
            "pullgate-zerocopy-{}-{}",
            std::process::id(),
            data.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blob");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        f
    }
}
