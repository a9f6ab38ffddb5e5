//! pullgate's own `distribute` stage: pulling a run's image through the cache (index, the
//! configured platforms' manifests, configs and layers) by calling the core's own dispatch as
//! an internal caller, so the first regional pull is warm. No upstream I/O of its own.
//!
//! The image reference is validated with [`crate::core::registry::reference`] before any path is built
//! from it. `[chain] platforms` entries are `os/arch` or `os/arch/variant`: an entry without a
//! variant takes every variant of its architecture; one with a variant takes that variant, and
//! also an index entry that names none when the variant is the architecture's default (`v8`
//! for `arm64`, `v7` for `arm`, as containerd's platform matcher normalises them).
//!
//! The one registry pull is [`pull_through`], the only place this module reaches back into the
//! dispatch.

use crate::core::body::Body;
use crate::core::context::Inner;
use crate::core::gateway::keys::image_key;
use crate::core::registry::media::DEFAULT_ACCEPT;
use crate::core::registry::reference::{parse_digest, parse_name, parse_tag, Reference};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Method, Request, StatusCode};
use serde_json::Value;
use std::rc::Rc;

/// GETs `path` from the core's own dispatch as an internal caller and drains the answer:
/// (bytes read, the body when the answer was one buffer). Non-200 is an error.
async fn pull_through(
    inner: &Rc<Inner>,
    path: &str,
    accept: Option<&str>,
) -> Result<(u64, Bytes), String> {
    let mut b = Request::builder().method(Method::GET).uri(path);
    if let Some(a) = accept {
        b = b.header(header::ACCEPT, a);
    }
    let mut req = b.body(()).map_err(|e| e.to_string())?;
    req.extensions_mut()
        .insert(crate::core::access::caller::InternalCall);
    // Boxed by the dispatch: pre-warming goes back through the whole core, which can reach
    // the pump again.
    let resp = (inner.dispatch)(inner.clone(), req).await;
    let status = resp.status();
    if status != StatusCode::OK {
        return Err(format!("GET {path}: {status}"));
    }
    match resp.into_body() {
        Body::Bytes(b) => Ok((b.len() as u64, b)),
        Body::Empty => Ok((0, Bytes::new())),
        Body::Host(_) => Ok((0, Bytes::new())),
        Body::Stream(mut s) => {
            let mut n = 0u64;
            while let Some(c) = s.next().await {
                n += c.map_err(|e| format!("GET {path}: {e}"))?.len() as u64;
            }
            Ok((n, Bytes::new()))
        }
    }
}

/// A run's image, split into what the cache's `/v2/` paths take.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ImageRef {
    /// The name as the cache routes it: registry host (if any) and repository.
    path_name: String,
    /// Tag or digest (`latest` when the image names neither).
    reference: Reference,
}

/// Parses `[host/]repository[:tag][@digest]`; a digest wins over a tag.
fn parse_image(image: &str) -> Result<ImageRef, String> {
    let bad = |e: crate::core::registry::reference::ReferenceError| format!("image {image:?}: {e}");
    let (rest, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(parse_digest(d).map_err(bad)?)),
        None => (image, None),
    };
    let (path_name, tag) = match rest.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
        Some((n, t)) => (n, Some(t)),
        None => (rest, None),
    };
    parse_name(&image_key(path_name)).map_err(bad)?;
    let reference = match (digest, tag) {
        (Some(d), _) => Reference::Digest(d),
        (None, Some(t)) => Reference::Tag(parse_tag(t).map_err(bad)?),
        (None, None) => Reference::Tag(parse_tag("latest").map_err(bad)?),
    };
    Ok(ImageRef {
        path_name: path_name.to_string(),
        reference,
    })
}

/// The variant an architecture means when an index entry names none.
fn default_variant(arch: &str) -> Option<&'static str> {
    match arch {
        "arm64" => Some("v8"),
        "arm" => Some("v7"),
        _ => None,
    }
}

/// True when an index entry's `platform` object is one of `wanted` (`os/arch[/variant]`;
/// empty: every platform).
fn platform_wanted(wanted: &[String], platform: Option<&Value>) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let field = |k: &str| {
        platform
            .and_then(|p| p.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    let (os, arch, variant) = (field("os"), field("architecture"), field("variant"));
    wanted.iter().any(|w| {
        let mut parts = w.splitn(3, '/');
        let (w_os, w_arch, w_variant) = (parts.next(), parts.next(), parts.next());
        if w_os != Some(os) || w_arch != Some(arch) {
            return false;
        }
        match w_variant {
            None => true,
            Some(v) => v == variant || (variant.is_empty() && default_variant(arch) == Some(v)),
        }
    })
}

/// Pulls `image` through the cache: the index, the configured platforms' manifests, their
/// configs and layers; so the first regional pull is warm.
/// One step of a warm, reported as it completes (the `warm` command prints them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmStep {
    /// A manifest or index was pulled.
    Manifest {
        /// Its `/v2/` path.
        path: String,
        /// Its size.
        bytes: u64,
    },
    /// A blob (config or layer) was pulled: the `done`th of the `total` the manifests list.
    Blob {
        /// Its digest.
        digest: String,
        /// Its size.
        bytes: u64,
        /// How many blobs are done, this one included.
        done: u32,
        /// How many blobs the chosen manifests list.
        total: u32,
    },
}

/// What a warm pulled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmReport {
    /// Manifests pulled (an index counts apart from its children: not included).
    pub manifests: usize,
    /// Blobs pulled.
    pub blobs: u32,
    /// Blob bytes pulled.
    pub bytes: u64,
}

impl std::fmt::Display for WarmReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pre-warmed {} manifest(s) and {} blob(s), {} bytes",
            self.manifests, self.blobs, self.bytes
        )
    }
}

/// Pulls `image` (index, the `platforms`' manifests — all when empty —, configs and layers)
/// through `get`, which GETs a `/v2/` path with an optional `Accept` and returns (bytes read,
/// the body when it is a manifest). The `distribute` stage passes the core's own dispatch;
/// the `warm` command passes the core's dispatch over a local cache, or HTTP to a running
/// pullgate.
pub async fn warm<G, F>(
    get: G,
    image: &str,
    platforms: &[String],
    progress: &mut dyn FnMut(WarmStep),
) -> Result<WarmReport, String>
where
    G: Fn(String, Option<&'static str>) -> F,
    F: std::future::Future<Output = Result<(u64, Bytes), String>>,
{
    let image = parse_image(image)?;
    let base = format!("/v2/{}", image.path_name);
    let top_path = format!("{base}/manifests/{}", image.reference);
    let (n, top) = get(top_path.clone(), Some(DEFAULT_ACCEPT)).await?;
    progress(WarmStep::Manifest {
        path: top_path,
        bytes: n,
    });
    let top: Value =
        serde_json::from_slice(&top).map_err(|e| format!("manifest is not JSON: {e}"))?;
    let mut manifests = Vec::new();
    if let Some(children) = top.get("manifests").and_then(|m| m.as_array()) {
        for c in children {
            if !platform_wanted(platforms, c.get("platform")) {
                continue;
            }
            let d = c
                .get("digest")
                .and_then(|d| d.as_str())
                .ok_or("index entry without a digest")?;
            let d = parse_digest(d).map_err(|e| e.to_string())?;
            let path = format!("{base}/manifests/{d}");
            let (n, m) = get(path.clone(), Some(DEFAULT_ACCEPT)).await?;
            progress(WarmStep::Manifest { path, bytes: n });
            manifests.push(serde_json::from_slice::<Value>(&m).map_err(|e| e.to_string())?);
        }
        if manifests.is_empty() {
            return Err(format!(
                "no manifest in the index matches the platforms {platforms:?}"
            ));
        }
    } else {
        manifests.push(top);
    }
    let digests = blob_digests(&manifests)?;
    let total = u32::try_from(digests.len()).unwrap_or(u32::MAX);
    let mut report = WarmReport {
        manifests: manifests.len(),
        ..WarmReport::default()
    };
    for d in digests {
        let (n, _) = get(format!("{base}/blobs/{d}"), None).await?;
        report.blobs += 1;
        report.bytes += n;
        progress(WarmStep::Blob {
            digest: d,
            bytes: n,
            done: report.blobs,
            total,
        });
    }
    Ok(report)
}

/// The `distribute` stage: [`warm`] through the core's own dispatch with `[chain] platforms`.
pub(super) async fn prewarm(inner: &Rc<Inner>, image: &str) -> Result<String, String> {
    let get = |path: String, accept: Option<&'static str>| {
        let inner = inner.clone();
        async move { pull_through(&inner, &path, accept).await }
    };
    let platforms = &inner.settings.gateway.chain.platforms;
    let report = warm(get, image, platforms, &mut |_| {}).await?;
    Ok(report.to_string())
}

/// [`warm`] through the core's own dispatch, as an internal caller (the `warm` command's
/// local mode).
pub(crate) async fn warm_local(
    inner: &Rc<Inner>,
    image: &str,
    platforms: &[String],
    progress: &mut dyn FnMut(WarmStep),
) -> Result<WarmReport, String> {
    let get = |path: String, accept: Option<&'static str>| {
        let inner = inner.clone();
        async move { pull_through(&inner, &path, accept).await }
    };
    warm(get, image, platforms, progress).await
}

/// The config and layer digests of `manifests`, each once, in order.
fn blob_digests(manifests: &[Value]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for m in manifests {
        let config = m.pointer("/config/digest").and_then(|d| d.as_str());
        let layers = m
            .get("layers")
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .filter_map(|l| l.get("digest").and_then(|d| d.as_str()));
        for d in config.into_iter().chain(layers) {
            let d = parse_digest(d).map_err(|e| e.to_string())?.to_string();
            if !out.contains(&d) {
                out.push(d);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wanted(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn image_references_split_with_the_reference_grammar() {
        let d = format!("sha256:{}", "a".repeat(64));
        let cases = [
            ("reg.test/acme/app:main-1", "reg.test/acme/app", "main-1"),
            (
                "127.0.0.1:5000/acme/app:v1",
                "127.0.0.1:5000/acme/app",
                "v1",
            ),
            (
                "127.0.0.1:5000/acme/app",
                "127.0.0.1:5000/acme/app",
                "latest",
            ),
            ("acme/app", "acme/app", "latest"),
        ];
        for (image, name, reference) in cases {
            let r = parse_image(image).unwrap();
            assert_eq!(
                (r.path_name.as_str(), r.reference.to_string().as_str()),
                (name, reference),
                "{image}"
            );
        }
        let r = parse_image(&format!("reg.test/acme/app:v1@{d}")).unwrap();
        assert_eq!(r.path_name, "reg.test/acme/app");
        assert_eq!(r.reference.to_string(), d, "a digest wins over a tag");
        for bad in [
            "reg.test/Acme/app:v1",
            "reg.test/acme/app:-v1",
            "reg.test/acme/app@sha256:00",
            "",
            "reg.test/acme/../app",
        ] {
            assert!(parse_image(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn platforms_with_a_variant_match_that_variant() {
        let p = |os: &str, arch: &str, variant: Option<&str>| {
            let mut v = json!({ "os": os, "architecture": arch });
            if let Some(x) = variant {
                v["variant"] = json!(x);
            }
            v
        };
        let arm7 = p("linux", "arm", Some("v7"));
        let arm6 = p("linux", "arm", Some("v6"));
        let arm64 = p("linux", "arm64", Some("v8"));
        let arm64_bare = p("linux", "arm64", None);
        let amd64 = p("linux", "amd64", None);
        let w = wanted(&["linux/arm/v7", "linux/arm64/v8"]);
        assert!(platform_wanted(&w, Some(&arm7)));
        assert!(!platform_wanted(&w, Some(&arm6)));
        assert!(platform_wanted(&w, Some(&arm64)));
        assert!(
            platform_wanted(&w, Some(&arm64_bare)),
            "v8 is arm64's default"
        );
        assert!(!platform_wanted(&w, Some(&amd64)));
        // Without a variant, every variant of the architecture.
        let w = wanted(&["linux/arm", "linux/amd64"]);
        assert!(platform_wanted(&w, Some(&arm7)) && platform_wanted(&w, Some(&arm6)));
        assert!(platform_wanted(&w, Some(&amd64)));
        assert!(!platform_wanted(&w, Some(&arm64)));
        assert!(!platform_wanted(&w, None));
        // No list: everything.
        assert!(platform_wanted(&[], None));
    }
}
