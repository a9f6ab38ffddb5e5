//! The registry's stored record formats: a manifest as stored (media type and exact bytes)
//! and a tag record. A leaf, so `admin` can read what the registry writes.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Version of the stored manifest format.
const MANIFEST_FORMAT: u8 = 1;
/// Version of the tag record format.
pub const TAG_RECORD_VERSION: u32 = 1;

/// A manifest as stored: its media type and exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    /// Media type (`Content-Type` to serve).
    pub media_type: String,
    /// The exact bytes.
    pub bytes: Bytes,
}

impl StoredManifest {
    /// `[format u8][len u16 BE][media type][bytes]`.
    pub fn encode(&self) -> Vec<u8> {
        let mt = self.media_type.as_bytes();
        let mut out = Vec::with_capacity(3 + mt.len() + self.bytes.len());
        out.push(MANIFEST_FORMAT);
        out.extend_from_slice(&(mt.len() as u16).to_be_bytes());
        out.extend_from_slice(mt);
        out.extend_from_slice(&self.bytes);
        out
    }

    /// Inverse of `encode`; None for an unknown format.
    pub fn decode(raw: &[u8]) -> Option<StoredManifest> {
        if raw.len() < 3 || raw[0] != MANIFEST_FORMAT {
            return None;
        }
        let n = u16::from_be_bytes([raw[1], raw[2]]) as usize;
        let mt = std::str::from_utf8(raw.get(3..3 + n)?).ok()?;
        Some(StoredManifest {
            media_type: mt.to_string(),
            bytes: Bytes::copy_from_slice(&raw[3 + n..]),
        })
    }
}

/// Tag → digest, with when it was last confirmed upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    /// Format version.
    pub v: u32,
    /// Digest the tag pointed at.
    pub digest: String,
    /// Last time the upstream confirmed it (ms since epoch).
    pub checked_ms: u64,
}
