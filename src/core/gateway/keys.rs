//! The gateway's storage keys: runs (`run/<id>`), the by-commit and by-image indexes that
//! find them, and the hash the keys and the dedup records are built with. Pure. The outbox's
//! keys are in [`super::outbox`] (records) and [`super::pump`] (due index), the dedup records'
//! in [`super::replay`].

use crate::core::registry::route::looks_like_host;
use sha2::{Digest as _, Sha256};

/// Key prefix of pending deliveries.
pub const PENDING: &str = "outbox/pending/";
/// Key prefix of dead letters.
pub const DEAD: &str = "outbox/dead/";
/// Key prefix of the due-time index.
pub const DUE: &str = "outbox/due/";

/// sha256 over `parts`, each followed by a NUL, in hex.
pub(crate) fn hash_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

/// `acme/app:tag` for an image reference, without its registry host: what a registry
/// notification (which names the repository and tag) is matched against.
pub fn image_key(image: &str) -> String {
    match image.split_once('/') {
        Some((first, rest)) if looks_like_host(first) => rest.to_string(),
        _ => image.to_string(),
    }
}

/// The key of run `id`.
pub(crate) fn run_key(id: &str) -> String {
    format!("run/{id}")
}

/// Prefix of the by-commit index entries of every run of `repository`.
pub(crate) fn repository_prefix(repository: &str) -> String {
    format!(
        "run-by-commit/{}/",
        &hash_hex(&[repository.as_bytes()])[..16]
    )
}

/// Prefix of the by-commit index entries (`<prefix><run id>`) of one commit's runs.
pub(crate) fn commit_index(repository: &str, commit: &str) -> String {
    format!("{}{commit}/", repository_prefix(repository))
}

/// Prefix of the by-image index entries of the runs that build image `key` ([`image_key`]).
pub(crate) fn image_index(key: &str) -> String {
    format!("run-by-image/{}/", &hash_hex(&[key.as_bytes()])[..32])
}

/// The index entry of a delivery due at `next_ms`.
pub fn due_key(next_ms: u64, id: &str) -> String {
    format!("{DUE}{next_ms:016}/{id}")
}

/// (due ms, delivery id) of an index entry.
pub fn parse_due_key(key: &str) -> Option<(u64, &str)> {
    let (ms, id) = key.strip_prefix(DUE)?.split_once('/')?;
    if ms.len() != 16 || id.is_empty() {
        return None;
    }
    Some((ms.parse().ok()?, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_keys_drop_the_registry_host() {
        assert_eq!(
            image_key("registry.example.com/acme/app:main-1"),
            "acme/app:main-1"
        );
        assert_eq!(image_key("127.0.0.1:5000/acme/app:v1"), "acme/app:v1");
        assert_eq!(image_key("localhost/app:v1"), "app:v1");
        assert_eq!(image_key("acme/app:v1"), "acme/app:v1");
    }
}
