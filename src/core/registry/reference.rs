//! Repository names, tags and digests: the three things a client puts in a registry path.
//!
//! Everything here is validated before it becomes part of a storage key or an upstream URL
//! (OCI distribution spec, "Pulling" and the grammar in the spec's overview). Only `sha256`
//! digests are accepted: it is the algorithm every registry in use emits, and the one the
//! cache can verify while streaming.

use std::fmt;

/// Longest repository name accepted (the distribution reference grammar's limit).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag accepted.
pub const MAX_TAG_LEN: usize = 128;

/// Why a name, tag or digest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The repository name breaks the grammar.
    #[error("invalid repository name {0:?}")]
    Name(String),
    /// The tag breaks the grammar.
    #[error("invalid tag {0:?}")]
    Tag(String),
    /// The digest is malformed or uses an algorithm the cache cannot verify.
    #[error("invalid digest {0:?}: only sha256:<64 lowercase hex> is accepted")]
    Digest(String),
}

/// A validated repository name such as `library/alpine` or `team/sub/app`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name(String);

impl Name {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name with `prefix/` put in front (Docker Hub's `library/` normalisation), checked
    /// again: a name near [`MAX_NAME_LEN`] can outgrow it.
    pub fn with_prefix(&self, prefix: &str) -> Result<Name, ReferenceError> {
        parse_name(&format!("{prefix}/{}", self.0))
    }

    /// True when the name has exactly one path component.
    pub fn is_single_component(&self) -> bool {
        !self.0.contains('/')
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-"; it must be followed by alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum(b[i]) {
            return false;
        }
    }
    true
}

/// Parses a repository name against the distribution grammar.
pub fn parse_name(s: &str) -> Result<Name, ReferenceError> {
    if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(is_component) {
        return Err(ReferenceError::Name(s.to_string()));
    }
    Ok(Name(s.to_string()))
}

/// A validated tag such as `latest` or `v1.2.3`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Parses a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn parse_tag(s: &str) -> Result<Tag, ReferenceError> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
    if ok {
        Ok(Tag(s.to_string()))
    } else {
        Err(ReferenceError::Tag(s.to_string()))
    }
}

/// A validated `sha256:<hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The full `sha256:<hex>` form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex characters.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest::from_sha256(sha2::Sha256::digest(bytes).as_slice())
    }

    /// Builds a digest from a finished sha256 output.
    pub fn from_sha256(raw: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(raw)))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses a digest; only sha256 with 64 lowercase hex characters is accepted.
pub fn parse_digest(s: &str) -> Result<Digest, ReferenceError> {
    let hex = s
        .strip_prefix("sha256:")
        .ok_or_else(|| ReferenceError::Digest(s.to_string()))?;
    if hex.len() == 64
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        Ok(Digest(s.to_string()))
    } else {
        Err(ReferenceError::Digest(s.to_string()))
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

/// Parses the `<reference>` of `/manifests/<reference>`: a digest when it contains `:`.
pub fn parse_reference(s: &str) -> Result<Reference, ReferenceError> {
    if s.contains(':') {
        parse_digest(s).map(Reference::Digest)
    } else {
        parse_tag(s).map(Reference::Tag)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t.as_str()),
            Reference::Digest(d) => f.write_str(d.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_distribution_grammar() {
        for ok in [
            "alpine",
            "library/alpine",
            "team/sub/app",
            "a.b_c__d-e---f",
            "x0/y1",
        ] {
            assert!(parse_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Alpine",
            "a//b",
            "/a",
            "a/",
            "a___b",
            "a..b",
            "-a",
            "a-",
            "a_",
            "a:b",
            "../etc",
            "a/../b",
            "a b",
            &"a".repeat(256),
        ] {
            assert!(parse_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags_follow_the_grammar() {
        for ok in ["latest", "v1.2.3", "_x", "A-b_c.d", &"t".repeat(128)] {
            assert!(parse_tag(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"t".repeat(129), "ü"] {
            assert!(parse_tag(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn digests_must_be_sha256_lower_hex() {
        let good = format!("sha256:{}", "a1".repeat(32));
        assert_eq!(parse_digest(&good).unwrap().hex(), "a1".repeat(32));
        for bad in [
            "sha256:abc".to_string(),
            format!("sha256:{}", "A1".repeat(32)),
            format!("sha512:{}", "a1".repeat(64)),
            format!("sha256:{}/..", "a1".repeat(31)),
            "a1".repeat(32),
        ] {
            assert!(parse_digest(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reference_is_digest_when_it_has_a_colon() {
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(parse_reference(&d), Ok(Reference::Digest(_))));
        assert!(matches!(parse_reference("v1"), Ok(Reference::Tag(_))));
        assert!(parse_reference("md5:00").is_err());
    }

    #[test]
    fn digest_of_known_bytes() {
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
