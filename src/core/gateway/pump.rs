//! The outbox pump: which pending deliveries run in a pass, and the due-time index that makes
//! that choice fair.
//!
//! Every pending record (`outbox/pending/<id>`) has an index entry
//! `outbox/due/<next_ms, 16 digits>/<id>`; key order is due order, so a pass lists the index
//! from its start and stops at the first entry not yet due. Backed-off deliveries sort after
//! everything due before them, so no number of them can hide a due delivery (the old pump
//! looked at the first 100 pending records by id only). Work per pass is bounded
//! ([`PUMP_BATCH`] attempts, [`PER_TARGET`] per target, [`SCAN`] index entries read).
//!
//! Invariant, kept by writing the index entry before the record and deleting the old entry
//! after it: a pending record always has an entry for its `next_ms`. Entries whose record is
//! gone or has moved on are dropped when a pass meets them. Records written before the index
//! existed are indexed once per instance (a marker key remembers it was done).

use crate::core::context::Inner;
use crate::core::gateway::chain::Run;
pub use crate::core::gateway::keys::DUE;
use crate::core::gateway::keys::{due_key, parse_due_key};
use crate::core::gateway::outbox::StageCall;
use crate::core::gateway::outbox::{Delivery, DeliveryKind, DEAD, PENDING};
use crate::core::gateway::records::{
    enqueue, load_delivery, load_run, remove_pending, save_delivery, save_pending, save_run,
};
use crate::core::gateway::settle::{settle, RetryPolicy, Settlement};
use crate::core::gateway::{callback, outbox, prewarm, replay, PumpReport};
use crate::core::metrics::inc;
use crate::core::ports::StoreError;
use std::collections::HashMap;
use std::rc::Rc;

/// Deliveries attempted per pass at most.
pub const PUMP_BATCH: usize = 100;
/// Deliveries to one target attempted per pass at most: a target with a long queue cannot
/// take a whole pass from the others.
pub const PER_TARGET: usize = 25;
/// Index entries read per pass at most.
pub const SCAN: usize = 4 * PUMP_BATCH;
/// Marker: legacy records were indexed.
const INDEXED_MARKER: &str = "gateway/indexed/v1";
/// Most legacy records indexed (a one-time pass over an older store).
const LEGACY_LIMIT: usize = 100_000;

/// What a delivery is fair-shared by.
fn lane(d: &Delivery) -> &str {
    match &d.kind {
        DeliveryKind::Dispatch { target, .. } | DeliveryKind::Event { target, .. } => target,
        DeliveryKind::Prewarm { .. } => "",
    }
}

/// Indexes records written before the due index (and the dedup index) existed; once per
/// instance, and once per store thanks to the marker.
async fn index_legacy(inner: &Inner) -> Result<(), StoreError> {
    if inner.gateway.indexed.get() {
        return Ok(());
    }
    let kv = &inner.ports.kv;
    if kv.get(INDEXED_MARKER).await?.is_none() {
        for key in kv.list(PENDING, LEGACY_LIMIT).await? {
            if let Some(d) = load_delivery(inner, &key).await? {
                kv.put(&due_key(d.next_ms, &d.id), b"").await?;
            }
        }
        replay::index_legacy(inner, LEGACY_LIMIT).await?;
        kv.put(INDEXED_MARKER, b"1").await?;
    }
    inner.gateway.indexed.set(true);
    Ok(())
}

/// Clears the "a pass is running" flag when dropped.
struct Pumping(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Pumping {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Runs due deliveries once; see [`crate::core::app::App::pump_outbox`].
pub(crate) async fn pump(inner: &Rc<Inner>) -> PumpReport {
    let mut report = PumpReport::default();
    if inner
        .pumping
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return report;
    }
    // Cleared however the pass ends, also when its future is dropped mid-way (a host that
    // cancels deferred work), so a cut pass never stops the later ones.
    let _pumping = Pumping(inner.pumping.clone());
    let _ = index_legacy(inner).await;
    let keys = inner.ports.kv.list(DUE, SCAN).await.unwrap_or_default();
    let mut per_lane: HashMap<String, usize> = HashMap::new();
    for key in keys {
        if report.attempted as usize >= PUMP_BATCH {
            break;
        }
        let Some((due, id)) = parse_due_key(&key) else {
            let _ = inner.ports.kv.delete(&key).await;
            continue;
        };
        if due > inner.ports.clock.now_ms() {
            break; // key order is due order: nothing after this is due either
        }
        let d = match load_delivery(inner, &format!("{PENDING}{id}")).await {
            Ok(Some(d)) if d.next_ms == due => d,
            Ok(_) => {
                // Delivered, dead-lettered or rescheduled: this entry is stale.
                let _ = inner.ports.kv.delete(&key).await;
                continue;
            }
            Err(_) => continue,
        };
        let taken = per_lane.entry(lane(&d).to_string()).or_insert(0);
        if *taken >= PER_TARGET {
            continue; // its turn comes next pass
        }
        *taken += 1;
        let Ok(Some(run)) = load_run(inner, &d.run).await else {
            remove_pending(inner, &d, due).await;
            continue;
        };
        report.attempted += 1;
        attempt(inner, d, run, &mut report).await;
    }
    replay::sweep(inner).await;
    report
}

/// Sends one due delivery (indexed at its `next_ms`), settles it, and stores the outcome on
/// the delivery record and its run.
async fn attempt(inner: &Rc<Inner>, d: Delivery, run: Run, report: &mut PumpReport) {
    let due = d.next_ms;
    let result = execute(inner, &d, &run).await;
    let now = inner.ports.clock.now_ms();
    let settlement = settle(&d, result, now, &RetryPolicy::of(&inner.settings.gateway));
    log_attempt(&d, &settlement);
    // Reload under the run lock: a result may have been posted while the request was in
    // flight, and must not be overwritten by this pass's stale copy.
    let _guard = inner.run_lock.lock().await;
    let mut run = match load_run(inner, &d.run).await {
        Ok(Some(r)) => r,
        _ => run,
    };
    let actions = settlement.apply_to_run(&d, &mut run, now);
    let record = settlement.record(&d);
    match &settlement {
        Settlement::Done { .. } => {
            inner.metrics.delivery("delivered");
            report.delivered += 1;
            remove_pending(inner, &d, due).await;
        }
        Settlement::Retry { .. } => {
            inner.metrics.delivery("retry");
            report.retrying += 1;
            let _ = save_pending(inner, &record, Some(due)).await;
        }
        Settlement::Dead { .. } => {
            inner.metrics.delivery("dead");
            report.dead += 1;
            let _ = save_delivery(inner, DEAD, &record).await;
            remove_pending(inner, &d, due).await;
        }
    }
    let _ = save_run(inner, &run).await;
    let _ = enqueue(inner, &run, actions).await;
}

/// One line per delivery attempt: the target (or pre-warm), the attempt number, the outcome
/// and, for a retry, when it is due (errors name statuses and addresses, never a secret).
fn log_attempt(d: &Delivery, s: &Settlement) {
    let (kind, target) = match &d.kind {
        DeliveryKind::Dispatch { target, .. } => ("dispatch", target.as_str()),
        DeliveryKind::Event { target, .. } => ("event", target.as_str()),
        DeliveryKind::Prewarm { .. } => ("prewarm", "-"),
    };
    let attempt = d.attempts + 1;
    let (delivery, run, stage) = (&d.id, &d.run, d.stage().unwrap_or("-"));
    match s {
        Settlement::Done { detail } => tracing::info!(
            delivery = %delivery, run = %run, stage = %stage, kind, target = %target, attempt,
            outcome = "delivered", detail = %detail, "outbox attempt"
        ),
        Settlement::Retry { at_ms, error } => tracing::warn!(
            delivery = %delivery, run = %run, stage = %stage, kind, target = %target, attempt,
            outcome = "retry", next_due = %crate::core::time::rfc3339(*at_ms), error = %error,
            "outbox attempt"
        ),
        Settlement::Dead { reason, error } => tracing::warn!(
            delivery = %delivery, run = %run, stage = %stage, kind, target = %target, attempt,
            outcome = "dead", reason = %reason, error = %error, "outbox attempt"
        ),
    }
}

/// The earliest `next_ms` among pending deliveries (hosts with timers sleep until then). A
/// stale index entry can make it early, never late.
pub(crate) async fn next_due(inner: &Inner) -> Option<u64> {
    let _ = index_legacy(inner).await;
    let keys = inner.ports.kv.list(DUE, 1).await.ok()?;
    keys.first()
        .and_then(|k| parse_due_key(k))
        .map(|(ms, _)| ms)
}

/// Sends one delivery; Ok(detail) when it was accepted.
pub(crate) async fn execute(inner: &Rc<Inner>, d: &Delivery, run: &Run) -> Result<String, String> {
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
    inc(&inner.metrics.gateway_requests);
    let resp = inner
        .ports
        .upstream
        .send(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    // Drain a little of the answer so the connection can be reused; its content is not needed.
    let _ = crate::core::http::read_capped(resp.into_body(), 64 * 1024).await;
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
    fn due_keys_sort_in_due_order_and_parse_back() {
        let a = due_key(999, "x");
        let b = due_key(1_000, "a");
        let c = due_key(1_700_000_000_000, "a");
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(parse_due_key(&c), Some((1_700_000_000_000, "a")));
        assert_eq!(parse_due_key("outbox/due/12/x"), None);
        assert_eq!(parse_due_key("outbox/pending/x"), None);
        assert_eq!(parse_due_key(&due_key(5, "")), None);
    }
}
