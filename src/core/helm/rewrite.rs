//! The streaming rewrite of a chart repository's `index.yaml`: chart URLs become paths under
//! `/charts/<repo>/`, and every chart file that gets such a path is recorded with the sha256
//! digest the index lists for it. Pure: bytes in, bytes and [`ChartRef`]s out.
//!
//! **Why line by line, not a YAML document.** Index files of large repositories run to tens
//! of MB, and a YAML DOM of one costs several times its size in memory (more than a Workers
//! isolate's 128 MB). The rewriter instead reads the block-style YAML that Helm writes
//! (`helm repo index`, chart-releaser, ChartMuseum, GitLab's and Harbor's generated indexes:
//! go-yaml block style), one line at a time, and keeps in memory only the current line, the
//! current chart version entry, the output not yet handed to the caller, and the list of
//! chart references. Peak memory is about the output chunk size plus the reference list
//! (roughly 150 bytes per chart version), whatever the index size.
//!
//! The structure it follows (Helm's `repo.IndexFile`, see the Helm chart repository guide,
//! <https://helm.sh/docs/topics/chart_repository/#the-index-file>):
//!
//! ```yaml
//! apiVersion: v1
//! entries:
//!   <chart>:
//!   - <key>: <value>          # one chart version; keys in any order
//!     digest: <sha256 hex>    # what `helm package` computed over the .tgz
//!     urls:
//!     - <absolute URL, or one relative to the repository URL>
//! generated: "…"
//! ```
//!
//! Sequences may be indented or not (go-yaml v2 and v3 styles), keys may be quoted, `urls`
//! may be a flow list (`[a, b]`), and every other value (descriptions as block scalars,
//! maintainers, annotations, …) passes through untouched, whatever it contains, because only
//! lines at the indentation of an entry's own keys are read as keys. What it refuses, with
//! an [`IndexError`] naming the line: a JSON or flow-style index, several documents, anchors,
//! aliases or tags on `digest`/`urls`, a URL spanning several lines, lines longer than
//! [`MAX_LINE`], entries larger than [`MAX_ENTRY`], and a document without `apiVersion` (an
//! HTML error page served with 200 is refused, not cached). Error messages name the line and
//! what was wrong, never the text found there: the bytes may be another service's answer
//! (an index URL redirected somewhere internal), and an error must not relay them.
//!
//! Each entry is buffered until it ends, because its `digest` may come after its `urls`.
//! An entry with a sha256 digest and an http(s) URL gets every URL replaced by a relative
//! path (its file name, see [`Rewriter`]); Helm resolves relative chart URLs against the
//! repository URL the client added, so the same cached index serves every client whatever
//! host name or scheme it uses to reach pullgate (an absolute URL built from one client's
//! `Host` would be cached and handed to all). An entry without a usable digest keeps its own
//! URLs (relative ones made absolute against the upstream repository): pullgate never serves
//! chart bytes it cannot verify, and is not made to fetch unverifiable URLs an index names.
//!
//! Output is cut into chunks at entry boundaries chosen by the content (a hash of the entry),
//! so an index that gained one chart version yields mostly the same chunks as before, and a
//! content-addressed store keeps them once.
//!
//! Reading one line (its kind, keys, scalars) is `super::yaml`'s; how a chart path is
//! percent-encoded into the index and decoded from a URL is [`super::chart_path`]'s. This
//! module follows the document's structure and decides what each entry becomes.

use super::chart_path::percent_encode_path;

use super::entry::{fnv1a, ChartPaths, ChartRef, Entry, Slot};
use super::yaml::{classify, parse_flow_list, parse_scalar, LineKind};
use std::collections::VecDeque;
use url::Url;

/// Longest line accepted.
pub const MAX_LINE: usize = 4 << 20;
/// Largest single chart version entry accepted.
pub const MAX_ENTRY: usize = 4 << 20;
/// Output is cut after an entry once this much is pending and the entry's hash says so.
pub const CHUNK_MIN: usize = 1 << 20;
/// Output is always cut after an entry once this much is pending.
pub const CHUNK_MAX: usize = 4 << 20;

/// Why an index could not be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("index.yaml line {line}: {msg}")]
pub struct IndexError {
    /// 1-based line number.
    pub line: u64,
    /// What was wrong.
    pub msg: String,
}

/// What a finished rewrite found.
#[derive(Debug, Default)]
pub struct Summary {
    /// Chart references, sorted by key, keys unique.
    pub charts: Vec<ChartRef>,
    /// Chart version entries seen.
    pub entries: u64,
    /// Entries left pointing at their upstream URLs (no usable digest or URL).
    pub passed_through: u64,
}

enum Level {
    /// Before or between top-level keys.
    Top,
    /// Inside a top-level value other than `entries`.
    OtherTop,
    /// Inside `entries`, before the first chart name.
    Entries { chart: Option<usize> },
    /// Under a chart name, expecting version entries (`- `).
    Chart { chart: usize, item: Option<usize> },
    /// Inside a version entry.
    Entry(EntryAt),
    /// After `...`.
    End,
}

/// Where the current version entry's lines sit (columns, 0-based).
#[derive(Clone, Copy)]
struct EntryAt {
    /// The column of its chart's name.
    chart: usize,
    /// The column of its `- `.
    item: usize,
    /// The column of its keys, once the first is read.
    key: Option<usize>,
    /// The last key read is `urls` with a block list to follow.
    urls: bool,
    /// The column of that list's `- `, once the first item is read.
    list: Option<usize>,
}

/// One input line, as the rewriter's decisions read it.
struct Line<'a> {
    /// The line as it arrived, line ending included (what is emitted).
    raw: &'a [u8],
    /// Where the line's text starts within `raw` (past a byte-order mark).
    shift: usize,
    /// Leading spaces.
    indent: usize,
    /// The text after them.
    rest: &'a str,
}

/// Streams an index through: [`Rewriter::push`] the upstream bytes as they arrive, take
/// finished output chunks with [`Rewriter::take_chunk`], and call [`Rewriter::finish`] at the
/// end.
///
/// Paths: a chart's path is its URL's file name (`app-1.0.0.tgz`). Should two entries with
/// different digests share a file name, the later one gets `<first 16 hex of its
/// digest>/<file name>`; a URL without a usable file name gets `<chart>-<16 hex>.tgz`.
pub struct Rewriter {
    base: Url,
    partial: Vec<u8>,
    line_no: u64,
    level: Level,
    entry: Option<Entry>,
    seen_content: bool,
    api_version: bool,
    out: Vec<u8>,
    ready: VecDeque<Vec<u8>>,
    paths: ChartPaths,
    entries: u64,
    passed_through: u64,
}

fn parse_digest_hex(v: &str) -> Option<[u8; 32]> {
    let hex = v.strip_prefix("sha256:").unwrap_or(v);
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex.to_ascii_lowercase(), &mut out).ok()?;
    Some(out)
}

impl Rewriter {
    /// A rewriter for an index served from `base` (the repository URL, ending in `/`).
    pub fn new(base: Url) -> Rewriter {
        Rewriter {
            base,
            partial: Vec::new(),
            line_no: 0,
            level: Level::Top,
            entry: None,
            seen_content: false,
            api_version: false,
            out: Vec::new(),
            ready: VecDeque::new(),
            paths: ChartPaths::default(),
            entries: 0,
            passed_through: 0,
        }
    }

    /// Feeds the next bytes of the upstream index.
    pub fn push(&mut self, mut data: &[u8]) -> Result<(), IndexError> {
        while let Some(pos) = data.iter().position(|b| *b == b'\n') {
            if self.partial.is_empty() {
                self.line(&data[..=pos])?;
            } else {
                let mut l = std::mem::take(&mut self.partial);
                l.extend_from_slice(&data[..=pos]);
                self.line(&l)?;
                l.clear();
                self.partial = l;
            }
            data = &data[pos + 1..];
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() > MAX_LINE {
            return Err(self.err(format!("a line is longer than {MAX_LINE} bytes")));
        }
        Ok(())
    }

    /// A finished chunk of output, if one is ready.
    pub fn take_chunk(&mut self) -> Option<Vec<u8>> {
        self.ready.pop_front()
    }

    /// Ends the input: returns the remaining output chunks and what was found.
    pub fn finish(mut self) -> Result<(Vec<Vec<u8>>, Summary), IndexError> {
        if !self.partial.is_empty() {
            let l = std::mem::take(&mut self.partial);
            self.line(&l)?;
        }
        self.finish_entry()?;
        if !self.api_version {
            return Err(self.err("no top-level apiVersion: not a chart repository index".into()));
        }
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            self.ready.push_back(out);
        }
        let charts = std::mem::take(&mut self.paths).into_sorted();
        Ok((
            self.ready.into_iter().collect(),
            Summary {
                charts,
                entries: self.entries,
                passed_through: self.passed_through,
            },
        ))
    }

    fn err(&self, msg: String) -> IndexError {
        IndexError {
            line: self.line_no,
            msg,
        }
    }

    fn emit(&mut self, raw: &[u8]) -> Result<(), IndexError> {
        match &mut self.entry {
            Some(e) => {
                e.text.extend_from_slice(raw);
                if e.text.len() > MAX_ENTRY {
                    return Err(self.err(format!(
                        "a chart version entry is larger than {MAX_ENTRY} bytes"
                    )));
                }
            }
            None => self.out.extend_from_slice(raw),
        }
        Ok(())
    }

    fn line(&mut self, raw: &[u8]) -> Result<(), IndexError> {
        self.line_no += 1;
        let (text, shift) = self.line_text(raw)?;
        let indent = text.bytes().take_while(|b| *b == b' ').count();
        let rest = &text[indent..];
        let kind = classify(rest, indent);
        match kind {
            LineKind::Blank => return self.emit(raw),
            LineKind::DocStart | LineKind::Directive if !self.seen_content => {
                return self.emit(raw)
            }
            LineKind::DocEnd => {
                self.finish_entry()?;
                self.level = Level::End;
                return self.emit(raw);
            }
            _ => {}
        }
        self.seen_content = true;
        if matches!(self.level, Level::End) {
            return Err(self.err("content after the end of the document".into()));
        }
        let l = Line {
            raw,
            shift,
            indent,
            rest,
        };
        if indent == 0 {
            self.finish_entry()?;
            return self.top_level_line(&l, kind);
        }
        self.nested_line(&l, kind)
    }

    /// One input line's text, without its line ending (and without a byte-order mark on
    /// line 1), and where that text starts within `raw`.
    fn line_text<'r>(&self, raw: &'r [u8]) -> Result<(&'r str, usize), IndexError> {
        let mut end = raw.len();
        if raw.last() == Some(&b'\n') {
            end -= 1;
        }
        if end > 0 && raw[end - 1] == b'\r' {
            end -= 1;
        }
        let text =
            std::str::from_utf8(&raw[..end]).map_err(|_| self.err("not UTF-8 text".into()))?;
        let text = if self.line_no == 1 {
            text.strip_prefix('\u{feff}').unwrap_or(text)
        } else {
            text
        };
        Ok((text, end - text.len()))
    }

    /// A content line at column 0: a top-level key (`entries` opens the chart map), or an
    /// error naming what kind of document this is not.
    fn top_level_line(&mut self, l: &Line<'_>, kind: LineKind<'_>) -> Result<(), IndexError> {
        match kind {
            LineKind::Key(key, v) => {
                let value = l.rest[v..].trim();
                if key == "apiVersion" {
                    self.api_version = true;
                }
                self.level = if key != "entries" || value == "{}" {
                    Level::OtherTop
                } else if value.is_empty() || value.starts_with('#') {
                    Level::Entries { chart: None }
                } else {
                    return Err(self.err("entries must be a block mapping".into()));
                };
                self.emit(l.raw)
            }
            LineKind::DocStart => Err(self.err(
                "several YAML documents in one index are not supported".into(),
            )),
            LineKind::Other(r) if r.starts_with('{') => Err(self.err(
                "a JSON or flow-style index is not supported (block YAML as `helm repo index` writes it is)".into(),
            )),
            _ => Err(self.err("unexpected top-level line".into())),
        }
    }

    /// An indented content line, read by where the document is: under a top-level key other
    /// than `entries` it passes; under `entries` it names a chart or starts a version entry.
    fn nested_line(&mut self, l: &Line<'_>, kind: LineKind<'_>) -> Result<(), IndexError> {
        let indent = l.indent;
        match self.level {
            Level::Top => Err(self.err("indented line before any top-level key".into())),
            Level::OtherTop | Level::End => self.emit(l.raw),
            Level::Entries { chart } => match kind {
                LineKind::Key(_, v) if chart.is_none_or(|c| c == indent) => {
                    self.start_chart(indent, &l.rest[v..])?;
                    self.emit(l.raw)
                }
                _ => Err(self.err("expected a chart name".into())),
            },
            Level::Chart { chart, item } => match kind {
                LineKind::Seq(after) if indent >= chart && item.is_none_or(|i| i == indent) => {
                    self.start_entry(l.raw, l.shift, indent, after, chart)
                }
                LineKind::Key(_, v) if indent == chart => {
                    self.start_chart(indent, &l.rest[v..])?;
                    self.emit(l.raw)
                }
                _ => Err(self.err("expected a chart version entry (`- `)".into())),
            },
            Level::Entry(at) => self.entry_line(l, kind, at),
        }
    }

    /// A line inside a chart version entry: the next entry or chart, one of the entry's own
    /// keys, an item of its block `urls` list, or a line of another key's value (passed
    /// through, except inside `urls`).
    fn entry_line(
        &mut self,
        l: &Line<'_>,
        kind: LineKind<'_>,
        at: EntryAt,
    ) -> Result<(), IndexError> {
        let EntryAt {
            chart,
            item,
            key,
            urls,
            list,
        } = at;
        let indent = l.indent;
        match (kind, key) {
            (LineKind::Seq(after), _) if indent == item => {
                self.finish_entry()?;
                self.start_entry(l.raw, l.shift, indent, after, chart)
            }
            (LineKind::Key(_, v), _) if indent == chart => {
                self.finish_entry()?;
                self.start_chart(indent, &l.rest[v..])?;
                self.emit(l.raw)
            }
            // The entry's first key sets the column of its keys; later ones must match it.
            (LineKind::Key(k, v), ki) if ki.map_or(indent > item, |ki| indent == ki) => {
                self.entry_key(l.raw, l.shift, indent, k, indent + v, chart, item)
            }
            (LineKind::Seq(after), Some(ki))
                if urls && indent >= ki && list.is_none_or(|c| c == indent) =>
            {
                self.level = Level::Entry(EntryAt {
                    list: Some(indent),
                    ..at
                });
                self.url_item(l.raw, l.shift, indent + after)
            }
            (_, Some(ki)) if indent > ki => {
                if urls {
                    return Err(
                        self.err("unexpected line in urls (a URL must fit on one line)".into())
                    );
                }
                self.emit(l.raw)
            }
            (LineKind::Seq(_), Some(ki)) if indent == ki && !urls => self.emit(l.raw),
            _ => Err(self.err("unexpected line in a chart version entry".into())),
        }
    }

    fn start_chart(&mut self, indent: usize, value: &str) -> Result<(), IndexError> {
        let value = value.trim();
        if value.is_empty() || value.starts_with('#') {
            self.level = Level::Chart {
                chart: indent,
                item: None,
            };
            Ok(())
        } else if value == "[]" {
            self.level = Level::Entries {
                chart: Some(indent),
            };
            Ok(())
        } else {
            Err(self.err("a chart's versions must be a block sequence".into()))
        }
    }

    fn start_entry(
        &mut self,
        raw: &[u8],
        shift: usize,
        indent: usize,
        after: usize,
        chart: usize,
    ) -> Result<(), IndexError> {
        self.entries += 1;
        self.entry = Some(Entry::default());
        self.level = Level::Entry(EntryAt {
            chart,
            item: indent,
            key: None,
            urls: false,
            list: None,
        });
        let text = std::str::from_utf8(&raw[shift..]).unwrap_or("");
        let inner = text
            .get(indent + after..)
            .unwrap_or("")
            .trim_end_matches(['\n', '\r']);
        if inner.is_empty() || inner.starts_with('#') {
            return self.emit(raw);
        }
        match classify(inner, 1) {
            LineKind::Key(k, v) => self.entry_key(
                raw,
                shift,
                indent + after,
                k,
                indent + after + v,
                chart,
                indent,
            ),
            _ => Err(self.err("a chart version entry must be a mapping".into())),
        }
    }

    /// A key of the current entry at column `col`; its value starts at column `vcol`.
    #[allow(clippy::too_many_arguments)]
    fn entry_key(
        &mut self,
        raw: &[u8],
        shift: usize,
        col: usize,
        key: String,
        vcol: usize,
        chart: usize,
        item: usize,
    ) -> Result<(), IndexError> {
        let start = self.entry.as_ref().map_or(0, |e| e.text.len());
        self.emit(raw)?;
        let text = std::str::from_utf8(&raw[shift..])
            .unwrap_or("")
            .trim_end_matches(['\n', '\r']);
        let value = text.get(vcol..).unwrap_or("");
        let mut urls = false;
        match key.as_str() {
            "digest" => {
                let v = parse_scalar(value).map_err(|m| self.err(format!("digest: {m}")))?;
                let d = v.as_deref().and_then(parse_digest_hex);
                if let Some(e) = &mut self.entry {
                    e.digest = d;
                }
            }
            "name" => {
                let v = parse_scalar(value).ok().flatten();
                if let Some(e) = &mut self.entry {
                    e.name = v;
                }
            }
            "urls" => {
                let t = value.trim_start();
                if t.starts_with('[') {
                    let (items, len) =
                        parse_flow_list(t).map_err(|m| self.err(format!("urls: {m}")))?;
                    let at = shift + vcol + (value.len() - t.len());
                    if let Some(e) = &mut self.entry {
                        e.slots.push(Slot::Flow {
                            start: start + at,
                            end: start + at + len,
                            urls: items,
                        });
                    }
                } else if t.is_empty() || t.starts_with('#') {
                    urls = true;
                } else {
                    return Err(self.err("urls must be a list".into()));
                }
            }
            _ => {}
        }
        self.level = Level::Entry(EntryAt {
            chart,
            item,
            key: Some(col),
            urls,
            list: None,
        });
        Ok(())
    }

    /// A `- <url>` line of a block `urls` list; the scalar starts at column `vcol`.
    fn url_item(&mut self, raw: &[u8], shift: usize, vcol: usize) -> Result<(), IndexError> {
        let start = self.entry.as_ref().map_or(0, |e| e.text.len());
        self.emit(raw)?;
        let text = std::str::from_utf8(&raw[shift..])
            .unwrap_or("")
            .trim_end_matches(['\n', '\r']);
        let value = text.get(vcol..).unwrap_or("");
        let url = parse_scalar(value)
            .map_err(|m| self.err(format!("urls: {m}")))?
            .ok_or_else(|| self.err("urls: empty item".into()))?;
        if let Some(e) = &mut self.entry {
            e.slots.push(Slot::Item {
                start: start + shift + vcol,
                end: start + shift + text.len(),
                url,
            });
        }
        Ok(())
    }

    fn finish_entry(&mut self) -> Result<(), IndexError> {
        let Some(e) = self.entry.take() else {
            return Ok(());
        };
        let local = self
            .paths
            .assign(&self.base, &e)
            .map(|k| percent_encode_path(&k));
        if local.is_none() {
            self.passed_through += 1;
        }
        e.render(local.as_deref(), &self.base, &mut self.out);
        let pending = self.out.len();
        if pending >= CHUNK_MAX || (pending >= CHUNK_MIN && fnv1a(&e.text) % 4 == 0) {
            let out = std::mem::take(&mut self.out);
            self.ready.push_back(out);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "rewrite_tests.rs"]
mod tests;
