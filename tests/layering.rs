//! The core's dependency rules, read from its source: every `crate::core::…` and `super::…`
//! path in `src/core` (test modules aside) is an edge from the file it is in to the file that
//! defines the module it names. The rules (docs/ARCHITECTURE.md, "Dependency rules"):
//!
//! 1. No cycle among the core's files.
//! 2. Leaves import only leaves.
//! 3. Nothing in the core imports `app`; only `app` imports `admin`.
//! 4. A feature (`registry`, `access`, `helm`, `gateway`, `admin`) imports leaves, `context`,
//!    `config`, `outbound`, its own files, and from another feature only its public face:
//!    `access::caller`, `gateway::keys`, `registry::{route, upstream, config, auth}`.
//! 5. Hosts (`src/native`, `src/worker`, `src/spin`) import only `app`, `body`, `config`,
//!    `ports`, `metrics` and the leaves, plus `access`'s client address type and `outbound`
//!    (the native resolver enforces the outbound address policy).
//!
//! `edges_of` and `violations` are the whole checker; `a_forbidden_edge_is_caught` feeds it a
//! made-up file that breaks each rule, so the test cannot pass vacuously.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Core files that import only each other (relative to `src/core`, without `.rs`).
const LEAVES: &[&str] = &[
    "body",
    "ports",
    "error",
    "metrics",
    "time",
    "glob",
    "ct",
    "cidr",
    "forwarded",
    "freshness",
    "http",
    "digest_check",
    "config/value",
    "registry/reference",
    "registry/media",
    "registry/range",
    "registry/keys",
    "registry/records",
];

/// Shared, non-feature modules a feature may import besides the leaves.
const SHARED: &[&str] = &["context", "config/mod", "outbound"];

/// What a feature may import from another feature.
const FACES: &[&str] = &[
    "access/caller",
    "gateway/keys",
    "registry/route",
    "registry/upstream",
    "registry/config",
    "registry/auth",
];

/// What a host may import.
const HOST_MAY: &[&str] = &[
    "app",
    "body",
    "config/mod",
    "config/value",
    "ports",
    "metrics",
    "access/mod",
    "outbound",
];

fn feature_of(file: &str) -> Option<&str> {
    let top = file.split('/').next()?;
    match top {
        "registry" | "access" | "helm" | "gateway" => Some(top),
        "admin" => Some("admin"),
        _ => None,
    }
}

/// Source without comments and test-only items: a `#[cfg(test)]` item is dropped — an inline
/// `mod … { … }` up to its closing brace, anything else (`mod tests;`, a `use`) to its `;`.
fn non_test(text: &str) -> String {
    // Comment lines (docs included) name modules without depending on them. Only whole
    // comment lines are dropped: a `//` inside a line may be a URL in a string.
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "#[cfg(test)]".len()..];
        let semi = after.find(';').unwrap_or(after.len());
        let brace = after.find('{').unwrap_or(after.len());
        rest = if brace < semi {
            let end = matching_brace(&after[brace..]).map_or(after.len(), |e| brace + e + 1);
            &after[end..]
        } else {
            &after[(semi + 1).min(after.len())..]
        };
    }
    out.push_str(rest);
    out
}

fn is_test_file(rel: &str) -> bool {
    rel.ends_with("tests") || rel.ends_with("_tests")
}

/// The module file (relative to `src/core`, no extension) a path of segments names, given
/// the set of files that exist: the longest prefix of the segments that is a file.
fn resolve(segments: &[&str], files: &BTreeSet<String>) -> Option<String> {
    for n in (1..=segments.len()).rev() {
        let p = segments[..n].join("/");
        if files.contains(&p) {
            return Some(p);
        }
        let m = format!("{p}/mod");
        if files.contains(&m) {
            return Some(m);
        }
    }
    None
}

fn path_segments(s: &str) -> Vec<&str> {
    s.split("::")
        .map(|x| x.trim_matches(|c: char| !(c.is_alphanumeric() || c == '_')))
        .take_while(|x| {
            !x.is_empty()
                && x.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .collect()
}

/// Expands `use a::b::{c, d::{e, f}}` and plain paths in `text` into module paths
/// (`a::b::c`, `a::b::d::e`, …) that start with `prefix`.
fn paths_from(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let after = &rest[i..];
        // Plain path up to a delimiter that ends it.
        let end = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(after.len());
        let head = &after[..end];
        if after[end..].starts_with('{') {
            // A group: take its items (one level of nesting is enough for our style).
            let group_end = matching_brace(&after[end..]).map_or(after.len(), |g| end + g);
            let inner = &after[end + 1..group_end.saturating_sub(0).min(after.len())];
            for item in split_top(inner) {
                let item = item.trim();
                if item.is_empty() {
                    continue;
                }
                if item.contains('{') {
                    let (p, sub) = item.split_at(item.find('{').unwrap_or(item.len()));
                    let sub = sub.trim_start_matches('{').trim_end_matches('}');
                    for s in split_top(sub) {
                        out.push(format!("{head}{p}{}", s.trim()));
                    }
                } else {
                    out.push(format!("{head}{item}"));
                }
            }
        } else {
            out.push(head.to_string());
        }
        rest = &after[prefix.len()..];
    }
    out
}

fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// The core files a source file imports. `rel` is the file relative to `src/core` (or
/// `host:<path>` for a host file), without extension.
fn edges_of(rel: &str, text: &str, files: &BTreeSet<String>) -> BTreeSet<String> {
    let text = &non_test(text);
    let mut out = BTreeSet::new();
    for p in paths_from(text, "crate::core::") {
        let segs = path_segments(&p["crate::core::".len()..]);
        if let Some(f) = resolve(&segs, files) {
            out.insert(f);
        }
    }
    if !rel.starts_with("host:") {
        // `super::x` from `a/b.rs` (or `a/b/mod.rs`) names `a/x`.
        let dir: Vec<&str> = {
            let mut d: Vec<&str> = rel.split('/').collect();
            d.pop();
            if rel.ends_with("/mod") {
                d.pop();
            }
            d
        };
        for p in paths_from(text, "super::") {
            let segs = path_segments(&p["super::".len()..]);
            let mut full: Vec<&str> = dir.clone();
            full.extend(segs.iter());
            if let Some(f) = resolve(&full, files) {
                out.insert(f);
            } else if segs.is_empty() {
                // `super::Item` names the parent's mod.rs.
                let mut m = dir.join("/");
                m.push_str("/mod");
                if files.contains(&m) {
                    out.insert(m);
                }
            }
        }
        if rel.ends_with("/mod") {
            // A mod.rs's own `mod x;` declarations are not imports.
        }
    }
    out.remove(rel);
    out
}

fn is_leaf(f: &str) -> bool {
    LEAVES.contains(&f)
}

/// Every rule a set of edges breaks, as readable lines.
fn violations(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut v = Vec::new();
    for (from, tos) in edges {
        for to in tos {
            let edge = format!("{from} -> {to}");
            if let Some(host) = from.strip_prefix("host:") {
                if !(HOST_MAY.contains(&to.as_str()) || is_leaf(to)) {
                    v.push(format!("{edge}: host {host} may import only app, body, config, ports, metrics and leaves"));
                }
                continue;
            }
            if is_leaf(from) && !is_leaf(to) {
                v.push(format!("{edge}: a leaf imports only leaves"));
            }
            if to == "app" {
                v.push(format!("{edge}: nothing in the core imports app"));
            }
            if to == "admin" && from != "app" {
                v.push(format!("{edge}: only app imports admin"));
            }
            if let (Some(ff), Some(tf)) = (feature_of(from), feature_of(to)) {
                if ff != tf && !FACES.contains(&to.as_str()) && !is_leaf(to) {
                    v.push(format!(
                        "{edge}: features import another feature's public face only"
                    ));
                }
            }
            if feature_of(from).is_some()
                && feature_of(to).is_none()
                && !is_leaf(to)
                && !SHARED.contains(&to.as_str())
            {
                v.push(format!(
                    "{edge}: a feature imports leaves, context, config and outbound"
                ));
            }
        }
    }
    v.extend(cycles(edges));
    v
}

/// The strongly connected components with more than one file (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<String>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        if let Some(tos) = t.edges.get(v) {
            for w in tos {
                let w = w.as_str();
                if !t.edges.contains_key(w) {
                    continue;
                }
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(lw));
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(iw));
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out
                    .push(format!("import cycle among: {}", comp.join(", ")));
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !v.starts_with("host:") && !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("readable source dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn rel_name(root: &Path, p: &Path) -> String {
    let r = p.strip_prefix(root).expect("under root").with_extension("");
    r.to_string_lossy().replace('\\', "/")
}

fn graph() -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let core = src.join("core");
    let mut core_files = Vec::new();
    rs_files(&core, &mut core_files);
    let names: BTreeSet<String> = core_files.iter().map(|p| rel_name(&core, p)).collect();
    let mut edges = BTreeMap::new();
    for p in &core_files {
        let rel = rel_name(&core, p);
        if is_test_file(&rel) {
            continue;
        }
        let text = fs::read_to_string(p).expect("readable");
        edges.insert(rel.clone(), edges_of(&rel, &text, &names));
    }
    for host in ["native", "worker", "spin"] {
        let mut files = Vec::new();
        let dir = src.join(host);
        if dir.exists() {
            rs_files(&dir, &mut files);
        }
        for p in files {
            let rel = format!("host:{}", rel_name(&src, &p));
            let text = fs::read_to_string(&p).expect("readable");
            edges.insert(rel.clone(), edges_of(&rel, &text, &names));
        }
    }
    (names, edges)
}

#[test]
fn the_core_keeps_one_direction_of_dependency() {
    let (names, edges) = graph();
    assert!(
        names.contains("app") && names.contains("context"),
        "core layout found"
    );
    assert!(
        edges.values().map(BTreeSet::len).sum::<usize>() > 50,
        "edges were read"
    );
    let v = violations(&edges);
    assert!(v.is_empty(), "dependency rules broken:\n{}", v.join("\n"));
}

#[test]
fn a_forbidden_edge_is_caught() {
    let (names, mut edges) = graph();
    // Each made-up import breaks one rule.
    let bad = [
        (
            "time",
            "use crate::core::context::Inner;",
            "a leaf imports only leaves",
        ),
        (
            "helm/store",
            "use crate::core::app::App;",
            "nothing in the core imports app",
        ),
        (
            "gateway/pump",
            "use crate::core::admin::handle;",
            "only app imports admin",
        ),
        (
            "gateway/hook",
            "use crate::core::helm::HelmRepo;",
            "public face only",
        ),
        (
            "host:native/store",
            "use crate::core::registry::blobs;",
            "host native/store",
        ),
        (
            "context",
            "use crate::core::registry::links::record;",
            "import cycle",
        ),
    ];
    for (from, line, rule) in bad {
        let mut e = edges.clone();
        let added = edges_of(from, line, &names);
        assert!(!added.is_empty(), "{line} resolves to a core file");
        e.entry(from.to_string()).or_default().extend(added);
        let v = violations(&e);
        assert!(
            v.iter().any(|x| x.contains(rule)),
            "{from}: `{line}` should break `{rule}`; got {v:?}"
        );
    }
    // The grouped form is read too.
    let grouped = edges_of(
        "gateway/hook",
        "use crate::core::{app::App, registry::{blobs, links::Via}};",
        &names,
    );
    assert!(
        grouped.contains("app")
            && grouped.contains("registry/blobs")
            && grouped.contains("registry/links")
    );
    edges.clear();
}
