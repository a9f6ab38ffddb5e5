//! Warm tag answers kept decoded, per core instance: for a tag whose record, manifest and link
//! were all read from the store, what the answer is made of (the record, the manifest and its
//! ready-made headers), as of the store's write generation ([`KvStore::generation`]).
//!
//! A warm manifest by tag is otherwise three store reads, two decodes and a handful of
//! header values per request, rebuilt for the same bytes every time. An entry is taken with
//! the generation read *before* those reads, and is used only while the generation is still
//! that one: any write anywhere (a tag revalidated, a link written, a purge) drops every
//! entry, so an answer from here is always the answer the reads would give. The freshness of
//! the record and the client's `Accept` are still checked on every request. A store without
//! a generation (the edge KVs) keeps nothing here.
//!
//! [`KvStore::generation`]: crate::core::ports::KvStore::generation

use crate::core::body::Body;
use crate::core::http::{API_VERSION, CONTENT_DIGEST};
use crate::core::registry::media::header as h;
use crate::core::registry::records::{StoredManifest, TagRecord};
use http::{header, HeaderValue, Response};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Manifest bytes one instance keeps here before it starts over.
const MEMO_BYTES: usize = 1 << 20;
/// Manifests larger than this are never kept (an index of many platforms is a few KiB).
const MEMO_VALUE_MAX: usize = 64 << 10;

/// A manifest ready to serve: its bytes and the header values of the answer.
#[derive(Debug, Clone)]
pub(crate) struct Ready {
    bytes: bytes::Bytes,
    content_type: HeaderValue,
    len: HeaderValue,
    /// `Docker-Content-Digest` and `ETag`, when the digest is a valid header value.
    digest: Option<(HeaderValue, HeaderValue)>,
}

impl Ready {
    /// The headers of `m` served as `digest`. Fails only for a stored media type that is not
    /// a header value.
    pub fn new(digest: &str, m: StoredManifest) -> Result<Ready, http::header::InvalidHeaderValue> {
        let content_type = HeaderValue::from_str(&m.media_type)?;
        let digest = HeaderValue::from_str(digest).ok().and_then(|d| {
            let mut etag = String::with_capacity(digest.len() + 2);
            etag.push('"');
            etag.push_str(digest);
            etag.push('"');
            HeaderValue::from_str(&etag).ok().map(|e| (d, e))
        });
        Ok(Ready {
            len: HeaderValue::from(m.bytes.len()),
            bytes: m.bytes,
            content_type,
            digest,
        })
    }

    /// The answer: the manifest (no body for `HEAD`) with its headers.
    pub fn respond(&self, head: bool) -> Response<Body> {
        let mut resp = Response::new(if head {
            Body::Empty
        } else {
            Body::Bytes(self.bytes.clone())
        });
        let headers = resp.headers_mut();
        headers.reserve(5);
        headers.insert(API_VERSION, HeaderValue::from_static(h::API_VERSION_VALUE));
        headers.insert(header::CONTENT_TYPE, self.content_type.clone());
        headers.insert(header::CONTENT_LENGTH, self.len.clone());
        if let Some((digest, etag)) = &self.digest {
            headers.insert(CONTENT_DIGEST, digest.clone());
            headers.insert(header::ETAG, etag.clone());
        }
        resp
    }
}

/// One warm tag: its record, the media type it is served as, and the ready answer.
pub(crate) struct Warm {
    pub rec: TagRecord,
    pub media_type: String,
    pub ready: Ready,
}

/// The instance's warm tags (kept in the instance's slots).
#[derive(Default)]
pub(crate) struct WarmTags(RefCell<Memo>);

#[derive(Default)]
struct Memo {
    generation: u64,
    bytes: usize,
    /// By tag path (`<host>/<name>/<class>/<tag>`, see `keys::tag_path`).
    entries: HashMap<String, Rc<Warm>>,
}

impl Memo {
    /// Forgets everything unless it is as of `generation`.
    fn at(&mut self, generation: u64) -> &mut Memo {
        if self.generation != generation {
            self.entries.clear();
            self.bytes = 0;
            self.generation = generation;
        }
        self
    }
}

impl WarmTags {
    /// The warm entry for `path`, if one was kept as of `generation`.
    pub fn get(&self, generation: u64, path: &str) -> Option<Rc<Warm>> {
        self.0
            .borrow_mut()
            .at(generation)
            .entries
            .get(path)
            .cloned()
    }

    /// Keeps `warm` for `path`, as of `generation` (read before the reads it came from).
    pub fn keep(&self, generation: u64, path: &str, warm: Warm) {
        let size = path.len() + warm.ready.bytes.len();
        if warm.ready.bytes.len() > MEMO_VALUE_MAX {
            return;
        }
        let mut memo = self.0.borrow_mut();
        let memo = memo.at(generation);
        if memo.bytes + size > MEMO_BYTES {
            memo.entries.clear();
            memo.bytes = 0;
        }
        memo.bytes += size;
        memo.entries.insert(path.to_string(), Rc::new(warm));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warm(digest: &str, bytes: &'static [u8]) -> Warm {
        let m = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: bytes::Bytes::from_static(bytes),
        };
        Warm {
            rec: TagRecord {
                v: 1,
                digest: digest.into(),
                checked_ms: 1,
                path: None,
            },
            media_type: m.media_type.clone(),
            ready: Ready::new(digest, m).unwrap(),
        }
    }

    #[test]
    fn entries_last_only_as_long_as_their_generation() {
        let tags = WarmTags::default();
        tags.keep(3, "h/n/i/t", warm("sha256:ab", b"{}"));
        assert!(tags.get(3, "h/n/i/t").is_some());
        assert!(tags.get(3, "h/n/i/u").is_none());
        // A write anywhere: nothing kept before it is served again, even at the old number.
        assert!(tags.get(4, "h/n/i/t").is_none());
        assert!(tags.get(3, "h/n/i/t").is_none());
    }

    #[test]
    fn the_ready_answer_carries_the_manifest_headers() {
        let w = warm("sha256:ab", b"{\"a\":1}");
        let get = w.ready.respond(false);
        let hd = get.headers();
        assert_eq!(hd[header::CONTENT_LENGTH], "7");
        assert_eq!(hd[header::ETAG], "\"sha256:ab\"");
        assert_eq!(hd[CONTENT_DIGEST], "sha256:ab");
        assert_eq!(
            hd[header::CONTENT_TYPE],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert!(matches!(get.body(), Body::Bytes(b) if b.as_ref() == b"{\"a\":1}"));
        let head = w.ready.respond(true);
        assert!(matches!(head.body(), Body::Empty));
        assert_eq!(head.headers()[header::CONTENT_LENGTH], "7");
    }

    #[test]
    fn large_manifests_are_not_kept_and_the_budget_starts_over() {
        let tags = WarmTags::default();
        let big: &'static [u8] = Box::leak(vec![b' '; MEMO_VALUE_MAX + 1].into_boxed_slice());
        tags.keep(1, "h/n/i/big", warm("sha256:ab", big));
        assert!(tags.get(1, "h/n/i/big").is_none());
        let half: &'static [u8] = Box::leak(vec![b' '; MEMO_VALUE_MAX].into_boxed_slice());
        for i in 0..(MEMO_BYTES / MEMO_VALUE_MAX + 1) {
            tags.keep(1, &format!("h/n/i/{i}"), warm("sha256:ab", half));
        }
        let kept = (0..(MEMO_BYTES / MEMO_VALUE_MAX + 1))
            .filter(|i| tags.get(1, &format!("h/n/i/{i}")).is_some())
            .count();
        assert!(
            (1..MEMO_BYTES / MEMO_VALUE_MAX + 1).contains(&kept),
            "{kept}"
        );
    }
}
