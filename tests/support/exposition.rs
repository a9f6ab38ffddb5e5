//! A strict reader of the Prometheus text exposition format (0.0.4), for tests of
//! `/metrics`: every sample's name and labels are well formed, its family has a `# TYPE`, no
//! series appears twice, and every histogram's buckets are cumulative (monotonic in `le`,
//! ending in `+Inf` equal to `_count`). Included by path (`#[path]`), so core tests need not
//! build the end-to-end harness.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};

/// One sample: name, labels in order, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `k`.
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed, checked exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: HashMap<String, String>,
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").ok_or(format!("label in {s:?}"))?;
        if !is_name(name) {
            return Err(format!("label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("escape at the end of {s:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated label value in {s:?}")),
            }
        };
        out.push((name.to_string(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(out)
}

fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| t == "histogram") {
                return base;
            }
        }
    }
    name
}

/// Parses and checks `text`; Err names the first problem.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut e = Exposition::default();
    let mut seen = HashSet::new();
    // Each family's lines come together: once another family starts, it is closed.
    let mut closed: HashSet<String> = HashSet::new();
    let mut current = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or(format!("TYPE line {line:?}"))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(format!("type {kind:?}"));
            }
            if e.types.insert(name.to_string(), kind.to_string()).is_some() {
                return Err(format!("{name} typed twice"));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or(format!("sample {line:?}"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().map_err(|_| format!("value in {line:?}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n,
                parse_labels(l.strip_suffix('}').ok_or(format!("labels in {line:?}"))?)?,
            ),
            None => (series, Vec::new()),
        };
        if !is_name(name) {
            return Err(format!("metric name {name:?}"));
        }
        let family = family_of(name, &e.types);
        if !e.types.contains_key(family) {
            return Err(format!("{name} has no # TYPE before it"));
        }
        if family != current {
            if closed.contains(family) {
                return Err(format!("{series}: family {family} is split in two groups"));
            }
            closed.insert(std::mem::replace(&mut current, family.to_string()));
        }
        if !seen.insert(series.to_string()) {
            return Err(format!("{series} appears twice"));
        }
        e.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    check_histograms(&e)?;
    Ok(e)
}

/// A label set.
type Labels = Vec<(String, String)>;

fn check_histograms(e: &Exposition) -> Result<(), String> {
    for (family, _) in e.types.iter().filter(|(_, t)| *t == "histogram") {
        let bucket = format!("{family}_bucket");
        // Label set without `le` → (le, count).
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for s in e.samples.iter().filter(|s| s.name == bucket) {
            let le = s.label("le").ok_or(format!("{bucket} without le"))?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse::<f64>().map_err(|_| format!("le {le:?}"))?
            };
            let rest: Vec<_> = s
                .labels
                .iter()
                .filter(|(k, _)| k != "le")
                .cloned()
                .collect();
            series.entry(rest).or_default().push((le, s.value));
        }
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!(
                    "{family}{labels:?}: buckets not cumulative: {buckets:?}"
                ));
            }
            let inf = buckets
                .last()
                .filter(|(le, _)| le.is_infinite())
                .ok_or(format!("{family}{labels:?}: no +Inf bucket"))?
                .1;
            let count = e
                .samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && s.labels == labels)
                .ok_or(format!("{family}{labels:?}: no _count"))?;
            if count.value != inf {
                return Err(format!(
                    "{family}{labels:?}: +Inf {inf} != count {}",
                    count.value
                ));
            }
        }
    }
    Ok(())
}

impl Exposition {
    /// The samples of `name`.
    pub fn of(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The sum of every sample of `name`.
    pub fn total(&self, name: &str) -> f64 {
        self.of(name).iter().map(|s| s.value).sum()
    }
}
