//! One chart version entry of an index and what it becomes: the chart file it names
//! ([`ChartRef`]), the path that file gets under `/charts/<repo>/` (`ChartPaths`, which
//! keeps every path given out unique), and the entry's text with its URLs replaced
//! (`Entry::render`). The rewriter ([`super::rewrite`]) decides which lines belong to an
//! entry and when it ends; this module decides nothing about the document's structure.

use super::chart_path::{is_chart_path, percent_decode};
use super::yaml::yaml_scalar;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use url::Url;

/// A chart file served by pullgate: its path under `/charts/<repo>/` (percent-decoded), the
/// sha256 the index lists, and the absolute upstream URL to fetch it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartRef {
    /// Path under `/charts/<repo>/`, percent-decoded (`app-1.0.0.tgz`).
    pub key: String,
    /// sha256 of the chart file.
    pub digest: [u8; 32],
    /// Absolute upstream URL.
    pub url: String,
}

impl ChartRef {
    /// `sha256:<hex>`.
    pub fn digest_string(&self) -> String {
        format!("sha256:{}", hex::encode(self.digest))
    }
}

/// FNV-1a, for content-defined chunk boundaries (stable across runs and builds).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where an entry's URLs sit in its text, to be replaced.
pub(super) enum Slot {
    /// A block-sequence item: the scalar spans `[start, end)` of the entry text.
    Item {
        start: usize,
        end: usize,
        url: String,
    },
    /// A flow list `[a, b]` spanning `[start, end)`.
    Flow {
        start: usize,
        end: usize,
        urls: Vec<String>,
    },
}

/// A chart version entry, buffered until it ends (its `digest` may follow its `urls`).
#[derive(Default)]
pub(super) struct Entry {
    /// The entry's lines as they arrived.
    pub(super) text: Vec<u8>,
    /// Its sha256 `digest`, when it has a usable one.
    pub(super) digest: Option<[u8; 32]>,
    /// Its `name`.
    pub(super) name: Option<String>,
    /// Its `urls`, in order.
    pub(super) slots: Vec<Slot>,
}

impl Entry {
    /// Appends the entry's text to `out` with every URL replaced: by `local` (its chart's
    /// path, percent-encoded) when it has one, else by itself, made absolute against `base`
    /// when it is relative.
    pub(super) fn render(&self, local: Option<&str>, base: &Url, out: &mut Vec<u8>) {
        let replace = |u: &str| -> String {
            match local {
                Some(k) => k.to_string(),
                None => match Url::parse(u) {
                    Err(url::ParseError::RelativeUrlWithoutBase) => base
                        .join(u)
                        .map_or_else(|_| u.to_string(), |a| a.to_string()),
                    _ => u.to_string(),
                },
            }
        };
        let mut pos = 0;
        for slot in &self.slots {
            let (start, end, new) = match slot {
                Slot::Item { start, end, url } => (*start, *end, yaml_scalar(&replace(url))),
                Slot::Flow { start, end, urls } => {
                    let items: Vec<String> =
                        urls.iter().map(|u| yaml_scalar(&replace(u))).collect();
                    (*start, *end, format!("[{}]", items.join(", ")))
                }
            };
            out.extend_from_slice(&self.text[pos..start]);
            out.extend_from_slice(new.as_bytes());
            pos = end;
        }
        out.extend_from_slice(&self.text[pos..]);
    }
}

/// The chart files given paths so far, one per path.
///
/// Paths: a chart's path is its URL's file name (`app-1.0.0.tgz`). Should two entries with
/// different digests share a file name, the later one gets `<first 16 hex of its
/// digest>/<file name>`; a URL without a usable file name gets `<chart>-<16 hex>.tgz`.
#[derive(Default)]
pub(super) struct ChartPaths {
    charts: Vec<ChartRef>,
    /// Path hash → index in `charts`: no second copy of every path in memory.
    keys: HashMap<u64, u32>,
    /// Paths whose hash collides with another path's.
    overflow: HashMap<String, u32>,
}

impl ChartPaths {
    /// The charts, sorted by path. The path index is dropped first, before the sort and
    /// before the caller serialises the map.
    pub(super) fn into_sorted(self) -> Vec<ChartRef> {
        let ChartPaths {
            mut charts,
            keys,
            overflow,
        } = self;
        drop((keys, overflow));
        charts.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        charts
    }

    /// The index in `charts` of the chart recorded under `key`.
    fn find(&self, key: &str) -> Option<usize> {
        match self.keys.get(&fnv1a(key.as_bytes())) {
            Some(&i) if self.charts[i as usize].key == key => Some(i as usize),
            Some(_) => self.overflow.get(key).map(|&i| i as usize),
            None => None,
        }
    }

    /// Picks the path for a chart file, recording it; None when the entry cannot get one.
    pub(super) fn assign(&mut self, base: &Url, e: &Entry) -> Option<String> {
        let digest = e.digest?;
        let first = e
            .slots
            .iter()
            .flat_map(|s| match s {
                Slot::Item { url, .. } => std::slice::from_ref(url).iter(),
                Slot::Flow { urls, .. } => urls.iter(),
            })
            .filter_map(|u| base.join(u).ok())
            .find(|u| matches!(u.scheme(), "http" | "https"))?;
        let file = first
            .path_segments()
            .and_then(|mut s| s.next_back())
            .and_then(percent_decode)
            .filter(|f| is_chart_path(f) && !f.contains('/'))
            .unwrap_or_else(|| {
                let name: String = e
                    .name
                    .as_deref()
                    .unwrap_or("chart")
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    .take(100)
                    .collect();
                let name = if name.is_empty() {
                    "chart".into()
                } else {
                    name
                };
                format!("{name}-{}.tgz", hex::encode(&digest[..8]))
            });
        let prefixed = format!("{}/{file}", hex::encode(&digest[..8]));
        for key in [file, prefixed] {
            match self.find(&key) {
                Some(i) if self.charts[i].digest == digest => return Some(key),
                Some(_) => continue,
                None => {
                    let (h, i) = (fnv1a(key.as_bytes()), self.charts.len() as u32);
                    match self.keys.entry(h) {
                        MapEntry::Occupied(_) => {
                            self.overflow.insert(key.clone(), i);
                        }
                        MapEntry::Vacant(v) => {
                            v.insert(i);
                        }
                    }
                    self.charts.push(ChartRef {
                        key: key.clone(),
                        digest,
                        url: first.to_string(),
                    });
                    return Some(key);
                }
            }
        }
        // Two different charts with the same file name and the same digest prefix: leave
        // this one pointing upstream rather than guess.
        None
    }
}
