//! Zero-copy sends of stored blobs (issue #13, warm path): `sendfile(2)` from the blob file
//! to the socket, for the bytes of a blob chunk that hyper hands to a plain connection.
//!
//! hyper owns the connection and writes `Bytes`; it has no notion of a file. A warm blob's
//! chunks are read-only mappings of its file ([`store`](crate::native::store)'s `Mapped`), and
//! each mapping registers here the address range it covers with the file and offset behind
//! it. When the connection's writer ([`WatchedIo`](crate::native::listener::WatchedIo)) is
//! asked to write a buffer that lies inside a registered range, it asks the kernel to send
//! that range of the file instead of copying the mapped bytes: the same bytes (blob files
//! never change once committed), without the user-to-kernel copy. Anything else (response
//! heads, manifests, TLS records, which are encrypted copies) is written as before.
//!
//! Lookups cost nothing for small writes (a buffer under [`MIN_LEN`] is never looked up) and
//! nothing while no mapping is alive; a lookup is one lock of a small ordered map.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Buffers shorter than this are written normally without a lookup (a blob chunk is
/// hundreds of KiB; heads and manifests are a few KiB).
pub const MIN_LEN: usize = 16 * 1024;

/// A registered range: `len` bytes from its start address are bytes `[pos, pos + len)` of
/// `file`.
struct Region {
    len: usize,
    file: Arc<std::fs::File>,
    pos: u64,
}

static REGIONS: Mutex<BTreeMap<usize, Region>> = Mutex::new(BTreeMap::new());
static LIVE: AtomicUsize = AtomicUsize::new(0);
static SENT: AtomicU64 = AtomicU64::new(0);

/// Bytes sent with `sendfile` since the process started (`/metrics`).
pub fn sent_bytes() -> u64 {
    SENT.load(Ordering::Relaxed)
}

/// Records that `len` bytes at `start` are bytes `[pos, pos + len)` of `file`, until
/// [`unregister`] with the same `start`. The caller keeps the memory mapped (and the file
/// unchanged) until then.
pub fn register(start: usize, len: usize, file: Arc<std::fs::File>, pos: u64) {
    if let Ok(mut regions) = REGIONS.lock() {
        regions.insert(start, Region { len, file, pos });
        LIVE.fetch_add(1, Ordering::Release);
    }
}

/// Forgets the range registered at `start` (before its memory is unmapped).
pub fn unregister(start: usize) {
    if let Ok(mut regions) = REGIONS.lock() {
        if regions.remove(&start).is_some() {
            LIVE.fetch_sub(1, Ordering::Release);
        }
    }
}

/// The file (as a descriptor valid while the buffer is borrowed: the buffer's owner holds
/// the file) and offset behind `buf`, when all of `buf` lies in one registered range.
pub fn source_of(buf: &[u8]) -> Option<(RawFd, u64)> {
    use std::os::fd::AsRawFd;
    if buf.len() < MIN_LEN || LIVE.load(Ordering::Acquire) == 0 {
        return None;
    }
    let at = buf.as_ptr() as usize;
    let regions = REGIONS.lock().ok()?;
    let (start, region) = regions.range(..=at).next_back()?;
    let into = at - start;
    (into.checked_add(buf.len())? <= region.len)
        .then(|| (region.file.as_raw_fd(), region.pos + into as u64))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_registered_range_is_found_by_any_buffer_inside_it() {
        let file = Arc::new(tempfile_with(&[7u8; 100_000]));
        let backing = vec![0u8; 100_000];
        let start = backing.as_ptr() as usize;
        register(start, 80_000, file.clone(), 1000);
        let (fd, pos) = source_of(&backing[..20_000]).unwrap();
        assert_eq!(pos, 1000);
        assert_eq!(fd, std::os::fd::AsRawFd::as_raw_fd(&*file));
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
