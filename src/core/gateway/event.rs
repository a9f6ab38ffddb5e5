//! One event model for every sender: a source push, a tag created, an artifact published.
//! Parsing happens only after the signature over the raw body was verified. Pure.

use crate::core::gateway::config::Provider;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A normalised event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceEvent {
    /// Commits pushed to a branch.
    Push {
        /// Repository URL (clone or web).
        repository: String,
        /// Full ref, `refs/heads/<branch>`.
        git_ref: String,
        /// Branch name.
        branch: String,
        /// Head commit.
        commit: String,
        /// Who pushed.
        author: String,
    },
    /// A tag was created (or pushed).
    Tag {
        /// Repository URL.
        repository: String,
        /// Full ref, `refs/tags/<tag>`.
        git_ref: String,
        /// Tag name.
        tag: String,
        /// Commit the tag points at.
        commit: String,
        /// Who pushed.
        author: String,
    },
    /// An image was pushed to a registry.
    Artifact {
        /// Registry host (may be empty when the sender does not say).
        registry: String,
        /// Repository within the registry.
        repository: String,
        /// Tag, if any.
        tag: Option<String>,
        /// Manifest digest.
        digest: String,
        /// Manifest media type.
        media_type: String,
    },
}

impl SourceEvent {
    /// `push`, `tag` or `artifact`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceEvent::Push { .. } => "push",
            SourceEvent::Tag { .. } => "tag",
            SourceEvent::Artifact { .. } => "artifact",
        }
    }
}

/// What a delivery turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Events to act on.
    Events(Vec<SourceEvent>),
    /// A valid delivery with nothing to do (e.g. `ping`); the reason is returned to the sender.
    Ignored(String),
}

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed payload: {0}")]
pub struct ParseError(pub String);

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn need(v: &Value, path: &[&str]) -> Result<String, ParseError> {
    s(v, path)
        .map(str::to_string)
        .ok_or_else(|| ParseError(format!("missing {}", path.join("."))))
}

fn hdr<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// Builds the event for a ref update (GitHub/Gitea/GitLab shapes share `ref` + a commit).
fn ref_event(
    repository: String,
    git_ref: &str,
    commit: String,
    author: String,
) -> Option<SourceEvent> {
    if commit.is_empty() || commit == ZERO_SHA {
        return None; // a deletion
    }
    if let Some(branch) = git_ref.strip_prefix("refs/heads/") {
        Some(SourceEvent::Push {
            repository,
            git_ref: git_ref.to_string(),
            branch: branch.to_string(),
            commit,
            author,
        })
    } else {
        git_ref
            .strip_prefix("refs/tags/")
            .map(|tag| SourceEvent::Tag {
                repository,
                git_ref: git_ref.to_string(),
                tag: tag.to_string(),
                commit,
                author,
            })
    }
}

fn one(e: Option<SourceEvent>, why: &str) -> Parsed {
    match e {
        Some(e) => Parsed::Events(vec![e]),
        None => Parsed::Ignored(why.to_string()),
    }
}

/// The delivery id a provider sends (not covered by its signature; dedup also hashes the body).
pub fn delivery_id(provider: Provider, h: &HeaderMap) -> Option<String> {
    let name = match provider {
        Provider::GitHub => "x-github-delivery",
        Provider::Gitea => "x-gitea-delivery",
        Provider::Forgejo => "x-forgejo-delivery",
        Provider::GitLab => {
            return hdr(h, "webhook-id")
                .or_else(|| hdr(h, "x-gitlab-event-uuid"))
                .map(str::to_string)
        }
        Provider::Bitbucket => "x-request-uuid",
        Provider::GenericHmac => "x-delivery",
        Provider::Distribution | Provider::Harbor => return None,
    };
    hdr(h, name).map(str::to_string)
}

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Parses a verified delivery.
pub fn parse_delivery(
    provider: Provider,
    h: &HeaderMap,
    body: &[u8],
) -> Result<Parsed, ParseError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ParseError(format!("not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ParseError("not a JSON object".into()));
    }
    match provider {
        Provider::GitHub | Provider::Gitea | Provider::Forgejo => parse_github(provider, h, &v),
        Provider::GitLab => parse_gitlab(h, &v),
        Provider::Bitbucket => parse_bitbucket(h, &v),
        Provider::GenericHmac => {
            let e: SourceEvent =
                serde_json::from_value(v).map_err(|e| ParseError(e.to_string()))?;
            Ok(Parsed::Events(vec![e]))
        }
        Provider::Distribution => parse_distribution(&v),
        Provider::Harbor => parse_harbor(&v),
    }
}

/// GitHub, Gitea and Forgejo (one payload shape): `push`; a tag's `create` is ignored.
fn parse_github(provider: Provider, h: &HeaderMap, v: &Value) -> Result<Parsed, ParseError> {
    let event = match provider {
        Provider::GitHub => hdr(h, "x-github-event"),
        Provider::Forgejo => hdr(h, "x-forgejo-event").or_else(|| hdr(h, "x-gitea-event")),
        _ => hdr(h, "x-gitea-event"),
    }
    .unwrap_or("");
    let repo = s(v, &["repository", "clone_url"])
        .or_else(|| s(v, &["repository", "html_url"]))
        .unwrap_or("")
        .to_string();
    let author = s(v, &["pusher", "name"])
        .or_else(|| s(v, &["pusher", "login"]))
        .or_else(|| s(v, &["sender", "login"]))
        .unwrap_or("")
        .to_string();
    match event {
        "push" => {
            let r = need(v, &["ref"])?;
            let commit = need(v, &["after"])?;
            Ok(one(
                ref_event(repo, &r, commit, author),
                "push deleted a ref",
            ))
        }
        "create" if s(v, &["ref_type"]) == Some("tag") => {
            // `create` has no commit; the tag's push event carries it. Ignore to avoid
            // starting twice.
            Ok(Parsed::Ignored(
                "create (the tag's push event starts runs)".into(),
            ))
        }
        other => Ok(Parsed::Ignored(format!("event {other:?} is not handled"))),
    }
}

/// GitLab: `Push Hook` and `Tag Push Hook` (or the payload's `object_kind`).
fn parse_gitlab(h: &HeaderMap, v: &Value) -> Result<Parsed, ParseError> {
    let event = hdr(h, "x-gitlab-event")
        .or_else(|| s(v, &["object_kind"]))
        .unwrap_or("");
    if !matches!(event, "Push Hook" | "Tag Push Hook" | "push" | "tag_push") {
        return Ok(Parsed::Ignored(format!("event {event:?} is not handled")));
    }
    let r = need(v, &["ref"])?;
    let commit = s(v, &["checkout_sha"])
        .or_else(|| s(v, &["after"]))
        .unwrap_or("")
        .to_string();
    let repo = s(v, &["project", "git_http_url"])
        .or_else(|| s(v, &["project", "web_url"]))
        .or_else(|| s(v, &["repository", "git_http_url"]))
        .unwrap_or("")
        .to_string();
    let author = s(v, &["user_username"])
        .or_else(|| s(v, &["user_name"]))
        .unwrap_or("")
        .to_string();
    Ok(one(
        ref_event(repo, &r, commit, author),
        "push deleted a ref",
    ))
}

/// Bitbucket Cloud `repo:push`: one event per branch or tag update in `push.changes`.
fn parse_bitbucket(h: &HeaderMap, v: &Value) -> Result<Parsed, ParseError> {
    let key = hdr(h, "x-event-key").unwrap_or("");
    if key != "repo:push" {
        return Ok(Parsed::Ignored(format!("event {key:?} is not handled")));
    }
    let repo = s(v, &["repository", "links", "html", "href"])
        .or_else(|| s(v, &["repository", "full_name"]))
        .unwrap_or("")
        .to_string();
    let author = s(v, &["actor", "display_name"]).unwrap_or("").to_string();
    let changes = v
        .get("push")
        .and_then(|p| p.get("changes"))
        .and_then(|c| c.as_array())
        .ok_or_else(|| ParseError("missing push.changes".into()))?;
    let mut out = Vec::new();
    for c in changes {
        let Some(new) = c.get("new").filter(|n| !n.is_null()) else {
            continue;
        };
        let name = s(new, &["name"]).unwrap_or("");
        let commit = s(new, &["target", "hash"]).unwrap_or("").to_string();
        let r = match s(new, &["type"]) {
            Some("branch") => format!("refs/heads/{name}"),
            Some("tag") => format!("refs/tags/{name}"),
            _ => continue,
        };
        out.extend(ref_event(repo.clone(), &r, commit, author.clone()));
    }
    Ok(if out.is_empty() {
        Parsed::Ignored("no branch or tag updates".into())
    } else {
        Parsed::Events(out)
    })
}

/// distribution's notification envelope: one artifact per manifest push (blob pushes and
/// pulls are skipped).
fn parse_distribution(v: &Value) -> Result<Parsed, ParseError> {
    let events = v
        .get("events")
        .and_then(|e| e.as_array())
        .ok_or_else(|| ParseError("missing events".into()))?;
    let mut out = Vec::new();
    for e in events {
        if s(e, &["action"]) != Some("push") {
            continue;
        }
        let media_type = s(e, &["target", "mediaType"]).unwrap_or("");
        if !MANIFEST_TYPES.contains(&media_type) {
            continue; // blob pushes
        }
        out.push(SourceEvent::Artifact {
            registry: s(e, &["request", "host"]).unwrap_or("").to_string(),
            repository: need(e, &["target", "repository"])?,
            tag: s(e, &["target", "tag"]).map(str::to_string),
            digest: need(e, &["target", "digest"])?,
            media_type: media_type.to_string(),
        });
    }
    Ok(if out.is_empty() {
        Parsed::Ignored("no manifest pushes".into())
    } else {
        Parsed::Events(out)
    })
}

/// Harbor's `PUSH_ARTIFACT`: one artifact per pushed resource.
fn parse_harbor(v: &Value) -> Result<Parsed, ParseError> {
    if s(v, &["type"]) != Some("PUSH_ARTIFACT") {
        return Ok(Parsed::Ignored(format!(
            "event {:?} is not handled",
            s(v, &["type"]).unwrap_or("")
        )));
    }
    let repo = need(v, &["event_data", "repository", "repo_full_name"])?;
    let resources = v
        .pointer("/event_data/resources")
        .and_then(|r| r.as_array())
        .ok_or_else(|| ParseError("missing event_data.resources".into()))?;
    let mut out = Vec::new();
    for r in resources {
        let url = s(r, &["resource_url"]).unwrap_or("");
        out.push(SourceEvent::Artifact {
            registry: url.split('/').next().unwrap_or("").to_string(),
            repository: repo.clone(),
            tag: s(r, &["tag"]).map(str::to_string),
            digest: need(r, &["digest"])?,
            media_type: String::new(),
        });
    }
    Ok(Parsed::Events(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn github_push_and_ping() {
        let body = br#"{"ref":"refs/heads/main","after":"abc123","repository":{"clone_url":"https://github.com/acme/app.git"},"pusher":{"name":"ana"}}"#;
        let p = parse_delivery(Provider::GitHub, &h(&[("x-github-event", "push")]), body).unwrap();
        assert_eq!(
            p,
            Parsed::Events(vec![SourceEvent::Push {
                repository: "https://github.com/acme/app.git".into(),
                git_ref: "refs/heads/main".into(),
                branch: "main".into(),
                commit: "abc123".into(),
                author: "ana".into()
            }])
        );
        let ping = parse_delivery(
            Provider::GitHub,
            &h(&[("x-github-event", "ping")]),
            b"{\"zen\":\"x\"}",
        )
        .unwrap();
        assert!(matches!(ping, Parsed::Ignored(_)));
        let tag = br#"{"ref":"refs/tags/v1.0","after":"abc","repository":{"clone_url":"u"},"pusher":{"name":"a"}}"#;
        let t = parse_delivery(Provider::GitHub, &h(&[("x-github-event", "push")]), tag).unwrap();
        assert!(matches!(t, Parsed::Events(ref e) if e[0].kind() == "tag"));
        let deleted = format!(r#"{{"ref":"refs/heads/x","after":"{ZERO_SHA}","repository":{{}}}}"#);
        assert!(matches!(
            parse_delivery(
                Provider::GitHub,
                &h(&[("x-github-event", "push")]),
                deleted.as_bytes()
            )
            .unwrap(),
            Parsed::Ignored(_)
        ));
        assert!(
            parse_delivery(Provider::GitHub, &h(&[("x-github-event", "push")]), b"{}").is_err()
        );
        assert!(parse_delivery(Provider::GitHub, &h(&[]), b"not json").is_err());
    }

    #[test]
    fn gitlab_bitbucket_distribution_harbor_shapes() {
        let gl = br#"{"object_kind":"push","ref":"refs/heads/dev","checkout_sha":"c1","user_username":"bo","project":{"git_http_url":"https://gitlab.com/a/b.git"}}"#;
        let p =
            parse_delivery(Provider::GitLab, &h(&[("x-gitlab-event", "Push Hook")]), gl).unwrap();
        assert!(
            matches!(p, Parsed::Events(ref e) if matches!(&e[0], SourceEvent::Push{branch,..} if branch == "dev"))
        );

        let bb = br#"{"actor":{"display_name":"Cy"},"repository":{"links":{"html":{"href":"https://bitbucket.org/a/b"}}},"push":{"changes":[{"new":{"type":"tag","name":"v2","target":{"hash":"h1"}}},{"new":null}]}}"#;
        let p =
            parse_delivery(Provider::Bitbucket, &h(&[("x-event-key", "repo:push")]), bb).unwrap();
        assert!(matches!(p, Parsed::Events(ref e) if e.len() == 1 && e[0].kind() == "tag"));

        let dist = br#"{"events":[{"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","repository":"acme/app","tag":"main-abc"},"request":{"host":"reg:5000"}},{"action":"push","target":{"mediaType":"application/octet-stream","digest":"sha256:bb","repository":"acme/app"}},{"action":"pull","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:cc","repository":"x"}}]}"#;
        let p = parse_delivery(Provider::Distribution, &HeaderMap::new(), dist).unwrap();
        match p {
            Parsed::Events(e) => {
                assert_eq!(e.len(), 1);
                assert!(
                    matches!(&e[0], SourceEvent::Artifact{tag: Some(t), registry, ..} if t == "main-abc" && registry == "reg:5000")
                );
            }
            other => panic!("{other:?}"),
        }
        let harbor = br#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"digest":"sha256:dd","tag":"v1","resource_url":"harbor.example/lib/app:v1"}],"repository":{"repo_full_name":"lib/app"}}}"#;
        let p = parse_delivery(Provider::Harbor, &HeaderMap::new(), harbor).unwrap();
        assert!(
            matches!(p, Parsed::Events(ref e) if matches!(&e[0], SourceEvent::Artifact{registry,..} if registry == "harbor.example"))
        );
    }

    #[test]
    fn delivery_ids_per_provider() {
        assert_eq!(
            delivery_id(Provider::GitHub, &h(&[("x-github-delivery", "d1")])).as_deref(),
            Some("d1")
        );
        assert_eq!(
            delivery_id(Provider::Bitbucket, &h(&[("x-request-uuid", "u")])).as_deref(),
            Some("u")
        );
        assert_eq!(delivery_id(Provider::Distribution, &HeaderMap::new()), None);
    }
}
