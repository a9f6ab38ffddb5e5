//! Storage key layout, in one place. Keys are ASCII and at most 250 bytes (Spin's key-value
//! store takes 256); a longer key is replaced by its prefix and a sha256 of the whole.

use sha2::{Digest as _, Sha256};

/// Longest key written as is.
const MAX_KEY: usize = 250;

/// `prefix` + `rest`, or, when that is over the limit, `prefix#<sha256 of the whole>`.
pub fn bounded(prefix: &str, rest: String) -> String {
    let key = format!("{prefix}{rest}");
    if key.len() <= MAX_KEY {
        key
    } else {
        format!("{prefix}#{}", hex::encode(Sha256::digest(key.as_bytes())))
    }
}

/// The prefix of manifests by digest.
pub const MANIFEST_PREFIX: &str = "manifest/";

/// A manifest by digest.
pub fn manifest(digest: &str) -> String {
    bounded(MANIFEST_PREFIX, digest.to_string())
}

/// A tag record: upstream host, repository, accept class, tag.
pub fn tag(host: &str, name: &str, class: &str, tag: &str) -> String {
    bounded(TAG, tag_path(host, name, class, tag))
}

/// Prefix of every tag record key.
pub const TAG: &str = "tag/";
/// Prefix of the tag record keys that were too long and are hashed: their records carry their
/// path (see `records::TagRecord::path`).
pub const HASHED_TAG: &str = "tag/#";

/// What a tag record's key holds before it is bounded: `<host>/<name>/<class>/<tag>`.
pub fn tag_path(host: &str, name: &str, class: &str, tag: &str) -> String {
    // Built by hand: this runs on every manifest-by-tag request.
    let mut path = String::with_capacity(host.len() + name.len() + class.len() + tag.len() + 3);
    for (i, part) in [host, name, class, tag].into_iter().enumerate() {
        if i > 0 {
            path.push('/');
        }
        path.push_str(part);
    }
    path
}

/// The prefix of a repository's (unhashed) tag record keys; nested repositories share it.
pub fn tag_prefix(host: &str, name: &str) -> String {
    format!("{TAG}{host}/{name}/")
}

/// The prefix of a repository's cached tag-list keys.
pub fn tag_list_prefix(host: &str, name: &str) -> String {
    format!("tags/{host}/{name}?")
}

/// The cached tag list: only the canonical first page (no `n`, no `last`) is ever stored, so
/// the key space per repository is one key however clients page. The `?n=&last=` suffix keeps
/// the layout admin purge lists by (`tags/<host>/<name>?`).
pub fn tag_list(host: &str, name: &str) -> String {
    bounded("tags/", format!("{host}/{name}?n=&last="))
}

/// Prefix of every link record.
pub const LINK_PREFIX: &str = "link/";

/// A link: repository `name` on upstream `host` is known to hold `digest` (a blob or a
/// manifest), so the cached bytes may be served for it.
pub fn link(host: &str, name: &str, digest: &str) -> String {
    bounded(LINK_PREFIX, format!("{host}/{name}/{digest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_hashed_and_short() {
        let k = tag("reg.test", &"a/".repeat(120), "i", "latest");
        assert!(k.len() <= MAX_KEY && k.starts_with("tag/#"));
        assert_eq!(
            tag("docker.io", "library/alpine", "i", "3"),
            "tag/docker.io/library/alpine/i/3"
        );
    }

    #[test]
    fn link_keys_are_per_repository_and_bounded() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            link("ghcr.io", "team/private", &d),
            format!("link/ghcr.io/team/private/{d}")
        );
        assert_ne!(
            link("ghcr.io", "team/private", &d),
            link("ghcr.io", "team/public", &d)
        );
        assert_ne!(link("ghcr.io", "a", &d), link("docker.io", "a", &d));
        let long = link("reg.test", &"a/".repeat(120), &d);
        assert!(long.len() <= MAX_KEY && long.starts_with("link/#"));
        assert_eq!(
            tag_list("docker.io", "library/alpine"),
            "tags/docker.io/library/alpine?n=&last="
        );
    }
}
