//! Routing: a request's method, path and query to a registry endpoint and the upstream it
//! belongs to. Pure.
//!
//! Repository names contain any number of `/`, so the path is split at the last
//! `/manifests/`, `/blobs/` or `/tags/list` (OCI distribution spec, "Endpoints"). The upstream
//! comes from containerd's `?ns=<host>`, else from a first path component that names a
//! configured upstream (`/v2/ghcr.io/owner/app/...`), else it is the default upstream. An `ns`
//! or host prefix that is not configured is refused here: it is a key into the configured list,
//! never a host to dial.

use crate::core::config::{normalize_host, Settings, UpstreamSpec};
use crate::core::error::RegistryError;
use crate::core::http::strict_query_param;
use crate::core::registry::reference::{
    parse_digest, parse_name, parse_reference, Digest, Name, Reference,
};
use http::Method;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /v2/`.
    Base,
    /// `GET|HEAD /v2/<name>/manifests/<reference>`.
    Manifest(Reference),
    /// `GET|HEAD /v2/<name>/blobs/<digest>`.
    Blob(Digest),
    /// `GET /v2/<name>/tags/list` with pagination passed through.
    TagsList {
        /// `n`.
        n: Option<u32>,
        /// `last`.
        last: Option<String>,
    },
    /// `GET /livez` (and its alias `/healthz`): the process serves.
    Health,
    /// `GET /readyz`: the instance takes traffic (the host's [`Readiness`] on the request).
    ///
    /// [`Readiness`]: crate::core::ports::Readiness
    Ready,
    /// `GET /metrics`.
    Metrics,
}

impl Endpoint {
    /// Short kind for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Endpoint::Base => "base",
            Endpoint::Manifest(_) => "manifest",
            Endpoint::Blob(_) => "blob",
            Endpoint::TagsList { .. } => "tags",
            Endpoint::Health => "healthz",
            Endpoint::Ready => "readyz",
            Endpoint::Metrics => "metrics",
        }
    }
}

/// A routed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Index into `Settings::upstreams` (None for Base/Health/Metrics).
    pub upstream: Option<usize>,
    /// The repository name as the upstream knows it (after `library/` normalisation).
    pub name: Option<Name>,
    /// The repository path as the client wrote it (for rewriting `Link` headers).
    pub client_name: String,
    /// The client's `ns` value, if any (for rewriting `Link` headers).
    pub ns: Option<String>,
}

/// Finds the upstream whose host or alias equals `host` (already normalised).
pub fn find_upstream(settings: &Settings, host: &str) -> Option<usize> {
    settings
        .upstreams
        .iter()
        .position(|u| u.host == host || u.aliases.iter().any(|a| a == host))
}

/// Is the first path component a registry host (`ghcr.io`, `localhost:5000`, `localhost`)?
pub fn looks_like_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// A query value, strictly percent-decoded; a malformed one is NAME_INVALID.
fn query_value(query: Option<&str>, key: &str) -> Result<Option<String>, RegistryError> {
    strict_query_param(query, key)
        .map_err(|_| RegistryError::NameInvalid(format!("malformed query value for {key}")))
}

/// Resolves which upstream a repository path belongs to, and the name to ask it for.
pub fn resolve_upstream(
    settings: &Settings,
    raw_name: &str,
    ns: Option<&str>,
) -> Result<(usize, Name), RegistryError> {
    let (index, repo) = if let Some(ns) = ns {
        let host = normalize_host(ns);
        let i = find_upstream(settings, &host).ok_or_else(|| {
            RegistryError::NameUnknown(format!(
                "registry {host:?} (from ns=) is not a configured upstream"
            ))
        })?;
        (i, raw_name)
    } else {
        match raw_name.split_once('/') {
            Some((first, rest)) if looks_like_host(first) => {
                let host = normalize_host(first);
                let i = find_upstream(settings, &host).ok_or_else(|| {
                    RegistryError::NameUnknown(format!(
                        "registry {host:?} is not a configured upstream"
                    ))
                })?;
                (i, rest)
            }
            _ => {
                let i = settings
                    .upstreams
                    .iter()
                    .position(|u| u.default)
                    .ok_or_else(|| {
                        RegistryError::NameUnknown(
                        "no default upstream is configured; prefix the name with a registry host"
                            .into(),
                    )
                    })?;
                (i, raw_name)
            }
        }
    };
    let name = parse_name(repo)?;
    let up: &UpstreamSpec = &settings.upstreams[index];
    let name = if up.library_prefix && name.is_single_component() {
        name.with_prefix("library")?
    } else {
        name
    };
    Ok((index, name))
}

/// Routes a request. Errors are answered with the OCI envelope.
pub fn parse_route(
    settings: &Settings,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<Route, RegistryError> {
    let read = *method == Method::GET || *method == Method::HEAD;
    let plain = |endpoint| Route {
        endpoint,
        upstream: None,
        name: None,
        client_name: String::new(),
        ns: None,
    };
    match path {
        "/healthz" | "/livez" if read => return Ok(plain(Endpoint::Health)),
        "/readyz" if read => return Ok(plain(Endpoint::Ready)),
        "/metrics" if read => return Ok(plain(Endpoint::Metrics)),
        "/v2" | "/v2/" if read => return Ok(plain(Endpoint::Base)),
        "/v2" | "/v2/" | "/healthz" | "/livez" | "/readyz" | "/metrics" => {
            return Err(RegistryError::Unsupported(format!(
                "{method} is not allowed here"
            )))
        }
        _ => {}
    }
    let rest = path
        .strip_prefix("/v2/")
        .ok_or_else(|| RegistryError::NotFound(format!("no such endpoint: {path}")))?;
    if rest == "_catalog" {
        return Err(RegistryError::NotFound(
            "the catalog is not offered by a pull-through cache".into(),
        ));
    }
    let unsupported = || {
        RegistryError::Unsupported(format!(
            "{method} {path}: pullgate is a pull-through cache; push and delete are not supported"
        ))
    };
    // Uploads first: `/blobs/uploads/` also contains `/blobs/`.
    if let Some(i) = rest.rfind("/blobs/uploads") {
        let tail = &rest[i + "/blobs/uploads".len()..];
        if tail.is_empty() || tail.starts_with('/') {
            return Err(unsupported());
        }
    }
    let (raw_name, endpoint) = if let Some(i) = rest.rfind("/manifests/") {
        let reference = &rest[i + "/manifests/".len()..];
        (&rest[..i], Endpoint::Manifest(parse_reference(reference)?))
    } else if let Some(i) = rest.rfind("/blobs/") {
        let digest = &rest[i + "/blobs/".len()..];
        (&rest[..i], Endpoint::Blob(parse_digest(digest)?))
    } else if let Some(name) = rest.strip_suffix("/tags/list") {
        let n = match query_value(query, "n")? {
            Some(v) => Some(v.parse::<u32>().map_err(|_| {
                RegistryError::NameInvalid(format!("tags/list: n={v:?} is not a number"))
            })?),
            None => None,
        };
        let last = query_value(query, "last")?;
        (name, Endpoint::TagsList { n, last })
    } else {
        return Err(RegistryError::NotFound(format!("no such endpoint: {path}")));
    };
    if !read || (matches!(endpoint, Endpoint::TagsList { .. }) && *method != Method::GET) {
        return Err(unsupported());
    }
    let ns = query_value(query, "ns")?;
    let (upstream, name) = resolve_upstream(settings, raw_name, ns.as_deref())?;
    Ok(Route {
        endpoint,
        upstream: Some(upstream),
        name: Some(name),
        client_name: raw_name.to_string(),
        ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::{Config, ConfigError, Secret, SecretResolver};

    struct NoSecrets;
    impl SecretResolver for NoSecrets {
        fn resolve(&self, r: &str) -> Result<Secret, ConfigError> {
            Err(ConfigError(format!("{r} unset")))
        }
    }

    fn settings() -> Settings {
        let mut c = Config::default();
        c.apply_upstream_flag("reg.test=http://127.0.0.1:1")
            .unwrap();
        c.resolve(&NoSecrets).unwrap()
    }

    fn route(method: Method, pq: &str) -> Result<Route, RegistryError> {
        let (p, q) = match pq.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (pq, None),
        };
        parse_route(&settings(), &method, p, q)
    }

    fn host_of(r: &Route) -> String {
        settings().upstreams[r.upstream.unwrap()].host.clone()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn routes_table() {
        let cases: &[(&str, &str, &str, &str)] = &[
            // path, endpoint kind, upstream host, upstream name
            (
                "/v2/alpine/manifests/latest",
                "manifest",
                "docker.io",
                "library/alpine",
            ),
            (
                "/v2/library/alpine/manifests/3",
                "manifest",
                "docker.io",
                "library/alpine",
            ),
            (
                "/v2/team/sub/app/blobs/D",
                "blob",
                "docker.io",
                "team/sub/app",
            ),
            (
                "/v2/ghcr.io/owner/app/manifests/v1",
                "manifest",
                "ghcr.io",
                "owner/app",
            ),
            ("/v2/reg.test/x/tags/list", "tags", "reg.test", "x"),
            (
                "/v2/alpine/manifests/latest?ns=docker.io",
                "manifest",
                "docker.io",
                "library/alpine",
            ),
            (
                "/v2/owner/app/manifests/v1?ns=GHCR.IO:443",
                "manifest",
                "ghcr.io",
                "owner/app",
            ),
            (
                "/v2/alpine/manifests/latest?ns=index.docker.io",
                "manifest",
                "docker.io",
                "library/alpine",
            ),
            (
                "/v2/x/manifests/latest?ns=reg.test",
                "manifest",
                "reg.test",
                "x",
            ),
            // a repo whose own name contains "manifests" splits at the last marker
            (
                "/v2/a/manifests/b/manifests/t",
                "manifest",
                "docker.io",
                "a/manifests/b",
            ),
        ];
        for (pq, kind, host, name) in cases {
            let pq = pq.replace("/D", &format!("/{D}"));
            let r = route(Method::GET, &pq).unwrap_or_else(|e| panic!("{pq}: {e}"));
            assert_eq!(r.endpoint.kind(), *kind, "{pq}");
            assert_eq!(host_of(&r), *host, "{pq}");
            assert_eq!(r.name.as_ref().unwrap().as_str(), *name, "{pq}");
        }
    }

    #[test]
    fn base_health_metrics() {
        assert_eq!(route(Method::GET, "/v2/").unwrap().endpoint, Endpoint::Base);
        assert_eq!(route(Method::HEAD, "/v2").unwrap().endpoint, Endpoint::Base);
        assert_eq!(
            route(Method::GET, "/healthz").unwrap().endpoint,
            Endpoint::Health
        );
        assert_eq!(
            route(Method::GET, "/metrics").unwrap().endpoint,
            Endpoint::Metrics
        );
        assert_eq!(
            route(Method::GET, "/livez").unwrap().endpoint,
            Endpoint::Health
        );
        assert_eq!(
            route(Method::HEAD, "/readyz").unwrap().endpoint,
            Endpoint::Ready
        );
        for path in ["/livez", "/readyz", "/healthz"] {
            let e = route(Method::POST, path).unwrap_err();
            assert_eq!(e.code(), "UNSUPPORTED", "{path}");
        }
    }

    #[test]
    fn a_name_that_outgrows_the_length_limit_with_library_is_invalid() {
        // Found by fuzzing: 250 characters are a valid name, but not once Docker Hub's
        // `library/` is put in front.
        let long = "a".repeat(250);
        let e = route(Method::GET, &format!("/v2/{long}/manifests/latest")).unwrap_err();
        assert_eq!(e.code(), "NAME_INVALID");
        assert_eq!(e.status().as_u16(), 400);
        let fits = "a".repeat(255 - "library/".len());
        let r = route(Method::GET, &format!("/v2/{fits}/manifests/latest")).unwrap();
        assert_eq!(r.name.unwrap().as_str().len(), 255);
    }

    #[test]
    fn unconfigured_ns_or_prefix_is_refused_without_dialling() {
        for pq in [
            "/v2/x/manifests/latest?ns=evil.example",
            "/v2/x/manifests/latest?ns=169.254.169.254",
            "/v2/evil.example/x/manifests/latest",
            "/v2/localhost:8080/x/manifests/latest",
        ] {
            let e = route(Method::GET, pq).unwrap_err();
            assert_eq!(e.status().as_u16(), 404, "{pq}");
            assert_eq!(e.code(), "NAME_UNKNOWN", "{pq}");
        }
    }

    #[test]
    fn push_delete_and_uploads_are_unsupported() {
        for (m, pq) in [
            (Method::POST, "/v2/x/blobs/uploads/"),
            (Method::PATCH, "/v2/x/blobs/uploads/abc"),
            (Method::GET, "/v2/x/blobs/uploads/abc"),
            (Method::PUT, "/v2/x/manifests/latest"),
            (Method::DELETE, "/v2/x/manifests/latest"),
            (Method::DELETE, &format!("/v2/x/blobs/{D}")),
            (Method::POST, "/v2/"),
        ] {
            let e = route(m.clone(), pq).unwrap_err();
            assert_eq!(
                (e.code(), e.status().as_u16()),
                ("UNSUPPORTED", 405),
                "{m} {pq}"
            );
        }
    }

    #[test]
    fn invalid_names_tags_digests_are_400() {
        for (pq, code) in [
            ("/v2/Bad/manifests/latest", "NAME_INVALID"),
            ("/v2/a/../b/manifests/latest", "NAME_INVALID"),
            ("/v2/x/manifests/-bad", "MANIFEST_INVALID"),
            ("/v2/x/blobs/sha256:zz", "DIGEST_INVALID"),
            ("/v2/x/manifests/md5:abc", "DIGEST_INVALID"),
        ] {
            let e = route(Method::GET, pq).unwrap_err();
            assert_eq!(e.code(), code, "{pq}");
            assert_eq!(e.status().as_u16(), 400, "{pq}");
        }
        assert_eq!(
            route(Method::GET, "/nope").unwrap_err().status().as_u16(),
            404
        );
        assert_eq!(
            route(Method::GET, "/v2/x/other")
                .unwrap_err()
                .status()
                .as_u16(),
            404
        );
    }

    #[test]
    fn tags_list_pagination_passes_through() {
        let r = route(Method::GET, "/v2/x/tags/list?n=10&last=v1%2E2").unwrap();
        assert_eq!(
            r.endpoint,
            Endpoint::TagsList {
                n: Some(10),
                last: Some("v1.2".into())
            }
        );
        assert!(route(Method::GET, "/v2/x/tags/list?n=ten").is_err());
        assert!(route(Method::GET, "/v2/x/tags/list?last=%zz").is_err());
    }
}
