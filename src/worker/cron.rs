//! The worker's `scheduled` handler: a Cron Trigger (`[triggers] crons` in `wrangler.toml`)
//! runs the gateway's outbox pump ([`App::pump_outbox`]), so deliveries that failed are
//! retried when they fall due even when no request arrives. Cron Triggers invoke `scheduled`,
//! never `fetch`, so this is the only way a schedule reaches the pump on Workers.
//!
//! It builds (or reuses) the isolate's [`App`] exactly as `fetch` does, runs one pass, and logs
//! one line with the pass's counts. Deferred work the pass starts runs under the event's own
//! `waitUntil`.
//!
//! With the outbox queue bound (`PULLGATE_OUTBOX`, see [`super::queue`]) the queue sends
//! deliveries and retries them on their own delays; this pass is then the fallback for
//! deliveries the queue refused or did not settle within its lease.
//!
//! # Limitations
//! - A pass runs at most once per trigger, and Cron Triggers fire at most once a minute: a
//!   retry falls due at its backoff time but is sent on the next trigger (or the next request
//!   that starts a pass), so delays under a minute round up to the trigger's period.
//! - Under `wrangler dev` triggers do not fire on their own; `GET /cdn-cgi/local/scheduled`
//!   (or `--test-scheduled` and `/__scheduled`) runs the handler.

use super::{app, next_invocation, Gated, Keeper, WithRequest};
use crate::core::app::App;
use std::rc::Rc;
use worker::{event, Env, ScheduleContext, ScheduledEvent};

/// Runs one outbox pass and logs what it did.
async fn pump(cron: String, env: Env) {
    let app: App = match app(&env) {
        Ok(app) => app,
        Err(e) => {
            worker::console_error!(
                "event=scheduled cron={cron:?} error={:?}",
                format!("pullgate cannot start: {e}")
            );
            return;
        }
    };
    let report = app.pump_outbox().await;
    worker::console_log!(
        "event=scheduled cron={cron:?} attempted={} delivered={} retrying={} dead={}",
        report.attempted,
        report.delivered,
        report.retrying,
        report.dead
    );
}

/// The worker's `scheduled` handler (Cron Triggers).
#[event(scheduled)]
pub async fn scheduled(event: ScheduledEvent, env: Env, ctx: ScheduleContext) {
    let id = next_invocation();
    WithRequest {
        id,
        ctx: Keeper::Scheduled(Rc::new(ctx)),
        inner: Box::pin(Gated::new(id, pump(event.cron(), env))),
    }
    .await
}
