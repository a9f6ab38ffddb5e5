//! Webhook replay protection: what makes a delivery a duplicate, and how long that is
//! remembered.
//!
//! Most senders sign the body only; the delivery id header is not covered, so a captured
//! delivery can be replayed with a fresh id for as long as the secret is valid. Three layers:
//!
//! 1. Senders that sign a timestamp (GitLab's Standard Webhooks `webhook-timestamp`): the
//!    signature check refuses anything outside `timestamp_tolerance`, and inside it a record
//!    of (webhook, delivery id, sha256 of the body) marks the duplicate. The record is kept
//!    for `dedup_window`, and never less than twice the tolerance, so it cannot expire while
//!    the delivery would still be accepted.
//! 2. Every other sender: a record of (webhook, sha256 of the body) alone, kept for
//!    `replay_window` (default 30 days), so a fresh delivery id changes nothing.
//! 3. Independent of any window: a push or tag for a (webhook, repository, ref kind, commit)
//!    that already started runs starts none again ([`source_key`]); the guard lives as long
//!    as the runs. Only an admin re-drives a run (dead-letter replay).
//!
//! Records are swept oldest first through a time-ordered index
//! (`dedup-seen/<class>/<seen ms, 16 digits>/<record key>`), bounded per pass, with the
//! window in force at sweep time; a pass stops at the first record still inside its window.

use crate::core::context::Inner;
use crate::core::gateway::config::{GatewaySettings, Provider};
use crate::core::gateway::event::{delivery_id, SourceEvent};
use crate::core::gateway::keys::hash_hex;
use crate::core::gateway::runstore::runs;
use crate::core::gateway::verify::signs_timestamp;
use crate::core::ports::StoreError;
use http::HeaderMap;

/// Key prefix of (webhook, delivery id, body) records.
pub const DELIVERY_RECORDS: &str = "dedup/";
/// Key prefix of (webhook, body) records.
pub const BODY_RECORDS: &str = "replay/";
/// Key prefix of the time-ordered index of both.
pub const SEEN: &str = "dedup-seen/";
/// Key prefix of the source guards.
pub const SOURCE_GUARDS: &str = "run-by-source/";
/// Index entries examined per sweep and class.
const SWEEP: usize = 500;

/// Which window a record lives for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// (webhook, delivery id, body): senders that sign a timestamp.
    Delivery,
    /// (webhook, body): every other sender.
    Body,
}

impl Class {
    fn index_prefix(self) -> &'static str {
        match self {
            Class::Delivery => "dedup-seen/delivery/",
            Class::Body => "dedup-seen/body/",
        }
    }

    /// How long a record of this class is kept under `gw`.
    pub fn window_ms(self, gw: &GatewaySettings) -> u64 {
        match self {
            Class::Delivery => gw
                .dedup_window_ms
                .max(gw.timestamp_tolerance_ms.saturating_mul(2)),
            Class::Body => gw.replay_window_ms.max(gw.dedup_window_ms),
        }
    }
}

/// The dedup record a delivery is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its key.
    pub key: String,
    /// Its class.
    pub class: Class,
}

/// The record for a verified delivery to `webhook` whose body hashes to `body_hash`.
pub fn record_for(
    webhook: &str,
    provider: Provider,
    headers: &HeaderMap,
    body_hash: &str,
) -> Record {
    if signs_timestamp(provider, headers) {
        let delivery = delivery_id(provider, headers).unwrap_or_default();
        Record {
            key: format!(
                "{DELIVERY_RECORDS}{webhook}/{}",
                hash_hex(&[delivery.as_bytes(), body_hash.as_bytes()])
            ),
            class: Class::Delivery,
        }
    } else {
        Record {
            key: format!("{BODY_RECORDS}{webhook}/{body_hash}"),
            class: Class::Body,
        }
    }
}

/// The guard that marks a source event as having started runs from `webhook`; None for
/// registry notifications (they advance runs, and only a running `build` once).
pub fn source_key(webhook: &str, ev: &SourceEvent) -> Option<String> {
    let h = match ev {
        SourceEvent::Push {
            repository, commit, ..
        } => hash_hex(&[
            webhook.as_bytes(),
            repository.as_bytes(),
            b"push",
            commit.as_bytes(),
        ]),
        SourceEvent::Tag {
            repository,
            tag,
            commit,
            ..
        } => hash_hex(&[
            webhook.as_bytes(),
            repository.as_bytes(),
            b"tag",
            tag.as_bytes(),
            commit.as_bytes(),
        ]),
        SourceEvent::Artifact { .. } => return None,
    };
    Some(format!("{SOURCE_GUARDS}{}", &h[..32]))
}

fn seen_key(class: Class, seen_ms: u64, record: &str) -> String {
    format!("{}{seen_ms:016}/{record}", class.index_prefix())
}

fn parse_ms(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// True when `r` was recorded within its window before `now`.
pub(crate) async fn is_duplicate(inner: &Inner, r: &Record, now: u64) -> Result<bool, StoreError> {
    let window = r.class.window_ms(&inner.settings.gateway);
    Ok(runs(inner)
        .get(&r.key)
        .await?
        .and_then(|raw| parse_ms(&raw))
        .is_some_and(|seen| now.saturating_sub(seen) < window))
}

/// Records `r` as seen at `now`: the index entry first, so no record is ever unswept.
pub(crate) async fn remember(inner: &Inner, r: &Record, now: u64) -> Result<(), StoreError> {
    let kv = runs(inner);
    kv.put(&seen_key(r.class, now, &r.key), b"").await?;
    kv.put(&r.key, now.to_string().as_bytes()).await
}

/// Deletes records older than their window, oldest first, bounded per pass.
pub(crate) async fn sweep(inner: &Inner) {
    let now = inner.ports.clock.now_ms();
    let kv = runs(inner);
    for class in [Class::Delivery, Class::Body] {
        let window = class.window_ms(&inner.settings.gateway);
        let prefix = class.index_prefix();
        for entry in kv.list(prefix, SWEEP).await.unwrap_or_default() {
            let Some((ms, record)) = entry[prefix.len()..].split_once('/') else {
                let _ = kv.delete(&entry).await;
                continue;
            };
            let Ok(seen) = ms.parse::<u64>() else {
                let _ = kv.delete(&entry).await;
                continue;
            };
            if now.saturating_sub(seen) < window {
                break; // the rest are younger
            }
            // The record may have been written again since (after it expired): then a newer
            // entry covers it and only this entry goes.
            match kv.get(record).await {
                Ok(Some(raw)) if parse_ms(&raw).is_some_and(|s| s != seen) => {}
                Ok(_) => {
                    let _ = kv.delete(record).await;
                }
                Err(_) => continue,
            }
            let _ = kv.delete(&entry).await;
        }
    }
}

/// Indexes records written before the index existed (one pass over an older store).
pub(crate) async fn index_legacy(inner: &Inner, limit: usize) -> Result<(), StoreError> {
    let kv = runs(inner);
    for key in kv.list(DELIVERY_RECORDS, limit).await? {
        let seen = kv
            .get(&key)
            .await?
            .and_then(|raw| parse_ms(&raw))
            .unwrap_or(0);
        kv.put(&seen_key(Class::Delivery, seen, &key), b"").await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn unsigned_timestamps_dedup_on_the_body_alone() {
        for (p, id_header) in [
            (Provider::GitHub, "x-github-delivery"),
            (Provider::Gitea, "x-gitea-delivery"),
            (Provider::Forgejo, "x-forgejo-delivery"),
            (Provider::Bitbucket, "x-request-uuid"),
            (Provider::GenericHmac, "x-delivery"),
            (Provider::GitLab, "x-gitlab-event-uuid"),
        ] {
            let a = record_for("app", p, &headers(&[(id_header, "one")]), "h1");
            let b = record_for("app", p, &headers(&[(id_header, "two")]), "h1");
            assert_eq!(a, b, "{p:?}: a fresh delivery id is the same record");
            assert_eq!(a.class, Class::Body);
            assert_ne!(a, record_for("app", p, &headers(&[]), "h2"));
            assert_ne!(a, record_for("other", p, &headers(&[]), "h1"));
        }
    }

    #[test]
    fn signed_timestamps_dedup_on_the_delivery_id_and_body() {
        let h = |id: &str| {
            headers(&[
                ("webhook-id", id),
                ("webhook-timestamp", "1"),
                ("webhook-signature", "v1,x"),
            ])
        };
        let a = record_for("app", Provider::GitLab, &h("one"), "h1");
        assert_eq!(a.class, Class::Delivery);
        assert_ne!(a, record_for("app", Provider::GitLab, &h("two"), "h1"));
        assert_eq!(a, record_for("app", Provider::GitLab, &h("one"), "h1"));
    }

    #[test]
    fn windows_never_open_a_hole() {
        let gw = GatewaySettings {
            dedup_window_ms: 1_000,
            timestamp_tolerance_ms: 300_000,
            replay_window_ms: 10,
            ..Default::default()
        };
        assert_eq!(Class::Delivery.window_ms(&gw), 600_000);
        assert_eq!(Class::Body.window_ms(&gw), 1_000);
    }

    #[test]
    fn source_guards_tell_push_from_tag_and_webhook_from_webhook() {
        let push = SourceEvent::Push {
            repository: "r".into(),
            git_ref: "refs/heads/main".into(),
            branch: "main".into(),
            commit: "c".into(),
            author: "a".into(),
        };
        let other_branch = SourceEvent::Push {
            repository: "r".into(),
            git_ref: "refs/heads/dev".into(),
            branch: "dev".into(),
            commit: "c".into(),
            author: "b".into(),
        };
        let tag = SourceEvent::Tag {
            repository: "r".into(),
            git_ref: "refs/tags/v1".into(),
            tag: "v1".into(),
            commit: "c".into(),
            author: "a".into(),
        };
        let k = source_key("app", &push).unwrap();
        assert_eq!(
            Some(k.clone()),
            source_key("app", &other_branch),
            "same commit"
        );
        assert_ne!(Some(k.clone()), source_key("app", &tag));
        assert_ne!(Some(k), source_key("other", &push));
    }
}
