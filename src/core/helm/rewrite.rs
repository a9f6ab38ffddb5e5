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

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
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
    Entry {
        chart: usize,
        item: usize,
        key: Option<usize>,
        urls: bool,
        list: Option<usize>,
    },
    /// After `...`.
    End,
}

enum Slot {
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

#[derive(Default)]
struct Entry {
    text: Vec<u8>,
    digest: Option<[u8; 32]>,
    name: Option<String>,
    slots: Vec<Slot>,
}

enum LineKind<'a> {
    Blank,
    DocStart,
    DocEnd,
    Directive,
    /// `- …`; the item's content starts this many bytes into the trimmed line.
    Seq(usize),
    /// `key: value`; the value starts this many bytes into the trimmed line.
    Key(String, usize),
    Other(&'a str),
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
    charts: Vec<ChartRef>,
    /// Path hash → index in `charts`: no second copy of every path in memory.
    keys: HashMap<u64, u32>,
    /// Paths whose hash collides with another path's.
    overflow: HashMap<String, u32>,
    entries: u64,
    passed_through: u64,
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

/// Decodes `%XX` escapes; None for a malformed escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes a chart path for the index: unreserved characters, `+` and `/` stay.
pub fn percent_encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Is `s` a safe path under `/charts/<repo>/`: segments without control characters,
/// backslashes, `.` or `..`, and not `index.yaml`.
pub fn is_chart_path(s: &str) -> bool {
    !s.is_empty()
        && s != "index.yaml"
        && s.len() <= 512
        && s.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && !seg.chars().any(|c| c.is_control() || c == '\\')
        })
}

/// Parses a YAML key at the start of `s`: (key, offset of the value).
fn parse_key(s: &str) -> Option<(String, usize)> {
    let b = s.as_bytes();
    let (key, after) = match b.first()? {
        b'"' | b'\'' => {
            let (v, end) = parse_quoted(s).ok()?;
            (v, end)
        }
        b'[' | b'{' | b'&' | b'*' | b'!' | b'|' | b'>' | b'%' | b'@' | b'`' | b'#' => return None,
        b'?' if b.get(1).is_none_or(|c| *c == b' ') => return None,
        _ => {
            let mut pos = None;
            for (i, c) in b.iter().enumerate() {
                if *c == b':' && b.get(i + 1).is_none_or(|n| *n == b' ') {
                    pos = Some(i);
                    break;
                }
                if *c == b'#' && i > 0 && b[i - 1] == b' ' {
                    return None;
                }
            }
            let p = pos?;
            (s[..p].trim_end().to_string(), p)
        }
    };
    if b.get(after) != Some(&b':') || b.get(after + 1).is_some_and(|c| *c != b' ') {
        return None;
    }
    let mut v = after + 1;
    while b.get(v) == Some(&b' ') {
        v += 1;
    }
    Some((key, v))
}

/// Parses a quoted scalar at the start of `s`: (value, offset just past the closing quote).
fn parse_quoted(s: &str) -> Result<(String, usize), String> {
    let mut chars = s.char_indices();
    let quote = match chars.next() {
        Some((_, q @ ('"' | '\''))) => q,
        _ => return Err("not a quoted scalar".into()),
    };
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == quote {
            if quote == '\'' && s[i + 1..].starts_with('\'') {
                chars.next();
                out.push('\'');
                continue;
            }
            return Ok((out, i + 1));
        }
        if c == '\\' && quote == '"' {
            let (_, e) = chars.next().ok_or("unterminated escape")?;
            let hex = |n: usize, chars: &mut std::str::CharIndices<'_>| {
                let h: String = chars.by_ref().take(n).map(|(_, c)| c).collect();
                u32::from_str_radix(&h, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| "a malformed \\x, \\u or \\U escape".to_string())
            };
            out.push(match e {
                '"' => '"',
                '\\' => '\\',
                '/' => '/',
                ' ' => ' ',
                'n' => '\n',
                't' => '\t',
                'r' => '\r',
                '0' => '\0',
                'x' => hex(2, &mut chars)?,
                'u' => hex(4, &mut chars)?,
                'U' => hex(8, &mut chars)?,
                _ => return Err("an unsupported escape".into()),
            });
            continue;
        }
        out.push(c);
    }
    Err("quoted scalar does not end on its line".into())
}

/// Parses a one-line scalar value (plain or quoted); None for an empty value.
fn parse_scalar(s: &str) -> Result<Option<String>, String> {
    let t = s.trim();
    match t.as_bytes().first() {
        None | Some(b'#') => Ok(None),
        Some(b'"' | b'\'') => {
            let (v, end) = parse_quoted(t)?;
            let rest = t[end..].trim_start();
            if !rest.is_empty() && !rest.starts_with('#') {
                return Err("text after a quoted scalar".into());
            }
            Ok(Some(v))
        }
        Some(b'&' | b'*' | b'!') => Err("anchors, aliases and tags are not supported here".into()),
        Some(b'|' | b'>') => Err("a block scalar is not supported here".into()),
        Some(b'{' | b'[' | b'@' | b'`' | b'%') => {
            Err("a value starting with a reserved character".into())
        }
        Some(_) => {
            let end = t.find(" #").unwrap_or(t.len());
            Ok(Some(t[..end].trim_end().to_string()))
        }
    }
}

/// Parses a flow list of scalars `[a, "b"]` at the start of `s`: (items, offset past `]`).
fn parse_flow_list(s: &str) -> Result<(Vec<String>, usize), String> {
    let b = s.as_bytes();
    if b.first() != Some(&b'[') {
        return Err("not a flow list".into());
    }
    let mut items = Vec::new();
    let mut i = 1;
    loop {
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
        match b.get(i) {
            None => return Err("flow list does not end on its line".into()),
            Some(b']') => return Ok((items, i + 1)),
            Some(b'"' | b'\'') => {
                let (v, end) = parse_quoted(&s[i..])?;
                items.push(v);
                i += end;
            }
            Some(b'[' | b'{' | b'&' | b'*' | b'!') => {
                return Err("nested flow collections, anchors and tags are not supported".into())
            }
            Some(_) => {
                let end = s[i..]
                    .find([',', ']'])
                    .ok_or("flow list does not end on its line")?;
                items.push(s[i..i + end].trim().to_string());
                i += end;
            }
        }
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b']') => return Ok((items, i + 1)),
            _ => return Err("malformed flow list".into()),
        }
    }
}

/// Formats a scalar for YAML: plain when that is unambiguous, double-quoted otherwise.
pub fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'/'
                        | b'%'
                        | b'+'
                        | b':'
                        | b'@'
                        | b'?'
                        | b'&'
                        | b'='
                        | b';'
                )
        })
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && !s.contains(": ")
        && !s.ends_with(':');
    if plain {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
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

fn classify(rest: &str, indent: usize) -> LineKind<'_> {
    if rest.is_empty() || rest.starts_with('#') {
        return LineKind::Blank;
    }
    if indent == 0 {
        if rest == "---" || rest.starts_with("--- ") {
            return LineKind::DocStart;
        }
        if rest == "..." || rest.starts_with("... ") {
            return LineKind::DocEnd;
        }
        if rest.starts_with('%') {
            return LineKind::Directive;
        }
    }
    if rest == "-" || rest.starts_with("- ") {
        let after = 1 + rest[1..].bytes().take_while(|b| *b == b' ').count();
        return LineKind::Seq(after);
    }
    match parse_key(rest) {
        Some((k, v)) => LineKind::Key(k, v),
        None => LineKind::Other(rest),
    }
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
            charts: Vec::new(),
            keys: HashMap::new(),
            overflow: HashMap::new(),
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
        // The path index is done with: free it before the caller serialises the map.
        self.keys = HashMap::new();
        self.overflow = HashMap::new();
        let mut charts = std::mem::take(&mut self.charts);
        charts.sort_unstable_by(|a, b| a.key.cmp(&b.key));
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
        // Where `text` starts within `raw` (a byte-order mark is skipped).
        let shift = end - text.len();
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
        if indent == 0 {
            self.finish_entry()?;
            return match kind {
                LineKind::Key(key, v) => {
                    let value = rest[v..].trim();
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
                    self.emit(raw)
                }
                LineKind::DocStart => Err(self.err(
                    "several YAML documents in one index are not supported".into(),
                )),
                LineKind::Other(r) if r.starts_with('{') => Err(self.err(
                    "a JSON or flow-style index is not supported (block YAML as `helm repo index` writes it is)".into(),
                )),
                _ => Err(self.err("unexpected top-level line".into())),
            };
        }
        match self.level {
            Level::Top => Err(self.err("indented line before any top-level key".into())),
            Level::OtherTop | Level::End => self.emit(raw),
            Level::Entries { chart } => match kind {
                LineKind::Key(_, v) if chart.is_none_or(|c| c == indent) => {
                    self.start_chart(indent, &rest[v..])?;
                    self.emit(raw)
                }
                _ => Err(self.err("expected a chart name".into())),
            },
            Level::Chart { chart, item } => match kind {
                LineKind::Seq(after) if indent >= chart && item.is_none_or(|i| i == indent) => {
                    self.start_entry(raw, shift, indent, after, chart)
                }
                LineKind::Key(_, v) if indent == chart => {
                    self.start_chart(indent, &rest[v..])?;
                    self.emit(raw)
                }
                _ => Err(self.err("expected a chart version entry (`- `)".into())),
            },
            Level::Entry {
                chart,
                item,
                key,
                urls,
                list,
            } => {
                match (&kind, key) {
                    (LineKind::Seq(after), _) if indent == item => {
                        self.finish_entry()?;
                        return self.start_entry(raw, shift, indent, *after, chart);
                    }
                    (LineKind::Key(_, v), _) if indent == chart => {
                        self.finish_entry()?;
                        self.start_chart(indent, &rest[*v..])?;
                        return self.emit(raw);
                    }
                    (LineKind::Key(k, v), None) if indent > item => {
                        return self.entry_key(
                            raw,
                            shift,
                            indent,
                            k.clone(),
                            indent + v,
                            chart,
                            item,
                        );
                    }
                    (LineKind::Key(k, v), Some(ki)) if indent == ki => {
                        return self.entry_key(
                            raw,
                            shift,
                            indent,
                            k.clone(),
                            indent + v,
                            chart,
                            item,
                        );
                    }
                    (LineKind::Seq(after), Some(ki))
                        if urls && indent >= ki && list.is_none_or(|l| l == indent) =>
                    {
                        self.level = Level::Entry {
                            chart,
                            item,
                            key,
                            urls,
                            list: Some(indent),
                        };
                        return self.url_item(raw, shift, indent + after);
                    }
                    (_, Some(ki)) if indent > ki => {
                        if urls {
                            return Err(self.err(
                                "unexpected line in urls (a URL must fit on one line)".into(),
                            ));
                        }
                        return self.emit(raw);
                    }
                    (LineKind::Seq(_), Some(ki)) if indent == ki && !urls => {
                        return self.emit(raw);
                    }
                    _ => {}
                }
                Err(self.err("unexpected line in a chart version entry".into()))
            }
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
        self.level = Level::Entry {
            chart,
            item: indent,
            key: None,
            urls: false,
            list: None,
        };
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
        self.level = Level::Entry {
            chart,
            item,
            key: Some(col),
            urls,
            list: None,
        };
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

    /// The index in `charts` of the chart recorded under `key`.
    fn find(&self, key: &str) -> Option<usize> {
        match self.keys.get(&fnv1a(key.as_bytes())) {
            Some(&i) if self.charts[i as usize].key == key => Some(i as usize),
            Some(_) => self.overflow.get(key).map(|&i| i as usize),
            None => None,
        }
    }

    /// Picks the path for a chart file, recording it; None when the entry cannot get one.
    fn assign(&mut self, e: &Entry) -> Option<String> {
        let digest = e.digest?;
        let first = e
            .slots
            .iter()
            .flat_map(|s| match s {
                Slot::Item { url, .. } => std::slice::from_ref(url).iter(),
                Slot::Flow { urls, .. } => urls.iter(),
            })
            .filter_map(|u| self.base.join(u).ok())
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

    fn finish_entry(&mut self) -> Result<(), IndexError> {
        let Some(e) = self.entry.take() else {
            return Ok(());
        };
        let local = self.assign(&e).map(|k| percent_encode_path(&k));
        if local.is_none() {
            self.passed_through += 1;
        }
        let base = &self.base;
        let replace = |u: &str| -> String {
            match &local {
                Some(k) => k.clone(),
                None => match Url::parse(u) {
                    Err(url::ParseError::RelativeUrlWithoutBase) => base
                        .join(u)
                        .map_or_else(|_| u.to_string(), |a| a.to_string()),
                    _ => u.to_string(),
                },
            }
        };
        let mut pos = 0;
        for slot in &e.slots {
            let (start, end, new) = match slot {
                Slot::Item { start, end, url } => (*start, *end, yaml_scalar(&replace(url))),
                Slot::Flow { start, end, urls } => {
                    let items: Vec<String> =
                        urls.iter().map(|u| yaml_scalar(&replace(u))).collect();
                    (*start, *end, format!("[{}]", items.join(", ")))
                }
            };
            self.out.extend_from_slice(&e.text[pos..start]);
            self.out.extend_from_slice(new.as_bytes());
            pos = end;
        }
        self.out.extend_from_slice(&e.text[pos..]);
        let pending = self.out.len();
        if pending >= CHUNK_MAX || (pending >= CHUNK_MIN && fnv1a(&e.text) % 4 == 0) {
            let out = std::mem::take(&mut self.out);
            self.ready.push_back(out);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "515c58e5f79d8b2913a10cb400ebb6fa9c77fe813287afbacf1a0b897cd78727";
    const D2: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    fn run(index: &str) -> Result<(String, Summary), IndexError> {
        run_split(index, 7)
    }

    /// Feeds `index` in pieces of `step` bytes, so lines arrive split.
    fn run_split(index: &str, step: usize) -> Result<(String, Summary), IndexError> {
        let mut rw = Rewriter::new(Url::parse("https://charts.example/stable/").unwrap());
        let mut out = Vec::new();
        for piece in index.as_bytes().chunks(step) {
            rw.push(piece)?;
            while let Some(c) = rw.take_chunk() {
                out.extend(c);
            }
        }
        let (rest, summary) = rw.finish()?;
        rest.into_iter().for_each(|c| out.extend(c));
        Ok((String::from_utf8(out).unwrap(), summary))
    }

    /// What `helm repo index` writes (go-yaml v2: sorted keys, unindented sequences).
    fn helm_index() -> String {
        format!(
            r#"apiVersion: v1
entries:
  alpine:
  - apiVersion: v2
    appVersion: 0.2.0
    created: "2024-05-01T10:00:00.000000000Z"
    description: |-
      Deploy a basic Alpine Linux pod
      urls:
      - https://evil.example/not-a-url-item.tgz
    digest: {D1}
    home: https://helm.sh/helm
    keywords:
    - alpine
    maintainers:
    - email: someone@example.com
      name: someone
    name: alpine
    sources:
    - https://github.com/helm/helm
    urls:
    - https://charts.example/stable/alpine-0.2.0.tgz
    version: 0.2.0
  - apiVersion: v2
    created: "2024-04-01T10:00:00Z"
    digest: {D2}
    name: alpine
    urls:
    - alpine-0.1.0.tgz
    version: 0.1.0
  nginx: []
generated: "2024-05-01T10:00:00Z"
"#
        )
    }

    #[test]
    fn helm_generated_index_gets_relative_urls_and_digests() {
        let (out, s) = run(&helm_index()).unwrap();
        assert!(out.contains("    urls:\n    - alpine-0.2.0.tgz\n    version: 0.2.0\n"));
        assert!(out.contains("    - alpine-0.1.0.tgz\n"));
        // The block scalar's look-alike lines are description text, left alone.
        assert!(out.contains("      - https://evil.example/not-a-url-item.tgz\n"));
        assert!(!out.contains("https://charts.example"));
        assert_eq!(s.entries, 2);
        assert_eq!(s.passed_through, 0);
        assert_eq!(
            s.charts,
            vec![
                ChartRef {
                    key: "alpine-0.1.0.tgz".into(),
                    digest: parse_digest_hex(D2).unwrap(),
                    url: "https://charts.example/stable/alpine-0.1.0.tgz".into(),
                },
                ChartRef {
                    key: "alpine-0.2.0.tgz".into(),
                    digest: parse_digest_hex(D1).unwrap(),
                    url: "https://charts.example/stable/alpine-0.2.0.tgz".into(),
                },
            ]
        );
        // Only the absolute URL line changed (the relative one already resolves to pullgate).
        let input = helm_index();
        let changed: Vec<_> = input
            .lines()
            .zip(out.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(input.lines().count(), out.lines().count());
    }

    #[test]
    fn the_result_does_not_depend_on_how_the_bytes_arrive() {
        let whole = run_split(&helm_index(), usize::MAX).unwrap().0;
        for step in [1, 2, 3, 64, 1000] {
            assert_eq!(run_split(&helm_index(), step).unwrap().0, whole);
        }
    }

    #[test]
    fn other_layouts_are_understood() {
        // go-yaml v3 style: indented sequences, digest after urls, quoted keys and values,
        // comments, CRLF line endings, a byte-order mark, a document start.
        let index = format!(
            "\u{feff}---\r\n# mirror\r\napiVersion: \"v1\"\r\nentries:\r\n    app:\r\n        -   \"urls\":\r\n                - 'https://cdn.example/x/app-1.0.0.tgz' # primary\r\n                - \"https://mirror.example/app-1.0.0.tgz\"\r\n            name: app\r\n            'digest': \"sha256:{D1}\"\r\n        - digest: {D2}\r\n          urls: [\"https://cdn.example/x/app-2.0.0.tgz\", https://m.example/app-2.0.0.tgz]\r\n"
        );
        let (out, s) = run(&index).unwrap();
        assert!(
            out.contains("                - app-1.0.0.tgz\r\n                - app-1.0.0.tgz\r\n"),
            "{out}"
        );
        assert!(
            out.contains("          urls: [app-2.0.0.tgz, app-2.0.0.tgz]\r\n"),
            "{out}"
        );
        assert_eq!(s.charts.len(), 2);
        assert_eq!(s.charts[0].url, "https://cdn.example/x/app-1.0.0.tgz");
        assert_eq!(s.charts[1].url, "https://cdn.example/x/app-2.0.0.tgz");
    }

    #[test]
    fn bare_dash_entries_and_empty_collections() {
        let index = format!(
            "apiVersion: v1\nentries:\n  a:\n  -\n    digest: {D1}\n    urls:\n    - https://x.example/a-1.tgz\n  -\n    urls: []\n  b: []\n  c:\n    - urls:\n      - https://x.example/c-1.tgz\n      digest: {D2}\n"
        );
        let (out, s) = run(&index).unwrap();
        assert!(out.contains("  -\n    digest: "), "{out}");
        assert!(out.contains("    - a-1.tgz\n"), "{out}");
        assert!(out.contains("      - c-1.tgz\n"), "{out}");
        assert_eq!(s.entries, 3);
        assert_eq!(s.passed_through, 1);
        let (out, s) = run("apiVersion: v1\nentries: {}\n").unwrap();
        assert_eq!(out, "apiVersion: v1\nentries: {}\n");
        assert!(s.charts.is_empty());
    }

    #[test]
    fn entries_without_a_usable_digest_keep_upstream_urls_made_absolute() {
        let index = format!(
            "apiVersion: v1\nentries:\n  a:\n  - name: a\n    urls:\n    - charts/a-1.tgz\n    version: \"1\"\n  - digest: nothex\n    urls:\n    - https://other.example/a-2.tgz\n  - digest: {D1}\n    urls:\n    - oci://registry.example/a\n"
        );
        let (out, s) = run(&index).unwrap();
        assert!(
            out.contains("    - https://charts.example/stable/charts/a-1.tgz\n"),
            "{out}"
        );
        assert!(out.contains("    - https://other.example/a-2.tgz\n"));
        assert!(out.contains("    - oci://registry.example/a\n"));
        assert!(s.charts.is_empty());
        assert_eq!(s.passed_through, 3);
    }

    #[test]
    fn file_name_collisions_and_odd_names_get_distinct_paths() {
        let index = format!(
            "apiVersion: v1\nentries:\n  a:\n  - digest: {D1}\n    urls:\n    - https://x.example/one/a-1.tgz\n  - digest: {D2}\n    urls:\n    - https://y.example/two/a-1.tgz\n  - digest: {D1}\n    urls:\n    - https://x.example/one/a-1.tgz\n  b:\n  - digest: {D2}\n    name: b\n    urls:\n    - https://z.example/download/\n  c:\n  - digest: {D1}\n    urls:\n    - \"https://z.example/c%20d+1.tgz\"\n"
        );
        let (out, s) = run(&index).unwrap();
        let keys: Vec<&str> = s.charts.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "0f1e2d3c4b5a6978/a-1.tgz",
                "a-1.tgz",
                "b-0f1e2d3c4b5a6978.tgz",
                "c d+1.tgz"
            ]
        );
        assert!(out.contains("    - 0f1e2d3c4b5a6978/a-1.tgz\n"));
        assert!(out.contains("    - c%20d+1.tgz\n"), "{out}");
        assert_eq!(s.entries, 5);
    }

    #[test]
    fn unsupported_documents_are_refused_with_a_line_number() {
        let cases = [
            ("{\"apiVersion\":\"v1\",\"entries\":{}}\n", 1, "JSON"),
            (
                "<!DOCTYPE html>\n<html></html>\n",
                1,
                "unexpected top-level",
            ),
            ("entries: {}\n", 1, "apiVersion"),
            ("apiVersion: v1\nentries: {a: []}\n", 2, "block mapping"),
            ("apiVersion: v1\n---\napiVersion: v1\n", 2, "several"),
            (
                "apiVersion: v1\nentries:\n  a:\n  - urls: *u\n",
                4,
                "urls must be a list",
            ),
            (
                "apiVersion: v1\nentries:\n  a:\n  - urls:\n    - &x https://a/b.tgz\n",
                5,
                "anchors",
            ),
            (
                "apiVersion: v1\nentries:\n  a:\n  - urls:\n    - https://a/\n      b.tgz\n",
                6,
                "one line",
            ),
            (
                "apiVersion: v1\nentries:\n  a:\n    b: c\n",
                4,
                "expected a chart version",
            ),
        ];
        for (index, line, needle) in cases {
            let e = run(index).unwrap_err();
            assert_eq!(e.line, line, "{index:?}: {e}");
            assert!(e.to_string().contains(needle), "{index:?}: {e}");
        }
    }

    #[test]
    fn huge_lines_and_entries_are_refused() {
        let mut rw = Rewriter::new(Url::parse("https://c.example/").unwrap());
        let e = rw.push(&vec![b'a'; MAX_LINE + 1]).unwrap_err();
        assert!(e.msg.contains("longer"));
        let mut index = String::from("apiVersion: v1\nentries:\n  a:\n  - description: |\n");
        let line = format!("      {}\n", "x".repeat(1000));
        while index.len() < MAX_ENTRY + 10_000 {
            index.push_str(&line);
        }
        assert!(run_split(&index, 65536).unwrap_err().msg.contains("entry"));
    }

    #[test]
    fn output_is_cut_at_entry_boundaries_by_content() {
        let mut index = String::from("apiVersion: v1\nentries:\n  app:\n");
        for i in 0..40_000 {
            index.push_str(&format!(
                "  - description: version {i} of app with some text to make it longer\n    digest: {D1}\n    urls:\n    - https://charts.example/stable/app-{i}.tgz\n    version: 1.0.{i}\n"
            ));
        }
        let mut rw = Rewriter::new(Url::parse("https://charts.example/stable/").unwrap());
        let mut chunks = Vec::new();
        for piece in index.as_bytes().chunks(100_000) {
            rw.push(piece).unwrap();
            while let Some(c) = rw.take_chunk() {
                chunks.push(c);
            }
        }
        let (rest, s) = rw.finish().unwrap();
        chunks.extend(rest);
        assert!(chunks.len() >= 2, "{} chunks", chunks.len());
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.len() >= CHUNK_MIN && c.len() <= CHUNK_MAX + MAX_ENTRY);
            assert!(c.ends_with(b"\n"));
        }
        assert_eq!(s.charts.len(), 40_000);
        assert!(s.charts.windows(2).all(|w| w[0].key < w[1].key));
    }

    #[test]
    fn scalars_and_paths() {
        assert_eq!(yaml_scalar("app-1.0.0.tgz"), "app-1.0.0.tgz");
        assert_eq!(
            yaml_scalar("https://a.example/x?y=1"),
            "https://a.example/x?y=1"
        );
        assert_eq!(yaml_scalar("a b"), "\"a b\"");
        assert_eq!(yaml_scalar("#x"), "\"#x\"");
        assert_eq!(percent_encode_path("c d+1.tgz"), "c%20d+1.tgz");
        assert_eq!(percent_decode("c%20d+1.tgz").as_deref(), Some("c d+1.tgz"));
        assert_eq!(percent_decode("%zz"), None);
        assert!(is_chart_path("a/b.tgz"));
        assert!(!is_chart_path("../b.tgz"));
        assert!(!is_chart_path("index.yaml"));
        assert!(!is_chart_path("a//b"));
        assert_eq!(parse_quoted("'it''s' x").unwrap(), ("it's".to_string(), 7));
        assert_eq!(parse_quoted(r#""a\"b\u0041""#).unwrap().0, "a\"bA");
    }
}
