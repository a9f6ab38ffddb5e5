//! Webhook intake, `POST /hooks/<name>`: the order of work in the [module doc](super) — a
//! body slot, the size cap, the signature over the raw bytes, dedup, parsing, then runs
//! started (or advanced, for a registry's artifact event) and their first deliveries
//! persisted before the answer. Decisions are made by the pure modules (`verify`, `replay`,
//! `event`, `rules`, `chain`); this file does the I/O around them.

use crate::core::body::Body;
use crate::core::context::Inner;
use crate::core::gateway::chain;
use crate::core::gateway::config::{GatewaySettings, Webhook};
use crate::core::gateway::event::{delivery_id, parse_delivery, Parsed, SourceEvent};
use crate::core::gateway::keys::{commit_index, hash_hex, image_index, image_key};
use crate::core::gateway::records::{enqueue, load_run, save_run};
use crate::core::gateway::runstore::{claim_source, runs, settle_source, Claim};
use crate::core::gateway::state::BodyPermit;
use crate::core::gateway::verify::verify_delivery;
use crate::core::gateway::{internal, replay, rules, spawn_pump};
use crate::core::http::{json_error as error, json_response};
use crate::core::http::{read_capped, ReadError};
use crate::core::ports::{ByteStream, StoreError};
use http::{header, HeaderMap, Response, StatusCode};
use serde_json::{json, Value};
use std::rc::Rc;

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Handles one webhook delivery; see the module doc for the order of work.
pub(super) async fn hook(
    inner: &Rc<Inner>,
    name: &str,
    headers: &HeaderMap,
    body: ByteStream,
) -> Response<Body> {
    let gw = &inner.settings.gateway;
    let Some(wh) = gw.webhook(name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no webhook named {name:?} is configured"),
        );
    };
    // The permit is held until the answer is built: the body stays in memory that long.
    let (_permit, body) = match take_body(inner, gw, headers, body).await {
        Ok(b) => b,
        Err(refusal) => return *refusal,
    };
    let now = inner.ports.clock.now_ms();
    if let Err(e) = verify_delivery(
        wh.provider,
        wh.secret.expose(),
        &wh.header,
        headers,
        &body,
        now,
        gw.timestamp_tolerance_ms,
    ) {
        return error(StatusCode::UNAUTHORIZED, format!("webhook {name}: {e}"));
    }
    let body_hash = hash_hex(&[&body]);
    let record = replay::record_for(name, wh.provider, headers, &body_hash);
    match replay::is_duplicate(inner, &record, now).await {
        Ok(true) => {
            return json_response(
                StatusCode::OK,
                json!({ "status": "duplicate", "reason": "this delivery was already received" }),
            )
        }
        Ok(false) => {}
        Err(e) => return internal(e),
    }
    let parsed = match parse_delivery(wh.provider, headers, &body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let (status, reply, moved) = match parsed {
        Parsed::Ignored(reason) => (
            StatusCode::ACCEPTED,
            json!({ "status": "ignored", "reason": reason }),
            false,
        ),
        Parsed::Events(events) => match act(inner, wh, headers, &body_hash, &events).await {
            Ok(outcome) => {
                let (status, reply) = outcome.answer();
                (status, reply, outcome.moved())
            }
            Err(e) => return internal(e),
        },
    };
    if let Err(e) = replay::remember(inner, &record, now).await {
        return internal(e);
    }
    if moved {
        spawn_pump(inner);
    }
    json_response(status, reply)
}

/// A body slot and the body, read up to the cap; or the refusal to send (413 by its declared
/// length before anything is read, 503 with `Retry-After` when every slot is taken, 413 or
/// 400 while reading).
async fn take_body(
    inner: &Inner,
    gw: &GatewaySettings,
    headers: &HeaderMap,
    body: ByteStream,
) -> Result<(BodyPermit, Vec<u8>), Box<Response<Body>>> {
    let too_large = || {
        Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {} bytes", gw.max_body),
        ))
    };
    if content_length(headers).is_some_and(|l| l > gw.max_body) {
        return Err(too_large());
    }
    let Some(permit) = inner.gateway.try_body(gw.max_inflight_bodies) else {
        let mut resp = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many webhook deliveries in progress; retry shortly",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        return Err(Box::new(resp));
    };
    match read_capped(body, usize::try_from(gw.max_body).unwrap_or(usize::MAX)).await {
        Ok(b) => Ok((permit, b)),
        Err(ReadError::TooLarge(_)) => Err(too_large()),
        Err(ReadError::Failed(e)) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("reading the body: {e}"),
        ))),
    }
}

/// What a delivery's events did.
#[derive(Default)]
struct Outcome {
    /// Runs started.
    started: Vec<String>,
    /// Runs an artifact event moved on.
    advanced: Vec<String>,
    /// Runs the same source had started before (or is starting: a concurrent copy).
    existing: Vec<String>,
    /// The same source had started runs (their ids may not be known yet).
    duplicate: bool,
}

impl Outcome {
    /// True when there is something new to deliver.
    fn moved(&self) -> bool {
        !self.started.is_empty() || !self.advanced.is_empty()
    }

    /// The answer to the sender: 202 for new work or nothing to do, 200 for a duplicate.
    fn answer(&self) -> (StatusCode, Value) {
        if self.moved() {
            (
                StatusCode::ACCEPTED,
                json!({ "status": "accepted", "runs": self.started, "advanced": self.advanced }),
            )
        } else if self.duplicate {
            (
                StatusCode::OK,
                json!({ "status": "duplicate", "reason": "this commit already started runs; an admin can replay them", "runs": self.existing }),
            )
        } else {
            (
                StatusCode::ACCEPTED,
                json!({ "status": "ignored", "reason": "no rule matched" }),
            )
        }
    }
}

/// Starts or advances runs for each event of a verified, new delivery.
async fn act(
    inner: &Rc<Inner>,
    wh: &Webhook,
    headers: &HeaderMap,
    body_hash: &str,
    events: &[SourceEvent],
) -> Result<Outcome, StoreError> {
    let delivery = delivery_id(wh.provider, headers).unwrap_or_default();
    let mut o = Outcome::default();
    for ev in events {
        match ev {
            SourceEvent::Artifact { .. } => o.advanced.extend(artifact_published(inner, ev).await?),
            _ => match start_runs(inner, &wh.name, &delivery, body_hash, ev).await? {
                Started::New(ids) => o.started.extend(ids),
                Started::Existing(ids) => {
                    o.duplicate = true;
                    o.existing.extend(ids)
                }
            },
        }
    }
    Ok(o)
}

/// What a source event did.
enum Started {
    /// Runs it started.
    New(Vec<String>),
    /// Runs the same (webhook, repository, commit) had started before: nothing new.
    Existing(Vec<String>),
}

/// Starts a run per matching rule, once per source: a (webhook, repository, commit) that
/// already started runs starts none, whatever the delivery id or the dedup windows say.
async fn start_runs(
    inner: &Rc<Inner>,
    webhook: &str,
    delivery: &str,
    body_hash: &str,
    ev: &SourceEvent,
) -> Result<Started, StoreError> {
    let now = inner.ports.clock.now_ms();
    let guard = replay::source_key(webhook, ev);
    // One at a time in this instance; across instances the guard's claim decides (with a
    // record store), so two concurrent copies of a delivery cannot both pass the guard.
    let _lock = inner.run_lock.lock().await;
    if let Some(g) = &guard {
        if let Claim::Held(ids) = claim_source(inner, g).await? {
            return Ok(Started::Existing(ids));
        }
    }
    let started = create_runs(inner, webhook, delivery, body_hash, ev, now).await;
    if let Some(g) = &guard {
        settle_source(inner, g, &started).await?;
    }
    started.map(Started::New)
}

/// Creates and persists a run per matching rule, with its first deliveries; the ids.
async fn create_runs(
    inner: &Rc<Inner>,
    webhook: &str,
    delivery: &str,
    body_hash: &str,
    ev: &SourceEvent,
    now: u64,
) -> Result<Vec<String>, StoreError> {
    let gw = &inner.settings.gateway;
    let records = runs(inner);
    let mut ids = Vec::new();
    for (i, rule) in gw.rules.iter().enumerate() {
        if !rules::rule_matches(rule, webhook, ev) {
            continue;
        }
        let id = hash_hex(&[
            webhook.as_bytes(),
            delivery.as_bytes(),
            body_hash.as_bytes(),
            i.to_string().as_bytes(),
        ])[..24]
            .to_string();
        if load_run(inner, &id).await?.is_some() {
            continue; // the same delivery again: the run exists already
        }
        let image = rule.image.as_deref().map(|t| rules::render_image(t, ev));
        let (run, actions) = chain::new_run(id.clone(), webhook, ev, rule, image.clone(), gw, now);
        save_run(inner, &run).await?;
        if let SourceEvent::Push {
            repository, commit, ..
        }
        | SourceEvent::Tag {
            repository, commit, ..
        } = ev
        {
            records
                .put(&format!("{}{id}", commit_index(repository, commit)), b"")
                .await?;
        }
        if let Some(img) = &image {
            records
                .put(&format!("{}{id}", image_index(&image_key(img))), b"")
                .await?;
        }
        enqueue(inner, &run, actions).await?;
        ids.push(id);
    }
    Ok(ids)
}

/// A pushed image finishes the `build` stage of every running run that builds it.
async fn artifact_published(
    inner: &Rc<Inner>,
    ev: &SourceEvent,
) -> Result<Vec<String>, StoreError> {
    let SourceEvent::Artifact {
        repository,
        tag: Some(tag),
        digest,
        ..
    } = ev
    else {
        return Ok(Vec::new());
    };
    let now = inner.ports.clock.now_ms();
    let prefix = image_index(&format!("{repository}:{tag}"));
    let mut ids = Vec::new();
    for key in runs(inner).list(&prefix, 100).await? {
        let id = &key[prefix.len()..];
        let _guard = inner.run_lock.lock().await;
        let Some(mut run) = load_run(inner, id).await? else {
            continue;
        };
        if run.current_stage() != Some("build") {
            continue;
        }
        run.digest = Some(digest.clone());
        let Ok(actions) = run.complete(
            "build",
            true,
            Some(format!("registry reported {repository}:{tag} at {digest}")),
            now,
        ) else {
            continue;
        };
        save_run(inner, &run).await?;
        enqueue(inner, &run, actions).await?;
        ids.push(run.id.clone());
    }
    Ok(ids)
}
