//! The build-trigger gateway: verified webhooks in (`POST /hooks/<name>`), chain runs and
//! outbound deliveries out, and the `/chain/…` routes to observe and steer them.
//!
//! Order of work for a delivery: a slot among `max_inflight_bodies` (503 + `Retry-After`,
//! nothing read) → cap the body (413, read no further) → verify the signature over the raw
//! bytes (401) → dedup ([`replay`]: the body's sha256, or the delivery id and body for senders
//! that sign a timestamp) → parse (400) → match rules, unless the (repository, commit) already
//! started runs → persist runs and their first deliveries → answer 202 → dispatch after the
//! response through the deferred-work port. Duplicates and ignored events answer 2xx (GitLab
//! disables hooks that keep getting 4xx). Deliveries are at-least-once: persisted before they
//! are sent, retried with backoff, dead-lettered after the configured attempts, and
//! replayable ([`pump`]). Stage results come back through [`callback`]. Every decision lives
//! in the pure submodules; this module does the I/O.

pub mod callback;
pub mod chain;
pub mod config;
pub mod event;
pub mod outbox;
mod prewarm;
pub mod pump;
pub mod replay;
mod routes;
pub mod rules;
pub mod settle;
pub(crate) mod state;
pub mod verify;

pub(crate) use pump::{next_due, pump};

use crate::core::app::{json_error as error, json_response, Inner};
use crate::core::body::Body;
use crate::core::gateway::chain::{Action, Run};
use crate::core::gateway::config::GatewaySettings;
use crate::core::gateway::event::{delivery_id, parse_delivery, Parsed, SourceEvent};
use crate::core::gateway::outbox::{Delivery, DeliveryKind, StageCall, DELIVERY_VERSION, PENDING};
use crate::core::gateway::verify::{tokens_match, verify_delivery};
use crate::core::metrics::inc;
use crate::core::ports::{ByteStream, StoreError};
use futures_util::{FutureExt, StreamExt};
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::rc::Rc;

/// What one pump pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PumpReport {
    /// Due deliveries attempted.
    pub attempted: u32,
    /// Delivered.
    pub delivered: u32,
    /// Failed and rescheduled.
    pub retrying: u32,
    /// Moved to the dead-letter list.
    pub dead: u32,
}

fn internal(e: StoreError) -> Response<Body> {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// sha256 over `parts`, each followed by a NUL, in hex.
pub(crate) fn hash_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

enum ReadError {
    TooLarge,
    Broken(String),
}

async fn read_capped(mut body: ByteStream, cap: u64) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ReadError::Broken(e.to_string()))?;
        if out.len() as u64 + chunk.len() as u64 > cap {
            return Err(ReadError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// `acme/app:tag` for an image reference, without its registry host: what a registry
/// notification (which names the repository and tag) is matched against.
pub fn image_key(image: &str) -> String {
    match image.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            rest.to_string()
        }
        _ => image.to_string(),
    }
}

fn run_key(id: &str) -> String {
    format!("run/{id}")
}

fn repository_prefix(repository: &str) -> String {
    format!(
        "run-by-commit/{}/",
        &hash_hex(&[repository.as_bytes()])[..16]
    )
}

fn commit_index(repository: &str, commit: &str) -> String {
    format!("{}{commit}/", repository_prefix(repository))
}

fn image_index(key: &str) -> String {
    format!("run-by-image/{}/", &hash_hex(&[key.as_bytes()])[..32])
}

async fn load_run(inner: &Inner, id: &str) -> Result<Option<Run>, StoreError> {
    Ok(inner
        .ports
        .kv
        .get(&run_key(id))
        .await?
        .and_then(|raw| serde_json::from_slice::<Run>(&raw).ok()))
}

async fn save_run(inner: &Inner, run: &Run) -> Result<(), StoreError> {
    let raw = serde_json::to_vec(run).map_err(|e| StoreError(e.to_string()))?;
    inner.ports.kv.put(&run_key(&run.id), &raw).await
}

async fn load_delivery(inner: &Inner, key: &str) -> Result<Option<Delivery>, StoreError> {
    Ok(inner
        .ports
        .kv
        .get(key)
        .await?
        .and_then(|raw| serde_json::from_slice::<Delivery>(&raw).ok())
        .filter(|d| d.v == DELIVERY_VERSION))
}

async fn save_delivery(inner: &Inner, prefix: &str, d: &Delivery) -> Result<(), StoreError> {
    let raw = serde_json::to_vec(d).map_err(|e| StoreError(e.to_string()))?;
    inner.ports.kv.put(&format!("{prefix}{}", d.id), &raw).await
}

/// Persists a delivery for each action (once: an existing pending record is kept).
async fn enqueue(inner: &Inner, run: &Run, actions: Vec<Action>) -> Result<(), StoreError> {
    let gw = &inner.settings.gateway;
    let now = inner.ports.clock.now_ms();
    for a in actions {
        let (what, kind) = match a {
            Action::Dispatch { stage, target } => (
                format!("dispatch/{stage}"),
                DeliveryKind::Dispatch { stage, target },
            ),
            Action::Prewarm { stage } => {
                (format!("prewarm/{stage}"), DeliveryKind::Prewarm { stage })
            }
            Action::Emit { event_type, stage } => {
                let Some(target) = gw.chain.events.clone() else {
                    continue;
                };
                let what = format!("event/{event_type}/{}", stage.as_deref().unwrap_or("-"));
                (
                    what,
                    DeliveryKind::Event {
                        target,
                        event_type: event_type.to_string(),
                        stage,
                    },
                )
            }
        };
        let id = outbox::delivery_id(&run.id, &what);
        if inner
            .ports
            .kv
            .get(&format!("{PENDING}{id}"))
            .await?
            .is_some()
        {
            continue;
        }
        let d = Delivery {
            v: DELIVERY_VERSION,
            id,
            run: run.id.clone(),
            kind,
            attempts: 0,
            next_ms: now,
            created_ms: now,
            last_error: None,
        };
        pump::save_pending(inner, &d, None).await?;
    }
    Ok(())
}

/// Starts an outbox pass after the response, through the deferred-work port.
fn spawn_pump(inner: &Rc<Inner>) {
    let inner2 = inner.clone();
    inner.ports.deferred.spawn(
        async move {
            pump(&inner2).await;
        }
        .boxed_local(),
    );
}

/// How often requests start an outbox pass on their own.
const PUMP_ON_REQUEST_EVERY_MS: u64 = 1000;

/// Starts an outbox pass when none was started by a request for a second: hosts without
/// timers (Spin) get their retries as requests arrive; hosts with one lose nothing by it.
pub(crate) fn pump_if_idle(inner: &Rc<Inner>) {
    let gw = &inner.settings.gateway;
    if gw.webhooks.is_empty() && gw.targets.is_empty() {
        return;
    }
    let now = inner.ports.clock.now_ms();
    if now.saturating_sub(inner.last_pump_ms.get()) >= PUMP_ON_REQUEST_EVERY_MS {
        inner.last_pump_ms.set(now);
        spawn_pump(inner);
    }
}

/// Routes `/hooks/…` and `/chain…`; None for every other path.
pub(crate) async fn handle(
    inner: &Rc<Inner>,
    req: &Request<()>,
    body: ByteStream,
    caller: &crate::core::access::gate::Caller,
) -> Option<Response<Body>> {
    let path = req.uri().path();
    if let Some(name) = path.strip_prefix("/hooks/") {
        return Some(if req.method() == Method::POST {
            hook(inner, name, req.headers(), body).await
        } else {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "webhooks are delivered with POST",
            )
        });
    }
    let rest = if path == "/chain" {
        Some("")
    } else {
        path.strip_prefix("/chain/")
    };
    let rest = rest?;
    Some(routes::chain_route(inner, req, rest, body, caller).await)
}

async fn hook(
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
    if content_length(headers).is_some_and(|l| l > gw.max_body) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {} bytes", gw.max_body),
        );
    }
    // Held until the answer is built: the body stays in memory that long.
    let Some(_permit) = inner.gateway.try_body(gw.max_inflight_bodies) else {
        let mut resp = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many webhook deliveries in progress; retry shortly",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        return resp;
    };
    let body = match read_capped(body, gw.max_body).await {
        Ok(b) => b,
        Err(ReadError::TooLarge) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {} bytes", gw.max_body),
            )
        }
        Err(ReadError::Broken(e)) => {
            return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}"))
        }
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
    let delivery = delivery_id(wh.provider, headers).unwrap_or_default();
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
    let mut started = Vec::new();
    let mut advanced = Vec::new();
    let mut existing = Vec::new();
    let (status, reply) = match parsed {
        Parsed::Ignored(reason) => (
            StatusCode::ACCEPTED,
            json!({ "status": "ignored", "reason": reason }),
        ),
        Parsed::Events(events) => {
            for ev in &events {
                let r = match ev {
                    SourceEvent::Artifact { .. } => artifact_published(inner, ev)
                        .await
                        .map(|ids| advanced.extend(ids)),
                    _ => match start_runs(inner, name, &delivery, &body_hash, ev).await {
                        Ok(Started::New(ids)) => {
                            started.extend(ids);
                            Ok(())
                        }
                        Ok(Started::Existing(ids)) => {
                            existing.extend(ids);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                };
                if let Err(e) = r {
                    return internal(e);
                }
            }
            if !started.is_empty() || !advanced.is_empty() {
                (
                    StatusCode::ACCEPTED,
                    json!({ "status": "accepted", "runs": started, "advanced": advanced }),
                )
            } else if !existing.is_empty() {
                (
                    StatusCode::OK,
                    json!({ "status": "duplicate", "reason": "this commit already started runs; an admin can replay them", "runs": existing }),
                )
            } else {
                (
                    StatusCode::ACCEPTED,
                    json!({ "status": "ignored", "reason": "no rule matched" }),
                )
            }
        }
    };
    if let Err(e) = replay::remember(inner, &record, now).await {
        return internal(e);
    }
    if !started.is_empty() || !advanced.is_empty() {
        spawn_pump(inner);
    }
    json_response(status, reply)
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
    let gw: &GatewaySettings = &inner.settings.gateway;
    let now = inner.ports.clock.now_ms();
    let guard = replay::source_key(webhook, ev);
    // One at a time, so two concurrent copies of a delivery cannot both pass the guard.
    let _lock = inner.run_lock.lock().await;
    if let Some(g) = &guard {
        if let Some(raw) = inner.ports.kv.get(g).await? {
            let ids = String::from_utf8_lossy(&raw)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            return Ok(Started::Existing(ids));
        }
    }
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
            inner
                .ports
                .kv
                .put(&format!("{}{id}", commit_index(repository, commit)), b"")
                .await?;
        }
        if let Some(img) = &image {
            inner
                .ports
                .kv
                .put(&format!("{}{id}", image_index(&image_key(img))), b"")
                .await?;
        }
        enqueue(inner, &run, actions).await?;
        ids.push(id);
    }
    if let (Some(g), false) = (&guard, ids.is_empty()) {
        inner.ports.kv.put(g, ids.join(",").as_bytes()).await?;
    }
    Ok(Started::New(ids))
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
    for key in inner.ports.kv.list(&prefix, 100).await? {
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

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// None when the request carries the admin token; otherwise the refusal to send.
fn refuse_non_admin(gw: &GatewaySettings, h: &HeaderMap) -> Option<Response<Body>> {
    let Some(token) = &gw.admin_token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "admin routes are disabled: set [gateway] admin_token",
        ));
    };
    match bearer(h) {
        Some(given) if tokens_match(given, token.expose()) => None,
        _ => Some(error(StatusCode::UNAUTHORIZED, "admin token required")),
    }
}

/// Sends one delivery; Ok(detail) when it was accepted.
async fn execute(inner: &Rc<Inner>, d: &Delivery, run: &Run) -> Result<String, String> {
    let gw = &inner.settings.gateway;
    let now = inner.ports.clock.now_ms();
    let request = match &d.kind {
        DeliveryKind::Prewarm { .. } => {
            let image = run
                .image
                .as_deref()
                .ok_or("the run has no image to pre-warm")?;
            return prewarm::prewarm(inner, image).await;
        }
        DeliveryKind::Dispatch { stage, target } => {
            let t = gw
                .target(target)
                .ok_or_else(|| format!("target {target:?} is no longer configured"))?;
            let token = callback::token_for(inner, run, stage).unwrap_or_default();
            let call = StageCall {
                run,
                stage,
                delivery: &d.id,
                run_token: &token,
                callback: format!(
                    "{}/chain/{}/{stage}",
                    gw.public_url.as_deref().unwrap_or(""),
                    run.id
                ),
            };
            outbox::dispatch_request(t, &call)?
        }
        DeliveryKind::Event {
            target,
            event_type,
            stage,
        } => {
            let t = gw
                .target(target)
                .ok_or_else(|| format!("target {target:?} is no longer configured"))?;
            outbox::event_request(t, run, &d.id, event_type, stage.as_deref(), None, now)?
        }
    };
    inc(&inner.metrics.upstream_requests);
    let resp = inner
        .ports
        .upstream
        .send(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    // Drain a little of the answer so the connection can be reused; its content is not needed.
    let _ = crate::core::upstream::read_body_limited(resp.into_body(), 64 * 1024).await;
    if status.is_success() {
        Ok(format!("target answered {status}"))
    } else {
        Err(format!("target answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_keys_drop_the_registry_host() {
        assert_eq!(
            image_key("registry.example.com/acme/app:main-1"),
            "acme/app:main-1"
        );
        assert_eq!(image_key("127.0.0.1:5000/acme/app:v1"), "acme/app:v1");
        assert_eq!(image_key("localhost/app:v1"), "app:v1");
        assert_eq!(image_key("acme/app:v1"), "acme/app:v1");
    }
}
