//! Media types, header names and the `Accept` negotiation for manifests. Pure.
//!
//! The upstream picks an index or a single manifest from the client's `Accept`; the cache keeps
//! tag records per *accept class* (index-capable or not) so an index is only served to a client
//! that accepts one (OCI distribution spec, "Pulling manifests").
//!
//! An `Accept` entry with `q=0` means "not acceptable" (RFC 9110 §12.4.2): it is left out, and
//! it excludes its media type even when a wildcard (`*/*`) would take it. Other weights do not
//! change the choice: pullgate takes whatever the upstream picked among the acceptable types.

use std::borrow::Cow;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What we ask an upstream for when the client sent no `Accept`.
pub const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Header names, in one place.
pub mod header {
    /// `Docker-Content-Digest`.
    pub const CONTENT_DIGEST: &str = "docker-content-digest";
    /// `Docker-Distribution-API-Version`.
    pub const API_VERSION: &str = "docker-distribution-api-version";
    /// Its value.
    pub const API_VERSION_VALUE: &str = "registry/2.0";
}

/// The media types a client accepts.
///
/// It borrows the request's header values (a media type is copied only when it must be
/// lowercased): this runs on every manifest request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptSet<'a> {
    any: bool,
    types: Vec<Cow<'a, str>>,
    /// Media types listed with `q=0`.
    refused: Vec<Cow<'a, str>>,
    /// The header values as sent.
    raw: &'a [&'a str],
}

/// Which tag record a client's `Accept` maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptClass {
    /// The client accepts an index or manifest list.
    Index,
    /// The client accepts single manifests only.
    Single,
}

impl AcceptClass {
    /// Storage key fragment.
    pub fn key(self) -> &'static str {
        match self {
            AcceptClass::Index => "i",
            AcceptClass::Single => "m",
        }
    }
}

/// Parses all `Accept` header values of a request (joined with `,`).
pub fn parse_accept<'a>(values: &'a [&'a str]) -> AcceptSet<'a> {
    let mut types = Vec::new();
    let mut refused = Vec::new();
    let mut any = values.is_empty();
    for v in values {
        for item in v.split(',') {
            let mut parts = item.split(';');
            let t = parts.next().unwrap_or("").trim();
            let t = if t.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(t.to_ascii_lowercase())
            } else {
                Cow::Borrowed(t)
            };
            if t.is_empty() {
                continue;
            }
            if parts.any(is_zero_weight) {
                refused.push(t);
                continue;
            }
            if t == "*/*" || t == "application/*" {
                any = true;
            }
            types.push(t);
        }
    }
    // No usable entry at all is "no preference"; entries that were all refused are not.
    if types.is_empty() && refused.is_empty() {
        any = true;
    }
    AcceptSet {
        any,
        types,
        refused,
        raw: values,
    }
}

/// Is this `Accept` parameter a weight of zero (`q=0`, `q=0.0`, `Q=0.000`)?
fn is_zero_weight(param: &str) -> bool {
    let Some((name, value)) = param.split_once('=') else {
        return false;
    };
    if !name.trim().eq_ignore_ascii_case("q") {
        return false;
    }
    let value = value.trim();
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    int == "0" && frac.chars().all(|c| c == '0')
}

impl AcceptSet<'_> {
    /// Does the client take `media_type`?
    pub fn accepts(&self, media_type: &str) -> bool {
        if self.refused.iter().any(|t| t == media_type) {
            return false;
        }
        self.any || self.types.iter().any(|t| t == media_type)
    }

    /// The record class.
    pub fn class(&self) -> AcceptClass {
        if self.accepts(OCI_INDEX) || self.accepts(DOCKER_LIST) {
            AcceptClass::Index
        } else {
            AcceptClass::Single
        }
    }

    /// The `Accept` to send upstream: the client's, or every manifest type.
    pub fn upstream_value(&self) -> String {
        match self.raw {
            r if !r.is_empty() && !self.any => r.join(", "),
            _ => DEFAULT_ACCEPT
                .split(", ")
                .filter(|t| !self.refused.iter().any(|r| r == t))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// The media type of a manifest: the upstream's `Content-Type` without parameters, else the
/// body's `mediaType`, else OCI manifest (the spec's default for a body without one).
pub fn manifest_media_type(content_type: Option<&str>, body: &serde_json::Value) -> String {
    let from_header = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|c| !c.is_empty() && c != "application/json" && c != "text/plain");
    from_header
        .or_else(|| {
            body.get("mediaType")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| OCI_MANIFEST.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_classes() {
        let a = parse_accept(&["application/vnd.oci.image.manifest.v1+json"]);
        assert_eq!(a.class(), AcceptClass::Single);
        assert!(!a.accepts(OCI_INDEX));
        let b = parse_accept(&[
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json; q=0.5",
        ]);
        assert_eq!(b.class(), AcceptClass::Index);
        assert!(b.accepts(OCI_INDEX));
        let none = parse_accept(&[]);
        assert!(none.accepts(DOCKER_LIST));
        assert_eq!(none.upstream_value(), DEFAULT_ACCEPT);
        let star = parse_accept(&["*/*"]);
        assert_eq!(star.class(), AcceptClass::Index);
        assert_eq!(
            a.upstream_value(),
            "application/vnd.oci.image.manifest.v1+json"
        );
    }

    #[test]
    fn q_zero_entries_are_not_accepted() {
        let a = parse_accept(&[
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json; q=0",
        ]);
        assert!(!a.accepts(OCI_INDEX));
        assert_eq!(a.class(), AcceptClass::Single);
        for zero in ["q=0", "q=0.0", "Q=0.000", " q = 0 "] {
            let refused = format!("{OCI_INDEX};{zero}");
            let values = [refused.as_str(), OCI_MANIFEST];
            let set = parse_accept(&values);
            assert!(!set.accepts(OCI_INDEX), "{zero}");
            assert!(set.accepts(OCI_MANIFEST), "{zero}");
        }
        let low = format!("{OCI_INDEX};q=0.001");
        let low_values = [low.as_str()];
        let low = parse_accept(&low_values);
        assert!(low.accepts(OCI_INDEX));
        // A refusal beats a wildcard.
        let (list_refused, index_refused) =
            (format!("{DOCKER_LIST};q=0"), format!("{OCI_INDEX};q=0"));
        let wild_values = ["*/*", list_refused.as_str(), index_refused.as_str()];
        let wild = parse_accept(&wild_values);
        assert!(wild.accepts(OCI_MANIFEST));
        assert_eq!(wild.class(), AcceptClass::Single);
        assert_eq!(
            wild.upstream_value(),
            format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}")
        );
        // Refusing everything listed is not "no preference".
        let none_values = [index_refused.as_str()];
        let none = parse_accept(&none_values);
        assert!(!none.accepts(OCI_INDEX) && !none.accepts(OCI_MANIFEST));
        let star_refused = parse_accept(&["*/*;q=0", OCI_MANIFEST]);
        assert!(star_refused.accepts(OCI_MANIFEST) && !star_refused.accepts(OCI_INDEX));
    }

    #[test]
    fn media_type_from_header_or_body() {
        let body = serde_json::json!({"mediaType": DOCKER_MANIFEST});
        assert_eq!(
            manifest_media_type(
                Some("application/vnd.oci.image.index.v1+json; charset=utf-8"),
                &body
            ),
            OCI_INDEX
        );
        assert_eq!(
            manifest_media_type(Some("application/json"), &body),
            DOCKER_MANIFEST
        );
        assert_eq!(
            manifest_media_type(None, &serde_json::json!({})),
            OCI_MANIFEST
        );
    }
}
