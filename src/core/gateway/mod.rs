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
//! replayable ([`pump`], whose decisions are in [`settle`]). Stage results come back through
//! [`callback`].
//!
//! Files: the pure decisions are `verify` (signatures), `replay` (dedup records), `event`
//! (parsing each provider's payload), `rules`, `chain` (a run's stages), `outbox` (delivery
//! records and the targets' requests), `settle` (a delivery's fate after an attempt) and
//! `keys` (storage keys); the I/O is `hook` (intake), `routes` (`/chain/…`), `callback`
//! (stage results), `pump` (sending due deliveries), `prewarm` (the `distribute` stage) and
//! `records` (runs and deliveries in the key-value port), and `queue` (the outbox on a host's
//! queue, when it has one), `runstore` (where runs and dedup records live: a host's record
//! store, else the key-value port). This file routes to them and holds the glue they share.

pub mod callback;
pub mod cdevent;
pub mod chain;
pub mod config;
pub mod event;
mod hook;
pub mod keys;
pub mod outbox;
mod prewarm;
pub mod pump;
pub(crate) mod queue;
mod records;
pub mod replay;
mod routes;
pub mod rules;
pub(crate) mod runstore;
pub mod settle;
pub(crate) mod state;
pub mod verify;

pub use keys::image_key;
pub(crate) use prewarm::warm_local;
pub use prewarm::{warm, WarmReport, WarmStep};
pub(crate) use pump::{next_due, pump};

use crate::core::body::Body;
use crate::core::context::Inner;
use crate::core::http::json_error as error;
use crate::core::ports::{ByteStream, StoreError};
use futures_util::FutureExt;
use http::{Method, Request, Response, StatusCode};
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

/// A store failure, as the 500 a gateway route answers.
fn internal(e: StoreError) -> Response<Body> {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
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
    caller: &crate::core::access::caller::Caller,
) -> Option<Response<Body>> {
    let path = req.uri().path();
    if let Some(name) = path.strip_prefix("/hooks/") {
        return Some(if req.method() == Method::POST {
            hook::hook(inner, name, req.headers(), body).await
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
