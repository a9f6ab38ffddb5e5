//! Storage key layout, in one place. Keys are ASCII and at most 250 bytes (Spin's key-value
//! store takes 256); a longer key is replaced by its prefix and a sha256 of the whole.

use sha2::{Digest as _, Sha256};

/// Longest key written as is.
const MAX_KEY: usize = 250;

fn bounded(prefix: &str, rest: String) -> String {
    let key = format!("{prefix}{rest}");
    if key.len() <= MAX_KEY {
        key
    } else {
        format!("{prefix}#{}", hex::encode(Sha256::digest(key.as_bytes())))
    }
}

/// A manifest by digest.
pub fn manifest(digest: &str) -> String {
    bounded("manifest/", digest.to_string())
}

/// A tag record: upstream host, repository, accept class, tag.
pub fn tag(host: &str, name: &str, class: &str, tag: &str) -> String {
    bounded("tag/", format!("{host}/{name}/{class}/{tag}"))
}

/// A cached tag list page.
pub fn tag_list(host: &str, name: &str, n: Option<u32>, last: Option<&str>) -> String {
    bounded(
        "tags/",
        format!(
            "{host}/{name}?n={}&last={}",
            n.map(|n| n.to_string()).unwrap_or_default(),
            last.unwrap_or("")
        ),
    )
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
}
