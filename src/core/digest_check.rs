//! The commit-time digest check every blob store runs: a SHA-256 bound to the digest given to
//! [`BlobStore::create`](crate::core::ports::BlobStore::create), fed every byte a
//! [`BlobWriter`](crate::core::ports::BlobWriter) is given, and asked at `commit` whether the
//! bytes may become visible. It is the one place that hashes staged blob bytes and words a
//! mismatch ([`CommitError::DigestMismatch`]), so the stores differ only in where the bytes go.
//!
//! A store whose platform hashes the bytes itself (R2 through the runtime's
//! `crypto.DigestStream`, so no blob byte is hashed in wasm) hands the finished hash to
//! [`verify_sha256`] instead of feeding a [`DigestCheck`]; the comparison and its error are
//! the same.
//!
//! It only checks: it stores nothing, and it must not be fed bytes other than exactly those
//! that will be committed, in order. Blob keys use [`Digest::hex`], the one hex accessor.

use crate::core::ports::CommitError;
use crate::core::registry::reference::Digest;
use sha2::{Digest as _, Sha256};

/// A streaming SHA-256 of a blob being written, bound to the digest it must match.
///
/// `Send`, so a host may hash on another thread (the native store moves it to a blocking
/// thread for each write and back).
#[derive(Clone)]
pub struct DigestCheck {
    expected: Digest,
    hasher: Sha256,
    len: u64,
}

impl std::fmt::Debug for DigestCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestCheck")
            .field("expected", &self.expected)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl DigestCheck {
    /// A check for bytes that must hash to `expected`.
    pub fn new(expected: &Digest) -> DigestCheck {
        DigestCheck {
            expected: expected.clone(),
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Feeds the next bytes, in the order they are written.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest the bytes must match.
    pub fn expected(&self) -> &Digest {
        &self.expected
    }

    /// Ok when the bytes fed hash to the expected digest; otherwise
    /// [`CommitError::DigestMismatch`] naming what they hash to, and nothing may be stored.
    pub fn finish(self) -> Result<(), CommitError> {
        verify_sha256(&self.expected, self.hasher.finalize().as_slice())
    }
}

/// Compares a SHA-256 computed elsewhere (by the platform) with `expected`: Ok when equal,
/// otherwise [`CommitError::DigestMismatch`] naming the actual digest.
pub fn verify_sha256(expected: &Digest, actual: &[u8]) -> Result<(), CommitError> {
    let actual = Digest::from_sha256(actual);
    if actual == *expected {
        Ok(())
    } else {
        Err(CommitError::DigestMismatch {
            actual: actual.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_fed_in_any_chunking_pass_the_check_of_their_digest() {
        let data = b"hello, content-addressed world";
        let d = Digest::of(data);
        for split in [0, 1, 7, data.len()] {
            let mut c = DigestCheck::new(&d);
            c.update(&data[..split]);
            c.update(&data[split..]);
            assert_eq!(c.len(), data.len() as u64);
            assert_eq!(c.finish(), Ok(()));
        }
    }

    #[test]
    fn other_bytes_are_a_mismatch_naming_what_they_hash_to() {
        let d = Digest::of(b"expected");
        let mut c = DigestCheck::new(&d);
        c.update(b"something else");
        assert_eq!(
            c.finish(),
            Err(CommitError::DigestMismatch {
                actual: Digest::of(b"something else").to_string()
            })
        );
    }

    #[test]
    fn nothing_fed_passes_only_for_the_empty_digest() {
        assert_eq!(DigestCheck::new(&Digest::of(b"")).finish(), Ok(()));
        assert!(DigestCheck::new(&Digest::of(b"x")).finish().is_err());
    }

    #[test]
    fn a_platform_hash_is_compared_the_same_way() {
        let d = Digest::of(b"abc");
        let raw = hex::decode(d.hex()).unwrap();
        assert_eq!(verify_sha256(&d, &raw), Ok(()));
        assert!(matches!(
            verify_sha256(&d, &[0u8; 32]),
            Err(CommitError::DigestMismatch { .. })
        ));
    }
}
