//! Entry points for the fuzz targets (`fuzz/`, `cargo +nightly fuzz`) and for the stable
//! replay of their corpora (`tests/fuzz_corpora.rs`). Not an API: hidden from the docs, and
//! nothing in the hosts calls it.
//!
//! Each `fn <target>(data: &[u8])` feeds arbitrary bytes to the real parsers of the core — the
//! untrusted inputs pullgate reads from clients, upstreams, webhook senders and operators —
//! and checks the few properties that must hold for every input (a parsed reference prints
//! back as it was read, a satisfiable range lies inside the blob, every chart reference the
//! Helm rewriter returns can be found again in its map). A panic, an overflow or a failed
//! property is a finding; an `Err` is not.
//!
//! Input layouts (so corpus files stay readable and hand-written seeds are easy):
//! - [`route`]: one method byte (index into [`METHODS`], modulo), then `path[?query]`.
//! - [`reference`], [`challenge`], [`config`]: the text itself.
//! - [`range`]: eight bytes of blob size (little endian), then the `Range` header value.
//! - [`webhook`]: one provider byte (index into [`PROVIDERS`], modulo), then header lines
//!   `name: value\n` up to an empty line, then the body.
//! - [`helm_index`]: one byte choosing how the bytes are split into pushes (0: at once,
//!   otherwise pieces of that many bytes), then the `index.yaml` text.
//!
//! Must not read the clock or do IO; builds wherever the core builds.

use crate::core::config::{parse_config, ConfigError, Secret, SecretResolver, Settings};
use crate::core::gateway::config::{Provider, RuleConfig};
use crate::core::gateway::event::{delivery_id, parse_delivery, Parsed};
use crate::core::gateway::rules::{render_image, rule_matches};
use crate::core::gateway::verify::verify_delivery;
use crate::core::helm::rewrite::Rewriter;
use crate::core::helm::store::{find_in_chunk, map_chunks};
use crate::core::registry::auth::{
    is_trusted_realm, parse_challenge, parse_token_response, Challenge,
};
use crate::core::registry::range::{parse_range, RangeOutcome};
use crate::core::registry::reference::{
    parse_digest, parse_name, parse_reference, parse_tag, Reference,
};
use crate::core::registry::route::{parse_route, Endpoint};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use url::Url;

/// Methods [`route`] chooses from.
pub const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];

/// Providers [`webhook`] chooses from.
pub const PROVIDERS: &[Provider] = &[
    Provider::GitHub,
    Provider::GitLab,
    Provider::Gitea,
    Provider::Forgejo,
    Provider::Bitbucket,
    Provider::GenericHmac,
    Provider::Distribution,
    Provider::Harbor,
];

/// The secret [`webhook`] verifies signatures with (seeds are signed with it).
pub const WEBHOOK_SECRET: &str = "fuzz-secret";

/// The configuration [`route`] routes against: the built-in upstreams plus a local one, a
/// prefixed one and one with an alias.
const ROUTE_CONFIG: &str = r#"
[[upstream]]
host = "localhost:5000"
url = "http://127.0.0.1:5000"

[[upstream]]
host = "registry.example"
url = "https://registry.example/mirror"
aliases = ["alias.example", "alias.example:8443"]
library_prefix = true
"#;

/// Resolves every `env:`-style reference to a fixed value; anything else is refused.
struct FuzzSecrets;

impl SecretResolver for FuzzSecrets {
    fn resolve(&self, reference: &str) -> Result<Secret, ConfigError> {
        match reference.split_once(':') {
            Some((scheme, name)) if !scheme.is_empty() && !name.is_empty() => {
                Ok(Secret::new(format!("value-of-{name}")))
            }
            _ => Err(ConfigError(format!("unknown secret {reference:?}"))),
        }
    }
}

fn route_settings() -> Option<Settings> {
    parse_config(ROUTE_CONFIG).ok()?.resolve(&FuzzSecrets).ok()
}

thread_local! {
    static SETTINGS: Option<Settings> = route_settings();
}

/// Routes `METHOD path?query` (see the module doc for the layout).
pub fn route(data: &[u8]) {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(method) = Method::from_bytes(METHODS[m as usize % METHODS.len()].as_bytes()) else {
        return;
    };
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    SETTINGS.with(|settings| {
        // `the_route_configuration_resolves` guards this.
        let Some(settings) = settings else {
            return;
        };
        let Ok(route) = parse_route(settings, &method, path, query) else {
            return;
        };
        match &route.endpoint {
            Endpoint::Manifest(_) | Endpoint::Blob(_) | Endpoint::TagsList { .. } => {
                let up = route.upstream.unwrap_or(usize::MAX);
                assert!(up < settings.upstreams.len(), "upstream index out of range");
                let name = route.name.as_ref().map(|n| n.as_str()).unwrap_or("");
                assert!(
                    parse_name(name).is_ok(),
                    "routed name {name:?} is not valid"
                );
                assert!(
                    method == Method::GET || method == Method::HEAD,
                    "{method} routed to a read endpoint"
                );
            }
            Endpoint::Base | Endpoint::Health | Endpoint::Ready | Endpoint::Metrics => {
                assert!(route.upstream.is_none());
            }
        }
    });
}

/// Names, tags, digests and references (the text is tried as each).
pub fn reference(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = parse_name(s) {
        assert_eq!(n.as_str(), s);
        assert_eq!(n.to_string(), s);
        // A prefixed name is a name, or refused when it outgrows the length limit.
        match n.with_prefix("library") {
            Ok(prefixed) => assert!(parse_name(prefixed.as_str()).is_ok(), "{prefixed}"),
            Err(_) => assert!(
                s.len() + "library/".len() > 255,
                "{s} refused with a prefix"
            ),
        }
    }
    if let Ok(t) = parse_tag(s) {
        assert_eq!(t.as_str(), s);
        assert!(!s.contains(':') && !s.contains('/'));
    }
    if let Ok(d) = parse_digest(s) {
        assert_eq!(d.as_str(), s);
        assert_eq!(d.hex().len(), 64);
        assert!(!d.as_str().contains('/') && !d.as_str().contains(".."));
    }
    if let Ok(r) = parse_reference(s) {
        assert_eq!(r.to_string(), s);
        if let Reference::Digest(d) = &r {
            assert!(parse_digest(d.as_str()).is_ok());
        }
    }
}

/// A `WWW-Authenticate` value (and, as bytes, a token endpoint's answer).
pub fn challenge(data: &[u8]) {
    let _ = parse_token_response(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(Challenge::Bearer { realm, .. }) = parse_challenge(s) {
        assert!(!realm.is_empty());
        if let Ok(realm) = Url::parse(&realm) {
            for upstream in ["https://registry-1.docker.io", "http://127.0.0.1:5000"] {
                if let Ok(up) = Url::parse(upstream) {
                    let _ = is_trusted_realm(&up, &realm, &["auth.example".to_string()]);
                }
            }
        }
    }
}

/// A `Range` header against a blob size (see the module doc for the layout).
pub fn range(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let (size, header) = data.split_at(8);
    let mut raw = [0u8; 8];
    raw.copy_from_slice(size);
    // Keep sizes in the range a blob can have, and exercise the small ones often.
    let size = u64::from_le_bytes(raw) >> (raw[0] % 64);
    let Ok(header) = std::str::from_utf8(header) else {
        return;
    };
    if let Some(r) = parse_range(header) {
        match r.resolve(size) {
            RangeOutcome::Partial { start, end } => {
                assert!(
                    start <= end,
                    "{header:?} on {size}: start {start} > end {end}"
                );
                assert!(end < size, "{header:?} on {size}: end {end} outside");
            }
            RangeOutcome::Unsatisfiable => {}
        }
    }
}

fn header_block(data: &[u8]) -> (HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    let mut rest = data;
    loop {
        let (line, after) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = after;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return (headers, rest);
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(line[..colon].trim_ascii()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
        if rest.is_empty() {
            return (headers, rest);
        }
    }
}

fn fuzz_rules() -> Vec<RuleConfig> {
    let rule = |branches: &[&str], tags: &[&str], repos: &[&str]| RuleConfig {
        webhook: "hook".into(),
        on: vec![],
        branches: branches.iter().map(|s| s.to_string()).collect(),
        tags: tags.iter().map(|s| s.to_string()).collect(),
        repositories: repos.iter().map(|s| s.to_string()).collect(),
        stage: None,
        target: None,
        image: Some("registry.example/{repo}:{ref_name}-{short_sha}".into()),
    };
    vec![
        rule(&[], &[], &[]),
        rule(
            &["main", "release/*"],
            &["v*"],
            &["*/app", "https://git.example/*"],
        ),
        rule(&["?*-*?"], &["*.*.*"], &["acme/*"]),
    ]
}

/// A webhook delivery: signature check, delivery id, payload, rule matching (see the module
/// doc for the layout). The payload is parsed whatever the signature says, as if it had
/// been verified: the parser must survive what a sender holding the secret can send.
pub fn webhook(data: &[u8]) {
    let Some((&p, rest)) = data.split_first() else {
        return;
    };
    let provider = PROVIDERS[p as usize % PROVIDERS.len()];
    let (headers, body) = header_block(rest);
    let _ = verify_delivery(
        provider,
        WEBHOOK_SECRET,
        "authorization",
        &headers,
        body,
        1_700_000_000_000,
        300_000,
    );
    let _ = delivery_id(provider, &headers);
    let Ok(Parsed::Events(events)) = parse_delivery(provider, &headers, body) else {
        return;
    };
    let rules = fuzz_rules();
    for e in &events {
        let _ = e.kind();
        for r in &rules {
            if rule_matches(r, "hook", e) {
                if let Some(t) = &r.image {
                    let _ = render_image(t, e);
                }
            }
        }
    }
}

/// A Helm `index.yaml` through the streaming rewriter (see the module doc for the layout).
pub fn helm_index(data: &[u8]) {
    let Some((&step, text)) = data.split_first() else {
        return;
    };
    let Ok(base) = Url::parse("https://charts.example/stable/") else {
        return;
    };
    let mut rw = Rewriter::new(base);
    let step = if step == 0 {
        text.len().max(1)
    } else {
        step as usize
    };
    for piece in text.chunks(step) {
        if rw.push(piece).is_err() {
            return;
        }
        while rw.take_chunk().is_some() {}
    }
    let Ok((_, summary)) = rw.finish() else {
        return;
    };
    assert!(
        summary.charts.windows(2).all(|w| w[0].key < w[1].key),
        "chart keys not sorted and unique"
    );
    let map: Vec<(String, Vec<u8>)> = map_chunks(&summary.charts).collect();
    for c in &summary.charts {
        assert!(!c.key.is_empty(), "empty chart path");
        assert!(
            c.url.starts_with("http://") || c.url.starts_with("https://"),
            "chart {} has a non-http URL {:?}",
            c.key,
            c.url
        );
        // The chunk holding a key is the last whose first key is not after it.
        let chunk = map
            .iter()
            .rev()
            .find(|(first, _)| first.as_str() <= c.key.as_str())
            .map(|(_, bytes)| bytes.as_slice())
            .unwrap_or(&[]);
        let found = find_in_chunk(chunk, &c.key);
        assert_eq!(
            found.as_ref(),
            Some(c),
            "chart {:?} not found in its map chunk",
            c.key
        );
    }
}

/// A TOML configuration: parse, then resolve (secrets resolve to fixed values).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut cfg) = parse_config(text) else {
        return;
    };
    let _ = cfg.resolve(&FuzzSecrets);
    if cfg
        .apply_upstream_flag("localhost:5000=http://127.0.0.1:5000")
        .is_ok()
    {
        let _ = cfg.resolve(&FuzzSecrets);
    }
}

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every target, by name (the corpus replay test iterates over this).
pub const TARGETS: &[(&str, Target)] = &[
    ("route", route),
    ("reference", reference),
    ("challenge", challenge),
    ("range", range),
    ("webhook", webhook),
    ("helm_index", helm_index),
    ("config", config),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_accepts_empty_and_tiny_inputs() {
        for (_, f) in TARGETS {
            for input in [&b""[..], b"\0", b"\xff", b"\n\n", b"0123456789"] {
                f(input);
            }
        }
    }

    #[test]
    fn the_route_configuration_resolves() {
        assert!(route_settings().is_some());
    }
}
