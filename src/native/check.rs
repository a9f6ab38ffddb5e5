//! `pullgate check-config FILE`: every problem of a configuration file, each with the key path
//! at fault (`upstream[2].url`, `cache.tag_tll`) and, where the file has one, its line and
//! column.
//!
//! The check goes in three passes, each over the parts the previous one accepted:
//! 1. TOML syntax: every error the recovering parser finds.
//! 2. Shape (unknown keys, wrong types): each top-level key, and each entry of an array of
//!    tables, is deserialized on its own, so one typo does not hide the next.
//! 3. Meaning (what [`Config::resolve`] refuses, plus the native `[server]` keys): each section
//!    is resolved on its own; a list whose whole fails is then resolved entry by entry to say
//!    which entries are at fault.
//!
//! Secret references are checked for their form (`env:NAME`, `file:/path`) but never read:
//! the check runs where the secrets are not (CI, a workstation). A problem's key path names
//! where it was found; its line and column come from that key's place in the file.

use crate::core::config::{Config, ConfigError, Secret, SecretResolver};
use crate::native::secrets::is_well_formed;
use serde::Deserialize;
use std::fmt;
use std::ops::Range;
use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key path at fault (`upstream[2].url`); empty for the document as a whole.
    pub path: String,
    /// 1-based line and column, when the problem has a place in the file.
    pub at: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((line, column)) = self.at {
            write!(f, "line {line}, column {column}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Accepts any well-formed native reference without reading it.
struct FormOnly;

impl SecretResolver for FormOnly {
    fn resolve(&self, reference: &str) -> Result<Secret, ConfigError> {
        if is_well_formed(reference) {
            Ok(Secret::new("unread".into()))
        } else {
            Err(ConfigError(format!(
                "secret reference {reference:?}: the native host reads env:NAME or file:/path"
            )))
        }
    }
}

/// Every problem in `text` (empty when the configuration is valid).
pub fn check_config_text(text: &str) -> Vec<Problem> {
    let (root, syntax) = DeTable::parse_recoverable(text);
    let doc = Doc {
        text,
        root: root.get_ref(),
    };
    if !syntax.is_empty() {
        return syntax
            .iter()
            .map(|e| doc.problem_at(e.span(), e.message()))
            .collect();
    }
    let (mut problems, sound) = doc.shape_problems(root.span());
    match Config::deserialize(toml::de::Deserializer::from(sound)) {
        Ok(config) => problems.extend(doc.meaning_problems(&config)),
        // Pass 2 accepted every part it kept; the whole cannot fail, but say so if it does.
        Err(e) => problems.push(doc.problem_at(e.span(), e.message())),
    }
    problems.sort_by_key(|p| p.at);
    problems
}

/// The parsed document, for finding key paths and places.
struct Doc<'a, 'i> {
    text: &'a str,
    root: &'a DeTable<'i>,
}

impl<'i> Doc<'_, 'i> {
    /// A problem at byte range `span`, its path found from the document.
    fn problem_at(&self, span: Option<Range<usize>>, message: &str) -> Problem {
        let start = span.map(|s| s.start);
        Problem {
            path: start.map(|s| path_at(self.root, s)).unwrap_or_default(),
            at: start.map(|s| line_column(self.text, s)),
            message: message.trim_end().to_string(),
        }
    }

    /// A problem at key path `path`, placed where that key is in the file.
    fn problem_for(&self, path: String, message: &str) -> Problem {
        Problem {
            at: span_of(self.root, &path).map(|s| line_column(self.text, s.start)),
            path,
            message: message.trim_end().to_string(),
        }
    }

    /// Pass 2: each top-level key alone, each entry of an array of tables alone. Also the
    /// document without the top-level keys that failed, for pass 3.
    fn shape_problems(&self, span: Range<usize>) -> (Vec<Problem>, Spanned<DeTable<'i>>) {
        let mut problems = Vec::new();
        let mut sound = DeTable::new();
        for (key, value) in self.root.iter() {
            let parts: Vec<Spanned<DeValue<'_>>> = match value.get_ref() {
                DeValue::Array(items) if items.iter().all(|i| i.get_ref().is_table()) => items
                    .iter()
                    .map(|item| {
                        let mut one = DeArray::new();
                        one.push(item.clone());
                        Spanned::new(value.span(), DeValue::Array(one))
                    })
                    .collect(),
                _ => vec![value.clone()],
            };
            let mut failed = false;
            for part in parts {
                let mut table = DeTable::new();
                table.insert(key.clone(), part);
                let de = toml::de::Deserializer::from(Spanned::new(span.clone(), table));
                if let Err(e) = Config::deserialize(de) {
                    problems.push(self.problem_at(e.span(), e.message()));
                    failed = true;
                }
            }
            if !failed {
                sound.insert(key.clone(), value.clone());
            }
        }
        (problems, Spanned::new(span, sound))
    }

    /// One section of pass 3: `part` resolved; when it fails, each of `entries` alone, to
    /// name the entries at fault (the section itself when none fails alone).
    fn unit(&self, path: &str, part: Config, entries: Vec<(String, Config)>) -> Vec<Problem> {
        let Err(whole) = part.resolve(&FormOnly) else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        for (entry_path, entry) in entries {
            if let Err(e) = entry.resolve(&FormOnly) {
                problems.push(self.problem_for(entry_path, &e.0));
            }
        }
        if problems.is_empty() {
            problems.push(self.problem_for(path.to_string(), &whole.0));
        }
        problems
    }

    /// Pass 3: each section resolved alone.
    fn meaning_problems(&self, c: &Config) -> Vec<Problem> {
        let d = Config::default;
        let mut problems = self.unit(
            "cache",
            Config {
                cache: c.cache.clone(),
                ..d()
            },
            vec![],
        );
        problems.extend(self.upstream_problems(c));
        let helm_entries = c
            .helm
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let one = Config {
                    helm: vec![h.clone()],
                    ..d()
                };
                (format!("helm[{i}]"), one)
            })
            .collect();
        let helm = Config {
            helm: c.helm.clone(),
            ..d()
        };
        problems.extend(self.unit("helm", helm, helm_entries));
        problems.extend(self.gateway_problems(c));
        problems.extend(self.access_problems(c));
        problems.extend(self.unit(
            "outbound",
            Config {
                outbound: c.outbound.clone(),
                ..d()
            },
            vec![],
        ));
        if let Err(e) = crate::native::listener::ServerLimits::parse(&c.server) {
            let message = e.trim_start_matches("configuration: ").to_string();
            problems.push(self.problem_for("server".into(), &message));
        }
        if let Err(e) = crate::native::probes::DrainPlan::parse(&c.server, None) {
            problems.push(self.problem_for("server".into(), &e));
        }
        for (path, message) in crate::native::tls::check_config(&c.tls) {
            problems.push(self.problem_for(path.into(), &message));
        }
        problems.extend(self.trusted_proxy_problems(c));
        if c.server.proxy_protocol == Some(true) && c.trusted_proxies.is_empty() {
            let message = crate::native::PROXY_PROTOCOL_ALONE.trim_start_matches("configuration: ");
            let message = message.trim_start_matches("server.proxy_protocol ");
            problems.push(self.problem_for("server.proxy_protocol".into(), message));
        }
        if problems.is_empty() {
            if let Err(e) = c.resolve(&FormOnly) {
                problems.push(self.problem_for(String::new(), &e.0));
            }
        }
        problems
    }

    /// `trusted_proxies` entry by entry, and `forwarded_header`.
    fn trusted_proxy_problems(&self, c: &Config) -> Vec<Problem> {
        use crate::core::forwarded::parse_trusted_proxies;
        let mut problems = Vec::new();
        for (i, net) in c.trusted_proxies.iter().enumerate() {
            if let Err(e) = parse_trusted_proxies(std::slice::from_ref(net), None) {
                let message = e.trim_start_matches("trusted_proxies: ");
                problems.push(self.problem_for(format!("trusted_proxies[{i}]"), message));
            }
        }
        if let Err(e) = parse_trusted_proxies(&[], c.forwarded_header.as_deref()) {
            let message = e.trim_start_matches("forwarded_header ");
            problems.push(self.problem_for("forwarded_header".into(), message));
        }
        problems
    }

    /// Upstream entries: the registry's own check names the key at fault; the list as a whole
    /// (duplicate names, two defaults) when no entry is at fault.
    fn upstream_problems(&self, c: &Config) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (i, u) in c.upstream.iter().enumerate() {
            for (key, e) in crate::core::config::check_upstream(u, &FormOnly) {
                problems.push(self.problem_for(format!("upstream[{i}].{key}"), &e.0));
            }
        }
        if problems.is_empty() {
            let all = Config {
                builtin_upstreams: c.builtin_upstreams,
                upstream: c.upstream.clone(),
                ..Config::default()
            };
            problems.extend(self.unit("upstream", all, vec![]));
        }
        problems
    }

    /// The gateway's sections together, then each target and webhook alone.
    fn gateway_problems(&self, c: &Config) -> Vec<Problem> {
        let d = Config::default;
        let gateway = Config {
            webhook: c.webhook.clone(),
            target: c.target.clone(),
            rule: c.rule.clone(),
            stage: c.stage.clone(),
            chain: c.chain.clone(),
            gateway: c.gateway.clone(),
            ..d()
        };
        let mut entries: Vec<(String, Config)> = Vec::new();
        for (i, t) in c.target.iter().enumerate() {
            let one = Config {
                target: vec![t.clone()],
                ..d()
            };
            entries.push((format!("target[{i}]"), one));
        }
        for (i, w) in c.webhook.iter().enumerate() {
            let one = Config {
                webhook: vec![w.clone()],
                ..d()
            };
            entries.push((format!("webhook[{i}]"), one));
        }
        self.unit("gateway", gateway, entries)
    }

    /// The access sections together, then each network rule and identity alone.
    fn access_problems(&self, c: &Config) -> Vec<Problem> {
        let d = Config::default;
        let access = Config {
            auth: c.auth.clone(),
            identity: c.identity.clone(),
            access: c.access.clone(),
            network: c.network.clone(),
            rate_limit: c.rate_limit.clone(),
            ..d()
        };
        let mut entries: Vec<(String, Config)> = Vec::new();
        for (i, n) in c.network.iter().enumerate() {
            let one = Config {
                network: vec![n.clone()],
                ..d()
            };
            entries.push((format!("network[{i}]"), one));
        }
        for (i, n) in c.identity.iter().enumerate() {
            let one = Config {
                identity: vec![n.clone()],
                auth: c.auth.clone(),
                ..d()
            };
            entries.push((format!("identity[{i}]"), one));
        }
        self.unit("auth", access, entries)
    }
}

/// The 1-based line and column (in characters) of byte offset `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |n| n + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// The key path of the innermost key whose key or value holds byte offset `at` (tables are
/// searched whole: a `[section]`'s span does not cover its keys).
fn path_at(table: &DeTable<'_>, at: usize) -> String {
    walk(table, at).unwrap_or_default()
}

fn walk(table: &DeTable<'_>, at: usize) -> Option<String> {
    for (key, value) in table.iter() {
        let name = key.get_ref().to_string();
        if key.span().contains(&at) {
            return Some(name);
        }
        match value.get_ref() {
            DeValue::Table(inner) => {
                if let Some(sub) = walk(inner, at) {
                    return Some(format!("{name}.{sub}"));
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let DeValue::Table(inner) = item.get_ref() {
                        if let Some(sub) = walk(inner, at) {
                            return Some(format!("{name}[{i}].{sub}"));
                        }
                    }
                    if item.span().contains(&at) {
                        return Some(format!("{name}[{i}]"));
                    }
                }
            }
            _ => {}
        }
        if value.span().contains(&at) {
            return Some(name);
        }
    }
    None
}

/// Where key path `path` (`a.b[2].c`) is in the document: the key's span, or an entry's.
fn span_of(root: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let mut table = root;
    let mut span = None;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let (key, value) = table.get_key_value(name)?;
        span = Some(key.span());
        let value = match (value.get_ref(), index) {
            (DeValue::Array(items), Some(i)) => {
                let item = items.get(i)?;
                span = Some(item.span());
                item
            }
            _ => value,
        };
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => break,
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Vec<String> {
        check_config_text(text)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_valid_configuration_has_no_problems() {
        assert!(check("").is_empty());
        assert!(check("[cache]\ntag_ttl = \"1m\"\n[[upstream]]\nhost = \"r.example\"\nurl = \"https://r.example\"\nusername = \"file:/run/secrets/u\"\npassword = \"env:P\"\n").is_empty());
    }

    #[test]
    fn a_misspelt_key_is_named_with_its_line() {
        let p = check_config_text("listen = \"0.0.0.0:5000\"\n\n[cache]\ntag_tll = \"5m\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "cache.tag_tll");
        assert_eq!(p[0].at, Some((4, 1)));
        assert!(p[0].message.contains("unknown field `tag_tll`"), "{p:?}");
    }

    #[test]
    fn every_shape_error_is_reported_not_only_the_first() {
        let text = "[cache]\nmax_fills = \"many\"\n\n[[upstream]]\nhost = \"a.example\"\nurl = \"https://a.example\"\n\n[[upstream]]\nhost = \"b.example\"\nurll = \"https://b.example\"\n\n[sevrer]\n";
        let p = check_config_text(text);
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["cache.max_fills", "upstream[1].urll", "sevrer"],
            "{p:?}"
        );
        assert_eq!(p[0].at, Some((2, 13)));
        assert_eq!(p[1].at, Some((10, 1)));
        assert_eq!(p[2].at, Some((12, 2)));
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let p = check_config_text("[cache]\ntag_ttl = \"5m\nmax_size = 3\n");
        assert!(!p.is_empty());
        assert_eq!(p[0].at.map(|a| a.0), Some(2), "{p:?}");
    }

    #[test]
    fn meaning_errors_name_the_entry_and_key() {
        let text = "[[upstream]]\nhost = \"a.example\"\nurl = \"https://a.example\"\n\n[[upstream]]\nhost = \"b.example\"\nurl = \"https://b.example\"\n\n[[upstream]]\nhost = \"c.example\"\nurl = \"ftp://c.example\"\npassword = \"hunter2\"\n\n[cache]\nmax_fills = 0\n\n[server]\nmax_connections = 0\ndrain = \"soon\"\n";
        let p = check_config_text(text);
        let shown: Vec<String> = p.iter().map(ToString::to_string).collect();
        let find = |path: &str| p.iter().find(|p| p.path == path);
        let url = find("upstream[2].url").unwrap_or_else(|| panic!("{shown:?}"));
        assert_eq!(url.at, Some((11, 1)));
        // A password without a username: the missing key is named.
        assert!(find("upstream[2].username").is_some(), "{shown:?}");
        assert!(!shown.iter().any(|s| s.contains("hunter2")), "{shown:?}");
        assert_eq!(
            find("cache").map(|p| p.at),
            Some(Some((14, 2))),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|s| s.contains("server.drain")),
            "{shown:?}"
        );
        assert!(find("server").is_some(), "{shown:?}");
    }

    #[test]
    fn secret_references_are_checked_for_form_but_not_read() {
        let p = check("[[upstream]]\nhost = \"r.example\"\nurl = \"https://r.example\"\nusername = \"vault:x\"\npassword = \"file:/definitely/not/here\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("upstream[0].username"), "{p:?}");
    }

    #[test]
    fn tls_and_trusted_proxies_are_checked_with_their_lines() {
        let text = "trusted_proxies = [\"10.0.0.0/8\", \"not-a-net\"]\nforwarded_header = \"x-real-ip\"\n\n[tls]\ncert = \"/etc/pullgate/cert.pem\"\n\n[server]\nproxy_protocol = true\n";
        let p = check_config_text(text);
        let shown: Vec<String> = p.iter().map(ToString::to_string).collect();
        let find = |path: &str| p.iter().find(|p| p.path == path);
        let net = find("trusted_proxies[1]").unwrap_or_else(|| panic!("{shown:?}"));
        assert_eq!(net.at, Some((1, 34)), "{shown:?}");
        assert!(net.message.contains("not-a-net"), "{shown:?}");
        assert_eq!(find("forwarded_header").map(|p| p.at), Some(Some((2, 1))));
        let tls = find("tls").unwrap_or_else(|| panic!("{shown:?}"));
        assert!(tls.message.contains("without key"), "{shown:?}");
        assert_eq!(tls.at, Some((4, 2)));
        assert_eq!(p.len(), 3, "{shown:?}");
        assert!(check(
            "trusted_proxies = [\"127.0.0.1\", \"::1\"]\nforwarded_header = \"forwarded\"\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[server]\nproxy_protocol = true\n"
        )
        .is_empty());
        let alone = check_config_text("[server]\nproxy_protocol = true\n");
        assert_eq!(alone.len(), 1, "{alone:?}");
        assert_eq!(alone[0].path, "server.proxy_protocol");
        assert_eq!(alone[0].at, Some((2, 1)));
        let typo = check_config_text("[tls]\ncert = \"c\"\nkey = \"k\"\nchain = \"x\"\n");
        assert_eq!(typo[0].path, "tls.chain", "{typo:?}");
    }

    #[test]
    fn line_columns_count_characters() {
        assert_eq!(line_column("ab\ncdé", 0), (1, 1));
        assert_eq!(line_column("ab\ncdé", 3), (2, 1));
        assert_eq!(line_column("aé\nx", 4), (2, 1));
        assert_eq!(line_column("é = 1", 3), (1, 3));
    }
}
